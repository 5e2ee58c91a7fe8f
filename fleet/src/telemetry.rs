//! Tracing setup shared by the binaries: human-readable logs on stderr by default, JSON
//! lines with `--log-json`; the level comes from `RUST_LOG` (default `info`).
//!
//! lapin's own log lines are off whatever the global level: it logs at ERROR every channel
//! the broker closes (a standby tracker's lock attempt, a passive declare of a queue that
//! does not exist yet) and every clean connection close, and it returns each real error to
//! the code that called it, which logs what it decided. Only a directive naming lapin
//! shows them (`RUST_LOG=info,lapin=debug`).

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber (once; later calls are ignored).
pub fn init(json: bool) {
    let spec = filter_spec(std::env::var("RUST_LOG").ok().as_deref());
    let filter = EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new(filter_spec(None)));
    // Colours only on a terminal: a log file or a collector gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    // A second init (tests calling `run` twice in one process) is harmless: ignore it.
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}

/// The filter for a `RUST_LOG` value (default `info`): lapin off unless a directive names it.
fn filter_spec(rust_log: Option<&str>) -> String {
    let spec = rust_log.map(str::trim).filter(|s| !s.is_empty()).unwrap_or("info");
    if spec.contains("lapin") {
        spec.to_string()
    } else {
        format!("{spec},lapin=off")
    }
}

#[cfg(test)]
mod tests {
    use super::filter_spec;

    #[test]
    fn lapin_stays_off_unless_asked_for_by_name() {
        assert_eq!(filter_spec(None), "info,lapin=off");
        assert_eq!(filter_spec(Some("")), "info,lapin=off");
        assert_eq!(filter_spec(Some("info")), "info,lapin=off");
        assert_eq!(filter_spec(Some("debug,worker=trace")), "debug,worker=trace,lapin=off");
        assert_eq!(filter_spec(Some("info,lapin=debug")), "info,lapin=debug");
    }
}
