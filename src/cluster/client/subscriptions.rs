//! Subscriptions: one [`Subscription`] stream per reader of a service, the
//! bookkeeping that counts readers (the last one gone unsubscribes, through
//! the supervisor), and the routing of pushes and subscribe replies to the
//! service's watch channel, newest snapshot wins.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::Stream;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tracing::{debug, warn};

use super::{Client, ClientError, Shared};
use crate::model::{ServiceKey, ServiceSnapshot};
use crate::runtime::lock;
use crate::wire::{self, convert};

/// One subscribed service in the redo table: the latest snapshot, and how
/// many [`Subscription`]s read it.
pub(super) struct Watched {
    tx: watch::Sender<Option<ServiceSnapshot>>,
    readers: usize,
}

impl Client {
    /// Subscribes to a service: the stream yields its full snapshot now and
    /// after every change, the latest one only if the reader falls behind.
    /// The subscription survives reconnects; dropping it unsubscribes.
    pub async fn subscribe(&self, group: &str, name: &str) -> Result<Subscription, ClientError> {
        let key = self.key(group, name);
        let rx = {
            let mut owned = self.owned();
            let entry = owned
                .subscriptions
                .entry(key.clone())
                .or_insert_with(|| Watched {
                    tx: watch::channel(None).0,
                    readers: 0,
                });
            entry.readers += 1;
            entry.tx.subscribe()
        };
        let subscription = Subscription {
            key: key.clone(),
            shared: self.shared.clone(),
            stream: WatchStream::new(rx),
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
            .and_then(|w| w.tx.borrow().clone())
    }
}

/// Hands a snapshot to the service's subscribers, unless it is older than
/// the one they have (a subscribe reply can race a push).
pub(super) fn offer(shared: &Shared, snapshot: ServiceSnapshot) {
    let owned = lock(&shared.owned);
    let Some(watched) = owned.subscriptions.get(&snapshot.service) else {
        debug!(service = %snapshot.service, "push for a service nobody watches");
        return;
    };
    watched.tx.send_if_modified(|current| match current {
        Some(c) if c.last_ref_time_ms > snapshot.last_ref_time_ms => false,
        _ => {
            *current = Some(snapshot);
            true
        }
    });
}

/// Full snapshots of one subscribed service. Yields the latest snapshot
/// whenever it changes; intermediate ones may be skipped (level-triggered).
pub struct Subscription {
    key: ServiceKey,
    shared: Arc<Shared>,
    stream: WatchStream<Option<ServiceSnapshot>>,
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
        loop {
            match Pin::new(&mut self.stream).poll_next(cx) {
                Poll::Ready(Some(Some(snapshot))) => return Poll::Ready(Some(snapshot)),
                // Nothing received yet for this service.
                Poll::Ready(Some(None)) => continue,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
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

/// Hands a service push from the session to the service's subscribers.
pub(super) fn route(shared: &Shared, push: wire::NotifySubscriberRequest) {
    let Some(info) = push.service_info.as_ref() else {
        return;
    };
    match convert::snapshot(&shared.config.namespace, info) {
        Ok(snapshot) => {
            debug!(service = %snapshot.service, instances = snapshot.instances.len(), "push received");
            offer(shared, snapshot);
        }
        Err(e) => warn!(error = %e, "unreadable push ignored"),
    }
}
