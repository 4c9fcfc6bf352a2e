//! `nacos-replicator demo`: two or three regions replicating, in one process,
//! with nothing installed.
//!
//! Each region is an in-process Nacos-compatible server
//! ([`FakeNacos`]) with one agent in the
//! import model (routes from every peer into its region, a small custom
//! [`DemoPolicy`]) and sample applications (one client
//! per region) whose services change every round ([`schedule`]). After each
//! interval the view ([`view`]) shows what every region holds, how far
//! behind it is compared with its peers' natives ([`sync`]), and each
//! agent's readiness, replicas, publishes, lag and latest events.
//!
//! [`run`] owns everything it starts: servers, agents, clients. It returns
//! after `rounds` rounds and a final check (waiting up to
//! [`DemoOptions::settle`] for the regions to agree), or as soon as the
//! caller's token is cancelled; either way the agents are stopped and
//! awaited and the servers stopped before it returns. Must not: exit the
//! process, read the environment or install signal handlers (the binary
//! does), or write anywhere but the writer it is given.

pub mod schedule;
pub mod sync;
pub mod view;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::agent::{Agent, AgentError};
use crate::cluster::{Client, ClientConfig, ClientError};
use crate::config::ConfigError;
use crate::model::{ClusterId, DEFAULT_GROUP, DEFAULT_NAMESPACE, Instance, ServiceKey};
use crate::reconcile::{OriginTags, Route};
use crate::runtime::Tasks;
use crate::telemetry::{Event, Telemetry};
use crate::testing::fake::{FakeError, FakeNacos, FakeOptions};
use schedule::{DemoPolicy, REGIONS};
use sync::RegionView;
use view::{EventTally, Frame, RegionReport};

/// How to run the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Regions to run: 2 (east, west) or 3 (and south).
    pub regions: usize,
    /// Rounds of changes before the final check; 0 runs until cancelled.
    pub rounds: u64,
    /// Time between rounds (and between redraws).
    pub interval: Duration,
    /// Redraw the view in place (ANSI clear and home) instead of appending
    /// one block per round.
    pub live: bool,
    /// After the last round, how long to wait for every region to be in sync.
    pub settle: Duration,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            regions: 2,
            rounds: 0,
            interval: Duration::from_secs(2),
            live: false,
            settle: Duration::from_secs(30),
        }
    }
}

/// The demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The options cannot work.
    #[error("invalid demo options: {0}")]
    Options(String),
    /// A region's server did not start.
    #[error("starting region {region}")]
    Region {
        /// The region.
        region: String,
        /// Why.
        #[source]
        source: FakeError,
    },
    /// The configuration written for an agent was refused (a bug here).
    #[error("configuring the agent of region {region}")]
    Config {
        /// The region.
        region: String,
        /// Why.
        #[source]
        source: ConfigError,
    },
    /// A region's applications could not connect.
    #[error("connecting the applications of region {region}")]
    Client {
        /// The region.
        region: String,
        /// Why.
        #[source]
        source: Box<ClientError>,
    },
    /// The view could not be written.
    #[error("writing the view")]
    Write(#[source] std::io::Error),
}

impl DemoError {
    /// Stable label for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Options(_) => "options",
            Self::Region { .. } => "region",
            Self::Config { .. } => "config",
            Self::Client { .. } => "client",
            Self::Write(_) => "write",
        }
    }
}

/// How the demo ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoSummary {
    /// Rounds of changes made.
    pub rounds: u64,
    /// Every region held exactly what its peers' natives say at the final check.
    pub in_sync: bool,
    /// Ended by the caller's token rather than by the round count.
    pub interrupted: bool,
}

/// How long the applications may take to connect to their region.
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// How often the final check looks again while regions catch up.
/// How long the application clients get to close their connections.
const STOP_GRACE: Duration = Duration::from_secs(2);
const SETTLE_POLL: Duration = Duration::from_millis(200);

/// One region: its server, its applications, its agent.
struct Region {
    name: ClusterId,
    server: FakeNacos,
    app: Client,
    routes: Vec<Route>,
    policy: DemoPolicy,
    telemetry: Telemetry,
    events: broadcast::Receiver<Event>,
    tally: EventTally,
    agent: Option<JoinHandle<Result<(), AgentError>>>,
}

/// Runs the demo, writing the view to `out`, until `options.rounds` rounds
/// are done and checked or `shutdown` is cancelled. Everything it started is
/// stopped before it returns.
pub async fn run(
    options: DemoOptions,
    shutdown: CancellationToken,
    mut out: impl Write,
) -> Result<DemoSummary, DemoError> {
    if !(2..=REGIONS.len()).contains(&options.regions) {
        return Err(DemoError::Options(format!(
            "regions must be 2 or 3, not {}",
            options.regions
        )));
    }
    if options.interval < Duration::from_millis(100) {
        return Err(DemoError::Options(
            "interval must be at least 100ms".to_owned(),
        ));
    }
    // Owns every task below; cancelled (and so stopped) on any way out, and
    // only after the final check: not the caller's token, whose
    // cancellation asks for that check first.
    let tasks = Tasks::default();
    let _stop = tasks.token().clone().drop_guard();
    let mut regions = start(&options, &tasks).await?;
    let result = drive(&options, &shutdown, &mut regions, &mut out).await;
    tasks.token().cancel();
    let mut stopped = Vec::new();
    for r in &mut regions {
        let outcome = match r.agent.take() {
            Some(task) => match task.await {
                Ok(Ok(())) => "stopped".to_owned(),
                Ok(Err(e)) => format!("failed: {e}"),
                Err(e) => format!("task failed: {e}"),
            },
            None => "not started".to_owned(),
        };
        stopped.push(format!("{} {outcome}", r.name));
    }
    // The application clients, then the servers they talk to.
    tasks.shutdown(STOP_GRACE).await;
    for r in &mut regions {
        r.server.stop().await;
    }
    if result.is_ok() {
        writeln!(out, "agents: {}; servers stopped", stopped.join(", "))
            .map_err(DemoError::Write)?;
        out.flush().map_err(DemoError::Write)?;
    }
    result
}

/// Starts the servers, then one agent and one application client per region.
async fn start(options: &DemoOptions, tasks: &Tasks) -> Result<Vec<Region>, DemoError> {
    let names: Vec<&str> = REGIONS[..options.regions].to_vec();
    let mut servers = Vec::new();
    for name in &names {
        let server = FakeNacos::start(FakeOptions::default())
            .await
            .map_err(|source| DemoError::Region {
                region: (*name).to_owned(),
                source,
            })?;
        servers.push(server);
    }
    let clusters: String = names
        .iter()
        .zip(&servers)
        .map(|(name, s)| {
            format!(
                "[[clusters]]\nid = \"{name}\"\nservers = [\"{}\"]\n",
                s.addr()
            )
        })
        .collect();
    let mut regions = Vec::new();
    for (name, server) in names.iter().zip(servers) {
        // The import model: this region's agent copies every peer's natives home.
        let routes: String = names
            .iter()
            .filter(|p| *p != name)
            .map(|peer| format!("[[routes]]\nfrom = \"{peer}\"\nto = \"{name}\"\n"))
            .collect();
        let text = format!("[timings]\nlist_interval = \"1s\"\n{clusters}{routes}");
        let file = format!("demo-{name}.toml");
        let config =
            crate::config::parse(Path::new(&file), &text, &|_| None).map_err(|source| {
                DemoError::Config {
                    region: (*name).to_owned(),
                    source,
                }
            })?;
        let policy = DemoPolicy {
            region: (*name).to_owned(),
        };
        let agent = Agent::new(config.clone()).with_policy(policy.clone());
        let (telemetry, events) = (agent.telemetry(), agent.events());
        let app = ClientConfig::new(
            format!("{name}-apps"),
            vec![server.addr()],
            DEFAULT_NAMESPACE,
        );
        let client_error = |source| DemoError::Client {
            region: (*name).to_owned(),
            source: Box::new(source),
        };
        let app = Client::start(app, tasks).map_err(client_error)?;
        regions.push(Region {
            name: ClusterId((*name).to_owned()),
            server,
            app,
            routes: config.routes,
            policy,
            telemetry,
            events,
            tally: EventTally::default(),
            // Awaited in `run`, which so owns it (and the agent owns its tasks).
            agent: Some(tokio::spawn(agent.run(tasks.token().clone()))),
        });
    }
    for r in &regions {
        r.app
            .wait_connected(CONNECT_DEADLINE)
            .await
            .map_err(|source| DemoError::Client {
                region: r.name.0.clone(),
                source: Box::new(source),
            })?;
    }
    Ok(regions)
}

/// The rounds, the view after each, and the final check.
async fn drive(
    options: &DemoOptions,
    shutdown: &CancellationToken,
    regions: &mut [Region],
    out: &mut impl Write,
) -> Result<DemoSummary, DemoError> {
    let started = Instant::now();
    let mut round = 1;
    let mut changes = apply(regions, round).await;
    let mut tick = tokio::time::interval_at(Instant::now() + options.interval, options.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let interrupted = loop {
        tokio::select! {
            () = shutdown.cancelled() => break true,
            _ = tick.tick() => {}
        }
        let of = if options.rounds > 0 {
            format!(" of {}", options.rounds)
        } else {
            String::new()
        };
        let title = format!(
            "round {round}{of}, t+{:.1}s",
            started.elapsed().as_secs_f64()
        );
        let frame = observe(regions, title, std::mem::take(&mut changes)).await;
        draw(out, options, &frame, true)?;
        if options.rounds > 0 && round >= options.rounds {
            break false;
        }
        round += 1;
        changes = apply(regions, round).await;
    };

    // The final check: the last changes get `settle` to reach every region.
    let last_change = Instant::now();
    let deadline = last_change
        + if interrupted {
            Duration::ZERO
        } else {
            options.settle
        };
    let frame = loop {
        let frame = observe(regions, String::new(), Vec::new()).await;
        if all_in_sync(&frame) || Instant::now() >= deadline {
            break frame;
        }
        tokio::select! {
            () = shutdown.cancelled() => break frame,
            () = tokio::time::sleep(SETTLE_POLL) => {}
        }
    };
    let in_sync = all_in_sync(&frame);
    let how = if interrupted {
        "stopped"
    } else {
        "final check"
    };
    let title = format!(
        "{how} after {round} round(s), t+{:.1}s",
        started.elapsed().as_secs_f64()
    );
    draw(out, options, &Frame { title, ..frame }, false)?;
    writeln!(
        out,
        "all regions in sync: {}",
        if in_sync { "yes" } else { "no" }
    )
    .map_err(DemoError::Write)?;
    Ok(DemoSummary {
        rounds: round,
        in_sync,
        interrupted,
    })
}

/// Every region was read and holds exactly what its peers' natives say.
fn all_in_sync(frame: &Frame) -> bool {
    frame
        .regions
        .iter()
        .all(|r| r.sync.as_ref().is_some_and(|s| s.total.in_sync()))
}

/// Publishes what each region's applications run in `round`, service by
/// service, where it changed. Returns what changed, in words. A failed
/// publish is reported, not fatal: the client applies the set after it
/// reconnects, and the view shows the region behind until then.
async fn apply(regions: &[Region], round: u64) -> Vec<String> {
    let mut changes = Vec::new();
    for (index, r) in regions.iter().enumerate() {
        let before = schedule::natives(index, regions.len(), round - 1);
        for (service, instances) in schedule::natives(index, regions.len(), round) {
            if before.get(service) == Some(&instances) {
                continue;
            }
            if let Err(e) = r.app.publish(DEFAULT_GROUP, service, instances).await {
                changes.push(format!("{} failed to publish {service}: {e}", r.name));
            }
        }
        changes.extend(schedule::describe(index, regions.len(), round));
    }
    changes
}

/// Reads every region through its applications' client, compares each with
/// its peers, and collects the agents' status and events.
async fn observe(regions: &mut [Region], title: String, changes: Vec<String>) -> Frame {
    let mut shown = Vec::new();
    for r in regions.iter() {
        shown.push(read_region(&r.app).await);
    }
    let views: BTreeMap<ClusterId, RegionView> = regions
        .iter()
        .zip(&shown)
        .filter_map(|(r, s)| Some((r.name.clone(), s.as_ref().ok()?.clone())))
        .collect();
    let everyone = views.len() == regions.len();
    let tags = OriginTags::default();
    let mut reports = Vec::new();
    for (r, shown) in regions.iter_mut().zip(shown) {
        loop {
            match r.events.try_recv() {
                Ok(event) => r.tally.record(&event),
                Err(broadcast::error::TryRecvError::Lagged(n)) => r.tally.missed += n,
                Err(_) => break,
            }
        }
        let sync = everyone.then(|| sync::compare(&r.name, &views, &r.routes, &tags, &r.policy));
        reports.push(RegionReport {
            region: r.name.clone(),
            shown,
            sync,
            status: r.telemetry.status(),
            events: r.tally.clone(),
        });
    }
    Frame {
        title,
        changes,
        regions: reports,
    }
}

/// Every service of the default group and what it shows.
async fn read_region(client: &Client) -> Result<RegionView, String> {
    let names = client
        .list_services(DEFAULT_GROUP)
        .await
        .map_err(|e| format!("listing services: {e}"))?;
    let mut view = RegionView::new();
    for name in names {
        let snapshot = client
            .query(DEFAULT_GROUP, &name)
            .await
            .map_err(|e| format!("querying {name}: {e}"))?;
        let instances: Vec<Instance> = snapshot.instances.to_vec();
        view.insert(
            ServiceKey::new(DEFAULT_NAMESPACE, DEFAULT_GROUP, name),
            instances,
        );
    }
    Ok(view)
}

/// Writes a frame: redrawn in place when live (except the final one, which
/// stays under the last view), else appended.
fn draw(
    out: &mut impl Write,
    options: &DemoOptions,
    frame: &Frame,
    redraw: bool,
) -> Result<(), DemoError> {
    let mut text = String::new();
    if options.live && redraw {
        text.push_str("\x1b[2J\x1b[H");
        let names: Vec<&str> = frame.regions.iter().map(|r| r.region.0.as_str()).collect();
        text.push_str(&format!(
            "nacos-replicator demo: {} in-process regions ({}), one agent each; Ctrl-C stops\n\n",
            names.len(),
            names.join(", ")
        ));
    }
    text.push_str(&view::render(frame, &OriginTags::default()));
    if !options.live || !redraw {
        text.push('\n');
    }
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(DemoError::Write)
}
