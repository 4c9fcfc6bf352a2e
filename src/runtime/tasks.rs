//! Task ownership: every task a component starts is spawned through a
//! [`Tasks`], which holds the cancellation token that stops it and a
//! tracker that knows when it has ended.
//!
//! One family of tasks belongs to one owner (an agent, a command, a test).
//! The owner cancels it and waits with [`Tasks::shutdown`]: within the grace
//! period every task ends by itself; after it, whatever is still running is
//! aborted and named, so a stuck task is visible rather than leaked.
//! Components take a `&Tasks` and spawn on it; a component that must stop
//! on its own (a session, a publisher handle dropped) takes a
//! [`Tasks::child`], whose token it may cancel without stopping its owner.

use std::borrow::Cow;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::lock;

/// A family of owned tasks: one token stops them, one tracker waits for them.
/// Cheap to clone; clones share everything.
#[derive(Clone, Debug, Default)]
pub struct Tasks {
    token: CancellationToken,
    tracker: TaskTracker,
    running: Arc<Mutex<Vec<Running>>>,
}

#[derive(Debug)]
struct Running {
    name: Cow<'static, str>,
    handle: AbortHandle,
}

/// Left after the grace period: the tasks aborted, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shutdown {
    /// Tasks that had not ended within the grace period and were aborted.
    pub aborted: Vec<String>,
}

impl Tasks {
    /// A family stopped by `token` (and by [`Tasks::shutdown`]).
    pub fn new(token: CancellationToken) -> Self {
        Tasks {
            token,
            tracker: TaskTracker::new(),
            running: Arc::default(),
        }
    }

    /// The token that stops this family.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Whether the token has fired.
    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// The same family with a child token: cancelling the child stops only
    /// what watches it, cancelling this family stops the child too, and
    /// [`Tasks::shutdown`] on either waits for every task of the family.
    pub fn child(&self) -> Tasks {
        Tasks {
            token: self.token.child_token(),
            tracker: self.tracker.clone(),
            running: self.running.clone(),
        }
    }

    /// Spawns `task` under `name`. The task is expected to end when the
    /// token fires (select on [`Tasks::token`]); one that does not is
    /// aborted at the end of the grace period.
    pub fn spawn<F>(&self, name: impl Into<Cow<'static, str>>, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let handle = self.tracker.spawn(task).abort_handle();
        let mut running = lock(&self.running);
        running.retain(|r| !r.handle.is_finished());
        running.push(Running {
            name: name.into(),
            handle,
        });
    }

    /// The names of the tasks that have not ended yet.
    pub fn running(&self) -> Vec<String> {
        lock(&self.running)
            .iter()
            .filter(|r| !r.handle.is_finished())
            .map(|r| r.name.to_string())
            .collect()
    }

    /// Cancels the family and waits for every task to end, at most `grace`;
    /// then aborts the rest and says which they were.
    pub async fn shutdown(&self, grace: Duration) -> Shutdown {
        self.token.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
        {
            return Shutdown::default();
        }
        let mut aborted = Vec::new();
        for r in lock(&self.running).iter() {
            if !r.handle.is_finished() {
                r.handle.abort();
                aborted.push(r.name.to_string());
            }
        }
        // An aborted task ends at its next poll; a blocked thread would not,
        // so this wait is bounded too.
        let _ = tokio::time::timeout(ABORT_WAIT, self.tracker.wait()).await;
        Shutdown { aborted }
    }

    /// An executor for libraries that spawn their own background futures
    /// (the gRPC channel's connection and buffer tasks, HTTP/2 streams), so
    /// that they are waited for like ours. They are tracked, not named:
    /// hyper spawns one per request, and keeping a named, prunable list of
    /// those cost the publish path more than half its throughput (the
    /// benchmark's first sync went from 7.4 s to 16.8 s).
    pub fn executor(&self) -> Executor {
        Executor {
            tracker: self.tracker.clone(),
        }
    }
}

/// How long aborted tasks get to unwind.
const ABORT_WAIT: Duration = Duration::from_secs(1);

/// Spawns a library's background futures on a [`Tasks`] family's tracker.
#[derive(Clone, Debug)]
pub struct Executor {
    tracker: TaskTracker,
}

impl<F> hyper::rt::Executor<F> for Executor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, future: F) {
        self.tracker.spawn(future);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn shutdown_waits_for_tasks_that_stop_on_the_token() {
        let tasks = Tasks::default();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let token = tasks.token().clone();
        tasks.spawn("cleanup", async move {
            token.cancelled().await;
            // Work after the signal: shutdown must wait for it.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = tx.send(());
        });
        assert_eq!(tasks.running(), vec!["cleanup".to_owned()]);
        let report = tasks.shutdown(Duration::from_secs(5)).await;
        assert_eq!(report, Shutdown::default());
        assert!(rx.await.is_ok(), "shutdown returned before the task ended");
        assert!(tasks.running().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_ignores_the_token_is_aborted_and_named() {
        let tasks = Tasks::default();
        tasks.spawn("polite", {
            let token = tasks.token().clone();
            async move { token.cancelled().await }
        });
        tasks.spawn("stubborn", std::future::pending());
        let report = tasks.shutdown(Duration::from_secs(2)).await;
        assert_eq!(report.aborted, vec!["stubborn".to_owned()]);
        assert!(tasks.running().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_child_stops_alone_and_with_its_parent() {
        let parent = Tasks::default();
        let child = parent.child();
        child.token().cancel();
        assert!(!parent.is_cancelled());
        let other = parent.child();
        parent.token().cancel();
        assert!(other.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn finished_tasks_are_forgotten() {
        let tasks = Tasks::default();
        for _ in 0..100 {
            tasks.spawn("short", async {});
        }
        // Let them run: a bounded number of turns, never a sleep.
        for _ in 0..1000 {
            if tasks.running().is_empty() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(tasks.running().is_empty(), "the short tasks never ran");
        tasks.spawn("last", std::future::pending());
        assert!(lock(&tasks.running).len() <= 2);
        assert_eq!(
            tasks.shutdown(Duration::from_millis(10)).await.aborted,
            ["last"]
        );
    }
}
