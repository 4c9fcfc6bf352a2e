//! One Nacos cluster kept alive, with a typed naming API.
//!
//! Owns the reconnect loop (jittered backoff across the cluster's servers,
//! ConnectReset to a named server), the redo of everything the client owns
//! after every reconnect (publications and subscriptions), access tokens, and
//! the routing of pushes to subscribers. It speaks to servers only through
//! `transport::Session` and builds messages only through `wire`.
//!
//! One client serves one namespace: Nacos pushes carry no namespace, so a
//! connection that subscribed in two namespaces could not tell them apart.

mod auth;
mod client;
pub mod registry;
pub mod watch;

pub use auth::{AuthError, Credentials};
pub use client::{
    CatalogApi, CatalogProbe, Client, ClientConfig, ClientError, ConnectionState, ServerInfo,
    Subscription,
};
pub use registry::{PublishError, Registry};
