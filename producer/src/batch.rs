//! `submit --mode online|batch|flex|auto`: which execution mode a job gets, and, for batch mode,
//! where its items go (the job's batch items stream, grouped by endpoint) and how it is cut
//! into chunks (one [`ChunkTask`] per slice of an endpoint's group within the provider's
//! batch limits, published to the provider's chunk queue once every item is confirmed on
//! the stream). See [`fleet::batch::ChunkLayout`].

use std::path::Path;

use fleet::amqp;
use fleet::batch::{
    ChunkLayout, ChunkLimits, ChunkState, ChunkTask, EndpointGroup, JobMode, TooManyEndpoints, POSITION_HEADER,
};
use fleet::config::{ProviderConfig, BATCH_COMPLETION_WINDOW_S};
use fleet::topology::Topology;
use fleet::wire::BatchInputLine;
use lapin::types::{AMQPValue, FieldTable};

use crate::validate::{self, Rules};

/// The `--mode` the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    /// One provider call per request.
    Online,
    /// Through the provider's batch API (half price, done within 24 h).
    Batch,
    /// One call per request on the provider's flex tier (`service_tier: "flex"`: batch
    /// price, slower answers); openai-kind providers only.
    Flex,
    /// Batch when the provider has a batch API and the job's deadline allows 24 h (never
    /// flex).
    Auto,
}

/// What `--fallback` may do with requests a provider batch let expire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FallbackArg {
    /// Re-run them online while the job's deadline allows.
    Online,
}

/// The mode of a job: `auto` becomes `batch` when the provider has a batch API
/// (`providers.<name>.batch`) and the deadline (none, or seconds from now) is at least the
/// provider's completion window. `auto` never picks flex: an openai-kind provider may be a
/// server or gateway without a flex tier (answering 400 to every flex request), so flex is
/// only ever asked for by name.
pub fn resolve(mode: ModeArg, provider: &ProviderConfig, deadline_s: Option<u64>) -> JobMode {
    match mode {
        ModeArg::Online => JobMode::Online,
        ModeArg::Batch => JobMode::Batch,
        ModeArg::Flex => JobMode::Flex,
        ModeArg::Auto if provider.batch && deadline_s.is_none_or(|d| d >= BATCH_COMPLETION_WINDOW_S) => JobMode::Batch,
        ModeArg::Auto => JobMode::Online,
    }
}

/// Whole seconds from now until `deadline_ms`, rounded up: a deadline set to 24 h from now
/// a few milliseconds ago still counts as 24 h (rounded down, the default 24 h deadline
/// would never allow the 24 h batch window, and `auto` would never pick batch).
pub fn seconds_left(deadline_ms: Option<u64>) -> Option<u64> {
    deadline_ms.map(|d| d.saturating_sub(fleet::now_ms()).div_ceil(1000))
}

/// Why `--mode auto` picked the mode it did, in a sentence `submit` prints.
pub fn auto_reason(name: &str, provider: &ProviderConfig, deadline_s: Option<u64>) -> String {
    let window_h = BATCH_COMPLETION_WINDOW_S / 3600;
    match (provider.batch, deadline_s) {
        (false, _) => format!("online: provider {name} has no batch API (providers.{name}.batch is not set)"),
        (true, Some(d)) if d < BATCH_COMPLETION_WINDOW_S => {
            format!("online: the deadline ({d} s from now) is shorter than the batch window ({window_h} h)")
        }
        (true, Some(d)) => {
            format!("batch: provider {name} has a batch API and the deadline ({d} s) allows its {window_h} h window")
        }
        (true, None) => format!("batch: provider {name} has a batch API and the job has no deadline"),
    }
}

/// Where one job's items are published: `(exchange, routing key)`.
pub fn destination(topology: &Topology, mode: JobMode, job_id: &str) -> (String, String) {
    match mode {
        // The job's own items queue (routing key = job id), which workers consume side by
        // side with the provider's other jobs.
        // Flex items go the same way, each marked to be called on the flex tier.
        JobMode::Online | JobMode::Flex => (topology.jobs_exchange(), job_id.to_string()),
        // The default exchange routes by queue name.
        JobMode::Batch => (String::new(), topology.batch_items_stream(job_id)),
    }
}

/// What a chunk of the job needs besides its range.
pub struct ChunkPlan<'a> {
    /// Names the provider's chunk queue the messages go to.
    pub topology: &'a Topology,
    /// The batch-mode job being cut into chunks.
    pub job_id: &'a str,
    /// The provider whose batch API runs the chunks.
    pub provider: &'a str,
    /// Items of the whole job, copied into every chunk.
    pub total: u64,
    /// When the job was submitted, ms since the Unix epoch.
    pub submitted_at_ms: u64,
    /// After this instant (ms since the epoch) unfinished items end `expired`.
    pub deadline_ms: Option<u64>,
    /// Items the provider lets expire are re-run online while the deadline allows.
    pub fallback_online: bool,
    /// The job's chunk messages may be on the broker already (a resumed or retried
    /// submission publishes them again): each is then marked `maybe_created`, so whichever
    /// copy a worker takes first looks for the chunk's provider batch before creating one.
    pub maybe_published: bool,
}

/// Reads a validated file once and lays its requests out by endpoint, cut within
/// `provider`'s limits (see [`ChunkLayout`]); holds no line, only one chunker per endpoint.
/// A line that no longer passes (the file changed since it was validated) is named by its
/// line number.
pub fn lay_out(file: &Path, rules: &Rules, provider: &ProviderConfig) -> anyhow::Result<Vec<EndpointGroup>> {
    let mut layout = ChunkLayout::new(ChunkLimits::of(provider));
    validate::for_each_line(file, |line_no, raw| {
        let line = validate::check_line(raw, rules)
            .map_err(|e| std::io::Error::other(format!("file changed since it was validated: line {line_no}: {e}")))?;
        lay_out_line(&mut layout, raw, &line).map_err(|e| std::io::Error::other(format!("line {line_no}: {e}")))
    })
    .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    Ok(layout.finish())
}

/// Adds one checked line (`raw`, as read, and its parsed `line`) to `layout`: its endpoint,
/// input bytes and estimated tokens. [`lay_out`] and `producer serve` (which reads its file
/// from the broker) measure a line the same way, so a file gets the same chunks either way.
pub fn lay_out_line(layout: &mut ChunkLayout, raw: &[u8], line: &BatchInputLine) -> Result<(), TooManyEndpoints> {
    let tokens = fleet::tokens::estimate_request_tokens(line.body.get().as_bytes());
    layout.push(&line.url, fleet::batch::line_bytes(raw.len()), tokens)
}

/// The properties of a batch-mode item message at `position` of its job's batch items
/// stream: persistent JSON carrying the position in [`POSITION_HEADER`] (a reader of a
/// job of several endpoints needs it).
pub fn item_properties(position: u64) -> lapin::BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(POSITION_HEADER.into(), AMQPValue::LongLongInt(position as i64));
    amqp::persistent_json().with_headers(headers)
}

/// Publishes one chunk message per chunk of `groups` (confirmed), in stream order, numbered
/// from 0 across the groups.
pub async fn publish_chunks(ch: &lapin::Channel, plan: &ChunkPlan<'_>, groups: &[EndpointGroup]) -> anyhow::Result<()> {
    let queue = plan.topology.chunk_queue(plan.provider);
    let by_endpoint = groups.len() > 1;
    let ranges = groups.iter().flat_map(|g| g.chunks.iter());
    for (i, (start, end)) in ranges.enumerate() {
        let task = ChunkTask {
            job_id: plan.job_id.to_string(),
            provider: plan.provider.to_string(),
            chunk: u32::try_from(i)?,
            start: *start,
            end: *end,
            total: plan.total,
            submitted_at_ms: plan.submitted_at_ms,
            deadline_ms: plan.deadline_ms,
            fallback_online: plan.fallback_online,
            state: ChunkState::Pending { maybe_created: plan.maybe_published },
            polls: 0,
            by_endpoint,
            generation: 0,
            admission_since_ms: None,
        };
        let payload = serde_json::to_vec(&task)?;
        amqp::publish_confirmed(ch, "", &queue, &payload, amqp::persistent_json()).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_picks_batch_only_when_the_provider_and_the_deadline_allow() {
        let mut p: ProviderConfig =
            serde_json::from_value(serde_json::json!({"kind": "openai", "base_url": "http://h"})).unwrap();
        assert_eq!(resolve(ModeArg::Auto, &p, None), JobMode::Online, "no batch API configured");
        p.batch = true;
        assert_eq!(resolve(ModeArg::Auto, &p, None), JobMode::Batch);
        assert_eq!(resolve(ModeArg::Auto, &p, Some(86_400)), JobMode::Batch);
        assert_eq!(resolve(ModeArg::Auto, &p, Some(3_600)), JobMode::Online, "deadline shorter than 24 h");
        assert_eq!(resolve(ModeArg::Online, &p, None), JobMode::Online);
        assert_eq!(resolve(ModeArg::Flex, &p, None), JobMode::Flex);
        assert_ne!(resolve(ModeArg::Auto, &p, Some(7_200)), JobMode::Flex, "auto never picks flex");
        assert!(auto_reason("p", &p, Some(3_600)).starts_with("online: the deadline"));
        let day_from_now = fleet::now_ms() + BATCH_COMPLETION_WINDOW_S * 1000;
        assert_eq!(resolve(ModeArg::Auto, &p, seconds_left(Some(day_from_now - 5))), JobMode::Batch, "rounded up");
        assert!(auto_reason("p", &p, None).starts_with("batch:"));
        p.batch = false;
        assert!(auto_reason("p", &p, None).starts_with("online: provider p has no batch API"));
    }
}
