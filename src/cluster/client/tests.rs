//! Tests of the client as a whole: configuration checks, and calls made
//! while no server answers.

use super::*;
use crate::model::{Instance, ServiceSnapshot};

#[tokio::test]
async fn bad_configs_are_refused_before_anything_runs() {
    let tasks = Tasks::default();
    let cases = [
        (ClientConfig::new("a", vec![], "public"), "no servers"),
        (
            ClientConfig::new("a", vec!["nohost".into()], "public"),
            "host:port",
        ),
        (
            ClientConfig::new("a", vec!["h:65000".into()], "public"),
            "room for the gRPC offset",
        ),
        (
            ClientConfig::new("a", vec!["h:8848".into()], ""),
            "namespace is empty",
        ),
    ];
    for (config, expected) in cases {
        match Client::start(config, &tasks) {
            Err(e @ ClientError::Config { .. }) => {
                assert!(e.to_string().contains(expected), "{e}")
            }
            other => panic!("expected a config error mentioning {expected:?}, got {other:?}"),
        }
    }
    let mut bad_backoff = ClientConfig::new("a", vec!["h:8848".into()], "public");
    bad_backoff.reconnect_min = Duration::ZERO;
    assert!(matches!(
        Client::start(bad_backoff, &tasks),
        Err(ClientError::Config { .. })
    ));
}

#[tokio::test]
async fn calls_without_a_server_fail_with_the_reason_and_keep_the_intent() {
    // Nothing listens on this port: every connect is refused.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    // An ephemeral port is far above 1: "HTTP" port - 1, gRPC offset 1.
    let mut config = ClientConfig::new("down", vec![format!("127.0.0.1:{}", port - 1)], "public");
    config.grpc_port_offset = 1;
    config.session.request_timeout = Duration::from_millis(300);
    let tasks = Tasks::default();
    let client = Client::start(config, &tasks).expect("valid config");
    let err = client
        .publish("DEFAULT_GROUP", "svc", vec![Instance::new("10.0.0.1", 80)])
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::NotConnected { .. }), "{err}");
    assert!(err.is_retryable());
    // The set is kept for when the cluster comes back.
    assert_eq!(client.published().len(), 1);
    let mut state = client.state();
    let seen = state
        .wait_for(|s| matches!(s, ConnectionState::Disconnected { .. }))
        .await
        .expect("open")
        .clone();
    let ConnectionState::Disconnected { error, .. } = seen else {
        unreachable!()
    };
    assert!(error.contains("connecting to"), "{error}");
    tasks.token().cancel();
    state
        .wait_for(|s| *s == ConnectionState::Stopped)
        .await
        .expect("stops on cancel");
}

/// A waker that counts its wakes.
struct Count(std::sync::atomic::AtomicUsize);

impl std::task::Wake for Count {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Count {
    fn waker() -> (Arc<Count>, std::task::Waker) {
        let count = Arc::new(Count(Default::default()));
        (count.clone(), count.into())
    }

    fn get(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test]
async fn readers_get_the_latest_snapshot_once_per_change_and_wake_once() {
    use futures_util::Stream;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    let mut config = ClientConfig::new("down", vec!["127.0.0.1:1".into()], "public");
    config.grpc_port_offset = 0;
    config.session.request_timeout = Duration::from_millis(50);
    let tasks = Tasks::default();
    let client = Client::start(config, &tasks).expect("valid config");
    // Not connected: each subscription is kept for the redo.
    let mut a = client.subscribe("G", "orders").await.expect("kept");
    let mut b = client.subscribe("G", "orders").await.expect("kept");
    let key = a.service().clone();
    let snapshot = |at: i64, ip: &str| ServiceSnapshot {
        service: key.clone(),
        instances: vec![Instance::new(ip, 80)].into(),
        last_ref_time_ms: at,
        protect_threshold_reached: false,
    };
    let (wa, waker_a) = Count::waker();
    let (wb, waker_b) = Count::waker();
    let poll = |s: &mut Subscription, w: &std::task::Waker| match Pin::new(s)
        .poll_next(&mut Context::from_waker(w))
    {
        Poll::Ready(Some(snap)) => Some(snap.last_ref_time_ms),
        Poll::Ready(None) => panic!("the stream ended"),
        Poll::Pending => None,
    };
    // Nothing yet; polling again registers no second waker.
    for _ in 0..3 {
        assert_eq!(poll(&mut a, &waker_a), None);
        assert_eq!(poll(&mut b, &waker_b), None);
    }
    assert_eq!(
        lock(&client.shared.owned).subscriptions[&key].waiting.len(),
        2
    );

    subscriptions::offer(&client.shared, snapshot(1, "10.0.0.1"));
    assert_eq!((wa.get(), wb.get()), (1, 1), "each reader woken once");
    assert_eq!(poll(&mut a, &waker_a), Some(1));
    assert_eq!(poll(&mut a, &waker_a), None, "nothing new for a");

    // b fell behind: it gets the newest only; an older snapshot (a
    // subscribe reply racing a push) is ignored and wakes nobody.
    subscriptions::offer(&client.shared, snapshot(3, "10.0.0.3"));
    assert_eq!((wa.get(), wb.get()), (2, 1), "b was not waiting again");
    subscriptions::offer(&client.shared, snapshot(2, "10.0.0.2"));
    assert_eq!(wa.get(), 2, "the older snapshot woke nobody");
    subscriptions::offer(&client.shared, snapshot(4, "10.0.0.4"));
    assert_eq!(poll(&mut b, &waker_b), Some(4));
    assert_eq!(poll(&mut b, &waker_b), None);
    assert_eq!(poll(&mut a, &waker_a), Some(4));
    assert_eq!(
        client.latest(&key).map(|s| s.last_ref_time_ms),
        Some(4),
        "latest() reads the same entry"
    );

    // The last reader gone, the entry goes (and the server is told).
    drop(a);
    assert!(lock(&client.shared.owned).subscriptions.contains_key(&key));
    drop(b);
    assert!(!lock(&client.shared.owned).subscriptions.contains_key(&key));
    tasks.token().cancel();
}
