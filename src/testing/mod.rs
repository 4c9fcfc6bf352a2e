//! Test support, compiled only with the `testkit` feature.
//!
//! Owns everything the integration tests need that is not the replicator itself:
//!
//! - [`nacos`]: real Nacos 2.x servers, resolved by Maven and run as supervised `java`
//!   processes on free loopback ports, with an independent HTTP (v1 open API) client to seed
//!   and inspect them.
//!
//! Must not: be used by the library's own modules, read environment variables (callers pass
//! paths and options), or leave a process or a directory behind when a test ends, passes,
//! panics or is killed.

pub mod nacos;
