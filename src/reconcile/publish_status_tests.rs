//! What a publisher tells `/status`: replicas wanted and acknowledged, and
//! its queue (paused time, in-memory registry).

use std::sync::Arc;
use std::time::Duration;

use super::tests::{key, set};
use super::{Publisher, PublisherConfig};
use crate::reconcile::memory::MemoryRegistry;
use crate::runtime::Tasks;
use crate::telemetry::{DestinationStatus, Telemetry};

/// Polls (in virtual time, so the pacer moves) until the status of the
/// default destination satisfies `check`; panics after 10 virtual seconds.
async fn board_until(t: &Telemetry, check: impl Fn(&DestinationStatus) -> bool) {
    for _ in 0..10_000 {
        let board = t.status().destinations.get("destination/public").cloned();
        if board.as_ref().is_some_and(&check) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("status never got there: {:?}", t.status().destinations);
}

#[tokio::test(start_paused = true)]
async fn status_shows_replicas_wanted_and_acknowledged_and_the_queue() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let fake = MemoryRegistry {
        gate: Some(gate.clone()),
        ..MemoryRegistry::default()
    };
    let config = PublisherConfig {
        max_in_flight: 1,
        ..PublisherConfig::default()
    };
    let t = config.telemetry.clone();
    let tasks = Tasks::default();
    let p = Publisher::start(fake, config, &tasks);
    p.submit(key("orders"), set(2));
    p.submit(key("users"), set(3));
    board_until(&t, |d| d.in_flight == 1 && d.queued == 1).await;
    let d = t.status().destinations["destination/public"].clone();
    assert_eq!((d.replicas_wanted, d.replicas_acknowledged), (5, 0));
    gate.add_permits(10);
    board_until(&t, |d| d.replicas_acknowledged == 5).await;
    let d = t.status().destinations["destination/public"].clone();
    assert_eq!((d.replicas_wanted, d.queued, d.in_flight), (5, 0, 0));
    p.submit(key("users"), set(0));
    board_until(&t, |d| d.replicas_acknowledged == 2).await;
    assert_eq!(
        t.status().destinations["destination/public"].replicas_wanted,
        2
    );
    tasks.token().cancel();
}
