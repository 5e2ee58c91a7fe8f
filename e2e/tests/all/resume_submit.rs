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
    let resumed = harness::Submitted::from_json(&out.stdout).unwrap();
    assert_eq!(resumed.job_id, job, "the same job");
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

/// The record of `file`'s unfinished submission, if there is one.
fn submission_record(file: &std::path::Path) -> Option<Value> {
    let name = format!("{}.submitting.json", file.file_name()?.to_str()?);
    serde_json::from_slice(&std::fs::read(file.with_file_name(name)).ok()?).ok()
}

/// Waits until the record of `file` shows at least `n` confirmed items. Polled every few
/// milliseconds, not at [`eventually`]'s pace: a submission confirms thousands a second and
/// must be caught half-way.
fn until_confirmed(file: &std::path::Path, n: u64) {
    let start = std::time::Instant::now();
    while submission_record(file).and_then(|r| r["confirmed"].as_u64()).unwrap_or(0) < n {
        assert!(start.elapsed() < Duration::from_secs(60), "{n} items not confirmed within 60 s");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Issue 21, item 10: the record advances with the confirms, so a submit SIGKILLed half-way
/// (no chance to write anything on its way out) and run again publishes at most its
/// confirm window a second time. No worker runs: every publish stays on the job's items
/// queue, where the duplicates are counted.
#[test]
fn a_killed_submit_publishes_at_most_its_confirm_window_again() {
    const LINES: u64 = 100_000;
    // The default `producer.confirm_window`, spelled out because the bound is this number.
    const WINDOW: u64 = 2048;
    let mock = Mock::start(&[]);
    let fleet = Fleet::new("resume-dups", &mock.url, &format!("[producer]\nconfirm_window = {WINDOW}\n"));
    let input = fleet.dir.join("in.jsonl");
    write_requests(&input, LINES as usize);
    let args = ["submit", input.to_str().unwrap(), "--provider", MOCK, "--json"];

    let mut first = fleet.producer_spawn(&args);
    // A fifth of the file: a second or two into the publishing.
    until_confirmed(&input, LINES / 5);
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(10));
    let record = submission_record(&input).expect("the record of the unfinished submission stays");
    let job = record["job_id"].as_str().unwrap().to_string();
    let at_kill = record["confirmed"].as_u64().unwrap();
    assert!(at_kill < LINES, "killed half-way: {at_kill} of {LINES} confirmed");

    let out = fleet.producer(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&format!("from item {at_kill} of {LINES}")), "{err}");
    let queued = u64::from(fleet.queue_len(&fleet.topology().job_items_queue(MOCK, &job)).expect("items queue"));
    assert!(queued >= LINES, "every item is queued: {queued} of {LINES}");
    let twice = queued - LINES;
    eprintln!("killed at {at_kill} confirmed; {twice} of {LINES} items published twice (window {WINDOW})");
    assert!(twice <= WINDOW, "{twice} items published twice, more than the confirm window ({WINDOW})");
    fleet.cleanup(&[&job]);
}

/// Issue 21, item 14: SIGINT stops a submit cleanly (it waits for the confirms of what it
/// published, writes the record, exits non-zero saying how to resume), and the same command
/// then resumes from where the broker was: the provider is called at most once per line
/// plus the confirm window.
#[test]
fn an_interrupted_submit_records_its_progress_and_the_same_command_resumes_it() {
    const LINES: u64 = 10_000;
    // Small, so that the submission lasts long enough to be interrupted half-way.
    const WINDOW: u64 = 32;
    let mock = Mock::start(&[]);
    let fleet = Fleet::new("resume-int", &mock.url, &format!("[producer]\nconfirm_window = {WINDOW}\n"));
    let _w = fleet.worker("w1", &[]);
    let input = fleet.dir.join("in.jsonl");
    write_requests(&input, LINES as usize);
    let args = ["submit", input.to_str().unwrap(), "--provider", MOCK, "--json"];

    let mut first = fleet.producer_spawn(&args);
    until_confirmed(&input, LINES / 5);
    first.signal("INT");
    let code = first.wait_exit(Duration::from_secs(20));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut first.child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(code, Some(1), "exits non-zero, not killed by the signal: {err}");
    assert!(err.contains("run the same command again"), "{err}");
    let record = submission_record(&input).expect("the record is written on the way out");
    let job = record["job_id"].as_str().unwrap().to_string();
    let at_stop = record["confirmed"].as_u64().unwrap();
    assert!((LINES / 5..LINES).contains(&at_stop), "stopped half-way: {at_stop} of {LINES} confirmed");
    assert!(err.contains(&format!("holds {at_stop} of the {LINES} requests of job {job}")), "{err}");

    let out = fleet.producer(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&format!("resuming the submission of job {job} from item {at_stop} of {LINES}")), "{err}");
    let lines = fleet.collect(&job);
    assert_eq!(assert_exactly_once(&lines, LINES as usize).get(&200), Some(&LINES));
    let calls = mock.stats()["requests"].as_u64().unwrap();
    eprintln!("interrupted at {at_stop} confirmed; {calls} provider calls for {LINES} lines (window {WINDOW})");
    assert!(calls <= LINES + WINDOW, "{calls} provider calls for {LINES} lines");
    fleet.cleanup(&[&job]);
}
