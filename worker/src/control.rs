//! The control stream: job cancels, read by every worker from the start of the stream so
//! that a worker started after a cancel honours it too. The set of cancelled jobs outlives
//! reconnections (it is re-read from the start after each, which is idempotent).

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use fleet::topology::Topology;
use fleet::wire::ControlMessage;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Connection;

/// Jobs cancelled fleet-wide, shared by every delivery handler.
#[derive(Clone, Default)]
pub struct Cancelled(Arc<RwLock<HashSet<String>>>);

impl Cancelled {
    pub fn contains(&self, job_id: &str) -> bool {
        self.0.read().map(|s| s.contains(job_id)).unwrap_or(false)
    }
    pub fn insert(&self, job_id: String) {
        if let Ok(mut s) = self.0.write() {
            s.insert(job_id);
        }
    }
}

/// A consumer of the control stream that has caught up with it.
pub struct Follower {
    consumer: lapin::Consumer,
    cancelled: Cancelled,
}

impl Follower {
    /// Opens the stream from its first message and reads until a marker of our own, which
    /// is published first: when it returns, every cancel published before is known, so a
    /// worker started after a cancel never calls the provider for that job.
    pub async fn catch_up(conn: &Connection, topology: &Topology, cancelled: Cancelled) -> anyhow::Result<Follower> {
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
        let mut follower = Follower { consumer, cancelled };
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
                Ok(msg) => {
                    if let ControlMessage::CancelJob { job_id } = &msg {
                        if !self.cancelled.contains(job_id) {
                            tracing::info!(job_id = %job_id, "job cancelled");
                            self.cancelled.insert(job_id.clone());
                        }
                    }
                    return Ok(Some(msg));
                }
                Err(e) => tracing::warn!(error = %e, "ignoring a malformed control message"),
            }
        }
    }

    /// Keeps reading cancels until the connection fails.
    pub async fn run(mut self) -> anyhow::Result<()> {
        while self.next().await?.is_some() {}
        anyhow::bail!("control stream consumer ended")
    }
}
