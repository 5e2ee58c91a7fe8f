//! `cluster`: the cluster run (`make cluster`, started by `scripts/cluster.sh`, which
//! brings up the 3 nodes first and passes their URLs in `FLEET__AMQP__URLS`): 20,000
//! requests through 3 workers while the node leading the items queue is stopped and the
//! node leading the job's results queue is killed, each restarted. Prints the chaos table;
//! exits non-zero if anything was lost, duplicated or miscounted.

use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let items = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let Ok(script) = std::env::var("CLUSTER_SCRIPT") else {
        eprintln!("cluster: run through `make cluster` (scripts/cluster.sh), which starts the nodes");
        return ExitCode::FAILURE;
    };
    let urls = e2e::amqp_urls();
    if urls.len() < 3 {
        eprintln!("cluster: FLEET__AMQP__URLS must list the cluster's nodes, got {urls:?}");
        return ExitCode::FAILURE;
    }
    let plan = e2e::chaos::Plan {
        items,
        workers: 3,
        // Slow enough (at most 3 x 16 in flight / ~0.25 s = ~190 requests/s, so 20,000 take
        // 100 s or more) that both node faults, each down for 20 s or so, fall inside the job.
        max_in_flight: 16,
        // Node losses are this run's faults; workers are not killed (a day: never).
        kill_every: Duration::from_secs(86_400),
        kill_tracker: false,
        restart_broker: false,
        stop_pushgateway: false,
        mock_args: [
            "--latency-ms",
            "60",
            "--jitter-ms",
            "60",
            "--error-500",
            "0.05",
            "--error-429",
            "0.02",
            "--seed",
            "2026",
        ]
        .map(String::from)
        .to_vec(),
        cluster: Some(e2e::chaos::ClusterFaults { script: script.into(), down_for: Duration::from_secs(5) }),
    };
    eprintln!("cluster: {plan:?}");
    let report = e2e::chaos::run(&plan);
    println!("{}", report.table());
    if report.ok() {
        println!("cluster: OK (0 lost, 0 duplicated, counts exact, {} node faults)", report.node_faults.len());
        ExitCode::SUCCESS
    } else {
        println!("cluster: FAILED");
        ExitCode::FAILURE
    }
}
