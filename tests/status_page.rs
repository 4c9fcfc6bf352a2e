//! The status page (`/`) in a real headless browser: an agent replicates
//! between two in-process fake regions, a publish fails once (fault
//! injection) and then the source region goes away (held); the page as
//! Chromium renders it must show what `/status` says, and a screenshot is
//! kept in `target/artifacts/status-page.png`.
//!
//! Needs Debian's Chromium (`scripts/prereqs` installs it).

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use nacos_replicator::agent::Agent;
use nacos_replicator::cluster::{Client, ClientConfig};
use nacos_replicator::model::{DEFAULT_GROUP, DEFAULT_NAMESPACE, Instance, ServiceKey};
use nacos_replicator::runtime::Tasks;
use nacos_replicator::testing::fake::{FakeNacos, FakeOptions};
use serde_json::Value;
use support::*;
use tokio_util::sync::CancellationToken;

/// Chromium's start alone can take tens of seconds on a loaded machine.
const BROWSER_DEADLINE: Duration = Duration::from_secs(60);

fn chromium() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("chromium"))
            .find(|p| p.is_file())
    });
    match found {
        Some(path) => path,
        None => panic!(
            "Chromium not found on PATH: run scripts/prereqs (it installs Debian's chromium)"
        ),
    }
}

/// Runs headless Chromium on `url` with `args` and returns its stdout;
/// killed if it takes longer than [`BROWSER_DEADLINE`] (or the test ends).
async fn browser(args: &[String], url: &str) -> String {
    let profile = tempfile::tempdir().expect("temp dir for the browser profile");
    let mut command = tokio::process::Command::new(chromium());
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().expect("Chromium starts");
    let output = tokio::time::timeout(BROWSER_DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("Chromium did not finish within {BROWSER_DEADLINE:?}"))
        .expect("Chromium's output");
    assert!(
        output.status.success(),
        "Chromium failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Text as the browser serialises it in a DOM dump.
fn dom_text(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\u{a0}', "&nbsp;")
}

/// In the section headed `section`, the row whose name cell reads `name`.
fn row<'a>(dom: &'a str, section: &str, name: &str) -> &'a str {
    let heading = format!("<h2>{section}</h2>");
    let start = dom
        .find(&heading)
        .unwrap_or_else(|| panic!("no section {section} in the page:\n{dom}"));
    let body = &dom[start..];
    let body = &body[..body.find("</section>").unwrap_or(body.len())];
    let cell = format!("<td data-field=\"name\">{}</td>", dom_text(name));
    let at = body
        .find(&cell)
        .unwrap_or_else(|| panic!("no row {name} in {section}:\n{body}"));
    let rest = &body[at..];
    &rest[..rest.find("</tr>").unwrap_or(rest.len())]
}

fn shows(row: &str, field: &str, value: &Value) -> bool {
    row.contains(&format!("data-field=\"{field}\">{value}<"))
}

async fn status_json(addr: std::net::SocketAddr) -> Value {
    let (code, body) = http_get(addr, "/status").await.expect("/status answers");
    assert_eq!(code, 200);
    serde_json::from_str(&body).expect("/status is JSON")
}

async fn wait_status(addr: std::net::SocketAddr, what: &str, check: fn(&Value) -> bool) {
    eventually(what, DEADLINE, || async move {
        let doc = status_json(addr).await;
        check(&doc).then_some(())
    })
    .await;
}

fn artifact(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/artifacts");
    std::fs::create_dir_all(&dir).expect("target/artifacts");
    dir.join(name)
}

/// Two fake regions, an application registering in `a`, and an agent
/// replicating `a -> b` with its status server on `status`.
struct Scene {
    a: FakeNacos,
    b: FakeNacos,
    apps: Tasks,
    app: Client,
    status: std::net::SocketAddr,
    token: CancellationToken,
    agent: tokio::task::JoinHandle<Result<(), nacos_replicator::agent::AgentError>>,
}

/// The scene, ready, with two replicas of `orders` in `b`.
async fn scene(natives: &[Instance]) -> Scene {
    let (a, b) = (
        FakeNacos::start(FakeOptions::default())
            .await
            .expect("fake a"),
        FakeNacos::start(FakeOptions::default())
            .await
            .expect("fake b"),
    );
    let apps = Tasks::default();
    let app = Client::start(
        ClientConfig::new("app", vec![a.addr()], DEFAULT_NAMESPACE),
        &apps,
    )
    .expect("valid config");
    app.wait_connected(DEADLINE).await.expect("app connects");
    app.publish(DEFAULT_GROUP, "orders", natives.to_vec())
        .await
        .expect("natives");
    let status = free_local_addr();
    let config = AgentToml::new()
        .cluster("a", &a.addr(), &[DEFAULT_NAMESPACE])
        .cluster("b", &b.addr(), &[DEFAULT_NAMESPACE])
        .route("a", "b")
        .config();
    let token = CancellationToken::new();
    let agent = tokio::spawn(
        Agent::new(config)
            .with_status_server(status)
            .run(token.clone()),
    );
    let orders = ServiceKey::new(DEFAULT_NAMESPACE, DEFAULT_GROUP, "orders");
    let want = natives.len();
    eventually("ready with the replicas in b", DEADLINE, || {
        let n = b.instances(&orders).len();
        async move {
            http_get(status, "/readyz")
                .await
                .filter(|r| r.0 == 200 && n == want)
        }
    })
    .await;
    Scene {
        a,
        b,
        apps,
        app,
        status,
        token,
        agent,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_the_agents_state_in_a_real_browser() {
    chromium(); // fails early, before anything starts, when it is missing
    let mut natives = vec![Instance::new("10.0.0.1", 80), Instance::new("10.0.0.2", 80)];
    let scene = scene(&natives).await;
    let status = scene.status;

    // A publish refused once (retried), then the source region gone (held).
    scene.b.fail_next(1, 500);
    natives.push(Instance::new("10.0.0.3", 80));
    scene
        .app
        .publish(DEFAULT_GROUP, "orders", natives)
        .await
        .expect("a third native");
    wait_status(status, "the retried publish taken", |doc| {
        let d = &doc["destinations"]["b/public"];
        d["retried"].as_u64() >= Some(1) && d["replicas_acknowledged"] == 3
    })
    .await;
    scene.a.stop().await;
    wait_status(status, "source a lost and held", |doc| {
        doc["sources"]["a/public"]["held_until_ms"].is_u64()
    })
    .await;

    let raw = http_get_raw(status, "/").await.expect("/ answers");
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(
        raw.to_ascii_lowercase()
            .contains("content-type: text/html; charset=utf-8"),
        "{raw}"
    );

    let url = format!("http://{status}/");
    let before = status_json(status).await;
    let dom = browser(&["--dump-dom".to_owned()], &url).await;
    let after = status_json(status).await;
    check_page(&dom, &before, &after);

    let shot = artifact("status-page.png");
    let _ = std::fs::remove_file(&shot);
    let args = [
        format!("--screenshot={}", shot.display()),
        "--window-size=1280,900".to_owned(),
    ];
    browser(&args, &url).await;
    let png = std::fs::read(&shot).expect("the screenshot was written");
    assert!(
        png.len() > 10_000 && png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "not a real screenshot: {} bytes",
        png.len()
    );
    eprintln!("status page screenshot: {}", shot.display());

    scene.token.cancel();
    scene.agent.await.expect("no panic").expect("the agent ran");
    scene.apps.shutdown(Duration::from_secs(2)).await;
}

/// The rendered page against `/status` fetched just before and after it:
/// counts that did not move must be on the page as `/status` has them.
fn check_page(dom: &str, before: &Value, after: &Value) {
    assert!(dom.contains("<span id=\"ready\" class=\"badge ok\">ready</span>"));
    let summary = dom.find("replicas acknowledged").map_or("(none)", |i| {
        &dom[i.saturating_sub(60)..(i + 30).min(dom.len())]
    });
    assert!(
        dom.contains(">3 of 3 replicas acknowledged<"),
        "no summary of 3 of 3: {summary}; /status before: {}; after: {}",
        before["destinations"],
        after["destinations"]
    );
    assert!(dom.contains("badge warn\">1 source lost<"), "no summary");

    let route = row(dom, "Routes", "a -> b");
    let r = &before["routes"]["a -> b"];
    assert_eq!(r, &after["routes"]["a -> b"], "the route moved meanwhile");
    assert_eq!(r["replicas"], 3, "held: the route still wants all three");
    for field in ["services", "replicas"] {
        assert!(shows(route, field, &r[field]), "{field}: {r} vs {route}");
    }

    let dest = row(dom, "Destinations (replicas)", "b/public");
    let d = &before["destinations"]["b/public"];
    for field in [
        "replicas_wanted",
        "replicas_acknowledged",
        "queued",
        "in_flight",
    ] {
        assert_eq!(
            d[field], after["destinations"]["b/public"][field],
            "{field} moved"
        );
        assert!(shows(dest, field, &d[field]), "{field}: {d} vs {dest}");
    }
    assert_eq!(
        (&d["replicas_wanted"], &d["replicas_acknowledged"]),
        (&3.into(), &3.into())
    );
    let error = d["last_error"].as_str().expect("the publish error is kept");
    assert!(dest.contains(&dom_text(error)), "{error} not in {dest}");
    assert!(dest.contains("in sync"), "{dest}");

    let errors = before["recent_errors"].as_array().expect("recent errors");
    let publish = errors
        .iter()
        .find(|e| e["operation"] == "publish")
        .expect("the publish error among the recent ones");
    let message = publish["message"].as_str().expect("message");
    assert!(dom.contains(&dom_text(message)), "{message} not listed");

    let source = row(dom, "Sources", "a/public");
    assert!(source.contains("lost, replicas held"), "{source}");
    assert!(
        source.contains("</span> until <span class=\"when\""),
        "{source}"
    );
    let until = &before["sources"]["a/public"]["held_until_ms"];
    assert!(
        source.contains(&format!("data-ms=\"{until}\"")),
        "{until}: {source}"
    );

    // a's client keeps trying to reconnect: its state may change between
    // the two looks at `/status`, but never to connected.
    for (name, up) in [("a/public", false), ("b/public", true)] {
        let conn = row(dom, "Connections", name);
        let states = [&before, &after].map(|doc| doc["connections"][name]["state"].clone());
        assert!(
            states.iter().all(|s| (s == "connected") == up),
            "{name}: {states:?}"
        );
        // Between the two it may have been through any state but connected.
        let shown: Vec<&str> = ["connected", "connecting", "disconnected"]
            .into_iter()
            .filter(|s| conn.contains(&format!(">{s}</span>")))
            .collect();
        let fits = |s: &&str| (*s == "connected") == up;
        assert!(
            shown.len() == 1 && shown.iter().all(fits),
            "{name} shows {shown:?}, /status {states:?}: {conn}"
        );
        let line = before["connections"][name]["server_line"].as_str();
        let line = line.expect("the server's line is known");
        assert!(
            conn.contains(&format!("<td data-field=\"server\">{line}")),
            "{conn}"
        );
    }
}
