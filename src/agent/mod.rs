//! The composition root: clients, watchers, the engine, publishers and the
//! status server, wired from a [`Config`] and run until a cancellation token
//! fires; then every task they started is waited for (see [`Agent::run`]).
//!
//! The replication rules run in the engine (`engine.rs`), one task that
//! owns the state and never waits on the network.
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
//! A DR drill ([`Agent::with_drills`], `drill/`) treats one source as lost
//! for a while, through the same code path as a real outage.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cluster::watch::{WatchConfig, watch};
use crate::cluster::{Client, ClientConfig, ClientError, ConnectionState};
use crate::config::{ClusterSpec, Config};
use crate::model::{ClusterId, Instance, ServiceKey};
use crate::reconcile::publish::{Owned, Publisher, PublisherConfig};
use crate::reconcile::{Policy, ReplicateAll, Route};
use crate::runtime::Tasks;
use crate::status::{StatusError, StatusServer};
use crate::telemetry::{Event, Telemetry};

mod diff;
mod drill;
mod engine;
pub use diff::{DiffError, DiffReport, ServiceDiff, diff};
pub use drill::Drills;
use engine::{Engine, Query, SourceEvent};

/// How long [`Agent::run`] waits, once cancelled, for its tasks to end
/// before it aborts the rest: enough to close every connection cleanly,
/// well inside Kubernetes' default 30 s termination grace.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

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
    grace: Duration,
    drills: Option<Drills>,
}

/// A cluster namespace.
type Endpoint = (ClusterId, String);
/// A service on a given cluster.
type ServiceAt = (ClusterId, ServiceKey);

impl Agent {
    /// An agent for `config`, replicating everything its routes cover,
    /// serving no status port.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            policy: Arc::new(ReplicateAll),
            telemetry: Telemetry::new(),
            status: None,
            grace: DEFAULT_SHUTDOWN_GRACE,
            drills: None,
        }
    }

    /// How long [`Agent::run`] waits for its tasks once cancelled
    /// (default [`DEFAULT_SHUTDOWN_GRACE`]).
    pub fn with_shutdown_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
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

    /// Lets this agent run DR drills ([`Agent::drills`]), and serves them
    /// as `/drill` on the status server, if any. Starting or ending one
    /// there needs `Authorization: Bearer <token>` when `token` is set;
    /// without one, only on a loopback address (elsewhere it is refused).
    pub fn with_drills(mut self, token: Option<String>) -> Self {
        self.drills = Some(Drills::new(self.telemetry.clone(), token));
        self
    }

    /// The drills of this agent, with [`Agent::with_drills`].
    pub fn drills(&self) -> Option<Drills> {
        self.drills.clone()
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

    /// Runs until `shutdown` is cancelled, then stops every task it started
    /// and waits for them: when this returns, every connection is closed
    /// (so the destinations have dropped this agent's replicas, which live
    /// only as long as their connection) and the status port is released.
    /// Tasks still running after the grace period are aborted and logged.
    ///
    /// An agent whose configuration has no routes replicates nothing and
    /// runs, ready, until cancelled: an empty file is a valid (if idle)
    /// state, as it will be for a live reload that removes the last route.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AgentError> {
        let tasks = Tasks::new(shutdown.child_token());
        let grace = self.grace;
        let result = self.serve(&tasks).await;
        let report = tasks.shutdown(grace).await;
        if report.aborted.is_empty() {
            info!("agent stopped");
        } else {
            warn!(?grace, tasks = ?report.aborted, "tasks still running after the grace period were aborted");
        }
        result
    }

    /// Wires everything on `tasks` and runs the engine until they are cancelled.
    async fn serve(self, tasks: &Tasks) -> Result<(), AgentError> {
        let Agent {
            config,
            policy,
            telemetry,
            status,
            grace: _,
            drills,
        } = self;
        if let Some(addr) = status {
            let server = StatusServer::bind(addr, telemetry.clone())
                .await?
                .with_control(drills.as_ref().map(Drills::control));
            info!(addr = %server.local_addr().unwrap_or(addr), "status server listening");
            let stop = tasks.token().clone();
            tasks.spawn("status server", async move {
                if let Err(e) = server.serve(stop).await {
                    warn!(error = %e, "status server stopped");
                }
            });
        }
        let config = Arc::new(config);
        let wiring = wire(&config, &telemetry, tasks)?;
        let events = watch_sources(&config, &policy, &wiring.sources, tasks);
        info!(
            sources = wiring.sources.len(),
            destinations = wiring.publishers.len(),
            routes = config.routes.len(),
            "agent running"
        );
        let queries = wiring
            .sources
            .iter()
            .map(|(at, client)| (at.clone(), query_of(client)))
            .collect();
        // A drill's gate goes between the watchers and the engine.
        let (events, queries) = match &drills {
            Some(d) => d.attach(&config, &wiring, events, queries, tasks),
            None => (events, queries),
        };
        let engine = Engine::new(
            config,
            policy,
            telemetry,
            wiring.publishers,
            queries,
            tasks.clone(),
        );
        engine.run(events).await;
        Ok(())
    }
}

/// The clients an agent needs: one publisher per destination cluster
/// namespace a route can land in, one source per namespace a route reads.
struct Wiring {
    publishers: HashMap<Endpoint, Publisher>,
    sources: HashMap<Endpoint, Client>,
}

/// Starts a client per cluster namespace the routes touch (shared between a
/// source and a destination on the same one) and a publisher per destination.
fn wire(config: &Arc<Config>, telemetry: &Telemetry, tasks: &Tasks) -> Result<Wiring, AgentError> {
    let mut clients: HashMap<Endpoint, Client> = HashMap::new();
    let mut client_for = |spec: &ClusterSpec, ns: &str| -> Result<Client, AgentError> {
        let key = (spec.id.clone(), ns.to_owned());
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let c = start_client(config, spec, ns, tasks)?;
        report_connection(&c, telemetry, tasks);
        clients.insert(key, c.clone());
        Ok(c)
    };
    let mut wiring = Wiring {
        publishers: HashMap::new(),
        sources: HashMap::new(),
    };
    for route in &config.routes {
        let (Some(from), Some(to)) = (
            config.cluster(route.source()),
            config.cluster(route.destination()),
        ) else {
            continue;
        };
        for (ns, landing) in route.namespace_pairs(&from.namespaces) {
            let dest = (to.id.clone(), landing.clone());
            if let std::collections::hash_map::Entry::Vacant(slot) = wiring.publishers.entry(dest) {
                let client = client_for(to, &landing)?;
                let pc = publisher_config(config, &to.id, &landing, telemetry);
                slot.insert(Publisher::start(client, pc, tasks));
            }
            if let std::collections::hash_map::Entry::Vacant(slot) =
                wiring.sources.entry((from.id.clone(), ns.clone()))
            {
                slot.insert(client_for(from, &ns)?);
            }
        }
    }
    Ok(wiring)
}

/// One watcher per source namespace, following what its routes cover, and
/// one task per watcher stamping its events with their source and receipt
/// time into the engine's channel.
fn watch_sources(
    config: &Config,
    policy: &Arc<dyn Policy>,
    sources: &HashMap<Endpoint, Client>,
    tasks: &Tasks,
) -> mpsc::Receiver<SourceEvent> {
    // A small buffer: a snapshot waiting here is a copy of a whole service;
    // the engine keeps up, and backpressure reaches the watchers.
    let (events_tx, events) = mpsc::channel::<SourceEvent>(128);
    for ((cluster, ns), client) in sources {
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
        let mut rx = watch(client.clone(), filter, wc, tasks);
        let tx = events_tx.clone();
        let cluster = cluster.clone();
        let namespace = ns.clone();
        let span = tracing::info_span!("source", cluster = %cluster, namespace = %ns);
        let name = format!("source {cluster}/{ns} events");
        let forward = async move {
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
        };
        tasks.spawn(name, tracing::Instrument::instrument(forward, span));
    }
    events
}

/// A source client's fresh read of one service, for the engine's guard.
fn query_of(client: &Client) -> Query {
    let client = client.clone();
    Arc::new(move |key: ServiceKey| {
        let client = client.clone();
        Box::pin(async move { client.query(&key.group, &key.name).await })
    })
}

/// A client of one cluster namespace, configured from the file (servers,
/// gRPC offset, credentials, TLS, request timeout). The agent, `diff` and
/// `check --connect` all connect through it.
pub fn start_client(
    config: &Config,
    spec: &ClusterSpec,
    ns: &str,
    tasks: &Tasks,
) -> Result<Client, AgentError> {
    let mut cc = ClientConfig::new(spec.id.0.clone(), spec.servers.clone(), ns);
    cc.grpc_port_offset = spec.grpc_port_offset;
    cc.credentials = spec.credentials.clone();
    cc.session.tls = spec.tls.clone();
    cc.session.request_timeout = config.timings.request_timeout;
    Client::start(cc, tasks).map_err(|source| AgentError::Client {
        cluster: spec.id.clone(),
        namespace: ns.to_owned(),
        source: Box::new(source),
    })
}

/// Mirrors a client's connection state into the telemetry until it stops.
fn report_connection(client: &Client, telemetry: &Telemetry, tasks: &Tasks) {
    let mut states = client.state_stream();
    let mut info = client.server_info();
    let (cluster, namespace, t, token) = (
        client.cluster().clone(),
        client.namespace().to_owned(),
        telemetry.clone(),
        tasks.token().clone(),
    );
    let name = format!("connection report {cluster}/{namespace}");
    tasks.spawn(name, async move {
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
