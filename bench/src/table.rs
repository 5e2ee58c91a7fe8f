//! The report: one row per measured configuration, rendered as a markdown table for the
//! terminal and serialised as JSON for `.run/bench.json`.

use serde::Serialize;

/// One measured configuration.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Row {
    /// Scenario and variant, e.g. `overhead (2 workers)`.
    pub scenario: String,
    /// Items (or lines, or successful requests) the figures are about.
    pub items: u64,
    /// Measured wall time, seconds.
    pub wall_s: f64,
    pub items_per_s: f64,
    /// Worker CPU seconds (all workers together) per 1,000 items; `None` when no worker
    /// ran. For the reference, the bench process's own.
    pub worker_cpu_s_per_1k: Option<f64>,
    /// Largest peak RSS of one worker, MiB (for the reference, the bench process's own).
    pub worker_peak_rss_mib: Option<f64>,
    /// RabbitMQ's CPU (user + system of its `beam.smp`) per item, microseconds. The broker
    /// is shared: other clients' work during the run counts too.
    pub broker_cpu_us_per_item: Option<f64>,
    /// Worker CPU per item, microseconds (all workers; for the reference, the bench process).
    pub worker_cpu_us_per_item: Option<f64>,
    /// Bytes between the measured processes and the broker, both ways, per item (counted at
    /// the client sockets, see `traffic.rs`).
    pub broker_bytes_per_item: Option<f64>,
    /// The scenario's own figure, in words, with its target.
    pub figure: String,
    /// Whether the scenario's targets were met (`None` when it has none or failed).
    pub targets_met: Option<bool>,
    /// The scenario's raw numbers (rates, counts, producer usage, mock CPU, ...).
    pub details: serde_json::Map<String, serde_json::Value>,
}

impl Row {
    /// A row with its throughput and figure, and no cost columns (a scenario that sets
    /// them does so on the row, or through `CpuMark::add_since` / `with_costs`).
    pub(crate) fn measured(
        scenario: String,
        items: u64,
        wall_s: f64,
        items_per_s: f64,
        figure: String,
        targets_met: Option<bool>,
    ) -> Row {
        Row {
            scenario,
            items,
            wall_s,
            items_per_s,
            worker_cpu_s_per_1k: None,
            worker_peak_rss_mib: None,
            broker_cpu_us_per_item: None,
            worker_cpu_us_per_item: None,
            broker_bytes_per_item: None,
            figure,
            targets_met,
            details: Default::default(),
        }
    }

    /// A row for a scenario that could not be measured.
    pub(crate) fn failed(scenario: &str, error: &anyhow::Error) -> Row {
        Row::measured(scenario.to_string(), 0, 0.0, 0.0, format!("FAILED: {error:#}"), None)
    }

    /// Adds a raw number to `details`.
    pub(crate) fn detail(mut self, key: &str, value: impl Into<serde_json::Value>) -> Row {
        self.details.insert(key.to_string(), value.into());
        self
    }
}

const HEADERS: [&str; 9] = [
    "scenario",
    "items",
    "wall s",
    "items/s",
    "broker CPU µs/item",
    "worker CPU µs/item",
    "broker bytes/item",
    "worker peak RSS MiB",
    "figure",
];

/// The rows as a markdown table with aligned columns.
pub(crate) fn render(rows: &[Row]) -> String {
    let cells: Vec<[String; 9]> = rows
        .iter()
        .map(|r| {
            [
                r.scenario.clone(),
                thousands(r.items),
                format!("{:.1}", r.wall_s),
                thousands(r.items_per_s.round() as u64),
                optional(r.broker_cpu_us_per_item, 0),
                optional(r.worker_cpu_us_per_item, 0),
                optional(r.broker_bytes_per_item.map(|b| b.round()), 0),
                optional(r.worker_peak_rss_mib, 1),
                match r.targets_met {
                    Some(true) => format!("{} [ok]", r.figure),
                    Some(false) => format!("{} [MISSED]", r.figure),
                    None => r.figure.clone(),
                },
            ]
        })
        .collect();
    let mut widths = HEADERS.map(|h| h.chars().count());
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    // Text columns are left-aligned, numbers right-aligned.
    let numeric = [false, true, true, true, true, true, true, true, false];
    let line = |cells: &[String]| -> String {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .zip(numeric)
            .map(|((c, w), right)| if right { format!("{c:>w$}") } else { format!("{c:<w$}") })
            .collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut out = line(&HEADERS.map(String::from));
    let rule: Vec<String> = widths
        .iter()
        .zip(numeric)
        .map(|(w, right)| if right { format!("{}:", "-".repeat(w - 1)) } else { "-".repeat(*w) })
        .collect();
    out.push_str(&format!("| {} |\n", rule.join(" | ")));
    for row in &cells {
        out.push_str(&line(row));
    }
    out
}

/// `1234567` as `1,234,567`.
pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn optional(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.decimals$}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, met: Option<bool>) -> Row {
        Row {
            scenario: name.into(),
            items: 50_000,
            wall_s: 12.345,
            items_per_s: 4050.4,
            worker_cpu_s_per_1k: Some(0.1234),
            worker_peak_rss_mib: None,
            broker_cpu_us_per_item: Some(167.4),
            worker_cpu_us_per_item: Some(123.4),
            broker_bytes_per_item: Some(1234.5),
            figure: "81% of 5,000/s".into(),
            targets_met: met,
            details: Default::default(),
        }
    }

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn table_is_aligned_markdown() {
        let out = render(&[row("latency", Some(true)), row("x", Some(false))]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4);
        let width = lines[0].chars().count();
        assert!(lines.iter().all(|l| l.chars().count() == width), "{out}");
        assert!(lines[1].starts_with("| ---"));
        assert!(lines[2].contains("| 50,000 |"));
        assert!(lines[2].contains(" 12.3 "));
        assert!(lines[2].contains(" 4,050 "));
        assert!(lines[2].contains(" 167 ") && lines[2].contains(" 123 ") && lines[2].contains(" 1235 "));
        assert!(lines[2].contains(" - "));
        assert!(lines[2].ends_with("81% of 5,000/s [ok]     |"), "{}", lines[2]);
        assert!(lines[3].contains("[MISSED]"));
    }
}
