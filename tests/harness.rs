//! The real-server harness (`nacos_replicator::testing::nacos`) against real Nacos servers.
//!
//! Proves what the other tests rely on: a server starts and is ready on its four ports; the
//! HTTP client round-trips instances; a restart keeps ports and data; a stop closes the ports;
//! auth rejects a bad login and accepts the admin; and java never outlives its owner, whether
//! the server is dropped or the test process is killed while holding it in a `static`.
//!
//! Each start costs 10-20 s, so each test starts one server and checks several things in turn.

use std::error::Error;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use nacos_replicator::testing::nacos::{
    Distribution, HarnessError, HttpInstance, NacosServer, ServerLine, ServerOptions,
};

type TestResult = Result<(), Box<dyn Error>>;

/// The server under test, resolved once into `target/` (Maven's jars stay in `~/.m2`).
/// `NACOS_SERVER=3.1` picks 3.1, as in `tests/support`.
fn line() -> ServerLine {
    std::env::var("NACOS_SERVER")
        .ok()
        .and_then(|name| ServerLine::parse(&name))
        .unwrap_or(ServerLine::V2_3)
}

fn distribution() -> Result<Distribution, HarnessError> {
    line().resolve(Path::new(env!("CARGO_MANIFEST_DIR")))
}

/// One line per start, for the measurements (`--nocapture` shows them).
fn report(what: &str, server: &NacosServer) {
    let rss_mib = server
        .java_rss_bytes()
        .map_or(0, |bytes| bytes / (1024 * 1024));
    eprintln!(
        "[harness] {what}: ready in {:.1?}, java RSS {rss_mib} MiB, ports {:?}",
        server.last_start_duration(),
        server.ports(),
    );
}

fn accepts(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).is_ok()
}

/// Whether `pid` is still the java started with this data directory (a zombie or a reused
/// pid is not).
fn java_alive(pid: u32, data_dir: &Path) -> bool {
    let marker = format!("-Dnacos.home={}", data_dir.display());
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
        cmdline
            .windows(marker.len())
            .any(|w| w == marker.as_bytes())
    })
}

fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// The status of a bare GET, with no token: proves auth is really on.
fn raw_get_status(port: u16, path_and_query: &str) -> Result<u16, Box<dyn Error>> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path_and_query} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| format!("no status line in {response:?}"))?;
    Ok(status.parse()?)
}

#[test]
fn plain_server_starts_round_trips_restarts_and_stops() -> TestResult {
    let dist = distribution()?;
    assert_eq!(dist.server_version(), line().pinned_version());
    let server = NacosServer::start(&dist, ServerOptions::default())?;
    report("plain start", &server);

    // The ports, in Nacos' layout, all listening (the console's on 3.x only).
    let [raft, http, console, grpc, cluster] = server.ports();
    assert_eq!(
        (raft, console, grpc, cluster),
        (http - 1000, http + 1, http + 1000, http + 1001)
    );
    assert_eq!(server.grpc_addr(), format!("127.0.0.1:{grpc}"));
    assert_eq!(server.http_base(), format!("http://127.0.0.1:{http}/nacos"));
    for port in server.ports() {
        if port == console && server.major() < 3 {
            continue;
        }
        assert!(accepts(port), "port {port} does not accept connections");
    }
    assert!(server.admin_credentials().is_none());
    assert!(
        server.log_dir().join("nacos.log").is_file(),
        "Nacos writes its own logs"
    );

    // Round trip: a persistent instance with metadata in a namespace of its own. It points at
    // the server's own HTTP port, so the server's TCP probe keeps it healthy.
    server.create_namespace_http("harness-ns")?;
    let mut orders = HttpInstance::new("orders", "127.0.0.1", http);
    orders.namespace = "harness-ns".to_owned();
    orders.group = "harness-group".to_owned();
    orders.metadata.insert("zone".to_owned(), "hz".to_owned());
    orders
        .metadata
        .insert("origin".to_owned(), "harness".to_owned());
    server.register_instance_http(&orders)?;
    let listed = server.list_instances_http("harness-ns", "harness-group", "orders")?;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!((listed[0].ip.as_str(), listed[0].port), ("127.0.0.1", http));
    assert_eq!(listed[0].metadata, orders.metadata);
    assert_eq!(listed[0].service_name, "harness-group@@orders");
    assert!(!listed[0].ephemeral);

    // An ephemeral one in the default namespace, then deregistered.
    let mut payments = HttpInstance::new("payments", "127.0.0.2", 9001);
    payments.ephemeral = true;
    server.register_instance_http(&payments)?;
    let listed = server.list_instances_http("public", "DEFAULT_GROUP", "payments")?;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(listed[0].ephemeral);
    // The v1 list is served from a view that events update: a removal shows up shortly after.
    server.deregister_instance_http(&payments)?;
    let gone = eventually(Duration::from_secs(10), || {
        server
            .list_instances_http("public", "DEFAULT_GROUP", "payments")
            .is_ok_and(|l| l.is_empty())
    });
    assert!(gone, "deregistered instance still listed");

    // The server would probe a persistent instance's address: only loopback is allowed.
    let outside = HttpInstance::new("outside", "192.0.2.1", 80);
    assert!(matches!(
        server.register_instance_http(&outside),
        Err(HarnessError::NonLoopbackPersistent { .. })
    ));

    // Restart: same ports, new java, same data (the persistent instance is still there).
    let ports = server.ports();
    let first_pid = server.java_pid().ok_or("a running server has a pid")?;
    server.restart()?;
    report("plain restart", &server);
    assert_eq!(server.ports(), ports);
    assert_ne!(server.java_pid(), Some(first_pid));
    assert!(!java_alive(first_pid, server.data_dir()));
    for port in server.ports() {
        if port == console && server.major() < 3 {
            continue;
        }
        assert!(
            accepts(port),
            "port {port} does not accept connections after restart"
        );
    }
    let listed = server.list_instances_http("harness-ns", "harness-group", "orders")?;
    assert_eq!(
        listed.len(),
        1,
        "persistent instance lost in restart: {listed:?}"
    );

    // A crash (SIGKILL) closes the ports too, and a restart after it recovers the data.
    let crashed_pid = server.java_pid().ok_or("a running server has a pid")?;
    server.kill_hard()?;
    assert!(!java_alive(crashed_pid, server.data_dir()));
    assert!(!server.is_running());
    for port in ports {
        assert!(!accepts(port), "port {port} still open after kill_hard");
    }
    server.restart()?;
    report("plain restart after kill_hard", &server);
    let listed = server.list_instances_http("harness-ns", "harness-group", "orders")?;
    assert_eq!(
        listed.len(),
        1,
        "persistent instance lost in a crash: {listed:?}"
    );

    // Stop: java gone, every port closed, requests refused.
    let pid = server.java_pid().ok_or("a running server has a pid")?;
    let began = Instant::now();
    server.stop()?;
    eprintln!("[harness] plain stop: {:.1?}", began.elapsed());
    assert!(!java_alive(pid, server.data_dir()));
    assert_eq!(server.java_pid(), None);
    for port in ports {
        assert!(!accepts(port), "port {port} still open after stop");
    }
    assert!(matches!(
        server.list_instances_http("public", "DEFAULT_GROUP", "orders"),
        Err(HarnessError::Stopped)
    ));

    let data_dir = server.data_dir().to_path_buf();
    drop(server);
    assert!(
        !data_dir.exists(),
        "data directory {} left behind",
        data_dir.display()
    );
    Ok(())
}

#[test]
fn auth_server_rejects_bad_login_accepts_admin_and_dies_on_drop() -> TestResult {
    let server = NacosServer::start(&distribution()?, ServerOptions::with_auth())?;
    report("auth start", &server);
    let (user, password) = server.admin_credentials().ok_or("auth is on")?;

    // 2.x answers a wrong password with 403; 3.x with a bare 500.
    let bad = server.login(&user, "not-the-password");
    let refused_with = if server.major() >= 3 { 500 } else { 403 };
    assert_eq!(
        bad.as_ref().err().and_then(HarnessError::http_status),
        Some(refused_with),
        "{bad:?}"
    );
    let token = server.login(&user, &password)?;
    assert!(!token.is_empty());

    // Without a token the API refuses; the helpers pass the admin's.
    let status = raw_get_status(
        server.http_port(),
        "/nacos/v1/ns/service/list?pageNo=1&pageSize=10",
    )?;
    assert_eq!(status, 403);
    server.register_instance_http(&HttpInstance::new(
        "guarded",
        "127.0.0.1",
        server.http_port(),
    ))?;
    let listed = server.list_instances_http("public", "DEFAULT_GROUP", "guarded")?;
    assert_eq!(listed.len(), 1, "{listed:?}");

    let pid = server.java_pid().ok_or("a running server has a pid")?;
    let data_dir = server.data_dir().to_path_buf();
    let ports = server.ports();
    drop(server);
    assert!(!java_alive(pid, &data_dir), "java {pid} survived drop");
    assert!(
        !data_dir.exists(),
        "data directory {} left behind",
        data_dir.display()
    );
    assert!(
        eventually(Duration::from_secs(10), || ports
            .iter()
            .all(|port| !accepts(*port))),
        "ports {ports:?} still open after drop"
    );
    Ok(())
}

/// Set for the child process of [`java_dies_with_the_test_process`].
const HOLDER_ENV: &str = "NACOS_HARNESS_HOLDER";

#[test]
#[ignore = "helper process for java_dies_with_the_test_process; does nothing on its own"]
fn holder_keeps_a_server_in_a_static() -> TestResult {
    static HELD: OnceLock<NacosServer> = OnceLock::new();
    if std::env::var_os(HOLDER_ENV).is_none() {
        return Ok(());
    }
    let server = NacosServer::start(&distribution()?, ServerOptions::default())?;
    report("holder start", &server);
    let pid = server.java_pid().ok_or("a running server has a pid")?;
    let line = format!("HOLDER_READY {pid} {}", server.data_dir().display());
    // Statics are never dropped: only the supervisor's pipe can end this java.
    if HELD.set(server).is_err() {
        return Err("holder ran twice".into());
    }
    println!("{line}");
    std::io::stdout().flush()?;
    thread::sleep(Duration::from_secs(120));
    Err("the holder should have been killed".into())
}

#[test]
fn java_dies_with_the_test_process() -> TestResult {
    let mut holder = Command::new(std::env::current_exe()?)
        .args([
            "holder_keeps_a_server_in_a_static",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HOLDER_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = holder.stdout.take().ok_or("holder stdout is piped")?;
    let mut seen = Vec::new();
    let mut ready = None;
    // The holder's own start has the harness's deadline, so this ends.
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        // The test runner prints "test NAME ... " on the same line first.
        if let Some(rest) = line.split_once("HOLDER_READY ").map(|(_, rest)| rest) {
            let (pid, dir) = rest.split_once(' ').ok_or("malformed HOLDER_READY line")?;
            ready = Some((pid.parse::<u32>()?, PathBuf::from(dir)));
            break;
        }
        seen.push(line);
    }
    let Some((pid, data_dir)) = ready else {
        let status = holder.wait()?;
        return Err(format!(
            "holder ended ({status}) without a server:\n{}",
            seen.join("\n")
        )
        .into());
    };
    assert!(java_alive(pid, &data_dir));

    // SIGKILL: no destructor, no exit handler runs in the holder.
    holder.kill()?;
    holder.wait()?;
    let gone = eventually(Duration::from_secs(20), || !java_alive(pid, &data_dir));
    assert!(gone, "java {pid} outlived the killed test process");
    // No destructor ran in the holder: the supervisor removes the data directory.
    let removed = eventually(Duration::from_secs(20), || !data_dir.exists());
    assert!(removed, "data directory {} left behind", data_dir.display());
    Ok(())
}
