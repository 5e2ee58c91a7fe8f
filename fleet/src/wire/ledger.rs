//! The job events on the ledger queue ([`LedgerEvent`]): submissions, cancels, webhook
//! attempts and delayed items, folded by the active job tracker beside the results and dead
//! letters the ledger also receives.

use serde::{Deserialize, Serialize};

use super::bounds::{check_job_id, check_position, Invalid, MAX_JOB_ITEMS};

/// Job events on the ledger queue, folded by the job tracker (results reach the ledger too,
/// as [`ItemResult`](super::ItemResult)s and [`ResultGroup`](super::ResultGroup)s: see
/// [`crate::messages::LedgerMessage`]).
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
        /// How the job's items run (online, batch or flex; what `--mode auto` picked), for
        /// `status`. `None`: a producer from before modes were announced.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<crate::batch::JobMode>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::JobMode;

    #[test]
    fn ledger_events_are_tagged() {
        let e = LedgerEvent::JobCancel { job_id: "x".into() };
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(s, r#"{"v":"1.1","type":"job_cancel","job_id":"x"}"#);
    }

    #[test]
    fn a_submissions_mode_is_a_lowercase_word_and_may_be_absent() {
        let submitted = |mode| LedgerEvent::JobSubmitted {
            job_id: "j".into(),
            provider: "p".into(),
            total: 1,
            submitted_at_ms: 0,
            deadline_ms: None,
            submitting: false,
            max_cost: None,
            webhook_url: None,
            mode,
        };
        for (mode, word) in [(JobMode::Online, "online"), (JobMode::Batch, "batch"), (JobMode::Flex, "flex")] {
            assert_eq!(mode.as_str(), word);
            let e = submitted(Some(mode));
            let s = serde_json::to_string(&e).unwrap();
            assert!(s.contains(&format!(r#""mode":"{word}""#)), "{s}");
            assert_eq!(serde_json::from_str::<LedgerEvent>(&s).unwrap(), e);
        }
        // Unknown mode: not written, and an event without it (an older producer's) reads as unknown.
        let s = serde_json::to_string(&submitted(None)).unwrap();
        assert!(!s.contains("mode"), "{s}");
        assert_eq!(serde_json::from_str::<LedgerEvent>(&s).unwrap(), submitted(None));
    }
}
