//! The typed naming calls: list a group, query a service, register,
//! deregister and publish instances. A publication is recorded in the redo
//! table (`Owned::published`) before it is sent, so the supervisor can
//! replay it on every new session; a set the server refuses as invalid is
//! taken back out.

use std::collections::HashMap;

use super::calls::refused_as_invalid;
use super::{Client, ClientError};
use crate::model::{Instance, InstanceSet, ServiceKey, ServiceSnapshot};
use crate::wire::convert;

impl Client {
    /// Every service name in `group` (all pages).
    pub async fn list_services(&self, group: &str) -> Result<Vec<String>, ClientError> {
        let mut names = Vec::new();
        let page_size = self.shared.config.list_page_size.max(1);
        for page in 1u32.. {
            let request =
                convert::list_request(&self.shared.config.namespace, group, page, page_size);
            let reply = self.call("list services", &request).await?;
            let got = reply.service_names.unwrap_or_default();
            let short = got.len() < page_size as usize;
            names.extend(got);
            if short || names.len() as u64 >= reply.count {
                break;
            }
        }
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// The service's current hosts, read once.
    pub async fn query(&self, group: &str, name: &str) -> Result<ServiceSnapshot, ClientError> {
        let key = self.key(group, name);
        let reply = self
            .call("query service", &convert::query_request(&key))
            .await?;
        self.snapshot_of(reply.service_info.as_ref(), &key)
    }

    /// Registers one instance. Nacos keeps one slot per connection and
    /// service, so this replaces whatever this client published there.
    pub async fn register(
        &self,
        group: &str,
        name: &str,
        instance: Instance,
    ) -> Result<(), ClientError> {
        let key = self.key(group, name);
        let request = convert::instance_request(&key, convert::InstanceOp::Register, &instance);
        let previous = self
            .owned()
            .published
            .insert(key.clone(), vec![instance].into());
        let result = self.apply("register instance", &request).await;
        self.forget_if_refused(&result, key, previous);
        result
    }

    /// Withdraws what this client registered for the service.
    pub async fn deregister(
        &self,
        group: &str,
        name: &str,
        instance: Instance,
    ) -> Result<(), ClientError> {
        let key = self.key(group, name);
        let request = convert::instance_request(&key, convert::InstanceOp::Deregister, &instance);
        self.owned().published.remove(&key);
        self.apply("deregister instance", &request).await
    }

    /// Publishes the full set of instances this client holds for a service,
    /// in one batch that replaces the previous set exactly. An empty set
    /// withdraws them all.
    ///
    /// The set is recorded before it is sent and re-published after every
    /// reconnect, so an error (say, no connection right now) loses nothing:
    /// the set is applied once the cluster is back. Calls for one service
    /// must not overlap (the last one recorded is the one redone).
    pub async fn publish(
        &self,
        group: &str,
        name: &str,
        instances: Vec<Instance>,
    ) -> Result<(), ClientError> {
        self.publish_set(group, name, instances.into()).await
    }

    /// As [`Client::publish`], keeping the caller's shared set as the redo
    /// record (no copy).
    pub async fn publish_set(
        &self,
        group: &str,
        name: &str,
        instances: InstanceSet,
    ) -> Result<(), ClientError> {
        let key = self.key(group, name);
        let previous = {
            let mut owned = self.owned();
            if instances.is_empty() {
                // A new connection owns nothing: an empty set needs no redo.
                owned.published.remove(&key)
            } else {
                owned.published.insert(key.clone(), instances.clone())
            }
        };
        let request = convert::BatchRegister {
            service: &key,
            instances: &instances,
        };
        let result = self.apply("publish instances", &request).await;
        self.forget_if_refused(&result, key, previous);
        result
    }

    /// A set the server refused as invalid (400) was not applied and never
    /// will be: the server still holds the previous one, so that is what the
    /// redo must replay. Kept, a refused set would fail every redo and keep
    /// the client from ever reconnecting.
    fn forget_if_refused(
        &self,
        result: &Result<(), ClientError>,
        key: ServiceKey,
        previous: Option<InstanceSet>,
    ) {
        if !result.as_ref().is_err_and(refused_as_invalid) {
            return;
        }
        let mut owned = self.owned();
        match previous {
            Some(set) => owned.published.insert(key, set),
            None => owned.published.remove(&key),
        };
    }

    /// What this client currently publishes, per service.
    pub fn published(&self) -> HashMap<ServiceKey, Vec<Instance>> {
        self.owned()
            .published
            .iter()
            .map(|(k, v)| (k.clone(), v.to_vec()))
            .collect()
    }

    /// The set this client publishes for one service (without copying the rest).
    pub fn published_set(&self, service: &ServiceKey) -> Option<InstanceSet> {
        self.owned().published.get(service).cloned()
    }

    /// The services this client publishes a set for.
    pub fn published_keys(&self) -> Vec<ServiceKey> {
        self.owned().published.keys().cloned().collect()
    }
}
