//! Fair sharing between jobs: every job has its own items queue
//! (`<ns>.items.<provider>.<job>`), and a worker consumes the open jobs of each provider it
//! serves side by side, each on its own channel with a prefetch of `priority` times the
//! provider's prefetch.
//!
//! Why that shares the provider fairly: every delivery a worker holds waits for a slot of
//! the provider's limiter, which admits waiting items in arrival order. An item's time in
//! the worker is therefore the same whatever its job, so (Little's law) each job's
//! throughput is proportional to the number of its items the worker holds: its prefetch.
//! Equal priorities get equal shares; `--priority 3` gets three shares. A job alone holds
//! at least the provider's prefetch, so it keeps the provider as busy as before.
//!
//! Workers learn of jobs from the control stream: `submit` publishes `job_opened` once the
//! job's queue exists, the tracker publishes `job_closed` when the job ended and its queue
//! is deleted (the broker also cancels our consumer then). The registry of open jobs is
//! [`crate::known::OpenJobs`].

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::Connection;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::acks::ChannelAcks;
use crate::context::Context;
use crate::known::OpenJobs;
use crate::process;
use crate::provider::ProviderClient;

/// How a job's consumer ended.
enum JobConsumerEnd {
    /// Shutdown, or the provider's keys all rejected: the consumer was cancelled by us.
    Stopped,
    /// The broker cancelled it: the job's queue was deleted (the job ended).
    QueueGone,
}

/// A job's consumer, run as a task of its own.
type JobTask = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<JobConsumerEnd>> + Send>>;

/// What every job consumer of one provider shares.
pub struct ProviderJobs {
    pub ctx: Arc<Context>,
    pub client: Arc<ProviderClient>,
    /// The provider's prefetch: a job of priority `p` gets `p` times it.
    pub prefetch: u16,
    pub in_flight: TaskTracker,
    pub open_jobs: OpenJobs,
    pub worker_id: String,
}

impl ProviderJobs {
    /// Consumes the open jobs of this provider, following the registry, until `shutdown`
    /// (then `Ok` once every job consumer is cancelled) or the connection fails (`Err`).
    /// While the provider's keys are all rejected ([`crate::keys::KeyPool::usable`]) no job
    /// is consumed: its items stay queued for workers whose keys work.
    pub async fn serve(self, conn: &Connection, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let mut changes = self.open_jobs.subscribe();
        let mut usable = self.client.keys.usable();
        // Cancelled when the keys become unusable: the job consumers of this period stop.
        let mut period = shutdown.child_token();
        let mut running: HashMap<String, ()> = HashMap::new();
        let mut consumers = tokio::task::JoinSet::new();
        loop {
            if !shutdown.is_cancelled() && *usable.borrow() {
                for (job_id, priority) in self.open_jobs.for_provider(&self.client.name) {
                    if running.contains_key(&job_id) {
                        continue;
                    }
                    if let Some(task) = self.start(conn, &job_id, priority, &period).await? {
                        running.insert(job_id.clone(), ());
                        consumers.spawn(async move { (job_id, task.await) });
                    }
                }
            }
            tokio::select! {
                changed = changes.changed(), if !shutdown.is_cancelled() => {
                    if changed.is_err() {
                        anyhow::bail!("job registry closed");
                    }
                }
                Ok(()) = usable.changed() => {
                    if *usable.borrow_and_update() {
                        period = shutdown.child_token();
                    } else {
                        period.cancel();
                    }
                }
                _ = shutdown.cancelled(), if consumers.is_empty() => return Ok(()),
                Some(done) = consumers.join_next() => {
                    let (job_id, end) = done.map_err(|e| anyhow::anyhow!("job consumer task failed: {e}"))?;
                    running.remove(&job_id);
                    match end? {
                        JobConsumerEnd::QueueGone => {
                            tracing::debug!(job_id = %job_id, "job queue deleted: the job ended");
                            self.open_jobs.close(&job_id);
                        }
                        JobConsumerEnd::Stopped if shutdown.is_cancelled() && consumers.is_empty() => return Ok(()),
                        JobConsumerEnd::Stopped => {}
                    }
                }
            }
        }
    }

    /// Starts consuming one job's queue on a channel of its own (a missing queue closes only
    /// that channel), until `stop`. `None` when the queue does not exist: the job ended
    /// meanwhile.
    async fn start(
        &self,
        conn: &Connection,
        job_id: &str,
        priority: u32,
        stop: &CancellationToken,
    ) -> anyhow::Result<Option<JobTask>> {
        let ch = conn.create_channel().await?;
        let prefetch = u32::from(self.prefetch).saturating_mul(priority).min(u32::from(u16::MAX)) as u16;
        ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
        let queue = self.ctx.publisher.topology.job_items_queue(&self.client.name, job_id);
        let tag = format!("{}/{}/{job_id}", self.worker_id, self.client.name);
        let consumer = match ch
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
        {
            Ok(c) => c,
            Err(e) if fleet::topology::is_not_found(&e) => {
                tracing::debug!(job_id = %job_id, "job queue does not exist: the job ended");
                self.open_jobs.close(job_id);
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        tracing::debug!(job_id = %job_id, priority, prefetch, "consuming a job");
        let (ctx, client, in_flight, stop) =
            (self.ctx.clone(), self.client.clone(), self.in_flight.clone(), stop.clone());
        Ok(Some(Box::pin(async move {
            let ended = consume_deliveries(ch, consumer, tag, ctx, client, in_flight, stop).await?;
            Ok(if ended { JobConsumerEnd::Stopped } else { JobConsumerEnd::QueueGone })
        })))
    }
}

/// Consumes the provider's own queue (items of earlier versions' producers, `dead
/// --requeue`d items, the old delay tiers' returns) on a channel of its own with
/// `prefetch`, until `shutdown` (`Ok`) or the connection fails (`Err`); paused while the
/// provider's keys are all rejected, as the job consumers are.
pub async fn serve_provider_queue(
    conn: Arc<Connection>,
    ctx: Arc<Context>,
    client: Arc<ProviderClient>,
    prefetch: u16,
    in_flight: TaskTracker,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let queue = ctx.publisher.topology.items_queue(&client.name);
    let tag = format!("{}/{}", ctx.worker_id, client.name);
    let mut usable = client.keys.usable();
    loop {
        while !*usable.borrow_and_update() {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                changed = usable.changed() => changed?,
            }
        }
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let ch = conn.create_channel().await?;
        // The broker never hands us more unacked items than the prefetch.
        ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
        let consumer = ch
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let period = shutdown.child_token();
        let ended = {
            let consuming = consume_deliveries(
                ch,
                consumer,
                tag.clone(),
                ctx.clone(),
                client.clone(),
                in_flight.clone(),
                period.clone(),
            );
            tokio::pin!(consuming);
            loop {
                tokio::select! {
                    ended = &mut consuming => break ended?,
                    changed = usable.changed(), if !period.is_cancelled() => {
                        changed?;
                        if !*usable.borrow_and_update() {
                            period.cancel();
                        }
                    }
                }
            }
        };
        if !ended {
            anyhow::bail!("consumer of {} ended unexpectedly", client.name);
        }
    }
}

/// Hands every delivery of `consumer` to [`process::handle`] as a task in `in_flight`, until
/// `shutdown` (then cancels the consumer; returns `Ok(true)` once the broker confirmed) or
/// until the broker ends the consumer (`Ok(false)`: its queue was deleted). `Err` when the
/// channel or connection failed.
pub async fn consume_deliveries(
    ch: lapin::Channel,
    mut consumer: lapin::Consumer,
    tag: String,
    ctx: Arc<Context>,
    client: Arc<ProviderClient>,
    in_flight: TaskTracker,
    shutdown: CancellationToken,
) -> anyhow::Result<bool> {
    // Every settlement on this channel goes through it, so acks can be grouped safely.
    let acks = Arc::new(ChannelAcks::default());
    let mut cancelling = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled(), if !cancelling => {
                cancelling = true;
                // Stop new deliveries; the stream ends once the broker confirms, and
                // whatever arrived before that is still processed.
                if ch.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await.is_err() {
                    return Ok(true);
                }
            }
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let delivery = acks.track(delivery).await;
                    // The task holds a handle of the channel: lapin closes a channel
                    // when its last handle drops, which would requeue this delivery
                    // even after the consumer task has finished (during the drain).
                    let (ctx, client, ch) = (ctx.clone(), client.clone(), ch.clone());
                    in_flight.spawn(async move {
                        process::handle(ctx, client, delivery).await;
                        drop(ch);
                    });
                }
                Some(Err(e)) => return Err(anyhow::Error::from(e)),
                None => return Ok(cancelling),
            }
        }
    }
}
