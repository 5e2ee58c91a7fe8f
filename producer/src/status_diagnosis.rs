//! What a stuck job waits for, asked of the broker: whether any worker serves its provider,
//! and, for `producer cancel`, ending a job's queued items when none does.
//!
//! "Serves" is read off the broker, not the config: a worker that serves a provider
//! consumes the provider's items queue `<ns>.items.<provider>` (online) and, with batch
//! mode, its chunk queue `<ns>.batch.<provider>`, so both having no consumer (a passive
//! declare reports the count) means no running worker takes the provider's items: none
//! was started with it in its config, or every one has paused it because the provider
//! rejected all its keys. The job's items then wait on their queue forever.
//!
//! A cancel reaches items through the workers, which read the control stream and end each
//! item when they take it; with no worker, nobody would. So `cancel` of such a job takes
//! the job's queued items itself and publishes their `cancelled` results (confirmed, then
//! acked: an item is never lost, at worst a second result that the tracker drops). Items
//! that are not on the job's queue (waiting in a delay queue, or in a batch-mode chunk)
//! still end when a worker for the provider runs.

use anyhow::Context as _;
use fleet::amqp;
use fleet::topology::Topology;
use fleet::wire::{error_code, ErrorRecord, Item, ItemResult, ItemStatus, JobSummary, KIND_RESULT};
use fleet::Config;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions};

/// The `worker` field of the results `cancel` publishes.
pub const CANCELLED_BY: &str = "producer-cancel";

/// Most items one `cancel` ends itself (the rest: run it again).
const MAX_ENDED: u64 = fleet::wire::MAX_JOB_ITEMS;

/// The line that says a job's provider has no worker.
pub fn no_worker_line(provider: &str) -> String {
    format!(
        "no worker serves provider {provider}: nothing consumes its queues (start a worker whose config has it; \
         a worker whose keys the provider all rejected pauses it too)"
    )
}

/// Whether some running worker consumes `provider`'s queues (items queue, chunk queue).
pub async fn served(conn: &lapin::Connection, topology: &Topology, provider: &str) -> lapin::Result<bool> {
    for queue in [topology.items_queue(provider), topology.chunk_queue(provider)] {
        if let Some((_, consumers)) = fleet::topology::queue_stats(conn, &queue).await? {
            if consumers > 0 {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// For each job (in order), the line saying why it is stuck, if it is: a job in progress
/// whose provider no worker serves.
pub async fn diagnose(cfg: &Config, jobs: &[JobSummary]) -> anyhow::Result<Vec<Option<String>>> {
    if jobs.iter().all(|j| j.status.is_ended()) {
        return Ok(vec![None; jobs.len()]);
    }
    let topology = Topology::from_config(cfg);
    let conn = crate::connect(cfg, "producer status").await?;
    let mut out = Vec::with_capacity(jobs.len());
    let mut known: std::collections::BTreeMap<&str, bool> = Default::default();
    for job in jobs {
        if job.status.is_ended() {
            out.push(None);
            continue;
        }
        let served = match known.get(job.provider.as_str()) {
            Some(s) => *s,
            None => {
                let s = served(&conn, &topology, &job.provider).await?;
                known.insert(&job.provider, s);
                s
            }
        };
        out.push((!served).then(|| no_worker_line(&job.provider)));
    }
    fleet::amqp::close(&conn, "done").await;
    Ok(out)
}

/// What `cancel` did itself for a job no worker serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndedByCancel {
    /// The job's provider (found by its queue's name).
    pub provider: String,
    /// Queued items `cancel` ended `cancelled` itself.
    pub ended: u64,
}

/// After a cancel request: when no worker serves the job's provider, ends the job's queued
/// items `cancelled` (see the module's header). `None` when a worker serves it (the workers
/// end the items) or the job has no items queue (it ended, or is a batch-mode job whose
/// chunks wait for a worker).
pub async fn end_unserved(cfg: &Config, job_id: &str) -> anyhow::Result<Option<EndedByCancel>> {
    let topology = Topology::from_config(cfg);
    let conn = crate::connect(cfg, "producer cancel").await?;
    let outcome = end_unserved_on(cfg, &conn, &topology, job_id).await;
    fleet::amqp::close(&conn, "done").await;
    outcome
}

async fn end_unserved_on(
    cfg: &Config,
    conn: &lapin::Connection,
    topology: &Topology,
    job_id: &str,
) -> anyhow::Result<Option<EndedByCancel>> {
    // The job's queue is named after its provider: the configured provider whose queue for
    // this job exists is the job's.
    let mut found = None;
    for provider in cfg.providers.keys() {
        let queue = topology.job_items_queue(provider, job_id);
        if let Some((_, consumers)) = fleet::topology::queue_stats(conn, &queue).await? {
            found = Some((provider.clone(), queue, consumers));
            break;
        }
    }
    let Some((provider, queue, consumers)) = found else { return Ok(None) };
    if consumers > 0 || served(conn, topology, &provider).await? {
        return Ok(None);
    }
    let ch = amqp::confirm_channel(conn).await?;
    let message = format!("cancelled by producer cancel: no worker serves provider {provider}");
    let mut ended = 0;
    while ended < MAX_ENDED {
        let msg = match ch.basic_get(queue.as_str().into(), BasicGetOptions::default()).await {
            Ok(Some(msg)) => msg,
            Ok(None) => break,
            // The queue is gone: the results published here ended the job, and the tracker
            // deleted its items queue (it does when a job ends) before this next get.
            Err(e) if fleet::topology::is_not_found(&e) => break,
            Err(e) => return Err(e.into()),
        };
        let d = msg.delivery;
        let item = serde_json::from_slice::<Item>(&d.data).ok().filter(|i| i.check().is_ok() && i.job_id == job_id);
        let Some(item) = item else {
            // Not one of this job's items: back on the queue for a worker to judge (a worker
            // dead-letters what it cannot read).
            d.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await?;
            break;
        };
        let error = ErrorRecord { code: error_code::CANCELLED.into(), message: message.clone() };
        let result = ItemResult::without_answer(&item, ItemStatus::Cancelled, error, CANCELLED_BY);
        let payload = serde_json::to_vec(&result)?;
        let props = amqp::persistent_json().with_type(KIND_RESULT.into());
        amqp::publish_confirmed(&ch, &topology.results_exchange(), job_id, &payload, props)
            .await
            .context("publishing the result of a cancelled item")?;
        d.acker.ack(BasicAckOptions::default()).await?;
        ended += 1;
    }
    let _ = ch.close(200, "done".into()).await;
    Ok(Some(EndedByCancel { provider, ended }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_diagnosis_names_the_provider_and_what_to_do() {
        let line = no_worker_line("openai");
        assert!(line.starts_with("no worker serves provider openai"), "{line}");
        assert!(line.contains("start a worker"), "{line}");
    }
}
