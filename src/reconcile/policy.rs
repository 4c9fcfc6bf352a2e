//! Custom replication rules for embedders: which services a route follows,
//! which natives it copies, and how a copy is changed before it is tagged.
//!
//! A policy narrows or reshapes; it cannot break the rules of this module's
//! parent: the origin tag is written after the transform (so a policy can
//! neither forge nor drop it), only natives reach it, and nothing is ever
//! written to its origin. Policies are called on the engine's task for every
//! snapshot: keep them fast and free of I/O.

use super::route::Route;
use crate::model::{Instance, ServiceKey};

/// Filters and transforms on top of the routes. Every method has a default
/// that changes nothing.
pub trait Policy: Send + Sync + 'static {
    /// Whether `route` follows `service` at all (subscribes to it). Called
    /// only for services the route's scope already covers.
    fn follows(&self, route: &Route, service: &ServiceKey) -> bool {
        let _ = (route, service);
        true
    }

    /// Whether this native of `service` is copied along `route`.
    fn admits(&self, route: &Route, service: &ServiceKey, native: &Instance) -> bool {
        let _ = (route, service, native);
        true
    }

    /// The copy to publish (before the origin tag is added).
    fn transform(&self, route: &Route, service: &ServiceKey, copy: Instance) -> Instance {
        let _ = (route, service);
        copy
    }
}

/// The default: every covered service, every native, unchanged.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReplicateAll;

impl Policy for ReplicateAll {}
