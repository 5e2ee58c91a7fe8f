//! The bounds every message read from a queue is checked against before it is trusted:
//! the longest job id and `custom_id`, the most items a job may have, and [`Invalid`], the
//! one error the checks of every message family return.
//!
//! They live apart from the messages because one bound serves several families (a job id
//! is checked the same way in an item, a result, a control message and a ledger event).

use super::control::MAX_PRIORITY;
use super::results::MAX_GROUP_RESULTS;

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

/// Checks an item position claimed with its job's item count: the count within
/// [`MAX_JOB_ITEMS`], the position below it.
pub(super) fn check_position(index: u64, total: u64) -> Result<(), Invalid> {
    if total == 0 || total > MAX_JOB_ITEMS {
        return Err(Invalid::Total(total));
    }
    if index >= total {
        return Err(Invalid::Index { index, total });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Item, LedgerEvent};

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
            mode: None,
        };
        assert!(e.check().is_err());
    }
}
