//! Behind a gateway (LiteLLM): its 429s are read as rate limits whether they carry a
//! prefixed retry hint or no header at all, its call id is the request id, and an answered
//! failure is written as OpenAI writes it (`error` null, the failure in `response`) and read
//! back the same way. The mock's `--litellm` mode answers as LiteLLM does; LiteLLM itself
//! runs in `make interop`.

use e2e::*;

/// 16 in flight: the first burst (before any 429) is small next to the job.
const IN_FLIGHT: &str = "[providers.mock]\nmax_in_flight = 16\n";

/// Provider answers by status, from the mock's counters.
fn answers(mock: &Mock) -> (u64, u64) {
    (mock.status_count(200), mock.status_count(429))
}

#[test]
fn a_litellm_429_with_a_prefixed_hint_paces_and_its_call_id_is_the_request_id() {
    // 600 rpm: 10 requests/s, one second of burst; 429s carry only `llm_provider-retry-after`.
    let mock = Mock::start(&["--litellm", "hint", "--rpm", "600"]);
    let fleet = Fleet::new("gw_hint", &mock.url, IN_FLIGHT);
    let _w = fleet.worker("w1", &[]);
    let job = fleet.submit_requests(200);
    let lines = fleet.collect(&job);
    let by_status = assert_exactly_once(&lines, 200);
    assert_eq!(by_status.get(&200), Some(&200), "{by_status:?}");
    for l in &lines {
        let id = l["response"]["request_id"].as_str().unwrap_or_default();
        assert!(id.starts_with("litellm-"), "request_id from x-litellm-call-id: {l}");
    }
    let (ok, throttled) = answers(&mock);
    eprintln!("{ok} answers 200, {throttled} answers 429");
    // Read as overload (the in-flight limit alone shrinking), the same run answers more
    // 429s than successes; paced, the 429s are the first burst and a few probes.
    assert!(throttled * 4 < ok, "{throttled} answers 429 for {ok} successes");
    fleet.cleanup(&[&job]);
}

#[test]
fn repeated_silent_429s_start_pacing() {
    // LiteLLM's `/v1/messages` route: a 429 with no rate-limit, retry or request-id header.
    let mock = Mock::start(&["--litellm", "silent", "--rpm", "600"]);
    let fleet = Fleet::new("gw_silent", &mock.url, IN_FLIGHT);
    let _w = fleet.worker("w1", &[]);
    let job = fleet.submit_requests(200);
    let lines = fleet.collect(&job);
    let by_status = assert_exactly_once(&lines, 200);
    assert_eq!(by_status.get(&200), Some(&200), "{by_status:?}");
    assert!(lines.iter().all(|l| l["response"]["request_id"] == ""), "no request id was sent");
    let (ok, throttled) = answers(&mock);
    eprintln!("{ok} answers 200, {throttled} answers 429");
    assert!(throttled * 4 < ok, "{throttled} answers 429 for {ok} successes");
    fleet.cleanup(&[&job]);
}

#[test]
fn an_answered_failure_has_error_null_and_is_read_back_failed() {
    let mock = Mock::start(&["--error-400", "0.3", "--seed", "5"]);
    let fleet = Fleet::new("gw_shape", &mock.url, "");
    let _w = fleet.worker("w1", &[]);
    let job = fleet.submit_requests(100);
    let output = fleet.dir.join("out.jsonl");
    let out = fleet.producer(&["wait", &job, "--output", output.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let first: Value = serde_json::from_slice(&out.stdout).expect("wait --json prints JSON");
    let lines = read_output(&output);
    assert_exactly_once(&lines, 100);
    let rejected: Vec<&Value> = lines.iter().filter(|l| l["response"]["status_code"] == 400).collect();
    assert!(!rejected.is_empty() && rejected.len() < 100);
    for l in &rejected {
        assert!(l["error"].is_null(), "the provider answered: error is null: {l}");
        assert!(l["response"]["body"]["error"]["message"].is_string(), "{l}");
        assert!(!succeeded(l));
    }
    assert_eq!(first["counts"]["failed"].as_u64(), Some(rejected.len() as u64), "{first}");
    assert_eq!(first["counts"]["succeeded"].as_u64(), Some(100 - rejected.len() as u64), "{first}");
    // Run again on the complete file: the counts are read back from the lines, not from
    // the results stream, and must come out the same.
    let again = fleet.producer(&["wait", &job, "--output", output.to_str().unwrap(), "--json"]);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    let again: Value = serde_json::from_slice(&again.stdout).expect("JSON");
    assert_eq!(again["counts"], first["counts"], "{again}");
    assert_eq!(read_output(&output).len(), 100, "nothing appended");
    fleet.cleanup(&[&job]);
}
