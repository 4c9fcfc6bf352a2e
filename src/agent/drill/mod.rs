//! The DR drill: one source cluster (all its namespaces) treated as lost
//! for a while, without touching it, so that everything downstream runs
//! the real code path of an outage: the engine's hold for `hold_for` (or
//! the immediate withdrawal of `source_loss = "withdraw"`), the withdrawal
//! at expiry, the telemetry's `source_lost` and `hold_expired`.
//!
//! It acts at one boundary, between the watchers and the engine (`gate.rs`):
//! when a drill starts, the engine receives `WatchEvent::Lost` for each of
//! the source's namespaces, exactly as on a real outage, and nothing of that
//! source afterwards; the guard's confirmation queries to it fail. When it
//! ends, the gate asks the source's watchers for a fresh full listing
//! (`Client::request_relist`) and lets the source through again from that
//! listing's `Init`: no stale buffered event is replayed, and nothing waits
//! for the next resync. The timeline (`timeline.rs`) is recorded from the
//! telemetry's events and the destinations' publishers.
//!
//! Why the gate sits on the engine's input rather than in each watcher's
//! forwarding task: one place sees every source (including any a live
//! reload adds), and the watchers, the forwarding and the engine stay as
//! they are. Only the source side is isolated: what the agent publishes
//! into that cluster, if it is also a destination, goes on.
//!
//! Must not: decide anything about replicas itself, or keep events to
//! replay later.

mod gate;
mod timeline;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use super::Endpoint;
use super::engine::SourceEvent;
use super::wiring::Rewire;
use crate::cluster::Client;
use crate::config::SourceLoss;
use crate::model::ClusterId;
use crate::reconcile::publish::Publisher;
use crate::runtime::{Tasks, lock};
use crate::status::drill::{Control, Drill, DrillControl, Phase, Refusal, Step, StepKind};
use crate::telemetry::Telemetry;

use gate::{Command, Reader};

/// Starts, ends and reports drills of one agent. Cheap to clone; get it
/// from [`Agent::drills`](super::Agent::drills) after
/// [`Agent::with_drills`](super::Agent::with_drills). Drills can be started
/// once the agent runs and has done its first full sync.
#[derive(Clone)]
pub struct Drills {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Drills {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drills")
            .field(
                "current",
                &self.current().map(|d| (d.id, d.source, d.phase)),
            )
            .finish_non_exhaustive()
    }
}

struct Shared {
    telemetry: Telemetry,
    token: Option<String>,
    board: Mutex<Board>,
    /// A drill started or ended: the timeline task looks again.
    wake: Notify,
}

#[derive(Default)]
struct Board {
    /// Set once the agent runs: the gate's commands.
    gate: Option<mpsc::UnboundedSender<Command>>,
    /// Set at the agent's wiring, and again at each reload.
    wired: Option<Wired>,
    /// The running drill, or the last one.
    drill: Option<Drill>,
    /// The running drill's bookkeeping.
    run: Option<Run>,
    next_id: u64,
}

/// What the running agent reads.
struct Wired {
    /// Per source cluster, its namespaces' readers (sorted by namespace).
    readers: BTreeMap<ClusterId, Vec<Reader>>,
    /// Per source cluster, the publishers of the destinations it feeds.
    feeds: HashMap<ClusterId, Vec<Publisher>>,
    /// Per source cluster, the destinations of its routes.
    destinations: HashMap<ClusterId, Vec<ClusterId>>,
    source_loss: SourceLoss,
    hold_for: Duration,
}

/// The running drill, beside its document.
struct Run {
    source: ClusterId,
    started: Instant,
    ends: Instant,
    /// Namespaces whose replicas the engine withdrew (at once or at expiry).
    withdrawing: Vec<String>,
    withdrawn: bool,
    expired: bool,
    /// `listings` of each namespace in `/status` when it was restored.
    listings_at_restore: HashMap<String, u64>,
    relisted: Vec<String>,
}

impl Drills {
    /// Drills for an agent, with `token` required on the status server's
    /// `/drill` (see [`Control`]); nothing runs before the agent does.
    pub(super) fn new(telemetry: Telemetry, token: Option<String>) -> Self {
        Self {
            shared: Arc::new(Shared {
                telemetry,
                token,
                board: Mutex::new(Board::default()),
                wake: Notify::new(),
            }),
        }
    }

    /// Isolates `source` (a source cluster id) for `duration`.
    pub fn start(&self, source: &str, duration: Duration) -> Result<Drill, Refusal> {
        self.shared.start(source, duration)
    }

    /// Ends the running drill now; the source is relisted.
    pub fn end(&self) -> Result<Drill, Refusal> {
        self.shared.end(true)
    }

    /// The running drill, or else the last one.
    pub fn current(&self) -> Option<Drill> {
        lock(&self.shared.board).drill.clone()
    }

    /// The status server's `/drill` endpoints over these drills.
    pub(super) fn control(&self) -> Control {
        Control {
            drills: Arc::new(self.clone()),
            token: self.shared.token.clone(),
        }
    }

    /// Puts the gate between the watchers' `events` and the engine and
    /// starts the timeline; the engine takes the returned channel.
    pub(super) fn gate(
        &self,
        events: mpsc::Receiver<SourceEvent>,
        tasks: &Tasks,
    ) -> mpsc::Receiver<SourceEvent> {
        let (commands, gate_commands) = mpsc::unbounded_channel();
        lock(&self.shared.board).gate = Some(commands);
        let events = gate::start(events, gate_commands, tasks);
        let (shared, telemetry_events) = (self.shared.clone(), self.shared.telemetry.subscribe());
        let token = tasks.token().clone();
        tasks.spawn(
            "drill timeline",
            timeline::run(shared, telemetry_events, token),
        );
        events
    }

    /// Follows a wiring (at start and at each reload): the sources, their
    /// clients (`clients`, per source endpoint) and watcher generations,
    /// the destinations' publishers; and makes the guard's queries to an
    /// isolated source fail.
    pub(super) fn rewire(&self, rewire: &mut Rewire, clients: HashMap<Endpoint, Client>) {
        let mut readers: BTreeMap<ClusterId, Vec<Reader>> = BTreeMap::new();
        for (at, read) in &mut rewire.sources {
            read.query = gate::guarded(self.clone(), at.0.clone(), read.query.clone());
            if let Some(client) = clients.get(at) {
                readers.entry(at.0.clone()).or_default().push(Reader {
                    namespace: at.1.clone(),
                    client: client.clone(),
                    generation: read.generation,
                });
            }
        }
        for list in readers.values_mut() {
            list.sort_by(|x, y| x.namespace.cmp(&y.namespace));
        }
        let config = &rewire.config;
        let mut destinations: HashMap<ClusterId, Vec<ClusterId>> = HashMap::new();
        for r in &config.routes {
            let to = destinations.entry(r.source().clone()).or_default();
            if !to.contains(r.destination()) {
                to.push(r.destination().clone());
            }
        }
        let feeds = destinations
            .iter()
            .map(|(source, to)| {
                let publishers = rewire
                    .publishers
                    .iter()
                    .filter(|((dest, _), _)| to.contains(dest))
                    .map(|(_, p)| p.clone())
                    .collect();
                (source.clone(), publishers)
            })
            .collect();
        lock(&self.shared.board).wired = Some(Wired {
            readers,
            feeds,
            destinations,
            source_loss: config.timings.source_loss,
            hold_for: config.timings.hold_for,
        });
    }

    /// Whether `cluster` is isolated now.
    fn isolates(&self, cluster: &ClusterId) -> bool {
        let board = lock(&self.shared.board);
        board.run.as_ref().is_some_and(|r| &r.source == cluster)
            && board
                .drill
                .as_ref()
                .is_some_and(|d| d.phase == Phase::Isolated)
    }

    /// Counts from 1 with each drill started (a confirmation query that saw
    /// another drill start meanwhile is not believed either).
    fn epoch(&self) -> u64 {
        lock(&self.shared.board).next_id
    }
}

impl DrillControl for Drills {
    fn start(&self, source: &str, duration: Duration) -> Result<Drill, Refusal> {
        Drills::start(self, source, duration)
    }

    fn end(&self) -> Result<Drill, Refusal> {
        Drills::end(self)
    }

    fn current(&self) -> Option<Drill> {
        Drills::current(self)
    }
}

impl Shared {
    fn start(&self, source: &str, duration: Duration) -> Result<Drill, Refusal> {
        let mut guard = lock(&self.board);
        let board = &mut *guard;
        let namespaces = self.may_start(board, source)?;
        let (Some(wired), Some(gate)) = (&board.wired, &board.gate) else {
            return Err(Refusal::NotNow("the agent is not running yet".into()));
        };
        let cluster = ClusterId(source.to_owned());
        let (replicas, services) = wired.totals(&cluster, &self.telemetry);
        board.next_id += 1;
        let now = SystemTime::now();
        let mut drill = Drill {
            id: board.next_id,
            source: source.to_owned(),
            namespaces: namespaces.clone(),
            duration_ms: millis(duration),
            source_loss: match wired.source_loss {
                SourceLoss::Hold => "hold".into(),
                SourceLoss::Withdraw => "withdraw".into(),
            },
            hold_for_ms: millis(wired.hold_for),
            replicas,
            services,
            started_at_ms: unix_ms(now),
            ends_at_ms: unix_ms(now + duration),
            phase: Phase::Isolated,
            ended_early: false,
            timeline: Vec::new(),
        };
        let started = Instant::now();
        push(
            &mut drill,
            started,
            StepKind::Started,
            format!(
                "isolating {source} ({}) for {}: {replicas} replica(s) in {services} service(s) of {}",
                namespaces.join(", "),
                humanize(duration),
                wired.destinations_of(&cluster)
            ),
        );
        // The gate sends the engine `Lost` for each namespace; the engine
        // then holds or withdraws, and says so through the telemetry.
        let _ = gate.send(Command::Isolate(wired.readers_of(&cluster)));
        board.run = Some(Run {
            source: cluster,
            started,
            ends: started + duration,
            withdrawing: Vec::new(),
            withdrawn: false,
            expired: false,
            listings_at_restore: HashMap::new(),
            relisted: Vec::new(),
        });
        board.drill = Some(drill.clone());
        drop(guard);
        self.wake.notify_one();
        Ok(drill)
    }

    /// The namespaces of `source` if a drill of it may start now, else why not.
    fn may_start(&self, board: &Board, source: &str) -> Result<Vec<String>, Refusal> {
        let (Some(wired), Some(_)) = (&board.wired, &board.gate) else {
            return Err(Refusal::NotNow("the agent is not running yet".into()));
        };
        if let Some(d) = board.drill.as_ref().filter(|d| d.running()) {
            return Err(Refusal::Busy(Box::new(d.clone())));
        }
        let Some(readers) = wired.readers.get(&ClusterId(source.to_owned())) else {
            return Err(Refusal::UnknownSource {
                cluster: source.to_owned(),
                known: wired.readers.keys().map(|c| c.0.clone()).collect(),
            });
        };
        let namespaces: Vec<String> = readers.iter().map(|r| r.namespace.clone()).collect();
        if !self.telemetry.is_ready() {
            return Err(Refusal::NotNow(
                "the agent has not finished its first full sync: a drill now would rehearse nothing"
                    .into(),
            ));
        }
        let status = self.telemetry.status();
        let lost = |ns: &String| {
            status
                .sources
                .get(&format!("{source}/{ns}"))
                .is_some_and(|s| s.lost)
        };
        if namespaces.iter().any(lost) {
            return Err(Refusal::NotNow(format!(
                "source {source} is lost already (a real outage): nothing to rehearse"
            )));
        }
        Ok(namespaces)
    }

    /// Ends the isolation (`early`: on request, else its time is up).
    fn end(&self, early: bool) -> Result<Drill, Refusal> {
        let mut guard = lock(&self.board);
        let board = &mut *guard;
        let (Some(drill), Some(run), Some(wired), Some(gate)) = (
            board.drill.as_mut(),
            board.run.as_mut(),
            board.wired.as_ref(),
            board.gate.as_ref(),
        ) else {
            return Err(Refusal::NoDrill);
        };
        if drill.phase != Phase::Isolated {
            // Restoring already: ending it again changes nothing.
            return Ok(drill.clone());
        }
        let source = run.source.clone();
        if wired.source_loss == SourceLoss::Hold && !run.expired {
            push(
                drill,
                run.started,
                StepKind::HeldThroughout,
                format!(
                    "held throughout: {} replica(s) of {source} stayed published in {} (the drill ended within hold_for {})",
                    drill.replicas,
                    wired.destinations_of(&source),
                    humanize(wired.hold_for)
                ),
            );
        }
        let status = self.telemetry.status();
        run.listings_at_restore = drill
            .namespaces
            .iter()
            .map(|ns| {
                let listings = status
                    .sources
                    .get(&format!("{source}/{ns}"))
                    .map_or(0, |s| s.listings);
                (ns.clone(), listings)
            })
            .collect();
        drill.phase = Phase::Restoring;
        drill.ended_early = early;
        drill.ends_at_ms = unix_ms(SystemTime::now());
        let why = if early { "ended early" } else { "time is up" };
        push(
            drill,
            run.started,
            StepKind::Restored,
            format!("{source} restored ({why}): relisting it in full"),
        );
        let _ = gate.send(Command::Restore(wired.readers_of(&source)));
        let doc = drill.clone();
        drop(guard);
        self.wake.notify_one();
        Ok(doc)
    }
}

impl Wired {
    /// How each namespace of `source` is read now.
    fn readers_of(&self, source: &ClusterId) -> (ClusterId, Vec<Reader>) {
        let readers = self.readers.get(source).cloned().unwrap_or_default();
        (source.clone(), readers)
    }

    /// Replicas and destination services the routes from `source` want now.
    fn totals(&self, source: &ClusterId, telemetry: &Telemetry) -> (usize, usize) {
        let status = telemetry.status();
        self.destinations
            .get(source)
            .into_iter()
            .flatten()
            .filter_map(|dest| status.routes.get(&format!("{source} -> {dest}")))
            .fold((0, 0), |(r, s), route| {
                (r + route.replicas, s + route.services)
            })
    }

    /// `b, c`: where `source`'s replicas go.
    fn destinations_of(&self, source: &ClusterId) -> String {
        let to: Vec<&str> = self
            .destinations
            .get(source)
            .into_iter()
            .flatten()
            .map(|c| c.0.as_str())
            .collect();
        to.join(", ")
    }

    /// Whether every destination `source` feeds has taken all it was sent.
    fn settled(&self, source: &ClusterId) -> bool {
        self.feeds
            .get(source)
            .is_none_or(|p| p.iter().all(Publisher::settled))
    }
}

/// Appends a step to `drill`'s timeline.
fn push(drill: &mut Drill, started: Instant, step: StepKind, detail: String) {
    tracing::info!(drill = drill.id, source = %drill.source, step = step.name(), "{detail}");
    drill.timeline.push(Step {
        at_ms: unix_ms(SystemTime::now()),
        elapsed_ms: millis(started.elapsed()),
        step,
        detail,
    });
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, millis)
}

/// `1m 30s`.
fn humanize(d: Duration) -> String {
    let whole = Duration::from_millis(millis(d));
    humantime_serde::re::humantime::format_duration(whole).to_string()
}

#[cfg(test)]
mod tests;
