//! Generated gRPC code for the Nacos 2.x service (see `proto/`). Fenced here,
//! used only by `wire`, `transport` and `testing`.
#![allow(missing_docs, nonstandard_style, clippy::all, clippy::pedantic)]
include!(concat!(env!("OUT_DIR"), "/_.rs"));
