//! A dead `submit` strands nothing (issue 9, point 5): a submission killed half-way is
//! finished by running `submit` again with the same file, under the same job id, and the
//! job completes with every item exactly once.

use std::time::Duration;

use e2e::*;

const N: usize = 20_000;

#[test]
fn a_killed_submit_is_resumed_with_the_same_file_and_the_job_completes() {
    let mock = Mock::start(&[]);
    // A small confirm window keeps the first run slow enough to be killed half-way.
    let fleet = Fleet::new("resume", &mock.url, "[producer]\nconfirm_window = 32\n");
    let _w = fleet.worker("w1", &[]);
    let input = fleet.dir.join("in.jsonl");
    write_requests(&input, N);
    let record_path = fleet.dir.join("in.jsonl.submitting.json");
    let record = || -> Option<Value> { serde_json::from_slice(&std::fs::read(&record_path).ok()?).ok() };

    let mut first = fleet.producer_spawn(&["submit", input.to_str().unwrap(), "--provider", "mock", "--json"]);
    eventually(Duration::from_secs(60), "part of the file confirmed", || {
        record().is_some_and(|r| r["confirmed"].as_u64().unwrap_or(0) >= 2048)
    });
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(10));
    let r = record().expect("the record of the unfinished submission stays");
    let job = r["job_id"].as_str().unwrap().to_string();
    let confirmed = r["confirmed"].as_u64().unwrap();
    assert!(confirmed < N as u64, "killed half-way: {confirmed} of {N} confirmed");

    // Another file cannot pass for it.
    let other = fleet.dir.join("other.jsonl");
    write_requests(&other, 10);
    let out = fleet.producer(&["submit", other.to_str().unwrap(), "--provider", "mock", "--resume", &job]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));

    let out = fleet.producer(&["submit", input.to_str().unwrap(), "--provider", "mock", "--resume", &job, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let resumed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(resumed["job_id"], job.as_str(), "the same job");
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("from item {confirmed}")));
    assert!(!record_path.exists(), "the record is deleted once the submission completes");

    let lines = fleet.collect(&job);
    assert_eq!(assert_exactly_once(&lines, N).get(&200), Some(&(N as u64)));
    let status = fleet.final_status(&job);
    assert_eq!(status["status"], "completed", "{status}");
    assert_eq!(status["succeeded"].as_u64(), Some(N as u64), "{status}");
    // Items published twice (in flight when the first run died) were called at most twice.
    assert!(mock.status_count(200) >= N as u64);
    fleet.cleanup(&[&job]);
}

#[test]
fn a_killed_submit_shows_submitting_then_ends_failed_with_the_published_items_results() {
    let mock = Mock::start(&[]);
    let fleet = Fleet::new("abandon", &mock.url, "[producer]\nconfirm_window = 32\nsubmit_timeout_s = 3\n");
    let _w = fleet.worker("w1", &[]);
    let input = fleet.dir.join("in.jsonl");
    write_requests(&input, N);
    let record_path = fleet.dir.join("in.jsonl.submitting.json");
    let record = || -> Option<Value> { serde_json::from_slice(&std::fs::read(&record_path).ok()?).ok() };
    let mut first = fleet.producer_spawn(&["submit", input.to_str().unwrap(), "--provider", "mock"]);
    eventually(Duration::from_secs(60), "part of the file confirmed", || {
        record().is_some_and(|r| r["confirmed"].as_u64().unwrap_or(0) >= 1024)
    });
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(10));
    let r = record().unwrap();
    let job = r["job_id"].as_str().unwrap().to_string();
    let confirmed = r["confirmed"].as_u64().unwrap();

    let out = fleet.producer(&["status", &job, "--json"]);
    let status: Value = serde_json::from_slice(&out.stdout).expect("status --json");
    assert_eq!(status["status"], "submitting", "{status}");

    let output = fleet.dir.join("out.jsonl");
    let out = fleet.wait(&job, &output, 120);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("incomplete_submission"), "{err}");
    let lines = read_output(&output);
    let ids: std::collections::HashSet<_> =
        lines.iter().map(|l| l["custom_id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids.len(), lines.len(), "each published item once");
    assert!(lines.len() as u64 >= confirmed && lines.len() < N, "{} results, {confirmed} confirmed", lines.len());

    let status = fleet.final_status(&job);
    assert_eq!(status["status"], "failed", "{status}");
    assert_eq!(status["reason"], "incomplete_submission", "{status}");
    assert_eq!(status["succeeded"].as_u64(), Some(lines.len() as u64), "{status}");
    fleet.cleanup(&[&job]);
}
