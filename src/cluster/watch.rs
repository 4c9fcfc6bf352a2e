//! The source watcher: every service of one cluster namespace that a filter
//! admits, as a stream of full snapshots bracketed by listings.
//!
//! Nacos 2.x pushes changes of subscribed services but says nothing when a
//! service is created, so the watcher lists the catalog (all groups) at an
//! interval and subscribes to what is new. A full listing, bracketed by
//! [`WatchEvent::Init`] and [`WatchEvent::InitDone`], happens at start and
//! after every reconnect: until `InitDone`, a consumer must not act on the
//! absence of a service (the view is partial).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{AbortHandle, Abortable, SelectAll};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::client::{Client, ConnectionState, Subscription};
use crate::model::{ServiceKey, ServiceSnapshot};
use crate::runtime::Backoff;

/// What the watcher reports, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent {
    /// A full listing begins: the snapshots up to `InitDone` are the whole view.
    Init,
    /// One service's current snapshot, part of the listing.
    InitSnapshot(ServiceSnapshot),
    /// The listing is complete: a service not announced since `Init` is gone.
    InitDone,
    /// A service changed, or appeared between listings.
    Snapshot(ServiceSnapshot),
    /// A service left the catalog or the filter.
    Removed(ServiceKey),
    /// The connection to the source is down: the last view may be stale.
    /// The next `Init` follows the reconnect.
    Lost,
}

/// Which services to follow.
pub type ServiceFilter = Arc<dyn Fn(&ServiceKey) -> bool + Send + Sync>;

/// Watcher timings.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// How often the catalog is polled for new and removed services.
    pub list_interval: Duration,
    /// How long a new subscription may take to yield its first snapshot
    /// before the listing goes on without it (it is reported when it comes).
    pub first_snapshot_timeout: Duration,
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self { list_interval: Duration::from_secs(30), first_snapshot_timeout: Duration::from_secs(5) }
    }
}

/// Starts watching `client`'s namespace. Events arrive on the returned
/// channel until `shutdown` is cancelled or the receiver is dropped.
pub fn watch(
    client: Client,
    filter: ServiceFilter,
    config: WatchConfig,
    shutdown: &CancellationToken,
) -> mpsc::Receiver<WatchEvent> {
    let (tx, rx) = mpsc::channel(1024);
    let token = shutdown.child_token();
    let span = tracing::info_span!("watch", cluster = %client.cluster(), namespace = %client.namespace());
    tokio::spawn(tracing::Instrument::instrument(
        Watcher { client, filter, config, tx, subs: SelectAll::new(), followed: HashMap::new(), last: HashMap::new() }.run(token),
        span,
    ));
    rx
}

struct Watcher {
    client: Client,
    filter: ServiceFilter,
    config: WatchConfig,
    tx: mpsc::Sender<WatchEvent>,
    /// Every followed subscription, polled together. (A `StreamMap` scans
    /// all its keys on insert and lookup: quadratic over a large catalog.)
    subs: SelectAll<Abortable<Subscription>>,
    /// Followed services; aborting a handle drops its subscription, which
    /// unsubscribes.
    followed: HashMap<ServiceKey, AbortHandle>,
    last: HashMap<ServiceKey, ServiceSnapshot>,
}

/// The receiver is gone: nothing left to do.
struct Closed;

impl Watcher {
    async fn run(mut self, token: CancellationToken) {
        let mut state = self.client.state();
        let mut connection: Option<String> = None;
        let mut interval = tokio::time::interval(self.config.list_interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval.reset();
        loop {
            // A new connection (first start or reconnect): the view may have
            // changed arbitrarily, so list in full.
            let (current, down) = match &*state.borrow_and_update() {
                ConnectionState::Connected { connection_id, .. } => (Some(connection_id.clone()), false),
                ConnectionState::Disconnected { .. } => (None, true),
                _ => (None, false),
            };
            if current.is_some() && current != connection {
                connection = current;
                if self.relist(true, &token).await.is_err() {
                    return;
                }
            } else if down && connection.is_some() {
                // Report the loss once per connection; a reconnect relists.
                connection = None;
                if self.send(WatchEvent::Lost).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                // Shut down, or nobody listens any more.
                () = token.cancelled() => return,
                () = self.tx.closed() => return,
                changed = state.changed() => if changed.is_err() { return },
                _ = interval.tick() => {
                    if connection.is_some() && self.relist(false, &token).await.is_err() {
                        return;
                    }
                }
                Some(snapshot) = self.subs.next() => {
                    if self.emit_change(snapshot).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    async fn send(&self, event: WatchEvent) -> Result<(), Closed> {
        self.tx.send(event).await.map_err(|_| Closed)
    }

    async fn emit_change(&mut self, snapshot: ServiceSnapshot) -> Result<(), Closed> {
        self.last.insert(snapshot.service.clone(), snapshot.clone());
        self.send(WatchEvent::Snapshot(snapshot)).await
    }

    /// Lists the catalog (retrying with backoff until it answers), follows
    /// new services, drops removed ones. `full` brackets the result with
    /// Init/InitDone and re-announces every service.
    async fn relist(&mut self, full: bool, token: &CancellationToken) -> Result<(), Closed> {
        let listed = match self.list(token).await {
            Some(l) => l,
            None => return Err(Closed),
        };
        if full {
            self.send(WatchEvent::Init).await?;
        }
        let followed: BTreeSet<ServiceKey> = self.followed.keys().cloned().collect();
        for gone in followed.difference(&listed) {
            if let Some(handle) = self.followed.remove(gone) {
                handle.abort();
            }
            self.last.remove(gone);
            self.send(WatchEvent::Removed(gone.clone())).await?;
        }
        for key in &listed {
            if !self.followed.contains_key(key) {
                match self.client.subscribe(&key.group, &key.name).await {
                    Ok(mut sub) => {
                        let first = tokio::time::timeout(self.config.first_snapshot_timeout, sub.next()).await;
                        let (handle, registration) = AbortHandle::new_pair();
                        self.subs.push(Abortable::new(sub, registration));
                        self.followed.insert(key.clone(), handle);
                        match first {
                            Ok(Some(snapshot)) => {
                                self.last.insert(key.clone(), snapshot.clone());
                                if !full {
                                    self.send(WatchEvent::Snapshot(snapshot)).await?;
                                }
                            }
                            _ => debug!(service = %key, "no first snapshot yet; it will follow as a change"),
                        }
                    }
                    Err(e) => warn!(service = %key, error = %e, "subscribe failed; retried at the next listing"),
                }
            }
            if full
                && let Some(snapshot) = self.last.get(key) {
                    self.send(WatchEvent::InitSnapshot(snapshot.clone())).await?;
                }
        }
        if full {
            self.send(WatchEvent::InitDone).await?;
        }
        Ok(())
    }

    /// The filtered catalog; `None` on shutdown.
    async fn list(&self, token: &CancellationToken) -> Option<BTreeSet<ServiceKey>> {
        let mut backoff = Backoff::try_new(Duration::from_millis(200), self.config.list_interval.max(Duration::from_secs(1)), 0.5)
            .ok()?;
        loop {
            match self.client.catalog().await {
                Ok(entries) => {
                    let namespace = self.client.namespace();
                    return Some(
                        entries
                            .into_iter()
                            .map(|(group, name)| ServiceKey::new(namespace, group, name))
                            .filter(|k| (self.filter)(k))
                            .collect(),
                    );
                }
                Err(e) => warn!(error = %e, "listing failed; retrying"),
            }
            tokio::select! {
                () = tokio::time::sleep(backoff.next_delay()) => {}
                () = token.cancelled() => return None,
            }
        }
    }
}
