//! Gemini as a provider kind (issue 24), online: the fleet's `mock` provider is made
//! `kind = "gemini"`, so workers translate each OpenAI-format line into a
//! `generateContent` call on the mock's Gemini routes and the answers back into OpenAI
//! chat completions. Real broker, workers, tracker and Pushgateway; the mock counts what
//! it answered.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use e2e::*;

/// The model the test lines name, and its prices per million tokens.
const MODEL: &str = "gemini-2.0-flash";
const INPUT_PER_MTOK: f64 = 1000.0;
const CACHED_PER_MTOK: f64 = 250.0;
const OUTPUT_PER_MTOK: f64 = 4000.0;

/// The fleet's `mock` provider as a Gemini one, with prices for [`MODEL`].
fn gemini(extra: &str) -> String {
    format!(
        "[providers.mock]\nkind = \"gemini\"\nbatch = false\n[providers.mock.prices.\"{MODEL}\"]\ninput_per_mtok = {INPUT_PER_MTOK:.1}\n\
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
