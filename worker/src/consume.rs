//! Consuming the items queues over one connection: a channel per provider with
//! `basic_qos` = that provider's in-flight limit, one task per delivery; and, beside each
//! provider's own queue, the per-job queues of its open jobs ([`crate::jobs`]).

use std::sync::Arc;

use lapin::Connection;
use tokio_util::sync::CancellationToken;

use crate::context::{Context, Worker};
use crate::control;
use crate::jobs::{self, ProviderJobs};
use crate::outbox::Outbox;
use crate::settle::Publisher;

/// Consumes every served provider's queue on `conn` until the connection fails (`Err`) or
/// `shutdown` fires (`Ok` once every consumer is cancelled; in-flight tasks keep running
/// in `in_flight`).
pub async fn serve_connection(conn: &Arc<Connection>, w: &Worker, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let Worker { cfg, worker_id, topology, metrics, clients, in_flight, cancelled, open_jobs, probe, .. } = w;
    let publish = fleet::amqp::confirm_channel(conn).await?;
    topology.declare_common(&publish).await?;
    topology.declare_job_delay_queues(&publish, &cfg.retry.delay_tiers_s).await?;
    for name in clients.keys() {
        topology.declare_items_queue(&publish, name).await?;
        topology.declare_delay_queues(&publish, name, &cfg.retry.delay_tiers_s).await?;
        // Mostly absent: asked on the probe connection, so no channel of ours is refused.
        match topology.retire_classic_delay_queues(&*probe.connection().await?, name, &cfg.retry.delay_tiers_s).await {
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
        publisher: Publisher::new(publish, topology.clone(), metrics.clone()),
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
    let follower = control::Follower::catch_up(conn, topology, cancelled.clone(), open_jobs.clone()).await?;
    let mut consumers = tokio::task::JoinSet::new();
    let mut job_servers = Vec::new();
    for (client, prefetch) in clients.values() {
        consumers.spawn(jobs::serve_provider_queue(
            conn.clone(),
            ctx.clone(),
            client.clone(),
            *prefetch,
            in_flight.clone(),
            shutdown.clone(),
        ));
        let provider_jobs = ProviderJobs {
            ctx: ctx.clone(),
            client: client.clone(),
            prefetch: *prefetch,
            in_flight: in_flight.clone(),
            open_jobs: open_jobs.clone(),
            worker_id: worker_id.clone(),
            probe: probe.clone(),
        };
        job_servers.push(provider_jobs.serve(conn, shutdown));
    }
    crate::batch::spawn_consumers(conn, w, &ctx, &mut consumers, shutdown);
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
    let all_jobs = futures::future::try_join_all(job_servers);
    // Cancels are followed for as long as the item consumers run; they decide when this
    // connection is done (a follower failure means the connection failed too).
    // A publish channel the broker closed ends the connection too: nothing could be
    // settled on it any more. Closing it hands every unsettled delivery back to the
    // broker at once (items in flight hold channel handles, which would keep it open).
    tokio::select! {
        res = async { tokio::try_join!(all_consumers, all_jobs).map(|_| ()) } => res,
        res = follower.run() => res,
        why = ctx.publisher.lost() => {
            fleet::amqp::close(conn, "giving up the publish channel").await;
            anyhow::bail!("{why}")
        }
    }
}
