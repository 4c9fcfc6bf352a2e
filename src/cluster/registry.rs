//! A destination as the publisher sees it: the [`Registry`] trait, its one
//! real implementation ([`Client`]), and [`PublishError`]. `reconcile` sees
//! clusters only through this trait, so its tests need no network.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use super::{Client, ClientError};
use crate::model::{Instance, InstanceSet, ServiceKey};

/// A write the destination refused or could not take, with its cause.
#[derive(Debug, Clone)]
pub struct PublishError {
    /// Whether trying again later can succeed.
    pub retryable: bool,
    /// Stable label for metrics.
    pub kind: &'static str,
    /// What went wrong: the client's error, or a test double's message.
    pub source: Arc<dyn std::error::Error + Send + Sync>,
}

impl PublishError {
    /// An error with a plain message (test doubles, local refusals).
    pub fn message(retryable: bool, kind: &'static str, message: impl Into<String>) -> Self {
        let boxed: Box<dyn std::error::Error + Send + Sync> = message.into().into();
        PublishError {
            retryable,
            kind,
            source: Arc::from(boxed),
        }
    }
}

// Transparent: shows its cause's message and hands on the cause's own source,
// so an error chain prints each message once.
impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.source.fmt(f)
    }
}

impl std::error::Error for PublishError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.source()
    }
}

impl From<ClientError> for PublishError {
    fn from(e: ClientError) -> Self {
        PublishError {
            retryable: e.is_retryable(),
            kind: e.kind(),
            source: Arc::new(e),
        }
    }
}

/// One destination cluster namespace, through the calls the engine needs.
pub trait Registry: Send + Sync + 'static {
    /// Replaces this writer's whole set of instances of the service.
    fn publish(
        &self,
        group: &str,
        name: &str,
        instances: InstanceSet,
    ) -> impl Future<Output = Result<(), PublishError>> + Send;

    /// Everything the destination shows for the service (natives, our
    /// replicas, anyone else's), for the read-back.
    fn read(
        &self,
        group: &str,
        name: &str,
    ) -> impl Future<Output = Result<Vec<Instance>, PublishError>> + Send;

    /// The set this writer holds for the service: the last one given to
    /// [`Registry::publish`], which the destination has or will be given
    /// again after a reconnect, unless the destination refused it for good
    /// (then the one before). `None` when empty. The writer keeps it anyway
    /// for its redo; the publisher keeps no second copy.
    fn published(&self, service: &ServiceKey) -> Option<InstanceSet>;

    /// Services with a non-empty set.
    fn published_services(&self) -> Vec<ServiceKey>;
}

impl Registry for Client {
    async fn publish(
        &self,
        group: &str,
        name: &str,
        instances: InstanceSet,
    ) -> Result<(), PublishError> {
        Ok(Client::publish_set(self, group, name, instances).await?)
    }

    async fn read(&self, group: &str, name: &str) -> Result<Vec<Instance>, PublishError> {
        Ok(Client::query(self, group, name).await?.instances.to_vec())
    }

    fn published(&self, service: &ServiceKey) -> Option<InstanceSet> {
        self.published_set(service)
    }

    fn published_services(&self) -> Vec<ServiceKey> {
        self.published_keys()
    }
}
