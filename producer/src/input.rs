//! Owns the input formats users bring, each line read into the fleet's one request shape
//! ([`BatchInputLine`]):
//!
//! - an OpenAI Batch line, `{"custom_id", "method", "url", "body"}`, for a provider of any
//!   kind that serves its `url`;
//! - an Anthropic Message Batches request, `{"custom_id", "params"}`, for Anthropic-kind
//!   providers: it becomes a `POST /v1/messages` whose body is `params`.
//!
//! The two can be mixed in one file; a line with fields of both is refused.

use fleet::wire::BatchInputLine;
use serde::Deserialize;
use serde_json::value::RawValue;

/// The path an Anthropic Message Batches request is sent to.
const ANTHROPIC_MESSAGES: &str = "/v1/messages";

/// Which format a line was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `{"custom_id", "method", "url", "body"}`.
    OpenAiBatch,
    /// `{"custom_id", "params"}`.
    AnthropicBatch,
}

/// Why a line could not be read as a request.
#[derive(Debug)]
pub enum ParseError {
    /// Not JSON, or a field of the wrong type.
    Json(serde_json::Error),
    /// Valid JSON of the wrong shape; the message says what is wrong.
    Shape(String),
}

/// Every field of either format, so a missing or mixed one gets its own message.
#[derive(Deserialize)]
struct AnyLine {
    custom_id: Option<String>,
    method: Option<String>,
    url: Option<String>,
    body: Option<Box<RawValue>>,
    params: Option<Box<RawValue>>,
}

/// Reads one line in either format.
pub fn parse_line(raw: &[u8]) -> Result<(BatchInputLine, Format), ParseError> {
    let line: AnyLine = serde_json::from_slice(raw).map_err(ParseError::Json)?;
    let missing = |field: &str| ParseError::Shape(format!("missing field `{field}`"));
    let custom_id = line.custom_id.ok_or_else(|| missing("custom_id"))?;
    let openai_fields = line.method.is_some() || line.url.is_some() || line.body.is_some();
    match line.params {
        Some(_) if openai_fields => Err(ParseError::Shape(
            "the line has both `params` (Anthropic Message Batches) and `method`/`url`/`body` (OpenAI Batch); \
             keep one format"
                .to_owned(),
        )),
        Some(params) => Ok((
            BatchInputLine { custom_id, method: "POST".to_owned(), url: ANTHROPIC_MESSAGES.to_owned(), body: params },
            Format::AnthropicBatch,
        )),
        None => Ok((
            BatchInputLine {
                custom_id,
                method: line.method.ok_or_else(|| missing("method"))?,
                url: line.url.ok_or_else(|| missing("url"))?,
                body: line.body.ok_or_else(|| missing("body"))?,
            },
            Format::OpenAiBatch,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(raw: &str) -> String {
        match parse_line(raw.as_bytes()) {
            Err(ParseError::Shape(message)) => message,
            other => panic!("{raw}: expected a shape error, got {other:?}"),
        }
    }

    #[test]
    fn an_anthropic_request_becomes_a_messages_call() {
        let (line, format) = parse_line(br#"{"custom_id":"r1","params":{"max_tokens":5,"messages":[]}}"#).unwrap();
        assert_eq!(format, Format::AnthropicBatch);
        assert_eq!((line.custom_id.as_str(), line.method.as_str(), line.url.as_str()), ("r1", "POST", "/v1/messages"));
        assert_eq!(line.body.get(), r#"{"max_tokens":5,"messages":[]}"#);
    }

    #[test]
    fn an_openai_line_is_read_as_it_is() {
        let raw = br#"{"custom_id":"a","method":"POST","url":"/v1/responses","body":{"input":"x"}}"#;
        let (line, format) = parse_line(raw).unwrap();
        assert_eq!(format, Format::OpenAiBatch);
        assert_eq!((line.url.as_str(), line.body.get()), ("/v1/responses", r#"{"input":"x"}"#));
    }

    #[test]
    fn missing_and_mixed_fields_are_named() {
        assert_eq!(shape(r#"{"params":{}}"#), "missing field `custom_id`");
        assert_eq!(shape(r#"{"custom_id":"a","url":"/v1/chat/completions","body":{}}"#), "missing field `method`");
        assert_eq!(shape(r#"{"custom_id":"a","method":"POST","body":{}}"#), "missing field `url`");
        assert_eq!(shape(r#"{"custom_id":"a","method":"POST","url":"/v1/embeddings"}"#), "missing field `body`");
        assert!(shape(r#"{"custom_id":"a","params":{},"url":"/v1/messages"}"#).contains("keep one format"));
        assert!(matches!(parse_line(br#"{"custom_id":1,"params":{}}"#), Err(ParseError::Json(_))));
        assert!(matches!(parse_line(b"{nope"), Err(ParseError::Json(_))));
    }
}
