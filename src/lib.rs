//! nacos-replicator: replicate Nacos 2.x and 3.x service registries across regions (tested
//! against Nacos 2.3 and 3.1).
//!
//! # Layout
//!
//! Data flows one way, and a module imports only from the rows below it:
//!
//! | module | owns |
//! |---|---|
//! | [`agent`] | the composition root: clients, watchers, engine, publishers |
//! | [`config`] | the TOML file, checked into clusters, routes and timings |
//! | [`reconcile`] | routes, desired replica sets and plans: the replication rules, pure |
//! | [`cluster`] | one Nacos cluster kept alive: reconnect, redo, typed naming API, auth |
//! | [`transport`] | one gRPC session: handshake, bi-stream pump, push replies, deadlines |
//! | [`wire`] | Nacos JSON messages in their protobuf envelope; conversion to the model |
//! | [`status`] | the status HTTP server: `/healthz`, `/readyz`, `/metrics`, `/status` |
//! | [`telemetry`] | metrics with bounded labels, the event stream, the status document |
//! | [`model`], [`runtime`] | domain types; backoff and other Nacos-free machinery |
//! | `proto` | generated gRPC stubs, fenced |
//!
//! `testing` holds an in-process Nacos-compatible server for fault injection and the demo
//! (`testing::fake`, feature `fake`) and the harness that runs real Nacos servers
//! (`testing::nacos`, feature `testkit`, which includes `fake`). `demo` (feature `demo`, on by
//! default) sits above [`agent`]: it runs regions on the in-process server, an agent each, sample
//! applications and a live view, for `nacos-replicator demo`.

pub mod agent;
pub mod cluster;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod model;
pub(crate) mod proto;
pub mod reconcile;
pub mod runtime;
pub mod status;
pub mod telemetry;
#[cfg(feature = "fake")]
pub mod testing;
pub mod transport;
pub mod wire;
