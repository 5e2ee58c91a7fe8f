//! What the job tracker says about a job: its [`JobStatus`] and [`JobCounts`], its usage and
//! cost ([`JobUsage`]), why it is not done yet ([`JobProgress`]), all gathered in the
//! [`JobSummary`] it publishes when the job ends (`job_finished`) and answers status
//! queries with ([`TrackerRequest`], [`TrackerReply`]).

use serde::{Deserialize, Serialize};

use super::results::ItemStatus;

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
    /// How the job's items run (online, batch or flex), as its submission said; `None`:
    /// unknown (submitted by a producer from before modes were announced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<crate::batch::JobMode>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_costs_show_significant_digits_not_zeros() {
        assert_eq!(super::money(0.0), "0.0000");
        assert_eq!(super::money(1.5), "1.5000");
        assert_eq!(super::money(0.0123), "0.0123");
        assert_eq!(super::money(0.001), "0.00100");
        assert_eq!(super::money(0.00001645), "0.0000165");
        assert!(super::money(f64::NAN).contains("NaN"));
    }

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
    fn a_summarys_mode_is_shown_when_known_and_absent_otherwise() {
        let mut summary = JobSummary {
            job_id: "j".into(),
            provider: "p".into(),
            mode: Some(crate::batch::JobMode::Flex),
            status: JobStatus::InProgress,
            counts: JobCounts { total: 1, ..Default::default() },
            submitted_at_ms: 0,
            finished_at_ms: None,
            rate_per_s: 0.0,
            reason: None,
            progress: None,
            usage: None,
            dead_lettered: 0,
            webhook: None,
        };
        let v = serde_json::to_value(&summary).unwrap();
        assert_eq!(v["mode"], "flex");
        assert_eq!(serde_json::from_value::<JobSummary>(v).unwrap(), summary);
        summary.mode = None;
        // Unknown (an older producer's job): not written, and read back as unknown.
        let v = serde_json::to_value(&summary).unwrap();
        assert!(v.get("mode").is_none(), "{v}");
        assert_eq!(serde_json::from_value::<JobSummary>(v).unwrap(), summary);
    }
}
