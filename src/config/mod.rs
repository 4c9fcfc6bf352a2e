//! The agent's configuration: a TOML file or a builder, checked before
//! anything runs.
//!
//! Owns the file format (serde structs, unknown keys rejected, documented
//! defaults, units in the type: durations are written like `30s` or `5m`),
//! the typed [`ConfigBuilder`] for embedders, and the rules both are checked
//! against. There is one way in: [`parse`] turns the file into the engine's
//! types (`resolve`, where passwords are looked up and CA files read) and
//! hands them to the builder, so a file and a built configuration meet the
//! same checks (`check`). Every error names the file (or the builder), the
//! key path and the reason. The environment is never read here: secrets
//! named by `password_env` are looked up through the function the caller
//! passes in.

mod builder;
mod check;
mod file;
mod resolve;

use resolve::Secrets;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use builder::ConfigBuilder;
pub use file::{
    AgentSection, AuthSection, ClusterSection, ConfigFile, LogFormat, RouteSection, SourceLoss,
    Timings, TlsSection,
};

use crate::cluster::Credentials;
use crate::model::ClusterId;
use crate::reconcile::{Guard, OriginTags, Route};
use crate::transport::TlsOptions;

/// The configuration is unusable.
#[derive(Debug, thiserror::Error)]
#[error("{}: {key}: {reason}", where_from(file.as_deref()))]
pub struct ConfigError {
    /// The file read, or `None` for a configuration from [`Config::builder`].
    pub file: Option<PathBuf>,
    /// Path of the offending key (`routes[1].to`), or `-` for the whole
    /// file. A built configuration uses the same paths: `clusters[i]` and
    /// `routes[i]` are the `i`-th [`ConfigBuilder::cluster`] and
    /// [`ConfigBuilder::route`] calls, `timings.*` the fields of [`Timings`].
    pub key: String,
    /// What is wrong, and where the line is known, on which line.
    pub reason: String,
}

/// Where an error is reported from: the file, or the builder when there is none.
fn where_from(file: Option<&Path>) -> std::path::Display<'_> {
    file.unwrap_or(Path::new("config builder")).display()
}

/// A broken rule, before it is known whether a file or the builder broke it.
#[derive(Debug)]
struct Invalid {
    key: String,
    reason: String,
}

impl Invalid {
    fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            reason: reason.into(),
        }
    }

    fn within(self, file: Option<&Path>) -> ConfigError {
        ConfigError {
            file: file.map(Path::to_owned),
            key: self.key,
            reason: self.reason,
        }
    }
}

/// One Nacos cluster, ready to connect to. [`ClusterSpec::new`] starts one
/// with the file's defaults, for [`ConfigBuilder::cluster`].
#[derive(Debug, Clone, PartialEq)]
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
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it came from; `None` when built with [`Config::builder`].
    pub file: Option<PathBuf>,
    /// Clusters, in file (or builder call) order.
    pub clusters: Vec<ClusterSpec>,
    /// Routes, in file (or builder call) order.
    pub routes: Vec<Route>,
    /// Origin tags.
    pub tags: OriginTags,
    /// Mass-withdrawal guard (the same figures as the two `mass_withdraw_*` timings).
    pub guard: Guard,
    /// Timings.
    pub timings: Timings,
    /// Status server address.
    pub status_listen: SocketAddr,
    /// Log format.
    pub log_format: LogFormat,
    /// The DR drill's control token (`agent.control_token_env`).
    pub control_token: Option<ControlToken>,
}

/// The bearer token of the status server's control endpoints; never shown.
#[derive(Clone, PartialEq, Eq)]
pub struct ControlToken(pub String);

impl std::fmt::Debug for ControlToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlToken(<redacted>)")
    }
}

impl Config {
    /// A configuration built in code, with the file's defaults and checked
    /// by the file's rules when [`ConfigBuilder::build`] is called.
    pub fn builder() -> ConfigBuilder {
        ConfigBuilder::default()
    }

    /// The cluster with this id.
    pub fn cluster(&self, id: &ClusterId) -> Option<&ClusterSpec> {
        self.clusters.iter().find(|c| &c.id == id)
    }
}

/// Reads and checks `path`. `env` looks up the variables that
/// `password_env` keys name (pass `|k| std::env::var(k).ok()` in a binary).
pub fn load(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Invalid::new("-", format!("cannot read: {e}")).within(Some(path)))?;
    parse(path, &text, env)
}

/// Checks configuration `text` as if read from `path`.
pub fn parse(
    path: &Path,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    parse_with(path, text, env, Secrets::Required).map(|(config, _)| config)
}

/// A secret the file names that this machine does not hold: a
/// `password_env` variable not set, a CA file not there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsetSecret {
    /// The key naming it (`clusters[1].auth.password_env`, `clusters[1].tls.ca_file`).
    pub key: String,
    /// What is missing (`environment variable NACOS_X is not set`).
    pub reason: String,
}

impl std::fmt::Display for UnsetSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

/// Reads and checks `path` to show it, not to connect: a `password_env`
/// variable that is not set, or a CA file that is not there, is returned
/// (the cluster gets an empty password, or TLS without that CA) rather
/// than failing the whole file. Everything else is checked as by
/// [`load`]; a configuration with unset secrets must not be used to
/// connect (`load` it for that).
pub fn load_offline(
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Config, Vec<UnsetSecret>), ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Invalid::new("-", format!("cannot read: {e}")).within(Some(path)))?;
    parse_with(path, &text, env, Secrets::Noted)
}

fn parse_with(
    path: &Path,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
    secrets: Secrets,
) -> Result<(Config, Vec<UnsetSecret>), ConfigError> {
    let error = |key: String, reason: String| Invalid::new(key, reason).within(Some(path));
    let deserializer =
        toml::Deserializer::parse(text).map_err(|e| error("-".into(), describe(text, &e)))?;
    let raw: ConfigFile = serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let key = e.path().to_string();
        error(
            if key == "." { "-".into() } else { key },
            describe(text, e.inner()),
        )
    })?;
    let (builder, unset) =
        resolve::builder(raw, path, env, secrets).map_err(|e| e.within(Some(path)))?;
    Ok((builder.build()?, unset))
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

#[cfg(test)]
mod builder_tests;
#[cfg(test)]
mod tests;
