//! Owns the batch counters behind the `batches` part of `GET /stats`, which let a test prove
//! that a provider batch was created once: batches created per tag, and the custom_ids that
//! reached a second accepted batch.
//!
//! The tag of a batch:
//! - OpenAI: its `metadata`, as `key=value` pairs sorted by key and joined by `,`
//!   (`chunk=3,job=j-1`; the empty string for a batch without metadata);
//! - Anthropic (whose batches carry no metadata): `custom_id=` and the custom_id of the
//!   batch's first request (`custom_id=j-1-c3-0`);
//! - Gemini: its `displayName`.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

/// The most distinct tags counted; later new tags count under [`OTHER_TAG`], so untrusted
/// metadata cannot grow the stats without bound.
const MAX_TAGS: usize = 10_000;
/// Where batches with a tag beyond [`MAX_TAGS`] are counted.
const OTHER_TAG: &str = "(other)";
/// The most custom_ids remembered per API for [`BatchStats::resubmitted_custom_ids`]; ids seen
/// beyond it are not remembered (and [`BatchStats::custom_ids_forgotten`] counts them).
const MAX_REMEMBERED_IDS: usize = 1_000_000;

/// The provider-batch part of the `/stats` document.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchStats {
    /// OpenAI batches created (`POST /v1/batches` answered 200), per tag.
    pub openai_created: BTreeMap<String, u64>,
    /// Anthropic message batches created (`POST /v1/messages/batches` answered 200), per tag.
    pub anthropic_created: BTreeMap<String, u64>,
    /// Gemini batches created (`:batchGenerateContent` answered 200), per `displayName`.
    pub gemini_created: BTreeMap<String, u64>,
    /// Gemini batches deleted (`DELETE /v1beta/batches/{id}`).
    pub gemini_deleted: u64,
    /// `promptTokenCount` of the Gemini batch responses served (the answered requests of
    /// ended batches), cached ones included.
    pub gemini_input_tokens: u64,
    /// `cachedContentTokenCount` of the Gemini batch responses served.
    pub gemini_cached_tokens: u64,
    /// `candidatesTokenCount` of the Gemini batch responses served.
    pub gemini_output_tokens: u64,
    /// Batches rejected by validation: OpenAI batches that ended `failed`, Anthropic creates
    /// answered 400 for the content of their requests.
    pub rejected: u64,
    /// Cancel requests that took effect (repeats of one batch's cancel count once).
    pub cancelled: u64,
    /// OpenAI batches accepted, then failed with `token_limit_exceeded` because the
    /// enqueued-token limit (`--batch-enqueued-tokens`) was full (not counted in `rejected`).
    pub token_limit_failed: u64,
    /// The most OpenAI batches in progress (created, not ended, not failed) at once.
    pub most_in_progress: u64,
    /// custom_ids of an accepted batch that were already in an earlier accepted batch of the
    /// same API: non-zero means a request may have been billed twice.
    pub resubmitted_custom_ids: u64,
    /// custom_ids not remembered because the memory for them was full.
    pub custom_ids_forgotten: u64,
    /// Files uploaded with `POST /v1/files`.
    pub files_uploaded: u64,
    /// Files deleted with `DELETE /v1/files/{id}`.
    pub files_deleted: u64,
    /// Files stored now (uploads and batch outputs).
    pub files_stored: u64,
    /// Bytes stored now (files and Anthropic results).
    pub bytes_stored: u64,
}

/// Which batch API a batch belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Api {
    OpenAi,
    Anthropic,
    Gemini,
}

/// The live counters (the two gauges are read from the stores when a snapshot is taken).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    stats: BatchStats,
    seen: [HashSet<String>; 3],
}

impl Counters {
    /// Counts a created batch of `api` with `tag`, and, if it was accepted (will run its
    /// requests), remembers its custom_ids.
    pub(crate) fn created<'a>(
        &mut self,
        api: Api,
        tag: String,
        accepted: bool,
        custom_ids: impl Iterator<Item = &'a str>,
    ) {
        let per_tag = match api {
            Api::OpenAi => &mut self.stats.openai_created,
            Api::Anthropic => &mut self.stats.anthropic_created,
            Api::Gemini => &mut self.stats.gemini_created,
        };
        let key = if per_tag.len() < MAX_TAGS || per_tag.contains_key(&tag) { tag } else { OTHER_TAG.to_owned() };
        *per_tag.entry(key).or_default() += 1;
        if !accepted {
            self.stats.rejected += 1;
            return;
        }
        let seen = &mut self.seen[api as usize];
        for id in custom_ids {
            if seen.contains(id) {
                self.stats.resubmitted_custom_ids += 1;
            } else if seen.len() < MAX_REMEMBERED_IDS {
                seen.insert(id.to_owned());
            } else {
                self.stats.custom_ids_forgotten += 1;
            }
        }
    }

    /// Counts an OpenAI batch created with `tag` that will fail for the full enqueued-token
    /// queue (its requests will not run).
    pub(crate) fn token_limited(&mut self, tag: String) {
        let key = if self.stats.openai_created.len() < MAX_TAGS || self.stats.openai_created.contains_key(&tag) {
            tag
        } else {
            OTHER_TAG.to_owned()
        };
        *self.stats.openai_created.entry(key).or_default() += 1;
        self.stats.token_limit_failed += 1;
    }

    /// Notes that `n` OpenAI batches are in progress now.
    pub(crate) fn in_progress(&mut self, n: u64) {
        self.stats.most_in_progress = self.stats.most_in_progress.max(n);
    }

    /// Counts an Anthropic create refused for its requests' content.
    pub(crate) fn refused(&mut self) {
        self.stats.rejected += 1;
    }

    pub(crate) fn cancelled(&mut self) {
        self.stats.cancelled += 1;
    }

    /// Counts the tokens of Gemini batch responses served.
    pub(crate) fn gemini_usage(&mut self, prompt: u64, cached: u64, output: u64) {
        self.stats.gemini_input_tokens += prompt;
        self.stats.gemini_cached_tokens += cached;
        self.stats.gemini_output_tokens += output;
    }

    pub(crate) fn gemini_deleted(&mut self) {
        self.stats.gemini_deleted += 1;
    }

    pub(crate) fn file_uploaded(&mut self) {
        self.stats.files_uploaded += 1;
    }

    pub(crate) fn file_deleted(&mut self) {
        self.stats.files_deleted += 1;
    }

    /// The counters, with the stores' current gauges.
    pub(crate) fn snapshot(&self, files_stored: u64, bytes_stored: u64) -> BatchStats {
        BatchStats { files_stored, bytes_stored, ..self.stats.clone() }
    }

    /// Zeroes the counters and forgets the custom_ids seen (stored batches and files stay).
    pub(crate) fn reset(&mut self) {
        *self = Self::default();
    }
}

/// The tag of an OpenAI batch with `metadata` (see the module documentation).
pub(crate) fn metadata_tag(metadata: &BTreeMap<String, String>) -> String {
    metadata.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// The tag of an Anthropic batch whose first request has `first_custom_id`.
pub(crate) fn anthropic_tag(first_custom_id: &str) -> String {
    format!("custom_id={first_custom_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_batches_are_counted_per_tag_and_resubmissions_are_seen() {
        let mut c = Counters::default();
        let meta = BTreeMap::from([("job".to_owned(), "j".to_owned()), ("chunk".to_owned(), "1".to_owned())]);
        assert_eq!(metadata_tag(&meta), "chunk=1,job=j");
        c.created(Api::OpenAi, metadata_tag(&meta), true, ["a", "b"].into_iter());
        c.created(Api::OpenAi, metadata_tag(&meta), true, ["b", "c"].into_iter());
        // The same ids in the other API, or in a rejected batch, are no resubmission.
        c.created(Api::Anthropic, anthropic_tag("a"), true, ["a"].into_iter());
        c.created(Api::OpenAi, String::new(), false, ["a"].into_iter());
        c.cancelled();
        let s = c.snapshot(2, 10);
        assert_eq!(s.openai_created, BTreeMap::from([("chunk=1,job=j".to_owned(), 2), (String::new(), 1)]));
        assert_eq!(s.anthropic_created, BTreeMap::from([("custom_id=a".to_owned(), 1)]));
        assert_eq!(s.resubmitted_custom_ids, 1);
        assert_eq!((s.rejected, s.cancelled, s.files_stored, s.bytes_stored), (1, 1, 2, 10));
        c.reset();
        c.created(Api::OpenAi, String::new(), true, ["a"].into_iter());
        assert_eq!(c.snapshot(0, 0).resubmitted_custom_ids, 0);
    }

    #[test]
    fn tags_beyond_the_bound_share_one_entry() {
        let mut c = Counters::default();
        for i in 0..MAX_TAGS + 5 {
            c.created(Api::Anthropic, anthropic_tag(&i.to_string()), true, std::iter::empty());
        }
        let s = c.snapshot(0, 0);
        assert_eq!(s.anthropic_created.len(), MAX_TAGS + 1);
        assert_eq!(s.anthropic_created[OTHER_TAG], 5);
    }
}
