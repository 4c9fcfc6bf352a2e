//! The typed way in: a [`Config`] assembled in code by an embedder.
//!
//! The builder takes the engine's own types ([`ClusterSpec`], [`Route`],
//! [`OriginTags`], [`Timings`], [`Guard`]), so what their constructors
//! already refuse (a route into itself, a bad glob or tag prefix) is refused
//! there, as the file's parser refuses it too. [`ConfigBuilder::build`] then
//! applies every rule that spans values (ids, servers, namespaces, route
//! ends, timings). [`super::parse`] ends in this same `build`, so a file and
//! a builder cannot be checked differently. No I/O here: passwords and CA
//! certificates are given, not looked up.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::file::{AgentSection, LogFormat, Timings, default_grpc_offset, default_namespaces};
use super::{ClusterSpec, Config, ConfigError, ControlToken, check};
use crate::cluster::Credentials;
use crate::model::ClusterId;
use crate::reconcile::{Guard, OriginTags, Route};
use crate::transport::TlsOptions;

impl ClusterSpec {
    /// A cluster reached at `servers` (`host:http_port` each), with the
    /// file's defaults: namespace `public`, gRPC port offset 1000, no login,
    /// no TLS. The id and servers are checked by [`ConfigBuilder::build`].
    pub fn new(
        id: impl Into<String>,
        servers: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        Self {
            id: ClusterId(id.into()),
            servers: servers.into_iter().map(Into::into).collect(),
            grpc_port_offset: default_grpc_offset(),
            namespaces: default_namespaces(),
            credentials: None,
            tls: None,
        }
    }

    /// The namespace ids the agent reads or writes here (replacing `public`).
    #[must_use]
    pub fn with_namespaces(
        mut self,
        namespaces: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        self.namespaces = namespaces.into_iter().map(Into::into).collect();
        self
    }

    /// gRPC port minus HTTP port, when not Nacos' 1000.
    #[must_use]
    pub fn with_grpc_port_offset(mut self, offset: u16) -> Self {
        self.grpc_port_offset = offset;
        self
    }

    /// Login, for a cluster with auth enabled.
    #[must_use]
    pub fn with_credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = Some(credentials);
        self
    }

    /// TLS to the gRPC port.
    #[must_use]
    pub fn with_tls(mut self, tls: TlsOptions) -> Self {
        self.tls = Some(tls);
        self
    }
}

/// A [`Config`] under construction; from [`Config::builder`]. Every setting
/// not given keeps the file's default.
#[derive(Debug, Clone)]
#[must_use]
pub struct ConfigBuilder {
    /// Set only on the way from a file, so errors name it.
    file: Option<PathBuf>,
    clusters: Vec<ClusterSpec>,
    routes: Vec<Route>,
    tags: OriginTags,
    timings: Timings,
    guard: Option<Guard>,
    status_listen: SocketAddr,
    log_format: LogFormat,
    control_token: Option<ControlToken>,
}

impl Default for ConfigBuilder {
    fn default() -> Self {
        let agent = AgentSection::default();
        Self {
            file: None,
            clusters: Vec::new(),
            routes: Vec::new(),
            tags: OriginTags::default(),
            timings: Timings::default(),
            guard: None,
            status_listen: agent.status_listen,
            log_format: agent.log_format,
            control_token: None,
        }
    }
}

impl ConfigBuilder {
    /// Adds a cluster (`clusters[i]` in errors, counting calls from 0).
    pub fn cluster(mut self, cluster: ClusterSpec) -> Self {
        self.clusters.push(cluster);
        self
    }

    /// Adds a route (`routes[i]` in errors, counting calls from 0). Its ends
    /// must name clusters added here, in any order.
    pub fn route(mut self, route: Route) -> Self {
        self.routes.push(route);
        self
    }

    /// The origin tags (default prefix `rpl.`).
    pub fn tags(mut self, tags: OriginTags) -> Self {
        self.tags = tags;
        self
    }

    /// All timings at once (start from `Timings::default()`).
    pub fn timings(mut self, timings: Timings) -> Self {
        self.timings = timings;
        self
    }

    /// The mass-withdrawal guard. It is the pair `mass_withdraw_share` and
    /// `mass_withdraw_min_replicas` of the timings, whatever the order of the
    /// calls, and an error in it names those keys.
    pub fn guard(mut self, guard: Guard) -> Self {
        self.guard = Some(guard);
        self
    }

    /// Where the status server listens, if the embedder starts one.
    pub fn status_listen(mut self, addr: SocketAddr) -> Self {
        self.status_listen = addr;
        self
    }

    /// The bearer token the DR drill's control endpoints require.
    pub fn control_token(mut self, token: Option<ControlToken>) -> Self {
        self.control_token = token;
        self
    }

    /// Log line format, for an embedder that follows the file's choice.
    pub fn log_format(mut self, format: LogFormat) -> Self {
        self.log_format = format;
        self
    }

    /// Records the file the values were read from, for the errors.
    pub(super) fn read_from(mut self, path: &Path) -> Self {
        self.file = Some(path.to_owned());
        self
    }

    /// Checks everything and returns the configuration, or the first
    /// broken rule with its key.
    pub fn build(self) -> Result<Config, ConfigError> {
        let mut timings = self.timings;
        if let Some(guard) = self.guard {
            timings.mass_withdraw_share = guard.max_withdraw_share;
            timings.mass_withdraw_min_replicas = guard.min_replicas;
        }
        let config = Config {
            guard: Guard {
                max_withdraw_share: timings.mass_withdraw_share,
                min_replicas: timings.mass_withdraw_min_replicas,
            },
            file: self.file,
            clusters: self.clusters,
            routes: self.routes,
            tags: self.tags,
            timings,
            status_listen: self.status_listen,
            log_format: self.log_format,
            control_token: self.control_token,
        };
        check::config(&config).map_err(|e| e.within(config.file.as_deref()))?;
        Ok(config)
    }
}
