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
//!
//! The soak (`make cluster-soak`, [`SoakFaults`]) replaces those with what a
//! cluster's operators live through: a rolling restart of every node, one after another,
//! each waiting until no quorum queue would lose its quorum without it and then until its
//! members caught up; then the node with the most clients paused (SIGSTOP, SIGCONT 30 s
//! later: a silent node, not a partition: its peers see it silent too). It also measures
//! what the run cost: broker CPU and disk, the tracker's checkpoint, each process's peak RSS.

use std::collections::HashMap;
use std::io::{BufRead, Read, Seek};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::*;

/// What to run and which faults to inject.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Requests in the job.
    pub items: usize,
    /// Workers running at once.
    pub workers: usize,
    /// Each worker's `worker.max_in_flight`.
    pub max_in_flight: u16,
    /// How often a random worker is SIGKILLed (and started again under a new id).
    pub kill_every: Duration,
    /// SIGKILL the worker holding the tracker role once, past 20 % of the job.
    pub kill_tracker: bool,
    /// Restart RabbitMQ (`stop_app`, `start_app`) once, past 40 % of the job.
    pub restart_broker: bool,
    /// Stop the run's private Pushgateway for about 10 s, past 10 % of the job.
    pub stop_pushgateway: bool,
    /// Mock knobs (latency, transient errors).
    pub mock_args: Vec<String>,
    /// Node faults on a private cluster (the fleet's `amqp.urls` come from
    /// `FLEET__AMQP__URLS`, see [`crate::amqp_urls`]).
    pub cluster: Option<ClusterFaults>,
}

/// Node faults of a cluster run, done by the [`crate::cluster::Cluster`] that started the
/// nodes (and stops them once the last holder of it is gone).
#[derive(Debug, Clone)]
pub struct ClusterFaults {
    /// The private cluster, up.
    pub cluster: Arc<crate::cluster::Cluster>,
    /// How long a stopped node stays down before it is started again.
    pub down_for: Duration,
    /// The soak's faults instead of the two leader losses: `Some` for `make cluster-soak`.
    pub soak: Option<SoakFaults>,
}

/// The soak's node faults.
#[derive(Debug, Clone)]
pub struct SoakFaults {
    /// Progress (output lines / requests) at which the rolling restart begins.
    pub roll_at: f64,
    /// Progress after which, once the rolling restart is over, a node is paused.
    pub pause_at: f64,
    /// How long the paused node stays silent (`None`: no pause).
    pub pause_for: Option<Duration>,
}

impl ClusterFaults {
    /// The node leading a quorum queue (`fleet-c2@localhost`), if the queue exists.
    fn leader(&self, queue: &str) -> Option<String> {
        self.cluster.leader(queue).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Bytes each live node's VM wrote to disk and its CPU milliseconds since it started,
    /// by `(node, pid)`.
    fn disk(&self) -> HashMap<(String, u32), [u64; 2]> {
        self.cluster.disk()
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
            c.cluster.start_node(&node).unwrap_or_else(|e| panic!("{e}"));
            disk.sample(c, false);
            report.node_faults.push(format!("{what}, back after {:.0} s", since.elapsed().as_secs_f64()));
            self.done += 1;
            return;
        }
        let (at, queue, role, kill, verb) = match self.done {
            0 => (0.2, topology.items_queue(MOCK), "items queue leader", false, "stopped"),
            1 => (0.5, topology.results_queue(job), "results queue leader", true, "killed (SIGKILL)"),
            _ => return,
        };
        if progress < at || progress >= 1.0 {
            return;
        }
        match c.leader(&queue) {
            Some(node) => {
                disk.sample(c, false);
                let since = Instant::now();
                let fault = if kill { c.cluster.kill_node(&node) } else { c.cluster.stop_node(&node) };
                fault.unwrap_or_else(|e| panic!("{e}"));
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

/// The soak's node faults, run one after another on a thread of their own while the main
/// loop goes on killing workers and sampling: each appends a line with its times (seconds
/// since the run started) and the job's progress when it began.
struct SoakRunner {
    /// Progress in thousandths, updated by the main loop.
    progress: Arc<std::sync::atomic::AtomicU64>,
    log: Arc<Mutex<Vec<String>>>,
    /// Faults that could not be done, or began after the job had ended.
    failed: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SoakRunner {
    fn start(c: &ClusterFaults, soak: &SoakFaults, queues: Vec<String>, started: Instant) -> SoakRunner {
        let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let log = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let (c, soak) = (c.clone(), soak.clone());
        let (p, l, f) = (progress.clone(), log.clone(), failed.clone());
        let thread = std::thread::spawn(move || {
            let at = |p: &std::sync::atomic::AtomicU64| p.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1000.0;
            let wait_for = |goal: f64| {
                while at(&p) < goal {
                    std::thread::sleep(Duration::from_millis(200));
                }
            };
            let t = || started.elapsed().as_secs_f64();
            let began = |what: &str| {
                let progress = at(&p);
                if progress >= 1.0 {
                    f.lock().unwrap().push(format!("{what} began after the job had ended"));
                }
                format!("{what} at {:.0} % (t={:.0} s)", progress * 100.0, t())
            };
            wait_for(soak.roll_at);
            for node in ["fleet-c1", "fleet-c2", "fleet-c3"] {
                let what = began(&format!("rolling restart of {node}@localhost"));
                match c.cluster.roll_node(node, &queues) {
                    Ok(times) => l.lock().unwrap().push(format!("{what}: {times} (end t={:.0} s)", t())),
                    Err(e) => f.lock().unwrap().push(format!("{what}: {e}")),
                }
            }
            if let Some(pause) = soak.pause_for {
                wait_for(soak.pause_at);
                match c.cluster.busiest() {
                    Ok(node) => {
                        let what = began(&format!("{node} paused (SIGSTOP) for {} s", pause.as_secs()));
                        match c.cluster.pause_node(&node, pause) {
                            Ok(_) => l.lock().unwrap().push(format!("{what}, resumed (SIGCONT) at t={:.0} s", t())),
                            Err(e) => f.lock().unwrap().push(format!("{what}: {e}")),
                        }
                    }
                    Err(e) => f.lock().unwrap().push(format!("no node to pause: {e}")),
                }
            }
        });
        SoakRunner { progress, log, failed, thread: Some(thread) }
    }

    fn set_progress(&self, progress: f64) {
        self.progress.store((progress * 1000.0) as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Lets the faults still planned run (the job ended: they are then reported as late),
    /// and moves their log into the report.
    fn finish(mut self, report: &mut Report) {
        self.set_progress(1.0);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                report.wrong_counts.push("the soak's fault thread panicked".into());
            }
        }
        report.node_faults.extend(self.log.lock().unwrap().drain(..));
        report.wrong_counts.extend(self.failed.lock().unwrap().drain(..));
    }
}

/// Peak resident memory (`VmHWM`) of the run's processes, by name, sampled while they run
/// (a process killed with SIGKILL keeps its last sample).
#[derive(Default)]
struct PeakRss {
    kib: Vec<(String, u64)>,
}

impl PeakRss {
    fn sample(&mut self, name: &str, pid: u32) {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return };
        let Some(kib) = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        else {
            return;
        };
        match self.kib.iter_mut().find(|(n, _)| n == name) {
            Some((_, k)) => *k = (*k).max(kib),
            None => self.kib.push((name.to_string(), kib)),
        }
    }
}

/// Counts the output file's lines as it grows, reading only what is new.
#[derive(Default)]
struct OutputCounter {
    offset: u64,
    lines: usize,
}

impl OutputCounter {
    fn count(&mut self, path: &Path) -> usize {
        if let Ok(mut f) = std::fs::File::open(path) {
            // `wait` may rewrite the file from the start (a fresh run): count again then.
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            if len < self.offset {
                *self = OutputCounter::default();
            }
            if f.seek(std::io::SeekFrom::Start(self.offset)).is_ok() {
                let mut buf = Vec::new();
                if f.take(64 << 20).read_to_end(&mut buf).is_ok() {
                    self.offset += buf.len() as u64;
                    self.lines += buf.iter().filter(|c| **c == b'\n').count();
                }
            }
        }
        self.lines
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
    /// Requests in the job.
    pub requests: usize,
    /// Random workers SIGKILLed.
    pub worker_kills: usize,
    /// Workers SIGKILLed while holding the tracker role.
    pub tracker_kills: usize,
    /// RabbitMQ restarts (`stop_app`, `start_app`).
    pub broker_restarts: usize,
    /// Seconds the Pushgateway was down.
    pub pushgateway_outage_s: u64,
    /// Node faults of a cluster run, e.g. `stopped fleet-c2@localhost (items queue leader)`.
    pub node_faults: Vec<String>,
    /// Bytes the cluster's nodes wrote to disk per request (cluster runs only).
    pub disk_bytes_per_request: Option<u64>,
    /// CPU the cluster's nodes used per request, in µs (cluster runs only).
    pub broker_cpu_us_per_request: Option<u64>,
    /// Transient failures the mock answered (500, 503, 429, 529).
    pub mock_transient_errors: u64,
    /// Requests missing from the output.
    pub lost: usize,
    /// Extra copies of requests in the output.
    pub duplicated: usize,
    /// Lines whose status is not what the mock's answers allow (all transient: succeeded).
    pub wrong_status: usize,
    /// Mismatches between the tracker's final counts / the metrics and the output.
    pub wrong_counts: Vec<String>,
    /// Seconds the whole run took, set-up and checks included.
    pub wall_s: f64,
    /// Seconds `producer submit` took (the soak).
    pub submit_s: Option<f64>,
    /// Seconds from the start of `submit` to the end of `wait`.
    pub job_s: f64,
    /// CPU seconds the cluster's nodes used over the run (cluster runs only).
    pub broker_cpu_s: Option<f64>,
    /// Bytes the cluster's nodes wrote to disk over the run (cluster runs only).
    pub broker_disk_bytes: Option<u64>,
    /// The tracker's checkpoint when the job had ended: (bytes of one copy, checkpoints
    /// written in the namespace's life).
    pub checkpoint: Option<(usize, u64)>,
    /// Peak RSS in KiB by process (each worker slot: the largest of its processes).
    pub peak_rss_kib: Vec<(String, u64)>,
}

impl Report {
    /// Nothing lost or duplicated, every line succeeded, and every count agreed.
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
        let mut more = Vec::new();
        if self.job_s > 0.0 {
            more.push(("job: submit start to output complete (s)", format!("{:.1}", self.job_s)));
            more.push(("items/s (job)", format!("{:.0}", self.requests as f64 / self.job_s)));
        }
        if let Some(t) = self.submit_s {
            more.push(("producer submit (s)", format!("{t:.1}")));
        }
        if let (Some(cpu), Some(disk)) = (self.broker_cpu_s, self.broker_disk_bytes) {
            let n = self.requests.max(1) as f64;
            more.push(("broker CPU, 3 nodes (s)", format!("{cpu:.0}")));
            more.push(("broker CPU per request (µs)", format!("{:.0}", cpu * 1e6 / n)));
            more.push(("broker disk written, 3 nodes (MB)", format!("{:.0}", disk as f64 / 1e6)));
            more.push(("broker disk per request (bytes)", format!("{:.0}", disk as f64 / n)));
        }
        if let Some((bytes, seq)) = self.checkpoint {
            // Its size at the end: an ended job's bitmaps are no longer in it.
            more.push(("tracker checkpoint once the job ended (bytes, one of 2 copies)", bytes.to_string()));
            more.push(("tracker checkpoints written (namespace's life)", seq.to_string()));
            if self.job_s > 0.0 {
                more.push(("checkpoints/s over the job", format!("{:.2}", seq as f64 / self.job_s)));
            }
        }
        for (k, v) in &more {
            s.push_str(&format!("| {k} | {v} |\n"));
        }
        for (name, kib) in &self.peak_rss_kib {
            s.push_str(&format!("| peak RSS {name} (MiB) | {:.1} |\n", *kib as f64 / 1024.0));
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
    let mut rss = PeakRss::default();
    let job_started = Instant::now();
    let job = submit_sampled(&fleet, &input, &mut rss);
    if plan.cluster.as_ref().is_some_and(|c| c.soak.is_some()) {
        report.submit_s = Some(job_started.elapsed().as_secs_f64());
    }
    let output = fleet.dir.join("out.jsonl");
    // A million lines take longer than the small runs' 15 minutes.
    let timeout = (plan.items / 100).max(900).to_string();
    let mut waiter = fleet.producer_spawn(&["wait", &job, "--output", output.to_str().unwrap(), "--timeout", &timeout]);
    let mut counter = OutputCounter::default();
    let mut soak = plan.cluster.as_ref().and_then(|c| {
        let queues = vec![fleet.topology().items_queue(MOCK), fleet.topology().ledger_queue()];
        c.soak.as_ref().map(|s| SoakRunner::start(c, s, queues, started))
    });
    let mut last_disk_sample = Instant::now();

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
        let progress = counter.count(&output) as f64 / plan.items as f64;
        for (slot, (_, w)) in workers.iter().enumerate() {
            rss.sample(&format!("worker slot {slot} (all its processes)"), w.pid());
        }
        rss.sample("producer wait", waiter.pid());
        rss.sample("mock-provider", mock.proc.pid());
        if let Some(r) = &soak {
            r.set_progress(progress);
        }
        // A node stopped by the soak's thread loses its counters: sample often.
        if let Some(c) = plan.cluster.as_ref().filter(|_| last_disk_sample.elapsed() > Duration::from_secs(1)) {
            disk.sample(c, false);
            last_disk_sample = Instant::now();
        }
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
        if let Some(c) = plan.cluster.as_ref().filter(|c| c.soak.is_none()) {
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
    report.job_s = job_started.elapsed().as_secs_f64();
    if let Some(c) = &plan.cluster {
        disk.sample(c, false);
        let [bytes, cpu_ms] = disk.total();
        report.disk_bytes_per_request = Some(bytes / plan.items.max(1) as u64);
        report.broker_cpu_us_per_request = Some(cpu_ms * 1000 / plan.items.max(1) as u64);
        report.broker_disk_bytes = Some(bytes);
        report.broker_cpu_s = Some(cpu_ms as f64 / 1000.0);
        if let Some(r) = soak.take() {
            // Faults not yet done run now (and are reported as late) so that the checks
            // below see every node up again.
            r.finish(&mut report);
            let planned = 3 + usize::from(c.soak.as_ref().is_some_and(|s| s.pause_for.is_some()));
            if report.node_faults.len() < planned {
                report
                    .wrong_counts
                    .push(format!("{} of {planned} planned node faults happened", report.node_faults.len()));
            }
        } else {
            // A node still down when the job ended comes back before the checks.
            while node_faults.down.is_some() {
                std::thread::sleep(Duration::from_millis(200));
                node_faults.step(c, 1.0, &fleet.topology(), &job, &mut disk, &mut report);
            }
            if report.node_faults.len() < 2 {
                report.wrong_counts.push(format!("{} of 2 planned node faults happened", report.node_faults.len()));
            }
        }
    }
    if !wait_ok {
        report.wrong_counts.push("producer wait did not finish successfully".into());
    }

    // The output file: every custom_id exactly once, each succeeded (only transient faults).
    // Read line by line: a million lines are most of a GB.
    let mut seen = vec![0u32; plan.items];
    let file = std::fs::File::open(&output).map(std::io::BufReader::new);
    for line in file.into_iter().flat_map(|f| f.lines()).map_while(Result::ok) {
        let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        let index =
            v["custom_id"].as_str().and_then(|id| id.strip_prefix("req-")).and_then(|i| i.parse::<usize>().ok());
        match index.filter(|i| *i < plan.items) {
            Some(i) => seen[i] += 1,
            None => report.wrong_status += 1,
        }
        if !v["error"].is_null() || v["response"]["status_code"] != 200 {
            report.wrong_status += 1;
        }
    }
    report.duplicated = seen.iter().filter(|n| **n > 1).map(|n| *n as usize - 1).sum();
    report.lost = seen.iter().filter(|n| **n == 0).count();
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
    let mut completed = None;
    let mut items_succeeded = None;
    for _ in 0..100 {
        let text = pushgateway_metrics_at(&pg_url);
        completed = text
            .lines()
            .find(|l| l.starts_with("batch_jobs_total{") && l.contains(&fleet.ns) && l.contains("status=\"completed\""))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok());
        // One line per provider, all in the tracker's one group.
        items_succeeded = text
            .lines()
            .filter(|l| {
                l.starts_with("batch_items_total{") && l.contains(&fleet.ns) && l.contains("status=\"succeeded\"")
            })
            .map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum::<Option<f64>>();
        if completed == Some(1.0) && items_succeeded == Some(plan.items as f64) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if completed != Some(1.0) {
        report.wrong_counts.push(format!("batch_jobs_total{{status=\"completed\"}} is {completed:?}, want 1"));
    }
    if items_succeeded != Some(plan.items as f64) {
        report
            .wrong_counts
            .push(format!("batch_items_total{{status=\"succeeded\"}} is {items_succeeded:?}, want {}", plan.items));
    }
    drop(workers);
    drop(pg);
    if plan.cluster.as_ref().is_some_and(|c| c.soak.is_some()) {
        report.checkpoint = last_checkpoint(&fleet);
    }
    report.peak_rss_kib = rss.kib;
    report.wall_s = started.elapsed().as_secs_f64();
    fleet.cleanup(&[&job]);
    if plan.cluster.as_ref().is_some_and(|c| c.soak.is_some()) && report.ok() {
        // A million lines in and out are over 600 MB: kept only when something failed.
        let _ = std::fs::remove_file(&input);
        let _ = std::fs::remove_file(&output);
    }
    report
}

/// Runs `producer submit` to `mock`, sampling its peak RSS; returns the job id.
fn submit_sampled(fleet: &Fleet, input: &Path, rss: &mut PeakRss) -> String {
    harness::submit_watched(&fleet.config, input, MOCK, &[], |p| rss.sample("producer submit", p.pid()))
        .unwrap_or_else(|e| panic!("{e:#}"))
        .job_id
}

/// The tracker's newest checkpoint, read once every worker is gone: (its bytes, its
/// `checkpoint_seq`, i.e. how many the namespace's trackers wrote).
fn last_checkpoint(fleet: &Fleet) -> Option<(usize, u64)> {
    let queue = fleet.topology().tracker_state_queue();
    // The cluster's nodes (`amqp.urls`), not the fleet's `amqp.url`.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
    let data = rt.block_on(async move {
        let conn = fleet::amqp::connect_any(&amqp_urls(), "e2e").await.ok()?;
        let ch = fleet::amqp::open_channel(&conn).await.ok()?;
        let msg = ch.basic_get(queue.as_str().into(), lapin::options::BasicGetOptions::default()).await.ok()??;
        Some(msg.delivery.data.clone())
    })?;
    let seq = serde_json::from_slice::<Value>(&data).ok()?["checkpoint_seq"].as_u64()?;
    Some((data.len(), seq))
}
