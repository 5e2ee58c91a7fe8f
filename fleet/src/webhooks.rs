//! Completion webhooks: the event a job's end is told with, the durable delivery message
//! that carries it on `<ns>.webhooks`, and its signature the Standard Webhooks way
//! (<https://www.standardwebhooks.com/>).
//!
//! The tracker publishes one [`WebhookDelivery`] (confirmed, before the checkpoint that
//! covers the job's end) when a job with a webhook URL ends; any worker's sender
//! (`worker::webhooks`) consumes it and POSTs [`WebhookDelivery::event`]'s JSON with three
//! headers:
//!
//! - `webhook-id`: [`webhook_id`] of the job, the same on every attempt and on a replay
//!   after a tracker takeover, so a receiver dedupes on it;
//! - `webhook-timestamp`: Unix seconds of this attempt;
//! - `webhook-signature`: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` ([`sign`]),
//!   with the secret read from the variable `webhooks.secret_env` names. A `whsec_`
//!   secret is the base64 of the key bytes, as the spec says; any other is used as bytes.
//!
//! A delivery comes off a queue anyone with publish rights could write to, so it is
//! untrusted: [`WebhookDelivery::decode`] bounds its size and checks every field, the URL
//! again ([`check_url`]); the body signed is always the sender's serialization of a typed
//! [`WebhookEvent`], never bytes taken from the message, and the secret goes nowhere but the
//! signature.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::wire::{JobCounts, JobStatus, JobUsage};

/// Largest delivery message read off `<ns>.webhooks`, bytes (an event is well under 2 KiB).
pub const MAX_DELIVERY_BYTES: usize = 16 * 1024;
/// Longest webhook URL accepted, bytes.
pub const MAX_URL_BYTES: usize = 2048;
/// Longest free-text field (a reason, an error) kept in an event or a status, characters.
pub const MAX_TEXT_CHARS: usize = 300;
/// Prefix of a secret given as base64 key bytes (Standard Webhooks).
pub const SECRET_PREFIX: &str = "whsec_";

/// The delay tiers of webhook retries, seconds (`<ns>.webhooks.delayed.<n>s`): a retry
/// waits in the smallest tier at least as long as its backoff ([`retry_tier_s`]). Fixed, so
/// every process declares (and a cleanup deletes) the same queues whatever its config.
pub const ALL_DELAY_TIERS_S: [u64; 10] = [1, 2, 5, 10, 30, 60, 300, 600, 1800, 3600];

/// The delay tier of the retry after `attempts` failed attempts: the backoff doubles from
/// `initial_s` up to `max_s`, then is rounded up to a tier (the largest at most).
pub fn retry_tier_s(attempts: u32, initial_s: u64, max_s: u64) -> u64 {
    let backoff = initial_s.max(1).saturating_mul(1u64 << attempts.saturating_sub(1).min(20)).min(max_s.max(1));
    let last = ALL_DELAY_TIERS_S[ALL_DELAY_TIERS_S.len() - 1];
    ALL_DELAY_TIERS_S.into_iter().find(|t| *t >= backoff).unwrap_or(last)
}

/// The type of a job-end event, named like OpenAI's batch webhook events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventType {
    /// Every item ended and at least one succeeded (`completed`).
    #[serde(rename = "batch.completed")]
    Completed,
    /// The job ended `failed` (no item succeeded, or its submission was abandoned).
    #[serde(rename = "batch.failed")]
    Failed,
    /// The job's deadline passed before its items ended.
    #[serde(rename = "batch.expired")]
    Expired,
    /// The job was cancelled (by `producer cancel` or its spend cap).
    #[serde(rename = "batch.cancelled")]
    Cancelled,
}

impl EventType {
    /// The event of a job that ended with `status`; `None` for a job not ended.
    pub fn of(status: JobStatus) -> Option<EventType> {
        match status {
            JobStatus::Completed => Some(EventType::Completed),
            JobStatus::Failed => Some(EventType::Failed),
            JobStatus::Expired => Some(EventType::Expired),
            JobStatus::Cancelled => Some(EventType::Cancelled),
            JobStatus::Submitting | JobStatus::InProgress => None,
        }
    }

    /// The event type as it appears in the payload (`batch.completed`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Completed => "batch.completed",
            EventType::Failed => "batch.failed",
            EventType::Expired => "batch.expired",
            EventType::Cancelled => "batch.cancelled",
        }
    }
}

/// The `webhook-id` of a job's end: stable for the job, whoever sends it and however often.
pub fn webhook_id(job_id: &str) -> String {
    format!("msg_{job_id}")
}

/// Where a finished job's output is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutputLocation {
    /// The job's results stream on the broker (`<ns>.results.<job id>`).
    pub results_queue: String,
    /// The command that writes the job's output file.
    pub wait: String,
}

/// What an event says about the job that ended (its summary, as `status --json` shows it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobEnded {
    /// The job's id, as `submit` printed it.
    pub id: String,
    /// The provider its items were for.
    pub provider: String,
    /// How it ended.
    pub status: JobStatus,
    /// Why it ended other than by its items (`budget`, `incomplete_submission`), if so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Its items by how they ended.
    pub request_counts: JobCounts,
    /// Tokens and cost of its answers.
    #[serde(default)]
    pub usage: JobUsage,
    /// When it was submitted and ended, ms since the Unix epoch.
    pub submitted_at_ms: u64,
    /// When the tracker ended it, ms since the Unix epoch.
    pub finished_at_ms: u64,
    /// Where its output is.
    pub output: OutputLocation,
}

/// The JSON body POSTed to the webhook URL.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WebhookEvent {
    /// Same as the `webhook-id` header ([`webhook_id`]).
    pub id: String,
    /// Always `event`.
    pub object: String,
    /// `batch.completed`, `batch.failed`, `batch.expired` or `batch.cancelled`.
    #[serde(rename = "type")]
    pub event_type: EventType,
    /// When the job ended, Unix seconds.
    pub created_at: u64,
    /// The job.
    pub data: JobEnded,
}

impl WebhookEvent {
    /// The event of a job that ended (`None` for a summary of a job not ended).
    pub fn of(summary: &crate::wire::JobSummary, results_queue: String) -> Option<WebhookEvent> {
        let event_type = EventType::of(summary.status)?;
        let finished_at_ms = summary.finished_at_ms.unwrap_or_else(crate::now_ms);
        Some(WebhookEvent {
            id: webhook_id(&summary.job_id),
            object: "event".into(),
            event_type,
            created_at: finished_at_ms / 1000,
            data: JobEnded {
                id: summary.job_id.clone(),
                provider: summary.provider.clone(),
                status: summary.status,
                reason: summary.reason.as_deref().map(bounded),
                request_counts: summary.counts.clone(),
                usage: summary.usage.clone().unwrap_or_default(),
                submitted_at_ms: summary.submitted_at_ms,
                finished_at_ms,
                output: OutputLocation {
                    results_queue,
                    wait: format!("producer wait {} -o results.jsonl", summary.job_id),
                },
            },
        })
    }
}

/// A webhook delivery on `<ns>.webhooks` (and its delay queues): the event, where it goes,
/// and how it has fared so far.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(remote = "Self")]
pub struct WebhookDelivery {
    /// The http(s) URL the event is POSTed to.
    pub url: String,
    /// The event (the POST body is its JSON).
    pub event: WebhookEvent,
    /// When the first attempt was due (the job's end), ms since the Unix epoch: retries
    /// stop `webhooks.max_age_s` after it.
    pub first_at_ms: u64,
    /// Attempts made so far.
    #[serde(default)]
    pub attempts: u32,
    /// What the last attempt got (`HTTP 500`, `timed out`, ...), if one failed.
    #[serde(default)]
    pub last_error: Option<String>,
}
crate::versioned!(WebhookDelivery);

/// Why a delivery message is not one to act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidDelivery {
    /// Larger than [`MAX_DELIVERY_BYTES`]; holds its size.
    #[error("a webhook delivery of {0} bytes (at most {MAX_DELIVERY_BYTES})")]
    TooLarge(usize),
    /// Not JSON of the delivery's shape.
    #[error("not a webhook delivery: {0}")]
    Shape(String),
    /// A field out of bounds.
    #[error("webhook delivery: {0}")]
    Field(String),
}

impl WebhookDelivery {
    /// Reads a delivery off the queue: bounded, then checked whole ([`WebhookDelivery::check`]).
    pub fn decode(bytes: &[u8]) -> Result<WebhookDelivery, InvalidDelivery> {
        if bytes.len() > MAX_DELIVERY_BYTES {
            return Err(InvalidDelivery::TooLarge(bytes.len()));
        }
        let d: WebhookDelivery = serde_json::from_slice(bytes).map_err(|e| InvalidDelivery::Shape(e.to_string()))?;
        d.check()?;
        Ok(d)
    }

    /// Checks what a forged or broken delivery could get wrong: the URL (http(s), a host),
    /// the job id, an id that is the job's, texts within bounds.
    pub fn check(&self) -> Result<(), InvalidDelivery> {
        let field = |m: String| InvalidDelivery::Field(m);
        check_url(&self.url).map_err(field)?;
        let job = &self.event.data;
        crate::wire::check_job_id(&job.id).map_err(|e| field(e.to_string()))?;
        if self.event.id != webhook_id(&job.id) {
            return Err(field("the event's id is not its job's".into()));
        }
        if EventType::of(job.status) != Some(self.event.event_type) {
            return Err(field("the event's type does not match the job's status".into()));
        }
        let long = |s: &str| s.chars().count() > MAX_TEXT_CHARS;
        if long(&job.provider)
            || job.reason.as_deref().is_some_and(long)
            || self.last_error.as_deref().is_some_and(long)
            || long(&job.output.results_queue)
            || long(&job.output.wait)
            || self.event.object != "event"
        {
            return Err(field("a text field out of bounds".into()));
        }
        Ok(())
    }
}

/// Checks a webhook URL: `http` or `https`, with a host, no user or password (it would be
/// shown in `status`), at most [`MAX_URL_BYTES`]. The error says what is wrong, for people.
pub fn check_url(url: &str) -> Result<reqwest::Url, String> {
    if url.len() > MAX_URL_BYTES {
        return Err(format!("webhook URL is {} bytes long (at most {MAX_URL_BYTES})", url.len()));
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("webhook URL {url:?} is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("webhook URL must be http:// or https://, got {}://", parsed.scheme()));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("webhook URL {url:?} names no host"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("webhook URL must not carry a user or password (sign with webhooks.secret_env)".into());
    }
    Ok(parsed)
}

/// Whether a webhook may be sent to `ip` when `webhooks.allow_private` is off: a public
/// unicast address. Loopback, private (RFC 1918, IPv6 unique local), link-local (the cloud
/// metadata address 169.254.169.254 among them), shared (100.64.0.0/10), unspecified,
/// benchmarking, documentation, multicast and broadcast addresses are the fleet's own
/// network or nobody's; an IPv4 address inside IPv6 is judged as the IPv4 one.
pub fn is_public(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (b == 18 || b == 19))
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || first == 0x2001 && v6.segments()[1] == 0x0db8)
        }
    }
}

/// The host (and port, if any) of a URL, for status and logs: never its path or query,
/// which may hold a token.
pub fn url_host(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => match (u.host_str(), u.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            _ => "?".into(),
        },
        Err(_) => "?".into(),
    }
}

/// How a job's webhook has fared, as `status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// The job has not ended, or its first attempt has not been made.
    Pending,
    /// An attempt failed; another is scheduled.
    Retrying,
    /// The receiver answered 2xx.
    Delivered,
    /// Retries ran out (or the delivery was refused); parked in `<ns>.webhooks.dead`.
    Failed,
}

impl DeliveryState {
    /// The state as a word.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Retrying => "retrying",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
        }
    }
}

/// The last delivery of a job's webhook (in the job's summary).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookStatus {
    /// The webhook URL's host ([`url_host`]).
    pub host: String,
    /// Where the delivery is.
    pub state: DeliveryState,
    /// Attempts made.
    #[serde(default)]
    pub attempts: u32,
    /// What the last failed attempt got.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl WebhookStatus {
    /// One line for people: `hooks.example.com: delivered (2 attempts)`.
    pub fn describe(&self) -> String {
        let mut s = format!("{}: {} ({} attempts)", self.host, self.state.as_str(), self.attempts);
        if let Some(e) = &self.last_error {
            s.push_str(&format!(", last error: {e}"));
        }
        s
    }
}

/// A signing secret (`Debug` shows nothing of it).
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// The secret as configured: `whsec_<base64>` is decoded to its key bytes, any other
    /// value is used as bytes. Errors never contain the value.
    pub fn parse(value: &str) -> Result<Secret, String> {
        let value = value.trim();
        if value.is_empty() {
            return Err("the webhook secret is empty".into());
        }
        match value.strip_prefix(SECRET_PREFIX) {
            Some(b64) => match BASE64.decode(b64) {
                Ok(key) if !key.is_empty() => Ok(Secret(key)),
                _ => Err(format!("the webhook secret starts with {SECRET_PREFIX} but the rest is not base64")),
            },
            None => Ok(Secret(value.as_bytes().to_vec())),
        }
    }
}

/// The `webhook-signature` value: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.
pub fn sign(secret: &Secret, id: &str, timestamp_s: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(&secret.0).expect("HMAC takes a key of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp_s.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
}

/// Whether `header` (a `webhook-signature` value: space-separated `v1,<sig>` entries) holds
/// a valid signature of the message (for receivers, e.g. the tests). Compared in constant time.
pub fn verify(secret: &Secret, id: &str, timestamp_s: u64, body: &[u8], header: &str) -> bool {
    let mut mac = Hmac::<Sha256>::new_from_slice(&secret.0).expect("HMAC takes a key of any length");
    mac.update(format!("{id}.{timestamp_s}.").as_bytes());
    mac.update(body);
    let signatures = header.split(' ').filter_map(|entry| entry.strip_prefix("v1,"));
    signatures.filter_map(|sig| BASE64.decode(sig).ok()).any(|sig| mac.clone().verify_slice(&sig).is_ok())
}

fn bounded(s: &str) -> String {
    s.chars().take(MAX_TEXT_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vector of the Standard Webhooks specification (its reference libraries'
    /// `TestWebhookSign`).
    #[test]
    fn signs_the_spec_vector() {
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        let sig = sign(&secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(verify(&secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body, &format!("v1,bad {sig}")));
        assert!(!verify(&secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265331, body, &sig));
    }

    #[test]
    fn retries_back_off_through_the_tiers() {
        let waits: Vec<u64> = (1..=14).map(|n| retry_tier_s(n, 5, 3600)).collect();
        assert_eq!(waits, [5, 10, 30, 60, 300, 300, 600, 1800, 1800, 3600, 3600, 3600, 3600, 3600]);
        assert_eq!(retry_tier_s(1, 1, 3600), 1);
        assert_eq!(retry_tier_s(2, 1, 3600), 2);
        assert_eq!(retry_tier_s(40, 1, 100_000), 3600);
    }

    #[test]
    fn secrets_are_never_shown() {
        let s = Secret::parse("not-base64-but-fine").unwrap();
        assert_eq!(format!("{s:?}"), "Secret(..)");
        let e = Secret::parse("whsec_!!!secret!!!").unwrap_err();
        assert!(!e.contains("secret!!!"), "{e}");
        assert!(Secret::parse("  ").is_err());
    }

    #[test]
    fn urls_must_be_http_with_a_host() {
        assert!(check_url("https://hooks.example.com/x?token=1").is_ok());
        assert!(check_url("http://127.0.0.1:9/").is_ok());
        for bad in ["ftp://x/", "file:///etc/passwd", "hooks.example.com", "https://u:p@h/", "http://"] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
        assert!(check_url(&format!("https://h/{}", "a".repeat(MAX_URL_BYTES))).is_err());
        assert_eq!(url_host("https://hooks.example.com/a?token=secret"), "hooks.example.com");
        assert_eq!(url_host("http://127.0.0.1:8080/a"), "127.0.0.1:8080");
    }

    fn delivery() -> WebhookDelivery {
        let summary = crate::wire::JobSummary {
            job_id: "job_1".into(),
            provider: "mock".into(),
            mode: None,
            status: JobStatus::Completed,
            counts: JobCounts { total: 2, succeeded: 2, ..Default::default() },
            submitted_at_ms: 1,
            finished_at_ms: Some(2_000),
            rate_per_s: 1.0,
            reason: None,
            progress: None,
            usage: None,
            dead_lettered: 0,
            webhook: None,
        };
        let event = WebhookEvent::of(&summary, "ns.results.job_1".into()).unwrap();
        WebhookDelivery { url: "http://127.0.0.1:1/h".into(), event, first_at_ms: 2_000, attempts: 0, last_error: None }
    }

    #[test]
    fn deliveries_round_trip_with_their_version_and_are_checked() {
        let d = delivery();
        let bytes = serde_json::to_vec(&d).unwrap();
        assert!(String::from_utf8_lossy(&bytes).starts_with(r#"{"v":"#));
        assert_eq!(WebhookDelivery::decode(&bytes).unwrap(), d);
        assert_eq!(d.event.event_type.as_str(), "batch.completed");

        let mut forged = d.clone();
        forged.url = "file:///etc/passwd".into();
        assert!(WebhookDelivery::decode(&serde_json::to_vec(&forged).unwrap()).is_err());
        let mut forged = d.clone();
        forged.event.id = "msg_other".into();
        assert!(WebhookDelivery::decode(&serde_json::to_vec(&forged).unwrap()).is_err());
        let mut forged = d;
        forged.event.event_type = EventType::Failed;
        assert!(WebhookDelivery::decode(&serde_json::to_vec(&forged).unwrap()).is_err());
        assert!(matches!(
            WebhookDelivery::decode(&vec![b' '; MAX_DELIVERY_BYTES + 1]),
            Err(InvalidDelivery::TooLarge(_))
        ));
        assert!(WebhookDelivery::decode(b"{}").is_err());
    }

    #[test]
    fn only_public_addresses_are_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "198.18.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "2001:db8::1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["8.8.8.8", "1.1.1.1", "100.128.0.1", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }
}
