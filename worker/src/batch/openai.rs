//! OpenAI's Batch API: upload the chunk as JSONL (`POST /v1/files`, purpose `batch`),
//! `POST /v1/batches` with metadata tagging the chunk, poll `GET /v1/batches/{id}`, read
//! `output_file_id` and `error_file_id` (`GET /v1/files/{id}/content`), cancel with
//! `POST /v1/batches/{id}/cancel`, delete the files (`DELETE /v1/files/{id}`).
//!
//! | OpenAI status                                   | here                               |
//! |-------------------------------------------------|------------------------------------|
//! | `validating`, `in_progress`, `finalizing`, `cancelling` | poll again                 |
//! | `completed`                                     | fetch both files                   |
//! | `failed`, `token_limit_exceeded` (queue full)   | the chunk waits, created again later |
//! | `failed` (validation)                           | each item failed with its reason   |
//! | `expired`                                       | fetch what ran; the rest expired   |
//! | `cancelled`                                     | fetch what ran; the rest cancelled |

use fleet::batch::{check_provider_id, ChunkTask};
use fleet::wire::{ErrorRecord, Item, ResponseRecord};
use reqwest::Method;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::api::{
    bounded, custom_id_prefix, for_each_line, index_of, provider_custom_id, ApiError, Created, Ending, Fetched, Http,
    LineOutcome, Polled, TRANSFER_TIMEOUT,
};

/// Pages of `GET /v1/batches` read when looking for a chunk's batch (100 batches a page,
/// newest first: a batch created moments before a crash is on the first page).
const FIND_PAGES: usize = 5;

/// OpenAI's Files and Batch API: the JSONL input is uploaded, then a batch made of it.
pub struct Openai<'a> {
    /// Calls to the provider, timed and classified.
    pub http: Http<'a>,
    /// The fleet's namespace, part of each chunk's tag.
    pub namespace: &'a str,
}

#[derive(Deserialize)]
struct FileObject {
    id: String,
}

#[derive(Deserialize)]
struct BatchObject {
    id: String,
    status: String,
    #[serde(default)]
    input_file_id: Option<String>,
    #[serde(default)]
    output_file_id: Option<String>,
    #[serde(default)]
    error_file_id: Option<String>,
    #[serde(default)]
    errors: Option<BatchErrors>,
    #[serde(default)]
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Deserialize)]
struct BatchErrors {
    #[serde(default)]
    data: Vec<BatchError>,
}

#[derive(Deserialize)]
struct BatchError {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    line: Option<u64>,
}

#[derive(Deserialize)]
struct BatchList {
    data: Vec<BatchObject>,
    #[serde(default)]
    has_more: bool,
    #[serde(default)]
    last_id: Option<String>,
}

/// One line of an output or error file.
#[derive(Deserialize)]
struct OutputLine {
    custom_id: String,
    #[serde(default)]
    response: Option<OutputResponse>,
    #[serde(default)]
    error: Option<OutputError>,
}

#[derive(Deserialize)]
struct OutputResponse {
    status_code: u16,
    #[serde(default)]
    request_id: Option<String>,
    body: Box<RawValue>,
}

#[derive(Deserialize)]
struct OutputError {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// The metadata key holding the chunk's tag.
const TAG_KEY: &str = "fleet_tag";
/// The metadata key holding the batch's estimated tokens (`fleet::tokens`), which admission
/// sums over the batches in progress.
const TOKENS_KEY: &str = "fleet_tokens";
/// The error code of a batch OpenAI failed for a full enqueued-token queue.
const TOKEN_LIMIT_EXCEEDED: &str = "token_limit_exceeded";
/// Statuses of a batch that holds its tokens in the enqueued-token queue.
const ENQUEUED: [&str; 4] = ["validating", "in_progress", "finalizing", "cancelling"];

impl Openai<'_> {
    /// The batch tagged with the chunk's tag (`metadata.fleet_tag`) among the newest, if one did not fail.
    pub async fn find(&self, chunk: &ChunkTask) -> Result<Option<Created>, ApiError> {
        let tag = chunk.tag(self.namespace);
        let mut after: Option<String> = None;
        for _ in 0..FIND_PAGES {
            let mut req = self.http.request(Method::GET, "/v1/batches").query(&[("limit", "100")]);
            if let Some(a) = &after {
                req = req.query(&[("after", a.as_str())]);
            }
            let page: BatchList = self.http.json(req, "find").await?;
            for b in &page.data {
                let ours = b.metadata.as_ref().and_then(|m| m.get(TAG_KEY)).and_then(|v| v.as_str()) == Some(&tag);
                // A failed batch ran nothing: adopting it would end the chunk with nothing
                // done (a `token_limit_exceeded` one in particular must be created again).
                if ours && b.status != "failed" && check_provider_id(&b.id).is_ok() {
                    let input_file_id = b.input_file_id.clone().filter(|f| check_provider_id(f).is_ok());
                    return Ok(Some(Created { batch_id: b.id.clone(), input_file_id }));
                }
            }
            match page.last_id.filter(|_| page.has_more) {
                Some(last) => after = Some(last),
                None => break,
            }
        }
        Ok(None)
    }

    /// See [`super::api::BatchApi::enqueued_tokens`]: the `fleet_tokens` of the batches in
    /// progress among the newest [`FIND_PAGES`] pages (a batch in progress is recent: the
    /// window is 24 hours).
    pub async fn enqueued_tokens(&self) -> Result<u64, ApiError> {
        let mut after: Option<String> = None;
        let mut tokens = 0u64;
        for _ in 0..FIND_PAGES {
            let mut req = self.http.request(Method::GET, "/v1/batches").query(&[("limit", "100")]);
            if let Some(a) = &after {
                req = req.query(&[("after", a.as_str())]);
            }
            let page: BatchList = self.http.json(req, "admission").await?;
            for b in page.data.iter().filter(|b| ENQUEUED.contains(&b.status.as_str())) {
                let recorded = b.metadata.as_ref().and_then(|m| m.get(TOKENS_KEY)).and_then(|v| v.as_str());
                let batch_tokens = recorded.and_then(|t| t.parse::<u64>().ok()).unwrap_or(0);
                tokens = tokens.saturating_add(batch_tokens);
            }
            match page.last_id.filter(|_| page.has_more) {
                Some(last) => after = Some(last),
                None => break,
            }
        }
        Ok(tokens)
    }

    /// Uploads the items as a JSONL file and creates a 24 h batch of it, tagged with the chunk's tag.
    pub async fn create(&self, chunk: &ChunkTask, items: &[Item]) -> Result<Created, ApiError> {
        let endpoint = items.first().map(|i| i.url.clone()).unwrap_or_default();
        let tokens = estimate_tokens(items);
        let prefix = custom_id_prefix(self.namespace, chunk);
        let mut jsonl = Vec::with_capacity(items.iter().map(|i| i.body.get().len() + 100).sum());
        for item in items {
            let line = serde_json::json!({
                "custom_id": provider_custom_id(&prefix, item.index),
                "method": "POST",
                "url": item.url,
                "body": item.body,
            });
            serde_json::to_writer(&mut jsonl, &line).expect("lines serialize");
            jsonl.push(b'\n');
        }
        let (content_type, body) = multipart(&chunk.tag(self.namespace), jsonl);
        let req = self
            .http
            .request(Method::POST, "/v1/files")
            .header("content-type", content_type)
            .timeout(TRANSFER_TIMEOUT)
            .body(body);
        let file: FileObject = self.http.json(req, "upload").await?;
        check_provider_id(&file.id).map_err(|_| ApiError::Transient("upload: the file id is not plain".into()))?;
        let create = serde_json::json!({
            "input_file_id": file.id,
            "endpoint": endpoint,
            "completion_window": "24h",
            "metadata": {
                TAG_KEY: chunk.tag(self.namespace),
                "fleet_job": chunk.job_id,
                "fleet_chunk": chunk.chunk.to_string(),
                TOKENS_KEY: tokens.to_string(),
            },
        });
        let req = self.http.request(Method::POST, "/v1/batches").json(&create);
        match self.http.json::<BatchObject>(req, "create").await {
            Ok(batch) => {
                check_provider_id(&batch.id)
                    .map_err(|_| ApiError::Transient("create: the batch id is not plain".into()))?;
                Ok(Created { batch_id: batch.id, input_file_id: Some(file.id) })
            }
            Err(e) => {
                // No batch uses the file: delete it now rather than leave it at the provider.
                if matches!(e, ApiError::Refused { .. }) {
                    self.delete_file(&file.id).await;
                }
                Err(e)
            }
        }
    }

    /// Retrieves the batch: its status, files and tag.
    pub async fn poll(&self, batch_id: &str) -> Result<Polled, ApiError> {
        let req = self.http.request(Method::GET, &format!("/v1/batches/{batch_id}"));
        let b: BatchObject = self.http.json(req, "retrieve").await?;
        let (status, ending) = match b.status.as_str() {
            "validating" => ("validating", None),
            "in_progress" => ("in_progress", None),
            "finalizing" => ("finalizing", None),
            "cancelling" => ("cancelling", None),
            "completed" => ("completed", Some(Ending::Completed)),
            "expired" => ("expired", Some(Ending::Expired)),
            "cancelled" => ("cancelled", Some(Ending::Cancelled)),
            "failed" => ("failed", Some(rejected(b.errors.as_ref()))),
            _ => ("unknown", None),
        };
        let plain = |f: Option<String>| f.filter(|f| check_provider_id(f).is_ok());
        let tag = b.metadata.as_ref().and_then(|m| m.get(TAG_KEY)).and_then(|v| v.as_str()).map(str::to_string);
        Ok(Polled {
            status,
            ending,
            output_file_id: plain(b.output_file_id),
            error_file_id: plain(b.error_file_id),
            input_file_id: plain(b.input_file_id),
            tag,
        })
    }

    /// Asks OpenAI to cancel the batch.
    pub async fn cancel(&self, batch_id: &str) -> Result<(), ApiError> {
        let req = self.http.request(Method::POST, &format!("/v1/batches/{batch_id}/cancel"));
        self.http.send(req, "cancel").await.map(|_| ())
    }

    /// Reads the output and error files of an ended batch, calling `each` for the chunk's lines.
    pub async fn fetch(
        &self,
        chunk: &ChunkTask,
        polled: &Polled,
        each: &mut (dyn FnMut(Fetched) + Send),
    ) -> Result<(), ApiError> {
        let prefix = custom_id_prefix(self.namespace, chunk);
        for file in [&polled.output_file_id, &polled.error_file_id].into_iter().flatten() {
            let req = self.http.request(Method::GET, &format!("/v1/files/{file}/content")).timeout(TRANSFER_TIMEOUT);
            let started = std::time::Instant::now();
            let resp = self.http.response(req, "content").await?;
            let read = for_each_line(resp, |line| {
                if let Some(f) = parse_line(chunk, &prefix, line) {
                    each(f);
                }
            })
            .await;
            self.http.observe("content", started);
            read?;
        }
        Ok(())
    }

    /// Deletes the batch's input, output and error files (best effort).
    pub async fn clean_up(&self, polled: &Polled) {
        let files = [&polled.input_file_id, &polled.output_file_id, &polled.error_file_id];
        for file in files.into_iter().flatten() {
            self.delete_file(file).await;
        }
    }

    async fn delete_file(&self, file: &str) {
        let req = self.http.request(Method::DELETE, &format!("/v1/files/{file}"));
        match self.http.send(req, "delete").await {
            Ok(_) | Err(ApiError::Refused { status: 404, .. }) => {}
            Err(e) => tracing::info!(file, error = %e, "cannot delete a batch file at the provider; it expires there"),
        }
    }
}

/// Estimated tokens of a batch of `items` (`fleet::tokens`, as the producer cut the chunk
/// and as the admission budget counts).
pub fn estimate_tokens(items: &[Item]) -> u64 {
    items.iter().map(|i| fleet::tokens::estimate_request_tokens(i.body.get().as_bytes())).fold(0, u64::saturating_add)
}

/// A `failed` batch: the provider's per-line errors (OpenAI's `line` is 1-based in the
/// uploaded file, whose line n holds the chunk's item n-1) and a reason for the rest.
/// A batch failed with `token_limit_exceeded` is [`Ending::QueueFull`].
fn rejected(errors: Option<&BatchErrors>) -> Ending {
    let data = errors.map(|e| e.data.as_slice()).unwrap_or_default();
    if data.iter().any(|e| e.code.as_deref() == Some(TOKEN_LIMIT_EXCEEDED)) {
        return Ending::QueueFull;
    }
    let text = |e: &BatchError| {
        let code = e.code.as_deref().unwrap_or("invalid_batch");
        bounded(&format!("{code}: {}", e.message.as_deref().unwrap_or("rejected by the provider")), 500)
    };
    let lines = data.iter().take(100_000).filter_map(|e| Some((e.line?, text(e)))).collect();
    let reason = data
        .iter()
        .find(|e| e.line.is_none())
        .or(data.first())
        .map(text)
        .unwrap_or_else(|| "the provider rejected the batch".into());
    Ending::Rejected { lines, reason }
}

/// One output or error file line as a result of an item of the chunk; `None` for a line
/// that is not one of ours.
fn parse_line(chunk: &ChunkTask, prefix: &str, line: &[u8]) -> Option<Fetched> {
    let l: OutputLine = serde_json::from_slice(line).ok()?;
    let index = index_of(prefix, &l.custom_id, chunk)?;
    let outcome = match (l.response, l.error) {
        (Some(r), _) => LineOutcome::Answered(ResponseRecord {
            status_code: r.status_code,
            request_id: bounded(r.request_id.as_deref().unwrap_or(""), 200),
            body: r.body,
        }),
        (None, Some(e)) => match e.code.as_deref() {
            // Requests an expiry or a cancel stopped before they ran.
            Some("batch_expired") => LineOutcome::Expired,
            Some("batch_cancelled") => LineOutcome::Cancelled,
            code => LineOutcome::Errored(ErrorRecord {
                code: bounded(code.unwrap_or("batch_error"), 64),
                message: bounded(e.message.as_deref().unwrap_or("failed in the provider batch"), 500),
            }),
        },
        (None, None) => return None,
    };
    Some(Fetched { index, outcome })
}

/// A `multipart/form-data` body with `purpose=batch` and the JSONL as `file`: the upload
/// OpenAI's Files API takes. Returns (content type, body).
fn multipart(tag: &str, jsonl: Vec<u8>) -> (String, Vec<u8>) {
    let boundary = format!("fleet-{}", uuid::Uuid::new_v4().simple());
    let filename: String =
        tag.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    let mut body = Vec::with_capacity(jsonl.len() + 512);
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n").as_bytes(),
    );
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}.jsonl\"\r\n\
             Content-Type: application/jsonl\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(&jsonl);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk() -> ChunkTask {
        serde_json::from_value(serde_json::json!({
            "job_id": "j", "provider": "p", "chunk": 0, "start": 0, "end": 3, "total": 3,
            "submitted_at_ms": 0, "state": "pending"
        }))
        .unwrap()
    }

    #[test]
    fn output_and_error_lines_map_to_outcomes() {
        let c = chunk();
        let ok = br#"{"id":"r","custom_id":"i1","response":{"status_code":200,"request_id":"q","body":{"x":1}},"error":null}"#;
        assert!(
            matches!(parse_line(&c, "", ok), Some(Fetched { index: 1, outcome: LineOutcome::Answered(r) }) if r.status_code == 200)
        );
        let err = br#"{"id":"r","custom_id":"i2","response":null,"error":{"code":"server_error","message":"boom"}}"#;
        assert!(
            matches!(parse_line(&c, "", err), Some(Fetched { index: 2, outcome: LineOutcome::Errored(e) }) if e.code == "server_error")
        );
        let exp = br#"{"custom_id":"i0","response":null,"error":{"code":"batch_expired","message":"x"}}"#;
        assert!(matches!(parse_line(&c, "", exp), Some(Fetched { index: 0, outcome: LineOutcome::Expired })));
        for bad in [&br#"{"custom_id":"i3","response":null,"error":{}}"#[..], b"garbage", br#"{"custom_id":"req-1"}"#] {
            assert!(parse_line(&c, "", bad).is_none());
        }
    }

    #[test]
    fn a_failed_batch_keeps_its_line_errors() {
        let errors: BatchErrors = serde_json::from_value(serde_json::json!({"data": [
            {"code": "invalid_request", "message": "bad model", "line": 2},
            {"code": "too_large", "message": "file too large", "line": null}
        ]}))
        .unwrap();
        let Ending::Rejected { lines, reason } = rejected(Some(&errors)) else { panic!() };
        assert_eq!(lines, vec![(2, "invalid_request: bad model".to_string())]);
        assert_eq!(reason, "too_large: file too large");
        let full: BatchErrors = serde_json::from_value(serde_json::json!({"data": [
            {"code": "token_limit_exceeded", "message": "Enqueued token limit reached for gpt-4o-mini", "line": null}
        ]}))
        .unwrap();
        assert_eq!(rejected(Some(&full)), Ending::QueueFull, "a full queue is not a rejection");
    }

    #[test]
    fn the_upload_is_multipart_with_purpose_batch() {
        let (ct, body) = multipart("ns/job_1/0", b"{}\n".to_vec());
        let boundary = ct.split("boundary=").nth(1).unwrap();
        let text = String::from_utf8(body).unwrap();
        assert!(text.contains("name=\"purpose\"\r\n\r\nbatch\r\n"), "{text}");
        assert!(text.contains("filename=\"ns_job_1_0.jsonl\""), "{text}");
        assert!(text.ends_with(&format!("--{boundary}--\r\n")));
    }
}
