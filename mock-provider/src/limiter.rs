//! Owns the requests- and tokens-per-minute limiters: token-bucket arithmetic (with an
//! injected clock so it can be tested without sleeping) and the wire format of the rate-limit
//! headers that OpenAI and Anthropic attach to their answers. The same bucket serves both
//! limits: a request costs one unit of `--rpm`, and its counted tokens of `--tpm`.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderName, HeaderValue};

/// A token bucket refilled at `rpm / 60` tokens per second, holding at most one second of
/// burst (`max(1, rpm / 60)` tokens). It starts full.
///
/// Why no float token count: summing fractional refills drifts (ten refills of 0.1 make
/// 0.999…), which would refuse a client that waited exactly the advertised `retry-after`.
/// Instead the bucket is stored as the instant at which it will be full again, in whole
/// nanoseconds: each token is worth `interval = 60 s / rpm`, and the bucket's depth is
/// `window = max(interval, 1 s)` worth of tokens (the same thing as `max(1, rpm / 60)` tokens).
#[derive(Debug)]
pub struct TokenBucket {
    rpm: u64,
    interval: Duration,
    window: Duration,
    full_at: Instant,
}

/// What the bucket said about one request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Admission {
    /// A token was taken; the numbers describe the bucket afterwards.
    Granted {
        /// The configured requests-per-minute limit.
        limit: u64,
        /// Whole tokens left after this request.
        remaining: u64,
        /// Time until the bucket is full again (rounded up to the millisecond).
        reset: Duration,
    },
    /// The bucket is empty; nothing was taken.
    Refused {
        /// The configured requests-per-minute limit.
        limit: u64,
        /// Time until one whole token is available (rounded up to the millisecond).
        retry_after: Duration,
    },
}

impl TokenBucket {
    /// A full bucket for `rpm` requests per minute (`rpm` must be at least 1; the CLI refuses 0).
    pub fn new(rpm: u64, now: Instant) -> Self {
        let rpm = rpm.max(1);
        let interval = Duration::from_nanos(60_000_000_000 / rpm);
        // One second of burst, but never less than one token: below 60 rpm a bucket smaller than
        // one token could never admit anything.
        let window = interval.max(Duration::from_secs(1));
        Self { rpm, interval, window, full_at: now }
    }

    /// Takes a token if one is available at `now`. A refused request takes nothing, so clients
    /// hammering a throttled endpoint do not push the next free slot further away.
    pub fn try_acquire(&mut self, now: Instant) -> Admission {
        self.try_acquire_n(now, 1)
    }

    /// Takes `n` tokens if they are available at `now`. A request larger than the whole
    /// bucket is let through when the bucket is full (and empties it for longer), so it is
    /// never refused forever.
    pub fn try_acquire_n(&mut self, now: Instant, n: u64) -> Admission {
        // How far the bucket is below full, expressed as refill time.
        let deficit = self.full_at.saturating_duration_since(now);
        let cost = self.interval.saturating_mul(u32::try_from(n).unwrap_or(u32::MAX));
        if deficit + cost <= self.window || deficit.is_zero() {
            // `max` so a clock reading from the past cannot make the bucket fuller than it is.
            self.full_at = self.full_at.max(now) + cost;
            let deficit = deficit + cost;
            let remaining = self.window.saturating_sub(deficit).as_nanos() / self.interval.as_nanos();
            Admission::Granted { limit: self.rpm, remaining: remaining as u64, reset: ceil_ms(deficit) }
        } else {
            // An oversized request waits for a full bucket; others for just enough room.
            let wait = if cost > self.window { deficit } else { deficit + cost - self.window };
            Admission::Refused { limit: self.rpm, retry_after: ceil_ms(wait) }
        }
    }
}

/// Rounds up to a whole millisecond, the unit of every header: a client that waits the
/// advertised time must find a token.
fn ceil_ms(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX))
}

const X_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
const X_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
const X_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");
const A_LIMIT: HeaderName = HeaderName::from_static("anthropic-ratelimit-requests-limit");
const A_REMAINING: HeaderName = HeaderName::from_static("anthropic-ratelimit-requests-remaining");
const A_RESET: HeaderName = HeaderName::from_static("anthropic-ratelimit-requests-reset");

const X_LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
const X_REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
const X_RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");
const A_LIMIT_TOKENS: HeaderName = HeaderName::from_static("anthropic-ratelimit-tokens-limit");
const A_REMAINING_TOKENS: HeaderName = HeaderName::from_static("anthropic-ratelimit-tokens-remaining");
const A_RESET_TOKENS: HeaderName = HeaderName::from_static("anthropic-ratelimit-tokens-reset");

/// What a bucket limits, which decides the names of its headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// A bucket of requests (`--rpm`): the `*-requests` headers.
    Requests,
    /// A bucket of tokens (`--tpm`): the `*-tokens` headers.
    Tokens,
}

impl Admission {
    /// Writes the rate-limit headers for this admission into `headers`: the OpenAI
    /// `x-ratelimit-*-requests` set always, the `anthropic-ratelimit-requests-*` set when
    /// `anthropic` is true, and `Retry-After` / `retry-after-ms` when the request was refused.
    pub fn write_headers(&self, headers: &mut HeaderMap, anthropic: bool) {
        self.write_headers_for(Unit::Requests, headers, anthropic);
    }

    /// [`Admission::write_headers`] for a bucket of `unit` (`*-tokens` names for a token
    /// bucket).
    pub fn write_headers_for(&self, unit: Unit, headers: &mut HeaderMap, anthropic: bool) {
        let [x_limit, x_remaining, x_reset, a_limit, a_remaining, a_reset] = match unit {
            Unit::Requests => [X_LIMIT, X_REMAINING, X_RESET, A_LIMIT, A_REMAINING, A_RESET],
            Unit::Tokens => {
                [X_LIMIT_TOKENS, X_REMAINING_TOKENS, X_RESET_TOKENS, A_LIMIT_TOKENS, A_REMAINING_TOKENS, A_RESET_TOKENS]
            }
        };
        let (limit, remaining, reset) = match *self {
            Admission::Granted { limit, remaining, reset } => (limit, remaining, reset),
            Admission::Refused { limit, retry_after } => {
                // Retry-After only speaks whole seconds; round up (and never say 0, which many
                // clients read as "retry immediately").
                let whole = retry_after.as_millis().div_ceil(1000).max(1);
                headers.insert(axum::http::header::RETRY_AFTER, HeaderValue::from(whole as u64));
                headers.insert(RETRY_AFTER_MS, HeaderValue::from(retry_after.as_millis() as u64));
                (limit, 0, retry_after)
            }
        };
        headers.insert(x_limit, HeaderValue::from(limit));
        headers.insert(x_remaining, HeaderValue::from(remaining));
        headers.insert(x_reset, text_header(go_duration(reset)));
        if anthropic {
            headers.insert(a_limit, HeaderValue::from(limit));
            headers.insert(a_remaining, HeaderValue::from(remaining));
            headers.insert(a_reset, text_header(rfc3339(SystemTime::now() + reset)));
        }
    }
}

fn text_header(s: String) -> HeaderValue {
    // Both formatters only emit ASCII digits, letters and punctuation, so this cannot fail.
    HeaderValue::from_str(&s).expect("formatted header values are ASCII")
}

/// Formats a duration the way OpenAI's `x-ratelimit-reset-*` headers do (Go duration style):
/// `"120ms"` below a second, `"1.5s"` / `"12s"` above.
pub fn go_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else {
        format!("{}s", ms as f64 / 1000.0)
    }
}

/// Formats a wall-clock time as RFC 3339 UTC with milliseconds, e.g.
/// `2023-11-14T22:13:20.120Z`. Hand-rolled so the crate needs no date library for one header.
pub fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day); Howard Hinnant's
/// `civil_from_days` algorithm.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, 0..=146_096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // year of era
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of year, March-based
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = (if mp < 10 { mp + 3 } else { mp - 9 }) as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn burst_is_one_second_then_refill_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(600, t0); // 10/s, capacity 10
        for i in 0..10 {
            match b.try_acquire(t0) {
                Admission::Granted { remaining, .. } => assert_eq!(remaining, 9 - i),
                other => panic!("request {i} should pass, got {other:?}"),
            }
        }
        assert_eq!(b.try_acquire(t0), Admission::Refused { limit: 600, retry_after: ms(100) });
        // 40 ms later, 0.4 tokens: still refused, 60 ms to go.
        assert_eq!(b.try_acquire(t0 + ms(40)), Admission::Refused { limit: 600, retry_after: ms(60) });
        // At 100 ms exactly one token is back.
        assert!(matches!(b.try_acquire(t0 + ms(100)), Admission::Granted { remaining: 0, .. }));
        assert!(matches!(b.try_acquire(t0 + ms(100)), Admission::Refused { .. }));
    }

    #[test]
    fn refused_requests_do_not_consume() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(60, t0); // 1/s, capacity 1
        assert!(matches!(b.try_acquire(t0), Admission::Granted { .. }));
        for step in 1..10 {
            assert!(matches!(b.try_acquire(t0 + ms(step * 100)), Admission::Refused { .. }));
        }
        // Hammering did not delay the refill: a token is back exactly one second later.
        assert!(matches!(b.try_acquire(t0 + ms(1000)), Admission::Granted { .. }));
    }

    #[test]
    fn capacity_is_at_least_one_and_refill_caps_at_capacity() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(6, t0); // 0.1/s, capacity 1
        assert!(matches!(b.try_acquire(t0), Admission::Granted { .. }));
        assert_eq!(b.try_acquire(t0), Admission::Refused { limit: 6, retry_after: ms(10_000) });
        // After an hour of idleness the bucket holds one second of burst, not an hour.
        let mut b = TokenBucket::new(120, t0); // 2/s, capacity 2
        let later = t0 + Duration::from_secs(3600);
        assert!(matches!(b.try_acquire(later), Admission::Granted { remaining: 1, .. }));
        assert!(matches!(b.try_acquire(later), Admission::Granted { remaining: 0, .. }));
        assert!(matches!(b.try_acquire(later), Admission::Refused { .. }));
    }

    #[test]
    fn fractional_capacity_and_steady_rate() {
        // 90 rpm: 1.5 tokens per second, 1.5 tokens of burst.
        let t0 = Instant::now();
        let mut b = TokenBucket::new(90, t0);
        assert!(matches!(b.try_acquire(t0), Admission::Granted { remaining: 0, .. }));
        // Half a token left: refused, one token needs a third of a second more (666.67 ms,
        // rounded up).
        assert_eq!(b.try_acquire(t0), Admission::Refused { limit: 90, retry_after: ms(334) });
        assert!(matches!(b.try_acquire(t0 + ms(334)), Admission::Granted { .. }));
        // Over a minute of constant hammering, exactly burst + rate x time get through.
        let mut b = TokenBucket::new(90, t0);
        let granted = (0..=60_000).filter(|i| matches!(b.try_acquire(t0 + ms(*i)), Admission::Granted { .. })).count();
        assert_eq!(granted, 1 + 90);
    }

    #[test]
    fn a_token_bucket_charges_each_request_its_tokens() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(60_000, t0); // 1,000 tokens/s, 1,000 of burst
        assert!(matches!(b.try_acquire_n(t0, 600), Admission::Granted { remaining: 400, .. }));
        // 500 more need 100 ms of refill.
        assert_eq!(b.try_acquire_n(t0, 500), Admission::Refused { limit: 60_000, retry_after: ms(100) });
        assert!(matches!(b.try_acquire_n(t0 + ms(100), 500), Admission::Granted { remaining: 0, .. }));
        // Larger than the bucket: waits for a full bucket, then passes.
        assert_eq!(b.try_acquire_n(t0 + ms(100), 5_000), Admission::Refused { limit: 60_000, retry_after: ms(1000) });
        assert!(matches!(b.try_acquire_n(t0 + ms(1100), 5_000), Admission::Granted { remaining: 0, .. }));
        // Over a minute, tokens granted stay within burst + rate x time.
        let mut b = TokenBucket::new(60_000, t0);
        let granted: u64 = (0..=60_000u64)
            .filter(|i| matches!(b.try_acquire_n(t0 + ms(*i), 150), Admission::Granted { .. }))
            .map(|_| 150)
            .sum();
        assert!(granted <= 61_000 && granted > 60_000 - 150, "{granted}");
    }

    #[test]
    fn token_headers_use_the_tokens_names() {
        let mut h = HeaderMap::new();
        Admission::Refused { limit: 60_000, retry_after: ms(250) }.write_headers_for(Unit::Tokens, &mut h, true);
        assert_eq!(h["x-ratelimit-remaining-tokens"], "0");
        assert_eq!(h["x-ratelimit-reset-tokens"], "250ms");
        assert_eq!(h["anthropic-ratelimit-tokens-remaining"], "0");
        assert_eq!(h["retry-after-ms"], "250");
        assert!(!h.contains_key("x-ratelimit-remaining-requests"));
    }

    #[test]
    fn granted_reset_is_time_until_full() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(600, t0);
        assert_eq!(b.try_acquire(t0), Admission::Granted { limit: 600, remaining: 9, reset: ms(100) });
    }

    #[test]
    fn clock_going_backwards_mints_nothing() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut b = TokenBucket::new(60, t0);
        assert!(matches!(b.try_acquire(t0), Admission::Granted { .. }));
        assert!(matches!(b.try_acquire(t0 - ms(500)), Admission::Refused { .. }));
        assert!(matches!(b.try_acquire(t0 + ms(999)), Admission::Refused { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn works_with_tokio_paused_clock() {
        let mut b = TokenBucket::new(120, tokio::time::Instant::now().into_std());
        let now = || tokio::time::Instant::now().into_std();
        assert!(matches!(b.try_acquire(now()), Admission::Granted { .. }));
        assert!(matches!(b.try_acquire(now()), Admission::Granted { .. }));
        assert!(matches!(b.try_acquire(now()), Admission::Refused { .. }));
        tokio::time::advance(ms(500)).await;
        assert!(matches!(b.try_acquire(now()), Admission::Granted { .. }));
    }

    #[test]
    fn refused_headers() {
        let mut h = HeaderMap::new();
        Admission::Refused { limit: 60, retry_after: ms(1200) }.write_headers(&mut h, true);
        assert_eq!(h["retry-after"], "2");
        assert_eq!(h["retry-after-ms"], "1200");
        assert_eq!(h["x-ratelimit-limit-requests"], "60");
        assert_eq!(h["x-ratelimit-remaining-requests"], "0");
        assert_eq!(h["x-ratelimit-reset-requests"], "1.2s");
        assert_eq!(h["anthropic-ratelimit-requests-limit"], "60");
        assert_eq!(h["anthropic-ratelimit-requests-remaining"], "0");
        let reset = h["anthropic-ratelimit-requests-reset"].to_str().unwrap();
        assert_eq!(reset.len(), "2023-11-14T22:13:20.120Z".len(), "{reset}");
        assert!(reset.ends_with('Z'));

        let mut h = HeaderMap::new();
        Admission::Refused { limit: 600, retry_after: ms(120) }.write_headers(&mut h, false);
        assert_eq!(h["retry-after"], "1", "never 0");
        assert_eq!(h["x-ratelimit-reset-requests"], "120ms");
        assert!(!h.contains_key("anthropic-ratelimit-requests-limit"));
    }

    #[test]
    fn granted_headers_have_no_retry_after() {
        let mut h = HeaderMap::new();
        Admission::Granted { limit: 600, remaining: 7, reset: ms(300) }.write_headers(&mut h, false);
        assert_eq!(h["x-ratelimit-remaining-requests"], "7");
        assert_eq!(h["x-ratelimit-reset-requests"], "300ms");
        assert!(!h.contains_key("retry-after"));
        assert!(!h.contains_key("retry-after-ms"));
    }

    #[test]
    fn rfc3339_known_dates() {
        let at = |s: u64, ms: u64| UNIX_EPOCH + Duration::from_secs(s) + Duration::from_millis(ms);
        assert_eq!(rfc3339(at(0, 0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(at(1_700_000_000, 120)), "2023-11-14T22:13:20.120Z");
        assert_eq!(rfc3339(at(951_782_400, 0)), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(at(951_868_799, 999)), "2000-02-29T23:59:59.999Z");
        assert_eq!(rfc3339(at(4_102_444_800, 0)), "2100-01-01T00:00:00.000Z");
    }

    #[test]
    fn go_duration_format() {
        assert_eq!(go_duration(ms(0)), "0ms");
        assert_eq!(go_duration(ms(999)), "999ms");
        assert_eq!(go_duration(ms(1000)), "1s");
        assert_eq!(go_duration(ms(60_000)), "60s");
    }
}
