//! Everything the fleet's binaries share: the wire format, the AMQP topology, configuration,
//! metric definitions and the Pushgateway pusher, tracing setup and the shutdown signal.
//!
//! The binaries (`producer`, `worker`) stay thin; names that must agree across processes
//! (queue names, message shapes, metric names) live here, once.

#![deny(missing_docs)]
#![deny(unreachable_pub)]

pub mod amqp;
pub mod batch;
pub mod config;
pub mod endpoint;
pub mod gemini;
pub mod messages;
pub mod metrics;
pub mod push;
pub mod shutdown;
pub mod signing;
pub mod telemetry;
pub mod tokens;
pub mod topology;
pub mod usage;
pub mod webhooks;
pub mod wire;

pub use config::Config;

/// Milliseconds since the Unix epoch: the timestamp unit used on the wire.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
