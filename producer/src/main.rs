//! `producer`: submit JSONL jobs to the fleet and collect their results.
//!
//! Exit codes: 0 success, 1 a runtime failure (broker unreachable, ...), 2 bad input or
//! configuration (nothing was published).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use fleet::wire::TrackerRequest;
use producer::batch::{FallbackArg, ModeArg};
use producer::collect::{self, Collected, WaitRequest};
use producer::finish::{self, Finish};
use producer::inspect;
use producer::output_format::OutputFormat;
use producer::retry::Selection;
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
    /// Validate an input file (OpenAI Batch, or Anthropic Message Batches lines) and enqueue
    /// it as one job.
    Submit {
        /// JSONL file: one {custom_id, method, url, body} request per line, or (for an
        /// anthropic-kind provider) one {custom_id, params} Message Batches request per line.
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
        /// Format of the `--wait` output file's lines.
        #[arg(long, value_enum, default_value_t)]
        output_format: OutputFormat,
        /// Items not finished within this time end `expired` (e.g. 90s, 30m, 24h, 2d;
        /// default `producer.default_deadline_s`, 0 = none).
        #[arg(long, value_parser = producer::duration::parse_duration)]
        deadline: Option<Duration>,
        /// Finish the interrupted submission of this job (same file): only the items the
        /// broker had not confirmed are published. Without it, an interrupted submission of
        /// the same file is recognised by its content and resumed too.
        #[arg(long, value_parser = job_id)]
        resume: Option<String>,
        /// How the requests run: `online` (one call each), `batch` (the provider's batch
        /// API: half price, within 24 h) or `auto` (batch when the provider has one and the
        /// deadline allows 24 h).
        #[arg(long, value_enum, default_value = "online")]
        mode: ModeArg,
        /// `online`: requests a provider batch lets expire are re-run online while the
        /// job's deadline allows (batch mode).
        #[arg(long, value_enum)]
        fallback: Option<FallbackArg>,
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
    /// Collect a job's results into an output file (OpenAI Batch output lines, or Anthropic
    /// result lines); resumable.
    Wait {
        /// Job id printed by `submit`.
        #[arg(value_parser = job_id)]
        job: String,
        /// Output file; results already in it are kept and not written twice.
        #[arg(long, short)]
        output: PathBuf,
        /// Format of the output file's lines: `openai` ({id, custom_id, response, error}) or
        /// `anthropic` ({custom_id, result: {type: succeeded|errored|canceled|expired}}).
        #[arg(long, value_enum, default_value_t)]
        output_format: OutputFormat,
        /// Give up after this many seconds (run again to resume).
        #[arg(long)]
        timeout: Option<u64>,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
        /// Write the lines in input order (collected aside first, then merged with bounded
        /// memory).
        #[arg(long)]
        ordered: bool,
        /// Write the lines of items that did not succeed to this file instead of OUT, as
        /// OpenAI's batch error file.
        #[arg(long, value_name = "FILE")]
        errors: Option<PathBuf>,
    },
    /// Submit a new job of the items of JOB that did not succeed (failed, cancelled or
    /// expired; only failed with --failed), with their original requests.
    Retry {
        /// The finished job whose items to retry.
        #[arg(value_parser = job_id)]
        job: String,
        /// Only the items that ended `failed` (not the cancelled or expired ones).
        #[arg(long)]
        failed: bool,
        /// Then wait for the new job's results into this file (as `wait -o`).
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Print `{"job_id": ..., "total": ...}` of the new job on stdout.
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
        /// Refresh every 2 s (in place on a terminal) until the job ends.
        #[arg(long)]
        watch: bool,
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
        Command::Submit {
            file,
            provider,
            model,
            json,
            wait,
            output,
            output_format,
            deadline,
            resume,
            mode,
            fallback,
            priority,
            max_cost,
        } => {
            let deadline_s = deadline.map_or(cfg.producer.default_deadline_s, |d| d.as_secs());
            let deadline_ms = (deadline_s > 0).then(|| fleet::now_ms() + deadline_s * 1000);
            if let Some(output) = output.as_deref().filter(|_| wait) {
                // Before anything is published: a job whose results cannot be written is
                // better not started (a resumed job's own results may be there already).
                if let Err(e) = collect::check_new_output(output, resume.as_deref(), output_format) {
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
                mode,
                fallback_online: fallback == Some(FallbackArg::Online),
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
                        let req = WaitRequest {
                            job_id: &job.job_id,
                            output: &output,
                            progress,
                            timeout: None,
                            format: output_format,
                        };
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
        Command::Wait { job, output, output_format, timeout, json, ordered, errors } => {
            let req = WaitRequest {
                job_id: &job,
                output: &output,
                progress,
                timeout: timeout.map(Duration::from_secs),
                format: output_format,
            };
            let finish = Finish { ordered, errors: errors.as_deref(), format: output_format };
            match finish::wait(&cfg, &req, &finish).await {
                Ok(c) => {
                    summary(&cfg, c, &output, json).await;
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }
        Command::Retry { job, failed, output, json } => {
            retry(&cfg, &job, failed, output.as_deref(), json, progress).await
        }
        Command::Status { job, json, timeout, watch: true } => {
            producer::watch::watch(&cfg, &job, Duration::from_secs(timeout), json).await
        }
        Command::Status { job, json, timeout, watch: false } => {
            inspect::status(&cfg, &job, Duration::from_secs(timeout)).await.map(|r| print_jobs(&r.jobs, json))
        }
        Command::Cancel { job } => cancel::cancel(&cfg, &job).await.map(|()| {
            eprintln!("cancel requested for job {job}: unstarted items end `cancelled`");
        }),
        Command::Dead { requeue, job, json } => dead::dead(&cfg, requeue, job.as_deref()).await.map(|msgs| {
            for m in &msgs {
                if json {
                    println!("{}", serde_json::to_string(m).expect("serializable"));
                } else {
                    println!("{}", m.line());
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

/// `producer retry`: writes the items to retry to `<JOB>.retry.jsonl`, submits it to the
/// original job's provider, and with `-o` waits for the new job.
async fn retry(
    cfg: &fleet::Config,
    job: &str,
    failed: bool,
    output: Option<&std::path::Path>,
    json: bool,
    progress: bool,
) -> anyhow::Result<()> {
    if let Some(output) = output {
        collect::check_new_output(output, None, OutputFormat::default())?;
    }
    let selection = if failed { Selection::Failed } else { Selection::NotSucceeded };
    let plan = producer::retry::plan(cfg, job, selection, std::path::Path::new(".")).await?;
    let deadline_ms =
        (cfg.producer.default_deadline_s > 0).then(|| fleet::now_ms() + cfg.producer.default_deadline_s * 1000);
    let req =
        // Online: the items to retry are few, and the provider's batch window would delay them.
        SubmitRequest {
            file: &plan.file,
            provider: &plan.provider,
            model: None,
            deadline_ms,
            progress,
            resume: None,
            mode: ModeArg::Online,
            fallback_online: false,
            priority: fleet::wire::DEFAULT_PRIORITY,
            max_cost: None,
        };
    let new = submit::submit(cfg, &req).await?;
    if json {
        println!("{}", serde_json::to_string(&new).expect("serializable"));
    } else {
        println!("{}", new.job_id);
        eprintln!(
            "submitted job {} with the {} of {} items of job {job} to retry ({})",
            new.job_id,
            plan.selected,
            plan.total,
            plan.file.display()
        );
    }
    if let Some(output) = output {
        let req = WaitRequest { job_id: &new.job_id, output, progress, timeout: None, format: OutputFormat::default() };
        let c = collect::wait(cfg, &req).await?;
        summary(cfg, c, output, json).await;
    }
    Ok(())
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
            c.usage_final = job.as_ref().is_some_and(|j| j.status.is_ended());
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
