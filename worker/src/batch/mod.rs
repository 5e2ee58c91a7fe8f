//! Provider batch mode in the worker: consuming a provider's chunk queue, and moving each
//! chunk one step through its life per delivery, so no worker is ever held while the
//! provider works (see `docs/architecture.md`, "Provider batch mode").
//!
//! Every delivery of a chunk ends in one decision:
//! - garbage (not a chunk, or out of bounds) is dead-lettered with its reason;
//! - `pending`, job cancelled or past its deadline → every item `cancelled`/`expired`;
//! - `pending` → find the chunk's batch first when a create may have happened (the
//!   delivery is a redelivery, or the message says so; a `failed` batch is never adopted),
//!   else, when the provider has an enqueued-token budget (`batch_enqueued_tokens`) that the
//!   batches in progress and this chunk's estimate would overflow, back to the poll queue
//!   to wait (admission, see [`admit`]), else create it; then publish the
//!   chunk as `created` (batch id) to the poll queue, confirmed, and only then ack: a
//!   worker killed in between leaves a redelivered `pending` chunk, whose taker finds the
//!   batch by its tag instead of creating a second one;
//! - `created` without the fleet's signature (only workers write this state, signed, see
//!   `fleet::signing`) → dead-lettered, nothing done at the provider;
//! - `created` → one poll pass: the batch must be the chunk's (OpenAI kind: its
//!   `metadata.fleet_tag`), or the chunk is dead-lettered as forged and nothing is done to
//!   the batch; then (cancelling the batch when the job was cancelled or its deadline
//!   passed) still running → back to the poll queue; failed for a full enqueued-token
//!   queue (`token_limit_exceeded`) → `pending` again, under the next tag generation, back
//!   to the poll queue (nothing of it ran, nothing is failed); ended → fetch every result line,
//!   publish one result per item on the ordinary results path, ack, then delete the
//!   provider files the batch object names (never ids a message names);
//! - a transient provider failure → back to the poll queue, unchanged (a failed create is
//!   marked `maybe_created`); a refusal → the chunk's items fail with the provider's reason.
//!
//! Duplicated results (a chunk fetched twice after a crash) are dropped downstream by
//! (job, index), as for online items.

pub mod anthropic;
pub mod api;
pub mod gemini;
pub mod items;
pub mod openai;
mod outcome;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet::amqp;
use fleet::batch::{ChunkState, ChunkTask};
use fleet::topology::DeadLabel;
use fleet::wire::{Item, ItemResult};
use futures::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::Connection;
use prometheus::IntGaugeVec;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::api::{ApiError, BatchApi, Created, Polled};
use self::items::ChunkItems;
use crate::acks::Tracked;
use crate::context::{Context, Worker};
use crate::provider::ProviderClient;
use crate::settle::{delivery_count, requeue_after_pause};

/// Chunks one worker works on at once per provider: creating and fetching hold a delivery
/// for a while (an upload, a download); polls are short.
const CHUNK_PREFETCH: u16 = 4;
/// Results of a fetched chunk being published at once.
const PUBLISH_CONCURRENCY: usize = 1024;

/// What the chunk handlers of one provider share.
pub struct Batch {
    /// The connection's publishing channel and settings, shared with the online handlers.
    pub ctx: Arc<Context>,
    /// The connection, on which reading a chunk's items opens channels of its own.
    pub conn: Arc<Connection>,
    /// The provider's client, whose batch API runs the chunks.
    pub client: Arc<ProviderClient>,
    /// `providers.<p>.batch_poll_interval_s`: how long a chunk waits between polls.
    pub poll_s: u64,
    /// The `batch_provider_batches` gauge of this provider's batches.
    pub batches: ProviderBatches,
    /// `providers.<p>.batch_enqueued_tokens`: the account's enqueued-token limit, if set.
    pub enqueued_budget: Option<u64>,
    /// Held from the admission check to the end of the create, so this worker's chunks
    /// (taken side by side) are admitted one at a time, each seeing the batches the previous
    /// one created. Workers do not coordinate: two of them may both admit a chunk, and the
    /// provider then fails one batch with `token_limit_exceeded`, which waits and is created
    /// again.
    pub admission: tokio::sync::Mutex<()>,
}

/// Starts a chunk consumer for each served provider in batch mode (`providers.<p>.batch`).
pub fn spawn_consumers(
    conn: &Arc<Connection>,
    w: &Worker,
    ctx: &Arc<Context>,
    consumers: &mut tokio::task::JoinSet<anyhow::Result<()>>,
    shutdown: &CancellationToken,
) {
    for (name, (client, _)) in &w.clients {
        let Some(pcfg) = w.cfg.providers.get(name).filter(|p| p.batch) else { continue };
        let b = Arc::new(Batch {
            ctx: ctx.clone(),
            conn: conn.clone(),
            client: client.clone(),
            poll_s: pcfg.batch_poll_interval_s,
            batches: ProviderBatches::new(w.provider_batches.clone(), name, pcfg.batch_poll_interval_s),
            enqueued_budget: pcfg.batch_enqueued_tokens,
            admission: tokio::sync::Mutex::new(()),
        });
        consumers.spawn(consume(b, w.in_flight.clone(), shutdown.clone()));
    }
}

/// Consumes `provider`'s chunk queue on `conn` until the connection fails (`Err`) or
/// `shutdown` fires (`Ok`; chunk tasks keep running in `in_flight`).
pub async fn consume(b: Arc<Batch>, in_flight: TaskTracker, shutdown: CancellationToken) -> anyhow::Result<()> {
    let topology = &b.ctx.publisher.topology;
    let name = b.client.name.clone();
    let ch = fleet::amqp::open_channel(&b.conn).await?;
    topology.declare_chunk_queues(&ch, &name, b.poll_s).await?;
    ch.basic_qos(CHUNK_PREFETCH, BasicQosOptions::default()).await?;
    let tag = format!("{}/batch/{name}", b.ctx.worker_id);
    let mut consumer = ch
        .basic_consume(
            topology.chunk_queue(&name).into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut cancelling = false;
    let mut refresh = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = shutdown.cancelled(), if !cancelling => {
                cancelling = true;
                if ch.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await.is_err() {
                    return Ok(());
                }
            }
            _ = refresh.tick() => b.batches.refresh(),
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let (b, ch) = (b.clone(), ch.clone());
                    in_flight.spawn(async move {
                        // Chunk deliveries are settled one by one, never in groups.
                        handle(&b, Tracked::alone(delivery).await).await;
                        drop(ch);
                    });
                }
                Some(Err(e)) => return Err(e.into()),
                None if cancelling => return Ok(()),
                None => anyhow::bail!("chunk consumer of {name} ended unexpectedly"),
            }
        }
    }
}

/// Parks a chunk message that is not one.
async fn dead_letter(b: &Batch, delivery: Tracked, reason: &str) {
    b.ctx.publisher.dead_letter(&b.client.name, delivery, DeadLabel::Malformed, reason).await;
}

/// Handles one chunk delivery to completion; never panics on bad input, always settles.
async fn handle(b: &Batch, delivery: Tracked) {
    let provider = b.client.name.as_str();
    let task: ChunkTask = match serde_json::from_slice(&delivery.data) {
        Ok(t) => t,
        Err(e) => {
            let reason = format!("malformed chunk: {e}");
            return dead_letter(b, delivery, &reason).await;
        }
    };
    if let Err(e) = task.check() {
        let reason = format!("invalid chunk: {e}");
        return dead_letter(b, delivery, &reason).await;
    }
    if task.provider != provider {
        let reason = format!("chunk for provider {:?} on the chunk queue of {provider:?}", task.provider);
        return dead_letter(b, delivery, &reason).await;
    }
    // Producers publish chunks `pending`; only workers write one naming a provider batch,
    // and sign it: an unsigned `created` chunk is never acted on (fleet::signing).
    if let ChunkState::Created { batch_id, .. } = &task.state {
        if let Err(e) = fleet::signing::verify(&delivery.properties, &delivery.data) {
            let reason = format!("unsigned chunk in state created (batch {batch_id}): {e}");
            return dead_letter(b, delivery, &reason).await;
        }
    }
    let redelivered = delivery.redelivered || delivery_count(&delivery) > 0;
    match task.state.clone() {
        ChunkState::Pending { maybe_created } => pending(b, task, maybe_created || redelivered, delivery).await,
        ChunkState::Created { batch_id, input_file_id, cancel_sent, .. } => {
            let created = Created { batch_id, input_file_id };
            poll(b, task, created, cancel_sent, delivery).await
        }
    }
}

/// Why the job no longer wants its chunk run: cancelled, or past its deadline.
fn unwanted(b: &Batch, task: &ChunkTask) -> Option<fleet::wire::ItemStatus> {
    if b.ctx.cancelled.contains(&task.job_id) {
        Some(fleet::wire::ItemStatus::Cancelled)
    } else if task.deadline_ms.is_some_and(|d| fleet::now_ms() > d) {
        Some(fleet::wire::ItemStatus::Expired)
    } else {
        None
    }
}

/// The key of every call about the chunk's provider batch: the one it was created with (a
/// provider shows a batch and its files only to keys of the project that created it), else
/// (a chunk of an earlier version, or a variable this worker lacks) the pool's batch key.
/// `Err` names the chunk's key while it is out of this worker's rotation: calling with it
/// would be refused, and calling with another key would not find the batch.
fn chunk_key(b: &Batch, task: &ChunkTask) -> Result<usize, String> {
    let ChunkState::Created { key_env: Some(env), .. } = &task.state else { return Ok(b.client.keys.batch_key()) };
    match b.client.keys.by_env(env) {
        Some(i) if b.client.keys.is_retired(i) => Err(env.clone()),
        Some(i) => Ok(i),
        None => {
            tracing::info!(job_id = %task.job_id, chunk = task.chunk, key_env = %env, "this worker has no key from the chunk's variable; using its batch key");
            Ok(b.client.keys.batch_key())
        }
    }
}

/// The chunk's recorded key variable (see [`chunk_key`]), carried into its next state.
fn key_env_of(task: &ChunkTask) -> Option<String> {
    match &task.state {
        ChunkState::Created { key_env, .. } => key_env.clone(),
        ChunkState::Pending { .. } => None,
    }
}

/// A chunk with no known provider batch: find or create one.
async fn pending(b: &Batch, mut task: ChunkTask, maybe_created: bool, delivery: Tracked) {
    let key = b.client.keys.batch_key();
    let api = BatchApi::new(&b.client, b.ctx.publisher.topology.namespace(), key);
    let Some((items, delivery)) = read_items(b, &task, delivery).await else { return };
    if let Some(status) = unwanted(b, &task) {
        let results = outcome::all_unrun(&b.ctx.worker_id, &task, &items, status);
        finish(b, &task, results, Vec::new(), delivery).await;
        return;
    }
    let found = if maybe_created { api.find(&task).await } else { Ok(None) };
    let created = match found {
        Ok(Some(c)) => {
            tracing::info!(job_id = %task.job_id, chunk = task.chunk, batch_id = %c.batch_id, "found the chunk's provider batch; not creating another");
            Ok(c)
        }
        Ok(None) => {
            let refused = unbatchable(&b.client, &items.items);
            let list: Vec<Item> = items.values().filter(|i| !refused.contains_key(&i.index)).cloned().collect();
            if list.is_empty() {
                let results =
                    outcome::of_lines(&b.ctx.worker_id, &task, &items, &refused, HashMap::new(), None, None).0;
                finish(b, &task, results, Vec::new(), delivery).await;
                return;
            }
            // Held until the create has answered (see `Batch::admission`).
            let _admitted = match admit(b, &api, &list).await {
                Ok(slot) => slot,
                Err(waiting) => {
                    tracing::info!(job_id = %task.job_id, chunk = task.chunk, reason = %waiting, "the provider's enqueued-token budget is full; the chunk waits");
                    b.ctx.publisher.metrics.admission_waits.with_label_values(&[&task.provider, "budget"]).inc();
                    task.admission_since_ms.get_or_insert_with(fleet::now_ms);
                    task.state = ChunkState::Pending { maybe_created };
                    to_poll_queue(b, &task, delivery).await;
                    return;
                }
            };
            if let Some(since) = task.admission_since_ms.take() {
                let waited_s = fleet::now_ms().saturating_sub(since) / 1000;
                tracing::info!(job_id = %task.job_id, chunk = task.chunk, waited_s, "admitted after waiting for the enqueued-token budget");
            }
            api.create(&task, &list).await
        }
        Err(e) => Err(e),
    };
    match created {
        Ok(c) => {
            test_pause("created").await;
            tracing::info!(job_id = %task.job_id, chunk = task.chunk, batch_id = %c.batch_id, items = task.len(), "chunk's provider batch recorded; polling it");
            task.state = ChunkState::Created {
                batch_id: c.batch_id,
                input_file_id: c.input_file_id,
                cancel_sent: false,
                key_env: b.client.keys.key(key).env.clone(),
            };
            to_poll_queue(b, &task, delivery).await;
        }
        Err(ApiError::Transient(e)) => {
            // The create may have reached the provider: the next taker looks first.
            tracing::info!(job_id = %task.job_id, chunk = task.chunk, error = %e, "cannot create the provider batch yet; retrying at the next poll");
            task.state = ChunkState::Pending { maybe_created: true };
            to_poll_queue(b, &task, delivery).await;
        }
        Err(ApiError::Refused { status, message }) => {
            tracing::info!(job_id = %task.job_id, chunk = task.chunk, status, message = %message, "the provider refused the batch");
            let results = outcome::refused(&b.ctx.worker_id, &task, &items, &message);
            finish(b, &task, results, Vec::new(), delivery).await;
        }
    }
}

/// One poll pass of a chunk whose provider batch exists.
async fn poll(b: &Batch, task: ChunkTask, created: Created, mut cancel_sent: bool, delivery: Tracked) {
    let started = Instant::now();
    let key = match chunk_key(b, &task) {
        Ok(key) => key,
        Err(env) => {
            tracing::info!(batch_id = %created.batch_id, key_env = %env, "the chunk's key is out of rotation; polling again later");
            return poll_again(b, task, created, cancel_sent, delivery, started).await;
        }
    };
    let api = BatchApi::new(&b.client, b.ctx.publisher.topology.namespace(), key);
    let tag = task.tag(b.ctx.publisher.topology.namespace());
    let polled = match api.poll(&created.batch_id).await {
        Ok(p) => p,
        Err(ApiError::Transient(e)) => {
            tracing::info!(batch_id = %created.batch_id, error = %e, "cannot poll the provider batch; trying again later");
            return poll_again(b, task, created, cancel_sent, delivery, started).await;
        }
        // The key was refused, not the batch: the items wait for the key (probed back into
        // rotation by the online calls' key checks), as online items wait for a good key.
        Err(ApiError::Refused { status: status @ (401 | 403), message }) => {
            tracing::info!(batch_id = %created.batch_id, status, message = %message, "the provider refused the chunk's key; polling again later");
            return poll_again(b, task, created, cancel_sent, delivery, started).await;
        }
        Err(ApiError::Refused { status, message }) => {
            // The provider does not know the batch (any more): nothing will come of it.
            let Some((items, delivery)) = read_items(b, &task, delivery).await else { return };
            let message = format!("the provider answered HTTP {status} for batch {}: {message}", created.batch_id);
            let results = outcome::refused(&b.ctx.worker_id, &task, &items, &message);
            b.batches.ended(&tag);
            finish(b, &task, results, Vec::new(), delivery).await;
            return;
        }
    };
    // Before anything is done to the batch with the fleet's key: it must be this chunk's.
    if !polled.is_chunks(b.client.kind(), &tag) {
        let reason =
            format!("forged chunk: provider batch {} is not this chunk's (tagged {:?})", created.batch_id, polled.tag);
        return dead_letter(b, delivery, &reason).await;
    }
    test_pause("polled").await;
    if unwanted(b, &task).is_some() && !cancel_sent && polled.ending.is_none() {
        match api.cancel(&created.batch_id).await {
            // A refusal: the batch has ended meanwhile (nothing left to cancel).
            Ok(()) | Err(ApiError::Refused { .. }) => cancel_sent = true,
            Err(e) => tracing::info!(batch_id = %created.batch_id, error = %e, "cannot cancel the provider batch yet"),
        }
    }
    b.batches.seen(&tag, polled.status, polled.ending.is_some());
    tracing::info!(job_id = %task.job_id, chunk = task.chunk, batch_id = %created.batch_id, status = polled.status, polls = task.polls + 1, "polled provider batch");
    if polled.ending == Some(api::Ending::QueueFull) {
        b.ctx.publisher.metrics.poll_cycle.observe(started.elapsed().as_secs_f64());
        return queue_full(b, task, &api, &polled, delivery).await;
    }
    if polled.ending.is_none() {
        return poll_again(b, task, created, cancel_sent, delivery, started).await;
    }
    b.ctx.publisher.metrics.poll_cycle.observe(started.elapsed().as_secs_f64());
    fetch(b, task, created, polled, delivery).await;
}

/// Whether a chunk of `items` may have its provider batch created now: always when the
/// provider has no enqueued-token budget (or its kind cannot say what is enqueued); else
/// only while the batches in progress and this one fit in it, or nothing of ours is in
/// progress (a chunk over the budget on its own could never run otherwise; the producer cuts
/// none such). `Ok` holds this worker's admission lock, to be kept until the create has
/// answered; `Err` says why the chunk waits.
async fn admit<'b>(
    b: &'b Batch,
    api: &BatchApi<'_>,
    items: &[Item],
) -> Result<Option<tokio::sync::MutexGuard<'b, ()>>, String> {
    let Some(budget) = b.enqueued_budget else { return Ok(None) };
    let slot = b.admission.lock().await;
    let estimate = openai::estimate_tokens(items);
    match api.enqueued_tokens().await {
        Ok(Some(queued)) if queued > 0 && queued.saturating_add(estimate) > budget => {
            Err(format!("{queued} tokens in progress + {estimate} for this chunk > batch_enqueued_tokens {budget}"))
        }
        Ok(_) => Ok(Some(slot)),
        // Not known now: rather wait a poll interval than overflow the queue.
        Err(e) => Err(format!("the batches in progress cannot be listed: {e}")),
    }
}

/// A provider batch failed because the account's enqueued-token queue was full: nothing of
/// it ran and nothing is failed. Its files are deleted, and the chunk goes back to the poll
/// queue `pending`, under the next tag generation (so the failed batch is never taken for
/// the new one), to be admitted and created again.
async fn queue_full(b: &Batch, mut task: ChunkTask, api: &BatchApi<'_>, polled: &Polled, delivery: Tracked) {
    let tag = task.tag(b.ctx.publisher.topology.namespace());
    tracing::info!(job_id = %task.job_id, chunk = task.chunk, generation = task.generation, "the provider's enqueued-token queue was full (token_limit_exceeded); the chunk waits and is created again");
    b.ctx.publisher.metrics.admission_waits.with_label_values(&[&task.provider, "token_limit_exceeded"]).inc();
    api.clean_up(polled).await;
    b.batches.ended(&tag);
    task.generation = task.generation.saturating_add(1);
    // A worker killed before acking this delivery leaves a second copy of the same
    // generation: whichever copy is taken second must find the first one's batch.
    task.state = ChunkState::Pending { maybe_created: true };
    task.polls = 0;
    task.admission_since_ms.get_or_insert_with(fleet::now_ms);
    to_poll_queue(b, &task, delivery).await;
}

/// An ended provider batch: every item gets its result.
async fn fetch(b: &Batch, task: ChunkTask, created: Created, polled: Polled, delivery: Tracked) {
    // The poll just used the chunk's key; should it have left the rotation since, the
    // fetch waits for it with the chunk.
    let Ok(key) = chunk_key(b, &task) else { return to_poll_queue(b, &task, delivery).await };
    let api = BatchApi::new(&b.client, b.ctx.publisher.topology.namespace(), key);
    let Some((items, delivery)) = read_items(b, &task, delivery).await else { return };
    let mut lines = HashMap::new();
    // Only lines of the chunk's own items are kept: a provider cannot grow this map.
    let mut keep = |f: api::Fetched| {
        if items.items.contains_key(&f.index) {
            lines.entry(f.index).or_insert(f.outcome);
        }
    };
    let refused = unbatchable(&b.client, &items.items);
    // The items put in the batch, in request order (as `pending` put them).
    let order: Vec<u64> = items.items.keys().copied().filter(|i| !refused.contains_key(i)).collect();
    if let Err(e) = api.fetch(&task, &created.batch_id, &polled, &order, &mut keep).await {
        tracing::info!(batch_id = %created.batch_id, error = %e, "cannot read the batch's results yet; trying again later");
        to_poll_queue(b, &task, delivery).await;
        return;
    }
    let wanted = unwanted(b, &task);
    let (results, fallback) =
        outcome::of_lines(&b.ctx.worker_id, &task, &items, &refused, lines, polled.ending.clone(), wanted);
    tracing::info!(job_id = %task.job_id, chunk = task.chunk, batch_id = %created.batch_id, results = results.len(), online_fallback = fallback.len(), "fetched provider batch");
    if finish(b, &task, results, fallback, delivery).await {
        api.clean_up(&polled).await;
        b.batches.ended(&task.tag(b.ctx.publisher.topology.namespace()));
    }
}

/// Items of the chunk that are not put in its provider batch, with the reason: a `url`
/// that is not an endpoint of the provider (only the producer, which validates every line,
/// should write items; anyone else is suspect), or another endpoint than the chunk's first
/// item (one endpoint per batch; the producer cuts chunks that way); for Gemini, what its
/// batch API cannot take ([`gemini::unbatchable`]).
fn unbatchable(client: &ProviderClient, items: &BTreeMap<u64, Item>) -> HashMap<u64, String> {
    let mut endpoint: Option<&str> = None;
    let mut refused = HashMap::new();
    for item in items.values() {
        if let Err(e) = client.target(&item.url) {
            refused.insert(item.index, format!("forbidden_url: {e}"));
        } else if *endpoint.get_or_insert(&item.url) != item.url {
            refused.insert(item.index, "another endpoint than the rest of its chunk".to_string());
        }
    }
    if client.kind() == fleet::config::ProviderKind::Gemini {
        let more = gemini::unbatchable(items, &refused);
        refused.extend(more);
    }
    refused
}

/// Reads the chunk's items, handing the delivery back with them; on a broker failure the
/// delivery is requeued (after a pause) and `None` returned.
async fn read_items(b: &Batch, task: &ChunkTask, delivery: Tracked) -> Option<(ChunkItems, Tracked)> {
    match items::read(&b.conn, &b.ctx.publisher.topology, task, b.ctx.max_message_bytes).await {
        Ok(items) => {
            if items.unnamed > 0 {
                tracing::warn!(job_id = %task.job_id, chunk = task.chunk, missing = items.unnamed, "items of the chunk are not in the job's batch items stream; the rest run without them");
            }
            Some((items, delivery))
        }
        Err(e) => {
            tracing::warn!(job_id = %task.job_id, chunk = task.chunk, error = %e, "cannot read the chunk's items; requeueing it");
            requeue_after_pause(delivery).await;
            None
        }
    }
}

/// Publishes the chunk (in its new state) to the poll queue, confirmed, then acks the
/// delivery it came from. If the publish fails the delivery is requeued instead.
/// Ends a poll pass whose batch is still running (or could not be asked): the chunk, with
/// its poll counted and whether a cancel was sent, waits in the poll queue for the next pass.
async fn poll_again(
    b: &Batch,
    mut task: ChunkTask,
    created: Created,
    cancel_sent: bool,
    delivery: Tracked,
    started: Instant,
) {
    task.polls += 1;
    let key_env = key_env_of(&task);
    task.state =
        ChunkState::Created { batch_id: created.batch_id, input_file_id: created.input_file_id, cancel_sent, key_env };
    to_poll_queue(b, &task, delivery).await;
    b.ctx.publisher.metrics.poll_cycle.observe(started.elapsed().as_secs_f64());
}

async fn to_poll_queue(b: &Batch, task: &ChunkTask, delivery: Tracked) {
    let payload = serde_json::to_vec(task).expect("chunks serialize");
    let queue = b.ctx.publisher.topology.poll_queue(&b.client.name, b.poll_s);
    let props = fleet::signing::sign(amqp::persistent_json(), &payload);
    match b.ctx.publisher.publish_confirmed("", &queue, &payload, props).await {
        Ok(()) => {
            if let Err(e) = delivery.ack().await {
                tracing::warn!(error = %e, "ack failed after moving a chunk to the poll queue; it may be taken twice");
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot publish to the poll queue; requeueing the chunk");
            requeue_after_pause(delivery).await;
        }
    }
}

/// Publishes every result (and re-queues the items falling back to online), then acks the
/// chunk. Returns whether the chunk was acked; otherwise it is requeued and redone (the
/// results already out are duplicates then, dropped downstream).
async fn finish(b: &Batch, task: &ChunkTask, results: Vec<ItemResult>, fallback: Vec<Item>, delivery: Tracked) -> bool {
    let ctx = &b.ctx;
    let mut failure = None;
    for window in results.chunks(PUBLISH_CONCURRENCY) {
        let mut confirms = Vec::with_capacity(window.len());
        for r in window {
            confirms.push(ctx.publisher.outcome(r));
        }
        failure = futures::future::join_all(confirms).await.into_iter().find_map(Result::err);
        if failure.is_some() {
            break;
        }
        test_pause("publishing").await;
    }
    if failure.is_none() {
        for item in &fallback {
            let payload = serde_json::to_vec(item).expect("items serialize");
            let exchange = ctx.publisher.topology.items_exchange();
            if let Err(e) =
                ctx.publisher.publish_confirmed(&exchange, &item.provider, &payload, amqp::persistent_json()).await
            {
                failure = Some(e);
                break;
            }
        }
    }
    match failure {
        Some(amqp::PublishError::Unroutable { .. }) => {
            // The job's results stream is gone: nobody can receive these results.
            tracing::info!(job_id = %task.job_id, chunk = task.chunk, "the job's results stream is gone; dropping the chunk");
        }
        Some(e) => {
            tracing::warn!(job_id = %task.job_id, chunk = task.chunk, error = %e, "cannot publish the chunk's results; requeueing it");
            requeue_after_pause(delivery).await;
            return false;
        }
        None => {}
    }
    if let Err(e) = delivery.ack().await {
        tracing::warn!(error = %e, "ack failed after publishing a chunk's results; it may be fetched again");
        return false;
    }
    for r in &results {
        ctx.publisher.metrics.items.with_label_values(&[&task.provider, r.status.as_str()]).inc();
    }
    true
}

/// Test seam: with `FLEET_TEST_BATCH_PAUSE=<point>` in its environment, a worker stops at
/// that point of a chunk's life (logging `batch test pause at <point>`) until it is killed,
/// so the end-to-end tests can SIGKILL it exactly there. Points: `created` (the create
/// call returned, nothing recorded yet), `polled` (a poll answered, the chunk not moved
/// yet), `publishing` (some of a fetched chunk's results are out, not all).
async fn test_pause(point: &str) {
    static PAUSE_AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let at = PAUSE_AT.get_or_init(|| std::env::var("FLEET_TEST_BATCH_PAUSE").ok());
    if at.as_deref() == Some(point) {
        tracing::info!("batch test pause at {point}");
        std::future::pending::<()>().await;
    }
}

/// `batch_provider_batches{provider,status}`: the provider batches this worker polled last,
/// by the provider's status. A batch is counted by the worker that polled it most recently
/// (an entry is dropped once the batch ended, or when no poll refreshed it for two poll
/// intervals: another worker polls it now).
pub struct ProviderBatches {
    gauge: IntGaugeVec,
    provider: String,
    stale_after: Duration,
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    /// Provider status of each batch by chunk tag, and when it was polled.
    batches: HashMap<String, (&'static str, Instant)>,
    /// Every status shown so far: one no longer seen reads 0, not a stale count.
    shown: std::collections::BTreeSet<&'static str>,
}

impl ProviderBatches {
    /// Counts `provider`'s batches into `gauge`, forgetting those not polled for two `poll_s` intervals.
    pub fn new(gauge: IntGaugeVec, provider: &str, poll_s: u64) -> ProviderBatches {
        ProviderBatches {
            gauge,
            provider: provider.to_string(),
            stale_after: Duration::from_secs(2 * poll_s + 30),
            seen: Mutex::default(),
        }
    }

    fn seen(&self, tag: &str, status: &'static str, ended: bool) {
        {
            let mut seen = self.seen.lock().expect("not poisoned");
            if ended {
                seen.batches.remove(tag);
            } else {
                seen.batches.insert(tag.to_string(), (status, Instant::now()));
            }
        }
        self.refresh();
    }

    fn ended(&self, tag: &str) {
        self.seen.lock().expect("not poisoned").batches.remove(tag);
        self.refresh();
    }

    /// Recomputes the gauge from the batches seen recently.
    fn refresh(&self) {
        let mut seen = self.seen.lock().expect("not poisoned");
        let stale_after = self.stale_after;
        seen.batches.retain(|_, (_, at)| at.elapsed() < stale_after);
        let mut counts: BTreeMap<&'static str, i64> = BTreeMap::new();
        for (status, _) in seen.batches.values() {
            *counts.entry(status).or_default() += 1;
        }
        let statuses: Vec<&'static str> = counts.keys().copied().collect();
        seen.shown.extend(statuses);
        for status in &seen.shown {
            self.gauge
                .with_label_values(&[self.provider.as_str(), status])
                .set(counts.get(status).copied().unwrap_or(0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_batches_gauge_counts_by_status_and_returns_to_zero() {
        let registry = prometheus::Registry::new();
        let gauge = fleet::metrics::register_provider_batches(&registry);
        let batches = ProviderBatches::new(gauge.clone(), "p", 1);
        let value = |status: &str| gauge.with_label_values(&["p", status]).get();
        batches.seen("ns/j/0", "in_progress", false);
        batches.seen("ns/j/1", "in_progress", false);
        batches.seen("ns/j/2", "validating", false);
        assert_eq!((value("in_progress"), value("validating")), (2, 1));
        batches.seen("ns/j/2", "in_progress", false);
        assert_eq!((value("in_progress"), value("validating")), (3, 0), "a status no longer seen reads 0");
        batches.seen("ns/j/0", "completed", true);
        batches.ended("ns/j/1");
        batches.ended("ns/j/2");
        assert_eq!(value("in_progress"), 0);
        assert_eq!(value("completed"), 0, "ended batches are not counted");
    }
}
