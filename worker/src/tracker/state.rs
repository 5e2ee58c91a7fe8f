//! The tracker's state: per-job progress folded from ledger events, and the job-level
//! counters, all serializable as one checkpoint.
//!
//! Folding is idempotent: an item's index is recorded once in the job's bitmap, a job is
//! submitted once and finished once. So replaying events the checkpoint already contains
//! (redelivered after a takeover) changes nothing, and the counters restored from the
//! checkpoint only ever grow.

use std::collections::BTreeMap;

use fleet::batch::JobMode;
use fleet::usage::{Price, Usage};
use fleet::wire::{
    error_code, ErrorRecord, ItemResult, ItemStatus, JobCounts, JobProgress, JobStatus, JobSummary, JobUsage,
    LedgerEvent,
};
use serde::{Deserialize, Serialize};

/// A set of item indices, one bit each.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Bitmap(Vec<u64>);

impl Bitmap {
    /// Sets bit `i`; returns whether it was newly set.
    pub fn insert(&mut self, i: u64) -> bool {
        let (word, bit) = ((i / 64) as usize, i % 64);
        if self.0.len() <= word {
            self.0.resize(word + 1, 0);
        }
        let was = self.0[word] & (1 << bit) != 0;
        self.0[word] |= 1 << bit;
        !was
    }

    /// Whether bit `i` is set.
    pub fn contains(&self, i: u64) -> bool {
        self.0.get((i / 64) as usize).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
}

/// An error message as kept in the state: it came off a queue, so it is cut to a bound.
fn bounded(message: &str) -> String {
    const MAX: usize = 300;
    match message.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", &message[..cut]),
        None => message.to_string(),
    }
}

/// One job as the tracker knows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobState {
    /// The job's id.
    pub job_id: String,
    /// The provider the job was submitted to.
    pub provider: String,
    /// How the job's items run, as `job_submitted` said (`None`: not said, by a producer
    /// from before modes were announced, or not seen yet).
    #[serde(default)]
    pub mode: Option<JobMode>,
    /// `None` until `job_submitted` is seen (item events may in theory arrive first).
    pub total: Option<u64>,
    /// When the job was submitted, ms since the Unix epoch.
    pub submitted_at_ms: u64,
    /// After this instant (ms since the epoch) the job's unfinished items end `expired`.
    pub deadline_ms: Option<u64>,
    /// Finished item indices; dropped once the job ends.
    pub done: Bitmap,
    /// Finished items by status (`total` is filled in by [`JobState::summary`]).
    pub counts: JobCounts,
    /// A cancel was read for the job (by `producer cancel`, or the tracker's own at the spend cap).
    pub cancel_requested: bool,
    /// Set when the job ended: `completed`, `failed`, `cancelled` or `expired`.
    pub end_status: Option<JobStatus>,
    /// When the job ended, ms since the epoch; `None` while it runs.
    pub finished_at_ms: Option<u64>,
    /// Items sent to a delay queue at least once; with `done`, says which wait there now.
    #[serde(default)]
    pub delayed: Bitmap,
    /// Items in `delayed` without a result yet.
    #[serde(default)]
    pub in_delay: u64,
    /// Items that ended failed through the dead-letter queue.
    #[serde(default)]
    pub dead_lettered: u64,
    /// The newest failure seen for the job and when (Unix ms).
    #[serde(default)]
    pub last_error: Option<(String, u64)>,
    /// The producer is still publishing the job's items (`submitting` until
    /// `submission_complete`).
    #[serde(default)]
    pub submitting: bool,
    /// Last ledger event of this job: a submission silent for `producer.submit_timeout_s`
    /// is abandoned.
    #[serde(default)]
    pub last_event_ms: u64,
    /// Why the job ended other than by its items (`incomplete_submission`), or why it was
    /// cancelled by the fleet (`budget`).
    #[serde(default)]
    pub reason: Option<String>,
    /// Spend cap (`submit --max-cost`), in the price table's currency.
    #[serde(default)]
    pub max_cost: Option<f64>,
    /// Tokens and cost of the job's first results.
    #[serde(default)]
    pub usage: JobUsage,
    /// Completion webhook URL (checked when folded), told when the job ends.
    #[serde(default)]
    pub webhook_url: Option<String>,
    /// How the job's webhook delivery fares (from the senders' `webhook_attempt` events).
    #[serde(default)]
    pub webhook: Option<fleet::webhooks::WebhookStatus>,
}

impl JobState {
    /// The job as `producer status` shows it at `now_ms`: counts, rate, and (while it runs) progress.
    pub fn summary(&self, now_ms: u64) -> JobSummary {
        let mut counts = self.counts.clone();
        counts.total = self.total.unwrap_or(0);
        let end = self.finished_at_ms.unwrap_or(now_ms);
        let secs = (end.saturating_sub(self.submitted_at_ms) as f64 / 1000.0).max(0.001);
        JobSummary {
            job_id: self.job_id.clone(),
            provider: self.provider.clone(),
            mode: self.mode,
            status: self.end_status.unwrap_or(if self.submitting {
                JobStatus::Submitting
            } else {
                JobStatus::InProgress
            }),
            reason: self.reason.clone(),
            rate_per_s: counts.finished() as f64 / secs,
            progress: self.end_status.is_none().then(|| self.progress(&counts, secs, now_ms)),
            usage: Some(JobUsage { max_cost: self.max_cost, ..self.usage.clone() }),
            counts,
            submitted_at_ms: self.submitted_at_ms,
            finished_at_ms: self.finished_at_ms,
            dead_lettered: self.dead_lettered,
            webhook: self.webhook.clone(),
        }
    }

    /// Where the pending items are (the provider's backlog is filled in by the caller).
    fn progress(&self, counts: &JobCounts, secs: f64, now_ms: u64) -> JobProgress {
        let pending = counts.pending();
        let rate = counts.finished() as f64 / secs;
        JobProgress {
            cancelling: self.cancel_requested,
            in_delay_queues: self.in_delay.min(pending),
            queued_or_in_flight: pending.saturating_sub(self.in_delay),
            provider_backlog: None,
            dead_lettered: self.dead_lettered,
            last_error: self.last_error.as_ref().map(|(e, _)| e.clone()),
            last_error_age_s: self.last_error.as_ref().map(|(_, at)| now_ms.saturating_sub(*at) / 1000),
            eta_s: (rate > 0.0 && pending > 0).then(|| (pending as f64 / rate).ceil() as u64),
        }
    }
}

/// A job that just ended (for metrics and the `job_finished` message).
#[derive(Debug, Clone, PartialEq)]
pub struct Ended {
    /// The job's final summary.
    pub summary: JobSummary,
    /// Seconds from submission to end (for the job-duration histogram).
    pub duration_s: f64,
    /// The job's completion webhook, told by the tracker.
    pub webhook_url: Option<String>,
}

/// Everything the tracker checkpoints.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(remote = "Self")] // the serde impls come from `versioned!` below: written with its wire version
pub struct State {
    /// How many checkpoints were written before this one (a takeover restores the newest
    /// readable copy; 0 in checkpoints of earlier versions).
    #[serde(default)]
    pub checkpoint_seq: u64,
    /// Jobs in progress and recently ended, by id.
    pub jobs: BTreeMap<String, JobState>,
    /// `batch_jobs_total` by `provider/status`, restored on takeover so it never decreases.
    pub jobs_total: BTreeMap<String, u64>,
    /// Durations of ended jobs by `provider/status`, replayed into the histogram on restore.
    pub durations: BTreeMap<String, Vec<f64>>,
    /// `batch_items_total` by `provider/status`: every item counted once, when its first
    /// result is folded (restored on takeover, so it never decreases).
    #[serde(default)]
    pub items_total: BTreeMap<String, u64>,
    /// Tokens and cost of every job's answers by provider, then model label (a priced model
    /// or `other`): the usage metrics, restored on takeover so they never decrease.
    #[serde(default)]
    pub usage_total: BTreeMap<String, BTreeMap<String, UsageTotals>>,
    /// `batch_answers_total` by `provider/mode`: succeeded items by how they were answered
    /// ([`AnswerMode`]), each counted once with its first result (restored on takeover).
    #[serde(default)]
    pub answers_total: BTreeMap<String, u64>,
    /// The price tables by provider (from the configuration, not checkpointed).
    #[serde(skip)]
    pub prices: BTreeMap<String, BTreeMap<String, Price>>,
    /// Jobs whose spend just reached their cap: the tracker cancels them fleet-wide.
    #[serde(skip)]
    pub budget_cancels: Vec<String>,
    /// Results streams of jobs the tracker forgot, by job id, with when the job ended: each
    /// is deleted once its results are past the stream's own age limit
    /// ([`fleet::topology::RESULTS_MAX_AGE_S`]), never earlier: output nobody read is not
    /// the tracker's to delete. At most [`MAX_EXPIRING_STREAMS`].
    #[serde(default)]
    pub expiring_results: BTreeMap<String, u64>,
    /// Jobs in `jobs` with no submission yet (at most [`MAX_UNSUBMITTED_JOBS`]); counted on
    /// restore.
    #[serde(skip)]
    unsubmitted: Count,
}
fleet::versioned!(State);

/// A count derived from the state, kept to save a scan: not part of what a state is (two
/// states that differ only in it are equal, as one restored from a checkpoint and the one
/// written).
#[derive(Debug, Clone, Default)]
struct Count(Option<usize>);

impl PartialEq for Count {
    fn eq(&self, _: &Count) -> bool {
        true
    }
}

/// Jobs never submitted (results or delays came first) the state holds at most: results are
/// published only after their job's submission is confirmed on the ledger, so such jobs
/// are rare, and a flood of them is someone publishing results of jobs that do not exist.
pub const MAX_UNSUBMITTED_JOBS: usize = 1_024;
/// Largest item index recorded for a job never submitted (its bitmap stays under 8 KiB):
/// a job's real total bounds the others.
pub const MAX_UNSUBMITTED_INDEX: u64 = 65_536;

/// Results streams waiting for their age limit at most: beyond it, the oldest is left to
/// the broker (its age limit empties it; only an empty queue object remains).
pub const MAX_EXPIRING_STREAMS: usize = 100_000;

/// Jobs the per-job cost series (`batch_job_cost`, `batch_job_max_cost`) show at most: the
/// only series labelled by job, so bounded whatever the number of jobs held.
pub const MAX_JOB_COST_SERIES: usize = 20;

/// How a succeeded item was answered: the `mode` label of `batch_answers_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerMode {
    /// One provider call of its own.
    Online,
    /// Out of a provider batch ([`Usage::batch`]).
    Batch,
    /// A call of its own on the provider's flex tier ([`Usage::flex`], `--mode flex`).
    Flex,
}

impl AnswerMode {
    /// The mode of an answer with this usage (an answer that reports none was a call of
    /// its own: batch outputs are read with their usage).
    pub fn of(usage: Option<&Usage>) -> AnswerMode {
        match usage {
            Some(u) if u.batch => AnswerMode::Batch,
            Some(u) if u.flex => AnswerMode::Flex,
            _ => AnswerMode::Online,
        }
    }

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            AnswerMode::Online => "online",
            AnswerMode::Batch => "batch",
            AnswerMode::Flex => "flex",
        }
    }
}

/// One job's spend, as the per-job cost series show it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpend<'a> {
    /// The job whose spend this is.
    pub job_id: &'a str,
    /// Its provider.
    pub provider: &'a str,
    /// Cost so far at the price table.
    pub cost: f64,
    /// Its spend cap, if it has one.
    pub max_cost: Option<f64>,
}

/// Token and cost counters of one provider and model label.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct UsageTotals {
    /// Prompt tokens the answers reported.
    pub input_tokens: u64,
    /// Of the prompt tokens, those read from the provider's cache.
    pub cached_input_tokens: u64,
    /// Generated tokens the answers reported.
    pub output_tokens: u64,
    /// Their cost at the price table, in its currency (0 for unpriced models).
    pub cost: f64,
}

/// The key of the checkpoint's per-provider counter maps: `provider/label`, where the label is
/// a [`JobStatus`] label, `submitted`, or an [`ItemStatus`](fleet::wire::ItemStatus) label.
pub fn provider_key(provider: &str, label: &str) -> String {
    format!("{provider}/{label}")
}

impl State {
    /// Records the failure a result of `job_id` carries, before the result is folded (the
    /// newest error, and a dead-lettered item once: only a new index counts).
    fn note_failure(&mut self, job_id: &str, index: u64, error: &ErrorRecord, at_ms: u64) {
        let Some(job) = self.jobs.get_mut(job_id) else { return };
        if job.end_status.is_some() || job.done.contains(index) {
            return;
        }
        job.last_error = Some((bounded(&error.message), at_ms));
        if [error_code::DEAD_LETTERED, error_code::POISON].contains(&error.code.as_str()) {
            job.dead_lettered += 1;
        }
    }

    /// Whether item `index` of `job_id` already has a result (an ended job has them all).
    pub fn has_result(&self, job_id: &str, index: u64) -> bool {
        self.jobs.get(job_id).is_some_and(|j| j.end_status.is_some() || j.done.contains(index))
    }

    /// Jobs held that were never submitted (counted once, then kept up to date).
    fn unsubmitted(&mut self) -> usize {
        let jobs = &self.jobs;
        *self.unsubmitted.0.get_or_insert_with(|| jobs.values().filter(|j| j.total.is_none()).count())
    }

    /// The job an item event (a result, a delay) of `job_id` at `index` folds into: the
    /// submitted job when the index is within its total, or a job not yet submitted while
    /// both bounds allow ([`MAX_UNSUBMITTED_JOBS`], [`MAX_UNSUBMITTED_INDEX`]). `None`: the
    /// event is not folded (it names no job the fleet admitted, or an index beyond it).
    fn item_job(&mut self, job_id: &str, provider: &str, index: u64) -> Option<&mut JobState> {
        let known = self.jobs.get(job_id).map(|j| j.total);
        match known {
            Some(Some(total)) if index < total => {}
            Some(Some(_)) => return None,
            Some(None) if index < MAX_UNSUBMITTED_INDEX => {}
            None if index < MAX_UNSUBMITTED_INDEX && self.unsubmitted() < MAX_UNSUBMITTED_JOBS => {
                *self.unsubmitted.0.get_or_insert(0) += 1;
            }
            Some(None) | None => return None,
        }
        Some(self.job_mut(job_id, provider))
    }

    fn job_mut(&mut self, job_id: &str, provider: &str) -> &mut JobState {
        self.jobs.entry(job_id.to_string()).or_insert_with(|| JobState {
            job_id: job_id.to_string(),
            provider: provider.to_string(),
            mode: None,
            total: None,
            submitted_at_ms: 0,
            deadline_ms: None,
            done: Bitmap::default(),
            counts: JobCounts::default(),
            cancel_requested: false,
            end_status: None,
            finished_at_ms: None,
            delayed: Bitmap::default(),
            in_delay: 0,
            dead_lettered: 0,
            last_error: None,
            submitting: false,
            last_event_ms: 0,
            reason: None,
            max_cost: None,
            usage: JobUsage::default(),
            webhook_url: None,
            webhook: None,
        })
    }

    /// Folds one job event; returns the job it ended, if any.
    pub fn apply(&mut self, event: &LedgerEvent, now_ms: u64) -> Option<Ended> {
        let job_id = match event {
            LedgerEvent::JobSubmitted {
                job_id,
                provider,
                total,
                submitted_at_ms,
                deadline_ms,
                submitting,
                max_cost,
                webhook_url,
                mode,
            } => {
                if self.jobs.get(job_id).is_some_and(|j| j.total.is_none()) {
                    let n = self.unsubmitted();
                    self.unsubmitted = Count(Some(n.saturating_sub(1)));
                }
                let job = self.job_mut(job_id, provider);
                if job.total.is_some() {
                    // A redelivered submission, or a resumed one: that one is progress.
                    if job.submitting {
                        job.last_event_ms = job.last_event_ms.max(now_ms);
                    }
                    return None;
                }
                job.last_event_ms = now_ms;
                job.total = Some(*total);
                job.submitting = *submitting;
                job.submitted_at_ms = *submitted_at_ms;
                job.deadline_ms = *deadline_ms;
                job.mode = *mode;
                job.max_cost = max_cost.filter(|c| c.is_finite() && *c >= 0.0);
                // Checked again here: the ledger is written by producers, not by the fleet.
                job.webhook_url = webhook_url.clone().filter(|u| fleet::webhooks::check_url(u).is_ok());
                job.webhook = job.webhook_url.as_deref().map(|url| fleet::webhooks::WebhookStatus {
                    host: fleet::webhooks::url_host(url),
                    state: fleet::webhooks::DeliveryState::Pending,
                    attempts: 0,
                    last_error: None,
                });
                let provider = provider.clone();
                *self.jobs_total.entry(provider_key(&provider, "submitted")).or_default() += 1;
                job_id
            }
            LedgerEvent::ItemDelayed { job_id, provider, index, error } => {
                let job = self.item_job(job_id, provider, *index)?;
                job.last_error = Some((bounded(error), now_ms));
                job.last_event_ms = job.last_event_ms.max(now_ms);
                if job.end_status.is_none() && !job.done.contains(*index) && job.delayed.insert(*index) {
                    job.in_delay += 1;
                }
                return None;
            }
            LedgerEvent::SubmissionComplete { job_id } => {
                let job = self.jobs.get_mut(job_id)?;
                job.submitting = false;
                job_id
            }
            LedgerEvent::JobCancel { job_id } => {
                let job = self.jobs.get_mut(job_id)?;
                job.cancel_requested = true;
                job_id
            }
            LedgerEvent::WebhookAttempt { job_id, state, attempts, error } => {
                // Only a job with a webhook, and never back from an end state (a sender's
                // late duplicate after another's success changes nothing).
                let status = self.jobs.get_mut(job_id)?.webhook.as_mut()?;
                let ended =
                    |s| matches!(s, fleet::webhooks::DeliveryState::Delivered | fleet::webhooks::DeliveryState::Failed);
                if !ended(status.state) {
                    status.state = *state;
                    status.attempts = status.attempts.max(*attempts);
                    status.last_error = error.as_deref().map(bounded);
                }
                return None;
            }
        };
        self.maybe_end(job_id, now_ms)
    }

    /// Folds the results of one ledger message (one alone, or a worker's group); returns
    /// the job they ended, if any. Only an item's first result counts: a redone item's
    /// later ones (a redelivery, a worker killed before its ack) change nothing.
    pub fn apply_results(&mut self, results: &[ItemResult], now_ms: u64) -> Option<Ended> {
        let mut ended = None;
        for result in results {
            ended = self.apply_result(result, now_ms).or(ended);
        }
        ended
    }

    fn apply_result(&mut self, result: &ItemResult, now_ms: u64) -> Option<Ended> {
        if let (ItemStatus::Failed, Some(error)) = (result.status, &result.error) {
            self.note_failure(&result.job_id, result.index, error, now_ms);
        }
        // The bitmap grows to the largest index: an index from a hostile or broken publisher
        // beyond the job's total (or, before the submission, beyond a small bound) is never
        // recorded.
        let job = self.item_job(&result.job_id, &result.provider, result.index)?;
        if job.end_status.is_some() || !job.done.insert(result.index) {
            return None;
        }
        job.last_event_ms = now_ms;
        job.counts.add(result.status);
        if job.delayed.contains(result.index) {
            job.in_delay = job.in_delay.saturating_sub(1);
        }
        let provider = job.provider.clone();
        *self.items_total.entry(provider_key(&provider, result.status.as_str())).or_default() += 1;
        if result.status == ItemStatus::Succeeded {
            let mode = AnswerMode::of(result.usage.as_ref()).as_str();
            *self.answers_total.entry(provider_key(&provider, mode)).or_default() += 1;
        }
        if let Some(usage) = &result.usage {
            self.add_usage(&result.job_id, &provider, usage);
        }
        self.maybe_end(&result.job_id, now_ms)
    }

    fn maybe_end(&mut self, job_id: &str, now_ms: u64) -> Option<Ended> {
        let job = self.jobs.get(job_id)?;
        let total = job.total?;
        if job.end_status.is_some() || job.counts.finished() < total {
            return None;
        }
        let status = JobStatus::of_finished(&job.counts);
        Some(self.end(job_id, status, None, now_ms))
    }

    /// Ends a job: its status, the jobs counter and the duration it took.
    fn end(&mut self, job_id: &str, status: JobStatus, reason: Option<String>, now_ms: u64) -> Ended {
        let job = self.jobs.get_mut(job_id).expect("ending a known job");
        job.end_status = Some(status);
        // A reason set before the end (a spend cap's `budget`) stays.
        job.reason = reason.or(job.reason.take());
        job.finished_at_ms = Some(now_ms);
        job.done = Bitmap::default();
        let summary = job.summary(now_ms);
        let webhook_url = job.webhook_url.clone();
        let duration_s = now_ms.saturating_sub(job.submitted_at_ms) as f64 / 1000.0;
        let key = provider_key(&job.provider, status.as_str());
        *self.jobs_total.entry(key.clone()).or_default() += 1;
        self.durations.entry(key).or_default().push(duration_s);
        Ended { summary, duration_s, webhook_url }
    }

    /// Counts one answer's usage for its job and the provider's totals, and notes the job
    /// for a budget cancel when its spend reaches its cap.
    fn add_usage(&mut self, job_id: &str, provider: &str, usage: &Usage) {
        let table = self.prices.get(provider);
        // Priced by the entry of the answer's model, its dated variants included.
        let entry = table.and_then(|t| fleet::usage::price_of(t, &usage.model));
        let label = entry.map_or("other", |(name, _)| name).to_string();
        let cost = entry.map(|(_, p)| p.cost(usage));
        let totals = self.usage_total.entry(provider.to_string()).or_default().entry(label).or_default();
        totals.input_tokens = totals.input_tokens.saturating_add(usage.input_tokens);
        totals.cached_input_tokens = totals.cached_input_tokens.saturating_add(usage.cached_input_tokens);
        totals.output_tokens = totals.output_tokens.saturating_add(usage.output_tokens);
        totals.cost += cost.unwrap_or(0.0);
        let Some(job) = self.jobs.get_mut(job_id) else { return };
        job.usage.add(usage, cost);
        let over = job.max_cost.is_some_and(|cap| job.usage.cost >= cap);
        if over && !job.cancel_requested && job.end_status.is_none() {
            job.cancel_requested = true;
            job.reason = Some(fleet::wire::REASON_BUDGET.to_string());
            self.budget_cancels.push(job_id.to_string());
        }
    }

    /// The jobs the per-job cost series show ([`MAX_JOB_COST_SERIES`] at most): capped jobs
    /// in progress first (their spend against the cap is what someone watches), then the
    /// others by cost, highest first.
    pub fn job_spend(&self) -> Vec<JobSpend<'_>> {
        let mut jobs: Vec<(bool, JobSpend<'_>)> = self
            .jobs
            .values()
            .filter(|j| j.total.is_some())
            .map(|j| {
                let watched = j.max_cost.is_some() && j.end_status.is_none();
                let spend =
                    JobSpend { job_id: &j.job_id, provider: &j.provider, cost: j.usage.cost, max_cost: j.max_cost };
                (watched, spend)
            })
            .collect();
        jobs.sort_by(|(wa, a), (wb, b)| wb.cmp(wa).then(b.cost.total_cmp(&a.cost)).then(a.job_id.cmp(b.job_id)));
        jobs.into_iter().take(MAX_JOB_COST_SERIES).map(|(_, spend)| spend).collect()
    }

    /// Jobs not yet ended, by provider.
    pub fn in_progress(&self) -> BTreeMap<String, i64> {
        let mut m = BTreeMap::new();
        for j in self.jobs.values() {
            let n = m.entry(j.provider.clone()).or_default();
            if j.end_status.is_none() && j.total.is_some() {
                *n += 1;
            }
        }
        m
    }

    /// Ends `failed` (reason `incomplete_submission`) every job whose submission has not
    /// completed and that has seen no event for `timeout_ms`: its `submit` died and was not
    /// resumed. Its published items have all finished by then (each would be an event).
    pub fn abandon_stalled(&mut self, now_ms: u64, timeout_ms: u64) -> Vec<Ended> {
        let stalled: Vec<String> = self
            .jobs
            .values()
            .filter(|j| j.submitting && j.end_status.is_none() && now_ms.saturating_sub(j.last_event_ms) >= timeout_ms)
            .map(|j| j.job_id.clone())
            .collect();
        let reason = || Some(fleet::wire::REASON_INCOMPLETE_SUBMISSION.to_string());
        stalled.iter().map(|job_id| self.end(job_id, JobStatus::Failed, reason(), now_ms)).collect()
    }

    /// Forgets jobs that ended more than `retention_ms` ago, and results of jobs never
    /// submitted (anyone can publish a result) once silent that long: the map stays
    /// bounded by retention. Returns the jobs forgotten (id, provider).
    pub fn prune(&mut self, now_ms: u64, retention_ms: u64) -> Vec<(String, String)> {
        // Counted before any job goes, so each removal below is subtracted from the truth.
        self.unsubmitted();
        let gone_for_good = |j: &JobState| {
            let ended_long_ago = j.finished_at_ms.is_some_and(|t| now_ms.saturating_sub(t) >= retention_ms);
            let never_submitted = j.total.is_none() && now_ms.saturating_sub(j.last_event_ms) >= retention_ms;
            ended_long_ago || never_submitted
        };
        let gone: Vec<(String, String)> =
            self.jobs.values().filter(|j| gone_for_good(j)).map(|j| (j.job_id.clone(), j.provider.clone())).collect();
        for (id, _) in &gone {
            if let Some(job) = self.jobs.remove(id) {
                if job.total.is_none() {
                    let n = self.unsubmitted();
                    self.unsubmitted = Count(Some(n.saturating_sub(1)));
                }
                self.expiring_results.insert(id.clone(), job.finished_at_ms.unwrap_or(now_ms));
            }
        }
        while self.expiring_results.len() > MAX_EXPIRING_STREAMS {
            let oldest = self.expiring_results.iter().min_by_key(|(_, at)| **at).map(|(id, _)| id.clone());
            oldest.map(|id| self.expiring_results.remove(&id));
        }
        gone
    }

    /// The forgotten jobs whose results are past the stream's age limit: their streams
    /// may be deleted now (they are taken off the list).
    pub fn expired_results(&mut self, now_ms: u64, max_age_ms: u64) -> Vec<String> {
        let due: Vec<String> = self
            .expiring_results
            .iter()
            .filter(|(_, ended)| now_ms.saturating_sub(**ended) >= max_age_ms)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &due {
            self.expiring_results.remove(id);
        }
        due
    }
}

/// Splits a `provider/status` key.
pub fn split_key(key: &str) -> (&str, &str) {
    key.rsplit_once('/').unwrap_or((key, ""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submitted(job: &str, total: u64) -> LedgerEvent {
        LedgerEvent::JobSubmitted {
            job_id: job.into(),
            provider: "p".into(),
            total,
            submitted_at_ms: 1_000,
            deadline_ms: None,
            submitting: false,
            max_cost: None,
            webhook_url: None,
            mode: None,
        }
    }

    /// Results of `job` (provider `p`), as a worker's group carries them.
    fn finished(job: &str, items: &[(u64, ItemStatus)]) -> Vec<ItemResult> {
        let result = |&(index, status): &(u64, ItemStatus)| ItemResult {
            job_id: job.into(),
            index,
            total: fleet::wire::MAX_JOB_ITEMS,
            custom_id: format!("c{index}"),
            provider: "p".into(),
            status,
            response: None,
            error: None,
            attempts: 1,
            worker: "w".into(),
            finished_at_ms: 0,
            request: None,
            usage: None,
        };
        items.iter().map(result).collect()
    }

    #[test]
    fn duplicates_are_counted_once_and_the_job_ends_once() {
        let mut s = State::default();
        assert!(s.apply(&submitted("j", 3), 1_000).is_none());
        assert!(s.apply(&submitted("j", 3), 1_000).is_none());
        s.apply_results(&finished("j", &[(0, ItemStatus::Succeeded), (1, ItemStatus::Failed)]), 2_000);
        s.apply_results(&finished("j", &[(1, ItemStatus::Failed)]), 2_000);
        let ended = s.apply_results(&finished("j", &[(2, ItemStatus::Succeeded)]), 4_000).expect("ends");
        assert_eq!(ended.summary.status.as_str(), "completed");
        assert_eq!(ended.summary.counts, JobCounts { total: 3, succeeded: 2, failed: 1, cancelled: 0, expired: 0 });
        assert_eq!(ended.duration_s, 3.0);
        assert!(s.apply_results(&finished("j", &[(2, ItemStatus::Succeeded)]), 5_000).is_none());
        assert_eq!(s.jobs_total["p/submitted"], 1);
        assert_eq!(s.jobs_total["p/completed"], 1);
    }

    /// The rules of the README's "How a job ends", one case each.
    #[test]
    fn the_end_status_follows_the_written_rules() {
        use ItemStatus::{Cancelled as C, Expired as E, Failed as F, Succeeded as S};
        let cases: &[(&[ItemStatus], bool, &str)] = &[
            (&[S, S, F], false, "completed"),
            (&[F, F, F], false, "failed"),
            (&[S, E, E], false, "expired"),
            (&[F, E, E], false, "expired"),
            (&[S, C, E], true, "cancelled"),
            (&[S, S, S], true, "completed"),
        ];
        for (i, (items, cancel, want)) in cases.iter().enumerate() {
            let mut s = State::default();
            let job = format!("j{i}");
            s.apply(&submitted(&job, items.len() as u64), 1);
            if *cancel {
                s.apply(&LedgerEvent::JobCancel { job_id: job.clone() }, 2);
            }
            let items: Vec<(u64, ItemStatus)> = items.iter().enumerate().map(|(n, st)| (n as u64, *st)).collect();
            let ended = s.apply_results(&finished(&job, &items), 3).expect("ends");
            assert_eq!(ended.summary.status.as_str(), *want, "case {i}: {items:?} cancel={cancel}");
        }
    }

    #[test]
    fn progress_counts_delayed_items_until_their_result_and_keeps_the_newest_error() {
        let mut s = State::default();
        s.apply(&submitted("j", 4), 0);
        let delayed = |index| LedgerEvent::ItemDelayed {
            job_id: "j".into(),
            provider: "p".into(),
            index,
            error: format!("HTTP 503 #{index}"),
        };
        s.apply(&delayed(0), 1_000);
        s.apply(&delayed(0), 1_500); // delayed again, or a redelivered note: counted once
        s.apply(&delayed(1), 2_000);
        s.apply_results(&finished("j", &[(2, ItemStatus::Succeeded)]), 2_000);
        let p = s.jobs["j"].summary(4_000).progress.expect("in progress");
        assert_eq!((p.in_delay_queues, p.queued_or_in_flight), (2, 1));
        assert_eq!(p.last_error.as_deref(), Some("HTTP 503 #1"));
        assert_eq!(p.last_error_age_s, Some(2));
        assert_eq!(p.eta_s, Some(9), "1 item in the 3 s since submission, 3 left");
        s.apply_results(&finished("j", &[(0, ItemStatus::Succeeded)]), 5_000);
        assert_eq!(s.jobs["j"].summary(5_000).progress.unwrap().in_delay_queues, 1);
        s.apply(&LedgerEvent::JobCancel { job_id: "j".into() }, 5_000);
        assert!(s.jobs["j"].summary(5_000).progress.unwrap().cancelling);
        let ended = s.apply_results(&finished("j", &[(1, ItemStatus::Cancelled), (3, ItemStatus::Cancelled)]), 6_000);
        assert!(ended.expect("ends").summary.progress.is_none());
    }

    /// A checkpoint written by the tracker of 2026-11 (before delay notes and progress)
    /// restores, and folding goes on from it: a takeover across an upgrade loses nothing.
    #[test]
    fn a_checkpoint_written_before_this_version_restores() {
        let old = include_str!("../../tests/fixtures/checkpoint-2026-11.json");
        let mut s: State = serde_json::from_str(old).expect("the old checkpoint restores");
        assert_eq!(s.jobs_total["mock/submitted"], 2);
        assert_eq!(s.durations["mock/completed"], vec![3.5]);
        assert_eq!(s.jobs["job_0c9694a7979f485d"].summary(0).status.as_str(), "completed");
        assert_eq!(s.jobs["job_0c9694a7979f485d"].summary(0).mode, None, "no mode was recorded then");
        let j = &s.jobs["job_1d2e3f4a5b6c7d8e"];
        assert!(j.cancel_requested && j.end_status.is_none());
        for index in [0, 1, 2, 64, 129] {
            assert!(s.has_result("job_1d2e3f4a5b6c7d8e", index), "index {index} was done");
        }
        assert!(!s.has_result("job_1d2e3f4a5b6c7d8e", 3));
        // Redelivered results change nothing; the rest end the job, cancelled.
        let job = "job_1d2e3f4a5b6c7d8e";
        let f = |items: Vec<(u64, ItemStatus)>| -> Vec<ItemResult> {
            finished(job, &items).into_iter().map(|r| ItemResult { provider: "mock".into(), ..r }).collect()
        };
        assert!(s.apply_results(&f(vec![(0, ItemStatus::Succeeded)]), 1).is_none());
        let rest: Vec<(u64, ItemStatus)> =
            (0..130).filter(|i| ![0, 1, 2, 64, 129].contains(i)).map(|i| (i, ItemStatus::Cancelled)).collect();
        let ended = s.apply_results(&f(rest), 2).expect("ends");
        assert_eq!(ended.summary.status.as_str(), "cancelled");
        assert_eq!(ended.summary.counts.finished(), 130);
        assert_eq!(s.jobs_total["mock/cancelled"], 1);
    }

    /// Usage is counted with an item's first result only, priced by the table, and a job
    /// whose cost reaches its cap is cancelled once, ending `cancelled` with reason `budget`.
    #[test]
    fn usage_is_summed_once_per_item_and_a_cap_cancels_the_job_once() {
        let mut s = State::default();
        let price = Price {
            input_per_mtok: 1e6,
            output_per_mtok: 2e6,
            cached_input_per_mtok: None,
            batch_factor: 0.5,
            flex_factor: None,
        };
        s.prices.insert("p".into(), BTreeMap::from([("m".to_string(), price)]));
        let mut ev = submitted("j", 4);
        if let LedgerEvent::JobSubmitted { max_cost, .. } = &mut ev {
            *max_cost = Some(10.0);
        }
        s.apply(&ev, 1);
        let used_in = |index, model: &str, batch: bool| -> Vec<ItemResult> {
            let usage = Usage {
                model: model.into(),
                input_tokens: 2,
                cached_input_tokens: 0,
                output_tokens: 1,
                batch,
                flex: false,
            };
            let [r] = <[ItemResult; 1]>::try_from(finished("j", &[(index, ItemStatus::Succeeded)])).unwrap();
            vec![ItemResult { usage: Some(usage), ..r }]
        };
        let used = |index, model: &str| used_in(index, model, false);
        s.apply_results(&used(0, "m"), 2); // costs 2 + 2 = 4
        s.apply_results(&used(0, "m"), 2); // a redelivered result: not counted again
        s.apply_results(&used(1, "unpriced"), 3);
        let u = &s.jobs["j"].usage;
        assert_eq!((u.input_tokens, u.output_tokens, u.unpriced_answers), (4, 2, 1));
        assert!((u.cost - 4.0).abs() < 1e-9);
        assert!(s.budget_cancels.is_empty() && !s.jobs["j"].cancel_requested);
        s.apply_results(&used(2, "m"), 4); // 8 of 10: still under
        assert!(s.budget_cancels.is_empty());
        assert!(
            s.apply_results(&used(3, "m"), 5).is_some_and(|e| e.summary.status == JobStatus::Completed),
            "every item answered"
        );
        let mut s2 = State { prices: s.prices.clone(), ..State::default() };
        s2.apply(&ev, 1);
        for i in 0..3 {
            s2.apply_results(&used(i, "m"), 2);
        }
        assert_eq!(s2.budget_cancels, vec!["j".to_string()], "12 >= 10: cancelled once");
        s2.budget_cancels.clear();
        let ended = s2.apply_results(&finished("j", &[(3, ItemStatus::Cancelled)]), 3).expect("ends");
        assert_eq!((ended.summary.status.as_str(), ended.summary.reason.as_deref()), ("cancelled", Some("budget")));
        assert!(s2.budget_cancels.is_empty());
        assert_eq!(s2.usage_total["p"]["m"].input_tokens, 6);
        // Restored from a checkpoint, the totals are there; the prices come from the config.
        let restored: State = serde_json::from_slice(&serde_json::to_vec(&s2).unwrap()).unwrap();
        assert_eq!(restored.usage_total, s2.usage_total);
        assert_eq!(restored.jobs["j"].usage, s2.jobs["j"].usage);
        assert!(restored.prices.is_empty());

        // An answer out of a provider batch costs the batch factor of the price.
        let mut s3 = State { prices: s.prices.clone(), ..State::default() };
        s3.apply(&ev, 1);
        s3.apply_results(&used_in(0, "m", true), 2);
        assert!((s3.jobs["j"].usage.cost - 2.0).abs() < 1e-9, "half of 4");
        assert!((s3.usage_total["p"]["m"].cost - 2.0).abs() < 1e-9);
    }

    /// A dated answer (`m-2024-07-18`) is priced by the entry `m`, labelled `m`, and
    /// counts towards the cap; answers count by mode; the per-job series are bounded.
    #[test]
    fn dated_answers_are_priced_by_their_undated_entry_and_fire_the_cap() {
        let mut s = State::default();
        let price = Price {
            input_per_mtok: 1e6,
            output_per_mtok: 2e6,
            cached_input_per_mtok: None,
            batch_factor: 0.5,
            flex_factor: None,
        };
        s.prices.insert("p".into(), BTreeMap::from([("m".to_string(), price)]));
        let mut ev = submitted("j", 3);
        if let LedgerEvent::JobSubmitted { max_cost, .. } = &mut ev {
            *max_cost = Some(0.001);
        }
        s.apply(&ev, 1);
        let usage = Usage { model: "m-2024-07-18".into(), input_tokens: 2, output_tokens: 1, ..Usage::default() };
        let [r] = <[ItemResult; 1]>::try_from(finished("j", &[(0, ItemStatus::Succeeded)])).unwrap();
        s.apply_results(&[ItemResult { usage: Some(usage.clone()), ..r }], 2);
        assert!((s.jobs["j"].usage.cost - 4.0).abs() < 1e-9);
        assert_eq!(s.jobs["j"].usage.unpriced_answers, 0);
        assert_eq!(s.usage_total["p"]["m"].input_tokens, 2, "labelled by the entry");
        assert_eq!(s.budget_cancels, vec!["j".to_string()], "the cap fired");
        assert_eq!(s.jobs["j"].summary(2).usage.unwrap().max_cost, Some(0.001));
        let [r] = <[ItemResult; 1]>::try_from(finished("j", &[(1, ItemStatus::Succeeded)])).unwrap();
        s.apply_results(&[ItemResult { usage: Some(Usage { batch: true, ..usage }), ..r }], 3);
        assert_eq!((s.answers_total["p/online"], s.answers_total["p/batch"]), (1, 1));
        let spend = s.job_spend();
        assert_eq!((spend[0].job_id, spend[0].max_cost), ("j", Some(0.001)));
        for i in 0..(MAX_JOB_COST_SERIES + 5) {
            s.apply(&submitted(&format!("k{i}"), 1), 4);
        }
        let spend = s.job_spend();
        assert_eq!(spend.len(), MAX_JOB_COST_SERIES);
        assert_eq!(spend[0].job_id, "j", "the capped job in progress comes first");
    }

    #[test]
    fn items_before_submission_are_kept() {
        let mut s = State::default();
        s.apply_results(&finished("j", &[(0, ItemStatus::Failed)]), 1);
        let ended = s.apply(&submitted("j", 1), 2).expect("ends on submission");
        assert_eq!(ended.summary.status.as_str(), "failed");
    }

    #[test]
    fn a_checkpoint_round_trips_and_replay_changes_nothing() {
        let mut s = State::default();
        s.apply(&submitted("j", 100), 1);
        s.apply_results(&finished("j", &[(5, ItemStatus::Succeeded), (70, ItemStatus::Expired)]), 2);
        let restored: State = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(restored, s);
        let mut replayed = restored.clone();
        replayed.apply(&submitted("j", 100), 3);
        replayed.apply_results(&finished("j", &[(5, ItemStatus::Succeeded)]), 3);
        assert_eq!(replayed, s);
    }

    #[test]
    fn the_submitted_mode_is_kept_through_a_checkpoint_and_summarized() {
        let mut s = State::default();
        let mut batch = submitted("b", 2);
        if let LedgerEvent::JobSubmitted { mode, .. } = &mut batch {
            *mode = Some(JobMode::Batch);
        }
        s.apply(&batch, 1);
        s.apply(&submitted("old", 2), 1);
        let restored: State = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(restored.jobs["b"].summary(2).mode, Some(JobMode::Batch));
        assert_eq!(restored.jobs["old"].summary(2).mode, None, "a producer that did not say: unknown");
    }

    #[test]
    fn cancelled_jobs_end_cancelled_and_prune_after_retention() {
        let mut s = State::default();
        s.apply(&submitted("j", 2), 1);
        s.apply(&LedgerEvent::JobCancel { job_id: "j".into() }, 2);
        let ended = s
            .apply_results(&finished("j", &[(0, ItemStatus::Succeeded), (1, ItemStatus::Cancelled)]), 3)
            .expect("ends");
        assert_eq!(ended.summary.status.as_str(), "cancelled");
        assert_eq!(s.in_progress()["p"], 0);
        s.prune(10, 100);
        assert!(s.jobs.contains_key("j"));
        s.prune(1_000, 100);
        assert!(s.jobs.is_empty());
        // Forgotten, its results stream is kept until its results are past their age.
        assert_eq!(s.expiring_results.get("j"), Some(&3), "ended at 3");
        assert!(s.expired_results(1_000, 5_000).is_empty());
        assert_eq!(s.expired_results(5_003, 5_000), vec!["j".to_string()]);
        assert!(s.expiring_results.is_empty());
    }

    #[test]
    fn a_job_whose_items_were_cancelled_ends_cancelled_even_before_the_request_is_folded() {
        // Workers may read a cancel on the control stream, and their cancelled results may
        // reach the ledger, before the request does (a `producer cancel` of an older version
        // published it there second).
        let mut s = State::default();
        s.apply(&submitted("j", 2), 1);
        let ended = s
            .apply_results(&finished("j", &[(0, ItemStatus::Cancelled), (1, ItemStatus::Cancelled)]), 2)
            .expect("ends");
        assert_eq!(ended.summary.status.as_str(), "cancelled");
        // A cancel that came after every item had its result stops nothing.
        s.apply(&submitted("k", 1), 3);
        s.apply(&LedgerEvent::JobCancel { job_id: "k".into() }, 4);
        let ended = s.apply_results(&finished("k", &[(0, ItemStatus::Succeeded)]), 5).expect("ends");
        assert_eq!(ended.summary.status.as_str(), "completed");
    }

    #[test]
    fn an_unfinished_submission_shows_submitting_and_is_abandoned_after_the_timeout() {
        let mut s = State::default();
        let mut ev = submitted("j", 3);
        if let LedgerEvent::JobSubmitted { submitting, .. } = &mut ev {
            *submitting = true;
        }
        s.apply(&ev, 1000);
        s.apply_results(&finished("j", &[(0, ItemStatus::Succeeded)]), 2000);
        assert_eq!(s.jobs["j"].summary(2000).status.as_str(), "submitting");
        assert!(s.abandon_stalled(2500, 1000).is_empty(), "not silent long enough");
        let ended = s.abandon_stalled(3000, 1000);
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].summary.status.as_str(), "failed");
        assert_eq!(ended[0].summary.reason.as_deref(), Some("incomplete_submission"));
        assert_eq!(ended[0].summary.counts.succeeded, 1);
        assert!(s.abandon_stalled(9000, 1000).is_empty(), "ends once");
        // A completed submission is never abandoned.
        let mut s = State::default();
        s.apply(&ev, 1000);
        s.apply(&LedgerEvent::SubmissionComplete { job_id: "j".into() }, 1100);
        assert_eq!(s.jobs["j"].summary(1100).status.as_str(), "in_progress");
        assert!(s.abandon_stalled(1_000_000, 1000).is_empty());
    }

    #[test]
    fn results_of_jobs_never_submitted_are_bounded() {
        let mut s = State::default();
        // Forged results: many unknown jobs, indices near the largest a job may have.
        for j in 0..(MAX_UNSUBMITTED_JOBS as u64 + 500) {
            let forged =
                finished(&format!("forged{j}"), &[(49_999_999, ItemStatus::Succeeded), (3, ItemStatus::Failed)]);
            s.apply_results(&forged, 10);
        }
        assert_eq!(s.jobs.len(), MAX_UNSUBMITTED_JOBS, "no more unknown jobs than the bound");
        let bytes = serde_json::to_vec(&s).unwrap().len();
        assert!(bytes < 1 << 20, "checkpoint of {bytes} bytes");
        assert!(s.jobs.values().all(|j| j.counts.finished() == 1), "only the small index is recorded");
        // A real job still folds in full, its early results included.
        s.apply_results(&finished("forged0", &[(0, ItemStatus::Succeeded)]), 11);
        s.apply(&submitted("forged0", 4), 12);
        assert_eq!(s.unsubmitted(), MAX_UNSUBMITTED_JOBS - 1);
        let ended =
            s.apply_results(&finished("forged0", &[(1, ItemStatus::Succeeded), (2, ItemStatus::Succeeded)]), 13);
        assert!(ended.is_some(), "4 of 4 with the early ones");
        // Beyond a submitted job's total nothing is recorded.
        s.apply(&submitted("real", 2), 14);
        assert!(s.apply_results(&finished("real", &[(7, ItemStatus::Succeeded)]), 15).is_none());
        assert_eq!(s.jobs["real"].counts.finished(), 0);
        s.prune(10_000_000, 1_000);
        assert_eq!(s.unsubmitted(), 0, "pruned, and the count follows");
    }

    #[test]
    fn results_of_jobs_never_submitted_are_forgotten_after_retention() {
        let mut s = State::default();
        s.apply_results(&finished("ghost", &[(3, ItemStatus::Failed)]), 1000);
        s.prune(1500, 1000);
        assert!(s.jobs.contains_key("ghost"), "kept within retention (its submission may come)");
        s.prune(2000, 1000);
        assert!(!s.jobs.contains_key("ghost"));
    }
}
