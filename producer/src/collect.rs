//! `producer wait`: collect a job's results into an OpenAI Batch output file.
//!
//! Exactly once in the file, whatever the queue delivers: a result is written only if its
//! `custom_id` is not in the file yet, and queue messages are acked only after the lines
//! they produced are flushed and synced. Interrupted and run again, it reads the file
//! back (dropping a torn last line), and carries on where it stopped.

use std::collections::HashSet;
use std::io::{BufRead, Seek, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use fleet::topology::Topology;
use fleet::wire::{ItemResult, JobCounts, JobSummary, KIND_JOB_FINISHED};
use fleet::Config;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;

/// Results acked at once (one multiple-ack per batch, after an fsync).
const ACK_BATCH: usize = 512;
/// A partial batch is synced and acked after this much quiet.
const ACK_IDLE: Duration = Duration::from_millis(200);

/// How a wait ended.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Collected {
    pub job_id: String,
    pub counts: JobCounts,
    pub elapsed_s: f64,
    /// Set when the tracker reported the job's end before every result arrived.
    pub job_status: Option<String>,
}

/// Options of a wait.
pub struct WaitRequest<'a> {
    pub job_id: &'a str,
    pub output: &'a Path,
    pub progress: bool,
    /// Give up after this long (the file keeps what arrived; run again to resume).
    pub timeout: Option<Duration>,
}

/// The status of an output line: `error` null means succeeded, else its code decides.
fn line_status(v: &serde_json::Value) -> &'static str {
    match v["error"]["code"].as_str() {
        None if v["error"].is_null() => "succeeded",
        Some("cancelled") => "cancelled",
        Some("expired") => "expired",
        _ => "failed",
    }
}

fn count(counts: &mut JobCounts, status: &str) {
    match status {
        "succeeded" => counts.succeeded += 1,
        "cancelled" => counts.cancelled += 1,
        "expired" => counts.expired += 1,
        _ => counts.failed += 1,
    }
}

/// Opens `path` for appending, returning the custom_ids already in it and their counts.
fn open_output(path: &Path) -> anyhow::Result<(std::fs::File, HashSet<String>, JobCounts)> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {} for writing", path.display()))?;
    let mut seen = HashSet::new();
    let mut counts = JobCounts::default();
    let mut good_len = 0u64;
    let mut reader = std::io::BufReader::new(&file);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            break; // end, or a torn last line from an interrupted write
        }
        let v: serde_json::Value = serde_json::from_slice(&line)
            .with_context(|| format!("{} has a line that is not a result; refusing to append to it", path.display()))?;
        let id = v["custom_id"].as_str().unwrap_or_default().to_string();
        if seen.insert(id) {
            count(&mut counts, line_status(&v));
        }
        good_len += n as u64;
    }
    drop(reader);
    if file.metadata()?.len() != good_len {
        file.set_len(good_len)?;
    }
    file.seek(std::io::SeekFrom::End(0))?;
    Ok((file, seen, counts))
}

/// Collects results of `job_id` until every item has one.
pub async fn wait(cfg: &Config, req: &WaitRequest<'_>) -> anyhow::Result<Collected> {
    let started = Instant::now();
    let topology = Topology::from_config(cfg);
    let (file, mut seen, mut counts) = open_output(req.output)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 16, file);

    let conn = fleet::amqp::connect(&cfg.amqp.url, "producer wait")
        .await
        .with_context(|| format!("cannot connect to RabbitMQ at {}", fleet::amqp::redact_url(&cfg.amqp.url)))?;
    let queue = topology.results_queue(req.job_id);
    if topology.queue_len(&conn, &queue).await?.is_none() {
        anyhow::bail!(
            "no job {:?} in namespace {:?} (its results queue {queue} does not exist)",
            req.job_id,
            topology.namespace()
        );
    }
    let ch = conn.create_channel().await?;
    ch.basic_qos(2 * ACK_BATCH as u16, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "producer-wait".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;

    let mut total: Option<u64> = None;
    let bar = crate::progress::bar(0, req.progress, "collecting");
    bar.set_position(seen.len() as u64);
    let mut unacked: Option<lapin::Acker> = None;
    let mut unacked_n = 0usize;
    let mut job_status = None;
    let deadline = req.timeout.map(|t| tokio::time::Instant::now() + t);
    loop {
        if total.is_some_and(|t| seen.len() as u64 >= t) {
            break;
        }
        let next = tokio::select! {
            n = consumer.next() => n,
            _ = tokio::time::sleep(ACK_IDLE), if unacked_n > 0 => {
                sync_and_ack(&mut out, &mut unacked, &mut unacked_n).await?;
                continue;
            }
            _ = sleep_until(deadline) => {
                sync_and_ack(&mut out, &mut unacked, &mut unacked_n).await?;
                anyhow::bail!("timed out with {} results in {}; run `producer wait` again to resume", seen.len(), req.output.display());
            }
        };
        let Some(delivery) = next else { anyhow::bail!("the broker closed the results consumer") };
        let delivery = delivery.context("reading results")?;
        let kind = delivery.properties.kind().as_ref().map(|k| k.as_str().to_string());
        if kind.as_deref() == Some(KIND_JOB_FINISHED) {
            if let Ok(summary) = serde_json::from_slice::<JobSummary>(&delivery.data) {
                total.get_or_insert(summary.counts.total);
                job_status = Some(summary.status);
            }
        } else {
            match serde_json::from_slice::<ItemResult>(&delivery.data) {
                Ok(result) => {
                    if total.is_none() {
                        bar.set_length(result.total);
                    }
                    total.get_or_insert(result.total);
                    if seen.insert(result.custom_id.clone()) {
                        serde_json::to_writer(&mut out, &result.to_output_line())?;
                        out.write_all(b"\n")?;
                        count(&mut counts, result.status.as_str());
                        bar.inc(1);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring a message on the results queue that is not a result")
                }
            }
        }
        unacked = Some(delivery.acker);
        unacked_n += 1;
        if unacked_n >= ACK_BATCH {
            sync_and_ack(&mut out, &mut unacked, &mut unacked_n).await?;
        }
    }
    sync_and_ack(&mut out, &mut unacked, &mut unacked_n).await?;
    bar.finish_and_clear();
    let _ = conn.close(200, "done".into()).await;
    counts.total = total.unwrap_or(seen.len() as u64);
    Ok(Collected { job_id: req.job_id.to_string(), counts, elapsed_s: started.elapsed().as_secs_f64(), job_status })
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Makes the written lines durable, then acks every message up to the last one.
async fn sync_and_ack(
    out: &mut std::io::BufWriter<std::fs::File>,
    unacked: &mut Option<lapin::Acker>,
    n: &mut usize,
) -> anyhow::Result<()> {
    out.flush()?;
    out.get_ref().sync_data()?;
    if let Some(acker) = unacked.take() {
        acker.ack(BasicAckOptions { multiple: true }).await?;
    }
    *n = 0;
    Ok(())
}
