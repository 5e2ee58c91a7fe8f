//! The control stream: job cancels and job openings/closings, read by every worker from the
//! start of the stream so that a worker started after a cancel honours it too (and knows
//! every open job's queue, see [`crate::jobs`]). The set of cancelled jobs outlives
//! reconnections (it is re-read from the start after each, which is idempotent).
//!
//! Anyone who can publish to the stream can add cancels, so the set is bounded: a cancel
//! is forgotten `tracker.retention_s` after it was read, and beyond [`MAX_CANCELLED`]
//! entries the oldest go first.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use fleet::topology::Topology;
use fleet::wire::ControlMessage;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Connection;

/// Most cancels a worker remembers (about 25 MB at the longest job ids).
pub const MAX_CANCELLED: usize = 100_000;

/// Jobs cancelled fleet-wide, shared by every delivery handler: job id -> when it was read
/// (ms since the epoch) and why, when the cancel says (e.g. `budget`).
#[derive(Clone)]
pub struct Cancelled {
    jobs: Arc<RwLock<HashMap<String, u64>>>,
    reasons: Arc<RwLock<HashMap<String, String>>>,
    retention_ms: u64,
}

impl Cancelled {
    /// An empty set whose cancels are forgotten after `retention_ms`.
    pub fn new(retention_ms: u64) -> Self {
        Cancelled { jobs: Arc::default(), reasons: Arc::default(), retention_ms }
    }

    /// Why `job_id` was cancelled, when the cancel gave a reason.
    pub fn reason(&self, job_id: &str) -> Option<String> {
        self.reasons.read().ok().and_then(|r| r.get(job_id).cloned())
    }

    /// Records a cancel with its reason (bounded: reasons are kept only for cancels the set
    /// still remembers).
    pub fn insert_with_reason(&self, job_id: String, reason: Option<&str>, now_ms: u64) {
        if let (Some(reason), Ok(mut r)) = (reason, self.reasons.write()) {
            const MAX_REASON: usize = 64;
            r.insert(job_id.clone(), reason.chars().take(MAX_REASON).collect());
            if r.len() > MAX_CANCELLED {
                // Rare (only a flood of cancels with reasons): forget the reasons, keep the cancels.
                r.clear();
            }
        }
        self.insert(job_id, now_ms);
    }

    pub fn contains(&self, job_id: &str) -> bool {
        self.jobs.read().map(|s| s.contains_key(job_id)).unwrap_or(false)
    }

    /// Records a cancel read at `now_ms`, forgetting cancels past retention, and the oldest
    /// ones beyond [`MAX_CANCELLED`].
    pub fn insert(&self, job_id: String, now_ms: u64) {
        let Ok(mut s) = self.jobs.write() else { return };
        s.insert(job_id, now_ms);
        // Pruning scans the whole set, so it runs every 1,024 cancels, not at each.
        if s.len() % 1024 == 0 {
            s.retain(|_, at| now_ms.saturating_sub(*at) < self.retention_ms);
        }
        if s.len() > MAX_CANCELLED {
            // Down to 90 %, so that a flood does not pay a full scan per cancel.
            let mut ages: Vec<u64> = s.values().copied().collect();
            let cut = ages.len() - MAX_CANCELLED * 9 / 10;
            let (_, oldest_kept, _) = ages.select_nth_unstable(cut);
            let oldest_kept = *oldest_kept;
            s.retain(|_, at| *at >= oldest_kept);
        }
    }

    /// Number of cancels remembered.
    pub fn len(&self) -> usize {
        self.jobs.read().map(|s| s.len()).unwrap_or(0)
    }

    /// Whether no cancel is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A consumer of the control stream that has caught up with it.
pub struct Follower {
    consumer: lapin::Consumer,
    cancelled: Cancelled,
    open_jobs: crate::jobs::OpenJobs,
}

impl Follower {
    /// Opens the stream from its first message and reads until a marker of our own, which
    /// is published first: when it returns, every cancel published before is known, so a
    /// worker started after a cancel never calls the provider for that job.
    pub async fn catch_up(
        conn: &Connection,
        topology: &Topology,
        cancelled: Cancelled,
        open_jobs: crate::jobs::OpenJobs,
    ) -> anyhow::Result<Follower> {
        let ch = conn.create_channel().await?;
        // Streams require a prefetch and manual acks on AMQP 0.9.1.
        ch.basic_qos(500, BasicQosOptions::default()).await?;
        let mut args = FieldTable::default();
        args.insert("x-stream-offset".into(), AMQPValue::LongString("first".into()));
        let consumer = ch
            .basic_consume(topology.control_stream().into(), "control".into(), BasicConsumeOptions::default(), args)
            .await?;
        let marker = uuid::Uuid::new_v4().to_string();
        let pub_ch = fleet::amqp::confirm_channel(conn).await?;
        let payload = serde_json::to_vec(&ControlMessage::Marker { id: marker.clone() })?;
        fleet::amqp::publish_confirmed(
            &pub_ch,
            "",
            &topology.control_stream(),
            &payload,
            fleet::amqp::persistent_json(),
        )
        .await?;
        let _ = pub_ch.close(200, "marker sent".into()).await;
        let mut follower = Follower { consumer, cancelled, open_jobs };
        while let Some(msg) = follower.next().await? {
            if matches!(&msg, ControlMessage::Marker { id } if *id == marker) {
                return Ok(follower);
            }
        }
        anyhow::bail!("control stream ended before our marker")
    }

    /// The next control message (applied to the cancelled set), `None` at the end.
    async fn next(&mut self) -> anyhow::Result<Option<ControlMessage>> {
        loop {
            let Some(delivery) = self.consumer.next().await else { return Ok(None) };
            let delivery = delivery?;
            delivery.acker.ack(BasicAckOptions::default()).await?;
            match serde_json::from_slice::<ControlMessage>(&delivery.data) {
                Ok(msg) if msg.check().is_err() => {
                    tracing::warn!(error = %msg.check().unwrap_err(), "ignoring a control message out of bounds");
                }
                Ok(msg) => {
                    self.apply(&msg);
                    return Ok(Some(msg));
                }
                Err(e) => tracing::warn!(error = %e, "ignoring a malformed control message"),
            }
        }
    }

    /// Applies a checked control message to the worker's view of the fleet's jobs.
    fn apply(&self, msg: &ControlMessage) {
        match msg {
            ControlMessage::CancelJob { job_id, reason } => {
                if !self.cancelled.contains(job_id) {
                    tracing::info!(job_id = %job_id, reason = reason.as_deref().unwrap_or("cancel"), "job cancelled");
                    self.cancelled.insert_with_reason(job_id.clone(), reason.as_deref(), fleet::now_ms());
                }
            }
            ControlMessage::JobOpened { job_id, provider, priority } => {
                self.open_jobs.open(job_id, provider, *priority)
            }
            ControlMessage::JobClosed { job_id } => self.open_jobs.close(job_id),
            ControlMessage::Marker { .. } => {}
        }
    }

    /// Keeps reading cancels until the connection fails.
    pub async fn run(mut self) -> anyhow::Result<()> {
        while self.next().await?.is_some() {}
        anyhow::bail!("control stream consumer ended")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancels_are_forgotten_after_retention_and_beyond_the_cap() {
        let c = Cancelled::new(1000);
        c.insert("a".into(), 0);
        c.insert("b".into(), 500);
        assert!(c.contains("a") && c.contains("b"));
        for i in 0..1022 {
            c.insert(format!("later{i}"), 1200);
        }
        assert!(!c.contains("a"), "past retention");
        assert!(c.contains("b") && c.contains("later0"));
        let c = Cancelled::new(u64::MAX);
        for i in 0..MAX_CANCELLED as u64 + 10 {
            c.insert(format!("j{i}"), i);
        }
        assert!(c.len() <= MAX_CANCELLED, "{}", c.len());
        assert!(!c.contains("j0") && c.contains(&format!("j{}", MAX_CANCELLED + 9)));
    }
}
