//! What a worker holds: [`Worker`], kept across reconnections (its config, provider
//! clients, items in flight and what the control stream told it), and [`Context`], made
//! anew for each connection (its publishing channel and result groups). Data only: the
//! loops that use them live in [`crate::consume`], [`crate::jobs`] and [`crate::process`].

use std::collections::BTreeMap;
use std::sync::Arc;

use fleet::config::RetryConfig;
use fleet::metrics::WorkerMetrics;
use fleet::topology::Topology;
use fleet::Config;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::known::{Cancelled, OpenJobs};
use crate::outbox::Outbox;
use crate::provider::ProviderClient;
use crate::settle::Publisher;

/// What a worker keeps across reconnections.
pub struct Worker {
    /// The configuration the worker started with.
    pub cfg: Config,
    /// This worker's id, in logs, metrics and the results it publishes.
    pub worker_id: String,
    /// The namespace's queue and exchange names.
    pub topology: Topology,
    /// The worker's metrics, pushed to the Pushgateway.
    pub metrics: WorkerMetrics,
    /// Provider clients by name, with their AMQP prefetch (the in-flight limit plus room
    /// for items that are publishing their result).
    pub clients: BTreeMap<String, (Arc<ProviderClient>, u16)>,
    /// Items in flight; the drain waits for all of them.
    pub in_flight: TaskTracker,
    /// Jobs cancelled fleet-wide, as the control stream announced them.
    pub cancelled: Cancelled,
    /// `batch_provider_batches{provider,status}` (batch mode).
    pub provider_batches: prometheus::IntGaugeVec,
    /// Jobs whose items queues exist, as the control stream announced them.
    pub open_jobs: OpenJobs,
    /// For the broker operations that may close their channel (see [`fleet::amqp::Probe`]).
    pub probe: Arc<fleet::amqp::Probe>,
}

/// What every delivery handler of one connection shares.
pub struct Context {
    /// This worker's id, recorded in the results it publishes.
    pub worker_id: String,
    /// Confirm-mode channel, names and counters: what settling a delivery needs.
    pub publisher: Publisher,
    /// `amqp.max_message_bytes`: larger deliveries are dead-lettered unread.
    pub max_message_bytes: usize,
    /// `amqp.delivery_limit`: an item delivered more often is poison.
    pub delivery_limit: u32,
    /// How failed calls are retried and delayed (`retry.*`).
    pub retry: RetryConfig,
    /// Jobs cancelled fleet-wide (shared with [`Worker`]).
    pub cancelled: Cancelled,
    /// Fired at SIGTERM: items that have not started calling the provider are released.
    pub shutdown: CancellationToken,
    /// Groups results of one job into one message (on `publish`).
    pub outbox: Outbox,
}
