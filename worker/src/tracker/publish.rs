//! The tracker's job-level metrics: set from the checkpointed state and handed to the
//! pusher as one encoded snapshot (see [`super`] for why only checkpointed state).

use std::collections::BTreeMap;

use fleet::wire::{ItemStatus, JobStatus};

use super::active::Active;
use super::state::{self, UsageTotals};

impl Active<'_> {
    /// Zero-valued series for every provider and end status, so rates over them read 0
    /// rather than "no data" before the first such job.
    pub(super) fn zero_series(&self) {
        for provider in self.cfg.providers.keys() {
            for status in JobStatus::ENDED {
                self.metrics.jobs.with_label_values(&[provider, status.as_str()]);
            }
            for status in ItemStatus::ALL {
                self.metrics.items.with_label_values(&[provider, status.as_str()]);
            }
            self.metrics.jobs_submitted.with_label_values(&[provider]);
            for mode in [state::AnswerMode::Online, state::AnswerMode::Batch, state::AnswerMode::Flex] {
                self.metrics.answers.with_label_values(&[provider, mode.as_str()]);
            }
            self.metrics.jobs_in_progress.with_label_values(&[provider]);
        }
    }

    /// Replays the restored job durations into the histogram.
    pub(super) fn replay_durations(&self) {
        for (key, durations) in &self.state.durations {
            let (provider, status) = state::split_key(key);
            let h = self.metrics.job_duration.with_label_values(&[self.provider_label(provider), status]);
            for d in durations {
                h.observe(*d);
            }
        }
    }

    /// The `provider` label of a provider name read off a queue: a configured provider, or
    /// `other` (labels come from a fixed set, whatever a message claims).
    pub(super) fn provider_label<'p>(&self, provider: &'p str) -> &'p str {
        if self.cfg.providers.contains_key(provider) {
            provider
        } else {
            "other"
        }
    }

    /// Hands the current (checkpointed) metrics to the pusher.
    pub(super) fn publish_metrics(&self) {
        // The state holds the counter values; the metric catches up by the difference.
        let catch_up = |counter: prometheus::IntCounter, n: u64| counter.inc_by(n.saturating_sub(counter.get()));
        // Summed by label first: every unknown provider shares the label `other`.
        let mut sums: BTreeMap<(&str, String), u64> = Default::default();
        for (key, n) in &self.state.jobs_total {
            let (provider, status) = state::split_key(key);
            *sums.entry(("jobs", state::provider_key(self.provider_label(provider), status))).or_default() += n;
        }
        for (key, n) in &self.state.items_total {
            let (provider, status) = state::split_key(key);
            *sums.entry(("items", state::provider_key(self.provider_label(provider), status))).or_default() += n;
        }
        for ((family, key), n) in sums {
            let (provider, status) = state::split_key(&key);
            match (family, status) {
                ("jobs", "submitted") => catch_up(self.metrics.jobs_submitted.with_label_values(&[provider]), n),
                ("jobs", _) => catch_up(self.metrics.jobs.with_label_values(&[provider, status]), n),
                _ => catch_up(self.metrics.items.with_label_values(&[provider, status]), n),
            }
        }
        for (provider, n) in self.state.in_progress() {
            self.metrics.jobs_in_progress.with_label_values(&[self.provider_label(&provider)]).set(n);
        }
        self.publish_usage_metrics();
        self.publish_spend_metrics();
        self.snapshot.send_replace(Some(fleet::metrics::encode(&self.metrics.registry)));
    }

    /// Usage counters catch up with the checkpointed totals (labels: a configured provider
    /// or `other`, a priced model or `other`, summed first since several map to `other`).
    fn publish_usage_metrics(&self) {
        let mut sums: BTreeMap<(&str, &str), UsageTotals> = Default::default();
        for (provider, models) in &self.state.usage_total {
            for (model, t) in models {
                let provider = self.provider_label(provider);
                let key = (provider, if provider == "other" { "other" } else { model.as_str() });
                let sum = sums.entry(key).or_default();
                sum.input_tokens += t.input_tokens;
                sum.cached_input_tokens += t.cached_input_tokens;
                sum.output_tokens += t.output_tokens;
                sum.cost += t.cost;
            }
        }
        for ((provider, model), t) in sums {
            for (kind, n) in
                [("input", t.input_tokens), ("cached_input", t.cached_input_tokens), ("output", t.output_tokens)]
            {
                let c = self.metrics.usage_tokens.with_label_values(&[provider, model, kind]);
                c.inc_by(n.saturating_sub(c.get()));
            }
            let c = self.metrics.usage_cost.with_label_values(&[provider, model]);
            if t.cost > c.get() {
                c.inc_by(t.cost - c.get());
            }
        }
    }

    /// Answers by mode catch up with the checkpointed counts; the per-job cost series are
    /// drawn afresh (a job that left the shown set loses its series: the snapshot replaces
    /// the whole group at the Pushgateway).
    fn publish_spend_metrics(&self) {
        let mut answers: BTreeMap<String, u64> = Default::default();
        for (key, n) in &self.state.answers_total {
            let (provider, mode) = state::split_key(key);
            *answers.entry(state::provider_key(self.provider_label(provider), mode)).or_default() += n;
        }
        for (key, n) in answers {
            let (provider, mode) = state::split_key(&key);
            let c = self.metrics.answers.with_label_values(&[provider, mode]);
            c.inc_by(n.saturating_sub(c.get()));
        }
        self.metrics.job_cost.reset();
        self.metrics.job_max_cost.reset();
        for job in self.state.job_spend() {
            let labels = [self.provider_label(job.provider), job.job_id];
            self.metrics.job_cost.with_label_values(&labels).set(job.cost);
            if let Some(cap) = job.max_cost {
                self.metrics.job_max_cost.with_label_values(&labels).set(cap);
            }
        }
    }
}
