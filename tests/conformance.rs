//! Contract tests, written once and run against both a real Nacos 2.3.2 and
//! the in-process fake (`nacos_replicator::testing::fake`).
//!
//! Each contract is a plain async function over a [`Backend`]; the
//! `contract!` macro makes two tests of it, `<name>::real` and `<name>::fake`.
//! A behaviour belongs in the fake only when its contract passes on the real
//! server: `cargo test --test conformance real` is the reference run.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use nacos_replicator::cluster::watch::{WatchConfig, WatchEvent};
use nacos_replicator::cluster::{CatalogApi, Client, ClientError, ConnectionState, Credentials};
use nacos_replicator::model::{DEFAULT_GROUP, DEFAULT_NAMESPACE, Instance, ServiceKey};
use nacos_replicator::runtime::Tasks;
use nacos_replicator::transport::{Session, SessionConfig};
use nacos_replicator::wire::convert;
use support::backend::{Backend, Need};
use support::*;

macro_rules! contract {
    ($name:ident, $need:expr) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread")]
            async fn real() {
                super::$name(Backend::real($need)).await
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn fake() {
                super::$name(Backend::fake($need).await).await
            }
        }
    };
}

fn rejection_code(e: &ClientError) -> Option<i32> {
    match e {
        ClientError::Call { source, .. } => source.code(),
        _ => None,
    }
}

contract!(publish_replace_withdraw, Need::Shared);
/// A full set is seen by a second client, replaced exactly by the next one,
/// withdrawn by an empty one; a single register and deregister work too.
async fn publish_replace_withdraw(backend: Backend) {
    let tasks = Tasks::default();
    let publisher = backend.client(DEFAULT_NAMESPACE, &tasks);
    let watcher = backend.client(DEFAULT_NAMESPACE, &tasks);
    let name = unique("c-replace");
    let mut first = instances_on("10.60.0", 5, 8000);
    first[0].weight = 3.0;
    first[1].healthy = false;
    first[2].nacos_cluster = "CLUSTER-B".into();
    publisher.wait_connected(DEADLINE).await.expect("connects");
    publisher
        .publish(DEFAULT_GROUP, &name, first.clone())
        .await
        .expect("first publish");
    let mut sub = watcher
        .subscribe(DEFAULT_GROUP, &name)
        .await
        .expect("subscribe");
    let seen = next_matching(&mut sub, &first, "first set").await;
    assert_eq!(
        seen.service,
        ServiceKey::new(DEFAULT_NAMESPACE, DEFAULT_GROUP, name.as_str())
    );
    // The server's id is the default one, so the snapshot rebuilds it
    // rather than storing it.
    let native = seen
        .instances
        .iter()
        .find(|i| i.port == 8000)
        .expect("the instance on port 8000");
    assert_eq!(
        native.id_in(&seen.service),
        format!("10.60.0.1#8000#DEFAULT#DEFAULT_GROUP@@{name}")
    );
    assert_eq!(native.instance_id, None);

    let mut second = first.clone();
    second[3] = second[3]
        .clone()
        .with_weight(0.5)
        .with_metadata("version", "v2");
    second.remove(4);
    second.remove(0);
    second.push(Instance::new("10.60.9.9", 8099));
    publisher
        .publish(DEFAULT_GROUP, &name, second.clone())
        .await
        .expect("second publish");
    next_matching(&mut sub, &second, "replaced set").await;
    let queried = watcher.query(DEFAULT_GROUP, &name).await.expect("query");
    assert_eq!(fingerprint(&queried.instances), fingerprint(&second));

    publisher
        .publish(DEFAULT_GROUP, &name, Vec::new())
        .await
        .expect("empty publish");
    next_matching(&mut sub, &[], "withdrawn set").await;
    assert!(
        publisher.published().is_empty(),
        "an empty set leaves nothing to redo"
    );

    // One slot per connection and service: a register replaces, a
    // deregister removes whatever it names.
    let one = Instance::new("10.60.1.1", 9001).with_metadata("k", "v");
    publisher
        .register(DEFAULT_GROUP, &name, one.clone())
        .await
        .expect("register");
    next_matching(&mut sub, std::slice::from_ref(&one), "registered").await;
    let other = Instance::new("10.60.1.2", 9002);
    publisher
        .register(DEFAULT_GROUP, &name, other.clone())
        .await
        .expect("register another");
    next_matching(
        &mut sub,
        std::slice::from_ref(&other),
        "a second register replaces the first",
    )
    .await;
    publisher
        .deregister(DEFAULT_GROUP, &name, Instance::new("10.99.99.99", 1))
        .await
        .expect("deregister");
    next_matching(&mut sub, &[], "deregistered whatever it named").await;
    tasks.token().cancel();
}

contract!(identical_instances_merge, Need::Shared);
/// Fully identical instances from two connections are one host, which stays
/// while either connection lives; one differing field makes two hosts.
async fn identical_instances_merge(backend: Backend) {
    let (tasks_a, tasks_b, tasks_c, tasks_w) = (
        Tasks::default(),
        Tasks::default(),
        Tasks::default(),
        Tasks::default(),
    );
    let a = backend.client(DEFAULT_NAMESPACE, &tasks_a);
    let b = backend.client(DEFAULT_NAMESPACE, &tasks_b);
    let watcher = backend.client(DEFAULT_NAMESPACE, &tasks_w);
    let name = unique("c-twin");
    let replica = Instance::new("10.61.0.1", 9500).with_metadata("rpl.origin", "hz");
    a.wait_connected(DEADLINE).await.expect("a connects");
    b.wait_connected(DEADLINE).await.expect("b connects");
    a.publish(DEFAULT_GROUP, &name, vec![replica.clone()])
        .await
        .expect("a publishes");
    b.publish(DEFAULT_GROUP, &name, vec![replica.clone()])
        .await
        .expect("b publishes");
    let mut sub = watcher
        .subscribe(DEFAULT_GROUP, &name)
        .await
        .expect("subscribe");
    next_matching(&mut sub, std::slice::from_ref(&replica), "one merged host").await;

    tasks_a.token().cancel();
    a.state()
        .wait_for(|s| *s == ConnectionState::Stopped)
        .await
        .expect("state open");
    let still = wait_query(
        &watcher,
        &name,
        1,
        "the host kept by the other connection",
        DEADLINE,
    )
    .await;
    assert_eq!(
        fingerprint(&still.instances),
        fingerprint(std::slice::from_ref(&replica))
    );

    let different = replica.clone().with_weight(2.0);
    let c = backend.client(DEFAULT_NAMESPACE, &tasks_c);
    c.wait_connected(DEADLINE).await.expect("c connects");
    c.publish(DEFAULT_GROUP, &name, vec![different.clone()])
        .await
        .expect("c publishes");
    next_matching(&mut sub, &[replica, different], "two hosts on one ip:port").await;
    for t in [tasks_b, tasks_c, tasks_w] {
        t.token().cancel();
    }
}

contract!(closing_removes_ephemeral_instances, Need::Shared);
/// A client's instances go with its connection, and subscribers are told.
async fn closing_removes_ephemeral_instances(backend: Backend) {
    let (publisher_tasks, watcher_tasks) = (Tasks::default(), Tasks::default());
    let publisher = backend.client(DEFAULT_NAMESPACE, &publisher_tasks);
    let watcher = backend.client(DEFAULT_NAMESPACE, &watcher_tasks);
    let name = unique("c-owned");
    let set = instances_on("10.60.0", 3, 8300);
    publisher.wait_connected(DEADLINE).await.expect("connects");
    publisher
        .publish(DEFAULT_GROUP, &name, set.clone())
        .await
        .expect("publish");
    publisher
        .publish("OTHER", &name, set.clone())
        .await
        .expect("publish in another group");
    let mut sub = watcher
        .subscribe(DEFAULT_GROUP, &name)
        .await
        .expect("subscribe");
    next_matching(&mut sub, &set, "published set").await;
    publisher_tasks.token().cancel();
    next_matching(&mut sub, &[], "instances gone with the connection").await;
    publisher
        .state()
        .wait_for(|s| *s == ConnectionState::Stopped)
        .await
        .expect("state channel open");
    let other = watcher.query("OTHER", &name).await.expect("query");
    assert!(
        other.instances.is_empty(),
        "left behind: {:?}",
        other.instances
    );
    watcher_tasks.token().cancel();
}

contract!(pushes_follow_changes, Need::Shared);
/// The first subscribe is pushed even for a service that does not exist; each
/// later change is pushed (and acknowledged: the server does not repeat it).
async fn pushes_follow_changes(backend: Backend) {
    let (session, mut pushes) = Session::connect(
        &backend.grpc_addr(),
        &SessionConfig::default(),
        &Tasks::default(),
    )
    .await
    .expect("handshake");
    let none = HashMap::new();
    let name = unique("c-push");
    let key = ServiceKey::new(DEFAULT_NAMESPACE, DEFAULT_GROUP, name.as_str());
    session
        .request(&convert::subscribe_request(&key, true), &none)
        .await
        .expect("subscribe");
    let hosts = |p: &nacos_replicator::wire::NotifySubscriberRequest| {
        p.service_info
            .as_ref()
            .and_then(|i| i.hosts.as_ref())
            .map_or(0, Vec::len)
    };
    let first = tokio::time::timeout(DEADLINE, pushes.recv())
        .await
        .expect("a push for the first subscribe")
        .expect("open");
    assert_eq!(
        hosts(&first),
        0,
        "a service that does not exist is pushed empty"
    );
    assert_eq!(
        first.service_info.as_ref().and_then(|i| i.name.as_deref()),
        Some(name.as_str())
    );

    for n in 1..=3u16 {
        session
            .request(
                &convert::batch_request(&key, &instances_on("10.60.0", n, 8400)),
                &none,
            )
            .await
            .expect("batch");
        let push = tokio::time::timeout(DEADLINE, async {
            loop {
                let p = pushes.recv().await.expect("push stream open");
                if hosts(&p) == usize::from(n) {
                    return p;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no push with {n} hosts"));
        assert!(push.request_id.is_some(), "pushes carry a request id");
    }
    // Every push was acked: none is repeated within the server's resend time.
    let pushed = session.stats().pushes();
    if let Ok(Some(extra)) = tokio::time::timeout(Duration::from_secs(8), pushes.recv()).await {
        panic!("a push repeated after its ack ({pushed} before): {extra:?}");
    }
}

contract!(list_paging_walks_every_page, Need::Shared);
/// ServiceList is by exact group and paged; the client walks every page.
async fn list_paging_walks_every_page(backend: Backend) {
    let tasks = Tasks::default();
    let namespace = unique("c-paging");
    backend.create_namespace(&namespace);
    let mut config = backend.config(&namespace);
    config.list_page_size = 3;
    let c = Client::start(config, &tasks).expect("config");
    c.wait_connected(DEADLINE).await.expect("connects");
    let mut names: Vec<String> = (0..8).map(|i| format!("svc-{i}")).collect();
    for n in &names {
        c.publish(DEFAULT_GROUP, n, instances_on("10.60.0", 1, 8200))
            .await
            .expect("publish");
    }
    c.publish("OTHER", "elsewhere", instances_on("10.60.0", 1, 8200))
        .await
        .expect("publish in another group");
    let listed = eventually("all 8 services listed", DEADLINE, || {
        let c = c.clone();
        async move {
            let listed = c.list_services(DEFAULT_GROUP).await.ok()?;
            (listed.len() == 8).then_some(listed)
        }
    })
    .await;
    names.sort();
    assert_eq!(listed, names);
    assert_eq!(
        c.list_services("OTHER").await.expect("list"),
        vec!["elsewhere".to_owned()]
    );
    assert!(
        c.list_services("NO-SUCH-GROUP")
            .await
            .expect("list")
            .is_empty()
    );
    tasks.token().cancel();
}

contract!(namespaces_and_groups_kept_apart, Need::Shared);
/// A service lives in one namespace and group only.
async fn namespaces_and_groups_kept_apart(backend: Backend) {
    let namespace = unique("c-ns");
    backend.create_namespace(&namespace);
    let tasks = Tasks::default();
    let in_ns = backend.client(&namespace, &tasks);
    let in_public = backend.client(DEFAULT_NAMESPACE, &tasks);
    let (group, name) = ("GROUP-A", unique("c-grouped"));
    let set = instances_on("10.60.0", 3, 8100);
    in_ns.wait_connected(DEADLINE).await.expect("connects");
    in_ns
        .publish(group, &name, set.clone())
        .await
        .expect("publish");
    let mut sub = in_ns.subscribe(group, &name).await.expect("subscribe");
    let seen = next_matching(&mut sub, &set, "set in its namespace and group").await;
    assert_eq!(
        seen.service,
        ServiceKey::new(namespace.as_str(), group, name.as_str())
    );
    assert!(
        in_ns
            .list_services(group)
            .await
            .expect("list")
            .contains(&name)
    );
    assert!(
        !in_ns
            .list_services(DEFAULT_GROUP)
            .await
            .expect("list")
            .contains(&name)
    );
    assert!(
        !in_public
            .list_services(group)
            .await
            .expect("list")
            .contains(&name)
    );
    assert!(
        in_public
            .query(group, &name)
            .await
            .expect("query")
            .instances
            .is_empty()
    );
    assert!(
        in_ns
            .query(DEFAULT_GROUP, &name)
            .await
            .expect("query")
            .instances
            .is_empty()
    );
    tasks.token().cancel();
}

contract!(catalog_lists_every_group, Need::Shared);
/// The HTTP catalog lists every group of the client's namespace, and only it;
/// the watcher built on it lists, follows changes, and finds new services.
async fn catalog_lists_every_group(backend: Backend) {
    let namespace = unique("c-catalog");
    let tasks = Tasks::default();
    let mut config = backend.config(&namespace);
    config.list_page_size = 4;
    let c = Client::start(config, &tasks).expect("config");
    let elsewhere = backend.client(DEFAULT_NAMESPACE, &tasks);
    c.wait_connected(DEADLINE).await.expect("connects");
    elsewhere.wait_connected(DEADLINE).await.expect("connects");
    elsewhere
        .publish(
            DEFAULT_GROUP,
            &unique("c-not-mine"),
            instances_on("10.60.0", 1, 8800),
        )
        .await
        .expect("publish");
    let mut expected = Vec::new();
    for group in ["DEFAULT_GROUP", "GROUP-A", "g.b:c"] {
        for n in 0..3 {
            let name = format!("svc-{n}");
            c.publish(group, &name, instances_on("10.60.0", 1, 8800))
                .await
                .expect("publish");
            expected.push((group.to_owned(), name));
        }
    }
    expected.sort();
    let listed = eventually("all nine services in the catalog", DEADLINE, || {
        let c = c.clone();
        let want = expected.len();
        async move {
            let listed = c.catalog().await.ok()?;
            (listed.len() == want).then_some(listed)
        }
    })
    .await;
    assert_eq!(listed, expected);
    // 2.x lists through its v1 catalog; a default 3.x (which answers that 410
    // and guards its v3 admin list with a user) through the fuzzy watch.
    let method = if backend.major() >= 3 {
        CatalogApi::FuzzyWatch
    } else {
        CatalogApi::V1Catalog
    };
    assert_eq!(
        c.catalog_api(),
        Some(method),
        "listing method on {}",
        backend.name()
    );

    let config = WatchConfig {
        list_interval: Duration::from_millis(300),
        ..WatchConfig::default()
    };
    let mut events = watch_all(&c, config, &tasks).await;
    let seen = read_listing(&mut events).await;
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), expected);
    c.publish("GROUP-A", "svc-0", instances_on("10.60.0", 2, 8800))
        .await
        .expect("change");
    c.publish("G-NEW", "created-later", instances_on("10.60.0", 1, 8800))
        .await
        .expect("new service");
    let (mut changed, mut found) = (false, false);
    while !(changed && found) {
        match next_event(&mut events).await {
            WatchEvent::Snapshot(s)
                if &*s.service.name == "svc-0"
                    && &*s.service.group == "GROUP-A"
                    && s.instances.len() == 2 =>
            {
                changed = true;
            }
            WatchEvent::Snapshot(s) if &*s.service.name == "created-later" => found = true,
            WatchEvent::Snapshot(_) => {}
            other => panic!("unexpected event: {other:?}"),
        }
    }
    tasks.token().cancel();
}

contract!(connect_reset_reconnects_and_redoes, Need::Shared);
/// ConnectReset moves the client to the server it names, and the redo puts
/// back what the old connection owned (publication and subscription).
async fn connect_reset_reconnects_and_redoes(backend: Backend) {
    let tasks = Tasks::default();
    let mut config = backend.config(DEFAULT_NAMESPACE);
    // Known as `localhost`; the reset names `127.0.0.1`.
    config.servers = vec![format!("localhost:{}", backend.http_port())];
    let publisher = Client::start(config, &tasks).expect("config");
    let watcher = backend.client(DEFAULT_NAMESPACE, &tasks);
    let name = unique("c-reset");
    let set = instances_on("10.60.0", 3, 8600);
    publisher.wait_connected(DEADLINE).await.expect("connects");
    publisher
        .publish(DEFAULT_GROUP, &name, set.clone())
        .await
        .expect("publish");
    let mut sub = watcher
        .subscribe(DEFAULT_GROUP, &name)
        .await
        .expect("subscribe");
    next_matching(&mut sub, &set, "before the reset").await;

    let old = connection_id(&publisher);
    backend.reset_connection(&old, Some(&backend.addr()));
    wait_reconnected(&publisher, &old, DEADLINE).await;
    match &*publisher.state().borrow() {
        ConnectionState::Connected { server, .. } => {
            assert_eq!(*server, backend.addr(), "did not move to the named server")
        }
        other => panic!("not connected: {other:?}"),
    }
    let restored = wait_query(
        &watcher,
        &name,
        set.len(),
        "the set republished on the new connection",
        DEADLINE,
    )
    .await;
    assert_eq!(fingerprint(&restored.instances), fingerprint(&set));

    // The watcher is reset too: its subscription is redone and still pushed.
    let old_watcher = connection_id(&watcher);
    backend.reset_connection(&old_watcher, None);
    wait_reconnected(&watcher, &old_watcher, DEADLINE).await;
    let changed = instances_on("10.60.0", 2, 8650);
    publisher
        .publish(DEFAULT_GROUP, &name, changed.clone())
        .await
        .expect("publish after reset");
    next_matching(&mut sub, &changed, "a push after the watcher's reset").await;
    tasks.token().cancel();
}

contract!(parameter_checks_refuse_bad_instances, Need::Shared);
/// Nacos' parameter checks: metadata over 1024 characters and a cluster name
/// with a space are refused with 400 and change nothing; `_` in a cluster
/// name passes the batch but not a single register.
async fn parameter_checks_refuse_bad_instances(backend: Backend) {
    let tasks = Tasks::default();
    let c = backend.client(DEFAULT_NAMESPACE, &tasks);
    let name = unique("c-params");
    c.wait_connected(DEADLINE).await.expect("connects");
    let fits = Instance::new("10.62.0.2", 80).with_metadata("k", "v".repeat(1023));
    c.publish(DEFAULT_GROUP, &name, vec![fits.clone()])
        .await
        .expect("1024 characters fit");
    let big = Instance::new("10.62.0.3", 80).with_metadata("k", "v".repeat(1024));
    let err = c
        .publish(DEFAULT_GROUP, &name, vec![big])
        .await
        .expect_err("1025 characters");
    assert_eq!(rejection_code(&err), Some(400), "{err}");
    let mut spaced = Instance::new("10.62.0.4", 80);
    spaced.nacos_cluster = "A B".into();
    let err = c
        .publish(DEFAULT_GROUP, &name, vec![spaced])
        .await
        .expect_err("cluster name with a space");
    assert_eq!(rejection_code(&err), Some(400), "{err}");
    let seen = c.query(DEFAULT_GROUP, &name).await.expect("query");
    assert_eq!(
        fingerprint(&seen.instances),
        fingerprint(std::slice::from_ref(&fits)),
        "a refused set changed the service"
    );

    let mut underscore = Instance::new("10.62.0.5", 80);
    underscore.nacos_cluster = "A_B".into();
    let other = unique("c-params");
    let err = c
        .register(DEFAULT_GROUP, &other, underscore.clone())
        .await
        .expect_err("single register with _");
    assert_eq!(rejection_code(&err), Some(400), "{err}");
    c.publish(DEFAULT_GROUP, &other, vec![underscore.clone()])
        .await
        .expect("batch with _");
    let seen = c.query(DEFAULT_GROUP, &other).await.expect("query");
    assert_eq!(fingerprint(&seen.instances), fingerprint(&[underscore]));
    tasks.token().cancel();
}

contract!(a_refused_set_is_not_redone, Need::Shared);
/// A set the server refused (400) is not what the client re-publishes after a
/// reconnect: it redoes the set the server last accepted, and reconnects.
async fn a_refused_set_is_not_redone(backend: Backend) {
    let tasks = Tasks::default();
    let c = backend.client(DEFAULT_NAMESPACE, &tasks);
    let watcher = backend.client(DEFAULT_NAMESPACE, &tasks);
    let (name, fresh) = (unique("c-refused"), unique("c-refused"));
    c.wait_connected(DEADLINE).await.expect("connects");
    let good = instances_on("10.60.0", 2, 8700);
    c.publish(DEFAULT_GROUP, &name, good.clone())
        .await
        .expect("a good set");
    let big = vec![Instance::new("10.63.0.1", 80).with_metadata("k", "v".repeat(2000))];
    let err = c
        .publish(DEFAULT_GROUP, &name, big.clone())
        .await
        .expect_err("refused");
    assert_eq!(rejection_code(&err), Some(400), "{err}");
    let err = c
        .publish(DEFAULT_GROUP, &fresh, big)
        .await
        .expect_err("refused");
    assert_eq!(rejection_code(&err), Some(400), "{err}");
    let old = connection_id(&c);
    backend.reset_connection(&old, None);
    wait_reconnected(&c, &old, DEADLINE).await;
    let restored = wait_query(
        &watcher,
        &name,
        good.len(),
        "the accepted set redone",
        DEADLINE,
    )
    .await;
    assert_eq!(fingerprint(&restored.instances), fingerprint(&good));
    assert!(!c.published().contains_key(&ServiceKey::new(
        DEFAULT_NAMESPACE,
        DEFAULT_GROUP,
        fresh.as_str()
    )));
    tasks.token().cancel();
}

contract!(auth_guards_naming_calls, Need::Auth);
/// With auth on: a good login works for gRPC and the catalog, a bad one is
/// named as rejected, and calls without a token are refused with 403.
async fn auth_guards_naming_calls(backend: Backend) {
    let tasks = Tasks::default();
    let good = backend.authed_client(DEFAULT_NAMESPACE, &tasks);
    let name = unique("c-authed");
    good.wait_connected(DEADLINE).await.expect("connects");
    good.publish(DEFAULT_GROUP, &name, instances_on("10.60.0", 2, 8500))
        .await
        .expect("publish with a token");
    good.publish("GROUP-B", &name, instances_on("10.60.0", 1, 8510))
        .await
        .expect("publish in a second group");
    assert_eq!(
        good.query(DEFAULT_GROUP, &name)
            .await
            .expect("query")
            .instances
            .len(),
        2
    );
    let listed = eventually("both groups in the catalog", DEADLINE, || {
        let good = good.clone();
        async move {
            let listed = good.catalog().await.ok()?;
            (listed.len() == 2).then_some(listed)
        }
    })
    .await;
    assert_eq!(
        listed,
        vec![
            ("DEFAULT_GROUP".to_owned(), name.clone()),
            ("GROUP-B".to_owned(), name.clone())
        ]
    );

    let mut config = backend.config(DEFAULT_NAMESPACE);
    config.credentials = Some(Credentials {
        username: backend.admin().username,
        password: "wrong-password".into(),
    });
    let bad = Client::start(config, &tasks).expect("config");
    let mut state = bad.state();
    let failed = tokio::time::timeout(
        DEADLINE,
        state.wait_for(|s| matches!(s, ConnectionState::Disconnected { .. })),
    )
    .await
    .expect("bad login reported")
    .expect("state open")
    .clone();
    let ConnectionState::Disconnected { error, .. } = failed else {
        unreachable!()
    };
    assert!(error.contains("rejected"), "unclear error: {error}");
    // Calls fail with that reason, not a vague network error.
    match bad.query(DEFAULT_GROUP, &name).await {
        Err(ClientError::NotConnected { last_error, .. }) => {
            assert!(last_error.contains("rejected"), "{last_error}")
        }
        other => panic!("expected NotConnected naming the rejection, got {other:?}"),
    }

    let anonymous = backend.client(DEFAULT_NAMESPACE, &tasks);
    anonymous
        .wait_connected(DEADLINE)
        .await
        .expect("the handshake needs no token");
    match anonymous.query(DEFAULT_GROUP, &name).await {
        Err(e @ ClientError::Call { .. }) => {
            assert_eq!(e.kind(), "auth", "{e}");
            let plain = format!(
                "{e}: {}",
                std::error::Error::source(&e)
                    .map(ToString::to_string)
                    .unwrap_or_default()
            );
            assert!(
                plain.contains("requires a user and this client has none"),
                "{plain}"
            );
        }
        other => panic!("expected a 403 rejection, got {other:?}"),
    }
    tasks.token().cancel();
}

contract!(restart_reconnects_and_redoes, Need::Own);
/// A restarted server has forgotten everything; both clients reconnect and
/// redo their publication and subscription.
async fn restart_reconnects_and_redoes(backend: Backend) {
    let tasks = Tasks::default();
    let publisher = backend.client(DEFAULT_NAMESPACE, &tasks);
    let watcher = backend.client(DEFAULT_NAMESPACE, &tasks);
    let name = unique("c-restart");
    let set = instances_on("10.60.0", 4, 8400);
    publisher.wait_connected(DEADLINE).await.expect("connects");
    publisher
        .publish(DEFAULT_GROUP, &name, set.clone())
        .await
        .expect("publish");
    let mut sub = watcher
        .subscribe(DEFAULT_GROUP, &name)
        .await
        .expect("subscribe");
    next_matching(&mut sub, &set, "before restart").await;
    let old = connection_id(&publisher);
    backend.restart().await;
    let minute = Duration::from_secs(60);
    wait_reconnected(&publisher, &old, minute).await;
    let queried = wait_query(
        &watcher,
        &name,
        set.len(),
        "the publication restored",
        minute,
    )
    .await;
    assert_eq!(fingerprint(&queried.instances), fingerprint(&set));
    let changed = instances_on("10.60.0", 2, 8450);
    publisher
        .publish(DEFAULT_GROUP, &name, changed.clone())
        .await
        .expect("publish after restart");
    next_matching(&mut sub, &changed, "push after restart").await;
    tasks.token().cancel();
}
