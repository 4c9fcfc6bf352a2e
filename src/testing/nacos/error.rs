//! [`HarnessError`]: everything that can go wrong while resolving, running or talking to a
//! Nacos server, each message saying what to do about it.
//!
//! Must not: do I/O; the code that fails gathers what a message quotes (log tails, bodies).

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::ADMIN_USERNAME;

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
    /// No block of five free ports was found.
    #[error(
        "found no free port block (P-1000, P, P+1, P+1000, P+1001) for P in {range:?} after \
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
    pub(super) fn is_port_clash(&self) -> bool {
        matches!(self, Self::ServerExited { tail, .. } if tail.contains("already in use"))
    }
}

pub(super) fn io_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> HarnessError + 'a {
    move |source| HarnessError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}
