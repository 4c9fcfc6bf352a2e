//! `diff`: what each destination is missing, holds extra, or holds
//! differently, compared with what the routes want there. Read-only: it
//! queries sources and destinations and writes nothing.
//!
//! It computes the wanted sets with the same rules as the running agent
//! (routes, policy, origin tags, the union of every source feeding one
//! destination service), from fresh queries rather than pushes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use super::wiring::owned_by_routes_into;
use super::{AgentError, Endpoint, start_client};
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
    let mut c = Comparison {
        config,
        policy,
        connect_timeout,
        tasks,
        clients: HashMap::new(),
    };
    let (wanted, destinations) = c.wanted().await?;
    // Shown: every service of every destination namespace (extras can sit
    // in services nothing wants any more).
    let mut report = DiffReport::default();
    let mut endpoints: Vec<Endpoint> = destinations.into_iter().collect();
    endpoints.sort();
    for (cluster, ns) in endpoints {
        c.compare_destination(&cluster, &ns, &wanted, &mut report)
            .await?;
    }
    Ok(report)
}

/// Per destination service, what every source service routed to it wants.
type Wanted = BTreeMap<(ClusterId, ServiceKey), Vec<Instance>>;

/// One `diff` run: its clients, one per cluster namespace, opened on first use.
struct Comparison<'a> {
    config: &'a Config,
    policy: &'a dyn Policy,
    connect_timeout: Duration,
    tasks: &'a Tasks,
    clients: HashMap<Endpoint, Client>,
}

impl Comparison<'_> {
    /// A connected client of `cluster`/`ns`.
    async fn connected(&mut self, cluster: &ClusterId, ns: &str) -> Result<Client, DiffError> {
        let key = (cluster.clone(), ns.to_owned());
        let client = match self.clients.get(&key) {
            Some(c) => c.clone(),
            None => {
                let Some(spec) = self.config.cluster(cluster) else {
                    return Err(DiffError::Start(AgentError::UnknownCluster {
                        cluster: cluster.clone(),
                    }));
                };
                let c = start_client(self.config, spec, ns, self.tasks)?;
                self.clients.insert(key, c.clone());
                c
            }
        };
        client
            .wait_connected(self.connect_timeout)
            .await
            .map_err(fail(&client, "connecting".into()))?;
        Ok(client)
    }

    /// Reads every source the routes cover: what each destination service
    /// should hold, and the destination namespaces to look at.
    async fn wanted(&mut self) -> Result<(Wanted, HashSet<Endpoint>), DiffError> {
        let (config, policy) = (self.config, self.policy);
        let mut wanted = Wanted::new();
        let mut destinations: HashSet<Endpoint> = HashSet::new();
        for route in &config.routes {
            let (Some(from), Some(_)) = (
                config.cluster(route.source()),
                config.cluster(route.destination()),
            ) else {
                continue;
            };
            for (ns, landing) in route.namespace_pairs(&from.namespaces) {
                destinations.insert((route.destination().clone(), landing));
                let source = self.connected(route.source(), &ns).await?;
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
            }
        }
        Ok((wanted, destinations))
    }

    /// Compares every service of one destination namespace (listed, or
    /// wanted there) with what is wanted, into `report`.
    async fn compare_destination(
        &mut self,
        cluster: &ClusterId,
        ns: &str,
        wanted: &Wanted,
        report: &mut DiffReport,
    ) -> Result<(), DiffError> {
        let dest = self.connected(cluster, ns).await?;
        let mut services: Vec<ServiceKey> = dest
            .catalog()
            .await
            .map_err(fail(&dest, "listing services".into()))?
            .into_iter()
            .map(|(group, name)| ServiceKey::new(ns, group, name))
            .collect();
        services.extend(
            wanted
                .keys()
                .filter(|(c, k)| c == cluster && *k.namespace == *ns)
                .map(|(_, k)| k.clone()),
        );
        services.sort();
        services.dedup();
        let owned = owned_by_routes_into(self.config, cluster);
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
        Ok(())
    }
}

/// Wraps a client call's error with where it happened.
fn fail(c: &Client, operation: String) -> impl FnOnce(ClientError) -> DiffError + use<> {
    let (cluster, namespace) = (c.cluster().clone(), c.namespace().to_owned());
    move |source| DiffError::Cluster {
        cluster,
        namespace,
        operation,
        source: Box::new(source),
    }
}
