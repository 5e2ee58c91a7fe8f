//! A child process that is killed when dropped, so no test or benchmark leaks processes.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// A running child process, killed (SIGKILL) when dropped if it still runs.
pub struct Proc {
    /// The process, for its pipes and exit status.
    pub child: Child,
    /// Name for messages (`w1`, `worker bench-w1`, `mock-provider`).
    pub name: String,
}

impl Proc {
    /// Spawns `cmd`.
    pub fn spawn(cmd: &mut Command, name: &str) -> anyhow::Result<Proc> {
        let child = cmd.spawn().with_context(|| format!("cannot start {name}"))?;
        Ok(Proc { child, name: name.to_string() })
    }

    /// Spawns `cmd` with no stdin, stdout discarded and stderr (where the fleet's binaries
    /// log) written to a new file `log`.
    pub fn spawn_logged(cmd: &mut Command, name: &str, log: &Path) -> anyhow::Result<Proc> {
        let log = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        Proc::spawn(cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log), name)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`TERM`, `KILL`, `STOP`, `CONT`) with the `kill` command.
    pub fn try_signal(&self, sig: &str) -> anyhow::Result<()> {
        let status =
            Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status().context("running kill")?;
        anyhow::ensure!(status.success(), "kill -{sig} {} ({}) failed", self.pid(), self.name);
        Ok(())
    }

    /// [`Proc::try_signal`], panicking when it fails.
    pub fn signal(&self, sig: &str) {
        self.try_signal(sig).unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// Waits for the process to exit, at most `timeout`; `None` if it still runs.
    pub fn wait_timeout(&mut self, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if start.elapsed() >= timeout {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the process to exit, at most `timeout`; returns its exit code (`None` when
    /// it still runs or a signal ended it).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        self.wait_timeout(timeout).expect("try_wait").and_then(|s| s.code())
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`. Returns the exit status.
    pub fn stop(mut self, grace: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        self.try_signal("TERM")?;
        if let Some(status) = self.wait_timeout(grace)? {
            return Ok(status);
        }
        eprintln!("{} did not stop within {grace:?}; killing it", self.name);
        self.child.kill()?;
        Ok(self.child.wait()?)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
