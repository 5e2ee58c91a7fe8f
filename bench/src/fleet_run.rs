//! One fleet on its own namespace: the worker config file, the worker processes, the
//! `producer submit` / `producer wait` runs, and the measurements of the workers just
//! before they are stopped.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use fleet::topology::Topology;
use harness::{FleetConfig, Proc};

use crate::procs::{self, Timed, Usage};
use crate::stack::Stack;
use crate::workload::PROVIDER;

/// How long a stopped worker may drain before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(20);

/// A fleet under test.
pub(crate) struct FleetRun<'a> {
    stack: &'a Stack,
    /// Its namespace (`bench.<scenario>.<random>`).
    pub ns: String,
    /// Its scratch directory (config, input, output, worker logs).
    pub dir: PathBuf,
    config: PathBuf,
    workers: Vec<Proc>,
}

/// A finished `producer submit`.
pub(crate) struct Submitted {
    pub job_id: String,
    pub total: u64,
    pub timed: Timed,
}

impl<'a> FleetRun<'a> {
    /// Writes the config of a fleet on a fresh namespace whose `mock` provider is
    /// `mock_url`, with `max_in_flight` both per worker and for the provider.
    pub(crate) fn new(stack: &'a Stack, scenario: &str, mock_url: &str, max_in_flight: u16) -> anyhow::Result<Self> {
        let (ns, dir) = stack.namespace(scenario)?;
        let config = dir.join("fleet.toml");
        config_toml(&ns, &stack.amqp_url, &stack.pushgateway_url, mock_url, max_in_flight).write(&config)?;
        // Load it as the workers will: a bad file fails here, and clean-up learns the delay
        // queues the workers will declare.
        let cfg = fleet::Config::load(Some(&config)).context("the generated fleet config")?;
        stack.track(&ns, |left| left.delay_tiers_s = cfg.retry.delay_tiers_s.clone());
        Ok(FleetRun { stack, ns, dir, config, workers: Vec::new() })
    }

    /// The names of its queues and exchanges.
    pub(crate) fn topology(&self) -> Topology {
        Topology::names(&self.ns)
    }

    /// Its config file (what `producer serve` of this fleet reads too).
    pub(crate) fn config(&self) -> &Path {
        &self.config
    }

    /// The stack this fleet runs on.
    pub(crate) fn stack(&self) -> &'a Stack {
        self.stack
    }

    /// Starts `n` more workers (`bench-w<i>`, logs in the scratch directory).
    pub(crate) fn start_workers(&mut self, n: usize) -> anyhow::Result<()> {
        for _ in 0..n {
            let id = format!("bench-w{}", self.workers.len() + 1);
            let mut cmd = harness::worker_command(&self.config);
            procs::clear_fleet_env(&mut cmd);
            cmd.env("FLEET__WORKER__ID", &id).envs(self.stack.worker_env.iter().map(|(k, v)| (k, v)));
            let log = self.dir.join(format!("{id}.log"));
            self.workers.push(Proc::spawn_logged(&mut cmd, &format!("worker {id}"), &log)?);
        }
        Ok(())
    }

    /// Waits until every started worker consumes the items queue.
    pub(crate) async fn wait_for_consumers(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let queue = self.topology().items_queue(PROVIDER);
        let want = self.workers.len() as u32;
        let started = Instant::now();
        loop {
            for (i, w) in self.workers.iter_mut().enumerate() {
                if let Some(status) = w.child.try_wait()? {
                    let log = worker_log_tail(&self.dir, i + 1);
                    anyhow::bail!("{} exited early ({status}):\n{log}", w.name);
                }
            }
            if let Some((_, consumers)) = self.stack.queue_state(&queue).await? {
                if consumers >= want {
                    return Ok(());
                }
            }
            anyhow::ensure!(started.elapsed() < timeout, "workers not consuming {queue} after {timeout:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs `producer submit FILE --provider mock --json` under GNU time.
    pub(crate) async fn submit(&mut self, input: &Path) -> anyhow::Result<Submitted> {
        let timed = self
            .producer(&[
                OsStr::new("submit"),
                input.as_os_str(),
                OsStr::new("--provider"),
                OsStr::new(PROVIDER),
                OsStr::new("--json"),
            ])
            .await?;
        timed.ensure_success("producer submit")?;
        let harness::Submitted { job_id, total } = harness::Submitted::from_json(&timed.output.stdout)?;
        self.stack.track(&self.ns, |left| left.jobs.push(job_id.clone()));
        Ok(Submitted { job_id, total, timed })
    }

    /// Runs `producer wait JOB --output FILE --json` under GNU time; returns its summary.
    pub(crate) async fn wait(
        &self,
        job_id: &str,
        output: &Path,
        timeout: Duration,
    ) -> anyhow::Result<(serde_json::Value, Timed)> {
        let timeout = timeout.as_secs().to_string();
        let timed = self
            .producer(&[
                OsStr::new("wait"),
                OsStr::new(job_id),
                OsStr::new("--output"),
                output.as_os_str(),
                OsStr::new("--timeout"),
                OsStr::new(&timeout),
                OsStr::new("--json"),
            ])
            .await?;
        timed.ensure_success("producer wait")?;
        let summary = serde_json::from_slice(&timed.output.stdout).context("producer wait --json printed no JSON")?;
        Ok((summary, timed))
    }

    async fn producer(&self, args: &[&OsStr]) -> anyhow::Result<Timed> {
        let mut all: Vec<&OsStr> = vec![OsStr::new("--config"), self.config.as_os_str(), OsStr::new("--quiet")];
        all.extend_from_slice(args);
        let report = self.dir.join(format!("time-{}.txt", uuid::Uuid::new_v4()));
        procs::run_timed(&harness::bin("producer"), &all, report).await
    }

    /// CPU time and peak RSS of every worker so far.
    pub(crate) fn worker_usage(&self) -> anyhow::Result<Vec<Usage>> {
        self.workers.iter().map(procs::usage_of).collect()
    }

    /// Measures the workers, then stops them (SIGTERM, drain, SIGKILL after a grace).
    pub(crate) async fn stop_workers(&mut self) -> anyhow::Result<Vec<Usage>> {
        let usage = self.worker_usage();
        for w in self.workers.drain(..) {
            let name = w.name.clone();
            let status = procs::stop(w, STOP_GRACE).await?;
            if !status.success() {
                eprintln!("bench: {name} exited with {status}");
            }
        }
        usage
    }

    /// Stops what is still running and deletes the namespace's queues and groups.
    pub(crate) async fn cleanup(mut self) {
        if let Err(e) = self.stop_workers().await {
            eprintln!("bench: stopping workers of {}: {e:#}", self.ns);
        }
        if let Err(e) = self.stack.delete_namespace(&self.ns).await {
            eprintln!("bench: cleaning up {}: {e:#}", self.ns);
        }
    }
}

/// The last lines of worker `bench-w<n>`'s log in `dir` (for error messages).
fn worker_log_tail(dir: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(dir.join(format!("bench-w{n}.log"))).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// The workers' and producer's config.
fn config_toml(ns: &str, amqp: &str, pg: &str, mock_url: &str, max_in_flight: u16) -> FleetConfig {
    let provider = format!("providers.{PROVIDER}");
    FleetConfig::new(ns, amqp, pg)
        .openai_provider(PROVIDER, mock_url)
        .set(&provider, "timeout_s", 60)
        .set(&provider, "max_in_flight", i64::from(max_in_flight))
        .set("worker", "max_in_flight", i64::from(max_in_flight))
        // Short, so stopping workers with a backlog (ratelimit) does not wait long.
        .set("worker", "drain_timeout_s", 5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_loads_with_both_limits() {
        let dir = std::env::temp_dir().join(format!("bench-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.toml");
        config_toml("bench.t.1", "amqp://x", "http://pg", "http://127.0.0.1:1", 1000).write(&path).unwrap();
        let cfg = fleet::Config::load(Some(&path)).unwrap();
        assert_eq!(cfg.namespace, "bench.t.1");
        assert_eq!(cfg.worker.max_in_flight, 1000);
        assert_eq!(cfg.providers["mock"].max_in_flight, 1000);
        assert_eq!(cfg.providers["mock"].base_url, "http://127.0.0.1:1");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
