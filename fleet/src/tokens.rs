//! Tokens as providers count them against a tokens-per-minute limit: a request is charged,
//! when it arrives, its prompt plus the most output it asks for (`max_tokens`,
//! `max_completion_tokens` or `max_output_tokens`), since the provider cannot know how much
//! of that it will use. The worker's `tpm` ceiling and the mock provider's token limit both
//! read the requested maximum here, so they agree on what a request costs.

use serde::Deserialize;

/// The output limits a request may name (OpenAI chat/completions, OpenAI's newer name,
/// the Responses API; Anthropic uses `max_tokens`).
#[derive(Deserialize)]
struct OutputLimits {
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
}

/// The most tokens one request is charged. Bodies come from users' files through the
/// broker: an absurd `max_tokens` must not turn into a pause of centuries (or an overflow
/// where a duration is computed from it). No model answers with more than this.
pub const MAX_REQUEST_TOKENS: u64 = 10_000_000;

/// The most output tokens a request body asks for (0 when it names no limit or is not a
/// JSON object). When several are named, the largest counts; at most [`MAX_REQUEST_TOKENS`].
pub fn requested_output_tokens(body: &[u8]) -> u64 {
    match serde_json::from_slice::<OutputLimits>(body) {
        Ok(l) => [l.max_tokens, l.max_completion_tokens, l.max_output_tokens]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(0)
            .min(MAX_REQUEST_TOKENS),
        Err(_) => 0,
    }
}

/// The usual rough prompt estimate from a body's size: 4 bytes a token. It counts the JSON
/// around the prompt too, so it errs high, which is the safe side for a ceiling.
pub fn estimate_prompt_tokens(body: &[u8]) -> u64 {
    body.len() as u64 / 4
}

/// What a request is charged against a token limit by the worker's own estimate: the
/// prompt estimate plus the requested output.
/// Both parts are bounded, so the sum is at most twice [`MAX_REQUEST_TOKENS`].
pub fn estimate_request_tokens(body: &[u8]) -> u64 {
    estimate_prompt_tokens(body).min(MAX_REQUEST_TOKENS) + requested_output_tokens(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_requested_output_is_any_of_the_three_names() {
        assert_eq!(requested_output_tokens(br#"{"max_tokens":100}"#), 100);
        assert_eq!(requested_output_tokens(br#"{"max_completion_tokens":70,"model":"m"}"#), 70);
        assert_eq!(requested_output_tokens(br#"{"max_output_tokens":5,"max_tokens":9}"#), 9);
        assert_eq!(requested_output_tokens(br#"{"messages":[]}"#), 0);
        assert_eq!(requested_output_tokens(b"not json"), 0);
        assert_eq!(requested_output_tokens(br#"{"max_tokens":-1}"#), 0, "nonsense is no limit");
        assert_eq!(requested_output_tokens(br#"{"max_tokens":18446744073709551615}"#), MAX_REQUEST_TOKENS);
    }

    #[test]
    fn the_estimate_adds_the_output_to_the_prompt() {
        let body = br#"{"model":"m","max_tokens":200,"messages":[]}"#;
        assert_eq!(estimate_request_tokens(body), body.len() as u64 / 4 + 200);
    }
}
