//! The scenarios: what each one starts, what it times, and how its row and figure are
//! computed. Every scenario starts its own mock provider and uses a fresh namespace, and
//! cleans both up whether it succeeded or not.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::fleet_run::FleetRun;
use harness::Mock;

use crate::procs::{self, MockStats, Timed, Usage};
use crate::reference;
use crate::stack::Stack;
use crate::table::{thousands, Row};
use crate::traffic::{Sampler, Scope};
use crate::workload::{self, PROVIDER};

/// Time the ratelimit scenario lets the workers settle before its window opens.
const RATELIMIT_WARMUP: Duration = Duration::from_secs(10);
/// The mock's limit in the ratelimit scenario.
const RATELIMIT_RPM: u64 = 6000;
/// The mock's token limit in the tpm scenario, and what each of its requests asks for at
/// most (so a request costs ~110 tokens as the mock counts: ~5,500 requests a minute).
const TPM_LIMIT: u64 = 600_000;
const TPM_MAX_TOKENS: u64 = 100;
/// Workers of the ratelimit scenario.
const RATELIMIT_WORKERS: usize = 4;
/// Per-request latency and in-flight limit of the latency scenario.
const LATENCY_MS: u64 = 200;
const LATENCY_IN_FLIGHT: u16 = 1000;
/// The worker's default in-flight limit, used by the overhead and ratelimit scenarios.
const DEFAULT_IN_FLIGHT: u16 = 256;

/// A scenario, as named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub(crate) enum Scenario {
    /// Bare lapin + reqwest pipeline in this process (the overhead baseline).
    Reference,
    /// The fleet on a zero-latency mock, 1 then 2 workers, against the reference.
    Overhead,
    /// One worker, 1,000 in flight, 200 ms per request: throughput and memory.
    Latency,
    /// Four workers against a 6,000 rpm mock for a fixed window.
    Ratelimit,
    /// Four workers against a mock limited to 600,000 tokens a minute (counted as providers
    /// count them: prompt plus `max_tokens`), for the same window.
    Tpm,
    /// `producer submit` of a large file with no workers.
    Submit,
    /// A 10-line job submitted while a 400,000-line job runs (mock 50 ms): the small job's
    /// time and the big job's throughput loss.
    Fairness,
    /// The batch HTTP API (`producer serve`, driven with curl) against `submit` + `wait` on
    /// 2,000 and 100,000 lines, and the server's peak RSS for a 190 MiB upload.
    Api,
    /// The broker's cost of single choices (ledger queue type, grouped acks), one row each.
    Probes,
}

/// How big each scenario is.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Settings {
    /// Items of the reference, overhead and latency scenarios.
    pub items: u64,
    /// Lines of the submit scenario's file.
    pub submit_lines: u64,
    /// Measured window of the ratelimit scenario, seconds.
    pub ratelimit_window_s: u64,
    /// Lines of the fairness scenario's big job.
    pub fairness_lines: u64,
    /// Files of the api scenario compared with the CLI, in lines.
    pub api_lines: Vec<u64>,
    /// Size of the api scenario's large upload, MiB.
    pub api_upload_mib: u64,
}

impl Settings {
    /// Items submitted in a rate-limit scenario: 1.5 times what the limit lets through
    /// during warm-up and window, so the queue never runs dry.
    fn ratelimit_items(&self, limit: Limit) -> u64 {
        let seconds = RATELIMIT_WARMUP.as_secs() + self.ratelimit_window_s;
        seconds * limit.requests_per_minute() / 60 * 3 / 2
    }
}

/// The mock's limit in a rate-limit scenario.
#[derive(Debug, Clone, Copy)]
enum Limit {
    /// Requests a minute (`--rpm`).
    Rpm(u64),
    /// Tokens a minute (`--tpm`); every request asks for [`TPM_MAX_TOKENS`].
    Tpm(u64),
}

impl Limit {
    fn mock_args(self) -> [String; 2] {
        match self {
            Limit::Rpm(n) => ["--rpm".into(), n.to_string()],
            Limit::Tpm(n) => ["--tpm".into(), n.to_string()],
        }
    }

    /// Requests a minute the limit lets through (an upper bound for tokens: the prompt
    /// counts too).
    fn requests_per_minute(self) -> u64 {
        match self {
            Limit::Rpm(n) => n,
            Limit::Tpm(n) => n / TPM_MAX_TOKENS,
        }
    }

    fn max_tokens(self) -> Option<u64> {
        matches!(self, Limit::Tpm(_)).then_some(TPM_MAX_TOKENS)
    }

    /// What the limit counts between two `/stats` readings: answered requests, or the
    /// tokens the mock charged.
    fn used(self, before: &MockStats, after: &MockStats) -> u64 {
        match self {
            Limit::Rpm(_) => after.status(200) - before.status(200),
            Limit::Tpm(_) => after.tokens_admitted - before.tokens_admitted,
        }
    }

    fn name(self) -> String {
        match self {
            Limit::Rpm(n) => format!("ratelimit ({RATELIMIT_WORKERS} workers, {n} rpm)"),
            Limit::Tpm(n) => format!("tpm ({RATELIMIT_WORKERS} workers, {} tokens/min)", thousands(n)),
        }
    }
}

/// CPU seconds of the mock and the broker at one instant (to attribute a run's CPU).
#[derive(Debug, Clone, Copy)]
struct CpuMark {
    mock: Option<f64>,
    broker: Option<f64>,
}

impl CpuMark {
    fn now(stack: &Stack, mock: Option<&Mock>) -> CpuMark {
        CpuMark {
            mock: mock.and_then(|m| procs::usage_of(&m.proc).ok()).map(|u| u.cpu_s),
            broker: procs::broker_cpu_s(stack.amqp_port()),
        }
    }

    /// Adds `mock_cpu_s` and `broker_cpu_s` spent since `earlier` to a row's details.
    fn add_since(self, earlier: CpuMark, mut row: Row) -> Row {
        if let (Some(a), Some(b)) = (earlier.mock, self.mock) {
            row = row.detail("mock_cpu_s", round2(b - a));
        }
        if let (Some(a), Some(b)) = (earlier.broker, self.broker) {
            row = row.detail("broker_cpu_s", round2(b - a));
        }
        row
    }
}

/// Fills the cost columns of a row from its details and `bytes`: broker CPU, worker CPU
/// and broker bytes, each per item of the row. For the submit scenario, whose row has no
/// worker, the producer's CPU stands in the worker column's place in the JSON only.
fn with_costs(mut row: Row, bytes: Option<u64>) -> Row {
    let per_item = |total: f64| (row.items > 0).then(|| total / row.items as f64);
    row.broker_cpu_us_per_item =
        row.details.get("broker_cpu_s").and_then(|v| v.as_f64()).and_then(|s| per_item(s * 1e6));
    row.worker_cpu_us_per_item = row.worker_cpu_s_per_1k.map(|s| s * 1000.0);
    row.broker_bytes_per_item = bytes.and_then(|b| per_item(b as f64));
    match bytes {
        Some(b) => row.detail("broker_bytes", b),
        None => row,
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// Total CPU per 1,000 items and the largest peak RSS of a set of workers.
fn worker_columns(cpu_s: f64, usages: &[Usage], items: u64) -> (Option<f64>, Option<f64>) {
    if usages.is_empty() || items == 0 {
        return (None, None);
    }
    let rss = usages.iter().map(Usage::peak_rss_mib).fold(0.0, f64::max);
    (Some(cpu_s / items as f64 * 1000.0), Some(rss))
}

/// What the overhead scenario is measured against: the reference's rate and broker cost.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Baseline {
    pub rate: f64,
    pub broker_cpu_us_per_item: Option<f64>,
}

impl Baseline {
    pub(crate) fn of(reference: &Row) -> Baseline {
        Baseline { rate: reference.items_per_s, broker_cpu_us_per_item: reference.broker_cpu_us_per_item }
    }
}

/// Targets of the overhead scenario (issue 11): a share of the reference's rate, and at
/// most this multiple of its broker CPU per item.
const OVERHEAD_MIN_FRACTION: f64 = 0.85;
const OVERHEAD_MAX_BROKER_RATIO: f64 = 1.2;
/// Target of the latency scenario: a share of its in-flight bound.
const LATENCY_MIN_FRACTION: f64 = 0.90;
/// Target of the submit scenario, lines per second.
const SUBMIT_MIN_RATE: f64 = 30_000.0;

/// The reference pipeline and its row.
pub(crate) async fn reference(stack: &Stack, settings: &Settings) -> anyhow::Result<Row> {
    let mock = Mock::try_start(0, &[])?;
    let before = CpuMark::now(stack, Some(&mock));
    let traffic = Sampler::start(stack.amqp_port(), Scope::OwnProcess);
    let res = reference::run(stack, &mock.url, settings.items).await;
    let bytes = traffic.finish().await;
    let after = CpuMark::now(stack, Some(&mock));
    let _ = procs::stop_mock(mock).await;
    let out = res?;
    let rate = out.rate();
    let mut figure = format!("baseline {}/s (CPU and RSS: the bench process)", thousands(rate.round() as u64));
    if out.non_200 > 0 {
        figure.push_str(&format!("; {} answers were not 200", out.non_200));
    }
    let row = Row {
        scenario: "reference (lapin + reqwest)".into(),
        items: out.items,
        wall_s: out.wall_s,
        items_per_s: rate,
        worker_cpu_s_per_1k: Some(out.usage.cpu_s / out.items as f64 * 1000.0),
        worker_peak_rss_mib: Some(out.usage.peak_rss_mib()),
        broker_cpu_us_per_item: None,
        worker_cpu_us_per_item: None,
        broker_bytes_per_item: None,
        figure,
        targets_met: None,
        details: Default::default(),
    }
    .detail("bench_cpu_s", round2(out.usage.cpu_s))
    .detail("non_200", out.non_200);
    Ok(with_costs(after.add_since(before, row), bytes))
}

/// One job through the fleet: what a row needs.
struct JobRun {
    items: u64,
    succeeded: u64,
    /// `producer submit` start to `producer wait` exit.
    wall_s: f64,
    workers: Vec<Usage>,
    submit: Timed,
    wait: Timed,
    before: CpuMark,
    after: CpuMark,
    /// Bytes between the fleet's processes and the broker during the job.
    bytes: Option<u64>,
    /// Requests in flight at the mock between submit and the last result.
    in_flight: InFlight,
}

impl JobRun {
    /// The row's common columns; the caller sets the figure.
    fn row(&self, scenario: String) -> Row {
        let cpu: f64 = self.workers.iter().map(|u| u.cpu_s).sum();
        let (cpu_per_1k, rss) = worker_columns(cpu, &self.workers, self.items);
        let row = Row {
            scenario,
            items: self.items,
            wall_s: self.wall_s,
            items_per_s: self.items as f64 / self.wall_s,
            worker_cpu_s_per_1k: cpu_per_1k,
            worker_peak_rss_mib: rss,
            broker_cpu_us_per_item: None,
            worker_cpu_us_per_item: None,
            broker_bytes_per_item: None,
            figure: String::new(),
            targets_met: None,
            details: Default::default(),
        }
        .detail("succeeded", self.succeeded)
        .detail("worker_cpu_s", round2(cpu))
        .detail("submit_wall_s", round2(self.submit.wall_s))
        .detail("submit_cpu_s", round2(self.submit.usage.cpu_s))
        .detail("submit_peak_rss_mib", round2(self.submit.usage.peak_rss_mib()))
        .detail("wait_wall_s", round2(self.wait.wall_s))
        .detail("wait_cpu_s", round2(self.wait.usage.cpu_s))
        .detail("wait_peak_rss_mib", round2(self.wait.usage.peak_rss_mib()))
        .detail("mock_in_flight_mean", self.in_flight.mean.round())
        .detail("mock_in_flight_max", self.in_flight.max);
        with_costs(self.after.add_since(self.before, row), self.bytes)
    }

    /// `None` when every item succeeded, else a note for the figure.
    fn shortfall(&self) -> Option<String> {
        (self.succeeded != self.items).then(|| format!("only {} of {} succeeded; ", self.succeeded, self.items))
    }
}

/// Starts a mock with `mock_args` and `workers` workers, then submits `items` requests and
/// collects them; cleans everything up.
async fn run_job(
    stack: &Stack,
    scenario: &str,
    mock_args: &[&str],
    workers: usize,
    max_in_flight: u16,
    items: u64,
) -> anyhow::Result<JobRun> {
    let mock = Mock::try_start(0, mock_args)?;
    let mut fleet = FleetRun::new(stack, scenario, &mock.url, max_in_flight)?;
    let res = drive_job(&mut fleet, &mock, workers, items).await;
    fleet.cleanup().await;
    let _ = procs::stop_mock(mock).await;
    res
}

async fn drive_job(fleet: &mut FleetRun<'_>, mock: &Mock, workers: usize, items: u64) -> anyhow::Result<JobRun> {
    let input = fleet.dir.join("input.jsonl");
    let output = fleet.dir.join("output.jsonl");
    workload::write_requests(&input, items)?;
    // Workers first, so the measured time is the whole job as a user sees it.
    fleet.start_workers(workers)?;
    fleet.wait_for_consumers(Duration::from_secs(30)).await?;
    let before = CpuMark::now(fleet.stack(), Some(mock));
    let traffic = Sampler::start(fleet.stack().amqp_port(), Scope::Children);
    let started = Instant::now();
    let job = async {
        let submitted = fleet.submit(&input).await?;
        let timeout = Duration::from_secs(300 + items / 100);
        let (summary, wait) = fleet.wait(&submitted.job_id, &output, timeout).await?;
        anyhow::Ok((submitted, summary, wait))
    };
    let (job, in_flight) = sample_in_flight(mock, job).await;
    let (submitted, summary, wait) = job?;
    let wall_s = started.elapsed().as_secs_f64();
    let bytes = traffic.finish().await;
    let after = CpuMark::now(fleet.stack(), Some(mock));
    let usage = fleet.stop_workers().await?;
    remove(&input);
    remove(&output);
    Ok(JobRun {
        items: submitted.total,
        succeeded: summary["counts"]["succeeded"].as_u64().unwrap_or(0),
        wall_s,
        workers: usage,
        submit: submitted.timed,
        wait,
        before,
        after,
        bytes,
        in_flight,
    })
}

/// Mean and largest number of requests in flight at the mock.
#[derive(Debug, Clone, Copy, Default)]
struct InFlight {
    mean: f64,
    max: u64,
}

/// Runs `work` while sampling the mock's requests in flight every 100 ms: how much of
/// the in-flight limit is spent waiting for the provider (the rest is spent on the
/// broker and in the worker).
async fn sample_in_flight<T>(mock: &Mock, work: impl std::future::Future<Output = T>) -> (T, InFlight) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let (mut sum, mut n, mut max) = (0u64, 0u64, 0u64);
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => {
                let mean = if n == 0 { 0.0 } else { sum as f64 / n as f64 };
                return (out, InFlight { mean, max });
            }
            _ = tick.tick() => {
                if let Ok(s) = MockStats::of(mock) {
                    sum += s.in_flight;
                    n += 1;
                    max = max.max(s.in_flight);
                }
            }
        }
    }
}

fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}

/// The fleet on a zero-latency mock with `workers` workers, against the reference rate.
pub(crate) async fn overhead(
    stack: &Stack,
    settings: &Settings,
    workers: usize,
    reference: Option<Baseline>,
) -> anyhow::Result<Row> {
    let run = run_job(stack, "overhead", &[], workers, DEFAULT_IN_FLIGHT, settings.items).await?;
    let plural = if workers == 1 { "" } else { "s" };
    let mut row = run.row(format!("overhead ({workers} worker{plural})"));
    let shortfall = run.shortfall();
    match reference {
        Some(reference) => {
            let fraction = row.items_per_s / reference.rate;
            let broker_ratio = row.broker_cpu_us_per_item.zip(reference.broker_cpu_us_per_item).map(|(f, r)| f / r);
            row.figure = format!(
                "{}{:.0}% of reference {}/s (target >= {:.0}%); broker CPU {} the reference's (target <= {OVERHEAD_MAX_BROKER_RATIO}x)",
                shortfall.as_deref().unwrap_or(""),
                fraction * 100.0,
                thousands(reference.rate.round() as u64),
                OVERHEAD_MIN_FRACTION * 100.0,
                broker_ratio.map_or_else(|| "?".to_string(), |r| format!("{r:.2}x")),
            );
            row.targets_met = Some(
                fraction >= OVERHEAD_MIN_FRACTION
                    && broker_ratio.is_some_and(|r| r <= OVERHEAD_MAX_BROKER_RATIO)
                    && shortfall.is_none(),
            );
            row = row.detail("fraction_of_reference", round2(fraction));
            if let Some(r) = broker_ratio {
                row = row.detail("broker_cpu_ratio_to_reference", round2(r));
            }
        }
        None => row.figure = format!("{}no reference rate (it failed)", shortfall.as_deref().unwrap_or("")),
    }
    Ok(row)
}

/// One worker, 1,000 in flight, on a mock answering after 200 ms.
pub(crate) async fn latency(stack: &Stack, settings: &Settings) -> anyhow::Result<Row> {
    let latency = LATENCY_MS.to_string();
    let run = run_job(stack, "latency", &["--latency-ms", &latency], 1, LATENCY_IN_FLIGHT, settings.items).await?;
    let mut row = run.row(format!("latency (1 worker, {LATENCY_IN_FLIGHT} in flight, {LATENCY_MS} ms)"));
    let bound = f64::from(LATENCY_IN_FLIGHT) * 1000.0 / LATENCY_MS as f64;
    let fraction = row.items_per_s / bound;
    let rss = row.worker_peak_rss_mib.unwrap_or(f64::NAN);
    let shortfall = run.shortfall();
    row.figure = format!(
        "{}{:.0}% of the {}/s bound (target >= {:.0}%); peak RSS {rss:.0} MiB (target < 100)",
        shortfall.as_deref().unwrap_or(""),
        fraction * 100.0,
        thousands(bound as u64),
        LATENCY_MIN_FRACTION * 100.0,
    );
    row.targets_met = Some(fraction >= LATENCY_MIN_FRACTION && rss < 100.0 && shortfall.is_none());
    Ok(row.detail("fraction_of_bound", round2(fraction)))
}

/// Four workers against a mock limited to 6,000 requests per minute, measured over a fixed
/// window with the mock's own counters.
pub(crate) async fn ratelimit(stack: &Stack, settings: &Settings) -> anyhow::Result<Row> {
    limited(stack, settings, Limit::Rpm(RATELIMIT_RPM), "ratelimit").await
}

/// Four workers (no `tpm` configured: they adapt to the 429s and the token headers)
/// against a mock limited to 600,000 tokens per minute, measured like `ratelimit` with the
/// mock's own token count.
pub(crate) async fn tpm(stack: &Stack, settings: &Settings) -> anyhow::Result<Row> {
    limited(stack, settings, Limit::Tpm(TPM_LIMIT), "tpm").await
}

async fn limited(stack: &Stack, settings: &Settings, limit: Limit, name: &str) -> anyhow::Result<Row> {
    let args = limit.mock_args();
    let mock = Mock::try_start(0, &[args[0].as_str(), args[1].as_str()])?;
    let mut fleet = FleetRun::new(stack, name, &mock.url, DEFAULT_IN_FLIGHT)?;
    let res = drive_ratelimit(stack, &mut fleet, &mock, settings, limit).await;
    fleet.cleanup().await;
    let _ = procs::stop_mock(mock).await;
    res
}

async fn drive_ratelimit(
    stack: &Stack,
    fleet: &mut FleetRun<'_>,
    mock: &Mock,
    settings: &Settings,
    limit: Limit,
) -> anyhow::Result<Row> {
    let input = fleet.dir.join("input.jsonl");
    workload::write_requests_asking(&input, settings.ratelimit_items(limit), limit.max_tokens())?;
    fleet.start_workers(RATELIMIT_WORKERS)?;
    fleet.wait_for_consumers(Duration::from_secs(30)).await?;
    let submitted = fleet.submit(&input).await;
    remove(&input);
    let submitted = submitted?;
    tokio::time::sleep(RATELIMIT_WARMUP).await;

    let stats0 = MockStats::of(mock)?;
    let workers0 = fleet.worker_usage()?;
    let before = CpuMark::now(fleet.stack(), Some(mock));
    let traffic = Sampler::start(stack.amqp_port(), Scope::Children);
    let started = Instant::now();
    let window = Duration::from_secs(settings.ratelimit_window_s);
    while started.elapsed() < window {
        let step = (window - started.elapsed()).min(Duration::from_secs(30));
        tokio::time::sleep(step).await;
        let s = MockStats::of(mock)?;
        eprintln!(
            "bench:   {} {:>3.0}/{} s: {} used, {} answered 429",
            limit.name(),
            started.elapsed().as_secs_f64(),
            window.as_secs(),
            limit.used(&stats0, &s),
            s.status(429) - stats0.status(429),
        );
    }
    let stats1 = MockStats::of(mock)?;
    let workers1 = fleet.worker_usage()?;
    let bytes = traffic.finish().await;
    let after = CpuMark::now(fleet.stack(), Some(mock));
    let window_s = started.elapsed().as_secs_f64();
    let job_queue = fleet.topology().job_items_queue(PROVIDER, &submitted.job_id);
    let backlog = stack.queue_state(&job_queue).await?.map_or(0, |(ready, _)| ready);
    fleet.stop_workers().await?;

    let ok = stats1.status(200) - stats0.status(200);
    let limited = stats1.status(429) - stats0.status(429);
    let requests = stats1.requests - stats0.requests;
    let (Limit::Rpm(ceiling) | Limit::Tpm(ceiling)) = limit;
    let per_min = limit.used(&stats0, &stats1) as f64 / (window_s / 60.0);
    let fraction = per_min / ceiling as f64;
    let share_429 = if requests == 0 { 0.0 } else { limited as f64 / requests as f64 };
    let cpu: f64 = workers1.iter().map(|u| u.cpu_s).sum::<f64>() - workers0.iter().map(|u| u.cpu_s).sum::<f64>();
    let (cpu_per_1k, rss) = worker_columns(cpu, &workers1, ok);
    let mut figure = format!(
        "{}/min = {:.1}% of {} (target >= 95%); 429s {:.1}% of requests (target <= 3%)",
        thousands(per_min.round() as u64),
        fraction * 100.0,
        thousands(ceiling),
        share_429 * 100.0
    );
    if backlog == 0 {
        figure.push_str("; the queue ran dry, submit more");
    }
    let row = Row {
        scenario: limit.name(),
        items: ok,
        wall_s: window_s,
        items_per_s: ok as f64 / window_s,
        worker_cpu_s_per_1k: cpu_per_1k,
        worker_peak_rss_mib: rss,
        broker_cpu_us_per_item: None,
        worker_cpu_us_per_item: None,
        broker_bytes_per_item: None,
        figure,
        targets_met: Some(fraction >= 0.95 && share_429 <= 0.03 && backlog > 0),
        details: Default::default(),
    }
    .detail("submitted", submitted.total)
    .detail("requests", requests)
    .detail("answered_200", ok)
    .detail("answered_429", limited)
    .detail("per_minute", per_min.round())
    .detail("fraction_of_limit", round2(fraction))
    .detail("share_429", (share_429 * 10_000.0).round() / 10_000.0)
    .detail("backlog_at_end", backlog)
    .detail("worker_cpu_s", round2(cpu));
    Ok(with_costs(after.add_since(before, row), bytes))
}

/// `producer submit` of a large file with no worker running.
pub(crate) async fn submit(stack: &Stack, settings: &Settings) -> anyhow::Result<Row> {
    // No worker calls the provider here: any URL will do.
    let mut fleet = FleetRun::new(stack, "submit", "http://127.0.0.1:9", DEFAULT_IN_FLIGHT)?;
    let res = drive_submit(&mut fleet, settings.submit_lines).await;
    fleet.cleanup().await;
    res
}

async fn drive_submit(fleet: &mut FleetRun<'_>, lines: u64) -> anyhow::Result<Row> {
    let input = fleet.dir.join("input.jsonl");
    workload::write_requests(&input, lines)?;
    let input_mib = std::fs::metadata(&input)?.len() as f64 / (1 << 20) as f64;
    let before = CpuMark::now(fleet.stack(), None);
    let traffic = Sampler::start(fleet.stack().amqp_port(), Scope::Children);
    let submitted = fleet.submit(&input).await;
    let bytes = traffic.finish().await;
    let after = CpuMark::now(fleet.stack(), None);
    remove(&input);
    let submitted = submitted?;
    anyhow::ensure!(submitted.total == lines, "submitted {} of {lines} lines", submitted.total);
    let t = &submitted.timed;
    let rate = lines as f64 / t.wall_s;
    let rss = t.usage.peak_rss_mib();
    let figure = format!(
        "{} lines/s (target >= {}); producer peak RSS {rss:.0} MiB (target < 100)",
        thousands(rate.round() as u64),
        thousands(SUBMIT_MIN_RATE as u64)
    );
    let met = Some(rate >= SUBMIT_MIN_RATE && rss < 100.0);
    let row = Row::measured("submit (no workers)".into(), lines, t.wall_s, rate, figure, met)
        .detail("input_mib", round2(input_mib))
        .detail("producer_cpu_s", round2(t.usage.cpu_s))
        .detail("producer_peak_rss_mib", round2(rss));
    Ok(with_costs(after.add_since(before, row), bytes))
}

/// Per-request latency of the fairness scenario's mock, and its workers.
const FAIRNESS_LATENCY_MS: u64 = 50;
const FAIRNESS_WORKERS: usize = 2;
/// Lines of the small job.
const FAIRNESS_SMALL: u64 = 10;
/// Time the big job runs alone before its rate is measured, and the length of each of the
/// two windows compared (alone, then with the small job).
const FAIRNESS_WARMUP: Duration = Duration::from_secs(3);
const FAIRNESS_WINDOW: Duration = Duration::from_secs(10);

/// A big job runs; a small one is submitted: how long the small one takes (submit to the
/// end of `wait`), and how much of its rate the big one loses in the window around it
/// compared with the window before.
pub(crate) async fn fairness(stack: &Stack, settings: &Settings) -> anyhow::Result<Row> {
    let latency = FAIRNESS_LATENCY_MS.to_string();
    let mock = Mock::try_start(0, &["--latency-ms", &latency])?;
    let mut fleet = FleetRun::new(stack, "fairness", &mock.url, DEFAULT_IN_FLIGHT)?;
    let res = drive_fairness(stack, &mut fleet, &mock, settings.fairness_lines).await;
    fleet.cleanup().await;
    let _ = procs::stop_mock(mock).await;
    res
}

async fn drive_fairness(stack: &Stack, fleet: &mut FleetRun<'_>, mock: &Mock, lines: u64) -> anyhow::Result<Row> {
    let (big_input, small_input) = (fleet.dir.join("big.jsonl"), fleet.dir.join("small.jsonl"));
    let small_output = fleet.dir.join("small-out.jsonl");
    workload::write_requests(&big_input, lines)?;
    workload::write_requests(&small_input, FAIRNESS_SMALL)?;
    // The big job is queued whole before the workers start: the windows then measure the
    // fleet working through a backlog, not racing the submission.
    let big = fleet.submit(&big_input).await;
    remove(&big_input);
    let big = big?;
    fleet.start_workers(FAIRNESS_WORKERS)?;
    fleet.wait_for_consumers(Duration::from_secs(30)).await?;
    tokio::time::sleep(FAIRNESS_WARMUP).await;

    let answered = |s: &MockStats| s.status(200);
    let stats0 = MockStats::of(mock)?;
    let t0 = Instant::now();
    tokio::time::sleep(FAIRNESS_WINDOW).await;
    let stats1 = MockStats::of(mock)?;
    let t1 = Instant::now();
    let rate_alone = (answered(&stats1) - answered(&stats0)) as f64 / (t1 - t0).as_secs_f64();

    let small = fleet.submit(&small_input).await?;
    let (summary, _) = fleet.wait(&small.job_id, &small_output, Duration::from_secs(120)).await?;
    let small_s = t1.elapsed().as_secs_f64();
    let small_ok = summary["counts"]["succeeded"].as_u64().unwrap_or(0);
    if let Some(rest) = FAIRNESS_WINDOW.checked_sub(t1.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    let stats2 = MockStats::of(mock)?;
    let window2_s = t1.elapsed().as_secs_f64();
    let big_during = (answered(&stats2) - answered(&stats1)).saturating_sub(small_ok);
    let rate_during = big_during as f64 / window2_s;
    let job_queue = fleet.topology().job_items_queue(PROVIDER, &big.job_id);
    let backlog = stack.queue_state(&job_queue).await?.map_or(0, |(ready, _)| ready);
    fleet.stop_workers().await?;
    remove(&small_input);
    remove(&small_output);

    let loss = 1.0 - rate_during / rate_alone;
    let mut figure = format!(
        "small job in {small_s:.1} s (target < 5 s); big job {}/s alone, {}/s beside it: {:.1}% loss (target < 5%)",
        thousands(rate_alone.round() as u64),
        thousands(rate_during.round() as u64),
        loss * 100.0
    );
    if small_ok != FAIRNESS_SMALL {
        figure.push_str(&format!("; only {small_ok} of {FAIRNESS_SMALL} small items succeeded"));
    }
    if backlog == 0 {
        figure.push_str("; the big job ran dry, submit more");
    }
    let row = Row {
        scenario: format!(
            "fairness ({} + {FAIRNESS_SMALL} lines, {FAIRNESS_WORKERS} workers, {FAIRNESS_LATENCY_MS} ms)",
            thousands(lines)
        ),
        items: big_during + small_ok,
        wall_s: window2_s,
        items_per_s: rate_during,
        worker_cpu_s_per_1k: None,
        worker_peak_rss_mib: None,
        // The fairness row measures shares, not costs.
        broker_cpu_us_per_item: None,
        worker_cpu_us_per_item: None,
        broker_bytes_per_item: None,
        figure,
        targets_met: Some(small_s < 5.0 && loss < 0.05 && small_ok == FAIRNESS_SMALL && backlog > 0),
        details: Default::default(),
    }
    .detail("small_job_s", round2(small_s))
    .detail("big_rate_alone_per_s", rate_alone.round())
    .detail("big_rate_beside_small_per_s", rate_during.round())
    .detail("big_throughput_loss", (loss * 10_000.0).round() / 10_000.0)
    .detail("big_backlog_at_end", backlog);
    Ok(row)
}
