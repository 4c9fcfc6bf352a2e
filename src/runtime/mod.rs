//! Machinery that knows nothing of Nacos: retry backoff.

pub mod backoff;

pub use backoff::{Backoff, BackoffError};
