//! The wire format: what travels on the queues, and the OpenAI Batch API line formats the
//! user reads and writes.
//!
//! Request and response bodies are carried as [`RawValue`]: the fleet passes them through
//! unchanged and never pays for parsing them into a tree.
//!
//! Every message that travels on a queue carries its wire version (`"v": "1.1"`, see
//! [`version`]): the types below marked `#[serde(remote = "Self")]` get their serde impls
//! from [`crate::versioned!`].

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

pub mod version;
pub use version::{serialize_versioned, Unsupported, Unversioned, VersionChecked, WireVersion};

/// AMQP `type` property of a message on a results queue carrying an [`ItemResult`].
pub const KIND_RESULT: &str = "result";
/// AMQP `type` property of a message on a results queue carrying a [`ResultGroup`]: the
/// results of several items of one job from one worker, in one broker message.
pub const KIND_RESULTS: &str = "results";
/// AMQP `type` property of a message on a results queue carrying a [`JobSummary`].
pub const KIND_JOB_FINISHED: &str = "job_finished";

/// Longest accepted job id, in bytes. A job id is an AMQP routing key and part of a queue
/// name, both AMQP short strings of at most 255 bytes, so it must leave room for the
/// `<namespace>.results.` prefix; ids the producer makes are 20 bytes.
pub const MAX_JOB_ID_BYTES: usize = 128;

/// Most items one job may have. The tracker keeps one bit per item of a job in progress,
/// so a message claiming more must not be able to make it allocate more (6 MiB per job).
pub const MAX_JOB_ITEMS: u64 = 50_000_000;

/// Longest `custom_id`, in bytes (the producer's validation enforces the same bound).
pub const MAX_CUSTOM_ID_BYTES: usize = 512;

/// Why a message read from a queue is not acceptable although it parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// The job id is the empty string.
    #[error("job id is empty")]
    EmptyJobId,
    /// The job id is longer than [`MAX_JOB_ID_BYTES`]; holds its length in bytes.
    #[error("job id is {0} bytes long (at most {MAX_JOB_ID_BYTES})")]
    JobIdTooLong(usize),
    /// The job id holds a control character (a newline, a NUL, ...).
    #[error("job id contains a control character")]
    JobIdControl,
    /// The job's item count is 0 or over [`MAX_JOB_ITEMS`]; holds the count claimed.
    #[error("job total {0} is not between 1 and {MAX_JOB_ITEMS}")]
    Total(u64),
    /// An item's index is not below its job's item count.
    #[error("index {index} is not below the job's total {total}")]
    Index {
        /// The index claimed (from 0).
        index: u64,
        /// The job's item count claimed with it.
        total: u64,
    },
    /// A `custom_id` is longer than [`MAX_CUSTOM_ID_BYTES`]; holds its length in bytes.
    #[error("custom_id is {0} bytes long (at most {MAX_CUSTOM_ID_BYTES})")]
    CustomIdTooLong(usize),
    /// A job opening's priority is not between 1 and [`MAX_PRIORITY`]; holds the priority.
    #[error("priority {0} is not between 1 and {MAX_PRIORITY}")]
    Priority(u32),
    /// A job opening's id holds a character other than an ASCII letter, a digit, `_` or
    /// `-`: the id ends the name of a queue workers consume, and a dot could name another.
    #[error("a job with its own items queue needs an id of letters, digits, '_' and '-'")]
    JobIdNotAQueueName,
    /// A result group carries more than [`MAX_GROUP_RESULTS`] results; holds how many.
    #[error("a result group of {0} results (at most {MAX_GROUP_RESULTS})")]
    GroupTooLarge(usize),
}

/// Checks a job id given on a command line or read from a queue.
pub fn check_job_id(job_id: &str) -> Result<(), Invalid> {
    if job_id.is_empty() {
        return Err(Invalid::EmptyJobId);
    }
    if job_id.len() > MAX_JOB_ID_BYTES {
        return Err(Invalid::JobIdTooLong(job_id.len()));
    }
    if job_id.chars().any(char::is_control) {
        return Err(Invalid::JobIdControl);
    }
    Ok(())
}

fn check_position(index: u64, total: u64) -> Result<(), Invalid> {
    if total == 0 || total > MAX_JOB_ITEMS {
        return Err(Invalid::Total(total));
    }
    if index >= total {
        return Err(Invalid::Index { index, total });
    }
    Ok(())
}

/// Whether a request body asks for a streamed answer (`"stream": true` at its top level).
/// A streamed answer is a sequence of events, not the JSON document the output file needs.
/// A body that is not a JSON object does not ask (other checks refuse it).
pub fn asks_to_stream(body: &RawValue) -> bool {
    serde_json::from_str::<StreamFlag>(body.get()).is_ok_and(|f| f.0)
}

/// Reads only the top-level `stream` key of a body, skipping everything else without
/// building it; `true` if any `stream` key (JSON allows duplicates) is `true`, so no
/// parser's choice among duplicates can turn streaming on behind the check.
struct StreamFlag(bool);

impl<'de> Deserialize<'de> for StreamFlag {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = StreamFlag;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<StreamFlag, A::Error> {
                let mut streams = false;
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if key == "stream" {
                        streams |= map.next_value::<serde_json::Value>()? == serde_json::Value::Bool(true);
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                Ok(StreamFlag(streams))
            }
        }
        d.deserialize_map(Keys)
    }
}

/// One line of an OpenAI Batch API input file.
#[derive(Debug, Deserialize)]
pub struct BatchInputLine {
    /// The user's name for the request, copied to its output line (the producer refuses an
    /// empty one and one over [`MAX_CUSTOM_ID_BYTES`]).
    pub custom_id: String,
    /// HTTP method; the producer accepts only `POST`.
    pub method: String,
    /// Path of the endpoint, e.g. `/v1/chat/completions`; the producer refuses one the
    /// provider's kind does not serve (see [`crate::endpoint`]).
    pub url: String,
    /// The request body (an Anthropic line's `params`): a JSON object, sent to the provider
    /// unchanged.
    pub body: Box<RawValue>,
}

/// One request of a job, as queued on its job's items queue `<ns>.items.<provider>.<job>`
/// (or the provider's shared `<ns>.items.<provider>`: `dead --requeue`, earlier producers).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(remote = "Self")]
pub struct Item {
    /// The job the item belongs to; also the routing key of its job's items queue and of
    /// its result.
    pub job_id: String,
    /// Position of the line in the input file, from 0: the dedup key within a job.
    pub index: u64,
    /// Number of items in the job, so whoever collects results knows when it has all.
    pub total: u64,
    /// The input line's `custom_id`, copied to the item's result; at most
    /// [`MAX_CUSTOM_ID_BYTES`].
    pub custom_id: String,
    /// Name of the provider to call (a key of the config's `providers`).
    pub provider: String,
    /// Path of the endpoint, e.g. `/v1/chat/completions`.
    pub url: String,
    /// The request body, sent to the provider unchanged.
    pub body: Box<RawValue>,
    /// Times this item went through a delay queue (long-outage retries).
    #[serde(default)]
    pub attempt: u32,
    /// When the job was submitted, ms since the Unix epoch: the same for every item of the
    /// job, kept when a submission is resumed.
    pub submitted_at_ms: u64,
    /// After this instant the item ends `expired` instead of being called.
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    /// When the item was first sent to a delay queue (the long-retry budget starts there).
    #[serde(default)]
    pub first_delay_ms: Option<u64>,
    /// A `--mode flex` item: called on the provider's flex tier (the worker adds
    /// `"service_tier": "flex"` to the body it sends, one call per delivery, with
    /// `flex_timeout_s`), its answer priced at the model's flex factor.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub flex: bool,
}
crate::versioned!(Item);

impl Item {
    /// Bounds a worker checks before trusting an item read from a queue (the endpoint is
    /// checked against the provider's kind separately, see [`crate::endpoint`]).
    pub fn check(&self) -> Result<(), Invalid> {
        check_job_id(&self.job_id)?;
        check_position(self.index, self.total)?;
        if self.custom_id.len() > MAX_CUSTOM_ID_BYTES {
            return Err(Invalid::CustomIdTooLong(self.custom_id.len()));
        }
        Ok(())
    }
}

/// A message on the control stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(remote = "Self", tag = "type", rename_all = "snake_case")]
pub enum ControlMessage {
    /// Cancel a job: workers end its items not yet called `cancelled` (published by
    /// `producer cancel`, and by the tracker when the job's spend reaches its cap).
    CancelJob {
        /// The job to cancel.
        job_id: String,
        /// Why, when not the user's `producer cancel` (e.g. [`REASON_BUDGET`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A job's items queue exists (published by `submit` before its first item): workers
    /// serving the provider start consuming it, with a share weighted by `priority`.
    JobOpened {
        /// The job whose queue opened (`<ns>.items.<provider>.<job>`): ASCII letters,
        /// digits, `_` and `-` only.
        job_id: String,
        /// Name of the provider the job's items are for.
        provider: String,
        /// The job's weight, 1 to [`MAX_PRIORITY`] (`submit --priority`;
        /// [`DEFAULT_PRIORITY`] when absent).
        #[serde(default = "default_priority")]
        priority: u32,
    },
    /// The job ended and its items queue is deleted (published by the tracker).
    JobClosed {
        /// The job that ended: workers stop consuming its items queue.
        job_id: String,
    },
    /// Written by a worker before it starts consuming items; reading its own marker back
    /// proves it has read every cancel published before.
    Marker {
        /// A random id (a UUID) the worker waits to read back.
        id: String,
    },
}
crate::versioned!(ControlMessage);

/// Weight of a job that names none: every job gets an equal share of its provider.
pub const DEFAULT_PRIORITY: u32 = 1;
/// Highest weight (`submit --priority`): a job gets at most this many shares.
pub const MAX_PRIORITY: u32 = 10;

fn default_priority() -> u32 {
    DEFAULT_PRIORITY
}

/// Reason of a job cancelled because its spend reached `submit --max-cost`.
pub const REASON_BUDGET: &str = "budget";

/// How an item ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemStatus {
    /// The provider answered with a 2xx status: the answer is the item's output.
    Succeeded,
    /// No usable answer: the provider refused the request or kept failing, or the item was
    /// poison or dead-lettered.
    Failed,
    /// The item's job was cancelled before the item got an answer.
    Cancelled,
    /// The job's deadline passed before the item got an answer.
    Expired,
}

impl ItemStatus {
    /// Every item status, as `batch_items_total` labels them.
    pub const ALL: [ItemStatus; 4] =
        [ItemStatus::Succeeded, ItemStatus::Failed, ItemStatus::Cancelled, ItemStatus::Expired];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ItemStatus::Succeeded => "succeeded",
            ItemStatus::Failed => "failed",
            ItemStatus::Cancelled => "cancelled",
            ItemStatus::Expired => "expired",
        }
    }
}

/// The provider's HTTP answer, as recorded in the output file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResponseRecord {
    /// HTTP status of the provider's answer.
    pub status_code: u16,
    /// The provider's id for the request (from a header such as `x-request-id`, or the
    /// batch API's output line); empty when it gave none.
    pub request_id: String,
    /// The answer's JSON body, as the provider sent it.
    pub body: Box<RawValue>,
}

/// Why an item did not succeed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorRecord {
    /// A stable machine-readable code, one of [`error_code::ALL`].
    pub code: String,
    /// What went wrong, for people (the provider's or the worker's words); match on
    /// `code`, not on this.
    pub message: String,
}

/// The codes of [`ErrorRecord::code`]: what users match on in an output file's `error`.
pub mod error_code {
    /// The provider answered 429 (or 408/409/425) until the retry budget was spent.
    pub const RATE_LIMITED: &str = "rate_limited";
    /// The provider answered 503/529 until the retry budget was spent.
    pub const OVERLOADED: &str = "overloaded";
    /// The provider answered another 5xx until the retry budget was spent.
    pub const SERVER_ERROR: &str = "server_error";
    /// Every call timed out.
    pub const TIMEOUT: &str = "timeout";
    /// Every call failed to connect.
    pub const CONNECTION: &str = "connection";
    /// A 2xx answer that is not JSON (or has no body).
    pub const INVALID_RESPONSE: &str = "invalid_response";
    /// The provider refused the request (a 4xx): its answer is in the line's `response`.
    pub const CLIENT_ERROR: &str = "client_error";
    /// The provider answered with a redirect, which is never followed.
    pub const REDIRECT: &str = "redirect";
    /// The answer was over `providers.<name>.max_response_bytes`.
    pub const RESPONSE_TOO_LARGE: &str = "response_too_large";
    /// The provider rejected the key of a call (retried with another key).
    pub const KEY_REJECTED: &str = "key_rejected";
    /// Every key of the provider was rejected (the item waits for a worker whose keys work).
    pub const API_KEYS_REJECTED: &str = "api_keys_rejected";
    /// The job stopped wanting the item while it waited to be called.
    pub const UNWANTED: &str = "unwanted";
    /// The job was cancelled before the item was called (also its status).
    pub const CANCELLED: &str = "cancelled";
    /// The job's deadline passed before the item was called (also its status).
    pub const EXPIRED: &str = "expired";
    /// The item kept killing workers: delivered more often than `amqp.delivery_limit`.
    pub const POISON: &str = "poison";
    /// The broker dead-lettered the item (its delivery limit, an alternate exchange).
    pub const DEAD_LETTERED: &str = "dead_lettered";
    /// The body asks for `"stream": true`, which the fleet cannot collect.
    pub const STREAM_NOT_SUPPORTED: &str = "stream_not_supported";
    /// A batch-mode item the worker could not read from the job's items stream.
    pub const MISSING_ITEM: &str = "missing_item";
    /// The provider refused the whole batch (its reason in the message).
    pub const BATCH_REJECTED: &str = "batch_rejected";
    /// A batch-mode item that cannot go into its chunk's provider batch.
    pub const NOT_BATCHABLE: &str = "not_batchable";
    /// The provider's batch completed without a line for this request.
    pub const MISSING_FROM_BATCH_OUTPUT: &str = "missing_from_batch_output";
    /// A provider batch's line with an error status and no usable body.
    pub const PROVIDER_ERROR: &str = "provider_error";
    /// The provider's flex tier had no capacity (a 429 "resource unavailable", a 498
    /// `capacity_exceeded`) until the item's delays were spent.
    pub const CAPACITY_UNAVAILABLE: &str = "capacity_unavailable";
    /// A flex item on a provider whose kind has no flex tier (only the producer refuses
    /// these; a worker fails one without a call).
    pub const FLEX_NOT_SUPPORTED: &str = "flex_not_supported";

    /// Every code, as the docs list them.
    pub const ALL: [&str; 24] = [
        RATE_LIMITED,
        OVERLOADED,
        SERVER_ERROR,
        TIMEOUT,
        CONNECTION,
        INVALID_RESPONSE,
        CLIENT_ERROR,
        REDIRECT,
        RESPONSE_TOO_LARGE,
        KEY_REJECTED,
        API_KEYS_REJECTED,
        UNWANTED,
        CANCELLED,
        EXPIRED,
        POISON,
        DEAD_LETTERED,
        STREAM_NOT_SUPPORTED,
        MISSING_ITEM,
        BATCH_REJECTED,
        NOT_BATCHABLE,
        MISSING_FROM_BATCH_OUTPUT,
        PROVIDER_ERROR,
        CAPACITY_UNAVAILABLE,
        FLEX_NOT_SUPPORTED,
    ];
}

/// The outcome of one item, published to `<ns>.results` with the job id as routing key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(remote = "Self")]
pub struct ItemResult {
    /// The item's job; the result is published with it as routing key.
    pub job_id: String,
    /// The item's position in the input file, from 0 (as [`Item::index`]).
    pub index: u64,
    /// Number of items in the job (as [`Item::total`]).
    pub total: u64,
    /// The input line's `custom_id`, written to the output line.
    pub custom_id: String,
    /// Name of the provider the item was for.
    pub provider: String,
    /// How the item ended.
    pub status: ItemStatus,
    /// The provider's answer, when there was one (a failure may have one: a 4xx or 5xx).
    pub response: Option<ResponseRecord>,
    /// Why the item did not succeed; absent on success, and may be absent on a failure
    /// whose `response` says why.
    pub error: Option<ErrorRecord>,
    /// Provider calls made for this item (0 when none was made).
    pub attempts: u32,
    /// Id of the worker that ended the item (`worker.id`; the active tracker's for an item
    /// it ended as a dead letter).
    pub worker: String,
    /// When the item ended, ms since the Unix epoch (the writer's clock).
    pub finished_at_ms: u64,
    /// The request of an item that did not succeed, so that `producer retry` can submit it
    /// again from the job's results alone (the input file may be long gone, as a hosted
    /// batch API's input file may be). Not part of the output line; absent on successes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<RequestRecord>,
    /// Tokens the provider reported for the answer (absent without an answer, or when the
    /// answer reports none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<crate::usage::Usage>,
}
crate::versioned!(ItemResult);

/// The original request of an item, as its input line had it (the method is always POST).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Path of the endpoint, as [`Item::url`].
    pub url: String,
    /// The request body, unchanged.
    pub body: Box<RawValue>,
}

impl RequestRecord {
    /// The request of `item`, kept with a result that did not succeed.
    pub fn of(item: &Item) -> RequestRecord {
        RequestRecord { url: item.url.clone(), body: item.body.clone() }
    }
}

impl ItemResult {
    /// Bounds a collector or the tracker checks before trusting a result read from a queue.
    pub fn check(&self) -> Result<(), Invalid> {
        check_job_id(&self.job_id)?;
        check_position(self.index, self.total)
    }
}

/// The results of several items of one job, published by one worker as one message
/// ([`KIND_RESULTS`]). The fields every result of the group shares are written once, so a
/// group is both fewer broker messages and fewer bytes than its results one by one.
///
/// `results` is the last field on purpose: a worker serializes each entry as it arrives
/// and splices the entries into the serialized header when the group is sent (see
/// [`ResultGroup::header_json`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(remote = "Self")]
pub struct ResultGroup {
    /// The job of every result in the group (the routing key it is published with).
    pub job_id: String,
    /// Name of the provider of every result.
    pub provider: String,
    /// Number of items in the job.
    pub total: u64,
    /// Id of the worker that sent the group.
    pub worker: String,
    /// What differs from result to result, at most [`MAX_GROUP_RESULTS`] entries (a worker
    /// sends at most `worker.result_group_max`).
    pub results: Vec<GroupedResult>,
}
crate::versioned!(ResultGroup);

/// One result of a [`ResultGroup`]: what differs from item to item.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupedResult {
    /// As [`ItemResult::index`]: the item's position in the input file, from 0.
    pub index: u64,
    /// As [`ItemResult::custom_id`]: the input line's `custom_id`.
    pub custom_id: String,
    /// As [`ItemResult::status`]: how the item ended.
    pub status: ItemStatus,
    /// As [`ItemResult::response`]: the provider's answer, if any.
    pub response: Option<ResponseRecord>,
    /// As [`ItemResult::error`]: why the item did not succeed.
    pub error: Option<ErrorRecord>,
    /// As [`ItemResult::attempts`]: provider calls made for the item.
    pub attempts: u32,
    /// As [`ItemResult::finished_at_ms`]: when the item ended, ms since the Unix epoch.
    pub finished_at_ms: u64,
    /// As [`ItemResult::request`]: the request of an item that did not succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<RequestRecord>,
    /// As [`ItemResult::usage`]: the tokens the provider reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<crate::usage::Usage>,
}

/// Most results one group may carry; a reader refuses a group claiming more (a worker
/// sends far fewer, see `worker.result_group_max`).
pub const MAX_GROUP_RESULTS: usize = 10_000;

impl ResultGroup {
    /// Bounds a collector or the tracker checks before trusting a group read from a queue:
    /// the header like a single result's, every index below the total, at most
    /// [`MAX_GROUP_RESULTS`] entries, and every `custom_id` within its bound.
    pub fn check(&self) -> Result<(), Invalid> {
        check_job_id(&self.job_id)?;
        check_position(0, self.total)?;
        if self.results.len() > MAX_GROUP_RESULTS {
            return Err(Invalid::GroupTooLarge(self.results.len()));
        }
        for r in &self.results {
            check_position(r.index, self.total)?;
            if r.custom_id.len() > MAX_CUSTOM_ID_BYTES {
                return Err(Invalid::CustomIdTooLong(r.custom_id.len()));
            }
        }
        Ok(())
    }

    /// The group's results one by one, each a whole [`ItemResult`].
    pub fn into_results(self) -> impl Iterator<Item = ItemResult> {
        let ResultGroup { job_id, provider, total, worker, results } = self;
        results.into_iter().map(move |r| ItemResult {
            job_id: job_id.clone(),
            index: r.index,
            total,
            custom_id: r.custom_id,
            provider: provider.clone(),
            status: r.status,
            response: r.response,
            error: r.error,
            attempts: r.attempts,
            worker: worker.clone(),
            finished_at_ms: r.finished_at_ms,
            request: r.request,
            usage: r.usage,
        })
    }

    /// The JSON of a group with these header fields and no results yet, cut just before the
    /// closing `]}`, so serialized entries can be appended (comma-separated) and the message
    /// closed with `]}`.
    pub fn header_json(job_id: &str, provider: &str, total: u64, worker: &str) -> Vec<u8> {
        let empty = ResultGroup {
            job_id: job_id.to_string(),
            provider: provider.to_string(),
            total,
            worker: worker.to_string(),
            results: Vec::new(),
        };
        let mut json = serde_json::to_vec(&empty).expect("groups serialize");
        debug_assert!(json.ends_with(b"[]}"), "`results` is the last field");
        json.truncate(json.len() - 2);
        json
    }
}

impl ItemResult {
    /// Splits a result into what it shares with the other results of its group (job, total,
    /// provider, worker) and its own entry.
    pub fn into_grouped(self) -> GroupedResult {
        GroupedResult {
            index: self.index,
            custom_id: self.custom_id,
            status: self.status,
            response: self.response,
            error: self.error,
            attempts: self.attempts,
            finished_at_ms: self.finished_at_ms,
            request: self.request,
            usage: self.usage,
        }
    }
}

/// One line of the output file, in the OpenAI Batch API output format. It borrows from
/// the result it is written from: the response body is serialized, never copied.
#[derive(Debug, Serialize)]
pub struct BatchOutputLine<'a> {
    /// `batch_req_<job id>_<index>`: unique among the lines of the job's output.
    pub id: String,
    /// The input line's `custom_id`, by which the user matches answers to requests.
    pub custom_id: &'a str,
    /// The provider's answer; `null` when there was none.
    pub response: Option<&'a ResponseRecord>,
    /// Why the item failed, for a failure the `response` cannot tell; `null` otherwise
    /// (see [`ItemResult::to_output_line`]).
    pub error: Option<&'a ErrorRecord>,
}

impl ItemResult {
    /// The result of an item that ends without a provider answer (cancelled, expired,
    /// poison, dead-lettered, ...): no response, `error` as given, no call counted.
    pub fn without_answer(item: &Item, status: ItemStatus, error: ErrorRecord, worker: &str) -> ItemResult {
        ItemResult {
            job_id: item.job_id.clone(),
            index: item.index,
            total: item.total,
            custom_id: item.custom_id.clone(),
            provider: item.provider.clone(),
            status,
            response: None,
            error: Some(error),
            attempts: 0,
            worker: worker.to_string(),
            finished_at_ms: crate::now_ms(),
            request: (status != ItemStatus::Succeeded).then(|| RequestRecord::of(item)),
            usage: None,
        }
    }

    /// The result of an item the provider answered: `succeeded` with `answer`, or `failed`
    /// (with the request kept for `producer retry`) when the answer is not a 2xx. The caller
    /// adds what else it knows (attempts, usage, an error).
    pub fn answered(item: &Item, answer: ResponseRecord, worker: &str) -> ItemResult {
        let ok = is_success(answer.status_code);
        ItemResult {
            job_id: item.job_id.clone(),
            index: item.index,
            total: item.total,
            custom_id: item.custom_id.clone(),
            provider: item.provider.clone(),
            status: if ok { ItemStatus::Succeeded } else { ItemStatus::Failed },
            response: Some(answer),
            error: None,
            attempts: 1,
            worker: worker.to_string(),
            finished_at_ms: crate::now_ms(),
            request: (!ok).then(|| RequestRecord::of(item)),
            usage: None,
        }
    }

    /// The output line for this result. As in OpenAI's batch output, `error` is null when
    /// the provider answered (any HTTP status): the failure is then in `response`
    /// (`status_code` and body). `error` is kept for failures without an answer (timeout,
    /// connection, cancelled, expired, poison, a body that is not JSON) and for the one case
    /// the status code cannot tell: a 2xx answer that still failed. [`output_line_status`]
    /// reads the status back from such a line.
    pub fn to_output_line(&self) -> BatchOutputLine<'_> {
        let answered_failure_speaks = match &self.response {
            Some(r) => self.status == ItemStatus::Succeeded || !is_success(r.status_code),
            None => false,
        };
        BatchOutputLine {
            id: format!("batch_req_{}_{}", self.job_id, self.index),
            custom_id: &self.custom_id,
            response: self.response.as_ref(),
            error: if answered_failure_speaks { None } else { self.error.as_ref() },
        }
    }
}

fn is_success(status_code: u16) -> bool {
    (200..300).contains(&status_code)
}

/// How the item of an output line ended, the inverse of [`ItemResult::to_output_line`]:
/// with an `error`, its code decides (`cancelled`, `expired`, anything else failed); with
/// `error` null, the provider's `response.status_code` does (2xx succeeded, else failed).
pub fn output_line_status(line: &serde_json::Value) -> ItemStatus {
    match line["error"]["code"].as_str() {
        Some("cancelled") => ItemStatus::Cancelled,
        Some("expired") => ItemStatus::Expired,
        Some(_) => ItemStatus::Failed,
        None if !line["error"].is_null() => ItemStatus::Failed,
        None => match line["response"]["status_code"].as_u64() {
            Some(code) if u16::try_from(code).is_ok_and(is_success) => ItemStatus::Succeeded,
            _ => ItemStatus::Failed,
        },
    }
}

/// Final counts of a job, published by the tracker when the job ends.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobCounts {
    /// Number of items in the job (0 while the tracker has not seen its submission).
    pub total: u64,
    /// Items that ended `succeeded`.
    pub succeeded: u64,
    /// Items that ended `failed`.
    pub failed: u64,
    /// Items that ended `cancelled`.
    pub cancelled: u64,
    /// Items that ended `expired`.
    pub expired: u64,
}

impl JobCounts {
    /// Items that ended, whatever their status.
    pub fn finished(&self) -> u64 {
        self.succeeded + self.failed + self.cancelled + self.expired
    }
    /// Items not ended yet: `total` less [`JobCounts::finished`], never below 0.
    pub fn pending(&self) -> u64 {
        self.total.saturating_sub(self.finished())
    }
    /// Counts one more item that ended with `status`.
    pub fn add(&mut self, status: ItemStatus) {
        match status {
            ItemStatus::Succeeded => self.succeeded += 1,
            ItemStatus::Failed => self.failed += 1,
            ItemStatus::Cancelled => self.cancelled += 1,
            ItemStatus::Expired => self.expired += 1,
        }
    }
}

/// Where a job is: submitting or in progress, or how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// A resumable `submit` is still publishing its items.
    Submitting,
    /// Every item is published (or the submission cannot be resumed) and not every item
    /// has ended.
    InProgress,
    /// Every item ended, none stopped by a cancel or the deadline; some may have failed,
    /// not all (see [`JobStatus::of_finished`]).
    Completed,
    /// Every item ended and none succeeded, or the submission was abandoned (reason
    /// [`REASON_INCOMPLETE_SUBMISSION`]).
    Failed,
    /// A cancel (`producer cancel`, or the spend cap) stopped at least one item.
    Cancelled,
    /// The job's deadline stopped at least one item.
    Expired,
}

impl JobStatus {
    /// The end states, as `batch_jobs_total` labels them.
    pub const ENDED: [JobStatus; 4] =
        [JobStatus::Completed, JobStatus::Failed, JobStatus::Cancelled, JobStatus::Expired];

    /// The one rule (the README's "How a job ends") for a job whose items are all finished:
    /// `cancelled` when a cancel stopped at least one item (only a cancel, the user's or a
    /// spend cap's, makes an item `cancelled`, so the counts say it even when the request
    /// itself has not been folded yet); else `expired` when the deadline stopped at least
    /// one item (as a provider's batch expires with partial results); else `failed` when no
    /// item succeeded; else `completed` (individual items may have failed).
    pub fn of_finished(counts: &JobCounts) -> JobStatus {
        if counts.cancelled > 0 {
            JobStatus::Cancelled
        } else if counts.expired > 0 {
            JobStatus::Expired
        } else if counts.succeeded == 0 && counts.failed > 0 {
            JobStatus::Failed
        } else {
            JobStatus::Completed
        }
    }

    /// The label value and the word `status` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Submitting => "submitting",
            JobStatus::InProgress => "in_progress",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
            JobStatus::Expired => "expired",
        }
    }

    /// Whether the job has ended.
    pub fn is_ended(self) -> bool {
        !matches!(self, JobStatus::Submitting | JobStatus::InProgress)
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// The job-level state the tracker reports (status queries and `job_finished`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(remote = "Self")]
pub struct JobSummary {
    /// The job's id, as `submit` printed it.
    pub job_id: String,
    /// Name of the provider the job was submitted to.
    pub provider: String,
    /// Where the job is, or how it ended.
    pub status: JobStatus,
    /// The job's items by how they ended, and its total (flattened into the JSON).
    #[serde(flatten)]
    pub counts: JobCounts,
    /// When the job was submitted, ms since the Unix epoch.
    pub submitted_at_ms: u64,
    /// When the tracker ended the job, ms since the Unix epoch; `None` until then.
    pub finished_at_ms: Option<u64>,
    /// Items finished per second since submission (or over the whole job once finished).
    #[serde(default)]
    pub rate_per_s: f64,
    /// Why a job ended other than by its items, e.g. `incomplete_submission`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Why a job in progress is not done yet; absent once it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<JobProgress>,
    /// Tokens and cost of the job's answers so far (absent from trackers before usage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<JobUsage>,
    /// Items of the job that ended failed by dead-lettering, each once, in progress or
    /// ended; their messages stay listed by `producer dead` until requeued.
    #[serde(default)]
    pub dead_lettered: u64,
    /// The job's completion webhook and its last delivery, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<crate::webhooks::WebhookStatus>,
}
crate::versioned!(JobSummary);

/// A job's token usage and what it cost, summed by the tracker over each item's first result.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct JobUsage {
    /// Input tokens of the answers, cached ones included.
    #[serde(default)]
    pub input_tokens: u64,
    /// Of the input tokens, those read from the provider's prompt cache.
    #[serde(default)]
    pub cached_input_tokens: u64,
    /// Output tokens of the answers.
    #[serde(default)]
    pub output_tokens: u64,
    /// Cost at the provider's price table (`providers.<name>.prices`), in its currency.
    #[serde(default)]
    pub cost: f64,
    /// Answers whose model has no price (their tokens are counted, not their cost).
    #[serde(default)]
    pub unpriced_answers: u64,
    /// The job's spend cap (`submit --max-cost`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost: Option<f64>,
}

impl JobUsage {
    /// Adds one answer's usage and its cost (`None`: its model has no price).
    pub fn add(&mut self, usage: &crate::usage::Usage, cost: Option<f64>) {
        self.input_tokens = self.input_tokens.saturating_add(usage.input_tokens);
        self.cached_input_tokens = self.cached_input_tokens.saturating_add(usage.cached_input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(usage.output_tokens);
        match cost {
            Some(c) => self.cost += c,
            None => self.unpriced_answers += 1,
        }
    }

    /// One line for people: `1,234 in (12 cached) / 567 out tokens, cost 0.0123 (cap 1)`.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{} in ({} cached) / {} out tokens, cost {}",
            self.input_tokens,
            self.cached_input_tokens,
            self.output_tokens,
            money(self.cost)
        );
        if let Some(cap) = self.max_cost {
            s.push_str(&format!(" (cap {cap})")); // as given: 0.001 is not 0.00
        }
        if self.unpriced_answers > 0 {
            s.push_str(&format!(", {} answers of unpriced models", self.unpriced_answers));
        }
        s
    }
}

/// An amount of money for people: 4 decimals, or 3 significant digits below 0.01, so a
/// small job's cost does not show as `0.0000`.
pub fn money(amount: f64) -> String {
    if amount == 0.0 || !amount.is_finite() || amount.abs() >= 0.01 {
        return format!("{amount:.4}");
    }
    let decimals = (2 - amount.abs().log10().floor() as i32).clamp(4, 12) as usize;
    format!("{amount:.decimals$}")
}

/// Where the unfinished items of a job in progress are, as far as the tracker knows.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct JobProgress {
    /// A cancel was requested and the job has not ended yet.
    pub cancelling: bool,
    /// Items waiting in delay queues because the provider kept failing.
    pub in_delay_queues: u64,
    /// The rest of the pending items: on the items queue or being called.
    pub queued_or_in_flight: u64,
    /// Items of the job on the provider's items queue, ready for a worker (all jobs of the
    /// provider share the queue: this is the provider's backlog, not only this job's).
    pub provider_backlog: Option<u64>,
    /// Items of this job that ended failed by dead-lettering (poison, broker dead letters).
    pub dead_lettered: u64,
    /// The newest provider failure seen for this job (retried or final), and its age.
    pub last_error: Option<String>,
    /// Seconds since the tracker saw `last_error`.
    pub last_error_age_s: Option<u64>,
    /// Seconds until the job ends at its current rate.
    pub eta_s: Option<u64>,
}

/// Reason of a job that ended `failed` because its submission was abandoned: `submit`
/// stopped before publishing every item and was not resumed within
/// `producer.submit_timeout_s`.
pub const REASON_INCOMPLETE_SUBMISSION: &str = "incomplete_submission";

/// A status query to the active tracker (published to `<ns>.tracker.rpc` with `reply_to`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(remote = "Self", tag = "op", rename_all = "snake_case")]
pub enum TrackerRequest {
    /// One job.
    Status {
        /// The job to report.
        job_id: String,
    },
    /// Jobs in progress and recently finished.
    Jobs,
}
crate::versioned!(TrackerRequest);

/// The tracker's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(remote = "Self")]
pub struct TrackerReply {
    /// Worker id of the tracker that answered.
    pub tracker: String,
    /// The job asked for (none when unknown), or every job in progress and every finished
    /// job still retained (`tracker.retention_s`).
    pub jobs: Vec<JobSummary>,
    /// Set when the request could not be answered (e.g. an unknown job id).
    #[serde(default)]
    pub error: Option<String>,
    /// Set with `error` when the job asked for ended longer ago than `tracker.retention_s`:
    /// its summary is forgotten, its results are still readable (`producer wait`) until
    /// they are past the results stream's age limit.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forgotten: bool,
}
crate::versioned!(TrackerReply);

/// Job events on the ledger queue, folded by the job tracker (results reach the ledger too,
/// as [`ItemResult`]s and [`ResultGroup`]s: see [`crate::messages::LedgerMessage`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(remote = "Self", tag = "type", rename_all = "snake_case")]
pub enum LedgerEvent {
    /// A job was submitted: published by `submit` before its first item (and again by a
    /// resumed submission, which the tracker does not count twice).
    JobSubmitted {
        /// The new job's id.
        job_id: String,
        /// Name of the provider the job's items are for.
        provider: String,
        /// Number of items in the job, 1 to [`MAX_JOB_ITEMS`].
        total: u64,
        /// When the job was submitted, ms since the Unix epoch.
        submitted_at_ms: u64,
        /// After this instant, ms since the Unix epoch, the job's unfinished items end
        /// `expired`; `None`: no deadline.
        #[serde(default)]
        deadline_ms: Option<u64>,
        /// Whether a `submission_complete` event will follow (a producer that can be
        /// resumed says so; the job shows `submitting` until then). Sent again when a
        /// submission is resumed.
        #[serde(default)]
        submitting: bool,
        /// Spend cap (`submit --max-cost`): reached, the job is cancelled (reason `budget`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_cost: Option<f64>,
        /// Completion webhook (`submit --webhook`): told when the job ends
        /// ([`crate::webhooks`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        webhook_url: Option<String>,
    },
    /// Every item of the job is published and confirmed.
    SubmissionComplete {
        /// The job whose items are all published.
        job_id: String,
    },
    /// `producer cancel` asked to cancel the job (the workers learn it from the control
    /// stream): once its items have ended, the job ends `cancelled` if the cancel stopped
    /// any.
    JobCancel {
        /// The job to cancel.
        job_id: String,
    },
    /// A worker's webhook sender made an attempt at a job's completion webhook (its state
    /// after it: delivered, retrying or failed), for `status`.
    WebhookAttempt {
        /// The job whose webhook it was.
        job_id: String,
        /// Where the delivery is now.
        state: crate::webhooks::DeliveryState,
        /// Attempts made so far.
        attempts: u32,
        /// What a failed attempt got (`HTTP 500`, ...).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// A worker sent an item to a delay queue: the provider keeps failing.
    ItemDelayed {
        /// The delayed item's job.
        job_id: String,
        /// Name of the provider that keeps failing.
        provider: String,
        /// The delayed item's position in its job, from 0.
        index: u64,
        /// The failure that sent it there (no response body, no key: the error's message).
        error: String,
    },
}
crate::versioned!(LedgerEvent);

impl LedgerEvent {
    /// Bounds the tracker checks before folding an event read from the ledger.
    pub fn check(&self) -> Result<(), Invalid> {
        match self {
            LedgerEvent::JobSubmitted { job_id, total, .. } => {
                check_job_id(job_id)?;
                check_position(0, *total)
            }
            LedgerEvent::JobCancel { job_id }
            | LedgerEvent::SubmissionComplete { job_id }
            | LedgerEvent::WebhookAttempt { job_id, .. } => check_job_id(job_id),
            LedgerEvent::ItemDelayed { job_id, index, .. } => {
                check_job_id(job_id)?;
                check_position(*index, MAX_JOB_ITEMS)
            }
        }
    }
}

impl ControlMessage {
    /// Bounds a worker checks before acting on a control message.
    pub fn check(&self) -> Result<(), Invalid> {
        match self {
            ControlMessage::CancelJob { job_id, .. } | ControlMessage::JobClosed { job_id } => check_job_id(job_id),
            ControlMessage::JobOpened { job_id, priority, .. } => {
                check_job_id(job_id)?;
                // The id becomes the last part of a queue name a worker consumes: no dot, so
                // no announcement can point a worker at a queue that is not a job's.
                if !job_id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                    return Err(Invalid::JobIdNotAQueueName);
                }
                match *priority {
                    1..=MAX_PRIORITY => Ok(()),
                    p => Err(Invalid::Priority(p)),
                }
            }
            ControlMessage::Marker { .. } => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn small_costs_show_significant_digits_not_zeros() {
        assert_eq!(super::money(0.0), "0.0000");
        assert_eq!(super::money(1.5), "1.5000");
        assert_eq!(super::money(0.0123), "0.0123");
        assert_eq!(super::money(0.001), "0.00100");
        assert_eq!(super::money(0.00001645), "0.0000165");
        assert!(super::money(f64::NAN).contains("NaN"));
    }

    use super::*;

    #[test]
    fn statuses_travel_as_the_words_labels_and_old_checkpoints_use() {
        let all = [
            JobStatus::Submitting,
            JobStatus::InProgress,
            JobStatus::Completed,
            JobStatus::Failed,
            JobStatus::Cancelled,
            JobStatus::Expired,
        ];
        for status in all {
            let word = serde_json::to_value(status).unwrap();
            assert_eq!(word, status.as_str());
            assert_eq!(serde_json::from_value::<JobStatus>(word).unwrap(), status);
            assert_eq!(status.is_ended(), JobStatus::ENDED.contains(&status));
        }
        for status in ItemStatus::ALL {
            assert_eq!(serde_json::to_value(status).unwrap(), status.as_str());
        }
    }

    #[test]
    fn item_round_trips_with_body_untouched() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hi \u00e9"}]}"#;
        let item = Item {
            job_id: "j".into(),
            index: 3,
            total: 10,
            custom_id: "c-3".into(),
            provider: "mock".into(),
            url: "/v1/chat/completions".into(),
            body: RawValue::from_string(body.into()).unwrap(),
            attempt: 0,
            submitted_at_ms: 1,
            deadline_ms: None,
            first_delay_ms: None,
            flex: false,
        };
        let bytes = serde_json::to_vec(&item).unwrap();
        let back: Item = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back.body.get(), body, "body bytes are passed through unchanged");
        assert_eq!(back.index, 3);
    }

    #[test]
    fn an_answered_result_takes_its_status_from_the_answer_and_keeps_a_failures_request() {
        let item: Item = serde_json::from_str(
            r#"{"job_id":"j","index":1,"total":2,"custom_id":"c","provider":"p","url":"/v1/chat/completions","body":{"a":1},"attempt":0,"submitted_at_ms":1}"#,
        )
        .unwrap();
        let answer = |status_code| ResponseRecord {
            status_code,
            request_id: "r".into(),
            body: RawValue::from_string("{}".into()).unwrap(),
        };
        let ok = ItemResult::answered(&item, answer(200), "w");
        assert_eq!((ok.status, ok.error.is_none(), ok.request.is_none()), (ItemStatus::Succeeded, true, true));
        let refused = ItemResult::answered(&item, answer(429), "w");
        assert_eq!(refused.status, ItemStatus::Failed);
        assert_eq!(refused.request.as_ref().map(|r| r.body.get()), Some(r#"{"a":1}"#));
        assert_eq!(output_line_status(&serde_json::to_value(refused.to_output_line()).unwrap()), ItemStatus::Failed);
    }

    #[test]
    fn output_line_has_openai_batch_shape() {
        let r = ItemResult {
            job_id: "j1".into(),
            index: 0,
            total: 1,
            custom_id: "a".into(),
            provider: "mock".into(),
            status: ItemStatus::Failed,
            response: Some(ResponseRecord {
                status_code: 400,
                request_id: "req_1".into(),
                body: RawValue::from_string("{\"error\":{}}".into()).unwrap(),
            }),
            error: Some(ErrorRecord { code: "client_error".into(), message: "bad".into() }),
            attempts: 1,
            worker: "w".into(),
            finished_at_ms: 2,
            request: None,
            usage: None,
        };
        let v: serde_json::Value = serde_json::to_value(r.to_output_line()).unwrap();
        assert_eq!(v["custom_id"], "a");
        assert_eq!(v["response"]["status_code"], 400);
        assert!(v["error"].is_null(), "the provider answered: the failure is in the response");
        assert_eq!(v["id"], "batch_req_j1_0");
        assert_eq!(output_line_status(&v), ItemStatus::Failed);
    }

    fn result(status: ItemStatus, code: Option<u16>, error: Option<&str>) -> ItemResult {
        ItemResult {
            job_id: "j".into(),
            index: 1,
            total: 2,
            custom_id: "c".into(),
            provider: "p".into(),
            status,
            response: code.map(|status_code| ResponseRecord {
                status_code,
                request_id: String::new(),
                body: RawValue::from_string("{}".into()).unwrap(),
            }),
            error: error.map(|c| ErrorRecord { code: c.into(), message: "m".into() }),
            attempts: 1,
            worker: "w".into(),
            finished_at_ms: 0,
            request: None,
            usage: None,
        }
    }

    #[test]
    fn every_result_reads_back_with_its_status() {
        let cases = [
            (result(ItemStatus::Succeeded, Some(200), None), false),
            (result(ItemStatus::Failed, Some(429), Some("rate_limited")), false),
            (result(ItemStatus::Failed, Some(503), Some("overloaded")), false),
            // No answer, or an answer whose status code cannot say it failed: `error` stays.
            (result(ItemStatus::Failed, None, Some("timeout")), true),
            (result(ItemStatus::Failed, Some(200), Some("invalid_response")), true),
            (result(ItemStatus::Cancelled, None, Some("cancelled")), true),
            (result(ItemStatus::Expired, None, Some("expired")), true),
            (result(ItemStatus::Failed, None, Some("poison")), true),
        ];
        for (r, has_error) in cases {
            let v = serde_json::to_value(r.to_output_line()).unwrap();
            assert_eq!(!v["error"].is_null(), has_error, "{v}");
            assert_eq!(output_line_status(&v), r.status, "{v}");
        }
        assert_eq!(output_line_status(&serde_json::json!({"response": null, "error": null})), ItemStatus::Failed);
    }

    #[test]
    fn stream_requests_are_recognised() {
        let asks = |b: &str| asks_to_stream(&RawValue::from_string(b.into()).unwrap());
        assert!(asks(r#"{"model":"m","stream":true}"#));
        assert!(asks(r#"{"stream":false,"x":{"stream":false},"stream":true}"#), "any duplicate counts");
        assert!(!asks(r#"{"model":"m","stream":false}"#));
        assert!(!asks(r#"{"model":"m","x":{"stream":true}}"#), "only the top level");
        assert!(!asks(r#"{"stream":"true"}"#));
        assert!(!asks("[1]"));
    }

    #[test]
    fn bounds_of_queued_messages() {
        let mut item: Item = serde_json::from_str(
            r#"{"job_id":"j","index":0,"total":1,"custom_id":"c","provider":"p","url":"/v1/x","body":{},"submitted_at_ms":0}"#,
        )
        .unwrap();
        assert_eq!(item.check(), Ok(()));
        item.index = 1;
        assert_eq!(item.check(), Err(Invalid::Index { index: 1, total: 1 }));
        item.index = 1 << 40;
        item.total = u64::MAX;
        assert_eq!(item.check(), Err(Invalid::Total(u64::MAX)));
        item.total = 1;
        item.index = 0;
        item.job_id = "j".repeat(256);
        assert_eq!(item.check(), Err(Invalid::JobIdTooLong(256)));
        item.job_id = "a\nb".into();
        assert_eq!(item.check(), Err(Invalid::JobIdControl));
        let e = LedgerEvent::JobSubmitted {
            job_id: "j".into(),
            provider: "p".into(),
            total: 0,
            submitted_at_ms: 0,
            deadline_ms: None,
            submitting: false,
            max_cost: None,
            webhook_url: None,
        };
        assert!(e.check().is_err());
    }

    #[test]
    fn job_openings_are_checked() {
        let open = |job_id: &str, priority| ControlMessage::JobOpened {
            job_id: job_id.into(),
            provider: "mock".into(),
            priority,
        };
        assert_eq!(open("job_0123abcd", 1).check(), Ok(()));
        assert_eq!(open("job_1", 0).check(), Err(Invalid::Priority(0)));
        assert_eq!(open("job_1", MAX_PRIORITY + 1).check(), Err(Invalid::Priority(MAX_PRIORITY + 1)));
        assert_eq!(open("items.other", 1).check(), Err(Invalid::JobIdNotAQueueName));
        let old: ControlMessage = serde_json::from_str(r#"{"type":"cancel_job","job_id":"j"}"#).unwrap();
        assert_eq!(old, ControlMessage::CancelJob { job_id: "j".into(), reason: None }, "older cancels still read");
    }

    #[test]
    fn a_group_spliced_from_entries_reads_back_as_its_results() {
        let a = result(ItemStatus::Succeeded, Some(200), None);
        let mut b = result(ItemStatus::Failed, None, Some("timeout"));
        b.index = 0;
        b.custom_id = "c0".into();
        let mut json = ResultGroup::header_json(&a.job_id, &a.provider, a.total, &a.worker);
        for (i, r) in [a.clone(), b.clone()].into_iter().enumerate() {
            if i > 0 {
                json.push(b',');
            }
            serde_json::to_writer(&mut json, &r.into_grouped()).unwrap();
        }
        json.extend_from_slice(b"]}");
        let group: ResultGroup = serde_json::from_slice(&json).unwrap();
        assert_eq!(group.check(), Ok(()));
        let back: Vec<ItemResult> = group.into_results().collect();
        assert_eq!(back.len(), 2);
        for (got, want) in back.iter().zip([&a, &b]) {
            assert_eq!(serde_json::to_value(got).unwrap(), serde_json::to_value(want).unwrap());
        }
        // The shared fields are written once: smaller than the results one by one.
        let singles = serde_json::to_vec(&a).unwrap().len() + serde_json::to_vec(&b).unwrap().len();
        assert!(json.len() < singles, "{} >= {singles}", json.len());
    }

    #[test]
    fn a_group_out_of_bounds_is_refused() {
        let group = |index: u64, total: u64| ResultGroup {
            job_id: "j".into(),
            provider: "p".into(),
            total,
            worker: "w".into(),
            results: vec![result(ItemStatus::Succeeded, Some(200), None).into_grouped()]
                .into_iter()
                .map(|mut r| {
                    r.index = index;
                    r
                })
                .collect(),
        };
        assert_eq!(group(1, 2).check(), Ok(()));
        assert_eq!(group(2, 2).check(), Err(Invalid::Index { index: 2, total: 2 }));
        assert_eq!(group(0, 0).check(), Err(Invalid::Total(0)));
        let mut big = group(0, 2);
        big.results = vec![big.results[0].clone(); MAX_GROUP_RESULTS + 1];
        assert_eq!(big.check(), Err(Invalid::GroupTooLarge(MAX_GROUP_RESULTS + 1)));
        let mut long = group(0, 2);
        long.results[0].custom_id = "x".repeat(MAX_CUSTOM_ID_BYTES + 1);
        assert_eq!(long.check(), Err(Invalid::CustomIdTooLong(MAX_CUSTOM_ID_BYTES + 1)));
    }

    #[test]
    fn ledger_events_are_tagged() {
        let e = LedgerEvent::JobCancel { job_id: "x".into() };
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(s, r#"{"v":"1.1","type":"job_cancel","job_id":"x"}"#);
    }
}
