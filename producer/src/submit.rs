//! `producer submit`: validate the file, then publish it as one job.
//!
//! A submission that dies half-way (killed, the machine lost) is resumed by running
//! `submit` again with the same file (recognised by its content hash, or named with
//! `--resume JOB`): the same job id, only the items the broker had not confirmed (see
//! [`crate::resume`]). The record of what was confirmed trails the publishes by at most the
//! confirm window (see [`Progress`]), so a resumed submission publishes again at most that
//! many items. SIGINT or SIGTERM stop the submission cleanly: nothing more is published,
//! the confirms of what was are awaited (for a few seconds), the record is written, and
//! the error says to run the same command again.
//!
//! A batch-mode job's items are published grouped by endpoint (see
//! [`fleet::batch::ChunkLayout`]): the file is read once to lay the job out (its endpoints,
//! their counts and chunks, nothing else kept), then once per endpoint, publishing that
//! endpoint's lines, so a chunk is a contiguous range of the stream however the file's lines
//! are interleaved. The record's watermark then counts positions in that order (the same
//! order on every run, since it depends only on the file); lines keep their index (their
//! place among the file's requests), and errors name their line number in the file.
//!
//! Order matters: the job's items queue and results queue exist before any item is
//! published (so no item or result can be unroutable), the ledger learns of the job before
//! its items (so the tracker never sees an item of an unknown job), and the workers learn
//! of the job's queue (`job_opened` on the control stream) before its first item.

use std::path::Path;
use std::time::Duration;

use fleet::amqp::{self, PublishError};
use fleet::batch::{EndpointGroup, JobMode, POSITION_HEADER};
use fleet::topology::Topology;
use fleet::wire::{ControlMessage, Item, LedgerEvent};
use fleet::Config;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt as _, StreamExt as _};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use crate::batch::{self, ChunkPlan, ModeArg};
use crate::resume::{self, Durability, Record};
use crate::validate::{self, Rules};

/// What the user asked for.
pub struct SubmitRequest<'a> {
    /// The JSONL input file, one request a line.
    pub file: &'a Path,
    /// Name of the configured provider that runs the job.
    pub provider: &'a str,
    /// Replaces `body.model` of every request.
    pub model: Option<&'a str>,
    /// Items not finished by this instant (ms since epoch) end `expired`.
    pub deadline_ms: Option<u64>,
    /// Show a progress bar on stderr.
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
    /// Completion webhook (`--webhook`, or `webhooks.default_url`): an http(s) URL told
    /// when the job ends.
    pub webhook_url: Option<&'a str>,
}

/// A submitted job.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Submitted {
    /// The new job's id, for `wait`, `status` and `cancel`.
    pub job_id: String,
    /// Requests submitted: the job's items.
    pub total: u64,
}

/// The mode `req` runs in (`--mode auto` resolved against `provider` and `deadline_s`),
/// refused when the provider cannot run it: batch without a batch API, flex on a kind
/// without a flex tier. `submit` and `submit --dry-run` both ask here.
pub(crate) fn checked_mode(
    req: &SubmitRequest,
    provider: &fleet::config::ProviderConfig,
    deadline_s: Option<u64>,
) -> Result<JobMode, InputError> {
    let mode = batch::resolve(req.mode, provider, deadline_s);
    if mode == JobMode::Batch && !provider.batch {
        return Err(InputError::NoBatchApi { name: req.provider.to_string() });
    }
    if mode == JobMode::Flex && !provider.kind.has_flex_tier() {
        let (name, kind) = (req.provider.to_string(), provider.kind.name());
        return Err(InputError::NoFlexTier { name, kind });
    }
    Ok(mode)
}

/// Errors the CLI maps to exit code 2 (the user's input, not the system, is at fault).
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// The provider named is not in the configuration.
    #[error("unknown provider {name:?}; configured providers: {known}")]
    UnknownProvider {
        /// The name given.
        name: String,
        /// The configured providers' names, comma-separated.
        known: String,
    },
    /// The file has lines that are not valid requests (or cannot be read).
    #[error(transparent)]
    Invalid(#[from] validate::ValidationError),
    /// `--resume JOB`, and the file's submission record is missing or names another job.
    #[error("no unfinished submission of job {job} is recorded for this file ({record} does not name it)")]
    NoRecord {
        /// The job asked to resume.
        job: String,
        /// Path of the record that was looked for.
        record: String,
    },
    /// The file (or the provider) differs from the one the resumed job was started with.
    #[error(
        "job {job} was started from other content than this file (or with provider {provider}); \
         resume it with the file it was started with, or delete {record} to start a new job"
    )]
    NotTheSameFile {
        /// The job being resumed.
        job: String,
        /// The provider the job was started with.
        provider: String,
        /// Path of its submission record.
        record: String,
    },
    /// More requests than one job may hold.
    #[error("the file has {total} requests; one job holds at most {} (split the file)", fleet::wire::MAX_JOB_ITEMS)]
    TooMany {
        /// Requests in the file.
        total: u64,
    },
    /// Batch mode asked (or picked) for a provider without a batch API configured.
    #[error("provider {name:?} has no batch API configured (set providers.{name}.batch = true, or use --mode online)")]
    NoBatchApi {
        /// The provider's name.
        name: String,
    },
    /// `--mode flex` for a provider kind that has no flex tier.
    #[error(
        "provider {name:?} is of kind {kind}, which has no flex tier: --mode flex needs an openai-kind provider \
         (OpenAI, Azure OpenAI, Groq); use --mode online or batch"
    )]
    NoFlexTier {
        /// The provider's name.
        name: String,
        /// Its kind (`anthropic`, ...).
        kind: &'static str,
    },
    /// A resumed batch-mode submission whose first run published the endpoints in the old order.
    #[error(
        "the interrupted submission of job {job} was started by an earlier version, which published a file of \
         several endpoints in another order; delete {record} and submit the file again as a new job"
    )]
    EarlierLayout {
        /// The job being resumed.
        job: String,
        /// Path of its submission record.
        record: String,
    },
    /// The webhook URL is refused (why is carried).
    #[error("--webhook: {0}")]
    Webhook(String),
}

/// A submission stopped by SIGINT or SIGTERM before it completed. Its record holds every
/// item the broker confirmed, so the same command resumes it.
#[derive(Debug, thiserror::Error)]
#[error(
    "interrupted: the broker holds {confirmed} of the {total} requests of job {job_id}; \
     run the same command again to submit the rest: {command}"
)]
pub struct Stopped {
    /// The job whose submission stopped.
    pub job_id: String,
    /// Every item below this index is queued.
    pub confirmed: u64,
    /// Requests in the file: the job's items.
    pub total: u64,
    /// The command line of this run, quoted for a POSIX shell.
    pub command: String,
}

/// A new job id: short, unique, safe in queue names and URLs.
pub fn new_job_id() -> String {
    format!("job_{}", &uuid::Uuid::new_v4().simple().to_string()[..16])
}

/// Validates and publishes `req.file`; nothing is published if any line is bad. The first
/// SIGINT or SIGTERM stops the submission as [`submit_until`] says; a second one ends the
/// process at once.
pub async fn submit(cfg: &Config, req: &SubmitRequest<'_>) -> anyhow::Result<Submitted> {
    let signals = crate::stop_on_signals();
    submit_until(cfg, req, signals.token()).await
}

/// [`submit`], until `shutdown` fires: then nothing more is published, the confirms of what
/// was published are awaited for at most [`STOP_DRAIN`], the record is written and the
/// error is [`Stopped`].
pub async fn submit_until(
    cfg: &Config,
    req: &SubmitRequest<'_>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Submitted> {
    let provider = cfg.providers.get(req.provider).ok_or_else(|| InputError::UnknownProvider {
        name: req.provider.to_string(),
        known: cfg.providers.keys().cloned().collect::<Vec<_>>().join(", "),
    })?;
    if let Some(url) = req.webhook_url {
        fleet::webhooks::check_url(url).map_err(InputError::Webhook)?;
    }
    let rules = Rules { kind: provider.kind, max_body_bytes: cfg.producer.max_body_bytes };
    let total = validate::validate_file(req.file, &rules).map_err(InputError::from)?;
    if total > fleet::wire::MAX_JOB_ITEMS {
        return Err(InputError::TooMany { total }.into());
    }
    crate::spend::check_cap(req.file, &rules, req.provider, provider, req.model, req.max_cost)?;
    // Validation reads the whole file without looking up; a signal during it lands here,
    // before a record or a job exists.
    if shutdown.is_cancelled() {
        anyhow::bail!("interrupted before anything was submitted");
    }

    let deadline_s = batch::seconds_left(req.deadline_ms);
    let mode = checked_mode(req, provider, deadline_s)?;
    // A resumed submission may have published chunk messages already (see `ChunkPlan`).
    let resumed = resume::load(req.file)?.is_some();
    let record = start_or_resume(req, total, mode)?;
    if req.mode == ModeArg::Auto && !resumed {
        eprintln!("mode {}", batch::auto_reason(req.provider, provider, deadline_s));
    }
    // Batch mode: the job's endpoints and chunks, read before anything is published.
    let groups = match record.mode {
        Some(JobMode::Batch) => batch::lay_out(req.file, &rules, provider)?,
        _ => Vec::new(),
    };
    if groups.len() > 1 && record.confirmed > 0 && !record.by_endpoint {
        let record_name = resume::record_path(req.file).display().to_string();
        return Err(InputError::EarlierLayout { job: record.job_id, record: record_name }.into());
    }
    let job = Job {
        groups,
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
    let mut progress = Progress::new(req.file, record, job.window as u64);
    let stopped = |progress: &Progress<'_>| Stopped {
        job_id: job.job_id.clone(),
        confirmed: progress.confirmed,
        total,
        command: this_command(),
    };
    let mut conn = tokio::select! {
        conn = crate::connect(cfg, "producer submit") => conn?,
        () = shutdown.cancelled() => return Err(stopped(&progress).into()),
    };
    let bar = crate::progress::bar(total, req.progress, "submitting");
    // Announced again on a resume: the tracker ignores a second `job_submitted`, and the
    // first run may have died before the broker confirmed it.
    let mut announced = false;
    let mut failures_without_progress = 0;
    let outcome = loop {
        let before = progress.confirmed;
        match job.publish(&conn, req, &mut announced, &bar, &mut progress, shutdown).await {
            Ok(()) => break Ok(()),
            Err(Interrupted::Fatal(e)) => break Err(e.context(format!("job {}", job.job_id))),
            Err(Interrupted::Stopped) => {
                // The record first: a second signal ends the process during the close.
                progress.write(Durability::PowerLoss);
                fleet::amqp::close(&conn, "interrupted").await;
                break Err(stopped(&progress).into());
            }
            Err(Interrupted::Broker(error)) => {
                let confirmed = progress.confirmed;
                failures_without_progress = if confirmed > before { 1 } else { failures_without_progress + 1 };
                if failures_without_progress > MAX_RECONNECTS {
                    break Err(error
                        .context(format!("job {}: publishing failed after {confirmed} of {total} items", job.job_id)));
                }
                // Items after the last confirmed one are published again: at-least-once,
                // duplicates are dropped downstream by (job, index).
                tracing::warn!(error = %format!("{error:#}"), confirmed, "lost the broker while submitting; reconnecting");
                let urls = cfg.amqp.addresses();
                let reconnect = amqp::connect_with_retry(&urls, "producer submit", shutdown);
                match tokio::time::timeout(RECONNECT_TIMEOUT, reconnect).await {
                    Ok(Some(c)) => conn = c,
                    Ok(None) => break Err(stopped(&progress).into()),
                    Err(_) => break Err(anyhow::anyhow!("job {}: cannot reconnect to RabbitMQ", job.job_id)),
                }
            }
        }
    };
    bar.finish_and_clear();
    if let Err(e) = outcome {
        // Every way out leaves the record at the last confirmed item, durably: this write
        // is the run's last.
        progress.write(Durability::PowerLoss);
        return Err(e);
    }
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
            by_endpoint: mode == JobMode::Batch,
        }),
        (Some(_), None) => unreachable!("matched above"),
    }
}

/// Consecutive broker failures without a newly confirmed item before giving up.
const MAX_RECONNECTS: u32 = 5;
/// How long to keep trying to reconnect after a failure.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a stopped submission waits for the confirms of what it published. Confirms
/// normally trail a publish by milliseconds; this bounds the exit when the broker is
/// stuck (a memory alarm), and an item whose confirm never came is published again by the
/// resumed run.
pub const STOP_DRAIN: Duration = Duration::from_secs(5);

/// Why a publishing session stopped.
enum Interrupted {
    /// The broker failed; every item before `Progress::confirmed` is safely queued.
    Broker(anyhow::Error),
    /// The file or the job is at fault: give up.
    Fatal(anyhow::Error),
    /// A signal: the confirms of what was published have been awaited (see [`STOP_DRAIN`]).
    Stopped,
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
    /// Batch mode: the job's endpoints in stream order, with their chunks (empty online).
    groups: Vec<EndpointGroup>,
}

/// One reading of the file while publishing: the lines of `endpoint` (every line when
/// `None`), published at positions `first..first + items` in file order.
struct Pass<'a> {
    endpoint: Option<&'a str>,
    first: u64,
    items: u64,
}

impl Job {
    /// How the file is read to publish it: once, in file order (online, or a batch-mode job
    /// of one endpoint: positions are indices), or once per endpoint (see the module
    /// documentation).
    fn passes(&self) -> Vec<Pass<'_>> {
        if self.groups.len() > 1 {
            self.groups
                .iter()
                .map(|g| Pass { endpoint: Some(g.endpoint.as_str()), first: g.first, items: g.items })
                .collect()
        } else {
            vec![Pass { endpoint: None, first: 0, items: self.total }]
        }
    }

    /// The properties of the item message at `position`: batch-mode items carry their
    /// position in the stream (a reader of a job of several endpoints needs it).
    fn properties(&self, position: u64) -> lapin::BasicProperties {
        let props = amqp::persistent_json();
        if self.mode != JobMode::Batch {
            return props;
        }
        let mut headers = FieldTable::default();
        headers.insert(POSITION_HEADER.into(), AMQPValue::LongLongInt(position as i64));
        props.with_headers(headers)
    }
}

impl Job {
    /// Declares the job's queues, announces it to the ledger (once), then publishes every
    /// item from index `progress.confirmed` on, keeping at most `window` of them beyond the
    /// record's watermark (see [`Progress`]).
    async fn publish(
        &self,
        conn: &lapin::Connection,
        req: &SubmitRequest<'_>,
        announced: &mut bool,
        bar: &indicatif::ProgressBar,
        progress: &mut Progress<'_>,
        shutdown: &CancellationToken,
    ) -> Result<(), Interrupted> {
        let start = progress.confirmed;
        let broker = |e: lapin::Error| {
            if fleet::topology::is_precondition_failed(&e) {
                Interrupted::Fatal(anyhow::Error::from(e).context(fleet::topology::PRECONDITION_HINT))
            } else {
                Interrupted::Broker(e.into())
            }
        };
        let ch = amqp::confirm_channel(conn).await.map_err(broker)?;
        self.topology.declare_common(&ch).await.map_err(broker)?;
        self.topology.declare_items_queue(&ch, req.provider).await.map_err(broker)?;
        self.topology.declare_job_items_queue(&ch, req.provider, &self.job_id).await.map_err(broker)?;
        self.topology.declare_results_queue(&ch, &self.job_id).await.map_err(broker)?;
        if self.mode == JobMode::Batch {
            self.topology.declare_batch_items_stream(&ch, &self.job_id).await.map_err(broker)?;
            let poll_s = self.provider_cfg.batch_poll_interval_s;
            self.topology.declare_chunk_queues(&ch, req.provider, poll_s).await.map_err(broker)?;
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
                webhook_url: req.webhook_url.map(str::to_string),
                // For `status` (a resumed job keeps the mode its first run recorded).
                mode: Some(self.mode),
            };
            let event = serde_json::to_vec(&event).map_err(|e| Interrupted::Fatal(e.into()))?;
            amqp::publish_confirmed(&ch, "", &self.topology.ledger_queue(), &event, amqp::persistent_json())
                .await
                .map_err(|e| Interrupted::Broker(e.into()))?;
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
                .map_err(|e| Interrupted::Broker(e.into()))?;
            *announced = true;
        }
        bar.set_position(start);
        let (exchange, routing_key) = batch::destination(&self.topology, self.mode, &self.job_id);
        let mut in_flight = InFlight::default();
        let mut payload = Vec::with_capacity(4096);
        let fatal = |e: anyhow::Error| Interrupted::Fatal(e);
        let changed = |what: String| fatal(anyhow::anyhow!("file changed while submitting: {what}"));
        for pass in self.passes() {
            if pass.first + pass.items <= start {
                // Every item of this pass is confirmed already (a resumed submission).
                continue;
            }
            let mut index = 0u64;
            let mut position = pass.first;
            // The file is read again (the first pass validated it), by a blocking thread
            // feeding a bounded channel, so memory stays bounded whatever the file's size.
            let mut lines = read_lines(req.file.to_path_buf());
            while let Some(next) = lines.recv().await {
                let (line_no, raw) = next.map_err(|e| fatal(e.into()))?;
                let this_index = index;
                index += 1;
                let line =
                    validate::check_line(&raw, &self.rules).map_err(|e| changed(format!("line {line_no}: {e}")))?;
                if pass.endpoint.is_some_and(|e| e != line.url) {
                    continue;
                }
                let this = position;
                position += 1;
                if this < start {
                    continue;
                }
                if this >= pass.first + pass.items {
                    return Err(changed(format!("line {line_no}: more {} requests than validated", line.url)));
                }
                // Checked once per line (an atomic load): the waits below watch it as well.
                if shutdown.is_cancelled() {
                    return Err(in_flight.settle(progress).await);
                }
                let body = match req.model {
                    Some(model) => with_model(&line.body, model).map_err(fatal)?,
                    None => line.body,
                };
                let item = Item {
                    job_id: self.job_id.clone(),
                    index: this_index,
                    total: self.total,
                    custom_id: line.custom_id,
                    provider: req.provider.to_string(),
                    url: line.url,
                    body,
                    attempt: 0,
                    submitted_at_ms: self.submitted_at_ms,
                    deadline_ms: req.deadline_ms,
                    first_delay_ms: None,
                    flex: self.mode == JobMode::Flex,
                };
                payload.clear();
                serde_json::to_writer(&mut payload, &item).map_err(|e| fatal(e.into()))?;
                in_flight.learn_arrived(progress)?;
                while !progress.may_publish(this) {
                    in_flight.wait_until(progress.wait_target(this), progress, shutdown).await?;
                    in_flight.learn_arrived(progress)?;
                    progress.write(Durability::ProcessKill);
                }
                progress.write_if_due();
                bar.set_position(progress.confirmed);
                let p = amqp::publish(&ch, &exchange, &routing_key, &payload, self.properties(this))
                    .await
                    .map_err(|e| Interrupted::Broker(e.into()))?;
                in_flight.push(this, p);
            }
            if index != self.total || position != pass.first + pass.items {
                let read = position - pass.first;
                return Err(changed(format!(
                    "validated {} requests ({} of them {}), read {index} ({read})",
                    self.total,
                    pass.items,
                    pass.endpoint.unwrap_or("any endpoint"),
                )));
            }
        }
        in_flight.wait_until(self.total, progress, shutdown).await?;
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
            batch::publish_chunks(&ch, &plan, &self.groups).await.map_err(Interrupted::Broker)?;
        }
        let done = LedgerEvent::SubmissionComplete { job_id: self.job_id.clone() };
        let done = serde_json::to_vec(&done).map_err(|e| fatal(e.into()))?;
        amqp::publish_confirmed(&ch, "", &self.topology.ledger_queue(), &done, amqp::persistent_json())
            .await
            .map_err(|e| Interrupted::Broker(e.into()))?;
        bar.set_position(self.total);
        Ok(())
    }
}

/// The publishes awaiting their confirm, oldest first: the items from
/// `Progress::confirmed` to the last one published, each with its index.
#[derive(Default)]
struct InFlight {
    confirms: FuturesOrdered<BoxFuture<'static, (u64, Result<(), PublishError>)>>,
}

impl InFlight {
    fn push(&mut self, index: u64, confirm: amqp::PendingConfirm) {
        self.confirms.push_back(confirm.wait().map(move |r| (index, r)).boxed());
    }

    /// Takes in the confirms that have arrived already, without waiting. The broker
    /// confirms in runs (`multiple`), so this often learns of many at once.
    fn learn_arrived(&mut self, progress: &mut Progress<'_>) -> Result<(), Interrupted> {
        while let Some(Some((index, confirm))) = self.confirms.next().now_or_never() {
            confirm.map_err(|e| Interrupted::Broker(e.into()))?;
            progress.confirmed(index + 1);
        }
        Ok(())
    }

    /// Waits until every item below `target` is confirmed (or nothing is in flight), and
    /// gives up on a signal (see [`InFlight::settle`]).
    async fn wait_until(
        &mut self,
        target: u64,
        progress: &mut Progress<'_>,
        shutdown: &CancellationToken,
    ) -> Result<(), Interrupted> {
        while progress.confirmed < target {
            let next = tokio::select! {
                // A signal first: a broker that has stopped confirming must not hold it up.
                biased;
                () = shutdown.cancelled() => return Err(self.settle(progress).await),
                next = self.confirms.next() => next,
            };
            let Some((index, confirm)) = next else { break };
            confirm.map_err(|e| Interrupted::Broker(e.into()))?;
            progress.confirmed(index + 1);
        }
        Ok(())
    }

    /// After a signal: waits (at most [`STOP_DRAIN`]) for the confirms of what was
    /// published, so that the record holds every item the broker took.
    async fn settle(&mut self, progress: &mut Progress<'_>) -> Interrupted {
        if !self.confirms.is_empty() {
            eprintln!(
                "stopping: waiting up to {} s for the broker to confirm {} published requests (interrupt again to quit now)",
                STOP_DRAIN.as_secs(),
                self.confirms.len()
            );
        }
        let drain = async {
            while let Some((index, Ok(()))) = self.confirms.next().await {
                progress.confirmed(index + 1);
            }
        };
        if tokio::time::timeout(STOP_DRAIN, drain).await.is_err() {
            tracing::warn!(
                unconfirmed = self.confirms.len(),
                "the broker did not confirm everything in time; the resumed run publishes those again"
            );
        }
        Interrupted::Stopped
    }
}

/// What the broker has confirmed of a submission, and the record of it on disk.
///
/// The contract: no item is published at or beyond `written + window`, `written` being the
/// watermark of the record on disk. Killed at any instant, the submission is resumed from
/// `written` and publishes again at most `window` items: those that were in flight.
///
/// Keeping that true by writing the record on every confirm costs a write per publish: a
/// submitter faster than the broker (the usual case) publishes one item per confirm once
/// its window is full. So the record is written once per `batch` confirms (`window / 8`),
/// when the producer learns of them, and a submitter that reaches `written + window` waits
/// for the next `batch` confirms and writes the record before publishing on. The broker
/// still holds 7/8 of a window in flight while it waits, so it never runs dry.
///
/// Measured (ext4, 2 cores): a write (create, write, rename; no sync, see
/// [`Durability::ProcessKill`]) takes 0.3-0.4 ms, not microseconds, because ext4 starts
/// writing back a file renamed over another (`auto_da_alloc`); per confirm that would be
/// more than the publish itself. At the default window (2,048: a write per 256 confirms)
/// a 100,000-line submission (release build, busy machine) wrote the record ~350 times:
/// ~0.1 s of its 11 s.
struct Progress<'a> {
    file: &'a Path,
    /// The record as last written: `record.confirmed` is the watermark on disk.
    record: Record,
    /// Every item below this is confirmed (what this run knows: the record may trail it).
    confirmed: u64,
    /// At most this many items are published at or beyond the record's watermark.
    window: u64,
    /// The record is rewritten once this many more items are confirmed.
    batch: u64,
    /// Off after a failed write: the submission goes on (bounded by the plain confirm
    /// window), but cannot be resumed.
    saving: bool,
}

/// The record is rewritten every `window / SAVE_PER_WINDOW` confirms (see [`Progress`]):
/// more writes for a smaller share of the window idle while the record is written.
const SAVE_PER_WINDOW: u64 = 8;

impl<'a> Progress<'a> {
    /// The progress of `record`'s submission, written at once (durably: the first write
    /// is the one a resumed run cannot do without).
    fn new(file: &'a Path, record: Record, window: u64) -> Progress<'a> {
        let window = window.max(1);
        let confirmed = record.confirmed;
        let mut progress =
            Progress { file, record, confirmed, window, batch: (window / SAVE_PER_WINDOW).max(1), saving: true };
        progress.save(Durability::PowerLoss);
        progress
    }

    /// Every item below `upto` is confirmed.
    fn confirmed(&mut self, upto: u64) {
        self.confirmed = self.confirmed.max(upto);
    }

    /// The watermark the window counts from: the record's, or, once the record cannot be
    /// written, the confirms' (the plain confirm window).
    fn floor(&self) -> u64 {
        if self.saving {
            self.record.confirmed
        } else {
            self.confirmed
        }
    }

    /// Whether item `next` may be published now.
    fn may_publish(&self, next: u64) -> bool {
        next < self.floor() + self.window
    }

    /// The confirmed watermark to wait for before publishing `next` (when
    /// [`Progress::may_publish`] says no): a batch past the floor, and never beyond what
    /// was published.
    fn wait_target(&self, next: u64) -> u64 {
        (self.floor() + self.batch).min(next)
    }

    /// Writes the record if a batch more items were confirmed since it was written.
    fn write_if_due(&mut self) {
        if self.confirmed >= self.record.confirmed + self.batch {
            self.write(Durability::ProcessKill);
        }
    }

    /// Writes the record if it trails what is confirmed.
    fn write(&mut self, durability: Durability) {
        if self.confirmed > self.record.confirmed {
            self.save(durability);
        }
    }

    fn save(&mut self, durability: Durability) {
        if !self.saving {
            return;
        }
        self.record.confirmed = self.confirmed;
        if let Err(e) = resume::save(self.file, &self.record, durability) {
            self.saving = false;
            tracing::warn!(error = %e, "cannot record the submission's progress; if it is interrupted, it cannot be resumed");
        }
    }
}

/// This run's command line, quoted for a POSIX shell where an argument needs it: what to
/// run again to resume.
fn this_command() -> String {
    std::env::args_os().map(|a| shell_quote(&a.to_string_lossy())).collect::<Vec<_>>().join(" ")
}

/// `arg` as a POSIX shell reads it back: unchanged when it is plain, else in single quotes.
fn shell_quote(arg: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// Lines handed from the reading thread to the publisher at once. One handoff per line
/// cost a wake-up (often a context switch) per line; per chunk it is noise.
const LINES_PER_CHUNK: usize = 256;
/// Chunks in flight between the reader and the publisher (bounded memory: at most this
/// many chunks of [`LINES_PER_CHUNK`] lines).
const CHUNKS_IN_FLIGHT: usize = 16;

/// A line of the file: its 1-based number, and its bytes.
type NumberedLine = (u64, Vec<u8>);

/// The non-blank lines of a file, read by a blocking thread in chunks.
struct Lines {
    chunks: tokio::sync::mpsc::Receiver<std::io::Result<Vec<NumberedLine>>>,
    current: std::vec::IntoIter<NumberedLine>,
}

impl Lines {
    /// The next line, or the read error, or `None` at the end.
    async fn recv(&mut self) -> Option<std::io::Result<NumberedLine>> {
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
        let res = validate::for_each_line(&path, |line_no, raw| {
            chunk.push((line_no, raw.to_vec()));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(total: u64) -> Record {
        Record {
            job_id: "job_1".into(),
            content_hash: "0".into(),
            provider: "mock".into(),
            model: None,
            total,
            submitted_at_ms: 1,
            deadline_ms: None,
            confirmed: 0,
            mode: None,
            fallback_online: false,
            by_endpoint: false,
        }
    }

    /// An input path in a fresh directory (its record goes next to it).
    fn input(test: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("submit-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("in.jsonl")
    }

    fn on_disk(file: &Path) -> u64 {
        resume::load(file).unwrap().expect("a record").confirmed
    }

    /// [`Progress`] driven as `Job::publish` drives it, against a broker that keeps `lag`
    /// items unconfirmed and confirms in runs of `run`: whatever the pace, no item is
    /// published a window or more past the record on disk, and the record is written
    /// about once per batch, not per confirm.
    #[test]
    fn the_record_never_trails_a_publish_by_a_window_and_is_written_once_per_batch() {
        const TOTAL: u64 = 3000;
        const WINDOW: u64 = 64;
        for (run, lag) in [(1, WINDOW), (1, WINDOW - 1), (1, 0), (7, WINDOW), (7, WINDOW - 5), (7, 10), (100, WINDOW)] {
            let file = input("contract");
            let mut progress = Progress::new(&file, record(TOTAL), WINDOW);
            let (mut broker, mut writes, mut written) = (0u64, 0u64, 0u64);
            for next in 0..TOTAL {
                // The confirms that have arrived (`InFlight::learn_arrived`).
                while broker + run + lag <= next {
                    broker += run;
                }
                progress.confirmed(broker);
                progress.write_if_due();
                writes += u64::from(progress.record.confirmed != written);
                written = progress.record.confirmed;
                while !progress.may_publish(next) {
                    // `InFlight::wait_until`: the broker confirms a run at a time.
                    let target = progress.wait_target(next);
                    while broker < target {
                        broker = (broker + run).min(next);
                    }
                    progress.confirmed(broker);
                    progress.write(Durability::ProcessKill);
                    writes += u64::from(progress.record.confirmed != written);
                    written = progress.record.confirmed;
                }
                let disk = on_disk(&file);
                assert_eq!(disk, written, "the record in memory is the one on disk");
                assert!(next < disk + WINDOW, "run {run}, lag {lag}: item {next} published, record at {disk}");
            }
            let most = TOTAL / progress.batch + 1;
            assert!(writes <= most, "run {run}, lag {lag}: {writes} writes, want at most {most}");
            progress.confirmed(TOTAL);
            progress.write(Durability::PowerLoss);
            assert_eq!(on_disk(&file), TOTAL, "the last write records every confirm");
            resume::remove(&file).unwrap();
        }
    }

    #[test]
    fn a_record_that_cannot_be_written_leaves_the_plain_confirm_window() {
        let file = std::env::temp_dir().join(format!("submit-missing-{}", std::process::id())).join("no/in.jsonl");
        let mut progress = Progress::new(&file, record(100), 8);
        assert!(!progress.saving);
        assert!(progress.may_publish(7) && !progress.may_publish(8));
        progress.confirmed(5);
        progress.write(Durability::ProcessKill);
        assert!(progress.may_publish(12) && !progress.may_publish(13), "the window counts from the confirms");
    }

    #[test]
    fn a_record_is_written_only_when_it_trails_the_confirms() {
        let file = input("trails");
        let mut progress = Progress::new(&file, record(100), 16);
        assert_eq!(on_disk(&file), 0, "written at the start");
        progress.confirmed(1);
        progress.write_if_due();
        assert_eq!(on_disk(&file), 0, "less than a batch (16 / 8) more");
        progress.confirmed(2);
        progress.write_if_due();
        assert_eq!(on_disk(&file), 2, "a batch more");
        progress.confirmed(1);
        assert_eq!(progress.confirmed, 2, "the watermark never goes back");
        progress.confirmed(3);
        progress.write(Durability::PowerLoss);
        assert_eq!(on_disk(&file), 3);
        resume::remove(&file).unwrap();
    }

    #[test]
    fn the_resume_command_is_quoted_for_a_shell() {
        assert_eq!(shell_quote("in-1.jsonl"), "in-1.jsonl");
        assert_eq!(shell_quote("--provider=mock"), "--provider=mock");
        assert_eq!(shell_quote("my file.jsonl"), "'my file.jsonl'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
