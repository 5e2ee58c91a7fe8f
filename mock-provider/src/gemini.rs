//! Owns the Gemini endpoints of the mock (Google's Generative Language API, `v1beta`), in
//! the documented shapes, with the same knobs as the other dialects:
//!
//! - `POST /v1beta/models/{model}:generateContent`: `contents` / `systemInstruction` /
//!   `generationConfig` in, `candidates` + `usageMetadata` (`promptTokenCount`,
//!   `candidatesTokenCount`, `cachedContentTokenCount`, `totalTokenCount`) + `modelVersion`
//!   + `responseId` out;
//! - `POST /v1beta/models/{model}:embedContent` and `:batchEmbedContents`: `embedding.values`
//!   / `embeddings[].values`;
//! - `GET /v1beta/models`: the model list (a key-only probe; counted in `models_listed`);
//! - `POST /v1beta/models/{model}:batchGenerateContent`: handed to the batch API
//!   (`crate::batches::gemini`, which also serves `/v1beta/batches/...`).
//!
//! The key goes in `x-goog-api-key`; with `--valid-keys`, another key is answered 400
//! `INVALID_ARGUMENT` with an `ErrorInfo` of reason `API_KEY_INVALID`, as Gemini answers it.
//! Errors are Google's `{"error": {"code", "message", "status", "details"}}`: a 429 (from
//! `--rpm`, `--tpm` or `--error-429`) is `RESOURCE_EXHAUSTED` with a `RetryInfo.retryDelay`
//! (the bucket's wait, or `--gemini-retry-delay-ms` for injected ones) and no `Retry-After`
//! header (Gemini sends none); 503 is `UNAVAILABLE`, 500 `INTERNAL`, 400 `INVALID_ARGUMENT`,
//! 403 `PERMISSION_DENIED` (`--forbidden-models`).
//!
//! Token counts: a prompt counts one token per four characters of its text parts (system
//! instruction included); the system instruction's tokens are also reported as
//! `cachedContentTokenCount` (standing in for Gemini's implicit prompt cache), so a client's
//! cached-token accounting can be checked; `/stats` sums all three.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::{json, Value};

use crate::api::{quote, tokens, DEFAULT_MODEL};
use crate::faults::Fault;
use crate::handlers::{AppState, RequestId};
use crate::limiter::Admission;

/// The Gemini knobs (part of [`crate::Knobs`]).
#[derive(clap::Args, Clone, Debug)]
pub struct GeminiKnobs {
    /// The `RetryInfo.retryDelay` of the 429s `--error-429` injects on the Gemini routes, ms.
    #[arg(long, env = "MOCK_GEMINI_RETRY_DELAY_MS", default_value_t = 1000)]
    pub gemini_retry_delay_ms: u64,
}

impl Default for GeminiKnobs {
    fn default() -> Self {
        Self { gemini_retry_delay_ms: 1000 }
    }
}

/// A Gemini method the mock serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// `:generateContent`: a chat completion in Gemini's shape.
    GenerateContent,
    /// `:embedContent`: one embedding.
    EmbedContent,
    /// `:batchEmbedContents`: several embeddings in one call.
    BatchEmbedContents,
}

impl Method {
    /// Every method, in the order of the `/stats` slots.
    pub const ALL: [Method; 3] = [Method::GenerateContent, Method::EmbedContent, Method::BatchEmbedContents];

    fn from_action(action: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.action() == action)
    }

    /// The part of the path after `{model}:`.
    pub fn action(self) -> &'static str {
        match self {
            Method::GenerateContent => "generateContent",
            Method::EmbedContent => "embedContent",
            Method::BatchEmbedContents => "batchEmbedContents",
        }
    }

    /// The `by_path` key of `/stats` for this method.
    pub fn stats_path(self) -> &'static str {
        match self {
            Method::GenerateContent => "/v1beta/models/{model}:generateContent",
            Method::EmbedContent => "/v1beta/models/{model}:embedContent",
            Method::BatchEmbedContents => "/v1beta/models/{model}:batchEmbedContents",
        }
    }
}

/// The Gemini routes.
pub(crate) fn router() -> Router<Arc<AppState>> {
    Router::new().route("/v1beta/models", get(models)).route("/v1beta/models/{call}", post(call))
}

/// The header a Gemini key comes in.
const KEY_HEADER: &str = "x-goog-api-key";

/// `GET /v1beta/models`: one model, in Gemini's list shape.
async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Some(refused) = refuse_key(&state, &headers) {
        return refused;
    }
    state.stats.record_models_listed();
    Json(json!({"models": [{"name": format!("models/{DEFAULT_MODEL}"), "displayName": "Mock"}]})).into_response()
}

/// `POST /v1beta/models/{model}:{action}`: the pipeline of the other dialects (key, rpm,
/// tpm, validation, forbidden models, fault draw, delay, answer) in Gemini's shapes.
async fn call(
    State(state): State<Arc<AppState>>,
    Extension(RequestId(n)): Extension<RequestId>,
    Path(call): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(model) = call.strip_suffix(":batchGenerateContent") {
        // The batch API (`crate::batches::gemini`), under the same key check.
        if let Some(refused) = refuse_key(&state, &headers) {
            return refused;
        }
        return crate::batches::gemini::create(&state.batches, model, &body);
    }
    let Some((model, method)) = call.split_once(':').and_then(|(m, a)| Some((m, Method::from_action(a)?))) else {
        return error(&state, 404, &format!("mock-provider: no method {:?}", quote(&call)), None);
    };
    let _in_flight = state.stats.enter_gemini(method);
    if let Some(refused) = refuse_key(&state, &headers) {
        return refused;
    }
    let admission =
        state.limiter.as_ref().map(|b| b.lock().unwrap_or_else(|e| e.into_inner()).try_acquire(Instant::now()));
    if let Some(Admission::Refused { retry_after, .. }) = admission {
        return error(&state, 429, "mock-provider: rate limit reached (rpm)", Some(retry_after));
    }
    let reply = match reply(method, model, &body, n) {
        Ok(reply) => reply,
        Err(message) => return error(&state, 400, &message, None),
    };
    if let Some(bucket) = &state.tokens {
        let admission =
            bucket.lock().unwrap_or_else(|e| e.into_inner()).try_acquire_n(Instant::now(), reply.rate_tokens);
        match admission {
            Admission::Refused { retry_after, .. } => {
                state.stats.record_tpm_refused();
                return error(&state, 429, "mock-provider: rate limit reached (tpm)", Some(retry_after));
            }
            Admission::Granted { .. } => state.stats.record_tokens(reply.rate_tokens),
        }
    }
    if state.forbidden_models.iter().any(|f| f == model) {
        let message = format!("mock-provider: this project does not have access to model `{model}`");
        return error(&state, 403, &message, None);
    }
    let decision = state.faults.decide();
    if decision.fault == Fault::Hang {
        state.stats.record_hung();
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(3600)) => {}
            () = state.shutdown.cancelled() => {}
        }
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    if !decision.delay.is_zero() {
        tokio::time::sleep(decision.delay).await;
    }
    match decision.fault {
        Fault::None => {
            state.stats.record_usage(reply.prompt_tokens, reply.output_tokens);
            state.stats.record_cached(reply.cached_tokens);
            respond(&state, 200, reply.body)
        }
        Fault::Garbage => {
            state.stats.record_garbage();
            let mut response = Response::new(Body::from("<html>oops, this is not JSON</html>"));
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
            response
        }
        Fault::Status(429) => {
            let delay = Duration::from_millis(state.gemini.gemini_retry_delay_ms);
            error(&state, 429, "mock-provider: injected 429", Some(delay))
        }
        Fault::Status(status) => error(&state, status, &format!("mock-provider: injected {status}"), None),
        Fault::Hang => unreachable!("handled above"),
    }
}

/// With `--valid-keys`, the answer to a request whose `x-goog-api-key` is not one of them.
fn refuse_key(state: &AppState, headers: &HeaderMap) -> Option<Response> {
    let valid = state.valid_keys.read().unwrap_or_else(|e| e.into_inner()).clone();
    if valid.is_empty() {
        return None;
    }
    let key = headers.get(KEY_HEADER).and_then(|v| v.to_str().ok());
    if key.is_some_and(|k| valid.iter().any(|v| v == k)) {
        return None;
    }
    state.stats.record_key_refused(400);
    let body = json!({"error": {
        "code": 400, "message": "API key not valid. Please pass a valid API key.", "status": "INVALID_ARGUMENT",
        "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                     "domain": "googleapis.com"}],
    }});
    Some(json_response(400, body.to_string().into_bytes()))
}

/// A Google error answer with `status`, counted; a 429 carries `RetryInfo.retryDelay`.
fn error(state: &AppState, status: u16, message: &str, retry_delay: Option<Duration>) -> Response {
    respond(state, status, error_body(status, message, retry_delay))
}

/// Google's error body for `status` (see the module header).
pub fn error_body(status: u16, message: &str, retry_delay: Option<Duration>) -> Vec<u8> {
    let name = match status {
        400 => "INVALID_ARGUMENT",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        429 => "RESOURCE_EXHAUSTED",
        503 | 529 => "UNAVAILABLE",
        _ => "INTERNAL",
    };
    let mut details = Vec::new();
    if let Some(delay) = retry_delay {
        details.push(json!({"@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_requests",
                            "quotaId": "GenerateRequestsPerMinutePerProjectPerModel"}]}));
        details.push(json!({"@type": "type.googleapis.com/google.rpc.RetryInfo",
            "retryDelay": format!("{}s", delay.as_secs_f64())}));
    }
    let mut error = json!({"code": status, "message": message, "status": name});
    if !details.is_empty() {
        error["details"] = Value::Array(details);
    }
    json!({ "error": error }).to_string().into_bytes()
}

fn respond(state: &AppState, status: u16, body: Vec<u8>) -> Response {
    state.stats.record_status(status);
    json_response(status, body)
}

fn json_response(status: u16, body: Vec<u8>) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A success answer and what it counts.
#[derive(Debug)]
pub struct Reply {
    /// The body to send.
    pub body: Vec<u8>,
    /// `promptTokenCount` (cached ones included).
    pub prompt_tokens: u64,
    /// `cachedContentTokenCount`.
    pub cached_tokens: u64,
    /// `candidatesTokenCount`.
    pub output_tokens: u64,
    /// What `--tpm` charges: the prompt plus the most output it asks for.
    pub rate_tokens: u64,
}

/// The answer to a request for `model` with `method`, or why the request is invalid (400).
pub fn reply(method: Method, model: &str, body: &[u8], n: u64) -> Result<Reply, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("Invalid JSON payload received. {e}"))?;
    if !v.is_object() {
        return Err("Invalid JSON payload received: not an object".into());
    }
    match method {
        Method::GenerateContent => generate(model, &v, n),
        Method::EmbedContent => {
            let text = texts(v.get("content"))?;
            Ok(embed(method, &[text]))
        }
        Method::BatchEmbedContents => {
            let requests = v.get("requests").and_then(Value::as_array).filter(|r| !r.is_empty());
            let requests = requests.ok_or("* BatchEmbedContentsRequest.requests: must not be empty")?;
            let texts = requests.iter().map(|r| texts(r.get("content"))).collect::<Result<Vec<_>, _>>()?;
            Ok(embed(method, &texts))
        }
    }
}

/// The text of a `Content` (`{"parts": [{"text": ...}, ...]}`); other parts count nothing.
fn texts(content: Option<&Value>) -> Result<String, String> {
    let parts = content.and_then(|c| c.get("parts")).and_then(Value::as_array);
    let parts = parts.ok_or("* contents.parts: must be a list")?;
    Ok(parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect())
}

fn generate(model: &str, v: &Value, n: u64) -> Result<Reply, String> {
    let contents = v.get("contents").and_then(Value::as_array).filter(|c| !c.is_empty());
    let contents = contents.ok_or("* GenerateContentRequest.contents: contents is not specified")?;
    let mut prompt_chars = 0;
    let mut last = String::new();
    for c in contents {
        match c.get("role").and_then(Value::as_str) {
            None | Some("user" | "model") => {}
            Some(other) => return Err(format!("Please use a valid role: user, model (got {:?}).", quote(other))),
        }
        last = texts(Some(c))?;
        prompt_chars += last.chars().count();
    }
    let system_chars = match v.get("systemInstruction") {
        Some(s) => texts(Some(s))?.chars().count(),
        None => 0,
    };
    let config = v.get("generationConfig");
    let candidates = config.and_then(|c| c.get("candidateCount")).and_then(Value::as_u64).unwrap_or(1).clamp(1, 8);
    let max_output = config.and_then(|c| c.get("maxOutputTokens")).and_then(Value::as_u64);
    let text = format!("mock reply to: {}", quote(&last));
    let per_candidate = tokens(text.chars().count());
    let system = tokens(system_chars);
    let prompt = tokens(prompt_chars) + system;
    let output = per_candidate * candidates;
    let body = json!({
        "candidates": (0..candidates).map(|i| json!({
            "content": {"role": "model", "parts": [{"text": text}]},
            "finishReason": "STOP",
            "index": i,
            "safetyRatings": [],
        })).collect::<Vec<_>>(),
        "usageMetadata": {
            "promptTokenCount": prompt,
            "candidatesTokenCount": output,
            "cachedContentTokenCount": system,
            "totalTokenCount": prompt + output,
        },
        "modelVersion": model,
        "responseId": format!("mock-{n}"),
    });
    let rate_tokens = prompt.min(fleet::tokens::MAX_REQUEST_TOKENS) + max_output.unwrap_or(0);
    Ok(Reply {
        body: body.to_string().into_bytes(),
        prompt_tokens: prompt,
        cached_tokens: system,
        output_tokens: output,
        rate_tokens,
    })
}

fn embed(method: Method, texts: &[String]) -> Reply {
    let values: Vec<Value> = texts.iter().map(|t| json!({ "values": crate::api::fake_embedding(t) })).collect();
    let body = match (method, values.as_slice()) {
        (Method::EmbedContent, [one]) => json!({ "embedding": one }),
        _ => json!({ "embeddings": values }),
    };
    let prompt: u64 = texts.iter().map(|t| tokens(t.chars().count())).sum();
    // Gemini's embedding answers report no usage: nothing is counted.
    Reply {
        body: body.to_string().into_bytes(),
        prompt_tokens: 0,
        cached_tokens: 0,
        output_tokens: 0,
        rate_tokens: prompt,
    }
}
