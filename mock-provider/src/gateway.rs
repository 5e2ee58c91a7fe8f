//! Owns the gateway mode: answers shaped the way the LiteLLM proxy passes a provider's
//! answers on, so the fleet's handling of gateways is tested without LiteLLM.
//!
//! LiteLLM forwards a provider's headers with an `llm_provider-` prefix and drops the
//! originals: its 429 carries `llm_provider-retry-after` and no `retry-after` or
//! `x-ratelimit-*`, and its request id is `x-litellm-call-id`. On its Anthropic route
//! (`/v1/messages`) a 429 comes with none of these headers at all.

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

/// How answers are passed on (`--litellm`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GatewayMode {
    /// Like LiteLLM's OpenAI route: a 429 says `llm_provider-retry-after: N` (whole
    /// seconds), the request id is `x-litellm-call-id`, no rate-limit or retry header.
    Hint,
    /// Like LiteLLM's Anthropic route: no rate-limit, retry or request-id header at all.
    Silent,
}

const LITELLM_RETRY_AFTER: HeaderName = HeaderName::from_static("llm_provider-retry-after");
const LITELLM_CALL_ID: HeaderName = HeaderName::from_static("x-litellm-call-id");

/// Rewrites the headers of an answer (request number `n`) as the gateway would.
pub fn rewrite(mode: GatewayMode, status: StatusCode, n: u64, headers: &mut HeaderMap) {
    // Seconds to wait, from the provider's own hint (the rpm limiter's), at least 1.
    let wait_s = headers
        .get(axum::http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1)
        .max(1);
    let provider_headers: Vec<HeaderName> = headers
        .keys()
        .filter(|k| {
            let k = k.as_str();
            k.starts_with("retry-after") || k.contains("ratelimit") || k == "x-request-id" || k == "request-id"
        })
        .cloned()
        .collect();
    for k in provider_headers {
        headers.remove(k);
    }
    if mode == GatewayMode::Hint {
        headers.insert(LITELLM_CALL_ID, HeaderValue::from_str(&format!("litellm-{n:08x}")).expect("ASCII"));
        if status == StatusCode::TOO_MANY_REQUESTS {
            headers.insert(LITELLM_RETRY_AFTER, HeaderValue::from(wait_s));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider_429() -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("retry-after", "2"),
            ("retry-after-ms", "1500"),
            ("x-ratelimit-remaining-requests", "0"),
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("x-request-id", "req_1"),
            ("content-type", "application/json"),
        ] {
            h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn hint_mode_passes_only_the_prefixed_retry_hint_and_a_call_id() {
        let mut h = provider_429();
        rewrite(GatewayMode::Hint, StatusCode::TOO_MANY_REQUESTS, 7, &mut h);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-type", "llm_provider-retry-after", "x-litellm-call-id"]);
        assert_eq!(h["llm_provider-retry-after"], "2");
        assert_eq!(h["x-litellm-call-id"], "litellm-00000007");
    }

    #[test]
    fn silent_mode_passes_no_rate_retry_or_id_header() {
        let mut h = provider_429();
        rewrite(GatewayMode::Silent, StatusCode::TOO_MANY_REQUESTS, 7, &mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["content-type"]);
    }

    #[test]
    fn a_bare_429_gets_a_one_second_hint() {
        let mut h = HeaderMap::new();
        rewrite(GatewayMode::Hint, StatusCode::TOO_MANY_REQUESTS, 1, &mut h);
        assert_eq!(h["llm_provider-retry-after"], "1");
        let mut ok = HeaderMap::new();
        rewrite(GatewayMode::Hint, StatusCode::OK, 1, &mut ok);
        assert!(!ok.contains_key("llm_provider-retry-after"));
    }
}
