//! The mock provider's batch APIs over real HTTP, as the fleet's worker will use them: OpenAI
//! (upload, create, poll, fetch the output and error files, delete, cancel, list) and
//! Anthropic Message Batches (create, poll, fetch `results_url`, cancel, list), with every
//! batch knob (time to complete, line errors, rejection, expiry, partial results on cancel)
//! and the `/stats` counts that prove what was created.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mock_provider::{BatchKnobs, Knobs, StatsSnapshot};
use reqwest::multipart::{Form, Part};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// Generous: the machine may be loaded; the batches themselves take a few seconds at most.
const POLL_FOR: Duration = Duration::from_secs(60);
const POLL_EVERY: Duration = Duration::from_millis(50);

/// A mock provider started for one test, stopped when dropped.
struct Mock {
    addr: SocketAddr,
    stop: CancellationToken,
    http: Client,
}

impl Drop for Mock {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Mock {
    async fn start(batch: BatchKnobs) -> Self {
        let (addr, stop, _task) = mock_provider::spawn(Knobs { batch, ..Knobs::default() }).await;
        Self { addr, stop, http: Client::new() }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let resp = self.http.get(self.url(path)).send().await.unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap())
    }

    async fn text(&self, url: &str) -> (StatusCode, String) {
        let resp = self.http.get(url).send().await.unwrap();
        (resp.status(), resp.text().await.unwrap())
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let resp = self.http.post(self.url(path)).json(&body).send().await.unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap())
    }

    async fn upload(&self, purpose: &str, content: String) -> (StatusCode, Value) {
        let form =
            Form::new().text("purpose", purpose.to_owned()).part("file", Part::text(content).file_name("input.jsonl"));
        let resp = self.http.post(self.url("/v1/files")).multipart(form).send().await.unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap())
    }

    async fn stats(&self) -> StatsSnapshot {
        self.http.get(self.url("/stats")).send().await.unwrap().json().await.unwrap()
    }

    /// Polls `path` until `field` is one of `done`; returns the last object and every value
    /// of `field` seen, in order, without repeats.
    async fn poll(&self, path: &str, field: &str, done: &[&str]) -> (Value, Vec<String>) {
        let start = Instant::now();
        let mut seen: Vec<String> = Vec::new();
        loop {
            let (status, object) = self.get(path).await;
            assert_eq!(status, StatusCode::OK, "{object}");
            let value = object[field].as_str().unwrap().to_owned();
            if seen.last() != Some(&value) {
                seen.push(value.clone());
            }
            if done.contains(&value.as_str()) {
                return (object, seen);
            }
            assert!(start.elapsed() < POLL_FOR, "{path} still {value} after {POLL_FOR:?}");
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// Uploads `lines` and creates an OpenAI batch on `endpoint` with `metadata`.
    async fn openai_batch(&self, endpoint: &str, lines: &[Value], metadata: Value) -> Value {
        let (status, file) = self.upload("batch", jsonl(lines)).await;
        assert_eq!(status, StatusCode::OK, "{file}");
        let body = json!({"input_file_id": file["id"], "endpoint": endpoint, "completion_window": "24h", "metadata": metadata});
        let (status, batch) = self.post("/v1/batches", body).await;
        assert_eq!(status, StatusCode::OK, "{batch}");
        batch
    }

    /// The lines of file `id` (empty if `id` is null).
    async fn file_lines(&self, id: &Value) -> Vec<Value> {
        let Some(id) = id.as_str() else { return Vec::new() };
        let (status, text) = self.text(&self.url(&format!("/v1/files/{id}/content"))).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        parse_jsonl(&text)
    }
}

fn jsonl(lines: &[Value]) -> String {
    lines.iter().map(|l| format!("{l}\n")).collect()
}

fn parse_jsonl(text: &str) -> Vec<Value> {
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn chat_body(i: usize) -> Value {
    json!({"model": "gpt-test", "messages": [{"role": "user", "content": format!("question {i}")}]})
}

fn chat_line(i: usize) -> Value {
    json!({"custom_id": format!("req-{i}"), "method": "POST", "url": "/v1/chat/completions", "body": chat_body(i)})
}

fn message_params(i: usize) -> Value {
    json!({"model": "claude-test", "max_tokens": 16, "messages": [{"role": "user", "content": format!("question {i}")}]})
}

fn message_requests(n: usize) -> Vec<Value> {
    (0..n).map(|i| json!({"custom_id": format!("r{i}"), "params": message_params(i)})).collect()
}

/// The parts of an answer that do not depend on when and as which request it was made.
fn answer_content(body: &Value) -> Value {
    let mut body = body.clone();
    for volatile in ["id", "created"] {
        body.as_object_mut().unwrap().remove(volatile);
    }
    body
}

fn by_custom_id(lines: &[Value]) -> BTreeMap<String, Value> {
    lines.iter().map(|l| (l["custom_id"].as_str().unwrap().to_owned(), l.clone())).collect()
}

fn quick() -> BatchKnobs {
    BatchKnobs { batch_complete_ms: 1500, ..BatchKnobs::default() }
}

/// Long enough that nothing ends on its own during a test.
fn slow() -> BatchKnobs {
    BatchKnobs { batch_complete_ms: 3_600_000, ..BatchKnobs::default() }
}

#[tokio::test]
async fn an_openai_batch_goes_through_its_lifecycle_and_answers_as_online() {
    let mock = Mock::start(quick()).await;
    let mut lines: Vec<Value> = (0..3).map(chat_line).collect();
    // A request the online endpoint refuses (no `messages`) fails in the batch the same way.
    lines.push(json!({"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}));
    let batch = mock.openai_batch("/v1/chat/completions", &lines, json!({"job": "j1", "chunk": "0"})).await;
    assert_eq!(batch["object"], "batch");
    assert_eq!(batch["status"], "validating");
    assert_eq!(batch["endpoint"], "/v1/chat/completions");
    assert_eq!(batch["completion_window"], "24h");
    assert_eq!(batch["metadata"], json!({"job": "j1", "chunk": "0"}));
    assert!(batch["output_file_id"].is_null());
    let id = batch["id"].as_str().unwrap();
    assert!(id.starts_with("batch_"), "{id}");

    let (done, seen) = mock.poll(&format!("/v1/batches/{id}"), "status", &["completed"]).await;
    let order = ["validating", "in_progress", "finalizing", "completed"];
    let ranks: Vec<usize> = seen.iter().map(|s| order.iter().position(|o| o == s).unwrap()).collect();
    assert!(ranks.windows(2).all(|w| w[0] < w[1]), "statuses out of order: {seen:?}");
    assert_eq!(done["request_counts"], json!({"total": 4, "completed": 3, "failed": 1}));
    for stamp in ["created_at", "in_progress_at", "finalizing_at", "completed_at", "expires_at"] {
        assert!(done[stamp].as_u64().is_some(), "{stamp}: {done}");
    }
    assert!(done["failed_at"].is_null() && done["cancelled_at"].is_null() && done["errors"].is_null());

    let output = by_custom_id(&mock.file_lines(&done["output_file_id"]).await);
    assert_eq!(output.keys().collect::<Vec<_>>(), ["req-0", "req-1", "req-2"]);
    for i in 0..3 {
        let line = &output[&format!("req-{i}")];
        assert_eq!(line["response"]["status_code"], 200);
        assert!(line["error"].is_null());
        let (status, online) = mock.post("/v1/chat/completions", chat_body(i)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(answer_content(&line["response"]["body"]), answer_content(&online), "line {i}");
    }
    let errors = mock.file_lines(&done["error_file_id"]).await;
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["custom_id"], "bad");
    assert_eq!(errors[0]["response"]["status_code"], 400);
    assert_eq!(errors[0]["response"]["body"]["error"]["type"], "invalid_request_error");

    let stats = mock.stats().await.batches;
    assert_eq!(stats.openai_created, BTreeMap::from([("chunk=0,job=j1".to_owned(), 1)]));
    assert_eq!((stats.files_uploaded, stats.files_stored, stats.resubmitted_custom_ids), (1, 3, 0));

    // Every file can be deleted, and is gone afterwards.
    for file in [&batch["input_file_id"], &done["output_file_id"], &done["error_file_id"]] {
        let file = file.as_str().unwrap();
        let resp = mock.http.delete(mock.url(&format!("/v1/files/{file}"))).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.json::<Value>().await.unwrap(), json!({"id": file, "object": "file", "deleted": true}));
        let (status, _) = mock.get(&format!("/v1/files/{file}/content")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
    let stats = mock.stats().await.batches;
    assert_eq!((stats.files_deleted, stats.files_stored, stats.bytes_stored), (3, 0, 0));
}

#[tokio::test]
async fn an_openai_batch_with_bad_lines_fails_naming_each_line() {
    let mock = Mock::start(quick()).await;
    let lines = vec![
        chat_line(0),
        json!({"custom_id": "x", "method": "POST", "url": "/v1/embeddings", "body": {"input": "a"}}),
        chat_line(0),
    ];
    let batch = mock.openai_batch("/v1/chat/completions", &lines, json!({"job": "bad"})).await;
    let (done, _) = mock.poll(&format!("/v1/batches/{}", batch["id"].as_str().unwrap()), "status", &["failed"]).await;
    let errors: Vec<(u64, &str)> = done["errors"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["line"].as_u64().unwrap(), e["code"].as_str().unwrap()))
        .collect();
    assert_eq!(errors, [(2, "mismatched_url"), (3, "duplicate_custom_id")]);
    assert_eq!(done["errors"]["object"], "list");
    assert!(done["failed_at"].as_u64().is_some());
    assert!(done["output_file_id"].is_null() && done["error_file_id"].is_null());
    assert_eq!(done["request_counts"], json!({"total": 0, "completed": 0, "failed": 0}));
    let stats = mock.stats().await.batches;
    assert_eq!(stats.rejected, 1);
    assert_eq!(stats.openai_created["job=bad"], 1);
}

#[tokio::test]
async fn the_reject_knob_fails_a_valid_batch_on_its_last_line() {
    let mock = Mock::start(BatchKnobs { batch_reject_rate: 1.0, ..quick() }).await;
    let lines: Vec<Value> = (0..5).map(chat_line).collect();
    let batch = mock.openai_batch("/v1/chat/completions", &lines, json!({})).await;
    let (done, _) = mock.poll(&format!("/v1/batches/{}", batch["id"].as_str().unwrap()), "status", &["failed"]).await;
    let errors = done["errors"]["data"].as_array().unwrap();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["line"], 5);
    assert!(errors[0]["message"].as_str().unwrap().contains("injected"));
    assert_eq!(mock.stats().await.batches.openai_created[""], 1, "no metadata: the empty tag");
}

#[tokio::test]
async fn cancelling_an_openai_batch_keeps_the_partial_results() {
    let mock = Mock::start(BatchKnobs { batch_partial: 0.4, ..slow() }).await;
    let lines: Vec<Value> = (0..10).map(chat_line).collect();
    let batch = mock.openai_batch("/v1/chat/completions", &lines, json!({"job": "c"})).await;
    let id = batch["id"].as_str().unwrap();
    let (status, cancelling) = mock.post(&format!("/v1/batches/{id}/cancel"), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{cancelling}");
    assert_eq!(cancelling["status"], "cancelling");
    assert!(cancelling["cancelling_at"].as_u64().is_some());
    // Cancelling again is harmless and counted once.
    assert_eq!(mock.post(&format!("/v1/batches/{id}/cancel"), json!({})).await.0, StatusCode::OK);

    let (done, _) = mock.poll(&format!("/v1/batches/{id}"), "status", &["cancelled"]).await;
    assert!(done["cancelled_at"].as_u64().is_some());
    assert_eq!(done["request_counts"], json!({"total": 10, "completed": 4, "failed": 6}));
    let output = mock.file_lines(&done["output_file_id"]).await;
    let ids: Vec<&str> = output.iter().map(|l| l["custom_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["req-0", "req-1", "req-2", "req-3"]);
    let errors = mock.file_lines(&done["error_file_id"]).await;
    assert_eq!(errors.len(), 6);
    assert!(errors.iter().all(|e| e["error"]["code"] == "batch_cancelled" && e["response"].is_null()));
    assert_eq!(mock.stats().await.batches.cancelled, 1);

    // An ended batch cannot be cancelled.
    let (status, body) = mock.post(&format!("/v1/batches/{id}/cancel"), json!({})).await;
    assert_eq!(status, StatusCode::OK, "a cancelled batch stays cancelled: {body}");
    let quick_mock = Mock::start(BatchKnobs { batch_complete_ms: 0, ..BatchKnobs::default() }).await;
    let done = quick_mock.openai_batch("/v1/chat/completions", &lines[..1], json!({})).await;
    assert_eq!(done["status"], "completed");
    let (status, body) =
        quick_mock.post(&format!("/v1/batches/{}/cancel", done["id"].as_str().unwrap()), json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
}

#[tokio::test]
async fn an_expiring_openai_batch_answers_part_and_expires_the_rest() {
    let mock = Mock::start(BatchKnobs { batch_expire_rate: 1.0, batch_partial: 0.3, ..quick() }).await;
    let lines: Vec<Value> = (0..10).map(chat_line).collect();
    let batch = mock.openai_batch("/v1/chat/completions", &lines, json!({})).await;
    let (done, seen) =
        mock.poll(&format!("/v1/batches/{}", batch["id"].as_str().unwrap()), "status", &["expired"]).await;
    assert!(!seen.iter().any(|s| s == "finalizing"), "{seen:?}");
    assert!(done["expired_at"].as_u64().is_some());
    assert_eq!(mock.file_lines(&done["output_file_id"]).await.len(), 3);
    let errors = mock.file_lines(&done["error_file_id"]).await;
    assert_eq!(errors.len(), 7);
    assert!(errors.iter().all(|e| e["error"]["code"] == "batch_expired"));
}

#[tokio::test]
async fn the_line_error_knob_fails_lines_with_the_online_error_shape() {
    let mock =
        Mock::start(BatchKnobs { batch_line_error_rate: 1.0, batch_complete_ms: 0, ..BatchKnobs::default() }).await;
    let lines: Vec<Value> = (0..3).map(chat_line).collect();
    let done = mock.openai_batch("/v1/chat/completions", &lines, json!({})).await;
    assert_eq!(done["status"], "completed");
    assert!(done["output_file_id"].is_null());
    let errors = mock.file_lines(&done["error_file_id"]).await;
    assert_eq!(errors.len(), 3);
    assert!(errors
        .iter()
        .all(|e| e["response"]["status_code"] == 500 && e["response"]["body"]["error"]["type"] == "server_error"));
}

#[tokio::test]
async fn responses_and_moderations_run_in_batches_too() {
    let mock = Mock::start(BatchKnobs { batch_complete_ms: 0, ..BatchKnobs::default() }).await;
    for (endpoint, body) in [
        ("/v1/responses", json!({"model": "gpt-r", "input": "batch me"})),
        ("/v1/moderations", json!({"input": ["calm", "a mock-flag here"]})),
    ] {
        let line = json!({"custom_id": "one", "method": "POST", "url": endpoint, "body": body});
        let done = mock.openai_batch(endpoint, &[line], json!({})).await;
        assert_eq!(done["status"], "completed", "{endpoint}");
        let output = mock.file_lines(&done["output_file_id"]).await;
        let (status, online) = mock.post(endpoint, body).await;
        assert_eq!(status, StatusCode::OK);
        let batch_body = &output[0]["response"]["body"];
        let volatile = if endpoint == "/v1/responses" { vec!["id", "created_at", "output"] } else { vec!["id"] };
        let strip = |v: &Value| {
            let mut v = v.clone();
            volatile.iter().for_each(|k| drop(v.as_object_mut().unwrap().remove(*k)));
            v
        };
        assert_eq!(strip(batch_body), strip(&online), "{endpoint}");
        if endpoint == "/v1/responses" {
            assert_eq!(batch_body["output"][0]["content"], online["output"][0]["content"]);
        }
    }
}

#[tokio::test]
async fn openai_batches_are_listed_newest_first_by_pages() {
    let mock = Mock::start(slow()).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let batch = mock.openai_batch("/v1/embeddings", &[json!({"custom_id": format!("e{i}"), "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}})], json!({"n": i.to_string()})).await;
        ids.push(batch["id"].as_str().unwrap().to_owned());
    }
    let (status, page) = mock.get("/v1/batches?limit=2").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["object"], "list");
    let listed: Vec<&str> = page["data"].as_array().unwrap().iter().map(|b| b["id"].as_str().unwrap()).collect();
    assert_eq!(listed, [ids[2].as_str(), ids[1].as_str()]);
    assert_eq!(
        (page["first_id"].as_str(), page["last_id"].as_str(), page["has_more"].as_bool()),
        (Some(ids[2].as_str()), Some(ids[1].as_str()), Some(true))
    );
    let (_, rest) = mock.get(&format!("/v1/batches?limit=2&after={}", ids[1])).await;
    assert_eq!(rest["data"][0]["id"], ids[0].as_str());
    assert_eq!(rest["has_more"], false);
    assert_eq!(mock.get("/v1/batches?limit=0").await.0, StatusCode::BAD_REQUEST);
    assert_eq!(mock.get("/v1/batches?after=batch_nope").await.0, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn bad_openai_requests_get_clear_errors() {
    let mock = Mock::start(BatchKnobs { batch_keep: 2, batch_store_bytes: 4096, ..slow() }).await;
    let (status, body) = mock.upload("fine-tune", "{}\n".to_owned()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"]["message"].as_str().unwrap().contains("purpose"), "{body}");
    let (status, body) = mock.upload("batch", "x".repeat(5000)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");

    let (_, file) = mock.upload("batch", jsonl(&[chat_line(0)])).await;
    let create = |window: &str, endpoint: &str, file: &Value| json!({"input_file_id": file, "endpoint": endpoint, "completion_window": window});
    for (body, status, needle) in [
        (create("24h", "/v1/chat/completions", &json!("file-nope")), StatusCode::NOT_FOUND, "No such File"),
        (create("1h", "/v1/chat/completions", &file["id"]), StatusCode::BAD_REQUEST, "completion_window"),
        (create("24h", "/v1/messages", &file["id"]), StatusCode::BAD_REQUEST, "endpoint"),
        (json!({"input_file_id": file["id"]}), StatusCode::BAD_REQUEST, "endpoint"),
    ] {
        let (got, answer) = mock.post("/v1/batches", body).await;
        assert_eq!(got, status, "{answer}");
        assert_eq!(answer["error"]["type"], "invalid_request_error");
        assert!(answer["error"]["message"].as_str().unwrap().contains(needle), "{answer}");
    }
    let metadata: BTreeMap<String, String> = (0..17).map(|i| (i.to_string(), String::new())).collect();
    let mut body = create("24h", "/v1/chat/completions", &file["id"]);
    body["metadata"] = json!(metadata);
    assert_eq!(mock.post("/v1/batches", body).await.0, StatusCode::BAD_REQUEST);

    // Bounded: two files kept, no more; two live batches, no more.
    let (status, _) = mock.upload("batch", jsonl(&[chat_line(1)])).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = mock.upload("batch", jsonl(&[chat_line(2)])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    for expected in [StatusCode::OK, StatusCode::OK, StatusCode::TOO_MANY_REQUESTS] {
        let (status, body) = mock.post("/v1/batches", create("24h", "/v1/chat/completions", &file["id"])).await;
        assert_eq!(status, expected, "{body}");
    }
    assert_eq!(mock.get("/v1/batches/batch_0123").await.0, StatusCode::NOT_FOUND);
    assert_eq!(mock.get("/v1/files/..%2F..%2Fetc/content").await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn an_anthropic_batch_ends_with_results_that_match_online_answers() {
    let mock = Mock::start(quick()).await;
    let mut requests = message_requests(3);
    requests.push(json!({"custom_id": "bad", "params": {"max_tokens": 5}}));
    let (status, batch) = mock.post("/v1/messages/batches", json!({ "requests": requests })).await;
    assert_eq!(status, StatusCode::OK, "{batch}");
    assert_eq!(batch["type"], "message_batch");
    assert_eq!(batch["processing_status"], "in_progress");
    assert_eq!(
        batch["request_counts"],
        json!({"processing": 4, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0})
    );
    assert!(batch["results_url"].is_null() && batch["ended_at"].is_null());
    assert!(batch["created_at"].as_str().unwrap().ends_with('Z'));
    let id = batch["id"].as_str().unwrap();
    assert!(id.starts_with("msgbatch_"), "{id}");
    let (status, early) = mock.get(&format!("/v1/messages/batches/{id}/results")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{early}");

    let (done, seen) = mock.poll(&format!("/v1/messages/batches/{id}"), "processing_status", &["ended"]).await;
    assert_eq!(seen, ["in_progress", "ended"]);
    assert_eq!(
        done["request_counts"],
        json!({"processing": 0, "succeeded": 3, "errored": 1, "canceled": 0, "expired": 0})
    );
    assert!(done["ended_at"].as_str().is_some());
    let results_url = done["results_url"].as_str().unwrap();
    assert_eq!(results_url, mock.url(&format!("/v1/messages/batches/{id}/results")));
    let (status, text) = mock.text(results_url).await;
    assert_eq!(status, StatusCode::OK);
    let results = by_custom_id(&parse_jsonl(&text));
    assert_eq!(results.len(), 4);
    for i in 0..3 {
        let result = &results[&format!("r{i}")]["result"];
        assert_eq!(result["type"], "succeeded");
        let (status, online) = mock.post("/v1/messages", message_params(i)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(answer_content(&result["message"]), answer_content(&online));
    }
    assert_eq!(results["bad"]["result"]["type"], "errored");
    assert_eq!(results["bad"]["result"]["error"]["error"]["type"], "invalid_request_error");
    let stats = mock.stats().await.batches;
    assert_eq!(stats.anthropic_created, BTreeMap::from([("custom_id=r0".to_owned(), 1)]));
}

#[tokio::test]
async fn cancelling_an_anthropic_batch_keeps_the_partial_results() {
    let mock = Mock::start(BatchKnobs { batch_partial: 0.5, ..slow() }).await;
    let (_, batch) = mock.post("/v1/messages/batches", json!({ "requests": message_requests(10) })).await;
    let id = batch["id"].as_str().unwrap();
    let (status, canceling) = mock.post(&format!("/v1/messages/batches/{id}/cancel"), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(canceling["processing_status"], "canceling");
    assert!(canceling["cancel_initiated_at"].as_str().is_some());
    let (done, _) = mock.poll(&format!("/v1/messages/batches/{id}"), "processing_status", &["ended"]).await;
    assert_eq!(
        done["request_counts"],
        json!({"processing": 0, "succeeded": 5, "errored": 0, "canceled": 5, "expired": 0})
    );
    let (_, text) = mock.text(done["results_url"].as_str().unwrap()).await;
    let results = by_custom_id(&parse_jsonl(&text));
    for i in 0..10 {
        let expected = if i < 5 { "succeeded" } else { "canceled" };
        assert_eq!(results[&format!("r{i}")]["result"]["type"], expected, "r{i}");
    }
    let (status, _) = mock.post(&format!("/v1/messages/batches/{id}/cancel"), json!({})).await;
    assert_eq!(status, StatusCode::OK, "cancelling a cancelled batch again is harmless");
    assert_eq!(mock.stats().await.batches.cancelled, 1);
}

#[tokio::test]
async fn an_expiring_anthropic_batch_expires_the_unanswered_requests() {
    let mock = Mock::start(BatchKnobs { batch_expire_rate: 1.0, batch_partial: 0.2, ..quick() }).await;
    let (_, batch) = mock.post("/v1/messages/batches", json!({ "requests": message_requests(10) })).await;
    let (done, _) = mock
        .poll(&format!("/v1/messages/batches/{}", batch["id"].as_str().unwrap()), "processing_status", &["ended"])
        .await;
    assert_eq!(
        done["request_counts"],
        json!({"processing": 0, "succeeded": 2, "errored": 0, "canceled": 0, "expired": 8})
    );
    let (_, text) = mock.text(done["results_url"].as_str().unwrap()).await;
    let expired = parse_jsonl(&text).iter().filter(|l| l["result"] == json!({"type": "expired"})).count();
    assert_eq!(expired, 8);
}

#[tokio::test]
async fn anthropic_creates_are_checked_and_rejections_name_the_request() {
    let mock = Mock::start(quick()).await;
    let mut requests = message_requests(3);
    requests[2]["custom_id"] = json!("has space");
    let (status, body) = mock.post("/v1/messages/batches", json!({ "requests": requests })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(body["error"]["message"].as_str().unwrap().starts_with("requests.2.custom_id"), "{body}");
    assert_eq!(mock.post("/v1/messages/batches", json!({"requests": []})).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(mock.post("/v1/messages/batches", json!({"nope": 1})).await.0, StatusCode::BAD_REQUEST);

    let rejecting = Mock::start(BatchKnobs { batch_reject_rate: 1.0, ..quick() }).await;
    let (status, body) = rejecting.post("/v1/messages/batches", json!({ "requests": message_requests(4) })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"]["message"].as_str().unwrap().starts_with("requests.3.params"), "{body}");
    let stats = rejecting.stats().await.batches;
    assert_eq!((stats.rejected, stats.anthropic_created.len()), (1, 0));
    let (status, body) = mock.get("/v1/messages/batches/msgbatch_unknown").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["type"], "not_found_error");
}

#[tokio::test]
async fn anthropic_batches_are_listed_and_resubmissions_are_counted() {
    let mock = Mock::start(slow()).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        // The same custom_ids three times: the second and third batches resubmit both.
        let (_, batch) = mock.post("/v1/messages/batches", json!({ "requests": message_requests(2) })).await;
        ids.push(batch["id"].as_str().unwrap().to_owned());
    }
    let (_, page) = mock.get("/v1/messages/batches?limit=1").await;
    assert_eq!(page["data"][0]["id"], ids[2].as_str());
    assert_eq!(page["has_more"], true);
    let (_, older) = mock.get(&format!("/v1/messages/batches?after_id={}", ids[2])).await;
    let listed: Vec<&str> = older["data"].as_array().unwrap().iter().map(|b| b["id"].as_str().unwrap()).collect();
    assert_eq!(listed, [ids[1].as_str(), ids[0].as_str()]);
    let (_, newer) = mock.get(&format!("/v1/messages/batches?before_id={}", ids[0])).await;
    assert_eq!(newer["first_id"], ids[2].as_str());
    assert_eq!(newer["last_id"], ids[1].as_str());
    let stats = mock.stats().await.batches;
    assert_eq!(stats.anthropic_created["custom_id=r0"], 3);
    assert_eq!(stats.resubmitted_custom_ids, 4);
}
