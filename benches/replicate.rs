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
//! cargo bench --bench replicate -- --profile 100k   # 10,000 x 10 on the testkit, with the sweep
//! cargo bench --bench replicate -- --profile 1m     # 100,000 x 10 on the testkit
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
    /// Services created in the source after the churn, one at a time at
    /// random moments: the time from each creation to its replicas showing
    /// to a subscriber in the destination is the discovery latency.
    #[arg(long, default_value_t = 20)]
    new_services: usize,
    /// Catalog probes (as the watcher sends them between listings) timed
    /// against the source, with the server's CPU per probe on real Nacos.
    #[arg(long, default_value_t = 1000)]
    probes: usize,
    /// After the churn, offer rising rates (1,000 to 80,000 changes/s) for
    /// `--sweep-seconds` each, up to the first whose agent-added p99 reaches
    /// 10 ms or that the agent drains at under 90% of the offer: the last
    /// rate within both is the saturation point.
    #[arg(long)]
    sweep: bool,
    /// Length of each sweep phase, seconds.
    #[arg(long, default_value_t = 5)]
    sweep_seconds: u64,
    /// A preset of sizes (flags given on the command line win over it).
    #[arg(long, value_enum)]
    profile: Option<Profile>,
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

/// Benchmark presets: the testkit server, so the agent's own cost shows.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Profile {
    /// 20 services x 2 instances, a second of churn: what `cargo test` runs.
    Smoke,
    /// 10,000 services x 10 instances, 1,000 changes/s for 10 s, saturation sweep.
    #[value(name = "100k")]
    HundredThousand,
    /// 100,000 services x 10 instances (1,000,000), 1,000 changes/s for 10 s.
    #[value(name = "1m")]
    Million,
}

impl Profile {
    /// Sets what the command line left at its default.
    fn apply(self, args: &mut Args, matches: &clap::ArgMatches) {
        let given =
            |id: &str| matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
        let (
            services,
            instances,
            churn,
            churn_seconds,
            watched,
            idle_seconds,
            new_services,
            probes,
        ) = match self {
            Self::Smoke => (20, 2, 20, 1, 10, 1, 2, 5),
            Self::HundredThousand => (10_000, 10, 1_000, 10, 1_000, 10, 20, 1_000),
            Self::Million => (100_000, 10, 1_000, 10, 1_000, 10, 20, 1_000),
        };
        macro_rules! preset {
            ($($field:ident),*) => {$(
                if !given(stringify!($field)) {
                    args.$field = $field;
                }
            )*};
        }
        preset!(
            services,
            instances,
            churn,
            churn_seconds,
            watched,
            idle_seconds,
            new_services,
            probes
        );
        if !given("backend") {
            args.backend = Backend::Testkit;
        }
        if self == Self::HundredThousand && !given("sweep") {
            args.sweep = true;
        }
    }
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
    use clap::{CommandFactory, FromArgMatches};
    let matches = Args::command().get_matches();
    let mut args = Args::from_arg_matches(&matches)?;
    if !args.bench && args.mode.is_none() {
        args.profile = Some(Profile::Smoke);
    }
    if let Some(profile) = args.profile {
        profile.apply(&mut args, &matches);
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
        process_cpu_seconds(self.child.id())
    }

    /// CPU time by kind and thread switches so far, from /proc.
    fn usage(&self) -> Option<Usage> {
        Usage::of(self.child.id())
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
    /// The source server's java process, when it is a real server.
    source_pid: Option<u32>,
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
                source_pid: None,
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
                source_pid: a.java_pid(),
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
/// arrived. Returns once every subscription is made.
async fn follow(
    client: &Client,
    names: Vec<String>,
    m: usize,
) -> Arc<Mutex<HashMap<(String, u64), Instant>>> {
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let mut streams = futures_util::stream::SelectAll::new();
    for name in names {
        match client.subscribe(DEFAULT_GROUP, &name).await {
            Ok(s) => streams.push(s),
            Err(e) => eprintln!("subscribe {name}: {e}"),
        }
    }
    let out = seen.clone();
    tokio::spawn(async move {
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
    let seen_dst = follow(&dst_reader, watched.clone(), m).await;
    let seen_src = follow(&src_reader, watched.clone(), m).await;
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
    let mut versions: HashMap<usize, u64> = HashMap::new();
    let main = churn(
        &Load {
            apps: &apps,
            watched: watched.len(),
            m,
            agent: &agent,
            seen: &seen_dst,
        },
        &mut versions,
        args.churn,
        args.churn_seconds,
    )
    .await?;

    // Idle: settled, nothing changing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_before = agent.cpu_seconds().unwrap_or(f64::NAN);
    tokio::time::sleep(Duration::from_secs(args.idle_seconds)).await;
    let idle_cpu =
        (agent.cpu_seconds().unwrap_or(f64::NAN) - idle_before) / args.idle_seconds as f64;

    let mut sweep = Vec::new();
    if args.sweep {
        let load = Load {
            apps: &apps,
            watched: watched.len(),
            m,
            agent: &agent,
            seen: &seen_dst,
        };
        let cores = std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64);
        for rate in SWEEP_RATES {
            say(&format!(
                "sweep: {rate} changes/s for {} s...",
                args.sweep_seconds
            ));
            let mut phase = churn(&load, &mut versions, rate, args.sweep_seconds).await?;
            let p99 = percentile_of(&mut phase.added, 99.0);
            let drained = phase.sustained_per_s() >= 0.9 * f64::from(rate);
            // A generator that could not offer the rate says nothing of the
            // agent: the sweep ends there, the point found so far a floor.
            let offered = phase.sent_per_s() >= 0.9 * f64::from(rate);
            sweep.push(serde_json::json!({
                "offered_per_s": rate, "sent_per_s": phase.sent_per_s(),
                "sustained_per_s": phase.sustained_per_s(),
                "agent_added_p99_ms": p99, "agent_cpu_us_per_change": phase.cpu_us_per_change(),
                "agent_per_change": phase.per_change(),
                "load_cpu_cores": phase.load_cpu_s / phase.drained_in_s,
                "agent_cpu_cores": phase.cpu_s / phase.drained_in_s,
                // The agent and the load side together near every core: the
                // machine, not the agent alone, set this phase's figures.
                "machine_full": (phase.cpu_s + phase.load_cpu_s) / phase.drained_in_s
                    >= 0.9 * cores,
                "within": offered && drained && p99 < 10.0,
                "generator_bound": !offered,
            }));
            if !(offered && drained && p99 < 10.0) {
                break;
            }
        }
    }
    let saturation = sweep
        .iter()
        .take_while(|p| p["within"] == true)
        .last()
        .map(|p| p["offered_per_s"].clone());

    say(&format!(
        "discovery: {} services created one at a time...",
        args.new_services
    ));
    let mut discovery = discover(args, &apps[0], &dst_reader).await?;
    say(&format!("probe cost: {} catalog probes...", args.probes));
    let probing = probe_cost(args, &src_reader, regions.source_pid).await?;

    let lag_of = |sent: &HashMap<(String, u64), Instant>,
                  seen: &HashMap<(String, u64), Instant>|
     -> Vec<f64> {
        sent.iter()
            .filter_map(|(k, t0)| {
                seen.get(k)
                    .map(|t| t.saturating_duration_since(*t0).as_secs_f64() * 1000.0)
            })
            .collect()
    };
    let mut e2e = lag_of(&main.sent, &lock(&seen_dst));
    let mut nacos = lag_of(&main.sent, &lock(&seen_src));
    let mut added = main.added.clone();
    let report = serde_json::json!({
        "backend": if args.backend == Backend::Real { "real" } else { "testkit" },
        "services": n, "instances_per_service": m, "instances": n * m,
        "initial_sync_s": ready_ms as f64 / 1000.0,
        "initial_sync_cpu_s": sync_cpu,
        "initial_sync_cpu_us_per_instance": sync_cpu * 1e6 / (n * m).max(1) as f64,
        "agent_threads": args.agent_threads,
        "churn": { "target_per_s": args.churn, "changes": main.changes, "sent_in_s": main.sent_in_s,
                   "drained_in_s": main.drained_in_s, "sustained_per_s": main.sustained_per_s(),
                   "agent_cpu_s": main.cpu_s, "load_cpu_s": main.load_cpu_s,
                   "agent_cpu_us_per_change": main.cpu_us_per_change(),
                   "agent_per_change": main.per_change() },
        "sweep": sweep,
        "saturation_per_s": saturation,
        "agent_added_latency": summary(&mut added),
        "end_to_end_lag": summary(&mut e2e),
        "nacos_push_delay": summary(&mut nacos),
        "agent_cpu_s_total": agent.cpu_seconds(),
        "agent_peak_rss_mib": agent.peak_rss().map(|b| b as f64 / 1_048_576.0),
        "agent_settled_rss_mib": agent.rss().map(|b| b as f64 / 1_048_576.0),
        "agent_idle_cpu_percent_of_core": idle_cpu * 100.0,
        "discovery": summary(&mut discovery),
        "catalog_probe": probing,
        "machine": machine(),
    });
    if args.json {
        println!("{report}");
    } else {
        print_human(&report);
    }
    Ok(())
}

/// The offered rates of `--sweep`, in order; it stops at the first one
/// the agent does not keep within bounds.
const SWEEP_RATES: [u32; 7] = [1_000, 2_000, 5_000, 10_000, 20_000, 40_000, 80_000];

/// What a churn phase drives and reads.
struct Load<'a> {
    apps: &'a [Client],
    /// Changes go round the first `watched` services.
    watched: usize,
    m: usize,
    agent: &'a AgentProcess,
    seen: &'a Mutex<HashMap<(String, u64), Instant>>,
}

/// One churn phase's figures.
struct Churn {
    changes: u64,
    sent_in_s: f64,
    drained_in_s: f64,
    cpu_s: f64,
    /// The agent's CPU split by kind, and its thread switches, over the phase.
    agent: Usage,
    /// CPU of this process (load generator, subscribers, testkit servers)
    /// over the phase: near the core count, the machine, not the agent, is full.
    load_cpu_s: f64,
    /// Agent-added latency of every change acknowledged in the phase, ms.
    added: Vec<f64>,
    /// When each (service, version) was published at the origin.
    sent: HashMap<(String, u64), Instant>,
}

impl Churn {
    fn sustained_per_s(&self) -> f64 {
        self.changes as f64 / self.drained_in_s
    }

    /// The rate the load generator actually offered.
    fn sent_per_s(&self) -> f64 {
        self.changes as f64 / self.sent_in_s
    }

    fn cpu_us_per_change(&self) -> f64 {
        self.cpu_s * 1e6 / self.changes.max(1) as f64
    }

    /// The agent's user and kernel CPU per change (us), and how often per
    /// change its threads went to sleep (waiting for the network or a timer)
    /// and were preempted: what a change costs beyond the agent's own code.
    fn per_change(&self) -> serde_json::Value {
        let n = self.changes.max(1) as f64;
        serde_json::json!({
            "user_us": self.agent.user_s * 1e6 / n,
            "system_us": self.agent.system_s * 1e6 / n,
            "sleeps": self.agent.voluntary as f64 / n,
            "preemptions": self.agent.involuntary as f64 / n,
        })
    }
}

/// `rate` changes per second for `seconds`, one change = one watched
/// service republished at its next version; each application connection
/// publishes its own services on its own ticker. A change is sent when it
/// is due, whether or not earlier ones are answered (a generator that waits
/// for each answer offers at most one change per round trip per connection,
/// which capped the sweep at ~2,500/s here), except that a service waits for
/// its own previous version's answer, so its versions land in order. Ends
/// when the destination shows every service's last version.
async fn churn(
    load: &Load<'_>,
    versions: &mut HashMap<usize, u64>,
    rate: u32,
    seconds: u64,
) -> anyhow::Result<Churn> {
    let (lags_before, usage_before) = (load.agent.lags().len(), load.agent.usage());
    let load_cpu_before = process_cpu_seconds(std::process::id());
    let total = u64::from(rate) * seconds;
    let apps = load.apps.len().max(1);
    let sent = Arc::new(Mutex::new(HashMap::new()));
    // Change c (service c mod watched, its next version) is due at c / rate
    // seconds; service i is always published by connection i mod apps.
    let mut shares: Vec<Vec<(Duration, usize, u64)>> = vec![Vec::new(); apps];
    for c in 0..total {
        let i = (c as usize) % load.watched.max(1);
        let v = versions.entry(i).or_insert(0);
        *v += 1;
        let due = Duration::from_secs_f64(c as f64 / f64::from(rate.max(1)));
        shares[i % apps].push((due, i, *v));
    }
    let start = tokio::time::Instant::now();
    let mut workers = Vec::new();
    for (app, mine) in load.apps.iter().zip(shares) {
        let (app, sent, m) = (app.clone(), sent.clone(), load.m);
        workers.push(tokio::spawn(async move {
            let mut in_flight = futures_util::stream::FuturesUnordered::new();
            let mut busy = std::collections::HashSet::new();
            for (due, i, v) in mine {
                // Until it is due and its service is free, reading answers.
                loop {
                    let free = !busy.contains(&i);
                    tokio::select! {
                        Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                            busy.remove(&done?);
                        }
                        () = tokio::time::sleep_until(start + due), if free => break,
                        else => break,
                    }
                }
                lock(&sent).insert((service_name(i), v), Instant::now());
                busy.insert(i);
                let app = app.clone();
                in_flight.push(async move {
                    app.publish(DEFAULT_GROUP, &service_name(i), instances(i, m, v))
                        .await
                        .map(|()| i)
                });
            }
            while let Some(done) = in_flight.next().await {
                done?;
            }
            anyhow::Ok(())
        }));
    }
    for w in workers {
        w.await??;
    }
    let sent_in = start.elapsed();
    // Wait for the last version of each watched service to arrive.
    let last: Vec<(String, u64)> = versions
        .iter()
        .map(|(i, v)| (service_name(*i), *v))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !last.iter().all(|k| lock(load.seen).contains_key(k)) {
        if Instant::now() > deadline {
            bail!("the destination never showed the last versions");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drained = start.elapsed();
    let usage = load
        .agent
        .usage()
        .zip(usage_before)
        .map(|(a, b)| a.since(b));
    let load_cpu = process_cpu_seconds(std::process::id())
        .zip(load_cpu_before)
        .map(|(a, b)| a - b);
    let sent = std::mem::take(&mut *lock(&sent));
    Ok(Churn {
        changes: total,
        sent_in_s: sent_in.as_secs_f64(),
        drained_in_s: drained.as_secs_f64(),
        cpu_s: usage.map_or(f64::NAN, |u| u.cpu_s()),
        agent: usage.unwrap_or_default(),
        load_cpu_s: load_cpu.unwrap_or(f64::NAN),
        added: load.agent.lags()[lags_before..]
            .iter()
            .map(|us| *us as f64 / 1000.0)
            .collect(),
        sent,
    })
}

fn percentile_of(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    percentile(values, p)
}

/// Creates `new_services` services in the source, each after a random
/// pause (so creations fall anywhere between the watcher's probes), and
/// returns, per service, the milliseconds from its creation to its replicas
/// showing in full to a subscriber in the destination.
async fn discover(args: &Args, app: &Client, dst_reader: &Client) -> anyhow::Result<Vec<f64>> {
    use rand::Rng;
    let m = args.instances;
    let names: Vec<String> = (0..args.new_services)
        .map(|k| format!("new-{k:04}"))
        .collect();
    let seen = follow(dst_reader, names.clone(), m).await;
    let mut rng = rand::rng();
    let mut created = Vec::new();
    for (k, name) in names.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..1500))).await;
        created.push((name.clone(), Instant::now()));
        app.publish(DEFAULT_GROUP, name, instances(args.services + k, m, 0))
            .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let found: Vec<f64> = {
            let seen = lock(&seen);
            created
                .iter()
                .filter_map(|(name, t0)| {
                    seen.get(&(name.clone(), 0))
                        .map(|t| t.saturating_duration_since(*t0).as_secs_f64() * 1000.0)
                })
                .collect()
        };
        if found.len() == created.len() {
            return Ok(found);
        }
        if Instant::now() > deadline {
            bail!(
                "only {} of {} new services reached the destination",
                found.len(),
                created.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Full listings timed after the probes.
const LISTINGS: usize = 10;

/// Times `probes` catalog probes and [`LISTINGS`] full listings against the
/// source; on a real server also its CPU per probe (java's CPU time over
/// the probes, less its idle rate over as long before them).
async fn probe_cost(
    args: &Args,
    reader: &Client,
    pid: Option<u32>,
) -> anyhow::Result<serde_json::Value> {
    let server_cpu = || pid.and_then(process_cpu_seconds);
    // Java's idle rate over a quiet second, to take out of the probes' figure.
    let (quiet_from, quiet_cpu) = (Instant::now(), server_cpu());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rate = quiet_cpu
        .zip(server_cpu())
        .map(|(a, b)| (b - a) / quiet_from.elapsed().as_secs_f64());
    let (probes_from, probes_cpu) = (Instant::now(), server_cpu());
    let mut times = Vec::with_capacity(args.probes);
    let mut failed = 0;
    for _ in 0..args.probes {
        let t0 = Instant::now();
        match reader.catalog_probe().await {
            Ok(Some(_)) => times.push(t0.elapsed().as_secs_f64() * 1000.0),
            Ok(None) => bail!("the source's catalog is not probed over HTTP"),
            Err(e) => {
                failed += 1;
                eprintln!("probe failed: {e}");
            }
        }
    }
    let probes_took = probes_from.elapsed().as_secs_f64();
    let server_us_per_probe = match (probes_cpu, server_cpu(), idle_rate) {
        (Some(before), Some(after), Some(rate)) => {
            Some(((after - before) - rate * probes_took).max(0.0) * 1e6 / args.probes.max(1) as f64)
        }
        _ => None,
    };
    let mut listings = Vec::new();
    let (listings_from, listings_cpu) = (Instant::now(), server_cpu());
    for _ in 0..LISTINGS {
        let t0 = Instant::now();
        reader.catalog().await?;
        listings.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    let listings_took = listings_from.elapsed().as_secs_f64();
    let server_ms_per_listing = match (listings_cpu, server_cpu(), idle_rate) {
        (Some(before), Some(after), Some(rate)) => {
            Some(((after - before) - rate * listings_took).max(0.0) * 1e3 / LISTINGS as f64)
        }
        _ => None,
    };
    Ok(serde_json::json!({
        "probe": summary(&mut times),
        "probes_failed": failed,
        "full_listing": summary(&mut listings),
        "server_cpu_us_per_probe": server_us_per_probe,
        "server_cpu_ms_per_listing": server_ms_per_listing,
    }))
}

/// A process' CPU seconds (user + system) so far, from /proc.
fn process_cpu_seconds(pid: u32) -> Option<f64> {
    Usage::of(pid).map(|u| u.cpu_s())
}

/// A process' CPU time by kind and its threads' switches so far, from /proc.
#[derive(Clone, Copy, Default)]
struct Usage {
    user_s: f64,
    system_s: f64,
    /// Times a thread gave the CPU up to wait (for a socket, a timer, a lock).
    voluntary: u64,
    /// Times a thread was preempted.
    involuntary: u64,
}

impl Usage {
    fn of(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may hold spaces) start at ')'.
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)?
                .parse::<f64>()
                .ok()
                .map(|t| t / clock_ticks())
        };
        let mut usage = Self {
            user_s: ticks(11)?,
            system_s: ticks(12)?,
            ..Self::default()
        };
        // Switches are counted per thread; a thread that has ended is not in
        // the sum (the agent's threads live as long as it does).
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))
            .ok()?
            .flatten()
        {
            let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
                continue;
            };
            for line in status.lines() {
                let count = |prefix: &str| {
                    line.strip_prefix(prefix)
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .unwrap_or(0)
                };
                usage.voluntary += count("voluntary_ctxt_switches:");
                usage.involuntary += count("nonvoluntary_ctxt_switches:");
            }
        }
        Some(usage)
    }

    fn since(self, before: Self) -> Self {
        Self {
            user_s: self.user_s - before.user_s,
            system_s: self.system_s - before.system_s,
            voluntary: self.voluntary.saturating_sub(before.voluntary),
            involuntary: self.involuntary.saturating_sub(before.involuntary),
        }
    }

    fn cpu_s(&self) -> f64 {
        self.user_s + self.system_s
    }
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
        "{:<34} {} changes at {}/s: sent in {} s, drained in {} s -> {} changes/s (agent CPU {} s, {} us per change; load side CPU {} s)",
        "churn",
        c["changes"],
        c["target_per_s"],
        f(&c["sent_in_s"]),
        f(&c["drained_in_s"]),
        f(&c["sustained_per_s"]),
        f(&c["agent_cpu_s"]),
        f(&c["agent_cpu_us_per_change"]),
        f(&c["load_cpu_s"])
    );
    let per = &c["agent_per_change"];
    println!(
        "{:<34} user {} us + kernel {} us; the agent's threads slept {} times and were preempted {} times",
        "  agent per change",
        f(&per["user_us"]),
        f(&per["system_us"]),
        f(&per["sleeps"]),
        f(&per["preemptions"])
    );
    if let Some(sweep) = r["sweep"].as_array().filter(|s| !s.is_empty()) {
        let generator_bound = sweep.iter().any(|p| p["generator_bound"] == true);
        let machine_full = sweep
            .last()
            .is_some_and(|p| p["within"] != true && p["machine_full"] == true);
        for phase in sweep {
            println!(
                "{:<34} {}/s offered ({} sent): {} changes/s drained, agent-added p99 {} ms, {} us per change ({} in the kernel), cores: agent {} load side {}{}",
                "  sweep",
                phase["offered_per_s"],
                f(&phase["sent_per_s"]),
                f(&phase["sustained_per_s"]),
                f(&phase["agent_added_p99_ms"]),
                f(&phase["agent_cpu_us_per_change"]),
                f(&phase["agent_per_change"]["system_us"]),
                f(&phase["agent_cpu_cores"]),
                f(&phase["load_cpu_cores"]),
                match (
                    phase["generator_bound"] == true,
                    phase["within"] == true,
                    phase["machine_full"] == true,
                ) {
                    (true, _, _) => "  <- the load generator fell behind",
                    (false, true, _) => "",
                    (false, false, true) => "  <- over, with every core busy",
                    (false, false, false) => "  <- over",
                }
            );
        }
        println!(
            "{:<34} {} (highest offer drained with agent-added p99 < 10 ms{})",
            "saturation point",
            match (r["saturation_per_s"].as_u64(), generator_bound) {
                (Some(rate), false) => format!("{rate} changes/s"),
                (Some(rate), true) =>
                    format!("at least {rate} changes/s (the load generator could offer no more)"),
                (None, _) => format!("below {} changes/s", SWEEP_RATES[0]),
            },
            if machine_full {
                "; the next offer had every core busy, load side included"
            } else {
                ""
            }
        );
    }
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
    lat("discovery (create -> dest sub)", &r["discovery"]);
    let p = &r["catalog_probe"];
    lat("catalog probe (one entry)", &p["probe"]);
    if p["probes_failed"].as_u64() > Some(0) {
        println!("{:<34} {}", "  probes failed", p["probes_failed"]);
    }
    lat("full catalog listing", &p["full_listing"]);
    println!(
        "{:<34} {} us per probe, {} ms per full listing",
        "source server CPU",
        f(&p["server_cpu_us_per_probe"]),
        f(&p["server_cpu_ms_per_listing"])
    );
}
