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
//!   cached = the cache reads;
//! - Gemini `usageMetadata` (read only when there is no `usage`): input =
//!   `promptTokenCount` (+ `toolUsePromptTokenCount`), cached = `cachedContentTokenCount`,
//!   output = `candidatesTokenCount` + `thoughtsTokenCount`; the model is `modelVersion`.
//!
//! Prices are looked up by the model the answer names ([`price_of`]): providers answer with
//! dated snapshot names (`gpt-4o-mini-2024-07-18` to a request for `gpt-4o-mini`), which
//! the undated entry prices.

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
    /// The answer came from the provider's flex tier (`--mode flex`: `service_tier: "flex"`
    /// on the ordinary API): priced at the model's [`Price::flex_factor`]. Set by the worker
    /// that made the call for a flex item, never by the answer itself.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub flex: bool,
}

/// Reads the usage of an answer body; `None` when it reports none (or is not an object).
pub fn parse(body: &str) -> Option<Usage> {
    let envelope: Envelope = serde_json::from_str(body).ok()?;
    let n = |v: Option<u64>| v.unwrap_or(0).min(MAX_TOKENS_PER_ANSWER);
    let (input, cached, output) = match (envelope.usage, envelope.usage_metadata) {
        (Some(u), _) => {
            let anthropic = u.cache_read_input_tokens.is_some() || u.cache_creation_input_tokens.is_some();
            let (input, cached) = if u.prompt_tokens.is_some() || !anthropic {
                let cached = u.prompt_tokens_details.or(u.input_tokens_details).and_then(|d| d.cached_tokens);
                (n(u.prompt_tokens.or(u.input_tokens)), n(cached))
            } else {
                let read = n(u.cache_read_input_tokens);
                (n(u.input_tokens) + n(u.cache_creation_input_tokens) + read, read)
            };
            (input, cached, n(u.completion_tokens.or(u.output_tokens)))
        }
        // Gemini's own answer (the worker translates online answers to OpenAI's shape first).
        (None, Some(g)) => (
            n(g.prompt_token_count) + n(g.tool_use_prompt_token_count),
            n(g.cached_content_token_count),
            n(g.candidates_token_count) + n(g.thoughts_token_count),
        ),
        (None, None) => return None,
    };
    if input == 0 && output == 0 {
        return None;
    }
    let mut model = envelope.model.or(envelope.model_version).unwrap_or_default();
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
        flex: false,
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
    /// Gemini's usage (`generateContent`), read when `usage` is absent.
    #[serde(default, rename = "usageMetadata")]
    usage_metadata: Option<GeminiUsage>,
    /// Gemini's name of the model that answered.
    #[serde(default, rename = "modelVersion")]
    model_version: Option<String>,
}

/// Gemini's `usageMetadata`: `promptTokenCount` includes the cached tokens, as OpenAI's
/// `prompt_tokens` does; thoughts are billed as output.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GeminiUsage {
    prompt_token_count: Option<u64>,
    candidates_token_count: Option<u64>,
    cached_content_token_count: Option<u64>,
    thoughts_token_count: Option<u64>,
    tool_use_prompt_token_count: Option<u64>,
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
    /// Fraction of the price charged on the provider's flex tier (`--mode flex`; OpenAI
    /// bills flex at batch rates); absent: [`Price::batch_factor`]. Applied to flex answers
    /// only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flex_factor: Option<f64>,
}

fn default_batch_factor() -> f64 {
    0.5
}

impl Price {
    /// Cost of `usage` at this price: [`Price::batch_factor`] of it for an answer out of a
    /// provider batch ([`Usage::batch`]), [`Price::flex_factor`] for one of the flex tier
    /// ([`Usage::flex`]).
    pub fn cost(&self, usage: &Usage) -> f64 {
        let uncached = usage.input_tokens.saturating_sub(usage.cached_input_tokens) as f64;
        let cached_price = self.cached_input_per_mtok.unwrap_or(self.input_per_mtok);
        let full = uncached * self.input_per_mtok
            + usage.cached_input_tokens as f64 * cached_price
            + usage.output_tokens as f64 * self.output_per_mtok;
        let factor = if usage.batch {
            self.batch_factor
        } else if usage.flex {
            self.flex_factor()
        } else {
            1.0
        };
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
            && self.flex_factor.is_none_or(|f| ok(f) && f <= 1.0)
    }

    /// The fraction charged for a flex answer: `flex_factor`, else `batch_factor`.
    pub fn flex_factor(&self) -> f64 {
        self.flex_factor.unwrap_or(self.batch_factor)
    }
}

/// The price entry of the model an answer names, and the entry's name: the entry named
/// exactly `model`, else the entry named `model` without a trailing date suffix
/// (`-YYYY-MM-DD` as OpenAI dates its snapshots, `gpt-4o-mini-2024-07-18`; or `-YYYYMMDD`
/// as Anthropic does, `claude-3-5-haiku-20241022`). Nothing looser: a prefix match would
/// price `gpt-4o-2024-08-06` at a `gpt-4o-mini` entry's price, or `gpt-4o-mini` at
/// `gpt-4o`'s. An entry named with a date prices that snapshot only.
pub fn price_of<'t>(prices: &'t BTreeMap<String, Price>, model: &str) -> Option<(&'t str, &'t Price)> {
    if let Some((name, price)) = prices.get_key_value(model) {
        return Some((name.as_str(), price));
    }
    let undated = strip_date_suffix(model)?;
    prices.get_key_value(undated).map(|(name, price)| (name.as_str(), price))
}

/// `model` without its trailing `-YYYY-MM-DD` or `-YYYYMMDD` (a plausible date: a year
/// 2000-2999, a month 01-12, a day 01-31), or `None` when it has none.
pub fn strip_date_suffix(model: &str) -> Option<&str> {
    let b = model.as_bytes();
    let number = |s: &[u8]| -> Option<u32> {
        s.iter().try_fold(0u32, |n, c| c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0')))
    };
    let date = |y: &[u8], m: &[u8], d: &[u8]| match (number(y), number(m), number(d)) {
        (Some(y), Some(m), Some(d)) => (2000..=2999).contains(&y) && (1..=12).contains(&m) && (1..=31).contains(&d),
        _ => false,
    };
    // The suffix is ASCII, so where it starts is a character boundary of `model`.
    let dashed = b.len() > 11 && {
        let t = &b[b.len() - 11..];
        t[0] == b'-' && t[5] == b'-' && t[8] == b'-' && date(&t[1..5], &t[6..8], &t[9..11])
    };
    if dashed {
        return Some(&model[..model.len() - 11]);
    }
    let compact = b.len() > 9 && {
        let t = &b[b.len() - 9..];
        t[0] == b'-' && date(&t[1..5], &t[5..7], &t[7..9])
    };
    compact.then(|| &model[..model.len() - 9])
}

/// Label of a model in metrics: the name of the provider's price entry that prices it
/// ([`price_of`]: a dated answer is labelled with its undated entry), or `other` (labels
/// come from a fixed set, whatever an answer claims).
pub fn model_label<'t>(prices: &'t BTreeMap<String, Price>, model: &str) -> &'t str {
    price_of(prices, model).map_or("other", |(name, _)| name)
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
                batch: false,
                flex: false
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
        let gemini = r#"{"candidates":[],"modelVersion":"gemini-2.0-flash","usageMetadata":{"promptTokenCount":40,
            "candidatesTokenCount":9,"thoughtsTokenCount":3,"cachedContentTokenCount":30,"totalTokenCount":52}}"#;
        assert_eq!(
            parse(gemini).map(|u| (u.model, u.input_tokens, u.cached_input_tokens, u.output_tokens)),
            Some(("gemini-2.0-flash".into(), 40, 30, 12))
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
        let p = Price {
            input_per_mtok: 2.0,
            output_per_mtok: 8.0,
            cached_input_per_mtok: Some(0.5),
            batch_factor: 0.5,
            flex_factor: None,
        };
        let u = Usage {
            model: "m".into(),
            input_tokens: 1_000_000,
            cached_input_tokens: 400_000,
            output_tokens: 500_000,
            batch: false,
            flex: false,
        };
        let direct = 0.6 * 2.0 + 0.4 * 0.5 + 0.5 * 8.0;
        assert!((p.cost(&u) - direct).abs() < 1e-9);
        assert!((p.cost(&Usage { batch: true, ..u.clone() }) - direct / 2.0).abs() < 1e-9);
        assert!(p.is_valid());
        assert!(!Price { batch_factor: 2.0, ..p.clone() }.is_valid());
        // A flex answer is priced at flex_factor, batch_factor when none is set.
        assert!((p.cost(&Usage { flex: true, ..u.clone() }) - direct / 2.0).abs() < 1e-9);
        let flex = Price { flex_factor: Some(0.25), ..p.clone() };
        assert!((flex.cost(&Usage { flex: true, ..u.clone() }) - direct / 4.0).abs() < 1e-9);
        assert!((flex.cost(&Usage { batch: true, ..u.clone() }) - direct / 2.0).abs() < 1e-9, "batch stays batch");
        assert!(!Price { flex_factor: Some(1.5), ..p.clone() }.is_valid());
        assert!(!Price { flex_factor: Some(f64::NAN), ..p.clone() }.is_valid());
        let table = BTreeMap::from([("m".to_string(), p)]);
        assert_eq!(model_label(&table, "m"), "m");
        assert_eq!(model_label(&table, "evil\"}"), "other");
    }

    /// The documented rule: exact, else without a trailing date; never a looser prefix.
    #[test]
    fn a_dated_answer_is_priced_by_its_undated_entry_and_nothing_looser() {
        let price = |input| Price {
            input_per_mtok: input,
            output_per_mtok: 0.0,
            cached_input_per_mtok: None,
            batch_factor: 0.5,
            flex_factor: None,
        };
        let table = BTreeMap::from([
            ("gpt-4o".to_string(), price(2.5)),
            ("gpt-4o-mini".to_string(), price(0.15)),
            ("claude-3-5-haiku".to_string(), price(0.8)),
            ("o1-2024-12-17".to_string(), price(15.0)),
        ]);
        let priced = |model: &str| price_of(&table, model).map(|(name, p)| (name, p.input_per_mtok));
        assert_eq!(priced("gpt-4o-mini"), Some(("gpt-4o-mini", 0.15)), "exact");
        assert_eq!(priced("gpt-4o-mini-2024-07-18"), Some(("gpt-4o-mini", 0.15)), "OpenAI's dated snapshot");
        assert_eq!(priced("gpt-4o-2024-08-06"), Some(("gpt-4o", 2.5)), "not gpt-4o-mini's price");
        assert_eq!(priced("claude-3-5-haiku-20241022"), Some(("claude-3-5-haiku", 0.8)), "Anthropic's date");
        assert_eq!(priced("o1-2024-12-17"), Some(("o1-2024-12-17", 15.0)), "a dated entry prices its snapshot");
        assert_eq!(priced("o1"), None, "an undated answer is not priced by a dated entry");
        for unpriced in [
            "gpt-4o-mini-audio",       // a prefix is not a match
            "gpt-4o-mini-2024-13-18",  // no month 13
            "gpt-4o-mini-2024-07",     // not a whole date
            "gpt-4o-mini-0718",        // not a date suffix
            "gpt-4o-mini-2024-07-18x", // something after the date
            "gpt-4",
            "",
            "-20241022",
            "é-2024-07-18",
        ] {
            assert_eq!(priced(unpriced), None, "{unpriced:?}");
        }
        assert_eq!(
            strip_date_suffix("gpt-4o-mini-2024-07-18-2024-07-18"),
            Some("gpt-4o-mini-2024-07-18"),
            "one suffix"
        );
        assert_eq!(strip_date_suffix("ééé-20241022"), Some("ééé"));
        assert_eq!(model_label(&table, "gpt-4o-mini-2024-07-18"), "gpt-4o-mini", "metrics name the entry");
        assert_eq!(model_label(&table, "gpt-4o-mini-x"), "other");
    }
}
