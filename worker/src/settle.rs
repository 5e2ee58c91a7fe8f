//! Every way a delivery leaves the worker besides its result group ([`crate::outbox`]):
//! parked in the dead-letter queue with a reason, its outcome published alone, or requeued
//! after a pause. Plus the one place a confirm is waited for off the caller's path.
//!
//! The rooms above (the online handler, the outbox, batch mode, the tracker) settle through
//! these and a [`Publisher`], so each rule is written once: a dead letter is confirmed
//! before its delivery is acked (and rejected to the queue's own dead-lettering when that
//! publish fails); a requeue waits a moment first, so a broker that refuses publishes does
//! not turn a delivery into a hot loop.
//!
//! Every publish of the worker goes through [`Publisher::publish`]. When the broker closes
//! the publish channel (a publish to an exchange that is gone, a message over its
//! `max_message_size`), nothing published on it can succeed again: the publisher says so
//! once ([`Publisher::lost`]), and the connection is given up and made anew, with a fresh
//! channel and the topology declared again. What failed meanwhile is redelivered once.

use std::time::Duration;

use fleet::amqp::{self, PendingConfirm, PublishError};
use fleet::metrics::WorkerMetrics;
use fleet::topology::{DeadLabel, Topology, DEAD_LABEL_HEADER, DEAD_REASON_HEADER};
use fleet::wire::{ItemResult, KIND_RESULT};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use tokio_util::sync::CancellationToken;

use crate::acks::Tracked;

/// How long a delivery that could not be settled waits before it is requeued.
pub const REQUEUE_PAUSE: Duration = Duration::from_secs(1);

/// What publishing from a worker needs: the confirm-mode channel, the names, the counters.
pub struct Publisher {
    /// Confirm-mode channel for results, delays and dead letters.
    channel: Channel,
    /// The namespace's names: where results, delays and dead letters go.
    pub topology: Topology,
    /// Counters of what was published, settled or parked.
    pub metrics: WorkerMetrics,
    /// Fired once the connection must be given up, with why.
    lost: CancellationToken,
    why: std::sync::OnceLock<String>,
}

impl Publisher {
    /// A publisher on `channel` (in confirm mode).
    pub fn new(channel: Channel, topology: Topology, metrics: WorkerMetrics) -> Publisher {
        Publisher { channel, topology, metrics, lost: CancellationToken::new(), why: std::sync::OnceLock::new() }
    }

    /// Resolves once the connection must be made anew (see the module header), with why.
    pub async fn lost(&self) -> String {
        self.lost.cancelled().await;
        self.why.get().cloned().unwrap_or_default()
    }

    /// Starts a mandatory publish (see [`fleet::amqp::publish`]); a failure that left the
    /// channel closed fires [`Publisher::lost`].
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        props: BasicProperties,
    ) -> Result<PendingConfirm, PublishError> {
        let started = amqp::publish(&self.channel, exchange, routing_key, payload, props).await;
        if started.is_err() {
            self.check_channel();
        }
        started
    }

    /// Publishes and waits for the broker's confirm; a failure that left the channel
    /// closed fires [`Publisher::lost`].
    pub async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        props: BasicProperties,
    ) -> Result<(), PublishError> {
        let confirmed = self.publish(exchange, routing_key, payload, props).await?.wait().await;
        if confirmed.is_err() {
            self.check_channel();
        }
        confirmed
    }

    /// Fires [`Publisher::lost`] (once, with a WARN) when the channel is no longer open.
    fn check_channel(&self) {
        if !self.channel.status().connected() {
            self.give_up("the broker closed the publish channel");
        }
    }

    /// Gives up this connection (once, with a WARN saying `why`): the channel is closed, or
    /// the fleet's own topology is missing a part a new connection declares again (a
    /// delay tier's binding).
    pub fn give_up(&self, why: &str) {
        if self.why.set(why.to_string()).is_ok() {
            tracing::warn!("{why}; reconnecting");
            self.lost.cancel();
        }
    }

    /// Publishes one result alone (routed to the job's results stream and to the ledger)
    /// and waits for the broker's confirm. For results that do not go through a group: the
    /// poison path, which parks its item right after, and batch mode's fetched chunks.
    pub async fn outcome(&self, result: &ItemResult) -> Result<(), PublishError> {
        let payload = serde_json::to_vec(result).expect("results serialize");
        let props = amqp::persistent_json().with_type(KIND_RESULT.into());
        let exchange = self.topology.results_exchange();
        self.publish_confirmed(&exchange, &result.job_id, &payload, props).await
    }

    /// Parks a message in the dead-letter queue with a reason header, then acks it. If that
    /// publish fails, rejects it instead so the queue's own dead-lettering parks it.
    pub async fn dead_letter(&self, provider: &str, delivery: Tracked, label: DeadLabel, reason: &str) {
        tracing::warn!(provider, reason, bytes = delivery.data.len(), "dead-lettering message");
        let mut headers = FieldTable::default();
        headers.insert(DEAD_REASON_HEADER.into(), AMQPValue::LongString(reason.into()));
        headers.insert(DEAD_LABEL_HEADER.into(), AMQPValue::LongString(label.as_str().into()));
        headers.insert("x-fleet-queue".into(), AMQPValue::LongString(self.topology.items_queue(provider).into()));
        headers.insert("x-fleet-provider".into(), AMQPValue::LongString(provider.into()));
        let props = amqp::persistent_json().with_headers(headers);
        let exchange = self.topology.dead_exchange();
        let published = self.publish_confirmed(&exchange, "", &delivery.data, props).await;
        self.metrics.dead_letters.with_label_values(&[label.as_str()]).inc();
        if label.is_bad_message() {
            self.metrics.errors.with_label_values(&[provider, "malformed_message", "consume"]).inc();
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
}

/// Requeues a delivery whose outcome could not be published, after [`REQUEUE_PAUSE`]:
/// whatever failed (a broker alarm, a lost channel) is given a moment before the delivery
/// comes back, so an outage does not become a hot loop.
pub async fn requeue_after_pause(delivery: Tracked) {
    tokio::time::sleep(REQUEUE_PAUSE).await;
    let _ = delivery.nack(true).await;
}

/// Waits for a publish's confirm in a task of its own, for messages whose loss costs only
/// detail or time (notes to the tracker, control messages): the caller goes on at once.
pub fn detach_confirm(pending: PendingConfirm) {
    tokio::spawn(async move {
        let _ = pending.wait().await;
    });
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
