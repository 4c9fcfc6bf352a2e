//! Live reload, on the in-process fake (whose state a checker can sample
//! every few milliseconds without disturbing it): added routes start,
//! removed routes withdraw their replicas, unchanged routes keep every
//! replica throughout; the binary reloads on SIGHUP and on a change of the
//! file, and rejects a file that does not load, keeping what runs.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use nacos_replicator::agent::Agent;
use nacos_replicator::cluster::{Client, ClientConfig};
use nacos_replicator::model::{DEFAULT_GROUP, DEFAULT_NAMESPACE, ServiceKey};
use nacos_replicator::runtime::Tasks;
use nacos_replicator::testing::fake::{FakeNacos, FakeOptions};
use support::*;
use tokio_util::sync::CancellationToken;

async fn fake() -> FakeNacos {
    FakeNacos::start(FakeOptions::default())
        .await
        .expect("the fake starts")
}

fn service(name: &str) -> ServiceKey {
    ServiceKey::new(DEFAULT_NAMESPACE, DEFAULT_GROUP, name)
}

/// An application on `fake` publishing `n` instances of `name`.
async fn natives(fake: &FakeNacos, name: &str, n: u16, tasks: &Tasks) -> Client {
    let config = ClientConfig::new("app", vec![fake.addr()], DEFAULT_NAMESPACE);
    let app = Client::start(config, tasks).expect("valid config");
    app.wait_connected(DEADLINE).await.expect("app connects");
    app.publish(DEFAULT_GROUP, name, instances_on("10.1", n, 80))
        .await
        .expect("natives");
    app
}

/// Waits until `fake` shows exactly `n` instances of `name`.
async fn shows(fake: &FakeNacos, name: &str, n: usize) {
    let what = format!("{n} instance(s) of {name}");
    eventually(&what, DEADLINE, || {
        let count = fake.instances(&service(name)).len();
        async move { (count == n).then_some(()) }
    })
    .await;
}

/// Samples how many instances of one service a fake shows, every 2 ms,
/// and keeps the fewest seen while armed.
struct Checker {
    armed: Arc<AtomicBool>,
    fewest: Arc<AtomicUsize>,
    samples: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Checker {
    fn start(fake: &Arc<FakeNacos>, name: &str) -> Checker {
        let checker = Checker {
            armed: Arc::new(AtomicBool::new(false)),
            fewest: Arc::new(AtomicUsize::new(usize::MAX)),
            samples: Arc::new(AtomicUsize::new(0)),
            stop: CancellationToken::new(),
        };
        let (armed, fewest, samples, stop) = (
            checker.armed.clone(),
            checker.fewest.clone(),
            checker.samples.clone(),
            checker.stop.clone(),
        );
        let (fake, key) = (fake.clone(), service(name));
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(2));
            while !stop.is_cancelled() {
                every.tick().await;
                if armed.load(Ordering::SeqCst) {
                    fewest.fetch_min(fake.instances(&key).len(), Ordering::SeqCst);
                    samples.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        checker
    }

    fn arm(&self, on: bool) {
        self.armed.store(on, Ordering::SeqCst);
    }

    /// Arms and waits for the first armed sample: a change that completes
    /// within one sampling interval would otherwise leave nothing seen
    /// (`fewest` still `usize::MAX`), whatever the fake showed.
    async fn arm_sampled(&self) {
        let before = self.samples.load(Ordering::SeqCst);
        self.arm(true);
        eventually("a first armed sample", DEADLINE, || {
            let taken = self.samples.load(Ordering::SeqCst) > before;
            async move { taken.then_some(()) }
        })
        .await;
    }

    /// The fewest instances seen, and how many samples were taken.
    fn seen(&self) -> (usize, usize) {
        (
            self.fewest.load(Ordering::SeqCst),
            self.samples.load(Ordering::SeqCst),
        )
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn three_regions(a: &FakeNacos, b: &FakeNacos, c: &FakeNacos) -> AgentToml {
    AgentToml::new()
        .cluster("a", &a.addr(), &[DEFAULT_NAMESPACE])
        .cluster("b", &b.addr(), &[DEFAULT_NAMESPACE])
        .cluster("c", &c.addr(), &[DEFAULT_NAMESPACE])
}

fn connection_ids(fake: &FakeNacos) -> Vec<String> {
    let mut ids: Vec<String> = fake.connections().into_iter().map(|c| c.id).collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_starts_added_routes_withdraws_removed_ones_and_keeps_the_rest_without_a_gap() {
    let (a, b, c) = (fake().await, fake().await, Arc::new(fake().await));
    let apps = Tasks::default();
    let _on_a = natives(&a, "orders", 3, &apps).await;
    let _on_b = natives(&b, "payments", 2, &apps).await;
    let regions = three_regions(&a, &b, &c);
    let agent = Agent::new(regions.clone().route("a", "c").config());
    let reloader = agent.reloader();
    let telemetry = agent.telemetry();
    let token = CancellationToken::new();
    let running = tokio::spawn(agent.run(token.clone()));
    shows(&c, "orders", 3).await;
    let before = connection_ids(&c);

    // Add b -> c: payments arrive; orders never leave, not for a sample.
    let orders = Checker::start(&c, "orders");
    orders.arm(true);
    let report = reloader
        .reload(regions.clone().route("a", "c").route("b", "c").config())
        .await
        .expect("the reload is taken");
    assert_eq!(report.routes.added.len(), 1, "{report}");
    assert_eq!(report.routes.unchanged, 1, "{report}");
    shows(&c, "payments", 2).await;
    orders.arm(false);
    let (fewest, samples) = orders.seen();
    assert!(samples > 10, "the checker hardly ran ({samples} samples)");
    assert_eq!(fewest, 3, "an unchanged route's replicas went missing");
    // The destination kept its connection: nothing was published anew.
    let after: Vec<String> = connection_ids(&c)
        .into_iter()
        .filter(|id| before.contains(id))
        .collect();
    assert_eq!(after, before, "the connection to c was replaced");

    // Remove a -> c: orders are withdrawn; payments stay throughout.
    let payments = Checker::start(&c, "payments");
    payments.arm_sampled().await;
    let report = reloader
        .reload(regions.clone().route("b", "c").config())
        .await
        .expect("the reload is taken");
    assert_eq!(report.routes.removed.len(), 1, "{report}");
    shows(&c, "orders", 0).await;
    payments.arm(false);
    assert_eq!(
        payments.seen().0,
        2,
        "an unchanged route's replicas went missing"
    );
    // Nothing is read from a any more: the agent left it, and the status
    // document no longer shows it or the route.
    eventually("the agent gone from a", DEADLINE, || {
        let agents = a.connections().len();
        async move { (agents == 1).then_some(()) }
    })
    .await;
    let status = telemetry.status();
    assert!(!status.connections.contains_key("a/public"), "{status:?}");
    assert!(!status.routes.contains_key("a -> c"), "{status:?}");
    assert!(status.routes.contains_key("b -> c"), "{status:?}");

    token.cancel();
    tokio::time::timeout(DEADLINE, running)
        .await
        .expect("run returns once cancelled")
        .expect("no panic")
        .expect("the agent ran");
    apps.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reloads_on_sighup_and_rejects_a_file_that_does_not_load() {
    let (a, b, c) = (fake().await, fake().await, fake().await);
    let apps = Tasks::default();
    let _on_a = natives(&a, "orders", 3, &apps).await;
    let _on_b = natives(&b, "payments", 2, &apps).await;
    let regions = three_regions(&a, &b, &c).status_listen(free_local_addr());
    let agent =
        e2e::AgentProcess::start_with(&regions.clone().route("a", "c"), &["--config-poll", "0s"]);
    shows(&c, "orders", 3).await;

    // A route to a cluster nobody defined: rejected, named, nothing changes.
    agent.write_config(&regions.clone().route("a", "c").route("b", "z").text());
    assert!(agent.signal("HUP"), "kill -HUP");
    let rejected = eventually("the reload rejected", DEADLINE, || {
        let log = agent.log();
        async move {
            log.lines()
                .find(|l| l.contains("reload rejected"))
                .map(str::to_owned)
        }
    })
    .await;
    assert!(rejected.contains("SIGHUP"), "{rejected}");
    assert!(rejected.contains("agent.toml: routes[1].to"), "{rejected}");
    assert_eq!(c.instances(&service("orders")).len(), 3);

    // Fixed and signalled again: payments arrive.
    agent.write_config(&regions.clone().route("a", "c").route("b", "c").text());
    assert!(agent.signal("HUP"), "kill -HUP");
    shows(&c, "payments", 2).await;
    assert_eq!(c.instances(&service("orders")).len(), 3);
    let log = agent.log();
    assert!(log.contains("configuration reloaded"), "{log}");
    apps.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reloads_when_the_file_changes() {
    let (a, b, c) = (fake().await, fake().await, fake().await);
    let apps = Tasks::default();
    let _on_a = natives(&a, "orders", 1, &apps).await;
    let _on_b = natives(&b, "payments", 1, &apps).await;
    let regions = three_regions(&a, &b, &c).status_listen(free_local_addr());
    let agent = e2e::AgentProcess::start_with(
        &regions.clone().route("a", "c"),
        &["--config-poll", "100ms"],
    );
    shows(&c, "orders", 1).await;
    // No signal: the new content is enough (as a ConfigMap volume changes).
    agent.write_config(&regions.clone().route("b", "c").text());
    shows(&c, "payments", 1).await;
    shows(&c, "orders", 0).await;
    let log = agent.log();
    assert!(log.contains("the file changed"), "{log}");
    apps.shutdown(Duration::from_secs(2)).await;
}
