//! `interop` (`make interop`): the fleet against a real OpenAI-compatible gateway nobody
//! here wrote, the LiteLLM proxy, answering with mocked responses (`mock_response`: no
//! provider is ever called). The mock provider's `--litellm` mode imitates LiteLLM for the
//! e2e tests (`gateways::`); this run checks the imitation against the real thing.
//!
//! LiteLLM is installed from PyPI into `.run/litellm-venv` on first use (`python3 -m venv`,
//! then `pip install 'litellm[proxy]'`; a few minutes) and started on a free loopback port.
//! One worker and the producer then run four jobs through it, and a table says, per check:
//!
//! 1. chat and embeddings, every line exactly once, each with a `request_id` (LiteLLM's
//!    `x-litellm-call-id`);
//! 2. an unknown model fails after one call, the failure in `response`, `error` null;
//! 3. an rpm-limited model is used without a storm of 429s (at most 5 % of its answers);
//! 4. LiteLLM's Anthropic route (`/v1/messages`), through an `anthropic`-kind provider, with
//!    an rpm limit whose 429s carry no header at all.
//!
//! Answers are counted in LiteLLM's own access log (one line per answer), so the counts are
//! the gateway's, not the fleet's. Exits non-zero if a check fails or if LiteLLM cannot be
//! installed or started (it says which). The stack (RabbitMQ, Pushgateway) must be up
//! (`make interop` brings it up).
//!
//! It stops only what it started: the worker, and LiteLLM, which runs in a process group of
//! its own so that whatever it spawns goes with it. At the end, failing or not, it deletes
//! its namespace's queues and exchanges on the broker and its groups on the Pushgateway.
//!
//! Environment: `INTEROP_ITEMS` (300), `INTEROP_RPM` (120), `INTEROP_LIMITED_ITEMS` (200),
//! `INTEROP_MESSAGES_ITEMS` (60), `INTEROP_MESSAGES_RPM` (30); `INTEROP_BIN_DIR` runs the
//! `worker` and `producer` found there, built elsewhere (otherwise, under `cargo run`, the
//! binaries of this profile are built first, see [`harness::bin`]); `FLEET__AMQP__URL` and
//! `PUSHGATEWAY_URL` (or `FLEET__PUSHGATEWAY__URL`) name the services.

use std::fmt::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use e2e::Value;
use harness::{FleetConfig, Names, Proc};

/// What ends the run early: a message for `interop: FAILED: ...`.
type Fail = String;

/// Sizes: the rpm-limited job spans two of LiteLLM's one-minute windows.
struct Sizes {
    main: usize,
    rpm: u32,
    limited: usize,
    messages: usize,
    rpm_messages: u32,
}

impl Sizes {
    fn from_env() -> Sizes {
        fn var<T: std::str::FromStr>(name: &str, default: T) -> T {
            std::env::var(name).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(default)
        }
        Sizes {
            main: var("INTEROP_ITEMS", 300),
            rpm: var("INTEROP_RPM", 120),
            limited: var("INTEROP_LIMITED_ITEMS", 200),
            messages: var("INTEROP_MESSAGES_ITEMS", 60),
            rpm_messages: var("INTEROP_MESSAGES_RPM", 30),
        }
    }
}

/// The variable holding the key LiteLLM asks of its clients (local and made up, never a
/// real provider's): LiteLLM's config and the fleet's `api_key_env` both name it.
const KEY_ENV: &str = "INTEROP_LITELLM_KEY";

/// The fleet's providers: one per rate-limited deployment, because the fleet paces per
/// provider, so a model's 429s slow only that model.
const PROVIDERS: [&str; 3] = ["litellm", "litellm_limited", "litellm_messages"];

fn main() -> ExitCode {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf();
    clean_up_on_signal();
    let mut run = Run::new(root.join(".run/interop"));
    let result = run.go(&root, &Sizes::from_env());
    // Stops what it started and deletes the namespace before the verdict, so a failure
    // leaves nothing behind either.
    drop(run);
    match result {
        Ok(()) => {
            println!("interop: all checks passed");
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("interop: FAILED: {why}");
            ExitCode::FAILURE
        }
    }
}

/// What the run started and made, by id, for whoever ends it: [`Run`]'s drop, or the
/// signal handler of [`clean_up_on_signal`] (which holds no handle). Each takes what it
/// stops, so nothing is stopped twice.
struct Started {
    /// LiteLLM's process group (its leader's pid).
    litellm_group: Option<u32>,
    worker: Option<u32>,
    fleet: Option<FleetNames>,
}

static STARTED: Mutex<Started> = Mutex::new(Started { litellm_group: None, worker: None, fleet: None });

fn started() -> MutexGuard<'static, Started> {
    STARTED.lock().unwrap_or_else(|e| e.into_inner())
}

/// The run's namespace, its config file and every job submitted to it.
struct FleetNames {
    ns: String,
    config: PathBuf,
    jobs: Vec<String>,
}

impl FleetNames {
    /// Deletes the namespace's queues and exchanges and its Pushgateway groups: those
    /// `rabbitmqctl` lists, and, whether it can or not, the ones this run is known to have
    /// made (its providers' fixed names, with the config's delay tiers, and its jobs').
    fn delete(&self) {
        let t = fleet::topology::Topology::names(&self.ns);
        let tiers = fleet::Config::load(Some(&self.config)).map(|c| c.retry.delay_tiers_s).unwrap_or_default();
        let (mut queues, exchanges) = t.fixed_names(&PROVIDERS, &tiers);
        for job in &self.jobs {
            queues.extend([t.results_queue(job), t.batch_items_stream(job)]);
            queues.extend(PROVIDERS.iter().map(|p| t.job_items_queue(p, job)));
        }
        let known = Names { queues, exchanges };
        if let Err(e) = harness::delete_namespace(&self.ns, &[harness::amqp_url()], &pushgateway_url(), known) {
            eprintln!("interop: cleaning up {}: {e:#}", self.ns);
        }
    }
}

/// The Pushgateway: `PUSHGATEWAY_URL`, else harness's (`FLEET__PUSHGATEWAY__URL`, else the
/// local one).
fn pushgateway_url() -> String {
    std::env::var("PUSHGATEWAY_URL").unwrap_or_else(|_| harness::pushgateway_url())
}

/// On SIGINT or SIGTERM, stops what the run started and deletes its namespace, then exits
/// 130: LiteLLM, in a process group of its own, does not get a terminal's Ctrl-C, and
/// nothing else would stop it.
fn clean_up_on_signal() {
    std::thread::spawn(|| {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        let signal = rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
                return None;
            };
            tokio::select! {
                _ = int.recv() => Some("SIGINT"),
                _ = term.recv() => Some("SIGTERM"),
            }
        });
        drop(rt);
        let Some(signal) = signal else { return };
        eprintln!("interop: {signal}: stopping what it started");
        let mut started = started();
        if let Some(pid) = started.worker.take() {
            kill("-TERM", &pid.to_string());
            wait_gone(pid, Duration::from_secs(30));
            // Unreaped, the pid is still the worker's (or its zombie's).
            kill("-KILL", &pid.to_string());
        }
        if let Some(group) = started.litellm_group.take() {
            kill("-TERM", &format!("-{group}"));
            wait_gone(group, Duration::from_secs(15));
            kill("-KILL", &format!("-{group}"));
        }
        if let Some(fleet) = started.fleet.take() {
            fleet.delete();
        }
        std::process::exit(130);
    });
}

/// `kill SIG -- TARGET` (a pid, or `-pgid` for a process group); errors are ignored (the
/// target may be gone already).
fn kill(sig: &str, target: &str) {
    let _ = Command::new("kill").args([sig, "--", target]).stderr(Stdio::null()).status();
}

/// Waits until process `pid` has exited (gone, or a zombie this process has not reaped),
/// at most `timeout`.
fn wait_gone(pid: u32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The state follows the command name, which is in parentheses and may hold spaces.
        let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
        if matches!(state, None | Some("Z")) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One run: its directory and the handles of what it started. Dropping it (also when the
/// run panics) stops them and deletes the namespace.
struct Run {
    dir: PathBuf,
    key: String,
    litellm: Option<LiteLlm>,
    worker: Option<Proc>,
    /// The fleet's config file, once written.
    config: Option<PathBuf>,
}

impl Run {
    fn new(dir: PathBuf) -> Run {
        Run {
            dir,
            key: format!("sk-interop-{}", uuid::Uuid::new_v4().simple()),
            litellm: None,
            worker: None,
            config: None,
        }
    }

    fn go(&mut self, root: &Path, sizes: &Sizes) -> Result<(), Fail> {
        let _ = std::fs::remove_dir_all(&self.dir);
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("creating {}: {e}", self.dir.display()))?;

        let venv = root.join(".run/litellm-venv");
        install_litellm(&venv, &self.dir)?;
        let version = litellm_version(&venv);

        // INTEROP_BIN_DIR: binaries built elsewhere, used as they are.
        if let Some(dir) = std::env::var_os("INTEROP_BIN_DIR").filter(|d| !d.is_empty()) {
            harness::set_bin_dir(dir.into());
        } else if std::env::var_os("CARGO").is_some() {
            // Not `harness::bin_dir()` here: asked before `harness::bin`, it fixes the
            // directory and `bin` then builds nothing.
            println!("building worker and producer ...");
        }
        for name in ["worker", "producer"] {
            let path = harness::bin(name);
            if !path.is_file() {
                return Err(format!("no {name} binary at {}", path.display()));
            }
        }

        let litellm = LiteLlm::start(&venv, &self.dir, &self.key, sizes)?;
        let litellm_url = litellm.url.clone();
        self.litellm = Some(litellm);
        println!("LiteLLM {version} on {litellm_url}");

        let ns = harness::namespace("interop", "litellm");
        let config = self.dir.join("fleet.toml");
        started().fleet = Some(FleetNames { ns: ns.clone(), config: config.clone(), jobs: Vec::new() });
        self.config = Some(config.clone());
        fleet_config(&ns, &litellm_url, &pushgateway_url())?.write(&config).map_err(|e| format!("{e:#}"))?;
        let mut worker = harness::worker_command(&config);
        worker.env(KEY_ENV, &self.key);
        let worker =
            Proc::spawn_logged(&mut worker, "worker", &self.dir.join("worker.log")).map_err(|e| format!("{e:#}"))?;
        started().worker = Some(worker.pid());
        self.worker = Some(worker);

        let mut table = Table::default();
        self.checks(sizes, &mut table)?;

        println!();
        println!("{}", table.render(&version));
        let worker_log = std::fs::read_to_string(self.dir.join("worker.log")).unwrap_or_default();
        if worker_log.lines().any(|l| l.contains(" ERROR ") || l.contains(" WARN ")) {
            println!("note: the worker logged warnings or errors ({})", self.dir.join("worker.log").display());
        }
        if table.failed() {
            return Err(format!("see the table above; logs in {}", self.dir.display()));
        }
        Ok(())
    }

    /// The four checks, each a job, each adding rows to `table`.
    fn checks(&mut self, sizes: &Sizes, table: &mut Table) -> Result<(), Fail> {
        let log = self.dir.join("litellm.log");
        let chat = "/v1/chat/completions";

        // 1. Chat and embeddings, every line exactly once, request ids from x-litellm-call-id.
        let n = sizes.main;
        let (out, secs) = self.job("main", "litellm", n, Shape::Mixed, "chat-mock")?;
        table.row(
            format!("chat + embeddings, {n} lines"),
            format!("{} lines, {} ok, {} duplicated, {} missing, {secs:.0}s", out.lines, out.ok, out.dup, out.missing),
            out.lines == n && out.all_ok(n),
        );
        table.row("request_id (x-litellm-call-id)", format!("{} of {n} lines", out.with_id), out.with_id == n);

        // 2. An unknown model: failed after one call, the failure in `response`, `error` null.
        let before = answers(&log, chat, 400);
        self.job("unknown", "litellm", 1, Shape::Chat, "no-such-model")?;
        let calls = answers(&log, chat, 400).saturating_sub(before);
        let line = read_output(&self.dir.join("unknown.jsonl"))?.into_iter().next().unwrap_or(Value::Null);
        let status = line["response"]["status_code"].as_u64().map_or("none".to_string(), |s| s.to_string());
        let error = match &line["error"] {
            Value::Null => "error-null".to_string(),
            e => e["code"].as_str().unwrap_or("?").to_string(),
        };
        table.row(
            "unknown model",
            format!("HTTP {status}, {error}, {calls} call(s)"),
            calls == 1 && status == "400" && error == "error-null",
        );

        // 3. The rpm-limited model: no storm of 429s.
        let (n, rpm) = (sizes.limited, sizes.rpm);
        let (served_before, throttled_before) = (answers(&log, chat, 200), answers(&log, chat, 429));
        let (out, secs) = self.job("limited", "litellm_limited", n, Shape::Chat, "chat-limited")?;
        let throttled = answers(&log, chat, 429).saturating_sub(throttled_before);
        let served = answers(&log, chat, 200).saturating_sub(served_before);
        let share = percent(throttled, served);
        table.row(
            format!("rpm {rpm} model, {n} lines"),
            format!("{} ok in {secs:.0}s, {throttled} answers 429 of {} ({share:.1} %)", out.ok, throttled + served),
            out.all_ok(n) && share <= 5.0,
        );

        // 4. LiteLLM's Anthropic route, an `anthropic`-kind provider, an rpm limit and 429s
        // that carry no header at all.
        let (n, rpm) = (sizes.messages, sizes.rpm_messages);
        let throttled_before = answers(&log, "/v1/messages", 429);
        let (out, secs) = self.job("messages", "litellm_messages", n, Shape::Messages, "claude-limited")?;
        let throttled = answers(&log, "/v1/messages", 429).saturating_sub(throttled_before);
        table.row(
            format!("/v1/messages, rpm {rpm}, {n} lines"),
            format!("{} ok in {secs:.0}s, {throttled} answers 429 ({:.1} %)", out.ok, percent(throttled, out.ok)),
            out.all_ok(n),
        );
        Ok(())
    }

    /// Writes `n` requests to `<name>.in.jsonl`, submits them to `provider`, waits for their
    /// results into `<name>.jsonl`; returns what they hold and the seconds it took.
    fn job(&mut self, name: &str, provider: &str, n: usize, shape: Shape, model: &str) -> Result<(Output, f64), Fail> {
        let input = self.dir.join(format!("{name}.in.jsonl"));
        let output = self.dir.join(format!("{name}.jsonl"));
        write_requests(&input, n, shape, model)?;
        let began = Instant::now();
        let submitted = self.producer(&["submit", path_str(&input), "--provider", provider, "--json"])?;
        let job = serde_json::from_str::<Value>(&submitted)
            .ok()
            .and_then(|v| v["job_id"].as_str().map(String::from))
            .ok_or_else(|| format!("submit of {name} printed no job id: {submitted}"))?;
        if let Some(fleet) = started().fleet.as_mut() {
            fleet.jobs.push(job.clone());
        }
        self.producer(&["wait", &job, "--output", path_str(&output), "--timeout", "600"]).map_err(|e| {
            format!("job {name} ({job}) did not finish (worker log: {}): {e}", self.dir.join("worker.log").display())
        })?;
        let secs = began.elapsed().as_secs_f64();
        Ok((Output::check(&read_output(&output)?, n), secs))
    }

    /// Runs `producer --config <fleet.toml> --quiet ARGS`; its stdout, or why it failed.
    fn producer(&self, args: &[&str]) -> Result<String, Fail> {
        let config = self.config.as_ref().expect("the fleet's config is written first");
        let out = Command::new(harness::bin("producer"))
            .arg("--config")
            .arg(config)
            .arg("--quiet")
            .args(args)
            .env(KEY_ENV, &self.key)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run producer: {e}"))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(format!("producer {} exited {}: {}", args[0], out.status, stderr.trim()));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for Run {
    /// The worker first (so it pushes no more metrics), then LiteLLM, then the namespace's
    /// queues, exchanges and Pushgateway groups. Holds [`STARTED`] throughout, so a signal
    /// meanwhile waits for it and then finds nothing left to stop (the handler, which exits
    /// holding it, cannot have run before). Never panics.
    fn drop(&mut self) {
        let mut started = started();
        (started.worker, started.litellm_group) = (None, None);
        if let Some(worker) = self.worker.take() {
            let _ = worker.stop(Duration::from_secs(30));
        }
        if let Some(litellm) = self.litellm.take() {
            litellm.stop();
        }
        if let Some(fleet) = started.fleet.take() {
            fleet.delete();
        }
    }
}

/// The fleet's config: its namespace, the services, and the three providers on LiteLLM.
fn fleet_config(ns: &str, litellm_url: &str, pushgateway_url: &str) -> Result<FleetConfig, Fail> {
    let providers = format!(
        r#"[worker]
providers = {PROVIDERS:?}
[providers.litellm]
kind = "openai"
base_url = "{litellm_url}"
api_key_env = "{KEY_ENV}"
timeout_s = 30
max_in_flight = 32
[providers.litellm_limited]
kind = "openai"
base_url = "{litellm_url}"
api_key_env = "{KEY_ENV}"
timeout_s = 30
max_in_flight = 4
[providers.litellm_messages]
kind = "anthropic"
base_url = "{litellm_url}"
api_key_env = "{KEY_ENV}"
timeout_s = 30
max_in_flight = 4
"#
    );
    FleetConfig::new(ns, &harness::amqp_url(), pushgateway_url).merge(&providers).map_err(|e| format!("{e:#}"))
}

/// Installs the LiteLLM proxy into `venv` unless it is there: on failure, removes the
/// half-made venv and says why, keeping pip's log in `dir`.
fn install_litellm(venv: &Path, dir: &Path) -> Result<(), Fail> {
    if venv.join("bin/litellm").is_file() {
        return Ok(());
    }
    println!("installing the LiteLLM proxy into {} (pip install 'litellm[proxy]'; a few minutes) ...", venv.display());
    let made = Command::new("python3").arg("-m").arg("venv").arg(venv).status();
    if !made.is_ok_and(|s| s.success()) {
        return Err("cannot create a Python virtualenv (python3 -m venv): LiteLLM NOT tested".into());
    }
    let log_path = dir.join("pip.log");
    let log = std::fs::File::create(&log_path).map_err(|e| format!("creating {}: {e}", log_path.display()))?;
    let err = log.try_clone().map_err(|e| e.to_string())?;
    let installed = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "litellm[proxy]"])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .status();
    if !installed.is_ok_and(|s| s.success()) {
        eprintln!("{}", tail(&log_path, 5));
        let _ = std::fs::remove_dir_all(venv);
        return Err(format!("pip install 'litellm[proxy]' failed (log: {}): LiteLLM NOT tested", log_path.display()));
    }
    Ok(())
}

/// The installed LiteLLM's version, as pip reports it (empty if it cannot tell).
fn litellm_version(venv: &Path) -> String {
    let out = Command::new(venv.join("bin/pip")).args(["show", "litellm"]).stderr(Stdio::null()).output();
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).to_string()).unwrap_or_default();
    text.lines().find_map(|l| l.strip_prefix("Version:")).unwrap_or("").trim().to_string()
}

/// The running LiteLLM proxy: the leader of a process group of its own, so that stopping
/// the group stops whatever it spawned, and nothing else.
struct LiteLlm {
    child: Child,
    url: String,
}

impl LiteLlm {
    /// Writes its config and starts it on a free loopback port, its output (the access log
    /// the checks count) in `<dir>/litellm.log`; waits until it answers, at most 120 s.
    fn start(venv: &Path, dir: &Path, key: &str, sizes: &Sizes) -> Result<LiteLlm, Fail> {
        let config = dir.join("litellm.yaml");
        std::fs::write(&config, litellm_config(sizes)).map_err(|e| format!("writing {}: {e}", config.display()))?;
        let log_path = dir.join("litellm.log");
        let log = std::fs::File::create(&log_path).map_err(|e| format!("creating {}: {e}", log_path.display()))?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let port = harness::free_port();
        let child = Command::new(venv.join("bin/litellm"))
            .arg("--config")
            .arg(&config)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .env(KEY_ENV, key)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start LiteLLM: {e}"))?;
        started().litellm_group = Some(child.id());
        let mut litellm = LiteLlm { child, url: format!("http://127.0.0.1:{port}") };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        // LiteLLM is on loopback: no proxy of the environment stands between.
        let client = reqwest::Client::builder().no_proxy().build().map_err(|e| e.to_string())?;
        let liveliness = format!("{}/health/liveliness", litellm.url);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let live = rt.block_on(async {
                let answer = client.get(&liveliness).timeout(Duration::from_secs(5)).send().await;
                answer.is_ok_and(|r| r.status().is_success())
            });
            if live {
                return Ok(litellm);
            }
            let exited = litellm.child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() >= deadline {
                eprintln!("{}", tail(&log_path, 20));
                let how = exited.map_or("did not start".to_string(), |s| format!("exited ({s})"));
                let why = format!("LiteLLM {how} on {} (log: {})", litellm.url, log_path.display());
                started().litellm_group = None;
                litellm.stop();
                return Err(why);
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// SIGTERM to its process group; SIGKILL to the group if the leader has not exited
    /// within 15 s, and once more after, for any member that outlived the leader.
    fn stop(mut self) {
        let group = format!("-{}", self.child.id());
        kill("-TERM", &group);
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.child.try_wait().is_ok_and(|s| s.is_none()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        kill("-KILL", &group);
        let _ = self.child.wait();
    }
}

/// LiteLLM's config: every model answers with LiteLLM's own `mock_response`, so no provider
/// is called. `num_retries: 0`: the fleet retries, so LiteLLM's own retries would only hide
/// failures and multiply calls. `request_timeout` (20 s) below the fleet's `timeout_s`
/// (30 s): LiteLLM gives up on a call before the fleet abandons it, so an abandoned call is
/// never left running.
fn litellm_config(sizes: &Sizes) -> String {
    let (rpm, rpm_messages) = (sizes.rpm, sizes.rpm_messages);
    format!(
        r#"model_list:
  - model_name: chat-mock
    litellm_params:
      model: openai/gpt-4o-mini
      api_key: sk-not-used
      mock_response: "A mocked answer from LiteLLM."
  - model_name: embed-mock
    litellm_params:
      model: openai/text-embedding-3-small
      api_key: sk-not-used
      mock_response: [0.1, 0.2, 0.3]
  - model_name: chat-limited
    litellm_params:
      model: openai/gpt-4o-mini
      api_key: sk-not-used
      mock_response: "A mocked answer under an rpm limit."
      rpm: {rpm}
  - model_name: claude-limited
    litellm_params:
      model: anthropic/claude-3-5-haiku-latest
      api_key: sk-not-used
      mock_response: "A mocked answer on the Anthropic route."
      rpm: {rpm_messages}
litellm_settings:
  num_retries: 0
  request_timeout: 20
router_settings:
  num_retries: 0
  optional_pre_call_checks: ["enforce_model_rate_limits"]
general_settings:
  master_key: os.environ/{KEY_ENV}
"#
    )
}

/// The requests of a job.
#[derive(Clone, Copy)]
enum Shape {
    /// Chat completions.
    Chat,
    /// Chat completions, every fourth an embedding (of `embed-mock`).
    Mixed,
    /// Anthropic messages.
    Messages,
}

/// Writes `n` request lines (`req-0` ...) of `shape` for `model` to `path`.
fn write_requests(path: &Path, n: usize, shape: Shape, model: &str) -> Result<(), Fail> {
    let mut text = String::new();
    for i in 0..n {
        let user = serde_json::json!([{ "role": "user", "content": format!("Say something about {i}.") }]);
        let (url, body) = match shape {
            Shape::Mixed if i % 4 == 3 => {
                ("/v1/embeddings", serde_json::json!({ "model": "embed-mock", "input": format!("text {i}") }))
            }
            Shape::Messages => {
                ("/v1/messages", serde_json::json!({ "model": model, "max_tokens": 32, "messages": user }))
            }
            Shape::Chat | Shape::Mixed => {
                ("/v1/chat/completions", serde_json::json!({ "model": model, "messages": user }))
            }
        };
        let line = serde_json::json!({ "custom_id": format!("req-{i}"), "method": "POST", "url": url, "body": body });
        text.push_str(&line.to_string());
        text.push('\n');
    }
    std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// An output file's lines, parsed.
fn read_output(path: &Path) -> Result<Vec<Value>, Fail> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    text.lines()
        .map(|l| serde_json::from_str(l).map_err(|e| format!("{}: a line is not JSON ({e}): {l}", path.display())))
        .collect()
}

/// What an output file of `n` requests holds.
struct Output {
    lines: usize,
    /// Lines that succeeded (read back as `producer wait` reads them: `error` null, 2xx).
    ok: usize,
    /// Lines with a `response.request_id`.
    with_id: usize,
    /// Lines beyond the first of each custom id.
    dup: usize,
    /// `req-<i>` (i < n) with no line.
    missing: usize,
}

impl Output {
    fn check(lines: &[Value], n: usize) -> Output {
        let mut ids = std::collections::HashMap::<&str, usize>::new();
        for l in lines {
            *ids.entry(l["custom_id"].as_str().unwrap_or("")).or_default() += 1;
        }
        let has_id = |l: &&Value| l["response"]["request_id"].as_str().is_some_and(|id| !id.is_empty());
        Output {
            lines: lines.len(),
            ok: lines.iter().filter(|l| e2e::succeeded(l)).count(),
            with_id: lines.iter().filter(has_id).count(),
            dup: ids.values().map(|c| c - 1).sum(),
            missing: (0..n).filter(|i| !ids.contains_key(format!("req-{i}").as_str())).count(),
        }
    }

    /// Every request once, each succeeded.
    fn all_ok(&self, n: usize) -> bool {
        self.ok == n && self.dup == 0 && self.missing == 0
    }
}

/// LiteLLM's answers so far of `status` to `POST path`, from its access log (one line per
/// answer).
fn answers(log: &Path, path: &str, status: u16) -> usize {
    let needle = format!("\"POST {path} HTTP/1.1\" {status}");
    let text = std::fs::read(log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    text.lines().filter(|l| l.contains(&needle)).count()
}

/// `part` as a percentage of `part + rest`, rounded to a tenth as it is printed (0 when
/// both are 0).
fn percent(part: usize, rest: usize) -> f64 {
    (1000.0 * part as f64 / (part + rest).max(1) as f64).round() / 10.0
}

/// The last `n` lines of a file.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("the run directory's path is UTF-8")
}

/// The checks' table: what, the result, the verdict.
#[derive(Default)]
struct Table {
    rows: Vec<(String, String, bool)>,
}

impl Table {
    fn row(&mut self, what: impl Into<String>, result: String, ok: bool) {
        self.rows.push((what.into(), result, ok));
    }

    fn failed(&self) -> bool {
        self.rows.iter().any(|(_, _, ok)| !ok)
    }

    fn render(&self, version: &str) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{:<34} {:<58} verdict", format!("check (LiteLLM {version})"), "result");
        for (what, result, ok) in &self.rows {
            let _ = writeln!(out, "{what:<34} {result:<58} {}", if *ok { "ok" } else { "FAIL" });
        }
        out.trim_end().to_string()
    }
}
