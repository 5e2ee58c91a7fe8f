//! Results on their way out: how an item ended ([`ItemResult`], its [`ItemStatus`], the
//! provider's answer and the [`ErrorRecord`] with its [`error_code`]s), the results of one
//! job from one worker sent together ([`ResultGroup`]), and the OpenAI Batch API output
//! line each result becomes ([`BatchOutputLine`], read back by [`output_line_status`]).
//!
//! The `KIND_*` constants name these messages in the AMQP `type` property of a results
//! queue; a job's results stream ends with the tracker's [`JobSummary`](super::JobSummary).

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::bounds::{check_job_id, check_position, Invalid, MAX_CUSTOM_ID_BYTES};
use super::items::Item;

/// AMQP `type` property of a message on a results queue carrying an [`ItemResult`].
pub const KIND_RESULT: &str = "result";
/// AMQP `type` property of a message on a results queue carrying a [`ResultGroup`]: the
/// results of several items of one job from one worker, in one broker message.
pub const KIND_RESULTS: &str = "results";
/// AMQP `type` property of a message on a results queue carrying a
/// [`JobSummary`](super::JobSummary).
pub const KIND_JOB_FINISHED: &str = "job_finished";

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

impl ItemResult {
    /// Bounds a collector or the tracker checks before trusting a result read from a queue.
    pub fn check(&self) -> Result<(), Invalid> {
        check_job_id(&self.job_id)?;
        check_position(self.index, self.total)
    }

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

/// Most results one group may carry; a reader refuses a group claiming more (a worker
/// sends far fewer, see `worker.result_group_max`).
pub const MAX_GROUP_RESULTS: usize = 10_000;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
