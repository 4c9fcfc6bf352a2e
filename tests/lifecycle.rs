//! What the library promises about its own lifetime, shown on the in-process
//! fake (which, unlike a real server, lets a test read a destination's state
//! the instant an agent returns): when `Agent::run` returns every connection
//! is closed and the status port is free; a dropped `Publisher` closes its
//! connection; an agent without routes idles, ready, until cancelled.

mod support;

use std::time::Duration;

use nacos_replicator::agent::Agent;
use nacos_replicator::cluster::{Client, ClientConfig};
use nacos_replicator::model::{DEFAULT_GROUP, DEFAULT_NAMESPACE, Instance, ServiceKey};
use nacos_replicator::reconcile::publish::{Publisher, PublisherConfig};
use nacos_replicator::runtime::Tasks;
use nacos_replicator::testing::fake::{FakeNacos, FakeOptions};
use support::*;
use tokio_util::sync::CancellationToken;

async fn fake() -> FakeNacos {
    FakeNacos::start(FakeOptions::default())
        .await
        .expect("the fake starts")
}

fn orders() -> ServiceKey {
    ServiceKey::new(DEFAULT_NAMESPACE, DEFAULT_GROUP, "orders")
}

fn client(fake: &FakeNacos, tasks: &Tasks) -> Client {
    let config = ClientConfig::new("app", vec![fake.addr()], DEFAULT_NAMESPACE);
    Client::start(config, tasks).expect("valid config")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_run_returns_the_replicas_are_gone_and_the_status_port_is_free() {
    let (a, b) = (fake().await, fake().await);
    let apps = Tasks::default();
    let app = client(&a, &apps);
    app.wait_connected(DEADLINE).await.expect("app connects");
    let natives = vec![Instance::new("10.0.0.1", 80), Instance::new("10.0.0.2", 80)];
    app.publish(DEFAULT_GROUP, "orders", natives)
        .await
        .expect("natives");

    let status = free_local_addr();
    let config = AgentToml::new()
        .cluster("a", &a.addr(), &[DEFAULT_NAMESPACE])
        .cluster("b", &b.addr(), &[DEFAULT_NAMESPACE])
        .route("a", "b")
        .config();
    let token = CancellationToken::new();
    let agent = tokio::spawn(
        Agent::new(config)
            .with_status_server(status)
            .run(token.clone()),
    );
    eventually("two replicas in b", DEADLINE, || {
        let n = b.instances(&orders()).len();
        async move { (n == 2).then_some(()) }
    })
    .await;
    eventually("the status server answers", DEADLINE, || async move {
        http_get(status, "/healthz").await.map(|_| ())
    })
    .await;

    token.cancel();
    agent.await.expect("no panic").expect("the agent ran");
    // No waiting here: `run` has returned, so it has closed its connections.
    assert_eq!(b.instances(&orders()), Vec::new(), "replicas outlived run");
    assert!(
        b.connections().is_empty(),
        "connections left open in b: {:?}",
        b.connections()
    );
    std::net::TcpListener::bind(status).expect("the status port is free again");
    apps.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_publisher_closes_its_connection() {
    let b = fake().await;
    let tasks = Tasks::default();
    let publisher = Publisher::start(client(&b, &tasks), PublisherConfig::default(), &tasks);
    publisher.submit(orders(), vec![Instance::new("10.0.0.1", 80)]);
    eventually("the replica in b", DEADLINE, || {
        let n = b.instances(&orders()).len();
        async move { (n == 1).then_some(()) }
    })
    .await;
    assert_eq!(b.connections().len(), 1);

    // Not cancelled: only dropped.
    drop(publisher);
    eventually("the connection closed", DEADLINE, || {
        let open = b.connections().len();
        async move { (open == 0).then_some(()) }
    })
    .await;
    assert_eq!(b.instances(&orders()), Vec::new());
    assert!(!tasks.is_cancelled(), "the owner's tasks were stopped too");
    let report = tasks.shutdown(Duration::from_secs(2)).await;
    assert_eq!(report.aborted, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_routes_idles_ready_until_cancelled() {
    let a = fake().await;
    let config = AgentToml::new()
        .cluster("a", &a.addr(), &[DEFAULT_NAMESPACE])
        .config();
    assert!(config.routes.is_empty());
    let agent = Agent::new(config);
    let telemetry = agent.telemetry();
    let token = CancellationToken::new();
    let running = tokio::spawn(agent.run(token.clone()));
    eventually("ready with nothing to do", DEADLINE, || {
        let ready = telemetry.is_ready();
        async move { ready.then_some(()) }
    })
    .await;
    assert!(
        !running.is_finished(),
        "run returned before it was cancelled"
    );
    token.cancel();
    tokio::time::timeout(DEADLINE, running)
        .await
        .expect("run returns once cancelled")
        .expect("no panic")
        .expect("the agent ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_drains_on_sigterm_and_a_clean_stop_logs_no_warning() {
    let (a, b) = (fake().await, fake().await);
    let apps = Tasks::default();
    let app = client(&a, &apps);
    app.wait_connected(DEADLINE).await.expect("app connects");
    app.publish(DEFAULT_GROUP, "orders", vec![Instance::new("10.0.0.1", 80)])
        .await
        .expect("natives");
    let status = free_local_addr();
    let toml = AgentToml::new()
        .status_listen(status)
        .cluster("a", &a.addr(), &[DEFAULT_NAMESPACE])
        .cluster("b", &b.addr(), &[DEFAULT_NAMESPACE])
        .route("a", "b");
    let mut agent = e2e::AgentProcess::start(&toml);
    eventually("the agent ready", DEADLINE, || async move {
        http_get(status, "/readyz")
            .await
            .and_then(|(code, _)| (code == 200).then_some(()))
    })
    .await;
    assert_eq!(b.instances(&orders()).len(), 1);

    let exit = agent
        .terminate()
        .await
        .expect("the agent exits after SIGTERM");
    let log = agent.log();
    assert!(exit.success(), "exit {exit}\n{log}");
    assert!(log.contains("agent stopped"), "no clean stop in:\n{log}");
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    assert!(warnings.is_empty(), "a clean stop logged {warnings:#?}");
    assert!(!log.contains('\x1b'), "colour codes in a log file");
    assert_eq!(
        b.instances(&orders()),
        Vec::new(),
        "replicas outlived the agent"
    );
    apps.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_while_draining_exits_at_once() {
    use tokio::io::AsyncWriteExt;
    let a = fake().await;
    let status = free_local_addr();
    let toml = AgentToml::new()
        .status_listen(status)
        .cluster("a", &a.addr(), &[DEFAULT_NAMESPACE]);
    let mut agent = e2e::AgentProcess::start(&toml);
    eventually("the agent ready", DEADLINE, || async move {
        http_get(status, "/readyz")
            .await
            .and_then(|(code, _)| (code == 200).then_some(()))
    })
    .await;
    // A request begun and never finished: the status server's graceful
    // stop waits for it, so the drain lasts the whole grace period.
    let mut stuck = tokio::net::TcpStream::connect(status)
        .await
        .expect("connect to the status port");
    stuck
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: status\r\n")
        .await
        .expect("half a request");
    let first = agent.signal("TERM");
    assert!(first, "kill -TERM");
    eventually("the first signal taken", DEADLINE, || {
        let log = agent.log();
        async move { log.contains("signal received").then_some(()) }
    })
    .await;
    assert!(
        agent.running(),
        "drained before the second signal:\n{}",
        agent.log()
    );
    let exit = agent
        .terminate()
        .await
        .expect("exits after the second signal");
    assert_eq!(exit.code(), Some(130), "{}", agent.log());
    drop(stuck);
}
