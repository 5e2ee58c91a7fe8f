//! Processing one delivery from an items queue: decide (see [`crate::decide`], where every
//! branch is written down and unit-tested), call the provider if the item still needs it,
//! publish the result with a confirm (in a group of its job's results, see
//! [`crate::outbox`]; the broker routes it to the job's results stream and to the ledger),
//! and only then ack. If the result cannot be published the item is requeued, and redone
//! later.

use std::sync::Arc;

use fleet::amqp::{self, PublishError};
use fleet::topology::{DeadLabel, DELAY_TIER_HEADER};
use fleet::wire::{Item, ItemResult, ItemStatus};
use lapin::types::{AMQPValue, FieldTable};

use crate::acks::Tracked;
use crate::answer::CallError;
use crate::context::Context;
use crate::decide::{after_call, decide, unwanted, Decision, Facts, Verdict};
use crate::provider::{ProviderClient, Target};
use crate::settle::{delivery_count, detach_confirm, requeue_after_pause};

/// Handles one delivery to completion. Never panics on bad input; never returns an error:
/// the outcome is always settled on the broker (or left to redelivery if the channel died).
pub async fn handle(ctx: Arc<Context>, client: Arc<ProviderClient>, delivery: Tracked) {
    let facts = Facts {
        provider: &client.name,
        max_message_bytes: ctx.max_message_bytes,
        delivery_limit: ctx.delivery_limit,
        deliveries: delivery_count(&delivery) + 1,
        now_ms: fleet::now_ms(),
        worker_id: &ctx.worker_id,
        cancelled: &ctx.cancelled,
        flex_tier: client.kind().has_flex_tier(),
    };
    let decision = match decide(&delivery.data, &facts, |url| client.target(url)) {
        Verdict::DeadLetter { label, reason } => {
            return ctx.publisher.dead_letter(&client.name, delivery, label, &reason).await
        }
        Verdict::Poison { result, reason } => return poison(&ctx, &client.name, *result, delivery, &reason).await,
        Verdict::Finish(result) => Decision::Finish(result),
        Verdict::Call { item, target } => call(&ctx, &client, *item, &target).await,
    };
    match decision {
        Decision::Finish(result) => publish_and_ack(&ctx, delivery, *result).await,
        Decision::Delay(item, error) => delay(&ctx, &client.name, *item, error, delivery).await,
        Decision::Release => {
            let _ = delivery.nack(true).await;
        }
        Decision::Requeue => requeue_after_pause(delivery).await,
    }
}

/// Calls the provider (with in-process retries) and decides what the outcome means.
async fn call(ctx: &Context, client: &ProviderClient, item: Item, target: &Target) -> Decision {
    // Prefetch is a little larger than the in-flight limit (so publishing and acking never
    // hold back provider calls); an item still waiting for room when shutdown begins has
    // not started, and goes back to the queue instead of being drained.
    let key = tokio::select! {
        biased;
        key = client.keys.room() => key,
        _ = ctx.shutdown.cancelled() => return Decision::Release,
    };
    // The wait for room can be long (a worker holds more items than it calls at once): a
    // cancel (or a spend cap, or the deadline) read meanwhile still stops this item before
    // it costs anything; the client checks again after each wait of its own.
    if let Some(result) = unwanted(&item, &ctx.cancelled, fleet::now_ms(), &ctx.worker_id) {
        if let Some(i) = key {
            client.keys.key(i).limiter.leave_room();
        }
        return Decision::Finish(Box::new(result));
    }
    let in_flight = ctx.publisher.metrics.in_flight.with_label_values(&[&client.name]);
    in_flight.inc();
    let wanted = || unwanted(&item, &ctx.cancelled, fleet::now_ms(), &ctx.worker_id).is_none();
    let outcome = client.execute(&item, target, key, &wanted).await;
    in_flight.dec();
    if matches!(outcome.result, Err(CallError::Unwanted)) {
        if let Some(mut result) = unwanted(&item, &ctx.cancelled, fleet::now_ms(), &ctx.worker_id) {
            result.attempts = outcome.attempts.saturating_sub(1);
            return Decision::Finish(Box::new(result));
        }
    }
    // Tokens are counted by the tracker from the usage each result carries (one parser,
    // `fleet::usage`, online and batch alike): `batch_usage_tokens_total`.
    let decision = after_call(item, outcome, &ctx.retry, &ctx.worker_id, fleet::now_ms());
    if let Decision::Finish(r) = &decision {
        if let (ItemStatus::Failed, Some(error)) = (r.status, &r.error) {
            tracing::info!(job_id = %r.job_id, custom_id = %r.custom_id, error = %error.message, attempts = r.attempts, "item failed");
        }
    }
    decision
}

/// The one way a finished item leaves the worker: publishes its result (grouped with other
/// results of its job, confirmed), then acks its delivery, then counts it. Returns once the
/// delivery is settled: acked; dead-lettered if the job's results stream is gone; or
/// requeued if the result could not be published (redone later).
pub async fn publish_and_ack(ctx: &Context, delivery: Tracked, result: ItemResult) {
    ctx.outbox.send(&ctx.publisher, delivery, result).await;
}

/// Sends a transiently failing item to the delay queue of its attempt, then acks it.
async fn delay(ctx: &Context, provider: &str, mut item: Item, error: CallError, delivery: Tracked) {
    let tiers = &ctx.retry.delay_tiers_s;
    let secs = tiers[(item.attempt as usize).min(tiers.len() - 1)];
    item.attempt += 1;
    item.first_delay_ms.get_or_insert(fleet::now_ms());
    tracing::info!(job_id = %item.job_id, custom_id = %item.custom_id, error = %error, delay_s = secs, attempt = item.attempt, "provider still failing; delaying item");
    let payload = serde_json::to_vec(&item).expect("items serialize");
    // An item of a job's own queue waits in the shared tiers and comes back to that queue
    // (routed by its job id); one of the provider's queue in the provider's tiers.
    let published = if delivery.exchange.as_str() == ctx.publisher.topology.jobs_exchange() {
        let mut headers = FieldTable::default();
        headers.insert(DELAY_TIER_HEADER.into(), AMQPValue::LongString(secs.to_string().into()));
        let props = amqp::persistent_json().with_headers(headers);
        ctx.publisher.publish_confirmed(&ctx.publisher.topology.delay_exchange(), &item.job_id, &payload, props).await
    } else {
        let queue = ctx.publisher.topology.delay_queue(provider, secs);
        ctx.publisher.publish_confirmed("", &queue, &payload, amqp::persistent_json()).await
    };
    match published {
        Ok(()) => {
            ctx.publisher.metrics.retries.with_label_values(&[provider, "delay", error.kind()]).inc();
            note_delay(ctx, &item, &error).await;
            if let Err(e) = delivery.ack().await {
                tracing::warn!(error = %e, "ack failed after delaying; the item may run twice");
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot publish to the delay queue; requeueing the item");
            // The delay tiers are the fleet's own: one that routes nowhere lost a binding,
            // which a new connection declares again.
            if matches!(e, PublishError::Unroutable { .. }) {
                ctx.publisher.give_up("a delay tier routes nowhere");
            }
            requeue_after_pause(delivery).await;
        }
    }
}

/// Tells the tracker an item waits in a delay queue and why, so `producer status` can say
/// what a slow job is waiting for. Informational: not confirmed, and a lost note only
/// leaves the status less detailed.
async fn note_delay(ctx: &Context, item: &Item, error: &CallError) {
    let event = fleet::wire::LedgerEvent::ItemDelayed {
        job_id: item.job_id.clone(),
        provider: item.provider.clone(),
        index: item.index,
        error: error.to_string(),
    };
    let payload = serde_json::to_vec(&event).expect("events serialize");
    let queue = ctx.publisher.topology.ledger_queue();
    match ctx.publisher.publish("", &queue, &payload, amqp::persistent_json()).await {
        Ok(pending) => detach_confirm(pending),
        Err(e) => tracing::debug!(error = %e, "cannot note a delay on the ledger"),
    }
}

/// An item that has been delivered more than the delivery limit allows: it keeps killing
/// workers. Its job gets the failed result (so the job can finish) and the message is parked.
async fn poison(ctx: &Context, provider: &str, result: ItemResult, delivery: Tracked, reason: &str) {
    if let Err(e) = ctx.publisher.outcome(&result).await {
        tracing::warn!(error = %e, "cannot publish the poison result; parking the item anyway");
    } else {
        ctx.publisher.metrics.items.with_label_values(&[provider, "failed"]).inc();
    }
    ctx.publisher.dead_letter(provider, delivery, DeadLabel::Poison, reason).await;
}
