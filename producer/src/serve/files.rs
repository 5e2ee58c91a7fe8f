//! The OpenAI Files routes: `POST /v1/files` (multipart, `purpose=batch`, streamed to the
//! broker), `GET /v1/files`, `GET /v1/files/{id}`, `GET /v1/files/{id}/content`,
//! `DELETE /v1/files/{id}`. A batch's output and error files are not stored: their ids
//! (`file-out-<hex>`, `file-err-<hex>`) name the batch, and their content is read from the
//! job's results stream when asked (see [`super::results`]).

use axum::body::Body;
use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::auth::Owner;
use super::error::ApiError;
use super::results::{self, Which};
use super::store::{Api, FileRecord, Record};
use super::upload::{self, FileWriter};
use super::AppState;

/// Multipart framing allowed on top of `api.max_file_bytes` before a declared length is
/// refused unread.
const MULTIPART_SLACK: u64 = 64 * 1024;

/// The File object of a stored file.
fn file_object(f: &FileRecord) -> Value {
    json!({
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": f.created_at,
        "expires_at": f.expires_at,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "status_details": null,
    })
}

/// `POST /v1/files`.
pub(crate) async fn create(
    State(app): State<AppState>,
    Owner(owner, _slot): Owner,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Json<Value>, ApiError> {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > app.cfg.api.max_file_bytes + MULTIPART_SLACK) {
        return Err(ApiError::too_large(format!(
            "The upload is over the limit of {} bytes (api.max_file_bytes).",
            app.cfg.api.max_file_bytes
        ))
        .param("file"));
    }
    let mut multipart =
        multipart.map_err(|e| ApiError::invalid(format!("Expected a multipart/form-data body: {e}")).param("file"))?;
    let malformed = |e: axum::extract::multipart::MultipartError| {
        ApiError::invalid(format!("Malformed multipart body: {e}")).param("file")
    };
    let mut purpose = None;
    let mut stored: Option<(FileWriter<'_>, String)> = None;
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => {
                if let Some((w, _)) = &stored {
                    w.abort().await;
                }
                return Err(malformed(e));
            }
        };
        match field.name() {
            Some("purpose") => purpose = Some(field.text().await.map_err(malformed)?),
            Some("file") if stored.is_none() => {
                let filename = field.file_name().unwrap_or("upload.jsonl").to_string();
                let mut field = field;
                let mut writer = FileWriter::start(&app.store, &app.rules, &app.cfg.api).await?;
                let outcome = async {
                    while let Some(chunk) = field.chunk().await.map_err(malformed)? {
                        app.metrics.upload_bytes.inc_by(chunk.len() as u64);
                        writer.write(&chunk).await?;
                    }
                    Ok::<(), ApiError>(())
                }
                .await;
                if let Err(e) = outcome {
                    writer.abort().await;
                    return Err(e);
                }
                stored = Some((writer, filename));
            }
            _ => {}
        }
    }
    let Some((writer, filename)) = stored else {
        return Err(ApiError::invalid("The multipart body has no `file` field.").param("file"));
    };
    if purpose.as_deref() != Some("batch") {
        writer.abort().await;
        return Err(ApiError::invalid(format!(
            "purpose must be 'batch' (got {:?}): this server keeps batch input files only.",
            purpose.unwrap_or_default()
        ))
        .param("purpose"));
    }
    let record = writer.finish(&owner, &filename, "batch").await?;
    tracing::info!(file = %record.id, lines = record.lines, bytes = record.bytes, "file stored");
    Ok(Json(file_object(&record)))
}

/// Query of `GET /v1/files`.
#[derive(serde::Deserialize)]
pub(crate) struct ListQuery {
    purpose: Option<String>,
    after: Option<String>,
    limit: Option<String>,
}

/// `GET /v1/files`.
pub(crate) async fn list(
    State(app): State<AppState>,
    Owner(owner, _slot): Owner,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let files = app.store.files_of(&owner, Some(q.purpose.as_deref().unwrap_or("batch"))).await?;
    let limit = super::page_limit(q.limit.as_deref(), 10_000)?;
    let ids: Vec<&str> = files.iter().map(|f| f.id.as_str()).collect();
    let (start, end) = super::page(&ids, q.after.as_deref(), limit);
    let data: Vec<Value> = files[start..end].iter().map(file_object).collect();
    Ok(Json(super::list_object(data, end < files.len())))
}

/// What a file id names: a stored file, or a batch's output or error file.
enum Named {
    Stored(FileRecord),
    Results { batch: super::store::BatchEntry, which: Which },
}

async fn lookup(app: &AppState, owner: &str, id: &str) -> Result<Named, ApiError> {
    for (prefix, which) in [("file-out-", Which::Output), ("file-err-", Which::Errors)] {
        if let Some(hex) = id.strip_prefix(prefix) {
            let batch = app
                .store
                .batch(owner, &format!("batch_{hex}"), Api::OpenAi)
                .await
                .map_err(|_| ApiError::not_found("file", id))?;
            return Ok(Named::Results { batch, which });
        }
    }
    Ok(Named::Stored(app.store.file(owner, id).await?))
}

/// `GET /v1/files/{id}`.
pub(crate) async fn retrieve(
    State(app): State<AppState>,
    Owner(owner, _slot): Owner,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    match lookup(&app, &owner, &id).await? {
        Named::Stored(f) => Ok(Json(file_object(&f))),
        Named::Results { batch, which } => {
            let bytes = results::count_bytes(&app, &batch.record, which).await?;
            Ok(Json(json!({
                "id": id,
                "object": "file",
                "bytes": bytes,
                "created_at": batch.record.created_at,
                "expires_at": batch.record.created_at + app.store.retention_s(),
                "filename": format!("{}_{}.jsonl", batch.record.id, which.as_str()),
                "purpose": "batch_output",
                "status": "processed",
                "status_details": null,
            })))
        }
    }
}

/// `GET /v1/files/{id}/content`: the file's lines, streamed.
pub(crate) async fn content(
    State(app): State<AppState>,
    Owner(owner, _slot): Owner,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let body = match lookup(&app, &owner, &id).await? {
        Named::Stored(f) => stored_content(app, f),
        Named::Results { batch, which } => {
            results::body(app.clone(), batch.record, which, crate::output_format::OutputFormat::Openai)
        }
    };
    Ok(([(header::CONTENT_TYPE, "application/jsonl")], body).into_response())
}

/// The lines of a stored file as a streamed body (a read error ends the body early, which
/// the client sees as a broken transfer, not as a complete file).
fn stored_content(app: AppState, file: FileRecord) -> Body {
    super::streamed_body(|tx| async move {
        let mut reader = upload::FileReader::open(&app.store, &file).await?;
        while let Some(mut chunk) = reader.next().await? {
            chunk.push(b'\n');
            if tx.send(Ok(chunk.into())).await.is_err() {
                break;
            }
        }
        reader.close().await;
        Ok(())
    })
}

/// `DELETE /v1/files/{id}`.
pub(crate) async fn delete(
    State(app): State<AppState>,
    Owner(owner, _slot): Owner,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let file = app.store.file(&owner, &id).await?;
    app.store.append(&Record::FileDeleted { id: file.id.clone() }).await?;
    app.store.delete_file_stream(&file.id).await?;
    Ok(Json(json!({"id": file.id, "object": "file", "deleted": true})))
}
