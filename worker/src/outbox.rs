//! The outbox: the results of one job, from this worker, travel together. A result joins
//! the open group of its job; the group is published as one message ([`ResultGroup`],
//! type `results`) when it holds `worker.result_group_max` results, when it reaches
//! [`MAX_GROUP_BYTES`], or `worker.result_group_linger_ms` after its first result, whichever
//! comes first. The broker routes that one message to the job's results stream and to the
//! ledger, exactly as it routed each single result before: the output file and the tracker
//! still read the same messages, so they still agree on the first result of a redone item.
//!
//! The items behind a group are acked only once the group is confirmed (contiguous ones with
//! one multiple ack, see [`crate::acks`]); a worker killed while a group is open or
//! unconfirmed has acked none of them, and they are redelivered and redone.
//!
//! Whoever opens a group waits the linger and sends it; whoever fills it sends it at once.
//! Every result's caller waits until its item is settled, so the drain and the in-flight
//! accounting see it exactly as when each result was published alone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use fleet::amqp::{self, PublishError};
use fleet::topology::DeadLabel;
use fleet::wire::{ItemResult, ItemStatus, ResultGroup, KIND_RESULTS};
use tokio::sync::oneshot;

use crate::acks::{self, Tracked};
use crate::settle::Publisher;

/// A group is sent once its message reaches this size, whatever its count: results carry
/// whole provider answers, and readers hold a window of messages in memory (`producer
/// wait` 256, the tracker 2,000), so a group is kept no larger than one big answer alone.
pub const MAX_GROUP_BYTES: usize = 256 << 10;

/// Open groups, by job.
pub struct Outbox {
    max_results: usize,
    linger: Duration,
    open: Mutex<HashMap<GroupKey, Group>>,
    next_id: AtomicU64,
}

/// What every result of a group shares (a job's items all claim the same provider and
/// total; one that claims otherwise goes in a group of its own).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct GroupKey {
    job_id: String,
    provider: String,
    total: u64,
}

struct Group {
    /// Tells a group from a later one of the same job (the opener sends only its own).
    id: u64,
    /// The message so far: the header, then the entries, comma-separated.
    json: Vec<u8>,
    members: Vec<Member>,
}

/// A result in a group: its item's delivery, settled when the group is.
struct Member {
    delivery: Tracked,
    status: ItemStatus,
    settled: oneshot::Sender<()>,
}

impl Outbox {
    /// An outbox sending a group at `max_results` results, or `linger` after its first.
    pub fn new(max_results: usize, linger: Duration) -> Outbox {
        Outbox { max_results: max_results.max(1), linger, open: Mutex::new(HashMap::new()), next_id: AtomicU64::new(0) }
    }

    /// Publishes `result` in its job's group and settles `delivery` after the confirm;
    /// returns once it is settled (the online handler's one way out for a finished item).
    pub async fn send(&self, publisher: &Publisher, delivery: Tracked, result: ItemResult) {
        let key = GroupKey { job_id: result.job_id.clone(), provider: result.provider.clone(), total: result.total };
        let status = result.status;
        let worker = result.worker.clone();
        let entry = serde_json::to_vec(&result.into_grouped()).expect("results serialize");
        let (settled, mut done) = oneshot::channel();
        let member = Member { delivery, status, settled };
        let (full, opened) = {
            let mut open = self.open.lock().expect("outbox lock");
            let group = open.entry(key.clone()).or_insert_with(|| Group {
                id: self.next_id.fetch_add(1, Ordering::Relaxed),
                json: ResultGroup::header_json(&key.job_id, &key.provider, key.total, &worker),
                members: Vec::new(),
            });
            if !group.members.is_empty() {
                group.json.push(b',');
            }
            group.json.extend_from_slice(&entry);
            group.members.push(member);
            let opened = (group.members.len() == 1).then_some(group.id);
            if group.members.len() >= self.max_results || group.json.len() >= MAX_GROUP_BYTES {
                (open.remove(&key), None)
            } else {
                (None, opened)
            }
        };
        if let Some(group) = full {
            self.flush(publisher, &key, group).await;
        } else if let Some(id) = opened {
            tokio::select! {
                _ = &mut done => return,
                _ = tokio::time::sleep(self.linger) => {
                    let mine = {
                        let mut open = self.open.lock().expect("outbox lock");
                        match open.get(&key) {
                            Some(g) if g.id == id => open.remove(&key),
                            _ => None,
                        }
                    };
                    if let Some(group) = mine {
                        self.flush(publisher, &key, group).await;
                    }
                }
            }
        }
        let _ = done.await;
    }

    /// Publishes a group, then settles its items: acked after the confirm; dead-lettered
    /// when the job's results stream is gone; requeued when the publish failed.
    async fn flush(&self, publisher: &Publisher, key: &GroupKey, group: Group) {
        let Group { mut json, members, .. } = group;
        json.extend_from_slice(b"]}");
        let props = amqp::persistent_json().with_type(KIND_RESULTS.into());
        let exchange = publisher.topology.results_exchange();
        let published = publisher.publish_confirmed(&exchange, &key.job_id, &json, props).await;
        let mut waiters = Vec::with_capacity(members.len());
        match published {
            Ok(()) => {
                let mut deliveries = Vec::with_capacity(members.len());
                let mut statuses = Vec::with_capacity(members.len());
                for m in members {
                    deliveries.push(m.delivery);
                    statuses.push(m.status);
                    waiters.push(m.settled);
                }
                match acks::ack_all(deliveries).await {
                    // Counted after the ack so that the fleet's counters equal the results
                    // delivered.
                    Ok(_) => {
                        for status in statuses {
                            publisher.metrics.items.with_label_values(&[&key.provider, status.as_str()]).inc();
                        }
                    }
                    // The results are out; redeliveries publish duplicates, which collectors drop.
                    Err(e) => tracing::warn!(job_id = %key.job_id, error = %e, "ack failed after publishing results"),
                }
            }
            Err(PublishError::Unroutable { .. }) => {
                // The job's results stream is gone (deleted or expired): nobody can receive
                // these results. Park the items with the reason rather than drop them.
                let reason = format!("results queue of job {} does not exist", key.job_id);
                for m in members {
                    publisher.dead_letter(&key.provider, m.delivery, DeadLabel::NoResultsQueue, &reason).await;
                    waiters.push(m.settled);
                }
            }
            Err(e) => {
                tracing::warn!(job_id = %key.job_id, results = members.len(), error = %e, "cannot publish results; items will be redelivered");
                for m in members {
                    let _ = m.delivery.nack(true).await;
                    waiters.push(m.settled);
                }
            }
        }
        for w in waiters {
            let _ = w.send(());
        }
    }
}
