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
//!
//! Announcements are not trusted to hold a slot: a job whose queue is missing is forgotten
//! at the first try, and a consumer that held nothing for [`IDLE_GIVE_BACK`] while other
//! jobs of its provider wait for a slot gives its slot back (its job goes to the back of
//! the line), so announcements of empty queues cannot starve the jobs that have items.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

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

/// How long a job's consumer may hold no delivery, while other jobs of its provider wait
/// for a slot, before it gives its slot back.
pub const IDLE_GIVE_BACK: Duration = Duration::from_secs(5);

/// How a consumer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsumerEnd {
    /// Shutdown, or the provider's keys all rejected: the consumer was cancelled by us.
    Stopped,
    /// Idle while other jobs waited: cancelled by us to give the slot back.
    Idle,
    /// The broker cancelled it: the job's queue was deleted (the job ended).
    QueueGone,
}

/// When a consumer gives its slot back: it held no delivery for `after`, and `others_wait`
/// says other jobs wait for one.
pub struct GiveBack {
    /// How long a consumer may hold no delivery before it gives its slot back.
    pub after: Duration,
    /// Whether other jobs wait for a consumer slot (no slot is given back otherwise).
    pub others_wait: Box<dyn Fn() -> bool + Send + Sync>,
}

/// A job's consumer, run as a task of its own.
type JobTask = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<ConsumerEnd>> + Send>>;

/// What every job consumer of one provider shares.
pub struct ProviderJobs {
    /// The connection's publishing channel and settings.
    pub ctx: Arc<Context>,
    /// The provider's client, which makes the calls.
    pub client: Arc<ProviderClient>,
    /// The provider's prefetch: a job of priority `p` gets `p` times it.
    pub prefetch: u16,
    /// Items in flight, which the drain waits for.
    pub in_flight: TaskTracker,
    /// Jobs whose items queues exist, as the control stream announced them.
    pub open_jobs: OpenJobs,
    /// This worker's id, in its consumer tags.
    pub worker_id: String,
    /// Asks whether an announced job's queue exists before a channel is opened for it.
    pub probe: Arc<fleet::amqp::Probe>,
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
                        self.open_jobs.set_consuming(&job_id, true);
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
                    self.open_jobs.set_consuming(&job_id, false);
                    match end? {
                        ConsumerEnd::QueueGone => {
                            tracing::debug!(job_id = %job_id, "job queue deleted: the job ended");
                            self.open_jobs.close(&job_id);
                        }
                        ConsumerEnd::Idle => {
                            tracing::debug!(job_id = %job_id, "job queue idle while others wait: slot given back");
                            self.open_jobs.to_back(&job_id);
                        }
                        ConsumerEnd::Stopped if shutdown.is_cancelled() && consumers.is_empty() => return Ok(()),
                        ConsumerEnd::Stopped => {}
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
        let queue = self.ctx.publisher.topology.job_items_queue(&self.client.name, job_id);
        // Anyone can announce a job: a missing queue is found on the probe connection, not
        // by a refused consume on ours (see `fleet::amqp::Probe`).
        if let Ok(None) = self.probe.queue_stats(&queue).await {
            tracing::debug!(job_id = %job_id, "job queue does not exist: the job ended");
            self.open_jobs.close(job_id);
            return Ok(None);
        }
        let ch = fleet::amqp::open_channel(conn).await?;
        let prefetch = u32::from(self.prefetch).saturating_mul(priority).min(u32::from(u16::MAX)) as u16;
        ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
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
        let (open_jobs, provider) = (self.open_jobs.clone(), self.client.name.clone());
        let give_back =
            GiveBack { after: IDLE_GIVE_BACK, others_wait: Box::new(move || open_jobs.others_wait(&provider)) };
        Ok(Some(Box::pin(consume_deliveries(ch, consumer, tag, ctx, client, in_flight, stop, Some(give_back)))))
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
        let ch = fleet::amqp::open_channel(&conn).await?;
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
                None,
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
        if ended == ConsumerEnd::QueueGone {
            anyhow::bail!("consumer of {} ended unexpectedly", client.name);
        }
    }
}

/// Hands every delivery of `consumer` to [`process::handle`] as a task in `in_flight`, until
/// `shutdown` or, with `give_back`, until it held nothing for a while others waited (then
/// cancels the consumer, and returns [`ConsumerEnd::Stopped`] or [`ConsumerEnd::Idle`]
/// once the broker confirmed), or until the broker ends the consumer
/// ([`ConsumerEnd::QueueGone`]: its queue was deleted). `Err` when the channel or
/// connection failed.
#[allow(clippy::too_many_arguments)]
pub async fn consume_deliveries(
    ch: lapin::Channel,
    mut consumer: lapin::Consumer,
    tag: String,
    ctx: Arc<Context>,
    client: Arc<ProviderClient>,
    in_flight: TaskTracker,
    shutdown: CancellationToken,
    give_back: Option<GiveBack>,
) -> anyhow::Result<ConsumerEnd> {
    // Every settlement on this channel goes through it, so acks can be grouped safely.
    let acks = Arc::new(ChannelAcks::default());
    // Deliveries of this consumer not yet settled, and when the last one arrived.
    let held = Arc::new(AtomicUsize::new(0));
    let mut last_delivery = tokio::time::Instant::now();
    let mut idle_check = tokio::time::interval(Duration::from_secs(1));
    let mut cancelling: Option<ConsumerEnd> = None;
    loop {
        let why = tokio::select! {
            _ = shutdown.cancelled(), if cancelling.is_none() => ConsumerEnd::Stopped,
            _ = idle_check.tick(), if cancelling.is_none() && give_back.is_some() => {
                let Some(rule) = &give_back else { continue };
                let idle = held.load(Ordering::Relaxed) == 0 && last_delivery.elapsed() >= rule.after;
                if !(idle && (rule.others_wait)()) {
                    continue;
                }
                ConsumerEnd::Idle
            }
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let delivery = acks.track(delivery).await;
                    last_delivery = tokio::time::Instant::now();
                    held.fetch_add(1, Ordering::Relaxed);
                    // The task holds a handle of the channel: lapin closes a channel
                    // when its last handle drops, which would requeue this delivery
                    // even after the consumer task has finished (during the drain).
                    let (ctx, client, ch, held) = (ctx.clone(), client.clone(), ch.clone(), held.clone());
                    in_flight.spawn(async move {
                        process::handle(ctx, client, delivery).await;
                        held.fetch_sub(1, Ordering::Relaxed);
                        drop(ch);
                    });
                    continue;
                }
                Some(Err(e)) => return Err(anyhow::Error::from(e)),
                None => return Ok(cancelling.unwrap_or(ConsumerEnd::QueueGone)),
            }
        };
        cancelling = Some(why);
        // Stop new deliveries; the stream ends once the broker confirms, and whatever
        // arrived before that is still processed.
        if ch.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await.is_err() {
            return Ok(why);
        }
    }
}
