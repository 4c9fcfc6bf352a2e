//! The fake server's gRPC port: the accept loop, the unary `Request` service
//! and the `BiRequestStream` service, on the generated tonic stubs.
//!
//! Each accepted TCP connection is served by its own task, so that a test can
//! cut one transport (Nacos keys a connection by its transport). The task puts
//! a [`ConnMeta`] in every request's extensions: that is how ServerCheck learns
//! the id of the transport it arrived on. Must not hold the registry lock
//! across an await.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::codegen::http;
use tonic::{Status, Streaming};
use tracing::debug;

use super::state::{Host, Knobs, Registry, Rejection, Silence, check_target};
use super::{FakeStats, Shared, lock};
use crate::model::ServiceKey;
use crate::proto::Payload;
use crate::proto::bi_request_stream_server::{BiRequestStream, BiRequestStreamServer};
use crate::proto::request_server::{Request as RequestService, RequestServer};
use crate::runtime::Tasks;
use crate::wire::{self, Message, ResponseStatus};

/// Largest message either side may send (Nacos' inbound limit).
const MAX_MESSAGE_BYTES: usize = 10 * 1024 * 1024;
/// Header that carries the access token.
const TOKEN_KEY: &str = "accessToken";

/// The transport a request arrived on.
#[derive(Debug, Clone)]
pub(super) struct ConnMeta {
    id: Arc<str>,
    remote: SocketAddr,
    /// Cancelled to close the transport (and when the server stops).
    kill: CancellationToken,
}

/// Accepts gRPC connections until `stop` is cancelled; dropping out of the
/// loop drops the listener, so the port is free once this returns.
pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>, tasks: Tasks) {
    let stop = tasks.token().clone();
    let naming = Naming {
        shared: shared.clone(),
        tasks: tasks.clone(),
    };
    let routes = tonic::service::Routes::new(
        RequestServer::new(naming.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    )
    .add_service(
        BiRequestStreamServer::new(naming)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    );
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let (tcp, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors and the like: pause rather than spin.
                debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let id: Arc<str> =
            format!("{}_{}_{}", super::now_millis(), remote.ip(), remote.port()).into();
        let kill = stop.child_token();
        lock(&shared).stats.transports_accepted += 1;
        let meta = ConnMeta {
            id: id.clone(),
            remote,
            kill: kill.clone(),
        };
        let service = tower::ServiceBuilder::new()
            .map_request(move |mut request: http::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(meta.clone());
                request
            })
            .service(routes.clone());
        let shared = shared.clone();
        let executor = tasks.executor();
        tasks.spawn("fake grpc connection", async move {
            let mut builder = hyper::server::conn::http2::Builder::new(executor);
            builder.max_concurrent_streams(1000);
            let connection =
                builder.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(service));
            tokio::select! {
                r = connection => if let Err(e) = r { debug!(error = %e, "connection ended") },
                // Cut by a test or by stop: dropping the connection closes the socket.
                () = kill.cancelled() => {}
            }
            kill.cancel();
            lock(&shared).connection_closed(&id);
        });
    }
}

#[derive(Clone)]
struct Naming {
    shared: Arc<Shared>,
    /// Where each connection's stream reader and pusher run.
    tasks: Tasks,
}

fn meta_of<T>(request: &tonic::Request<T>) -> Result<ConnMeta, Status> {
    request
        .extensions()
        .get::<ConnMeta>()
        .cloned()
        .ok_or_else(|| Status::internal("request without a connection"))
}

#[tonic::async_trait]
impl RequestService for Naming {
    async fn request(
        &self,
        request: tonic::Request<Payload>,
    ) -> Result<tonic::Response<Payload>, Status> {
        let meta = meta_of(&request)?;
        let payload = request.into_inner();
        let silence = {
            let mut registry = lock(&self.shared);
            registry.stats.calls += 1;
            registry.knobs.silence
        };
        let is_check =
            wire::payload_type(&payload).is_ok_and(|t| t == wire::ServerCheckRequest::TYPE);
        let hang = match silence {
            Silence::Off => false,
            Silence::AfterServerCheck => !is_check,
            Silence::All => true,
        };
        if hang {
            meta.kill.cancelled().await;
            return Err(Status::unavailable("connection closed"));
        }
        let kind = match wire::payload_type(&payload) {
            Ok(wire::InstanceRequest::TYPE | wire::BatchInstanceRequest::TYPE) => {
                Some(Serving::Publish)
            }
            Ok(wire::SubscribeServiceRequest::TYPE | wire::ServiceQueryRequest::TYPE) => {
                Some(Serving::Read)
            }
            _ => None,
        };
        let _serving = match kind {
            Some(kind) => {
                let serving = Served::begin(&self.shared, kind);
                let delay = kind.delay(&lock(&self.shared).knobs);
                if !delay.is_zero() {
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = meta.kill.cancelled() => {
                            return Err(Status::unavailable("connection closed"));
                        }
                    }
                }
                Some(serving)
            }
            None => None,
        };
        Ok(tonic::Response::new(self.handle(&meta, &payload)))
    }
}

/// The calls the stats count while they are served (and the delay knobs hold).
#[derive(Debug, Clone, Copy)]
enum Serving {
    /// Instance register or batch.
    Publish,
    /// Subscribe or query.
    Read,
}

impl Serving {
    /// How long such a call waits before it is served.
    fn delay(self, knobs: &Knobs) -> Duration {
        match self {
            Serving::Publish => knobs.call_delay,
            Serving::Read => knobs.read_delay,
        }
    }

    /// Such calls served now, and the most ever served at once.
    fn counts(self, stats: &mut FakeStats) -> (&mut usize, &mut usize) {
        match self {
            Serving::Publish => (
                &mut stats.publishes_in_progress,
                &mut stats.publishes_in_progress_peak,
            ),
            Serving::Read => (
                &mut stats.reads_in_progress,
                &mut stats.reads_in_progress_peak,
            ),
        }
    }
}

/// One call being served, counted in the stats from its arrival until it
/// is answered or dropped (a client that gave up, a connection cut).
struct Served(Arc<Shared>, Serving);

impl Served {
    fn begin(shared: &Arc<Shared>, kind: Serving) -> Self {
        let mut registry = lock(shared);
        let (now, peak) = kind.counts(&mut registry.stats);
        *now += 1;
        *peak = (*peak).max(*now);
        Self(shared.clone(), kind)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        // Saturating: a stop in between starts the counts afresh.
        let mut registry = lock(&self.0);
        let (now, _) = self.1.counts(&mut registry.stats);
        *now = now.saturating_sub(1);
    }
}

/// The response class a request is answered with.
fn response_class(request_class: &str) -> Option<&'static str> {
    Some(match request_class {
        wire::InstanceRequest::TYPE | wire::PersistentInstanceRequest::TYPE => {
            wire::InstanceResponse::TYPE
        }
        wire::BatchInstanceRequest::TYPE => wire::BatchInstanceResponse::TYPE,
        wire::SubscribeServiceRequest::TYPE => wire::SubscribeServiceResponse::TYPE,
        wire::ServiceListRequest::TYPE => wire::ServiceListResponse::TYPE,
        wire::ServiceQueryRequest::TYPE => wire::QueryServiceResponse::TYPE,
        _ => return None,
    })
}

/// A failure reply of class `class` (the handler's response class, as Nacos'
/// filters answer, or `ErrorResponse`).
fn failure(class: &str, rejection: Rejection) -> Payload {
    let body = wire::ErrorResponse {
        status: ResponseStatus {
            result_code: 500,
            error_code: rejection.code,
            message: Some(rejection.message),
            request_id: None,
        },
    };
    let mut payload = wire::encode(&body, &HashMap::new(), "");
    if let Some(m) = payload.metadata.as_mut() {
        class.clone_into(&mut m.r#type);
    }
    payload
}

fn reply<M: Message + serde::Serialize>(message: &M) -> Payload {
    wire::encode(message, &HashMap::new(), "")
}

impl Naming {
    fn handle(&self, meta: &ConnMeta, payload: &Payload) -> Payload {
        let error = wire::ErrorResponse::TYPE;
        let Ok(class) = wire::payload_type(payload) else {
            return failure(error, Rejection::new(502, "payload without metadata"));
        };
        if class == wire::ServerCheckRequest::TYPE {
            return reply(&wire::ServerCheckResponse {
                status: ResponseStatus::ok(None),
                connection_id: Some(meta.id.to_string()),
                support_ability_negotiation: true,
            });
        }
        let mut registry = lock(&self.shared);
        let known = class == wire::HealthCheckRequest::TYPE || response_class(class).is_some();
        if !known {
            return failure(
                error,
                Rejection::new(302, format!("Unknown payload type {class}")),
            );
        }
        if !registry.is_registered(&meta.id) {
            return failure(error, Rejection::new(301, "Connection is unregistered."));
        }
        if class == wire::HealthCheckRequest::TYPE {
            return reply(&wire::HealthCheckResponse {
                status: ResponseStatus::ok(None),
            });
        }
        let response = response_class(class).unwrap_or(error);
        if let Some((left, code)) = registry.knobs.fail_next {
            registry.knobs.fail_next = (left > 1).then_some((left - 1, code));
            registry.stats.calls_failed_on_purpose += 1;
            return failure(
                response,
                Rejection::new(code, "failed on purpose by the testkit server"),
            );
        }
        if self.shared.auth.is_some() {
            let token = payload
                .metadata
                .as_ref()
                .and_then(|m| m.headers.get(TOKEN_KEY))
                .map(String::as_str);
            if let Err(r) = registry.check_token(token) {
                return failure(response, r);
            }
        }
        if let Err(r) = registry.check_naming(&meta.id) {
            return failure(response, r);
        }
        let handled = match class {
            wire::InstanceRequest::TYPE => {
                decode(payload).and_then(|r| instance(&mut registry, &meta.id, r))
            }
            wire::BatchInstanceRequest::TYPE => {
                decode(payload).and_then(|r| batch(&mut registry, &meta.id, r))
            }
            wire::SubscribeServiceRequest::TYPE => {
                decode(payload).and_then(|r| subscribe(&mut registry, &meta.id, r))
            }
            wire::ServiceListRequest::TYPE => decode(payload).and_then(|r| list(&mut registry, r)),
            wire::ServiceQueryRequest::TYPE => {
                decode(payload).and_then(|r| query(&mut registry, r))
            }
            _ => Err(Rejection::new(
                500,
                format!("the testkit server does not implement {class}"),
            )),
        };
        handled.unwrap_or_else(|r| failure(response, r))
    }
}

fn decode<M: Message + serde::de::DeserializeOwned>(payload: &Payload) -> Result<M, Rejection> {
    wire::decode_body(payload).map_err(|e| Rejection::new(502, e.to_string()))
}

fn key_of(target: &wire::NamingTarget) -> Result<ServiceKey, Rejection> {
    check_target(
        &target.namespace,
        &target.group_name,
        Some(&target.service_name),
    )?;
    Ok(ServiceKey::new(
        target.namespace.as_str(),
        target.group_name.as_str(),
        target.service_name.as_str(),
    ))
}

fn instance(
    registry: &mut Registry,
    id: &str,
    request: wire::InstanceRequest,
) -> Result<Payload, Rejection> {
    let key = key_of(&request.target)?;
    match request.kind.as_str() {
        "registerInstance" => {
            let host = Host::from_request(&key, &request.instance, true)?;
            registry.publish(id, &key, vec![host]);
        }
        "deregisterInstance" => registry.deregister(id, &key),
        other => {
            return Err(Rejection::new(
                400,
                format!("Unsupported request type {other}"),
            ));
        }
    }
    Ok(reply(&wire::InstanceResponse {
        status: ResponseStatus::ok(None),
        kind: Some(request.kind),
    }))
}

fn batch(
    registry: &mut Registry,
    id: &str,
    request: wire::BatchInstanceRequest,
) -> Result<Payload, Rejection> {
    let key = key_of(&request.target)?;
    if request.kind != "batchRegisterInstance" {
        return Err(Rejection::new(
            400,
            format!("Unsupported request type {}", request.kind),
        ));
    }
    let hosts = request
        .instances
        .iter()
        .map(|i| Host::from_request(&key, i, false))
        .collect::<Result<Vec<_>, _>>()?;
    registry.publish(id, &key, hosts);
    Ok(reply(&wire::BatchInstanceResponse {
        status: ResponseStatus::ok(None),
        kind: Some(request.kind),
    }))
}

fn subscribe(
    registry: &mut Registry,
    id: &str,
    request: wire::SubscribeServiceRequest,
) -> Result<Payload, Rejection> {
    let key = key_of(&request.target)?;
    if !request.clusters.is_empty() {
        return Err(Rejection::new(
            500,
            "the testkit server does not implement cluster filters",
        ));
    }
    if request.subscribe {
        registry.subscribe(id, &key);
    } else {
        registry.unsubscribe(id, &key);
    }
    let info = registry.service_info(&key);
    Ok(reply(&wire::SubscribeServiceResponse {
        status: ResponseStatus::ok(None),
        service_info: Some(info),
    }))
}

fn list(registry: &mut Registry, request: wire::ServiceListRequest) -> Result<Payload, Rejection> {
    check_target(&request.namespace, "DEFAULT_GROUP", None)?;
    let names = registry.list(&request.namespace, &request.group_name);
    let size = request.page_size as usize;
    let start = (request.page_no.max(1) as usize - 1).saturating_mul(size);
    let page: Vec<String> = names.iter().skip(start).take(size).cloned().collect();
    Ok(reply(&wire::ServiceListResponse {
        status: ResponseStatus {
            message: Some("success".to_owned()),
            ..ResponseStatus::ok(None)
        },
        count: names.len() as u64,
        service_names: Some(page),
    }))
}

fn query(
    registry: &mut Registry,
    request: wire::ServiceQueryRequest,
) -> Result<Payload, Rejection> {
    let key = key_of(&request.target)?;
    if !request.cluster.is_empty() || request.healthy_only {
        return Err(Rejection::new(
            500,
            "the testkit server does not implement cluster or health filters",
        ));
    }
    let info = registry.service_info(&key);
    Ok(reply(&wire::QueryServiceResponse {
        status: ResponseStatus::ok(None),
        service_info: Some(info),
    }))
}

#[tonic::async_trait]
impl BiRequestStream for Naming {
    type requestBiStreamStream = UnboundedReceiverStream<Result<Payload, Status>>;

    async fn request_bi_stream(
        &self,
        request: tonic::Request<Streaming<Payload>>,
    ) -> Result<tonic::Response<Self::requestBiStreamStream>, Status> {
        let meta = meta_of(&request)?;
        let inbound = request.into_inner();
        let (out, rx) = mpsc::unbounded_channel();
        let stream = read_stream(self.shared.clone(), self.tasks.clone(), meta, inbound, out);
        self.tasks.spawn("fake grpc bi-stream", stream);
        Ok(tonic::Response::new(UnboundedReceiverStream::new(rx)))
    }
}

/// Reads one connection's stream: ConnectionSetup first (which registers the
/// connection and starts its pusher), then the client's replies (push acks).
/// The connection is forgotten when the stream or the transport ends.
async fn read_stream(
    shared: Arc<Shared>,
    tasks: Tasks,
    meta: ConnMeta,
    mut inbound: Streaming<Payload>,
    out: super::state::Outbound,
) {
    let stop = meta.kill.clone();
    let first = tokio::select! {
        () = stop.cancelled() => return,
        m = inbound.message() => m,
    };
    let setup = match first {
        Ok(Some(p))
            if wire::payload_type(&p).is_ok_and(|t| t == wire::ConnectionSetupRequest::TYPE) =>
        {
            wire::decode_body::<wire::ConnectionSetupRequest>(&p).ok()
        }
        _ => None,
    };
    let Some(setup) = setup else {
        debug!(id = %meta.id, "stream opened without a ConnectionSetup");
        return;
    };
    let silent = lock(&shared).knobs.silence != Silence::Off;
    if silent {
        // Accepted, never registered: read until the client gives up.
        while let Some(Ok(Some(_))) =
            tokio::select! { () = stop.cancelled() => None, m = inbound.message() => Some(m) }
        {
        }
        return;
    }
    let ack = reply(&wire::SetupAckRequest {
        request_id: None,
        ability_table: Default::default(),
    });
    let _ = out.send(Ok(ack));
    let wake = lock(&shared).register_connection(
        &meta.id,
        meta.remote,
        setup.labels,
        setup.client_version,
        out,
        stop.clone(),
    );
    let pushes = push_loop(shared.clone(), meta.id.clone(), wake, stop.clone());
    tasks.spawn("fake grpc pushes", pushes);
    loop {
        let next = tokio::select! {
            () = stop.cancelled() => break,
            m = inbound.message() => m,
        };
        match next {
            Ok(Some(p)) => on_reply(&shared, &meta.id, &p),
            Ok(None) | Err(_) => break,
        }
    }
    lock(&shared).connection_closed(&meta.id);
}

fn on_reply(shared: &Shared, id: &str, payload: &Payload) {
    let Ok(class) = wire::payload_type(payload) else {
        return;
    };
    let status = match class {
        wire::NotifySubscriberResponse::TYPE | wire::ErrorResponse::TYPE => {
            wire::decode_body::<wire::ErrorResponse>(payload)
                .map(|r| r.status)
                .ok()
        }
        _ => None,
    };
    if let Some(status) = status
        && let Some(rid) = status.request_id.as_deref()
    {
        let success = class == wire::NotifySubscriberResponse::TYPE && status.is_success();
        lock(shared).ack(id, rid, success);
    }
}

/// Sends one connection the pushes it is owed, when woken (a change, a
/// subscription, a knob) or when an unacknowledged push is due again.
async fn push_loop(shared: Arc<Shared>, id: Arc<str>, wake: Arc<Notify>, stop: CancellationToken) {
    let mut resend_at: Option<Instant> = None;
    loop {
        let timer = async {
            match resend_at {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = wake.notified() => {}
            () = timer => {}
        }
        let delay = lock(&shared).knobs.push_delay;
        if !delay.is_zero() {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
        match lock(&shared).flush_pushes(&id, Instant::now()) {
            Some(next) => resend_at = next,
            None => return,
        }
    }
}
