//! Usage and cost per job (real broker, workers, tracker, Prometheus; the mock reports the
//! usage of every answer and sums it in its /stats): the tracker's sums equal the mock's
//! exactly, `wait` and the metrics show them, and a spend cap ends a job `cancelled` with
//! reason `budget` within the overshoot bound the README states.

use std::time::Duration;

use e2e::{assert_exactly_once, eventually, prom_value, Fleet, Mock};
use serde_json::Value;

/// Prices per million tokens of the model the test requests name (`mock-model`).
const INPUT_PER_MTOK: f64 = 40_000.0;
const OUTPUT_PER_MTOK: f64 = 40_000.0;

fn prices(extra: &str) -> String {
    format!(
        "[providers.mock.prices.\"mock-model\"]\ninput_per_mtok = {INPUT_PER_MTOK:.1}\noutput_per_mtok = {OUTPUT_PER_MTOK:.1}\n{extra}"
    )
}

/// Cost of one output line's answer, from the usage the provider put in its body.
fn line_cost(line: &Value) -> f64 {
    let u = &line["response"]["body"]["usage"];
    let (i, o) = (u["prompt_tokens"].as_f64().unwrap_or(0.0), u["completion_tokens"].as_f64().unwrap_or(0.0));
    (i * INPUT_PER_MTOK + o * OUTPUT_PER_MTOK) / 1e6
}

#[test]
fn usage_sums_equal_the_mocks_reported_usage() {
    let mock = Mock::start(&[]);
    let fleet = Fleet::new("usage", &mock.url, &prices(""));
    let _w = fleet.worker("w1", &[]);
    let job = fleet.submit_requests(300);
    let lines = fleet.collect(&job);
    assert_exactly_once(&lines, 300);
    let reported = mock.stats()["usage"].clone();
    let (input, output) = (reported["input_tokens"].as_u64().unwrap(), reported["output_tokens"].as_u64().unwrap());
    assert!(input > 0 && output > 0, "the mock reports usage: {reported}");

    let status = fleet.final_status(&job);
    let usage = &status["usage"];
    assert_eq!(usage["input_tokens"].as_u64(), Some(input), "{status}");
    assert_eq!(usage["output_tokens"].as_u64(), Some(output), "{status}");
    assert_eq!(usage["cached_input_tokens"].as_u64(), Some(0));
    let cost = (input as f64 * INPUT_PER_MTOK + output as f64 * OUTPUT_PER_MTOK) / 1e6;
    let tracked = usage["cost"].as_f64().unwrap();
    assert!((tracked - cost).abs() < 1e-6 * cost, "cost {tracked}, want {cost}");

    // `wait`'s summary carries the same figures (the file is complete: it returns at once).
    let output_file = fleet.dir.join(format!("{job}.jsonl"));
    let out = fleet.producer(&["wait", &job, "--output", output_file.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "wait failed: {}", String::from_utf8_lossy(&out.stderr));
    let summary: Value = serde_json::from_slice(&out.stdout).expect("wait --json prints JSON");
    assert_eq!(summary["usage"]["input_tokens"].as_u64(), Some(input), "{summary}");
    assert_eq!(summary["usage"]["output_tokens"].as_u64(), Some(output), "{summary}");
    assert_eq!(summary["usage_final"], true, "the tracker had ended the job: {summary}");
    // And the human `status` line.
    let out = fleet.producer(&["status", &job]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("usage: {input} in (0 cached) / {output} out tokens, cost")), "{text}");

    // The metrics, through the Pushgateway and Prometheus, with the priced model as label.
    let metric = |kind: &str| {
        format!(
            "sum(batch_usage_tokens_total{{namespace=\"{}\",provider=\"mock\",model=\"mock-model\",kind=\"{kind}\"}})",
            fleet.ns
        )
    };
    eventually(Duration::from_secs(90), "Prometheus shows the tracker's token counts", || {
        prom_value(&metric("input")) == Some(input as f64) && prom_value(&metric("output")) == Some(output as f64)
    });
    fleet.cleanup(&[&job]);
}

#[test]
fn a_spend_cap_cancels_the_job_within_the_overshoot_bound() {
    const MAX_IN_FLIGHT: u64 = 4;
    const CAP: f64 = 20.0;
    let mock = Mock::start(&["--latency-ms", "100"]);
    let fleet =
        Fleet::new("budget", &mock.url, &prices(&format!("[providers.mock]\nmax_in_flight = {MAX_IN_FLIGHT}\n")));
    let _w = fleet.worker("w1", &[]);
    // The bound holds while a tracker reads the ledger; until a worker holds the role
    // (a moment after it starts, or during a takeover) results are only counted later.
    fleet.wait_for_tracker();
    let input = fleet.dir.join("in.jsonl");
    e2e::write_requests(&input, 300);
    let job = harness::submit(&fleet.config, &input, e2e::MOCK, &["--max-cost", "20"]).unwrap().job_id;

    let lines = fleet.collect(&job);
    assert_exactly_once(&lines, 300);
    let status = fleet.final_status(&job);
    assert_eq!(status["status"], "cancelled", "{status}");
    assert_eq!(status["reason"], "budget", "{status}");
    let spent = status["usage"]["cost"].as_f64().unwrap();
    assert_eq!(status["usage"]["max_cost"].as_f64(), Some(CAP));

    // Every answered line cost money; the others ended cancelled, saying why.
    let answered: Vec<&Value> = lines.iter().filter(|l| !l["response"].is_null()).collect();
    let cancelled: Vec<&Value> = lines.iter().filter(|l| l["error"]["code"] == "cancelled").collect();
    assert_eq!(answered.len() + cancelled.len(), 300);
    assert!(cancelled.iter().all(|l| l["error"]["message"].as_str().unwrap().starts_with("budget")));
    let from_lines: f64 = answered.iter().map(|l| line_cost(l)).sum();
    assert!((from_lines - spent).abs() < 1e-6, "the tracker's cost {spent} is the lines' {from_lines}");
    // The README's bound: what was being called when the cancel reached the worker, at most
    // 2 x max_in_flight answers (in flight when the cap was crossed + started before the
    // cancel arrived), each at most the dearest answer.
    let dearest = answered.iter().map(|l| line_cost(l)).fold(0.0, f64::max);
    let overshoot = spent - CAP;
    eprintln!(
        "spent {spent:.2} of a {CAP} cap: {} answers, overshoot {overshoot:.2} ({:.1} answers)",
        answered.len(),
        overshoot / dearest
    );
    assert!(spent >= CAP, "the job was cancelled before reaching its cap ({spent})");
    assert!(
        overshoot <= 2.0 * MAX_IN_FLIGHT as f64 * dearest,
        "overshoot {overshoot:.2} is over the bound {:.2}",
        2.0 * MAX_IN_FLIGHT as f64 * dearest
    );
    assert_eq!(mock.stats()["by_status"]["200"].as_u64(), Some(answered.len() as u64), "no call after the cancel");
    fleet.cleanup(&[&job]);
}
