//! The in-memory [`Registry`] the publisher's and the engine's tests share.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::cluster::registry::{PublishError, Registry};
use crate::model::{DEFAULT_GROUP, DEFAULT_NAMESPACE, Instance, InstanceSet, ServiceKey};
use crate::runtime::lock;

/// Per name, a set acknowledged but not shown yet, and when it will be.
type Pending = HashMap<String, (Instant, Vec<Instance>)>;

/// An in-memory destination, the one test double of [`Registry`]: records
/// every call; fails the first `fail_first` calls (retryable unless
/// `fatal`); blocks while gated; shows what was last published per name (a
/// test can make it forget, as a destination that lost state). It holds
/// sets as [`Client`](crate::cluster::Client) does: the set given is held
/// from the call on (it would be redone after a reconnect), and one refused
/// for good gives way to the one before.
#[derive(Clone, Default)]
pub(crate) struct MemoryRegistry {
    pub(crate) calls: Arc<Mutex<Vec<(String, usize)>>>,
    pub(crate) fail_first: Arc<AtomicUsize>,
    pub(crate) fatal: bool,
    pub(crate) gate: Option<Arc<tokio::sync::Semaphore>>,
    pub(crate) shows: Arc<Mutex<HashMap<String, Vec<Instance>>>>,
    /// Calls begun (before the gate).
    pub(crate) entered: Arc<AtomicUsize>,
    /// What this writer holds per name (its redo set); unlike `shows`,
    /// a destination losing state does not change it.
    pub(crate) written: Arc<Mutex<HashMap<String, InstanceSet>>>,
    /// A destination whose view lags: what a publish writes shows only
    /// this long after it was acknowledged (Nacos answers queries from a
    /// view its push tasks refresh).
    pub(crate) show_lag: Option<Duration>,
    /// Sets acknowledged but not shown yet, and when they will be.
    pub(crate) later: Arc<Mutex<Pending>>,
}

impl Registry for MemoryRegistry {
    async fn publish(
        &self,
        _group: &str,
        name: &str,
        instances: InstanceSet,
    ) -> Result<(), PublishError> {
        self.entered.fetch_add(1, Ordering::SeqCst);
        if let Some(gate) = &self.gate {
            let _permit = gate
                .acquire()
                .await
                .map_err(|_| PublishError::message(false, "gate", "closed"))?;
        }
        lock(&self.calls).push((name.to_owned(), instances.len()));
        let previous = lock(&self.written).insert(name.to_owned(), instances.clone());
        if self.fail_first.load(Ordering::SeqCst) > 0 {
            self.fail_first.fetch_sub(1, Ordering::SeqCst);
            if self.fatal {
                let mut written = lock(&self.written);
                match previous {
                    Some(p) => written.insert(name.to_owned(), p),
                    None => written.remove(name),
                };
            }
            return Err(PublishError::message(!self.fatal, "fake", "refused"));
        }
        match self.show_lag {
            Some(lag) => {
                let due = Instant::now() + lag;
                lock(&self.later).insert(name.to_owned(), (due, instances.to_vec()));
            }
            None => {
                lock(&self.shows).insert(name.to_owned(), instances.to_vec());
            }
        }
        Ok(())
    }

    async fn read(&self, _group: &str, name: &str) -> Result<Vec<Instance>, PublishError> {
        let due = lock(&self.later).remove_entry(name);
        if let Some((key, (at, set))) = due {
            if at <= Instant::now() {
                lock(&self.shows).insert(key, set);
            } else {
                lock(&self.later).insert(key, (at, set));
            }
        }
        Ok(lock(&self.shows).get(name).cloned().unwrap_or_default())
    }

    fn published(&self, service: &ServiceKey) -> Option<InstanceSet> {
        lock(&self.written).get(&*service.name).cloned()
    }

    fn published_services(&self) -> Vec<ServiceKey> {
        lock(&self.written)
            .iter()
            .filter(|(_, set)| !set.is_empty())
            .map(|(n, _)| ServiceKey::new(DEFAULT_NAMESPACE, DEFAULT_GROUP, n.clone()))
            .collect()
    }
}
