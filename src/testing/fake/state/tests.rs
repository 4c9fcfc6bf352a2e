//! The registry's rules, without a network.

use super::*;

fn registry() -> Registry {
    Registry::new(Timings {
        push_resend_after: Duration::from_secs(1),
        empty_service_ttl: Duration::from_secs(60),
        token_ttl: Duration::from_secs(60),
    })
}

fn connect(r: &mut Registry, id: &str) -> mpsc::UnboundedReceiver<Result<Payload, tonic::Status>> {
    let (tx, rx) = mpsc::unbounded_channel();
    let labels = BTreeMap::from([("module".to_owned(), "naming".to_owned())]);
    let remote = SocketAddr::from(([127, 0, 0, 1], 1));
    r.register_connection(
        id,
        remote,
        labels,
        String::new(),
        tx,
        CancellationToken::new(),
    );
    rx
}

fn host(key: &ServiceKey, ip: &str, weight: f64) -> Host {
    let dto = InstanceDto {
        ip: Some(ip.into()),
        port: 80,
        weight: Some(weight),
        ..Default::default()
    };
    Host::from_request(key, &dto, false).expect("valid")
}

fn key() -> ServiceKey {
    ServiceKey::new("public", "DEFAULT_GROUP", "orders")
}

#[test]
fn identical_hosts_merge_and_a_differing_field_makes_two() {
    let mut r = registry();
    let k = key();
    r.publish("a", &k, vec![host(&k, "10.0.0.1", 1.0)]);
    r.publish("b", &k, vec![host(&k, "10.0.0.1", 1.0)]);
    assert_eq!(r.hosts(&k).len(), 1);
    r.publish("c", &k, vec![host(&k, "10.0.0.1", 2.0)]);
    assert_eq!(r.hosts(&k).len(), 2);
    assert_eq!(
        r.hosts(&k)[0].instance_id.as_deref(),
        Some("10.0.0.1#80#DEFAULT#DEFAULT_GROUP@@orders")
    );
}

#[test]
fn a_batch_replaces_the_slot_and_a_closed_connection_takes_its_hosts() {
    let mut r = registry();
    let _rx = connect(&mut r, "a");
    let k = key();
    r.publish(
        "a",
        &k,
        vec![host(&k, "10.0.0.1", 1.0), host(&k, "10.0.0.2", 1.0)],
    );
    r.publish("a", &k, vec![host(&k, "10.0.0.3", 1.0)]);
    assert_eq!(r.hosts(&k).len(), 1);
    r.connection_closed("a");
    assert!(r.hosts(&k).is_empty());
    // Emptied, but listed until it expires.
    assert_eq!(r.list("public", "DEFAULT_GROUP"), vec!["orders".to_owned()]);
}

#[test]
fn pushes_are_resent_until_acked() {
    let mut r = registry();
    let mut rx = connect(&mut r, "a");
    let k = key();
    r.subscribe("a", &k);
    let t0 = Instant::now();
    let next = r
        .flush_pushes("a", t0)
        .expect("open")
        .expect("a push in flight");
    let first: NotifySubscriberRequest =
        wire::decode_body(&rx.try_recv().expect("pushed").expect("ok")).expect("decodes");
    // Not acked: sent again once the resend time passes.
    r.flush_pushes("a", next).expect("open");
    let second: NotifySubscriberRequest =
        wire::decode_body(&rx.try_recv().expect("re-pushed").expect("ok")).expect("decodes");
    assert_ne!(first.request_id, second.request_id);
    // The superseded push's ack changes nothing; the latest one's clears it.
    r.ack("a", first.request_id.as_deref().unwrap_or_default(), true);
    assert_eq!(r.stats.pushes_acked, 0);
    r.ack("a", second.request_id.as_deref().unwrap_or_default(), true);
    assert_eq!(r.stats.pushes_acked, 1);
    assert_eq!(
        r.flush_pushes("a", next + Duration::from_secs(10)),
        Some(None)
    );
    assert_eq!(r.stats.push_resends, 1);
}

#[test]
fn parameter_checks_follow_nacos() {
    let k = key();
    let big = InstanceDto {
        ip: Some("10.0.0.1".into()),
        port: 80,
        metadata: Some(BTreeMap::from([(
            "k".to_owned(),
            "v".repeat(METADATA_MAX_CHARS),
        )])),
        ..Default::default()
    };
    assert_eq!(
        Host::from_request(&k, &big, false).map_err(|e| e.code),
        Err(400)
    );
    let underscore = InstanceDto {
        ip: Some("10.0.0.1".into()),
        port: 80,
        cluster_name: Some("A_B".into()),
        ..Default::default()
    };
    assert_eq!(
        Host::from_request(&k, &underscore, true).map_err(|e| e.code),
        Err(400)
    );
    assert!(Host::from_request(&k, &underscore, false).is_ok());
    assert!(check_target("public", "g.b:c", Some("svc-1")).is_ok());
    assert!(check_target("public", "DEFAULT_GROUP", Some("a b")).is_err());
    assert_eq!(
        check_target("public", "", Some("x")).map_err(|e| e.code),
        Err(500)
    );
}

#[test]
fn tokens_expire() {
    let mut r = Registry::new(Timings {
        push_resend_after: Duration::from_secs(1),
        empty_service_ttl: Duration::from_secs(60),
        token_ttl: Duration::ZERO,
    });
    let (token, _) = r.issue_token();
    assert_eq!(
        r.check_token(Some(&token)).map_err(|e| e.message),
        Err("token expired!".to_owned())
    );
    assert_eq!(
        r.check_token(None).map_err(|e| e.message),
        Err("user not found!".to_owned())
    );
    assert_eq!(
        r.check_token(Some("nope")).map_err(|e| e.message),
        Err("token invalid!".to_owned())
    );
}
