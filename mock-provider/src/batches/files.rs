//! Owns OpenAI's Files API as far as batches use it: the multipart upload of an input file
//! (`POST /v1/files`, purpose `batch`), a file's object (`GET /v1/files/{id}`), its content
//! (`GET /v1/files/{id}/content`, also how batch outputs are fetched) and its deletion
//! (`DELETE /v1/files/{id}`), plus the bounded in-memory store behind them, which also
//! accounts for the bytes batches hold.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::multipart::{Field, MultipartRejection};
use axum::extract::{DefaultBodyLimit, Multipart, Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;

use super::{unix_ms_now, ApiError, Batches, Family};

/// The largest batch input file OpenAI accepts (200 MB).
const MAX_UPLOAD_BYTES: usize = 200_000_000;
/// Room for the multipart framing and the small fields around the file.
const MULTIPART_SLACK: usize = 64 * 1024;
/// The largest small field (`purpose`, anything unknown) read.
const MAX_SMALL_FIELD: usize = 1024;
/// The longest file name kept (longer ones are cut).
const MAX_FILENAME_CHARS: usize = 255;

/// The purpose of a file: what was uploaded, or what a batch wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Purpose {
    Batch,
    BatchOutput,
}

/// One stored file.
#[derive(Debug)]
pub(crate) struct StoredFile {
    pub filename: String,
    pub purpose: Purpose,
    pub created_at: u64,
    pub content: Bytes,
}

/// The files, and the byte budget shared with the batches' held answers and results.
#[derive(Debug)]
pub(crate) struct FileStore {
    files: BTreeMap<u64, StoredFile>,
    keep: usize,
    bytes: u64,
    max_bytes: u64,
}

impl FileStore {
    pub(crate) fn new(keep: usize, max_bytes: u64) -> Self {
        Self { files: BTreeMap::new(), keep, bytes: 0, max_bytes }
    }

    /// Stores an uploaded file as number `seq`, unless the store is full.
    fn add_upload(&mut self, seq: u64, file: StoredFile) -> Result<(), ApiError> {
        if self.files.len() >= self.keep {
            return Err(ApiError::invalid(
                Family::OpenAi,
                format!("File limit reached: mock-provider keeps at most {} files; delete some first", self.keep),
            ));
        }
        self.charge(file.content.len() as u64, Family::OpenAi)?;
        self.files.insert(seq, file);
        Ok(())
    }

    /// Stores a file a batch wrote, as number `seq`. Never refused: the batch's answers were
    /// charged when it was created, and are released as its outputs are written.
    pub(crate) fn add_output(&mut self, seq: u64, file: StoredFile) {
        self.bytes += file.content.len() as u64;
        self.files.insert(seq, file);
    }

    pub(crate) fn get(&self, seq: u64) -> Option<&StoredFile> {
        self.files.get(&seq)
    }

    fn remove(&mut self, seq: u64) -> Option<StoredFile> {
        let file = self.files.remove(&seq)?;
        self.release(file.content.len() as u64);
        Some(file)
    }

    /// Takes `n` bytes from the budget, or explains (in `family`'s shape) why not.
    pub(crate) fn charge(&mut self, n: u64, family: Family) -> Result<(), ApiError> {
        if self.bytes.saturating_add(n) > self.max_bytes {
            return Err(ApiError::new(
                family,
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "Storage limit reached: mock-provider holds at most {} bytes; delete files first",
                    self.max_bytes
                ),
            ));
        }
        self.bytes += n;
        Ok(())
    }

    /// Takes `n` bytes from the budget without asking: for what replaces bytes already
    /// charged (a batch's results replacing its answers).
    pub(crate) fn add_held(&mut self, n: u64) {
        self.bytes += n;
    }

    /// Gives `n` bytes back to the budget.
    pub(crate) fn release(&mut self, n: u64) {
        self.bytes = self.bytes.saturating_sub(n);
    }

    pub(crate) fn count(&self) -> u64 {
        self.files.len() as u64
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// The OpenAI file object.
#[derive(Serialize)]
struct FileObject<'a> {
    id: &'a str,
    object: &'static str,
    bytes: usize,
    created_at: u64,
    expires_at: Option<u64>,
    filename: &'a str,
    purpose: Purpose,
    status: &'static str,
    status_details: Option<()>,
}

impl<'a> FileObject<'a> {
    fn new(id: &'a str, file: &'a StoredFile) -> Self {
        Self {
            id,
            object: "file",
            bytes: file.content.len(),
            created_at: file.created_at,
            expires_at: None,
            filename: &file.filename,
            purpose: file.purpose,
            status: "processed",
            status_details: None,
        }
    }
}

pub(super) fn routes() -> Router<Arc<Batches>> {
    Router::new()
        .route("/v1/files", post(upload))
        .route("/v1/files/{id}", get(retrieve).delete(delete))
        .route("/v1/files/{id}/content", get(content))
        .layer(DefaultBodyLimit::max(MAX_UPLOAD_BYTES + MULTIPART_SLACK))
}

async fn upload(
    State(batches): State<Arc<Batches>>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    let invalid = |message: String| ApiError::invalid(Family::OpenAi, message);
    let mut multipart = multipart.map_err(|e| invalid(format!("Expected a multipart/form-data upload: {e}")))?;
    let (mut purpose, mut upload) = (None, None);
    while let Some(field) =
        multipart.next_field().await.map_err(|e| invalid(format!("Malformed multipart body: {e}")))?
    {
        match field.name() {
            Some("purpose") => purpose = Some(read_field(field, MAX_SMALL_FIELD).await?),
            Some("file") => {
                let filename: String =
                    field.file_name().unwrap_or("upload.jsonl").chars().take(MAX_FILENAME_CHARS).collect();
                upload = Some((filename, read_field(field, MAX_UPLOAD_BYTES).await?));
            }
            // Other fields (`expires_after[...]`) are read, bounded, and ignored.
            _ => drop(read_field(field, MAX_SMALL_FIELD).await?),
        }
    }
    match purpose.as_deref().map(|p| std::str::from_utf8(p).unwrap_or("")) {
        Some("batch") => {}
        Some(other) => {
            let other: String = other.chars().take(32).collect();
            return Err(invalid(format!("purpose: '{other}' is not supported by mock-provider, only 'batch'")));
        }
        None => return Err(invalid("Missing required parameter: 'purpose'".to_owned())),
    }
    let (filename, content) = upload.ok_or_else(|| invalid("Missing required parameter: 'file'".to_owned()))?;
    let file = StoredFile { filename, purpose: Purpose::Batch, created_at: unix_ms_now() / 1000, content };

    let mut inner = batches.lock();
    let seq = inner.next_seq();
    let id = inner.ids.file.id(seq);
    inner.files.add_upload(seq, file)?;
    inner.counters.file_uploaded();
    let object = FileObject::new(&id, inner.files.get(seq).expect("just stored"));
    Ok(Json(object).into_response())
}

/// Reads one multipart field, refusing it beyond `limit` bytes.
async fn read_field(mut field: Field<'_>, limit: usize) -> Result<Bytes, ApiError> {
    let mut buf = Vec::new();
    while let Some(chunk) =
        field.chunk().await.map_err(|e| ApiError::invalid(Family::OpenAi, format!("Malformed multipart body: {e}")))?
    {
        if buf.len() + chunk.len() > limit {
            let name: String = field.name().unwrap_or("?").chars().take(32).collect();
            return Err(ApiError::new(
                Family::OpenAi,
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("Field '{name}' is too large: at most {limit} bytes"),
            ));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}

async fn retrieve(State(batches): State<Arc<Batches>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let inner = batches.lock();
    let file = inner.ids.file.seq(&id).and_then(|seq| inner.files.get(seq));
    let file = file.ok_or_else(|| ApiError::not_found(Family::OpenAi, "File", &id))?;
    Ok(Json(FileObject::new(&id, file)).into_response())
}

async fn content(State(batches): State<Arc<Batches>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let inner = batches.lock();
    let file = inner.ids.file.seq(&id).and_then(|seq| inner.files.get(seq));
    let file = file.ok_or_else(|| ApiError::not_found(Family::OpenAi, "File", &id))?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], file.content.clone()).into_response())
}

async fn delete(State(batches): State<Arc<Batches>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let mut inner = batches.lock();
    let seq = inner.ids.file.seq(&id).ok_or_else(|| ApiError::not_found(Family::OpenAi, "File", &id))?;
    inner.files.remove(seq).ok_or_else(|| ApiError::not_found(Family::OpenAi, "File", &id))?;
    inner.counters.file_deleted();
    Ok(Json(serde_json::json!({"id": id, "object": "file", "deleted": true})).into_response())
}
