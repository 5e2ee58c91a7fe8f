//! Running `producer` against a fleet's config file, and submitting a job with it.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;

use crate::{bin, Proc};

/// `producer --config CONFIG --quiet`, to which the caller adds the subcommand.
pub fn producer_command(config: &Path) -> Command {
    let mut cmd = Command::new(bin("producer"));
    cmd.arg("--config").arg(config).arg("--quiet");
    cmd
}

/// A job `producer submit --json` submitted: what it printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    /// The job's id, as `producer wait` and `producer status` take it.
    pub job_id: String,
    /// How many items the job has.
    pub total: u64,
}

impl Submitted {
    /// Reads what `producer submit --json` printed.
    pub fn from_json(stdout: &[u8]) -> anyhow::Result<Submitted> {
        let v: serde_json::Value = serde_json::from_slice(stdout).context("producer submit --json printed no JSON")?;
        let job_id = v["job_id"].as_str().context("producer submit --json printed no job_id")?.to_string();
        let total = v["total"].as_u64().context("producer submit --json printed no total")?;
        Ok(Submitted { job_id, total })
    }
}

/// Submits `file` to `provider` with `producer submit FILE --provider PROVIDER --json
/// EXTRA_ARGS` on the fleet of `config`, and waits for it to finish submitting.
pub fn submit(config: &Path, file: &Path, provider: &str, extra_args: &[&str]) -> anyhow::Result<Submitted> {
    submit_watched(config, file, provider, extra_args, |_| {})
}

/// [`submit`], calling `watch` with the running producer every 100 ms until it exits (the
/// chaos run samples its memory so).
pub fn submit_watched(
    config: &Path,
    file: &Path,
    provider: &str,
    extra_args: &[&str],
    mut watch: impl FnMut(&Proc),
) -> anyhow::Result<Submitted> {
    let mut cmd = producer_command(config);
    cmd.arg("submit").arg(file).args(["--provider", provider, "--json"]).args(extra_args);
    let mut p = Proc::spawn(cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()), "producer submit")?;
    // Drained on threads of their own, so a producer that writes much cannot block on a
    // full pipe while this waits for it to exit.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(p.child.stdout.take().map(|o| Box::new(o) as _));
    let stderr = drain(p.child.stderr.take().map(|e| Box::new(e) as _));
    let status = loop {
        watch(&p);
        if let Some(status) = p.wait_timeout(Duration::from_millis(100))? {
            break status;
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    anyhow::ensure!(
        status.success(),
        "producer submit {} exited with {status}: {}",
        file.display(),
        String::from_utf8_lossy(&stderr).trim()
    );
    Submitted::from_json(&stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_submit_json_printed_is_read() {
        let s = Submitted::from_json(br#"{"job_id":"job-1","total":3,"mode":"online"}"#).unwrap();
        assert_eq!(s, Submitted { job_id: "job-1".into(), total: 3 });
        assert!(Submitted::from_json(b"submitted job-1").is_err());
    }
}
