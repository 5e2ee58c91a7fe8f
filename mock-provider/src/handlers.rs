//! Owns the HTTP surface: shared server state, the axum router, the `x-request-id` middleware
//! and the request pipeline (count -> rate limit -> validate -> fault draw -> delay -> answer).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use tokio_util::sync::CancellationToken;

use crate::api::{self, Endpoint};
use crate::batches::{self, Batches};
use crate::faults::{Fault, FaultInjector};
use crate::gateway::{self, GatewayMode};
use crate::hostile::{self, Hostile};
use crate::knobs::Knobs;
use crate::limiter::{Admission, TokenBucket, Unit};
use crate::stats::Stats;

/// How long a "hung" request waits before giving up: effectively forever for any client.
const HANG_FOR: Duration = Duration::from_secs(3600);
const GARBAGE_BODY: &[u8] = b"<html>oops, this is not JSON</html>";
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// State shared by every request of one server.
#[derive(Debug)]
pub(crate) struct AppState {
    pub(crate) faults: FaultInjector,
    // Std mutex for the same reason as the fault generator: a few float operations, never held
    // across an await.
    pub(crate) limiter: Option<Mutex<TokenBucket>>,
    /// `--tpm`: the same bucket, charged each request's counted tokens.
    pub(crate) tokens: Option<Mutex<TokenBucket>>,
    /// `--valid-keys` (empty: any key, or none, is accepted); replaced at run time by
    /// `PUT /admin/valid-keys`, so a test can make a rejected key good again.
    pub(crate) valid_keys: std::sync::RwLock<Vec<String>>,
    /// `--forbidden-models`: answered 403, the key stays good.
    pub(crate) forbidden_models: Vec<String>,
    /// `--key-projects`: the key that created each batch or file, by its id.
    projects: Option<Mutex<std::collections::HashMap<String, String>>>,
    /// `--answer-model-suffix`: appended to the `model` of online answers.
    answer_model_suffix: String,
    pub(crate) stats: Stats,
    next_request: AtomicU64,
    pub(crate) shutdown: CancellationToken,
    /// The Gemini knobs (the Gemini routes live in `crate::gemini`).
    pub(crate) gemini: crate::gemini::GeminiKnobs,
    litellm: Option<GatewayMode>,
    pub(crate) batches: Arc<Batches>,
    /// `--flex-latency-ms` and `--flex-unavailable`.
    flex_latency: Duration,
    flex_unavailable: f64,
    /// Flex requests seen so far: refusals are spread evenly over them.
    flex_seen: AtomicU64,
}

impl AppState {
    pub(crate) fn new(knobs: &Knobs, shutdown: CancellationToken) -> Self {
        Self {
            faults: FaultInjector::new(knobs),
            limiter: knobs.rpm.map(|rpm| Mutex::new(TokenBucket::new(rpm, Instant::now()))),
            tokens: knobs.tpm.map(|tpm| Mutex::new(TokenBucket::new(tpm, Instant::now()))),
            valid_keys: std::sync::RwLock::new(knobs.valid_keys.iter().map(|k| k.0.clone()).collect()),
            forbidden_models: knobs.forbidden_models.clone(),
            projects: knobs.key_projects.then(Default::default),
            answer_model_suffix: knobs.answer_model_suffix.clone(),
            stats: Stats::default(),
            next_request: AtomicU64::new(0),
            shutdown,
            litellm: knobs.litellm,
            gemini: knobs.gemini.clone(),
            batches: Arc::new(Batches::new(&knobs.batch, knobs.seed)),
            flex_latency: Duration::from_millis(knobs.flex_latency_ms),
            flex_unavailable: knobs.flex_unavailable,
            flex_seen: AtomicU64::new(0),
        }
    }
}

/// The request number assigned by [`request_id`], available to handlers as an extension.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RequestId(pub(crate) u64);

/// Builds the router serving the provider endpoints, the batch APIs, `/stats`, `/stats/reset`
/// and `/healthz`.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    // Every endpoint of the fleet's list, so the mock serves exactly what the fleet may call.
    let provider_routes = Endpoint::ALL.into_iter().fold(Router::new(), |router, endpoint| {
        router.route(endpoint.path(), post(move |state, id, body| provider_endpoint(endpoint, state, id, body)))
    });
    provider_routes
        .route(hostile::STOLEN_PATH, post(stolen).get(stolen))
        .route("/stats", get(stats))
        .route("/stats/reset", post(reset_stats))
        .route("/healthz", get(healthz))
        .route(MODELS_PATH, get(models))
        .route("/admin/valid-keys", put(set_valid_keys))
        .merge(batches::router(state.batches.clone()))
        .merge(crate::gemini::router())
        // Inside the key check: only a valid key owns or reaches a project's batches.
        .layer(middleware::from_fn_with_state(state.clone(), key_projects))
        // The key is checked first, as a provider's edge does (`--valid-keys`).
        .layer(middleware::from_fn_with_state(state.clone(), require_key))
        // A middleware rather than per-handler code so that every answer, including axum's own
        // 404/405/413 rejections, carries an id.
        .layer(middleware::from_fn_with_state(state.clone(), request_id))
        .with_state(state)
}

async fn request_id(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let n = state.next_request.fetch_add(1, Relaxed) + 1;
    req.extensions_mut().insert(RequestId(n));
    let mut response = next.run(req).await;
    response.headers_mut().insert(X_REQUEST_ID, HeaderValue::from_str(&format!("req_{n}")).expect("ASCII"));
    if let Some(mode) = state.litellm {
        let status = response.status();
        gateway::rewrite(mode, status, n, response.headers_mut());
    }
    response
}

/// The model list both providers serve (`GET /v1/models`): what a client asks to learn
/// whether a key is good, since it names no model and costs nothing.
const MODELS_PATH: &str = "/v1/models";

/// With `--valid-keys`, answers 401 to a provider request (and to the model list) whose key
/// is not one of them (`Authorization: Bearer <key>` or Anthropic's `x-api-key`), in the
/// endpoint's error shape.
async fn require_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let (bearer, x_api_key) = presented_keys(req.headers());
    let path = req.uri().path();
    let endpoint = Endpoint::from_path(path).or_else(|| {
        (path == MODELS_PATH).then_some(if x_api_key.is_some() {
            Endpoint::Messages
        } else {
            Endpoint::ChatCompletions
        })
    });
    let checked = !state.valid_keys.read().unwrap_or_else(|e| e.into_inner()).is_empty();
    let Some(endpoint) = endpoint.filter(|_| checked) else {
        return next.run(req).await;
    };
    let valid = state.valid_keys.read().unwrap_or_else(|e| e.into_inner()).clone();
    if [bearer, x_api_key].into_iter().flatten().any(|k| valid.iter().any(|v| v == k)) {
        return next.run(req).await;
    }
    state.stats.record_unauthorized();
    let body = api::error_body(endpoint, 401, "mock-provider: invalid API key");
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = StatusCode::UNAUTHORIZED;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// The keys a request presents: `Authorization: Bearer <key>` (OpenAI) and `x-api-key`
/// (Anthropic).
fn presented_keys(headers: &axum::http::HeaderMap) -> (Option<&str>, Option<&str>) {
    let bearer =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    (bearer, headers.get("x-api-key").and_then(|v| v.to_str().ok()))
}

/// The key of a request (the bearer one first), `""` without one.
fn request_key(headers: &axum::http::HeaderMap) -> String {
    let (bearer, x_api_key) = presented_keys(headers);
    bearer.or(x_api_key).unwrap_or_default().to_string()
}

/// Paths that create a batch or a file: the answer's `id` then belongs to the request's key.
const PROJECT_CREATES: [&str; 3] = ["/v1/batches", "/v1/files", "/v1/messages/batches"];

/// The batch or file id a path asks for (`/v1/batches/{id}[/...]`, `/v1/files/{id}[/...]`,
/// `/v1/messages/batches/{id}[/...]`).
fn project_id(path: &str) -> Option<&str> {
    let rest = ["/v1/batches/", "/v1/files/", "/v1/messages/batches/"].iter().find_map(|p| path.strip_prefix(p))?;
    rest.split('/').next().filter(|id| !id.is_empty())
}

/// With `--key-projects`, a batch or file belongs to the key that created it, as it belongs
/// to a project at OpenAI or a workspace at Anthropic: another key asking for it by id gets
/// 404, as from a provider that does not show it to that key.
async fn key_projects(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Some(projects) = &state.projects else { return next.run(req).await };
    let key = request_key(req.headers());
    let path = req.uri().path().to_string();
    if let Some(id) = project_id(&path) {
        let owner = projects.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned();
        if owner.is_some_and(|owner| owner != key) {
            state.stats.record_other_project();
            let body = serde_json::json!({"error": {"message": format!("No such object: {id}"), "type": "invalid_request_error", "code": "not_found"}});
            return (StatusCode::NOT_FOUND, Json(body)).into_response();
        }
    }
    let creates = req.method() == axum::http::Method::POST && PROJECT_CREATES.contains(&path.as_str());
    let response = next.run(req).await;
    if !creates || !response.status().is_success() {
        return response;
    }
    let (parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 1 << 20).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let id = serde_json::from_slice::<serde_json::Value>(&bytes).ok().and_then(|v| v["id"].as_str().map(String::from));
    if let Some(id) = id {
        projects.lock().unwrap_or_else(|e| e.into_inner()).insert(id, key);
    }
    Response::from_parts(parts, Body::from(bytes))
}

/// The handler of `endpoint`'s route: every provider endpoint goes through [`handle`].
async fn provider_endpoint(
    endpoint: Endpoint,
    State(state): State<Arc<AppState>>,
    Extension(RequestId(n)): Extension<RequestId>,
    body: Bytes,
) -> Response {
    handle(&state, endpoint, n, &body).await
}

async fn stats(State(state): State<Arc<AppState>>) -> Response {
    Json(snapshot(&state)).into_response()
}

async fn reset_stats(State(state): State<Arc<AppState>>) -> Response {
    state.stats.reset();
    state.batches.reset_stats();
    Json(snapshot(&state)).into_response()
}

/// The `/stats` document: the request counters and the batch counters.
fn snapshot(state: &AppState) -> crate::StatsSnapshot {
    crate::StatsSnapshot { batches: state.batches.stats(), ..state.stats.snapshot() }
}

/// Where the redirecting answers point: a client that follows them lands here.
async fn stolen(State(state): State<Arc<AppState>>) -> Response {
    state.stats.record_stolen();
    (StatusCode::OK, "{}").into_response()
}

async fn healthz() -> &'static str {
    "ok"
}

/// `GET /v1/models`: one model, in OpenAI's list shape (Anthropic's differs only in fields
/// no client of the fleet reads). Counted in `models_listed`.
async fn models(State(state): State<Arc<AppState>>) -> Response {
    state.stats.record_models_listed();
    Json(serde_json::json!({"object": "list", "data": [{"id": api::DEFAULT_MODEL, "object": "model"}]})).into_response()
}

/// `PUT /admin/valid-keys` with a JSON list of keys: the keys accepted from now on (a test
/// knob: a key fixed at the provider while the fleet runs).
async fn set_valid_keys(State(state): State<Arc<AppState>>, Json(keys): Json<Vec<String>>) -> StatusCode {
    *state.valid_keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
    StatusCode::NO_CONTENT
}

/// The pipeline shared by every provider endpoint.
async fn handle(state: &AppState, endpoint: Endpoint, n: u64, body: &[u8]) -> Response {
    let _in_flight = state.stats.enter(endpoint);

    // The limiter comes first, as with a real provider: throttling happens at the edge, before
    // the request is even looked at, and a throttled request costs no latency.
    let admission = state
        .limiter
        .as_ref()
        .map(|bucket| bucket.lock().unwrap_or_else(|e| e.into_inner()).try_acquire(Instant::now()));
    if let Some(Admission::Refused { .. }) = admission {
        let body = api::error_body(endpoint, 429, "mock-provider: rate limit reached (rpm)");
        return answer(state, endpoint, 429, body, admission.as_ref());
    }
    let tokens = state.tokens.as_ref().map(|bucket| {
        let n = api::rate_tokens(endpoint, body);
        let admission = bucket.lock().unwrap_or_else(|e| e.into_inner()).try_acquire_n(Instant::now(), n);
        (n, admission)
    });
    match tokens {
        Some((_, refused @ Admission::Refused { .. })) => {
            state.stats.record_tpm_refused();
            let body = api::error_body(endpoint, 429, "mock-provider: rate limit reached (tpm)");
            let mut response = answer(state, endpoint, 429, body, admission.as_ref());
            refused.write_headers_for(Unit::Tokens, response.headers_mut(), api::is_anthropic(endpoint));
            return response;
        }
        Some((n, _)) => state.stats.record_tokens(n),
        None => {}
    }
    let mut response = admitted(state, endpoint, n, body, admission.as_ref()).await;
    if let Some((_, granted)) = tokens {
        granted.write_headers_for(Unit::Tokens, response.headers_mut(), api::is_anthropic(endpoint));
    }
    response
}

/// The rest of the pipeline, for a request the limiters let through.
async fn admitted(
    state: &AppState,
    endpoint: Endpoint,
    n: u64,
    body: &[u8],
    admission: Option<&Admission>,
) -> Response {
    // Validation is deterministic and immediate: a malformed request is a caller bug, so it
    // neither consumes a fault draw nor waits for the simulated latency.
    let created = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let success = match api::success_body(endpoint, body, n, created) {
        Ok(bytes) if state.answer_model_suffix.is_empty() => bytes,
        Ok(bytes) => with_model_suffix(bytes, &state.answer_model_suffix),
        Err(message) => {
            let body = api::error_body(endpoint, 400, &message);
            return answer(state, endpoint, 400, body, admission);
        }
    };

    // A model the key may not use: refused at once, as the providers' permission check does.
    if let Some(model) = api::requested_model(body).filter(|m| state.forbidden_models.iter().any(|f| f == m)) {
        let message = format!("mock-provider: this key does not have access to model `{model}`");
        return answer(state, endpoint, 403, api::error_body(endpoint, 403, &message), admission);
    }

    // A request that names a hostile model gets that misbehaviour, whatever the knobs say.
    if let Some(hostile) = Hostile::requested_by(body) {
        state.stats.record_status(hostile.status());
        return hostile.answer(n);
    }

    // The flex tier: slower, refused now and then for capacity, and says it was used.
    let flex = api::requested_service_tier(body).is_some_and(|t| t == "flex");
    let success = if flex {
        if let Some(status) = flex_refusal(state) {
            state.stats.record_flex(true);
            return answer(state, endpoint, status, api::flex_unavailable_body(status), admission);
        }
        state.stats.record_flex(false);
        tokio::time::sleep(state.flex_latency).await;
        with_service_tier(success, "flex")
    } else {
        success
    };

    let decision = state.faults.decide();
    if decision.fault == Fault::Hang {
        state.stats.record_hung();
        // Wake up on shutdown so graceful shutdown is not held hostage by hung requests; the
        // answer is not counted, the request already is (as hung).
        tokio::select! {
            () = tokio::time::sleep(HANG_FOR) => {}
            () = state.shutdown.cancelled() => {}
        }
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    if !decision.delay.is_zero() {
        tokio::time::sleep(decision.delay).await;
    }
    match decision.fault {
        Fault::None => {
            let (input, output) = api::reported_usage(&success);
            state.stats.record_usage(input, output);
            answer(state, endpoint, 200, success, admission)
        }
        Fault::Garbage => {
            state.stats.record_garbage();
            let mut response = Response::new(Body::from(GARBAGE_BODY));
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
            add_rate_headers(&mut response, admission, endpoint);
            response
        }
        Fault::Status(status) => {
            let message = format!("mock-provider: injected {status}");
            let body = api::error_body(endpoint, status, &message);
            answer(state, endpoint, status, body, admission)
        }
        Fault::Hang => unreachable!("handled above"),
    }
}

/// Builds a JSON answer with `status`, counts it, and attaches the rate-limit headers if the
/// limiter is on.
fn answer(state: &AppState, endpoint: Endpoint, status: u16, body: Vec<u8>, admission: Option<&Admission>) -> Response {
    state.stats.record_status(status);
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = StatusCode::from_u16(status).expect("valid status code");
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    add_rate_headers(&mut response, admission, endpoint);
    response
}

/// Attaches the limiter's headers (only present when `--rpm` is set).
fn add_rate_headers(response: &mut Response, admission: Option<&Admission>, endpoint: Endpoint) {
    if let Some(admission) = admission {
        admission.write_headers(response.headers_mut(), api::is_anthropic(endpoint));
    }
}

/// Whether this flex request is refused for capacity, and with which status: of every
/// flex request, the `--flex-unavailable` share is, spread evenly (request `i` is refused
/// when the running total of the share crosses a whole number there), alternately 429 and 498.
fn flex_refusal(state: &AppState) -> Option<u16> {
    let i = state.flex_seen.fetch_add(1, Relaxed);
    let share = state.flex_unavailable;
    let refusals_before = (i as f64 * share).floor();
    let refusals_after = ((i + 1) as f64 * share).floor();
    (refusals_after > refusals_before).then_some(if refusals_after as u64 % 2 == 1 { 429 } else { 498 })
}

/// An answer with `service_tier` set, as OpenAI echoes the tier that served a request.
fn with_service_tier(bytes: Vec<u8>, tier: &str) -> Vec<u8> {
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&bytes) else { return bytes };
    let Some(object) = v.as_object_mut() else { return bytes };
    object.insert("service_tier".into(), tier.into());
    serde_json::to_vec(&v).unwrap_or(bytes)
}

/// An answer whose `model` has `suffix` appended (the dated name a provider answers with).
fn with_model_suffix(bytes: Vec<u8>, suffix: &str) -> Vec<u8> {
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&bytes) else { return bytes };
    let Some(model) = v.get("model").and_then(|m| m.as_str()).map(|m| format!("{m}{suffix}")) else { return bytes };
    v["model"] = model.into();
    serde_json::to_vec(&v).unwrap_or(bytes)
}
