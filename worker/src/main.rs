//! `worker`: a stateless worker of the batch-inference fleet.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Consume job items from RabbitMQ, call LLM providers, publish results.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file (also `FLEET_CONFIG`); `FLEET__*` env variables override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Log JSON lines instead of human-readable text.
    #[arg(long)]
    log_json: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    fleet::telemetry::init(args.log_json);
    let cfg = match fleet::Config::load(args.config.as_deref()) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("worker: {e:#}");
            return ExitCode::from(2);
        }
    };
    let missing = cfg.missing_api_keys();
    if !missing.is_empty() {
        // Calling a provider without its key only earns refusals (or, behind a gateway,
        // errors that look transient and are retried for hours): refuse to start instead.
        eprintln!("worker: API key variable(s) unset or empty: {}", missing.join(", "));
        return ExitCode::from(2);
    }
    // The key signing internal messages (fleet.signing_key_env), read once; never logged.
    if let Err(e) = fleet::signing::install(cfg.fleet.signing_key_env.as_deref()) {
        eprintln!("worker: {e}");
        return ExitCode::from(2);
    }
    let shutdown = fleet::shutdown::on_signals();
    match worker::run(cfg, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "worker failed");
            ExitCode::FAILURE
        }
    }
}
