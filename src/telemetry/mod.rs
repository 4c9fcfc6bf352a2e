//! What the agent tells the outside world: Prometheus metrics with bounded
//! labels, a stream of named events for tooling, and the status document
//! behind `/status` and `/readyz`.
//!
//! One [`Telemetry`] per agent, cheap to clone, passed to whoever reports.
//! It never decides anything: the engine and the publishers call it after
//! they acted. Labels are cluster ids, namespaces, operations, outcomes and
//! error kinds, all bounded by the configuration; never a service name or
//! an address (those go to events and logs only).
//!
//! [`Telemetry`] lives here and feeds the three: `events` holds [`Event`],
//! `metrics` the Prometheus families and their bounded label sets, `status`
//! the [`Status`] document and the names of its entries.

mod events;
mod metrics;
mod status;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::broadcast;
use tracing::{debug, info, warn};

use crate::model::{ClusterId, ServiceKey};
use crate::runtime::lock;

pub use events::Event;
pub use status::{
    ConnectionStatus, DestinationStatus, ErrorRecord, LAG_WINDOW, RECENT_ERRORS, RouteStatus,
    SourceStatus, Status, unix_ms,
};

use metrics::{
    DriftLabels, EndpointLabels, ErrorLabels, Metrics, OutcomeLabels, RouteLabels, SkipLabels,
};
use status::{LagWindow, endpoint, now_ms, plus, route_name};

struct Inner {
    metrics: Metrics,
    events: broadcast::Sender<Event>,
    status: Mutex<Status>,
    /// Per destination endpoint, the recent lags behind its p99 (shared
    /// with that destination's [`PublisherMeters`]; the p99 is taken when
    /// the status is read, not on every change).
    lags: Mutex<HashMap<String, Arc<Mutex<LagWindow>>>>,
}

/// One destination's replica totals over all its services.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicaCounts {
    /// In the newest set given for each service.
    pub wanted: usize,
    /// In the last set the destination took for each service.
    pub acknowledged: usize,
}

/// What one destination read-back round found, in services.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoundTally {
    /// Services whose last comparison found drift (reported as
    /// [`Event::Drift`]), this round or an earlier one whose finding no
    /// comparison since has cleared.
    pub drifted: usize,
    /// Of those, queued again to repair them.
    pub repaired: usize,
    /// Could not be read.
    pub failed: usize,
}

/// One destination publisher's meters: its concurrency limit (the gauge
/// and `/status`), its ack times, its applied sets and their lag (the
/// histograms, the counter and the window behind `/status`'s p99). Taken once
/// per publisher, so an answer costs no label lookup and no allocation.
#[derive(Clone)]
pub struct PublisherMeters {
    telemetry: Telemetry,
    destination: ClusterId,
    namespace: String,
    endpoint: String,
    limit: Gauge,
    ack: Histogram,
    applied: Counter,
    lag: Histogram,
    window: Arc<Mutex<LagWindow>>,
}

impl std::fmt::Debug for PublisherMeters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublisherMeters")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl PublisherMeters {
    /// The publisher's concurrency limit is now `limit` (call on changes).
    pub fn limit(&self, limit: usize) {
        self.limit.set(i64::try_from(limit).unwrap_or(i64::MAX));
        self.telemetry
            .destination(&self.endpoint, |entry| entry.publish_limit = limit);
    }

    /// A set was acknowledged `took` after it was sent.
    pub fn acked(&self, took: Duration) {
        self.ack.observe(took.as_secs_f64());
    }

    /// The destination took the set of `replicas` instances for `service`,
    /// `lag` after the change behind it was seen (None for a set no change
    /// started, such as a repair).
    pub fn published(&self, service: &ServiceKey, replicas: usize, lag: Option<Duration>) {
        let (destination, namespace) = (&self.destination, self.namespace.as_str());
        debug!(%destination, namespace, %service, replicas, ?lag, "set applied");
        self.applied.inc();
        let lag_ms = lag.map(|l| {
            self.lag.observe(l.as_secs_f64());
            u64::try_from(l.as_millis()).unwrap_or(u64::MAX)
        });
        if let Some(ms) = lag_ms {
            lock(&self.window).add(ms);
        }
        self.telemetry.destination(&self.endpoint, |entry| {
            entry.applied += 1;
            if lag_ms.is_some() {
                entry.last_lag_ms = lag_ms;
            }
        });
        let destination = destination.clone();
        let service = service.clone();
        self.telemetry.emit(if replicas == 0 {
            Event::Withdrawn {
                destination,
                service,
                lag,
            }
        } else {
            Event::Replicated {
                destination,
                service,
                replicas,
                lag,
            }
        });
    }
}

/// Metrics, events and status of one agent. Cheap to clone.
#[derive(Clone)]
pub struct Telemetry {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("ready", &self.is_ready())
            .finish_non_exhaustive()
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    /// Fresh, with nothing reported yet. Events are kept for slow readers
    /// up to 4096 deep; a reader further behind is told how many it missed.
    pub fn new() -> Self {
        let status = Status {
            started_at_ms: now_ms(),
            ..Status::default()
        };
        Self {
            inner: Arc::new(Inner {
                metrics: Metrics::new(),
                events: broadcast::channel(4096).0,
                status: Mutex::new(status),
                lags: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// The metrics in the Prometheus text format.
    pub fn encode_metrics(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; an encoding error would be ours.
        if let Err(e) =
            prometheus_client::encoding::text::encode(&mut out, &self.inner.metrics.registry)
        {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        out
    }

    /// The current status document.
    pub fn status(&self) -> Status {
        let mut status = self.board().clone();
        for (name, window) in lock(&self.inner.lags).iter() {
            if let Some(entry) = status.destinations.get_mut(name) {
                entry.lag_p99_ms = lock(window).p99();
            }
        }
        status
    }

    /// Whether the first full sync is done.
    pub fn is_ready(&self) -> bool {
        self.board().ready
    }

    fn board(&self) -> MutexGuard<'_, Status> {
        lock(&self.inner.status)
    }

    /// Updates a destination's `/status` entry, made on first use (the
    /// name is copied only then). Every change to a destination's entry
    /// goes through here.
    fn destination(&self, name: &str, update: impl FnOnce(&mut DestinationStatus)) {
        let mut board = self.board();
        match board.destinations.get_mut(name) {
            Some(entry) => update(entry),
            None => update(board.destinations.entry(name.to_owned()).or_default()),
        }
    }

    fn emit(&self, event: Event) {
        // No subscriber is fine: events are for whoever listens.
        let _ = self.inner.events.send(event);
    }

    fn m(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// A connection changed state (`connecting`, `connected`, `disconnected`).
    pub fn connection(
        &self,
        cluster: &ClusterId,
        namespace: &str,
        state: &str,
        connection_id: Option<&str>,
        error: Option<String>,
    ) {
        let labels = EndpointLabels {
            cluster: cluster.0.clone(),
            namespace: namespace.to_owned(),
        };
        let up = state == "connected";
        self.m().connected.get_or_create(&labels).set(i64::from(up));
        let mut board = self.board();
        let entry = board
            .connections
            .entry(endpoint(cluster, namespace))
            .or_default();
        if up && entry.connection_id.as_deref() != connection_id {
            entry.connects += 1;
            self.m().connects.get_or_create(&labels).inc();
        }
        entry.state = state.to_owned();
        entry.connection_id = connection_id.map(str::to_owned);
        if error.is_some() {
            entry.last_error = error;
            entry.last_error_at_ms = Some(now_ms());
        }
    }

    /// What a connection has learnt of its server.
    pub fn server(
        &self,
        cluster: &ClusterId,
        namespace: &str,
        version: Option<String>,
        line: Option<String>,
        listing: Option<String>,
    ) {
        let mut board = self.board();
        let entry = board
            .connections
            .entry(endpoint(cluster, namespace))
            .or_default();
        entry.server_version = version;
        entry.server_line = line;
        entry.listing = listing;
    }

    /// A source namespace completed a full listing.
    pub fn listed(&self, cluster: &ClusterId, namespace: &str, services: usize) {
        info!(%cluster, namespace, services, "listing complete");
        let labels = EndpointLabels {
            cluster: cluster.0.clone(),
            namespace: namespace.to_owned(),
        };
        self.m().listings.get_or_create(&labels).inc();
        self.m().source_lost.get_or_create(&labels).set(0);
        {
            let mut board = self.board();
            let entry = board
                .sources
                .entry(endpoint(cluster, namespace))
                .or_default();
            entry.services = services;
            entry.listings += 1;
            entry.lost = false;
            entry.lost_at_ms = None;
            entry.held_until_ms = None;
        }
        self.emit(Event::SourceListed {
            cluster: cluster.clone(),
            namespace: namespace.to_owned(),
            services,
        });
    }

    /// A source namespace became unreachable; its replicas are held for
    /// `hold`, or withdrawn at once with none.
    pub fn source_lost(&self, cluster: &ClusterId, namespace: &str, hold: Option<Duration>) {
        let holding = hold.is_some();
        match hold {
            Some(hold) => warn!(%cluster, namespace, ?hold, "source lost; holding its replicas"),
            None => warn!(%cluster, namespace, "source lost; withdrawing its replicas"),
        }
        let labels = EndpointLabels {
            cluster: cluster.0.clone(),
            namespace: namespace.to_owned(),
        };
        self.m().source_lost.get_or_create(&labels).set(1);
        {
            let now = now_ms();
            let mut board = self.board();
            let entry = board
                .sources
                .entry(endpoint(cluster, namespace))
                .or_default();
            entry.lost = true;
            entry.lost_at_ms = Some(now);
            entry.held_until_ms = hold.map(|h| plus(now, h));
        }
        self.emit(Event::SourceLost {
            cluster: cluster.clone(),
            namespace: namespace.to_owned(),
            holding,
        });
    }

    /// A lost source's hold ended: its replicas are withdrawn.
    pub fn hold_expired(&self, cluster: &ClusterId, namespace: &str) {
        warn!(%cluster, namespace, "hold time over; withdrawing the lost source's replicas");
        self.board()
            .sources
            .entry(endpoint(cluster, namespace))
            .or_default()
            .held_until_ms = None;
        self.emit(Event::HoldExpired {
            cluster: cluster.clone(),
            namespace: namespace.to_owned(),
        });
    }

    /// A reload removed the route: its gauges and its `/status` entry go.
    pub fn route_removed(&self, source: &ClusterId, destination: &ClusterId) {
        let labels = RouteLabels {
            source: source.0.clone(),
            destination: destination.0.clone(),
        };
        self.m().services.remove(&labels);
        self.m().replicas.remove(&labels);
        self.board().routes.remove(&route_name(source, destination));
    }

    /// A reload left this cluster namespace: its gauges and its `/status`
    /// entries go (counters stay: they only ever grow).
    pub fn endpoint_removed(&self, cluster: &ClusterId, namespace: &str) {
        let labels = EndpointLabels {
            cluster: cluster.0.clone(),
            namespace: namespace.to_owned(),
        };
        self.m().connected.remove(&labels);
        self.m().source_lost.remove(&labels);
        self.m().publish_limit.remove(&labels);
        let key = endpoint(cluster, namespace);
        lock(&self.inner.lags).remove(&key);
        let mut board = self.board();
        board.connections.remove(&key);
        board.sources.remove(&key);
        board.destinations.remove(&key);
    }

    /// The engine's totals for a route.
    pub fn route_totals(
        &self,
        source: &ClusterId,
        destination: &ClusterId,
        services: usize,
        replicas: usize,
    ) {
        let labels = RouteLabels {
            source: source.0.clone(),
            destination: destination.0.clone(),
        };
        self.m()
            .services
            .get_or_create(&labels)
            .set(i64::try_from(services).unwrap_or(i64::MAX));
        self.m()
            .replicas
            .get_or_create(&labels)
            .set(i64::try_from(replicas).unwrap_or(i64::MAX));
        let mut board = self.board();
        let entry = board
            .routes
            .entry(route_name(source, destination))
            .or_default();
        entry.services = services;
        entry.replicas = replicas;
    }

    /// A native was not replicated.
    pub fn skipped(
        &self,
        source: &ClusterId,
        destination: &ClusterId,
        service: &ServiceKey,
        instance: String,
        reason: &'static str,
    ) {
        warn!(%source, %destination, %service, %instance, reason, "native not replicated");
        let labels = SkipLabels {
            source: source.0.clone(),
            destination: destination.0.clone(),
            reason: reason.to_owned(),
        };
        self.m().skipped.get_or_create(&labels).inc();
        self.board()
            .routes
            .entry(route_name(source, destination))
            .or_default()
            .skipped += 1;
        self.emit(Event::Skipped {
            source: source.clone(),
            destination: destination.clone(),
            service: service.clone(),
            instance,
            reason: reason.to_owned(),
        });
    }

    /// The meters of the publisher to `destination`/`namespace`.
    pub fn publisher(&self, destination: &ClusterId, namespace: &str) -> PublisherMeters {
        let labels = EndpointLabels {
            cluster: destination.0.clone(),
            namespace: namespace.to_owned(),
        };
        let applied = OutcomeLabels {
            cluster: destination.0.clone(),
            namespace: namespace.to_owned(),
            outcome: "applied".into(),
        };
        let endpoint = endpoint(destination, namespace);
        let window = lock(&self.inner.lags)
            .entry(endpoint.clone())
            .or_default()
            .clone();
        PublisherMeters {
            telemetry: self.clone(),
            destination: destination.clone(),
            namespace: namespace.to_owned(),
            endpoint,
            limit: self.m().publish_limit.get_or_create(&labels).clone(),
            ack: self.m().publish_ack.get_or_create(&labels).clone(),
            applied: self.m().publishes.get_or_create(&applied).clone(),
            lag: self.m().lag.get_or_create(&labels).clone(),
            window,
        }
    }

    /// A destination acknowledged a set of `replicas` instances: what
    /// [`PublisherMeters::published`] reports, for a caller without the
    /// publisher's meters at hand.
    pub fn published(
        &self,
        destination: &ClusterId,
        namespace: &str,
        service: &ServiceKey,
        replicas: usize,
        lag: Option<Duration>,
    ) {
        self.publisher(destination, namespace)
            .published(service, replicas, lag);
    }

    /// A destination did not take a set.
    pub fn publish_failed(
        &self,
        destination: &ClusterId,
        namespace: &str,
        kind: &'static str,
        message: String,
        retrying: bool,
    ) {
        if retrying {
            debug!(%destination, namespace, kind, error = %message, "publish failed; will retry");
        } else {
            warn!(%destination, namespace, kind, error = %message, "publish refused; not retried");
        }
        let outcome = OutcomeLabels {
            cluster: destination.0.clone(),
            namespace: namespace.to_owned(),
            outcome: if retrying { "retried" } else { "failed" }.into(),
        };
        self.m().publishes.get_or_create(&outcome).inc();
        self.destination(&endpoint(destination, namespace), |entry| {
            if retrying {
                entry.retried += 1;
            } else {
                entry.failed += 1;
            }
            entry.last_error = Some(message.clone());
            entry.last_error_at_ms = Some(now_ms());
        });
        self.count_error(destination, "publish", kind, message, retrying);
    }

    /// Any other failure: logged (at debug when it is retried, else at
    /// warn), counted and broadcast.
    pub fn error(
        &self,
        cluster: &ClusterId,
        operation: &'static str,
        kind: &'static str,
        message: String,
        retrying: bool,
    ) {
        if retrying {
            debug!(%cluster, operation, kind, error = %message, retrying, "failed");
        } else {
            warn!(%cluster, operation, kind, error = %message, retrying, "failed");
        }
        self.count_error(cluster, operation, kind, message, retrying);
    }

    fn count_error(
        &self,
        cluster: &ClusterId,
        operation: &'static str,
        kind: &'static str,
        message: String,
        retrying: bool,
    ) {
        let labels = ErrorLabels {
            cluster: cluster.0.clone(),
            operation: operation.to_owned(),
            kind: kind.to_owned(),
        };
        self.m().errors.get_or_create(&labels).inc();
        {
            let mut board = self.board();
            board.recent_errors.insert(
                0,
                ErrorRecord {
                    at_ms: now_ms(),
                    cluster: cluster.0.clone(),
                    operation: operation.to_owned(),
                    kind: kind.to_owned(),
                    message: message.clone(),
                    retrying,
                },
            );
            board.recent_errors.truncate(RECENT_ERRORS);
        }
        self.emit(Event::Error {
            cluster: cluster.clone(),
            operation,
            kind,
            message,
            retrying,
        });
    }

    /// The read-back found a difference.
    pub fn drift(
        &self,
        destination: &ClusterId,
        namespace: &str,
        service: &ServiceKey,
        drift: crate::model::Drift,
        repaired: bool,
    ) {
        warn!(%destination, namespace, %service, missing = drift.missing, different = drift.different, extra = drift.extra, repaired, "read-back found drift");
        for (kind, n) in [
            ("missing", drift.missing),
            ("different", drift.different),
            ("extra", drift.extra),
        ] {
            if n > 0 {
                let labels = DriftLabels {
                    cluster: destination.0.clone(),
                    namespace: namespace.to_owned(),
                    kind: kind.into(),
                };
                self.m().drift.get_or_create(&labels).inc_by(n as u64);
            }
        }
        if repaired {
            let labels = EndpointLabels {
                cluster: destination.0.clone(),
                namespace: namespace.to_owned(),
            };
            self.m().drift_repaired.get_or_create(&labels).inc();
        }
        self.destination(&endpoint(destination, namespace), |entry| {
            entry.drift_found += 1;
            entry.last_drift_at_ms = Some(now_ms());
            entry.drift_repaired += u64::from(repaired);
        });
        self.emit(Event::Drift {
            destination: destination.clone(),
            service: service.clone(),
            missing: drift.missing,
            different: drift.different,
            extra: drift.extra,
            repaired,
        });
    }

    /// A destination read-back round finished: the services still found
    /// drifted, those it repaired and those it could not read.
    pub fn read_back_done(&self, destination: &ClusterId, namespace: &str, round: RoundTally) {
        let RoundTally {
            drifted,
            repaired,
            failed,
        } = round;
        info!(%destination, namespace, drifted, repaired, failed, "read-back round done");
        let labels = EndpointLabels {
            cluster: destination.0.clone(),
            namespace: namespace.to_owned(),
        };
        // The gauge first: a scrape that sees this round counted sees its gauge.
        self.m()
            .drifted_services
            .get_or_create(&labels)
            .set(i64::try_from(drifted).unwrap_or(i64::MAX));
        self.m().read_backs.get_or_create(&labels).inc();
        self.destination(&endpoint(destination, namespace), |entry| {
            entry.read_backs += 1;
            entry.last_read_back_at_ms = Some(now_ms());
        });
    }

    /// A publisher's replica counts and queue, as it stands now.
    pub fn publisher_counts(
        &self,
        destination: &ClusterId,
        namespace: &str,
        replicas: ReplicaCounts,
        queued: usize,
        in_flight: usize,
    ) {
        self.destination(&endpoint(destination, namespace), |entry| {
            entry.replicas_wanted = replicas.wanted;
            entry.replicas_acknowledged = replicas.acknowledged;
            entry.queued = queued;
            entry.in_flight = in_flight;
        });
    }

    /// The first full sync is done (reported once).
    pub fn ready(&self) {
        let first = {
            let mut board = self.board();
            !std::mem::replace(&mut board.ready, true)
        };
        if first {
            info!("first full sync done");
            self.m().ready.set(1);
            self.emit(Event::Ready);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_carry_bounded_labels_and_values() {
        let t = Telemetry::new();
        let (a, b) = (ClusterId("a".into()), ClusterId("b".into()));
        let service = ServiceKey::new("public", "G", "orders");
        t.route_totals(&a, &b, 2, 5);
        t.published(&b, "public", &service, 5, Some(Duration::from_millis(3)));
        t.publish_failed(&b, "public", "timeout", "deadline".into(), true);
        t.connection(&b, "public", "connected", Some("c1"), None);
        let text = t.encode_metrics();
        for line in [
            "nacos_replicator_replicas{source=\"a\",destination=\"b\"} 5",
            "nacos_replicator_publishes_total{cluster=\"b\",namespace=\"public\",outcome=\"applied\"} 1",
            "nacos_replicator_publishes_total{cluster=\"b\",namespace=\"public\",outcome=\"retried\"} 1",
            "nacos_replicator_errors_total{cluster=\"b\",operation=\"publish\",kind=\"timeout\"} 1",
            "nacos_replicator_lag_seconds_count{cluster=\"b\",namespace=\"public\"} 1",
            "nacos_replicator_connected{cluster=\"b\",namespace=\"public\"} 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        // Cardinality rule: no service name in any label.
        assert!(!text.contains("orders"), "{text}");
        let status = t.status();
        assert_eq!(status.destinations["b/public"].applied, 1);
        assert_eq!(status.destinations["b/public"].last_lag_ms, Some(3));
        assert_eq!(status.routes["a -> b"].replicas, 5);
        assert_eq!(status.connections["b/public"].connects, 1);
    }

    #[test]
    fn status_remembers_holds_errors_and_lag_p99() {
        let t = Telemetry::new();
        let (a, b) = (ClusterId("a".into()), ClusterId("b".into()));
        let before = now_ms();
        t.source_lost(&a, "public", Some(Duration::from_secs(60)));
        let held = t.status().sources["a/public"].clone();
        assert!(held.lost && held.lost_at_ms >= Some(before), "{held:?}");
        let until = held.held_until_ms.expect("held");
        assert!(
            (before + 60_000..before + 70_000).contains(&until),
            "{until}"
        );
        t.hold_expired(&a, "public");
        assert_eq!(t.status().sources["a/public"].held_until_ms, None);
        t.listed(&a, "public", 3);
        let back = t.status().sources["a/public"].clone();
        assert!(!back.lost && back.lost_at_ms.is_none(), "{back:?}");

        for i in 0..(RECENT_ERRORS + 2) {
            t.error(&b, "connect", "refused", format!("error {i}"), true);
        }
        let errors = t.status().recent_errors;
        assert_eq!(errors.len(), RECENT_ERRORS);
        assert_eq!(errors[0].message, format!("error {}", RECENT_ERRORS + 1));
        assert!(errors[0].at_ms >= before);

        let service = ServiceKey::new("public", "G", "s");
        for ms in 1..=100 {
            t.published(&b, "public", &service, 1, Some(Duration::from_millis(ms)));
        }
        let d = &t.status().destinations["b/public"];
        assert_eq!((d.last_lag_ms, d.lag_p99_ms), (Some(100), Some(99)));
    }

    #[test]
    fn lag_p99_covers_only_the_last_window_and_goes_with_its_endpoint() {
        let t = Telemetry::new();
        let b = ClusterId("b".into());
        let meters = t.publisher(&b, "public");
        let service = ServiceKey::new("public", "G", "s");
        for _ in 0..LAG_WINDOW {
            meters.published(&service, 1, Some(Duration::from_secs(9)));
        }
        assert_eq!(t.status().destinations["b/public"].lag_p99_ms, Some(9_000));
        // A window of fast acks pushes every slow one out.
        for _ in 0..LAG_WINDOW {
            meters.published(&service, 1, Some(Duration::from_millis(2)));
        }
        let d = &t.status().destinations["b/public"];
        assert_eq!((d.applied, d.lag_p99_ms), (2 * LAG_WINDOW as u64, Some(2)));
        // A repair (no lag) counts but leaves the lag figures alone.
        meters.published(&service, 1, None);
        let d = &t.status().destinations["b/public"];
        assert_eq!((d.last_lag_ms, d.lag_p99_ms), (Some(2), Some(2)));
        t.endpoint_removed(&b, "public");
        assert!(!t.status().destinations.contains_key("b/public"));
        // A publisher for it again starts from an empty window.
        let again = t.publisher(&b, "public");
        again.published(&service, 1, None);
        assert_eq!(t.status().destinations["b/public"].lag_p99_ms, None);
    }

    #[test]
    fn events_reach_subscribers_and_ready_is_reported_once() {
        let t = Telemetry::new();
        let mut events = t.subscribe();
        t.ready();
        t.ready();
        t.published(
            &ClusterId("b".into()),
            "public",
            &ServiceKey::new("public", "G", "s"),
            0,
            None,
        );
        assert_eq!(events.try_recv().ok(), Some(Event::Ready));
        assert!(matches!(events.try_recv(), Ok(Event::Withdrawn { .. })));
        assert!(events.try_recv().is_err(), "ready reported twice");
        assert!(t.is_ready());
    }
}
