//! The gate and the guarded query by hand, no server: what passes to the
//! engine before, during and after an isolation, and when a confirmation
//! query is believed. (Whole drills run on the testkit server in
//! `tests/drill.rs`.)

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::gate::{self, Command, Reader};
use super::*;
use crate::agent::engine::Query;
use crate::cluster::ClientConfig;
use crate::cluster::watch::WatchEvent;
use crate::model::{ServiceKey, ServiceSnapshot};

fn a() -> ClusterId {
    ClusterId("a".into())
}

fn event(cluster: &str, event: WatchEvent) -> SourceEvent {
    SourceEvent {
        cluster: ClusterId(cluster.into()),
        namespace: "public".into(),
        generation: 7,
        event,
        received: Instant::now(),
    }
}

fn snapshot(name: &str) -> WatchEvent {
    WatchEvent::Snapshot(ServiceSnapshot::empty(ServiceKey::new(
        "public",
        "DEFAULT_GROUP",
        name,
    )))
}

/// What the engine got next, as `(cluster, event)`; `None` if nothing came.
async fn next(out: &mut mpsc::Receiver<SourceEvent>) -> Option<(String, WatchEvent)> {
    tokio::time::timeout(Duration::from_secs(5), out.recv())
        .await
        .ok()
        .flatten()
        .map(|e| (e.cluster.0, e.event))
}

#[tokio::test]
async fn the_gate_speaks_for_an_isolated_source_and_reopens_at_its_relist() {
    let tasks = Tasks::default();
    // Never connects (nothing listens there); only its relist signal is used.
    let config = ClientConfig::new("a", vec!["127.0.0.1:9".into()], "public");
    let client = Client::start(config, &tasks).expect("valid config");
    let mut relists = client.relist_requests();
    let (input, from_watchers) = mpsc::channel(16);
    let (commands, gate_commands) = mpsc::unbounded_channel();
    let readers = vec![Reader {
        namespace: "public".into(),
        client: client.clone(),
        generation: 7,
    }];
    let mut out = gate::start(from_watchers, gate_commands, &tasks);

    let send = |e| {
        let input = input.clone();
        async move { input.send(e).await.expect("gate open") }
    };
    send(event("a", snapshot("before"))).await;
    assert_eq!(next(&mut out).await, Some(("a".into(), snapshot("before"))));

    commands
        .send(Command::Isolate((a(), readers.clone())))
        .expect("gate running");
    // Stamped with the watcher's generation, or the engine would ignore it.
    let lost = tokio::time::timeout(Duration::from_secs(5), out.recv()).await;
    let lost = lost.ok().flatten().expect("Lost sent");
    assert_eq!((lost.event, lost.generation), (WatchEvent::Lost, 7));
    // Withheld: a's news, its own Lost, its listings. Another source passes.
    send(event("a", snapshot("during"))).await;
    send(event("a", WatchEvent::Lost)).await;
    send(event("a", WatchEvent::Init)).await;
    send(event("c", snapshot("other"))).await;
    assert_eq!(next(&mut out).await, Some(("c".into(), snapshot("other"))));

    commands
        .send(Command::Restore((a(), readers)))
        .expect("gate running");
    tokio::time::timeout(Duration::from_secs(5), relists.changed())
        .await
        .expect("a relist asked for")
        .expect("client alive");
    // The end of a listing the drill cut in two is not let through...
    send(event("a", snapshot("half a listing"))).await;
    send(event("a", WatchEvent::InitDone)).await;
    // ...the relist is, from its Init on.
    send(event("a", WatchEvent::Init)).await;
    send(event("a", snapshot("fresh"))).await;
    send(event("a", WatchEvent::InitDone)).await;
    assert_eq!(next(&mut out).await, Some(("a".into(), WatchEvent::Init)));
    assert_eq!(next(&mut out).await, Some(("a".into(), snapshot("fresh"))));
    assert_eq!(
        next(&mut out).await,
        Some(("a".into(), WatchEvent::InitDone))
    );
    tasks.shutdown(Duration::from_secs(2)).await;
}

/// A drill board isolating `a` (as `start` leaves it), without an agent.
fn isolating(drills: &Drills) {
    let mut board = lock(&drills.shared.board);
    board.next_id += 1;
    board.run = Some(Run {
        source: a(),
        started: Instant::now(),
        ends: Instant::now() + Duration::from_secs(60),
        withdrawing: Vec::new(),
        withdrawn: false,
        expired: false,
        listings_at_restore: HashMap::new(),
        relisted: Vec::new(),
    });
    board.drill = Some(Drill {
        id: board.next_id,
        source: "a".into(),
        namespaces: vec!["public".into()],
        duration_ms: 60_000,
        source_loss: "hold".into(),
        hold_for_ms: 600_000,
        replicas: 0,
        services: 0,
        started_at_ms: 0,
        ends_at_ms: 0,
        phase: Phase::Isolated,
        ended_early: false,
        timeline: Vec::new(),
    });
}

#[tokio::test]
async fn confirmation_queries_to_an_isolated_source_fail() {
    let drills = Drills::new(Telemetry::new(), None);
    let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = asked.clone();
    let query: Query = Arc::new(move |key: ServiceKey| {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async move { Ok(ServiceSnapshot::empty(key)) })
    });
    let guarded = gate::guarded(drills.clone(), a(), query);
    let key = ServiceKey::new("public", "DEFAULT_GROUP", "orders");
    assert!(guarded(key.clone()).await.is_ok(), "no drill: believed");
    isolating(&drills);
    let refused = guarded(key.clone())
        .await
        .expect_err("isolated: not believed");
    assert!(
        refused.to_string().contains("isolated by a DR drill"),
        "{refused}"
    );
    assert_eq!(
        asked.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "asked while isolated"
    );
    // Another source is not isolated.
    let other: Query =
        Arc::new(|key: ServiceKey| Box::pin(async move { Ok(ServiceSnapshot::empty(key)) }));
    let other = gate::guarded(drills.clone(), ClusterId("c".into()), other);
    assert!(other(key.clone()).await.is_ok());
    // Asked before a drill, answered during it: not believed either.
    let slow: Query = Arc::new(|key: ServiceKey| {
        Box::pin(async move {
            tokio::task::yield_now().await;
            Ok(ServiceSnapshot::empty(key))
        })
    });
    let drills2 = Drills::new(Telemetry::new(), None);
    let pending = gate::guarded(drills2.clone(), a(), slow)(key);
    isolating(&drills2);
    assert!(
        pending.await.is_err(),
        "an answer that arrived during the drill was believed"
    );
}
