//! The control stream's messages ([`ControlMessage`]): job cancels, job items queues
//! opening and closing, and the markers workers read back. Every worker replays the stream
//! from the start, so these are the messages that reach every worker.

use serde::{Deserialize, Serialize};

use super::bounds::{check_job_id, Invalid};

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

/// Weight of a job that names none: every job gets an equal share of its provider.
pub const DEFAULT_PRIORITY: u32 = 1;
/// Highest weight (`submit --priority`): a job gets at most this many shares.
pub const MAX_PRIORITY: u32 = 10;

fn default_priority() -> u32 {
    DEFAULT_PRIORITY
}

/// Reason of a job cancelled because its spend reached `submit --max-cost`.
pub const REASON_BUDGET: &str = "budget";

#[cfg(test)]
mod tests {
    use super::*;

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
}
