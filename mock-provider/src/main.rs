//! The `mock-provider` binary: parses host, port and knobs, logs to stderr, announces the bound
//! address on stdout (one line, so test harnesses can read the port) and serves until SIGINT or
//! SIGTERM.

use std::io::Write;

use anyhow::Context;
use clap::Parser;
use mock_provider::Knobs;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Fake OpenAI- and Anthropic-compatible LLM provider with fault-injection knobs.
#[derive(Parser, Debug)]
#[command(name = "mock-provider", version, about)]
struct Cli {
    /// Address to listen on.
    #[arg(long, env = "MOCK_HOST", default_value = "127.0.0.1")]
    host: String,

    /// Port to listen on (0 picks a free one; the real port is printed on stdout).
    #[arg(long, env = "MOCK_PORT", default_value_t = 8080)]
    port: u16,

    #[command(flatten)]
    knobs: Knobs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    let listener = TcpListener::bind((cli.host.as_str(), cli.port))
        .await
        .with_context(|| format!("binding {}:{}", cli.host, cli.port))?;
    let addr = listener.local_addr()?;
    {
        // Exactly one line on stdout, flushed now: stdout is a pipe when a test spawns us, and a
        // pipe is block-buffered.
        let mut out = std::io::stdout().lock();
        writeln!(out, "mock-provider listening on http://{addr}")?;
        out.flush()?;
    }

    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    mock_provider::serve(listener, cli.knobs, shutdown)
        .await
        .context("serving")?;
    Ok(())
}

/// Cancels `shutdown` on the first SIGINT (Ctrl-C) or SIGTERM (docker stop, kill).
async fn stop_on_signal(shutdown: CancellationToken) {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received, shutting down"),
        () = term => tracing::info!("SIGTERM received, shutting down"),
    }
    shutdown.cancel();
}
