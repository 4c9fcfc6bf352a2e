//! The Kubernetes manifests in `deploy/kubernetes/`: valid against the
//! Kubernetes API schemas, and consistent where no schema can tell.
//!
//! The schemas come with `kubernetes-validate` from PyPI (the wheel ships
//! them, one set per Kubernetes version), installed on first use into a
//! virtualenv under the target directory; its YAML parser (PyYAML, a
//! dependency) turns the manifests into JSON for the consistency checks.
//! Those run the ConfigMap's TOML through `nacos-replicator check`, and
//! compare the Deployment with the configuration (secrets, status port,
//! config path) and with the Dockerfile (user, port, command).

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::{Value, json};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes");
const VALIDATOR: &str = "kubernetes-validate==1.37.0";
/// The oldest and the newest Kubernetes the manifests are checked against.
const KUBERNETES: [&str; 2] = ["1.30.0", "1.37.0"];
/// The key of the ConfigMap holding the agent's TOML.
const CONFIG_KEY: &str = "agent.toml";
/// The agent's own drain limit on SIGTERM (`Agent::with_shutdown_grace`'s default).
const AGENT_GRACE_SECONDS: i64 = 10;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}

/// The virtualenv holding the validator, made once (a marker file says the
/// install finished; a half-made one is made again).
fn venv() -> &'static Path {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        let dir = support::target_dir().join("kubernetes-validate");
        let marker = dir.join(VALIDATOR);
        if marker.exists() {
            return dir;
        }
        let _ = std::fs::remove_dir_all(&dir);
        let mut make = Command::new("python3");
        make.args(["-m", "venv"]).arg(&dir);
        let mut install = Command::new(dir.join("bin/pip"));
        install.args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            VALIDATOR,
        ]);
        for step in [&mut make, &mut install] {
            let out = run(step);
            assert!(
                out.status.success(),
                "installing {VALIDATOR} (scripts/prereqs installs python3 and its venv module): \
                 {step:?}: {}\n{}",
                out.status,
                text(&out.stderr)
            );
        }
        std::fs::write(&marker, "").expect("write the install marker");
        dir
    })
}

/// `kubernetes-validate --strict` (unknown fields are errors) on `files`.
fn validate(version: &str, files: &[PathBuf]) -> Output {
    run(Command::new(venv().join("bin/kubernetes-validate"))
        .args(["--strict", "--kubernetes-version", version])
        .args(files))
}

/// Every document of each YAML file, as JSON, in one run of the parser.
fn documents(paths: &[PathBuf]) -> Vec<Vec<Value>> {
    let out = run(Command::new(venv().join("bin/python"))
        .args([
            "-c",
            "import json, sys, yaml\n\
             json.dump([list(yaml.safe_load_all(open(f))) for f in sys.argv[1:]], sys.stdout)",
        ])
        .args(paths));
    assert!(out.status.success(), "{paths:?}: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("the YAML as JSON")
}

/// The kustomization, the files it applies, and their objects, read once.
struct Manifests {
    kustomization: Value,
    files: Vec<PathBuf>,
    objects: Vec<Value>,
}

fn manifests() -> &'static Manifests {
    static MANIFESTS: OnceLock<Manifests> = OnceLock::new();
    MANIFESTS.get_or_init(|| {
        let mut kustomization = documents(&[Path::new(DIR).join("kustomization.yaml")]);
        let kustomization = match kustomization.pop().as_deref() {
            Some([one]) => one.clone(),
            other => panic!("one kustomization document expected: {other:?}"),
        };
        let files: Vec<PathBuf> = kustomization["resources"]
            .as_array()
            .expect("resources")
            .iter()
            .map(|r| Path::new(DIR).join(r.as_str().expect("a file name")))
            .collect();
        let objects = documents(&files).into_iter().flatten().collect();
        Manifests {
            kustomization,
            files,
            objects,
        }
    })
}

/// The one object of `kind` among the resources.
fn object(kind: &str) -> &'static Value {
    let found: Vec<&Value> = manifests()
        .objects
        .iter()
        .filter(|d| d["kind"] == kind)
        .collect();
    assert_eq!(found.len(), 1, "one {kind}");
    found[0]
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {pointer} in {value}"))
}

/// The Dockerfile instruction `name` of the shipped stages (one of each).
fn dockerfile(name: &str) -> String {
    let file = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile"))
        .expect("read the Dockerfile");
    let found: Vec<&str> = file
        .lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .collect();
    assert_eq!(found.len(), 1, "one {name} in the Dockerfile: {found:?}");
    found[0].trim().to_owned()
}

#[test]
fn the_manifests_are_valid_against_the_kubernetes_schemas() {
    let files = &manifests().files;
    for version in KUBERNETES {
        let out = validate(version, files);
        let report = text(&out.stdout) + &text(&out.stderr);
        assert!(out.status.success(), "Kubernetes {version}:\n{report}");
        // One line per object, so no file went unchecked.
        assert_eq!(
            report.matches(" passed for resource ").count(),
            files.len(),
            "{report}"
        );
    }
}

#[test]
fn a_broken_manifest_fails_validation() {
    let deployment = std::fs::read_to_string(Path::new(DIR).join("deployment.yaml"))
        .expect("read the Deployment");
    let dir = tempfile::tempdir().expect("temp dir");
    for (from, to, complaint) in [
        ("replicas: 2", "replicas: \"two\"", "spec.replicas"),
        (
            "readinessProbe:",
            "readinesProbe:",
            "'readinesProbe' was unexpected",
        ),
        (
            "containerPort: 9787",
            "containerPort: status",
            "containerPort",
        ),
    ] {
        assert!(deployment.contains(from), "no {from:?} to break");
        let broken = dir.path().join("deployment.yaml");
        std::fs::write(&broken, deployment.replacen(from, to, 1)).expect("write the copy");
        let out = validate(KUBERNETES[1], &[broken]);
        let report = text(&out.stdout) + &text(&out.stderr);
        assert!(!out.status.success(), "{to:?} passed:\n{report}");
        assert!(
            report.contains(complaint),
            "{to:?}: no {complaint:?} in:\n{report}"
        );
    }
}

#[test]
fn the_kustomization_applies_every_manifest_and_names_the_image() {
    let listed: BTreeSet<&PathBuf> = manifests().files.iter().collect();
    let present: BTreeSet<PathBuf> = std::fs::read_dir(DIR)
        .expect("read deploy/kubernetes")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .collect();
    assert_eq!(listed, present.iter().collect());

    let deployment = object("Deployment");
    let image = str_at(deployment, "/spec/template/spec/containers/0/image");
    let (name, tag) = image.rsplit_once(':').expect("image:tag");
    let images = &manifests().kustomization["images"];
    assert_eq!(images[0]["name"], name, "{images}");
    assert_eq!(images[0]["newTag"], tag, "{images}");
    assert_eq!(tag, env!("CARGO_PKG_VERSION"));
}

#[test]
fn the_configuration_passes_check_and_its_secrets_port_and_path_are_wired() {
    let config_map = object("ConfigMap");
    let toml_text = str_at(config_map, &format!("/data/{CONFIG_KEY}"));
    let toml: toml::Table = toml::from_str(toml_text).expect("the ConfigMap's TOML");
    // Every secret the file names: the passwords and the drill token.
    let mut password_envs: BTreeSet<&str> = toml["clusters"]
        .as_array()
        .expect("clusters")
        .iter()
        .filter_map(|c| c.get("auth")?.get("password_env")?.as_str())
        .collect();
    assert!(!password_envs.is_empty(), "no secret to wire");
    let token = toml["agent"]
        .get("control_token_env")
        .and_then(|v| v.as_str());
    // Off loopback, drills without a token are refused: the token is wired.
    password_envs.insert(token.expect("agent.control_token_env (drills off loopback)"));

    // The file is valid as the agent reads it; unset secrets are notes.
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join(CONFIG_KEY);
    std::fs::write(&file, toml_text).expect("write the TOML");
    let mut check = Command::new(env!("CARGO_BIN_EXE_nacos-replicator"));
    check.args(["check", "--config"]).arg(&file);
    for var in &password_envs {
        check.env_remove(var);
    }
    let out = run(&mut check);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains(": valid"), "{stdout}");
    for var in &password_envs {
        assert!(
            stdout.contains(&format!("environment variable {var} is not set")),
            "{stdout}"
        );
    }

    // Every password_env comes from the Secret, through the container's env.
    let deployment = object("Deployment");
    let secret = object("Secret");
    let secret_name = str_at(secret, "/metadata/name");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    for var in &password_envs {
        let env = container["env"]
            .as_array()
            .expect("env")
            .iter()
            .find(|e| e["name"] == *var)
            .unwrap_or_else(|| panic!("{var} is not in the container's env"));
        let reference = &env["valueFrom"]["secretKeyRef"];
        assert_eq!(reference["name"], secret_name, "{var}: {env}");
        let key = str_at(reference, "/key");
        assert!(
            secret["stringData"].get(key).is_some(),
            "{var}: the Secret has no key {key}"
        );
        assert_ne!(reference["optional"], true, "{var} must not be optional");
    }

    // The probes reach the status server: its port, on every interface.
    let listen: SocketAddr = toml["agent"]["status_listen"]
        .as_str()
        .expect("agent.status_listen")
        .parse()
        .expect("an address");
    assert!(
        listen.ip().is_unspecified(),
        "{listen}: probes come from outside"
    );
    let port = &container["ports"][0];
    assert_eq!(port["containerPort"], listen.port());
    assert_eq!(
        dockerfile("EXPOSE"),
        listen.port().to_string(),
        "the image exposes another port"
    );
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert!(
            get["port"] == port["name"] || get["port"] == listen.port(),
            "{probe} port {} is not the status port",
            get["port"]
        );
    }

    // The agent reads the file where the ConfigMap is mounted.
    let args: Vec<&str> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let config_path = args
        .iter()
        .skip_while(|a| **a != "--config")
        .nth(1)
        .map(Path::new)
        .expect("--config FILE");
    let mount = container["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|m| Some(Path::new(str_at(m, "/mountPath"))) == config_path.parent())
        .expect("a volume mounted at the config file's directory");
    assert!(
        mount.get("subPath").is_none(),
        "a subPath mount never sees an edited ConfigMap"
    );
    let volume = deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    assert_eq!(volume["configMap"]["name"], config_map["metadata"]["name"]);
    assert_eq!(
        config_path.file_name(),
        Some(std::ffi::OsStr::new(CONFIG_KEY))
    );
    let cmd: Value = serde_json::from_str(&dockerfile("CMD")).expect("CMD as JSON");
    assert_eq!(
        cmd,
        json!(args),
        "the Deployment's args differ from the image's CMD"
    );
}

#[test]
fn the_pair_runs_locked_down_and_drains_before_it_is_killed() {
    let deployment = object("Deployment");
    let spec = &deployment["spec"];
    let pod = &spec["template"]["spec"];
    assert_eq!(spec["replicas"], 2, "the agent pair");
    let labels = &spec["selector"]["matchLabels"];
    assert_eq!(&spec["template"]["metadata"]["labels"], labels);
    let pdb = object("PodDisruptionBudget");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], labels);

    let grace = pod["terminationGracePeriodSeconds"]
        .as_i64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        grace > AGENT_GRACE_SECONDS,
        "{grace} s: the kubelet would kill the agent before its {AGENT_GRACE_SECONDS} s drain"
    );

    let (uid, gid) = dockerfile("USER")
        .split_once(':')
        .map(|(u, g)| (u.parse::<i64>(), g.parse::<i64>()))
        .expect("USER uid:gid");
    let security = &pod["securityContext"];
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["runAsUser"], uid.expect("numeric uid"));
    assert_eq!(security["runAsGroup"], gid.expect("numeric gid"));
    assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault");
    let container = &pod["containers"][0]["securityContext"];
    assert_eq!(container["readOnlyRootFilesystem"], true);
    assert_eq!(container["allowPrivilegeEscalation"], false);
    assert_eq!(container["capabilities"]["drop"], json!(["ALL"]));

    let resources = &pod["containers"][0]["resources"];
    for field in ["/requests/cpu", "/requests/memory", "/limits/memory"] {
        assert!(resources.pointer(field).is_some(), "no resources{field}");
    }
}
