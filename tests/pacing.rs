//! Pacing that follows the destination, through a real client: on the
//! testkit server, a destination that slows down or refuses for load in
//! the middle of a first sync gets fewer sets at once (the limit gauge
//! falls) and never more than the ceiling, and everything still arrives; on
//! a real Nacos, the limit grows on a first sync (adaptation happens on a
//! real server, not only on fakes).
//!
//! No timing assertion on speed: figures are the benchmark's business.
//! Every wait is on a condition with a deadline.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nacos_replicator::cluster::{Client, ClientConfig};
use nacos_replicator::model::{ClusterId, DEFAULT_GROUP, DEFAULT_NAMESPACE, Instance, ServiceKey};
use nacos_replicator::reconcile::limit::LimitSettings;
use nacos_replicator::reconcile::publish::{Publisher, PublisherConfig};
use nacos_replicator::runtime::Tasks;
use nacos_replicator::telemetry::Telemetry;
use nacos_replicator::testing::fake::{FakeNacos, FakeOptions};
use support::*;

/// A ceiling low enough that a sync of thousands reaches it.
const CEILING: usize = 32;

fn key(name: &str) -> ServiceKey {
    ServiceKey::new(DEFAULT_NAMESPACE, DEFAULT_GROUP, name)
}

fn service(i: usize) -> String {
    format!("paced-{i}")
}

fn instances(i: usize) -> Vec<Instance> {
    (0..3)
        .map(|n| Instance::new(format!("10.9.{}.{}", i / 250, i % 250), 8000 + n))
        .collect()
}

/// The destination's limit gauge, as `/metrics` shows it.
fn limit_gauge(t: &Telemetry) -> Option<usize> {
    let text = t.encode_metrics();
    let prefix = "nacos_replicator_publish_limit{cluster=\"dst\",namespace=\"public\"} ";
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse().ok())
}

async fn wait_limit(t: &Telemetry, what: &str, ok: impl Fn(usize) -> bool) -> usize {
    eventually(what, DEADLINE, || {
        let seen = limit_gauge(t).filter(|l| ok(*l));
        async move { seen }
    })
    .await
}

/// A publisher to `fake` through a real client, with the test ceiling.
async fn paced(fake: &FakeNacos, tasks: &Tasks) -> (Publisher, Telemetry) {
    let client = Client::start(
        ClientConfig::new("dst", vec![fake.addr()], DEFAULT_NAMESPACE),
        tasks,
    )
    .expect("valid config");
    client.wait_connected(DEADLINE).await.expect("connects");
    let config = PublisherConfig {
        cluster: ClusterId("dst".into()),
        max_in_flight: CEILING,
        ..PublisherConfig::default()
    };
    let telemetry = config.telemetry.clone();
    (Publisher::start(client, config, tasks), telemetry)
}

/// Waits until every one of `n` services is at the fake as submitted.
async fn all_arrive(fake: &FakeNacos, p: &Publisher, n: usize) {
    eventually("the publisher to settle", DEADLINE, || {
        let done = p.settled();
        async move { done.then_some(()) }
    })
    .await;
    for i in 0..n {
        let shown = fingerprint(&fake.instances(&key(&service(i))));
        assert_eq!(shown, fingerprint(&instances(i)), "{}", service(i));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_destination_that_slows_down_mid_sync_is_not_overrun() {
    let fake = FakeNacos::start(FakeOptions::default())
        .await
        .expect("fake");
    fake.set_call_delay(Duration::from_millis(10));
    let tasks = Tasks::default();
    let (p, t) = paced(&fake, &tasks).await;
    let start = LimitSettings::default().initial;
    assert_eq!(limit_gauge(&t), Some(start));
    let n = 6000;
    for i in 0..n {
        p.submit(key(&service(i)), instances(i));
    }
    // Fast answers: the limit climbs from its start.
    let grown = wait_limit(&t, "the limit to grow", |l| l >= 3 * start).await;
    // The destination slows down fifteenfold, mid-sync.
    fake.set_call_delay(Duration::from_millis(150));
    assert!(p.pending() > 0, "the sync ended before the slowdown");
    let fallen = wait_limit(&t, "the limit to fall", |l| l * 2 <= grown).await;
    let stats = fake.stats();
    assert!(
        stats.publishes_in_progress_peak <= CEILING,
        "{} calls at once at the destination, over the ceiling {CEILING}",
        stats.publishes_in_progress_peak
    );
    assert!(
        stats.publishes_in_progress_peak > start,
        "the limit grew but the publisher never used it ({} at once)",
        stats.publishes_in_progress_peak
    );
    // While it is slow, the destination sees about the limit, not the ceiling.
    eventually(
        "in flight at the destination down to the limit",
        DEADLINE,
        || {
            let now = fake.stats().publishes_in_progress;
            async move { (now <= fallen).then_some(()) }
        },
    )
    .await;
    // Fast again: everything arrives, as submitted.
    fake.set_call_delay(Duration::ZERO);
    all_arrive(&fake, &p, n).await;
    assert!(fake.stats().publishes_in_progress_peak <= CEILING);
    tasks.token().cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_for_load_lower_the_limit_and_every_set_still_arrives() {
    let fake = FakeNacos::start(FakeOptions::default())
        .await
        .expect("fake");
    fake.set_call_delay(Duration::from_millis(5));
    let tasks = Tasks::default();
    let (p, t) = paced(&fake, &tasks).await;
    let n = 4000;
    for i in 0..n {
        p.submit(key(&service(i)), instances(i));
    }
    let start = LimitSettings::default().initial;
    let grown = wait_limit(&t, "the limit to grow", |l| l >= 3 * start).await;
    // Nacos' TPS control answers 503 when it trips: a refusal for load.
    fake.fail_next(5, 503);
    assert!(p.pending() > 0, "the sync ended before the refusals");
    wait_limit(&t, "the limit to fall", |l| l < grown).await;
    all_arrive(&fake, &p, n).await;
    assert_eq!(fake.stats().calls_failed_on_purpose, 5);
    assert!(fake.stats().publishes_in_progress_peak <= CEILING);
    tasks.token().cancel();
}

/// On a real Nacos: a first sync of a few hundred services takes the limit
/// above its start (the server keeps up), and every set arrives.
#[tokio::test(flavor = "multi_thread")]
async fn on_a_real_server_the_limit_grows_during_a_first_sync() {
    let server = shared_server();
    let tasks = Tasks::default();
    let ns = DEFAULT_NAMESPACE;
    let destination = client(server, ns, &tasks);
    let reader = client(server, ns, &tasks);
    destination
        .wait_connected(DEADLINE)
        .await
        .expect("connects");
    reader.wait_connected(DEADLINE).await.expect("connects");
    let p = Publisher::start(destination, PublisherConfig::default(), &tasks);
    // The highest limit the publisher reports, watched from the side.
    let peak = Arc::new(AtomicUsize::new(0));
    let mut stats = p.stats();
    let watching = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(stats.borrow_and_update().limit, Ordering::SeqCst);
                if stats.changed().await.is_err() {
                    return;
                }
            }
        })
    };
    let prefix = unique("paced");
    let n = 400;
    let names: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        p.submit(key(name), instances(i));
    }
    eventually("the publisher to settle", Duration::from_secs(60), || {
        let done = p.settled();
        async move { done.then_some(()) }
    })
    .await;
    let s = *p.stats().borrow();
    assert_eq!((s.applied, s.failed), (n as u64, 0), "{s:?}");
    // Everything is on the server, as sent.
    for (i, name) in names.iter().enumerate() {
        let shown = wait_query(&reader, name, 3, name, DEADLINE).await;
        assert_eq!(fingerprint(&shown.instances), fingerprint(&instances(i)));
    }
    let start = LimitSettings::default().initial;
    let peak = peak.load(Ordering::SeqCst);
    assert!(
        peak > start,
        "the limit never rose above {start} (peak {peak})"
    );
    eprintln!("limit on a first sync of {n} services on a real server: peak {peak}");
    watching.abort();
    tasks.token().cancel();
}
