//! The job tracker: a role every worker can take, exactly one active at a time.
//!
//! Election: the active tracker owns the exclusive queue `<ns>.tracker.lock`. The broker
//! lets only one connection declare it and deletes it when that connection dies, so a
//! standby's next attempt (every [`STANDBY_RETRY`]) succeeds after a crash. The ledger queue
//! is also single-active-consumer, as a second guard.
//!
//! The active tracker folds ledger events into [`state::State`], and in each cycle:
//! checkpoints the state to `<ns>.tracker.state` (confirmed), then acks the events the
//! checkpoint covers, then publishes the job-level metrics of that same checkpoint. Metrics
//! are only ever pushed from checkpointed state, so a takeover (which restores the newest
//! checkpoint) never shows a counter going down.

pub mod dead;
pub mod state;

use std::time::Duration;

use anyhow::Context as _;
use fleet::amqp;
use fleet::metrics::TrackerMetrics;
use fleet::push::{GroupKey, Pushgateway, WORKER_JOB};
use fleet::topology::Topology;
use fleet::wire::{
    ErrorRecord, ItemResult, ItemStatus, JobStatus, JobSummary, LedgerEvent, ResultGroup, TrackerReply, TrackerRequest,
    KIND_JOB_FINISHED, KIND_RESULT, KIND_RESULTS,
};
use fleet::Config;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use state::State;

/// How often a standby tries to take the role.
const STANDBY_RETRY: Duration = Duration::from_secs(2);
/// Ledger events folded between checkpoints at most.
const MAX_UNACKED: usize = 2000;
/// How often the tracker lists Pushgateway groups to prune departed workers' (at most;
/// more often when `pushgateway.stale_group_s` is short).
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// How often queue backlogs are measured.
const BACKLOG_EVERY: Duration = Duration::from_secs(5);

/// Starts the tracker candidate loop if this worker may take the role.
pub fn spawn_candidate(
    cfg: &Config,
    worker_id: &str,
    pg: Option<Pushgateway>,
    shutdown: CancellationToken,
) -> Option<JoinHandle<()>> {
    if !cfg.tracker.enabled {
        return None;
    }
    let (cfg, worker_id) = (cfg.clone(), worker_id.to_string());
    Some(tokio::spawn(async move {
        let name = format!("tracker candidate {worker_id}");
        while !shutdown.is_cancelled() {
            let Some(conn) = amqp::connect_with_retry(&cfg.amqp.addresses(), &name, &shutdown).await else {
                return;
            };
            if let Err(e) = candidate(&conn, &cfg, &worker_id, pg.clone(), &shutdown).await {
                tracing::warn!(error = %format!("{e:#}"), "tracker role lost; standing by again");
            }
            let _ = conn.close(200, "tracker stopping".into()).await;
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(STANDBY_RETRY) => {}
            }
        }
    }))
}

/// Stands by until the lock is ours, then runs the active tracker on `conn`.
async fn candidate(
    conn: &Connection,
    cfg: &Config,
    worker_id: &str,
    pg: Option<Pushgateway>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let topology = Topology::from_config(cfg);
    loop {
        let ch = conn.create_channel().await?;
        let lock = ch
            .queue_declare(
                topology.tracker_lock_queue().into(),
                QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
                FieldTable::default(),
            )
            .await;
        match lock {
            Ok(_) => break,
            // Another connection holds it. The channel is closed for us.
            Err(e) if fleet::amqp::refusal(&e) == Some(fleet::amqp::Refusal::ResourceLocked) => {}
            Err(e) => return Err(e.into()),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(STANDBY_RETRY) => {}
        }
    }
    tracing::info!(tracker = worker_id, "took the job tracker role");
    Active::start(conn, cfg, worker_id, topology, pg).await?.run(shutdown).await
}

/// The active tracker on one connection.
struct Active<'a> {
    cfg: Config,
    worker_id: String,
    topology: Topology,
    conn: &'a Connection,
    ch: Channel,
    state: State,
    metrics: TrackerMetrics,
    /// Latest encoded metrics of a checkpointed state, for the pusher task.
    snapshot: watch::Sender<Option<Vec<u8>>>,
    pusher: JoinHandle<()>,
    pg: Option<Pushgateway>,
}

impl<'a> Active<'a> {
    async fn start(
        conn: &'a Connection,
        cfg: &Config,
        worker_id: &str,
        topology: Topology,
        pg: Option<Pushgateway>,
    ) -> anyhow::Result<Active<'a>> {
        let ch = amqp::confirm_channel(conn).await?;
        topology.declare_common(&ch).await?;
        let mut state = restore(&ch, &topology).await?;
        state.prices = cfg.providers.iter().map(|(name, p)| (name.clone(), p.prices.clone())).collect();
        let metrics = TrackerMetrics::new();
        let (snapshot, rx) = watch::channel(None);
        let pusher = spawn_snapshot_pusher(
            pg.clone(),
            GroupKey::tracker(topology.namespace()),
            rx,
            Duration::from_secs(cfg.pushgateway.push_interval_s.max(1)),
            metrics.push_failures.clone(),
        );
        let active = Active {
            cfg: cfg.clone(),
            worker_id: worker_id.to_string(),
            topology,
            conn,
            ch,
            state,
            metrics,
            snapshot,
            pusher,
            pg,
        };
        // Zero-valued series for every provider and end status, so rates over them read
        // 0 rather than "no data" before the first such job.
        for provider in cfg.providers.keys() {
            for status in JobStatus::ENDED {
                active.metrics.jobs.with_label_values(&[provider, status.as_str()]);
            }
            for status in ItemStatus::ALL {
                active.metrics.items.with_label_values(&[provider, status.as_str()]);
            }
            active.metrics.jobs_submitted.with_label_values(&[provider]);
            active.metrics.jobs_in_progress.with_label_values(&[provider]);
        }
        active.replay_metrics();
        active.publish_metrics();
        Ok(active)
    }

    /// Replays the restored job durations into the histogram.
    fn replay_metrics(&self) {
        for (key, durations) in &self.state.durations {
            let (provider, status) = state::split_key(key);
            let h = self.metrics.job_duration.with_label_values(&[self.provider_label(provider), status]);
            for d in durations {
                h.observe(*d);
            }
        }
    }

    /// The `provider` label of a provider name read off a queue: a configured provider, or
    /// `other` (labels come from a fixed set, whatever a message claims).
    fn provider_label<'p>(&self, provider: &'p str) -> &'p str {
        if self.cfg.providers.contains_key(provider) {
            provider
        } else {
            "other"
        }
    }

    /// Hands the current (checkpointed) metrics to the pusher.
    fn publish_metrics(&self) {
        // The state holds the counter values; the metric catches up by the difference.
        let catch_up = |counter: prometheus::IntCounter, n: u64| counter.inc_by(n.saturating_sub(counter.get()));
        // Summed by label first: every unknown provider shares the label `other`.
        let mut sums: std::collections::BTreeMap<(&str, String), u64> = Default::default();
        for (key, n) in &self.state.jobs_total {
            let (provider, status) = state::split_key(key);
            *sums.entry(("jobs", state::provider_key(self.provider_label(provider), status))).or_default() += n;
        }
        for (key, n) in &self.state.items_total {
            let (provider, status) = state::split_key(key);
            *sums.entry(("items", state::provider_key(self.provider_label(provider), status))).or_default() += n;
        }
        for ((family, key), n) in sums {
            let (provider, status) = state::split_key(&key);
            match (family, status) {
                ("jobs", "submitted") => catch_up(self.metrics.jobs_submitted.with_label_values(&[provider]), n),
                ("jobs", _) => catch_up(self.metrics.jobs.with_label_values(&[provider, status]), n),
                _ => catch_up(self.metrics.items.with_label_values(&[provider, status]), n),
            }
        }
        for (provider, n) in self.state.in_progress() {
            self.metrics.jobs_in_progress.with_label_values(&[self.provider_label(&provider)]).set(n);
        }
        self.publish_usage_metrics();
        self.snapshot.send_replace(Some(fleet::metrics::encode(&self.metrics.registry)));
    }

    /// Usage counters catch up with the checkpointed totals (labels: a configured provider
    /// or `other`, a priced model or `other`, summed first since several map to `other`).
    fn publish_usage_metrics(&self) {
        let mut sums: std::collections::BTreeMap<(&str, &str), state::UsageTotals> = Default::default();
        for (provider, models) in &self.state.usage_total {
            for (model, t) in models {
                let key = (
                    self.provider_label(provider),
                    if self.provider_label(provider) == "other" { "other" } else { model.as_str() },
                );
                let sum = sums.entry(key).or_default();
                sum.input_tokens += t.input_tokens;
                sum.cached_input_tokens += t.cached_input_tokens;
                sum.output_tokens += t.output_tokens;
                sum.cost += t.cost;
            }
        }
        for ((provider, model), t) in sums {
            for (kind, n) in
                [("input", t.input_tokens), ("cached_input", t.cached_input_tokens), ("output", t.output_tokens)]
            {
                let c = self.metrics.usage_tokens.with_label_values(&[provider, model, kind]);
                c.inc_by(n.saturating_sub(c.get()));
            }
            let c = self.metrics.usage_cost.with_label_values(&[provider, model]);
            if t.cost > c.get() {
                c.inc_by(t.cost - c.get());
            }
        }
    }

    async fn run(mut self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let ledger_ch = self.conn.create_channel().await?;
        ledger_ch.basic_qos(MAX_UNACKED as u16, BasicQosOptions::default()).await?;
        let mut ledger = ledger_ch
            .basic_consume(
                self.topology.ledger_queue().into(),
                format!("tracker/{}", self.worker_id).as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let rpc_ch = self.conn.create_channel().await?;
        let mut rpc = rpc_ch
            .basic_consume(
                self.topology.tracker_rpc_queue().into(),
                format!("tracker-rpc/{}", self.worker_id).as_str().into(),
                BasicConsumeOptions { no_ack: true, ..Default::default() },
                FieldTable::default(),
            )
            .await?;
        let mut unacked: Option<lapin::Acker> = None;
        let mut unacked_n = 0usize;
        let mut dirty = false;
        let mut tick = tokio::time::interval(Duration::from_millis(self.cfg.tracker.checkpoint_interval_ms.max(50)));
        let mut backlog = tokio::time::interval(BACKLOG_EVERY);
        let prune_every = PRUNE_EVERY.min(Duration::from_secs((self.cfg.pushgateway.stale_group_s / 2).max(1)));
        let mut prune = tokio::time::interval(prune_every);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    if dirty {
                        self.checkpoint(&mut unacked, &mut unacked_n).await?;
                    }
                    break;
                }
                next = ledger.next() => {
                    let delivery = next.context("ledger consumer ended")?.context("ledger delivery")?;
                    if delivery.exchange.as_str() == self.topology.dead_exchange() {
                        self.end_dead_item(&delivery).await?;
                    } else { match ledger_event(&delivery) {
                        Ok(Some((event, failures))) => {
                            if let LedgerEvent::ItemsFinished { job_id, .. } = &event {
                                for (index, error) in &failures {
                                    self.state.note_failure(job_id, *index, error, fleet::now_ms());
                                }
                            }
                            self.fold(&event).await?
                        }
                        Ok(None) => {}
                        Err(e) => tracing::warn!(error = %e, "ignoring a malformed ledger event"),
                    } }
                    unacked = Some(delivery.acker);
                    unacked_n += 1;
                    dirty = true;
                    if unacked_n >= MAX_UNACKED {
                        self.checkpoint(&mut unacked, &mut unacked_n).await?;
                        dirty = false;
                    }
                }
                // A status consumer that ends (its queue's node went away in a cluster) would
                // leave the job status unanswerable: give the role up and take it again.
                next = rpc.next() => match next {
                    Some(Ok(req)) => self.answer(req).await,
                    Some(Err(e)) => return Err(anyhow::Error::from(e).context("status queue consumer")),
                    None => anyhow::bail!("status queue consumer ended"),
                },
                _ = tick.tick() => {
                    let timeout_ms = self.cfg.producer.submit_timeout_s.saturating_mul(1000);
                    for ended in self.state.abandon_stalled(fleet::now_ms(), timeout_ms) {
                        tracing::warn!(job_id = %ended.summary.job_id, "submission abandoned: the job ends failed (incomplete_submission)");
                        self.finished(&ended).await;
                        dirty = true;
                    }
                    if dirty {
                        self.checkpoint(&mut unacked, &mut unacked_n).await?;
                        dirty = false;
                    }
                }
                _ = backlog.tick() => self.measure_backlog().await,
                _ = prune.tick() => {
                    let forgotten = self.state.prune(fleet::now_ms(), self.cfg.tracker.retention_s * 1000);
                    dirty |= !forgotten.is_empty();
                    self.delete_results(&forgotten).await;
                    // Again (idempotent): a tracker that died between ending a job and
                    // deleting its items queue left it behind.
                    for (job_id, provider) in &forgotten {
                        self.close_job_queue(job_id, provider).await;
                    }
                    self.prune_groups().await;
                }
            }
        }
        self.pusher.abort();
        let _ = self.pusher.await;
        // Final push of the checkpointed state, so the last job counts are not lost.
        if let Some(pg) = &self.pg {
            let _ = pg.push(&GroupKey::tracker(self.topology.namespace()), &self.metrics.registry).await;
        }
        Ok(())
    }

    /// Folds one event; cancels a job whose spend reached its cap; announces a job that ended.
    async fn fold(&mut self, event: &LedgerEvent) -> anyhow::Result<()> {
        let ended = self.state.apply(event, fleet::now_ms());
        for job_id in std::mem::take(&mut self.state.budget_cancels) {
            // The same cancel `producer cancel` sends: workers end the job's items that have
            // not started `cancelled`. (Replayed after a takeover if the checkpoint did not
            // cover it: the fold sets it again.)
            tracing::info!(job_id = %job_id, "the job's spend reached its cap: cancelling it (reason budget)");
            let reason = Some(fleet::wire::REASON_BUDGET.to_string());
            self.control(&fleet::wire::ControlMessage::CancelJob { job_id, reason }).await;
        }
        if let Some(ended) = ended {
            self.finished(&ended).await;
        }
        Ok(())
    }

    /// Logs, measures and announces a job that ended.
    async fn finished(&self, ended: &state::Ended) {
        let s = &ended.summary;
        tracing::info!(job_id = %s.job_id, status = %s.status, total = s.counts.total, succeeded = s.counts.succeeded,
            failed = s.counts.failed, duration_s = ended.duration_s, "job finished");
        self.metrics
            .job_duration
            .with_label_values(&[self.provider_label(&s.provider), s.status.as_str()])
            .observe(ended.duration_s);
        self.announce(s).await;
        self.close_job_queue(&s.job_id, &s.provider).await;
    }

    /// Deletes an ended job's items queue and tells the workers (`job_closed`), so they stop
    /// consuming it. What is still on it is a duplicate of an item that has its result.
    async fn close_job_queue(&self, job_id: &str, provider: &str) {
        let queue = self.topology.job_items_queue(provider, job_id);
        if let Err(e) = self.ch.queue_delete(queue.as_str().into(), Default::default()).await {
            tracing::debug!(job_id = %job_id, error = %e, "cannot delete a job's items queue");
        }
        let closed = fleet::wire::ControlMessage::JobClosed { job_id: job_id.to_string() };
        self.control(&closed).await;
    }

    /// Publishes a control message to every worker (confirm awaited off the loop: a lost
    /// one only delays what the broker tells the workers anyway).
    async fn control(&self, msg: &fleet::wire::ControlMessage) {
        let payload = serde_json::to_vec(msg).expect("control messages serialize");
        let res = amqp::publish(&self.ch, "", &self.topology.control_stream(), &payload, amqp::persistent_json()).await;
        match res {
            Ok(pending) => {
                tokio::spawn(async move {
                    let _ = pending.wait().await;
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot publish to the control stream"),
        }
    }

    /// Gives a dead-lettered item that has no result a failed one (see [`dead`]). The
    /// publish is confirmed before the ledger message can be acked: a tracker that dies
    /// first sees the dead copy again, and a second result is dropped as a duplicate.
    async fn end_dead_item(&self, delivery: &lapin::message::Delivery) -> anyhow::Result<()> {
        let Some(item) = dead::dead_item(delivery) else {
            return Ok(()); // not an item: `producer dead` shows it
        };
        if self.state.has_result(&item.job_id, item.index) {
            return Ok(()); // e.g. a poison item: its worker published the result first
        }
        let reason = fleet::topology::dead_reason(&delivery.properties);
        tracing::info!(job_id = %item.job_id, custom_id = %item.custom_id, reason = %reason, "ending a dead-lettered item as failed");
        let result = dead::failed_result(&item, &reason, &self.worker_id);
        let payload = serde_json::to_vec(&result)?;
        let props = amqp::persistent_json().with_type(KIND_RESULT.into());
        amqp::publish_confirmed(&self.ch, &self.topology.results_exchange(), &item.job_id, &payload, props)
            .await
            .context("publishing the result of a dead-lettered item")?;
        Ok(())
    }

    /// Deletes the results streams of jobs the tracker forgot: their retention is over.
    async fn delete_results(&self, jobs: &[(String, String)]) {
        for (job_id, _) in jobs {
            let queue = self.topology.results_queue(job_id);
            match self.ch.queue_delete(queue.as_str().into(), Default::default()).await {
                Ok(_) => tracing::info!(job_id = %job_id, "retention over: deleted the job's results stream"),
                Err(e) => tracing::debug!(job_id = %job_id, error = %e, "cannot delete a results stream"),
            }
            // A batch-mode job's items stream goes with its results (deleting a queue that
            // does not exist, as for an online job, is a no-op).
            let items = self.topology.batch_items_stream(job_id);
            if let Err(e) = self.ch.queue_delete(items.as_str().into(), Default::default()).await {
                tracing::debug!(job_id = %job_id, error = %e, "cannot delete a batch items stream");
            }
        }
    }

    /// Publishes `job_finished` to the job's results queue (so `producer wait` can stop).
    async fn announce(&self, summary: &JobSummary) {
        let payload = serde_json::to_vec(summary).expect("summaries serialize");
        let props = amqp::persistent_json().with_type(KIND_JOB_FINISHED.into());
        // Straight to the job's results stream (the default exchange routes by queue name),
        // not through the results exchange, whose copy to the ledger would only come back
        // to this tracker.
        let stream = self.topology.results_queue(&summary.job_id);
        let res = amqp::publish(&self.ch, "", &stream, &payload, props).await;
        // Not awaited here: the confirm arrives while we keep folding; an unroutable one
        // (results queue deleted) is harmless.
        if let Ok(pending) = res {
            tokio::spawn(async move {
                let _ = pending.wait().await;
            });
        }
    }

    /// Checkpoint, then ack what it covers, then expose its metrics.
    async fn checkpoint(&mut self, unacked: &mut Option<lapin::Acker>, n: &mut usize) -> anyhow::Result<()> {
        let payload = serde_json::to_vec(&self.state)?;
        amqp::publish_confirmed(&self.ch, "", &self.topology.tracker_state_queue(), &payload, amqp::persistent_json())
            .await
            .context("writing the tracker checkpoint")?;
        if let Some(acker) = unacked.take() {
            acker.ack(BasicAckOptions { multiple: true }).await?;
        }
        *n = 0;
        self.publish_metrics();
        Ok(())
    }

    /// Answers one status query on its `reply_to`.
    async fn answer(&self, req: lapin::message::Delivery) {
        let Some(reply_to) = req.properties.reply_to().clone() else {
            return;
        };
        let now = fleet::now_ms();
        let mut reply = TrackerReply { tracker: self.worker_id.clone(), jobs: vec![], error: None };
        match serde_json::from_slice::<TrackerRequest>(&req.data) {
            Ok(TrackerRequest::Status { job_id }) => match self.state.jobs.get(&job_id) {
                Some(j) => reply.jobs.push(self.summary(j, now)),
                None => reply.error = Some(format!("no job {job_id:?} is known to the tracker")),
            },
            Ok(TrackerRequest::Jobs) => reply.jobs = self.state.jobs.values().map(|j| self.summary(j, now)).collect(),
            Err(e) => reply.error = Some(format!("bad request: {e}")),
        }
        let mut props = BasicProperties::default().with_content_type("application/json".into());
        if let Some(id) = req.properties.correlation_id() {
            props = props.with_correlation_id(id.clone());
        }
        let payload = serde_json::to_vec(&reply).expect("replies serialize");
        let _ = self.ch.basic_publish("".into(), reply_to, Default::default(), &payload, props).await;
    }

    /// A job's summary, with its provider's backlog as last measured.
    fn summary(&self, job: &state::JobState, now_ms: u64) -> JobSummary {
        let mut summary = job.summary(now_ms);
        if let Some(progress) = summary.progress.as_mut() {
            progress.provider_backlog = self
                .cfg
                .providers
                .contains_key(&job.provider)
                .then(|| self.metrics.queue_backlog.with_label_values(&[&job.provider]).get() as u64);
        }
        summary
    }

    /// Sets `batch_queue_backlog` for every provider in the config: its own items queue plus
    /// the items queues of its jobs in progress (the backlog fair sharing spreads over them).
    async fn measure_backlog(&self) {
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
                match self.topology.queue_len(self.conn, &queue).await {
                    Ok(n) => total += u64::from(n.unwrap_or(0)),
                    Err(_) => return, // the connection is failing; keep the last value
                }
            }
            self.metrics.queue_backlog.with_label_values(&[provider]).set(total as i64);
        }
    }

    /// Deletes Pushgateway groups of this namespace's workers that stopped pushing more
    /// than `pushgateway.stale_group_s` ago. Until then their counters keep counting
    /// (dashboards exclude their gauges by push time).
    async fn prune_groups(&self) {
        let Some(pg) = &self.pg else { return };
        let Ok(groups) = pg.groups().await else {
            return;
        };
        let now_s = fleet::now_ms() as f64 / 1000.0;
        for g in groups {
            let ours = g.labels.get("job").map(String::as_str) == Some(WORKER_JOB)
                && g.labels.get("namespace").map(String::as_str) == Some(self.topology.namespace());
            if ours && now_s - g.push_time_s > self.cfg.pushgateway.stale_group_s as f64 {
                if let Some(key) = GroupKey::from_labels(&g.labels) {
                    tracing::info!(group = ?key.labels, idle_s = (now_s - g.push_time_s) as u64, "deleting stale worker group");
                    let _ = pg.delete(&key).await;
                }
            }
        }
    }
}

/// Failed items of a ledger message, with the failure each reports.
type Failures = Vec<(u64, ErrorRecord)>;

/// The event a ledger message carries: a job event from the producer or a worker, or
/// results (routed here from the results exchange, one alone or a worker's group) as their
/// items' `items_finished` with the failures they report. (`job_finished` announcements
/// go straight to the job's stream; one found here, from an older tracker, is skipped.)
fn ledger_event(delivery: &lapin::message::Delivery) -> serde_json::Result<Option<(LedgerEvent, Failures)>> {
    // Anyone who can publish to the broker can write here: an event out of bounds (a job id
    // no routing key can hold, an index past any job) is refused like a malformed one.
    let checked = |(e, failures): (LedgerEvent, Failures)| {
        e.check().map(|()| Some((e, failures))).map_err(serde::de::Error::custom)
    };
    ledger_event_unchecked(delivery)?.map_or(Ok(None), checked)
}

fn ledger_event_unchecked(delivery: &lapin::message::Delivery) -> serde_json::Result<Option<(LedgerEvent, Failures)>> {
    match delivery.properties.kind().as_ref().map(|k| k.as_str()) {
        Some(KIND_RESULT) => Ok(Some(finished(std::iter::once(serde_json::from_slice::<ItemResult>(&delivery.data)?)))),
        Some(KIND_RESULTS) => {
            let group: ResultGroup = serde_json::from_slice(&delivery.data)?;
            // A group's entries are bounded like the single results they stand for.
            group.check().map_err(serde::de::Error::custom)?;
            Ok((!group.results.is_empty()).then(|| finished(group.into_results())))
        }
        // Sent by trackers before job_finished went straight to the job's stream.
        Some(KIND_JOB_FINISHED) => Ok(None),
        _ => serde_json::from_slice(&delivery.data).map(|e| Some((e, Vec::new()))),
    }
}

/// The `items_finished` event of results of one job (a group's, or one alone), with the
/// failures they report.
fn finished(results: impl Iterator<Item = ItemResult>) -> (LedgerEvent, Failures) {
    let (mut job_id, mut provider) = (String::new(), String::new());
    let mut items = Vec::new();
    let mut failures = Vec::new();
    let mut usage = Vec::new();
    for r in results {
        if r.status == ItemStatus::Failed {
            failures.extend(r.error.map(|e| (r.index, e)));
        }
        usage.extend(r.usage.map(|u| (r.index, u)));
        items.push((r.index, r.status));
        (job_id, provider) = (r.job_id, r.provider);
    }
    (LedgerEvent::ItemsFinished { job_id, provider, items, usage }, failures)
}

/// Reads the newest checkpoint (leaving it in place), or starts empty.
async fn restore(ch: &Channel, topology: &Topology) -> anyhow::Result<State> {
    let Some(msg) = ch.basic_get(topology.tracker_state_queue().into(), BasicGetOptions::default()).await? else {
        tracing::info!("no tracker checkpoint: starting empty");
        return Ok(State::default());
    };
    let state = serde_json::from_slice::<State>(&msg.delivery.data);
    msg.delivery.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await?;
    let state = state.context("the tracker checkpoint is unreadable")?;
    tracing::info!(jobs = state.jobs.len(), "restored tracker checkpoint");
    Ok(state)
}

/// Pushes the newest snapshot every `interval` and whenever a new one arrives (at most
/// once per second), off the tracker's loop so a slow Pushgateway never delays it.
fn spawn_snapshot_pusher(
    pg: Option<Pushgateway>,
    key: GroupKey,
    mut rx: watch::Receiver<Option<Vec<u8>>>,
    interval: Duration,
    failures: prometheus::IntCounter,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let Some(pg) = pg else { return };
        let mut warned = false;
        loop {
            let body = rx.borrow_and_update().clone();
            if let Some(body) = body {
                if let Err(e) = pg.push_encoded(&key, body).await {
                    failures.inc();
                    if !warned {
                        tracing::warn!(error = %e, "tracker metrics push failed (counted in batch_push_failures_total)");
                        warned = true;
                    }
                } else {
                    warned = false;
                }
            }
            let _ = tokio::time::timeout(interval, rx.changed()).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}
