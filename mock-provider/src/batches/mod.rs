//! Owns the providers' batch APIs, in their documented shapes:
//!
//! - OpenAI Files: `POST /v1/files` (multipart, purpose `batch`), `GET /v1/files/{id}`,
//!   `GET /v1/files/{id}/content`, `DELETE /v1/files/{id}` ([`files`]);
//! - OpenAI Batch: `POST /v1/batches`, `GET /v1/batches` (`after`, `limit`),
//!   `GET /v1/batches/{id}`, `POST /v1/batches/{id}/cancel` ([`openai`]);
//! - Anthropic Message Batches: `POST /v1/messages/batches`, `GET /v1/messages/batches`
//!   (`before_id`, `after_id`, `limit`), `GET /v1/messages/batches/{id}`,
//!   `GET /v1/messages/batches/{id}/results`, `POST /v1/messages/batches/{id}/cancel`
//!   ([`anthropic`]);
//! - Gemini Batch (inline requests): `POST /v1beta/models/{model}:batchGenerateContent`
//!   (routed by `crate::gemini`), `GET /v1beta/batches` (`pageSize`, `pageToken`),
//!   `GET` / `DELETE /v1beta/batches/{id}`, `POST /v1beta/batches/{id}:cancel` ([`gemini`]).
//!
//! Every line of a batch is answered, when the batch is created, by the online answer logic,
//! so the same request gets the same body online and in a batch. When the batch is seen to
//! end, its output (files, or results) is assembled from those answers and the batch's
//! [`lifecycle`]. What both APIs do alike (retrieve, cancel, list, admitting a new batch) is
//! written once in [`shared`]. The knobs ([`BatchKnobs`]) set the time to complete, per-line
//! errors, rejection, expiry, how much a cut-short batch keeps and an enqueued-token limit
//! (OpenAI's `token_limit_exceeded`); `/stats` counts what was created ([`counters`]). Everything a client sends is bounded: upload and body sizes, lines
//! per batch, batches and files kept, bytes stored.
//!
//! The fault knobs of the online endpoints (error rates, latency, rpm) do not apply here.

mod anthropic;
mod counters;
mod files;
pub(crate) mod gemini;
mod lifecycle;
mod lines;
mod openai;
mod registry;
mod shared;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use axum::Router;
use rand::rngs::StdRng;
use rand::SeedableRng;

pub use counters::BatchStats;

use crate::knobs::parse_rate;

/// Request numbers of batch lines start here, far above any online request number, so the
/// response ids of a batch (`chatcmpl-N`, `msg_N`) never repeat an online answer's.
const FIRST_LINE_NUMBER: u64 = 1 << 40;

/// The provider-batch knobs (part of [`crate::Knobs`]).
#[derive(clap::Args, Clone, Debug)]
pub struct BatchKnobs {
    /// Milliseconds from creating a provider batch until it has ended (validating, in
    /// progress and finalizing in between; see `batches::lifecycle`). 0 ends it at once.
    #[arg(long, env = "MOCK_BATCH_COMPLETE_MS", default_value_t = 2000)]
    pub batch_complete_ms: u64,

    /// Fraction of the lines of a batch answered with an error (500 `server_error`, or an
    /// Anthropic `errored` result of type `api_error`) instead of their answer.
    #[arg(long, env = "MOCK_BATCH_LINE_ERROR_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub batch_line_error_rate: f64,

    /// Fraction of batches rejected by validation: an OpenAI batch ends `failed` with an error
    /// on its last line; an Anthropic create is answered 400 naming its last request.
    #[arg(long, env = "MOCK_BATCH_REJECT_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub batch_reject_rate: f64,

    /// Fraction of batches that expire instead of completing: only the `--batch-partial`
    /// fraction of their lines is answered, the rest is `batch_expired` / `expired`.
    #[arg(long, env = "MOCK_BATCH_EXPIRE_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub batch_expire_rate: f64,

    /// Fraction of a batch's lines (the first ones) answered when it is cut short by a cancel
    /// or by expiry; a cancelled batch keeps more if more were answered already.
    #[arg(long, env = "MOCK_BATCH_PARTIAL", default_value_t = 0.5, value_parser = parse_rate)]
    pub batch_partial: f64,

    /// Most batches kept per API, and most files kept; when full, the oldest ended batch is
    /// forgotten, and a create with none ended (or an upload) is refused.
    #[arg(long, env = "MOCK_BATCH_KEEP", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_keep: u64,

    /// Most bytes of files and batch results held in memory; an upload or a create that
    /// would go beyond it is refused.
    #[arg(long, env = "MOCK_BATCH_STORE_BYTES", default_value_t = 1 << 30)]
    pub batch_store_bytes: u64,

    /// The account's enqueued-token limit of OpenAI batches (0: none). A batch whose tokens
    /// (`fleet::tokens::estimate_request_tokens` of each request), added to those of the
    /// batches in progress, go beyond it is accepted, then ends `failed` with
    /// `errors.data[0].code = "token_limit_exceeded"`, as OpenAI reports a full queue.
    #[arg(long, env = "MOCK_BATCH_ENQUEUED_TOKENS", default_value_t = 0)]
    pub batch_enqueued_tokens: u64,
}

impl Default for BatchKnobs {
    /// The command-line defaults.
    fn default() -> Self {
        Self {
            batch_complete_ms: 2000,
            batch_line_error_rate: 0.0,
            batch_reject_rate: 0.0,
            batch_expire_rate: 0.0,
            batch_partial: 0.5,
            batch_keep: 1000,
            batch_store_bytes: 1 << 30,
            batch_enqueued_tokens: 0,
        }
    }
}

/// The batch APIs' shared state.
#[derive(Debug)]
pub(crate) struct Batches {
    knobs: BatchKnobs,
    seed: u64,
    /// One lock for files, batches and counters: every critical section is short (the heavy
    /// parsing and answering happen before it is taken), and one lock cannot deadlock.
    inner: Mutex<Inner>,
    next_line: AtomicU64,
}

#[derive(Debug)]
struct Inner {
    next_seq: u64,
    files: files::FileStore,
    openai: registry::Registry<openai::Batch>,
    anthropic: registry::Registry<anthropic::Batch>,
    gemini: registry::Registry<gemini::Batch>,
    counters: counters::Counters,
    ids: Ids,
}

/// The id minters of every kind of object.
#[derive(Debug)]
struct Ids {
    file: registry::Ids,
    batch: registry::Ids,
    message_batch: registry::Ids,
    gemini_batch: registry::Ids,
}

impl Batches {
    pub(crate) fn new(knobs: &BatchKnobs, seed: u64) -> Self {
        let keep = usize::try_from(knobs.batch_keep).unwrap_or(usize::MAX);
        let salt: u32 = rand::random();
        Self {
            knobs: knobs.clone(),
            seed,
            inner: Mutex::new(Inner {
                next_seq: 1,
                files: files::FileStore::new(keep, knobs.batch_store_bytes),
                openai: registry::Registry::new(keep),
                anthropic: registry::Registry::new(keep),
                gemini: registry::Registry::new(keep),
                counters: counters::Counters::default(),
                ids: Ids {
                    file: registry::Ids::new("file-", salt),
                    batch: registry::Ids::new("batch_", salt),
                    message_batch: registry::Ids::new("msgbatch_", salt),
                    gemini_batch: registry::Ids::new("g", salt),
                },
            }),
            next_line: AtomicU64::new(FIRST_LINE_NUMBER),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every mutation under this lock leaves the state consistent before anything that
        // could panic, so a poisoned lock is simply reused.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The batch counters for `/stats`.
    pub(crate) fn stats(&self) -> BatchStats {
        let inner = self.lock();
        inner.counters.snapshot(inner.files.count(), inner.files.bytes())
    }

    /// Zeroes the batch counters (what is stored stays).
    pub(crate) fn reset_stats(&self) {
        self.lock().counters.reset();
    }

    fn complete_in(&self) -> Duration {
        Duration::from_millis(self.knobs.batch_complete_ms)
    }

    /// The random generator of batch number `seq`: seeded from the knobs' seed and the
    /// batch's number, so its fate and failed lines do not depend on other batches' timing.
    fn rng(&self, seq: u64) -> StdRng {
        StdRng::seed_from_u64(self.seed ^ seq.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    /// Reserves `count` consecutive line numbers and returns the first.
    fn line_numbers(&self, count: usize) -> u64 {
        self.next_line.fetch_add(count as u64, std::sync::atomic::Ordering::Relaxed)
    }
}

impl Inner {
    fn next_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }
}

/// The routes of the batch APIs, for the server's router.
pub(crate) fn router<S>(batches: Arc<Batches>) -> Router<S> {
    Router::new()
        .merge(files::routes())
        .merge(openai::routes())
        .merge(anthropic::routes())
        .merge(gemini::routes())
        .with_state(batches)
}

/// Which API family an error answer follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    OpenAi,
    Anthropic,
    /// Google's `{"error": {"code", "message", "status"}}`.
    Gemini,
}

/// An error answer, in its API family's shape.
#[derive(Debug)]
struct ApiError {
    family: Family,
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(family: Family, status: StatusCode, message: impl Into<String>) -> Self {
        Self { family, status, message: message.into() }
    }

    fn invalid(family: Family, message: impl Into<String>) -> Self {
        Self::new(family, StatusCode::BAD_REQUEST, message)
    }

    fn not_found(family: Family, what: &str, id: &str) -> Self {
        // The id is echoed shortened: it came from the client and may be anything.
        let id: String = id.chars().take(64).collect();
        Self::new(family, StatusCode::NOT_FOUND, format!("No such {what}: '{id}'"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match self.family {
            Family::OpenAi => serde_json::json!({"error": {
                "message": self.message,
                "type": if self.status.is_server_error() { "server_error" } else { "invalid_request_error" },
                "param": null,
                "code": null,
            }}),
            Family::Anthropic => {
                let kind = match self.status {
                    StatusCode::NOT_FOUND => "not_found_error",
                    StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
                    StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
                    s if s.is_server_error() => "api_error",
                    _ => "invalid_request_error",
                };
                serde_json::json!({"type": "error", "error": {"type": kind, "message": self.message}})
            }
            Family::Gemini => {
                let body = crate::gemini::error_body(self.status.as_u16(), &self.message, None);
                return (self.status, [(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response();
            }
        };
        (self.status, Json(body)).into_response()
    }
}

/// Unix milliseconds now.
fn unix_ms_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// The reason given by a rejection of the `--batch-reject-rate` knob.
const INJECTED_REJECTION: &str = "mock-provider: injected validation failure";

/// How long a provider keeps a batch running before it expires: the completion window.
const COMPLETION_WINDOW: Duration = Duration::from_secs(24 * 3600);
