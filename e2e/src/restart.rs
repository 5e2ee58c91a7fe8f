//! The broker-restart scenario of issue 9: many items wait in the delay queues when
//! RabbitMQ restarts (`stop_app`, a few seconds, `start_app`); every one of them must come
//! back and end exactly once. It runs on a [`PrivateBroker`], a RabbitMQ node of its own
//! (own node name, ports, data and logs, started and stopped by
//! `scripts/private-rabbitmq.sh`), because other tests share the broker on 5672.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::*;

/// A private RabbitMQ node on a free port, stopped (and its data deleted) when dropped.
pub struct PrivateBroker {
    /// The node's data and logs.
    pub dir: PathBuf,
    /// The node's AMQP port (it also takes `port + 1`).
    pub port: u16,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/private-rabbitmq.sh")
}

impl PrivateBroker {
    /// Starts the node and waits until it accepts connections (about 10 s).
    pub fn start(name: &str) -> PrivateBroker {
        let dir = std::env::temp_dir().join(format!("fleet-rabbit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // The node also uses `port + 1` (Erlang distribution): find two free ports in a row.
        let port = loop {
            let p = free_port();
            if p < 65535 && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
                break p;
            }
        };
        let broker = PrivateBroker { dir, port };
        let status = Command::new(script()).args(["start", broker.dir.to_str().unwrap(), &port.to_string()]).status();
        assert!(status.is_ok_and(|s| s.success()), "private RabbitMQ failed to start; see {}", broker.dir.display());
        broker
    }

    /// `amqp://` URL of the node.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// `stop_app`, `down` of waiting, `start_app`: every connection drops, the node's data stays.
    pub fn bounce(&self, down: Duration) {
        let status = Command::new(script())
            .args(["bounce", self.dir.to_str().unwrap(), &down.as_secs().max(1).to_string()])
            .status();
        assert!(status.is_ok_and(|s| s.success()), "bouncing the private RabbitMQ failed");
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = Command::new(script()).args(["stop", self.dir.to_str().unwrap()]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the scenario saw.
#[derive(Debug, Default)]
pub struct RestartReport {
    /// Requests in the job.
    pub items: usize,
    /// Items waiting in the delay queues just before the broker stopped.
    pub delayed_at_restart: u32,
    /// Lines of the output.
    pub lines: usize,
    /// Requests missing from the output.
    pub lost: usize,
    /// Extra copies of requests in the output.
    pub duplicated: usize,
    /// The job's final status per the tracker.
    pub job_status: String,
    /// `(succeeded, failed)` per the tracker.
    pub tracker_counts: (u64, u64),
    /// `(succeeded, failed)` lines of the output.
    pub output_counts: (u64, u64),
    /// Seconds the scenario took, broker start included.
    pub elapsed_s: f64,
}

impl RestartReport {
    /// Nothing lost, nothing twice, the job ended and the tracker agrees with the output.
    pub fn ok(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.lines == self.items
            && !matches!(self.job_status.as_str(), "in_progress" | "submitting")
            && self.tracker_counts == self.output_counts
            && self.delayed_at_restart > 0
    }
}

/// Submits `items` requests to a provider failing about every second call with 503 (so about
/// half the items wait in a delay queue at any time), restarts the broker while they wait,
/// and collects the job.
pub fn delayed_items_survive_a_broker_restart(items: usize) -> RestartReport {
    let started = Instant::now();
    let broker = PrivateBroker::start("restart");
    let mock = Mock::start(&["--error-503", "0.5", "--seed", "9"]);
    // One call per pass, so every 503 sends the item to a delay queue at once.
    let extra = format!(
        "[amqp]\nurl = \"{}\"\n\
         [retry]\nmax_attempts = 1\nmax_elapsed_s = 1\ndelay_tiers_s = [1, 2]\nmax_delays = 60\ndelay_budget_s = 900\n",
        broker.url()
    );
    let fleet = Fleet::new("restart", &mock.url, &extra);
    let mut report = RestartReport { items, ..Default::default() };
    let _workers: Vec<Proc> = (0..2).map(|i| fleet.worker(&format!("w{i}"), &[])).collect();
    let input = fleet.dir.join("in.jsonl");
    write_requests(&input, items);
    let (job, _) = fleet.submit(&input);
    let topology = fleet.topology();
    let delayed =
        || TEST_DELAY_TIERS_S.iter().map(|s| fleet.queue_len(&topology.job_delay_queue(*s)).unwrap_or(0)).sum::<u32>();
    let want = (items / 10).max(1) as u32;
    eventually(Duration::from_secs(60), "items waiting in the delay queues", || {
        report.delayed_at_restart = delayed();
        report.delayed_at_restart >= want
    });
    // Down longer than every delay tier: each waiting item expires while the node is down
    // or recovering, which is when a classic queue dropped them.
    broker.bounce(Duration::from_secs(3));

    let output = fleet.dir.join("out.jsonl");
    let out = fleet.wait(&job, &output, 300);
    assert!(out.status.success(), "producer wait failed: {}", String::from_utf8_lossy(&out.stderr));
    let lines = read_output(&output);
    report.lines = lines.len();
    let mut seen = std::collections::HashSet::new();
    for l in &lines {
        if !seen.insert(l["custom_id"].as_str().unwrap_or_default().to_string()) {
            report.duplicated += 1;
        }
        if l["response"]["status_code"] == 200 {
            report.output_counts.0 += 1;
        } else {
            report.output_counts.1 += 1;
        }
    }
    report.lost = (0..items).filter(|i| !seen.contains(&format!("req-{i}"))).count();
    let status = fleet.final_status(&job);
    report.job_status = status["status"].as_str().unwrap_or_default().to_string();
    report.tracker_counts = (status["succeeded"].as_u64().unwrap_or(0), status["failed"].as_u64().unwrap_or(0));
    report.elapsed_s = started.elapsed().as_secs_f64();
    drop(_workers);
    drop(broker);
    report
}
