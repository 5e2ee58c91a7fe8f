//! `cluster`: the cluster runs. Each brings up the private 3-node cluster first
//! ([`e2e::cluster::Cluster`]: `fleet-c1..3@localhost`, state in `.run/cluster`), gives
//! the fleet their URLs in `FLEET__AMQP__URLS`, and stops the nodes at the end:
//!
//! - `cluster [ITEMS]` (`make cluster`): 20,000 requests through 3 workers while the node
//!   leading the items queue is stopped and the node leading the job's results queue is
//!   killed, each restarted.
//! - `cluster soak [ITEMS]` (`make cluster-soak`): 1,000,000 requests through 3 workers
//!   while every node is restarted in turn (a rolling restart), then the busiest node is
//!   paused for 30 s, a worker is SIGKILLed every 5 s and the tracker's worker once; the
//!   table adds what the run cost (broker CPU and disk per request, the tracker's
//!   checkpoint, each process's peak RSS).
//!
//! Prints the chaos table; exits non-zero if anything was lost, duplicated or miscounted.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use e2e::cluster::Cluster;

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let soak = args.first().is_some_and(|a| a == "soak");
    if soak {
        args.remove(0);
    }
    let default = if soak { 1_000_000 } else { 20_000 };
    let items = args.first().and_then(|a| a.parse().ok()).unwrap_or(default);
    let cluster = Arc::new(Cluster::new());
    let _down = StopNodes(cluster.clone());
    if let Err(e) = cluster.up() {
        eprintln!("cluster: {e}");
        return ExitCode::FAILURE;
    }
    // Read by the fleet's processes (`amqp.urls`) and by the checks (`e2e::amqp_urls`);
    // set before any thread starts.
    std::env::set_var("FLEET__AMQP__URLS", cluster.urls().join(","));
    let plan = if soak { soak_plan(items, cluster) } else { leader_loss_plan(items, cluster) };
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

/// Stops the cluster's nodes when main ends, however it ends (a panic included), even if
/// the soak's fault thread still holds the cluster then.
struct StopNodes(Arc<Cluster>);

impl Drop for StopNodes {
    fn drop(&mut self) {
        self.0.down();
    }
}

/// `make cluster`: two leader losses in a slow job.
fn leader_loss_plan(items: usize, cluster: Arc<Cluster>) -> e2e::chaos::Plan {
    e2e::chaos::Plan {
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
        cluster: Some(e2e::chaos::ClusterFaults { cluster, down_for: Duration::from_secs(5), soak: None }),
    }
}

/// `make cluster-soak`: as fast as this machine goes (the broker is the bottleneck, not the
/// mock), with every fault.
fn soak_plan(items: usize, cluster: Arc<Cluster>) -> e2e::chaos::Plan {
    e2e::chaos::Plan {
        items,
        workers: 3,
        max_in_flight: 128,
        kill_every: Duration::from_secs(5),
        kill_tracker: true,
        restart_broker: false,
        stop_pushgateway: false,
        mock_args: [
            "--latency-ms",
            "20",
            "--jitter-ms",
            "20",
            "--error-500",
            "0.01",
            "--error-429",
            "0.005",
            "--seed",
            "2026",
        ]
        .map(String::from)
        .to_vec(),
        cluster: Some(e2e::chaos::ClusterFaults {
            cluster,
            down_for: Duration::from_secs(5),
            soak: Some(e2e::chaos::SoakFaults {
                roll_at: 0.05,
                pause_at: 0.6,
                pause_for: Some(Duration::from_secs(30)),
            }),
        }),
    }
}
