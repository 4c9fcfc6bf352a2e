//! Generates the gRPC stubs from `proto/` into `OUT_DIR`.
//!
//! The proto is compiled by `protox`, a protobuf compiler written in Rust, so
//! a fresh machine needs no system `protoc` and no downloaded binary: the
//! build works wherever `cargo` does (any target, static musl builds too).
//! Client stubs are used by `transport`; server stubs by the testkit server.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const PROTO: &str = "proto/nacos_grpc_service.proto";
    println!("cargo:rerun-if-changed={PROTO}");
    let descriptors = protox::compile([PROTO], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
