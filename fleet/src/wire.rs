//! The wire format: what travels on the queues, and the OpenAI Batch API line formats the
//! user reads and writes.
//!
//! Request and response bodies are carried as [`RawValue`](serde_json::value::RawValue):
//! the fleet passes them through unchanged and never pays for parsing them into a tree.
//!
//! Every message that travels on a queue carries its wire version (`"v": "1.1"`, see
//! [`version`]): the types marked `#[serde(remote = "Self")]` get their serde impls from
//! [`crate::versioned!`].
//!
//! The messages by family, one file each under `wire/` (everything is re-exported here, so
//! callers name `fleet::wire::X` whatever file holds it):
//! - `items.rs`: requests, as the input line ([`BatchInputLine`]) and as the queued
//!   [`Item`] (`<ns>.items.*`).
//! - `results.rs`: how each item ended, alone ([`ItemResult`]) or grouped ([`ResultGroup`])
//!   on `<ns>.results` and the job's results stream, with the [`ErrorRecord`] codes
//!   ([`error_code`]) and the output line ([`BatchOutputLine`]).
//! - `jobs.rs`: what the tracker says about a job, [`JobSummary`] (`job_finished`, status
//!   replies) and the status query itself ([`TrackerRequest`], [`TrackerReply`]).
//! - `control.rs`: the control stream, [`ControlMessage`] (cancels, job queues opening and
//!   closing, markers).
//! - `ledger.rs`: the job events the tracker folds, [`LedgerEvent`].
//! - `bounds.rs`: the bounds every message read from a queue is checked against
//!   ([`Invalid`]).
//! - `version.rs`: the wire version every queued message carries.

mod bounds;
mod control;
mod items;
mod jobs;
mod ledger;
mod results;
pub mod version;

pub use bounds::{check_job_id, Invalid, MAX_CUSTOM_ID_BYTES, MAX_JOB_ID_BYTES, MAX_JOB_ITEMS};
pub use control::{ControlMessage, DEFAULT_PRIORITY, MAX_PRIORITY, REASON_BUDGET};
pub use items::{asks_to_stream, BatchInputLine, Item};
pub use jobs::{
    money, JobCounts, JobProgress, JobStatus, JobSummary, JobUsage, TrackerReply, TrackerRequest,
    REASON_INCOMPLETE_SUBMISSION,
};
pub use ledger::LedgerEvent;
pub use results::{
    error_code, output_line_status, BatchOutputLine, ErrorRecord, GroupedResult, ItemResult, ItemStatus, RequestRecord,
    ResponseRecord, ResultGroup, KIND_JOB_FINISHED, KIND_RESULT, KIND_RESULTS, MAX_GROUP_RESULTS,
};
pub use version::{serialize_versioned, Unsupported, Unversioned, VersionChecked, WireVersion};
