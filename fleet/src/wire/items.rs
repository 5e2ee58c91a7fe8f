//! Requests on their way in: the OpenAI Batch API input line the user writes
//! ([`BatchInputLine`]) and the [`Item`] the producer queues for each of its lines. Bodies
//! stay unparsed; [`asks_to_stream`] reads only a body's top-level `stream` flag, because
//! the fleet cannot collect a streamed answer.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::bounds::{check_job_id, check_position, Invalid, MAX_CUSTOM_ID_BYTES};

/// One line of an OpenAI Batch API input file.
#[derive(Debug, Deserialize)]
pub struct BatchInputLine {
    /// The user's name for the request, copied to its output line (the producer refuses an
    /// empty one and one over [`MAX_CUSTOM_ID_BYTES`]).
    pub custom_id: String,
    /// HTTP method; the producer accepts only `POST`.
    pub method: String,
    /// Path of the endpoint, e.g. `/v1/chat/completions`; the producer refuses one the
    /// provider's kind does not serve (see [`crate::endpoint`]).
    pub url: String,
    /// The request body (an Anthropic line's `params`): a JSON object, sent to the provider
    /// unchanged.
    pub body: Box<RawValue>,
}

/// One request of a job, as queued on its job's items queue `<ns>.items.<provider>.<job>`
/// (or the provider's shared `<ns>.items.<provider>`: `dead --requeue`, earlier producers).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(remote = "Self")]
pub struct Item {
    /// The job the item belongs to; also the routing key of its job's items queue and of
    /// its result.
    pub job_id: String,
    /// Position of the line in the input file, from 0: the dedup key within a job.
    pub index: u64,
    /// Number of items in the job, so whoever collects results knows when it has all.
    pub total: u64,
    /// The input line's `custom_id`, copied to the item's result; at most
    /// [`MAX_CUSTOM_ID_BYTES`].
    pub custom_id: String,
    /// Name of the provider to call (a key of the config's `providers`).
    pub provider: String,
    /// Path of the endpoint, e.g. `/v1/chat/completions`.
    pub url: String,
    /// The request body, sent to the provider unchanged.
    pub body: Box<RawValue>,
    /// Times this item went through a delay queue (long-outage retries).
    #[serde(default)]
    pub attempt: u32,
    /// When the job was submitted, ms since the Unix epoch: the same for every item of the
    /// job, kept when a submission is resumed.
    pub submitted_at_ms: u64,
    /// After this instant the item ends `expired` instead of being called.
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    /// When the item was first sent to a delay queue (the long-retry budget starts there).
    #[serde(default)]
    pub first_delay_ms: Option<u64>,
    /// A `--mode flex` item: called on the provider's flex tier (the worker adds
    /// `"service_tier": "flex"` to the body it sends, one call per delivery, with
    /// `flex_timeout_s`), its answer priced at the model's flex factor.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub flex: bool,
}
crate::versioned!(Item);

impl Item {
    /// Bounds a worker checks before trusting an item read from a queue (the endpoint is
    /// checked against the provider's kind separately, see [`crate::endpoint`]).
    pub fn check(&self) -> Result<(), Invalid> {
        check_job_id(&self.job_id)?;
        check_position(self.index, self.total)?;
        if self.custom_id.len() > MAX_CUSTOM_ID_BYTES {
            return Err(Invalid::CustomIdTooLong(self.custom_id.len()));
        }
        Ok(())
    }
}

/// Whether a request body asks for a streamed answer (`"stream": true` at its top level).
/// A streamed answer is a sequence of events, not the JSON document the output file needs.
/// A body that is not a JSON object does not ask (other checks refuse it).
pub fn asks_to_stream(body: &RawValue) -> bool {
    serde_json::from_str::<StreamFlag>(body.get()).is_ok_and(|f| f.0)
}

/// Reads only the top-level `stream` key of a body, skipping everything else without
/// building it; `true` if any `stream` key (JSON allows duplicates) is `true`, so no
/// parser's choice among duplicates can turn streaming on behind the check.
struct StreamFlag(bool);

impl<'de> Deserialize<'de> for StreamFlag {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = StreamFlag;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<StreamFlag, A::Error> {
                let mut streams = false;
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if key == "stream" {
                        streams |= map.next_value::<serde_json::Value>()? == serde_json::Value::Bool(true);
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                Ok(StreamFlag(streams))
            }
        }
        d.deserialize_map(Keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_round_trips_with_body_untouched() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hi \u00e9"}]}"#;
        let item = Item {
            job_id: "j".into(),
            index: 3,
            total: 10,
            custom_id: "c-3".into(),
            provider: "mock".into(),
            url: "/v1/chat/completions".into(),
            body: RawValue::from_string(body.into()).unwrap(),
            attempt: 0,
            submitted_at_ms: 1,
            deadline_ms: None,
            first_delay_ms: None,
            flex: false,
        };
        let bytes = serde_json::to_vec(&item).unwrap();
        let back: Item = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back.body.get(), body, "body bytes are passed through unchanged");
        assert_eq!(back.index, 3);
    }

    #[test]
    fn stream_requests_are_recognised() {
        let asks = |b: &str| asks_to_stream(&RawValue::from_string(b.into()).unwrap());
        assert!(asks(r#"{"model":"m","stream":true}"#));
        assert!(asks(r#"{"stream":false,"x":{"stream":false},"stream":true}"#), "any duplicate counts");
        assert!(!asks(r#"{"model":"m","stream":false}"#));
        assert!(!asks(r#"{"model":"m","x":{"stream":true}}"#), "only the top level");
        assert!(!asks(r#"{"stream":"true"}"#));
        assert!(!asks("[1]"));
    }
}
