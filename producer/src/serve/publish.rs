//! Publishing a batch's job from its stored file, as `producer submit` publishes one from
//! a local file and in the same order: the job's queues first, `job_submitted` on the
//! ledger, `job_opened` on the control stream, every item (confirmed, a window at a time),
//! then `submission_complete`. A replica killed half-way leaves a job the tracker ends
//! `failed` (`incomplete_submission`) after `producer.submit_timeout_s`, and no batch
//! record: the batch record is written only once its job is fully published. A retry with
//! the same `Idempotency-Key` publishes the same job id again; the fleet drops duplicate
//! items by (job, index).

use std::collections::VecDeque;

use fleet::amqp;
use fleet::wire::{ControlMessage, Item, LedgerEvent};

use super::error::ApiError;
use super::store::{FileRecord, Store};
use super::upload::{self, LineRules};

/// What the job is.
pub(crate) struct JobPlan<'a> {
    pub job_id: &'a str,
    pub provider: &'a str,
    pub file: &'a FileRecord,
    pub submitted_at_ms: u64,
    pub deadline_ms: Option<u64>,
    /// Publishes awaiting a confirm at once (`producer.confirm_window`).
    pub window: usize,
}

/// Publishes the job of `plan` (online mode: one call per request).
pub(crate) async fn publish(store: &Store, rules: &LineRules, plan: &JobPlan<'_>) -> Result<(), ApiError> {
    let t = &store.topology;
    let ch = store.broker.confirm_channel().await?;
    t.declare_common(&ch).await?;
    t.declare_items_queue(&ch, plan.provider).await?;
    t.declare_job_items_queue(&ch, plan.provider, plan.job_id).await?;
    t.declare_results_queue(&ch, plan.job_id).await?;
    let submitted = LedgerEvent::JobSubmitted {
        job_id: plan.job_id.to_string(),
        provider: plan.provider.to_string(),
        total: plan.file.lines,
        submitted_at_ms: plan.submitted_at_ms,
        deadline_ms: plan.deadline_ms,
        submitting: true,
        max_cost: None,
        webhook_url: None,
    };
    amqp::publish_confirmed(&ch, "", &t.ledger_queue(), &to_json(&submitted)?, amqp::persistent_json()).await?;
    let opened = ControlMessage::JobOpened {
        job_id: plan.job_id.to_string(),
        provider: plan.provider.to_string(),
        priority: fleet::wire::DEFAULT_PRIORITY,
    };
    amqp::publish_confirmed(&ch, "", &t.control_stream(), &to_json(&opened)?, amqp::persistent_json()).await?;

    let exchange = t.jobs_exchange();
    let mut confirms: VecDeque<amqp::PendingConfirm> = VecDeque::new();
    let mut index = 0u64;
    let mut payload = Vec::with_capacity(4096);
    let mut reader = upload::FileReader::open(store, plan.file).await?;
    while let Some(chunk) = reader.next().await? {
        for raw in chunk.split(|&b| b == b'\n') {
            // Checked when stored; checked again, as `submit` does on its second read.
            let line = rules.check(raw).map_err(|e| ApiError::unavailable(format!("stored line changed: {e}")))?;
            let item = Item {
                job_id: plan.job_id.to_string(),
                index,
                total: plan.file.lines,
                custom_id: line.custom_id,
                provider: plan.provider.to_string(),
                url: line.url,
                body: line.body,
                attempt: 0,
                submitted_at_ms: plan.submitted_at_ms,
                deadline_ms: plan.deadline_ms,
                first_delay_ms: None,
                flex: false,
            };
            index += 1;
            payload.clear();
            serde_json::to_writer(&mut payload, &item).map_err(ApiError::unavailable)?;
            while confirms.len() >= plan.window.max(1) {
                if let Some(c) = confirms.pop_front() {
                    c.wait().await?;
                }
            }
            confirms.push_back(amqp::publish(&ch, &exchange, plan.job_id, &payload, amqp::persistent_json()).await?);
        }
    }
    reader.close().await;
    while let Some(c) = confirms.pop_front() {
        c.wait().await?;
    }
    let done = LedgerEvent::SubmissionComplete { job_id: plan.job_id.to_string() };
    amqp::publish_confirmed(&ch, "", &t.ledger_queue(), &to_json(&done)?, amqp::persistent_json()).await?;
    let _ = ch.close(200, "published".into()).await;
    Ok(())
}

fn to_json(v: &impl serde::Serialize) -> Result<Vec<u8>, ApiError> {
    serde_json::to_vec(v).map_err(ApiError::unavailable)
}
