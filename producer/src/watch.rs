//! `producer status JOB --watch`: the job's status, asked again every [`EVERY`] and redrawn
//! in place on a terminal (the previous lines are overwritten), until the job ends. On a
//! pipe, or with `--json`, each answer is printed as new lines instead.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use fleet::wire::JobSummary;
use fleet::Config;

use crate::inspect;

/// Time between two refreshes.
pub const EVERY: Duration = Duration::from_secs(2);

/// Watches `job_id` until it ends (or a query fails).
pub async fn watch(cfg: &Config, job_id: &str, timeout: Duration, json: bool) -> anyhow::Result<()> {
    let in_place = !json && std::io::stdout().is_terminal();
    let mut drawn = 0;
    loop {
        let reply = inspect::status(cfg, job_id, timeout).await?;
        let text = reply.jobs.iter().map(|j| render(j, json)).collect::<Vec<_>>().join("\n");
        let mut out = std::io::stdout().lock();
        if in_place && drawn > 0 {
            // Up to the first line drawn last time, and clear from there to the end.
            write!(out, "\x1b[{drawn}F\x1b[J")?;
        }
        writeln!(out, "{text}")?;
        out.flush()?;
        drawn = text.lines().count();
        if reply.jobs.iter().all(|j| j.status.is_ended()) {
            return Ok(());
        }
        tokio::time::sleep(EVERY).await;
    }
}

fn render(job: &JobSummary, json: bool) -> String {
    if json {
        let mut v = serde_json::to_value(job).expect("serializable");
        v["pending"] = job.counts.pending().into();
        v.to_string()
    } else {
        inspect::render(job)
    }
}
