//! What the `producer` CLI prints: job ids as submitted, summaries of collected jobs (with
//! the job's usage, asked of the tracker when the results came first), job statuses and the
//! dead-letter listing, and what a stuck job waits for. Caps are shown as given (`cap 0.001`,
//! see [`fleet::wire::JobUsage::describe`]). Machine-readable output (`--json`) goes to stdout, one JSON value per
//! line; words for people go to stderr, so `job=$(producer submit ...)` captures the id alone.

use std::path::Path;
use std::time::Duration;

use fleet::wire::{JobSummary, TrackerRequest};

use crate::collect::Collected;
use crate::dead::DeadMessage;
use crate::inspect;
use crate::retry::RetryPlan;
use crate::submit::Submitted;

/// How long the summary asks the tracker for the job's usage when its results arrived before
/// the tracker's `job_finished` (the results are written either way). Asked once: a tracker
/// still folding (it trails the results stream under load) gives the usage so far.
const USAGE_QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// A submitted job: its id on stdout (or `{"job_id", "total"}` with `json`).
pub fn submitted(job: &Submitted, json: bool) {
    if json {
        println!("{}", serde_json::to_string(job).expect("serializable"));
    } else {
        println!("{}", job.job_id);
        eprintln!("submitted job {} with {} requests", job.job_id, job.total);
    }
}

/// A job submitted by `retry`: what it retries, and from where.
pub fn retried(new: &Submitted, plan: &RetryPlan, old_job: &str, json: bool) {
    if json {
        println!("{}", serde_json::to_string(new).expect("serializable"));
    } else {
        println!("{}", new.job_id);
        eprintln!(
            "submitted job {} with the {} of {} items of job {old_job} to retry ({})",
            new.job_id,
            plan.selected,
            plan.total,
            plan.file.display()
        );
    }
}

/// Job statuses with what each is stuck on (`stuck[i]` for `jobs[i]`, see
/// [`crate::status_diagnosis`]): JSON gets a `pending` count and a `stuck` line when there
/// is one; text gets the rendered job, a `dead-lettered=` count of an ended job (the items
/// `producer dead` lists), and the stuck line.
pub fn statuses(jobs: &[JobSummary], stuck: &[Option<String>], json: bool) {
    for (i, job) in jobs.iter().enumerate() {
        let stuck = stuck.get(i).and_then(|s| s.as_deref());
        if json {
            let mut v = serde_json::to_value(job).expect("serializable");
            v["pending"] = job.counts.pending().into();
            if let Some(s) = stuck {
                v["stuck"] = s.into();
            }
            println!("{v}");
        } else {
            println!("{}", render(job, stuck));
        }
    }
}

/// One job for people: [`inspect::render`], then what the ended job left dead-lettered
/// (the job in progress shows it on its progress line) and why it is stuck.
pub fn render(job: &JobSummary, stuck: Option<&str>) -> String {
    let mut out = inspect::render(job);
    if job.progress.is_none() && job.dead_lettered > 0 {
        out.push_str(&format!("\n    dead-lettered={} (listed by `producer dead`)", job.dead_lettered));
    }
    if let Some(s) = stuck {
        out.push_str("\n    stuck: ");
        out.push_str(s);
    }
    out
}

/// The dead-letter listing (control characters escaped in text, see [`DeadMessage::line`]).
pub fn dead(messages: &[DeadMessage], json: bool) {
    for m in messages {
        if json {
            println!("{}", serde_json::to_string(m).expect("serializable"));
        } else {
            println!("{}", m.line());
        }
    }
    let requeued = messages.iter().filter(|m| m.requeued).count();
    eprintln!("{} dead-lettered message(s), {requeued} requeued", messages.len());
}

/// The summary of a collected job, with its usage (asked of the tracker if the results
/// stream did not carry it).
/// Items of a collected job failed for a reason of the fleet's ([`crate::collect::FLEET_SIDE`]):
/// the job ran, but the command exits 3 so scripts notice that the fleet needs fixing.
#[derive(Debug, thiserror::Error)]
#[error(
    "{failed} items of job {job_id} failed for a reason of the fleet's, not of their requests ({codes}): \
     fix the fleet (its keys, its queues; see `producer status` and the workers' logs), then `producer retry {job_id}`"
)]
pub struct FleetSideFailures {
    /// The job collected.
    pub job_id: String,
    /// Items that failed for a reason of the fleet's.
    pub failed: u64,
    /// Their error codes with counts, `code n, code n` (for the message).
    pub codes: String,
}

/// Prints the summary of a collected job (JSON with `json`), then fails with
/// [`FleetSideFailures`] when some of its items failed for a reason of the fleet's.
pub async fn summary(cfg: &fleet::Config, c: Collected, output: &Path, json: bool) -> anyhow::Result<()> {
    let fleet_side = c.fleet_side.clone();
    let job_id = c.job_id.clone();
    print_summary(cfg, c, output, json).await;
    let failed: u64 = fleet_side.values().sum();
    if failed == 0 {
        return Ok(());
    }
    let codes = fleet_side.iter().map(|(code, n)| format!("{code} {n}")).collect::<Vec<_>>().join(", ");
    Err(FleetSideFailures { job_id, failed, codes }.into())
}

async fn print_summary(cfg: &fleet::Config, mut c: Collected, output: &Path, json: bool) {
    if c.usage.is_none() {
        let req = TrackerRequest::Status { job_id: c.job_id.clone() };
        if let Ok(reply) = inspect::ask(cfg, &req, USAGE_QUERY_TIMEOUT).await {
            let job = reply.jobs.into_iter().next();
            c.usage_final = job.as_ref().is_some_and(|j| j.status.is_ended());
            c.usage = job.and_then(|j| j.usage);
        }
    }
    if json {
        println!("{}", serde_json::to_string(&c).expect("serializable"));
        return;
    }
    eprintln!(
        "job {}: {} results (succeeded {}, failed {}, cancelled {}, expired {}) in {:.1} s -> {}",
        c.job_id,
        c.counts.finished(),
        c.counts.succeeded,
        c.counts.failed,
        c.counts.cancelled,
        c.counts.expired,
        c.elapsed_s,
        output.display()
    );
    match &c.usage {
        Some(u) if c.usage_final => eprintln!("usage: {}", u.describe()),
        Some(u) => eprintln!(
            "usage so far (the tracker is still counting; `producer status` has the final figure): {}",
            u.describe()
        ),
        None => {}
    }
}
