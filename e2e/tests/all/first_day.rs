//! A user's first day: the mistakes a configuration can hold are caught before anything
//! runs, and a run where nothing goes wrong is quiet.

use std::time::Duration;

use e2e::*;

/// Lines of a log at WARN or ERROR level.
fn loud_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")).collect()
}

#[test]
fn a_run_where_nothing_goes_wrong_logs_no_warning_or_error() {
    let mock = Mock::start(&[]);
    // A second provider is configured that no worker here serves: its items queue does not
    // exist, and the tracker measures every configured provider's backlog.
    let fleet = Fleet::new(
        "quiet",
        &mock.url,
        "[worker]\nproviders = [\"mock\"]\n[providers.other]\nkind = \"anthropic\"\nbase_url = \"http://127.0.0.1:9\"\n",
    );
    let mut w1 = fleet.worker("w1", &[]);
    // The second worker stands by for the tracker role, trying the lock every 2 s.
    let mut w2 = fleet.worker("w2", &[]);
    let job = fleet.submit_requests(1200);
    let lines = fleet.collect(&job);
    assert_exactly_once(&lines, 1200);
    assert_eq!(fleet.final_status(&job)["status"], "completed");
    let mut producer_stderr = String::new();
    for args in [vec!["status", job.as_str()], vec!["jobs"], vec!["dead"]] {
        let out = fleet.producer(&args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        producer_stderr.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    // Long enough for several standby lock attempts and a backlog measurement.
    std::thread::sleep(Duration::from_secs(6));
    for w in [&mut w1, &mut w2] {
        w.signal("TERM");
        assert_eq!(w.wait_exit(Duration::from_secs(30)), Some(0), "{} exits 0 on SIGTERM", w.name);
    }
    for id in ["w1", "w2"] {
        let log = fleet.worker_log(id);
        assert!(log.contains("worker stopped"), "{id} logged its stop:\n{log}");
        assert!(loud_lines(&log).is_empty(), "{id} logged WARN/ERROR:\n{}", loud_lines(&log).join("\n"));
    }
    assert!(loud_lines(&producer_stderr).is_empty(), "producer logged WARN/ERROR:\n{producer_stderr}");
    fleet.cleanup(&[&job]);
}

#[test]
fn a_worker_without_its_api_key_refuses_to_start_naming_the_variable() {
    let fleet = Fleet::new("nokey", "http://127.0.0.1:9", "[providers.mock]\napi_key_env = \"FLEET_E2E_UNSET_KEY\"\n");
    let mut w = fleet.worker("w1", &[("FLEET_E2E_UNSET_KEY", "")]);
    assert_eq!(w.wait_exit(Duration::from_secs(20)), Some(2), "exit 2 for a missing key");
    let log = fleet.worker_log("w1");
    assert!(log.contains("FLEET_E2E_UNSET_KEY"), "names the variable: {log}");
}

#[test]
fn a_misspelt_config_key_stops_both_binaries_with_the_nearest_key() {
    let fleet = Fleet::new("typo", "http://127.0.0.1:9", "[worker]\nmax_in_fligt = 5\n");
    let out = fleet.producer(&["jobs"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("worker.max_in_fligt") && err.contains("worker.max_in_flight"), "{err}");
    let mut w = fleet.worker("w1", &[]);
    assert_eq!(w.wait_exit(Duration::from_secs(20)), Some(2));
    assert!(fleet.worker_log("w1").contains("did you mean `worker.max_in_flight`"));
}

#[test]
fn wait_can_run_any_number_of_times_and_an_output_file_belongs_to_one_job() {
    let mock = Mock::start(&[]);
    let fleet = Fleet::new("rewait", &mock.url, "");
    let job_a = fleet.submit_requests(300);
    // Two waits on one job at the same time, before any worker runs: each gets everything.
    let (out1, out2) = (fleet.dir.join("a1.jsonl"), fleet.dir.join("a2.jsonl"));
    let mut waits: Vec<Proc> = [&out1, &out2]
        .iter()
        .map(|o| fleet.producer_spawn(&["wait", &job_a, "-o", o.to_str().unwrap(), "--timeout", "120"]))
        .collect();
    let _w = fleet.worker("w1", &[]);
    for w in &mut waits {
        assert_eq!(w.wait_exit(Duration::from_secs(150)), Some(0), "both concurrent waits finish");
    }
    let first = read_output(&out1);
    assert_exactly_once(&first, 300);
    assert_exactly_once(&read_output(&out2), 300);

    // The finished job collected again into a new file: complete at once.
    let again = fleet.dir.join("a3.jsonl");
    let out = fleet.wait(&job_a, &again, 30);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_exactly_once(&read_output(&again), 300);
    // A complete file: wait returns its summary and leaves the file as it was.
    let before = std::fs::read(&out1).unwrap();
    let out = fleet.producer(&["wait", &job_a, "-o", out1.to_str().unwrap(), "--timeout", "30", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: Value = serde_json::from_slice(&out.stdout).expect("--json summary");
    assert_eq!(summary["counts"]["succeeded"], 300);
    assert_eq!(std::fs::read(&out1).unwrap(), before);

    // Job B into job A's file is refused before anything is read or written.
    let job_b = fleet.submit_requests(20);
    let out = fleet.wait(&job_b, &out1, 30);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&job_a) && err.contains(&job_b), "{err}");
    assert_eq!(std::fs::read(&out1).unwrap(), before, "the other job's file is untouched");
    fleet.collect(&job_b);

    // An unknown job is named as such.
    let out = fleet.wait("job_doesnotexist", &fleet.dir.join("x.jsonl"), 10);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no job"), "{}", String::from_utf8_lossy(&out.stderr));
    fleet.cleanup(&[&job_a, &job_b]);
}

#[test]
fn submit_wait_checks_its_output_first_and_json_means_json() {
    let mock = Mock::start(&[]);
    let fleet = Fleet::new("submitwait", &mock.url, "");
    let input = fleet.dir.join("in.jsonl");
    write_requests(&input, 50);
    let unwritable = fleet.dir.join("no-such-dir").join("out.jsonl");
    let args = ["submit", input.to_str().unwrap(), "--provider", "mock", "--wait", "-o", unwritable.to_str().unwrap()];
    let out = fleet.producer(&args);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot open"));
    assert_eq!(fleet.queue_len(&fleet.topology().items_queue(MOCK)), None, "nothing was published");

    let _w = fleet.worker("w1", &[]);
    let output = fleet.dir.join("out.jsonl");
    let out = fleet.producer(&[
        "submit",
        input.to_str().unwrap(),
        "--provider",
        "mock",
        "--wait",
        "--json",
        "-o",
        output.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<Value> =
        stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l:?}"))).collect();
    assert_eq!(lines.len(), 2, "the job id, then the summary: {stdout}");
    assert_eq!(lines[1]["counts"]["succeeded"], 50);
    let job = lines[0]["job_id"].as_str().unwrap().to_string();
    assert_exactly_once(&read_output(&output), 50);
    // The same file for a new job is refused before the job is created.
    let out = fleet.producer(&[
        "submit",
        input.to_str().unwrap(),
        "--provider",
        "mock",
        "--wait",
        "-o",
        output.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds results"));
    fleet.cleanup(&[&job]);
}

#[test]
fn a_refused_broker_login_is_an_error_not_an_endless_retry() {
    let fleet = Fleet::new("badlogin", "http://127.0.0.1:9", "");
    let url = amqp_url().replacen("guest:guest@", "guest:not-the-password@", 1);
    assert_ne!(url, amqp_url(), "the test broker URL carries guest:guest");
    let mut w = fleet.worker("w1", &[("FLEET__AMQP__URL", url.as_str())]);
    assert_eq!(w.wait_exit(Duration::from_secs(30)), Some(1), "exit 1 for a refused login");
    let log = fleet.worker_log("w1");
    assert!(log.contains("refused the login"), "{log}");
    assert!(!log.contains("not-the-password"), "the password stays out of the log: {log}");
}

#[test]
fn an_item_the_broker_dead_letters_ends_failed_and_the_job_ends() {
    let mock = Mock::start(&[]);
    let fleet = Fleet::new("brokerdead", &mock.url, "");
    // A worker declares the topology, then leaves before the job is submitted.
    fleet.declare_topology_then_stop();
    let job = fleet.submit_requests(30);
    let items_queue = fleet.topology().job_items_queue("mock", &job);
    // The broker dead-letters one item (a consumer rejects it without requeue): no worker
    // ever sees it again, and nothing but the tracker can end it.
    let queue = items_queue.clone();
    let rejected: String = fleet.amqp(|conn, _| async move {
        let ch = conn.create_channel().await.unwrap();
        let msg = ch.basic_get(queue.as_str().into(), Default::default()).await.unwrap().expect("an item");
        let item: Value = serde_json::from_slice(&msg.delivery.data).unwrap();
        msg.delivery.acker.reject(lapin::options::BasicRejectOptions { requeue: false }).await.unwrap();
        // A reject has no answer: closing politely makes the broker take it first (a
        // connection dropped before the frame left would requeue the item instead).
        fleet::amqp::close(&conn, "item rejected").await;
        item["custom_id"].as_str().unwrap().to_string()
    });
    let _w = fleet.worker("w1", &[]);
    let lines = fleet.collect_fleet_side(&job, "dead_lettered 1");
    assert_exactly_once(&lines, 30);
    let dead: Vec<&Value> = lines.iter().filter(|l| l["custom_id"] == rejected.as_str()).collect();
    assert_eq!(dead[0]["error"]["code"], "dead_lettered", "{}", dead[0]);
    assert!(dead[0]["error"]["message"].as_str().unwrap().contains("rejected"), "{}", dead[0]);
    let status = fleet.final_status(&job);
    assert_eq!((status["succeeded"].as_u64(), status["failed"].as_u64()), (Some(29), Some(1)), "{status}");
    // The item itself stays parked for `producer dead`.
    assert_eq!(fleet.queue_len(&fleet.topology().dead_queue()), Some(1));
    fleet.cleanup(&[&job]);
}

#[test]
fn status_says_what_a_slow_job_waits_for() {
    let down = Mock::start(&["--error-503", "1.0"]);
    let retries = "[retry]\nmax_attempts = 2\ninitial_backoff_ms = 5\nmax_backoff_ms = 20\nmax_elapsed_s = 1\n\
                   delay_tiers_s = [1, 2]\nmax_delays = 30\ndelay_budget_s = 600\n";
    let fleet = Fleet::new("slowstatus", &down.url, retries);
    let _w = fleet.worker("w1", &[]);
    let job = fleet.submit_requests(40);
    let mut last = Value::Null;
    eventually(Duration::from_secs(30), "status shows delayed items and the provider's error", || {
        let out = fleet.producer(&["status", &job, "--json"]);
        last = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        last["progress"]["in_delay_queues"].as_u64().unwrap_or(0) > 0
            && last["progress"]["last_error"].as_str().is_some_and(|e| e.contains("503"))
    });
    assert_eq!(last["status"], "in_progress", "{last}");
    assert_eq!(last["progress"]["cancelling"], false, "{last}");
    let text = String::from_utf8_lossy(&fleet.producer(&["status", &job]).stdout).to_string();
    assert!(text.contains("in delay queues=") && text.contains("last error"), "{text}");
    // A cancel ends the waiting items without another call, and the job ends cancelled.
    assert!(fleet.producer(&["cancel", &job]).status.success());
    let lines = fleet.collect(&job);
    assert_exactly_once(&lines, 40);
    let status = fleet.final_status(&job);
    assert_eq!(status["status"], "cancelled", "{status}");
    assert!(status.get("progress").is_none(), "an ended job has no progress: {status}");
    fleet.cleanup(&[&job]);
}

/// Issue 21, point 13: the tracker forgetting a job (`tracker.retention_s`) never deletes
/// output nobody read: a job never collected is still downloadable after it.
#[test]
fn a_jobs_results_outlive_the_trackers_retention() {
    let mock = Mock::start(&[]);
    let fleet = Fleet::new("retention", &mock.url, "[tracker]\nretention_s = 2\n[pushgateway]\nstale_group_s = 2\n");
    let _w = fleet.worker("w1", &[]);
    let job = fleet.submit_requests(20);
    fleet.final_status(&job);
    // `status` of a job the tracker forgot fails at once and says where the results are,
    // not after waiting for the tracker to catch up.
    let mut err = String::new();
    eventually(Duration::from_secs(30), "the tracker forgets the job", || {
        let out = fleet.producer(&["status", &job, "--timeout", "20"]);
        err = String::from_utf8_lossy(&out.stderr).to_string();
        !out.status.success()
    });
    assert!(err.contains("summary is forgotten") && err.contains("producer wait"), "{err}");
    let stream = fleet.topology().results_queue(&job);
    assert!(fleet.queue_len(&stream).is_some(), "the results stream is kept");
    let lines = fleet.collect(&job);
    assert_exactly_once(&lines, 20);
    assert_eq!(error_codes(&lines).get(&None), Some(&20));
    fleet.cleanup(&[&job]);
}

/// Ledger messages ahead of the submission in the catching-up test: enough for a debug
/// build's tracker to take a few seconds over them.
const LEDGER_AHEAD: usize = 20_000;

#[test]
fn status_right_after_submit_waits_for_a_tracker_catching_up() {
    let mock = Mock::start(&[]);
    let fleet = Fleet::new("catchup", &mock.url, "");
    // A fleet whose tracker has to start over: the submission waits on the ledger for the
    // next worker, whose tracker may answer before it has read it.
    let mut w1 = fleet.worker("w1", &[]);
    fleet.wait_for_tracker();
    w1.signal("TERM");
    assert_eq!(w1.wait_exit(Duration::from_secs(30)), Some(0));
    // Ahead of the submission, a long ledger for the next tracker to read (messages with
    // nothing to fold, as an older tracker's `job_finished` echo).
    fleet.amqp(|conn, t| async move {
        let ch = fleet::amqp::confirm_channel(&conn).await.unwrap();
        let props = || lapin::BasicProperties::default().with_type(fleet::wire::KIND_JOB_FINISHED.into());
        let mut pending = Vec::with_capacity(LEDGER_AHEAD);
        for _ in 0..LEDGER_AHEAD {
            pending.push(fleet::amqp::publish(&ch, "", &t.ledger_queue(), b"{}", props()).await.unwrap());
        }
        for p in pending {
            p.wait().await.unwrap();
        }
    });
    let job = fleet.submit_requests(30);
    let _w2 = fleet.worker("w2", &[]);
    let out = fleet.producer(&["status", &job, "--json", "--timeout", "30"]);
    assert!(out.status.success(), "status right after submit: {}", String::from_utf8_lossy(&out.stderr));
    let status: Value = serde_json::from_slice(&out.stdout).expect("status --json prints JSON");
    assert_eq!((status["job_id"].as_str(), status["total"].as_u64()), (Some(job.as_str()), Some(30)), "{status}");
    assert_exactly_once(&fleet.collect(&job), 30);
    fleet.cleanup(&[&job]);
}
