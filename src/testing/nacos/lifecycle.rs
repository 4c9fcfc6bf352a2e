//! Booting and stopping a [`NacosServer`]'s java: its arguments, and the waits for it to be
//! ready, for the admin to be able to log in, and for its ports to close.
//!
//! Must not: wait without a deadline; every wait polls until a timeout and then fails with
//! what it was still waiting for.

use std::ffi::{OsStr, OsString};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::PoisonError;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use super::error::HarnessError;
use super::http::Method;
use super::ports::accepts_tcp;
use super::supervisor::{Supervised, describe_exit};
use super::util::{LOG_TAIL_LINES, tail_lines};
use super::{ADMIN_PASSWORD, ADMIN_USERNAME, Lifecycle, NacosServer};
use crate::runtime::lock;

/// How long the admin may take to be able to log in once the server is ready (its user cache
/// fills 5 s after start).
const ADMIN_LOGIN_TIMEOUT: Duration = Duration::from_secs(45);
/// How long to wait for the ports to close once java has exited.
const PORTS_CLOSE_TIMEOUT: Duration = Duration::from_secs(15);
/// How often readiness and exit are polled.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

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

impl NacosServer {
    /// After a failed start: keeps the data directory with the logs that the error points to
    /// (java is still killed on drop), but deletes the bulky data (RocksDB preallocates
    /// about 140 MiB per Raft group, 3 groups).
    pub(super) fn keep_logs(&mut self) {
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

    /// Spawns java and waits until it is ready (with auth on: until the admin can log in).
    pub(super) fn boot(&self, state: &mut Lifecycle) -> Result<(), HarnessError> {
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

    pub(super) fn stop_locked(&self, state: &mut Lifecycle) -> Result<(), HarnessError> {
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
                    *lock(&self.token) = Some(token);
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

    pub(super) fn wait_ports_closed(&self) -> Result<(), HarnessError> {
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
}

pub(super) fn check_java(java: &Path) -> Result<(), HarnessError> {
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

fn property(key: &str, value: &OsStr) -> OsString {
    let mut arg = OsString::from(format!("-D{key}="));
    arg.push(value);
    arg
}
