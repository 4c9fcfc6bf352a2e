//! The status HTTP server: `/` (the status page, HTML for a person: see
//! [`page`]), `/healthz` (the process answers), `/readyz`
//! (200 once the first full sync is done, 503 before), `/metrics`
//! (Prometheus text) and `/status` (the JSON status document).
//!
//! It only reads [`Telemetry`]; it changes nothing, except through the DR
//! drill's `/drill` endpoints (`drill.rs`), which exist only when the
//! embedder hands it a [`drill::Control`]. Loopback by default
//! (`agent.status_listen`): nothing here is meant for the open network.

pub mod drill;
pub mod page;

use std::net::SocketAddr;
use std::time::SystemTime;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::telemetry::Telemetry;

/// The status server could not start.
#[derive(Debug, thiserror::Error)]
#[error("status server: cannot listen on {addr}")]
pub struct StatusError {
    /// The address asked for.
    pub addr: SocketAddr,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// A bound status server, not yet serving.
pub struct StatusServer {
    listener: TcpListener,
    telemetry: Telemetry,
    control: Option<drill::Control>,
}

impl StatusServer {
    /// Binds `addr` (port 0 picks a free port: see [`StatusServer::local_addr`]).
    pub async fn bind(addr: SocketAddr, telemetry: Telemetry) -> Result<Self, StatusError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StatusError { addr, source })?;
        Ok(Self {
            listener,
            telemetry,
            control: None,
        })
    }

    /// Also serves `/drill` (GET, POST, DELETE) through `control`; `None`
    /// leaves it out.
    pub fn with_control(mut self, control: Option<drill::Control>) -> Self {
        self.control = control;
        self
    }

    /// Where it listens.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until `shutdown` is cancelled.
    pub async fn serve(self, shutdown: CancellationToken) -> std::io::Result<()> {
        let mut app = router(self.telemetry);
        if let (Some(control), Ok(addr)) = (self.control, self.listener.local_addr()) {
            app = app.merge(drill::routes(control, addr));
        }
        axum::serve(self.listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    }
}

fn router(telemetry: Telemetry) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(telemetry)
}

async fn readyz(State(t): State<Telemetry>) -> impl IntoResponse {
    if t.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "first full sync not done yet\n",
        )
    }
}

async fn metrics(State(t): State<Telemetry>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        t.encode_metrics(),
    )
}

async fn status(State(t): State<Telemetry>) -> impl IntoResponse {
    Json(t.status())
}

async fn status_page(State(t): State<Telemetry>) -> impl IntoResponse {
    let now = crate::telemetry::unix_ms(SystemTime::now());
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        page::render(&t.status(), now),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bare HTTP/1.1 GET: status code and body.
    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: status\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.expect("read");
        let code = raw
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status line");
        let body = raw
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (code, body)
    }

    #[tokio::test]
    async fn endpoints_answer_and_readiness_follows_the_sync() {
        let t = Telemetry::new();
        let server = StatusServer::bind(SocketAddr::from(([127, 0, 0, 1], 0)), t.clone())
            .await
            .expect("bind");
        let addr = server.local_addr().expect("addr");
        let token = CancellationToken::new();
        let serving = tokio::spawn(server.serve(token.clone()));
        assert_eq!(get(addr, "/healthz").await.0, 200);
        assert_eq!(get(addr, "/readyz").await.0, 503);
        t.ready();
        assert_eq!(get(addr, "/readyz").await.0, 200);
        let (code, text) = get(addr, "/metrics").await;
        assert_eq!(code, 200);
        assert!(text.contains("nacos_replicator_ready 1"), "{text}");
        let (code, json) = get(addr, "/status").await;
        assert_eq!(code, 200);
        let doc: serde_json::Value = serde_json::from_str(&json).expect("json");
        assert_eq!(doc["ready"], serde_json::Value::Bool(true));
        let (code, html) = get(addr, "/").await;
        assert_eq!(code, 200);
        assert!(
            html.contains("<span id=\"ready\" class=\"badge ok\">"),
            "{html}"
        );
        token.cancel();
        serving.await.expect("task").expect("clean stop");
        // A taken port is a clear error naming the address.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let busy = taken.local_addr().expect("addr");
        let err = StatusServer::bind(busy, t)
            .await
            .err()
            .expect("port in use");
        assert!(err.to_string().contains(&busy.to_string()), "{err}");
    }
}
