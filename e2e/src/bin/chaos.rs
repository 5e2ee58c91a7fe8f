//! `chaos`: the full chaos run (`make chaos`): 20,000 requests through 3 workers while
//! workers, the tracker, RabbitMQ and the Pushgateway fail; prints a table and exits
//! non-zero if anything was lost, duplicated or miscounted.

use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let items = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let plan = e2e::chaos::Plan {
        items,
        workers: 3,
        max_in_flight: 32,
        kill_every: Duration::from_secs(3),
        kill_tracker: true,
        restart_broker: true,
        stop_pushgateway: true,
        mock_args: [
            "--latency-ms",
            "60",
            "--jitter-ms",
            "60",
            "--error-500",
            "0.05",
            "--error-503",
            "0.03",
            "--error-429",
            "0.02",
            "--seed",
            "2026",
        ]
        .map(String::from)
        .to_vec(),
        cluster: None,
    };
    eprintln!("chaos: {plan:?}");
    let report = e2e::chaos::run(&plan);
    println!("{}", report.table());
    if report.ok() {
        println!("chaos: OK (0 lost, 0 duplicated, counts exact)");
        ExitCode::SUCCESS
    } else {
        println!("chaos: FAILED");
        ExitCode::FAILURE
    }
}
