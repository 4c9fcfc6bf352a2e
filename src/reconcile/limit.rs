//! Pacing that follows the destination: how many sets one publisher may
//! have in flight ([`ConcurrencyLimit`]), learnt from how the destination
//! answers, and how many it may start per second ([`Rate`]).
//!
//! Pure: no I/O and no clock reads. The publisher passes in when a set was
//! sent and when its answer came; everything here is a function of those.
//!
//! The limit is AIMD over answers, judged by latency as TCP Vegas judges
//! round trips, not by single samples:
//!
//! - it starts small ([`LimitSettings::initial`]) and doubles per round
//!   (slow start) while the destination keeps up, so a first sync reaches a
//!   useful depth within a few round trips; after the first sign of trouble
//!   it grows by one per round (additive increase);
//! - a round is the next `limit` answers. It is *slow* when even its fastest
//!   ack took longer than the tolerance over the baseline: the destination
//!   is queueing our sets, so more in flight only makes every answer later.
//!   The fastest, not each ack: on a shared machine single acks jitter (a
//!   scheduler hiccup, a collection in the server), and one late ack says
//!   nothing about a queue; a round whose every ack is late does;
//! - a slow round, and any retryable failure (a timeout, a lost connection,
//!   a server refusing for load: Nacos answers 503 when its TPS control
//!   trips, 300 while starting), cuts the limit by [`LimitSettings::backoff`],
//!   never below 1;
//! - once per episode: answers of sets sent before the last cut reflect the
//!   load before it, so they neither cut again nor count in a round (as TCP
//!   reduces once per window of loss). Without this, 64 sets timing out
//!   together would take the limit from 64 to 1;
//! - a refusal for good (an invalid set, auth) is about that set, not about
//!   the destination's load: it changes nothing. One bad service submitted
//!   on every change would otherwise pin the whole destination's limit low;
//! - a round grows the limit only when it was used (at least half of it in
//!   flight): acks of a trickle say nothing about what a burst would do;
//! - the baseline is the fastest ack of the last one to two
//!   [`LimitSettings::baseline_window`]s, so it recovers: a destination that
//!   became slower for good (moved further away) gets a new, higher
//!   baseline and its limit back, instead of being judged against a speed it
//!   no longer has.
//!
//! The rate is a token bucket (GCRA): at most `per_second` starts in any
//! second, in bursts of at most [`Rate::BURST_SPAN`] worth. A burst is
//! needed because timers fire on whole milliseconds: a ticker at 10,000/s
//! would start one set per millisecond, not ten.

use std::time::Duration;

use tokio::time::Instant;

/// How the concurrency limit moves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitSettings {
    /// The limit at start (clamped to the ceiling).
    pub initial: usize,
    /// The limit never goes above this (`timings.max_publishes_in_flight`).
    pub ceiling: usize,
    /// A round is slow when its fastest ack took more than this many times
    /// the baseline ...
    pub tolerance: f64,
    /// ... and more than the baseline plus this (sub-millisecond baselines
    /// on loopback jitter by several times without any queue behind them).
    pub slack: Duration,
    /// The limit is multiplied by this on a cut (then rounded down).
    pub backoff: f64,
    /// The baseline is the fastest ack over the last one to two of these.
    pub baseline_window: Duration,
}

impl LimitSettings {
    /// The defaults under `ceiling`.
    pub fn with_ceiling(ceiling: usize) -> Self {
        Self {
            ceiling,
            ..Self::default()
        }
    }
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            // Small enough not to flood a destination nobody has measured yet,
            // large enough that slow start reaches 128 in four rounds.
            initial: 8,
            ceiling: 128,
            tolerance: 2.0,
            slack: Duration::from_millis(5),
            // Gentler than TCP's halving: a latency signal comes earlier
            // than a loss, so less needs taking back.
            backoff: 0.7,
            baseline_window: Duration::from_secs(10),
        }
    }
}

/// What came back for one set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged.
    Acked,
    /// Failed in a way retrying can fix: a timeout, no connection, a refusal
    /// for load. A sign of trouble.
    Failed,
    /// Refused for good (the set itself is wrong). Says nothing about load.
    Refused,
}

/// One answer, with its times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// When the set was sent.
    pub sent: Instant,
    /// When its answer came (not before `sent`).
    pub answered: Instant,
    /// Sets in flight when it was sent, itself included.
    pub in_flight: usize,
    /// What came back.
    pub outcome: Outcome,
}

/// The answers of the current round.
#[derive(Debug, Clone, Copy, Default)]
struct Round {
    /// Answers counted.
    answers: usize,
    /// The fastest ack among them.
    best: Option<Duration>,
    /// The most sets in flight when one of them was sent.
    busiest: usize,
}

/// The fastest ack of the current window and of the one before.
#[derive(Debug, Clone, Copy, Default)]
struct Baseline {
    /// Start of the current window and its fastest ack.
    current: Option<(Instant, Duration)>,
    /// The fastest ack of the window before (if it ended less than a window ago).
    previous: Option<Duration>,
}

impl Baseline {
    fn add(&mut self, at: Instant, latency: Duration, window: Duration) {
        let Some((start, best)) = self.current else {
            self.current = Some((at, latency));
            return;
        };
        let age = at.saturating_duration_since(start);
        if age < window {
            self.current = Some((start, best.min(latency)));
        } else {
            // A window that ended a whole window ago tells nothing about now.
            self.previous = (age < window * 2).then_some(best);
            self.current = Some((at, latency));
        }
    }

    fn get(&self) -> Option<Duration> {
        let current = self.current.map(|(_, best)| best);
        match (current, self.previous) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The adaptive limit on sets in flight to one destination.
#[derive(Debug, Clone)]
pub struct ConcurrencyLimit {
    settings: LimitSettings,
    limit: usize,
    /// Doubling per round until the first cut.
    slow_start: bool,
    /// When the limit was last cut: answers of sets sent before are ignored.
    last_cut: Option<Instant>,
    round: Round,
    baseline: Baseline,
}

impl ConcurrencyLimit {
    /// A limit at `settings.initial`, within `[1, settings.ceiling]`.
    pub fn new(settings: LimitSettings) -> Self {
        let ceiling = settings.ceiling.max(1);
        let settings = LimitSettings {
            ceiling,
            ..settings
        };
        Self {
            limit: settings.initial.clamp(1, ceiling),
            settings,
            slow_start: true,
            last_cut: None,
            round: Round::default(),
            baseline: Baseline::default(),
        }
    }

    /// Sets that may be in flight now: within `[1, ceiling]`.
    pub fn current(&self) -> usize {
        self.limit
    }

    /// The fastest recent ack, if any came.
    pub fn baseline(&self) -> Option<Duration> {
        self.baseline.get()
    }

    /// Whether the limit still doubles per round (no sign of trouble yet).
    pub fn in_slow_start(&self) -> bool {
        self.slow_start
    }

    /// Takes one answer into account.
    pub fn answered(&mut self, answer: Answer) {
        let latency = answer.answered.saturating_duration_since(answer.sent);
        if answer.outcome == Outcome::Acked {
            self.baseline
                .add(answer.answered, latency, self.settings.baseline_window);
        }
        // Sent before the last cut: it shows the load we already reacted to.
        if self.last_cut.is_some_and(|cut| answer.sent < cut) {
            return;
        }
        match answer.outcome {
            Outcome::Refused => {}
            Outcome::Failed => self.cut(answer.answered),
            Outcome::Acked => {
                let r = &mut self.round;
                r.answers += 1;
                r.best = Some(r.best.map_or(latency, |b| b.min(latency)));
                r.busiest = r.busiest.max(answer.in_flight);
                if r.answers >= self.limit {
                    self.end_round(answer.answered);
                }
            }
        }
    }

    /// The round is complete: slow, it cuts; fast and used, it grows.
    fn end_round(&mut self, at: Instant) {
        let round = std::mem::take(&mut self.round);
        let (Some(best), Some(base)) = (round.best, self.baseline.get()) else {
            return;
        };
        let s = &self.settings;
        let threshold = base.mul_f64(s.tolerance).max(base + s.slack);
        if best > threshold {
            self.cut(at);
            return;
        }
        if round.busiest * 2 < self.limit {
            return;
        }
        let grown = if self.slow_start {
            self.limit + round.answers
        } else {
            self.limit + 1
        };
        self.limit = grown.min(s.ceiling);
    }

    /// Multiplicative decrease, at least by one, never below one; ends slow
    /// start and begins a new round (and, if it took anything back, a new
    /// episode).
    fn cut(&mut self, at: Instant) {
        // Truncation is the point: the product is below `limit`, a usize.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let scaled = (self.limit as f64 * self.settings.backoff) as usize;
        let cut = scaled.min(self.limit.saturating_sub(1)).max(1);
        // At the floor nothing was taken back, so no episode begins: a
        // failure sent before this still counts once the limit has regrown.
        if cut < self.limit {
            self.last_cut = Some(at);
        }
        self.limit = cut;
        self.slow_start = false;
        self.round = Round::default();
    }
}

/// A hard ceiling on starts per second (GCRA, the token bucket as times):
/// `theoretical` is when the bucket would be empty again if nothing more
/// were taken; a start is allowed while that is no more than the burst
/// span ahead of now.
#[derive(Debug, Clone)]
pub struct Rate {
    /// Time one start uses up.
    interval: Duration,
    /// How far ahead of now `theoretical` may run (the burst, less one).
    tolerance: Duration,
    theoretical: Instant,
}

impl Rate {
    /// How much of the rate may go out at once.
    pub const BURST_SPAN: Duration = Duration::from_millis(2);

    /// At most `per_second` starts per second (at least 1), the first at
    /// `now`.
    pub fn per_second(per_second: u32, now: Instant) -> Self {
        let per_second = per_second.max(1);
        let interval = Duration::from_secs(1) / per_second;
        // One start at any rate; at high rates, what a timer tick holds.
        let burst = (u64::from(per_second) * 2 / 1000).max(1);
        let tolerance = interval * u32::try_from(burst - 1).unwrap_or(u32::MAX);
        Self {
            interval,
            tolerance,
            theoretical: now,
        }
    }

    /// `None` when a start is allowed at `now`, else when the next one is.
    pub fn ready_at(&self, now: Instant) -> Option<Instant> {
        let allowed = self.theoretical.checked_sub(self.tolerance)?;
        (allowed > now).then_some(allowed)
    }

    /// Takes one start at `now` (check [`Rate::ready_at`] first).
    pub fn take(&mut self, now: Instant) {
        self.theoretical = self.theoretical.max(now) + self.interval;
    }
}

#[cfg(test)]
#[path = "limit_tests.rs"]
mod tests;
