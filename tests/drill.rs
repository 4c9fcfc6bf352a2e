//! The DR drill on the in-process fake: two regions `a` and `b`, an agent
//! `a -> b` with drills, natives on `a`. What the drill must show: the
//! source's replicas held through a drill shorter than `hold_for`, or
//! withdrawn at its expiry (or at once under `source_loss = "withdraw"`),
//! and restored by a fresh listing (which brings what changed during the
//! drill); one drill at a time; an unknown source named with the known
//! ones; `DELETE` ends a drill early. Region `a` itself is never touched.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use nacos_replicator::agent::{Agent, AgentError, Drills, Reloader};
use nacos_replicator::cluster::{Client, ClientConfig};
use nacos_replicator::model::{DEFAULT_GROUP, DEFAULT_NAMESPACE, Instance, ServiceKey};
use nacos_replicator::runtime::Tasks;
use nacos_replicator::status::drill::{Drill, Phase, Refusal, StepKind};
use nacos_replicator::testing::fake::{FakeNacos, FakeOptions};
use support::*;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

fn orders() -> ServiceKey {
    ServiceKey::new(DEFAULT_NAMESPACE, DEFAULT_GROUP, "orders")
}

fn natives(n: u16) -> Vec<Instance> {
    (1..=n)
        .map(|i| Instance::new(format!("10.0.0.{i}"), 80))
        .collect()
}

/// Two fakes, natives of `orders` on `a`, an agent `a -> b` with drills
/// and a status server, ready and replicating.
struct Setup {
    a: FakeNacos,
    b: FakeNacos,
    app: Client,
    drills: Drills,
    status: SocketAddr,
    stop: CancellationToken,
    agent: JoinHandle<Result<(), AgentError>>,
    reloader: Reloader,
    apps: Tasks,
}

impl Setup {
    async fn new(timings: &str) -> Self {
        let a = FakeNacos::start(FakeOptions::default()).await.expect("a");
        let b = FakeNacos::start(FakeOptions::default()).await.expect("b");
        let apps = Tasks::default();
        let app = Client::start(
            ClientConfig::new("app", vec![a.addr()], DEFAULT_NAMESPACE),
            &apps,
        )
        .expect("valid config");
        app.wait_connected(DEADLINE).await.expect("app connects");
        app.publish(DEFAULT_GROUP, "orders", natives(2))
            .await
            .expect("natives");
        let status = free_local_addr();
        let config = AgentToml::new()
            .timings(timings)
            .cluster("a", &a.addr(), &[DEFAULT_NAMESPACE])
            .cluster("b", &b.addr(), &[DEFAULT_NAMESPACE])
            .route("a", "b")
            .config();
        let agent = Agent::new(config)
            .with_status_server(status)
            .with_drills(None);
        let drills = agent.drills().expect("drills wired");
        let reloader = agent.reloader();
        let ready = agent.telemetry();
        let stop = CancellationToken::new();
        let agent = tokio::spawn(agent.run(stop.clone()));
        let setup = Self {
            a,
            b,
            app,
            drills,
            status,
            stop,
            agent,
            reloader,
            apps,
        };
        setup.replicas_in_b(2, "the first sync").await;
        eventually("the agent ready", DEADLINE, || {
            let r = ready.is_ready();
            async move { r.then_some(()) }
        })
        .await;
        setup
    }

    async fn replicas_in_b(&self, n: usize, when: &str) {
        let what = format!("{n} replicas of orders in b ({when})");
        eventually(&what, DEADLINE, || {
            let got = self.b.instances(&orders()).len();
            async move { (got == n).then_some(()) }
        })
        .await;
    }

    /// Waits until the drill has recorded `step`; returns the document.
    async fn step(&self, step: StepKind) -> Drill {
        let what = format!("the drill records {}", step.name());
        eventually(&what, DEADLINE, || {
            let d = self.drills.current().expect("a drill");
            async move { d.timeline.iter().any(|s| s.step == step).then_some(d) }
        })
        .await
    }

    async fn converged(&self) -> Drill {
        let d = self.step(StepKind::Converged).await;
        assert_eq!(d.phase, Phase::Converged, "{d:#?}");
        d
    }

    /// Stops the agent, after checking region a was never touched: it
    /// holds the `natives` the test published there, nothing else.
    async fn stop(self, natives: usize) {
        let in_a = self.a.instances(&orders());
        assert_eq!(in_a.len(), natives, "a was touched: {in_a:?}");
        self.stop.cancel();
        self.agent.await.expect("no panic").expect("the agent ran");
        self.apps.shutdown(Duration::from_secs(2)).await;
    }
}

fn steps(d: &Drill) -> Vec<&'static str> {
    d.timeline.iter().map(|s| s.step.name()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_shorter_than_the_hold_holds_throughout_and_relists_what_changed() {
    let s = Setup::new("hold_for = \"5m\"\n").await;
    let d = s
        .drills
        .start("a", Duration::from_secs(600))
        .expect("started");
    assert_eq!((d.replicas, d.services), (2, 1), "{d:#?}");
    s.step(StepKind::HoldStarted).await;
    // A third native during the drill: the isolated source's news are
    // withheld, so b keeps exactly the two held replicas while it lasts.
    s.app
        .publish(DEFAULT_GROUP, "orders", natives(3))
        .await
        .expect("a third native");
    eventually("the third native in a", DEADLINE, || {
        let n = s.a.instances(&orders()).len();
        async move { (n == 3).then_some(()) }
    })
    .await;
    let window = tokio::time::Instant::now() + Duration::from_secs(1);
    while tokio::time::Instant::now() < window {
        assert_eq!(
            s.b.instances(&orders()).len(),
            2,
            "b changed during the drill"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // DELETE /drill, as an operator would end it early.
    let (code, _) = request(s.status, "DELETE", "").await;
    assert_eq!(code, 200);
    // The restore is a fresh listing: it brings the third native at once.
    s.replicas_in_b(3, "after the restore").await;
    let d = s.converged().await;
    assert!(d.ended_early, "{d:#?}");
    assert_eq!(
        steps(&d),
        [
            "started",
            "hold_started",
            "held_throughout",
            "restored",
            "relisted",
            "converged"
        ],
        "{d:#?}"
    );
    s.stop(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_longer_than_the_hold_withdraws_at_expiry_then_restores() {
    let s = Setup::new("hold_for = \"1s\"\n").await;
    s.drills
        .start("a", Duration::from_secs(3))
        .expect("started");
    s.step(StepKind::HoldExpired).await;
    s.replicas_in_b(0, "hold expired").await;
    let d = s.step(StepKind::Withdrawn).await;
    assert_eq!(
        d.phase,
        Phase::Isolated,
        "withdrawn before the drill ended: {d:#?}"
    );
    s.app
        .publish(DEFAULT_GROUP, "orders", natives(3))
        .await
        .expect("a third native");
    // Its time is up by itself: restored and relisted.
    s.replicas_in_b(3, "after the restore").await;
    let d = s.converged().await;
    assert!(!d.ended_early);
    assert_eq!(
        steps(&d),
        [
            "started",
            "hold_started",
            "hold_expired",
            "withdrawn",
            "restored",
            "relisted",
            "converged"
        ],
        "{d:#?}"
    );
    let withdrawn = d.timeline.iter().find(|s| s.step == StepKind::Withdrawn);
    assert!(
        withdrawn.is_some_and(|s| s.detail.contains("2 replica(s)")),
        "{d:#?}"
    );
    s.stop(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_withdraw_policy_the_replicas_go_at_once() {
    let s = Setup::new("source_loss = \"withdraw\"\n").await;
    s.drills
        .start("a", Duration::from_secs(600))
        .expect("started");
    s.replicas_in_b(0, "withdrawn at once").await;
    s.step(StepKind::Withdrawn).await;
    s.app
        .publish(DEFAULT_GROUP, "orders", natives(3))
        .await
        .expect("a third native");
    s.drills.end().expect("ended");
    s.replicas_in_b(3, "after the restore").await;
    let d = s.converged().await;
    assert_eq!(
        steps(&d),
        [
            "started",
            "withdrawn_at_once",
            "withdrawn",
            "restored",
            "relisted",
            "converged"
        ],
        "{d:#?}"
    );
    s.stop(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_drill_at_a_time_of_a_known_source() {
    let s = Setup::new("hold_for = \"5m\"\n").await;
    match s.drills.start("z", Duration::from_secs(60)) {
        Err(Refusal::UnknownSource { cluster, known }) => {
            assert_eq!((cluster.as_str(), known), ("z", vec!["a".to_owned()]));
        }
        other => panic!("unknown source accepted: {other:?}"),
    }
    assert_eq!(s.drills.end().err(), Some(Refusal::NoDrill));
    let first = s
        .drills
        .start("a", Duration::from_secs(600))
        .expect("started");
    match s.drills.start("a", Duration::from_secs(60)) {
        Err(Refusal::Busy(running)) => assert_eq!(running.id, first.id),
        other => panic!("a second drill started: {other:?}"),
    }
    // Over HTTP: 409 naming the running drill.
    let (code, body) = request(s.status, "POST", r#"{"isolate":"a","for":"1m"}"#).await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["drill"]["id"], first.id, "{body}");
    let (code, body) = request(s.status, "GET", "").await;
    assert_eq!(
        (code, body["phase"].as_str()),
        (200, Some("isolated")),
        "{body}"
    );
    s.drills.end().expect("ended");
    s.converged().await;
    // Once converged, the next may start.
    let second = s
        .drills
        .start("a", Duration::from_secs(1))
        .expect("a second drill");
    assert_eq!(second.id, first.id + 1);
    s.converged().await;
    s.stop(2).await;
}

/// One HTTP/1.1 request to `/drill`: status code and JSON body.
async fn request(addr: SocketAddr, method: &str, body: &str) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "{method} /drill HTTP/1.1\r\nHost: s\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream
        .write_all(format!("{head}{body}").as_bytes())
        .await
        .expect("write");
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.expect("read");
    let code = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("code");
    let json = raw
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(serde_json::Value::Null);
    (code, json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drill_command_says_why_the_agent_refused() {
    let s = Setup::new("hold_for = \"5m\"\n").await;
    let run = |args: &[&str]| {
        let status = s.status.to_string();
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_nacos-replicator"));
        command.args(["drill", "--status", &status]).args(args);
        async move { command.output().await.expect("the drill command runs") }
    };
    let out = run(&["--isolate", "z", "--for", "1m"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no source cluster \"z\"") && stderr.contains("the sources are: a"),
        "{stderr}"
    );
    let out = run(&["--end"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no drill is running"), "{stderr}");
    let out = run(&["--isolate", "a", "--for", "soon"]).await;
    assert_eq!(out.status.code(), Some(2), "clap's usage error");
    // A short drill, followed to its end: exit 0, every step printed.
    let out = run(&["--isolate", "a", "--for", "1s"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in [
        "started",
        "hold_started",
        "held_throughout",
        "restored",
        "relisted",
        "converged",
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.split_whitespace().nth(1) == Some(step)),
            "no {step}:\n{stdout}"
        );
    }
    s.stop(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_added_by_a_reload_can_be_drilled() {
    let s = Setup::new("hold_for = \"5m\"\n").await;
    let c = FakeNacos::start(FakeOptions::default()).await.expect("c");
    let c_app = Client::start(
        ClientConfig::new("app-c", vec![c.addr()], DEFAULT_NAMESPACE),
        &s.apps,
    )
    .expect("valid config");
    c_app.wait_connected(DEADLINE).await.expect("app connects");
    c_app
        .publish(DEFAULT_GROUP, "stock", natives(1))
        .await
        .expect("a native in c");
    assert!(
        matches!(
            s.drills.start("c", Duration::from_secs(60)),
            Err(Refusal::UnknownSource { .. })
        ),
        "c drilled before it was configured"
    );
    let config = AgentToml::new()
        .timings("hold_for = \"5m\"\n")
        .cluster("a", &s.a.addr(), &[DEFAULT_NAMESPACE])
        .cluster("b", &s.b.addr(), &[DEFAULT_NAMESPACE])
        .cluster("c", &c.addr(), &[DEFAULT_NAMESPACE])
        .route("a", "b")
        .route("c", "b")
        .config();
    s.reloader.reload(config).await.expect("reloaded");
    let stock = ServiceKey::new(DEFAULT_NAMESPACE, DEFAULT_GROUP, "stock");
    eventually("c's native replicated into b", DEADLINE, || {
        let n = s.b.instances(&stock).len();
        async move { (n == 1).then_some(()) }
    })
    .await;
    // The engine takes the drill's Lost from c's new watcher (its
    // generation): the hold starts, and the restore relists c.
    s.drills
        .start("c", Duration::from_secs(600))
        .expect("c drilled");
    s.step(StepKind::HoldStarted).await;
    s.drills.end().expect("ended");
    let d = s.converged().await;
    assert_eq!(d.source, "c");
    assert_eq!(s.b.instances(&stock).len(), 1, "c's replica lost");
    s.stop(2).await;
}
