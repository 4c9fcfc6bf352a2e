//! The file format, as serde reads it. Every field is documented, every
//! default named, unknown keys are errors.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Agent-wide settings.
    #[serde(default)]
    pub agent: AgentSection,
    /// Intervals, limits and failure policy.
    #[serde(default)]
    pub timings: Timings,
    /// The Nacos clusters (regions).
    #[serde(default)]
    pub clusters: Vec<ClusterSection>,
    /// What flows where.
    #[serde(default)]
    pub routes: Vec<RouteSection>,
}

/// `[agent]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSection {
    /// Prefix of the origin tag key written on every replica (`rpl.` gives `rpl.origin`).
    pub tag_prefix: String,
    /// Where the status server listens (`/healthz`, `/readyz`, `/metrics`, `/status`).
    pub status_listen: SocketAddr,
    /// `text` (default) or `json` log lines.
    pub log_format: LogFormat,
    /// The environment variable holding the bearer token that starting or
    /// ending a DR drill on the status server (`POST`/`DELETE /drill`)
    /// requires. Unset (the default): no token, and those requests are
    /// refused unless `status_listen` is a loopback address.
    pub control_token_env: Option<String>,
}

impl Default for AgentSection {
    fn default() -> Self {
        Self {
            tag_prefix: crate::reconcile::origin::DEFAULT_PREFIX.to_owned(),
            status_listen: SocketAddr::from(([127, 0, 0, 1], 9787)),
            log_format: LogFormat::Text,
            control_token_env: None,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable.
    Text,
    /// One JSON object per line.
    Json,
}

/// What to do with replicas when their source cluster is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceLoss {
    /// Keep them published for `hold_for`, then withdraw.
    Hold,
    /// Withdraw at once.
    Withdraw,
}

/// `[timings]`. Durations are written like `500ms`, `30s`, `5m`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timings {
    /// How often each source's service list is polled (Nacos 2.x pushes no
    /// "service created" event). Default 30s.
    #[serde(with = "humantime_serde")]
    pub list_interval: Duration,
    /// How often each source's catalog is probed between listings (one
    /// entry of the first page: the service count and a name), a listing
    /// following at once when it changed: a service created on 2.x is seen
    /// within about this time. `0s` turns probing off (listings only).
    /// Unused where a 3.x fuzzy watch reports changes. Default 1s.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// Anti-entropy: how often sources are re-read and destinations read
    /// back and repaired. Default 5m.
    #[serde(with = "humantime_serde")]
    pub resync_interval: Duration,
    /// Deadline of every call to a Nacos server. Default 3s.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Replicas of an unreachable source: `hold` (default) or `withdraw`.
    pub source_loss: SourceLoss,
    /// With `hold`, how long before withdrawing anyway. Default 10m.
    #[serde(with = "humantime_serde")]
    pub hold_for: Duration,
    /// Publishes per second per destination namespace, at most: a hard
    /// ceiling over the adaptive pacing. Default 10000, high enough that
    /// the destination's acks, not this, set the pace of a first sync (10,000
    /// services in a second at most); lower it to cap what one agent may
    /// ask of a destination.
    pub max_publishes_per_second: u32,
    /// Sets sent to one destination namespace and not yet answered, at most:
    /// the ceiling of the adaptive limit, which starts at 8, grows while
    /// acks stay near their fastest and is cut on slow acks, failures and
    /// refusals. Default 128: at 50 ms between regions that still allows
    /// 2,500 sets/s, while on a LAN the acks keep the limit well below it.
    pub max_publishes_in_flight: usize,
    /// Subscribes and queries a listing sends to one source namespace at
    /// once. Default 32: a first sync costs a round trip per 32 services,
    /// and a resync's queries reach a server at most this many at a time.
    pub max_reads_in_flight: usize,
    /// A change removing more than this share of a service's replicas is
    /// confirmed by a fresh query first. Default 0.5.
    pub mass_withdraw_share: f64,
    /// Services with fewer replicas than this are never held back. Default 4.
    pub mass_withdraw_min_replicas: usize,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            list_interval: Duration::from_secs(30),
            probe_interval: Duration::from_secs(1),
            resync_interval: Duration::from_secs(300),
            request_timeout: Duration::from_secs(3),
            source_loss: SourceLoss::Hold,
            hold_for: Duration::from_secs(600),
            max_publishes_per_second: 10_000,
            max_publishes_in_flight: 128,
            max_reads_in_flight: 32,
            mass_withdraw_share: 0.5,
            mass_withdraw_min_replicas: 4,
        }
    }
}

/// `[[clusters]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Unique id, used in routes, logs, metric labels and origin tags; keep it short.
    pub id: String,
    /// Servers as `host:http_port` (gRPC is on http_port + `grpc_port_offset`).
    pub servers: Vec<String>,
    /// Namespace ids the agent reads or writes here. Default `["public"]`.
    #[serde(default = "default_namespaces")]
    pub namespaces: Vec<String>,
    /// gRPC port minus HTTP port. Default 1000, as in Nacos.
    #[serde(default = "default_grpc_offset")]
    pub grpc_port_offset: u16,
    /// Login, when the cluster has auth enabled.
    pub auth: Option<AuthSection>,
    /// TLS to the gRPC port.
    pub tls: Option<TlsSection>,
}

pub(super) fn default_namespaces() -> Vec<String> {
    vec![crate::model::DEFAULT_NAMESPACE.to_owned()]
}

pub(super) fn default_grpc_offset() -> u16 {
    1000
}

/// `[clusters.auth]`: a user name and exactly one of `password` or `password_env`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    /// User name.
    pub username: String,
    /// Password, written in the file.
    pub password: Option<String>,
    /// Name of the environment variable holding the password (preferred).
    pub password_env: Option<String>,
}

/// `[clusters.tls]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// PEM file of extra CA certificates to trust (relative to the config file).
    pub ca_file: Option<PathBuf>,
    /// Name to check the server certificate against, if not the host dialled.
    pub domain: Option<String>,
}

/// `[[routes]]`: `from` -> `to`, with a scope and renames. Empty lists mean all.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    /// Source cluster id.
    pub from: String,
    /// Destination cluster id.
    pub to: String,
    /// Source namespaces (default: all of the source cluster's namespaces).
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Source groups (default: all).
    #[serde(default)]
    pub groups: Vec<String>,
    /// Service-name globs to include (default: all).
    #[serde(default)]
    pub include: Vec<String>,
    /// Service-name globs to leave out.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Source namespace -> destination namespace.
    #[serde(default)]
    pub map_namespaces: BTreeMap<String, String>,
    /// Source group -> destination group.
    #[serde(default)]
    pub map_groups: BTreeMap<String, String>,
}
