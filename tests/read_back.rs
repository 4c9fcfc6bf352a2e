//! The destination read-back on two real Nacos regions under churn:
//! no drift reported where there is none, and drift reported where an
//! operator changed a replica behind the agent's back.
//!
//! Runs on 2.3.2 and, in `scripts/test`'s second pass, on 3.1 (the edit then
//! goes through the v3 admin API: 3.1's v1 API answers 410). Its own file:
//! `real_nacos.rs` is past the size a file should have.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nacos_replicator::agent::Agent;
use nacos_replicator::cluster::Client;
use nacos_replicator::model::{ClusterId, DEFAULT_GROUP, Instance};
use nacos_replicator::reconcile::OriginTags;
use nacos_replicator::runtime::Tasks;
use nacos_replicator::telemetry::Event;
use nacos_replicator::testing::nacos::HttpInstance;
use support::*;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// Changes per second at the source during the churn.
const CHANGES_PER_SECOND: u32 = 5;
/// How long the churn lasts.
const CHURN_FOR: Duration = Duration::from_secs(35);
/// Services changed every 1.2 s: never settled, so never compared.
const HOT: usize = 3;
/// Services changed every 8 s: settled (past the read-back's 5 s) for a few
/// seconds between changes, so read back while others are in flight, and
/// changed again right after some of those rounds.
const WARM: usize = 20;

/// What the source holds, service by service, and the changes made to it.
struct Source {
    app: Client,
    services: BTreeMap<String, Vec<Instance>>,
    changes: u32,
}

impl Source {
    fn new(app: Client) -> Self {
        let mut services = BTreeMap::new();
        for (i, name) in names().into_iter().enumerate() {
            let net = format!("10.{}.0", 100 + i);
            services.insert(name, instances_on(&net, 2, 7400));
        }
        Self {
            app,
            services,
            changes: 0,
        }
    }

    async fn publish_all(&self) {
        for (name, natives) in &self.services {
            self.app
                .publish(DEFAULT_GROUP, name, natives.clone())
                .await
                .expect("natives at the source");
        }
    }

    /// The `n`-th change: every other one to a hot service, the rest to a warm
    /// one; in turn an instance added, a weight, a metadata change, an
    /// instance removed (never the last one).
    async fn change(&mut self, n: usize) {
        let names = names();
        let name = if n.is_multiple_of(2) {
            names[(n / 2) % HOT].clone()
        } else {
            names[HOT + (n / 2) % WARM].clone()
        };
        let set = self.services.get_mut(&name).expect("known service");
        let round = self.changes;
        match (n / 2) % 4 {
            0 => {
                let last = set.last().cloned().expect("never empty");
                let port = last.port + 1;
                set.push(Instance::new(last.ip.clone(), port).with_metadata("idx", "new"));
            }
            1 => set[0] = set[0].clone().with_weight(f64::from(round % 7 + 1)),
            2 => set[0] = set[0].clone().with_metadata("version", round.to_string()),
            _ if set.len() > 1 => {
                set.pop();
            }
            _ => set[0] = set[0].clone().with_metadata("version", "again"),
        }
        self.changes += 1;
        self.app
            .publish(DEFAULT_GROUP, &name, set.clone())
            .await
            .expect("change at the source");
    }
}

fn names() -> Vec<String> {
    (0..HOT)
        .map(|i| format!("hot-{i}"))
        .chain((0..WARM).map(|i| format!("warm-{i}")))
        .collect()
}

fn replicas(natives: &[Instance]) -> Vec<Instance> {
    let tags = OriginTags::default();
    natives
        .iter()
        .map(|n| tags.tag(n, &ClusterId("a".into())).expect("fits"))
        .collect()
}

/// Waits until the destination shows exactly the replicas of `services`.
async fn converged(reader: &Client, services: &BTreeMap<String, Vec<Instance>>, what: &str) {
    eventually(what, Duration::from_secs(40), || {
        let reader = reader.clone();
        let services = services.clone();
        async move {
            for (name, natives) in &services {
                let shown = reader.query(DEFAULT_GROUP, name).await.ok()?;
                if fingerprint(&shown.instances) != fingerprint(&replicas(natives)) {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
}

/// Drift events received so far, as `(service, missing, different, extra)`.
fn drifts(events: &mut broadcast::Receiver<Event>) -> Vec<(String, usize, usize, usize)> {
    let mut out = Vec::new();
    loop {
        match events.try_recv() {
            Ok(Event::Drift {
                service,
                missing,
                different,
                extra,
                ..
            }) => out.push((service.name.to_string(), missing, different, extra)),
            Ok(_) => {}
            Err(broadcast::error::TryRecvError::Empty) => return out,
            Err(e) => panic!("event stream: {e}"),
        }
    }
}

/// From one scrape of `/metrics`: the read-back rounds of `b/ns` so far
/// and its drifted services (the agent sets the gauge before it counts the
/// round, so the two agree).
async fn read_backs(status: std::net::SocketAddr, ns: &str) -> Option<(u64, i64)> {
    let (_, body) = http_get(status, "/metrics").await?;
    let value = |family: &str| {
        let prefix = format!("{family}{{cluster=\"b\",namespace=\"{ns}\"}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    let rounds = value("nacos_replicator_read_backs_total")?;
    let drifted = value("nacos_replicator_drifted_services")?;
    Some((rounds as u64, drifted as i64))
}

/// Scrapes until `rounds` more read-back rounds are done, asserting that
/// every scrape after the first of them shows `drifted` services.
async fn rounds_showing(status: std::net::SocketAddr, ns: &str, rounds: u64, drifted: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let (from, _) = read_backs(status, ns).await.expect("metrics");
    loop {
        let (now, shown) = read_backs(status, ns).await.expect("metrics");
        if now > from {
            assert_eq!(shown, drifted, "drifted services at round {now}");
        }
        if now >= from + rounds {
            return;
        }
        assert!(Instant::now() < deadline, "rounds stopped at {now}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn churn_is_not_drift_and_an_edit_behind_the_agents_back_is() {
    let started = Instant::now();
    // Both regions start at once (each takes 10-30 s on a loaded machine).
    let (a, b) = std::thread::scope(|s| {
        let b = s.spawn(|| own_server(Default::default()));
        (shared_server(), b.join().expect("server start"))
    });
    let servers_up = started.elapsed();
    let ns = unique("churn");
    let status = free_local_addr();
    let config = AgentToml::new()
        .status_listen(status)
        .timings("resync_interval = \"2s\"\n")
        .cluster("a", &addr(a), &[&ns])
        .cluster("b", &addr(&b), &[&ns])
        .route("a", "b")
        .config();
    let tasks = Tasks::default();
    let app = client(a, &ns, &tasks);
    let reader = client(&b, &ns, &tasks);
    app.wait_connected(DEADLINE).await.expect("a connects");
    reader.wait_connected(DEADLINE).await.expect("b connects");
    let mut source = Source::new(app.clone());
    let steady = vec![Instance::new("10.99.0.1", 7500).with_metadata("app", "steady")];
    source.publish_all().await;
    app.publish(DEFAULT_GROUP, "steady", steady.clone())
        .await
        .expect("steady native");

    let agent = Agent::new(config).with_status_server(status);
    let mut events = agent.events();
    let token = CancellationToken::new();
    let running = tokio::spawn(agent.run(token.clone()));
    let mut everything = source.services.clone();
    everything.insert("steady".into(), steady.clone());
    converged(&reader, &everything, "the first sync").await;
    let synced = started.elapsed();
    let ns = ns.as_str();
    let (rounds_before, _) = eventually("a first read-back round", DEADLINE, || {
        read_backs(status, ns)
    })
    .await;

    // The churn, paced at CHANGES_PER_SECOND (a load, not a wait).
    let churn_started = Instant::now();
    let mut pace = tokio::time::interval(Duration::from_secs(1) / CHANGES_PER_SECOND);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0;
    while churn_started.elapsed() < CHURN_FOR {
        pace.tick().await;
        source.change(n).await;
        n += 1;
    }
    let churned = churn_started.elapsed();
    everything.extend(source.services.clone());
    converged(&reader, &everything, "the destination after the churn").await;
    let (rounds, drifted) = read_backs(status, ns).await.expect("metrics");
    let rounds = rounds - rounds_before;
    println!(
        "read-back figure: {} changes in {churned:.1?}, {rounds} read-back rounds, converged {:.1?} after the churn",
        source.changes,
        churn_started.elapsed() - churned
    );
    assert!(
        rounds >= 10,
        "only {rounds} read-back rounds during the churn"
    );
    assert_eq!(drifts(&mut events), Vec::new(), "churn reported as drift");
    assert_eq!(drifted, 0, "drifted services after the churn");

    // Behind the agent's back: an operator takes the steady replica offline
    // through the open API (the console's "offline"). A real Nacos keeps that
    // beside the instance and applies it to any connection's registration, so
    // the read-back finds the replica missing, and republishing cannot undo
    // it: round after round finds it again (what the drift alert waits for).
    let replica = replicas(&steady).remove(0);
    let mut edit = HttpInstance::new("steady", replica.ip.to_string(), replica.port);
    edit.namespace = ns.to_owned();
    edit.ephemeral = true;
    edit.metadata = replica
        .metadata
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    edit.enabled = false;
    tokio::task::block_in_place(|| b.update_instance_http(&edit)).expect("offline through the API");
    let found = eventually("the read-back finds the replica missing", DEADLINE, || {
        let seen = drifts(&mut events);
        async move { (!seen.is_empty()).then_some(seen) }
    })
    .await;
    let found_after = started.elapsed();
    // Hidden from queries (missing) or shown disabled (different), by server version.
    let (service, missing, different, extra) = found[0].clone();
    assert_eq!(
        (service.as_str(), missing + different, extra),
        ("steady", 1, 0),
        "{found:?}"
    );
    // Every round from then on counts it, those that skip it while its
    // repair settles (5 s) included.
    rounds_showing(status, ns, 4, 1).await;

    // The operator puts it back online: the replica is shown again, and the
    // next rounds find nothing.
    edit.enabled = true;
    tokio::task::block_in_place(|| b.update_instance_http(&edit)).expect("online through the API");
    converged(&reader, &everything, "the replica back online").await;
    eventually("a comparison clears it", DEADLINE, || async move {
        read_backs(status, ns).await.filter(|(_, d)| *d == 0)
    })
    .await;
    rounds_showing(status, ns, 2, 0).await;
    println!(
        "read-back figure: servers up {servers_up:.1?}, first sync {synced:.1?}, edit found {found_after:.1?}, whole test {:.1?}",
        started.elapsed()
    );

    token.cancel();
    running.await.expect("agent task").expect("agent ran");
    tasks.token().cancel();
}
