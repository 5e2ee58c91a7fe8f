//! Batching `items_finished` events: one confirmed publish per job and flush instead of
//! one per item.
//!
//! Every item still waits for the confirm of the batch holding its event before it is
//! acked, so nothing changes for correctness; the broker handles one quorum publish for
//! up to [`MAX_BATCH`] items. A batch is flushed when full or [`LINGER`] after its first
//! event, and its confirm is awaited off the batching loop so the next batch fills
//! meanwhile.

use std::collections::BTreeMap;
use std::time::Duration;

use fleet::amqp::{self, PublishError};
use fleet::topology::Topology;
use fleet::wire::{ItemStatus, LedgerEvent};
use lapin::Channel;
use tokio::sync::{mpsc, oneshot};

/// Events in one published batch at most.
const MAX_BATCH: usize = 500;
/// How long a batch waits for more events after its first.
const LINGER: Duration = Duration::from_millis(5);

struct Entry {
    job_id: String,
    provider: String,
    index: u64,
    status: ItemStatus,
    done: oneshot::Sender<Result<(), String>>,
}

/// Handle to the batching task of one connection.
#[derive(Clone)]
pub struct Ledger {
    tx: mpsc::Sender<Entry>,
}

impl Ledger {
    /// Starts the batching task publishing on `ch` (a confirm channel). It ends when every
    /// handle is dropped.
    pub fn spawn(ch: Channel, topology: Topology) -> Ledger {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(run(ch, topology, rx));
        Ledger { tx }
    }

    /// Records that an item finished; returns once the broker confirmed the event.
    pub async fn record(
        &self,
        job_id: &str,
        provider: &str,
        index: u64,
        status: ItemStatus,
    ) -> Result<(), PublishError> {
        let (done, wait) = oneshot::channel();
        let entry = Entry { job_id: job_id.to_string(), provider: provider.to_string(), index, status, done };
        self.tx.send(entry).await.map_err(|_| PublishError::Other("ledger batcher stopped".into()))?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(PublishError::Other(e)),
            Err(_) => Err(PublishError::Other("ledger batcher stopped".into())),
        }
    }
}

async fn run(ch: Channel, topology: Topology, mut rx: mpsc::Receiver<Entry>) {
    let queue = topology.ledger_queue();
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + LINGER;
        while batch.len() < MAX_BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(e)) => batch.push(e),
                Ok(None) | Err(_) => break,
            }
        }
        // One event per job (and provider) in the batch.
        let mut by_job: BTreeMap<(String, String), Vec<Entry>> = BTreeMap::new();
        for e in batch {
            by_job.entry((e.job_id.clone(), e.provider.clone())).or_default().push(e);
        }
        for ((job_id, provider), entries) in by_job {
            let event = LedgerEvent::ItemsFinished {
                job_id,
                provider,
                items: entries.iter().map(|e| (e.index, e.status)).collect(),
            };
            let payload = serde_json::to_vec(&event).expect("events serialize");
            let published = amqp::publish(&ch, "", &queue, &payload, amqp::persistent_json()).await;
            tokio::spawn(async move {
                let outcome = match published {
                    Ok(pending) => pending.wait().await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                for e in entries {
                    let _ = e.done.send(outcome.clone());
                }
            });
        }
    }
}
