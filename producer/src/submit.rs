//! `producer submit`: validate the file, then publish it as one job.
//!
//! A submission that dies half-way (killed, the machine lost) is resumed by running
//! `submit` again with the same file (recognised by its content hash, or named with
//! `--resume JOB`): the same job id, only the items the broker had not confirmed (see
//! [`crate::resume`]).
//!
//! Order matters: the job's items queue and results queue exist before any item is
//! published (so no item or result can be unroutable), the ledger learns of the job before
//! its items (so the tracker never sees an item of an unknown job), and the workers learn
//! of the job's queue (`job_opened` on the control stream) before its first item.

use std::collections::VecDeque;
use std::path::Path;

use fleet::amqp::{self, PendingConfirm};
use fleet::batch::JobMode;
use fleet::topology::Topology;
use fleet::wire::{ControlMessage, Item, LedgerEvent};
use fleet::Config;
use serde_json::value::RawValue;

use crate::batch::{self, ChunkPlan, ModeArg};
use crate::resume::{self, Record};
use crate::validate::{self, Rules};

/// What the user asked for.
pub struct SubmitRequest<'a> {
    pub file: &'a Path,
    pub provider: &'a str,
    /// Replaces `body.model` of every request.
    pub model: Option<&'a str>,
    /// Items not finished by this instant (ms since epoch) end `expired`.
    pub deadline_ms: Option<u64>,
    pub progress: bool,
    /// Resume this job's unfinished submission (refused unless the file is the one it was
    /// started with).
    pub resume: Option<&'a str>,
    /// `--mode`: online, batch (the provider's batch API) or auto.
    pub mode: ModeArg,
    /// `--fallback online`: requests a provider batch let expire are re-run online.
    pub fallback_online: bool,
    /// Weight of the job's share of the provider (1 to [`fleet::wire::MAX_PRIORITY`]).
    pub priority: u32,
    /// Spend cap: reached, the tracker cancels the job (reason `budget`).
    pub max_cost: Option<f64>,
}

/// A submitted job.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Submitted {
    pub job_id: String,
    pub total: u64,
}

/// Errors the CLI maps to exit code 2 (the user's input, not the system, is at fault).
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("unknown provider {name:?}; configured providers: {known}")]
    UnknownProvider { name: String, known: String },
    #[error(transparent)]
    Invalid(#[from] validate::ValidationError),
    #[error("no unfinished submission of job {job} is recorded for this file ({record} does not name it)")]
    NoRecord { job: String, record: String },
    #[error(
        "job {job} was started from other content than this file (or with provider {provider}); \
         resume it with the file it was started with, or delete {record} to start a new job"
    )]
    NotTheSameFile { job: String, provider: String, record: String },
    #[error("the file has {total} requests; one job holds at most {} (split the file)", fleet::wire::MAX_JOB_ITEMS)]
    TooMany { total: u64 },
    #[error("provider {name:?} has no batch API configured (set providers.{name}.batch = true, or use --mode online)")]
    NoBatchApi { name: String },
}

/// A new job id: short, unique, safe in queue names and URLs.
pub fn new_job_id() -> String {
    format!("job_{}", &uuid::Uuid::new_v4().simple().to_string()[..16])
}

/// Validates and publishes `req.file`; nothing is published if any line is bad.
pub async fn submit(cfg: &Config, req: &SubmitRequest<'_>) -> anyhow::Result<Submitted> {
    let provider = cfg.providers.get(req.provider).ok_or_else(|| InputError::UnknownProvider {
        name: req.provider.to_string(),
        known: cfg.providers.keys().cloned().collect::<Vec<_>>().join(", "),
    })?;
    let rules = Rules { kind: provider.kind, max_body_bytes: cfg.producer.max_body_bytes };
    let total = validate::validate_file(req.file, &rules).map_err(InputError::from)?;
    if total > fleet::wire::MAX_JOB_ITEMS {
        return Err(InputError::TooMany { total }.into());
    }

    let deadline_s = req.deadline_ms.map(|d| d.saturating_sub(fleet::now_ms()) / 1000);
    let mode = batch::resolve(req.mode, provider, deadline_s);
    if mode == JobMode::Batch && !provider.batch {
        return Err(InputError::NoBatchApi { name: req.provider.to_string() }.into());
    }
    // A resumed submission may have published chunk messages already (see `ChunkPlan`).
    let resumed = resume::load(req.file)?.is_some();
    let record = start_or_resume(req, total, mode)?;
    let job = Job {
        chunks_maybe_published: std::cell::Cell::new(resumed),
        mode: record.mode.unwrap_or(JobMode::Online),
        fallback_online: record.fallback_online,
        provider_cfg: provider.clone(),
        topology: Topology::from_config(cfg),
        job_id: record.job_id.clone(),
        total,
        submitted_at_ms: record.submitted_at_ms,
        rules,
        window: cfg.producer.confirm_window.max(1),
    };
    // The items keep the job's first deadline and model, whatever this run was given.
    let model = record.model.clone();
    let req = &SubmitRequest { deadline_ms: record.deadline_ms, model: model.as_deref(), ..*req };
    let mut progress = Progress { file: req.file, record, saving: true };
    progress.save();
    let mut conn = crate::connect(cfg, "producer submit").await?;
    let bar = crate::progress::bar(total, req.progress, "submitting");
    // Announced again on a resume: the tracker ignores a second `job_submitted`, and the
    // first run may have died before the broker confirmed it.
    let mut announced = false;
    let mut confirmed = progress.record.confirmed;
    let mut failures_without_progress = 0;
    loop {
        match job.publish(&conn, req, &mut announced, confirmed, &bar, &mut progress).await {
            Ok(()) => break,
            Err(Interrupted::Fatal(e)) => return Err(e.context(format!("job {}", job.job_id))),
            Err(Interrupted::Broker { confirmed: upto, error }) => {
                failures_without_progress = if upto > confirmed { 1 } else { failures_without_progress + 1 };
                confirmed = upto;
                if failures_without_progress > MAX_RECONNECTS {
                    return Err(error
                        .context(format!("job {}: publishing failed after {confirmed} of {total} items", job.job_id)));
                }
                // Items after the last confirmed one are published again: at-least-once,
                // duplicates are dropped downstream by (job, index).
                tracing::warn!(error = %format!("{error:#}"), confirmed, "lost the broker while submitting; reconnecting");
                let stop = tokio_util::sync::CancellationToken::new();
                let urls = cfg.amqp.addresses();
                let reconnect = amqp::connect_with_retry(&urls, "producer submit", &stop);
                conn = tokio::time::timeout(RECONNECT_TIMEOUT, reconnect)
                    .await
                    .ok()
                    .flatten()
                    .ok_or_else(|| anyhow::anyhow!("job {}: cannot reconnect to RabbitMQ", job.job_id))?;
            }
        }
    }
    bar.finish_and_clear();
    fleet::amqp::close(&conn, "done").await;
    if let Err(e) = resume::remove(req.file) {
        tracing::warn!(error = %e, "cannot delete the submission record; delete it by hand");
    }
    Ok(Submitted { job_id: job.job_id, total })
}

/// The record of this submission: a new job, or the unfinished one this file was started
/// as (named by `--resume`, or recognised by the file's content hash).
fn start_or_resume(req: &SubmitRequest<'_>, total: u64, mode: JobMode) -> anyhow::Result<Record> {
    let hash = resume::content_hash(req.file)?;
    let record_name = resume::record_path(req.file).display().to_string();
    match (resume::load(req.file)?, req.resume) {
        (Some(r), wanted) if wanted.is_none_or(|j| j == r.job_id) => {
            if r.content_hash != hash || r.provider != req.provider || r.total != total {
                return Err(
                    InputError::NotTheSameFile { job: r.job_id, provider: r.provider, record: record_name }.into()
                );
            }
            eprintln!("resuming the submission of job {} from item {} of {}", r.job_id, r.confirmed, r.total);
            Ok(r)
        }
        (_, Some(job)) => Err(InputError::NoRecord { job: job.to_string(), record: record_name }.into()),
        (None, None) => Ok(Record {
            job_id: new_job_id(),
            content_hash: hash,
            provider: req.provider.to_string(),
            model: req.model.map(str::to_string),
            total,
            submitted_at_ms: fleet::now_ms(),
            deadline_ms: req.deadline_ms,
            confirmed: 0,
            mode: Some(mode),
            fallback_online: req.fallback_online,
        }),
        (Some(_), None) => unreachable!("matched above"),
    }
}

/// Confirmed progress of a submission, written to its record as it advances.
struct Progress<'a> {
    file: &'a Path,
    record: Record,
    /// Off after a failed write: the submission goes on, but cannot be resumed.
    saving: bool,
}

/// The record is rewritten after this many more confirmed items (and at the start).
const SAVE_EVERY: u64 = 1024;

impl Progress<'_> {
    fn confirmed(&mut self, upto: u64) {
        if upto >= self.record.confirmed + SAVE_EVERY {
            self.record.confirmed = upto;
            self.save();
        }
    }

    fn save(&mut self) {
        if !self.saving {
            return;
        }
        if let Err(e) = resume::save(self.file, &self.record) {
            self.saving = false;
            tracing::warn!(error = %e, "cannot record the submission's progress; if it is interrupted, it cannot be resumed");
        }
    }
}

/// Consecutive broker failures without a newly confirmed item before giving up.
const MAX_RECONNECTS: u32 = 5;
/// How long to keep trying to reconnect after a failure.
const RECONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Why a publishing session stopped.
enum Interrupted {
    /// The broker failed; every item before `confirmed` is safely queued.
    Broker { confirmed: u64, error: anyhow::Error },
    /// The file or the job is at fault: give up.
    Fatal(anyhow::Error),
}

/// A job being published.
struct Job {
    topology: Topology,
    job_id: String,
    total: u64,
    submitted_at_ms: u64,
    rules: Rules,
    window: usize,
    /// Online (the items queue) or batch (the job's batch items stream, then chunks).
    mode: JobMode,
    /// Chunk messages of this job may be on the broker already (a resumed submission, or a
    /// retry after the broker failed while they were published).
    chunks_maybe_published: std::cell::Cell<bool>,
    fallback_online: bool,
    provider_cfg: fleet::config::ProviderConfig,
}

impl Job {
    /// Declares the job's queues, announces it to the ledger (once), then publishes every
    /// item from index `start` on, keeping up to `window` confirms outstanding.
    async fn publish(
        &self,
        conn: &lapin::Connection,
        req: &SubmitRequest<'_>,
        announced: &mut bool,
        start: u64,
        bar: &indicatif::ProgressBar,
        progress: &mut Progress<'_>,
    ) -> Result<(), Interrupted> {
        let broker = |confirmed: u64| {
            move |e: lapin::Error| {
                if fleet::topology::is_precondition_failed(&e) {
                    Interrupted::Fatal(anyhow::Error::from(e).context(fleet::topology::PRECONDITION_HINT))
                } else {
                    Interrupted::Broker { confirmed, error: e.into() }
                }
            }
        };
        let ch = amqp::confirm_channel(conn).await.map_err(broker(start))?;
        self.topology.declare_common(&ch).await.map_err(broker(start))?;
        self.topology.declare_items_queue(&ch, req.provider).await.map_err(broker(start))?;
        self.topology.declare_job_items_queue(&ch, req.provider, &self.job_id).await.map_err(broker(start))?;
        self.topology.declare_results_queue(&ch, &self.job_id).await.map_err(broker(start))?;
        if self.mode == JobMode::Batch {
            self.topology.declare_batch_items_stream(&ch, &self.job_id).await.map_err(broker(start))?;
            let poll_s = self.provider_cfg.batch_poll_interval_s;
            self.topology.declare_chunk_queues(&ch, req.provider, poll_s).await.map_err(broker(start))?;
        }
        if !*announced {
            let event = LedgerEvent::JobSubmitted {
                job_id: self.job_id.clone(),
                provider: req.provider.to_string(),
                total: self.total,
                submitted_at_ms: self.submitted_at_ms,
                deadline_ms: req.deadline_ms,
                // The job shows `submitting` until `submission_complete`, and is abandoned
                // by the tracker if that never comes (see `producer.submit_timeout_s`).
                submitting: true,
                max_cost: req.max_cost,
            };
            let event = serde_json::to_vec(&event).map_err(|e| Interrupted::Fatal(e.into()))?;
            amqp::publish_confirmed(&ch, "", &self.topology.ledger_queue(), &event, amqp::persistent_json())
                .await
                .map_err(|e| Interrupted::Broker { confirmed: start, error: e.into() })?;
            // The workers serving the provider start consuming the job's queue (again on a
            // resume: a worker that knows the job already ignores it).
            let opened = ControlMessage::JobOpened {
                job_id: self.job_id.clone(),
                provider: req.provider.to_string(),
                priority: req.priority,
            };
            let opened = serde_json::to_vec(&opened).map_err(|e| Interrupted::Fatal(e.into()))?;
            amqp::publish_confirmed(&ch, "", &self.topology.control_stream(), &opened, amqp::persistent_json())
                .await
                .map_err(|e| Interrupted::Broker { confirmed: start, error: e.into() })?;
            *announced = true;
        }
        bar.set_position(start);
        let (exchange, routing_key) = batch::destination(&self.topology, self.mode, &self.job_id);
        let mut chunker = batch::chunker(&self.provider_cfg);
        let mut pending: VecDeque<(u64, PendingConfirm)> = VecDeque::with_capacity(self.window);
        let mut payload = Vec::with_capacity(4096);
        let mut index = 0u64;
        let fatal = |e: anyhow::Error| Interrupted::Fatal(e);
        // The file is read a second time (the first pass validated it), by a blocking thread
        // feeding a bounded channel, so memory stays bounded whatever the file's size.
        let mut lines = read_lines(req.file.to_path_buf());
        while let Some(raw) = lines.recv().await {
            let raw = raw.map_err(|e| fatal(e.into()))?;
            let this = index;
            index += 1;
            let line = validate::check_line(&raw, &self.rules)
                .map_err(|e| fatal(anyhow::anyhow!("file changed while submitting: {e}")))?;
            // Chunk boundaries depend on every line, so lines a resumed run skips count too.
            chunker.push(fleet::batch::line_bytes(raw.len()), &line.url);
            if this < start {
                continue;
            }
            let body = match req.model {
                Some(model) => with_model(&line.body, model).map_err(fatal)?,
                None => line.body,
            };
            let item = Item {
                job_id: self.job_id.clone(),
                index: this,
                total: self.total,
                custom_id: line.custom_id,
                provider: req.provider.to_string(),
                url: line.url,
                body,
                attempt: 0,
                submitted_at_ms: self.submitted_at_ms,
                deadline_ms: req.deadline_ms,
                first_delay_ms: None,
            };
            payload.clear();
            serde_json::to_writer(&mut payload, &item).map_err(|e| fatal(e.into()))?;
            if pending.len() >= self.window {
                let (i, p) = pending.pop_front().expect("window is non-empty");
                p.wait().await.map_err(|e| Interrupted::Broker { confirmed: i, error: e.into() })?;
                bar.set_position(i + 1);
                progress.confirmed(i + 1);
            }
            let oldest = pending.front().map_or(this, |(i, _)| *i);
            let p = amqp::publish(&ch, &exchange, &routing_key, &payload, amqp::persistent_json())
                .await
                .map_err(|e| Interrupted::Broker { confirmed: oldest, error: e.into() })?;
            pending.push_back((this, p));
        }
        while let Some((i, p)) = pending.pop_front() {
            p.wait().await.map_err(|e| Interrupted::Broker { confirmed: i, error: e.into() })?;
        }
        if index != self.total {
            return Err(fatal(anyhow::anyhow!(
                "file changed while submitting: validated {} requests, read {index}",
                self.total
            )));
        }
        if self.mode == JobMode::Batch {
            let plan = ChunkPlan {
                topology: &self.topology,
                job_id: &self.job_id,
                provider: req.provider,
                total: self.total,
                submitted_at_ms: self.submitted_at_ms,
                deadline_ms: req.deadline_ms,
                fallback_online: self.fallback_online,
                maybe_published: self.chunks_maybe_published.replace(true),
            };
            batch::publish_chunks(&ch, &plan, &chunker.finish())
                .await
                .map_err(|e| Interrupted::Broker { confirmed: self.total, error: e })?;
        }
        let done = LedgerEvent::SubmissionComplete { job_id: self.job_id.clone() };
        let done = serde_json::to_vec(&done).map_err(|e| fatal(e.into()))?;
        amqp::publish_confirmed(&ch, "", &self.topology.ledger_queue(), &done, amqp::persistent_json())
            .await
            .map_err(|e| Interrupted::Broker { confirmed: self.total, error: e.into() })?;
        bar.set_position(self.total);
        Ok(())
    }
}

/// Lines handed from the reading thread to the publisher at once. One handoff per line
/// cost a wake-up (often a context switch) per line; per chunk it is noise.
const LINES_PER_CHUNK: usize = 256;
/// Chunks in flight between the reader and the publisher (bounded memory: at most this
/// many chunks of [`LINES_PER_CHUNK`] lines).
const CHUNKS_IN_FLIGHT: usize = 16;

/// The non-blank lines of a file, read by a blocking thread in chunks.
struct Lines {
    chunks: tokio::sync::mpsc::Receiver<std::io::Result<Vec<Vec<u8>>>>,
    current: std::vec::IntoIter<Vec<u8>>,
}

impl Lines {
    /// The next line, or the read error, or `None` at the end.
    async fn recv(&mut self) -> Option<std::io::Result<Vec<u8>>> {
        loop {
            if let Some(line) = self.current.next() {
                return Some(Ok(line));
            }
            match self.chunks.recv().await? {
                Ok(chunk) => self.current = chunk.into_iter(),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// Streams the non-blank lines of `path` from a blocking thread.
fn read_lines(path: std::path::PathBuf) -> Lines {
    let (tx, rx) = tokio::sync::mpsc::channel(CHUNKS_IN_FLIGHT);
    tokio::task::spawn_blocking(move || {
        let mut chunk = Vec::with_capacity(LINES_PER_CHUNK);
        let res = validate::for_each_line(&path, |_, raw| {
            chunk.push(raw.to_vec());
            if chunk.len() < LINES_PER_CHUNK {
                return Ok(());
            }
            let full = std::mem::replace(&mut chunk, Vec::with_capacity(LINES_PER_CHUNK));
            // A closed receiver means the publisher gave up; stop reading.
            tx.blocking_send(Ok(full)).map_err(|_| std::io::Error::other("publisher stopped"))
        });
        // The lines read before an error still come first, as they were read.
        if !chunk.is_empty() && tx.blocking_send(Ok(chunk)).is_err() {
            return;
        }
        if let Err(e) = res {
            let _ = tx.blocking_send(Err(e));
        }
    });
    Lines { chunks: rx, current: Vec::new().into_iter() }
}

/// The body with `model` replaced.
fn with_model(body: &RawValue, model: &str) -> anyhow::Result<Box<RawValue>> {
    let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(body.get())?;
    v.insert("model".into(), serde_json::Value::String(model.to_string()));
    Ok(RawValue::from_string(serde_json::to_string(&v)?)?)
}
