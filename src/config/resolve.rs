//! From the file's sections to the engine's types, handed to the builder.
//!
//! Only what a file has and a builder does not happens here: passwords
//! named by `password_env` are looked up, CA files are read (relative to the
//! config file), and strings become [`Route`]s, [`Pattern`]s and
//! [`OriginTags`], whose constructors refuse what cannot work. The rules
//! across values are left to `check`, through [`ConfigBuilder::build`].

use std::path::Path;

use super::file::{AuthSection, ClusterSection, ConfigFile, RouteSection, TlsSection};
use super::{ClusterSpec, Config, ConfigBuilder, Invalid};
use crate::cluster::Credentials;
use crate::model::ClusterId;
use crate::reconcile::{OriginTags, Pattern, Route};
use crate::transport::TlsOptions;

/// The builder holding what `raw` says, ready to [`ConfigBuilder::build`].
pub(super) fn builder(
    raw: ConfigFile,
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ConfigBuilder, Invalid> {
    let tags = OriginTags::new(&raw.agent.tag_prefix)
        .map_err(|e| Invalid::new("agent.tag_prefix", e.to_string()))?;
    let mut builder = Config::builder()
        .read_from(path)
        .tags(tags)
        .timings(raw.timings)
        .status_listen(raw.agent.status_listen)
        .log_format(raw.agent.log_format);
    for (i, c) in raw.clusters.into_iter().enumerate() {
        builder = builder.cluster(cluster(i, c, path, env)?);
    }
    for (i, r) in raw.routes.into_iter().enumerate() {
        builder = builder.route(route(i, r)?);
    }
    Ok(builder)
}

fn cluster(
    i: usize,
    c: ClusterSection,
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ClusterSpec, Invalid> {
    let key = |field: &str| format!("clusters[{i}].{field}");
    let credentials = c
        .auth
        .map(|a| credentials(a, env).map_err(|(field, reason)| Invalid::new(key(field), reason)))
        .transpose()?;
    let tls = c
        .tls
        .map(|t| tls(t, path).map_err(|reason| Invalid::new(key("tls.ca_file"), reason)))
        .transpose()?;
    Ok(ClusterSpec {
        id: ClusterId(c.id),
        servers: c.servers,
        grpc_port_offset: c.grpc_port_offset,
        namespaces: c.namespaces,
        credentials,
        tls,
    })
}

/// The login, or the field within `auth` that is wrong and why.
fn credentials(
    a: AuthSection,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Credentials, (&'static str, String)> {
    let password = match (a.password, a.password_env) {
        (Some(p), None) => p,
        (None, Some(var)) => env(&var).ok_or_else(|| {
            (
                "auth.password_env",
                format!("environment variable {var} is not set"),
            )
        })?,
        _ => {
            return Err((
                "auth",
                "give exactly one of password and password_env".into(),
            ));
        }
    };
    Ok(Credentials {
        username: a.username,
        password,
    })
}

/// TLS options with the CA file read, or why it could not be.
fn tls(t: TlsSection, path: &Path) -> Result<TlsOptions, String> {
    let ca_pem = match t.ca_file {
        None => None,
        Some(f) => {
            let f = if f.is_relative() {
                path.parent().unwrap_or(Path::new(".")).join(f)
            } else {
                f
            };
            Some(std::fs::read(&f).map_err(|e| format!("cannot read {}: {e}", f.display()))?)
        }
    };
    Ok(TlsOptions {
        ca_pem,
        domain: t.domain,
    })
}

fn route(i: usize, r: RouteSection) -> Result<Route, Invalid> {
    let key = |field: &str| format!("routes[{i}].{field}");
    let mut route = Route::new(ClusterId(r.from), ClusterId(r.to))
        .map_err(|e| Invalid::new(key("to"), e.to_string()))?;
    let patterns = |list: Vec<String>, field: &str| -> Result<Vec<Pattern>, Invalid> {
        list.iter()
            .enumerate()
            .map(|(j, p)| {
                Pattern::new(p)
                    .map_err(|e| Invalid::new(key(&format!("{field}[{j}]")), e.to_string()))
            })
            .collect()
    };
    route.scope.include = patterns(r.include, "include")?;
    route.scope.exclude = patterns(r.exclude, "exclude")?;
    route.scope.namespaces = r.namespaces;
    route.scope.groups = r.groups;
    route.mapping.namespaces = r.map_namespaces;
    route.mapping.groups = r.map_groups;
    Ok(route)
}
