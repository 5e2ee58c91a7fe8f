//! Gemini (Google's Generative Language API, `kind = "gemini"`): the translation between the
//! fleet's OpenAI-format lines and Gemini's own calls, both ways. Pure functions, no I/O.
//!
//! The user's file stays in the OpenAI Batch format. The producer runs every line through
//! [`translate_request`] at submit, so a line that cannot be translated is refused there
//! with its line number; the worker runs it again right before the call (the queue is not
//! trusted) and turns the answer back into an OpenAI body with [`translate_response`], so
//! the output file holds `chat.completion` / embedding-list bodies with an OpenAI `usage`.
//!
//! | OpenAI (`/v1/chat/completions`)            | Gemini (`models/{model}:generateContent`)       |
//! |--------------------------------------------|-------------------------------------------------|
//! | `model` (`models/` prefix optional)        | the `{model}` of the path                       |
//! | leading `system` / `developer` messages    | `systemInstruction.parts[].text`                |
//! | `user` / `assistant` messages              | `contents[]` with role `user` / `model`         |
//! | content: a string, or `text` parts         | `parts[].text`                                  |
//! | `image_url` part with a `data:` URL        | `parts[].inlineData {mimeType, data}`           |
//! | `max_tokens`, `max_completion_tokens`      | `generationConfig.maxOutputTokens`              |
//! | `temperature`, `top_p`, `n`, `seed`        | `temperature`, `topP`, `candidateCount`, `seed` |
//! | `stop` (string or list)                    | `generationConfig.stopSequences`                |
//! | `presence_penalty`, `frequency_penalty`    | `presencePenalty`, `frequencyPenalty`           |
//! | `response_format` `json_object`            | `responseMimeType: "application/json"`          |
//! | `response_format` `json_schema`            | the same plus `responseJsonSchema`              |
//! | `user`, `metadata`, `store`, `stream: false`| dropped (they change nothing in the answer)    |
//!
//! Refused at submit (with the line number and the reason): tools and function calls
//! (`tools`, `tool_choice`, `functions`, `function_call`, `tool` / `function` messages,
//! `tool_calls`), `logprobs` / `top_logprobs`, `logit_bias`, `reasoning_effort`, audio and
//! `modalities`, `image_url` parts that are not `data:` URLs (Gemini does not fetch URLs),
//! a system message after the conversation started, a message with no content, and any
//! key not in the table.
//!
//! `/v1/embeddings`: a string `input` becomes `models/{model}:embedContent`, a list of
//! strings `:batchEmbedContents` (one request each, answers in order); `dimensions` is
//! `outputDimensionality`; token-array inputs and `encoding_format` other than `float` are
//! refused.
//!
//! The answer: each candidate becomes a choice (its text parts joined, thought parts left
//! out; `finishReason` STOP → `stop`, MAX_TOKENS → `length`, the safety reasons →
//! `content_filter`); a prompt blocked outright is one choice with no content and
//! `content_filter`. `usageMetadata` becomes `usage`: `prompt_tokens` = promptTokenCount
//! (+ toolUsePromptTokenCount), `completion_tokens` = candidatesTokenCount +
//! thoughtsTokenCount (Gemini bills thoughts as output, as OpenAI counts reasoning),
//! `prompt_tokens_details.cached_tokens` = cachedContentTokenCount.

use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::endpoint::Endpoint;

/// The `base_url` of Google's Gemini Developer API (`base_url` is required for every kind:
/// this is the value to write for Gemini itself; a gateway or the mock has its own).
pub const DEFAULT_BASE_URL: &str = "https://generativelanguage.googleapis.com";

/// The header the key goes in (Google's API-key header; the key never goes in the URL).
pub const KEY_HEADER: &str = "x-goog-api-key";

/// The API version the calls go to: the batch API and `responseJsonSchema` exist only there.
pub const API_PREFIX: &str = "/v1beta";

/// The key-only probe: the model list, which names no model and costs nothing.
pub const MODELS_PATH: &str = "/v1beta/models";

/// Longest model name accepted (Gemini's are far shorter).
const MAX_MODEL_BYTES: usize = 128;

/// At most this much of a user's key or value is quoted in an error.
const MAX_QUOTED: usize = 40;

/// The Gemini method a line is sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `models/{model}:generateContent` (chat completions).
    GenerateContent,
    /// `models/{model}:embedContent` (one string to embed).
    EmbedContent,
    /// `models/{model}:batchEmbedContents` (a list of strings).
    BatchEmbedContents,
}

impl Method {
    /// The part of the path after the model's `:`.
    pub fn action(self) -> &'static str {
        match self {
            Method::GenerateContent => "generateContent",
            Method::EmbedContent => "embedContent",
            Method::BatchEmbedContents => "batchEmbedContents",
        }
    }
}

/// One OpenAI-format line as a Gemini call.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The model, without the `models/` prefix; only `[A-Za-z0-9._-]`, so it is safe in a
    /// path as it is.
    pub model: String,
    /// Which method the body is for.
    pub method: Method,
    /// The Gemini request body.
    pub body: Value,
}

impl Request {
    /// The path of the call under `base_url` (`/v1beta/models/{model}:{action}`).
    pub fn path(&self) -> String {
        format!("{API_PREFIX}/models/{}:{}", self.model, self.method.action())
    }
}

/// Translates the body of an OpenAI-format line for `endpoint` into a Gemini call, or says
/// in one sentence why it cannot be (the producer prefixes the line number).
pub fn translate_request(endpoint: Endpoint, body: &str) -> Result<Request, String> {
    let value: Value = serde_json::from_str(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let Value::Object(body) = value else { return Err("body must be a JSON object".into()) };
    match endpoint {
        Endpoint::ChatCompletions => chat_request(&body),
        Endpoint::Embeddings => embeddings_request(&body),
        other => Err(format!("url {:?} has no Gemini translation", other.path())),
    }
}

/// Keys of a chat body that are translated or dropped; anything else is refused.
const CHAT_KEYS: [&str; 16] = [
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "response_format",
    "user",
    "metadata",
    "store",
    "stream",
];

/// OpenAI sampling keys and their `generationConfig` names (numbers passed as they are).
const GENERATION_KEYS: [(&str, &str); 7] = [
    ("temperature", "temperature"),
    ("top_p", "topP"),
    ("n", "candidateCount"),
    ("seed", "seed"),
    ("presence_penalty", "presencePenalty"),
    ("frequency_penalty", "frequencyPenalty"),
    ("max_tokens", "maxOutputTokens"),
];

fn chat_request(body: &Map<String, Value>) -> Result<Request, String> {
    let model = model_of(body)?;
    if let Some(key) = body.keys().find(|k| !CHAT_KEYS.contains(&k.as_str())) {
        return Err(refused_key(key));
    }
    if body.get("stream").is_some_and(|s| s != &Value::Bool(false)) {
        return Err("\"stream\" cannot be used in a batch".into());
    }
    let messages = match body.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => m,
        _ => return Err("\"messages\" must be a non-empty list".into()),
    };
    let mut system: Vec<Value> = Vec::new();
    let mut contents: Vec<Value> = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        let role = message.get("role").and_then(Value::as_str).unwrap_or_default();
        if message.get("tool_calls").is_some() || message.get("function_call").is_some() {
            return Err(format!("messages[{i}]: tool calls cannot be translated to Gemini"));
        }
        let parts = parts_of(message.get("content"), i)?;
        match role {
            "system" | "developer" if contents.is_empty() => system.extend(parts),
            "system" | "developer" => {
                return Err(format!(
                    "messages[{i}]: a {role} message after the conversation started cannot be translated to Gemini \
                     (its system instruction comes first)"
                ))
            }
            "user" => contents.push(json!({"role": "user", "parts": parts})),
            "assistant" => contents.push(json!({"role": "model", "parts": parts})),
            other => {
                return Err(format!("messages[{i}]: role {:?} cannot be translated to Gemini", quoted(other)));
            }
        }
    }
    if contents.is_empty() {
        return Err("\"messages\" holds no user or assistant message".into());
    }
    let mut config = Map::new();
    for (openai, gemini) in GENERATION_KEYS {
        if let Some(v) = body.get(openai).filter(|v| !v.is_null()) {
            if !v.is_number() {
                return Err(format!("\"{openai}\" must be a number"));
            }
            config.insert(gemini.into(), v.clone());
        }
    }
    if let Some(v) = body.get("max_completion_tokens").filter(|v| !v.is_null()) {
        if !v.is_number() {
            return Err("\"max_completion_tokens\" must be a number".into());
        }
        config.insert("maxOutputTokens".into(), v.clone());
    }
    match body.get("stop") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            config.insert("stopSequences".into(), json!([s]));
        }
        Some(Value::Array(list)) if list.iter().all(Value::is_string) => {
            config.insert("stopSequences".into(), Value::Array(list.clone()));
        }
        Some(_) => return Err("\"stop\" must be a string or a list of strings".into()),
    }
    response_format(body.get("response_format"), &mut config)?;
    let mut out = Map::new();
    out.insert("contents".into(), Value::Array(contents));
    if !system.is_empty() {
        out.insert("systemInstruction".into(), json!({ "parts": system }));
    }
    if !config.is_empty() {
        out.insert("generationConfig".into(), Value::Object(config));
    }
    Ok(Request { model, method: Method::GenerateContent, body: Value::Object(out) })
}

/// `response_format` into `generationConfig`.
fn response_format(format: Option<&Value>, config: &mut Map<String, Value>) -> Result<(), String> {
    let Some(format) = format.filter(|f| !f.is_null()) else { return Ok(()) };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(()),
        Some("json_object") => {
            config.insert("responseMimeType".into(), "application/json".into());
            Ok(())
        }
        Some("json_schema") => {
            let schema = format
                .get("json_schema")
                .and_then(|s| s.get("schema"))
                .filter(|s| s.is_object())
                .ok_or("\"response_format\" of type json_schema needs json_schema.schema (an object)")?;
            config.insert("responseMimeType".into(), "application/json".into());
            config.insert("responseJsonSchema".into(), schema.clone());
            Ok(())
        }
        _ => Err("\"response_format\" must be of type text, json_object or json_schema".into()),
    }
}

/// The Gemini parts of a message's `content`.
fn parts_of(content: Option<&Value>, i: usize) -> Result<Vec<Value>, String> {
    match content {
        Some(Value::String(s)) => Ok(vec![json!({ "text": s })]),
        Some(Value::Array(parts)) if !parts.is_empty() => parts
            .iter()
            .enumerate()
            .map(|(j, p)| part(p).map_err(|e| format!("messages[{i}].content[{j}]: {e}")))
            .collect(),
        _ => Err(format!("messages[{i}]: content must be a string or a non-empty list of parts")),
    }
}

/// One OpenAI content part as a Gemini part.
fn part(p: &Value) -> Result<Value, String> {
    match p.get("type").and_then(Value::as_str) {
        Some("text") => match p.get("text") {
            Some(Value::String(t)) => Ok(json!({ "text": t })),
            _ => Err("a text part needs \"text\" (a string)".into()),
        },
        Some("image_url") => {
            let url = p.get("image_url").and_then(|i| i.get("url")).and_then(Value::as_str).unwrap_or_default();
            let (mime, data) = url
                .strip_prefix("data:")
                .and_then(|rest| rest.split_once(";base64,"))
                .filter(|(mime, data)| !mime.is_empty() && !data.is_empty())
                .ok_or("an image must be a data: URL (data:<type>;base64,...): Gemini does not fetch URLs")?;
            Ok(json!({ "inlineData": { "mimeType": mime, "data": data } }))
        }
        Some(other) => Err(format!("a {:?} part cannot be translated to Gemini", quoted(other))),
        None => Err("a content part needs a \"type\"".into()),
    }
}

/// Keys of an embeddings body that are translated or dropped.
const EMBEDDING_KEYS: [&str; 5] = ["model", "input", "dimensions", "encoding_format", "user"];

fn embeddings_request(body: &Map<String, Value>) -> Result<Request, String> {
    let model = model_of(body)?;
    if let Some(key) = body.keys().find(|k| !EMBEDDING_KEYS.contains(&k.as_str())) {
        return Err(refused_key(key));
    }
    match body.get("encoding_format") {
        None | Some(Value::Null) => {}
        Some(Value::String(f)) if f == "float" => {}
        Some(_) => return Err("\"encoding_format\" must be \"float\" for Gemini".into()),
    }
    let dimensions = match body.get("dimensions") {
        None | Some(Value::Null) => None,
        Some(d) if d.as_u64().is_some_and(|d| d > 0) => Some(d.clone()),
        Some(_) => return Err("\"dimensions\" must be a positive whole number".into()),
    };
    let one = |text: &str| {
        let mut r = json!({ "model": format!("models/{model}"), "content": { "parts": [{ "text": text }] } });
        if let Some(d) = &dimensions {
            r["outputDimensionality"] = d.clone();
        }
        r
    };
    let (method, body) = match body.get("input") {
        Some(Value::String(s)) => (Method::EmbedContent, one(s)),
        Some(Value::Array(list)) if !list.is_empty() && list.iter().all(Value::is_string) => {
            let requests: Vec<Value> = list.iter().filter_map(Value::as_str).map(one).collect();
            (Method::BatchEmbedContents, json!({ "requests": requests }))
        }
        _ => {
            return Err(
                "\"input\" must be a string or a non-empty list of strings (token arrays cannot be sent to Gemini)"
                    .into(),
            )
        }
    };
    Ok(Request { model, method, body })
}

/// The line's `model`, checked to be a plain Gemini model name.
fn model_of(body: &Map<String, Value>) -> Result<String, String> {
    let model = body.get("model").and_then(Value::as_str).ok_or("\"model\" (a string) is required")?;
    let model = model.strip_prefix("models/").unwrap_or(model);
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
    if model.is_empty() || model.len() > MAX_MODEL_BYTES || !model.chars().all(plain) {
        return Err(format!("model {:?} is not a Gemini model name (letters, digits, '.', '-', '_')", quoted(model)));
    }
    Ok(model.to_string())
}

fn refused_key(key: &str) -> String {
    format!("\"{}\" cannot be translated to Gemini (see the table in docs/providers.md#gemini)", quoted(key))
}

/// At most [`MAX_QUOTED`] characters of a user's string.
fn quoted(s: &str) -> &str {
    s.char_indices().nth(MAX_QUOTED).map_or(s, |(i, _)| &s[..i])
}

/// Largest token count read from one answer (as `fleet::usage` bounds them).
const MAX_TOKENS: u64 = crate::usage::MAX_TOKENS_PER_ANSWER;

/// Translates a Gemini success body for `request` into the OpenAI body its line asked for
/// (`chat.completion`, or an embedding list). `created` (Unix seconds) and `fallback_id`
/// (used when the answer has no `responseId`) come from the caller, so this stays pure.
/// `Err` when the body is not a Gemini answer of that method.
pub fn translate_response(request: &Request, body: &str, created: u64, fallback_id: &str) -> Result<Value, String> {
    let value: Value = serde_json::from_str(body).map_err(|e| format!("body is not JSON: {e}"))?;
    if !value.is_object() {
        return Err("the answer is not a JSON object".into());
    }
    match request.method {
        Method::GenerateContent => Ok(chat_response(&value, &request.model, created, fallback_id)),
        Method::EmbedContent | Method::BatchEmbedContents => embeddings_response(&value, request),
    }
}

fn chat_response(v: &Value, model: &str, created: u64, fallback_id: &str) -> Value {
    let mut choices: Vec<Value> = Vec::new();
    if let Some(candidates) = v.get("candidates").and_then(Value::as_array) {
        for (i, c) in candidates.iter().enumerate() {
            let parts = c.get("content").and_then(|c| c.get("parts")).and_then(Value::as_array);
            let text: Option<String> = parts.map(|parts| {
                parts
                    .iter()
                    .filter(|p| p.get("thought") != Some(&Value::Bool(true)))
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect()
            });
            let index = c.get("index").and_then(Value::as_u64).unwrap_or(i as u64);
            let reason = finish_reason(c.get("finishReason").and_then(Value::as_str));
            choices.push(json!({
                "index": index,
                "message": { "role": "assistant", "content": text, "refusal": null },
                "logprobs": null,
                "finish_reason": reason,
            }));
        }
    }
    if choices.is_empty() {
        // No candidate: the prompt itself was blocked (`promptFeedback.blockReason`).
        choices.push(json!({
            "index": 0,
            "message": { "role": "assistant", "content": null, "refusal": null },
            "logprobs": null,
            "finish_reason": "content_filter",
        }));
    }
    let id = bounded_str(v.get("responseId")).unwrap_or(fallback_id);
    let model = bounded_str(v.get("modelVersion")).unwrap_or(model);
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": chat_usage(v.get("usageMetadata")),
    })
}

/// A string field of an answer, if it is one of a sane length.
fn bounded_str(v: Option<&Value>) -> Option<&str> {
    v.and_then(Value::as_str).filter(|s| !s.is_empty() && s.len() <= MAX_MODEL_BYTES)
}

/// Gemini's `finishReason` as OpenAI's `finish_reason`.
fn finish_reason(reason: Option<&str>) -> &'static str {
    match reason {
        Some("MAX_TOKENS") => "length",
        Some("SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" | "LANGUAGE") => {
            "content_filter"
        }
        _ => "stop",
    }
}

/// A count of `usageMetadata`, bounded.
fn count(meta: Option<&Value>, key: &str) -> u64 {
    meta.and_then(|m| m.get(key)).and_then(Value::as_u64).unwrap_or(0).min(MAX_TOKENS)
}

/// `usageMetadata` as an OpenAI chat `usage` (see the module header).
fn chat_usage(meta: Option<&Value>) -> Value {
    let prompt = count(meta, "promptTokenCount") + count(meta, "toolUsePromptTokenCount");
    let thoughts = count(meta, "thoughtsTokenCount");
    let completion = count(meta, "candidatesTokenCount") + thoughts;
    let cached = count(meta, "cachedContentTokenCount").min(prompt);
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": { "cached_tokens": cached },
        "completion_tokens_details": { "reasoning_tokens": thoughts },
    })
}

fn embeddings_response(v: &Value, request: &Request) -> Result<Value, String> {
    let values = |e: &Value| -> Result<Value, String> {
        match e.get("values") {
            Some(Value::Array(list)) if list.iter().all(Value::is_number) => Ok(Value::Array(list.clone())),
            _ => Err("an embedding has no \"values\" list of numbers".into()),
        }
    };
    let embeddings: Vec<Value> = match request.method {
        Method::EmbedContent => vec![values(v.get("embedding").ok_or("the answer has no \"embedding\"")?)?],
        _ => v
            .get("embeddings")
            .and_then(Value::as_array)
            .ok_or("the answer has no \"embeddings\" list")?
            .iter()
            .map(values)
            .collect::<Result<_, _>>()?,
    };
    let wanted = request.body.get("requests").and_then(Value::as_array).map_or(1, Vec::len);
    if embeddings.len() != wanted {
        return Err(format!("the answer has {} embeddings for {wanted} inputs", embeddings.len()));
    }
    let data: Vec<Value> = embeddings
        .into_iter()
        .enumerate()
        .map(|(index, embedding)| json!({ "object": "embedding", "index": index, "embedding": embedding }))
        .collect();
    let prompt = count(v.get("usageMetadata"), "promptTokenCount");
    Ok(json!({
        "object": "list",
        "data": data,
        "model": request.model,
        "usage": { "prompt_tokens": prompt, "total_tokens": prompt },
    }))
}

/// An OpenAI answer body as Gemini would have answered it, for `wait --output-format gemini`
/// (the reverse of [`translate_response`]): a `chat.completion` becomes a
/// `GenerateContentResponse` (choices → `candidates`, `finish_reason` → `finishReason`,
/// `usage` → `usageMetadata`, `model` → `modelVersion`, `id` → `responseId`); an embedding
/// list becomes `{"embedding"}` (one) or `{"embeddings"}`. `None` for any other body (it is
/// then written as it came).
pub fn to_gemini_answer(body: &Value) -> Option<Value> {
    match body.get("object").and_then(Value::as_str)? {
        "chat.completion" => {
            let candidates: Vec<Value> = body
                .get("choices")
                .and_then(Value::as_array)?
                .iter()
                .map(|c| {
                    let text = c["message"]["content"].as_str();
                    let parts: Vec<Value> = text.map(|t| json!({ "text": t })).into_iter().collect();
                    let reason = match c["finish_reason"].as_str() {
                        Some("stop") => "STOP",
                        Some("length") => "MAX_TOKENS",
                        Some("content_filter") => "SAFETY",
                        _ => "OTHER",
                    };
                    json!({
                        "content": { "role": "model", "parts": parts },
                        "finishReason": reason,
                        "index": c.get("index").cloned().unwrap_or(json!(0)),
                    })
                })
                .collect();
            let usage = body.get("usage");
            let n = |v: Option<&Value>| v.and_then(Value::as_u64).unwrap_or(0).min(MAX_TOKENS);
            let prompt = n(usage.and_then(|u| u.get("prompt_tokens")));
            let completion = n(usage.and_then(|u| u.get("completion_tokens")));
            let thoughts =
                n(usage.and_then(|u| u.get("completion_tokens_details")).and_then(|d| d.get("reasoning_tokens")))
                    .min(completion);
            let cached =
                n(usage.and_then(|u| u.get("prompt_tokens_details")).and_then(|d| d.get("cached_tokens"))).min(prompt);
            let mut meta = json!({
                "promptTokenCount": prompt,
                "candidatesTokenCount": completion - thoughts,
                "totalTokenCount": prompt + completion,
            });
            if thoughts > 0 {
                meta["thoughtsTokenCount"] = json!(thoughts);
            }
            if cached > 0 {
                meta["cachedContentTokenCount"] = json!(cached);
            }
            let mut answer = json!({ "candidates": candidates, "usageMetadata": meta });
            if let Some(model) = bounded_str(body.get("model")) {
                answer["modelVersion"] = json!(model);
            }
            if let Some(id) = bounded_str(body.get("id")) {
                answer["responseId"] = json!(id);
            }
            Some(answer)
        }
        "list" => {
            let values: Vec<Value> = body
                .get("data")
                .and_then(Value::as_array)?
                .iter()
                .map(|d| json!({ "values": d["embedding"] }))
                .collect();
            Some(match values.as_slice() {
                [one] => json!({ "embedding": one }),
                _ => json!({ "embeddings": values }),
            })
        }
        _ => None,
    }
}

/// The wait a Gemini error body asks for: `error.details[]` of type `google.rpc.RetryInfo`,
/// whose `retryDelay` is a protobuf duration (`"2s"`, `"0.5s"`). Not bounded here: the
/// caller caps it to its retry budget. `None` when the body says nothing usable.
pub fn retry_delay(body: &str) -> Option<Duration> {
    let v: Value = serde_json::from_str(body).ok()?;
    let details = v.get("error")?.get("details")?.as_array()?;
    details
        .iter()
        .filter(|d| d.get("@type").and_then(Value::as_str).is_some_and(|t| t.ends_with("google.rpc.RetryInfo")))
        .find_map(|d| d.get("retryDelay").and_then(Value::as_str).and_then(proto_duration))
}

/// A protobuf JSON duration (`"<seconds>s"`, fractions allowed); `None` when it is not one,
/// is negative or absurd.
fn proto_duration(s: &str) -> Option<Duration> {
    let secs: f64 = s.trim().strip_suffix('s')?.parse().ok()?;
    // Bounded before converting: `Duration::from_secs_f64` panics on overflow or NaN.
    (secs.is_finite() && (0.0..1e9).contains(&secs)).then(|| Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: Value) -> Result<Request, String> {
        translate_request(Endpoint::ChatCompletions, &body.to_string())
    }

    #[test]
    fn a_chat_line_becomes_contents_system_instruction_and_generation_config() {
        let r = chat(json!({
            "model": "gemini-2.0-flash",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Again", "name": "ann"}
            ],
            "max_completion_tokens": 50, "temperature": 0.2, "top_p": 0.9, "n": 2, "seed": 7,
            "stop": "END", "presence_penalty": 0.1, "frequency_penalty": 0.3,
            "response_format": {"type": "json_object"}, "user": "u1", "metadata": {"a": "b"}, "stream": false
        }))
        .unwrap();
        assert_eq!(r.model, "gemini-2.0-flash");
        assert_eq!(r.method, Method::GenerateContent);
        assert_eq!(r.path(), "/v1beta/models/gemini-2.0-flash:generateContent");
        assert_eq!(
            r.body,
            json!({
                "contents": [
                    {"role": "user", "parts": [{"text": "Hi"}, {"inlineData": {"mimeType": "image/png", "data": "AAAA"}}]},
                    {"role": "model", "parts": [{"text": "Hello"}]},
                    {"role": "user", "parts": [{"text": "Again"}]}
                ],
                "systemInstruction": {"parts": [{"text": "Be brief."}]},
                "generationConfig": {
                    "maxOutputTokens": 50, "temperature": 0.2, "topP": 0.9, "candidateCount": 2, "seed": 7,
                    "stopSequences": ["END"], "presencePenalty": 0.1, "frequencyPenalty": 0.3,
                    "responseMimeType": "application/json"
                }
            })
        );
        let r = chat(json!({"model": "models/gemini-2.5-pro", "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}}}))
        .unwrap();
        assert_eq!(r.model, "gemini-2.5-pro");
        assert_eq!(r.body["generationConfig"]["responseJsonSchema"], json!({"type": "object"}));
        assert_eq!(r.body.get("systemInstruction"), None);
    }

    #[test]
    fn what_cannot_be_translated_is_refused_with_the_reason() {
        let user = json!([{"role": "user", "content": "x"}]);
        for (body, want) in [
            (json!({"messages": user}), "\"model\""),
            (json!({"model": "../admin", "messages": user}), "not a Gemini model name"),
            (json!({"model": "m?key=1", "messages": user}), "not a Gemini model name"),
            (json!({"model": "m", "messages": []}), "non-empty list"),
            (json!({"model": "m", "messages": user, "tools": []}), "\"tools\" cannot be translated"),
            (json!({"model": "m", "messages": user, "logprobs": true}), "\"logprobs\" cannot be translated"),
            (json!({"model": "m", "messages": user, "stream": true}), "stream"),
            (json!({"model": "m", "messages": user, "temperature": "hot"}), "must be a number"),
            (json!({"model": "m", "messages": user, "stop": 3}), "\"stop\""),
            (json!({"model": "m", "messages": user, "response_format": {"type": "xml"}}), "response_format"),
            (
                json!({"model": "m", "messages": [{"role": "tool", "content": "r", "tool_call_id": "1"}]}),
                "role \"tool\"",
            ),
            (
                json!({"model": "m", "messages": [{"role": "assistant", "content": null, "tool_calls": []}]}),
                "tool calls",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}),
                "after the conversation started",
            ),
            (json!({"model": "m", "messages": [{"role": "system", "content": "only"}]}), "no user or assistant"),
            (json!({"model": "m", "messages": [{"role": "user"}]}), "content must be"),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url",
                    "image_url": {"url": "https://example.com/cat.png"}}]}]}),
                "data: URL",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}),
                "messages[0].content[0]: a \"input_audio\" part",
            ),
        ] {
            let err = chat(body.clone()).unwrap_err();
            assert!(err.contains(want), "{body}: {err}");
        }
        assert!(translate_request(Endpoint::Completions, "{}").unwrap_err().contains("no Gemini translation"));
        assert!(translate_request(Endpoint::ChatCompletions, "[1]").unwrap_err().contains("object"));
        // A hostile key is quoted, but not whole.
        let long = "k".repeat(10_000);
        let err = chat(json!({"model": "m", "messages": user, long: 1})).unwrap_err();
        assert!(err.len() < 200, "{}", err.len());
    }

    #[test]
    fn embeddings_go_to_embed_content_or_batch_embed_contents() {
        let r =
            translate_request(Endpoint::Embeddings, r#"{"model":"text-embedding-004","input":"hello","dimensions":8}"#)
                .unwrap();
        assert_eq!(r.path(), "/v1beta/models/text-embedding-004:embedContent");
        assert_eq!(
            r.body,
            json!({"model": "models/text-embedding-004", "content": {"parts": [{"text": "hello"}]}, "outputDimensionality": 8})
        );
        let r = translate_request(Endpoint::Embeddings, r#"{"model":"e","input":["a","b"]}"#).unwrap();
        assert_eq!(r.method, Method::BatchEmbedContents);
        assert_eq!(r.body["requests"][1], json!({"model": "models/e", "content": {"parts": [{"text": "b"}]}}));
        for (body, want) in [
            (r#"{"model":"e","input":[1,2,3]}"#, "token arrays"),
            (r#"{"model":"e","input":"a","encoding_format":"base64"}"#, "float"),
            (r#"{"model":"e","input":"a","dimensions":-1}"#, "dimensions"),
            (r#"{"model":"e","input":"a","extra":1}"#, "\"extra\""),
        ] {
            let err = translate_request(Endpoint::Embeddings, body).unwrap_err();
            assert!(err.contains(want), "{body}: {err}");
        }
        // The answers, in order, with the usage Gemini reports (when it does).
        let one = translate_response(
            &translate_request(Endpoint::Embeddings, r#"{"model":"e","input":"a"}"#).unwrap(),
            r#"{"embedding":{"values":[0.5,1]}}"#,
            0,
            "x",
        )
        .unwrap();
        assert_eq!(one["data"], json!([{"object": "embedding", "index": 0, "embedding": [0.5, 1]}]));
        assert_eq!(one["usage"], json!({"prompt_tokens": 0, "total_tokens": 0}));
        let both = translate_response(
            &r,
            r#"{"embeddings":[{"values":[1]},{"values":[2]}],"usageMetadata":{"promptTokenCount":4}}"#,
            0,
            "x",
        )
        .unwrap();
        assert_eq!(both["data"][1]["embedding"], json!([2]));
        assert_eq!(both["usage"]["prompt_tokens"], 4);
        assert!(translate_response(&r, r#"{"embeddings":[{"values":[1]}]}"#, 0, "x")
            .unwrap_err()
            .contains("1 embeddings for 2"));
    }

    #[test]
    fn an_answer_becomes_a_chat_completion_with_usage() {
        let req = chat(json!({"model": "gemini-2.0-flash", "messages": [{"role": "user", "content": "x"}]})).unwrap();
        let body = json!({
            "candidates": [
                {"content": {"role": "model", "parts": [{"text": "thinking...", "thought": true}, {"text": "Hel"}, {"text": "lo"}]},
                 "finishReason": "STOP", "index": 0},
                {"content": {"role": "model", "parts": [{"text": "Cut"}]}, "finishReason": "MAX_TOKENS", "index": 1}
            ],
            "usageMetadata": {"promptTokenCount": 100, "candidatesTokenCount": 20, "thoughtsTokenCount": 5,
                              "cachedContentTokenCount": 60, "totalTokenCount": 125},
            "modelVersion": "gemini-2.0-flash-001",
            "responseId": "abc"
        });
        let out = translate_response(&req, &body.to_string(), 1_700_000_000, "fallback").unwrap();
        assert_eq!(out["id"], "abc");
        assert_eq!(out["object"], "chat.completion");
        assert_eq!(out["created"], 1_700_000_000);
        assert_eq!(out["model"], "gemini-2.0-flash-001");
        assert_eq!(out["choices"][0]["message"], json!({"role": "assistant", "content": "Hello", "refusal": null}));
        assert_eq!(out["choices"][0]["finish_reason"], "stop");
        assert_eq!(out["choices"][1]["finish_reason"], "length");
        assert_eq!(
            out["usage"],
            json!({"prompt_tokens": 100, "completion_tokens": 25, "total_tokens": 125,
                   "prompt_tokens_details": {"cached_tokens": 60}, "completion_tokens_details": {"reasoning_tokens": 5}})
        );
        // The fleet's usage parser reads the translated body as any OpenAI answer.
        let usage = crate::usage::parse(&out.to_string()).unwrap();
        assert_eq!((usage.input_tokens, usage.cached_input_tokens, usage.output_tokens), (100, 60, 25));

        let blocked = translate_response(
            &req,
            r#"{"promptFeedback":{"blockReason":"SAFETY"},"usageMetadata":{"promptTokenCount":3}}"#,
            0,
            "fb",
        )
        .unwrap();
        assert_eq!(blocked["id"], "fb");
        assert_eq!(blocked["model"], "gemini-2.0-flash");
        assert_eq!(blocked["choices"][0]["finish_reason"], "content_filter");
        assert_eq!(blocked["choices"][0]["message"]["content"], Value::Null);
        let filtered = translate_response(&req, r#"{"candidates":[{"finishReason":"SAFETY"}]}"#, 0, "fb").unwrap();
        assert_eq!(filtered["choices"][0]["finish_reason"], "content_filter");
    }

    #[test]
    fn hostile_answers_are_refused_or_bounded_and_never_panic() {
        let req = chat(json!({"model": "m", "messages": [{"role": "user", "content": "x"}]})).unwrap();
        for bad in ["", "[]", "null", "<html>", &format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000))] {
            assert!(translate_response(&req, bad, 0, "x").is_err(), "{:.40}", bad);
        }
        let huge = json!({"candidates": "no", "usageMetadata": {"promptTokenCount": u64::MAX, "candidatesTokenCount": -1},
                          "modelVersion": "m".repeat(10_000), "responseId": 5});
        let out = translate_response(&req, &huge.to_string(), 0, "x").unwrap();
        assert_eq!(out["usage"]["prompt_tokens"], MAX_TOKENS);
        assert_eq!(out["usage"]["completion_tokens"], 0);
        assert_eq!((out["model"].as_str(), out["id"].as_str()), (Some("m"), Some("x")));
    }

    #[test]
    fn retry_delay_is_read_from_retry_info() {
        let body = json!({"error": {"code": 429, "message": "Resource has been exhausted", "status": "RESOURCE_EXHAUSTED",
        "details": [
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": []},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "2s"}
        ]}});
        assert_eq!(retry_delay(&body.to_string()), Some(Duration::from_secs(2)));
        let half =
            r#"{"error":{"details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"0.5s"}]}}"#;
        assert_eq!(retry_delay(half), Some(Duration::from_millis(500)));
        for bad in [
            "",
            "{}",
            r#"{"error":{"details":[{"retryDelay":"2s"}]}}"#,
            &half.replace("0.5s", "-1s"),
            &half.replace("0.5s", "1e300s"),
            &half.replace("0.5s", "NaNs"),
            &half.replace("0.5s", "soon"),
        ] {
            assert_eq!(retry_delay(bad), None, "{bad}");
        }
    }

    #[test]
    fn an_openai_answer_goes_back_to_geminis_shape() {
        let request = translate_request(
            Endpoint::ChatCompletions,
            r#"{"model":"gemini-2.0-flash","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .unwrap();
        let gemini = r#"{"candidates":[{"content":{"role":"model","parts":[{"text":"yo"}]},"finishReason":"MAX_TOKENS","index":0}],
            "usageMetadata":{"promptTokenCount":7,"candidatesTokenCount":2,"cachedContentTokenCount":4,"thoughtsTokenCount":3},
            "modelVersion":"gemini-2.0-flash","responseId":"r1"}"#;
        let openai = translate_response(&request, gemini, 0, "x").unwrap();
        let back = to_gemini_answer(&openai).unwrap();
        assert_eq!(back["candidates"][0]["content"]["parts"][0]["text"], "yo");
        assert_eq!(back["candidates"][0]["finishReason"], "MAX_TOKENS");
        assert_eq!(
            (back["modelVersion"].as_str(), back["responseId"].as_str()),
            (Some("gemini-2.0-flash"), Some("r1"))
        );
        let u = &back["usageMetadata"];
        assert_eq!(
            (u["promptTokenCount"].as_u64(), u["candidatesTokenCount"].as_u64(), u["thoughtsTokenCount"].as_u64()),
            (Some(7), Some(2), Some(3))
        );
        assert_eq!((u["cachedContentTokenCount"].as_u64(), u["totalTokenCount"].as_u64()), (Some(4), Some(12)));
        let list = json!({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.5]}]});
        assert_eq!(to_gemini_answer(&list).unwrap(), json!({"embedding": {"values": [0.5]}}));
        assert_eq!(to_gemini_answer(&json!({"type": "message"})), None);
    }
}
