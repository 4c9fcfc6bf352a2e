//! The end-to-end matrix's pieces: three real regions, import agents (in
//! process or as a child process of the binary), the one convergence checker
//! every case asserts through, and a TCP proxy that can cut a link.
//!
//! Regions are standalone Nacos servers named `a`, `b` and `c`. Tests that
//! leave the servers running share one set ([`shared_regions`]) and isolate
//! themselves by a namespace of their own; tests that stop or restart a
//! server start their own, one such test at a time ([`own_server`]).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use nacos_replicator::agent::{Agent, AgentError};
use nacos_replicator::cluster::{Client, ClientConfig};
use nacos_replicator::config::Config;
use nacos_replicator::model::{ClusterId, Instance, ServiceKey};
use nacos_replicator::reconcile::OriginTags;
use nacos_replicator::runtime::Tasks;
use nacos_replicator::testing::nacos::{NacosServer, ServerOptions};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{AgentToml, addr, fingerprint, unique};

/// The three region ids, in the order [`shared_regions`] returns servers.
pub const REGIONS: [&str; 3] = ["a", "b", "c"];

/// How long the matrix waits for convergence on the shared servers: pushes
/// are debounced by 500 ms, the catalog is polled every 500 ms, and a
/// 2-core CI box runs other tests at the same time.
pub const CONVERGE: Duration = Duration::from_secs(40);

/// Three standalone servers shared by every test that does not stop or
/// restart one, started in parallel on first use. Blocks the calling worker
/// thread only (the rest of the runtime keeps going).
pub async fn shared_regions() -> &'static [NacosServer; 3] {
    static REGIONS: OnceLock<[NacosServer; 3]> = OnceLock::new();
    tokio::task::block_in_place(|| {
        REGIONS.get_or_init(|| {
            let started = std::thread::scope(|s| {
                let starting: Vec<_> = (0..3)
                    .map(|_| s.spawn(|| super::own_server(ServerOptions::default())))
                    .collect();
                starting
                    .into_iter()
                    .map(|t| t.join().expect("a region failed to start"))
                    .collect::<Vec<_>>()
            });
            match <[NacosServer; 3]>::try_from(started) {
                Ok(regions) => regions,
                Err(_) => unreachable!("three were started"),
            }
        })
    })
}

/// Tests that start (and restart) a server of their own do so one at a time:
/// with the three shared servers that keeps at most four JVMs on the box.
static OWN_SERVERS: Semaphore = Semaphore::const_new(1);

/// A server of the test's own, with the permit that keeps the others
/// waiting; hold both until the test ends.
pub async fn own_server() -> (Arc<NacosServer>, SemaphorePermit<'static>) {
    let permit = OWN_SERVERS
        .acquire()
        .await
        .expect("the semaphore is never closed");
    let server = tokio::task::spawn_blocking(|| super::own_server(ServerOptions::default()))
        .await
        .expect("start task");
    (Arc::new(server), permit)
}

/// Runs a blocking harness call (stop, restart, kill) off the runtime's workers.
pub async fn blocking<T: Send + 'static>(server: &Arc<NacosServer>, f: fn(&NacosServer) -> T) -> T {
    let server = server.clone();
    tokio::task::spawn_blocking(move || f(&server))
        .await
        .expect("harness call panicked")
}

/// The replica an agent publishes for `native` from region `origin`.
pub fn tagged(native: &Instance, origin: &str) -> Instance {
    OriginTags::default()
        .tag(native, &ClusterId(origin.into()))
        .expect("the tag fits")
}

/// One service on one region.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Place {
    /// Region id.
    pub cluster: String,
    /// The service there.
    pub service: ServiceKey,
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.cluster, self.service)
    }
}

/// What every region should show, exactly, per service: the checker's input.
#[derive(Debug, Clone)]
pub struct Expected {
    clusters: Vec<String>,
    places: BTreeMap<Place, Vec<Instance>>,
}

impl Expected {
    /// Nothing expected yet, among `clusters` (the mesh [`Expected::natives`] fills).
    pub fn new(clusters: &[&str]) -> Self {
        Self {
            clusters: clusters.iter().map(|c| (*c).to_owned()).collect(),
            places: BTreeMap::new(),
        }
    }

    /// Natives registered at `origin`: as they are there, and once, tagged
    /// with `origin`, in every other cluster of the mesh. An empty list
    /// expects the service to show nothing of `origin`'s anywhere.
    #[must_use]
    pub fn natives(
        self,
        origin: &str,
        namespace: &str,
        group: &str,
        service: &str,
        natives: &[Instance],
    ) -> Self {
        let others: Vec<String> = self
            .clusters
            .iter()
            .filter(|c| *c != origin)
            .cloned()
            .collect();
        let others: Vec<&str> = others.iter().map(String::as_str).collect();
        self.copies(origin, &others, namespace, group, service, natives)
    }

    /// Natives registered at `origin`, copied (tagged) into `into` only.
    #[must_use]
    pub fn copies(
        mut self,
        origin: &str,
        into: &[&str],
        namespace: &str,
        group: &str,
        service: &str,
        natives: &[Instance],
    ) -> Self {
        self = self.at(origin, namespace, group, service, natives);
        let replicas: Vec<Instance> = natives.iter().map(|n| tagged(n, origin)).collect();
        for cluster in into {
            self = self.at(cluster, namespace, group, service, &replicas);
        }
        self
    }

    /// Adds `instances` to what `cluster` should show for the service (and
    /// makes the service checked there even when `instances` is empty).
    #[must_use]
    pub fn at(
        mut self,
        cluster: &str,
        namespace: &str,
        group: &str,
        service: &str,
        instances: &[Instance],
    ) -> Self {
        let place = Place {
            cluster: cluster.to_owned(),
            service: ServiceKey::new(namespace, group, service),
        };
        self.places
            .entry(place)
            .or_default()
            .extend(instances.iter().cloned());
        self
    }

    /// Replaces what `cluster` should show for the service.
    #[must_use]
    pub fn set(
        mut self,
        cluster: &str,
        namespace: &str,
        group: &str,
        service: &str,
        instances: &[Instance],
    ) -> Self {
        let place = Place {
            cluster: cluster.to_owned(),
            service: ServiceKey::new(namespace, group, service),
        };
        self.places.insert(place, instances.to_vec());
        self
    }

    /// The expectations of `clusters` only (say, while another is down).
    #[must_use]
    pub fn only(&self, clusters: &[&str]) -> Self {
        let places = self
            .places
            .iter()
            .filter(|(p, _)| clusters.contains(&p.cluster.as_str()));
        Self {
            clusters: self.clusters.clone(),
            places: places.map(|(p, i)| (p.clone(), i.clone())).collect(),
        }
    }

    /// Every place checked, with its expected fingerprint.
    fn wanted(&self) -> BTreeMap<&Place, Vec<String>> {
        self.places
            .iter()
            .map(|(p, i)| (p, fingerprint(i)))
            .collect()
    }
}

/// What one read of every place found: fingerprints, or why the read failed.
pub type Seen = BTreeMap<Place, Result<Vec<String>, String>>;

/// The one convergence checker: reads every region through clients of its
/// own (one per region and namespace, opened on first use) and compares
/// fingerprints with an [`Expected`].
pub struct Observer {
    addrs: BTreeMap<String, String>,
    tasks: Tasks,
    readers: Mutex<BTreeMap<(String, String), Client>>,
}

impl Observer {
    /// Reads the regions `(id, host:http_port)`; stops with `tasks`.
    pub fn new(regions: &[(&str, String)], tasks: &Tasks) -> Self {
        Self {
            addrs: regions
                .iter()
                .map(|(id, a)| ((*id).to_owned(), a.clone()))
                .collect(),
            tasks: tasks.child(),
            readers: Mutex::new(BTreeMap::new()),
        }
    }

    fn reader(&self, cluster: &str, namespace: &str) -> Result<Client, String> {
        let mut readers = self.readers.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (cluster.to_owned(), namespace.to_owned());
        if let Some(c) = readers.get(&key) {
            return Ok(c.clone());
        }
        let server = self
            .addrs
            .get(cluster)
            .ok_or_else(|| format!("no region {cluster}"))?;
        let mut config = ClientConfig::new(
            format!("observer-{cluster}"),
            vec![server.clone()],
            namespace,
        );
        config.reconnect_max = Duration::from_secs(1);
        let client = Client::start(config, &self.tasks).map_err(|e| e.to_string())?;
        readers.insert(key, client.clone());
        Ok(client)
    }

    /// One read of every place `expected` names.
    pub async fn read(&self, expected: &Expected) -> Seen {
        let mut seen = Seen::new();
        for place in expected.places.keys() {
            let got = match self.reader(&place.cluster, &place.service.namespace) {
                Ok(client) => client
                    .query(&place.service.group, &place.service.name)
                    .await
                    .map(|s| fingerprint(&s.instances))
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            seen.insert(place.clone(), got);
        }
        seen
    }

    /// Whether one read shows exactly what is expected; otherwise the report.
    pub async fn check(&self, expected: &Expected) -> Result<(), String> {
        let seen = self.read(expected).await;
        match mismatches(expected, &seen) {
            m if m.is_empty() => Ok(()),
            m => Err(m),
        }
    }

    /// Waits until every place shows exactly what is expected and returns
    /// how long that took; panics after `deadline` with, per place, what was
    /// expected and what was last seen.
    pub async fn converge(&self, expected: &Expected, deadline: Duration, what: &str) -> Duration {
        let started = Instant::now();
        loop {
            let seen = self.read(expected).await;
            let report = mismatches(expected, &seen);
            if report.is_empty() {
                return started.elapsed();
            }
            if started.elapsed() > deadline {
                panic!("{what}: not converged after {deadline:?}:\n{report}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Per place that differs: expected vs seen. Empty when all match.
fn mismatches(expected: &Expected, seen: &Seen) -> String {
    let mut report = String::new();
    for (place, want) in expected.wanted() {
        let got = seen
            .get(place)
            .cloned()
            .unwrap_or_else(|| Err("not read".into()));
        if got.as_ref() != Ok(&want) {
            report += &format!("  {place}\n    expected {want:?}\n    seen     {got:?}\n");
        }
    }
    report
}

/// The agent for region `into` in the import model: a route from every
/// other region into it. `regions` are `(id, host:http_port)`; every
/// region serves `namespace`.
pub fn import_agent(
    into: &str,
    regions: &[(&str, String)],
    namespace: &str,
    timings: &str,
) -> AgentToml {
    let mut toml = AgentToml::new().timings(timings);
    for (id, server) in regions {
        toml = toml.cluster(id, server, &[namespace]);
    }
    for (from, _) in regions.iter().filter(|(id, _)| *id != into) {
        toml = toml.route(from, into);
    }
    toml
}

/// An agent running in this test's runtime; stopped when dropped.
pub struct RunningAgent {
    token: CancellationToken,
    reloader: nacos_replicator::agent::Reloader,
    task: Option<JoinHandle<Result<(), AgentError>>>,
    events: Option<tokio::sync::broadcast::Receiver<nacos_replicator::telemetry::Event>>,
}

impl RunningAgent {
    /// Starts `config`'s agent.
    pub fn spawn(config: Config) -> Self {
        init_logs();
        let token = CancellationToken::new();
        let agent = Agent::new(config);
        // Subscribed before it runs: no event of its is missed.
        let events = Some(agent.events());
        let reloader = agent.reloader();
        let task = tokio::spawn(agent.run(token.clone()));
        Self {
            token,
            reloader,
            task: Some(task),
            events,
        }
    }

    /// Its live-reload handle.
    pub fn reloader(&self) -> nacos_replicator::agent::Reloader {
        self.reloader.clone()
    }

    /// Waits until this agent's destination has acknowledged a set of
    /// `replicas` replicas for service `name` (from this agent, not another).
    pub async fn wait_replicated(&mut self, name: &str, replicas: usize) {
        use nacos_replicator::telemetry::Event;
        use tokio::sync::broadcast::error::RecvError;
        let events = self.events.as_mut().expect("events subscribed at spawn");
        let waited = tokio::time::timeout(super::DEADLINE, async {
            loop {
                match events.recv().await {
                    Ok(Event::Replicated {
                        service,
                        replicas: n,
                        ..
                    }) if *service.name == *name && n == replicas => return,
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => panic!("the agent stopped"),
                }
            }
        });
        waited
            .await
            .unwrap_or_else(|_| panic!("no set of {replicas} replicas of {name} acknowledged"));
    }

    /// Stops it and waits until it has closed its connections; panics if it
    /// had failed.
    pub async fn stop(mut self) {
        self.token.cancel();
        if let Some(task) = self.task.take() {
            task.await
                .expect("the agent task panicked")
                .expect("the agent failed");
        }
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// In-process agents log through the test writer (shown for failing tests)
/// at the level `RUST_LOG` asks for, errors only by default.
fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::from_default_env();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// The agent binary (`run --config FILE`) as a child process, its log in a
/// temporary directory. Killed (SIGKILL) when dropped.
pub struct AgentProcess {
    child: Child,
    dir: tempfile::TempDir,
}

impl AgentProcess {
    /// Writes `toml` to a file and starts the binary on it.
    pub fn start(toml: &AgentToml) -> Self {
        Self::start_with(toml, &[])
    }

    /// Like [`AgentProcess::start`], with more arguments to `run`.
    pub fn start_with(toml: &AgentToml, args: &[&str]) -> Self {
        let binary = std::path::Path::new(env!("CARGO_BIN_EXE_nacos-replicator"));
        Self::start_binary(binary, toml, args)
    }

    /// [`start_with`](Self::start_with) with another build of the binary
    /// (the image's static one).
    pub fn start_binary(binary: &std::path::Path, toml: &AgentToml, args: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("e2e-agent-")
            .tempdir()
            .expect("temp dir");
        let config = dir.path().join("agent.toml");
        std::fs::write(&config, toml.text()).expect("write the config");
        let log = std::fs::File::create(dir.path().join("agent.log")).expect("create the log");
        let child = Command::new(binary)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .args(args)
            .env("RUST_LOG", "info,h2=warn,hyper=warn,tower=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the agent binary");
        Self { child, dir }
    }

    /// `kill -9`: no shutdown code runs; the kernel closes its sockets.
    pub fn kill9(&mut self) -> ExitStatus {
        self.child.kill().expect("SIGKILL the agent");
        self.child.wait().expect("reap the agent")
    }

    /// Sends `SIG<name>` (e.g. `"TERM"`); whether `kill` succeeded.
    pub fn signal(&self, name: &str) -> bool {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args([format!("-{name}"), pid])
            .status()
            .is_ok_and(|s| s.success())
    }

    /// SIGTERM, then waits (up to [`DEADLINE`](super::DEADLINE)) for it to
    /// exit; `None` if it did not.
    pub async fn terminate(&mut self) -> Option<ExitStatus> {
        assert!(self.signal("TERM"), "kill -TERM {}", self.child.id());
        let started = std::time::Instant::now();
        while started.elapsed() < super::DEADLINE {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            // Polling a child's exit: there is no async wait on std's Child.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Whether it is still running (not exited on its own).
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Replaces its configuration file (no signal sent).
    pub fn write_config(&self, text: &str) {
        std::fs::write(self.dir.path().join("agent.toml"), text).expect("write the config");
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A test world over some regions: a namespace of its own created on every
/// region, an application client per region (publishing natives), and the
/// observer. Everything stops when it is dropped.
pub struct World {
    /// The test's namespace.
    pub ns: String,
    /// `(id, host:http_port)` of each region.
    pub regions: Vec<(&'static str, String)>,
    /// Reads every region.
    pub observer: Observer,
    apps: BTreeMap<&'static str, Client>,
    tasks: Tasks,
}

impl World {
    /// Creates a namespace named after `prefix` on every region of `servers`.
    pub async fn new(servers: &[(&'static str, &NacosServer)], prefix: &str) -> Self {
        let ns = unique(prefix);
        for (_, server) in servers {
            create_namespace(server, &ns);
        }
        let regions: Vec<(&'static str, String)> =
            servers.iter().map(|(id, s)| (*id, addr(s))).collect();
        Self::over(regions, ns)
    }

    /// Over regions reached at the given addresses, in an existing namespace.
    pub fn over(regions: Vec<(&'static str, String)>, ns: String) -> Self {
        let tasks = Tasks::default();
        let observer = Observer::new(&regions, &tasks);
        let mut apps = BTreeMap::new();
        for (id, server) in &regions {
            let mut config =
                ClientConfig::new(format!("app-{id}"), vec![server.clone()], ns.clone());
            config.reconnect_max = Duration::from_secs(1);
            apps.insert(
                *id,
                Client::start(config, &tasks).expect("valid client config"),
            );
        }
        Self {
            ns,
            regions,
            observer,
            apps,
            tasks,
        }
    }

    /// The application client of region `id` (its natives live as long as it).
    pub fn app(&self, id: &str) -> &Client {
        self.apps
            .get(id)
            .unwrap_or_else(|| panic!("no region {id}"))
    }

    /// Publishes the full set of natives of one service of region `id`.
    pub async fn publish(&self, id: &str, group: &str, service: &str, natives: &[Instance]) {
        let app = self.app(id);
        app.wait_connected(super::DEADLINE)
            .await
            .expect("the application connects");
        app.publish(group, service, natives.to_vec())
            .await
            .expect("publish natives");
    }

    /// The import agent for region `into` over this world's regions.
    pub fn import_agent(&self, into: &str, timings: &str) -> AgentToml {
        import_agent(into, &self.regions, &self.ns, timings)
    }

    /// An expectation over this world's regions.
    pub fn expect(&self) -> Expected {
        let ids: Vec<&str> = self.regions.iter().map(|(id, _)| *id).collect();
        Expected::new(&ids)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.tasks.token().cancel();
    }
}

/// Creates namespace `ns` on `server` (a quick local HTTP call).
///
/// The server keeps namespaces in its embedded Derby database, which
/// answers 500 "A lock could not be obtained within the time requested"
/// when two creations overlap (seen with two tests starting at once): so
/// this process creates one namespace at a time, and retries that answer.
pub fn create_namespace(server: &NacosServer, ns: &str) {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let mut attempt = 1;
    loop {
        match server.create_namespace_http(ns) {
            Ok(()) => return,
            Err(e) if attempt < 5 && e.to_string().contains("lock could not be obtained") => {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("create namespace {ns} (attempt {attempt}): {e}"),
        }
    }
}

/// Prints a measured figure so that a `--nocapture` run can collect them.
pub fn record(what: &str, took: Duration) {
    eprintln!("e2e figure: {what}: {} ms", took.as_millis());
}

/// A TCP proxy in front of one Nacos server, exposing the port pair a
/// client dials (`P` for HTTP, `P + 1000` for gRPC), that the test can cut,
/// silence and restore.
///
/// [`TcpProxy::cut`] closes every live connection and, until
/// [`TcpProxy::restore`], closes each new one as soon as it is accepted: the
/// client learns at once that the link is gone. [`TcpProxy::silence`] is a
/// black hole, as a WAN link that drops packets: connections stay open, new
/// ones are accepted, and nothing passes either way, so the client can only
/// notice by a timeout.
pub struct TcpProxy {
    port: u16,
    state: Arc<Mutex<ProxyState>>,
    stop: CancellationToken,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Open,
    Cut,
    Silent,
}

struct ProxyState {
    link: Link,
    /// Cancelled on a cut or silence: ends forwarding on every connection
    /// opened before it.
    live: CancellationToken,
    /// Cancelled on restore (and drop): closes the connections a silenced
    /// link holds open.
    release: CancellationToken,
}

impl TcpProxy {
    /// Forwards a free port pair to `server`'s HTTP and gRPC ports.
    pub async fn start(server: &NacosServer) -> Self {
        let (http, grpc) = free_port_pair();
        let port = http.local_addr().expect("addr").port();
        let state = Arc::new(Mutex::new(ProxyState {
            link: Link::Open,
            live: CancellationToken::new(),
            release: CancellationToken::new(),
        }));
        let stop = CancellationToken::new();
        for (listener, target) in [(http, server.http_port()), (grpc, server.grpc_port())] {
            listener.set_nonblocking(true).expect("nonblocking");
            let listener = TcpListener::from_std(listener).expect("tokio listener");
            let target = SocketAddr::from(([127, 0, 0, 1], target));
            tokio::spawn(forward(listener, target, state.clone(), stop.clone()));
        }
        Self { port, state, stop }
    }

    /// `host:http_port` of the proxy, as a cluster's `servers` entry.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Closes every live connection and refuses new ones.
    pub fn cut(&self) {
        self.set(Link::Cut);
    }

    /// Passes nothing any more, closing nothing: a black hole.
    pub fn silence(&self) {
        self.set(Link::Silent);
    }

    /// Forwards new connections again (and closes those a silence held).
    pub fn restore(&self) {
        self.set(Link::Open);
    }

    fn set(&self, link: Link) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.link = link;
        if link == Link::Open {
            state.release.cancel();
            state.release = CancellationToken::new();
        } else {
            state.live.cancel();
            state.live = CancellationToken::new();
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.cancel();
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.live.cancel();
        state.release.cancel();
    }
}

/// Two loopback listeners on ports `P` and `P + 1000`.
fn free_port_pair() -> (std::net::TcpListener, std::net::TcpListener) {
    for _ in 0..100 {
        let http = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = http.local_addr().expect("addr").port();
        let Some(grpc_port) = port.checked_add(1000) else {
            continue;
        };
        if let Ok(grpc) = std::net::TcpListener::bind(("127.0.0.1", grpc_port)) {
            return (http, grpc);
        }
    }
    panic!("no free port pair P, P+1000 after 100 tries");
}

/// While the link is silent, the token that ends holding a connection open.
fn held_open(state: &Mutex<ProxyState>) -> Option<CancellationToken> {
    let state = state.lock().unwrap_or_else(PoisonError::into_inner);
    (state.link == Link::Silent).then(|| state.release.clone())
}

async fn forward(
    listener: TcpListener,
    target: SocketAddr,
    state: Arc<Mutex<ProxyState>>,
    stop: CancellationToken,
) {
    loop {
        let inbound = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((inbound, _)) => inbound,
                Err(_) => continue,
            },
        };
        // Checked and taken under the lock a cut takes: a connection is
        // either refused, held silent, or forwarded under the token the
        // next cut or silence cancels.
        let (link, live) = {
            let state = state.lock().unwrap_or_else(PoisonError::into_inner);
            (state.link, state.live.clone())
        };
        if link == Link::Cut {
            continue; // drops `inbound`: closed at once
        }
        let state = state.clone();
        tokio::spawn(async move {
            let mut inbound = inbound;
            let mut outbound = None;
            if link == Link::Open {
                tokio::select! {
                    () = live.cancelled() => {}
                    connected = TcpStream::connect(target) => outbound = connected.ok(),
                }
                if let Some(out) = outbound.as_mut() {
                    tokio::select! {
                        () = live.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, out) => {}
                    }
                }
            }
            // A silent link keeps both ends open, passing nothing, until restored.
            if let Some(release) = held_open(&state) {
                release.cancelled().await;
            }
        });
    }
}
