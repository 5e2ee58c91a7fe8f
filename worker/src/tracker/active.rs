//! The active tracker's loop: fold ledger messages, checkpoint, ack, and run the other
//! rooms' chores on their timers.

use std::time::Duration;

use anyhow::Context as _;
use fleet::amqp;
use fleet::messages::LedgerMessage;
use fleet::metrics::TrackerMetrics;
use fleet::push::{GroupKey, Pushgateway};
use fleet::topology::Topology;
use fleet::Config;
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::state::{self, State};
use super::{checkpoint, upkeep};

/// Ledger messages folded between checkpoints at most.
const MAX_UNACKED: usize = 2000;

/// The active tracker on one connection.
pub(super) struct Active<'a> {
    pub(super) cfg: Config,
    pub(super) worker_id: String,
    pub(super) topology: Topology,
    pub(super) conn: &'a Connection,
    /// For the passive declares of queues that may be gone (see [`fleet::amqp::Probe`]).
    pub(super) probe: amqp::Probe,
    /// Confirm-mode channel for checkpoints, announcements and control messages.
    pub(super) ch: Channel,
    pub(super) state: State,
    pub(super) metrics: TrackerMetrics,
    /// Latest encoded metrics of a checkpointed state, for the pusher.
    pub(super) snapshot: watch::Sender<Option<Vec<u8>>>,
    /// The pusher and what stops it (taken on a clean stop; aborted if the role is lost).
    pusher: Option<(CancellationToken, JoinHandle<()>)>,
    pub(super) pg: Option<Pushgateway>,
    /// The Pushgateway pruning under way, if any (see [`Active::retention`]).
    pub(super) pruning: Option<JoinHandle<()>>,
}

/// Ledger deliveries folded but not yet covered by a checkpoint.
#[derive(Default)]
pub(super) struct Unacked {
    /// The newest one: acking it with `multiple` acks them all.
    pub(super) last: Option<lapin::Acker>,
    pub(super) n: usize,
}

impl<'a> Active<'a> {
    /// Takes over: restores the newest checkpoint and starts pushing its metrics.
    pub(super) async fn start(
        conn: &'a Connection,
        cfg: &Config,
        worker_id: &str,
        topology: Topology,
        pg: Option<Pushgateway>,
    ) -> anyhow::Result<Active<'a>> {
        let ch = amqp::confirm_channel(conn).await?;
        topology.declare_common(&ch).await?;
        topology.declare_webhook_queues(&ch, &fleet::webhooks::ALL_DELAY_TIERS_S).await?;
        let mut state = checkpoint::restore(&ch, &topology).await?;
        state.prices = cfg.providers.iter().map(|(name, p)| (name.clone(), p.prices.clone())).collect();
        let metrics = TrackerMetrics::new();
        let (snapshot, rx) = watch::channel(None);
        let stop = CancellationToken::new();
        let pusher = fleet::push::spawn_pusher(
            pg.clone(),
            GroupKey::tracker(topology.namespace()),
            fleet::push::Source::Snapshots(rx),
            Duration::from_secs(cfg.pushgateway.push_interval_s.max(1)),
            metrics.push_failures.clone(),
            stop.clone(),
        );
        let active = Active {
            cfg: cfg.clone(),
            worker_id: worker_id.to_string(),
            topology,
            conn,
            probe: amqp::Probe::new(cfg.amqp.addresses(), &format!("tracker {worker_id} probe")),
            ch,
            state,
            metrics,
            snapshot,
            pusher: Some((stop, pusher)),
            pg,
            pruning: None,
        };
        active.zero_series();
        active.replay_durations();
        active.publish_metrics();
        Ok(active)
    }

    /// Folds the ledger and answers status queries until shutdown (then checkpoints what
    /// it folded) or until a consumer fails (an error: the role is given up).
    pub(super) async fn run(mut self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let ledger_ch = fleet::amqp::open_channel(self.conn).await?;
        ledger_ch.basic_qos(MAX_UNACKED as u16, BasicQosOptions::default()).await?;
        let mut ledger = ledger_ch
            .basic_consume(
                self.topology.ledger_queue().into(),
                format!("tracker/{}", self.worker_id).as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let rpc_ch = fleet::amqp::open_channel(self.conn).await?;
        let mut rpc = rpc_ch
            .basic_consume(
                self.topology.tracker_rpc_queue().into(),
                format!("tracker-rpc/{}", self.worker_id).as_str().into(),
                BasicConsumeOptions { no_ack: true, ..Default::default() },
                FieldTable::default(),
            )
            .await?;
        let mut unacked = Unacked::default();
        let mut dirty = false;
        let mut tick = tokio::time::interval(Duration::from_millis(self.cfg.tracker.checkpoint_interval_ms.max(50)));
        let mut backlog = tokio::time::interval(upkeep::BACKLOG_EVERY);
        let mut prune = tokio::time::interval(upkeep::prune_every(&self.cfg));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    if dirty {
                        self.checkpoint(&mut unacked).await?;
                    }
                    break;
                }
                next = ledger.next() => {
                    let delivery = next.context("ledger consumer ended")?.context("ledger delivery")?;
                    self.take(&delivery).await?;
                    unacked.last = Some(delivery.acker);
                    unacked.n += 1;
                    dirty = true;
                    if unacked.n >= MAX_UNACKED {
                        self.checkpoint(&mut unacked).await?;
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
                    dirty |= self.abandon_stalled().await;
                    if dirty {
                        self.checkpoint(&mut unacked).await?;
                        dirty = false;
                    }
                }
                _ = backlog.tick() => self.measure_backlog().await,
                _ = prune.tick() => dirty |= self.retention().await,
            }
        }
        // Stopping cleanly: the pusher pushes the last checkpoint's metrics once more.
        if let Some((stop, pusher)) = self.pusher.take() {
            stop.cancel();
            let _ = pusher.await;
        }
        Ok(())
    }

    /// Folds one ledger delivery: a dead-lettered message, a job event, or results.
    async fn take(&mut self, delivery: &lapin::message::Delivery) -> anyhow::Result<()> {
        if delivery.exchange.as_str() == self.topology.dead_exchange() {
            return self.end_dead_item(delivery).await;
        }
        let kind = delivery.properties.kind().as_ref().map(|k| k.as_str());
        let ended = match LedgerMessage::decode(kind, &delivery.data) {
            Ok(LedgerMessage::Event(event)) => self.state.apply(&event, fleet::now_ms()),
            Ok(LedgerMessage::Results(results)) => self.state.apply_results(&results, fleet::now_ms()),
            Ok(LedgerMessage::Nothing) => None,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring a malformed ledger message");
                None
            }
        };
        self.cancel_over_budget().await;
        if let Some(ended) = ended {
            self.finished(&ended).await?;
        }
        Ok(())
    }

    /// Cancels the jobs whose spend reached their cap since the last fold.
    async fn cancel_over_budget(&mut self) {
        for job_id in std::mem::take(&mut self.state.budget_cancels) {
            // The same cancel `producer cancel` sends: workers end the job's items that have
            // not started `cancelled`. (Replayed after a takeover if the checkpoint did not
            // cover it: the fold sets it again.)
            tracing::info!(job_id = %job_id, "the job's spend reached its cap: cancelling it (reason budget)");
            let reason = Some(fleet::wire::REASON_BUDGET.to_string());
            self.control(&fleet::wire::ControlMessage::CancelJob { job_id, reason }).await;
        }
    }

    /// Ends the jobs whose resumable submission went silent for longer than the producer's
    /// `submit_timeout_s`; returns whether any ended.
    async fn abandon_stalled(&mut self) -> bool {
        let timeout_ms = self.cfg.producer.submit_timeout_s.saturating_mul(1000);
        let ended = self.state.abandon_stalled(fleet::now_ms(), timeout_ms);
        for ended in &ended {
            tracing::warn!(job_id = %ended.summary.job_id, "submission abandoned: the job ends failed (incomplete_submission)");
            if let Err(e) = self.finished(ended).await {
                tracing::warn!(job_id = %ended.summary.job_id, error = %e, "cannot publish the job's webhook delivery");
            }
        }
        !ended.is_empty()
    }

    /// Logs, measures and announces a job that ended; fails only when its webhook delivery
    /// cannot be published (confirmed before the checkpoint that covers the end, so a
    /// tracker killed in between folds the end again and publishes it again).
    async fn finished(&self, ended: &state::Ended) -> anyhow::Result<()> {
        let s = &ended.summary;
        tracing::info!(job_id = %s.job_id, status = %s.status, total = s.counts.total, succeeded = s.counts.succeeded,
            failed = s.counts.failed, duration_s = ended.duration_s, "job finished");
        self.metrics
            .job_duration
            .with_label_values(&[self.provider_label(&s.provider), s.status.as_str()])
            .observe(ended.duration_s);
        self.announce(s).await;
        self.close_job_queue(&s.job_id, &s.provider).await;
        self.publish_webhook(ended).await
    }

    /// Checkpoint, then ack what it covers, then expose its metrics.
    async fn checkpoint(&mut self, unacked: &mut Unacked) -> anyhow::Result<()> {
        checkpoint::write(&self.ch, &self.topology, &mut self.state).await?;
        if let Some(acker) = unacked.last.take() {
            acker.ack(lapin::options::BasicAckOptions { multiple: true }).await?;
        }
        unacked.n = 0;
        self.publish_metrics();
        Ok(())
    }
}

impl Drop for Active<'_> {
    /// A role lost to an error pushes and prunes nothing more: the next tracker's values take over.
    fn drop(&mut self) {
        if let Some((_, pusher)) = self.pusher.take() {
            pusher.abort();
        }
        if let Some(pruning) = self.pruning.take() {
            pruning.abort();
        }
    }
}
