//! The chaos scenario: a job runs through a fleet of workers while faults are injected,
//! then every claim of "nothing lost" is checked against the output file, the mock's own
//! counts, the tracker and the pushed metrics.
//!
//! Faults: SIGKILL of a random worker every `kill_every` (restarted at once under a new id),
//! SIGKILL of the worker holding the tracker role, one RabbitMQ restart (`rabbitmqctl
//! stop_app` / `start_app`: the node keeps running, every connection drops), and the
//! Pushgateway (a private one, on its own port) stopped for a while. The mock injects
//! transient errors and latency throughout.
//!
//! On a cluster (`make cluster`, [`ClusterFaults`]) the broker faults are node losses
//! instead: the node leading the items queue is stopped and restarted, later the node
//! leading the job's results queue is killed (SIGKILL) and restarted.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::*;

/// What to run and which faults to inject.
#[derive(Debug, Clone)]
pub struct Plan {
    pub items: usize,
    pub workers: usize,
    pub max_in_flight: u16,
    pub kill_every: Duration,
    pub kill_tracker: bool,
    pub restart_broker: bool,
    pub stop_pushgateway: bool,
    /// Mock knobs (latency, transient errors).
    pub mock_args: Vec<String>,
    /// Node faults on a private cluster (the fleet's `amqp.urls` come from
    /// `FLEET__AMQP__URLS`, see [`crate::amqp_urls`]).
    pub cluster: Option<ClusterFaults>,
}

/// Node faults of a cluster run, done through `scripts/cluster.sh` (which started the
/// nodes and alone knows how to stop and start them).
#[derive(Debug, Clone)]
pub struct ClusterFaults {
    pub script: PathBuf,
    /// How long a stopped node stays down before it is started again.
    pub down_for: Duration,
}

impl ClusterFaults {
    fn script(&self, args: &[&str]) -> String {
        let out = std::process::Command::new(&self.script)
            .args(args)
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("run scripts/cluster.sh");
        assert!(out.status.success(), "cluster.sh {args:?} failed");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The node leading a quorum queue (`fleet-c2@localhost`), if the queue exists.
    fn leader(&self, queue: &str) -> Option<String> {
        Some(self.script(&["leader", queue])).filter(|l| !l.is_empty())
    }

    /// Bytes each live node's VM wrote to disk and its CPU milliseconds since it started,
    /// by `(node, pid)`.
    fn disk(&self) -> HashMap<(String, u32), [u64; 2]> {
        self.script(&["disk-bytes", "--per-node"])
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                let vm = (w.next()?.to_string(), w.next()?.parse().ok()?);
                Some((vm, [w.next()?.parse().ok()?, w.next()?.parse().ok()?]))
            })
            .collect()
    }
}

/// Where a cluster run is in its node faults: first the items queue's leader is stopped
/// gracefully at 20 %, then the results queue's leader is killed (SIGKILL) at 50 %; each
/// comes back after `down_for`, while the job goes on.
#[derive(Default)]
struct NodeFaults {
    done: usize,
    /// The node down now, since when, and what happened to it.
    down: Option<(String, Instant, String)>,
}

impl NodeFaults {
    fn step(
        &mut self,
        c: &ClusterFaults,
        progress: f64,
        topology: &fleet::topology::Topology,
        job: &str,
        disk: &mut DiskMeter,
        report: &mut Report,
    ) {
        if let Some((node, since, what)) = self.down.take() {
            if since.elapsed() < c.down_for {
                self.down = Some((node, since, what));
                return;
            }
            c.script(&["start-node", &node]);
            disk.sample(c, false);
            report.node_faults.push(format!("{what}, back after {:.0} s", since.elapsed().as_secs_f64()));
            self.done += 1;
            return;
        }
        let (at, queue, role, how, verb) = match self.done {
            0 => (0.2, topology.items_queue(MOCK), "items queue leader", "stop-node", "stopped"),
            1 => (0.5, topology.results_queue(job), "results queue leader", "kill-node", "killed (SIGKILL)"),
            _ => return,
        };
        if progress < at || progress >= 1.0 {
            return;
        }
        match c.leader(&queue) {
            Some(node) => {
                disk.sample(c, false);
                let since = Instant::now();
                c.script(&[how, &node]);
                let what = format!("{verb} {node} ({role}) at {:.0} %", progress * 100.0);
                self.down = Some((node, since, what));
            }
            None => {
                report.wrong_counts.push(format!("no leader found for {queue}"));
                self.done += 1;
            }
        }
    }
}

/// Disk bytes written and CPU used by the cluster's nodes over a run whose nodes restart
/// (a restarted node's counters start again from zero under a new PID).
#[derive(Default)]
struct DiskMeter {
    /// First and latest reading (disk bytes, CPU ms) per node VM.
    seen: HashMap<(String, u32), ([u64; 2], [u64; 2])>,
}

impl DiskMeter {
    fn sample(&mut self, c: &ClusterFaults, first: bool) {
        for (vm, now) in c.disk() {
            // A VM seen for the first time after the start is a restarted node: all it
            // did (boot and recovery included) is part of the run.
            let base = if first { now } else { [0, 0] };
            self.seen.entry(vm).or_insert((base, now)).1 = now;
        }
    }
    /// (disk bytes, CPU ms) over the run, all nodes.
    fn total(&self) -> [u64; 2] {
        let mut t = [0, 0];
        for (first, last) in self.seen.values() {
            for k in 0..2 {
                t[k] += last[k].saturating_sub(first[k]);
            }
        }
        t
    }
}

/// What happened and what was checked.
#[derive(Debug, Default)]
pub struct Report {
    pub requests: usize,
    pub worker_kills: usize,
    pub tracker_kills: usize,
    pub broker_restarts: usize,
    pub pushgateway_outage_s: u64,
    /// Node faults of a cluster run, e.g. `stopped fleet-c2@localhost (items queue leader)`.
    pub node_faults: Vec<String>,
    /// Bytes the cluster's nodes wrote to disk per request (cluster runs only).
    pub disk_bytes_per_request: Option<u64>,
    /// CPU the cluster's nodes used per request, in µs (cluster runs only).
    pub broker_cpu_us_per_request: Option<u64>,
    pub mock_transient_errors: u64,
    pub lost: usize,
    pub duplicated: usize,
    /// Lines whose status is not what the mock's answers allow (all transient: succeeded).
    pub wrong_status: usize,
    /// Mismatches between the tracker's final counts / the metrics and the output.
    pub wrong_counts: Vec<String>,
    pub wall_s: f64,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.wrong_status == 0 && self.wrong_counts.is_empty()
    }

    /// The report as a table.
    pub fn table(&self) -> String {
        let rows = [
            ("requests", self.requests.to_string()),
            ("wall time (s)", format!("{:.1}", self.wall_s)),
            ("worker SIGKILLs", self.worker_kills.to_string()),
            ("tracker SIGKILLs", self.tracker_kills.to_string()),
            ("RabbitMQ restarts", self.broker_restarts.to_string()),
            ("Pushgateway down (s)", self.pushgateway_outage_s.to_string()),
            ("RabbitMQ node faults", self.node_faults.len().to_string()),
            ("mock transient errors", self.mock_transient_errors.to_string()),
            ("lost", self.lost.to_string()),
            ("duplicated in output", self.duplicated.to_string()),
            ("wrong status", self.wrong_status.to_string()),
            ("wrong counts", self.wrong_counts.len().to_string()),
        ];
        let mut s = String::from("| chaos | value |\n|---|---|\n");
        for (k, v) in rows {
            s.push_str(&format!("| {k} | {v} |\n"));
        }
        for f in &self.node_faults {
            s.push_str(&format!("node fault: {f}\n"));
        }
        if let Some(b) = self.disk_bytes_per_request {
            s.push_str(&format!("broker disk writes per request (3 nodes): {b} bytes\n"));
        }
        if let Some(us) = self.broker_cpu_us_per_request {
            s.push_str(&format!("broker CPU per request (3 nodes, faults included): {us} µs\n"));
        }
        for w in &self.wrong_counts {
            s.push_str(&format!("wrong count: {w}\n"));
        }
        s
    }
}

/// Restarts the RabbitMQ application on this node (connections drop, queues stay).
fn restart_broker() {
    for cmd in ["stop_app", "start_app"] {
        let status = std::process::Command::new("rabbitmqctl")
            .arg(cmd)
            .env("PATH", format!("{}:/usr/sbin:/sbin", std::env::var("PATH").unwrap_or_default()))
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run rabbitmqctl");
        assert!(status.success(), "rabbitmqctl {cmd} failed");
        if cmd == "stop_app" {
            std::thread::sleep(Duration::from_secs(3));
        }
    }
    eventually(Duration::from_secs(60), "RabbitMQ back", || std::net::TcpStream::connect("127.0.0.1:5672").is_ok());
}

/// Runs the plan; panics only on harness failures, never on a failed check.
pub fn run(plan: &Plan) -> Report {
    let started = Instant::now();
    let mut report = Report { requests: plan.items, ..Default::default() };
    let pg_port = free_port();
    let mut pg = Some(start_pushgateway(pg_port));
    let pg_url = format!("http://127.0.0.1:{pg_port}");
    let mock_args: Vec<&str> = plan.mock_args.iter().map(String::as_str).collect();
    let mock = Mock::start(&mock_args);
    let extra = format!("[worker]\nmax_in_flight = {}\n[amqp]\ndelivery_limit = 50\n", plan.max_in_flight);
    let fleet = Fleet::new("chaos", &mock.url, &extra);
    let input = fleet.dir.join("in.jsonl");
    write_requests(&input, plan.items);

    let env = [("FLEET__PUSHGATEWAY__URL", pg_url.as_str())];
    let mut generation = 0usize;
    let mut start_worker = |slot: usize| {
        generation += 1;
        let id = format!("chaos-w{slot}-g{generation}");
        (id.clone(), fleet.worker(&id, &env))
    };
    let mut workers: Vec<(String, Proc)> = (0..plan.workers).map(&mut start_worker).collect();
    let (job, _) = fleet.submit(&input);
    let output = fleet.dir.join("out.jsonl");
    let mut waiter = fleet.producer_spawn(&["wait", &job, "--output", output.to_str().unwrap(), "--timeout", "900"]);

    let mut rng = uuid::Uuid::new_v4().as_u128();
    let mut next_kill = Instant::now() + plan.kill_every;
    let mut tracker_killed = !plan.kill_tracker;
    let mut broker_restarted = !plan.restart_broker;
    let mut pg_stopped_at: Option<Instant> = None;
    let mut pg_done = !plan.stop_pushgateway;
    let mut node_faults = NodeFaults::default();
    let mut disk = DiskMeter::default();
    if let Some(c) = &plan.cluster {
        disk.sample(c, true);
    }
    let done = |w: &mut Proc| w.child.try_wait().ok().flatten().is_some();
    while !done(&mut waiter) {
        std::thread::sleep(Duration::from_millis(100));
        let progress = read_output_count(&output) as f64 / plan.items as f64;
        if Instant::now() >= next_kill {
            next_kill = Instant::now() + plan.kill_every;
            rng = rng.rotate_left(17) ^ 0x9e37_79b9_7f4a_7c15;
            let slot = (rng % workers.len() as u128) as usize;
            workers[slot].1.signal("KILL");
            workers[slot] = start_worker(slot);
            report.worker_kills += 1;
        }
        if !tracker_killed && progress > 0.2 {
            if let Some(slot) = workers.iter().position(|(id, _)| {
                let log = fleet.worker_log(id);
                log.contains("took the job tracker role") && !log.contains("tracker role lost")
            }) {
                workers[slot].1.signal("KILL");
                workers[slot] = start_worker(slot);
                report.tracker_kills += 1;
                tracker_killed = true;
            }
        }
        if !broker_restarted && progress > 0.4 {
            restart_broker();
            report.broker_restarts += 1;
            broker_restarted = true;
        }
        if let Some(c) = &plan.cluster {
            node_faults.step(c, progress, &fleet.topology(), &job, &mut disk, &mut report);
        }
        if !pg_done && pg_stopped_at.is_none() && progress > 0.1 {
            pg = None; // kill-on-drop
            pg_stopped_at = Some(Instant::now());
        }
        if let Some(t) = pg_stopped_at.filter(|t| !pg_done && t.elapsed() > Duration::from_secs(10)) {
            pg = Some(start_pushgateway(pg_port));
            report.pushgateway_outage_s = t.elapsed().as_secs();
            pg_done = true;
        }
    }
    if pg.is_none() {
        pg = Some(start_pushgateway(pg_port));
    }
    let wait_ok = waiter.child.wait().map(|s| s.success()).unwrap_or(false);
    if let Some(c) = &plan.cluster {
        disk.sample(c, false);
        let [bytes, cpu_ms] = disk.total();
        report.disk_bytes_per_request = Some(bytes / plan.items.max(1) as u64);
        report.broker_cpu_us_per_request = Some(cpu_ms * 1000 / plan.items.max(1) as u64);
        // A node still down when the job ended comes back before the checks.
        while node_faults.down.is_some() {
            std::thread::sleep(Duration::from_millis(200));
            node_faults.step(c, 1.0, &fleet.topology(), &job, &mut disk, &mut report);
        }
        if report.node_faults.len() < 2 {
            report.wrong_counts.push(format!("{} of 2 planned node faults happened", report.node_faults.len()));
        }
    }
    if !wait_ok {
        report.wrong_counts.push("producer wait did not finish successfully".into());
    }

    // The output file: every custom_id exactly once, each succeeded (only transient faults).
    let text = std::fs::read_to_string(&output).unwrap_or_default();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or(Value::Null);
        *seen.entry(v["custom_id"].as_str().unwrap_or("").to_string()).or_default() += 1;
        if !v["error"].is_null() || v["response"]["status_code"] != 200 {
            report.wrong_status += 1;
        }
    }
    report.duplicated = seen.values().filter(|n| **n > 1).map(|n| n - 1).sum();
    report.lost = (0..plan.items).filter(|i| !seen.contains_key(&format!("req-{i}"))).count();
    let stats = mock.stats();
    report.mock_transient_errors =
        ["500", "503", "429", "529"].iter().map(|s| stats["by_status"][s].as_u64().unwrap_or(0)).sum();
    let answered_200 = stats["by_status"]["200"].as_u64().unwrap_or(0) as usize;
    if answered_200 < plan.items - report.lost {
        report
            .wrong_counts
            .push(format!("mock answered 200 only {answered_200} times for {} succeeded lines", plan.items));
    }

    // The tracker's final counts.
    let status = fleet.final_status(&job);
    if status["succeeded"].as_u64() != Some(plan.items as u64) || status["status"] != "completed" {
        report.wrong_counts.push(format!("tracker status: {status}"));
    }
    // The job-level metrics, as pushed by whichever tracker is active now.
    let metrics_url = format!("{pg_url}/metrics");
    let mut completed = None;
    for _ in 0..100 {
        let text = std::process::Command::new("curl")
            .args(["-fs", &metrics_url])
            .output()
            .map(|o| o.stdout)
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&text).to_string();
        completed = text
            .lines()
            .find(|l| l.starts_with("batch_jobs_total{") && l.contains(&fleet.ns) && l.contains("status=\"completed\""))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok());
        if completed == Some(1.0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if completed != Some(1.0) {
        report.wrong_counts.push(format!("batch_jobs_total{{status=\"completed\"}} is {completed:?}, want 1"));
    }
    drop(workers);
    drop(pg);
    report.wall_s = started.elapsed().as_secs_f64();
    fleet.cleanup(&[&job]);
    report
}

fn read_output_count(path: &Path) -> usize {
    std::fs::read(path).map(|b| b.iter().filter(|c| **c == b'\n').count()).unwrap_or(0)
}
