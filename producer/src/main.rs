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
use producer::collect::{self, WaitRequest};
use producer::finish::{self, Finish};
use producer::inspect;
use producer::output_format::OutputFormat;
use producer::retry::Selection;
use producer::submit::{self, InputError, SubmitRequest};
use producer::{cancel, dead, report};

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
    Submit(SubmitArgs),
    /// Collect a job's results into an output file (OpenAI Batch output lines, or Anthropic
    /// result lines); resumable.
    Wait(WaitArgs),
    /// Submit a new job of the items of JOB that did not succeed (failed, cancelled or
    /// expired; only failed with --failed), with their original requests.
    Retry(RetryArgs),
    /// Show one job's progress, as the fleet's job tracker knows it.
    Status(StatusArgs),
    /// Cancel a job: items not yet started end `cancelled` without a provider call.
    Cancel(CancelArgs),
    /// List dead-lettered messages with their reasons; optionally put items back.
    Dead(DeadArgs),
    /// List jobs in progress and recently finished.
    Jobs(JobsArgs),
    /// Serve the OpenAI Files + Batches and Anthropic Message Batches HTTP APIs on
    /// `api.listen` (docs/api.md), until SIGINT or SIGTERM.
    Serve,
}

/// The arguments of `producer submit`.
#[derive(clap::Args)]
struct SubmitArgs {
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
    /// API: half price, within 24 h), `flex` (one call each on the provider's flex tier:
    /// batch price, slower; openai-kind providers) or `auto` (batch when the provider has
    /// one and the deadline allows 24 h, else online; never flex).
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
    /// http(s) URL POSTed a signed event (`batch.completed`, `batch.failed`, ...) when the
    /// job ends (default: `webhooks.default_url`; see README "Completion webhooks").
    #[arg(long, value_name = "URL")]
    webhook: Option<String>,
    /// Validate the file and show what would be submitted (lines per endpoint, the chunks
    /// batch mode would cut, estimated tokens and cost from the price table); publish
    /// nothing.
    #[arg(long, conflicts_with_all = ["wait", "resume"])]
    dry_run: bool,
}

/// The arguments of `producer wait`.
#[derive(clap::Args)]
struct WaitArgs {
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
}

/// The arguments of `producer retry`.
#[derive(clap::Args)]
struct RetryArgs {
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
    /// Spend cap of the new job (as `submit --max-cost`); default: the cap of JOB, if it
    /// had one.
    #[arg(long, value_parser = max_cost)]
    max_cost: Option<f64>,
    /// How the new job runs (as `submit --mode`); default: `flex` if JOB ran on the flex
    /// tier (its items keep their price), else `online` (the items to retry are few, and a
    /// provider batch's window would delay them).
    #[arg(long, value_enum)]
    mode: Option<ModeArg>,
}

/// The arguments of `producer status`.
#[derive(clap::Args)]
struct StatusArgs {
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
}

/// The arguments of `producer cancel`.
#[derive(clap::Args)]
struct CancelArgs {
    /// Job id.
    #[arg(value_parser = job_id)]
    job: String,
}

/// The arguments of `producer dead`.
#[derive(clap::Args)]
struct DeadArgs {
    /// Put the dead-lettered items back on their items queues.
    #[arg(long)]
    requeue: bool,
    /// Only this job's items (with --requeue).
    #[arg(long, value_parser = job_id)]
    job: Option<String>,
    /// Print JSON lines.
    #[arg(long)]
    json: bool,
}

/// The arguments of `producer jobs`.
#[derive(clap::Args)]
struct JobsArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Seconds to wait for the tracker's answer.
    #[arg(long, default_value_t = 5)]
    timeout: u64,
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
        Command::Submit(args) => submit(&cfg, args, progress).await,
        Command::Wait(args) => wait(&cfg, args, progress).await,
        Command::Retry(args) => retry(&cfg, args, progress).await,
        Command::Status(args) => status(&cfg, args).await,
        Command::Cancel(args) => cancel(&cfg, args).await,
        Command::Dead(args) => dead(&cfg, args).await,
        Command::Jobs(args) => jobs(&cfg, args).await,
        Command::Serve => producer::serve::run(cfg.clone(), fleet::shutdown::on_signals()).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("producer: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// A refusal before anything was published, whatever its cause (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
struct Refused(anyhow::Error);

/// 2 for bad input or configuration (nothing was published), 3 for a job collected whose
/// items failed for a reason of the fleet's, 1 for any other failure.
fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<report::FleetSideFailures>().is_some() {
        return 3;
    }
    let usage = e.downcast_ref::<Refused>().is_some()
        || e.downcast_ref::<InputError>().is_some()
        || e.downcast_ref::<collect::OutputError>().is_some()
        || e.downcast_ref::<producer::serve::KeysError>().is_some()
        || e.downcast_ref::<producer::spend::UnpricedCap>().is_some();
    if usage {
        2
    } else {
        1
    }
}

/// `producer submit`, then with `--wait` the wait for its results.
async fn submit(cfg: &fleet::Config, args: SubmitArgs, progress: bool) -> anyhow::Result<()> {
    let deadline_s = args.deadline.map_or(cfg.producer.default_deadline_s, |d| d.as_secs());
    let deadline_ms = (deadline_s > 0).then(|| fleet::now_ms() + deadline_s * 1000);
    if let Some(output) = args.output.as_deref().filter(|_| args.wait) {
        // Before anything is published: a job whose results cannot be written is better
        // not started (a resumed job's own results may be there already).
        collect::check_new_output(output, args.resume.as_deref(), args.output_format).map_err(Refused)?;
    }
    let req = SubmitRequest {
        file: &args.file,
        provider: &args.provider,
        model: args.model.as_deref(),
        deadline_ms,
        progress,
        resume: args.resume.as_deref(),
        mode: args.mode,
        fallback_online: args.fallback == Some(FallbackArg::Online),
        priority: args.priority,
        max_cost: args.max_cost,
        webhook_url: args.webhook.as_deref().or(Some(cfg.webhooks.default_url.as_str()).filter(|u| !u.is_empty())),
    };
    if args.dry_run {
        let plan = producer::dry_run::dry_run(cfg, &req)?;
        if args.json {
            println!("{}", serde_json::to_string(&plan)?);
        } else {
            println!("{plan}");
        }
        return Ok(());
    }
    let job = submit::submit(cfg, &req).await?;
    report::submitted(&job, args.json);
    if !args.wait {
        return Ok(());
    }
    let output = args.output.unwrap_or_else(|| PathBuf::from(format!("{}.jsonl", job.job_id)));
    let req = WaitRequest { job_id: &job.job_id, output: &output, progress, timeout: None, format: args.output_format };
    let collected = collect::wait(cfg, &req).await?;
    report::summary(cfg, collected, &output, args.json).await?;
    Ok(())
}

/// `producer wait`.
async fn wait(cfg: &fleet::Config, args: WaitArgs, progress: bool) -> anyhow::Result<()> {
    let req = WaitRequest {
        job_id: &args.job,
        output: &args.output,
        progress,
        timeout: args.timeout.map(Duration::from_secs),
        format: args.output_format,
    };
    let finish = Finish { ordered: args.ordered, errors: args.errors.as_deref(), format: args.output_format };
    let collected = finish::wait(cfg, &req, &finish).await?;
    report::summary(cfg, collected, &args.output, args.json).await?;
    Ok(())
}

/// `producer retry`: writes the items to retry to `<JOB>.retry.jsonl`, submits it to the
/// original job's provider, and with `-o` waits for the new job.
async fn retry(cfg: &fleet::Config, args: RetryArgs, progress: bool) -> anyhow::Result<()> {
    if let Some(output) = &args.output {
        collect::check_new_output(output, None, OutputFormat::default())?;
    }
    let selection = if args.failed { Selection::Failed } else { Selection::NotSucceeded };
    let plan = producer::retry::plan(cfg, &args.job, selection, std::path::Path::new(".")).await?;
    let deadline_ms =
        (cfg.producer.default_deadline_s > 0).then(|| fleet::now_ms() + cfg.producer.default_deadline_s * 1000);
    let kept = producer::spend::retry_terms(cfg, &args.job).await;
    let mode = args.mode.unwrap_or(if kept.flex { ModeArg::Flex } else { ModeArg::Online });
    let req = SubmitRequest {
        file: &plan.file,
        provider: &plan.provider,
        model: None,
        deadline_ms,
        progress,
        resume: None,
        mode,
        fallback_online: false,
        priority: fleet::wire::DEFAULT_PRIORITY,
        max_cost: args.max_cost.or(kept.max_cost),
        webhook_url: Some(cfg.webhooks.default_url.as_str()).filter(|u| !u.is_empty()),
    };
    let new = submit::submit(cfg, &req).await?;
    report::retried(&new, &plan, &args.job, args.json);
    if let Some(output) = &args.output {
        let req = WaitRequest { job_id: &new.job_id, output, progress, timeout: None, format: OutputFormat::default() };
        let collected = collect::wait(cfg, &req).await?;
        report::summary(cfg, collected, output, args.json).await?;
    }
    Ok(())
}

/// `producer status`, once or `--watch`ed.
async fn status(cfg: &fleet::Config, args: StatusArgs) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(args.timeout);
    if args.watch {
        return producer::watch::watch(cfg, &args.job, timeout, args.json).await;
    }
    let reply = inspect::status(cfg, &args.job, timeout).await?;
    let stuck = producer::status_diagnosis::diagnose(cfg, &reply.jobs).await?;
    report::statuses(&reply.jobs, &stuck, args.json);
    Ok(())
}

/// `producer cancel`: the request, then, when no worker serves the job's provider, the
/// job's queued items ended here.
async fn cancel(cfg: &fleet::Config, args: CancelArgs) -> anyhow::Result<()> {
    cancel::cancel(cfg, &args.job).await?;
    match producer::status_diagnosis::end_unserved(cfg, &args.job).await? {
        None => eprintln!("cancel requested for job {}: unstarted items end `cancelled`", args.job),
        Some(done) => eprintln!(
            "cancel requested for job {}: no worker serves provider {}, so its {} queued items were ended \
             `cancelled` here; items waiting elsewhere (delay queues, batch chunks) end when a worker for {} runs",
            args.job, done.provider, done.ended, done.provider
        ),
    }
    Ok(())
}

/// `producer dead`.
async fn dead(cfg: &fleet::Config, args: DeadArgs) -> anyhow::Result<()> {
    let messages = dead::dead(cfg, args.requeue, args.job.as_deref()).await?;
    report::dead(&messages, args.json);
    Ok(())
}

/// `producer jobs`.
async fn jobs(cfg: &fleet::Config, args: JobsArgs) -> anyhow::Result<()> {
    let reply = inspect::ask(cfg, &TrackerRequest::Jobs, Duration::from_secs(args.timeout)).await?;
    let stuck = producer::status_diagnosis::diagnose(cfg, &reply.jobs).await?;
    report::statuses(&reply.jobs, &stuck, args.json);
    Ok(())
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
