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
