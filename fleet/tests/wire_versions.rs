//! Wire versions across releases: every message kind as the previous release (772545e,
//! before versions) wrote it decodes in this one, through the same decoders the queues'
//! readers use, with its meaningful fields intact; this release writes every kind with its
//! version and reads it back; a newer minor with fields this release does not know is
//! read; another major is refused with a clear error.
//!
//! The fixtures in `tests/fixtures/772545e/` are the exact bytes that release's own types
//! encode (made by `generate.rs` beside them, run against that commit's `fleet` and
//! `worker` crates), one message per file followed by a newline. The tracker checkpoint's
//! fixture is read by `worker/tests/wire_versions.rs`, where its type lives.

use std::path::PathBuf;

use fleet::batch::{ChunkState, ChunkTask};
use fleet::messages::{LedgerMessage, ResultsMessage, Undecodable};
use fleet::wire::*;
use serde_json::Value;

const PREVIOUS: &str = "772545e";

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(PREVIOUS)
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(dir().join(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

/// The fixture as a JSON tree with `edit` applied, re-encoded.
fn edited(name: &str, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(&fixture(name)).unwrap();
    edit(v.as_object_mut().expect("every message is a JSON object"));
    serde_json::to_vec(&v).unwrap()
}

/// The message kinds: fixture file, the AMQP `type` its queue's reader is given, and a
/// decode through that reader that re-encodes what it read in this release.
#[allow(clippy::type_complexity)]
fn kinds() -> Vec<(&'static str, fn(&[u8]) -> Result<Vec<Vec<u8>>, String>)> {
    fn ledger(kind: Option<&str>, bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
        match LedgerMessage::decode(kind, bytes).map_err(|e| e.to_string())? {
            LedgerMessage::Event(e) => Ok(vec![serde_json::to_vec(&e).unwrap()]),
            LedgerMessage::Results(rs) => Ok(rs.iter().map(|r| serde_json::to_vec(r).unwrap()).collect()),
            LedgerMessage::Nothing => Ok(vec![]),
        }
    }
    fn results(kind: Option<&str>, bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
        match ResultsMessage::decode(kind, bytes).map_err(|e| e.to_string())? {
            ResultsMessage::Results(rs) => Ok(rs.iter().map(|r| serde_json::to_vec(r).unwrap()).collect()),
            ResultsMessage::JobFinished(s) => Ok(vec![serde_json::to_vec(&s).unwrap()]),
        }
    }
    /// A group read by a collector, written again as a group.
    fn group(bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
        let ResultsMessage::Results(rs) =
            ResultsMessage::decode(Some(KIND_RESULTS), bytes).map_err(|e| e.to_string())?
        else {
            return Err("not results".into());
        };
        let first = rs.first().ok_or("an empty group")?.clone();
        let group = ResultGroup {
            job_id: first.job_id,
            provider: first.provider,
            total: first.total,
            worker: first.worker,
            results: rs.into_iter().map(ItemResult::into_grouped).collect(),
        };
        Ok(vec![serde_json::to_vec(&group).unwrap()])
    }
    fn plain<T: serde::Serialize + serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
        let t: T = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        Ok(vec![serde_json::to_vec(&t).unwrap()])
    }
    vec![
        ("item.json", plain::<Item>),
        ("result_succeeded.json", |b| results(Some(KIND_RESULT), b)),
        ("result_failed.json", |b| ledger(Some(KIND_RESULT), b)),
        ("result_group.json", group),
        ("job_finished.json", |b| results(Some(KIND_JOB_FINISHED), b)),
        ("ledger_job_submitted.json", |b| ledger(None, b)),
        ("ledger_submission_complete.json", |b| ledger(None, b)),
        ("ledger_job_cancel.json", |b| ledger(None, b)),
        ("ledger_item_delayed.json", |b| ledger(None, b)),
        ("control_cancel_job.json", plain::<ControlMessage>),
        ("control_job_opened.json", plain::<ControlMessage>),
        ("control_job_closed.json", plain::<ControlMessage>),
        ("control_marker.json", plain::<ControlMessage>),
        ("tracker_request_status.json", plain::<TrackerRequest>),
        ("tracker_request_jobs.json", plain::<TrackerRequest>),
        ("tracker_reply.json", plain::<TrackerReply>),
        ("tracker_reply_unknown_job.json", plain::<TrackerReply>),
        ("chunk_pending.json", plain::<ChunkTask>),
        ("chunk_created.json", plain::<ChunkTask>),
    ]
}

#[test]
fn every_fixture_of_the_previous_release_is_covered() {
    let mut on_disk: Vec<String> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".json"))
        .collect();
    on_disk.sort();
    let mut covered: Vec<String> = kinds().iter().map(|(n, _)| n.to_string()).collect();
    covered.push("checkpoint.json".into()); // worker/tests/wire_versions.rs
    covered.sort();
    assert_eq!(on_disk, covered);
    for name in &on_disk {
        let v: Value = serde_json::from_slice(&fixture(name)).unwrap();
        assert!(v.get("v").is_none(), "{name}: the previous release wrote no version");
    }
}

#[test]
fn items_of_the_previous_release_decode_with_their_body_untouched() {
    let bytes = fixture("item.json");
    let item: Item = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(item.check(), Ok(()));
    assert_eq!(
        (item.job_id.as_str(), item.index, item.total, item.custom_id.as_str(), item.provider.as_str()),
        ("job_0123456789abcdef", 7, 10, "req-7", "openai")
    );
    assert_eq!(item.url, "/v1/chat/completions");
    assert_eq!((item.attempt, item.submitted_at_ms), (2, 1_765_000_000_000));
    assert_eq!((item.deadline_ms, item.first_delay_ms), (Some(1_765_086_400_000), Some(1_765_000_060_000)));
    let text = std::str::from_utf8(&bytes).unwrap();
    assert!(text.contains(item.body.get()), "the body's bytes pass through unchanged: {}", item.body.get());
    assert!(item.body.get().contains(r"Hello \u00e9"), "escapes are kept as written");
}

#[test]
fn results_and_groups_of_the_previous_release_decode_through_the_queue_readers() {
    let ResultsMessage::Results(ok) =
        ResultsMessage::decode(Some(KIND_RESULT), &fixture("result_succeeded.json")).unwrap()
    else {
        panic!("a result")
    };
    let ok = &ok[0];
    assert_eq!((ok.index, ok.status, ok.attempts, ok.worker.as_str()), (7, ItemStatus::Succeeded, 1, "worker-a"));
    let response = ok.response.as_ref().expect("the answer");
    assert_eq!((response.status_code, response.request_id.as_str()), (200, "req_abc"));
    let usage = ok.usage.as_ref().expect("usage");
    assert_eq!((usage.model.as_str(), usage.input_tokens, usage.output_tokens), ("gpt-4o-mini", 12, 3));
    assert!(ok.request.is_none() && ok.error.is_none());

    let LedgerMessage::Results(failed) =
        LedgerMessage::decode(Some(KIND_RESULT), &fixture("result_failed.json")).unwrap()
    else {
        panic!("a result")
    };
    let failed = &failed[0];
    assert_eq!((failed.index, failed.status, failed.attempts), (3, ItemStatus::Failed, 5));
    assert_eq!(failed.error, Some(ErrorRecord { code: "timeout".into(), message: "every call timed out".into() }));
    assert_eq!(failed.request.as_ref().map(|r| r.url.as_str()), Some("/v1/chat/completions"), "kept for retry");
    assert_eq!(output_line_status(&serde_json::to_value(failed.to_output_line()).unwrap()), ItemStatus::Failed);

    // A group, read by a collector and by the tracker, is the two results above.
    let bytes = fixture("result_group.json");
    for decoded in [
        match ResultsMessage::decode(Some(KIND_RESULTS), &bytes).unwrap() {
            ResultsMessage::Results(r) => r,
            other => panic!("{other:?}"),
        },
        match LedgerMessage::decode(Some(KIND_RESULTS), &bytes).unwrap() {
            LedgerMessage::Results(r) => r,
            other => panic!("{other:?}"),
        },
    ] {
        let got: Vec<Value> = decoded.iter().map(|r| serde_json::to_value(r).unwrap()).collect();
        let want: Vec<Value> = [ok, failed].iter().map(|r| serde_json::to_value(r).unwrap()).collect();
        assert_eq!(got, want, "a group's results are whole results");
    }
}

#[test]
fn the_previous_releases_job_summaries_decode() {
    let ResultsMessage::JobFinished(s) =
        ResultsMessage::decode(Some(KIND_JOB_FINISHED), &fixture("job_finished.json")).unwrap()
    else {
        panic!("a summary")
    };
    assert_eq!((s.job_id.as_str(), s.status), ("job_done", JobStatus::Completed));
    assert_eq!(s.counts, JobCounts { total: 2, succeeded: 1, failed: 1, cancelled: 0, expired: 0 });
    assert_eq!(s.finished_at_ms, Some(1_765_000_300_000));
    assert_eq!(s.usage.as_ref().map(|u| (u.input_tokens, u.unpriced_answers)), Some((12, 1)));

    let reply: TrackerReply = serde_json::from_slice(&fixture("tracker_reply.json")).unwrap();
    assert_eq!((reply.tracker.as_str(), reply.error.as_deref(), reply.forgotten), ("worker-b", None, false));
    let job = &reply.jobs[0];
    assert_eq!((job.status, job.counts.pending()), (JobStatus::Submitting, 8));
    let progress = job.progress.as_ref().expect("a job in progress says where its items are");
    assert_eq!((progress.in_delay_queues, progress.queued_or_in_flight, progress.eta_s), (1, 7, Some(1200)));
    assert_eq!(progress.last_error.as_deref(), Some("every call timed out"));
    assert_eq!(job.usage.as_ref().and_then(|u| u.max_cost), Some(2.5));

    let unknown: TrackerReply = serde_json::from_slice(&fixture("tracker_reply_unknown_job.json")).unwrap();
    assert!(unknown.jobs.is_empty() && !unknown.forgotten, "a field the previous release lacked takes its default");
    assert_eq!(unknown.error.as_deref(), Some("no job job_missing"));
}

#[test]
fn ledger_events_of_the_previous_release_decode_through_the_trackers_reader() {
    let event = |name: &str| match LedgerMessage::decode(None, &fixture(name)).unwrap() {
        LedgerMessage::Event(e) => e,
        other => panic!("{name}: {other:?}"),
    };
    let job_id = "job_0123456789abcdef".to_string();
    assert_eq!(
        event("ledger_job_submitted.json"),
        LedgerEvent::JobSubmitted {
            job_id: job_id.clone(),
            provider: "openai".into(),
            total: 10,
            submitted_at_ms: 1_765_000_000_000,
            deadline_ms: Some(1_765_086_400_000),
            submitting: true,
            max_cost: Some(2.5),
            webhook_url: None,
            mode: None,
        }
    );
    assert_eq!(event("ledger_submission_complete.json"), LedgerEvent::SubmissionComplete { job_id: job_id.clone() });
    assert_eq!(event("ledger_job_cancel.json"), LedgerEvent::JobCancel { job_id: job_id.clone() });
    assert_eq!(
        event("ledger_item_delayed.json"),
        LedgerEvent::ItemDelayed {
            job_id,
            provider: "openai".into(),
            index: 4,
            error: "server_error: 503 from the provider".into(),
        }
    );
}

#[test]
fn control_messages_and_tracker_requests_of_the_previous_release_decode() {
    let control = |name: &str| {
        let c: ControlMessage = serde_json::from_slice(&fixture(name)).unwrap();
        assert_eq!(c.check(), Ok(()), "{name}");
        c
    };
    let job_id = "job_0123456789abcdef".to_string();
    assert_eq!(
        control("control_cancel_job.json"),
        ControlMessage::CancelJob { job_id: job_id.clone(), reason: Some(REASON_BUDGET.into()) }
    );
    assert_eq!(
        control("control_job_opened.json"),
        ControlMessage::JobOpened { job_id: job_id.clone(), provider: "openai".into(), priority: 3 }
    );
    assert_eq!(control("control_job_closed.json"), ControlMessage::JobClosed { job_id: job_id.clone() });
    assert_eq!(
        control("control_marker.json"),
        ControlMessage::Marker { id: "6f1c2a4e-3b9d-4c55-9a7e-0d2b8f1e4a11".into() }
    );
    let status: TrackerRequest = serde_json::from_slice(&fixture("tracker_request_status.json")).unwrap();
    assert_eq!(status, TrackerRequest::Status { job_id });
    let jobs: TrackerRequest = serde_json::from_slice(&fixture("tracker_request_jobs.json")).unwrap();
    assert_eq!(jobs, TrackerRequest::Jobs);
}

#[test]
fn chunks_of_the_previous_release_decode_in_both_states() {
    let pending: ChunkTask = serde_json::from_slice(&fixture("chunk_pending.json")).unwrap();
    assert!(pending.check().is_ok());
    assert_eq!((pending.chunk, pending.start, pending.end, pending.total, pending.len()), (1, 5, 10, 10, 5));
    assert_eq!(pending.state, ChunkState::Pending { maybe_created: true });
    assert!(pending.fallback_online && pending.deadline_ms == Some(1_765_086_400_000));
    assert!(!pending.by_endpoint, "the previous release's streams are in index order");
    let created: ChunkTask = serde_json::from_slice(&fixture("chunk_created.json")).unwrap();
    assert!(created.check().is_ok());
    assert_eq!(
        created.state,
        ChunkState::Created {
            batch_id: "batch_68a1b2c3".into(),
            input_file_id: Some("file-9xYz".into()),
            cancel_sent: false,
            key_env: None
        }
    );
    assert_eq!(created.polls, 4);
}

/// With `WIRE_VERSIONS_DUMP=<dir>`, this release's encoding of every fixture is written
/// there, so that an older release can be run against it (docs/architecture.md, "Wire
/// versions", says how 772545e was checked reading them).
#[test]
fn this_release_writes_every_kind_with_its_version_and_reads_it_back() {
    let dump = std::env::var_os("WIRE_VERSIONS_DUMP").map(PathBuf::from);
    for (name, decode) in kinds() {
        let old = decode(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        if let Some(dir) = &dump {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(dir.join(name), &old[0]).unwrap();
        }
        for bytes in &old {
            let text = std::str::from_utf8(bytes).unwrap();
            assert!(text.starts_with(r#"{"v":"1.1","#), "{name}: the version comes first: {text}");
            // What this release wrote, read again, writes the same bytes.
            let again = decode(bytes).unwrap_or_else(|e| panic!("{name} as written now: {e}"));
            assert!(again.iter().any(|b| b == bytes), "{name}: {text}");
        }
        assert_eq!(old.len(), 1, "{name}");
        // Apart from its version and fields added since, the message is written as the
        // previous release wrote it.
        let now = comparable(serde_json::from_slice(&old[0]).unwrap());
        let before = comparable(serde_json::from_slice(&fixture(name)).unwrap());
        assert_contains(&now, &before, name);
    }
    let group = ResultGroup::header_json("j", "p", 2, "w");
    assert!(group.starts_with(br#"{"v":"1.1","job_id":"j""#), "{}", String::from_utf8_lossy(&group));
}

/// Every field of `old`, at any depth, is in `now` with the same value.
fn assert_contains(now: &Value, old: &Value, at: &str) {
    match (now, old) {
        (Value::Object(n), Value::Object(o)) => {
            for (k, v) in o {
                let here = format!("{at}.{k}");
                assert_contains(n.get(k).unwrap_or_else(|| panic!("{here} is no longer written")), v, &here);
            }
        }
        (Value::Array(n), Value::Array(o)) if n.len() == o.len() => {
            for (i, (n, o)) in n.iter().zip(o).enumerate() {
                assert_contains(n, o, &format!("{at}[{i}]"));
            }
        }
        _ => assert_eq!(now, old, "{at}"),
    }
}

/// A message without its versions (a reply's job summaries carry one each) and without
/// null fields (null and absent mean the same to every reader). No body in the fixtures
/// has a `v` of its own.
fn comparable(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter().filter(|(k, v)| !v.is_null() && k != "v").map(|(k, v)| (k, comparable(v))).collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(comparable).collect()),
        v => v,
    }
}

#[test]
fn a_newer_minor_with_fields_this_release_does_not_know_is_read() {
    for (name, decode) in kinds() {
        let newer = edited(name, |m| {
            m.insert("v".into(), "1.9".into());
            m.insert("added_in_1_9".into(), serde_json::json!({"any": ["shape", 1, null]}));
        });
        let decoded = decode(&newer).unwrap_or_else(|e| panic!("{name}: a 1.9 message must read: {e}"));
        let fresh = decode(&fixture(name)).unwrap();
        let values =
            |all: Vec<Vec<u8>>| all.iter().map(|b| serde_json::from_slice::<Value>(b).unwrap()).collect::<Vec<_>>();
        assert_eq!(values(decoded), values(fresh), "{name}: the unknown field is ignored, nothing else changes");
    }
}

#[test]
fn another_major_is_refused_by_every_reader_with_both_versions_named() {
    for (name, decode) in kinds() {
        for v in [Value::from("2.0"), Value::from(2), Value::from("0.5")] {
            let shown = v.to_string();
            let bytes = edited(name, |m| {
                m.insert("v".into(), v);
            });
            let err = decode(&bytes).expect_err(name);
            assert!(err.contains("is not supported: this release reads versions 1.x"), "{name} with v {shown}: {err}");
        }
    }
    // The queues' readers say what the message claimed to be, then why it was refused.
    let bytes = edited("ledger_job_cancel.json", |m| {
        m.insert("v".into(), "3.1".into());
    });
    let err = LedgerMessage::decode(None, &bytes).unwrap_err();
    assert!(matches!(err, Undecodable::Json { kind: "ledger event", .. }), "{err:?}");
    assert!(err.to_string().contains("wire version 3.1 is not supported"), "{err}");
    let garbage = edited("item.json", |m| {
        m.insert("v".into(), serde_json::json!({"major": 1}));
    });
    let err = serde_json::from_slice::<Item>(&garbage).unwrap_err().to_string();
    assert!(err.contains("a wire version such as \"1.1\""), "{err}");
}
