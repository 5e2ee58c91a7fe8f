//! Provider batch mode on the wire: the chunk message that moves between a provider's chunk
//! queue and its poll delay queue, and the names both the producer and the worker use.
//!
//! A batch-mode job's items are not put on the items queue: the producer appends them to the
//! job's batch items stream (`<ns>.batch.items.<job>`, read by offset) and publishes one
//! [`ChunkTask`] per slice of the job that fits the provider's batch limits. The chunk
//! message *is* the chunk's durable state: `pending` (no provider batch known) →
//! `created` (the provider batch id, recorded by a confirmed publish before the message that
//! said `pending` is acked) → acked once every item of the chunk has its result.
//!
//! Everything here is read from a queue, so [`ChunkTask::check`] bounds it before use; a
//! batch id goes into a URL path, so it may only hold `[A-Za-z0-9_-]`.

use lapin::types::{AMQPValue, FieldTable};
use lapin::Channel;
use serde::{Deserialize, Serialize};

use crate::topology::{declare_queue, quorum, Topology, RESULTS_MAX_AGE};
use crate::wire::{check_job_id, Invalid, MAX_JOB_ITEMS};

/// How a job's requests are executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobMode {
    /// One provider call per item (the items queue).
    Online,
    /// Through the provider's batch API, chunk by chunk.
    Batch,
}

/// Most items in one chunk, whatever a message claims (Anthropic's limit, the larger one).
pub const MAX_CHUNK_ITEMS: u64 = 100_000;
/// Longest provider batch or file id accepted from a queue or a provider.
pub const MAX_PROVIDER_ID_BYTES: usize = 200;

/// Where a chunk is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ChunkState {
    /// No provider batch is known for this chunk.
    Pending {
        /// A create call may have been made (its holder died, or its answer was lost): the
        /// provider is asked for the chunk's batch before anything is created. A redelivered
        /// pending chunk is treated the same way.
        #[serde(default)]
        maybe_created: bool,
    },
    /// The provider batch exists; the chunk is polled until it ends, then fetched.
    Created {
        /// The provider's id of the chunk's batch (`[A-Za-z0-9_-]`, at most
        /// [`MAX_PROVIDER_ID_BYTES`]).
        batch_id: String,
        /// The uploaded input file (OpenAI kind), deleted once the batch has ended.
        #[serde(default)]
        input_file_id: Option<String>,
        /// A cancel was sent to the provider already.
        #[serde(default)]
        cancel_sent: bool,
    },
}

/// One chunk of a batch-mode job: the items with index in `start..end`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkTask {
    /// The batch-mode job the chunk belongs to.
    pub job_id: String,
    /// Name of the provider whose batch API runs the chunk (its chunk queue's name ends in
    /// it).
    pub provider: String,
    /// Position of the chunk in the job, from 0.
    pub chunk: u32,
    /// Index of the chunk's first item in the job.
    pub start: u64,
    /// Index one past the chunk's last item: `start < end <= total`, at most
    /// [`MAX_CHUNK_ITEMS`] apart.
    pub end: u64,
    /// Items of the whole job.
    pub total: u64,
    /// When the job was submitted, ms since the Unix epoch.
    pub submitted_at_ms: u64,
    /// After this instant the chunk's unfinished items end `expired` (or, with
    /// `fallback_online`, nothing more is tried).
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    /// Items the provider lets expire are re-run online while the deadline allows.
    #[serde(default)]
    pub fallback_online: bool,
    /// Where the chunk is in its life (flattened: its `state` tag and fields sit beside the
    /// others in the JSON).
    #[serde(flatten)]
    pub state: ChunkState,
    /// Poll passes made so far (for logs).
    #[serde(default)]
    pub polls: u32,
}

impl ChunkTask {
    /// Bounds a worker checks before acting on a chunk read from a queue.
    pub fn check(&self) -> Result<(), ChunkInvalid> {
        check_job_id(&self.job_id)?;
        if self.total == 0 || self.total > MAX_JOB_ITEMS {
            return Err(Invalid::Total(self.total).into());
        }
        if self.start >= self.end || self.end > self.total || self.end - self.start > MAX_CHUNK_ITEMS {
            return Err(ChunkInvalid::Range { start: self.start, end: self.end, total: self.total });
        }
        if let ChunkState::Created { batch_id, input_file_id, .. } = &self.state {
            check_provider_id(batch_id)?;
            if let Some(file) = input_file_id {
                check_provider_id(file)?;
            }
        }
        Ok(())
    }

    /// Items in the chunk.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Always false: a chunk holds at least one item ([`ChunkTask::check`]).
    pub fn is_empty(&self) -> bool {
        self.start >= self.end
    }

    /// The tag that names this chunk at the provider (batch metadata), unique per namespace,
    /// job and chunk: how a worker finds the batch a dead worker created.
    pub fn tag(&self, namespace: &str) -> String {
        format!("{namespace}/{}/{}", self.job_id, self.chunk)
    }
}

/// Why a chunk message is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkInvalid {
    /// The job id or the job's item count is out of bounds.
    #[error(transparent)]
    Job(#[from] Invalid),
    /// The item range is empty, over [`MAX_CHUNK_ITEMS`] items or past the job's end.
    #[error("chunk range {start}..{end} is empty, over {MAX_CHUNK_ITEMS} items or beyond the job's total {total}")]
    Range {
        /// First index claimed.
        start: u64,
        /// Index one past the last, as claimed.
        end: u64,
        /// The job's item count claimed with them.
        total: u64,
    },
    /// A batch or file id is empty, over [`MAX_PROVIDER_ID_BYTES`] or holds characters
    /// other than `[A-Za-z0-9_-]`: it could not go into a URL path as it is.
    #[error("provider id is empty, over {MAX_PROVIDER_ID_BYTES} bytes or holds characters other than [A-Za-z0-9_-]")]
    ProviderId,
}

/// A provider batch or file id is put into a URL path: only plain id characters pass.
pub fn check_provider_id(id: &str) -> Result<(), ChunkInvalid> {
    let plain = id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if id.is_empty() || id.len() > MAX_PROVIDER_ID_BYTES || !plain {
        return Err(ChunkInvalid::ProviderId);
    }
    Ok(())
}

/// Cuts a job into chunks of at most `max_requests` items and `max_bytes` bytes, given each
/// item's size as the provider will see it (its input line), and one endpoint per chunk
/// (an OpenAI batch has one `endpoint`). An item larger than `max_bytes` gets a chunk of
/// its own (the provider then refuses that batch, and its item fails with the provider's
/// reason).
#[derive(Debug)]
pub struct Chunker {
    max_requests: u64,
    max_bytes: u64,
    start: u64,
    next: u64,
    bytes: u64,
    /// The endpoint of the chunk being cut.
    endpoint: String,
    /// Finished ranges.
    pub ranges: Vec<(u64, u64)>,
}

impl Chunker {
    /// A chunker for batches of at most `max_requests` items (at least 1 is used) and
    /// `max_bytes` bytes of input, such as [`crate::config::ProviderConfig::batch_limits`] gives.
    pub fn new(max_requests: u64, max_bytes: u64) -> Chunker {
        Chunker {
            max_requests: max_requests.max(1),
            max_bytes,
            start: 0,
            next: 0,
            bytes: 0,
            endpoint: String::new(),
            ranges: Vec::new(),
        }
    }

    /// Adds the next item, of `bytes` bytes, for `endpoint` (its `url`).
    pub fn push(&mut self, bytes: u64, endpoint: &str) {
        let count = self.next - self.start;
        let full = count >= self.max_requests || self.bytes + bytes > self.max_bytes;
        if count > 0 && (full || endpoint != self.endpoint) {
            self.ranges.push((self.start, self.next));
            self.start = self.next;
            self.bytes = 0;
        }
        if endpoint != self.endpoint {
            self.endpoint = endpoint.to_string();
        }
        self.next += 1;
        self.bytes += bytes;
    }

    /// The ranges, the last one included.
    pub fn finish(mut self) -> Vec<(u64, u64)> {
        if self.next > self.start {
            self.ranges.push((self.start, self.next));
        }
        self.ranges
    }
}

/// Bytes an item's request adds to a provider batch's input: its body plus the line's
/// envelope (custom id, method, url and JSON punctuation; 200 bytes is generous).
pub fn line_bytes(body_bytes: usize) -> u64 {
    body_bytes as u64 + 200
}

/// The batch-mode part of the topology (see `docs/architecture.md`):
///
/// ```text
/// (default) --> <ns>.batch.items.<job>            stream: the job's items, read by offset
/// (default) --> <ns>.batch.<provider>             quorum: chunks ready for a worker
/// (default) --> <ns>.batch.<provider>.poll.<n>s   quorum, TTL n s, dead-letters (at least
///                                                once) back to <ns>.batch.<provider>
/// ```
impl Topology {
    /// The stream holding a batch-mode job's items, in index order (resumed submissions may
    /// append an item again: readers skip what they have).
    pub fn batch_items_stream(&self, job_id: &str) -> String {
        format!("{}.batch.items.{job_id}", self.namespace())
    }

    /// Chunks of `provider` waiting for a worker (to create, poll or fetch their batch).
    pub fn chunk_queue(&self, provider: &str) -> String {
        format!("{}.batch.{provider}", self.namespace())
    }

    /// Chunks of `provider` waiting `secs` until their next poll.
    pub fn poll_queue(&self, provider: &str, secs: u64) -> String {
        format!("{}.batch.{provider}.poll.{secs}s", self.namespace())
    }

    /// Declares a job's batch items stream (kept as long as a results stream at most; the
    /// tracker deletes it with the results when it forgets the job).
    pub async fn declare_batch_items_stream(&self, ch: &Channel, job_id: &str) -> lapin::Result<()> {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString("stream".into()));
        args.insert("x-max-age".into(), AMQPValue::LongString(RESULTS_MAX_AGE.into()));
        declare_queue(ch, &self.batch_items_stream(job_id), args).await
    }

    /// Declares the chunk queue of `provider` and its poll queue. The chunk queue has the
    /// items queues' delivery limit and dead-lettering; the poll queue holds each chunk
    /// `poll_s` seconds and hands it back (at least once) to the chunk queue.
    pub async fn declare_chunk_queues(&self, ch: &Channel, provider: &str, poll_s: u64) -> lapin::Result<()> {
        let mut args = quorum();
        args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(self.delivery_limit().into()));
        args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(self.dead_exchange().into()));
        args.insert("x-dead-letter-strategy".into(), AMQPValue::LongString("at-least-once".into()));
        args.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
        declare_queue(ch, &self.chunk_queue(provider), args).await?;
        let mut poll = quorum();
        poll.insert("x-message-ttl".into(), AMQPValue::LongLongInt((poll_s * 1000) as i64));
        // The default exchange routes by queue name: back to the chunk queue.
        poll.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
        poll.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(self.chunk_queue(provider).into()));
        poll.insert("x-dead-letter-strategy".into(), AMQPValue::LongString("at-least-once".into()));
        poll.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
        declare_queue(ch, &self.poll_queue(provider, poll_s), poll).await
    }

    /// Deletes the chunk queues of `provider` (tests tidying up).
    pub async fn delete_chunk_queues(&self, ch: &Channel, provider: &str, poll_s: u64) -> lapin::Result<()> {
        for q in [self.chunk_queue(provider), self.poll_queue(provider, poll_s)] {
            ch.queue_delete(q.into(), Default::default()).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk() -> ChunkTask {
        ChunkTask {
            job_id: "job_1".into(),
            provider: "p".into(),
            chunk: 0,
            start: 0,
            end: 10,
            total: 10,
            submitted_at_ms: 0,
            deadline_ms: None,
            fallback_online: false,
            state: ChunkState::Pending { maybe_created: false },
            polls: 0,
        }
    }

    #[test]
    fn chunks_round_trip_and_are_bounded() {
        let mut c = chunk();
        c.state = ChunkState::Created { batch_id: "batch_abc".into(), input_file_id: None, cancel_sent: false };
        let back: ChunkTask = serde_json::from_slice(&serde_json::to_vec(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        assert_eq!(c.check(), Ok(()));
        for bad in ["../admin", "a/b", "", "x?y", &"a".repeat(201)] {
            c.state = ChunkState::Created { batch_id: bad.into(), input_file_id: None, cancel_sent: false };
            assert_eq!(c.check(), Err(ChunkInvalid::ProviderId), "{bad:?}");
        }
        let mut c = chunk();
        c.end = 11;
        assert!(c.check().is_err());
        c.end = 0;
        assert!(c.check().is_err());
        let mut c = chunk();
        c.total = 1_000_000;
        c.end = 200_000;
        assert!(c.check().is_err(), "over the chunk bound");
    }

    #[test]
    fn the_chunker_keeps_both_limits() {
        let mut k = Chunker::new(3, 1000);
        for _ in 0..7 {
            k.push(10, "/v1/x");
        }
        assert_eq!(k.finish(), vec![(0, 3), (3, 6), (6, 7)]);
        let mut k = Chunker::new(100, 25);
        for b in [10, 10, 10, 30, 1] {
            k.push(b, "/v1/x");
        }
        assert_eq!(k.finish(), vec![(0, 2), (2, 3), (3, 4), (4, 5)], "an oversized item stands alone");
        let mut k = Chunker::new(100_000, u64::MAX);
        for _ in 0..120_000 {
            k.push(300, "/v1/messages");
        }
        assert_eq!(k.finish(), vec![(0, 100_000), (100_000, 120_000)]);
        let mut k = Chunker::new(100, 1000);
        for url in ["/v1/a", "/v1/a", "/v1/b", "/v1/a"] {
            k.push(1, url);
        }
        assert_eq!(k.finish(), vec![(0, 2), (2, 3), (3, 4)], "one endpoint per chunk");
    }
}
