//! Subscriptions: one [`Subscription`] stream per reader of a service, the
//! bookkeeping that counts readers (the last one gone unsubscribes, through
//! the supervisor), and the routing of pushes and subscribe replies to the
//! service's entry, newest snapshot wins.
//!
//! A reader is woken through the entry itself (its latest snapshot, a change
//! count and the wakers of readers waiting), not a `tokio::sync::watch`
//! channel and a `WatchStream`: those cost ~1 KB per service (the channel's
//! notifiers, the stream's boxed future), a tenth of the agent's memory at
//! 10,000 services.

use std::collections::hash_map::Entry;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use futures_util::Stream;
use tracing::{debug, warn};

use super::{Client, ClientError, Shared};
use crate::model::{ServiceKey, ServiceSnapshot};
use crate::proto::Payload;
use crate::runtime::lock;
use crate::wire::push::decode_push;
use crate::wire::{WireError, convert};

/// One subscribed service in the redo table: the latest snapshot, and how
/// many [`Subscription`]s read it.
#[derive(Default)]
pub(super) struct Watched {
    latest: Option<ServiceSnapshot>,
    /// How many snapshots were taken (0: none yet); a reader yields when
    /// this moved past what it last saw.
    changes: u64,
    readers: usize,
    /// Readers waiting for the next change, each once.
    pub(super) waiting: Vec<Waker>,
}

impl Watched {
    /// Takes `snapshot` unless it is older than the one held (a subscribe
    /// reply can race a push); returns the readers to wake.
    fn offer(&mut self, snapshot: ServiceSnapshot) -> Vec<Waker> {
        if self
            .latest
            .as_ref()
            .is_some_and(|c| c.last_ref_time_ms > snapshot.last_ref_time_ms)
        {
            return Vec::new();
        }
        self.latest = Some(snapshot);
        self.changes += 1;
        std::mem::take(&mut self.waiting)
    }

    /// Remembers `waker` until the next change, once per reader task.
    fn wait(&mut self, waker: &Waker) {
        if !self.waiting.iter().any(|w| w.will_wake(waker)) {
            // Nearly always one reader: room for exactly one.
            self.waiting.reserve_exact(1);
            self.waiting.push(waker.clone());
        }
    }
}

impl Client {
    /// Subscribes to a service: the stream yields its full snapshot now and
    /// after every change, the latest one only if the reader falls behind.
    /// The subscription survives reconnects; dropping it unsubscribes.
    pub async fn subscribe(&self, group: &str, name: &str) -> Result<Subscription, ClientError> {
        self.subscribe_key(self.key(group, name)).await
    }

    /// As [`Client::subscribe`], for a key of this client's namespace that
    /// the caller already holds: the client keeps that key (its strings
    /// shared with the caller's), not one of its own.
    pub(crate) async fn subscribe_key(&self, key: ServiceKey) -> Result<Subscription, ClientError> {
        debug_assert_eq!(&*key.namespace, self.namespace());
        self.owned()
            .subscriptions
            .entry(key.clone())
            .or_default()
            .readers += 1;
        let subscription = Subscription {
            key: key.clone(),
            shared: self.shared.clone(),
            seen: 0,
        };
        // Failing to reach the server is not fatal: the redo subscribes once
        // connected. A rejection (auth, bad name) is, and drops the entry.
        let _apply = match self.ready_to_apply().await {
            Ok(guard) => guard,
            Err(ClientError::NotConnected { .. }) => return Ok(subscription),
            Err(e) => return Err(e),
        };
        match self
            .call_now("subscribe", &convert::subscribe_request(&key, true))
            .await
        {
            Ok(reply) => {
                if let Some(info) = reply.service_info.as_ref() {
                    let snapshot = self.snapshot_of(Some(info), &key)?;
                    offer(&self.shared, snapshot);
                }
                Ok(subscription)
            }
            Err(e) if e.is_retryable() => Ok(subscription),
            Err(e) => Err(e),
        }
    }

    /// The latest snapshot of a subscribed service, as last pushed (or
    /// answered to the subscribe); `None` if not subscribed or nothing came yet.
    pub fn latest(&self, service: &ServiceKey) -> Option<ServiceSnapshot> {
        self.owned()
            .subscriptions
            .get(service)
            .and_then(|w| w.latest.clone())
    }
}

/// Hands a snapshot to the service's subscribers, unless it is older than
/// the one they have (a subscribe reply can race a push).
pub(super) fn offer(shared: &Shared, mut snapshot: ServiceSnapshot) {
    let waiting = {
        let mut owned = lock(&shared.owned);
        // One lookup; a vacant entry inserts nothing.
        let Entry::Occupied(mut watched) = owned.subscriptions.entry(snapshot.service.clone())
        else {
            debug!(service = %snapshot.service, "push for a service nobody watches");
            return;
        };
        // The snapshot carries the subscription's key, so the strings it
        // was decoded with are freed now, not kept for as long as it is.
        snapshot.service = watched.key().clone();
        watched.get_mut().offer(snapshot)
    };
    // Woken outside the lock: a reader on another thread takes it at once.
    waiting.into_iter().for_each(Waker::wake);
}

/// Full snapshots of one subscribed service. Yields the latest snapshot
/// whenever it changes; intermediate ones may be skipped (level-triggered).
pub struct Subscription {
    key: ServiceKey,
    shared: Arc<Shared>,
    /// The entry's change count when this reader last yielded.
    seen: u64,
}

impl Subscription {
    /// The service this subscription follows.
    pub fn service(&self) -> &ServiceKey {
        &self.key
    }
}

impl Stream for Subscription {
    type Item = ServiceSnapshot;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let mut owned = lock(&this.shared.owned);
        // The entry lives while a reader does; gone, the stream has ended.
        let Some(watched) = owned.subscriptions.get_mut(&this.key) else {
            return Poll::Ready(None);
        };
        match &watched.latest {
            Some(snapshot) if watched.changes != this.seen => {
                this.seen = watched.changes;
                Poll::Ready(Some(snapshot.clone()))
            }
            // Nothing new (or nothing received yet for this service).
            _ => {
                watched.wait(cx.waker());
                Poll::Pending
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut owned = lock(&self.shared.owned);
        let last = match owned.subscriptions.get_mut(&self.key) {
            Some(w) => {
                w.readers = w.readers.saturating_sub(1);
                w.readers == 0
            }
            None => false,
        };
        if last {
            owned.subscriptions.remove(&self.key);
            // The supervisor tells the server; if it is gone, so is the subscription.
            let _ = self.shared.unsubscribe.send(self.key.clone());
        }
    }
}

/// Reads a service push that the session received and hands it to the
/// service's subscribers; returns the request id its ack echoes (see
/// [`crate::transport::PushSink`]).
pub(super) fn route(shared: &Shared, payload: &Payload) -> Result<Option<String>, WireError> {
    let push = decode_push(payload, &shared.config.namespace)?;
    match push.snapshot {
        Some(Ok(snapshot)) => {
            debug!(service = %snapshot.service, instances = snapshot.instances.len(), "push received");
            offer(shared, snapshot);
        }
        Some(Err(e)) => warn!(error = %e, "unreadable push ignored"),
        None => {}
    }
    Ok(push.request_id)
}
