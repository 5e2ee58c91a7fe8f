//! Following the control stream: job cancels and job openings/closings, read by every
//! worker from the start of the stream so that a worker started after a cancel honours it
//! too (and knows every open job's queue, see [`crate::jobs`]). What it learns is kept in
//! [`crate::known`], which outlives reconnections (the stream is re-read from the start
//! after each, which is idempotent).
//!
//! Producers write to this stream too (`job_opened`, a user's `cancel_job`), so what only
//! the tracker says is believed only with the fleet's signature ([`fleet::signing`]): an
//! unsigned `job_closed` is ignored with a WARN (it would stop every worker consuming a
//! live job), and an unsigned `cancel_job` naming the tracker's reason (`budget`) is applied
//! as the plain cancel any producer may send.

use fleet::topology::Topology;
use fleet::wire::ControlMessage;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Connection;

use crate::known::{Cancelled, OpenJobs};

/// A consumer of the control stream that has caught up with it.
pub struct Follower {
    consumer: lapin::Consumer,
    cancelled: Cancelled,
    open_jobs: OpenJobs,
}

impl Follower {
    /// Opens the stream from its first message and reads until a marker of our own, which
    /// is published first: when it returns, every cancel published before is known, so a
    /// worker started after a cancel never calls the provider for that job.
    pub async fn catch_up(
        conn: &Connection,
        topology: &Topology,
        cancelled: Cancelled,
        open_jobs: OpenJobs,
    ) -> anyhow::Result<Follower> {
        let ch = fleet::amqp::open_channel(conn).await?;
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
                    let signed = fleet::signing::verify(&delivery.properties, &delivery.data);
                    if let (ControlMessage::JobClosed { job_id }, Err(e)) = (&msg, signed) {
                        tracing::warn!(job_id = %job_id, error = %e, "ignoring a job_closed not from the tracker");
                        continue;
                    }
                    self.apply(&msg, signed.is_ok());
                    return Ok(Some(msg));
                }
                Err(e) => tracing::warn!(error = %e, "ignoring a malformed control message"),
            }
        }
    }

    /// Applies a checked control message to the worker's view of the fleet's jobs; `signed`:
    /// it carries the fleet's signature (always true in an unsigned fleet).
    fn apply(&self, msg: &ControlMessage, signed: bool) {
        match msg {
            ControlMessage::CancelJob { job_id, reason } => {
                // Only the tracker gives a reason; anyone else's cancel is a plain one.
                let reason = if signed { reason.as_deref() } else { None };
                if !self.cancelled.contains(job_id) {
                    tracing::info!(job_id = %job_id, reason = reason.unwrap_or("cancel"), "job cancelled");
                    self.cancelled.insert_with_reason(job_id.clone(), reason, fleet::now_ms());
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
