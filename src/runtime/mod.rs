//! Machinery that knows nothing of Nacos: retry backoff, task ownership and
//! shutdown, and small helpers for locks and optional deadlines.

pub mod backoff;
pub mod tasks;

pub use backoff::{Backoff, BackoffError};
pub use tasks::{Executor, Shutdown, Tasks};

use std::sync::{Mutex, MutexGuard, PoisonError};

use std::time::Duration;

use tokio::time::{Instant, Interval, MissedTickBehavior};

/// Locks `m`. A panic elsewhere while holding it poisons nothing here: the
/// data behind these locks is always left whole between statements, so the
/// guard is taken as is.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Ticks every `period`, the first at once; a late tick is not bunched
/// with the next (every periodic loop here wants that).
pub fn ticker(period: Duration) -> Interval {
    let mut i = tokio::time::interval(period);
    i.set_missed_tick_behavior(MissedTickBehavior::Delay);
    i
}

/// As [`ticker`], the first tick after one period.
pub fn ticker_after(period: Duration) -> Interval {
    let mut i = ticker(period);
    i.reset();
    i
}

/// Sleeps until `deadline`; with none, never resolves (a `select!` branch
/// that is off until there is something to wait for).
pub async fn sleep_until_or_never(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// An error and its causes on one line, `outer: cause: root cause`: what a
/// log line or the status page shows (a `Display` alone often says only
/// what was being done, not why it failed).
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        line.push_str(": ");
        line.push_str(&c.to_string());
        cause = c.source();
    }
    line
}

#[cfg(test)]
mod cause_tests {
    #[derive(Debug, thiserror::Error)]
    #[error("publish instances on cluster b")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn an_error_is_shown_with_every_cause() {
        let e = Outer(std::io::Error::other("server said 500"));
        assert_eq!(
            super::with_causes(&e),
            "publish instances on cluster b: server said 500"
        );
        let alone = std::io::Error::other("plain");
        assert_eq!(super::with_causes(&alone), "plain");
    }
}
