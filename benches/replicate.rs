//! The replication benchmark: one source region of N services x M
//! instances, one destination region, the agent in its own process between
//! them, churn at a given rate. Prints time to initial full sync, the
//! agent-added latency (push receipt to destination ack: p50, p99, max),
//! the end-to-end lag (publish at the origin to visibility for a subscriber
//! in the destination) next to Nacos' own push delay (publish to visibility
//! for a subscriber in the origin), the changes per second sustained, and
//! the agent process' CPU seconds, peak RSS and idle CPU after settling.
//!
//! ```sh
//! cargo bench --bench replicate -- --backend real --services 1000 --instances 5 --churn 50
//! cargo bench --bench replicate -- --json     # one JSON object on stdout
//! ```
//!
//! The agent runs as a child process (this binary re-executed in `agent`
//! mode) so its CPU and memory are its own: the load generator, the
//! subscribers and any in-process server stay out of the figures. Figures
//! are printed, never asserted: a benchmark is not a test.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use futures_util::StreamExt;
use nacos_replicator::agent::Agent;
use nacos_replicator::cluster::{Client, ClientConfig};
use nacos_replicator::model::{DEFAULT_GROUP, Instance};
use nacos_replicator::runtime::Tasks;
use nacos_replicator::telemetry::Event;
use nacos_replicator::testing::fake::{FakeNacos, FakeOptions};
use nacos_replicator::testing::nacos::{Distribution, NacosServer, ServerOptions};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(about = "Replication benchmark: initial sync, latency, lag, CPU and memory")]
struct Args {
    #[command(subcommand)]
    mode: Option<Mode>,
    /// Which servers play the regions.
    #[arg(long, value_enum, default_value_t = Backend::Real)]
    backend: Backend,
    /// Services in the source region.
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// Instances per service.
    #[arg(long, default_value_t = 5)]
    instances: usize,
    /// Changes per second during the churn phase (one change = one service republished).
    #[arg(long, default_value_t = 50)]
    churn: u32,
    /// Length of the churn phase, seconds.
    #[arg(long, default_value_t = 20)]
    churn_seconds: u64,
    /// Services followed by the lag subscribers (a change is picked among them).
    #[arg(long, default_value_t = 100)]
    watched: usize,
    /// Seconds of idleness over which idle CPU is measured.
    #[arg(long, default_value_t = 10)]
    idle_seconds: u64,
    /// The agent's runtime worker threads, as `nacos-replicator run
    /// --worker-threads` takes them: 1 (the binary's default) is Tokio's
    /// current-thread runtime.
    #[arg(long, default_value_t = 1)]
    agent_threads: usize,
    /// Print one JSON object instead of the human summary.
    #[arg(long)]
    json: bool,
    /// `cargo bench` passes `--bench`. Without it (as `cargo test
    /// --all-targets` runs this binary) a small smoke profile runs on the
    /// testkit server instead, so the suite proves the benchmark works.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Subcommand)]
enum Mode {
    /// (internal) Run the agent for CONFIG, report events on stdout.
    Agent {
        /// Configuration file.
        config: PathBuf,
        /// Runtime worker threads; 1 is Tokio's current-thread runtime.
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Backend {
    /// Real Nacos 2.x servers started by the test harness.
    Real,
    /// The in-process testkit server (isolates the agent's own cost).
    Testkit,
}

/// The same allocator as the `nacos-replicator` binary, so the agent child
/// measures what the binary would.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if !args.bench && args.mode.is_none() {
        args = Args {
            backend: Backend::Testkit,
            services: 20,
            instances: 2,
            churn: 20,
            churn_seconds: 1,
            watched: 10,
            idle_seconds: 1,
            ..args
        };
    }
    match &args.mode {
        Some(Mode::Agent { config, threads }) => {
            // As `nacos-replicator run --worker-threads` builds it.
            let runtime = match threads {
                0 | 1 => tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?,
                n => tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(*n)
                    .enable_all()
                    .build()?,
            };
            runtime.block_on(agent_mode(config))
        }
        None => tokio::runtime::Runtime::new()?.block_on(bench(&args)),
    }
}

/// The child: runs the agent and reports, one line each, `ready <ms>` and
/// `lag <us>` for every acknowledged change. Ends when stdin closes (the
/// parent is gone or done).
async fn agent_mode(config: &Path) -> anyhow::Result<()> {
    let env = |_: &str| None;
    let config = nacos_replicator::config::load(config, &env)?;
    let agent = Agent::new(config);
    let mut events = agent.events();
    let token = CancellationToken::new();
    let started = Instant::now();
    let run = tokio::spawn(agent.run(token.clone()));
    let stop = token.clone();
    std::thread::spawn(move || {
        let mut sink = String::new();
        while std::io::stdin()
            .read_line(&mut sink)
            .map(|n| n > 0)
            .unwrap_or(false)
        {}
        stop.cancel();
    });
    // Lines are written every 50 ms, not one write per change: a write per
    // change would add a syscall to every change the figures divide by.
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut flush = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            () = token.cancelled() => break,
            _ = flush.tick() => out.flush()?,
            e = events.recv() => match e {
                Ok(Event::Ready) => {
                    writeln!(out, "ready {}", started.elapsed().as_millis())?;
                    out.flush()?;
                }
                Ok(Event::Replicated { lag: Some(lag), .. } | Event::Withdrawn { lag: Some(lag), .. }) => {
                    writeln!(out, "lag {}", lag.as_micros())?;
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => writeln!(out, "missed {n}")?,
                Err(_) => break,
            },
        }
    }
    out.flush()?;
    run.await??;
    Ok(())
}

/// The agent child and what it reported.
struct AgentProcess {
    child: Child,
    ready_ms: Arc<Mutex<Option<u64>>>,
    lags_us: Arc<Mutex<Vec<u64>>>,
}

impl AgentProcess {
    fn spawn(config: &Path, threads: usize) -> anyhow::Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("agent")
            .arg(config)
            .arg("--threads")
            .arg(threads.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the agent process")?;
        let stdout = child.stdout.take().context("agent stdout")?;
        let (ready_ms, lags_us) = (Arc::new(Mutex::new(None)), Arc::new(Mutex::new(Vec::new())));
        let (r, l) = (ready_ms.clone(), lags_us.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                match line.split_once(' ') {
                    Some(("ready", ms)) => *lock(&r) = ms.parse().ok(),
                    Some(("lag", us)) => lock(&l).extend(us.parse::<u64>().ok()),
                    _ => {}
                }
            }
        });
        Ok(Self {
            child,
            ready_ms,
            lags_us,
        })
    }

    /// CPU seconds (user + system) so far, from /proc.
    fn cpu_seconds(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).ok()?;
        // Fields after the command name (which may hold spaces) start at ')'.
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 =
            fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        Some(ticks / clock_ticks())
    }

    /// Peak resident set size, bytes.
    fn peak_rss(&self) -> Option<u64> {
        self.status_kib("VmHWM:").map(|k| k * 1024)
    }

    /// Resident set size now, bytes.
    fn rss(&self) -> Option<u64> {
        self.status_kib("VmRSS:").map(|k| k * 1024)
    }

    fn status_kib(&self, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with(field))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok()
    }

    fn lags(&self) -> Vec<u64> {
        lock(&self.lags_us).clone()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

fn clock_ticks() -> f64 {
    rustix::param::clock_ticks_per_second() as f64
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Two regions: addresses as `host:http_port`, and whatever keeps them up.
struct Regions {
    source: String,
    destination: String,
    _servers: Vec<NacosServer>,
    _fakes: Vec<FakeNacos>,
}

async fn start_regions(backend: Backend) -> anyhow::Result<Regions> {
    match backend {
        Backend::Testkit => {
            let (a, b) = (
                FakeNacos::start(FakeOptions::default()).await?,
                FakeNacos::start(FakeOptions::default()).await?,
            );
            Ok(Regions {
                source: a.addr(),
                destination: b.addr(),
                _servers: Vec::new(),
                _fakes: vec![a, b],
            })
        }
        Backend::Real => {
            let root = Path::new(env!("CARGO_MANIFEST_DIR"));
            let dist = Distribution::resolve(
                &root.join("target/nacos-server"),
                &root.join("testing/nacos-2.3/pom.xml"),
            )?;
            let opts = || ServerOptions {
                heap_max_mib: 1024,
                ..ServerOptions::default()
            };
            let (a, b) = std::thread::scope(|s| {
                let a = s.spawn(|| NacosServer::start(&dist, opts()));
                let b = s.spawn(|| NacosServer::start(&dist, opts()));
                (a.join(), b.join())
            });
            let (Ok(a), Ok(b)) = (a, b) else {
                bail!("a server start thread panicked")
            };
            let (a, b) = (a?, b?);
            Ok(Regions {
                source: format!("127.0.0.1:{}", a.http_port()),
                destination: format!("127.0.0.1:{}", b.http_port()),
                _servers: vec![a, b],
                _fakes: Vec::new(),
            })
        }
    }
}

fn service_name(i: usize) -> String {
    format!("svc-{i:05}")
}

/// The instances of service `i` at version `v`.
fn instances(i: usize, m: usize, v: u64) -> Vec<Instance> {
    (0..m)
        .map(|k| {
            Instance::new(format!("10.{}.{}.{}", (i >> 8) & 255, i & 255, k + 1), 8080)
                .with_metadata("v", v.to_string())
                .with_metadata("app", "bench")
        })
        .collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn summary(values_ms: &mut [f64]) -> serde_json::Value {
    values_ms.sort_by(f64::total_cmp);
    serde_json::json!({
        "count": values_ms.len(),
        "p50_ms": percentile(values_ms, 50.0),
        "p99_ms": percentile(values_ms, 99.0),
        "max_ms": values_ms.last().copied().unwrap_or(f64::NAN),
    })
}

/// Follows `watched` services through one client and records, per
/// (service, version), when a snapshot showing that version in full first
/// arrived.
fn follow(
    client: &Client,
    names: Vec<String>,
    m: usize,
) -> Arc<Mutex<HashMap<(String, u64), Instant>>> {
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let (client, out) = (client.clone(), seen.clone());
    tokio::spawn(async move {
        let mut streams = futures_util::stream::SelectAll::new();
        for name in names {
            match client.subscribe(DEFAULT_GROUP, &name).await {
                Ok(s) => streams.push(s),
                Err(e) => eprintln!("subscribe {name}: {e}"),
            }
        }
        while let Some(snapshot) = streams.next().await {
            let versions: Vec<&str> = snapshot
                .instances
                .iter()
                .filter_map(|i| i.metadata.get("v"))
                .collect();
            if versions.len() == m
                && let Some(v) = versions.first().and_then(|v| v.parse::<u64>().ok())
                && versions.iter().all(|x| x.parse::<u64>().ok() == Some(v))
            {
                lock(&out)
                    .entry((snapshot.service.name.to_string(), v))
                    .or_insert_with(Instant::now);
            }
        }
    });
    seen
}

async fn bench(args: &Args) -> anyhow::Result<()> {
    let (n, m) = (args.services, args.instances);
    let say = |s: &str| {
        if !args.json {
            eprintln!("{s}")
        }
    };
    say(&format!(
        "starting two regions ({})...",
        if args.backend == Backend::Real {
            "real Nacos"
        } else {
            "testkit"
        }
    ));
    let regions = start_regions(args.backend).await?;
    let tasks = Tasks::default();
    let _stop = tasks.token().clone().drop_guard();
    let client = |addr: &str| {
        Client::start(
            ClientConfig::new("bench", vec![addr.to_owned()], "public"),
            &tasks,
        )
    };

    // Populate the source: a few application connections share the services.
    say(&format!(
        "registering {n} services x {m} instances in the source..."
    ));
    let apps: Vec<Client> = (0..4)
        .map(|_| client(&regions.source))
        .collect::<Result<_, _>>()?;
    for a in &apps {
        a.wait_connected(Duration::from_secs(30)).await?;
    }
    let populate = Instant::now();
    let mut tasks = Vec::new();
    for (k, app) in apps.iter().enumerate() {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            for i in (k..n).step_by(4) {
                app.publish(DEFAULT_GROUP, &service_name(i), instances(i, m, 0))
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    say(&format!(
        "  registered in {:.1} s",
        populate.elapsed().as_secs_f64()
    ));

    // The agent, in its own process.
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("bench.toml");
    std::fs::write(
        &config,
        format!(
            "[timings]\n\
             [[clusters]]\nid = \"src\"\nservers = [\"{}\"]\n\
             [[clusters]]\nid = \"dst\"\nservers = [\"{}\"]\n\
             [[routes]]\nfrom = \"src\"\nto = \"dst\"\n",
            regions.source, regions.destination
        ),
    )?;
    say("starting the agent...");
    let started = Instant::now();
    let agent = AgentProcess::spawn(&config, args.agent_threads)?;
    let ready_ms = loop {
        if let Some(ms) = *lock(&agent.ready_ms) {
            break ms;
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("no full sync within 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let sync_cpu = agent.cpu_seconds().unwrap_or(f64::NAN);
    say(&format!(
        "  initial full sync of {} instances: {:.2} s",
        n * m,
        ready_ms as f64 / 1000.0
    ));

    // Subscribers: in the destination (end-to-end) and in the source (Nacos' own delay).
    let watched: Vec<String> = (0..args.watched.min(n)).map(service_name).collect();
    let dst_reader = client(&regions.destination)?;
    let src_reader = client(&regions.source)?;
    dst_reader.wait_connected(Duration::from_secs(30)).await?;
    src_reader.wait_connected(Duration::from_secs(30)).await?;
    let seen_dst = follow(&dst_reader, watched.clone(), m);
    let seen_src = follow(&src_reader, watched.clone(), m);
    // Every watched service visible at version 0 on both sides first.
    let deadline = Instant::now() + Duration::from_secs(120);
    while lock(&seen_dst).len() < watched.len() || lock(&seen_src).len() < watched.len() {
        if Instant::now() > deadline {
            bail!("watched services not all visible at version 0");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Churn: one change = one watched service republished at a new version.
    say(&format!(
        "churn: {} changes/s for {} s...",
        args.churn, args.churn_seconds
    ));
    let lags_before = agent.lags().len();
    let cpu_before = agent.cpu_seconds().unwrap_or(f64::NAN);
    let mut sent: HashMap<(String, u64), Instant> = HashMap::new();
    let mut version: HashMap<usize, u64> = HashMap::new();
    let period = Duration::from_secs_f64(1.0 / f64::from(args.churn.max(1)));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let churn_start = Instant::now();
    let total = u64::from(args.churn) * args.churn_seconds;
    for c in 0..total {
        tick.tick().await;
        let i = (c as usize) % watched.len().max(1);
        let v = version.entry(i).or_insert(0);
        *v += 1;
        let app = &apps[i % apps.len()];
        sent.insert((service_name(i), *v), Instant::now());
        app.publish(DEFAULT_GROUP, &service_name(i), instances(i, m, *v))
            .await?;
    }
    let churn_took = churn_start.elapsed();
    // Wait for the last version of each watched service to arrive.
    let last: Vec<(String, u64)> = version
        .iter()
        .map(|(i, v)| (service_name(*i), *v))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !last.iter().all(|k| lock(&seen_dst).contains_key(k)) {
        if Instant::now() > deadline {
            bail!("the destination never showed the last versions");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained = churn_start.elapsed();
    let churn_cpu = agent.cpu_seconds().unwrap_or(f64::NAN) - cpu_before;

    // Idle: settled, nothing changing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_before = agent.cpu_seconds().unwrap_or(f64::NAN);
    tokio::time::sleep(Duration::from_secs(args.idle_seconds)).await;
    let idle_cpu =
        (agent.cpu_seconds().unwrap_or(f64::NAN) - idle_before) / args.idle_seconds as f64;

    let lag_of = |seen: &HashMap<(String, u64), Instant>| -> Vec<f64> {
        sent.iter()
            .filter_map(|(k, t0)| {
                seen.get(k)
                    .map(|t| t.saturating_duration_since(*t0).as_secs_f64() * 1000.0)
            })
            .collect()
    };
    let mut e2e = lag_of(&lock(&seen_dst));
    let mut nacos = lag_of(&lock(&seen_src));
    let mut added: Vec<f64> = agent.lags()[lags_before..]
        .iter()
        .map(|us| *us as f64 / 1000.0)
        .collect();
    let report = serde_json::json!({
        "backend": if args.backend == Backend::Real { "real" } else { "testkit" },
        "services": n, "instances_per_service": m, "instances": n * m,
        "initial_sync_s": ready_ms as f64 / 1000.0,
        "initial_sync_cpu_s": sync_cpu,
        "initial_sync_cpu_us_per_instance": sync_cpu * 1e6 / (n * m).max(1) as f64,
        "agent_threads": args.agent_threads,
        "churn": { "target_per_s": args.churn, "changes": total, "sent_in_s": churn_took.as_secs_f64(),
                   "drained_in_s": drained.as_secs_f64(), "sustained_per_s": total as f64 / drained.as_secs_f64(),
                   "agent_cpu_s": churn_cpu,
                   "agent_cpu_us_per_change": churn_cpu * 1e6 / total.max(1) as f64 },
        "agent_added_latency": summary(&mut added),
        "end_to_end_lag": summary(&mut e2e),
        "nacos_push_delay": summary(&mut nacos),
        "agent_cpu_s_total": agent.cpu_seconds(),
        "agent_peak_rss_mib": agent.peak_rss().map(|b| b as f64 / 1_048_576.0),
        "agent_settled_rss_mib": agent.rss().map(|b| b as f64 / 1_048_576.0),
        "agent_idle_cpu_percent_of_core": idle_cpu * 100.0,
        "machine": machine(),
    });
    if args.json {
        println!("{report}");
    } else {
        print_human(&report);
    }
    Ok(())
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_default();
    format!("{cpus} CPU(s), {model}")
}

fn print_human(r: &serde_json::Value) {
    let f = |v: &serde_json::Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.2}"));
    let lat = |name: &str, v: &serde_json::Value| {
        println!(
            "{name:<34} p50 {:>8} ms  p99 {:>8} ms  max {:>8} ms  (n={})",
            f(&v["p50_ms"]),
            f(&v["p99_ms"]),
            f(&v["max_ms"]),
            v["count"]
        );
    };
    println!(
        "backend {}  |  {} services x {} instances = {}  |  {}",
        r["backend"], r["services"], r["instances_per_service"], r["instances"], r["machine"]
    );
    println!(
        "{:<34} {} s (agent CPU {} s, {} us per instance; {} runtime thread(s))",
        "initial full sync",
        f(&r["initial_sync_s"]),
        f(&r["initial_sync_cpu_s"]),
        f(&r["initial_sync_cpu_us_per_instance"]),
        r["agent_threads"]
    );
    let c = &r["churn"];
    println!(
        "{:<34} {} changes at {}/s: sent in {} s, drained in {} s -> {} changes/s (agent CPU {} s, {} us per change)",
        "churn",
        c["changes"],
        c["target_per_s"],
        f(&c["sent_in_s"]),
        f(&c["drained_in_s"]),
        f(&c["sustained_per_s"]),
        f(&c["agent_cpu_s"]),
        f(&c["agent_cpu_us_per_change"])
    );
    lat("agent-added (push -> dest ack)", &r["agent_added_latency"]);
    lat("end-to-end (origin -> dest sub)", &r["end_to_end_lag"]);
    lat("Nacos' own (origin -> origin sub)", &r["nacos_push_delay"]);
    println!("{:<34} {} s", "agent CPU total", f(&r["agent_cpu_s_total"]));
    println!(
        "{:<34} {} MiB (settled {} MiB)",
        "agent peak RSS",
        f(&r["agent_peak_rss_mib"]),
        f(&r["agent_settled_rss_mib"])
    );
    println!(
        "{:<34} {} % of a core",
        "agent idle CPU",
        f(&r["agent_idle_cpu_percent_of_core"])
    );
}
