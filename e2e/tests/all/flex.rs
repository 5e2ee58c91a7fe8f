//! `submit --mode flex` end to end (real broker, workers, tracker, Pushgateway; the mock's
//! flex tier answers 100 ms slower and refuses a fifth of the flex calls for capacity,
//! alternately with OpenAI's 429 "resource unavailable" and Groq's 498 `capacity_exceeded`):
//! every line once and succeeded, every call the mock saw asked for the flex tier, the
//! refusals waited in the delay queues without shrinking the worker's in-flight window, and
//! the answers are priced at the flex factor (the same file online costs four times as
//! much); `--mode flex` is refused for a provider of a kind without a flex tier.

use std::time::{Duration, Instant};

use e2e::{assert_exactly_once, eventually, pushgateway_metrics, succeeded, Fleet, Mock};

const LINES: usize = 200;
const MAX_IN_FLIGHT: u64 = 16;
const FLEX_LATENCY_MS: u64 = 100;
/// Distinct from the batch factor (0.5), so the cost shows which one priced the answers.
const FLEX_FACTOR: f64 = 0.25;

fn config() -> String {
    format!(
        "[providers.mock]\nmax_in_flight = {MAX_IN_FLIGHT}\nflex_timeout_s = 30\n\
         [providers.mock.prices.\"mock-model\"]\ninput_per_mtok = 40000.0\noutput_per_mtok = 40000.0\n\
         flex_factor = {FLEX_FACTOR}\n"
    )
}

/// Submits `file` to `mock` in `mode`; returns the job id.
fn submit(fleet: &Fleet, file: &std::path::Path, mode: &str) -> String {
    harness::submit(&fleet.config, file, e2e::MOCK, &["--mode", mode]).unwrap().job_id
}

/// The value of the Pushgateway series `name` of this fleet's worker for provider `mock`.
fn worker_gauge(fleet: &Fleet, name: &str) -> Option<f64> {
    pushgateway_metrics().lines().find_map(|l| {
        let mine = l.starts_with(&format!("{name}{{")) && l.contains(&fleet.ns) && l.contains("provider=\"mock\"");
        mine.then(|| l.rsplit(' ').next()?.parse().ok()).flatten()
    })
}

/// The sum of the Pushgateway counter `name` over this fleet's series that carry `label`.
fn counter_sum(fleet: &Fleet, name: &str, label: &str) -> f64 {
    pushgateway_metrics()
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&fleet.ns) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_flex_job_runs_every_line_once_on_the_flex_tier_at_the_flex_price() {
    let mock = Mock::start(&["--flex-latency-ms", &FLEX_LATENCY_MS.to_string(), "--flex-unavailable", "0.2"]);
    let fleet = Fleet::new("flex", &mock.url, &config());
    let _w = fleet.worker("fx1", &[]);
    let input = fleet.dir.join("in.jsonl");
    e2e::write_requests(&input, LINES);

    let started = Instant::now();
    let job = submit(&fleet, &input, "flex");
    let lines = fleet.collect(&job);
    let flex_elapsed = started.elapsed();
    assert_exactly_once(&lines, LINES);
    assert!(lines.iter().all(succeeded), "every line succeeded despite the refusals");
    assert!(
        lines.iter().all(|l| l["response"]["body"]["service_tier"] == "flex"),
        "every answer says the flex tier served it"
    );

    // What the provider saw: only flex calls, a fifth of them refused, half with each status.
    let stats = mock.stats();
    let (calls, flex) = (stats["by_path"]["/v1/chat/completions"].as_u64().unwrap(), &stats["flex"]);
    let refused = flex["refused"].as_u64().unwrap();
    assert_eq!(flex["requests"].as_u64(), Some(calls), "every call asked for service_tier flex: {stats}");
    assert_eq!(calls, LINES as u64 + refused, "one answered call per line, the refused ones retried: {stats}");
    let (s429, s498) =
        (stats["by_status"]["429"].as_u64().unwrap_or(0), stats["by_status"]["498"].as_u64().unwrap_or(0));
    assert!(refused >= 40 && s429 + s498 == refused && s429 >= 20 && s498 >= 20, "{stats}");
    // Slower than the online path: every answered call waited the flex latency.
    let floor = Duration::from_millis(FLEX_LATENCY_MS * LINES as u64 / MAX_IN_FLIGHT);
    assert!(flex_elapsed >= floor, "the flex job took {flex_elapsed:?}, under the latency floor {floor:?}");

    // The refusals went through the delay queues as capacity errors, not rate limits, and
    // the in-flight window never shrank (no call since could have grown it back).
    eventually(Duration::from_secs(30), "the worker pushed its capacity errors", || {
        counter_sum(&fleet, "batch_errors_total", "error_type=\"capacity_unavailable\"") == refused as f64
    });
    for throttle in ["rate_limited", "overloaded", "client_error"] {
        let label = format!("error_type=\"{throttle}\"");
        assert_eq!(counter_sum(&fleet, "batch_errors_total", &label), 0.0, "no {throttle} error counted");
    }
    assert_eq!(worker_gauge(&fleet, "batch_concurrency_limit"), Some(MAX_IN_FLIGHT as f64), "window not shrunk");
    assert_eq!(worker_gauge(&fleet, "batch_rate_limit_rps"), Some(0.0), "no pacing started");
    let delayed = counter_sum(&fleet, "batch_retry_attempts_total", "retry_reason=\"capacity_unavailable\"");
    assert_eq!(delayed, refused as f64, "each refusal waited in a delay queue once");

    // The same file online: the same tokens, at four times the flex job's cost.
    let started = Instant::now();
    let online = submit(&fleet, &input, "online");
    let online_lines = fleet.collect(&online);
    let online_elapsed = started.elapsed();
    assert_exactly_once(&online_lines, LINES);
    let after = mock.stats();
    assert_eq!(after["flex"]["requests"].as_u64(), Some(calls), "an online job asks for no tier: {after}");
    let (flex_status, online_status) = (fleet.final_status(&job), fleet.final_status(&online));
    assert_eq!((&flex_status["mode"], &online_status["mode"]), (&"flex".into(), &"online".into()));
    let (fu, ou) = (&flex_status["usage"], &online_status["usage"]);
    assert_eq!(
        (fu["input_tokens"].as_u64(), fu["output_tokens"].as_u64()),
        (ou["input_tokens"].as_u64(), ou["output_tokens"].as_u64())
    );
    let (flex_cost, online_cost) = (fu["cost"].as_f64().unwrap(), ou["cost"].as_f64().unwrap());
    assert!(online_cost > 0.0);
    assert!(
        (flex_cost - online_cost * FLEX_FACTOR).abs() < 1e-9 * online_cost,
        "flex cost {flex_cost}, online {online_cost}: want the flex factor {FLEX_FACTOR}"
    );
    eventually(Duration::from_secs(30), "the tracker counts the answers by mode", || {
        counter_sum(&fleet, "batch_answers_total", "mode=\"flex\"") == LINES as f64
            && counter_sum(&fleet, "batch_answers_total", "mode=\"online\"") == LINES as f64
    });
    eprintln!(
        "flex: {LINES} lines in {flex_elapsed:.2?} ({refused} refusals: {s429} x 429, {s498} x 498), cost {flex_cost:.4}; \
         online: {online_elapsed:.2?}, cost {online_cost:.4}"
    );
    let log = fleet.worker_log("fx1");
    assert!(!log.contains(" WARN ") && !log.contains(" ERROR "), "a run where nothing goes wrong is quiet:\n{log}");
    fleet.cleanup(&[&job, &online]);
}

#[test]
fn flex_is_refused_for_a_provider_without_a_flex_tier() {
    let fleet = Fleet::new(
        "flexrefused",
        "http://127.0.0.1:9",
        "[providers.claude]\nkind = \"anthropic\"\nbase_url = \"http://127.0.0.1:9\"\n",
    );
    let input = fleet.dir.join("messages.jsonl");
    let line = r#"{"custom_id":"m-0","method":"POST","url":"/v1/messages","body":{"model":"claude-3-5-haiku","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}}"#;
    std::fs::write(&input, format!("{line}\n")).unwrap();
    let out = fleet.producer(&["submit", input.to_str().unwrap(), "--provider", "claude", "--mode", "flex"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "bad input exits 2: {stderr}");
    assert!(stderr.contains("kind anthropic") && stderr.contains("no flex tier"), "{stderr}");
    let ok = fleet.producer(&["submit", input.to_str().unwrap(), "--provider", "claude", "--dry-run"]);
    assert!(ok.status.success(), "the same file is fine online: {}", String::from_utf8_lossy(&ok.stderr));
    fleet.cleanup(&[]);
}

/// `producer retry` of a flex job runs on the flex tier again (its items keep their
/// price); `--mode online` says otherwise.
#[test]
fn a_flex_jobs_retry_stays_on_the_flex_tier() {
    let mock = Mock::start(&["--error-400", "0.3", "--seed", "5"]);
    let fleet = Fleet::new("flex-retry", &mock.url, &config());
    let _w = fleet.worker("fr1", &[]);
    let input = fleet.dir.join("in.jsonl");
    e2e::write_requests(&input, 60);
    let job = submit(&fleet, &input, "flex");
    let failed = fleet.collect(&job).iter().filter(|l| !succeeded(l)).count();
    assert!(failed > 5, "about 30 % failed: {failed}");

    // Each retry in a directory of its own: a second `retry` of the same job beside the
    // first one's `<JOB>.retry.jsonl` would resume that one.
    let retry = |dir: &str, extra: &[&str]| -> String {
        let dir = fleet.dir.join(dir);
        std::fs::create_dir_all(&dir).unwrap();
        let out = harness::producer_command(&fleet.config)
            .current_dir(&dir)
            .args(["retry", &job, "--json"])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "retry: {}", String::from_utf8_lossy(&out.stderr));
        harness::Submitted::from_json(&out.stdout).expect("retry --json").job_id
    };
    let flex_before = mock.stats()["flex"]["requests"].as_u64().unwrap();
    let again = retry("first", &[]);
    fleet.collect(&again);
    assert_eq!(fleet.final_status(&again)["mode"], "flex", "the retry of a flex job runs flex");
    let flex_after = mock.stats()["flex"]["requests"].as_u64().unwrap();
    assert!(flex_after >= flex_before + failed as u64, "every retried item asked for the flex tier");

    let online = retry("second", &["--mode", "online"]);
    fleet.collect(&online);
    assert_eq!(fleet.final_status(&online)["mode"], "online");
    assert_eq!(mock.stats()["flex"]["requests"].as_u64().unwrap(), flex_after, "--mode online asks for no tier");
    fleet.cleanup(&[&job, &again, &online]);
}
