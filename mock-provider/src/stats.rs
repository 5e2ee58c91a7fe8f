//! Owns the request counters behind `GET /stats`: lock-free atomics updated on the hot path and
//! a serialisable snapshot for readers.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::{Deserialize, Serialize};

use crate::api::Endpoint;
use crate::batches::BatchStats;
use crate::gemini::Method as GeminiMethod;

/// Statuses are counted in a flat array indexed by code: one relaxed atomic add per answer and
/// no lock, which matters at tens of thousands of requests per second on two cores.
const STATUS_SLOTS: usize = 600;

/// Live counters of everything the `/v1` routes received and answered.
#[derive(Debug)]
pub struct Stats {
    requests: AtomicU64,
    by_status: Box<[AtomicU64]>,
    by_path: [AtomicU64; Endpoint::ALL.len()],
    /// Requests per Gemini method (`crate::gemini::Method::ALL` order), listed in `by_path`.
    by_gemini: [AtomicU64; GeminiMethod::ALL.len()],
    hung: AtomicU64,
    garbage: AtomicU64,
    stolen: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    tokens_admitted: AtomicU64,
    tpm_refused: AtomicU64,
    unauthorized: AtomicU64,
    other_project: AtomicU64,
    models_listed: AtomicU64,
    input_tokens: AtomicU64,
    output_tokens: AtomicU64,
    cached_input_tokens: AtomicU64,
    flex_requests: AtomicU64,
    flex_refused: AtomicU64,
}

/// The JSON document served by `GET /stats`.
///
/// `by_status` and `by_path` only list non-zero entries. A hung request counts in `hung` and in
/// no status; a garbage answer counts both in `garbage` and as `"200"`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    /// Requests received on the `/v1` routes.
    pub requests: u64,
    /// Answers per HTTP status code (as a decimal string).
    pub by_status: BTreeMap<String, u64>,
    /// Requests per route path (Gemini's as `/v1beta/models/{model}:<method>`).
    pub by_path: BTreeMap<String, u64>,
    /// Requests deliberately never answered.
    pub hung: u64,
    /// Answers with a non-JSON 200 body.
    pub garbage: u64,
    /// Requests that reached the target of a hostile redirect (a client that follows
    /// redirects; the fleet's worker never should).
    #[serde(default)]
    pub stolen: u64,
    /// `/v1` requests currently being handled (including hung ones whose client is still there).
    pub in_flight: u64,
    /// Highest `in_flight` seen since start or the last reset.
    pub max_in_flight: u64,
    /// The provider-batch counters (batches created per tag, files, ...).
    #[serde(default)]
    pub batches: BatchStats,
    /// Tokens charged to the requests `--tpm` let through, counted as providers count them
    /// (prompt plus requested output; 0 without `--tpm`).
    #[serde(default)]
    pub tokens_admitted: u64,
    /// Requests `--tpm` answered 429.
    #[serde(default)]
    pub tpm_refused: u64,
    /// Requests answered 401 because their key is not one of `--valid-keys`.
    #[serde(default)]
    pub unauthorized: u64,
    /// Requests for a batch or file of another key's project, answered 404 (`--key-projects`).
    #[serde(default)]
    pub other_project: u64,
    /// `GET /v1/models` calls answered (a client checking its key).
    #[serde(default)]
    pub models_listed: u64,
    /// Tokens reported in the `usage` of the successful answers sent (input: OpenAI's
    /// `prompt_tokens`, Anthropic's `input_tokens`; output: `completion_tokens` /
    /// `output_tokens`): what a client summing usage must find.
    #[serde(default)]
    pub usage: UsageTotals,
    /// The flex tier: requests that asked for it (`service_tier: "flex"`), and those refused
    /// for capacity (`--flex-unavailable`).
    #[serde(default)]
    pub flex: FlexTotals,
}

/// Requests on the flex tier.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlexTotals {
    /// Valid requests whose body asked for `service_tier: "flex"`.
    pub requests: u64,
    /// Of those, the ones answered 429 "resource unavailable" or 498 `capacity_exceeded`.
    pub refused: u64,
}

/// Token totals of the answers sent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageTotals {
    /// Prompt tokens (OpenAI's `prompt_tokens`, Anthropic's `input_tokens`).
    pub input_tokens: u64,
    /// Generated tokens (OpenAI's `completion_tokens`, Anthropic's `output_tokens`).
    pub output_tokens: u64,
    /// Of the input tokens, those reported as read from a cache (Gemini's
    /// `cachedContentTokenCount`).
    #[serde(default)]
    pub cached_input_tokens: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            requests: AtomicU64::new(0),
            by_status: (0..STATUS_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            by_path: Default::default(),
            by_gemini: Default::default(),
            hung: AtomicU64::new(0),
            garbage: AtomicU64::new(0),
            stolen: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            tokens_admitted: AtomicU64::new(0),
            tpm_refused: AtomicU64::new(0),
            unauthorized: AtomicU64::new(0),
            other_project: AtomicU64::new(0),
            models_listed: AtomicU64::new(0),
            input_tokens: AtomicU64::new(0),
            output_tokens: AtomicU64::new(0),
            cached_input_tokens: AtomicU64::new(0),
            flex_requests: AtomicU64::new(0),
            flex_refused: AtomicU64::new(0),
        }
    }
}

/// Marks one request as in flight until dropped — including when the client disconnects and
/// the handler future is dropped mid-sleep.
#[derive(Debug)]
pub struct InFlight<'a>(&'a Stats);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

impl Stats {
    /// Counts a request arriving on `endpoint` and returns its in-flight guard.
    pub fn enter(&self, endpoint: Endpoint) -> InFlight<'_> {
        self.requests.fetch_add(1, Relaxed);
        self.by_path[endpoint as usize].fetch_add(1, Relaxed);
        let now = self.in_flight.fetch_add(1, Relaxed) + 1;
        self.max_in_flight.fetch_max(now, Relaxed);
        InFlight(self)
    }

    /// Counts a request arriving on a Gemini method and returns its in-flight guard.
    pub fn enter_gemini(&self, method: GeminiMethod) -> InFlight<'_> {
        self.requests.fetch_add(1, Relaxed);
        self.by_gemini[method as usize].fetch_add(1, Relaxed);
        let now = self.in_flight.fetch_add(1, Relaxed) + 1;
        self.max_in_flight.fetch_max(now, Relaxed);
        InFlight(self)
    }

    /// Adds the cached input tokens a successful answer reported (part of its input).
    pub fn record_cached(&self, tokens: u64) {
        self.cached_input_tokens.fetch_add(tokens, Relaxed);
    }

    /// Counts a request refused for its key with `status` (Gemini answers a bad key 400).
    pub fn record_key_refused(&self, status: u16) {
        self.unauthorized.fetch_add(1, Relaxed);
        self.record_status(status);
    }

    /// Counts an answer with `status`.
    pub fn record_status(&self, status: u16) {
        if let Some(slot) = self.by_status.get(usize::from(status)) {
            slot.fetch_add(1, Relaxed);
        }
    }

    /// Adds the usage a successful answer reported.
    pub fn record_usage(&self, input_tokens: u64, output_tokens: u64) {
        self.input_tokens.fetch_add(input_tokens, Relaxed);
        self.output_tokens.fetch_add(output_tokens, Relaxed);
    }

    /// Counts a valid request for the flex tier, and whether it was refused for capacity.
    pub fn record_flex(&self, refused: bool) {
        self.flex_requests.fetch_add(1, Relaxed);
        if refused {
            self.flex_refused.fetch_add(1, Relaxed);
        }
    }

    /// Counts a request that will never be answered.
    pub fn record_hung(&self) {
        self.hung.fetch_add(1, Relaxed);
    }

    /// Counts a garbage answer (also counted as status 200).
    pub fn record_garbage(&self) {
        self.garbage.fetch_add(1, Relaxed);
        self.record_status(200);
    }

    /// Counts the tokens of a request `--tpm` let through.
    pub fn record_tokens(&self, n: u64) {
        self.tokens_admitted.fetch_add(n, Relaxed);
    }

    /// Counts a request `--tpm` refused.
    pub fn record_tpm_refused(&self) {
        self.tpm_refused.fetch_add(1, Relaxed);
    }

    /// Counts a request refused for its key (also counted as status 401).
    pub fn record_unauthorized(&self) {
        self.unauthorized.fetch_add(1, Relaxed);
        self.record_status(401);
    }

    /// Counts a request for another key's batch or file (also counted as status 404).
    pub fn record_other_project(&self) {
        self.other_project.fetch_add(1, Relaxed);
        self.record_status(404);
    }

    /// Counts a `GET /v1/models`.
    pub fn record_models_listed(&self) {
        self.models_listed.fetch_add(1, Relaxed);
    }

    /// Counts a request that followed a hostile redirect.
    pub fn record_stolen(&self) {
        self.stolen.fetch_add(1, Relaxed);
    }

    /// Zeroes every counter. `in_flight` is a gauge, not a counter, so it is kept (zeroing it
    /// would make it underflow when the requests now in flight finish); `max_in_flight` restarts
    /// from the current `in_flight`.
    pub fn reset(&self) {
        self.requests.store(0, Relaxed);
        for slot in self.by_status.iter().chain(&self.by_path).chain(&self.by_gemini) {
            slot.store(0, Relaxed);
        }
        self.hung.store(0, Relaxed);
        self.garbage.store(0, Relaxed);
        self.stolen.store(0, Relaxed);
        for counter in [
            &self.tokens_admitted,
            &self.tpm_refused,
            &self.unauthorized,
            &self.other_project,
            &self.models_listed,
            &self.flex_requests,
            &self.flex_refused,
        ] {
            counter.store(0, Relaxed);
        }
        self.input_tokens.store(0, Relaxed);
        self.output_tokens.store(0, Relaxed);
        self.cached_input_tokens.store(0, Relaxed);
        self.max_in_flight.store(self.in_flight.load(Relaxed), Relaxed);
    }

    /// Reads every counter (the batch counters, kept by the batch APIs, are left at zero). The
    /// reads are individually atomic, not a consistent cut, which is fine once traffic has
    /// stopped (the way tests and benchmarks read it).
    pub fn snapshot(&self) -> StatsSnapshot {
        let by_status = self
            .by_status
            .iter()
            .enumerate()
            .filter_map(|(code, n)| {
                let n = n.load(Relaxed);
                (n > 0).then(|| (code.to_string(), n))
            })
            .collect();
        let by_path = Endpoint::ALL
            .iter()
            .filter_map(|&e| {
                let n = self.by_path[e as usize].load(Relaxed);
                (n > 0).then(|| (e.path().to_owned(), n))
            })
            .chain(GeminiMethod::ALL.iter().filter_map(|&m| {
                let n = self.by_gemini[m as usize].load(Relaxed);
                (n > 0).then(|| (m.stats_path().to_owned(), n))
            }))
            .collect();
        StatsSnapshot {
            requests: self.requests.load(Relaxed),
            by_status,
            by_path,
            hung: self.hung.load(Relaxed),
            stolen: self.stolen.load(Relaxed),
            garbage: self.garbage.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed),
            max_in_flight: self.max_in_flight.load(Relaxed),
            batches: BatchStats::default(),
            tokens_admitted: self.tokens_admitted.load(Relaxed),
            tpm_refused: self.tpm_refused.load(Relaxed),
            unauthorized: self.unauthorized.load(Relaxed),
            other_project: self.other_project.load(Relaxed),
            models_listed: self.models_listed.load(Relaxed),
            usage: UsageTotals {
                input_tokens: self.input_tokens.load(Relaxed),
                output_tokens: self.output_tokens.load(Relaxed),
                cached_input_tokens: self.cached_input_tokens.load(Relaxed),
            },
            flex: FlexTotals { requests: self.flex_requests.load(Relaxed), refused: self.flex_refused.load(Relaxed) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_snapshot() {
        let s = Stats::default();
        {
            let _a = s.enter(Endpoint::ChatCompletions);
            let _b = s.enter(Endpoint::Messages);
            s.record_status(200);
            s.record_status(429);
            assert_eq!(s.snapshot().in_flight, 2);
        }
        {
            let _c = s.enter(Endpoint::ChatCompletions);
            s.record_garbage();
        }
        let _d = s.enter(Endpoint::Embeddings);
        s.record_hung();
        let snap = s.snapshot();
        assert_eq!(snap.requests, 4);
        assert_eq!(snap.by_status.get("200"), Some(&2));
        assert_eq!(snap.by_status.get("429"), Some(&1));
        assert_eq!(snap.by_status.len(), 2);
        assert_eq!(snap.by_path.get("/v1/chat/completions"), Some(&2));
        assert_eq!(snap.by_path.get("/v1/messages"), Some(&1));
        assert_eq!(snap.by_path.get("/v1/embeddings"), Some(&1));
        assert_eq!(snap.by_path.get("/v1/completions"), None);
        assert_eq!(snap.hung, 1);
        assert_eq!(snap.garbage, 1);
        assert_eq!(snap.in_flight, 1);
        assert_eq!(snap.max_in_flight, 2);

        s.reset();
        let snap = s.snapshot();
        assert_eq!(snap, StatsSnapshot { in_flight: 1, max_in_flight: 1, ..StatsSnapshot::default() });
        drop(_d);
        assert_eq!(s.snapshot().in_flight, 0);
    }

    #[test]
    fn snapshot_json_shape() {
        let s = Stats::default();
        drop(s.enter(Endpoint::Completions));
        s.record_status(503);
        let v = serde_json::to_value(s.snapshot()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "requests": 1,
                "by_status": {"503": 1},
                "by_path": {"/v1/completions": 1},
                "hung": 0,
                "garbage": 0,
                "stolen": 0,
                "in_flight": 0,
                "max_in_flight": 1,
                "batches": serde_json::to_value(BatchStats::default()).unwrap(),
                "tokens_admitted": 0,
                "tpm_refused": 0,
                "unauthorized": 0,
                "other_project": 0,
                "models_listed": 0,
                "usage": {"input_tokens": 0, "output_tokens": 0, "cached_input_tokens": 0},
                "flex": {"requests": 0, "refused": 0},
            })
        );
    }
}
