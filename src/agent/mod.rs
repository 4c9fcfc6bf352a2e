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

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cluster::{Client, ClientConfig, ClientError};
use crate::config::{ClusterSpec, Config};
use crate::model::{ClusterId, ServiceKey};
use crate::reconcile::{Policy, ReplicateAll};
use crate::runtime::Tasks;
use crate::status::{StatusError, StatusServer};
use crate::telemetry::{Event, Telemetry};

mod diff;
mod drill;
mod engine;
mod reload;
mod wiring;
pub use diff::{DiffError, DiffReport, ServiceDiff, diff};
pub use drill::Drills;
pub use engine::RouteChanges;
use engine::{Engine, SourceEvent};
pub use reload::{ReloadError, ReloadReport, Reloader};
use wiring::Wiring;

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
    reloader: Reloader,
    reloads: mpsc::Receiver<reload::Request>,
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
        let (reloader, reloads) = Reloader::channel();
        Self {
            config,
            policy: Arc::new(ReplicateAll),
            telemetry: Telemetry::new(),
            status: None,
            grace: DEFAULT_SHUTDOWN_GRACE,
            reloader,
            reloads,
            drills: None,
        }
    }

    /// A handle that switches the running agent to a new configuration
    /// (live reload: see [`Reloader::reload`]). Take it before [`Agent::run`].
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
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

    /// Wires everything on `tasks` and runs the engine (and the reloads)
    /// until they are cancelled.
    async fn serve(self, tasks: &Tasks) -> Result<(), AgentError> {
        let Agent {
            config,
            policy,
            telemetry,
            status,
            grace: _,
            reloader: _,
            reloads,
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
        // A small buffer: a snapshot waiting here is a copy of a whole
        // service; the engine keeps up, and backpressure reaches the watchers.
        let (events_tx, events) = mpsc::channel::<SourceEvent>(128);
        // A drill's gate goes between the watchers and the engine.
        let events = match &drills {
            Some(d) => d.gate(events, tasks),
            None => events,
        };
        let mut wiring = Wiring::new(policy.clone(), telemetry.clone(), tasks.clone(), events_tx);
        wiring.drills = drills;
        let config = Arc::new(config);
        let (rewire, pending) = wiring.prepare(config.clone())?;
        info!(
            sources = rewire.sources.len(),
            destinations = rewire.publishers.len(),
            routes = config.routes.len(),
            "agent running"
        );
        let engine = Engine::new(policy, telemetry, tasks.clone(), rewire);
        wiring.commit(pending);
        let (control_tx, control) = mpsc::channel(1);
        let reloading = reload::serve(wiring, config, reloads, control_tx, tasks.token().clone());
        tokio::join!(engine.run(events, control), reloading);
        Ok(())
    }
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
