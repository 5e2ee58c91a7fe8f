//! What batch users expect (issue 13, point 5): `producer retry` submits a new job of the
//! items that did not succeed, with their original requests read back from the job's
//! results; `wait --ordered` writes the output in input order whatever order the workers
//! finished in; `wait --errors FILE` splits out the lines that did not succeed, as OpenAI's
//! error file.

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use e2e::*;

fn index_of(line: &Value) -> u64 {
    line["custom_id"].as_str().unwrap().strip_prefix("req-").unwrap().parse().unwrap()
}

#[test]
fn retry_submits_only_the_failed_items_with_their_original_requests() {
    let flaky = Mock::start(&["--error-400", "0.3", "--seed", "5"]);
    let fleet = Fleet::new("retry", &flaky.url, "");
    let mut w1 = fleet.worker("rt1", &[]);
    let job = fleet.submit_requests(200);
    let first = fleet.collect(&job);
    assert_exactly_once(&first, 200);
    let failed: HashSet<String> =
        first.iter().filter(|l| !succeeded(l)).map(|l| l["custom_id"].as_str().unwrap().to_string()).collect();
    assert!(failed.len() > 20 && failed.len() < 120, "about 30 % failed: {}", failed.len());
    assert_eq!(fleet.final_status(&job)["status"], "completed");

    // The provider is fixed (a healthy mock in its place); the retry reaches only it.
    w1.signal("TERM");
    assert_eq!(w1.wait_exit(Duration::from_secs(30)), Some(0));
    let healthy = Mock::start(&[]);
    let _w2 = fleet.worker("rt2", &[("FLEET__PROVIDERS__MOCK__BASE_URL", healthy.url.as_str())]);
    let out2 = fleet.dir.join("retried.jsonl");
    let out = Command::new(bin("producer"))
        .current_dir(&fleet.dir)
        .args(["--config", fleet.config.to_str().unwrap(), "--quiet", "retry", &job, "--json"])
        .args(["-o", out2.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "retry: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let new_job: Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    let new_job = new_job["job_id"].as_str().unwrap().to_string();
    assert_ne!(new_job, job);
    assert_eq!(new_job_total(&stdout), failed.len() as u64);

    let lines = read_output(&out2);
    let retried: HashSet<String> = lines.iter().map(|l| l["custom_id"].as_str().unwrap().to_string()).collect();
    assert_eq!(retried, failed, "exactly the failed items were retried");
    assert_eq!(lines.len(), failed.len(), "each once");
    for l in &lines {
        assert!(succeeded(l), "{l}");
        // The mock quotes the prompt: the original body travelled with the retried item.
        let reply = l["response"]["body"]["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(reply.contains(&format!("the number {}.", index_of(l))), "{reply}");
    }
    assert_eq!(healthy.stats()["requests"].as_u64(), Some(failed.len() as u64), "only the failed items were called");
    let input = std::fs::read_to_string(fleet.dir.join(format!("{job}.retry.jsonl"))).unwrap();
    assert_eq!(input.lines().count(), failed.len(), "the new job's input file is kept");
    fleet.cleanup(&[&job, &new_job]);
}

/// The `total` of the first JSON line `retry --json` printed (the new job).
fn new_job_total(stdout: &str) -> u64 {
    serde_json::from_str::<Value>(stdout.lines().next().unwrap()).unwrap()["total"].as_u64().unwrap()
}

#[test]
fn ordered_output_of_50000_lines_is_in_input_order_whatever_order_the_workers_finished() {
    const N: usize = 50_000;
    // Random latency over three workers shuffles the order results come back in.
    let mock = Mock::start(&["--latency-ms", "1", "--jitter-ms", "25"]);
    let fleet = Fleet::new("ordered", &mock.url, "");
    let _ws: Vec<Proc> = (1..=3).map(|i| fleet.worker(&format!("or{i}"), &[])).collect();
    let job = fleet.submit_requests(N);
    let ordered = fleet.dir.join("ordered.jsonl");
    let out = fleet.producer(&["wait", &job, "-o", ordered.to_str().unwrap(), "--ordered", "--timeout", "900"]);
    assert!(out.status.success(), "wait --ordered: {}", String::from_utf8_lossy(&out.stderr));
    let lines = read_output(&ordered);
    assert_exactly_once(&lines, N);
    let indices: Vec<u64> = lines.iter().map(index_of).collect();
    assert!(indices.iter().enumerate().all(|(i, &n)| i as u64 == n), "lines are in input order");
    assert!(!fleet.dir.join("ordered.jsonl.collecting").exists(), "the collection is removed");

    // The same job collected plainly comes in the order results arrived: shuffled.
    let plain = fleet.dir.join("plain.jsonl");
    assert!(fleet.wait(&job, &plain, 300).status.success());
    let arrival: Vec<u64> = read_output(&plain).iter().map(index_of).collect();
    let out_of_order = arrival.windows(2).filter(|w| w[0] > w[1]).count();
    assert!(out_of_order > 100, "the workers' order was shuffled ({out_of_order} inversions)");
    fleet.cleanup(&[&job]);
}

#[test]
fn the_error_file_holds_the_lines_that_did_not_succeed_as_openai_writes_it() {
    let mock = Mock::start(&["--error-400", "0.2", "--seed", "9"]);
    let fleet = Fleet::new("errfile", &mock.url, "");
    let _w = fleet.worker("ef1", &[]);
    let job = fleet.submit_requests(300);
    let (out_path, err_path) = (fleet.dir.join("out.jsonl"), fleet.dir.join("errors.jsonl"));
    let args = ["wait", &job, "-o", out_path.to_str().unwrap(), "--errors", err_path.to_str().unwrap()];
    let out = fleet.producer(&args);
    assert!(out.status.success(), "wait --errors: {}", String::from_utf8_lossy(&out.stderr));
    let (ok, errors) = (read_output(&out_path), read_output(&err_path));
    let mut all = ok.clone();
    all.extend(errors.iter().cloned());
    assert_exactly_once(&all, 300);
    assert!(ok.iter().all(succeeded), "the output holds only successes");
    assert!(errors.len() > 30 && errors.len() < 100, "about 20 % failed: {}", errors.len());
    for e in &errors {
        // OpenAI's error-file line: the request's id and custom_id, the provider's answer
        // in `response` (status and body), `error` null because the provider answered.
        assert_eq!(e["response"]["status_code"], 400, "{e}");
        assert!(e["response"]["body"]["error"]["message"].is_string(), "{e}");
        assert!(e["error"].is_null(), "{e}");
        assert!(e["id"].as_str().unwrap().starts_with(&format!("batch_req_{job}_")), "{e}");
    }
    // Run again: both files come back the same.
    let before = (std::fs::read(&out_path).unwrap(), std::fs::read(&err_path).unwrap());
    assert!(fleet.producer(&args).status.success());
    assert_eq!((std::fs::read(&out_path).unwrap(), std::fs::read(&err_path).unwrap()), before);
    fleet.cleanup(&[&job]);
}

#[test]
fn status_watch_follows_a_job_to_its_end() {
    let mock = Mock::start(&["--latency-ms", "20"]);
    let fleet = Fleet::new("watch", &mock.url, "[providers.mock]\nmax_in_flight = 8\n");
    let _w = fleet.worker("sw1", &[]);
    // At least 2 s of work (8 in flight, 20 ms each): the first refresh sees it running.
    let job = fleet.submit_requests(800);
    // On a pipe, each refresh is a new JSON line; the command ends with the job.
    let mut watch = fleet.producer_spawn(&["status", &job, "--watch", "--json"]);
    assert_eq!(watch.wait_exit(Duration::from_secs(180)), Some(0), "watch ends when the job ends");
    let mut stdout = String::new();
    std::io::Read::read_to_string(watch.child.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    let refreshes: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(refreshes.len() >= 2, "refreshed while the job ran: {stdout}");
    // The first refresh may come before the tracker has read the submission's end
    // (`submitting`); either way the job is running, not ended.
    let first = refreshes.first().unwrap()["status"].as_str().unwrap_or_default().to_string();
    assert!(first == "in_progress" || first == "submitting", "the first refresh sees the job running: {first}");
    assert_eq!(refreshes.last().unwrap()["status"], "completed");
    let pending: Vec<u64> = refreshes.iter().map(|r| r["pending"].as_u64().unwrap()).collect();
    assert!(pending.windows(2).all(|w| w[0] >= w[1]) && pending.last() == Some(&0), "{pending:?}");
    fleet.cleanup(&[&job]);
}
