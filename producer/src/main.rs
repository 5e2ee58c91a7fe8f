//! `producer`: submit JSONL jobs to the fleet and collect their results.
//!
//! Exit codes: 0 success, 1 a runtime failure (broker unreachable, ...), 2 bad input or
//! configuration (nothing was published).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use fleet::wire::TrackerRequest;
use producer::collect::{self, Collected, WaitRequest};
use producer::inspect;
use producer::submit::{self, InputError, SubmitRequest};
use producer::{cancel, dead};

#[derive(Parser)]
#[command(version, about = "Submit batches of LLM requests to the fleet and collect the results")]
struct Cli {
    /// TOML configuration file (also `FLEET_CONFIG`); `FLEET__*` env variables override it.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Log JSON lines instead of human-readable text.
    #[arg(long, global = true)]
    log_json: bool,
    /// No progress bars.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate an OpenAI Batch input file and enqueue it as one job.
    Submit {
        /// JSONL file: one {custom_id, method, url, body} request per line.
        file: PathBuf,
        /// Provider (a name from the config's `providers`).
        #[arg(long, short)]
        provider: String,
        /// Replace `body.model` of every request.
        #[arg(long)]
        model: Option<String>,
        /// Print `{"job_id": ..., "total": ...}` on stdout instead of the bare job id.
        #[arg(long)]
        json: bool,
        /// Then wait for the results (as `producer wait`).
        #[arg(long)]
        wait: bool,
        /// Output file for `--wait` (default `<job id>.jsonl`).
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Items not finished within this time end `expired` (e.g. 90s, 30m, 24h, 2d;
        /// default `producer.default_deadline_s`, 0 = none).
        #[arg(long, value_parser = producer::duration::parse_duration)]
        deadline: Option<Duration>,
        /// Finish the interrupted submission of this job (same file): only the items the
        /// broker had not confirmed are published. Without it, an interrupted submission of
        /// the same file is recognised by its content and resumed too.
        #[arg(long, value_parser = job_id)]
        resume: Option<String>,
        /// Share of the provider this job gets next to other jobs (1 to 10; a job of
        /// priority 3 gets three times the share of a job of priority 1).
        #[arg(long, default_value_t = fleet::wire::DEFAULT_PRIORITY,
              value_parser = clap::value_parser!(u32).range(1..=fleet::wire::MAX_PRIORITY as i64))]
        priority: u32,
        /// Spend cap in the price table's currency (e.g. 12.50): once the job's cost reaches
        /// it, its remaining items end `cancelled` (reason `budget`).
        #[arg(long, value_parser = max_cost)]
        max_cost: Option<f64>,
    },
    /// Collect a job's results into an OpenAI Batch output file; resumable.
    Wait {
        /// Job id printed by `submit`.
        #[arg(value_parser = job_id)]
        job: String,
        /// Output file; results already in it are kept and not written twice.
        #[arg(long, short)]
        output: PathBuf,
        /// Give up after this many seconds (run again to resume).
        #[arg(long)]
        timeout: Option<u64>,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one job's progress, as the fleet's job tracker knows it.
    Status {
        /// Job id.
        #[arg(value_parser = job_id)]
        job: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Seconds to wait for the tracker's answer.
        #[arg(long, default_value_t = 5)]
        timeout: u64,
    },
    /// Cancel a job: items not yet started end `cancelled` without a provider call.
    Cancel {
        /// Job id.
        #[arg(value_parser = job_id)]
        job: String,
    },
    /// List dead-lettered messages with their reasons; optionally put items back.
    Dead {
        /// Put the dead-lettered items back on their items queues.
        #[arg(long)]
        requeue: bool,
        /// Only this job's items (with --requeue).
        #[arg(long, value_parser = job_id)]
        job: Option<String>,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// List jobs in progress and recently finished.
    Jobs {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Seconds to wait for the tracker's answer.
        #[arg(long, default_value_t = 5)]
        timeout: u64,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    fleet::telemetry::init(cli.log_json);
    let cfg = match fleet::Config::load(cli.config.as_deref()) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("producer: {e:#}");
            return ExitCode::from(2);
        }
    };
    let progress = !cli.quiet;
    let result = match cli.command {
        Command::Submit { file, provider, model, json, wait, output, deadline, resume, priority, max_cost } => {
            let deadline_s = deadline.map_or(cfg.producer.default_deadline_s, |d| d.as_secs());
            let deadline_ms = (deadline_s > 0).then(|| fleet::now_ms() + deadline_s * 1000);
            if let Some(output) = output.as_deref().filter(|_| wait) {
                // Before anything is published: a job whose results cannot be written is
                // better not started (a resumed job's own results may be there already).
                if let Err(e) = collect::check_new_output(output, resume.as_deref()) {
                    eprintln!("producer: {e:#}");
                    return ExitCode::from(2);
                }
            }
            let req = SubmitRequest {
                file: &file,
                provider: &provider,
                model: model.as_deref(),
                deadline_ms,
                progress,
                resume: resume.as_deref(),
                priority,
                max_cost,
            };
            match submit::submit(&cfg, &req).await {
                Ok(job) => {
                    if json {
                        println!("{}", serde_json::to_string(&job).expect("serializable"));
                    } else {
                        println!("{}", job.job_id);
                    }
                    if !json {
                        eprintln!("submitted job {} with {} requests", job.job_id, job.total);
                    }
                    if wait {
                        let output = output.unwrap_or_else(|| PathBuf::from(format!("{}.jsonl", job.job_id)));
                        let req = WaitRequest { job_id: &job.job_id, output: &output, progress, timeout: None };
                        match collect::wait(&cfg, &req).await {
                            Ok(c) => {
                                summary(&cfg, c, &output, json).await;
                                Ok(())
                            }
                            Err(e) => Err(e),
                        }
                    } else {
                        Ok(())
                    }
                }
                Err(e) => Err(e),
            }
        }
        Command::Wait { job, output, timeout, json } => {
            let req =
                WaitRequest { job_id: &job, output: &output, progress, timeout: timeout.map(Duration::from_secs) };
            match collect::wait(&cfg, &req).await {
                Ok(c) => {
                    summary(&cfg, c, &output, json).await;
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }
        Command::Status { job, json, timeout } => {
            let req = TrackerRequest::Status { job_id: job };
            inspect::ask(&cfg, &req, Duration::from_secs(timeout)).await.map(|r| print_jobs(&r.jobs, json))
        }
        Command::Cancel { job } => cancel::cancel(&cfg, &job).await.map(|()| {
            eprintln!("cancel requested for job {job}: unstarted items end `cancelled`");
        }),
        Command::Dead { requeue, job, json } => dead::dead(&cfg, requeue, job.as_deref()).await.map(|msgs| {
            for m in &msgs {
                if json {
                    println!("{}", serde_json::to_string(m).expect("serializable"));
                } else {
                    println!(
                        "{}{} job={} custom_id={} bytes={}: {}",
                        if m.requeued { "requeued " } else { "" },
                        m.provider.as_deref().unwrap_or("-"),
                        m.job_id.as_deref().unwrap_or("-"),
                        m.custom_id.as_deref().unwrap_or("-"),
                        m.bytes,
                        m.reason
                    );
                }
            }
            let requeued = msgs.iter().filter(|m| m.requeued).count();
            eprintln!("{} dead-lettered message(s), {requeued} requeued", msgs.len());
        }),
        Command::Jobs { json, timeout } => inspect::ask(&cfg, &TrackerRequest::Jobs, Duration::from_secs(timeout))
            .await
            .map(|r| print_jobs(&r.jobs, json)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("producer: {e:#}");
            if e.downcast_ref::<InputError>().is_some() || e.downcast_ref::<collect::OutputError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn print_jobs(jobs: &[fleet::wire::JobSummary], json: bool) {
    for job in jobs {
        if json {
            let mut v = serde_json::to_value(job).expect("serializable");
            v["pending"] = job.counts.pending().into();
            println!("{v}");
        } else {
            println!("{}", inspect::render(job));
        }
    }
}

/// How long `wait` asks the tracker for the job's usage when its results arrived before
/// the tracker's `job_finished` (the results are written either way). Asked once: a
/// tracker still folding (it trails the results stream under load) gives the usage so far.
const USAGE_QUERY_TIMEOUT: Duration = Duration::from_secs(5);

async fn summary(cfg: &fleet::Config, mut c: Collected, output: &std::path::Path, json: bool) {
    if c.usage.is_none() {
        let req = TrackerRequest::Status { job_id: c.job_id.clone() };
        if let Ok(reply) = inspect::ask(cfg, &req, USAGE_QUERY_TIMEOUT).await {
            let job = reply.jobs.into_iter().next();
            c.usage_final = job.as_ref().is_some_and(|j| !matches!(j.status.as_str(), "in_progress" | "submitting"));
            c.usage = job.and_then(|j| j.usage);
        }
    }
    if json {
        println!("{}", serde_json::to_string(&c).expect("serializable"));
        return;
    }
    let n = c.counts.finished();
    eprintln!(
        "job {}: {} results (succeeded {}, failed {}, cancelled {}, expired {}) in {:.1} s -> {}",
        c.job_id,
        n,
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

/// A job id argument: refused before anything is sent when no routing key could hold it.
fn job_id(s: &str) -> Result<String, String> {
    fleet::wire::check_job_id(s).map(|()| s.to_string()).map_err(|e| e.to_string())
}

/// A spend cap: a finite amount, not negative.
fn max_cost(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not an amount (e.g. 12.50)")),
    }
}
