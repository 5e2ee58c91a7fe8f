//! Owns Gemini's Batch API (Google's Generative Language API, `v1beta`), inline requests,
//! in the documented shapes:
//!
//! - `POST /v1beta/models/{model}:batchGenerateContent` (routed here by `crate::gemini`,
//!   which owns `/v1beta/models/{call}`) with `{"batch": {"displayName", "inputConfig":
//!   {"requests": {"requests": [{"request": GenerateContentRequest, "metadata": {...}}]}}}}`;
//!   answers the long-running operation `{"name": "batches/{id}", "metadata": <batch>}`;
//! - `GET /v1beta/batches/{id}`: the operation, whose `metadata` is the
//!   `GenerateContentBatch` (`@type`, `name`, `displayName`, `model`, `state`,
//!   `batchStats`, `createTime`, `updateTime`, `endTime`, and once ended
//!   `output.inlinedResponses.inlinedResponses[]`, each `{"response"|"error", "metadata"}`
//!   in the order of the requests), `done` once ended;
//! - `GET /v1beta/batches` (`pageSize` at most 1000, `pageToken`): `{"operations": [...],
//!   "nextPageToken"}`, newest first;
//! - `POST /v1beta/batches/{id}:cancel` (`{}`; an ended batch answers 400
//!   `FAILED_PRECONDITION`), `DELETE /v1beta/batches/{id}` (`{}`).
//!
//! `state` is `BATCH_STATE_PENDING` (validating), `BATCH_STATE_RUNNING`, then
//! `BATCH_STATE_SUCCEEDED`, `_FAILED` (`--batch-reject-rate`: no request ran),
//! `_CANCELLED` or `_EXPIRED` (only the answered requests have a response). Each request is
//! answered when the batch is created as `generateContent` would answer it online
//! ([`crate::gemini::reply`]); an invalid one, or one the `--batch-line-error-rate` knob
//! draws, gets an `error` status instead. `/stats` counts the batches created per
//! `displayName` (`gemini_created`) and the tokens of the responses served
//! (`gemini_input_tokens`, `gemini_cached_tokens`, `gemini_output_tokens`), so a client's
//! usage can be checked against the mock's own count.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use rand::Rng;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::counters::Api;
use super::lifecycle::{rfc3339, Ending, Fate, Lifecycle, Stage};
use super::registry::{Cursor, Ids, Registry};
use super::shared::{self, BatchApi};
use super::{unix_ms_now, ApiError, Batches, Family, Inner, INJECTED_REJECTION};

/// The most requests in one batch the mock takes.
pub(crate) const MAX_REQUESTS: usize = 100_000;
/// The largest create body: Google's documented limit of inline requests (20 MB).
pub(crate) const MAX_BODY_BYTES: usize = 20 * 1_000_000;
/// The longest `displayName` kept (longer ones are refused).
const MAX_DISPLAY_NAME: usize = 512;
/// The most batches in one page of the list.
const MAX_PAGE: usize = 1000;

/// One Gemini batch.
#[derive(Debug)]
pub(crate) struct Batch {
    created_unix_ms: u64,
    life: Lifecycle,
    display_name: String,
    model: String,
    lines: Vec<Planned>,
    bytes: u64,
    /// Whether the answered responses' tokens were counted (once, when first seen ended).
    counted: bool,
    /// The batch failed validation: nothing ran.
    failed: bool,
}

/// One request's planned inline response.
#[derive(Debug)]
struct Planned {
    /// The rendered `InlinedResponse`.
    rendered: String,
    success: bool,
    prompt: u64,
    cached: u64,
    output: u64,
}

impl BatchApi for Batch {
    const FAMILY: Family = Family::Gemini;
    const NAME: &'static str = "batch";

    fn registry(inner: &mut Inner) -> &mut Registry<Self> {
        &mut inner.gemini
    }

    fn ids(inner: &Inner) -> &Ids {
        &inner.ids.gemini_batch
    }

    fn settle(inner: &mut Inner, seq: u64, now: Instant) {
        let Inner { gemini, counters, .. } = inner;
        let Some(batch) = gemini.get_mut(seq) else { return };
        let Stage::Ended(_) = batch.life.stage(now) else { return };
        if batch.counted {
            return;
        }
        batch.counted = true;
        let answered = batch.answered(now);
        let (mut prompt, mut cached, mut output) = (0, 0, 0);
        for l in batch.lines[..answered].iter().filter(|l| l.success) {
            prompt += l.prompt;
            cached += l.cached;
            output += l.output;
        }
        counters.gemini_usage(prompt, cached, output);
    }

    fn life(&mut self) -> &mut Lifecycle {
        &mut self.life
    }

    fn held_bytes(&self) -> u64 {
        self.bytes
    }

    fn object(&self, id: String, now: Instant) -> Value {
        operation(&id, self, now)
    }

    fn cannot_cancel(&mut self, _: Instant) -> String {
        "The batch has already ended and cannot be cancelled".to_owned()
    }
}

impl Batch {
    /// How many of the requests (the first ones) have their response at `now`.
    fn answered(&self, now: Instant) -> usize {
        if self.failed {
            return 0;
        }
        self.life.answered(self.lines.len(), now)
    }

    fn rfc3339_at(&self, at: Instant) -> String {
        rfc3339(self.created_unix_ms + (at - self.life.created()).as_millis() as u64)
    }
}

/// The batch's long-running operation at `now`.
fn operation(id: &str, batch: &Batch, now: Instant) -> Value {
    let stage = batch.life.stage(now);
    let state = match stage {
        Stage::Validating => "BATCH_STATE_PENDING",
        Stage::InProgress | Stage::Finalizing | Stage::Cancelling => "BATCH_STATE_RUNNING",
        Stage::Ended(Ending::Completed) => "BATCH_STATE_SUCCEEDED",
        Stage::Ended(Ending::Failed) => "BATCH_STATE_FAILED",
        Stage::Ended(Ending::Cancelled) => "BATCH_STATE_CANCELLED",
        Stage::Ended(Ending::Expired) => "BATCH_STATE_EXPIRED",
    };
    let ended = matches!(stage, Stage::Ended(_));
    let answered = batch.answered(now);
    let succeeded = batch.lines[..answered].iter().filter(|l| l.success).count();
    let name = format!("batches/{id}");
    let mut meta = json!({
        "@type": "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatch",
        "name": name,
        "displayName": batch.display_name,
        "model": format!("models/{}", batch.model),
        "state": state,
        "createTime": rfc3339(batch.created_unix_ms),
        "updateTime": batch.rfc3339_at(now.min(batch.life.ends_at()).max(batch.life.created())),
        "batchStats": {
            "requestCount": batch.lines.len().to_string(),
            "successfulRequestCount": succeeded.to_string(),
            "failedRequestCount": (answered - succeeded).to_string(),
            "pendingRequestCount": if ended { "0".to_string() } else { (batch.lines.len() - answered).to_string() },
        },
    });
    let mut op = json!({ "name": name, "metadata": meta.clone() });
    if ended {
        meta["endTime"] = json!(batch.rfc3339_at(batch.life.ends_at()));
        // The responses are rendered JSON already: spliced in as raw values.
        let responses: Vec<&RawValue> = batch.lines[..answered]
            .iter()
            .filter_map(|l| serde_json::from_str::<&RawValue>(&l.rendered).ok())
            .collect();
        meta["output"] = json!({ "inlinedResponses": { "inlinedResponses": responses } });
        op = json!({ "name": name, "metadata": meta, "done": true });
        if batch.failed {
            op["error"] = json!({"code": 400, "message": INJECTED_REJECTION, "status": "INVALID_ARGUMENT"});
        }
    }
    op
}

/// The routes under `/v1beta/batches` (the create is in `crate::gemini`'s router).
pub(super) fn routes() -> Router<Arc<Batches>> {
    Router::new()
        .route("/v1beta/batches", get(list))
        .route("/v1beta/batches/{call}", get(retrieve).delete(delete).post(cancel))
}

async fn retrieve(state: State<Arc<Batches>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    shared::retrieve::<Batch>(state, Path(id)).await
}

/// `POST /v1beta/batches/{id}:cancel`.
async fn cancel(state: State<Arc<Batches>>, Path(call): Path<String>) -> Result<Response, ApiError> {
    let Some(id) = call.strip_suffix(":cancel") else {
        return Err(ApiError::new(Family::Gemini, StatusCode::NOT_FOUND, "no such method on a batch"));
    };
    match shared::cancel::<Batch>(state, Path(id.to_string())).await {
        Ok(_) => Ok(Json(json!({})).into_response()),
        Err(e) if e.status == StatusCode::CONFLICT => {
            Err(ApiError::new(Family::Gemini, StatusCode::BAD_REQUEST, e.message))
        }
        Err(e) => Err(e),
    }
}

/// `DELETE /v1beta/batches/{id}`: the batch is forgotten (its bytes are freed).
async fn delete(State(batches): State<Arc<Batches>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let mut inner = batches.lock();
    let seq = shared::seq_of::<Batch>(&mut inner, &id)?;
    if let Some(batch) = inner.gemini.remove(seq) {
        inner.files.release(batch.bytes);
        inner.counters.gemini_deleted();
    }
    Ok(Json(json!({})).into_response())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    page_size: Option<usize>,
    page_token: Option<String>,
}

async fn list(
    State(batches): State<Arc<Batches>>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let invalid = |message: String| ApiError::invalid(Family::Gemini, message);
    let Query(query) = query.map_err(|e| invalid(format!("Invalid query: {e}")))?;
    let limit = query.page_size.unwrap_or(50).clamp(1, MAX_PAGE);
    let mut inner = batches.lock();
    let cursor = match query.page_token.as_deref().filter(|t| !t.is_empty()) {
        Some(token) => Cursor::After(shared::cursor_seq::<Batch>(&inner, "pageToken", token)?),
        None => Cursor::Start,
    };
    let page = shared::page::<Batch>(&mut inner, cursor, limit, Instant::now());
    let mut body = json!({ "operations": page.data });
    if page.has_more {
        body["nextPageToken"] = json!(page.last_id);
    }
    Ok(Json(body).into_response())
}

#[derive(Deserialize)]
struct CreateRequest {
    batch: BatchIn,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BatchIn {
    display_name: String,
    input_config: InputConfig,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InputConfig {
    requests: InlinedRequests,
}

#[derive(Deserialize)]
struct InlinedRequests {
    requests: Vec<InlinedRequest>,
}

#[derive(Deserialize)]
struct InlinedRequest {
    request: Box<RawValue>,
    #[serde(default)]
    metadata: Option<Value>,
}

/// `POST /v1beta/models/{model}:batchGenerateContent`, for `model` (the caller checked the
/// key and counted the call).
pub(crate) fn create(batches: &Batches, model: &str, body: &Bytes) -> Response {
    match create_batch(batches, model, body) {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

fn create_batch(batches: &Batches, model: &str, body: &Bytes) -> Result<Response, ApiError> {
    let invalid = |message: String| ApiError::invalid(Family::Gemini, message);
    if body.len() > MAX_BODY_BYTES {
        return Err(ApiError::new(
            Family::Gemini,
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("Request payload size exceeds the limit: {MAX_BODY_BYTES} bytes."),
        ));
    }
    let request: CreateRequest =
        serde_json::from_slice(body).map_err(|e| invalid(format!("Invalid JSON payload received. {e}")))?;
    let BatchIn { display_name, input_config } = request.batch;
    let requests = input_config.requests.requests;
    if display_name.is_empty() || display_name.chars().count() > MAX_DISPLAY_NAME {
        return Err(invalid(format!("* batch.display_name: must be 1 to {MAX_DISPLAY_NAME} characters")));
    }
    if requests.is_empty() || requests.len() > MAX_REQUESTS {
        return Err(invalid(format!("* batch.input_config.requests: between 1 and {MAX_REQUESTS} requests")));
    }
    if model.is_empty() || !model.bytes().all(|b| b.is_ascii_alphanumeric() || b".-_".contains(&b)) {
        return Err(invalid("* batch.model: not a model name".to_owned()));
    }
    let seq = batches.lock().next_seq();
    let mut rng = batches.rng(seq);
    let knobs = &batches.knobs;
    let (reject, expire) =
        (rng.random::<f64>() < knobs.batch_reject_rate, rng.random::<f64>() < knobs.batch_expire_rate);

    // Answer every request, outside the lock.
    let created = Instant::now();
    let first = batches.line_numbers(requests.len());
    let mut keys = Vec::with_capacity(requests.len());
    let lines: Vec<Planned> = requests
        .into_iter()
        .zip(first..)
        .map(|(r, n)| {
            let injected = rng.random::<f64>() < knobs.batch_line_error_rate;
            let key = r.metadata.as_ref().and_then(|m| m.get("key")).and_then(Value::as_str).map(str::to_owned);
            keys.push(key.clone().unwrap_or_else(|| format!("#{n}")));
            let metadata = r.metadata.unwrap_or(Value::Null);
            let reply = crate::gemini::reply(crate::gemini::Method::GenerateContent, model, r.request.get().as_bytes(), n);
            let (rendered, success, prompt, cached, output) = match reply {
                Ok(_) if injected => (
                    json!({"error": {"code": 500, "message": "mock-provider: injected batch line error", "status": "INTERNAL"}, "metadata": metadata}),
                    false, 0, 0, 0,
                ),
                Ok(reply) => {
                    let response: Value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
                    (json!({"response": response, "metadata": metadata}), true, reply.prompt_tokens, reply.cached_tokens, reply.output_tokens)
                }
                Err(message) => (
                    json!({"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}, "metadata": metadata}),
                    false, 0, 0, 0,
                ),
            };
            Planned { rendered: rendered.to_string(), success, prompt, cached, output }
        })
        .collect();
    let bytes = lines.iter().map(|l| l.rendered.len() as u64).sum::<u64>() + display_name.len() as u64;
    let fate = if reject {
        Fate::Reject
    } else if expire {
        Fate::Expire
    } else {
        Fate::Complete
    };

    let mut inner = batches.lock();
    shared::admit::<Batch>(&mut inner, bytes, created)?;
    inner.counters.created(Api::Gemini, display_name.clone(), !reject, keys.iter().map(String::as_str));
    let batch = Batch {
        created_unix_ms: unix_ms_now(),
        life: Lifecycle::new(created, batches.complete_in(), fate, knobs.batch_partial),
        display_name,
        model: model.to_owned(),
        lines,
        bytes,
        counted: false,
        failed: reject,
    };
    inner.gemini.insert(seq, batch);
    Ok(shared::answer::<Batch>(&mut inner, seq, Instant::now()))
}

/// The display names of the batches kept, by id (for tests).
#[cfg(test)]
fn names(inner: &mut Inner) -> std::collections::BTreeMap<String, String> {
    let ids = inner.ids.gemini_batch.clone();
    let (seqs, _) = inner.gemini.page(Cursor::Start, usize::MAX);
    seqs.into_iter().filter_map(|s| Some((ids.id(s), inner.gemini.get_mut(s)?.display_name.clone()))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batches::BatchKnobs;

    fn body(name: &str, n: usize) -> Bytes {
        let requests: Vec<Value> = (0..n)
            .map(|i| {
                json!({"request": {"contents": [{"role": "user", "parts": [{"text": format!("hi {i}")}]}]},
                            "metadata": {"key": format!("k{i}")}})
            })
            .collect();
        Bytes::from(
            json!({"batch": {"displayName": name, "inputConfig": {"requests": {"requests": requests}}}}).to_string(),
        )
    }

    #[tokio::test]
    async fn a_batch_is_created_runs_and_ends_with_its_responses_in_order() {
        let knobs = BatchKnobs { batch_complete_ms: 0, ..BatchKnobs::default() };
        let batches = Batches::new(&knobs, 1);
        let r = create(&batches, "gemini-2.0-flash", &body("ns/j/0", 3));
        assert_eq!(r.status(), StatusCode::OK);
        let op: Value = serde_json::from_slice(&axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap()).unwrap();
        let name = op["name"].as_str().unwrap();
        assert!(name.starts_with("batches/"), "{op}");
        let mut inner = batches.lock();
        assert_eq!(names(&mut inner).values().cloned().collect::<Vec<_>>(), vec!["ns/j/0".to_owned()]);
        let seq = shared::seq_of::<Batch>(&mut inner, name.trim_start_matches("batches/")).unwrap();
        let op =
            shared::object_of::<Batch>(&mut inner, seq, Instant::now() + std::time::Duration::from_secs(5)).unwrap();
        assert_eq!(op["done"], true, "{op}");
        assert_eq!(op["metadata"]["state"], "BATCH_STATE_SUCCEEDED");
        let responses = op["metadata"]["output"]["inlinedResponses"]["inlinedResponses"].as_array().unwrap();
        let keys: Vec<&str> = responses.iter().map(|r| r["metadata"]["key"].as_str().unwrap()).collect();
        assert_eq!(keys, ["k0", "k1", "k2"]);
        assert!(responses[0]["response"]["usageMetadata"]["promptTokenCount"].as_u64().unwrap() > 0);
        let stats = inner.counters.snapshot(0, 0);
        assert_eq!(stats.gemini_created, std::collections::BTreeMap::from([("ns/j/0".to_owned(), 1)]));
        assert!(stats.gemini_input_tokens > 0 && stats.gemini_output_tokens > 0, "{stats:?}");
    }

    #[test]
    fn bad_creates_are_refused_in_googles_shape() {
        let batches = Batches::new(&BatchKnobs::default(), 1);
        assert_eq!(create(&batches, "m", &Bytes::from_static(b"{}")).status(), StatusCode::BAD_REQUEST);
        assert_eq!(create(&batches, "m", &body("", 1)).status(), StatusCode::BAD_REQUEST);
        assert_eq!(create(&batches, "m", &body("x", 0)).status(), StatusCode::BAD_REQUEST);
        assert_eq!(create(&batches, "a/b", &body("x", 1)).status(), StatusCode::BAD_REQUEST);
    }
}
