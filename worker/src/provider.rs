//! Provider clients: one HTTP call to an LLM provider, the error taxonomy that decides what
//! happens after a failure, and the in-process retry loop (exponential backoff with jitter
//! via `backon`, honouring `Retry-After`).
//!
//! | what happened                              | error            | path                 |
//! |--------------------------------------------|------------------|----------------------|
//! | 429, or 408/409/425                        | `RateLimited`    | retry (Retry-After)  |
//! | 498, or a 429 "resource unavailable"       | `Unavailable`    | retry (delay queue for flex) |
//! | 503, 529                                   | `Overloaded`     | retry                |
//! | other 5xx                                  | `Server`         | retry                |
//! | request timed out                          | `Timeout`        | retry                |
//! | connection refused/reset                   | `Connection`     | retry                |
//! | 2xx whose body is not JSON                 | `InvalidResponse`| retry                |
//! | other 4xx (400, 401, 403, 404, 422, ...)   | `Client`         | fail at once         |
//! | 3xx (redirects are never followed)         | `Redirect`       | fail at once         |
//! | body over `max_response_bytes`             | `TooLarge`       | fail at once         |
//! | 401/403 for the key                        | `KeyRejected`    | retry (another key)  |
//! | every key of the provider rejected         | `NoKeys`         | back to the queue, no call |
//!
//! A flex tier without capacity (Groq's 498 `capacity_exceeded`, OpenAI's 429 whose error is
//! `resource_unavailable`: [`capacity_unavailable`]) is no rate signal: the limiter leaves
//! its window alone ([`Signal::Unavailable`]). A `--mode flex` item ([`Item::flex`]) is
//! sent with `"service_tier": "flex"` added to its body ([`flex_body`]), makes one call per
//! delivery with `flex_timeout_s` (a failure goes to the delay queues, see
//! [`crate::decide`]), so a call of many minutes never holds a delivery for several.
//!
//! A Gemini-kind provider's items are translated before the call and its answers read back
//! into this taxonomy by [`crate::gemini`] (a 429's `RetryInfo.retryDelay` is its wait hint).
//!
//! Whose fault a 401/403 is decides whether the key leaves the rotation
//! ([`crate::keys::key_fault`]): a body that names the request (a model the key may not
//! use) fails only the item; one that names the key retires it; one that says neither is
//! settled by a key-only probe (`GET /v1/models` with that key). One item retires at most
//! one key on its body's word: a second key refused for the same item is probed first, so a
//! request every key refuses cannot empty the pool.
//!
//! Nothing a provider (or a proxy in front of it) answers is trusted: the URL called is
//! built with a parser from `base_url` and a known [`Endpoint`] and must stay under
//! `base_url`; redirects are not followed (reqwest would carry `x-api-key` to any host);
//! the key headers are marked sensitive; bodies are read up to a cap; wait hints
//! (`Retry-After` and friends) are parsed into a duration no longer than the retry budget.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use fleet::config::{ProviderConfig, ProviderKind, RetryConfig};
use fleet::endpoint::Endpoint;
use fleet::metrics::WorkerMetrics;
use fleet::wire::Item;

use crate::answer::{Answer, CallError, Success};
use reqwest::Url;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::keys::{key_fault, KeyFault, KeyPool};
use crate::limit::{Signal, Throttle};

/// Longest a key-only probe may take.
const KEY_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// What every call of one item shares, across its in-process retries.
struct ItemCall<'a> {
    url: &'a Url,
    /// For a Gemini provider, the translated call (`url` and `body` are its own).
    gemini: Option<&'a crate::gemini::GeminiCall>,
    op: &'static str,
    body: Bytes,
    est_tokens: u64,
    /// How long the call may take: `timeout_s`, or `flex_timeout_s` for a flex item.
    timeout: Duration,
    /// Whether this item has retired a key already (see the module header).
    retired_one: AtomicBool,
    /// Whether the job still wants the item (asked after every wait).
    wanted: &'a (dyn Fn() -> bool + Send + Sync),
}

/// The outcome of an item after retries, with the number of calls made.
pub struct Outcome {
    /// The last call's success, or the failure that ended the retries.
    pub result: Result<Success, CallError>,
    /// Calls made (0 when the item was refused before any).
    pub attempts: u32,
}

/// Why an item's `url` is not called. Such an item came from someone other than the
/// producer (which validates every line), so it is dead-lettered, not answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForbiddenUrl {
    /// The url (shortened) is none of the provider kind's endpoints (listed).
    #[error("url {0:?} is not an endpoint of this provider (allowed: {1})")]
    NotAnEndpoint(String, String),
    /// The url (shortened) would resolve outside the provider's base URL.
    #[error("url {0:?} would leave the provider's base URL")]
    Escapes(String),
}

/// Where one item's calls go: a known endpoint under the provider's base URL.
#[derive(Debug, Clone)]
pub struct Target {
    /// The provider endpoint the item's `url` names.
    pub endpoint: Endpoint,
    /// The full URL called: the endpoint under the provider's base URL.
    pub url: Url,
}

/// At most this much of a hostile string goes into a log line or a dead-letter reason.
fn shorten(s: &str) -> String {
    const MAX: usize = 80;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// An HTTP client for one configured provider.
pub struct ProviderClient {
    /// The provider's name in the configuration (and in metric labels).
    pub name: String,
    kind: ProviderKind,
    base_url: Url,
    max_response_bytes: usize,
    http: reqwest::Client,
    timeout: Duration,
    /// `flex_timeout_s`: how long one call of a flex item may take.
    flex_timeout: Duration,
    retry: RetryConfig,
    metrics: WorkerMetrics,
    /// The provider's keys, each with its adaptive in-flight limit and pacing.
    pub keys: KeyPool,
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
        // Parsed once: every call's URL is built from this with a parser, never by joining
        // strings. The parse error names no part of the URL (it may hold credentials).
        let base_url = Url::parse(cfg.base_url.trim_end_matches('/'))
            .map_err(|e| anyhow::anyhow!("provider {name}: base_url is not a valid URL ({e})"))?;
        if !matches!(base_url.scheme(), "http" | "https") || base_url.cannot_be_a_base() {
            anyhow::bail!("provider {name}: base_url must be an http:// or https:// URL");
        }
        let timeout = Duration::from_secs(cfg.timeout_s);
        let http = reqwest::Client::builder()
            // A redirect would carry `x-api-key` (reqwest only strips `Authorization`) and
            // the body to wherever it points: a 3xx is an answer, and fails the item.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(10))
            // Enough idle connections for the whole in-flight window to reuse them.
            .pool_max_idle_per_host(cfg.max_in_flight as usize)
            .build()?;
        Ok(ProviderClient {
            name: name.to_string(),
            kind: cfg.kind,
            base_url,
            max_response_bytes: cfg.max_response_bytes,
            http,
            timeout,
            flex_timeout: Duration::from_secs(cfg.flex_timeout_s),
            retry: retry.clone(),
            keys: KeyPool::new(name, cfg, max_in_flight, &metrics)?,
            metrics,
        })
    }

    /// The URL to call for an item's `url`: only a known endpoint this provider's kind
    /// serves, placed under `base_url` by the URL parser, and checked to have stayed there
    /// (same scheme, host, port and path prefix).
    pub fn target(&self, url: &str) -> Result<Target, ForbiddenUrl> {
        let endpoint = Endpoint::for_kind(url, self.kind)
            .ok_or_else(|| ForbiddenUrl::NotAnEndpoint(shorten(url), Endpoint::paths_of(self.kind).join(", ")))?;
        let base = &self.base_url;
        let base_path = base.path().trim_end_matches('/');
        // Accept both `https://api.openai.com` and `https://api.openai.com/v1` as base URLs.
        let path = match endpoint.path().strip_prefix("/v1") {
            Some(rest) if base_path.ends_with("/v1") => format!("{base_path}{rest}"),
            _ => format!("{base_path}{}", endpoint.path()),
        };
        let mut target = base.clone();
        target.set_path(&path);
        let same_origin = target.scheme() == base.scheme()
            && target.host_str() == base.host_str()
            && target.port_or_known_default() == base.port_or_known_default();
        // The parser normalises dot segments and encodes what a path may not hold; a path
        // that came out different from the one asked for is refused, not called.
        let under_base = target.path() == path && path.starts_with(base_path);
        if !same_origin || !under_base {
            return Err(ForbiddenUrl::Escapes(shorten(url)));
        }
        Ok(Target { endpoint, url: target })
    }

    /// The kind of API this provider speaks.
    pub fn kind(&self) -> ProviderKind {
        self.kind
    }

    /// A request to one of the provider's batch API paths (`/v1/files`, `/v1/batches/{id}`,
    /// ...; built by the batch module from fixed segments and checked ids), placed under
    /// `base_url` as [`ProviderClient::target`] places endpoints, with the key attached.
    /// Redirects are not followed (the client's policy), so the key stays on this host.
    /// `key` is the pool's index of the key the batch belongs to ([`KeyPool::batch_key`]).
    pub fn batch_request(&self, key: usize, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.api_request(method, path, self.keys.key(key).auth.as_ref())
    }

    /// A request to a fixed API path under `base_url` with `auth` (and the kind's version
    /// header) attached.
    fn api_request(
        &self,
        method: reqwest::Method,
        path: &str,
        auth: Option<&(reqwest::header::HeaderName, reqwest::header::HeaderValue)>,
    ) -> reqwest::RequestBuilder {
        let base_path = self.base_url.path().trim_end_matches('/');
        let path = match path.strip_prefix("/v1") {
            Some(rest) if base_path.ends_with("/v1") => format!("{base_path}{rest}"),
            _ => format!("{base_path}{path}"),
        };
        let mut url = self.base_url.clone();
        url.set_path(&path);
        let mut req = self.http.request(method, url);
        if let Some((name, value)) = auth {
            req = req.header(name.clone(), value.clone());
        }
        if self.kind == ProviderKind::Anthropic {
            req = req.header("anthropic-version", "2023-06-01");
        }
        req
    }

    /// Largest body read from this provider in one answer.
    pub fn max_response_bytes(&self) -> usize {
        self.max_response_bytes
    }

    /// The metrics this client records to.
    pub fn metrics(&self) -> &WorkerMetrics {
        &self.metrics
    }

    /// Calls the provider for `item` at `target`, retrying transient failures within the
    /// budget. `key`: the key [`KeyPool::room`] gave this task (its first call uses it).
    /// `wanted` is asked after every wait (for a rate-limit slot, a backoff) right before a
    /// call: once it says no, the item ends with [`CallError::Unwanted`], uncalled.
    pub async fn execute(
        &self,
        item: &Item,
        target: &Target,
        key: Option<usize>,
        wanted: &(dyn Fn() -> bool + Send + Sync),
    ) -> Outcome {
        // A flex item asks for the flex tier; the rest of the user's body goes unchanged.
        let flex = item.flex && self.kind.has_flex_tier();
        let body = if flex {
            match flex_body(item.body.get()) {
                Some(body) => Bytes::from(body),
                None => {
                    let answer = Answer { status: 0, request_id: String::new(), body: None };
                    let message = "a flex request's body must be a JSON object".to_string();
                    return Outcome { result: Err(CallError::Client { answer, message }), attempts: 0 };
                }
            }
        } else {
            Bytes::from(item.body.get().to_owned())
        };
        // Gemini takes the line translated, at a path of its own (see `crate::gemini`).
        let gemini = match self.kind {
            ProviderKind::Gemini => match crate::gemini::prepare(&self.base_url, target.endpoint, item.body.get()) {
                Ok(call) => Some(call),
                Err(reason) => return Outcome { result: Err(crate::gemini::untranslatable(reason)), attempts: 0 },
            },
            ProviderKind::Openai | ProviderKind::Anthropic => None,
        };
        let call = ItemCall {
            url: gemini.as_ref().map_or(&target.url, |g| &g.url),
            gemini: gemini.as_ref(),
            op: target.endpoint.operation(),
            // Charged against a `tpm` ceiling as providers charge it: prompt plus requested
            // output.
            est_tokens: fleet::tokens::estimate_request_tokens(&body),
            body: gemini.as_ref().map_or(body, |g| g.body.clone()),
            timeout: if flex { self.flex_timeout } else { self.timeout },
            retired_one: AtomicBool::new(false),
            wanted,
        };
        self.revisit_retired_keys().await;
        let attempts = AtomicU32::new(0);
        // A flex item makes one call per delivery: a call may take `flex_timeout_s`, and a
        // second one in the same delivery could hold it past the broker's consumer timeout.
        let retries = if flex { 0 } else { self.retry.max_attempts.saturating_sub(1) as usize };
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(self.retry.initial_backoff_ms))
            .with_max_delay(Duration::from_millis(self.retry.max_backoff_ms))
            .with_max_times(retries)
            .with_total_delay(Some(Duration::from_secs(self.retry.max_elapsed_s)))
            .with_jitter();
        let result = (|| {
            let first = attempts.fetch_add(1, Ordering::Relaxed) == 0;
            self.call_once(&call, key.filter(|_| first))
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

    /// One HTTP call, classified. `started`: for the item's first call, the key whose slot
    /// [`KeyPool::room`] counted.
    async fn call_once(&self, call: &ItemCall<'_>, started: Option<usize>) -> Result<Success, CallError> {
        let op = call.op;
        // The wait for a slot can be long (pacing, a 429's wait): a cancel or a deadline that
        // falls meanwhile ends it, and is asked again before paying.
        let taken = tokio::select! {
            taken = self.keys.take(started, call.est_tokens) => taken,
            () = until_unwanted(call.wanted) => return Err(CallError::Unwanted),
        };
        let Some((k, _permit)) = taken else {
            return Err(CallError::NoKeys { envs: self.keys.env_names() });
        };
        if !(call.wanted)() {
            return Err(CallError::Unwanted);
        }
        let key = self.keys.key(k);
        let mut req = self
            .http
            .post(call.url.clone())
            .timeout(call.timeout)
            .header("content-type", "application/json")
            .body(call.body.clone());
        if let Some((name, value)) = &key.auth {
            req = req.header(name.clone(), value.clone());
        }
        if self.kind == ProviderKind::Anthropic {
            req = req.header("anthropic-version", "2023-06-01");
        }
        let started = Instant::now();
        let (mut result, remaining, mut throttle, tokens) = self.send(req, call.timeout).await;
        if let Some(g) = call.gemini {
            (result, throttle) = crate::gemini::read_answer(g, result, throttle, self.retry_after_cap());
        }
        self.metrics.provider_latency.with_label_values(&[&self.name, op]).observe(started.elapsed().as_secs_f64());
        key.limiter.observe_tokens(tokens.remaining);
        key.limiter.observe(match &result {
            Err(CallError::Unavailable { .. }) => Signal::Unavailable,
            Err(CallError::RateLimited { retry_after, answer }) if answer.status == 429 => {
                Signal::TooManyRequests { retry_after: *retry_after, throttle }
            }
            Err(e @ (CallError::RateLimited { .. } | CallError::Overloaded { .. })) => {
                Signal::Overloaded { retry_after: e.retry_after() }
            }
            Err(CallError::Timeout(_)) => Signal::Timeout,
            _ => Signal::Ok { remaining },
        });
        self.keys.update_gauges();
        // A key refused for its own fault leaves the rotation; the item is retried with
        // another one (with none left, it goes back to the queue for another worker: see
        // `NoKeys`).
        if let Err(CallError::Client { answer, .. }) = &result {
            // Gemini refuses a bad key with a 400 that names it (`API_KEY_INVALID`).
            let names_key = call.gemini.is_some()
                && answer.body.as_ref().is_some_and(|b| crate::gemini::names_invalid_key(b.get().as_bytes()));
            if (matches!(answer.status, 401 | 403) || names_key)
                && key.env.is_some()
                && self.key_at_fault(k, answer, &call.retired_one).await
            {
                self.keys.reject(k, answer.status);
                result = Err(CallError::KeyRejected { answer: answer.clone() });
            }
        }
        if let Err(e) = &result {
            self.metrics.errors.with_label_values(&[&self.name, e.kind(), op]).inc();
        }
        result
    }

    /// Whether key `k`'s 401/403 `answer` is the key's fault (see the module header).
    async fn key_at_fault(&self, k: usize, answer: &Answer, retired_one: &AtomicBool) -> bool {
        let fault = key_fault(answer.body.as_ref().map(|b| b.get()));
        let at_fault = match fault {
            KeyFault::Request => false,
            KeyFault::Key if !retired_one.load(Ordering::Relaxed) => true,
            KeyFault::Key | KeyFault::Unsure => self.probe_key(k).await == Some(false),
        };
        if at_fault {
            retired_one.store(true, Ordering::Relaxed);
        }
        at_fault
    }

    /// Asks the provider whether key `k` is good with a request that names no model and
    /// costs nothing (`GET /v1/models`): `Some(true)` accepted, `Some(false)` refused
    /// (401/403), `None` when the answer says neither (a timeout, a 5xx).
    async fn probe_key(&self, k: usize) -> Option<bool> {
        let auth = self.keys.key(k).auth.as_ref();
        let path = match self.kind {
            ProviderKind::Gemini => fleet::gemini::MODELS_PATH,
            ProviderKind::Openai | ProviderKind::Anthropic => "/v1/models",
        };
        let req = self.api_request(reqwest::Method::GET, path, auth).timeout(KEY_PROBE_TIMEOUT);
        let resp = req.send().await.ok()?;
        let status = resp.status().as_u16();
        // The list itself is not needed; read (a little of) it so the connection is reused.
        let body = read_capped(resp, 64 << 10).await.ok().flatten().unwrap_or_default();
        match status {
            200..=299 => Some(true),
            401 | 403 => Some(false),
            400 if self.kind == ProviderKind::Gemini && crate::gemini::names_invalid_key(&body) => Some(false),
            _ => None,
        }
    }

    /// Probes retired keys as their waits end, until `shutdown`: while every key is
    /// retired no item comes to probe them (the worker takes none), so this does.
    pub async fn watch_keys(&self, shutdown: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => self.revisit_retired_keys().await,
            }
        }
    }

    /// Probes the retired keys whose wait is over, bringing back those the provider accepts
    /// again. Costs nothing while no key is retired.
    async fn revisit_retired_keys(&self) {
        for k in self.keys.due_for_probe(Instant::now()) {
            let good = self.probe_key(k).await == Some(true);
            self.keys.probed(k, good);
        }
    }

    /// Sends and classifies; also returns the requests the provider says remain, if it says,
    /// what a 429 would say about rate, and what the provider says about its token window.
    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> (Result<Success, CallError>, Option<f64>, Throttle, TokenHeadroom) {
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return (Err(transport_error(e, timeout)), None, Throttle::Unhinted, TokenHeadroom::default()),
        };
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let remaining = remaining_requests(&headers);
        let throttle = throttle(&headers);
        let tokens = TokenHeadroom::from_headers(&headers, self.retry_after_cap());
        let request_id = request_id(&headers);
        let bytes = match read_capped(resp, self.max_response_bytes).await {
            Ok(Some(b)) => b,
            Ok(None) => {
                return (
                    Err(CallError::TooLarge { status, limit: self.max_response_bytes }),
                    remaining,
                    throttle,
                    tokens,
                )
            }
            Err(e) => return (Err(transport_error(e, timeout)), remaining, throttle, tokens),
        };
        let parsed: Result<Box<RawValue>, _> = serde_json::from_slice(&bytes);
        let answer = Answer { status, request_id, body: parsed.as_ref().ok().cloned() };
        // A 429 that gives no wait but says the token window is empty: wait for it to refill.
        let retry_after = retry_after(&headers, SystemTime::now(), self.retry_after_cap())
            .or(tokens.reset.filter(|_| status == 429 && tokens.remaining == Some(0.0)));
        let result = match status {
            200..=299 => match parsed {
                Ok(_) => {
                    let usage = serde_json::from_slice::<UsageEnvelope>(&bytes).ok().and_then(|u| u.usage);
                    let (p, c) = usage.map(|u| u.totals()).unwrap_or((0, 0));
                    Ok(Success { answer, prompt_tokens: p, completion_tokens: c })
                }
                Err(e) => Err(CallError::InvalidResponse { answer, reason: format!("body is not JSON: {e}") }),
            },
            _ if capacity_unavailable(status, &bytes) => Err(CallError::Unavailable { answer, retry_after }),
            429 | 408 | 409 | 425 => Err(CallError::RateLimited { answer, retry_after }),
            503 | 529 => Err(CallError::Overloaded { answer, retry_after }),
            500..=599 => Err(CallError::Server { answer }),
            300..=399 => Err(CallError::Redirect { answer }),
            _ => {
                let message = error_message(&bytes).unwrap_or_else(|| format!("HTTP {status}"));
                Err(CallError::Client { answer, message })
            }
        };
        (result, remaining, throttle, tokens)
    }

    /// The longest wait a provider's hint can impose: the whole in-process retry budget
    /// (a longer wait is the delay queues' business).
    fn retry_after_cap(&self) -> Duration {
        Duration::from_secs(self.retry.max_elapsed_s.max(1))
    }
}

/// A transport failure of a call that could take `timeout`, classified.
fn transport_error(e: reqwest::Error, timeout: Duration) -> CallError {
    if e.is_timeout() {
        CallError::Timeout(timeout)
    } else {
        // reqwest's Display does not include the URL's credentials; it has none here.
        CallError::Connection(e.without_url().to_string())
    }
}

/// Whether an answer says the provider's flex tier has no capacity now: HTTP 498 (Groq's
/// `capacity_exceeded`, its only use of the status), or a 429 whose error's `code` or
/// `type` is `resource_unavailable` or whose message says "resource unavailable" (OpenAI's
/// and Azure's flex tier). Any other 429 is about rate.
pub(crate) fn capacity_unavailable(status: u16, body: &[u8]) -> bool {
    match status {
        498 => true,
        429 => {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else { return false };
            let e = &v["error"];
            let named = |k: &str| e[k].as_str().is_some_and(|c| c.eq_ignore_ascii_case("resource_unavailable"));
            let said = e["message"].as_str().is_some_and(|m| m.to_ascii_lowercase().contains("resource unavailable"));
            named("code") || named("type") || said
        }
        _ => false,
    }
}

/// `body` asking for the flex tier: `"service_tier": "flex"` put first in the object, every
/// other byte of it unchanged; a body with a `service_tier` of its own gets it replaced
/// (the object rebuilt). `None` when the body is not a JSON object.
pub(crate) fn flex_body(body: &str) -> Option<String> {
    let object: serde_json::Map<String, serde_json::Value> = match serde_json::from_str(body) {
        Ok(object) => object,
        Err(_) => return None,
    };
    if object.contains_key("service_tier") {
        let mut object = object;
        object.insert("service_tier".into(), serde_json::Value::String("flex".into()));
        return serde_json::to_string(&object).ok();
    }
    let rest = body.trim_start().strip_prefix('{')?;
    let separator = if object.is_empty() { "" } else { "," };
    Some(format!(r#"{{"service_tier":"flex"{separator}{rest}"#))
}

/// Returns once `wanted` says no, asking every [`UNWANTED_POLL`] (cancels arrive on the
/// control stream, deadlines pass: neither wakes a waiting task by itself).
async fn until_unwanted(wanted: &(dyn Fn() -> bool + Send + Sync)) {
    while wanted() {
        tokio::time::sleep(UNWANTED_POLL).await;
    }
}

/// How often an item waiting for a slot asks whether its job still wants it.
const UNWANTED_POLL: Duration = Duration::from_millis(200);

/// Reads a response body of at most `limit` bytes; `Ok(None)` when it is longer (reading
/// stops there, so an endless body costs `limit` bytes and no more).
pub(crate) async fn read_capped(mut resp: reqwest::Response, limit: usize) -> Result<Option<Bytes>, reqwest::Error> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Ok(None);
    }
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if buf.len() + chunk.len() > limit {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Some(Bytes::from(buf)))
}

/// How long the provider asks us to wait: OpenAI's `retry-after-ms`, else `Retry-After` in
/// seconds or as an HTTP date; LiteLLM's `llm_provider-` copies of both when the standard
/// headers are absent. Never longer than `cap`; a value that is no number or date (or is
/// NaN) is ignored; `inf`, `1e22` or a date years ahead become `cap`.
fn retry_after(headers: &reqwest::header::HeaderMap, now: SystemTime, cap: Duration) -> Option<Duration> {
    let get = |names: [&str; 2]| names.iter().find_map(|n| headers.get(*n).and_then(|v| v.to_str().ok()));
    if let Some(d) = get(["retry-after-ms", "llm_provider-retry-after-ms"]).and_then(|v| bounded(v, 1000.0, cap)) {
        return Some(d);
    }
    let v = get(["retry-after", "llm_provider-retry-after"])?;
    bounded(v, 1.0, cap).or_else(|| {
        let at = httpdate::parse_http_date(v.trim()).ok()?;
        Some(at.duration_since(now).unwrap_or(Duration::ZERO).min(cap))
    })
}

/// `v` (a number of `per_second` units) as a duration clamped to `[0, cap]`.
fn bounded(v: &str, per_second: f64, cap: Duration) -> Option<Duration> {
    let n: f64 = v.trim().parse().ok()?;
    if n.is_nan() {
        return None;
    }
    let secs = (n / per_second).max(0.0);
    // Compared before converting: `Duration::from_secs_f64` panics on infinity or overflow.
    Some(if secs >= cap.as_secs_f64() { cap } else { Duration::from_secs_f64(secs) })
}

/// Headers that carry a provider's request id: OpenAI's, Anthropic's, LiteLLM's call id.
const REQUEST_ID_HEADERS: [&str; 3] = ["x-request-id", "request-id", "x-litellm-call-id"];
/// Headers that say when to retry: the provider's own, and as a gateway (LiteLLM) passes
/// them on.
const RETRY_HINT_HEADERS: [&str; 4] =
    ["retry-after", "retry-after-ms", "llm_provider-retry-after", "llm_provider-retry-after-ms"];

/// The provider's request id, `""` when it sent none.
pub(crate) fn request_id(headers: &reqwest::header::HeaderMap) -> String {
    REQUEST_ID_HEADERS.iter().find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok())).unwrap_or("").to_string()
}

/// What the headers of an answer say about rate, were it a 429: a retry hint or no
/// requests (or tokens) remaining makes it a rate limit; no such header and no request id either (a
/// gateway passing a 429 on) makes it silent.
fn throttle(headers: &reqwest::header::HeaderMap) -> Throttle {
    let no_tokens = || TokenHeadroom::from_headers(headers, Duration::ZERO).remaining == Some(0.0);
    if RETRY_HINT_HEADERS.iter().any(|h| headers.contains_key(*h))
        || remaining_requests(headers) == Some(0.0)
        || no_tokens()
    {
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

/// What an answer's headers say about the provider's token window: OpenAI's
/// `x-ratelimit-remaining-tokens` and `x-ratelimit-reset-tokens`, Anthropic's
/// `anthropic-ratelimit-tokens-remaining`.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct TokenHeadroom {
    /// Tokens remaining in the provider's window, if it said.
    pub remaining: Option<f64>,
    /// Until the window is full again, at most the retry budget.
    pub reset: Option<Duration>,
}

impl TokenHeadroom {
    fn from_headers(headers: &reqwest::header::HeaderMap, cap: Duration) -> Self {
        let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let remaining = ["x-ratelimit-remaining-tokens", "anthropic-ratelimit-tokens-remaining"]
            .iter()
            .find_map(|h| get(h).and_then(|v| v.trim().parse::<f64>().ok()).filter(|n| n.is_finite()));
        let reset = get("x-ratelimit-reset-tokens").and_then(go_duration).map(|d| d.min(cap));
        TokenHeadroom { remaining, reset }
    }
}

/// A Go-style duration as OpenAI writes its reset headers (`"6m0s"`, `"1.5s"`, `"120ms"`);
/// `None` when it is not one (or is absurdly long).
fn go_duration(v: &str) -> Option<Duration> {
    let mut rest = v.trim();
    if rest.is_empty() {
        return None;
    }
    let mut secs = 0.0f64;
    while !rest.is_empty() {
        let end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).filter(|&i| i > 0)?;
        let n: f64 = rest[..end].parse().ok()?;
        rest = &rest[end..];
        let unit_end = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let per_unit = match &rest[..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        secs += n * per_unit;
        rest = &rest[unit_end..];
    }
    // Bounded before converting: `Duration::from_secs_f64` panics on overflow.
    (secs.is_finite() && secs < 1e9).then(|| Duration::from_secs_f64(secs))
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

    const CAP: Duration = Duration::from_secs(60);

    fn headers(pairs: &[(&'static str, &str)]) -> reqwest::header::HeaderMap {
        let mut h = reqwest::header::HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn retry_after_prefers_milliseconds() {
        let now = SystemTime::now();
        assert_eq!(retry_after(&headers(&[("retry-after", "2")]), now, CAP), Some(Duration::from_secs(2)));
        let h = headers(&[("retry-after", "2"), ("retry-after-ms", "150")]);
        assert_eq!(retry_after(&h, now, CAP), Some(Duration::from_millis(150)));
    }

    #[test]
    fn absurd_retry_hints_are_bounded_and_never_panic() {
        let now = SystemTime::now();
        for (header, value, want) in [
            ("retry-after", "inf", Some(CAP)),
            ("retry-after", "-inf", Some(Duration::ZERO)),
            ("retry-after", "NaN", None),
            ("retry-after", "1e22", Some(CAP)),
            ("retry-after", "-3", Some(Duration::ZERO)),
            ("retry-after", "soon", None),
            ("retry-after", "Fri, 01 Jan 2100 00:00:00 GMT", Some(CAP)),
            ("retry-after", "Thu, 01 Jan 1970 00:00:00 GMT", Some(Duration::ZERO)),
            ("retry-after-ms", "1e300", Some(CAP)),
            ("retry-after-ms", "infinity", Some(CAP)),
            ("llm_provider-retry-after-ms", "250", Some(Duration::from_millis(250))),
            ("llm_provider-retry-after", "3", Some(Duration::from_secs(3))),
        ] {
            assert_eq!(retry_after(&headers(&[(header, value)]), now, CAP), want, "{header}: {value}");
        }
        // A NaN in milliseconds falls back to the seconds header.
        let h = headers(&[("retry-after-ms", "NaN"), ("retry-after", "4")]);
        assert_eq!(retry_after(&h, now, CAP), Some(Duration::from_secs(4)));
        // The standard header wins over LiteLLM's copy.
        let h = headers(&[("retry-after", "1"), ("llm_provider-retry-after", "9")]);
        assert_eq!(retry_after(&h, now, CAP), Some(Duration::from_secs(1)));
    }

    #[test]
    fn an_http_date_is_a_wait_until_then() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let at = httpdate::fmt_http_date(now + Duration::from_secs(7));
        assert_eq!(retry_after(&headers(&[("retry-after", &at)]), now, CAP), Some(Duration::from_secs(7)));
    }

    #[test]
    fn token_headroom_from_openai_and_anthropic_headers() {
        let h = headers(&[("x-ratelimit-remaining-tokens", "1500"), ("x-ratelimit-reset-tokens", "1m30.5s")]);
        let t = TokenHeadroom::from_headers(&h, CAP);
        assert_eq!(t, TokenHeadroom { remaining: Some(1500.0), reset: Some(Duration::from_millis(60_000)) });
        let h = headers(&[("anthropic-ratelimit-tokens-remaining", "7"), ("x-ratelimit-reset-tokens", "120ms")]);
        let t = TokenHeadroom::from_headers(&h, CAP);
        assert_eq!(t, TokenHeadroom { remaining: Some(7.0), reset: Some(Duration::from_millis(120)) });
        for bad in ["", "soon", "5", "1e400s", "3x", "-1s"] {
            assert_eq!(go_duration(bad), None, "{bad:?}");
        }
        assert_eq!(go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(go_duration("0.5s"), Some(Duration::from_millis(500)));
        let h = headers(&[("x-ratelimit-remaining-tokens", "NaN")]);
        assert_eq!(TokenHeadroom::from_headers(&h, CAP).remaining, None);
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
        assert_eq!(throttle(&headers(&[("x-ratelimit-remaining-tokens", "0")])), Throttle::Hinted);
        assert_eq!(throttle(&headers(&[("anthropic-ratelimit-tokens-remaining", "0")])), Throttle::Hinted);
        assert_eq!(throttle(&headers(&[("x-request-id", "req_1")])), Throttle::Unhinted);
        assert_eq!(throttle(&headers(&[("x-ratelimit-remaining-requests", "5")])), Throttle::Unhinted);
        // LiteLLM's `/v1/messages` route passes a 429 on with none of them.
        assert_eq!(
            throttle(&headers(&[("content-type", "application/json"), ("content-length", "10")])),
            Throttle::Silent
        );
    }

    #[test]
    fn a_flex_tier_without_capacity_is_told_from_a_rate_limit() {
        assert!(capacity_unavailable(498, br#"{"error":{"code":"capacity_exceeded","message":"flex capacity"}}"#));
        assert!(capacity_unavailable(498, b"not json"), "498 is Groq's flex status, whatever its body");
        for body in [
            r#"{"error":{"code":"resource_unavailable","message":"x"}}"#,
            r#"{"error":{"type":"resource_unavailable"}}"#,
            r#"{"error":{"message":"Resource Unavailable: flex capacity is exhausted, retry later"}}"#,
        ] {
            assert!(capacity_unavailable(429, body.as_bytes()), "{body}");
        }
        for body in [
            r#"{"error":{"code":"rate_limit_exceeded","message":"Rate limit reached for requests"}}"#,
            r#"{"error":"resource_unavailable"}"#,
            "",
            "[1]",
        ] {
            assert!(!capacity_unavailable(429, body.as_bytes()), "{body}");
        }
        assert!(!capacity_unavailable(503, br#"{"error":{"code":"resource_unavailable"}}"#), "only 429 and 498");
        let e = CallError::Unavailable {
            answer: Answer { status: 498, request_id: String::new(), body: None },
            retry_after: None,
        };
        assert!(e.is_transient());
        assert_eq!(e.kind(), "capacity_unavailable");
    }

    #[test]
    fn a_flex_body_asks_for_the_tier_and_keeps_the_rest() {
        let body = r#" {"model":"m","temperature":0.10000000000000001,"messages":[]}"#;
        assert_eq!(
            flex_body(body).unwrap(),
            r#"{"service_tier":"flex","model":"m","temperature":0.10000000000000001,"messages":[]}"#
        );
        assert_eq!(flex_body("{}").unwrap(), r#"{"service_tier":"flex"}"#);
        assert_eq!(flex_body("{ }").unwrap(), r#"{"service_tier":"flex" }"#);
        let own: serde_json::Value =
            serde_json::from_str(&flex_body(r#"{"model":"m","service_tier":"auto"}"#).unwrap()).unwrap();
        assert_eq!(own, serde_json::json!({"model": "m", "service_tier": "flex"}));
        for bad in ["[]", "\"x\"", "", "{"] {
            assert_eq!(flex_body(bad), None, "{bad:?}");
        }
    }

    fn client(kind: ProviderKind, base_url: &str) -> ProviderClient {
        let cfg = ProviderConfig {
            timeout_s: 1,
            max_in_flight: 1,
            max_response_bytes: 1024,
            ..ProviderConfig::new(kind, base_url)
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
        ProviderClient::new("p", &cfg, 1, &retry, WorkerMetrics::new()).unwrap()
    }

    #[test]
    fn endpoint_joins_without_doubling_v1() {
        let c = client(ProviderKind::Openai, "https://api.example.com/v1/");
        let t = c.target("/v1/chat/completions").unwrap();
        assert_eq!(t.url.as_str(), "https://api.example.com/v1/chat/completions");
        assert_eq!(t.endpoint.operation(), "chat_completions");
        let c = client(ProviderKind::Anthropic, "http://127.0.0.1:8080/proxy");
        assert_eq!(c.target("/v1/messages").unwrap().url.as_str(), "http://127.0.0.1:8080/proxy/v1/messages");
    }

    #[test]
    fn only_known_endpoints_of_the_kind_are_called() {
        let c = client(ProviderKind::Anthropic, "https://api.example.com");
        for hostile in [
            "@evil.example/v1/messages",
            "/v1/../admin",
            "/v1/messages/../../admin",
            "//evil.example/v1/messages",
            "http://evil.example/v1/messages",
            "/v1/messages?x=1",
            "/v1/messages#f",
            "/v1/chat/completions",
            "",
        ] {
            assert!(matches!(c.target(hostile), Err(ForbiddenUrl::NotAnEndpoint(..))), "{hostile:?} must be refused");
        }
        let long = "x".repeat(10_000);
        let err = c.target(&long).unwrap_err().to_string();
        assert!(err.len() < 300, "a hostile url is shortened in the reason: {} bytes", err.len());
    }

    #[test]
    fn a_base_url_that_is_not_http_is_refused_without_echoing_it() {
        let cfg = ProviderConfig::new(ProviderKind::Openai, "http//user:hunter2@host");
        let retry = client(ProviderKind::Openai, "http://x").retry.clone();
        let err = ProviderClient::new("p", &cfg, 1, &retry, WorkerMetrics::new()).err().unwrap().to_string();
        assert!(err.contains("base_url") && !err.contains("hunter2"), "{err}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 512, failure_persistence: None, ..proptest::prelude::ProptestConfig::default()
        })]

        #[test]
        fn any_wait_hint_is_bounded(value in "[ -~]{0,40}", header in proptest::sample::select(vec![
            "retry-after", "retry-after-ms", "llm_provider-retry-after", "llm_provider-retry-after-ms",
        ])) {
            let mut h = reqwest::header::HeaderMap::new();
            h.insert(header, value.parse().unwrap());
            if let Some(d) = retry_after(&h, SystemTime::now(), CAP) {
                proptest::prop_assert!(d <= CAP);
            }
        }

        #[test]
        fn any_url_is_refused_or_stays_under_the_base(url in proptest::prelude::any::<String>()) {
            let c = client(ProviderKind::Openai, "http://127.0.0.1:8080/base/v1");
            if let Ok(t) = c.target(&url) {
                proptest::prop_assert_eq!(t.url.host_str(), Some("127.0.0.1"));
                proptest::prop_assert_eq!(t.url.port(), Some(8080));
                proptest::prop_assert!(t.url.path().starts_with("/base/v1/"));
                proptest::prop_assert!(Endpoint::from_path(&url).is_some());
            }
        }
    }
}
