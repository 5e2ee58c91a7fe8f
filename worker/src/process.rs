//! Processing one delivery from an items queue: decide (see [`crate::decide`], where every
//! branch is written down and unit-tested), call the provider if the item still needs it,
//! publish the result with a confirm (in a group of its job's results, see
//! [`crate::outbox`]; the broker routes it to the job's results stream and to the ledger),
//! and only then ack. If the result cannot be published the item is requeued, and redone
//! later.

use std::sync::Arc;
use std::time::Duration;

use fleet::amqp::{self, PublishError};
use fleet::config::RetryConfig;
use fleet::metrics::WorkerMetrics;
use fleet::topology::{Topology, DEAD_LABEL_HEADER, DEAD_REASON_HEADER, DELAY_TIER_HEADER};
use fleet::wire::{Item, ItemResult, ItemStatus, KIND_RESULT};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Channel;

use crate::acks::Tracked;
use crate::control::Cancelled;
use crate::decide::{after_call, cancelled_result, decide, Decision, Facts, Verdict};
use crate::outbox::Outbox;
use crate::provider::{CallError, ProviderClient, Target};

/// What every delivery handler shares.
pub struct Context {
    pub worker_id: String,
    pub topology: Topology,
    pub metrics: WorkerMetrics,
    /// Confirm-mode channel for results, delays and dead letters.
    pub publish: Channel,
    pub max_message_bytes: usize,
    pub delivery_limit: u32,
    pub retry: RetryConfig,
    pub cancelled: Cancelled,
    /// Fired at SIGTERM: items that have not started calling the provider are released.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Groups results of one job into one message (on `publish`).
    pub outbox: Outbox,
}

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
    };
    let decision = match decide(&delivery.data, &facts, |url| client.target(url)) {
        Verdict::DeadLetter { label, reason } => {
            return dead_letter(&ctx, &client.name, delivery, label, &reason).await
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
    // cancel (or a spend cap) read meanwhile still stops this item before it costs anything.
    if ctx.cancelled.contains(&item.job_id) {
        if let Some(i) = key {
            client.keys.key(i).limiter.leave_room();
        }
        return Decision::Finish(Box::new(cancelled_result(&item, &ctx.cancelled, &ctx.worker_id)));
    }
    let in_flight = ctx.metrics.in_flight.with_label_values(&[&client.name]);
    in_flight.inc();
    let outcome = client.execute(&item, target, key).await;
    in_flight.dec();
    if let Ok(success) = &outcome.result {
        let tokens = [("prompt", success.prompt_tokens), ("completion", success.completion_tokens)];
        for (kind, n) in tokens.into_iter().filter(|(_, n)| *n > 0) {
            ctx.metrics.tokens.with_label_values(&[&client.name, kind]).inc_by(n);
        }
    }
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
    ctx.outbox.send(ctx, delivery, result).await;
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
    let published = if delivery.exchange.as_str() == ctx.topology.jobs_exchange() {
        let mut headers = FieldTable::default();
        headers.insert(DELAY_TIER_HEADER.into(), AMQPValue::LongString(secs.to_string().into()));
        let props = amqp::persistent_json().with_headers(headers);
        amqp::publish_confirmed(&ctx.publish, &ctx.topology.delay_exchange(), &item.job_id, &payload, props).await
    } else {
        let queue = ctx.topology.delay_queue(provider, secs);
        amqp::publish_confirmed(&ctx.publish, "", &queue, &payload, amqp::persistent_json()).await
    };
    match published {
        Ok(()) => {
            ctx.metrics.retries.with_label_values(&[provider, "delay", error.kind()]).inc();
            note_delay(ctx, &item, &error).await;
            if let Err(e) = delivery.ack().await {
                tracing::warn!(error = %e, "ack failed after delaying; the item may run twice");
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot publish to the delay queue; requeueing the item");
            // Requeue after a pause so an outage does not turn into a hot loop.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = delivery.nack(true).await;
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
    let queue = ctx.topology.ledger_queue();
    match amqp::publish(&ctx.publish, "", &queue, &payload, amqp::persistent_json()).await {
        Ok(pending) => {
            tokio::spawn(async move {
                let _ = pending.wait().await;
            });
        }
        Err(e) => tracing::debug!(error = %e, "cannot note a delay on the ledger"),
    }
}

/// An item that has been delivered more than the delivery limit allows: it keeps killing
/// workers. Its job gets the failed result (so the job can finish) and the message is parked.
async fn poison(ctx: &Context, provider: &str, result: ItemResult, delivery: Tracked, reason: &str) {
    if let Err(e) = publish_outcome(ctx, &result).await {
        tracing::warn!(error = %e, "cannot publish the poison result; parking the item anyway");
    } else {
        ctx.metrics.items.with_label_values(&[provider, "failed"]).inc();
    }
    dead_letter(ctx, provider, delivery, "poison", reason).await;
}

/// Times this message was delivered before (quorum queues count in `x-delivery-count`).
pub fn delivery_count(delivery: &lapin::message::Delivery) -> u64 {
    let Some(headers) = delivery.properties.headers() else { return 0 };
    match headers.inner().get("x-delivery-count") {
        Some(AMQPValue::LongLongInt(n)) => (*n).max(0) as u64,
        Some(AMQPValue::LongInt(n)) => (*n).max(0) as u64,
        Some(AMQPValue::LongUInt(n)) => u64::from(*n),
        Some(AMQPValue::ShortInt(n)) => (*n).max(0) as u64,
        Some(AMQPValue::ShortShortInt(n)) => (*n).max(0) as u64,
        Some(AMQPValue::ShortShortUInt(n)) => u64::from(*n),
        _ => 0,
    }
}

/// Publishes one result alone (routed to the job's results stream and to the ledger) and
/// waits for the broker's confirm. For the
/// poison path, which parks its item right after; finished items go through
/// [`publish_and_ack`].
pub async fn publish_outcome(ctx: &Context, result: &ItemResult) -> Result<(), PublishError> {
    let payload = serde_json::to_vec(result).expect("results serialize");
    let props = amqp::persistent_json().with_type(KIND_RESULT.into());
    amqp::publish(&ctx.publish, &ctx.topology.results_exchange(), &result.job_id, &payload, props).await?.wait().await
}

/// Parks a message in the dead-letter queue with a reason header, then acks it. If that
/// publish fails, rejects it instead so the queue's own dead-lettering parks it.
pub async fn dead_letter(ctx: &Context, provider: &str, delivery: Tracked, label: &'static str, reason: &str) {
    tracing::warn!(provider, reason, bytes = delivery.data.len(), "dead-lettering message");
    let mut headers = FieldTable::default();
    headers.insert(DEAD_REASON_HEADER.into(), AMQPValue::LongString(reason.into()));
    headers.insert(DEAD_LABEL_HEADER.into(), AMQPValue::LongString(label.into()));
    headers.insert("x-fleet-queue".into(), AMQPValue::LongString(ctx.topology.items_queue(provider).into()));
    headers.insert("x-fleet-provider".into(), AMQPValue::LongString(provider.into()));
    let props = amqp::persistent_json().with_headers(headers);
    let published =
        amqp::publish_confirmed(&ctx.publish, &ctx.topology.dead_exchange(), "", &delivery.data, props).await;
    ctx.metrics.dead_letters.with_label_values(&[label]).inc();
    if matches!(label, "malformed" | "oversized") {
        ctx.metrics.errors.with_label_values(&[provider, "malformed_message", "consume"]).inc();
    }
    let settled = match published {
        Ok(()) => delivery.ack().await,
        Err(e) => {
            tracing::warn!(error = %e, "dead-letter publish failed; rejecting to the queue's dead-letter exchange");
            delivery.reject().await
        }
    };
    if let Err(e) = settled {
        tracing::warn!(error = %e, "cannot settle dead-lettered message; it will be redelivered");
    }
}
