//! nacos-replicator: replicate Nacos 2.x and 3.x service registries across regions (tested
//! against Nacos 2.3 and 3.1).
//!
//! # Layout
//!
//! Data flows one way, and a module imports only from the rows below it:
//!
//! | module | owns |
//! |---|---|
//! | [`agent`] | the composition root (wiring, `run`, shutdown) and its engine (`agent::engine`: the state, one task, never awaiting the network) |
//! | [`config`] | the TOML file or a builder, checked into clusters, routes and timings |
//! | [`reconcile`] | routes, desired replica sets and plans: the replication rules, pure; the publish queue and the pacing limit (pure) and the publisher |
//! | [`cluster`] | one Nacos cluster kept alive: reconnect, redo, typed naming API, auth, the watcher; the `Registry` trait the publisher writes through |
//! | [`transport`] | one gRPC session: handshake, bi-stream pump, push replies, deadlines |
//! | [`wire`] | Nacos JSON messages in their protobuf envelope; conversion to the model |
//! | [`status`] | the status HTTP server: `/healthz`, `/readyz`, `/metrics`, `/status` |
//! | [`telemetry`] | the named events (each logs, counts and broadcasts), metrics with bounded labels, the status document |
//! | [`model`], [`runtime`] | domain types; backoff, task ownership and shutdown ([`runtime::Tasks`]), locks |
//! | `proto` | generated gRPC stubs, fenced |
//!
//! Every task is spawned through a [`runtime::Tasks`] its owner holds, named, and is waited
//! for when the owner stops: nothing the library starts outlives [`agent::Agent::run`].
//!
//! `testing` holds an in-process Nacos-compatible server for fault injection and the demo
//! (`testing::fake`, feature `fake`) and the harness that runs real Nacos servers
//! (`testing::nacos`, feature `testkit`, which includes `fake`). `demo` (feature `demo`) sits
//! above [`agent`]: it runs regions on the in-process server, an agent each, sample
//! applications and a live view, for `nacos-replicator demo`.
//!
//! # Features
//!
//! None is on by default: a dependency on this crate builds the library alone.
//!
//! | feature | adds |
//! |---|---|
//! | `fake` | `testing::fake`, the in-process Nacos-compatible server |
//! | `demo` | `demo`, regions and agents in one process (includes `fake`) |
//! | `testkit` | `testing::nacos`, the real-server harness the tests use (includes `fake`) |
//! | `cli` | the `nacos-replicator` binary and what only it needs: clap, anyhow, the log subscriber, mimalloc, signal handling (includes `demo`) |

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
