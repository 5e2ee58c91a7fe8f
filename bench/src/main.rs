//! `bench`: runs the fleet's benchmark scenarios on the local stack (RabbitMQ, Pushgateway)
//! with the release binaries, prints one table and writes it as JSON to `.run/bench.json`.
//!
//! Run it through `scripts/bench.sh` (`make bench`), which builds the binaries first.
//! Every scenario uses a fresh namespace and its own mock provider, and removes its
//! processes, queues and Pushgateway groups when done, also on failure or Ctrl-C.

#![deny(missing_docs)]
#![deny(unreachable_pub)]

mod api;
mod fleet_run;
mod probes;
mod procs;
mod reference;
mod scenarios;
mod stack;
mod table;
mod traffic;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use scenarios::{Scenario, Settings};
use stack::Stack;
use table::Row;

/// Items of the reference, overhead and latency scenarios by default.
const DEFAULT_ITEMS: u64 = 50_000;
/// The submit scenario's file is this many times larger than `--items`.
const SUBMIT_LINES_PER_ITEM: u64 = 20;
/// The ratelimit scenario's window by default, seconds.
const DEFAULT_WINDOW_S: u64 = 180;
/// Lines of the fairness scenario's big job: enough to last the warm-up and both windows
/// at about 10,000 items/s (200,000, the figure, ran dry on a quiet machine).
const FAIRNESS_LINES: u64 = 400_000;

/// Files of the api scenario compared with the CLI (the sizes), in lines.
const API_LINES: [u64; 2] = [2_000, 100_000];
/// The api scenario's large upload, MiB: under the server's 200 MB default file limit.
const API_UPLOAD_MIB: u64 = 190;

/// Benchmark the fleet on the local stack against a bare lapin + reqwest pipeline.
#[derive(Parser)]
#[command(about)]
struct Cli {
    /// Scenario to run (repeatable); default all. `overhead` runs `reference` too.
    #[arg(long = "scenario", value_enum)]
    scenarios: Vec<Scenario>,
    /// Items of the reference, overhead and latency scenarios (default 50,000); the
    /// submit scenario's file has 20 times as many lines.
    #[arg(long)]
    items: Option<u64>,
    /// Development run: 10 times fewer items and a 30 s ratelimit window.
    #[arg(long)]
    quick: bool,
    /// The ratelimit scenario's measured window, seconds (default 180, 30 with --quick).
    #[arg(long)]
    window_s: Option<u64>,
    /// RabbitMQ the fleet and the reference use [default: the local broker, as guest].
    // Neither the default nor the environment's value is shown by --help: both hold a password.
    #[arg(
        long,
        env = "FLEET__AMQP__URL",
        default_value = harness::DEFAULT_AMQP_URL,
        hide_default_value = true,
        hide_env_values = true
    )]
    amqp_url: String,
    /// Pushgateway the workers push to (their groups are deleted afterwards).
    #[arg(long, env = "FLEET__PUSHGATEWAY__URL", default_value = harness::DEFAULT_PUSHGATEWAY_URL, hide_env_values = true)]
    pushgateway_url: String,
    /// Directory of the `worker`, `producer` and `mock-provider` binaries (default: this
    /// executable's directory, i.e. target/release).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Extra environment of every worker, `FLEET__WORKER__KEY=VALUE` (repeatable), to
    /// compare a setting, e.g. `--worker-env FLEET__WORKER__RESULT_GROUP_MAX=1`.
    #[arg(long = "worker-env", value_parser = parse_env)]
    worker_env: Vec<(String, String)>,
    /// Where to write the JSON report.
    #[arg(long, default_value = ".run/bench.json")]
    json: PathBuf,
}

impl Cli {
    fn settings(&self) -> Settings {
        let items = self.items.unwrap_or(if self.quick { DEFAULT_ITEMS / 10 } else { DEFAULT_ITEMS });
        let window = self.window_s.unwrap_or(if self.quick { 30 } else { DEFAULT_WINDOW_S });
        let fairness_lines = if self.quick { FAIRNESS_LINES / 10 } else { FAIRNESS_LINES };
        let scale = if self.quick { 10 } else { 1 };
        Settings {
            items,
            submit_lines: items * SUBMIT_LINES_PER_ITEM,
            ratelimit_window_s: window,
            fairness_lines,
            api_lines: API_LINES.iter().map(|n| n / scale).collect(),
            api_upload_mib: API_UPLOAD_MIB / scale,
        }
    }

    /// The scenarios to run, in canonical order (the reference before overhead).
    fn plan(&self) -> Vec<Scenario> {
        use clap::ValueEnum;
        let mut plan: Vec<Scenario> =
            if self.scenarios.is_empty() { Scenario::value_variants().to_vec() } else { self.scenarios.clone() };
        if plan.contains(&Scenario::Overhead) {
            plan.push(Scenario::Reference);
        }
        plan.sort();
        plan.dedup();
        plan
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(dir) = cli.bin_dir.clone() {
        harness::set_bin_dir(dir);
    }
    let mut stack = match Stack::connect(cli.amqp_url.clone(), cli.pushgateway_url.clone()).await {
        Ok(stack) => stack,
        Err(e) => return fail(&e),
    };
    stack.worker_env = cli.worker_env.clone();
    let settings = cli.settings();
    let load_before = stack::load_average();
    let started_ms = fleet::now_ms();
    let mut rows = Vec::new();
    let plan = cli.plan();
    let interrupted = tokio::select! {
        () = run_plan(&stack, &settings, &plan, &mut rows) => false,
        res = tokio::signal::ctrl_c() => res.is_ok(),
    };
    // Whatever was not cleaned up (interrupted, or a clean-up that failed) goes now; the
    // processes of a dropped scenario were killed with it.
    stack.delete_leftovers().await;
    stack.remove_scratch();
    if interrupted {
        eprintln!("bench: interrupted; cleaned up");
        return ExitCode::from(130);
    }
    let load_after = stack::load_average();

    println!();
    print!("{}", table::render(&rows));
    println!(
        "\nload average (1/5/15 min) before: {} after: {}  ({} CPUs; other processes on the machine count too)",
        fmt_load(load_before),
        fmt_load(load_after),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let report = serde_json::json!({
        "started_at_ms": started_ms,
        "finished_at_ms": fleet::now_ms(),
        "quick": cli.quick,
        "settings": settings,
        "worker_env": cli.worker_env,
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "rows": rows,
    });
    if let Err(e) = write_report(&cli.json, &report) {
        return fail(&e);
    }
    println!("JSON report: {}", cli.json.display());
    if rows.iter().any(|r| r.figure.starts_with("FAILED")) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Runs the scenarios in order, appending their rows; a failed scenario gets a FAILED row
/// and the others still run.
async fn run_plan(stack: &Stack, settings: &Settings, plan: &[Scenario], rows: &mut Vec<Row>) {
    let mut reference = None;
    for &scenario in plan {
        let variants: Vec<(String, usize)> = match scenario {
            Scenario::Overhead => vec![("overhead (1 worker)".into(), 1), ("overhead (2 workers)".into(), 2)],
            // The variant number picks the file: each size of `api_lines`, then the upload.
            Scenario::Api => (0..=settings.api_lines.len()).map(|i| (format!("api #{}", i + 1), i)).collect(),
            other => vec![(format!("{other:?}").to_lowercase(), 0)],
        };
        if scenario == Scenario::Probes {
            rows.extend(probes::run(stack).await);
            continue;
        }
        for (name, workers) in variants {
            eprintln!("bench: {name} ...");
            let started = std::time::Instant::now();
            let res = match scenario {
                Scenario::Reference => scenarios::reference(stack, settings)
                    .await
                    .inspect(|row| reference = Some(scenarios::Baseline::of(row))),
                Scenario::Overhead => scenarios::overhead(stack, settings, workers, reference).await,
                Scenario::Latency => scenarios::latency(stack, settings).await,
                Scenario::Ratelimit => scenarios::ratelimit(stack, settings).await,
                Scenario::Tpm => scenarios::tpm(stack, settings).await,
                Scenario::Submit => scenarios::submit(stack, settings).await,
                Scenario::Fairness => scenarios::fairness(stack, settings).await,
                Scenario::Api => {
                    let variant = match settings.api_lines.get(workers) {
                        Some(&lines) => api::Variant::VersusCli(lines),
                        None => api::Variant::LargeUpload(settings.api_upload_mib),
                    };
                    api::run(stack, variant).await
                }
                Scenario::Probes => unreachable!("probes run above"),
            };
            let row = res.unwrap_or_else(|e| Row::failed(&name, &e));
            eprintln!("bench: {name}: {} ({:.0} s)", row.figure, started.elapsed().as_secs_f64());
            rows.push(row);
        }
    }
}

/// `KEY=VALUE` of `--worker-env`: a `FLEET__WORKER__*` setting only (they hold no secret,
/// so the report can show them).
fn parse_env(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    if !k.starts_with("FLEET__WORKER__") {
        return Err(format!("{k}: only FLEET__WORKER__* settings can be compared"));
    }
    Ok((k.to_string(), v.to_string()))
}

fn fmt_load(l: [f64; 3]) -> String {
    format!("{:.2} {:.2} {:.2}", l[0], l[1], l[2])
}

fn write_report(path: &std::path::Path, report: &serde_json::Value) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut bytes = serde_json::to_vec_pretty(report)?;
    bytes.push(b'\n');
    std::fs::write(path, bytes)?;
    Ok(())
}

fn fail(e: &anyhow::Error) -> ExitCode {
    eprintln!("bench: {e:#}");
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn help_shows_no_password() {
        // Only this test sets the variable; no other test of this crate reads it.
        std::env::set_var("FLEET__AMQP__URL", "amqp://u:env-secret-pw@host/%2f");
        let help = super::Cli::command().render_long_help().to_string();
        std::env::remove_var("FLEET__AMQP__URL");
        assert!(!help.contains("guest:guest") && !help.contains("env-secret-pw"), "{help}");
    }
}
