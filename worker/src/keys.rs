//! A provider's API keys in one worker: none, one (`api_key_env`) or a pool
//! (`api_key_envs`). Each key has its own adaptive [`Limiter`], because providers limit per
//! key: a pool of N keys may send N times what one key may.
//!
//! Calls are spread over the keys in turn; a task waiting to start takes the first key with
//! room. A key the provider answers 401 or 403 leaves the rotation of this worker for good
//! (until the worker restarts): `batch_api_key_rejections_total{provider,key_env}` counts it
//! and a WARN line names the variable, never the key. The other keys carry on; when none is
//! left, items fail at once with `api_keys_rejected` instead of calling with a dead key.
//! A provider configured without a key has one keyless entry, which never leaves.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use fleet::config::{ProviderConfig, ProviderKind};
use fleet::metrics::WorkerMetrics;
use prometheus::{Gauge, IntCounterVec, IntGauge};
use reqwest::header::{HeaderName, HeaderValue};

use crate::limit::{Limiter, Permit};

/// One key of a provider with its limiter.
pub struct PooledKey {
    /// The variable the key came from: the only name of the key that is ever shown.
    pub env: Option<String>,
    /// The key header, marked sensitive (never logged, never shown by `Debug`).
    pub auth: Option<(HeaderName, HeaderValue)>,
    pub limiter: Limiter,
    retired: AtomicBool,
}

/// The keys of one provider in one worker.
pub struct KeyPool {
    provider: String,
    keys: Vec<PooledKey>,
    /// Round-robin position.
    next: AtomicUsize,
    /// The provider's `batch_concurrency_limit` and `batch_rate_limit_rps`: sums over the
    /// keys in rotation (each key's limiter keeps its own, unregistered gauges).
    limit_gauge: IntGauge,
    rate_gauge: Gauge,
    active_gauge: IntGauge,
    rejections: IntCounterVec,
}

impl KeyPool {
    /// Reads the keys from the environment. A variable that is unset or empty gives an entry
    /// without a key (the worker refuses to start in that case before getting here; see
    /// `Config::missing_api_keys`).
    pub fn new(name: &str, cfg: &ProviderConfig, max_in_flight: u16, metrics: &WorkerMetrics) -> anyhow::Result<Self> {
        let envs: Vec<Option<String>> = match cfg.key_envs() {
            envs if envs.is_empty() => vec![None],
            envs => envs.into_iter().map(Some).collect(),
        };
        let mut keys = Vec::with_capacity(envs.len());
        for env in envs {
            let auth = match env.as_deref().map(std::env::var) {
                Some(Ok(key)) if !key.is_empty() => Some(key_header(cfg.kind, &key).map_err(|()| {
                    let var = env.as_deref().unwrap_or_default();
                    anyhow::anyhow!("provider {name}: the API key in ${var} is not a valid header value")
                })?),
                Some(_) => {
                    let var = env.as_deref().unwrap_or_default();
                    tracing::warn!(provider = name, env = var, "API key variable is not set; calling without a key");
                    None
                }
                None => None,
            };
            // Detached gauges: the pool publishes the provider's totals.
            let limiter = Limiter::new(
                max_in_flight,
                cfg.rpm,
                cfg.tpm,
                IntGauge::new("key_limit", "per-key in-flight limit").expect("valid gauge"),
                Gauge::new("key_rate", "per-key rate").expect("valid gauge"),
            );
            keys.push(PooledKey { env, auth, limiter, retired: AtomicBool::new(false) });
        }
        let pool = KeyPool {
            provider: name.to_string(),
            keys,
            next: AtomicUsize::new(0),
            limit_gauge: metrics.concurrency_limit.with_label_values(&[name]),
            rate_gauge: metrics.rate_limit.with_label_values(&[name]),
            active_gauge: metrics.keys_active.with_label_values(&[name]),
            rejections: metrics.key_rejections.clone(),
        };
        pool.update_gauges();
        Ok(pool)
    }

    /// The key at `i` (an index [`KeyPool::room`] or [`KeyPool::take`] gave).
    pub fn key(&self, i: usize) -> &PooledKey {
        &self.keys[i]
    }

    /// The key of provider batch-API calls (batch mode): the first key still in rotation.
    /// Always the same key while it is accepted, because a provider shows a batch and its
    /// files only to keys of the project that created them.
    pub fn batch_auth(&self) -> Option<&(HeaderName, HeaderValue)> {
        let first = self.active().first().copied().unwrap_or(0);
        self.keys.get(first).and_then(|k| k.auth.as_ref())
    }

    fn active(&self) -> Vec<usize> {
        (0..self.keys.len()).filter(|&i| !self.keys[i].retired.load(Ordering::Relaxed)).collect()
    }

    /// Waits until a key in rotation has room for a task that has not started (see
    /// [`Limiter::room`]) and returns it; the task's first call then uses
    /// [`KeyPool::take`] with it. With no key left it returns `None` at once (the call
    /// then fails without being made).
    pub async fn room(&self) -> Option<usize> {
        let active = self.active();
        if let [i] = active[..] {
            self.keys[i].limiter.room().await;
            return Some(i);
        }
        if active.is_empty() {
            return None;
        }
        // Starting the scan at the round-robin position spreads the starts over the keys:
        // `select_all` takes the first ready future in order. A future that loses is dropped
        // before it counted a start (a limiter counts one only as it returns).
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let waits = (0..active.len()).map(|j| {
            let i = active[(start + j) % active.len()];
            Box::pin(async move {
                self.keys[i].limiter.room().await;
                i
            })
        });
        Some(futures::future::select_all(waits).await.0)
    }

    /// A slot to call with: the key `started` (the one [`KeyPool::room`] gave this task)
    /// when it is still in rotation, else the next key in rotation. `None` when every key
    /// was rejected.
    pub async fn take(&self, started: Option<usize>, est_tokens: u64) -> Option<(usize, Permit<'_>)> {
        if let Some(i) = started {
            let permit = self.keys[i].limiter.acquire_started(est_tokens).await;
            if !self.keys[i].retired.load(Ordering::Relaxed) {
                return Some((i, permit));
            }
            // Rejected meanwhile: give back the slot `room` counted, and use another key.
        }
        let active = self.active();
        if active.is_empty() {
            return None;
        }
        let i = active[self.next.fetch_add(1, Ordering::Relaxed) % active.len()];
        Some((i, self.keys[i].limiter.acquire(est_tokens).await))
    }

    /// Whether the provider is configured without keys.
    fn keyless(&self) -> bool {
        self.keys.iter().all(|k| k.env.is_none())
    }

    /// The provider answered 401/403 to key `i`: it leaves the rotation. Returns whether
    /// another key is left to retry with. A keyless provider's entry never leaves.
    pub fn reject(&self, i: usize, status: u16) -> bool {
        let key = &self.keys[i];
        let Some(env) = &key.env else { return false };
        if !key.retired.swap(true, Ordering::Relaxed) {
            self.rejections.with_label_values(&[&self.provider, env]).inc();
            let left = self.active().len();
            tracing::warn!(
                provider = %self.provider,
                env = %env,
                status,
                keys_left = left,
                "the provider rejected the API key in this variable; it leaves the rotation"
            );
            if left == 0 {
                tracing::error!(provider = %self.provider, keys = %self.env_names(), "every API key of the provider was rejected; its items fail until the keys are fixed and the worker restarted");
            }
            self.update_gauges();
        }
        !self.active().is_empty()
    }

    /// The variables of every key, for messages (`KEY_A, KEY_B`).
    pub fn env_names(&self) -> String {
        self.keys.iter().filter_map(|k| k.env.as_deref()).collect::<Vec<_>>().join(", ")
    }

    /// Publishes the provider's in-flight limit and rate: sums over the keys in rotation
    /// (a rate of 0 means one key is not paced, so neither is the provider).
    pub fn update_gauges(&self) {
        let active = self.active();
        self.active_gauge.set(if self.keyless() { 0 } else { active.len() as i64 });
        let limit: usize = active.iter().map(|&i| self.keys[i].limiter.limit()).sum();
        let rates: Option<Vec<f64>> = active.iter().map(|&i| self.keys[i].limiter.rate()).collect();
        self.limit_gauge.set(limit as i64);
        self.rate_gauge.set(rates.map_or(0.0, |r| r.iter().sum()));
    }
}

/// The key header of a provider kind, marked sensitive. `Err` when the key holds bytes no
/// header may carry (the key itself is never put in an error).
fn key_header(kind: ProviderKind, key: &str) -> Result<(HeaderName, HeaderValue), ()> {
    let (name, value) = match kind {
        ProviderKind::Openai => (reqwest::header::AUTHORIZATION, format!("Bearer {key}")),
        ProviderKind::Anthropic => (HeaderName::from_static("x-api-key"), key.to_string()),
    };
    let mut value = HeaderValue::from_str(&value).map_err(|_| ())?;
    value.set_sensitive(true);
    Ok((name, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(envs: &[(&str, &str)]) -> KeyPool {
        for (var, key) in envs {
            std::env::set_var(var, key);
        }
        let cfg = ProviderConfig {
            api_key_envs: envs.iter().map(|(v, _)| v.to_string()).collect(),
            max_in_flight: 4,
            ..ProviderConfig::new(ProviderKind::Openai, "http://h")
        };
        KeyPool::new("p", &cfg, 4, &WorkerMetrics::new()).unwrap()
    }

    #[tokio::test]
    async fn calls_take_the_keys_in_turn_and_a_rejected_key_leaves() {
        let p = pool(&[("KEYS_TEST_A", "a"), ("KEYS_TEST_B", "b"), ("KEYS_TEST_C", "c")]);
        let mut used = Vec::new();
        for _ in 0..6 {
            used.push(p.take(None, 0).await.unwrap().0);
        }
        assert_eq!(used.iter().filter(|&&i| i == 0).count(), 2, "{used:?}");
        assert!(p.reject(1, 401), "two keys are left");
        assert!(!p.reject(1, 401) || p.active().len() == 2, "rejecting twice counts once");
        assert_eq!(p.rejections.with_label_values(&["p", "KEYS_TEST_B"]).get(), 1);
        assert_eq!(p.active_gauge.get(), 2);
        for _ in 0..6 {
            assert_ne!(p.take(None, 0).await.unwrap().0, 1, "the rejected key is not used");
        }
        // The key `room` chose was rejected meanwhile: another key is used.
        let i = p.room().await.unwrap();
        p.reject(i, 403);
        let (j, _) = p.take(Some(i), 0).await.unwrap();
        assert_ne!(i, j);
        assert!(!p.reject(j, 401), "the last key gone");
        assert!(p.take(None, 0).await.is_none(), "no key left: no call");
        assert_eq!(p.room().await, None, "room returns at once with no key left");
    }

    #[tokio::test]
    async fn a_provider_without_keys_never_loses_its_entry() {
        let p = pool(&[]);
        assert!(!p.reject(0, 401));
        assert!(p.take(None, 0).await.is_some());
    }

    #[test]
    fn the_api_key_header_is_sensitive() {
        for kind in [ProviderKind::Openai, ProviderKind::Anthropic] {
            let (_, v) = key_header(kind, "sk-secret").unwrap();
            assert!(v.is_sensitive());
            assert!(!format!("{v:?}").contains("sk-secret"));
        }
        assert!(key_header(ProviderKind::Anthropic, "bad\nkey").is_err());
    }
}
