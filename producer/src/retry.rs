//! `producer retry JOB`: a new job of the items of JOB that did not succeed.
//!
//! Where the original requests come from: the job's results stream. Every result of an item
//! that did not succeed carries the item's request (`url` and `body`, see
//! [`fleet::wire::RequestRecord`]), written by the worker (or the tracker, for a
//! dead-lettered item) that ended it; successes carry none, so the stream grows only by the
//! failures' bodies. The stream is kept as long as the tracker keeps the job
//! (`tracker.retention_s`), like a hosted batch API keeps its input file, so no copy of the
//! input file is needed.
//!
//! The selected requests are written, in input order and with their `custom_id`s, to
//! `<JOB>.retry.jsonl` in the current directory, which is then submitted like any file (same
//! validation, same provider as the original job). Running `retry` again after an
//! interruption writes the same file, which `submit` recognises and resumes under the same
//! new job id.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleet::messages::ResultsMessage;
use fleet::topology::Topology;
use fleet::wire::{ItemResult, ItemStatus};
use fleet::Config;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::value::RawValue;

/// Quiet on the stream for this long with results still missing: the job has not finished.
const IDLE: Duration = Duration::from_secs(5);
/// Deliveries acked at once (a multiple-ack).
const ACK_BATCH: u16 = 512;

/// Which items to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// Every item that did not succeed: failed, cancelled or expired.
    NotSucceeded,
    /// Only the items that ended `failed`.
    Failed,
}

impl Selection {
    fn wants(self, status: ItemStatus) -> bool {
        match self {
            Selection::NotSucceeded => status != ItemStatus::Succeeded,
            Selection::Failed => status == ItemStatus::Failed,
        }
    }
}

/// What `retry` found in the job's results and wrote for the new job.
#[derive(Debug)]
pub struct RetryPlan {
    /// The input file of the new job (`<JOB>.retry.jsonl`).
    pub file: PathBuf,
    /// The provider of the original job.
    pub provider: String,
    /// Items selected (the lines of `file`).
    pub selected: u64,
    /// Items of the original job.
    pub total: u64,
}

/// One line of the new job's input file, borrowed from the result that carries it.
#[derive(serde::Serialize)]
struct InputLine<'a> {
    custom_id: &'a str,
    method: &'static str,
    url: &'a str,
    body: &'a RawValue,
}

/// Reads the results of `job_id` and writes the selected items' requests to
/// `<dir>/<job_id>.retry.jsonl`. Fails when the job has not finished, or when a selected
/// result carries no request (written by a version of the fleet before requests were kept).
pub async fn plan(cfg: &Config, job_id: &str, selection: Selection, dir: &Path) -> anyhow::Result<RetryPlan> {
    let found = read_results(cfg, job_id, selection).await?;
    let selected = &found.selected;
    if selected.is_empty() {
        anyhow::bail!("job {job_id} has no item to retry (none of its {} items ended as selected)", found.total);
    }
    let missing = selected.values().filter(|r| r.request.is_none()).count();
    if missing > 0 {
        anyhow::bail!(
            "{missing} of the {} selected results of job {job_id} carry no request (they were written by an older \
             fleet); resubmit those lines from the original file",
            selected.len()
        );
    }
    let file = dir.join(format!("{job_id}.retry.jsonl"));
    let mut out = std::io::BufWriter::new(std::fs::File::create(&file)?);
    for r in selected.values() {
        let request = r.request.as_ref().expect("checked above");
        let line =
            InputLine { custom_id: &r.custom_id, method: "POST", url: &request.url, body: request.body.as_ref() };
        serde_json::to_writer(&mut out, &line)?;
        out.write_all(b"\n")?;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(RetryPlan { file, provider: found.provider, selected: selected.len() as u64, total: found.total })
}

/// What the results stream of a finished job says, as far as a retry needs it.
struct Found {
    total: u64,
    provider: String,
    /// The first result of every selected item, by index (as `wait` keeps the first).
    selected: BTreeMap<u64, ItemResult>,
}

/// Reads the job's results stream from its first message until every index has a result.
/// Memory: the selected results, and one byte per item for the others (their answers are
/// dropped as they are read).
async fn read_results(cfg: &Config, job_id: &str, selection: Selection) -> anyhow::Result<Found> {
    let topology = Topology::from_config(cfg);
    let queue = topology.results_queue(job_id);
    let conn = crate::connect(cfg, "producer retry").await?;
    if !topology.job_exists(&conn, job_id).await? {
        anyhow::bail!(
            "no job {job_id:?} in namespace {:?} (its results are gone or never existed)",
            topology.namespace()
        );
    }
    let ch = fleet::amqp::open_channel(&conn).await?;
    ch.basic_qos(2 * ACK_BATCH, BasicQosOptions::default()).await?;
    let mut from_first = FieldTable::default();
    from_first.insert("x-stream-offset".into(), AMQPValue::LongString("first".into()));
    let mut consumer = ch
        .basic_consume(queue.as_str().into(), "producer-retry".into(), BasicConsumeOptions::default(), from_first)
        .await?;
    let mut seen: Vec<bool> = Vec::new();
    let (mut found, mut unacked) = (Found { total: 0, provider: String::new(), selected: BTreeMap::new() }, 0);
    let mut count = 0u64;
    while found.total == 0 || count < found.total {
        let delivery = match tokio::time::timeout(IDLE, consumer.next()).await {
            Ok(Some(d)) => d?,
            Ok(None) => anyhow::bail!("the broker closed the results consumer; run `producer retry` again"),
            Err(_) => anyhow::bail!(
                "job {job_id} has {count} of {} results: retry it once it has finished (`producer wait` or `status`)",
                if found.total == 0 { "?".to_string() } else { found.total.to_string() }
            ),
        };
        for result in decode(&delivery) {
            if found.total == 0 {
                (found.total, found.provider) = (result.total, result.provider.clone());
                seen = vec![false; result.total as usize];
            }
            // A result claiming another total is not this job's (bounds were checked).
            if result.total != found.total || std::mem::replace(&mut seen[result.index as usize], true) {
                continue;
            }
            count += 1;
            if selection.wants(result.status) {
                found.selected.insert(result.index, result);
            }
        }
        // On a stream an ack only makes room for more deliveries: one per batch.
        unacked += 1;
        if unacked == ACK_BATCH {
            delivery.acker.ack(BasicAckOptions { multiple: true }).await?;
            unacked = 0;
        }
    }
    fleet::amqp::close(&conn, "done").await;
    Ok(found)
}

/// The results a message of the results stream carries (one alone, or a worker's group),
/// decoded as `wait` decodes them; `job_finished` carries none, and what does not decode is
/// skipped with a warning.
fn decode(delivery: &lapin::message::Delivery) -> Vec<ItemResult> {
    let kind = delivery.properties.kind().as_ref().map(|k| k.as_str());
    match ResultsMessage::decode(kind, &delivery.data) {
        Ok(ResultsMessage::Results(results)) => results,
        Ok(ResultsMessage::JobFinished(_)) => Vec::new(),
        Err(e) => {
            tracing::warn!(error = %e, "ignoring a message on the results stream");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_selection_decides_which_statuses_are_retried() {
        use ItemStatus::*;
        let all = [Succeeded, Failed, Cancelled, Expired];
        let picked = |s: Selection| all.iter().filter(|&&st| s.wants(st)).count();
        assert_eq!(picked(Selection::NotSucceeded), 3);
        assert_eq!(picked(Selection::Failed), 1);
        assert!(!Selection::NotSucceeded.wants(Succeeded));
    }

    #[test]
    fn an_input_line_is_an_openai_batch_line() {
        let body = RawValue::from_string(r#"{"model":"m","messages":[]}"#.into()).unwrap();
        let line = InputLine { custom_id: "c1", method: "POST", url: "/v1/chat/completions", body: &body };
        let text = serde_json::to_string(&line).unwrap();
        let parsed: fleet::wire::BatchInputLine = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed.custom_id, "c1");
        assert_eq!(parsed.body.get(), body.get(), "the body is carried byte for byte");
    }
}
