//! `restart_delayed`: part of `make chaos`. Items waiting in the delay queues while
//! RabbitMQ restarts (on a private node) all come back and end exactly once; prints what
//! it saw and exits non-zero otherwise.

use std::process::ExitCode;

fn main() -> ExitCode {
    let items = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(4000);
    let report = e2e::restart::delayed_items_survive_a_broker_restart(items);
    println!("{report:#?}");
    if report.ok() {
        ExitCode::SUCCESS
    } else {
        eprintln!("delayed items were lost, duplicated or miscounted across the broker restart");
        ExitCode::FAILURE
    }
}
