//! Child processes the benchmark starts and what it measures of them: a kill-on-drop
//! process handle, CPU time and peak RSS read from `/proc`, signals sent with the `kill`
//! command, the mock provider (its banner and `/stats`), and one-shot commands timed by
//! `/usr/bin/time`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// GNU time, which reports a child's peak RSS and CPU time (`apt-get install time`).
const GNU_TIME: &str = "/usr/bin/time";

/// CPU time and peak resident memory of a process.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// User plus system CPU seconds.
    pub cpu_s: f64,
    /// Peak resident set size (`VmHWM`), KiB.
    pub peak_rss_kib: u64,
}

impl Usage {
    /// Peak RSS in MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        self.peak_rss_kib as f64 / 1024.0
    }
}

/// Clock ticks per second of `/proc/<pid>/stat` times (`getconf CLK_TCK`, usually 100).
fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Usage of process `pid` (`"self"` for this one) so far, from `/proc`.
pub fn read_usage(pid: &str) -> anyhow::Result<Usage> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count fields from
    // the last ')'. Field 3 is then index 0, utime (14) index 11, stime (15) index 12.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("malformed stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields.get(i).context("short stat")?.parse::<u64>().context("stat field is not a number")? as f64)
    };
    let cpu_s = (ticks(11)? + ticks(12)?) / clock_ticks();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let peak_rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in status")?;
    Ok(Usage { cpu_s, peak_rss_kib })
}

/// CPU seconds (user + system) used so far by the local RabbitMQ: the `beam.smp` process
/// listening on the AMQP `port` (found with `ss -tlnp`; every `beam.smp` when none is
/// found, e.g. without the rights to see the owner), or `None` when it is not visible from
/// here. Only read, to show where the CPU went.
pub fn broker_cpu_s(port: u16) -> Option<f64> {
    if let Some(pid) = listener_pid(port) {
        return read_usage(&pid.to_string()).ok().map(|u| u.cpu_s);
    }
    let mut total = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim() == "beam.smp" {
            if let Ok(u) = read_usage(&pid) {
                *total.get_or_insert(0.0) += u.cpu_s;
            }
        }
    }
    total
}

/// The process listening on TCP `port` on this machine, if `ss` can tell.
fn listener_pid(port: u16) -> Option<u32> {
    let filter = format!("( sport = :{port} )");
    let out = std::process::Command::new("ss").args(["-tlnpH", &filter]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let pid = text.split("pid=").nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?;
    pid.parse().ok()
}

/// A long-running child process, killed when dropped so no run leaks processes.
pub struct Proc {
    child: Child,
    /// Name for messages (`worker bench-w1`, `mock-provider`).
    pub name: String,
    pid: u32,
}

impl Proc {
    /// Spawns `cmd` (which is set to kill on drop).
    pub fn spawn(cmd: &mut Command, name: &str) -> anyhow::Result<Proc> {
        let child = cmd.kill_on_drop(true).spawn().with_context(|| format!("cannot start {name}"))?;
        let pid = child.id().context("child exited at once")?;
        Ok(Proc { child, name: name.to_string(), pid })
    }

    /// Its CPU time and peak RSS so far.
    pub fn usage(&self) -> anyhow::Result<Usage> {
        read_usage(&self.pid.to_string()).with_context(|| format!("measuring {}", self.name))
    }

    /// `Some(status)` if it has exited.
    pub fn exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Sends a signal by name (`TERM`, `KILL`) with the `kill` command.
    pub fn signal(&self, sig: &str) -> anyhow::Result<()> {
        let status = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid.to_string())
            .status()
            .context("running kill")?;
        anyhow::ensure!(status.success(), "kill -{sig} {} failed", self.pid);
        Ok(())
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`. Returns the exit status.
    pub async fn stop(mut self, grace: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        self.signal("TERM")?;
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                eprintln!("bench: {} did not stop within {grace:?}; killing it", self.name);
                self.child.kill().await?;
                Ok(self.child.wait().await?)
            }
        }
    }
}

/// Answer counts of the mock provider (`GET /stats`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct MockStats {
    /// Requests received on the `/v1` routes.
    pub requests: u64,
    /// Answers by HTTP status (decimal string keys).
    #[serde(default)]
    pub by_status: BTreeMap<String, u64>,
    /// Requests being handled right now.
    #[serde(default)]
    pub in_flight: u64,
    /// Tokens the mock charged to admitted requests (with `--tpm`).
    #[serde(default)]
    pub tokens_admitted: u64,
}

impl MockStats {
    /// Answers with HTTP `status`.
    pub fn status(&self, status: u16) -> u64 {
        self.by_status.get(&status.to_string()).copied().unwrap_or(0)
    }
}

/// A running `mock-provider --port 0`.
pub struct Mock {
    pub proc: Proc,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Kept open so the mock never writes to a closed pipe.
    _stdout: Lines<BufReader<ChildStdout>>,
}

impl Mock {
    /// Starts the mock from `bin_dir` with extra knob flags and reads its address.
    pub async fn start(bin_dir: &Path, args: &[&str]) -> anyhow::Result<Mock> {
        let mut cmd = Command::new(bin_dir.join("mock-provider"));
        cmd.args(["--port", "0"]).args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
        let mut proc = Proc::spawn(&mut cmd, "mock-provider")?;
        let stdout = proc.child.stdout.take().context("mock stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let banner = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .context("mock-provider did not print its address within 10 s")??
            .context("mock-provider exited before printing its address")?;
        let url = banner
            .strip_prefix("mock-provider listening on ")
            .filter(|u| u.starts_with("http://"))
            .with_context(|| format!("unexpected mock-provider banner {banner:?}"))?
            .to_string();
        Ok(Mock { proc, url, _stdout: lines })
    }

    /// The mock's counters.
    pub async fn stats(&self, http: &reqwest::Client) -> anyhow::Result<MockStats> {
        Ok(http.get(format!("{}/stats", self.url)).send().await?.error_for_status()?.json().await?)
    }

    /// Stops the mock and returns its CPU use.
    pub async fn stop(self) -> anyhow::Result<Usage> {
        let usage = self.proc.usage()?;
        self.proc.stop(Duration::from_secs(5)).await?;
        Ok(usage)
    }
}

/// A finished short-lived command and what it cost.
#[derive(Debug)]
pub struct Timed {
    pub output: Output,
    /// Wall time from spawn to exit, seconds.
    pub wall_s: f64,
    /// CPU and peak RSS as reported by GNU time.
    pub usage: Usage,
}

impl Timed {
    /// Fails with the command's stderr unless it exited 0.
    pub fn ensure_success(&self, what: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.output.status.success(),
            "{what} failed ({}): {}",
            self.output.status,
            String::from_utf8_lossy(&self.output.stderr).trim()
        );
        Ok(())
    }
}

/// Runs `program args` to completion under GNU time (its report goes to `report`, so the
/// program's own stdout and stderr stay untouched).
pub async fn run_timed(program: &Path, args: &[&std::ffi::OsStr], report: PathBuf) -> anyhow::Result<Timed> {
    anyhow::ensure!(Path::new(GNU_TIME).exists(), "{GNU_TIME} is missing (apt-get install time)");
    let mut cmd = Command::new(GNU_TIME);
    cmd.arg("-o").arg(&report).args(["-f", "%M %U %S"]).arg(program).args(args).stdin(Stdio::null()).kill_on_drop(true);
    clear_fleet_env(&mut cmd);
    let started = Instant::now();
    let output = cmd.output().await.with_context(|| format!("running {}", program.display()))?;
    let wall_s = started.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&report).context("reading GNU time's report")?;
    let _ = std::fs::remove_file(&report);
    let usage = parse_time_report(&text).with_context(|| format!("unexpected GNU time report {text:?}"))?;
    Ok(Timed { output, wall_s, usage })
}

/// Parses the last line of a `%M %U %S` report (earlier lines may note a non-zero exit).
fn parse_time_report(text: &str) -> Option<Usage> {
    let last = text.lines().rev().find(|l| !l.trim().is_empty())?;
    let mut f = last.split_whitespace();
    let peak_rss_kib = f.next()?.parse().ok()?;
    let user: f64 = f.next()?.parse().ok()?;
    let sys: f64 = f.next()?.parse().ok()?;
    Some(Usage { cpu_s: user + sys, peak_rss_kib })
}

/// Removes inherited `FLEET*` variables: they would override the config file we write.
pub fn clear_fleet_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("FLEET") {
            cmd.env_remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_usage_is_readable() {
        let u = read_usage("self").unwrap();
        assert!(u.peak_rss_kib > 0);
        assert!(u.cpu_s >= 0.0);
    }

    #[test]
    fn time_report_parses_after_a_status_note() {
        let u = parse_time_report("Command exited with non-zero status 1\n20480 1.50 0.25\n").unwrap();
        assert_eq!(u.peak_rss_kib, 20480);
        assert!((u.cpu_s - 1.75).abs() < 1e-9);
    }
}
