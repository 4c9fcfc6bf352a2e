//! The end-to-end matrix on real Nacos servers: three regions `a`, `b`,
//! `c`, agents in the import model (the agent of region X routes every peer
//! into X), and every claim asserted through one checker
//! ([`Observer::converge`]): each region shows exactly the expected
//! instances of each service, natives at their origin and one origin-tagged
//! copy elsewhere.
//!
//! Tests that leave the servers running share three of them and each use a
//! namespace of their own; the two that restart a server start their own,
//! one at a time. Figures (lags, how long the server took to drop a dead
//! agent's replicas) are printed as `e2e figure:` lines; run with
//! `--nocapture` to collect them.

mod support;

use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use nacos_replicator::model::{DEFAULT_GROUP, Instance};
use support::AgentToml;
use support::e2e::*;

/// The import agents of every region of `world`, in this process.
fn mesh(world: &World, timings: &str) -> Vec<RunningAgent> {
    world
        .regions
        .iter()
        .map(|(id, _)| RunningAgent::spawn(world.import_agent(id, timings).config()))
        .collect()
}

fn native(ip: &str, port: u16, app: &str) -> Instance {
    Instance::new(ip, port).with_metadata("app", app)
}

async fn shared_world(prefix: &str) -> World {
    let [a, b, c] = shared_regions().await;
    World::new(&[("a", a), ("b", b), ("c", c)], prefix).await
}

/// Case 1: natives in all three regions, in several groups, some services
/// present in two regions: every instance shows exactly once everywhere.
#[tokio::test(flavor = "multi_thread")]
async fn every_instance_shows_exactly_once_in_every_region() {
    let w = shared_world("mesh").await;
    let ns = w.ns.clone();
    let a_orders = [
        native("10.1.0.1", 8080, "orders"),
        native("10.1.0.2", 8080, "orders"),
    ];
    let a_users = [native("10.1.0.3", 9090, "users")];
    let b_orders = [native("10.2.0.1", 8080, "orders")];
    let b_pay = [native("10.2.0.2", 7070, "pay").with_weight(2.0)];
    let c_users = [native("10.3.0.1", 9090, "users")];
    let c_stock = [
        native("10.3.0.2", 6060, "stock"),
        native("10.3.0.3", 6060, "stock"),
    ];
    w.publish("a", DEFAULT_GROUP, "orders", &a_orders).await;
    w.publish("a", "G-users", "users", &a_users).await;
    w.publish("b", DEFAULT_GROUP, "orders", &b_orders).await;
    w.publish("b", "G-pay", "pay", &b_pay).await;
    w.publish("c", "G-users", "users", &c_users).await;
    w.publish("c", DEFAULT_GROUP, "stock", &c_stock).await;

    let started = Instant::now();
    let _agents = mesh(&w, "");
    let expected = w
        .expect()
        .natives("a", &ns, DEFAULT_GROUP, "orders", &a_orders)
        .natives("b", &ns, DEFAULT_GROUP, "orders", &b_orders)
        .natives("a", &ns, "G-users", "users", &a_users)
        .natives("c", &ns, "G-users", "users", &c_users)
        .natives("b", &ns, "G-pay", "pay", &b_pay)
        .natives("c", &ns, DEFAULT_GROUP, "stock", &c_stock);
    w.observer
        .converge(
            &expected,
            CONVERGE,
            "three regions, each instance once everywhere",
        )
        .await;
    record(
        "three agents started -> 8 natives in 4 services converged in 3 regions",
        started.elapsed(),
    );
}

/// Case 2: register, update (weight, metadata, health, enabled) and
/// deregister at the origin propagate to both peers.
#[tokio::test(flavor = "multi_thread")]
async fn changes_at_the_origin_propagate() {
    let w = shared_world("change").await;
    let ns = w.ns.clone();
    let _agents = mesh(&w, "");
    let (group, svc) = ("G-change", "catalog");
    let expect = |natives: &[Instance]| w.expect().natives("b", &ns, group, svc, natives);
    let x = native("10.2.1.1", 8080, "catalog").with_metadata("v", "1");
    let y = native("10.2.1.2", 8080, "catalog");

    // Register.
    w.publish("b", group, svc, &[x.clone(), y.clone()]).await;
    let took = w
        .observer
        .converge(
            &expect(&[x.clone(), y.clone()]),
            CONVERGE,
            "registered at b",
        )
        .await;
    record(
        "register of a new service at b -> replicas in a and c",
        took,
    );

    // Update weight and metadata.
    let x2 = x.clone().with_weight(5.0).with_metadata("v", "2");
    w.publish("b", group, svc, &[x2.clone(), y.clone()]).await;
    let took = w
        .observer
        .converge(
            &expect(&[x2.clone(), y.clone()]),
            CONVERGE,
            "weight and metadata updated at b",
        )
        .await;
    record("update at b -> replicas updated in a and c", took);

    // Unhealthy: the server keeps an ephemeral instance's health as sent, and
    // the replica carries it faithfully.
    let mut y2 = y.clone();
    y2.healthy = false;
    w.publish("b", group, svc, &[x2.clone(), y2.clone()]).await;
    w.observer
        .converge(
            &expect(&[x2.clone(), y2.clone()]),
            CONVERGE,
            "health flag updated at b",
        )
        .await;

    // Disabled: what the real server does is leave an `enabled=false` host
    // out of every query and push (and its HTTP list). So the source view
    // loses it, and its replicas are withdrawn in the peers: a disabled
    // native is, to the replication, a removed one.
    let mut x3 = x2.clone();
    x3.enabled = false;
    w.publish("b", group, svc, &[x3.clone(), y2.clone()]).await;
    w.observer
        .converge(
            &expect(&[y2.clone()]),
            CONVERGE,
            "a disabled native vanishes everywhere",
        )
        .await;
    let [_, b, _] = shared_regions().await;
    let listed = b
        .list_instances_http(&ns, group, svc)
        .expect("HTTP list at b");
    assert_eq!(
        listed.len(),
        1,
        "the origin's own HTTP list shows only the enabled host: {listed:?}"
    );
    // Enabled again: back everywhere.
    w.publish("b", group, svc, &[x2.clone(), y2.clone()]).await;
    w.observer
        .converge(
            &expect(&[x2.clone(), y2.clone()]),
            CONVERGE,
            "re-enabled at b",
        )
        .await;

    // Deregister one, then all.
    w.publish("b", group, svc, &[y2.clone()]).await;
    let took = w
        .observer
        .converge(&expect(&[y2.clone()]), CONVERGE, "one deregistered at b")
        .await;
    record(
        "deregister of one of two at b -> replica withdrawn in a and c",
        took,
    );
    w.publish("b", group, svc, &[]).await;
    w.observer
        .converge(&expect(&[]), CONVERGE, "all deregistered at b")
        .await;
}

/// Case 3: a native that shares ip:port with a replica (whether its content
/// differs or not) is never touched: the replica is a host of its own, and
/// withdrawing the replica leaves the native as it was.
#[tokio::test(flavor = "multi_thread")]
async fn a_native_sharing_ip_port_with_a_replica_is_untouched() {
    let w = shared_world("clash").await;
    let ns = w.ns.clone();
    let _agents = mesh(&w, "");
    let (group, svc) = (DEFAULT_GROUP, "shared");
    let in_a = [
        native("10.0.0.1", 80, "a-side"),
        Instance::new("10.0.0.2", 80),
    ];
    let in_b = [
        native("10.0.0.1", 80, "b-side").with_weight(3.0),
        Instance::new("10.0.0.2", 80),
    ];
    w.publish("a", group, svc, &in_a).await;
    w.publish("b", group, svc, &in_b).await;
    let both = w
        .expect()
        .natives("a", &ns, group, svc, &in_a)
        .natives("b", &ns, group, svc, &in_b);
    w.observer
        .converge(
            &both,
            CONVERGE,
            "natives and replicas side by side on one ip:port",
        )
        .await;

    // a's natives go: their replicas are withdrawn, b's natives stay exactly as they were.
    w.publish("a", group, svc, &[]).await;
    let only_b = w
        .expect()
        .natives("a", &ns, group, svc, &[])
        .natives("b", &ns, group, svc, &in_b);
    w.observer
        .converge(
            &only_b,
            CONVERGE,
            "b's natives untouched after the replicas on their ip:port left",
        )
        .await;
}

/// Case 4: a route's namespace and group mapping: the replica lands in the
/// mapped namespace and group, and nowhere else.
#[tokio::test(flavor = "multi_thread")]
async fn replicas_land_in_the_mapped_namespace_and_group() {
    let w = shared_world("map").await;
    let ns = w.ns.clone();
    let mapped = format!("{ns}-m");
    for server in shared_regions().await {
        create_namespace(server, &mapped);
    }
    let at = |id: &str| {
        w.regions
            .iter()
            .find(|(r, _)| *r == id)
            .map(|(_, a)| a.clone())
            .expect("region")
    };
    let toml = AgentToml::new()
        .cluster("a", &at("a"), &[&ns, &mapped])
        .cluster("b", &at("b"), &[&ns])
        .cluster("c", &at("c"), &[&ns])
        .route_with("b", "a", &format!("map_namespaces = {{ \"{ns}\" = \"{mapped}\" }}\nmap_groups = {{ \"G1\" = \"G1-from-b\" }}\n"))
        .route("c", "a");
    let _agent = RunningAgent::spawn(toml.config());
    let (b1, b2, c1) = (
        native("10.2.4.1", 80, "b1"),
        native("10.2.4.2", 80, "b2"),
        native("10.3.4.1", 80, "c1"),
    );
    w.publish("b", "G1", "svc", std::slice::from_ref(&b1)).await;
    w.publish("b", "G2", "svc2", std::slice::from_ref(&b2))
        .await;
    w.publish("c", "G1", "svc3", std::slice::from_ref(&c1))
        .await;
    let expected = w
        .expect()
        .at("b", &ns, "G1", "svc", std::slice::from_ref(&b1))
        .at("b", &ns, "G2", "svc2", std::slice::from_ref(&b2))
        .at("c", &ns, "G1", "svc3", std::slice::from_ref(&c1))
        // b's: mapped namespace, mapped group where the route maps it.
        .at("a", &mapped, "G1-from-b", "svc", &[tagged(&b1, "b")])
        .at("a", &mapped, "G2", "svc2", &[tagged(&b2, "b")])
        // ...and not under the source's names.
        .at("a", &ns, "G1", "svc", &[])
        .at("a", &ns, "G1-from-b", "svc", &[])
        .at("a", &mapped, "G1", "svc", &[])
        .at("a", &ns, "G2", "svc2", &[])
        // c's route maps nothing.
        .at("a", &ns, "G1", "svc3", &[tagged(&c1, "c")])
        .at("a", &mapped, "G1", "svc3", &[]);
    w.observer
        .converge(
            &expected,
            CONVERGE,
            "replicas in the mapped namespace and group",
        )
        .await;

    // A removal at the origin reaches the mapped place too.
    w.publish("b", "G1", "svc", &[]).await;
    let expected =
        expected
            .set("b", &ns, "G1", "svc", &[])
            .set("a", &mapped, "G1-from-b", "svc", &[]);
    w.observer
        .converge(&expected, CONVERGE, "withdrawn from the mapped place")
        .await;
}

/// Case 5: the agent process is killed (`kill -9`): the server drops the
/// replicas its connection owned; restarted, it converges again.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_killed_hard_loses_its_replicas_and_restores_them_on_restart() {
    let w = shared_world("kill").await;
    let ns = w.ns.clone();
    let (na, nb, nc) = (
        native("10.1.5.1", 80, "a"),
        native("10.2.5.1", 80, "b"),
        native("10.3.5.1", 80, "c"),
    );
    w.publish("a", DEFAULT_GROUP, "svc-a", std::slice::from_ref(&na))
        .await;
    w.publish("b", DEFAULT_GROUP, "svc-b", std::slice::from_ref(&nb))
        .await;
    w.publish("c", DEFAULT_GROUP, "svc-c", std::slice::from_ref(&nc))
        .await;
    // Region a's agent is a process; b's and c's run here.
    let toml = w.import_agent("a", "");
    let mut process = AgentProcess::start(&toml);
    let _b = RunningAgent::spawn(w.import_agent("b", "").config());
    let _c = RunningAgent::spawn(w.import_agent("c", "").config());
    let full = w
        .expect()
        .natives("a", &ns, DEFAULT_GROUP, "svc-a", std::slice::from_ref(&na))
        .natives("b", &ns, DEFAULT_GROUP, "svc-b", std::slice::from_ref(&nb))
        .natives("c", &ns, DEFAULT_GROUP, "svc-c", std::slice::from_ref(&nc));
    let converged = w
        .observer
        .converge(&full, CONVERGE, "converged with a's agent as a process");
    with_log(&process, converged).await;

    assert!(
        process.running(),
        "the agent exited on its own:\n{}",
        process.log()
    );
    let status = process.kill9();
    let killed = Instant::now();
    // What the agent of a owned (b's and c's copies in a) goes; the copies of
    // a's native that b's and c's agents own stay.
    let without = w
        .expect()
        .copies(
            "a",
            &["b", "c"],
            &ns,
            DEFAULT_GROUP,
            "svc-a",
            std::slice::from_ref(&na),
        )
        .copies(
            "b",
            &["c"],
            &ns,
            DEFAULT_GROUP,
            "svc-b",
            std::slice::from_ref(&nb),
        )
        .copies(
            "c",
            &["b"],
            &ns,
            DEFAULT_GROUP,
            "svc-c",
            std::slice::from_ref(&nc),
        )
        .at("a", &ns, DEFAULT_GROUP, "svc-b", &[])
        .at("a", &ns, DEFAULT_GROUP, "svc-c", &[]);
    // The kernel closes a killed process's sockets, so the server normally
    // sees the connection end at once; were the FIN lost, it would take its
    // health probe (~20 s and more). Generous deadline, figure recorded.
    w.observer
        .converge(
            &without,
            Duration::from_secs(90),
            "a killed agent's replicas gone",
        )
        .await;
    record(
        &format!("agent kill -9 ({status}) -> its replicas gone"),
        killed.elapsed(),
    );

    let restarted = Instant::now();
    let process = AgentProcess::start(&toml);
    with_log(
        &process,
        w.observer
            .converge(&full, CONVERGE, "converged again after the restart"),
    )
    .await;
    record("agent process restarted -> converged", restarted.elapsed());
}

/// Awaits `f`; if it panics, prints the agent process's log first.
async fn with_log<T>(process: &AgentProcess, f: impl std::future::Future<Output = T>) -> T {
    match std::panic::AssertUnwindSafe(f).catch_unwind().await {
        Ok(v) => v,
        Err(panic) => {
            eprintln!(
                "--- agent log ---\n{}\n--- end of agent log ---",
                process.log()
            );
            std::panic::resume_unwind(panic)
        }
    }
}

/// Case 6: a source region's server restarts (graceful stop, then start on
/// the same ports). Its replicas are held in the peers for the whole outage
/// (source_loss = hold, hold_for long), and everything converges after.
#[tokio::test(flavor = "multi_thread")]
async fn a_source_restart_is_held_through_the_outage_then_converges() {
    let [a, b, _] = shared_regions().await;
    let (c, _permit) = own_server().await;
    let w = World::new(&[("a", a), ("b", b), ("c", &c)], "srcrestart").await;
    let ns = w.ns.clone();
    let in_c = [native("10.3.6.1", 80, "inv"), native("10.3.6.2", 80, "inv")];
    let (na, nb) = (
        native("10.1.6.1", 80, "front"),
        native("10.2.6.1", 80, "back"),
    );
    w.publish("c", DEFAULT_GROUP, "inventory", &in_c).await;
    w.publish("a", DEFAULT_GROUP, "front", std::slice::from_ref(&na))
        .await;
    w.publish("b", DEFAULT_GROUP, "back", std::slice::from_ref(&nb))
        .await;
    // c is a source only: the agents of a and b import from it, none into it.
    let timings = "source_loss = \"hold\"\nhold_for = \"10m\"\n";
    let _a = RunningAgent::spawn(w.import_agent("a", timings).config());
    let _b = RunningAgent::spawn(w.import_agent("b", timings).config());
    let full = w
        .expect()
        .copies("c", &["a", "b"], &ns, DEFAULT_GROUP, "inventory", &in_c)
        .copies(
            "a",
            &["b"],
            &ns,
            DEFAULT_GROUP,
            "front",
            std::slice::from_ref(&na),
        )
        .copies(
            "b",
            &["a"],
            &ns,
            DEFAULT_GROUP,
            "back",
            std::slice::from_ref(&nb),
        )
        .at("c", &ns, DEFAULT_GROUP, "front", &[])
        .at("c", &ns, DEFAULT_GROUP, "back", &[]);
    w.observer
        .converge(&full, CONVERGE, "converged before the restart")
        .await;
    let held = full.only(&["a", "b"]);

    // Through the whole outage, until c's gRPC port takes connections again
    // (before that no agent can have relisted c), a and b keep c's replicas.
    let restart = tokio::task::spawn_blocking({
        let c = c.clone();
        move || c.restart()
    });
    let (mut went_down, mut reads) = (false, 0u32);
    let outage = Instant::now();
    loop {
        let open = accepts(c.grpc_port());
        if went_down && open {
            break;
        }
        went_down |= !open;
        if let Err(report) = w.observer.check(&held).await {
            panic!(
                "c's replicas not held during its outage ({:?} in, read {reads}):\n{report}",
                outage.elapsed()
            );
        }
        reads += 1;
        assert!(
            outage.elapsed() < Duration::from_secs(180),
            "c did not come back within 180 s"
        );
    }
    record(
        &format!("source c down and restarting, replicas held throughout ({reads} reads)"),
        outage.elapsed(),
    );
    restart.await.expect("restart task").expect("c restarts");

    // After the restart: c's application re-registers its natives (redo), the
    // agents relist c. An agent that lists c before the redo sees c without
    // them and withdraws (the source really shows nothing then): note whether
    // that happened.
    let back = Instant::now();
    let mut dipped = false;
    while let Err(report) = w.observer.check(&full).await {
        dipped |= w.observer.check(&held).await.is_err();
        assert!(
            back.elapsed() < Duration::from_secs(90),
            "not converged 90 s after the source restart:\n{report}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    record(
        &format!("source c back -> converged (replicas dipped meanwhile: {dipped})"),
        back.elapsed(),
    );
}

/// Case 7: a destination region's server crashes (SIGKILL) and restarts:
/// every replica there is gone with it; once it is back, the agent
/// republishes everything (redo) and the region converges.
#[tokio::test(flavor = "multi_thread")]
async fn a_destination_crash_and_restart_is_republished() {
    let [_, b, c] = shared_regions().await;
    let (a, _permit) = own_server().await;
    let w = World::new(&[("a", &a), ("b", b), ("c", c)], "dstrestart").await;
    let ns = w.ns.clone();
    let (na, nb, nc) = (
        native("10.1.7.1", 80, "a"),
        native("10.2.7.1", 80, "b"),
        native("10.3.7.1", 81, "c"),
    );
    let nb2 = native("10.2.7.2", 80, "b");
    w.publish("a", DEFAULT_GROUP, "svc-a", std::slice::from_ref(&na))
        .await;
    w.publish("b", DEFAULT_GROUP, "svc-b", &[nb.clone(), nb2.clone()])
        .await;
    w.publish("c", "G-c", "svc-c", std::slice::from_ref(&nc))
        .await;
    // a is a destination only: its agent imports from b and c.
    let _agent = RunningAgent::spawn(w.import_agent("a", "").config());
    let full = w
        .expect()
        .at("a", &ns, DEFAULT_GROUP, "svc-a", std::slice::from_ref(&na))
        .copies(
            "b",
            &["a"],
            &ns,
            DEFAULT_GROUP,
            "svc-b",
            &[nb.clone(), nb2.clone()],
        )
        .copies("c", &["a"], &ns, "G-c", "svc-c", std::slice::from_ref(&nc));
    w.observer
        .converge(&full, CONVERGE, "converged before the crash")
        .await;

    blocking(&a, |s| s.kill_hard().and_then(|()| s.restart()))
        .await
        .expect("a crashes and restarts");
    let took = w
        .observer
        .converge(
            &full,
            Duration::from_secs(90),
            "republished after the destination restart",
        )
        .await;
    record(
        "destination a back -> natives and replicas republished",
        took,
    );
}

/// Whether something accepts TCP connections on the loopback `port`.
fn accepts(port: u16) -> bool {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
}

/// The world of a cut link: region a's agent reads b through a proxy the
/// test controls (and c directly); b and c hold one native each.
struct CutWorld {
    w: World,
    proxy: TcpProxy,
    full: Expected,
    without_b: Expected,
    _agent: RunningAgent,
}

async fn cut_world(prefix: &str, timings: &str) -> CutWorld {
    let w = shared_world(prefix).await;
    let ns = w.ns.clone();
    let [_, b, _] = shared_regions().await;
    let proxy = TcpProxy::start(b).await;
    let regions: Vec<(&str, String)> = w
        .regions
        .iter()
        .map(|(id, a)| (*id, if *id == "b" { proxy.addr() } else { a.clone() }))
        .collect();
    let agent = RunningAgent::spawn(import_agent("a", &regions, &ns, timings).config());
    let (nb, nc) = (native("10.2.8.1", 80, "b"), native("10.3.8.1", 80, "c"));
    w.publish("b", DEFAULT_GROUP, "from-b", std::slice::from_ref(&nb))
        .await;
    w.publish("c", DEFAULT_GROUP, "from-c", std::slice::from_ref(&nc))
        .await;
    let from_c = |e: Expected| {
        e.copies(
            "c",
            &["a"],
            &ns,
            DEFAULT_GROUP,
            "from-c",
            std::slice::from_ref(&nc),
        )
    };
    let full = from_c(w.expect().copies(
        "b",
        &["a"],
        &ns,
        DEFAULT_GROUP,
        "from-b",
        std::slice::from_ref(&nb),
    ));
    let without_b = from_c(
        w.expect()
            .at("b", &ns, DEFAULT_GROUP, "from-b", std::slice::from_ref(&nb))
            .at("a", &ns, DEFAULT_GROUP, "from-b", &[]),
    );
    w.observer
        .converge(&full, CONVERGE, "converged through the proxy")
        .await;
    CutWorld {
        w,
        proxy,
        full,
        without_b,
        _agent: agent,
    }
}

/// Case 8: the link from a's agent to source b is cut. With `hold`, b's
/// replicas stay for `hold_for`, then go; when the link returns they come
/// back. c's replicas are never touched.
#[tokio::test(flavor = "multi_thread")]
async fn a_cut_source_link_is_held_for_hold_for_then_withdrawn_then_restored() {
    let hold_for = Duration::from_secs(8);
    let cw = cut_world("cuthold", "source_loss = \"hold\"\nhold_for = \"8s\"\n").await;
    let cut = Instant::now();
    cw.proxy.cut();
    cw.w.observer
        .check(&cw.full)
        .await
        .unwrap_or_else(|r| panic!("withdrawn right after the cut:\n{r}"));
    cw.w.observer
        .converge(
            &cw.without_b,
            hold_for + CONVERGE,
            "withdrawn after the hold time",
        )
        .await;
    let gone = cut.elapsed();
    assert!(
        gone >= hold_for,
        "b's replica withdrawn {gone:?} after the cut, before hold_for ({hold_for:?})"
    );
    record("link cut -> held replica withdrawn (hold_for 8 s)", gone);

    let restored = Instant::now();
    cw.proxy.restore();
    cw.w.observer
        .converge(&cw.full, CONVERGE, "restored when the link returned")
        .await;
    record("link restored -> replica back", restored.elapsed());
}

/// Case 8, second variant: with `source_loss = "withdraw"` the cut source's
/// replicas go at once, and come back with the link.
#[tokio::test(flavor = "multi_thread")]
async fn a_cut_source_link_is_withdrawn_at_once_with_source_loss_withdraw() {
    let cw = cut_world("cutwd", "source_loss = \"withdraw\"\n").await;
    let cut = Instant::now();
    cw.proxy.cut();
    cw.w.observer
        .converge(
            &cw.without_b,
            Duration::from_secs(20),
            "withdrawn promptly after the cut",
        )
        .await;
    record(
        "link cut -> replica withdrawn (source_loss = withdraw)",
        cut.elapsed(),
    );
    let restored = Instant::now();
    cw.proxy.restore();
    cw.w.observer
        .converge(&cw.full, CONVERGE, "restored when the link returned")
        .await;
    record("link restored -> replica back", restored.elapsed());
}

/// Case 8, third variant: the link to source b goes silent (a black hole,
/// as a WAN link that drops packets: no connection is closed). The agent
/// notices only by a timeout (its health check); then b's replicas are held
/// for `hold_for`, withdrawn, and restored with the link.
#[tokio::test(flavor = "multi_thread")]
async fn a_silent_source_link_is_noticed_then_held_then_withdrawn_then_restored() {
    let hold_for = Duration::from_secs(8);
    let cw = cut_world("silent", "source_loss = \"hold\"\nhold_for = \"8s\"\n").await;
    let silenced = Instant::now();
    cw.proxy.silence();
    // Noticing takes a health check (after 5 s without a call, 3 s deadline)
    // on top of the hold time.
    cw.w.observer
        .converge(
            &cw.without_b,
            hold_for + Duration::from_secs(40),
            "withdrawn after a silent loss and the hold time",
        )
        .await;
    // A silent link cannot be noticed before a call's deadline (3 s) has
    // passed, so a withdrawal that honours the hold comes no sooner than
    // that plus hold_for (one at the moment of noticing would come at about
    // 3 to 9 s).
    let gone = silenced.elapsed();
    let earliest = hold_for + Duration::from_secs(3);
    assert!(
        gone >= earliest,
        "b's replica withdrawn {gone:?} after the link went silent, before {earliest:?}"
    );
    record(
        "link silent -> loss noticed, held replica withdrawn (hold_for 8 s)",
        gone,
    );

    let restored = Instant::now();
    cw.proxy.restore();
    cw.w.observer
        .converge(&cw.full, CONVERGE, "restored when the link returned")
        .await;
    record("silent link restored -> replica back", restored.elapsed());
}

/// Case 9: the mass-withdrawal guard. A source that deregisters most of a
/// service at once: the agent holds the change back, confirms it with a
/// fresh query, and applies it.
///
/// Observable here: the end state (the withdrawal is applied, not stuck,
/// and nothing else changed). Not observable from outside the agent: that
/// the guard engaged and the confirming query was made (the agent logs it,
/// "large withdrawal; confirming with a fresh query"); nor the case the
/// guard exists for, a snapshot the fresh query contradicts, which a real
/// server will not produce on demand (the engine's unit tests cover it).
#[tokio::test(flavor = "multi_thread")]
async fn a_mass_withdrawal_is_confirmed_and_applied() {
    let w = shared_world("mass").await;
    let ns = w.ns.clone();
    let timings = "mass_withdraw_share = 0.5\nmass_withdraw_min_replicas = 4\n";
    let _agent = RunningAgent::spawn(w.import_agent("a", timings).config());
    let fleet: Vec<Instance> = (1..=6)
        .map(|i| native(&format!("10.2.9.{i}"), 80, "fleet"))
        .collect();
    let expect = |natives: &[Instance]| {
        w.expect()
            .copies("b", &["a"], &ns, DEFAULT_GROUP, "fleet", natives)
    };
    w.publish("b", DEFAULT_GROUP, "fleet", &fleet).await;
    w.observer
        .converge(&expect(&fleet), CONVERGE, "six replicas")
        .await;

    // One of six: below the guard's share, applied as is.
    w.publish("b", DEFAULT_GROUP, "fleet", &fleet[..5]).await;
    w.observer
        .converge(&expect(&fleet[..5]), CONVERGE, "one of six withdrawn")
        .await;
    // Four of five at once: above the share, confirmed, applied.
    let at = Instant::now();
    w.publish("b", DEFAULT_GROUP, "fleet", &fleet[..1]).await;
    w.observer
        .converge(
            &expect(&fleet[..1]),
            CONVERGE,
            "four of five withdrawn after confirmation",
        )
        .await;
    record(
        "mass withdrawal (4 of 5) at b -> confirmed and applied in a",
        at.elapsed(),
    );
    // Back to six, then all at once.
    w.publish("b", DEFAULT_GROUP, "fleet", &fleet).await;
    w.observer
        .converge(&expect(&fleet), CONVERGE, "six again")
        .await;
    w.publish("b", DEFAULT_GROUP, "fleet", &[]).await;
    w.observer
        .converge(
            &expect(&[]),
            CONVERGE,
            "all six withdrawn after confirmation",
        )
        .await;
}

/// Case 10: two agents with the same routes for region a (active-active).
/// Their replicas are byte-identical, and the server merges identical
/// instances from two connections into one host: each shows once. When one
/// agent stops, the other's copies keep every host; the survivor alone then
/// keeps following the sources.
#[tokio::test(flavor = "multi_thread")]
async fn two_agents_with_the_same_routes_show_each_replica_once_and_survive_each_other() {
    let w = shared_world("twins").await;
    let ns = w.ns.clone();
    let toml = w.import_agent("a", "");
    let first = RunningAgent::spawn(toml.config());
    let mut second = RunningAgent::spawn(toml.config());
    let in_b = [native("10.2.10.1", 80, "b"), native("10.2.10.2", 80, "b")];
    let in_c = [native("10.3.10.1", 80, "c")];
    w.publish("b", DEFAULT_GROUP, "twin", &in_b).await;
    w.publish("c", DEFAULT_GROUP, "twin", &in_c).await;
    let both = w
        .expect()
        .copies("b", &["a"], &ns, DEFAULT_GROUP, "twin", &in_b)
        .copies("c", &["a"], &ns, DEFAULT_GROUP, "twin", &in_c);
    w.observer
        .converge(&both, CONVERGE, "two agents, each replica once")
        .await;
    // The server's own HTTP view agrees: three hosts, not six.
    let [a, _, _] = shared_regions().await;
    let listed = a
        .list_instances_http(&ns, DEFAULT_GROUP, "twin")
        .expect("HTTP list at a");
    assert_eq!(
        listed.len(),
        3,
        "a lists each merged replica once: {listed:?}"
    );

    // The survivor-to-be holds every replica itself (a converged view could
    // be the first agent's alone while the second is still discovering).
    second
        .wait_replicated("twin", in_b.len() + in_c.len())
        .await;

    // One agent stops. Wait for the first push of the service built after it
    // closed its connection (the server pushes when a publisher leaves), and
    // check that what it shows is still every replica: the other agent's.
    let client = w.app("a").clone();
    let mut sub = client
        .subscribe(DEFAULT_GROUP, "twin")
        .await
        .expect("subscribe at a");
    first.stop().await;
    let stopped_ms = now_ms();
    let after = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(s) = sub.next().await {
            if s.last_ref_time_ms > stopped_ms {
                return Some(s);
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .expect("a push of the service after one agent left");
    let want: Vec<Instance> = in_b
        .iter()
        .map(|n| tagged(n, "b"))
        .chain(in_c.iter().map(|n| tagged(n, "c")))
        .collect();
    assert_eq!(
        support::fingerprint(&after.instances),
        support::fingerprint(&want),
        "replicas kept by the surviving agent"
    );
    w.observer
        .converge(&both, CONVERGE, "every replica once with one agent left")
        .await;

    // The survivor alone follows a change at the source.
    let in_b2 = [
        in_b[0].clone().with_weight(4.0),
        native("10.2.10.3", 80, "b"),
    ];
    w.publish("b", DEFAULT_GROUP, "twin", &in_b2).await;
    let changed = w
        .expect()
        .copies("b", &["a"], &ns, DEFAULT_GROUP, "twin", &in_b2)
        .copies("c", &["a"], &ns, DEFAULT_GROUP, "twin", &in_c);
    w.observer
        .converge(&changed, CONVERGE, "the surviving agent follows the source")
        .await;
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// Case 14: live reload. Region c's agent starts with a -> c; a reload adds
/// b -> c, another removes a -> c. A checker reading c all through the
/// first reload never finds a's replicas missing; b's arrive; then a's
/// are withdrawn while b's stay.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_adds_and_removes_routes_and_keeps_the_rest_published() {
    let w = shared_world("reload").await;
    let ns = w.ns.clone();
    let a_orders = [native("10.1.0.1", 8080, "orders")];
    let b_pay = [native("10.2.0.1", 7070, "pay")];
    w.publish("a", DEFAULT_GROUP, "orders", &a_orders).await;
    w.publish("b", DEFAULT_GROUP, "pay", &b_pay).await;
    let regions = w.regions.iter().fold(AgentToml::new(), |t, (id, server)| {
        t.cluster(id, server, &[ns.as_str()])
    });
    let agent = RunningAgent::spawn(regions.clone().route("a", "c").config());
    let reloader = agent.reloader();
    let orders_in_c = w
        .expect()
        .copies("a", &["c"], &ns, DEFAULT_GROUP, "orders", &a_orders);
    let pay_in_c = w
        .expect()
        .copies("b", &["c"], &ns, DEFAULT_GROUP, "pay", &b_pay);
    w.observer
        .converge(&orders_in_c, CONVERGE, "a's orders in c")
        .await;

    let both = regions.clone().route("a", "c").route("b", "c").config();
    let gaps = gaps_while(&w.observer, &orders_in_c, async {
        let report = reloader.reload(both).await.expect("reload taken");
        assert_eq!(report.routes.added.len(), 1, "{report}");
        w.observer
            .converge(&pay_in_c, CONVERGE, "b's pay in c after the reload")
            .await;
    })
    .await;
    assert_eq!(
        gaps,
        Vec::<String>::new(),
        "a's replicas went missing in the reload"
    );

    let only_b = regions.clone().route("b", "c").config();
    let orders_gone = pay_in_c
        .clone()
        .copies("a", &[], &ns, DEFAULT_GROUP, "orders", &a_orders)
        .at("c", &ns, DEFAULT_GROUP, "orders", &[]);
    let gaps = gaps_while(&w.observer, &pay_in_c, async {
        let report = reloader.reload(only_b).await.expect("reload taken");
        assert_eq!(report.routes.removed.len(), 1, "{report}");
        w.observer
            .converge(&orders_gone, CONVERGE, "a's orders withdrawn from c")
            .await;
    })
    .await;
    assert_eq!(
        gaps,
        Vec::<String>::new(),
        "b's replicas went missing in the reload"
    );
    agent.stop().await;
}

/// Runs `work` while reading `expected` again and again; returns every
/// mismatch seen meanwhile.
async fn gaps_while(
    observer: &Observer,
    expected: &Expected,
    work: impl std::future::Future<Output = ()>,
) -> Vec<String> {
    let mut gaps = Vec::new();
    let work = work.fuse();
    futures_util::pin_mut!(work);
    loop {
        futures_util::select! {
            () = work => return gaps,
            checked = observer.check(expected).fuse() => {
                if let Err(report) = checked {
                    gaps.push(report);
                }
            }
        }
    }
}

/// Case 13: a team upgrading region by region: `a` still on 2.3.2, `b` and
/// `c` on 3.1, a full mesh of import agents. Every instance shows exactly
/// once everywhere, and a change at a 2.3 origin and one at a 3.1 origin
/// both reach the other versions. Which servers come from the shared regions
/// depends on the line this process runs; the mesh is the same either way.
#[tokio::test(flavor = "multi_thread")]
async fn a_mixed_mesh_of_2_3_and_3_1_converges() {
    use nacos_replicator::testing::nacos::{ServerLine, ServerOptions};
    let shared = shared_regions().await;
    let permit = OWN_SERVERS_FOR_MIXED.acquire().await.expect("never closed");
    let start = |line| {
        tokio::task::spawn_blocking(move || support::own_server_of(line, ServerOptions::default()))
    };
    let (a, b, c): (&nacos_replicator::testing::nacos::NacosServer, _, _);
    let owned: Vec<nacos_replicator::testing::nacos::NacosServer>;
    if support::line() == ServerLine::V3_1 {
        owned = vec![start(ServerLine::V2_3).await.expect("start")];
        (a, b, c) = (&owned[0], &shared[0], &shared[1]);
    } else {
        let (b3, c3) = (start(ServerLine::V3_1), start(ServerLine::V3_1));
        owned = vec![b3.await.expect("start"), c3.await.expect("start")];
        (a, b, c) = (&shared[0], &owned[0], &owned[1]);
    }
    assert_eq!(
        (a.major(), b.major(), c.major()),
        (2, 3, 3),
        "one 2.3 region, two 3.1 regions"
    );
    let w = World::new(&[("a", a), ("b", b), ("c", c)], "mixed").await;
    let ns = w.ns.clone();
    let a_orders = [native("10.1.0.1", 8080, "orders")];
    let b_pay = [native("10.2.0.1", 7070, "pay")];
    let c_stock = [
        native("10.3.0.1", 6060, "stock"),
        native("10.3.0.2", 6060, "stock"),
    ];
    w.publish("a", DEFAULT_GROUP, "orders", &a_orders).await;
    w.publish("b", "G-pay", "pay", &b_pay).await;
    w.publish("c", DEFAULT_GROUP, "stock", &c_stock).await;

    let started = Instant::now();
    let _agents = mesh(&w, "");
    let expected = w
        .expect()
        .natives("a", &ns, DEFAULT_GROUP, "orders", &a_orders)
        .natives("b", &ns, "G-pay", "pay", &b_pay)
        .natives("c", &ns, DEFAULT_GROUP, "stock", &c_stock);
    w.observer
        .converge(
            &expected,
            CONVERGE,
            "mixed mesh, each instance once everywhere",
        )
        .await;
    record(
        "mixed mesh (2.3 + 3.1 + 3.1) started -> 4 natives converged",
        started.elapsed(),
    );

    // A change at the 2.3 origin and a new service at a 3.1 origin.
    let a_orders = [
        native("10.1.0.1", 8080, "orders").with_weight(3.0),
        native("10.1.0.9", 8080, "orders"),
    ];
    let b_new = [native("10.2.0.7", 5050, "fresh")];
    let changed = Instant::now();
    w.publish("a", DEFAULT_GROUP, "orders", &a_orders).await;
    w.publish("b", DEFAULT_GROUP, "fresh", &b_new).await;
    let expected = w
        .expect()
        .natives("a", &ns, DEFAULT_GROUP, "orders", &a_orders)
        .natives("b", &ns, "G-pay", "pay", &b_pay)
        .natives("b", &ns, DEFAULT_GROUP, "fresh", &b_new)
        .natives("c", &ns, DEFAULT_GROUP, "stock", &c_stock);
    w.observer
        .converge(
            &expected,
            CONVERGE,
            "mixed mesh after a change at each version",
        )
        .await;
    record(
        "mixed mesh: a 2.3 change and a new 3.1 service -> everywhere",
        changed.elapsed(),
    );
    drop(permit);
}

/// The mixed mesh starts servers of its own; with the restart cases that
/// keeps the JVMs on the box bounded.
static OWN_SERVERS_FOR_MIXED: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

/// Case: a DR drill, driven as an operator does, through the binary: the
/// agent of region b (`run`, importing a with `hold_for = "3s"`), and
/// `nacos-replicator drill --isolate a --for 15s` against its status
/// server. The printed timeline shows the hold, its expiry, the withdrawal,
/// the restore and the convergence; b really loses a's replicas during the
/// drill and has them again after; a is never touched (its natives only).
#[tokio::test(flavor = "multi_thread")]
async fn a_dr_drill_withdraws_at_hold_expiry_and_converges_after_the_restore() {
    let [a, b, _] = shared_regions().await;
    let w = World::new(&[("a", a), ("b", b)], "drill").await;
    let ns = w.ns.clone();
    let natives = [native("10.1.9.1", 80, "pay"), native("10.1.9.2", 80, "pay")];
    w.publish("a", DEFAULT_GROUP, "pay", &natives).await;
    let status = support::free_local_addr();
    let toml = w
        .import_agent("b", "hold_for = \"3s\"\n")
        .status_listen(status);
    let process = AgentProcess::start(&toml);
    let full = w
        .expect()
        .copies("a", &["b"], &ns, DEFAULT_GROUP, "pay", &natives);
    with_log(
        &process,
        w.observer.converge(&full, CONVERGE, "before the drill"),
    )
    .await;
    support::eventually("the agent ready", CONVERGE, || async move {
        support::http_get(status, "/readyz")
            .await
            .and_then(|(code, _)| (code == 200).then_some(()))
    })
    .await;

    let without = w
        .expect()
        .natives("a", &ns, DEFAULT_GROUP, "pay", &natives)
        .set("b", &ns, DEFAULT_GROUP, "pay", &[]);
    let started = Instant::now();
    let printed = drill_through_the_binary(&w, status, &without, &process).await;
    let text = printed.join("\n");
    let order = [
        "started",
        "hold_started",
        "hold_expired",
        "withdrawn",
        "restored",
        "relisted",
        "converged",
    ];
    let mut at = 0;
    for step in order {
        let found = printed[at..]
            .iter()
            .position(|l| l.split_whitespace().nth(1) == Some(step));
        let Some(i) = found else {
            panic!("no {step} step after line {at}:\n{text}");
        };
        at += i + 1;
    }
    assert!(!text.contains("held_throughout"), "{text}");
    record(
        "drill (15s, hold_for 3s) started -> converged",
        started.elapsed(),
    );
    // After it: b holds a's replicas again, a its natives only.
    with_log(
        &process,
        w.observer.converge(&full, CONVERGE, "after the drill"),
    )
    .await;
}

/// `drill --isolate a --for 15s` against the agent at `status`, its lines
/// as printed; when it prints the withdrawal, b must show `without` (none
/// of a's replicas) while the drill still runs. Panics unless it exits 0.
async fn drill_through_the_binary(
    w: &World,
    status: std::net::SocketAddr,
    without: &Expected,
    process: &AgentProcess,
) -> Vec<String> {
    use tokio::io::AsyncBufReadExt;
    let drill_for = Duration::from_secs(15);
    let started = Instant::now();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_nacos-replicator"))
        .args(["drill", "--status", &status.to_string(), "--isolate", "a"])
        .args(["--for", "15s", "--converge-within", "2m"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the drill command");
    let stdout = command.stdout.take().expect("piped");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let (mut printed, mut seen_empty) = (Vec::new(), false);
    while let Some(line) = tokio::time::timeout(CONVERGE * 3, lines.next_line())
        .await
        .expect("the drill command prints on")
        .expect("read its output")
    {
        eprintln!("drill: {line}");
        let withdrawn = line.split_whitespace().nth(1) == Some("withdrawn");
        printed.push(line);
        if withdrawn {
            let took = w
                .observer
                .converge(without, CONVERGE, "b without a's replicas during the drill")
                .await;
            assert!(
                started.elapsed() < drill_for,
                "b emptied only after the drill ended ({took:?})"
            );
            seen_empty = true;
        }
    }
    let exit = command.wait().await.expect("the drill command ends");
    let text = printed.join("\n");
    assert!(
        exit.success(),
        "drill exited {exit}:\n{text}\n{}",
        process.log()
    );
    assert!(seen_empty, "no withdrawal printed:\n{text}");
    printed
}
