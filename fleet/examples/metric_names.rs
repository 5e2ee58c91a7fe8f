//! Prints every metric the fleet exports, as JSON: `[{"name": ..., "kind": ...}, ...]`,
//! sorted by name, one entry per name (a metric pushed by workers and the tracker alike is
//! listed once). `scripts/check-assets.sh` checks the dashboard's and the alerts' metric
//! names against it, so the list lives in one place, the code
//! ([`fleet::metrics::WORKER_METRICS`] and the others).
//!
//! `cargo run -q -p fleet --example metric_names`

use std::collections::BTreeMap;

use fleet::metrics::{API_METRICS, TRACKER_METRICS, WORKER_METRICS};

fn main() {
    let mut all = BTreeMap::new();
    for (name, kind) in WORKER_METRICS.iter().chain(TRACKER_METRICS).chain(API_METRICS) {
        if let Some(other) = all.insert(*name, *kind) {
            assert_eq!(other, *kind, "{name} has one kind");
        }
    }
    let list: Vec<_> =
        all.iter().map(|(name, kind)| serde_json::json!({ "name": name, "kind": kind.as_str() })).collect();
    println!("{}", serde_json::Value::Array(list));
}
