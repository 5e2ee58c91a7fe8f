//! Property tests of the tracker's inputs: a checkpoint read back from its queue and any
//! sequence of ledger messages (as the tracker takes them: decoded, so only those within
//! bounds) never panic it, and a job's counts never exceed its total.

use fleet::messages::LedgerMessage;
use fleet::wire::{ItemStatus, LedgerEvent, KIND_RESULT};
use proptest::prelude::*;
use worker::tracker::state::State;

fn status() -> impl Strategy<Value = ItemStatus> {
    prop::sample::select(vec![ItemStatus::Succeeded, ItemStatus::Failed, ItemStatus::Cancelled, ItemStatus::Expired])
}

/// A ledger message as the tracker decodes it: a job event, or a result sent as JSON.
fn message() -> impl Strategy<Value = Option<LedgerMessage>> {
    let job = prop::sample::select(vec!["a", "b", ""]).prop_map(str::to_string);
    let index = prop_oneof![0u64..20, Just(1 << 40), any::<u64>()];
    prop_oneof![
        (job.clone(), prop_oneof![1u64..20, Just(0), Just(1 << 40), any::<u64>()]).prop_map(|(job_id, total)| {
            event(LedgerEvent::JobSubmitted {
                job_id,
                provider: "p".into(),
                total,
                submitted_at_ms: 0,
                deadline_ms: None,
                submitting: total % 2 == 0,
                max_cost: None,
                webhook_url: None,
                mode: None,
            })
        }),
        (job.clone(), index, prop_oneof![1u64..20, any::<u64>()], status()).prop_map(
            |(job_id, index, total, status)| {
                let result = serde_json::json!({"job_id": job_id, "index": index, "total": total, "custom_id": "c",
                "provider": "p", "status": status, "response": null, "error": null, "attempts": 1, "worker": "w",
                "finished_at_ms": 0});
                LedgerMessage::decode(Some(KIND_RESULT), &serde_json::to_vec(&result).unwrap()).ok()
            }
        ),
        job.prop_map(|job_id| event(LedgerEvent::JobCancel { job_id })),
    ]
}

/// The event as the tracker reads it off the ledger (`None` when refused).
fn event(e: LedgerEvent) -> Option<LedgerMessage> {
    LedgerMessage::decode(None, &serde_json::to_vec(&e).unwrap()).ok()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_checkpoints_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = serde_json::from_slice::<State>(&bytes);
    }

    #[test]
    fn any_messages_keep_counts_within_totals(messages in prop::collection::vec(message(), 0..40)) {
        let mut state = State::default();
        for (t, m) in messages.iter().enumerate() {
            let t = t as u64;
            match m {
                Some(LedgerMessage::Event(e)) => {
                    let _ = state.apply(e, t);
                }
                Some(LedgerMessage::Results(results)) => {
                    let _ = state.apply_results(results, t);
                }
                Some(LedgerMessage::Nothing) | None => {}
            }
        }
        for job in state.jobs.values() {
            if let Some(total) = job.total {
                prop_assert!(total <= fleet::wire::MAX_JOB_ITEMS);
            }
        }
        // The checkpoint stays small: no bitmap grew to a hostile index.
        let checkpoint = serde_json::to_vec(&state).unwrap();
        prop_assert!(checkpoint.len() < 1 << 20, "checkpoint of {} bytes", checkpoint.len());
        let back: State = serde_json::from_slice(&checkpoint).unwrap();
        prop_assert_eq!(back, state);
    }
}
