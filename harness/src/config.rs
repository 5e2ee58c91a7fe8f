//! The config file of a fleet on one namespace, as the tests and the benchmark write it for
//! their workers and producers.

use std::fmt;
use std::path::Path;

use anyhow::Context as _;

/// A fleet's TOML config, built up from the settings every fleet here shares.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    table: toml::Table,
}

impl FleetConfig {
    /// `namespace`, `amqp.url` and `pushgateway.url`: what every fleet needs; and
    /// `fleet.signing_key_env` naming [`crate::TEST_SIGNING_KEY_ENV`], which
    /// [`crate::worker_command`] sets, so every fleet here signs its internal messages.
    pub fn new(namespace: &str, amqp_url: &str, pushgateway_url: &str) -> FleetConfig {
        FleetConfig { table: toml::Table::new() }
            .set("", "namespace", namespace)
            .set("amqp", "url", amqp_url)
            .set("pushgateway", "url", pushgateway_url)
            .set("fleet", "signing_key_env", crate::TEST_SIGNING_KEY_ENV)
    }

    /// `amqp.urls`, which replaces `amqp.url` when not empty (a cluster's nodes).
    pub fn amqp_urls(self, urls: &[String]) -> FleetConfig {
        self.set("amqp", "urls", urls.to_vec())
    }

    /// An OpenAI-compatible provider `name` at `base_url` (the mock).
    pub fn openai_provider(self, name: &str, base_url: &str) -> FleetConfig {
        let table = format!("providers.{name}");
        self.set(&table, "kind", "openai").set(&table, "base_url", base_url)
    }

    /// Sets `key` of table `table` (dotted, e.g. `providers.mock`; empty for the top level),
    /// creating the table if needed.
    pub fn set(mut self, table: &str, key: &str, value: impl Into<toml::Value>) -> FleetConfig {
        let mut t = &mut self.table;
        for part in table.split('.').filter(|p| !p.is_empty()) {
            let entry = t.entry(part).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            t = entry.as_table_mut().unwrap_or_else(|| panic!("{part} of {table} is not a table"));
        }
        t.insert(key.to_string(), value.into());
        self
    }

    /// Merges the tables of `extra` (TOML text) in; keys of `extra` win.
    pub fn merge(mut self, extra: &str) -> anyhow::Result<FleetConfig> {
        fn merge(into: &mut toml::Table, from: toml::Table) {
            for (k, v) in from {
                match (into.get_mut(&k), v) {
                    (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
                    (_, v) => {
                        into.insert(k, v);
                    }
                }
            }
        }
        merge(&mut self.table, extra.parse().context("extra config is not TOML")?);
        Ok(self)
    }

    /// `amqp.url` as it stands (after merges).
    pub fn amqp_url(&self) -> Option<&str> {
        self.table.get("amqp")?.get("url")?.as_str()
    }

    /// Writes the file.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, self.to_string()).with_context(|| format!("writing {}", path.display()))
    }
}

impl fmt::Display for FleetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_config_loads_with_merged_settings() {
        let dir = std::env::temp_dir().join(format!("harness-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = FleetConfig::new("t.cfg.1", "amqp://x", "http://pg")
            .openai_provider("mock", "http://127.0.0.1:1")
            .set("providers.mock", "max_in_flight", 1000)
            .set("worker", "max_in_flight", 1000)
            .merge("[amqp]\nurl = \"amqp://y\"\n[retry]\ndelay_tiers_s = [1, 2]\n")
            .unwrap();
        assert_eq!(cfg.amqp_url(), Some("amqp://y"));
        cfg.write(&dir.join("f.toml")).unwrap();
        let loaded = fleet::Config::load(Some(&dir.join("f.toml"))).unwrap();
        assert_eq!(loaded.namespace, "t.cfg.1");
        assert_eq!(loaded.worker.max_in_flight, 1000);
        assert_eq!(loaded.providers["mock"].max_in_flight, 1000);
        assert_eq!(loaded.providers["mock"].base_url, "http://127.0.0.1:1");
        assert_eq!(loaded.retry.delay_tiers_s, vec![1, 2]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
