//! Owns the life of one provider batch as a pure function of time: which stage it is in at
//! an instant, how many of its lines have been answered, and when it ends. Nothing runs in
//! the background: a batch is only ever looked at when a client asks about it, so the stage
//! is computed from the creation instant, the knobs and an optional cancel instant.
//!
//! The timeline of a batch whose time to complete is `d`, with `step = min(d / 10, 1 s)`:
//!
//! ```text
//! 0 ── validating ── step ── in_progress ── d - step ── finalizing ── d: completed
//!                     └─ failed (rejected)          expiring: in_progress until d: expired
//! cancel at c (before the end): cancelling until c + step, then cancelled
//! ```
//!
//! `step` is short and bounded so a poller sees the intermediate stages without a test having
//! to wait a tenth of a long completion time.

use std::time::{Duration, Instant};

/// The longest a transitional stage (validating, finalizing, cancelling) lasts.
const MAX_STEP: Duration = Duration::from_secs(1);

/// How a batch will end if nobody cancels it; drawn once, when it is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    /// Every line is answered.
    Complete,
    /// The completion window runs out first: a part of the lines are answered.
    Expire,
    /// Validation fails: no line is answered.
    Reject,
}

/// Where a batch is at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    Validating,
    InProgress,
    Finalizing,
    Cancelling,
    Ended(Ending),
}

/// How a batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    Completed,
    Expired,
    Failed,
    Cancelled,
}

/// The timeline of one batch.
#[derive(Debug, Clone)]
pub(crate) struct Lifecycle {
    created: Instant,
    duration: Duration,
    fate: Fate,
    /// Fraction of the lines answered when the batch is cut short (cancelled or expired).
    partial: f64,
    cancelled_at: Option<Instant>,
}

impl Lifecycle {
    /// A batch created at `created` that takes `duration` to complete and ends as `fate`.
    pub(crate) fn new(created: Instant, duration: Duration, fate: Fate, partial: f64) -> Self {
        Self { created, duration, fate, partial: partial.clamp(0.0, 1.0), cancelled_at: None }
    }

    /// The instant the batch was created.
    pub(crate) fn created(&self) -> Instant {
        self.created
    }

    /// When cancellation was requested, if it was (and took effect).
    pub(crate) fn cancelled_at(&self) -> Option<Instant> {
        self.cancelled_at
    }

    fn step(&self) -> Duration {
        (self.duration / 10).min(MAX_STEP)
    }

    /// When the batch ends if nobody cancels it.
    fn natural_end(&self) -> Instant {
        match self.fate {
            Fate::Reject => self.created + self.step(),
            Fate::Complete | Fate::Expire => self.created + self.duration,
        }
    }

    /// When the batch ends (or ended), given the cancel requested so far.
    pub(crate) fn ends_at(&self) -> Instant {
        self.cancelled_at.map_or_else(|| self.natural_end(), |c| c + self.step())
    }

    /// When the in-progress stage began, if it was reached by `now`.
    pub(crate) fn in_progress_since(&self, now: Instant) -> Option<Instant> {
        let start = self.created + self.step();
        let reached = self.fate != Fate::Reject && now >= start && self.cancelled_at.is_none_or(|c| c >= start);
        reached.then_some(start)
    }

    /// When the finalizing stage began, if it was reached by `now`.
    pub(crate) fn finalizing_since(&self, now: Instant) -> Option<Instant> {
        let start = self.created + self.duration.saturating_sub(self.step());
        let reached = self.fate == Fate::Complete && now >= start && self.cancelled_at.is_none_or(|c| c >= start);
        reached.then_some(start)
    }

    /// The stage at `now`.
    pub(crate) fn stage(&self, now: Instant) -> Stage {
        if let Some(cancelled) = self.cancelled_at {
            return if now < cancelled + self.step() { Stage::Cancelling } else { Stage::Ended(Ending::Cancelled) };
        }
        if now >= self.natural_end() {
            return Stage::Ended(match self.fate {
                Fate::Complete => Ending::Completed,
                Fate::Expire => Ending::Expired,
                Fate::Reject => Ending::Failed,
            });
        }
        if now < self.created + self.step() {
            Stage::Validating
        } else if self.finalizing_since(now).is_some() {
            Stage::Finalizing
        } else {
            Stage::InProgress
        }
    }

    /// Requests cancellation at `now`. Returns whether the batch is (now or already) being
    /// cancelled; a batch that has ended cannot be cancelled.
    pub(crate) fn cancel(&mut self, now: Instant) -> bool {
        if self.cancelled_at.is_some() {
            return true;
        }
        if matches!(self.stage(now), Stage::Ended(_)) {
            return false;
        }
        self.cancelled_at = Some(now);
        true
    }

    /// How many of `lines` lines have been answered by `now` (the first ones, in input order).
    ///
    /// Lines are answered at a steady pace through the in-progress stage. A batch cut short
    /// keeps at least the `partial` fraction, and an expiring batch never gets beyond it.
    pub(crate) fn answered(&self, lines: usize, now: Instant) -> usize {
        let cut_short = |at: Instant| self.paced(lines, at).max(fraction(lines, self.partial));
        match self.stage(now) {
            Stage::Ended(Ending::Completed) => lines,
            Stage::Ended(Ending::Failed) => 0,
            Stage::Ended(Ending::Expired) => fraction(lines, self.partial),
            Stage::Ended(Ending::Cancelled) | Stage::Cancelling => {
                cut_short(self.cancelled_at.expect("a cancelling batch has a cancel instant"))
            }
            Stage::Validating | Stage::InProgress | Stage::Finalizing => self.paced(lines, now),
        }
    }

    /// Lines answered by `at` at the steady in-progress pace (capped at `partial` for an
    /// expiring batch, which by definition does not get through them all).
    fn paced(&self, lines: usize, at: Instant) -> usize {
        if self.fate == Fate::Reject {
            return 0;
        }
        let start = self.created + self.step();
        let span = self.duration.saturating_sub(self.step() * 2);
        let progress = if at < start {
            0.0
        } else if span.is_zero() {
            1.0
        } else {
            ((at - start).as_secs_f64() / span.as_secs_f64()).min(1.0)
        };
        let cap = if self.fate == Fate::Expire { self.partial } else { 1.0 };
        fraction(lines, progress.min(cap))
    }
}

/// `floor(lines * f)` for a fraction `f` in `0..=1`.
fn fraction(lines: usize, f: f64) -> usize {
    ((lines as f64 * f).floor() as usize).min(lines)
}

/// Formats Unix milliseconds as an RFC 3339 UTC timestamp with milliseconds
/// (`2024-09-24T18:37:24.100Z`), the way Anthropic's API writes times.
pub(crate) fn rfc3339(unix_ms: u64) -> String {
    let (secs, ms) = (unix_ms / 1000, unix_ms % 1000);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{ms:03}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, restricted to dates after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(100);
    const STEP: Duration = Duration::from_secs(1); // min(100 s / 10, 1 s)

    fn at(t0: Instant, secs: f64) -> Instant {
        t0 + Duration::from_secs_f64(secs)
    }

    #[test]
    fn a_completing_batch_goes_through_every_stage() {
        let t0 = Instant::now();
        let life = Lifecycle::new(t0, D, Fate::Complete, 0.5);
        assert_eq!(life.stage(t0), Stage::Validating);
        assert_eq!(life.stage(at(t0, 1.0)), Stage::InProgress);
        assert_eq!(life.stage(at(t0, 98.9)), Stage::InProgress);
        assert_eq!(life.stage(at(t0, 99.0)), Stage::Finalizing);
        assert_eq!(life.stage(at(t0, 100.0)), Stage::Ended(Ending::Completed));
        assert_eq!(life.ends_at(), t0 + D);
        // Steady pace through in_progress (1 s .. 99 s), then all.
        assert_eq!(life.answered(1000, at(t0, 0.5)), 0);
        assert_eq!(life.answered(1000, at(t0, 50.0)), 500);
        assert_eq!(life.answered(1000, at(t0, 100.0)), 1000);
        assert_eq!(life.in_progress_since(at(t0, 0.5)), None);
        assert_eq!(life.in_progress_since(at(t0, 2.0)), Some(t0 + STEP));
        assert_eq!(life.finalizing_since(at(t0, 99.5)), Some(t0 + D - STEP));
    }

    #[test]
    fn a_rejected_batch_fails_after_validation_with_nothing_answered() {
        let t0 = Instant::now();
        let life = Lifecycle::new(t0, D, Fate::Reject, 0.5);
        assert_eq!(life.stage(at(t0, 0.9)), Stage::Validating);
        assert_eq!(life.stage(at(t0, 1.0)), Stage::Ended(Ending::Failed));
        assert_eq!(life.answered(10, at(t0, 50.0)), 0);
        assert_eq!(life.in_progress_since(at(t0, 50.0)), None);
    }

    #[test]
    fn an_expiring_batch_answers_only_the_partial_fraction() {
        let t0 = Instant::now();
        let life = Lifecycle::new(t0, D, Fate::Expire, 0.3);
        assert_eq!(life.stage(at(t0, 99.5)), Stage::InProgress, "no finalizing before expiry");
        assert_eq!(life.stage(at(t0, 100.0)), Stage::Ended(Ending::Expired));
        assert_eq!(life.answered(10, at(t0, 90.0)), 3, "paced, capped at the partial fraction");
        assert_eq!(life.answered(10, at(t0, 100.0)), 3);
    }

    #[test]
    fn cancel_keeps_the_answered_lines_and_ends_one_step_later() {
        let t0 = Instant::now();
        let mut life = Lifecycle::new(t0, D, Fate::Complete, 0.25);
        assert!(life.cancel(at(t0, 10.0)));
        assert!(life.cancel(at(t0, 10.5)), "cancel is idempotent");
        assert_eq!(life.cancelled_at(), Some(at(t0, 10.0)));
        assert_eq!(life.stage(at(t0, 10.9)), Stage::Cancelling);
        assert_eq!(life.stage(at(t0, 11.0)), Stage::Ended(Ending::Cancelled));
        assert_eq!(life.ends_at(), at(t0, 11.0));
        // At 10 s the pace had answered 9/98 of the lines; the partial knob keeps a quarter.
        assert_eq!(life.answered(100, at(t0, 50.0)), 25);

        // Past the partial fraction, what was answered is kept.
        let mut late = Lifecycle::new(t0, D, Fate::Complete, 0.25);
        assert!(late.cancel(at(t0, 50.0)));
        assert_eq!(late.answered(98, at(t0, 60.0)), 49);
        assert_eq!(late.finalizing_since(at(t0, 99.5)), None);
    }

    #[test]
    fn an_ended_batch_cannot_be_cancelled() {
        let t0 = Instant::now();
        let mut life = Lifecycle::new(t0, D, Fate::Complete, 0.5);
        assert!(!life.cancel(at(t0, 100.0)));
        assert_eq!(life.stage(at(t0, 200.0)), Stage::Ended(Ending::Completed));
    }

    #[test]
    fn an_instant_batch_has_ended_when_created() {
        let t0 = Instant::now();
        let life = Lifecycle::new(t0, Duration::ZERO, Fate::Complete, 0.5);
        assert_eq!(life.stage(t0), Stage::Ended(Ending::Completed));
        assert_eq!(life.answered(7, t0), 7);
        assert_eq!(Lifecycle::new(t0, Duration::ZERO, Fate::Reject, 0.5).stage(t0), Stage::Ended(Ending::Failed));
    }

    #[test]
    fn rfc3339_formats_utc_with_milliseconds() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_727_203_044_100), "2024-09-24T18:37:24.100Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
    }
}
