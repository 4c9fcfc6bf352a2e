//! The client: one Nacos cluster (one namespace of it) kept alive behind a
//! cheap, cloneable [`Client`] handle.
//!
//! This file holds the handle and its public types (configuration,
//! connection state, error) and the state the handle shares with its
//! supervisor task. The rest lives beside it, one idea a file:
//!
//! - `supervisor`: the reconnect loop and one session's life: dial, redo
//!   everything owned under the exclusive apply lock, announce, serve;
//! - `calls`: the request path: waiting for a session, the apply lock, auth
//!   headers and one retry after a token refresh;
//! - `naming`: the typed naming calls (list, query, register, publish) and
//!   the redo table of published sets;
//! - `subscriptions`: [`Subscription`] streams, their bookkeeping, and the
//!   routing of pushes to them;
//! - `catalog`: listing every service of the namespace (fuzzy watch, then
//!   3.x's admin API or 2.x's catalog over HTTP), and [`ServerInfo`];
//! - `fuzzy`: the current session's fuzzy watch (3.x) and the set it shows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{RwLock, mpsc, watch};
use tokio_stream::wrappers::WatchStream;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::Instrument;

use super::auth::{Auth, AuthError, Credentials, HttpApi};
use crate::model::{ClusterId, InstanceSet, ServerAddr, ServiceKey};
use crate::runtime::{Backoff, BackoffError, Tasks, lock};
use crate::transport::{Session, SessionConfig, TransportError};
use crate::wire;

mod calls;
mod catalog;
mod fuzzy;
mod naming;
mod subscriptions;
mod supervisor;
#[cfg(test)]
mod tests;

pub use catalog::{CatalogApi, CatalogProbe, ServerInfo};
pub use subscriptions::Subscription;

use fuzzy::Fuzzy;
use subscriptions::Watched;

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

    /// Refuses a configuration that cannot work, before anything runs, and
    /// builds what it implies: the reconnect backoff and the HTTP API.
    fn check(&self) -> Result<(Backoff, HttpApi), ClientError> {
        let invalid = |reason: &str| ClientError::Config {
            cluster: self.cluster.clone(),
            reason: reason.to_owned(),
        };
        if self.servers.is_empty() {
            return Err(invalid("no servers given"));
        }
        for server in &self.servers {
            if ServerAddr::parse(server)
                .and_then(|a| a.grpc(self.grpc_port_offset))
                .is_err()
            {
                return Err(invalid(&format!(
                    "server {server:?} is not host:port with room for the gRPC offset"
                )));
            }
        }
        if self.namespace.is_empty() {
            return Err(invalid(
                "namespace is empty (the default namespace is \"public\")",
            ));
        }
        let backoff = Backoff::try_new(self.reconnect_min, self.reconnect_max, 0.5)
            .map_err(|e: BackoffError| invalid(&e.to_string()))?;
        let http = HttpApi::new(
            self.login_https,
            &self.context_path,
            self.session.request_timeout,
        )
        .map_err(|e| invalid(&format!("building the HTTP client: {e}")))?;
        Ok((backoff, http))
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

/// What the handles and the supervisor share: the configuration, the
/// current session, the redo table and what has been learnt of the server.
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
    /// Moves when a consumer asks whoever watches this client to list in
    /// full again (a DR drill's restore): see [`Client::request_relist`].
    relists: watch::Sender<u64>,
    /// What the client has learnt of the server it talks to.
    server_info: watch::Sender<ServerInfo>,
}

impl Shared {
    /// The state of a client that has not connected yet, on its first server.
    fn new(
        config: ClientConfig,
        http: HttpApi,
        tasks: Tasks,
        unsubscribe: mpsc::UnboundedSender<ServiceKey>,
    ) -> Self {
        let auth = config
            .credentials
            .as_ref()
            .map(|c| Auth::new(c.clone(), http.clone()));
        let first = config.servers[0].clone();
        Self {
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
            token: tasks.token().clone(),
            tasks,
            last_error: Mutex::new(None),
            fuzzy: Mutex::new(Fuzzy::default()),
            catalog_changes: watch::channel(0).0,
            relists: watch::channel(0).0,
            server_info: watch::channel(ServerInfo::default()).0,
            config,
        }
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
        let (backoff, http) = config.check()?;
        let tasks = tasks.child();
        let token = tasks.token().clone();
        let (unsubscribe, unsubscribed) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared::new(config, http, tasks.clone(), unsubscribe));
        let span = tracing::info_span!("cluster", id = %shared.config.cluster, namespace = %shared.config.namespace);
        let name = format!(
            "client {}/{}",
            shared.config.cluster, shared.config.namespace
        );
        tasks.spawn(
            name,
            supervisor::supervise(shared.clone(), backoff, unsubscribed).instrument(span),
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

    // --- helpers ---

    fn key(&self, group: &str, name: &str) -> ServiceKey {
        ServiceKey::new(self.shared.config.namespace.clone(), group, name)
    }

    fn owned(&self) -> std::sync::MutexGuard<'_, Owned> {
        lock(&self.shared.owned)
    }
}
