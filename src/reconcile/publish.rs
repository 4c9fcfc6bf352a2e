//! The destination publisher: applies full sets to one destination cluster
//! namespace, latest set per service wins, at a bounded rate, retrying what
//! can be retried.
//!
//! It sees the destination only through [`Registry`], so its tests need no
//! network. A set submitted while an older one for the same service is
//! still queued replaces it (bursts coalesce; nothing stale is ever sent
//! after something newer).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::warn;

use super::plan::drift;
use super::queue::{PublishQueue, Queued};
pub use crate::cluster::registry::{PublishError, Registry};
use crate::model::{ClusterId, Instance, InstanceSet, ServiceKey};
use crate::runtime::{Backoff, Tasks, lock, sleep_until_or_never, ticker, ticker_after};
use crate::telemetry::{ReplicaCounts, Telemetry};

/// The publisher's type-erased view of its registry's sets.
trait View: Send + Sync {
    fn published(&self, service: &ServiceKey) -> Option<InstanceSet>;
    fn services(&self) -> Vec<ServiceKey>;
}

impl<R: Registry> View for R {
    fn published(&self, service: &ServiceKey) -> Option<InstanceSet> {
        Registry::published(self, service).filter(|s| !s.is_empty())
    }

    fn services(&self) -> Vec<ServiceKey> {
        self.published_services()
    }
}

/// Which instances shown by a destination this publisher could have written.
#[derive(Clone)]
pub struct Owned(pub Arc<dyn Fn(&Instance) -> bool + Send + Sync>);

impl std::fmt::Debug for Owned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Owned(..)")
    }
}

/// Publisher settings.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// The destination cluster (labels metrics and events).
    pub cluster: ClusterId,
    /// The destination namespace.
    pub namespace: String,
    /// Publishes (and read-back queries) per second, at most.
    pub max_per_second: u32,
    /// Sets sent and not yet answered, at most (different services; one
    /// service never has two in flight).
    pub max_in_flight: usize,
    /// First delay after a retryable failure.
    pub retry_min: Duration,
    /// Largest delay between retries.
    pub retry_max: Duration,
    /// Anti-entropy: how often every published service is read back from
    /// the destination and republished if ours is missing or wrong. `None`: never.
    pub read_back: Option<Duration>,
    /// Which shown instances count as ours when looking for extras.
    pub owned: Owned,
    /// Where outcomes are reported.
    pub telemetry: Telemetry,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self {
            cluster: ClusterId("destination".into()),
            namespace: crate::model::DEFAULT_NAMESPACE.into(),
            max_per_second: 200,
            max_in_flight: 16,
            retry_min: Duration::from_millis(200),
            retry_max: Duration::from_secs(10),
            read_back: None,
            owned: Owned(Arc::new(|_| false)),
            telemetry: Telemetry::new(),
        }
    }
}

/// Counters a caller can watch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublisherStats {
    /// Sets the destination acknowledged.
    pub applied: u64,
    /// Submitted sets replaced by a newer one before being sent.
    pub coalesced: u64,
    /// Failed attempts that will be retried.
    pub retried: u64,
    /// Sets dropped after a failure that retrying cannot fix.
    pub failed: u64,
    /// Read-back rounds completed.
    pub read_backs: u64,
    /// Services republished because the read-back found ours missing or wrong.
    pub repaired: u64,
}

struct Shared {
    /// Waiting and in flight, under one lock (see [`PublishQueue`]).
    queue: Mutex<PublishQueue>,
    wake: Notify,
    /// The registry's sets (it keeps them for its redo).
    view: Arc<dyn View>,
    stats: watch::Sender<PublisherStats>,
}

/// Handle on a running publisher. Cheap to clone. When the last handle is
/// dropped, the publisher stops and drops its registry (for a [`Client`],
/// that closes the connection, and the destination drops our replicas).
///
/// [`Client`]: crate::cluster::Client
#[derive(Clone)]
pub struct Publisher {
    shared: Arc<Shared>,
    _stop: Arc<DropGuard>,
}

impl Publisher {
    /// Starts publishing to `registry`, in tasks on `tasks`, until it is
    /// cancelled or the last handle is dropped. Must be called within a
    /// Tokio runtime.
    pub fn start<R: Registry>(registry: R, config: PublisherConfig, tasks: &Tasks) -> Publisher {
        let registry = Arc::new(registry);
        let shared = Arc::new(Shared {
            queue: Mutex::new(PublishQueue::default()),
            wake: Notify::new(),
            view: registry.clone(),
            stats: watch::channel(PublisherStats::default()).0,
        });
        let tasks = tasks.child();
        let token = tasks.token().clone();
        let name = format!("publisher {}/{}", config.cluster, config.namespace);
        if let Some(every) = config.read_back {
            let task = read_back(
                registry.clone(),
                config.clone(),
                every,
                shared.clone(),
                token.clone(),
            );
            tasks.spawn(format!("{name} read-back"), task);
        }
        tasks.spawn(name, work(registry, config, shared.clone(), token.clone()));
        Publisher {
            shared,
            _stop: Arc::new(token.drop_guard()),
        }
    }

    /// Queues the full set for a service. A set still queued for the same
    /// service is replaced: only the latest is sent.
    pub fn submit(&self, service: ServiceKey, instances: Vec<Instance>) {
        self.enqueue(service, instances.into(), None);
    }

    /// Queues a shared set (no copy). With `since` (the receipt of the
    /// source snapshot) the destination's ack is measured against it (the
    /// lag histogram).
    pub fn submit_set(&self, service: ServiceKey, set: InstanceSet, since: Option<Instant>) {
        self.enqueue(service, set, since);
    }

    fn enqueue(&self, service: ServiceKey, set: InstanceSet, since: Option<Instant>) {
        let coalesced = lock(&self.shared.queue).submit(service, set, since);
        if coalesced {
            self.shared.stats.send_modify(|s| s.coalesced += 1);
        }
        self.shared.wake.notify_one();
    }

    /// The set the destination last acknowledged for the service.
    pub fn published(&self, service: &ServiceKey) -> Option<InstanceSet> {
        self.shared.view.published(service)
    }

    /// The newest set of the service this publisher has been given: queued,
    /// in flight, or taken by the destination. Comparing a desired set with
    /// this (not only with what was taken) keeps a set that is on its way
    /// from being sent a second time.
    pub fn intended(&self, service: &ServiceKey) -> Option<InstanceSet> {
        if let Some(set) = lock(&self.shared.queue).intended(service) {
            return Some(set.clone());
        }
        self.shared.view.published(service)
    }

    /// Sets waiting to be sent.
    pub fn pending(&self) -> usize {
        lock(&self.shared.queue).pending()
    }

    /// Nothing queued and nothing in flight: the destination holds
    /// everything submitted so far (or refused it for good).
    pub fn settled(&self) -> bool {
        lock(&self.shared.queue).settled()
    }

    /// Counters, current value and changes.
    pub fn stats(&self) -> watch::Receiver<PublisherStats> {
        self.shared.stats.subscribe()
    }
}

fn retry_backoff(config: &PublisherConfig) -> Option<Backoff> {
    match Backoff::try_new(
        config.retry_min,
        config.retry_max.max(config.retry_min),
        0.3,
    ) {
        Ok(b) => Some(b),
        Err(e) => {
            warn!(error = %e, "publisher retry settings invalid; using defaults");
            let d = PublisherConfig::default();
            Backoff::try_new(d.retry_min, d.retry_max, 0.3).ok()
        }
    }
}

fn pacer(config: &PublisherConfig) -> tokio::time::Interval {
    ticker(Duration::from_secs(1) / config.max_per_second.max(1))
}

/// What came back for one set sent.
struct Sent {
    key: ServiceKey,
    queued: Queued,
    result: Result<(), PublishError>,
}

/// Sends queued sets, up to `max_in_flight` at once and `max_per_second`,
/// one at a time per service; after a retryable failure it pauses (backoff)
/// before starting anything new, so a struggling destination is not flooded.
async fn work<R: Registry>(
    registry: Arc<R>,
    config: PublisherConfig,
    shared: Arc<Shared>,
    token: CancellationToken,
) {
    let mut pace = pacer(&config);
    let Some(mut backoff) = retry_backoff(&config) else {
        return;
    };
    let max_in_flight = config.max_in_flight.max(1);
    let mut sending = futures_util::stream::FuturesUnordered::new();
    let mut paused_until: Option<Instant> = None;
    loop {
        let paused = paused_until.is_some_and(|p| p > Instant::now());
        let can_start =
            !paused && sending.len() < max_in_flight && lock(&shared.queue).pending() > 0;
        tokio::select! {
            // Stopped: what is queued stays unsent; the agent's shutdown decides.
            () = token.cancelled() => return,
            Some(sent) = futures_util::StreamExt::next(&mut sending), if !sending.is_empty() => {
                if let Some(delay) = answered(&config, &shared, sent, &mut backoff) {
                    paused_until = Some(Instant::now() + delay);
                }
            }
            _ = pace.tick(), if can_start => {
                let next = lock(&shared.queue).start_next();
                if let Some((key, queued)) = next {
                    let registry = registry.clone();
                    sending.push(async move {
                        let result = registry.publish(&key.group, &key.name, queued.set.clone()).await;
                        Sent { key, queued, result }
                    });
                }
            }
            () = shared.wake.notified() => {}
            () = sleep_until_or_never(paused_until), if paused => {
                paused_until = None;
            }
        }
        report_counts(&config, &shared);
    }
}

/// Tells `/status` the replica totals and the queue as they are now.
fn report_counts(config: &PublisherConfig, shared: &Shared) {
    let (totals, queued, in_flight) = {
        let q = lock(&shared.queue);
        (q.totals(), q.pending(), q.in_flight())
    };
    let replicas = ReplicaCounts {
        wanted: totals.wanted,
        acknowledged: totals.acknowledged,
    };
    config.telemetry.publisher_counts(
        &config.cluster,
        &config.namespace,
        replicas,
        queued,
        in_flight,
    );
}

/// Books one answer: counted and reported; a retryable failure goes back
/// in line and returns how long to pause before starting anything new.
fn answered(
    config: &PublisherConfig,
    shared: &Shared,
    sent: Sent,
    backoff: &mut Backoff,
) -> Option<Duration> {
    let Sent {
        key,
        queued,
        result,
    } = sent;
    let t = &config.telemetry;
    {
        // Counted before it lands, under one lock: the totals never see the
        // service neither in flight nor acknowledged.
        let mut q = lock(&shared.queue);
        if result.is_ok() {
            q.acknowledged(&key, queued.set.len());
        }
        q.landed(&key);
    }
    match result {
        Ok(()) => {
            backoff.reset();
            shared.stats.send_modify(|s| s.applied += 1);
            let lag = queued.since.map(|s| s.elapsed());
            t.published(
                &config.cluster,
                &config.namespace,
                &key,
                queued.set.len(),
                lag,
            );
            None
        }
        Err(e) if e.retryable => {
            shared.stats.send_modify(|s| s.retried += 1);
            t.publish_failed(
                &config.cluster,
                &config.namespace,
                e.kind,
                format!("{key}: {}", crate::runtime::with_causes(&e)),
                true,
            );
            lock(&shared.queue).retry(key, queued);
            Some(backoff.next_delay())
        }
        Err(e) => {
            shared.stats.send_modify(|s| s.failed += 1);
            t.publish_failed(
                &config.cluster,
                &config.namespace,
                e.kind,
                format!("{key}: {}", crate::runtime::with_causes(&e)),
                false,
            );
            None
        }
    }
}

/// How long a read-back waits before it reads a drifting service again.
const DRIFT_CONFIRM_AFTER: Duration = Duration::from_secs(1);
/// How long a destination may take to show a set it acknowledged. Nacos
/// answers queries from a view that its push tasks refresh (after the push
/// delay, later under load), so a service answered this recently is not
/// read back: under churn its view is behind by design, not drifted.
const READ_BACK_SETTLE: Duration = Duration::from_secs(5);

/// Anti-entropy for one destination: every `every`, read back each service
/// we publish and republish it when ours is missing or wrong there (a lost
/// write, a server that dropped state without dropping our connection).
/// Extras (tagged instances we do not publish) are counted, not touched:
/// they belong to other connections.
async fn read_back<R: Registry>(
    registry: Arc<R>,
    config: PublisherConfig,
    every: Duration,
    shared: Arc<Shared>,
    token: CancellationToken,
) {
    let mut round = ticker_after(every);
    let mut pace = pacer(&config);
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            _ = round.tick() => {}
        }
        let (mut repaired, mut failed) = (0usize, 0usize);
        if let Some(before) = Instant::now().checked_sub(READ_BACK_SETTLE) {
            lock(&shared.queue).forget_landed_before(before);
        }
        for key in shared.view.services() {
            tokio::select! {
                () = token.cancelled() => return,
                _ = pace.tick() => {}
            }
            let checked = tokio::select! {
                () = token.cancelled() => return,
                checked = read_back_one(registry.as_ref(), &config, &shared, &key) => checked,
            };
            match checked {
                Checked::Repaired => repaired += 1,
                Checked::Unreadable => failed += 1,
                Checked::Fine => {}
            }
        }
        shared.stats.send_modify(|s| {
            s.read_backs += 1;
            s.repaired += repaired as u64;
        });
        let t = &config.telemetry;
        t.read_back_done(&config.cluster, &config.namespace, repaired, failed);
    }
}

/// Nothing queued or in flight for the service, and no answer since
/// `since` (`None`: since the clock began, so any answer remembered counts).
fn settled(shared: &Shared, key: &ServiceKey, since: Option<Instant>) -> bool {
    let q = lock(&shared.queue);
    let answered = match since {
        Some(s) => q.landed_since(key, s),
        None => q.has_landed(key),
    };
    q.is_idle(key) && !answered
}

/// What reading back one service found.
enum Checked {
    /// As published, drifted but not ours to repair, or superseded meanwhile.
    Fine,
    /// Drifted, and queued again.
    Repaired,
    /// The destination did not answer.
    Unreadable,
}

/// Reads one service back; a difference still there a moment later is
/// reported, and repaired if it is ours and nothing newer is on its way.
async fn read_back_one<R: Registry>(
    registry: &R,
    config: &PublisherConfig,
    shared: &Shared,
    key: &ServiceKey,
) -> Checked {
    // Compare only what has settled: nothing queued or in flight (a newer
    // set is on its way anyway), nothing answered in the last moments (the
    // destination's view may still be catching up), and nothing answered
    // from now until the second look (checked there).
    let began = Instant::now();
    if !settled(shared, key, began.checked_sub(READ_BACK_SETTLE)) {
        return Checked::Fine;
    }
    let Some(expected) = shared.view.published(key) else {
        return Checked::Fine;
    };
    let t = &config.telemetry;
    let owned = &config.owned.0;
    let shown = match registry.read(&key.group, &key.name).await {
        Ok(shown) => shown,
        Err(e) => {
            let message = format!("{key}: {e}");
            t.error(&config.cluster, "read_back", e.kind, message, true);
            return Checked::Unreadable;
        }
    };
    if drift(&expected, &shown, |i| owned(i)).is_none() {
        return Checked::Fine;
    }
    // Confirm before repairing: Nacos 3.1 answers a query shortly after a
    // batch publish from a view that events update a moment later (seen on
    // real servers as a one-off false drift), so only a difference that is
    // still there after a second look counts.
    tokio::time::sleep(DRIFT_CONFIRM_AFTER).await;
    let d = match registry.read(&key.group, &key.name).await {
        Ok(again)
            if settled(shared, key, Some(began))
                && shared.view.published(key).as_ref() == Some(&expected) =>
        {
            drift(&expected, &again, |i| owned(i))
        }
        _ => return Checked::Fine,
    };
    if d.is_none() {
        return Checked::Fine;
    }
    // Repair only if what we compared is still what we publish and nothing
    // newer is queued (checked and queued under one lock).
    let repair = d.repairable() && {
        let mut q = lock(&shared.queue);
        let still = q.is_idle(key) && shared.view.published(key).as_ref() == Some(&expected);
        if still {
            q.submit(key.clone(), expected, None);
        }
        still
    };
    if repair {
        shared.wake.notify_one();
    }
    t.drift(&config.cluster, &config.namespace, key, d, repair);
    if repair {
        Checked::Repaired
    } else {
        Checked::Fine
    }
}

#[cfg(test)]
mod tests {
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
        let p = Publisher::start(fake.clone(), config, &tasks);
        let mut stats = p.stats();
        p.submit_set(key("orders"), set(2).into(), Some(Instant::now()));
        p.submit(key("users"), set(1));
        until(&mut stats, |s| s.applied == 2).await;
        // A round with nothing lost changes nothing.
        until(&mut stats, |s| s.read_backs == 1).await;
        assert_eq!(stats.borrow().repaired, 0);
        // The destination forgets `orders` behind our back.
        lock(&fake.shows).remove("orders");
        until(&mut stats, |s| s.read_backs == 2).await;
        until(&mut stats, |s| s.applied == 3).await;
        assert_eq!(stats.borrow().repaired, 1);
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
        assert_eq!(drift, Some(("orders".to_owned(), 2, true)));
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
}

#[cfg(test)]
#[path = "publish_status_tests.rs"]
mod status_tests;
