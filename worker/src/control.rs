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

/// Reads the control stream into `cancelled` until the connection fails. A cancel takes
/// effect for items a worker picks up after it read the cancel: items already calling the
/// provider finish normally.
pub async fn follow(conn: &Connection, topology: &Topology, cancelled: Cancelled) -> anyhow::Result<()> {
    let ch = conn.create_channel().await?;
    // Streams require a prefetch and manual acks on AMQP 0.9.1.
    ch.basic_qos(500, BasicQosOptions::default()).await?;
    let mut args = FieldTable::default();
    args.insert("x-stream-offset".into(), AMQPValue::LongString("first".into()));
    let mut consumer = ch
        .basic_consume(topology.control_stream().into(), "control".into(), BasicConsumeOptions::default(), args)
        .await?;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        match serde_json::from_slice::<ControlMessage>(&delivery.data) {
            Ok(ControlMessage::CancelJob { job_id }) => {
                if !cancelled.contains(&job_id) {
                    tracing::info!(job_id = %job_id, "job cancelled");
                    cancelled.insert(job_id);
                }
            }
            Err(e) => tracing::warn!(error = %e, "ignoring a malformed control message"),
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
    }
    anyhow::bail!("control stream consumer ended")
}
