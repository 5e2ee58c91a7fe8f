//! Probes: the broker's cost of single choices the fleet makes, measured alone, so that a
//! choice is decided on numbers (`--scenario probes`). Each probe publishes
//! [`PROBE_MESSAGES`] persistent, confirmed messages the size of a result to one queue and
//! consumes them again; its row gives the broker's CPU and the bytes per message. (The
//! broker never reads a payload: its content does not matter, its size may.)
//!
//! - `ledger <type>`: the ledger's pattern (publish through the topic exchange, one
//!   consumer acking 2,000 at a time after a checkpoint) on a quorum, classic or stream
//!   queue.
//! - `acks <mode>`: the items queue's pattern (quorum, prefetch 256) acking every message
//!   alone or 64 at a time with one multiple ack, and with messages half the size (what a
//!   more compact encoding could save).

use std::collections::VecDeque;
use std::time::Instant;

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};

use crate::procs;
use crate::stack::Stack;
use crate::table::Row;
use crate::traffic::{Sampler, Scope};

/// Messages per probe.
const PROBE_MESSAGES: u64 = 20_000;
/// Publishes awaiting a confirm at once (as `producer submit`).
const CONFIRM_WINDOW: usize = 2048;

/// One probe's setting.
#[derive(Debug, Clone, Copy)]
struct Probe {
    name: &'static str,
    /// `x-queue-type`.
    queue_type: &'static str,
    prefetch: u16,
    /// Messages per (multiple) ack; 1 acks each alone.
    ack_every: u64,
    /// Message size, bytes: a result's ([`RESULT_BYTES`]) or less, to see what bytes cost.
    bytes: usize,
}

/// Size of the probes' messages: a result of the bench's workload (a mock chat completion).
const RESULT_BYTES: usize = 670;

const PROBES: [Probe; 6] = [
    Probe {
        name: "probe: ledger as quorum queue",
        queue_type: "quorum",
        prefetch: 2000,
        ack_every: 2000,
        bytes: RESULT_BYTES,
    },
    Probe {
        name: "probe: ledger as classic queue",
        queue_type: "classic",
        prefetch: 2000,
        ack_every: 2000,
        bytes: RESULT_BYTES,
    },
    Probe {
        name: "probe: ledger as stream",
        queue_type: "stream",
        prefetch: 2000,
        ack_every: 2000,
        bytes: RESULT_BYTES,
    },
    Probe {
        name: "probe: quorum, each ack alone",
        queue_type: "quorum",
        prefetch: 256,
        ack_every: 1,
        bytes: RESULT_BYTES,
    },
    Probe {
        name: "probe: quorum, multiple ack per 64",
        queue_type: "quorum",
        prefetch: 256,
        ack_every: 64,
        bytes: RESULT_BYTES,
    },
    Probe {
        name: "probe: quorum, per 64, half-size messages",
        queue_type: "quorum",
        prefetch: 256,
        ack_every: 64,
        bytes: RESULT_BYTES / 2,
    },
];

/// Runs every probe; a probe that fails gets a FAILED row.
pub(crate) async fn run(stack: &Stack) -> Vec<Row> {
    let mut rows = Vec::new();
    for probe in PROBES {
        let row = match measure(stack, probe).await {
            Ok(row) => row,
            Err(e) => Row::failed(probe.name, &e),
        };
        eprintln!("bench: {}: {}", probe.name, row.figure);
        rows.push(row);
    }
    rows
}

async fn measure(stack: &Stack, probe: Probe) -> anyhow::Result<Row> {
    let (ns, _dir) = stack.namespace("probe")?;
    let res = exercise(stack, probe, &ns).await;
    if let Err(e) = stack.delete_namespace(&ns).await {
        eprintln!("bench: deleting the probe's queue: {e:#}");
    }
    res
}

async fn exercise(stack: &Stack, probe: Probe, ns: &str) -> anyhow::Result<Row> {
    let (queue, exchange) = crate::stack::pipeline_names(ns);
    let conn = fleet::amqp::connect(&stack.amqp_url, "bench probe").await?;
    let ch = fleet::amqp::confirm_channel(&conn).await?;
    let durable = lapin::options::ExchangeDeclareOptions { durable: true, ..Default::default() };
    ch.exchange_declare(exchange.as_str().into(), lapin::ExchangeKind::Topic, durable, FieldTable::default()).await?;
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString(probe.queue_type.into()));
    let opts = QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare(queue.as_str().into(), opts, args).await?;
    ch.queue_bind(queue.as_str().into(), exchange.as_str().into(), "#".into(), Default::default(), Default::default())
        .await?;
    let payload = vec![b'x'; probe.bytes];

    let port = stack.amqp_port();
    let broker_before = procs::broker_cpu_s(port);
    let traffic = Sampler::start(port, Scope::OwnProcess);
    let started = Instant::now();
    let mut pending = VecDeque::with_capacity(CONFIRM_WINDOW);
    for i in 0..PROBE_MESSAGES {
        if pending.len() >= CONFIRM_WINDOW {
            let p: fleet::amqp::PendingConfirm = pending.pop_front().expect("non-empty");
            p.wait().await?;
        }
        let key = format!("job{}", i % 4);
        pending.push_back(fleet::amqp::publish(&ch, &exchange, &key, &payload, fleet::amqp::persistent_json()).await?);
    }
    for p in pending {
        p.wait().await?;
    }
    let consume_ch = conn.create_channel().await?;
    consume_ch.basic_qos(probe.prefetch, BasicQosOptions::default()).await?;
    let mut args = FieldTable::default();
    if probe.queue_type == "stream" {
        args.insert("x-stream-offset".into(), AMQPValue::LongString("first".into()));
    }
    let mut consumer =
        consume_ch.basic_consume(queue.as_str().into(), "probe".into(), BasicConsumeOptions::default(), args).await?;
    let mut got = 0u64;
    while got < PROBE_MESSAGES {
        let delivery = consumer.next().await.ok_or_else(|| anyhow::anyhow!("the probe's consumer ended"))??;
        got += 1;
        if got.is_multiple_of(probe.ack_every) || got == PROBE_MESSAGES {
            delivery.ack(BasicAckOptions { multiple: probe.ack_every > 1 }).await?;
        }
    }
    let wall_s = started.elapsed().as_secs_f64();
    let bytes = traffic.finish().await;
    let broker_cpu_s = broker_before.zip(procs::broker_cpu_s(port)).map(|(a, b)| b - a);
    fleet::amqp::close(&conn, "probe done").await;

    let per = |v: f64| v / PROBE_MESSAGES as f64;
    let mut row = Row {
        scenario: probe.name.to_string(),
        items: PROBE_MESSAGES,
        wall_s,
        items_per_s: PROBE_MESSAGES as f64 / wall_s,
        worker_cpu_s_per_1k: None,
        worker_peak_rss_mib: None,
        broker_cpu_us_per_item: broker_cpu_s.map(|s| per(s * 1e6)),
        worker_cpu_us_per_item: None,
        broker_bytes_per_item: bytes.map(|b| per(b as f64)),
        figure: format!("{} B messages published, then consumed", probe.bytes),
        targets_met: None,
        details: Default::default(),
    };
    if let Some(s) = broker_cpu_s {
        row = row.detail("broker_cpu_s", (s * 100.0).round() / 100.0);
    }
    Ok(row)
}
