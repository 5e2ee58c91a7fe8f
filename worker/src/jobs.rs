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
//! is deleted (the broker also cancels our consumer then). The registry is bounded: anyone
//! who can publish to the stream can announce jobs.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::Connection;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::acks::ChannelAcks;
use crate::process::{self, Context};
use crate::provider::ProviderClient;

/// Open jobs a worker remembers at most (the oldest announcements go first beyond it).
pub const MAX_OPEN_JOBS: usize = 10_000;
/// Jobs of one provider a worker consumes at once; later ones wait for one of them to end.
/// Bounds the deliveries a worker holds (each consumed job holds up to its prefetch).
pub const MAX_CONSUMED_JOBS: usize = 64;

/// One open job as announced on the control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OpenJob {
    provider: String,
    priority: u32,
    /// Order of announcement: jobs beyond [`MAX_CONSUMED_JOBS`] wait in this order.
    seq: u64,
}

/// The jobs whose queues exist, shared by the control follower (which fills it) and the
/// per-provider consumers (which follow it).
#[derive(Clone)]
pub struct OpenJobs {
    jobs: Arc<Mutex<HashMap<String, OpenJob>>>,
    next_seq: Arc<Mutex<u64>>,
    changed: watch::Sender<u64>,
}

impl Default for OpenJobs {
    fn default() -> Self {
        OpenJobs { jobs: Arc::default(), next_seq: Arc::default(), changed: watch::channel(0).0 }
    }
}

impl OpenJobs {
    /// Records a job as open (again: a resumed submission re-announces it; kept as first seen).
    pub fn open(&self, job_id: &str, provider: &str, priority: u32) {
        let Ok(mut jobs) = self.jobs.lock() else { return };
        if jobs.contains_key(job_id) {
            return;
        }
        let seq = {
            let mut n = self.next_seq.lock().expect("seq lock");
            *n += 1;
            *n
        };
        let priority = priority.clamp(1, fleet::wire::MAX_PRIORITY);
        jobs.insert(job_id.to_string(), OpenJob { provider: provider.to_string(), priority, seq });
        if jobs.len() > MAX_OPEN_JOBS {
            if let Some(oldest) = jobs.iter().min_by_key(|(_, j)| j.seq).map(|(id, _)| id.clone()) {
                jobs.remove(&oldest);
            }
        }
        drop(jobs);
        self.changed.send_modify(|v| *v += 1);
    }

    /// Forgets a job (it ended, or its queue is gone).
    pub fn close(&self, job_id: &str) {
        let removed = self.jobs.lock().map(|mut j| j.remove(job_id).is_some()).unwrap_or(false);
        if removed {
            self.changed.send_modify(|v| *v += 1);
        }
    }

    /// The jobs of `provider` to consume now, oldest announcement first: job id -> priority.
    fn for_provider(&self, provider: &str) -> BTreeMap<String, u32> {
        let Ok(jobs) = self.jobs.lock() else { return BTreeMap::new() };
        let mut mine: Vec<(&String, &OpenJob)> = jobs.iter().filter(|(_, j)| j.provider == provider).collect();
        mine.sort_by_key(|(_, j)| j.seq);
        mine.into_iter().take(MAX_CONSUMED_JOBS).map(|(id, j)| (id.clone(), j.priority)).collect()
    }

    /// Number of open jobs remembered.
    pub fn len(&self) -> usize {
        self.jobs.lock().map(|j| j.len()).unwrap_or(0)
    }

    /// Whether no job is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// How a job's consumer ended.
enum JobConsumerEnd {
    /// Shutdown: the consumer was cancelled by us.
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
    pub async fn serve(self, conn: &Connection, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let mut changes = self.open_jobs.subscribe();
        let mut running: HashMap<String, ()> = HashMap::new();
        let mut consumers = tokio::task::JoinSet::new();
        loop {
            if !shutdown.is_cancelled() {
                for (job_id, priority) in self.open_jobs.for_provider(&self.client.name) {
                    if running.contains_key(&job_id) {
                        continue;
                    }
                    if let Some(task) = self.start(conn, &job_id, priority, shutdown).await? {
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
    /// that channel). `None` when the queue does not exist: the job ended meanwhile.
    async fn start(
        &self,
        conn: &Connection,
        job_id: &str,
        priority: u32,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<JobTask>> {
        let ch = conn.create_channel().await?;
        let prefetch = u32::from(self.prefetch).saturating_mul(priority).min(u32::from(u16::MAX)) as u16;
        ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
        let queue = self.ctx.topology.job_items_queue(&self.client.name, job_id);
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
        let (ctx, client, in_flight, shutdown) =
            (self.ctx.clone(), self.client.clone(), self.in_flight.clone(), shutdown.clone());
        Ok(Some(Box::pin(async move {
            let ended = consume_deliveries(ch, consumer, tag, ctx, client, in_flight, shutdown).await?;
            Ok(if ended { JobConsumerEnd::Stopped } else { JobConsumerEnd::QueueGone })
        })))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_jobs_are_bounded_and_consumed_oldest_first() {
        let jobs = OpenJobs::default();
        jobs.open("b", "p", 3);
        jobs.open("a", "p", 99);
        jobs.open("c", "q", 1);
        jobs.open("b", "p", 1); // a re-announcement keeps the first
        let p = jobs.for_provider("p");
        assert_eq!(p.get("b"), Some(&3));
        assert_eq!(p.get("a"), Some(&fleet::wire::MAX_PRIORITY), "priority clamped");
        assert_eq!(jobs.for_provider("q").len(), 1);
        jobs.close("b");
        assert_eq!(jobs.for_provider("p").len(), 1);
        for i in 0..MAX_OPEN_JOBS + 5 {
            jobs.open(&format!("j{i}"), "p", 1);
        }
        assert_eq!(jobs.len(), MAX_OPEN_JOBS);
        let consumed = jobs.for_provider("p");
        assert_eq!(consumed.len(), MAX_CONSUMED_JOBS);
        assert!(!consumed.contains_key("a") && !consumed.contains_key("j0"), "the oldest were forgotten");
    }
}
