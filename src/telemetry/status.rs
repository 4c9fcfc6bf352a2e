//! The status document behind `/status` and `/readyz` ([`Status`] and its parts), and the
//! names of its entries.
//!
//! Must not: decide or count anything; [`Telemetry`](super::Telemetry) fills it in.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::model::ClusterId;

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

pub(super) fn endpoint(cluster: &ClusterId, namespace: &str) -> String {
    format!("{cluster}/{namespace}")
}

pub(super) fn route_name(source: &ClusterId, destination: &ClusterId) -> String {
    format!("{source} -> {destination}")
}

pub(super) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}
