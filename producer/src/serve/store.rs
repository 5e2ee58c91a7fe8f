//! Where `producer serve` keeps its state: on the broker, never on its disk.
//!
//! - `<ns>.api.meta` (a stream) holds every record: a file was stored, a batch created, a
//!   batch cancel asked, a file deleted. Every replica reads it from its first message and
//!   keeps an index of it in memory, so any replica answers any request.
//! - `<ns>.api.file.<id>` (a stream per uploaded file) holds the file's lines. Its `file`
//!   record is written only after every line is confirmed, so a replica killed mid-upload
//!   leaves a stream no record names: no half file is ever visible (an `upload_started`
//!   record and a lock queue let [`super::lease::reap`] find and delete that stream).
//!
//! A replica that has not read a record yet (written by another replica a moment ago)
//! would answer 404: a lookup that misses first appends a `sync` record of its own and
//! waits until its reader has read it, so every record written before the request is in
//! the index (a stream is read in order).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use fleet::topology::Topology;
use lapin::types::{AMQPValue, FieldTable};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::broker::{Broker, StreamReader};
use super::error::ApiError;

/// How long a lookup waits for its `sync` record to come back.
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// Segments of the metadata stream: small, so age-based retention (which drops whole
/// segments, never the one being written) can drop old records.
const META_SEGMENT_BYTES: i64 = 8 * 1024 * 1024;
/// How often a replica deletes the streams of expired and deleted files.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Which API created a batch (it decides its ids and shapes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Api {
    /// `POST /v1/batches`.
    OpenAi,
    /// `POST /v1/messages/batches`.
    Anthropic,
}

/// An uploaded file, stored whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct FileRecord {
    /// `file-<hex>`.
    pub id: String,
    /// Owner id of the key that uploaded it.
    pub owner: String,
    pub filename: String,
    /// `batch`, or `message_batch` for the requests of an Anthropic batch (not listed).
    pub purpose: String,
    /// Bytes uploaded.
    pub bytes: u64,
    /// Requests (non-blank lines).
    pub lines: u64,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds; the file is gone after this.
    pub expires_at: u64,
    /// Each `url` of its lines with the first line (1-based) that has it.
    pub urls: Vec<(String, u64)>,
    /// The `model`s of its lines, for routing (absent in records written before routing).
    #[serde(default)]
    pub models: super::route::Models,
}

/// A batch: one job of the fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct BatchRecord {
    /// `batch_<hex>` or `msgbatch_<hex>`; the job is `job_<hex>`.
    pub id: String,
    pub owner: String,
    pub api: Api,
    pub job_id: String,
    pub input_file_id: String,
    pub endpoint: String,
    pub completion_window: String,
    #[serde(default)]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    pub provider: String,
    pub total: u64,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds: the job's deadline.
    pub expires_at: Option<u64>,
}

/// One message of the metadata stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum Record {
    /// Every line of the file is stored: it exists from now on.
    File(FileRecord),
    /// The file was deleted.
    FileDeleted { id: String },
    /// The batch's job is published.
    Batch(BatchRecord),
    /// A cancel of the batch was asked at `at` (Unix seconds).
    BatchCancel { id: String, at: u64 },
    /// The (ended) batch was deleted.
    BatchDeleted { id: String },
    /// The batch's job ended as `summary` says (recorded by the first replica that saw it
    /// end), so the batch keeps its final status after the tracker forgets the job.
    BatchEnded { id: String, summary: Box<fleet::wire::JobSummary> },
    /// A replica's read barrier (see the module's header).
    Sync { nonce: String },
    /// An upload began writing the file's stream at `at` (Unix seconds), holding its lock.
    UploadStarted { id: String, at: u64 },
    /// An upload that never stored its file was cleaned up.
    UploadEnded { id: String },
}

/// A batch with what happened to it since.
#[derive(Debug, Clone)]
pub(crate) struct BatchEntry {
    pub record: BatchRecord,
    /// When a cancel was asked, Unix seconds.
    pub cancelling_at: Option<u64>,
    /// The job's summary once it ended, as recorded on the metadata stream.
    pub ended: Option<Box<fleet::wire::JobSummary>>,
}

#[derive(Default)]
struct Index {
    files: HashMap<String, FileRecord>,
    /// Files deleted or expired whose stream may still exist.
    gone: Vec<String>,
    batches: HashMap<String, BatchEntry>,
    /// Uploads started whose file is not stored (yet), by id: when they started.
    uploading: HashMap<String, u64>,
}

/// The records, as this replica has read them, and the way to write more.
pub(crate) struct Store {
    pub topology: Topology,
    pub broker: Broker,
    retention_s: u64,
    index: RwLock<Index>,
    waiters: Mutex<HashMap<String, tokio::sync::oneshot::Sender<()>>>,
}

impl Store {
    /// A store of `topology`'s records, kept `retention_s`.
    pub(crate) fn new(topology: Topology, broker: Broker, retention_s: u64) -> Store {
        Store { topology, broker, retention_s, index: RwLock::default(), waiters: Mutex::default() }
    }

    /// How long files and records are kept, seconds (`api.file_retention_s`).
    pub(crate) fn retention_s(&self) -> u64 {
        self.retention_s
    }

    /// Declares the metadata stream (idempotent; a stream declared with another retention
    /// by an earlier configuration keeps it).
    pub(crate) async fn declare(&self) -> Result<(), ApiError> {
        let conn = self.broker.conn().await?;
        let ch = fleet::amqp::open_channel(&conn).await?;
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString("stream".into()));
        args.insert("x-max-age".into(), AMQPValue::LongString(format!("{}s", self.retention_s).into()));
        args.insert("x-stream-max-segment-size-bytes".into(), AMQPValue::LongLongInt(META_SEGMENT_BYTES));
        let name = self.topology.api_meta_stream();
        let durable = lapin::options::QueueDeclareOptions { durable: true, ..Default::default() };
        if let Err(e) = ch.queue_declare(name.as_str().into(), durable, args).await {
            if !fleet::topology::is_precondition_failed(&e) {
                return Err(e.into());
            }
            tracing::warn!(stream = %name, "the metadata stream exists with other arguments; keeping them");
            let ch = fleet::amqp::open_channel(&conn).await?;
            let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
            ch.queue_declare(name.as_str().into(), passive, FieldTable::default()).await?;
        }
        let _ = ch.close(200, "declared".into()).await;
        Ok(())
    }

    /// Appends `record` to the metadata stream (confirmed).
    pub(crate) async fn append(&self, record: &Record) -> Result<(), ApiError> {
        let ch = self.broker.confirm_channel().await?;
        let body = serde_json::to_vec(record).map_err(ApiError::unavailable)?;
        let res = fleet::amqp::publish_confirmed(
            &ch,
            "",
            &self.topology.api_meta_stream(),
            &body,
            fleet::amqp::persistent_json(),
        )
        .await;
        let _ = ch.close(200, "done".into()).await;
        Ok(res?)
    }

    /// Returns once every record written before the call is in this replica's index.
    pub(crate) async fn sync(&self) -> Result<(), ApiError> {
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiters.lock().unwrap_or_else(|e| e.into_inner()).insert(nonce.clone(), tx);
        let appended = self.append(&Record::Sync { nonce: nonce.clone() }).await;
        let res = match appended {
            Ok(()) => match tokio::time::timeout(SYNC_TIMEOUT, rx).await {
                Ok(Ok(())) => Ok(()),
                _ => Err(ApiError::unavailable("the metadata stream did not give back a sync record in time")),
            },
            Err(e) => Err(e),
        };
        self.waiters.lock().unwrap_or_else(|e| e.into_inner()).remove(&nonce);
        res
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    /// `owner`'s file `id` (404 when unknown, expired or another key's).
    pub(crate) async fn file(&self, owner: &str, id: &str) -> Result<FileRecord, ApiError> {
        let find = || self.read().files.get(id).filter(|f| f.owner == owner && !expired(f)).cloned();
        if let Some(f) = find() {
            return Ok(f);
        }
        self.sync().await?;
        find().ok_or_else(|| ApiError::not_found("file", id))
    }

    /// `owner`'s batch `id` of `api` (404 when unknown or another key's).
    pub(crate) async fn batch(&self, owner: &str, id: &str, api: Api) -> Result<BatchEntry, ApiError> {
        let find = || self.read().batches.get(id).filter(|b| b.record.owner == owner && b.record.api == api).cloned();
        if let Some(b) = find() {
            return Ok(b);
        }
        self.sync().await?;
        find().ok_or_else(|| ApiError::not_found("batch", id))
    }

    /// Whether a batch `id` exists (of any owner): an idempotent create looks it up.
    pub(crate) async fn batch_exists(&self, id: &str) -> Result<Option<BatchEntry>, ApiError> {
        self.sync().await?;
        Ok(self.read().batches.get(id).cloned())
    }

    /// `owner`'s files of `purpose`, newest first (after a sync).
    pub(crate) async fn files_of(&self, owner: &str, purpose: Option<&str>) -> Result<Vec<FileRecord>, ApiError> {
        self.sync().await?;
        let mut files: Vec<FileRecord> = self
            .read()
            .files
            .values()
            .filter(|f| f.owner == owner && !expired(f) && purpose.is_none_or(|p| f.purpose == p))
            .cloned()
            .collect();
        files.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
        Ok(files)
    }

    /// `owner`'s batches of `api`, newest first (after a sync).
    pub(crate) async fn batches_of(&self, owner: &str, api: Api) -> Result<Vec<BatchEntry>, ApiError> {
        self.sync().await?;
        let mut batches: Vec<BatchEntry> =
            self.read().batches.values().filter(|b| b.record.owner == owner && b.record.api == api).cloned().collect();
        batches.sort_by(|a, b| (b.record.created_at, &b.record.id).cmp(&(a.record.created_at, &a.record.id)));
        Ok(batches)
    }

    /// The job of every batch (of any owner) this replica has read.
    pub(crate) fn batch_jobs(&self) -> Vec<String> {
        self.read().batches.values().map(|b| b.record.job_id.clone()).collect()
    }

    /// The uploads this replica has read as started and not stored.
    pub(crate) fn uploads(&self) -> Vec<String> {
        self.read().uploading.keys().cloned().collect()
    }

    /// Whether upload `id` is started and not stored, as far as this replica has read.
    pub(crate) fn is_uploading(&self, id: &str) -> bool {
        self.read().uploading.contains_key(id)
    }

    /// Takes one record into the index.
    fn apply(&self, record: Record) {
        let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
        match record {
            Record::File(f) => {
                index.uploading.remove(&f.id);
                index.files.insert(f.id.clone(), f);
            }
            Record::FileDeleted { id } => {
                if index.files.remove(&id).is_some() {
                    index.gone.push(id);
                }
            }
            Record::Batch(b) => {
                let id = b.id.clone();
                let entry = index.batches.entry(id).or_insert(BatchEntry {
                    record: b.clone(),
                    cancelling_at: None,
                    ended: None,
                });
                entry.record = b;
            }
            Record::BatchCancel { id, at } => {
                if let Some(b) = index.batches.get_mut(&id) {
                    b.cancelling_at.get_or_insert(at);
                }
            }
            Record::BatchDeleted { id } => {
                index.batches.remove(&id);
            }
            Record::BatchEnded { id, summary } => {
                if let Some(b) = index.batches.get_mut(&id) {
                    b.ended.get_or_insert(summary);
                }
            }
            Record::UploadStarted { id, at } => {
                if !index.files.contains_key(&id) {
                    index.uploading.insert(id, at);
                }
            }
            Record::UploadEnded { id } => {
                index.uploading.remove(&id);
            }
            Record::Sync { nonce } => {
                drop(index);
                if let Some(tx) = self.waiters.lock().unwrap_or_else(|e| e.into_inner()).remove(&nonce) {
                    let _ = tx.send(());
                }
            }
        }
    }

    /// Reads the metadata stream into the index until `shutdown`, from its first message
    /// and again after a broker failure (records are applied idempotently).
    pub(crate) async fn follow(self: Arc<Self>, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            let res = tokio::select! {
                res = self.follow_once() => res,
                () = shutdown.cancelled() => return,
            };
            if let Err(e) = res {
                tracing::warn!(error = %e.message, "reading the metadata stream failed; reading it again");
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    async fn follow_once(&self) -> Result<(), ApiError> {
        self.declare().await?;
        let conn = self.broker.conn().await?;
        let mut reader = StreamReader::open(&conn, &self.topology.api_meta_stream()).await?;
        loop {
            // A long idle time: the reader just waits for the next record.
            let Some(delivery) = reader.next(Duration::from_secs(3600)).await? else { continue };
            match serde_json::from_slice::<Record>(&delivery.data) {
                Ok(record) => self.apply(record),
                Err(e) => tracing::warn!(error = %e, "ignoring an undecodable record on the metadata stream"),
            }
        }
    }

    /// Deletes the streams of deleted and expired files, every [`SWEEP_EVERY`], until
    /// `shutdown` (any replica may: deleting a missing queue is a no-op).
    pub(crate) async fn sweep(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(SWEEP_EVERY) => {}
                () = shutdown.cancelled() => return,
            }
            let doomed: Vec<String> = {
                let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
                let expired: Vec<String> = index.files.values().filter(|f| expired(f)).map(|f| f.id.clone()).collect();
                for id in &expired {
                    index.files.remove(id);
                }
                let mut doomed = std::mem::take(&mut index.gone);
                doomed.extend(expired);
                doomed
            };
            for id in doomed {
                if let Err(e) = self.delete_file_stream(&id).await {
                    tracing::warn!(file = %id, error = %e.message, "cannot delete an expired file's stream");
                }
            }
        }
    }

    /// Deletes a file's stream.
    pub(crate) async fn delete_file_stream(&self, id: &str) -> Result<(), ApiError> {
        let conn = self.broker.conn().await?;
        let ch = fleet::amqp::open_channel(&conn).await?;
        ch.queue_delete(self.topology.api_file_stream(id).as_str().into(), Default::default()).await?;
        let _ = ch.close(200, "deleted".into()).await;
        Ok(())
    }
}

fn expired(f: &FileRecord) -> bool {
    f.expires_at <= fleet::now_ms() / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(id: &str, owner: &str) -> FileRecord {
        FileRecord {
            id: id.into(),
            owner: owner.into(),
            filename: "in.jsonl".into(),
            purpose: "batch".into(),
            bytes: 10,
            lines: 1,
            created_at: 1,
            expires_at: u64::MAX,
            urls: vec![("/v1/chat/completions".into(), 1)],
            models: Default::default(),
        }
    }

    #[test]
    fn records_round_trip_and_a_deleted_file_leaves_the_index() {
        let store = Store::new(Topology::names("t"), Broker::new(vec![]), 60);
        let rec = Record::File(file("file-1", "o1"));
        let json = serde_json::to_string(&rec).unwrap();
        assert!(json.starts_with(r#"{"type":"file""#), "{json}");
        assert_eq!(serde_json::from_str::<Record>(&json).unwrap(), rec);
        store.apply(rec);
        assert!(store.read().files.contains_key("file-1"));
        store.apply(Record::FileDeleted { id: "file-1".into() });
        assert!(!store.read().files.contains_key("file-1"));
        assert_eq!(store.read().gone, vec!["file-1".to_string()]);
    }

    #[test]
    fn an_upload_is_in_progress_until_its_file_is_stored_or_it_ends() {
        let store = Store::new(Topology::names("t"), Broker::new(vec![]), 60);
        store.apply(Record::UploadStarted { id: "file-1".into(), at: 1 });
        store.apply(Record::UploadStarted { id: "file-2".into(), at: 1 });
        assert!(store.is_uploading("file-1") && store.is_uploading("file-2"));
        store.apply(Record::File(file("file-1", "o1")));
        store.apply(Record::UploadEnded { id: "file-2".into() });
        assert!(store.uploads().is_empty());
        // Applied again (a reader that starts over): a stored file's start changes nothing.
        store.apply(Record::UploadStarted { id: "file-1".into(), at: 1 });
        assert!(!store.is_uploading("file-1"));
    }
}
