//! The producer CLI's library: submitting jobs, collecting results, and (through the job
//! tracker) inspecting and controlling jobs.

pub mod batch;
pub mod cancel;
pub mod collect;
pub mod dead;
pub mod duration;
pub mod finish;
pub mod input;
pub mod inspect;
pub mod output_format;
pub mod progress;
pub mod resume;
pub mod retry;
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
