//! The composition root: clients, watchers, the engine loop and publishers,
//! wired from a [`Config`] and run until a cancellation token fires.
//!
//! One engine task owns the replication state, so the rules run
//! single-threaded on full snapshots: per destination service it keeps, for
//! every source feeding it, the desired replicas, and publishes their union
//! (Nacos keeps one slot per connection and service, so two sources that
//! land in the same destination service must share one batch).
//!
//! A lost source's replicas are held for `hold_for` (or withdrawn at once
//! with `source_loss = "withdraw"`); a reconnect ends the hold and relists.
//!
//! Not yet here (issue 3 continues): anti-entropy read-back, the status
//! server and metrics.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::cluster::watch::{watch, WatchConfig, WatchEvent};
use crate::cluster::{Client, ClientConfig, ClientError};
use crate::config::{ClusterSpec, Config, SourceLoss};
use crate::model::{ClusterId, Instance, ServiceKey, ServiceSnapshot};
use crate::reconcile::publish::{Publisher, PublisherConfig};
use crate::reconcile::plan::canonical;
use crate::reconcile::{desired, plan, Desired, Guard, Plan, Route};

/// The agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A cluster client could not be built.
    #[error("starting the client for cluster {cluster} namespace {namespace}")]
    Client {
        /// Cluster.
        cluster: ClusterId,
        /// Namespace.
        namespace: String,
        /// Why.
        #[source]
        source: Box<ClientError>,
    },
}

/// A replication agent built from a checked configuration.
pub struct Agent {
    config: Config,
}

/// A cluster namespace.
type Endpoint = (ClusterId, String);
/// A service on a given cluster.
type ServiceAt = (ClusterId, ServiceKey);

/// An event from one source cluster namespace.
struct SourceEvent {
    cluster: ClusterId,
    namespace: String,
    event: WatchEvent,
}

impl Agent {
    /// An agent for `config`.
    pub fn new(config: Config) -> Self {
        Self { config }
    }

    /// Runs until `shutdown` is cancelled. Replicas live as long as the
    /// publishers' connections: when this returns, they are gone.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AgentError> {
        let token = shutdown.child_token();
        let config = Arc::new(self.config);
        let mut clients: HashMap<Endpoint, Client> = HashMap::new();
        let mut client_for = |spec: &ClusterSpec, ns: &str| -> Result<Client, AgentError> {
            let key = (spec.id.clone(), ns.to_owned());
            if let Some(c) = clients.get(&key) {
                return Ok(c.clone());
            }
            let mut cc = ClientConfig::new(spec.id.0.clone(), spec.servers.clone(), ns);
            cc.grpc_port_offset = spec.grpc_port_offset;
            cc.credentials = spec.credentials.clone();
            cc.session.tls = spec.tls.clone();
            cc.session.request_timeout = config.timings.request_timeout;
            let c = Client::start(cc, &token).map_err(|source| AgentError::Client {
                cluster: spec.id.clone(),
                namespace: ns.to_owned(),
                source: Box::new(source),
            })?;
            clients.insert(key, c.clone());
            Ok(c)
        };

        // Publishers: one per destination cluster namespace a route can land in.
        let mut publishers: HashMap<Endpoint, Publisher> = HashMap::new();
        // Sources: one watcher per source cluster namespace a route reads.
        let (events_tx, mut events) = mpsc::channel::<SourceEvent>(1024);
        let mut sources: HashMap<Endpoint, Client> = HashMap::new();
        for route in &config.routes {
            let (Some(from), Some(to)) = (config.cluster(route.source()), config.cluster(route.destination())) else {
                continue;
            };
            let read = if route.scope.namespaces.is_empty() { from.namespaces.clone() } else { route.scope.namespaces.clone() };
            for ns in read {
                let landing = route.mapping.namespaces.get(&ns).cloned().unwrap_or_else(|| ns.clone());
                let dest = (to.id.clone(), landing.clone());
                if let std::collections::hash_map::Entry::Vacant(slot) = publishers.entry(dest) {
                    let client = client_for(to, &landing)?;
                    let pc = PublisherConfig { max_per_second: config.timings.max_publishes_per_second, ..PublisherConfig::default() };
                    slot.insert(Publisher::start(client, pc, &token));
                }
                if let std::collections::hash_map::Entry::Vacant(slot) = sources.entry((from.id.clone(), ns.clone())) {
                    slot.insert(client_for(from, &ns)?);
                }
            }
        }
        for ((cluster, ns), client) in &sources {
            let routes: Vec<Route> = config.routes.iter().filter(|r| r.source() == cluster).cloned().collect();
            let filter = Arc::new(move |k: &ServiceKey| routes.iter().any(|r| r.covers(k)));
            let wc = WatchConfig { list_interval: config.timings.list_interval, ..WatchConfig::default() };
            let mut rx = watch(client.clone(), filter, wc, &token);
            let tx = events_tx.clone();
            let cluster = cluster.clone();
            let namespace = ns.clone();
            let span = tracing::info_span!("source", cluster = %cluster, namespace = %ns);
            tokio::spawn(tracing::Instrument::instrument(
                async move {
                    while let Some(event) = rx.recv().await {
                        let e = SourceEvent { cluster: cluster.clone(), namespace: namespace.clone(), event };
                        if tx.send(e).await.is_err() {
                            return;
                        }
                    }
                },
                span,
            ));
        }
        drop(events_tx);
        info!(sources = sources.len(), destinations = publishers.len(), routes = config.routes.len(), "agent running");

        let mut engine = Engine {
            config: config.clone(),
            publishers,
            sources,
            state: HashMap::new(),
            listing: HashMap::new(),
            lost: HashMap::new(),
        };
        loop {
            let next_expiry = engine.lost.values().min().copied();
            tokio::select! {
                // Shutdown: dropping the clients closes the connections, and
                // Nacos removes the replicas they owned.
                () = token.cancelled() => break,
                event = events.recv() => match event {
                    Some(e) => engine.handle(e).await,
                    None => break,
                },
                // A lost source's hold time is over.
                () = sleep_until_or_never(next_expiry) => engine.expire_holds(),
            }
        }
        token.cancel();
        Ok(())
    }
}

/// Replication state, owned by one task.
struct Engine {
    config: Arc<Config>,
    publishers: HashMap<Endpoint, Publisher>,
    sources: HashMap<Endpoint, Client>,
    /// Destination service -> (source cluster, source service) -> desired replicas.
    state: HashMap<ServiceAt, BTreeMap<ServiceAt, Vec<Instance>>>,
    /// Source services announced since the last Init, per source cluster namespace.
    listing: HashMap<Endpoint, Vec<ServiceKey>>,
    /// Unreachable sources and when their hold time ends.
    lost: HashMap<Endpoint, Instant>,
}

async fn sleep_until_or_never(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

impl Engine {
    async fn handle(&mut self, e: SourceEvent) {
        match e.event {
            WatchEvent::Init => {
                // The source is back (or new): its hold ends, and nothing is
                // withdrawn on a partial view: collect until InitDone.
                let source = (e.cluster.clone(), e.namespace.clone());
                self.lost.remove(&source);
                self.listing.insert(source, Vec::new());
                debug!(cluster = %e.cluster, namespace = %e.namespace, "listing started");
            }
            WatchEvent::InitSnapshot(s) => {
                self.listing.entry((e.cluster.clone(), e.namespace.clone())).or_default().push(s.service.clone());
                self.apply_snapshot(&e.cluster, &s).await;
            }
            WatchEvent::Snapshot(s) => self.apply_snapshot(&e.cluster, &s).await,
            WatchEvent::Removed(key) => {
                let empty = ServiceSnapshot::empty(key);
                self.apply_snapshot(&e.cluster, &empty).await;
            }
            WatchEvent::InitDone => {
                // The full view of this source namespace is known: what we
                // replicate from it but it no longer lists is gone (even if
                // it lists nothing at all).
                let listed = self.listing.remove(&(e.cluster.clone(), e.namespace.clone())).unwrap_or_default();
                let stale: Vec<ServiceKey> = self
                    .state
                    .values()
                    .flat_map(|by_source| by_source.keys())
                    .filter(|(c, key)| *c == e.cluster && key.namespace == e.namespace && !listed.contains(key))
                    .map(|(_, key)| key.clone())
                    .collect();
                for key in stale {
                    let empty = ServiceSnapshot::empty(key);
                    self.apply_snapshot(&e.cluster, &empty).await;
                }
                info!(cluster = %e.cluster, namespace = %e.namespace, services = listed.len(), "listing complete");
            }
            WatchEvent::Lost => {
                let source = (e.cluster.clone(), e.namespace.clone());
                match self.config.timings.source_loss {
                    SourceLoss::Withdraw => {
                        warn!(cluster = %e.cluster, namespace = %e.namespace, "source lost; withdrawing its replicas");
                        self.withdraw_source(&source);
                    }
                    SourceLoss::Hold => {
                        let hold = self.config.timings.hold_for;
                        warn!(cluster = %e.cluster, namespace = %e.namespace, ?hold, "source lost; holding its replicas");
                        self.lost.insert(source, Instant::now() + hold);
                    }
                }
            }
        }
    }

    /// Withdraws the replicas of every lost source whose hold time is over.
    fn expire_holds(&mut self) {
        let now = Instant::now();
        let expired: Vec<Endpoint> = self.lost.iter().filter(|(_, at)| **at <= now).map(|(s, _)| s.clone()).collect();
        for source in expired {
            self.lost.remove(&source);
            warn!(cluster = %source.0, namespace = %source.1, "hold time over; withdrawing the lost source's replicas");
            self.withdraw_source(&source);
        }
    }

    /// Removes one source namespace's contribution everywhere. Deliberate,
    /// so the mass-withdrawal guard does not apply (and could not confirm:
    /// the source is unreachable).
    fn withdraw_source(&mut self, source: &Endpoint) {
        let services: Vec<ServiceKey> = self
            .state
            .values()
            .flat_map(|by_source| by_source.keys())
            .filter(|(c, key)| *c == source.0 && key.namespace == source.1)
            .map(|(_, key)| key.clone())
            .collect();
        let routes: Vec<Route> = self.config.routes.iter().filter(|r| *r.source() == source.0).cloned().collect();
        for key in services {
            let empty = ServiceSnapshot::empty(key);
            for route in &routes {
                let _ = self.update(route, &empty, &Guard::disabled());
            }
        }
    }

    /// Recomputes every destination service this source service feeds.
    async fn apply_snapshot(&mut self, source: &ClusterId, snapshot: &ServiceSnapshot) {
        let routes: Vec<Route> = self.config.routes.iter().filter(|r| r.source() == source).cloned().collect();
        for route in routes {
            let guard = self.config.guard.clone();
            if let Some((published, removing)) = self.update(&route, snapshot, &guard) {
                // Mass-withdrawal guard: believe it only if a fresh query agrees.
                warn!(route = %route, service = %snapshot.service, published, removing, "large withdrawal; confirming with a fresh query");
                let client = self.sources.get(&(source.clone(), snapshot.service.namespace.clone())).cloned();
                let fresh = match client {
                    Some(c) => c.query(&snapshot.service.group, &snapshot.service.name).await,
                    None => continue,
                };
                match fresh {
                    Ok(fresh) => {
                        let _ = self.update(&route, &fresh, &Guard::disabled());
                    }
                    Err(e) => warn!(route = %route, service = %snapshot.service, error = %e, "confirmation failed; replicas kept"),
                }
            }
        }
    }

    /// Records this source's contribution to the destination service and
    /// submits the union if it changed. Returns `(published, removing)` when
    /// the guard holds the change back (the old contribution is kept).
    fn update(&mut self, route: &Route, snapshot: &ServiceSnapshot, guard: &Guard) -> Option<(usize, usize)> {
        let d = desired(route, &self.config.tags, snapshot);
        for skipped in &d.skipped {
            warn!(route = %route, service = %snapshot.service, ?skipped, "native not replicated");
        }
        let dest_service = (route.destination().clone(), d.service.clone());
        let source_key = (route.source().clone(), snapshot.service.clone());
        let by_source = self.state.entry(dest_service.clone()).or_default();
        let previous = if d.replicas.is_empty() {
            by_source.remove(&source_key)
        } else {
            by_source.insert(source_key.clone(), d.replicas.clone())
        };
        let union = canonical(by_source.values().flatten().cloned().collect());
        if by_source.is_empty() {
            self.state.remove(&dest_service);
        }
        let endpoint = (route.destination().clone(), d.service.namespace.clone());
        let Some(publisher) = self.publishers.get(&endpoint) else {
            warn!(route = %route, service = %d.service, "no publisher for the destination namespace");
            return None;
        };
        let wanted = Desired { service: d.service.clone(), replicas: union, skipped: Vec::new() };
        match plan(&wanted, &publisher.published(&d.service).unwrap_or_default(), guard) {
            Plan::Unchanged => None,
            Plan::Publish(set) => {
                publisher.submit(d.service.clone(), set);
                None
            }
            Plan::Withdraw => {
                publisher.submit(d.service.clone(), Vec::new());
                None
            }
            Plan::Confirm { published, removing } => {
                let by_source = self.state.entry(dest_service).or_default();
                match previous {
                    Some(p) => {
                        by_source.insert(source_key, p);
                    }
                    None => {
                        by_source.remove(&source_key);
                    }
                }
                Some((published, removing))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::reconcile::publish::{PublishError, PublisherStats, Registry};

    /// Records the sets published per service name.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<(String, usize)>>>);

    impl Registry for Recorder {
        async fn publish(&self, _group: &str, name: &str, instances: Vec<Instance>) -> Result<(), PublishError> {
            self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((name.to_owned(), instances.len()));
            Ok(())
        }
    }

    fn engine(recorder: &Recorder, token: &CancellationToken) -> (Engine, Publisher) {
        let text = "[[clusters]]\nid = \"a\"\nservers = [\"h:1\"]\n[[clusters]]\nid = \"b\"\nservers = [\"h:2\"]\n\
                    [[routes]]\nfrom = \"a\"\nto = \"b\"\n";
        let config = crate::config::parse(std::path::Path::new("t.toml"), text, &|_| None).expect("valid");
        let publisher = Publisher::start(recorder.clone(), PublisherConfig::default(), token);
        let publishers = HashMap::from([((ClusterId("b".into()), "public".to_owned()), publisher.clone())]);
        let engine = Engine {
            config: Arc::new(config),
            publishers,
            sources: HashMap::new(),
            state: HashMap::new(),
            listing: HashMap::new(),
            lost: HashMap::new(),
        };
        (engine, publisher)
    }

    fn event(event: WatchEvent) -> SourceEvent {
        SourceEvent { cluster: ClusterId("a".into()), namespace: "public".into(), event }
    }

    /// An engine whose source has completed one listing of `orders` (one
    /// native), replicated once.
    async fn listed_once(recorder: &Recorder, token: &CancellationToken) -> (Engine, Publisher) {
        let (mut engine, publisher) = engine(recorder, token);
        let snapshot = ServiceSnapshot {
            instances: vec![Instance::new("10.0.0.1", 80)],
            last_ref_time_ms: 1,
            ..ServiceSnapshot::empty(ServiceKey::new("public", "DEFAULT_GROUP", "orders"))
        };
        engine.handle(event(WatchEvent::Init)).await;
        engine.handle(event(WatchEvent::InitSnapshot(snapshot))).await;
        engine.handle(event(WatchEvent::InitDone)).await;
        applied(&publisher, 1).await;
        (engine, publisher)
    }

    async fn applied(publisher: &Publisher, n: u64) {
        let mut stats = publisher.stats();
        let waited = tokio::time::timeout(std::time::Duration::from_secs(5), stats.wait_for(|s: &PublisherStats| s.applied >= n));
        waited.await.unwrap_or_else(|_| panic!("fewer than {n} sets applied")).expect("publisher running");
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_listing_withdraws_what_the_source_no_longer_has() {
        let recorder = Recorder::default();
        let token = CancellationToken::new();
        let (mut engine, publisher) = listed_once(&recorder, &token).await;
        // After a reconnect the source lists nothing at all.
        engine.handle(event(WatchEvent::Init)).await;
        engine.handle(event(WatchEvent::InitDone)).await;
        applied(&publisher, 2).await;
        let calls = recorder.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        assert_eq!(calls, vec![("orders".to_owned(), 1), ("orders".to_owned(), 0)]);
        token.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_withdrawn_before_the_listing_completes() {
        let recorder = Recorder::default();
        let token = CancellationToken::new();
        let (mut engine, publisher) = listed_once(&recorder, &token).await;
        // A relisting has started but not finished: the service's absence
        // so far means nothing.
        engine.handle(event(WatchEvent::Init)).await;
        engine.handle(event(WatchEvent::Lost)).await;
        // The engine submits synchronously: a withdrawal would be queued now.
        assert_eq!(publisher.pending(), 0);
        assert_eq!(publisher.stats().borrow().applied, 1);
        assert_eq!(publisher.published(&ServiceKey::new("public", "DEFAULT_GROUP", "orders")).map(|s| s.len()), Some(1));
        token.cancel();
    }
}
