//! `diff`: what each destination is missing, holds extra, or holds
//! differently, compared with what the routes want there. Read-only: it
//! queries sources and destinations and writes nothing.
//!
//! It computes the wanted sets with the same rules as the running agent
//! (routes, policy, origin tags, the union of every source feeding one
//! destination service), from fresh queries rather than pushes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use super::{AgentError, Endpoint, owned_by_routes_into, start_client};
use crate::cluster::{Client, ClientError};
use crate::config::Config;
use crate::model::{ClusterId, Instance, ServiceKey};
use crate::reconcile::plan::canonical;
use crate::reconcile::{DriftDetail, Policy, desired_with, drift_detail};
use crate::runtime::Tasks;

/// `diff` could not read what it needs.
#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    /// A client could not be built.
    #[error(transparent)]
    Start(#[from] AgentError),
    /// A cluster namespace did not answer.
    #[error("{cluster}/{namespace}: {operation}")]
    Cluster {
        /// Cluster.
        cluster: ClusterId,
        /// Namespace.
        namespace: String,
        /// What was being done.
        operation: String,
        /// Why it failed.
        #[source]
        source: Box<ClientError>,
    },
}

/// One destination service that differs.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceDiff {
    /// Destination cluster.
    pub destination: ClusterId,
    /// Destination service (namespace, group, name).
    pub service: ServiceKey,
    /// What differs.
    pub detail: DriftDetail,
}

/// The whole comparison.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DiffReport {
    /// Destination services compared.
    pub compared: usize,
    /// Replicas wanted in all.
    pub wanted: usize,
    /// The services that differ, sorted by destination and service.
    pub differences: Vec<ServiceDiff>,
}

/// Compares every destination with what `config`'s routes (and `policy`)
/// want there. `connect_timeout` bounds the wait for each connection.
pub async fn diff(
    config: &Config,
    policy: &dyn Policy,
    connect_timeout: Duration,
) -> Result<DiffReport, DiffError> {
    let tasks = Tasks::default();
    let report = compare(config, policy, connect_timeout, &tasks).await;
    // Read-only: the connections are only closed, with a short grace.
    tasks.shutdown(Duration::from_secs(2)).await;
    report
}

async fn compare(
    config: &Config,
    policy: &dyn Policy,
    connect_timeout: Duration,
    tasks: &Tasks,
) -> Result<DiffReport, DiffError> {
    let mut clients: HashMap<Endpoint, Client> = HashMap::new();
    let mut client = |cluster: &ClusterId, ns: &str| -> Result<Client, DiffError> {
        let key = (cluster.clone(), ns.to_owned());
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let Some(spec) = config.cluster(cluster) else {
            return Err(DiffError::Start(AgentError::UnknownCluster {
                cluster: cluster.clone(),
            }));
        };
        let c = start_client(config, spec, ns, tasks)?;
        clients.insert(key, c.clone());
        Ok(c)
    };
    let fail = |c: &Client, operation: String| {
        let (cluster, namespace) = (c.cluster().clone(), c.namespace().to_owned());
        move |source| DiffError::Cluster {
            cluster,
            namespace,
            operation,
            source: Box::new(source),
        }
    };

    // Wanted: per destination service, per source service, the replicas.
    let mut wanted: BTreeMap<(ClusterId, ServiceKey), Vec<Instance>> = BTreeMap::new();
    let mut destinations: HashSet<Endpoint> = HashSet::new();
    let mut read: HashSet<Endpoint> = HashSet::new();
    for route in &config.routes {
        let (Some(from), Some(_)) = (
            config.cluster(route.source()),
            config.cluster(route.destination()),
        ) else {
            continue;
        };
        for (ns, landing) in route.namespace_pairs(&from.namespaces) {
            destinations.insert((route.destination().clone(), landing));
            let source = client(route.source(), &ns)?;
            source
                .wait_connected(connect_timeout)
                .await
                .map_err(fail(&source, "connecting".into()))?;
            let catalog = source
                .catalog()
                .await
                .map_err(fail(&source, "listing services".into()))?;
            for (group, name) in catalog {
                let key = ServiceKey::new(ns.clone(), group, name);
                if !route.covers(&key) || !policy.follows(route, &key) {
                    continue;
                }
                let snapshot = source
                    .query(&key.group, &key.name)
                    .await
                    .map_err(fail(&source, format!("querying {key}")))?;
                let d = desired_with(route, &config.tags, &snapshot, policy);
                wanted
                    .entry((route.destination().clone(), d.service))
                    .or_default()
                    .extend(d.replicas);
            }
            read.insert((route.source().clone(), ns));
        }
    }

    // Shown: every service of every destination namespace (extras can sit
    // in services nothing wants any more).
    let mut report = DiffReport::default();
    let mut endpoints: Vec<Endpoint> = destinations.into_iter().collect();
    endpoints.sort();
    for (cluster, ns) in endpoints {
        let dest = client(&cluster, &ns)?;
        dest.wait_connected(connect_timeout)
            .await
            .map_err(fail(&dest, "connecting".into()))?;
        let mut services: Vec<ServiceKey> = dest
            .catalog()
            .await
            .map_err(fail(&dest, "listing services".into()))?
            .into_iter()
            .map(|(group, name)| ServiceKey::new(ns.clone(), group, name))
            .collect();
        services.extend(
            wanted
                .keys()
                .filter(|(c, k)| *c == cluster && k.namespace == ns)
                .map(|(_, k)| k.clone()),
        );
        services.sort();
        services.dedup();
        let owned = owned_by_routes_into(config, &cluster);
        for service in services {
            let want = canonical(
                wanted
                    .get(&(cluster.clone(), service.clone()))
                    .cloned()
                    .unwrap_or_default(),
            );
            let shown = dest
                .query(&service.group, &service.name)
                .await
                .map_err(fail(&dest, format!("querying {service}")))?;
            let detail = drift_detail(&want, &shown.instances, |i| owned(i));
            report.compared += 1;
            report.wanted += want.len();
            if !detail.counts().is_none() {
                report.differences.push(ServiceDiff {
                    destination: cluster.clone(),
                    service,
                    detail,
                });
            }
        }
    }
    Ok(report)
}
