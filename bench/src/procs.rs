//! What the benchmark measures of its processes (started with the `harness` crate): CPU
//! time and peak RSS read from `/proc`, the mock provider's counters, and one-shot
//! commands timed by `/usr/bin/time`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use harness::{Mock, Proc};
use serde::Deserialize;

/// GNU time, which reports a child's peak RSS and CPU time (`apt-get install time`).
const GNU_TIME: &str = "/usr/bin/time";

/// CPU time and peak resident memory of a process.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Usage {
    /// User plus system CPU seconds.
    pub cpu_s: f64,
    /// Peak resident set size (`VmHWM`), KiB.
    pub peak_rss_kib: u64,
}

impl Usage {
    /// Peak RSS in MiB.
    pub(crate) fn peak_rss_mib(&self) -> f64 {
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
pub(crate) fn read_usage(pid: &str) -> anyhow::Result<Usage> {
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
pub(crate) fn broker_cpu_s(port: u16) -> Option<f64> {
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

/// CPU time and peak RSS of a running process so far.
pub(crate) fn usage_of(proc: &Proc) -> anyhow::Result<Usage> {
    read_usage(&proc.pid().to_string()).with_context(|| format!("measuring {}", proc.name))
}

/// Stops `proc` (SIGTERM, SIGKILL after `grace`) off the async threads.
pub(crate) async fn stop(proc: Proc, grace: Duration) -> anyhow::Result<ExitStatus> {
    tokio::task::spawn_blocking(move || proc.stop(grace)).await?
}

/// Answer counts of the mock provider (`GET /stats`).
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct MockStats {
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
    /// The mock's counters now (one short request on loopback).
    pub(crate) fn of(mock: &Mock) -> anyhow::Result<MockStats> {
        Ok(serde_json::from_value(mock.try_stats()?)?)
    }

    /// Answers with HTTP `status`.
    pub(crate) fn status(&self, status: u16) -> u64 {
        self.by_status.get(&status.to_string()).copied().unwrap_or(0)
    }
}

/// Stops the mock and returns its CPU use.
pub(crate) async fn stop_mock(mock: Mock) -> anyhow::Result<Usage> {
    let usage = usage_of(&mock.proc)?;
    stop(mock.proc, Duration::from_secs(5)).await?;
    Ok(usage)
}

/// A finished short-lived command and what it cost.
#[derive(Debug)]
pub(crate) struct Timed {
    pub output: Output,
    /// Wall time from spawn to exit, seconds.
    pub wall_s: f64,
    /// CPU and peak RSS as reported by GNU time.
    pub usage: Usage,
}

impl Timed {
    /// Fails with the command's stderr unless it exited 0.
    pub(crate) fn ensure_success(&self, what: &str) -> anyhow::Result<()> {
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
pub(crate) async fn run_timed(program: &Path, args: &[&std::ffi::OsStr], report: PathBuf) -> anyhow::Result<Timed> {
    anyhow::ensure!(Path::new(GNU_TIME).exists(), "{GNU_TIME} is missing (apt-get install time)");
    let mut cmd = Command::new(GNU_TIME);
    cmd.arg("-o").arg(&report).args(["-f", "%M %U %S"]).arg(program).args(args).stdin(Stdio::null());
    clear_fleet_env(&mut cmd);
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
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
pub(crate) fn clear_fleet_env(cmd: &mut Command) {
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
