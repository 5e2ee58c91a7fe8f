//! Publishing a batch's job from its stored file, as `producer submit` publishes one from
//! a local file and in the same order: the job's queues first, `job_submitted` on the
//! ledger, `job_opened` on the control stream, every item (confirmed, a window at a time),
//! then `submission_complete`. A replica killed half-way leaves a job the tracker ends
//! `failed` (`incomplete_submission`) after `producer.submit_timeout_s`, and no batch
//! record: the batch record is written only once its job is fully published. A retry with
//! the same `Idempotency-Key` publishes the same job id again; the fleet drops duplicate
//! items by (job, index).
//!
//! A batch whose mode resolves to batch ([`mode_of`], `api.mode`) is published as
//! `submit --mode batch` publishes a job: the stored file is read once to lay the job out
//! by endpoint and cut it into chunks within the provider's batch limits
//! ([`fleet::batch::ChunkLayout`]; nothing of the lines is kept), before anything is
//! published; then its items go to the job's batch items stream in the layout's order,
//! each with its position ([`fleet::batch::POSITION_HEADER`]), once per endpoint; once
//! every item is confirmed, one chunk message per chunk goes to the provider's chunk
//! queue; `submission_complete` comes last. The results come back on the job's results
//! stream as online ones do, so [`super::results`] reads them the same way.

use std::collections::VecDeque;

use fleet::amqp;
use fleet::batch::{ChunkLayout, ChunkLimits, EndpointGroup, JobMode};
use fleet::config::{ApiMode, ProviderConfig};
use fleet::wire::{ControlMessage, Item, LedgerEvent};

use super::error::ApiError;
use super::store::{FileRecord, Store};
use super::upload::{self, LineRules};
use crate::batch::{self, ChunkPlan, ModeArg};

/// What the job is.
pub(crate) struct JobPlan<'a> {
    pub job_id: &'a str,
    pub provider: &'a str,
    /// The provider's configuration (its batch limits and poll interval, in batch mode).
    pub provider_cfg: &'a ProviderConfig,
    pub file: &'a FileRecord,
    pub submitted_at_ms: u64,
    pub deadline_ms: Option<u64>,
    /// Online (the job's items queue) or batch (the batch items stream, then chunks).
    pub mode: JobMode,
    /// Publishes awaiting a confirm at once (`producer.confirm_window`).
    pub window: usize,
}

/// The mode a batch of `window_s` seconds (its `completion_window`) runs in on `provider`
/// under `api.mode`: `auto` as `submit --mode auto` with that deadline (batch when the
/// provider has a batch API and the window allows its 24 h); `batch` whenever the provider
/// has a batch API; `online` always online. Never flex: the API has no way to ask for it.
pub(crate) fn mode_of(api_mode: ApiMode, provider: &ProviderConfig, window_s: u64) -> JobMode {
    match api_mode {
        ApiMode::Online => JobMode::Online,
        ApiMode::Batch if provider.batch => JobMode::Batch,
        ApiMode::Batch => JobMode::Online,
        ApiMode::Auto => batch::resolve(ModeArg::Auto, provider, Some(window_s)),
    }
}

/// A stored line that no longer passes (it passed when the file was stored).
fn changed(what: String) -> ApiError {
    ApiError::unavailable(format!("stored line changed: {what}"))
}

/// Publishes the job of `plan`, in its mode (see the module's header).
pub(crate) async fn publish(store: &Store, rules: &LineRules, plan: &JobPlan<'_>) -> Result<(), ApiError> {
    let t = &store.topology;
    // Batch mode: the job's endpoints and chunks, read before anything is published.
    let groups = match plan.mode {
        JobMode::Batch => lay_out(store, rules, plan).await?,
        JobMode::Online | JobMode::Flex => Vec::new(),
    };
    let ch = store.broker.confirm_channel().await?;
    t.declare_common(&ch).await?;
    t.declare_items_queue(&ch, plan.provider).await?;
    t.declare_job_items_queue(&ch, plan.provider, plan.job_id).await?;
    t.declare_results_queue(&ch, plan.job_id).await?;
    // A retried create (same `Idempotency-Key`) whose first try got as far as the job's
    // stream may have published chunk messages: each is then marked `maybe_created`, so a
    // worker looks for the chunk's provider batch before creating another (see `ChunkPlan`).
    let mut chunks_maybe_published = false;
    if plan.mode == JobMode::Batch {
        let stream = t.batch_items_stream(plan.job_id);
        chunks_maybe_published = t.queue_len(&*store.broker.conn().await?, &stream).await?.is_some();
        t.declare_batch_items_stream(&ch, plan.job_id).await?;
        t.declare_chunk_queues(&ch, plan.provider, plan.provider_cfg.batch_poll_interval_s).await?;
    }
    let submitted = LedgerEvent::JobSubmitted {
        job_id: plan.job_id.to_string(),
        provider: plan.provider.to_string(),
        total: plan.file.lines,
        submitted_at_ms: plan.submitted_at_ms,
        deadline_ms: plan.deadline_ms,
        submitting: true,
        max_cost: None,
        webhook_url: None,
        mode: Some(plan.mode),
    };
    amqp::publish_confirmed(&ch, "", &t.ledger_queue(), &to_json(&submitted)?, amqp::persistent_json()).await?;
    let opened = ControlMessage::JobOpened {
        job_id: plan.job_id.to_string(),
        provider: plan.provider.to_string(),
        priority: fleet::wire::DEFAULT_PRIORITY,
    };
    amqp::publish_confirmed(&ch, "", &t.control_stream(), &to_json(&opened)?, amqp::persistent_json()).await?;

    let (exchange, routing_key) = batch::destination(t, plan.mode, plan.job_id);
    let mut confirms: VecDeque<amqp::PendingConfirm> = VecDeque::new();
    let mut payload = Vec::with_capacity(4096);
    for pass in passes(&groups, plan.file.lines) {
        let mut index = 0u64;
        let mut position = pass.first;
        let mut reader = upload::FileReader::open(store, plan.file).await?;
        while let Some(chunk) = reader.next().await? {
            for raw in chunk.split(|&b| b == b'\n') {
                // Checked when stored; checked again, as `submit` does on its second read.
                let line = rules.check(raw).map_err(changed)?;
                let this_index = index;
                index += 1;
                if pass.endpoint.is_some_and(|e| e != line.url) {
                    continue;
                }
                let this = position;
                position += 1;
                if this >= pass.first + pass.items {
                    return Err(changed(format!("more {} requests than laid out", line.url)));
                }
                let item = Item {
                    job_id: plan.job_id.to_string(),
                    index: this_index,
                    total: plan.file.lines,
                    custom_id: line.custom_id,
                    provider: plan.provider.to_string(),
                    url: line.url,
                    body: line.body,
                    attempt: 0,
                    submitted_at_ms: plan.submitted_at_ms,
                    deadline_ms: plan.deadline_ms,
                    first_delay_ms: None,
                    flex: false,
                };
                payload.clear();
                serde_json::to_writer(&mut payload, &item).map_err(ApiError::unavailable)?;
                while confirms.len() >= plan.window.max(1) {
                    if let Some(c) = confirms.pop_front() {
                        c.wait().await?;
                    }
                }
                let props = match plan.mode {
                    JobMode::Batch => batch::item_properties(this),
                    JobMode::Online | JobMode::Flex => amqp::persistent_json(),
                };
                confirms.push_back(amqp::publish(&ch, &exchange, &routing_key, &payload, props).await?);
            }
        }
        reader.close().await;
        if index != plan.file.lines || position != pass.first + pass.items {
            return Err(changed(format!(
                "the file holds {} requests ({} of them laid out for this pass), read {index} ({})",
                plan.file.lines,
                pass.items,
                position - pass.first
            )));
        }
    }
    while let Some(c) = confirms.pop_front() {
        c.wait().await?;
    }
    if plan.mode == JobMode::Batch {
        let chunks = ChunkPlan {
            topology: t,
            job_id: plan.job_id,
            provider: plan.provider,
            total: plan.file.lines,
            submitted_at_ms: plan.submitted_at_ms,
            deadline_ms: plan.deadline_ms,
            fallback_online: false,
            maybe_published: chunks_maybe_published,
        };
        batch::publish_chunks(&ch, &chunks, &groups).await.map_err(|e| ApiError::unavailable(format!("{e:#}")))?;
    }
    let done = LedgerEvent::SubmissionComplete { job_id: plan.job_id.to_string() };
    amqp::publish_confirmed(&ch, "", &t.ledger_queue(), &to_json(&done)?, amqp::persistent_json()).await?;
    let _ = ch.close(200, "published".into()).await;
    Ok(())
}

/// Reads the stored file once and lays its requests out by endpoint, cut within the
/// provider's batch limits, as `submit` lays out a local file ([`batch::lay_out`]).
async fn lay_out(store: &Store, rules: &LineRules, plan: &JobPlan<'_>) -> Result<Vec<EndpointGroup>, ApiError> {
    let mut layout = ChunkLayout::new(ChunkLimits::of(plan.provider_cfg));
    let mut reader = upload::FileReader::open(store, plan.file).await?;
    while let Some(chunk) = reader.next().await? {
        for raw in chunk.split(|&b| b == b'\n') {
            let line = rules.check(raw).map_err(changed)?;
            batch::lay_out_line(&mut layout, raw, &line).map_err(|e| ApiError::invalid(format!("{e}.")))?;
        }
    }
    reader.close().await;
    let groups = layout.finish();
    let laid_out: u64 = groups.iter().map(|g| g.items).sum();
    if laid_out != plan.file.lines {
        return Err(changed(format!("the file holds {} requests, {laid_out} were read", plan.file.lines)));
    }
    Ok(groups)
}

/// One reading of the stored file while publishing: the lines of `endpoint` (every line
/// when `None`), published at positions `first..first + items` in file order.
struct Pass<'a> {
    endpoint: Option<&'a str>,
    first: u64,
    items: u64,
}

/// How the file is read to publish it: once, in file order (online, or a batch of one
/// endpoint: positions are indices), or once per endpoint, as `submit` does.
fn passes(groups: &[EndpointGroup], total: u64) -> Vec<Pass<'_>> {
    if groups.len() > 1 {
        groups.iter().map(|g| Pass { endpoint: Some(g.endpoint.as_str()), first: g.first, items: g.items }).collect()
    } else {
        vec![Pass { endpoint: None, first: 0, items: total }]
    }
}

fn to_json(v: &impl serde::Serialize) -> Result<Vec<u8>, ApiError> {
    serde_json::to_vec(v).map_err(ApiError::unavailable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet::config::{ProviderKind, BATCH_COMPLETION_WINDOW_S};

    #[test]
    fn api_mode_picks_batch_only_where_the_provider_and_the_setting_allow() {
        let day = BATCH_COMPLETION_WINDOW_S;
        let mut p = ProviderConfig::new(ProviderKind::Openai, "http://h");
        p.batch = true;
        assert_eq!(mode_of(ApiMode::Auto, &p, day), JobMode::Batch, "24 h allows the batch window");
        assert_eq!(mode_of(ApiMode::Auto, &p, 7 * day), JobMode::Batch);
        assert_eq!(mode_of(ApiMode::Auto, &p, 3600), JobMode::Online, "1 h does not");
        assert_eq!(mode_of(ApiMode::Batch, &p, 3600), JobMode::Batch, "batch whatever the window");
        assert_eq!(mode_of(ApiMode::Online, &p, day), JobMode::Online);
        p.batch = false;
        for m in [ApiMode::Auto, ApiMode::Batch, ApiMode::Online] {
            assert_eq!(mode_of(m, &p, day), JobMode::Online, "{m:?}: no batch API configured");
        }
    }

    #[test]
    fn one_endpoint_is_read_once_and_several_once_each() {
        let group = |endpoint: &str, first, items| EndpointGroup {
            endpoint: endpoint.into(),
            first,
            items,
            tokens: 0,
            chunks: vec![(first, first + items)],
        };
        let one = [group("/v1/chat/completions", 0, 10)];
        let p = passes(&one, 10);
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].endpoint, p[0].first, p[0].items), (None, 0, 10));
        assert_eq!(passes(&[], 7)[0].items, 7, "online: every line in one pass");
        let two = [group("/a", 0, 3), group("/b", 3, 4)];
        let p = passes(&two, 7);
        assert_eq!(
            p.iter().map(|p| (p.endpoint, p.first, p.items)).collect::<Vec<_>>(),
            [(Some("/a"), 0, 3), (Some("/b"), 3, 4)]
        );
    }
}
