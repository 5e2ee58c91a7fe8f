//! Storing a file of requests on the broker as it arrives: split into lines, each checked
//! with `submit`'s own validation ([`crate::validate::check_line`]), published in chunks
//! to the file's stream with confirms. Memory holds one chunk of lines and the custom_ids'
//! 64-bit hashes, never the file. Every problem is reported with its line number; a file
//! with any, or over a limit, is refused and its stream deleted, so nothing of it remains.
//! An upload holds a [`Lease`] from before its stream exists until after its record is
//! written, so the stream of an upload whose replica died is found and deleted.
//!
//! Duplicate custom_ids are found by hash; a hash match is confirmed by reading the two
//! lines back from the stream, so a hash collision can never refuse a valid file.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use fleet::config::ProviderKind;
use lapin::types::{AMQPValue, FieldTable};
use xxhash_rust::xxh3::xxh3_64;

use super::broker::StreamReader;
use super::error::ApiError;
use super::lease::Lease;
use super::route::Models;
use super::store::{FileRecord, Record, Store};
use crate::validate::{self, LineError, Rules};

/// Lines per stream message at most.
const CHUNK_LINES: usize = 256;
/// Bytes per stream message at most (a longer line goes alone).
const CHUNK_BYTES: usize = 128 * 1024;
/// Unconfirmed stream messages at most.
const CONFIRM_WINDOW: usize = 64;
/// Problems listed in a refusal; the rest are counted.
const MAX_REPORTED: usize = 20;

/// The rules a line must meet: those of any configured provider's kind.
pub(crate) struct LineRules {
    rules: Vec<Rules>,
}

impl LineRules {
    /// The rules of every kind among `cfg`'s providers.
    pub(crate) fn of(cfg: &fleet::Config) -> LineRules {
        let mut kinds: Vec<ProviderKind> = Vec::new();
        for p in cfg.providers.values() {
            if !kinds.contains(&p.kind) {
                kinds.push(p.kind);
            }
        }
        let rules = kinds.into_iter().map(|kind| Rules { kind, max_body_bytes: cfg.producer.max_body_bytes }).collect();
        LineRules { rules }
    }

    /// Checks one line: valid for some provider kind, or the first kind's complaint.
    pub(crate) fn check(&self, raw: &[u8]) -> Result<fleet::wire::BatchInputLine, String> {
        let mut first = None;
        for rules in &self.rules {
            match validate::check_line(raw, rules) {
                Ok(line) => return Ok(line),
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        Err(first.unwrap_or_else(|| "no provider is configured".to_string()))
    }

    /// The longest line worth buffering: a body at the limit with room for the rest.
    fn max_line_bytes(&self) -> usize {
        self.rules.iter().map(|r| r.max_body_bytes).max().unwrap_or(0) * 2 + 64 * 1024
    }
}

/// A file being written to its stream.
pub(crate) struct FileWriter<'a> {
    /// Held until the writer is dropped (see [`super::lease`]).
    _lease: Lease,
    store: &'a Store,
    rules: &'a LineRules,
    pub id: String,
    stream: String,
    ch: lapin::Channel,
    max_bytes: u64,
    max_lines: u64,
    /// Bytes received.
    pub bytes: u64,
    /// The unfinished line's bytes; `discarding` once it is too long to keep.
    partial: Vec<u8>,
    discarding: bool,
    line_no: u64,
    /// Requests (non-blank lines) so far.
    lines: u64,
    chunk: Vec<u8>,
    chunk_lines: usize,
    ready: Vec<Vec<u8>>,
    confirms: VecDeque<fleet::amqp::PendingConfirm>,
    errors: Vec<LineError>,
    error_count: usize,
    /// The models of the lines, for routing.
    models: Models,
    /// custom_id hash → (index, line number).
    seen: HashMap<u64, (u64, u64)>,
    /// (index, line, earlier index, earlier line) whose custom_ids' hashes match.
    candidates: Vec<(u64, u64, u64, u64)>,
    urls: Vec<(String, u64)>,
}

/// Why a file was not stored.
fn refusal(errors: &[LineError], count: usize) -> ApiError {
    let mut listed: Vec<String> = errors.iter().map(ToString::to_string).collect();
    if count > errors.len() {
        listed.push(format!("... and {} more", count - errors.len()));
    }
    ApiError::invalid(format!("The file has {count} invalid line(s): {}", listed.join("; ")))
        .param("file")
        .code("invalid_file")
}

impl<'a> FileWriter<'a> {
    /// Declares the stream of a new file (kept `retention_s`).
    pub(crate) async fn start(
        store: &'a Store,
        rules: &'a LineRules,
        api: &fleet::config::ApiConfig,
    ) -> Result<FileWriter<'a>, ApiError> {
        let id = format!("file-{}", uuid::Uuid::new_v4().simple());
        let lease = Lease::take(store, &id).await?;
        let stream = store.topology.api_file_stream(&id);
        let ch = store.broker.confirm_channel().await?;
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString("stream".into()));
        args.insert("x-max-age".into(), AMQPValue::LongString(format!("{}s", api.file_retention_s).into()));
        let durable = lapin::options::QueueDeclareOptions { durable: true, ..Default::default() };
        ch.queue_declare(stream.as_str().into(), durable, args).await?;
        Ok(FileWriter {
            _lease: lease,
            store,
            rules,
            id,
            stream,
            ch,
            max_bytes: api.max_file_bytes,
            max_lines: api.max_file_lines,
            bytes: 0,
            partial: Vec::new(),
            discarding: false,
            line_no: 0,
            lines: 0,
            chunk: Vec::with_capacity(CHUNK_BYTES),
            chunk_lines: 0,
            ready: Vec::new(),
            confirms: VecDeque::new(),
            errors: Vec::new(),
            error_count: 0,
            seen: HashMap::new(),
            candidates: Vec::new(),
            urls: Vec::new(),
            models: Models::default(),
        })
    }

    /// Takes the next bytes of the file and publishes the chunks they complete.
    pub(crate) async fn write(&mut self, data: &[u8]) -> Result<(), ApiError> {
        self.bytes += data.len() as u64;
        if self.bytes > self.max_bytes {
            return Err(ApiError::too_large(format!(
                "The file is over the limit of {} bytes (api.max_file_bytes).",
                self.max_bytes
            ))
            .param("file"));
        }
        let mut rest = data;
        while let Some(at) = rest.iter().position(|&b| b == b'\n') {
            let (head, tail) = rest.split_at(at);
            if self.partial.is_empty() && !self.discarding {
                self.line(head)?;
            } else {
                self.extend_partial(head);
                let line = std::mem::take(&mut self.partial);
                self.line(&line)?;
            }
            rest = &tail[1..];
        }
        self.extend_partial(rest);
        self.publish_ready().await
    }

    fn extend_partial(&mut self, data: &[u8]) {
        if self.discarding {
            return;
        }
        if self.partial.len() + data.len() > self.rules.max_line_bytes() {
            // Too long to be a valid line: its bytes are dropped, its line reported.
            self.discarding = true;
            self.partial = Vec::new();
        } else {
            self.partial.extend_from_slice(data);
        }
    }

    /// One complete line (without its newline).
    fn line(&mut self, raw: &[u8]) -> Result<(), ApiError> {
        self.line_no += 1;
        let line_no = self.line_no;
        if std::mem::take(&mut self.discarding) {
            self.lines += 1;
            return self.problem(line_no, "the line is longer than any valid request".to_string());
        }
        let raw = raw.trim_ascii();
        if raw.is_empty() {
            return Ok(());
        }
        let index = self.lines;
        self.lines += 1;
        if self.lines > self.max_lines {
            return Err(ApiError::invalid(format!(
                "The file has more than {} requests (api.max_file_lines); split it.",
                self.max_lines
            ))
            .param("file")
            .code("too_many_requests_in_file"));
        }
        let line = match self.rules.check(raw) {
            Ok(line) => line,
            Err(message) => return self.problem(line_no, message),
        };
        let hash = xxh3_64(line.custom_id.as_bytes());
        if let Some(&(first_index, first_line)) = self.seen.get(&hash) {
            self.candidates.push((index, line_no, first_index, first_line));
        } else {
            self.seen.insert(hash, (index, line_no));
        }
        if !self.urls.iter().any(|(u, _)| *u == line.url) {
            self.urls.push((line.url.clone(), line_no));
        }
        self.models.note(line.body.get(), line_no);
        if self.error_count > 0 {
            return Ok(());
        }
        if !self.chunk.is_empty() && (self.chunk.len() + raw.len() > CHUNK_BYTES || self.chunk_lines >= CHUNK_LINES) {
            self.seal_chunk();
        }
        if !self.chunk.is_empty() {
            self.chunk.push(b'\n');
        }
        self.chunk.extend_from_slice(raw);
        self.chunk_lines += 1;
        Ok(())
    }

    fn problem(&mut self, line: u64, message: String) -> Result<(), ApiError> {
        self.error_count += 1;
        if self.errors.len() < MAX_REPORTED {
            self.errors.push(LineError { line, message });
        }
        // Nothing more is stored: the file will be refused.
        self.ready.clear();
        self.chunk.clear();
        Ok(())
    }

    fn seal_chunk(&mut self) {
        self.ready.push(std::mem::replace(&mut self.chunk, Vec::with_capacity(CHUNK_BYTES)));
        self.chunk_lines = 0;
    }

    async fn publish_ready(&mut self) -> Result<(), ApiError> {
        for chunk in std::mem::take(&mut self.ready) {
            while self.confirms.len() >= CONFIRM_WINDOW {
                if let Some(c) = self.confirms.pop_front() {
                    c.wait().await?;
                }
            }
            let props = lapin::BasicProperties::default().with_delivery_mode(2);
            self.confirms.push_back(fleet::amqp::publish(&self.ch, "", &self.stream, &chunk, props).await?);
        }
        Ok(())
    }

    /// Ends the file: its last line, every confirm, the duplicate check, then its record
    /// (only now does the file exist: every line is on its stream). Returns the record, or
    /// the refusal, the stream deleted. The lease goes last, after the record.
    pub(crate) async fn finish(mut self, owner: &str, filename: &str, purpose: &str) -> Result<FileRecord, ApiError> {
        let result = match self.finish_inner(owner, filename, purpose).await {
            Ok(record) => self.store.append(&Record::File(record.clone())).await.map(|()| record),
            Err(e) => Err(e),
        };
        if result.is_err() {
            self.abort().await;
        }
        result
    }

    async fn finish_inner(&mut self, owner: &str, filename: &str, purpose: &str) -> Result<FileRecord, ApiError> {
        if !self.partial.is_empty() || self.discarding {
            let last = std::mem::take(&mut self.partial);
            self.line(&last)?;
        }
        if !self.chunk.is_empty() {
            self.seal_chunk();
        }
        self.publish_ready().await?;
        while let Some(c) = self.confirms.pop_front() {
            c.wait().await?;
        }
        if !self.candidates.is_empty() && self.error_count == 0 {
            for e in self.confirm_duplicates().await? {
                self.problem(e.line, e.message)?;
            }
            self.errors.sort_by_key(|e| e.line);
        }
        if self.error_count > 0 {
            return Err(refusal(&self.errors, self.error_count));
        }
        if self.lines == 0 {
            return Err(ApiError::invalid("The file contains no requests.").param("file"));
        }
        let now = fleet::now_ms() / 1000;
        Ok(FileRecord {
            id: self.id.clone(),
            owner: owner.to_string(),
            filename: filename.to_string(),
            purpose: purpose.to_string(),
            bytes: self.bytes,
            lines: self.lines,
            created_at: now,
            expires_at: now + self.store_retention(),
            urls: std::mem::take(&mut self.urls),
            models: std::mem::take(&mut self.models),
        })
    }

    fn store_retention(&self) -> u64 {
        self.store.retention_s()
    }

    /// Reads the candidate lines back from the stream and reports the real duplicates.
    async fn confirm_duplicates(&self) -> Result<Vec<LineError>, ApiError> {
        let wanted: HashSet<u64> = self.candidates.iter().flat_map(|c| [c.0, c.2]).collect();
        let mut ids: HashMap<u64, String> = HashMap::new();
        let conn = self.store.broker.conn().await?;
        let mut reader = StreamReader::open(&conn, &self.stream).await?;
        let mut index = 0u64;
        while index < self.lines {
            let Some(d) = reader.next(Duration::from_secs(30)).await? else {
                return Err(ApiError::unavailable("the file's stream ended early while it was read back"));
            };
            for raw in d.data.split(|&b| b == b'\n') {
                if wanted.contains(&index) {
                    if let Ok((line, _)) = crate::input::parse_line(raw) {
                        ids.insert(index, line.custom_id);
                    }
                }
                index += 1;
            }
        }
        reader.close().await;
        Ok(self
            .candidates
            .iter()
            .filter(|c| ids.get(&c.0) == ids.get(&c.2))
            .map(|c| LineError {
                line: c.1,
                message: format!("duplicate custom_id {:?} (first seen on line {})", ids[&c.0], c.3),
            })
            .collect())
    }

    /// Deletes what was stored of the file.
    pub(crate) async fn abort(&self) {
        if let Err(e) = self.store.delete_file_stream(&self.id).await {
            tracing::warn!(file = %self.id, error = %e.message, "cannot delete a refused file's stream; the sweeper will");
        }
    }
}

/// A reader of a stored file's lines, in order, a stream message (a chunk of lines) at a
/// time.
pub(crate) struct FileReader {
    reader: StreamReader,
    left: u64,
    id: String,
}

impl FileReader {
    /// Starts reading `file`.
    pub(crate) async fn open(store: &Store, file: &FileRecord) -> Result<FileReader, ApiError> {
        let conn = store.broker.conn().await?;
        let reader = StreamReader::open(&conn, &store.topology.api_file_stream(&file.id)).await?;
        Ok(FileReader { reader, left: file.lines, id: file.id.clone() })
    }

    /// The next chunk: its lines joined by newlines; `None` after the last line.
    pub(crate) async fn next(&mut self) -> Result<Option<Vec<u8>>, ApiError> {
        if self.left == 0 {
            return Ok(None);
        }
        let Some(d) = self.reader.next(Duration::from_secs(30)).await? else {
            return Err(ApiError::unavailable(format!("the stream of {} ended early", self.id)));
        };
        let lines = d.data.split(|&b| b == b'\n').count() as u64;
        self.left = self.left.saturating_sub(lines);
        Ok(Some(d.data))
    }

    /// Stops reading.
    pub(crate) async fn close(self) {
        self.reader.close().await;
    }
}
