//! The drill's gate, between the watchers and the engine: it forwards
//! every source event, except those of an isolated source, and speaks for
//! that source as an outage would (`Lost` for each namespace).
//!
//! The transitions, per source namespace: open -> isolated (on
//! `Isolate`: `Lost` is sent, everything after it dropped) -> awaiting its
//! relist (on `Restore`: a fresh full listing is asked for; events are
//! dropped until its `Init`, so a listing the drill cut in two is never
//! completed from its second half) -> open. A real `Lost` while isolated
//! or awaiting is dropped too: the engine has the source as lost already,
//! and its reconnect lists in full, which opens the gate as well.

use std::collections::HashSet;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Drills;
use crate::agent::Endpoint;
use crate::agent::engine::{Query, SourceEvent};
use crate::cluster::watch::WatchEvent;
use crate::cluster::{Client, ClientError};
use crate::model::ClusterId;
use crate::runtime::Tasks;

/// One namespace of a source as the running wiring reads it.
#[derive(Clone)]
pub(super) struct Reader {
    pub(super) namespace: String,
    pub(super) client: Client,
    /// Its watcher's generation (the engine ignores events of another).
    pub(super) generation: u64,
}

/// What the drill tells the gate, with the source's readers at the time.
pub(super) enum Command {
    /// Treat this source cluster as lost.
    Isolate((ClusterId, Vec<Reader>)),
    /// It is back: relist it.
    Restore((ClusterId, Vec<Reader>)),
}

/// Starts the gate on `tasks`; the engine reads the returned channel.
pub(super) fn start(
    input: mpsc::Receiver<SourceEvent>,
    commands: mpsc::UnboundedReceiver<Command>,
    tasks: &Tasks,
) -> mpsc::Receiver<SourceEvent> {
    // As small as the watchers' channel: backpressure still reaches them.
    let (output, events) = mpsc::channel(128);
    let gate = Gate {
        output,
        isolated: None,
        awaiting: HashSet::new(),
    };
    let token = tasks.token().clone();
    tasks.spawn("drill gate", gate.run(input, commands, token));
    events
}

struct Gate {
    output: mpsc::Sender<SourceEvent>,
    isolated: Option<ClusterId>,
    /// Restored namespaces whose relist has not begun yet.
    awaiting: HashSet<Endpoint>,
}

/// The engine is gone.
struct Closed;

impl Gate {
    async fn run(
        mut self,
        mut input: mpsc::Receiver<SourceEvent>,
        mut commands: mpsc::UnboundedReceiver<Command>,
        token: CancellationToken,
    ) {
        let mut commands_open = true;
        loop {
            tokio::select! {
                // A command first: an event read after it is judged by it.
                biased;
                () = token.cancelled() => return,
                command = commands.recv(), if commands_open => match command {
                    Some(c) => if self.obey(c).await.is_err() { return },
                    None => commands_open = false,
                },
                event = input.recv() => match event {
                    Some(e) => if self.pass(e).await.is_err() { return },
                    // Every watcher stopped: the engine sees the end too.
                    None => return,
                },
            }
        }
    }

    async fn obey(&mut self, command: Command) -> Result<(), Closed> {
        match command {
            Command::Isolate((cluster, readers)) => {
                self.awaiting.retain(|(c, _)| *c != cluster);
                self.isolated = Some(cluster.clone());
                for reader in readers {
                    let lost = SourceEvent {
                        cluster: cluster.clone(),
                        namespace: reader.namespace,
                        generation: reader.generation,
                        event: WatchEvent::Lost,
                        received: Instant::now(),
                    };
                    self.output.send(lost).await.map_err(|_| Closed)?;
                }
            }
            Command::Restore((cluster, readers)) => {
                if self.isolated.as_ref() == Some(&cluster) {
                    self.isolated = None;
                }
                // Awaiting before asking: the relist's Init cannot overtake it.
                for reader in readers {
                    self.awaiting.insert((cluster.clone(), reader.namespace));
                    reader.client.request_relist();
                }
            }
        }
        Ok(())
    }

    async fn pass(&mut self, e: SourceEvent) -> Result<(), Closed> {
        if self.isolated.as_ref() == Some(&e.cluster) {
            return Ok(());
        }
        if !self.awaiting.is_empty() {
            let at = (e.cluster.clone(), e.namespace.clone());
            if self.awaiting.contains(&at) {
                if e.event != WatchEvent::Init {
                    return Ok(());
                }
                self.awaiting.remove(&at);
            }
        }
        self.output.send(e).await.map_err(|_| Closed)
    }
}

/// `query`, failing while `source` is isolated (asked then, or answered
/// then, or a drill started meanwhile): the guard then keeps the replicas,
/// as it does when a lost source cannot be asked.
pub(super) fn guarded(drills: Drills, source: ClusterId, query: Query) -> Query {
    std::sync::Arc::new(move |key| {
        let (drills, source) = (drills.clone(), source.clone());
        let asked = (!drills.isolates(&source)).then(|| query(key));
        let epoch = drills.epoch();
        Box::pin(async move {
            let isolated = || ClientError::NotConnected {
                cluster: source.clone(),
                last_error: "isolated by a DR drill".into(),
            };
            let Some(asked) = asked else {
                return Err(isolated());
            };
            let answer = asked.await;
            if drills.isolates(&source) || drills.epoch() != epoch {
                return Err(isolated());
            }
            answer
        })
    })
}
