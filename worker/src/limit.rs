//! Adaptive concurrency and rate per provider, per worker, without coordination.
//!
//! Two AIMD loops decide how hard this worker pushes a provider:
//! - **in-flight limit**: +1 per window of successes (additive), x0.9 on a throttle or
//!   timeout (multiplicative), between 1 and the configured `max_in_flight`;
//! - **send rate**: unlimited until the provider first rate-limits us (a 429 with
//!   `Retry-After` or no requests remaining); then the rate measured over the last second,
//!   x0.9 on such a 429 (at most one decrease per [`RATE_DECREASE_WINDOW`]), +0.02
//!   request/s per success (2 % a second) unless the provider's remaining requests
//!   (`x-ratelimit-remaining-requests` / `anthropic-ratelimit-requests-remaining`) are
//!   under a tenth of the most it reported. Requests are paced evenly at that rate.
//!
//! Overload (503, 529, a 429 that says nothing) and timeouts shrink only the in-flight limit.
//! A flex tier without capacity (OpenAI's 429 "resource unavailable", Groq's 498
//! `capacity_exceeded`: [`Signal::Unavailable`]) shrinks neither: it says the provider's
//! spare capacity is gone for now, not that this worker sends too much or too fast, and
//! the item waits in a delay queue, not here.
//!
//! Which 429s are about rate ([`Throttle`]): one with a retry hint (`retry-after`,
//! `retry-after-ms` or a gateway's `llm_provider-retry-after[-ms]`), or from a provider that
//! has reported rate-limit headers before. Gateways pass some answers on with no header at
//! all (LiteLLM's `/v1/messages` route: no rate-limit, retry or request-id header); such
//! silent 429s start pacing once they are repeated, at least [`SILENT_429S`] in a one-second
//! window and more than the successes in it, so a 429 now and then stays an overload signal.
//!
//! Why both: with a fast provider, concurrency does not bound the request rate (1 call in
//! flight at 1 ms is 1,000 requests/s), so a rate limit needs pacing; with a slow one,
//! the in-flight limit is what protects it. Small decrease steps make a fleet of any size
//! settle just above the provider's limit (each worker's share of throttles is
//! proportional to its rate, so the fleet converges to a few percent of 429s) instead of
//! the sawtooth of halving. A `Retry-After` pauses this worker's calls to the provider
//! until then. Configured `rpm`/`tpm` are hard ceilings (a request's tokens estimated as
//! providers count them: 4 bytes of body a token, plus the output it asks for at most,
//! see `fleet::tokens`). The provider's remaining tokens (`x-ratelimit-remaining-tokens`,
//! `anthropic-ratelimit-tokens-remaining`) are read like its remaining requests.

use std::sync::Mutex;
use std::time::Duration;

use prometheus::{Gauge, IntGauge};
use tokio::sync::Notify;
use tokio::time::Instant;

/// At most one multiplicative decrease per window: one burst of throttles (the requests
/// already in flight when the provider said stop) counts as one signal.
const DECREASE_WINDOW: Duration = Duration::from_millis(200);
const DECREASE: f64 = 0.9;
/// The rate decreases at most once per this window: a provider's burst allowance takes
/// about a second to drain, and every 429 of that burst is the same signal.
const RATE_DECREASE_WINDOW: Duration = Duration::from_secs(1);
/// Below this share of the largest `remaining` seen, the rate stops growing.
const LOW_REMAINING: f64 = 0.1;
/// Per success, the rate grows by this fraction of a request/s (2 % a second at steady state).
const RATE_INCREASE: f64 = 0.02;
/// Silent 429s in one second (and more than the successes in it) that start pacing.
const SILENT_429S: u64 = 3;

/// What a 429 carried that says whether it is about rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttle {
    /// A retry hint, or no requests remaining: a rate limit.
    Hinted,
    /// Some header (a request id), but no hint: read as overload, as a provider's 429
    /// without a hint usually is.
    Unhinted,
    /// No rate-limit, retry or request-id header at all: a gateway passing the answer on.
    /// Repeated, these are a rate limit.
    Silent,
}

/// What a provider call told us about the provider's capacity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Signal {
    /// Answered in time (any status that is not a throttle).
    Ok {
        /// Requests the provider says remain (`x-ratelimit-remaining-requests` or
        /// Anthropic's equivalent), if it says.
        remaining: Option<f64>,
    },
    /// A 429 that says it is about a rate limit (`Retry-After` or no requests remaining):
    /// slow the rate and the in-flight limit; `retry_after` pauses sending.
    RateLimited {
        /// How long the provider asked us to wait, if it said.
        retry_after: Option<Duration>,
    },
    /// 503/529 (or a bare 429): the provider is overloaded, which is about concurrency,
    /// not rate. Errors like these also come at random; treating them as rate signals
    /// would collapse the rate of a healthy fleet.
    Overloaded {
        /// How long the provider asked us to wait, if it said.
        retry_after: Option<Duration>,
    },
    /// Timed out: the provider is struggling with what is in flight.
    Timeout,
    /// A 429; the limiter decides from `throttle` and what it has seen whether it is a
    /// [`Signal::RateLimited`] or an [`Signal::Overloaded`].
    TooManyRequests {
        /// How long the provider asked us to wait, if it said.
        retry_after: Option<Duration>,
        /// What the 429 carried that says whether it is about rate.
        throttle: Throttle,
    },
    /// The provider's flex tier had no capacity for the call (see the module header):
    /// neither the in-flight limit nor the rate changes, and no pause is taken.
    Unavailable,
}

struct State {
    limit: f64,
    max: f64,
    in_flight: usize,
    /// Tasks that [`Limiter::room`] let through and that have not taken their first slot
    /// yet: counted against the limit, so no more tasks start than there are slots (a task
    /// past `room` can no longer be released at shutdown).
    starting: usize,
    /// Requests/s once the provider has throttled us (None: not limited yet).
    rate: Option<f64>,
    ceiling_rps: Option<f64>,
    ceiling_tps: Option<f64>,
    next_send: Instant,
    next_tokens: Instant,
    last_decrease: Option<Instant>,
    last_rate_decrease: Option<Instant>,
    /// Largest `remaining` the provider reported: its burst allowance.
    max_remaining: f64,
    window_start: Instant,
    /// Answers that were not throttles in the current one-second window, and the previous.
    window_successes: u64,
    last_window_successes: u64,
    /// Silent 429s in the current one-second window.
    window_silent_429s: u64,
    /// The provider has reported rate-limit headers (`remaining`): its 429s are about rate.
    limits_seen: bool,
    /// Largest token count the provider reported remaining in its window.
    max_tokens_remaining: f64,
    /// The newest answer said under a tenth of that remains: the rate holds.
    tokens_low: bool,
}

/// The limiter of one provider in one worker.
pub struct Limiter {
    state: Mutex<State>,
    freed: Notify,
    limit_gauge: IntGauge,
    rate_gauge: Gauge,
}

/// A slot in flight; dropping it frees the slot.
pub struct Permit<'a> {
    limiter: &'a Limiter,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.limiter.state.lock() {
            s.in_flight -= 1;
        }
        self.limiter.freed.notify_one();
    }
}

/// The room [`Limiter::room`] counted for a task that has not taken its slot yet: given
/// back if the wait for the slot is abandoned.
struct CountedRoom<'a> {
    limiter: &'a Limiter,
}

impl Drop for CountedRoom<'_> {
    fn drop(&mut self) {
        self.limiter.leave_room();
    }
}

impl Limiter {
    /// A limiter allowing up to `max_in_flight` calls, with optional `rpm`/`tpm` ceilings;
    /// it shows its in-flight limit and rate on the two gauges.
    pub fn new(
        max_in_flight: u16,
        rpm: Option<u32>,
        tpm: Option<u32>,
        limit_gauge: IntGauge,
        rate_gauge: Gauge,
    ) -> Self {
        let now = Instant::now();
        let max = f64::from(max_in_flight.max(1));
        limit_gauge.set(max as i64);
        Limiter {
            state: Mutex::new(State {
                limit: max,
                max,
                in_flight: 0,
                starting: 0,
                rate: None,
                ceiling_rps: rpm.map(|r| f64::from(r.max(1)) / 60.0),
                ceiling_tps: tpm.map(|t| f64::from(t.max(1)) / 60.0),
                next_send: now,
                next_tokens: now,
                last_decrease: None,
                last_rate_decrease: None,
                max_remaining: 0.0,
                window_start: now,
                window_successes: 0,
                last_window_successes: 0,
                window_silent_429s: 0,
                limits_seen: false,
                max_tokens_remaining: 0.0,
                tokens_low: false,
            }),
            freed: Notify::new(),
            limit_gauge,
            rate_gauge,
        }
    }

    /// Waits for a free slot under the current limit, then for this request's turn at the
    /// current rate. `est_tokens` counts against a `tpm` ceiling.
    pub async fn acquire(&self, est_tokens: u64) -> Permit<'_> {
        self.take_slot(est_tokens, false).await
    }

    /// [`Limiter::acquire`] for a task's first call, which [`Limiter::room`] let through:
    /// it takes the slot `room` counted for it.
    pub async fn acquire_started(&self, est_tokens: u64) -> Permit<'_> {
        self.take_slot(est_tokens, true).await
    }

    /// Cancel-safe: dropped while it waits for a slot, a started task's room is given back
    /// (a wait for a slot may be abandoned when the item's job is cancelled meanwhile);
    /// dropped while it waits for its send time, its permit frees the slot.
    async fn take_slot(&self, est_tokens: u64, started: bool) -> Permit<'_> {
        let mut room = started.then_some(CountedRoom { limiter: self });
        let send_at = loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before checking, so a slot freed in between is not missed.
            freed.as_mut().enable();
            {
                let mut s = self.state.lock().expect("limiter lock");
                if (s.in_flight as f64) < s.limit.floor().max(1.0) {
                    s.in_flight += 1;
                    if let Some(counted) = room.take() {
                        // Settled here, under the lock: its drop would take the lock again.
                        std::mem::forget(counted);
                        s.starting = s.starting.saturating_sub(1);
                    }
                    break s.schedule(Instant::now(), est_tokens);
                }
            }
            freed.await;
        };
        let permit = Permit { limiter: self };
        tokio::time::sleep_until(send_at).await;
        permit
    }

    /// Waits until a slot is free for a task that has not started, and counts the task as
    /// starting (a task about to start uses this to stay cancellable until it really
    /// starts; its first call then uses [`Limiter::acquire_started`]).
    pub async fn room(&self) {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut s = self.state.lock().expect("limiter lock");
                if ((s.in_flight + s.starting) as f64) < s.limit.floor().max(1.0) {
                    s.starting += 1;
                    return;
                }
            }
            // Woken with room, this task goes on to `acquire` and takes the slot; woken
            // without (another took it first), it waits again.
            freed.await;
        }
    }

    /// Gives back the room [`Limiter::room`] counted for a task that will not start after
    /// all (its job was cancelled while it waited).
    pub fn leave_room(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.starting = s.starting.saturating_sub(1);
        }
        self.freed.notify_one();
    }

    /// Feeds back what a call told us.
    pub fn observe(&self, signal: Signal) {
        let now = Instant::now();
        let mut s = self.state.lock().expect("limiter lock");
        let signal = match signal {
            Signal::TooManyRequests { retry_after, throttle } => s.classify_429(now, retry_after, throttle),
            other => other,
        };
        match signal {
            Signal::Ok { remaining } => {
                s.limits_seen |= remaining.is_some();
                s.roll_window(now);
                s.window_successes += 1;
                s.limit = (s.limit + 1.0 / s.limit).min(s.max);
                // With the provider's allowance nearly used up the rate is at the limit:
                // hold it there rather than grow into the next 429.
                let nearly_out = remaining.is_some_and(|r| {
                    s.max_remaining = s.max_remaining.max(r);
                    r <= s.max_remaining * LOW_REMAINING
                }) || s.tokens_low;
                if let (Some(rate), false) = (s.rate, nearly_out) {
                    s.rate = Some(rate + RATE_INCREASE);
                }
            }
            Signal::RateLimited { retry_after } | Signal::Overloaded { retry_after } => {
                if let Some(wait) = retry_after {
                    // Every later call waits too: the provider said when it can take more.
                    s.next_send = s.next_send.max(now + wait);
                }
                if s.last_decrease.is_none_or(|t| now.duration_since(t) >= DECREASE_WINDOW) {
                    s.last_decrease = Some(now);
                    s.limit = (s.limit * DECREASE).max(1.0);
                }
                let rate_signal = matches!(signal, Signal::RateLimited { .. });
                if rate_signal && s.last_rate_decrease.is_none_or(|t| now.duration_since(t) >= RATE_DECREASE_WINDOW) {
                    s.last_rate_decrease = Some(now);
                    // The first time, start from what the provider accepted over the last
                    // second: the blast before the first 429 says nothing about the limit.
                    let current = s.rate.unwrap_or_else(|| s.accepted_rate(now));
                    s.rate = Some((current * DECREASE).max(0.1));
                }
            }
            Signal::Timeout => {
                if s.last_decrease.is_none_or(|t| now.duration_since(t) >= DECREASE_WINDOW) {
                    s.last_decrease = Some(now);
                    s.limit = (s.limit * DECREASE).max(1.0);
                }
            }
            // Not counted as a success either: the silent-429 rule compares throttles with
            // answers, and this was neither.
            Signal::Unavailable => {}
            Signal::TooManyRequests { .. } => unreachable!("classified above"),
        }
        self.limit_gauge.set(s.limit.floor() as i64);
        self.rate_gauge.set(s.effective_rate().unwrap_or(0.0));
        drop(s);
        // A raised limit may admit a waiting request.
        self.freed.notify_one();
    }

    /// Feeds back the tokens the provider says remain in its window
    /// (`x-ratelimit-remaining-tokens` / `anthropic-ratelimit-tokens-remaining`), read like
    /// the remaining requests: reported at all, the provider's 429s are about rate; under a
    /// tenth of the most it reported, the rate stops growing. Call it before
    /// [`Limiter::observe`] of the same answer.
    pub fn observe_tokens(&self, remaining: Option<f64>) {
        let Some(r) = remaining else { return };
        let mut s = self.state.lock().expect("limiter lock");
        s.limits_seen = true;
        s.max_tokens_remaining = s.max_tokens_remaining.max(r);
        s.tokens_low = r <= s.max_tokens_remaining * LOW_REMAINING;
    }

    /// Current in-flight limit (for tests and logs).
    pub fn limit(&self) -> usize {
        self.state.lock().map(|s| s.limit.floor() as usize).unwrap_or(1)
    }

    /// Current paced rate in requests/s (`None`: unlimited).
    pub fn rate(&self) -> Option<f64> {
        self.state.lock().ok().and_then(|s| s.effective_rate())
    }
}

impl State {
    fn effective_rate(&self) -> Option<f64> {
        match (self.rate, self.ceiling_rps) {
            (Some(r), Some(c)) => Some(r.min(c)),
            (r, c) => r.or(c),
        }
    }

    /// Starts a new one-second window when the current one is over.
    fn roll_window(&mut self, now: Instant) {
        if now.duration_since(self.window_start) >= Duration::from_secs(1) {
            self.last_window_successes = self.window_successes;
            self.window_successes = 0;
            self.window_silent_429s = 0;
            self.window_start = now;
        }
    }

    /// Whether a 429 is about rate (see the module notes).
    fn classify_429(&mut self, now: Instant, retry_after: Option<Duration>, throttle: Throttle) -> Signal {
        let about_rate = match throttle {
            Throttle::Hinted => true,
            _ if self.limits_seen => true,
            Throttle::Unhinted => false,
            Throttle::Silent => {
                self.roll_window(now);
                self.window_silent_429s += 1;
                // Once pacing, every silent 429 says the pace is still too fast.
                self.rate.is_some()
                    || (self.window_silent_429s >= SILENT_429S && self.window_silent_429s > self.window_successes)
            }
        };
        if about_rate {
            Signal::RateLimited { retry_after }
        } else {
            Signal::Overloaded { retry_after }
        }
    }

    /// Requests per second the provider accepted (not throttled), over at least a second.
    fn accepted_rate(&self, now: Instant) -> f64 {
        let in_window = now.duration_since(self.window_start).as_secs_f64().max(1.0);
        (self.last_window_successes as f64).max(self.window_successes as f64 / in_window).max(1.0)
    }

    /// Books the next send: evenly spaced at the rate, and within the token ceiling.
    fn schedule(&mut self, now: Instant, est_tokens: u64) -> Instant {
        let mut at = self.next_send.max(now);
        if let Some(rate) = self.effective_rate() {
            self.next_send = at + Duration::from_secs_f64(1.0 / rate);
        } else {
            self.next_send = at;
        }
        if let Some(tps) = self.ceiling_tps {
            at = at.max(self.next_tokens);
            self.next_tokens = at.max(now) + Duration::from_secs_f64(est_tokens as f64 / tps);
        }
        at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(max: u16, rpm: Option<u32>) -> Limiter {
        Limiter::new(max, rpm, None, IntGauge::new("l", "l").unwrap(), Gauge::new("r", "r").unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn throttles_shrink_the_limit_and_successes_grow_it_back() {
        let l = limiter(100, None);
        assert_eq!(l.limit(), 100);
        l.observe(Signal::RateLimited { retry_after: None });
        assert_eq!(l.limit(), 90);
        // A burst of throttles within the window is one signal.
        l.observe(Signal::RateLimited { retry_after: None });
        assert_eq!(l.limit(), 90);
        tokio::time::advance(DECREASE_WINDOW).await;
        l.observe(Signal::RateLimited { retry_after: None });
        assert_eq!(l.limit(), 81);
        for _ in 0..2000 {
            l.observe(Signal::Ok { remaining: None });
        }
        assert_eq!(l.limit(), 100, "about one per window of successes, capped at the maximum");
    }

    #[tokio::test(start_paused = true)]
    async fn a_flex_tier_without_capacity_shrinks_neither_the_limit_nor_the_rate() {
        let l = limiter(100, None);
        for _ in 0..50 {
            l.observe(Signal::Unavailable);
            tokio::time::advance(RATE_DECREASE_WINDOW).await;
        }
        assert_eq!(l.limit(), 100, "no decrease");
        assert_eq!(l.state.lock().unwrap().rate, None, "no pacing started");
        // Once paced, it still leaves the limit and the rate alone.
        l.observe(Signal::RateLimited { retry_after: None });
        let (limit, rate) = (l.limit(), l.state.lock().unwrap().rate);
        tokio::time::advance(RATE_DECREASE_WINDOW).await;
        l.observe(Signal::Unavailable);
        assert_eq!((l.limit(), l.state.lock().unwrap().rate), (limit, rate));
    }

    #[tokio::test(start_paused = true)]
    async fn the_in_flight_limit_is_enforced() {
        let l = limiter(2, None);
        let a = l.acquire(0).await;
        let _b = l.acquire(0).await;
        let third = tokio::time::timeout(Duration::from_millis(50), l.acquire(0)).await;
        assert!(third.is_err(), "a third call waits");
        drop(a);
        let third = tokio::time::timeout(Duration::from_millis(50), l.acquire(0)).await;
        assert!(third.is_ok(), "and goes once a slot frees");
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_wait_for_a_slot_gives_its_room_back() {
        let l = limiter(1, None);
        let held = l.acquire(0).await;
        // A task counted by `room` gives up waiting for its slot (its job was cancelled).
        l.state.lock().unwrap().starting += 1;
        let waited = tokio::time::timeout(Duration::from_millis(50), l.acquire_started(0)).await;
        assert!(waited.is_err(), "no slot while one is held");
        assert_eq!(l.state.lock().unwrap().starting, 0, "the room it was counted is given back");
        drop(held);
        let next = tokio::time::timeout(Duration::from_millis(50), l.room()).await;
        assert!(next.is_ok(), "the next task finds room");
    }

    #[tokio::test(start_paused = true)]
    async fn a_configured_rpm_paces_requests_evenly() {
        let l = limiter(100, Some(600)); // 10/s
        let start = Instant::now();
        for _ in 0..21 {
            drop(l.acquire(0).await);
        }
        let took = start.elapsed();
        assert!(took >= Duration::from_secs(2) && took < Duration::from_millis(2100), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_pauses_the_next_calls() {
        let l = limiter(10, None);
        l.observe(Signal::Overloaded { retry_after: Some(Duration::from_secs(3)) });
        let start = Instant::now();
        drop(l.acquire(0).await);
        assert!(start.elapsed() >= Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn overload_shrinks_only_the_in_flight_limit() {
        let l = limiter(100, None);
        l.observe(Signal::Overloaded { retry_after: None });
        assert_eq!(l.limit(), 90);
        assert_eq!(l.rate(), None, "no rate limit from random overload answers");
    }

    fn too_many(throttle: Throttle) -> Signal {
        Signal::TooManyRequests { retry_after: None, throttle }
    }

    #[tokio::test(start_paused = true)]
    async fn a_hinted_429_is_a_rate_limit_and_an_unhinted_one_overload() {
        let l = limiter(100, None);
        l.observe(too_many(Throttle::Unhinted));
        assert_eq!(l.rate(), None, "a 429 with a request id but no hint is overload");
        l.observe(too_many(Throttle::Hinted));
        assert!(l.rate().is_some(), "any retry hint makes it a rate limit");
    }

    #[tokio::test(start_paused = true)]
    async fn after_the_provider_reported_limit_headers_every_429_is_about_rate() {
        let l = limiter(100, None);
        l.observe(Signal::Ok { remaining: Some(50.0) });
        l.observe(too_many(Throttle::Unhinted));
        assert!(l.rate().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_silent_429s_start_pacing_and_a_stray_one_does_not() {
        let l = limiter(100, None);
        // A stray silent 429 among successes, every second for a while: overload only.
        for _ in 0..10 {
            for _ in 0..20 {
                l.observe(Signal::Ok { remaining: None });
            }
            l.observe(too_many(Throttle::Silent));
            l.observe(too_many(Throttle::Silent));
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert_eq!(l.rate(), None);
        // Then the gateway's window is used up: 429s only.
        for _ in 0..SILENT_429S {
            l.observe(too_many(Throttle::Silent));
        }
        let r = l.rate().expect("pacing after repeated silent 429s");
        // Later silent 429s keep slowing the pace (once a second).
        tokio::time::advance(RATE_DECREASE_WINDOW).await;
        l.observe(too_many(Throttle::Silent));
        assert!(l.rate().unwrap() < r);
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_starts_from_what_the_provider_accepted_and_recovers_slowly() {
        let l = limiter(100, None);
        for i in 0..500 {
            drop(l.acquire(0).await);
            if i < 60 {
                l.observe(Signal::Ok { remaining: None });
            }
        }
        tokio::time::advance(Duration::from_millis(500)).await;
        l.observe(Signal::RateLimited { retry_after: None });
        let r = l.rate().expect("limited after a throttle");
        // 60 accepted in the first second (of 500 sent): 60 x 0.9.
        assert!((r - 54.0).abs() < 1.0, "{r}");
        l.observe(Signal::Ok { remaining: Some(100.0) });
        let r = l.rate().unwrap();
        l.observe(Signal::Ok { remaining: Some(5.0) });
        assert_eq!(l.rate(), Some(r), "holds while the provider's allowance is nearly used up");
        l.observe(Signal::Ok { remaining: Some(50.0) });
        assert!(l.rate().unwrap() > r);
    }

    #[tokio::test(start_paused = true)]
    async fn few_tokens_remaining_hold_the_rate_like_few_requests() {
        let l = limiter(100, None);
        l.observe(Signal::RateLimited { retry_after: None });
        l.observe_tokens(Some(10_000.0));
        l.observe(Signal::Ok { remaining: None });
        let r = l.rate().unwrap();
        l.observe_tokens(Some(500.0));
        l.observe(Signal::Ok { remaining: None });
        assert_eq!(l.rate(), Some(r), "holds while the token window is nearly used up");
        l.observe_tokens(Some(6_000.0));
        l.observe(Signal::Ok { remaining: None });
        assert!(l.rate().unwrap() > r);
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_ceiling_charges_each_request_its_estimate() {
        let l = Limiter::new(100, None, Some(6_000), IntGauge::new("l", "l").unwrap(), Gauge::new("r", "r").unwrap());
        let start = Instant::now();
        // 100 tokens/s: ten requests of 50 tokens take 4.5 s to schedule (the first is free).
        for _ in 0..10 {
            drop(l.acquire(50).await);
        }
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(4500) && took < Duration::from_millis(4600), "{took:?}");
    }
}
