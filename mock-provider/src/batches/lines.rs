//! Owns the answer to one line of a provider batch and its rendering as a result line in each
//! API's format. The answer itself comes from the online answer logic ([`api::success_body`]),
//! so a request answered in a batch gets the same body as the same request sent online.

use rand::rngs::StdRng;
use rand::Rng;
use serde::Serialize;
use serde_json::value::RawValue;

use super::lifecycle::Ending;
use crate::api::{self, Endpoint};

/// The message of an answer failed by the `--batch-line-error-rate` knob.
const INJECTED_LINE_ERROR: &str = "mock-provider: injected batch line error";

/// What a batch line was answered, decided when the batch is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    /// The online success body.
    Success(String),
    /// The request is invalid for its endpoint (what online answers 400), with the reason.
    Invalid(String),
    /// The `--batch-line-error-rate` knob failed this line (what online answers 500).
    Injected,
}

/// Answers `body` on `endpoint` as the online endpoint would; `n` numbers the response id,
/// `created` is Unix seconds, and a draw from `rng` against `error_rate` may fail the line.
pub(crate) fn answer(
    endpoint: Endpoint,
    body: &[u8],
    n: u64,
    created: u64,
    error_rate: f64,
    rng: &mut StdRng,
) -> Answer {
    // The draw comes first and always, so which lines fail depends only on the seed and the
    // line's position, not on whether earlier lines were valid.
    let injected = rng.random::<f64>() < error_rate;
    match api::success_body(endpoint, body, n, created) {
        Err(reason) => Answer::Invalid(reason),
        Ok(_) if injected => Answer::Injected,
        // The online bodies are rendered by serde_json, hence UTF-8.
        Ok(bytes) => Answer::Success(String::from_utf8(bytes).expect("serde_json writes UTF-8")),
    }
}

impl Answer {
    /// Whether the line succeeded.
    pub(crate) fn is_success(&self) -> bool {
        matches!(self, Answer::Success(_))
    }
}

/// A line of an OpenAI batch's output or error file.
#[derive(Serialize)]
struct OpenAiLine<'a> {
    id: String,
    custom_id: &'a str,
    response: Option<OpenAiResponse>,
    error: Option<OpenAiLineError>,
}

#[derive(Serialize)]
struct OpenAiResponse {
    status_code: u16,
    request_id: String,
    body: Box<RawValue>,
}

#[derive(Serialize)]
struct OpenAiLineError {
    code: &'static str,
    message: &'static str,
}

/// Why an OpenAI line was never executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotRun {
    /// The batch was cancelled first (`batch_cancelled`).
    Cancelled,
    /// The completion window ran out first (`batch_expired`).
    Expired,
}

impl NotRun {
    /// Why the lines not answered by a batch that ended as `ending` were never run (only a
    /// cancelled or an expired batch leaves lines unanswered).
    pub(crate) fn after(ending: Ending) -> Self {
        if ending == Ending::Expired {
            NotRun::Expired
        } else {
            NotRun::Cancelled
        }
    }
}

/// The OpenAI output line (success) or error-file line (anything else) of an answered line
/// number `n`, newline included. A failed request keeps its HTTP status and error body, as
/// OpenAI writes it.
pub(crate) fn openai_line(endpoint: Endpoint, custom_id: &str, n: u64, answer: &Answer) -> String {
    let (status_code, body) = match answer {
        Answer::Success(body) => (200, body.clone()),
        Answer::Invalid(reason) => (400, utf8(api::error_body(endpoint, 400, reason))),
        Answer::Injected => (500, utf8(api::error_body(endpoint, 500, INJECTED_LINE_ERROR))),
    };
    let body = RawValue::from_string(body).expect("the online bodies are JSON");
    let response = OpenAiResponse { status_code, request_id: format!("req_{n}"), body };
    jsonl(&OpenAiLine { id: format!("batch_req_{n}"), custom_id, response: Some(response), error: None })
}

/// The OpenAI error-file line of a line that was never run, newline included.
pub(crate) fn openai_not_run(custom_id: &str, n: u64, why: NotRun) -> String {
    let error = match why {
        NotRun::Cancelled => OpenAiLineError {
            code: "batch_cancelled",
            message: "This request was not executed because the batch was cancelled.",
        },
        NotRun::Expired => OpenAiLineError {
            code: "batch_expired",
            message: "This request could not be executed before the completion window expired.",
        },
    };
    jsonl(&OpenAiLine { id: format!("batch_req_{n}"), custom_id, response: None, error: Some(error) })
}

/// A line of an Anthropic batch's results.
#[derive(Serialize)]
struct AnthropicLine<'a> {
    custom_id: &'a str,
    result: AnthropicResult,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum AnthropicResult {
    Succeeded { message: Box<RawValue> },
    Errored { error: AnthropicErrorResponse },
    Canceled,
    Expired,
}

#[derive(Serialize)]
struct AnthropicErrorResponse {
    #[serde(rename = "type")]
    kind: &'static str,
    error: AnthropicError,
}

#[derive(Serialize)]
struct AnthropicError {
    #[serde(rename = "type")]
    kind: &'static str,
    message: String,
}

/// The Anthropic result line of an answered line, newline included.
pub(crate) fn anthropic_line(custom_id: &str, answer: &Answer) -> String {
    let errored = |kind, message: &str| AnthropicResult::Errored {
        error: AnthropicErrorResponse { kind: "error", error: AnthropicError { kind, message: message.to_owned() } },
    };
    let result = match answer {
        Answer::Success(body) => {
            AnthropicResult::Succeeded { message: RawValue::from_string(body.clone()).expect("online bodies are JSON") }
        }
        Answer::Invalid(reason) => errored("invalid_request_error", reason),
        Answer::Injected => errored("api_error", INJECTED_LINE_ERROR),
    };
    jsonl(&AnthropicLine { custom_id, result })
}

/// The Anthropic result line of a line that was never run, newline included.
pub(crate) fn anthropic_not_run(custom_id: &str, why: NotRun) -> String {
    let result = match why {
        NotRun::Cancelled => AnthropicResult::Canceled,
        NotRun::Expired => AnthropicResult::Expired,
    };
    jsonl(&AnthropicLine { custom_id, result })
}

fn utf8(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).expect("serde_json writes UTF-8")
}

fn jsonl<T: Serialize>(value: &T) -> String {
    let mut line = serde_json::to_string(value).expect("result lines serialise");
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use serde_json::{json, Value};

    use super::*;

    const CHAT: &[u8] = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;

    fn parse(line: &str) -> Value {
        assert!(line.ends_with('\n'));
        serde_json::from_str(line).unwrap()
    }

    #[test]
    fn a_batch_answer_is_the_online_answer() {
        let mut rng = StdRng::seed_from_u64(1);
        let Answer::Success(body) = answer(Endpoint::ChatCompletions, CHAT, 9, 100, 0.0, &mut rng) else {
            panic!("expected a success")
        };
        let online = api::success_body(Endpoint::ChatCompletions, CHAT, 9, 100).unwrap();
        assert_eq!(body.as_bytes(), online.as_slice());

        let v = parse(&openai_line(Endpoint::ChatCompletions, "a-1", 9, &Answer::Success(body.clone())));
        assert_eq!(v["id"], "batch_req_9");
        assert_eq!(v["custom_id"], "a-1");
        assert_eq!(v["response"]["status_code"], 200);
        assert_eq!(v["response"]["request_id"], "req_9");
        assert_eq!(v["response"]["body"], serde_json::from_slice::<Value>(&online).unwrap());
        assert!(v["error"].is_null());
    }

    #[test]
    fn invalid_and_injected_lines_keep_the_online_error_shapes() {
        let mut rng = StdRng::seed_from_u64(1);
        let invalid = answer(Endpoint::ChatCompletions, br#"{"model":"m"}"#, 1, 0, 0.0, &mut rng);
        assert!(matches!(&invalid, Answer::Invalid(r) if r.contains("messages")));
        let v = parse(&openai_line(Endpoint::ChatCompletions, "x", 1, &invalid));
        assert_eq!(v["response"]["status_code"], 400);
        assert_eq!(v["response"]["body"]["error"]["type"], "invalid_request_error");

        assert_eq!(answer(Endpoint::ChatCompletions, CHAT, 1, 0, 1.0, &mut rng), Answer::Injected);
        let v = parse(&openai_line(Endpoint::ChatCompletions, "x", 1, &Answer::Injected));
        assert_eq!(v["response"]["status_code"], 500);
        assert_eq!(v["response"]["body"]["error"]["type"], "server_error");

        let v = parse(&anthropic_line("x", &invalid));
        assert_eq!(v["result"]["type"], "errored");
        assert_eq!(v["result"]["error"]["type"], "error");
        assert_eq!(v["result"]["error"]["error"]["type"], "invalid_request_error");
        let v = parse(&anthropic_line("x", &Answer::Injected));
        assert_eq!(v["result"]["error"]["error"]["type"], "api_error");
    }

    #[test]
    fn lines_never_run_say_why() {
        let v = parse(&openai_not_run("c", 3, NotRun::Expired));
        assert!(v["response"].is_null());
        assert_eq!(v["error"]["code"], "batch_expired");
        assert_eq!(parse(&openai_not_run("c", 3, NotRun::Cancelled))["error"]["code"], "batch_cancelled");
        assert_eq!(
            parse(&anthropic_not_run("c", NotRun::Cancelled)),
            json!({"custom_id": "c", "result": {"type": "canceled"}})
        );
        assert_eq!(
            parse(&anthropic_not_run("c", NotRun::Expired)),
            json!({"custom_id": "c", "result": {"type": "expired"}})
        );
    }

    #[test]
    fn anthropic_success_carries_the_message() {
        let mut rng = StdRng::seed_from_u64(1);
        let a = answer(
            Endpoint::Messages,
            br#"{"max_tokens":5,"messages":[{"role":"user","content":"yo"}]}"#,
            4,
            0,
            0.0,
            &mut rng,
        );
        let v = parse(&anthropic_line("id_1", &a));
        assert_eq!(v["custom_id"], "id_1");
        assert_eq!(v["result"]["type"], "succeeded");
        assert_eq!(v["result"]["message"]["type"], "message");
        assert_eq!(v["result"]["message"]["id"], "msg_4");
    }

    #[test]
    fn the_error_rate_is_roughly_the_fraction_of_failed_lines() {
        let mut rng = StdRng::seed_from_u64(7);
        let failed = (0..10_000)
            .filter(|&n| answer(Endpoint::ChatCompletions, CHAT, n, 0, 0.2, &mut rng) == Answer::Injected)
            .count();
        assert!((1700..2300).contains(&failed), "{failed}");
    }
}
