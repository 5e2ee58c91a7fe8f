//! The producer CLI's library: submitting jobs, collecting results, and (through the job
//! tracker) inspecting and controlling jobs; and how SIGINT and SIGTERM stop a submission.

#![deny(missing_docs)]
#![deny(unreachable_pub)]

pub mod batch;
pub mod cancel;
pub mod collect;
pub mod dead;
pub mod dry_run;
pub mod duration;
pub mod finish;
pub mod input;
pub mod inspect;
pub mod output_format;
pub mod progress;
pub mod report;
pub mod resume;
pub mod retry;
mod seen;
pub mod serve;
pub mod spend;
pub mod status_diagnosis;
pub mod submit;
pub mod validate;
pub mod watch;

use anyhow::Context as _;

/// Connects to one of the configured brokers; the error names them (passwords redacted).
pub(crate) async fn connect(cfg: &fleet::Config, name: &str) -> anyhow::Result<lapin::Connection> {
    let urls = cfg.amqp.addresses();
    fleet::amqp::connect_any(&urls, name).await.with_context(|| {
        let brokers: Vec<String> = urls.iter().map(|u| fleet::amqp::redact_url(u)).collect();
        format!("cannot connect to RabbitMQ at {}", brokers.join(", "))
    })
}

/// The submission in progress that SIGINT and SIGTERM stop (see [`stop_on_signals`]).
static STOPPABLE: std::sync::Mutex<Option<tokio_util::sync::CancellationToken>> = std::sync::Mutex::new(None);

/// While the returned guard lives, SIGINT and SIGTERM cancel its token instead of ending the
/// process, so a `submit` can stop cleanly and record what the broker confirmed. A second
/// signal, or one while no guard lives (e.g. in the `--wait` that follows a submit), ends
/// the process at once with the shell's code for it (130, 143), as the signal's default
/// action would have. One guard at a time (the CLI runs one submission).
///
/// Why not [`fleet::shutdown::on_signals`]: once tokio handles a signal it handles it for
/// the rest of the process, and that token fires once; a later Ctrl-C would be swallowed.
pub(crate) fn stop_on_signals() -> SignalGuard {
    static LISTENING: std::sync::Once = std::sync::Once::new();
    LISTENING.call_once(|| {
        use tokio::signal::unix::{signal, SignalKind};
        for (kind, exit_code) in [(SignalKind::interrupt(), 130), (SignalKind::terminate(), 143)] {
            // Registered here, not in the task: a signal right after this call is seen.
            match signal(kind) {
                Ok(mut signals) => {
                    tokio::spawn(async move {
                        while signals.recv().await.is_some() {
                            let stoppable = STOPPABLE.lock().unwrap_or_else(|e| e.into_inner()).clone();
                            match stoppable {
                                Some(token) if !token.is_cancelled() => token.cancel(),
                                _ => std::process::exit(exit_code),
                            }
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot handle signal {}; it ends the process", kind.as_raw_value())
                }
            }
        }
    });
    let token = tokio_util::sync::CancellationToken::new();
    *STOPPABLE.lock().unwrap_or_else(|e| e.into_inner()) = Some(token.clone());
    SignalGuard { token }
}

/// Makes SIGINT and SIGTERM stop one submission while it lives (see [`stop_on_signals`]).
pub(crate) struct SignalGuard {
    token: tokio_util::sync::CancellationToken,
}

impl SignalGuard {
    /// Cancelled by the first SIGINT or SIGTERM.
    pub(crate) fn token(&self) -> &tokio_util::sync::CancellationToken {
        &self.token
    }
}

impl Drop for SignalGuard {
    /// Signals end the process again.
    fn drop(&mut self) {
        *STOPPABLE.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}
