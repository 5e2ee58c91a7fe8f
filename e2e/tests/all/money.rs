//! Money that does what it says, on the real broker, Pushgateway and Prometheus, with the
//! mock answering as real providers do (a dated model name, `gpt-4o-mini-2024-07-18`, to a
//! request for `gpt-4o-mini`):
//! - the `gpt-4o-mini` price entry prices those answers and a spend cap fires; its cap is
//!   shown as given; `retry` carries the cap, or takes `--max-cost`;
//! - `--max-cost` on a job none of whose lines has a price is refused, nothing published;
//! - each money panel of the dashboard, queried from Prometheus after the run, equals the
//!   jobs' own figures (`status --json`);
//! - a job whose provider no worker serves is diagnosed by `status`, `cancel` ends its
//!   queued items itself, and `status` counts its dead-lettered items as `producer dead`
//!   lists them.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use e2e::*;
use serde_json::Value;

/// The date suffix the mock appends to the model of its answers.
const DATED: &str = "-2024-07-18";
/// Price per million tokens (input and output) of `gpt-4o-mini` in these tests: an answer
/// of the mock (tens of tokens) costs a few thousandths.
const PER_MTOK: f64 = 100.0;
/// The cap: reached by the first answer.
const CAP: &str = "0.001";
const MAX_IN_FLIGHT: u64 = 4;

/// A price for `gpt-4o-mini` only, and a pool of three keys for the mock provider.
fn config() -> String {
    format!(
        "[providers.mock]\nmax_in_flight = {MAX_IN_FLIGHT}\napi_key_envs = [\"MONEY_KEY_A\", \"MONEY_KEY_B\", \
         \"MONEY_KEY_C\"]\nkey_retry_s = 3600\n[providers.mock.prices.\"gpt-4o-mini\"]\ninput_per_mtok = \
         {PER_MTOK:.1}\noutput_per_mtok = {PER_MTOK:.1}\n"
    )
}

/// `n` requests for `model`.
fn requests_for(path: &Path, n: usize, model: &str) {
    write_requests(path, n);
    let text = std::fs::read_to_string(path).unwrap().replace("\"mock-model\"", &format!("\"{model}\""));
    std::fs::write(path, text).unwrap();
}

/// `producer ARGS` run in the fleet's directory (where `retry` writes its input file).
fn producer_in_dir(fleet: &Fleet, args: &[&str]) -> std::process::Output {
    harness::producer_command(&fleet.config).current_dir(&fleet.dir).args(args).output().expect("run producer")
}

/// The new job of a `producer retry --json` that succeeded.
fn job_of(out: &std::process::Output) -> String {
    assert!(out.status.success(), "producer failed: {}", String::from_utf8_lossy(&out.stderr));
    harness::Submitted::from_json(&out.stdout).unwrap().job_id
}

/// `producer submit FILE --provider PROVIDER --json ARGS` ([`harness::submit`]); the job id.
fn submit(fleet: &Fleet, file: &Path, provider: &str, args: &[&str]) -> String {
    harness::submit(&fleet.config, file, provider, args).unwrap().job_id
}

/// The series of a dashboard panel's query for this namespace, by the given labels.
fn panel(fleet: &Fleet, title: &str, labels: &[&str]) -> BTreeMap<Vec<String>, f64> {
    let queries = dashboard_queries_for(&fleet.ns);
    let (_, expr) = queries.iter().find(|(t, _)| t == title).unwrap_or_else(|| panic!("no panel {title:?}"));
    prom_query(expr)
        .into_iter()
        .map(|(metric, v)| {
            let key = labels.iter().map(|l| metric.get(*l).and_then(|v| v.as_str()).unwrap_or("").to_string());
            (key.collect(), v)
        })
        .collect()
}

fn key(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

#[test]
fn a_cap_on_dated_answers_fires_retry_keeps_it_and_the_money_panels_equal_the_jobs_figures() {
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..12];
    let (a, b, c) = (format!("sk-money-a-{tag}"), format!("sk-money-b-{tag}"), format!("sk-money-c-{tag}"));
    // Key B is not valid: it leaves the rotation (the key panels have something to show).
    let suffix = format!("--answer-model-suffix={DATED}"); // `=`: the value starts with a dash
    let mock = Mock::start(&[&suffix, "--latency-ms", "20", "--valid-keys", &format!("{a},{c}")]);
    let fleet = Fleet::new("money", &mock.url, &config());
    let keys = [("MONEY_KEY_A", a.as_str()), ("MONEY_KEY_B", b.as_str()), ("MONEY_KEY_C", c.as_str())];
    let _w = fleet.worker("mw1", &keys);
    fleet.wait_for_tracker();

    // A capped job of dated answers: priced by the undated entry, cancelled by its cap.
    let input = fleet.dir.join("in.jsonl");
    requests_for(&input, 200, "gpt-4o-mini");
    let capped = submit(&fleet, &input, MOCK, &["--max-cost", CAP]);
    let lines = fleet.collect(&capped);
    assert_exactly_once(&lines, 200);
    let answered: Vec<&Value> = lines.iter().filter(|l| succeeded(l)).collect();
    assert!(!answered.is_empty(), "some items were answered before the cap");
    assert!(answered.iter().all(|l| l["response"]["body"]["model"] == format!("gpt-4o-mini{DATED}")), "dated answers");
    let status = fleet.final_status(&capped);
    assert_eq!((status["status"].as_str(), status["reason"].as_str()), (Some("cancelled"), Some("budget")), "{status}");
    let usage = &status["usage"];
    assert_eq!(usage["unpriced_answers"].as_u64(), Some(0), "every dated answer was priced: {status}");
    let cost = usage["cost"].as_f64().unwrap();
    let tokens = usage["input_tokens"].as_u64().unwrap() + usage["output_tokens"].as_u64().unwrap();
    assert!(close(cost, tokens as f64 * PER_MTOK / 1e6), "cost {cost} of {tokens} tokens: {status}");
    assert!(cost >= 0.001, "{status}");
    // The README's overshoot bound: what was in flight (max_in_flight per key in rotation)
    // when the cap was crossed, and what started before the cancel reached the worker.
    assert!(answered.len() as u64 <= 2 * 3 * MAX_IN_FLIGHT + 1, "the cap stopped the job: {} answers", answered.len());
    assert_eq!(usage["max_cost"].as_f64(), Some(0.001));
    let text = String::from_utf8_lossy(&fleet.producer(&["status", &capped]).stdout).to_string();
    assert!(text.contains("(cap 0.001)"), "the cap as given: {text}");

    // `retry` keeps the cap (so this one is cancelled at once too), or takes another.
    let kept = job_of(&producer_in_dir(&fleet, &["retry", &capped, "--json"]));
    let kept_status = fleet.final_status(&kept);
    assert_eq!(kept_status["usage"]["max_cost"].as_f64(), Some(0.001), "{kept_status}");
    assert_eq!(kept_status["reason"], "budget", "{kept_status}");
    std::fs::remove_file(fleet.dir.join(format!("{capped}.retry.jsonl"))).unwrap();
    let raised = job_of(&producer_in_dir(&fleet, &["retry", &capped, "--json", "--max-cost", "1000"]));
    let raised_status = fleet.final_status(&raised);
    assert_eq!(raised_status["usage"]["max_cost"].as_f64(), Some(1000.0), "{raised_status}");
    assert_eq!(raised_status["status"], "completed", "{raised_status}");

    // The money panels, as Grafana runs them for this namespace, equal the jobs' figures.
    let jobs: Vec<Value> = [&capped, &kept, &raised].iter().map(|j| fleet.final_status(j)).collect();
    let sum = |f: &dyn Fn(&Value) -> f64| jobs.iter().map(f).sum::<f64>();
    let input_tokens = sum(&|j| j["usage"]["input_tokens"].as_f64().unwrap());
    let output_tokens = sum(&|j| j["usage"]["output_tokens"].as_f64().unwrap());
    let total_cost = sum(&|j| j["usage"]["cost"].as_f64().unwrap());
    let answers = sum(&|j| j["succeeded"].as_f64().unwrap());
    let mut last = String::new();
    eventually(Duration::from_secs(60), "the money panels show the jobs' figures", || {
        let tokens = panel(&fleet, "Tokens by model and kind", &["provider", "model", "kind"]);
        let by_model = panel(&fleet, "Cost by model", &["provider", "model"]);
        let top = panel(&fleet, "Top jobs by cost", &["job_id"]);
        let against_cap = panel(&fleet, "Spend against cap", &["job_id"]);
        let modes = panel(&fleet, "Answers by mode", &["mode"]);
        let active = panel(&fleet, "Active keys", &["provider"]);
        let rejected = panel(&fleet, "Key rejections", &["provider", "key_env"]);
        last = format!("{tokens:?}\n{by_model:?}\n{top:?}\n{against_cap:?}\n{modes:?}\n{active:?}\n{rejected:?}");
        let job_cost = |j: &Value| j["usage"]["cost"].as_f64().unwrap();
        let share = |j: &Value| job_cost(j) / j["usage"]["max_cost"].as_f64().unwrap();
        tokens.get(&key(&["mock", "gpt-4o-mini", "input"])) == Some(&input_tokens)
            && tokens.get(&key(&["mock", "gpt-4o-mini", "output"])) == Some(&output_tokens)
            && tokens.get(&key(&["mock", "gpt-4o-mini", "cached_input"])) == Some(&0.0)
            && !tokens.keys().any(|k| k[1] == "other")
            && by_model.len() == 1
            && by_model.get(&key(&["mock", "gpt-4o-mini"])).is_some_and(|c| close(*c, total_cost))
            && jobs
                .iter()
                .all(|j| top.get(&key(&[j["job_id"].as_str().unwrap()])).is_some_and(|c| close(*c, job_cost(j))))
            && jobs
                .iter()
                .all(|j| against_cap.get(&key(&[j["job_id"].as_str().unwrap()])).is_some_and(|s| close(*s, share(j))))
            && modes.get(&key(&["online"])) == Some(&answers)
            && modes.get(&key(&["batch"])) == Some(&0.0)
            && active.get(&key(&["mock"])) == Some(&2.0)
            && rejected.get(&key(&["mock", "MONEY_KEY_B"])) == Some(&1.0)
    });
    eprintln!("money panels:\n{last}");
    assert!(answers > 0.0 && total_cost > 0.0);
    fleet.cleanup(&[&capped, &kept, &raised]);
}

#[test]
fn max_cost_is_refused_when_no_line_can_be_priced() {
    let mock = Mock::start(&[]);
    let fleet = Fleet::new("unpriced", &mock.url, &config());
    let input = fleet.dir.join("in.jsonl");
    requests_for(&input, 20, "gpt-unpriced");
    let out = fleet.producer(&["submit", input.to_str().unwrap(), "--provider", "mock", "--max-cost", "5"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "refused as bad input: {stderr}");
    assert!(stderr.contains("--max-cost 5 cannot be enforced"), "{stderr}");
    assert!(stderr.contains("model \"gpt-unpriced\" (20 lines)"), "{stderr}");
    assert!(out.stdout.is_empty(), "no job id");
    // Nothing was published: not even the provider's items queue was declared.
    assert_eq!(fleet.queue_len(&fleet.topology().items_queue("mock")), None);
    // A dated request name is priced by its entry: accepted.
    requests_for(&input, 20, "gpt-4o-mini-2024-07-18");
    let job = submit(&fleet, &input, MOCK, &["--max-cost", "5"]);
    fleet.cleanup(&[&job]);
}

#[test]
fn a_job_no_worker_serves_is_diagnosed_cancel_ends_it_and_dead_letters_agree() {
    let mock = Mock::start(&[]);
    // Two providers; the only worker serves `mock`, none serves `ghost`.
    let extra = format!(
        "[providers.ghost]\nkind = \"openai\"\nbase_url = \"{}\"\n[worker]\nproviders = [\"mock\"]\n",
        mock.url
    );
    let fleet = Fleet::new("unserved", &mock.url, &extra);
    let _w = fleet.worker("uw1", &[]);
    fleet.wait_until_consuming("uw1");
    fleet.wait_for_tracker();
    let input = fleet.dir.join("in.jsonl");
    write_requests(&input, 20);
    let job = submit(&fleet, &input, "ghost", &[]);

    // The broker dead-letters one item (rejected without requeue): the tracker ends it
    // failed, and `producer dead` lists it.
    let queue = fleet.topology().job_items_queue("ghost", &job);
    fleet.amqp(|conn, _| async move {
        let ch = conn.create_channel().await.unwrap();
        let msg = ch.basic_get(queue.as_str().into(), Default::default()).await.unwrap().expect("an item");
        msg.delivery.acker.reject(lapin::options::BasicRejectOptions { requeue: false }).await.unwrap();
        fleet::amqp::close(&conn, "item rejected").await;
    });
    let mut status = Value::Null;
    eventually(Duration::from_secs(30), "status counts the dead-lettered item", || {
        status = fleet.try_status(&job).unwrap_or(Value::Null);
        status["progress"]["dead_lettered"].as_u64() == Some(1)
    });
    assert_eq!(
        status["stuck"].as_str().map(|s| s.starts_with("no worker serves provider ghost")),
        Some(true),
        "{status}"
    );
    let text = String::from_utf8_lossy(&fleet.producer(&["status", &job]).stdout).to_string();
    assert!(text.contains("stuck: no worker serves provider ghost"), "{text}");

    // `cancel` ends the queued items itself and says so.
    let out = fleet.producer(&["cancel", &job]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("no worker serves provider ghost, so its 19 queued items were ended `cancelled` here"),
        "{said}"
    );
    let lines = fleet.collect_fleet_side(&job, "dead_lettered 1");
    assert_exactly_once(&lines, 20);
    let ended = fleet.final_status(&job);
    assert_eq!(ended["status"], "cancelled", "{ended}");
    assert_eq!((ended["cancelled"].as_u64(), ended["failed"].as_u64()), (Some(19), Some(1)), "{ended}");
    assert!(ended.get("stuck").is_none(), "an ended job is not stuck: {ended}");

    // The ended job's dead-lettered count is the job's entries of `producer dead`.
    let dead = fleet.producer(&["dead", "--json"]);
    let listed = String::from_utf8_lossy(&dead.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["job_id"] == job.as_str())
        .count() as u64;
    assert_eq!(ended["dead_lettered"].as_u64(), Some(listed), "status and `producer dead` agree: {ended}");
    assert_eq!(listed, 1);
    let text = String::from_utf8_lossy(&fleet.producer(&["status", &job]).stdout).to_string();
    assert!(text.contains("dead-lettered=1 (listed by `producer dead`)"), "{text}");
    // `--watch` of the ended job: one drawing, every line within 80 columns.
    let watched = String::from_utf8_lossy(&fleet.producer(&["status", &job, "--watch"]).stdout).to_string();
    assert!(watched.lines().all(|l| l.chars().count() <= 80), "{watched}");
    assert!(watched.contains("dead-lettered 1"), "{watched}");
    let extra_queues = [fleet.topology().items_queue("ghost"), fleet.topology().job_items_queue("ghost", &job)];
    fleet.amqp(|conn, _| async move {
        let ch = conn.create_channel().await.unwrap();
        for q in extra_queues {
            let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
        }
        fleet::amqp::close(&conn, "done").await;
    });
    fleet.cleanup(&[&job]);
}

#[test]
fn batch_answers_count_in_the_money_panels_at_the_batch_factor() {
    const POLL_S: u64 = 1;
    let mock = Mock::start(&[]);
    let extra = format!(
        "[providers.mock]\nbatch = true\nbatch_poll_interval_s = {POLL_S}\n\
         [providers.mock.prices.\"mock-model\"]\ninput_per_mtok = 1000.0\noutput_per_mtok = 3000.0\n"
    );
    let fleet = Fleet::new("moneybatch", &mock.url, &extra);
    let _w = fleet.worker("mb1", &[]);
    fleet.wait_for_tracker();
    let input = fleet.dir.join("in.jsonl");
    write_requests(&input, 30);
    let submit_as = |mode: &str| submit(&fleet, &input, MOCK, &["--mode", mode]);
    let online = submit_as("online");
    assert_exactly_once(&fleet.collect(&online), 30);
    let batch = submit_as("batch");
    assert_exactly_once(&fleet.collect(&batch), 30);
    let (o, b) = (fleet.final_status(&online), fleet.final_status(&batch));
    // The batch job's answers cost half the price of their tokens (batch_factor 0.5).
    let at_full = |s: &Value| {
        let u = &s["usage"];
        (u["input_tokens"].as_f64().unwrap() * 1000.0 + u["output_tokens"].as_f64().unwrap() * 3000.0) / 1e6
    };
    assert!(b["usage"]["input_tokens"].as_u64().unwrap() > 0, "batch answers carry usage: {b}");
    assert!(close(b["usage"]["cost"].as_f64().unwrap(), at_full(&b) / 2.0), "{b}");
    assert!(close(o["usage"]["cost"].as_f64().unwrap(), at_full(&o)), "{o}");

    let jobs = [&o, &b];
    let sum = |f: &dyn Fn(&Value) -> f64| jobs.iter().map(|j| f(j)).sum::<f64>();
    let input_tokens = sum(&|j| j["usage"]["input_tokens"].as_f64().unwrap());
    let output_tokens = sum(&|j| j["usage"]["output_tokens"].as_f64().unwrap());
    let cost = sum(&|j| j["usage"]["cost"].as_f64().unwrap());
    let mut last = String::new();
    eventually(Duration::from_secs(60), "the money panels count online and batch answers", || {
        let tokens = panel(&fleet, "Tokens by model and kind", &["model", "kind"]);
        let by_model = panel(&fleet, "Cost by model", &["model"]);
        let modes = panel(&fleet, "Answers by mode", &["mode"]);
        let top = panel(&fleet, "Top jobs by cost", &["job_id"]);
        last = format!("{tokens:?}\n{by_model:?}\n{modes:?}\n{top:?}");
        tokens.get(&key(&["mock-model", "input"])) == Some(&input_tokens)
            && tokens.get(&key(&["mock-model", "output"])) == Some(&output_tokens)
            && by_model.get(&key(&["mock-model"])).is_some_and(|c| close(*c, cost))
            && modes.get(&key(&["online"])).copied() == o["succeeded"].as_f64()
            && modes.get(&key(&["batch"])).copied() == b["succeeded"].as_f64()
            && top.get(&key(&[&batch])).is_some_and(|c| close(*c, b["usage"]["cost"].as_f64().unwrap()))
    });
    eprintln!("money panels, online and batch:\n{last}");
    fleet.cleanup(&[&online, &batch]);
    fleet.amqp(|conn, t| async move {
        let ch = conn.create_channel().await.expect("channel");
        let _ = t.delete_chunk_queues(&ch, "mock", POLL_S).await;
    });
}
