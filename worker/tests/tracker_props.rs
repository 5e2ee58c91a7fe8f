//! Property tests of the tracker's inputs: a checkpoint read back from its queue and any
//! sequence of ledger events (as the tracker takes them: only those within bounds) never
//! panic it, and a job's counts never exceed its total.

use fleet::wire::{ItemStatus, LedgerEvent};
use proptest::prelude::*;
use worker::tracker::state::State;

fn status() -> impl Strategy<Value = ItemStatus> {
    prop::sample::select(vec![ItemStatus::Succeeded, ItemStatus::Failed, ItemStatus::Cancelled, ItemStatus::Expired])
}

fn event() -> impl Strategy<Value = LedgerEvent> {
    let job = prop::sample::select(vec!["a", "b", ""]).prop_map(str::to_string);
    let index = prop_oneof![0u64..20, Just(1 << 40), any::<u64>()];
    prop_oneof![
        (job.clone(), prop_oneof![1u64..20, Just(0), Just(1 << 40), any::<u64>()]).prop_map(|(job_id, total)| {
            LedgerEvent::JobSubmitted {
                job_id,
                provider: "p".into(),
                total,
                submitted_at_ms: 0,
                deadline_ms: None,
                submitting: total % 2 == 0,
                max_cost: None,
            }
        }),
        (job.clone(), prop::collection::vec((index, status()), 0..5)).prop_map(|(job_id, items)| {
            LedgerEvent::ItemsFinished { job_id, provider: "p".into(), items, usage: vec![] }
        }),
        job.prop_map(|job_id| LedgerEvent::JobCancel { job_id }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_checkpoints_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = serde_json::from_slice::<State>(&bytes);
    }

    #[test]
    fn any_events_keep_counts_within_totals(events in prop::collection::vec(event(), 0..40)) {
        let mut state = State::default();
        for (t, e) in events.iter().enumerate() {
            if e.check().is_ok() {
                let _ = state.apply(e, t as u64);
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
