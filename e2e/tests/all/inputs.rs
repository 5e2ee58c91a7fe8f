//! The inputs users bring, end to end through the real binaries: OpenAI `/v1/responses` and
//! `/v1/moderations` lines through an OpenAI-kind provider, and Anthropic's own Message
//! Batches lines (`{"custom_id", "params"}`) through an Anthropic-kind provider, collected
//! with `wait --output-format anthropic` as Anthropic result lines.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use e2e::*;
use serde_json::json;

/// Writes `lines` (one JSON value each) to `path`.
fn write_lines(path: &Path, lines: &[Value]) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create input"));
    for line in lines {
        writeln!(f, "{line}").expect("write input");
    }
}

/// Submits `file` to `mock` with extra `args`; returns the job id.
fn submit(fleet: &Fleet, file: &Path, args: &[&str]) -> String {
    harness::submit(&fleet.config, file, MOCK, args).unwrap().job_id
}

/// Collects `job` with `--output-format anthropic`; returns the lines by custom_id, checking
/// each custom_id is there once.
fn collect_anthropic(fleet: &Fleet, job: &str) -> (std::path::PathBuf, HashMap<String, Value>) {
    let output = fleet.dir.join(format!("{job}.anthropic.jsonl"));
    let out = fleet.producer(&[
        "wait",
        job,
        "-o",
        output.to_str().unwrap(),
        "--output-format",
        "anthropic",
        "--timeout",
        "180",
    ]);
    assert!(out.status.success(), "wait failed: {}", String::from_utf8_lossy(&out.stderr));
    let lines = read_output(&output);
    let mut by_id = HashMap::new();
    for line in lines {
        let id = line["custom_id"].as_str().expect("custom_id").to_string();
        assert!(by_id.insert(id.clone(), line).is_none(), "{id} appears twice");
    }
    (output, by_id)
}

#[test]
fn responses_and_moderations_lines_run_through_an_openai_kind_provider() {
    let mock = Mock::start(&[]);
    let fleet = Fleet::new("inputs_oa", &mock.url, "");
    let _w = fleet.worker("w1", &[]);
    let (responses, moderations) = (30, 30);
    let mut lines = Vec::new();
    for i in 0..responses {
        let body = json!({"model": "gpt-r", "input": [{"role": "user", "content": format!("tell me about {i}")}]});
        lines.push(json!({"custom_id": format!("resp-{i}"), "method": "POST", "url": "/v1/responses", "body": body}));
    }
    for i in 0..moderations {
        // Every third text carries the mock's marker and comes back flagged.
        let text = if i % 3 == 0 { format!("text {i} mock-flag") } else { format!("text {i}") };
        let body = json!({"model": "omni-moderation-latest", "input": text});
        lines.push(json!({"custom_id": format!("mod-{i}"), "method": "POST", "url": "/v1/moderations", "body": body}));
    }
    // A request the provider refuses fails the one item, as online.
    lines.push(json!({"custom_id": "mod-bad", "method": "POST", "url": "/v1/moderations", "body": {"input": 5}}));
    let input = fleet.dir.join("inputs.jsonl");
    write_lines(&input, &lines);
    let job = submit(&fleet, &input, &[]);
    let output = fleet.collect(&job);
    assert_eq!(output.len(), lines.len());
    let by_id: HashMap<&str, &Value> = output.iter().map(|l| (l["custom_id"].as_str().unwrap(), l)).collect();
    assert_eq!(by_id.len(), lines.len(), "every custom_id once");
    for i in 0..responses {
        let l = by_id[format!("resp-{i}").as_str()];
        assert!(succeeded(l), "{l}");
        let body = &l["response"]["body"];
        assert_eq!(body["object"], "response");
        assert_eq!(body["output"][0]["content"][0]["text"], format!("mock reply to: tell me about {i}"));
    }
    for i in 0..moderations {
        let l = by_id[format!("mod-{i}").as_str()];
        assert!(succeeded(l), "{l}");
        assert_eq!(l["response"]["body"]["results"][0]["flagged"], i % 3 == 0, "{l}");
    }
    let bad = by_id["mod-bad"];
    assert!(!succeeded(bad));
    assert_eq!(bad["response"]["status_code"], 400);
    let status = fleet.final_status(&job);
    assert_eq!((status["succeeded"].as_u64(), status["failed"].as_u64()), (Some(60), Some(1)), "{status}");

    // Each request reached its own route once, and the metrics name the operation.
    let stats = mock.stats();
    assert_eq!(stats["by_path"]["/v1/responses"], responses);
    assert_eq!(stats["by_path"]["/v1/moderations"], moderations + 1);
    eventually(Duration::from_secs(30), "the worker pushed both operations", || {
        let text = pushgateway_metrics();
        ["responses", "moderations"].iter().all(|op| {
            text.lines().any(|l| {
                l.starts_with("batch_provider_latency_seconds_count{")
                    && l.contains(&format!("namespace=\"{}\"", fleet.ns))
                    && l.contains(&format!("operation=\"{op}\""))
            })
        })
    });
    fleet.cleanup(&[&job]);
}

#[test]
fn anthropic_batch_lines_come_back_as_anthropic_results_of_every_type() {
    let mock = Mock::start(&[]);
    let fleet = Fleet::new("inputs_an", &mock.url, "[providers.mock]\nkind = \"anthropic\"\n");
    let params = |i: usize| json!({"model": "claude-test", "max_tokens": 32, "messages": [{"role": "user", "content": format!("question {i}")}]});
    let requests = |prefix: &str, n: usize| -> Vec<Value> {
        (0..n).map(|i| json!({"custom_id": format!("{prefix}-{i}"), "params": params(i)})).collect()
    };

    // Job 1: Anthropic Message Batches lines, one OpenAI-format /v1/messages line mixed in,
    // and one request the provider refuses (no `messages`).
    let mut answered = requests("ok", 40);
    answered.push(json!({"custom_id": "openai-form", "method": "POST", "url": "/v1/messages", "body": params(99)}));
    answered.push(json!({"custom_id": "bad", "params": {"model": "claude-test", "max_tokens": 8}}));
    let answered_file = fleet.dir.join("answered.jsonl");
    write_lines(&answered_file, &answered);
    // Job 2 is cancelled and job 3's deadline passes, both before any worker runs.
    let cancelled_file = fleet.dir.join("cancelled.jsonl");
    write_lines(&cancelled_file, &requests("cx", 10));
    let expired_file = fleet.dir.join("expired.jsonl");
    write_lines(&expired_file, &requests("ex", 10));

    let job_cancelled = submit(&fleet, &cancelled_file, &[]);
    let out = fleet.producer(&["cancel", &job_cancelled]);
    assert!(out.status.success(), "cancel: {}", String::from_utf8_lossy(&out.stderr));
    let job_expired = submit(&fleet, &expired_file, &["--deadline", "1s"]);
    let job_answered = submit(&fleet, &answered_file, &[]);
    std::thread::sleep(Duration::from_secs(2));
    let _w = fleet.worker("w1", &[]);

    let (answered_out, results) = collect_anthropic(&fleet, &job_answered);
    assert_eq!(results.len(), answered.len());
    for (id, line) in &results {
        let result = &line["result"];
        match id.as_str() {
            "bad" => {
                assert_eq!(result["type"], "errored", "{line}");
                assert_eq!(result["error"]["type"], "error");
                assert_eq!(result["error"]["error"]["type"], "invalid_request_error", "{line}");
            }
            _ => {
                assert_eq!(result["type"], "succeeded", "{line}");
                assert_eq!(result["message"]["type"], "message");
                assert_eq!(result["message"]["role"], "assistant");
            }
        }
    }
    assert_eq!(results["ok-7"]["result"]["message"]["content"][0]["text"], "mock reply to: question 7");
    let (_, cancelled) = collect_anthropic(&fleet, &job_cancelled);
    assert_eq!(cancelled.len(), 10);
    assert!(cancelled.values().all(|l| l["result"] == json!({"type": "canceled"})), "{cancelled:?}");
    let (_, expired) = collect_anthropic(&fleet, &job_expired);
    assert_eq!(expired.len(), 10);
    assert!(expired.values().all(|l| l["result"] == json!({"type": "expired"})), "{expired:?}");
    assert_eq!(
        mock.stats()["by_path"]["/v1/messages"],
        answered.len() as u64,
        "cancelled and expired items made no call"
    );

    // The file is resumable in its format (a complete file returns at once, unchanged) and
    // refused in the other one.
    let before = std::fs::read(&answered_out).unwrap();
    let (_, again) = collect_anthropic(&fleet, &job_answered);
    assert_eq!(again.len(), answered.len());
    assert_eq!(std::fs::read(&answered_out).unwrap(), before);
    let out = fleet.wait(&job_answered, &answered_out, 30);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("openai output format"));
    assert_eq!(std::fs::read(&answered_out).unwrap(), before, "left untouched");
    fleet.cleanup(&[&job_answered, &job_cancelled, &job_expired]);
}

#[test]
fn anthropic_batch_lines_are_refused_for_an_openai_kind_provider_with_their_line_numbers() {
    let fleet = Fleet::new("inputs_refused", "http://127.0.0.1:9", "");
    let input = fleet.dir.join("anthropic.jsonl");
    write_lines(
        &input,
        &[
            json!({"custom_id": "a", "params": {"max_tokens": 1, "messages": []}}),
            json!({"custom_id": "b", "method": "POST", "url": "/v1/responses", "body": {"input": "x"}}),
            json!({"custom_id": "c", "params": [1]}),
        ],
    );
    let out = fleet.producer(&["submit", input.to_str().unwrap(), "--provider", "mock"]);
    assert_eq!(out.status.code(), Some(2), "nothing is published");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("2 invalid line(s)"), "{err}");
    assert!(err.contains("line 1: an Anthropic Message Batches request"), "{err}");
    assert!(err.contains("line 3: an Anthropic Message Batches request"), "{err}");
}
