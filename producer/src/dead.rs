//! `producer dead`: lists the dead-letter queue with each message's reason, and puts items
//! back on their items queues with `--requeue`.

use anyhow::Context as _;
use fleet::amqp;
use fleet::topology::Topology;
use fleet::wire::Item;
use fleet::Config;
use lapin::options::{BasicAckOptions, BasicGetOptions};

/// One message of the dead-letter queue. Every text in it comes from the message (anyone
/// who can publish may have written it): [`DeadMessage::line`] escapes it for a terminal.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadMessage {
    /// Why it was parked: the fleet's dead-reason header, else the broker's `x-death` record.
    pub reason: String,
    /// The item's job; `None` when the message is not an item.
    pub job_id: Option<String>,
    /// The item's `custom_id`; `None` when the message is not an item.
    pub custom_id: Option<String>,
    /// The provider the item was for; `None` when the message is not an item.
    pub provider: Option<String>,
    /// Size of the message body.
    pub bytes: usize,
    /// Whether `--requeue` put it back on its items queue.
    pub requeued: bool,
    /// Why `--requeue` left an item parked (it fails the checks a worker makes, or names a
    /// provider this config does not have).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_requeued: Option<String>,
}

impl DeadMessage {
    /// The message as one line of text, control characters escaped (a forged custom id
    /// cannot move the cursor, recolour or retitle the operator's terminal).
    pub fn line(&self) -> String {
        let field = |v: &Option<String>| v.as_deref().map_or_else(|| "-".to_string(), printable);
        let mut line = format!(
            "{}{} job={} custom_id={} bytes={}: {}",
            if self.requeued { "requeued " } else { "" },
            field(&self.provider),
            field(&self.job_id),
            field(&self.custom_id),
            self.bytes,
            printable(&self.reason)
        );
        if let Some(why) = &self.not_requeued {
            line.push_str(&format!(" (left parked: {})", printable(why)));
        }
        line
    }
}

/// `s` with every control character (C0, DEL, C1) written as a `\u{..}` escape.
pub fn printable(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { c.escape_unicode().to_string() } else { c.to_string() }).collect()
}

/// Why an item cannot go back on an items queue, if it cannot: the checks a worker makes on
/// every item it reads, and a provider this config knows (its name becomes a queue name
/// and a routing key, which the broker bounds at 255 bytes).
fn requeue_refusal(cfg: &Config, item: &Item) -> Option<String> {
    if let Err(e) = item.check() {
        return Some(format!("invalid item: {e}"));
    }
    (!cfg.providers.contains_key(&item.provider)).then(|| "its provider is not configured here".to_string())
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
            not_requeued: None,
        };
        if let (true, Some(item)) = (requeue, &item) {
            if job.is_none_or(|j| j == item.job_id) {
                if let Some(why) = requeue_refusal(cfg, item) {
                    m.not_requeued = Some(why);
                    out.push(m);
                    continue;
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forged_escape_sequences_are_shown_escaped() {
        let m = DeadMessage {
            reason: "malformed\x1b]0;pwned\x07".into(),
            job_id: Some("j\u{9b}2J".into()),
            custom_id: Some("a\x1b[2Jb\r\n".into()),
            provider: None,
            bytes: 3,
            requeued: false,
            not_requeued: Some("bad\x7f".into()),
        };
        let line = m.line();
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert!(line.contains("custom_id=a\\u{1b}[2Jb\\u{d}\\u{a}"), "{line}");
        assert!(line.contains("job=j\\u{9b}2J") && line.contains("bad\\u{7f}"), "{line}");
    }

    #[test]
    fn requeue_checks_items_as_workers_do() {
        let cfg = Config::load(None).unwrap();
        let provider = cfg.providers.keys().next().unwrap().clone();
        let item: Item = serde_json::from_value(serde_json::json!({
            "job_id": "job1", "index": 0, "total": 1, "custom_id": "c", "provider": provider,
            "url": "/v1/chat/completions", "body": {}, "submitted_at_ms": 0
        }))
        .unwrap();
        assert_eq!(requeue_refusal(&cfg, &item), None);
        let long = Item { provider: "p".repeat(300), ..item.clone() };
        assert!(requeue_refusal(&cfg, &long).unwrap().contains("not configured"));
        let past = Item { index: 5, ..item };
        assert!(requeue_refusal(&cfg, &past).unwrap().starts_with("invalid item"));
    }
}
