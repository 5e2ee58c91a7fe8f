//! Settling deliveries of one consumer channel, so that several can be acked with one
//! `multiple` ack.
//!
//! A `basic.ack` with `multiple` settles *every* unsettled delivery of the channel up to its
//! tag, so it may only be sent when each of those is one we mean to ack. [`ChannelAcks`]
//! knows which deliveries of its channel are still unsettled (every settlement of the
//! channel goes through it) and acks a set of them with as few frames as is safe: the part
//! of the set that is a prefix of the unsettled ones with one multiple ack, the rest one by
//! one.
//!
//! Order matters too: a multiple ack must reach the broker after the individual settlement
//! of any tag below it, or the broker sees that tag settled twice and closes the channel.
//! Settlements therefore hold the lock until lapin has taken their frame.

use std::collections::BTreeSet;
use std::sync::Arc;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use tokio::sync::Mutex;

/// The unsettled deliveries of one consumer channel.
#[derive(Default)]
pub struct ChannelAcks {
    unsettled: Mutex<BTreeSet<u64>>,
}

/// A delivery whose settlement goes through its channel's [`ChannelAcks`]. Reads like the
/// delivery it wraps.
pub struct Tracked {
    delivery: Delivery,
    acks: Arc<ChannelAcks>,
}

impl std::ops::Deref for Tracked {
    type Target = Delivery;
    fn deref(&self) -> &Delivery {
        &self.delivery
    }
}

/// What settling did, for the caller's logs and tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Settled {
    /// Frames sent.
    pub frames: usize,
    /// Deliveries settled.
    pub deliveries: usize,
}

impl ChannelAcks {
    /// Records a delivery as unsettled; called as it arrives, before anything settles it.
    pub async fn track(self: &Arc<Self>, delivery: Delivery) -> Tracked {
        self.unsettled.lock().await.insert(delivery.delivery_tag);
        Tracked { delivery, acks: self.clone() }
    }

    /// Acks `deliveries` (all of this channel): one multiple ack for those that are the
    /// oldest unsettled ones, single acks for the others.
    async fn ack_all(&self, mut deliveries: Vec<Delivery>) -> lapin::Result<Settled> {
        deliveries.sort_by_key(|d| d.delivery_tag);
        let mut unsettled = self.unsettled.lock().await;
        let covered = covered_prefix(&unsettled, deliveries.iter().map(|d| d.delivery_tag));
        let mut settled = Settled { frames: 0, deliveries: deliveries.len() };
        let rest = deliveries.split_off(covered);
        if let Some(last) = deliveries.last() {
            // One frame settles `last` and everything unsettled below it: exactly `deliveries`.
            for d in &deliveries {
                unsettled.remove(&d.delivery_tag);
            }
            last.ack(BasicAckOptions { multiple: true }).await?;
            settled.frames += 1;
        }
        for d in rest {
            unsettled.remove(&d.delivery_tag);
            d.ack(BasicAckOptions::default()).await?;
            settled.frames += 1;
        }
        Ok(settled)
    }
}

impl Tracked {
    /// A delivery of a channel whose settlements are never grouped (the batch-mode chunk
    /// consumer's), for the functions that take a [`Tracked`]. Tracked alone, so it must be
    /// settled only by [`Tracked::ack`], [`Tracked::nack`] or [`Tracked::reject`], never
    /// by [`ack_all`] (whose multiple ack would also cover the channel's other deliveries).
    pub async fn alone(delivery: Delivery) -> Tracked {
        Arc::new(ChannelAcks::default()).track(delivery).await
    }

    /// Acks this delivery alone.
    pub async fn ack(self) -> lapin::Result<()> {
        let mut unsettled = self.acks.unsettled.lock().await;
        unsettled.remove(&self.delivery.delivery_tag);
        self.delivery.ack(BasicAckOptions::default()).await.map(drop)
    }

    /// Negatively acks this delivery, requeueing it or not.
    pub async fn nack(self, requeue: bool) -> lapin::Result<()> {
        let mut unsettled = self.acks.unsettled.lock().await;
        unsettled.remove(&self.delivery.delivery_tag);
        self.delivery.nack(BasicNackOptions { requeue, ..Default::default() }).await.map(drop)
    }

    /// Rejects this delivery without requeueing (the queue's dead-lettering takes it).
    pub async fn reject(self) -> lapin::Result<()> {
        let mut unsettled = self.acks.unsettled.lock().await;
        unsettled.remove(&self.delivery.delivery_tag);
        self.delivery.reject(BasicRejectOptions { requeue: false }).await.map(drop)
    }
}

/// Acks every delivery of `deliveries` with as few frames as is safe, channel by channel.
pub async fn ack_all(deliveries: Vec<Tracked>) -> lapin::Result<Settled> {
    let mut by_channel: Vec<(Arc<ChannelAcks>, Vec<Delivery>)> = Vec::new();
    for t in deliveries {
        match by_channel.iter_mut().find(|(acks, _)| Arc::ptr_eq(acks, &t.acks)) {
            Some((_, list)) => list.push(t.delivery),
            None => by_channel.push((t.acks, vec![t.delivery])),
        }
    }
    let mut total = Settled::default();
    for (acks, list) in by_channel {
        let s = acks.ack_all(list).await?;
        total.frames += s.frames;
        total.deliveries += s.deliveries;
    }
    Ok(total)
}

/// How many of `tags` (ascending) a multiple ack at the last of them may cover: the longest
/// run of them that is also the run of the oldest unsettled tags.
fn covered_prefix(unsettled: &BTreeSet<u64>, tags: impl Iterator<Item = u64>) -> usize {
    unsettled.iter().zip(tags).take_while(|(u, t)| **u == *t).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(tags: &[u64]) -> BTreeSet<u64> {
        tags.iter().copied().collect()
    }

    #[test]
    fn a_multiple_ack_covers_only_the_oldest_unsettled_run() {
        // Everything unsettled is ours: one frame.
        assert_eq!(covered_prefix(&set(&[3, 4, 7]), [3, 4, 7].into_iter()), 3);
        // Gaps in the tags do not matter when the gaps are already settled.
        assert_eq!(covered_prefix(&set(&[3, 7, 9]), [3, 7].into_iter()), 2);
        // An older unsettled delivery that is not ours (5) stops the run before it.
        assert_eq!(covered_prefix(&set(&[3, 4, 5, 6]), [3, 4, 6].into_iter()), 2);
        // The oldest unsettled delivery is someone else's: nothing may be covered.
        assert_eq!(covered_prefix(&set(&[1, 3, 4]), [3, 4].into_iter()), 0);
        assert_eq!(covered_prefix(&set(&[]), std::iter::empty()), 0);
    }
}
