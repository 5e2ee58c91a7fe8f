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
/// How soon a takeover that failed once is tried again.
const TAKEOVER_RETRY: Duration = Duration::from_millis(300);

/// Taking over failed: the role was ours, but declaring the topology or reading the
/// checkpoint did not work. Once in a while that is the broker still starting a queue
/// another connection declared a moment before (RabbitMQ answers a read with `noproc` and
/// closes the connection): the first such failure is retried soon and logged as info, a
/// second one in a row is a warning.
#[derive(Debug)]
struct TakeoverFailed;

impl std::fmt::Display for TakeoverFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("taking over the tracker role")
    }
}

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
        // Takeovers that failed in a row; one is expected now and then (see [`TakeoverFailed`]).
        let mut failed_takeovers = 0;
        while !shutdown.is_cancelled() {
            let Some(conn) = amqp::connect_with_retry(&cfg.amqp.addresses(), &name, &shutdown).await else {
                return;
            };
            let mut wait = STANDBY_RETRY;
            match candidate(&conn, &cfg, &worker_id, pg.clone(), &shutdown).await {
                Ok(()) => failed_takeovers = 0,
                Err(e) => {
                    let warn;
                    (warn, wait) = after_failure(&e, &mut failed_takeovers);
                    let error = format!("{e:#}");
                    if warn {
                        tracing::warn!(error, "tracker role lost; standing by again");
                    } else {
                        tracing::info!(error, "could not take the tracker role yet; trying again");
                    }
                }
            }
            fleet::amqp::close(&conn, "tracker stopping").await;
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }))
}

/// After the candidate loop's attempt failed with `error`: whether to warn, and how long to
/// wait before the next (`failed_takeovers` counts the takeovers that failed in a row).
fn after_failure(error: &anyhow::Error, failed_takeovers: &mut u32) -> (bool, Duration) {
    if error.downcast_ref::<TakeoverFailed>().is_none() {
        *failed_takeovers = 0; // the role was held, then lost
        return (true, STANDBY_RETRY);
    }
    *failed_takeovers += 1;
    if *failed_takeovers == 1 {
        (false, TAKEOVER_RETRY)
    } else {
        (true, STANDBY_RETRY)
    }
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
        let ch = fleet::amqp::open_channel(conn).await?;
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
    let active = Active::start(conn, cfg, worker_id, topology, pg).await.map_err(|e| e.context(TakeoverFailed))?;
    active.run(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_failed_takeover_is_retried_soon_and_quietly_a_second_in_a_row_warns() {
        let takeover = || anyhow::anyhow!("noproc").context(TakeoverFailed);
        let mut n = 0;
        assert_eq!(after_failure(&takeover(), &mut n), (false, TAKEOVER_RETRY));
        assert_eq!(after_failure(&takeover(), &mut n), (true, STANDBY_RETRY));
        // A role held and then lost warns, and starts the count again.
        assert_eq!(after_failure(&anyhow::anyhow!("ledger consumer ended"), &mut n), (true, STANDBY_RETRY));
        assert_eq!(after_failure(&takeover(), &mut n), (false, TAKEOVER_RETRY));
    }
}
