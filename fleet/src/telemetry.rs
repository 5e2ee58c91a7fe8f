//! Tracing setup shared by the binaries: human-readable logs on stderr by default, JSON
//! lines with `--log-json`; the level comes from `RUST_LOG` (default `info`).

use tracing_subscriber::EnvFilter;

pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,lapin=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // A second init (tests calling `run` twice in one process) is harmless: ignore it.
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}
