//! Config parsing and validation: the example file, and one test per error.

use std::path::Path;
use std::time::Duration;

use super::*;

const EXAMPLE: &str = include_str!("../../examples/three-regions.toml");

fn env(key: &str) -> Option<String> {
    key.starts_with("NACOS_")
        .then(|| format!("secret-of-{key}"))
}

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/three-regions.toml")
}

fn check(text: &str) -> Result<Config, ConfigError> {
    parse(Path::new("test.toml"), text, &env)
}

fn fails(text: &str, key: &str, reason: &str) {
    match check(text) {
        Ok(_) => panic!("accepted; expected an error at {key}"),
        Err(e) => {
            assert_eq!(e.key, key, "{e}");
            assert!(e.reason.contains(reason), "{e}");
            assert!(e.to_string().starts_with("test.toml: "), "{e}");
        }
    }
}

const MINIMAL: &str = r#"
[[clusters]]
id = "a"
servers = ["127.0.0.1:8848"]
[[clusters]]
id = "b"
servers = ["127.0.0.1:18848"]
[[routes]]
from = "a"
to = "b"
"#;

#[test]
fn the_example_is_valid() {
    // The CA file the example names does not ship; stand one in for the parse.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("ca")).unwrap();
    std::fs::write(
        dir.path().join("ca/sh-ca.pem"),
        "-----BEGIN CERTIFICATE-----\n",
    )
    .unwrap();
    let path = dir.path().join("three-regions.toml");
    std::fs::write(&path, EXAMPLE).unwrap();
    let config = load(&path, &env).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.clusters.len(), 3);
    assert_eq!(config.routes.len(), 2);
    let hz = config.cluster(&ClusterId("hz".into())).unwrap();
    assert_eq!(
        hz.credentials.as_ref().unwrap().password,
        "secret-of-NACOS_HZ_PASSWORD"
    );
    assert!(
        config
            .cluster(&ClusterId("sh".into()))
            .unwrap()
            .tls
            .as_ref()
            .unwrap()
            .ca_pem
            .is_some()
    );
    assert_eq!(config.tags.key(), "rpl.origin");
    assert_eq!(config.timings.hold_for, Duration::from_secs(600));
    let sg = &config.routes[1];
    let key = crate::model::ServiceKey::new("prod", "DEFAULT_GROUP", "orders-v2");
    assert!(sg.covers(&key));
    assert_eq!(&*sg.destination_key(&key).group, "FROM_SG");
    assert!(!config.routes[0].covers(&crate::model::ServiceKey::new(
        "public",
        "G",
        "orders-canary"
    )));
    // Without the CA file next to it, the same file names the key and the file.
    let err = load(&example_path(), &env).err().map(|e| e.key);
    assert!(err.is_none() || err.as_deref() == Some("clusters[1].tls.ca_file"));
}

#[test]
fn minimal_config_gets_documented_defaults() {
    let c = check(MINIMAL).unwrap();
    assert_eq!(c.clusters[0].namespaces, vec!["public".to_owned()]);
    assert_eq!(c.clusters[0].grpc_port_offset, 1000);
    assert_eq!(c.timings, Timings::default());
    assert_eq!(c.timings.probe_interval, Duration::from_secs(1));
    assert_eq!(c.status_listen.to_string(), "127.0.0.1:9787");
}

#[test]
fn a_zero_probe_interval_turns_probing_off_but_listings_need_an_interval() {
    let off = check(&format!("[timings]\nprobe_interval = \"0s\"\n{MINIMAL}")).unwrap();
    assert!(off.timings.probe_interval.is_zero());
    fails(
        &format!("[timings]\nlist_interval = \"0s\"\n{MINIMAL}"),
        "timings.list_interval",
        "above zero",
    );
}

#[test]
fn unknown_keys_are_rejected_with_their_path() {
    fails(
        &MINIMAL.replace(
            "servers = [\"127.0.0.1:8848\"]",
            "servers = [\"127.0.0.1:8848\"]\nserver = 1",
        ),
        "clusters[0].server",
        "unknown field `server`",
    );
    fails(
        &format!("{MINIMAL}\n[timings]\nhold = \"1m\"\n"),
        "timings.hold",
        "unknown field `hold`",
    );
}

#[test]
fn wrong_types_and_bad_durations_name_the_key_and_line() {
    let text = format!("{MINIMAL}\n[timings]\nresync_interval = \"soon\"\n");
    match check(&text) {
        Err(e) => {
            assert_eq!(e.key, "timings.resync_interval", "{e}");
            assert!(e.reason.contains("line 13"), "{e}");
        }
        Ok(_) => panic!("accepted a bad duration"),
    }
    fails(
        &format!("{MINIMAL}\n[timings]\nresync_interval = \"0s\"\n"),
        "timings.resync_interval",
        "above zero",
    );
    fails(
        &format!("{MINIMAL}\n[timings]\nmax_publishes_in_flight = 0\n"),
        "timings.max_publishes_in_flight",
        "at least 1",
    );
    fails(
        &format!("{MINIMAL}\n[timings]\nmax_reads_in_flight = 0\n"),
        "timings.max_reads_in_flight",
        "at least 1",
    );
    fails(
        &format!("{MINIMAL}\n[timings]\nmass_withdraw_share = 1.5\n"),
        "timings.mass_withdraw_share",
        "share",
    );
    fails("clusters = 3", "clusters", "invalid type");
    fails("[[clusters]\nid = ", "-", "line 1");
}

#[test]
fn cluster_errors() {
    fails(
        &MINIMAL.replace("id = \"b\"", "id = \"a\""),
        "clusters[1].id",
        "duplicate",
    );
    fails(
        &MINIMAL.replace("id = \"b\"", "id = \"b c\""),
        "clusters[1].id",
        "letters",
    );
    fails(
        &MINIMAL.replace("127.0.0.1:18848", "nohost"),
        "clusters[1].servers[0]",
        "host:port",
    );
    fails(
        &MINIMAL.replace("127.0.0.1:18848", "h:65000"),
        "clusters[1].servers[0]",
        "host:port",
    );
    let auth = |body: &str| {
        MINIMAL.replace(
            "id = \"b\"",
            &format!("id = \"b\"\nauth = {{ username = \"u\"{body} }}"),
        )
    };
    fails(
        &auth(", password_env = \"UNSET_VAR\""),
        "clusters[1].auth.password_env",
        "UNSET_VAR is not set",
    );
    fails(
        &auth(", password = \"p\", password_env = \"NACOS_X\""),
        "clusters[1].auth",
        "exactly one",
    );
    assert!(check(&auth(", password_env = \"NACOS_B\"")).is_ok());
}

#[test]
fn route_errors() {
    fails(
        &MINIMAL.replace("to = \"b\"", "to = \"z\""),
        "routes[0].to",
        "no cluster has id \"z\"",
    );
    fails(
        &MINIMAL.replace("to = \"b\"", "to = \"a\""),
        "routes[0].to",
        "into itself",
    );
    fails(
        &MINIMAL.replace("to = \"b\"", "to = \"b\"\ninclude = [\"[\"]"),
        "routes[0].include[0]",
        "invalid service pattern",
    );
    fails(
        &MINIMAL.replace("to = \"b\"", "to = \"b\"\nnamespaces = [\"prod\"]"),
        "routes[0].namespaces[0]",
        "not among",
    );
    fails(
        &MINIMAL.replace(
            "to = \"b\"",
            "to = \"b\"\nmap_namespaces = { public = \"elsewhere\" }",
        ),
        "routes[0].map_namespaces",
        "does not serve",
    );
    fails(
        &format!("{MINIMAL}\n[[routes]]\nfrom = \"a\"\nto = \"b\"\n"),
        "routes[1]",
        "same source and destination",
    );
    fails(
        "[agent]\ntag_prefix = \"\"\n[[clusters]]\nid = \"a\"\nservers = [\"h:1\"]\n",
        "agent.tag_prefix",
        "1 to 16",
    );
    fails("", "clusters", "at least one");
}

#[test]
fn unset_secrets_are_noted_offline_and_refused_for_connecting() {
    let path = example_path();
    let nothing_set = |_: &str| None;
    let (config, unset) = load_offline(&path, &nothing_set).expect("valid offline");
    let keys: Vec<&str> = unset.iter().map(|u| u.key.as_str()).collect();
    // The example's CA file is not shipped (examples/ca/README.md): noted too.
    assert_eq!(
        keys,
        [
            "clusters[0].auth.password_env",
            "clusters[1].auth.password_env",
            "clusters[1].tls.ca_file"
        ]
    );
    assert_eq!(
        unset[0].to_string(),
        "clusters[0].auth.password_env: environment variable NACOS_HZ_PASSWORD is not set"
    );
    assert!(
        unset[1].reason.contains("NACOS_SH_PASSWORD"),
        "{}",
        unset[1]
    );
    assert!(unset[2].reason.contains("sh-ca.pem"), "{}", unset[2]);
    assert_eq!(config.clusters.len(), 3);
    // To connect, the same file is refused, naming the first one.
    let e = load(&path, &nothing_set).expect_err("unset secret");
    assert_eq!(e.key, "clusters[0].auth.password_env");
    // With the variables set, only the CA file is left to note.
    let (_, unset) = load_offline(&path, &env).expect("valid");
    assert_eq!(unset.len(), 1, "{unset:?}");
}

#[test]
fn the_control_token_is_read_from_its_variable_and_never_shown() {
    let with = |var: &str| format!("[agent]\ncontrol_token_env = \"{var}\"\n{MINIMAL}");
    let c = check(&with("NACOS_CONTROL")).expect("valid");
    let token = c.control_token.as_ref().expect("token read");
    assert_eq!(token.0, "secret-of-NACOS_CONTROL");
    assert!(
        !format!("{c:?}").contains("secret-of-"),
        "token shown: {c:?}"
    );
    assert_eq!(check(MINIMAL).expect("valid").control_token, None);
    fails(
        &with("UNSET_VAR"),
        "agent.control_token_env",
        "UNSET_VAR is not set",
    );
    let empty = |_: &str| Some("  ".to_owned());
    let e = parse(Path::new("test.toml"), &with("EMPTY"), &empty).expect_err("empty token");
    assert_eq!(e.key, "agent.control_token_env");
    assert!(e.reason.contains("EMPTY is empty"), "{e}");
    // Shown, not run: an unset token is a note, like a password.
    let text = with("UNSET_VAR");
    let (c, unset) = parse_with(Path::new("t.toml"), &text, &env, Secrets::Noted).expect("valid");
    assert_eq!(c.control_token, None);
    assert_eq!(unset.len(), 1);
    assert_eq!(
        unset[0].to_string(),
        "agent.control_token_env: environment variable UNSET_VAR is not set"
    );
}
