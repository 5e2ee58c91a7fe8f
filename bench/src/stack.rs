//! The local stack as the benchmark sees it: where the broker, the Pushgateway and the
//! release binaries are, a scratch directory, fresh namespaces, and the clean-up of what
//! a run left on the broker and the Pushgateway.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context as _;
use fleet::push::Pushgateway;
use fleet::topology::Topology;

use crate::workload::PROVIDER;

/// What every scenario shares.
pub struct Stack {
    /// `amqp://...` of the broker.
    pub amqp_url: String,
    /// Base URL of the Pushgateway the workers push to.
    pub pushgateway_url: String,
    /// Directory holding `worker`, `producer` and `mock-provider`.
    pub bin_dir: PathBuf,
    /// Scratch directory of this run (configs, inputs, outputs, logs); removed at the end.
    pub scratch: PathBuf,
    /// Connection for queue inspection and clean-up.
    pub admin: lapin::Connection,
    /// HTTP client for the mock's `/stats`.
    pub http: reqwest::Client,
    /// Extra environment of every worker (`--worker-env`), e.g. a setting to compare.
    pub worker_env: Vec<(String, String)>,
    /// Namespaces not cleaned up yet: deleted by [`Stack::delete_leftovers`] when a run is
    /// interrupted or a scenario's own clean-up failed.
    leftovers: Mutex<BTreeMap<String, Leftover>>,
}

/// What must go with a namespace besides its fixed queues.
#[derive(Debug, Clone, Default)]
pub struct Leftover {
    /// Jobs submitted (one results queue each).
    pub jobs: Vec<String>,
    /// The workers' delay-queue tiers (one delay queue per tier).
    pub delay_tiers_s: Vec<u64>,
}

impl Stack {
    /// Connects to the broker and creates the scratch directory.
    pub async fn connect(amqp_url: String, pushgateway_url: String, bin_dir: PathBuf) -> anyhow::Result<Stack> {
        for bin in ["worker", "producer", "mock-provider"] {
            anyhow::ensure!(
                bin_dir.join(bin).exists(),
                "{} is missing: run `cargo build --release --bins` first",
                bin_dir.join(bin).display()
            );
        }
        let admin = fleet::amqp::connect(&amqp_url, "bench admin").await.with_context(|| {
            format!("cannot connect to RabbitMQ at {} (run `scripts/stack.sh up`)", fleet::amqp::redact_url(&amqp_url))
        })?;
        let scratch = std::env::temp_dir().join(format!("fleet-bench-{}", std::process::id()));
        std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
        Ok(Stack {
            amqp_url,
            pushgateway_url,
            bin_dir,
            scratch,
            admin,
            http: reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?,
            worker_env: Vec::new(),
            leftovers: Mutex::default(),
        })
    }

    /// The broker's AMQP port (of `amqp_url`), whose connections are measured.
    pub fn amqp_port(&self) -> u16 {
        self.amqp_url.parse::<lapin::uri::AMQPUri>().map_or(5672, |u| u.authority.port)
    }

    /// A fresh namespace `bench.<scenario>.<random>` and its own scratch subdirectory.
    pub fn namespace(&self, scenario: &str) -> anyhow::Result<(String, PathBuf)> {
        let ns = format!("bench.{scenario}.{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let dir = self.scratch.join(&ns);
        std::fs::create_dir_all(&dir)?;
        self.lock_leftovers().insert(ns.clone(), Leftover::default());
        Ok((ns, dir))
    }

    /// Records what must go with namespace `ns` besides its fixed queues.
    pub fn track(&self, ns: &str, update: impl FnOnce(&mut Leftover)) {
        update(self.lock_leftovers().entry(ns.to_string()).or_default());
    }

    fn lock_leftovers(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Leftover>> {
        self.leftovers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Deletes every namespace not cleaned up yet (after an interruption or a failure).
    pub async fn delete_leftovers(&self) {
        let namespaces: Vec<String> = self.lock_leftovers().keys().cloned().collect();
        for ns in namespaces {
            if let Err(e) = self.delete_namespace(&ns).await {
                eprintln!("bench: cleaning up {ns}: {e:#}");
            }
        }
    }

    /// `(messages ready, consumers)` of a queue, or `None` if it does not exist.
    pub async fn queue_state(&self, queue: &str) -> anyhow::Result<Option<(u32, u32)>> {
        Ok(fleet::topology::queue_stats(&self.admin, queue).await?)
    }

    /// Deletes plain queues by name (missing ones are fine).
    pub async fn delete_queues(&self, queues: &[String]) -> anyhow::Result<()> {
        for q in queues {
            let ch = self.admin.create_channel().await?;
            let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
            let _ = ch.close(200, "done".into()).await;
        }
        Ok(())
    }

    /// Deletes everything a namespace holds: the jobs' results queues, the items, shared
    /// and tracker queues, the exchanges, the reference pipeline's two queues, and its
    /// Pushgateway groups.
    pub async fn delete_namespace(&self, ns: &str) -> anyhow::Result<()> {
        let topology = Topology::new(ns, 5);
        let left = self.lock_leftovers().get(ns).cloned().unwrap_or_default();
        let mut queues: Vec<String> = left.jobs.iter().map(|j| topology.results_queue(j)).collect();
        queues.extend(left.jobs.iter().map(|j| topology.job_items_queue(PROVIDER, j)));
        queues.extend([format!("{ns}.items"), format!("{ns}.results")]);
        self.delete_queues(&queues).await?;
        let ch = self.admin.create_channel().await?;
        topology
            .delete_all(&ch, &[PROVIDER], &left.delay_tiers_s)
            .await
            .with_context(|| format!("deleting the queues of {ns}"))?;
        let _ = ch.close(200, "done".into()).await;
        self.delete_push_groups(ns).await?;
        self.lock_leftovers().remove(ns);
        Ok(())
    }

    /// Deletes the Pushgateway groups labelled with `namespace = ns`.
    async fn delete_push_groups(&self, ns: &str) -> anyhow::Result<()> {
        if let Some(pg) = Pushgateway::at(&self.pushgateway_url) {
            pg.delete_namespace(ns).await.context("deleting Pushgateway groups")?;
        }
        Ok(())
    }

    /// Removes the scratch directory.
    pub fn remove_scratch(&self) {
        let _ = std::fs::remove_dir_all(&self.scratch);
    }

    /// Path of a binary.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }
}

/// The load averages (1, 5, 15 min) from `/proc/loadavg`.
pub fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut f = text.split_whitespace().map(|v| v.parse().unwrap_or(f64::NAN));
    [f.next().unwrap_or(f64::NAN), f.next().unwrap_or(f64::NAN), f.next().unwrap_or(f64::NAN)]
}

/// The directory of the running executable (`target/release` under `scripts/bench.sh`).
pub fn own_bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe.parent().map(Path::to_path_buf).unwrap_or_default())
}
