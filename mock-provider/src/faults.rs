//! Owns the random fault decision: which injected outcome (error status, hang, garbage or a
//! normal answer) a request gets, and how long it waits first. All randomness of the server
//! lives here, behind one seeded generator.

use std::sync::Mutex;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::knobs::Knobs;

/// The injected outcome of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fault {
    /// Answer normally.
    None,
    /// Answer with this error status (500, 503, 400, 429 or 529).
    Status(u16),
    /// Never answer.
    Hang,
    /// Answer 200 with a body that is not JSON.
    Garbage,
}

/// Everything decided about one request up front.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// What to answer.
    pub fault: Fault,
    /// How long to wait before answering (latency plus jitter).
    pub delay: Duration,
}

/// Decides faults from the knobs with a seeded [`StdRng`], so a given arrival order always
/// produces the same sequence of decisions.
#[derive(Debug)]
pub struct FaultInjector {
    /// Cumulative upper bounds of the draw, in precedence order.
    thresholds: [(f64, Fault); 7],
    latency: Duration,
    jitter_ms: u64,
    // A std mutex, not a tokio one: the critical section is two draws and never spans an await,
    // so it is far cheaper than an async lock and cannot be held while a request sleeps.
    rng: Mutex<StdRng>,
}

impl FaultInjector {
    /// Builds the injector from the knobs' rates, latency, jitter and seed.
    pub fn new(knobs: &Knobs) -> Self {
        let order = [
            (knobs.error_500, Fault::Status(500)),
            (knobs.error_503, Fault::Status(503)),
            (knobs.error_400, Fault::Status(400)),
            (knobs.error_429, Fault::Status(429)),
            (knobs.error_529, Fault::Status(529)),
            (knobs.hang_rate, Fault::Hang),
            (knobs.garbage_rate, Fault::Garbage),
        ];
        let mut sum = 0.0;
        let thresholds = order.map(|(rate, fault)| {
            sum += rate;
            (sum, fault)
        });
        Self {
            thresholds,
            latency: Duration::from_millis(knobs.latency_ms),
            jitter_ms: knobs.jitter_ms,
            rng: Mutex::new(StdRng::seed_from_u64(knobs.seed)),
        }
    }

    /// Draws the decision for the next request.
    ///
    /// One uniform draw in `[0, 1)` is compared against cumulative ranges (500, 503, 400, 429,
    /// 529, hang, garbage, in that order), so each knob is exactly the fraction of requests that
    /// get that outcome as long as the rates sum to at most 1; beyond that, earlier outcomes win.
    pub fn decide(&self) -> Decision {
        let (u, jitter) = {
            // A panic while holding this lock cannot leave the generator half-updated in any
            // way that matters, so a poisoned lock is simply reused.
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            let u: f64 = rng.random();
            let jitter = if self.jitter_ms > 0 { rng.random_range(0..=self.jitter_ms) } else { 0 };
            (u, jitter)
        };
        let fault = self.thresholds.iter().find(|(upper, _)| u < *upper).map_or(Fault::None, |&(_, fault)| fault);
        Decision { fault, delay: self.latency + Duration::from_millis(jitter) }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn count(knobs: &Knobs, n: usize) -> HashMap<Fault, usize> {
        let inj = FaultInjector::new(knobs);
        let mut counts = HashMap::new();
        for _ in 0..n {
            *counts.entry(inj.decide().fault).or_default() += 1;
        }
        counts
    }

    #[test]
    fn defaults_never_inject() {
        let counts = count(&Knobs::default(), 10_000);
        assert_eq!(counts.get(&Fault::None), Some(&10_000));
    }

    #[test]
    fn distribution_roughly_matches_rates() {
        let knobs = Knobs {
            error_500: 0.05,
            error_503: 0.10,
            error_400: 0.02,
            error_429: 0.15,
            error_529: 0.08,
            hang_rate: 0.01,
            garbage_rate: 0.04,
            ..Knobs::default()
        };
        let n = 100_000;
        let counts = count(&knobs, n);
        let expect = [
            (Fault::Status(500), 0.05),
            (Fault::Status(503), 0.10),
            (Fault::Status(400), 0.02),
            (Fault::Status(429), 0.15),
            (Fault::Status(529), 0.08),
            (Fault::Hang, 0.01),
            (Fault::Garbage, 0.04),
            (Fault::None, 0.55),
        ];
        for (fault, rate) in expect {
            let got = *counts.get(&fault).unwrap_or(&0) as f64 / n as f64;
            // Binomial standard deviation at n = 100k is at most 0.0016; allow ~4 sigma.
            assert!((got - rate).abs() < 0.006, "{fault:?}: expected {rate}, got {got}");
        }
    }

    #[test]
    fn rate_one_always_and_precedence() {
        let knobs = Knobs { error_503: 1.0, error_429: 1.0, ..Knobs::default() };
        let counts = count(&knobs, 1000);
        assert_eq!(counts.get(&Fault::Status(503)), Some(&1000));
    }

    #[test]
    fn same_seed_same_sequence_different_seed_different_sequence() {
        let knobs = Knobs { error_500: 0.3, hang_rate: 0.3, jitter_ms: 50, ..Knobs::default() };
        let run = |k: &Knobs| {
            let inj = FaultInjector::new(k);
            (0..200).map(|_| inj.decide()).collect::<Vec<_>>()
        };
        assert_eq!(run(&knobs), run(&knobs));
        let other = Knobs { seed: 7, ..knobs.clone() };
        assert_ne!(run(&knobs), run(&other));
    }

    #[test]
    fn delay_is_latency_plus_bounded_jitter() {
        let knobs = Knobs { latency_ms: 100, jitter_ms: 20, ..Knobs::default() };
        let inj = FaultInjector::new(&knobs);
        let delays: Vec<u64> = (0..2000).map(|_| inj.decide().delay.as_millis() as u64).collect();
        assert!(delays.iter().all(|d| (100..=120).contains(d)));
        // Both ends of the inclusive range are reachable.
        assert!(delays.contains(&100));
        assert!(delays.contains(&120));

        let fixed = FaultInjector::new(&Knobs { latency_ms: 5, ..Knobs::default() });
        assert_eq!(fixed.decide().delay, Duration::from_millis(5));
    }
}
