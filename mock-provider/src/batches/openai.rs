//! Owns OpenAI's Batch API: `POST /v1/batches` (create from an uploaded input file),
//! `GET /v1/batches/{id}`, `GET /v1/batches` (newest first, `after` / `limit`) and
//! `POST /v1/batches/{id}/cancel`, with the batch object's documented fields (`status`,
//! `request_counts`, `output_file_id`, `error_file_id`, `errors` with line numbers, the
//! `*_at` timestamps, `metadata`).
//!
//! The input file is validated and every line answered when the batch is created; the
//! answers are held until the batch is seen to have ended, then written as the output file
//! (successes) and the error file (failed requests, and `batch_cancelled` / `batch_expired`
//! lines for those never run).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use super::counters::{metadata_tag, Api};
use super::files::{Purpose, StoredFile};
use super::lifecycle::{Ending, Fate, Lifecycle, Stage};
use super::lines::{self, NotRun};
use super::registry::{Cursor, Ids, Registry};
use super::shared::{self, BatchApi};
use super::{unix_ms_now, ApiError, Batches, Family, Inner, COMPLETION_WINDOW, INJECTED_REJECTION};
use crate::api::Endpoint;
use fleet::config::ProviderKind;

/// The most requests in one input file (OpenAI's documented limit).
const MAX_LINES: usize = 50_000;
/// The most validation errors listed in a failed batch's `errors` (the rest are not listed).
const MAX_LISTED_ERRORS: usize = 1000;
/// The longest custom_id accepted: the fleet's own bound on ids it carries.
const MAX_CUSTOM_ID_BYTES: usize = 512;
/// Metadata bounds, as documented: 16 pairs, keys of 64 characters, values of 512.
const MAX_METADATA_PAIRS: usize = 16;
const MAX_METADATA_KEY_CHARS: usize = 64;
const MAX_METADATA_VALUE_CHARS: usize = 512;

/// One OpenAI batch.
#[derive(Debug)]
pub(crate) struct Batch {
    endpoint: Endpoint,
    input_file_id: String,
    metadata: Option<BTreeMap<String, String>>,
    created_unix_ms: u64,
    life: Lifecycle,
    /// Why validation failed (empty unless the batch's fate is [`Fate::Reject`]).
    errors: Vec<BatchError>,
    held: Held,
    /// Tokens the batch holds in the enqueued-token queue while it is in progress.
    tokens: u64,
}

/// What a batch holds: its answers until it ends, then the files they were written to.
#[derive(Debug)]
enum Held {
    Answers { lines: Vec<Planned>, bytes: u64 },
    Written { output_file_id: Option<String>, error_file_id: Option<String>, counts: RequestCounts },
}

/// One answered line, ready to be written.
#[derive(Debug)]
struct Planned {
    custom_id: String,
    n: u64,
    success: bool,
    rendered: String,
}

/// A validation error of the input file, as listed in `errors.data`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
struct BatchError {
    code: &'static str,
    message: String,
    param: Option<&'static str>,
    line: Option<usize>,
}

impl BatchError {
    fn at(line: usize, code: &'static str, param: Option<&'static str>, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), param, line: Some(line) }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
struct RequestCounts {
    total: usize,
    completed: usize,
    failed: usize,
}

impl BatchApi for Batch {
    const FAMILY: Family = Family::OpenAi;
    const NAME: &'static str = "batch";

    fn registry(inner: &mut Inner) -> &mut Registry<Self> {
        &mut inner.openai
    }

    fn ids(inner: &Inner) -> &Ids {
        &inner.ids.batch
    }

    fn settle(inner: &mut Inner, seq: u64, now: Instant) {
        settle(inner, seq, now);
    }

    fn life(&mut self) -> &mut Lifecycle {
        &mut self.life
    }

    /// The answers still held (the written files are accounted as files).
    fn held_bytes(&self) -> u64 {
        match &self.held {
            Held::Answers { bytes, .. } => *bytes,
            Held::Written { .. } => 0,
        }
    }

    fn object(&self, id: String, now: Instant) -> Value {
        serde_json::to_value(object(id, self, now)).expect("batch objects serialise")
    }

    fn cannot_cancel(&mut self, now: Instant) -> String {
        format!("Cannot cancel a batch with status '{}'", status(self.life.stage(now)))
    }
}

impl Batch {
    fn unix_s(&self, at: Instant) -> u64 {
        (self.created_unix_ms + (at - self.life.created()).as_millis() as u64) / 1000
    }

    fn counts(&self, now: Instant) -> RequestCounts {
        match &self.held {
            Held::Written { counts, .. } => *counts,
            Held::Answers { lines, .. } => {
                let answered = self.life.answered(lines.len(), now);
                let completed = lines[..answered].iter().filter(|l| l.success).count();
                RequestCounts { total: lines.len(), completed, failed: answered - completed }
            }
        }
    }
}

/// Writes the output and error files of batch `seq` if it has ended and they are not
/// written yet.
fn settle(inner: &mut Inner, seq: u64, now: Instant) {
    let Inner { openai, files, ids, next_seq, .. } = inner;
    let Some(batch) = openai.get_mut(seq) else { return };
    let Stage::Ended(ending) = batch.life.stage(now) else { return };
    let Held::Answers { lines, bytes } = &batch.held else { return };
    let answered = batch.life.answered(lines.len(), now);
    let why = NotRun::after(ending);
    let (mut output, mut errors) = (String::new(), String::new());
    for (i, line) in lines.iter().enumerate() {
        match (i < answered, line.success) {
            (true, true) => output.push_str(&line.rendered),
            (true, false) => errors.push_str(&line.rendered),
            (false, _) => errors.push_str(&lines::openai_not_run(&line.custom_id, line.n, why)),
        }
    }
    let completed = lines[..answered].iter().filter(|l| l.success).count();
    let counts = RequestCounts { total: lines.len(), completed, failed: lines.len() - completed };
    files.release(*bytes);
    let batch_id = ids.batch.id(seq);
    let created_at = unix_ms_now() / 1000;
    let mut write = |suffix: &str, content: String| {
        (!content.is_empty()).then(|| {
            let file_seq = *next_seq;
            *next_seq += 1;
            let filename = format!("{batch_id}_{suffix}.jsonl");
            files.add_output(
                file_seq,
                StoredFile { filename, purpose: Purpose::BatchOutput, created_at, content: content.into() },
            );
            ids.file.id(file_seq)
        })
    };
    let output_file_id = write("output", output);
    let error_file_id = write("error", errors);
    batch.held = Held::Written { output_file_id, error_file_id, counts };
}

/// The batch object.
#[derive(Serialize)]
struct BatchObject<'a> {
    id: String,
    object: &'static str,
    endpoint: &'static str,
    errors: Option<ErrorList<'a>>,
    input_file_id: &'a str,
    completion_window: &'static str,
    status: &'static str,
    output_file_id: Option<&'a str>,
    error_file_id: Option<&'a str>,
    created_at: u64,
    in_progress_at: Option<u64>,
    expires_at: u64,
    finalizing_at: Option<u64>,
    completed_at: Option<u64>,
    failed_at: Option<u64>,
    expired_at: Option<u64>,
    cancelling_at: Option<u64>,
    cancelled_at: Option<u64>,
    request_counts: RequestCounts,
    metadata: Option<&'a BTreeMap<String, String>>,
}

#[derive(Serialize)]
struct ErrorList<'a> {
    object: &'static str,
    data: &'a [BatchError],
}

fn status(stage: Stage) -> &'static str {
    match stage {
        Stage::Validating => "validating",
        Stage::InProgress => "in_progress",
        Stage::Finalizing => "finalizing",
        Stage::Cancelling => "cancelling",
        Stage::Ended(Ending::Completed) => "completed",
        Stage::Ended(Ending::Failed) => "failed",
        Stage::Ended(Ending::Expired) => "expired",
        Stage::Ended(Ending::Cancelled) => "cancelled",
    }
}

fn object<'a>(id: String, batch: &'a Batch, now: Instant) -> BatchObject<'a> {
    let stage = batch.life.stage(now);
    let ended_as = |ending| (stage == Stage::Ended(ending)).then(|| batch.unix_s(batch.life.ends_at()));
    let (output_file_id, error_file_id) = match &batch.held {
        Held::Written { output_file_id, error_file_id, .. } => (output_file_id.as_deref(), error_file_id.as_deref()),
        Held::Answers { .. } => (None, None),
    };
    let created_at = batch.created_unix_ms / 1000;
    BatchObject {
        id,
        object: "batch",
        endpoint: batch.endpoint.path(),
        errors: (stage == Stage::Ended(Ending::Failed)).then_some(ErrorList { object: "list", data: &batch.errors }),
        input_file_id: &batch.input_file_id,
        completion_window: "24h",
        status: status(stage),
        output_file_id,
        error_file_id,
        created_at,
        in_progress_at: batch.life.in_progress_since(now).map(|t| batch.unix_s(t)),
        expires_at: created_at + COMPLETION_WINDOW.as_secs(),
        finalizing_at: batch.life.finalizing_since(now).map(|t| batch.unix_s(t)),
        completed_at: ended_as(Ending::Completed),
        failed_at: ended_as(Ending::Failed),
        expired_at: ended_as(Ending::Expired),
        cancelling_at: batch.life.cancelled_at().map(|t| batch.unix_s(t)),
        cancelled_at: ended_as(Ending::Cancelled),
        request_counts: batch.counts(now),
        metadata: batch.metadata.as_ref(),
    }
}

pub(super) fn routes() -> Router<Arc<Batches>> {
    Router::new()
        .route("/v1/batches", post(create).get(list))
        .route("/v1/batches/{id}", get(shared::retrieve::<Batch>))
        .route("/v1/batches/{id}/cancel", post(shared::cancel::<Batch>))
}

#[derive(Deserialize)]
struct CreateRequest {
    input_file_id: String,
    endpoint: String,
    completion_window: String,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
}

impl CreateRequest {
    /// Checks the request's own fields (the input file is checked later) and returns the
    /// batch's endpoint.
    fn check(&self) -> Result<Endpoint, ApiError> {
        let invalid = |message: String| ApiError::invalid(Family::OpenAi, message);
        if self.completion_window != "24h" {
            return Err(invalid("completion_window: only '24h' is supported".to_owned()));
        }
        let endpoint = Endpoint::for_kind(&self.endpoint, ProviderKind::Openai).filter(|e| e.may_run_in_batch());
        let endpoint = endpoint.ok_or_else(|| {
            let supported = Endpoint::ALL
                .into_iter()
                .filter(|e| e.is_served_by(ProviderKind::Openai) && e.may_run_in_batch())
                .map(Endpoint::path)
                .collect::<Vec<_>>()
                .join(", ");
            invalid(format!("endpoint: not a supported batch endpoint (supported: {supported})"))
        })?;
        if let Some(metadata) = &self.metadata {
            let too_long = metadata.iter().any(|(k, v)| {
                k.chars().count() > MAX_METADATA_KEY_CHARS || v.chars().count() > MAX_METADATA_VALUE_CHARS
            });
            if metadata.len() > MAX_METADATA_PAIRS || too_long {
                return Err(invalid(format!(
                    "metadata: at most {MAX_METADATA_PAIRS} pairs, keys of at most {MAX_METADATA_KEY_CHARS} characters, \
                     values of at most {MAX_METADATA_VALUE_CHARS}"
                )));
            }
        }
        Ok(endpoint)
    }
}

async fn create(State(batches): State<Arc<Batches>>, body: Bytes) -> Result<Response, ApiError> {
    let request: CreateRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(Family::OpenAi, format!("Invalid request body: {e}")))?;
    let endpoint = request.check()?;
    let (seq, content) = {
        let mut inner = batches.lock();
        let not_found = || ApiError::not_found(Family::OpenAi, "File", &request.input_file_id);
        let file = inner.ids.file.seq(&request.input_file_id).and_then(|s| inner.files.get(s)).ok_or_else(not_found)?;
        if file.purpose != Purpose::Batch {
            return Err(ApiError::invalid(
                Family::OpenAi,
                "input_file_id: the file was not uploaded with purpose 'batch'",
            ));
        }
        let content = file.content.clone();
        (inner.next_seq(), content)
    };

    // The heavy part, outside the lock: validate and answer every line.
    let created = Instant::now();
    let created_unix_ms = unix_ms_now();
    let mut rng = batches.rng(seq);
    let knobs = &batches.knobs;
    let (reject, expire) =
        (rng.random::<f64>() < knobs.batch_reject_rate, rng.random::<f64>() < knobs.batch_expire_rate);
    let plan = plan(&batches, endpoint, &content, created_unix_ms / 1000, reject, &mut rng);
    let fate = match () {
        _ if !plan.errors.is_empty() => Fate::Reject,
        _ if expire => Fate::Expire,
        _ => Fate::Complete,
    };

    let mut inner = batches.lock();
    let tag = request.metadata.as_ref().map(metadata_tag).unwrap_or_default();
    let (queued, running) = enqueued(&mut inner, created);
    let limit = knobs.batch_enqueued_tokens;
    let mut plan = plan;
    let mut fate = fate;
    if limit > 0 && fate != Fate::Reject && queued.saturating_add(plan.tokens) > limit {
        // Accepted, then failed after validation: nothing of it runs, as OpenAI does it.
        let model = plan.model.as_deref().unwrap_or("the model");
        plan = Plan {
            lines: Vec::new(),
            errors: vec![BatchError {
                code: "token_limit_exceeded",
                message: format!(
                    "Enqueued token limit reached for {model} in organization org-mock. Limit: {limit} enqueued \
                     tokens. Please try again once some in_progress batches have been completed."
                ),
                param: None,
                line: None,
            }],
            bytes: 0,
            tokens: 0,
            model: None,
        };
        fate = Fate::Reject;
        shared::admit::<Batch>(&mut inner, 0, created)?;
        inner.counters.token_limited(tag);
    } else {
        shared::admit::<Batch>(&mut inner, plan.bytes, created)?;
        let ids = plan.lines.iter().map(|l| l.custom_id.as_str());
        inner.counters.created(Api::OpenAi, tag, fate != Fate::Reject, ids);
        if fate != Fate::Reject {
            inner.counters.in_progress(running + 1);
        }
    }
    let batch = Batch {
        endpoint,
        input_file_id: request.input_file_id,
        metadata: request.metadata,
        created_unix_ms,
        life: Lifecycle::new(created, batches.complete_in(), fate, knobs.batch_partial),
        errors: plan.errors,
        held: Held::Answers { lines: plan.lines, bytes: plan.bytes },
        tokens: plan.tokens,
    };
    inner.openai.insert(seq, batch);
    Ok(shared::answer::<Batch>(&mut inner, seq, Instant::now()))
}

/// The tokens of the OpenAI batches in progress at `now` (created, not ended, not failed),
/// and how many they are.
fn enqueued(inner: &mut Inner, now: Instant) -> (u64, u64) {
    let mut tokens = 0u64;
    let mut running = 0;
    for batch in inner.openai.values_mut() {
        let stage = batch.life.stage(now);
        if !matches!(stage, Stage::Ended(_)) && batch.errors.is_empty() {
            tokens = tokens.saturating_add(batch.tokens);
            running += 1;
        }
    }
    (tokens, running)
}

/// The validated and answered input file of a new batch.
#[derive(Debug)]
struct Plan {
    lines: Vec<Planned>,
    errors: Vec<BatchError>,
    bytes: u64,
    /// What the requests hold in the enqueued-token queue.
    tokens: u64,
    /// The first request's `model`, for messages.
    model: Option<String>,
}

/// One line of an input file, as OpenAI documents it. Every field is optional here so that a
/// missing one gets its own error.
#[derive(Deserialize)]
struct InputLine {
    custom_id: Option<String>,
    method: Option<String>,
    url: Option<String>,
    body: Option<Box<RawValue>>,
}

/// Validates `content` for a batch on `endpoint`, then (if valid and not `reject`ed by the
/// knob) answers every line.
fn plan(batches: &Batches, endpoint: Endpoint, content: &[u8], created: u64, reject: bool, rng: &mut StdRng) -> Plan {
    let (requests, mut errors) = validate(endpoint, content);
    if errors.is_empty() && reject {
        let last = requests.last().map(|r| r.line);
        errors.push(BatchError {
            code: "invalid_request",
            message: INJECTED_REJECTION.to_owned(),
            param: None,
            line: last,
        });
    }
    if !errors.is_empty() {
        return Plan { lines: Vec::new(), errors, bytes: 0, tokens: 0, model: None };
    }
    let tokens = requests.iter().map(|r| fleet::tokens::estimate_request_tokens(r.body.get().as_bytes())).sum();
    let model = requests.first().and_then(|r| {
        serde_json::from_str::<Value>(r.body.get()).ok()?.get("model")?.as_str().map(|m| m.chars().take(64).collect())
    });
    let first = batches.line_numbers(requests.len());
    let error_rate = batches.knobs.batch_line_error_rate;
    let lines: Vec<Planned> = requests
        .into_iter()
        .zip(first..)
        .map(|(Request { custom_id, body, .. }, n)| {
            let answer = lines::answer(endpoint, body.get().as_bytes(), n, created, error_rate, rng);
            let rendered = lines::openai_line(endpoint, &custom_id, n, &answer);
            Planned { success: answer.is_success(), custom_id, n, rendered }
        })
        .collect();
    let bytes = lines.iter().map(|l| (l.rendered.len() + l.custom_id.len()) as u64).sum();
    Plan { lines, errors: Vec::new(), bytes, tokens, model }
}

/// A valid request of an input file.
#[derive(Debug)]
struct Request {
    /// Its line number in the file, from 1.
    line: usize,
    custom_id: String,
    body: Box<RawValue>,
}

/// The requests of an input file, and its validation
/// errors (at most [`MAX_LISTED_ERRORS`] listed). Blank lines are skipped; line numbers count
/// every line of the file, from 1.
fn validate(endpoint: Endpoint, content: &[u8]) -> (Vec<Request>, Vec<BatchError>) {
    let mut requests = Vec::new();
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    let mut report = |error: BatchError| {
        if errors.len() < MAX_LISTED_ERRORS {
            errors.push(error);
        }
    };
    let mut count = 0;
    for (i, raw) in content.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        count += 1;
        if count > MAX_LINES {
            report(BatchError {
                code: "too_many_requests",
                message: format!("The input file has more than {MAX_LINES} requests"),
                param: None,
                line: None,
            });
            break;
        }
        let parsed: InputLine = match serde_json::from_slice(raw) {
            Ok(parsed) => parsed,
            Err(e) => {
                report(BatchError::at(
                    line,
                    "invalid_json_line",
                    None,
                    format!("This line is not a valid request: {e}"),
                ));
                continue;
            }
        };
        match check_line(endpoint, parsed, &mut seen) {
            Ok((custom_id, body)) => requests.push(Request { line, custom_id, body }),
            Err((code, param, message)) => report(BatchError::at(line, code, Some(param), message)),
        }
    }
    if count == 0 {
        report(BatchError {
            code: "empty_file",
            message: "The input file has no requests".to_owned(),
            param: None,
            line: None,
        });
    }
    (requests, errors)
}

type LineError = (&'static str, &'static str, String);

/// Checks one parsed line against the batch's endpoint and the custom_ids seen so far.
fn check_line(
    endpoint: Endpoint,
    line: InputLine,
    seen: &mut HashSet<String>,
) -> Result<(String, Box<RawValue>), LineError> {
    let custom_id = line.custom_id.filter(|c| !c.is_empty()).ok_or((
        "missing_required_parameter",
        "custom_id",
        "Missing required parameter: 'custom_id'".to_owned(),
    ))?;
    if custom_id.len() > MAX_CUSTOM_ID_BYTES {
        return Err(("invalid_value", "custom_id", format!("custom_id is longer than {MAX_CUSTOM_ID_BYTES} bytes")));
    }
    if line.method.as_deref() != Some("POST") {
        return Err(("invalid_value", "method", "method must be 'POST'".to_owned()));
    }
    if line.url.as_deref() != Some(endpoint.path()) {
        return Err(("mismatched_url", "url", format!("url must be the batch's endpoint '{}'", endpoint.path())));
    }
    let body = line.body.filter(|b| b.get().starts_with('{')).ok_or((
        "invalid_value",
        "body",
        "body must be a JSON object".to_owned(),
    ))?;
    if !seen.insert(custom_id.clone()) {
        return Err(("duplicate_custom_id", "custom_id", "The custom_id is used by an earlier line".to_owned()));
    }
    Ok((custom_id, body))
}

#[derive(Deserialize)]
struct ListQuery {
    after: Option<String>,
    limit: Option<usize>,
}

async fn list(
    State(batches): State<Arc<Batches>>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid(Family::OpenAi, format!("Invalid query: {e}")))?;
    let limit = shared::limit(Family::OpenAi, query.limit, 100)?;
    let mut inner = batches.lock();
    let cursor = match &query.after {
        None => Cursor::Start,
        Some(after) => Cursor::After(shared::cursor_seq::<Batch>(&inner, "after", after)?),
    };
    let page = shared::page::<Batch>(&mut inner, cursor, limit, Instant::now());
    Ok(Json(serde_json::json!({
        "object": "list", "data": page.data, "first_id": page.first_id, "last_id": page.last_id,
        "has_more": page.has_more,
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(custom_id: &str, url: &str) -> String {
        format!(r#"{{"custom_id":"{custom_id}","method":"POST","url":"{url}","body":{{"messages":[]}}}}"#)
    }

    #[test]
    fn a_valid_file_yields_its_requests_with_line_numbers() {
        let content = format!("{}\n\n{}\n", line("a", "/v1/chat/completions"), line("b", "/v1/chat/completions"));
        let (requests, errors) = validate(Endpoint::ChatCompletions, content.as_bytes());
        assert!(errors.is_empty(), "{errors:?}");
        let seen: Vec<(usize, &str)> = requests.iter().map(|r| (r.line, r.custom_id.as_str())).collect();
        assert_eq!(seen, [(1, "a"), (3, "b")]);
    }

    #[test]
    fn every_bad_line_is_reported_with_its_number() {
        let content = [
            line("a", "/v1/chat/completions"),
            "not json".to_owned(),
            line("a", "/v1/chat/completions"),
            line("c", "/v1/embeddings"),
            r#"{"custom_id":"d","method":"GET","url":"/v1/chat/completions","body":{}}"#.to_owned(),
            r#"{"method":"POST","url":"/v1/chat/completions","body":{}}"#.to_owned(),
            r#"{"custom_id":"e","method":"POST","url":"/v1/chat/completions","body":[1]}"#.to_owned(),
        ]
        .join("\n");
        let (requests, errors) = validate(Endpoint::ChatCompletions, content.as_bytes());
        assert_eq!(requests.len(), 1);
        let got: Vec<(Option<usize>, &str)> = errors.iter().map(|e| (e.line, e.code)).collect();
        assert_eq!(
            got,
            [
                (Some(2), "invalid_json_line"),
                (Some(3), "duplicate_custom_id"),
                (Some(4), "mismatched_url"),
                (Some(5), "invalid_value"),
                (Some(6), "missing_required_parameter"),
                (Some(7), "invalid_value"),
            ]
        );
    }

    #[test]
    fn empty_and_oversized_files_are_rejected() {
        let (_, errors) = validate(Endpoint::Embeddings, b"\n  \n");
        assert_eq!(errors[0].code, "empty_file");
        let one = line("x", "/v1/embeddings");
        let content: String = (0..=MAX_LINES).map(|i| one.replace("\"x\"", &format!("\"x{i}\"")) + "\n").collect();
        let (_, errors) = validate(Endpoint::Embeddings, content.as_bytes());
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].code, "too_many_requests");
    }
}
