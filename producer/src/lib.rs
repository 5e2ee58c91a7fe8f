//! The producer CLI's library: submitting jobs, collecting results, and (through the job
//! tracker) inspecting and controlling jobs.

pub mod cancel;
pub mod collect;
pub mod dead;
pub mod duration;
pub mod inspect;
pub mod progress;
pub mod resume;
pub mod submit;
pub mod validate;

use anyhow::Context as _;

/// Connects to the configured broker; the error names it (password redacted).
pub(crate) async fn connect(cfg: &fleet::Config, name: &str) -> anyhow::Result<lapin::Connection> {
    fleet::amqp::connect(&cfg.amqp.url, name)
        .await
        .with_context(|| format!("cannot connect to RabbitMQ at {}", fleet::amqp::redact_url(&cfg.amqp.url)))
}
