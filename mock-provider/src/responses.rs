//! Owns the answer of OpenAI's Responses API (`POST /v1/responses`): the request's `input`
//! (a string, or a list of input items whose `content` is text or text parts) and
//! `instructions` are read, and a `response` object with one assistant `message` output is
//! rendered, with `usage` in the Responses API's `input_tokens` / `output_tokens` dialect.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::api::{content_text, parse, quote, render, tokens, DEFAULT_MODEL};

#[derive(Deserialize)]
struct ResponseRequest {
    #[serde(default)]
    model: Option<String>,
    input: Option<Value>,
    #[serde(default)]
    instructions: Option<String>,
}

#[derive(Serialize)]
struct ResponseObject<'a> {
    id: String,
    object: &'static str,
    created_at: u64,
    status: &'static str,
    error: Option<()>,
    incomplete_details: Option<()>,
    instructions: Option<&'a str>,
    model: &'a str,
    output: [OutputMessage<'a>; 1],
    usage: ResponseUsage,
}

#[derive(Serialize)]
struct OutputMessage<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: String,
    status: &'static str,
    role: &'static str,
    content: [OutputText<'a>; 1],
}

#[derive(Serialize)]
struct OutputText<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
    annotations: [(); 0],
}

#[derive(Serialize)]
struct ResponseUsage {
    input_tokens: u64,
    input_tokens_details: CachedTokens,
    output_tokens: u64,
    output_tokens_details: ReasoningTokens,
    total_tokens: u64,
}

#[derive(Serialize)]
struct CachedTokens {
    cached_tokens: u64,
}

#[derive(Serialize)]
struct ReasoningTokens {
    reasoning_tokens: u64,
}

/// The texts of a Responses `input`: the string itself, or each item's `content` (an item
/// without `content` counts as its JSON, so function outputs and the like still weigh).
fn input_texts(input: &Value) -> Result<Vec<String>, String> {
    match input {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) if !items.is_empty() => {
            Ok(items.iter().map(|item| item.get("content").map_or_else(|| item.to_string(), content_text)).collect())
        }
        Value::Array(_) => Err("`input` must not be empty".to_owned()),
        _ => Err("`input` must be a string or a list of input items".to_owned()),
    }
}

/// Renders the `response` object for the raw request `body` (request number `n`, `created`
/// in Unix seconds), or says why the request is invalid.
pub fn response(body: &[u8], n: u64, created: u64) -> Result<Vec<u8>, String> {
    let req: ResponseRequest = parse(body)?;
    let input = req.input.ok_or("missing required field `input`")?;
    let texts = input_texts(&input)?;
    let prompt_chars: usize = texts.iter().chain(&req.instructions).map(|t| t.chars().count()).sum();
    let text = format!("mock reply to: {}", quote(texts.last().map_or("", String::as_str)));
    let (input_tokens, output_tokens) = (tokens(prompt_chars), tokens(text.chars().count()));
    Ok(render(&ResponseObject {
        id: format!("resp_{n}"),
        object: "response",
        created_at: created,
        status: "completed",
        error: None,
        incomplete_details: None,
        instructions: req.instructions.as_deref(),
        model: req.model.as_deref().unwrap_or(DEFAULT_MODEL),
        output: [OutputMessage {
            kind: "message",
            id: format!("msg_{n}"),
            status: "completed",
            role: "assistant",
            content: [OutputText { kind: "output_text", text: &text, annotations: [] }],
        }],
        usage: ResponseUsage {
            input_tokens,
            input_tokens_details: CachedTokens { cached_tokens: 0 },
            output_tokens,
            output_tokens_details: ReasoningTokens { reasoning_tokens: 0 },
            total_tokens: input_tokens + output_tokens,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn a_string_input_gets_one_assistant_message() {
        let v = json(&response(br#"{"model":"gpt-r","input":"hello there"}"#, 5, 1000).unwrap());
        assert_eq!(v["id"], "resp_5");
        assert_eq!(v["object"], "response");
        assert_eq!(v["created_at"], 1000);
        assert_eq!(v["status"], "completed");
        assert_eq!(v["model"], "gpt-r");
        assert_eq!(v["output"][0]["type"], "message");
        assert_eq!(v["output"][0]["role"], "assistant");
        assert_eq!(v["output"][0]["content"][0]["type"], "output_text");
        assert_eq!(v["output"][0]["content"][0]["text"], "mock reply to: hello there");
        assert_eq!(v["output"][0]["content"][0]["annotations"], serde_json::json!([]));
        // 11 chars -> 3 tokens; the reply's 26 chars -> 7.
        assert_eq!((v["usage"]["input_tokens"].as_u64(), v["usage"]["output_tokens"].as_u64()), (Some(3), Some(7)));
        assert_eq!(v["usage"]["total_tokens"], 10);
    }

    #[test]
    fn input_items_and_instructions_count() {
        let body = br#"{"instructions":"abcd","input":[
            {"role":"user","content":"first"},
            {"role":"user","content":[{"type":"input_text","text":"last one"}]}
        ]}"#;
        let v = json(&response(body, 1, 0).unwrap());
        assert_eq!(v["model"], DEFAULT_MODEL);
        assert_eq!(v["instructions"], "abcd");
        assert_eq!(v["output"][0]["content"][0]["text"], "mock reply to: last one");
        assert_eq!(v["usage"]["input_tokens"], 5); // 5 + 8 + 4 = 17 chars
    }

    #[test]
    fn invalid_requests_say_why() {
        assert!(response(br#"{"model":"m"}"#, 1, 0).unwrap_err().contains("input"));
        assert!(response(br#"{"input":[]}"#, 1, 0).unwrap_err().contains("empty"));
        assert!(response(br#"{"input":5}"#, 1, 0).unwrap_err().contains("string or a list"));
        assert!(response(b"nope", 1, 0).is_err());
    }
}
