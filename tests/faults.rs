//! Faults no real server shows on demand, injected with the in-process fake
//! (`nacos_replicator::testing::fake`): ConnectReset storms, pushes never
//! acknowledged, a server that answers nothing, a very large service, very
//! many services, a token that expires mid-session. Each test ends in
//! convergence or a clear error, and checks that nothing was lost.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures_util::{StreamExt, stream};
use nacos_replicator::cluster::watch::{WatchConfig, WatchEvent};
use nacos_replicator::cluster::{Client, ClientConfig, ClientError, ConnectionState, Credentials};
use nacos_replicator::model::{DEFAULT_GROUP, DEFAULT_NAMESPACE, Instance, ServiceKey};
use nacos_replicator::runtime::Tasks;
use nacos_replicator::testing::fake::{FakeAuth, FakeNacos, FakeOptions, Silence};
use support::*;

async fn fake(options: FakeOptions) -> FakeNacos {
    FakeNacos::start(options).await.expect("the fake starts")
}

fn config(fake: &FakeNacos) -> ClientConfig {
    let mut config = ClientConfig::new("fake", vec![fake.addr()], DEFAULT_NAMESPACE);
    config.reconnect_min = Duration::from_millis(50);
    config.reconnect_max = Duration::from_millis(500);
    config
}

fn client(fake: &FakeNacos, tasks: &Tasks) -> Client {
    Client::start(config(fake), tasks).expect("valid config")
}

/// Two connected clients of `fake`: one to publish, one to watch.
async fn connected_pair(fake: &FakeNacos, tasks: &Tasks) -> (Client, Client) {
    let publisher = client(fake, tasks);
    let watcher = client(fake, tasks);
    publisher.wait_connected(DEADLINE).await.expect("connects");
    watcher.wait_connected(DEADLINE).await.expect("connects");
    (publisher, watcher)
}

fn instances(n: usize, tag: &str) -> Vec<Instance> {
    (0..n)
        .map(|i| {
            let ip = format!("10.{}.{}.{}", 70 + i / 65_536, (i / 256) % 256, i % 256);
            Instance::new(ip, 8080).with_metadata("tag", tag)
        })
        .collect()
}

fn key(name: &str) -> ServiceKey {
    ServiceKey::new(DEFAULT_NAMESPACE, DEFAULT_GROUP, name)
}

/// Waits until the fake holds exactly `expected` for `name`.
async fn fake_shows(fake: &FakeNacos, name: &str, expected: &[Instance], what: &str) {
    let want = fingerprint(expected);
    eventually(what, DEADLINE, || {
        let ok = fingerprint(&fake.instances(&key(name))) == want;
        async move { ok.then_some(()) }
    })
    .await;
}

fn is_connected(c: &Client) -> bool {
    matches!(*c.state().borrow(), ConnectionState::Connected { .. })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connect_reset_storm_ends_with_every_set_and_subscription_in_place() {
    let fake = fake(FakeOptions::default()).await;
    let tasks = Tasks::default();
    let publishers: Vec<Client> = (0..3).map(|_| client(&fake, &tasks)).collect();
    let watcher = client(&fake, &tasks);
    let mut expected = Vec::new();
    for (n, p) in publishers.iter().enumerate() {
        p.wait_connected(DEADLINE).await.expect("connects");
        let set = instances(3, &format!("p{n}"));
        p.publish(DEFAULT_GROUP, "stormy", set.clone())
            .await
            .expect("publish");
        expected.extend(set);
    }
    let mut sub = watcher
        .subscribe(DEFAULT_GROUP, "stormy")
        .await
        .expect("subscribe");
    next_matching(&mut sub, &expected, "every set before the storm").await;

    // Two seconds of resets to every connection, every 20 ms, while the
    // publishers keep changing their sets.
    let started = Instant::now();
    let mut round = 0usize;
    let mut sent = 0usize;
    while started.elapsed() < Duration::from_secs(2) {
        sent += fake.reset_all_connections(None);
        round += 1;
        let p = &publishers[round % publishers.len()];
        // A change may fail mid-reset; it is recorded and redone either way.
        let _ = p
            .publish(
                DEFAULT_GROUP,
                "stormy",
                instances(3, &format!("p{}-r{round}", round % publishers.len())),
            )
            .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(sent > 20, "the storm sent only {sent} resets");

    // Converged: every client connected again, the server holds exactly each
    // publisher's last recorded set, and the watcher is pushed that view.
    let last: Vec<Instance> = publishers
        .iter()
        .flat_map(|p| p.published().into_values().flatten())
        .collect();
    assert_eq!(last.len(), 9);
    for c in publishers.iter().chain([&watcher]) {
        c.wait_connected(DEADLINE)
            .await
            .expect("reconnected after the storm");
    }
    fake_shows(
        &fake,
        "stormy",
        &last,
        "the server to hold every publisher's last set",
    )
    .await;
    next_matching(&mut sub, &last, "the watcher to be pushed the last sets").await;
    eventually("no connection left over from the storm", DEADLINE, || {
        let n = fake.connections().len();
        async move { (n == 4).then_some(()) }
    })
    .await;
    assert!(fake.stats().resets_sent as usize >= sent);
    tasks.token().cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn pushes_never_acknowledged_are_resent_and_the_subscriber_keeps_the_latest() {
    let options = FakeOptions {
        push_resend_after: Duration::from_millis(200),
        ..FakeOptions::default()
    };
    let fake = fake(options).await;
    let tasks = Tasks::default();
    let (publisher, watcher) = connected_pair(&fake, &tasks).await;
    fake.ignore_acks(true);
    let mut sub = watcher
        .subscribe(DEFAULT_GROUP, "unacked")
        .await
        .expect("subscribe");
    for round in 0..5 {
        publisher
            .publish(DEFAULT_GROUP, "unacked", instances(round + 1, "x"))
            .await
            .expect("publish");
    }
    let last = instances(5, "x");
    next_matching(&mut sub, &last, "the latest set despite unacked pushes").await;
    // The server keeps re-sending; the client answers each one and stays up.
    eventually("re-sent pushes", DEADLINE, || {
        let resends = fake.stats().push_resends;
        async move { (resends >= 10).then_some(()) }
    })
    .await;
    assert!(
        is_connected(&watcher),
        "the watcher dropped: {:?}",
        *watcher.state().borrow()
    );
    let snapshot = watcher
        .query(DEFAULT_GROUP, "unacked")
        .await
        .expect("query");
    assert_eq!(fingerprint(&snapshot.instances), fingerprint(&last));

    // Acks count again: the next re-send is acknowledged and nothing is owed.
    fake.ignore_acks(false);
    eventually("every push acknowledged", DEADLINE, || {
        let pending: usize = fake.connections().iter().map(|c| c.pushes_pending).sum();
        async move { (pending == 0).then_some(()) }
    })
    .await;

    // Withheld pushes: a change is not pushed while held, and is when released.
    fake.withhold_pushes(true);
    publisher
        .publish(DEFAULT_GROUP, "unacked", instances(2, "held"))
        .await
        .expect("publish");
    // (Re-pushes of the previous view may still arrive; the new one must not.)
    let held = fingerprint(&instances(2, "held"));
    let early = tokio::time::timeout(Duration::from_millis(500), async {
        while let Some(s) = sub.next().await {
            if fingerprint(&s.instances) == held {
                return s;
            }
        }
        futures_util::future::pending().await
    })
    .await;
    assert!(early.is_err(), "a withheld push arrived: {early:?}");
    fake.withhold_pushes(false);
    next_matching(
        &mut sub,
        &instances(2, "held"),
        "the withheld push once released",
    )
    .await;
    tasks.token().cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_answers_nothing_times_out_clearly_and_recovers() {
    let fake = fake(FakeOptions::default()).await;
    let tasks = Tasks::default();
    let mut quick = config(&fake);
    quick.session.connect_timeout = Duration::from_millis(500);
    quick.session.request_timeout = Duration::from_millis(500);
    quick.session.idle_health_check = Duration::from_millis(300);

    // A new client: ServerCheck answers, the stream is accepted, then nothing.
    fake.set_silence(Silence::AfterServerCheck);
    let newcomer = Client::start(quick.clone(), &tasks).expect("config");
    let mut state = newcomer.state();
    let failed = tokio::time::timeout(
        DEADLINE,
        state.wait_for(|s| matches!(s, ConnectionState::Disconnected { .. })),
    )
    .await
    .expect("the failure is reported")
    .expect("state open")
    .clone();
    let ConnectionState::Disconnected { error, .. } = failed else {
        unreachable!()
    };
    assert!(
        error.contains("no reply within") || error.contains("timed out"),
        "unclear error: {error}"
    );
    match newcomer.query(DEFAULT_GROUP, "anything").await {
        Err(e @ ClientError::NotConnected { .. }) => assert!(e.is_retryable(), "{e}"),
        other => panic!("expected NotConnected, got {other:?}"),
    }
    fake.set_silence(Silence::Off);
    newcomer
        .wait_connected(DEADLINE)
        .await
        .expect("connects once the server answers");

    // A connected client, then total silence: its call times out, its health
    // check ends the session, reconnecting fails until the server answers.
    let set = instances(3, "silent");
    newcomer
        .publish(DEFAULT_GROUP, "quiet", set.clone())
        .await
        .expect("publish");
    fake.set_silence(Silence::All);
    let changed = instances(2, "during-silence");
    let err = newcomer
        .publish(DEFAULT_GROUP, "quiet", changed.clone())
        .await
        .expect_err("no answer");
    assert!(err.is_retryable(), "{err}");
    assert!(
        err.to_string().contains("publish") || format!("{err:?}").contains("Timeout"),
        "unclear error: {err:?}"
    );
    let mut state = newcomer.state();
    tokio::time::timeout(
        DEADLINE,
        state.wait_for(|s| matches!(s, ConnectionState::Disconnected { .. })),
    )
    .await
    .expect("the silent session is given up")
    .expect("state open");
    fake.set_silence(Silence::Off);
    // Nothing lost: the change made during the silence is what the server ends with.
    newcomer.wait_connected(DEADLINE).await.expect("reconnects");
    fake_shows(
        &fake,
        "quiet",
        &changed,
        "the change made during the silence, redone",
    )
    .await;
    tasks.token().cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn one_service_with_ten_thousand_instances() {
    let fake = fake(FakeOptions::default()).await;
    let tasks = Tasks::default();
    let publisher = client(&fake, &tasks);
    let watcher = client(&fake, &tasks);
    publisher.wait_connected(DEADLINE).await.expect("connects");
    let mut set = instances(10_000, "big");
    publisher
        .publish(DEFAULT_GROUP, "big", set.clone())
        .await
        .expect("publish 10,000 in one batch");
    let mut sub = watcher
        .subscribe(DEFAULT_GROUP, "big")
        .await
        .expect("subscribe");
    next_matching(&mut sub, &set, "10,000 instances").await;
    // One instance changes among 10,000: the push carries it.
    set[4321] = set[4321].clone().with_weight(7.0);
    publisher
        .publish(DEFAULT_GROUP, "big", set.clone())
        .await
        .expect("publish the change");
    next_matching(&mut sub, &set, "the changed instance among 10,000").await;
    assert_eq!(
        watcher
            .query(DEFAULT_GROUP, "big")
            .await
            .expect("query")
            .instances
            .len(),
        10_000
    );
    // A second connection's identical copy merges host by host.
    let twin = client(&fake, &tasks);
    twin.wait_connected(DEADLINE).await.expect("connects");
    twin.publish(DEFAULT_GROUP, "big", set.clone())
        .await
        .expect("identical copy");
    publisher
        .publish(DEFAULT_GROUP, "big", Vec::new())
        .await
        .expect("withdraw");
    assert_eq!(
        fake.instances(&key("big")).len(),
        10_000,
        "the twin's copy keeps every host"
    );
    twin.publish(DEFAULT_GROUP, "big", Vec::new())
        .await
        .expect("withdraw the twin");
    next_matching(&mut sub, &[], "withdrawn").await;
    tasks.token().cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_services_are_listed_and_watched() {
    const N: usize = 10_000;
    let fake = fake(FakeOptions::default()).await;
    let tasks = Tasks::default();
    let publisher = client(&fake, &tasks);
    publisher.wait_connected(DEADLINE).await.expect("connects");
    let started = Instant::now();
    let names: Vec<(String, String)> = (0..N)
        .map(|i| (format!("G{}", i % 4), format!("svc-{i:05}")))
        .collect();
    let failures = stream::iter(names.clone())
        .map(|(group, name)| {
            let p = publisher.clone();
            async move {
                p.publish(&group, &name, vec![Instance::new("10.80.0.1", 80)])
                    .await
                    .err()
            }
        })
        .buffer_unordered(32)
        .filter_map(|e| async move { e })
        .collect::<Vec<_>>()
        .await;
    assert!(
        failures.is_empty(),
        "{} publishes failed, first: {}",
        failures.len(),
        failures[0]
    );
    eprintln!("published {N} services in {:?}", started.elapsed());

    let watcher = client(&fake, &tasks);
    watcher.wait_connected(DEADLINE).await.expect("connects");
    let listed = watcher.list_services("G1").await.expect("list");
    assert_eq!(listed.len(), N / 4, "ServiceList walked every page");
    let catalog = watcher.catalog().await.expect("catalog");
    let mut expected = names.clone();
    expected.sort();
    assert_eq!(
        catalog, expected,
        "the catalog lists every service of every group"
    );

    let started = Instant::now();
    let config = WatchConfig {
        list_interval: Duration::from_secs(3600),
        ..WatchConfig::default()
    };
    let mut events = watch_all(&watcher, config, &tasks).await;
    let mut seen = BTreeSet::new();
    loop {
        match next_event(&mut events).await {
            WatchEvent::InitSnapshot(s) => {
                assert_eq!(s.instances.len(), 1, "{}", s.service);
                seen.insert((s.service.group.clone(), s.service.name.clone()));
            }
            WatchEvent::InitDone => break,
            other => panic!("unexpected event in the listing: {other:?}"),
        }
    }
    eprintln!("watched {N} services in {:?}", started.elapsed());
    assert_eq!(seen.len(), N, "every service in the first listing");
    assert_eq!(
        fake.connections()
            .iter()
            .map(|c| c.subscriptions.len())
            .sum::<usize>(),
        N
    );
    // After the listing, a change to any one of them is pushed.
    publisher
        .publish("G3", "svc-09999", instances(2, "late"))
        .await
        .expect("change");
    loop {
        match next_event(&mut events).await {
            WatchEvent::Snapshot(s)
                if &*s.service.name == "svc-09999" && s.instances.len() == 2 =>
            {
                break;
            }
            WatchEvent::Snapshot(_) => {}
            other => panic!("unexpected event: {other:?}"),
        }
    }
    tasks.token().cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_expiring_mid_session_is_renewed_without_losing_anything() {
    // Tokens live one second; the client believes at least ten (it clamps a
    // short lifetime), so the server refuses its token long before the
    // client would refresh it.
    let auth = FakeAuth {
        token_ttl: Duration::from_secs(1),
        ..FakeAuth::default()
    };
    let fake = fake(FakeOptions {
        auth: Some(auth.clone()),
        ..FakeOptions::default()
    })
    .await;
    let tasks = Tasks::default();
    let mut with_credentials = config(&fake);
    with_credentials.credentials = Some(Credentials {
        username: auth.username,
        password: auth.password,
    });
    let c = Client::start(with_credentials, &tasks).expect("config");
    c.wait_connected(DEADLINE).await.expect("connects");
    c.publish(DEFAULT_GROUP, "renewed", instances(1, "v0"))
        .await
        .expect("publish");
    let logins_before = fake.stats().logins;

    // Calls keep succeeding across several expiries: each refused token is
    // replaced by a new login and the call retried.
    let started = Instant::now();
    let mut round = 0;
    while started.elapsed() < Duration::from_secs(3) {
        round += 1;
        c.publish(DEFAULT_GROUP, "renewed", instances(2, &format!("v{round}")))
            .await
            .expect("publish across an expiry");
        c.query(DEFAULT_GROUP, "renewed")
            .await
            .expect("query across an expiry");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stats = fake.stats();
    assert!(
        stats.auth_rejections >= 2,
        "no token expired during the test: {stats:?}"
    );
    assert!(stats.logins >= logins_before + 2, "no new login: {stats:?}");
    fake_shows(
        &fake,
        "renewed",
        &instances(2, &format!("v{round}")),
        "the last set",
    )
    .await;

    // The HTTP catalog recovers from an expired token the same way.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let catalog = c.catalog().await.expect("catalog with an expired token");
    assert_eq!(
        catalog,
        vec![(DEFAULT_GROUP.to_owned(), "renewed".to_owned())]
    );
    tasks.token().cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn cut_transports_are_noticed_and_everything_is_redone() {
    let fake = fake(FakeOptions::default()).await;
    let tasks = Tasks::default();
    let publisher = client(&fake, &tasks);
    let watcher = client(&fake, &tasks);
    publisher.wait_connected(DEADLINE).await.expect("connects");
    let mut sub = watcher
        .subscribe(DEFAULT_GROUP, "cut")
        .await
        .expect("subscribe");
    let mut set = instances(2, "cut-0");
    publisher
        .publish(DEFAULT_GROUP, "cut", set.clone())
        .await
        .expect("publish");
    next_matching(&mut sub, &set, "before the cuts").await;
    for round in 1..=5 {
        let old: Vec<String> = [&publisher, &watcher]
            .iter()
            .map(|c| connection_id(c))
            .collect();
        assert_eq!(fake.drop_all_connections(), 2);
        // The cut removed the publisher's instances with its connection.
        set = instances(2, &format!("cut-{round}"));
        let _ = publisher.publish(DEFAULT_GROUP, "cut", set.clone()).await;
        wait_reconnected(&publisher, &old[0], DEADLINE).await;
        wait_reconnected(&watcher, &old[1], DEADLINE).await;
        fake_shows(&fake, "cut", &set, "the set redone after the cut").await;
        next_matching(&mut sub, &set, "the subscription redone after the cut").await;
    }
    assert_eq!(fake.connections().len(), 2, "{:?}", fake.connections());
    tasks.token().cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_failed_on_purpose_report_the_code_and_lose_nothing() {
    let fake = fake(FakeOptions::default()).await;
    let tasks = Tasks::default();
    let c = client(&fake, &tasks);
    c.wait_connected(DEADLINE).await.expect("connects");
    let set = instances(3, "failed");
    fake.fail_next(2, 503);
    for _ in 0..2 {
        let err = c
            .publish(DEFAULT_GROUP, "flaky", set.clone())
            .await
            .expect_err("failed on purpose");
        assert!(
            matches!(&err, ClientError::Call { source, .. } if source.code() == Some(503)),
            "{err:?}"
        );
        assert!(err.is_retryable(), "{err}");
    }
    assert!(fake.instances(&key("flaky")).is_empty());
    // The intent is kept: the next reconnect redoes it.
    assert_eq!(c.published().get(&key("flaky")), Some(&set));
    fake.fail_next(1, 300);
    let err = c
        .query(DEFAULT_GROUP, "flaky")
        .await
        .expect_err("server starting");
    assert!(
        matches!(&err, ClientError::Call { source, .. } if source.code() == Some(300)),
        "{err:?}"
    );
    let old = connection_id(&c);
    assert!(fake.drop_connection(&old));
    wait_reconnected(&c, &old, DEADLINE).await;
    fake_shows(&fake, "flaky", &set, "the failed publication redone").await;
    assert_eq!(fake.stats().calls_failed_on_purpose, 3);
    tasks.token().cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_push_delay_coalesces_a_burst_into_the_latest_view() {
    let fake = fake(FakeOptions::default()).await;
    let tasks = Tasks::default();
    let publisher = client(&fake, &tasks);
    let watcher = client(&fake, &tasks);
    publisher.wait_connected(DEADLINE).await.expect("connects");
    let mut sub = watcher
        .subscribe(DEFAULT_GROUP, "burst")
        .await
        .expect("subscribe");
    next_matching(&mut sub, &[], "the first push").await;
    let watcher_id = connection_id(&watcher);
    let pushes = || {
        fake.connections()
            .into_iter()
            .find(|c| c.id == watcher_id)
            .map_or(0, |c| c.pushes_sent)
    };
    let before = pushes();
    fake.set_push_delay(Duration::from_millis(300));
    for n in 1..=10 {
        publisher
            .publish(DEFAULT_GROUP, "burst", instances(n, "burst"))
            .await
            .expect("publish");
    }
    next_matching(
        &mut sub,
        &instances(10, "burst"),
        "the last set of the burst",
    )
    .await;
    let sent = pushes() - before;
    assert!(
        sent < 10,
        "{sent} pushes for a burst of 10 changes: no coalescing"
    );
    tasks.token().cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_service_is_found_by_the_catalog_probe_long_before_the_next_listing() {
    // Listings an hour apart: only the probe can find the new service in time.
    let fake = fake(FakeOptions::default()).await;
    let tasks = Tasks::default();
    let (publisher, watcher) = connected_pair(&fake, &tasks).await;
    const N: usize = 40;
    for i in 0..N {
        publisher
            .publish(DEFAULT_GROUP, &format!("old-{i:02}"), instances(1, "v1"))
            .await
            .expect("publish");
    }
    let config = WatchConfig {
        list_interval: Duration::from_secs(3600),
        probe_interval: Some(Duration::from_millis(50)),
        ..WatchConfig::default()
    };
    let mut events = watch_all(&watcher, config, &tasks).await;
    assert_eq!(read_listing(&mut events).await.len(), N);

    // Nothing changes: the probes read one entry each, and list nothing.
    let before = fake.stats();
    let quiet = eventually("five probes", DEADLINE, || {
        let now = fake.stats();
        let done = now.catalog_pages >= before.catalog_pages + 5;
        async move { done.then_some(now) }
    })
    .await;
    assert_eq!(
        quiet.catalog_entries - before.catalog_entries,
        quiet.catalog_pages - before.catalog_pages,
        "an unchanged catalog was listed again instead of only probed"
    );

    publisher
        .publish(DEFAULT_GROUP, "fresh", instances(2, "new"))
        .await
        .expect("publish");
    loop {
        match next_event(&mut events).await {
            WatchEvent::Snapshot(s) if &*s.service.name == "fresh" => {
                assert_eq!(s.instances.len(), 2);
                break;
            }
            WatchEvent::Snapshot(_) => {}
            other => panic!("unexpected event: {other:?}"),
        }
    }
    let after = fake.stats();
    assert!(
        after.catalog_entries - quiet.catalog_entries > N as u64,
        "the new service was found without a listing"
    );
    tasks.token().cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_source_is_listed_with_its_reads_side_by_side_and_in_order() {
    const N: usize = 200;
    let fake = fake(FakeOptions::default()).await;
    let tasks = Tasks::default();
    let publisher = client(&fake, &tasks);
    publisher.wait_connected(DEADLINE).await.expect("connects");
    for i in 0..N {
        publisher
            .publish(DEFAULT_GROUP, &format!("far-{i:03}"), instances(1, "a"))
            .await
            .expect("publish");
    }
    // Every subscribe and query now waits as a distant region's would.
    fake.set_read_delay(Duration::from_millis(20));
    let watcher = client(&fake, &tasks);
    watcher.wait_connected(DEADLINE).await.expect("connects");
    let config = WatchConfig {
        list_interval: Duration::from_secs(3600),
        reads_in_flight: 8,
        ..WatchConfig::default()
    };
    let mut events = watch_all(&watcher, config, &tasks).await;
    let mut order = Vec::new();
    loop {
        match next_event(&mut events).await {
            WatchEvent::InitSnapshot(s) => {
                assert_eq!(s.instances.len(), 1, "{}", s.service);
                order.push(s.service.name.to_string());
            }
            WatchEvent::InitDone => break,
            other => panic!("unexpected event in the listing: {other:?}"),
        }
    }
    let expected: Vec<String> = (0..N).map(|i| format!("far-{i:03}")).collect();
    assert_eq!(order, expected, "every service once, in listing order");
    let peak = fake.stats().reads_in_progress_peak;
    assert!(
        peak > 1,
        "the listing's reads overlapped (peak {peak} served at once)"
    );
    assert!(peak <= 8, "at most reads_in_flight (8) at once, saw {peak}");
    tasks.token().cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_gone_from_the_catalog_is_removed_and_only_that_one() {
    let fake = fake(FakeOptions {
        empty_service_ttl: Duration::from_millis(100),
        ..FakeOptions::default()
    })
    .await;
    let tasks = Tasks::default();
    let publisher = client(&fake, &tasks);
    publisher.wait_connected(DEADLINE).await.expect("connects");
    for name in ["kept-a", "gone-b", "kept-c"] {
        publisher
            .publish(DEFAULT_GROUP, name, instances(1, "a"))
            .await
            .expect("publish");
    }
    let watcher = client(&fake, &tasks);
    watcher.wait_connected(DEADLINE).await.expect("connects");
    let config = WatchConfig {
        list_interval: Duration::from_millis(200),
        probe_interval: None,
        ..WatchConfig::default()
    };
    let mut events = watch_all(&watcher, config, &tasks).await;
    assert_eq!(read_listing(&mut events).await.len(), 3);
    // Withdrawn, then expired from the catalog: the next listings drop it.
    publisher
        .publish(DEFAULT_GROUP, "gone-b", Vec::new())
        .await
        .expect("withdraw");
    loop {
        match next_event(&mut events).await {
            WatchEvent::Removed(key) => {
                assert_eq!(key, self::key("gone-b"), "only the service that left");
                break;
            }
            // Pushes (the first ones after subscribing, the withdrawal).
            WatchEvent::Snapshot(_) => {}
            other => panic!("unexpected event: {other:?}"),
        }
    }
    // The removed service is unsubscribed; the others stay followed.
    eventually("gone-b unsubscribed", DEADLINE, || {
        let n = fake.subscribers(&self::key("gone-b"));
        async move { (n == 0).then_some(()) }
    })
    .await;
    for name in ["kept-a", "kept-c"] {
        assert_eq!(
            fake.subscribers(&self::key(name)),
            1,
            "{name} still followed"
        );
    }
    tasks.token().cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_push_cut_short_is_not_acked_and_one_the_model_cannot_hold_changes_nothing() {
    let fake = fake(FakeOptions::default()).await;
    let tasks = Tasks::default();
    let (publisher, watcher) = connected_pair(&fake, &tasks).await;
    let mut sub = watcher
        .subscribe(DEFAULT_GROUP, "raw")
        .await
        .expect("subscribe");
    let first = instances(2, "first");
    publisher
        .publish(DEFAULT_GROUP, "raw", first.clone())
        .await
        .expect("publish");
    next_matching(&mut sub, &first, "the published set").await;
    let id = match &*watcher.state().borrow() {
        ConnectionState::Connected { connection_id, .. } => connection_id.clone(),
        other => panic!("the watcher is not connected: {other:?}"),
    };
    let class = "NotifySubscriberRequest";
    // Cut short: unreadable, so not acked (the server would push it again).
    assert!(fake.send_raw(&id, class, r#"{"requestId":"raw-1","serviceInfo":{"name":"#));
    // A port out of range: read and acked, but no view to hand on.
    let unholdable = r#"{"requestId":"raw-2","serviceInfo":{"name":"raw","groupName":"DEFAULT_GROUP",
        "hosts":[{"ip":"10.9.9.9","port":70000}]}}"#;
    assert!(fake.send_raw(&id, class, unholdable));
    // A good one, escapes and all, newer than any view the fake made:
    // taken and acked. The stream is read in order, so once this is acked
    // the two above were handled.
    let good = r#"{"requestId":"raw-3","serviceInfo":{"name":"raw","groupName":"DEFAULT_GROUP","lastRefTime":9000000000000,
        "hosts":[{"ip":"10.9.9.\u0038","port":80,"metadata":{"k":"v\"q"}}]}}"#;
    assert!(fake.send_raw(&id, class, good));
    let expected = [Instance::new("10.9.9.8", 80).with_metadata("k", "v\"q")];
    next_matching(&mut sub, &expected, "the good raw push").await;
    eventually("the good raw push acked", DEADLINE, || {
        let acked = fake.other_acks().contains(&"raw-3".to_owned());
        async move { acked.then_some(()) }
    })
    .await;
    // (The fake's own superseded pushes may be acked late among them.)
    let raw_acks: Vec<String> = fake
        .other_acks()
        .into_iter()
        .filter(|id| id.starts_with("raw-"))
        .collect();
    assert_eq!(raw_acks, ["raw-2", "raw-3"], "acks of the raw pushes");
    // The unholdable view never reached the subscriber: its latest is the good one.
    let latest = watcher.latest(&key("raw")).expect("a view");
    assert_eq!(fingerprint(&latest.instances), fingerprint(&expected));
    assert!(is_connected(&watcher), "the watcher stays connected");
    tasks.token().cancel();
}
