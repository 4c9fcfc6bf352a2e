//! A first look at the client: starts a real Nacos 2.x server on loopback,
//! publishes instances of `orders` that change every two seconds, and
//! prints every snapshot the server pushes to a second client.
//!
//! Run with `scripts/demo` (or `cargo run --features testkit --example
//! live_watch -- [ROUNDS]`; 0 rounds runs until Ctrl-C).

use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use nacos_replicator::cluster::{Client, ClientConfig};
use nacos_replicator::model::{Instance, DEFAULT_GROUP, DEFAULT_NAMESPACE};
use nacos_replicator::testing::nacos::{Distribution, NacosServer, ServerOptions};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rounds: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(0);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    eprintln!("resolving the Nacos server (first run downloads it with Maven)...");
    let dist = Distribution::resolve(&root.join("target/nacos-server"), &root.join("testing/nacos-server/pom.xml"))?;
    eprintln!("starting Nacos on loopback...");
    let server = NacosServer::start(&dist, ServerOptions::default())?;
    let addr = format!("127.0.0.1:{}", server.http_port());
    eprintln!("Nacos is up: http://{addr}/nacos (gRPC on port {})", server.grpc_port());

    let shutdown = CancellationToken::new();
    let publisher = Client::start(ClientConfig::new("demo", vec![addr.clone()], DEFAULT_NAMESPACE), &shutdown)?;
    let watcher = Client::start(ClientConfig::new("demo", vec![addr], DEFAULT_NAMESPACE), &shutdown)?;
    publisher.wait_connected(Duration::from_secs(30)).await?;
    let mut pushes = watcher.subscribe(DEFAULT_GROUP, "orders").await?;

    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut round = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                round += 1;
                if rounds > 0 && round > rounds {
                    break;
                }
                // 1 to 4 instances, weights shifting each round.
                let n = 1 + (round % 4) as u8;
                let set: Vec<Instance> = (0..n)
                    .map(|i| Instance::new(format!("10.0.0.{}", i + 1), 8080).with_weight(f64::from(1 + (round as u8 + i) % 3)))
                    .collect();
                println!("publish #{round}: {} instance(s)", set.len());
                publisher.publish(DEFAULT_GROUP, "orders", set).await?;
            }
            Some(snapshot) = pushes.next() => {
                let hosts: Vec<String> = snapshot.instances.iter().map(|i| format!("{}:{} w={}", i.ip, i.port, i.weight)).collect();
                println!("  push  {}: {} instance(s) [{}]", snapshot.service, hosts.len(), hosts.join(", "));
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    shutdown.cancel();
    drop(server);
    Ok(())
}
