//! `producer dead`: lists the dead-letter queue with each message's reason, and puts items
//! back on their items queues with `--requeue`.

use anyhow::Context as _;
use fleet::amqp;
use fleet::topology::Topology;
use fleet::wire::Item;
use fleet::Config;
use lapin::options::{BasicAckOptions, BasicGetOptions};

/// One message of the dead-letter queue.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadMessage {
    pub reason: String,
    pub job_id: Option<String>,
    pub custom_id: Option<String>,
    pub provider: Option<String>,
    pub bytes: usize,
    /// Whether `--requeue` put it back on its items queue.
    pub requeued: bool,
}

/// Lists the dead-letter queue; with `requeue`, puts the items (of `job`, if given) back on
/// their items queues. Messages that are not items stay parked.
pub async fn dead(cfg: &Config, requeue: bool, job: Option<&str>) -> anyhow::Result<Vec<DeadMessage>> {
    let topology = Topology::from_config(cfg);
    let conn = crate::connect(cfg, "producer dead").await?;
    let ch = amqp::confirm_channel(&conn).await?;
    topology.declare_common(&ch).await?;
    let mut out = Vec::new();
    // Every message is fetched once and held unacked; closing the channel at the end puts
    // back whatever was not requeued (fetching a requeued one again would loop forever).
    while let Some(msg) = ch.basic_get(topology.dead_queue().into(), BasicGetOptions::default()).await? {
        let d = msg.delivery;
        let item = serde_json::from_slice::<Item>(&d.data).ok();
        let mut m = DeadMessage {
            reason: fleet::topology::dead_reason(&d.properties),
            job_id: item.as_ref().map(|i| i.job_id.clone()),
            custom_id: item.as_ref().map(|i| i.custom_id.clone()),
            provider: item.as_ref().map(|i| i.provider.clone()),
            bytes: d.data.len(),
            requeued: false,
        };
        if let (true, Some(item)) = (requeue, &item) {
            if job.is_none_or(|j| j == item.job_id) {
                topology.declare_items_queue(&ch, &item.provider).await?;
                amqp::publish_confirmed(
                    &ch,
                    &topology.items_exchange(),
                    &item.provider,
                    &d.data,
                    amqp::persistent_json(),
                )
                .await
                .with_context(|| format!("requeueing {}", item.custom_id))?;
                d.acker.ack(BasicAckOptions::default()).await?;
                m.requeued = true;
            }
        }
        out.push(m);
    }
    let _ = ch.close(200, "done".into()).await;
    fleet::amqp::close(&conn, "done").await;
    Ok(out)
}
