//! Processing one delivery from an items queue: parse, call the provider, publish the
//! result and the ledger event with confirms, and only then ack.
//!
//! Every delivery ends in an explicit decision: ack (result published), dead-letter with a
//! reason (garbage), or nack-requeue (we could not publish; someone will redo it).

use std::sync::Arc;

use fleet::amqp::{self, PublishError};
use fleet::metrics::WorkerMetrics;
use fleet::topology::{Topology, DEAD_REASON_HEADER};
use fleet::wire::{Item, ItemResult, ItemStatus, LedgerEvent, KIND_RESULT};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Channel;

use crate::provider::ProviderClient;

/// What every delivery handler shares.
pub struct Context {
    pub worker_id: String,
    pub topology: Topology,
    pub metrics: WorkerMetrics,
    /// Confirm-mode channel for results, ledger events and dead letters.
    pub publish: Channel,
    pub max_message_bytes: usize,
}

/// Handles one delivery to completion. Never panics on bad input; never returns an error:
/// the outcome is always settled on the broker (or left to redelivery if the channel died).
pub async fn handle(ctx: Arc<Context>, client: Arc<ProviderClient>, delivery: Delivery) {
    if delivery.data.len() > ctx.max_message_bytes {
        let reason = format!(
            "oversized: {} bytes > {}",
            delivery.data.len(),
            ctx.max_message_bytes
        );
        return dead_letter(&ctx, &client.name, delivery, "oversized", &reason).await;
    }
    let item: Item = match serde_json::from_slice(&delivery.data) {
        Ok(item) => item,
        Err(e) => {
            let reason = format!("malformed item: {e}");
            return dead_letter(&ctx, &client.name, delivery, "malformed", &reason).await;
        }
    };
    if item.provider != client.name {
        let reason = format!(
            "item for provider {:?} on the queue of {:?}",
            item.provider, client.name
        );
        return dead_letter(&ctx, &client.name, delivery, "malformed", &reason).await;
    }

    let in_flight = ctx.metrics.in_flight.with_label_values(&[&client.name]);
    in_flight.inc();
    let outcome = client.execute(&item).await;
    in_flight.dec();

    let mut result = ItemResult {
        job_id: item.job_id.clone(),
        index: item.index,
        total: item.total,
        custom_id: item.custom_id.clone(),
        provider: item.provider.clone(),
        status: ItemStatus::Succeeded,
        response: None,
        error: None,
        attempts: outcome.attempts,
        worker: ctx.worker_id.clone(),
        finished_at_ms: fleet::now_ms(),
    };
    let mut tokens = (0, 0);
    match outcome.result {
        Ok(success) => {
            result.response = success.answer.to_record();
            tokens = (success.prompt_tokens, success.completion_tokens);
        }
        Err(e) => {
            result.status = ItemStatus::Failed;
            result.response = e.answer().and_then(|a| a.to_record());
            result.error = Some(e.to_record());
            tracing::info!(job_id = %item.job_id, custom_id = %item.custom_id, error = %e, attempts = outcome.attempts, "item failed");
        }
    }

    match publish_outcome(&ctx, &result).await {
        Ok(()) => {}
        Err(PublishError::Unroutable { .. }) => {
            // The job's results queue is gone (deleted or expired): nobody can receive this
            // result. Park the item with the reason rather than drop it.
            let reason = format!("results queue of job {} does not exist", item.job_id);
            return dead_letter(&ctx, &client.name, delivery, "no_results_queue", &reason).await;
        }
        Err(e) => {
            tracing::warn!(job_id = %item.job_id, custom_id = %item.custom_id, error = %e, "cannot publish result; item will be redelivered");
            let _ = delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await;
            return;
        }
    }
    if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
        // The result is out; a redelivery will publish a duplicate, which collectors drop.
        tracing::warn!(job_id = %item.job_id, custom_id = %item.custom_id, error = %e, "ack failed after publishing the result");
        return;
    }
    // Counted after the ack so that the fleet's counters equal the results delivered.
    ctx.metrics
        .items
        .with_label_values(&[&client.name, result.status.as_str()])
        .inc();
    if tokens.0 + tokens.1 > 0 {
        ctx.metrics
            .tokens
            .with_label_values(&[&client.name, "prompt"])
            .inc_by(tokens.0);
        ctx.metrics
            .tokens
            .with_label_values(&[&client.name, "completion"])
            .inc_by(tokens.1);
    }
}

/// Publishes the result to the job's results queue and the event to the ledger, both
/// confirmed. Both publishes go out before either confirm is awaited.
pub async fn publish_outcome(ctx: &Context, result: &ItemResult) -> Result<(), PublishError> {
    let payload = serde_json::to_vec(result).expect("results serialize");
    let event = LedgerEvent::ItemsFinished {
        job_id: result.job_id.clone(),
        provider: result.provider.clone(),
        items: vec![(result.index, result.status)],
    };
    let event = serde_json::to_vec(&event).expect("events serialize");
    let props = amqp::persistent_json().with_type(KIND_RESULT.into());
    let result_confirm = amqp::publish(
        &ctx.publish,
        &ctx.topology.results_exchange(),
        &result.job_id,
        &payload,
        props,
    )
    .await?;
    let ledger_confirm = amqp::publish(
        &ctx.publish,
        "",
        &ctx.topology.ledger_queue(),
        &event,
        amqp::persistent_json(),
    )
    .await?;
    result_confirm.wait().await?;
    ledger_confirm.wait().await
}

/// Parks a message in the dead-letter queue with a reason header, then acks it. If that
/// publish fails, rejects it instead so the queue's own dead-lettering parks it.
pub async fn dead_letter(
    ctx: &Context,
    provider: &str,
    delivery: Delivery,
    label: &'static str,
    reason: &str,
) {
    tracing::warn!(
        provider,
        reason,
        bytes = delivery.data.len(),
        "dead-lettering message"
    );
    let mut headers = FieldTable::default();
    headers.insert(
        DEAD_REASON_HEADER.into(),
        AMQPValue::LongString(reason.into()),
    );
    headers.insert(
        "x-fleet-queue".into(),
        AMQPValue::LongString(ctx.topology.items_queue(provider).into()),
    );
    let props = amqp::persistent_json().with_headers(headers);
    let published = amqp::publish_confirmed(
        &ctx.publish,
        &ctx.topology.dead_exchange(),
        "",
        &delivery.data,
        props,
    )
    .await;
    ctx.metrics.dead_letters.with_label_values(&[label]).inc();
    ctx.metrics
        .errors
        .with_label_values(&[provider, "malformed_message", "consume"])
        .inc();
    let settled = match published {
        Ok(()) => delivery.ack(BasicAckOptions::default()).await,
        Err(e) => {
            tracing::warn!(error = %e, "dead-letter publish failed; rejecting to the queue's dead-letter exchange");
            delivery.reject(BasicRejectOptions { requeue: false }).await
        }
    };
    if let Err(e) = settled {
        tracing::warn!(error = %e, "cannot settle dead-lettered message; it will be redelivered");
    }
}
