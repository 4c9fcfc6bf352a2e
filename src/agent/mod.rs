//! The composition root: clients, watchers, the engine loop, publishers
//! and the status server, wired from a [`Config`] and run until a
//! cancellation token fires.
//!
//! One engine task owns the replication state, so the rules run
//! single-threaded on full snapshots: per destination service it keeps, for
//! every source feeding it, the desired replicas, and publishes their union
//! (Nacos keeps one slot per connection and service, so two sources that
//! land in the same destination service must share one batch).
//!
//! A lost source's replicas are held for `hold_for` (or withdrawn at once
//! with `source_loss = "withdraw"`); a reconnect ends the hold and relists.
//! Anti-entropy runs on both sides every `resync_interval`: the watchers
//! relist and re-query their sources, the publishers read back what the
//! destinations show and republish what is missing or wrong.
//!
//! Embedding: [`Agent::with_policy`] adds custom filtering and transforms,
//! [`Agent::events`] streams what happens, [`Agent::telemetry`] gives the
//! metrics and status document; the status HTTP server is opt-in
//! ([`Agent::with_status_server`]), so a library user binds no port unasked.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::cluster::watch::{WatchConfig, WatchEvent, watch};
use crate::cluster::{Client, ClientConfig, ClientError, ConnectionState};
use crate::config::{ClusterSpec, Config, SourceLoss};
use crate::model::{ClusterId, Instance, InstanceSet, ServiceKey, ServiceSnapshot};
use crate::reconcile::plan::canonical;
use crate::reconcile::publish::{Owned, Publisher, PublisherConfig};
use crate::reconcile::{
    Desired, Guard, Plan, Policy, ReplicateAll, Route, Skipped, desired_with, plan,
};
use crate::runtime::sleep_until_or_never;
use crate::status::{StatusError, StatusServer};
use crate::telemetry::{Event, Telemetry};

mod diff;
pub use diff::{DiffError, DiffReport, ServiceDiff, diff};

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
    /// A route names a cluster the configuration does not define.
    #[error("no cluster {cluster} in the configuration")]
    UnknownCluster {
        /// The id.
        cluster: ClusterId,
    },
    /// The status server could not listen.
    #[error(transparent)]
    Status(#[from] StatusError),
}

/// A replication agent built from a checked configuration.
pub struct Agent {
    config: Config,
    policy: Arc<dyn Policy>,
    telemetry: Telemetry,
    status: Option<SocketAddr>,
}

/// A cluster namespace.
type Endpoint = (ClusterId, String);
/// A service on a given cluster.
type ServiceAt = (ClusterId, ServiceKey);

/// An event from one source cluster namespace, and when it was received.
struct SourceEvent {
    cluster: ClusterId,
    namespace: String,
    event: WatchEvent,
    received: Instant,
}

impl Agent {
    /// An agent for `config`, replicating everything its routes cover,
    /// serving no status port.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            policy: Arc::new(ReplicateAll),
            telemetry: Telemetry::new(),
            status: None,
        }
    }

    /// Narrows or reshapes what is replicated (see [`Policy`]).
    pub fn with_policy(mut self, policy: impl Policy) -> Self {
        self.policy = Arc::new(policy);
        self
    }

    /// Serves `/healthz`, `/readyz`, `/metrics` and `/status` on `addr`
    /// while running (the binary passes `agent.status_listen`).
    pub fn with_status_server(mut self, addr: SocketAddr) -> Self {
        self.status = Some(addr);
        self
    }

    /// Metrics, status and events of this agent.
    pub fn telemetry(&self) -> Telemetry {
        self.telemetry.clone()
    }

    /// What happens from now on: replicated, withdrawn, errors, sources
    /// lost and listed, drift, readiness.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.telemetry.subscribe()
    }

    /// Runs until `shutdown` is cancelled. Replicas live as long as the
    /// publishers' connections: when this returns, they are gone.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AgentError> {
        let token = shutdown.child_token();
        let Agent {
            config,
            policy,
            telemetry,
            status,
        } = self;
        if let Some(addr) = status {
            let server = StatusServer::bind(addr, telemetry.clone()).await?;
            info!(addr = %server.local_addr().unwrap_or(addr), "status server listening");
            let stop = token.clone();
            tokio::spawn(async move {
                if let Err(e) = server.serve(stop).await {
                    warn!(error = %e, "status server stopped");
                }
            });
        }
        let config = Arc::new(config);
        let mut clients: HashMap<Endpoint, Client> = HashMap::new();
        let mut client_for = |spec: &ClusterSpec, ns: &str| -> Result<Client, AgentError> {
            let key = (spec.id.clone(), ns.to_owned());
            if let Some(c) = clients.get(&key) {
                return Ok(c.clone());
            }
            let c = start_client(&config, spec, ns, &token)?;
            report_connection(&c, &telemetry, &token);
            clients.insert(key, c.clone());
            Ok(c)
        };

        // Publishers: one per destination cluster namespace a route can land in.
        let mut publishers: HashMap<Endpoint, Publisher> = HashMap::new();
        // Sources: one watcher per source cluster namespace a route reads.
        // Small buffers: a snapshot waiting here is a copy of a whole service;
        // the engine keeps up, and backpressure reaches the watchers.
        let (events_tx, mut events) = mpsc::channel::<SourceEvent>(128);
        let mut sources: HashMap<Endpoint, Client> = HashMap::new();
        for route in &config.routes {
            let (Some(from), Some(to)) = (
                config.cluster(route.source()),
                config.cluster(route.destination()),
            ) else {
                continue;
            };
            for ns in route_namespaces(route, from) {
                let landing = route
                    .mapping
                    .namespaces
                    .get(&ns)
                    .cloned()
                    .unwrap_or_else(|| ns.clone());
                let dest = (to.id.clone(), landing.clone());
                if let std::collections::hash_map::Entry::Vacant(slot) = publishers.entry(dest) {
                    let client = client_for(to, &landing)?;
                    slot.insert(Publisher::start(
                        client,
                        publisher_config(&config, &to.id, &landing, &telemetry),
                        &token,
                    ));
                }
                if let std::collections::hash_map::Entry::Vacant(slot) =
                    sources.entry((from.id.clone(), ns.clone()))
                {
                    slot.insert(client_for(from, &ns)?);
                }
            }
        }
        for ((cluster, ns), client) in &sources {
            let routes: Vec<Route> = config
                .routes
                .iter()
                .filter(|r| r.source() == cluster)
                .cloned()
                .collect();
            let follows = policy.clone();
            let filter = Arc::new(move |k: &ServiceKey| {
                routes.iter().any(|r| r.covers(k) && follows.follows(r, k))
            });
            let wc = WatchConfig {
                list_interval: config.timings.list_interval,
                resync_interval: Some(config.timings.resync_interval),
                ..WatchConfig::default()
            };
            let mut rx = watch(client.clone(), filter, wc, &token);
            let tx = events_tx.clone();
            let cluster = cluster.clone();
            let namespace = ns.clone();
            let span = tracing::info_span!("source", cluster = %cluster, namespace = %ns);
            tokio::spawn(tracing::Instrument::instrument(
                async move {
                    while let Some(event) = rx.recv().await {
                        let e = SourceEvent {
                            cluster: cluster.clone(),
                            namespace: namespace.clone(),
                            event,
                            received: Instant::now(),
                        };
                        if tx.send(e).await.is_err() {
                            return;
                        }
                    }
                },
                span,
            ));
        }
        drop(events_tx);
        info!(
            sources = sources.len(),
            destinations = publishers.len(),
            routes = config.routes.len(),
            "agent running"
        );

        let mut engine = Engine::new(config.clone(), policy, telemetry, publishers, sources);
        let mut readiness = tokio::time::interval(Duration::from_millis(200));
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
                _ = readiness.tick(), if !engine.ready => engine.check_ready(),
            }
        }
        token.cancel();
        Ok(())
    }
}

/// The namespaces a route reads on its source.
fn route_namespaces(route: &Route, from: &ClusterSpec) -> Vec<String> {
    if route.scope.namespaces.is_empty() {
        from.namespaces.clone()
    } else {
        route.scope.namespaces.clone()
    }
}

/// A client of one cluster namespace, configured from the file (servers,
/// gRPC offset, credentials, TLS, request timeout). The agent, `diff` and
/// `check --connect` all connect through it.
pub fn start_client(
    config: &Config,
    spec: &ClusterSpec,
    ns: &str,
    token: &CancellationToken,
) -> Result<Client, AgentError> {
    let mut cc = ClientConfig::new(spec.id.0.clone(), spec.servers.clone(), ns);
    cc.grpc_port_offset = spec.grpc_port_offset;
    cc.credentials = spec.credentials.clone();
    cc.session.tls = spec.tls.clone();
    cc.session.request_timeout = config.timings.request_timeout;
    Client::start(cc, token).map_err(|source| AgentError::Client {
        cluster: spec.id.clone(),
        namespace: ns.to_owned(),
        source: Box::new(source),
    })
}

/// Mirrors a client's connection state into the telemetry until it stops.
fn report_connection(client: &Client, telemetry: &Telemetry, token: &CancellationToken) {
    let mut states = client.state_stream();
    let mut info = client.server_info();
    let (cluster, namespace, t, token) = (
        client.cluster().clone(),
        client.namespace().to_owned(),
        telemetry.clone(),
        token.clone(),
    );
    tokio::spawn(async move {
        loop {
            let state = tokio::select! {
                () = token.cancelled() => return,
                s = states.next() => match s { Some(s) => s, None => return },
                changed = info.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let i = info.borrow_and_update().clone();
                    t.server(&cluster, &namespace, i.version, i.line, i.listing.map(|l| l.describe().to_owned()));
                    continue;
                }
            };
            match state {
                ConnectionState::Connecting { .. } => {
                    t.connection(&cluster, &namespace, "connecting", None, None)
                }
                ConnectionState::Connected { connection_id, .. } => {
                    t.connection(
                        &cluster,
                        &namespace,
                        "connected",
                        Some(&connection_id),
                        None,
                    );
                }
                ConnectionState::Disconnected { error, .. } => {
                    t.connection(
                        &cluster,
                        &namespace,
                        "disconnected",
                        None,
                        Some(error.clone()),
                    );
                    t.error(&cluster, "connect", "disconnected", error, true);
                }
                ConnectionState::Stopped => return,
            }
        }
    });
}

/// A destination publisher's settings: the rate limit, the read-back, and
/// which tagged instances could be ours (origins routed into it).
fn publisher_config(
    config: &Config,
    cluster: &ClusterId,
    namespace: &str,
    telemetry: &Telemetry,
) -> PublisherConfig {
    PublisherConfig {
        cluster: cluster.clone(),
        namespace: namespace.to_owned(),
        max_per_second: config.timings.max_publishes_per_second,
        read_back: Some(config.timings.resync_interval),
        owned: Owned(owned_by_routes_into(config, cluster)),
        telemetry: telemetry.clone(),
        ..PublisherConfig::default()
    }
}

/// Which instances shown in `destination` this agent could have written:
/// tagged with the origin of a route into it.
fn owned_by_routes_into(
    config: &Config,
    destination: &ClusterId,
) -> Arc<dyn Fn(&Instance) -> bool + Send + Sync> {
    let origins: HashSet<String> = config
        .routes
        .iter()
        .filter(|r| r.destination() == destination)
        .map(|r| r.source().0.clone())
        .collect();
    let tags = config.tags.clone();
    Arc::new(move |i: &Instance| tags.origin_of(i).is_some_and(|o| origins.contains(o)))
}

/// What each source service contributes to one destination service. Almost
/// always one entry (a few when routes merge services), so a plain vector:
/// a `BTreeMap` node per destination service cost 1.3 KB, the largest single
/// item in the benchmark's heap profile.
#[derive(Default)]
struct Contributions(Vec<(ServiceAt, InstanceSet)>);

impl Contributions {
    fn insert(&mut self, key: ServiceAt, replicas: InstanceSet) -> Option<InstanceSet> {
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => Some(std::mem::replace(v, replicas)),
            None => {
                self.0.push((key, replicas));
                None
            }
        }
    }

    fn remove(&mut self, key: &ServiceAt) -> Option<InstanceSet> {
        let i = self.0.iter().position(|(k, _)| k == key)?;
        Some(self.0.swap_remove(i).1)
    }

    fn get(&self, key: &ServiceAt) -> Option<&InstanceSet> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn keys(&self) -> impl Iterator<Item = &ServiceAt> {
        self.0.iter().map(|(k, _)| k)
    }

    fn values(&self) -> impl Iterator<Item = &InstanceSet> {
        self.0.iter().map(|(_, v)| v)
    }

    /// Every contribution together, canonical. One contribution (the usual
    /// case) is shared, not copied: the same set then lives in the engine,
    /// the publisher's queue and the client's redo record.
    fn union(&self) -> InstanceSet {
        match self.0.as_slice() {
            [(_, only)] => only.clone(),
            _ => canonical(self.values().flat_map(|v| v.iter().cloned()).collect()).into(),
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Replication state, owned by one task.
struct Engine {
    config: Arc<Config>,
    policy: Arc<dyn Policy>,
    telemetry: Telemetry,
    publishers: HashMap<Endpoint, Publisher>,
    sources: HashMap<Endpoint, Client>,
    /// Destination service -> (source cluster, source service) -> desired replicas.
    state: HashMap<ServiceAt, Contributions>,
    /// Per route (source, destination): source services feeding it and replicas wanted.
    totals: HashMap<(ClusterId, ClusterId), (usize, usize)>,
    /// Source services announced since the last Init, per source cluster namespace.
    listing: HashMap<Endpoint, Vec<ServiceKey>>,
    /// Source namespaces that completed at least one full listing.
    listed: HashSet<Endpoint>,
    /// Unreachable sources and when their hold time ends.
    lost: HashMap<Endpoint, Instant>,
    /// First full sync done.
    ready: bool,
}

impl Engine {
    fn new(
        config: Arc<Config>,
        policy: Arc<dyn Policy>,
        telemetry: Telemetry,
        publishers: HashMap<Endpoint, Publisher>,
        sources: HashMap<Endpoint, Client>,
    ) -> Self {
        Engine {
            config,
            policy,
            telemetry,
            publishers,
            sources,
            state: HashMap::new(),
            totals: HashMap::new(),
            listing: HashMap::new(),
            listed: HashSet::new(),
            lost: HashMap::new(),
            ready: false,
        }
    }

    /// Ready once every source has listed in full and every destination has
    /// taken all it was sent.
    fn check_ready(&mut self) {
        let all_listed = self.sources.keys().all(|s| self.listed.contains(s));
        if all_listed && self.publishers.values().all(Publisher::settled) {
            self.ready = true;
            info!("first full sync done");
            self.telemetry.ready();
        }
    }

    async fn handle(&mut self, e: SourceEvent) {
        let received = Some(e.received);
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
                self.listing
                    .entry((e.cluster.clone(), e.namespace.clone()))
                    .or_default()
                    .push(s.service.clone());
                self.apply_snapshot(&e.cluster, &s, received).await;
            }
            WatchEvent::InitUnknown(key) => {
                // Listed, content unknown: keep what we had for it.
                self.listing
                    .entry((e.cluster.clone(), e.namespace.clone()))
                    .or_default()
                    .push(key);
            }
            WatchEvent::Snapshot(s) => self.apply_snapshot(&e.cluster, &s, received).await,
            WatchEvent::Removed(key) => {
                let empty = ServiceSnapshot::empty(key);
                self.apply_snapshot(&e.cluster, &empty, received).await;
            }
            WatchEvent::InitDone => {
                // The full view of this source namespace is known: what we
                // replicate from it but it no longer lists is gone (even if
                // it lists nothing at all).
                let source = (e.cluster.clone(), e.namespace.clone());
                let listed: HashSet<ServiceKey> = self
                    .listing
                    .remove(&source)
                    .unwrap_or_default()
                    .into_iter()
                    .collect();
                let stale: Vec<ServiceKey> = self
                    .state
                    .values()
                    .flat_map(|by_source| by_source.keys())
                    .filter(|(c, key)| {
                        *c == e.cluster && key.namespace == e.namespace && !listed.contains(key)
                    })
                    .map(|(_, key)| key.clone())
                    .collect();
                for key in stale {
                    let empty = ServiceSnapshot::empty(key);
                    self.apply_snapshot(&e.cluster, &empty, received).await;
                }
                info!(cluster = %e.cluster, namespace = %e.namespace, services = listed.len(), "listing complete");
                self.telemetry
                    .listed(&e.cluster, &e.namespace, listed.len());
                self.listed.insert(source);
            }
            WatchEvent::Lost => {
                let source = (e.cluster.clone(), e.namespace.clone());
                match self.config.timings.source_loss {
                    SourceLoss::Withdraw => {
                        warn!(cluster = %e.cluster, namespace = %e.namespace, "source lost; withdrawing its replicas");
                        self.telemetry.source_lost(&e.cluster, &e.namespace, false);
                        self.withdraw_source(&source);
                    }
                    SourceLoss::Hold => {
                        let hold = self.config.timings.hold_for;
                        warn!(cluster = %e.cluster, namespace = %e.namespace, ?hold, "source lost; holding its replicas");
                        self.telemetry.source_lost(&e.cluster, &e.namespace, true);
                        self.lost.insert(source, Instant::now() + hold);
                    }
                }
            }
        }
    }

    /// Withdraws the replicas of every lost source whose hold time is over.
    fn expire_holds(&mut self) {
        let now = Instant::now();
        let expired: Vec<Endpoint> = self
            .lost
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(s, _)| s.clone())
            .collect();
        for source in expired {
            self.lost.remove(&source);
            warn!(cluster = %source.0, namespace = %source.1, "hold time over; withdrawing the lost source's replicas");
            self.telemetry.hold_expired(&source.0, &source.1);
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
        let routes: Vec<Route> = self
            .config
            .routes
            .iter()
            .filter(|r| *r.source() == source.0)
            .cloned()
            .collect();
        for key in services {
            let empty = ServiceSnapshot::empty(key);
            for route in &routes {
                let _ = self.update(route, &empty, &Guard::disabled(), None);
            }
        }
    }

    /// Recomputes every destination service this source service feeds.
    async fn apply_snapshot(
        &mut self,
        source: &ClusterId,
        snapshot: &ServiceSnapshot,
        received: Option<Instant>,
    ) {
        let routes: Vec<Route> = self
            .config
            .routes
            .iter()
            .filter(|r| r.source() == source)
            .cloned()
            .collect();
        for route in routes {
            let guard = self.config.guard.clone();
            if let Some((published, removing)) = self.update(&route, snapshot, &guard, received) {
                // Mass-withdrawal guard: believe it only if a fresh query agrees.
                warn!(route = %route, service = %snapshot.service, published, removing, "large withdrawal; confirming with a fresh query");
                let client = self
                    .sources
                    .get(&(source.clone(), snapshot.service.namespace.clone()))
                    .cloned();
                let fresh = match client {
                    Some(c) => {
                        c.query(&snapshot.service.group, &snapshot.service.name)
                            .await
                    }
                    None => continue,
                };
                match fresh {
                    Ok(fresh) => {
                        let _ = self.update(&route, &fresh, &Guard::disabled(), received);
                    }
                    Err(e) => {
                        warn!(route = %route, service = %snapshot.service, error = %e, "confirmation failed; replicas kept");
                        self.telemetry.error(
                            source,
                            "confirm",
                            e.kind(),
                            format!("{}: {e}", snapshot.service),
                            false,
                        );
                    }
                }
            }
        }
    }

    /// Records this source's contribution to the destination service and
    /// submits the union if it changed. Returns `(published, removing)` when
    /// the guard holds the change back (the old contribution is kept).
    fn update(
        &mut self,
        route: &Route,
        snapshot: &ServiceSnapshot,
        guard: &Guard,
        received: Option<Instant>,
    ) -> Option<(usize, usize)> {
        let d = desired_with(route, &self.config.tags, snapshot, self.policy.as_ref());
        for skipped in &d.skipped {
            warn!(route = %route, service = %snapshot.service, ?skipped, "native not replicated");
            let Skipped::MetadataBudget { instance, .. } = skipped;
            self.telemetry.skipped(
                route.source(),
                route.destination(),
                &snapshot.service,
                instance.clone(),
                "metadata_budget",
            );
        }
        let dest_service = (route.destination().clone(), d.service.clone());
        let source_key = (route.source().clone(), snapshot.service.clone());
        let by_source = self.state.entry(dest_service.clone()).or_default();
        let previous = if d.replicas.is_empty() {
            by_source.remove(&source_key)
        } else {
            by_source.insert(source_key.clone(), d.replicas.into())
        };
        let before = previous.as_ref().map(|p| p.len());
        let union = by_source.union();
        if by_source.is_empty() {
            self.state.remove(&dest_service);
        }
        let endpoint = (route.destination().clone(), d.service.namespace.clone());
        let Some(publisher) = self.publishers.get(&endpoint) else {
            warn!(route = %route, service = %d.service, "no publisher for the destination namespace");
            return None;
        };
        // The plan compares copies for a moment; what is queued is the shared union.
        let wanted = Desired {
            service: d.service.clone(),
            replicas: union.to_vec(),
            skipped: Vec::new(),
        };
        let held_back = match plan(
            &wanted,
            &publisher.intended(&d.service).unwrap_or_default(),
            guard,
        ) {
            Plan::Unchanged => None,
            Plan::Publish(_) => {
                publisher.submit_set(d.service.clone(), union, received);
                None
            }
            Plan::Withdraw => {
                publisher.submit_set(d.service.clone(), InstanceSet::default(), received);
                None
            }
            Plan::Confirm {
                published,
                removing,
            } => {
                let by_source = self.state.entry(dest_service.clone()).or_default();
                match previous {
                    Some(p) => {
                        by_source.insert(source_key.clone(), p);
                    }
                    None => {
                        by_source.remove(&source_key);
                    }
                }
                Some((published, removing))
            }
        };
        let after = self
            .state
            .get(&dest_service)
            .and_then(|b| b.get(&source_key))
            .map(|r| r.len());
        if before != after {
            self.count(route, before, after);
        }
        held_back
    }

    /// Keeps the per-route totals (for metrics and `/status`) in step.
    fn count(&mut self, route: &Route, before: Option<usize>, after: Option<usize>) {
        let key = (route.source().clone(), route.destination().clone());
        let (services, replicas) = self.totals.entry(key).or_default();
        *services = (*services + usize::from(after.is_some()))
            .saturating_sub(usize::from(before.is_some()));
        *replicas = (*replicas + after.unwrap_or(0)).saturating_sub(before.unwrap_or(0));
        self.telemetry
            .route_totals(route.source(), route.destination(), *services, *replicas);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::reconcile::publish::{PublishError, PublisherStats, Registry};
    use crate::runtime::lock;

    /// Records the sets published per service name, and holds the last.
    #[derive(Clone, Default)]
    struct Recorder(
        Arc<Mutex<Vec<(String, usize)>>>,
        Arc<Mutex<HashMap<ServiceKey, InstanceSet>>>,
    );

    impl Registry for Recorder {
        async fn publish(
            &self,
            group: &str,
            name: &str,
            instances: InstanceSet,
        ) -> Result<(), PublishError> {
            lock(&self.0).push((name.to_owned(), instances.len()));
            let key = ServiceKey::new("public", group, name);
            let mut held = lock(&self.1);
            if instances.is_empty() {
                held.remove(&key);
            } else {
                held.insert(key, instances);
            }
            Ok(())
        }

        fn published(&self, service: &ServiceKey) -> Option<InstanceSet> {
            lock(&self.1).get(service).cloned()
        }

        fn published_services(&self) -> Vec<ServiceKey> {
            lock(&self.1).keys().cloned().collect()
        }

        async fn read(&self, _group: &str, _name: &str) -> Result<Vec<Instance>, PublishError> {
            Ok(Vec::new())
        }
    }

    fn engine(recorder: &Recorder, token: &CancellationToken) -> (Engine, Publisher) {
        let text = "[[clusters]]\nid = \"a\"\nservers = [\"h:1\"]\n[[clusters]]\nid = \"b\"\nservers = [\"h:2\"]\n\
                    [[routes]]\nfrom = \"a\"\nto = \"b\"\n";
        let config =
            crate::config::parse(std::path::Path::new("t.toml"), text, &|_| None).expect("valid");
        let publisher = Publisher::start(recorder.clone(), PublisherConfig::default(), token);
        let publishers = HashMap::from([(
            (ClusterId("b".into()), "public".to_owned()),
            publisher.clone(),
        )]);
        let engine = Engine::new(
            Arc::new(config),
            Arc::new(ReplicateAll),
            Telemetry::new(),
            publishers,
            HashMap::new(),
        );
        (engine, publisher)
    }

    fn event(event: WatchEvent) -> SourceEvent {
        SourceEvent {
            cluster: ClusterId("a".into()),
            namespace: "public".into(),
            event,
            received: Instant::now(),
        }
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
        engine
            .handle(event(WatchEvent::InitSnapshot(snapshot)))
            .await;
        engine.handle(event(WatchEvent::InitDone)).await;
        applied(&publisher, 1).await;
        (engine, publisher)
    }

    async fn applied(publisher: &Publisher, n: u64) {
        let mut stats = publisher.stats();
        let waited = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            stats.wait_for(|s: &PublisherStats| s.applied >= n),
        );
        waited
            .await
            .unwrap_or_else(|_| panic!("fewer than {n} sets applied"))
            .expect("publisher running");
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
        let calls = lock(&recorder.0).clone();
        assert_eq!(
            calls,
            vec![("orders".to_owned(), 1), ("orders".to_owned(), 0)]
        );
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
        assert_eq!(
            publisher
                .published(&ServiceKey::new("public", "DEFAULT_GROUP", "orders"))
                .map(|s| s.len()),
            Some(1)
        );
        token.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_listed_service_of_unknown_content_is_kept() {
        let recorder = Recorder::default();
        let token = CancellationToken::new();
        let (mut engine, publisher) = listed_once(&recorder, &token).await;
        // Relisted: the service is there, but neither a push nor a query said what it holds.
        engine.handle(event(WatchEvent::Init)).await;
        engine
            .handle(event(WatchEvent::InitUnknown(ServiceKey::new(
                "public",
                "DEFAULT_GROUP",
                "orders",
            ))))
            .await;
        engine.handle(event(WatchEvent::InitDone)).await;
        assert_eq!(publisher.pending(), 0, "withdrawn on unknown content");
        assert_eq!(
            publisher
                .published(&ServiceKey::new("public", "DEFAULT_GROUP", "orders"))
                .map(|s| s.len()),
            Some(1)
        );
        token.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn ready_after_every_source_listed_and_every_set_applied_and_totals_follow() {
        let recorder = Recorder::default();
        let token = CancellationToken::new();
        let (mut engine, publisher) = engine(&recorder, &token);
        let source = (ClusterId("a".into()), "public".to_owned());
        engine.sources.insert(
            source,
            crate::cluster::Client::start(
                crate::cluster::ClientConfig::new("a", vec!["127.0.0.1:1".into()], "public"),
                &token,
            )
            .expect("client"),
        );
        let telemetry = engine.telemetry.clone();
        engine.check_ready();
        assert!(!telemetry.is_ready(), "ready before any listing");
        let two = ServiceSnapshot {
            instances: vec![Instance::new("10.0.0.1", 80), Instance::new("10.0.0.2", 80)],
            ..ServiceSnapshot::empty(ServiceKey::new("public", "DEFAULT_GROUP", "orders"))
        };
        engine.handle(event(WatchEvent::Init)).await;
        engine.handle(event(WatchEvent::InitSnapshot(two))).await;
        engine.handle(event(WatchEvent::InitDone)).await;
        applied(&publisher, 1).await;
        engine.check_ready();
        assert!(telemetry.is_ready());
        let route = &telemetry.status().routes["a -> b"];
        assert_eq!((route.services, route.replicas), (1, 2));
        engine
            .handle(event(WatchEvent::Removed(ServiceKey::new(
                "public",
                "DEFAULT_GROUP",
                "orders",
            ))))
            .await;
        let route = &telemetry.status().routes["a -> b"];
        assert_eq!((route.services, route.replicas), (0, 0));
        token.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn the_policy_decides_what_is_copied() {
        struct NotCanary;
        impl Policy for NotCanary {
            fn admits(&self, _: &Route, _: &ServiceKey, native: &Instance) -> bool {
                !native.metadata.contains_key("canary")
            }
        }
        let recorder = Recorder::default();
        let token = CancellationToken::new();
        let (mut engine, publisher) = engine(&recorder, &token);
        engine.policy = Arc::new(NotCanary);
        let snapshot = ServiceSnapshot {
            instances: vec![
                Instance::new("10.0.0.1", 80),
                Instance::new("10.0.0.2", 80).with_metadata("canary", "1"),
            ],
            ..ServiceSnapshot::empty(ServiceKey::new("public", "DEFAULT_GROUP", "orders"))
        };
        engine.handle(event(WatchEvent::Snapshot(snapshot))).await;
        applied(&publisher, 1).await;
        let published = publisher
            .published(&ServiceKey::new("public", "DEFAULT_GROUP", "orders"))
            .unwrap_or_default();
        assert_eq!(
            published.iter().map(|i| i.ip.as_str()).collect::<Vec<_>>(),
            vec!["10.0.0.1"]
        );
        token.cancel();
    }
}
