//! Tests of the client as a whole: configuration checks, and calls made
//! while no server answers.

use super::*;
use crate::model::Instance;

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
