//! The end-to-end tests' harness: each test runs the workspace's real binaries
//! (`mock-provider`, `worker`, `producer`) as processes against the real RabbitMQ, on a
//! namespace of its own. Processes, the mock, config files and the clean-up come from the
//! `harness` crate (shared with the benchmark); this crate adds a test's [`Fleet`] and the
//! checks the tests share.

#![deny(missing_docs)]
#![deny(unreachable_pub)]

pub mod chaos;
pub mod cluster;
pub mod proxy;
pub mod restart;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use fleet::topology::Topology;
pub use harness::{amqp_url, amqp_urls, bin, free_port, prometheus_url, pushgateway_url, Mock, Proc};
use harness::{FleetConfig, Names};
pub use serde_json::Value;

/// `GET` of a JSON document (a test fails if it is not one).
pub fn get_json(url: &str) -> Value {
    harness::http::get_json(url, &[]).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Delay tiers of the tests' fleets: short, so long-retry paths finish quickly.
pub const TEST_DELAY_TIERS_S: &[u64] = &[1, 2];

/// The provider every test fleet configures (the mock).
pub const MOCK: &str = "mock";

/// Settings of every test fleet besides its namespace, services and mock: fast pushes and
/// retries, so failure paths finish quickly.
const TEST_SETTINGS: &str = "\
[pushgateway]
push_interval_s = 1
[retry]
max_attempts = 8
initial_backoff_ms = 5
max_backoff_ms = 200
max_elapsed_s = 30
[providers.mock]
timeout_s = 10
max_in_flight = 64
";

/// A scratch directory for one test.
pub fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fleet-e2e-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// A fresh namespace name, unique per test run.
pub fn namespace(test: &str) -> String {
    harness::namespace("t", test)
}

/// One test's fleet: a namespace, a config file, and the processes it started.
pub struct Fleet {
    /// The namespace (`t.<test>.<random>`), which every queue and exchange name starts with.
    pub ns: String,
    /// The test's scratch directory: config, inputs, outputs, the workers' logs.
    pub dir: PathBuf,
    /// The config file every worker and producer of the fleet reads.
    pub config: PathBuf,
    /// The `mock` provider's base URL.
    pub mock_url: String,
    /// The broker this fleet uses (`amqp.url` of its config: the shared one unless the
    /// test's extra config names another, e.g. a [`restart::PrivateBroker`]).
    pub amqp_url: String,
}

impl Fleet {
    /// A fleet on a fresh namespace whose `mock` provider is `mock_url`. `extra_toml` is
    /// merged into the config (e.g. retry settings; its keys win).
    pub fn new(test: &str, mock_url: &str, extra_toml: &str) -> Fleet {
        let dir = scratch(test);
        let ns = namespace(test);
        let config = dir.join("fleet.toml");
        let tiers: Vec<i64> = TEST_DELAY_TIERS_S.iter().map(|s| *s as i64).collect();
        let mut cfg = FleetConfig::new(&ns, &amqp_url(), &pushgateway_url())
            .openai_provider(MOCK, mock_url)
            .set("retry", "delay_tiers_s", tiers)
            .merge(TEST_SETTINGS)
            .expect("test settings are TOML");
        // A list only when one is given (`make cluster`): `urls` replaces `url`, and a test
        // that points `url` at a private broker must get that broker.
        if let Some(urls) = harness::amqp_url_list() {
            cfg = cfg.amqp_urls(&urls);
        }
        let cfg = cfg.merge(extra_toml).expect("extra config is TOML");
        let amqp_url = cfg.amqp_url().expect("amqp.url").to_string();
        cfg.write(&config).expect("write config");
        Fleet { ns, dir, config, mock_url: mock_url.to_string(), amqp_url }
    }

    /// The names of the namespace's queues and exchanges (tests never spell them out).
    pub fn topology(&self) -> Topology {
        Topology::names(&self.ns)
    }

    /// Starts a worker process with `FLEET__WORKER__ID=<id>` and extra env.
    pub fn worker(&self, id: &str, env: &[(&str, &str)]) -> Proc {
        let mut cmd = harness::worker_command(&self.config);
        cmd.env("FLEET__WORKER__ID", id).envs(env.iter().copied());
        Proc::spawn_logged(&mut cmd, id, &self.dir.join(format!("{id}.log"))).expect("start worker")
    }

    /// Starts a worker that declares the namespace's topology, waits for its items queue,
    /// and stops it cleanly: items submitted next stay ready on the queue. Returns the
    /// items queue's name.
    pub fn declare_topology_then_stop(&self) -> String {
        let mut w = self.worker("declarer", &[]);
        let items_queue = self.topology().items_queue(MOCK);
        self.wait_until_consuming("declarer");
        w.signal("TERM");
        assert_eq!(w.wait_exit(Duration::from_secs(30)), Some(0), "the declaring worker exits 0");
        items_queue
    }

    /// Waits until worker `id` has declared its whole topology (queues and their bindings:
    /// a queue can exist a moment before it is bound, and a publish then is unroutable) and
    /// consumes.
    pub fn wait_until_consuming(&self, id: &str) {
        eventually(Duration::from_secs(30), "the worker declared its topology and consumes", || {
            self.worker_log(id).contains("consuming")
        });
    }

    /// The worker's log so far.
    pub fn worker_log(&self, id: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{id}.log"))).unwrap_or_default()
    }

    fn producer_command(&self, args: &[&str]) -> Command {
        let mut cmd = harness::producer_command(&self.config);
        cmd.args(args);
        cmd
    }

    /// Runs `producer --config <cfg> --quiet ARGS` to completion.
    pub fn producer(&self, args: &[&str]) -> Output {
        self.producer_command(args).output().expect("run producer")
    }

    /// Starts a producer in the background.
    pub fn producer_spawn(&self, args: &[&str]) -> Proc {
        let mut cmd = self.producer_command(args);
        Proc::spawn(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()), "producer").expect("start producer")
    }

    /// Submits `file` to `mock` ([`harness::submit`]); returns the job id and its item count.
    pub fn submit(&self, file: &Path) -> (String, u64) {
        let s = harness::submit(&self.config, file, MOCK, &[]).unwrap_or_else(|e| panic!("{e:#}"));
        (s.job_id, s.total)
    }

    /// Waits for a job's results into `output`, failing after `timeout_s`.
    pub fn wait(&self, job: &str, output: &Path, timeout_s: u64) -> Output {
        self.producer(&["wait", job, "--output", output.to_str().unwrap(), "--timeout", &timeout_s.to_string()])
    }

    /// Runs an async block against the broker with a fresh connection.
    pub fn amqp<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce(lapin::Connection, Topology) -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let topology = self.topology();
        rt.block_on(async {
            // The fleet's own broker URL (its vhost) first; a test whose file names a dead
            // broker on purpose falls back to the test broker.
            let conn = match fleet::amqp::connect(&self.amqp_url, "e2e").await {
                Ok(conn) => conn,
                Err(_) => fleet::amqp::connect_any(&amqp_urls(), "e2e").await.expect("connect to RabbitMQ"),
            };
            f(conn, topology).await
        })
    }

    /// Messages ready in a queue (`None` if it does not exist).
    pub fn queue_len(&self, queue: &str) -> Option<u32> {
        let q = queue.to_string();
        self.amqp(|conn, t| async move { t.queue_len(&conn, &q).await.expect("queue_len") })
    }

    /// The fleet's own broker first, then the tests' brokers.
    fn broker_urls(&self) -> Vec<String> {
        let mut urls = vec![self.amqp_url.clone()];
        urls.extend(amqp_urls());
        urls
    }

    /// Deletes the namespace's queues now, those of `jobs` included (called at the end of a
    /// passing test; dropping the fleet deletes whatever is left).
    pub fn cleanup(&self, jobs: &[&str]) {
        let t = self.topology();
        let (mut queues, exchanges) = t.fixed_names(&[MOCK], TEST_DELAY_TIERS_S);
        for j in jobs {
            queues.extend([t.results_queue(j), t.batch_items_stream(j), t.job_items_queue(MOCK, j)]);
        }
        let _ =
            harness::delete_namespace(&self.ns, &self.broker_urls(), &pushgateway_url(), Names { queues, exchanges });
    }
}

impl Drop for Fleet {
    /// Deletes what the namespace left on the machine's services, passing or failing: its
    /// Pushgateway groups and every queue and exchange of the namespace (see
    /// [`harness::delete_namespace`]; `FLEET_TEST_KEEP_QUEUES=1` keeps the queues of a
    /// failed test for a look). Fields drop after this, and a test's workers, declared
    /// after its fleet, are already gone, so none pushes again. Never panics.
    fn drop(&mut self) {
        let _ = harness::delete_namespace(&self.ns, &self.broker_urls(), &pushgateway_url(), Names::default());
    }
}

impl Fleet {
    /// Writes `n` requests (`req-0` ... ) and submits them to `mock`; returns the job id.
    pub fn submit_requests(&self, n: usize) -> String {
        let input = self.dir.join(format!("in-{n}-{}.jsonl", uuid::Uuid::new_v4().simple()));
        write_requests(&input, n);
        self.submit(&input).0
    }

    /// Collects `job` into `<dir>/<job>.jsonl` (failing the test if `producer wait` fails
    /// within 180 s) and returns the output lines.
    pub fn collect(&self, job: &str) -> Vec<Value> {
        let output = self.dir.join(format!("{job}.jsonl"));
        let out = self.wait(job, &output, 180);
        assert!(out.status.success(), "producer wait failed: {}", String::from_utf8_lossy(&out.stderr));
        read_output(&output)
    }

    /// Collects `job` like [`Fleet::collect`], for a job some of whose items failed for a
    /// reason of the fleet's (dead-lettered, poison, keys): `producer wait` writes every
    /// line and exits 3, naming `code`.
    pub fn collect_fleet_side(&self, job: &str, code: &str) -> Vec<Value> {
        let output = self.dir.join(format!("{job}.jsonl"));
        let out = self.wait(job, &output, 180);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "producer wait exits 3: {stderr}");
        assert!(stderr.contains("for a reason of the fleet's") && stderr.contains(code), "{stderr}");
        read_output(&output)
    }

    /// `producer status JOB --json` once the tracker has seen the job end.
    pub fn final_status(&self, job: &str) -> Value {
        let mut last = Value::Null;
        eventually(Duration::from_secs(30), "the tracker reports the job ended", || {
            last = self.try_status(job).unwrap_or(Value::Null);
            !last.is_null() && !matches!(last["status"].as_str(), Some("in_progress" | "submitting"))
        });
        last
    }

    /// Waits until the namespace's tracker answers (`producer jobs`): it holds the role
    /// and reads the ledger. A worker takes the role a moment after it starts.
    pub fn wait_for_tracker(&self) {
        eventually(Duration::from_secs(30), "a worker holds the tracker role and answers", || {
            self.producer(&["jobs", "--json", "--timeout", "2"]).status.success()
        });
    }

    /// One `status --json` query: `None` when it fails, as it does while the tracker has not
    /// yet read the job's submission off the ledger (right after `submit`) or none answers.
    pub fn try_status(&self, job: &str) -> Option<Value> {
        let out = self.producer(&["status", job, "--json"]);
        out.status.success().then(|| serde_json::from_slice(&out.stdout).expect("status --json prints JSON"))
    }
}

/// Writes `n` chat-completion requests (custom ids `req-<i>`) to `path`.
pub fn write_requests(path: &Path, n: usize) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create input"));
    for i in 0..n {
        writeln!(
            f,
            r#"{{"custom_id":"req-{i}","method":"POST","url":"/v1/chat/completions","body":{{"model":"mock-model","messages":[{{"role":"user","content":"Say something about the number {i}."}}]}}}}"#
        )
        .expect("write input");
    }
}

/// The output file's lines, parsed.
pub fn read_output(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines().map(|l| serde_json::from_str(l).expect("output line is JSON")).collect()
}

/// Checks that every `req-<i>` for i < n appears exactly once; returns counts by
/// `response.status_code` (0 when there is no response).
pub fn assert_exactly_once(lines: &[Value], n: usize) -> HashMap<u64, u64> {
    assert_eq!(lines.len(), n, "output has {} lines, want {n}", lines.len());
    let mut ids = HashSet::new();
    let mut by_status = HashMap::new();
    for l in lines {
        let id = l["custom_id"].as_str().expect("custom_id").to_string();
        assert!(ids.insert(id.clone()), "custom_id {id} appears twice");
        let status = l["response"]["status_code"].as_u64().unwrap_or(0);
        *by_status.entry(status).or_default() += 1;
    }
    for i in 0..n {
        assert!(ids.contains(&format!("req-{i}")), "req-{i} is missing");
    }
    by_status
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// Runs an instant PromQL query; returns `(labels, value)` per series. Panics on a query
/// error (a bad expression is a test failure, not an empty result).
pub fn prom_query(expr: &str) -> Vec<(serde_json::Map<String, Value>, f64)> {
    let url = format!("{}/api/v1/query", prometheus_url());
    let v = harness::http::get_json(&url, &[("query", expr)]).unwrap_or_else(|e| panic!("query {expr}: {e:#}"));
    assert_eq!(v["status"], "success", "query {expr} failed: {v}");
    v["data"]["result"]
        .as_array()
        .expect("vector result")
        .iter()
        .map(|r| {
            let value = r["value"][1].as_str().and_then(|s| s.parse::<f64>().ok()).unwrap_or(f64::NAN);
            (r["metric"].as_object().cloned().unwrap_or_default(), value)
        })
        .collect()
}

/// The single value of a query that sums to one series (`None` when empty).
pub fn prom_value(expr: &str) -> Option<f64> {
    prom_query(expr).first().map(|(_, v)| *v)
}

/// Every panel query of the dashboard, `(panel title, expression)`, with the `namespace`
/// variable set to `namespace` (a regex) and the other variables to All.
pub fn dashboard_queries_for(namespace: &str) -> Vec<(String, String)> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../observability/grafana/dashboards/json/batch-observability.json");
    let d: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard file")).expect("dashboard JSON");
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .expect("expr")
                .replace("$namespace", namespace)
                .replace("$provider", ".*")
                .replace("$operation", ".*")
                .replace("$__rate_interval", "1m")
                .replace("$__interval", "15s");
            out.push((p["title"].as_str().unwrap_or("").to_string(), expr));
        }
    }
    out
}

/// A private Pushgateway process on a free port (for tests that stop it).
pub fn start_pushgateway(port: u16) -> Proc {
    let mut cmd = Command::new("prometheus-pushgateway");
    cmd.arg(format!("--web.listen-address=127.0.0.1:{port}")).stdout(Stdio::null()).stderr(Stdio::null());
    let proc =
        Proc::spawn(&mut cmd, "pushgateway").expect("start prometheus-pushgateway (installed by scripts/stack.sh up)");
    let url = format!("http://127.0.0.1:{port}/-/ready");
    eventually(Duration::from_secs(10), "pushgateway ready", || harness::http::get_text(&url).is_ok());
    proc
}

/// Output lines by how they failed: `error.code` when the provider gave no answer
/// (`timeout`, `cancelled`, `poison`, ...), `http_<status>` when it answered a failure
/// (`error` is then null, as in OpenAI's output), `None` for succeeded lines.
pub fn error_codes(lines: &[Value]) -> HashMap<Option<String>, usize> {
    let mut m = HashMap::new();
    for l in lines {
        let key = match (l["error"]["code"].as_str(), succeeded(l)) {
            (Some(code), _) => Some(code.to_string()),
            (None, true) => None,
            (None, false) => Some(format!("http_{}", l["response"]["status_code"])),
        };
        *m.entry(key).or_default() += 1;
    }
    m
}

/// Whether an output line is a success, read the way `producer wait` reads it back.
pub fn succeeded(line: &Value) -> bool {
    fleet::wire::output_line_status(line) == fleet::wire::ItemStatus::Succeeded
}

/// The Pushgateway's `/metrics` text (empty when it does not answer).
pub fn pushgateway_metrics() -> String {
    pushgateway_metrics_at(&pushgateway_url())
}

/// The `/metrics` text of the Pushgateway at `url`, e.g. a test's own (empty when it does
/// not answer).
pub fn pushgateway_metrics_at(url: &str) -> String {
    harness::http::get_text(&format!("{url}/metrics")).unwrap_or_default()
}
