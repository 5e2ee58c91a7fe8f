//! Questions to the job tracker over the server's shared connection (request/reply on
//! RabbitMQ's direct reply-to, as `producer status` asks them): a batch's status and
//! counts are the tracker's.

use std::collections::HashMap;
use std::time::Duration;

use fleet::wire::{JobStatus, JobSummary, TrackerReply, TrackerRequest};
use futures::StreamExt as _;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::FieldTable;

use super::error::ApiError;
use super::store::{BatchEntry, Record, Store};

/// RabbitMQ's pseudo-queue for replies without declaring a queue.
const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";
/// How long a request waits for the tracker.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// One question and the tracker's reply; `None` when no tracker answered in time (the
/// batch is then shown from its record alone).
async fn ask(store: &Store, req: &TrackerRequest) -> Result<Option<TrackerReply>, ApiError> {
    let conn = store.broker.conn().await?;
    let ch = fleet::amqp::open_channel(&conn).await?;
    let mut replies = ch
        .basic_consume(
            DIRECT_REPLY_TO.into(),
            "serve-query".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    let id = uuid::Uuid::new_v4().to_string();
    let props = lapin::BasicProperties::default()
        .with_reply_to(DIRECT_REPLY_TO.into())
        .with_correlation_id(id.as_str().into())
        .with_content_type("application/json".into());
    let body = serde_json::to_vec(req).map_err(ApiError::unavailable)?;
    let rpc = store.topology.tracker_rpc_queue();
    ch.basic_publish("".into(), rpc.as_str().into(), BasicPublishOptions::default(), &body, props).await?;
    let reply = tokio::time::timeout(ASK_TIMEOUT, async {
        while let Some(Ok(d)) = replies.next().await {
            if d.properties.correlation_id().as_ref().map(|c| c.as_str()) == Some(id.as_str()) {
                return serde_json::from_slice::<TrackerReply>(&d.data).ok();
            }
        }
        None
    })
    .await
    .ok()
    .flatten();
    let _ = ch.close(200, "answered".into()).await;
    Ok(reply)
}

/// The tracker's summary of `job_id`: `None` when it does not know the job (yet, or any
/// more) or does not answer.
pub(crate) async fn job(store: &Store, job_id: &str) -> Result<Option<JobSummary>, ApiError> {
    let reply = ask(store, &TrackerRequest::Status { job_id: job_id.to_string() }).await?;
    Ok(reply.filter(|r| r.error.is_none()).and_then(|r| r.jobs.into_iter().next()))
}

/// The summary of `entry`'s job: the tracker's, or, once the tracker has forgotten the
/// ended job (`tracker.retention_s`) or does not answer, the final one recorded on the
/// metadata stream. The first replica to see the job ended records it there.
pub(crate) async fn summary(store: &Store, entry: &BatchEntry) -> Result<Option<JobSummary>, ApiError> {
    let job = job(store, &entry.record.job_id).await?;
    Ok(settle(store, entry, job).await)
}

/// `job` (the tracker's summary of `entry`'s job, if any) with the recorded end as its
/// fallback; records the end when the tracker shows it first.
pub(crate) async fn settle(store: &Store, entry: &BatchEntry, job: Option<JobSummary>) -> Option<JobSummary> {
    match job {
        Some(job) if JobStatus::ENDED.contains(&job.status) && entry.ended.is_none() => {
            let ended = Record::BatchEnded { id: entry.record.id.clone(), summary: Box::new(job.clone()) };
            // Best effort: another replica, or the next request, records it otherwise.
            if let Err(e) = store.append(&ended).await {
                tracing::debug!(batch = %entry.record.id, error = %e.message, "cannot record the batch's end yet");
            }
            Some(job)
        }
        None => entry.ended.as_deref().cloned(),
        job => job,
    }
}

/// Every job the tracker knows, by id (empty when it does not answer).
pub(crate) async fn jobs(store: &Store) -> Result<HashMap<String, JobSummary>, ApiError> {
    let reply = ask(store, &TrackerRequest::Jobs).await?;
    Ok(reply.map(|r| r.jobs.into_iter().map(|j| (j.job_id.clone(), j)).collect()).unwrap_or_default())
}
