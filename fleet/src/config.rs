//! Configuration: built-in defaults, then a TOML file (`--config` or `FLEET_CONFIG`), then
//! environment variables named `FLEET__SECTION__KEY` (e.g. `FLEET__AMQP__URL`).
//!
//! Secrets are never stored here: a provider names the environment variable that holds its
//! API key (`api_key_env`), and the key is read when the client is built.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The built-in defaults: a local broker, a local Pushgateway and one `mock` provider
/// (the workspace's mock server on its default port), so the demo needs no file at all.
pub const DEFAULTS_TOML: &str = r#"
namespace = "fleet"

[amqp]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
delivery_limit = 10
max_message_bytes = 2097152

[pushgateway]
url = "http://127.0.0.1:9091"
push_interval_s = 5
stale_group_s = 3600
timeout_s = 5

[worker]
max_in_flight = 256
drain_timeout_s = 30
providers = []

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

[tracker]
enabled = true
checkpoint_interval_ms = 500
retention_s = 86400

[providers.mock]
kind = "openai"
base_url = "http://127.0.0.1:8080"
api_key_env = "MOCK_API_KEY"
timeout_s = 60
max_in_flight = 256
"#;

/// Longest time an item may stay unacked in a worker (in-process retries included), kept
/// well under RabbitMQ's default consumer timeout of 30 minutes.
pub const MAX_UNACKED_S: u64 = 20 * 60;

/// The whole configuration of a producer or worker process.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Prefix of every exchange and queue name, so several fleets (or parallel tests)
    /// share one broker without seeing each other.
    pub namespace: String,
    pub amqp: AmqpConfig,
    pub pushgateway: PushgatewayConfig,
    pub worker: WorkerConfig,
    pub retry: RetryConfig,
    pub producer: ProducerConfig,
    pub tracker: TrackerConfig,
    /// Provider definitions by name; the name is the items queue's routing key.
    pub providers: BTreeMap<String, ProviderConfig>,
}

/// RabbitMQ connection and queue settings.
#[derive(Debug, Clone, Deserialize)]
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
            if let Err(e) = url.parse::<lapin::uri::AMQPUri>() {
                anyhow::bail!("amqp.urls: {:?} is not an AMQP URL: {e}", crate::amqp::redact_url(&url));
            }
        }
        Ok(())
    }
}

/// Where and how often metrics are pushed.
#[derive(Debug, Clone, Deserialize)]
pub struct PushgatewayConfig {
    /// Base URL; an empty string disables pushing.
    pub url: String,
    pub push_interval_s: u64,
    /// Groups of workers that have not pushed for this long are deleted by the tracker.
    pub stale_group_s: u64,
    pub timeout_s: u64,
    /// Optional basic-auth user; the password comes from `FLEET__PUSHGATEWAY__PASSWORD`.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
}

/// Worker process settings.
#[derive(Debug, Clone, Deserialize)]
pub struct WorkerConfig {
    /// Identity in logs, results and the Pushgateway group; generated when empty.
    #[serde(default)]
    pub id: Option<String>,
    /// Upper bound on requests in flight per provider in this process (AMQP prefetch).
    pub max_in_flight: u16,
    /// On SIGTERM, how long in-flight items may take to finish before the worker exits.
    pub drain_timeout_s: u64,
    /// Providers to serve; empty means every provider in the config.
    #[serde(default)]
    pub providers: Vec<String>,
}

/// In-process retries of transient provider failures.
#[derive(Debug, Clone, Deserialize)]
pub struct RetryConfig {
    /// Calls to the provider for one item, the first included.
    pub max_attempts: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// Total time spent sleeping between attempts of one item before giving up.
    pub max_elapsed_s: u64,
    /// Delay-queue tiers: after the in-process budget, an item waits in the tier for its
    /// attempt number (the last tier repeats) instead of holding a prefetch slot.
    #[serde(default = "default_tiers")]
    pub delay_tiers_s: Vec<u64>,
    /// Passes through a delay queue before the item ends failed with its last error.
    #[serde(default)]
    pub max_delays: u32,
    /// Time from an item's first delay after which it ends failed rather than wait again.
    #[serde(default)]
    pub delay_budget_s: u64,
}

fn default_tiers() -> Vec<u64> {
    vec![5, 30, 120, 600]
}

/// Producer settings.
#[derive(Debug, Clone, Deserialize)]
pub struct ProducerConfig {
    /// Largest accepted request body (bytes of the `body` JSON).
    pub max_body_bytes: usize,
    /// Publishes awaiting a broker confirm at once.
    pub confirm_window: usize,
    /// Deadline of a job when `submit --deadline` is not given (0: none).
    #[serde(default)]
    pub default_deadline_s: u64,
}

/// The job tracker role.
#[derive(Debug, Clone, Deserialize)]
pub struct TrackerConfig {
    /// Whether this worker may take the tracker role.
    pub enabled: bool,
    pub checkpoint_interval_ms: u64,
    /// How long finished jobs stay queryable.
    pub retention_s: u64,
}

/// The API dialect a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// OpenAI or any OpenAI-compatible server (vLLM, llama.cpp, the mock).
    Openai,
    /// Anthropic's Messages API.
    Anthropic,
}

/// One provider the fleet can call.
#[derive(Debug, Clone, Deserialize)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    /// The request's `url` (e.g. `/v1/chat/completions`) is appended to this.
    pub base_url: String,
    /// Name of the environment variable holding the API key (never the key itself).
    #[serde(default)]
    pub api_key_env: Option<String>,
    pub timeout_s: u64,
    pub max_in_flight: u16,
    /// Optional requests-per-minute ceiling for this worker (the adaptive rate stays below).
    #[serde(default)]
    pub rpm: Option<u32>,
    /// Optional tokens-per-minute ceiling for this worker (tokens estimated from the body).
    #[serde(default)]
    pub tpm: Option<u32>,
}

impl Config {
    /// Loads defaults, then `path` (or the file named by `FLEET_CONFIG`), then `FLEET__*`
    /// environment variables.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        let path: Option<PathBuf> =
            path.map(Path::to_path_buf).or_else(|| std::env::var_os("FLEET_CONFIG").map(PathBuf::from));
        let mut builder =
            config::Config::builder().add_source(config::File::from_str(DEFAULTS_TOML, config::FileFormat::Toml));
        if let Some(path) = &path {
            if !path.exists() {
                anyhow::bail!("config file {} does not exist", path.display());
            }
            builder = builder.add_source(config::File::from(path.as_path()));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("FLEET")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("worker.providers")
                .with_list_parse_key("amqp.urls"),
        );
        let cfg: Config = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.amqp.check_addresses()?;
        if self.namespace.is_empty() || self.namespace.contains(char::is_whitespace) {
            anyhow::bail!("namespace must be a non-empty word, got {:?}", self.namespace);
        }
        for name in &self.worker.providers {
            if !self.providers.contains_key(name) {
                anyhow::bail!("worker.providers names unknown provider {name:?}");
            }
        }
        if self.retry.delay_tiers_s.is_empty() || self.retry.delay_tiers_s.contains(&0) {
            anyhow::bail!("retry.delay_tiers_s must list positive numbers of seconds");
        }
        for (name, p) in &self.providers {
            if p.max_in_flight == 0 || p.timeout_s == 0 {
                anyhow::bail!("provider {name}: max_in_flight and timeout_s must be > 0");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_load_and_name_a_mock_provider() {
        let cfg = Config::load(None).unwrap();
        assert_eq!(cfg.providers["mock"].kind, ProviderKind::Openai);
        assert!(cfg.amqp.delivery_limit > 0);
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
        assert!(cfg.providers.contains_key("mock"), "defaults stay");
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
