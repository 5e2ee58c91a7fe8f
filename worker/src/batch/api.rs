//! What the chunk handler asks of a provider's batch API, whatever its kind: find the batch
//! a chunk may already have, create one, poll it, cancel it, read its result lines, delete
//! what was uploaded. [`BatchApi`] dispatches to the OpenAI, the Anthropic or the Gemini
//! dialect.
//!
//! Everything a provider answers is untrusted: bodies are read up to a cap, ids are checked
//! before they go into a URL, result lines are mapped back to items only through our own
//! `custom_id`s (`i<index>` behind the chunk's own prefix, the index checked against the
//! job's size; lines naming no item of the chunk are ignored), and no URL a provider
//! returns (Anthropic's `results_url`) is ever called: the documented path is built instead.

use std::time::{Duration, Instant};

use bytes::Bytes;
use fleet::batch::ChunkTask;
use fleet::config::ProviderKind;
use fleet::wire::{ErrorRecord, Item, ResponseRecord};
use serde::de::DeserializeOwned;

use super::{anthropic, gemini, openai};
use crate::provider::ProviderClient;

/// Uploads and result downloads may take much longer than one online call.
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest result line read (a response body is bounded by `max_response_bytes` online).
pub const MAX_LINE_BYTES: usize = 32 << 20;

/// A failed batch API call.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Worth trying again later (5xx, 429, timeout, connection, a body we could not read).
    #[error("{0}")]
    Transient(String),
    /// The provider refused the request (4xx): it will refuse it again.
    #[error("HTTP {status}: {message}")]
    Refused {
        /// The HTTP status of the refusal.
        status: u16,
        /// The provider's error message (`HTTP <status>` when it gave none).
        message: String,
    },
}

impl ApiError {
    /// The `error_type` label of `batch_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::Transient(_) => "batch_api_transient",
            ApiError::Refused { .. } => "batch_api_refused",
        }
    }
}

/// A provider batch that exists.
#[derive(Debug, Clone)]
pub struct Created {
    /// The provider's id of the batch (checked plain: it goes into URLs).
    pub batch_id: String,
    /// The uploaded input file the batch reads (OpenAI kind only).
    pub input_file_id: Option<String>,
}

/// How a provider batch ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Ending {
    /// Every request ran (each may still have failed on its own).
    Completed,
    /// The provider refused the batch: per input line (1-based) reasons where it gave them,
    /// and one reason for the rest.
    Rejected {
        /// Input line number (from 1) and the provider's reason for it.
        lines: Vec<(u64, String)>,
        /// The reason given to every line not in `lines`.
        reason: String,
    },
    /// The completion window passed; requests that did not run are expired.
    Expired,
    /// Cancelled; requests that did not run are cancelled.
    Cancelled,
    /// The provider failed the batch because the account's enqueued-token queue was full
    /// (OpenAI's `token_limit_exceeded`): none of its requests ran, and none failed for
    /// their own sake. The chunk is not finished: it waits, and a batch is created for it
    /// again under a new tag generation.
    QueueFull,
}

/// One poll's answer.
#[derive(Debug, Clone)]
pub struct Polled {
    /// The provider's own status word (a metric label: bounded to the known words).
    pub status: &'static str,
    /// `None` while the provider works.
    pub ending: Option<Ending>,
    /// Files holding the results (OpenAI kind), when the batch has ended.
    pub output_file_id: Option<String>,
    /// The file of the requests that failed (OpenAI kind), when the batch has ended.
    pub error_file_id: Option<String>,
    /// The batch's input file, as the provider names it (OpenAI kind): the one a worker
    /// deletes after the fetch, never one a chunk message names.
    pub input_file_id: Option<String>,
    /// The chunk tag the batch carries (OpenAI's `metadata.fleet_tag`); `None` for a kind
    /// whose batches carry none (Anthropic's say whose they are only through their results).
    pub tag: Option<String>,
}

impl Polled {
    /// Whether the provider's batch is the chunk's (tagged `tag`): a batch of a kind that
    /// carries tags must carry this one. A chunk message naming another batch (anyone who
    /// can publish to the chunk queues could write one) must not make the worker cancel,
    /// read or delete what is not its own.
    pub fn is_chunks(&self, kind: ProviderKind, tag: &str) -> bool {
        match kind {
            ProviderKind::Openai => self.tag.as_deref() == Some(tag),
            ProviderKind::Anthropic => true,
            // Gemini's `displayName`.
            ProviderKind::Gemini => self.tag.as_deref() == Some(tag),
        }
    }
}

/// How one request of a batch ended, as a result line said.
#[derive(Debug)]
pub enum LineOutcome {
    /// The provider answered (any HTTP status).
    Answered(ResponseRecord),
    /// The request failed without an answer.
    Errored(ErrorRecord),
    /// The request did not run: the batch expired first.
    Expired,
    /// The request did not run: the batch was cancelled first.
    Cancelled,
}

/// One result line mapped back to the chunk.
#[derive(Debug)]
pub struct Fetched {
    /// The item's index in the job.
    pub index: u64,
    /// How its request ended.
    pub outcome: LineOutcome,
}

/// The prefix of the custom ids of a chunk's requests at the provider: the chunk's tag,
/// hashed to fit Anthropic's `[A-Za-z0-9_-]{1,64}`. Unique per chunk, so no two batches
/// ever hold the same custom id, and an Anthropic batch (which has no metadata) says whose
/// it is through its results.
pub fn custom_id_prefix(namespace: &str, chunk: &ChunkTask) -> String {
    format!("t{:016x}-", xxhash_rust::xxh3::xxh3_64(chunk.tag(namespace).as_bytes()))
}

/// The custom id a request of the chunk gets at the provider: the chunk's prefix and the
/// item's index, so a result line maps back to exactly one item of the chunk (the user's
/// custom ids are restored from the job's items).
pub fn provider_custom_id(prefix: &str, index: u64) -> String {
    format!("{prefix}i{index}")
}

/// The index a provider custom id names, if it is one of ours and inside the job (a
/// chunk's items need not be contiguous: which indices are the chunk's is decided by the
/// caller, against the items it read).
pub fn index_of(prefix: &str, custom_id: &str, chunk: &ChunkTask) -> Option<u64> {
    let index: u64 = custom_id.strip_prefix(prefix)?.strip_prefix('i')?.parse().ok()?;
    (index < chunk.total).then_some(index)
}

/// A provider's batch API.
pub enum BatchApi<'a> {
    /// An OpenAI-kind provider: Files and Batch API.
    Openai(openai::Openai<'a>),
    /// An Anthropic-kind provider: Message Batches API.
    Anthropic(anthropic::Anthropic<'a>),
    /// A Gemini-kind provider: batches of inline requests.
    Gemini(gemini::Gemini<'a>),
}

impl<'a> BatchApi<'a> {
    /// The batch API of `client`'s provider kind, called with the key at `key` of its pool;
    /// `namespace` goes into the chunks' tags.
    pub fn new(client: &'a ProviderClient, namespace: &'a str, key: usize) -> BatchApi<'a> {
        let http = Http { client, key };
        match client.kind() {
            ProviderKind::Openai => BatchApi::Openai(openai::Openai { http, namespace }),
            ProviderKind::Anthropic => BatchApi::Anthropic(anthropic::Anthropic { http, namespace }),
            ProviderKind::Gemini => BatchApi::Gemini(gemini::Gemini { http, namespace }),
        }
    }

    /// Estimated tokens of the fleet's provider batches in progress (validating, in progress,
    /// finalizing, cancelling), as their creators recorded them: what the provider's
    /// enqueued-token queue holds of ours. `None` for a kind whose batches cannot say (the
    /// chunk is then admitted without a budget check).
    pub async fn enqueued_tokens(&self) -> Result<Option<u64>, ApiError> {
        match self {
            BatchApi::Openai(a) => a.enqueued_tokens().await.map(Some),
            #[allow(unreachable_patterns)] // other kinds record no tokens
            _ => Ok(None),
        }
    }

    /// The batch created for this chunk before, if the provider has one.
    pub async fn find(&self, chunk: &ChunkTask) -> Result<Option<Created>, ApiError> {
        match self {
            BatchApi::Openai(a) => a.find(chunk).await,
            BatchApi::Anthropic(a) => a.find(chunk).await,
            BatchApi::Gemini(a) => a.find(chunk).await,
        }
    }

    /// Creates the chunk's provider batch from its items.
    pub async fn create(&self, chunk: &ChunkTask, items: &[Item]) -> Result<Created, ApiError> {
        match self {
            BatchApi::Openai(a) => a.create(chunk, items).await,
            BatchApi::Anthropic(a) => a.create(chunk, items).await,
            BatchApi::Gemini(a) => a.create(chunk, items).await,
        }
    }

    /// Asks the provider how the batch is doing.
    pub async fn poll(&self, batch_id: &str) -> Result<Polled, ApiError> {
        match self {
            BatchApi::Openai(a) => a.poll(batch_id).await,
            BatchApi::Anthropic(a) => a.poll(batch_id).await,
            BatchApi::Gemini(a) => a.poll(batch_id).await,
        }
    }

    /// Asks the provider to cancel the batch; requests that have not run end cancelled.
    pub async fn cancel(&self, batch_id: &str) -> Result<(), ApiError> {
        match self {
            BatchApi::Openai(a) => a.cancel(batch_id).await,
            BatchApi::Anthropic(a) => a.cancel(batch_id).await,
            BatchApi::Gemini(a) => a.cancel(batch_id).await,
        }
    }

    /// Reads every result line of an ended batch, calling `each` with the ones that map to
    /// an item of the chunk. `order`: the indices of the items put in the batch, in request
    /// order (Gemini's inline responses may be placed by position).
    pub async fn fetch(
        &self,
        chunk: &ChunkTask,
        batch_id: &str,
        polled: &Polled,
        order: &[u64],
        each: &mut (dyn FnMut(Fetched) + Send),
    ) -> Result<(), ApiError> {
        match self {
            BatchApi::Openai(a) => a.fetch(chunk, polled, each).await,
            BatchApi::Anthropic(a) => a.fetch(chunk, batch_id, each).await,
            BatchApi::Gemini(a) => a.fetch(chunk, batch_id, order, each).await,
        }
    }

    /// Deletes what the batch left at the provider that is ours to delete (OpenAI's input
    /// and result files, the Gemini batch itself). Best effort: a failure is logged, never
    /// retried forever.
    pub async fn clean_up(&self, polled: &Polled) {
        match self {
            BatchApi::Openai(a) => a.clean_up(polled).await,
            BatchApi::Gemini(a) => a.clean_up(polled).await,
            BatchApi::Anthropic(_) => {}
        }
    }
}

/// HTTP calls to the provider's batch API, timed into
/// `batch_provider_latency_seconds{operation}` and classified into [`ApiError`].
pub struct Http<'a> {
    /// The provider's client: its base URL, keys and metrics.
    pub client: &'a ProviderClient,
    /// The pool's index of the key every call is made with (see [`BatchApi::new`]).
    pub key: usize,
}

impl Http<'_> {
    /// A request to one of the batch API's paths, with the key of this chunk's batch.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client.batch_request(self.key, method, path)
    }

    /// Sends `req` and parses a JSON answer of at most `max_response_bytes`.
    pub async fn json<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder, op: &str) -> Result<T, ApiError> {
        let bytes = self.send(req, op).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::Transient(format!("{op}: the provider's answer is not the expected JSON: {e}")))
    }

    /// Sends `req`; the body of a 2xx answer, capped.
    pub async fn send(&self, req: reqwest::RequestBuilder, op: &str) -> Result<Bytes, ApiError> {
        let started = Instant::now();
        let result = self.send_untimed(req, op).await;
        self.observe(op, started);
        if let Err(e) = &result {
            self.count_error(e, op);
        }
        result
    }

    /// Counts a failed call in `batch_errors_total{error_type, operation}`.
    pub fn count_error(&self, e: &ApiError, op: &str) {
        self.client.metrics().errors.with_label_values(&[&self.client.name, e.kind(), operation(op)]).inc();
    }

    async fn send_untimed(&self, req: reqwest::RequestBuilder, op: &str) -> Result<Bytes, ApiError> {
        let resp = self.response_uncounted(req, op).await?;
        let limit = self.client.max_response_bytes();
        match crate::provider::read_capped(resp, limit).await {
            Ok(Some(b)) => Ok(b),
            Ok(None) => Err(ApiError::Transient(format!("{op}: answer over {limit} bytes"))),
            Err(e) => Err(ApiError::Transient(format!("{op}: {}", e.without_url()))),
        }
    }

    /// Sends `req` and returns a 2xx response unread (for streaming result files).
    pub async fn response(&self, req: reqwest::RequestBuilder, op: &str) -> Result<reqwest::Response, ApiError> {
        let result = self.response_uncounted(req, op).await;
        if let Err(e) = &result {
            self.count_error(e, op);
        }
        result
    }

    async fn response_uncounted(&self, req: reqwest::RequestBuilder, op: &str) -> Result<reqwest::Response, ApiError> {
        let resp = req.send().await.map_err(|e| ApiError::Transient(format!("{op}: {}", e.without_url())))?;
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(resp);
        }
        let body = crate::provider::read_capped(resp, 64 * 1024).await.ok().flatten().unwrap_or_default();
        let message = error_message(&body).unwrap_or_else(|| format!("HTTP {status}"));
        match status {
            408 | 409 | 425 | 429 | 500..=599 => Err(ApiError::Transient(format!("{op}: HTTP {status}: {message}"))),
            _ => Err(ApiError::Refused { status, message }),
        }
    }

    /// Records one call's latency under `operation` = submit|poll|fetch|cancel.
    pub fn observe(&self, op: &str, started: Instant) {
        self.client
            .metrics()
            .provider_latency
            .with_label_values(&[&self.client.name, operation(op)])
            .observe(started.elapsed().as_secs_f64());
    }
}

/// The `operation` label of a batch API call: `submit` (upload, create, and the lists and
/// reads that look for a chunk's batch or sum the batches in progress for admission),
/// `poll`, `fetch` (result downloads, deletes), `cancel`.
fn operation(op: &str) -> &'static str {
    match op {
        "upload" | "create" | "find" | "admission" => "submit",
        "retrieve" => "poll",
        "cancel" => "cancel",
        _ => "fetch",
    }
}

/// `error.message` of an OpenAI or Anthropic error body, cut to a bound.
fn error_message(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v["error"]["message"].as_str().map(|m| bounded(m, 500))
}

/// `s` cut to at most `max` characters (provider text going into results and logs).
pub fn bounded(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// Reads a streamed body line by line (each at most [`MAX_LINE_BYTES`]), calling `each`
/// with every non-blank line. A longer line is skipped (its item then ends as missing).
pub async fn for_each_line(mut resp: reqwest::Response, mut each: impl FnMut(&[u8])) -> Result<(), ApiError> {
    let mut buf: Vec<u8> = Vec::new();
    let mut skipping = false;
    loop {
        let chunk = resp.chunk().await.map_err(|e| ApiError::Transient(format!("fetch: {}", e.without_url())))?;
        let Some(chunk) = chunk else { break };
        let mut rest: &[u8] = &chunk;
        while let Some(nl) = rest.iter().position(|b| *b == b'\n') {
            if !skipping {
                buf.extend_from_slice(&rest[..nl]);
                if !buf.trim_ascii().is_empty() {
                    each(buf.trim_ascii());
                }
            }
            buf.clear();
            skipping = false;
            rest = &rest[nl + 1..];
        }
        if !skipping {
            buf.extend_from_slice(rest);
            if buf.len() > MAX_LINE_BYTES {
                buf.clear();
                skipping = true;
            }
        }
    }
    if !skipping && !buf.trim_ascii().is_empty() {
        each(buf.trim_ascii());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_custom_ids_inside_the_job_map_to_items() {
        let chunk: ChunkTask = serde_json::from_value(serde_json::json!({
            "job_id": "j", "provider": "p", "chunk": 1, "start": 10, "end": 20, "total": 30,
            "submitted_at_ms": 0, "state": "pending"
        }))
        .unwrap();
        assert_eq!(index_of("", &provider_custom_id("", 12), &chunk), Some(12));
        assert_eq!(index_of("t-", "t-i19", &chunk), Some(19));
        assert_eq!(index_of("", "i9", &chunk), Some(9), "the caller decides which indices are the chunk's");
        for bad in ["i30", "i99", "i-1", "x12", "i1e1", "i", "", "t-i12"] {
            assert_eq!(index_of("", bad, &chunk), None, "{bad}");
        }
    }
}
