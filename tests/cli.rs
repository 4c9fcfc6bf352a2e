//! The binary's offline commands on the shipped example, as a new user runs
//! them: no servers, no secrets in the environment.

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_nacos-replicator");
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/three-regions.toml");

fn check(extra: &[&str]) -> Output {
    Command::new(BIN)
        .args(["check", "--config", EXAMPLE])
        .args(extra)
        .env_remove("NACOS_HZ_PASSWORD")
        .env_remove("NACOS_SH_PASSWORD")
        .output()
        .expect("run the binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn check_works_offline_on_the_example_and_names_each_unset_secret() {
    let out = check(&[]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "exit {}\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains(": valid"), "{stdout}");
    for (key, var) in [
        ("clusters[0].auth.password_env", "NACOS_HZ_PASSWORD"),
        ("clusters[1].auth.password_env", "NACOS_SH_PASSWORD"),
    ] {
        let note = format!("note: {key}: environment variable {var} is not set");
        assert!(stdout.contains(&note), "no {note:?} in:\n{stdout}");
    }
    // The CA file the example names is not shipped: a note as well.
    assert!(
        stdout.contains("note: clusters[1].tls.ca_file: cannot read"),
        "{stdout}"
    );
    assert!(stdout.contains("routes"), "{stdout}");
}

#[test]
fn check_connect_still_requires_the_secrets() {
    let out = check(&["--connect"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("clusters[0].auth.password_env") && stderr.contains("NACOS_HZ_PASSWORD"),
        "{stderr}"
    );
}
