//! Property tests of every decoder of what arrives on a queue (item, result, ledger and
//! results-stream messages, control message, tracker request) and of the output line: no input panics a decoder or
//! its bound check, whatever is accepted is within bounds, and what the fleet writes reads
//! back unchanged.

use fleet::endpoint::Endpoint;
use fleet::messages::{LedgerMessage, ResultsMessage};
use fleet::wire::*;
use proptest::prelude::*;
use serde_json::value::RawValue;
use serde_json::{json, Value};

/// Arbitrary JSON values, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,12}", inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A well-formed item as JSON, with each field then possibly replaced by anything.
fn item_json() -> impl Strategy<Value = Value> {
    let good = (".{0,200}", any::<u64>(), any::<u64>(), ".{0,600}", prop::sample::select(Endpoint::ALL.to_vec()))
        .prop_map(|(job, index, total, custom, ep)| {
            json!({"job_id": job, "index": index, "total": total, "custom_id": custom, "provider": "p",
                   "url": ep.path(), "body": {"model": "m", "stream": index % 2 == 0}, "submitted_at_ms": 1})
        });
    let fields = ["job_id", "index", "total", "custom_id", "provider", "url", "body", "attempt", "deadline_ms"];
    (good, prop::option::of((prop::sample::select(fields.to_vec()), any_json()))).prop_map(|(mut v, swap)| {
        if let Some((field, value)) = swap {
            v[field] = value;
        }
        v
    })
}

fn decode_all(bytes: &[u8]) {
    if let Ok(item) = serde_json::from_slice::<Item>(bytes) {
        if item.check().is_ok() {
            assert!(item.index < item.total && item.total <= MAX_JOB_ITEMS);
            assert!(!item.job_id.is_empty() && item.job_id.len() <= MAX_JOB_ID_BYTES);
        }
        let _ = asks_to_stream(&item.body);
    }
    if let Ok(result) = serde_json::from_slice::<ItemResult>(bytes) {
        if result.check().is_ok() {
            assert!(result.index < result.total);
        }
        let _ = serde_json::to_vec(&result.to_output_line()).unwrap();
    }
    if let Ok(group) = serde_json::from_slice::<ResultGroup>(bytes) {
        if group.check().is_ok() {
            assert!(group.results.len() <= MAX_GROUP_RESULTS);
            for result in group.into_results() {
                assert!(result.check().is_ok(), "every result of a checked group is in bounds");
                let _ = serde_json::to_vec(&result.to_output_line()).unwrap();
            }
        }
    }
    for kind in [None, Some(KIND_RESULT), Some(KIND_RESULTS), Some(KIND_JOB_FINISHED)] {
        if let Ok(LedgerMessage::Results(results)) = LedgerMessage::decode(kind, bytes) {
            assert!(results.iter().all(|r| r.check().is_ok()), "a decoded ledger message is in bounds");
        }
        if let Ok(ResultsMessage::Results(results)) = ResultsMessage::decode(kind, bytes) {
            assert!(results.iter().all(|r| r.check().is_ok()), "decoded results are in bounds");
        }
    }
    if let Ok(msg) = serde_json::from_slice::<ControlMessage>(bytes) {
        let _ = msg.check();
    }
    let _ = serde_json::from_slice::<TrackerRequest>(bytes);
    let _ = serde_json::from_slice::<TrackerReply>(bytes);
    let _ = serde_json::from_slice::<JobSummary>(bytes);
}

proptest! {
    // No failure files in the source tree: a failing case is printed, minimised.
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_a_decoder(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        decode_all(&bytes);
    }

    #[test]
    fn arbitrary_json_never_panics_a_decoder(v in any_json()) {
        decode_all(&serde_json::to_vec(&v).unwrap());
    }

    #[test]
    fn items_with_any_field_swapped_decode_or_fail_cleanly(v in item_json()) {
        decode_all(&serde_json::to_vec(&v).unwrap());
    }

    #[test]
    fn messages_of_each_type_with_hostile_fields_decode_or_fail_cleanly(
        kind in prop::sample::select(vec!["job_submitted", "items_finished", "job_cancel", "cancel_job", "marker", "status", "jobs"]),
        job in prop_oneof![Just(Value::String("j".repeat(300))), any_json()],
        n in any_json(),
    ) {
        for v in [
            json!({"type": kind, "job_id": job, "provider": "p", "total": n, "submitted_at_ms": 0}),
            json!({"type": kind, "job_id": job, "provider": "p", "items": [[n, "failed"]]}),
            json!({"type": kind, "id": job}),
            json!({"op": kind, "job_id": job}),
            json!({"job_id": "j", "provider": "p", "total": n, "worker": "w", "results": [
                {"index": 0, "custom_id": "c", "status": "succeeded", "response": null, "error": null,
                 "attempts": 1, "finished_at_ms": 0},
                {"index": n, "custom_id": job, "status": kind, "response": null, "error": null,
                 "attempts": 0, "finished_at_ms": n}]}),
        ] {
            decode_all(&serde_json::to_vec(&v).unwrap());
        }
    }

    #[test]
    fn an_item_round_trips_with_its_body_unchanged(
        job in "[a-z0-9_]{1,40}", index in 0u64..1000, extra in 1u64..1000, custom in ".{1,100}",
        body in any_json(), attempt in any::<u32>(), deadline in prop::option::of(any::<u64>()),
    ) {
        let body = RawValue::from_string(json!({"model": "m", "x": body}).to_string()).unwrap();
        let item = Item {
            job_id: job, index, total: index + extra, custom_id: custom, provider: "p".into(),
            url: Endpoint::ChatCompletions.path().into(), body, attempt, submitted_at_ms: 1,
            deadline_ms: deadline, first_delay_ms: None, flex: false,
        };
        prop_assert_eq!(item.check(), Ok(()));
        let back: Item = serde_json::from_slice(&serde_json::to_vec(&item).unwrap()).unwrap();
        prop_assert_eq!(back.body.get(), item.body.get());
        prop_assert_eq!((back.index, back.total, back.attempt, back.deadline_ms), (item.index, item.total, item.attempt, item.deadline_ms));
        prop_assert_eq!(back.custom_id, item.custom_id);
    }

    /// Any answer body, and any `usage` object in one, reads as no usage or as bounded usage
    /// whose cached tokens are part of its input, never a panic.
    #[test]
    fn any_answer_reads_as_bounded_usage(usage in any_json(), model in any_json(), body in any_json()) {
        for text in [body.to_string(), json!({"model": model, "usage": usage}).to_string()] {
            if let Some(u) = fleet::usage::parse(&text) {
                prop_assert!(u.cached_input_tokens <= u.input_tokens);
                prop_assert!(u.output_tokens <= fleet::usage::MAX_TOKENS_PER_ANSWER);
                prop_assert!(u.model.len() <= fleet::usage::MAX_MODEL_BYTES);
            }
        }
    }

    #[test]
    fn an_output_line_reads_back_as_written(
        job in "[a-z0-9_]{1,40}", index in any::<u64>(), custom in ".{0,100}", status in 100u16..600,
        body in any_json(), code in prop::option::of("[a-z_]{1,20}"),
    ) {
        let result = ItemResult {
            job_id: job.clone(), index, total: index.saturating_add(1), custom_id: custom.clone(), provider: "p".into(),
            status: ItemStatus::Failed,
            response: Some(ResponseRecord { status_code: status, request_id: "r".into(),
                body: RawValue::from_string(body.to_string()).unwrap() }),
            error: code.clone().map(|c| ErrorRecord { code: c, message: "m".into() }),
            attempts: 1, worker: "w".into(), finished_at_ms: 0, request: None, usage: None,
        };
        let text = serde_json::to_string(&result.to_output_line()).unwrap();
        let line: Value = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(line["custom_id"].as_str(), Some(custom.as_str()));
        prop_assert_eq!(line["id"].as_str().map(str::to_string), Some(format!("batch_req_{job}_{index}")));
        prop_assert_eq!(line["response"]["status_code"].as_u64(), Some(u64::from(status)));
        // The body is written as received, byte for byte (parsing it back could round floats).
        let written = format!("\"body\":{}", body);
        prop_assert!(text.contains(&written), "{} not in {}", written, text);
        // The item failed. When the answer says so itself (not 2xx), `error` is null as in
        // OpenAI's output; a 2xx answer that still failed (e.g. not JSON) keeps its error.
        // Either way the line reads back as failed.
        if !(200..300).contains(&status) {
            prop_assert!(line["error"].is_null(), "{}", text);
        } else {
            prop_assert_eq!(line["error"]["code"].as_str(), code.as_deref());
        }
        if code.is_some() || !(200..300).contains(&status) {
            prop_assert_eq!(fleet::wire::output_line_status(&line), ItemStatus::Failed);
        }
    }

    #[test]
    fn stream_detection_never_panics_and_sees_a_top_level_true(v in any_json(), stream in any::<bool>()) {
        let raw = RawValue::from_string(v.to_string()).unwrap();
        let _ = asks_to_stream(&raw);
        let with = json!({"stream": stream, "other": v});
        let raw = RawValue::from_string(with.to_string()).unwrap();
        prop_assert_eq!(asks_to_stream(&raw), stream);
    }
}
