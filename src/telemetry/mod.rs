//! What the agent tells the outside world: Prometheus metrics with bounded
//! labels, a stream of named events for tooling, and the status document
//! behind `/status` and `/readyz`.
//!
//! One [`Telemetry`] per agent, cheap to clone, passed to whoever reports.
//! It never decides anything: the engine and the publishers call it after
//! they acted. Labels are cluster ids, namespaces, operations, outcomes and
//! error kinds, all bounded by the configuration; never a service name or
//! an address (those go to events and logs only).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::broadcast;

use crate::model::{ClusterId, ServiceKey};

/// A fact worth telling a tool that embeds the agent. Services and
/// addresses are named here (unlike metric labels).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A destination acknowledged a non-empty replica set for a service.
    Replicated {
        /// Destination cluster.
        destination: ClusterId,
        /// Service, as named in the destination.
        service: ServiceKey,
        /// Replicas now published there by this agent.
        replicas: usize,
        /// From the source push that caused it to the destination's ack.
        lag: Option<Duration>,
    },
    /// A destination acknowledged the removal of all our replicas of a service.
    Withdrawn {
        /// Destination cluster.
        destination: ClusterId,
        /// Service, as named in the destination.
        service: ServiceKey,
        /// From the source change that caused it to the destination's ack.
        lag: Option<Duration>,
    },
    /// Something failed. `retrying` says whether it will be tried again.
    Error {
        /// The cluster involved.
        cluster: ClusterId,
        /// What was being done (`publish`, `confirm`, `read_back`, ...).
        operation: &'static str,
        /// Stable error class.
        kind: &'static str,
        /// Human-readable detail.
        message: String,
        /// Whether the agent tries again by itself.
        retrying: bool,
    },
    /// A native could not be replicated (its metadata leaves no room for the tag).
    Skipped {
        /// Source cluster.
        source: ClusterId,
        /// Destination cluster.
        destination: ClusterId,
        /// Source service.
        service: ServiceKey,
        /// `ip:port` of the native.
        instance: String,
        /// Why.
        reason: String,
    },
    /// A source namespace finished a full listing.
    SourceListed {
        /// Source cluster.
        cluster: ClusterId,
        /// Namespace.
        namespace: String,
        /// Services in scope.
        services: usize,
    },
    /// A source namespace became unreachable.
    SourceLost {
        /// Source cluster.
        cluster: ClusterId,
        /// Namespace.
        namespace: String,
        /// Whether its replicas are held (else withdrawn at once).
        holding: bool,
    },
    /// A lost source's hold time ended: its replicas are withdrawn.
    HoldExpired {
        /// Source cluster.
        cluster: ClusterId,
        /// Namespace.
        namespace: String,
    },
    /// A destination showed something else than what the agent publishes.
    Drift {
        /// Destination cluster.
        destination: ClusterId,
        /// Service.
        service: ServiceKey,
        /// Our replicas it did not show.
        missing: usize,
        /// Our replicas it showed with other content.
        different: usize,
        /// Tagged instances it showed that the agent does not publish
        /// (another agent's, or a dead connection's not yet reaped).
        extra: usize,
        /// Whether the agent republished to repair it.
        repaired: bool,
    },
    /// Every source finished its first full listing and every destination
    /// took what it was sent: the first full sync is done.
    Ready,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    source: String,
    destination: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SkipLabels {
    source: String,
    destination: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    cluster: String,
    namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    cluster: String,
    namespace: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DriftLabels {
    cluster: String,
    namespace: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    cluster: String,
    operation: String,
    kind: String,
}

fn lag_histogram() -> Histogram {
    // 1 ms .. ~65 s, doubling.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

struct Metrics {
    registry: Registry,
    replicas: Family<RouteLabels, Gauge>,
    services: Family<RouteLabels, Gauge>,
    skipped: Family<SkipLabels, Counter>,
    lag: Family<EndpointLabels, Histogram, fn() -> Histogram>,
    publishes: Family<OutcomeLabels, Counter>,
    drift: Family<DriftLabels, Counter>,
    drift_repaired: Family<EndpointLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    connected: Family<EndpointLabels, Gauge>,
    connects: Family<EndpointLabels, Counter>,
    source_lost: Family<EndpointLabels, Gauge>,
    listings: Family<EndpointLabels, Counter>,
    read_backs: Family<EndpointLabels, Counter>,
    ready: Gauge,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("nacos_replicator");
        let m = Metrics {
            replicas: Family::default(),
            services: Family::default(),
            skipped: Family::default(),
            lag: Family::new_with_constructor(lag_histogram as fn() -> Histogram),
            publishes: Family::default(),
            drift: Family::default(),
            drift_repaired: Family::default(),
            errors: Family::default(),
            connected: Family::default(),
            connects: Family::default(),
            source_lost: Family::default(),
            listings: Family::default(),
            read_backs: Family::default(),
            ready: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "replicas",
            "Replicas the agent wants published, per route",
            m.replicas.clone(),
        );
        registry.register(
            "services",
            "Destination services fed, per route",
            m.services.clone(),
        );
        registry.register(
            "skipped",
            "Natives not replicated (no room for the origin tag)",
            m.skipped.clone(),
        );
        registry.register(
            "lag_seconds",
            "From receipt of a source snapshot to the destination's ack of the change",
            m.lag.clone(),
        );
        registry.register(
            "publishes",
            "Replica sets sent to a destination, by outcome",
            m.publishes.clone(),
        );
        registry.register(
            "drift",
            "Differences found by the destination read-back, by kind",
            m.drift.clone(),
        );
        registry.register(
            "drift_repaired",
            "Destination services republished to repair drift",
            m.drift_repaired.clone(),
        );
        registry.register(
            "errors",
            "Errors by cluster, operation and kind",
            m.errors.clone(),
        );
        registry.register(
            "connected",
            "1 while the connection to a cluster namespace is up",
            m.connected.clone(),
        );
        registry.register(
            "connections",
            "Connections established (first and reconnects)",
            m.connects.clone(),
        );
        registry.register(
            "source_lost",
            "1 while a source is unreachable and its replicas held or withdrawn",
            m.source_lost.clone(),
        );
        registry.register(
            "listings",
            "Full listings of a source namespace completed",
            m.listings.clone(),
        );
        registry.register(
            "read_backs",
            "Destination read-back rounds completed",
            m.read_backs.clone(),
        );
        registry.register(
            "ready",
            "1 once the first full sync is done",
            m.ready.clone(),
        );
        Metrics { registry, ..m }
    }
}

/// The `/status` document.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Status {
    /// First full sync done.
    pub ready: bool,
    /// When the agent started, milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// Per `cluster/namespace`: the connection.
    pub connections: BTreeMap<String, ConnectionStatus>,
    /// Per source `cluster/namespace`.
    pub sources: BTreeMap<String, SourceStatus>,
    /// Per destination `cluster/namespace`.
    pub destinations: BTreeMap<String, DestinationStatus>,
    /// Per route `source -> destination`.
    pub routes: BTreeMap<String, RouteStatus>,
}

/// One connection.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ConnectionStatus {
    /// `connecting`, `connected` or `disconnected`.
    pub state: String,
    /// The server's id of the current connection.
    pub connection_id: Option<String>,
    /// Connections made so far.
    pub connects: u64,
    /// Why the last connection attempt or session ended.
    pub last_error: Option<String>,
    /// The server's version, when it told it (3.x tells it only to a user).
    pub server_version: Option<String>,
    /// The server's line as the connection showed it: `2.x` or `3.x`.
    pub server_line: Option<String>,
    /// How the namespace's services are listed: `v1 catalog (Nacos 2.x)`,
    /// `v3 admin service list (Nacos 3.x)` or `fuzzy watch (Nacos 3.x gRPC)`.
    pub listing: Option<String>,
}

/// One source namespace.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct SourceStatus {
    /// Services in scope at the last full listing.
    pub services: usize,
    /// Full listings completed.
    pub listings: u64,
    /// Unreachable now.
    pub lost: bool,
}

/// One destination namespace.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct DestinationStatus {
    /// Sets acknowledged.
    pub applied: u64,
    /// Attempts that failed and were retried.
    pub retried: u64,
    /// Sets refused for good.
    pub failed: u64,
    /// Read-back rounds completed (anti-entropy).
    pub read_backs: u64,
    /// Services republished after a read-back found drift.
    pub drift_repaired: u64,
    /// Lag of the last acknowledged change, milliseconds.
    pub last_lag_ms: Option<u64>,
    /// The last error.
    pub last_error: Option<String>,
}

/// One route.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct RouteStatus {
    /// Destination services fed.
    pub services: usize,
    /// Replicas wanted in the destination.
    pub replicas: usize,
    /// Natives skipped so far.
    pub skipped: u64,
}

struct Inner {
    metrics: Metrics,
    events: broadcast::Sender<Event>,
    status: Mutex<Status>,
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

fn endpoint(cluster: &ClusterId, namespace: &str) -> String {
    format!("{cluster}/{namespace}")
}

fn route_name(source: &ClusterId, destination: &ClusterId) -> String {
    format!("{source} -> {destination}")
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

impl Telemetry {
    /// Fresh, with nothing reported yet. Events are kept for slow readers
    /// up to 4096 deep; a reader further behind is told how many it missed.
    pub fn new() -> Self {
        let status = Status {
            started_at_ms: unix_ms(SystemTime::now()),
            ..Status::default()
        };
        Self {
            inner: Arc::new(Inner {
                metrics: Metrics::new(),
                events: broadcast::channel(4096).0,
                status: Mutex::new(status),
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
        self.board().clone()
    }

    /// Whether the first full sync is done.
    pub fn is_ready(&self) -> bool {
        self.board().ready
    }

    fn board(&self) -> MutexGuard<'_, Status> {
        self.inner
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
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
        }
        self.emit(Event::SourceListed {
            cluster: cluster.clone(),
            namespace: namespace.to_owned(),
            services,
        });
    }

    /// A source namespace became unreachable.
    pub fn source_lost(&self, cluster: &ClusterId, namespace: &str, holding: bool) {
        let labels = EndpointLabels {
            cluster: cluster.0.clone(),
            namespace: namespace.to_owned(),
        };
        self.m().source_lost.get_or_create(&labels).set(1);
        self.board()
            .sources
            .entry(endpoint(cluster, namespace))
            .or_default()
            .lost = true;
        self.emit(Event::SourceLost {
            cluster: cluster.clone(),
            namespace: namespace.to_owned(),
            holding,
        });
    }

    /// A lost source's hold ended.
    pub fn hold_expired(&self, cluster: &ClusterId, namespace: &str) {
        self.emit(Event::HoldExpired {
            cluster: cluster.clone(),
            namespace: namespace.to_owned(),
        });
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

    /// A destination acknowledged a set of `replicas` instances.
    pub fn published(
        &self,
        destination: &ClusterId,
        namespace: &str,
        service: &ServiceKey,
        replicas: usize,
        lag: Option<Duration>,
    ) {
        let ep = EndpointLabels {
            cluster: destination.0.clone(),
            namespace: namespace.to_owned(),
        };
        let outcome = OutcomeLabels {
            cluster: ep.cluster.clone(),
            namespace: ep.namespace.clone(),
            outcome: "applied".into(),
        };
        self.m().publishes.get_or_create(&outcome).inc();
        if let Some(lag) = lag {
            self.m().lag.get_or_create(&ep).observe(lag.as_secs_f64());
        }
        {
            let mut board = self.board();
            let entry = board
                .destinations
                .entry(endpoint(destination, namespace))
                .or_default();
            entry.applied += 1;
            if let Some(lag) = lag {
                entry.last_lag_ms = Some(u64::try_from(lag.as_millis()).unwrap_or(u64::MAX));
            }
        }
        let destination = destination.clone();
        let service = service.clone();
        self.emit(if replicas == 0 {
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

    /// A destination did not take a set.
    pub fn publish_failed(
        &self,
        destination: &ClusterId,
        namespace: &str,
        kind: &'static str,
        message: String,
        retrying: bool,
    ) {
        let outcome = OutcomeLabels {
            cluster: destination.0.clone(),
            namespace: namespace.to_owned(),
            outcome: if retrying { "retried" } else { "failed" }.into(),
        };
        self.m().publishes.get_or_create(&outcome).inc();
        {
            let mut board = self.board();
            let entry = board
                .destinations
                .entry(endpoint(destination, namespace))
                .or_default();
            if retrying {
                entry.retried += 1;
            } else {
                entry.failed += 1;
            }
            entry.last_error = Some(message.clone());
        }
        self.error(destination, "publish", kind, message, retrying);
    }

    /// Any other failure.
    pub fn error(
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
            self.board()
                .destinations
                .entry(endpoint(destination, namespace))
                .or_default()
                .drift_repaired += 1;
        }
        self.emit(Event::Drift {
            destination: destination.clone(),
            service: service.clone(),
            missing: drift.missing,
            different: drift.different,
            extra: drift.extra,
            repaired,
        });
    }

    /// A destination read-back round finished.
    pub fn read_back_done(&self, destination: &ClusterId, namespace: &str) {
        let labels = EndpointLabels {
            cluster: destination.0.clone(),
            namespace: namespace.to_owned(),
        };
        self.m().read_backs.get_or_create(&labels).inc();
        self.board()
            .destinations
            .entry(endpoint(destination, namespace))
            .or_default()
            .read_backs += 1;
    }

    /// The first full sync is done (reported once).
    pub fn ready(&self) {
        let first = {
            let mut board = self.board();
            !std::mem::replace(&mut board.ready, true)
        };
        if first {
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
