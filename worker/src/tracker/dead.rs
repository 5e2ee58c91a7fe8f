//! Items that end in the dead-letter queue without a result.
//!
//! The dead exchange also routes to the ledger, so the tracker sees every message that is
//! dead-lettered: by a worker (with its reason in `x-fleet-reason`) or by the broker itself
//! (delivery limit, rejection; the reason in `x-death`): see [`fleet::topology::dead_reason`]. An item whose index has no result
//! yet gets a failed result with code `dead_lettered`, published like any worker's result
//! (to the job's results stream and back to the ledger), so the job ends and `wait` writes
//! the line. Garbage that is not an item is left to `producer dead`, and so is an item a
//! worker refused as `malformed` or `forbidden_url` ([`fleet::topology::DeadLabel::is_suspect`]):
//! the producer never publishes one, so it is not the job's own item, and its result would
//! claim a real item's index under a `custom_id` of its sender's choosing (the job's real
//! item there still gets its answer).

use anyhow::Context as _;
use fleet::amqp;
use fleet::wire::{error_code, ErrorRecord, Item, ItemResult, ItemStatus, KIND_RESULT};
use lapin::message::Delivery;

use super::active::Active;

/// The item a dead-lettered message carries, if it is one within the bounds every worker
/// checks ([`Item::check`]) and not a suspect one ([`fleet::topology::dead_suspect`]).
pub fn dead_item(delivery: &Delivery) -> Option<Item> {
    if fleet::topology::dead_suspect(&delivery.properties) {
        return None;
    }
    let item: Item = serde_json::from_slice(&delivery.data).ok()?;
    item.check().is_ok().then_some(item)
}

/// The failed result of a dead-lettered item.
pub fn failed_result(item: &Item, reason: &str, tracker: &str) -> ItemResult {
    let error = ErrorRecord { code: error_code::DEAD_LETTERED.into(), message: reason.to_string() };
    ItemResult::without_answer(item, ItemStatus::Failed, error, tracker)
}

impl Active<'_> {
    /// Gives a dead-lettered item that has no result a failed one. The publish is confirmed
    /// before the ledger message can be acked: a tracker that dies first sees the dead copy
    /// again, and a second result is dropped as a duplicate.
    pub(super) async fn end_dead_item(&self, delivery: &Delivery) -> anyhow::Result<()> {
        let Some(item) = dead_item(delivery) else {
            return Ok(()); // not an item, or a suspect one: `producer dead` shows it
        };
        if self.state.has_result(&item.job_id, item.index) {
            return Ok(()); // e.g. a poison item: its worker published the result first
        }
        let reason = fleet::topology::dead_reason(&delivery.properties);
        tracing::info!(job_id = %item.job_id, custom_id = %item.custom_id, reason = %reason, "ending a dead-lettered item as failed");
        let result = failed_result(&item, &reason, &self.worker_id);
        let payload = serde_json::to_vec(&result)?;
        let props = amqp::persistent_json().with_type(KIND_RESULT.into());
        amqp::publish_confirmed(&self.ch, &self.topology.results_exchange(), &item.job_id, &payload, props)
            .await
            .context("publishing the result of a dead-lettered item")
    }
}
