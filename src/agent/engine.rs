//! The engine: one task owns the replication state, so the rules run
//! single-threaded on full snapshots. Per destination service it keeps,
//! for every source feeding it, the desired replicas, and publishes their
//! union (Nacos keeps one slot per connection and service, so two sources
//! that land in the same destination service must share one batch).
//!
//! It never waits on the network: publishing is a queue handed to each
//! destination's publisher, and a withdrawal the mass-withdrawal guard holds
//! back is confirmed by a fresh query in a task of its own, whose answer
//! comes back as an event (a requeue, as kube-runtime's controller does), so
//! a slow source delays no other service.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::wiring::Rewire;
use super::{Endpoint, ServiceAt};
use crate::cluster::ClientError;
use crate::cluster::watch::WatchEvent;
use crate::config::{Config, SourceLoss};
use crate::model::{ClusterId, InstanceSet, ServiceKey, ServiceSnapshot};
use crate::reconcile::plan::canonical;
use crate::reconcile::publish::Publisher;
use crate::reconcile::{Decision, Guard, Policy, Route, Skipped, decide, desired_with};
use crate::runtime::{Tasks, sleep_until_or_never, ticker};
use crate::telemetry::Telemetry;

/// An event from one source cluster namespace, and when it was received.
pub(super) struct SourceEvent {
    pub(super) cluster: ClusterId,
    pub(super) namespace: String,
    /// Which watcher of the namespace sent it: after a reload restarts a
    /// watcher, what its predecessor still had in flight is ignored.
    pub(super) generation: u64,
    pub(super) event: WatchEvent,
    pub(super) received: Instant,
}

/// A fresh read of one source service, for the mass-withdrawal guard. The
/// agent makes it from the source's client; tests from anything.
pub(super) type Query = Arc<
    dyn Fn(ServiceKey) -> BoxFuture<'static, Result<ServiceSnapshot, ClientError>> + Send + Sync,
>;

/// A source namespace as the engine reads it: a fresh query, and the
/// generation of its current watcher.
#[derive(Clone)]
pub(super) struct SourceRead {
    pub(super) query: Query,
    pub(super) generation: u64,
}

/// A request to the running engine.
pub(super) enum Control {
    /// Switch to a reloaded configuration; the answer says what changed.
    Rewire(Rewire, oneshot::Sender<RouteChanges>),
}

/// The routes a reload added and removed (a changed route is both).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteChanges {
    /// Routes that start now.
    pub added: Vec<Route>,
    /// Routes whose replicas were withdrawn.
    pub removed: Vec<Route>,
    /// Routes that kept running as they were.
    pub unchanged: usize,
}

/// The answer to a confirmation, back in the engine.
pub(super) struct Confirmation {
    source: ClusterId,
    service: ServiceKey,
    id: u64,
    answer: Result<ServiceSnapshot, ClientError>,
}

/// A confirmation on its way: which routes wait for it.
struct Confirming {
    id: u64,
    routes: Vec<Route>,
    received: Option<Instant>,
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
                // Exactly one more: a vector grown by `push` starts at four
                // entries, three of them empty for nearly every service.
                self.0.reserve_exact(1);
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

/// How often readiness is checked until the first full sync is done.
const READINESS_CHECK: Duration = Duration::from_millis(200);

/// Replication state, owned by one task.
pub(super) struct Engine {
    config: Arc<Config>,
    policy: Arc<dyn Policy>,
    telemetry: Telemetry,
    publishers: HashMap<Endpoint, Publisher>,
    /// Each source namespace, and how to read one of its services afresh.
    sources: HashMap<Endpoint, SourceRead>,
    /// Where confirmation queries run, and where their answers come back.
    tasks: Tasks,
    answers: (
        mpsc::UnboundedSender<Confirmation>,
        mpsc::UnboundedReceiver<Confirmation>,
    ),
    /// Held-back withdrawals waiting for their fresh query, per source service.
    confirming: HashMap<ServiceAt, Confirming>,
    next_confirmation: u64,
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
    pub(super) fn new(
        policy: Arc<dyn Policy>,
        telemetry: Telemetry,
        tasks: Tasks,
        wiring: Rewire,
    ) -> Self {
        Engine {
            config: wiring.config,
            policy,
            telemetry,
            publishers: wiring.publishers,
            sources: wiring.sources,
            tasks,
            answers: mpsc::unbounded_channel(),
            confirming: HashMap::new(),
            next_confirmation: 0,
            state: HashMap::new(),
            totals: HashMap::new(),
            listing: HashMap::new(),
            listed: HashSet::new(),
            lost: HashMap::new(),
            ready: false,
        }
    }

    /// Runs until the tasks are cancelled: source events, reloads,
    /// confirmation answers, hold expiries and the readiness check, one at a
    /// time, none of them awaiting the network.
    pub(super) async fn run(
        mut self,
        mut events: mpsc::Receiver<SourceEvent>,
        mut control: mpsc::Receiver<Control>,
    ) {
        let mut readiness = ticker(READINESS_CHECK);
        let token = self.tasks.token().clone();
        // No source left (or none to begin with): idle, ready, until cancelled.
        let mut sources_open = true;
        let mut control_open = true;
        loop {
            let next_expiry = self.lost.values().min().copied();
            tokio::select! {
                // Shutdown: the owner then waits for every task; closing the
                // connections makes Nacos remove the replicas they owned.
                () = token.cancelled() => break,
                event = events.recv(), if sources_open => match event {
                    Some(e) => self.handle(e),
                    None => sources_open = false,
                },
                request = control.recv(), if control_open => match request {
                    Some(Control::Rewire(wiring, reply)) => {
                        let _ = reply.send(self.rewire(wiring));
                    }
                    None => control_open = false,
                },
                Some(answer) = self.answers.1.recv() => self.confirmed(answer),
                // A lost source's hold time is over.
                () = sleep_until_or_never(next_expiry) => self.expire_holds(),
                _ = readiness.tick(), if !self.ready => self.check_ready(),
            }
        }
    }

    /// Ready once every source has listed in full and every destination has
    /// taken all it was sent.
    fn check_ready(&mut self) {
        let all_listed = self.sources.keys().all(|s| self.listed.contains(s));
        if all_listed && self.publishers.values().all(Publisher::settled) {
            self.ready = true;
            self.telemetry.ready();
        }
    }

    pub(super) fn handle(&mut self, e: SourceEvent) {
        let source = (e.cluster.clone(), e.namespace.clone());
        if self.sources.get(&source).map(|s| s.generation) != Some(e.generation) {
            // A watcher a reload replaced, or a source no route reads now.
            return;
        }
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
                self.apply_snapshot(&e.cluster, &s, received);
            }
            WatchEvent::InitUnknown(key) => {
                // Listed, content unknown: keep what we had for it.
                self.listing
                    .entry((e.cluster.clone(), e.namespace.clone()))
                    .or_default()
                    .push(key);
            }
            WatchEvent::Snapshot(s) => self.apply_snapshot(&e.cluster, &s, received),
            WatchEvent::Removed(key) => {
                let empty = ServiceSnapshot::empty(key);
                self.apply_snapshot(&e.cluster, &empty, received);
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
                        *c == e.cluster && *key.namespace == *e.namespace && !listed.contains(key)
                    })
                    .map(|(_, key)| key.clone())
                    .collect();
                for key in stale {
                    let empty = ServiceSnapshot::empty(key);
                    self.apply_snapshot(&e.cluster, &empty, received);
                }
                self.telemetry
                    .listed(&e.cluster, &e.namespace, listed.len());
                self.listed.insert(source);
            }
            WatchEvent::Lost => {
                let source = (e.cluster.clone(), e.namespace.clone());
                match self.config.timings.source_loss {
                    SourceLoss::Withdraw => {
                        self.telemetry.source_lost(&e.cluster, &e.namespace, None);
                        self.withdraw_source(&source);
                    }
                    SourceLoss::Hold => {
                        let hold = self.config.timings.hold_for;
                        self.telemetry
                            .source_lost(&e.cluster, &e.namespace, Some(hold));
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
            self.telemetry.hold_expired(&source.0, &source.1);
            self.withdraw_source(&source);
        }
    }

    /// Switches to a reloaded configuration. A route that is gone (or
    /// changed: it is gone, and its new form added) withdraws what it
    /// contributed, guard off, through the publishers that hold it; a
    /// destination with a new connection gets its whole desired state again;
    /// what is kept stays as it is, so its replicas see no gap. Added routes
    /// fill in as their sources' new watchers list.
    pub(super) fn rewire(&mut self, wiring: Rewire) -> RouteChanges {
        let (old, new) = (&self.config.routes, &wiring.config.routes);
        let removed: Vec<Route> = old.iter().filter(|r| !new.contains(r)).cloned().collect();
        let added: Vec<Route> = new.iter().filter(|r| !old.contains(r)).cloned().collect();
        let unchanged = new.len() - added.len();
        for route in &removed {
            self.withdraw_route(route);
            self.totals
                .remove(&(route.source().clone(), route.destination().clone()));
            self.telemetry
                .route_removed(route.source(), route.destination());
        }
        self.config = wiring.config;
        self.publishers = wiring.publishers;
        self.sources = wiring.sources;
        let sources = &self.sources;
        self.lost.retain(|at, _| sources.contains_key(at));
        self.listing.retain(|at, _| sources.contains_key(at));
        self.listed.retain(|at| sources.contains_key(at));
        self.confirming
            .retain(|(c, k), _| sources.contains_key(&(c.clone(), k.namespace.to_string())));
        for at in &wiring.fresh {
            self.resubmit(at);
        }
        RouteChanges {
            added,
            removed,
            unchanged,
        }
    }

    /// Withdraws everything `route` contributed. Routes are unique per
    /// (source, destination), so that is every contribution from its source
    /// cluster to a service of its destination cluster.
    fn withdraw_route(&mut self, route: &Route) {
        let services: Vec<ServiceKey> = self
            .state
            .iter()
            .filter(|((dest, _), _)| dest == route.destination())
            .flat_map(|(_, by_source)| by_source.keys())
            .filter(|(c, _)| c == route.source())
            .map(|(_, key)| key.clone())
            .collect();
        for key in services {
            let empty = ServiceSnapshot::empty(key);
            let _ = self.update(route, &empty, &Guard::disabled(), None);
        }
    }

    /// Submits the desired state of every service in one destination
    /// namespace (to a publisher that starts empty).
    fn resubmit(&mut self, at: &Endpoint) {
        let Some(publisher) = self.publishers.get(at) else {
            return;
        };
        for ((cluster, service), by_source) in &self.state {
            if *cluster == at.0 && *service.namespace == *at.1 {
                publisher.submit_set(service.clone(), by_source.union(), None);
            }
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
            .filter(|(c, key)| *c == source.0 && *key.namespace == *source.1)
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
    fn apply_snapshot(
        &mut self,
        source: &ClusterId,
        snapshot: &ServiceSnapshot,
        received: Option<Instant>,
    ) {
        // The configuration is shared, not borrowed from self: no route is
        // copied for the update to run (this runs for every change).
        let config = Arc::clone(&self.config);
        let at = || (source.clone(), snapshot.service.clone());
        for route in config.routes.iter().filter(|r| r.source() == source) {
            match self.update(route, snapshot, &config.guard, received) {
                Some((published, removing)) => {
                    // Mass-withdrawal guard: believe it only if a fresh query agrees.
                    warn!(route = %route, service = %snapshot.service, published, removing, "large withdrawal; confirming with a fresh query");
                    self.confirm(&at(), route.clone(), received);
                }
                None if !self.confirming.is_empty() => {
                    // Newer news went through: an answer still on its way
                    // is older than it and no longer applies to this route.
                    if let Some(c) = self.confirming.get_mut(&at()) {
                        c.routes.retain(|r| r != route);
                    }
                }
                None => {}
            }
        }
    }

    /// Asks the source for a fresh read of the service, in a task of its
    /// own; one query per source service at a time, shared by its routes.
    fn confirm(&mut self, at: &ServiceAt, route: Route, received: Option<Instant>) {
        if let Some(c) = self.confirming.get_mut(at) {
            if !c.routes.contains(&route) {
                c.routes.push(route);
            }
            return;
        }
        let (source, service) = at;
        let Some(SourceRead { query, .. }) = self
            .sources
            .get(&(source.clone(), service.namespace.to_string()))
        else {
            warn!(route = %route, service = %service, "no client for the source namespace; replicas kept");
            return;
        };
        self.next_confirmation += 1;
        let id = self.next_confirmation;
        self.confirming.insert(
            at.clone(),
            Confirming {
                id,
                routes: vec![route],
                received,
            },
        );
        let asked = query(service.clone());
        let answers = self.answers.0.clone();
        let token = self.tasks.token().clone();
        let (source, service) = (source.clone(), service.clone());
        let name = format!("confirm {source}/{service}");
        self.tasks.spawn(name, async move {
            let answer = tokio::select! {
                () = token.cancelled() => return,
                answer = asked => answer,
            };
            // The engine may have stopped meanwhile: then nobody needs it.
            let _ = answers.send(Confirmation {
                source,
                service,
                id,
                answer,
            });
        });
    }

    /// A fresh read came back: apply it, guard off, to the routes that still
    /// wait for it; on failure keep the replicas and say so.
    pub(super) fn confirmed(&mut self, c: Confirmation) {
        let at = (c.source, c.service);
        if self.confirming.get(&at).is_none_or(|w| w.id != c.id) {
            return;
        }
        let Some(waiting) = self.confirming.remove(&at) else {
            return;
        };
        let (source, service) = at;
        match c.answer {
            Ok(fresh) => {
                for route in &waiting.routes {
                    let _ = self.update(route, &fresh, &Guard::disabled(), waiting.received);
                }
            }
            // Not believed without a fresh read: the replicas stay.
            Err(e) => {
                let message = format!("{service}: {e}; replicas kept");
                self.telemetry
                    .error(&source, "confirm", e.kind(), message, false);
            }
        }
    }

    /// The next confirmation answer (tests drive the engine by hand).
    #[cfg(test)]
    pub(super) async fn next_answer(&mut self) -> Option<Confirmation> {
        self.answers.1.recv().await
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
            // An unchanged contribution (a repeated push, a relisting) keeps
            // the set already held: that one is shared with the publisher's
            // queue and the client's redo record, a fresh equal copy would
            // not be, and would double the replicas kept for the service.
            let replicas = match by_source.get(&source_key) {
                Some(held) if **held == *d.replicas => held.clone(),
                _ => d.replicas.into(),
            };
            by_source.insert(source_key.clone(), replicas)
        };
        let before = previous.as_ref().map(|p| p.len());
        let union = by_source.union();
        if by_source.is_empty() {
            self.state.remove(&dest_service);
        }
        let endpoint = (route.destination().clone(), d.service.namespace.to_string());
        let Some(publisher) = self.publishers.get(&endpoint) else {
            warn!(route = %route, service = %d.service, "no publisher for the destination namespace");
            return None;
        };
        let intended = publisher.intended(&d.service).unwrap_or_default();
        let decided = if Arc::ptr_eq(&intended, &union) {
            // The very set the publisher has: nothing to compare.
            Decision::Unchanged
        } else {
            // The union is canonical and is what gets queued: compared in place.
            decide(&union, &intended, guard)
        };
        let held_back = match decided {
            Decision::Unchanged => None,
            Decision::Publish => {
                publisher.submit_set(d.service.clone(), union, received);
                None
            }
            Decision::Withdraw => {
                publisher.submit_set(d.service.clone(), InstanceSet::default(), received);
                None
            }
            Decision::Confirm {
                published,
                removing,
            } => {
                self.restore(&dest_service, &source_key, previous);
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

    /// Puts back a contribution the guard held back (or removes the new one).
    fn restore(&mut self, dest: &ServiceAt, source: &ServiceAt, previous: Option<InstanceSet>) {
        let by_source = self.state.entry(dest.clone()).or_default();
        match previous {
            Some(p) => {
                by_source.insert(source.clone(), p);
            }
            None => {
                by_source.remove(source);
            }
        }
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
mod tests;
