//! The fake server's HTTP port: login and the service catalog, the two HTTP
//! calls our client makes (`/nacos/v1/auth/users/login`, also reachable as
//! `/nacos/v1/auth/login`, and `/nacos/v1/ns/catalog/services`).
//!
//! Owns nothing but the translation between HTTP and the registry; every
//! accepted connection is served by its own task, stopped with the server.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequest, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tracing::debug;

use super::{Shared, lock};
use crate::runtime::Tasks;

/// Accepts HTTP connections until `stop` is cancelled; the listener is
/// dropped when this returns.
pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>, tasks: Tasks) {
    let stop = tasks.token().clone();
    let router = Router::new()
        .route("/nacos/v1/auth/users/login", post(login))
        .route("/nacos/v1/auth/login", post(login))
        .route("/nacos/v1/ns/catalog/services", get(catalog))
        .with_state(shared);
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let service = TowerToHyperService::new(router.clone());
        let stop = stop.clone();
        tasks.spawn("fake http connection", async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service);
            tokio::select! {
                r = connection => if let Err(e) = r { debug!(error = %e, "HTTP connection ended") },
                () = stop.cancelled() => {}
            }
        });
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct LoginParams {
    username: String,
    password: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LoginReply {
    access_token: String,
    token_ttl: u64,
    global_admin: bool,
    username: String,
}

/// Nacos takes the credentials from the query or a form body.
async fn login(State(shared): State<Arc<Shared>>, request: axum::extract::Request) -> Response {
    let from_query = Query::<LoginParams>::try_from_uri(request.uri())
        .map(|q| q.0)
        .unwrap_or_default();
    let params = match Form::<LoginParams>::from_request(request, &()).await {
        Ok(Form(p)) if !p.username.is_empty() => p,
        _ => from_query,
    };
    let mut registry = lock(&shared);
    let accepted = match &shared.auth {
        Some(auth) => auth.username == params.username && auth.password == params.password,
        // Auth off: any login succeeds; the token is never checked.
        None => true,
    };
    if !accepted {
        registry.stats.logins_rejected += 1;
        return (StatusCode::FORBIDDEN, "unknown user!").into_response();
    }
    let (token, ttl) = registry.issue_token();
    let reply = LoginReply {
        access_token: token.clone(),
        token_ttl: ttl.as_secs().max(1),
        global_admin: true,
        username: params.username,
    };
    ([("Authorization", format!("Bearer {token}"))], Json(reply)).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct CatalogParams {
    namespace_id: String,
    page_no: usize,
    page_size: usize,
    access_token: Option<String>,
}

impl Default for CatalogParams {
    fn default() -> Self {
        Self {
            namespace_id: crate::model::DEFAULT_NAMESPACE.to_owned(),
            page_no: 1,
            page_size: 10,
            access_token: None,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CatalogPage {
    count: usize,
    service_list: Vec<CatalogEntry>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CatalogEntry {
    name: String,
    group_name: String,
    cluster_count: usize,
    ip_count: usize,
    healthy_instance_count: usize,
    trigger_flag: String,
}

async fn catalog(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(params): Query<CatalogParams>,
) -> Response {
    let mut registry = lock(&shared);
    if shared.auth.is_some() {
        let header = headers.get("accessToken").and_then(|v| v.to_str().ok());
        if let Err(r) = registry.check_token(params.access_token.as_deref().or(header)) {
            return (StatusCode::FORBIDDEN, r.message).into_response();
        }
    }
    let namespace = if params.namespace_id.is_empty() {
        crate::model::DEFAULT_NAMESPACE
    } else {
        &params.namespace_id
    };
    let size = params.page_size.max(1);
    let skip = params.page_no.max(1).saturating_sub(1).saturating_mul(size);
    let (count, page) = registry.catalog(namespace, skip, size);
    let service_list = page
        .iter()
        .map(|(key, hosts, healthy)| CatalogEntry {
            name: key.name.to_string(),
            group_name: key.group.to_string(),
            cluster_count: usize::from(*hosts > 0),
            ip_count: *hosts,
            healthy_instance_count: *healthy,
            trigger_flag: "false".to_owned(),
        })
        .collect::<Vec<_>>();
    registry.stats.catalog_pages += 1;
    registry.stats.catalog_entries += service_list.len() as u64;
    Json(CatalogPage {
        count,
        service_list,
    })
    .into_response()
}
