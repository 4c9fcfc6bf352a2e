//! The rules every configuration meets, from a file or from the builder.
//!
//! Pure: these functions read the assembled [`Config`] and name the first
//! broken rule by its key path. What a type's constructor already enforces
//! (a route's ends differ, globs and the tag prefix parse) is not repeated
//! here; what spans values is: ids and their uniqueness, servers,
//! namespaces, route ends and the namespaces they read and land in, timings.

use std::collections::{BTreeMap, BTreeSet};

use super::{ClusterSpec, Config, Invalid, Timings};
use crate::model::{ClusterId, ServerAddr};
use crate::reconcile::Route;

/// Every rule, in the order the file's sections come.
pub(super) fn config(config: &Config) -> Result<(), Invalid> {
    if config.clusters.is_empty() {
        return Err(Invalid::new(
            "clusters",
            "at least one cluster ([[clusters]] entry) is needed",
        ));
    }
    timings(&config.timings)?;
    clusters(&config.clusters)?;
    routes(&config.routes, &config.clusters)
}

fn timings(t: &Timings) -> Result<(), Invalid> {
    for (key, value) in [
        ("timings.list_interval", t.list_interval),
        ("timings.resync_interval", t.resync_interval),
        ("timings.request_timeout", t.request_timeout),
    ] {
        if value.is_zero() {
            return Err(Invalid::new(key, "must be above zero"));
        }
    }
    if t.max_publishes_per_second == 0 {
        return Err(Invalid::new(
            "timings.max_publishes_per_second",
            "must be at least 1",
        ));
    }
    if t.max_publishes_in_flight == 0 {
        return Err(Invalid::new(
            "timings.max_publishes_in_flight",
            "must be at least 1",
        ));
    }
    if t.max_reads_in_flight == 0 {
        return Err(Invalid::new(
            "timings.max_reads_in_flight",
            "must be at least 1",
        ));
    }
    if !(0.0..=1.0).contains(&t.mass_withdraw_share) {
        return Err(Invalid::new(
            "timings.mass_withdraw_share",
            format!("{} is not a share within 0.0..=1.0", t.mass_withdraw_share),
        ));
    }
    Ok(())
}

fn clusters(clusters: &[ClusterSpec]) -> Result<(), Invalid> {
    let mut seen = BTreeSet::new();
    for (i, c) in clusters.iter().enumerate() {
        let key = |field: &str| format!("clusters[{i}].{field}");
        let id = &c.id.0;
        if id.is_empty()
            || !id
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.'))
        {
            return Err(Invalid::new(
                key("id"),
                format!("{id:?} must be non-empty letters, digits, '-', '_' or '.'"),
            ));
        }
        if !seen.insert(id) {
            return Err(Invalid::new(
                key("id"),
                format!("duplicate cluster id {id:?}"),
            ));
        }
        servers(c, &key)?;
        if c.namespaces.is_empty() || c.namespaces.iter().any(String::is_empty) {
            return Err(Invalid::new(
                key("namespaces"),
                "list at least one namespace id (the default one is \"public\")",
            ));
        }
    }
    Ok(())
}

/// Each server is `host:http_port`, and the gRPC port beside it exists.
fn servers(c: &ClusterSpec, key: &dyn Fn(&str) -> String) -> Result<(), Invalid> {
    if c.servers.is_empty() {
        return Err(Invalid::new(
            key("servers"),
            "at least one host:port is needed",
        ));
    }
    for (j, s) in c.servers.iter().enumerate() {
        let grpc = ServerAddr::parse(s).and_then(|a| a.grpc(c.grpc_port_offset));
        if grpc.is_err() {
            return Err(Invalid::new(
                key(&format!("servers[{j}]")),
                format!(
                    "{s:?} is not host:port with the HTTP port (gRPC is that plus {})",
                    c.grpc_port_offset
                ),
            ));
        }
    }
    Ok(())
}

fn routes(routes: &[Route], clusters: &[ClusterSpec]) -> Result<(), Invalid> {
    for (i, r) in routes.iter().enumerate() {
        route(i, r, clusters)?;
    }
    let mut pairs = BTreeMap::new();
    for (i, r) in routes.iter().enumerate() {
        if let Some(first) = pairs.insert((r.source(), r.destination()), i) {
            return Err(Invalid::new(
                format!("routes[{i}]"),
                format!("same source and destination as routes[{first}]; merge their scopes"),
            ));
        }
    }
    Ok(())
}

/// Both ends exist; the route reads only namespaces its source serves, and
/// each lands in one its destination serves.
fn route(i: usize, r: &Route, clusters: &[ClusterSpec]) -> Result<(), Invalid> {
    let key = |field: &str| format!("routes[{i}].{field}");
    let find = |id: &ClusterId, field: &str| {
        clusters
            .iter()
            .find(|c| &c.id == id)
            .ok_or_else(|| Invalid::new(key(field), format!("no cluster has id {:?}", id.0)))
    };
    let from = find(r.source(), "from")?;
    let to = find(r.destination(), "to")?;
    for (j, ns) in r.scope.namespaces.iter().enumerate() {
        if !from.namespaces.contains(ns) {
            return Err(Invalid::new(
                key(&format!("namespaces[{j}]")),
                format!(
                    "namespace {ns:?} is not among cluster {:?}'s namespaces {:?}",
                    from.id.0, from.namespaces
                ),
            ));
        }
    }
    let read = if r.scope.namespaces.is_empty() {
        &from.namespaces
    } else {
        &r.scope.namespaces
    };
    for ns in read {
        let landing = r.mapping.namespaces.get(ns).unwrap_or(ns);
        if !to.namespaces.contains(landing) {
            return Err(Invalid::new(
                key("map_namespaces"),
                format!(
                    "namespace {ns:?} would land in {landing:?}, which cluster {:?} does not serve (namespaces {:?})",
                    to.id.0, to.namespaces
                ),
            ));
        }
    }
    Ok(())
}
