//! Test support: `fake` with the `fake` feature (which the `demo` feature turns on, so
//! the binary can run regions in process), `nacos` with the `testkit` feature.
//!
//! Owns everything the integration tests need that is not the replicator itself:
//!
//! - `nacos`: real Nacos servers of both lines we test against (2.3 and 3.1), resolved by Maven
//!   and run as supervised `java` processes on free loopback ports, with an independent HTTP
//!   client (2.x's v1 open API, 3.x's v3 admin API) to seed and inspect them.
//! - `fake`: an in-process Nacos-compatible server (gRPC and the HTTP calls our client
//!   makes) with knobs for faults: cut or reset connections, delayed, withheld or unacked
//!   pushes, failed or unanswered calls, stop and restart.
//!
//! Must not: be used by the replication modules (`agent` and everything below it; only
//! `demo`, which sits above the agent like the binary, runs `fake`), read environment variables (callers pass
//! paths and options), or leave a process or a directory behind when a test ends, passes,
//! panics or is killed.

pub mod fake;
#[cfg(feature = "testkit")]
pub mod nacos;
