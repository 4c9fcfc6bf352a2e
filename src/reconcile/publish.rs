//! The destination publisher: applies full sets to one destination cluster
//! namespace, latest set per service wins, paced by what the destination
//! acknowledges, retrying what can be retried.
//!
//! It sees the destination only through [`Registry`], so its tests need no
//! network. A set submitted while an older one for the same service is
//! still queued replaces it (bursts coalesce; nothing stale is ever sent
//! after something newer).
//!
//! Pacing: a set is started only while fewer than the current limit are in
//! flight and the rate ceiling allows. The limit adapts to the answers (see
//! [`super::limit`]): it grows while acks stay near their baseline and is
//! cut on slow rounds, retryable failures and refusals for load, within
//! `[1, max_in_flight]`. `max_per_second` stays a hard ceiling on starts.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::warn;

use super::limit::{Answer, ConcurrencyLimit, LimitSettings, Outcome, Rate};
use super::plan::drift;
use super::queue::{PublishQueue, Queued};
pub use crate::cluster::registry::{PublishError, Registry};
use crate::model::{ClusterId, Instance, InstanceSet, ServiceKey};
use crate::runtime::{Backoff, Tasks, lock, sleep_until_or_never, ticker, ticker_after};
use crate::telemetry::{PublisherMeters, ReplicaCounts, RoundTally, Telemetry};

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
    /// Publishes (and read-back queries) per second, at most: a hard
    /// ceiling, whatever the adaptive limit allows.
    pub max_per_second: u32,
    /// Sets sent and not yet answered, at most (different services; one
    /// service never has two in flight): the ceiling of the adaptive limit.
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
            max_per_second: 10_000,
            max_in_flight: 128,
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
    /// Sets that may be in flight now (the adaptive limit).
    pub limit: usize,
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
        let pacing = Pacing::new(&config);
        let stats = PublisherStats {
            limit: pacing.limit.current(),
            ..PublisherStats::default()
        };
        let shared = Arc::new(Shared {
            queue: Mutex::new(PublishQueue::default()),
            wake: Notify::new(),
            view: registry.clone(),
            stats: watch::channel(stats).0,
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
        let task = work(registry, config, pacing, shared.clone(), token.clone());
        tasks.spawn(name, task);
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
    /// When it went out and when its answer came.
    sent: Instant,
    answered: Instant,
    /// Sets in flight when it was started, itself included.
    in_flight: usize,
}

/// One set on its way: the call, timed from its first poll (when it goes
/// out) to its answer.
async fn send<R: Registry>(
    registry: Arc<R>,
    key: ServiceKey,
    queued: Queued,
    in_flight: usize,
) -> Sent {
    let sent = Instant::now();
    let result = registry
        .publish(&key.group, &key.name, queued.set.clone())
        .await;
    Sent {
        key,
        queued,
        result,
        sent,
        answered: Instant::now(),
        in_flight,
    }
}

/// The limit and the rate of one publisher, and what `/metrics` and
/// `/status` were last told of them.
struct Pacing {
    limit: ConcurrencyLimit,
    rate: Rate,
    meters: PublisherMeters,
    shown: usize,
}

impl Pacing {
    fn new(config: &PublisherConfig) -> Self {
        let limit = ConcurrencyLimit::new(LimitSettings::with_ceiling(config.max_in_flight));
        let meters = config
            .telemetry
            .publisher(&config.cluster, &config.namespace);
        meters.limit(limit.current());
        Self {
            shown: limit.current(),
            limit,
            rate: Rate::per_second(config.max_per_second, Instant::now()),
            meters,
        }
    }

    /// Learns from one answer; the gauge follows when the limit moved.
    fn answered(&mut self, sent: &Sent) {
        let outcome = match &sent.result {
            Ok(()) => {
                self.meters
                    .acked(sent.answered.saturating_duration_since(sent.sent));
                Outcome::Acked
            }
            Err(e) if e.retryable => Outcome::Failed,
            Err(_) => Outcome::Refused,
        };
        self.limit.answered(Answer {
            sent: sent.sent,
            answered: sent.answered,
            in_flight: sent.in_flight,
            outcome,
        });
        let now = self.limit.current();
        if now != self.shown {
            self.shown = now;
            self.meters.limit(now);
        }
    }
}

/// Sends queued sets, one at a time per service, while fewer than the
/// adaptive limit are in flight and within `max_per_second`; after a
/// retryable failure it pauses (backoff) before starting anything new, so a
/// struggling destination is not flooded.
async fn work<R: Registry>(
    registry: Arc<R>,
    config: PublisherConfig,
    mut pacing: Pacing,
    shared: Arc<Shared>,
    token: CancellationToken,
) {
    let Some(mut backoff) = retry_backoff(&config) else {
        return;
    };
    let mut sending = FuturesUnordered::new();
    let mut paused_until: Option<Instant> = None;
    let mut reported = None;
    // The answers read in one wake-up; kept, so reading them allocates nothing.
    let mut answers = Vec::new();
    loop {
        let now = Instant::now();
        if paused_until.is_some_and(|p| p <= now) {
            paused_until = None;
        }
        // Start what the limit and the rate allow, all at once: the calls
        // go out together when the futures are first polled below.
        let mut rate_wait = None;
        if paused_until.is_none() {
            let mut queue = lock(&shared.queue);
            while sending.len() < pacing.limit.current() && queue.pending() > 0 {
                if let Some(at) = pacing.rate.ready_at(now) {
                    rate_wait = Some(at);
                    break;
                }
                // `None`: what waits is a newer set of a service in flight.
                let Some((key, queued)) = queue.start_next() else {
                    break;
                };
                pacing.rate.take(now);
                sending.push(send(registry.clone(), key, queued, sending.len() + 1));
            }
        }
        tokio::select! {
            // Stopped: what is queued stays unsent; the agent's shutdown decides.
            () = token.cancelled() => return,
            Some(sent) = sending.next(), if !sending.is_empty() => {
                // Every answer already in is booked before anything new
                // starts, so the next start sees the limit they make (and a
                // set started is sent before another answer can cut it).
                answers.push(sent);
                std::future::poll_fn(|cx| {
                    while let Poll::Ready(Some(sent)) = sending.poll_next_unpin(cx) {
                        answers.push(sent);
                    }
                    Poll::Ready(())
                })
                .await;
                for sent in answers.drain(..) {
                    pacing.answered(&sent);
                    let limit = pacing.limit.current();
                    if let Some(delay) =
                        answered(&config, &shared, &pacing.meters, sent, &mut backoff, limit)
                    {
                        paused_until = Some(Instant::now() + delay);
                    }
                }
            }
            () = shared.wake.notified() => {}
            () = sleep_until_or_never(paused_until), if paused_until.is_some() => {
                paused_until = None;
            }
            () = sleep_until_or_never(rate_wait), if rate_wait.is_some() => {}
        }
        report_counts(&config, &shared, &mut reported);
    }
}

/// Tells `/status` the replica totals and the queue as they are now, when
/// they differ from what it was last told (this runs after every pass of
/// the work loop: most passes change nothing it shows).
fn report_counts(
    config: &PublisherConfig,
    shared: &Shared,
    reported: &mut Option<(usize, usize, usize, usize)>,
) {
    let (totals, queued, in_flight) = {
        let q = lock(&shared.queue);
        (q.totals(), q.pending(), q.in_flight())
    };
    let now = (totals.wanted, totals.acknowledged, queued, in_flight);
    if *reported == Some(now) {
        return;
    }
    *reported = Some(now);
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
    meters: &PublisherMeters,
    sent: Sent,
    backoff: &mut Backoff,
    limit: usize,
) -> Option<Duration> {
    let Sent {
        key,
        queued,
        result,
        ..
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
            shared.stats.send_modify(|s| {
                s.applied += 1;
                s.limit = limit;
            });
            let lag = queued.since.map(|s| s.elapsed());
            meters.published(&key, queued.set.len(), lag);
            None
        }
        Err(e) if e.retryable => {
            shared.stats.send_modify(|s| {
                s.retried += 1;
                s.limit = limit;
            });
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
            shared.stats.send_modify(|s| {
                s.failed += 1;
                s.limit = limit;
            });
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
    // Services whose last comparison found drift (kept while a service is
    // skipped, so a repair that does not stick stays counted).
    let mut drifting: HashSet<ServiceKey> = HashSet::new();
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            _ = round.tick() => {}
        }
        let (mut repaired, mut failed) = (0usize, 0usize);
        if let Some(before) = Instant::now().checked_sub(READ_BACK_SETTLE) {
            lock(&shared.queue).forget_landed_before(before);
        }
        let services = shared.view.services();
        if !drifting.is_empty() {
            let published: HashSet<&ServiceKey> = services.iter().collect();
            drifting.retain(|k| published.contains(k));
        }
        for key in services {
            tokio::select! {
                () = token.cancelled() => return,
                _ = pace.tick() => {}
            }
            let checked = tokio::select! {
                () = token.cancelled() => return,
                checked = read_back_one(registry.as_ref(), &config, &shared, &key) => checked,
            };
            match checked {
                Checked::Drifted { repaired: fixed } => {
                    repaired += usize::from(fixed);
                    drifting.insert(key);
                }
                Checked::Clean => {
                    drifting.remove(&key);
                }
                Checked::Unreadable => failed += 1,
                Checked::Skipped => {}
            }
        }
        shared.stats.send_modify(|s| {
            s.read_backs += 1;
            s.repaired += repaired as u64;
        });
        let round = RoundTally {
            drifted: drifting.len(),
            repaired,
            failed,
        };
        config
            .telemetry
            .read_back_done(&config.cluster, &config.namespace, round);
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
    /// Not compared: not settled, or superseded between the two looks.
    Skipped,
    /// As published.
    Clean,
    /// A difference still there at the second look (reported); `repaired`:
    /// queued again (not when only extras differ, or something newer came).
    Drifted { repaired: bool },
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
        return Checked::Skipped;
    }
    let Some(expected) = shared.view.published(key) else {
        return Checked::Skipped;
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
        return Checked::Clean;
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
        _ => return Checked::Skipped,
    };
    if d.is_none() {
        return Checked::Clean;
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
    Checked::Drifted { repaired: repair }
}

#[cfg(test)]
#[path = "publish_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "publish_status_tests.rs"]
mod status_tests;

#[cfg(test)]
#[path = "publish_pacing_tests.rs"]
mod pacing_tests;
