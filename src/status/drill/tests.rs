//! `/drill` over HTTP with a stand-in for the agent: the token rule, the
//! body's errors, and the refusals' status codes.

use std::sync::Mutex;

use tokio_util::sync::CancellationToken;

use super::*;
use crate::status::StatusServer;
use crate::telemetry::Telemetry;

/// Records what it was asked; refuses `busy` and unknown sources.
#[derive(Default)]
struct Stub {
    asked: Mutex<Vec<(String, Duration)>>,
}

fn drill(source: &str, duration: Duration) -> Drill {
    Drill {
        id: 1,
        source: source.to_owned(),
        namespaces: vec!["public".into()],
        duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
        source_loss: "hold".into(),
        hold_for_ms: 60_000,
        replicas: 2,
        services: 1,
        started_at_ms: 1,
        ends_at_ms: 2,
        phase: Phase::Isolated,
        ended_early: false,
        timeline: Vec::new(),
    }
}

impl DrillControl for Stub {
    fn start(&self, source: &str, duration: Duration) -> Result<Drill, Refusal> {
        match source {
            "a" => {
                crate::runtime::lock(&self.asked).push((source.to_owned(), duration));
                Ok(drill(source, duration))
            }
            "busy" => Err(Refusal::Busy(Box::new(drill("a", duration)))),
            _ => Err(Refusal::UnknownSource {
                cluster: source.to_owned(),
                known: vec!["a".into(), "c".into()],
            }),
        }
    }

    fn end(&self) -> Result<Drill, Refusal> {
        Err(Refusal::NoDrill)
    }

    fn current(&self) -> Option<Drill> {
        None
    }
}

/// A status server with `/drill` over a [`Stub`], bound to `ip`.
async fn serve(ip: [u8; 4], token: Option<&str>) -> (SocketAddr, Arc<Stub>, CancellationToken) {
    let stub = Arc::new(Stub::default());
    let control = Control {
        drills: stub.clone(),
        token: token.map(str::to_owned),
    };
    let server = StatusServer::bind(SocketAddr::from((ip, 0)), Telemetry::new())
        .await
        .expect("bind")
        .with_control(Some(control));
    let port = server.local_addr().expect("addr").port();
    let stop = CancellationToken::new();
    tokio::spawn(server.serve(stop.clone()));
    (SocketAddr::from(([127, 0, 0, 1], port)), stub, stop)
}

/// One HTTP/1.1 request: status code, `WWW-Authenticate`, body as JSON.
async fn call(
    addr: SocketAddr,
    method: &str,
    body: &str,
    token: Option<&str>,
) -> (u16, bool, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!(
        "{method} /drill HTTP/1.1\r\nHost: s\r\nConnection: close\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a whole answer");
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("code");
    let challenged = head
        .to_ascii_lowercase()
        .contains("www-authenticate: bearer");
    let json = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    (code, challenged, json)
}

const START: &str = r#"{"isolate": "a", "for": "10m"}"#;

#[tokio::test]
async fn a_token_is_required_when_set_and_compared_whole() {
    let (addr, stub, stop) = serve([127, 0, 0, 1], Some("s3cret")).await;
    let (code, challenged, body) = call(addr, "POST", START, None).await;
    assert_eq!((code, challenged), (401, true), "{body}");
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains("Bearer")),
        "{body}"
    );
    for wrong in ["s3cre", "s3cret!", "S3cret", ""] {
        let (code, _, body) = call(addr, "POST", START, Some(wrong)).await;
        assert_eq!(code, 401, "token {wrong:?} let through: {body}");
    }
    assert_eq!(call(addr, "DELETE", "", None).await.0, 401);
    assert!(
        crate::runtime::lock(&stub.asked).is_empty(),
        "asked without the token"
    );
    let (code, _, body) = call(addr, "POST", START, Some("s3cret")).await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["source"], "a");
    assert_eq!(body["duration_ms"], 600_000);
    // Reading needs no token, as /status does not.
    assert_eq!(call(addr, "GET", "", None).await.0, 404);
    stop.cancel();
}

#[tokio::test]
async fn beyond_loopback_without_a_token_nothing_can_be_changed() {
    let (addr, stub, stop) = serve([0, 0, 0, 0], None).await;
    let (code, _, body) = call(addr, "POST", START, None).await;
    assert_eq!(code, 403, "{body}");
    let reason = body["error"].as_str().unwrap_or_default();
    assert!(reason.contains("agent.control_token_env"), "{reason}");
    assert_eq!(call(addr, "DELETE", "", None).await.0, 403);
    assert!(crate::runtime::lock(&stub.asked).is_empty());
    stop.cancel();
    // On loopback the same server takes the request with no token.
    let (addr, stub, stop) = serve([127, 0, 0, 1], None).await;
    assert_eq!(call(addr, "POST", START, None).await.0, 201);
    assert_eq!(crate::runtime::lock(&stub.asked).len(), 1);
    stop.cancel();
}

#[tokio::test]
async fn a_bad_body_is_a_400_with_its_reason() {
    let (addr, stub, stop) = serve([127, 0, 0, 1], None).await;
    for (body, reason) in [
        ("", "the body must be like"),
        ("{\"isolate\": \"a\"}", "missing field `for`"),
        (
            "{\"isolate\": \"a\", \"for\": \"10m\", \"x\": 1}",
            "unknown field `x`",
        ),
        ("{\"isolate\": \"a\", \"for\": \"ten\"}", "not a duration"),
        ("{\"isolate\": \"a\", \"for\": -3}", "not a whole number"),
        ("{\"isolate\": \"a\", \"for\": true}", "neither"),
        ("{\"isolate\": \"a\", \"for\": \"0s\"}", "at least 1s"),
        (
            "{\"isolate\": \"a\", \"for\": \"25h\"}",
            "longer than the longest drill",
        ),
    ] {
        let (code, _, answer) = call(addr, "POST", body, None).await;
        assert_eq!(code, 400, "{body}: {answer}");
        let got = answer["error"].as_str().unwrap_or_default();
        assert!(got.contains(reason), "{body}: {got}");
    }
    assert!(crate::runtime::lock(&stub.asked).is_empty());
    // Seconds are taken as well as "10m".
    let (code, _, answer) = call(addr, "POST", r#"{"isolate":"a","for":90}"#, None).await;
    assert_eq!((code, answer["duration_ms"].as_u64()), (201, Some(90_000)));
    stop.cancel();
}

#[tokio::test]
async fn refusals_have_their_codes_and_say_why() {
    let (addr, _, stop) = serve([127, 0, 0, 1], None).await;
    let (code, _, body) = call(addr, "POST", r#"{"isolate":"zz","for":"1m"}"#, None).await;
    assert_eq!(code, 404, "{body}");
    let reason = body["error"].as_str().unwrap_or_default();
    assert!(
        reason.contains("\"zz\"") && reason.contains("a, c"),
        "{reason}"
    );
    let (code, _, body) = call(addr, "POST", r#"{"isolate":"busy","for":"1m"}"#, None).await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(
        body["drill"]["source"], "a",
        "the running drill is shown: {body}"
    );
    let (code, _, body) = call(addr, "DELETE", "", None).await;
    assert_eq!(code, 404, "{body}");
    stop.cancel();
}

#[test]
fn tokens_compare_whole() {
    assert!(same(b"abc", b"abc"));
    assert!(!same(b"abc", b"abd"));
    assert!(!same(b"abc", b"ab"));
    assert!(!same(b"", b"a"));
}
