//! Token usage read from a provider's answer, and the price table that turns it into money.
//!
//! The answer is untrusted: [`parse`] reads only the top-level `model` and `usage` keys,
//! skipping everything else without building it, accepts only whole non-negative numbers,
//! bounds the model name, and never panics (anything unexpected is "no usage").
//!
//! Shapes understood (input tokens always *include* the cached ones, as OpenAI counts):
//! - OpenAI chat and completions: `prompt_tokens`, `completion_tokens`,
//!   `prompt_tokens_details.cached_tokens`;
//! - OpenAI responses: `input_tokens`, `output_tokens`, `input_tokens_details.cached_tokens`;
//! - Anthropic messages: `input_tokens` (not counting the cache), `output_tokens`,
//!   `cache_read_input_tokens`, `cache_creation_input_tokens`: input = the three summed,
//!   cached = the cache reads.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Longest model name kept (a longer one is cut: it only serves as a price-table key).
pub const MAX_MODEL_BYTES: usize = 128;
/// Largest token count one answer may report; more is treated as this (a hostile answer
/// cannot overflow a job's sums).
pub const MAX_TOKENS_PER_ANSWER: u64 = 1 << 32;

/// Tokens one answer used, as the provider reported them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// The model that answered (`model` of the answer), cut to [`MAX_MODEL_BYTES`].
    #[serde(default)]
    pub model: String,
    /// Input tokens, cached ones included.
    #[serde(default)]
    pub input_tokens: u64,
    /// Of the input tokens, those read from the provider's prompt cache.
    #[serde(default)]
    pub cached_input_tokens: u64,
    /// Output tokens: the answer itself (reasoning included, when the provider counts it so).
    #[serde(default)]
    pub output_tokens: u64,
    /// The answer came out of a provider batch (batch mode): priced at the model's
    /// [`Price::batch_factor`]. Set by the worker that read the batch's output, never by the
    /// answer itself.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub batch: bool,
}

/// Reads the usage of an answer body; `None` when it reports none (or is not an object).
pub fn parse(body: &str) -> Option<Usage> {
    let envelope: Envelope = serde_json::from_str(body).ok()?;
    let u = envelope.usage?;
    let n = |v: Option<u64>| v.unwrap_or(0).min(MAX_TOKENS_PER_ANSWER);
    let anthropic = u.cache_read_input_tokens.is_some() || u.cache_creation_input_tokens.is_some();
    let (input, cached) = if u.prompt_tokens.is_some() || !anthropic {
        let cached = u.prompt_tokens_details.or(u.input_tokens_details).and_then(|d| d.cached_tokens);
        (n(u.prompt_tokens.or(u.input_tokens)), n(cached))
    } else {
        let read = n(u.cache_read_input_tokens);
        (n(u.input_tokens) + n(u.cache_creation_input_tokens) + read, read)
    };
    let output = n(u.completion_tokens.or(u.output_tokens));
    if input == 0 && output == 0 {
        return None;
    }
    let mut model = envelope.model.unwrap_or_default();
    if model.len() > MAX_MODEL_BYTES {
        let mut cut = MAX_MODEL_BYTES;
        while !model.is_char_boundary(cut) {
            cut -= 1;
        }
        model.truncate(cut);
    }
    Some(Usage {
        model,
        input_tokens: input,
        cached_input_tokens: cached.min(input),
        output_tokens: output,
        batch: false,
    })
}

/// The two keys read; every other key is skipped unparsed. A `usage` or `model` of the
/// wrong type makes the whole parse fail, which reads as "no usage".
#[derive(Deserialize)]
struct Envelope {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    usage: Option<RawUsage>,
}

#[derive(Deserialize)]
struct RawUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    prompt_tokens_details: Option<Details>,
    input_tokens_details: Option<Details>,
    cache_read_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct Details {
    cached_tokens: Option<u64>,
}

/// Price of one model (`providers.<name>.prices."<model>"`), per million tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Price of a million input tokens not read from the cache, in the provider's currency.
    pub input_per_mtok: f64,
    /// Price of a million output tokens.
    pub output_per_mtok: f64,
    /// Input tokens read from the prompt cache; the input price when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input_per_mtok: Option<f64>,
    /// Fraction of the price charged in the provider's batch mode (0.5: half price, as
    /// OpenAI's and Anthropic's batch APIs charge). Applied to answers of batch mode only.
    #[serde(default = "default_batch_factor")]
    pub batch_factor: f64,
}

fn default_batch_factor() -> f64 {
    0.5
}

impl Price {
    /// Cost of `usage` at this price: [`Price::batch_factor`] of it for an answer out of a
    /// provider batch ([`Usage::batch`]).
    pub fn cost(&self, usage: &Usage) -> f64 {
        let uncached = usage.input_tokens.saturating_sub(usage.cached_input_tokens) as f64;
        let cached_price = self.cached_input_per_mtok.unwrap_or(self.input_per_mtok);
        let full = uncached * self.input_per_mtok
            + usage.cached_input_tokens as f64 * cached_price
            + usage.output_tokens as f64 * self.output_per_mtok;
        let factor = if usage.batch { self.batch_factor } else { 1.0 };
        full / 1_000_000.0 * factor
    }

    /// Whether every figure is a finite non-negative number.
    pub fn is_valid(&self) -> bool {
        let ok = |v: f64| v.is_finite() && v >= 0.0;
        ok(self.input_per_mtok)
            && ok(self.output_per_mtok)
            && self.cached_input_per_mtok.is_none_or(ok)
            && ok(self.batch_factor)
            && self.batch_factor <= 1.0
    }
}

/// Label of a model in metrics: a model of the provider's price table, or `other` (labels
/// come from a fixed set, whatever an answer claims).
pub fn model_label<'a>(prices: &BTreeMap<String, Price>, model: &'a str) -> &'a str {
    if prices.contains_key(model) {
        model
    } else {
        "other"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shape_reads_with_cached_tokens_inside_the_input() {
        let chat = r#"{"id":"x","model":"gpt-4o","choices":[{"message":{"content":"hi"}}],
            "usage":{"prompt_tokens":100,"completion_tokens":20,"total_tokens":120,
                     "prompt_tokens_details":{"cached_tokens":60}}}"#;
        assert_eq!(
            parse(chat),
            Some(Usage {
                model: "gpt-4o".into(),
                input_tokens: 100,
                cached_input_tokens: 60,
                output_tokens: 20,
                batch: false
            })
        );
        let responses = r#"{"model":"o3","output":[],"usage":{"input_tokens":50,"output_tokens":7,
            "input_tokens_details":{"cached_tokens":10},"output_tokens_details":{"reasoning_tokens":3}}}"#;
        assert_eq!(
            parse(responses).map(|u| (u.input_tokens, u.cached_input_tokens, u.output_tokens)),
            Some((50, 10, 7))
        );
        let anthropic = r#"{"type":"message","model":"claude","content":[],
            "usage":{"input_tokens":5,"output_tokens":9,"cache_read_input_tokens":30,"cache_creation_input_tokens":2}}"#;
        assert_eq!(
            parse(anthropic).map(|u| (u.input_tokens, u.cached_input_tokens, u.output_tokens)),
            Some((37, 30, 9))
        );
        let embeddings = r#"{"data":[],"model":"e","usage":{"prompt_tokens":8,"total_tokens":8}}"#;
        assert_eq!(parse(embeddings).map(|u| (u.input_tokens, u.output_tokens)), Some((8, 0)));
    }

    #[test]
    fn hostile_answers_give_no_usage_or_bounded_usage_and_never_panic() {
        for body in [
            "",
            "[]",
            "null",
            r#"{"usage":"lots"}"#,
            r#"{"usage":{"prompt_tokens":-1}}"#,
            r#"{"usage":{"prompt_tokens":1.5}}"#,
            r#"{"usage":{}}"#,
            r#"{"model":7,"usage":{"prompt_tokens":1}}"#,
            &format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000)),
            &format!(r#"{{"usage":{}1{}}}"#, "{\"a\":".repeat(5_000), "}".repeat(5_000)),
        ] {
            assert_eq!(parse(body), None, "{:.60}", body);
        }
        let huge = format!(r#"{{"model":"{}","usage":{{"prompt_tokens":{}}}}}"#, "é".repeat(200), u64::MAX);
        let u = parse(&huge).expect("usage");
        assert_eq!(u.input_tokens, MAX_TOKENS_PER_ANSWER);
        assert!(u.model.len() <= MAX_MODEL_BYTES);
        let cached_over = r#"{"usage":{"prompt_tokens":3,"prompt_tokens_details":{"cached_tokens":9}}}"#;
        assert_eq!(parse(cached_over).unwrap().cached_input_tokens, 3, "cached is part of the input");
    }

    #[test]
    fn prices_turn_tokens_into_money() {
        let p =
            Price { input_per_mtok: 2.0, output_per_mtok: 8.0, cached_input_per_mtok: Some(0.5), batch_factor: 0.5 };
        let u = Usage {
            model: "m".into(),
            input_tokens: 1_000_000,
            cached_input_tokens: 400_000,
            output_tokens: 500_000,
            batch: false,
        };
        let direct = 0.6 * 2.0 + 0.4 * 0.5 + 0.5 * 8.0;
        assert!((p.cost(&u) - direct).abs() < 1e-9);
        assert!((p.cost(&Usage { batch: true, ..u.clone() }) - direct / 2.0).abs() < 1e-9);
        assert!(p.is_valid());
        assert!(!Price { batch_factor: 2.0, ..p.clone() }.is_valid());
        let table = BTreeMap::from([("m".to_string(), p)]);
        assert_eq!(model_label(&table, "m"), "m");
        assert_eq!(model_label(&table, "evil\"}"), "other");
    }
}
