//! A provider's API keys in one worker: none, one (`api_key_env`) or a pool
//! (`api_key_envs`). Each key has its own adaptive [`Limiter`], because providers limit per
//! key: a pool of N keys may send N times what one key may.
//!
//! Calls are spread over the keys in turn; a task waiting to start takes the first key with
//! room. A key leaves the rotation of this worker only for its own fault (the provider
//! decides that, see [`crate::provider`]'s key verdicts: a request the key may not make is
//! the request's fault): `batch_api_key_rejections_total{provider,key_env}` counts it and a
//! WARN line names the variable, never the key. The other keys carry on; when none is left,
//! items fail at once with `api_keys_rejected` instead of calling with a dead key.
//!
//! A retired key is not gone for good: `key_retry_s` after it left, the next call of the
//! provider (or the client's watch, while no item comes) first probes it (a key-only
//! request) and brings it back when the provider accepts it, or keeps it out for another
//! period. A provider configured without a key has one keyless entry, which never leaves.
//!
//! With no key left the pool is not usable ([`KeyPool::usable`]): the worker stops taking
//! the provider's items (they stay queued for workers whose keys work) until a probe finds
//! a key good again; `batch_provider_paused{provider}` says so.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
    /// Paces this key's calls within its own limits (`rpm`, `tpm`, in flight).
    pub limiter: Limiter,
    retired: AtomicBool,
    /// When the key may be probed again (set while it is retired).
    probe_at: Mutex<Option<Instant>>,
}

/// The keys of one provider in one worker.
pub struct KeyPool {
    provider: String,
    keys: Vec<PooledKey>,
    /// Round-robin position.
    next: AtomicUsize,
    /// How long a retired key stays out before it is probed (`key_retry_s`).
    retry_after: Duration,
    /// The provider's `batch_concurrency_limit` and `batch_rate_limit_rps`: sums over the
    /// keys in rotation (each key's limiter keeps its own, unregistered gauges).
    limit_gauge: IntGauge,
    rate_gauge: Gauge,
    active_gauge: IntGauge,
    paused_gauge: IntGauge,
    rejections: IntCounterVec,
    /// Whether a key is left (always, for a keyless provider); watched by the consumers.
    usable: tokio::sync::watch::Sender<bool>,
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
            keys.push(PooledKey { env, auth, limiter, retired: AtomicBool::new(false), probe_at: Mutex::new(None) });
        }
        let pool = KeyPool {
            provider: name.to_string(),
            keys,
            next: AtomicUsize::new(0),
            retry_after: Duration::from_secs(cfg.key_retry_s),
            limit_gauge: metrics.concurrency_limit.with_label_values(&[name]),
            rate_gauge: metrics.rate_limit.with_label_values(&[name]),
            active_gauge: metrics.keys_active.with_label_values(&[name]),
            paused_gauge: metrics.provider_paused.with_label_values(&[name]),
            rejections: metrics.key_rejections.clone(),
            usable: tokio::sync::watch::channel(true).0,
        };
        pool.update_gauges();
        Ok(pool)
    }

    /// The key at `i` (an index [`KeyPool::room`] or [`KeyPool::take`] gave).
    pub fn key(&self, i: usize) -> &PooledKey {
        &self.keys[i]
    }

    /// The key a new provider batch is created with (batch mode): the first key still in
    /// rotation (the first key when none is). The chunk then records the key's variable
    /// ([`KeyPool::by_env`] finds it again), because a provider shows a batch and its files
    /// only to keys of the project that created them.
    pub fn batch_key(&self) -> usize {
        self.active().first().copied().unwrap_or(0)
    }

    /// The key read from variable `env`, if this worker has it.
    pub fn by_env(&self, env: &str) -> Option<usize> {
        self.keys.iter().position(|k| k.env.as_deref() == Some(env))
    }

    /// Whether the key at `i` is out of the rotation (rejected, waiting for its probe).
    pub fn is_retired(&self, i: usize) -> bool {
        self.keys[i].retired.load(Ordering::Relaxed)
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

    /// The provider refused key `i` as a key: it leaves the rotation until a probe
    /// `key_retry_s` from now finds it good. Returns whether another key is left to retry
    /// with. A keyless provider's entry never leaves.
    pub fn reject(&self, i: usize, status: u16) -> bool {
        let key = &self.keys[i];
        let Some(env) = &key.env else { return false };
        if !key.retired.swap(true, Ordering::Relaxed) {
            *key.probe_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + self.retry_after);
            self.rejections.with_label_values(&[&self.provider, env]).inc();
            let left = self.active().len();
            tracing::warn!(
                provider = %self.provider,
                env = %env,
                status,
                keys_left = left,
                retry_s = self.retry_after.as_secs(),
                "the provider rejected the API key in this variable; it leaves the rotation until a probe finds it good"
            );
            if left == 0 {
                tracing::warn!(provider = %self.provider, keys = %self.env_names(), retry_s = self.retry_after.as_secs(), "every API key of the provider was rejected: this worker takes none of its items (they stay queued for other workers) until a probe finds a key good");
            }
            self.update_gauges();
        }
        !self.active().is_empty()
    }

    /// Retired keys whose wait is over, each handed to exactly one caller (which must end
    /// the probe with [`KeyPool::probed`]): until then no other caller gets it.
    pub fn due_for_probe(&self, now: Instant) -> Vec<usize> {
        let mut due = Vec::new();
        for (i, key) in self.keys.iter().enumerate() {
            if !key.retired.load(Ordering::Relaxed) {
                continue;
            }
            let mut at = key.probe_at.lock().unwrap_or_else(|e| e.into_inner());
            if at.is_some_and(|t| t <= now) {
                // Taken: the next caller waits for this probe's verdict, or a period.
                *at = Some(now + self.retry_after);
                due.push(i);
            }
        }
        due
    }

    /// The verdict of a probe of retired key `i`: good brings it back into the rotation;
    /// otherwise it stays out another `key_retry_s`.
    pub fn probed(&self, i: usize, good: bool) {
        let key = &self.keys[i];
        let env = key.env.as_deref().unwrap_or_default();
        if good {
            *key.probe_at.lock().unwrap_or_else(|e| e.into_inner()) = None;
            key.retired.store(false, Ordering::Relaxed);
            tracing::info!(provider = %self.provider, env = %env, "the provider accepts the API key in this variable again; it is back in the rotation");
            self.update_gauges();
        } else {
            *key.probe_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + self.retry_after);
            tracing::info!(provider = %self.provider, env = %env, retry_s = self.retry_after.as_secs(), "the API key in this variable is still rejected");
        }
    }

    /// The variables of every key, for messages (`KEY_A, KEY_B`).
    pub fn env_names(&self) -> String {
        self.keys.iter().filter_map(|k| k.env.as_deref()).collect::<Vec<_>>().join(", ")
    }

    /// Whether a key is left to call with, and a receiver that sees it change.
    pub fn usable(&self) -> tokio::sync::watch::Receiver<bool> {
        self.usable.subscribe()
    }

    /// Publishes the provider's in-flight limit and rate: sums over the keys in rotation
    /// (a rate of 0 means one key is not paced, so neither is the provider), and whether
    /// the pool is usable.
    pub fn update_gauges(&self) {
        let active = self.active();
        let usable = self.keyless() || !active.is_empty();
        self.usable.send_if_modified(|u| std::mem::replace(u, usable) != usable);
        self.paused_gauge.set(i64::from(!usable));
        self.active_gauge.set(if self.keyless() { 0 } else { active.len() as i64 });
        let limit: usize = active.iter().map(|&i| self.keys[i].limiter.limit()).sum();
        let rates: Option<Vec<f64>> = active.iter().map(|&i| self.keys[i].limiter.rate()).collect();
        self.limit_gauge.set(limit as i64);
        self.rate_gauge.set(rates.map_or(0.0, |r| r.iter().sum()));
    }
}

/// Whose fault a 401/403 answer is, as its body tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFault {
    /// The key itself: unknown, revoked (OpenAI `invalid_api_key`, Anthropic
    /// `authentication_error`).
    Key,
    /// The request: a model or endpoint this key may not use (OpenAI `model_not_found`,
    /// Anthropic `permission_error`, LiteLLM's "not allowed to access model"). The key is good
    /// for other requests.
    Request,
    /// The body does not say (a gateway's own words, no JSON): a key-only probe decides.
    Unsure,
}

/// Reads a 401/403 body in the providers' error shapes (OpenAI and LiteLLM
/// `{"error": {"code", "type", "message"}}`, Anthropic `{"error": {"type", "message"}}`).
/// What names the request wins over what names the key: a key that may not use one model
/// must not leave the rotation for every other request.
pub fn key_fault(body: Option<&str>) -> KeyFault {
    let v: serde_json::Value = body.and_then(|b| serde_json::from_str(b).ok()).unwrap_or_default();
    let error = &v["error"];
    let field = |name: &str| error[name].as_str().unwrap_or_default().to_ascii_lowercase();
    let (code, kind) = (field("code"), field("type"));
    let message = error["message"].as_str().or(v["message"].as_str()).unwrap_or_default().to_ascii_lowercase();
    const REQUEST_CODES: [&str; 4] = ["model_not_found", "permission_error", "not_found_error", "unsupported_model"];
    const KEY_CODES: [&str; 3] = ["invalid_api_key", "authentication_error", "invalid_authentication"];
    if REQUEST_CODES.iter().any(|c| code == *c || kind == *c) {
        KeyFault::Request
    } else if KEY_CODES.iter().any(|c| code == *c || kind == *c) {
        KeyFault::Key
    } else if message.contains("model") || message.contains("endpoint") {
        KeyFault::Request
    } else {
        KeyFault::Unsure
    }
}

/// The key header of a provider kind, marked sensitive. `Err` when the key holds bytes no
/// header may carry (the key itself is never put in an error).
fn key_header(kind: ProviderKind, key: &str) -> Result<(HeaderName, HeaderValue), ()> {
    let (name, value) = match kind {
        ProviderKind::Openai => (reqwest::header::AUTHORIZATION, format!("Bearer {key}")),
        ProviderKind::Anthropic => (HeaderName::from_static("x-api-key"), key.to_string()),
        ProviderKind::Gemini => (HeaderName::from_static(fleet::gemini::KEY_HEADER), key.to_string()),
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

    #[test]
    fn a_rejection_names_the_key_or_the_request() {
        let openai = |code: &str, msg: &str| {
            format!(r#"{{"error":{{"message":"{msg}","type":"invalid_request_error","param":null,"code":"{code}"}}}}"#)
        };
        let anthropic = |kind: &str| format!(r#"{{"type":"error","error":{{"type":"{kind}","message":"no"}}}}"#);
        assert_eq!(key_fault(Some(&openai("invalid_api_key", "Incorrect API key provided: sk-ab***"))), KeyFault::Key);
        assert_eq!(key_fault(Some(&anthropic("authentication_error"))), KeyFault::Key);
        let no_access = openai("model_not_found", "The model `gpt-5` does not exist or you do not have access to it.");
        assert_eq!(key_fault(Some(&no_access)), KeyFault::Request);
        assert_eq!(key_fault(Some(&anthropic("permission_error"))), KeyFault::Request);
        // LiteLLM answers a key not allowed a model with its own words and a 401.
        let litellm = r#"{"error":{"message":"Authentication Error, API Key not allowed to access model. This token can only access models=['a']. Tried to access b","type":"auth_error","param":"None","code":"401"}}"#;
        assert_eq!(key_fault(Some(litellm)), KeyFault::Request);
        let litellm_bad_key = r#"{"error":{"message":"Authentication Error, Invalid proxy server token passed","type":"auth_error","param":"None","code":"401"}}"#;
        assert_eq!(key_fault(Some(litellm_bad_key)), KeyFault::Unsure);
        assert_eq!(key_fault(None), KeyFault::Unsure);
        assert_eq!(key_fault(Some("[1, 2]")), KeyFault::Unsure);
    }

    #[test]
    fn a_rejected_key_is_probed_after_its_wait_by_one_caller() {
        let p = pool(&[("KEYS_PROBE_A", "a"), ("KEYS_PROBE_B", "b")]);
        let start = Instant::now();
        assert!(p.reject(0, 401));
        assert!(p.due_for_probe(start).is_empty(), "not before key_retry_s");
        let later = start + Duration::from_secs(61);
        assert_eq!(p.due_for_probe(later), vec![0]);
        assert!(p.due_for_probe(later).is_empty(), "one probe at a time");
        p.probed(0, false);
        assert_eq!(p.active(), vec![1], "still out after a failed probe");
        assert!(p.due_for_probe(Instant::now() + Duration::from_secs(61)) == vec![0]);
        p.probed(0, true);
        assert_eq!(p.active(), vec![0, 1], "back after a good probe");
        assert_eq!(p.active_gauge.get(), 2);
    }

    #[tokio::test]
    async fn a_provider_without_keys_never_loses_its_entry() {
        let p = pool(&[]);
        assert!(!p.reject(0, 401));
        assert!(p.take(None, 0).await.is_some());
    }

    #[test]
    fn the_api_key_header_is_sensitive() {
        for kind in [ProviderKind::Openai, ProviderKind::Anthropic, ProviderKind::Gemini] {
            let (_, v) = key_header(kind, "sk-secret").unwrap();
            assert!(v.is_sensitive());
            assert!(!format!("{v:?}").contains("sk-secret"));
        }
        assert!(key_header(ProviderKind::Anthropic, "bad\nkey").is_err());
    }
}
