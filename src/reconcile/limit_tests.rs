//! The concurrency limit and the rate, on made-up times.

use proptest::prelude::*;

use super::*;

const MS: Duration = Duration::from_millis(1);

/// A clock and a limiter: rounds of answers at chosen latencies.
struct Drive {
    now: Instant,
    limit: ConcurrencyLimit,
}

impl Drive {
    fn new(settings: LimitSettings) -> Self {
        Self {
            now: start_clock(),
            limit: ConcurrencyLimit::new(settings),
        }
    }

    /// One answer for a set sent `latency` ago, with `in_flight` out then.
    fn answer(&mut self, latency: Duration, in_flight: usize, outcome: Outcome) {
        self.now += MS;
        let sent = self.now.checked_sub(latency).expect("clock far from zero");
        self.limit.answered(Answer {
            sent,
            answered: self.now,
            in_flight,
            outcome,
        });
    }

    /// A full round of acks at `latency`, the limit in use.
    fn round(&mut self, latency: Duration) -> usize {
        let n = self.limit.current();
        for _ in 0..n {
            self.answer(latency, n, Outcome::Acked);
        }
        self.limit.current()
    }
}

fn start_clock() -> Instant {
    // Far enough from the clock's zero that `sent` can lie in the past.
    Instant::now() + Duration::from_secs(3600)
}

#[test]
fn slow_start_doubles_per_round_up_to_the_ceiling() {
    let mut d = Drive::new(LimitSettings::default());
    assert_eq!(d.limit.current(), 8);
    let grown: Vec<usize> = (0..6).map(|_| d.round(MS)).collect();
    assert_eq!(grown, [16, 32, 64, 128, 128, 128]);
    assert!(d.limit.in_slow_start());
}

#[test]
fn a_slow_round_cuts_and_growth_is_additive_after() {
    let mut d = Drive::new(LimitSettings::default());
    d.round(MS);
    d.round(MS);
    assert_eq!(d.limit.current(), 32);
    // Every ack of the round 50x the baseline: the destination queues.
    assert_eq!(d.round(50 * MS), 22);
    assert!(!d.limit.in_slow_start());
    assert_eq!(d.round(MS), 23);
    assert_eq!(d.round(MS), 24);
}

#[test]
fn late_acks_within_a_fast_round_do_not_cut() {
    let mut d = Drive::new(LimitSettings::default());
    d.round(MS);
    let n = d.limit.current();
    // All but one ack of the round are very late: the fastest one decides.
    for i in 0..n {
        let latency = if i == 3 { MS } else { 400 * MS };
        d.answer(latency, n, Outcome::Acked);
    }
    assert_eq!(d.limit.current(), 2 * n);
}

#[test]
fn the_tolerance_and_the_slack_both_apply() {
    let mut d = Drive::new(LimitSettings::default());
    d.round(MS);
    // 5 ms over a 1 ms baseline is within the slack (6 ms): no cut.
    assert_eq!(d.round(6 * MS), 32);
    // 7 ms is over both 2 x 1 ms and 1 ms + 5 ms.
    assert_eq!(d.round(7 * MS), 22);

    // A 100 ms baseline: the ratio decides (200 ms), not the slack.
    let mut far = Drive::new(LimitSettings::default());
    far.round(100 * MS);
    assert_eq!(far.round(190 * MS), 32);
    assert_eq!(far.round(210 * MS), 22);
}

#[test]
fn failures_cut_once_per_episode() {
    let mut d = Drive::new(LimitSettings::default());
    d.round(MS);
    d.round(MS);
    assert_eq!(d.limit.current(), 32);
    // 32 sets sent together all time out: one cut, not 32.
    let sent = d.now;
    d.now += Duration::from_secs(3);
    for _ in 0..32 {
        d.limit.answered(Answer {
            sent,
            answered: d.now,
            in_flight: 32,
            outcome: Outcome::Failed,
        });
    }
    assert_eq!(d.limit.current(), 22);
    // A set sent after the cut that fails again: a new sign, a new cut.
    d.answer(MS / 2, 1, Outcome::Failed);
    assert_eq!(d.limit.current(), 15);
    // Late acks of sets sent before the cut are not counted towards a round.
    for _ in 0..40 {
        d.limit.answered(Answer {
            sent,
            answered: d.now,
            in_flight: 32,
            outcome: Outcome::Acked,
        });
    }
    assert_eq!(d.limit.current(), 15);
}

#[test]
fn a_refusal_for_good_changes_nothing() {
    let mut d = Drive::new(LimitSettings::default());
    d.round(MS);
    for _ in 0..100 {
        d.answer(MS, 16, Outcome::Refused);
    }
    assert_eq!(d.limit.current(), 16);
    assert!(d.limit.in_slow_start());
}

#[test]
fn an_unused_limit_does_not_grow() {
    let mut d = Drive::new(LimitSettings::default());
    // A trickle: never more than 3 of 8 in flight.
    for _ in 0..100 {
        d.answer(MS, 3, Outcome::Acked);
    }
    assert_eq!(d.limit.current(), 8);
    // Half of it in use is use.
    for _ in 0..8 {
        d.answer(MS, 4, Outcome::Acked);
    }
    assert_eq!(d.limit.current(), 16);
}

#[test]
fn the_baseline_recovers_after_a_lasting_slowdown() {
    let settings = LimitSettings::default();
    let mut d = Drive::new(settings);
    d.round(MS);
    d.round(MS);
    assert_eq!(d.limit.baseline(), Some(MS));
    // The destination is 50 ms away from now on: cut after cut to the floor...
    // (Answers of sets sent before each cut are passed over, so a round
    // takes more than `limit` answers here.)
    for _ in 0..200 {
        d.round(50 * MS);
    }
    assert_eq!(d.limit.current(), 1);
    // ... until the fast acks are two windows old: then 50 ms is the
    // baseline, and the limit grows again.
    d.now += settings.baseline_window * 2;
    for _ in 0..3 {
        d.round(50 * MS);
    }
    assert_eq!(d.limit.baseline(), Some(50 * MS));
    let before = d.limit.current();
    for _ in 0..5 {
        d.round(50 * MS);
    }
    assert_eq!(d.limit.current(), before + 5, "additive growth");
}

#[test]
fn the_limit_stays_between_one_and_the_ceiling() {
    let settings = LimitSettings {
        initial: 50,
        ceiling: 10,
        ..LimitSettings::default()
    };
    let mut d = Drive::new(settings);
    assert_eq!(d.limit.current(), 10);
    for _ in 0..5 {
        d.round(MS);
    }
    assert_eq!(d.limit.current(), 10);
    for _ in 0..20 {
        d.answer(MS, 1, Outcome::Failed);
    }
    assert_eq!(d.limit.current(), 1);
    let none = ConcurrencyLimit::new(LimitSettings::with_ceiling(0));
    assert_eq!(none.current(), 1);
}

/// Starts a rate allows over `span`, asked every millisecond (as a timer
/// would wake the publisher), as many as it allows each time.
fn starts_over(per_second: u32, span: Duration) -> usize {
    let t0 = start_clock();
    let mut rate = Rate::per_second(per_second, t0);
    let mut started = 0;
    let mut now = t0;
    while now < t0 + span {
        while rate.ready_at(now).is_none() {
            rate.take(now);
            started += 1;
        }
        now += MS;
    }
    started
}

#[test]
fn the_rate_is_a_hard_ceiling_that_timers_can_reach() {
    // Slow rates: one at a time, on time.
    let t0 = start_clock();
    let mut rate = Rate::per_second(10, t0);
    assert_eq!(rate.ready_at(t0), None);
    rate.take(t0);
    assert_eq!(rate.ready_at(t0), Some(t0 + 100 * MS));
    assert_eq!(starts_over(10, Duration::from_secs(3)), 30);
    // Fast rates are reached although a timer wakes only every millisecond,
    // and never passed by more than the burst.
    for per_second in [2000, 10_000, 50_000] {
        let n = starts_over(per_second, Duration::from_secs(1));
        let burst = (per_second as usize * 2 / 1000).max(1);
        assert!(
            (per_second as usize..=per_second as usize + burst).contains(&n),
            "{per_second}/s: {n} starts in a second"
        );
    }
    // A rate of 0 is read as 1.
    assert_eq!(starts_over(0, Duration::from_millis(2500)), 3);
}

#[derive(Debug, Clone)]
enum Step {
    Ack { latency_ms: u64, in_flight: usize },
    Fail { sent_ms_ago: u64 },
    Refuse,
    Idle { ms: u64 },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0u64..300, 1usize..200).prop_map(|(latency_ms, in_flight)| Step::Ack { latency_ms, in_flight }),
        2 => (0u64..5000).prop_map(|sent_ms_ago| Step::Fail { sent_ms_ago }),
        1 => Just(Step::Refuse),
        1 => (0u64..30_000).prop_map(|ms| Step::Idle { ms }),
    ]
}

proptest! {
    /// Whatever the destination does: the limit stays within [1, ceiling];
    /// every failure of a set sent after the last cut lowers it (unless it
    /// is 1 already), and none raises it; a refusal for good leaves it.
    #[test]
    fn the_limit_is_bounded_and_every_new_failure_lowers_it(
        initial in 0usize..300,
        ceiling in 0usize..300,
        steps in proptest::collection::vec(step(), 1..400),
    ) {
        let settings = LimitSettings { initial, ceiling, ..LimitSettings::default() };
        let top = ceiling.max(1);
        let mut limit = ConcurrencyLimit::new(settings);
        let mut now = start_clock();
        let mut last_cut: Option<Instant> = None;
        prop_assert!((1..=top).contains(&limit.current()));
        for s in steps {
            now += MS;
            let before = limit.current();
            match s {
                Step::Ack { latency_ms, in_flight } => {
                    let sent = now - Duration::from_millis(latency_ms);
                    limit.answered(Answer { sent, answered: now, in_flight, outcome: Outcome::Acked });
                    if limit.current() < before {
                        last_cut = Some(now);
                    }
                }
                Step::Fail { sent_ms_ago } => {
                    let sent = now - Duration::from_millis(sent_ms_ago);
                    limit.answered(Answer { sent, answered: now, in_flight: before, outcome: Outcome::Failed });
                    let after = limit.current();
                    prop_assert!(after <= before, "a failure raised {before} to {after}");
                    let new_sign = last_cut.is_none_or(|cut| sent >= cut);
                    if new_sign {
                        prop_assert!(after < before || before == 1, "failure left {before} at {after}");
                        if after < before {
                            last_cut = Some(now);
                        }
                    } else {
                        prop_assert_eq!(after, before, "one episode cut twice");
                    }
                }
                Step::Refuse => {
                    limit.answered(Answer { sent: now - MS, answered: now, in_flight: before, outcome: Outcome::Refused });
                    prop_assert_eq!(limit.current(), before);
                }
                Step::Idle { ms } => now += Duration::from_millis(ms),
            }
            prop_assert!((1..=top).contains(&limit.current()), "{} outside [1, {top}]", limit.current());
        }
    }
}
