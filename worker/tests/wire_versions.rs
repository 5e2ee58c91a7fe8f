//! The tracker's checkpoint across releases: the checkpoint the previous release (772545e,
//! before wire versions) wrote restores in this one with its jobs, bitmaps and counters,
//! and folding goes on from it; this release writes its checkpoint with its version and
//! reads it back; a checkpoint of another major is refused (the takeover then parks it, see
//! `tracker/checkpoint.rs`). The fixture is made by `fleet/tests/fixtures/772545e/generate.rs`
//! with the other message kinds, which `fleet/tests/wire_versions.rs` checks.

use fleet::wire::JobStatus;
use worker::tracker::state::State;

const CHECKPOINT: &str = include_str!("../../fleet/tests/fixtures/772545e/checkpoint.json");
const JOB: &str = "job_0123456789abcdef";

#[test]
fn the_previous_releases_checkpoint_restores_and_folding_goes_on() {
    let state: State = serde_json::from_str(CHECKPOINT).expect("the 772545e checkpoint restores");
    assert_eq!(state.checkpoint_seq, 0, "absent before, so the default");
    assert_eq!(state.jobs_total["openai/submitted"], 1);
    assert_eq!((state.items_total["openai/succeeded"], state.items_total["openai/failed"]), (1, 1));
    assert_eq!(state.usage_total["openai"]["other"].input_tokens, 12);
    let job = &state.jobs[JOB];
    assert_eq!((job.total, job.submitting, job.max_cost), (Some(10), true, Some(2.5)));
    assert_eq!((job.counts.succeeded, job.counts.failed, job.in_delay), (1, 1, 1));
    assert_eq!(job.last_error.as_ref().map(|(e, _)| e.as_str()), Some("every call timed out"));
    for index in [3, 7] {
        assert!(state.has_result(JOB, index), "index {index} was done");
    }
    assert!(!state.has_result(JOB, 4), "index 4 waits in a delay queue");
    let summary = job.summary(1_765_000_300_000);
    assert_eq!((summary.status, summary.counts.pending()), (JobStatus::Submitting, 8));
    assert_eq!(summary.progress.map(|p| p.in_delay_queues), Some(1));
    assert_eq!(summary.counts.succeeded + summary.counts.failed, 2);
}

#[test]
fn this_release_writes_its_checkpoint_with_its_version_and_reads_it_back() {
    let state: State = serde_json::from_str(CHECKPOINT).unwrap();
    let written = serde_json::to_string(&state).unwrap();
    assert!(written.starts_with(r#"{"v":"1.1","#), "{written}");
    let back: State = serde_json::from_str(&written).expect("this release's checkpoint restores");
    assert_eq!(back, state);
    assert_eq!(serde_json::to_string(&back).unwrap(), written);
}

#[test]
fn a_checkpoint_of_another_major_is_refused_not_misread() {
    let newer = CHECKPOINT.replacen('{', r#"{"v":"2.0","#, 1);
    let err = serde_json::from_str::<State>(&newer).unwrap_err().to_string();
    assert!(err.contains("wire version 2.0 is not supported"), "{err}");
    let newer_minor = CHECKPOINT.replacen('{', r#"{"v":"1.4","kept_by_1_4":[1,2],"#, 1);
    let state: State = serde_json::from_str(&newer_minor).expect("a newer minor restores");
    assert_eq!(state.jobs[JOB].total, Some(10));
}
