//! Batch mode as real files and accounts meet it (issue 23): chunks follow endpoints, not
//! line order, and provider batches are admitted against the account's enqueued-token
//! limit. The real worker and producer binaries, the real RabbitMQ, and the mock
//! provider's OpenAI Batch API, whose `/stats` counts the batches created per tag, the
//! batches failed for a full enqueued-token queue and the most batches in progress at once.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use e2e::*;

/// The poll interval of the tests' provider.
const POLL_S: u64 = 1;

/// A fleet whose `mock` provider has a batch API polled every second, with `extra` provider
/// keys.
fn fleet(test: &str, mock: &Mock, extra: &str) -> Fleet {
    let toml = format!("[providers.mock]\nbatch = true\nbatch_poll_interval_s = {POLL_S}\n{extra}");
    Fleet::new(test, &mock.url, &toml)
}

/// Deletes what the jobs left on the broker: the harness's cleanup and the chunk queues.
fn tidy(f: &Fleet, jobs: &[&str]) {
    f.cleanup(jobs);
    f.amqp(|conn, t| async move {
        let ch = conn.create_channel().await.expect("channel");
        let _ = t.delete_chunk_queues(&ch, "mock", POLL_S).await;
    });
}

/// Writes `n` requests whose endpoints are interleaved as users' files are: runs of one to
/// three chat lines and embeddings lines by turns (custom ids `req-<i>`). Returns which
/// lines are embeddings.
fn write_interleaved(path: &Path, n: usize) -> Vec<bool> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create input"));
    let mut embeddings = Vec::with_capacity(n);
    for i in 0..n {
        // Runs of 1, 2, 3, 1, 2, 3, ... lines, alternating endpoints.
        let run = (i / 2) % 3;
        let is_embedding = (i + run) % 2 == 1;
        if is_embedding {
            writeln!(
                f,
                r#"{{"custom_id":"req-{i}","method":"POST","url":"/v1/embeddings","body":{{"model":"mock-embed","input":"number {i}"}}}}"#
            )
        } else {
            writeln!(
                f,
                r#"{{"custom_id":"req-{i}","method":"POST","url":"/v1/chat/completions","body":{{"model":"mock-model","messages":[{{"role":"user","content":"Say something about the number {i}."}}]}}}}"#
            )
        }
        .expect("write input");
        embeddings.push(is_embedding);
    }
    embeddings
}

/// `producer submit FILE --provider mock --json ARGS...`: the job id, and what it printed
/// on stderr.
fn submit(f: &Fleet, file: &Path, args: &[&str]) -> (String, String) {
    let mut all = vec!["submit", file.to_str().unwrap(), "--provider", "mock", "--json"];
    all.extend_from_slice(args);
    let out = f.producer(&all);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "submit failed: {stderr}");
    (harness::Submitted::from_json(&out.stdout).unwrap().job_id, stderr)
}

/// Batches the mock created for `job`, per tag.
fn created(mock: &Mock, job: &str) -> HashMap<String, u64> {
    let stats = mock.stats();
    let map = stats["batches"]["openai_created"].as_object().cloned().unwrap_or_default();
    map.into_iter().filter(|(tag, _)| tag.contains(job)).map(|(tag, n)| (tag, n.as_u64().unwrap_or(0))).collect()
}

fn assert_quiet(f: &Fleet, workers: &[&str]) {
    for w in workers {
        let log = f.worker_log(w);
        let loud: Vec<&str> = log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
        assert!(loud.is_empty(), "{w} logged warnings:\n{}", loud.join("\n"));
    }
}

fn log_lines(f: &Fleet, workers: &[&str], needle: &str) -> usize {
    workers.iter().map(|w| f.worker_log(w).lines().filter(|l| l.contains(needle)).count()).sum()
}

#[test]
fn interleaved_endpoints_make_one_provider_batch_each() {
    let mock = Mock::start(&["--batch-complete-ms", "1500"]);
    let f = fleet("chunks_mixed", &mock, "");
    let workers = ["cm-w1", "cm-w2"];
    let _w: Vec<Proc> = workers.iter().map(|w| f.worker(w, &[])).collect();
    let file = f.dir.join("mixed.jsonl");
    let embeddings = write_interleaved(&file, 3000);
    let switches = embeddings.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(switches > 1000, "the file changes endpoint {switches} times");

    // The dry run shows the two chunks and publishes nothing.
    let out = f.producer(&["submit", file.to_str().unwrap(), "--provider", "mock", "--mode", "batch", "--dry-run"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "dry run failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("/v1/chat/completions") && text.contains("/v1/embeddings"), "{text}");
    assert!(text.contains("2 chunks"), "{text}");

    // `auto` says which mode it picked, and why: the default 24 h deadline allows the window.
    let (job, said) = submit(&f, &file, &["--mode", "auto"]);
    assert!(said.contains("mode batch: provider mock has a batch API"), "{said}");
    assert_two_batches_each_answer_its_own(&f, &mock, &job, &embeddings);
    assert_quiet(&f, &workers);
    tidy(&f, &[&job]);
}

/// The job of an interleaved file ran every request once, each answered by its own
/// endpoint, in exactly two provider batches each created once.
fn assert_two_batches_each_answer_its_own(f: &Fleet, mock: &Mock, job: &str, embeddings: &[bool]) {
    let n = embeddings.len();
    let lines = f.collect(job);
    let by_status = assert_exactly_once(&lines, n);
    assert_eq!(by_status.get(&200), Some(&(n as u64)), "every request succeeded: {by_status:?}");
    // Every answer is the one of its own request: an embeddings line got a list of vectors,
    // a chat line a completion (a chunk's items are not contiguous, their ids must still map).
    for line in &lines {
        let i: usize = line["custom_id"].as_str().unwrap().trim_start_matches("req-").parse().unwrap();
        let object = line["response"]["body"]["object"].as_str().unwrap_or_default();
        let want = if embeddings[i] { "list" } else { "chat.completion" };
        assert_eq!(object, want, "req-{i} got the answer of another endpoint: {line}");
    }
    let status = f.final_status(job);
    assert_eq!(status["status"], "completed", "{status}");
    assert_eq!(status["succeeded"].as_u64(), Some(n as u64), "{status}");
    // Two provider batches, each created once, no request in two batches.
    let tags = created(mock, job);
    assert_eq!(tags.len(), 2, "one provider batch per endpoint: {tags:?}");
    assert!(tags.values().all(|n| *n == 1), "a chunk's batch was created more than once: {tags:?}");
    assert_eq!(mock.stats()["batches"]["resubmitted_custom_ids"], 0);
}

/// A batch-mode submission of an interleaved file killed while it publishes the second
/// endpoint's lines, then run again: the resumed run skips what the record says was
/// confirmed (it counts positions of the by-endpoint order), and the job still makes two
/// provider batches with every request once.
#[test]
fn a_killed_submit_of_an_interleaved_file_resumes_in_the_same_order() {
    let mock = Mock::start(&["--batch-complete-ms", "1500"]);
    // A small confirm window keeps the first run slow enough to be killed half-way.
    let f = fleet("chunks_resume", &mock, "[producer]\nconfirm_window = 32\n");
    let workers = ["cr-w1"];
    let _w: Vec<Proc> = workers.iter().map(|w| f.worker(w, &[])).collect();
    let file = f.dir.join("mixed.jsonl");
    let embeddings = write_interleaved(&file, 6000);
    let chat = embeddings.iter().filter(|e| !**e).count() as u64;
    let record_path = f.dir.join("mixed.jsonl.submitting.json");
    let record = || -> Option<Value> { serde_json::from_slice(&std::fs::read(&record_path).ok()?).ok() };
    let mut first =
        f.producer_spawn(&["submit", file.to_str().unwrap(), "--provider", "mock", "--mode", "batch", "--json"]);
    let start = std::time::Instant::now();
    // Polled every few milliseconds: a submission confirms thousands a second.
    while record().and_then(|r| r["confirmed"].as_u64()).unwrap_or(0) < chat + 100 {
        assert!(start.elapsed() < Duration::from_secs(60), "the second endpoint was not reached in 60 s");
        std::thread::sleep(Duration::from_millis(2));
    }
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(10));
    let r = record().expect("the record of the unfinished submission stays");
    let job = r["job_id"].as_str().unwrap().to_string();
    let confirmed = r["confirmed"].as_u64().unwrap();
    assert!(confirmed > chat && confirmed < 6000, "killed in the second endpoint's pass: {confirmed}");
    assert_eq!(r["by_endpoint"], true, "{r}");
    let (again, said) = submit(&f, &file, &["--mode", "batch"]);
    assert_eq!(again, job, "the same job");
    assert!(said.contains(&format!("from item {confirmed}")), "{said}");
    assert_two_batches_each_answer_its_own(&f, &mock, &job, &embeddings);
    assert_quiet(&f, &workers);
    tidy(&f, &[&job]);
}

/// Estimated tokens of the file's requests, as the fleet and the mock count them.
fn file_tokens(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            fleet::tokens::estimate_request_tokens(v["body"].to_string().as_bytes())
        })
        .collect()
}

/// Three chunks of 100 requests against an account whose enqueued-token limit holds one
/// chunk at a time: `budget` says whether the fleet knows the limit (`batch_enqueued_tokens`)
/// or only learns it from the provider failing batches (`token_limit_exceeded`).
fn through_a_full_queue(test: &str, budget: bool) {
    // Its own scratch directory: the fleet's is made afresh by `Fleet::new`.
    let dir = scratch(&format!("{test}_input"));
    let file = dir.join("in.jsonl");
    write_requests(&file, 300);
    let tokens = file_tokens(&file);
    let largest_chunk: u64 = tokens.chunks(100).map(|c| c.iter().sum::<u64>()).max().unwrap();
    let smallest_chunk: u64 = tokens.chunks(100).map(|c| c.iter().sum::<u64>()).min().unwrap();
    // One chunk fits, two never do.
    let limit = largest_chunk + smallest_chunk / 2;
    let mock = Mock::start(&["--batch-complete-ms", "1500", "--batch-enqueued-tokens", &limit.to_string()]);
    let extra = if budget {
        format!("batch_max_requests = 100\nbatch_enqueued_tokens = {limit}\n")
    } else {
        "batch_max_requests = 100\n".to_string()
    };
    let f = fleet(test, &mock, &extra);
    let workers = ["fq-w1"];
    let _w: Vec<Proc> = workers.iter().map(|w| f.worker(w, &[])).collect();
    let (job, _) = submit(&f, &file, &["--mode", "batch"]);
    let lines = f.collect(&job);
    let by_status = assert_exactly_once(&lines, 300);
    assert_eq!(by_status.get(&200), Some(&300), "every item succeeded, no chunk was rejected: {by_status:?}");
    let status = f.final_status(&job);
    assert_eq!((status["status"].as_str(), status["succeeded"].as_u64()), (Some("completed"), Some(300)), "{status}");
    let stats = mock.stats()["batches"].clone();
    assert_eq!(stats["rejected"], 0, "{stats}");
    assert_eq!(stats["most_in_progress"], 1, "never more than one batch in progress: {stats}");
    assert_eq!(stats["resubmitted_custom_ids"], 0, "no request reached two accepted batches: {stats}");
    let failed = stats["token_limit_failed"].as_u64().unwrap();
    let tags = created(&mock, &job);
    if budget {
        // The fleet's own admission kept the queue from overflowing: each chunk created
        // once, the later ones after waiting.
        assert_eq!(failed, 0, "{stats}");
        assert_eq!(tags.len(), 3, "{tags:?}");
        assert!(tags.values().all(|n| *n == 1), "{tags:?}");
        assert!(log_lines(&f, &workers, "the chunk waits") >= 2, "the later chunks waited for admission");
    } else {
        // The provider failed the overflowing batches; their chunks waited and were created
        // again under new tags: three accepted batches plus the failed ones.
        assert!(failed >= 2, "{stats}");
        assert_eq!(tags.values().sum::<u64>(), 3 + failed, "{tags:?}");
        assert!(tags.keys().any(|t| t.contains("/g1")), "a new generation's tag: {tags:?}");
        assert!(log_lines(&f, &workers, "token_limit_exceeded") >= 2);
    }
    // The waits are counted by reason, and the dashboard's panel shows them.
    let reason = if budget { "budget" } else { "token_limit_exceeded" };
    let waits = format!("sum(batch_admission_waits_total{{namespace=\"{}\",reason=\"{reason}\"}})", f.ns);
    eventually(Duration::from_secs(30), "the admission waits scraped", || prom_value(&waits).is_some_and(|n| n >= 2.0));
    let (_, panel) = dashboard_queries_for(&f.ns)
        .into_iter()
        .find(|(title, _)| title == "Admission waits by reason")
        .expect("the dashboard has the admission panel");
    eventually(Duration::from_secs(30), "the panel shows the waits", || {
        prom_query(&panel)
            .iter()
            .any(|(labels, rate)| labels.get("reason").and_then(|r| r.as_str()) == Some(reason) && *rate > 0.0)
    });
    assert_quiet(&f, &workers);
    tidy(&f, &[&job]);
}

#[test]
fn batches_are_admitted_one_at_a_time_under_the_enqueued_token_budget() {
    through_a_full_queue("chunks_budget", true);
}

#[test]
fn batches_failed_for_a_full_queue_wait_and_are_created_again() {
    through_a_full_queue("chunks_full_queue", false);
}
