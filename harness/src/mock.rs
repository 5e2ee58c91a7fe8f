//! The mock provider (`mock-provider`), started on a port of its own and read through its
//! `/stats`.

use std::io::{BufRead, BufReader};
use std::process::{ChildStdout, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;

use crate::{bin, http, Proc};

/// How long the mock may take to print its address.
const BANNER_TIMEOUT: Duration = Duration::from_secs(10);

/// A running mock provider.
pub struct Mock {
    /// The mock's process (killed when the mock is dropped).
    pub proc: Proc,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Kept open so the mock never writes to a closed pipe.
    _stdout: BufReader<ChildStdout>,
}

impl Mock {
    /// Starts `mock-provider --port 0` with extra knob flags (panics if it cannot).
    pub fn start(args: &[&str]) -> Mock {
        Mock::start_on(0, args)
    }

    /// Starts the mock on a given port (e.g. to replace a mock at the same address).
    pub fn start_on(port: u16, args: &[&str]) -> Mock {
        Mock::try_start(port, args).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Starts `mock-provider --port PORT ARGS` (port 0: a free one) and reads the address it
    /// prints.
    pub fn try_start(port: u16, args: &[&str]) -> anyhow::Result<Mock> {
        let mut cmd = Command::new(bin("mock-provider"));
        cmd.args(["--port", &port.to_string()]).args(args).stdin(Stdio::null()).stdout(Stdio::piped());
        let mut proc = Proc::spawn(cmd.stderr(Stdio::null()), "mock-provider")?;
        let mut stdout = BufReader::new(proc.child.stdout.take().context("mock stdout")?);
        // Read on a thread, so a mock that prints nothing cannot hang the caller.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let res = stdout.read_line(&mut line);
            let _ = tx.send((res, line, stdout));
        });
        let (res, banner, stdout) = rx
            .recv_timeout(BANNER_TIMEOUT)
            .map_err(|_| anyhow::anyhow!("mock-provider did not print its address within {BANNER_TIMEOUT:?}"))?;
        anyhow::ensure!(
            res.context("reading the mock's stdout")? > 0,
            "mock-provider exited before printing its address"
        );
        let url = banner.trim().rsplit(' ').next().unwrap_or("").to_string();
        anyhow::ensure!(url.starts_with("http://"), "unexpected mock-provider banner {banner:?}");
        Ok(Mock { proc, url, _stdout: stdout })
    }

    /// The port the mock listens on.
    pub fn port(&self) -> u16 {
        self.url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port in url")
    }

    /// The mock's `/stats`. Async code may call it too (see [`crate::http`]).
    pub fn try_stats(&self) -> anyhow::Result<Value> {
        http::get_json(&format!("{}/stats", self.url), &[])
    }

    /// [`Mock::try_stats`], panicking when it fails.
    pub fn stats(&self) -> Value {
        self.try_stats().unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Count of responses with `status` in `/stats`.
    pub fn status_count(&self, status: u16) -> u64 {
        self.stats()["by_status"][status.to_string()].as_u64().unwrap_or(0)
    }

    /// Replaces the keys the mock accepts (`--valid-keys`) while it runs.
    pub fn set_valid_keys(&self, keys: &[&str]) {
        let url = format!("{}/admin/valid-keys", self.url);
        http::put_json(&url, &serde_json::json!(keys)).unwrap_or_else(|e| panic!("{e:#}"));
    }
}
