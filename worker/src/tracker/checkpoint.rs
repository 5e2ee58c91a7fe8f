//! The tracker's checkpoint: its whole [`State`] as JSON, the one message of the
//! `<ns>.tracker.state` queue (at most one: the queue keeps the newest), and a copy in
//! `<ns>.tracker.state.copy`.
//!
//! Why two: anyone who may publish to the default exchange can put a message on a
//! checkpoint queue, and the queue keeps only the newest, so one garbage message would
//! replace the checkpoint and no worker could take the role again. A takeover reads both
//! and restores the newest readable one (by [`State::checkpoint_seq`]); with neither
//! readable it starts empty, says so at WARN and parks the unreadable messages in the
//! dead-letter queue, so the role is held and new jobs run.
//!
//! A well-formed forged checkpoint is caught by its signature: with a fleet key
//! (`fleet.signing_key_env`, see [`fleet::signing`]) every checkpoint is written signed, and
//! one without a valid signature counts as unreadable (parked, never restored). Without a
//! key only the broker's permissions keep producers off these queues (docs/teams.md).

use anyhow::Context as _;
use fleet::amqp;
use fleet::topology::{Topology, DEAD_REASON_HEADER};
use lapin::options::{BasicGetOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Channel;

use super::state::State;

/// Reads the newest readable checkpoint of the two copies (leaving them in place), or
/// starts empty.
pub(super) async fn restore(ch: &Channel, topology: &Topology) -> anyhow::Result<State> {
    let mut best: Option<State> = None;
    let mut unreadable = Vec::new();
    let mut found = 0;
    for queue in [topology.tracker_state_queue(), topology.tracker_state_copy_queue()] {
        let Some(msg) = ch.basic_get(queue.as_str().into(), BasicGetOptions::default()).await? else { continue };
        found += 1;
        // The signature first: a forged checkpoint is never parsed into the state.
        let parsed = fleet::signing::verify(&msg.delivery.properties, &msg.delivery.data)
            .map_err(|e| e.to_string())
            .and_then(|()| serde_json::from_slice::<State>(&msg.delivery.data).map_err(|e| e.to_string()));
        msg.delivery.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await?;
        match parsed {
            Ok(state) if best.as_ref().is_none_or(|b| state.checkpoint_seq > b.checkpoint_seq) => best = Some(state),
            Ok(_) => {}
            Err(e) => unreadable.push((queue, e, msg.delivery.data)),
        }
    }
    for (queue, error, data) in &unreadable {
        tracing::warn!(queue = %queue, bytes = data.len(), error = %error, "a tracker checkpoint is unreadable; parking a copy in the dead-letter queue");
        park(ch, topology, queue, error, data).await;
    }
    match best {
        Some(state) => {
            tracing::info!(jobs = state.jobs.len(), seq = state.checkpoint_seq, "restored tracker checkpoint");
            Ok(state)
        }
        None if found == 0 => {
            tracing::info!("no tracker checkpoint: starting empty");
            Ok(State::default())
        }
        None => {
            tracing::warn!("no tracker checkpoint is readable: starting empty (jobs in progress are no longer counted; new jobs are)");
            Ok(State::default())
        }
    }
}

/// A copy of an unreadable checkpoint message in the dead-letter queue, for a look.
async fn park(ch: &Channel, topology: &Topology, queue: &str, error: &str, data: &[u8]) {
    let mut headers = FieldTable::default();
    let reason = format!("unreadable tracker checkpoint in {queue}: {error}");
    headers.insert(DEAD_REASON_HEADER.into(), AMQPValue::LongString(reason.into()));
    let props = amqp::persistent_json().with_headers(headers);
    if let Err(e) = amqp::publish_confirmed(ch, &topology.dead_exchange(), "", data, props).await {
        tracing::debug!(error = %e, "cannot park the unreadable checkpoint");
    }
}

/// Writes `state` as the newest checkpoint to both queues and waits for the broker's
/// confirms (the copy second: a takeover between the two finds the newer one first).
pub(super) async fn write(ch: &Channel, topology: &Topology, state: &mut State) -> anyhow::Result<()> {
    state.checkpoint_seq += 1;
    let payload = serde_json::to_vec(state)?;
    let props = fleet::signing::sign(amqp::persistent_json(), &payload);
    for queue in [topology.tracker_state_queue(), topology.tracker_state_copy_queue()] {
        amqp::publish_confirmed(ch, "", &queue, &payload, props.clone())
            .await
            .with_context(|| format!("writing the tracker checkpoint to {queue}"))?;
    }
    Ok(())
}
