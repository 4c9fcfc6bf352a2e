# The nacos-replicator image: one static (musl) binary, alone on an empty
# file system, run as a numeric non-root user.
#
#   podman build -t nacos-replicator .          # or: docker build -t nacos-replicator .
#   podman run --rm -p 9787:9787 -v ./agent.toml:/etc/nacos-replicator/agent.toml:ro nacos-replicator
#
# The configuration is mounted, not baked in; in a container its
# `agent.status_listen` must be "0.0.0.0:9787" (the default, 127.0.0.1,
# cannot be reached from outside the container).
#
# Stages: `build` compiles the binary (needs the Rust image from a
# registry); `runtime-base` is everything the image is but the binary;
# the last stage (the default) adds the binary from `build`. `prebuilt`
# adds one built elsewhere instead, taken from the build context:
#
#   cargo build --release --features cli --target x86_64-unknown-linux-musl
#   mkdir ctx && cp target/x86_64-unknown-linux-musl/release/nacos-replicator ctx/
#   podman build --target prebuilt -f Dockerfile -t nacos-replicator ctx
#
# (tests/image.rs builds `prebuilt` that way: a `FROM scratch` build needs no
# registry, and the builder stage, unused by that target, is skipped.)
#
# TLS needs no CA bundle in the image: the agent trusts the Mozilla roots
# compiled into it (webpki-roots), plus the `clusters.tls.ca_file` of the
# configuration. Name resolution reads the /etc/hosts and /etc/resolv.conf
# that the container runtime mounts.

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-alpine AS build
# Alpine's C toolchain targets musl: ring and mimalloc compile their C with it.
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY . .
RUN cargo build --locked --release --features cli --target x86_64-unknown-linux-musl \
    && cp target/x86_64-unknown-linux-musl/release/nacos-replicator /nacos-replicator

FROM scratch AS runtime-base
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="nacos-replicator" \
      org.opencontainers.image.description="Replication agent for Nacos 2.x and 3.x service registries" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# 65532: the conventional "nonroot" id. Numeric, so no /etc/passwd is needed
# and Kubernetes' runAsNonRoot can check it.
USER 65532:65532
# The status server (/healthz, /readyz, /metrics, /status) at the port of
# `agent.status_listen`.
EXPOSE 9787
ENTRYPOINT ["/usr/local/bin/nacos-replicator"]
CMD ["run", "--config", "/etc/nacos-replicator/agent.toml"]

FROM runtime-base AS prebuilt
COPY nacos-replicator /usr/local/bin/nacos-replicator

FROM runtime-base
COPY --from=build /nacos-replicator /usr/local/bin/nacos-replicator
