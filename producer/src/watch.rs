//! `producer status JOB --watch`: the job's status, asked again every [`EVERY`] and redrawn
//! in place on a terminal (the previous lines are overwritten), until the job ends. On a
//! pipe, or with `--json`, each answer is printed as new lines instead.
//!
//! The text is laid out for an 80-column terminal ([`WIDTH`]): short lines of a few fields
//! each, every line cut to the width ([`compact`]). A line that wrapped would break the
//! redraw, which moves the cursor up by the number of lines drawn.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use fleet::wire::JobSummary;
use fleet::Config;

use crate::{inspect, status_diagnosis};

/// Time between two refreshes.
pub const EVERY: Duration = Duration::from_secs(2);

/// Columns every line drawn fits in.
pub const WIDTH: usize = 80;

/// Watches `job_id` until it ends (or a query fails).
pub async fn watch(cfg: &Config, job_id: &str, timeout: Duration, json: bool) -> anyhow::Result<()> {
    let in_place = !json && std::io::stdout().is_terminal();
    let mut drawn = 0;
    loop {
        let reply = inspect::status(cfg, job_id, timeout).await?;
        let stuck = status_diagnosis::diagnose(cfg, &reply.jobs).await?;
        let text = reply
            .jobs
            .iter()
            .zip(stuck.iter().map(Option::as_deref))
            .map(|(j, stuck)| render(j, stuck, json))
            .collect::<Vec<_>>()
            .join("\n");
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

fn render(job: &JobSummary, stuck: Option<&str>, json: bool) -> String {
    if json {
        let mut v = serde_json::to_value(job).expect("serializable");
        v["pending"] = job.counts.pending().into();
        if let Some(s) = stuck {
            v["stuck"] = s.into();
        }
        v.to_string()
    } else {
        compact(job, stuck, WIDTH)
    }
}

/// The job in short lines of at most `width` characters each: id and status; counts; rate,
/// eta and where pending items wait; money; the newest error; why it is stuck. Texts that
/// came off a queue (errors, names) have their control characters escaped, then are cut.
pub fn compact(job: &JobSummary, stuck: Option<&str>, width: usize) -> String {
    let c = &job.counts;
    let mut lines = vec![format!("{}  {}  provider={}", job.job_id, job.status, job.provider)];
    if let Some(m) = job.mode {
        lines[0].push_str(&format!("  mode={}", m.as_str()));
    }
    if let Some(r) = &job.reason {
        lines[0].push_str(&format!("  reason={r}"));
    }
    let pct = (c.finished() as f64 * 100.0 / c.total.max(1) as f64).floor();
    lines.push(format!("done {}/{} ({pct}%)  pending {}", c.finished(), c.total, c.pending()));
    lines.push(format!("ok {}  failed {}  cancelled {}  expired {}", c.succeeded, c.failed, c.cancelled, c.expired));
    let mut rate = format!("rate {:.1}/s", job.rate_per_s);
    if let Some(p) = &job.progress {
        match p.eta_s {
            Some(s) => rate.push_str(&format!("  eta {}", duration(s))),
            None => rate.push_str("  eta unknown"),
        }
        rate.push_str(&format!("  delayed {}  dead-lettered {}", p.in_delay_queues, p.dead_lettered));
        if p.cancelling {
            rate.push_str("  cancelling");
        }
    } else if job.dead_lettered > 0 {
        rate.push_str(&format!("  dead-lettered {}", job.dead_lettered));
    }
    lines.push(rate);
    if let Some(u) = &job.usage {
        let mut money = format!("cost {}", fleet::wire::money(u.cost));
        if let Some(cap) = u.max_cost {
            money.push_str(&format!(" of cap {cap}"));
        }
        money.push_str(&format!("  tokens {} in / {} out", u.input_tokens, u.output_tokens));
        lines.push(money);
    }
    if let Some((e, age)) = job.progress.as_ref().and_then(|p| p.last_error.as_ref().map(|e| (e, p.last_error_age_s))) {
        let age = age.map(|s| format!(" ({})", duration(s))).unwrap_or_default();
        lines.push(format!("last error{age}: {}", crate::dead::printable(e)));
    }
    if let Some(s) = stuck {
        lines.push(format!("stuck: {s}"));
    }
    lines.iter().map(|l| fit(&crate::dead::printable(l), width)).collect::<Vec<_>>().join("\n")
}

/// `s` cut to `width` characters, ending in `…` when cut.
fn fit(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_string();
    }
    let mut out: String = s.chars().take(width.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// `95` as `1m35s`, `7300` as `2h01m`.
fn duration(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet::wire::{JobCounts, JobProgress, JobStatus, JobUsage};

    fn job(progress: Option<JobProgress>) -> JobSummary {
        let big = u64::MAX / 2;
        JobSummary {
            job_id: "job_0123456789abcdef".into(),
            provider: "a-provider-with-a-rather-long-name-from-the-config".into(),
            mode: Some(fleet::batch::JobMode::Flex),
            status: JobStatus::InProgress,
            counts: JobCounts { total: big, succeeded: big / 2, failed: big / 8, cancelled: big / 8, expired: 12 },
            submitted_at_ms: 0,
            finished_at_ms: None,
            rate_per_s: 123_456.789,
            reason: Some("budget".into()),
            progress,
            usage: Some(JobUsage {
                input_tokens: u64::MAX,
                cached_input_tokens: 0,
                output_tokens: u64::MAX,
                cost: 1e12,
                unpriced_answers: 3,
                max_cost: Some(0.001),
            }),
            dead_lettered: 5,
            webhook: None,
        }
    }

    /// Every line of the watch fits 80 columns, whatever the figures and texts.
    #[test]
    fn every_line_fits_eighty_columns() {
        let progress = JobProgress {
            cancelling: true,
            in_delay_queues: u64::MAX,
            queued_or_in_flight: u64::MAX,
            provider_backlog: Some(u64::MAX),
            dead_lettered: u64::MAX,
            last_error: Some(format!("HTTP 503 {}\x1b[2J\n{}", "é".repeat(300), "x".repeat(300))),
            last_error_age_s: Some(u64::MAX),
            eta_s: Some(u64::MAX),
        };
        let stuck = status_diagnosis::no_worker_line("a-provider-with-a-rather-long-name-from-the-config");
        for (job, stuck) in [(job(Some(progress)), Some(stuck.as_str())), (job(None), None)] {
            let text = compact(&job, stuck, WIDTH);
            for line in text.lines() {
                assert!(line.chars().count() <= WIDTH, "{} columns: {line}", line.chars().count());
                assert!(!line.contains('\x1b'), "escaped: {line:?}");
            }
            assert!(text.contains("of cap 0.001"), "the cap as given: {text}");
        }
    }

    #[test]
    fn a_short_job_reads_whole() {
        let mut j = job(None);
        j.provider = "mock".into();
        j.reason = None;
        j.counts = JobCounts { total: 10, succeeded: 9, failed: 1, cancelled: 0, expired: 0 };
        j.status = JobStatus::Completed;
        j.usage = Some(JobUsage { input_tokens: 1200, output_tokens: 300, cost: 0.0123, ..JobUsage::default() });
        let text = compact(&j, None, WIDTH);
        assert!(
            text.starts_with("job_0123456789abcdef  completed  provider=mock  mode=flex\ndone 10/10 (100%)"),
            "{text}"
        );
        assert!(!text.contains('…'), "{text}");
        assert!(text.ends_with("cost 0.0123  tokens 1200 in / 300 out"), "{text}");
        assert_eq!(duration(95), "1m35s");
        assert_eq!(duration(7300), "2h01m");
    }
}
