//! How a batch looks to a client: the fleet's job (the tracker's summary) mapped onto the
//! OpenAI Batch's `status`, timestamps and counts, or the Anthropic MessageBatch's
//! `processing_status` and `request_counts`. Pure, so every branch is tested here.

use fleet::wire::{JobStatus, JobSummary};

use super::store::BatchEntry;

/// OpenAI's view of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct OpenAiView {
    pub status: &'static str,
    pub in_progress_at: Option<u64>,
    pub finalizing_at: Option<u64>,
    pub completed_at: Option<u64>,
    pub failed_at: Option<u64>,
    pub expired_at: Option<u64>,
    pub cancelling_at: Option<u64>,
    pub cancelled_at: Option<u64>,
    /// `request_counts`: total, completed, failed (everything that did not succeed).
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
    /// Whether the job ended: the output and error files are complete.
    pub ended: bool,
    /// Why the job ended other than by its items (`incomplete_submission`).
    pub reason: Option<String>,
}

/// The OpenAI view of `entry`, whose job the tracker summarises as `job` (`None`: it has
/// not read the job yet, or does not answer).
pub(crate) fn openai(entry: &BatchEntry, job: Option<&JobSummary>) -> OpenAiView {
    let created = entry.record.created_at;
    let mut v = OpenAiView { total: entry.record.total, cancelling_at: entry.cancelling_at, ..OpenAiView::default() };
    let Some(job) = job else {
        v.status = if entry.cancelling_at.is_some() { "cancelling" } else { "validating" };
        return v;
    };
    let c = &job.counts;
    v.completed = c.succeeded;
    v.failed = c.failed + c.cancelled + c.expired;
    v.in_progress_at = Some(created);
    let finished = job.finished_at_ms.map(|ms| ms / 1000);
    v.status = match job.status {
        JobStatus::Submitting if entry.cancelling_at.is_some() => "cancelling",
        JobStatus::Submitting => {
            v.in_progress_at = None;
            "validating"
        }
        JobStatus::InProgress if entry.cancelling_at.is_some() => "cancelling",
        JobStatus::InProgress if c.finished() >= v.total => {
            v.finalizing_at = Some(fleet::now_ms() / 1000);
            "finalizing"
        }
        JobStatus::InProgress => "in_progress",
        JobStatus::Completed => {
            v.finalizing_at = finished;
            v.completed_at = finished;
            "completed"
        }
        JobStatus::Failed => {
            v.failed_at = finished;
            "failed"
        }
        JobStatus::Cancelled => {
            v.cancelled_at = finished;
            "cancelled"
        }
        JobStatus::Expired => {
            v.expired_at = finished;
            "expired"
        }
    };
    v.ended = JobStatus::ENDED.contains(&job.status);
    v.reason = job.reason.clone();
    v
}

/// Anthropic's view of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct AnthropicView {
    /// `in_progress`, `canceling` or `ended`.
    pub processing_status: &'static str,
    pub processing: u64,
    pub succeeded: u64,
    pub errored: u64,
    pub canceled: u64,
    pub expired: u64,
    /// Unix seconds.
    pub ended_at: Option<u64>,
}

/// The Anthropic view of `entry` (see [`openai`]).
pub(crate) fn anthropic(entry: &BatchEntry, job: Option<&JobSummary>) -> AnthropicView {
    let total = entry.record.total;
    let Some(job) = job else {
        let processing_status = if entry.cancelling_at.is_some() { "canceling" } else { "in_progress" };
        return AnthropicView { processing_status, processing: total, ..AnthropicView::default() };
    };
    let c = &job.counts;
    let ended = JobStatus::ENDED.contains(&job.status);
    AnthropicView {
        processing_status: match () {
            () if ended => "ended",
            () if entry.cancelling_at.is_some() => "canceling",
            () => "in_progress",
        },
        processing: total.saturating_sub(c.finished()),
        succeeded: c.succeeded,
        errored: c.failed,
        canceled: c.cancelled,
        expired: c.expired,
        ended_at: if ended { job.finished_at_ms.map(|ms| ms / 1000) } else { None },
    }
}

/// Unix seconds as RFC 3339 (UTC), as Anthropic's timestamps are written.
pub(crate) fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::store::{Api, BatchRecord};
    use fleet::wire::JobCounts;

    fn entry(cancelling: bool) -> BatchEntry {
        BatchEntry {
            ended: None,
            record: BatchRecord {
                id: "batch_1".into(),
                owner: "o".into(),
                api: Api::OpenAi,
                job_id: "job_1".into(),
                input_file_id: "file-1".into(),
                endpoint: "/v1/chat/completions".into(),
                completion_window: "24h".into(),
                metadata: None,
                provider: "mock".into(),
                total: 10,
                created_at: 100,
                expires_at: None,
            },
            cancelling_at: cancelling.then_some(150),
        }
    }

    fn job(status: JobStatus, succeeded: u64, failed: u64, cancelled: u64) -> JobSummary {
        JobSummary {
            job_id: "job_1".into(),
            provider: "mock".into(),
            mode: Some(fleet::batch::JobMode::Batch),
            status,
            counts: JobCounts { total: 10, succeeded, failed, cancelled, expired: 0 },
            submitted_at_ms: 100_000,
            finished_at_ms: JobStatus::ENDED.contains(&status).then_some(200_000),
            rate_per_s: 0.0,
            reason: None,
            progress: None,
            usage: None,
            dead_lettered: 0,
            webhook: None,
        }
    }

    #[test]
    fn every_job_state_maps_to_an_openai_status() {
        let cases = [
            (None, false, "validating"),
            (None, true, "cancelling"),
            (Some(job(JobStatus::Submitting, 0, 0, 0)), false, "validating"),
            (Some(job(JobStatus::InProgress, 3, 0, 0)), false, "in_progress"),
            (Some(job(JobStatus::InProgress, 3, 0, 0)), true, "cancelling"),
            (Some(job(JobStatus::InProgress, 9, 1, 0)), false, "finalizing"),
            (Some(job(JobStatus::Completed, 9, 1, 0)), false, "completed"),
            (Some(job(JobStatus::Failed, 0, 10, 0)), false, "failed"),
            (Some(job(JobStatus::Cancelled, 4, 0, 6)), true, "cancelled"),
            (Some(job(JobStatus::Expired, 4, 0, 0)), false, "expired"),
        ];
        for (j, cancelling, want) in cases {
            let v = openai(&entry(cancelling), j.as_ref());
            assert_eq!(v.status, want, "{j:?}");
        }
        let v = openai(&entry(true), Some(&job(JobStatus::Cancelled, 4, 0, 6)));
        assert_eq!((v.completed, v.failed, v.total), (4, 6, 10), "counts add up");
        assert_eq!((v.cancelling_at, v.cancelled_at, v.ended), (Some(150), Some(200), true));
        let v = openai(&entry(false), Some(&job(JobStatus::Completed, 10, 0, 0)));
        assert_eq!((v.completed_at, v.in_progress_at), (Some(200), Some(100)));
    }

    #[test]
    fn anthropic_counts_and_states() {
        let v = anthropic(&entry(false), Some(&job(JobStatus::InProgress, 3, 1, 0)));
        assert_eq!((v.processing_status, v.processing, v.succeeded, v.errored), ("in_progress", 6, 3, 1));
        let v = anthropic(&entry(true), Some(&job(JobStatus::Cancelled, 3, 1, 6)));
        assert_eq!((v.processing_status, v.canceled, v.ended_at), ("ended", 6, Some(200)));
        assert_eq!(anthropic(&entry(true), None).processing_status, "canceling");
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_724_179_044), "2024-08-20T18:37:24Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
