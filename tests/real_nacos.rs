//! The client against real Nacos 2.x servers started by the test harness.
//!
//! Most tests share one server and isolate themselves by service and
//! namespace names; tests that restart a server or need auth get their own.
//! Behaviours the testkit server also claims live in `tests/conformance.rs`,
//! which runs each of them here too (on a real server) and on the testkit.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use futures_util::StreamExt;
use nacos_replicator::cluster::{CatalogApi, ConnectionState, Credentials};
use nacos_replicator::model::{DEFAULT_GROUP, DEFAULT_NAMESPACE, Instance, ServiceKey};
use nacos_replicator::runtime::Tasks;
use nacos_replicator::transport::{Session, SessionConfig};
use nacos_replicator::wire::convert;
use support::*;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread")]
async fn handshake_push_and_ack_on_a_raw_session() {
    let server = shared_server();
    let grpc = format!("127.0.0.1:{}", server.grpc_port());
    let (session, mut pushes) =
        Session::connect(&grpc, &SessionConfig::default(), &Tasks::default())
            .await
            .expect("handshake");
    assert!(
        !session.connection_id().is_empty(),
        "server check gave no connection id"
    );

    let name = unique("raw");
    let key = ServiceKey::new(DEFAULT_NAMESPACE, DEFAULT_GROUP, name.as_str());
    let none = HashMap::new();
    session
        .request(
            &convert::batch_request(&key, &instances_on("10.20.0", 2, 7000)),
            &none,
        )
        .await
        .expect("batch");
    session
        .request(&convert::subscribe_request(&key, true), &none)
        .await
        .expect("subscribe");

    // The subscription makes the server push; we must see one with our hosts.
    let push = tokio::time::timeout(DEADLINE, async {
        loop {
            let push = pushes.recv().await.expect("push stream open");
            let hosts = push
                .service_info
                .as_ref()
                .and_then(|i| i.hosts.as_ref())
                .map_or(0, Vec::len);
            if hosts == 2 {
                return push;
            }
        }
    })
    .await
    .expect("a push with both hosts");
    assert!(
        push.request_id.is_some(),
        "pushes carry a request id to echo"
    );

    // The ack (same requestId) reaches the server: it logs the push as a success
    // for this service, and never as a failure.
    let log = server.log_dir().join("naming-push.log");
    eventually(
        "the server to record the push as acknowledged",
        DEADLINE,
        || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let ok = text
                .lines()
                .any(|l| l.contains("[PUSH-SUCC]") && l.contains(&format!("name='{name}'")));
            async move { ok.then_some(()) }
        },
    )
    .await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !text
            .lines()
            .any(|l| l.contains("[PUSH-FAIL]") && l.contains(&format!("name='{name}'"))),
        "the server recorded a failed push for {name}"
    );
    assert!(session.stats().pushes() >= 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_session_sends_health_checks_and_stays_up() {
    let server = shared_server();
    let config = SessionConfig {
        idle_health_check: Duration::from_millis(500),
        ..SessionConfig::default()
    };
    let grpc = format!("127.0.0.1:{}", server.grpc_port());
    let (session, _pushes) = Session::connect(&grpc, &config, &Tasks::default())
        .await
        .expect("handshake");
    eventually("three idle health checks answered", DEADLINE, || {
        let n = session.stats().health_checks();
        async move { (n >= 3).then_some(()) }
    })
    .await;
    assert!(
        !session.is_closed(),
        "a health check failed: {:?}",
        session.stats()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_from_an_independent_client_is_seen() {
    let server = shared_server();
    let tasks = Tasks::default();
    let c = client(server, DEFAULT_NAMESPACE, &tasks);
    let name = unique("foreign");
    let mut sub = c.subscribe(DEFAULT_GROUP, &name).await.expect("subscribe");
    // Registered through the server's HTTP open API: code we did not write.
    // Persistent, so it needs no heartbeats; on loopback, because the server
    // probes a persistent instance's port.
    server
        .register_instance_http(&nacos_replicator::testing::nacos::HttpInstance {
            namespace: DEFAULT_NAMESPACE.into(),
            group: DEFAULT_GROUP.into(),
            service: name.clone(),
            ip: "127.0.0.1".into(),
            port: 9400,
            ephemeral: false,
            metadata: [("origin".to_owned(), "http".to_owned())]
                .into_iter()
                .collect(),
            ..Default::default()
        })
        .expect("HTTP register");
    let snapshot = tokio::time::timeout(DEADLINE, async {
        loop {
            let s = sub.next().await.expect("stream open");
            if s.instances
                .iter()
                .any(|i| &*i.ip == "127.0.0.1" && i.port == 9400)
            {
                return s;
            }
        }
    })
    .await
    .expect("the HTTP-registered instance arrives by push");
    let seen = snapshot
        .instances
        .iter()
        .find(|i| i.port == 9400)
        .expect("instance");
    assert_eq!(seen.metadata.get("origin"), Some("http"));
    assert!(!seen.ephemeral, "registered as persistent");
    tasks.token().cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn server_restart_reconnects_and_redoes_publication_and_subscription() {
    let server = own_server(Default::default());
    let tasks = Tasks::default();
    let publisher = client(&server, DEFAULT_NAMESPACE, &tasks);
    let watcher = client(&server, DEFAULT_NAMESPACE, &tasks);
    let name = unique("restart");
    let set = instances_on("10.20.0", 4, 8400);
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

    let old_id = connection_id(&publisher);
    server.restart().expect("restart");

    // Both clients come back on new connections, and redo restores the
    // publication (a fresh server knows nothing) and the subscription.
    let minute = Duration::from_secs(60);
    wait_reconnected(&publisher, &old_id, minute).await;
    let queried = wait_query(
        &watcher,
        &name,
        set.len(),
        "the publication restored on the restarted server",
        minute,
    )
    .await;
    assert_eq!(fingerprint(&queried.instances), fingerprint(&set));

    // The subscription was redone too: a change after the restart is pushed.
    let changed = instances_on("10.20.0", 2, 8450);
    publisher
        .publish(DEFAULT_GROUP, &name, changed.clone())
        .await
        .expect("publish after restart");
    next_matching(&mut sub, &changed, "push after restart").await;
    tasks.token().cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_outlives_its_token() {
    // Good, bad and missing credentials are a conformance contract; what
    // needs a real server is a token that really expires: they live 10 s here.
    let mut options = nacos_replicator::testing::nacos::ServerOptions::with_auth();
    options.properties.push((
        "nacos.core.auth.plugin.nacos.token.expire.seconds".into(),
        "10".into(),
    ));
    let server = own_server(options);
    let tasks = Tasks::default();
    let (user, password) = server
        .admin_credentials()
        .expect("auth server has an admin");
    let good = client_with(
        &server,
        DEFAULT_NAMESPACE,
        Some(Credentials {
            username: user.clone(),
            password,
        }),
        &tasks,
    );
    let name = unique("authed");
    good.wait_connected(DEADLINE)
        .await
        .expect("connects with good credentials");
    good.publish(DEFAULT_GROUP, &name, instances_on("10.20.0", 2, 8500))
        .await
        .expect("publish with a token");

    // Token expiry: once a token issued now is refused by the server, the
    // client's own token (issued earlier) has expired too; its calls go on
    // working because it refreshes before expiry (or after a 403).
    let probe = server
        .login(&user, &server.admin_credentials().expect("admin").1)
        .expect("login");
    let list_url = format!("{}/v1/ns/instance/list", server.http_base());
    eventually(
        "the server to refuse an expired token",
        Duration::from_secs(40),
        || {
            let refused = matches!(
                ureq::get(&list_url)
                    .query("serviceName", &name)
                    .query("accessToken", &probe)
                    .call(),
                Err(ureq::Error::StatusCode(403))
            );
            async move { refused.then_some(()) }
        },
    )
    .await;
    let after = good
        .query(DEFAULT_GROUP, &name)
        .await
        .expect("query after the token expired");
    assert_eq!(after.instances.len(), 2);
    good.publish(DEFAULT_GROUP, &name, instances_on("10.20.0", 1, 8500))
        .await
        .expect("publish after the token expired");
    // The HTTP catalog (group discovery) too.
    let listed = good
        .catalog()
        .await
        .expect("catalog after the token expired");
    assert!(
        listed.contains(&(DEFAULT_GROUP.to_owned(), name.clone())),
        "{listed:?}"
    );
    tasks.token().cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_listing_method_follows_the_server_and_its_limits() {
    // A server whose fuzzy watch tracks at most two services per pattern, with
    // auth on: 3.x refuses our watch once a third service exists, and the
    // client lists through the v3 admin API with its user instead (2.x, which
    // knows no fuzzy watch and no v3 login, lists through its v1 catalog after
    // logging in through v1).
    let mut options = nacos_replicator::testing::nacos::ServerOptions::with_auth();
    options.properties.push((
        "nacos.naming.fuzzy.watch.max.pattern.match.service.count".into(),
        "2".into(),
    ));
    let server = own_server(options);
    let tasks = Tasks::default();
    let (username, password) = server
        .admin_credentials()
        .expect("auth server has an admin");
    let publisher = client_with(
        &server,
        DEFAULT_NAMESPACE,
        Some(Credentials { username, password }),
        &tasks,
    );
    let mut expected = Vec::new();
    for n in 0..4 {
        let name = format!("limit-{n}");
        publisher
            .publish(DEFAULT_GROUP, &name, instances_on("10.20.0", 1, 8600))
            .await
            .expect("publish");
        expected.push((DEFAULT_GROUP.to_owned(), name));
    }
    // A client connecting now finds four services, twice the limit.
    let (username, password) = server.admin_credentials().expect("admin");
    let lister = client_with(
        &server,
        DEFAULT_NAMESPACE,
        Some(Credentials { username, password }),
        &tasks,
    );
    lister.wait_connected(DEADLINE).await.expect("connects");
    let listed = eventually("all four services listed", DEADLINE, || {
        let lister = lister.clone();
        async move { lister.catalog().await.ok().filter(|l| l.len() == 4) }
    })
    .await;
    assert_eq!(listed, expected);
    let method = if server.major() >= 3 {
        CatalogApi::V3Admin
    } else {
        CatalogApi::V1Catalog
    };
    assert_eq!(lister.catalog_api(), Some(method));
    tasks.token().cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_reset_from_the_server_reconnects_and_redoes() {
    use nacos_replicator::cluster::{Client, ClientConfig};
    let server = shared_server();
    let tasks = Tasks::default();
    // The publisher knows the server as `localhost`; the reset names it
    // `127.0.0.1`, so the address it reconnects to shows it obeyed.
    let mut config = ClientConfig::new(
        "reset",
        vec![format!("localhost:{}", server.http_port())],
        DEFAULT_NAMESPACE,
    );
    config.reconnect_max = Duration::from_secs(2);
    let publisher = Client::start(config, &tasks).expect("config");
    let watcher = client(server, DEFAULT_NAMESPACE, &tasks);
    let name = unique("reset");
    let set = instances_on("10.20.0", 3, 8600);
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

    let old_id = connection_id(&publisher);
    // The server's loader API sends ConnectResetRequest naming where to go.
    server
        .reset_connection(&old_id, Some(&addr(server)))
        .expect("reset request accepted");
    wait_reconnected(&publisher, &old_id, DEADLINE).await;
    match &*publisher.state().borrow() {
        ConnectionState::Connected { server: to, .. } => {
            assert_eq!(*to, addr(server), "did not move to the named server")
        }
        other => panic!("not connected: {other:?}"),
    }

    // The old connection's instances went with it; the redo put them back.
    let restored = wait_query(
        &watcher,
        &name,
        set.len(),
        "the set republished on the new connection",
        DEADLINE,
    )
    .await;
    assert_eq!(fingerprint(&restored.instances), fingerprint(&set));
    tasks.token().cancel();
}

/// A throwaway CA and a server certificate for 127.0.0.1 and localhost
/// (EC P-256, key as PKCS#8 PEM, the format Nacos loads).
fn test_certificates(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "nacos-replicator test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).expect("CA cert");
    let issuer = Issuer::new(ca, ca_key);
    let leaf_key = KeyPair::generate().expect("server key");
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .expect("params");
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).expect("server cert");
    let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
    std::fs::write(&cert, leaf_cert.pem()).expect("write cert");
    std::fs::write(&key, leaf_key.serialize_pem()).expect("write key");
    (cert, key, ca_cert.pem().into_bytes())
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_to_the_grpc_port() {
    use nacos_replicator::cluster::{Client, ClientConfig};
    use nacos_replicator::transport::TlsOptions;

    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, key, ca_pem) = test_certificates(dir.path());
    let mut options = nacos_replicator::testing::nacos::ServerOptions::default();
    for (k, v) in [
        ("enableTls", "true".to_owned()),
        // Refuse plaintext (the default also accepts it on the same port).
        ("compatibility", "false".to_owned()),
        // Nacos reads these through a resource loader: `file:` is required.
        ("certChainFile", format!("file:{}", cert.display())),
        ("certPrivateKey", format!("file:{}", key.display())),
    ] {
        options
            .properties
            .push((format!("nacos.remote.server.rpc.tls.{k}"), v));
    }
    let server = own_server(options);
    let tasks = Tasks::default();
    let with_tls = |ca: Option<Vec<u8>>| {
        let mut config = ClientConfig::new("tls", vec![addr(&server)], DEFAULT_NAMESPACE);
        config.session.tls = Some(TlsOptions {
            ca_pem: ca,
            domain: None,
        });
        config.reconnect_max = Duration::from_secs(1);
        Client::start(config, &tasks).expect("config")
    };

    let secure = with_tls(Some(ca_pem));
    secure
        .wait_connected(DEADLINE)
        .await
        .expect("TLS handshake with the test CA");
    let name = unique("tls");
    secure
        .publish(DEFAULT_GROUP, &name, instances_on("10.20.0", 2, 8700))
        .await
        .expect("publish over TLS");
    let mut sub = secure
        .subscribe(DEFAULT_GROUP, &name)
        .await
        .expect("subscribe over TLS");
    next_matching(
        &mut sub,
        &instances_on("10.20.0", 2, 8700),
        "pushed over TLS",
    )
    .await;

    // A client that does not trust the CA, and one speaking plaintext, never connect.
    let untrusting = with_tls(None);
    let plain = client(&server, DEFAULT_NAMESPACE, &tasks);
    for (who, c) in [("untrusting", &untrusting), ("plaintext", &plain)] {
        let mut state = c.state();
        let failed = tokio::time::timeout(
            DEADLINE,
            state.wait_for(|s| matches!(s, ConnectionState::Disconnected { .. })),
        )
        .await
        .unwrap_or_else(|_| panic!("{who} client reported no failure"))
        .expect("state channel open")
        .clone();
        assert!(
            !matches!(*c.state().borrow(), ConnectionState::Connected { .. }),
            "{who} client connected: {failed:?}"
        );
        assert!(
            c.wait_connected(Duration::from_secs(2)).await.is_err(),
            "{who} client connected"
        );
    }
    tasks.token().cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_server_in_the_list_is_skipped() {
    use nacos_replicator::cluster::{Client, ClientConfig};
    let server = shared_server();
    let dead = dead_addr();
    let tasks = Tasks::default();
    let mut config = ClientConfig::new("failover", vec![dead, addr(server)], DEFAULT_NAMESPACE);
    config.reconnect_max = Duration::from_millis(500);
    let c = Client::start(config, &tasks).expect("config");
    c.wait_connected(DEADLINE)
        .await
        .expect("connects through the live server");
    match &*c.state().borrow() {
        ConnectionState::Connected { server: s, .. } => assert_eq!(*s, addr(server)),
        other => panic!("not connected: {other:?}"),
    }
    tasks.token().cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn dropping_the_last_subscription_unsubscribes() {
    let server = shared_server();
    let tasks = Tasks::default();
    let c = client(server, DEFAULT_NAMESPACE, &tasks);
    let name = unique("unsub");
    let subscribers = || {
        tokio::task::block_in_place(|| {
            server.subscriber_count_http(DEFAULT_NAMESPACE, DEFAULT_GROUP, &name)
        })
        .ok()
    };
    let first = c.subscribe(DEFAULT_GROUP, &name).await.expect("subscribe");
    let second = c
        .subscribe(DEFAULT_GROUP, &name)
        .await
        .expect("subscribe again");
    eventually("the server to list our subscription", DEADLINE, || {
        let n = subscribers();
        async move { (n == Some(1)).then_some(()) }
    })
    .await;
    drop(first);
    // One reader is left: still subscribed, so it must still be listed.
    assert_eq!(subscribers(), Some(1));
    drop(second);
    eventually("the server to drop our subscription", DEADLINE, || {
        let n = subscribers();
        async move { (n == Some(0)).then_some(()) }
    })
    .await;
    tasks.token().cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_session_answers_the_servers_liveness_probes() {
    let server = shared_server();
    // No health checks of our own: the server finds the connection idle
    // (20 s) and probes it with ClientDetectionRequest, then waits up to 5 s
    // for the answers of all probed connections before dropping the ones
    // that did not answer.
    //
    // Nacos 2.3.2 races here: its callback counts the latch down *before*
    // recording the connection as answered, so the checking thread can wake
    // and drop a connection that answered at once (seen here about half the
    // time). What a client controls is the answer, and it shows in the
    // timing: dropped for not answering means dropped ~5 s after the probe;
    // dropped by that race means within moments of it. (Our clients never
    // idle that long: they send health checks of their own every 5 s.)
    let config = SessionConfig {
        idle_health_check: Duration::from_secs(3600),
        ..SessionConfig::default()
    };
    let grpc = format!("127.0.0.1:{}", server.grpc_port());
    let (session, _pushes) = Session::connect(&grpc, &config, &Tasks::default())
        .await
        .expect("handshake");
    eventually(
        "a liveness probe from the server",
        Duration::from_secs(60),
        || {
            let n = session.stats().detections();
            async move { (n >= 1).then_some(()) }
        },
    )
    .await;
    let probed = std::time::Instant::now();
    match tokio::time::timeout(Duration::from_secs(10), session.closed()).await {
        // Answered and kept: still registered well past the 5 s deadline.
        Err(_elapsed) => {
            let none = HashMap::new();
            let key = ServiceKey::new(DEFAULT_NAMESPACE, DEFAULT_GROUP, unique("idle"));
            session
                .request(&convert::query_request(&key), &none)
                .await
                .expect("the connection still works");
        }
        Ok(reason) => {
            let after = probed.elapsed();
            assert!(
                after < Duration::from_secs(3),
                "dropped {after:?} after the probe ({reason:?}): the server's deadline ran out, so our answer never came"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn check_connect_reports_which_clusters_answer() {
    let server = shared_server();
    let dead = dead_addr();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("agent.toml");
    let write = |clusters: &str| {
        std::fs::write(
            &config,
            format!("[timings]\nrequest_timeout = \"1s\"\n{clusters}\n[[routes]]\nfrom = \"live\"\nto = \"other\"\n"),
        )
        .expect("write config")
    };
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_nacos-replicator"))
            .args(["check", "--connect", "--config"])
            .arg(&config)
            .output()
            .expect("run the binary")
    };
    let live = format!(
        "[[clusters]]\nid = \"live\"\nservers = [\"{}\"]\n",
        addr(server)
    );
    write(&format!(
        "{live}[[clusters]]\nid = \"other\"\nservers = [\"{}\"]\n",
        addr(server)
    ));
    let ok = tokio::task::block_in_place(run);
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        out.contains("live/public: ok") && out.contains("other/public: ok"),
        "{out}"
    );
    // The server's version and the listing method.
    let version = format!("Nacos {}", line().pinned_version());
    let listing = if server.major() >= 3 {
        "listing by fuzzy watch (Nacos 3.x gRPC)"
    } else {
        "listing by v1 catalog (Nacos 2.x)"
    };
    assert!(out.contains(&version) && out.contains(listing), "{out}");

    write(&format!(
        "{live}[[clusters]]\nid = \"other\"\nservers = [\"{dead}\"]\n"
    ));
    let failed = tokio::task::block_in_place(run);
    let out = String::from_utf8_lossy(&failed.stdout);
    assert_eq!(failed.status.code(), Some(1), "{out}");
    assert!(
        out.contains("live/public: ok") && out.contains("other/public: FAILED"),
        "{out}"
    );

    // An invalid file is a usage error (64), naming the key.
    std::fs::write(&config, "[[clusters]]\nid = \"x\"\nservers = []\n").expect("write");
    let bad = tokio::task::block_in_place(run);
    assert_eq!(bad.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("clusters[0].servers"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_watcher_lists_all_groups_then_follows_changes_and_reconnects() {
    use nacos_replicator::cluster::watch::{WatchConfig, WatchEvent, watch};
    let server = shared_server();
    let namespace = unique("watch");
    let tasks = Tasks::default();
    let publisher = client(server, &namespace, &tasks);
    let watcher = client(server, &namespace, &tasks);
    publisher.wait_connected(DEADLINE).await.expect("connects");
    publisher
        .publish("G1", "orders", instances_on("10.20.0", 2, 8900))
        .await
        .expect("publish");
    publisher
        .publish("G2", "users", instances_on("10.20.0", 1, 8910))
        .await
        .expect("publish");
    publisher
        .publish("G1", "skip-me", instances_on("10.20.0", 1, 8920))
        .await
        .expect("publish");
    watcher.wait_connected(DEADLINE).await.expect("connects");
    // The catalog is eventually consistent with registrations: wait until it shows all three.
    eventually("the catalog to show the three services", DEADLINE, || {
        let w = watcher.clone();
        async move { (w.catalog().await.ok()?.len() == 3).then_some(()) }
    })
    .await;

    let filter = std::sync::Arc::new(|k: &ServiceKey| !k.name.starts_with("skip"));
    let config = WatchConfig {
        list_interval: Duration::from_millis(500),
        ..WatchConfig::default()
    };
    let mut events = watch(watcher.clone(), filter, config, &tasks);

    // A full listing: both groups, the filtered service left out.
    assert_eq!(next_event(&mut events).await, WatchEvent::Init);
    let listed = read_listing(&mut events).await;
    assert_eq!(
        listed,
        BTreeSet::from([
            ("G1".to_owned(), "orders".to_owned()),
            ("G2".to_owned(), "users".to_owned())
        ])
    );

    // A change is pushed; a service created later is found by the poll.
    publisher
        .publish("G1", "orders", instances_on("10.20.0", 3, 8900))
        .await
        .expect("change");
    publisher
        .publish("G3", "created-later", instances_on("10.20.0", 1, 8930))
        .await
        .expect("new service");
    let (mut changed, mut found) = (false, false);
    while !(changed && found) {
        match next_event(&mut events).await {
            WatchEvent::Snapshot(s) if &*s.service.name == "orders" && s.instances.len() == 3 => {
                changed = true
            }
            WatchEvent::Snapshot(s)
                if &*s.service.name == "created-later" && &*s.service.group == "G3" =>
            {
                found = true
            }
            WatchEvent::Snapshot(_) => {}
            other => panic!("unexpected event: {other:?}"),
        }
    }

    // After a reconnect the watcher lists in full again.
    let old = connection_id(&watcher);
    server.reset_connection(&old, None).expect("reset");
    loop {
        if next_event(&mut events).await == WatchEvent::Init {
            break;
        }
    }
    let relisted: BTreeSet<String> = read_listing(&mut events)
        .await
        .into_iter()
        .map(|(_, name)| name)
        .collect();
    assert_eq!(
        relisted,
        BTreeSet::from([
            "orders".to_owned(),
            "users".to_owned(),
            "created-later".to_owned()
        ])
    );
    tasks.token().cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_publisher_applies_the_latest_set_to_a_real_server() {
    use nacos_replicator::reconcile::publish::{Publisher, PublisherConfig};
    let server = shared_server();
    let tasks = Tasks::default();
    let destination = client(server, DEFAULT_NAMESPACE, &tasks);
    let watcher = client(server, DEFAULT_NAMESPACE, &tasks);
    destination
        .wait_connected(DEADLINE)
        .await
        .expect("connects");
    let publisher = Publisher::start(destination.clone(), PublisherConfig::default(), &tasks);
    let name = unique("publisher");
    let key = ServiceKey::new(DEFAULT_NAMESPACE, DEFAULT_GROUP, name.as_str());
    let mut sub = watcher
        .subscribe(DEFAULT_GROUP, &name)
        .await
        .expect("subscribe");
    // A burst: whatever is sent in between, the destination ends at the last set.
    for n in 1..=5u16 {
        publisher.submit(key.clone(), instances_on("10.20.0", n, 9000));
    }
    next_matching(
        &mut sub,
        &instances_on("10.20.0", 5, 9000),
        "the last set of the burst",
    )
    .await;
    // The acknowledged set is recorded before the stats change that announces it.
    let mut stats = publisher.stats();
    stats
        .wait_for(|_| publisher.published(&key).map(|s| s.len()) == Some(5))
        .await
        .expect("running");
    assert_eq!(publisher.pending(), 0);
    publisher.submit(key.clone(), Vec::new());
    next_matching(&mut sub, &[], "withdrawn").await;
    tasks.token().cancel();
}

/// Two real regions and one agent with routes both ways (hub mode): each
/// region ends with its natives plus the other's, each exactly once, tagged
/// with their origin, and nothing loops back.
#[tokio::test(flavor = "multi_thread")]
async fn two_regions_replicate_each_others_natives_exactly_once() {
    use nacos_replicator::agent::Agent;
    use nacos_replicator::reconcile::OriginTags;
    let a = shared_server();
    let b = own_server(Default::default());
    let ns = unique("mesh");
    let config = agent_config("", &[("a", a), ("b", &b)], &ns, &[("a", "b"), ("b", "a")]);
    let tasks = Tasks::default();
    let app_a = client(a, &ns, &tasks);
    let app_b = client(&b, &ns, &tasks);
    let n = |ip: &str| Instance::new(ip, 7070).with_metadata("app", ip);
    let (n1, n2, n3, n4) = (n("10.1.0.1"), n("10.1.0.2"), n("10.2.0.3"), n("10.2.0.4"));
    app_a.wait_connected(DEADLINE).await.expect("a connects");
    app_b.wait_connected(DEADLINE).await.expect("b connects");
    app_a
        .publish(DEFAULT_GROUP, "orders", vec![n1.clone(), n2.clone()])
        .await
        .expect("natives in a");
    app_b
        .publish(DEFAULT_GROUP, "orders", vec![n3.clone()])
        .await
        .expect("native in b");
    app_b
        .publish("G2", "users", vec![n4.clone()])
        .await
        .expect("native in b");

    let agent_token = CancellationToken::new();
    let agent = tokio::spawn(Agent::new(config).run(agent_token.clone()));

    let tags = OriginTags::default();
    let from = |i: &Instance, origin: &str| {
        tags.tag(i, &nacos_replicator::model::ClusterId(origin.into()))
            .expect("fits")
    };
    // One checker for every expectation: what each cluster shows, exactly.
    let converge = |expect: Vec<(&'static str, &'static str, Vec<Instance>, Vec<Instance>)>,
                    what: &'static str| {
        let (app_a, app_b) = (app_a.clone(), app_b.clone());
        async move {
            eventually(what, Duration::from_secs(40), || {
                let (app_a, app_b, expect) = (app_a.clone(), app_b.clone(), expect.clone());
                async move {
                    for (group, name, in_a, in_b) in &expect {
                        let sa = app_a.query(group, name).await.ok()?;
                        let sb = app_b.query(group, name).await.ok()?;
                        if fingerprint(&sa.instances) != fingerprint(in_a)
                            || fingerprint(&sb.instances) != fingerprint(in_b)
                        {
                            return None;
                        }
                    }
                    Some(())
                }
            })
            .await
        }
    };
    converge(
        vec![
            (
                "DEFAULT_GROUP",
                "orders",
                vec![n1.clone(), n2.clone(), from(&n3, "b")],
                vec![n3.clone(), from(&n1, "a"), from(&n2, "a")],
            ),
            ("G2", "users", vec![from(&n4, "b")], vec![n4.clone()]),
        ],
        "both regions hold their natives and the other's, once each",
    )
    .await;

    // A change at the origin propagates: weight and metadata, and a removal.
    let n1b = n1.clone().with_weight(3.0).with_metadata("version", "2");
    app_a
        .publish(DEFAULT_GROUP, "orders", vec![n1b.clone()])
        .await
        .expect("change in a");
    converge(
        vec![(
            "DEFAULT_GROUP",
            "orders",
            vec![n1b.clone(), from(&n3, "b")],
            vec![n3.clone(), from(&n1b, "a")],
        )],
        "the change at the origin reaches the other region",
    )
    .await;

    // The agent goes away: its replicas go with its connections.
    agent_token.cancel();
    agent.await.expect("agent task").expect("agent ran");
    converge(
        vec![
            (
                "DEFAULT_GROUP",
                "orders",
                vec![n1b.clone()],
                vec![n3.clone()],
            ),
            ("G2", "users", vec![], vec![n4.clone()]),
        ],
        "only natives left once the agent stops",
    )
    .await;
    tasks.token().cancel();
}

/// A source region goes down: its replicas stay for the hold time, then go;
/// when it comes back they return.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_source_is_held_then_withdrawn_then_restored() {
    use nacos_replicator::agent::Agent;
    use nacos_replicator::reconcile::OriginTags;
    let destination = shared_server();
    let source = own_server(Default::default());
    let ns = unique("hold");
    let timings = "source_loss = \"hold\"\nhold_for = \"10s\"\n";
    let config = agent_config(
        timings,
        &[("dst", destination), ("src", &source)],
        &ns,
        &[("src", "dst")],
    );
    let tasks = Tasks::default();
    let app = client(&source, &ns, &tasks);
    let reader = client(destination, &ns, &tasks);
    let native = Instance::new("10.3.0.1", 7171);
    app.wait_connected(DEADLINE).await.expect("connects");
    app.publish(DEFAULT_GROUP, "billing", vec![native.clone()])
        .await
        .expect("native");
    let agent_token = CancellationToken::new();
    let agent = tokio::spawn(Agent::new(config).run(agent_token.clone()));
    let replica = OriginTags::default()
        .tag(&native, &nacos_replicator::model::ClusterId("src".into()))
        .expect("fits");
    let shows = |expected: Vec<Instance>, what: &'static str| {
        let reader = reader.clone();
        async move {
            eventually(what, Duration::from_secs(60), || {
                let (reader, expected) = (reader.clone(), expected.clone());
                async move {
                    let s = reader.query(DEFAULT_GROUP, "billing").await.ok()?;
                    (fingerprint(&s.instances) == fingerprint(&expected)).then_some(())
                }
            })
            .await
        }
    };
    shows(vec![replica.clone()], "the replica in the destination").await;

    source.stop().expect("stop the source region");
    // Held: still served right after the loss.
    let held = reader.query(DEFAULT_GROUP, "billing").await.expect("query");
    assert_eq!(
        fingerprint(&held.instances),
        fingerprint(std::slice::from_ref(&replica)),
        "withdrawn before the hold time"
    );
    shows(vec![], "withdrawn once the hold time is over").await;

    // The region returns: the application's client re-registers its native
    // (redo), the agent relists, and the replica is back.
    source.restart().expect("restart the source region");
    shows(
        vec![replica],
        "the replica restored after the source returned",
    )
    .await;
    agent_token.cancel();
    agent.await.expect("agent task").expect("agent ran");
    tasks.token().cancel();
}

/// Operator and embedder surfaces on real servers: `diff` before and after,
/// the status server (ready, metrics, status), the read-back finding no
/// false drift next to a native on a replica's endpoint, a custom policy,
/// and the event stream.
#[tokio::test(flavor = "multi_thread")]
async fn status_metrics_read_back_policy_and_diff_on_real_servers() {
    use nacos_replicator::agent::Agent;
    use nacos_replicator::model::ClusterId;
    use nacos_replicator::reconcile::{OriginTags, Policy, Route};
    use nacos_replicator::telemetry::Event;

    /// Canary instances stay home.
    struct NoCanaries;
    impl Policy for NoCanaries {
        fn admits(&self, _: &Route, _: &ServiceKey, native: &Instance) -> bool {
            !native.metadata.contains_key("canary")
        }
    }

    let a = shared_server();
    let b = own_server(Default::default());
    let ns = unique("ops");
    let status_addr = free_local_addr();
    let text = AgentToml::new()
        .status_listen(status_addr)
        .timings("resync_interval = \"2s\"\n")
        .cluster("a", &addr(a), &[&ns])
        .cluster("b", &addr(&b), &[&ns])
        .route("a", "b")
        .text();
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("agent.toml");
    std::fs::write(&file, &text).expect("write config");
    let config = nacos_replicator::config::parse(&file, &text, &|_| None).expect("valid");

    let tasks = Tasks::default();
    let app_a = client(a, &ns, &tasks);
    let app_b = client(&b, &ns, &tasks);
    let n1 = Instance::new("127.0.0.1", 7301).with_metadata("version", "1");
    let n2 = Instance::new("127.0.0.2", 7301);
    let canary = Instance::new("127.0.0.3", 7301).with_metadata("canary", "1");
    // b's own native on n1's endpoint, with other metadata.
    let b_native = Instance::new("127.0.0.1", 7301).with_metadata("team", "b");
    app_a.wait_connected(DEADLINE).await.expect("a connects");
    app_b.wait_connected(DEADLINE).await.expect("b connects");
    app_a
        .publish(
            DEFAULT_GROUP,
            "orders",
            vec![n1.clone(), n2.clone(), canary.clone()],
        )
        .await
        .expect("natives in a");
    app_b
        .publish(DEFAULT_GROUP, "orders", vec![b_native.clone()])
        .await
        .expect("native in b");
    wait_query(&app_a, "orders", 3, "natives visible in a", DEADLINE).await;

    let diff = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_nacos-replicator"))
            .args(["diff", "--config"])
            .arg(&file)
            .output()
            .expect("run the binary");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    // Before any agent: everything is missing, exit 1.
    let (code, out) = tokio::task::block_in_place(diff);
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(out.matches("  missing ").count(), 3, "{out}");

    let agent = Agent::new(config.clone())
        .with_policy(NoCanaries)
        .with_status_server(status_addr);
    let mut events = agent.events();
    let agent_token = CancellationToken::new();
    let running = tokio::spawn(agent.run(agent_token.clone()));

    let tags = OriginTags::default();
    let from_a = |i: &Instance| tags.tag(i, &ClusterId("a".into())).expect("fits");
    let expected = vec![b_native.clone(), from_a(&n1), from_a(&n2)];
    eventually(
        "b holds its native and a's non-canary natives",
        Duration::from_secs(40),
        || {
            let (app_b, expected) = (app_b.clone(), expected.clone());
            async move {
                let s = app_b.query(DEFAULT_GROUP, "orders").await.ok()?;
                (fingerprint(&s.instances) == fingerprint(&expected)).then_some(())
            }
        },
    )
    .await;

    // The event stream told of it, with a lag measured from the push.
    let lag = tokio::time::timeout(DEADLINE, async {
        loop {
            match events.recv().await {
                Ok(Event::Replicated {
                    service,
                    replicas: 2,
                    lag,
                    ..
                }) if &*service.name == "orders" => return lag,
                Ok(_) => {}
                Err(e) => panic!("event stream: {e}"),
            }
        }
    })
    .await
    .expect("a Replicated event");
    assert!(lag.is_some_and(|l| l < Duration::from_secs(30)), "{lag:?}");

    // Status server: ready, metrics, and read-back rounds without drift.
    let get = |path: &'static str| async move { http_get(status_addr, path).await };
    eventually("/readyz says ready", DEADLINE, || async {
        get("/readyz").await.filter(|(c, _)| *c == 200)
    })
    .await;
    let (_, metrics) = get("/metrics").await.expect("metrics");
    for line in [
        "nacos_replicator_replicas{source=\"a\",destination=\"b\"} 2",
        "nacos_replicator_ready 1",
        &format!("nacos_replicator_connected{{cluster=\"b\",namespace=\"{ns}\"}} 1"),
        &format!("nacos_replicator_lag_seconds_count{{cluster=\"b\",namespace=\"{ns}\"}}"),
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
    let key = format!("b/{ns}");
    // Four rounds, 2 s apart: the read-back leaves a service alone for 5 s
    // after its last answer (the destination's view may still be catching
    // up), so the later rounds are the ones that compare it.
    let status = eventually("four read-back rounds", Duration::from_secs(30), || {
        let key = key.clone();
        async move {
            let (_, body) = get("/status").await?;
            let doc: serde_json::Value = serde_json::from_str(&body).ok()?;
            (doc["destinations"][&key]["read_backs"].as_u64()? >= 4).then_some(doc)
        }
    })
    .await;
    assert_eq!(
        status["destinations"][&key]["drift_repaired"], 0,
        "false drift: {status}"
    );
    assert_eq!(status["routes"]["a -> b"]["replicas"], 2, "{status}");
    // Each connection shows its server's line and, for a source, how it lists.
    let source = &status["connections"][&format!("a/{ns}")];
    let (line, listing) = if a.major() >= 3 {
        ("3.x", "fuzzy watch (Nacos 3.x gRPC)")
    } else {
        ("2.x", "v1 catalog (Nacos 2.x)")
    };
    assert_eq!(source["server_line"], line, "{status}");
    assert_eq!(source["listing"], listing, "{status}");
    assert_eq!(
        source["server_version"],
        support::line().pinned_version(),
        "{status}"
    );

    // diff, with the agent's policy: in sync. The CLI knows no policy, so it
    // reports exactly the canary as missing.
    let report = nacos_replicator::agent::diff(&config, &NoCanaries, DEADLINE)
        .await
        .expect("diff");
    assert!(report.differences.is_empty(), "{report:?}");
    assert_eq!(report.wanted, 2);
    let (code, out) = tokio::task::block_in_place(diff);
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(out.matches("  missing ").count(), 1, "{out}");
    assert!(out.contains("127.0.0.3:7301"), "{out}");

    agent_token.cancel();
    running.await.expect("agent task").expect("agent ran");
    tasks.token().cancel();
}

/// Discovery latency: the time from a service's creation to a watcher seeing
/// it, with full listings so rare (10 min) that only the catalog probe (the
/// v1 catalog on 2.x, the v3 admin list on 3.x, every 500 ms) or, on 3.x,
/// the fuzzy watch can explain a discovery; and the probe's contract (the
/// namespace's count and one of its names). Prints `discovery figure:` lines.
#[tokio::test(flavor = "multi_thread")]
async fn discovery_by_fuzzy_watch_and_by_catalog_probe() {
    use nacos_replicator::cluster::watch::{WatchConfig, WatchEvent};
    use nacos_replicator::cluster::{Client, ClientConfig};
    let server = own_server(nacos_replicator::testing::nacos::ServerOptions::with_auth());
    let tasks = Tasks::default();
    let credentials = || {
        let (username, password) = server.admin_credentials().expect("admin");
        Some(Credentials { username, password })
    };
    let start = |fuzzy: bool| {
        let mut config = ClientConfig::new("disc", vec![addr(&server)], DEFAULT_NAMESPACE);
        config.credentials = credentials();
        config.fuzzy_watch = fuzzy;
        Client::start(config, &tasks).expect("config")
    };
    let publisher = client_with(&server, DEFAULT_NAMESPACE, credentials(), &tasks);
    // Listings ten minutes apart: what is found in time is found by the
    // catalog probe (HTTP) or the fuzzy watch (3.x).
    let mut watchers = vec![(
        "probing every 500 ms",
        start(false),
        Some(Duration::from_millis(500)),
    )];
    if server.major() >= 3 {
        watchers.push(("fuzzy watch (no probes)", start(true), None));
    }
    let mut streams = Vec::new();
    for (_, client, probe_every) in &watchers {
        client.wait_connected(DEADLINE).await.expect("connects");
        let config = WatchConfig {
            list_interval: Duration::from_secs(600),
            probe_interval: *probe_every,
            ..WatchConfig::default()
        };
        let mut events = watch_all(client, config, &tasks).await;
        read_listing(&mut events).await;
        streams.push(events);
    }
    let mut figures: Vec<Vec<Duration>> = vec![Vec::new(); watchers.len()];
    for round in 0..3 {
        let name = unique(&format!("disc-{round}"));
        let created = std::time::Instant::now();
        publisher
            .publish(DEFAULT_GROUP, &name, instances_on("10.20.0", 1, 8700))
            .await
            .expect("publish");
        // Each watcher timed on its own, all at once.
        let seen = futures_util::future::join_all(streams.iter_mut().map(|events| {
            let name = name.clone();
            async move {
                loop {
                    if let WatchEvent::Snapshot(s) = next_event(events).await
                        && *s.service.name == *name
                    {
                        return created.elapsed();
                    }
                }
            }
        }))
        .await;
        for (i, took) in seen.into_iter().enumerate() {
            figures[i].push(took);
        }
    }
    let expected_method = if server.major() >= 3 {
        CatalogApi::V3Admin
    } else {
        CatalogApi::V1Catalog
    };
    assert_eq!(
        watchers[0].1.catalog_api(),
        Some(expected_method),
        "the polling watcher lists over HTTP"
    );
    if let Some((_, fuzzy, _)) = watchers.get(1) {
        assert_eq!(fuzzy.catalog_api(), Some(CatalogApi::FuzzyWatch));
        assert_eq!(
            fuzzy.catalog_probe().await.expect("probe"),
            None,
            "no probe while the fuzzy watch reports changes"
        );
    }
    // The probe's contract with the server: the count of the whole
    // namespace, and a name that is in it.
    let probing = &watchers[0].1;
    let catalog = probing.catalog().await.expect("catalog");
    let probe = probing
        .catalog_probe()
        .await
        .expect("probe")
        .expect("an HTTP listing is probed");
    assert_eq!(probe.services, catalog.len() as u64, "{probe:?}");
    let first = probe.first.expect("a first entry");
    assert!(catalog.contains(&first), "{first:?} not in the catalog");
    for ((what, ..), mut times) in watchers.iter().zip(figures) {
        times.sort();
        eprintln!(
            "discovery figure: Nacos {} {what}: creation -> watcher saw it in {:?} (min {:?}, max {:?})",
            server.major(),
            times[times.len() / 2],
            times[0],
            times[times.len() - 1]
        );
    }
    tasks.token().cancel();
}
