//! Metric definitions: the one owner of every metric name and label.
//!
//! Names follow the system this fleet replaces (see `observability/`), so its dashboard
//! semantics carry over. Label values come from small fixed sets: never a custom id, and a
//! job id only on the two per-job cost gauges, which the tracker bounds to a few jobs
//! (`batch_job_cost`, `batch_job_max_cost`); anything else would explode the number of
//! series.
//!
//! Two registries exist because two Pushgateway groups exist: each worker pushes its own
//! (`job="batch_worker", instance=<worker id>`), and the active tracker pushes the
//! job-level one (`job="batch_tracker"`).
//!
//! Counts with a ground truth (items and jobs by status, job durations) come from the
//! tracker, which folds every result exactly once and pushes only checkpointed state: they
//! stay exact whatever worker is killed. Workers push what only they know (latency,
//! retries, errors, in flight, limits, keys); a killed worker's increments since its last
//! push are lost, which the pusher keeps to about a second while the worker is busy.

use prometheus::{
    GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// The Prometheus type of a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MetricKind {
    /// Only goes up (`_total`).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations in buckets: also exposed as `<name>_bucket`, `_sum` and `_count`.
    Histogram,
}

impl MetricKind {
    /// The type's name in Prometheus' text format (its `# TYPE` lines).
    pub fn as_str(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        }
    }
}

/// Every metric a worker pushes: [`WorkerMetrics`] and [`register_provider_batches`]'s.
/// With [`TRACKER_METRICS`] and [`API_METRICS`], the names the dashboard and the alerts may
/// use (`scripts/check-assets.sh` reads them from the `metric_names` example); a test holds
/// each list equal to what its registry defines.
pub const WORKER_METRICS: &[(&str, MetricKind)] = &[
    ("batch_worker_items_total", MetricKind::Counter),
    ("batch_provider_latency_seconds", MetricKind::Histogram),
    ("batch_retry_attempts_total", MetricKind::Counter),
    ("batch_errors_total", MetricKind::Counter),
    ("batch_items_in_flight", MetricKind::Gauge),
    ("batch_dead_letters_total", MetricKind::Counter),
    ("batch_push_failures_total", MetricKind::Counter),
    ("batch_worker_up", MetricKind::Gauge),
    ("batch_concurrency_limit", MetricKind::Gauge),
    ("batch_rate_limit_rps", MetricKind::Gauge),
    ("batch_poll_cycle_seconds", MetricKind::Histogram),
    ("batch_api_key_rejections_total", MetricKind::Counter),
    ("batch_api_keys_active", MetricKind::Gauge),
    ("batch_provider_paused", MetricKind::Gauge),
    ("batch_admission_waits_total", MetricKind::Counter),
    ("batch_webhook_deliveries_total", MetricKind::Counter),
    ("batch_provider_batches", MetricKind::Gauge),
];

/// Every metric the active tracker pushes ([`TrackerMetrics`]).
pub const TRACKER_METRICS: &[(&str, MetricKind)] = &[
    ("batch_jobs_total", MetricKind::Counter),
    ("batch_jobs_submitted_total", MetricKind::Counter),
    ("batch_items_total", MetricKind::Counter),
    ("batch_job_duration_seconds", MetricKind::Histogram),
    ("batch_jobs_in_progress", MetricKind::Gauge),
    ("batch_queue_backlog", MetricKind::Gauge),
    ("batch_usage_tokens_total", MetricKind::Counter),
    ("batch_usage_cost_total", MetricKind::Counter),
    ("batch_answers_total", MetricKind::Counter),
    ("batch_job_cost", MetricKind::Gauge),
    ("batch_job_max_cost", MetricKind::Gauge),
    ("batch_push_failures_total", MetricKind::Counter),
];

/// Every metric `producer serve` serves on its `/metrics` ([`ApiMetrics`]).
pub const API_METRICS: &[(&str, MetricKind)] = &[
    ("batch_api_requests_total", MetricKind::Counter),
    ("batch_api_upload_bytes_total", MetricKind::Counter),
    ("batch_api_batches_open", MetricKind::Gauge),
];

/// Provider latency buckets: 5 ms to 5 minutes (LLM calls range that widely).
const LATENCY_BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];
/// Job duration buckets: 1 second to 2 days.
const JOB_BUCKETS: &[f64] =
    &[1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0, 172800.0];

/// Metrics of one worker process.
#[derive(Clone)]
pub struct WorkerMetrics {
    /// Holds every metric below: the worker pushes it as its own group
    /// (`job="batch_worker"`).
    pub registry: Registry,
    /// `batch_worker_items_total{provider,status}`: items finished by this worker (a
    /// per-worker view; the exact fleet count is the tracker's `batch_items_total`).
    pub items: IntCounterVec,
    /// `batch_provider_latency_seconds{provider,operation}`: one provider HTTP call.
    pub provider_latency: HistogramVec,
    /// `batch_retry_attempts_total{provider,task_type,retry_reason}`.
    pub retries: IntCounterVec,
    /// `batch_errors_total{provider,error_type,operation}`: every failed call or message.
    pub errors: IntCounterVec,
    /// `batch_items_in_flight{provider}`: items being worked on now.
    pub in_flight: IntGaugeVec,
    /// `batch_dead_letters_total{reason}`: messages this worker parked in the dead queue.
    pub dead_letters: IntCounterVec,
    /// `batch_push_failures_total`: failed pushes to the Pushgateway.
    pub push_failures: IntCounter,
    /// `batch_worker_up`: 1 while the worker runs; its final push sets 0.
    pub worker_up: IntGauge,
    /// `batch_concurrency_limit{provider}`: current in-flight limit per provider.
    pub concurrency_limit: IntGaugeVec,
    /// `batch_rate_limit_rps{provider}`: the adaptive send rate (0: not limited).
    pub rate_limit: GaugeVec,
    /// `batch_poll_cycle_seconds`: one poll of a provider batch (batch-API mode).
    pub poll_cycle: Histogram,
    /// `batch_api_key_rejections_total{provider,key_env}`: keys of a pool that the provider
    /// answered 401/403 and that left this worker's rotation (`key_env` is the configured
    /// variable's name, never the key).
    pub key_rejections: IntCounterVec,
    /// `batch_api_keys_active{provider}`: keys of the provider still in this worker's rotation.
    pub keys_active: IntGaugeVec,
    /// `batch_provider_paused{provider}`: 1 while this worker takes none of the provider's
    /// items because the provider rejected every key (probed again; items stay queued for
    /// other workers).
    pub provider_paused: IntGaugeVec,
    /// `batch_admission_waits_total{provider,reason}`: times a chunk was sent back to wait
    /// for room in the provider's enqueued-token queue: `budget` (the fleet's own admission
    /// check, `batch_enqueued_tokens`) or `token_limit_exceeded` (the provider failed its
    /// batch for a full queue; it is created again later).
    pub admission_waits: IntCounterVec,
    /// `batch_webhook_deliveries_total{outcome}`: completion-webhook attempts this worker
    /// made, by outcome: `delivered` (a 2xx), `retried` (failed, another attempt is
    /// scheduled) or `failed` (retries ran out or the delivery was refused: parked in
    /// `<ns>.webhooks.dead`).
    pub webhook_deliveries: IntCounterVec,
}

impl WorkerMetrics {
    /// Every worker metric, registered in a registry of its own; the series of each
    /// [`crate::topology::DeadLabel::ALL`] start at 0.
    pub fn new() -> Self {
        let registry = Registry::new();
        let m = WorkerMetrics {
            items: counter_vec(
                "batch_worker_items_total",
                "Items this worker finished, by final status (the exact fleet count is batch_items_total)",
                &["provider", "status"],
            ),
            provider_latency: histogram_vec(
                "batch_provider_latency_seconds",
                "Latency of one provider call",
                &["provider", "operation"],
                LATENCY_BUCKETS,
            ),
            retries: counter_vec(
                "batch_retry_attempts_total",
                "Retries of provider calls, by reason",
                &["provider", "task_type", "retry_reason"],
            ),
            errors: counter_vec(
                "batch_errors_total",
                "Errors, by type and operation",
                &["provider", "error_type", "operation"],
            ),
            in_flight: gauge_vec("batch_items_in_flight", "Items being processed now", &["provider"]),
            dead_letters: counter_vec("batch_dead_letters_total", "Messages dead-lettered", &["reason"]),
            push_failures: IntCounter::new("batch_push_failures_total", "Failed pushes to the Pushgateway")
                .expect("valid metric"),
            worker_up: IntGauge::new("batch_worker_up", "1 while the worker runs, 0 after a clean stop")
                .expect("valid metric"),
            concurrency_limit: gauge_vec(
                "batch_concurrency_limit",
                "Current in-flight limit per provider",
                &["provider"],
            ),
            rate_limit: GaugeVec::new(
                Opts::new("batch_rate_limit_rps", "Adaptive send rate per provider (0: not limited)"),
                &["provider"],
            )
            .expect("valid metric"),
            poll_cycle: Histogram::with_opts(
                HistogramOpts::new("batch_poll_cycle_seconds", "Duration of one provider batch poll cycle")
                    .buckets(LATENCY_BUCKETS.to_vec()),
            )
            .expect("valid metric"),
            key_rejections: counter_vec(
                "batch_api_key_rejections_total",
                "API keys the provider rejected (401/403), which left the rotation",
                &["provider", "key_env"],
            ),
            keys_active: gauge_vec("batch_api_keys_active", "API keys of the provider in rotation", &["provider"]),
            provider_paused: gauge_vec(
                "batch_provider_paused",
                "1 while the worker takes none of the provider's items: every key was rejected",
                &["provider"],
            ),
            admission_waits: counter_vec(
                "batch_admission_waits_total",
                "Chunks sent back to wait for room in the provider's enqueued-token queue, by reason",
                &["provider", "reason"],
            ),
            webhook_deliveries: counter_vec(
                "batch_webhook_deliveries_total",
                "Completion-webhook delivery attempts, by outcome (delivered, retried, failed)",
                &["outcome"],
            ),
            registry,
        };
        for c in [
            Box::new(m.items.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.provider_latency.clone()),
            Box::new(m.retries.clone()),
            Box::new(m.errors.clone()),
            Box::new(m.in_flight.clone()),
            Box::new(m.dead_letters.clone()),
            Box::new(m.push_failures.clone()),
            Box::new(m.worker_up.clone()),
            Box::new(m.concurrency_limit.clone()),
            Box::new(m.rate_limit.clone()),
            Box::new(m.poll_cycle.clone()),
            Box::new(m.key_rejections.clone()),
            Box::new(m.keys_active.clone()),
            Box::new(m.provider_paused.clone()),
            Box::new(m.admission_waits.clone()),
            Box::new(m.webhook_deliveries.clone()),
        ] {
            m.registry.register(c).expect("metric registered once");
        }
        // Series that exist from the start read as 0 instead of "no data", so rates and
        // alerts on them work before the first event.
        for reason in crate::topology::DeadLabel::ALL {
            m.dead_letters.with_label_values(&[reason.as_str()]);
        }
        for outcome in ["delivered", "retried", "failed"] {
            m.webhook_deliveries.with_label_values(&[outcome]);
        }
        m
    }
}

/// `batch_provider_batches{provider,status}`: provider batches in progress, by the
/// provider's own status (`validating`, `in_progress`, `finalizing`, `cancelling` for the
/// OpenAI kind; `in_progress`, `canceling` for Anthropic's), as last polled by this worker.
/// Registered in the worker's registry by workers that serve a provider in batch mode.
pub fn register_provider_batches(registry: &Registry) -> IntGaugeVec {
    let gauge = gauge_vec(
        "batch_provider_batches",
        "Provider batches in progress, by provider status, as last polled by this worker",
        &["provider", "status"],
    );
    registry.register(Box::new(gauge.clone())).expect("metric registered once");
    gauge
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Job-level metrics, owned by the active tracker.
#[derive(Clone)]
pub struct TrackerMetrics {
    /// Holds every metric below: the active tracker encodes it at each checkpoint and
    /// pushes that snapshot as the fleet's one tracker group (`job="batch_tracker"`).
    pub registry: Registry,
    /// `batch_jobs_total{provider,status}`: jobs that ended, by end status (summing it
    /// counts each job once).
    pub jobs: IntCounterVec,
    /// `batch_jobs_submitted_total{provider}`: jobs submitted.
    pub jobs_submitted: IntCounterVec,
    /// `batch_items_total{provider,status}`: items finished, each counted once, from the
    /// tracker's checkpointed state.
    pub items: IntCounterVec,
    /// `batch_job_duration_seconds{provider,status}`: submit to last item.
    pub job_duration: HistogramVec,
    /// `batch_jobs_in_progress{provider}`.
    pub jobs_in_progress: IntGaugeVec,
    /// `batch_queue_backlog{provider}`: messages ready in each provider's items queues (its
    /// own and its jobs in progress).
    pub queue_backlog: IntGaugeVec,
    /// `batch_usage_tokens_total{provider,model,kind}`: tokens of the jobs' answers (kind
    /// `input`, `cached_input` (part of input), `output`), each item counted once; `model` is
    /// a model of the provider's price table or `other`.
    pub usage_tokens: IntCounterVec,
    /// `batch_usage_cost_total{provider,model}`: their cost at the price table.
    pub usage_cost: prometheus::CounterVec,
    /// `batch_answers_total{provider,mode}`: succeeded items by how they were answered
    /// (`online`: a call of their own, `batch`: out of a provider batch), each once.
    pub answers: IntCounterVec,
    /// `batch_job_cost{provider,job_id}`: a job's cost so far, for the few jobs the tracker
    /// shows (capped jobs in progress first, then the costliest; 20 at most): the only
    /// series labelled by job, bounded so.
    pub job_cost: GaugeVec,
    /// `batch_job_max_cost{provider,job_id}`: the spend cap of those jobs that have one.
    pub job_max_cost: GaugeVec,
    /// `batch_push_failures_total`.
    pub push_failures: IntCounter,
}

impl TrackerMetrics {
    /// Every tracker metric, registered in a registry of its own.
    pub fn new() -> Self {
        let registry = Registry::new();
        let m = TrackerMetrics {
            jobs: counter_vec("batch_jobs_total", "Jobs ended, by end status", &["provider", "status"]),
            jobs_submitted: counter_vec("batch_jobs_submitted_total", "Jobs submitted", &["provider"]),
            items: counter_vec("batch_items_total", "Items finished, by final status", &["provider", "status"]),
            job_duration: histogram_vec(
                "batch_job_duration_seconds",
                "Time from submission to the last item",
                &["provider", "status"],
                JOB_BUCKETS,
            ),
            jobs_in_progress: gauge_vec("batch_jobs_in_progress", "Jobs not yet finished", &["provider"]),
            queue_backlog: gauge_vec("batch_queue_backlog", "Messages ready in the items queues", &["provider"]),
            usage_tokens: counter_vec(
                "batch_usage_tokens_total",
                "Tokens of the jobs' answers, each item once",
                &["provider", "model", "kind"],
            ),
            usage_cost: prometheus::CounterVec::new(
                prometheus::Opts::new("batch_usage_cost_total", "Cost of the jobs' answers at the price table"),
                &["provider", "model"],
            )
            .expect("valid metric"),
            answers: counter_vec(
                "batch_answers_total",
                "Succeeded items by how they were answered (online, batch), each once",
                &["provider", "mode"],
            ),
            job_cost: GaugeVec::new(
                Opts::new(
                    "batch_job_cost",
                    "Cost so far of the jobs shown (capped ones in progress, then the costliest)",
                ),
                &["provider", "job_id"],
            )
            .expect("valid metric"),
            job_max_cost: GaugeVec::new(
                Opts::new("batch_job_max_cost", "Spend cap of the jobs shown that have one"),
                &["provider", "job_id"],
            )
            .expect("valid metric"),
            push_failures: IntCounter::new("batch_push_failures_total", "Failed pushes to the Pushgateway")
                .expect("valid metric"),
            registry,
        };
        for c in [
            Box::new(m.jobs.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.jobs_submitted.clone()),
            Box::new(m.items.clone()),
            Box::new(m.job_duration.clone()),
            Box::new(m.jobs_in_progress.clone()),
            Box::new(m.queue_backlog.clone()),
            Box::new(m.usage_tokens.clone()),
            Box::new(m.usage_cost.clone()),
            Box::new(m.answers.clone()),
            Box::new(m.job_cost.clone()),
            Box::new(m.job_max_cost.clone()),
            Box::new(m.push_failures.clone()),
        ] {
            m.registry.register(c).expect("metric registered once");
        }
        m
    }
}

impl Default for TrackerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric")
}

fn histogram_vec(name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels).expect("valid metric")
}

/// The registry in Prometheus' text format.
pub fn encode(registry: &Registry) -> Vec<u8> {
    use prometheus::Encoder;
    let mut buf = Vec::new();
    // Encoding our own well-formed registry into a Vec cannot fail.
    let _ = prometheus::TextEncoder::new().encode(&registry.gather(), &mut buf);
    buf
}

/// The metrics of `producer serve`, scraped by Prometheus from its `/metrics` (a
/// long-running server is scraped, not pushed; the scrape job is `batch_api`). Labels are
/// route templates (`/v1/batches/{id}`), never paths, ids or keys.
#[derive(Clone)]
pub struct ApiMetrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// `batch_api_requests_total{route,status}`: HTTP requests by route template and status code.
    pub requests: IntCounterVec,
    /// `batch_api_upload_bytes_total`: bytes of files received.
    pub upload_bytes: prometheus::IntCounter,
    /// `batch_api_batches_open`: batches whose job the tracker shows not ended.
    pub batches_open: prometheus::IntGauge,
}

impl ApiMetrics {
    /// Fresh metrics, labelled with the fleet's `namespace`.
    pub fn new(namespace: &str) -> ApiMetrics {
        let registry = Registry::new();
        let opts = |name: &str, help: &str| Opts::new(name, help).const_label("namespace", namespace);
        let requests = IntCounterVec::new(
            opts("batch_api_requests_total", "HTTP requests to producer serve, by route and status code"),
            &["route", "status"],
        )
        .expect("valid metric");
        let upload_bytes = prometheus::IntCounter::with_opts(opts(
            "batch_api_upload_bytes_total",
            "Bytes of files uploaded to producer serve",
        ))
        .expect("valid metric");
        let batches_open = prometheus::IntGauge::with_opts(opts(
            "batch_api_batches_open",
            "Batches of producer serve whose job has not ended",
        ))
        .expect("valid metric");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(upload_bytes.clone()),
            Box::new(batches_open.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        ApiMetrics { registry, requests, upload_bytes, batches_open }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The metrics `registry` gathers, by name and kind.
    fn gathered(registry: &Registry) -> std::collections::BTreeSet<(String, MetricKind)> {
        use prometheus::proto::MetricType;
        let kind = |t| match t {
            MetricType::COUNTER => MetricKind::Counter,
            MetricType::GAUGE => MetricKind::Gauge,
            MetricType::HISTOGRAM => MetricKind::Histogram,
            other => panic!("no metric of the fleet is a {other:?}"),
        };
        registry.gather().iter().map(|f| (f.name().to_string(), kind(f.get_field_type()))).collect()
    }

    fn listed(list: &[(&str, MetricKind)]) -> std::collections::BTreeSet<(String, MetricKind)> {
        let set: std::collections::BTreeSet<_> = list.iter().map(|(n, k)| (n.to_string(), *k)).collect();
        assert_eq!(set.len(), list.len(), "a name listed twice");
        set
    }

    /// Gives a metric vector one series: a registry gathers only metrics that have one.
    fn touch<T: prometheus::core::MetricVecBuilder>(v: &prometheus::core::MetricVec<T>) {
        let labels = vec![""; prometheus::core::Collector::desc(v)[0].variable_labels.len()];
        v.with_label_values(&labels);
    }

    /// The structs are taken apart field by field, with no `..`: a metric added to one
    /// fails to compile here until its vector (if it is one) gets a series below.
    #[test]
    fn the_lists_of_metrics_are_what_the_registries_define() {
        let worker = WorkerMetrics::new();
        let WorkerMetrics {
            registry,
            items,
            provider_latency,
            retries,
            errors,
            in_flight,
            dead_letters,
            push_failures: _,
            worker_up: _,
            concurrency_limit,
            rate_limit,
            poll_cycle: _,
            key_rejections,
            keys_active,
            provider_paused,
            admission_waits,
            webhook_deliveries,
        } = &worker;
        touch(items);
        touch(provider_latency);
        touch(retries);
        touch(errors);
        touch(in_flight);
        touch(dead_letters);
        touch(concurrency_limit);
        touch(rate_limit);
        touch(key_rejections);
        touch(keys_active);
        touch(provider_paused);
        touch(admission_waits);
        touch(webhook_deliveries);
        touch(&register_provider_batches(registry));
        assert_eq!(gathered(registry), listed(WORKER_METRICS), "WORKER_METRICS");

        let tracker = TrackerMetrics::new();
        let TrackerMetrics {
            registry,
            jobs,
            jobs_submitted,
            items,
            job_duration,
            jobs_in_progress,
            queue_backlog,
            usage_tokens,
            usage_cost,
            answers,
            job_cost,
            job_max_cost,
            push_failures: _,
        } = &tracker;
        touch(jobs);
        touch(jobs_submitted);
        touch(items);
        touch(job_duration);
        touch(jobs_in_progress);
        touch(queue_backlog);
        touch(usage_tokens);
        touch(usage_cost);
        touch(answers);
        touch(job_cost);
        touch(job_max_cost);
        assert_eq!(gathered(registry), listed(TRACKER_METRICS), "TRACKER_METRICS");

        let api = ApiMetrics::new("ns");
        let ApiMetrics { registry, requests, upload_bytes: _, batches_open: _ } = &api;
        touch(requests);
        assert_eq!(gathered(registry), listed(API_METRICS), "API_METRICS");
    }

    #[test]
    fn worker_metrics_encode_with_seed_names() {
        let m = WorkerMetrics::new();
        m.items.with_label_values(&["mock", "succeeded"]).inc();
        m.provider_latency.with_label_values(&["mock", "chat_completions"]).observe(0.1);
        let text = String::from_utf8(encode(&m.registry)).unwrap();
        assert!(text.contains("batch_worker_items_total{provider=\"mock\",status=\"succeeded\"} 1"), "{text}");
        assert!(text.contains("batch_provider_latency_seconds_bucket"), "{text}");
    }
}
