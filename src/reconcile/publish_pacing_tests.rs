//! The publisher's pacing on a paused clock: a destination whose answer
//! time, failures and refusals a test sets, and which checks at every call
//! it receives that the publisher kept within its limit.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::tests::{key, set};
use super::*;
use crate::model::{DEFAULT_GROUP, DEFAULT_NAMESPACE};

/// A destination that answers after `latency`, fails or refuses the next
/// calls on demand, and at the start of every call counts the calls in
/// progress against the publisher's limit at that moment.
#[derive(Clone, Default)]
struct Timed {
    latency: Arc<Mutex<Duration>>,
    /// The next calls to fail: how many, and whether retrying can help.
    fail_next: Arc<Mutex<Option<(usize, bool)>>>,
    in_progress: Arc<AtomicUsize>,
    /// The most calls in progress at once.
    peak: Arc<AtomicUsize>,
    /// The highest limit seen at a call's start.
    peak_limit: Arc<AtomicUsize>,
    /// Calls that began with more in progress than the limit: (in progress, limit).
    over: Arc<Mutex<Vec<(usize, usize)>>>,
    /// The publisher's stats (its limit), once started.
    stats: Arc<OnceLock<watch::Receiver<PublisherStats>>>,
    held: Arc<Mutex<HashMap<String, InstanceSet>>>,
}

impl Timed {
    fn answering_in(latency: Duration) -> Self {
        let t = Self::default();
        t.set_latency(latency);
        t
    }

    fn set_latency(&self, latency: Duration) {
        *lock(&self.latency) = latency;
    }

    fn start(&self, config: PublisherConfig, tasks: &Tasks) -> Publisher {
        let p = Publisher::start(self.clone(), config, tasks);
        // Set before the publisher's task first runs (nothing has yielded yet).
        let _ = self.stats.set(p.stats());
        p
    }

    fn over(&self) -> Vec<(usize, usize)> {
        lock(&self.over).clone()
    }
}

/// Ends a call: the count goes down however the call ends.
struct Leaving(Arc<AtomicUsize>);

impl Drop for Leaving {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Registry for Timed {
    async fn publish(
        &self,
        _group: &str,
        name: &str,
        instances: InstanceSet,
    ) -> Result<(), PublishError> {
        let now = self.in_progress.fetch_add(1, Ordering::SeqCst) + 1;
        let _leaving = Leaving(self.in_progress.clone());
        self.peak.fetch_max(now, Ordering::SeqCst);
        let limit = self.stats.get().map_or(usize::MAX, |s| s.borrow().limit);
        self.peak_limit.fetch_max(limit, Ordering::SeqCst);
        if now > limit {
            lock(&self.over).push((now, limit));
        }
        let latency = *lock(&self.latency);
        tokio::time::sleep(latency).await;
        let fail = {
            let mut next = lock(&self.fail_next);
            let fail = next.map(|(_, retryable)| retryable);
            *next = next.and_then(|(n, r)| (n > 1).then_some((n - 1, r)));
            fail
        };
        if let Some(retryable) = fail {
            let kind = if retryable { "rejected" } else { "invalid" };
            return Err(PublishError::message(retryable, kind, "refused on purpose"));
        }
        lock(&self.held).insert(name.to_owned(), instances);
        Ok(())
    }

    async fn read(&self, _group: &str, name: &str) -> Result<Vec<Instance>, PublishError> {
        Ok(lock(&self.held)
            .get(name)
            .map(|s| s.to_vec())
            .unwrap_or_default())
    }

    fn published(&self, service: &ServiceKey) -> Option<InstanceSet> {
        lock(&self.held).get(&*service.name).cloned()
    }

    fn published_services(&self) -> Vec<ServiceKey> {
        lock(&self.held)
            .keys()
            .map(|n| ServiceKey::new(DEFAULT_NAMESPACE, DEFAULT_GROUP, n.clone()))
            .collect()
    }
}

const MS: Duration = Duration::from_millis(1);

fn submit_many(p: &Publisher, n: usize) {
    for i in 0..n {
        p.submit(key(&format!("svc-{i}")), set(2));
    }
}

/// Waits for the stats to satisfy `what`; fails after a virtual minute
/// (the clock is paused, so a wait that never ends would hang the test).
async fn until(
    stats: &mut watch::Receiver<PublisherStats>,
    what: impl Fn(&PublisherStats) -> bool,
) -> PublisherStats {
    let waited = tokio::time::timeout(Duration::from_secs(60), async {
        stats.wait_for(|s| what(s)).await.map(|s| *s)
    })
    .await;
    match waited {
        Ok(Ok(s)) => s,
        Ok(Err(_)) => panic!("publisher stopped"),
        Err(_) => panic!("not within a virtual minute: {:?}", *stats.borrow()),
    }
}

#[tokio::test(start_paused = true)]
async fn fast_answers_raise_the_limit_above_its_start() {
    let dest = Timed::answering_in(MS);
    let tasks = Tasks::default();
    let config = PublisherConfig::default();
    let start = LimitSettings::default().initial;
    let p = dest.start(config, &tasks);
    let mut stats = p.stats();
    assert_eq!(stats.borrow().limit, start);
    submit_many(&p, 2000);
    until(&mut stats, |s| s.applied == 2000).await;
    let (peak, peak_limit) = (
        dest.peak.load(Ordering::SeqCst),
        dest.peak_limit.load(Ordering::SeqCst),
    );
    // The limit grew, and the publisher used what it allowed.
    assert!(peak_limit >= 4 * start, "limit peaked at {peak_limit}");
    assert!(peak > start, "at most {peak} in flight");
    assert!(peak <= 128, "{peak} in flight over the ceiling");
    assert_eq!(dest.over(), Vec::new(), "calls over the limit");
    tasks.token().cancel();
}

#[tokio::test(start_paused = true)]
async fn answers_that_turn_slow_lower_the_limit_and_in_flight_keeps_to_it() {
    let dest = Timed::answering_in(MS);
    let tasks = Tasks::default();
    let p = dest.start(PublisherConfig::default(), &tasks);
    let mut stats = p.stats();
    submit_many(&p, 5000);
    let before = until(&mut stats, |s| s.limit >= 64).await.limit;
    // The destination now queues: every answer takes 100 times as long.
    dest.set_latency(100 * MS);
    let fallen = until(&mut stats, |s| s.limit * 4 <= before).await;
    assert!(
        fallen.applied < 5000,
        "the sync was over before the slowdown"
    );
    // While slow, it stays low: it is not pushed back up by the backlog.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let slow = stats.borrow().limit;
    assert!(
        slow * 4 <= before,
        "limit {slow} back up while the destination is slow"
    );
    // Fast again: the sync completes.
    dest.set_latency(MS);
    until(&mut stats, |s| s.applied == 5000).await;
    assert_eq!(dest.over(), Vec::new(), "calls over the limit");
    assert!(dest.peak.load(Ordering::SeqCst) <= 128);
    tasks.token().cancel();
}

#[tokio::test(start_paused = true)]
async fn failures_lower_the_limit_and_a_refusal_for_good_does_not() {
    let dest = Timed::answering_in(MS);
    let tasks = Tasks::default();
    let p = dest.start(PublisherConfig::default(), &tasks);
    let mut stats = p.stats();
    submit_many(&p, 3000);
    let grown = until(&mut stats, |s| s.limit >= 32).await;
    // A refusal for load (retryable): the limit is cut, the set retried.
    *lock(&dest.fail_next) = Some((1, true));
    let cut = until(&mut stats, |s| s.retried == 1).await;
    assert!(cut.limit < grown.limit, "{} -> {}", grown.limit, cut.limit);
    until(&mut stats, |s| s.applied == 3000).await;
    assert_eq!(dest.over(), Vec::new(), "calls over the limit");

    // A refusal for good says nothing about load: the limit stays.
    let before = stats.borrow().limit;
    *lock(&dest.fail_next) = Some((1, false));
    p.submit(key("bad"), set(1));
    let after = until(&mut stats, |s| s.failed == 1).await;
    assert_eq!(after.limit, before);
    tasks.token().cancel();
}

#[tokio::test(start_paused = true)]
async fn the_ceiling_holds_however_fast_the_acks() {
    let dest = Timed::answering_in(MS);
    let tasks = Tasks::default();
    let config = PublisherConfig {
        max_in_flight: 12,
        ..PublisherConfig::default()
    };
    let p = dest.start(config, &tasks);
    let mut stats = p.stats();
    submit_many(&p, 1000);
    until(&mut stats, |s| s.applied == 1000).await;
    assert_eq!(
        dest.peak.load(Ordering::SeqCst),
        12,
        "ceiling not reached or passed"
    );
    assert_eq!(dest.peak_limit.load(Ordering::SeqCst), 12);
    assert_eq!(dest.over(), Vec::new(), "calls over the limit");
    tasks.token().cancel();
}

#[tokio::test(start_paused = true)]
async fn the_limit_is_on_metrics_and_status_and_acks_are_timed() {
    let dest = Timed::answering_in(3 * MS);
    let tasks = Tasks::default();
    let config = PublisherConfig::default();
    let t = config.telemetry.clone();
    let p = dest.start(config, &tasks);
    let mut stats = p.stats();
    submit_many(&p, 300);
    let done = until(&mut stats, |s| s.applied == 300).await;
    let text = t.encode_metrics();
    let gauge = format!(
        "nacos_replicator_publish_limit{{cluster=\"destination\",namespace=\"public\"}} {}\n",
        done.limit
    );
    assert!(text.contains(&gauge), "{gauge} missing in\n{text}");
    let count = "nacos_replicator_publish_ack_seconds_count{cluster=\"destination\",namespace=\"public\"} 300\n";
    assert!(text.contains(count), "{count} missing in\n{text}");
    // 3 ms acks land in the 3.2 ms bucket, none below it.
    let below = "nacos_replicator_publish_ack_seconds_bucket{le=\"0.0016\",cluster=\"destination\",namespace=\"public\"} 0\n";
    assert!(text.contains(below), "{below} missing in\n{text}");
    assert_eq!(
        t.status().destinations["destination/public"].publish_limit,
        done.limit
    );
    tasks.token().cancel();
}
