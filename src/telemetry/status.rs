//! The status document behind `/status` and `/readyz` ([`Status`] and its parts), and the
//! names of its entries.
//!
//! Must not: decide or count anything; [`Telemetry`](super::Telemetry) fills it in.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    /// The last errors of any kind, newest first (at most [`RECENT_ERRORS`]).
    pub recent_errors: Vec<ErrorRecord>,
}

/// How many errors [`Status::recent_errors`] keeps.
pub const RECENT_ERRORS: usize = 10;

/// One error, as the status document remembers it.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ErrorRecord {
    /// When it was reported, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The cluster involved.
    pub cluster: String,
    /// What was being done (`publish`, `connect`, `read_back`, ...).
    pub operation: String,
    /// Stable error class.
    pub kind: String,
    /// Human-readable detail.
    pub message: String,
    /// Whether the agent tries again by itself.
    pub retrying: bool,
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
    /// When that was, milliseconds since the Unix epoch.
    pub last_error_at_ms: Option<u64>,
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
    /// Since when it is unreachable, milliseconds since the Unix epoch.
    pub lost_at_ms: Option<u64>,
    /// While lost: until when its replicas are held (then withdrawn).
    /// `None` while lost: they were withdrawn (at once, or when the hold ended).
    pub held_until_ms: Option<u64>,
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
    /// Replicas wanted there: the sum of the newest set given to its
    /// publisher for each service (what the routes want).
    pub replicas_wanted: usize,
    /// Replicas the destination acknowledged: the sum of the last set it
    /// took for each service (what the publisher holds as published).
    pub replicas_acknowledged: usize,
    /// Sets waiting to be sent.
    pub queued: usize,
    /// Sets sent and not answered yet.
    pub in_flight: usize,
    /// Sets the publisher may have in flight now: its adaptive limit,
    /// which follows the destination's acks up to
    /// `timings.max_publishes_in_flight` (0 before the publisher started).
    pub publish_limit: usize,
    /// 99th percentile of the lag of the last [`LAG_WINDOW`] acknowledged
    /// changes, milliseconds.
    pub lag_p99_ms: Option<u64>,
    /// When the last error happened, milliseconds since the Unix epoch.
    pub last_error_at_ms: Option<u64>,
    /// Services a read-back found drifting (repaired or not).
    pub drift_found: u64,
    /// When a read-back last found drift, milliseconds since the Unix epoch.
    pub last_drift_at_ms: Option<u64>,
    /// When the last read-back round finished, milliseconds since the Unix epoch.
    pub last_read_back_at_ms: Option<u64>,
}

/// How many recent lags [`DestinationStatus::lag_p99_ms`] is taken over.
pub const LAG_WINDOW: usize = 256;

/// The most recent lags of one destination, for its p99.
#[derive(Debug, Default)]
pub(super) struct LagWindow {
    recent: std::collections::VecDeque<u64>,
}

impl LagWindow {
    /// Adds a lag, the oldest leaving a full window.
    pub(super) fn add(&mut self, lag_ms: u64) {
        if self.recent.len() == LAG_WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(lag_ms);
    }

    /// The p99 of the window (nearest rank: the smallest value with at
    /// least 99% at or below it); None while it is empty.
    pub(super) fn p99(&self) -> Option<u64> {
        let mut sorted: Vec<u64> = self.recent.iter().copied().collect();
        sorted.sort_unstable();
        let rank = (sorted.len() * 99).div_ceil(100).max(1);
        sorted.get(rank - 1).copied()
    }
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

/// `at_ms` plus `d`, saturating.
pub(super) fn plus(at_ms: u64, d: Duration) -> u64 {
    at_ms.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Now, milliseconds since the Unix epoch.
pub(super) fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

/// Milliseconds since the Unix epoch (0 before it).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}
