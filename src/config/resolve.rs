//! From the file's sections to the engine's types, handed to the builder.
//!
//! Only what a file has and a builder does not happens here: passwords
//! named by `password_env` are looked up, CA files are read (relative to the
//! config file), and strings become [`Route`]s, [`Pattern`]s and
//! [`OriginTags`], whose constructors refuse what cannot work. The rules
//! across values are left to `check`, through [`ConfigBuilder::build`].

use std::path::Path;

use super::file::{AuthSection, ClusterSection, ConfigFile, RouteSection, TlsSection};
use super::{ClusterSpec, Config, ConfigBuilder, ControlToken, Invalid, UnsetSecret};
use crate::cluster::Credentials;
use crate::model::ClusterId;
use crate::reconcile::{OriginTags, Pattern, Route};
use crate::transport::TlsOptions;

/// How a secret the file names but this machine lacks is taken: a
/// `password_env` variable not set, a CA file not there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Secrets {
    /// An error: the configuration is meant to connect.
    Required,
    /// Noted (an empty password, TLS without the CA): the configuration is
    /// only shown.
    Noted,
}

/// The builder holding what `raw` says, ready to [`ConfigBuilder::build`],
/// and (with [`Secrets::Noted`]) the secrets that were not set.
pub(super) fn builder(
    raw: ConfigFile,
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    secrets: Secrets,
) -> Result<(ConfigBuilder, Vec<UnsetSecret>), Invalid> {
    let tags = OriginTags::new(&raw.agent.tag_prefix)
        .map_err(|e| Invalid::new("agent.tag_prefix", e.to_string()))?;
    let mut builder = Config::builder()
        .read_from(path)
        .tags(tags)
        .timings(raw.timings)
        .status_listen(raw.agent.status_listen)
        .log_format(raw.agent.log_format);
    let mut unset = Vec::new();
    if let Some(var) = &raw.agent.control_token_env {
        builder = builder.control_token(control_token(var, env, secrets, &mut unset)?);
    }
    for (i, c) in raw.clusters.into_iter().enumerate() {
        builder = builder.cluster(cluster(i, c, path, env, secrets, &mut unset)?);
    }
    for (i, r) in raw.routes.into_iter().enumerate() {
        builder = builder.route(route(i, r)?);
    }
    Ok((builder, unset))
}

fn cluster(
    i: usize,
    c: ClusterSection,
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    secrets: Secrets,
    unset: &mut Vec<UnsetSecret>,
) -> Result<ClusterSpec, Invalid> {
    let key = |field: &str| format!("clusters[{i}].{field}");
    let lookup = |var: &str| match (env(var), secrets) {
        (Some(value), _) => Ok(value),
        (None, Secrets::Noted) => {
            unset.push(UnsetSecret {
                key: key("auth.password_env"),
                reason: format!("environment variable {var} is not set"),
            });
            Ok(String::new())
        }
        (None, Secrets::Required) => Err(format!("environment variable {var} is not set")),
    };
    let credentials = c
        .auth
        .map(|a| credentials(a, lookup).map_err(|(field, reason)| Invalid::new(key(field), reason)))
        .transpose()?;
    let tls = match c.tls {
        None => None,
        Some(t) => {
            let domain = t.domain.clone();
            match (tls(t, path), secrets) {
                (Ok(options), _) => Some(options),
                // Shown, not used to connect: TLS without the CA, and a note.
                (Err(reason), Secrets::Noted) => {
                    unset.push(UnsetSecret {
                        key: key("tls.ca_file"),
                        reason,
                    });
                    Some(TlsOptions {
                        ca_pem: None,
                        domain,
                    })
                }
                (Err(reason), Secrets::Required) => {
                    return Err(Invalid::new(key("tls.ca_file"), reason));
                }
            }
        }
    };
    Ok(ClusterSpec {
        id: ClusterId(c.id),
        servers: c.servers,
        grpc_port_offset: c.grpc_port_offset,
        namespaces: c.namespaces,
        credentials,
        tls,
    })
}

/// The token `agent.control_token_env` names: required to run (`None`
/// and a note when only shown), never empty.
fn control_token(
    var: &str,
    env: &dyn Fn(&str) -> Option<String>,
    secrets: Secrets,
    unset: &mut Vec<UnsetSecret>,
) -> Result<Option<ControlToken>, Invalid> {
    const KEY: &str = "agent.control_token_env";
    match (env(var), secrets) {
        (Some(t), _) if t.trim().is_empty() => Err(Invalid::new(
            KEY,
            format!("environment variable {var} is empty"),
        )),
        (Some(t), _) => Ok(Some(ControlToken(t.trim().to_owned()))),
        (None, Secrets::Noted) => {
            unset.push(UnsetSecret {
                key: KEY.into(),
                reason: format!("environment variable {var} is not set"),
            });
            Ok(None)
        }
        (None, Secrets::Required) => Err(Invalid::new(
            KEY,
            format!("environment variable {var} is not set"),
        )),
    }
}

/// The login, or the field within `auth` that is wrong and why.
fn credentials(
    a: AuthSection,
    mut lookup: impl FnMut(&str) -> Result<String, String>,
) -> Result<Credentials, (&'static str, String)> {
    let password = match (a.password, a.password_env) {
        (Some(p), None) => p,
        (None, Some(var)) => lookup(&var).map_err(|reason| ("auth.password_env", reason))?,
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
