//! The container image (`Dockerfile`): the static binary it ships, and the
//! image itself, built and run with podman.
//!
//! The binary is built here for `x86_64-unknown-linux-musl` with the `cli`
//! feature, as the Dockerfile's builder stage builds it, but in the dev
//! profile: linkage, start-up, probes and signal handling do not depend on
//! the optimisation level, and a release build would add minutes of a
//! two-core CI run for nothing these tests can see. The image is built from
//! the Dockerfile's `prebuilt` stage (the shipped stages with this binary),
//! since no registry here holds the Rust image of the builder stage; podman
//! skips that unused stage, and `FROM scratch` needs no registry at all.
//!
//! Without podman the image part is skipped, saying why; with `CI` set it
//! fails instead (`scripts/prereqs` installs podman, runc and the target).

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Instant;

use support::e2e::AgentProcess;
use support::{AgentToml, DEADLINE, dead_addr, eventually, free_local_addr, http_get, unique};

const TARGET: &str = "x86_64-unknown-linux-musl";
/// The user the image runs as (`USER` in the Dockerfile, `runAsUser` in the Deployment).
const IMAGE_UID: &str = "65532";
/// The status port the image exposes.
const STATUS_PORT: u16 = 9787;
/// Where the image's `CMD` reads its configuration.
const CONFIG_PATH: &str = "/etc/nacos-replicator/agent.toml";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}

fn succeed(command: &mut Command) -> String {
    let out = run(command);
    assert!(
        out.status.success(),
        "{command:?}: {}\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// The static binary, built once per test process (cargo says nothing when
/// it is fresh).
fn musl_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let target_dir = support::target_dir();
        let started = Instant::now();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = run(Command::new(cargo)
            .current_dir(repo())
            .args([
                "build",
                "--features",
                "cli",
                "--target",
                TARGET,
                "--target-dir",
            ])
            .arg(target_dir));
        assert!(
            out.status.success(),
            "building the static binary failed (scripts/prereqs installs the {TARGET} target \
             and musl-gcc):\n{}",
            text(&out.stderr)
        );
        eprintln!(
            "image figure: static dev build took {:.0?} (nothing to do when fresh)",
            started.elapsed()
        );
        target_dir.join(TARGET).join("debug/nacos-replicator")
    })
}

/// How an ELF executable is linked: its program interpreter (the dynamic
/// loader, if any) and the shared libraries it needs (`DT_NEEDED`).
#[derive(Debug, PartialEq, Eq)]
struct Linkage {
    interpreter: Option<String>,
    needed: usize,
}

/// Reads [`Linkage`] from the program headers of a 64-bit little-endian ELF
/// file. A static-pie executable (what Rust builds for musl) has a dynamic
/// section, for relocating itself, but neither interpreter nor needed library.
fn linkage(elf: &[u8]) -> Result<Linkage, String> {
    let bytes = |at: usize, n: usize| {
        elf.get(at..at + n)
            .ok_or_else(|| format!("truncated at byte {at}"))
    };
    let u16_at = |at| bytes(at, 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |at| bytes(at, 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let u64_at = |at| {
        bytes(at, 8).map(|b| {
            let mut a = [0; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        })
    };
    let usize_at = |at| {
        u64_at(at).and_then(|v| usize::try_from(v).map_err(|_| format!("offset {v} too large")))
    };
    if bytes(0, 6)? != b"\x7fELF\x02\x01" {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let (phoff, phentsize, phnum) = (usize_at(0x20)?, u16_at(0x36)?, u16_at(0x38)?);
    const PT_DYNAMIC: u32 = 2;
    const PT_INTERP: u32 = 3;
    const DT_NEEDED: u64 = 1;
    let mut linkage = Linkage {
        interpreter: None,
        needed: 0,
    };
    for i in 0..usize::from(phnum) {
        let header = phoff + i * usize::from(phentsize);
        let (offset, size) = (usize_at(header + 8)?, usize_at(header + 32)?);
        match u32_at(header)? {
            PT_INTERP => {
                let path = bytes(offset, size)?;
                let path = path.split(|b| *b == 0).next().unwrap_or_default();
                linkage.interpreter = Some(text(path));
            }
            PT_DYNAMIC => {
                // Entries of 16 bytes (tag, value) up to DT_NULL.
                for entry in (offset..offset + size).step_by(16) {
                    match u64_at(entry)? {
                        0 => break,
                        DT_NEEDED => linkage.needed += 1,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(linkage)
}

#[test]
fn the_binary_the_image_ships_is_static() {
    let binary = musl_binary();
    let elf = std::fs::read(binary).expect("read the static binary");
    eprintln!(
        "image figure: static dev binary {:.1} MiB",
        elf.len() as f64 / 1048576.0
    );
    assert_eq!(
        linkage(&elf),
        Ok(Linkage {
            interpreter: None,
            needed: 0
        }),
        "{} is not static",
        binary.display()
    );
    // The same check tells a dynamic binary: the host build the other tests run.
    let host = std::fs::read(env!("CARGO_BIN_EXE_nacos-replicator")).expect("read the host binary");
    let host = linkage(&host).expect("the host binary is ELF");
    assert!(
        host.interpreter.is_some() && host.needed > 0,
        "the check does not see the host binary's dynamic linking: {host:?}"
    );
}

/// A configuration with one cluster (nothing listens there) and no route:
/// the agent connects to nothing and is ready until stopped.
fn idle_config(status_listen: SocketAddr) -> AgentToml {
    AgentToml::new()
        .status_listen(status_listen)
        .cluster("here", &dead_addr(), &["public"])
}

async fn answers(addr: SocketAddr, path: &str) -> Option<String> {
    match http_get(addr, path).await {
        Some((200, body)) => Some(body),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_static_binary_starts_and_an_agent_without_routes_becomes_ready() {
    let binary = musl_binary();
    let version = succeed(Command::new(binary).arg("--version"));
    assert_eq!(
        version.trim(),
        concat!("nacos-replicator ", env!("CARGO_PKG_VERSION"))
    );

    let status = free_local_addr();
    let mut agent = AgentProcess::start_binary(binary, &idle_config(status), &[]);
    eventually("the static binary ready", DEADLINE, || {
        answers(status, "/readyz")
    })
    .await;
    assert!(
        answers(status, "/healthz").await.is_some(),
        "{}",
        agent.log()
    );
    let exit = agent.terminate().await.expect("exits after SIGTERM");
    assert!(exit.success(), "exit {exit}\n{}", agent.log());
}

/// The podman command line, or why there is none.
fn podman() -> Result<Command, String> {
    match Command::new("podman").arg("--version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => return Err(format!("podman --version failed: {}", text(&out.stderr))),
        Err(e) => return Err(format!("podman is not installed ({e})")),
    }
    let mut command = Command::new("podman");
    // crun, podman's default runtime, refuses cgroups in hybrid mode, as on
    // this project's machines; runc runs there.
    command.args(["--runtime", "runc"]);
    Ok(command)
}

/// Removes the test's container and image, however the test ends.
struct Cleanup {
    container: String,
    image: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Ok(mut podman) = podman() {
            let _ = podman.args(["rm", "--force", &self.container]).output();
        }
        if let Ok(mut podman) = podman() {
            let _ = podman.args(["rmi", "--force", &self.image]).output();
        }
    }
}

fn inspect(what: &str, name: &str, format: &str) -> String {
    let mut podman = podman().expect("podman");
    succeed(podman.args([what, "inspect", "--format", format, name]))
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_as_non_root_answers_its_probes_and_stops_on_sigterm() {
    if let Err(why) = podman() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must build and run the image, but {why} (scripts/prereqs installs it)"
        );
        eprintln!(
            "skipped: the image is not built or run: {why}; the static binary is still tested"
        );
        return;
    }
    let binary = musl_binary();
    let name = unique("nacos-replicator-test");
    let cleanup = Cleanup {
        container: name.clone(),
        image: format!("localhost/{name}:test"),
    };

    // The build context holds the binary alone, as the `prebuilt` stage wants it.
    let context = tempfile::Builder::new()
        .prefix("image-context-")
        .tempdir_in(support::target_dir())
        .expect("context dir");
    std::fs::copy(binary, context.path().join("nacos-replicator")).expect("copy the binary");
    let started = Instant::now();
    succeed(
        podman()
            .expect("podman")
            .arg("build")
            // No intermediate image of the runtime-base stage left behind.
            .arg("--layers=false")
            .args(["--target", "prebuilt", "--tag", &cleanup.image, "--file"])
            .arg(repo().join("Dockerfile"))
            .arg(context.path()),
    );
    eprintln!("image figure: podman build took {:.1?}", started.elapsed());

    // What the image declares: nothing but the binary, run as a numeric user.
    let config: serde_json::Value =
        serde_json::from_str(&inspect("image", &cleanup.image, "{{json .Config}}"))
            .expect("image config as JSON");
    assert_eq!(config["User"], format!("{IMAGE_UID}:{IMAGE_UID}"));
    assert!(
        config["ExposedPorts"]
            .get(format!("{STATUS_PORT}/tcp"))
            .is_some(),
        "{config}"
    );
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/nacos-replicator"])
    );
    assert_eq!(
        config["Cmd"],
        serde_json::json!(["run", "--config", CONFIG_PATH])
    );
    let size: u64 = inspect("image", &cleanup.image, "{{.Size}}")
        .parse()
        .expect("image size");
    let binary_size = std::fs::metadata(binary).expect("binary size").len();
    eprintln!("image figure: image {size} bytes, binary {binary_size} bytes");
    assert!(
        size.abs_diff(binary_size) < 64 * 1024,
        "the image ({size} bytes) holds more than the binary ({binary_size} bytes)"
    );

    // Run it as the Deployment does: read-only root, no capabilities, no
    // privilege gain. The sandbox may not raise rlimits (no
    // CAP_SYS_RESOURCE), so they are given within the current ones.
    let dir = tempfile::Builder::new()
        .prefix("image-config-")
        .tempdir()
        .expect("config dir");
    let config_file = dir.path().join("agent.toml");
    let in_container: SocketAddr = ([0, 0, 0, 0], STATUS_PORT).into();
    std::fs::write(&config_file, idle_config(in_container).text()).expect("write the config");
    let published = free_local_addr();
    let mut podman_run = podman().expect("podman");
    podman_run
        .args(["run", "--detach", "--name", &name])
        .args([
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
        ])
        .args([
            "--read-only",
            "--cap-drop=ALL",
            "--security-opt=no-new-privileges",
        ])
        .arg(format!("--publish={published}:{STATUS_PORT}"))
        .arg(format!(
            "--volume={}:{CONFIG_PATH}:ro",
            config_file.display()
        ))
        .arg(&cleanup.image);
    succeed(&mut podman_run);
    let logs = || {
        let out = run(podman().expect("podman").args(["logs", &name]));
        text(&out.stdout) + &text(&out.stderr)
    };

    eventually("the container ready", DEADLINE, || {
        answers(published, "/readyz")
    })
    .await;
    assert!(answers(published, "/healthz").await.is_some(), "{}", logs());

    // The process as the host sees it: the image's user, not root.
    let pid = inspect("container", &name, "{{.State.Pid}}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    let uids = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .expect("Uid line");
    assert!(
        uids.split_whitespace().all(|uid| uid == IMAGE_UID),
        "real, effective, saved and fs uid should be {IMAGE_UID}: {uids}"
    );
    if let Some(rss) = status.lines().find_map(|l| l.strip_prefix("VmRSS:")) {
        eprintln!(
            "image figure: idle agent in the container, RSS {}",
            rss.trim()
        );
    }

    // `podman stop` sends SIGTERM and kills after 10 s: exit 0 means the
    // agent (PID 1 in the container) drained and exited by itself.
    let started = Instant::now();
    succeed(
        podman()
            .expect("podman")
            .args(["stop", "--time", "10", &name]),
    );
    eprintln!("image figure: podman stop took {:.1?}", started.elapsed());
    let exit = inspect("container", &name, "{{.State.ExitCode}}");
    let log = logs();
    assert_eq!(exit, "0", "exit code after SIGTERM\n{log}");
    assert!(log.contains("agent stopped"), "no clean stop in:\n{log}");
    drop(cleanup);
}
