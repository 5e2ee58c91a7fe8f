//! What happens to a delivery from an items queue, decided without side effects: from the
//! delivery's bytes and what the worker knows ([`decide`]), then from the provider call's
//! outcome ([`after_call`]). [`crate::process`] carries the decisions out (publishes,
//! acks, dead-letters, counts), so every branch here is a unit test away.
//!
//! The order of the checks matters and is part of the contract:
//! 1. a message over `amqp.max_message_bytes` is dead-lettered `oversized` unread;
//! 2. garbage (not an item, an item of another provider, an item out of bounds: a job id no
//!    routing key can hold, an index not below the job's total) is dead-lettered `malformed`;
//! 3. an item whose `url` is not an endpoint of its provider, or would leave the provider's
//!    `base_url`, is dead-lettered `forbidden_url` and never called (only the producer, which
//!    validates every line, should publish items; anyone else is suspect);
//! 4. an item of a cancelled job gets a `cancelled` result, one past its deadline an
//!    `expired` one, without a call;
//! 5. an item delivered more than `amqp.delivery_limit` times (it keeps killing workers) is
//!    poison: a failed result, and the message parked;
//! 6. an item whose body asks for `"stream": true` fails with `stream_not_supported` without a
//!    call (a streamed answer is not JSON, and retrying it would pay again);
//! 7. a flex item (`--mode flex`) on a provider whose kind has no flex tier fails with
//!    `flex_not_supported` without a call (the producer refuses such a job; the provider
//!    would answer at full price, or not at all);
//! 8. otherwise the provider is called, and [`after_call`] decides: the answer becomes the
//!    result (a flex item's usage marked flex, so the tracker prices it at the flex
//!    factor); a transient failure with delay budget left goes to a delay queue; any other
//!    failure becomes a failed result that keeps its request (for `producer retry`).
//!
//! A flex item makes one call per delivery (see [`crate::provider`]): every retry of it is
//! a trip through the delay queues, which hold no worker and no delivery.

use fleet::config::RetryConfig;
use fleet::topology::DeadLabel;
use fleet::wire::{error_code, ErrorRecord, Item, ItemResult, ItemStatus, RequestRecord, REASON_BUDGET};

use crate::answer::CallError;
use crate::known::Cancelled;
use crate::provider::{ForbiddenUrl, Outcome, Target};

/// What the worker knows about a delivery besides its bytes.
pub struct Facts<'a> {
    /// The provider whose queue the delivery came from.
    pub provider: &'a str,
    /// `amqp.max_message_bytes`.
    pub max_message_bytes: usize,
    /// `amqp.delivery_limit`.
    pub delivery_limit: u32,
    /// How many times the message was delivered, this time included.
    pub deliveries: u64,
    /// Milliseconds since the epoch, now.
    pub now_ms: u64,
    /// The worker's id, written into results.
    pub worker_id: &'a str,
    /// The cancels this worker has read.
    pub cancelled: &'a Cancelled,
    /// Whether the provider's kind has a flex tier (`--mode flex` items need one).
    pub flex_tier: bool,
}

/// What to do with a delivery, decided before any provider call.
#[derive(Debug)]
pub enum Verdict {
    /// Not an item this worker may act on: park it with this reason.
    DeadLetter {
        /// The `reason` label of `batch_dead_letters_total`.
        label: DeadLabel,
        /// Why, in words, for the operator (`producer dead`).
        reason: String,
    },
    /// The item ends without a call: publish this result, then ack.
    Finish(Box<ItemResult>),
    /// The item keeps killing workers: publish this failed result, then park the message.
    Poison {
        /// The item's failed result.
        result: Box<ItemResult>,
        /// Why the message is parked, for the operator.
        reason: String,
    },
    /// Call the provider at `target`.
    Call {
        /// The item to call the provider for.
        item: Box<Item>,
        /// Where and how to send its request.
        target: Target,
    },
}

/// Decides what to do with a delivery's bytes; `target_of` resolves an item's `url` against
/// its provider ([`crate::provider::ProviderClient::target`]).
pub fn decide(data: &[u8], facts: &Facts<'_>, target_of: impl FnOnce(&str) -> Result<Target, ForbiddenUrl>) -> Verdict {
    if data.len() > facts.max_message_bytes {
        let reason = format!("oversized: {} bytes > {}", data.len(), facts.max_message_bytes);
        return Verdict::DeadLetter { label: DeadLabel::Oversized, reason };
    }
    let malformed = |reason: String| Verdict::DeadLetter { label: DeadLabel::Malformed, reason };
    let item: Item = match serde_json::from_slice(data) {
        Ok(item) => item,
        Err(e) => return malformed(format!("malformed item: {e}")),
    };
    if item.provider != facts.provider {
        return malformed(format!("item for provider {:?} on the queue of {:?}", item.provider, facts.provider));
    }
    if let Err(e) = item.check() {
        return malformed(format!("invalid item: {e}"));
    }
    let target = match target_of(&item.url) {
        Ok(target) => target,
        Err(e) => return Verdict::DeadLetter { label: DeadLabel::ForbiddenUrl, reason: format!("forbidden_url: {e}") },
    };
    if let Some(result) = unwanted(&item, facts.cancelled, facts.now_ms, facts.worker_id) {
        return Verdict::Finish(Box::new(result));
    }
    if facts.deliveries > u64::from(facts.delivery_limit) {
        let reason = format!("poison: delivered {} times without completing", facts.deliveries);
        let error = ErrorRecord { code: error_code::POISON.into(), message: reason.clone() };
        let result = ItemResult::without_answer(&item, ItemStatus::Failed, error, facts.worker_id);
        return Verdict::Poison { result: Box::new(result), reason };
    }
    if fleet::wire::asks_to_stream(&item.body) {
        let message = "the body asks for \"stream\": true; the fleet needs whole JSON answers";
        let error = ErrorRecord { code: error_code::STREAM_NOT_SUPPORTED.into(), message: message.into() };
        let result = ItemResult::without_answer(&item, ItemStatus::Failed, error, facts.worker_id);
        return Verdict::Finish(Box::new(result));
    }
    if item.flex && !facts.flex_tier {
        let message = "a --mode flex request on a provider whose kind has no flex tier (service_tier)";
        let error = ErrorRecord { code: error_code::FLEX_NOT_SUPPORTED.into(), message: message.into() };
        let result = ItemResult::without_answer(&item, ItemStatus::Failed, error, facts.worker_id);
        return Verdict::Finish(Box::new(result));
    }
    Verdict::Call { item: Box::new(item), target }
}

/// How an item that was called is settled.
#[derive(Debug)]
pub enum Decision {
    /// Publish this result, then ack.
    Finish(Box<ItemResult>),
    /// Republish to the delay queue for another try later, then ack.
    Delay(Box<Item>, CallError),
    /// Not started before shutdown: give it back to the queue for another worker.
    Release,
    /// This worker cannot call the provider (every key rejected): back to the queue after
    /// a pause, for a worker whose keys work.
    Requeue,
}

/// What a provider call's outcome means for its item, `now_ms` after the epoch.
pub fn after_call(item: Item, outcome: Outcome, retry: &RetryConfig, worker_id: &str, now_ms: u64) -> Decision {
    match outcome.result {
        Err(CallError::NoKeys { .. }) => Decision::Requeue,
        Ok(success) => {
            let mut result = match success.answer.to_record() {
                Some(answer) => ItemResult::answered(&item, answer, worker_id),
                // The client returns a success only with a JSON body; should one come without,
                // the item fails rather than claim an answer it does not have.
                None => {
                    let error = ErrorRecord {
                        code: error_code::INVALID_RESPONSE.into(),
                        message: "a 2xx answer without a body".into(),
                    };
                    ItemResult::without_answer(&item, ItemStatus::Failed, error, worker_id)
                }
            };
            result.attempts = outcome.attempts;
            result.usage = result.response.as_ref().and_then(|r| fleet::usage::parse(r.body.get()));
            if let Some(usage) = result.usage.as_mut() {
                usage.flex = item.flex;
            }
            Decision::Finish(Box::new(result))
        }
        Err(e) if e.is_transient() && may_delay(retry, &item, now_ms) => Decision::Delay(Box::new(item), e),
        Err(e) => {
            let mut result = ItemResult::without_answer(&item, ItemStatus::Failed, e.to_record(), worker_id);
            result.response = e.answer().and_then(|a| a.to_record());
            result.attempts = outcome.attempts;
            // Kept with the result so `producer retry` can submit it again.
            result.request = Some(RequestRecord::of(&item));
            Decision::Finish(Box::new(result))
        }
    }
}

/// Whether a transiently failing item may wait in a delay queue once more: fewer than
/// `retry.max_delays` delays so far, and within `retry.delay_budget_s` of its first.
fn may_delay(retry: &RetryConfig, item: &Item, now_ms: u64) -> bool {
    let within_budget = item.first_delay_ms.is_none_or(|t| now_ms.saturating_sub(t) < retry.delay_budget_s * 1000);
    item.attempt < retry.max_delays && within_budget
}

/// The result of an item its job no longer wants, if it does not: `cancelled` when the job
/// was cancelled, `expired` when its deadline passed. Checked before the item is taken, and
/// again after every wait before a call (for room, a rate limit, a backoff), so a cancel or
/// a deadline that falls while an item waits still stops it before it costs anything.
pub fn unwanted(item: &Item, cancelled: &Cancelled, now_ms: u64, worker_id: &str) -> Option<ItemResult> {
    if cancelled.contains(&item.job_id) {
        return Some(cancelled_result(item, cancelled, worker_id));
    }
    if item.deadline_ms.is_some_and(|d| now_ms > d) {
        let message = "job deadline passed before this request was made";
        return Some(ended_without_call(item, ItemStatus::Expired, message, worker_id));
    }
    None
}

/// The result of an item of a cancelled job, saying why when the cancel did (`budget`).
fn cancelled_result(item: &Item, cancelled: &Cancelled, worker_id: &str) -> ItemResult {
    let message = match cancelled.reason(&item.job_id) {
        Some(reason) if reason == REASON_BUDGET => {
            "budget: the job's spend reached its cap (--max-cost) before this request was made".to_string()
        }
        Some(reason) => format!("{reason}: job cancelled before this request was made"),
        None => "job cancelled before this request was made".to_string(),
    };
    ended_without_call(item, ItemStatus::Cancelled, &message, worker_id)
}

/// The result of an item that ends without a call for a reason its status names
/// (`cancelled`, `expired`): the error's code is the status.
fn ended_without_call(item: &Item, status: ItemStatus, message: &str, worker_id: &str) -> ItemResult {
    let error = ErrorRecord { code: status.as_str().to_string(), message: message.to_string() };
    ItemResult::without_answer(item, status, error, worker_id)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::answer::{Answer, Success};

    const NOW: u64 = 1_000_000;

    fn item_json(extra: &str) -> String {
        format!(
            r#"{{"job_id":"job_1","index":0,"total":2,"custom_id":"c0","provider":"mock","url":"/v1/chat/completions",
            "body":{{"model":"m"}},"submitted_at_ms":0{extra}}}"#
        )
    }

    fn target() -> Target {
        Target {
            endpoint: fleet::endpoint::Endpoint::ChatCompletions,
            url: "http://127.0.0.1:1/v1/chat/completions".parse().unwrap(),
        }
    }

    /// Decides `data` with the usual facts, `deliveries` and the given cancels.
    fn verdict_with(data: &str, deliveries: u64, cancelled: &Cancelled) -> Verdict {
        let facts = Facts {
            provider: "mock",
            max_message_bytes: 1024,
            delivery_limit: 3,
            deliveries,
            now_ms: NOW,
            worker_id: "w1",
            cancelled,
            flex_tier: true,
        };
        decide(data.as_bytes(), &facts, |_| Ok(target()))
    }

    fn verdict(data: &str) -> Verdict {
        verdict_with(data, 1, &Cancelled::new(60_000))
    }

    fn dead_label(v: &Verdict) -> Option<DeadLabel> {
        match v {
            Verdict::DeadLetter { label, .. } => Some(*label),
            _ => None,
        }
    }

    fn finished(v: Verdict) -> ItemResult {
        match v {
            Verdict::Finish(r) => *r,
            other => panic!("expected a result without a call, got {other:?}"),
        }
    }

    #[test]
    fn garbage_is_dead_lettered_with_its_reason() {
        assert_eq!(dead_label(&verdict(&" ".repeat(1025))), Some(DeadLabel::Oversized));
        assert_eq!(dead_label(&verdict("{not json")), Some(DeadLabel::Malformed));
        let other = item_json("").replace("\"mock\"", "\"other\"");
        assert!(
            matches!(verdict(&other), Verdict::DeadLetter { label: DeadLabel::Malformed, reason } if reason.contains("\"other\""))
        );
        let past_total = item_json("").replace("\"index\":0", "\"index\":2");
        assert!(
            matches!(verdict(&past_total), Verdict::DeadLetter { label: DeadLabel::Malformed, reason } if reason.starts_with("invalid item"))
        );
    }

    #[test]
    fn a_url_its_provider_does_not_serve_is_never_called() {
        let facts = Facts {
            provider: "mock",
            max_message_bytes: 1024,
            delivery_limit: 3,
            deliveries: 1,
            now_ms: NOW,
            worker_id: "w1",
            cancelled: &Cancelled::new(60_000),
            flex_tier: true,
        };
        let v = decide(item_json("").as_bytes(), &facts, |url| Err(ForbiddenUrl::Escapes(url.to_string())));
        assert!(
            matches!(v, Verdict::DeadLetter { label: DeadLabel::ForbiddenUrl, reason } if reason.contains("/v1/chat/completions"))
        );
    }

    #[test]
    fn a_cancelled_job_ends_its_items_without_a_call_saying_why() {
        let cancelled = Cancelled::new(60_000);
        cancelled.insert("job_1".into(), NOW);
        let r = finished(verdict_with(&item_json(""), 1, &cancelled));
        assert_eq!((r.status, r.error.unwrap().code.as_str(), r.attempts), (ItemStatus::Cancelled, "cancelled", 0));
        let budget = Cancelled::new(60_000);
        budget.insert_with_reason("job_1".into(), Some(REASON_BUDGET), NOW);
        let r = finished(verdict_with(&item_json(""), 1, &budget));
        assert!(r.error.unwrap().message.starts_with("budget:"));
    }

    #[test]
    fn an_item_past_its_deadline_expires_without_a_call() {
        let r = finished(verdict(&item_json(&format!(r#","deadline_ms":{}"#, NOW - 1))));
        assert_eq!((r.status, r.error.unwrap().code.as_str()), (ItemStatus::Expired, "expired"));
        assert!(matches!(verdict(&item_json(&format!(r#","deadline_ms":{NOW}"#))), Verdict::Call { .. }));
    }

    #[test]
    fn an_item_delivered_past_the_limit_is_poison() {
        assert!(matches!(verdict_with(&item_json(""), 3, &Cancelled::new(60_000)), Verdict::Call { .. }));
        match verdict_with(&item_json(""), 4, &Cancelled::new(60_000)) {
            Verdict::Poison { result, reason } => {
                assert_eq!(result.status, ItemStatus::Failed);
                assert_eq!(result.error.as_ref().unwrap().code, "poison");
                assert_eq!(reason, "poison: delivered 4 times without completing");
            }
            other => panic!("expected poison, got {other:?}"),
        }
        // A cancel still wins: the job no longer wants the item at all.
        let cancelled = Cancelled::new(60_000);
        cancelled.insert("job_1".into(), NOW);
        assert_eq!(finished(verdict_with(&item_json(""), 9, &cancelled)).status, ItemStatus::Cancelled);
    }

    #[test]
    fn a_body_asking_to_stream_fails_without_a_call() {
        let streaming = item_json("").replace(r#"{"model":"m"}"#, r#"{"model":"m","stream":true}"#);
        let r = finished(verdict(&streaming));
        assert_eq!((r.status, r.error.unwrap().code.as_str()), (ItemStatus::Failed, "stream_not_supported"));
    }

    #[test]
    fn a_flex_item_needs_a_provider_with_a_flex_tier() {
        let flex = item_json(r#","flex":true"#);
        let cancelled = Cancelled::new(60_000);
        let facts = Facts {
            provider: "mock",
            max_message_bytes: 1024,
            delivery_limit: 3,
            deliveries: 1,
            now_ms: NOW,
            worker_id: "w1",
            cancelled: &cancelled,
            flex_tier: false,
        };
        let r = finished(decide(flex.as_bytes(), &facts, |_| Ok(target())));
        assert_eq!(
            (r.status, r.error.unwrap().code.as_str(), r.attempts),
            (ItemStatus::Failed, "flex_not_supported", 0)
        );
        match verdict(&flex) {
            Verdict::Call { item, .. } => assert!(item.flex),
            other => panic!("expected a call, got {other:?}"),
        }
        // Without the flag (an item of an online job, or of an earlier producer): online.
        assert!(
            matches!(decide(item_json("").as_bytes(), &facts, |_| Ok(target())), Verdict::Call { item, .. } if !item.flex)
        );
    }

    #[test]
    fn anything_else_is_called() {
        match verdict(&item_json("")) {
            Verdict::Call { item, target } => {
                assert_eq!(
                    (item.custom_id.as_str(), target.endpoint),
                    ("c0", fleet::endpoint::Endpoint::ChatCompletions)
                )
            }
            other => panic!("expected a call, got {other:?}"),
        }
    }

    fn retry() -> RetryConfig {
        RetryConfig { max_delays: 2, delay_budget_s: 60, ..fleet::Config::load(None).unwrap().retry }
    }

    fn item(attempt: u32, first_delay_ms: Option<u64>) -> Item {
        let mut item: Item = serde_json::from_str(&item_json("")).unwrap();
        (item.attempt, item.first_delay_ms) = (attempt, first_delay_ms);
        item
    }

    fn answer(status: u16) -> Answer {
        let body = r#"{"model":"m","usage":{"prompt_tokens":3,"completion_tokens":4}}"#;
        Answer {
            status,
            request_id: "req_1".into(),
            body: Some(serde_json::value::RawValue::from_string(body.into()).unwrap()),
        }
    }

    #[test]
    fn an_answer_becomes_the_result() {
        let success = Success { answer: answer(200), prompt_tokens: 1, completion_tokens: 1 };
        let outcome = Outcome { result: Ok(success), attempts: 2 };
        match after_call(item(0, None), outcome, &retry(), "w1", NOW) {
            Decision::Finish(r) => {
                assert_eq!((r.status, r.attempts, r.error.is_none()), (ItemStatus::Succeeded, 2, true));
                assert!(r.usage.as_ref().is_some_and(|u| (u.input_tokens, u.output_tokens) == (3, 4)), "{:?}", r.usage);
                assert_eq!(r.response.unwrap().request_id, "req_1");
                assert!(r.request.is_none(), "a success does not keep its request");
            }
            other => panic!("expected the answer, got {other:?}"),
        }
        let bodiless = Success { answer: Answer { body: None, ..answer(200) }, prompt_tokens: 0, completion_tokens: 0 };
        match after_call(item(0, None), Outcome { result: Ok(bodiless), attempts: 1 }, &retry(), "w1", NOW) {
            Decision::Finish(r) => {
                assert_eq!((r.status, r.error.unwrap().code.as_str()), (ItemStatus::Failed, "invalid_response"))
            }
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn a_flex_answer_is_marked_flex_and_a_flex_tier_without_capacity_waits_in_a_delay_queue() {
        let mut flex = item(0, None);
        flex.flex = true;
        let success = Success { answer: answer(200), prompt_tokens: 1, completion_tokens: 1 };
        match after_call(flex.clone(), Outcome { result: Ok(success), attempts: 1 }, &retry(), "w1", NOW) {
            Decision::Finish(r) => assert!(r.usage.is_some_and(|u| u.flex && !u.batch)),
            other => panic!("expected the answer, got {other:?}"),
        }
        let online = Success { answer: answer(200), prompt_tokens: 1, completion_tokens: 1 };
        match after_call(item(0, None), Outcome { result: Ok(online), attempts: 1 }, &retry(), "w1", NOW) {
            Decision::Finish(r) => assert!(r.usage.is_some_and(|u| !u.flex)),
            other => panic!("expected the answer, got {other:?}"),
        }
        let unavailable =
            || Outcome { result: Err(CallError::Unavailable { answer: answer(498), retry_after: None }), attempts: 1 };
        assert!(matches!(after_call(flex.clone(), unavailable(), &retry(), "w1", NOW), Decision::Delay(..)));
        flex.attempt = 2;
        match after_call(flex, unavailable(), &retry(), "w1", NOW) {
            Decision::Finish(r) => assert_eq!(r.error.unwrap().code, "capacity_unavailable"),
            other => panic!("expected a failure once the delays are spent, got {other:?}"),
        }
    }

    #[test]
    fn a_transient_failure_is_delayed_while_the_budget_lasts() {
        let timeout = || Outcome { result: Err(CallError::Timeout(Duration::from_secs(1))), attempts: 5 };
        assert!(matches!(after_call(item(0, None), timeout(), &retry(), "w1", NOW), Decision::Delay(..)));
        assert!(matches!(after_call(item(1, Some(NOW - 59_000)), timeout(), &retry(), "w1", NOW), Decision::Delay(..)));
        for spent in [item(2, Some(NOW)), item(1, Some(NOW - 60_000))] {
            match after_call(spent, timeout(), &retry(), "w1", NOW) {
                Decision::Finish(r) => {
                    assert_eq!(
                        (r.status, r.error.unwrap().code.as_str(), r.attempts),
                        (ItemStatus::Failed, "timeout", 5)
                    );
                    assert!(r.request.is_some(), "a failure keeps its request for `producer retry`");
                }
                other => panic!("expected a failure once the delays are spent, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_permanent_failure_fails_at_once_with_the_providers_answer() {
        let rejected = CallError::Client { answer: answer(400), message: "bad".into() };
        match after_call(item(0, None), Outcome { result: Err(rejected), attempts: 1 }, &retry(), "w1", NOW) {
            Decision::Finish(r) => {
                assert_eq!(r.status, ItemStatus::Failed);
                assert_eq!(r.response.unwrap().status_code, 400, "the provider's answer is kept");
                assert_eq!(r.request.unwrap().url, "/v1/chat/completions");
            }
            other => panic!("expected a failure, got {other:?}"),
        }
    }
}
