//! Standing by for the tracker role and taking it: the exclusive lock queue.

use std::time::Duration;

use fleet::amqp::{self, Refusal};
use fleet::push::Pushgateway;
use fleet::topology::Topology;
use fleet::Config;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::Connection;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::active::Active;

/// How often a standby tries to take the role.
const STANDBY_RETRY: Duration = Duration::from_secs(2);

/// Starts the tracker candidate loop if this worker may take the role.
pub fn spawn_candidate(
    cfg: &Config,
    worker_id: &str,
    pg: Option<Pushgateway>,
    shutdown: CancellationToken,
) -> Option<JoinHandle<()>> {
    if !cfg.tracker.enabled {
        return None;
    }
    let (cfg, worker_id) = (cfg.clone(), worker_id.to_string());
    Some(tokio::spawn(async move {
        let name = format!("tracker candidate {worker_id}");
        while !shutdown.is_cancelled() {
            let Some(conn) = amqp::connect_with_retry(&cfg.amqp.addresses(), &name, &shutdown).await else {
                return;
            };
            if let Err(e) = candidate(&conn, &cfg, &worker_id, pg.clone(), &shutdown).await {
                tracing::warn!(error = %format!("{e:#}"), "tracker role lost; standing by again");
            }
            let _ = conn.close(200, "tracker stopping".into()).await;
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(STANDBY_RETRY) => {}
            }
        }
    }))
}

/// Stands by until the lock is ours, then runs the active tracker on `conn`.
async fn candidate(
    conn: &Connection,
    cfg: &Config,
    worker_id: &str,
    pg: Option<Pushgateway>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let topology = Topology::from_config(cfg);
    loop {
        let ch = conn.create_channel().await?;
        let lock = ch
            .queue_declare(
                topology.tracker_lock_queue().into(),
                QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
                FieldTable::default(),
            )
            .await;
        match lock {
            Ok(_) => break,
            // Another connection holds it. The channel is closed for us.
            Err(e) if amqp::refusal(&e) == Some(Refusal::ResourceLocked) => {}
            Err(e) => return Err(e.into()),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(STANDBY_RETRY) => {}
        }
    }
    tracing::info!(tracker = worker_id, "took the job tracker role");
    Active::start(conn, cfg, worker_id, topology, pg).await?.run(shutdown).await
}
