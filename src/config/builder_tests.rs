//! The builder against the file: the same content gives the same
//! configuration, the same mistake the same error.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::*;
use crate::model::ClusterId;
use crate::reconcile::Pattern;

fn env(key: &str) -> Option<String> {
    key.starts_with("NACOS_")
        .then(|| format!("secret-of-{key}"))
}

fn id(s: &str) -> ClusterId {
    ClusterId(s.to_owned())
}

fn route(from: &str, to: &str) -> Route {
    Route::new(id(from), id(to)).unwrap()
}

/// Every section and key of the file, none at its default.
const FULL: &str = r#"
[agent]
tag_prefix = "x."
status_listen = "127.0.0.1:9000"
log_format = "json"
[timings]
list_interval = "1s"
resync_interval = "2m"
request_timeout = "500ms"
source_loss = "withdraw"
hold_for = "1m"
max_publishes_per_second = 10
mass_withdraw_share = 0.25
mass_withdraw_min_replicas = 2
[[clusters]]
id = "east"
servers = ["10.0.0.1:8848", "10.0.0.2:8848"]
namespaces = ["public", "prod"]
grpc_port_offset = 1001
auth = { username = "u", password_env = "NACOS_EAST" }
tls = { ca_file = "east-ca.pem", domain = "nacos.east" }
[[clusters]]
id = "west"
servers = ["10.1.0.1:8848"]
namespaces = ["public", "prod-west"]
auth = { username = "v", password = "inline" }
[[routes]]
from = "east"
to = "west"
namespaces = ["prod"]
groups = ["G"]
include = ["orders*"]
exclude = ["*-canary"]
map_namespaces = { prod = "prod-west" }
map_groups = { G = "FROM_EAST" }
[[routes]]
from = "west"
to = "east"
namespaces = ["public"]
"#;

#[test]
fn a_built_config_equals_the_parsed_one() {
    let dir = tempfile::tempdir().unwrap();
    let pem = b"-----BEGIN CERTIFICATE-----\n".to_vec();
    std::fs::write(dir.path().join("east-ca.pem"), &pem).unwrap();
    let path = dir.path().join("agent.toml");
    let parsed = parse(&path, FULL, &env).unwrap_or_else(|e| panic!("{e}"));

    let mut east_to_west = route("east", "west");
    east_to_west.scope.namespaces = vec!["prod".into()];
    east_to_west.scope.groups = vec!["G".into()];
    east_to_west.scope.include = vec![Pattern::new("orders*").unwrap()];
    east_to_west.scope.exclude = vec![Pattern::new("*-canary").unwrap()];
    east_to_west.mapping.namespaces = [("prod".into(), "prod-west".into())].into();
    east_to_west.mapping.groups = [("G".into(), "FROM_EAST".into())].into();
    let mut west_to_east = route("west", "east");
    west_to_east.scope.namespaces = vec!["public".into()];
    let built = Config::builder()
        .tags(OriginTags::new("x.").unwrap())
        .status_listen(SocketAddr::from(([127, 0, 0, 1], 9000)))
        .log_format(LogFormat::Json)
        // The guard given apart from the timings still lands in them.
        .guard(Guard {
            max_withdraw_share: 0.25,
            min_replicas: 2,
        })
        .timings(Timings {
            list_interval: Duration::from_secs(1),
            resync_interval: Duration::from_secs(120),
            request_timeout: Duration::from_millis(500),
            source_loss: SourceLoss::Withdraw,
            hold_for: Duration::from_secs(60),
            max_publishes_per_second: 10,
            ..Timings::default()
        })
        .cluster(
            ClusterSpec::new("east", ["10.0.0.1:8848", "10.0.0.2:8848"])
                .with_namespaces(["public", "prod"])
                .with_grpc_port_offset(1001)
                .with_credentials(Credentials {
                    username: "u".into(),
                    password: "secret-of-NACOS_EAST".into(),
                })
                .with_tls(TlsOptions {
                    ca_pem: Some(pem),
                    domain: Some("nacos.east".into()),
                }),
        )
        .cluster(
            ClusterSpec::new("west", ["10.1.0.1:8848"])
                .with_namespaces(["public", "prod-west"])
                .with_credentials(Credentials {
                    username: "v".into(),
                    password: "inline".into(),
                }),
        )
        .route(east_to_west)
        .route(west_to_east)
        .build()
        .unwrap_or_else(|e| panic!("{e}"));

    assert_eq!(parsed.file.as_deref(), Some(path.as_path()));
    assert_eq!(built.file, None);
    assert_eq!(
        built,
        Config {
            file: None,
            ..parsed
        }
    );
}

#[test]
fn an_empty_builder_has_the_files_defaults() {
    let minimal = "[[clusters]]\nid = \"a\"\nservers = [\"h:1\"]\n";
    let parsed = parse(Path::new("t.toml"), minimal, &env).unwrap();
    let built = Config::builder()
        .cluster(ClusterSpec::new("a", ["h:1"]))
        .build()
        .unwrap();
    assert_eq!(
        built,
        Config {
            file: None,
            ..parsed
        }
    );
}

/// Two clusters `a` and `b` and a route `a -> b`, as text and as a builder.
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

fn a() -> ClusterSpec {
    ClusterSpec::new("a", ["127.0.0.1:8848"])
}

fn b() -> ClusterSpec {
    ClusterSpec::new("b", ["127.0.0.1:18848"])
}

/// The file and the builder fail at the same key for the same reason; each
/// says where from.
fn same_error(text: &str, builder: ConfigBuilder) -> ConfigError {
    let from_file = match parse(Path::new("test.toml"), text, &env) {
        Err(e) => e,
        Ok(_) => panic!("the file was accepted:\n{text}"),
    };
    let built = match builder.build() {
        Err(e) => e,
        Ok(_) => panic!("the builder was accepted; the file says: {from_file}"),
    };
    assert_eq!(
        (&built.key, &built.reason),
        (&from_file.key, &from_file.reason)
    );
    assert_eq!(from_file.file.as_deref(), Some(Path::new("test.toml")));
    assert!(
        from_file.to_string().starts_with("test.toml: "),
        "{from_file}"
    );
    assert_eq!(built.file, None);
    assert_eq!(
        built.to_string(),
        format!("config builder: {}: {}", built.key, built.reason)
    );
    built
}

#[test]
fn a_built_config_fails_as_the_file_does() {
    let ab = || Config::builder().cluster(a()).cluster(b());
    let e = same_error("", Config::builder());
    assert_eq!(e.key, "clusters");
    let e = same_error(
        &MINIMAL.replace("id = \"b\"", "id = \"a\""),
        Config::builder()
            .cluster(a())
            .cluster(ClusterSpec::new("a", ["127.0.0.1:18848"]))
            .route(route("a", "b")),
    );
    assert_eq!(e.key, "clusters[1].id");
    let e = same_error(
        &MINIMAL.replace("id = \"b\"", "id = \"b c\""),
        Config::builder()
            .cluster(a())
            .cluster(ClusterSpec::new("b c", ["127.0.0.1:18848"])),
    );
    assert!(e.reason.contains("letters"), "{e}");
    let e = same_error(
        &MINIMAL.replace("127.0.0.1:18848", "h:65000"),
        Config::builder()
            .cluster(a())
            .cluster(ClusterSpec::new("b", ["h:65000"])),
    );
    assert_eq!(e.key, "clusters[1].servers[0]");
    let e = same_error(
        &MINIMAL.replace("id = \"b\"", "id = \"b\"\nnamespaces = []"),
        Config::builder()
            .cluster(a())
            .cluster(b().with_namespaces(Vec::<String>::new())),
    );
    assert_eq!(e.key, "clusters[1].namespaces");
    let e = same_error(
        &format!("{MINIMAL}\n[timings]\nresync_interval = \"0s\"\n"),
        ab().route(route("a", "b")).timings(Timings {
            resync_interval: Duration::ZERO,
            ..Timings::default()
        }),
    );
    assert_eq!(e.key, "timings.resync_interval");
    let e = same_error(
        &format!("{MINIMAL}\n[timings]\nmass_withdraw_share = 1.5\n"),
        ab().route(route("a", "b")).guard(Guard {
            max_withdraw_share: 1.5,
            min_replicas: 4,
        }),
    );
    assert_eq!(e.key, "timings.mass_withdraw_share");
}

#[test]
fn a_built_route_fails_as_the_file_does() {
    let ab = || Config::builder().cluster(a()).cluster(b());
    let e = same_error(
        &MINIMAL.replace("to = \"b\"", "to = \"z\""),
        ab().route(route("a", "z")),
    );
    assert_eq!(e.key, "routes[0].to");
    let mut narrowed = route("a", "b");
    narrowed.scope.namespaces = vec!["prod".into()];
    let e = same_error(
        &MINIMAL.replace("to = \"b\"", "to = \"b\"\nnamespaces = [\"prod\"]"),
        ab().route(narrowed),
    );
    assert_eq!(e.key, "routes[0].namespaces[0]");
    let mut renamed = route("a", "b");
    renamed.mapping.namespaces = [("public".into(), "elsewhere".into())].into();
    let e = same_error(
        &MINIMAL.replace(
            "to = \"b\"",
            "to = \"b\"\nmap_namespaces = { public = \"elsewhere\" }",
        ),
        ab().route(renamed),
    );
    assert_eq!(e.key, "routes[0].map_namespaces");
    let e = same_error(
        &format!("{MINIMAL}\n[[routes]]\nfrom = \"a\"\nto = \"b\"\n"),
        ab().route(route("a", "b")).route(route("a", "b")),
    );
    assert_eq!(e.key, "routes[1]");
}
