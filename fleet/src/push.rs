//! The Pushgateway client and the background pusher.
//!
//! The `prometheus` crate's own push helper is blocking (and panics inside a tokio
//! runtime) and cannot delete groups, so pushes are async reqwest calls here: `PUT` replaces
//! a whole group, `DELETE` removes one, and the JSON API lists groups with their last push
//! time (used by the tracker to prune groups of workers long gone).
//!
//! Pushing is off the hot path: a slow or absent Pushgateway costs a failed request per
//! interval, counted in `batch_push_failures_total` and logged at most every 30 s.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use prometheus::{IntCounter, Registry};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::PushgatewayConfig;

/// A Pushgateway at one base URL.
#[derive(Clone)]
pub struct Pushgateway {
    client: reqwest::Client,
    base: String,
    username: Option<String>,
    password: Option<String>,
}

/// One group on the Pushgateway: its grouping labels and last successful push.
#[derive(Debug, Clone)]
pub struct Group {
    /// The grouping labels by name, `job` included.
    pub labels: BTreeMap<String, String>,
    /// Unix seconds of the last successful push.
    pub push_time_s: f64,
}

impl Pushgateway {
    /// `None` when pushing is disabled (empty URL).
    pub fn from_config(cfg: &PushgatewayConfig) -> Option<Self> {
        if cfg.url.trim().is_empty() {
            return None;
        }
        let client = reqwest::Client::builder().timeout(Duration::from_secs(cfg.timeout_s.max(1))).build().ok()?;
        Some(Pushgateway {
            client,
            base: cfg.url.trim_end_matches('/').to_string(),
            username: cfg.username.clone(),
            password: cfg.password.clone(),
        })
    }

    /// A Pushgateway at `url` without authentication (tests, benchmarks, tools).
    pub fn at(url: &str) -> Option<Self> {
        let cfg = PushgatewayConfig {
            url: url.to_string(),
            push_interval_s: 5,
            stale_group_s: 3600,
            timeout_s: 5,
            username: None,
            password: None,
        };
        Pushgateway::from_config(&cfg)
    }

    fn group_url(&self, key: &GroupKey) -> String {
        let mut url = format!("{}/metrics/job/{}", self.base, path_safe(&key.job));
        for (k, v) in &key.labels {
            url.push_str(&format!("/{k}/{}", path_safe(v)));
        }
        url
    }

    fn auth(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.username {
            Some(u) => req.basic_auth(u, self.password.as_deref()),
            None => req,
        }
    }

    /// Replaces the group's metrics with `registry`'s.
    pub async fn push(&self, key: &GroupKey, registry: &Registry) -> anyhow::Result<()> {
        self.push_encoded(key, crate::metrics::encode(registry)).await
    }

    /// Replaces the group's metrics with an already encoded text exposition.
    pub async fn push_encoded(&self, key: &GroupKey, body: Vec<u8>) -> anyhow::Result<()> {
        let resp = self
            .auth(self.client.put(self.group_url(key)))
            .header("content-type", "text/plain; version=0.0.4")
            .body(body)
            .send()
            .await?;
        if !resp.status().is_success() {
            anyhow::bail!("pushgateway answered {}", resp.status());
        }
        Ok(())
    }

    /// Deletes a group.
    pub async fn delete(&self, key: &GroupKey) -> anyhow::Result<()> {
        let resp = self.auth(self.client.delete(self.group_url(key))).send().await?;
        if !resp.status().is_success() {
            anyhow::bail!("pushgateway answered {}", resp.status());
        }
        Ok(())
    }

    /// Deletes every group of `namespace` (a finished test's or benchmark's), returning how
    /// many there were: a Pushgateway keeps groups forever and Prometheus scrapes them all.
    pub async fn delete_namespace(&self, namespace: &str) -> anyhow::Result<usize> {
        let mut deleted = 0;
        for group in self.groups().await? {
            if group.labels.get("namespace").map(String::as_str) != Some(namespace) {
                continue;
            }
            if let Some(key) = GroupKey::from_labels(&group.labels) {
                self.delete(&key).await?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    /// Every group on the Pushgateway.
    pub async fn groups(&self) -> anyhow::Result<Vec<Group>> {
        let v: serde_json::Value = self
            .auth(self.client.get(format!("{}/api/v1/metrics", self.base)))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let mut out = Vec::new();
        for g in v["data"].as_array().into_iter().flatten() {
            let labels = g["labels"]
                .as_object()
                .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string())).collect())
                .unwrap_or_default();
            let push_time_s = g["push_time_seconds"]["metrics"][0]["value"]
                .as_str()
                .and_then(|s| s.parse::<f64>().ok())
                .unwrap_or(0.0);
            out.push(Group { labels, push_time_s });
        }
        Ok(out)
    }
}

/// The grouping key of a Pushgateway group: `job` plus further labels, in URL order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupKey {
    /// The `job` label: [`WORKER_JOB`] or [`TRACKER_JOB`] for the fleet's own groups.
    pub job: String,
    /// The other grouping labels, `(name, value)`, in the order the URL names them.
    pub labels: Vec<(String, String)>,
}

impl GroupKey {
    /// A worker's group: `job="batch_worker", namespace=<ns>, instance=<worker id>`.
    pub fn worker(namespace: &str, worker_id: &str) -> Self {
        GroupKey {
            job: WORKER_JOB.into(),
            labels: vec![("namespace".into(), namespace.into()), ("instance".into(), worker_id.into())],
        }
    }

    /// The tracker's group: `job="batch_tracker", namespace=<ns>` (one per fleet, so a
    /// takeover replaces the previous tracker's values instead of adding to them).
    pub fn tracker(namespace: &str) -> Self {
        GroupKey { job: TRACKER_JOB.into(), labels: vec![("namespace".into(), namespace.into())] }
    }

    /// The key of a group listed by [`Pushgateway::groups`].
    pub fn from_labels(labels: &BTreeMap<String, String>) -> Option<Self> {
        let job = labels.get("job")?.clone();
        let labels = labels.iter().filter(|(k, _)| *k != "job").map(|(k, v)| (k.clone(), v.clone())).collect();
        Some(GroupKey { job, labels })
    }
}

/// `job` label of worker groups.
pub const WORKER_JOB: &str = "batch_worker";
/// `job` label of the tracker group.
pub const TRACKER_JOB: &str = "batch_tracker";

/// Grouping label values go into the URL path; a `/` would split them.
fn path_safe(s: &str) -> String {
    s.replace('/', "_")
}

/// How soon a changed registry is pushed: a worker killed while busy loses at most about
/// this much of its counter increments (the tracker's counts are exact regardless).
pub const BUSY_PUSH_GAP: Duration = Duration::from_secs(1);

/// What a pusher pushes.
pub enum Source {
    /// A registry, encoded afresh at every tick (a worker's live counters).
    Registry(Registry),
    /// The newest of a series of encoded snapshots (the tracker's: the metrics of its last
    /// checkpoint, so it never pushes a value a takeover would not restore).
    Snapshots(watch::Receiver<Option<Vec<u8>>>),
}

impl From<Registry> for Source {
    fn from(registry: Registry) -> Self {
        Source::Registry(registry)
    }
}

impl Source {
    /// The text exposition to push now, if there is one yet.
    fn current(&mut self) -> Option<Vec<u8>> {
        match self {
            // Encoding a worker's registry takes microseconds: cheap enough to compare.
            Source::Registry(registry) => Some(crate::metrics::encode(registry)),
            Source::Snapshots(rx) => rx.borrow_and_update().clone(),
        }
    }
}

/// Pushes `source` as one group: within [`BUSY_PUSH_GAP`] of a change, and at least every
/// `interval` (so the group's push time stays fresh while idle), until `stop` fires, then
/// once more so the final values (a worker's last counter increments, `batch_worker_up 0`)
/// reach the Pushgateway. Returns a handle to await that final push. A failed push counts
/// in `failures` and is logged at most every 30 s.
pub fn spawn_pusher(
    pg: Option<Pushgateway>,
    key: GroupKey,
    source: impl Into<Source>,
    interval: Duration,
    failures: IntCounter,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let mut source = source.into();
    tokio::spawn(async move {
        let Some(pg) = pg else { return };
        let mut last_warn: Option<Instant> = None;
        let mut tick = tokio::time::interval(interval.min(BUSY_PUSH_GAP));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pushed: Option<(Instant, Vec<u8>)> = None;
        loop {
            let stopping = tokio::select! {
                _ = stop.cancelled() => true,
                _ = tick.tick() => false,
            };
            let Some(body) = source.current() else {
                if stopping {
                    return;
                }
                continue;
            };
            let due = match &pushed {
                None => true,
                Some((at, last)) => at.elapsed() >= interval || *last != body,
            };
            if !due && !stopping {
                continue;
            }
            match pg.push_encoded(&key, body.clone()).await {
                Ok(()) => pushed = Some((Instant::now(), body)),
                Err(e) => {
                    failures.inc();
                    // A Pushgateway outage would otherwise log every second on every pusher.
                    if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
                        tracing::warn!(error = %e, "metrics push failed for group {} (counted in batch_push_failures_total)", key.job);
                        last_warn = Some(Instant::now());
                    }
                }
            }
            if stopping {
                return;
            }
        }
    })
}
