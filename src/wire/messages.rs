//! The JSON bodies Nacos 2.x exchanges, one struct per Java message class.
//!
//! Field names follow Nacos' Jackson output (camelCase). Decoding tolerates
//! unknown keys and missing optional ones; encoding omits `None`. Each
//! message names its Java class through [`Message::TYPE`], which travels in
//! `Metadata.type` and is the only key the other side decodes by.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// A JSON body that travels in a `Payload` under a Java class name. The
/// structs here both encode and decode; a request the client only sends may
/// be a borrowed view that only encodes ([`crate::wire::convert::BatchRegister`]).
pub trait Message {
    /// The Java simple class name put in `Metadata.type`.
    const TYPE: &'static str;
}

/// A request the client sends with a unary call, and the reply it expects.
pub trait Request: Message + Serialize {
    /// The response class the server answers with (or `ErrorResponse`).
    type Response: Response;
}

/// A response body: every Nacos response carries this common status.
pub trait Response: Message + for<'de> Deserialize<'de> {
    /// The status fields shared by every response.
    fn status(&self) -> &ResponseStatus;
}

/// Status fields common to every response. Success is `result_code == 200`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ResponseStatus {
    /// 200 on success, 500 (or an error code) otherwise.
    pub result_code: i32,
    /// Detailed error code (0 on success; 301, 400, 403, -401, ...).
    pub error_code: i32,
    /// Human-readable reason, on failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Echo of the request id, when there was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

impl ResponseStatus {
    /// A successful status answering `request_id`.
    pub fn ok(request_id: Option<String>) -> Self {
        Self {
            result_code: 200,
            error_code: 0,
            message: None,
            request_id,
        }
    }

    /// Whether the server reported success.
    pub fn is_success(&self) -> bool {
        self.result_code == 200
    }
}

macro_rules! message {
    ($ty:ident) => {
        impl Message for $ty {
            const TYPE: &'static str = stringify!($ty);
        }
    };
}

macro_rules! response {
    ($ty:ident) => {
        message!($ty);
        impl Response for $ty {
            fn status(&self) -> &ResponseStatus {
                &self.status
            }
        }
    };
}

macro_rules! request {
    ($ty:ident => $resp:ident) => {
        message!($ty);
        impl Request for $ty {
            type Response = $resp;
        }
    };
}

// === connection lifecycle ===

/// First unary call on a new transport: asks the server for the connection id.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServerCheckRequest {
    /// Always empty in the body: headers travel in `Metadata.headers`.
    pub headers: HashMap<String, String>,
    /// `internal`.
    pub module: String,
}
request!(ServerCheckRequest => ServerCheckResponse);

/// Reply to [`ServerCheckRequest`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServerCheckResponse {
    /// Common status.
    #[serde(flatten)]
    pub status: ResponseStatus,
    /// Id of the transport this call arrived on (`<millis>_<ip>_<port>`).
    pub connection_id: Option<String>,
    /// The server negotiates abilities and will send `SetupAckRequest` (2.3.0+).
    pub support_ability_negotiation: bool,
}
response!(ServerCheckResponse);

/// First message on the bi-stream: registers the connection with the server.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ConnectionSetupRequest {
    /// Always empty in the body.
    pub headers: HashMap<String, String>,
    /// `internal`.
    pub module: String,
    /// Free text naming the client and its version.
    pub client_version: String,
    /// Informational namespace.
    pub tenant: String,
    /// Must hold `module=naming`, else the connection gets no naming client.
    pub labels: BTreeMap<String, String>,
    /// Present (even empty) to make a 2.3+ server answer with `SetupAckRequest`.
    pub ability_table: BTreeMap<String, bool>,
}
message!(ConnectionSetupRequest);

/// Sent by a 2.3+ server once the connection is registered. Needs no reply.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SetupAckRequest {
    /// Request id, normally absent.
    pub request_id: Option<String>,
    /// The server's abilities.
    pub ability_table: BTreeMap<String, bool>,
}
message!(SetupAckRequest);

/// Liveness probe the client sends when idle.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HealthCheckRequest {
    /// Always empty in the body.
    pub headers: HashMap<String, String>,
    /// `internal`.
    pub module: String,
}
request!(HealthCheckRequest => HealthCheckResponse);

/// Reply to [`HealthCheckRequest`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HealthCheckResponse {
    /// Common status.
    #[serde(flatten)]
    pub status: ResponseStatus,
}
response!(HealthCheckResponse);

/// Server probe of an idle connection, pushed on the stream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ClientDetectionRequest {
    /// Id to echo in the reply.
    pub request_id: Option<String>,
}
message!(ClientDetectionRequest);

/// Reply to [`ClientDetectionRequest`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ClientDetectionResponse {
    /// Common status.
    #[serde(flatten)]
    pub status: ResponseStatus,
}
response!(ClientDetectionResponse);

/// The server asks the client to reconnect, possibly to another server.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ConnectResetRequest {
    /// Id to echo in the reply.
    pub request_id: Option<String>,
    /// Server to move to, if any.
    pub server_ip: Option<String>,
    /// Its HTTP port (as a string), if any.
    pub server_port: Option<String>,
    /// The connection being reset.
    pub connection_id: Option<String>,
}
message!(ConnectResetRequest);

/// Reply to [`ConnectResetRequest`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ConnectResetResponse {
    /// Common status.
    #[serde(flatten)]
    pub status: ResponseStatus,
}
response!(ConnectResetResponse);

/// A failure reply, to a unary call or (from the client) to a server request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ErrorResponse {
    /// Common status.
    #[serde(flatten)]
    pub status: ResponseStatus,
}
response!(ErrorResponse);

// === naming ===

/// An instance as Nacos serialises it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct InstanceDto {
    /// Server-side id; omitted on register so the server derives it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// Address.
    pub ip: Option<String>,
    /// Port (a Java int).
    pub port: i64,
    /// Weight.
    pub weight: Option<f64>,
    /// Health flag.
    pub healthy: Option<bool>,
    /// Enabled flag.
    pub enabled: Option<bool>,
    /// Ephemeral flag.
    pub ephemeral: Option<bool>,
    /// Nacos' per-service cluster name.
    pub cluster_name: Option<String>,
    /// `group@@name` in replies; omitted on register.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
    /// Metadata.
    pub metadata: Option<BTreeMap<String, String>>,
}

/// A service's hosts, as pushed or returned by subscribe and query.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServiceInfoDto {
    /// Bare service name (gRPC).
    pub name: Option<String>,
    /// Group name.
    pub group_name: Option<String>,
    /// Cluster filter of the subscription.
    pub clusters: Option<String>,
    /// Client cache hint, in milliseconds.
    pub cache_millis: Option<i64>,
    /// The hosts; may be absent or null.
    pub hosts: Option<Vec<InstanceDto>>,
    /// Server time of this view, in milliseconds.
    pub last_ref_time: Option<i64>,
    /// Always empty in 2.x.
    pub checksum: Option<String>,
    /// `allIPs` in 2.x.
    #[serde(rename = "allIPs", alias = "allIps")]
    pub all_ips: Option<bool>,
    /// The protect threshold was reached.
    pub reach_protection_threshold: Option<bool>,
    /// Validity flag.
    pub valid: Option<bool>,
}

/// Fields shared by every naming request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NamingTarget {
    /// Always empty in the body: headers travel in `Metadata.headers`.
    pub headers: HashMap<String, String>,
    /// `naming`.
    pub module: String,
    /// Namespace id; never defaulted by the server.
    pub namespace: String,
    /// Bare service name.
    pub service_name: String,
    /// Group; never defaulted by the server.
    pub group_name: String,
}

/// Register or deregister one ephemeral instance.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct InstanceRequest {
    /// Target service.
    #[serde(flatten)]
    pub target: NamingTarget,
    /// `registerInstance` or `deregisterInstance`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The instance.
    pub instance: InstanceDto,
}
request!(InstanceRequest => InstanceResponse);

/// Register or deregister one persistent instance (server 2.3.0+).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PersistentInstanceRequest {
    /// Target service.
    #[serde(flatten)]
    pub target: NamingTarget,
    /// `registerInstance` or `deregisterInstance`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The instance (with `ephemeral: false`).
    pub instance: InstanceDto,
}
request!(PersistentInstanceRequest => InstanceResponse);

/// Reply to instance requests.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, from = "InstanceReply")]
pub struct InstanceResponse {
    /// Common status.
    #[serde(flatten)]
    pub status: ResponseStatus,
    /// Echo of the request type.
    #[serde(rename = "type")]
    pub kind: Option<String>,
}
response!(InstanceResponse);

/// How [`InstanceResponse`] and [`BatchInstanceResponse`] are read: the
/// status fields beside the type, in one struct. Their `flatten`ed status
/// would have serde buffer the whole body first, and one of these answers
/// every publish.
#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct InstanceReply {
    result_code: i32,
    error_code: i32,
    message: Option<String>,
    request_id: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

impl InstanceReply {
    fn split(self) -> (ResponseStatus, Option<String>) {
        let status = ResponseStatus {
            result_code: self.result_code,
            error_code: self.error_code,
            message: self.message,
            request_id: self.request_id,
        };
        (status, self.kind)
    }
}

impl From<InstanceReply> for InstanceResponse {
    fn from(reply: InstanceReply) -> Self {
        let (status, kind) = reply.split();
        Self { status, kind }
    }
}

impl From<InstanceReply> for BatchInstanceResponse {
    fn from(reply: InstanceReply) -> Self {
        let (status, kind) = reply.split();
        Self { status, kind }
    }
}

/// Replace this connection's whole set of instances of one service (2.1.1+).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct BatchInstanceRequest {
    /// Target service.
    #[serde(flatten)]
    pub target: NamingTarget,
    /// `batchRegisterInstance`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The new set (may be empty).
    pub instances: Vec<InstanceDto>,
}
request!(BatchInstanceRequest => BatchInstanceResponse);

/// Reply to [`BatchInstanceRequest`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, from = "InstanceReply")]
pub struct BatchInstanceResponse {
    /// Common status.
    #[serde(flatten)]
    pub status: ResponseStatus,
    /// Echo of the request type.
    #[serde(rename = "type")]
    pub kind: Option<String>,
}
response!(BatchInstanceResponse);

/// Subscribe to (or unsubscribe from) a service's pushes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SubscribeServiceRequest {
    /// Target service.
    #[serde(flatten)]
    pub target: NamingTarget,
    /// `true` to subscribe, `false` to unsubscribe.
    pub subscribe: bool,
    /// Comma-separated cluster filter; empty for all.
    pub clusters: String,
}
request!(SubscribeServiceRequest => SubscribeServiceResponse);

/// Reply to [`SubscribeServiceRequest`]: the service's current hosts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SubscribeServiceResponse {
    /// Common status.
    #[serde(flatten)]
    pub status: ResponseStatus,
    /// Current view of the service.
    pub service_info: Option<ServiceInfoDto>,
}
response!(SubscribeServiceResponse);

/// One page of the service names of a namespace and group.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServiceListRequest {
    /// Always empty in the body.
    pub headers: HashMap<String, String>,
    /// `naming`.
    pub module: String,
    /// Namespace id.
    pub namespace: String,
    /// Exact group to list.
    pub group_name: String,
    /// Unused by the list, but part of the message.
    pub service_name: String,
    /// Page number, from 1.
    pub page_no: u32,
    /// Page size.
    pub page_size: u32,
    /// Ignored by the server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<serde_json::Value>,
}
request!(ServiceListRequest => ServiceListResponse);

/// Reply to [`ServiceListRequest`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServiceListResponse {
    /// Common status.
    #[serde(flatten)]
    pub status: ResponseStatus,
    /// Total number of services in the namespace and group.
    pub count: u64,
    /// Bare names on this page.
    pub service_names: Option<Vec<String>>,
}
response!(ServiceListResponse);

/// Read a service's hosts once, without subscribing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServiceQueryRequest {
    /// Target service.
    #[serde(flatten)]
    pub target: NamingTarget,
    /// Cluster filter; empty for all.
    pub cluster: String,
    /// Only healthy hosts.
    pub healthy_only: bool,
    /// Legacy UDP push port; 0.
    pub udp_port: i32,
}
request!(ServiceQueryRequest => QueryServiceResponse);

/// Reply to [`ServiceQueryRequest`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct QueryServiceResponse {
    /// Common status.
    #[serde(flatten)]
    pub status: ResponseStatus,
    /// Current view of the service.
    pub service_info: Option<ServiceInfoDto>,
}
response!(QueryServiceResponse);

/// A push of a subscribed service's full host list.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NotifySubscriberRequest {
    /// Id to echo in the reply.
    pub request_id: Option<String>,
    /// Module, `naming`.
    pub module: Option<String>,
    /// The service's new view (carries no namespace).
    pub service_info: Option<ServiceInfoDto>,
}
message!(NotifySubscriberRequest);

/// Reply to [`NotifySubscriberRequest`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NotifySubscriberResponse {
    /// Common status.
    #[serde(flatten)]
    pub status: ResponseStatus,
}
response!(NotifySubscriberResponse);

// === fuzzy watch (Nacos 3.x) ===

/// Watch (or stop watching) the set of services whose keys match a pattern
/// `namespace>>group>>service` (`*` matches anything). The server answers,
/// then pushes the matching services' keys in [`NamingFuzzyWatchSyncRequest`]
/// batches, and each later creation or removal of a matching service in a
/// [`NamingFuzzyWatchChangeNotifyRequest`]. Servers that support it say
/// `fuzzyWatch` in their SetupAck abilities.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NamingFuzzyWatchRequest {
    /// Always empty in the body: headers travel in `Metadata.headers`.
    pub headers: HashMap<String, String>,
    /// `naming`.
    pub module: String,
    /// The namespace the pattern names.
    pub namespace: String,
    /// `namespace>>group>>service`.
    pub group_key_pattern: String,
    /// Service keys the client already holds: the server sends only the difference.
    pub received_group_keys: Vec<String>,
    /// `WATCH` or `CANCEL_WATCH`.
    pub watch_type: String,
    /// `true` on a fresh watch: the server's sync is then an init sync, ended by
    /// `FINISH_FUZZY_WATCH_INIT_NOTIFY`.
    pub initializing: bool,
}
request!(NamingFuzzyWatchRequest => NamingFuzzyWatchResponse);

/// Reply to [`NamingFuzzyWatchRequest`]: error 50310 when the server holds too many
/// patterns, 50311 when the pattern matches more services than the server will track.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NamingFuzzyWatchResponse {
    /// Common status.
    #[serde(flatten)]
    pub status: ResponseStatus,
}
response!(NamingFuzzyWatchResponse);

/// One service in a fuzzy-watch sync.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct FuzzyWatchContext {
    /// `namespace@@group@@service`.
    pub service_key: String,
    /// `ADD_SERVICE` or `DELETE_SERVICE`.
    pub changed_type: String,
}

/// Server push: a batch of the services a pattern matches (or, with
/// `syncType = FINISH_FUZZY_WATCH_INIT_NOTIFY` and no contexts, the end of the
/// init sync).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NamingFuzzyWatchSyncRequest {
    /// Id to echo in the reply.
    pub request_id: Option<String>,
    /// `FUZZY_WATCH_INIT_NOTIFY`, `FINISH_FUZZY_WATCH_INIT_NOTIFY` or `FUZZY_WATCH_DIFF_SYNC_NOTIFY`.
    pub sync_type: String,
    /// The pattern this sync is for.
    pub group_key_pattern: String,
    /// The services of this batch (absent in the finishing push).
    pub contexts: Option<Vec<FuzzyWatchContext>>,
    /// Batches in this sync.
    pub total_batch: u32,
    /// This batch, from 1.
    pub current_batch: u32,
}
message!(NamingFuzzyWatchSyncRequest);

/// Our reply to [`NamingFuzzyWatchSyncRequest`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NamingFuzzyWatchSyncResponse {
    /// Common status.
    #[serde(flatten)]
    pub status: ResponseStatus,
}
response!(NamingFuzzyWatchSyncResponse);

/// Server push: one matching service was created (its first instance) or removed (its last).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NamingFuzzyWatchChangeNotifyRequest {
    /// Id to echo in the reply.
    pub request_id: Option<String>,
    /// `namespace@@group@@service`.
    pub service_key: String,
    /// `ADD_SERVICE` or `DELETE_SERVICE`.
    pub changed_type: String,
}
message!(NamingFuzzyWatchChangeNotifyRequest);

/// Our reply to [`NamingFuzzyWatchChangeNotifyRequest`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NamingFuzzyWatchChangeNotifyResponse {
    /// Common status.
    #[serde(flatten)]
    pub status: ResponseStatus,
}
response!(NamingFuzzyWatchChangeNotifyResponse);
