//! The Prometheus metrics ([`Metrics`]): their label sets, each bounded by the configuration
//! (cluster ids, namespaces, operations, outcomes, error kinds), and their registry.
//!
//! Must not: take a label from anything unbounded, such as a service name or an address;
//! those go to events and logs only.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct RouteLabels {
    pub(super) source: String,
    pub(super) destination: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct SkipLabels {
    pub(super) source: String,
    pub(super) destination: String,
    pub(super) reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct EndpointLabels {
    pub(super) cluster: String,
    pub(super) namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct OutcomeLabels {
    pub(super) cluster: String,
    pub(super) namespace: String,
    pub(super) outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct DriftLabels {
    pub(super) cluster: String,
    pub(super) namespace: String,
    pub(super) kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ErrorLabels {
    pub(super) cluster: String,
    pub(super) operation: String,
    pub(super) kind: String,
}

fn lag_histogram() -> Histogram {
    // 1 ms .. ~65 s, doubling.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

fn ack_histogram() -> Histogram {
    // 100 us .. ~6.5 s, doubling: loopback acks take well under a
    // millisecond, a destination far away or queueing tens of them.
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

/// Every metric of one agent, and the registry that encodes them.
pub(super) struct Metrics {
    pub(super) registry: Registry,
    pub(super) replicas: Family<RouteLabels, Gauge>,
    pub(super) services: Family<RouteLabels, Gauge>,
    pub(super) skipped: Family<SkipLabels, Counter>,
    pub(super) lag: Family<EndpointLabels, Histogram, fn() -> Histogram>,
    pub(super) publish_limit: Family<EndpointLabels, Gauge>,
    pub(super) publish_ack: Family<EndpointLabels, Histogram, fn() -> Histogram>,
    pub(super) publishes: Family<OutcomeLabels, Counter>,
    pub(super) drift: Family<DriftLabels, Counter>,
    pub(super) drift_repaired: Family<EndpointLabels, Counter>,
    pub(super) errors: Family<ErrorLabels, Counter>,
    pub(super) connected: Family<EndpointLabels, Gauge>,
    pub(super) connects: Family<EndpointLabels, Counter>,
    pub(super) source_lost: Family<EndpointLabels, Gauge>,
    pub(super) listings: Family<EndpointLabels, Counter>,
    pub(super) read_backs: Family<EndpointLabels, Counter>,
    pub(super) drifted_services: Family<EndpointLabels, Gauge>,
    pub(super) ready: Gauge,
}

impl Metrics {
    pub(super) fn new() -> Self {
        let mut registry = Registry::with_prefix("nacos_replicator");
        let m = Metrics {
            replicas: Family::default(),
            services: Family::default(),
            skipped: Family::default(),
            lag: Family::new_with_constructor(lag_histogram as fn() -> Histogram),
            publish_limit: Family::default(),
            publish_ack: Family::new_with_constructor(ack_histogram as fn() -> Histogram),
            publishes: Family::default(),
            drift: Family::default(),
            drift_repaired: Family::default(),
            errors: Family::default(),
            connected: Family::default(),
            connects: Family::default(),
            source_lost: Family::default(),
            listings: Family::default(),
            read_backs: Family::default(),
            drifted_services: Family::default(),
            ready: Gauge::default(),
            registry: Registry::default(),
        };
        m.register(&mut registry);
        Metrics { registry, ..m }
    }

    /// Registers every family with `registry`; they are encoded in this order.
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "replicas",
            "Replicas the agent wants published, per route",
            self.replicas.clone(),
        );
        registry.register(
            "services",
            "Destination services fed, per route",
            self.services.clone(),
        );
        registry.register(
            "skipped",
            "Natives not replicated (no room for the origin tag)",
            self.skipped.clone(),
        );
        registry.register(
            "lag_seconds",
            "From receipt of a source snapshot to the destination's ack of the change",
            self.lag.clone(),
        );
        registry.register(
            "publish_limit",
            "Replica sets a destination's publisher may have in flight now (adaptive, up to timings.max_publishes_in_flight)",
            self.publish_limit.clone(),
        );
        registry.register(
            "publish_ack_seconds",
            "From sending a replica set to the destination's ack",
            self.publish_ack.clone(),
        );
        registry.register(
            "publishes",
            "Replica sets sent to a destination, by outcome",
            self.publishes.clone(),
        );
        registry.register(
            "drift",
            "Differences found by the destination read-back, by kind",
            self.drift.clone(),
        );
        registry.register(
            "drift_repaired",
            "Destination services republished to repair drift",
            self.drift_repaired.clone(),
        );
        registry.register(
            "errors",
            "Errors by cluster, operation and kind",
            self.errors.clone(),
        );
        registry.register(
            "connected",
            "1 while the connection to a cluster namespace is up",
            self.connected.clone(),
        );
        registry.register(
            "connections",
            "Connections established (first and reconnects)",
            self.connects.clone(),
        );
        registry.register(
            "source_lost",
            "1 while a source is unreachable and its replicas held or withdrawn",
            self.source_lost.clone(),
        );
        registry.register(
            "listings",
            "Full listings of a source namespace completed",
            self.listings.clone(),
        );
        registry.register(
            "read_backs",
            "Destination read-back rounds completed",
            self.read_backs.clone(),
        );
        registry.register(
            "drifted_services",
            "Destination services whose last read-back comparison found drift",
            self.drifted_services.clone(),
        );
        registry.register(
            "ready",
            "1 once the first full sync is done",
            self.ready.clone(),
        );
    }
}
