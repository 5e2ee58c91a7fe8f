//! One decoder per queue: what a message read off the ledger or off a job's results stream
//! means, decoded and bounds-checked in one place.
//!
//! Anyone who can publish to the broker can write to these queues, so every reader goes
//! through these decoders: a message that does not parse, or parses but is out of bounds (a
//! job id no routing key can hold, an index past its job's total, a group larger than any
//! worker sends), is refused whole with the reason, never half-used.
//!
//! The AMQP `type` property says what a message carries ([`KIND_RESULT`], [`KIND_RESULTS`],
//! [`KIND_JOB_FINISHED`]); a message without one is a job event on the ledger and a single
//! result on a results stream.

use crate::wire::{
    Invalid, ItemResult, JobSummary, LedgerEvent, ResultGroup, KIND_JOB_FINISHED, KIND_RESULT, KIND_RESULTS,
};

/// Why a message read off a queue was refused.
#[derive(Debug, thiserror::Error)]
pub enum Undecodable {
    /// Not the JSON its kind says.
    #[error("not a {kind}: {source}")]
    Json {
        /// What the message claimed to be.
        kind: &'static str,
        /// The parser's complaint.
        source: serde_json::Error,
    },
    /// Parsed, but out of bounds.
    #[error("{kind} out of bounds: {source}")]
    Invalid {
        /// What the message claimed to be.
        kind: &'static str,
        /// The bound it breaks.
        source: Invalid,
    },
}

/// A message on the ledger queue, folded by the job tracker.
#[derive(Debug)]
pub enum LedgerMessage {
    /// A job event from a producer or a worker.
    Event(LedgerEvent),
    /// Results of one job, routed here from the results exchange (one alone or a worker's
    /// group; never empty).
    Results(Vec<ItemResult>),
    /// Nothing to fold: a `job_finished` from a tracker older than the route straight to the
    /// job's stream, or an empty group.
    Nothing,
}

impl LedgerMessage {
    /// Decodes a ledger message by its AMQP `type` (`None`: a job event).
    pub fn decode(kind: Option<&str>, data: &[u8]) -> Result<LedgerMessage, Undecodable> {
        match kind {
            Some(KIND_JOB_FINISHED) => Ok(LedgerMessage::Nothing),
            Some(KIND_RESULT) | Some(KIND_RESULTS) => {
                let results = decode_results(kind == Some(KIND_RESULTS), data)?;
                Ok(if results.is_empty() { LedgerMessage::Nothing } else { LedgerMessage::Results(results) })
            }
            _ => {
                let kind = "ledger event";
                let event: LedgerEvent =
                    serde_json::from_slice(data).map_err(|source| Undecodable::Json { kind, source })?;
                event.check().map_err(|source| Undecodable::Invalid { kind, source })?;
                Ok(LedgerMessage::Event(event))
            }
        }
    }
}

/// A message on a job's results stream, read by `producer wait` and `producer retry`.
#[derive(Debug)]
pub enum ResultsMessage {
    /// Results of the job (one alone or a worker's group).
    Results(Vec<ItemResult>),
    /// The tracker's announcement that the job ended, with its summary.
    JobFinished(Box<JobSummary>),
}

impl ResultsMessage {
    /// Decodes a results-stream message by its AMQP `type` (`None`: a single result).
    pub fn decode(kind: Option<&str>, data: &[u8]) -> Result<ResultsMessage, Undecodable> {
        match kind {
            Some(KIND_JOB_FINISHED) => serde_json::from_slice(data)
                .map(ResultsMessage::JobFinished)
                .map_err(|source| Undecodable::Json { kind: "job summary", source }),
            _ => decode_results(kind == Some(KIND_RESULTS), data).map(ResultsMessage::Results),
        }
    }
}

/// The results a group or a single result carries, checked: a group with any result out
/// of bounds is refused whole.
fn decode_results(grouped: bool, data: &[u8]) -> Result<Vec<ItemResult>, Undecodable> {
    if grouped {
        let kind = "result group";
        let group: ResultGroup = serde_json::from_slice(data).map_err(|source| Undecodable::Json { kind, source })?;
        group.check().map_err(|source| Undecodable::Invalid { kind, source })?;
        Ok(group.into_results().collect())
    } else {
        let kind = "result";
        let result: ItemResult = serde_json::from_slice(data).map_err(|source| Undecodable::Json { kind, source })?;
        result.check().map_err(|source| Undecodable::Invalid { kind, source })?;
        Ok(vec![result])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result_json(index: u64, total: u64) -> String {
        format!(
            r#"{{"job_id":"j","index":{index},"total":{total},"custom_id":"c{index}","provider":"p","status":"succeeded",
            "response":null,"error":null,"attempts":1,"worker":"w","finished_at_ms":1}}"#
        )
    }

    fn group_json(indexes: &[u64], total: u64) -> String {
        let entries: Vec<String> = indexes
            .iter()
            .map(|i| {
                format!(
                    r#"{{"index":{i},"custom_id":"c{i}","status":"failed","response":null,
                    "error":{{"code":"x","message":"m"}},"attempts":2,"finished_at_ms":1}}"#
                )
            })
            .collect();
        format!(r#"{{"job_id":"j","provider":"p","total":{total},"worker":"w","results":[{}]}}"#, entries.join(","))
    }

    #[test]
    fn the_ledger_reads_events_results_and_groups_by_kind() {
        let event = br#"{"type":"job_cancel","job_id":"j"}"#;
        assert!(matches!(LedgerMessage::decode(None, event), Ok(LedgerMessage::Event(LedgerEvent::JobCancel { .. }))));
        let one = LedgerMessage::decode(Some(KIND_RESULT), result_json(1, 3).as_bytes()).unwrap();
        assert!(matches!(&one, LedgerMessage::Results(r) if r.len() == 1 && r[0].index == 1));
        let group = LedgerMessage::decode(Some(KIND_RESULTS), group_json(&[0, 2], 3).as_bytes()).unwrap();
        let LedgerMessage::Results(results) = group else { panic!("a group is results") };
        assert_eq!(
            results.iter().map(|r| (r.index, r.job_id.as_str(), r.attempts)).collect::<Vec<_>>(),
            [(0, "j", 2), (2, "j", 2)]
        );
        let empty = LedgerMessage::decode(Some(KIND_RESULTS), group_json(&[], 3).as_bytes()).unwrap();
        assert!(matches!(empty, LedgerMessage::Nothing));
        assert!(matches!(LedgerMessage::decode(Some(KIND_JOB_FINISHED), b"{}"), Ok(LedgerMessage::Nothing)));
    }

    #[test]
    fn out_of_bounds_messages_are_refused_whole_with_the_reason() {
        let past_total = LedgerMessage::decode(Some(KIND_RESULTS), group_json(&[0, 3], 3).as_bytes()).unwrap_err();
        assert!(past_total.to_string().contains("result group out of bounds: index 3"), "{past_total}");
        let bad_event = br#"{"type":"job_submitted","job_id":"","provider":"p","total":1,"submitted_at_ms":0}"#;
        assert!(matches!(LedgerMessage::decode(None, bad_event), Err(Undecodable::Invalid { .. })));
        let garbage = ResultsMessage::decode(None, b"\xff not json").unwrap_err();
        assert!(garbage.to_string().starts_with("not a result:"), "{garbage}");
        let single_past_total = ResultsMessage::decode(Some(KIND_RESULT), result_json(5, 3).as_bytes());
        assert!(matches!(single_past_total, Err(Undecodable::Invalid { kind: "result", .. })));
    }

    #[test]
    fn a_results_stream_reads_results_and_the_job_summary() {
        let results = ResultsMessage::decode(None, result_json(0, 1).as_bytes()).unwrap();
        assert!(matches!(results, ResultsMessage::Results(r) if r.len() == 1));
        let summary = r#"{"job_id":"j","provider":"p","status":"completed",
            "total":1,"succeeded":1,"failed":0,"cancelled":0,"expired":0,"submitted_at_ms":0}"#;
        match ResultsMessage::decode(Some(KIND_JOB_FINISHED), summary.as_bytes()) {
            Ok(ResultsMessage::JobFinished(s)) => assert_eq!((s.job_id.as_str(), s.counts.total), ("j", 1)),
            other => panic!("expected the summary, got {other:?}"),
        }
    }
}
