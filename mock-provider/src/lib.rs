//! `mock_provider`: a fake OpenAI- and Anthropic-compatible LLM provider with fault knobs
//! (latency, jitter, error rates, hangs, garbage bodies, an rpm limit), used by the demo, the
//! integration tests and the benchmarks. This file owns the crate's public entry points —
//! [`serve`] and [`spawn`] — and the module layout:
//!
//! - [`knobs`]: the command-line / environment configuration;
//! - [`limiter`]: the token-bucket rpm limiter and its rate-limit headers;
//! - [`faults`]: the seeded random fault and jitter decisions;
//! - [`api`]: request parsing and response bodies for each endpoint (with [`responses`] and
//!   [`moderations`] for OpenAI's Responses and Moderations APIs);
//! - [`stats`]: the counters behind `GET /stats`;
//! - [`hostile`]: answers that misbehave on purpose (redirects, endless bodies, absurd
//!   retry hints), chosen by the request's model;
//! - [`gateway`]: answers passed on the way the LiteLLM proxy does (`--litellm`);
//! - [`gemini`]: Google's Gemini endpoints (`/v1beta/models/{model}:generateContent`, ...);
//! - [`batches`]: the providers' batch APIs (OpenAI Files and Batch, Anthropic Message
//!   Batches) and their knobs;
//! - `handlers`: the axum router and the per-request pipeline.

#![deny(missing_docs)]
#![deny(unreachable_pub)]

pub mod api;
pub mod batches;
pub mod faults;
pub mod gateway;
pub mod gemini;
mod handlers;
pub mod hostile;
pub mod knobs;
pub mod limiter;
pub mod moderations;
pub mod responses;
pub mod stats;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use batches::{BatchKnobs, BatchStats};
pub use knobs::Knobs;
pub use stats::StatsSnapshot;

/// Serves the mock provider on `listener` until `shutdown` is cancelled, then shuts down
/// gracefully: in-flight answers finish (hung requests are released), idle connections close.
///
/// # Errors
/// Returns the I/O error that stopped the server, if any.
pub async fn serve(listener: TcpListener, knobs: Knobs, shutdown: CancellationToken) -> std::io::Result<()> {
    tracing::info!(?knobs, addr = ?listener.local_addr().ok(), "mock-provider starting");
    let state = Arc::new(handlers::AppState::new(&knobs, shutdown.clone()));
    let app = handlers::router(state);
    // Small request/response exchanges on keep-alive connections: without TCP_NODELAY, Nagle's
    // algorithm plus delayed ACKs can add tens of milliseconds to an answer.
    let listener = listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
    });
    axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await?;
    tracing::info!("mock-provider stopped");
    Ok(())
}

/// Starts a server with `knobs` on `127.0.0.1` and an OS-chosen port, for tests.
///
/// Returns the bound address, the token that stops it, and the server task (which resolves once
/// the server has shut down).
///
/// # Panics
/// Panics if no local port can be bound.
pub async fn spawn(knobs: Knobs) -> (SocketAddr, CancellationToken, JoinHandle<std::io::Result<()>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0 for mock-provider");
    let addr = listener.local_addr().expect("bound listener has an address");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(serve(listener, knobs, shutdown.clone()));
    (addr, shutdown, task)
}
