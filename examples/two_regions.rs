//! Two regions replicating, with the agent embedded as a library.
//!
//! Starts two real Nacos 2.x servers on loopback ("east" and "west"), runs
//! one agent per region in this process (the sidecar "import" model: each
//! agent copies its peer's natives into its own region), registers sample
//! services that change every few seconds, and prints the agents' events
//! and a view of what each region holds.
//!
//! Each agent's configuration is built in code (`Config::builder()`, checked
//! by the same rules as a file). The agents use a custom [`Policy`]:
//! instances marked `local-only` stay home, and every copy says which agent
//! imported it. That is the part to copy into your own tooling:
//! `Agent::new(config).with_policy(..)`, then `events()` and `run(token)`.
//!
//! Run with `scripts/demo-real` (or `cargo run --features testkit --example
//! two_regions -- [ROUNDS]`; 0 rounds runs until Ctrl-C).

use std::path::Path;
use std::time::Duration;

use nacos_replicator::agent::Agent;
use nacos_replicator::cluster::{Client, ClientConfig};
use nacos_replicator::config::{ClusterSpec, Config, Timings};
use nacos_replicator::model::{ClusterId, DEFAULT_GROUP, DEFAULT_NAMESPACE, Instance, ServiceKey};
use nacos_replicator::reconcile::{Policy, Route};
use nacos_replicator::runtime::Tasks;
use nacos_replicator::telemetry::{Event, Telemetry};
use nacos_replicator::testing::nacos::{Distribution, NacosServer, ServerOptions};
use tokio_util::sync::CancellationToken;

/// Keeps `local-only` instances home and labels every copy.
struct DemoPolicy {
    agent: &'static str,
}

impl Policy for DemoPolicy {
    fn admits(&self, _route: &Route, _service: &ServiceKey, native: &Instance) -> bool {
        native.metadata.get("local-only") != Some("true")
    }

    fn transform(&self, _route: &Route, _service: &ServiceKey, copy: Instance) -> Instance {
        copy.with_metadata("imported-by", self.agent)
    }
}

const SERVICES: [&str; 2] = ["orders", "payments"];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rounds: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(0);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    eprintln!("resolving the Nacos server (the first run downloads it with Maven)...");
    let dist = Distribution::resolve(
        &root.join("target/nacos-server"),
        &root.join("testing/nacos-2.3/pom.xml"),
    )?;
    eprintln!("starting two Nacos servers on loopback (east, west)...");
    let (east, west) = std::thread::scope(|s| {
        let e = s.spawn(|| NacosServer::start(&dist, ServerOptions::default()));
        let w = s.spawn(|| NacosServer::start(&dist, ServerOptions::default()));
        (e.join(), w.join())
    });
    let (east, west) = match (east, west) {
        (Ok(e), Ok(w)) => (e?, w?),
        _ => anyhow::bail!("a server start thread panicked"),
    };
    let addr = |s: &NacosServer| format!("127.0.0.1:{}", s.http_port());
    eprintln!(
        "east: http://{}/nacos   west: http://{}/nacos",
        addr(&east),
        addr(&west)
    );

    let shutdown = CancellationToken::new();
    // One agent per region, each importing its peer's natives.
    let mut agents = Vec::new();
    for (home, peer) in [("east", "west"), ("west", "east")] {
        // Checked by the same rules as a configuration file.
        let config = Config::builder()
            .timings(Timings {
                list_interval: Duration::from_secs(1),
                ..Timings::default()
            })
            .cluster(ClusterSpec::new("east", [addr(&east)]))
            .cluster(ClusterSpec::new("west", [addr(&west)]))
            .route(Route::new(
                ClusterId(peer.to_owned()),
                ClusterId(home.to_owned()),
            )?)
            .build()?;
        let agent = Agent::new(config).with_policy(DemoPolicy { agent: home });
        let telemetry = agent.telemetry();
        tokio::spawn(print_events(home, agent.events()));
        agents.push((home, telemetry, tokio::spawn(agent.run(shutdown.clone()))));
    }

    // Applications: one client per region registering its natives, on
    // tasks of their own, stopped and waited for after the agents.
    let apps = Tasks::new(shutdown.child_token());
    let app = |s: &NacosServer| {
        Client::start(
            ClientConfig::new("app", vec![addr(s)], DEFAULT_NAMESPACE),
            &apps,
        )
    };
    let (app_east, app_west) = (app(&east)?, app(&west)?);
    app_east.wait_connected(Duration::from_secs(30)).await?;
    app_west.wait_connected(Duration::from_secs(30)).await?;

    let mut tick = tokio::time::interval(Duration::from_secs(3));
    let mut round = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                round += 1;
                if rounds > 0 && round > rounds {
                    break;
                }
                println!("--- round {round}: what each region holds ---");
                for (region, client) in [("east", &app_east), ("west", &app_west)] {
                    println!("{}", view(region, client, &agents.iter().find(|a| a.0 == region).map(|a| a.1.clone())).await);
                }
                // east scales orders between 1 and 3; west keeps payments and a local-only admin.
                let n = 1 + (round % 3) as u8;
                let orders: Vec<Instance> =
                    (0..n).map(|i| Instance::new(format!("10.1.0.{}", i + 1), 8080).with_metadata("zone", "east-1")).collect();
                app_east.publish(DEFAULT_GROUP, "orders", orders).await?;
                let payments = vec![
                    Instance::new("10.2.0.1", 9090).with_weight(1.0 + (round % 2) as f64),
                    Instance::new("10.2.0.9", 9090).with_metadata("local-only", "true"),
                ];
                app_west.publish(DEFAULT_GROUP, "payments", payments).await?;
                println!("    east now publishes {n} orders instance(s)");
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    shutdown.cancel();
    for (home, _, task) in agents {
        match task.await {
            Ok(Ok(())) => eprintln!("agent {home} stopped"),
            Ok(Err(e)) => eprintln!("agent {home} failed: {e}"),
            Err(e) => eprintln!("agent {home} panicked: {e}"),
        }
    }
    apps.shutdown(std::time::Duration::from_secs(2)).await;
    drop((east, west));
    Ok(())
}

/// One line per service: natives and replicas (with their origin).
async fn view(region: &str, client: &Client, telemetry: &Option<Telemetry>) -> String {
    let mut lines = Vec::new();
    for name in SERVICES {
        let shown = match client.query(DEFAULT_GROUP, name).await {
            Ok(s) => s.instances,
            Err(e) => {
                lines.push(format!("  {region:<5} {name:<9} unreadable: {e}"));
                continue;
            }
        };
        let mut hosts: Vec<String> = shown
            .iter()
            .map(|i| match i.metadata.get("rpl.origin") {
                Some(origin) => format!("{}:{} (from {origin})", i.ip, i.port),
                None => format!("{}:{}", i.ip, i.port),
            })
            .collect();
        hosts.sort();
        lines.push(format!("  {region:<5} {name:<9} {}", hosts.join(", ")));
    }
    if let Some(t) = telemetry {
        let s = t.status();
        let lag = s.destinations.values().filter_map(|d| d.last_lag_ms).max();
        lines.push(format!(
            "  {region:<5} agent: ready={} replicas={} last lag={}",
            s.ready,
            s.routes.values().map(|r| r.replicas).sum::<usize>(),
            lag.map_or("-".to_owned(), |l| format!("{l} ms"))
        ));
    }
    lines.join("\n")
}

async fn print_events(agent: &'static str, mut events: tokio::sync::broadcast::Receiver<Event>) {
    loop {
        match events.recv().await {
            Ok(Event::Replicated {
                service,
                replicas,
                lag,
                ..
            }) => {
                println!(
                    "  [{agent}] replicated {} x{replicas} (lag {})",
                    service.name,
                    ms(lag)
                );
            }
            Ok(Event::Withdrawn { service, lag, .. }) => {
                println!("  [{agent}] withdrawn {} (lag {})", service.name, ms(lag))
            }
            Ok(Event::Ready) => println!("  [{agent}] first full sync done"),
            Ok(Event::Error {
                cluster,
                operation,
                message,
                ..
            }) => println!("  [{agent}] error on {cluster} ({operation}): {message}"),
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                println!("  [{agent}] ({n} events skipped)")
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

fn ms(lag: Option<Duration>) -> String {
    lag.map_or("-".to_owned(), |l| format!("{} ms", l.as_millis()))
}
