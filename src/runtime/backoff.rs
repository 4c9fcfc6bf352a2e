//! Exponential backoff with full jitter, a cap and a reset.
//!
//! One `Backoff` belongs to one retry loop. It is validated when built, so a
//! loop can never spin with a zero delay or wait forever.

use std::time::Duration;

use rand::Rng;

/// Invalid backoff settings.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackoffError {
    /// `min` must be above zero and at most `max`.
    #[error("backoff bounds must satisfy 0 < min <= max (got min {min:?}, max {max:?})")]
    Bounds {
        /// Smallest delay.
        min: Duration,
        /// Largest delay.
        max: Duration,
    },
    /// Jitter is a share of the delay, within `0.0..=1.0`.
    #[error("backoff jitter must be within 0.0..=1.0 (got {0})")]
    Jitter(f64),
}

/// Delays that double from `min` up to `max`, each shortened by a random
/// share of up to `jitter`, so that many clients cut off together do not
/// come back together.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    jitter: f64,
    attempt: u32,
}

impl Backoff {
    /// Checks the bounds and builds the backoff.
    pub fn try_new(min: Duration, max: Duration, jitter: f64) -> Result<Self, BackoffError> {
        if min.is_zero() || min > max {
            return Err(BackoffError::Bounds { min, max });
        }
        if !(0.0..=1.0).contains(&jitter) {
            return Err(BackoffError::Jitter(jitter));
        }
        Ok(Self {
            min,
            max,
            jitter,
            attempt: 0,
        })
    }

    /// The delay before the next attempt; each call doubles the base delay
    /// until it reaches the cap.
    pub fn next_delay(&mut self) -> Duration {
        let base = self
            .min
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let cut = if self.jitter > 0.0 {
            rand::rng().random_range(0.0..=self.jitter)
        } else {
            0.0
        };
        base.mul_f64(1.0 - cut).max(
            self.min
                .mul_f64(1.0 - self.jitter)
                .max(Duration::from_millis(1)),
        )
    }

    /// Starts over from `min` (after a healthy run).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rejects_bad_settings() {
        let s = Duration::from_secs(1);
        assert!(Backoff::try_new(Duration::ZERO, s, 0.1).is_err());
        assert!(Backoff::try_new(s * 2, s, 0.1).is_err());
        assert!(Backoff::try_new(s, s, 1.5).is_err());
    }

    #[test]
    fn doubles_to_the_cap_and_resets() {
        let mut b =
            Backoff::try_new(Duration::from_millis(100), Duration::from_millis(800), 0.0).unwrap();
        let seen: Vec<_> = (0..6).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(seen, vec![100, 200, 400, 800, 800, 800]);
        b.reset();
        assert_eq!(b.next_delay().as_millis(), 100);
    }

    proptest! {
        #[test]
        fn delays_stay_within_bounds(min_ms in 1u64..1000, extra in 0u64..10_000, jitter in 0.0f64..=1.0, n in 1usize..40) {
            let (min, max) = (Duration::from_millis(min_ms), Duration::from_millis(min_ms + extra));
            let mut b = Backoff::try_new(min, max, jitter).unwrap();
            for _ in 0..n {
                let d = b.next_delay();
                prop_assert!(d <= max);
                prop_assert!(d >= Duration::from_millis(1));
            }
        }
    }
}
