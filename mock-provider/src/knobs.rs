//! Owns the fault-injection knobs: the command-line / environment configuration that decides
//! how slow, flaky and throttled the mock provider is.

/// Everything that shapes the mock provider's behaviour.
///
/// Every field is settable by a `--kebab-case` flag and by a `MOCK_*` environment variable, so
/// the same knobs work for the binary, for `docker compose` and (through [`Default`] plus
/// struct update syntax) for tests that embed the server.
#[derive(clap::Args, Clone, Debug)]
pub struct Knobs {
    /// Fixed delay, in milliseconds, before every answer that is not refused by the limiter.
    #[arg(long, env = "MOCK_LATENCY_MS", default_value_t = 0)]
    pub latency_ms: u64,

    /// Extra uniformly distributed delay, in milliseconds (0..=jitter), added to the latency.
    #[arg(long, env = "MOCK_JITTER_MS", default_value_t = 0)]
    pub jitter_ms: u64,

    /// Fraction of requests answered 500 Internal Server Error.
    #[arg(long = "error-500", env = "MOCK_ERROR_500", default_value_t = 0.0, value_parser = parse_rate)]
    pub error_500: f64,

    /// Fraction of requests answered 503 Service Unavailable.
    #[arg(long = "error-503", env = "MOCK_ERROR_503", default_value_t = 0.0, value_parser = parse_rate)]
    pub error_503: f64,

    /// Fraction of requests answered 400 Bad Request (OpenAI `invalid_request_error` body).
    #[arg(long = "error-400", env = "MOCK_ERROR_400", default_value_t = 0.0, value_parser = parse_rate)]
    pub error_400: f64,

    /// Fraction of requests answered 429 Too Many Requests (independent of `--rpm`).
    #[arg(long = "error-429", env = "MOCK_ERROR_429", default_value_t = 0.0, value_parser = parse_rate)]
    pub error_429: f64,

    /// Fraction of requests answered 529 (Anthropic `overloaded_error`).
    #[arg(long = "error-529", env = "MOCK_ERROR_529", default_value_t = 0.0, value_parser = parse_rate)]
    pub error_529: f64,

    /// Fraction of requests that never answer (until the client gives up or the server stops).
    #[arg(long, env = "MOCK_HANG_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub hang_rate: f64,

    /// Fraction of requests answered 200 with a body that is not JSON.
    #[arg(long, env = "MOCK_GARBAGE_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub garbage_rate: f64,

    /// Requests-per-minute limit, enforced by a token bucket holding one second of burst.
    #[arg(long, env = "MOCK_RPM", value_parser = clap::value_parser!(u64).range(1..))]
    pub rpm: Option<u64>,

    /// Tokens-per-minute limit, counted as providers count it when a request arrives: its
    /// prompt tokens plus the most output it asks for (`max_tokens`, ...). A token bucket
    /// holding one second of burst; a request over it is answered 429.
    #[arg(long, env = "MOCK_TPM", value_parser = clap::value_parser!(u64).range(1..))]
    pub tpm: Option<u64>,

    /// API keys the mock accepts (comma-separated). When given, a request whose
    /// `Authorization: Bearer <key>` or `x-api-key` is not one of them is answered 401.
    /// Never logged.
    #[arg(long, env = "MOCK_VALID_KEYS", value_delimiter = ',', value_parser = secret_key)]
    pub valid_keys: Vec<SecretKey>,

    /// Models the key may not use (comma-separated): a request for one is answered 403, as
    /// OpenAI answers a project without access to a model (`model_not_found`) and Anthropic
    /// a key without permission (`permission_error`). The key itself stays good.
    #[arg(long, env = "MOCK_FORBIDDEN_MODELS", value_delimiter = ',')]
    pub forbidden_models: Vec<String>,

    /// Batches and uploaded files belong to the key that created them, as they belong to a
    /// provider's project: another key asking for one by id is answered 404 (counted in
    /// `other_project`). Listing is not filtered.
    #[arg(long, env = "MOCK_KEY_PROJECTS")]
    pub key_projects: bool,

    /// Appended to the model an online answer names (e.g. `-2024-07-18`), as providers
    /// answer a request for `gpt-4o-mini` with their dated snapshot `gpt-4o-mini-2024-07-18`.
    #[arg(long, env = "MOCK_ANSWER_MODEL_SUFFIX", default_value = "")]
    pub answer_model_suffix: String,

    /// Pass every answer on the way the LiteLLM proxy does: `hint` (a 429 carries
    /// `llm_provider-retry-after`, ids are `x-litellm-call-id`, no `retry-after` or
    /// `x-ratelimit-*`) or `silent` (no rate-limit, retry or request-id header at all).
    #[arg(long, env = "MOCK_LITELLM", value_enum)]
    pub litellm: Option<crate::gateway::GatewayMode>,

    /// Extra delay, in milliseconds, before answering a request that asks for the flex tier
    /// (`"service_tier": "flex"`): flex is slower than the ordinary path.
    #[arg(long, env = "MOCK_FLEX_LATENCY_MS", default_value_t = 0)]
    pub flex_latency_ms: u64,

    /// Fraction of flex requests refused for capacity, spread evenly and alternating
    /// OpenAI's 429 "resource unavailable" and Groq's 498 `capacity_exceeded`.
    #[arg(long, env = "MOCK_FLEX_UNAVAILABLE", default_value_t = 0.0, value_parser = parse_rate)]
    pub flex_unavailable: f64,

    /// Seed of the random generator behind every fault and jitter decision.
    #[arg(long, env = "MOCK_SEED", default_value_t = 42)]
    pub seed: u64,

    /// The provider-batch knobs (time to complete, line errors, rejection, expiry, ...).
    #[command(flatten)]
    pub batch: crate::batches::BatchKnobs,

    /// The Gemini knobs (the `retryDelay` of injected 429s).
    #[command(flatten)]
    pub gemini: crate::gemini::GeminiKnobs,
}

impl Default for Knobs {
    /// A well-behaved provider: no latency, no faults, no rate limit, seed 42 — the same values
    /// as the command-line defaults.
    fn default() -> Self {
        Self {
            latency_ms: 0,
            jitter_ms: 0,
            error_500: 0.0,
            error_503: 0.0,
            error_400: 0.0,
            error_429: 0.0,
            error_529: 0.0,
            hang_rate: 0.0,
            garbage_rate: 0.0,
            rpm: None,
            tpm: None,
            valid_keys: Vec::new(),
            forbidden_models: Vec::new(),
            key_projects: false,
            answer_model_suffix: String::new(),
            litellm: None,
            flex_latency_ms: 0,
            flex_unavailable: 0.0,
            seed: 42,
            batch: crate::batches::BatchKnobs::default(),
            gemini: crate::gemini::GeminiKnobs::default(),
        }
    }
}

/// An API key the mock accepts; `Debug` hides it (the knobs are logged at start).
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey(pub String);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(***)")
    }
}

fn secret_key(s: &str) -> Result<SecretKey, String> {
    Ok(SecretKey(s.to_string()))
}

/// Parses a fraction, refusing anything outside `0.0..=1.0` (including NaN) so a typo such as
/// `--error-500 5` fails loudly instead of silently meaning "always".
pub(crate) fn parse_rate(s: &str) -> Result<f64, String> {
    let rate: f64 = s.trim().parse().map_err(|e| format!("`{s}` is not a number: {e}"))?;
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(format!("`{s}` is not a fraction between 0 and 1"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        knobs: Knobs,
    }

    #[test]
    fn defaults_match_default_impl() {
        let parsed = Cli::try_parse_from(["mock"]).unwrap().knobs;
        let default = Knobs::default();
        assert_eq!(parsed.latency_ms, default.latency_ms);
        assert_eq!(parsed.jitter_ms, default.jitter_ms);
        assert_eq!(parsed.error_500, default.error_500);
        assert_eq!(parsed.error_529, default.error_529);
        assert_eq!(parsed.hang_rate, default.hang_rate);
        assert_eq!(parsed.garbage_rate, default.garbage_rate);
        assert_eq!(parsed.rpm, None);
        assert_eq!(parsed.seed, 42);
    }

    #[test]
    fn flags_are_parsed() {
        let k = Cli::try_parse_from([
            "mock",
            "--latency-ms",
            "200",
            "--jitter-ms",
            "20",
            "--error-500",
            "0.1",
            "--error-529",
            "0.25",
            "--hang-rate",
            "0.01",
            "--garbage-rate",
            "0.02",
            "--rpm",
            "600",
            "--seed",
            "7",
        ])
        .unwrap()
        .knobs;
        assert_eq!(k.latency_ms, 200);
        assert_eq!(k.jitter_ms, 20);
        assert_eq!(k.error_500, 0.1);
        assert_eq!(k.error_529, 0.25);
        assert_eq!(k.hang_rate, 0.01);
        assert_eq!(k.garbage_rate, 0.02);
        assert_eq!(k.rpm, Some(600));
        assert_eq!(k.seed, 7);
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(Cli::try_parse_from(["mock", "--error-500", "1.5"]).is_err());
        assert!(Cli::try_parse_from(["mock", "--error-503", "-0.1"]).is_err());
        assert!(Cli::try_parse_from(["mock", "--hang-rate", "NaN"]).is_err());
        assert!(Cli::try_parse_from(["mock", "--rpm", "0"]).is_err());
        assert!(Cli::try_parse_from(["mock", "--litellm", "loud"]).is_err());
        assert!(Cli::try_parse_from(["mock", "--flex-unavailable", "1.2"]).is_err());
        let k = Cli::try_parse_from(["mock", "--flex-latency-ms", "300", "--flex-unavailable", "0.2"]).unwrap().knobs;
        assert_eq!((k.flex_latency_ms, k.flex_unavailable), (300, 0.2));
    }

    #[test]
    fn batch_knobs_are_parsed_defaulted_and_checked() {
        let default = Cli::try_parse_from(["mock"]).unwrap().knobs.batch;
        let expected = crate::batches::BatchKnobs::default();
        assert_eq!(default.batch_complete_ms, expected.batch_complete_ms);
        assert_eq!(default.batch_partial, expected.batch_partial);
        assert_eq!(default.batch_keep, expected.batch_keep);
        assert_eq!(default.batch_store_bytes, expected.batch_store_bytes);
        let k = Cli::try_parse_from([
            "mock",
            "--batch-complete-ms",
            "5",
            "--batch-line-error-rate",
            "0.1",
            "--batch-reject-rate",
            "1",
            "--batch-expire-rate",
            "0.5",
            "--batch-partial",
            "0.25",
            "--batch-keep",
            "3",
            "--batch-store-bytes",
            "100",
        ])
        .unwrap()
        .knobs
        .batch;
        assert_eq!(k.batch_complete_ms, 5);
        assert_eq!((k.batch_line_error_rate, k.batch_reject_rate, k.batch_expire_rate), (0.1, 1.0, 0.5));
        assert_eq!((k.batch_partial, k.batch_keep, k.batch_store_bytes), (0.25, 3, 100));
        assert!(Cli::try_parse_from(["mock", "--batch-partial", "2"]).is_err());
        assert!(Cli::try_parse_from(["mock", "--batch-keep", "0"]).is_err());
    }

    #[test]
    fn valid_keys_and_tpm_are_knobs_and_keys_are_never_shown() {
        let k = Cli::try_parse_from(["mock", "--valid-keys", "sk-one,sk-two", "--tpm", "60000"]).unwrap().knobs;
        assert_eq!(k.valid_keys, vec![SecretKey("sk-one".into()), SecretKey("sk-two".into())]);
        assert_eq!(k.tpm, Some(60000));
        assert!(!format!("{k:?}").contains("sk-one"));
        assert!(Cli::try_parse_from(["mock", "--tpm", "0"]).is_err());
    }

    #[test]
    fn the_litellm_mode_is_a_knob() {
        use crate::gateway::GatewayMode;
        assert_eq!(Cli::try_parse_from(["mock", "--litellm", "hint"]).unwrap().knobs.litellm, Some(GatewayMode::Hint));
        assert_eq!(
            Cli::try_parse_from(["mock", "--litellm", "silent"]).unwrap().knobs.litellm,
            Some(GatewayMode::Silent)
        );
        assert_eq!(Cli::try_parse_from(["mock"]).unwrap().knobs.litellm, None);
    }
}
