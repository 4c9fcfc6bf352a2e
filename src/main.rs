//! `nacos-replicator`: command line.
//!
//! argv -> tracing -> config -> run until Ctrl-C. `anyhow` lives here only.
//! Built with the `cli` feature (which includes `demo`): `cargo run
//! --features cli -- ...`. What only this file uses (clap, anyhow, the
//! subscriber, the allocator) is behind that feature, so the library alone
//! pulls none of it.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use nacos_replicator::cluster::{Client, ClientConfig, ConnectionState, Credentials};
use nacos_replicator::config;
use nacos_replicator::model::{DEFAULT_GROUP, DEFAULT_NAMESPACE, ServiceSnapshot};
use nacos_replicator::runtime::Tasks;
use tokio_util::sync::CancellationToken;

mod drill_command;

/// mimalloc: with many small, long-lived allocations (instances, keys) it
/// kept the agent's resident memory well below glibc malloc's in the
/// benchmark, and it serves a static musl build far better than musl's own.
/// Built without transparent huge pages (`no_thp` in Cargo.toml): half-used
/// 2 MiB pages cost 12 MiB of resident memory at 100,000 instances.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for bad usage or configuration (BSD `EX_USAGE`).
const EX_USAGE: i32 = 64;

#[derive(Parser)]
#[command(
    name = "nacos-replicator",
    version,
    about = "Replicate Nacos 2.x service registries across regions"
)]
struct Cli {
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Subscribe to services on one cluster and print every snapshot pushed.
    Watch(WatchArgs),
    /// Validate a configuration file and print what it would replicate.
    Check(CheckArgs),
    /// Run the replication agent until SIGINT or SIGTERM.
    Run(RunArgs),
    /// Compare every destination with what the routes want there; change
    /// nothing. Exit 0 when in sync, 1 when something differs, 2 when a
    /// cluster could not be read.
    Diff(DiffArgs),
    /// Two or three in-process regions, an agent each, sample services
    /// changing every interval, and a live view of what each region holds
    /// and how far behind it is. Needs nothing installed. With --rounds N:
    /// exit 0 when every region is in sync at the end, 1 when not.
    Demo(DemoArgs),
    /// Rehearse losing a region: a running agent treats one source as lost
    /// for a while (`--isolate sh --for 10m`), or ends its drill (`--end`);
    /// the timeline is printed as it happens. Exit 0 once converged after
    /// the restore, 1 when refused, stopped or not converged in time.
    Drill(drill_command::DrillArgs),
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Regions to run: 2 (east, west) or 3 (and south).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(2..=3))]
    regions: u8,
    /// Rounds of changes, then a final check (0: until Ctrl-C or SIGTERM).
    #[arg(long, default_value_t = 0)]
    rounds: u64,
    /// Time between rounds, as `500ms`, `2s`.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Append one block per round instead of redrawing the screen (the
    /// default when stdout is not a terminal).
    #[arg(long)]
    plain: bool,
}

#[derive(clap::Args)]
struct DiffArgs {
    /// The agent's TOML configuration.
    #[arg(long)]
    config: std::path::PathBuf,
    /// Print the replicas of services in sync too (counts only by default).
    #[arg(long)]
    verbose: bool,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The agent's TOML configuration. SIGHUP re-reads it, and so does a
    /// change of its content (see --config-poll).
    #[arg(long)]
    config: std::path::PathBuf,
    /// How often the file is checked for a change of content, which reloads
    /// it (a Kubernetes ConfigMap volume changes it in place); 0s: only SIGHUP.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    config_poll: Duration,
    /// Runtime worker threads. 1 (default) runs everything on one thread:
    /// the agent's work is many small messages, and on one thread they hand
    /// over without cross-thread wake-ups (~20% less CPU per change in the
    /// benchmark). More may help a very large mesh on a many-core machine.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    worker_threads: u16,
}

#[derive(clap::Args)]
struct CheckArgs {
    /// The agent's TOML configuration.
    #[arg(long)]
    config: std::path::PathBuf,
    /// Also connect to every cluster and namespace, and say which answered.
    #[arg(long)]
    connect: bool,
}

#[derive(clap::Args)]
struct WatchArgs {
    /// Nacos server as host:http_port (gRPC is on http_port + 1000). Repeat for a cluster.
    #[arg(long = "server", required = true)]
    servers: Vec<String>,
    /// Namespace id.
    #[arg(long, default_value = DEFAULT_NAMESPACE)]
    namespace: String,
    /// Group.
    #[arg(long, default_value = DEFAULT_GROUP)]
    group: String,
    /// Services to watch; every service of the group when none is given.
    #[arg(long = "service")]
    services: Vec<String>,
    /// User name, when the cluster has auth enabled.
    #[arg(long, env = "NACOS_USERNAME")]
    username: Option<String>,
    /// Password, when the cluster has auth enabled.
    #[arg(long, env = "NACOS_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Stop after this many snapshots (0: run until Ctrl-C).
    #[arg(long, default_value_t = 0)]
    count: u64,
}

/// `run` on the runtime its `--worker-threads` asks for; the other commands
/// (the demo runs whole regions in one process) on Tokio's default.
fn build_runtime(command: &Command) -> std::io::Result<tokio::runtime::Runtime> {
    match command {
        Command::Run(args) if args.worker_threads == 1 => {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        }
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(args.worker_threads))
            .enable_all()
            .build(),
        _ => tokio::runtime::Runtime::new(),
    }
}

fn main() {
    let cli = Cli::parse();
    // `run` may ask for JSON in its configuration: it sets tracing up itself.
    // The demo's view is on stdout: its log shows warnings only, unless RUST_LOG says otherwise.
    match cli.command {
        Command::Run(_) => {}
        Command::Demo(_) => init_tracing(cli.log_json, "warn"),
        _ => init_tracing(cli.log_json, DEFAULT_LOG),
    }
    let runtime = match build_runtime(&cli.command) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Watch(args) => watch(args).await,
            Command::Check(args) => check(args).await,
            Command::Run(args) => run(args, cli.log_json).await,
            Command::Diff(args) => diff(args).await,
            Command::Demo(args) => demo(args).await,
            Command::Drill(args) => drill_command::drill(args).await,
        }
    });
    if let Err(e) = result {
        if let Some(Differs) = e.downcast_ref::<Differs>() {
            std::process::exit(1);
        }
        eprintln!("error: {e:#}");
        let code = if e.downcast_ref::<UsageError>().is_some() {
            EX_USAGE
        } else if e
            .downcast_ref::<nacos_replicator::agent::DiffError>()
            .is_some()
        {
            2
        } else {
            1
        };
        std::process::exit(code);
    }
}

/// `diff` found differences (exit 1, like diff(1)).
#[derive(Debug, thiserror::Error)]
#[error("destinations differ")]
struct Differs;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

/// How long a one-shot command waits for its connections to close.
const COMMAND_GRACE: Duration = Duration::from_secs(2);

/// Log levels when `RUST_LOG` is not set.
const DEFAULT_LOG: &str = "info,h2=warn,hyper=warn,tower=warn";

fn init_tracing(json: bool, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    // Colour only for a person at a terminal, never into a file or a pipe.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn watch(args: WatchArgs) -> anyhow::Result<()> {
    let credentials = match (args.username, args.password) {
        (Some(username), Some(password)) => Some(Credentials { username, password }),
        (None, None) => None,
        _ => bail!(UsageError(
            "give both --username and --password, or neither".into()
        )),
    };
    let mut config = ClientConfig::new("watched", args.servers, args.namespace);
    config.credentials = credentials;
    let tasks = Tasks::default();
    let client = Client::start(config, &tasks).map_err(|e| UsageError(e.to_string()))?;

    let mut state = client.state();
    tasks.spawn("connection report", async move {
        while state.changed().await.is_ok() {
            let now = state.borrow_and_update().clone();
            match now {
                ConnectionState::Connected {
                    server,
                    connection_id,
                } => {
                    eprintln!("connected to {server} (connection {connection_id})")
                }
                ConnectionState::Disconnected { server, error } => {
                    eprintln!("disconnected from {server}: {error}")
                }
                _ => {}
            }
        }
    });

    client
        .wait_connected(Duration::from_secs(30))
        .await
        .context("connecting")?;
    let services = if args.services.is_empty() {
        client
            .list_services(&args.group)
            .await
            .context("listing services")?
    } else {
        args.services
    };
    if services.is_empty() {
        bail!(UsageError(format!(
            "group {:?} has no services; name one with --service",
            args.group
        )));
    }
    let mut streams = futures_util::stream::SelectAll::new();
    for name in &services {
        streams.push(
            client
                .subscribe(&args.group, name)
                .await
                .with_context(|| format!("subscribing to {name}"))?,
        );
    }
    eprintln!("watching {} service(s); Ctrl-C to stop", services.len());
    let mut seen = 0u64;
    loop {
        tokio::select! {
            next = streams.next() => match next {
                Some(snapshot) => {
                    println!("{}", render(&snapshot));
                    seen += 1;
                    if args.count > 0 && seen >= args.count {
                        break;
                    }
                }
                None => break,
            },
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    tasks.shutdown(COMMAND_GRACE).await;
    Ok(())
}

async fn run(args: RunArgs, log_json: bool) -> anyhow::Result<()> {
    let env = |key: &str| std::env::var(key).ok();
    let loaded = config::load(&args.config, &env);
    let json = log_json
        || loaded
            .as_ref()
            .is_ok_and(|c| c.log_format == config::LogFormat::Json);
    init_tracing(json, DEFAULT_LOG);
    let config = loaded.map_err(|e| UsageError(e.to_string()))?;
    let status = config.status_listen;
    let token = config.control_token.clone().map(|t| t.0);
    if token.is_none() && !status.ip().is_loopback() {
        tracing::info!(%status, "DR drill control is off (POST and DELETE /drill refused): the status server listens beyond loopback and agent.control_token_env is not set");
    }
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    // Outlives `run` on purpose: a second signal while it drains must still exit.
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("signal received: stopping (a second signal exits at once)");
        trigger.cancel();
        shutdown_signal().await;
        tracing::warn!("second signal: exiting without waiting");
        std::process::exit(130);
    });
    let agent = nacos_replicator::agent::Agent::new(config)
        .with_status_server(status)
        .with_drills(token);
    let follow = follow_config(
        args.config.clone(),
        args.config_poll,
        agent.reloader(),
        shutdown.clone(),
    );
    let reloads = tokio::spawn(follow);
    let result = agent.run(shutdown).await;
    reloads.abort();
    result?;
    Ok(())
}

/// Re-reads the configuration on SIGHUP and whenever its content changes
/// (checked every `poll`; zero: only SIGHUP), and hands it to the running
/// agent. A file that does not load is rejected with its error, and the
/// running configuration stays.
async fn follow_config(
    path: std::path::PathBuf,
    poll: Duration,
    reloader: nacos_replicator::agent::Reloader,
    stop: CancellationToken,
) {
    let read = |p: &std::path::Path| std::fs::read(p).ok();
    let mut seen = read(&path);
    let mut hangups = hangups();
    let mut ticks = (!poll.is_zero()).then(|| nacos_replicator::runtime::ticker_after(poll));
    loop {
        let why = tokio::select! {
            () = stop.cancelled() => return,
            Some(()) = hangups.recv() => "SIGHUP",
            _ = async { match ticks.as_mut() { Some(t) => t.tick().await, None => std::future::pending().await } } => {
                let now = read(&path);
                if now.is_none() || now == seen {
                    continue;
                }
                "the file changed"
            }
        };
        seen = read(&path);
        let env = |key: &str| std::env::var(key).ok();
        match config::load(&path, &env) {
            Err(e) => {
                tracing::error!(reason = why, error = %e, "reload rejected: the running configuration stays")
            }
            Ok(config) => {
                tracing::info!(reason = why, file = %path.display(), "reloading the configuration");
                if let Err(e) = reloader.reload(config).await {
                    tracing::error!(error = %e, "reload failed: the running configuration stays");
                }
            }
        }
    }
}

/// SIGHUP, as a stream (none where there is no such signal).
fn hangups() -> tokio::sync::mpsc::Receiver<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut hup) = signal(SignalKind::hangup()) {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    if tx.send(()).await.is_err() {
                        return;
                    }
                }
            });
        }
    }
    rx
}

async fn diff(args: DiffArgs) -> anyhow::Result<()> {
    let env = |key: &str| std::env::var(key).ok();
    let config = config::load(&args.config, &env).map_err(|e| UsageError(e.to_string()))?;
    let policy = nacos_replicator::reconcile::ReplicateAll;
    let report =
        nacos_replicator::agent::diff(&config, &policy, config.timings.request_timeout * 3).await?;
    let show = |i: &nacos_replicator::model::Instance| {
        let origin = config.tags.origin_of(i).unwrap_or("?");
        format!(
            "{}:{} (from {origin}, cluster {}, weight {})",
            i.ip, i.port, i.nacos_cluster, i.weight
        )
    };
    for d in &report.differences {
        println!("{}/{}:", d.destination, d.service);
        for i in &d.detail.missing {
            println!("  missing    {}", show(i));
        }
        for (want, shown) in &d.detail.different {
            println!("  different  {}", show(want));
            if args.verbose {
                println!(
                    "    wanted   {:?}\n    shown    {:?}",
                    want.metadata, shown.metadata
                );
            }
        }
        for i in &d.detail.extra {
            println!("  extra      {}", show(i));
        }
    }
    println!(
        "{} destination service(s) compared, {} replica(s) wanted, {} differ",
        report.compared,
        report.wanted,
        report.differences.len()
    );
    if report.differences.is_empty() {
        Ok(())
    } else {
        Err(Differs.into())
    }
}

/// Not a failure of the demo itself: the regions did not agree in time.
#[derive(Debug, thiserror::Error)]
#[error("not every region was in sync at the final check")]
struct NotInSync;

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let options = nacos_replicator::demo::DemoOptions {
        regions: usize::from(args.regions),
        rounds: args.rounds,
        interval: args.interval,
        live: !args.plain && std::io::stdout().is_terminal(),
        ..Default::default()
    };
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    let signals = tokio::spawn(async move {
        shutdown_signal().await;
        trigger.cancel();
    });
    let result = nacos_replicator::demo::run(options, shutdown, std::io::stdout()).await;
    signals.abort();
    let summary = match result {
        Ok(summary) => summary,
        Err(e @ nacos_replicator::demo::DemoError::Options(_)) => bail!(UsageError(e.to_string())),
        Err(e) => return Err(e.into()),
    };
    if !summary.interrupted && !summary.in_sync {
        bail!(NotInSync);
    }
    Ok(())
}

/// SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

async fn check(args: CheckArgs) -> anyhow::Result<()> {
    // The one place the environment is read: secrets named by password_env.
    let env = |key: &str| std::env::var(key).ok();
    // Offline, an unset secret is only noted: the file can be checked where
    // the secrets are not (a laptop, CI); connecting needs them.
    let (config, unset) = if args.connect {
        (config::load(&args.config, &env), Vec::new())
    } else {
        match config::load_offline(&args.config, &env) {
            Ok((config, unset)) => (Ok(config), unset),
            Err(e) => (Err(e), Vec::new()),
        }
    };
    let config = config.map_err(|e| UsageError(e.to_string()))?;
    println!("{}: valid", args.config.display());
    for u in &unset {
        println!("  note: {u} (check --connect and run need it)");
    }
    print_clusters(&config);
    print_routes(&config);
    let token_named =
        config.control_token.is_some() || unset.iter().any(|u| u.key == "agent.control_token_env");
    println!("{}", drill_access(config.status_listen, token_named));
    if !args.connect {
        return Ok(());
    }
    let failed = probe_all(&config).await?;
    if failed > 0 {
        bail!("{failed} cluster namespace(s) did not answer");
    }
    Ok(())
}

/// Who may start a DR drill on the status server (`POST /drill`).
fn drill_access(at: std::net::SocketAddr, token: bool) -> String {
    match (token, at.ip().is_loopback()) {
        (true, _) => format!("drill control: on at http://{at}/drill, bearer token required"),
        (false, true) => format!("drill control: on at http://{at}/drill (loopback, no token)"),
        (false, false) => format!(
            "drill control: off ({at} is beyond loopback and agent.control_token_env is not set)"
        ),
    }
}

fn print_clusters(config: &config::Config) {
    println!("clusters:");
    for c in &config.clusters {
        let auth = c
            .credentials
            .as_ref()
            .map_or("no auth".to_owned(), |a| format!("user {}", a.username));
        let tls = if c.tls.is_some() { "TLS" } else { "plaintext" };
        println!(
            "  {:<8} {} | namespaces {} | {auth} | {tls}",
            c.id,
            c.servers.join(", "),
            c.namespaces.join(", ")
        );
    }
}

fn print_routes(config: &config::Config) {
    if config.routes.is_empty() {
        println!("routes: none (the agent replicates nothing; it runs, ready, until stopped)");
        return;
    }
    let all = |v: &[String]| {
        if v.is_empty() {
            "all".to_owned()
        } else {
            v.join(", ")
        }
    };
    let globs = |v: &[nacos_replicator::reconcile::Pattern]| {
        if v.is_empty() {
            "-".to_owned()
        } else {
            v.iter()
                .map(|p| p.as_str().to_owned())
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    println!("routes (origin tag key {:?}):", config.tags.key());
    for r in &config.routes {
        let served = config
            .cluster(r.source())
            .map(|c| c.namespaces.clone())
            .unwrap_or_default();
        println!(
            "  {r}: namespaces {} | groups {} | include {} | exclude {}",
            r.source_namespaces(&served).join(", "),
            all(&r.scope.groups),
            globs(&r.scope.include),
            globs(&r.scope.exclude)
        );
        for (from, to) in &r.mapping.namespaces {
            println!("      namespace {from} -> {to}");
        }
        for (from, to) in &r.mapping.groups {
            println!("      group {from} -> {to}");
        }
    }
}

/// `check --connect`: every cluster namespace, one line each; how many failed.
async fn probe_all(config: &config::Config) -> anyhow::Result<usize> {
    println!("connecting:");
    let tasks = Tasks::default();
    let mut failed = 0;
    for c in &config.clusters {
        for ns in &c.namespaces {
            let client = nacos_replicator::agent::start_client(config, c, ns, &tasks)?;
            let outcome = probe(config, &client).await.unwrap_or_else(|e| {
                failed += 1;
                e
            });
            println!("  {}/{ns}: {outcome}", c.id);
        }
    }
    tasks.shutdown(COMMAND_GRACE).await;
    Ok(failed)
}

/// Connects and lists the whole catalog, as the agent does, so the method it
/// will use (and its failure, say a 3.x admin API without a user) shows here
/// first.
async fn probe(config: &config::Config, client: &Client) -> Result<String, String> {
    let timeout = config.timings.request_timeout;
    client
        .wait_connected(timeout * 3)
        .await
        .map_err(|e| format!("FAILED: {e}"))?;
    let services = client
        .catalog()
        .await
        .map_err(|e| format!("connected, but listing failed: {e}"))?;
    let mut info = client.server_info();
    // The version is read beside the session; give it a moment.
    let _ = tokio::time::timeout(timeout, info.wait_for(|i| i.version.is_some())).await;
    let info = info.borrow().clone();
    Ok(format!(
        "ok: {info}; {} service(s) in every group",
        services.len()
    ))
}

fn render(snapshot: &ServiceSnapshot) -> String {
    let mut hosts: Vec<String> = snapshot
        .instances
        .iter()
        .map(|i| {
            let health = if i.healthy { "" } else { " unhealthy" };
            format!("{}:{} w={}{}", i.ip, i.port, i.weight, health)
        })
        .collect();
    hosts.sort();
    format!(
        "{} [{} instance(s)] {}",
        snapshot.service,
        snapshot.instances.len(),
        hosts.join(", ")
    )
}
