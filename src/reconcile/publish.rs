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

use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::cluster::{Client, ClientError};
use crate::model::{Instance, ServiceKey};
use crate::runtime::Backoff;

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

/// One destination cluster namespace, through the one call the engine needs.
pub trait Registry: Send + Sync + 'static {
    /// Replaces this writer's whole set of instances of the service.
    fn publish(
        &self,
        group: &str,
        name: &str,
        instances: Vec<Instance>,
    ) -> impl Future<Output = Result<(), PublishError>> + Send;
}

impl Registry for Client {
    async fn publish(&self, group: &str, name: &str, instances: Vec<Instance>) -> Result<(), PublishError> {
        Client::publish(self, group, name, instances).await.map_err(|e: ClientError| PublishError {
            retryable: e.is_retryable(),
            kind: e.kind(),
            message: e.to_string(),
        })
    }
}

/// Publisher limits.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// Publishes per second, at most.
    pub max_per_second: u32,
    /// First delay after a retryable failure.
    pub retry_min: Duration,
    /// Largest delay between retries.
    pub retry_max: Duration,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self { max_per_second: 200, retry_min: Duration::from_millis(200), retry_max: Duration::from_secs(10) }
    }
}

#[derive(Default)]
struct Queue {
    order: VecDeque<ServiceKey>,
    sets: HashMap<ServiceKey, Vec<Instance>>,
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
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Notify,
    published: Mutex<HashMap<ServiceKey, Vec<Instance>>>,
    stats: watch::Sender<PublisherStats>,
}

/// Handle on a running publisher. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    shared: Arc<Shared>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Publisher {
    /// Starts publishing to `registry` until `shutdown` is cancelled. Must be
    /// called within a Tokio runtime.
    pub fn start<R: Registry>(registry: R, config: PublisherConfig, shutdown: &CancellationToken) -> Publisher {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            published: Mutex::new(HashMap::new()),
            stats: watch::channel(PublisherStats::default()).0,
        });
        tokio::spawn(work(registry, config, shared.clone(), shutdown.child_token()));
        Publisher { shared }
    }

    /// Queues the full set for a service. A set still queued for the same
    /// service is replaced: only the latest is sent.
    pub fn submit(&self, service: ServiceKey, instances: Vec<Instance>) {
        {
            let mut q = lock(&self.shared.queue);
            if q.sets.insert(service.clone(), instances).is_some() {
                self.shared.stats.send_modify(|s| s.coalesced += 1);
            } else {
                q.order.push_back(service);
            }
        }
        self.shared.wake.notify_one();
    }

    /// The set the destination last acknowledged for the service.
    pub fn published(&self, service: &ServiceKey) -> Option<Vec<Instance>> {
        lock(&self.shared.published).get(service).cloned()
    }

    /// Sets waiting to be sent.
    pub fn pending(&self) -> usize {
        lock(&self.shared.queue).order.len()
    }

    /// Counters, current value and changes.
    pub fn stats(&self) -> watch::Receiver<PublisherStats> {
        self.shared.stats.subscribe()
    }
}

async fn work<R: Registry>(registry: R, config: PublisherConfig, shared: Arc<Shared>, token: CancellationToken) {
    let period = Duration::from_secs(1) / config.max_per_second.max(1);
    let mut pace = tokio::time::interval(period);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = match Backoff::try_new(config.retry_min, config.retry_max.max(config.retry_min), 0.3) {
        Ok(b) => b,
        Err(e) => {
            warn!(error = %e, "publisher retry settings invalid; using defaults");
            let d = PublisherConfig::default();
            match Backoff::try_new(d.retry_min, d.retry_max, 0.3) {
                Ok(b) => b,
                Err(_) => return,
            }
        }
    };
    loop {
        let next = {
            let mut q = lock(&shared.queue);
            q.order.pop_front().and_then(|key| q.sets.remove(&key).map(|set| (key, set)))
        };
        let Some((key, set)) = next else {
            tokio::select! {
                // Stopped: what is queued stays unsent; the agent's shutdown decides.
                () = token.cancelled() => return,
                () = shared.wake.notified() => continue,
            }
        };
        tokio::select! {
            () = token.cancelled() => return,
            _ = pace.tick() => {}
        }
        match registry.publish(&key.group, &key.name, set.clone()).await {
            Ok(()) => {
                backoff.reset();
                let mut published = lock(&shared.published);
                if set.is_empty() {
                    published.remove(&key);
                } else {
                    published.insert(key, set);
                }
                drop(published);
                shared.stats.send_modify(|s| s.applied += 1);
            }
            Err(e) if e.retryable => {
                debug!(service = %key, error = %e, "publish failed; will retry");
                shared.stats.send_modify(|s| s.retried += 1);
                {
                    // Back in the queue, unless a newer set arrived meanwhile.
                    let mut q = lock(&shared.queue);
                    if !q.sets.contains_key(&key) {
                        q.sets.insert(key.clone(), set);
                        q.order.push_back(key);
                    }
                }
                tokio::select! {
                    () = token.cancelled() => return,
                    () = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
            Err(e) => {
                warn!(service = %key, error = %e, kind = e.kind, "publish refused; not retried");
                shared.stats.send_modify(|s| s.failed += 1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Records every call; fails the first `fail_first` calls; blocks while gated.
    #[derive(Clone, Default)]
    struct Fake {
        calls: Arc<Mutex<Vec<(String, usize)>>>,
        fail_first: Arc<AtomicUsize>,
        fatal: bool,
        gate: Option<Arc<tokio::sync::Semaphore>>,
    }

    impl Registry for Fake {
        async fn publish(&self, _group: &str, name: &str, instances: Vec<Instance>) -> Result<(), PublishError> {
            if let Some(gate) = &self.gate {
                let _permit = gate.acquire().await.map_err(|_| PublishError { retryable: false, kind: "gate", message: "closed".into() })?;
            }
            lock(&self.calls).push((name.to_owned(), instances.len()));
            if self.fail_first.load(Ordering::SeqCst) > 0 {
                self.fail_first.fetch_sub(1, Ordering::SeqCst);
                return Err(PublishError { retryable: !self.fatal, kind: "fake", message: "refused".into() });
            }
            Ok(())
        }
    }

    fn key(name: &str) -> ServiceKey {
        ServiceKey::new("public", "DEFAULT_GROUP", name)
    }

    fn set(n: usize) -> Vec<Instance> {
        (0..n).map(|i| Instance::new(format!("10.0.0.{i}"), 80)).collect()
    }

    async fn until(stats: &mut watch::Receiver<PublisherStats>, what: impl Fn(&PublisherStats) -> bool) {
        stats.wait_for(|s| what(s)).await.expect("publisher running");
    }

    #[tokio::test(start_paused = true)]
    async fn bursts_coalesce_to_the_latest_set() {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let fake = Fake { gate: Some(gate.clone()), ..Fake::default() };
        let token = CancellationToken::new();
        let p = Publisher::start(fake.clone(), PublisherConfig::default(), &token);
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
        assert_eq!(*lock(&fake.calls), vec![("orders".into(), 1), ("orders".into(), 4)]);
        assert_eq!(stats.borrow().coalesced, 2);
        assert_eq!(p.published(&key("orders")).map(|s| s.len()), Some(4));
        token.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_is_bounded() {
        let fake = Fake::default();
        let token = CancellationToken::new();
        let p = Publisher::start(fake.clone(), PublisherConfig { max_per_second: 10, ..PublisherConfig::default() }, &token);
        let mut stats = p.stats();
        let started = tokio::time::Instant::now();
        for n in 0..31 {
            p.submit(key(&format!("svc-{n}")), set(1));
        }
        until(&mut stats, |s| s.applied == 31).await;
        // 31 publishes at 10/s: the first at once, the last 3 s later (virtual time).
        let took = started.elapsed();
        assert!(took >= Duration::from_secs(3) && took < Duration::from_millis(3200), "{took:?}");
        token.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn retryable_failures_are_retried_and_fatal_ones_are_not() {
        let fake = Fake { fail_first: Arc::new(AtomicUsize::new(2)), ..Fake::default() };
        let token = CancellationToken::new();
        let p = Publisher::start(fake.clone(), PublisherConfig::default(), &token);
        let mut stats = p.stats();
        p.submit(key("orders"), set(2));
        until(&mut stats, |s| s.applied == 1).await;
        assert_eq!(stats.borrow().retried, 2);
        assert_eq!(lock(&fake.calls).len(), 3);

        let fatal = Fake { fail_first: Arc::new(AtomicUsize::new(1)), fatal: true, ..Fake::default() };
        let p = Publisher::start(fatal.clone(), PublisherConfig::default(), &token);
        let mut stats = p.stats();
        p.submit(key("bad"), set(1));
        until(&mut stats, |s| s.failed == 1).await;
        p.submit(key("good"), set(1));
        until(&mut stats, |s| s.applied == 1).await;
        assert_eq!(*lock(&fatal.calls), vec![("bad".into(), 1), ("good".into(), 1)]);
        assert!(p.published(&key("bad")).is_none());
        token.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_set_clears_what_was_published() {
        let fake = Fake::default();
        let token = CancellationToken::new();
        let p = Publisher::start(fake, PublisherConfig::default(), &token);
        let mut stats = p.stats();
        p.submit(key("orders"), set(3));
        until(&mut stats, |s| s.applied == 1).await;
        assert_eq!(p.published(&key("orders")).map(|s| s.len()), Some(3));
        p.submit(key("orders"), Vec::new());
        until(&mut stats, |s| s.applied == 2).await;
        assert!(p.published(&key("orders")).is_none());
        token.cancel();
    }
}
