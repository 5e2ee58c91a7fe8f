//! Owns the answer of OpenAI's Moderations API (`POST /v1/moderations`): one result per input
//! (a string, a list of strings, or one list of multimodal parts), each with every documented
//! category, its score and the input types it was applied to. The verdict is deterministic:
//! a text containing [`FLAG_MARKER`] is flagged for `violence`, anything else is not.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::api::{content_text, parse, render};

/// The marker that makes a text flagged, so tests can ask for both verdicts.
pub const FLAG_MARKER: &str = "mock-flag";
const DEFAULT_MODEL: &str = "omni-moderation-latest";
/// The categories of `omni-moderation-latest`, as documented.
const CATEGORIES: [&str; 13] = [
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
];
/// The category a flagged text is flagged for.
const FLAGGED_CATEGORY: &str = "violence";

#[derive(Deserialize)]
struct ModerationRequest {
    #[serde(default)]
    model: Option<String>,
    input: Option<Value>,
}

#[derive(Serialize)]
struct ModerationObject<'a> {
    id: String,
    model: &'a str,
    results: Vec<ModerationResult>,
}

#[derive(Serialize)]
struct ModerationResult {
    flagged: bool,
    categories: BTreeMap<&'static str, bool>,
    category_scores: BTreeMap<&'static str, f64>,
    category_applied_input_types: BTreeMap<&'static str, [&'static str; 1]>,
}

impl ModerationResult {
    fn of(text: &str) -> Self {
        let flagged = text.contains(FLAG_MARKER);
        let hit = |category: &str| flagged && category == FLAGGED_CATEGORY;
        Self {
            flagged,
            categories: CATEGORIES.iter().map(|&c| (c, hit(c))).collect(),
            category_scores: CATEGORIES.iter().map(|&c| (c, if hit(c) { 0.98 } else { 0.0001 })).collect(),
            category_applied_input_types: CATEGORIES.iter().map(|&c| (c, ["text"])).collect(),
        }
    }
}

/// The texts to moderate: one per string, or one for a list of multimodal parts.
fn input_texts(input: &Value) -> Result<Vec<String>, String> {
    match input {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) if items.is_empty() => Err("`input` must not be empty".to_owned()),
        Value::Array(items) if items.iter().all(Value::is_string) => {
            Ok(items.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        }
        Value::Array(_) => Ok(vec![content_text(input)]),
        _ => Err("`input` must be a string, a list of strings or a list of input parts".to_owned()),
    }
}

/// Renders the moderation object for the raw request `body` (request number `n`), or says
/// why the request is invalid.
pub fn moderation(body: &[u8], n: u64) -> Result<Vec<u8>, String> {
    let req: ModerationRequest = parse(body)?;
    let input = req.input.ok_or("missing required field `input`")?;
    let results = input_texts(&input)?.iter().map(|t| ModerationResult::of(t)).collect();
    Ok(render(&ModerationObject {
        id: format!("modr-{n}"),
        model: req.model.as_deref().unwrap_or(DEFAULT_MODEL),
        results,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn one_result_per_input_with_every_category() {
        let body = format!(r#"{{"input":["a calm text","a {FLAG_MARKER} text"]}}"#);
        let v = json(&moderation(body.as_bytes(), 3).unwrap());
        assert_eq!(v["id"], "modr-3");
        assert_eq!(v["model"], DEFAULT_MODEL);
        let results = v["results"].as_array().unwrap();
        assert_eq!(results.len(), 2);
        assert_eq!(results[0]["flagged"], false);
        assert_eq!(results[1]["flagged"], true);
        assert_eq!(results[1]["categories"]["violence"], true);
        assert_eq!(results[1]["categories"]["hate"], false);
        for key in ["categories", "category_scores", "category_applied_input_types"] {
            assert_eq!(results[0][key].as_object().unwrap().len(), CATEGORIES.len(), "{key}");
        }
        assert_eq!(results[0]["category_applied_input_types"]["self-harm"], serde_json::json!(["text"]));
    }

    #[test]
    fn a_string_or_parts_is_one_result() {
        let v = json(&moderation(br#"{"model":"m","input":"hi"}"#, 1).unwrap());
        assert_eq!((v["model"].as_str(), v["results"].as_array().unwrap().len()), (Some("m"), 1));
        let parts = br#"{"input":[{"type":"text","text":"a mock-flag"},{"type":"image_url","image_url":{"url":"x"}}]}"#;
        let v = json(&moderation(parts, 1).unwrap());
        assert_eq!(v["results"].as_array().unwrap().len(), 1);
        assert_eq!(v["results"][0]["flagged"], true);
    }

    #[test]
    fn invalid_requests_say_why() {
        assert!(moderation(br#"{"model":"m"}"#, 1).unwrap_err().contains("input"));
        assert!(moderation(br#"{"input":[]}"#, 1).unwrap_err().contains("empty"));
        assert!(moderation(br#"{"input":{}}"#, 1).is_err());
    }
}
