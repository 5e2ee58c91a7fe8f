//! What the control stream told this worker, as data: the jobs cancelled fleet-wide
//! ([`Cancelled`]) and the jobs whose items queues exist ([`OpenJobs`]). No broker code
//! lives here: [`crate::control`] fills these from the stream, the delivery handlers and the
//! job consumers read them.
//!
//! Anyone who can publish to the control stream can add cancels and announce jobs, so both
//! are bounded: a cancel is forgotten `tracker.retention_s` after it was read, and beyond
//! [`MAX_CANCELLED`] entries the oldest go first; beyond [`MAX_OPEN_JOBS`] announcements the
//! oldest are forgotten, never one this worker is consuming. Announcements cannot hold the
//! consumer slots either: a job whose queue is missing is forgotten at the first try, and
//! an idle one goes to the back of the line when others wait ([`OpenJobs::to_back`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::watch;

/// Most cancels a worker remembers (about 25 MB at the longest job ids).
pub const MAX_CANCELLED: usize = 100_000;

/// Jobs cancelled fleet-wide, shared by every delivery handler: job id -> when it was read
/// (ms since the epoch) and why, when the cancel says (e.g. `budget`).
#[derive(Clone)]
pub struct Cancelled {
    jobs: Arc<RwLock<HashMap<String, u64>>>,
    reasons: Arc<RwLock<HashMap<String, String>>>,
    retention_ms: u64,
}

impl Cancelled {
    /// An empty set whose cancels are forgotten after `retention_ms`.
    pub fn new(retention_ms: u64) -> Self {
        Cancelled { jobs: Arc::default(), reasons: Arc::default(), retention_ms }
    }

    /// Why `job_id` was cancelled, when the cancel gave a reason.
    pub fn reason(&self, job_id: &str) -> Option<String> {
        self.reasons.read().ok().and_then(|r| r.get(job_id).cloned())
    }

    /// Records a cancel with its reason (bounded: reasons are kept only for cancels the set
    /// still remembers).
    pub fn insert_with_reason(&self, job_id: String, reason: Option<&str>, now_ms: u64) {
        if let (Some(reason), Ok(mut r)) = (reason, self.reasons.write()) {
            const MAX_REASON: usize = 64;
            r.insert(job_id.clone(), reason.chars().take(MAX_REASON).collect());
            if r.len() > MAX_CANCELLED {
                // Rare (only a flood of cancels with reasons): forget the reasons, keep the cancels.
                r.clear();
            }
        }
        self.insert(job_id, now_ms);
    }

    /// Whether `job_id` was cancelled (and the cancel is still remembered).
    pub fn contains(&self, job_id: &str) -> bool {
        self.jobs.read().map(|s| s.contains_key(job_id)).unwrap_or(false)
    }

    /// Records a cancel read at `now_ms`, forgetting cancels past retention, and the oldest
    /// ones beyond [`MAX_CANCELLED`].
    pub fn insert(&self, job_id: String, now_ms: u64) {
        let Ok(mut s) = self.jobs.write() else { return };
        s.insert(job_id, now_ms);
        // Pruning scans the whole set, so it runs every 1,024 cancels, not at each.
        if s.len() % 1024 == 0 {
            s.retain(|_, at| now_ms.saturating_sub(*at) < self.retention_ms);
        }
        if s.len() > MAX_CANCELLED {
            // Down to 90 %, so that a flood does not pay a full scan per cancel.
            let mut ages: Vec<u64> = s.values().copied().collect();
            let cut = ages.len() - MAX_CANCELLED * 9 / 10;
            let (_, oldest_kept, _) = ages.select_nth_unstable(cut);
            let oldest_kept = *oldest_kept;
            s.retain(|_, at| *at >= oldest_kept);
        }
    }

    /// Number of cancels remembered.
    pub fn len(&self) -> usize {
        self.jobs.read().map(|s| s.len()).unwrap_or(0)
    }

    /// Whether no cancel is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Open jobs a worker remembers at most (the oldest announcements go first beyond it).
pub const MAX_OPEN_JOBS: usize = 10_000;
/// Jobs of one provider a worker consumes at once; later ones wait for one of them to end.
/// Bounds the deliveries a worker holds (each consumed job holds up to its prefetch).
pub const MAX_CONSUMED_JOBS: usize = 64;

/// One open job as announced on the control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OpenJob {
    provider: String,
    priority: u32,
    /// Order of announcement: jobs beyond [`MAX_CONSUMED_JOBS`] wait in this order.
    seq: u64,
    /// A consumer of this worker holds the job's queue: never evicted for a newer one.
    consuming: bool,
}

/// The jobs whose queues exist, shared by the control follower (which fills it) and the
/// per-provider consumers (which follow it).
#[derive(Clone)]
pub struct OpenJobs {
    jobs: Arc<Mutex<HashMap<String, OpenJob>>>,
    next_seq: Arc<Mutex<u64>>,
    changed: watch::Sender<u64>,
}

impl Default for OpenJobs {
    fn default() -> Self {
        OpenJobs { jobs: Arc::default(), next_seq: Arc::default(), changed: watch::channel(0).0 }
    }
}

impl OpenJobs {
    /// Records a job as open (again: a resumed submission re-announces it; kept as first seen).
    pub fn open(&self, job_id: &str, provider: &str, priority: u32) {
        let Ok(mut jobs) = self.jobs.lock() else { return };
        if jobs.contains_key(job_id) {
            return;
        }
        let seq = self.next_seq();
        let priority = priority.clamp(1, fleet::wire::MAX_PRIORITY);
        jobs.insert(job_id.to_string(), OpenJob { provider: provider.to_string(), priority, seq, consuming: false });
        if jobs.len() > MAX_OPEN_JOBS {
            let oldest = jobs.iter().filter(|(_, j)| !j.consuming).min_by_key(|(_, j)| j.seq);
            if let Some(oldest) = oldest.map(|(id, _)| id.clone()) {
                jobs.remove(&oldest);
            }
        }
        drop(jobs);
        self.changed.send_modify(|v| *v += 1);
    }

    /// Marks whether a consumer of this worker holds `job_id`'s queue (see [`OpenJob`]).
    pub(crate) fn set_consuming(&self, job_id: &str, consuming: bool) {
        if let Some(job) = self.jobs.lock().ok().as_mut().and_then(|j| j.get_mut(job_id)) {
            job.consuming = consuming;
        }
    }

    /// Sends `job_id` to the back of its provider's line: its consumer found its queue idle
    /// while other jobs waited for a slot ([`OpenJobs::others_wait`]). It keeps its
    /// announcement and gets a slot again when its turn comes.
    pub(crate) fn to_back(&self, job_id: &str) {
        let seq = self.next_seq();
        if let Some(job) = self.jobs.lock().ok().as_mut().and_then(|j| j.get_mut(job_id)) {
            job.seq = seq;
            job.consuming = false;
        }
        self.changed.send_modify(|v| *v += 1);
    }

    /// Whether jobs of `provider` wait for a consumer slot (more are open than
    /// [`MAX_CONSUMED_JOBS`]).
    pub(crate) fn others_wait(&self, provider: &str) -> bool {
        let Ok(jobs) = self.jobs.lock() else { return false };
        jobs.values().filter(|j| j.provider == provider).count() > MAX_CONSUMED_JOBS
    }

    fn next_seq(&self) -> u64 {
        let mut n = self.next_seq.lock().expect("seq lock");
        *n += 1;
        *n
    }

    /// Forgets a job (it ended, or its queue is gone).
    pub fn close(&self, job_id: &str) {
        let removed = self.jobs.lock().map(|mut j| j.remove(job_id).is_some()).unwrap_or(false);
        if removed {
            self.changed.send_modify(|v| *v += 1);
        }
    }

    /// The jobs of `provider` to consume now, oldest announcement first: job id -> priority.
    pub(crate) fn for_provider(&self, provider: &str) -> BTreeMap<String, u32> {
        let Ok(jobs) = self.jobs.lock() else { return BTreeMap::new() };
        let mut mine: Vec<(&String, &OpenJob)> = jobs.iter().filter(|(_, j)| j.provider == provider).collect();
        mine.sort_by_key(|(_, j)| j.seq);
        mine.into_iter().take(MAX_CONSUMED_JOBS).map(|(id, j)| (id.clone(), j.priority)).collect()
    }

    /// Number of open jobs remembered.
    pub fn len(&self) -> usize {
        self.jobs.lock().map(|j| j.len()).unwrap_or(0)
    }

    /// Whether no job is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A receiver that sees every change of the set.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancels_are_forgotten_after_retention_and_beyond_the_cap() {
        let c = Cancelled::new(1000);
        c.insert("a".into(), 0);
        c.insert("b".into(), 500);
        assert!(c.contains("a") && c.contains("b"));
        for i in 0..1022 {
            c.insert(format!("later{i}"), 1200);
        }
        assert!(!c.contains("a"), "past retention");
        assert!(c.contains("b") && c.contains("later0"));
        let c = Cancelled::new(u64::MAX);
        for i in 0..MAX_CANCELLED as u64 + 10 {
            c.insert(format!("j{i}"), i);
        }
        assert!(c.len() <= MAX_CANCELLED, "{}", c.len());
        assert!(!c.contains("j0") && c.contains(&format!("j{}", MAX_CANCELLED + 9)));
    }

    #[test]
    fn open_jobs_are_bounded_and_consumed_oldest_first() {
        let jobs = OpenJobs::default();
        jobs.open("b", "p", 3);
        jobs.open("a", "p", 99);
        jobs.open("c", "q", 1);
        jobs.open("b", "p", 1); // a re-announcement keeps the first
        let p = jobs.for_provider("p");
        assert_eq!(p.get("b"), Some(&3));
        assert_eq!(p.get("a"), Some(&fleet::wire::MAX_PRIORITY), "priority clamped");
        assert_eq!(jobs.for_provider("q").len(), 1);
        jobs.close("b");
        assert_eq!(jobs.for_provider("p").len(), 1);
        for i in 0..MAX_OPEN_JOBS + 5 {
            jobs.open(&format!("j{i}"), "p", 1);
        }
        assert_eq!(jobs.len(), MAX_OPEN_JOBS);
        let consumed = jobs.for_provider("p");
        assert_eq!(consumed.len(), MAX_CONSUMED_JOBS);
        assert!(!consumed.contains_key("a") && !consumed.contains_key("j0"), "the oldest were forgotten");
    }

    #[test]
    fn a_consumed_job_is_never_evicted_and_an_idle_one_goes_to_the_back() {
        let jobs = OpenJobs::default();
        jobs.open("real", "p", 1);
        jobs.set_consuming("real", true);
        for i in 0..MAX_OPEN_JOBS + 100 {
            jobs.open(&format!("flood{i}"), "p", 1);
        }
        assert_eq!(jobs.len(), MAX_OPEN_JOBS);
        assert!(jobs.for_provider("p").contains_key("real"), "the consumed job survived the flood");
        assert!(jobs.others_wait("p") && !jobs.others_wait("q"));
        // The first 64 in line; the oldest flood survivor goes to the back: the next one
        // in line takes its place.
        let first: Vec<String> = jobs.for_provider("p").into_keys().collect();
        let idle = first.iter().find(|j| j.starts_with("flood")).unwrap().clone();
        jobs.to_back(&idle);
        let after = jobs.for_provider("p");
        assert!(!after.contains_key(&idle), "the idle job left the consumed set");
        assert_eq!(after.len(), MAX_CONSUMED_JOBS);
    }
}
