//! The event stream's item: [`Event`], one variant per fact worth telling a tool that embeds
//! the agent.
//!
//! Must not: decide anything; an event reports what the engine or a publisher already did.

use std::time::Duration;

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
