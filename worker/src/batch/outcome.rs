//! From a provider batch's ending and result lines to one [`ItemResult`] per item of the
//! chunk (and the items that fall back to online calls).
//!
//! | line or ending                          | result                                           |
//! |-----------------------------------------|--------------------------------------------------|
//! | an answer (any HTTP status)             | the response line (succeeded if 2xx, else failed)|
//! | an error without answer                 | failed with the provider's error                 |
//! | expired (line, or no line and the batch expired) | `expired`, or online again with `--fallback online` while the deadline allows |
//! | cancelled (line, or no line and the batch was cancelled) | `cancelled` (`expired` when the job's deadline was the reason) |
//! | no line, batch rejected                 | failed with the provider's reason for its line, or for the batch |
//! | no line, batch completed                | failed (`missing_from_batch_output`)             |
//! | not put in the batch (a url not of the provider, another endpoint) | failed (`not_batchable`) |

use std::collections::{BTreeMap, HashMap};

use fleet::batch::ChunkTask;
use fleet::wire::{error_code, ErrorRecord, Item, ItemResult, ItemStatus};

use super::api::{Ending, LineOutcome};
use super::items::ChunkItems;

/// A result for item `index` of the chunk without a provider answer. An item missing from
/// the job's batch items stream (it should never be) still gets a failed result, under a
/// custom id naming its index, so the job can end.
fn unanswered(
    worker_id: &str,
    task: &ChunkTask,
    items: &BTreeMap<u64, Item>,
    index: u64,
    status: ItemStatus,
    error: ErrorRecord,
) -> ItemResult {
    match items.get(&index) {
        Some(item) => ItemResult::without_answer(item, status, error, worker_id),
        None => ItemResult {
            job_id: task.job_id.clone(),
            index,
            total: task.total,
            custom_id: format!("(item {index}: missing from the job's batch items)"),
            provider: task.provider.clone(),
            status: ItemStatus::Failed,
            response: None,
            error: Some(ErrorRecord {
                code: error_code::MISSING_ITEM.into(),
                message: "the item could not be read".into(),
            }),
            attempts: 0,
            worker: worker_id.to_string(),
            finished_at_ms: fleet::now_ms(),
            request: None,
            usage: None,
        },
    }
}

fn error(code: &str, message: &str) -> ErrorRecord {
    ErrorRecord { code: code.to_string(), message: message.to_string() }
}

/// Every item of a chunk whose batch never ran: `cancelled` or `expired`.
pub(crate) fn all_unrun(worker_id: &str, task: &ChunkTask, chunk: &ChunkItems, status: ItemStatus) -> Vec<ItemResult> {
    let message = match status {
        ItemStatus::Cancelled => "job cancelled before its provider batch was created",
        _ => "job deadline passed before its provider batch was created",
    };
    let items = &chunk.items;
    chunk
        .indices
        .iter()
        .map(|&i| unanswered(worker_id, task, items, i, status, error(status.as_str(), message)))
        .collect()
}

/// Every item of a chunk whose batch the provider refused, failed with its reason.
pub(crate) fn refused(worker_id: &str, task: &ChunkTask, chunk: &ChunkItems, message: &str) -> Vec<ItemResult> {
    let e = error(error_code::BATCH_REJECTED, message);
    let items = &chunk.items;
    chunk.indices.iter().map(|&i| unanswered(worker_id, task, items, i, ItemStatus::Failed, e.clone())).collect()
}

/// The results of an ended batch from its lines; `wanted` says why the job stopped wanting
/// the chunk (cancelled, deadline), if it did. Returns the results and the items to run
/// online instead (`--fallback online`).
pub(crate) fn of_lines(
    worker_id: &str,
    task: &ChunkTask,
    chunk: &ChunkItems,
    unbatchable: &HashMap<u64, String>,
    mut lines: HashMap<u64, LineOutcome>,
    ending: Option<Ending>,
    wanted: Option<ItemStatus>,
) -> (Vec<ItemResult>, Vec<Item>) {
    let items = &chunk.items;
    let ending = ending.unwrap_or(Ending::Completed);
    let rejected_lines: HashMap<u64, &str> = match &ending {
        // Line n of the uploaded file holds the n-th item put in the batch: the items found
        // and batchable, in index order.
        Ending::Rejected { lines, .. } => {
            let uploaded: Vec<u64> = items.keys().copied().filter(|i| !unbatchable.contains_key(i)).collect();
            let item_of_line = |n: u64| uploaded.get(usize::try_from(n.checked_sub(1)?).ok()?).copied();
            lines.iter().filter_map(|(n, m)| Some((item_of_line(*n)?, m.as_str()))).collect()
        }
        _ => HashMap::new(),
    };
    let may_fall_back =
        task.fallback_online && task.deadline_ms.is_none_or(|d| fleet::now_ms() < d) && wanted.is_none();
    let mut results = Vec::with_capacity(task.len() as usize);
    let mut fallback = Vec::new();
    for &index in &chunk.indices {
        if let Some(reason) = unbatchable.get(&index) {
            results.push(unanswered(
                worker_id,
                task,
                items,
                index,
                ItemStatus::Failed,
                error(error_code::NOT_BATCHABLE, reason),
            ));
            continue;
        }
        let line = lines.remove(&index);
        let expired = |fallback: &mut Vec<Item>| -> Option<ItemResult> {
            match items.get(&index) {
                Some(item) if may_fall_back => {
                    let mut again = item.clone();
                    again.attempt = 0;
                    again.first_delay_ms = None;
                    fallback.push(again);
                    None
                }
                _ => Some(unanswered(
                    worker_id,
                    task,
                    items,
                    index,
                    ItemStatus::Expired,
                    error(error_code::EXPIRED, "the provider batch expired before this request ran"),
                )),
            }
        };
        let cancelled = || {
            let (status, message) = match wanted {
                Some(ItemStatus::Expired) => (ItemStatus::Expired, "job deadline passed while its provider batch ran"),
                _ => (ItemStatus::Cancelled, "the provider batch was cancelled before this request ran"),
            };
            unanswered(worker_id, task, items, index, status, error(status.as_str(), message))
        };
        let result = match line {
            Some(LineOutcome::Answered(response)) => Some(match items.get(&index) {
                Some(item) => {
                    let code = response.status_code;
                    let mut r = ItemResult::answered(item, response, worker_id);
                    if r.status == ItemStatus::Failed {
                        r.error = Some(error(error_code::PROVIDER_ERROR, &format!("HTTP {code}")));
                    }
                    // Out of a provider batch: priced at the model's batch factor.
                    r.usage = r
                        .response
                        .as_ref()
                        .and_then(|a| fleet::usage::parse(a.body.get()))
                        .map(|u| fleet::usage::Usage { batch: true, ..u });
                    r
                }
                // The answer of an item the stream no longer holds: `missing_item`.
                None => {
                    unanswered(worker_id, task, items, index, ItemStatus::Failed, error(error_code::MISSING_ITEM, ""))
                }
            }),
            Some(LineOutcome::Errored(e)) => Some(unanswered(worker_id, task, items, index, ItemStatus::Failed, e)),
            Some(LineOutcome::Expired) => expired(&mut fallback),
            Some(LineOutcome::Cancelled) => Some(cancelled()),
            None => match &ending {
                Ending::Completed => Some(unanswered(
                    worker_id,
                    task,
                    items,
                    index,
                    ItemStatus::Failed,
                    error(
                        error_code::MISSING_FROM_BATCH_OUTPUT,
                        "the provider's batch output has no line for this request",
                    ),
                )),
                Ending::Rejected { reason, .. } => {
                    let message = rejected_lines.get(&index).copied().unwrap_or(reason);
                    Some(unanswered(
                        worker_id,
                        task,
                        items,
                        index,
                        ItemStatus::Failed,
                        error(error_code::BATCH_REJECTED, message),
                    ))
                }
                Ending::Expired => expired(&mut fallback),
                Ending::Cancelled => Some(cancelled()),
                // Handled before a fetch (the chunk is created again); should one get here,
                // its items fail rather than hang.
                Ending::QueueFull => Some(unanswered(
                    worker_id,
                    task,
                    items,
                    index,
                    ItemStatus::Failed,
                    error(error_code::BATCH_REJECTED, "the provider's enqueued-token queue was full"),
                )),
            },
        };
        results.extend(result);
    }
    (results, fallback)
}
