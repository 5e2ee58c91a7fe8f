//! The batch HTTP API against the CLI (issue 22): the same file from upload to downloaded
//! output through `producer serve` (uploaded and downloaded with `curl`, the batch created
//! and polled as an SDK would), then through `producer submit` + `producer wait`, on the
//! same fleet in the same run; and the server's peak RSS while it streams a large file in
//! and its output out.
//!
//! Goals (the issue's): the API within 1.2 times the CLI's wall time; the server under
//! 100 MiB of peak RSS for a 200 MB file, since both directions are streamed.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use harness::{Mock, Proc};
use serde_json::Value;

use crate::fleet_run::FleetRun;
use crate::procs;
use crate::stack::Stack;
use crate::table::{thousands, Row};
use crate::workload;

/// Workers of the API scenarios.
const WORKERS: usize = 2;
/// Requests in flight per worker (the other scenarios' default).
const IN_FLIGHT: u16 = 256;
/// The API's wall time may be at most this many times the CLI's.
const MAX_RATIO: f64 = 1.2;
/// The server's peak RSS goal, MiB.
const MAX_SERVER_RSS_MIB: f64 = 100.0;
/// The bearer key the benchmark's server accepts (not a secret: a local server).
const KEY: &str = "sk-bench-api-key-0123456789";
/// How often the batch is polled, as a client would.
const POLL: Duration = Duration::from_millis(250);
/// Longest a benchmark job may take.
const JOB_TIMEOUT: Duration = Duration::from_secs(1800);

/// What one api row measures.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Variant {
    /// The same file of this many lines through the API and through the CLI.
    VersusCli(u64),
    /// A file of about this many MiB through the API alone.
    LargeUpload(u64),
}

/// One row of the api scenario on a fleet of its own (2 workers, a zero-latency mock).
pub(crate) async fn run(stack: &Stack, variant: Variant) -> anyhow::Result<Row> {
    let mock = Mock::try_start(0, &[])?;
    let mut fleet = FleetRun::new(stack, "api", &mock.url, IN_FLIGHT)?;
    let res = async {
        fleet.start_workers(WORKERS)?;
        fleet.wait_for_consumers(Duration::from_secs(60)).await?;
        match variant {
            Variant::VersusCli(lines) => drive_versus(&mut fleet, lines).await,
            Variant::LargeUpload(mib) => drive_large(&mut fleet, mib).await,
        }
    }
    .await;
    fleet.cleanup().await;
    let _ = procs::stop_mock(mock).await;
    res
}

async fn drive_versus(fleet: &mut FleetRun<'_>, lines: u64) -> anyhow::Result<Row> {
    let input = fleet.dir.join("input.jsonl");
    workload::write_requests(&input, lines)?;

    // The CLI: submit, then wait for every result (what `submit --wait` does).
    let started = Instant::now();
    let submitted = fleet.submit(&input).await?;
    let cli_out = fleet.dir.join("cli-output.jsonl");
    fleet.wait(&submitted.job_id, &cli_out, JOB_TIMEOUT).await?;
    let cli_s = started.elapsed().as_secs_f64();
    anyhow::ensure!(count_lines(&cli_out)? == lines, "the CLI's output is not {lines} lines");

    // The API: upload, create, poll until done, download.
    let server = Server::start(fleet, lines)?;
    let api = server.run_batch(&input, &fleet.dir.join("api-output.jsonl")).await;
    let usage = procs::usage_of(&server.proc);
    server.stop().await;
    let api = api?;
    anyhow::ensure!(api.output_lines == lines, "the API's output has {} of {lines} lines", api.output_lines);
    let rss = usage?.peak_rss_mib();
    let ratio = api.wall_s / cli_s;
    let figure = format!(
        "API {:.1} s vs CLI {cli_s:.1} s = {ratio:.2}x (target <= {MAX_RATIO}x); server peak RSS {rss:.0} MiB",
        api.wall_s
    );
    Ok(api
        .row(format!("api vs submit+wait ({} lines)", thousands(lines)), lines, figure, ratio <= MAX_RATIO)
        .detail("cli_wall_s", round2(cli_s))
        .detail("api_upload_s", round2(api.upload_s))
        .detail("api_download_s", round2(api.download_s))
        .detail("server_peak_rss_mib", round2(rss)))
}

/// A file of about `mib` MiB through the API alone: the server's peak RSS while it takes
/// the upload, the job runs and the output is downloaded.
async fn drive_large(fleet: &mut FleetRun<'_>, mib: u64) -> anyhow::Result<Row> {
    let input = fleet.dir.join("large.jsonl");
    let lines = workload::write_padded_requests(&input, mib << 20)?;
    let bytes = std::fs::metadata(&input)?.len();
    let server = Server::start(fleet, lines)?;
    let api = server.run_batch(&input, &fleet.dir.join("large-output.jsonl")).await;
    let usage = procs::usage_of(&server.proc);
    server.stop().await;
    let api = api?;
    anyhow::ensure!(api.output_lines == lines, "the output has {} of {lines} lines", api.output_lines);
    let rss = usage?.peak_rss_mib();
    let mb = bytes as f64 / 1e6;
    let figure = format!(
        "server peak RSS {rss:.0} MiB (target < {MAX_SERVER_RSS_MIB:.0}); upload {:.1} s, download {:.1} s",
        api.upload_s, api.download_s
    );
    Ok(api
        .row(format!("api {mb:.0} MB upload + download"), lines, figure, rss < MAX_SERVER_RSS_MIB)
        .detail("input_bytes", bytes)
        .detail("server_peak_rss_mib", round2(rss))
        .detail("api_upload_s", round2(api.upload_s))
        .detail("api_download_s", round2(api.download_s)))
}

/// What one batch through the API took.
struct ApiRun {
    wall_s: f64,
    upload_s: f64,
    download_s: f64,
    output_lines: u64,
}

impl ApiRun {
    /// The row of this run: `items` over its wall time.
    fn row(&self, scenario: String, items: u64, figure: String, met: bool) -> Row {
        Row::measured(scenario, items, self.wall_s, items as f64 / self.wall_s, figure, Some(met))
    }
}

/// One `producer serve` of the fleet.
struct Server {
    proc: Proc,
    url: String,
    http: reqwest::Client,
}

impl Server {
    /// Starts `producer serve` on a free port, taking files of up to `lines` lines, and
    /// waits until it answers.
    fn start(fleet: &FleetRun<'_>, lines: u64) -> anyhow::Result<Server> {
        let port = harness::free_port();
        let mut cmd = Command::new(harness::bin("producer"));
        procs::clear_fleet_env(&mut cmd);
        cmd.arg("--config")
            .arg(fleet.config())
            .arg("serve")
            .env("FLEET__API__LISTEN", format!("127.0.0.1:{port}"))
            .env("FLEET__API__KEY_ENVS", "BENCH_API_KEY")
            .env("FLEET__API__MAX_FILE_LINES", lines.max(1).to_string())
            // Online, as `submit` runs the same file: the bench's `mock` has a batch API (the
            // built-in mock's `batch = true`), which `api.mode = "auto"` would use for 24 h.
            .env("FLEET__API__MODE", "online")
            .env("BENCH_API_KEY", KEY);
        let proc = Proc::spawn_logged(&mut cmd, "producer serve", &fleet.dir.join("serve.log"))?;
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let started = Instant::now();
        while !curl_ok(&[&format!("{url}/metrics")]) {
            anyhow::ensure!(started.elapsed() < Duration::from_secs(30), "producer serve does not answer on {url}");
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Server { proc, url, http })
    }

    /// Upload, create, poll until the batch ends, download its output.
    async fn run_batch(&self, input: &Path, output: &Path) -> anyhow::Result<ApiRun> {
        let started = Instant::now();
        let auth = format!("Authorization: Bearer {KEY}");
        let file = curl_json(&[
            "-H",
            &auth,
            "-F",
            "purpose=batch",
            "-F",
            &format!("file=@{}", input.display()),
            &format!("{}/v1/files", self.url),
        ])?;
        let upload_s = started.elapsed().as_secs_f64();
        let file_id = file["id"].as_str().with_context(|| format!("upload answered {file}"))?;
        let batch: Value = self
            .http
            .post(format!("{}/v1/batches", self.url))
            .bearer_auth(KEY)
            .json(&serde_json::json!({
                "input_file_id": file_id, "endpoint": workload::CHAT_URL, "completion_window": "24h"
            }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let id = batch["id"].as_str().with_context(|| format!("batches.create answered {batch}"))?;
        let done = loop {
            anyhow::ensure!(started.elapsed() < JOB_TIMEOUT, "batch {id} not done after {JOB_TIMEOUT:?}");
            let b: Value = self
                .http
                .get(format!("{}/v1/batches/{id}", self.url))
                .bearer_auth(KEY)
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            match b["status"].as_str() {
                Some("completed") => break b,
                Some("failed" | "expired" | "cancelled") => anyhow::bail!("batch {id} ended {b}"),
                _ => tokio::time::sleep(POLL).await,
            }
        };
        let output_id = done["output_file_id"].as_str().with_context(|| format!("no output file in {done}"))?;
        let download = Instant::now();
        let out = Command::new("curl")
            .args(["-sS", "-f", "-H", &auth, "-o"])
            .arg(output)
            .arg(format!("{}/v1/files/{output_id}/content", self.url))
            .status()?;
        anyhow::ensure!(out.success(), "downloading {output_id} failed: {out}");
        let download_s = download.elapsed().as_secs_f64();
        Ok(ApiRun { wall_s: started.elapsed().as_secs_f64(), upload_s, download_s, output_lines: count_lines(output)? })
    }

    async fn stop(self) {
        if let Err(e) = procs::stop(self.proc, Duration::from_secs(10)).await {
            eprintln!("bench: stopping producer serve: {e:#}");
        }
    }
}

/// `curl -sS -f ARGS` printed JSON.
fn curl_json(args: &[&str]) -> anyhow::Result<Value> {
    let out = Command::new("curl").args(["-sS", "-f"]).args(args).output().context("running curl")?;
    anyhow::ensure!(out.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).context("curl printed no JSON")
}

fn curl_ok(args: &[&str]) -> bool {
    Command::new("curl").args(["-s", "-f", "-o", "/dev/null"]).args(args).status().is_ok_and(|s| s.success())
}

fn count_lines(path: &Path) -> anyhow::Result<u64> {
    use std::io::BufRead;
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    Ok(std::io::BufReader::new(file).lines().map_while(Result::ok).filter(|l| !l.is_empty()).count() as u64)
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}
