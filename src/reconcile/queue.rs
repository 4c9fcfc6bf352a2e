//! The publish queue's rules, in one place and without I/O: the latest set
//! per service wins, order is first come first served, one set per service
//! is in flight at a time (so sets of a service land in order), a failed set
//! goes back unless something newer came, and lag is measured from the
//! oldest change a set carries. It also keeps the replica totals behind
//! `/status`: wanted (the newest set given per service) and acknowledged
//! (the last set the destination took per service).
//!
//! The publisher holds one [`PublishQueue`] behind one lock and drives it:
//! [`PublishQueue::start_next`] when it may send, [`PublishQueue::landed`]
//! when an answer comes, [`PublishQueue::retry`] after a retryable failure.

use std::collections::{HashMap, VecDeque};

use tokio::time::Instant;

use crate::model::{InstanceSet, ServiceKey};

/// A set waiting to be sent, and since when the change it carries is known
/// (the oldest unsent change: lag is measured from there).
#[derive(Debug, Clone)]
pub struct Queued {
    /// The full set to publish.
    pub set: InstanceSet,
    /// Receipt of the oldest change folded into it, if known.
    pub since: Option<Instant>,
}

/// Sets waiting, sets in flight, and the order they go in.
#[derive(Debug, Default)]
pub struct PublishQueue {
    order: VecDeque<ServiceKey>,
    sets: HashMap<ServiceKey, Queued>,
    /// Sent and not yet answered: never two for one service.
    in_flight: HashMap<ServiceKey, InstanceSet>,
    /// Keys reached while their service was in flight: back to the front
    /// when it lands.
    deferred: Vec<ServiceKey>,
    /// When each service's last set was answered (kept for a while only:
    /// see [`PublishQueue::forget_landed_before`]).
    landed: HashMap<ServiceKey, Instant>,
    /// Per service with a non-zero count: replicas wanted and acknowledged.
    counts: HashMap<ServiceKey, Counts>,
    /// Sums of `counts`.
    totals: Counts,
}

/// Replicas of a service (or of all): in the newest set given, and in the
/// last set the destination acknowledged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// In the newest set given.
    pub wanted: usize,
    /// In the last set acknowledged.
    pub acknowledged: usize,
}

impl PublishQueue {
    /// Queues `set` for `service`. A set still queued for the service is
    /// replaced (its place in line and its older `since` kept); returns
    /// whether that happened (coalesced).
    pub fn submit(
        &mut self,
        service: ServiceKey,
        set: InstanceSet,
        since: Option<Instant>,
    ) -> bool {
        let wanted = set.len();
        self.count(&service, |c| c.wanted = wanted);
        match self.sets.get_mut(&service) {
            Some(queued) => {
                queued.set = set;
                queued.since = match (queued.since, since) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                true
            }
            None => {
                self.sets.insert(service.clone(), Queued { set, since });
                self.order.push_back(service);
                false
            }
        }
    }

    /// The destination took a set of `replicas` for the service.
    pub fn acknowledged(&mut self, service: &ServiceKey, replicas: usize) {
        self.count(service, |c| c.acknowledged = replicas);
    }

    /// Replicas wanted and acknowledged, over every service.
    pub fn totals(&self) -> Counts {
        self.totals
    }

    /// Changes one service's counts, keeping the totals in step and no
    /// entry for a service with nothing wanted or acknowledged.
    fn count(&mut self, service: &ServiceKey, change: impl FnOnce(&mut Counts)) {
        let mut c = self.counts.get(service).copied().unwrap_or_default();
        let before = c;
        change(&mut c);
        self.totals.wanted = (self.totals.wanted + c.wanted).saturating_sub(before.wanted);
        self.totals.acknowledged =
            (self.totals.acknowledged + c.acknowledged).saturating_sub(before.acknowledged);
        if c == Counts::default() {
            self.counts.remove(service);
        } else {
            self.counts.insert(service.clone(), c);
        }
    }

    /// The newest set the queue holds for the service: queued, else in flight.
    pub fn intended(&self, service: &ServiceKey) -> Option<&InstanceSet> {
        self.sets
            .get(service)
            .map(|q| &q.set)
            .or_else(|| self.in_flight.get(service))
    }

    /// Whether a set for the service is queued (a newer one than any shown).
    pub fn is_queued(&self, service: &ServiceKey) -> bool {
        self.sets.contains_key(service)
    }

    /// Neither queued nor in flight: what the destination took is the last word.
    pub fn is_idle(&self, service: &ServiceKey) -> bool {
        !self.sets.contains_key(service) && !self.in_flight.contains_key(service)
    }

    /// Sets waiting to be sent.
    pub fn pending(&self) -> usize {
        self.order.len()
    }

    /// Sets sent and not answered yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Nothing waiting and nothing in flight.
    pub fn settled(&self) -> bool {
        self.order.is_empty() && self.in_flight.is_empty()
    }

    /// Takes the next set whose service has nothing in flight, and marks it
    /// in flight. Services passed over wait for their answer.
    pub fn start_next(&mut self) -> Option<(ServiceKey, Queued)> {
        while let Some(key) = self.order.pop_front() {
            if self.in_flight.contains_key(&key) {
                self.deferred.push(key);
                continue;
            }
            if let Some(queued) = self.sets.remove(&key) {
                self.in_flight.insert(key.clone(), queued.set.clone());
                return Some((key, queued));
            }
        }
        None
    }

    /// The answer for `service` came: it may be sent again, and if a newer
    /// set was passed over meanwhile it goes first.
    pub fn landed(&mut self, service: &ServiceKey) {
        self.landed.insert(service.clone(), Instant::now());
        self.in_flight.remove(service);
        if let Some(i) = self.deferred.iter().position(|k| k == service) {
            self.deferred.swap_remove(i);
            self.order.push_front(service.clone());
        }
    }

    /// Whether the service's last answer came at or after `since`: what the
    /// destination shows of it may still be catching up.
    pub fn landed_since(&self, service: &ServiceKey, since: Instant) -> bool {
        self.landed.get(service).is_some_and(|at| *at >= since)
    }

    /// Whether an answer for the service is remembered at all.
    pub fn has_landed(&self, service: &ServiceKey) -> bool {
        self.landed.contains_key(service)
    }

    /// Forgets answers older than `before` (nothing asks about them).
    pub fn forget_landed_before(&mut self, before: Instant) {
        self.landed.retain(|_, at| *at >= before);
    }

    /// A retryable failure: the set goes back in line, unless a newer one
    /// was queued meanwhile (which then is what gets sent). Call after
    /// [`PublishQueue::landed`].
    pub fn retry(&mut self, service: ServiceKey, queued: Queued) {
        if !self.sets.contains_key(&service) {
            self.sets.insert(service.clone(), queued);
            self.order.push_back(service);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::Instance;

    fn key(name: &str) -> ServiceKey {
        ServiceKey::new("public", "DEFAULT_GROUP", name)
    }

    fn set(n: usize) -> InstanceSet {
        (0..n)
            .map(|i| Instance::new(format!("10.0.0.{i}"), 80))
            .collect::<Vec<_>>()
            .into()
    }

    #[test]
    fn the_latest_set_wins_and_the_oldest_change_is_kept() {
        let mut q = PublishQueue::default();
        let early = Instant::now();
        let later = early + Duration::from_secs(1);
        assert!(!q.submit(key("a"), set(1), Some(later)));
        assert!(q.submit(key("a"), set(2), Some(early)));
        assert!(q.submit(key("a"), set(3), None));
        assert_eq!(q.pending(), 1);
        let (k, queued) = q.start_next().expect("one set");
        assert_eq!(
            (k, queued.set.len(), queued.since),
            (key("a"), 3, Some(early))
        );
    }

    #[test]
    fn first_come_first_served() {
        let mut q = PublishQueue::default();
        for name in ["a", "b", "c"] {
            q.submit(key(name), set(1), None);
        }
        // A newer set keeps its service's place in line.
        q.submit(key("a"), set(2), None);
        let order: Vec<String> =
            std::iter::from_fn(|| q.start_next().map(|(k, _)| k.name.to_string())).collect();
        assert_eq!(order, ["a", "b", "c"]);
    }

    #[test]
    fn never_two_sets_of_one_service_in_flight() {
        let mut q = PublishQueue::default();
        q.submit(key("a"), set(1), None);
        let _first = q.start_next().expect("first");
        q.submit(key("a"), set(2), None);
        q.submit(key("b"), set(1), None);
        // `a` is in flight: `b` goes, `a` waits.
        assert_eq!(q.start_next().map(|(k, _)| k.name), Some("b".into()));
        assert!(q.start_next().is_none());
        assert_eq!(q.intended(&key("a")).map(|s| s.len()), Some(2));
        q.landed(&key("b"));
        q.landed(&key("a"));
        // Its newer set goes first once the answer is in.
        assert_eq!(
            q.start_next().map(|(k, s)| (k.name, s.set.len())),
            Some(("a".into(), 2))
        );
    }

    #[test]
    fn a_failed_set_returns_unless_something_newer_came() {
        let mut q = PublishQueue::default();
        q.submit(key("a"), set(1), None);
        let (k, sent) = q.start_next().expect("sent");
        q.landed(&k);
        q.retry(k.clone(), sent.clone());
        assert_eq!(q.pending(), 1, "the failed set is back");

        let (k, sent) = q.start_next().expect("sent again");
        q.submit(key("a"), set(5), None);
        q.landed(&k);
        q.retry(k, sent);
        let (_, next) = q.start_next().expect("one set");
        assert_eq!(next.set.len(), 5, "the retry overwrote a newer set");
        assert!(q.start_next().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn answers_are_remembered_for_a_while() {
        let mut q = PublishQueue::default();
        let before = Instant::now();
        q.submit(key("a"), set(1), None);
        let (k, _) = q.start_next().expect("sent");
        tokio::time::advance(Duration::from_secs(1)).await;
        q.landed(&k);
        assert!(q.landed_since(&k, before));
        assert!(!q.landed_since(&k, Instant::now() + Duration::from_millis(1)));
        q.forget_landed_before(Instant::now() + Duration::from_millis(1));
        assert!(!q.landed_since(&k, before), "forgotten");
    }

    #[test]
    fn totals_follow_the_newest_set_and_the_last_ack() {
        let mut q = PublishQueue::default();
        q.submit(key("a"), set(3), None);
        q.submit(key("b"), set(2), None);
        q.submit(key("a"), set(4), None);
        assert_eq!(
            q.totals(),
            Counts {
                wanted: 6,
                acknowledged: 0
            }
        );
        let (a, sent) = q.start_next().expect("a");
        q.acknowledged(&a, sent.set.len());
        q.landed(&a);
        assert_eq!(
            q.totals(),
            Counts {
                wanted: 6,
                acknowledged: 4
            }
        );
        // Withdrawn: wanted at once, acknowledged once taken.
        q.submit(key("a"), set(0), None);
        assert_eq!(
            q.totals(),
            Counts {
                wanted: 2,
                acknowledged: 4
            }
        );
        q.acknowledged(&a, 0);
        assert_eq!(
            q.totals(),
            Counts {
                wanted: 2,
                acknowledged: 0
            }
        );
        assert!(!q.counts.contains_key(&a), "an empty service is forgotten");
    }

    #[test]
    fn settled_only_with_nothing_waiting_or_in_flight() {
        let mut q = PublishQueue::default();
        assert!(q.settled());
        q.submit(key("a"), set(1), None);
        assert!(!q.settled());
        let (k, _) = q.start_next().expect("sent");
        assert!(!q.settled(), "settled while a set is in flight");
        assert!(!q.is_idle(&k));
        q.landed(&k);
        assert!(q.settled() && q.is_idle(&k));
    }
}
