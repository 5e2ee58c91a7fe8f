//! Items that end in the dead-letter queue without a result.
//!
//! The dead exchange also routes to the ledger, so the tracker sees every message that is
//! dead-lettered: by a worker (with its reason in `x-fleet-reason`) or by the broker itself
//! (delivery limit, rejection; the reason in `x-death`): see [`fleet::topology::dead_reason`]. An item whose index has no result
//! yet gets a failed result with code `dead_lettered`, published like any worker's result
//! (to the job's results stream and back to the ledger), so the job ends and `wait` writes
//! the line. Garbage that is not an item is left to `producer dead`.

use fleet::wire::{ErrorRecord, Item, ItemResult, ItemStatus};
use lapin::message::Delivery;

/// Error code of the result given to an item that was dead-lettered without one.
pub const DEAD_LETTERED: &str = "dead_lettered";

/// The item a dead-lettered message carries, if it is one within the bounds every worker
/// checks ([`Item::check`]).
pub fn dead_item(delivery: &Delivery) -> Option<Item> {
    let item: Item = serde_json::from_slice(&delivery.data).ok()?;
    item.check().is_ok().then_some(item)
}

/// The failed result of a dead-lettered item.
pub fn failed_result(item: &Item, reason: &str, tracker: &str) -> ItemResult {
    let error = ErrorRecord { code: DEAD_LETTERED.into(), message: reason.to_string() };
    ItemResult::without_answer(item, ItemStatus::Failed, error, tracker)
}
