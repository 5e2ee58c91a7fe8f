//! Owns Anthropic's Message Batches API: `POST /v1/messages/batches` with
//! `requests[{custom_id, params}]`, `GET /v1/messages/batches/{id}`, `GET
//! /v1/messages/batches` (newest first, `before_id` / `after_id` / `limit`),
//! `GET /v1/messages/batches/{id}/results` (JSONL, once ended; the batch object's
//! `results_url` points there) and `POST /v1/messages/batches/{id}/cancel`, with the
//! documented `processing_status` (`in_progress`, `canceling`, `ended`), `request_counts`
//! and result types (`succeeded`, `errored`, `canceled`, `expired`).
//!
//! The requests themselves are checked when the batch is created (a bad custom_id or params
//! that are not an object: 400 naming `requests.N`); each `params` is then answered as
//! `POST /v1/messages` would answer it, and an invalid one becomes an `errored` result, as
//! Anthropic validates params asynchronously.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use super::counters::{anthropic_tag, Api};
use super::lifecycle::{rfc3339, Ending, Fate, Lifecycle, Stage};
use super::lines::{self, NotRun};
use super::registry::{Cursor, Ids, Registry};
use super::shared::{self, BatchApi};
use super::{unix_ms_now, ApiError, Batches, Family, Inner, COMPLETION_WINDOW, INJECTED_REJECTION};
use crate::api::Endpoint;

/// The most requests in one batch (Anthropic's documented limit).
pub(crate) const MAX_REQUESTS: usize = 100_000;
/// The largest create body (Anthropic's documented limit, 256 MB).
pub(crate) const MAX_BODY_BYTES: usize = 256_000_000;
/// The longest custom_id, as documented (`^[a-zA-Z0-9_-]{1,64}$`).
const MAX_CUSTOM_ID_CHARS: usize = 64;
/// The longest `Host` header trusted to build `results_url`.
const MAX_HOST_BYTES: usize = 255;

/// One Anthropic message batch.
#[derive(Debug)]
pub(crate) struct Batch {
    created_unix_ms: u64,
    life: Lifecycle,
    /// Where the results are served, from the `Host` the batch was created through.
    results_url: String,
    held: Held,
}

/// What a batch holds: its answers until it ends, then its results.
#[derive(Debug)]
enum Held {
    Answers { lines: Vec<Planned>, bytes: u64 },
    Results { results: Bytes, counts: RequestCounts },
}

#[derive(Debug)]
struct Planned {
    custom_id: String,
    success: bool,
    rendered: String,
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
struct RequestCounts {
    processing: usize,
    succeeded: usize,
    errored: usize,
    canceled: usize,
    expired: usize,
}

impl BatchApi for Batch {
    const FAMILY: Family = Family::Anthropic;
    const NAME: &'static str = "message batch";

    fn registry(inner: &mut Inner) -> &mut Registry<Self> {
        &mut inner.anthropic
    }

    fn ids(inner: &Inner) -> &Ids {
        &inner.ids.message_batch
    }

    fn settle(inner: &mut Inner, seq: u64, now: Instant) {
        settle(inner, seq, now);
    }

    fn life(&mut self) -> &mut Lifecycle {
        &mut self.life
    }

    /// The answers, then the results.
    fn held_bytes(&self) -> u64 {
        match &self.held {
            Held::Answers { bytes, .. } => *bytes,
            Held::Results { results, .. } => results.len() as u64,
        }
    }

    fn object(&self, id: String, now: Instant) -> Value {
        serde_json::to_value(object(id, self, now)).expect("batch objects serialise")
    }

    fn cannot_cancel(&mut self, _: Instant) -> String {
        "Message Batch has already ended and cannot be canceled".to_owned()
    }
}

impl Batch {
    fn rfc3339_at(&self, at: Instant) -> String {
        rfc3339(self.created_unix_ms + (at - self.life.created()).as_millis() as u64)
    }

    /// The request counts at `now` (all ended: every request is in one of the four results).
    fn counts(&self, now: Instant) -> RequestCounts {
        let Held::Answers { lines, .. } = &self.held else {
            let Held::Results { counts, .. } = &self.held else { unreachable!() };
            return *counts;
        };
        let answered = self.life.answered(lines.len(), now);
        let succeeded = lines[..answered].iter().filter(|l| l.success).count();
        let mut counts = RequestCounts { succeeded, errored: answered - succeeded, ..RequestCounts::default() };
        let rest = lines.len() - answered;
        match self.life.stage(now) {
            Stage::Ended(Ending::Expired) => counts.expired = rest,
            Stage::Ended(Ending::Cancelled) => counts.canceled = rest,
            _ => counts.processing = rest,
        }
        counts
    }
}

/// Assembles the results of batch `seq` if it has ended and they are not assembled yet.
fn settle(inner: &mut Inner, seq: u64, now: Instant) {
    let Inner { anthropic, files, .. } = inner;
    let Some(batch) = anthropic.get_mut(seq) else { return };
    let Stage::Ended(ending) = batch.life.stage(now) else { return };
    let Held::Answers { lines, bytes } = &batch.held else { return };
    let counts = batch.counts(now);
    let answered = batch.life.answered(lines.len(), now);
    let why = NotRun::after(ending);
    let mut results = String::new();
    for (i, line) in lines.iter().enumerate() {
        if i < answered {
            results.push_str(&line.rendered);
        } else {
            results.push_str(&lines::anthropic_not_run(&line.custom_id, why));
        }
    }
    // The answers' charge becomes the results' charge; never refused (it was charged at
    // create), so the budget may be exceeded by the `canceled` / `expired` lines' few bytes.
    files.release(*bytes);
    let results = Bytes::from(results);
    files.add_held(results.len() as u64);
    batch.held = Held::Results { results, counts };
}

/// The batch object.
#[derive(Serialize)]
struct BatchObject {
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    processing_status: &'static str,
    request_counts: RequestCounts,
    ended_at: Option<String>,
    created_at: String,
    expires_at: String,
    archived_at: Option<String>,
    cancel_initiated_at: Option<String>,
    results_url: Option<String>,
}

fn object(id: String, batch: &Batch, now: Instant) -> BatchObject {
    let stage = batch.life.stage(now);
    let ended = matches!(stage, Stage::Ended(_));
    BatchObject {
        id,
        kind: "message_batch",
        processing_status: match stage {
            Stage::Ended(_) => "ended",
            Stage::Cancelling => "canceling",
            Stage::Validating | Stage::InProgress | Stage::Finalizing => "in_progress",
        },
        request_counts: batch.counts(now),
        ended_at: ended.then(|| batch.rfc3339_at(batch.life.ends_at())),
        created_at: rfc3339(batch.created_unix_ms),
        expires_at: rfc3339(batch.created_unix_ms + COMPLETION_WINDOW.as_millis() as u64),
        archived_at: None,
        cancel_initiated_at: batch.life.cancelled_at().map(|t| batch.rfc3339_at(t)),
        results_url: ended.then(|| batch.results_url.clone()),
    }
}

pub(super) fn routes() -> Router<Arc<Batches>> {
    Router::new()
        .route("/v1/messages/batches", post(create).get(list))
        .route("/v1/messages/batches/{id}", get(shared::retrieve::<Batch>))
        .route("/v1/messages/batches/{id}/results", get(results))
        .route("/v1/messages/batches/{id}/cancel", post(shared::cancel::<Batch>))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}

#[derive(Deserialize)]
struct CreateRequest {
    requests: Vec<Request>,
}

#[derive(Deserialize)]
struct Request {
    custom_id: String,
    params: Box<RawValue>,
}

/// Checks the requests as Anthropic does when a batch is created; the error names the
/// offending request by its index (`requests.3.custom_id: ...`).
fn check(requests: &[Request]) -> Result<(), String> {
    if requests.is_empty() || requests.len() > MAX_REQUESTS {
        return Err(format!("requests: a batch holds between 1 and {MAX_REQUESTS} requests"));
    }
    let mut seen = HashSet::new();
    for (i, request) in requests.iter().enumerate() {
        let id = &request.custom_id;
        let well_formed = (1..=MAX_CUSTOM_ID_CHARS).contains(&id.len())
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !well_formed {
            return Err(format!("requests.{i}.custom_id: must match ^[a-zA-Z0-9_-]{{1,{MAX_CUSTOM_ID_CHARS}}}$"));
        }
        if !seen.insert(id.as_str()) {
            return Err(format!(
                "requests.{i}.custom_id: '{id}' is used by an earlier request; custom_ids must be unique"
            ));
        }
        if !request.params.get().starts_with('{') {
            return Err(format!("requests.{i}.params: must be an object"));
        }
    }
    Ok(())
}

/// The base URL the client reached us through, from its `Host` header if that is a plain
/// `host[:port]` (anything else is not trusted into a URL).
fn base_url(headers: &HeaderMap) -> String {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).filter(|h| {
        !h.is_empty()
            && h.len() <= MAX_HOST_BYTES
            && h.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
    });
    format!("http://{}", host.unwrap_or("localhost"))
}

async fn create(State(batches): State<Arc<Batches>>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let invalid = |message: String| ApiError::invalid(Family::Anthropic, message);
    let request: CreateRequest =
        serde_json::from_slice(&body).map_err(|e| invalid(format!("Invalid request body: {e}")))?;
    drop(body);
    let seq = batches.lock().next_seq();
    let mut rng = batches.rng(seq);
    let knobs = &batches.knobs;
    let (reject, expire) =
        (rng.random::<f64>() < knobs.batch_reject_rate, rng.random::<f64>() < knobs.batch_expire_rate);
    let last = request.requests.len().saturating_sub(1);
    let checked = check(&request.requests).and_then(|()| {
        if reject {
            Err(format!("requests.{last}.params: {}", INJECTED_REJECTION))
        } else {
            Ok(())
        }
    });
    if let Err(message) = checked {
        batches.lock().counters.refused();
        return Err(invalid(message));
    }

    // Answer every request, outside the lock.
    let created = Instant::now();
    let created_unix_ms = unix_ms_now();
    let first = batches.line_numbers(request.requests.len());
    let lines: Vec<Planned> = request
        .requests
        .into_iter()
        .zip(first..)
        .map(|(r, n)| {
            let answer = lines::answer(
                Endpoint::Messages,
                r.params.get().as_bytes(),
                n,
                created_unix_ms / 1000,
                knobs.batch_line_error_rate,
                &mut rng,
            );
            Planned {
                success: answer.is_success(),
                rendered: lines::anthropic_line(&r.custom_id, &answer),
                custom_id: r.custom_id,
            }
        })
        .collect();
    let bytes = lines.iter().map(|l| (l.rendered.len() + l.custom_id.len()) as u64).sum();
    let fate = if expire { Fate::Expire } else { Fate::Complete };

    let mut inner = batches.lock();
    shared::admit::<Batch>(&mut inner, bytes, created)?;
    let tag = anthropic_tag(&lines[0].custom_id);
    inner.counters.created(Api::Anthropic, tag, true, lines.iter().map(|l| l.custom_id.as_str()));
    let id = inner.ids.message_batch.id(seq);
    let batch = Batch {
        created_unix_ms,
        life: Lifecycle::new(created, batches.complete_in(), fate, knobs.batch_partial),
        results_url: format!("{}/v1/messages/batches/{id}/results", base_url(&headers)),
        held: Held::Answers { lines, bytes },
    };
    inner.anthropic.insert(seq, batch);
    Ok(shared::answer::<Batch>(&mut inner, seq, Instant::now()))
}

async fn results(State(batches): State<Arc<Batches>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let mut inner = batches.lock();
    let seq = shared::seq_of::<Batch>(&mut inner, &id)?;
    settle(&mut inner, seq, Instant::now());
    let batch = inner.anthropic.get_mut(seq).expect("found above");
    match &batch.held {
        Held::Results { results, .. } => {
            Ok(([(header::CONTENT_TYPE, "application/x-jsonl")], results.clone()).into_response())
        }
        Held::Answers { .. } => Err(ApiError::invalid(
            Family::Anthropic,
            "Message Batch has not ended yet: its results are available once processing_status is 'ended'",
        )),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    before_id: Option<String>,
    after_id: Option<String>,
    limit: Option<usize>,
}

async fn list(
    State(batches): State<Arc<Batches>>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let invalid = |message: String| ApiError::invalid(Family::Anthropic, message);
    let Query(query) = query.map_err(|e| invalid(format!("Invalid query: {e}")))?;
    let limit = shared::limit(Family::Anthropic, query.limit, 1000)?;
    let mut inner = batches.lock();
    let cursor = match (&query.before_id, &query.after_id) {
        (Some(_), Some(_)) => return Err(invalid("before_id and after_id cannot both be given".to_owned())),
        (Some(before), None) => Cursor::Before(shared::cursor_seq::<Batch>(&inner, "before_id", before)?),
        (None, Some(after)) => Cursor::After(shared::cursor_seq::<Batch>(&inner, "after_id", after)?),
        (None, None) => Cursor::Start,
    };
    let page = shared::page::<Batch>(&mut inner, cursor, limit, Instant::now());
    Ok(Json(serde_json::json!({
        "data": page.data, "has_more": page.has_more, "first_id": page.first_id, "last_id": page.last_id,
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn requests(value: serde_json::Value) -> Vec<Request> {
        serde_json::from_value::<CreateRequest>(json!({ "requests": value })).unwrap().requests
    }

    #[test]
    fn requests_are_checked_and_the_bad_one_is_named() {
        let p = json!({"max_tokens": 1, "messages": []});
        assert_eq!(check(&requests(json!([{"custom_id": "a-1_B", "params": p}]))), Ok(()));
        let cases = [
            (json!([]), "requests: a batch holds"),
            (json!([{"custom_id": "a", "params": p}, {"custom_id": "a b", "params": p}]), "requests.1.custom_id"),
            (json!([{"custom_id": "x".repeat(65), "params": p}]), "requests.0.custom_id"),
            (json!([{"custom_id": "", "params": p}]), "requests.0.custom_id"),
            (
                json!([{"custom_id": "a", "params": p}, {"custom_id": "a", "params": p}]),
                "requests.1.custom_id: 'a' is used",
            ),
            (json!([{"custom_id": "a", "params": p}, {"custom_id": "b", "params": [1]}]), "requests.1.params"),
        ];
        for (value, expected) in cases {
            let err = check(&requests(value.clone())).unwrap_err();
            assert!(err.starts_with(expected), "{value}: {err}");
        }
    }

    #[test]
    fn results_url_trusts_only_a_plain_host() {
        let with_host = |h: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::HOST, h.parse().unwrap());
            base_url(&headers)
        };
        assert_eq!(with_host("127.0.0.1:8080"), "http://127.0.0.1:8080");
        assert_eq!(with_host("mock:8080"), "http://mock:8080");
        assert_eq!(with_host("evil.example/steal?x="), "http://localhost");
        assert_eq!(base_url(&HeaderMap::new()), "http://localhost");
    }
}
