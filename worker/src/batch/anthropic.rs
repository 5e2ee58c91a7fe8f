//! Anthropic's Message Batches API: `POST /v1/messages/batches` with
//! `requests[{custom_id, params}]`, poll `GET /v1/messages/batches/{id}` until
//! `processing_status` is `ended`, read `GET /v1/messages/batches/{id}/results` (the
//! documented path; the `results_url` the provider returns is never called, so the key
//! cannot be sent elsewhere), cancel with `POST /v1/messages/batches/{id}/cancel`.
//!
//! Result types map as: `succeeded` → the message as a 200 answer; `errored` → failed with
//! the provider's error; `canceled` → cancelled; `expired` → expired.
//!
//! Anthropic batches carry no metadata, so the chunk's tag travels in every request's
//! `custom_id` (`t<hash of the tag>-i<index>`, see [`custom_id_prefix`]). A worker looking for a chunk's batch lists
//! the batches, takes those with the chunk's request count, and confirms one is ours by
//! the custom ids of its results, which exist only once it has ended: while a candidate
//! is still processing, the chunk waits (a later poll looks again) rather than risk
//! paying twice.

use fleet::batch::{check_provider_id, ChunkTask};
use fleet::wire::{ErrorRecord, Item, ResponseRecord};
use reqwest::Method;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::api::{
    bounded, custom_id_prefix, for_each_line, index_of, provider_custom_id, ApiError, Created, Ending, Fetched, Http,
    LineOutcome, Polled, TRANSFER_TIMEOUT,
};

/// Pages of `GET /v1/messages/batches` read when looking for a chunk's batch.
const FIND_PAGES: usize = 5;

/// Anthropic's Message Batches API: the requests go inline in the create call.
pub struct Anthropic<'a> {
    /// Calls to the provider, timed and classified.
    pub http: Http<'a>,
    /// The fleet's namespace, part of each chunk's tag.
    pub namespace: &'a str,
}

#[derive(Deserialize)]
struct BatchObject {
    id: String,
    processing_status: String,
    #[serde(default)]
    request_counts: RequestCounts,
    #[serde(default)]
    cancel_initiated_at: Option<serde_json::Value>,
}

#[derive(Deserialize, Default)]
struct RequestCounts {
    #[serde(default)]
    processing: u64,
    #[serde(default)]
    succeeded: u64,
    #[serde(default)]
    errored: u64,
    #[serde(default)]
    canceled: u64,
    #[serde(default)]
    expired: u64,
}

impl RequestCounts {
    fn total(&self) -> u64 {
        self.processing
            .saturating_add(self.succeeded)
            .saturating_add(self.errored)
            .saturating_add(self.canceled)
            .saturating_add(self.expired)
    }
}

#[derive(Deserialize)]
struct BatchList {
    data: Vec<BatchObject>,
    #[serde(default)]
    has_more: bool,
    #[serde(default)]
    last_id: Option<String>,
}

#[derive(Deserialize)]
struct ResultLine {
    custom_id: String,
    result: ResultBody,
}

/// `result` of a results line. A plain struct, not a tagged enum: serde buffers a tagged
/// enum's content, and a raw `message` cannot be borrowed from that buffer.
#[derive(Deserialize)]
struct ResultBody {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    message: Option<Box<RawValue>>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

impl Anthropic<'_> {
    fn prefix(&self, chunk: &ChunkTask) -> String {
        custom_id_prefix(self.namespace, chunk)
    }

    /// The ended batch whose results carry the chunk's custom-id prefix; a transient error
    /// while a batch of the chunk's size is still processing (it may be the chunk's).
    pub async fn find(&self, chunk: &ChunkTask) -> Result<Option<Created>, ApiError> {
        let prefix = self.prefix(chunk);
        let mut after: Option<String> = None;
        let mut unconfirmed = 0;
        for _ in 0..FIND_PAGES {
            let mut req = self.http.request(Method::GET, "/v1/messages/batches").query(&[("limit", "100")]);
            if let Some(a) = &after {
                req = req.query(&[("after_id", a.as_str())]);
            }
            let page: BatchList = self.http.json(req, "find").await?;
            for b in page.data.iter().filter(|b| b.request_counts.total() == chunk.len()) {
                if check_provider_id(&b.id).is_err() {
                    continue;
                }
                if b.processing_status != "ended" {
                    unconfirmed += 1;
                    continue;
                }
                if self.first_custom_id(&b.id).await?.is_some_and(|id| id.starts_with(&prefix)) {
                    return Ok(Some(Created { batch_id: b.id.clone(), input_file_id: None }));
                }
            }
            match page.last_id.filter(|_| page.has_more) {
                Some(last) => after = Some(last),
                None => break,
            }
        }
        if unconfirmed > 0 {
            return Err(ApiError::Transient(format!(
                "{unconfirmed} batch(es) of this chunk's size are still processing; one may be this chunk's, \
                 so nothing is created until they end"
            )));
        }
        Ok(None)
    }

    /// The custom id of the first result line of an ended batch.
    async fn first_custom_id(&self, batch_id: &str) -> Result<Option<String>, ApiError> {
        let req = self
            .http
            .request(Method::GET, &format!("/v1/messages/batches/{batch_id}/results"))
            .timeout(TRANSFER_TIMEOUT);
        let mut resp = self.http.response(req, "find").await?;
        let mut head = Vec::new();
        // Only the first line is needed: read until its end, at most 1 MiB.
        while let Some(chunk) = resp.chunk().await.map_err(|e| ApiError::Transient(e.without_url().to_string()))? {
            head.extend_from_slice(&chunk);
            if head.contains(&b'\n') || head.len() > 1 << 20 {
                break;
            }
        }
        let first = head.split(|b| *b == b'\n').next().unwrap_or_default();
        #[derive(Deserialize)]
        struct Id {
            custom_id: String,
        }
        Ok(serde_json::from_slice::<Id>(first).ok().map(|i| i.custom_id))
    }

    /// Creates a batch of the items, each custom id made of the chunk's prefix and the item's index.
    pub async fn create(&self, chunk: &ChunkTask, items: &[Item]) -> Result<Created, ApiError> {
        let prefix = self.prefix(chunk);
        let mut body = Vec::with_capacity(items.iter().map(|i| i.body.get().len() + 64).sum::<usize>() + 32);
        body.extend_from_slice(b"{\"requests\":[");
        for (n, item) in items.iter().enumerate() {
            if n > 0 {
                body.push(b',');
            }
            let request = serde_json::json!({
                "custom_id": provider_custom_id(&prefix, item.index),
                "params": item.body,
            });
            serde_json::to_writer(&mut body, &request).expect("requests serialize");
        }
        body.extend_from_slice(b"]}");
        let req = self
            .http
            .request(Method::POST, "/v1/messages/batches")
            .header("content-type", "application/json")
            .timeout(TRANSFER_TIMEOUT)
            .body(body);
        let b: BatchObject = self.http.json(req, "create").await?;
        check_provider_id(&b.id).map_err(|_| ApiError::Transient("create: the batch id is not plain".into()))?;
        Ok(Created { batch_id: b.id, input_file_id: None })
    }

    /// Retrieves the batch's processing status, and how it ended.
    pub async fn poll(&self, batch_id: &str) -> Result<Polled, ApiError> {
        let req = self.http.request(Method::GET, &format!("/v1/messages/batches/{batch_id}"));
        let b: BatchObject = self.http.json(req, "retrieve").await?;
        let (status, ending) = match b.processing_status.as_str() {
            "in_progress" => ("in_progress", None),
            "canceling" => ("canceling", None),
            // Each result line says how its request ended; this decides only for requests
            // that have no line.
            "ended" if b.cancel_initiated_at.as_ref().is_some_and(|v| !v.is_null()) => {
                ("ended", Some(Ending::Cancelled))
            }
            "ended" if b.request_counts.expired > 0 => ("ended", Some(Ending::Expired)),
            "ended" => ("ended", Some(Ending::Completed)),
            _ => ("unknown", None),
        };
        Ok(Polled { status, ending, output_file_id: None, error_file_id: None, input_file_id: None, tag: None })
    }

    /// Asks Anthropic to cancel the batch.
    pub async fn cancel(&self, batch_id: &str) -> Result<(), ApiError> {
        let req = self.http.request(Method::POST, &format!("/v1/messages/batches/{batch_id}/cancel"));
        self.http.send(req, "cancel").await.map(|_| ())
    }

    /// Reads the ended batch's results (from the documented path, never its `results_url`),
    /// calling `each` for the chunk's lines.
    pub async fn fetch(
        &self,
        chunk: &ChunkTask,
        batch_id: &str,
        each: &mut (dyn FnMut(Fetched) + Send),
    ) -> Result<(), ApiError> {
        let prefix = self.prefix(chunk);
        let req = self
            .http
            .request(Method::GET, &format!("/v1/messages/batches/{batch_id}/results"))
            .timeout(TRANSFER_TIMEOUT);
        let started = std::time::Instant::now();
        let resp = self.http.response(req, "results").await?;
        let read = for_each_line(resp, |line| {
            if let Some(f) = parse_line(chunk, &prefix, line) {
                each(f);
            }
        })
        .await;
        self.http.observe("results", started);
        read
    }
}

/// One results line as a result of an item of the chunk; `None` for a line not ours.
fn parse_line(chunk: &ChunkTask, prefix: &str, line: &[u8]) -> Option<Fetched> {
    let l: ResultLine = serde_json::from_slice(line).ok()?;
    let index = index_of(prefix, &l.custom_id, chunk)?;
    let outcome = match (l.result.kind.as_str(), l.result.message) {
        ("succeeded", Some(message)) => {
            LineOutcome::Answered(ResponseRecord { status_code: 200, request_id: String::new(), body: message })
        }
        ("errored", _) => {
            // `{"type": "error", "error": {"type": "invalid_request_error", "message": ...}}`
            let inner = l.result.error.as_ref().map(|e| &e["error"]);
            let code = inner.and_then(|e| e["type"].as_str()).unwrap_or("errored");
            let message = inner.and_then(|e| e["message"].as_str()).unwrap_or("errored in the provider batch");
            LineOutcome::Errored(ErrorRecord { code: bounded(code, 64), message: bounded(message, 500) })
        }
        ("canceled", _) => LineOutcome::Cancelled,
        ("expired", _) => LineOutcome::Expired,
        _ => return None,
    };
    Some(Fetched { index, outcome })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_types_map_to_outcomes() {
        let c: ChunkTask = serde_json::from_value(serde_json::json!({
            "job_id": "j", "provider": "p", "chunk": 0, "start": 0, "end": 4, "total": 4,
            "submitted_at_ms": 0, "state": "pending"
        }))
        .unwrap();
        let p = "tabc-";
        let line = |id: &str, result: &str| format!(r#"{{"custom_id":"{id}","result":{result}}}"#);
        let ok = line("tabc-i0", r#"{"type":"succeeded","message":{"id":"msg_1"}}"#);
        assert!(
            matches!(parse_line(&c, p, ok.as_bytes()), Some(Fetched { index: 0, outcome: LineOutcome::Answered(r) }) if r.status_code == 200)
        );
        let err = line(
            "tabc-i1",
            r#"{"type":"errored","error":{"type":"error","error":{"type":"invalid_request_error","message":"bad"}}}"#,
        );
        assert!(
            matches!(parse_line(&c, p, err.as_bytes()), Some(Fetched { index: 1, outcome: LineOutcome::Errored(e) }) if e.code == "invalid_request_error" && e.message == "bad")
        );
        let can = line("tabc-i2", r#"{"type":"canceled"}"#);
        assert!(matches!(parse_line(&c, p, can.as_bytes()), Some(Fetched { outcome: LineOutcome::Cancelled, .. })));
        let exp = line("tabc-i3", r#"{"type":"expired"}"#);
        assert!(matches!(parse_line(&c, p, exp.as_bytes()), Some(Fetched { outcome: LineOutcome::Expired, .. })));
        let other = line("tzzz-i3", r#"{"type":"expired"}"#);
        assert!(parse_line(&c, p, other.as_bytes()).is_none(), "another chunk's line");
    }
}
