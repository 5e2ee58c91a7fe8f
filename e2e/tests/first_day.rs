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
