//! The Gemini branch of the provider client (`kind = "gemini"`): where an item's call goes
//! and what its answer becomes. The translation itself is [`fleet::gemini`] (the producer
//! checks every line with it at submit); this file places the call under `base_url` and
//! reads Gemini's answers into the same [`CallError`] taxonomy as the other kinds:
//!
//! | Gemini answered                                 | becomes                                  |
//! |-------------------------------------------------|------------------------------------------|
//! | 200 with a `generateContent` / embedding body   | the OpenAI body ([`fleet::gemini::translate_response`]) |
//! | 200 that is not such a body                     | `InvalidResponse` (retried)              |
//! | 429 `RESOURCE_EXHAUSTED`                        | `RateLimited`, waiting `RetryInfo.retryDelay` when given; a rate limit to the limiter |
//! | 503 `UNAVAILABLE`, 500, 504                     | `Overloaded` / `Server` (retried, as for every kind) |
//! | 400 `INVALID_ARGUMENT` and other 4xx            | `Client`: the item fails with the provider's `error.message` |

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fleet::endpoint::Endpoint;
use fleet::gemini::Request;
use reqwest::Url;

use crate::answer::{Answer, CallError, Success};
use crate::limit::Throttle;

/// One item's Gemini call: the translated request and where it goes.
#[derive(Debug)]
pub struct GeminiCall {
    /// The translated request (its method says how to read the answer).
    pub request: Request,
    /// `base_url` + `/v1beta/models/{model}:{action}`.
    pub url: Url,
    /// The Gemini body.
    pub body: Bytes,
}

/// Translates an item's OpenAI body for `endpoint` and places its call under `base_url`.
/// `Err` (a sentence) when the body cannot be translated, or the path would leave
/// `base_url` (it cannot: the model name is `[A-Za-z0-9._-]` only; checked all the same).
pub fn prepare(base_url: &Url, endpoint: Endpoint, body: &str) -> Result<GeminiCall, String> {
    let request = fleet::gemini::translate_request(endpoint, body)?;
    let base_path = base_url.path().trim_end_matches('/');
    let path = format!("{base_path}{}", request.path());
    let mut url = base_url.clone();
    url.set_path(&path);
    if url.path() != path || url.host_str() != base_url.host_str() {
        return Err("the model name does not make a path under base_url".into());
    }
    let body = Bytes::from(serde_json::to_vec(&request.body).map_err(|e| e.to_string())?);
    Ok(GeminiCall { request, url, body })
}

/// The failure of an item whose body cannot be translated (the producer refuses such lines;
/// this one came some other way): a permanent client error, no call made.
pub fn untranslatable(reason: String) -> CallError {
    CallError::Client {
        answer: Answer { status: 400, request_id: String::new(), body: None },
        message: format!("the request cannot be translated to Gemini: {reason}"),
    }
}

/// Reads a classified Gemini answer: a success body becomes the OpenAI body its line asked
/// for (with the usage counted from it), a 429 gets the wait `RetryInfo` asks for (at most
/// `cap`) and counts as a rate limit. Everything else stays as classified.
pub fn read_answer(
    call: &GeminiCall,
    result: Result<Success, CallError>,
    throttle: Throttle,
    cap: Duration,
) -> (Result<Success, CallError>, Throttle) {
    match result {
        Ok(success) => (translate(call, success.answer), throttle),
        Err(CallError::RateLimited { answer, retry_after }) if answer.status == 429 => {
            let body = answer.body.as_ref().map(|b| b.get()).unwrap_or_default();
            let delay = fleet::gemini::retry_delay(body).map(|d| d.min(cap));
            // Gemini's 429 is always RESOURCE_EXHAUSTED: a quota, i.e. a rate limit, even
            // without a delay or a rate-limit header.
            let throttle = if delay.is_some() || is_resource_exhausted(body) { Throttle::Hinted } else { throttle };
            (Err(CallError::RateLimited { answer, retry_after: delay.or(retry_after) }), throttle)
        }
        Err(e) => (Err(e), throttle),
    }
}

/// Whether an error body says `RESOURCE_EXHAUSTED`.
fn is_resource_exhausted(body: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(body)
        .is_ok_and(|v| v["error"]["status"].as_str() == Some("RESOURCE_EXHAUSTED"))
}

/// A success answer's body in OpenAI's shape, and its usage.
fn translate(call: &GeminiCall, answer: Answer) -> Result<Success, CallError> {
    let Some(raw) = answer.body.as_ref() else {
        return Err(CallError::InvalidResponse { answer, reason: "no JSON body".into() });
    };
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let fallback_id = format!("gemini-{}", answer.request_id);
    let translated = fleet::gemini::translate_response(&call.request, raw.get(), created, &fallback_id)
        .and_then(|v| serde_json::value::to_raw_value(&v).map_err(|e| e.to_string()));
    match translated {
        Ok(body) => {
            let usage = fleet::usage::parse(body.get()).unwrap_or_default();
            let answer = Answer { body: Some(body), ..answer };
            Ok(Success { answer, prompt_tokens: usage.input_tokens, completion_tokens: usage.output_tokens })
        }
        Err(reason) => Err(CallError::InvalidResponse { answer, reason: format!("not a Gemini answer: {reason}") }),
    }
}

/// Whether a Gemini error body says the key itself is bad (Gemini answers an invalid key
/// with 400 `INVALID_ARGUMENT` and reason `API_KEY_INVALID`, not with a 401).
pub fn names_invalid_key(body: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else { return false };
    v["error"]["details"].as_array().is_some_and(|d| d.iter().any(|d| d["reason"].as_str() == Some("API_KEY_INVALID")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn call() -> GeminiCall {
        let base = Url::parse("http://127.0.0.1:9/prefix").unwrap();
        prepare(
            &base,
            Endpoint::ChatCompletions,
            r#"{"model":"gemini-2.0-flash","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .unwrap()
    }

    fn answer(status: u16, body: &str) -> Answer {
        Answer { status, request_id: "req_1".into(), body: Some(RawValue::from_string(body.into()).unwrap()) }
    }

    #[test]
    fn the_call_goes_under_base_url_with_the_translated_body() {
        let c = call();
        assert_eq!(c.url.as_str(), "http://127.0.0.1:9/prefix/v1beta/models/gemini-2.0-flash:generateContent");
        let body: serde_json::Value = serde_json::from_slice(&c.body).unwrap();
        assert_eq!(body["contents"][0]["parts"][0]["text"], "hi");
        let base = Url::parse("http://127.0.0.1:9").unwrap();
        assert!(prepare(&base, Endpoint::ChatCompletions, r#"{"model":"a/../../x","messages":[]}"#).is_err());
    }

    #[test]
    fn a_success_is_translated_with_its_usage() {
        let ok = Success {
            answer: answer(
                200,
                r#"{"candidates":[{"content":{"parts":[{"text":"yo"}]},"finishReason":"STOP"}],
                "usageMetadata":{"promptTokenCount":7,"candidatesTokenCount":2,"cachedContentTokenCount":4}}"#,
            ),
            prompt_tokens: 0,
            completion_tokens: 0,
        };
        let (result, _) = read_answer(&call(), Ok(ok), Throttle::Unhinted, Duration::from_secs(60));
        let s = result.unwrap();
        assert_eq!((s.prompt_tokens, s.completion_tokens), (7, 2));
        let body: serde_json::Value = serde_json::from_str(s.answer.body.unwrap().get()).unwrap();
        assert_eq!(body["choices"][0]["message"]["content"], "yo");
        assert_eq!(body["id"], "gemini-req_1");
        assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 4);

        let odd = Success { answer: answer(200, "[1]"), prompt_tokens: 0, completion_tokens: 0 };
        let (result, _) = read_answer(&call(), Ok(odd), Throttle::Unhinted, Duration::from_secs(60));
        assert!(matches!(result, Err(CallError::InvalidResponse { .. })));
    }

    #[test]
    fn a_429_waits_for_its_retry_delay_at_most_the_cap() {
        let body = r#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","message":"quota","details":[
            {"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"2s"}]}}"#;
        let limited = Err(CallError::RateLimited { answer: answer(429, body), retry_after: None });
        let (result, throttle) = read_answer(&call(), limited, Throttle::Silent, Duration::from_secs(60));
        assert_eq!(result.unwrap_err().retry_after(), Some(Duration::from_secs(2)));
        assert_eq!(throttle, Throttle::Hinted);
        let limited = Err(CallError::RateLimited { answer: answer(429, body), retry_after: None });
        let (result, _) = read_answer(&call(), limited, Throttle::Silent, Duration::from_secs(1));
        assert_eq!(result.unwrap_err().retry_after(), Some(Duration::from_secs(1)));
        // No delay, but RESOURCE_EXHAUSTED: still a rate limit.
        let bare = r#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","message":"quota"}}"#;
        let limited = Err(CallError::RateLimited { answer: answer(429, bare), retry_after: None });
        let (result, throttle) = read_answer(&call(), limited, Throttle::Silent, Duration::from_secs(60));
        assert_eq!((result.unwrap_err().retry_after(), throttle), (None, Throttle::Hinted));
    }

    #[test]
    fn an_invalid_key_is_named_in_the_details() {
        let bad = r#"{"error":{"code":400,"status":"INVALID_ARGUMENT","message":"API key not valid.","details":[
            {"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID"}]}}"#;
        assert!(names_invalid_key(bad.as_bytes()));
        let other = r#"{"error":{"code":400,"status":"INVALID_ARGUMENT","message":"bad request"}}"#;
        assert!(!names_invalid_key(other.as_bytes()));
        assert!(!names_invalid_key(b"<html>"));
    }
}
