//! The worker: consumes the items queues of the providers it serves, calls the providers,
//! publishes results, and (when it holds the role) runs the fleet's job tracker.
//!
//! Lifecycle of [`run`]: connect (retrying), declare the topology, consume until the
//! connection fails (then reconnect) or shutdown fires (then stop consuming, drain the
//! items in flight within `worker.drain_timeout_s`, push metrics one last time, exit).

#![deny(missing_docs)]
#![deny(unreachable_pub)]

pub mod acks;
pub mod answer;
pub mod batch;
pub mod consume;
pub mod context;
pub mod control;
pub mod decide;
pub mod gemini;
pub mod jobs;
pub mod keys;
pub mod known;
pub mod limit;
pub mod outbox;
pub mod process;
pub mod provider;
pub mod settle;
pub mod tracker;
pub mod webhooks;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fleet::metrics::WorkerMetrics;
use fleet::push::{spawn_pusher, GroupKey, Pushgateway};
use fleet::topology::Topology;
use fleet::Config;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::provider::ProviderClient;

/// Runs a worker until `shutdown` fires, then drains and returns.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let worker_id = cfg.worker_id();
    let topology = Topology::from_config(&cfg);
    let metrics = WorkerMetrics::new();
    metrics.worker_up.set(1);

    let served = cfg.served_providers();
    if served.is_empty() {
        anyhow::bail!("this worker serves no provider: check `providers` and `worker.providers`");
    }
    let mut clients = BTreeMap::new();
    for (name, pcfg) in &served {
        let in_flight = pcfg.max_in_flight.min(cfg.worker.max_in_flight).max(1);
        let client = ProviderClient::new(name, pcfg, in_flight, &cfg.retry, metrics.clone())?;
        // Items whose call is done still hold their delivery while the result is confirmed;
        // a quarter more prefetch keeps the provider busy meanwhile.
        let prefetch = in_flight.saturating_add(in_flight / 4).max(in_flight.saturating_add(2));
        clients.insert(name.to_string(), (Arc::new(client), prefetch));
    }

    // Rejected keys are probed again on a clock of their own: with every key rejected no
    // item comes to do it.
    for (client, _) in clients.values() {
        let (client, shutdown) = (client.clone(), shutdown.clone());
        tokio::spawn(async move { client.watch_keys(shutdown).await });
    }

    let pg = Pushgateway::from_config(&cfg.pushgateway);
    let stop_pushing = CancellationToken::new();
    let pusher = spawn_pusher(
        pg.clone(),
        GroupKey::worker(topology.namespace(), &worker_id),
        metrics.registry.clone(),
        Duration::from_secs(cfg.pushgateway.push_interval_s.max(1)),
        metrics.push_failures.clone(),
        stop_pushing.clone(),
    );
    tracing::info!(worker = %worker_id, namespace = topology.namespace(), providers = ?clients.keys().collect::<Vec<_>>(), "worker starting");

    // Items in flight across reconnections: the drain waits for all of them.
    let worker = context::Worker {
        cfg: cfg.clone(),
        worker_id: worker_id.clone(),
        topology: topology.clone(),
        metrics: metrics.clone(),
        clients,
        in_flight: TaskTracker::new(),
        cancelled: known::Cancelled::new(cfg.tracker.retention_s.saturating_mul(1000)),
        provider_batches: fleet::metrics::register_provider_batches(&metrics.registry),
        open_jobs: known::OpenJobs::default(),
        probe: Arc::new(fleet::amqp::Probe::new(cfg.amqp.addresses(), &format!("worker {worker_id} probe"))),
    };
    // A refused login never heals by retrying (the loop below retries only what can): fail
    // at start with exit 1 rather than warn forever. A broker that is down is waited for.
    match fleet::amqp::connect_any(&cfg.amqp.addresses(), "worker login check").await {
        Ok(conn) => fleet::amqp::close(&conn, "login checked").await,
        Err(e) if fleet::amqp::is_access_refused(&e) => anyhow::bail!(
            "RabbitMQ refused the login: check the user, password and vhost of amqp.url / amqp.urls ({})",
            cfg.amqp.addresses().iter().map(|u| fleet::amqp::redact_url(u)).collect::<Vec<_>>().join(", ")
        ),
        Err(_) => {}
    }
    let tracker_role = tracker::spawn_candidate(&cfg, &worker_id, pg, shutdown.clone());
    // Completion webhooks: every worker sends them, on a connection of its own.
    let webhook_sender = webhooks::spawn_sender(&cfg, &worker_id, metrics.clone(), shutdown.clone())?;
    let mut retry_delay = Duration::from_millis(200);
    while !shutdown.is_cancelled() {
        let name = format!("worker {worker_id}");
        let Some(conn) = fleet::amqp::connect_with_retry(&cfg.amqp.addresses(), &name, &shutdown).await else {
            break;
        };
        // Shared with the batch-mode tasks, which open channels of their own (stream reads).
        let conn = Arc::new(conn);
        match consume::serve_connection(&conn, &worker, &shutdown).await {
            Ok(()) => {
                retry_delay = Duration::from_millis(200);
            }
            Err(e) if e.chain().any(fleet::topology::is_precondition_failed) => {
                tracing::error!(error = %e, hint = fleet::topology::PRECONDITION_HINT, "cannot declare the topology; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "lost the broker; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(retry_delay) => {}
                }
                retry_delay = (retry_delay * 2).min(Duration::from_secs(5));
            }
        }
        if shutdown.is_cancelled() {
            drain(&worker.in_flight, Duration::from_secs(cfg.worker.drain_timeout_s)).await;
            fleet::amqp::close(&conn, "worker shutting down").await;
        }
    }
    if let Some(handle) = tracker_role {
        let _ = handle.await;
    }
    let _ = webhook_sender.await;
    metrics.worker_up.set(0);
    for name in worker.clients.keys() {
        metrics.in_flight.with_label_values(&[name.as_str()]).set(0);
    }
    stop_pushing.cancel();
    let _ = pusher.await;
    tracing::info!(worker = %worker_id, "worker stopped");
    Ok(())
}

/// Waits for in-flight items to finish, at most `timeout`.
async fn drain(in_flight: &TaskTracker, timeout: Duration) {
    in_flight.close();
    let n = in_flight.len();
    if n > 0 {
        tracing::info!(in_flight = n, timeout_s = timeout.as_secs(), "draining items in flight");
    }
    if tokio::time::timeout(timeout, in_flight.wait()).await.is_err() {
        tracing::warn!(left = in_flight.len(), "drain timeout: unfinished items will be redelivered");
    }
}
