//! `producer status` and `producer jobs`: questions answered by the active job tracker
//! (request/reply over RabbitMQ's direct reply-to, with a timeout).

use std::time::Duration;

use fleet::topology::Topology;
use fleet::wire::{JobProgress, JobSummary, TrackerReply, TrackerRequest};
use fleet::Config;
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;

/// RabbitMQ's pseudo-queue for replies without declaring a queue.
const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Asks the tracker; fails with a clear message if none answers within `timeout`, or
/// with the tracker's own when it cannot answer (e.g. an unknown job id).
pub async fn ask(cfg: &Config, req: &TrackerRequest, timeout: Duration) -> anyhow::Result<TrackerReply> {
    let topology = Topology::from_config(cfg);
    let conn = crate::connect(cfg, "producer query").await?;
    let reply = ask_once(&conn, &topology, req, timeout).await;
    fleet::amqp::close(&conn, "done").await;
    let reply = reply?;
    if let Some(e) = &reply.error {
        anyhow::bail!("{e}");
    }
    Ok(reply)
}

/// How often [`status`] asks again while the tracker has not read a submitted job yet.
const CATCHING_UP_EVERY: Duration = Duration::from_millis(250);

/// A job's status. A tracker that does not know the job yet, although the job was
/// submitted ([`Topology::job_exists`]), is still reading the ledger behind the
/// submission (right after `submit`, or after a takeover): it is asked again until it
/// knows the job or `timeout` is over. One connection serves every question.
pub async fn status(cfg: &Config, job_id: &str, timeout: Duration) -> anyhow::Result<TrackerReply> {
    let topology = Topology::from_config(cfg);
    let conn = crate::connect(cfg, "producer query").await?;
    let reply = status_on(&conn, &topology, job_id, timeout).await;
    fleet::amqp::close(&conn, "done").await;
    reply
}

async fn status_on(
    conn: &lapin::Connection,
    topology: &Topology,
    job_id: &str,
    timeout: Duration,
) -> anyhow::Result<TrackerReply> {
    let deadline = tokio::time::Instant::now() + timeout;
    let req = TrackerRequest::Status { job_id: job_id.to_string() };
    let mut submitted = None;
    loop {
        // At least a second per question, so a retry near the deadline still gets an answer.
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let reply = ask_once(conn, topology, &req, left.max(Duration::from_secs(1))).await?;
        let Some(e) = reply.error else { return Ok(reply) };
        if reply.forgotten {
            anyhow::bail!("{e}");
        }
        // Asked once: a job that exists does not stop existing while the tracker catches up.
        if submitted.is_none() {
            submitted = Some(topology.job_exists(conn, job_id).await?);
        }
        if submitted == Some(false) {
            anyhow::bail!("{e}");
        }
        if tokio::time::Instant::now() + CATCHING_UP_EVERY >= deadline {
            anyhow::bail!(
                "job {job_id} was submitted but the tracker has not read it off the ledger within {} s \
                 (it trails the ledger under load, or a new tracker is catching up): ask again",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(CATCHING_UP_EVERY).await;
    }
}

/// One request and its reply on `conn`, the tracker's error included.
async fn ask_once(
    conn: &lapin::Connection,
    topology: &Topology,
    req: &TrackerRequest,
    timeout: Duration,
) -> anyhow::Result<TrackerReply> {
    if topology.queue_len(conn, &topology.tracker_rpc_queue()).await?.is_none() {
        anyhow::bail!("no worker has ever run in namespace {:?}: start one with `worker`", topology.namespace());
    }
    let ch = fleet::amqp::open_channel(conn).await?;
    // Direct reply-to: consume first (no-ack), then publish with reply_to set to it.
    let mut replies = ch
        .basic_consume(
            DIRECT_REPLY_TO.into(),
            "producer-query".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    let id = uuid::Uuid::new_v4().to_string();
    let props = BasicProperties::default()
        .with_reply_to(DIRECT_REPLY_TO.into())
        .with_correlation_id(id.as_str().into())
        .with_content_type("application/json".into());
    ch.basic_publish(
        "".into(),
        topology.tracker_rpc_queue().into(),
        BasicPublishOptions::default(),
        &serde_json::to_vec(req)?,
        props,
    )
    .await?;
    let reply = tokio::time::timeout(timeout, async {
        while let Some(d) = replies.next().await {
            let d = d?;
            if d.properties.correlation_id().as_ref().map(|c| c.as_str()) == Some(id.as_str()) {
                return Ok::<_, anyhow::Error>(serde_json::from_slice::<TrackerReply>(&d.data)?);
            }
        }
        anyhow::bail!("reply consumer closed")
    })
    .await
    .map_err(|_| {
        anyhow::anyhow!(
            "no job tracker answered within {} s: is a worker running in namespace {:?}?",
            timeout.as_secs(),
            topology.namespace()
        )
    })??;
    let _ = ch.close(200, "answered".into()).await;
    Ok(reply)
}

/// One line per job for humans; a job in progress gets a second line saying where its
/// pending items are and what it waits for.
pub fn render(job: &JobSummary) -> String {
    let mut out = summary_line(job);
    if let Some(u) = &job.usage {
        out.push_str("\n    usage: ");
        out.push_str(&u.describe());
    }
    if let Some(w) = &job.webhook {
        out.push_str("\n    webhook: ");
        out.push_str(&w.describe());
    }
    if let Some(p) = &job.progress {
        out.push_str("\n    ");
        out.push_str(&progress_line(p));
    }
    out
}

fn progress_line(p: &JobProgress) -> String {
    let mut parts = Vec::new();
    if p.cancelling {
        parts.push("cancel in progress".to_string());
    }
    parts.push(format!("queued or in flight={}", p.queued_or_in_flight));
    if let Some(n) = p.provider_backlog {
        parts.push(format!("provider backlog (all jobs)={n}"));
    }
    parts.push(format!("in delay queues={}", p.in_delay_queues));
    parts.push(format!("dead-lettered={}", p.dead_lettered));
    if let Some(e) = &p.last_error {
        let age = p.last_error_age_s.map(|s| format!(" ({s}s ago)")).unwrap_or_default();
        parts.push(format!("last error{age}: {e}"));
    }
    parts.push(match p.eta_s {
        Some(s) => format!("eta={s}s"),
        None => "eta=unknown (no item finished yet)".to_string(),
    });
    parts.join("  ")
}

fn summary_line(job: &JobSummary) -> String {
    let c = &job.counts;
    let fmt_ts = |ms: u64| format!("{}s-ago", fleet::now_ms().saturating_sub(ms) / 1000);
    format!(
        "{id}  {status:<11} provider={p}{mode} total={t} succeeded={s} failed={f} cancelled={ca} expired={e} pending={pe} rate={r:.1}/s submitted={sub}{fin}",
        id = job.job_id,
        status = job.status,
        p = job.provider,
        // Unknown (a job from a producer that did not say): left out.
        mode = job.mode.map(|m| format!(" mode={}", m.as_str())).unwrap_or_default(),
        t = c.total,
        s = c.succeeded,
        f = c.failed,
        ca = c.cancelled,
        e = c.expired,
        pe = c.pending(),
        r = job.rate_per_s,
        sub = fmt_ts(job.submitted_at_ms),
        fin = job.finished_at_ms.map(|t| format!(" finished={}", fmt_ts(t))).unwrap_or_default(),
    ) + &job.reason.as_ref().map(|r| format!(" reason={r}")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet::batch::JobMode;
    use fleet::wire::{JobCounts, JobStatus};

    #[test]
    fn the_status_line_says_the_mode_when_known() {
        let mut job = JobSummary {
            job_id: "job_1".into(),
            provider: "mock".into(),
            mode: Some(JobMode::Batch),
            status: JobStatus::Completed,
            counts: JobCounts { total: 2, succeeded: 2, ..Default::default() },
            submitted_at_ms: 0,
            finished_at_ms: Some(0),
            rate_per_s: 0.0,
            reason: None,
            progress: None,
            usage: None,
            dead_lettered: 0,
            webhook: None,
        };
        assert!(render(&job).starts_with("job_1  completed   provider=mock mode=batch total=2 "), "{}", render(&job));
        job.mode = None;
        assert!(render(&job).starts_with("job_1  completed   provider=mock total=2 "), "{}", render(&job));
    }
}
