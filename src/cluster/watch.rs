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

use futures_util::StreamExt;
use futures_util::stream::{AbortHandle, Abortable, SelectAll};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::runtime::{Tasks, ticker_after};
use tracing::{debug, warn};

use super::client::{CatalogProbe, Client, ClientError, ConnectionState, Subscription};
use crate::model::{Interner, ServiceKey, ServiceSnapshot};
use crate::runtime::Backoff;

/// What the watcher reports, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent {
    /// A full listing begins: the snapshots up to `InitDone` are the whole view.
    Init,
    /// One service's current snapshot, part of the listing.
    InitSnapshot(ServiceSnapshot),
    /// A listed service whose content could not be read this time (no
    /// first push in time and the query failed): it exists, so a consumer
    /// keeps what it knew of it; the content follows as a `Snapshot`.
    InitUnknown(ServiceKey),
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
    /// How often the catalog is listed in full for new and removed services.
    pub list_interval: Duration,
    /// How often the catalog is probed between listings (one entry of the
    /// first page: the count and a name; see [`Client::catalog_probe`]), a
    /// listing following when the probe changed. This is how a service
    /// created on 2.x is seen within about this time rather than
    /// `list_interval`. `None`: listings only. Unused while a 3.x fuzzy
    /// watch reports changes.
    pub probe_interval: Option<Duration>,
    /// How long a new subscription may take to yield its first snapshot
    /// before the listing goes on with a query instead.
    pub first_snapshot_timeout: Duration,
    /// Anti-entropy: how often a full listing is made with a fresh query of
    /// every service (not trusting the pushes received). `None`: never.
    pub resync_interval: Option<Duration>,
    /// Subscribes and queries a listing has in flight at once (at least 1).
    /// One at a time, a first sync costs a round trip per service: 10,000
    /// services 50 ms away is over eight minutes; 32 (the default) keep such
    /// a link busy without queueing thousands at a server that is slow for
    /// its own reasons.
    pub reads_in_flight: usize,
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self {
            list_interval: Duration::from_secs(30),
            probe_interval: Some(Duration::from_secs(1)),
            first_snapshot_timeout: Duration::from_secs(5),
            resync_interval: None,
            reads_in_flight: 32,
        }
    }
}

/// How a listing is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listing {
    /// New and removed services only.
    Changes,
    /// Init .. InitDone around every service, from the pushes received.
    Full,
    /// As `Full`, each service queried afresh.
    Resync,
}

/// Starts watching `client`'s namespace, in a task on `tasks`. Events
/// arrive on the returned channel until `tasks` is cancelled or the
/// receiver is dropped.
pub fn watch(
    client: Client,
    filter: ServiceFilter,
    config: WatchConfig,
    tasks: &Tasks,
) -> mpsc::Receiver<WatchEvent> {
    let (tx, rx) = mpsc::channel(128);
    let token = tasks.token().clone();
    let name = format!("watch {}/{}", client.cluster(), client.namespace());
    let span =
        tracing::info_span!("watch", cluster = %client.cluster(), namespace = %client.namespace());
    tasks.spawn(
        name,
        tracing::Instrument::instrument(
            Watcher {
                client,
                filter,
                config,
                tx,
                subs: SelectAll::new(),
                followed: HashMap::new(),
                queried: HashMap::new(),
                probe: None,
            }
            .run(token),
            span,
        ),
    );
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
    /// Services read by a query on this connection, with the snapshot's
    /// `lastRefTime`: a push still queued from before the query is older
    /// and must not overwrite it. Same server, same clock; cleared on a
    /// new connection (another server's clock may differ).
    queried: HashMap<ServiceKey, i64>,
    /// The catalog probe taken just before the last listing: a later probe
    /// that differs means the catalog changed since. `None` when that probe
    /// failed (the next one that answers then lists).
    probe: Option<CatalogProbe>,
}

/// The receiver is gone: nothing left to do.
struct Closed;

impl Watcher {
    async fn run(mut self, token: CancellationToken) {
        let mut state = self.client.state();
        let mut connection: Option<String> = None;
        let mut interval = ticker_after(self.config.list_interval);
        let mut resync = self.config.resync_interval.map(ticker_after);
        let mut probes = self.config.probe_interval.map(ticker_after);
        // The periodic catalog fetch runs next to the push forwarding: a
        // large catalog takes a while to page through, and pushes must not
        // wait behind it (they did: 120 ms stalls at 10,000 services).
        let mut fetching: Option<Fetching> = None;
        // Moves when a 3.x server's fuzzy watch reports a service created or
        // removed: list at once rather than at the next tick.
        let mut catalog_changes = self.client.catalog_changes();
        // Someone asked for a fresh full listing (a DR drill's restore).
        let mut relists = self.client.relist_requests();
        loop {
            // A new connection (first start or reconnect): the view may have
            // changed arbitrarily, so list in full.
            let (current, down) = match &*state.borrow_and_update() {
                ConnectionState::Connected { connection_id, .. } => {
                    (Some(connection_id.clone()), false)
                }
                ConnectionState::Disconnected { .. } => (None, true),
                _ => (None, false),
            };
            if current.is_some() && current != connection {
                connection = current;
                fetching = None;
                if self.relist(Listing::Full, &token).await.is_err() {
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
                    if connection.is_some() && fetching.is_none() {
                        fetching = Some(self.start_fetch(Fetch::Always, &token));
                    }
                }
                () = tick_if_some(&mut probes), if probes.is_some() => {
                    if connection.is_some() && fetching.is_none() {
                        fetching = Some(self.start_fetch(Fetch::IfProbeDiffers(self.probe.clone()), &token));
                    }
                }
                Ok(()) = catalog_changes.changed() => {
                    if connection.is_some() && fetching.is_none() {
                        fetching = Some(self.start_fetch(Fetch::Always, &token));
                    }
                }
                fetched = poll_listing(&mut fetching), if fetching.is_some() => {
                    fetching = None;
                    match fetched {
                        Err(Closed) => return,
                        // Down meanwhile: the loop reports it; the reconnect
                        // lists in full. Or the probe saw no change.
                        Ok(Fetched::Down | Fetched::Unchanged) => {}
                        Ok(Fetched::Listed(listed, probe)) => {
                            self.probe = probe;
                            if self.follow_listed(&listed, Listing::Changes).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                Ok(()) = relists.changed() => {
                    if connection.is_some() && self.relist(Listing::Resync, &token).await.is_err() {
                        return;
                    }
                }
                () = tick_if_some(&mut resync), if resync.is_some() => {
                    if connection.is_some() && self.relist(Listing::Resync, &token).await.is_err() {
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

    /// A catalog fetch, run beside the push forwarding (on each tick, and
    /// at once when a fuzzy watch reports the catalog changed), or on a
    /// probe tick only when the probe moved (see [`Fetch`]).
    fn start_fetch(&self, when: Fetch, token: &CancellationToken) -> Fetching {
        let (client, filter) = (self.client.clone(), self.filter.clone());
        let (every, token) = (self.config.list_interval, token.clone());
        Box::pin(async move {
            let probe = probe(&client, &token).await?;
            if let Fetch::IfProbeDiffers(last) = when
                && (probe.is_none() || probe == last)
            {
                // Unchanged, or unknown (the probe failed, or a fuzzy watch
                // covers the namespace): the next probe or listing tells.
                return Ok(Fetched::Unchanged);
            }
            Ok(match list(&client, &filter, every, &token).await? {
                Some(listed) => Fetched::Listed(listed, probe),
                None => Fetched::Down,
            })
        })
    }

    async fn send(&self, event: WatchEvent) -> Result<(), Closed> {
        self.tx.send(event).await.map_err(|_| Closed)
    }

    async fn emit_change(&mut self, snapshot: ServiceSnapshot) -> Result<(), Closed> {
        if let Some(at) = self.queried.remove(&snapshot.service)
            && snapshot.last_ref_time_ms < at
        {
            debug!(service = %snapshot.service, "push older than the last query; ignored");
            self.queried.insert(snapshot.service.clone(), at);
            return Ok(());
        }
        self.send(WatchEvent::Snapshot(snapshot)).await
    }

    /// Lists the catalog (retrying with backoff until it answers), follows
    /// new services, drops removed ones. A full listing brackets the result
    /// with Init/InitDone and re-announces every service.
    async fn relist(&mut self, how: Listing, token: &CancellationToken) -> Result<(), Closed> {
        let full = how != Listing::Changes;
        if how == Listing::Full {
            self.queried.clear();
        }
        // Before the listing: what is created after it shows in a later probe.
        self.probe = probe(&self.client, token).await?;
        let Some(listed) =
            list(&self.client, &self.filter, self.config.list_interval, token).await?
        else {
            // The connection went down before the catalog answered: nothing
            // new is known. The loop reports the loss, and the reconnect
            // lists in full.
            return Ok(());
        };
        if full {
            self.send(WatchEvent::Init).await?;
        }
        self.follow_listed(&listed, how).await?;
        if full {
            self.send(WatchEvent::InitDone).await?;
        }
        Ok(())
    }

    /// Follows what `listed` adds, drops what it lost; in a full listing
    /// also announces every service.
    ///
    /// The reads a listing makes (a subscribe for each new service, a query
    /// where no push is at hand) run `reads_in_flight` at a time (see
    /// [`WatchConfig`]); their results are applied in listing order.
    async fn follow_listed(
        &mut self,
        listed: &BTreeSet<ServiceKey>,
        how: Listing,
    ) -> Result<(), Closed> {
        let full = how != Listing::Changes;
        // One hash lookup per listed service tells what is new and how many
        // followed ones are still listed; only when some are not is the
        // followed set searched for them. The loop yields now and then: at
        // 100,000 services a listing's bookkeeping held the runtime thread,
        // and every push behind it, for ~90 ms when it compared keys in
        // sorted sets.
        let mut wanted = Vec::new();
        let mut still_listed = 0;
        for (i, key) in listed.iter().enumerate() {
            let new = !self.followed.contains_key(key);
            still_listed += usize::from(!new);
            if full || new {
                wanted.push((key.clone(), new));
            }
            if i % YIELD_EVERY == YIELD_EVERY - 1 {
                tokio::task::yield_now().await;
            }
        }
        if still_listed < self.followed.len() {
            let mut gone: Vec<ServiceKey> = self
                .followed
                .keys()
                .filter(|k| !listed.contains(*k))
                .cloned()
                .collect();
            gone.sort();
            for gone in gone {
                if let Some(handle) = self.followed.remove(&gone) {
                    handle.abort();
                }
                self.send(WatchEvent::Removed(gone)).await?;
            }
        }
        let (client, first_timeout) = (self.client.clone(), self.config.first_snapshot_timeout);
        let mut reads = futures_util::stream::iter(wanted)
            .map(|(key, new)| read(client.clone(), key, new, how, first_timeout))
            .buffered(self.config.reads_in_flight.max(1));
        while let Some(read) = reads.next().await {
            let key = read.key;
            match read.subscribed {
                Some(Ok((sub, first))) => {
                    let (handle, registration) = AbortHandle::new_pair();
                    self.subs.push(Abortable::new(sub, registration));
                    self.followed.insert(key.clone(), handle);
                    match first {
                        Some(snapshot) if !full => {
                            self.send(WatchEvent::Snapshot(snapshot)).await?;
                        }
                        Some(_) => {}
                        None => {
                            debug!(service = %key, "no first snapshot yet; it will follow as a change")
                        }
                    }
                }
                Some(Err(e)) => {
                    warn!(service = %key, error = %e, "subscribe failed; retried at the next listing")
                }
                None => {}
            }
            if full {
                if let Some(at) = read.queried {
                    self.queried.insert(key.clone(), at);
                }
                match read.current {
                    Some(snapshot) => self.send(WatchEvent::InitSnapshot(snapshot)).await?,
                    None => self.send(WatchEvent::InitUnknown(key)).await?,
                }
            }
        }
        Ok(())
    }
}

/// A listing's bookkeeping gives the runtime back after this many services.
const YIELD_EVERY: usize = 4096;

/// What a listing learned of one service.
struct Read {
    key: ServiceKey,
    /// For a service not yet followed: the new subscription and the first
    /// snapshot it yielded (if one came in time), or why it failed.
    subscribed: Option<Result<(Subscription, Option<ServiceSnapshot>), ClientError>>,
    /// In a full listing, its content: the latest push, or a fresh query
    /// (on a resync, or with no push yet); `None` if neither could be had.
    current: Option<ServiceSnapshot>,
    /// The `lastRefTime` of the query that gave `current`, if it was one.
    queried: Option<i64>,
}

/// The reads of one service in a listing: subscribing if `new`, then, in a
/// full listing, its content.
async fn read(
    client: Client,
    key: ServiceKey,
    new: bool,
    how: Listing,
    first_timeout: Duration,
) -> Read {
    let subscribed = if new {
        Some(match client.subscribe_key(key.clone()).await {
            Ok(mut sub) => {
                let first = tokio::time::timeout(first_timeout, sub.next())
                    .await
                    .ok()
                    .flatten();
                Ok((sub, first))
            }
            Err(e) => Err(e),
        })
    } else {
        None
    };
    let (mut current, mut queried) = (None, None);
    if how != Listing::Changes {
        // The latest push (the client keeps it; no second copy here), or,
        // on a resync or with no push yet, a fresh query.
        if how == Listing::Full {
            current = client.latest(&key);
        }
        if current.is_none() {
            match client.query(&key.group, &key.name).await {
                Ok(fresh) => {
                    queried = Some(fresh.last_ref_time_ms);
                    current = Some(fresh);
                }
                Err(e) => {
                    debug!(service = %key, error = %e, "query failed; using the last push");
                    current = client.latest(&key);
                }
            }
        }
    }
    Read {
        key,
        subscribed,
        current,
        queried,
    }
}

/// The next tick of an optional timer (never resolves without one).
async fn tick_if_some(timer: &mut Option<tokio::time::Interval>) {
    match timer {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// When a catalog fetch lists (it probes first either way, so that the
/// listing comes with the probe taken before it).
enum Fetch {
    /// Always: a listing tick, or a fuzzy watch reported a change.
    Always,
    /// Only if the probe differs from this one, the probe taken before the
    /// last listing (a probe tick).
    IfProbeDiffers(Option<CatalogProbe>),
}

/// What a catalog fetch found.
enum Fetched {
    /// The client went down before the catalog answered.
    Down,
    /// The probe showed no change: nothing was listed.
    Unchanged,
    /// The filtered catalog, and the probe taken just before it.
    Listed(BTreeSet<ServiceKey>, Option<CatalogProbe>),
}

/// A catalog fetch in progress.
type Fetching =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Fetched, Closed>> + Send>>;

/// Waits for the fetch in progress (never resolves without one).
async fn poll_listing(fetching: &mut Option<Fetching>) -> Result<Fetched, Closed> {
    match fetching {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// The filtered catalog, retried until it answers; `None` as soon as the
/// client is not connected (a retry loop that outlived the connection would
/// keep the loss from being reported, and so a lost source's replicas from
/// ever being withdrawn); `Closed` on shutdown.
async fn list(
    client: &Client,
    filter: &ServiceFilter,
    list_interval: Duration,
    token: &CancellationToken,
) -> Result<Option<BTreeSet<ServiceKey>>, Closed> {
    let mut backoff = Backoff::try_new(
        Duration::from_millis(200),
        list_interval.max(Duration::from_secs(1)),
        0.5,
    )
    .map_err(|_| Closed)?;
    let mut state = client.state();
    loop {
        let listed = tokio::select! {
            listed = client.catalog() => listed,
            () = went_down(&mut state) => return Ok(None),
            () = token.cancelled() => return Err(Closed),
        };
        match listed {
            Ok(entries) => {
                // One namespace string and one per group for every key, not
                // two of their own each (the keys live on in the maps that
                // follow the services).
                let mut shared = Interner::default();
                let namespace = shared.str(client.namespace());
                let mut listed = Vec::with_capacity(entries.len());
                for (i, (group, name)) in entries.into_iter().enumerate() {
                    let key = ServiceKey::new(namespace.clone(), shared.str(&group), name);
                    if filter(&key) {
                        listed.push(key);
                    }
                    if i % YIELD_EVERY == YIELD_EVERY - 1 {
                        tokio::task::yield_now().await;
                    }
                }
                // The catalog comes sorted: the set is built in one pass.
                return Ok(Some(listed.into_iter().collect()));
            }
            Err(e) => warn!(error = %e, "listing failed; retrying"),
        }
        tokio::select! {
            () = tokio::time::sleep(backoff.next_delay()) => {}
            () = went_down(&mut state) => return Ok(None),
            () = token.cancelled() => return Err(Closed),
        }
    }
}

/// The catalog's probe; `None` when it failed (logged), the client is not
/// connected, or a fuzzy watch makes it needless. `Closed` on shutdown.
async fn probe(client: &Client, token: &CancellationToken) -> Result<Option<CatalogProbe>, Closed> {
    let mut state = client.state();
    tokio::select! {
        probed = client.catalog_probe() => Ok(probed.unwrap_or_else(|e| {
            debug!(error = %e, "catalog probe failed");
            None
        })),
        () = went_down(&mut state) => Ok(None),
        () = token.cancelled() => Err(Closed),
    }
}

/// Resolves once the client is not connected (at once if it is not now, or
/// if the client is gone).
async fn went_down(state: &mut tokio::sync::watch::Receiver<ConnectionState>) {
    let _ = state
        .wait_for(|s| !matches!(s, ConnectionState::Connected { .. }))
        .await;
}
