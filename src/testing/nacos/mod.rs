//! Real Nacos servers for integration tests: both lines we test against, 2.3 and 3.1
//! ([`ServerLine`]).
//!
//! Owns: resolving the server's classpath with Maven ([`Distribution`]); running one standalone
//! server per [`NacosServer`] as a supervised `java` process with its own free ports and its own
//! data directory; waiting until it is ready; stopping, killing and restarting it; and a small
//! client for the server's HTTP API (the v1 open API on 2.x, the v3 admin API on 3.x). That
//! client shares no code with the replicator, so a test can seed a registry, and check what the
//! replicator wrote, through code we did not write for the replicator.
//!
//! Must not: fall back to anything when Maven or Java is missing or fails (the error says what
//! to do), read environment variables (callers pass paths and options), or let `java` outlive
//! the test process.
//!
//! # How `java` is tied to the test process
//!
//! `java` is started by a small `sh` supervisor, which is our child. The supervisor runs java in
//! the background and reads commands (`term`, `kill`) from its stdin, a pipe whose only writer
//! is this process (std opens its pipes close-on-exec, so no other child inherits the writer).
//! When the read reports end-of-file, this process has dropped the server or has died: exit,
//! panic, SIGKILL; the kernel closes the pipe in every case, also for a server kept in a
//! `static`, which is never dropped. The supervisor then kills java with SIGKILL and deletes
//! the data directory (no destructor of ours may run to do it). It exits with java's status
//! (128 + the signal number when java was killed), so we learn how java ended.
//!
//! # Facts about the server, measured with 2.3.2 on Java 17
//!
//! - Ports: HTTP `P` (context `/nacos`), SDK gRPC `P + 1000`, cluster gRPC `P + 1001`, JRaft
//!   `P - 1000`. With `server.address=127.0.0.1` only HTTP binds to loopback; both gRPC servers
//!   and JRaft always bind to every interface (their bind address is not configurable), so the
//!   port picker checks that each port is free on every interface.
//! - Logs: Nacos writes its own logs (`naming-push.log`...) only when `nacos.logs.path` is set;
//!   Derby's `derby.log` and Tomcat's work directory go to the working directory, RocksDB's
//!   native library and Tomcat's docbase to `java.io.tmpdir`: all point into the data
//!   directory here, so nothing is left in `/tmp`.
//! - Auth: 2.3.2 seeds the user `nacos` / `nacos` (2.4.0+ does not, and offers
//!   `POST /nacos/v1/auth/users/admin` instead, which answers 404 on 2.3.2). Logins are served
//!   from a user cache filled 5 s after start (then every 15 s): until then even the seeded
//!   admin gets HTTP 500 "User nacos not found", so a start with auth waits until the admin can
//!   log in. A wrong password answers HTTP 403 "user not found!". Requests that carry the server
//!   identity header (key and value from [`AuthOptions`]) skip auth; the readiness probe uses
//!   it.
//! - The v1 instance list is served from a view that events update: a deregistration shows up
//!   a moment later, not in the very next list. Poll with a deadline.
//! - An ephemeral instance registered over HTTP and never renewed by v1 heartbeats turns
//!   unhealthy after about 15 s and disappears after about 30 s. A persistent instance
//!   (`ephemeral=false`) stays until deregistered (and across restarts: it lives in the data
//!   directory's JRaft log), but the server TCP-probes its `ip:port` every few seconds and
//!   reports `healthy=false` while nothing listens there. Hence [`HttpInstance::new`]
//!   registers persistent instances, which must use a loopback address: tests may send traffic
//!   nowhere else. Point one at a port that listens (the server's own HTTP port will do) to
//!   keep it healthy.
//! - Java 17 starts 2.3.2 without `--add-opens`; we pass the ones that later Nacos start
//!   scripts add for 17+ anyway, so that reflective code paths we did not exercise do not fail.
//!
//! # Layout
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | [`NacosServer`]: start, ports, paths, stop, kill, restart, drop |
//! | `lifecycle.rs` | java's arguments; waiting until ready, the admin logs in, ports close |
//! | `http.rs` | the server's HTTP API: requests, helpers, [`HttpInstance`], [`ListedInstance`] |
//! | `distribution.rs` | [`ServerLine`], [`Distribution`]: Maven, the cache, the 3.x launcher |
//! | `options.rs` | [`ServerOptions`], [`AuthOptions`] |
//! | `ports.rs` | the port block: picking, reserving and probing a server's ports |
//! | `supervisor.rs` | the `sh` supervisor and, through it, java |
//! | `error.rs` | [`HarnessError`] |
//! | `util.rs` | small helpers: log tails, quoting, hashing, randomness, Base64 |

mod distribution;
mod error;
mod http;
mod lifecycle;
mod options;
mod ports;
mod supervisor;
mod util;

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

pub use distribution::{Distribution, ServerLine};
pub use error::HarnessError;
pub use http::{HttpInstance, ListedInstance};
pub use options::{AuthOptions, ServerOptions};

use crate::runtime::lock;
use error::io_error;
use http::http_agent;
use lifecycle::check_java;
use ports::PortBlock;
use supervisor::Supervised;

/// The user that [`NacosServer::admin_credentials`] names on a server with auth on.
pub const ADMIN_USERNAME: &str = "nacos";
/// The password of [`ADMIN_USERNAME`]: the one 2.3.2 seeds, and the one we set on servers
/// that seed no user.
pub const ADMIN_PASSWORD: &str = "nacos";
/// How many times `start` retries when java lost a race for a port it had found free.
const START_ATTEMPTS: u32 = 3;

/// One standalone Nacos server: a `java` process with its own ports and data directory.
///
/// Every method takes `&self`, so a server can be shared (e.g. in a `static` or an `Arc`) and
/// still be stopped or restarted. Lifecycle calls are serialized by a mutex (so is
/// [`Self::java_pid`], which waits for a restart to finish); an HTTP helper called while the
/// server is down fails with [`HarnessError::Stopped`] or a connection error instead.
///
/// Dropping it kills java (SIGKILL) and waits for it, then deletes the data directory. Java
/// also dies when the test process dies, however it dies (see the module docs).
pub struct NacosServer {
    classpath: String,
    main_class: String,
    major: u32,
    opts: ServerOptions,
    /// The token secret and server identity: the options' when auth is on; generated on a 3.x
    /// server with auth off, which needs them all the same. The harness's own HTTP calls carry
    /// the identity header, so they need no user (3.x guards its admin API even with auth off).
    secrets: Option<AuthOptions>,
    // Field order matters for Drop: java is killed in `drop`, then `ports` are released and
    // `data_dir` is deleted.
    state: Mutex<Lifecycle>,
    /// Mirrors `state.process.is_some()`, readable without waiting for a restart.
    running: AtomicBool,
    ports: PortBlock,
    data_dir: tempfile::TempDir,
    log_path: PathBuf,
    http: ureq::Agent,
    probe: ureq::Agent,
    token: Mutex<Option<String>>,
}

/// What changes as the server stops and starts.
#[derive(Debug, Default)]
struct Lifecycle {
    /// `None` while stopped.
    process: Option<Supervised>,
    last_start: Duration,
    starts: u32,
}

impl fmt::Debug for NacosServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NacosServer")
            .field("http_port", &self.ports.http)
            .field("grpc_port", &self.ports.grpc())
            .field("data_dir", &self.data_dir.path())
            .field("auth", &self.opts.auth.is_some())
            .finish_non_exhaustive()
    }
}

impl NacosServer {
    /// Starts a server and waits until it is ready: its HTTP API answers 200 and its gRPC port
    /// accepts connections.
    ///
    /// Picks a random block of five free ports (P-1000, P, P+1 for 3.x's console, P+1000,
    /// P+1001; starting again on other ports if java loses a race for one), makes a fresh data
    /// directory (`nacos.home`, also java's working and temporary directory), and logs java's
    /// output to [`Self::log_path`] and Nacos' own logs to [`Self::log_dir`] there. With auth
    /// on, also makes sure the admin user exists and logs it in. If the start fails, java is
    /// killed but the data directory is kept (without its bulky `data/`), so that the log the
    /// error quotes can be read in full. The data directory is made in the system's temporary
    /// directory.
    pub fn start(dist: &Distribution, opts: ServerOptions) -> Result<Self, HarnessError> {
        opts.validate()?;
        check_java(&opts.java)?;
        let mut attempt = 1;
        loop {
            let ports = PortBlock::reserve()?;
            let data_dir = tempfile::Builder::new()
                .prefix("nacos-harness-")
                .tempdir()
                .map_err(io_error(
                    "creating a data directory in",
                    &std::env::temp_dir(),
                ))?;
            for sub in ["tmp", "logs"] {
                let dir = data_dir.path().join(sub);
                fs::create_dir_all(&dir).map_err(io_error("creating", &dir))?;
            }
            let log_path = data_dir.path().join("java.log");
            let secrets = match (&opts.auth, dist.major()) {
                (Some(auth), _) => Some(auth.clone()),
                (None, major) if major >= 3 => Some(AuthOptions::generate()),
                (None, _) => None,
            };
            let mut server = Self {
                classpath: dist.classpath.clone(),
                main_class: dist.main_class.clone(),
                major: dist.major(),
                opts: opts.clone(),
                secrets,
                state: Mutex::new(Lifecycle::default()),
                running: AtomicBool::new(false),
                ports,
                data_dir,
                log_path,
                http: http_agent(Duration::from_secs(10)),
                probe: http_agent(Duration::from_secs(2)),
                token: Mutex::new(None),
            };
            let booted = server.boot(&mut server.lifecycle());
            match booted {
                Ok(()) => return Ok(server),
                Err(err) if err.is_port_clash() && attempt < START_ATTEMPTS => attempt += 1,
                Err(err) => {
                    server.keep_logs();
                    return Err(err);
                }
            }
        }
    }

    /// The HTTP port (`server.port`, context `/nacos`).
    pub fn http_port(&self) -> u16 {
        self.ports.http
    }

    /// The SDK gRPC port: HTTP + 1000.
    pub fn grpc_port(&self) -> u16 {
        self.ports.grpc()
    }

    /// The cluster (server-to-server) gRPC port: HTTP + 1001.
    pub fn cluster_grpc_port(&self) -> u16 {
        self.ports.cluster_grpc()
    }

    /// The JRaft port: HTTP - 1000.
    pub fn raft_port(&self) -> u16 {
        self.ports.raft()
    }

    /// All five ports: JRaft, HTTP, console (bound by 3.x only), SDK gRPC, cluster gRPC.
    pub fn ports(&self) -> [u16; 5] {
        self.ports.all()
    }

    /// The console's port on 3.x (`nacos.console.port`, no context path): HTTP + 1.
    pub fn console_port(&self) -> u16 {
        self.ports.console()
    }

    /// The server's major version (2 or 3).
    pub fn major(&self) -> u32 {
        self.major
    }

    /// The SDK gRPC address, `127.0.0.1:PORT`.
    pub fn grpc_addr(&self) -> String {
        format!("127.0.0.1:{}", self.grpc_port())
    }

    /// The HTTP API's base URL, `http://127.0.0.1:PORT/nacos` (no trailing slash).
    pub fn http_base(&self) -> String {
        format!("http://127.0.0.1:{}/nacos", self.ports.http)
    }

    /// The file with java's stdout and stderr (startup banner, Spring's log, crashes), in the
    /// data directory; restarts append to it.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Nacos' own log directory (`nacos.logs.path`): `naming-push.log`, `naming-server.log`,
    /// `remote-digest.log` and the rest.
    pub fn log_dir(&self) -> PathBuf {
        self.data_dir.path().join("logs")
    }

    /// The data directory (`nacos.home`); kept by restarts, deleted on drop.
    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    /// Java's process id, while it runs.
    pub fn java_pid(&self) -> Option<u32> {
        self.lifecycle()
            .process
            .as_ref()
            .map(|process| process.java_pid)
    }

    /// Whether java runs (it may still be starting during a concurrent restart).
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    /// Java's resident memory in bytes (Linux `/proc`), while it runs.
    pub fn java_rss_bytes(&self) -> Option<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.java_pid()?)).ok()?;
        let kib = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))?;
        let kib: u64 = kib.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kib * 1024)
    }

    /// How long the last successful start or restart took, from spawning java to ready.
    pub fn last_start_duration(&self) -> Duration {
        self.lifecycle().last_start
    }

    /// Whether auth is on.
    pub fn auth_enabled(&self) -> bool {
        self.opts.auth.is_some()
    }

    /// The admin's user name and password, `(ADMIN_USERNAME, ADMIN_PASSWORD)`, when auth is
    /// on; `None` otherwise.
    pub fn admin_credentials(&self) -> Option<(String, String)> {
        self.opts
            .auth
            .as_ref()
            .map(|_| (ADMIN_USERNAME.to_owned(), ADMIN_PASSWORD.to_owned()))
    }

    /// Stops java gracefully (SIGTERM, then SIGKILL after [`ServerOptions::stop_timeout`]) and
    /// waits until all five ports refuse connections. The ports stay reserved and the data
    /// directory stays, for [`Self::restart`]. Does nothing if already stopped.
    pub fn stop(&self) -> Result<(), HarnessError> {
        self.stop_locked(&mut self.lifecycle())
    }

    /// Kills java at once (SIGKILL: no shutdown hooks run, as in a crash) and waits until all
    /// five ports refuse connections. Otherwise like [`Self::stop`].
    pub fn kill_hard(&self) -> Result<(), HarnessError> {
        let mut state = self.lifecycle();
        if let Some(mut process) = state.process.take() {
            self.running.store(false, Ordering::SeqCst);
            process.kill_and_wait();
        }
        self.wait_ports_closed()
    }

    /// Stops the server gracefully if it runs, then starts it again on the same ports with
    /// the same data directory (so persistent instances, namespaces and users survive), and
    /// waits until it is ready. Tokens issued before stay valid.
    pub fn restart(&self) -> Result<(), HarnessError> {
        let mut state = self.lifecycle();
        self.stop_locked(&mut state)?;
        self.boot(&mut state)
    }

    fn lifecycle(&self) -> MutexGuard<'_, Lifecycle> {
        lock(&self.state)
    }
}

impl Drop for NacosServer {
    fn drop(&mut self) {
        // Kill before the fields drop: the ports are released and the directory deleted after.
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Some(mut process) = state.process.take() {
            self.running.store(false, Ordering::SeqCst);
            process.finish();
        }
    }
}
