//! `producer cancel` and `producer dead`: controlling jobs and the dead-letter queue.

use anyhow::Context as _;
use fleet::amqp;
use fleet::topology::{Topology, DEAD_REASON_HEADER};
use fleet::wire::{ControlMessage, Item, LedgerEvent};
use fleet::Config;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::AMQPValue;

/// Cancels a job across the fleet: workers end its unstarted items as `cancelled`, the
/// tracker ends the job `cancelled`.
pub async fn cancel(cfg: &Config, job_id: &str) -> anyhow::Result<()> {
    let topology = Topology::from_config(cfg);
    let conn = crate::connect(cfg, "producer cancel").await?;
    if topology.queue_len(&conn, &topology.results_queue(job_id)).await?.is_none() {
        anyhow::bail!("no job {job_id:?} in namespace {:?}", topology.namespace());
    }
    let ch = amqp::confirm_channel(&conn).await?;
    topology.declare_common(&ch).await?;
    let msg = serde_json::to_vec(&ControlMessage::CancelJob { job_id: job_id.to_string() })?;
    amqp::publish_confirmed(&ch, "", &topology.control_stream(), &msg, amqp::persistent_json()).await?;
    let event = serde_json::to_vec(&LedgerEvent::JobCancel { job_id: job_id.to_string() })?;
    amqp::publish_confirmed(&ch, "", &topology.ledger_queue(), &event, amqp::persistent_json()).await?;
    fleet::amqp::close(&conn, "done").await;
    Ok(())
}

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
            reason: reason(&d.properties),
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

/// The fleet's own reason header, or the broker's `x-death` reason.
fn reason(props: &lapin::BasicProperties) -> String {
    let Some(headers) = props.headers() else { return "unknown".into() };
    let h = headers.inner();
    if let Some(AMQPValue::LongString(s)) = h.get(DEAD_REASON_HEADER) {
        return s.to_string();
    }
    if let Some(AMQPValue::FieldArray(deaths)) = h.get("x-death") {
        if let Some(AMQPValue::FieldTable(first)) = deaths.as_slice().first() {
            let get = |k: &str| match first.inner().get(k) {
                Some(AMQPValue::LongString(s)) => s.to_string(),
                _ => String::new(),
            };
            return format!("{} (by the broker, from {})", get("reason"), get("queue"));
        }
    }
    "unknown".into()
}

/// Parses `90s`, `15m`, `24h`, `2d` (or plain seconds).
pub fn parse_duration(s: &str) -> anyhow::Result<std::time::Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().with_context(|| format!("bad duration {s:?} (try 90s, 15m, 24h, 2d)"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => anyhow::bail!("bad duration unit in {s:?} (use s, m, h or d)"),
    };
    Ok(std::time::Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::parse_duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("24h").unwrap().as_secs(), 86400);
        assert_eq!(parse_duration("90").unwrap().as_secs(), 90);
        assert_eq!(parse_duration("2d").unwrap().as_secs(), 172800);
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5w").is_err());
    }
}
