//! `submit --mode online|batch|auto`: which execution mode a job gets, and, for batch mode,
//! where its items go (the job's batch items stream) and how it is cut into chunks (one
//! [`ChunkTask`] per slice within the provider's batch limits, published to the provider's
//! chunk queue once every item is confirmed on the stream).

use fleet::amqp;
use fleet::batch::{ChunkState, ChunkTask, Chunker, JobMode};
use fleet::config::{ProviderConfig, BATCH_COMPLETION_WINDOW_S};
use fleet::topology::Topology;

/// The `--mode` the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    /// One provider call per request.
    Online,
    /// Through the provider's batch API (half price, done within 24 h).
    Batch,
    /// Batch when the provider has a batch API and the job's deadline allows 24 h.
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
/// provider's completion window.
pub fn resolve(mode: ModeArg, provider: &ProviderConfig, deadline_s: Option<u64>) -> JobMode {
    match mode {
        ModeArg::Online => JobMode::Online,
        ModeArg::Batch => JobMode::Batch,
        ModeArg::Auto if provider.batch && deadline_s.is_none_or(|d| d >= BATCH_COMPLETION_WINDOW_S) => JobMode::Batch,
        ModeArg::Auto => JobMode::Online,
    }
}

/// Where one job's items are published: `(exchange, routing key)`.
pub fn destination(topology: &Topology, mode: JobMode, job_id: &str) -> (String, String) {
    match mode {
        // The job's own items queue (routing key = job id), which workers consume side by
        // side with the provider's other jobs.
        JobMode::Online => (topology.jobs_exchange(), job_id.to_string()),
        // The default exchange routes by queue name.
        JobMode::Batch => (String::new(), topology.batch_items_stream(job_id)),
    }
}

/// What a chunk of the job needs besides its range.
pub struct ChunkPlan<'a> {
    pub topology: &'a Topology,
    pub job_id: &'a str,
    pub provider: &'a str,
    pub total: u64,
    pub submitted_at_ms: u64,
    pub deadline_ms: Option<u64>,
    pub fallback_online: bool,
    /// The job's chunk messages may be on the broker already (a resumed or retried
    /// submission publishes them again): each is then marked `maybe_created`, so whichever
    /// copy a worker takes first looks for the chunk's provider batch before creating one.
    pub maybe_published: bool,
}

/// A chunker for `provider`'s limits.
pub fn chunker(provider: &ProviderConfig) -> Chunker {
    let (requests, bytes) = provider.batch_limits();
    Chunker::new(requests, bytes)
}

/// Publishes one chunk message per range (confirmed), in order.
pub async fn publish_chunks(ch: &lapin::Channel, plan: &ChunkPlan<'_>, ranges: &[(u64, u64)]) -> anyhow::Result<()> {
    let queue = plan.topology.chunk_queue(plan.provider);
    for (i, (start, end)) in ranges.iter().enumerate() {
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
    }
}
