//! Configuration: built-in defaults, then a TOML file (`--config` or `FLEET_CONFIG`), then
//! environment variables named `FLEET__SECTION__KEY` (e.g. `FLEET__AMQP__URL`).
//!
//! Secrets are never stored here: a provider names the environment variable that holds its
//! API key (`api_key_env`), and the key is read when the client is built.
//!
//! Loading is strict: a key that no setting has (a typo such as `max_in_fligt`) is refused
//! with its path and the nearest valid key, provider kinds and URLs are checked with plain
//! messages, and retry budgets that could meet RabbitMQ's consumer timeout are refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The built-in defaults: a local broker and a local Pushgateway. With no provider
/// configured, [`MOCK_PROVIDER_TOML`] is added too, so the demo needs no file at all.
///
/// [`Config::load`] hands this text to the `config` crate as the first source, under the
/// file and the environment, so every key it sets is already filled in when serde reads the
/// merged table: this text, not a `#[serde(default)]`, is where those defaults live. Two
/// keys it sets also have a serde default (`worker.result_group_max` and
/// `worker.result_group_linger_ms`), which never applies while this text is loaded first; a
/// test checks that the two never disagree. A key it does not set takes its serde default
/// when the file and the environment leave it out too (`amqp.urls`, `worker.id`, a
/// provider's optional settings, ...), or is required (a provider's `kind` and `base_url`).
pub const DEFAULTS_TOML: &str = r#"
namespace = "fleet"

[amqp]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
delivery_limit = 10
max_message_bytes = 2097152
heartbeat_s = 10

[pushgateway]
url = "http://127.0.0.1:9091"
push_interval_s = 5
stale_group_s = 3600
timeout_s = 5

[worker]
max_in_flight = 256
drain_timeout_s = 30
providers = []
result_group_max = 64
result_group_linger_ms = 5

[retry]
max_attempts = 8
initial_backoff_ms = 100
max_backoff_ms = 10000
max_elapsed_s = 60
delay_tiers_s = [5, 30, 120, 600]
max_delays = 8
delay_budget_s = 7200

[producer]
max_body_bytes = 1048576
confirm_window = 2048
default_deadline_s = 86400
submit_timeout_s = 3600

[tracker]
enabled = true
checkpoint_interval_ms = 500
retention_s = 86400

[webhooks]
default_url = ""
secret_env = ""
timeout_s = 10
initial_backoff_s = 5
max_backoff_s = 3600
max_age_s = 86400
allow_private = false

[api]
listen = "127.0.0.1:8090"
key_envs = []
max_file_bytes = 209715200
max_file_lines = 50000
file_retention_s = 604800
max_requests_per_key = 32
mode = "auto"
"#;

/// The built-in `mock` provider (the workspace's mock server on its default port). It
/// exists only while the configuration names no other provider, so a real deployment never
/// serves it by accident; `FLEET__PROVIDERS__MOCK__BASE_URL` and friends override its keys.
pub const MOCK_PROVIDER_TOML: &str = r#"
[providers.mock]
kind = "openai"
base_url = "http://127.0.0.1:8080"
batch = true
"#;

/// Keys whose environment value is a comma-separated list (`FLEET__WORKER__PROVIDERS=a,b`).
const LIST_KEYS: &[&str] = &["worker.providers", "retry.delay_tiers_s", "amqp.urls", "api.key_envs"];

/// Settings read from the environment as the exact text given: `try_parsing` would turn a
/// password such as `0123` or `1e3` into a number (`123`, `1000`) before it reached the
/// string field.
const VERBATIM_ENV_KEYS: [&str; 6] =
    ["amqp.url", "pushgateway.url", "pushgateway.username", "pushgateway.password", "namespace", "worker.id"];

/// Longest time an item may stay unacked in a worker (in-process retries included), kept
/// well under RabbitMQ's default consumer timeout of 30 minutes.
pub const MAX_UNACKED_S: u64 = 20 * 60;

/// The whole configuration of a producer or worker process.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Config {
    /// Prefix of every exchange and queue name, so several fleets (or parallel tests)
    /// share one broker without seeing each other.
    pub namespace: String,
    /// The broker: where to connect, and the delivery limit and size bound of items queues.
    pub amqp: AmqpConfig,
    /// Where metrics are pushed, and how often.
    pub pushgateway: PushgatewayConfig,
    /// Settings of worker processes.
    pub worker: WorkerConfig,
    /// How a worker retries a failing provider: in process, then through delay queues.
    pub retry: RetryConfig,
    /// Settings of `producer submit` (`submit_timeout_s` is the tracker's to apply).
    pub producer: ProducerConfig,
    /// The job tracker role a worker may take.
    pub tracker: TrackerConfig,
    /// Provider definitions by name; the name is the items queue's routing key.
    pub providers: BTreeMap<String, ProviderConfig>,
    /// `producer serve`: the OpenAI Files + Batches and Anthropic Message Batches HTTP API.
    pub api: ApiConfig,
    /// What the fleet's workers share that producers must not: the key signing internal
    /// messages.
    #[serde(default)]
    pub fleet: FleetConfig,
    /// Completion webhooks (`submit --webhook`): the default URL, the secret's variable,
    /// how deliveries are retried.
    pub webhooks: WebhooksConfig,
}

impl Config {
    /// Loads defaults, then `path` (or the file named by `FLEET_CONFIG`), then `FLEET__*`
    /// environment variables.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        let path: Option<PathBuf> =
            path.map(Path::to_path_buf).or_else(|| std::env::var_os("FLEET_CONFIG").map(PathBuf::from));
        if let Some(path) = &path {
            if !path.exists() {
                anyhow::bail!("config file {} does not exist", path.display());
            }
        }
        let invalid = |e: config::ConfigError| anyhow::anyhow!("invalid configuration: {e}");
        let mut merged = layered(path.as_deref(), false).and_then(|b| b.build()).map_err(invalid)?;
        let names = provider_names(&merged);
        if names.iter().all(|n| n == "mock") {
            merged = layered(path.as_deref(), true).and_then(|b| b.build()).map_err(invalid)?;
        }
        let raw: serde_json::Value = merged.clone().try_deserialize().map_err(invalid)?;
        let cfg: Config = merged.try_deserialize().map_err(invalid)?;
        let known = serde_json::to_value(&cfg)?;
        if let Some(problem) = unknown_key(&raw, &known, "") {
            anyhow::bail!("invalid configuration: {problem}");
        }
        cfg.validate()?;
        // Every connection this process opens asks for this heartbeat (see amqp::connect).
        crate::amqp::set_heartbeat(cfg.amqp.heartbeat_s);
        Ok(cfg)
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.amqp.check_addresses()?;
        crate::amqp::check_heartbeat(self.amqp.heartbeat_s)?;
        self.api.validate()?;
        self.webhooks.validate()?;
        if self.fleet.signing_key_env.as_deref().is_some_and(|v| !is_env_var_name(v)) {
            anyhow::bail!(
                "fleet.signing_key_env must be the NAME of an environment variable holding the key, not the key \
                 itself; the value given is not shown"
            );
        }
        if self.namespace.is_empty() || self.namespace.contains(char::is_whitespace) {
            anyhow::bail!("namespace must be a non-empty word, got {:?}", self.namespace);
        }
        for name in &self.worker.providers {
            if !self.providers.contains_key(name) {
                anyhow::bail!("worker.providers names unknown provider {name:?}");
            }
        }
        let group_max = crate::wire::MAX_GROUP_RESULTS;
        if !(1..=group_max).contains(&self.worker.result_group_max) {
            anyhow::bail!("worker.result_group_max must be between 1 and {group_max}");
        }
        // A result waiting for its group holds its item's prefetch slot.
        if self.worker.result_group_linger_ms > MAX_RESULT_GROUP_LINGER_MS {
            anyhow::bail!("worker.result_group_linger_ms must be at most {MAX_RESULT_GROUP_LINGER_MS}");
        }
        if self.retry.delay_tiers_s.is_empty() || self.retry.delay_tiers_s.contains(&0) {
            anyhow::bail!("retry.delay_tiers_s must list positive numbers of seconds");
        }
        if !self.pushgateway.url.is_empty() {
            check_http_url("pushgateway.url", &self.pushgateway.url)?;
        }
        for (name, p) in &self.providers {
            if p.max_in_flight == 0 || p.timeout_s == 0 {
                anyhow::bail!("provider {name}: max_in_flight and timeout_s must be > 0");
            }
            let (max_requests, max_bytes) = p.kind.batch_limits();
            if !(1..=max_requests).contains(&p.batch_limits().0) || !(1..=max_bytes).contains(&p.batch_limits().1) {
                anyhow::bail!(
                    "provider {name}: batch_max_requests must be 1..={max_requests} and batch_max_bytes \
                     1..={max_bytes} (the provider's own limits)"
                );
            }
            if !(1..=86_400).contains(&p.batch_poll_interval_s) {
                anyhow::bail!("provider {name}: batch_poll_interval_s must be 1..=86400");
            }
            if p.batch_enqueued_tokens == Some(0) {
                anyhow::bail!(
                    "provider {name}: batch_enqueued_tokens must be at least 1 (leave it unset for no limit)"
                );
            }
            check_http_url(&format!("providers.{name}.base_url"), &p.base_url)?;
            p.check_key_envs(name)?;
            if let Some((model, _)) = p.prices.iter().find(|(_, price)| !price.is_valid()) {
                anyhow::bail!(
                    "providers.{name}.prices.{model:?}: prices must be finite and not negative, batch_factor and flex_factor at most 1"
                );
            }
            // An item is unacked for all its in-process attempts; RabbitMQ closes the channel
            // of a consumer holding a delivery for 30 minutes (3.10's default), which would
            // redeliver everything in flight. Longer waits belong in the delay queues.
            let worst = u64::from(self.retry.max_attempts) * p.timeout_s + self.retry.max_elapsed_s;
            if worst > MAX_UNACKED_S {
                anyhow::bail!(
                    "provider {name}: retry.max_attempts x timeout_s + retry.max_elapsed_s = {worst} s, \
                     over {MAX_UNACKED_S} s (RabbitMQ's consumer timeout is 30 min): lower them"
                );
            }
            // A flex item holds its delivery for one call (up to flex_timeout_s) after
            // waiting at most retry.max_elapsed_s for a slot: the same rule applies.
            let flex_worst = p.flex_timeout_s + self.retry.max_elapsed_s;
            if p.flex_timeout_s == 0 || flex_worst > MAX_UNACKED_S {
                anyhow::bail!(
                    "provider {name}: flex_timeout_s + retry.max_elapsed_s = {flex_worst} s must be over 0 and at most \
                     {MAX_UNACKED_S} s (RabbitMQ's consumer timeout is 30 min)"
                );
            }
        }
        Ok(())
    }

    /// The providers this worker serves, in name order.
    pub fn served_providers(&self) -> Vec<(&String, &ProviderConfig)> {
        self.providers
            .iter()
            .filter(|(name, _)| self.worker.providers.is_empty() || self.worker.providers.contains(name))
            .collect()
    }

    /// The environment variables named by served providers' `api_key_env` that are unset or
    /// empty: a worker with any refuses to start rather than call a provider without its key.
    pub fn missing_api_keys(&self) -> Vec<String> {
        self.served_providers()
            .into_iter()
            .flat_map(|(_, p)| p.key_envs())
            // A webhook secret's variable too: deliveries would otherwise go out unsigned.
            .chain((!self.webhooks.secret_env.is_empty()).then(|| self.webhooks.secret_env.clone()))
            .filter(|var| std::env::var_os(var).is_none_or(|v| v.is_empty()))
            .collect()
    }

    /// This worker's id: configured, or `<hostname>-<pid>`.
    pub fn worker_id(&self) -> String {
        match &self.worker.id {
            Some(id) if !id.is_empty() => id.clone(),
            _ => {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_else(|_| "worker".into());
                format!("{host}-{}", std::process::id())
            }
        }
    }
}

/// Completion webhooks (see [`crate::webhooks`]). Only the NAME of the variable that holds
/// the signing secret is configured, never the secret.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct WebhooksConfig {
    /// URL of jobs submitted without `--webhook` (`""`: none).
    pub default_url: String,
    /// Name of the environment variable holding the signing secret (`whsec_<base64>` or
    /// any string), read by workers; `""`: deliveries are sent unsigned.
    pub secret_env: String,
    /// Timeout of one delivery attempt (connect to end of the answer), seconds.
    pub timeout_s: u64,
    /// Wait before the first retry, seconds; doubles per attempt up to `max_backoff_s`.
    pub initial_backoff_s: u64,
    /// Longest wait between attempts, seconds.
    pub max_backoff_s: u64,
    /// A delivery is retried for this long after the job ended, seconds (default a day);
    /// then it is parked in `<ns>.webhooks.dead`.
    pub max_age_s: u64,
    /// Whether deliveries may go to the fleet's own networks: loopback, private, link-local
    /// (the cloud metadata address among them) and other non-public addresses. Off: a
    /// user's `--webhook` URL cannot make a worker POST inside the fleet's network.
    pub allow_private: bool,
}

impl WebhooksConfig {
    fn validate(&self) -> anyhow::Result<()> {
        if !self.default_url.is_empty() {
            crate::webhooks::check_url(&self.default_url).map_err(|e| anyhow::anyhow!("webhooks.default_url: {e}"))?;
        }
        if !self.secret_env.is_empty() && !is_env_var_name(&self.secret_env) {
            anyhow::bail!(
                "webhooks.secret_env must be the NAME of an environment variable holding the secret, not the \
                 secret itself; the value given is not shown"
            );
        }
        if !(1..=60).contains(&self.timeout_s) {
            anyhow::bail!("webhooks.timeout_s must be 1..=60");
        }
        if self.initial_backoff_s == 0 || self.max_backoff_s < self.initial_backoff_s || self.max_age_s == 0 {
            anyhow::bail!(
                "webhooks: initial_backoff_s must be > 0, max_backoff_s at least initial_backoff_s, max_age_s > 0"
            );
        }
        Ok(())
    }
}

/// Settings only the fleet's workers use (see [`crate::signing`]).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct FleetConfig {
    /// Name of the environment variable holding the key (at least 32 bytes) that signs the
    /// messages only workers write: the tracker's checkpoint and announcements, chunks past
    /// `pending`. Unset: the fleet runs unsigned. Producers never read it.
    #[serde(default)]
    pub signing_key_env: Option<String>,
}

/// Settings of `producer serve` (see docs/api.md). Only the names of the variables that
/// hold the clients' keys are configured, never the keys.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ApiConfig {
    /// Address the HTTP server listens on (`FLEET__API__LISTEN`; port 0 picks a free one).
    pub listen: String,
    /// Names of the environment variables each holding one key clients present (`Bearer`
    /// or `x-api-key`); `FLEET__API__KEY_ENVS=A,B`. The server refuses to start without one.
    pub key_envs: Vec<String>,
    /// Largest uploaded file (or inline Message Batch), bytes: larger ones answer 413.
    pub max_file_bytes: u64,
    /// Most requests in one uploaded file (OpenAI's limit is 50,000).
    pub max_file_lines: u64,
    /// How long uploaded files and the records of files and batches are kept, seconds.
    pub file_retention_s: u64,
    /// Requests of one key in progress at once; beyond, the server answers 429 with
    /// `Retry-After` (one key cannot take the server from the others).
    pub max_requests_per_key: usize,
    /// How the API's batches run: `auto` (the default) runs a batch whose
    /// `completion_window` is at least [`BATCH_COMPLETION_WINDOW_S`] through its provider's
    /// batch API when the provider has one (`providers.<name>.batch`), and online otherwise;
    /// `batch` uses the provider's batch API whenever it has one, whatever the window;
    /// `online` never does (one call per request).
    pub mode: ApiMode,
}

/// `api.mode`: which batches of `producer serve` run through the provider's batch API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum ApiMode {
    /// One provider call per request, always.
    Online,
    /// The provider's batch API whenever the provider has one (a window shorter than the
    /// provider's 24 h may then end with requests `expired`).
    Batch,
    /// The provider's batch API when it has one and the batch's window allows its 24 h.
    Auto,
}

impl TryFrom<String> for ApiMode {
    type Error = String;

    fn try_from(mode: String) -> Result<Self, String> {
        match mode.as_str() {
            "online" => Ok(ApiMode::Online),
            "batch" => Ok(ApiMode::Batch),
            "auto" => Ok(ApiMode::Auto),
            _ => Err(format!("api.mode must be \"online\", \"batch\" or \"auto\", got {mode:?}")),
        }
    }
}

impl ApiConfig {
    /// Checks the limits and the variable names (a key pasted where its variable's name
    /// belongs is refused without being shown).
    fn validate(&self) -> anyhow::Result<()> {
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            anyhow::bail!("api.listen must be an address such as 127.0.0.1:8090, got {:?}", self.listen);
        }
        if let Some(i) = self.key_envs.iter().position(|v| !is_env_var_name(v)) {
            anyhow::bail!(
                "api.key_envs[{i}] is not the name of an environment variable (name the variable, not the key)"
            );
        }
        if self.max_file_bytes == 0
            || self.max_file_lines == 0
            || self.file_retention_s == 0
            || self.max_requests_per_key == 0
        {
            anyhow::bail!(
                "api.max_file_bytes, api.max_file_lines, api.file_retention_s and api.max_requests_per_key must be > 0"
            );
        }
        Ok(())
    }
}

/// RabbitMQ connection and queue settings. `Debug` redacts the URL's password.
#[derive(Clone, Deserialize, Serialize)]
pub struct AmqpConfig {
    /// `amqp://user:pass@host:port/vhost`; credentials belong here or in `FLEET__AMQP__URL`.
    pub url: String,
    /// The nodes of a cluster, each a URL like `url`; when set, it replaces `url`. Clients
    /// connect to one that answers and move to another when theirs goes away. From the
    /// environment: `FLEET__AMQP__URLS=amqp://..,amqp://..` (percent-encode commas).
    #[serde(default)]
    pub urls: Vec<String>,
    /// Deliveries of one item before the broker dead-letters it (quorum `x-delivery-limit`).
    /// RabbitMQ 3.10 has no default, so a message that crashes workers would loop forever.
    pub delivery_limit: u32,
    /// Messages larger than this on an items queue are dead-lettered unread.
    pub max_message_bytes: usize,
    /// AMQP heartbeat asked of the broker, seconds (1 to [`crate::amqp::MAX_HEARTBEAT_S`]): a
    /// node that goes silent without closing the connection is noticed within 2.5 times
    /// this. A URL's own `?heartbeat=` wins.
    pub heartbeat_s: u16,
}

impl AmqpConfig {
    /// The broker addresses to connect to: `urls`, or `url` alone when `urls` is empty.
    pub fn addresses(&self) -> Vec<String> {
        if self.urls.is_empty() {
            vec![self.url.clone()]
        } else {
            self.urls.clone()
        }
    }

    /// Every address must be an AMQP URL: a typo is refused at start-up rather than
    /// retried forever as an unreachable broker.
    fn check_addresses(&self) -> anyhow::Result<()> {
        for url in self.addresses() {
            // lapin's parse error quotes the whole URL, password included: not shown.
            if url.parse::<lapin::uri::AMQPUri>().is_err() {
                let key = if self.urls.is_empty() { "amqp.url" } else { "amqp.urls" };
                anyhow::bail!(
                    "{key}: {:?} is not a valid AMQP URL (amqp[s]://user:password@host:port/vhost)",
                    crate::amqp::redact_url(&url)
                );
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &crate::amqp::redact_url(&self.url))
            .field("urls", &self.urls.iter().map(|u| crate::amqp::redact_url(u)).collect::<Vec<_>>())
            .field("delivery_limit", &self.delivery_limit)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("heartbeat_s", &self.heartbeat_s)
            .finish()
    }
}

/// Where and how often metrics are pushed. `Debug` redacts the password and the URL's.
#[derive(Clone, Deserialize, Serialize)]
pub struct PushgatewayConfig {
    /// Base URL; an empty string disables pushing.
    pub url: String,
    /// Seconds between two pushes of a group that has not changed, so its push time stays
    /// fresh (a changed one is pushed within a second); at least 1.
    pub push_interval_s: u64,
    /// Groups of workers that have not pushed for this long are deleted by the tracker.
    pub stale_group_s: u64,
    /// Seconds one request to the Pushgateway (a push, a delete, a listing) may take; at
    /// least 1.
    pub timeout_s: u64,
    /// Optional basic-auth user; the password comes from `FLEET__PUSHGATEWAY__PASSWORD`.
    #[serde(default)]
    pub username: Option<String>,
    /// Basic-auth password, sent with `username`; best set through
    /// `FLEET__PUSHGATEWAY__PASSWORD` (`Debug` shows `***`).
    #[serde(default)]
    pub password: Option<String>,
}

impl std::fmt::Debug for PushgatewayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushgatewayConfig")
            .field("url", &crate::amqp::redact_url(&self.url))
            .field("push_interval_s", &self.push_interval_s)
            .field("stale_group_s", &self.stale_group_s)
            .field("timeout_s", &self.timeout_s)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

/// Worker process settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct WorkerConfig {
    /// Identity in logs, results and the Pushgateway group; generated when empty.
    #[serde(default)]
    pub id: Option<String>,
    /// Upper bound on requests in flight per provider in this process: a provider's adaptive
    /// limit is at most the smaller of this and its own `max_in_flight`. Not the AMQP
    /// prefetch: the worker sets that a quarter (at least 2) above the bound, as items whose
    /// result is being confirmed still hold their delivery, and a job's queue gets its
    /// priority times as much.
    pub max_in_flight: u16,
    /// On SIGTERM, how long in-flight items may take to finish before the worker exits.
    pub drain_timeout_s: u64,
    /// Providers to serve; empty means every provider in the config.
    pub providers: Vec<String>,
    /// Most results of one job sent in one broker message (1: every result alone).
    #[serde(default = "default_result_group_max")]
    pub result_group_max: usize,
    /// Longest a result waits for others of its job before its group is sent, ms.
    #[serde(default = "default_result_group_linger_ms")]
    pub result_group_linger_ms: u64,
}

/// Longest accepted `worker.result_group_linger_ms`: a grouped result holds its item's
/// prefetch slot while it waits, so a long linger starves the worker.
const MAX_RESULT_GROUP_LINGER_MS: u64 = 10_000;

fn default_result_group_max() -> usize {
    64
}

fn default_result_group_linger_ms() -> u64 {
    5
}

/// In-process retries of transient provider failures.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RetryConfig {
    /// Calls to the provider for one item, the first included.
    pub max_attempts: u32,
    /// Wait before the first retry, ms; later waits grow exponentially, with jitter, and
    /// are never shorter than the provider's `Retry-After`.
    pub initial_backoff_ms: u64,
    /// Longest wait between two attempts, ms (a provider's `Retry-After` may ask for more,
    /// and is obeyed within `max_elapsed_s`).
    pub max_backoff_ms: u64,
    /// Total time spent sleeping between attempts of one item before giving up.
    pub max_elapsed_s: u64,
    /// Delay-queue tiers: after the in-process budget, an item waits in the tier for its
    /// attempt number (the last tier repeats) instead of holding a prefetch slot.
    pub delay_tiers_s: Vec<u64>,
    /// Passes through a delay queue before the item ends failed with its last error.
    pub max_delays: u32,
    /// Time from an item's first delay after which it ends failed rather than wait again.
    pub delay_budget_s: u64,
}

/// Producer settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ProducerConfig {
    /// Largest accepted request body (bytes of the `body` JSON).
    pub max_body_bytes: usize,
    /// Publishes awaiting a broker confirm at once.
    pub confirm_window: usize,
    /// Deadline of a job when `submit --deadline` is not given (0: none).
    pub default_deadline_s: u64,
    /// A job whose submission stopped half-way (and was not resumed) ends `failed` with
    /// reason `incomplete_submission` after this long without any event (decided by the
    /// tracker, so workers read it too).
    pub submit_timeout_s: u64,
}

/// The job tracker role.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct TrackerConfig {
    /// Whether this worker may take the tracker role.
    pub enabled: bool,
    /// How often the active tracker checkpoints its state and acks the ledger events folded
    /// since, ms (at least 50; sooner when many events wait).
    pub checkpoint_interval_ms: u64,
    /// How long finished jobs stay queryable.
    pub retention_s: u64,
}

/// The API dialect a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum ProviderKind {
    /// OpenAI or any OpenAI-compatible server (vLLM, llama.cpp, the mock).
    Openai,
    /// Anthropic's Messages API.
    Anthropic,
    /// Google's Gemini API (`generateContent`): OpenAI-format lines are translated (see
    /// [`crate::gemini`]); the key goes in `x-goog-api-key`.
    Gemini,
}

impl TryFrom<String> for ProviderKind {
    type Error = String;

    fn try_from(kind: String) -> Result<Self, String> {
        match kind.as_str() {
            "openai" => Ok(ProviderKind::Openai),
            "anthropic" => Ok(ProviderKind::Anthropic),
            "gemini" => Ok(ProviderKind::Gemini),
            _ => Err(format!(
                "unknown provider kind {kind:?}: use \"openai\" (OpenAI and OpenAI-compatible servers such as \
                 LiteLLM or vLLM), \"anthropic\" or \"gemini\""
            )),
        }
    }
}

impl ProviderKind {
    /// The provider's own limits on one batch: (requests, bytes of input).
    pub fn batch_limits(self) -> (u64, u64) {
        match self {
            ProviderKind::Openai => (50_000, 200 * 1_000_000),
            ProviderKind::Anthropic => (100_000, 256 * 1_000_000),
            // Inline requests only (Google takes up to 20 MB of them per batch; the Files API
            // upload is not used): 10 MB of OpenAI-format lines leaves room for what the
            // translation and the per-request wrapping add (see `worker::batch::gemini`).
            ProviderKind::Gemini => (10_000, 10 * 1_000_000),
        }
    }

    /// Whether the kind's API has a flex tier (`service_tier: "flex"` in the request body:
    /// OpenAI, Azure OpenAI, Groq and OpenAI-compatible servers that honour it), which
    /// `submit --mode flex` needs. Anthropic and Gemini have none.
    pub fn has_flex_tier(self) -> bool {
        match self {
            ProviderKind::Openai => true,
            ProviderKind::Anthropic | ProviderKind::Gemini => false,
        }
    }

    /// The kind's name as configuration files spell it.
    pub fn name(self) -> &'static str {
        match self {
            ProviderKind::Openai => "openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Gemini => "gemini",
        }
    }
}

/// How long a provider takes at most to finish a batch (both kinds promise 24 hours):
/// `submit --mode auto` picks batch mode only for a job whose deadline is at least this far.
pub const BATCH_COMPLETION_WINDOW_S: u64 = 24 * 3600;

/// One provider the fleet can call. `kind` and `base_url` are required; the rest have
/// defaults.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ProviderConfig {
    /// The API dialect the provider speaks: which endpoints it serves, how it is called and
    /// which batch API it has.
    pub kind: ProviderKind,
    /// The request's `url` (e.g. `/v1/chat/completions`) is appended to this.
    pub base_url: String,
    /// Name of the environment variable holding the API key (never the key itself). A
    /// worker refuses to start when the variable is unset or empty.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// A key pool: names of environment variables each holding one key of this provider
    /// (instead of `api_key_env`). Calls are spread over the keys, each with its own adaptive
    /// limiter and `rpm`/`tpm` ceilings (providers limit per key); a key the provider
    /// refuses as a key (401 `invalid_api_key`, `authentication_error`, or a key-only probe
    /// that fails) leaves the rotation until a probe finds it good again.
    #[serde(default)]
    pub api_key_envs: Vec<String>,
    /// Seconds a rejected key stays out of the rotation before a key-only probe
    /// (`GET /v1/models`) may bring it back; it stays out another period when the probe
    /// fails.
    #[serde(default = "default_key_retry_s")]
    pub key_retry_s: u64,
    /// Seconds one provider call may take.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
    /// Seconds one call of a `--mode flex` item may take (OpenAI's flex tier queues a
    /// request for minutes; OpenAI's guide sets a 15-minute client timeout). A flex item
    /// makes one call per delivery (a failure waits in the delay queues), so with
    /// `retry.max_elapsed_s` (the longest wait for a slot) it must stay within the
    /// 20-minute rule.
    #[serde(default = "default_flex_timeout_s")]
    pub flex_timeout_s: u64,
    /// Upper bound of this provider's adaptive in-flight limit in one worker.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u16,
    /// Optional requests-per-minute ceiling for this worker and key (the adaptive rate stays
    /// below).
    #[serde(default)]
    pub rpm: Option<u32>,
    /// Optional tokens-per-minute ceiling for this worker and key (tokens estimated as
    /// providers count them: the body's size plus the requested maximum output).
    #[serde(default)]
    pub tpm: Option<u32>,
    /// Largest response body read from this provider; a larger one is cut off and the item
    /// ends failed with `response_too_large` (a misbehaving server cannot exhaust memory).
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: usize,
    /// Whether the provider has a batch API the fleet may use (`submit --mode batch|auto`):
    /// OpenAI's `/v1/files` + `/v1/batches`, or Anthropic's `/v1/messages/batches`. Off by
    /// default: many OpenAI-compatible servers (vLLM, gateways) have no batch API.
    #[serde(default)]
    pub batch: bool,
    /// Most requests in one provider batch (a chunk); unset: the kind's limit (OpenAI
    /// 50,000, Anthropic 100,000).
    #[serde(default)]
    pub batch_max_requests: Option<u64>,
    /// Most bytes of one provider batch's input; unset: the kind's limit (OpenAI 200 MB,
    /// Anthropic 256 MB).
    #[serde(default)]
    pub batch_max_bytes: Option<u64>,
    /// Seconds between two polls of a provider batch (the TTL of its poll delay queue).
    #[serde(default = "default_batch_poll_interval_s")]
    pub batch_poll_interval_s: u64,
    /// The account's enqueued-token limit for batches (OpenAI's per-model "batch queue
    /// limit", e.g. 2,000,000 on Tier 1); unset: no admission. When set, a chunk's provider
    /// batch is created only while the estimated tokens of the fleet's batches in progress
    /// plus its own fit (else the chunk waits in the poll queue), and the producer cuts no
    /// chunk larger than it (OpenAI kind: the batches in progress are read from the
    /// provider's batch list).
    #[serde(default)]
    pub batch_enqueued_tokens: Option<u64>,
    /// Price per model (`prices."<model>" = { input_per_mtok, output_per_mtok }`): turns
    /// each job's token usage into its cost; the models named here are also the `model`
    /// label values of the usage metrics (any other model counts as `other`).
    #[serde(default)]
    pub prices: std::collections::BTreeMap<String, crate::usage::Price>,
    /// Glob patterns (`*` any run of characters, `?` one) of the request `model`s this
    /// provider serves, e.g. `["gpt-*", "o?-mini"]`. `producer serve` routes a batch by
    /// its lines' models when several providers serve its endpoint; empty (the default):
    /// the provider takes no batch by model, only by `metadata.provider` or being the only
    /// one.
    #[serde(default)]
    pub models: Vec<String>,
}

impl ProviderConfig {
    /// A provider of `kind` at `base_url` with every other setting at its default, as a
    /// config file naming only those two keys gets (tools and tests build on it).
    pub fn new(kind: ProviderKind, base_url: &str) -> ProviderConfig {
        ProviderConfig {
            kind,
            base_url: base_url.to_string(),
            api_key_env: None,
            api_key_envs: Vec::new(),
            key_retry_s: default_key_retry_s(),
            timeout_s: default_timeout_s(),
            flex_timeout_s: default_flex_timeout_s(),
            max_in_flight: default_max_in_flight(),
            rpm: None,
            tpm: None,
            max_response_bytes: default_max_response_bytes(),
            batch: false,
            batch_max_requests: None,
            batch_max_bytes: None,
            batch_poll_interval_s: default_batch_poll_interval_s(),
            batch_enqueued_tokens: None,
            prices: Default::default(),
            models: Vec::new(),
        }
    }

    /// The chunk limits of this provider: configured, else the kind's own.
    pub fn batch_limits(&self) -> (u64, u64) {
        let (requests, bytes) = self.kind.batch_limits();
        (self.batch_max_requests.unwrap_or(requests), self.batch_max_bytes.unwrap_or(bytes))
    }

    /// The environment variables holding this provider's keys: the pool, or the single
    /// `api_key_env`, or none (a provider that needs no key).
    pub fn key_envs(&self) -> Vec<String> {
        match &self.api_key_env {
            Some(var) => vec![var.clone()],
            None => self.api_key_envs.clone(),
        }
    }

    /// One way of naming keys, each variable once.
    fn check_key_envs(&self, name: &str) -> anyhow::Result<()> {
        if self.api_key_env.is_some() && !self.api_key_envs.is_empty() {
            anyhow::bail!("provider {name}: set api_key_env (one key) or api_key_envs (a pool), not both");
        }
        // First, before anything quotes a name: a key pasted where its variable's name
        // belongs must not reach a message or a log.
        for (key, var) in self
            .api_key_env
            .iter()
            .map(|v| ("api_key_env", v))
            .chain(self.api_key_envs.iter().map(|v| ("api_key_envs", v)))
        {
            if !is_env_var_name(var) {
                anyhow::bail!(
                    "provider {name}: {key} must be the NAME of an environment variable holding the key \
                     (letters, digits and _, at most {MAX_ENV_NAME} characters), not the key itself; \
                     the value given is not shown"
                );
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for var in &self.api_key_envs {
            if !seen.insert(var) {
                anyhow::bail!("provider {name}: api_key_envs must name distinct variables ({var:?} twice)");
            }
        }
        Ok(())
    }
}

fn default_timeout_s() -> u64 {
    60
}

fn default_max_in_flight() -> u16 {
    256
}

fn default_flex_timeout_s() -> u64 {
    900
}

fn default_key_retry_s() -> u64 {
    60
}

fn default_batch_poll_interval_s() -> u64 {
    60
}

fn default_max_response_bytes() -> usize {
    16 << 20
}

/// Longest accepted name of a key's environment variable: longer ones are more likely a
/// pasted key than a name.
const MAX_ENV_NAME: usize = 64;

/// Whether `s` can be an environment variable's name as shells write them
/// (`[A-Za-z_][A-Za-z0-9_]*`, at most [`MAX_ENV_NAME`]). Keys have dashes (`sk-...`,
/// `sk-ant-...`) or are long: neither passes.
fn is_env_var_name(s: &str) -> bool {
    let mut chars = s.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    first_ok && s.len() <= MAX_ENV_NAME && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The configuration sources in order: defaults (with the built-in mock provider when
/// `with_mock`), the file, the environment (secrets and names verbatim, see
/// [`VERBATIM_ENV_KEYS`]).
fn layered(
    path: Option<&Path>,
    with_mock: bool,
) -> Result<config::ConfigBuilder<config::builder::DefaultState>, config::ConfigError> {
    let toml = |s: &str| config::File::from_str(s, config::FileFormat::Toml);
    let mut builder = config::Config::builder().add_source(toml(DEFAULTS_TOML));
    if with_mock {
        builder = builder.add_source(toml(MOCK_PROVIDER_TOML));
    }
    if let Some(path) = path {
        builder = builder.add_source(config::File::from(path));
    }
    let mut env = config::Environment::with_prefix("FLEET")
        .prefix_separator("__")
        .separator("__")
        .try_parsing(true)
        .list_separator(",");
    for key in LIST_KEYS {
        env = env.with_list_parse_key(key);
    }
    builder = builder.add_source(env);
    for key in VERBATIM_ENV_KEYS {
        let var = format!("FLEET__{}", key.replace('.', "__").to_uppercase());
        if let Ok(value) = std::env::var(&var) {
            builder = builder.set_override(key, value)?;
        }
    }
    Ok(builder)
}

/// Names of the providers the merged sources define.
fn provider_names(merged: &config::Config) -> Vec<String> {
    merged.get_table("providers").map(|t| t.into_keys().collect()).unwrap_or_default()
}

/// The first key of `raw` (what the sources say) that `known` (the loaded configuration,
/// every setting present) lacks, as a message naming its path and the nearest valid key.
fn unknown_key(raw: &serde_json::Value, known: &serde_json::Value, prefix: &str) -> Option<String> {
    let (serde_json::Value::Object(raw), serde_json::Value::Object(known)) = (raw, known) else {
        return None;
    };
    for (key, value) in raw {
        let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        match known.get(key) {
            Some(known_value) => {
                if let Some(problem) = unknown_key(value, known_value, &path) {
                    return Some(problem);
                }
            }
            None => {
                let nearest = known
                    .keys()
                    .map(|k| (edit_distance(k, key), k))
                    .min()
                    .filter(|(d, k)| {
                        *d <= (k.len() / 3).max(2) || k.starts_with(key.as_str()) || key.starts_with(k.as_str())
                    })
                    .map(|(_, k)| if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") });
                return Some(match nearest {
                    Some(n) => format!("unknown key `{path}` (did you mean `{n}`?)"),
                    None => format!("unknown key `{path}`"),
                });
            }
        }
    }
    None
}

/// Levenshtein distance, for suggesting the key a typo meant (and, in the docs test, the
/// metric a misspelt mention meant).
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push((prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Checks that `value` is an absolute http(s) URL with a host and nothing a base URL must
/// not carry (a query or fragment). Credentials in it are allowed (a proxy's basic auth)
/// and redacted wherever the URL is shown.
fn check_http_url(key: &str, value: &str) -> anyhow::Result<()> {
    let url = reqwest::Url::parse(value).map_err(|e| {
        anyhow::anyhow!("{key} = {value:?} is not a URL ({e}); expected e.g. \"https://api.openai.com\"")
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        anyhow::bail!("{key} = {value:?} must be an http:// or https:// URL with a host");
    }
    if url.query().is_some() || url.fragment().is_some() {
        anyhow::bail!("{key} = {value:?} must not have a query or fragment");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_load_and_name_a_mock_provider() {
        let cfg = Config::load(None).unwrap();
        assert_eq!(cfg.providers["mock"].kind, ProviderKind::Openai);
        assert_eq!(cfg.amqp.delivery_limit, crate::topology::DEFAULT_DELIVERY_LIMIT);
    }

    #[test]
    fn file_overrides_defaults() {
        let dir = std::env::temp_dir().join(format!("fleet-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("f.toml");
        std::fs::write(
            &file,
            "namespace = \"t1\"\n[providers.claude]\nkind = \"anthropic\"\nbase_url = \"http://x\"\ntimeout_s = 5\nmax_in_flight = 3\n",
        )
        .unwrap();
        let cfg = Config::load(Some(&file)).unwrap();
        assert_eq!(cfg.namespace, "t1");
        assert_eq!(cfg.providers["claude"].kind, ProviderKind::Anthropic);
        assert_eq!(cfg.providers["claude"].max_in_flight, 3);
        assert!(!cfg.providers.contains_key("mock"), "the built-in mock exists only when no provider is configured");
    }

    #[test]
    fn a_price_table_keeps_model_names_as_written() {
        let cfg = load_str(
            "prices",
            "[providers.openai]\nkind = \"openai\"\nbase_url = \"http://x\"\n\
             [providers.openai.prices.\"gpt-4.1-Mini\"]\ninput_per_mtok = 0.4\noutput_per_mtok = 1.6\n",
        )
        .unwrap();
        let price = &cfg.providers["openai"].prices["gpt-4.1-Mini"];
        assert_eq!((price.input_per_mtok, price.output_per_mtok, price.batch_factor), (0.4, 1.6, 0.5));
        let bad = "[providers.openai]\nkind = \"openai\"\nbase_url = \"http://x\"\n\
                   [providers.openai.prices.m]\ninput_per_mtok = -1\noutput_per_mtok = 1\n";
        assert!(load_str("badprice", bad).is_err());
    }

    /// Writes `toml` to a scratch file and loads it.
    fn load_str(test: &str, toml: &str) -> anyhow::Result<Config> {
        let dir = std::env::temp_dir().join(format!("fleet-cfg-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("f.toml");
        std::fs::write(&file, toml).unwrap();
        Config::load(Some(&file))
    }

    /// Every key of the defaults TOML, removed on its own, either is required (the TOML is
    /// its only default) or falls back to a serde default equal to the TOML's value.
    #[test]
    fn serde_defaults_agree_with_the_defaults_toml() {
        let parse = |text: &str| -> Result<serde_json::Value, config::ConfigError> {
            let toml = |s: &str| config::File::from_str(s, config::FileFormat::Toml);
            let built =
                config::Config::builder().add_source(toml(text)).add_source(toml(MOCK_PROVIDER_TOML)).build()?;
            let cfg: Config = built.try_deserialize()?;
            Ok(serde_json::to_value(&cfg).unwrap())
        };
        let full = parse(DEFAULTS_TOML).expect("the defaults load");
        let table: toml::Table = DEFAULTS_TOML.parse().unwrap();
        let mut checked = 0;
        for (section, value) in &table {
            let keys: Vec<(String, Option<&str>)> = match value {
                toml::Value::Table(t) => t.keys().map(|k| (k.clone(), Some(section.as_str()))).collect(),
                _ => vec![(section.clone(), None)],
            };
            for (key, parent) in keys {
                let mut without = table.clone();
                match parent {
                    Some(p) => without[p].as_table_mut().unwrap().remove(&key),
                    None => without.remove(&key),
                };
                if let Ok(v) = parse(&toml::to_string(&without).unwrap()) {
                    assert_eq!(
                        v,
                        full,
                        "{}{key}: its serde default differs from the defaults TOML",
                        parent.map(|p| format!("{p}.")).unwrap_or_default()
                    );
                }
                checked += 1;
            }
        }
        assert!(checked > 20, "every key was tried ({checked})");
    }

    #[test]
    fn a_misspelt_key_is_refused_with_its_path_and_the_nearest_key() {
        let err = load_str("typo", "[worker]\nmax_in_fligt = 5\n").unwrap_err().to_string();
        assert!(err.contains("`worker.max_in_fligt`") && err.contains("`worker.max_in_flight`"), "{err}");
        let err = load_str("typo2", "[providers.x]\nkind = \"openai\"\nbase_url = \"http://h\"\napi_key = \"k\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`providers.x.api_key`") && err.contains("`providers.x.api_key_env`"), "{err}");
        let err = load_str("typo3", "[sections]\n").unwrap_err().to_string();
        assert!(err.contains("unknown key `sections`"), "{err}");
    }

    #[test]
    fn a_gemini_provider_loads_with_batch_mode_under_the_inline_limits() {
        let toml = format!(
            "[providers.g]\nkind = \"gemini\"\nbase_url = \"{}\"\napi_key_env = \"GEMINI_API_KEY\"\n",
            crate::gemini::DEFAULT_BASE_URL
        );
        let cfg = load_str("gemini", &toml).unwrap();
        assert_eq!(cfg.providers["g"].kind, ProviderKind::Gemini);
        assert_eq!(ProviderKind::Gemini.name(), "gemini");
        let cfg = load_str("gemini-batch", &format!("{toml}batch = true\n")).unwrap();
        assert!(cfg.providers["g"].batch);
        assert_eq!(cfg.providers["g"].batch_limits(), (10_000, 10_000_000));
        let err = load_str("gemini-big", &format!("{toml}batch = true\nbatch_max_bytes = 20000000\n")).unwrap_err();
        assert!(err.to_string().contains("batch_max_bytes 1..=10000000"), "{err}");
    }

    #[test]
    fn the_signing_key_is_named_never_pasted() {
        let cfg = load_str("sig", "[fleet]\nsigning_key_env = \"FLEET_SIGNING_KEY\"\n").unwrap();
        assert_eq!(cfg.fleet.signing_key_env.as_deref(), Some("FLEET_SIGNING_KEY"));
        assert_eq!(load_str("nosig", "").unwrap().fleet.signing_key_env, None, "unset by default: unsigned");
        let pasted = "[fleet]\nsigning_key_env = \"k3y-0123456789abcdef0123456789abcdef\"\n";
        let err = format!("{:#}", load_str("sigpaste", pasted).unwrap_err());
        assert!(err.contains("fleet.signing_key_env must be the NAME"), "{err}");
        assert!(!err.contains("k3y-0123"), "the value is not shown: {err}");
    }

    #[test]
    fn provider_kinds_and_urls_get_plain_messages() {
        let err = load_str("kind", "[providers.x]\nkind = \"openia\"\nbase_url = \"http://h\"\n").unwrap_err();
        let err = format!("{err:#}");
        assert!(err.contains("unknown provider kind \"openia\"") && err.contains("\"anthropic\""), "{err}");
        assert!(!err.contains("variant"), "no Rust jargon: {err}");
        for bad in ["api.openai.com", "ftp://h", "http://", "http://h/?x=1", "http://h/#x"] {
            let toml = format!("[providers.x]\nkind = \"openai\"\nbase_url = \"{bad}\"\n");
            let err = load_str("url", &toml).unwrap_err().to_string();
            assert!(err.contains("providers.x.base_url"), "{bad}: {err}");
        }
    }

    #[test]
    fn api_mode_defaults_to_auto_and_takes_only_its_three_values() {
        assert_eq!(load_str("api-mode-default", "").unwrap().api.mode, ApiMode::Auto);
        assert_eq!(load_str("api-mode-online", "[api]\nmode = \"online\"\n").unwrap().api.mode, ApiMode::Online);
        assert_eq!(load_str("api-mode-batch", "[api]\nmode = \"batch\"\n").unwrap().api.mode, ApiMode::Batch);
        let err = format!("{:#}", load_str("api-mode-bad", "[api]\nmode = \"flex\"\n").unwrap_err());
        assert!(err.contains("api.mode must be \"online\", \"batch\" or \"auto\", got \"flex\""), "{err}");
    }

    #[test]
    fn a_served_provider_without_its_key_variable_is_reported_by_name() {
        let var = format!("FLEET_TEST_UNSET_KEY_{}", std::process::id());
        let toml = format!("[providers.x]\nkind = \"openai\"\nbase_url = \"http://h\"\napi_key_env = \"{var}\"\n");
        let cfg = load_str("keys", &toml).unwrap();
        assert_eq!(cfg.missing_api_keys(), vec![var]);
        assert!(Config::load(None).unwrap().missing_api_keys().is_empty(), "the built-in mock needs no key");
    }

    #[test]
    fn a_key_pool_names_its_variables_and_is_exclusive_with_a_single_key() {
        let set = format!("FLEET_TEST_POOL_SET_{}", std::process::id());
        let unset = format!("FLEET_TEST_POOL_UNSET_{}", std::process::id());
        std::env::set_var(&set, "k");
        let base = "[providers.x]\nkind = \"openai\"\nbase_url = \"http://h\"\n";
        let cfg = load_str("pool", &format!("{base}api_key_envs = [\"{set}\", \"{unset}\"]\n")).unwrap();
        assert_eq!(cfg.providers["x"].key_envs(), vec![set.clone(), unset.clone()]);
        assert_eq!(cfg.missing_api_keys(), vec![unset.clone()]);
        let both = format!("{base}api_key_env = \"{set}\"\napi_key_envs = [\"{unset}\"]\n");
        let err = load_str("pool2", &both).unwrap_err().to_string();
        assert!(err.contains("not both"), "{err}");
        let twice = format!("{base}api_key_envs = [\"{set}\", \"{set}\"]\n");
        assert!(load_str("pool3", &twice).unwrap_err().to_string().contains("distinct"));
    }

    #[test]
    fn a_key_pasted_for_its_variable_is_refused_without_being_shown() {
        let base = "[providers.x]\nkind = \"openai\"\nbase_url = \"http://h\"\n";
        let long = "A".repeat(MAX_ENV_NAME + 1);
        for (field, value) in [
            ("api_key_env = ", "\"sk-proj-abc123secret\""),
            ("api_key_envs = ", "[\"OK_NAME\", \"sk-ant-api03-secret\"]"),
            ("api_key_env = ", &format!("\"{long}\"")),
            ("api_key_envs = ", "[\"\"]"),
        ] {
            let err = format!("{:#}", load_str("pasted", &format!("{base}{field}{value}\n")).unwrap_err());
            assert!(err.contains("NAME of an environment variable"), "{err}");
            assert!(!err.contains("secret") && !err.contains(&long), "the value is not shown: {err}");
        }
        assert!(load_str("named", &format!("{base}api_key_env = \"OPENAI_API_KEY_2\"\n")).is_ok());
    }

    /// The README's real-provider example is accepted exactly as written there.
    #[test]
    fn the_readme_example_loads() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
        let start = readme.find("cat > fleet.toml <<'TOML'\n").expect("README has the fleet.toml example");
        let body = &readme[start..].split_once('\n').unwrap().1;
        let example = &body[..body.find("\nTOML\n").expect("example ends with TOML")];
        let cfg = load_str("readme", example).unwrap_or_else(|e| panic!("README example refused: {e:#}"));
        assert!(cfg.providers.contains_key("openai") && cfg.providers.contains_key("claude"));
        assert!(!cfg.providers.contains_key("mock"));
    }

    #[test]
    fn retry_budgets_that_would_meet_the_consumer_timeout_are_refused() {
        let dir = std::env::temp_dir().join(format!("fleet-cfg-long-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("f.toml");
        std::fs::write(&file, "[retry]\nmax_attempts = 20\n[providers.mock]\ntimeout_s = 600\n").unwrap();
        let err = Config::load(Some(&file)).unwrap_err().to_string();
        assert!(err.contains("consumer timeout"), "{err}");
    }

    #[test]
    fn debug_output_holds_no_secret() {
        let mut cfg = Config::load(None).unwrap();
        cfg.amqp.url = "amqp://user:s3cret-a@host/%2f".into();
        cfg.pushgateway.url = "https://user:s3cret-b@pg".into();
        cfg.pushgateway.password = Some("s3cret-c".into());
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("amqp://user:***@host"), "{shown}");
    }

    #[test]
    fn a_numeric_looking_password_from_the_environment_stays_text() {
        // Only this test sets this variable; the others do not read the password.
        std::env::set_var("FLEET__PUSHGATEWAY__PASSWORD", "0123");
        let cfg = Config::load(None);
        std::env::set_var("FLEET__PUSHGATEWAY__PASSWORD", "1e3");
        let cfg2 = Config::load(None);
        std::env::remove_var("FLEET__PUSHGATEWAY__PASSWORD");
        assert_eq!(cfg.unwrap().pushgateway.password.as_deref(), Some("0123"));
        assert_eq!(cfg2.unwrap().pushgateway.password.as_deref(), Some("1e3"));
    }

    #[test]
    fn amqp_urls_replace_url_and_bad_ones_are_refused() {
        let dir = std::env::temp_dir().join(format!("fleet-cfg-urls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("f.toml");
        let cfg = Config::load(None).unwrap();
        assert_eq!(cfg.amqp.addresses(), vec![cfg.amqp.url.clone()], "url alone when urls is unset");
        std::fs::write(&file, "[amqp]\nurls = [\"amqp://a:5681/%2f\", \"amqp://b:5682/%2f\"]\n").unwrap();
        let cfg = Config::load(Some(&file)).unwrap();
        assert_eq!(cfg.amqp.addresses(), ["amqp://a:5681/%2f", "amqp://b:5682/%2f"]);
        std::fs::write(&file, "[amqp]\nurls = [\"amqp://u:secret@a:5681/%2f\", \"http//nope\"]\n").unwrap();
        let err = Config::load(Some(&file)).unwrap_err().to_string();
        assert!(err.contains("nope") && !err.contains("secret"), "{err}");
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let err = Config::load(Some(Path::new("/nonexistent/fleet.toml"))).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }
}
