//! The wire format: what travels on the queues, and the OpenAI Batch API line formats the
//! user reads and writes.
//!
//! Request and response bodies are carried as [`RawValue`]: the fleet passes them through
//! unchanged and never pays for parsing them into a tree.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// AMQP `type` property of a message on a results queue carrying an [`ItemResult`].
pub const KIND_RESULT: &str = "result";
/// AMQP `type` property of a message on a results queue carrying a [`JobSummary`].
pub const KIND_JOB_FINISHED: &str = "job_finished";

/// One line of an OpenAI Batch API input file.
#[derive(Debug, Deserialize)]
pub struct BatchInputLine {
    pub custom_id: String,
    pub method: String,
    pub url: String,
    pub body: Box<RawValue>,
}

/// One request of a job, as queued on `<ns>.items.<provider>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Item {
    pub job_id: String,
    /// Position of the line in the input file, from 0: the dedup key within a job.
    pub index: u64,
    /// Number of items in the job, so whoever collects results knows when it has all.
    pub total: u64,
    pub custom_id: String,
    pub provider: String,
    /// Path of the endpoint, e.g. `/v1/chat/completions`.
    pub url: String,
    pub body: Box<RawValue>,
    /// Times this item went through a delay queue (long-outage retries).
    #[serde(default)]
    pub attempt: u32,
    pub submitted_at_ms: u64,
    /// After this instant the item ends `expired` instead of being called.
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    /// When the item was first sent to a delay queue (the long-retry budget starts there).
    #[serde(default)]
    pub first_delay_ms: Option<u64>,
}

/// A message on the control stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlMessage {
    CancelJob {
        job_id: String,
    },
    /// Written by a worker before it starts consuming items; reading its own marker back
    /// proves it has read every cancel published before.
    Marker {
        id: String,
    },
}

/// How an item ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemStatus {
    Succeeded,
    Failed,
    Cancelled,
    Expired,
}

impl ItemStatus {
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
    pub status_code: u16,
    pub request_id: String,
    pub body: Box<RawValue>,
}

/// Why an item did not succeed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorRecord {
    /// A stable machine-readable code (`client_error`, `rate_limited`, `timeout`, ...).
    pub code: String,
    pub message: String,
}

/// The outcome of one item, published to `<ns>.results` with the job id as routing key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ItemResult {
    pub job_id: String,
    pub index: u64,
    pub total: u64,
    pub custom_id: String,
    pub provider: String,
    pub status: ItemStatus,
    pub response: Option<ResponseRecord>,
    pub error: Option<ErrorRecord>,
    /// Provider calls made for this item (0 when none was made).
    pub attempts: u32,
    pub worker: String,
    pub finished_at_ms: u64,
}

/// One line of the output file, in the OpenAI Batch API output format. It borrows from
/// the result it is written from: the response body is serialized, never copied.
#[derive(Debug, Serialize)]
pub struct BatchOutputLine<'a> {
    pub id: String,
    pub custom_id: &'a str,
    pub response: Option<&'a ResponseRecord>,
    pub error: Option<&'a ErrorRecord>,
}

impl ItemResult {
    /// The output line for this result.
    pub fn to_output_line(&self) -> BatchOutputLine<'_> {
        BatchOutputLine {
            id: format!("batch_req_{}_{}", self.job_id, self.index),
            custom_id: &self.custom_id,
            response: self.response.as_ref(),
            error: self.error.as_ref(),
        }
    }
}

/// Final counts of a job, published by the tracker when the job ends.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobCounts {
    pub total: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub expired: u64,
}

impl JobCounts {
    pub fn finished(&self) -> u64 {
        self.succeeded + self.failed + self.cancelled + self.expired
    }
    pub fn pending(&self) -> u64 {
        self.total.saturating_sub(self.finished())
    }
    pub fn add(&mut self, status: ItemStatus) {
        match status {
            ItemStatus::Succeeded => self.succeeded += 1,
            ItemStatus::Failed => self.failed += 1,
            ItemStatus::Cancelled => self.cancelled += 1,
            ItemStatus::Expired => self.expired += 1,
        }
    }
}

/// The job-level state the tracker reports (status queries and `job_finished`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobSummary {
    pub job_id: String,
    pub provider: String,
    /// `in_progress`, `completed`, `failed`, `cancelled` or `expired`.
    pub status: String,
    #[serde(flatten)]
    pub counts: JobCounts,
    pub submitted_at_ms: u64,
    pub finished_at_ms: Option<u64>,
    /// Items finished per second since submission (or over the whole job once finished).
    #[serde(default)]
    pub rate_per_s: f64,
    /// Why a job in progress is not done yet; absent once it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<JobProgress>,
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
    pub last_error_age_s: Option<u64>,
    /// Seconds until the job ends at its current rate.
    pub eta_s: Option<u64>,
}

/// A status query to the active tracker (published to `<ns>.tracker.rpc` with `reply_to`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum TrackerRequest {
    /// One job.
    Status { job_id: String },
    /// Jobs in progress and recently finished.
    Jobs,
}

/// The tracker's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrackerReply {
    /// Worker id of the tracker that answered.
    pub tracker: String,
    pub jobs: Vec<JobSummary>,
    /// Set when the request could not be answered (e.g. an unknown job id).
    #[serde(default)]
    pub error: Option<String>,
}

/// Events on the ledger queue, folded by the job tracker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LedgerEvent {
    JobSubmitted {
        job_id: String,
        provider: String,
        total: u64,
        submitted_at_ms: u64,
        #[serde(default)]
        deadline_ms: Option<u64>,
    },
    /// Items of one job that finished (a worker may batch several).
    ItemsFinished {
        job_id: String,
        provider: String,
        items: Vec<(u64, ItemStatus)>,
    },
    JobCancel {
        job_id: String,
    },
    /// A worker sent an item to a delay queue: the provider keeps failing.
    ItemDelayed {
        job_id: String,
        provider: String,
        index: u64,
        /// The failure that sent it there (no response body, no key: the error's message).
        error: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

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
        };
        let bytes = serde_json::to_vec(&item).unwrap();
        let back: Item = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back.body.get(), body, "body bytes are passed through unchanged");
        assert_eq!(back.index, 3);
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
        };
        let v: serde_json::Value = serde_json::to_value(r.to_output_line()).unwrap();
        assert_eq!(v["custom_id"], "a");
        assert_eq!(v["response"]["status_code"], 400);
        assert_eq!(v["error"]["code"], "client_error");
        assert_eq!(v["id"], "batch_req_j1_0");
    }

    #[test]
    fn ledger_events_are_tagged() {
        let e = LedgerEvent::JobCancel { job_id: "x".into() };
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(s, r#"{"type":"job_cancel","job_id":"x"}"#);
    }
}
