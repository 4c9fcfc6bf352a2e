//! The replication rules, as pure functions: which services a route covers,
//! what each destination should hold, and what to do about it.
//!
//! No I/O here, except in `publish`, which reaches a destination only
//! through the [`publish::Registry`] trait. The source watcher hands in the latest full
//! snapshot of a service, the publisher hands in what it currently
//! publishes, and this module answers with a [`plan::Plan`]. Level
//! triggered: every answer is computed from full states, never from deltas,
//! so a lost or doubled push cannot corrupt anything.
//!
//! The rules (design §2), enforced here and nowhere else:
//! 1. only natives are exported: an instance that carries an origin tag is
//!    never exported again;
//! 2. nothing is written to the cluster named as its origin;
//! 3. the agent changes only what it owns: its publisher connection's own
//!    set per service (Nacos keeps one slot per connection and service, so
//!    a native or another agent's replica cannot be touched by a batch).

pub mod limit;
#[cfg(test)]
pub(crate) mod memory;
pub mod origin;
pub mod plan;
pub mod policy;
pub mod publish;
pub mod queue;
pub mod route;

pub use origin::{OriginTags, TagError};
pub use plan::{
    Decision, Desired, DriftDetail, Guard, Plan, Skipped, decide, desired, desired_with, drift,
    drift_detail, plan,
};
pub use policy::{Policy, ReplicateAll};
pub use route::{Mapping, Pattern, Route, RouteError, Scope};
