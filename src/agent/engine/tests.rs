//! The engine driven by hand: events in, sets queued out, no network.

use super::*;
use crate::model::Instance;
use crate::reconcile::ReplicateAll;
use crate::reconcile::memory::MemoryRegistry;
use crate::reconcile::publish::{PublisherConfig, PublisherStats};
use crate::runtime::lock;

fn engine(recorder: &MemoryRegistry, tasks: &Tasks) -> (Engine, Publisher) {
    let text = "[[clusters]]\nid = \"a\"\nservers = [\"h:1\"]\n[[clusters]]\nid = \"b\"\nservers = [\"h:2\"]\n\
                [[routes]]\nfrom = \"a\"\nto = \"b\"\n";
    let config =
        crate::config::parse(std::path::Path::new("t.toml"), text, &|_| None).expect("valid");
    let publisher = Publisher::start(recorder.clone(), PublisherConfig::default(), tasks);
    let publishers = HashMap::from([(
        (ClusterId("b".into()), "public".to_owned()),
        publisher.clone(),
    )]);
    // A source that never answers a query (tests that need one set their own).
    let silent: Query = Arc::new(|_| Box::pin(std::future::pending()));
    let wiring = Rewire {
        config: Arc::new(config),
        publishers,
        sources: HashMap::from([(source(), read(silent))]),
        fresh: HashSet::new(),
    };
    let engine = Engine::new(
        Arc::new(ReplicateAll),
        Telemetry::new(),
        tasks.clone(),
        wiring,
    );
    (engine, publisher)
}

fn source() -> Endpoint {
    (ClusterId("a".into()), "public".to_owned())
}

/// Reads through `query`, from the first watcher.
fn read(query: Query) -> SourceRead {
    SourceRead {
        query,
        generation: 0,
    }
}

fn event(event: WatchEvent) -> SourceEvent {
    SourceEvent {
        cluster: ClusterId("a".into()),
        namespace: "public".into(),
        generation: 0,
        event,
        received: Instant::now(),
    }
}

/// An engine whose source has completed one listing of `orders` (one
/// native), replicated once.
async fn listed_once(recorder: &MemoryRegistry, tasks: &Tasks) -> (Engine, Publisher) {
    let (mut engine, publisher) = engine(recorder, tasks);
    let snapshot = ServiceSnapshot {
        instances: [Instance::new("10.0.0.1", 80)].into(),
        last_ref_time_ms: 1,
        ..ServiceSnapshot::empty(ServiceKey::new("public", "DEFAULT_GROUP", "orders"))
    };
    engine.handle(event(WatchEvent::Init));
    engine.handle(event(WatchEvent::InitSnapshot(snapshot)));
    engine.handle(event(WatchEvent::InitDone));
    applied(&publisher, 1).await;
    (engine, publisher)
}

async fn applied(publisher: &Publisher, n: u64) {
    let mut stats = publisher.stats();
    let waited = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stats.wait_for(|s: &PublisherStats| s.applied >= n),
    );
    waited
        .await
        .unwrap_or_else(|_| panic!("fewer than {n} sets applied"))
        .expect("publisher running");
}

#[tokio::test(start_paused = true)]
async fn an_empty_listing_withdraws_what_the_source_no_longer_has() {
    let recorder = MemoryRegistry::default();
    let tasks = Tasks::default();
    let (mut engine, publisher) = listed_once(&recorder, &tasks).await;
    // After a reconnect the source lists nothing at all.
    engine.handle(event(WatchEvent::Init));
    engine.handle(event(WatchEvent::InitDone));
    applied(&publisher, 2).await;
    let calls = lock(&recorder.calls).clone();
    assert_eq!(
        calls,
        vec![("orders".to_owned(), 1), ("orders".to_owned(), 0)]
    );
    tasks.token().cancel();
}

#[tokio::test(start_paused = true)]
async fn nothing_is_withdrawn_before_the_listing_completes() {
    let recorder = MemoryRegistry::default();
    let tasks = Tasks::default();
    let (mut engine, publisher) = listed_once(&recorder, &tasks).await;
    // A relisting has started but not finished: the service's absence
    // so far means nothing.
    engine.handle(event(WatchEvent::Init));
    engine.handle(event(WatchEvent::Lost));
    // The engine submits synchronously: a withdrawal would be queued now.
    assert_eq!(publisher.pending(), 0);
    assert_eq!(publisher.stats().borrow().applied, 1);
    assert_eq!(
        publisher
            .published(&ServiceKey::new("public", "DEFAULT_GROUP", "orders"))
            .map(|s| s.len()),
        Some(1)
    );
    tasks.token().cancel();
}

#[tokio::test(start_paused = true)]
async fn a_listed_service_of_unknown_content_is_kept() {
    let recorder = MemoryRegistry::default();
    let tasks = Tasks::default();
    let (mut engine, publisher) = listed_once(&recorder, &tasks).await;
    // Relisted: the service is there, but neither a push nor a query said what it holds.
    engine.handle(event(WatchEvent::Init));
    engine.handle(event(WatchEvent::InitUnknown(ServiceKey::new(
        "public",
        "DEFAULT_GROUP",
        "orders",
    ))));
    engine.handle(event(WatchEvent::InitDone));
    assert_eq!(publisher.pending(), 0, "withdrawn on unknown content");
    assert_eq!(
        publisher
            .published(&ServiceKey::new("public", "DEFAULT_GROUP", "orders"))
            .map(|s| s.len()),
        Some(1)
    );
    tasks.token().cancel();
}

#[tokio::test(start_paused = true)]
async fn a_repeated_snapshot_keeps_the_one_set_the_publisher_holds() {
    let recorder = MemoryRegistry::default();
    let tasks = Tasks::default();
    let (mut engine, publisher) = listed_once(&recorder, &tasks).await;
    let key = ServiceKey::new("public", "DEFAULT_GROUP", "orders");
    // The same content again (a push after the subscribe reply, a relisting).
    let again = ServiceSnapshot {
        instances: [Instance::new("10.0.0.1", 80)].into(),
        last_ref_time_ms: 2,
        ..ServiceSnapshot::empty(key.clone())
    };
    engine.handle(event(WatchEvent::Snapshot(again)));
    let dest = (ClusterId("b".into()), key.clone());
    let held = engine
        .state
        .get(&dest)
        .and_then(|c| c.get(&(ClusterId("a".into()), key.clone())))
        .cloned()
        .expect("a contribution");
    let intended = publisher.intended(&key).expect("an intended set");
    assert!(
        Arc::ptr_eq(&held, &intended),
        "the engine keeps a second copy of the replicas"
    );
    assert_eq!(
        (publisher.pending(), publisher.stats().borrow().applied),
        (0, 1)
    );
    tasks.token().cancel();
}

#[tokio::test(start_paused = true)]
async fn ready_after_every_source_listed_and_every_set_applied_and_totals_follow() {
    let recorder = MemoryRegistry::default();
    let tasks = Tasks::default();
    let (mut engine, publisher) = engine(&recorder, &tasks);
    let telemetry = engine.telemetry.clone();
    engine.check_ready();
    assert!(!telemetry.is_ready(), "ready before any listing");
    let two = ServiceSnapshot {
        instances: [Instance::new("10.0.0.1", 80), Instance::new("10.0.0.2", 80)].into(),
        ..ServiceSnapshot::empty(ServiceKey::new("public", "DEFAULT_GROUP", "orders"))
    };
    engine.handle(event(WatchEvent::Init));
    engine.handle(event(WatchEvent::InitSnapshot(two)));
    engine.handle(event(WatchEvent::InitDone));
    applied(&publisher, 1).await;
    engine.check_ready();
    assert!(telemetry.is_ready());
    let route = &telemetry.status().routes["a -> b"];
    assert_eq!((route.services, route.replicas), (1, 2));
    engine.handle(event(WatchEvent::Removed(ServiceKey::new(
        "public",
        "DEFAULT_GROUP",
        "orders",
    ))));
    let route = &telemetry.status().routes["a -> b"];
    assert_eq!((route.services, route.replicas), (0, 0));
    tasks.token().cancel();
}

#[tokio::test(start_paused = true)]
async fn the_policy_decides_what_is_copied() {
    struct NotCanary;
    impl Policy for NotCanary {
        fn admits(&self, _: &Route, _: &ServiceKey, native: &Instance) -> bool {
            !native.metadata.contains_key("canary")
        }
    }
    let recorder = MemoryRegistry::default();
    let tasks = Tasks::default();
    let (mut engine, publisher) = engine(&recorder, &tasks);
    engine.policy = Arc::new(NotCanary);
    let snapshot = ServiceSnapshot {
        instances: [
            Instance::new("10.0.0.1", 80),
            Instance::new("10.0.0.2", 80).with_metadata("canary", "1"),
        ]
        .into(),
        ..ServiceSnapshot::empty(ServiceKey::new("public", "DEFAULT_GROUP", "orders"))
    };
    engine.handle(event(WatchEvent::Snapshot(snapshot)));
    applied(&publisher, 1).await;
    let published = publisher
        .published(&ServiceKey::new("public", "DEFAULT_GROUP", "orders"))
        .unwrap_or_default();
    assert_eq!(
        published.iter().map(|i| &*i.ip).collect::<Vec<_>>(),
        vec!["10.0.0.1"]
    );
    tasks.token().cancel();
}

fn service(name: &str, natives: usize) -> ServiceSnapshot {
    ServiceSnapshot {
        instances: (1..=natives)
            .map(|i| Instance::new(format!("10.0.0.{i}"), 80))
            .collect(),
        ..ServiceSnapshot::empty(ServiceKey::new("public", "DEFAULT_GROUP", name))
    }
}

fn replicas(publisher: &Publisher, name: &str) -> usize {
    publisher
        .intended(&ServiceKey::new("public", "DEFAULT_GROUP", name))
        .map_or(0, |s| s.len())
}

#[tokio::test(start_paused = true)]
async fn a_slow_confirmation_delays_no_other_service() {
    let recorder = MemoryRegistry::default();
    let tasks = Tasks::default();
    let (mut engine, publisher) = engine(&recorder, &tasks);
    // The source takes a minute to answer a query about `slow`, which
    // by then has lost every native; any other query answers at once.
    let query: Query = Arc::new(|key: ServiceKey| {
        Box::pin(async move {
            if &*key.name == "slow" {
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            Ok(ServiceSnapshot::empty(key))
        })
    });
    engine.sources.insert(source(), read(query));
    engine.handle(event(WatchEvent::Snapshot(service("slow", 6))));
    engine.handle(event(WatchEvent::Snapshot(service("fast", 1))));
    applied(&publisher, 2).await;

    let started = Instant::now();
    // 6 -> 0 is a mass withdrawal: held back until the query agrees.
    engine.handle(event(WatchEvent::Snapshot(service("slow", 0))));
    engine.handle(event(WatchEvent::Snapshot(service("fast", 2))));
    // The engine went on at once (the paused clock moved not at all, so
    // nothing waited for the 60 s query), and the other change is queued.
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(replicas(&publisher, "fast"), 2);
    assert_eq!(
        replicas(&publisher, "slow"),
        6,
        "withdrawn before confirmation"
    );

    // The answer comes back as an event; applying it withdraws.
    let answer = engine.next_answer().await.expect("an answer");
    assert!(started.elapsed() >= Duration::from_secs(60));
    engine.confirmed(answer);
    assert_eq!(replicas(&publisher, "slow"), 0);
    tasks.token().cancel();
}

#[tokio::test(start_paused = true)]
async fn news_after_a_held_withdrawal_wins_over_its_late_answer() {
    let recorder = MemoryRegistry::default();
    let tasks = Tasks::default();
    let (mut engine, publisher) = engine(&recorder, &tasks);
    // The late answer says the service is empty.
    let query: Query = Arc::new(|key: ServiceKey| {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(ServiceSnapshot::empty(key))
        })
    });
    engine.sources.insert(source(), read(query));
    engine.handle(event(WatchEvent::Snapshot(service("orders", 6))));
    engine.handle(event(WatchEvent::Snapshot(service("orders", 0))));
    // Before it comes, a push says five natives are there.
    engine.handle(event(WatchEvent::Snapshot(service("orders", 5))));
    let answer = engine.next_answer().await.expect("an answer");
    engine.confirmed(answer);
    assert_eq!(replicas(&publisher, "orders"), 5, "a stale answer applied");
    tasks.token().cancel();
}

/// The engine's wiring under `routes` (TOML), with `publisher` for `b`.
fn rewired(routes: &str, publisher: &Publisher, generation: u64) -> Rewire {
    let text = format!(
        "[[clusters]]\nid = \"a\"\nservers = [\"h:1\"]\n[[clusters]]\nid = \"b\"\nservers = [\"h:2\"]\n\
         [[clusters]]\nid = \"c\"\nservers = [\"h:3\"]\n{routes}"
    );
    let config =
        crate::config::parse(std::path::Path::new("t.toml"), &text, &|_| None).expect("valid");
    let silent: Query = Arc::new(|_| Box::pin(std::future::pending()));
    let sources = config
        .routes
        .iter()
        .map(|r| {
            let at = (r.source().clone(), "public".to_owned());
            (
                at,
                SourceRead {
                    query: silent.clone(),
                    generation,
                },
            )
        })
        .collect();
    Rewire {
        config: Arc::new(config),
        publishers: HashMap::from([(
            (ClusterId("b".into()), "public".to_owned()),
            publisher.clone(),
        )]),
        sources,
        fresh: HashSet::new(),
    }
}

const A_TO_B: &str = "[[routes]]\nfrom = \"a\"\nto = \"b\"\n";
const C_TO_B: &str = "[[routes]]\nfrom = \"c\"\nto = \"b\"\n";

#[tokio::test(start_paused = true)]
async fn a_reload_that_keeps_a_route_sends_it_nothing_and_one_that_removes_it_withdraws() {
    let recorder = MemoryRegistry::default();
    let tasks = Tasks::default();
    let (mut engine, publisher) = listed_once(&recorder, &tasks).await;
    // Adding c -> b leaves a -> b alone: nothing is queued for it.
    let changes = engine.rewire(rewired(&format!("{A_TO_B}{C_TO_B}"), &publisher, 0));
    assert_eq!(changes.added.len(), 1);
    assert!(changes.removed.is_empty());
    assert_eq!(changes.unchanged, 1);
    assert_eq!(publisher.pending(), 0, "an unchanged route was republished");
    // Removing a -> b withdraws its replica (guard off) and its totals.
    let changes = engine.rewire(rewired(C_TO_B, &publisher, 0));
    assert_eq!(changes.removed.len(), 1);
    applied(&publisher, 2).await;
    assert_eq!(
        lock(&recorder.calls).clone(),
        vec![("orders".to_owned(), 1), ("orders".to_owned(), 0)]
    );
    assert!(engine.totals.is_empty());
    tasks.token().cancel();
}

#[tokio::test(start_paused = true)]
async fn after_a_reload_a_replaced_watcher_is_ignored_and_a_new_connection_gets_everything() {
    let recorder = MemoryRegistry::default();
    let tasks = Tasks::default();
    let (mut engine, _old) = listed_once(&recorder, &tasks).await;
    // The destination's client was replaced: a new, empty publisher.
    let fresh_recorder = MemoryRegistry::default();
    let fresh = Publisher::start(fresh_recorder.clone(), PublisherConfig::default(), &tasks);
    let mut wiring = rewired(A_TO_B, &fresh, 1);
    wiring
        .fresh
        .insert((ClusterId("b".into()), "public".to_owned()));
    let changes = engine.rewire(wiring);
    assert_eq!(
        (
            changes.added.len(),
            changes.removed.len(),
            changes.unchanged
        ),
        (0, 0, 1)
    );
    applied(&fresh, 1).await;
    assert_eq!(
        lock(&fresh_recorder.calls).clone(),
        vec![("orders".to_owned(), 1)]
    );
    // What the old watcher (generation 0) still had in flight changes nothing.
    engine.handle(event(WatchEvent::Init));
    engine.handle(event(WatchEvent::InitDone));
    assert_eq!(
        fresh.pending(),
        0,
        "an old watcher's empty listing was applied"
    );
    tasks.token().cancel();
}
