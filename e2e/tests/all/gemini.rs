//! Gemini as a provider kind (issue 24), online and in batch mode: the fleet's `mock`
//! provider is made `kind = "gemini"`, so workers translate each OpenAI-format line into a
//! `generateContent` call (or an inline request of a `batchGenerateContent` batch) on the
//! mock's Gemini routes and the answers back into OpenAI chat completions. Real broker,
//! workers, tracker and Pushgateway; the mock counts what it answered, and the Gemini
//! batches it created per `displayName` (the chunk's tag).

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use e2e::*;

/// The model the test lines name, and its prices per million tokens.
const MODEL: &str = "gemini-2.0-flash";
const INPUT_PER_MTOK: f64 = 1000.0;
const CACHED_PER_MTOK: f64 = 250.0;
const OUTPUT_PER_MTOK: f64 = 4000.0;

/// The poll interval of the batch-mode tests.
const POLL_S: u64 = 1;

/// The fleet's `mock` provider as a Gemini one, with prices for [`MODEL`].
fn gemini(extra: &str) -> String {
    gemini_with("batch = false\n", extra)
}

/// The fleet's `mock` provider as a Gemini one in batch mode, cutting chunks of at most
/// `max_requests` requests.
fn gemini_batch(max_requests: u64) -> String {
    gemini_with(&format!("batch = true\nbatch_poll_interval_s = {POLL_S}\nbatch_max_requests = {max_requests}\n"), "")
}

fn gemini_with(provider: &str, extra: &str) -> String {
    format!(
        "[providers.mock]\nkind = \"gemini\"\n{provider}[providers.mock.prices.\"{MODEL}\"]\ninput_per_mtok = {INPUT_PER_MTOK:.1}\n\
         cached_input_per_mtok = {CACHED_PER_MTOK:.1}\noutput_per_mtok = {OUTPUT_PER_MTOK:.1}\n{extra}"
    )
}

/// `n` OpenAI-format chat lines (`req-<i>`) for [`MODEL`], each with a system message (the
/// mock reports its tokens as cached) and a few sampling settings.
fn write_chat(path: &Path, n: usize) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for i in 0..n {
        writeln!(
            f,
            r#"{{"custom_id":"req-{i}","method":"POST","url":"/v1/chat/completions","body":{{"model":"{MODEL}","max_tokens":64,"temperature":0.2,"messages":[{{"role":"system","content":"You answer in one sentence{}."}},{{"role":"user","content":"Say something about the number {i}."}}]}}}}"#,
            "!".repeat(i % 7)
        )
        .unwrap();
    }
}

#[test]
fn an_openai_file_runs_through_gemini_online_with_usage_summed_exactly() {
    const N: usize = 2_000;
    let mock = Mock::start(&["--latency-ms", "2"]);
    let fleet = Fleet::new("gemini-online", &mock.url, &gemini(""));
    let _w1 = fleet.worker("g1", &[]);
    let _w2 = fleet.worker("g2", &[]);
    let input = fleet.dir.join("in.jsonl");
    write_chat(&input, N);
    let (job, total) = fleet.submit(&input);
    assert_eq!(total, N as u64);
    let lines = fleet.collect(&job);
    let by_status = assert_exactly_once(&lines, N);
    assert_eq!(by_status.get(&200), Some(&(N as u64)), "{by_status:?}");

    // Every answer is an OpenAI chat completion built from the Gemini answer.
    for line in &lines {
        let body = &line["response"]["body"];
        assert_eq!(body["object"], "chat.completion", "{line}");
        assert_eq!(body["model"], MODEL, "{line}");
        assert_eq!(body["choices"][0]["message"]["role"], "assistant");
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        let i = line["custom_id"].as_str().unwrap().trim_start_matches("req-");
        let content = body["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(content.starts_with("mock reply to: Say something about the n"), "{content} for req-{i}");
        assert!(body["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() > 0, "{line}");
    }
    // Every Gemini call went to generateContent; none to an OpenAI route.
    let stats = mock.stats();
    assert_eq!(stats["by_path"]["/v1beta/models/{model}:generateContent"].as_u64(), Some(N as u64), "{stats}");
    assert_eq!(stats["by_path"]["/v1/chat/completions"], Value::Null, "{stats}");

    // The usage the tracker summed is the mock's own count, cached tokens included.
    let reported = &stats["usage"];
    let (input_tokens, cached, output) = (
        reported["input_tokens"].as_u64().unwrap(),
        reported["cached_input_tokens"].as_u64().unwrap(),
        reported["output_tokens"].as_u64().unwrap(),
    );
    assert!(input_tokens > cached && cached > 0 && output > 0, "{reported}");
    let status = fleet.final_status(&job);
    let usage = &status["usage"];
    assert_eq!(usage["input_tokens"].as_u64(), Some(input_tokens), "{status}");
    assert_eq!(usage["cached_input_tokens"].as_u64(), Some(cached), "{status}");
    assert_eq!(usage["output_tokens"].as_u64(), Some(output), "{status}");
    let cost = ((input_tokens - cached) as f64 * INPUT_PER_MTOK
        + cached as f64 * CACHED_PER_MTOK
        + output as f64 * OUTPUT_PER_MTOK)
        / 1e6;
    let tracked = usage["cost"].as_f64().unwrap();
    assert!((tracked - cost).abs() < 1e-6 * cost, "cost {tracked}, want {cost}");
    // Quiet success: nothing went wrong, so no worker warned.
    for w in ["g1", "g2"] {
        let log = fleet.worker_log(w);
        assert!(!log.contains(" WARN ") && !log.contains(" ERROR "), "{w} logged trouble:\n{log}");
    }
    fleet.cleanup(&[&job]);
}

#[test]
fn a_429_with_retry_delay_is_paced_not_failed() {
    // 300 requests a minute (5 a second, a second of burst) while the fleet would send
    // 64 at once: Gemini's 429s carry no Retry-After, only `RetryInfo.retryDelay`.
    const N: usize = 60;
    let mock = Mock::start(&["--rpm", "300"]);
    let fleet = Fleet::new("gemini-429", &mock.url, &gemini(""));
    let _w = fleet.worker("g429", &[]);
    let input = fleet.dir.join("in.jsonl");
    write_chat(&input, N);
    let started = Instant::now();
    let (job, _) = fleet.submit(&input);
    let lines = fleet.collect(&job);
    let elapsed = started.elapsed();
    let by_status = assert_exactly_once(&lines, N);
    assert_eq!(by_status.get(&200), Some(&(N as u64)), "every line succeeded: {by_status:?}");
    let limited = mock.status_count(429);
    eprintln!("{N} requests at 300 rpm in {elapsed:?}: {limited} answered 429");
    assert!(limited > 0, "the mock's limit was reached");
    // The first wave goes out together (up to N - 5 refused before any answer can say
    // anything); after it the worker paces to the delays, so only a handful more follow.
    // A client retrying on its own short backoff (5-200 ms here) would meet the empty
    // bucket several times per request, hundreds of 429s in all.
    assert!(limited <= N as u64 + 15, "{limited} 429s for {N} requests: not paced");
    // The bucket admits 5 a second after its first second: the run cannot be faster.
    assert!(elapsed >= Duration::from_secs(((N - 5) / 5) as u64 - 2), "{elapsed:?}");
    let log = fleet.worker_log("g429");
    assert!(!log.contains(" ERROR "), "{log}");
    fleet.cleanup(&[&job]);
}

#[test]
fn lines_that_cannot_be_translated_are_refused_at_submit_with_their_numbers() {
    let mock = Mock::start(&[]);
    let fleet = Fleet::new("gemini-refused", &mock.url, &gemini(""));
    let input = fleet.dir.join("in.jsonl");
    write_chat(&input, 10);
    let text = std::fs::read_to_string(&input).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines[2] = lines[2].replace(r#""temperature":0.2"#, r#""tools":[{"type":"function","function":{"name":"f"}}]"#);
    lines[6] = lines[6].replace(r#""temperature":0.2"#, r#""logprobs":true"#);
    lines[8] = lines[8].replace("/v1/chat/completions", "/v1/completions");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();

    let out = fleet.producer(&["submit", input.to_str().unwrap(), "--provider", MOCK, "--json"]);
    assert_eq!(out.status.code(), Some(2), "a bad file is refused with exit 2");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("3 invalid line(s)"), "{err}");
    assert!(err.contains("line 3: for Gemini: \"tools\" cannot be translated"), "{err}");
    assert!(err.contains("line 7: for Gemini: \"logprobs\" cannot be translated"), "{err}");
    assert!(err.contains("line 9: url \"/v1/completions\" is not supported"), "{err}");
    assert!(out.stdout.is_empty(), "no job was announced: {}", String::from_utf8_lossy(&out.stdout));
    // Nothing was published: no items queue holds anything for the provider.
    assert!(fleet.queue_len(&fleet.topology().items_queue(MOCK)).unwrap_or(0) == 0);
    assert_eq!(mock.stats()["requests"], 0);
    fleet.cleanup(&[]);
}

/// `producer submit FILE --provider mock --mode batch --json`; the job id.
fn submit_batch(fleet: &Fleet, file: &Path) -> String {
    harness::submit(&fleet.config, file, MOCK, &["--mode", "batch"]).unwrap().job_id
}

/// The Gemini batches the mock created, per `displayName` (the chunk tags name the job).
fn gemini_created(mock: &Mock, job: &str) -> HashMap<String, u64> {
    let stats = mock.stats();
    let map = stats["batches"]["gemini_created"].as_object().cloned().unwrap_or_default();
    map.into_iter().filter(|(tag, _)| tag.contains(job)).map(|(tag, n)| (tag, n.as_u64().unwrap_or(0))).collect()
}

/// Asserts the mock created exactly one Gemini batch per chunk, and no request reached two.
fn assert_created_once(mock: &Mock, job: &str, chunks: usize) {
    let tags = gemini_created(mock, job);
    assert_eq!(tags.len(), chunks, "one Gemini batch per chunk: {tags:?}");
    assert!(tags.values().all(|n| *n == 1), "a chunk's batch was created more than once: {tags:?}");
    assert_eq!(mock.stats()["batches"]["resubmitted_custom_ids"], 0, "a request reached two batches");
}

/// What the batch-mode tests leave on the broker: the harness's cleanup plus the chunk queues.
fn tidy(fleet: &Fleet, jobs: &[&str]) {
    fleet.cleanup(jobs);
    fleet.amqp(|conn, t| async move {
        let ch = conn.create_channel().await.expect("channel");
        let _ = t.delete_chunk_queues(&ch, MOCK, POLL_S).await;
    });
}

#[test]
fn an_openai_file_runs_through_a_gemini_batch_with_usage_summed_exactly() {
    const N: usize = 2_000;
    let mock = Mock::start(&["--batch-complete-ms", "1500"]);
    let fleet = Fleet::new("gemini-batch", &mock.url, &gemini_batch(800));
    let workers = ["gb1", "gb2"];
    let _w: Vec<Proc> = workers.iter().map(|w| fleet.worker(w, &[])).collect();
    let input = fleet.dir.join("in.jsonl");
    write_chat(&input, N);
    let job = submit_batch(&fleet, &input);
    let lines = fleet.collect(&job);
    let by_status = assert_exactly_once(&lines, N);
    assert_eq!(by_status.get(&200), Some(&(N as u64)), "{by_status:?}");
    for line in &lines {
        let body = &line["response"]["body"];
        assert_eq!(body["object"], "chat.completion", "{line}");
        assert_eq!(body["model"], MODEL, "{line}");
        assert_eq!(body["choices"][0]["finish_reason"], "stop", "{line}");
        let content = body["choices"][0]["message"]["content"].as_str().unwrap_or_default();
        assert!(content.starts_with("mock reply to: Say something about the n"), "{line}");
    }
    // No online call: every request went through the batch API, one batch per chunk of 800.
    let stats = mock.stats();
    assert_eq!(stats["by_path"]["/v1beta/models/{model}:generateContent"], Value::Null, "{stats}");
    assert_created_once(&mock, &job, 3);

    // The usage the tracker summed is the mock's own count of the batch responses it served,
    // and the cost is the online price times the default batch_factor (0.5).
    let served = &stats["batches"];
    let (input_tokens, cached, output) = (
        served["gemini_input_tokens"].as_u64().unwrap(),
        served["gemini_cached_tokens"].as_u64().unwrap(),
        served["gemini_output_tokens"].as_u64().unwrap(),
    );
    assert!(input_tokens > cached && cached > 0 && output > 0, "{served}");
    let status = fleet.final_status(&job);
    assert_eq!(status["status"], "completed", "{status}");
    assert_eq!(status["succeeded"], N as u64, "{status}");
    let usage = &status["usage"];
    assert_eq!(usage["input_tokens"].as_u64(), Some(input_tokens), "{status}");
    assert_eq!(usage["cached_input_tokens"].as_u64(), Some(cached), "{status}");
    assert_eq!(usage["output_tokens"].as_u64(), Some(output), "{status}");
    let online_cost = ((input_tokens - cached) as f64 * INPUT_PER_MTOK
        + cached as f64 * CACHED_PER_MTOK
        + output as f64 * OUTPUT_PER_MTOK)
        / 1e6;
    let tracked = usage["cost"].as_f64().unwrap();
    assert!((tracked - online_cost / 2.0).abs() < 1e-6 * online_cost, "cost {tracked}, want {}", online_cost / 2.0);
    // The same results in Gemini's own result format: `key` and a GenerateContentResponse.
    let native = fleet.dir.join("gemini-format.jsonl");
    let out = fleet.producer(&["wait", &job, "-o", native.to_str().unwrap(), "--output-format", "gemini", "--json"]);
    assert!(out.status.success(), "wait --output-format gemini: {}", String::from_utf8_lossy(&out.stderr));
    let native = read_output(&native);
    assert_eq!(native.len(), N);
    let mut prompt_sum = 0;
    for line in &native {
        assert!(line["key"].as_str().is_some_and(|k| k.starts_with("req-")), "{line}");
        assert_eq!(line["response"]["candidates"][0]["finishReason"], "STOP", "{line}");
        assert_eq!(line["response"]["modelVersion"], MODEL, "{line}");
        prompt_sum += line["response"]["usageMetadata"]["promptTokenCount"].as_u64().unwrap();
    }
    assert_eq!(prompt_sum, input_tokens, "the usageMetadata written back is the mock's");
    // Each batch is deleted once its chunk's results are out.
    eventually(Duration::from_secs(20), "the Gemini batches deleted", || {
        mock.stats()["batches"]["gemini_deleted"] == 3
    });
    for w in workers {
        let log = fleet.worker_log(w);
        assert!(!log.contains(" WARN ") && !log.contains(" ERROR "), "{w} logged trouble:\n{log}");
    }
    tidy(&fleet, &[&job]);
}

#[test]
fn sigkill_right_after_a_gemini_batch_create_creates_no_second_batch() {
    const N: usize = 2_000;
    let mock = Mock::start(&["--batch-complete-ms", "1500"]);
    let fleet = Fleet::new("gemini-batch-kill", &mock.url, &gemini_batch(1000));
    let first = fleet.worker("gk1", &[("FLEET_TEST_BATCH_PAUSE", "created")]);
    let input = fleet.dir.join("in.jsonl");
    write_chat(&input, N);
    let job = submit_batch(&fleet, &input);
    eventually(Duration::from_secs(60), "the worker reached the pause", || {
        fleet.worker_log("gk1").contains("batch test pause at created")
    });
    first.signal("KILL");
    drop(first);
    let _second = fleet.worker("gk2", &[]);
    let lines = fleet.collect(&job);
    let by_status = assert_exactly_once(&lines, N);
    assert_eq!(by_status.get(&200), Some(&(N as u64)), "{by_status:?}");
    assert_eq!(fleet.final_status(&job)["succeeded"], N as u64);
    assert_created_once(&mock, &job, 2);
    assert!(
        fleet.worker_log("gk2").contains("found the chunk's provider batch"),
        "the second worker found the batch the first created by its displayName"
    );
    tidy(&fleet, &[&job]);
}

#[test]
fn expired_and_failed_gemini_batches_end_each_request_as_the_provider_says() {
    // Every batch expires with half of its requests answered: those succeed, the rest
    // expire (then, with `--fallback online`, they run online instead).
    let mock = Mock::start(&["--batch-complete-ms", "1000", "--batch-expire-rate", "1", "--batch-partial", "0.5"]);
    let fleet = Fleet::new("gemini-batch-expiry", &mock.url, &gemini_batch(10_000));
    let w = fleet.worker("ge1", &[]);
    let input = fleet.dir.join("in.jsonl");
    write_chat(&input, 200);
    let job = submit_batch(&fleet, &input);
    let lines = fleet.collect(&job);
    assert_exactly_once(&lines, 200);
    let codes = error_codes(&lines);
    assert_eq!(codes.get(&None), Some(&100), "the answered half: {codes:?}");
    assert_eq!(codes.get(&Some("expired".to_string())), Some(&100), "the rest expired: {codes:?}");
    let again =
        harness::submit(&fleet.config, &input, MOCK, &["--mode", "batch", "--fallback", "online"]).unwrap().job_id;
    let lines = fleet.collect(&again);
    let by_status = assert_exactly_once(&lines, 200);
    assert_eq!(by_status.get(&200), Some(&200), "the expired half ran online: {by_status:?}");
    let stats = mock.stats();
    assert_eq!(stats["by_path"]["/v1beta/models/{model}:generateContent"], 100, "{stats}");
    drop(w);
    tidy(&fleet, &[&job, &again]);

    // A batch Gemini fails (BATCH_STATE_FAILED): every request fails with its reason.
    let mock = Mock::start(&["--batch-complete-ms", "500", "--batch-reject-rate", "1"]);
    let fleet = Fleet::new("gemini-batch-failed", &mock.url, &gemini_batch(10_000));
    let w = fleet.worker("gf1", &[]);
    let input = fleet.dir.join("in.jsonl");
    write_chat(&input, 50);
    let job = submit_batch(&fleet, &input);
    let lines = fleet.collect(&job);
    assert_exactly_once(&lines, 50);
    let codes = error_codes(&lines);
    assert_eq!(codes.get(&Some("batch_rejected".to_string())), Some(&50), "{codes:?}");
    assert!(lines.iter().all(|l| l["error"]["message"].as_str().is_some_and(|m| m.contains("injected"))), "{lines:?}");
    assert_eq!(fleet.final_status(&job)["failed"], 50);
    drop(w);
    tidy(&fleet, &[&job]);
}
