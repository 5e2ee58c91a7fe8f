//! `producer cancel`: stops a job across the fleet, through the control stream every
//! worker replays and the ledger the tracker folds.

use fleet::amqp;
use fleet::topology::Topology;
use fleet::wire::{ControlMessage, LedgerEvent};
use fleet::Config;

/// Cancels a job across the fleet: workers end its unstarted items as `cancelled`, the
/// tracker ends the job `cancelled`.
pub async fn cancel(cfg: &Config, job_id: &str) -> anyhow::Result<()> {
    let topology = Topology::from_config(cfg);
    let conn = crate::connect(cfg, "producer cancel").await?;
    if !topology.job_exists(&conn, job_id).await? {
        anyhow::bail!("no job {job_id:?} in namespace {:?}", topology.namespace());
    }
    let ch = amqp::confirm_channel(&conn).await?;
    topology.declare_common(&ch).await?;
    // The ledger first: workers end items `cancelled` only once they read the control
    // stream, so the tracker folds the request before any result it caused.
    let event = serde_json::to_vec(&LedgerEvent::JobCancel { job_id: job_id.to_string() })?;
    amqp::publish_confirmed(&ch, "", &topology.ledger_queue(), &event, amqp::persistent_json()).await?;
    let msg = serde_json::to_vec(&ControlMessage::CancelJob { job_id: job_id.to_string(), reason: None })?;
    amqp::publish_confirmed(&ch, "", &topology.control_stream(), &msg, amqp::persistent_json()).await?;
    fleet::amqp::close(&conn, "done").await;
    Ok(())
}
