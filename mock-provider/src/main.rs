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
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();

    // Install the signal handlers before announcing the port: a harness may send SIGTERM as
    // soon as it has read the line, and an uninstalled handler would mean the default action
    // (death by signal, not the clean exit 0 promised).
    let shutdown = CancellationToken::new();
    let signals = Signals::install()?;
    tokio::spawn(signals.cancel_on_first(shutdown.clone()));

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

    mock_provider::serve(listener, cli.knobs, shutdown).await.context("serving")?;
    Ok(())
}

/// The registered SIGINT and SIGTERM streams.
#[cfg(unix)]
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    /// Registers the handlers now (not on first poll), so signals are caught from here on.
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
        })
    }

    /// Cancels `shutdown` on the first SIGINT (Ctrl-C) or SIGTERM (docker stop, kill).
    async fn cancel_on_first(mut self, shutdown: CancellationToken) {
        tokio::select! {
            _ = self.interrupt.recv() => tracing::info!("SIGINT received, shutting down"),
            _ = self.terminate.recv() => tracing::info!("SIGTERM received, shutting down"),
        }
        shutdown.cancel();
    }
}

/// Ctrl-C only, where there are no Unix signals.
#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn install() -> anyhow::Result<Self> {
        Ok(Self)
    }

    async fn cancel_on_first(self, shutdown: CancellationToken) {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::info!("Ctrl-C received, shutting down");
            shutdown.cancel();
        }
    }
}
