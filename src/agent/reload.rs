//! Live reload: a running agent takes a new configuration ([`Reloader`]).
//!
//! What a reload changes: clusters, routes, the mass-withdrawal guard and
//! what happens to a lost source's replicas (`source_loss`, `hold_for`).
//! Added routes start, removed routes withdraw their replicas, unchanged
//! routes keep every replica published throughout. The rest (the tag
//! prefix, the status address, the log format and the other timings) is
//! fixed for the life of the process: a reload that changes it applies the
//! rest and names those keys in [`ReloadReport::needs_restart`].

use std::fmt;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::AgentError;
use super::engine::{Control, RouteChanges};
use super::wiring::Wiring;
use crate::config::{Config, Timings};

/// Hands a new configuration to a running agent (from [`Agent::reloader`](super::Agent::reloader)).
/// Cheap to clone.
#[derive(Clone, Debug)]
pub struct Reloader {
    requests: mpsc::Sender<Request>,
}

/// A reload the running agent did not take.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The agent is not running (not started yet, or stopped).
    #[error("the agent is not running")]
    NotRunning,
    /// Starting a new cluster's client failed; nothing changed.
    #[error(transparent)]
    Agent(#[from] AgentError),
}

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReloadReport {
    /// Routes started, removed and kept.
    pub routes: RouteChanges,
    /// Keys whose new value the running agent did not take (it keeps the
    /// old one until a restart).
    pub needs_restart: Vec<&'static str>,
}

impl fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = |routes: &[crate::reconcile::Route]| {
            routes
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        write!(
            f,
            "{} route(s) added, {} removed, {} unchanged",
            self.routes.added.len(),
            self.routes.removed.len(),
            self.routes.unchanged
        )?;
        if !self.routes.added.is_empty() {
            write!(f, "; added: {}", names(&self.routes.added))?;
        }
        if !self.routes.removed.is_empty() {
            write!(f, "; removed: {}", names(&self.routes.removed))?;
        }
        if !self.needs_restart.is_empty() {
            write!(
                f,
                "; kept until a restart: {}",
                self.needs_restart.join(", ")
            )?;
        }
        Ok(())
    }
}

pub(super) type Request = (Config, oneshot::Sender<Result<ReloadReport, AgentError>>);

impl Reloader {
    pub(super) fn channel() -> (Reloader, mpsc::Receiver<Request>) {
        let (requests, rx) = mpsc::channel(4);
        (Reloader { requests }, rx)
    }

    /// Switches the running agent to `config` (checked already: it comes
    /// from [`config::load`](crate::config::load) or
    /// [`Config::builder`]) and says what changed. Returns once the engine
    /// runs on it: removed routes' withdrawals are queued, added routes'
    /// sources are being listed. On an error the running configuration stays.
    pub async fn reload(&self, config: Config) -> Result<ReloadReport, ReloadError> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send((config, tx))
            .await
            .map_err(|_| ReloadError::NotRunning)?;
        match rx.await {
            Ok(outcome) => outcome.map_err(ReloadError::from),
            Err(_) => Err(ReloadError::NotRunning),
        }
    }
}

/// Serves reload requests until `stop` fires, keeping the wiring (and so
/// every client) alive until then.
pub(super) async fn serve(
    mut wiring: Wiring,
    mut running: Arc<Config>,
    mut requests: mpsc::Receiver<Request>,
    engine: mpsc::Sender<Control>,
    stop: CancellationToken,
) {
    let mut open = true;
    loop {
        let request = tokio::select! {
            () = stop.cancelled() => return,
            r = requests.recv(), if open => r,
        };
        let Some((config, reply)) = request else {
            // Nobody can reload any more; the wiring still lives until stop.
            open = false;
            continue;
        };
        let (next, needs_restart) = effective(&running, config);
        let next = Arc::new(next);
        let outcome = match wiring.prepare(next.clone()) {
            Err(e) => Err(e),
            Ok((rewire, pending)) => {
                let (tx, rx) = oneshot::channel();
                if engine.send(Control::Rewire(rewire, tx)).await.is_err() {
                    return;
                }
                let Ok(routes) = rx.await else { return };
                wiring.commit(pending);
                running = next;
                Ok(ReloadReport {
                    routes,
                    needs_restart,
                })
            }
        };
        if let Ok(report) = &outcome {
            tracing::info!(%report, "configuration reloaded");
        }
        let _ = reply.send(outcome);
    }
}

/// The configuration a reload runs on: the new clusters, routes, guard
/// and source-loss handling, the running value of everything else; and the
/// keys whose new value waits for a restart.
fn effective(running: &Config, new: Config) -> (Config, Vec<&'static str>) {
    let (old, t) = (&running.timings, &new.timings);
    let mut needs_restart = Vec::new();
    let mut differs = |key: &'static str, changed: bool| {
        if changed {
            needs_restart.push(key);
        }
    };
    differs("agent.tag_prefix", running.tags != new.tags);
    differs(
        "agent.status_listen",
        running.status_listen != new.status_listen,
    );
    differs("agent.log_format", running.log_format != new.log_format);
    differs(
        "agent.control_token_env",
        running.control_token != new.control_token,
    );
    differs(
        "timings.list_interval",
        old.list_interval != t.list_interval,
    );
    differs(
        "timings.probe_interval",
        old.probe_interval != t.probe_interval,
    );
    differs(
        "timings.resync_interval",
        old.resync_interval != t.resync_interval,
    );
    differs(
        "timings.request_timeout",
        old.request_timeout != t.request_timeout,
    );
    differs(
        "timings.max_publishes_per_second",
        old.max_publishes_per_second != t.max_publishes_per_second,
    );
    differs(
        "timings.max_publishes_in_flight",
        old.max_publishes_in_flight != t.max_publishes_in_flight,
    );
    differs(
        "timings.max_reads_in_flight",
        old.max_reads_in_flight != t.max_reads_in_flight,
    );
    let timings = Timings {
        source_loss: t.source_loss,
        hold_for: t.hold_for,
        mass_withdraw_share: t.mass_withdraw_share,
        mass_withdraw_min_replicas: t.mass_withdraw_min_replicas,
        ..old.clone()
    };
    let config = Config {
        file: new.file,
        clusters: new.clusters,
        routes: new.routes,
        guard: new.guard,
        timings,
        ..running.clone()
    };
    (config, needs_restart)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn config(extra: &str) -> Config {
        let text = format!(
            "{extra}[[clusters]]\nid = \"a\"\nservers = [\"h:1\"]\n\
             [[clusters]]\nid = \"b\"\nservers = [\"h:2\"]\n[[routes]]\nfrom = \"a\"\nto = \"b\"\n"
        );
        crate::config::parse(std::path::Path::new("t.toml"), &text, &|_| None).expect("valid")
    }

    #[test]
    fn a_reload_takes_routes_and_loss_handling_and_names_what_waits_for_a_restart() {
        let running = config("");
        let new = config(
            "[agent]\nstatus_listen = \"127.0.0.1:1\"\n\
             [timings]\nhold_for = \"1m\"\nlist_interval = \"5s\"\n\
             max_publishes_in_flight = 16\n",
        );
        let (next, needs_restart) = effective(&running, new);
        assert_eq!(
            needs_restart,
            vec![
                "agent.status_listen",
                "timings.list_interval",
                "timings.max_publishes_in_flight"
            ]
        );
        assert_eq!(next.timings.max_publishes_in_flight, 128);
        assert_eq!(next.timings.hold_for, Duration::from_secs(60));
        assert_eq!(next.timings.list_interval, running.timings.list_interval);
        assert_eq!(next.status_listen, running.status_listen);
        let (same, none) = effective(&running, running.clone());
        assert_eq!(same, running);
        assert!(none.is_empty());
    }

    #[test]
    fn a_new_control_token_waits_for_a_restart() {
        let running = config("");
        let mut new = running.clone();
        new.control_token = Some(crate::config::ControlToken("t".into()));
        let (next, needs_restart) = effective(&running, new);
        assert_eq!(needs_restart, vec!["agent.control_token_env"]);
        assert_eq!(next.control_token, None);
    }
}
