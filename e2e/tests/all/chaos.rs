//! The short chaos run of `make test`: worker SIGKILLs (and the tracker's) only; the full
//! run with broker restarts and a Pushgateway outage is `make chaos`.

use std::time::Duration;

#[test]
fn short_chaos_run_loses_and_duplicates_nothing() {
    let plan = e2e::chaos::Plan {
        items: 6000,
        workers: 3,
        max_in_flight: 16,
        kill_every: Duration::from_secs(2),
        kill_tracker: true,
        restart_broker: false,
        stop_pushgateway: false,
        mock_args: [
            "--latency-ms",
            "50",
            "--jitter-ms",
            "50",
            "--error-500",
            "0.05",
            "--error-429",
            "0.02",
            "--seed",
            "7",
        ]
        .map(String::from)
        .to_vec(),
        cluster: None,
    };
    let report = e2e::chaos::run(&plan);
    println!("{}", report.table());
    assert!(report.worker_kills >= 2, "the run was long enough to kill workers:\n{}", report.table());
    assert!(report.ok(), "{}", report.table());
}
