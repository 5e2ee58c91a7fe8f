//! `producer submit`: validate the file, then publish it as one job.
//!
//! Order matters: the job's results queue exists before any item is published (so no
//! result can be unroutable), and the ledger learns of the job before its items (so the
//! tracker never sees an item of an unknown job).

use std::collections::VecDeque;
use std::path::Path;

use anyhow::Context as _;
use fleet::amqp::{self, PendingConfirm};
use fleet::topology::Topology;
use fleet::wire::{Item, LedgerEvent};
use fleet::Config;
use serde_json::value::RawValue;

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

    let topology = Topology::from_config(cfg);
    let job_id = new_job_id();
    let conn = amqp::connect(&cfg.amqp.url, "producer submit")
        .await
        .with_context(|| format!("cannot connect to RabbitMQ at {}", amqp::redact_url(&cfg.amqp.url)))?;
    let ch = amqp::confirm_channel(&conn).await?;
    topology.declare_common(&ch).await?;
    topology.declare_items_queue(&ch, req.provider).await?;
    topology.declare_results_queue(&ch, &job_id).await?;

    let submitted_at_ms = fleet::now_ms();
    let event = LedgerEvent::JobSubmitted {
        job_id: job_id.clone(),
        provider: req.provider.to_string(),
        total,
        submitted_at_ms,
        deadline_ms: req.deadline_ms,
    };
    amqp::publish_confirmed(&ch, "", &topology.ledger_queue(), &serde_json::to_vec(&event)?, amqp::persistent_json())
        .await
        .context("publishing the job to the ledger")?;

    let bar = crate::progress::bar(total, req.progress, "submitting");
    let exchange = topology.items_exchange();
    let window = cfg.producer.confirm_window.max(1);
    let mut pending: VecDeque<PendingConfirm> = VecDeque::with_capacity(window);
    let mut index = 0u64;
    let mut payload = Vec::with_capacity(4096);
    let mut failure: Option<anyhow::Error> = None;
    // The file is read a second time (the first pass validated it), by a blocking thread
    // feeding a bounded channel, so memory stays bounded whatever the file's size.
    let mut lines = read_lines(req.file.to_path_buf());
    while let Some(raw) = lines.recv().await {
        let raw = raw?;
        let line =
            validate::check_line(&raw, &rules).map_err(|e| anyhow::anyhow!("file changed while submitting: {e}"))?;
        let body = match req.model {
            Some(model) => with_model(&line.body, model)?,
            None => line.body,
        };
        let item = Item {
            job_id: job_id.clone(),
            index,
            total,
            custom_id: line.custom_id,
            provider: req.provider.to_string(),
            url: line.url,
            body,
            attempt: 0,
            submitted_at_ms,
            deadline_ms: req.deadline_ms,
            first_delay_ms: None,
        };
        payload.clear();
        serde_json::to_writer(&mut payload, &item)?;
        if pending.len() >= window {
            if let Err(e) = pending.pop_front().expect("window is non-empty").wait().await {
                failure = Some(e.into());
                break;
            }
        }
        pending.push_back(amqp::publish(&ch, &exchange, req.provider, &payload, amqp::persistent_json()).await?);
        index += 1;
        bar.inc(1);
    }
    for p in pending {
        if let Err(e) = p.wait().await {
            failure.get_or_insert(e.into());
        }
    }
    bar.finish_and_clear();
    let _ = conn.close(200, "done".into()).await;
    if let Some(e) = failure {
        return Err(e.context(format!("job {job_id}: publishing failed after {index} of {total} items")));
    }
    if index != total {
        anyhow::bail!("file changed while submitting: validated {total} requests, read {index}");
    }
    Ok(Submitted { job_id, total })
}

/// Streams the non-blank lines of `path` from a blocking thread.
fn read_lines(path: std::path::PathBuf) -> tokio::sync::mpsc::Receiver<std::io::Result<Vec<u8>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4096);
    tokio::task::spawn_blocking(move || {
        let res = validate::for_each_line(&path, |_, raw| {
            // A closed receiver means the publisher gave up; stop reading.
            tx.blocking_send(Ok(raw.to_vec())).map_err(|_| std::io::Error::other("publisher stopped"))
        });
        if let Err(e) = res {
            let _ = tx.blocking_send(Err(e));
        }
    });
    rx
}

/// The body with `model` replaced.
fn with_model(body: &RawValue, model: &str) -> anyhow::Result<Box<RawValue>> {
    let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(body.get())?;
    v.insert("model".into(), serde_json::Value::String(model.to_string()));
    Ok(RawValue::from_string(serde_json::to_string(&v)?)?)
}
