//! Owns the wire shapes: parsing OpenAI / Anthropic request bodies and rendering the success
//! and error bodies each API family expects. Pure functions, no I/O, no state.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The provider endpoints the mock serves: the fleet's own list, so the mock, the producer's
/// validation and the worker's client can never disagree on a path.
pub use fleet::endpoint::Endpoint;

/// Whether answers on `endpoint` follow Anthropic conventions rather than OpenAI's.
pub fn is_anthropic(endpoint: Endpoint) -> bool {
    endpoint.is_served_by(fleet::config::ProviderKind::Anthropic)
}

pub(crate) const DEFAULT_MODEL: &str = "mock-model";

/// The `model` a request body names, if it is JSON and names one.
pub(crate) fn requested_model(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Named {
        model: Option<String>,
    }
    serde_json::from_slice::<Named>(body).ok()?.model
}

/// The `service_tier` a request body asks for (`"flex"`, `"auto"`, ...), if any.
pub(crate) fn requested_service_tier(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Tiered {
        service_tier: Option<String>,
    }
    serde_json::from_slice::<Tiered>(body).ok()?.service_tier
}

/// The answer to a flex request the flex tier has no capacity for: OpenAI's 429 "resource
/// unavailable" (`429`) or Groq's 498 `capacity_exceeded` (`498`). OpenAI documents the
/// status and the words, not the body: the body here has OpenAI's error shape with
/// `resource_unavailable` as its type and code.
pub fn flex_unavailable_body(status: u16) -> Vec<u8> {
    let value = if status == 498 {
        serde_json::json!({"error": {
            "message": "mock-provider: flex tier capacity exceeded, retry later",
            "type": "capacity_exceeded", "code": "capacity_exceeded",
        }})
    } else {
        serde_json::json!({"error": {
            "message": "mock-provider: Resource unavailable: the flex tier has no capacity now, retry later",
            "type": "resource_unavailable", "param": null, "code": "resource_unavailable",
        }})
    };
    render(&value)
}

/// How much of the prompt the canned reply quotes.
const QUOTE_CHARS: usize = 40;
/// Dimension of the fake embeddings.
const EMBEDDING_DIM: usize = 8;

/// Renders the success body for `endpoint` from the raw request `body`, or explains in one
/// sentence why the request is invalid (to be answered 400).
///
/// `n` is the request number, used in the response `id`; `created` is Unix seconds.
pub fn success_body(endpoint: Endpoint, body: &[u8], n: u64, created: u64) -> Result<Vec<u8>, String> {
    let json = match endpoint {
        Endpoint::ChatCompletions => chat(body, n, created)?,
        Endpoint::Completions => completion(body, n, created)?,
        Endpoint::Embeddings => embeddings(body)?,
        Endpoint::Messages => messages(body, n)?,
        Endpoint::Responses => crate::responses::response(body, n, created)?,
        Endpoint::Moderations => crate::moderations::moderation(body, n)?,
    };
    Ok(json)
}

/// What a request is charged against `--tpm`, as providers count it on arrival: its prompt
/// tokens (what `usage` will report) plus the most output it asks for. A body the endpoint
/// cannot read is charged by its size (4 bytes a token).
pub fn rate_tokens(endpoint: Endpoint, body: &[u8]) -> u64 {
    let prompt = match endpoint {
        Endpoint::ChatCompletions | Endpoint::Messages => chat_reply(body).ok().map(|r| r.prompt_tokens),
        Endpoint::Completions => parse::<CompletionRequest>(body).ok().and_then(|r| r.prompt).map(|p| inputs(&p).1),
        Endpoint::Embeddings => parse::<EmbeddingRequest>(body).ok().and_then(|r| r.input).map(|i| inputs(&i).1),
        // What the answer's `usage` reports; a moderation reports none, so it goes by size.
        Endpoint::Responses => crate::responses::response(body, 0, 0)
            .ok()
            .and_then(|answer| serde_json::from_slice::<serde_json::Value>(&answer).ok())
            .and_then(|v| v["usage"]["input_tokens"].as_u64()),
        Endpoint::Moderations => None,
    };
    let prompt = prompt.unwrap_or_else(|| fleet::tokens::estimate_prompt_tokens(body));
    prompt.min(fleet::tokens::MAX_REQUEST_TOKENS) + fleet::tokens::requested_output_tokens(body)
}

pub(crate) fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("request body is not valid JSON for this endpoint: {e}"))
}

pub(crate) fn render<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising these plain structs into a Vec cannot fail.
    serde_json::to_vec(value).expect("response bodies serialise")
}

/// Rough token estimate used by OpenAI's own rules of thumb: one token per four characters.
pub(crate) fn tokens(chars: usize) -> u64 {
    chars.div_ceil(4) as u64
}

/// The first [`QUOTE_CHARS`] characters of `s`, cut on a character boundary.
pub(crate) fn quote(s: &str) -> &str {
    s.char_indices().nth(QUOTE_CHARS).map_or(s, |(i, _)| &s[..i])
}

/// The text of a message `content`: either a string or an array of parts whose `text` fields
/// count (both OpenAI and Anthropic allow both forms).
pub(crate) fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => {
            parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join("")
        }
        _ => String::new(),
    }
}

#[derive(Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    messages: Option<Vec<ChatMessage>>,
}

#[derive(Deserialize)]
struct ChatMessage {
    #[serde(default)]
    content: Value,
}

/// Common part of chat-like requests: the model, the reply text, prompt and completion tokens.
struct ChatReply {
    model: String,
    text: String,
    prompt_tokens: u64,
    completion_tokens: u64,
}

fn chat_reply(body: &[u8]) -> Result<ChatReply, String> {
    let req: ChatRequest = parse(body)?;
    let messages = req.messages.ok_or("missing required field `messages`")?;
    let texts: Vec<String> = messages.iter().map(|m| content_text(&m.content)).collect();
    let prompt_chars: usize = texts.iter().map(|t| t.chars().count()).sum();
    let last = texts.last().map_or("", String::as_str);
    let text = format!("mock reply to: {}", quote(last));
    Ok(ChatReply {
        model: req.model.unwrap_or_else(|| DEFAULT_MODEL.to_owned()),
        prompt_tokens: tokens(prompt_chars),
        completion_tokens: tokens(text.chars().count()),
        text,
    })
}

#[derive(Serialize)]
struct OpenAiUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
}

impl OpenAiUsage {
    fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
    }
}

#[derive(Serialize)]
struct ChatCompletion<'a> {
    id: String,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [ChatChoice<'a>; 1],
    usage: OpenAiUsage,
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    index: u32,
    message: AssistantMessage<'a>,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct AssistantMessage<'a> {
    role: &'static str,
    content: &'a str,
}

fn chat(body: &[u8], n: u64, created: u64) -> Result<Vec<u8>, String> {
    let r = chat_reply(body)?;
    Ok(render(&ChatCompletion {
        id: format!("chatcmpl-{n}"),
        object: "chat.completion",
        created,
        model: &r.model,
        choices: [ChatChoice {
            index: 0,
            message: AssistantMessage { role: "assistant", content: &r.text },
            logprobs: None,
            finish_reason: "stop",
        }],
        usage: OpenAiUsage::new(r.prompt_tokens, r.completion_tokens),
    }))
}

#[derive(Serialize)]
struct AnthropicMessage<'a> {
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    content: [TextBlock<'a>; 1],
    model: &'a str,
    stop_reason: &'static str,
    stop_sequence: Option<()>,
    usage: AnthropicUsage,
}

#[derive(Serialize)]
struct TextBlock<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
}

#[derive(Serialize)]
struct AnthropicUsage {
    input_tokens: u64,
    output_tokens: u64,
}

fn messages(body: &[u8], n: u64) -> Result<Vec<u8>, String> {
    let r = chat_reply(body)?;
    Ok(render(&AnthropicMessage {
        id: format!("msg_{n}"),
        kind: "message",
        role: "assistant",
        content: [TextBlock { kind: "text", text: &r.text }],
        model: &r.model,
        stop_reason: "end_turn",
        stop_sequence: None,
        usage: AnthropicUsage { input_tokens: r.prompt_tokens, output_tokens: r.completion_tokens },
    }))
}

#[derive(Deserialize)]
struct CompletionRequest {
    #[serde(default)]
    model: Option<String>,
    prompt: Option<Value>,
}

#[derive(Serialize)]
struct TextCompletion<'a> {
    id: String,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [TextChoice<'a>; 1],
    usage: OpenAiUsage,
}

#[derive(Serialize)]
struct TextChoice<'a> {
    text: &'a str,
    index: u32,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

/// The strings of an OpenAI `prompt` / `input` field and its token estimate. Strings count one
/// token per four characters; pre-tokenised inputs (arrays of integers) count one per element.
fn inputs(value: &Value) -> (Vec<String>, u64) {
    match value {
        Value::String(s) => (vec![s.clone()], tokens(s.chars().count())),
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_number) => {
            (vec![value.to_string()], items.len() as u64)
        }
        Value::Array(items) => items.iter().fold((Vec::new(), 0), |(mut v, t), item| {
            let (mut inner, it) = inputs(item);
            v.append(&mut inner);
            (v, t + it)
        }),
        other => (vec![other.to_string()], tokens(other.to_string().len())),
    }
}

fn completion(body: &[u8], n: u64, created: u64) -> Result<Vec<u8>, String> {
    let req: CompletionRequest = parse(body)?;
    let prompt = req.prompt.ok_or("missing required field `prompt`")?;
    let (texts, prompt_tokens) = inputs(&prompt);
    let text = format!("mock completion of: {}", quote(texts.first().map_or("", String::as_str)));
    Ok(render(&TextCompletion {
        id: format!("cmpl-{n}"),
        object: "text_completion",
        created,
        model: req.model.as_deref().unwrap_or(DEFAULT_MODEL),
        choices: [TextChoice { text: &text, index: 0, logprobs: None, finish_reason: "stop" }],
        usage: OpenAiUsage::new(prompt_tokens, tokens(text.chars().count())),
    }))
}

#[derive(Deserialize)]
struct EmbeddingRequest {
    #[serde(default)]
    model: Option<String>,
    input: Option<Value>,
}

#[derive(Serialize)]
struct EmbeddingList<'a> {
    object: &'static str,
    data: Vec<Embedding>,
    model: &'a str,
    usage: EmbeddingUsage,
}

#[derive(Serialize)]
struct Embedding {
    object: &'static str,
    index: usize,
    embedding: [f32; EMBEDDING_DIM],
}

#[derive(Serialize)]
struct EmbeddingUsage {
    prompt_tokens: u64,
    total_tokens: u64,
}

fn embeddings(body: &[u8]) -> Result<Vec<u8>, String> {
    let req: EmbeddingRequest = parse(body)?;
    let input = req.input.ok_or("missing required field `input`")?;
    let (texts, prompt_tokens) = inputs(&input);
    if texts.is_empty() {
        return Err("`input` must not be empty".to_owned());
    }
    let data = texts
        .iter()
        .enumerate()
        .map(|(index, text)| Embedding { object: "embedding", index, embedding: fake_embedding(text) })
        .collect();
    Ok(render(&EmbeddingList {
        object: "list",
        data,
        model: req.model.as_deref().unwrap_or(DEFAULT_MODEL),
        usage: EmbeddingUsage { prompt_tokens, total_tokens: prompt_tokens },
    }))
}

/// A deterministic unit vector derived from the text (FNV-1a, then SplitMix64 per component):
/// equal inputs embed equally, different inputs almost surely differently.
pub(crate) fn fake_embedding(text: &str) -> [f32; EMBEDDING_DIM] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let mut v = [0f64; EMBEDDING_DIM];
    for x in &mut v {
        h = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = h;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        *x = (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
    }
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(f64::MIN_POSITIVE);
    v.map(|x| (x / norm) as f32)
}

/// The `(input, output)` tokens a success body of ours reports in its `usage` (both
/// dialects), for `/stats`.
pub fn reported_usage(success: &[u8]) -> (u64, u64) {
    let v: Value = serde_json::from_slice(success).unwrap_or(Value::Null);
    let u = &v["usage"];
    let n = |a: &str, b: &str| u[a].as_u64().or_else(|| u[b].as_u64()).unwrap_or(0);
    (n("prompt_tokens", "input_tokens"), n("completion_tokens", "output_tokens"))
}

/// Body of an error answer with `status`, in the shape the endpoint's API family uses.
///
/// OpenAI shapes: 400 `invalid_request_error` (with `param` and `code` null), 429
/// `rate_limit_exceeded`, 500/503 `server_error`. 529 is Anthropic's overload status and always
/// uses the Anthropic `overloaded_error` shape; 429 on `/v1/messages` uses Anthropic's
/// `rate_limit_error` shape.
pub fn error_body(endpoint: Endpoint, status: u16, message: &str) -> Vec<u8> {
    let value = match status {
        529 => anthropic_error("overloaded_error", message),
        429 if is_anthropic(endpoint) => anthropic_error("rate_limit_error", message),
        400 => serde_json::json!({"error": {
            "message": message, "type": "invalid_request_error", "param": null, "code": null,
        }}),
        429 => serde_json::json!({"error": {
            "message": message, "type": "requests", "param": null, "code": "rate_limit_exceeded",
        }}),
        // As the providers answer a key they do not know.
        401 if is_anthropic(endpoint) => anthropic_error("authentication_error", message),
        401 => serde_json::json!({"error": {
            "message": message, "type": "invalid_request_error", "param": null, "code": "invalid_api_key",
        }}),
        // As the providers answer a key that may not use the requested model.
        403 if is_anthropic(endpoint) => anthropic_error("permission_error", message),
        403 => serde_json::json!({"error": {
            "message": message, "type": "invalid_request_error", "param": null, "code": "model_not_found",
        }}),
        _ => serde_json::json!({"error": {"message": message, "type": "server_error"}}),
    };
    render(&value)
}

fn anthropic_error(kind: &str, message: &str) -> Value {
    serde_json::json!({"type": "error", "error": {"type": kind, "message": message}})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn chat_shape_and_token_math() {
        let body = br#"{"model":"gpt-x","messages":[
            {"role":"system","content":"abcd"},
            {"role":"user","content":[{"type":"text","text":"hello"},{"type":"text","text":" world"}]}
        ]}"#;
        let v = json(&success_body(Endpoint::ChatCompletions, body, 7, 1000).unwrap());
        assert_eq!(v["id"], "chatcmpl-7");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["created"], 1000);
        assert_eq!(v["model"], "gpt-x");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(v["choices"][0]["message"]["content"], "mock reply to: hello world");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        // 4 + 11 = 15 chars -> 4 tokens; reply is 26 chars -> 7 tokens.
        assert_eq!(v["usage"]["prompt_tokens"], 4);
        assert_eq!(v["usage"]["completion_tokens"], 7);
        assert_eq!(v["usage"]["total_tokens"], 11);
    }

    #[test]
    fn rate_tokens_are_the_prompt_plus_the_requested_output() {
        // 4 + 11 = 15 chars -> 4 prompt tokens (as `usage` reports), plus max_tokens.
        let body = br#"{"model":"m","max_tokens":100,"messages":[{"role":"user","content":"abcd"},{"role":"user","content":"hello world"}]}"#;
        assert_eq!(rate_tokens(Endpoint::ChatCompletions, body), 104);
        assert_eq!(rate_tokens(Endpoint::Embeddings, br#"{"input":"abcdefgh"}"#), 2);
        assert_eq!(rate_tokens(Endpoint::Completions, br#"{"prompt":"abcd","max_tokens":7}"#), 8);
        assert_eq!(rate_tokens(Endpoint::Messages, b"0123456789ab"), 3, "unreadable: by size");
    }

    #[test]
    fn quote_cuts_on_char_boundary() {
        let long = "é".repeat(50);
        assert_eq!(quote(&long).chars().count(), 40);
        assert_eq!(quote("short"), "short");
    }

    #[test]
    fn messages_shape_defaults_model() {
        let body = br#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#;
        let v = json(&success_body(Endpoint::Messages, body, 3, 0).unwrap());
        assert_eq!(v["id"], "msg_3");
        assert_eq!(v["type"], "message");
        assert_eq!(v["role"], "assistant");
        assert_eq!(v["model"], "mock-model");
        assert_eq!(v["content"][0]["type"], "text");
        assert_eq!(v["content"][0]["text"], "mock reply to: hi");
        assert_eq!(v["stop_reason"], "end_turn");
        assert_eq!(v["usage"]["input_tokens"], 1);
        assert_eq!(v["usage"]["output_tokens"], 5);
    }

    #[test]
    fn completion_and_embeddings() {
        let v = json(&success_body(Endpoint::Completions, br#"{"prompt":"say hi"}"#, 1, 0).unwrap());
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["choices"][0]["text"], "mock completion of: say hi");
        assert_eq!(v["usage"]["prompt_tokens"], 2);

        let v = json(&success_body(Endpoint::Embeddings, br#"{"input":["a","b","a"]}"#, 1, 0).unwrap());
        let data = v["data"].as_array().unwrap();
        assert_eq!(data.len(), 3);
        assert_eq!(data[2]["index"], 2);
        assert_eq!(data[0]["embedding"].as_array().unwrap().len(), 8);
        assert_eq!(data[0]["embedding"], data[2]["embedding"]);
        assert_ne!(data[0]["embedding"], data[1]["embedding"]);
        let norm: f64 = data[1]["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap().powi(2)).sum();
        assert!((norm - 1.0).abs() < 1e-5);

        // A single pre-tokenised input is one embedding, one token per element.
        let v = json(&success_body(Endpoint::Embeddings, br#"{"input":[1,2,3]}"#, 1, 0).unwrap());
        assert_eq!(v["data"].as_array().unwrap().len(), 1);
        assert_eq!(v["usage"]["prompt_tokens"], 3);
    }

    #[test]
    fn invalid_requests() {
        assert!(success_body(Endpoint::ChatCompletions, b"<html>", 1, 0).is_err());
        let err = success_body(Endpoint::ChatCompletions, br#"{"model":"m"}"#, 1, 0).unwrap_err();
        assert!(err.contains("messages"), "{err}");
        assert!(success_body(Endpoint::Messages, br#"{"messages":"nope"}"#, 1, 0).is_err());
        assert!(success_body(Endpoint::Completions, br#"{"messages":[]}"#, 1, 0).unwrap_err().contains("prompt"));
        assert!(success_body(Endpoint::Embeddings, br#"{"prompt":"x"}"#, 1, 0).unwrap_err().contains("input"));
        assert!(success_body(Endpoint::Embeddings, br#"{"input":[]}"#, 1, 0).is_err());
    }

    #[test]
    fn error_shapes() {
        let v = json(&error_body(Endpoint::ChatCompletions, 400, "bad"));
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["message"], "bad");
        assert!(v["error"]["param"].is_null() && v["error"]["code"].is_null());
        let v = json(&error_body(Endpoint::Messages, 400, "bad"));
        assert_eq!(v["error"]["type"], "invalid_request_error");
        let v = json(&error_body(Endpoint::ChatCompletions, 503, "x"));
        assert_eq!(v["error"]["type"], "server_error");
        let v = json(&error_body(Endpoint::Messages, 529, "x"));
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "overloaded_error");
        let v = json(&error_body(Endpoint::Messages, 429, "x"));
        assert_eq!(v["error"]["type"], "rate_limit_error");
        let v = json(&error_body(Endpoint::ChatCompletions, 429, "x"));
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    }
}
