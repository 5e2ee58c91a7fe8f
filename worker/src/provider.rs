//! Provider clients: one HTTP call to an LLM provider, the error taxonomy that decides what
//! happens after a failure, and the in-process retry loop (exponential backoff with jitter
//! via `backon`, honouring `Retry-After`).
//!
//! | what happened                              | error            | path                 |
//! |--------------------------------------------|------------------|----------------------|
//! | 429, or 408/409/425                        | `RateLimited`    | retry (Retry-After)  |
//! | 503, 529                                   | `Overloaded`     | retry                |
//! | other 5xx                                  | `Server`         | retry                |
//! | request timed out                          | `Timeout`        | retry                |
//! | connection refused/reset                   | `Connection`     | retry                |
//! | 2xx whose body is not JSON                 | `InvalidResponse`| retry                |
//! | other 4xx (400, 401, 403, 404, 422, ...)   | `Client`         | fail at once         |

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use fleet::config::{ProviderConfig, ProviderKind, RetryConfig};
use fleet::metrics::WorkerMetrics;
use fleet::wire::{ErrorRecord, Item, ResponseRecord};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::limit::{Limiter, Signal, Throttle};

/// What the provider answered, kept for the output file.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub request_id: String,
    /// The raw body when it was JSON (non-JSON bodies are summarised in the error).
    pub body: Option<Box<RawValue>>,
}

impl Answer {
    pub fn to_record(&self) -> Option<ResponseRecord> {
        self.body.as_ref().map(|b| ResponseRecord {
            status_code: self.status,
            request_id: self.request_id.clone(),
            body: b.clone(),
        })
    }
}

/// A failed provider call; the variant decides whether to retry.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("rate limited (HTTP {})", .answer.status)]
    RateLimited { answer: Answer, retry_after: Option<Duration> },
    #[error("provider overloaded (HTTP {})", .answer.status)]
    Overloaded { answer: Answer, retry_after: Option<Duration> },
    #[error("provider server error (HTTP {})", .answer.status)]
    Server { answer: Answer },
    #[error("request timed out after {0:?}")]
    Timeout(Duration),
    #[error("connection failed: {0}")]
    Connection(String),
    #[error("invalid response (HTTP {}): {reason}", .answer.status)]
    InvalidResponse { answer: Answer, reason: String },
    #[error("request rejected (HTTP {}): {message}", .answer.status)]
    Client { answer: Answer, message: String },
}

impl CallError {
    /// Transient errors are retried; the rest end the item at once.
    pub fn is_transient(&self) -> bool {
        !matches!(self, CallError::Client { .. })
    }

    /// How long the provider asked us to wait, if it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            CallError::RateLimited { retry_after, .. } | CallError::Overloaded { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The `error_type` / `retry_reason` label and the output file's error code.
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::RateLimited { .. } => "rate_limited",
            CallError::Overloaded { .. } => "overloaded",
            CallError::Server { .. } => "server_error",
            CallError::Timeout(_) => "timeout",
            CallError::Connection(_) => "connection",
            CallError::InvalidResponse { .. } => "invalid_response",
            CallError::Client { .. } => "client_error",
        }
    }

    pub fn answer(&self) -> Option<&Answer> {
        match self {
            CallError::RateLimited { answer, .. }
            | CallError::Overloaded { answer, .. }
            | CallError::Server { answer }
            | CallError::InvalidResponse { answer, .. }
            | CallError::Client { answer, .. } => Some(answer),
            CallError::Timeout(_) | CallError::Connection(_) => None,
        }
    }

    pub fn to_record(&self) -> ErrorRecord {
        ErrorRecord { code: self.kind().to_string(), message: self.to_string() }
    }
}

/// A successful call.
#[derive(Debug)]
pub struct Success {
    pub answer: Answer,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// The outcome of an item after retries, with the number of calls made.
pub struct Outcome {
    pub result: Result<Success, CallError>,
    pub attempts: u32,
}

/// The operation label for a request path.
pub fn operation(url: &str) -> &'static str {
    match url.trim_end_matches('/') {
        "/v1/chat/completions" => "chat_completions",
        "/v1/completions" => "completions",
        "/v1/embeddings" => "embeddings",
        "/v1/messages" => "messages",
        _ => "other",
    }
}

/// An HTTP client for one configured provider.
pub struct ProviderClient {
    pub name: String,
    kind: ProviderKind,
    base_url: String,
    /// Read once from the environment variable the config names; never logged.
    api_key: Option<String>,
    http: reqwest::Client,
    timeout: Duration,
    retry: RetryConfig,
    metrics: WorkerMetrics,
    /// Adaptive in-flight limit and pacing for this provider.
    pub limiter: Limiter,
}

impl ProviderClient {
    /// A client for provider `name`; `max_in_flight` bounds its adaptive in-flight limit.
    pub fn new(
        name: &str,
        cfg: &ProviderConfig,
        max_in_flight: u16,
        retry: &RetryConfig,
        metrics: WorkerMetrics,
    ) -> anyhow::Result<Self> {
        let api_key = match &cfg.api_key_env {
            Some(var) => match std::env::var(var) {
                Ok(k) if !k.is_empty() => Some(k),
                _ => {
                    tracing::warn!(
                        provider = name,
                        env = var.as_str(),
                        "API key variable is not set; calling without a key"
                    );
                    None
                }
            },
            None => None,
        };
        let timeout = Duration::from_secs(cfg.timeout_s);
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(10))
            // Enough idle connections for the whole in-flight window to reuse them.
            .pool_max_idle_per_host(cfg.max_in_flight as usize)
            .build()?;
        Ok(ProviderClient {
            name: name.to_string(),
            kind: cfg.kind,
            base_url: cfg.base_url.trim_end_matches('/').to_string(),
            api_key,
            http,
            timeout,
            retry: retry.clone(),
            limiter: Limiter::new(
                max_in_flight,
                cfg.rpm,
                cfg.tpm,
                metrics.concurrency_limit.with_label_values(&[name]),
                metrics.rate_limit.with_label_values(&[name]),
            ),
            metrics,
        })
    }

    fn endpoint(&self, url: &str) -> String {
        // Accept both `https://api.openai.com` and `https://api.openai.com/v1` as base URLs.
        if self.base_url.ends_with("/v1") && url.starts_with("/v1/") {
            format!("{}{}", self.base_url, &url[3..])
        } else {
            format!("{}{}", self.base_url, url)
        }
    }

    /// Calls the provider for `item`, retrying transient failures within the budget.
    pub async fn execute(&self, item: &Item) -> Outcome {
        let body = Bytes::from(item.body.get().to_owned());
        let op = operation(&item.url);
        let attempts = AtomicU32::new(0);
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(self.retry.initial_backoff_ms))
            .with_max_delay(Duration::from_millis(self.retry.max_backoff_ms))
            .with_max_times(self.retry.max_attempts.saturating_sub(1) as usize)
            .with_total_delay(Some(Duration::from_secs(self.retry.max_elapsed_s)))
            .with_jitter();
        let result = (|| {
            attempts.fetch_add(1, Ordering::Relaxed);
            self.call_once(&item.url, op, body.clone())
        })
        .retry(backoff)
        .sleep(tokio::time::sleep)
        .when(CallError::is_transient)
        // Never retry sooner than the provider asked; when our budget is spent, stop even
        // if it asked us to come back later (`None` ends the retries).
        .adjust(|e: &CallError, next: Option<Duration>| next.map(|d| e.retry_after().map_or(d, |r| r.max(d))))
        .notify(|e: &CallError, wait: Duration| {
            self.metrics.retries.with_label_values(&[&self.name, "item", e.kind()]).inc();
            tracing::debug!(job_id = %item.job_id, custom_id = %item.custom_id, error = %e, wait_ms = wait.as_millis() as u64, "retrying");
        })
        .await;
        Outcome { result, attempts: attempts.load(Ordering::Relaxed) }
    }

    /// One HTTP call, classified.
    async fn call_once(&self, url: &str, op: &'static str, body: Bytes) -> Result<Success, CallError> {
        let est_tokens = body.len() as u64 / 4;
        let mut req = self.http.post(self.endpoint(url)).header("content-type", "application/json").body(body);
        req = match (self.kind, &self.api_key) {
            (ProviderKind::Openai, Some(key)) => req.bearer_auth(key),
            (ProviderKind::Anthropic, Some(key)) => req.header("x-api-key", key),
            (_, None) => req,
        };
        if self.kind == ProviderKind::Anthropic {
            req = req.header("anthropic-version", "2023-06-01");
        }
        // Bytes / 4 is the usual rough token estimate; it only feeds a `tpm` ceiling.
        let _permit = self.limiter.acquire(est_tokens).await;
        let started = Instant::now();
        let (result, remaining, throttle) = self.send(req).await;
        self.metrics.provider_latency.with_label_values(&[&self.name, op]).observe(started.elapsed().as_secs_f64());
        self.limiter.observe(match &result {
            Err(CallError::RateLimited { retry_after, answer }) if answer.status == 429 => {
                Signal::TooManyRequests { retry_after: *retry_after, throttle }
            }
            Err(e @ (CallError::RateLimited { .. } | CallError::Overloaded { .. })) => {
                Signal::Overloaded { retry_after: e.retry_after() }
            }
            Err(CallError::Timeout(_)) => Signal::Timeout,
            _ => Signal::Ok { remaining },
        });
        if let Err(e) = &result {
            self.metrics.errors.with_label_values(&[&self.name, e.kind(), op]).inc();
        }
        result
    }

    /// Sends and classifies; also returns the requests the provider says remain, if it says,
    /// and what a 429 would say about rate.
    async fn send(&self, req: reqwest::RequestBuilder) -> (Result<Success, CallError>, Option<f64>, Throttle) {
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return (Err(self.transport_error(e)), None, Throttle::Unhinted),
        };
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let remaining = remaining_requests(&headers);
        let throttle = throttle(&headers);
        let request_id = request_id(&headers);
        let bytes = match resp.bytes().await {
            Ok(b) => b,
            Err(e) => return (Err(self.transport_error(e)), remaining, throttle),
        };
        let parsed: Result<Box<RawValue>, _> = serde_json::from_slice(&bytes);
        let answer = Answer { status, request_id, body: parsed.as_ref().ok().cloned() };
        let retry_after = retry_after(&headers);
        let result = match status {
            200..=299 => match parsed {
                Ok(_) => {
                    let usage = serde_json::from_slice::<UsageEnvelope>(&bytes).ok().and_then(|u| u.usage);
                    let (p, c) = usage.map(|u| u.totals()).unwrap_or((0, 0));
                    Ok(Success { answer, prompt_tokens: p, completion_tokens: c })
                }
                Err(e) => Err(CallError::InvalidResponse { answer, reason: format!("body is not JSON: {e}") }),
            },
            429 | 408 | 409 | 425 => Err(CallError::RateLimited { answer, retry_after }),
            503 | 529 => Err(CallError::Overloaded { answer, retry_after }),
            500..=599 => Err(CallError::Server { answer }),
            _ => {
                let message = error_message(&bytes).unwrap_or_else(|| format!("HTTP {status}"));
                Err(CallError::Client { answer, message })
            }
        };
        (result, remaining, throttle)
    }

    fn transport_error(&self, e: reqwest::Error) -> CallError {
        if e.is_timeout() {
            CallError::Timeout(self.timeout)
        } else {
            // reqwest's Display does not include the URL's credentials; it has none here.
            CallError::Connection(e.without_url().to_string())
        }
    }
}

/// `Retry-After` (seconds) or OpenAI's `retry-after-ms`.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(ms) = get("retry-after-ms").and_then(|v| v.trim().parse::<f64>().ok()) {
        return Some(Duration::from_secs_f64(ms.max(0.0) / 1000.0));
    }
    get("retry-after").and_then(|v| v.trim().parse::<f64>().ok()).map(|s| Duration::from_secs_f64(s.clamp(0.0, 3600.0)))
}

/// Headers that carry a provider's request id: OpenAI's, Anthropic's, LiteLLM's call id.
const REQUEST_ID_HEADERS: [&str; 3] = ["x-request-id", "request-id", "x-litellm-call-id"];
/// Headers that say when to retry: the provider's own, and as a gateway (LiteLLM) passes
/// them on.
const RETRY_HINT_HEADERS: [&str; 4] =
    ["retry-after", "retry-after-ms", "llm_provider-retry-after", "llm_provider-retry-after-ms"];

/// The provider's request id, `""` when it sent none.
fn request_id(headers: &reqwest::header::HeaderMap) -> String {
    REQUEST_ID_HEADERS.iter().find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok())).unwrap_or("").to_string()
}

/// What the headers of an answer say about rate, were it a 429: a retry hint or no
/// requests remaining makes it a rate limit; no such header and no request id either (a
/// gateway passing a 429 on) makes it silent.
fn throttle(headers: &reqwest::header::HeaderMap) -> Throttle {
    if RETRY_HINT_HEADERS.iter().any(|h| headers.contains_key(*h)) || remaining_requests(headers) == Some(0.0) {
        Throttle::Hinted
    } else if REQUEST_ID_HEADERS.iter().any(|h| headers.contains_key(*h))
        || headers.keys().any(|k| k.as_str().contains("ratelimit"))
    {
        Throttle::Unhinted
    } else {
        Throttle::Silent
    }
}

/// Requests remaining in the provider's window, from OpenAI's
/// `x-ratelimit-remaining-requests` or Anthropic's `anthropic-ratelimit-requests-remaining`.
fn remaining_requests(headers: &reqwest::header::HeaderMap) -> Option<f64> {
    ["x-ratelimit-remaining-requests", "anthropic-ratelimit-requests-remaining"]
        .iter()
        .find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<f64>().ok()))
}

/// `error.message` of an OpenAI or Anthropic error body.
fn error_message(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v["error"]["message"].as_str().map(str::to_string)
}

#[derive(Deserialize)]
struct UsageEnvelope {
    usage: Option<Usage>,
}

/// Token usage in either dialect.
#[derive(Deserialize)]
struct Usage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
}

impl Usage {
    fn totals(&self) -> (u64, u64) {
        (
            self.prompt_tokens.or(self.input_tokens).unwrap_or(0),
            self.completion_tokens.or(self.output_tokens).unwrap_or(0),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_from_paths() {
        assert_eq!(operation("/v1/chat/completions"), "chat_completions");
        assert_eq!(operation("/v1/embeddings"), "embeddings");
        assert_eq!(operation("/v2/x"), "other");
    }

    #[test]
    fn retry_after_prefers_milliseconds() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", "150".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(150)));
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> reqwest::header::HeaderMap {
        pairs.iter().map(|(k, v)| (reqwest::header::HeaderName::from_static(k), v.parse().unwrap())).collect()
    }

    #[test]
    fn request_id_from_openai_anthropic_or_litellm() {
        assert_eq!(request_id(&headers(&[("x-request-id", "req_1")])), "req_1");
        assert_eq!(request_id(&headers(&[("request-id", "req_2")])), "req_2");
        assert_eq!(request_id(&headers(&[("x-litellm-call-id", "3f2a")])), "3f2a");
        assert_eq!(request_id(&headers(&[])), "");
    }

    #[test]
    fn a_429_is_about_rate_when_it_carries_any_retry_hint() {
        for hint in RETRY_HINT_HEADERS {
            let h: reqwest::header::HeaderMap =
                [(reqwest::header::HeaderName::from_static(hint), "1".parse().unwrap())].into_iter().collect();
            assert_eq!(throttle(&h), Throttle::Hinted, "{hint}");
        }
        assert_eq!(throttle(&headers(&[("x-ratelimit-remaining-requests", "0")])), Throttle::Hinted);
        assert_eq!(throttle(&headers(&[("x-request-id", "req_1")])), Throttle::Unhinted);
        assert_eq!(throttle(&headers(&[("x-ratelimit-remaining-requests", "5")])), Throttle::Unhinted);
        // LiteLLM's `/v1/messages` route passes a 429 on with none of them.
        assert_eq!(
            throttle(&headers(&[("content-type", "application/json"), ("content-length", "10")])),
            Throttle::Silent
        );
    }

    #[test]
    fn client_errors_are_permanent_and_others_transient() {
        let answer = Answer { status: 400, request_id: String::new(), body: None };
        assert!(!CallError::Client { answer: answer.clone(), message: "x".into() }.is_transient());
        assert!(CallError::Server { answer }.is_transient());
        assert!(CallError::Timeout(Duration::from_secs(1)).is_transient());
    }

    #[test]
    fn endpoint_joins_without_doubling_v1() {
        let cfg = ProviderConfig {
            kind: ProviderKind::Openai,
            base_url: "https://api.example.com/v1/".into(),
            api_key_env: None,
            timeout_s: 1,
            max_in_flight: 1,
            rpm: None,
            tpm: None,
        };
        let retry = RetryConfig {
            max_attempts: 1,
            initial_backoff_ms: 1,
            max_backoff_ms: 1,
            max_elapsed_s: 1,
            delay_tiers_s: vec![1],
            max_delays: 0,
            delay_budget_s: 0,
        };
        let c = ProviderClient::new("p", &cfg, 1, &retry, WorkerMetrics::new()).unwrap();
        assert_eq!(c.endpoint("/v1/chat/completions"), "https://api.example.com/v1/chat/completions");
    }
}
