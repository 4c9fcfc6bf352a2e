//! An in-process Nacos-compatible server: the naming calls our client makes,
//! with real Nacos 2.x semantics, plus knobs for faults no real server shows
//! on demand.
//!
//! [`FakeNacos::start`] binds two loopback ports, an HTTP port `P` (login and
//! the service catalog) and the gRPC port `P + 1000`, so a client configured
//! with `127.0.0.1:P` works unchanged. It starts in milliseconds, writes no
//! files and shares nothing with other instances, so one process can run
//! several regions.
//!
//! Semantics (each one backed by a conformance test that passes on a real
//! Nacos 2.3.2, `tests/conformance.rs`):
//!
//! - a connection is its transport: ServerCheck returns the transport's id,
//!   ConnectionSetup on the stream registers it (SetupAck follows), and any
//!   other call before that is refused with 301;
//! - one slot per connection and service: a register or a batch replaces the
//!   connection's set, a deregister removes it whatever it names;
//! - instances are ephemeral and owned by their connection: they go when it
//!   closes, and the services they were in are pushed;
//! - fully identical instances from different connections are one host; any
//!   differing field makes two hosts on one ip:port;
//! - subscriptions per connection: the first subscribe to a service is owed a
//!   push, every change pushes the full view, a push is sent again when its
//!   ack does not come within [`FakeOptions::push_resend_after`];
//! - ServiceList by exact group, paged; the HTTP catalog lists every group;
//!   an emptied service stays listed for [`FakeOptions::empty_service_ttl`];
//! - namespaces are independent; Nacos' parameter checks (metadata budget,
//!   cluster name) answer 400;
//! - auth, when on: tokens from the HTTP login, checked on every naming call
//!   and on the catalog, refused with 403 and Nacos' messages.
//!
//! Not implemented, and refused with a clear error rather than imitated:
//! persistent instances, cluster and health filters in subscribe and query.
//! Not imitated either: liveness probes of idle connections, and closing a
//! connection after a ConnectReset (our client closes it at once).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use nacos_replicator::cluster::{Client, ClientConfig};
//! use nacos_replicator::testing::fake::{FakeNacos, FakeOptions};
//!
//! let region = FakeNacos::start(FakeOptions::default()).await?;
//! let token = tokio_util::sync::CancellationToken::new();
//! let client = Client::start(ClientConfig::new("hz", vec![region.addr()], "public"), &token)?;
//! client.wait_connected(std::time::Duration::from_secs(5)).await?;
//! region.reset_all_connections(None); // the client reconnects and redoes
//! # Ok(()) }
//! ```
//!
//! Must not: touch the disk, read the environment, keep global state, or leave
//! a task running once the [`FakeNacos`] is dropped.

mod grpc;
mod http;
mod state;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio_util::sync::{CancellationToken, DropGuard};

pub use state::{ConnectionInfo, FakeStats, Silence};
use state::{Registry, Timings};

use crate::model::{Instance, ServiceKey};
use crate::runtime::Tasks;
use crate::wire::{self, convert};

/// Username and password the fake accepts, and how long its tokens live.
#[derive(Debug, Clone)]
pub struct FakeAuth {
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
    /// Tokens expire this long after login (reported in whole seconds, at
    /// least 1, as Nacos' `tokenTtl`; enforced exactly).
    pub token_ttl: Duration,
}

impl Default for FakeAuth {
    fn default() -> Self {
        Self {
            username: "nacos".to_owned(),
            password: "nacos".to_owned(),
            token_ttl: Duration::from_secs(18_000),
        }
    }
}

/// How to run a fake server.
#[derive(Debug, Clone)]
pub struct FakeOptions {
    /// Auth on (with these credentials) or off.
    pub auth: Option<FakeAuth>,
    /// A push not acknowledged within this time is sent again (Nacos: a 5 s
    /// ack timeout then a 1 s retry delay).
    pub push_resend_after: Duration,
    /// An emptied service stays listed this long (Nacos: at least 60 s).
    pub empty_service_ttl: Duration,
    /// gRPC port = HTTP port + this (Nacos: 1000).
    pub grpc_port_offset: u16,
    /// The HTTP port to bind; `None` picks a free pair of ports.
    pub http_port: Option<u16>,
}

impl Default for FakeOptions {
    fn default() -> Self {
        Self {
            auth: None,
            push_resend_after: Duration::from_secs(6),
            empty_service_ttl: Duration::from_secs(60),
            grpc_port_offset: 1000,
            http_port: None,
        }
    }
}

impl FakeOptions {
    /// The defaults with auth on (`nacos` / `nacos`).
    pub fn with_auth() -> Self {
        Self {
            auth: Some(FakeAuth::default()),
            ..Self::default()
        }
    }
}

/// The fake server could not start.
#[derive(Debug, thiserror::Error)]
pub enum FakeError {
    /// A port could not be bound.
    #[error("binding {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// No free pair of ports `P`, `P + offset` was found.
    #[error("no free pair of loopback ports {offset} apart after {attempts} attempts")]
    NoPorts {
        /// The gRPC port offset.
        offset: u16,
        /// Attempts made.
        attempts: u32,
    },
    /// The configuration cannot work.
    #[error("invalid options: {0}")]
    Options(String),
}

impl FakeError {
    /// Stable label for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Bind { .. } => "bind",
            Self::NoPorts { .. } => "no_ports",
            Self::Options(_) => "options",
        }
    }
}

/// State shared by the front ends and the handle.
pub(super) struct Shared {
    registry: Mutex<Registry>,
    auth: Option<FakeAuth>,
}

fn lock(shared: &Shared) -> MutexGuard<'_, Registry> {
    // Every registry update is complete before any code that could panic runs.
    crate::runtime::lock(&shared.registry)
}

fn now_millis() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

struct Running {
    /// The listeners, every connection and every stream task.
    tasks: Tasks,
}

/// A running fake Nacos server. Dropping it stops every task and closes every
/// connection.
pub struct FakeNacos {
    shared: Arc<Shared>,
    options: FakeOptions,
    http_port: u16,
    grpc_port: u16,
    root: CancellationToken,
    running: tokio::sync::Mutex<Option<Running>>,
    _guard: DropGuard,
}

impl std::fmt::Debug for FakeNacos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeNacos")
            .field("http_port", &self.http_port)
            .field("grpc_port", &self.grpc_port)
            .finish()
    }
}

const PORT_ATTEMPTS: u32 = 64;
/// How long `stop` waits for the connections to close before aborting them.
const STOP_GRACE: Duration = Duration::from_secs(2);

fn timings(options: &FakeOptions) -> Timings {
    Timings {
        push_resend_after: options.push_resend_after,
        empty_service_ttl: options.empty_service_ttl,
        token_ttl: options
            .auth
            .as_ref()
            .map_or(Duration::from_secs(18_000), |a| a.token_ttl),
    }
}

async fn bind(port: u16) -> Result<TcpListener, FakeError> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpListener::bind(addr)
        .await
        .map_err(|source| FakeError::Bind { addr, source })
}

impl FakeNacos {
    /// Binds the ports and starts serving. Must be called within a Tokio runtime.
    pub async fn start(options: FakeOptions) -> Result<FakeNacos, FakeError> {
        if options.push_resend_after.is_zero() {
            return Err(FakeError::Options(
                "push_resend_after must be above zero".to_owned(),
            ));
        }
        let offset = options.grpc_port_offset;
        let (http, grpc) = match options.http_port {
            Some(p) => {
                let g = p
                    .checked_add(offset)
                    .ok_or_else(|| FakeError::Options(format!("port {p} + {offset} overflows")))?;
                (bind(p).await?, bind(g).await?)
            }
            None => Self::bind_pair(offset).await?,
        };
        let (http_port, grpc_port) = (local_port(&http)?, local_port(&grpc)?);
        let root = CancellationToken::new();
        let shared = Arc::new(Shared {
            registry: Mutex::new(Registry::new(timings(&options))),
            auth: options.auth.clone(),
        });
        let running = Self::serve(&shared, &root, http, grpc);
        Ok(FakeNacos {
            shared,
            options,
            http_port,
            grpc_port,
            _guard: root.clone().drop_guard(),
            root,
            running: tokio::sync::Mutex::new(Some(running)),
        })
    }

    async fn bind_pair(offset: u16) -> Result<(TcpListener, TcpListener), FakeError> {
        for _ in 0..PORT_ATTEMPTS {
            let http = bind(0).await?;
            let Some(grpc_port) = local_port(&http)?.checked_add(offset) else {
                continue;
            };
            if let Ok(grpc) = bind(grpc_port).await {
                return Ok((http, grpc));
            }
        }
        Err(FakeError::NoPorts {
            offset,
            attempts: PORT_ATTEMPTS,
        })
    }

    fn serve(
        shared: &Arc<Shared>,
        root: &CancellationToken,
        http: TcpListener,
        grpc: TcpListener,
    ) -> Running {
        let tasks = Tasks::new(root.child_token());
        tasks.spawn(
            "fake http",
            http::serve(http, shared.clone(), tasks.clone()),
        );
        tasks.spawn(
            "fake grpc",
            grpc::serve(grpc, shared.clone(), tasks.clone()),
        );
        Running { tasks }
    }

    /// The HTTP port (what clients are configured with).
    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// The gRPC port (HTTP port + the offset).
    pub fn grpc_port(&self) -> u16 {
        self.grpc_port
    }

    /// `127.0.0.1:<http port>`, as a client's server list takes it.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.http_port)
    }

    /// The options the server was started with.
    pub fn options(&self) -> &FakeOptions {
        &self.options
    }

    // --- stop and restart ---

    /// Stops serving: closes both ports and every connection, and forgets all
    /// state (as a restarted Nacos does). Returns once the ports are free.
    pub async fn stop(&self) {
        let mut running = self.running.lock().await;
        if let Some(r) = running.take() {
            // A server going down pushes nothing on its way: without this, a
            // connection closed early in the shutdown (a publisher's) emptied
            // its services and the push of that could still reach a
            // subscriber whose connection had not closed yet, which then saw
            // the services gone instead of the server (a test flake: an agent
            // withdrawing replicas that it should have held).
            lock(&self.shared).knobs.withhold_pushes = true;
            r.tasks.shutdown(STOP_GRACE).await;
        }
        *lock(&self.shared) = Registry::new(timings(&self.options));
    }

    /// Stops if running, then serves again on the same ports with empty state.
    pub async fn restart(&self) -> Result<(), FakeError> {
        self.stop().await;
        let mut running = self.running.lock().await;
        let http = bind(self.http_port).await?;
        let grpc = bind(self.grpc_port).await?;
        *running = Some(Self::serve(&self.shared, &self.root, http, grpc));
        Ok(())
    }

    /// Whether the ports are being served.
    pub async fn is_running(&self) -> bool {
        self.running.lock().await.is_some()
    }

    // --- knobs ---

    /// Closes one connection's transport, as a network fault would. Returns
    /// whether it was open.
    pub fn drop_connection(&self, id: &str) -> bool {
        lock(&self.shared).kill(id)
    }

    /// Closes every registered connection; returns how many.
    pub fn drop_all_connections(&self) -> usize {
        let registry = lock(&self.shared);
        registry
            .connection_ids()
            .iter()
            .filter(|id| registry.kill(id))
            .count()
    }

    /// Sends `ConnectResetRequest` to one connection, naming `target`
    /// (`host:http_port`) when given. Returns whether it was sent.
    pub fn reset_connection(&self, id: &str, target: Option<&str>) -> bool {
        let mut registry = lock(&self.shared);
        let (server_ip, server_port) = match target.and_then(|t| t.rsplit_once(':')) {
            Some((host, port)) => (Some(host.to_owned()), Some(port.to_owned())),
            None => (None, None),
        };
        let request = wire::ConnectResetRequest {
            request_id: Some(registry.next_request_id()),
            server_ip,
            server_port,
            connection_id: Some(id.to_owned()),
        };
        let sent = registry.send(id, wire::encode(&request, &Default::default(), ""));
        if sent {
            registry.stats.resets_sent += 1;
        }
        sent
    }

    /// Sends `ConnectResetRequest` to every registered connection; returns how many.
    pub fn reset_all_connections(&self, target: Option<&str>) -> usize {
        let ids = lock(&self.shared).connection_ids();
        ids.iter()
            .filter(|id| self.reset_connection(id, target))
            .count()
    }

    /// Waits this long after a change before pushing it (a debounce, as
    /// Nacos' 500 ms push delay; zero by default).
    pub fn set_push_delay(&self, delay: Duration) {
        lock(&self.shared).knobs.push_delay = delay;
    }

    /// Waits this long before serving each instance register and batch call
    /// (a destination that answers slowly; zero by default). Calls wait side
    /// by side: [`FakeStats::publishes_in_progress`] counts them.
    pub fn set_call_delay(&self, delay: Duration) {
        lock(&self.shared).knobs.call_delay = delay;
    }

    /// Waits this long before serving each subscribe and query call (a
    /// source far away; zero by default). Calls wait side by side:
    /// [`FakeStats::reads_in_progress`] counts them.
    pub fn set_read_delay(&self, delay: Duration) {
        lock(&self.shared).knobs.read_delay = delay;
    }

    /// Holds every push back while `true`; what is owed goes out when released.
    pub fn withhold_pushes(&self, withhold: bool) {
        let mut registry = lock(&self.shared);
        registry.knobs.withhold_pushes = withhold;
        registry.wake_all();
    }

    /// While `true`, acks are ignored: every push is sent again each
    /// `push_resend_after`, as for a client that never acknowledges.
    pub fn ignore_acks(&self, ignore: bool) {
        lock(&self.shared).knobs.ignore_acks = ignore;
    }

    /// Fails the next `calls` naming calls (register, batch, subscribe, list,
    /// query; not ServerCheck or health checks) with error code `code`.
    pub fn fail_next(&self, calls: u32, code: i32) {
        lock(&self.shared).knobs.fail_next = (calls > 0).then_some((calls, code));
    }

    /// Makes the server stop answering (see [`Silence`]); pushes stop too.
    pub fn set_silence(&self, silence: Silence) {
        let mut registry = lock(&self.shared);
        registry.knobs.silence = silence;
        registry.wake_all();
    }

    /// Drops every connection's instances of `service` while the connections
    /// stay open, as a server that lost state behind its clients' backs would
    /// (a real Nacos offers no call for it: only the owning connection can
    /// remove its ephemeral instances). Subscribers are pushed; the owners are
    /// told nothing. Returns how many connections lost a set.
    pub fn forget(&self, service: &ServiceKey) -> usize {
        let mut registry = lock(&self.shared);
        let owners: Vec<String> = registry
            .connections()
            .into_iter()
            .filter(|c| c.publishes.contains(service))
            .map(|c| c.id)
            .collect();
        for id in &owners {
            registry.deregister(id, service);
        }
        owners.len()
    }

    /// Sends a server request of `class` with `body` as it is, on the stream
    /// of connection `id`: for what a server should never send (a body cut
    /// short, a port out of range). Returns false if there is no such
    /// connection. A success ack of it shows in [`FakeNacos::other_acks`].
    pub fn send_raw(&self, id: &str, class: &str, body: &str) -> bool {
        let payload = crate::proto::Payload {
            metadata: Some(crate::proto::Metadata {
                r#type: class.to_owned(),
                client_ip: String::new(),
                headers: std::collections::HashMap::new(),
            }),
            body: Some(prost_types::Any {
                type_url: String::new(),
                value: body.as_bytes().to_vec(),
            }),
        };
        lock(&self.shared).send(id, payload)
    }

    // --- inspection ---

    /// Request ids acknowledged with success that the fake had no push
    /// waiting for, in order: those of [`FakeNacos::send_raw`], and late
    /// acks of its own pushes that a newer push of the service superseded.
    pub fn other_acks(&self) -> Vec<String> {
        lock(&self.shared).other_acks.clone()
    }

    /// Counters since the last (re)start.
    pub fn stats(&self) -> FakeStats {
        lock(&self.shared).stats.clone()
    }

    /// Registered connections, by id.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        lock(&self.shared).connections()
    }

    /// The merged, enabled hosts of a service, as a subscriber would see them.
    pub fn instances(&self, service: &ServiceKey) -> Vec<Instance> {
        let hosts = lock(&self.shared).hosts(service);
        hosts
            .iter()
            .filter_map(|h| convert::instance(h).ok())
            .collect()
    }

    /// Every service held (any namespace, emptied ones until they expire).
    pub fn services(&self) -> Vec<ServiceKey> {
        lock(&self.shared).service_keys()
    }

    /// How many connections subscribe to a service.
    pub fn subscribers(&self, service: &ServiceKey) -> usize {
        lock(&self.shared).subscribers(service)
    }
}

fn local_port(listener: &TcpListener) -> Result<u16, FakeError> {
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|source| FakeError::Bind {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            source,
        })
}
