//! Gemini's Batch API (Google's Generative Language API, `v1beta`), inline requests only:
//! `POST /v1beta/models/{model}:batchGenerateContent` with
//! `{"batch": {"displayName": <chunk tag>, "inputConfig": {"requests": {"requests":
//! [{"request": GenerateContentRequest, "metadata": {"key": <custom id>}}]}}}}` (each item's
//! OpenAI body translated by [`fleet::gemini::translate_request`]), which answers a
//! long-running operation named `batches/{id}`; poll `GET /v1beta/batches/{id}` (the
//! operation: `metadata` is the `GenerateContentBatch`, with `displayName`, `state` and, once
//! ended, `output.inlinedResponses.inlinedResponses[]`); cancel with
//! `POST /v1beta/batches/{id}:cancel`; delete with `DELETE /v1beta/batches/{id}` once the
//! chunk's results are out (the batch holds the responses: nothing else is left).
//!
//! | Gemini `state` (`BATCH_STATE_*`, the SDKs' `JOB_STATE_*`) | here                      |
//! |-----------------------------------------------------------|---------------------------|
//! | `PENDING`, `RUNNING`                                      | poll again                |
//! | `SUCCEEDED`                                               | read the inline responses |
//! | `FAILED` (or an operation `done` with an `error`)         | every request failed with the provider's reason |
//! | `CANCELLED`                                               | read what ran; the rest cancelled |
//! | `EXPIRED`                                                 | read what ran; the rest expired |
//!
//! Never billed twice: the batch's `displayName` is the chunk's tag, and a worker that may
//! have created the chunk's batch before (a redelivery) lists the batches
//! (`GET /v1beta/batches`) and adopts the one with that name (a `FAILED` one is never
//! adopted) before creating anything. A poll checks the batch is the chunk's by its name.
//!
//! Responses map back to items by their `metadata.key` (the request's provider custom id,
//! see [`provider_custom_id`]) when the provider echoes it, else by position (Google
//! documents that inline responses come in the order of the requests), which is used only
//! when there are exactly as many responses as requests. A response is translated back
//! into an OpenAI chat completion ([`fleet::gemini::translate_response`]); an `error`
//! (a `google.rpc.Status`) fails its item with the provider's message.
//!
//! Inline requests are limited to 20 MB per batch (Google's documented limit); the Files API
//! upload is not used, so the kind's chunk limits (`fleet::config::ProviderKind::batch_limits`)
//! keep a chunk well under it, and a create body that would pass it anyway is refused here
//! before it is sent. Only chat completion lines run in a Gemini batch, and all of one
//! batch's requests go to one model (the model is in the create's path): a line with another
//! endpoint or another model than its chunk's first fails `not_batchable` (see [`unbatchable`]).

use std::collections::{BTreeMap, HashMap};
use std::time::{SystemTime, UNIX_EPOCH};

use fleet::batch::{check_provider_id, ChunkTask};
use fleet::endpoint::Endpoint;
use fleet::gemini::{Method as GeminiMethod, Request};
use fleet::wire::{ErrorRecord, Item, ResponseRecord};
use reqwest::Method;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::api::{
    bounded, custom_id_prefix, index_of, provider_custom_id, ApiError, Created, Ending, Fetched, Http, LineOutcome,
    Polled, TRANSFER_TIMEOUT,
};

/// Google's documented limit of a batch created with inline requests.
pub const MAX_INLINE_BYTES: usize = 20 * 1_000_000;
/// Largest batch operation read (it holds every inline response once the batch has ended).
const MAX_BATCH_BYTES: usize = 512 << 20;
/// Pages of `GET /v1beta/batches` read when looking for a chunk's batch (100 a page).
const FIND_PAGES: usize = 5;
/// The prefix of a batch's resource name.
const NAME_PREFIX: &str = "batches/";

/// Gemini's batch API: the requests go inline, and the batch holds the responses.
pub struct Gemini<'a> {
    /// Calls to the provider, timed and classified.
    pub http: Http<'a>,
    /// The fleet's namespace, part of each chunk's tag.
    pub namespace: &'a str,
}

/// A long-running operation of the batch API (`batches/{id}`).
#[derive(Deserialize)]
struct Operation<'a> {
    #[serde(default)]
    name: String,
    #[serde(default, borrow)]
    metadata: Option<BatchMeta<'a>>,
    #[serde(default)]
    error: Option<Status>,
    /// Some answers carry the output here (`GenerateContentBatchOutput`) as well.
    #[serde(default, borrow)]
    response: Option<Output<'a>>,
}

/// `GenerateContentBatch`.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct BatchMeta<'a> {
    #[serde(default)]
    display_name: Option<String>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default, borrow)]
    output: Option<Output<'a>>,
}

/// `GenerateContentBatchOutput`.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Output<'a> {
    #[serde(default, borrow)]
    inlined_responses: Option<InlinedResponses<'a>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct InlinedResponses<'a> {
    #[serde(default, borrow)]
    inlined_responses: Vec<InlinedResponse<'a>>,
}

/// One inline response: a `GenerateContentResponse` or an error, and the request's metadata.
#[derive(Deserialize)]
struct InlinedResponse<'a> {
    #[serde(default, borrow)]
    response: Option<&'a RawValue>,
    #[serde(default)]
    error: Option<Status>,
    #[serde(default)]
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

/// `google.rpc.Status`.
#[derive(Deserialize, Clone)]
struct Status {
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    status: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListPage<'a> {
    #[serde(default, borrow)]
    operations: Vec<Operation<'a>>,
    #[serde(default)]
    next_page_token: Option<String>,
}

/// The id of a batch resource name (`batches/{id}`), if it is a plain one.
fn id_of(name: &str) -> Option<&str> {
    name.strip_prefix(NAME_PREFIX).filter(|id| check_provider_id(id).is_ok())
}

/// The state word without its prefix (`BATCH_STATE_` in the REST API, `JOB_STATE_` in the
/// SDKs), as a bounded metric label, and the batch's ending if it has ended.
fn state_of(state: Option<&str>, error: Option<&Status>) -> (&'static str, Option<Ending>) {
    let word = state.map(|s| s.trim_start_matches("BATCH_STATE_").trim_start_matches("JOB_STATE_"));
    let failed = |reason: Option<&Status>| Ending::Rejected {
        lines: Vec::new(),
        reason: bounded(
            reason.and_then(|s| s.message.as_deref()).unwrap_or("the provider failed the batch (JOB_STATE_FAILED)"),
            500,
        ),
    };
    match word {
        Some("PENDING") => ("pending", None),
        Some("RUNNING") => ("running", None),
        Some("SUCCEEDED") => ("succeeded", Some(Ending::Completed)),
        Some("FAILED") => ("failed", Some(failed(error))),
        Some("CANCELLED") => ("cancelled", Some(Ending::Cancelled)),
        Some("EXPIRED") => ("expired", Some(Ending::Expired)),
        // An operation that is done with an error and no known state: failed.
        _ if error.is_some() => ("failed", Some(failed(error))),
        _ => ("unknown", None),
    }
}

/// Why items of a chunk cannot go in its Gemini batch: a Gemini batch takes
/// `generateContent` requests of one model (see the module header). `already` holds the
/// items refused for other reasons (they are skipped); the model of the first remaining
/// translatable item is the batch's.
pub fn unbatchable(items: &BTreeMap<u64, Item>, already: &HashMap<u64, String>) -> HashMap<u64, String> {
    let mut model: Option<String> = None;
    let mut refused = HashMap::new();
    for item in items.values().filter(|i| !already.contains_key(&i.index)) {
        let reason = match Endpoint::from_path(&item.url) {
            Some(Endpoint::ChatCompletions) => match fleet::gemini::translate_request(Endpoint::ChatCompletions, item.body.get()) {
                Ok(r) if model.get_or_insert_with(|| r.model.clone()) == &r.model => None,
                Ok(r) => Some(format!(
                    "a Gemini batch holds one model: {:?} is not this chunk's {:?} (run this line online, or submit one model per job)",
                    bounded(&r.model, 64),
                    model.as_deref().unwrap_or_default()
                )),
                Err(e) => Some(format!("the request cannot be translated to Gemini: {e}")),
            },
            _ => Some(format!("{:?} lines do not run in a Gemini batch (chat completions only); run them online", bounded(&item.url, 64))),
        };
        if let Some(reason) = reason {
            refused.insert(item.index, reason);
        }
    }
    refused
}

impl Gemini<'_> {
    fn prefix(&self, chunk: &ChunkTask) -> String {
        custom_id_prefix(self.namespace, chunk)
    }

    /// The batch whose `displayName` is the chunk's tag among the newest, if one did not fail.
    pub async fn find(&self, chunk: &ChunkTask) -> Result<Option<Created>, ApiError> {
        let tag = chunk.tag(self.namespace);
        let mut token: Option<String> = None;
        for _ in 0..FIND_PAGES {
            let mut req = self.http.request(Method::GET, "/v1beta/batches").query(&[("pageSize", "100")]);
            if let Some(t) = &token {
                req = req.query(&[("pageToken", t.as_str())]);
            }
            let bytes = self.read(req, "find").await?;
            let page: ListPage = parse(&bytes, "find")?;
            for op in &page.operations {
                let Some(meta) = &op.metadata else { continue };
                let (status, _) = state_of(meta.state.as_deref(), op.error.as_ref());
                // A failed batch ran nothing: adopting it would end the chunk with nothing done.
                if meta.display_name.as_deref() == Some(tag.as_str()) && status != "failed" {
                    if let Some(id) = id_of(&op.name) {
                        return Ok(Some(Created { batch_id: id.to_string(), input_file_id: None }));
                    }
                }
            }
            match page.next_page_token.filter(|t| !t.is_empty()) {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        Ok(None)
    }

    /// Creates a batch of the items inline, named after the chunk's tag.
    pub async fn create(&self, chunk: &ChunkTask, items: &[Item]) -> Result<Created, ApiError> {
        let prefix = self.prefix(chunk);
        let mut model: Option<String> = None;
        let mut requests = Vec::with_capacity(items.len());
        for item in items {
            let Request { model: m, method, body } =
                fleet::gemini::translate_request(Endpoint::ChatCompletions, item.body.get()).map_err(|e| {
                    ApiError::Refused {
                        status: 400,
                        message: format!("item {}: cannot be translated to Gemini: {e}", item.index),
                    }
                })?;
            if method != GeminiMethod::GenerateContent || model.get_or_insert_with(|| m.clone()) != &m {
                return Err(ApiError::Refused {
                    status: 400,
                    message: format!("item {}: not a generateContent request of the batch's model", item.index),
                });
            }
            requests.push(serde_json::json!({
                "request": body,
                "metadata": { "key": provider_custom_id(&prefix, item.index) },
            }));
        }
        let Some(model) = model else {
            return Err(ApiError::Refused { status: 400, message: "the chunk has no request to batch".into() });
        };
        let create = serde_json::json!({
            "batch": {
                "displayName": chunk.tag(self.namespace),
                "inputConfig": { "requests": { "requests": requests } },
            }
        });
        let body = serde_json::to_vec(&create).expect("requests serialize");
        if body.len() > MAX_INLINE_BYTES {
            return Err(ApiError::Refused {
                status: 413,
                message: format!(
                    "the chunk's Gemini batch would be {} bytes, over the {MAX_INLINE_BYTES} bytes of inline requests \
                     Gemini takes: lower providers.<p>.batch_max_bytes",
                    body.len()
                ),
            });
        }
        let req = self
            .http
            .request(Method::POST, &format!("/v1beta/models/{model}:batchGenerateContent"))
            .header("content-type", "application/json")
            .timeout(TRANSFER_TIMEOUT)
            .body(body);
        let bytes = self.http.send(req, "create").await?;
        let op: Operation = parse(&bytes, "create")?;
        let id = id_of(&op.name).ok_or_else(|| ApiError::Transient("create: the batch name is not plain".into()))?;
        Ok(Created { batch_id: id.to_string(), input_file_id: None })
    }

    /// Retrieves the batch operation's state and `displayName`.
    pub async fn poll(&self, batch_id: &str) -> Result<Polled, ApiError> {
        let req = self.http.request(Method::GET, &format!("/v1beta/batches/{batch_id}"));
        let bytes = self.read(req, "retrieve").await?;
        let op: Operation = parse(&bytes, "retrieve")?;
        let meta = op.metadata.unwrap_or_default();
        let (status, ending) = state_of(meta.state.as_deref(), op.error.as_ref());
        Ok(Polled {
            status,
            // The batch itself holds the responses: it is what `clean_up` deletes.
            output_file_id: ending.as_ref().map(|_| batch_id.to_string()),
            ending,
            error_file_id: None,
            input_file_id: None,
            tag: meta.display_name,
        })
    }

    /// Asks Gemini to cancel the batch.
    pub async fn cancel(&self, batch_id: &str) -> Result<(), ApiError> {
        let req = self.http.request(Method::POST, &format!("/v1beta/batches/{batch_id}:cancel"));
        self.http.send(req, "cancel").await.map(|_| ())
    }

    /// Reads the ended batch's inline responses; `order` lists the indices of the items put
    /// in the batch, in request order (for responses that do not echo their key).
    pub async fn fetch(
        &self,
        chunk: &ChunkTask,
        batch_id: &str,
        order: &[u64],
        each: &mut (dyn FnMut(Fetched) + Send),
    ) -> Result<(), ApiError> {
        let req = self.http.request(Method::GET, &format!("/v1beta/batches/{batch_id}")).timeout(TRANSFER_TIMEOUT);
        let started = std::time::Instant::now();
        let bytes = self.read(req, "results").await;
        self.http.observe("results", started);
        let bytes = bytes?;
        let op: Operation = parse(&bytes, "results")?;
        let model = op.metadata.as_ref().and_then(|m| m.model.clone()).unwrap_or_default();
        let model = model.strip_prefix("models/").unwrap_or(&model).to_string();
        let output = op.metadata.and_then(|m| m.output).or(op.response).unwrap_or_default();
        let responses = output.inlined_responses.unwrap_or_default().inlined_responses;
        for f in map_responses(chunk, &self.prefix(chunk), &model, order, &responses) {
            each(f);
        }
        Ok(())
    }

    /// Deletes the ended batch (`polled.output_file_id` names it). Best effort.
    pub async fn clean_up(&self, polled: &Polled) {
        let Some(id) = polled.output_file_id.as_deref().filter(|id| check_provider_id(id).is_ok()) else { return };
        let req = self.http.request(Method::DELETE, &format!("/v1beta/batches/{id}"));
        if let Err(e) = self.http.send(req, "delete").await {
            tracing::info!(batch_id = %id, error = %e, "cannot delete the Gemini batch; it stays at the provider");
        }
    }

    /// Sends `req` and reads a 2xx body of at most [`MAX_BATCH_BYTES`] (an ended batch holds
    /// every response).
    async fn read(&self, req: reqwest::RequestBuilder, op: &str) -> Result<bytes::Bytes, ApiError> {
        let resp = self.http.response(req, op).await?;
        match crate::provider::read_capped(resp, MAX_BATCH_BYTES).await {
            Ok(Some(b)) => Ok(b),
            Ok(None) => {
                let e = ApiError::Transient(format!("{op}: answer over {MAX_BATCH_BYTES} bytes"));
                self.http.count_error(&e, op);
                Err(e)
            }
            Err(e) => {
                let e = ApiError::Transient(format!("{op}: {}", e.without_url()));
                self.http.count_error(&e, op);
                Err(e)
            }
        }
    }
}

fn parse<'a, T: Deserialize<'a>>(bytes: &'a [u8], op: &str) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::Transient(format!("{op}: the provider's answer is not the expected JSON: {e}")))
}

/// The inline responses as results of the chunk's items: by `metadata.key` when a response
/// has one (only keys of this chunk count), else by position when every request has its
/// response.
fn map_responses(
    chunk: &ChunkTask,
    prefix: &str,
    model: &str,
    order: &[u64],
    responses: &[InlinedResponse<'_>],
) -> Vec<Fetched> {
    let by_position = responses.len() == order.len();
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let request =
        Request { model: model.to_string(), method: GeminiMethod::GenerateContent, body: serde_json::Value::Null };
    let mut out = Vec::with_capacity(responses.len());
    for (position, r) in responses.iter().enumerate() {
        let key = r.metadata.as_ref().and_then(|m| m.get("key")).and_then(|k| k.as_str());
        let index = match key {
            Some(key) => index_of(prefix, key, chunk),
            None if by_position => order.get(position).copied(),
            None => None,
        };
        let Some(index) = index else { continue };
        let outcome = match (r.response, &r.error) {
            (_, Some(e)) => LineOutcome::Errored(ErrorRecord {
                code: bounded(e.status.as_deref().unwrap_or("gemini_error"), 64),
                message: bounded(e.message.as_deref().unwrap_or("failed in the Gemini batch"), 500),
            }),
            (Some(body), None) => {
                let fallback_id = format!("gemini-batch-{index}");
                match fleet::gemini::translate_response(&request, body.get(), created, &fallback_id)
                    .and_then(|v| serde_json::value::to_raw_value(&v).map_err(|e| e.to_string()))
                {
                    Ok(body) => {
                        LineOutcome::Answered(ResponseRecord { status_code: 200, request_id: String::new(), body })
                    }
                    Err(e) => LineOutcome::Errored(ErrorRecord {
                        code: "invalid_response".into(),
                        message: bounded(&format!("not a Gemini answer: {e}"), 500),
                    }),
                }
            }
            (None, None) => continue,
        };
        out.push(Fetched { index, outcome });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk() -> ChunkTask {
        serde_json::from_value(serde_json::json!({
            "job_id": "j", "provider": "p", "chunk": 0, "start": 0, "end": 4, "total": 4,
            "submitted_at_ms": 0, "state": "pending"
        }))
        .unwrap()
    }

    const OK: &str = r#"{"candidates":[{"content":{"parts":[{"text":"yo"}]},"finishReason":"STOP"}],
        "usageMetadata":{"promptTokenCount":7,"candidatesTokenCount":2}}"#;

    #[test]
    fn states_map_to_endings_with_either_prefix() {
        assert_eq!(state_of(Some("BATCH_STATE_PENDING"), None), ("pending", None));
        assert_eq!(state_of(Some("JOB_STATE_RUNNING"), None), ("running", None));
        assert_eq!(state_of(Some("BATCH_STATE_SUCCEEDED"), None), ("succeeded", Some(Ending::Completed)));
        assert_eq!(state_of(Some("JOB_STATE_CANCELLED"), None), ("cancelled", Some(Ending::Cancelled)));
        assert_eq!(state_of(Some("BATCH_STATE_EXPIRED"), None), ("expired", Some(Ending::Expired)));
        let err = Status { message: Some("bad batch".into()), status: None };
        match state_of(Some("BATCH_STATE_FAILED"), Some(&err)) {
            ("failed", Some(Ending::Rejected { reason, .. })) => assert_eq!(reason, "bad batch"),
            other => panic!("{other:?}"),
        }
        assert_eq!(state_of(Some("SOMETHING_NEW"), None), ("unknown", None));
        assert!(matches!(state_of(None, Some(&err)), ("failed", Some(Ending::Rejected { .. }))));
    }

    #[test]
    fn responses_map_by_key_else_by_position() {
        let c = chunk();
        let p = "tabc-";
        let body = format!(
            r#"[{{"response":{OK},"metadata":{{"key":"tabc-i3"}}}},
                {{"error":{{"code":400,"message":"bad","status":"INVALID_ARGUMENT"}},"metadata":{{"key":"tabc-i1"}}}},
                {{"response":{OK},"metadata":{{"key":"tzzz-i2"}}}}]"#
        );
        let rs: Vec<InlinedResponse> = serde_json::from_str(&body).unwrap();
        let got = map_responses(&c, p, "gemini-2.0-flash", &[1, 2, 3], &rs);
        assert_eq!(got.len(), 2, "another chunk's key is not ours");
        match &got[0] {
            Fetched { index: 3, outcome: LineOutcome::Answered(r) } => {
                let v: serde_json::Value = serde_json::from_str(r.body.get()).unwrap();
                assert_eq!(v["object"], "chat.completion");
                assert_eq!(v["usage"]["prompt_tokens"], 7);
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(&got[1], Fetched { index: 1, outcome: LineOutcome::Errored(e) } if e.code == "INVALID_ARGUMENT" && e.message == "bad")
        );

        // No keys: by position, only when every request has its response.
        let body = format!(r#"[{{"response":{OK}}},{{"response":{OK}}}]"#);
        let rs: Vec<InlinedResponse> = serde_json::from_str(&body).unwrap();
        let got = map_responses(&c, p, "m", &[0, 2], &rs);
        assert_eq!(got.iter().map(|f| f.index).collect::<Vec<_>>(), vec![0, 2]);
        assert!(map_responses(&c, p, "m", &[0, 2, 3], &rs).is_empty(), "a short list cannot be placed");
    }

    #[test]
    fn only_chat_lines_of_one_model_are_batchable() {
        let item = |index: u64, url: &str, model: &str| -> Item {
            serde_json::from_value(serde_json::json!({
                "job_id": "j", "index": index, "total": 4, "custom_id": format!("c{index}"), "provider": "p",
                "url": url, "submitted_at_ms": 0,
                "body": {"model": model, "messages": [{"role": "user", "content": "hi"}]},
            }))
            .unwrap()
        };
        let items: BTreeMap<u64, Item> = [
            item(0, "/v1/chat/completions", "a"),
            item(1, "/v1/chat/completions", "b"),
            item(2, "/v1/embeddings", "a"),
            item(3, "/v1/chat/completions", "a"),
        ]
        .into_iter()
        .map(|i| (i.index, i))
        .collect();
        let refused = unbatchable(&items, &HashMap::new());
        assert_eq!(refused.keys().copied().collect::<std::collections::BTreeSet<_>>(), [1, 2].into());
        assert!(refused[&1].contains("one model"), "{}", refused[&1]);
        let already = HashMap::from([(0, "x".to_string())]);
        let refused = unbatchable(&items, &already);
        assert!(refused.contains_key(&3) && !refused.contains_key(&1), "the first batchable item sets the model");
    }

    #[test]
    fn only_plain_batch_names_are_used() {
        assert_eq!(id_of("batches/abc-123"), Some("abc-123"));
        for bad in ["abc", "batches/", "batches/a/../b", "operations/x", "batches/a?b"] {
            assert_eq!(id_of(bad), None, "{bad}");
        }
    }
}
