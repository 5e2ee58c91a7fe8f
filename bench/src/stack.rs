//! The local stack as the benchmark sees it: the broker and the Pushgateway, a scratch
//! directory, fresh namespaces, and the clean-up of what a run left on them (done by the
//! `harness` crate, which also finds the release binaries).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::Context as _;
use fleet::topology::Topology;
use harness::Names;

use crate::workload::PROVIDER;

/// What every scenario shares.
pub(crate) struct Stack {
    /// `amqp://...` of the broker.
    pub amqp_url: String,
    /// Base URL of the Pushgateway the workers push to.
    pub pushgateway_url: String,
    /// Scratch directory of this run (configs, inputs, outputs, logs); removed at the end.
    pub scratch: PathBuf,
    /// Connection for queue inspection.
    pub admin: lapin::Connection,
    /// Extra environment of every worker (`--worker-env`), e.g. a setting to compare.
    pub worker_env: Vec<(String, String)>,
    /// Namespaces not cleaned up yet: deleted by [`Stack::delete_leftovers`] when a run is
    /// interrupted or a scenario's own clean-up failed.
    leftovers: Mutex<BTreeMap<String, Leftover>>,
}

/// What must go with a namespace besides its fixed queues.
#[derive(Debug, Clone, Default)]
pub(crate) struct Leftover {
    /// Jobs submitted (one results queue each).
    pub jobs: Vec<String>,
    /// The workers' delay-queue tiers (one delay queue per tier).
    pub delay_tiers_s: Vec<u64>,
}

/// The plain queue and exchange of the bench's own pipelines (reference, probes) on
/// namespace `ns`: named like the fleet's items and results exchanges, so the namespace's
/// clean-up deletes them with the rest.
pub(crate) fn pipeline_names(ns: &str) -> (String, String) {
    let t = Topology::names(ns);
    (t.items_exchange(), t.results_exchange())
}

impl Stack {
    /// Connects to the broker and creates the scratch directory.
    pub(crate) async fn connect(amqp_url: String, pushgateway_url: String) -> anyhow::Result<Stack> {
        for bin in ["worker", "producer", "mock-provider"] {
            let path = harness::bin(bin);
            anyhow::ensure!(path.exists(), "{} is missing: run `cargo build --release --bins` first", path.display());
        }
        let admin = fleet::amqp::connect(&amqp_url, "bench admin").await.with_context(|| {
            format!("cannot connect to RabbitMQ at {} (run `scripts/stack.sh up`)", fleet::amqp::redact_url(&amqp_url))
        })?;
        let scratch = std::env::temp_dir().join(format!("fleet-bench-{}", std::process::id()));
        std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
        Ok(Stack { amqp_url, pushgateway_url, scratch, admin, worker_env: Vec::new(), leftovers: Mutex::default() })
    }

    /// The broker's AMQP port (of `amqp_url`), whose connections are measured.
    pub(crate) fn amqp_port(&self) -> u16 {
        self.amqp_url.parse::<lapin::uri::AMQPUri>().map_or(5672, |u| u.authority.port)
    }

    /// A fresh namespace `bench.<scenario>.<random>` and its own scratch subdirectory.
    pub(crate) fn namespace(&self, scenario: &str) -> anyhow::Result<(String, PathBuf)> {
        let ns = harness::namespace("bench", scenario);
        let dir = self.scratch.join(&ns);
        std::fs::create_dir_all(&dir)?;
        self.lock_leftovers().insert(ns.clone(), Leftover::default());
        Ok((ns, dir))
    }

    /// Records what must go with namespace `ns` besides its fixed queues.
    pub(crate) fn track(&self, ns: &str, update: impl FnOnce(&mut Leftover)) {
        update(self.lock_leftovers().entry(ns.to_string()).or_default());
    }

    fn lock_leftovers(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Leftover>> {
        self.leftovers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Deletes every namespace not cleaned up yet (after an interruption or a failure).
    pub(crate) async fn delete_leftovers(&self) {
        let namespaces: Vec<String> = self.lock_leftovers().keys().cloned().collect();
        for ns in namespaces {
            if let Err(e) = self.delete_namespace(&ns).await {
                eprintln!("bench: cleaning up {ns}: {e:#}");
            }
        }
    }

    /// `(messages ready, consumers)` of a queue, or `None` if it does not exist.
    pub(crate) async fn queue_state(&self, queue: &str) -> anyhow::Result<Option<(u32, u32)>> {
        Ok(fleet::topology::queue_stats(&self.admin, queue).await?)
    }

    /// Deletes everything a namespace holds (see [`harness::delete_namespace`]): besides
    /// what `rabbitmqctl` lists, the names known here, for a broker it cannot see: the
    /// jobs' results and items queues, the fleet's fixed queues and exchanges, the
    /// pipelines' plain queues.
    pub(crate) async fn delete_namespace(&self, ns: &str) -> anyhow::Result<()> {
        let topology = Topology::names(ns);
        let left = self.lock_leftovers().get(ns).cloned().unwrap_or_default();
        let (mut queues, exchanges) = topology.fixed_names(&[PROVIDER], &left.delay_tiers_s);
        queues.extend(left.jobs.iter().map(|j| topology.results_queue(j)));
        queues.extend(left.jobs.iter().map(|j| topology.job_items_queue(PROVIDER, j)));
        let (items, results) = pipeline_names(ns);
        queues.extend([items, results]);
        let (ns_owned, urls, pg) = (ns.to_string(), vec![self.amqp_url.clone()], self.pushgateway_url.clone());
        tokio::task::spawn_blocking(move || {
            harness::delete_namespace(&ns_owned, &urls, &pg, Names { queues, exchanges })
        })
        .await??;
        self.lock_leftovers().remove(ns);
        Ok(())
    }

    /// Removes the scratch directory.
    pub(crate) fn remove_scratch(&self) {
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// The load averages (1, 5, 15 min) from `/proc/loadavg`.
pub(crate) fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut f = text.split_whitespace().map(|v| v.parse().unwrap_or(f64::NAN));
    [f.next().unwrap_or(f64::NAN), f.next().unwrap_or(f64::NAN), f.next().unwrap_or(f64::NAN)]
}
