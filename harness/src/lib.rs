//! Runs the workspace's real binaries (`mock-provider`, `worker`, `producer`) against the
//! local services (RabbitMQ, Pushgateway, Prometheus), for the end-to-end tests (`e2e`) and
//! the benchmark (`bench`) alike: where the binaries are ([`bin`]), a kill-on-drop process
//! handle ([`Proc`]), the mock provider ([`Mock`]), a fleet's config file
//! ([`FleetConfig`]), `producer` and its `submit` ([`submit`]), HTTP calls ([`http`]), the
//! services' addresses, and the clean-up of what a namespace left on them
//! ([`delete_namespace`]).
//!
//! Everything here is synchronous (std threads and processes). Functions named `try_*`
//! return errors, for the benchmark; their plain twins panic with the error, for tests. A
//! function that talks to RabbitMQ or the Pushgateway runs its own short-lived tokio
//! runtime, so async code calls it from `tokio::task::spawn_blocking`; the HTTP calls
//! alone ([`http`], [`Mock::try_stats`]) may also be made from async code.

#![deny(missing_docs)]
#![deny(unreachable_pub)]

mod bins;
mod cleanup;
mod config;
pub mod http;
mod mock;
mod process;
mod producer;

use std::path::Path;
use std::process::Command;

pub use bins::{bin, bin_dir, set_bin_dir};
pub use cleanup::{delete_namespace, delete_push_groups, Names, KEEP_QUEUES_ENV};
pub use config::FleetConfig;
pub use mock::Mock;
pub use process::Proc;
pub use producer::{producer_command, submit, submit_watched, Submitted};

/// RabbitMQ of the local stack (`scripts/stack.sh up`).
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Pushgateway of the local stack.
pub const DEFAULT_PUSHGATEWAY_URL: &str = "http://127.0.0.1:9091";
/// Prometheus of the local stack.
pub const DEFAULT_PROMETHEUS_URL: &str = "http://127.0.0.1:9090";

/// RabbitMQ to use: `FLEET__AMQP__URL`, else the local one.
pub fn amqp_url() -> String {
    std::env::var("FLEET__AMQP__URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.into())
}

/// `FLEET__AMQP__URLS` (a comma list, as the fleet reads it) when it is set and not empty,
/// e.g. by `make cluster`.
pub fn amqp_url_list() -> Option<Vec<String>> {
    let list = std::env::var("FLEET__AMQP__URLS").ok().filter(|l| !l.trim().is_empty())?;
    Some(list.split(',').map(|u| u.trim().to_string()).collect())
}

/// Every broker address to use: [`amqp_url_list`] when given, otherwise [`amqp_url`] alone.
pub fn amqp_urls() -> Vec<String> {
    amqp_url_list().unwrap_or_else(|| vec![amqp_url()])
}

/// Pushgateway to use: `FLEET__PUSHGATEWAY__URL`, else the local one.
pub fn pushgateway_url() -> String {
    std::env::var("FLEET__PUSHGATEWAY__URL").unwrap_or_else(|_| DEFAULT_PUSHGATEWAY_URL.into())
}

/// Prometheus to query: `PROMETHEUS_URL`, else the local one.
pub fn prometheus_url() -> String {
    std::env::var("PROMETHEUS_URL").unwrap_or_else(|_| DEFAULT_PROMETHEUS_URL.into())
}

/// A fresh namespace `<prefix>.<name>.<8 random hex digits>` (`t.<test>.…` for tests,
/// `bench.<scenario>.…` for the benchmark).
pub fn namespace(prefix: &str, name: &str) -> String {
    format!("{prefix}.{name}.{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// The variable test fleets' workers read their signing key from
/// (`fleet.signing_key_env`, set by [`FleetConfig::new`]).
pub const TEST_SIGNING_KEY_ENV: &str = "FLEET_TEST_SIGNING_KEY";

/// The signing key of every test fleet (a test value, not a secret): tests sign what they
/// publish in a worker's name with [`test_signing_key`].
pub const TEST_SIGNING_KEY: &str = "test-fleet-signing-key-0123456789abcdef";

/// [`TEST_SIGNING_KEY`] as a key, to sign a message as the fleet's workers would.
pub fn test_signing_key() -> fleet::signing::SigningKey {
    fleet::signing::SigningKey::new(TEST_SIGNING_KEY_ENV, TEST_SIGNING_KEY.as_bytes()).expect("long enough")
}

/// `worker --config CONFIG` with the test fleets' signing key in its environment, to
/// which the caller adds the worker's id (`FLEET__WORKER__ID`) and environment.
pub fn worker_command(config: &Path) -> Command {
    let mut cmd = Command::new(bin("worker"));
    cmd.arg("--config").arg(config).env(TEST_SIGNING_KEY_ENV, TEST_SIGNING_KEY);
    cmd
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A current-thread tokio runtime for one blocking call into async code.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}
