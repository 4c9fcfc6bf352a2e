//! Real Nacos 2.x servers for integration tests.
//!
//! Owns: resolving the server's classpath with Maven ([`Distribution`]); running one standalone
//! server per [`NacosServer`] as a supervised `java` process with its own free ports and its own
//! data directory; waiting until it is ready; stopping, killing and restarting it; and a small
//! client for the server's HTTP v1 open API. That client shares no code with the replicator, so
//! a test can seed a registry, and check what the replicator wrote, through code we did not
//! write for the replicator.
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

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

/// The user that [`NacosServer::admin_credentials`] names on a server with auth on.
pub const ADMIN_USERNAME: &str = "nacos";
/// The password of [`ADMIN_USERNAME`]: the one 2.3.2 seeds, and the one we set on servers
/// that seed no user.
pub const ADMIN_PASSWORD: &str = "nacos";

/// HTTP ports are drawn from here. Every port of a block (`P - 1000 ..= P + 1001`) stays in
/// 20000..=32001: below Linux's ephemeral range (32768+), where outgoing connections take their
/// local ports, and clear of Nacos' defaults (7848/8848/9848/9849) and of a developer's server
/// on 17848/18848/19848/19849.
const HTTP_PORT_RANGE: std::ops::Range<u16> = 21_000..31_000;
/// How many random port blocks to try before giving up.
const PORT_ATTEMPTS: u32 = 40;
/// How many times `start` retries when java lost a race for a port it had found free.
const START_ATTEMPTS: u32 = 3;
/// The longest Maven may take to resolve the server (a cold `~/.m2` needs about a minute).
const MAVEN_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// How long the admin may take to be able to log in once the server is ready (its user cache
/// fills 5 s after start).
const ADMIN_LOGIN_TIMEOUT: Duration = Duration::from_secs(45);
/// How long to wait for the ports to close once java has exited.
const PORTS_CLOSE_TIMEOUT: Duration = Duration::from_secs(15);
/// How often readiness and exit are polled.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Lines of a log quoted in an error.
const LOG_TAIL_LINES: usize = 40;
/// Bytes of an HTTP body quoted in an error.
const BODY_QUOTE_BYTES: usize = 2048;
/// The 2.x server's main class (module `nacos-console`).
const MAIN_CLASS: &str = "com.alibaba.nacos.Nacos";
/// A server directory (the pom's) holding this file is started through it: 3.x, whose
/// republished modules lack upstream's bootstrap (see `testing/nacos-3.1/`).
const LAUNCHER_SOURCE: &str = "NacosLauncher.java";
/// The launcher's class, in the default package.
const LAUNCHER_CLASS: &str = "NacosLauncher";
/// The properties file a 3.x server needs on its classpath, beside the launcher's source.
const LAUNCHER_PROPERTIES: &str = "application.properties";

/// JVM flags for a light server: several may run at once on a 2-core CI machine.
const JVM_FLAGS: &[&str] = &[
    // One GC thread and the smallest footprint; pauses do not matter here.
    "-XX:+UseSerialGC",
    // C1 only: starts faster and spends far less CPU compiling; peak speed does not matter.
    "-XX:TieredStopAtLevel=1",
    "-XX:ReservedCodeCacheSize=64m",
    "-Xss512k",
    // No /tmp/hsperfdata_* files.
    "-XX:-UsePerfData",
    // A server out of memory fails the test at once instead of limping on.
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
    "--add-opens=java.base/java.lang=ALL-UNNAMED",
    "--add-opens=java.base/java.lang.reflect=ALL-UNNAMED",
    "--add-opens=java.base/java.util=ALL-UNNAMED",
];

/// The supervisor: `sh -c SUPERVISOR nacos-supervisor DATA_DIR JAVA ARGS...`. See the module
/// docs.
///
/// fd 3 keeps the command pipe for the watcher; java gets neither it nor our stdout (the pid
/// line), and writes to the supervisor's stderr, the log file. A non-interactive shell gives a
/// background job /dev/null as stdin, so the watcher reads fd 3 explicitly.
///
/// When the pipe closes (our process dropped the server or died), the watcher marks the data
/// directory for removal (unless told `keep`) and kills java; the supervisor removes a marked
/// directory once java is gone. That cleans up after servers kept in a `static` or left behind
/// by a killed test, which nothing in our process can remove. The supervisor ignores SIGINT and
/// SIGHUP, so that a Ctrl-C in the terminal ends the test process but not the clean-up (java,
/// a background job, ignores them anyway; SIGTERM stays for `stop`).
const SUPERVISOR: &str = r#"
dir=$1
shift
trap '' INT HUP
exec 3<&0 </dev/null
"$@" 3<&- >&2 &
java=$!
echo "$java"
exec >/dev/null
(
  keep=0
  while IFS= read -r cmd <&3; do
    case "$cmd" in
      term) kill -TERM "$java" 2>/dev/null ;;
      kill) kill -KILL "$java" 2>/dev/null ;;
      keep) keep=1 ;;
    esac
  done
  [ "$keep" = 1 ] || : >"$dir/.owner-gone"
  kill -KILL "$java" 2>/dev/null
) &
watcher=$!
exec 3<&-
wait "$java"
status=$?
case "$dir" in
  */nacos-harness-*) [ -e "$dir/.owner-gone" ] && rm -rf "$dir" ;;
esac
kill "$watcher" 2>/dev/null
exit "$status"
"#;

/// Everything that can go wrong while resolving, running or talking to a Nacos server.
///
/// Each message says what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HarnessError {
    /// A file operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What we were doing, e.g. "reading the Maven pom".
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `mvn` could not be started.
    #[error(
        "could not run `mvn` to resolve the Nacos server: {source}; install Maven 3.8 or newer \
         (e.g. `apt-get install maven`) so that `mvn` is on PATH"
    )]
    MavenNotFound {
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Maven ran and failed.
    #[error(
        "Maven failed to resolve the Nacos server from {pom} ({status}); check the pom and that \
         Maven Central is reachable, then run the tests again. Last lines of {log}:\n{tail}"
    )]
    MavenFailed {
        /// The pom Maven was given.
        pom: PathBuf,
        /// How Maven exited.
        status: String,
        /// Maven's full output.
        log: PathBuf,
        /// The last lines of that output.
        tail: String,
    },
    /// Maven did not finish in time and was killed.
    #[error(
        "Maven did not resolve the Nacos server from {pom} within {timeout:?} and was killed; \
         check the network to Maven Central. Last lines of {log}:\n{tail}"
    )]
    MavenTimedOut {
        /// The pom Maven was given.
        pom: PathBuf,
        /// The time Maven had.
        timeout: Duration,
        /// Maven's full output.
        log: PathBuf,
        /// The last lines of that output.
        tail: String,
    },
    /// Maven succeeded but its classpath is unusable.
    #[error("the classpath that Maven wrote to {path} is unusable: {reason}; check the pom")]
    BadClasspath {
        /// The classpath file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// `java` could not be run.
    #[error(
        "could not run `{java} -version`: {detail}; install a JDK 17 (e.g. `apt-get install \
         openjdk-17-jre-headless`) or set ServerOptions::java to its `java`"
    )]
    Java {
        /// The java command tried.
        java: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// The options cannot start a server.
    #[error("invalid server options: {reason}")]
    InvalidOptions {
        /// What is wrong.
        reason: String,
    },
    /// The `sh` supervisor could not be started or did not report java's pid.
    #[error("could not start the java supervisor (`sh`): {detail}")]
    Supervisor {
        /// What went wrong.
        detail: String,
    },
    /// No block of four free ports was found.
    #[error(
        "found no free port block (P-1000, P, P+1000, P+1001) for P in {range:?} after \
         {attempts} tries; free some ports on this machine"
    )]
    NoFreePorts {
        /// The range HTTP ports were drawn from.
        range: std::ops::Range<u16>,
        /// How many blocks were tried.
        attempts: u32,
    },
    /// java exited before the server was ready.
    #[error(
        "Nacos (HTTP port {http_port}) exited during startup: {status}. Last lines of {log}:\n{tail}"
    )]
    ServerExited {
        /// The server's HTTP port.
        http_port: u16,
        /// How java ended.
        status: String,
        /// The server's log.
        log: PathBuf,
        /// The last lines of that log.
        tail: String,
    },
    /// The server was not ready in time; java was still running.
    #[error(
        "Nacos (HTTP port {http_port}, gRPC port {grpc_port}) was not ready within {timeout:?} \
         (still waiting for: {waiting_for}); java is still running. Last lines of {log}:\n{tail}"
    )]
    ServerNotReady {
        /// The server's HTTP port.
        http_port: u16,
        /// The server's SDK gRPC port.
        grpc_port: u16,
        /// The time it had.
        timeout: Duration,
        /// The readiness checks that had not passed.
        waiting_for: String,
        /// The server's log.
        log: PathBuf,
        /// The last lines of that log.
        tail: String,
    },
    /// Ports stayed open after java had exited.
    #[error("ports {ports:?} still accepted connections {timeout:?} after java exited")]
    PortsStillOpen {
        /// The ports that stayed open.
        ports: Vec<u16>,
        /// How long we waited.
        timeout: Duration,
    },
    /// With auth on, the admin could not log in after the server was ready.
    #[error(
        "the admin ({ADMIN_USERNAME}) could not log in within {timeout:?} of the server being ready: {source}"
    )]
    AdminLogin {
        /// The time it had.
        timeout: Duration,
        /// The last login's error.
        #[source]
        source: Box<HarnessError>,
    },
    /// The server is stopped.
    #[error("the Nacos server is stopped; call restart() first")]
    Stopped,
    /// An HTTP request got no response.
    #[error("HTTP {method} {url}: {source}")]
    Http {
        /// The method.
        method: &'static str,
        /// The URL, without query.
        url: String,
        /// The cause.
        #[source]
        source: Box<ureq::Error>,
    },
    /// An HTTP request got a status other than 200.
    #[error("HTTP {method} {url} answered {status}: {body}")]
    HttpStatus {
        /// The method.
        method: &'static str,
        /// The URL, without query.
        url: String,
        /// The status code.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// An HTTP response had a body we could not understand.
    #[error("HTTP {method} {url} answered an unexpected body ({reason}): {body}")]
    BadResponse {
        /// The method.
        method: &'static str,
        /// The URL, without query.
        url: String,
        /// What is wrong.
        reason: String,
        /// The start of the body.
        body: String,
    },
    /// A persistent instance with an address off this machine was refused.
    #[error(
        "refusing to register persistent instance {ip}:{port}: the server TCP-probes persistent \
         instances, and tests may only send traffic to loopback addresses; use 127.0.0.0/8 \
         (or an ephemeral instance)"
    )]
    NonLoopbackPersistent {
        /// The address given.
        ip: String,
        /// The port given.
        port: u16,
    },
}

impl HarnessError {
    /// The HTTP status, if this is an [`HarnessError::HttpStatus`]; e.g. 403 for a failed login.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            Self::HttpStatus { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether java lost a race for one of its ports (another process bound it after we
    /// found it free), so that starting again on other ports may succeed.
    fn is_port_clash(&self) -> bool {
        matches!(self, Self::ServerExited { tail, .. } if tail.contains("already in use"))
    }
}

fn io_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> HarnessError + 'a {
    move |source| HarnessError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

// ---------------------------------------------------------------------------------------------
// Distribution: the classpath, resolved once by Maven.

/// The server lines the project tests against, each pinned by a pom in `testing/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServerLine {
    /// Nacos 2.3.2 (`testing/nacos-2.3`).
    V2_3,
    /// Nacos 3.1.0 (`testing/nacos-3.1`), started through our launcher.
    V3_1,
}

impl ServerLine {
    /// Both lines, oldest first.
    pub const ALL: [ServerLine; 2] = [ServerLine::V2_3, ServerLine::V3_1];

    /// `2.3` or `3.1`, as [`Self::parse`] takes it.
    pub fn name(self) -> &'static str {
        match self {
            Self::V2_3 => "2.3",
            Self::V3_1 => "3.1",
        }
    }

    /// The line named `2.3` or `3.1`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|line| line.name() == name.trim())
    }

    /// The version its pom pins, as [`Distribution::server_version`] reports it.
    pub fn pinned_version(self) -> &'static str {
        match self {
            Self::V2_3 => "2.3.2",
            Self::V3_1 => "3.1.0-bugfix",
        }
    }

    /// Resolves this line's server for the crate at `root` (the pom under `root/testing/`,
    /// the cache in `root/target/nacos-server`).
    pub fn resolve(self, root: &Path) -> Result<Distribution, HarnessError> {
        let pom = root
            .join("testing")
            .join(format!("nacos-{}", self.name()))
            .join("pom.xml");
        Distribution::resolve(&root.join("target/nacos-server"), &pom)
    }
}

/// Distributions resolved by this process, keyed by classpath file: later calls skip even the
/// file checks, and the mutex keeps threads of one process from running Maven together.
static RESOLVED: Mutex<Vec<(PathBuf, Distribution)>> = Mutex::new(Vec::new());

/// A Nacos server ready to run: the classpath of `com.alibaba.nacos:nacos-console` and its
/// dependencies, as jars in the local Maven repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Distribution {
    classpath: String,
    classpath_file: PathBuf,
    server_version: String,
    /// The class `java` runs: Nacos' own on 2.x, our launcher on 3.x.
    main_class: String,
}

impl Distribution {
    /// Resolves the server that `pom` names, running Maven only if needed.
    ///
    /// Runs `mvn dependency:build-classpath` once and keeps the result in `cache_dir` (a file
    /// named after a hash of the pom, so a changed pom resolves again); later calls reuse it as
    /// long as every jar on it still exists. The jars themselves stay in `~/.m2`. Safe to call
    /// from parallel tests: threads wait on a mutex, processes on a lock file in `cache_dir`,
    /// and the classpath file appears by atomic rename.
    ///
    /// Maven's output goes to `cache_dir/maven.log`; its last lines are in the error if it
    /// fails. There is no fallback: without Maven, or if it fails, this fails.
    pub fn resolve(cache_dir: &Path, pom: &Path) -> Result<Self, HarnessError> {
        let pom_bytes = fs::read(pom).map_err(io_error("reading the Maven pom", pom))?;
        fs::create_dir_all(cache_dir)
            .map_err(io_error("creating the cache directory", cache_dir))?;
        let cache_dir = fs::canonicalize(cache_dir)
            .map_err(io_error("resolving the cache directory", cache_dir))?;
        let pom = fs::canonicalize(pom).map_err(io_error("resolving the Maven pom", pom))?;
        let classpath_file = cache_dir.join(format!("classpath-{:016x}.txt", fnv1a(&pom_bytes)));

        let mut resolved = RESOLVED.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, dist)) = resolved.iter().find(|(file, _)| *file == classpath_file) {
            return Ok(dist.clone());
        }
        let dist = match Self::load_cached(&classpath_file) {
            Some(dist) => dist,
            None => {
                let lock_path = cache_dir.join("resolve.lock");
                let lock = OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&lock_path)
                    .map_err(io_error("opening the lock file", &lock_path))?;
                rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
                    .map_err(|errno| io_error("locking", &lock_path)(io::Error::from(errno)))?;
                // Another process may have resolved it while we waited for the lock.
                match Self::load_cached(&classpath_file) {
                    Some(dist) => dist,
                    None => run_maven(&pom, &cache_dir, &classpath_file)?,
                }
                // `lock` closes here, which releases it.
            }
        };
        let dist = match pom.parent().map(|dir| dir.join(LAUNCHER_SOURCE)) {
            Some(source) if source.is_file() => dist.with_launcher(&source, &cache_dir)?,
            _ => dist,
        };
        resolved.push((classpath_file, dist.clone()));
        Ok(dist)
    }

    /// The major version, e.g. 2 for `2.3.2` and 3 for `3.1.0-bugfix`.
    pub fn major(&self) -> u32 {
        self.server_version
            .split('.')
            .next()
            .and_then(|major| major.parse().ok())
            .unwrap_or(0)
    }

    /// Puts our launcher in front of the classpath: compiled with `javac` against the
    /// resolved jars into `cache_dir` once (a directory named after a hash of its inputs, so a
    /// changed source, properties file or classpath compiles again), together with the
    /// `application.properties` found beside the source.
    fn with_launcher(mut self, source: &Path, cache_dir: &Path) -> Result<Self, HarnessError> {
        let properties = source.with_file_name(LAUNCHER_PROPERTIES);
        let source_text = fs::read(source).map_err(io_error("reading", source))?;
        let properties_text = fs::read(&properties).map_err(io_error("reading", &properties))?;
        let mut inputs = source_text;
        inputs.extend_from_slice(&properties_text);
        inputs.extend_from_slice(self.classpath.as_bytes());
        let out = cache_dir.join(format!("launcher-{:016x}", fnv1a(&inputs)));
        if !out.join("NacosLauncher.class").is_file() {
            compile_launcher(source, &properties, &self.classpath, cache_dir, &out)?;
        }
        let out = out.to_str().ok_or_else(|| HarnessError::InvalidOptions {
            reason: format!("the cache directory {} is not UTF-8", out.display()),
        })?;
        self.classpath = format!("{out}:{}", self.classpath);
        self.main_class = LAUNCHER_CLASS.to_owned();
        Ok(self)
    }

    /// The classpath, entries separated by `:`.
    pub fn classpath(&self) -> &str {
        &self.classpath
    }

    /// The file in the cache directory that holds the classpath.
    pub fn classpath_file(&self) -> &Path {
        &self.classpath_file
    }

    /// The server's version, from the name of the `nacos-console` jar, e.g. `2.3.2`.
    pub fn server_version(&self) -> &str {
        &self.server_version
    }

    /// The cached classpath, unless it is missing or stale (a jar on it is gone).
    fn load_cached(classpath_file: &Path) -> Option<Self> {
        let text = fs::read_to_string(classpath_file).ok()?;
        Self::parse(&text, classpath_file).ok()
    }

    fn parse(text: &str, classpath_file: &Path) -> Result<Self, String> {
        let jars: Vec<&str> = text
            .trim()
            .split(':')
            .filter(|entry| !entry.is_empty())
            .collect();
        if jars.is_empty() {
            return Err("it is empty".to_owned());
        }
        if let Some(missing) = jars.iter().find(|jar| !Path::new(jar).is_file()) {
            return Err(format!("{missing} does not exist"));
        }
        let server_version = jars
            .iter()
            .filter_map(|jar| Path::new(jar).file_name()?.to_str())
            .find_map(|name| name.strip_prefix("nacos-console-")?.strip_suffix(".jar"))
            .ok_or_else(|| "it has no nacos-console jar".to_owned())?
            .to_owned();
        Ok(Self {
            classpath: jars.join(":"),
            classpath_file: classpath_file.to_path_buf(),
            server_version,
            main_class: MAIN_CLASS.to_owned(),
        })
    }
}

/// Compiles the launcher into a temporary directory beside `out` and renames it into place,
/// so a parallel test never sees half a directory. Javac's output goes to
/// `cache_dir/javac.log`.
fn compile_launcher(
    source: &Path,
    properties: &Path,
    classpath: &str,
    cache_dir: &Path,
    out: &Path,
) -> Result<(), HarnessError> {
    let temp = tempfile::Builder::new()
        .prefix("launcher-tmp-")
        .tempdir_in(cache_dir)
        .map_err(io_error("creating a directory in", cache_dir))?;
    let log_path = cache_dir.join("javac.log");
    let log = File::create(&log_path).map_err(io_error("creating", &log_path))?;
    let log_for_stderr = log.try_clone().map_err(io_error("opening", &log_path))?;
    let status = Command::new("javac")
        .arg("-nowarn")
        .arg("-d")
        .arg(temp.path())
        .arg("-cp")
        .arg(classpath)
        .arg(source)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_for_stderr))
        .status()
        .map_err(|err| HarnessError::Java {
            java: PathBuf::from("javac"),
            detail: format!("{err} (install a JDK 17: scripts/prereqs does)"),
        })?;
    if !status.success() {
        return Err(HarnessError::Java {
            java: PathBuf::from("javac"),
            detail: format!(
                "compiling {} failed ({status}); {}:\n{}",
                source.display(),
                log_path.display(),
                tail_lines(&log_path, LOG_TAIL_LINES)
            ),
        });
    }
    let copied = temp.path().join(LAUNCHER_PROPERTIES);
    fs::copy(properties, &copied).map_err(io_error("copying", properties))?;
    let temp = temp.keep();
    match fs::rename(&temp, out) {
        Ok(()) => Ok(()),
        // Another process compiled the same inputs first: theirs is as good.
        Err(_) if out.join("NacosLauncher.class").is_file() => {
            let _ = fs::remove_dir_all(&temp);
            Ok(())
        }
        Err(err) => Err(io_error("renaming into place", &temp)(err)),
    }
}

/// Runs Maven with the lock held; writes the classpath to a temporary file, checks it and
/// renames it into place.
fn run_maven(
    pom: &Path,
    cache_dir: &Path,
    classpath_file: &Path,
) -> Result<Distribution, HarnessError> {
    let log_path = cache_dir.join("maven.log");
    let log = File::create(&log_path).map_err(io_error("creating", &log_path))?;
    let log_for_stderr = log.try_clone().map_err(io_error("opening", &log_path))?;
    let mut temp_name = classpath_file.as_os_str().to_owned();
    temp_name.push(format!(".tmp-{}", std::process::id()));
    let temp_file = PathBuf::from(temp_name);
    let mut output_arg = OsString::from("-Dmdep.outputFile=");
    output_arg.push(&temp_file);

    let mut maven = Command::new("mvn")
        .args(["-B", "--no-transfer-progress", "-Dstyle.color=never", "-f"])
        .arg(pom)
        .arg("dependency:build-classpath")
        .arg(output_arg)
        .current_dir(cache_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_for_stderr))
        .spawn()
        .map_err(|source| HarnessError::MavenNotFound { source })?;
    let status = match wait_timeout(&mut maven, MAVEN_TIMEOUT)
        .map_err(io_error("waiting for Maven", pom))?
    {
        Some(status) => status,
        None => {
            // Best effort: the error below is what matters.
            let _ = maven.kill();
            let _ = maven.wait();
            return Err(HarnessError::MavenTimedOut {
                pom: pom.to_path_buf(),
                timeout: MAVEN_TIMEOUT,
                tail: tail_lines(&log_path, LOG_TAIL_LINES),
                log: log_path,
            });
        }
    };
    if !status.success() {
        return Err(HarnessError::MavenFailed {
            pom: pom.to_path_buf(),
            status: status.to_string(),
            tail: tail_lines(&log_path, LOG_TAIL_LINES),
            log: log_path,
        });
    }
    let text = fs::read_to_string(&temp_file)
        .map_err(io_error("reading the classpath Maven wrote", &temp_file))?;
    let dist = match Distribution::parse(&text, classpath_file) {
        Ok(dist) => dist,
        Err(reason) => {
            let _ = fs::remove_file(&temp_file);
            return Err(HarnessError::BadClasspath {
                path: temp_file,
                reason,
            });
        }
    };
    fs::rename(&temp_file, classpath_file).map_err(io_error("renaming into place", &temp_file))?;
    Ok(dist)
}

// ---------------------------------------------------------------------------------------------
// Options.

/// How to run one server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Turns Nacos' own auth on when set; see [`AuthOptions`].
    pub auth: Option<AuthOptions>,
    /// The JVM's maximum heap (`-Xmx`), in MiB. 256 is plenty for tests.
    pub heap_max_mib: u32,
    /// How long a start or restart may take before it fails.
    pub ready_timeout: Duration,
    /// How long [`NacosServer::stop`] lets java shut down after SIGTERM before SIGKILL.
    pub stop_timeout: Duration,
    /// The `java` to run (resolved through PATH if it has no `/`).
    pub java: PathBuf,
    /// More server properties, passed as `-Dkey=value` after ours (so they win).
    pub properties: Vec<(String, String)>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            auth: None,
            heap_max_mib: 256,
            ready_timeout: Duration::from_secs(120),
            stop_timeout: Duration::from_secs(20),
            java: PathBuf::from("java"),
            properties: Vec::new(),
        }
    }
}

impl ServerOptions {
    /// The default options with auth on, using freshly generated secrets.
    pub fn with_auth() -> Self {
        Self {
            auth: Some(AuthOptions::generate()),
            ..Self::default()
        }
    }

    fn validate(&self) -> Result<(), HarnessError> {
        let invalid = |reason: String| Err(HarnessError::InvalidOptions { reason });
        if self.heap_max_mib < 128 {
            return invalid(format!(
                "heap_max_mib is {}; Nacos needs at least 128",
                self.heap_max_mib
            ));
        }
        if let Some(auth) = &self.auth {
            let secret = &auth.token_secret_base64;
            let valid_chars = secret
                .trim_end_matches('=')
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/');
            let decoded_len = secret.trim_end_matches('=').len() * 6 / 8;
            if !valid_chars || decoded_len < 32 {
                return invalid(
                    "auth.token_secret_base64 must be standard Base64 of at least 32 bytes \
                     (Nacos refuses to start otherwise)"
                        .to_owned(),
                );
            }
            if auth.identity_key.is_empty() || auth.identity_value.is_empty() {
                return invalid(
                    "auth.identity_key and auth.identity_value must not be empty".to_owned(),
                );
            }
        }
        Ok(())
    }
}

/// Nacos' own auth (`nacos.core.auth.system.type=nacos`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthOptions {
    /// `nacos.core.auth.plugin.nacos.token.secret.key`: standard Base64 of at least 32 bytes.
    pub token_secret_base64: String,
    /// `nacos.core.auth.server.identity.key`: a request with this header skips auth.
    pub identity_key: String,
    /// `nacos.core.auth.server.identity.value`: the value that header must have.
    pub identity_value: String,
}

impl AuthOptions {
    /// A random token secret and identity value.
    pub fn generate() -> Self {
        let mut secret = Vec::with_capacity(32);
        for _ in 0..4 {
            secret.extend_from_slice(&random_u64().to_le_bytes());
        }
        Self {
            token_secret_base64: base64(&secret),
            identity_key: "harness-identity".to_owned(),
            identity_value: format!("{:016x}", random_u64()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Ports.

/// HTTP ports of the blocks this process holds, so that parallel tests never pick the same one.
static RESERVED_PORTS: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// The five ports of one server, held for this process until dropped.
#[derive(Debug)]
struct PortBlock {
    http: u16,
}

impl PortBlock {
    fn reserve() -> Result<Self, HarnessError> {
        let span = u64::from(HTTP_PORT_RANGE.end - HTTP_PORT_RANGE.start);
        for _ in 0..PORT_ATTEMPTS {
            let http = HTTP_PORT_RANGE.start + u16::try_from(random_u64() % span).unwrap_or(0);
            let mut reserved = RESERVED_PORTS
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // Only a block that shares a port is ruled out: ruling out the whole window of 2001 either side left no
            // room in the range for a fourth server once three were running.
            let clash = reserved.iter().any(|other| blocks_overlap(http, *other));
            if !clash && block_of(http).iter().all(|port| port_is_free(*port)) {
                reserved.insert(http);
                return Ok(Self { http });
            }
        }
        Err(HarnessError::NoFreePorts {
            range: HTTP_PORT_RANGE,
            attempts: PORT_ATTEMPTS,
        })
    }

    fn grpc(&self) -> u16 {
        self.http + 1000
    }

    fn cluster_grpc(&self) -> u16 {
        self.http + 1001
    }

    fn raft(&self) -> u16 {
        self.http - 1000
    }

    fn console(&self) -> u16 {
        self.http + 1
    }

    fn all(&self) -> [u16; 5] {
        block_of(self.http)
    }
}

/// The ports of the server whose HTTP port is `http`: JRaft, HTTP, console (3.x; reserved on
/// 2.x too, so one picker serves both), SDK gRPC, cluster gRPC.
fn block_of(http: u16) -> [u16; 5] {
    [http - 1000, http, http + 1, http + 1000, http + 1001]
}

/// Whether the blocks of two HTTP ports share a port.
fn blocks_overlap(a: u16, b: u16) -> bool {
    let theirs = block_of(b);
    block_of(a).iter().any(|port| theirs.contains(port))
}

impl Drop for PortBlock {
    fn drop(&mut self) {
        RESERVED_PORTS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.http);
    }
}

/// Whether nothing listens on `port` on any interface. Java binds the gRPC and JRaft ports on
/// the IPv6 wildcard (dual stack), so both wildcards are tried; a machine without IPv6 fails
/// that bind with another error, which does not count as "taken".
fn port_is_free(port: u16) -> bool {
    let v4 = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port));
    if v4.is_err() {
        return false;
    }
    drop(v4);
    match TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)) {
        Ok(_) => true,
        Err(err) => err.kind() != io::ErrorKind::AddrInUse,
    }
}

fn accepts_tcp(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

// ---------------------------------------------------------------------------------------------
// The supervised java process.

/// The `sh` supervisor and, through it, java.
#[derive(Debug)]
struct Supervised {
    supervisor: Child,
    java_pid: u32,
}

impl Supervised {
    /// Starts java with `args` in `data_dir`, which it owns: see [`SUPERVISOR`].
    fn spawn(
        java: &Path,
        args: &[OsString],
        data_dir: &Path,
        log_path: &Path,
    ) -> Result<Self, HarnessError> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(io_error("opening the server log", log_path))?;
        let mut supervisor = Command::new("sh")
            .arg("-c")
            .arg(SUPERVISOR)
            .arg("nacos-supervisor")
            .arg(data_dir)
            .arg(java)
            .args(args)
            .current_dir(data_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|err| HarnessError::Supervisor {
                detail: err.to_string(),
            })?;
        let mut line = String::new();
        let read = match supervisor.stdout.take() {
            Some(stdout) => BufReader::new(stdout)
                .read_line(&mut line)
                .map_err(|err| err.to_string()),
            None => Err("its stdout was not captured".to_owned()),
        };
        match read.and_then(|_| {
            line.trim()
                .parse::<u32>()
                .map_err(|_| format!("it printed {line:?}, not a pid"))
        }) {
            Ok(java_pid) => Ok(Self {
                supervisor,
                java_pid,
            }),
            Err(detail) => {
                drop(supervisor.stdin.take());
                let _ = supervisor.wait();
                Err(HarnessError::Supervisor { detail })
            }
        }
    }

    /// Sends a command to the supervisor. A supervisor that has exited cannot read it, which
    /// is fine: then java has exited too.
    fn send(&mut self, command: &str) {
        if let Some(stdin) = self.supervisor.stdin.as_mut() {
            let _ = writeln!(stdin, "{command}").and_then(|()| stdin.flush());
        }
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.supervisor.try_wait().ok().flatten()
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_timeout(&mut self.supervisor, timeout).ok().flatten()
    }

    /// SIGKILLs java and reaps the supervisor, keeping the pipe open until then so that the
    /// supervisor keeps the data directory (for a restart).
    fn kill_and_wait(&mut self) -> Option<ExitStatus> {
        self.send("kill");
        // SIGKILL cannot be caught: this is quick unless the kernel is stuck.
        self.wait_exit(Duration::from_secs(60))
            .or_else(|| self.finish())
    }

    /// Closes the pipe, which makes the supervisor kill java and, unless told `keep`, delete
    /// the data directory; then reaps it.
    fn finish(&mut self) -> Option<ExitStatus> {
        self.send("kill");
        drop(self.supervisor.stdin.take());
        self.supervisor.wait().ok()
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.finish();
    }
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// How java ended, from the supervisor's status (`wait` gives 128 + n for signal n).
fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) if code > 128 && code < 160 => {
            format!("java was killed by signal {}", code - 128)
        }
        (Some(code), _) => format!("java exited with code {code}"),
        (None, Some(signal)) => format!("the supervisor was killed by signal {signal}"),
        (None, None) => status.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// The server.

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
    /// Picks a random block of free ports (P-1000, P, P+1000, P+1001; starting again on other
    /// ports if java loses a race for one), makes a fresh data directory (`nacos.home`, also
    /// java's working and temporary directory), and logs java's output to [`Self::log_path`]
    /// and Nacos' own logs to [`Self::log_dir`] there. With auth on, also makes sure the admin
    /// user exists and logs it in. If the start fails, java is killed but the data directory
    /// is kept (without its bulky `data/`), so that the log the error quotes can be read in
    /// full. The data directory is made in the system's temporary directory.
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
    /// waits until all four ports refuse connections. The ports stay reserved and the data
    /// directory stays, for [`Self::restart`]. Does nothing if already stopped.
    pub fn stop(&self) -> Result<(), HarnessError> {
        self.stop_locked(&mut self.lifecycle())
    }

    /// Kills java at once (SIGKILL: no shutdown hooks run, as in a crash) and waits until all
    /// four ports refuse connections. Otherwise like [`Self::stop`].
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

    /// Logs in over HTTP (`POST /v1/auth/users/login` on 2.x, `/v3/auth/user/login` on 3.x)
    /// and returns the access token.
    ///
    /// A wrong user or password is an [`HarnessError::HttpStatus`] with status 403 on 2.x, 500
    /// on 3.x.
    pub fn login(&self, username: &str, password: &str) -> Result<String, HarnessError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Login {
            access_token: String,
        }
        let path = if self.major >= 3 {
            "/v3/auth/user/login"
        } else {
            "/v1/auth/users/login"
        };
        let params = [("username", username), ("password", password)];
        let body = self.request(Method::Post, path, &params, false)?;
        let login: Login = self.decode(Method::Post, path, &body)?;
        Ok(login.access_token)
    }

    /// The admin's access token when auth is on (logged in once, then cached), else `None`.
    /// The HTTP helpers below pass it themselves.
    pub fn access_token(&self) -> Result<Option<String>, HarnessError> {
        if self.opts.auth.is_none() {
            return Ok(None);
        }
        let mut token = self.token.lock().unwrap_or_else(PoisonError::into_inner);
        if token.is_none() {
            *token = Some(self.login(ADMIN_USERNAME, ADMIN_PASSWORD)?);
        }
        Ok(token.clone())
    }

    /// Registers an instance through the v1 open API (`POST /v1/ns/instance`).
    ///
    /// A persistent instance must have a loopback address (see the module docs); an ephemeral
    /// one expires about 30 s after registration, as nothing renews it.
    pub fn register_instance_http(&self, instance: &HttpInstance) -> Result<(), HarnessError> {
        if !instance.ephemeral && !is_loopback(&instance.ip) {
            return Err(HarnessError::NonLoopbackPersistent {
                ip: instance.ip.clone(),
                port: instance.port,
            });
        }
        let metadata = serde_json::to_string(&instance.metadata).map_err(|err| {
            HarnessError::InvalidOptions {
                reason: format!("instance metadata cannot be encoded: {err}"),
            }
        })?;
        let port = instance.port.to_string();
        let weight = instance.weight.to_string();
        let mut params = instance.identity_params(&port);
        params.extend([
            ("weight", weight.as_str()),
            ("enabled", bool_str(instance.enabled)),
            ("healthy", bool_str(instance.healthy)),
            ("metadata", metadata.as_str()),
        ]);
        self.request(Method::Post, "/v1/ns/instance", &params, true)
            .map(drop)
    }

    /// Deregisters an instance through the v1 open API (`DELETE /v1/ns/instance`); only its
    /// namespace, group, service, cluster, ip, port and `ephemeral` matter.
    pub fn deregister_instance_http(&self, instance: &HttpInstance) -> Result<(), HarnessError> {
        let port = instance.port.to_string();
        let params = instance.identity_params(&port);
        self.request(Method::Delete, "/v1/ns/instance", &params, true)
            .map(drop)
    }

    /// Lists a service's instances through the v1 open API (`GET /v1/ns/instance/list`),
    /// healthy or not. Instances with `enabled=false` are never listed; an unknown service
    /// lists nothing.
    pub fn list_instances_http(
        &self,
        namespace: &str,
        group: &str,
        service: &str,
    ) -> Result<Vec<ListedInstance>, HarnessError> {
        #[derive(Deserialize)]
        struct Listing {
            #[serde(default)]
            hosts: Vec<ListedInstance>,
        }
        let path = "/v1/ns/instance/list";
        let params = [
            ("namespaceId", namespace),
            ("groupName", group),
            ("serviceName", service),
            ("healthyOnly", "false"),
        ];
        let body = self.request(Method::Get, path, &params, true)?;
        let listing: Listing = self.decode(Method::Get, path, &body)?;
        Ok(listing.hosts)
    }

    /// Creates a namespace whose id and name are `id` (`POST /v1/console/namespaces` on 2.x,
    /// `POST /v3/admin/core/namespace` on 3.x).
    pub fn create_namespace_http(&self, id: &str) -> Result<(), HarnessError> {
        // The same request but for the id's key (3.x refuses `customNamespaceId`).
        let (path, id_key) = if self.major >= 3 {
            ("/v3/admin/core/namespace", "namespaceId")
        } else {
            ("/v1/console/namespaces", "customNamespaceId")
        };
        let params = [
            (id_key, id),
            ("namespaceName", id),
            (
                "namespaceDesc",
                "created by the nacos-replicator test harness",
            ),
        ];
        let body = self.request(Method::Post, path, &params, true)?;
        if self.major >= 3 {
            return self.expect_v3_success(Method::Post, path, &body);
        }
        if body.trim() == "true" {
            Ok(())
        } else {
            Err(self.bad_response(Method::Post, path, "expected `true`".to_owned(), &body))
        }
    }

    /// Makes the server send a `ConnectResetRequest` to one SDK connection,
    /// naming `redirect` (`host:http_port`) as the server to move to, if given
    /// (`GET /v2/core/loader/reloadClient` on 2.x, `POST /v3/admin/core/loader/reloadClient`
    /// on 3.x).
    pub fn reset_connection(
        &self,
        connection_id: &str,
        redirect: Option<&str>,
    ) -> Result<(), HarnessError> {
        let mut params = vec![("connectionId", connection_id)];
        if let Some(redirect) = redirect {
            params.push(("redirectAddress", redirect));
        }
        if self.major >= 3 {
            let path = "/v3/admin/core/loader/reloadClient";
            let body = self.request(Method::Post, path, &params, true)?;
            return self.expect_v3_success(Method::Post, path, &body);
        }
        let path = "/v2/core/loader/reloadClient";
        self.request(Method::Get, path, &params, true).map(|_| ())
    }

    /// Every service of `namespace` in every group, as `(group, name)`, sorted, through the
    /// server's own listing: `/v1/ns/catalog/services` on 2.x, `/v3/admin/ns/service/list` on
    /// 3.x (one page of up to 1,000; tests list fewer).
    pub fn list_services_http(
        &self,
        namespace: &str,
    ) -> Result<Vec<(String, String)>, HarnessError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Entry {
            name: String,
            group_name: String,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct V2 {
            #[serde(default)]
            service_list: Vec<Entry>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct V3Page {
            #[serde(default)]
            page_items: Vec<Entry>,
        }
        #[derive(Deserialize)]
        struct V3 {
            data: V3Page,
        }
        let params = [
            ("namespaceId", namespace),
            ("pageNo", "1"),
            ("pageSize", "1000"),
        ];
        let entries = if self.major >= 3 {
            let path = "/v3/admin/ns/service/list";
            let body = self.request(Method::Get, path, &params, true)?;
            self.decode::<V3>(Method::Get, path, &body)?.data.page_items
        } else {
            let path = "/v1/ns/catalog/services";
            let body = self.request(Method::Get, path, &params, true)?;
            self.decode::<V2>(Method::Get, path, &body)?.service_list
        };
        let mut out: Vec<(String, String)> = entries
            .into_iter()
            .map(|e| (e.group_name, e.name))
            .collect();
        out.sort();
        Ok(out)
    }

    /// How many subscribers the server lists for a service: `count` of
    /// `/v1/ns/service/subscribers` on 2.x, `data.totalCount` of
    /// `/v3/admin/ns/service/subscribers` on 3.x.
    pub fn subscriber_count_http(
        &self,
        namespace: &str,
        group: &str,
        service: &str,
    ) -> Result<u64, HarnessError> {
        let params = [
            ("namespaceId", namespace),
            ("groupName", group),
            ("serviceName", service),
            ("pageNo", "1"),
            ("pageSize", "100"),
        ];
        let (path, pointer) = if self.major >= 3 {
            ("/v3/admin/ns/service/subscribers", "/data/totalCount")
        } else {
            ("/v1/ns/service/subscribers", "/count")
        };
        let body = self.request(Method::Get, path, &params, true)?;
        let value: serde_json::Value = self.decode(Method::Get, path, &body)?;
        value
            .pointer(pointer)
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| self.bad_response(Method::Get, path, format!("no {pointer}"), &body))
    }

    /// A 3.x answer `{"code":0,...}` is success; anything else is a bad response.
    fn expect_v3_success(
        &self,
        method: Method,
        path: &str,
        body: &str,
    ) -> Result<(), HarnessError> {
        #[derive(Deserialize)]
        struct Reply {
            code: i64,
        }
        match self.decode::<Reply>(method, path, body)? {
            Reply { code: 0 } => Ok(()),
            Reply { code } => Err(self.bad_response(method, path, format!("code {code}"), body)),
        }
    }

    // --- internals ---

    /// After a failed start: keeps the data directory with the logs that the error points to
    /// (java is still killed on drop), but deletes the bulky data (RocksDB preallocates
    /// about 140 MiB per Raft group, 3 groups).
    fn keep_logs(&mut self) {
        self.data_dir.disable_cleanup(true);
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Some(process) = state.process.as_mut() {
            process.send("keep");
            process.finish();
        }
        state.process = None;
        self.running.store(false, Ordering::SeqCst);
        for bulky in ["data", "tmp", "work"] {
            // Best effort: the error being reported matters more.
            let _ = fs::remove_dir_all(self.data_dir.path().join(bulky));
        }
    }

    fn lifecycle(&self) -> std::sync::MutexGuard<'_, Lifecycle> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Spawns java and waits until it is ready (with auth on: until the admin can log in).
    fn boot(&self, state: &mut Lifecycle) -> Result<(), HarnessError> {
        if let Ok(mut log) = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
        {
            // Only a marker between runs; the log works without it.
            let _ = writeln!(
                log,
                "==== nacos-replicator harness: start #{} ====",
                state.starts + 1
            );
        }
        let began = Instant::now();
        let args = self.java_args();
        let process =
            Supervised::spawn(&self.opts.java, &args, self.data_dir.path(), &self.log_path)?;
        state.process = Some(process);
        self.running.store(true, Ordering::SeqCst);
        state.starts += 1;
        self.wait_ready(state)?;
        self.wait_for_admin()?;
        state.last_start = began.elapsed();
        Ok(())
    }

    fn stop_locked(&self, state: &mut Lifecycle) -> Result<(), HarnessError> {
        let Some(mut process) = state.process.take() else {
            return Ok(());
        };
        self.running.store(false, Ordering::SeqCst);
        process.send("term");
        if process.wait_exit(self.opts.stop_timeout).is_none() {
            process.kill_and_wait();
        }
        drop(process);
        self.wait_ports_closed()
    }

    fn java_args(&self) -> Vec<OsString> {
        let home = self.data_dir.path();
        let mut args: Vec<OsString> = JVM_FLAGS.iter().map(OsString::from).collect();
        args.push(format!("-Xms{}m", self.opts.heap_max_mib.min(64)).into());
        args.push(format!("-Xmx{}m", self.opts.heap_max_mib).into());
        args.push(property("java.io.tmpdir", home.join("tmp").as_os_str()));
        args.push(property("nacos.home", home.as_os_str()));
        // Without it Nacos writes none of its own logs (naming-push.log...).
        args.push(property("nacos.logs.path", home.join("logs").as_os_str()));
        let mut props: Vec<(&str, String)> = if self.major >= 3 {
            // The server's port, the console's, and both in one JVM. Not `server.port`: each
            // web context derives its own from these, and a global one would give both the
            // same port.
            vec![
                ("nacos.server.main.port", self.ports.http.to_string()),
                ("nacos.console.port", self.ports.console().to_string()),
                ("nacos.deployment.type", "merged".to_owned()),
            ]
        } else {
            vec![("server.port", self.ports.http.to_string())]
        };
        props.extend([
            ("nacos.standalone", "true".to_owned()),
            // The address Nacos announces for itself, and Tomcat's bind address (HTTP only).
            ("nacos.server.ip", "127.0.0.1".to_owned()),
            ("server.address", "127.0.0.1".to_owned()),
            (
                "nacos.core.auth.enabled",
                self.opts.auth.is_some().to_string(),
            ),
            // The embedded Derby pool allows 3 s to connect; creating the database takes
            // longer when several servers start at once on 2 cores, and startup then fails
            // with "Login timeout exceeded".
            ("db.pool.config.connectionTimeout", "30000".to_owned()),
        ]);
        if let Some(auth) = &self.secrets {
            props.extend([
                ("nacos.core.auth.system.type", "nacos".to_owned()),
                (
                    "nacos.core.auth.plugin.nacos.token.secret.key",
                    auth.token_secret_base64.clone(),
                ),
                (
                    "nacos.core.auth.server.identity.key",
                    auth.identity_key.clone(),
                ),
                (
                    "nacos.core.auth.server.identity.value",
                    auth.identity_value.clone(),
                ),
            ]);
        }
        for (key, value) in &props {
            args.push(property(key, value.as_ref()));
        }
        for (key, value) in &self.opts.properties {
            args.push(property(key, value.as_ref()));
        }
        args.push("-cp".into());
        args.push(self.classpath.clone().into());
        args.push(self.main_class.clone().into());
        args
    }

    fn wait_ready(&self, state: &mut Lifecycle) -> Result<(), HarnessError> {
        let deadline = Instant::now() + self.opts.ready_timeout;
        loop {
            let Some(process) = state.process.as_mut() else {
                return Err(HarnessError::Stopped);
            };
            if let Some(status) = process.exited() {
                state.process = None;
                self.running.store(false, Ordering::SeqCst);
                return Err(HarnessError::ServerExited {
                    http_port: self.ports.http,
                    status: describe_exit(status),
                    log: self.log_path.clone(),
                    tail: tail_lines(&self.log_path, LOG_TAIL_LINES),
                });
            }
            let mut waiting_for = Vec::new();
            if let Err(problem) = self.probe_http() {
                waiting_for.push(format!("HTTP service list ({problem})"));
            }
            if !accepts_tcp(self.grpc_port()) {
                waiting_for.push(format!(
                    "gRPC port {} to accept connections",
                    self.grpc_port()
                ));
            }
            // 3.x starts its console last: once it listens, the whole server is up.
            if self.major >= 3 && !accepts_tcp(self.ports.console()) {
                waiting_for.push(format!(
                    "console port {} to accept connections",
                    self.ports.console()
                ));
            }
            if waiting_for.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::ServerNotReady {
                    http_port: self.ports.http,
                    grpc_port: self.grpc_port(),
                    timeout: self.opts.ready_timeout,
                    waiting_for: waiting_for.join("; "),
                    log: self.log_path.clone(),
                    tail: tail_lines(&self.log_path, LOG_TAIL_LINES),
                });
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// `GET /v1/ns/service/list` answers 200. With auth on, the probe sends the server
    /// identity header, so it needs no user (a 2.4+ server has none yet).
    fn probe_http(&self) -> Result<(), String> {
        let url = format!("{}/v1/ns/service/list", self.http_base());
        let mut request = self
            .probe
            .get(&url)
            .query("pageNo", "1")
            .query("pageSize", "1");
        if let Some(auth) = &self.secrets {
            request = request.header(auth.identity_key.as_str(), auth.identity_value.as_str());
        }
        match request.call() {
            Ok(response) if response.status().as_u16() == 200 => Ok(()),
            Ok(response) => Err(format!("HTTP {}", response.status().as_u16())),
            Err(err) => Err(err.to_string()),
        }
    }

    /// With auth on: waits until the admin can log in, and caches its token.
    ///
    /// Nacos serves logins from a user cache that it fills 5 s after start and every 15 s
    /// after, so for the first seconds even the seeded admin gets HTTP 500 "User nacos not
    /// found". A 2.4+ server seeds no user: the first failure asks it to create the admin
    /// (2.3.2, which seeds one, answers that request with 404).
    fn wait_for_admin(&self) -> Result<(), HarnessError> {
        if self.opts.auth.is_none() {
            return Ok(());
        }
        let deadline = Instant::now() + ADMIN_LOGIN_TIMEOUT;
        let mut asked_to_create = false;
        loop {
            let err = match self.login(ADMIN_USERNAME, ADMIN_PASSWORD) {
                Ok(token) => {
                    *self.token.lock().unwrap_or_else(PoisonError::into_inner) = Some(token);
                    return Ok(());
                }
                Err(err) if matches!(err.http_status(), Some(403 | 500)) => err,
                Err(err) => return Err(err),
            };
            if !asked_to_create {
                asked_to_create = true;
                let params = [("password", ADMIN_PASSWORD)];
                let path = if self.major >= 3 {
                    "/v3/auth/user/admin"
                } else {
                    "/v1/auth/users/admin"
                };
                match self.request(Method::Post, path, &params, false) {
                    // Created, or refused because it exists or the endpoint does not.
                    Ok(_) => {}
                    Err(refused) if refused.http_status().is_some() => {}
                    Err(other) => return Err(other),
                }
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::AdminLogin {
                    timeout: ADMIN_LOGIN_TIMEOUT,
                    source: Box::new(err),
                });
            }
            thread::sleep(Duration::from_millis(500));
        }
    }

    fn wait_ports_closed(&self) -> Result<(), HarnessError> {
        let deadline = Instant::now() + PORTS_CLOSE_TIMEOUT;
        loop {
            let open: Vec<u16> = self
                .ports
                .all()
                .into_iter()
                .filter(|port| accepts_tcp(*port))
                .collect();
            if open.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::PortsStillOpen {
                    ports: open,
                    timeout: PORTS_CLOSE_TIMEOUT,
                });
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// One request to the HTTP API: form body for POST, query otherwise; the admin's token
    /// added when `with_token` and auth is on. Returns the body of a 200.
    fn request(
        &self,
        method: Method,
        path: &str,
        params: &[(&str, &str)],
        with_token: bool,
    ) -> Result<String, HarnessError> {
        if !self.is_running() {
            return Err(HarnessError::Stopped);
        }
        let token = if with_token {
            self.access_token()?
        } else {
            None
        };
        let mut pairs = params.to_vec();
        if let Some(token) = token.as_deref() {
            pairs.push(("accessToken", token));
        }
        let url = format!("{}{path}", self.http_base());
        // 3.x guards its admin API even with auth off: the harness passes as the server
        // identity there (never on 2.x, whose tests check what a token allows).
        let identity = self
            .secrets
            .as_ref()
            .filter(|_| self.major >= 3)
            .map(|s| (s.identity_key.as_str(), s.identity_value.as_str()));
        let result = match (method, identity) {
            (Method::Get, None) => self.http.get(&url).query_pairs(pairs).call(),
            (Method::Get, Some((k, v))) => {
                self.http.get(&url).header(k, v).query_pairs(pairs).call()
            }
            (Method::Delete, None) => self.http.delete(&url).query_pairs(pairs).call(),
            (Method::Delete, Some((k, v))) => self
                .http
                .delete(&url)
                .header(k, v)
                .query_pairs(pairs)
                .call(),
            (Method::Post, None) => self.http.post(&url).send_form(pairs),
            (Method::Post, Some((k, v))) => self.http.post(&url).header(k, v).send_form(pairs),
        };
        let http_error = |source| HarnessError::Http {
            method: method.name(),
            url: url.clone(),
            source: Box::new(source),
        };
        let mut response = result.map_err(http_error)?;
        let status = response.status().as_u16();
        let body = response.body_mut().read_to_string().map_err(http_error)?;
        if status == 200 {
            Ok(body)
        } else {
            Err(HarnessError::HttpStatus {
                method: method.name(),
                url,
                status,
                body: quote(&body),
            })
        }
    }

    fn decode<T: for<'de> Deserialize<'de>>(
        &self,
        method: Method,
        path: &str,
        body: &str,
    ) -> Result<T, HarnessError> {
        serde_json::from_str(body)
            .map_err(|err| self.bad_response(method, path, err.to_string(), body))
    }

    fn bad_response(&self, method: Method, path: &str, reason: String, body: &str) -> HarnessError {
        HarnessError::BadResponse {
            method: method.name(),
            url: format!("{}{path}", self.http_base()),
            reason,
            body: quote(body),
        }
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

#[derive(Debug, Clone, Copy)]
enum Method {
    Get,
    Post,
    Delete,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Post => "POST",
            Self::Delete => "DELETE",
        }
    }
}

fn http_agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .new_agent()
}

fn check_java(java: &Path) -> Result<(), HarnessError> {
    let status = Command::new(java)
        .arg("-version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|err| HarnessError::Java {
            java: java.to_path_buf(),
            detail: err.to_string(),
        })?;
    if status.success() {
        Ok(())
    } else {
        Err(HarnessError::Java {
            java: java.to_path_buf(),
            detail: status.to_string(),
        })
    }
}

fn property(key: &str, value: &std::ffi::OsStr) -> OsString {
    let mut arg = OsString::from(format!("-D{key}="));
    arg.push(value);
    arg
}

// ---------------------------------------------------------------------------------------------
// The HTTP client's data.

/// An instance for the v1 open API helpers.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpInstance {
    /// Namespace id (`namespaceId`), e.g. `public`.
    pub namespace: String,
    /// Group (`groupName`), e.g. `DEFAULT_GROUP`.
    pub group: String,
    /// Service name without group (`serviceName`).
    pub service: String,
    /// Nacos' per-service cluster (`clusterName`), e.g. `DEFAULT`; no `_` allowed.
    pub cluster: String,
    /// Address (must be loopback when persistent).
    pub ip: String,
    /// Port.
    pub port: u16,
    /// Ephemeral (expires after ~30 s without v1 heartbeats) or persistent (stays until
    /// deregistered; its `healthy` follows a TCP probe of `ip:port`).
    pub ephemeral: bool,
    /// Weight.
    pub weight: f64,
    /// Whether it is enabled (disabled instances are never listed).
    pub enabled: bool,
    /// The health it is registered with.
    pub healthy: bool,
    /// Metadata, sent as one JSON object.
    pub metadata: BTreeMap<String, String>,
}

impl Default for HttpInstance {
    /// A persistent, enabled, healthy instance of weight 1 in namespace `public`, group
    /// `DEFAULT_GROUP`, cluster `DEFAULT`, without metadata; service, ip and port are empty.
    fn default() -> Self {
        Self {
            namespace: "public".to_owned(),
            group: "DEFAULT_GROUP".to_owned(),
            service: String::new(),
            cluster: "DEFAULT".to_owned(),
            ip: String::new(),
            port: 0,
            ephemeral: false,
            weight: 1.0,
            enabled: true,
            healthy: true,
            metadata: BTreeMap::new(),
        }
    }
}

impl HttpInstance {
    /// The [`Default`] instance with this service, ip and port.
    pub fn new(service: impl Into<String>, ip: impl Into<String>, port: u16) -> Self {
        Self {
            service: service.into(),
            ip: ip.into(),
            port,
            ..Self::default()
        }
    }

    fn identity_params<'a>(&'a self, port: &'a str) -> Vec<(&'a str, &'a str)> {
        vec![
            ("namespaceId", self.namespace.as_str()),
            ("groupName", self.group.as_str()),
            ("serviceName", self.service.as_str()),
            ("clusterName", self.cluster.as_str()),
            ("ip", self.ip.as_str()),
            ("port", port),
            ("ephemeral", bool_str(self.ephemeral)),
        ]
    }
}

/// An instance as `GET /v1/ns/instance/list` reports it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListedInstance {
    /// Instance id, e.g. `127.0.0.1#8080#DEFAULT#DEFAULT_GROUP@@orders`.
    #[serde(default)]
    pub instance_id: String,
    /// Address.
    pub ip: String,
    /// Port.
    pub port: u16,
    /// Weight.
    #[serde(default)]
    pub weight: f64,
    /// Health as the server sees it.
    #[serde(default)]
    pub healthy: bool,
    /// Whether it is enabled.
    #[serde(default)]
    pub enabled: bool,
    /// Whether it is ephemeral.
    #[serde(default)]
    pub ephemeral: bool,
    /// Nacos' per-service cluster.
    #[serde(default)]
    pub cluster_name: String,
    /// `group@@service`.
    #[serde(default)]
    pub service_name: String,
    /// Metadata.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

// ---------------------------------------------------------------------------------------------
// Small helpers.

fn bool_str(value: bool) -> &'static str {
    if value { "true" } else { "false" }
}

fn is_loopback(ip: &str) -> bool {
    ip.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The start of an HTTP body, for an error message.
fn quote(body: &str) -> String {
    if body.len() <= BODY_QUOTE_BYTES {
        return body.to_owned();
    }
    let mut end = BODY_QUOTE_BYTES;
    while !body.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &body[..end])
}

/// The last `lines` lines of a log, read from its last 64 KiB.
fn tail_lines(path: &Path, lines: usize) -> String {
    let read = || -> io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(err) => format!("(could not read {}: {err})", path.display()),
    }
}

/// FNV-1a: a stable hash for cache file names (std's hashers may change between releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Random enough for port picks and test secrets: std's randomly keyed hasher over a counter,
/// the time and the pid.
fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.write_u32(std::process::id());
    hasher.finish()
}

/// Standard Base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let triple = (byte(0) << 16) | (byte(1) << 8) | byte(2);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(
                    ALPHABET[((triple >> (18 - 6 * i)) & 63) as usize],
                ));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_blocks_overlap_only_where_they_share_a_port() {
        // Blocks are P-1000, P, P+1 (console), P+1000, P+1001.
        for apart in [0, 1, 999, 1000, 1001, 2000, 2001] {
            assert!(blocks_overlap(25_000, 25_000 + apart), "{apart} apart");
            assert!(blocks_overlap(25_000 + apart, 25_000), "{apart} apart");
        }
        for apart in [2, 998, 1002, 1999, 2002, 3000] {
            assert!(!blocks_overlap(25_000, 25_000 + apart), "{apart} apart");
        }
    }

    #[test]
    fn base64_matches_known_vectors() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foob"), "Zm9vYg==");
    }

    #[test]
    fn generated_auth_options_are_valid() {
        let opts = ServerOptions::with_auth();
        assert!(opts.validate().is_ok());
        let short = ServerOptions {
            auth: Some(AuthOptions {
                token_secret_base64: base64(&[7; 31]),
                ..AuthOptions::generate()
            }),
            ..ServerOptions::default()
        };
        assert!(matches!(
            short.validate(),
            Err(HarnessError::InvalidOptions { .. })
        ));
    }

    #[test]
    fn exit_statuses_name_the_signal() {
        assert_eq!(
            describe_exit(ExitStatus::from_raw(137 << 8)),
            "java was killed by signal 9"
        );
        assert_eq!(
            describe_exit(ExitStatus::from_raw(1 << 8)),
            "java exited with code 1"
        );
    }

    #[test]
    fn classpath_parsing_finds_the_version_and_rejects_missing_jars() {
        let dir = tempfile::tempdir().expect("temp dir");
        let jar = dir.path().join("nacos-console-2.3.2.jar");
        fs::write(&jar, b"").expect("write jar");
        let file = dir.path().join("cp.txt");
        let dist = Distribution::parse(&format!("{}\n", jar.display()), &file).expect("parses");
        assert_eq!(dist.server_version(), "2.3.2");
        let missing = format!(
            "{}:{}",
            jar.display(),
            dir.path().join("gone.jar").display()
        );
        assert!(Distribution::parse(&missing, &file).is_err());
    }
}
