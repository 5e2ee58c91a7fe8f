//! The end-to-end harness: starts the workspace's real binaries (`mock-provider`, `worker`,
//! `producer`) as processes against the real RabbitMQ, each test on its own namespace.
//!
//! Binaries are found next to the test executable (`target/<profile>/`), as ripgrep's tests
//! do; the harness builds them once per test process if they are missing or stale.

pub mod chaos;
pub mod proxy;
pub mod restart;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

pub use serde_json::Value;

/// Delay tiers of the tests' fleets: short, so long-retry paths finish quickly.
pub const TEST_DELAY_TIERS_S: &[u64] = &[1, 2];

/// RabbitMQ used by the tests (`FLEET__AMQP__URL` overrides).
pub fn amqp_url() -> String {
    std::env::var("FLEET__AMQP__URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Every broker address the tests' fleets use: `FLEET__AMQP__URLS` (a comma list, as the
/// fleet reads it) when set, e.g. by `make cluster`, otherwise [`amqp_url`] alone.
pub fn amqp_urls() -> Vec<String> {
    match std::env::var("FLEET__AMQP__URLS") {
        Ok(list) if !list.trim().is_empty() => list.split(',').map(|u| u.trim().to_string()).collect(),
        _ => vec![amqp_url()],
    }
}

/// Pushgateway used by the tests.
pub fn pushgateway_url() -> String {
    std::env::var("FLEET__PUSHGATEWAY__URL").unwrap_or_else(|_| "http://127.0.0.1:9091".into())
}

/// Prometheus used by the tests.
pub fn prometheus_url() -> String {
    std::env::var("PROMETHEUS_URL").unwrap_or_else(|_| "http://127.0.0.1:9090".into())
}

/// Path of a workspace binary, building the binaries once per test process.
pub fn bin(name: &str) -> PathBuf {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let profile_dir = target_dir();
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "--bins", "-p", "worker", "-p", "producer", "-p", "mock-provider"]);
        if profile_dir.ends_with("release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building the binaries failed");
    });
    target_dir().join(name)
}

fn target_dir() -> PathBuf {
    // target/<profile>/deps/<test-exe>, or target/<profile>/<bin> for the harness's binaries.
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    if dir.ends_with("deps") { dir.parent().expect("target/<profile>") } else { dir }.to_path_buf()
}

/// A scratch directory for one test.
pub fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fleet-e2e-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// A fresh namespace name, unique per test run.
pub fn namespace(test: &str) -> String {
    format!("t.{test}.{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// A process that is killed when dropped (tests never leak processes).
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    /// Sends a signal by name (`TERM`, `KILL`, `STOP`, `CONT`) with the `kill` command.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status().expect("kill");
        assert!(status.success(), "kill -{sig} {}", self.pid());
    }
    /// Waits for the process to exit, at most `timeout`; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The mock provider, started on a free port.
pub struct Mock {
    pub proc: Proc,
    pub url: String,
}

impl Mock {
    /// Starts `mock-provider --port 0` with extra knob flags.
    pub fn start(args: &[&str]) -> Mock {
        Mock::start_on(0, args)
    }

    /// Starts the mock on a given port (e.g. to replace a mock at the same address).
    pub fn start_on(port: u16, args: &[&str]) -> Mock {
        let mut child = Command::new(bin("mock-provider"))
            .args(["--port", &port.to_string()])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mock-provider");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("mock prints its address");
        let url = line.trim().rsplit(' ').next().expect("address").to_string();
        assert!(url.starts_with("http://"), "unexpected mock banner: {line:?}");
        Mock { proc: Proc { child, name: "mock-provider".into() }, url }
    }

    /// The mock's `/stats`.
    pub fn stats(&self) -> Value {
        reqwest::blocking_get_json(&format!("{}/stats", self.url))
    }

    /// Count of responses with `status` in `/stats`.
    pub fn status_count(&self, status: u16) -> u64 {
        self.stats()["by_status"][status.to_string()].as_u64().unwrap_or(0)
    }
}

/// Minimal blocking HTTP GET of JSON over a fresh runtime (tests are synchronous).
mod reqwest {
    pub fn blocking_get_json(url: &str) -> serde_json::Value {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async { ::reqwest::get(url).await.expect("GET").json().await.expect("JSON") })
    }
}
pub use self::reqwest::blocking_get_json as get_json;

/// One test's fleet: a namespace, a config file, and the processes it started.
pub struct Fleet {
    pub ns: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub mock_url: String,
    /// The broker this fleet uses (`amqp.url` of its config: the shared one unless the
    /// test's extra config names another, e.g. a [`restart::PrivateBroker`]).
    pub amqp_url: String,
}

impl Fleet {
    /// A fleet on a fresh namespace whose `mock` provider is `mock_url`. `extra_toml` is
    /// appended to the config (e.g. retry settings).
    pub fn new(test: &str, mock_url: &str, extra_toml: &str) -> Fleet {
        let dir = scratch(test);
        let ns = namespace(test);
        let config = dir.join("fleet.toml");
        let toml = format!(
            "namespace = \"{ns}\"\n\
             [amqp]\nurl = \"{amqp}\"\nurls = {urls:?}\n\
             [pushgateway]\nurl = \"{pg}\"\npush_interval_s = 1\n\
             [retry]\nmax_attempts = 8\ninitial_backoff_ms = 5\nmax_backoff_ms = 200\nmax_elapsed_s = 30\ndelay_tiers_s = [1, 2]\n\
             [providers.mock]\nkind = \"openai\"\nbase_url = \"{mock_url}\"\ntimeout_s = 10\nmax_in_flight = 64\n\
             ",
            amqp = amqp_url(),
            // A list only when one is given (`make cluster`): `urls` replaces `url`, and a
            // test that points `url` at a private broker must get that broker.
            urls = if std::env::var("FLEET__AMQP__URLS").is_ok_and(|l| !l.trim().is_empty()) {
                amqp_urls()
            } else {
                Vec::new()
            },
            pg = pushgateway_url(),
        );
        let merged = merge_toml(&toml, extra_toml);
        let table: toml::Table = merged.parse().expect("merged config is TOML");
        let amqp_url = table["amqp"]["url"].as_str().expect("amqp.url").to_string();
        std::fs::write(&config, merged).expect("write config");
        Fleet { ns, dir, config, mock_url: mock_url.to_string(), amqp_url }
    }

    /// Starts a worker process with `FLEET__WORKER__ID=<id>` and extra env.
    pub fn worker(&self, id: &str, env: &[(&str, &str)]) -> Proc {
        let log = std::fs::File::create(self.dir.join(format!("{id}.log"))).expect("log file");
        let child = Command::new(bin("worker"))
            .arg("--config")
            .arg(&self.config)
            .env("FLEET__WORKER__ID", id)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start worker");
        Proc { child, name: id.to_string() }
    }

    /// Starts a worker that declares the namespace's topology, waits for its items queue,
    /// and stops it cleanly: items submitted next stay ready on the queue. Returns the
    /// items queue's name.
    pub fn declare_topology_then_stop(&self) -> String {
        let mut w = self.worker("declarer", &[]);
        let items_queue = format!("{}.items.mock", self.ns);
        eventually(Duration::from_secs(30), "worker declared its queue", || self.queue_len(&items_queue).is_some());
        w.signal("TERM");
        assert_eq!(w.wait_exit(Duration::from_secs(30)), Some(0), "the declaring worker exits 0");
        items_queue
    }

    /// The worker's log so far.
    pub fn worker_log(&self, id: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{id}.log"))).unwrap_or_default()
    }

    /// Runs `producer --config <cfg> --quiet ARGS` to completion.
    pub fn producer(&self, args: &[&str]) -> Output {
        Command::new(bin("producer"))
            .arg("--config")
            .arg(&self.config)
            .arg("--quiet")
            .args(args)
            .output()
            .expect("run producer")
    }

    /// Starts a producer in the background.
    pub fn producer_spawn(&self, args: &[&str]) -> Proc {
        let child = Command::new(bin("producer"))
            .arg("--config")
            .arg(&self.config)
            .arg("--quiet")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start producer");
        Proc { child, name: "producer".into() }
    }

    /// Submits `file` to `mock` and returns the job id.
    pub fn submit(&self, file: &Path) -> (String, u64) {
        let out = self.producer(&["submit", file.to_str().unwrap(), "--provider", "mock", "--json"]);
        assert!(out.status.success(), "submit failed: {}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).expect("submit --json prints JSON");
        (v["job_id"].as_str().unwrap().to_string(), v["total"].as_u64().unwrap())
    }

    /// Waits for a job's results into `output`, failing after `timeout_s`.
    pub fn wait(&self, job: &str, output: &Path, timeout_s: u64) -> Output {
        self.producer(&["wait", job, "--output", output.to_str().unwrap(), "--timeout", &timeout_s.to_string()])
    }

    /// Runs an async block against the broker with a fresh connection.
    pub fn amqp<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce(lapin::Connection, fleet::topology::Topology) -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let topology = fleet::topology::Topology::new(&self.ns, 5);
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

    /// Deletes the namespace's queues (called at the end of a passing test).
    pub fn cleanup(&self, jobs: &[&str]) {
        let jobs: Vec<String> = jobs.iter().map(|s| s.to_string()).collect();
        self.amqp(|conn, t| async move {
            let ch = conn.create_channel().await.expect("channel");
            for j in jobs {
                let _ = ch.queue_delete(t.results_queue(&j).into(), Default::default()).await;
                let _ = ch.queue_delete(t.batch_items_stream(&j).into(), Default::default()).await;
                let _ = ch.queue_delete(t.job_items_queue("mock", &j).into(), Default::default()).await;
            }
            let _ = t.delete_all(&ch, &["mock"], TEST_DELAY_TIERS_S).await;
        });
    }
}

impl Drop for Fleet {
    /// Deletes what the namespace left on the machine's services, passing or failing: its
    /// Pushgateway groups (Prometheus would scrape them forever) and every queue whose name
    /// starts with the namespace (queues of any provider, job queues, chunk and delay
    /// queues: RabbitMQ 3.x counts each classic queue against its file-handle limit, and
    /// runs that left their queues behind once exhausted it). `FLEET_TEST_KEEP_QUEUES=1`
    /// keeps the queues of a failed test for a look. Fields drop after this, and a test's
    /// workers, declared after its fleet, are already gone. Never panics.
    fn drop(&mut self) {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        if let Some(pg) = fleet::push::Pushgateway::at(&pushgateway_url()) {
            let _ = rt.block_on(pg.delete_namespace(&self.ns));
        }
        if std::thread::panicking() && std::env::var_os("FLEET_TEST_KEEP_QUEUES").is_some() {
            return;
        }
        let (queues, exchanges) = (names_of("list_queues", &self.ns), names_of("list_exchanges", &self.ns));
        if queues.is_empty() && exchanges.is_empty() {
            return;
        }
        rt.block_on(async {
            let conn = match fleet::amqp::connect(&self.amqp_url, "e2e cleanup").await {
                Ok(conn) => conn,
                Err(_) => match fleet::amqp::connect_any(&amqp_urls(), "e2e cleanup").await {
                    Ok(conn) => conn,
                    Err(_) => return,
                },
            };
            if let Ok(ch) = conn.create_channel().await {
                for q in queues {
                    let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
                }
                for x in exchanges {
                    let _ = ch.exchange_delete(x.as_str().into(), Default::default()).await;
                }
            }
            let _ = conn.close(200, "done".into()).await;
        });
    }
}

/// Queues or exchanges (`list_queues`, `list_exchanges`) of the default vhost whose name
/// starts with `ns.`, from `rabbitmqctl`, which the tests' local broker has (none when it
/// cannot be run).
fn names_of(list: &str, ns: &str) -> Vec<String> {
    let Ok(out) = Command::new("rabbitmqctl").args([list, "-q", "--no-table-headers", "name"]).output() else {
        return Vec::new();
    };
    let prefix = format!("{ns}.");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|q| q.starts_with(&prefix))
        .map(String::from)
        .collect()
}

/// `base` with the tables of `extra` merged in (keys of `extra` win).
fn merge_toml(base: &str, extra: &str) -> String {
    fn merge(into: &mut toml::Table, from: toml::Table) {
        for (k, v) in from {
            match (into.get_mut(&k), v) {
                (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
                (_, v) => {
                    into.insert(k, v);
                }
            }
        }
    }
    let mut table: toml::Table = base.parse().expect("base config is TOML");
    merge(&mut table, extra.parse().expect("extra config is TOML"));
    table.to_string()
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

    /// `producer status JOB --json` once the tracker has seen the job end.
    pub fn final_status(&self, job: &str) -> Value {
        let mut last = Value::Null;
        eventually(Duration::from_secs(30), "the tracker reports the job ended", || {
            let out = self.producer(&["status", job, "--json"]);
            if !out.status.success() {
                return false;
            }
            last = serde_json::from_slice(&out.stdout).expect("status --json prints JSON");
            !matches!(last["status"].as_str(), Some("in_progress" | "submitting"))
        });
        last
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
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let v: Value = rt.block_on(async {
        ::reqwest::Client::new()
            .get(format!("{}/api/v1/query", prometheus_url()))
            .query(&[("query", expr)])
            .send()
            .await
            .expect("Prometheus reachable")
            .json()
            .await
            .expect("JSON")
    });
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

/// Every panel query of the dashboard, with template variables set to All.
pub fn dashboard_queries() -> Vec<(String, String)> {
    dashboard_queries_for(".*")
}

/// Every panel query with the `namespace` variable set to `namespace` (a regex).
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
    let child = Command::new("prometheus-pushgateway")
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus-pushgateway (installed by scripts/stack.sh up)");
    let url = format!("http://127.0.0.1:{port}/-/ready");
    eventually(Duration::from_secs(10), "pushgateway ready", || {
        std::process::Command::new("curl").args(["-fs", "-o", "/dev/null", &url]).status().is_ok_and(|s| s.success())
    });
    Proc { child, name: "pushgateway".into() }
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

impl Mock {
    /// The port the mock listens on.
    pub fn port(&self) -> u16 {
        self.url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port in url")
    }
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
    Command::new("curl")
        .args(["-fs", &format!("{}/metrics", pushgateway_url())])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default()
}
