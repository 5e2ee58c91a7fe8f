//! Provider batch mode on the wire: the chunk message that moves between a provider's chunk
//! queue and its poll delay queue, and how a job's items are cut into chunks. The batch
//! queues and streams are named and declared in [`crate::topology`], with every other name.
//!
//! A batch-mode job's items are not put on the items queue: the producer appends them to the
//! job's batch items stream (`<ns>.batch.items.<job>`, read by offset) **grouped by
//! endpoint** (every chat line, then every embeddings line, ..., each group in file order),
//! and publishes one [`ChunkTask`] per slice of a group that fits the provider's batch
//! limits ([`ChunkLayout`]): however the lines of a file are interleaved, a job gets at most
//! one chunk per endpoint per limit. An item's *position* (its place in that order, carried
//! in the [`POSITION_HEADER`] of its stream message) is what a chunk's range counts; its
//! *index* (its line among the file's requests) is what results, `wait --ordered` and
//! `status` know it by. In a job of one endpoint the two are equal. The chunk
//! message *is* the chunk's durable state: `pending` (no provider batch known) →
//! `created` (the provider batch id, recorded by a confirmed publish before the message that
//! said `pending` is acked) → acked once every item of the chunk has its result.
//!
//! Everything here is read from a queue, so [`ChunkTask::check`] bounds it before use; a
//! batch id goes into a URL path, so it may only hold `[A-Za-z0-9_-]`.

use serde::{Deserialize, Serialize};

use crate::wire::{check_job_id, Invalid, MAX_JOB_ITEMS};

/// How a job's requests are executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobMode {
    /// One provider call per item (the items queue).
    Online,
    /// Through the provider's batch API, chunk by chunk.
    Batch,
    /// One call per item on the provider's flex tier (`service_tier: "flex"`): the items
    /// queue, as online, each item marked [`crate::wire::Item::flex`].
    Flex,
}

impl JobMode {
    /// The mode as `--mode`, logs and `status` write it (the word it serializes as).
    pub fn as_str(self) -> &'static str {
        match self {
            JobMode::Online => "online",
            JobMode::Batch => "batch",
            JobMode::Flex => "flex",
        }
    }
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
        /// The variable name of the API key the batch was created (or found) with: every
        /// later call about the batch uses that key, because a provider shows a batch and its
        /// files only to keys of the project that created it. Absent in chunks of earlier
        /// versions (the worker's batch key is used then).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key_env: Option<String>,
    },
}

/// Longest key variable name a chunk may carry ([`ChunkState::Created`]'s `key_env`).
pub const MAX_KEY_ENV_BYTES: usize = 128;

/// The stream message header holding an item's position in its job's batch items stream
/// (see the module documentation); absent in streams of earlier versions, whose items were
/// in index order.
pub const POSITION_HEADER: &str = "fleet-position";

/// One chunk of a batch-mode job: the items at positions `start..end` of the job's batch
/// items stream (the items with index in `start..end` when [`ChunkTask::by_endpoint`] is
/// false).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self")] // the serde impls come from `versioned!` below: written with its wire version
pub struct ChunkTask {
    /// The batch-mode job the chunk belongs to.
    pub job_id: String,
    /// Name of the provider whose batch API runs the chunk (its chunk queue's name ends in
    /// it).
    pub provider: String,
    /// Position of the chunk in the job, from 0.
    pub chunk: u32,
    /// Position of the chunk's first item in the job's batch items stream.
    pub start: u64,
    /// Position one past the chunk's last item: `start < end <= total`, at most
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
    /// The job's stream holds its items grouped by endpoint and several endpoints are in
    /// it: a position is then not an index, and the reader learns each item's position
    /// from its [`POSITION_HEADER`]. False (and absent in chunks of earlier versions): the
    /// stream is in index order and a position is the item's index.
    #[serde(default)]
    pub by_endpoint: bool,
    /// How many times the chunk's provider batch was created anew after the provider
    /// failed it for a full enqueued-token queue (`token_limit_exceeded`): part of the tag,
    /// so a new batch is never confused with the failed one.
    #[serde(default)]
    pub generation: u32,
    /// Since when (ms since the Unix epoch) the chunk has been waiting for room in the
    /// provider's enqueued-token budget (`batch_enqueued_tokens`), if it is waiting.
    #[serde(default)]
    pub admission_since_ms: Option<u64>,
}
crate::versioned!(ChunkTask);

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
        if let ChunkState::Created { batch_id, input_file_id, key_env, .. } = &self.state {
            check_provider_id(batch_id)?;
            if let Some(file) = input_file_id {
                check_provider_id(file)?;
            }
            let variable_name = |v: &str| v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if key_env.as_deref().is_some_and(|v| v.is_empty() || v.len() > MAX_KEY_ENV_BYTES || !variable_name(v)) {
                return Err(ChunkInvalid::KeyEnv);
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
    /// job, chunk and generation: how a worker finds the batch a dead worker created. The
    /// first generation's tag is the one earlier versions used.
    pub fn tag(&self, namespace: &str) -> String {
        match self.generation {
            0 => format!("{namespace}/{}/{}", self.job_id, self.chunk),
            g => format!("{namespace}/{}/{}/g{g}", self.job_id, self.chunk),
        }
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
    /// The key variable name is empty, over [`MAX_KEY_ENV_BYTES`] or not `[A-Za-z0-9_]`.
    #[error("key variable name is empty, over {MAX_KEY_ENV_BYTES} bytes or holds characters other than [A-Za-z0-9_]")]
    KeyEnv,
}

/// A provider batch or file id is put into a URL path: only plain id characters pass.
pub fn check_provider_id(id: &str) -> Result<(), ChunkInvalid> {
    let plain = id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if id.is_empty() || id.len() > MAX_PROVIDER_ID_BYTES || !plain {
        return Err(ChunkInvalid::ProviderId);
    }
    Ok(())
}

/// What one provider batch may hold: requests, bytes of input, and estimated tokens
/// ([`crate::tokens::estimate_request_tokens`]; `u64::MAX` when the provider has no
/// enqueued-token budget).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLimits {
    /// Most requests (at least 1 is used).
    pub requests: u64,
    /// Most bytes of input lines ([`line_bytes`]).
    pub bytes: u64,
    /// Most estimated tokens: a chunk larger than the provider's enqueued-token budget could
    /// never be admitted, so it is cut to fit.
    pub tokens: u64,
}

impl ChunkLimits {
    /// The limits of `provider`: its batch limits, and its enqueued-token budget if set.
    pub fn of(provider: &crate::config::ProviderConfig) -> ChunkLimits {
        let (requests, bytes) = provider.batch_limits();
        ChunkLimits { requests, bytes, tokens: provider.batch_enqueued_tokens.unwrap_or(u64::MAX) }
    }
}

/// Cuts one run of items (all of one endpoint) into contiguous chunks within [`ChunkLimits`],
/// given each item's input bytes and estimated tokens. An item over a limit on its own gets
/// a chunk of its own (the provider then refuses or fails that batch, and the item fails
/// with the provider's reason, or waits for an empty queue).
#[derive(Debug)]
pub struct Chunker {
    limits: ChunkLimits,
    start: u64,
    next: u64,
    bytes: u64,
    tokens: u64,
    /// Finished ranges.
    pub ranges: Vec<(u64, u64)>,
}

impl Chunker {
    /// A chunker for `limits`, counting items from 0.
    pub fn new(limits: ChunkLimits) -> Chunker {
        let limits = ChunkLimits { requests: limits.requests.max(1), ..limits };
        Chunker { limits, start: 0, next: 0, bytes: 0, tokens: 0, ranges: Vec::new() }
    }

    /// Adds the next item, of `bytes` bytes and `tokens` estimated tokens.
    pub fn push(&mut self, bytes: u64, tokens: u64) {
        let count = self.next - self.start;
        let full = count >= self.limits.requests
            || self.bytes.saturating_add(bytes) > self.limits.bytes
            || self.tokens.saturating_add(tokens) > self.limits.tokens;
        if count > 0 && full {
            self.ranges.push((self.start, self.next));
            self.start = self.next;
            self.bytes = 0;
            self.tokens = 0;
        }
        self.next += 1;
        self.bytes = self.bytes.saturating_add(bytes);
        self.tokens = self.tokens.saturating_add(tokens);
    }

    /// Items pushed so far.
    pub fn len(&self) -> u64 {
        self.next
    }

    /// Whether no item was pushed.
    pub fn is_empty(&self) -> bool {
        self.next == 0
    }

    /// The ranges, the last one included.
    pub fn finish(mut self) -> Vec<(u64, u64)> {
        if self.next > self.start {
            self.ranges.push((self.start, self.next));
        }
        self.ranges
    }
}

/// Most distinct endpoints one job may hold: far more than any provider kind serves (the
/// producer validates every `url` against its kind first), so a layout stays small.
pub const MAX_ENDPOINTS: usize = 64;

/// How a batch-mode job is laid out in its items stream and cut into chunks: its items
/// grouped by endpoint (groups in the order their endpoint first appears in the file, items
/// in file order inside a group), each group cut on its own by a [`Chunker`]. Fed every
/// line in file order ([`ChunkLayout::push`]), it holds one [`Chunker`] per endpoint and
/// never a line: memory is bounded by the endpoints and the chunks, not the file.
#[derive(Debug)]
pub struct ChunkLayout {
    limits: ChunkLimits,
    groups: Vec<(String, Chunker, u64)>,
}

/// One endpoint's part of a [`ChunkLayout`]: its items sit at positions
/// `first..first + items` of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointGroup {
    /// The endpoint (`url`) every item of the group has.
    pub endpoint: String,
    /// Position of the group's first item.
    pub first: u64,
    /// Items in the group.
    pub items: u64,
    /// Estimated tokens of the group's requests.
    pub tokens: u64,
    /// The group's chunks, as stream positions (`first <= start < end <= first + items`).
    pub chunks: Vec<(u64, u64)>,
}

/// A layout that would hold more than [`MAX_ENDPOINTS`] endpoints.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a job holds at most {MAX_ENDPOINTS} distinct endpoints")]
pub struct TooManyEndpoints;

impl ChunkLayout {
    /// An empty layout cutting chunks within `limits`.
    pub fn new(limits: ChunkLimits) -> ChunkLayout {
        ChunkLayout { limits, groups: Vec::new() }
    }

    /// Adds the next line of the file: its `endpoint`, input bytes and estimated tokens.
    pub fn push(&mut self, endpoint: &str, bytes: u64, tokens: u64) -> Result<(), TooManyEndpoints> {
        let at = match self.groups.iter().position(|(e, _, _)| e == endpoint) {
            Some(at) => at,
            None if self.groups.len() >= MAX_ENDPOINTS => return Err(TooManyEndpoints),
            None => {
                self.groups.push((endpoint.to_string(), Chunker::new(self.limits), 0));
                self.groups.len() - 1
            }
        };
        let (_, chunker, group_tokens) = &mut self.groups[at];
        chunker.push(bytes, tokens);
        *group_tokens = group_tokens.saturating_add(tokens);
        Ok(())
    }

    /// The groups in stream order, each with its chunks as stream positions.
    pub fn finish(self) -> Vec<EndpointGroup> {
        let mut first = 0;
        let mut out = Vec::with_capacity(self.groups.len());
        for (endpoint, chunker, tokens) in self.groups {
            let items = chunker.len();
            let chunks = chunker.finish().into_iter().map(|(s, e)| (first + s, first + e)).collect();
            out.push(EndpointGroup { endpoint, first, items, tokens, chunks });
            first += items;
        }
        out
    }
}

/// Bytes an item's request adds to a provider batch's input: its body plus the line's
/// envelope (custom id, method, url and JSON punctuation; 200 bytes is generous).
pub fn line_bytes(body_bytes: usize) -> u64 {
    body_bytes as u64 + 200
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
            by_endpoint: false,
            generation: 0,
            admission_since_ms: None,
        }
    }

    #[test]
    fn chunks_round_trip_and_are_bounded() {
        let mut c = chunk();
        c.state = ChunkState::Created {
            batch_id: "batch_abc".into(),
            input_file_id: None,
            cancel_sent: false,
            key_env: Some("OPENAI_KEY_2".into()),
        };
        let back: ChunkTask = serde_json::from_slice(&serde_json::to_vec(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        assert_eq!(c.check(), Ok(()));
        for bad in ["../admin", "a/b", "", "x?y", &"a".repeat(201)] {
            c.state =
                ChunkState::Created { batch_id: bad.into(), input_file_id: None, cancel_sent: false, key_env: None };
            assert_eq!(c.check(), Err(ChunkInvalid::ProviderId), "{bad:?}");
        }
        for bad in ["", "KEY-1", "$(id)", &"K".repeat(129)] {
            c.state = ChunkState::Created {
                batch_id: "batch_abc".into(),
                input_file_id: None,
                cancel_sent: false,
                key_env: Some(bad.into()),
            };
            assert_eq!(c.check(), Err(ChunkInvalid::KeyEnv), "{bad:?}");
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

    fn limits(requests: u64, bytes: u64, tokens: u64) -> ChunkLimits {
        ChunkLimits { requests, bytes, tokens }
    }

    #[test]
    fn the_chunker_keeps_every_limit() {
        let mut k = Chunker::new(limits(3, 1000, u64::MAX));
        for _ in 0..7 {
            k.push(10, 1);
        }
        assert_eq!(k.finish(), vec![(0, 3), (3, 6), (6, 7)]);
        let mut k = Chunker::new(limits(100, 25, u64::MAX));
        for b in [10, 10, 10, 30, 1] {
            k.push(b, 1);
        }
        assert_eq!(k.finish(), vec![(0, 2), (2, 3), (3, 4), (4, 5)], "an oversized item stands alone");
        let mut k = Chunker::new(limits(100_000, u64::MAX, u64::MAX));
        for _ in 0..120_000 {
            k.push(300, 75);
        }
        assert_eq!(k.finish(), vec![(0, 100_000), (100_000, 120_000)]);
        let mut k = Chunker::new(limits(100, 1000, 250));
        for t in [100, 100, 100, 300, 10] {
            k.push(1, t);
        }
        assert_eq!(k.finish(), vec![(0, 2), (2, 3), (3, 4), (4, 5)], "the token budget cuts too");
        let mut k = Chunker::new(limits(0, u64::MAX, u64::MAX));
        k.push(1, 1);
        k.push(1, 1);
        assert_eq!(k.finish(), vec![(0, 1), (1, 2)], "at least one request per chunk");
    }

    #[test]
    fn interleaved_endpoints_make_one_chunk_each_within_the_limits() {
        let mut layout = ChunkLayout::new(limits(100_000, u64::MAX, u64::MAX));
        for i in 0..3000 {
            let url = if i % 2 == 0 { "/v1/chat/completions" } else { "/v1/embeddings" };
            layout.push(url, 300, 10).unwrap();
        }
        let groups = layout.finish();
        let chunk = |endpoint: &str, first, chunks: Vec<(u64, u64)>| EndpointGroup {
            endpoint: endpoint.into(),
            first,
            items: 1500,
            tokens: 15_000,
            chunks,
        };
        assert_eq!(
            groups,
            vec![chunk("/v1/chat/completions", 0, vec![(0, 1500)]), chunk("/v1/embeddings", 1500, vec![(1500, 3000)])]
        );
    }

    #[test]
    fn each_endpoint_is_cut_by_the_limits_on_its_own_and_positions_tile_the_job() {
        // Lines a b a a c b a, with at most 2 requests a chunk.
        let mut layout = ChunkLayout::new(limits(2, u64::MAX, u64::MAX));
        for url in ["/a", "/b", "/a", "/a", "/c", "/b", "/a"] {
            layout.push(url, 1, 1).unwrap();
        }
        let groups = layout.finish();
        let chunks: Vec<(u64, u64)> = groups.iter().flat_map(|g| g.chunks.clone()).collect();
        // a: positions 0..4 (4 items), b: 4..6, c: 6..7.
        assert_eq!(chunks, vec![(0, 2), (2, 4), (4, 6), (6, 7)]);
        assert_eq!(groups.iter().map(|g| g.endpoint.as_str()).collect::<Vec<_>>(), ["/a", "/b", "/c"]);
        let mut layout = ChunkLayout::new(limits(2, u64::MAX, u64::MAX));
        for i in 0..MAX_ENDPOINTS {
            layout.push(&format!("/e{i}"), 1, 1).unwrap();
        }
        assert_eq!(layout.push("/one-more", 1, 1), Err(TooManyEndpoints));
        assert_eq!(layout.push("/e0", 1, 1), Ok(()), "a known endpoint is still taken");
    }

    #[test]
    fn a_new_generation_has_a_new_tag_and_old_chunks_decode() {
        let mut c = chunk();
        assert_eq!(c.tag("ns"), "ns/job_1/0", "the first generation keeps the tag of earlier versions");
        c.generation = 2;
        assert_eq!(c.tag("ns"), "ns/job_1/0/g2");
        let old = r#"{"job_id":"job_1","provider":"p","chunk":0,"start":0,"end":10,"total":10,
                      "submitted_at_ms":0,"state":"pending"}"#;
        let old: ChunkTask = serde_json::from_str(old).unwrap();
        assert_eq!(old, chunk(), "a chunk of an earlier version: index order, generation 0");
    }
}
