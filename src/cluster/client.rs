//! The client: supervisor loop, redo table, naming calls, subscriptions.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::Stream;
use rand::Rng;
use tokio::sync::{RwLock, mpsc, watch};
use tokio_stream::wrappers::WatchStream;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{Instrument, debug, info, warn};

use super::auth::{Auth, AuthError, Credentials, HttpApi, TOKEN_KEY};
use crate::model::{ClusterId, Instance, InstanceSet, ServiceKey, ServiceSnapshot};
use crate::runtime::{Backoff, BackoffError, Tasks, lock};
use crate::transport::{
    AUTH_FAILED, CloseReason, FuzzyPush, Session, SessionConfig, TransportError,
};
use crate::wire::{self, convert};

/// How to reach one Nacos cluster, and how patiently.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Name of the cluster in logs and metrics.
    pub cluster: ClusterId,
    /// The cluster's servers as `host:http_port`, as for any Nacos client.
    pub servers: Vec<String>,
    /// gRPC port = HTTP port + this offset (Nacos: 1000).
    pub grpc_port_offset: u16,
    /// The one namespace this client serves.
    pub namespace: String,
    /// Log in with these, when the cluster has auth enabled.
    pub credentials: Option<Credentials>,
    /// Use HTTPS for the login call.
    pub login_https: bool,
    /// Nacos' HTTP context path (`/nacos`).
    pub context_path: String,
    /// Handshake, deadlines, TLS.
    pub session: SessionConfig,
    /// First reconnect delay.
    pub reconnect_min: Duration,
    /// Largest reconnect delay.
    pub reconnect_max: Duration,
    /// A session that lived this long resets the reconnect backoff.
    pub healthy_after: Duration,
    /// Services per page when listing.
    pub list_page_size: u32,
    /// Discover services through a fuzzy watch where the server offers one
    /// (3.x). On by default; off only to compare it with polling (the
    /// benchmark of discovery latency does), never needed to make it work.
    pub fuzzy_watch: bool,
}

impl ClientConfig {
    /// Defaults for one cluster, its servers and namespace.
    pub fn new(
        cluster: impl Into<String>,
        servers: Vec<String>,
        namespace: impl Into<String>,
    ) -> Self {
        Self {
            cluster: ClusterId(cluster.into()),
            servers,
            grpc_port_offset: 1000,
            namespace: namespace.into(),
            credentials: None,
            login_https: false,
            context_path: "/nacos".to_owned(),
            session: SessionConfig::default(),
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(10),
            healthy_after: Duration::from_secs(30),
            list_page_size: 500,
            fuzzy_watch: true,
        }
    }
}

/// Where the client's connection stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionState {
    /// Dialling `server`; `attempt` counts since the last healthy session.
    Connecting {
        /// Server being dialled (`host:http_port`).
        server: String,
        /// Attempts since the last healthy session.
        attempt: u32,
    },
    /// Registered, and everything owned has been re-applied.
    Connected {
        /// Server connected to.
        server: String,
        /// Id the server gave the connection.
        connection_id: String,
    },
    /// Not connected; the next attempt follows after a delay.
    Disconnected {
        /// Server last tried or lost.
        server: String,
        /// What went wrong.
        error: String,
    },
    /// Shut down for good.
    Stopped,
}

/// A naming call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No session came up within the call's deadline.
    #[error("cluster {cluster} is not connected (last error: {last_error})")]
    NotConnected {
        /// The cluster.
        cluster: ClusterId,
        /// The reason the last attempt failed.
        last_error: String,
    },
    /// The call failed on the session.
    #[error("{op} on cluster {cluster}")]
    Call {
        /// The cluster.
        cluster: ClusterId,
        /// What we were doing.
        op: &'static str,
        /// Why it failed.
        #[source]
        source: TransportError,
    },
    /// A call to the cluster's HTTP API failed.
    #[error("{op} on cluster {cluster} ({url}): {reason}")]
    Http {
        /// The cluster.
        cluster: ClusterId,
        /// What we were doing.
        op: &'static str,
        /// The URL called (without the token).
        url: String,
        /// HTTP status and body, or the transport error.
        reason: String,
    },
    /// Login failed.
    #[error("authenticating with cluster {cluster}")]
    Auth {
        /// The cluster.
        cluster: ClusterId,
        /// Why.
        #[source]
        source: AuthError,
    },
    /// A server reply could not be turned into model values.
    #[error("reading a reply from cluster {cluster}")]
    Wire {
        /// The cluster.
        cluster: ClusterId,
        /// Why.
        #[source]
        source: wire::WireError,
    },
    /// The configuration cannot work.
    #[error("invalid client configuration for cluster {cluster}: {reason}")]
    Config {
        /// The cluster.
        cluster: ClusterId,
        /// What is wrong.
        reason: String,
    },
    /// The client was shut down.
    #[error("client for cluster {0} is stopped")]
    Stopped(ClusterId),
}

impl ClientError {
    /// Stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NotConnected { .. } => "not_connected",
            Self::Call { source, .. } => source.kind(),
            Self::Auth { source, .. } => source.kind(),
            Self::Wire { .. } => "wire",
            Self::Http { .. } => "http",
            Self::Config { .. } => "config",
            Self::Stopped(_) => "stopped",
        }
    }

    /// Whether the same call may succeed later without a change of input.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::NotConnected { .. } | Self::Http { .. } => true,
            Self::Call { source, .. } => source.is_retryable(),
            Self::Auth { source, .. } => !matches!(source, AuthError::Rejected { .. }),
            Self::Wire { .. } | Self::Config { .. } | Self::Stopped(_) => false,
        }
    }
}

/// How a cluster lists a namespace's services in every group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatalogApi {
    /// Nacos 2.x: `GET /v1/ns/catalog/services` (`count`, `serviceList[].{name,groupName}`).
    V1Catalog,
    /// Nacos 3.x: `GET /v3/admin/ns/service/list` (`data.totalCount`,
    /// `data.pageItems[].{name,groupName}`), which needs a user's token.
    V3Admin,
    /// Nacos 3.x over gRPC: a fuzzy watch of `namespace>>*>>*`. The server
    /// sends every service key at the start and each one created or removed
    /// since, so a new service is seen at once; it needs no user when client
    /// auth is off. The server tracks up to 500 services per pattern by
    /// default (`nacos.naming.fuzzy.watch.max.pattern.match.service.count`):
    /// past that it refuses the watch (50311) and the HTTP listing is used.
    FuzzyWatch,
}

impl CatalogApi {
    /// Words for logs, `check` and `/status`.
    pub fn describe(self) -> &'static str {
        match self {
            Self::V1Catalog => "v1 catalog (Nacos 2.x)",
            Self::V3Admin => "v3 admin service list (Nacos 3.x)",
            Self::FuzzyWatch => "fuzzy watch (Nacos 3.x gRPC)",
        }
    }
}

/// The two HTTP listings, one per server line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HttpCatalog {
    V1,
    V3,
}

impl From<HttpCatalog> for CatalogApi {
    fn from(http: HttpCatalog) -> Self {
        match http {
            HttpCatalog::V1 => Self::V1Catalog,
            HttpCatalog::V3 => Self::V3Admin,
        }
    }
}

impl HttpCatalog {
    /// The path under the context path.
    fn path(self) -> &'static str {
        match self {
            Self::V1 => "/v1/ns/catalog/services",
            Self::V3 => "/v3/admin/ns/service/list",
        }
    }

    fn other(self) -> Self {
        match self {
            Self::V1 => Self::V3,
            Self::V3 => Self::V1,
        }
    }

    /// One page: its entries as `(group, name)` and the total count.
    fn parse_page(self, body: &str) -> Result<(Vec<(String, String)>, u64), serde_json::Error> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Entry {
            name: String,
            group_name: String,
        }
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct V1Page {
            count: u64,
            #[serde(default)]
            service_list: Vec<Entry>,
        }
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct V3Data {
            total_count: u64,
            #[serde(default)]
            page_items: Vec<Entry>,
        }
        #[derive(serde::Deserialize)]
        struct V3Page {
            data: V3Data,
        }
        let pairs = |entries: Vec<Entry>| {
            entries
                .into_iter()
                .map(|e| (e.group_name, e.name))
                .collect()
        };
        Ok(match self {
            Self::V1 => {
                let page: V1Page = serde_json::from_str(body)?;
                (pairs(page.service_list), page.count)
            }
            Self::V3 => {
                let page: V3Page = serde_json::from_str(body)?;
                (pairs(page.data.page_items), page.data.total_count)
            }
        })
    }
}

/// A listing through one API: failed, or not served by this server at all.
enum CatalogError {
    Unsupported(u16),
    Failed(ClientError),
}

impl CatalogError {
    fn into_client(self, cluster: &ClusterId) -> ClientError {
        match self {
            Self::Failed(e) => e,
            Self::Unsupported(status) => ClientError::Http {
                cluster: cluster.clone(),
                op: "listing the service catalog",
                url: String::new(),
                reason: format!(
                    "HTTP {status}: the server serves neither the v1 catalog (Nacos 2.x) nor the v3 admin \
                     service list (Nacos 3.x)"
                ),
            },
        }
    }
}

/// A live session and the HTTP address of the server it talks to.
#[derive(Clone)]
struct Live {
    session: Arc<Session>,
    server: String,
}

/// Everything the client owns on the cluster, replayed after a reconnect.
#[derive(Default)]
struct Owned {
    /// The full set this client publishes per service (one slot per
    /// connection and service on the server).
    published: HashMap<ServiceKey, InstanceSet>,
    /// Subscribed services, each with the latest snapshot and its readers.
    subscriptions: HashMap<ServiceKey, Watched>,
}

struct Watched {
    tx: watch::Sender<Option<ServiceSnapshot>>,
    readers: usize,
}

struct Shared {
    config: ClientConfig,
    http: HttpApi,
    auth: Option<Auth>,
    live: watch::Sender<Option<Live>>,
    state: watch::Sender<ConnectionState>,
    owned: Mutex<Owned>,
    /// Calls hold it shared; the redo after a reconnect holds it exclusively,
    /// so a call lands either before the redo (which then replays it) or
    /// after the new session is announced (and goes straight to it).
    apply: RwLock<()>,
    unsubscribe: mpsc::UnboundedSender<ServiceKey>,
    /// This client's tasks (its supervisor and its sessions'); their token
    /// stops the client.
    tasks: Tasks,
    token: CancellationToken,
    /// Why the last session or attempt ended: kept apart from `state`,
    /// which moves on to `Connecting` while a caller still wants the reason.
    last_error: Mutex<Option<String>>,
    /// The namespace's services as the current session's fuzzy watch shows them (3.x).
    fuzzy: Mutex<Fuzzy>,
    /// Bumped whenever the fuzzy-watched set changes: a watcher lists at once
    /// instead of at its next poll.
    catalog_changes: watch::Sender<u64>,
    /// What the client has learnt of the server it talks to.
    server_info: watch::Sender<ServerInfo>,
}

/// What a client knows of the server it is connected to, for operators
/// (`check --connect`, `/status`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerInfo {
    /// The exact version when the server told it (its state document:
    /// `/v1/console/server/state` on 2.x, `/v3/admin/core/state` on 3.x).
    pub version: Option<String>,
    /// The line, from what the connection showed: `3.x` when the server
    /// announces fuzzy watch, `2.x` otherwise.
    pub line: Option<String>,
    /// How services are listed, once a listing succeeded.
    pub listing: Option<CatalogApi>,
}

impl std::fmt::Display for ServerInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.version, &self.line) {
            (Some(v), _) => write!(f, "Nacos {v}")?,
            (None, Some(line)) => write!(f, "Nacos {line} (exact version not reported)")?,
            (None, None) => write!(f, "Nacos (version unknown)")?,
        }
        if let Some(listing) = self.listing {
            write!(f, ", listing by {}", listing.describe())?;
        }
        Ok(())
    }
}

/// The fuzzy watch of the current session.
struct Fuzzy {
    /// The server accepted the watch on this session.
    accepted: bool,
    /// Its init sync has finished: `services` is the whole namespace.
    complete: bool,
    services: std::collections::BTreeSet<(String, String)>,
    /// When the server last confirmed the watch.
    verified: Instant,
}

impl Default for Fuzzy {
    fn default() -> Self {
        Self {
            accepted: false,
            complete: false,
            services: Default::default(),
            verified: Instant::now(),
        }
    }
}

/// The least time a listing waits for the fuzzy watch's init sync.
const FUZZY_INIT_WAIT: Duration = Duration::from_secs(10);

/// How often a listing through the fuzzy watch asks the server to confirm it.
const FUZZY_REVERIFY_EVERY: Duration = Duration::from_secs(30);

impl Shared {
    fn disconnected(&self, server: String, error: String) {
        *lock(&self.last_error) = Some(error.clone());
        self.state
            .send_replace(ConnectionState::Disconnected { server, error });
    }
}

/// A handle on one Nacos cluster (one namespace of it). Cheap to clone; the
/// connection closes, and every ephemeral instance it published disappears,
/// when the caller's token is cancelled or the last handle is dropped.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
    _guard: Arc<DropGuard>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("cluster", &self.shared.config.cluster)
            .finish_non_exhaustive()
    }
}

// === impl Client ===

impl Client {
    /// Checks the configuration and starts keeping the cluster connected, in
    /// tasks on `tasks` that stop when it is cancelled (or when the last
    /// handle is dropped). Must be called within a Tokio runtime. Returns at
    /// once: use [`Client::wait_connected`] or [`Client::state`] to follow
    /// the connection.
    pub fn start(config: ClientConfig, tasks: &Tasks) -> Result<Client, ClientError> {
        let invalid = |reason: &str| ClientError::Config {
            cluster: config.cluster.clone(),
            reason: reason.to_owned(),
        };
        if config.servers.is_empty() {
            return Err(invalid("no servers given"));
        }
        for server in &config.servers {
            let port = server
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok());
            match port {
                Some(p) if p.checked_add(config.grpc_port_offset).is_some() => {}
                _ => {
                    return Err(invalid(&format!(
                        "server {server:?} is not host:port with room for the gRPC offset"
                    )));
                }
            }
        }
        if config.namespace.is_empty() {
            return Err(invalid(
                "namespace is empty (the default namespace is \"public\")",
            ));
        }
        let backoff = Backoff::try_new(config.reconnect_min, config.reconnect_max, 0.5)
            .map_err(|e: BackoffError| invalid(&e.to_string()))?;
        let http = HttpApi::new(
            config.login_https,
            &config.context_path,
            config.session.request_timeout,
        )
        .map_err(|e| invalid(&format!("building the HTTP client: {e}")))?;
        let auth = config
            .credentials
            .as_ref()
            .map(|c| Auth::new(c.clone(), http.clone()));
        let tasks = tasks.child();
        let token = tasks.token().clone();
        let (unsubscribe, unsubscribed) = mpsc::unbounded_channel();
        let first = config.servers[0].clone();
        let shared = Arc::new(Shared {
            http,
            auth,
            live: watch::channel(None).0,
            state: watch::channel(ConnectionState::Connecting {
                server: first,
                attempt: 0,
            })
            .0,
            owned: Mutex::new(Owned::default()),
            apply: RwLock::new(()),
            unsubscribe,
            tasks: tasks.clone(),
            token: token.clone(),
            last_error: Mutex::new(None),
            fuzzy: Mutex::new(Fuzzy::default()),
            catalog_changes: watch::channel(0).0,
            server_info: watch::channel(ServerInfo::default()).0,
            config,
        });
        let span = tracing::info_span!("cluster", id = %shared.config.cluster, namespace = %shared.config.namespace);
        let name = format!(
            "client {}/{}",
            shared.config.cluster, shared.config.namespace
        );
        tasks.spawn(
            name,
            supervise(shared.clone(), backoff, unsubscribed).instrument(span),
        );
        Ok(Client {
            shared,
            _guard: Arc::new(token.drop_guard()),
        })
    }

    /// The cluster this client serves.
    pub fn cluster(&self) -> &ClusterId {
        &self.shared.config.cluster
    }

    /// The namespace this client serves.
    pub fn namespace(&self) -> &str {
        &self.shared.config.namespace
    }

    /// The connection state, as a watch: the current value and every change.
    pub fn state(&self) -> watch::Receiver<ConnectionState> {
        self.shared.state.subscribe()
    }

    /// The connection state as a stream: the current value, then each change
    /// (intermediate values may be skipped by a slow reader).
    pub fn state_stream(&self) -> WatchStream<ConnectionState> {
        WatchStream::new(self.shared.state.subscribe())
    }

    /// Waits until connected (and redone), or the deadline passes.
    pub async fn wait_connected(&self, deadline: Duration) -> Result<(), ClientError> {
        self.live_session(deadline).await.map(|_| ())
    }

    /// Every service name in `group` (all pages).
    pub async fn list_services(&self, group: &str) -> Result<Vec<String>, ClientError> {
        let mut names = Vec::new();
        let page_size = self.shared.config.list_page_size.max(1);
        for page in 1u32.. {
            let request =
                convert::list_request(&self.shared.config.namespace, group, page, page_size);
            let reply = self.call("list services", &request).await?;
            let got = reply.service_names.unwrap_or_default();
            let short = got.len() < page_size as usize;
            names.extend(got);
            if short || names.len() as u64 >= reply.count {
                break;
            }
        }
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// Every service of the namespace, in every group, as `(group, name)`,
    /// sorted. The gRPC list needs an exact group, so this reads the
    /// server's HTTP listing (all pages) from the server the client is
    /// connected to: 2.x's catalog (`/v1/ns/catalog/services`) or 3.x's admin
    /// API (`/v3/admin/ns/service/list`; 3.x answers the v1 catalog 410 unless
    /// a deprecated compatibility switch is on, and 3.2 removes it). Which one
    /// a cluster serves is learnt from its answers (404 to the v3 path on 2.x,
    /// 410 to the v1 path on 3.x) and remembered; see [`Client::catalog_api`].
    /// Services with no instances are included.
    pub async fn catalog(&self) -> Result<Vec<(String, String)>, ClientError> {
        let live = self
            .live_session(self.shared.config.session.request_timeout)
            .await?;
        if let Some(services) = self.fuzzy_catalog(&live).await {
            self.remember_catalog_api(CatalogApi::FuzzyWatch);
            return Ok(services);
        }
        let first = match self.catalog_api() {
            Some(CatalogApi::V1Catalog) => HttpCatalog::V1,
            _ => HttpCatalog::V3,
        };
        match self.catalog_with(&live, first).await {
            Err(CatalogError::Unsupported(_)) => {
                let other = first.other();
                let out = self
                    .catalog_with(&live, other)
                    .await
                    .map_err(|e| e.into_client(&self.shared.config.cluster))?;
                self.remember_catalog_api(other.into());
                Ok(out)
            }
            Err(e) => Err(e.into_client(&self.shared.config.cluster)),
            Ok(out) => {
                self.remember_catalog_api(first.into());
                Ok(out)
            }
        }
    }

    /// A change counter of the namespace's service set, bumped by the fuzzy
    /// watch (3.x) when a service appears or goes: list again when it moves.
    /// On 2.x it never moves; poll.
    pub fn catalog_changes(&self) -> watch::Receiver<u64> {
        self.shared.catalog_changes.subscribe()
    }

    /// The fuzzy-watched set, once the current session's init sync is done
    /// (waiting up to [`FUZZY_INIT_WAIT`] for it); `None` when the server does
    /// not fuzzy-watch for us (2.x, refused, over its limits).
    async fn fuzzy_catalog(&self, live: &Live) -> Option<Vec<(String, String)>> {
        self.reverify_fuzzy_watch(live).await;
        let mut changes = self.shared.catalog_changes.subscribe();
        // The server sends the init sync through its push queue (delayed like
        // any push): give it more than one request's time.
        let deadline = tokio::time::Instant::now()
            + self
                .shared
                .config
                .session
                .request_timeout
                .max(FUZZY_INIT_WAIT);
        loop {
            {
                let fuzzy = lock(&self.shared.fuzzy);
                if !fuzzy.accepted {
                    return None;
                }
                if fuzzy.complete {
                    return Some(fuzzy.services.iter().cloned().collect());
                }
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    debug!("fuzzy watch init sync not finished in time; listing over HTTP");
                    return None;
                }
            }
        }
    }

    /// Past its match limit a server drops new matches silently, and a push
    /// may be lost with a connection hiccup: at most every
    /// [`FUZZY_REVERIFY_EVERY`], the watch is asked for again with the keys
    /// held, so the server sends what differs, or says the watch is over its
    /// limit (then the client lists over HTTP from now on).
    async fn reverify_fuzzy_watch(&self, live: &Live) {
        let request = {
            let mut fuzzy = lock(&self.shared.fuzzy);
            if !fuzzy.accepted || !fuzzy.complete || fuzzy.verified.elapsed() < FUZZY_REVERIFY_EVERY
            {
                return;
            }
            fuzzy.verified = Instant::now();
            let mut request = convert::fuzzy_watch_all_request(&self.shared.config.namespace);
            request.initializing = false;
            request.received_group_keys = fuzzy
                .services
                .iter()
                .map(|(group, name)| format!("{}@@{group}@@{name}", self.shared.config.namespace))
                .collect();
            request
        };
        if let Err(e) = send(&self.shared, live, "fuzzy watch check", &request).await {
            if matches!(&e, ClientError::Call { source, .. } if source.is_retryable()) {
                debug!(error = %e, "fuzzy watch check failed; kept");
                return;
            }
            warn!(error = %e, "the server no longer fuzzy-watches the whole namespace for us; listing services over HTTP instead");
            *lock(&self.shared.fuzzy) = Fuzzy::default();
        }
    }

    /// The listing this cluster has answered with, once a listing succeeded.
    pub fn catalog_api(&self) -> Option<CatalogApi> {
        self.shared.server_info.borrow().listing
    }

    fn remember_catalog_api(&self, api: CatalogApi) {
        let changed = self.shared.server_info.send_if_modified(|i| {
            let changed = i.listing != Some(api);
            i.listing = Some(api);
            changed
        });
        if changed {
            info!(
                listing = api.describe(),
                "service listing method chosen from the server's answers"
            );
        }
    }

    /// What the client has learnt of its server (version, line, listing
    /// method), as a watch: the current value and every change.
    pub fn server_info(&self) -> watch::Receiver<ServerInfo> {
        self.shared.server_info.subscribe()
    }

    async fn catalog_with(
        &self,
        live: &Live,
        api: HttpCatalog,
    ) -> Result<Vec<(String, String)>, CatalogError> {
        const OP: &str = "listing the service catalog";
        let url = self.shared.http.url(&live.server, api.path());
        let http_err = |reason: String| {
            CatalogError::Failed(ClientError::Http {
                cluster: self.cluster().clone(),
                op: OP,
                url: url.clone(),
                reason,
            })
        };
        let page_size = self.shared.config.list_page_size.max(1);
        let mut out = Vec::new();
        let mut refreshed = false;
        let mut page_no = 1u32;
        loop {
            let mut query = vec![
                ("namespaceId", self.shared.config.namespace.clone()),
                ("pageNo", page_no.to_string()),
                ("pageSize", page_size.to_string()),
            ];
            if let Some(auth) = &self.shared.auth {
                let headers = auth.headers(&live.server).await.map_err(|source| {
                    CatalogError::Failed(ClientError::Auth {
                        cluster: self.cluster().clone(),
                        source,
                    })
                })?;
                if let Some(token) = headers.get(TOKEN_KEY) {
                    query.push((TOKEN_KEY, token.clone()));
                }
            }
            let response = self
                .shared
                .http
                .client()
                .get(&url)
                .query(&query)
                .send()
                .await
                .map_err(|e| http_err(e.to_string()))?;
            let status = response.status().as_u16();
            let body = response.text().await.map_err(|e| http_err(e.to_string()))?;
            // The server called the token expired or invalid (its clock, not
            // ours, decides): log in again and retry the page once, as gRPC calls do.
            if status == 403
                && !refreshed
                && let Some(auth) = &self.shared.auth
            {
                debug!(%body, "catalog refused the token; logging in again");
                auth.invalidate().await;
                refreshed = true;
                continue;
            }
            // The server does not serve this API at all: 2.x has no v3 path
            // (404); 3.x retired the v1 catalog (410, or 404 once removed).
            if page_no == 1 && matches!(status, 404 | 410) {
                return Err(CatalogError::Unsupported(status));
            }
            if status == 403 && api == HttpCatalog::V3 && self.shared.auth.is_none() {
                return Err(http_err(format!(
                    "HTTP 403: Nacos 3.x lists services only through its admin API, which wants a user even \
                     when client auth is off: give cluster {} a username and password (read permission on \
                     namespace {:?} is enough)",
                    self.cluster(),
                    self.shared.config.namespace
                )));
            }
            if status != 200 {
                return Err(http_err(format!(
                    "HTTP {status}: {}",
                    body.chars().take(200).collect::<String>()
                )));
            }
            let (entries, total) = api
                .parse_page(&body)
                .map_err(|e| http_err(format!("unreadable reply: {e}")))?;
            let got = entries.len();
            out.extend(entries);
            if got < page_size as usize || out.len() as u64 >= total {
                break;
            }
            page_no += 1;
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// The service's current hosts, read once.
    pub async fn query(&self, group: &str, name: &str) -> Result<ServiceSnapshot, ClientError> {
        let key = self.key(group, name);
        let reply = self
            .call("query service", &convert::query_request(&key))
            .await?;
        self.snapshot_of(reply.service_info.as_ref(), &key)
    }

    /// Registers one instance. Nacos keeps one slot per connection and
    /// service, so this replaces whatever this client published there.
    pub async fn register(
        &self,
        group: &str,
        name: &str,
        instance: Instance,
    ) -> Result<(), ClientError> {
        let key = self.key(group, name);
        let request = convert::instance_request(&key, convert::InstanceOp::Register, &instance);
        let previous = self
            .owned()
            .published
            .insert(key.clone(), vec![instance].into());
        let result = self.apply("register instance", &request).await;
        self.forget_if_refused(&result, key, previous);
        result
    }

    /// Withdraws what this client registered for the service.
    pub async fn deregister(
        &self,
        group: &str,
        name: &str,
        instance: Instance,
    ) -> Result<(), ClientError> {
        let key = self.key(group, name);
        let request = convert::instance_request(&key, convert::InstanceOp::Deregister, &instance);
        self.owned().published.remove(&key);
        self.apply("deregister instance", &request).await
    }

    /// Publishes the full set of instances this client holds for a service,
    /// in one batch that replaces the previous set exactly. An empty set
    /// withdraws them all.
    ///
    /// The set is recorded before it is sent and re-published after every
    /// reconnect, so an error (say, no connection right now) loses nothing:
    /// the set is applied once the cluster is back. Calls for one service
    /// must not overlap (the last one recorded is the one redone).
    pub async fn publish(
        &self,
        group: &str,
        name: &str,
        instances: Vec<Instance>,
    ) -> Result<(), ClientError> {
        self.publish_set(group, name, instances.into()).await
    }

    /// As [`Client::publish`], keeping the caller's shared set as the redo
    /// record (no copy).
    pub async fn publish_set(
        &self,
        group: &str,
        name: &str,
        instances: InstanceSet,
    ) -> Result<(), ClientError> {
        let key = self.key(group, name);
        let request = convert::batch_request(&key, &instances);
        let previous = {
            let mut owned = self.owned();
            if instances.is_empty() {
                // A new connection owns nothing: an empty set needs no redo.
                owned.published.remove(&key)
            } else {
                owned.published.insert(key.clone(), instances)
            }
        };
        let result = self.apply("publish instances", &request).await;
        self.forget_if_refused(&result, key, previous);
        result
    }

    /// A set the server refused as invalid (400) was not applied and never
    /// will be: the server still holds the previous one, so that is what the
    /// redo must replay. Kept, a refused set would fail every redo and keep
    /// the client from ever reconnecting.
    fn forget_if_refused(
        &self,
        result: &Result<(), ClientError>,
        key: ServiceKey,
        previous: Option<InstanceSet>,
    ) {
        if !result.as_ref().is_err_and(refused_as_invalid) {
            return;
        }
        let mut owned = self.owned();
        match previous {
            Some(set) => owned.published.insert(key, set),
            None => owned.published.remove(&key),
        };
    }

    /// What this client currently publishes, per service.
    pub fn published(&self) -> HashMap<ServiceKey, Vec<Instance>> {
        self.owned()
            .published
            .iter()
            .map(|(k, v)| (k.clone(), v.to_vec()))
            .collect()
    }

    /// The set this client publishes for one service (without copying the rest).
    pub fn published_set(&self, service: &ServiceKey) -> Option<InstanceSet> {
        self.owned().published.get(service).cloned()
    }

    /// The services this client publishes a set for.
    pub fn published_keys(&self) -> Vec<ServiceKey> {
        self.owned().published.keys().cloned().collect()
    }

    /// Subscribes to a service: the stream yields its full snapshot now and
    /// after every change, the latest one only if the reader falls behind.
    /// The subscription survives reconnects; dropping it unsubscribes.
    pub async fn subscribe(&self, group: &str, name: &str) -> Result<Subscription, ClientError> {
        let key = self.key(group, name);
        let rx = {
            let mut owned = self.owned();
            let entry = owned
                .subscriptions
                .entry(key.clone())
                .or_insert_with(|| Watched {
                    tx: watch::channel(None).0,
                    readers: 0,
                });
            entry.readers += 1;
            entry.tx.subscribe()
        };
        let subscription = Subscription {
            key: key.clone(),
            shared: self.shared.clone(),
            stream: WatchStream::new(rx),
        };
        // Failing to reach the server is not fatal: the redo subscribes once
        // connected. A rejection (auth, bad name) is, and drops the entry.
        let _apply = match self.ready_to_apply().await {
            Ok(guard) => guard,
            Err(ClientError::NotConnected { .. }) => return Ok(subscription),
            Err(e) => return Err(e),
        };
        match self
            .call_now("subscribe", &convert::subscribe_request(&key, true))
            .await
        {
            Ok(reply) => {
                if let Some(info) = reply.service_info.as_ref() {
                    let snapshot = self.snapshot_of(Some(info), &key)?;
                    offer(&self.shared, snapshot);
                }
                Ok(subscription)
            }
            Err(e) if e.is_retryable() => Ok(subscription),
            Err(e) => Err(e),
        }
    }

    /// The latest snapshot of a subscribed service, as last pushed (or
    /// answered to the subscribe); `None` if not subscribed or nothing came yet.
    pub fn latest(&self, service: &ServiceKey) -> Option<ServiceSnapshot> {
        self.owned()
            .subscriptions
            .get(service)
            .and_then(|w| w.tx.borrow().clone())
    }

    // --- helpers ---

    fn key(&self, group: &str, name: &str) -> ServiceKey {
        ServiceKey::new(self.shared.config.namespace.clone(), group, name)
    }

    fn owned(&self) -> std::sync::MutexGuard<'_, Owned> {
        lock(&self.shared.owned)
    }

    fn snapshot_of(
        &self,
        info: Option<&wire::ServiceInfoDto>,
        key: &ServiceKey,
    ) -> Result<ServiceSnapshot, ClientError> {
        match info {
            Some(info) => {
                convert::snapshot(&self.shared.config.namespace, info).map_err(|source| {
                    ClientError::Wire {
                        cluster: self.cluster().clone(),
                        source,
                    }
                })
            }
            None => Ok(ServiceSnapshot::empty(key.clone())),
        }
    }

    async fn live_session(&self, deadline: Duration) -> Result<Live, ClientError> {
        let mut live = self.shared.live.subscribe();
        let waited = tokio::time::timeout(
            deadline,
            live.wait_for(|l| l.as_ref().is_some_and(|l| !l.session.is_closed())),
        );
        match waited.await {
            Ok(Ok(l)) => l.clone().ok_or_else(|| self.not_connected()),
            Ok(Err(_)) => Err(ClientError::Stopped(self.cluster().clone())),
            Err(_) if self.shared.token.is_cancelled() => {
                Err(ClientError::Stopped(self.cluster().clone()))
            }
            Err(_) => Err(self.not_connected()),
        }
    }

    fn not_connected(&self) -> ClientError {
        let last_error = match (
            &*self.shared.state.borrow(),
            lock(&self.shared.last_error).clone(),
        ) {
            (ConnectionState::Disconnected { error, .. }, _) => error.clone(),
            // Retrying now: the reason the last attempt failed.
            (_, Some(error)) => error,
            (other, None) => format!("{other:?}"),
        };
        ClientError::NotConnected {
            cluster: self.cluster().clone(),
            last_error,
        }
    }

    /// Waits for a session, then takes the apply lock shared. Mutating
    /// calls record their intent and send while holding it.
    async fn ready_to_apply(&self) -> Result<tokio::sync::RwLockReadGuard<'_, ()>, ClientError> {
        self.live_session(self.shared.config.session.request_timeout)
            .await?;
        Ok(self.shared.apply.read().await)
    }

    /// Sends a change already recorded in the redo table: waits for a session,
    /// then sends while holding the apply lock shared, so the change lands
    /// either before a redo (which then replays it) or on the new session.
    async fn apply<Q: wire::Request>(
        &self,
        op: &'static str,
        request: &Q,
    ) -> Result<(), ClientError> {
        let _apply = self.ready_to_apply().await?;
        self.call_now(op, request).await.map(|_| ())
    }

    /// Sends on the current session (no waiting for one), with auth headers
    /// and one retry after a token refresh.
    async fn call_now<Q: wire::Request>(
        &self,
        op: &'static str,
        request: &Q,
    ) -> Result<Q::Response, ClientError> {
        let live = self
            .shared
            .live
            .borrow()
            .clone()
            .ok_or_else(|| self.not_connected())?;
        send(&self.shared, &live, op, request).await
    }

    /// Waits for a session, then sends.
    async fn call<Q: wire::Request>(
        &self,
        op: &'static str,
        request: &Q,
    ) -> Result<Q::Response, ClientError> {
        let live = self
            .live_session(self.shared.config.session.request_timeout)
            .await?;
        send(&self.shared, &live, op, request).await
    }
}

/// The server refused the request's content (parameter check, 400):
/// sending it again can never succeed.
fn refused_as_invalid(e: &ClientError) -> bool {
    matches!(e, ClientError::Call { source, .. } if source.code() == Some(crate::transport::INVALID_PARAMS))
}

/// Sends `request` on `live` with auth headers; a 403 about the token
/// forgets it and retries once with a fresh login.
async fn send<Q: wire::Request>(
    shared: &Shared,
    live: &Live,
    op: &'static str,
    request: &Q,
) -> Result<Q::Response, ClientError> {
    let cluster = || shared.config.cluster.clone();
    for attempt in 0..2 {
        let headers = match &shared.auth {
            Some(auth) => auth
                .headers(&live.server)
                .await
                .map_err(|source| ClientError::Auth {
                    cluster: cluster(),
                    source,
                })?,
            None => HashMap::new(),
        };
        match live.session.request(request, &headers).await {
            Ok(reply) => return Ok(reply),
            Err(e) if attempt == 0 && e.code() == Some(AUTH_FAILED) && shared.auth.is_some() => {
                debug!(error = %e, "token refused; logging in again");
                if let Some(auth) = &shared.auth {
                    auth.invalidate().await;
                }
            }
            // Plainly, for a server that wants a user (3.3+ by default) and got none.
            Err(TransportError::Rejected {
                call,
                code: AUTH_FAILED,
                message,
            }) if shared.auth.is_none() => {
                let message = format!(
                    "{message} (the server requires a user and this client has none: set username and \
                     password for cluster {})",
                    shared.config.cluster
                );
                return Err(ClientError::Call {
                    cluster: cluster(),
                    op,
                    source: TransportError::Rejected {
                        call,
                        code: AUTH_FAILED,
                        message,
                    },
                });
            }
            Err(source) => {
                return Err(ClientError::Call {
                    cluster: cluster(),
                    op,
                    source,
                });
            }
        }
    }
    Err(ClientError::Call {
        cluster: cluster(),
        op,
        source: TransportError::Rejected {
            call: Q::TYPE,
            code: AUTH_FAILED,
            message: "token refused twice".into(),
        },
    })
}

/// Hands a snapshot to the service's subscribers, unless it is older than
/// the one they have (a subscribe reply can race a push).
fn offer(shared: &Shared, snapshot: ServiceSnapshot) {
    let owned = lock(&shared.owned);
    let Some(watched) = owned.subscriptions.get(&snapshot.service) else {
        debug!(service = %snapshot.service, "push for a service nobody watches");
        return;
    };
    watched.tx.send_if_modified(|current| match current {
        Some(c) if c.last_ref_time_ms > snapshot.last_ref_time_ms => false,
        _ => {
            *current = Some(snapshot);
            true
        }
    });
}

/// Full snapshots of one subscribed service. Yields the latest snapshot
/// whenever it changes; intermediate ones may be skipped (level-triggered).
pub struct Subscription {
    key: ServiceKey,
    shared: Arc<Shared>,
    stream: WatchStream<Option<ServiceSnapshot>>,
}

impl Subscription {
    /// The service this subscription follows.
    pub fn service(&self) -> &ServiceKey {
        &self.key
    }
}

impl Stream for Subscription {
    type Item = ServiceSnapshot;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            match Pin::new(&mut self.stream).poll_next(cx) {
                Poll::Ready(Some(Some(snapshot))) => return Poll::Ready(Some(snapshot)),
                // Nothing received yet for this service.
                Poll::Ready(Some(None)) => continue,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut owned = lock(&self.shared.owned);
        let last = match owned.subscriptions.get_mut(&self.key) {
            Some(w) => {
                w.readers = w.readers.saturating_sub(1);
                w.readers == 0
            }
            None => false,
        };
        if last {
            owned.subscriptions.remove(&self.key);
            // The supervisor tells the server; if it is gone, so is the subscription.
            let _ = self.shared.unsubscribe.send(self.key.clone());
        }
    }
}

// === supervisor ===

fn grpc_addr(server: &str, offset: u16) -> String {
    match server
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
    {
        Some((host, port)) => format!("{host}:{}", port.saturating_add(offset)),
        None => server.to_owned(),
    }
}

/// Keeps one session up for the client's lifetime: connect, redo, serve,
/// and on loss back off and do it again.
async fn supervise(
    shared: Arc<Shared>,
    mut backoff: Backoff,
    mut unsubscribed: mpsc::UnboundedReceiver<ServiceKey>,
) {
    let servers = shared.config.servers.clone();
    let mut next = rand::rng().random_range(0..servers.len());
    let mut preferred: Option<String> = None;
    let mut attempt = 0u32;
    loop {
        if shared.token.is_cancelled() {
            break;
        }
        let server = preferred.take().unwrap_or_else(|| {
            next = (next + 1) % servers.len();
            servers[next].clone()
        });
        attempt += 1;
        shared.state.send_replace(ConnectionState::Connecting {
            server: server.clone(),
            attempt,
        });
        let outcome = tokio::select! {
            o = connect_and_serve(&shared, &server, &mut unsubscribed) => o,
            // Shutdown: dropping the session closes the transport.
            () = shared.token.cancelled() => break,
        };
        shared.live.send_replace(None);
        if shared.token.is_cancelled() {
            // Stopped while the session ended with it: nothing was lost.
            break;
        }
        match outcome {
            Served { lived, reason } => {
                if lived >= shared.config.healthy_after {
                    backoff.reset();
                    attempt = 0;
                }
                if let CloseReason::Reset { target } = &reason {
                    // The server asked us to move: go at once, to its pick if it named one.
                    preferred = target.clone();
                    shared.disconnected(server, format!("{reason:?}"));
                    continue;
                }
                warn!(%server, ?reason, "session lost");
                shared.disconnected(server, format!("{reason:?}"));
            }
            Failed(error) => {
                warn!(%server, %error, "connect failed");
                shared.disconnected(server, error);
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff.next_delay()) => {}
            () = shared.token.cancelled() => break,
        }
    }
    shared.live.send_replace(None);
    shared.state.send_replace(ConnectionState::Stopped);
    info!("client stopped");
}

enum Outcome {
    Served {
        lived: Duration,
        reason: CloseReason,
    },
    Failed(String),
}
use Outcome::{Failed, Served};

async fn connect_and_serve(
    shared: &Arc<Shared>,
    server: &str,
    unsubscribed: &mut mpsc::UnboundedReceiver<ServiceKey>,
) -> Outcome {
    // Log in first: a bad password should say so, not look like a network fault.
    if let Some(auth) = &shared.auth
        && let Err(e) = auth.headers(server).await
    {
        return Failed(e.to_string());
    }
    let addr = grpc_addr(server, shared.config.grpc_port_offset);
    let mut config = shared.config.session.clone();
    config.namespace = shared.config.namespace.clone();
    let (session, mut pushes) = match Session::connect(&addr, &config, &shared.tasks).await {
        Ok(s) => s,
        Err(e) => return Failed(format!("{e}: {}", source_chain(&e))),
    };
    let mut fuzzy_pushes = session.take_fuzzy_pushes();
    let v3 = session.server_has(FUZZY_WATCH_ABILITY);
    let fuzzy_able = v3 && shared.config.fuzzy_watch;
    let live = Live {
        session: Arc::new(session),
        server: server.to_owned(),
    };
    let started = Instant::now();
    // A new connection has no fuzzy watch until this session asks for one.
    *lock(&shared.fuzzy) = Fuzzy::default();
    let line = if v3 { "3.x" } else { "2.x" };
    shared.server_info.send_if_modified(|i| {
        let changed = i.line.as_deref() != Some(line);
        i.line = Some(line.to_owned());
        changed
    });
    // Redo under the exclusive apply lock, then announce the session. Pushes
    // are routed meanwhile: each re-subscribe makes the server push, and an
    // unread push would hold up the stream's acks and health replies.
    let redo_then_announce = async {
        let _exclusive = shared.apply.write().await;
        redo(shared, &live).await?;
        if fuzzy_able {
            start_fuzzy_watch(shared, &live).await;
        }
        // State first: whoever sees the session announced also sees Connected.
        shared.state.send_replace(ConnectionState::Connected {
            server: server.to_owned(),
            connection_id: live.session.connection_id().to_owned(),
        });
        shared.live.send_replace(Some(live.clone()));
        Ok::<(), ClientError>(())
    };
    tokio::pin!(redo_then_announce);
    loop {
        tokio::select! {
            done = &mut redo_then_announce => match done {
                Ok(()) => break,
                Err(e) => return Failed(format!("re-applying owned state: {e}: {}", source_chain(&e))),
            },
            Some(push) = pushes.recv() => route(shared, push),
            Some(push) = recv_fuzzy(&mut fuzzy_pushes) => on_fuzzy(shared, push),
        }
    }
    // The version is read over HTTP beside the session (no task of its own):
    // once per session, since a reconnect may land on an upgraded server.
    let probe = probe_version(shared, server, v3);
    tokio::pin!(probe);
    let mut probed = false;
    loop {
        tokio::select! {
            version = &mut probe, if !probed => {
                probed = true;
                shared.server_info.send_if_modified(|i| {
                    let changed = i.version != version;
                    i.version = version;
                    changed
                });
            }
            push = pushes.recv() => match push {
                Some(push) => route(shared, push),
                None => break,
            },
            Some(push) = recv_fuzzy(&mut fuzzy_pushes) => on_fuzzy(shared, push),
            Some(key) = unsubscribed.recv() => {
                // Still unwatched? (A new subscriber may have come meanwhile.)
                if !lock(&shared.owned).subscriptions.contains_key(&key)
                    && let Err(e) = send(shared, &live, "unsubscribe", &convert::subscribe_request(&key, false)).await {
                        debug!(error = %e, service = %key, "unsubscribe failed");
                    }
            }
            reason = live.session.closed() => return Served { lived: started.elapsed(), reason },
        }
    }
    Served {
        lived: started.elapsed(),
        reason: live.session.closed().await,
    }
}

/// Re-applies, on a new session, everything the client owns: the server
/// forgot it all with the old connection.
async fn redo(shared: &Shared, live: &Live) -> Result<(), ClientError> {
    let (subscriptions, published): (Vec<ServiceKey>, Vec<(ServiceKey, InstanceSet)>) = {
        let owned = lock(&shared.owned);
        (
            owned.subscriptions.keys().cloned().collect(),
            owned
                .published
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    };
    for (key, instances) in &published {
        match send(
            shared,
            live,
            "re-publish",
            &convert::batch_request(key, instances),
        )
        .await
        {
            Ok(_) => {}
            // Refused as invalid now (say, a server with stricter checks):
            // it never will be accepted, and must not block the others.
            Err(e) if refused_as_invalid(&e) => {
                warn!(service = %key, error = %e, "re-publish refused as invalid; dropped from the redo");
                lock(&shared.owned).published.remove(key);
            }
            Err(e) => return Err(e),
        }
    }
    for key in &subscriptions {
        let reply = send(
            shared,
            live,
            "re-subscribe",
            &convert::subscribe_request(key, true),
        )
        .await?;
        if let Some(info) = reply.service_info.as_ref() {
            match convert::snapshot(&shared.config.namespace, info) {
                Ok(snapshot) => offer(shared, snapshot),
                Err(e) => {
                    warn!(error = %e, service = %key, "unreadable snapshot in subscribe reply")
                }
            }
        }
    }
    if !published.is_empty() || !subscriptions.is_empty() {
        info!(
            published = published.len(),
            subscriptions = subscriptions.len(),
            "redo complete"
        );
    }
    Ok(())
}

/// The server's exact version from its state document, which needs no user
/// on either line: 2.x's `/v1/console/server/state` (`version`), 3.x's
/// `/v3/admin/core/state` (`data.version`; 3.x answers the v1 path 410).
async fn probe_version(shared: &Shared, server: &str, v3: bool) -> Option<String> {
    let (path, pointer) = if v3 {
        ("/v3/admin/core/state", "/data/version")
    } else {
        ("/v1/console/server/state", "/version")
    };
    let mut request = shared.http.client().get(shared.http.url(server, path));
    if let Some(auth) = &shared.auth
        && let Ok(headers) = auth.headers(server).await
        && let Some(token) = headers.get(TOKEN_KEY)
    {
        request = request.query(&[(TOKEN_KEY, token.as_str())]);
    }
    let response = request.send().await.ok()?;
    if !response.status().is_success() {
        debug!(status = %response.status(), path, "server version not readable");
        return None;
    }
    let body: serde_json::Value = response.json().await.ok()?;
    body.pointer(pointer)
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned)
}

/// The ability a server announces when it serves fuzzy watches (3.x).
const FUZZY_WATCH_ABILITY: &str = "fuzzyWatch";

/// Asks the server to fuzzy-watch every service of the namespace. A refusal
/// (too many patterns on the server, 50310; more matches than it tracks,
/// 50311; anything else) leaves the client on HTTP listings, with a warning
/// that says why.
async fn start_fuzzy_watch(shared: &Shared, live: &Live) {
    let request = convert::fuzzy_watch_all_request(&shared.config.namespace);
    match send(shared, live, "fuzzy watch", &request).await {
        Ok(_) => {
            lock(&shared.fuzzy).accepted = true;
            debug!(pattern = %request.group_key_pattern, "fuzzy watch accepted");
        }
        Err(e) => {
            // Cancel it: a watch over its match limit stays registered on the server.
            let mut cancel = request.clone();
            cancel.watch_type = "CANCEL_WATCH".to_owned();
            cancel.initializing = false;
            let _ = send(shared, live, "cancel fuzzy watch", &cancel).await;
            warn!(error = %e, "the server refused a fuzzy watch of the namespace; listing services over HTTP instead");
        }
    }
}

async fn recv_fuzzy(rx: &mut Option<mpsc::Receiver<FuzzyPush>>) -> Option<FuzzyPush> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Applies a fuzzy-watch push to the set, and tells the watchers when it moved.
fn on_fuzzy(shared: &Shared, push: FuzzyPush) {
    let namespace = &shared.config.namespace;
    let mut fuzzy = lock(&shared.fuzzy);
    let mut apply = |key: &str, changed_type: &str| match (
        convert::fuzzy_service_key(namespace, key),
        changed_type,
    ) {
        (Some((group, name)), "ADD_SERVICE") => {
            fuzzy.services.insert((group.to_owned(), name.to_owned()))
        }
        (Some((group, name)), "DELETE_SERVICE") => {
            fuzzy.services.remove(&(group.to_owned(), name.to_owned()))
        }
        _ => {
            debug!(key, changed_type, "fuzzy-watch entry ignored");
            false
        }
    };
    let mut moved = false;
    match &push {
        FuzzyPush::Sync(sync) => {
            for context in sync.contexts.iter().flatten() {
                moved |= apply(&context.service_key, &context.changed_type);
            }
            if sync.sync_type == "FINISH_FUZZY_WATCH_INIT_NOTIFY" && !fuzzy.complete {
                fuzzy.complete = true;
                moved = true;
                debug!(
                    services = fuzzy.services.len(),
                    "fuzzy watch init sync finished"
                );
            }
        }
        FuzzyPush::Change(change) => moved |= apply(&change.service_key, &change.changed_type),
    }
    drop(fuzzy);
    if moved {
        shared
            .catalog_changes
            .send_modify(|n| *n = n.wrapping_add(1));
    }
}

fn route(shared: &Shared, push: wire::NotifySubscriberRequest) {
    let Some(info) = push.service_info.as_ref() else {
        return;
    };
    match convert::snapshot(&shared.config.namespace, info) {
        Ok(snapshot) => {
            debug!(service = %snapshot.service, instances = snapshot.instances.len(), "push received");
            offer(shared, snapshot);
        }
        Err(e) => warn!(error = %e, "unreadable push ignored"),
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_address_is_http_port_plus_offset() {
        assert_eq!(grpc_addr("10.0.0.1:8848", 1000), "10.0.0.1:9848");
        assert_eq!(grpc_addr("[::1]:8848", 1000), "[::1]:9848");
        assert_eq!(grpc_addr("nacos.example:80", 1000), "nacos.example:1080");
    }

    #[tokio::test]
    async fn bad_configs_are_refused_before_anything_runs() {
        let tasks = Tasks::default();
        let cases = [
            (ClientConfig::new("a", vec![], "public"), "no servers"),
            (
                ClientConfig::new("a", vec!["nohost".into()], "public"),
                "host:port",
            ),
            (
                ClientConfig::new("a", vec!["h:65000".into()], "public"),
                "room for the gRPC offset",
            ),
            (
                ClientConfig::new("a", vec!["h:8848".into()], ""),
                "namespace is empty",
            ),
        ];
        for (config, expected) in cases {
            match Client::start(config, &tasks) {
                Err(e @ ClientError::Config { .. }) => {
                    assert!(e.to_string().contains(expected), "{e}")
                }
                other => panic!("expected a config error mentioning {expected:?}, got {other:?}"),
            }
        }
        let mut bad_backoff = ClientConfig::new("a", vec!["h:8848".into()], "public");
        bad_backoff.reconnect_min = Duration::ZERO;
        assert!(matches!(
            Client::start(bad_backoff, &tasks),
            Err(ClientError::Config { .. })
        ));
    }

    #[tokio::test]
    async fn calls_without_a_server_fail_with_the_reason_and_keep_the_intent() {
        // Nothing listens on this port: every connect is refused.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        // An ephemeral port is far above 1: "HTTP" port - 1, gRPC offset 1.
        let mut config =
            ClientConfig::new("down", vec![format!("127.0.0.1:{}", port - 1)], "public");
        config.grpc_port_offset = 1;
        config.session.request_timeout = Duration::from_millis(300);
        let tasks = Tasks::default();
        let client = Client::start(config, &tasks).expect("valid config");
        let err = client
            .publish("DEFAULT_GROUP", "svc", vec![Instance::new("10.0.0.1", 80)])
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::NotConnected { .. }), "{err}");
        assert!(err.is_retryable());
        // The set is kept for when the cluster comes back.
        assert_eq!(client.published().len(), 1);
        let mut state = client.state();
        let seen = state
            .wait_for(|s| matches!(s, ConnectionState::Disconnected { .. }))
            .await
            .expect("open")
            .clone();
        let ConnectionState::Disconnected { error, .. } = seen else {
            unreachable!()
        };
        assert!(error.contains("connecting to"), "{error}");
        tasks.token().cancel();
        state
            .wait_for(|s| *s == ConnectionState::Stopped)
            .await
            .expect("stops on cancel");
    }
}
