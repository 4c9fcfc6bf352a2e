//! Shared pieces of the integration tests: real Nacos servers and waiting
//! on conditions with a deadline.
#![allow(dead_code)]

pub mod backend;
pub mod e2e;

use std::future::Future;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nacos_replicator::cluster::{Client, ClientConfig, ConnectionState, Credentials};
use nacos_replicator::model::DEFAULT_GROUP;
use nacos_replicator::model::{Instance, ServiceSnapshot};
use nacos_replicator::runtime::Tasks;
use nacos_replicator::testing::nacos::{Distribution, NacosServer, ServerLine, ServerOptions};

/// How long any condition may take to become true on a real server: pushes
/// are debounced by 500 ms and retried every second, so a few seconds is
/// normal and twenty is generous on a loaded 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(20);

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Cargo's target directory (where the test binaries and the binary under test are).
pub fn target_dir() -> &'static Path {
    // `<target>/debug/nacos-replicator`
    Path::new(env!("CARGO_BIN_EXE_nacos-replicator"))
        .parent()
        .and_then(Path::parent)
        .expect("the binary lies in <target>/<profile>/")
}

/// The server line this test process runs on: `NACOS_SERVER=3.1` picks 3.1, anything else
/// (or nothing) 2.3. `scripts/test` runs the real-server suites once per line.
pub fn line() -> ServerLine {
    static LINE: OnceLock<ServerLine> = OnceLock::new();
    *LINE.get_or_init(|| match std::env::var("NACOS_SERVER") {
        Ok(name) if !name.trim().is_empty() => ServerLine::parse(&name)
            .unwrap_or_else(|| panic!("NACOS_SERVER={name:?}: expected 2.3 or 3.1")),
        _ => ServerLine::V2_3,
    })
}

/// The server of [`line`], resolved once per test process.
pub fn distribution() -> &'static Distribution {
    distribution_of(line())
}

/// The server of `line`, resolved once per test process (the mixed-version tests use both).
pub fn distribution_of(line: ServerLine) -> &'static Distribution {
    static DISTS: [OnceLock<Distribution>; 2] = [OnceLock::new(), OnceLock::new()];
    let slot = &DISTS[ServerLine::ALL.iter().position(|l| *l == line).unwrap_or(0)];
    slot.get_or_init(|| match line.resolve(manifest_dir()) {
        Ok(d) => d,
        Err(e) => panic!("cannot resolve the Nacos {} server: {e}", line.name()),
    })
}

/// A standalone server shared by every test of this process that does not
/// restart it. Tests isolate themselves by service (and namespace) names.
pub fn shared_server() -> &'static NacosServer {
    static SERVER: OnceLock<NacosServer> = OnceLock::new();
    SERVER.get_or_init(|| start(ServerOptions::default()))
}

/// A server of the test's own (for restarts and other disruptions).
pub fn own_server(options: ServerOptions) -> NacosServer {
    start(options)
}

/// A server of the test's own on `line`, whatever [`line()`] says.
pub fn own_server_of(line: ServerLine, options: ServerOptions) -> NacosServer {
    match NacosServer::start(distribution_of(line), options) {
        Ok(s) => s,
        Err(e) => panic!("cannot start a Nacos {} server: {e}", line.name()),
    }
}

fn start(options: ServerOptions) -> NacosServer {
    match NacosServer::start(distribution(), options) {
        Ok(s) => s,
        Err(e) => panic!("cannot start a Nacos server: {e}"),
    }
}

/// Server address as our client takes it (`host:http_port`).
pub fn addr(server: &NacosServer) -> String {
    format!("127.0.0.1:{}", server.http_port())
}

/// A client of `server` in `namespace`, on `tasks`.
pub fn client(server: &NacosServer, namespace: &str, tasks: &Tasks) -> Client {
    client_with(server, namespace, None, tasks)
}

/// A client with credentials.
pub fn client_with(
    server: &NacosServer,
    namespace: &str,
    credentials: Option<Credentials>,
    tasks: &Tasks,
) -> Client {
    let mut config = ClientConfig::new("test", vec![addr(server)], namespace);
    config.credentials = credentials;
    config.reconnect_max = Duration::from_secs(2);
    Client::start(config, tasks).expect("valid client config")
}

/// A service name no other test uses.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    format!(
        "{prefix}-{}-{}",
        millis % 1_000_000_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `check` until it returns `Some`, or panics with `what` after `deadline`.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if started.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The comparable content of an instance (the server adds an instance id).
pub fn fingerprint(instances: &[Instance]) -> Vec<String> {
    let mut v: Vec<String> = instances
        .iter()
        .map(|i| {
            format!(
                "{}:{} w={} h={} e={} c={} m={:?}",
                i.ip, i.port, i.weight, i.healthy, i.enabled, i.nacos_cluster, i.metadata
            )
        })
        .collect();
    v.sort();
    v
}

/// Waits until the subscription yields a snapshot whose instances match `expected`.
pub async fn next_matching(
    sub: &mut nacos_replicator::cluster::Subscription,
    expected: &[Instance],
    what: &str,
) -> ServiceSnapshot {
    use futures_util::StreamExt;
    let want = fingerprint(expected);
    let mut last = None;
    let found = tokio::time::timeout(DEADLINE, async {
        while let Some(snapshot) = sub.next().await {
            if fingerprint(&snapshot.instances) == want {
                return Some(snapshot);
            }
            last = Some(fingerprint(&snapshot.instances));
        }
        None
    })
    .await;
    match found {
        Ok(Some(s)) => s,
        _ => panic!("{what}: never saw {want:?}; last snapshot {last:?}"),
    }
}

/// The id of the client's current connection; panics when not connected.
pub fn connection_id(client: &Client) -> String {
    match &*client.state().borrow() {
        ConnectionState::Connected { connection_id, .. } => connection_id.clone(),
        other => panic!("not connected: {other:?}"),
    }
}

/// Waits until the client is connected again, on another connection than `old_id`.
pub async fn wait_reconnected(client: &Client, old_id: &str, deadline: Duration) {
    let mut state = client.state();
    tokio::time::timeout(
        deadline,
        state.wait_for(|s| matches!(s, ConnectionState::Connected { connection_id, .. } if connection_id != old_id)),
    )
    .await
    .unwrap_or_else(|_| panic!("not reconnected within {deadline:?}; state {:?}", *client.state().borrow()))
    .expect("state channel open");
}

/// Queries `name` in the default group until it has `count` instances.
pub async fn wait_query(
    client: &Client,
    name: &str,
    count: usize,
    what: &str,
    deadline: Duration,
) -> ServiceSnapshot {
    eventually(what, deadline, || {
        let c = client.clone();
        let name = name.to_owned();
        async move {
            let s = c.query(DEFAULT_GROUP, &name).await.ok()?;
            (s.instances.len() == count).then_some(s)
        }
    })
    .await
}

/// A `host:http_port` where nothing answers: its gRPC port (+1000) was free
/// a moment ago and nothing of ours binds it.
pub fn dead_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    drop(l);
    format!("127.0.0.1:{}", port - 1000)
}

/// An agent configuration over real servers: every cluster serves `namespace`,
/// the catalog is polled every 500 ms, `timings` adds lines to `[timings]`.
pub fn agent_config(
    timings: &str,
    clusters: &[(&str, &NacosServer)],
    namespace: &str,
    routes: &[(&str, &str)],
) -> nacos_replicator::config::Config {
    let mut toml = AgentToml::new().timings(timings);
    for (id, server) in clusters {
        toml = toml.cluster(id, &addr(server), &[namespace]);
    }
    for (from, to) in routes {
        toml = toml.route(from, to);
    }
    toml.config()
}

/// The one builder of test agent configurations, as TOML text (an agent
/// started as a process reads it from a file; one in-process takes
/// [`AgentToml::config`]). The catalog is polled every 500 ms and the status
/// server, if any, listens on a port of its own (so agents never clash).
#[derive(Debug, Clone)]
pub struct AgentToml {
    status_listen: String,
    timings: String,
    clusters: String,
    routes: String,
}

impl Default for AgentToml {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentToml {
    /// No clusters, no routes yet.
    pub fn new() -> Self {
        Self {
            status_listen: "127.0.0.1:0".to_owned(),
            timings: "list_interval = \"500ms\"\n".to_owned(),
            clusters: String::new(),
            routes: String::new(),
        }
    }

    /// Where the binary's status server listens (a free port by default).
    #[must_use]
    pub fn status_listen(mut self, addr: std::net::SocketAddr) -> Self {
        self.status_listen = addr.to_string();
        self
    }

    /// Adds lines to `[timings]` (a later key is an error, not an override).
    #[must_use]
    pub fn timings(mut self, lines: &str) -> Self {
        self.timings += lines;
        if !self.timings.ends_with('\n') {
            self.timings.push('\n');
        }
        self
    }

    /// A cluster reached at `server` (`host:http_port`) serving `namespaces`.
    #[must_use]
    pub fn cluster(mut self, id: &str, server: &str, namespaces: &[&str]) -> Self {
        let namespaces: Vec<String> = namespaces.iter().map(|n| format!("\"{n}\"")).collect();
        self.clusters += &format!(
            "[[clusters]]\nid = \"{id}\"\nservers = [\"{server}\"]\nnamespaces = [{}]\n",
            namespaces.join(", ")
        );
        self
    }

    /// A route with the defaults (every namespace, group and service).
    #[must_use]
    pub fn route(self, from: &str, to: &str) -> Self {
        self.route_with(from, to, "")
    }

    /// A route with more keys, e.g. `map_namespaces = { "x" = "y" }`.
    #[must_use]
    pub fn route_with(mut self, from: &str, to: &str, lines: &str) -> Self {
        self.routes += &format!("[[routes]]\nfrom = \"{from}\"\nto = \"{to}\"\n{lines}");
        if !self.routes.ends_with('\n') {
            self.routes.push('\n');
        }
        self
    }

    /// The file's text.
    pub fn text(&self) -> String {
        format!(
            "[agent]\nstatus_listen = \"{}\"\n[timings]\n{}{}{}",
            self.status_listen, self.timings, self.clusters, self.routes
        )
    }

    /// The checked configuration; panics, showing the text, if it is invalid.
    pub fn config(&self) -> nacos_replicator::config::Config {
        let text = self.text();
        match nacos_replicator::config::parse(Path::new("agent.toml"), &text, &|_| None) {
            Ok(c) => c,
            Err(e) => panic!("test config invalid: {e}\n{text}"),
        }
    }
}

/// A loopback address with a port that was free a moment ago.
pub fn free_local_addr() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// A bare HTTP/1.1 GET: status code and body (`None` if nothing answers).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    let raw = http_get_raw(addr, path).await?;
    let code = raw.split(' ').nth(1)?.parse().ok()?;
    Some((
        code,
        raw.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default(),
    ))
}

/// A bare HTTP/1.1 GET: the whole answer, status line and headers included.
pub async fn http_get_raw(addr: std::net::SocketAddr, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: status\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.ok()?;
    Some(raw)
}

/// `n` numbered instances `<net>.1`, `<net>.2`, ... on ports from
/// `base_port`, each with its index in metadata `idx`.
pub fn instances_on(net: &str, n: u16, base_port: u16) -> Vec<Instance> {
    (0..n)
        .map(|i| {
            Instance::new(format!("{net}.{}", i + 1), base_port + i)
                .with_metadata("idx", i.to_string())
        })
        .collect()
}

/// A watcher of every service of `client`'s namespace, on `tasks`, past
/// its first event (which must be [`WatchEvent::Init`]).
///
/// [`WatchEvent::Init`]: nacos_replicator::cluster::watch::WatchEvent::Init
pub async fn watch_all(
    client: &Client,
    config: nacos_replicator::cluster::watch::WatchConfig,
    tasks: &Tasks,
) -> tokio::sync::mpsc::Receiver<nacos_replicator::cluster::watch::WatchEvent> {
    let mut events = nacos_replicator::cluster::watch::watch(
        client.clone(),
        std::sync::Arc::new(|_: &nacos_replicator::model::ServiceKey| true),
        config,
        tasks,
    );
    assert_eq!(
        next_event(&mut events).await,
        nacos_replicator::cluster::watch::WatchEvent::Init,
        "a watch begins with Init"
    );
    events
}

/// The next event, or a panic after [`DEADLINE`].
pub async fn next_event<T>(events: &mut tokio::sync::mpsc::Receiver<T>) -> T {
    tokio::time::timeout(DEADLINE, events.recv())
        .await
        .expect("an event in time")
        .expect("stream open")
}

/// After a watcher's `Init`: the `(group, name)` of every service in the
/// listing, up to its `InitDone` (pushes in between are skipped).
pub async fn read_listing(
    events: &mut tokio::sync::mpsc::Receiver<nacos_replicator::cluster::watch::WatchEvent>,
) -> std::collections::BTreeSet<(String, String)> {
    use nacos_replicator::cluster::watch::WatchEvent;
    let mut listed = std::collections::BTreeSet::new();
    loop {
        match next_event(events).await {
            WatchEvent::InitSnapshot(s) => {
                listed.insert((s.service.group.to_string(), s.service.name.to_string()));
            }
            WatchEvent::InitDone => return listed,
            WatchEvent::Snapshot(_) => {}
            other => panic!("unexpected event inside a listing: {other:?}"),
        }
    }
}
