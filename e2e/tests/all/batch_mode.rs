//! Provider batch mode end to end: the real worker and producer binaries, the real
//! RabbitMQ, Pushgateway and Prometheus, and the mock provider's OpenAI Batch and Anthropic
//! Message Batches APIs (whose `/stats` counts the batches created per chunk tag, so "created
//! once" is proven by the provider side, not by our own logs).
//!
//! Polls every second (`batch_poll_interval_s = 1`) and short mock batches keep these tests
//! to seconds per job.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use e2e::*;

/// The poll interval of the tests' providers.
const POLL_S: u64 = 1;

/// A fleet with two batch-capable providers on the mock: `mock` (OpenAI kind) and `claude`
/// (Anthropic kind), each cutting chunks of at most `max_requests` requests.
fn batch_fleet(test: &str, mock: &Mock, max_requests: u64) -> Fleet {
    let extra = format!(
        "[providers.mock]\nbatch = true\nbatch_poll_interval_s = {POLL_S}\nbatch_max_requests = {max_requests}\n\
         [providers.claude]\nkind = \"anthropic\"\nbase_url = \"{url}\"\ntimeout_s = 10\nmax_in_flight = 64\n\
         batch = true\nbatch_poll_interval_s = {POLL_S}\nbatch_max_requests = {max_requests}\n\
         [providers.mock.prices.\"mock-model\"]\ninput_per_mtok = 1000.0\noutput_per_mtok = 3000.0\n",
        url = mock.url
    );
    Fleet::new(test, &mock.url, &extra)
}

/// Deletes what the fleet's jobs left on the broker: the harness's own cleanup plus the
/// `claude` provider's queues and both providers' chunk queues.
fn tidy(f: &Fleet, jobs: &[&str]) {
    f.cleanup(jobs);
    f.amqp(|conn, t| async move {
        let ch = conn.create_channel().await.expect("channel");
        for p in ["mock", "claude"] {
            let _ = t.delete_chunk_queues(&ch, p, POLL_S).await;
        }
        let _ = ch.queue_delete(t.items_queue("claude").into(), Default::default()).await;
        for s in TEST_DELAY_TIERS_S {
            let _ = ch.queue_delete(t.delay_queue("claude", *s).into(), Default::default()).await;
        }
    });
}

/// Writes `n` Anthropic Messages requests (custom ids `req-<i>`) to `path`.
fn write_messages_requests(path: &Path, n: usize) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create input"));
    for i in 0..n {
        writeln!(
            f,
            r#"{{"custom_id":"req-{i}","method":"POST","url":"/v1/messages","body":{{"model":"mock-model","max_tokens":64,"messages":[{{"role":"user","content":"Say something about the number {i}."}}]}}}}"#
        )
        .expect("write input");
    }
}

/// `producer submit FILE --provider P --json ARGS...` ([`harness::submit`]); the job id.
fn submit(f: &Fleet, file: &Path, provider: &str, args: &[&str]) -> String {
    harness::submit(&f.config, file, provider, args).unwrap().job_id
}

fn input(f: &Fleet, name: &str, n: usize, anthropic: bool) -> PathBuf {
    let path = f.dir.join(name);
    if anthropic {
        write_messages_requests(&path, n);
    } else {
        write_requests(&path, n);
    }
    path
}

/// Batches the mock created per tag, for one API (`openai_created`, `anthropic_created`),
/// only those of `job` (OpenAI tags name the job in their metadata; Anthropic tags name the
/// first custom id, which is per chunk: all of them when `job` is `None`).
fn created(mock: &Mock, api: &str, job: Option<&str>) -> HashMap<String, u64> {
    let stats = mock.stats();
    let map = stats["batches"][api].as_object().cloned().unwrap_or_default();
    map.into_iter()
        .filter(|(tag, _)| job.is_none_or(|j| tag.contains(j)))
        .map(|(tag, n)| (tag, n.as_u64().unwrap_or(0)))
        .collect()
}

/// Asserts the mock created exactly one batch per chunk: `chunks` tags, each once, and no
/// custom id in two accepted batches.
fn assert_created_once(mock: &Mock, api: &str, job: Option<&str>, chunks: usize) {
    let tags = created(mock, api, job);
    assert_eq!(tags.len(), chunks, "one provider batch per chunk: {tags:?}");
    assert!(tags.values().all(|n| *n == 1), "a chunk's batch was created more than once: {tags:?}");
    assert_eq!(mock.stats()["batches"]["resubmitted_custom_ids"], 0, "a request reached two batches");
}

/// Output lines by status code / error code (see [`error_codes`]).
fn codes(lines: &[Value]) -> HashMap<Option<String>, usize> {
    error_codes(lines)
}

/// Lines of the workers' logs containing `needle`.
fn log_lines(f: &Fleet, workers: &[&str], needle: &str) -> usize {
    workers.iter().map(|w| f.worker_log(w).lines().filter(|l| l.contains(needle)).count()).sum()
}

fn assert_quiet(f: &Fleet, workers: &[&str]) {
    for w in workers {
        let log = f.worker_log(w);
        let loud: Vec<&str> = log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
        assert!(loud.is_empty(), "{w} logged warnings:\n{}", loud.join("\n"));
    }
}

#[test]
fn the_same_file_online_and_through_both_batch_apis_gives_every_custom_id_once() {
    let mock = Mock::start(&["--batch-complete-ms", "1500"]);
    let f = batch_fleet("batch_same", &mock, 800);
    let workers = ["bs-w1", "bs-w2"];
    let _w: Vec<Proc> = workers.iter().map(|w| f.worker(w, &[])).collect();
    let openai = input(&f, "openai.jsonl", 2000, false);
    let anthropic = input(&f, "anthropic.jsonl", 2000, true);
    let (mut jobs, mut usage) = (Vec::new(), Vec::new());
    for (provider, file, mode) in [
        ("mock", &openai, "online"),
        ("mock", &openai, "batch"),
        ("claude", &anthropic, "online"),
        ("claude", &anthropic, "batch"),
    ] {
        let job = submit(&f, file, provider, &["--mode", mode]);
        let lines = f.collect(&job);
        let by_status = assert_exactly_once(&lines, 2000);
        assert_eq!(by_status.get(&200), Some(&2000), "{provider} {mode}: every request succeeded: {by_status:?}");
        let status = f.final_status(&job);
        assert_eq!(status["status"], "completed", "{provider} {mode}: {status}");
        assert_eq!(status["succeeded"], 2000, "{provider} {mode}: the tracker counted each item once: {status}");
        assert_eq!(status["mode"], mode, "{provider} {mode}: status says the job's mode: {status}");
        usage.push(status["usage"].clone());
        jobs.push((provider, mode, job));
    }
    // The same requests online and in a provider batch: the same tokens, the batch's at
    // half the price (the default `batch_factor`).
    let (online, batch) = (&usage[0], &usage[1]);
    assert!(online["output_tokens"].as_u64().unwrap_or(0) > 0, "{online}");
    for k in ["input_tokens", "output_tokens"] {
        assert_eq!(online[k], batch[k], "{k}: online {online}, batch {batch}");
    }
    let (full, half) = (online["cost"].as_f64().unwrap(), batch["cost"].as_f64().unwrap());
    assert!(full > 0.0 && (half - full / 2.0).abs() < 1e-9 * full, "online {full}, batch {half}");
    // 2,000 requests in chunks of 800: three provider batches per batch-mode job, each
    // created once; the online jobs created none.
    assert_created_once(&mock, "openai_created", Some(&jobs[1].2), 3);
    assert_created_once(&mock, "anthropic_created", None, 3);
    assert_eq!(created(&mock, "openai_created", Some(&jobs[0].2)).len(), 0);
    // Every uploaded input file and every output file is deleted once its chunk is done.
    eventually(Duration::from_secs(20), "provider files deleted", || mock.stats()["batches"]["files_stored"] == 0);
    let stats = mock.stats();
    assert_eq!(stats["batches"]["files_uploaded"], 3, "{stats}");

    // The dashboard's poll-cycle panel has data for this namespace, and the histogram
    // counted exactly the poll passes the workers made (one log line each).
    let polls = log_lines(&f, &workers, "polled provider batch") as f64;
    assert!(polls >= 6.0, "at least one poll per chunk: {polls}");
    let count = format!("sum(batch_poll_cycle_seconds_count{{namespace=\"{}\"}})", f.ns);
    eventually(Duration::from_secs(60), "the poll passes scraped", || prom_value(&count) == Some(polls));
    let (_, panel) = dashboard_queries_for(&f.ns)
        .into_iter()
        .find(|(title, _)| title.starts_with("Poll cycle"))
        .expect("the dashboard has the poll-cycle panel");
    eventually(Duration::from_secs(60), "the poll-cycle panel has data", || {
        prom_query(&panel).iter().any(|(_, v)| v.is_finite())
    });
    // The provider batches panel: the batches seen in progress, at 0 now that all ended.
    let (_, batches) = dashboard_queries_for(&f.ns)
        .into_iter()
        .find(|(title, _)| title.starts_with("Provider batches"))
        .expect("the dashboard has the provider batches panel");
    eventually(Duration::from_secs(60), "the provider batches panel has data", || {
        let series = prom_query(&batches);
        !series.is_empty() && series.iter().all(|(_, v)| *v == 0.0)
    });
    // Provider latency of the batch operations, by operation.
    for op in ["submit", "poll", "fetch"] {
        let q = format!("sum(batch_provider_latency_seconds_count{{namespace=\"{}\",operation=\"{op}\"}})", f.ns);
        eventually(Duration::from_secs(30), &format!("{op} latency scraped"), || prom_value(&q).unwrap_or(0.0) > 0.0);
    }
    assert_quiet(&f, &workers);
    let ids: Vec<&str> = jobs.iter().map(|(_, _, j)| j.as_str()).collect();
    tidy(&f, &ids);
}

/// A worker paused at `point` (see the worker's test seam) is SIGKILLed there; a second
/// worker finishes the job: every item once, every chunk's batch created once.
fn killed_at(test: &str, point: &str, anthropic: bool) {
    let mock = Mock::start(&["--batch-complete-ms", "1500"]);
    let f = batch_fleet(test, &mock, 1000);
    let (provider, api) = if anthropic { ("claude", "anthropic_created") } else { ("mock", "openai_created") };
    let first = f.worker("k-w1", &[("FLEET_TEST_BATCH_PAUSE", point)]);
    let file = input(&f, "in.jsonl", 2000, anthropic);
    let job = submit(&f, &file, provider, &["--mode", "batch"]);
    eventually(Duration::from_secs(60), "the worker reached the pause", || {
        f.worker_log("k-w1").contains(&format!("batch test pause at {point}"))
    });
    first.signal("KILL");
    drop(first);
    let _second = f.worker("k-w2", &[]);
    let lines = f.collect(&job);
    let by_status = assert_exactly_once(&lines, 2000);
    assert_eq!(by_status.get(&200), Some(&2000), "{by_status:?}");
    assert_eq!(f.final_status(&job)["succeeded"], 2000);
    assert_created_once(&mock, api, if anthropic { None } else { Some(&job) }, 2);
    if point == "created" {
        assert!(
            f.worker_log("k-w2").contains("found the chunk's provider batch"),
            "the second worker found the batch the first created"
        );
    }
    tidy(&f, &[&job]);
}

#[test]
fn sigkill_right_after_the_create_call_creates_no_second_batch() {
    killed_at("batch_kill_created", "created", false);
}

#[test]
fn sigkill_right_after_an_anthropic_create_creates_no_second_batch() {
    killed_at("batch_kill_created_a", "created", true);
}

#[test]
fn sigkill_while_polling_loses_nothing() {
    killed_at("batch_kill_polled", "polled", false);
}

#[test]
fn sigkill_while_publishing_fetched_results_writes_each_once() {
    killed_at("batch_kill_publishing", "publishing", false);
}

#[test]
fn expired_requests_end_expired_or_run_online_with_fallback() {
    // Every batch expires with half of its requests answered.
    let mock = Mock::start(&["--batch-complete-ms", "1000", "--batch-expire-rate", "1", "--batch-partial", "0.5"]);
    let f = batch_fleet("batch_expiry", &mock, 50_000);
    let _w = f.worker("e-w1", &[]);
    for anthropic in [false, true] {
        let provider = if anthropic { "claude" } else { "mock" };
        let file = input(&f, &format!("{provider}.jsonl"), 400, anthropic);
        let job = submit(&f, &file, provider, &["--mode", "batch"]);
        let lines = f.collect(&job);
        assert_exactly_once(&lines, 400);
        let c = codes(&lines);
        assert_eq!(c.get(&None), Some(&200), "{provider}: the answered half: {c:?}");
        assert_eq!(c.get(&Some("expired".to_string())), Some(&200), "{provider}: the rest expired: {c:?}");
        let online_before = mock.stats()["requests"].as_u64().unwrap();
        let job = submit(&f, &file, provider, &["--mode", "batch", "--fallback", "online"]);
        let lines = f.collect(&job);
        let by_status = assert_exactly_once(&lines, 400);
        assert_eq!(by_status.get(&200), Some(&400), "{provider}: the expired half ran online: {by_status:?}");
        let online = mock.stats()["requests"].as_u64().unwrap() - online_before;
        assert_eq!(online, 200, "{provider}: exactly the expired requests were called online");
    }
    tidy(&f, &[]);
}

#[test]
fn a_rejected_batch_fails_each_item_with_the_providers_reason() {
    let mock = Mock::start(&["--batch-complete-ms", "500", "--batch-reject-rate", "1"]);
    let f = batch_fleet("batch_rejected", &mock, 50_000);
    let _w = f.worker("r-w1", &[]);
    let mut jobs = Vec::new();
    for anthropic in [false, true] {
        let provider = if anthropic { "claude" } else { "mock" };
        let file = input(&f, &format!("{provider}.jsonl"), 100, anthropic);
        let job = submit(&f, &file, provider, &["--mode", "batch"]);
        let lines = f.collect(&job);
        assert_exactly_once(&lines, 100);
        let c = codes(&lines);
        assert_eq!(c.get(&Some("batch_rejected".to_string())), Some(&100), "{provider}: {c:?}");
        for l in &lines {
            assert!(!l["error"]["message"].as_str().unwrap_or("").is_empty(), "the provider's reason is kept: {l}");
        }
        assert_eq!(f.final_status(&job)["failed"], 100);
        jobs.push(job);
    }
    assert!(mock.stats()["batches"]["rejected"].as_u64().unwrap() >= 2);
    let ids: Vec<&str> = jobs.iter().map(String::as_str).collect();
    tidy(&f, &ids);
}

#[test]
fn cancel_in_the_middle_keeps_the_partial_results() {
    // Batches take a minute; a cancel cuts them short with half of their requests answered.
    let mock = Mock::start(&["--batch-complete-ms", "60000", "--batch-partial", "0.5"]);
    let f = batch_fleet("batch_cancel", &mock, 50_000);
    let _w = f.worker("c-w1", &[]);
    let file = input(&f, "in.jsonl", 400, false);
    let job = submit(&f, &file, "mock", &["--mode", "batch"]);
    eventually(Duration::from_secs(60), "the batch is being polled", || {
        f.worker_log("c-w1").contains("polled provider batch")
    });
    let out = f.producer(&["cancel", &job]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = f.collect(&job);
    assert_exactly_once(&lines, 400);
    let c = codes(&lines);
    let kept = c.get(&None).copied().unwrap_or(0);
    let cancelled = c.get(&Some("cancelled".to_string())).copied().unwrap_or(0);
    assert!(kept >= 200, "the answered part is kept: {c:?}");
    assert!(cancelled > 0 && kept + cancelled == 400, "{c:?}");
    assert_eq!(mock.stats()["batches"]["cancelled"], 1, "the provider batch was cancelled");
    assert_eq!(f.final_status(&job)["status"], "cancelled");
    tidy(&f, &[&job]);
}

#[test]
fn a_120000_line_anthropic_job_becomes_two_chunks() {
    let mock = Mock::start(&["--batch-complete-ms", "1000"]);
    // The Anthropic kind's own limit (100,000 requests a batch) decides the chunks.
    let extra = format!(
        "[providers.claude]\nkind = \"anthropic\"\nbase_url = \"{}\"\nbatch = true\nbatch_poll_interval_s = {POLL_S}\n",
        mock.url
    );
    let f = Fleet::new("batch_two_chunks", &mock.url, &extra);
    let _w = f.worker("t-w1", &[]);
    let file = input(&f, "big.jsonl", 120_000, true);
    let job = submit(&f, &file, "claude", &["--mode", "batch"]);
    let output = f.dir.join("big.out.jsonl");
    let out = f.wait(&job, &output, 600);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = read_output(&output);
    let by_status = assert_exactly_once(&lines, 120_000);
    assert_eq!(by_status.get(&200), Some(&120_000));
    assert_created_once(&mock, "anthropic_created", None, 2);
    tidy(&f, &[&job]);
}

#[test]
fn a_deadline_that_passes_while_the_batch_runs_cancels_it_and_expires_the_rest() {
    // Batches take a minute; the job's deadline is 4 s.
    let mock = Mock::start(&["--batch-complete-ms", "60000", "--batch-partial", "0.5"]);
    let f = batch_fleet("batch_deadline", &mock, 50_000);
    let _w = f.worker("d-w1", &[]);
    let file = input(&f, "in.jsonl", 100, false);
    let job = submit(&f, &file, "mock", &["--mode", "batch", "--deadline", "4s"]);
    let lines = f.collect(&job);
    assert_exactly_once(&lines, 100);
    let c = codes(&lines);
    assert_eq!(c.get(&None), Some(&50), "the answered half is kept: {c:?}");
    assert_eq!(c.get(&Some("expired".to_string())), Some(&50), "the rest expired: {c:?}");
    assert_eq!(mock.stats()["batches"]["cancelled"], 1, "the provider batch was cancelled at the deadline");
    assert_eq!(f.final_status(&job)["status"], "expired");
    tidy(&f, &[&job]);
}

#[test]
fn batch_mode_needs_a_provider_with_a_batch_api_and_auto_falls_back_to_online() {
    let mock = Mock::start(&[]);
    // `plain` has no `batch = true`.
    let extra = format!("[providers.plain]\nkind = \"openai\"\nbase_url = \"{}\"\ntimeout_s = 10\n", mock.url);
    let f = Fleet::new("batch_refused", &mock.url, &extra);
    let file = input(&f, "in.jsonl", 10, false);
    let out = f.producer(&["submit", file.to_str().unwrap(), "--provider", "plain", "--mode", "batch"]);
    assert_eq!(out.status.code(), Some(2), "refused as bad input");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no batch API") && err.contains("providers.plain.batch"), "{err}");
    // `auto` runs it online instead.
    let _w = f.worker("n-w1", &[]);
    let job = submit(&f, &file, "plain", &["--mode", "auto"]);
    let lines = f.collect(&job);
    assert_exactly_once(&lines, 10);
    assert_eq!(mock.stats()["requests"], 10, "called online");
    assert_eq!(f.final_status(&job)["mode"], "online", "status says what auto picked");
    assert!(mock.stats()["batches"]["openai_created"].as_object().is_none_or(|m| m.is_empty()));
    tidy(&f, &[&job]);
    f.amqp(|conn, t| async move {
        let ch = conn.create_channel().await.expect("channel");
        let _ = ch.queue_delete(t.items_queue("plain").into(), Default::default()).await;
        for s in TEST_DELAY_TIERS_S {
            let _ = ch.queue_delete(t.delay_queue("plain", *s).into(), Default::default()).await;
        }
    });
}

/// Issue 21, point 5: a chunk message naming a provider batch that is not its own (anyone
/// who can publish to the chunk queues could write one) makes no worker cancel, read or
/// delete anything at the provider with the fleet's key: the batch is retrieved first and
/// must carry the chunk's tag; the forged chunk is dead-lettered.
#[test]
fn a_forged_chunk_cannot_cancel_or_delete_another_batch() {
    let mock = Mock::start(&["--batch-complete-ms", "60000"]);
    let f = batch_fleet("forgedchunk", &mock, 100);
    let _w = f.worker("w1", &[]);
    let file = input(&f, "in.jsonl", 10, false);
    let job = submit(&f, &file, "mock", &["--mode", "batch"]);
    eventually(Duration::from_secs(30), "the job's batch exists", || {
        mock.stats()["batches"]["openai_created"].as_object().is_some_and(|m| !m.is_empty())
    });
    let listed = get_json(&format!("{}/v1/batches?limit=10", mock.url));
    let victim = listed["data"][0].clone();
    let (batch_id, input_file_id) = (victim["id"].as_str().unwrap(), victim["input_file_id"].as_str().unwrap());
    // A chunk of another job, past its deadline (so a worker that trusted it would cancel
    // the batch), naming the victim's batch and input file.
    let forged = serde_json::json!({
        "job_id": "job_forged", "provider": "mock", "chunk": 0, "start": 0, "end": 1, "total": 1,
        "submitted_at_ms": 0, "deadline_ms": 1, "state": "created", "batch_id": batch_id,
        "input_file_id": input_file_id, "cancel_sent": false,
    });
    let queue = f.topology().chunk_queue("mock");
    f.amqp(|conn, _| async move {
        let ch = fleet::amqp::confirm_channel(&conn).await.unwrap();
        let payload = serde_json::to_vec(&forged).unwrap();
        // Signed with the fleet's key (as by a worker with a bug, or in a fleet without a
        // key): the tag check must still hold. Unsigned, it is refused before any poll
        // (principals::a_forged_unsigned_created_chunk_is_dead_lettered_untouched).
        let props = harness::test_signing_key().sign_props(fleet::amqp::persistent_json(), &payload);
        fleet::amqp::publish_confirmed(&ch, "", &queue, &payload, props).await.unwrap();
    });
    eventually(Duration::from_secs(30), "the forged chunk is dead-lettered", || {
        String::from_utf8_lossy(&f.producer(&["dead", "--json"]).stdout).contains("forged chunk")
    });
    let stats = mock.stats();
    assert_eq!(stats["batches"]["cancelled"], 0, "no cancel reached the provider: {stats}");
    assert_eq!(stats["batches"]["files_deleted"], 0, "no file was deleted: {stats}");
    tidy(&f, &[&job]);
}
