//! What runs per cluster namespace (an endpoint): one client, a publisher
//! where a route lands, a watcher where routes read. Built from a
//! configuration and changed in place by a reload, in two steps: `prepare`
//! starts what the new configuration adds (so a failure changes nothing),
//! the engine switches over, then `commit` starts the new watchers and stops
//! what is no longer needed.
//!
//! An endpoint whose cluster settings and roles are unchanged keeps its
//! client, and so its connection and every replica published through it.
//! A cluster whose settings changed gets new clients (a new connection: its
//! replicas are published again through it). An endpoint that stops being a
//! destination also gets a new client, so that closing the old connection
//! removes whatever it still held, instead of leaving it published.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::engine::{Query, SourceEvent, SourceRead};
use super::{AgentError, Endpoint, start_client};
use crate::cluster::watch::{WatchConfig, watch};
use crate::cluster::{Client, ConnectionState};
use crate::config::{ClusterSpec, Config};
use crate::model::{ClusterId, Instance, ServiceKey};
use crate::reconcile::publish::{Owned, Publisher, PublisherConfig};
use crate::reconcile::{Policy, Route};
use crate::runtime::{Tasks, lock};
use crate::telemetry::Telemetry;

/// The clients, publishers and watchers of a running configuration.
pub(super) struct Wiring {
    policy: Arc<dyn Policy>,
    telemetry: Telemetry,
    tasks: Tasks,
    events: mpsc::Sender<SourceEvent>,
    endpoints: HashMap<Endpoint, Wired>,
    /// Per destination cluster: the origins routed into it, which its
    /// publishers' read-back counts as ours. Shared, so a reload updates it
    /// under running publishers.
    origins: HashMap<ClusterId, Arc<Mutex<HashSet<String>>>>,
    next_generation: u64,
    /// DR drills, told of every (re)wiring.
    pub(super) drills: Option<super::Drills>,
}

/// One endpoint's running parts, on a task family of its own.
struct Wired {
    spec: ClusterSpec,
    client: Client,
    tasks: Tasks,
    publisher: Option<Publisher>,
    watcher: Option<Watching>,
}

/// A running watcher: the routes its filter follows, and its generation
/// (the engine ignores events of an older one).
struct Watching {
    routes: Vec<Route>,
    generation: u64,
    tasks: Tasks,
}

/// What the engine takes over from a `prepare`.
pub(super) struct Rewire {
    pub(super) config: Arc<Config>,
    pub(super) publishers: HashMap<Endpoint, Publisher>,
    pub(super) sources: HashMap<Endpoint, SourceRead>,
    /// Destinations with a new publisher (a new connection), which get the
    /// whole desired state again.
    pub(super) fresh: HashSet<Endpoint>,
}

/// What `commit` does once the engine has switched over.
pub(super) struct Pending {
    config: Arc<Config>,
    /// Endpoints that are new or replaced.
    started: HashMap<Endpoint, Wired>,
    /// Publishers added on a kept endpoint.
    publishers: Vec<(Endpoint, Publisher)>,
    /// Watchers to (re)start: the routes and the generation.
    watchers: Vec<(Endpoint, Vec<Route>, u64)>,
    /// Kept endpoints that no route reads any more.
    watchers_stopped: Vec<Endpoint>,
    /// Endpoints no longer needed, or replaced.
    removed: Vec<Endpoint>,
}

/// What one endpoint is for under a configuration.
struct Need {
    spec: ClusterSpec,
    destination: bool,
    /// Routes reading from it, in file order.
    routes: Vec<Route>,
}

impl Wiring {
    /// Nothing running yet; the first `prepare` starts it all.
    pub(super) fn new(
        policy: Arc<dyn Policy>,
        telemetry: Telemetry,
        tasks: Tasks,
        events: mpsc::Sender<SourceEvent>,
    ) -> Self {
        Wiring {
            policy,
            telemetry,
            tasks,
            events,
            endpoints: HashMap::new(),
            origins: HashMap::new(),
            next_generation: 0,
            drills: None,
        }
    }

    /// Starts the clients and publishers `config` adds, and says what the
    /// engine should use from now on. On an error everything it started is
    /// stopped again and the running wiring is untouched.
    pub(super) fn prepare(&mut self, config: Arc<Config>) -> Result<(Rewire, Pending), AgentError> {
        let needs = needs(&config);
        let mut pending = Pending {
            config: config.clone(),
            started: HashMap::new(),
            publishers: Vec::new(),
            watchers: Vec::new(),
            watchers_stopped: Vec::new(),
            removed: Vec::new(),
        };
        let mut rewire = Rewire {
            config: config.clone(),
            publishers: HashMap::new(),
            sources: HashMap::new(),
            fresh: HashSet::new(),
        };
        for (at, need) in &needs {
            if let Err(e) = self.prepare_one(&config, at, need, &mut rewire, &mut pending) {
                for wired in pending.started.values() {
                    wired.tasks.token().cancel();
                }
                return Err(e);
            }
        }
        pending.removed = self
            .endpoints
            .keys()
            .filter(|at| !needs.contains_key(*at) || pending.started.contains_key(*at))
            .cloned()
            .collect();
        if let Some(drills) = &self.drills {
            let client = |at: &Endpoint| pending.started.get(at).or(self.endpoints.get(at));
            let clients = rewire
                .sources
                .keys()
                .filter_map(|at| Some((at.clone(), client(at)?.client.clone())))
                .collect();
            drills.rewire(&mut rewire, clients);
        }
        Ok((rewire, pending))
    }

    fn prepare_one(
        &mut self,
        config: &Config,
        at: &Endpoint,
        need: &Need,
        rewire: &mut Rewire,
        pending: &mut Pending,
    ) -> Result<(), AgentError> {
        let kept = self
            .endpoints
            .get(at)
            // Same settings, and not a destination that stops being one.
            .filter(|w| w.spec == need.spec && (need.destination || w.publisher.is_none()))
            .map(|w| {
                let watching = w.watcher.as_ref().map(|x| (x.routes.clone(), x.generation));
                (
                    w.client.clone(),
                    w.tasks.clone(),
                    w.publisher.clone(),
                    watching,
                )
            });
        let (client, publisher, watching) = match kept {
            Some((client, tasks, publisher, watching)) => {
                let publisher = match (publisher, need.destination) {
                    (Some(p), _) => Some(p),
                    (None, true) => {
                        let p = self.start_publisher(config, &client, at, &tasks);
                        pending.publishers.push((at.clone(), p.clone()));
                        rewire.fresh.insert(at.clone());
                        Some(p)
                    }
                    (None, false) => None,
                };
                (client, publisher, watching)
            }
            None => {
                let tasks = self.tasks.child();
                let client = start_client(config, &need.spec, &at.1, &tasks)?;
                report_connection(&client, &self.telemetry, &tasks);
                let publisher = need
                    .destination
                    .then(|| self.start_publisher(config, &client, at, &tasks));
                if publisher.is_some() {
                    rewire.fresh.insert(at.clone());
                }
                let wired = Wired {
                    spec: need.spec.clone(),
                    client: client.clone(),
                    tasks,
                    publisher: publisher.clone(),
                    watcher: None,
                };
                pending.started.insert(at.clone(), wired);
                (client, publisher, None)
            }
        };
        if let Some(p) = publisher {
            rewire.publishers.insert(at.clone(), p);
        }
        if need.routes.is_empty() {
            if watching.is_some() {
                pending.watchers_stopped.push(at.clone());
            }
            return Ok(());
        }
        let generation = match watching {
            Some((routes, generation)) if routes == need.routes => generation,
            _ => {
                self.next_generation += 1;
                pending
                    .watchers
                    .push((at.clone(), need.routes.clone(), self.next_generation));
                self.next_generation
            }
        };
        let query = query_of(&client);
        rewire
            .sources
            .insert(at.clone(), SourceRead { query, generation });
        Ok(())
    }

    /// Once the engine uses the new parts: stops the old ones, starts the
    /// new watchers and updates which origins each destination owns.
    pub(super) fn commit(&mut self, pending: Pending) {
        for at in &pending.removed {
            if let Some(old) = self.endpoints.remove(at) {
                old.tasks.token().cancel();
            }
            if !pending.started.contains_key(at) {
                self.telemetry.endpoint_removed(&at.0, &at.1);
            }
        }
        self.endpoints.extend(pending.started);
        for (at, publisher) in pending.publishers {
            if let Some(w) = self.endpoints.get_mut(&at) {
                w.publisher = Some(publisher);
            }
        }
        for at in &pending.watchers_stopped {
            if let Some(old) = self.endpoints.get_mut(at).and_then(|w| w.watcher.take()) {
                old.tasks.token().cancel();
            }
        }
        for (at, routes, generation) in pending.watchers {
            self.start_watcher(&pending.config, &at, routes, generation);
        }
        for (cluster, origins) in &self.origins {
            *lock(origins) = origins_into(&pending.config, cluster);
        }
    }

    fn start_publisher(
        &mut self,
        config: &Config,
        client: &Client,
        at: &Endpoint,
        tasks: &Tasks,
    ) -> Publisher {
        let origins = self
            .origins
            .entry(at.0.clone())
            .or_insert_with(|| Arc::new(Mutex::new(origins_into(config, &at.0))))
            .clone();
        let tags = config.tags.clone();
        let owned = Owned(Arc::new(move |i: &Instance| {
            tags.origin_of(i)
                .is_some_and(|o| lock(&origins).contains(o))
        }));
        let pc = PublisherConfig {
            cluster: at.0.clone(),
            namespace: at.1.clone(),
            max_per_second: config.timings.max_publishes_per_second,
            max_in_flight: config.timings.max_publishes_in_flight,
            read_back: Some(config.timings.resync_interval),
            owned,
            telemetry: self.telemetry.clone(),
            ..PublisherConfig::default()
        };
        Publisher::start(client.clone(), pc, tasks)
    }

    /// A watcher following what `routes` cover, stamping its events with
    /// their source, generation and receipt time into the engine's channel.
    /// It replaces the endpoint's previous watcher.
    fn start_watcher(
        &mut self,
        config: &Config,
        at: &Endpoint,
        routes: Vec<Route>,
        generation: u64,
    ) {
        let Some(wired) = self.endpoints.get_mut(at) else {
            return;
        };
        if let Some(old) = wired.watcher.take() {
            old.tasks.token().cancel();
        }
        let tasks = wired.tasks.child();
        let follows = self.policy.clone();
        let filter_routes = routes.clone();
        let filter = Arc::new(move |k: &ServiceKey| {
            filter_routes
                .iter()
                .any(|r| r.covers(k) && follows.follows(r, k))
        });
        let wc = WatchConfig {
            list_interval: config.timings.list_interval,
            probe_interval: Some(config.timings.probe_interval).filter(|d| !d.is_zero()),
            resync_interval: Some(config.timings.resync_interval),
            reads_in_flight: config.timings.max_reads_in_flight,
            ..WatchConfig::default()
        };
        let mut rx = watch(wired.client.clone(), filter, wc, &tasks);
        let tx = self.events.clone();
        let (cluster, namespace) = at.clone();
        let span = tracing::info_span!("source", cluster = %cluster, namespace = %namespace);
        let name = format!("source {cluster}/{namespace} events");
        let forward = async move {
            while let Some(event) = rx.recv().await {
                let e = SourceEvent {
                    cluster: cluster.clone(),
                    namespace: namespace.clone(),
                    generation,
                    event,
                    received: Instant::now(),
                };
                if tx.send(e).await.is_err() {
                    return;
                }
            }
        };
        tasks.spawn(name, tracing::Instrument::instrument(forward, span));
        wired.watcher = Some(Watching {
            routes,
            generation,
            tasks,
        });
    }
}

/// Every endpoint `config`'s routes touch, and what for.
fn needs(config: &Config) -> HashMap<Endpoint, Need> {
    fn need<'a>(
        needs: &'a mut HashMap<Endpoint, Need>,
        spec: &ClusterSpec,
        ns: &str,
    ) -> &'a mut Need {
        needs
            .entry((spec.id.clone(), ns.to_owned()))
            .or_insert_with(|| Need {
                spec: spec.clone(),
                destination: false,
                routes: Vec::new(),
            })
    }
    let mut needs: HashMap<Endpoint, Need> = HashMap::new();
    for route in &config.routes {
        let (Some(from), Some(to)) = (
            config.cluster(route.source()),
            config.cluster(route.destination()),
        ) else {
            continue;
        };
        for (ns, landing) in route.namespace_pairs(&from.namespaces) {
            need(&mut needs, to, &landing).destination = true;
            let reads = &mut need(&mut needs, from, &ns).routes;
            if !reads.contains(route) {
                reads.push(route.clone());
            }
        }
    }
    needs
}

/// Which instances shown in `destination` this agent could have written
/// under `config`: tagged with the origin of a route into it (for `diff`).
pub(super) fn owned_by_routes_into(
    config: &Config,
    destination: &ClusterId,
) -> Arc<dyn Fn(&Instance) -> bool + Send + Sync> {
    let origins = origins_into(config, destination);
    let tags = config.tags.clone();
    Arc::new(move |i: &Instance| tags.origin_of(i).is_some_and(|o| origins.contains(o)))
}

/// The origins of the routes into `destination`.
fn origins_into(config: &Config, destination: &ClusterId) -> HashSet<String> {
    config
        .routes
        .iter()
        .filter(|r| r.destination() == destination)
        .map(|r| r.source().0.clone())
        .collect()
}

/// A source client's fresh read of one service, for the engine's guard.
fn query_of(client: &Client) -> Query {
    let client = client.clone();
    Arc::new(move |key: ServiceKey| {
        let client = client.clone();
        Box::pin(async move { client.query(&key.group, &key.name).await })
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
                // Stopped first: a reload that left the endpoint has removed its entries.
                biased;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        crate::config::parse(std::path::Path::new("t.toml"), text, &|_| None).expect("valid")
    }

    const CLUSTERS: &str = "[[clusters]]\nid = \"a\"\nservers = [\"h:1\"]\n\
        [[clusters]]\nid = \"b\"\nservers = [\"h:2\"]\n\
        [[clusters]]\nid = \"c\"\nservers = [\"h:3\"]\n";

    #[test]
    fn needs_name_each_endpoint_with_its_roles() {
        let c = config(&format!(
            "{CLUSTERS}[[routes]]\nfrom = \"a\"\nto = \"c\"\n[[routes]]\nfrom = \"b\"\nto = \"c\"\n\
             [[routes]]\nfrom = \"c\"\nto = \"a\"\n"
        ));
        let n = needs(&c);
        let at = |id: &str| (ClusterId(id.into()), "public".to_owned());
        assert_eq!(n.len(), 3);
        assert!(n[&at("a")].destination && n[&at("c")].destination);
        assert!(!n[&at("b")].destination);
        assert_eq!(n[&at("b")].routes.len(), 1);
        assert_eq!(n[&at("c")].routes[0].destination(), &ClusterId("a".into()));
        assert_eq!(
            origins_into(&c, &ClusterId("c".into())),
            HashSet::from(["a".to_owned(), "b".to_owned()])
        );
    }
}
