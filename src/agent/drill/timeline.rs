//! The drill's timeline: one task that ends the isolation when its time is
//! up and records what the agent did meanwhile, from the telemetry's events
//! (`SourceLost`, `HoldExpired`) and its status document (a namespace's
//! `listings` count moving after the restore), and from the destinations'
//! publishers (settled: everything submitted was acknowledged).
//!
//! Two facts are waited for rather than told: the withdrawal is done when
//! the routes from the source want no replica any more and every
//! destination it feeds has settled; the drill has converged when every
//! namespace of the source finished its relist (the engine has then
//! submitted all of it: `listed` is reported after the listing is applied)
//! and those destinations have settled again.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{Board, Shared, humanize, push, unix_ms};
use crate::runtime::{lock, sleep_until_or_never, ticker};
use crate::status::drill::{Phase, StepKind};
use crate::telemetry::Event;

/// How often a running drill looks at its destinations.
const PROGRESS_CHECK: Duration = Duration::from_millis(100);

/// Runs until cancelled; a drill running then is recorded as stopped.
pub(super) async fn run(
    shared: Arc<Shared>,
    mut events: broadcast::Receiver<Event>,
    token: CancellationToken,
) {
    let mut progress = ticker(PROGRESS_CHECK);
    loop {
        let (ends, running) = {
            let board = lock(&shared.board);
            let isolated = board
                .drill
                .as_ref()
                .is_some_and(|d| d.phase == Phase::Isolated);
            let ends = board.run.as_ref().filter(|_| isolated).map(|r| r.ends);
            (ends, board.run.is_some())
        };
        tokio::select! {
            () = token.cancelled() => {
                lock(&shared.board).stopped();
                return;
            }
            () = shared.wake.notified() => {}
            () = sleep_until_or_never(ends) => {
                let _ = shared.end(false);
            }
            event = events.recv() => match event {
                Ok(e) => lock(&shared.board).on_event(&e),
                Err(RecvError::Lagged(n)) => warn!(missed = n, "drill timeline fell behind the events; steps may be missing"),
                Err(RecvError::Closed) => return,
            },
            _ = progress.tick(), if running => shared.progress(),
        }
    }
}

impl Shared {
    /// Records the withdrawal once done, the relists, and convergence.
    fn progress(&self) {
        let status = self.telemetry.status();
        let mut guard = lock(&self.board);
        let board = &mut *guard;
        let (Some(drill), Some(run), Some(wired)) = (
            board.drill.as_mut(),
            board.run.as_mut(),
            board.wired.as_ref(),
        ) else {
            return;
        };
        let source = run.source.clone();
        match drill.phase {
            Phase::Isolated => {
                let all_withdrawing = drill
                    .namespaces
                    .iter()
                    .all(|ns| run.withdrawing.contains(ns));
                if run.withdrawn || !all_withdrawing {
                    return;
                }
                let (left, _) = wired.totals(&source, &self.telemetry);
                if left == 0 && wired.settled(&source) {
                    run.withdrawn = true;
                    let detail = format!(
                        "withdrawn: {} acknowledged the removal of {} replica(s) of {source} in {} service(s)",
                        wired.destinations_of(&source),
                        drill.replicas,
                        drill.services
                    );
                    push(drill, run.started, StepKind::Withdrawn, detail);
                }
            }
            Phase::Restoring => {
                for ns in &drill.namespaces.clone() {
                    let Some(now) = status.sources.get(&format!("{source}/{ns}")) else {
                        continue;
                    };
                    let before = run.listings_at_restore.get(ns).copied().unwrap_or(0);
                    if now.listings > before && !run.relisted.contains(ns) {
                        run.relisted.push(ns.clone());
                        let detail = format!("{source}/{ns} relisted: {} service(s)", now.services);
                        push(drill, run.started, StepKind::Relisted, detail);
                    }
                }
                if run.relisted.len() < drill.namespaces.len() || !wired.settled(&source) {
                    return;
                }
                let (replicas, services) = wired.totals(&source, &self.telemetry);
                let detail = format!(
                    "converged: {} hold(s) what the routes want again, {replicas} replica(s) of {source} in {services} service(s)",
                    wired.destinations_of(&source)
                );
                push(drill, run.started, StepKind::Converged, detail);
                drill.phase = Phase::Converged;
                board.run = None;
            }
            Phase::Converged | Phase::Stopped => board.run = None,
        }
    }
}

impl Board {
    /// What the engine reported about the isolated source.
    fn on_event(&mut self, event: &Event) {
        let (Some(drill), Some(run), Some(wired)) =
            (self.drill.as_mut(), self.run.as_mut(), self.wired.as_ref())
        else {
            return;
        };
        if drill.phase != Phase::Isolated {
            return;
        }
        match event {
            Event::SourceLost {
                cluster,
                namespace,
                holding,
            } if *cluster == run.source => {
                if *holding {
                    let until = SystemTime::now() + wired.hold_for;
                    let detail = format!(
                        "{cluster}/{namespace} lost: its replicas are held for {} (until {})",
                        humanize(wired.hold_for),
                        humantime_serde::re::humantime::format_rfc3339_seconds(until)
                    );
                    push(drill, run.started, StepKind::HoldStarted, detail);
                } else {
                    run.withdrawing.push(namespace.clone());
                    let detail = format!(
                        "{cluster}/{namespace} lost: its replicas are withdrawn at once (source_loss = \"withdraw\")"
                    );
                    push(drill, run.started, StepKind::WithdrawnAtOnce, detail);
                }
            }
            Event::HoldExpired { cluster, namespace } if *cluster == run.source => {
                run.expired = true;
                run.withdrawing.push(namespace.clone());
                let detail = format!(
                    "{cluster}/{namespace}: hold_for {} over; withdrawing its replicas",
                    humanize(wired.hold_for)
                );
                push(drill, run.started, StepKind::HoldExpired, detail);
            }
            _ => {}
        }
    }

    /// The agent stops: a running drill ends here.
    fn stopped(&mut self) {
        let (Some(drill), Some(run)) = (self.drill.as_mut(), self.run.take()) else {
            return;
        };
        if drill.running() {
            drill.phase = Phase::Stopped;
            drill.ends_at_ms = drill.ends_at_ms.min(unix_ms(SystemTime::now()));
            let detail = "the agent stopped during the drill".to_owned();
            push(drill, run.started, StepKind::Stopped, detail);
        }
    }
}
