//! The Anthropic Message Batches routes (`x-api-key` auth, Anthropic-shaped errors):
//! `POST /v1/messages/batches` (inline `requests`), `GET /v1/messages/batches`,
//! `GET /v1/messages/batches/{id}`, `POST .../{id}/cancel`, `GET .../{id}/results`
//! (`results_url` points back at this server), `DELETE .../{id}`.
//!
//! The inline requests are stored as a file first (purpose `message_batch`, not listed by
//! `GET /v1/files`), through the same streaming writer and validation as an upload, then
//! run as a batch like any other.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use fleet::wire::{JobStatus, JobSummary};
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::auth::Owner;
use super::batches::{self, NewBatch};
use super::error::{ApiError, Dialect};
use super::results::{self, Which};
use super::status::{self, rfc3339};
use super::store::{Api, BatchEntry, Record};
use super::upload::FileWriter;
use super::AppState;

/// The endpoint every Message Batches request goes to.
const MESSAGES: &str = "/v1/messages";

fn shaped(e: ApiError) -> ApiError {
    e.answer(Dialect::Anthropic)
}

/// Body of `POST /v1/messages/batches`: each request kept as its raw JSON, which is an
/// input line in Anthropic's format (`{"custom_id", "params"}`).
#[derive(serde::Deserialize)]
struct CreateBody {
    requests: Vec<Box<RawValue>>,
}

/// The MessageBatch object; `base` is this server's URL as the client reached it.
fn batch_object(entry: &BatchEntry, job: Option<&JobSummary>, base: &str) -> Value {
    let r = &entry.record;
    let v = status::anthropic(entry, job);
    let results_url = v.ended_at.map(|_| format!("{base}/v1/messages/batches/{}/results", r.id));
    json!({
        "id": r.id,
        "type": "message_batch",
        "processing_status": v.processing_status,
        "request_counts": {
            "processing": v.processing,
            "succeeded": v.succeeded,
            "errored": v.errored,
            "canceled": v.canceled,
            "expired": v.expired,
        },
        "ended_at": v.ended_at.map(rfc3339),
        "created_at": rfc3339(r.created_at),
        "expires_at": r.expires_at.map(rfc3339),
        "archived_at": null,
        "cancel_initiated_at": entry.cancelling_at.map(rfc3339),
        "results_url": results_url,
    })
}

/// This server's base URL as the client used it (the `Host` it sent).
fn base_url(headers: &HeaderMap) -> String {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("127.0.0.1");
    format!("http://{host}")
}

/// `POST /v1/messages/batches`.
pub(crate) async fn create(
    State(app): State<AppState>,
    Owner(owner, _slot): Owner,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let limit = usize::try_from(app.cfg.api.max_file_bytes).unwrap_or(usize::MAX);
    let req: CreateBody = super::read_json(body, limit).await.map_err(shaped)?;
    let mut writer = FileWriter::start(&app.store, &app.rules, &app.cfg.api).await.map_err(shaped)?;
    let written = async {
        for r in &req.requests {
            writer.write(r.get().as_bytes()).await?;
            writer.write(b"\n").await?;
        }
        Ok::<(), ApiError>(())
    }
    .await;
    if let Err(e) = written {
        writer.abort().await;
        return Err(shaped(e));
    }
    let file = writer.finish(&owner, "message_batch.jsonl", "message_batch").await.map_err(shaped)?;
    let hex = batches::batch_hex(&owner, &headers);
    let new = NewBatch {
        id: format!("msgbatch_{hex}"),
        hex,
        api: Api::Anthropic,
        endpoint: MESSAGES.to_string(),
        completion_window: "24h".to_string(),
        metadata: None,
    };
    let entry = batches::create_batch(&app, &owner, &file, new).await.map_err(shaped)?;
    let job = super::tracker::summary(&app.store, &entry).await.map_err(shaped)?;
    Ok(Json(batch_object(&entry, job.as_ref(), &base_url(&headers))))
}

/// `GET /v1/messages/batches/{id}`.
pub(crate) async fn retrieve(
    State(app): State<AppState>,
    Owner(owner, _slot): Owner,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let entry = app.store.batch(&owner, &id, Api::Anthropic).await.map_err(shaped)?;
    let job = super::tracker::summary(&app.store, &entry).await.map_err(shaped)?;
    Ok(Json(batch_object(&entry, job.as_ref(), &base_url(&headers))))
}

/// Query of `GET /v1/messages/batches`.
#[derive(serde::Deserialize)]
pub(crate) struct ListQuery {
    after_id: Option<String>,
    limit: Option<String>,
}

/// `GET /v1/messages/batches` (newest first; `after_id` pages on, `limit` 1 to 1000).
pub(crate) async fn list(
    State(app): State<AppState>,
    Owner(owner, _slot): Owner,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = super::page_limit(q.limit.as_deref(), 1000).map_err(shaped)?;
    let batches = app.store.batches_of(&owner, Api::Anthropic).await.map_err(shaped)?;
    let ids: Vec<&str> = batches.iter().map(|b| b.record.id.as_str()).collect();
    let (start, end) = super::page(&ids, q.after_id.as_deref(), limit);
    let jobs = super::tracker::jobs(&app.store).await.map_err(shaped)?;
    let base = base_url(&headers);
    let mut data = Vec::new();
    for b in &batches[start..end] {
        let job = super::tracker::settle(&app.store, b, jobs.get(&b.record.job_id).cloned()).await;
        data.push(batch_object(b, job.as_ref(), &base));
    }
    Ok(Json(json!({
        "data": data,
        "has_more": end < batches.len(),
        "first_id": ids.get(start).filter(|_| start < end),
        "last_id": end.checked_sub(1).filter(|_| start < end).map(|i| ids[i]),
    })))
}

/// `POST /v1/messages/batches/{id}/cancel`.
pub(crate) async fn cancel(
    State(app): State<AppState>,
    Owner(owner, _slot): Owner,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let entry = app.store.batch(&owner, &id, Api::Anthropic).await.map_err(shaped)?;
    let (entry, job) = batches::cancel_batch(&app, entry).await.map_err(shaped)?;
    Ok(Json(batch_object(&entry, job.as_ref(), &base_url(&headers))))
}

/// `GET /v1/messages/batches/{id}/results`: one Anthropic result line per request.
pub(crate) async fn results(
    State(app): State<AppState>,
    Owner(owner, _slot): Owner,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let entry = app.store.batch(&owner, &id, Api::Anthropic).await.map_err(shaped)?;
    let body = results::body(app.clone(), entry.record, Which::All, crate::output_format::OutputFormat::Anthropic);
    Ok(([(header::CONTENT_TYPE, "application/x-jsonl")], body).into_response())
}

/// `DELETE /v1/messages/batches/{id}`: only an ended batch (its results go with it).
pub(crate) async fn delete(
    State(app): State<AppState>,
    Owner(owner, _slot): Owner,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let entry = app.store.batch(&owner, &id, Api::Anthropic).await.map_err(shaped)?;
    let job = super::tracker::summary(&app.store, &entry).await.map_err(shaped)?;
    if !job.is_some_and(|j| JobStatus::ENDED.contains(&j.status)) {
        return Err(shaped(ApiError::invalid("A batch can be deleted only once it has ended; cancel it first.")));
    }
    app.store.append(&Record::BatchDeleted { id: id.clone() }).await.map_err(shaped)?;
    Ok(Json(json!({"id": id, "type": "message_batch_deleted"})))
}
