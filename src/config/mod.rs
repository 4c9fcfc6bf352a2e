//! The agent's configuration: one TOML file, checked before anything runs.
//!
//! Owns the file format (serde structs, unknown keys rejected, documented
//! defaults, units in the type: durations are written like `30s` or `5m`)
//! and its validation into the types the engine uses. Every error names the
//! file, the key path and the reason. The environment is never read here:
//! secrets named by `password_env` are looked up through the function the
//! caller passes in.

mod file;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use file::{
    AgentSection, AuthSection, ClusterSection, ConfigFile, LogFormat, RouteSection, SourceLoss,
    Timings, TlsSection,
};

use crate::cluster::Credentials;
use crate::model::ClusterId;
use crate::reconcile::{Guard, OriginTags, Pattern, Route};
use crate::transport::TlsOptions;

/// The configuration is unusable.
#[derive(Debug, thiserror::Error)]
#[error("{}: {key}: {reason}", file.display())]
pub struct ConfigError {
    /// The file read.
    pub file: PathBuf,
    /// Path of the offending key (`routes[1].to`), or `-` for the whole file.
    pub key: String,
    /// What is wrong, and where the line is known, on which line.
    pub reason: String,
}

/// One Nacos cluster, ready to connect to.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Its id.
    pub id: ClusterId,
    /// `host:http_port` of each server.
    pub servers: Vec<String>,
    /// gRPC port offset from the HTTP port.
    pub grpc_port_offset: u16,
    /// Namespaces the agent reads or writes on it.
    pub namespaces: Vec<String>,
    /// Login, when the cluster has auth on (password already resolved).
    pub credentials: Option<Credentials>,
    /// TLS to the gRPC port.
    pub tls: Option<TlsOptions>,
}

/// A checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from.
    pub file: PathBuf,
    /// Clusters by id, in file order.
    pub clusters: Vec<ClusterSpec>,
    /// Routes, in file order.
    pub routes: Vec<Route>,
    /// Origin tags.
    pub tags: OriginTags,
    /// Mass-withdrawal guard.
    pub guard: Guard,
    /// Timings.
    pub timings: Timings,
    /// Status server address.
    pub status_listen: SocketAddr,
    /// Log format.
    pub log_format: LogFormat,
}

impl Config {
    /// The cluster with this id.
    pub fn cluster(&self, id: &ClusterId) -> Option<&ClusterSpec> {
        self.clusters.iter().find(|c| &c.id == id)
    }
}

/// Reads and checks `path`. `env` looks up the variables that
/// `password_env` keys name (pass `|k| std::env::var(k).ok()` in a binary).
pub fn load(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_owned(),
        key: "-".into(),
        reason: format!("cannot read: {e}"),
    })?;
    parse(path, &text, env)
}

/// Checks configuration `text` as if read from `path`.
pub fn parse(
    path: &Path,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let error = |key: String, reason: String| ConfigError {
        file: path.to_owned(),
        key,
        reason,
    };
    let deserializer =
        toml::Deserializer::parse(text).map_err(|e| error("-".into(), describe(text, &e)))?;
    let raw: ConfigFile = serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let key = e.path().to_string();
        error(
            if key == "." { "-".into() } else { key },
            describe(text, e.inner()),
        )
    })?;
    validate(raw, path, env)
}

fn describe(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("{} (line {line})", e.message().trim_end())
        }
        None => e.message().trim_end().to_owned(),
    }
}

fn validate(
    raw: ConfigFile,
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let error = |key: String, reason: String| ConfigError {
        file: path.to_owned(),
        key,
        reason,
    };
    if raw.clusters.is_empty() {
        return Err(error(
            "clusters".into(),
            "at least one [[clusters]] entry is needed".into(),
        ));
    }
    let tags = OriginTags::new(&raw.agent.tag_prefix)
        .map_err(|e| error("agent.tag_prefix".into(), e.to_string()))?;
    let t = &raw.timings;
    for (key, value) in [
        ("timings.list_interval", t.list_interval),
        ("timings.resync_interval", t.resync_interval),
        ("timings.request_timeout", t.request_timeout),
    ] {
        if value.is_zero() {
            return Err(error(key.into(), "must be above zero".into()));
        }
    }
    if t.max_publishes_per_second == 0 {
        return Err(error(
            "timings.max_publishes_per_second".into(),
            "must be at least 1".into(),
        ));
    }
    if !(0.0..=1.0).contains(&t.mass_withdraw_share) {
        return Err(error(
            "timings.mass_withdraw_share".into(),
            format!("{} is not a share within 0.0..=1.0", t.mass_withdraw_share),
        ));
    }

    let mut clusters = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, c) in raw.clusters.iter().enumerate() {
        let key = |field: &str| format!("clusters[{i}].{field}");
        if c.id.is_empty()
            || !c
                .id
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.'))
        {
            return Err(error(
                key("id"),
                format!(
                    "{:?} must be non-empty letters, digits, '-', '_' or '.'",
                    c.id
                ),
            ));
        }
        if !seen.insert(c.id.clone()) {
            return Err(error(key("id"), format!("duplicate cluster id {:?}", c.id)));
        }
        if c.servers.is_empty() {
            return Err(error(
                key("servers"),
                "at least one host:port is needed".into(),
            ));
        }
        for (j, s) in c.servers.iter().enumerate() {
            let port = s
                .rsplit_once(':')
                .and_then(|(h, p)| (!h.is_empty()).then(|| p.parse::<u16>().ok()).flatten());
            if port
                .and_then(|p| p.checked_add(c.grpc_port_offset))
                .is_none()
            {
                return Err(error(
                    key(&format!("servers[{j}]")),
                    format!(
                        "{s:?} is not host:port with the HTTP port (gRPC is that plus {})",
                        c.grpc_port_offset
                    ),
                ));
            }
        }
        if c.namespaces.is_empty() || c.namespaces.iter().any(String::is_empty) {
            return Err(error(
                key("namespaces"),
                "list at least one namespace id (the default one is \"public\")".into(),
            ));
        }
        let credentials = match &c.auth {
            None => None,
            Some(a) => {
                let password = match (&a.password, &a.password_env) {
                    (Some(p), None) => p.clone(),
                    (None, Some(var)) => env(var).ok_or_else(|| {
                        error(
                            key("auth.password_env"),
                            format!("environment variable {var} is not set"),
                        )
                    })?,
                    _ => {
                        return Err(error(
                            key("auth"),
                            "give exactly one of password and password_env".into(),
                        ));
                    }
                };
                Some(Credentials {
                    username: a.username.clone(),
                    password,
                })
            }
        };
        let tls = match &c.tls {
            None => None,
            Some(tls) => {
                let ca_pem = match &tls.ca_file {
                    None => None,
                    Some(f) => {
                        let f = if f.is_relative() {
                            path.parent().unwrap_or(Path::new(".")).join(f)
                        } else {
                            f.clone()
                        };
                        Some(std::fs::read(&f).map_err(|e| {
                            error(
                                key("tls.ca_file"),
                                format!("cannot read {}: {e}", f.display()),
                            )
                        })?)
                    }
                };
                Some(TlsOptions {
                    ca_pem,
                    domain: tls.domain.clone(),
                })
            }
        };
        clusters.push(ClusterSpec {
            id: ClusterId(c.id.clone()),
            servers: c.servers.clone(),
            grpc_port_offset: c.grpc_port_offset,
            namespaces: c.namespaces.clone(),
            credentials,
            tls,
        });
    }

    let mut routes = Vec::new();
    for (i, r) in raw.routes.iter().enumerate() {
        let key = |field: &str| format!("routes[{i}].{field}");
        let find = |id: &str, field: &str| {
            clusters
                .iter()
                .find(|c| c.id.0 == id)
                .ok_or_else(|| error(key(field), format!("no cluster has id {id:?}")))
        };
        let from = find(&r.from, "from")?;
        let to = find(&r.to, "to")?;
        let mut route = Route::new(from.id.clone(), to.id.clone())
            .map_err(|e| error(key("to"), e.to_string()))?;
        for (j, ns) in r.namespaces.iter().enumerate() {
            if !from.namespaces.contains(ns) {
                return Err(error(
                    key(&format!("namespaces[{j}]")),
                    format!(
                        "namespace {ns:?} is not among cluster {:?}'s namespaces {:?}",
                        from.id.0, from.namespaces
                    ),
                ));
            }
        }
        // Every namespace the route reads must land in one the destination serves.
        let read: Vec<&String> = if r.namespaces.is_empty() {
            from.namespaces.iter().collect()
        } else {
            r.namespaces.iter().collect()
        };
        for ns in read {
            let landing = r.map_namespaces.get(ns).unwrap_or(ns);
            if !to.namespaces.contains(landing) {
                return Err(error(
                    key("map_namespaces"),
                    format!(
                        "namespace {ns:?} would land in {landing:?}, which cluster {:?} does not serve (namespaces {:?})",
                        to.id.0, to.namespaces
                    ),
                ));
            }
        }
        let patterns = |list: &[String], field: &str| -> Result<Vec<Pattern>, ConfigError> {
            list.iter()
                .enumerate()
                .map(|(j, p)| {
                    Pattern::new(p).map_err(|e| error(key(&format!("{field}[{j}]")), e.to_string()))
                })
                .collect()
        };
        route.scope.namespaces = r.namespaces.clone();
        route.scope.groups = r.groups.clone();
        route.scope.include = patterns(&r.include, "include")?;
        route.scope.exclude = patterns(&r.exclude, "exclude")?;
        route.mapping.namespaces = r.map_namespaces.clone();
        route.mapping.groups = r.map_groups.clone();
        routes.push(route);
    }
    let mut pairs = BTreeMap::new();
    for (i, r) in routes.iter().enumerate() {
        if let Some(first) = pairs.insert((r.source().clone(), r.destination().clone()), i) {
            return Err(error(
                format!("routes[{i}]"),
                format!("same source and destination as routes[{first}]; merge their scopes"),
            ));
        }
    }

    Ok(Config {
        file: path.to_owned(),
        clusters,
        routes,
        tags,
        guard: Guard {
            max_withdraw_share: t.mass_withdraw_share,
            min_replicas: t.mass_withdraw_min_replicas,
        },
        timings: raw.timings.clone(),
        status_listen: raw.agent.status_listen,
        log_format: raw.agent.log_format,
    })
}

#[cfg(test)]
mod tests;
