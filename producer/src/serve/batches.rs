//! The OpenAI Batches routes: `POST /v1/batches`, `GET /v1/batches/{id}`,
//! `GET /v1/batches` (`after`, `limit` ≤ 100), `POST /v1/batches/{id}/cancel`; and the
//! creation of a batch's job, shared with the Anthropic routes.
//!
//! A batch is one job of the fleet (`batch_<hex>` runs as `job_<hex>`). Its provider is
//! chosen by [`super::route`]. Its `completion_window` is the job's deadline, and decides
//! with `api.mode` whether it runs online or through the provider's batch API
//! ([`publish::mode_of`]).

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::Json;
use fleet::wire::JobSummary;
use serde_json::{json, Map, Value};
use sha2::Digest as _;

use super::auth::Owner;
use super::error::ApiError;
use super::publish::{self, JobPlan};
use super::status;
use super::store::{Api, BatchEntry, BatchRecord, FileRecord, Record};
use super::AppState;

/// Largest JSON body of a create request (the requests themselves come in files).
const MAX_CREATE_BODY: usize = 1024 * 1024;
/// OpenAI's metadata limits: pairs, key length, value length.
const METADATA_PAIRS: usize = 16;
const METADATA_KEY_CHARS: usize = 64;
const METADATA_VALUE_CHARS: usize = 512;

/// Body of `POST /v1/batches`.
#[derive(serde::Deserialize)]
struct CreateBatch {
    input_file_id: Option<String>,
    endpoint: Option<String>,
    completion_window: Option<String>,
    #[serde(default)]
    metadata: Option<Map<String, Value>>,
}

/// Checks `metadata` against OpenAI's limits.
fn check_metadata(metadata: &Map<String, Value>) -> Result<(), ApiError> {
    let bad = |m: String| Err(ApiError::invalid(m).param("metadata"));
    if metadata.len() > METADATA_PAIRS {
        return bad(format!("metadata has {} keys; at most {METADATA_PAIRS} are allowed.", metadata.len()));
    }
    for (k, v) in metadata {
        if k.chars().count() > METADATA_KEY_CHARS {
            return bad(format!("metadata keys are at most {METADATA_KEY_CHARS} characters."));
        }
        match v {
            Value::String(s) if s.chars().count() <= METADATA_VALUE_CHARS => {}
            Value::String(_) => return bad(format!("metadata values are at most {METADATA_VALUE_CHARS} characters.")),
            _ => return bad(format!("metadata value of {k:?} must be a string.")),
        }
    }
    Ok(())
}

/// The hex of a new batch: from the owner and the `Idempotency-Key` when one is given (so
/// a retried create is the same batch), random otherwise.
pub(crate) fn batch_hex(owner: &str, headers: &HeaderMap) -> String {
    match headers.get("idempotency-key").map(|v| v.as_bytes()) {
        Some(key) => {
            let d = sha2::Sha256::new().chain_update(owner.as_bytes()).chain_update(b"\0").chain_update(key).finalize();
            d[..8].iter().map(|b| format!("{b:02x}")).collect()
        }
        None => uuid::Uuid::new_v4().simple().to_string()[..16].to_string(),
    }
}

/// What a new batch is.
pub(crate) struct NewBatch {
    pub id: String,
    pub hex: String,
    pub api: Api,
    pub endpoint: String,
    pub completion_window: String,
    pub metadata: Option<Map<String, Value>>,
}

/// Creates the batch of `file`: publishes its job, then writes its record. A batch that
/// exists already (a retried create with the same `Idempotency-Key`) is returned as it is.
pub(crate) async fn create_batch(
    app: &AppState,
    owner: &str,
    file: &FileRecord,
    new: NewBatch,
) -> Result<BatchEntry, ApiError> {
    if let Some(existing) = app.store.batch_exists(&new.id).await? {
        if existing.record.owner == owner {
            return Ok(existing);
        }
        return Err(ApiError::conflict("This Idempotency-Key is taken; use another."));
    }
    if let Some((url, line)) = file.urls.iter().find(|(u, _)| *u != new.endpoint) {
        return Err(ApiError::invalid(format!(
            "line {line} of {} has url {url:?}, not the batch's endpoint {:?}.",
            file.id, new.endpoint
        ))
        .param("endpoint"));
    }
    let window =
        crate::duration::parse_duration(&new.completion_window).ok().filter(|d| !d.is_zero()).ok_or_else(|| {
            ApiError::invalid("completion_window must be a duration such as 24h.").param("completion_window")
        })?;
    let named = new.metadata.as_ref().and_then(|m| m.get("provider")).and_then(Value::as_str);
    let provider = super::route::choose_provider(&app.cfg.providers, &new.endpoint, named, &file.models)?;
    let provider_cfg = app
        .cfg
        .providers
        .get(&provider)
        .ok_or_else(|| ApiError::unavailable(format!("provider {provider} was chosen but is not configured")))?;
    let mode = publish::mode_of(app.cfg.api.mode, provider_cfg, window.as_secs());
    let now_ms = fleet::now_ms();
    let deadline_ms = now_ms + window.as_millis() as u64;
    let job_id = format!("job_{}", new.hex);
    let plan = JobPlan {
        job_id: &job_id,
        provider: &provider,
        provider_cfg,
        file,
        submitted_at_ms: now_ms,
        deadline_ms: Some(deadline_ms),
        mode,
        window: app.cfg.producer.confirm_window,
    };
    publish::publish(&app.store, &app.rules, &plan).await?;
    let record = BatchRecord {
        id: new.id,
        owner: owner.to_string(),
        api: new.api,
        job_id,
        input_file_id: file.id.clone(),
        endpoint: new.endpoint,
        completion_window: new.completion_window,
        metadata: new.metadata,
        provider,
        total: file.lines,
        created_at: now_ms / 1000,
        expires_at: Some(deadline_ms / 1000),
    };
    app.store.append(&Record::Batch(record.clone())).await?;
    tracing::info!(
        batch = %record.id,
        job = %record.job_id,
        total = record.total,
        provider = %record.provider,
        completion_window = %record.completion_window,
        mode = mode.as_str(),
        "batch created"
    );
    Ok(BatchEntry { record, cancelling_at: None, ended: None })
}

/// The OpenAI Batch object.
pub(crate) fn batch_object(entry: &BatchEntry, job: Option<&JobSummary>) -> Value {
    let r = &entry.record;
    let v = status::openai(entry, job);
    let hex = r.id.strip_prefix("batch_").unwrap_or(&r.id);
    let output_file_id = (v.ended && v.completed > 0).then(|| format!("file-out-{hex}"));
    let error_file_id = (v.ended && v.failed > 0).then(|| format!("file-err-{hex}"));
    let errors = v.reason.as_ref().map(|reason| {
        json!({"object": "list", "data": [{"code": reason, "message": format!("the job ended: {reason}"), "param": null, "line": null}]})
    });
    let usage = job.and_then(|j| j.usage.as_ref()).map(|u| {
        json!({
            "input_tokens": u.input_tokens,
            "input_tokens_details": {"cached_tokens": u.cached_input_tokens},
            "output_tokens": u.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.input_tokens + u.output_tokens,
        })
    });
    json!({
        "id": r.id,
        "object": "batch",
        "endpoint": r.endpoint,
        "errors": errors,
        "input_file_id": r.input_file_id,
        "completion_window": r.completion_window,
        "status": v.status,
        "output_file_id": output_file_id,
        "error_file_id": error_file_id,
        "created_at": r.created_at,
        "in_progress_at": v.in_progress_at,
        "expires_at": r.expires_at,
        "finalizing_at": v.finalizing_at,
        "completed_at": v.completed_at,
        "failed_at": v.failed_at,
        "expired_at": v.expired_at,
        "cancelling_at": v.cancelling_at,
        "cancelled_at": v.cancelled_at,
        "request_counts": {"total": v.total, "completed": v.completed, "failed": v.failed},
        "usage": usage,
        "metadata": r.metadata,
    })
}

/// `POST /v1/batches`.
pub(crate) async fn create(
    State(app): State<AppState>,
    Owner(owner, _slot): Owner,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let req: CreateBatch = super::read_json(body, MAX_CREATE_BODY).await?;
    let missing = |p: &'static str| ApiError::invalid(format!("Missing required parameter: '{p}'.")).param(p);
    let input_file_id = req.input_file_id.ok_or_else(|| missing("input_file_id"))?;
    let endpoint = req.endpoint.ok_or_else(|| missing("endpoint"))?;
    let completion_window = req.completion_window.ok_or_else(|| missing("completion_window"))?;
    if let Some(m) = &req.metadata {
        check_metadata(m)?;
    }
    let file = app.store.file(&owner, &input_file_id).await.map_err(|e| e.param("input_file_id"))?;
    let hex = batch_hex(&owner, &headers);
    let new = NewBatch {
        id: format!("batch_{hex}"),
        hex,
        api: Api::OpenAi,
        endpoint,
        completion_window,
        metadata: req.metadata,
    };
    let entry = create_batch(&app, &owner, &file, new).await?;
    let job = super::tracker::summary(&app.store, &entry).await?;
    Ok(Json(batch_object(&entry, job.as_ref())))
}

/// `GET /v1/batches/{id}`.
pub(crate) async fn retrieve(
    State(app): State<AppState>,
    Owner(owner, _slot): Owner,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let entry = app.store.batch(&owner, &id, Api::OpenAi).await?;
    let job = super::tracker::summary(&app.store, &entry).await?;
    Ok(Json(batch_object(&entry, job.as_ref())))
}

/// Query of the list routes.
#[derive(serde::Deserialize)]
pub(crate) struct ListQuery {
    after: Option<String>,
    limit: Option<String>,
}

/// `GET /v1/batches`.
pub(crate) async fn list(
    State(app): State<AppState>,
    Owner(owner, _slot): Owner,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = super::page_limit(q.limit.as_deref(), 100)?;
    let batches = app.store.batches_of(&owner, Api::OpenAi).await?;
    let ids: Vec<&str> = batches.iter().map(|b| b.record.id.as_str()).collect();
    let (start, end) = super::page(&ids, q.after.as_deref(), limit);
    let jobs = super::tracker::jobs(&app.store).await?;
    let mut data = Vec::new();
    for b in &batches[start..end] {
        let job = super::tracker::settle(&app.store, b, jobs.get(&b.record.job_id).cloned()).await;
        data.push(batch_object(b, job.as_ref()));
    }
    Ok(Json(super::list_object(data, end < batches.len())))
}

/// Asks the fleet to cancel `entry`'s job and records when. A batch that ended answers 409.
pub(crate) async fn cancel_batch(
    app: &AppState,
    entry: BatchEntry,
) -> Result<(BatchEntry, Option<JobSummary>), ApiError> {
    let job = super::tracker::summary(&app.store, &entry).await?;
    if job.as_ref().is_some_and(|j| fleet::wire::JobStatus::ENDED.contains(&j.status)) {
        return Ok((entry, job));
    }
    crate::cancel::cancel(&app.cfg, &entry.record.job_id).await.map_err(ApiError::unavailable)?;
    let at = fleet::now_ms() / 1000;
    if entry.cancelling_at.is_none() {
        app.store.append(&Record::BatchCancel { id: entry.record.id.clone(), at }).await?;
    }
    let cancelling_at = entry.cancelling_at.or(Some(at));
    Ok((BatchEntry { cancelling_at, ..entry }, job))
}

/// `POST /v1/batches/{id}/cancel`.
pub(crate) async fn cancel(
    State(app): State<AppState>,
    Owner(owner, _slot): Owner,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let entry = app.store.batch(&owner, &id, Api::OpenAi).await?;
    let (entry, job) = cancel_batch(&app, entry).await?;
    if job.as_ref().is_some_and(|j| fleet::wire::JobStatus::ENDED.contains(&j.status)) {
        let status = status::openai(&entry, job.as_ref()).status;
        return Err(ApiError::conflict(format!("Cannot cancel a batch with status '{status}'.")));
    }
    Ok(Json(batch_object(&entry, job.as_ref())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_within_openai_limits_only() {
        let ok: Map<String, Value> = (0..16).map(|i| (format!("k{i}"), json!("v"))).collect();
        assert!(check_metadata(&ok).is_ok());
        let many: Map<String, Value> = (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
        assert!(check_metadata(&many).is_err());
        let long: Map<String, Value> = [("k".to_string(), json!("x".repeat(513)))].into_iter().collect();
        assert!(check_metadata(&long).is_err());
        let nested: Map<String, Value> = [("k".to_string(), json!({"a": 1}))].into_iter().collect();
        assert!(check_metadata(&nested).is_err());
    }

    #[test]
    fn an_idempotency_key_gives_the_same_batch_per_owner() {
        let mut h = HeaderMap::new();
        h.insert("idempotency-key", "abc".parse().unwrap());
        assert_eq!(batch_hex("o1", &h), batch_hex("o1", &h));
        assert_ne!(batch_hex("o1", &h), batch_hex("o2", &h));
        assert_ne!(batch_hex("o1", &HeaderMap::new()), batch_hex("o1", &HeaderMap::new()));
        assert_eq!(batch_hex("o1", &h).len(), 16);
    }
}
