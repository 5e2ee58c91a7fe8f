//! The reference: the fleet's work done by a bare lapin + reqwest pipeline inside this
//! process, with nothing else (no ledger, no tracker, no retries, no metrics, no output
//! file). It bounds what the broker, the mock and this machine allow, and the `overhead`
//! scenario is measured against it.
//!
//! ```text
//! publisher --confirms, window 2048--> <ns>.items (quorum)
//!   consumer (prefetch 256): POST body to the mock, publish the answer with a confirm
//!                            --> <ns>.results (quorum), then ack the item
//!   collector: consume <ns>.results, ack every 512, stop at the last result
//! ```

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use fleet::wire::Item;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, PublisherConfirm};

use crate::procs::{self, Usage};
use crate::stack::Stack;
use crate::workload;

/// Publishes awaiting a confirm at once (the producer's default `confirm_window`).
const CONFIRM_WINDOW: usize = 2048;
/// Items the consumer holds unacked (the worker's default `max_in_flight`).
const PREFETCH: u16 = 256;
/// Results acked at once by the collector (as `producer wait` does).
const ACK_BATCH: u64 = 512;
/// Give up when no result arrived for this long.
const STALL: Duration = Duration::from_secs(60);

/// What the reference achieved.
#[derive(Debug, Clone)]
pub(crate) struct Outcome {
    pub items: u64,
    /// First publish to last result collected, seconds.
    pub wall_s: f64,
    /// CPU and peak RSS of this whole process during the run.
    pub usage: Usage,
    /// Answers that were not HTTP 200 (forwarded like the others).
    pub non_200: u64,
}

impl Outcome {
    /// Items per second.
    pub(crate) fn rate(&self) -> f64 {
        self.items as f64 / self.wall_s
    }
}

/// Runs the reference pipeline for `items` items against the mock at `mock_url`.
pub(crate) async fn run(stack: &Stack, mock_url: &str, items: u64) -> anyhow::Result<Outcome> {
    let (ns, _dir) = stack.namespace("reference")?;
    let (items_q, results_q) = crate::stack::pipeline_names(&ns);
    let res = pipeline(stack, mock_url, items, &items_q, &results_q).await;
    if let Err(e) = stack.delete_namespace(&ns).await {
        eprintln!("bench: deleting the reference queues: {e:#}");
    }
    res
}

async fn pipeline(
    stack: &Stack,
    mock_url: &str,
    items: u64,
    items_q: &str,
    results_q: &str,
) -> anyhow::Result<Outcome> {
    let cpu_before = procs::read_usage("self")?.cpu_s;
    // One connection per role, as the fleet has one per process.
    let publisher = fleet::amqp::connect(&stack.amqp_url, "bench reference publisher").await?;
    let worker = fleet::amqp::connect(&stack.amqp_url, "bench reference worker").await?;
    let collector = fleet::amqp::connect(&stack.amqp_url, "bench reference collector").await?;
    let pub_ch = fleet::amqp::confirm_channel(&publisher).await?;
    declare_quorum(&pub_ch, items_q).await?;
    declare_quorum(&pub_ch, results_q).await?;

    let mut collected = tokio::spawn(collect(collector.create_channel().await?, results_q.into(), items));
    let non_200 = Arc::new(AtomicU64::new(0));
    let consuming = tokio::spawn(consume(
        worker.create_channel().await?,
        fleet::amqp::confirm_channel(&worker).await?,
        items_q.to_string(),
        results_q.to_string(),
        format!("{}{}", mock_url, workload::CHAT_URL),
        non_200.clone(),
    ));

    let started = Instant::now();
    let finished = async {
        publish_items(&pub_ch, items_q, items).await?;
        (&mut collected).await.context("collector panicked")?
    }
    .await;
    collected.abort();
    consuming.abort();
    for conn in [&publisher, &worker, &collector] {
        let _ = conn.close(200, "done".into()).await;
    }
    let wall_s = (finished? - started).as_secs_f64();
    let now = procs::read_usage("self")?;
    Ok(Outcome {
        items,
        wall_s,
        usage: Usage { cpu_s: now.cpu_s - cpu_before, peak_rss_kib: now.peak_rss_kib },
        non_200: non_200.load(Ordering::Relaxed),
    })
}

async fn declare_quorum(ch: &Channel, queue: &str) -> anyhow::Result<()> {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    let opts = QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare(queue.into(), opts, args).await?;
    Ok(())
}

/// Publishes `items` persistent items with at most [`CONFIRM_WINDOW`] unconfirmed.
async fn publish_items(ch: &Channel, queue: &str, items: u64) -> anyhow::Result<()> {
    let job_id = workload::job_id();
    let submitted_at_ms = fleet::now_ms();
    let mut pending: VecDeque<PublisherConfirm> = VecDeque::with_capacity(CONFIRM_WINDOW);
    let mut payload = Vec::with_capacity(1024);
    for i in 0..items {
        let item = workload::item(&job_id, i, items, submitted_at_ms)?;
        payload.clear();
        serde_json::to_writer(&mut payload, &item)?;
        if pending.len() >= CONFIRM_WINDOW {
            expect_ack(pending.pop_front().expect("window is full").await?)?;
        }
        pending.push_back(
            ch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &payload,
                fleet::amqp::persistent_json(),
            )
            .await?,
        );
    }
    for p in pending {
        expect_ack(p.await?)?;
    }
    Ok(())
}

fn expect_ack(c: lapin::Confirmation) -> anyhow::Result<()> {
    anyhow::ensure!(c.is_ack(), "the broker refused a publish: {c:?}");
    Ok(())
}

/// The worker's part on channel `ch` (results go out on the confirm channel `publish`):
/// one task per delivery, prefetch-bounded. Runs until aborted.
async fn consume(
    ch: Channel,
    publish: Channel,
    items_q: String,
    results_q: String,
    endpoint: String,
    non_200: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let http =
        reqwest::Client::builder().timeout(Duration::from_secs(60)).pool_max_idle_per_host(PREFETCH.into()).build()?;
    ch.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            items_q.as_str().into(),
            "bench-reference".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let results_q: Arc<str> = results_q.into();
    let endpoint: Arc<str> = endpoint.into();
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        let (http, publish, results_q, endpoint, non_200) =
            (http.clone(), publish.clone(), results_q.clone(), endpoint.clone(), non_200.clone());
        tokio::spawn(async move {
            let done = async {
                let item: Item = serde_json::from_slice(&delivery.data)?;
                let resp = http
                    .post(&*endpoint)
                    .header("content-type", "application/json")
                    .body(item.body.get().to_string())
                    .send()
                    .await?;
                if resp.status() != reqwest::StatusCode::OK {
                    non_200.fetch_add(1, Ordering::Relaxed);
                }
                let answer = resp.bytes().await?;
                let confirm = publish
                    .basic_publish(
                        "".into(),
                        (&*results_q).into(),
                        BasicPublishOptions::default(),
                        &answer,
                        fleet::amqp::persistent_json(),
                    )
                    .await?
                    .await?;
                expect_ack(confirm)?;
                delivery.ack(BasicAckOptions::default()).await?;
                anyhow::Ok(())
            };
            if let Err(e) = done.await {
                eprintln!("bench: reference item failed ({e:#}); requeueing it");
                let requeue = BasicNackOptions { requeue: true, ..Default::default() };
                let _ = delivery.nack(requeue).await;
            }
        });
    }
    Ok(())
}

/// Counts results up to `items`, acking in batches; returns when the last one arrived.
async fn collect(ch: Channel, results_q: String, items: u64) -> anyhow::Result<Instant> {
    ch.basic_qos(2 * ACK_BATCH as u16, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            results_q.as_str().into(),
            "bench-collector".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut seen = 0u64;
    let mut unacked = 0u64;
    while seen < items {
        let next = tokio::time::timeout(STALL, consumer.next())
            .await
            .with_context(|| format!("no result for {STALL:?} after {seen} of {items}"))?;
        let delivery = next.context("results consumer ended")??;
        seen += 1;
        unacked += 1;
        if unacked >= ACK_BATCH || seen == items {
            delivery.acker.ack(BasicAckOptions { multiple: true }).await?;
            unacked = 0;
        }
    }
    Ok(Instant::now())
}
