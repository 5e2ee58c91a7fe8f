//! Consuming the items queues over one connection: a channel per provider with
//! `basic_qos` = that provider's in-flight limit, one task per delivery.

use std::collections::BTreeMap;
use std::sync::Arc;

use fleet::metrics::WorkerMetrics;
use fleet::topology::Topology;
use fleet::Config;
use futures::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::Connection;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::acks::ChannelAcks;
use crate::control::{self, Cancelled};
use crate::outbox::Outbox;
use crate::process::{self, Context};
use crate::provider::ProviderClient;

/// What a worker keeps across reconnections.
pub struct Worker {
    pub cfg: Config,
    pub worker_id: String,
    pub topology: Topology,
    pub metrics: WorkerMetrics,
    /// Provider clients by name, with their AMQP prefetch (the in-flight limit plus room
    /// for items that are publishing their result).
    pub clients: BTreeMap<String, (Arc<ProviderClient>, u16)>,
    /// Items in flight; the drain waits for all of them.
    pub in_flight: TaskTracker,
    pub cancelled: Cancelled,
}

/// Consumes every served provider's queue on `conn` until the connection fails (`Err`) or
/// `shutdown` fires (`Ok` once every consumer is cancelled; in-flight tasks keep running
/// in `in_flight`).
pub async fn serve_connection(conn: &Connection, w: &Worker, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let Worker { cfg, worker_id, topology, metrics, clients, in_flight, cancelled } = w;
    let publish = fleet::amqp::confirm_channel(conn).await?;
    topology.declare_common(&publish).await?;
    for name in clients.keys() {
        topology.declare_items_queue(&publish, name).await?;
        topology.declare_delay_queues(&publish, name, &cfg.retry.delay_tiers_s).await?;
        match topology.retire_classic_delay_queues(conn, name, &cfg.retry.delay_tiers_s).await {
            Ok(left) if !left.is_empty() => tracing::info!(
                queues = ?left,
                "classic delay queues of an earlier version still hold items; they flow back to the items queue as they expire"
            ),
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "cannot check for classic delay queues"),
        }
    }
    let ctx = Arc::new(Context {
        worker_id: worker_id.to_string(),
        topology: topology.clone(),
        metrics: metrics.clone(),
        publish,
        max_message_bytes: cfg.amqp.max_message_bytes,
        delivery_limit: cfg.amqp.delivery_limit,
        retry: cfg.retry.clone(),
        cancelled: cancelled.clone(),
        shutdown: shutdown.clone(),
        outbox: Outbox::new(
            cfg.worker.result_group_max,
            std::time::Duration::from_millis(cfg.worker.result_group_linger_ms),
        ),
    });
    // Known cancels first, so no item of a cancelled job reaches a provider.
    let follower = control::Follower::catch_up(conn, topology, cancelled.clone()).await?;
    let mut consumers = tokio::task::JoinSet::new();
    for (name, (client, prefetch)) in clients {
        let ch = conn.create_channel().await?;
        // The broker never hands us more unacked items than the prefetch.
        ch.basic_qos(*prefetch, BasicQosOptions::default()).await?;
        let tag = format!("{worker_id}/{name}");
        let consumer = ch
            .basic_consume(
                topology.items_queue(name).into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let (ctx, client, in_flight, shutdown) = (ctx.clone(), client.clone(), in_flight.clone(), shutdown.clone());
        // Every settlement on this channel goes through it, so acks can be grouped safely.
        let acks = Arc::new(ChannelAcks::default());
        consumers.spawn(async move {
            let mut consumer = consumer;
            let mut cancelling = false;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled(), if !cancelling => {
                        cancelling = true;
                        // Stop new deliveries; the stream ends once the broker confirms, and
                        // whatever arrived before that is still processed.
                        if ch.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await.is_err() {
                            return Ok(());
                        }
                    }
                    next = consumer.next() => match next {
                        Some(Ok(delivery)) => {
                            let delivery = acks.track(delivery).await;
                            // The task holds a handle of the channel: lapin closes a channel
                            // when its last handle drops, which would requeue this delivery
                            // even after the consumer task has finished (during the drain).
                            let (ctx, client, ch) = (ctx.clone(), client.clone(), ch.clone());
                            in_flight.spawn(async move {
                                process::handle(ctx, client, delivery).await;
                                drop(ch);
                            });
                        }
                        Some(Err(e)) => return Err(anyhow::Error::from(e)),
                        None if cancelling => return Ok(()),
                        None => anyhow::bail!("consumer of {} ended unexpectedly", client.name),
                    }
                }
            }
        });
    }
    tracing::info!(providers = clients.len(), "consuming");
    let all_consumers = async {
        while let Some(res) = consumers.join_next().await {
            match res {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(e) => anyhow::bail!("consumer task failed: {e}"),
            }
        }
        Ok(())
    };
    // Cancels are followed for as long as the item consumers run; they decide when this
    // connection is done (a follower failure means the connection failed too).
    tokio::select! {
        res = all_consumers => res,
        res = follower.run() => res,
    }
}
