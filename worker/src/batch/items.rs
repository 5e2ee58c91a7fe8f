//! Reading a chunk's items from its job's batch items stream, by offset.
//!
//! The producer appends items in position order (grouped by endpoint, see
//! `fleet::batch::ChunkLayout`); a resumed submission may append some again after the first
//! copy, so the item at position `p` is first found at offset `p` or later. A reader starts
//! at offset `start` and reads until it holds every position of the chunk (later copies are
//! skipped), or until the stream has nothing more for [`IDLE`]. An item's position is its
//! index in a stream of one endpoint (and in streams of earlier versions), else the
//! `fleet-position` header of its message.
//!
//! Missing items: in index order a missing position names its item's index, which then
//! ends failed (`missing_item`) so the job can end. In a stream of several endpoints a
//! missing position names no index (only the stream knew it): it is counted and logged.
//! Either happens only when the stream lost messages (it outlived its 7 days) or a chunk
//! message claims items the job never had.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use fleet::batch::{ChunkTask, POSITION_HEADER};
use fleet::topology::Topology;
use fleet::wire::Item;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};

/// How long the stream may stay silent before the items not read are declared missing.
const IDLE: Duration = Duration::from_secs(10);
/// Stream messages in flight to the reader.
const PREFETCH: u16 = 1000;

/// What a chunk's reader found.
#[derive(Debug, Default)]
pub struct ChunkItems {
    /// The items found, by index, checked like items off the items queue.
    pub items: BTreeMap<u64, Item>,
    /// Every index of the chunk that is known, ascending: the items found, and in an
    /// index-ordered stream the missing positions too (each ends failed, `missing_item`).
    pub indices: Vec<u64>,
    /// Positions of a stream of several endpoints that were not found (see the module
    /// documentation).
    pub unnamed: u64,
}

impl ChunkItems {
    /// The chunk's items found, in index order.
    pub fn values(&self) -> impl Iterator<Item = &Item> {
        self.items.values()
    }
}

/// The chunk's items (the ones found), checked like items off the items queue.
pub async fn read(
    conn: &lapin::Connection,
    topology: &Topology,
    chunk: &ChunkTask,
    max_message_bytes: usize,
) -> anyhow::Result<ChunkItems> {
    let ch = fleet::amqp::open_channel(conn).await?;
    ch.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
    let mut args = FieldTable::default();
    let offset = i64::try_from(chunk.start)?;
    args.insert("x-stream-offset".into(), AMQPValue::LongLongInt(offset));
    let tag = format!("chunk-{}", uuid::Uuid::new_v4().simple());
    let stream = topology.batch_items_stream(&chunk.job_id);
    let mut consumer =
        ch.basic_consume(stream.as_str().into(), tag.as_str().into(), BasicConsumeOptions::default(), args).await?;
    let mut items = BTreeMap::new();
    let mut found = BTreeSet::new();
    let mut unacked = 0;
    while (found.len() as u64) < chunk.len() {
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
        let position = if chunk.by_endpoint { header_position(&delivery.properties) } else { Some(item.index) };
        let Some(position) = position.filter(|p| (chunk.start..chunk.end).contains(p)) else { continue };
        if ours && item.check().is_ok() && found.insert(position) {
            items.entry(item.index).or_insert(item);
        }
    }
    let _ = ch.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
    let _ = ch.close(200, "chunk read".into()).await;
    let (indices, unnamed) = if chunk.by_endpoint {
        (items.keys().copied().collect(), chunk.len() - found.len() as u64)
    } else {
        ((chunk.start..chunk.end).collect(), 0)
    };
    Ok(ChunkItems { items, indices, unnamed })
}

/// The position a stream message's header gives its item, if it gives one.
fn header_position(props: &lapin::BasicProperties) -> Option<u64> {
    let value = props.headers().as_ref()?.inner().get(POSITION_HEADER)?;
    match value {
        AMQPValue::LongLongInt(p) => u64::try_from(*p).ok(),
        AMQPValue::LongInt(p) => u64::try_from(*p).ok(),
        AMQPValue::LongUInt(p) => Some(u64::from(*p)),
        _ => None,
    }
}
