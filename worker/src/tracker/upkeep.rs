//! The tracker's periodic chores: measuring queue backlogs, forgetting jobs whose
//! retention is over (and deleting their streams), and pruning the Pushgateway groups of
//! workers that stopped pushing.

use std::time::Duration;

use fleet::push::{GroupKey, WORKER_JOB};
use fleet::Config;

use super::active::Active;

/// How often queue backlogs are measured.
pub(super) const BACKLOG_EVERY: Duration = Duration::from_secs(5);
/// How often the retention and Pushgateway pruning run at most (more often when
/// `pushgateway.stale_group_s` is short).
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// How often [`Active::retention`] runs.
pub(super) fn prune_every(cfg: &Config) -> Duration {
    PRUNE_EVERY.min(Duration::from_secs((cfg.pushgateway.stale_group_s / 2).max(1)))
}

impl Active<'_> {
    /// Sets `batch_queue_backlog` for every provider in the config: its own items queue plus
    /// the items queues of its jobs in progress (the backlog fair sharing spreads over them).
    pub(super) async fn measure_backlog(&self) {
        for provider in self.cfg.providers.keys() {
            let mut queues = vec![self.topology.items_queue(provider)];
            queues.extend(
                self.state
                    .jobs
                    .values()
                    .filter(|j| &j.provider == provider && j.end_status.is_none())
                    .map(|j| self.topology.job_items_queue(provider, &j.job_id)),
            );
            let mut total = 0u64;
            for queue in queues {
                // A batch-mode job has no items queue: asked on the probe connection.
                match self.probe.queue_stats(&queue).await {
                    Ok(n) => total += u64::from(n.map_or(0, |(ready, _)| ready)),
                    Err(_) => return, // the connection is failing; keep the last value
                }
            }
            self.metrics.queue_backlog.with_label_values(&[provider]).set(total as i64);
        }
    }

    /// Forgets the jobs whose retention is over (deleting their batch items streams),
    /// deletes the results streams past their age limit, and prunes stale Pushgateway
    /// groups; returns whether the state changed.
    pub(super) async fn retention(&mut self) -> bool {
        let now_ms = fleet::now_ms();
        let forgotten = self.state.prune(now_ms, self.cfg.tracker.retention_s * 1000);
        self.delete_batch_items(&forgotten).await;
        let expired = self.state.expired_results(now_ms, fleet::topology::RESULTS_MAX_AGE_S * 1000);
        self.delete_results(&expired).await;
        // Again (idempotent): a tracker that died between ending a job and deleting its
        // items queue left it behind.
        for (job_id, provider) in &forgotten {
            self.close_job_queue(job_id, provider).await;
        }
        self.prune_groups();
        !forgotten.is_empty() || !expired.is_empty()
    }

    /// Deletes the results streams whose results are all past the stream's age limit.
    async fn delete_results(&self, jobs: &[String]) {
        for job_id in jobs {
            let queue = self.topology.results_queue(job_id);
            match self.ch.queue_delete(queue.as_str().into(), Default::default()).await {
                Ok(_) => {
                    tracing::info!(job_id = %job_id, "results past their age limit: deleted the job's results stream")
                }
                Err(e) => tracing::debug!(job_id = %job_id, error = %e, "cannot delete a results stream"),
            }
        }
    }

    /// Deletes the batch items streams of jobs the tracker forgot (deleting a queue that
    /// does not exist, as for an online job, is a no-op): only workers read them, and the
    /// job has ended.
    async fn delete_batch_items(&self, jobs: &[(String, String)]) {
        for (job_id, _) in jobs {
            let items = self.topology.batch_items_stream(job_id);
            if let Err(e) = self.ch.queue_delete(items.as_str().into(), Default::default()).await {
                tracing::debug!(job_id = %job_id, error = %e, "cannot delete a batch items stream");
            }
        }
    }

    /// Deletes Pushgateway groups of this namespace's workers that stopped pushing more
    /// than `pushgateway.stale_group_s` ago. Until then their counters keep counting
    /// (dashboards exclude their gauges by push time). Runs as a task of its own (one at a
    /// time): a slow Pushgateway must not hold up the fold, whose cancels (a spend cap's)
    /// and answers wait behind it.
    fn prune_groups(&mut self) {
        let Some(pg) = self.pg.clone() else { return };
        if self.pruning.as_ref().is_some_and(|task| !task.is_finished()) {
            return;
        }
        let namespace = self.topology.namespace().to_string();
        let stale_s = self.cfg.pushgateway.stale_group_s as f64;
        self.pruning = Some(tokio::spawn(async move {
            let Ok(groups) = pg.groups().await else {
                return;
            };
            let now_s = fleet::now_ms() as f64 / 1000.0;
            for g in groups {
                let ours = g.labels.get("job").map(String::as_str) == Some(WORKER_JOB)
                    && g.labels.get("namespace") == Some(&namespace);
                if ours && now_s - g.push_time_s > stale_s {
                    if let Some(key) = GroupKey::from_labels(&g.labels) {
                        tracing::info!(group = ?key.labels, idle_s = (now_s - g.push_time_s) as u64, "deleting stale worker group");
                        let _ = pg.delete(&key).await;
                    }
                }
            }
        }));
    }
}
