//! The tracker's checkpoint: its whole [`State`] as JSON, the one message of the
//! `<ns>.tracker.state` queue (at most one: the queue keeps the newest).

use anyhow::Context as _;
use fleet::amqp;
use fleet::topology::Topology;
use lapin::options::{BasicGetOptions, BasicNackOptions};
use lapin::Channel;

use super::state::State;

/// Reads the newest checkpoint (leaving it in place), or starts empty.
pub(super) async fn restore(ch: &Channel, topology: &Topology) -> anyhow::Result<State> {
    let Some(msg) = ch.basic_get(topology.tracker_state_queue().into(), BasicGetOptions::default()).await? else {
        tracing::info!("no tracker checkpoint: starting empty");
        return Ok(State::default());
    };
    let state = serde_json::from_slice::<State>(&msg.delivery.data);
    msg.delivery.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await?;
    let state = state.context("the tracker checkpoint is unreadable")?;
    tracing::info!(jobs = state.jobs.len(), "restored tracker checkpoint");
    Ok(state)
}

/// Writes `state` as the newest checkpoint and waits for the broker's confirm.
pub(super) async fn write(ch: &Channel, topology: &Topology, state: &State) -> anyhow::Result<()> {
    let payload = serde_json::to_vec(state)?;
    amqp::publish_confirmed(ch, "", &topology.tracker_state_queue(), &payload, amqp::persistent_json())
        .await
        .context("writing the tracker checkpoint")
}
