//! The dashboard and the alert rules in `deploy/monitoring/` against what a
//! running agent exports: every PromQL expression in them must parse, and
//! every metric it selects must be on the agent's `/metrics` with at least
//! one sample its label matchers select.
//!
//! Samples, not only `# TYPE` lines: the agent registers every family at
//! start, so a `# TYPE` line proves a name exists but not that a selector
//! such as `publishes_total{outcome="failed"}` can ever match anything; an
//! alert over a label value the agent never produces stays silent forever.
//! So the agent under test is driven (on the in-process testkit servers)
//! through everything the files look at: replication, a skipped native, a
//! retried and a refused publish, and a replica the destination forgets
//! behind its back, which the read-back finds and repairs.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use nacos_replicator::agent::Agent;
use nacos_replicator::cluster::{Client, ClientConfig};
use nacos_replicator::model::{DEFAULT_GROUP, DEFAULT_NAMESPACE, Instance, ServiceKey};
use nacos_replicator::runtime::Tasks;
use nacos_replicator::testing::fake::{FakeNacos, FakeOptions};
use promql_parser::parser::{Expr, VectorSelector};
use promql_parser::util::{ExprVisitor, walk_expr};
use support::*;
use tokio_util::sync::CancellationToken;

/// Labels Prometheus adds when it scrapes (the agent never exports them).
const TARGET_LABELS: [&str; 2] = ["instance", "job"];

/// Grafana's interval variables, which stand where PromQL wants a duration.
const GRAFANA_DURATIONS: [&str; 3] = ["$__rate_interval", "$__interval", "$__range"];

/// One selector of an expression: the metric name and its label matchers.
struct Selector {
    name: Option<String>,
    matchers: Vec<promql_parser::label::Matcher>,
}

struct Selectors(Vec<Selector>);

impl ExprVisitor for Selectors {
    type Error = String;

    fn pre_visit(&mut self, expr: &Expr) -> Result<bool, String> {
        let vs: Option<&VectorSelector> = match expr {
            Expr::VectorSelector(vs) => Some(vs),
            Expr::MatrixSelector(ms) => Some(&ms.vs),
            _ => None,
        };
        if let Some(vs) = vs {
            if !vs.matchers.or_matchers.is_empty() {
                return Err(format!("`or` matchers are not checked: {vs}"));
            }
            // `{__name__="x"}` names the metric too.
            let by_matcher = vs
                .matchers
                .matchers
                .iter()
                .find(|m| m.name == "__name__")
                .map(|m| m.value.clone());
            self.0.push(Selector {
                name: vs.name.clone().or(by_matcher),
                matchers: vs
                    .matchers
                    .matchers
                    .iter()
                    .filter(|m| m.name != "__name__")
                    .cloned()
                    .collect(),
            });
        }
        Ok(true)
    }
}

/// Parses `expr` (Grafana's interval variables replaced by a duration) and
/// returns its selectors.
fn selectors(expr: &str) -> Result<Vec<Selector>, String> {
    let mut text = expr.to_owned();
    for var in GRAFANA_DURATIONS {
        text = text.replace(var, "5m");
    }
    let ast = promql_parser::parser::parse(&text)?;
    let mut found = Selectors(Vec::new());
    walk_expr(&mut found, &ast)?;
    Ok(found.0)
}

/// One sample line of the exposition.
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
}

/// What `/metrics` exported: family types and samples.
struct Exposition {
    types: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

/// Parses the Prometheus / OpenMetrics text format (the subset the agent
/// writes: `# TYPE` lines, samples with quoted label values).
fn exposition(text: &str) -> Result<Exposition, String> {
    let mut types = BTreeMap::new();
    let mut samples = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').ok_or(format!("bad TYPE: {line}"))?;
            types.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (name, labels) = match line.split_once('{') {
            Some((name, rest)) => {
                let (body, _) = rest
                    .rsplit_once('}')
                    .ok_or(format!("unclosed labels: {line}"))?;
                (name.to_owned(), label_pairs(body)?)
            }
            None => {
                let name = line.split(' ').next().unwrap_or_default();
                (name.to_owned(), BTreeMap::new())
            }
        };
        samples.push(Sample { name, labels });
    }
    Ok(Exposition { types, samples })
}

/// `a="x",b="y \"z\""` as a map.
fn label_pairs(body: &str) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    let mut rest = body.trim_start_matches(',');
    while !rest.is_empty() {
        let (key, after) = rest
            .split_once("=\"")
            .ok_or(format!("bad labels: {body}"))?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => {
                    if let Some((_, c)) = chars.next() {
                        value.push(if c == 'n' { '\n' } else { c });
                    }
                }
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => return Err(format!("unclosed value: {body}")),
            }
        };
        labels.insert(key.trim().to_owned(), value);
        rest = after[end + 1..].trim_start_matches(',');
    }
    Ok(labels)
}

/// The sample names a family of `kind` writes.
fn sample_names(family: &str, kind: &str) -> Vec<String> {
    let suffixes: &[&str] = match kind {
        "counter" => &["_total", "_created"],
        "histogram" => &["_bucket", "_sum", "_count", "_created"],
        "summary" => &["", "_sum", "_count", "_created"],
        _ => &[""],
    };
    suffixes.iter().map(|s| format!("{family}{s}")).collect()
}

/// What is wrong with `expr` against `metrics` (nothing: an empty list).
fn problems(expr: &str, metrics: &Exposition) -> Vec<String> {
    let found = match selectors(expr) {
        Ok(found) => found,
        Err(e) => return vec![format!("does not parse: {e}")],
    };
    if found.is_empty() {
        return vec!["selects no metric".to_owned()];
    }
    let mut out = Vec::new();
    for sel in found {
        let Some(name) = sel.name else {
            out.push("a selector without a metric name".to_owned());
            continue;
        };
        let family = metrics
            .types
            .iter()
            .find(|(f, kind)| sample_names(f, kind).contains(&name));
        if family.is_none() {
            out.push(format!("{name}: no such metric (no family writes it)"));
            continue;
        }
        let checked: Vec<_> = sel
            .matchers
            .iter()
            .filter(|m| !TARGET_LABELS.contains(&m.name.as_str()))
            .collect();
        let selected = metrics.samples.iter().any(|s| {
            s.name == name
                && checked
                    .iter()
                    .all(|m| m.is_match(s.labels.get(&m.name).map(String::as_str).unwrap_or("")))
        });
        if !selected {
            let shown: Vec<String> = checked.iter().map(|m| m.to_string()).collect();
            out.push(format!("{name}{{{}}}: no sample selected", shown.join(",")));
        }
    }
    out
}

fn monitoring_file(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/monitoring")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `targets[].expr` of the dashboard, however deep (rows, collapsed
/// rows' panels, library panels inlined), and each `label_values(EXPR, l)`
/// variable query's EXPR, with where it was found.
fn dashboard_exprs(doc: &serde_json::Value, at: &str, out: &mut Vec<(String, String)>) {
    match doc {
        serde_json::Value::Object(map) => {
            let title = map.get("title").and_then(|t| t.as_str()).unwrap_or("");
            let here = format!("{at}/{title}");
            if let Some(targets) = map.get("targets").and_then(|t| t.as_array()) {
                for (i, target) in targets.iter().enumerate() {
                    match target.get("expr").and_then(|e| e.as_str()) {
                        Some(expr) => out.push((format!("{here} target {i}"), expr.to_owned())),
                        None => out.push((format!("{here} target {i}"), String::new())),
                    }
                }
            }
            if let Some(def) = map.get("definition").and_then(|d| d.as_str()) {
                let inner = def
                    .strip_prefix("label_values(")
                    .and_then(|r| r.rsplit_once(',').map(|(e, _)| e.to_owned()));
                out.push((format!("{here} variable"), inner.unwrap_or_default()));
            }
            for (key, value) in map {
                if key != "targets" {
                    dashboard_exprs(value, &here, out);
                }
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                dashboard_exprs(item, at, out);
            }
        }
        _ => {}
    }
}

/// Every rule's `expr` in the rule file, named by group and alert.
fn rule_exprs(doc: &serde_yaml_ng::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let groups = doc["groups"].as_sequence().cloned().unwrap_or_default();
    assert!(!groups.is_empty(), "alerts.yaml has no groups");
    for group in &groups {
        let gname = group["name"].as_str().unwrap_or("?").to_owned();
        for rule in group["rules"].as_sequence().cloned().unwrap_or_default() {
            let name = rule["alert"].as_str().or(rule["record"].as_str());
            let at = format!("alerts.yaml {gname}/{}", name.unwrap_or("?"));
            let expr = rule["expr"].as_str().unwrap_or_default().to_owned();
            out.push((at, expr));
        }
    }
    out
}

/// Each alerting rule has a `for`, a severity and annotations saying what
/// happened and what to do.
fn rule_shape(doc: &serde_yaml_ng::Value) -> Vec<String> {
    let mut out = Vec::new();
    for group in doc["groups"].as_sequence().cloned().unwrap_or_default() {
        for rule in group["rules"].as_sequence().cloned().unwrap_or_default() {
            let name = rule["alert"].as_str().unwrap_or("?").to_owned();
            if rule["for"].as_str().is_none() {
                out.push(format!("{name}: no `for`"));
            }
            let severity = rule["labels"]["severity"].as_str();
            if !matches!(severity, Some("warning" | "critical")) {
                out.push(format!("{name}: severity {severity:?}"));
            }
            for key in ["summary", "description"] {
                if rule["annotations"][key].as_str().is_none_or(str::is_empty) {
                    out.push(format!("{name}: no {key}"));
                }
            }
        }
    }
    out
}

#[test]
fn the_checker_catches_typos_unknown_metrics_and_dead_label_values() {
    let metrics = exposition(
        "# TYPE nacos_replicator_publishes counter\n\
         nacos_replicator_publishes_total{cluster=\"b\",outcome=\"applied\"} 3\n\
         # TYPE nacos_replicator_lag_seconds histogram\n\
         nacos_replicator_lag_seconds_bucket{cluster=\"b\",le=\"0.1\"} 1\n\
         nacos_replicator_lag_seconds_count{cluster=\"b\"} 1\n\
         # TYPE nacos_replicator_ready gauge\n\
         nacos_replicator_ready 1\n",
    )
    .expect("parses");
    let fine = [
        "nacos_replicator_ready == 0",
        "sum by (cluster) (rate(nacos_replicator_publishes_total{outcome=\"applied\", instance=~\"$instance\"}[$__rate_interval]))",
        "histogram_quantile(0.99, sum by (le) (rate(nacos_replicator_lag_seconds_bucket[5m])))",
        "{__name__=\"nacos_replicator_ready\"}",
    ];
    for expr in fine {
        assert_eq!(problems(expr, &metrics), Vec::<String>::new(), "{expr}");
    }
    let broken = [
        (
            "rate(nacos_replicator_publishes_total[5m]",
            "does not parse",
        ),
        ("nacos_replicator_readyy", "no such metric"),
        ("nacos_replicator_publishes", "no such metric"),
        (
            "rate(nacos_replicator_lag_seconds_total[5m])",
            "no such metric",
        ),
        (
            "nacos_replicator_publishes_total{outcome=\"failed\"}",
            "no sample selected",
        ),
        ("rate(nacos_replicator_ready[$__bogus])", "does not parse"),
        ("vector(1)", "selects no metric"),
    ];
    for (expr, why) in broken {
        let found = problems(expr, &metrics);
        assert!(found.iter().any(|p| p.contains(why)), "{expr}: {found:?}");
    }
}

fn orders() -> ServiceKey {
    ServiceKey::new(DEFAULT_NAMESPACE, DEFAULT_GROUP, "orders")
}

fn payments() -> ServiceKey {
    ServiceKey::new(DEFAULT_NAMESPACE, DEFAULT_GROUP, "payments")
}

/// Waits until `/metrics` has a line starting with `prefix`; returns the text.
async fn metric_line(status: std::net::SocketAddr, prefix: &str, deadline: Duration) -> String {
    let prefix = prefix.to_owned();
    eventually(&format!("a metric line {prefix}"), deadline, || {
        let prefix = prefix.clone();
        async move {
            let (_, body) = http_get(status, "/metrics").await?;
            body.lines().any(|l| l.starts_with(&prefix)).then_some(body)
        }
    })
    .await
}

/// Makes the destination fail its next naming call with `code`, then changes
/// `orders` at the source, until `/metrics` shows a publish with `outcome`.
/// (The failure can land on a read-back query instead; then it is tried again.)
async fn provoke_publish(
    a_app: &Client,
    b: &FakeNacos,
    status: std::net::SocketAddr,
    code: i32,
    outcome: &str,
    version: &mut u32,
) {
    let line = format!(
        "nacos_replicator_publishes_total{{cluster=\"b\",namespace=\"public\",outcome=\"{outcome}\"}}"
    );
    for _ in 0..5 {
        b.fail_next(1, code);
        *version += 1;
        let natives = vec![
            Instance::new("10.0.0.1", 80).with_metadata("version", version.to_string()),
            Instance::new("10.0.0.2", 80),
        ];
        a_app
            .publish(DEFAULT_GROUP, "orders", natives)
            .await
            .expect("change at the source");
        let seen =
            tokio::time::timeout(Duration::from_secs(5), metric_line(status, &line, DEADLINE))
                .await;
        if seen.is_ok() {
            return;
        }
    }
    panic!("never saw {line}");
}

/// Replication, a skipped native, a retried and a refused publish, and a
/// replica forgotten by the destination (found and repaired by the read-back).
async fn drive(a_app: &Client, b: &FakeNacos, status: std::net::SocketAddr) {
    eventually("/readyz says ready", DEADLINE, || async move {
        http_get(status, "/readyz").await.filter(|(c, _)| *c == 200)
    })
    .await;
    eventually("orders and payments replicated", DEADLINE, || {
        let n = (b.instances(&orders()).len(), b.instances(&payments()).len());
        async move { (n == (2, 1)).then_some(()) }
    })
    .await;
    let mut version = 0;
    provoke_publish(a_app, b, status, 500, "retried", &mut version).await;
    provoke_publish(a_app, b, status, 400, "failed", &mut version).await;
    assert_eq!(b.forget(&payments()), 1, "the agent's set of payments");
    metric_line(
        status,
        "nacos_replicator_drift_repaired_total{cluster=\"b\"",
        Duration::from_secs(30),
    )
    .await;
    eventually("payments back in b", DEADLINE, || {
        let n = b.instances(&payments()).len();
        async move { (n == 1).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_the_alerts_use_is_exported() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&monitoring_file("dashboard.json")).expect("dashboard.json is JSON");
    let rules: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&monitoring_file("alerts.yaml")).expect("alerts.yaml is YAML");
    assert_eq!(rule_shape(&rules), Vec::<String>::new(), "alerts.yaml");
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, "dashboard.json", &mut exprs);
    exprs.extend(rule_exprs(&rules));

    let (a, b) = (
        FakeNacos::start(FakeOptions::default()).await.expect("a"),
        FakeNacos::start(FakeOptions::default()).await.expect("b"),
    );
    let apps = Tasks::default();
    let a_app = Client::start(
        ClientConfig::new("app", vec![a.addr()], DEFAULT_NAMESPACE),
        &apps,
    )
    .expect("valid config");
    a_app.wait_connected(DEADLINE).await.expect("app connects");
    // No room left for the origin tag: skipped, and counted.
    let big = Instance::new("10.0.0.9", 80).with_metadata("blob", "x".repeat(1016));
    for (name, natives) in [
        (
            "orders",
            vec![Instance::new("10.0.0.1", 80), Instance::new("10.0.0.2", 80)],
        ),
        ("payments", vec![Instance::new("10.0.0.3", 80)]),
        ("big", vec![big]),
    ] {
        a_app
            .publish(DEFAULT_GROUP, name, natives)
            .await
            .expect("natives");
    }
    let status = free_local_addr();
    let config = AgentToml::new()
        .timings("resync_interval = \"1s\"\n")
        .cluster("a", &a.addr(), &[DEFAULT_NAMESPACE])
        .cluster("b", &b.addr(), &[DEFAULT_NAMESPACE])
        .route("a", "b")
        .config();
    let token = CancellationToken::new();
    let agent = Agent::new(config).with_status_server(status);
    let running = tokio::spawn(agent.run(token.clone()));

    drive(&a_app, &b, status).await;
    let (_, text) = http_get(status, "/metrics").await.expect("metrics");
    let metrics = exposition(&text).expect("the agent's exposition parses");
    let mut wrong = BTreeSet::new();
    for (at, expr) in &exprs {
        for p in problems(expr, &metrics) {
            wrong.insert(format!("{at}: `{expr}`: {p}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} problems:\n{}\n\n/metrics:\n{text}",
        wrong.len(),
        wrong.into_iter().collect::<Vec<_>>().join("\n")
    );
    // Both files were read: the dashboard's panels and every rule.
    assert!(exprs.len() >= 20, "{} expressions", exprs.len());

    token.cancel();
    running.await.expect("no panic").expect("the agent ran");
    apps.shutdown(Duration::from_secs(2)).await;
}
