//! The session: handshake, pump, health checks, unary calls.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, trace, warn};

use super::error::{TransportError, UNREGISTERED};
use super::grpc::{Connection, Inbound, Outbound};
use crate::model::ServerAddr;
use crate::proto::Payload;
use crate::runtime::Tasks;
use crate::wire::{self, Reply, Response, ServerRequest};

/// Largest message we accept from a server (Nacos' own inbound limit).
const MAX_MESSAGE_BYTES: usize = 10 * 1024 * 1024;
/// Pushes buffered between the pump and the session's owner. When full,
/// the pump waits, which delays the ack; the server then re-pushes later.
const PUSH_BUFFER: usize = 1024;
/// On close, how long the pump waits for the server to end its side of the
/// stream after ours ended (a server that has seen the end has let go of
/// the connection's instances, or is about to).
const CLOSE_DRAIN: Duration = Duration::from_secs(1);

/// TLS to the gRPC port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// PEM certificates to trust in addition to the Mozilla roots.
    pub ca_pem: Option<Vec<u8>>,
    /// Name to verify the server certificate against (default: the host dialled).
    pub domain: Option<String>,
}

/// How a session introduces itself and how long it waits.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Free text sent as `clientVersion`.
    pub client_version: String,
    /// Namespace sent as `tenant` (informational).
    pub namespace: String,
    /// Application name label.
    pub app_name: String,
    /// Deadline for TCP connect and for each handshake step.
    pub connect_timeout: Duration,
    /// Deadline for every unary call.
    pub request_timeout: Duration,
    /// Send a health check after this long without a successful call.
    pub idle_health_check: Duration,
    /// TLS, when the server's gRPC port requires it.
    pub tls: Option<TlsOptions>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            client_version: concat!("nacos-replicator:v", env!("CARGO_PKG_VERSION")).to_owned(),
            namespace: crate::model::DEFAULT_NAMESPACE.to_owned(),
            app_name: "nacos-replicator".to_owned(),
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(3),
            idle_health_check: Duration::from_secs(5),
            tls: None,
        }
    }
}

/// What the server has sent on a session's stream so far.
#[derive(Debug, Default)]
pub struct SessionStats {
    pushes: AtomicU64,
    detections: AtomicU64,
    unknown: AtomicU64,
    health_checks: AtomicU64,
}

impl SessionStats {
    /// Service pushes received (and acknowledged).
    pub fn pushes(&self) -> u64 {
        self.pushes.load(Ordering::Relaxed)
    }

    /// Liveness probes (`ClientDetectionRequest`) received and answered.
    pub fn detections(&self) -> u64 {
        self.detections.load(Ordering::Relaxed)
    }

    /// Health checks this client sent because the session was idle.
    pub fn health_checks(&self) -> u64 {
        self.health_checks.load(Ordering::Relaxed)
    }

    /// Requests of classes this client does not handle (answered with an error).
    pub fn unknown(&self) -> u64 {
        self.unknown.load(Ordering::Relaxed)
    }
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The owner closed it (or dropped it).
    Local,
    /// The server asked for a reconnect, to `target` (`host:http_port`) if given.
    Reset {
        /// Where the server wants us to go next.
        target: Option<String>,
    },
    /// The stream ended or failed.
    StreamEnded(String),
    /// A health check or a call showed the connection is gone or unregistered.
    Broken(String),
}

/// A fuzzy-watch push (Nacos 3.x), forwarded before it is acknowledged.
#[derive(Debug, Clone, PartialEq)]
pub enum FuzzyPush {
    /// A batch of the services a pattern matches, or the end of the init sync.
    Sync(wire::NamingFuzzyWatchSyncRequest),
    /// One matching service created or removed.
    Change(wire::NamingFuzzyWatchChangeNotifyRequest),
}

/// One registered connection to one server. Dropping it closes the
/// transport, and with it every ephemeral instance it registered.
#[derive(Debug)]
pub struct Session {
    /// The abilities the server announced in its SetupAck (2.3+).
    abilities: Arc<Mutex<BTreeMap<String, bool>>>,
    /// Fuzzy-watch pushes, until [`Session::take_fuzzy_pushes`] takes them.
    fuzzy_rx: Mutex<Option<mpsc::Receiver<FuzzyPush>>>,
    addr: String,
    connection_id: String,
    client_ip: String,
    client: Connection,
    config: SessionConfig,
    last_active: Arc<Mutex<Instant>>,
    closed: CancellationToken,
    reason: watch::Receiver<Option<CloseReason>>,
    reason_tx: Arc<watch::Sender<Option<CloseReason>>>,
    stats: Arc<SessionStats>,
}

// === impl Session ===

impl Session {
    /// Dials `addr` (`host:grpc_port`), completes the handshake and returns
    /// the session with the stream of pushes the server sends to it.
    ///
    /// The session's tasks (the stream pump, the health checks and the gRPC
    /// channel's own) run on `tasks`: they end when the session is closed or
    /// dropped, or when `tasks` is cancelled, and the socket is closed once
    /// they have.
    pub async fn connect(
        addr: &str,
        config: &SessionConfig,
        tasks: &Tasks,
    ) -> Result<(Session, mpsc::Receiver<wire::NotifySubscriberRequest>), TransportError> {
        let (push_tx, push_rx) = mpsc::channel(PUSH_BUFFER);
        let session = Self::open(addr, config, tasks, Pushes::Channel(push_tx)).await?;
        Ok((session, push_rx))
    }

    /// As [`Session::connect`], handing each service push to `on_push` in
    /// the stream's own task, before it is acknowledged, instead of to a
    /// channel: no hand-off to another task per push. `on_push` must not
    /// block; what it does delays the stream (and every other push) as long.
    pub async fn connect_with(
        addr: &str,
        config: &SessionConfig,
        tasks: &Tasks,
        on_push: PushSink,
    ) -> Result<Session, TransportError> {
        Self::open(addr, config, tasks, Pushes::Sink(on_push)).await
    }

    async fn open(
        addr: &str,
        config: &SessionConfig,
        tasks: &Tasks,
        pushes: Pushes,
    ) -> Result<Session, TransportError> {
        let deadline = config.connect_timeout;
        let tcp = dial(addr, deadline).await?;
        let client_ip = tcp
            .local_addr()
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        let connection = open_connection(addr, tcp, config, tasks).await?;
        let (mut session, fuzzy_tx) = Session::new(addr, client_ip, connection, config, tasks);
        let check = session.server_check(deadline).await?;
        session.connection_id = check.connection_id.unwrap_or_default();
        let setup_ack = session.open_stream(pushes, fuzzy_tx, tasks);
        session
            .await_setup(check.support_ability_negotiation, &setup_ack, deadline)
            .await?;
        session.start_health_checks(tasks);
        info!(%addr, connection_id = %session.connection_id, "session registered");
        Ok(session)
    }

    /// The session over a fresh connection, before the handshake (no
    /// connection id yet), and the sender its pump hands fuzzy-watch pushes to.
    fn new(
        addr: &str,
        client_ip: String,
        client: Connection,
        config: &SessionConfig,
        tasks: &Tasks,
    ) -> (Session, mpsc::Sender<FuzzyPush>) {
        let (reason_tx, reason) = watch::channel(None);
        let (fuzzy_tx, fuzzy_rx) = mpsc::channel(PUSH_BUFFER);
        let session = Session {
            abilities: Arc::default(),
            fuzzy_rx: Mutex::new(Some(fuzzy_rx)),
            addr: addr.to_owned(),
            connection_id: String::new(),
            client_ip,
            client,
            config: config.clone(),
            last_active: Arc::new(Mutex::new(Instant::now())),
            closed: tasks.token().child_token(),
            reason,
            reason_tx: Arc::new(reason_tx),
            stats: Arc::default(),
        };
        (session, fuzzy_tx)
    }

    /// Handshake step 1: ServerCheck tells us the id the server gave this
    /// transport, and whether it negotiates abilities (2.3+).
    async fn server_check(
        &self,
        deadline: Duration,
    ) -> Result<wire::ServerCheckResponse, TransportError> {
        let check = wire::ServerCheckRequest {
            module: "internal".into(),
            ..Default::default()
        };
        self.call(&check, &HashMap::new(), deadline)
            .await
            .map_err(|e| match e {
                TransportError::Timeout { after, .. } => TransportError::HandshakeTimeout {
                    addr: self.addr.clone(),
                    stage: "server check",
                    after,
                },
                other => other,
            })
    }

    /// Handshake step 2: the stream, opened with ConnectionSetup as its first
    /// message, and its pump started on `tasks`, handing service pushes to
    /// `pushes`. Returns the signal the pump gives on the server's SetupAck.
    fn open_stream(
        &self,
        pushes: Pushes,
        fuzzy: mpsc::Sender<FuzzyPush>,
        tasks: &Tasks,
    ) -> Arc<Notify> {
        let setup = wire::ConnectionSetupRequest {
            module: "internal".into(),
            client_version: self.config.client_version.clone(),
            tenant: self.config.namespace.clone(),
            labels: BTreeMap::from([
                ("source".to_owned(), "sdk".to_owned()),
                // Without module=naming the server gives the connection no naming client.
                ("module".to_owned(), "naming".to_owned()),
                ("AppName".to_owned(), self.config.app_name.clone()),
            ]),
            ability_table: BTreeMap::new(),
            ..Default::default()
        };
        let setup = wire::encode(&setup, &HashMap::new(), &self.client_ip);
        let setup_ack = Arc::new(Notify::new());
        let pump = Pump {
            pushes,
            fuzzy,
            abilities: self.abilities.clone(),
            setup_ack: setup_ack.clone(),
            client_ip: self.client_ip.clone(),
            last_active: self.last_active.clone(),
            closed: self.closed.clone(),
            reason: self.reason_tx.clone(),
            stats: self.stats.clone(),
        };
        tasks.spawn(
            format!("session {} stream", self.addr),
            pump.run(self.client.clone(), setup),
        );
        setup_ack
    }

    /// Handshake step 3: registration is asynchronous on the server. A 2.3+
    /// server says when it is done (SetupAck); then, for every version, a
    /// health check that is not refused as unregistered proves it.
    async fn await_setup(
        &self,
        negotiates: bool,
        setup_ack: &Notify,
        deadline: Duration,
    ) -> Result<(), TransportError> {
        if negotiates
            && tokio::time::timeout(deadline, setup_ack.notified())
                .await
                .is_err()
        {
            let addr = &self.addr;
            debug!(%addr, "no SetupAck within the deadline; probing registration instead");
        }
        self.await_registration(deadline).await
    }

    /// Step 4, once registered: health checks whenever the session is idle,
    /// on `tasks`.
    fn start_health_checks(&self, tasks: &Tasks) {
        let health = health_loop(
            self.stats.clone(),
            self.client.clone(),
            self.config.clone(),
            self.client_ip.clone(),
            self.last_active.clone(),
            self.closed.clone(),
            self.reason_tx.clone(),
        );
        tasks.spawn(format!("session {} health checks", self.addr), health);
    }

    async fn await_registration(&self, deadline: Duration) -> Result<(), TransportError> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(10);
        loop {
            let probe = wire::HealthCheckRequest {
                module: "internal".into(),
                ..Default::default()
            };
            match self
                .call(&probe, &HashMap::new(), self.config.request_timeout)
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if e.code() == Some(UNREGISTERED) && started.elapsed() < deadline => {}
                Err(e) if e.code() == Some(UNREGISTERED) => {
                    return Err(TransportError::HandshakeTimeout {
                        addr: self.addr.clone(),
                        stage: "setup",
                        after: deadline,
                    });
                }
                Err(e) => return Err(e),
            }
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = self.closed.cancelled() => return Err(TransportError::Closed(self.describe_close())),
            }
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    /// Sends one request and waits for its reply, within the session's
    /// request deadline. `headers` go in the payload metadata (the access
    /// token lives there).
    pub async fn request<Q: wire::Request>(
        &self,
        request: &Q,
        headers: &HashMap<String, String>,
    ) -> Result<Q::Response, TransportError> {
        if self.closed.is_cancelled() {
            return Err(TransportError::Closed(self.describe_close()));
        }
        let result = self
            .call(request, headers, self.config.request_timeout)
            .await;
        if let Err(e) = &result
            && e.breaks_session()
        {
            close_with(
                &self.closed,
                &self.reason_tx,
                CloseReason::Broken(e.to_string()),
            );
        }
        result
    }

    async fn call<Q: wire::Request>(
        &self,
        request: &Q,
        headers: &HashMap<String, String>,
        deadline: Duration,
    ) -> Result<Q::Response, TransportError> {
        unary(
            &self.client,
            request,
            headers,
            &self.client_ip,
            deadline,
            &self.last_active,
        )
        .await
    }

    /// The id the server gave this connection.
    pub fn connection_id(&self) -> &str {
        &self.connection_id
    }

    /// Whether the server announced `ability` (e.g. `fuzzyWatch`) in its SetupAck.
    /// A server that sends no SetupAck (before 2.3) announces nothing.
    pub fn server_has(&self, ability: &str) -> bool {
        self.abilities
            .lock()
            .is_ok_and(|a| a.get(ability) == Some(&true))
    }

    /// The stream of fuzzy-watch pushes (3.x), once: later calls get `None`.
    pub fn take_fuzzy_pushes(&self) -> Option<mpsc::Receiver<FuzzyPush>> {
        self.fuzzy_rx.lock().ok()?.take()
    }

    /// What the server has sent on the stream so far.
    pub fn stats(&self) -> &SessionStats {
        &self.stats
    }

    /// The address this session dialled.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Resolves when the session ends, with the reason.
    pub async fn closed(&self) -> CloseReason {
        self.closed.cancelled().await;
        // The reason is set before the token is cancelled; none was set when
        // the owner's tasks were cancelled as a whole, which is a local close.
        self.reason.borrow().clone().unwrap_or(CloseReason::Local)
    }

    /// Ends the session: stops its tasks and closes the transport, which
    /// removes every ephemeral instance it registered.
    pub fn close(&self) {
        close_with(&self.closed, &self.reason_tx, CloseReason::Local);
    }

    fn describe_close(&self) -> String {
        match &*self.reason.borrow() {
            Some(r) => format!("{r:?}"),
            None => "closed".to_owned(),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.close();
    }
}

fn close_with(
    token: &CancellationToken,
    reason: &watch::Sender<Option<CloseReason>>,
    why: CloseReason,
) {
    reason.send_if_modified(|r| {
        if r.is_none() {
            *r = Some(why);
            true
        } else {
            false
        }
    });
    token.cancel();
}

/// Opens the TCP connection to `addr` within `deadline`.
async fn dial(addr: &str, deadline: Duration) -> Result<TcpStream, TransportError> {
    let tcp = tokio::time::timeout(deadline, TcpStream::connect(addr))
        .await
        .map_err(|_| TransportError::HandshakeTimeout {
            addr: addr.to_owned(),
            stage: "connect",
            after: deadline,
        })?
        .map_err(|source| TransportError::Connect {
            addr: addr.to_owned(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// Opens the HTTP/2 connection over an already connected TCP stream (TLS
/// first when configured). It never re-dials: a connection that breaks
/// stays broken, and its session with it.
async fn open_connection(
    addr: &str,
    tcp: TcpStream,
    config: &SessionConfig,
    tasks: &Tasks,
) -> Result<Connection, TransportError> {
    let failed = |source| TransportError::Channel {
        addr: addr.to_owned(),
        source,
    };
    // Time for the pump to end the stream politely after a shutdown.
    let linger = CLOSE_DRAIN * 2;
    let handshake = async {
        match &config.tls {
            None => Connection::handshake(tcp, addr, false, MAX_MESSAGE_BYTES, linger, tasks).await,
            Some(tls) => {
                let stream = tls_connect(addr, tcp, tls).await?;
                Connection::handshake(stream, addr, true, MAX_MESSAGE_BYTES, linger, tasks).await
            }
        }
    };
    tokio::time::timeout(config.connect_timeout, handshake)
        .await
        .map_err(|_| TransportError::HandshakeTimeout {
            addr: addr.to_owned(),
            stage: "HTTP/2 handshake",
            after: config.connect_timeout,
        })?
        .map_err(failed)
}

/// TLS over `tcp`, trusting the Mozilla roots and the configured CA, and
/// requiring the server to agree to HTTP/2 (ALPN `h2`).
async fn tls_connect(
    addr: &str,
    tcp: TcpStream,
    tls: &TlsOptions,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, super::grpc::BoxError> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, ServerName};

    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = &tls.ca_pem {
        for cert in CertificateDer::pem_slice_iter(pem) {
            roots.add(cert?)?;
        }
    }
    // An explicit provider: the library never installs a process-wide one.
    let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    client.alpn_protocols = vec![b"h2".to_vec()];
    let host =
        ServerAddr::parse(addr).map_or_else(|_| addr.to_owned(), |a| a.host_name().to_owned());
    let name = ServerName::try_from(tls.domain.clone().unwrap_or(host))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(name, tcp)
        .await?;
    if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
        return Err("the server did not agree to HTTP/2 over TLS (ALPN h2)".into());
    }
    Ok(stream)
}

async fn unary<Q: wire::Request>(
    client: &Connection,
    request: &Q,
    headers: &HashMap<String, String>,
    client_ip: &str,
    deadline: Duration,
    last_active: &Mutex<Instant>,
) -> Result<Q::Response, TransportError> {
    let call = Q::TYPE;
    let payload = wire::encode(request, headers, client_ip);
    let reply = tokio::time::timeout(deadline, client.unary(&payload))
        .await
        .map_err(|_| TransportError::Timeout {
            call,
            after: deadline,
        })?
        .map_err(|source| TransportError::Rpc { call, source })?;
    trace!(call, reply_type = wire::payload_type(&reply).unwrap_or("?"), body = %wire::body_text(&reply), "unary reply");
    let response = match wire::decode_reply::<Q>(&reply)
        .map_err(|source| TransportError::Wire { call, source })?
    {
        Reply::Response(r) if r.status().is_success() => r,
        Reply::Response(r) => return Err(rejected(call, r.status())),
        Reply::Error(e) => return Err(rejected(call, &e.status)),
    };
    if let Ok(mut t) = last_active.lock() {
        *t = Instant::now();
    }
    Ok(response)
}

fn rejected(call: &'static str, status: &wire::ResponseStatus) -> TransportError {
    // Filter rejections (auth, param check) carry resultCode 500 and the
    // real reason in errorCode; exception-built ones repeat it in both.
    let code = if status.error_code != 0 {
        status.error_code
    } else {
        status.result_code
    };
    TransportError::Rejected {
        call,
        code,
        message: status.message.clone().unwrap_or_default(),
    }
}

/// Sends a health check whenever the session has been idle for the
/// configured time; a failed check ends the session.
async fn health_loop(
    stats: Arc<SessionStats>,
    client: Connection,
    config: SessionConfig,
    client_ip: String,
    last_active: Arc<Mutex<Instant>>,
    closed: CancellationToken,
    reason: Arc<watch::Sender<Option<CloseReason>>>,
) {
    let tick = (config.idle_health_check / 5).max(Duration::from_millis(100));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // The session ended: nothing left to watch.
            () = closed.cancelled() => return,
            _ = interval.tick() => {}
        }
        let idle = last_active.lock().map(|t| t.elapsed()).unwrap_or_default();
        if idle < config.idle_health_check {
            continue;
        }
        let probe = wire::HealthCheckRequest {
            module: "internal".into(),
            ..Default::default()
        };
        stats.health_checks.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = unary(
            &client,
            &probe,
            &HashMap::new(),
            &client_ip,
            config.request_timeout,
            &last_active,
        )
        .await
        {
            warn!(error = %e, "health check failed; closing the session");
            close_with(
                &closed,
                &reason,
                CloseReason::Broken(format!("health check failed: {e}")),
            );
            return;
        }
    }
}

/// Takes a session's service pushes in the stream's task (see
/// [`Session::connect_with`]): reads the payload, a
/// `NotifySubscriberRequest` (with [`wire::push::decode_push`], in one
/// pass), and returns the request id its ack echoes, or why it could not
/// be read at all (then it is not acked, and the server pushes it again).
pub type PushSink = Arc<dyn Fn(&Payload) -> Result<Option<String>, wire::WireError> + Send + Sync>;

/// Where the pump hands service pushes.
enum Pushes {
    /// A bounded channel: when it is full the pump waits, which delays the
    /// ack (the server then re-pushes later).
    Channel(mpsc::Sender<wire::NotifySubscriberRequest>),
    /// A function called in place.
    Sink(PushSink),
}

/// Reads the server's stream: forwards pushes, answers every request with
/// the same request id, and ends the session when the stream ends.
struct Pump {
    pushes: Pushes,
    fuzzy: mpsc::Sender<FuzzyPush>,
    abilities: Arc<Mutex<BTreeMap<String, bool>>>,
    setup_ack: Arc<Notify>,
    client_ip: String,
    last_active: Arc<Mutex<Instant>>,
    closed: CancellationToken,
    reason: Arc<watch::Sender<Option<CloseReason>>>,
    stats: Arc<SessionStats>,
}

impl Pump {
    /// Opens the stream with `setup` as its first message, then serves it.
    /// The server may send nothing (not even its reply headers) until it
    /// has something to push, so the opening waits here, not in `connect`.
    async fn run(self, connection: Connection, setup: Payload) {
        let opened = tokio::select! {
            r = connection.open_stream(&setup) => r,
            () = self.closed.cancelled() => return self.end(CloseReason::Local),
        };
        let (mut out, mut inbound) = match opened {
            Ok(stream) => stream,
            Err(status) => {
                return self.end(CloseReason::StreamEnded(format!(
                    "opening the stream: {status}"
                )));
            }
        };
        loop {
            let next = tokio::select! {
                // The owner closed the session: end the stream and the channel.
                () = self.closed.cancelled() => return self.drain(out, inbound).await,
                next = inbound.message() => next,
            };
            match next {
                Ok(Some(payload)) => {
                    if let Some(reason) = self.handle(payload, &mut out).await {
                        return self.end(reason);
                    }
                }
                Ok(None) => {
                    return self.end(CloseReason::StreamEnded(
                        "the server closed the stream".into(),
                    ));
                }
                Err(status) => return self.end(CloseReason::StreamEnded(status.to_string())),
            }
        }
    }

    /// Handles one server request; returns a reason when the session must end.
    async fn handle(&self, payload: Payload, out: &mut Outbound) -> Option<CloseReason> {
        trace!(request_type = wire::payload_type(&payload).unwrap_or("?"), body = %wire::body_text(&payload), "server request");
        if let Pushes::Sink(take) = &self.pushes
            && wire::payload_type(&payload)
                .is_ok_and(|t| t == <wire::NotifySubscriberRequest as wire::Message>::TYPE)
        {
            // Forward before acking: an ack promises we took the push.
            match take(&payload) {
                Ok(request_id) => {
                    self.stats.pushes.fetch_add(1, Ordering::Relaxed);
                    let ack = wire::push::ack(request_id, &HashMap::new(), &self.client_ip);
                    self.reply(out, &ack);
                }
                Err(e) => warn!(error = %e, "undecodable server request ignored"),
            }
            return None;
        }
        let request = match wire::decode_server_request(&payload) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "undecodable server request ignored");
                return None;
            }
        };
        debug!(request = ?request, "server request");
        // The reply is built first so that the request can move on uncopied;
        // it is sent after the forwarding below.
        let reply = wire::reply_to(&request, &HashMap::new(), &self.client_ip);
        let mut end = None;
        match request {
            ServerRequest::Notify(push) => {
                self.stats.pushes.fetch_add(1, Ordering::Relaxed);
                // Forward before acking: an ack promises we took the push.
                match &self.pushes {
                    Pushes::Channel(tx) => {
                        if tx.send(push).await.is_err() {
                            debug!("push dropped: the session's owner stopped listening");
                        }
                    }
                    // Taken above, before decoding.
                    Pushes::Sink(_) => {}
                }
            }
            ServerRequest::SetupAck(ack) => {
                if let Ok(mut abilities) = self.abilities.lock() {
                    abilities.clone_from(&ack.ability_table);
                }
                self.setup_ack.notify_one();
            }
            ServerRequest::FuzzySync(sync) => self.forward_fuzzy(FuzzyPush::Sync(sync)).await,
            ServerRequest::FuzzyChange(change) => {
                self.forward_fuzzy(FuzzyPush::Change(change)).await
            }
            ServerRequest::Reset(reset) => {
                let target = match (&reset.server_ip, &reset.server_port) {
                    (Some(ip), Some(port)) if !ip.is_empty() && !port.is_empty() => {
                        Some(format!("{ip}:{port}"))
                    }
                    _ => None,
                };
                info!(?target, "server asked for a reconnect");
                end = Some(CloseReason::Reset { target });
            }
            ServerRequest::Detection(_) => {
                self.stats.detections.fetch_add(1, Ordering::Relaxed);
            }
            ServerRequest::Unknown { class, .. } => {
                self.stats.unknown.fetch_add(1, Ordering::Relaxed);
                debug!(%class, "unhandled server request");
            }
        }
        if let Some(reply) = reply {
            self.reply(out, &reply);
        }
        end
    }

    /// Sends the answer to a server request; the session was active.
    fn reply(&self, out: &mut Outbound, reply: &Payload) {
        if out.send(reply).is_ok()
            && let Ok(mut t) = self.last_active.lock()
        {
            *t = Instant::now();
        }
    }

    /// Forwards before the ack, as for service pushes. Nobody may be listening
    /// (a session whose owner never fuzzy-watches): then the push is only acked.
    async fn forward_fuzzy(&self, push: FuzzyPush) {
        self.stats.pushes.fetch_add(1, Ordering::Relaxed);
        if self.fuzzy.send(push).await.is_err() {
            debug!("fuzzy-watch push dropped: nobody listens on this session");
        }
    }

    /// Ends our side of the stream and gives the server a moment to end
    /// its own, so that it learns of the close from the stream rather than
    /// from a reset socket; then the channel is dropped.
    async fn drain(self, mut out: Outbound, mut inbound: Inbound) {
        self.end(CloseReason::Local);
        out.finish();
        let ended = async { while let Ok(Some(_)) = inbound.message().await {} };
        if tokio::time::timeout(CLOSE_DRAIN, ended).await.is_err() {
            debug!("the server did not end the stream in time; dropping it");
        }
    }

    fn end(&self, reason: CloseReason) {
        if !self.closed.is_cancelled() {
            info!(?reason, "session ended");
        }
        close_with(&self.closed, &self.reason, reason);
    }
}
