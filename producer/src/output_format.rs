//! Owns the formats `wait` writes results in (`--output-format`):
//!
//! - `openai` (the default): OpenAI Batch output lines, `{"id", "custom_id", "response",
//!   "error"}` ([`fleet::wire::BatchOutputLine`]);
//! - `anthropic`: Anthropic Message Batches result lines, `{"custom_id", "result": {"type":
//!   "succeeded" | "errored" | "canceled" | "expired", ...}}`, plus the fleet's line `id`
//!   (`batch_req_<job>_<index>`, as in the OpenAI format): it tells whose results a file
//!   holds, so an interrupted `wait` resumes its file and refuses another job's. Readers of
//!   Anthropic results ignore the extra key.
//!
//! - `gemini`: Gemini batch result lines, `{"key", "response"}` (a `GenerateContentResponse`)
//!   or `{"key", "error"}` (a `google.rpc.Status`: `code`, `message`, `status`), `key`
//!   being the line's `custom_id`; plus the fleet's `id` and the `custom_id` (as for
//!   `anthropic`: they let `wait` resume its file). An OpenAI answer (what every provider
//!   kind's answers are stored as, Gemini's translated) is turned back into Gemini's shape
//!   ([`fleet::gemini::to_gemini_answer`]); any other body is written as it came. A
//!   cancelled item's error is `CANCELLED`, an expired one's `DEADLINE_EXCEEDED`.
//!
//! A succeeded item's `message` is the provider's answer body as it came (an Anthropic
//! Message from an Anthropic-kind provider). A failed item's `error` is the provider's own
//! Anthropic error body when it sent one, else an Anthropic-shaped error made from the
//! fleet's error code and message.

use std::io::Write;

use fleet::wire::{output_line_status, ErrorRecord, ItemResult, ItemStatus, ResponseRecord};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;

/// The format of an output file.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OutputFormat {
    /// OpenAI Batch output lines.
    #[default]
    Openai,
    /// Anthropic Message Batches result lines.
    Anthropic,
    /// Gemini batch result lines (`{"key", "response" | "error"}`).
    Gemini,
}

impl std::fmt::Display for OutputFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OutputFormat::Openai => "openai",
            OutputFormat::Anthropic => "anthropic",
            OutputFormat::Gemini => "gemini",
        })
    }
}

impl OutputFormat {
    /// Writes `result` as one line of this format, newline included.
    pub fn write_line(self, out: &mut impl Write, result: &ItemResult) -> anyhow::Result<()> {
        match self {
            OutputFormat::Openai => serde_json::to_writer(&mut *out, &result.to_output_line())?,
            OutputFormat::Anthropic => serde_json::to_writer(&mut *out, &anthropic_line(result))?,
            OutputFormat::Gemini => serde_json::to_writer(&mut *out, &gemini_line(result))?,
        }
        out.write_all(b"\n")?;
        Ok(())
    }

    /// How the item of an existing `line` ended, or `None` if the line is not a result line
    /// of this format.
    pub fn status_of(self, line: &Value) -> Option<ItemStatus> {
        match self {
            // An Anthropic or Gemini line read as OpenAI would look like a failure without an
            // error.
            OutputFormat::Openai => {
                (line.get("result").is_none() && line.get("key").is_none()).then(|| output_line_status(line))
            }
            OutputFormat::Gemini => {
                line.get("key")?.as_str()?;
                match (line.get("response"), line["error"]["status"].as_str()) {
                    (Some(_), None) => Some(ItemStatus::Succeeded),
                    (None, Some("CANCELLED")) => Some(ItemStatus::Cancelled),
                    (None, Some("DEADLINE_EXCEEDED")) => Some(ItemStatus::Expired),
                    (None, Some(_)) => Some(ItemStatus::Failed),
                    _ => None,
                }
            }
            OutputFormat::Anthropic => match line["result"]["type"].as_str()? {
                "succeeded" => Some(ItemStatus::Succeeded),
                "errored" => Some(ItemStatus::Failed),
                "canceled" => Some(ItemStatus::Cancelled),
                "expired" => Some(ItemStatus::Expired),
                _ => None,
            },
        }
    }
}

/// A Gemini batch result line as JSON (see the module header).
fn gemini_line(result: &ItemResult) -> Value {
    let mut line = serde_json::json!({
        "id": format!("batch_req_{}_{}", result.job_id, result.index),
        "key": result.custom_id,
        "custom_id": result.custom_id,
    });
    match (result.status, &result.response) {
        (ItemStatus::Succeeded, Some(response)) => {
            let body: Value = serde_json::from_str(response.body.get()).unwrap_or(Value::Null);
            line["response"] = fleet::gemini::to_gemini_answer(&body).unwrap_or(body);
        }
        (status, response) => line["error"] = gemini_error(status, response.as_ref(), result.error.as_ref()),
    }
    line
}

/// The `google.rpc.Status` of an item that did not succeed: the provider's own when it is a
/// Google error body, else one made from the fleet's record (its code kept in the message).
fn gemini_error(status: ItemStatus, response: Option<&ResponseRecord>, error: Option<&ErrorRecord>) -> Value {
    if let Some(own) = response.and_then(|r| serde_json::from_str::<Value>(r.body.get()).ok()) {
        if own["error"]["status"].is_string() && own["error"]["message"].is_string() {
            return own["error"].clone();
        }
    }
    let (code, message) = error.map_or(("unknown", "no error was recorded"), |e| (e.code.as_str(), e.message.as_str()));
    // google.rpc.Code numbers.
    let (number, name) = match (status, code, response.map(|r| r.status_code)) {
        (ItemStatus::Cancelled, ..) => (1, "CANCELLED"),
        (ItemStatus::Expired, ..) => (4, "DEADLINE_EXCEEDED"),
        (_, "rate_limited", _) | (.., Some(429)) => (8, "RESOURCE_EXHAUSTED"),
        (_, "overloaded", _) | (.., Some(503 | 529)) => (14, "UNAVAILABLE"),
        (.., Some(401)) => (16, "UNAUTHENTICATED"),
        (.., Some(403)) => (7, "PERMISSION_DENIED"),
        (.., Some(404)) => (5, "NOT_FOUND"),
        (.., Some(400..=499)) | (_, "client_error", _) => (3, "INVALID_ARGUMENT"),
        _ => (13, "INTERNAL"),
    };
    serde_json::json!({ "code": number, "message": format!("{code}: {message}"), "status": name })
}

/// An Anthropic result line.
#[derive(Serialize)]
struct AnthropicLine<'a> {
    id: String,
    custom_id: &'a str,
    result: AnthropicResult<'a>,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum AnthropicResult<'a> {
    Succeeded { message: &'a RawValue },
    Errored { error: ErrorBody<'a> },
    Canceled,
    Expired,
}

/// The `error` of an errored result: the provider's own body, or one made by the fleet.
#[derive(Serialize)]
#[serde(untagged)]
enum ErrorBody<'a> {
    Provider(&'a RawValue),
    Fleet { r#type: &'static str, error: FleetError },
}

#[derive(Serialize)]
struct FleetError {
    r#type: &'static str,
    message: String,
}

fn anthropic_line(result: &ItemResult) -> AnthropicLine<'_> {
    let result_of = match (result.status, &result.response) {
        (ItemStatus::Succeeded, Some(response)) => AnthropicResult::Succeeded { message: &response.body },
        (ItemStatus::Cancelled, _) => AnthropicResult::Canceled,
        (ItemStatus::Expired, _) => AnthropicResult::Expired,
        (ItemStatus::Succeeded | ItemStatus::Failed, response) => {
            AnthropicResult::Errored { error: error_body(response.as_ref(), result.error.as_ref()) }
        }
    };
    AnthropicLine {
        id: format!("batch_req_{}_{}", result.job_id, result.index),
        custom_id: &result.custom_id,
        result: result_of,
    }
}

/// The provider's body if it is an Anthropic error (`{"type": "error", "error": {...}}`),
/// else an error of that shape from the fleet's record.
fn error_body<'a>(response: Option<&'a ResponseRecord>, error: Option<&ErrorRecord>) -> ErrorBody<'a> {
    if let Some(response) = response {
        let shaped = serde_json::from_str::<Value>(response.body.get())
            .is_ok_and(|v| v["type"] == "error" && v["error"]["type"].is_string());
        if shaped {
            return ErrorBody::Provider(&response.body);
        }
    }
    let (code, message) = error.map_or(("unknown", "no error was recorded"), |e| (e.code.as_str(), e.message.as_str()));
    let kind = match (code, response.map(|r| r.status_code)) {
        ("rate_limited", _) | (_, Some(429)) => "rate_limit_error",
        ("overloaded", _) | (_, Some(529)) => "overloaded_error",
        (_, Some(401)) => "authentication_error",
        (_, Some(403)) => "permission_error",
        (_, Some(404)) => "not_found_error",
        (_, Some(413)) | ("response_too_large", _) => "request_too_large",
        (_, Some(400..=499)) | ("client_error", _) => "invalid_request_error",
        _ => "api_error",
    };
    // The fleet's code stays in the message, so no information is lost to the mapping.
    ErrorBody::Fleet { r#type: "error", error: FleetError { r#type: kind, message: format!("{code}: {message}") } }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn result(status: ItemStatus, response: Option<(u16, &str)>, error: Option<(&str, &str)>) -> ItemResult {
        ItemResult {
            job_id: "job_1".into(),
            index: 7,
            total: 9,
            custom_id: "c7".into(),
            provider: "p".into(),
            status,
            response: response.map(|(status_code, body)| ResponseRecord {
                status_code,
                request_id: "req".into(),
                body: RawValue::from_string(body.into()).unwrap(),
            }),
            error: error.map(|(code, message)| ErrorRecord { code: code.into(), message: message.into() }),
            attempts: 1,
            worker: "w".into(),
            finished_at_ms: 0,
            request: None,
            usage: None,
        }
    }

    fn line(format: OutputFormat, r: &ItemResult) -> Value {
        let mut out = Vec::new();
        format.write_line(&mut out, r).unwrap();
        assert_eq!(out.last(), Some(&b'\n'));
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn anthropic_lines_carry_each_result_type_and_read_back() {
        let message = r#"{"id":"msg_1","type":"message","content":[]}"#;
        let provider_error = r#"{"type":"error","error":{"type":"invalid_request_error","message":"bad"}}"#;
        let cases = [
            (
                result(ItemStatus::Succeeded, Some((200, message)), None),
                json!({"type": "succeeded", "message": serde_json::from_str::<Value>(message).unwrap()}),
            ),
            (
                result(ItemStatus::Failed, Some((400, provider_error)), Some(("client_error", "bad"))),
                json!({"type": "errored", "error": serde_json::from_str::<Value>(provider_error).unwrap()}),
            ),
            (
                result(ItemStatus::Failed, None, Some(("timeout", "no answer in 60 s"))),
                json!({"type": "errored", "error": {"type": "error", "error": {"type": "api_error", "message": "timeout: no answer in 60 s"}}}),
            ),
            (
                result(
                    ItemStatus::Failed,
                    Some((429, r#"{"error":{"message":"slow down"}}"#)),
                    Some(("rate_limited", "x")),
                ),
                json!({"type": "errored", "error": {"type": "error", "error": {"type": "rate_limit_error", "message": "rate_limited: x"}}}),
            ),
            (result(ItemStatus::Cancelled, None, Some(("cancelled", "job cancelled"))), json!({"type": "canceled"})),
            (result(ItemStatus::Expired, None, Some(("expired", "deadline"))), json!({"type": "expired"})),
        ];
        for (r, expected) in cases {
            let v = line(OutputFormat::Anthropic, &r);
            assert_eq!(v["custom_id"], "c7");
            assert_eq!(v["id"], "batch_req_job_1_7");
            assert_eq!(v["result"], expected);
            assert_eq!(OutputFormat::Anthropic.status_of(&v), Some(r.status), "{v}");
            assert_eq!(OutputFormat::Openai.status_of(&v), None, "an anthropic line is not an openai one");
        }
    }

    #[test]
    fn gemini_lines_carry_responses_in_geminis_shape_and_read_back() {
        let chat = r#"{"id":"r1","object":"chat.completion","model":"gemini-2.0-flash","choices":[{"index":0,
            "message":{"role":"assistant","content":"yo"},"finish_reason":"stop"}],
            "usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9}}"#;
        let google = r#"{"error":{"code":400,"message":"bad","status":"INVALID_ARGUMENT"}}"#;
        let ok = line(OutputFormat::Gemini, &result(ItemStatus::Succeeded, Some((200, chat)), None));
        assert_eq!((ok["key"].as_str(), ok["id"].as_str()), (Some("c7"), Some("batch_req_job_1_7")));
        assert_eq!(ok["response"]["candidates"][0]["content"]["parts"][0]["text"], "yo");
        assert_eq!(ok["response"]["usageMetadata"]["promptTokenCount"], 7);
        assert!(ok.get("error").is_none(), "{ok}");
        let cases = [
            (result(ItemStatus::Succeeded, Some((200, chat)), None), None),
            (result(ItemStatus::Failed, Some((400, google)), Some(("client_error", "bad"))), Some("INVALID_ARGUMENT")),
            (result(ItemStatus::Failed, None, Some(("timeout", "no answer"))), Some("INTERNAL")),
            (result(ItemStatus::Cancelled, None, Some(("cancelled", "job cancelled"))), Some("CANCELLED")),
            (result(ItemStatus::Expired, None, Some(("expired", "deadline"))), Some("DEADLINE_EXCEEDED")),
        ];
        for (r, status) in cases {
            let v = line(OutputFormat::Gemini, &r);
            assert_eq!(v["error"]["status"].as_str(), status, "{v}");
            assert_eq!(OutputFormat::Gemini.status_of(&v), Some(r.status), "{v}");
            assert_eq!(OutputFormat::Openai.status_of(&v), None, "a gemini line is not an openai one");
            assert_eq!(OutputFormat::Anthropic.status_of(&v), None, "a gemini line is not an anthropic one");
        }
        let openai = line(OutputFormat::Openai, &result(ItemStatus::Succeeded, Some((200, "{}")), None));
        assert_eq!(OutputFormat::Gemini.status_of(&openai), None, "an openai line is not a gemini one");
    }

    #[test]
    fn the_openai_format_is_the_output_line_and_reads_back() {
        let r = result(ItemStatus::Succeeded, Some((200, "{}")), None);
        let v = line(OutputFormat::Openai, &r);
        assert_eq!(v, serde_json::to_value(r.to_output_line()).unwrap());
        assert_eq!(OutputFormat::Openai.status_of(&v), Some(ItemStatus::Succeeded));
        assert_eq!(OutputFormat::Anthropic.status_of(&v), None, "an openai line is not an anthropic one");
        assert_eq!(OutputFormat::default(), OutputFormat::Openai);
    }
}
