//! `producer wait`: collect a job's results into an output file (OpenAI Batch output lines,
//! or Anthropic result lines with `--output-format anthropic`: see [`crate::output_format`]).
//!
//! A job's results live in its results stream, which reading does not consume: every
//! `wait` reads it from the first message, so two `wait`s on one job each get everything,
//! and a finished job can be collected again into a new file for as long as the stream is
//! kept. Exactly once in the file, whatever the stream holds: a result is written only if
//! its `custom_id` is not in the file yet. Interrupted and run again, it reads the file back
//! (dropping a torn last line) and carries on; a file that is already complete returns at
//! once. An output file belongs to one job: lines of another job in it are refused.
//!
//! **Local files are the user's.** An existing file is read back (see [`ReadBack`]) before
//! anything is written, and nothing is written to one that is not a results file of this
//! job: a line that is not a result, a line of another job, or an unfinished last line
//! that is not a torn write of ours refuses the file whole, byte for byte unchanged. Only
//! a torn last line after at least one complete result line is cut off, and only once the
//! job is known to exist. A missing file is created with `create_new` (`O_EXCL`), so never
//! through a link planted at the path; an output path that is a link to an existing file
//! is followed, but only to a file that passes the same checks (empty, or this job's
//! results), so nothing else is ever written through it.

use std::io::{BufRead, Seek, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use fleet::messages::ResultsMessage;
use fleet::topology::Topology;
use fleet::wire::{error_code, ItemResult, JobCounts, JobStatus};
use fleet::Config;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};

use crate::output_format::OutputFormat;
use crate::seen::Seen;

/// Results acked at once (one multiple-ack per batch, after an fsync). On a stream an ack
/// only makes room for more deliveries (the prefetch window); it removes nothing.
const ACK_BATCH: usize = 512;
/// Messages acked at once at most. A message may be a worker's group of results, and the
/// prefetch window (twice this) bounds what the broker sends ahead: with a group at most
/// 256 KiB (`worker::outbox::MAX_GROUP_BYTES`), 64 MiB at worst.
const ACK_BATCH_MESSAGES: usize = 128;
/// A partial batch is synced and acked after this much quiet.
const ACK_IDLE: Duration = Duration::from_millis(200);
/// Longest wait for an ack or a close: past it the connection is treated as failed.
const BROKER_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A file cannot take this job's results (exit code 2): refused before anything was written
/// to it, and left as it was.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The file already holds results of another job.
    #[error("{path} already holds results of job {other}; write job {job}'s results to another file")]
    OtherJob {
        /// The output file.
        path: String,
        /// The job whose results it holds.
        other: String,
        /// The job being collected.
        job: String,
    },
    /// `submit --wait` is about to create a job, and the file already holds results.
    #[error("{path} already holds results (of job {other}); choose a new output file for a new job")]
    NotEmpty {
        /// The output file.
        path: String,
        /// The job whose results it holds.
        other: String,
    },
    /// A line that is not a result of this fleet, in the format asked for.
    #[error("{path} line {line} is not a result line (in the {format} output format); refusing to change it")]
    NotResults {
        /// The output file.
        path: String,
        /// The offending line's number, from 1.
        line: usize,
        /// The format the lines were checked against.
        format: OutputFormat,
    },
    /// The last line has no newline and is not a torn write of this job's results (one comes
    /// only after a complete result line, and starts as a result line of the job).
    #[error(
        "{path} line {line} is unfinished (no newline) and is not a torn result line of this job; refusing to cut \
         it off or write to the file"
    )]
    Unfinished {
        /// The output file.
        path: String,
        /// The unfinished line's number, from 1.
        line: usize,
    },
    /// The file changed between being checked and being opened for writing.
    #[error("{path} changed while it was being checked; run again")]
    Changed {
        /// The output file.
        path: String,
    },
    /// `--errors` names the output (or its collection): the two need files of their own.
    #[error("the error file {path} is the output file (or its collection); give the errors a file of their own")]
    SameFile {
        /// The error file, as given.
        path: String,
    },
    /// A file that is not one of ours sits where a temporary file of the producer goes.
    #[error("{path} is in the way of a temporary file of the producer and is not one of its own; move it away and run again")]
    InTheWay {
        /// The stranger file at the temporary file's path.
        path: String,
    },
    /// The file cannot be opened for appending.
    #[error("cannot open {path} for writing: {source}")]
    Unwritable {
        /// The output file.
        path: String,
        /// Why the open failed.
        source: std::io::Error,
    },
}

/// The job id and the item index in an output line's `id` (`batch_req_<job id>_<index>`).
fn line_id(v: &serde_json::Value) -> Option<(&str, u64)> {
    let (job, index) = v["id"].as_str()?.strip_prefix("batch_req_")?.rsplit_once('_')?;
    Some((job, index.parse().ok()?))
}

/// Whether `tail`, an unfinished last line, can be a line of `job` torn by an interrupted
/// write: it starts as every line of either format starts (`id` is serialized first), or
/// is the beginning of that start.
fn torn_line_of(job: &str, tail: &[u8]) -> bool {
    let start = format!("{{\"id\":\"batch_req_{job}_");
    tail.starts_with(start.as_bytes()) || start.as_bytes().starts_with(tail)
}

/// Checks, before a job is submitted, that `path` can be written and holds no results
/// (or, for a resumed submission, only that job's). An existing file is only read; a
/// missing one is created empty (never through a link planted at the path), which proves
/// the path can be written before any job is started.
pub fn check_new_output(path: &Path, resumed: Option<&str>, format: OutputFormat) -> anyhow::Result<()> {
    let back = ReadBack::read(path, resumed, format)?;
    if let Some(other) = back.job.filter(|_| !back.seen.is_empty() && resumed.is_none()) {
        return Err(OutputError::NotEmpty { path: path.display().to_string(), other }.into());
    }
    if back.file.is_none() {
        create_new(path)?;
    }
    Ok(())
}

/// Creates `path` for reading and appending, failing if anything (a file, a link, even a
/// dangling one) is there already.
fn create_new(path: &Path) -> Result<std::fs::File, OutputError> {
    std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create_new(true)
        .open(path)
        .map_err(|source| OutputError::Unwritable { path: path.display().to_string(), source })
}

/// Fails unless `job_id` has a results stream. `finish` asks before it moves any file,
/// so that a mistyped job id leaves the user's files where they are.
pub(crate) async fn check_job(cfg: &Config, job_id: &str) -> anyhow::Result<()> {
    let conn = crate::connect(cfg, "producer wait").await?;
    let found = require_job(&conn, &Topology::from_config(cfg), job_id).await;
    fleet::amqp::close(&conn, "done").await;
    found
}

async fn require_job(conn: &lapin::Connection, topology: &Topology, job_id: &str) -> anyhow::Result<()> {
    if !topology.job_exists(conn, job_id).await? {
        anyhow::bail!(
            "no job {job_id:?} in namespace {:?} (its results queue {} does not exist)",
            topology.namespace(),
            topology.results_queue(job_id)
        );
    }
    Ok(())
}

/// How a wait ended.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Collected {
    /// The job whose results were collected.
    pub job_id: String,
    /// Results in the output file by outcome, and the job's item total.
    pub counts: JobCounts,
    /// Wall-clock seconds the wait took.
    pub elapsed_s: f64,
    /// Set when the tracker reported the job's end before every result arrived.
    pub job_status: Option<JobStatus>,
    /// The job's token usage and cost, as the tracker summed them (from its `job_finished`
    /// message, or asked once the results are in; absent if the tracker did not answer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<fleet::wire::JobUsage>,
    /// Whether `usage` is the job's final figure: false when the tracker had not folded
    /// every result yet (it trails the results stream under load); `producer status` later
    /// gives the final one.
    pub usage_final: bool,
    /// Items that failed for a reason of the fleet's, not of their request or the
    /// provider's answer ([`FLEET_SIDE`]), by error code. `wait` exits 3 when there are any.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub fleet_side: std::collections::BTreeMap<String, u64>,
}

/// Error codes of failures the fleet caused: its keys (every key of the provider refused,
/// or the last one tried), and its queues (an item the broker dead-lettered, one that kept
/// killing workers, a batch-mode item missing from its stream). Running the same request
/// again on a healthy fleet may succeed; the operator, not the request, needs fixing.
pub const FLEET_SIDE: [&str; 5] = [
    error_code::API_KEYS_REJECTED,
    error_code::KEY_REJECTED,
    error_code::DEAD_LETTERED,
    error_code::POISON,
    error_code::MISSING_ITEM,
];

/// Counts `code` in `tally` if it is one of [`FLEET_SIDE`].
fn tally_fleet_side(tally: &mut std::collections::BTreeMap<String, u64>, code: Option<&str>) {
    if let Some(code) = code.filter(|c| FLEET_SIDE.contains(c)) {
        *tally.entry(code.to_string()).or_default() += 1;
    }
}

/// Options of a wait.
pub struct WaitRequest<'a> {
    /// The job to collect.
    pub job_id: &'a str,
    /// The file the results are appended to (resumable: lines already there are kept).
    pub output: &'a Path,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// Give up after this long (the file keeps what arrived; run again to resume).
    pub timeout: Option<Duration>,
    /// The format of the output file's lines.
    pub format: OutputFormat,
}

/// A results file read back before anything is written to it: what it holds, checked
/// line by line. Reading it changes nothing; [`ReadBack::open`] then makes it ready for
/// appending.
pub(crate) struct ReadBack {
    /// The file, opened for reading and appending; `None` when nothing is at the path.
    file: Option<std::fs::File>,
    /// The custom_ids of the complete lines.
    seen: Seen,
    counts: JobCounts,
    /// Fleet-side failures among the lines (see [`FLEET_SIDE`]; read from `error.code`).
    fleet_side: std::collections::BTreeMap<String, u64>,
    /// The job the lines belong to (`None` without a complete line).
    job: Option<String>,
    /// Bytes of complete lines; past them, a torn last line of ours.
    good_len: u64,
    /// Bytes in the file when it was read.
    len: u64,
}

impl ReadBack {
    /// Reads `path` back, writing nothing: every complete line must be a result in
    /// `format` (and of `job_id` when given); an unfinished last line only passes as a
    /// torn write of the job after at least one complete line. Nothing at the path (or a
    /// dangling link, which [`ReadBack::open`] then refuses to create through) reads as an
    /// empty file.
    pub(crate) fn read(path: &Path, job_id: Option<&str>, format: OutputFormat) -> anyhow::Result<ReadBack> {
        let shown = || path.display().to_string();
        // Opened for appending already: a file that cannot be written is refused now, and
        // the handle that was checked is the one written to (no second lookup of the path).
        let file = match std::fs::OpenOptions::new().read(true).append(true).open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(ReadBack {
                    file: None,
                    seen: Seen::default(),
                    counts: JobCounts::default(),
                    fleet_side: Default::default(),
                    job: None,
                    good_len: 0,
                    len: 0,
                })
            }
            Err(source) => return Err(OutputError::Unwritable { path: shown(), source }.into()),
        };
        let mut seen = Seen::default();
        let mut counts = JobCounts::default();
        let mut fleet_side = std::collections::BTreeMap::new();
        let mut job: Option<String> = None;
        let mut good_len = 0u64;
        let mut reader = std::io::BufReader::new(&file);
        let mut line = Vec::new();
        let mut number = 0;
        loop {
            line.clear();
            let n = reader.read_until(b'\n', &mut line)?;
            if n == 0 {
                break;
            }
            number += 1;
            if line.last() != Some(&b'\n') {
                // The last line has no newline: a torn write of ours can only follow a
                // complete line of the job (a file that is one unfinished line, like
                // `echo -n notes`, was never written by `wait`).
                if !job.as_deref().is_some_and(|job| torn_line_of(job, &line)) {
                    return Err(OutputError::Unfinished { path: shown(), line: number }.into());
                }
                break;
            }
            let not_results = || OutputError::NotResults { path: shown(), line: number, format };
            let v: serde_json::Value = serde_json::from_slice(&line).map_err(|_| not_results())?;
            let (line_job, index) = line_id(&v).ok_or_else(not_results)?;
            let status = format.status_of(&v).ok_or_else(not_results)?;
            if let Some(want) = job_id.filter(|want| *want != line_job) {
                return Err(OutputError::OtherJob {
                    path: shown(),
                    other: line_job.to_string(),
                    job: want.to_string(),
                }
                .into());
            }
            job.get_or_insert_with(|| line_job.to_string());
            if seen.insert(index) {
                counts.add(status);
                tally_fleet_side(&mut fleet_side, v.pointer("/error/code").and_then(|c| c.as_str()));
            }
            good_len += n as u64;
        }
        drop(reader);
        let len = good_len + line.len() as u64;
        Ok(ReadBack { file: Some(file), seen, counts, fleet_side, job, good_len, len })
    }

    /// Whether a file was found at the path.
    pub(crate) fn exists(&self) -> bool {
        self.file.is_some()
    }

    /// Makes the file read back ready for appending at `path` (where it may have been
    /// renamed since): created if there was none, its torn last line cut off. Returns it
    /// with the custom_ids already in it and their counts.
    pub(crate) fn open(self, path: &Path) -> anyhow::Result<(std::fs::File, Seen, JobCounts)> {
        let mut file = match self.file {
            Some(file) => file,
            None => create_new(path)?,
        };
        let len = file.metadata()?.len();
        if len != self.len {
            // Written to since it was checked (another `wait` on the same file?): what is
            // there now has not been checked, so it is not cut.
            return Err(OutputError::Changed { path: path.display().to_string() }.into());
        }
        if len != self.good_len {
            file.set_len(self.good_len)?;
        }
        file.seek(std::io::SeekFrom::End(0))?;
        Ok((file, self.seen, self.counts))
    }
}

/// Why a consuming session ended without finishing.
enum Interrupted {
    /// The broker connection failed: reconnect and carry on (unacked results come again).
    Broker(anyhow::Error),
    /// Anything else (the output file, the timeout): give up.
    Fatal(anyhow::Error),
}

/// Collection state that survives reconnections.
struct Collector {
    out: std::io::BufWriter<std::fs::File>,
    seen: Seen,
    counts: JobCounts,
    /// See [`Collected::fleet_side`].
    fleet_side: std::collections::BTreeMap<String, u64>,
    total: Option<u64>,
    job_status: Option<JobStatus>,
    usage: Option<fleet::wire::JobUsage>,
    usage_final: bool,
    /// Why the tracker ended the job early (`incomplete_submission`).
    abandoned: Option<String>,
    bar: indicatif::ProgressBar,
    format: OutputFormat,
    /// Acker of the newest message not yet acked (acks are cumulative).
    unacked: Option<lapin::Acker>,
    unacked_n: usize,
    /// Messages behind `unacked`.
    unacked_messages: usize,
}

impl Collector {
    fn complete(&self) -> bool {
        // A job abandoned mid-submission never gets all its results; the tracker announces
        // it only after every published item has finished, so nothing more will come.
        self.total.is_some_and(|t| self.seen.len() >= t) || self.abandoned.is_some()
    }

    /// Makes the written lines durable, then acks every message up to the last one.
    async fn sync_and_ack(&mut self) -> Result<(), Interrupted> {
        self.out.flush().and_then(|()| self.out.get_ref().sync_data()).map_err(|e| Interrupted::Fatal(e.into()))?;
        self.unacked_n = 0;
        self.unacked_messages = 0;
        if let Some(acker) = self.unacked.take() {
            // Bounded: an ack that never completes must not hold a finished wait (the lines
            // are already on disk; a redelivery after reconnecting is skipped as a duplicate).
            match tokio::time::timeout(BROKER_CALL_TIMEOUT, acker.ack(BasicAckOptions { multiple: true })).await {
                Ok(res) => res.map_err(|e| Interrupted::Broker(e.into()))?,
                Err(_) => return Err(Interrupted::Broker(anyhow::anyhow!("the broker did not take an ack in time"))),
            };
        }
        Ok(())
    }

    /// Records one message from the results stream: a result, a group of results, or the
    /// tracker's `job_finished`. Returns how many results it held.
    fn take(&mut self, delivery: &lapin::message::Delivery) -> anyhow::Result<usize> {
        let kind = delivery.properties.kind().as_ref().map(|k| k.as_str());
        let results = match ResultsMessage::decode(kind, &delivery.data) {
            Ok(ResultsMessage::JobFinished(summary)) => {
                self.total.get_or_insert(summary.counts.total);
                self.job_status = Some(summary.status);
                self.usage = summary.usage;
                self.usage_final = true;
                self.abandoned = summary.reason;
                return Ok(0);
            }
            Ok(ResultsMessage::Results(results)) => results,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring a message on the results stream");
                return Ok(0);
            }
        };
        for result in &results {
            self.write(result)?;
        }
        Ok(results.len())
    }

    /// Writes a result to the file unless its item's is there already. A result whose index
    /// is past the job's total names no item of it: it is not written, and cannot make the
    /// wait end early by counting as one.
    fn write(&mut self, result: &ItemResult) -> anyhow::Result<()> {
        if self.total.is_none() {
            self.bar.set_length(result.total);
        }
        let total = *self.total.get_or_insert(result.total);
        if result.index < total && self.seen.insert(result.index) {
            self.format.write_line(&mut self.out, result)?;
            self.counts.add(result.status);
            tally_fleet_side(&mut self.fleet_side, result.error.as_ref().map(|e| e.code.as_str()));
            self.bar.inc(1);
        }
        Ok(())
    }

    /// Consumes `queue` on `conn` until every result is in (`Ok`) or something stops it.
    async fn consume(
        &mut self,
        conn: &lapin::Connection,
        queue: &str,
        deadline: Option<tokio::time::Instant>,
        output: &Path,
    ) -> Result<(), Interrupted> {
        let broker = |e: lapin::Error| Interrupted::Broker(e.into());
        let ch = fleet::amqp::open_channel(conn).await.map_err(broker)?;
        ch.basic_qos(2 * ACK_BATCH_MESSAGES as u16, BasicQosOptions::default()).await.map_err(broker)?;
        // Every session reads the stream from its first message; what the file holds already
        // is skipped. (The stream keeps no per-reader position, so readers never interfere.)
        let mut from_first = FieldTable::default();
        from_first.insert("x-stream-offset".into(), AMQPValue::LongString("first".into()));
        let mut consumer = ch
            .basic_consume(queue.into(), "producer-wait".into(), BasicConsumeOptions::default(), from_first)
            .await
            .map_err(broker)?;
        while !self.complete() {
            let next = tokio::select! {
                n = consumer.next() => n,
                _ = tokio::time::sleep(ACK_IDLE), if self.unacked_n > 0 => {
                    self.sync_and_ack().await?;
                    continue;
                }
                _ = sleep_until(deadline) => {
                    self.sync_and_ack().await?;
                    return Err(Interrupted::Fatal(anyhow::anyhow!(
                        "timed out with {} results in {}; run `producer wait` again to resume",
                        self.seen.len(),
                        output.display()
                    )));
                }
            };
            let delivery = match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(broker(e)),
                None => return Err(Interrupted::Broker(anyhow::anyhow!("the broker closed the results consumer"))),
            };
            let results = self.take(&delivery).map_err(Interrupted::Fatal)?;
            self.unacked = Some(delivery.acker);
            self.unacked_n += results.max(1);
            self.unacked_messages += 1;
            if self.unacked_n >= ACK_BATCH || self.unacked_messages >= ACK_BATCH_MESSAGES {
                self.sync_and_ack().await?;
            }
        }
        self.sync_and_ack().await?;
        // Stop deliveries before the connection closes (a stream keeps delivering).
        let _ = tokio::time::timeout(BROKER_CALL_TIMEOUT, ch.close(200, "done".into())).await;
        Ok(())
    }
}

/// Collects results of `job_id` until every item has one, reconnecting after a broker
/// restart (results not acked before it are delivered again and skipped as duplicates).
pub async fn wait(cfg: &Config, req: &WaitRequest<'_>) -> anyhow::Result<Collected> {
    let started = Instant::now();
    let topology = Topology::from_config(cfg);
    // Refused before anything is written: a file that is not this job's, then a job that
    // does not exist. Only then is the file created, or its torn last line cut off.
    let back = ReadBack::read(req.output, Some(req.job_id), req.format)?;
    let mut conn = crate::connect(cfg, "producer wait").await?;
    require_job(&conn, &topology, req.job_id).await?;
    let fleet_side = back.fleet_side.clone();
    let (file, seen, counts) = back.open(req.output)?;
    let bar = crate::progress::bar(0, req.progress, "collecting");
    bar.set_position(seen.len());
    let mut c = Collector {
        out: std::io::BufWriter::with_capacity(1 << 16, file),
        seen,
        counts,
        fleet_side,
        total: None,
        job_status: None,
        usage: None,
        usage_final: false,
        abandoned: None,
        bar,
        format: req.format,
        unacked: None,
        unacked_n: 0,
        unacked_messages: 0,
    };
    let queue = topology.results_queue(req.job_id);
    let deadline = req.timeout.map(|t| tokio::time::Instant::now() + t);
    loop {
        match c.consume(&conn, &queue, deadline, req.output).await {
            Ok(()) => break,
            Err(Interrupted::Fatal(e)) => return Err(e),
            Err(Interrupted::Broker(e)) => {
                tracing::warn!(error = %format!("{e:#}"), results = c.seen.len(), "lost the broker; reconnecting");
                c.unacked = None;
                c.unacked_n = 0;
                c.unacked_messages = 0;
                let never = tokio_util::sync::CancellationToken::new();
                let urls = cfg.amqp.addresses();
                let reconnect = fleet::amqp::connect_with_retry(&urls, "producer wait", &never);
                conn = match deadline {
                    Some(d) => tokio::time::timeout_at(d, reconnect).await.ok().flatten(),
                    None => reconnect.await,
                }
                .ok_or_else(|| anyhow::anyhow!("timed out reconnecting to RabbitMQ; run `producer wait` again"))?;
            }
        }
    }
    c.bar.finish_and_clear();
    fleet::amqp::close(&conn, "done").await;
    c.counts.total = c.total.unwrap_or(c.seen.len());
    if let Some(reason) = &c.abandoned {
        anyhow::bail!(
            "job {} ended failed ({reason}): its submission stopped before every item was published and was \
             not resumed; the {} results of the published items are in {}",
            req.job_id,
            c.seen.len(),
            req.output.display()
        );
    }
    Ok(Collected {
        job_id: req.job_id.to_string(),
        counts: c.counts,
        elapsed_s: started.elapsed().as_secs_f64(),
        job_status: c.job_status,
        usage: c.usage,
        usage_final: c.usage_final,
        fleet_side: c.fleet_side,
    })
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str, content: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("fleet-collect-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out.jsonl");
        std::fs::write(&path, content).unwrap();
        path
    }

    /// An output line: answered 200 when `error` is `null`, else no answer and that error.
    fn line(job: &str, index: u64, error: &str) -> String {
        let response = if error == "null" { r#"{"status_code":200,"request_id":"r","body":{}}"# } else { "null" };
        format!(
            "{{\"id\":\"batch_req_{job}_{index}\",\"custom_id\":\"c{index}\",\"response\":{response},\"error\":{error}}}\n"
        )
    }

    /// What `wait` does to its file before collecting: read it back, then open it.
    fn open_output(
        path: &Path,
        job_id: Option<&str>,
        format: OutputFormat,
    ) -> anyhow::Result<(std::fs::File, Seen, JobCounts, Option<String>)> {
        let back = ReadBack::read(path, job_id, format)?;
        let job = back.job.clone();
        let (file, seen, counts) = back.open(path)?;
        Ok((file, seen, counts, job))
    }

    #[test]
    fn a_torn_last_line_is_dropped_and_the_file_resumes_after_the_good_ones() {
        let good = line("job_a", 0, "null") + &line("job_a", 1, r#"{"code":"expired","message":"late"}"#);
        let path = scratch("torn", &format!("{good}{{\"id\":\"batch_req_job_a_2\",\"cus"));
        let (_, seen, counts, job) = open_output(&path, Some("job_a"), OutputFormat::Openai).unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!((counts.succeeded, counts.expired), (1, 1));
        assert_eq!(job.as_deref(), Some("job_a"));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), good, "the torn tail is cut off");
    }

    #[test]
    fn a_line_of_another_job_or_no_result_at_all_is_refused() {
        let path = scratch("other", &line("job_a", 0, "null"));
        let err = open_output(&path, Some("job_b"), OutputFormat::Openai).unwrap_err();
        assert!(matches!(err.downcast_ref::<OutputError>(), Some(OutputError::OtherJob { .. })), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), line("job_a", 0, "null"), "left untouched");
        let path = scratch("garbage", &(line("job_a", 0, "null") + "hello\n"));
        let err = open_output(&path, Some("job_a"), OutputFormat::Openai).unwrap_err().to_string();
        assert!(err.contains("line 2 is not a result line"), "{err}");
        let err = check_new_output(&scratch("new", &line("job_a", 0, "null")), None, OutputFormat::Openai)
            .unwrap_err()
            .to_string();
        assert!(err.contains("already holds results (of job job_a)"), "{err}");
    }

    #[test]
    fn a_file_is_read_back_in_its_own_format_only() {
        let anthropic = concat!(
            r#"{"id":"batch_req_job_a_0","custom_id":"c0","result":{"type":"succeeded","message":{}}}"#,
            "\n",
            r#"{"id":"batch_req_job_a_1","custom_id":"c1","result":{"type":"canceled"}}"#,
            "\n",
        );
        let path = scratch("anthropic", anthropic);
        let (_, seen, counts, _) = open_output(&path, Some("job_a"), OutputFormat::Anthropic).unwrap();
        assert_eq!((seen.len(), counts.succeeded, counts.cancelled), (2, 1, 1));
        let err = open_output(&path, Some("job_a"), OutputFormat::Openai).unwrap_err().to_string();
        assert!(err.contains("line 1 is not a result line (in the openai output format)"), "{err}");
        let path = scratch("openai-as-anthropic", &line("job_a", 0, "null"));
        let err = open_output(&path, Some("job_a"), OutputFormat::Anthropic).unwrap_err().to_string();
        assert!(err.contains("(in the anthropic output format)"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), line("job_a", 0, "null"), "left untouched");
    }

    #[test]
    fn a_file_without_a_newline_is_refused_and_left_unchanged() {
        let one_line = line("job_a", 0, "null");
        let cases = [
            ("precious", "notes".to_string()),
            // A whole result, but nothing before it: not a torn write that follows a line.
            ("lone-result", one_line.trim_end().to_string()),
            ("notes-after-results", one_line.clone() + "notes"),
            ("other-job-tail", one_line.clone() + r#"{"id":"batch_req_job_b_1","cus"#),
        ];
        for (name, content) in cases {
            let path = scratch(name, &content);
            let err = open_output(&path, Some("job_a"), OutputFormat::Openai).unwrap_err();
            assert!(matches!(err.downcast_ref::<OutputError>(), Some(OutputError::Unfinished { .. })), "{name}: {err}");
            assert!(err.to_string().contains(&path.display().to_string()), "{name}: the file is named: {err}");
            let err = check_new_output(&path, None, OutputFormat::Openai).unwrap_err();
            assert!(matches!(err.downcast_ref::<OutputError>(), Some(OutputError::Unfinished { .. })), "{name}: {err}");
            assert_eq!(std::fs::read_to_string(&path).unwrap(), content, "{name}: byte for byte unchanged");
        }
    }

    #[test]
    fn a_torn_tail_of_the_job_may_be_as_short_as_one_byte() {
        let good = line("job_a", 0, "null");
        let path = scratch("one-byte", &format!("{good}{{"));
        let (_, seen, _, _) = open_output(&path, Some("job_a"), OutputFormat::Openai).unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), good);
    }

    #[test]
    fn reading_back_writes_nothing_and_a_file_changed_since_is_not_cut() {
        let good = line("job_a", 0, "null");
        let torn = format!("{good}{{\"id\":\"batch_req_job_a_1\"");
        let path = scratch("changed", &torn);
        let back = ReadBack::read(&path, Some("job_a"), OutputFormat::Openai).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), torn, "reading cuts nothing");
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"more").unwrap();
        let err = back.open(&path).unwrap_err();
        assert!(matches!(err.downcast_ref::<OutputError>(), Some(OutputError::Changed { .. })), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), torn + "more");
    }

    #[test]
    fn a_new_output_is_created_only_where_nothing_is() {
        let path = scratch("created", "");
        std::fs::remove_file(&path).unwrap();
        check_new_output(&path, None, OutputFormat::Openai).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"", "created empty");
        check_new_output(&path, None, OutputFormat::Openai).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn a_link_at_the_output_path_is_followed_only_to_a_results_file() {
        let dir = scratch("links", "").parent().unwrap().to_path_buf();
        let precious = dir.join("precious.txt");
        std::fs::write(&precious, "notes\n").unwrap();
        let link = dir.join("to-precious.jsonl");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&precious, &link).unwrap();
        assert!(open_output(&link, Some("job_a"), OutputFormat::Openai).is_err());
        assert!(check_new_output(&link, None, OutputFormat::Openai).is_err());
        assert_eq!(std::fs::read_to_string(&precious).unwrap(), "notes\n", "the target is untouched");

        // A dangling link is not created through: its target stays absent.
        let nowhere = dir.join("nowhere.txt");
        let _ = std::fs::remove_file(&nowhere);
        let dangling = dir.join("dangling.jsonl");
        let _ = std::fs::remove_file(&dangling);
        std::os::unix::fs::symlink(&nowhere, &dangling).unwrap();
        let err = open_output(&dangling, Some("job_a"), OutputFormat::Openai).unwrap_err();
        assert!(matches!(err.downcast_ref::<OutputError>(), Some(OutputError::Unwritable { .. })), "{err}");
        assert!(check_new_output(&dangling, None, OutputFormat::Openai).is_err());
        assert!(!nowhere.exists(), "nothing was created through the link");

        // A link to this job's results is the user's way of naming the file: appended to.
        let results = dir.join("results.jsonl");
        std::fs::write(&results, line("job_a", 0, "null")).unwrap();
        let to_results = dir.join("to-results.jsonl");
        let _ = std::fs::remove_file(&to_results);
        std::os::unix::fs::symlink(&results, &to_results).unwrap();
        let (mut file, seen, _, _) = open_output(&to_results, Some("job_a"), OutputFormat::Openai).unwrap();
        assert_eq!(seen.len(), 1);
        file.write_all(line("job_a", 1, "null").as_bytes()).unwrap();
        assert_eq!(std::fs::read_to_string(&results).unwrap(), line("job_a", 0, "null") + &line("job_a", 1, "null"));
    }

    #[test]
    fn the_job_id_comes_back_out_of_the_line_id() {
        let v: serde_json::Value = serde_json::from_str(&line("job_0123abcd", 42, "null")).unwrap();
        assert_eq!(line_id(&v), Some(("job_0123abcd", 42)));
        assert_eq!(line_id(&serde_json::json!({"id": "something"})), None);
    }
}
