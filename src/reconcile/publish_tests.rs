//! The publisher on an in-memory registry, on a paused clock.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::reconcile::memory::MemoryRegistry;

pub(super) fn key(name: &str) -> ServiceKey {
    ServiceKey::new("public", "DEFAULT_GROUP", name)
}

pub(super) fn set(n: usize) -> Vec<Instance> {
    (0..n)
        .map(|i| Instance::new(format!("10.0.0.{i}"), 80))
        .collect()
}

async fn until(
    stats: &mut watch::Receiver<PublisherStats>,
    what: impl Fn(&PublisherStats) -> bool,
) {
    stats
        .wait_for(|s| what(s))
        .await
        .expect("publisher running");
}

/// Whether the drifted-services gauge of the default destination is `n`.
fn drifted_services(telemetry: &Telemetry, n: u8) -> bool {
    let line = format!(
        "nacos_replicator_drifted_services{{cluster=\"destination\",namespace=\"public\"}} {n}\n"
    );
    telemetry.encode_metrics().contains(&line)
}

#[tokio::test(start_paused = true)]
async fn bursts_coalesce_to_the_latest_set() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let fake = MemoryRegistry {
        gate: Some(gate.clone()),
        ..MemoryRegistry::default()
    };
    let tasks = Tasks::default();
    let p = Publisher::start(fake.clone(), PublisherConfig::default(), &tasks);
    let mut stats = p.stats();
    p.submit(key("orders"), set(1));
    // The worker takes the first set and waits at the gate; three more arrive.
    tokio::task::yield_now().await;
    while p.pending() > 0 {
        tokio::task::yield_now().await;
    }
    p.submit(key("orders"), set(2));
    p.submit(key("orders"), set(3));
    p.submit(key("orders"), set(4));
    gate.add_permits(10);
    until(&mut stats, |s| s.applied == 2).await;
    assert_eq!(
        *lock(&fake.calls),
        vec![("orders".into(), 1), ("orders".into(), 4)]
    );
    assert_eq!(stats.borrow().coalesced, 2);
    assert_eq!(p.published(&key("orders")).map(|s| s.len()), Some(4));
    tasks.token().cancel();
}

#[tokio::test(start_paused = true)]
async fn the_rate_is_bounded() {
    let fake = MemoryRegistry::default();
    let tasks = Tasks::default();
    let p = Publisher::start(
        fake.clone(),
        PublisherConfig {
            max_per_second: 10,
            ..PublisherConfig::default()
        },
        &tasks,
    );
    let mut stats = p.stats();
    let started = tokio::time::Instant::now();
    for n in 0..31 {
        p.submit(key(&format!("svc-{n}")), set(1));
    }
    until(&mut stats, |s| s.applied == 31).await;
    // 31 publishes at 10/s: the first at once, the last 3 s later (virtual time).
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_millis(3200),
        "{took:?}"
    );
    tasks.token().cancel();
}

#[tokio::test(start_paused = true)]
async fn retryable_failures_are_retried_and_fatal_ones_are_not() {
    let fake = MemoryRegistry {
        fail_first: Arc::new(AtomicUsize::new(2)),
        ..MemoryRegistry::default()
    };
    let tasks = Tasks::default();
    let p = Publisher::start(fake.clone(), PublisherConfig::default(), &tasks);
    let mut stats = p.stats();
    p.submit(key("orders"), set(2));
    until(&mut stats, |s| s.applied == 1).await;
    assert_eq!(stats.borrow().retried, 2);
    assert_eq!(lock(&fake.calls).len(), 3);

    let fatal = MemoryRegistry {
        fail_first: Arc::new(AtomicUsize::new(1)),
        fatal: true,
        ..MemoryRegistry::default()
    };
    let p = Publisher::start(fatal.clone(), PublisherConfig::default(), &tasks);
    let mut stats = p.stats();
    p.submit(key("bad"), set(1));
    until(&mut stats, |s| s.failed == 1).await;
    p.submit(key("good"), set(1));
    until(&mut stats, |s| s.applied == 1).await;
    assert_eq!(
        *lock(&fatal.calls),
        vec![("bad".into(), 1), ("good".into(), 1)]
    );
    assert!(p.published(&key("bad")).is_none());
    tasks.token().cancel();
}

#[tokio::test(start_paused = true)]
async fn an_empty_set_clears_what_was_published() {
    let fake = MemoryRegistry::default();
    let tasks = Tasks::default();
    let p = Publisher::start(fake, PublisherConfig::default(), &tasks);
    let mut stats = p.stats();
    p.submit(key("orders"), set(3));
    until(&mut stats, |s| s.applied == 1).await;
    assert_eq!(p.published(&key("orders")).map(|s| s.len()), Some(3));
    p.submit(key("orders"), Vec::new());
    until(&mut stats, |s| s.applied == 2).await;
    assert!(p.published(&key("orders")).is_none());
    tasks.token().cancel();
}

#[tokio::test(start_paused = true)]
async fn churn_is_not_called_drift_and_a_loss_behind_our_back_still_is() {
    // The destination shows a set 3 s after taking it; `hot` changes
    // every 3 s, so at every round its view is one set behind.
    let fake = MemoryRegistry {
        show_lag: Some(Duration::from_secs(3)),
        ..MemoryRegistry::default()
    };
    let tasks = Tasks::default();
    let config = PublisherConfig {
        read_back: Some(Duration::from_secs(10)),
        ..PublisherConfig::default()
    };
    let mut events = config.telemetry.subscribe();
    let p = Publisher::start(fake.clone(), config, &tasks);
    let mut stats = p.stats();
    p.submit(key("cold"), set(2));
    for n in 0..20 {
        p.submit(key("hot"), set(1 + n % 3));
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    assert!(stats.borrow().read_backs >= 5, "{:?}", *stats.borrow());
    assert_eq!(stats.borrow().repaired, 0, "churn repaired as drift");
    let drifts = std::iter::from_fn(|| events.try_recv().ok())
        .filter(|e| matches!(e, crate::telemetry::Event::Drift { .. }))
        .count();
    assert_eq!(drifts, 0, "churn reported as drift");

    // A replica lost behind our back is still found, and repaired.
    lock(&fake.shows).remove("cold");
    until(&mut stats, |s| s.repaired == 1).await;
    until(&mut stats, |s| s.applied == 22).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let shown = fake.read("DEFAULT_GROUP", "cold").await.expect("read");
    assert_eq!(shown.len(), 2);
    tasks.token().cancel();
}

#[tokio::test(start_paused = true)]
async fn the_read_back_republishes_what_the_destination_lost() {
    let fake = MemoryRegistry::default();
    let tasks = Tasks::default();
    let config = PublisherConfig {
        read_back: Some(Duration::from_secs(60)),
        ..PublisherConfig::default()
    };
    let mut events = config.telemetry.subscribe();
    let telemetry = config.telemetry.clone();
    let drifted = |n: u8| drifted_services(&telemetry, n);
    let p = Publisher::start(fake.clone(), config, &tasks);
    let mut stats = p.stats();
    p.submit_set(key("orders"), set(2).into(), Some(Instant::now()));
    p.submit(key("users"), set(1));
    until(&mut stats, |s| s.applied == 2).await;
    // A round with nothing lost changes nothing.
    until(&mut stats, |s| s.read_backs == 1).await;
    assert_eq!(stats.borrow().repaired, 0);
    assert!(drifted(0), "{}", telemetry.encode_metrics());
    // The destination forgets `orders` behind our back.
    lock(&fake.shows).remove("orders");
    until(&mut stats, |s| s.read_backs == 2).await;
    assert!(drifted(1), "{}", telemetry.encode_metrics());
    until(&mut stats, |s| s.applied == 3).await;
    assert_eq!(stats.borrow().repaired, 1);
    // Repaired: the next round finds nothing, and the gauge says so.
    until(&mut stats, |s| s.read_backs == 3).await;
    assert!(drifted(0), "{}", telemetry.encode_metrics());
    assert_eq!(lock(&fake.shows).get("orders").map(Vec::len), Some(2));
    let mut drift = None;
    while let Ok(e) = events.try_recv() {
        if let crate::telemetry::Event::Drift {
            service,
            missing,
            repaired,
            ..
        } = e
        {
            drift = Some((service.name, missing, repaired));
        }
    }
    assert_eq!(drift, Some(("orders".into(), 2, true)));
    tasks.token().cancel();
}

#[tokio::test(start_paused = true)]
async fn a_repair_that_does_not_stick_stays_counted_until_a_comparison_clears_it() {
    // The destination hides whatever is published for an hour (as an
    // override kept beside the instance would): repairs never stick.
    let fake = MemoryRegistry {
        show_lag: Some(Duration::from_secs(3600)),
        ..MemoryRegistry::default()
    };
    let tasks = Tasks::default();
    let config = PublisherConfig {
        read_back: Some(Duration::from_secs(2)),
        ..PublisherConfig::default()
    };
    let telemetry = config.telemetry.clone();
    let p = Publisher::start(fake.clone(), config, &tasks);
    let mut stats = p.stats();
    p.submit(key("orders"), set(2));
    until(&mut stats, |s| s.repaired == 1).await;
    // Every round from then on counts it, those that skip it while a
    // repair settles included.
    let first = stats.borrow().read_backs;
    for round in first..first + 8 {
        until(&mut stats, |s| s.read_backs > round).await;
        let text = telemetry.encode_metrics();
        assert!(drifted_services(&telemetry, 1), "round {round}: {text}");
    }
    assert!(stats.borrow().repaired >= 2, "{:?}", *stats.borrow());
    // Put right at the destination: the next comparison clears it.
    lock(&fake.later).clear();
    lock(&fake.shows).insert("orders".into(), set(2));
    let now = stats.borrow().read_backs;
    until(&mut stats, |s| s.read_backs >= now + 4).await;
    assert!(
        drifted_services(&telemetry, 0),
        "{}",
        telemetry.encode_metrics()
    );
    tasks.token().cancel();
}

#[tokio::test(start_paused = true)]
async fn services_go_out_concurrently_but_one_service_stays_in_order() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let fake = MemoryRegistry {
        gate: Some(gate.clone()),
        ..MemoryRegistry::default()
    };
    let tasks = Tasks::default();
    let p = Publisher::start(fake.clone(), PublisherConfig::default(), &tasks);
    let mut stats = p.stats();
    for name in ["a", "b", "c"] {
        p.submit(key(name), set(1));
    }
    // All three are sent before any answer comes back.
    let started = tokio::time::timeout(Duration::from_secs(5), async {
        while fake.entered.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    started.await.expect("three services in flight at once");
    // What is on its way counts as intended (so the engine does not send it twice).
    assert_eq!(p.intended(&key("a")).map(|s| s.len()), Some(1));
    assert!(p.published(&key("a")).is_none(), "nothing taken yet");
    // A newer set of `a` waits for the first one to land.
    p.submit(key("a"), set(2));
    assert_eq!(p.intended(&key("a")).map(|s| s.len()), Some(2));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        fake.entered.load(Ordering::SeqCst),
        3,
        "a second set of one service was sent while the first was in flight"
    );
    assert!(!p.settled());
    gate.add_permits(10);
    until(&mut stats, |s| s.applied == 4).await;
    let calls = lock(&fake.calls).clone();
    let a: Vec<usize> = calls
        .iter()
        .filter(|(n, _)| n == "a")
        .map(|(_, len)| *len)
        .collect();
    assert_eq!(a, vec![1, 2], "sets of one service out of order");
    assert_eq!(p.published(&key("a")).map(|s| s.len()), Some(2));
    assert!(p.settled());
    tasks.token().cancel();
}
