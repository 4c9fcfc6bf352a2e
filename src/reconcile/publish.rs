//! The destination publisher: applies full sets to one destination cluster
//! namespace, latest set per service wins, at a bounded rate, retrying what
//! can be retried.
//!
//! It sees the destination only through [`Registry`], so its tests need no
//! network. A set submitted while an older one for the same service is
//! still queued replaces it (bursts coalesce; nothing stale is ever sent
//! after something newer).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, info, warn};

use super::plan::drift;
use crate::cluster::{Client, ClientError};
use crate::model::{ClusterId, Instance, InstanceSet, ServiceKey};
use crate::runtime::{Backoff, Tasks, lock, sleep_until_or_never};
use crate::telemetry::Telemetry;

/// A write the destination refused or could not take.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct PublishError {
    /// Whether trying again later can succeed.
    pub retryable: bool,
    /// Stable label for metrics.
    pub kind: &'static str,
    /// What went wrong.
    pub message: String,
}

impl From<ClientError> for PublishError {
    fn from(e: ClientError) -> Self {
        PublishError {
            retryable: e.is_retryable(),
            kind: e.kind(),
            message: e.to_string(),
        }
    }
}

/// One destination cluster namespace, through the calls the engine needs.
pub trait Registry: Send + Sync + 'static {
    /// Replaces this writer's whole set of instances of the service.
    fn publish(
        &self,
        group: &str,
        name: &str,
        instances: InstanceSet,
    ) -> impl Future<Output = Result<(), PublishError>> + Send;

    /// Everything the destination shows for the service (natives, our
    /// replicas, anyone else's), for the read-back.
    fn read(
        &self,
        group: &str,
        name: &str,
    ) -> impl Future<Output = Result<Vec<Instance>, PublishError>> + Send;

    /// The set this writer holds for the service: what the destination
    /// took, or will be given again after a reconnect. `None` when empty.
    /// (The writer keeps it anyway for its redo; the publisher keeps no
    /// second copy.)
    fn published(&self, service: &ServiceKey) -> Option<InstanceSet>;

    /// Services with a non-empty set.
    fn published_services(&self) -> Vec<ServiceKey>;
}

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

impl Registry for Client {
    async fn publish(
        &self,
        group: &str,
        name: &str,
        instances: InstanceSet,
    ) -> Result<(), PublishError> {
        Ok(Client::publish_set(self, group, name, instances).await?)
    }

    async fn read(&self, group: &str, name: &str) -> Result<Vec<Instance>, PublishError> {
        Ok(Client::query(self, group, name).await?.instances)
    }

    fn published(&self, service: &ServiceKey) -> Option<InstanceSet> {
        self.published_set(service)
    }

    fn published_services(&self) -> Vec<ServiceKey> {
        self.published_keys()
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

/// A set waiting to be sent, and since when the change it carries is known
/// (the oldest unsent change: lag is measured from there).
struct Queued {
    set: InstanceSet,
    since: Option<Instant>,
}

#[derive(Default)]
struct Queue {
    order: VecDeque<ServiceKey>,
    sets: HashMap<ServiceKey, Queued>,
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
    queue: Mutex<Queue>,
    wake: Notify,
    /// The registry's sets (it keeps them for its redo).
    view: Arc<dyn View>,
    stats: watch::Sender<PublisherStats>,
    /// Services whose set is sent and not yet answered (never two at once
    /// for one service, so sets of a service land in order).
    in_flight: Mutex<HashMap<ServiceKey, InstanceSet>>,
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
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            view: registry.clone(),
            stats: watch::channel(PublisherStats::default()).0,
            in_flight: Mutex::new(HashMap::new()),
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
        {
            let mut q = lock(&self.shared.queue);
            match q.sets.get_mut(&service) {
                Some(queued) => {
                    queued.set = set;
                    // Keep the oldest: the change waited since then.
                    queued.since = match (queued.since, since) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    self.shared.stats.send_modify(|s| s.coalesced += 1);
                }
                None => {
                    q.sets.insert(service.clone(), Queued { set, since });
                    q.order.push_back(service);
                }
            }
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
        let q = lock(&self.shared.queue);
        if let Some(queued) = q.sets.get(service) {
            return Some(queued.set.clone());
        }
        if let Some(sending) = lock(&self.shared.in_flight).get(service) {
            return Some(sending.clone());
        }
        drop(q);
        self.shared.view.published(service)
    }

    /// Sets waiting to be sent.
    pub fn pending(&self) -> usize {
        lock(&self.shared.queue).order.len()
    }

    /// Nothing queued and nothing in flight: the destination holds
    /// everything submitted so far (or refused it for good).
    pub fn settled(&self) -> bool {
        let q = lock(&self.shared.queue);
        q.order.is_empty() && lock(&self.shared.in_flight).is_empty()
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
    let period = Duration::from_secs(1) / config.max_per_second.max(1);
    let mut pace = tokio::time::interval(period);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    pace
}

/// What came back for one set sent.
struct Sent {
    key: ServiceKey,
    set: InstanceSet,
    since: Option<Instant>,
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
    let t = &config.telemetry;
    let max_in_flight = config.max_in_flight.max(1);
    let mut sending = futures_util::stream::FuturesUnordered::new();
    // Keys popped while their service was in flight: back to the queue's
    // front when it lands.
    let mut deferred: Vec<ServiceKey> = Vec::new();
    let mut paused_until: Option<Instant> = None;
    loop {
        let paused = paused_until.is_some_and(|p| p > Instant::now());
        let can_start =
            !paused && sending.len() < max_in_flight && !lock(&shared.queue).order.is_empty();
        tokio::select! {
            // Stopped: what is queued stays unsent; the agent's shutdown decides.
            () = token.cancelled() => return,
            Some(sent) = futures_util::StreamExt::next(&mut sending), if !sending.is_empty() => {
                let Sent { key, set, since, result } = sent;
                {
                    let mut q = lock(&shared.queue);
                    lock(&shared.in_flight).remove(&key);
                    if let Some(i) = deferred.iter().position(|k| *k == key) {
                        deferred.swap_remove(i);
                        q.order.push_front(key.clone());
                    }
                }
                match result {
                    Ok(()) => {
                        backoff.reset();
                        let replicas = set.len();
                        shared.stats.send_modify(|s| s.applied += 1);
                        t.published(&config.cluster, &config.namespace, &key, replicas, since.map(|s| s.elapsed()));
                    }
                    Err(e) if e.retryable => {
                        debug!(service = %key, error = %e, "publish failed; will retry");
                        shared.stats.send_modify(|s| s.retried += 1);
                        t.publish_failed(&config.cluster, &config.namespace, e.kind, format!("{key}: {e}"), true);
                        {
                            // Back in the queue, unless a newer set arrived meanwhile.
                            let mut q = lock(&shared.queue);
                            if !q.sets.contains_key(&key) {
                                q.sets.insert(key.clone(), Queued { set, since });
                                q.order.push_back(key);
                            }
                        }
                        paused_until = Some(Instant::now() + backoff.next_delay());
                    }
                    Err(e) => {
                        warn!(service = %key, error = %e, kind = e.kind, "publish refused; not retried");
                        shared.stats.send_modify(|s| s.failed += 1);
                        t.publish_failed(&config.cluster, &config.namespace, e.kind, format!("{key}: {e}"), false);
                    }
                }
            }
            _ = pace.tick(), if can_start => {
                let next = {
                    let mut q = lock(&shared.queue);
                    let mut in_flight = lock(&shared.in_flight);
                    let mut next = None;
                    while let Some(key) = q.order.pop_front() {
                        if in_flight.contains_key(&key) {
                            deferred.push(key);
                            continue;
                        }
                        if let Some(queued) = q.sets.remove(&key) {
                            // Under the queue lock, so `settled` never sees neither.
                            in_flight.insert(key.clone(), queued.set.clone());
                            next = Some((key, queued));
                            break;
                        }
                    }
                    next
                };
                if let Some((key, Queued { set, since })) = next {
                    let registry = registry.clone();
                    sending.push(async move {
                        let result = registry.publish(&key.group, &key.name, set.clone()).await;
                        Sent { key, set, since, result }
                    });
                }
            }
            () = shared.wake.notified() => {}
            () = sleep_until_or_never(paused_until), if paused => {
                paused_until = None;
            }
        }
    }
}

/// Anti-entropy for one destination: every `every`, read back each service
/// we publish and republish it when ours is missing or wrong there (a lost
/// write, a server that dropped state without dropping our connection).
/// Extras (tagged instances we do not publish) are counted, not touched:
/// they belong to other connections.
/// How long a read-back waits before it reads a drifting service again.
const DRIFT_CONFIRM_AFTER: Duration = Duration::from_secs(1);

async fn read_back<R: Registry>(
    registry: Arc<R>,
    config: PublisherConfig,
    every: Duration,
    shared: Arc<Shared>,
    token: CancellationToken,
) {
    let mut round = tokio::time::interval(every);
    round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    round.reset();
    let mut pace = pacer(&config);
    let t = &config.telemetry;
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            _ = round.tick() => {}
        }
        let services: Vec<ServiceKey> = shared.view.services();
        let (mut repaired, mut failed) = (0usize, 0usize);
        for key in services {
            tokio::select! {
                () = token.cancelled() => return,
                _ = pace.tick() => {}
            }
            // Something newer is queued: it will be written anyway.
            if lock(&shared.queue).sets.contains_key(&key) {
                continue;
            }
            let Some(expected) = shared.view.published(&key) else {
                continue;
            };
            let shown = match registry.read(&key.group, &key.name).await {
                Ok(shown) => shown,
                Err(e) => {
                    failed += 1;
                    t.error(
                        &config.cluster,
                        "read_back",
                        e.kind,
                        format!("{key}: {e}"),
                        true,
                    );
                    continue;
                }
            };
            let owned = &config.owned.0;
            let d = drift(&expected, &shown, |i| owned(i));
            if d.is_none() {
                continue;
            }
            // Confirm before repairing: Nacos 3.1 answers a query shortly
            // after a batch publish from a view that events update a moment
            // later (seen on real servers as a one-off false drift), so only
            // a difference that is still there after a second look counts.
            tokio::select! {
                () = token.cancelled() => return,
                () = tokio::time::sleep(DRIFT_CONFIRM_AFTER) => {}
            }
            let d = match registry.read(&key.group, &key.name).await {
                Ok(again) if shared.view.published(&key).as_ref() == Some(&expected) => {
                    drift(&expected, &again, |i| owned(i))
                }
                _ => continue,
            };
            if d.is_none() {
                continue;
            }
            // Repair only if what we compared is still what we publish and
            // nothing newer is queued (checked and queued under one lock).
            let repair = d.repairable() && {
                let mut q = lock(&shared.queue);
                let still = !q.sets.contains_key(&key)
                    && !lock(&shared.in_flight).contains_key(&key)
                    && shared.view.published(&key).as_ref() == Some(&expected);
                if still {
                    q.sets.insert(
                        key.clone(),
                        Queued {
                            set: expected,
                            since: None,
                        },
                    );
                    q.order.push_back(key.clone());
                }
                still
            };
            warn!(service = %key, missing = d.missing, different = d.different, extra = d.extra, repair, "read-back found drift");
            if repair {
                repaired += 1;
                shared.wake.notify_one();
            }
            t.drift(&config.cluster, &config.namespace, &key, d, repair);
        }
        shared.stats.send_modify(|s| {
            s.read_backs += 1;
            s.repaired += repaired as u64;
        });
        t.read_back_done(&config.cluster, &config.namespace);
        info!(destination = %config.cluster, namespace = %config.namespace, repaired, failed, "read-back round done");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Records every call; fails the first `fail_first` calls; blocks while
    /// gated; shows what was last published per name (a test can make it
    /// forget, as a destination that lost state).
    #[derive(Clone, Default)]
    struct Fake {
        calls: Arc<Mutex<Vec<(String, usize)>>>,
        fail_first: Arc<AtomicUsize>,
        fatal: bool,
        gate: Option<Arc<tokio::sync::Semaphore>>,
        shows: Arc<Mutex<HashMap<String, Vec<Instance>>>>,
        /// Calls begun (before the gate).
        entered: Arc<AtomicUsize>,
        /// What this writer holds per name (its redo set); unlike `shows`,
        /// a destination losing state does not change it.
        written: Arc<Mutex<HashMap<String, InstanceSet>>>,
    }

    impl Registry for Fake {
        async fn publish(
            &self,
            _group: &str,
            name: &str,
            instances: InstanceSet,
        ) -> Result<(), PublishError> {
            self.entered.fetch_add(1, Ordering::SeqCst);
            if let Some(gate) = &self.gate {
                let _permit = gate.acquire().await.map_err(|_| PublishError {
                    retryable: false,
                    kind: "gate",
                    message: "closed".into(),
                })?;
            }
            lock(&self.calls).push((name.to_owned(), instances.len()));
            if self.fail_first.load(Ordering::SeqCst) > 0 {
                self.fail_first.fetch_sub(1, Ordering::SeqCst);
                return Err(PublishError {
                    retryable: !self.fatal,
                    kind: "fake",
                    message: "refused".into(),
                });
            }
            lock(&self.shows).insert(name.to_owned(), instances.to_vec());
            lock(&self.written).insert(name.to_owned(), instances);
            Ok(())
        }

        async fn read(&self, _group: &str, name: &str) -> Result<Vec<Instance>, PublishError> {
            Ok(lock(&self.shows).get(name).cloned().unwrap_or_default())
        }

        fn published(&self, service: &ServiceKey) -> Option<InstanceSet> {
            lock(&self.written).get(&service.name).cloned()
        }

        fn published_services(&self) -> Vec<ServiceKey> {
            lock(&self.written).keys().map(|n| key(n)).collect()
        }
    }

    fn key(name: &str) -> ServiceKey {
        ServiceKey::new("public", "DEFAULT_GROUP", name)
    }

    fn set(n: usize) -> Vec<Instance> {
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
        let fake = Fake {
            gate: Some(gate.clone()),
            ..Fake::default()
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
        let fake = Fake::default();
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
        let fake = Fake {
            fail_first: Arc::new(AtomicUsize::new(2)),
            ..Fake::default()
        };
        let tasks = Tasks::default();
        let p = Publisher::start(fake.clone(), PublisherConfig::default(), &tasks);
        let mut stats = p.stats();
        p.submit(key("orders"), set(2));
        until(&mut stats, |s| s.applied == 1).await;
        assert_eq!(stats.borrow().retried, 2);
        assert_eq!(lock(&fake.calls).len(), 3);

        let fatal = Fake {
            fail_first: Arc::new(AtomicUsize::new(1)),
            fatal: true,
            ..Fake::default()
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
        let fake = Fake::default();
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
    async fn the_read_back_republishes_what_the_destination_lost() {
        let fake = Fake::default();
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
        let fake = Fake {
            gate: Some(gate.clone()),
            ..Fake::default()
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
