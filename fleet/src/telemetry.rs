//! Tracing setup shared by the binaries: human-readable logs on stderr by default, JSON
//! lines with `--log-json`; the level comes from `RUST_LOG` (default `info`).
//!
//! lapin's own log lines are off by default: it logs at ERROR every channel the broker
//! closes (a standby tracker's lock attempt, a passive declare of a queue that does not
//! exist yet) and every clean connection close, and it returns each real error to the code
//! that called it, which logs what it decided. `RUST_LOG=info,lapin=debug` shows them.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber (once; later calls are ignored).
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,lapin=off"));
    // Colours only on a terminal: a log file or a collector gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    // A second init (tests calling `run` twice in one process) is harmless: ignore it.
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}
