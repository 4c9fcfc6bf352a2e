//! `nacos-replicator demo`, run as a user runs it (the built binary), and
//! `nacos_replicator::demo::run` as a library: every region ends in sync,
//! holding its peers' natives as replicas; a signal or a cancelled token
//! ends it cleanly. Every wait has a deadline; none is a fixed sleep.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nacos_replicator::demo::{DemoOptions, run};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_nacos-replicator");
/// A few rounds of a second and the final check take seconds; this is generous.
const DEADLINE: Duration = Duration::from_secs(90);

/// Runs `demo <args>` to its end; fails the test past `DEADLINE`.
async fn demo(args: &[&str]) -> (ExitStatus, String, String) {
    let child = Command::new(BIN)
        .arg("demo")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the binary starts");
    let output = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .expect("demo ends within the deadline")
        .expect("demo output is readable");
    let text = |b: Vec<u8>| String::from_utf8(b).expect("the view is UTF-8");
    (output.status, text(output.stdout), text(output.stderr))
}

/// The last block of the view: from the final check's heading on.
fn final_block(stdout: &str) -> &str {
    let at = stdout
        .rfind("== final check")
        .unwrap_or_else(|| panic!("no final check in:\n{stdout}"));
    &stdout[at..]
}

/// The lines of one region in a block, up to the next region.
fn region<'a>(block: &'a str, name: &str) -> Vec<&'a str> {
    let mut lines = block
        .lines()
        .skip_while(|l| !l.starts_with(&format!("{name} ")))
        .peekable();
    let mut out: Vec<&str> = lines.next().into_iter().collect();
    out.extend(lines.take_while(|l| l.starts_with("  ")));
    out
}

fn assert_has(lines: &[&str], wanted: &str, stdout: &str) {
    assert!(
        lines.iter().any(|l| l.trim() == wanted),
        "no line {wanted:?} in {lines:#?}\nfull output:\n{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_regions_end_in_sync_with_each_others_natives() {
    let (status, stdout, stderr) = demo(&["--rounds", "3", "--plain", "--interval", "1s"]).await;
    assert!(
        status.success(),
        "exit {status}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(!stdout.contains("\x1b["), "--plain draws no escape codes");
    for round in 1..=3 {
        assert!(
            stdout.contains(&format!("== round {round} of 3")),
            "round {round} missing:\n{stdout}"
        );
    }
    // The applications did what the demo promises.
    for change in [
        "east scales orders 2 -> 3",
        "west removes inventory",
        "west registers inventory (2)",
        "east changes gateway",
    ] {
        assert!(
            stdout.contains(change),
            "{change:?} not reported:\n{stdout}"
        );
    }
    let last = final_block(&stdout);
    assert!(last.contains("all regions in sync: yes"), "{stdout}");
    let east = region(last, "east");
    assert!(east[0].starts_with("east   in sync ✓"), "{east:#?}");
    assert_has(&east, "gateway    1 native | 1 from west", &stdout);
    assert_has(&east, "orders     1 native", &stdout);
    // payments' local-only instance stays in west: one copy, not two.
    assert_has(&east, "payments   no native | 1 from west", &stdout);
    assert_has(&east, "inventory  no native | 2 from west", &stdout);
    let west = region(last, "west");
    assert!(west[0].starts_with("west   in sync ✓"), "{west:#?}");
    assert_has(&west, "gateway    1 native | 1 from east", &stdout);
    assert_has(&west, "orders     no native | 1 from east", &stdout);
    assert_has(&west, "payments   2 native", &stdout);
    assert_has(&west, "inventory  2 native", &stdout);
    for name in ["east", "west"] {
        let agent = region(last, name)
            .into_iter()
            .find(|l| l.contains("agent:"))
            .unwrap_or_default();
        assert!(agent.contains("ready yes"), "{name}: {agent}");
        assert!(
            !agent.contains("last lag -"),
            "{name} reports a lag: {agent}"
        );
    }
    assert!(
        stdout.contains("agents: east stopped, west stopped; servers stopped"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_regions_hold_one_copy_per_peer() {
    let (status, stdout, stderr) = demo(&[
        "--regions",
        "3",
        "--rounds",
        "3",
        "--plain",
        "--interval",
        "1s",
    ])
    .await;
    assert!(
        status.success(),
        "exit {status}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let last = final_block(&stdout);
    assert!(last.contains("all regions in sync: yes"), "{stdout}");
    for (name, peers) in [
        ("east", "1 from south, 1 from west"),
        ("west", "1 from east, 1 from south"),
        ("south", "1 from east, 1 from west"),
    ] {
        let lines = region(last, name);
        assert!(
            lines[0].starts_with(&format!("{name:<6} in sync ✓")),
            "{lines:#?}"
        );
        assert_has(&lines, &format!("gateway    1 native | {peers}"), &stdout);
    }
    assert_has(
        &region(last, "west"),
        "inventory  no native | 2 from south",
        &stdout,
    );
    assert_has(
        &region(last, "east"),
        "inventory  no native | 2 from south",
        &stdout,
    );
    assert_has(
        &region(last, "south"),
        "orders     no native | 1 from east",
        &stdout,
    );
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_an_endless_demo_cleanly() {
    let mut child = Command::new(BIN)
        .args(["demo", "--plain", "--interval", "300ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the binary starts");
    let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
    let mut seen = String::new();
    // Wait for the second round's view: by then agents and applications run.
    let second_round = async {
        let mut line = String::new();
        while stdout.read_line(&mut line).await.expect("readable") > 0 {
            seen.push_str(&line);
            if line.starts_with("== round 2,") {
                return true;
            }
            line.clear();
        }
        false
    };
    let reached = tokio::time::timeout(DEADLINE, second_round)
        .await
        .expect("round 2 within the deadline");
    assert!(reached, "output ended before round 2:\n{seen}");
    let pid = child.id().expect("running").to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(kill.success());
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("exits within the deadline")
        .expect("waitable");
    stdout.read_to_string(&mut seen).await.expect("readable");
    assert!(status.success(), "exit {status}:\n{seen}");
    assert!(seen.contains("== stopped after"), "{seen}");
    assert!(seen.contains("servers stopped"), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_run_converges_and_stops_when_its_token_is_cancelled() {
    // By rounds: the summary says what the view says.
    let mut view = Vec::new();
    let options = DemoOptions {
        rounds: 2,
        interval: Duration::from_millis(500),
        ..DemoOptions::default()
    };
    let summary = tokio::time::timeout(DEADLINE, run(options, CancellationToken::new(), &mut view))
        .await
        .expect("ends within the deadline")
        .expect("runs");
    let text = String::from_utf8_lossy(&view);
    assert!(
        summary.in_sync && !summary.interrupted && summary.rounds == 2,
        "{summary:?}\n{text}"
    );
    assert!(text.contains("all regions in sync: yes"), "{text}");

    // Endless, cancelled: returns promptly, interrupted, everything stopped.
    let token = CancellationToken::new();
    let options = DemoOptions {
        rounds: 0,
        interval: Duration::from_millis(200),
        ..DemoOptions::default()
    };
    let mut view = Vec::new();
    let summary = {
        let running = run(options, token.clone(), &mut view);
        tokio::pin!(running);
        // Let it run a little: it must not end by itself.
        let early = tokio::time::timeout(Duration::from_secs(1), &mut running).await;
        assert!(early.is_err(), "an endless demo ended by itself: {early:?}");
        token.cancel();
        tokio::time::timeout(DEADLINE, running)
            .await
            .expect("stops within the deadline")
            .expect("runs")
    };
    assert!(summary.interrupted, "{summary:?}");
    let text = String::from_utf8_lossy(&view);
    assert!(
        text.contains("== stopped after") && text.contains("servers stopped"),
        "{text}"
    );
}

#[tokio::test]
async fn options_that_cannot_work_are_refused_before_anything_starts() {
    let options = DemoOptions {
        regions: 4,
        ..DemoOptions::default()
    };
    let err = run(options, CancellationToken::new(), Vec::new())
        .await
        .expect_err("4 regions");
    assert_eq!(err.kind(), "options");
}
