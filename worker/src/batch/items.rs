//! Reading a chunk's items from its job's batch items stream, by offset.
//!
//! The producer appends items in index order; a resumed submission may append some again
//! after the first copy, so item `i` is first found at offset `i` or later. A reader starts
//! at offset `start` and reads until it holds every index of the chunk (later copies are
//! skipped), or until the stream has nothing more for [`IDLE`]: the missing items are then
//! reported, and end failed.

use std::collections::BTreeMap;
use std::time::Duration;

use fleet::batch::ChunkTask;
use fleet::topology::Topology;
use fleet::wire::Item;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};

/// How long the stream may stay silent before the items not read are declared missing.
const IDLE: Duration = Duration::from_secs(10);
/// Stream messages in flight to the reader.
const PREFETCH: u16 = 1000;

/// The chunk's items by index (the ones found), checked like items off the items queue.
pub async fn read(
    conn: &lapin::Connection,
    topology: &Topology,
    chunk: &ChunkTask,
    max_message_bytes: usize,
) -> anyhow::Result<BTreeMap<u64, Item>> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
    let mut args = FieldTable::default();
    let offset = i64::try_from(chunk.start)?;
    args.insert("x-stream-offset".into(), AMQPValue::LongLongInt(offset));
    let tag = format!("chunk-{}", uuid::Uuid::new_v4().simple());
    let stream = topology.batch_items_stream(&chunk.job_id);
    let mut consumer =
        ch.basic_consume(stream.as_str().into(), tag.as_str().into(), BasicConsumeOptions::default(), args).await?;
    let mut items = BTreeMap::new();
    let mut unacked = 0;
    while (items.len() as u64) < chunk.len() {
        let Ok(next) = tokio::time::timeout(IDLE, consumer.next()).await else { break };
        let Some(delivery) = next else { break };
        let delivery = delivery?;
        // Streams credit the reader by acks: one multiple-ack per half prefetch.
        unacked += 1;
        if unacked >= PREFETCH / 2 {
            delivery.ack(BasicAckOptions { multiple: true }).await?;
            unacked = 0;
        }
        if delivery.data.len() > max_message_bytes {
            continue;
        }
        let Ok(item) = serde_json::from_slice::<Item>(&delivery.data) else { continue };
        let ours = item.job_id == chunk.job_id && item.provider == chunk.provider && item.total == chunk.total;
        if ours && item.check().is_ok() && (chunk.start..chunk.end).contains(&item.index) {
            items.entry(item.index).or_insert(item);
        }
    }
    let _ = ch.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
    let _ = ch.close(200, "chunk read".into()).await;
    Ok(items)
}
