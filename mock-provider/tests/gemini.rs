//! The mock's Gemini endpoints over real HTTP: the documented shapes of `generateContent`,
//! `embedContent` and `batchEmbedContents`, Google's error bodies (a 429 with
//! `RetryInfo.retryDelay` and no `Retry-After`), the key in `x-goog-api-key`, `/stats`, and
//! the Batch API (`batchGenerateContent` with inline requests, `batches/{id}` get, list,
//! cancel, delete).

use std::net::SocketAddr;

use mock_provider::{Knobs, StatsSnapshot};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

async fn post(addr: SocketAddr, path: &str, body: Value) -> reqwest::Response {
    Client::new().post(format!("http://{addr}{path}")).json(&body).send().await.unwrap()
}

async fn stats(addr: SocketAddr) -> StatsSnapshot {
    Client::new().get(format!("http://{addr}/stats")).send().await.unwrap().json().await.unwrap()
}

const GENERATE: &str = "/v1beta/models/gemini-2.0-flash:generateContent";

#[tokio::test]
async fn generate_content_answers_candidates_and_usage_metadata() {
    let (addr, stop, _task) = mock_provider::spawn(Knobs::default()).await;
    let body = json!({
        "systemInstruction": {"parts": [{"text": "Be brief, please."}]},
        "contents": [{"role": "user", "parts": [{"text": "hello there"}]}],
        "generationConfig": {"candidateCount": 2, "maxOutputTokens": 50}
    });
    let resp = post(addr, GENERATE, body).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["candidates"].as_array().unwrap().len(), 2);
    assert_eq!(v["candidates"][1]["index"], 1);
    assert_eq!(v["candidates"][0]["finishReason"], "STOP");
    assert_eq!(v["candidates"][0]["content"]["role"], "model");
    assert_eq!(v["candidates"][0]["content"]["parts"][0]["text"], "mock reply to: hello there");
    assert_eq!(v["modelVersion"], "gemini-2.0-flash");
    let u = &v["usageMetadata"];
    // 11 characters of prompt (3 tokens) + 17 of system instruction (5, reported cached).
    assert_eq!((u["promptTokenCount"].as_u64(), u["cachedContentTokenCount"].as_u64()), (Some(8), Some(5)));
    let out = u["candidatesTokenCount"].as_u64().unwrap();
    assert_eq!(out, 2 * 7);
    assert_eq!(u["totalTokenCount"].as_u64(), Some(8 + out));
    let s = stats(addr).await;
    assert_eq!(s.by_path.get("/v1beta/models/{model}:generateContent"), Some(&1));
    assert_eq!((s.usage.input_tokens, s.usage.cached_input_tokens, s.usage.output_tokens), (8, 5, out));
    let bad = post(addr, GENERATE, json!({"contents": []})).await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let v: Value = bad.json().await.unwrap();
    assert_eq!((v["error"]["code"].as_u64(), v["error"]["status"].as_str()), (Some(400), Some("INVALID_ARGUMENT")));
    assert_eq!(post(addr, "/v1beta/models/m:streamGenerateContent", json!({})).await.status(), StatusCode::NOT_FOUND);
    stop.cancel();
}

#[tokio::test]
async fn embeddings_answer_values_in_order() {
    let (addr, stop, _task) = mock_provider::spawn(Knobs::default()).await;
    let one = json!({"model": "models/e", "content": {"parts": [{"text": "a"}]}});
    let v: Value = post(addr, "/v1beta/models/e:embedContent", one.clone()).await.json().await.unwrap();
    assert_eq!(v["embedding"]["values"].as_array().unwrap().len(), 8);
    let batch = json!({"requests": [one.clone(), one]});
    let v: Value = post(addr, "/v1beta/models/e:batchEmbedContents", batch).await.json().await.unwrap();
    assert_eq!(v["embeddings"].as_array().unwrap().len(), 2);
    assert_eq!(v["embeddings"][0], v["embeddings"][1], "the same text, the same embedding");
    stop.cancel();
}

#[tokio::test]
async fn a_429_is_resource_exhausted_with_a_retry_delay_and_no_retry_after() {
    let knobs = Knobs {
        error_429: 1.0,
        gemini: mock_provider::gemini::GeminiKnobs { gemini_retry_delay_ms: 2000 },
        ..Knobs::default()
    };
    let (addr, stop, _task) = mock_provider::spawn(knobs).await;
    let resp = post(addr, GENERATE, json!({"contents": [{"parts": [{"text": "x"}]}]})).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(resp.headers().get("retry-after").is_none());
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["status"], "RESOURCE_EXHAUSTED");
    let retry = v["error"]["details"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["@type"] == "type.googleapis.com/google.rpc.RetryInfo");
    assert_eq!(retry.unwrap()["retryDelay"], "2s");
    stop.cancel();

    // The rpm bucket's refusals say how long until a request is let through again.
    let (addr, stop, _task) = mock_provider::spawn(Knobs { rpm: Some(60), ..Knobs::default() }).await;
    let mut delays = Vec::new();
    for _ in 0..5 {
        let resp = post(addr, GENERATE, json!({"contents": [{"parts": [{"text": "x"}]}]})).await;
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            let v: Value = resp.json().await.unwrap();
            delays.push(v["error"]["details"][1]["retryDelay"].as_str().unwrap().to_string());
        }
    }
    assert!(!delays.is_empty() && delays.iter().all(|d| d.ends_with('s')), "{delays:?}");
    stop.cancel();
}

#[tokio::test]
async fn the_key_goes_in_x_goog_api_key() {
    let knobs = Knobs { valid_keys: vec![mock_provider::knobs::SecretKey("g-good".into())], ..Knobs::default() };
    let (addr, stop, _task) = mock_provider::spawn(knobs).await;
    let body = json!({"contents": [{"parts": [{"text": "x"}]}]});
    let send = |key: &'static str| {
        Client::new().post(format!("http://{addr}{GENERATE}")).header("x-goog-api-key", key).json(&body).send()
    };
    assert_eq!(send("g-good").await.unwrap().status(), StatusCode::OK);
    let refused = send("g-bad").await.unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    let v: Value = refused.json().await.unwrap();
    assert_eq!(v["error"]["details"][0]["reason"], "API_KEY_INVALID");
    let list = Client::new().get(format!("http://{addr}/v1beta/models")).header("x-goog-api-key", "g-good").send();
    assert_eq!(list.await.unwrap().status(), StatusCode::OK);
    let s = stats(addr).await;
    assert_eq!((s.unauthorized, s.models_listed), (1, 1));
    stop.cancel();
}

/// A `batchGenerateContent` body of `n` inline requests, each keyed `k<i>`.
fn batch_body(name: &str, n: usize) -> Value {
    let requests: Vec<Value> = (0..n)
        .map(|i| {
            json!({"request": {"contents": [{"role": "user", "parts": [{"text": format!("hello {i}")}]}]},
                        "metadata": {"key": format!("k{i}")}})
        })
        .collect();
    json!({"batch": {"displayName": name, "inputConfig": {"requests": {"requests": requests}}}})
}

async fn get(addr: SocketAddr, path: &str) -> reqwest::Response {
    Client::new().get(format!("http://{addr}{path}")).send().await.unwrap()
}

#[tokio::test]
async fn a_batch_of_inline_requests_runs_lists_cancels_and_deletes() {
    let knobs =
        Knobs { batch: mock_provider::BatchKnobs { batch_complete_ms: 300, ..Default::default() }, ..Knobs::default() };
    let (addr, stop, _task) = mock_provider::spawn(knobs).await;
    let create = "/v1beta/models/gemini-2.0-flash:batchGenerateContent";
    let op: Value = post(addr, create, batch_body("tag-a", 3)).await.json().await.unwrap();
    let name = op["name"].as_str().unwrap().to_string();
    assert!(name.starts_with("batches/"), "{op}");
    assert_eq!(op["metadata"]["state"], "BATCH_STATE_PENDING", "{op}");
    assert_eq!(op["metadata"]["displayName"], "tag-a");
    assert_eq!(op["metadata"]["model"], "models/gemini-2.0-flash");
    assert_eq!(op["metadata"]["batchStats"]["requestCount"], "3");

    // Ended: the responses, in request order, with their keys and usage; the operation done.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let op: Value = get(addr, &format!("/v1beta/{name}")).await.json().await.unwrap();
    assert_eq!((op["done"].as_bool(), op["metadata"]["state"].as_str()), (Some(true), Some("BATCH_STATE_SUCCEEDED")));
    let responses = op["metadata"]["output"]["inlinedResponses"]["inlinedResponses"].as_array().unwrap();
    let keys: Vec<&str> = responses.iter().map(|r| r["metadata"]["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["k0", "k1", "k2"]);
    assert_eq!(responses[1]["response"]["candidates"][0]["content"]["parts"][0]["text"], "mock reply to: hello 1");
    let prompt: u64 =
        responses.iter().map(|r| r["response"]["usageMetadata"]["promptTokenCount"].as_u64().unwrap()).sum();

    // A second batch, cancelled while it runs; an ended one cannot be cancelled.
    let op2: Value = post(addr, create, batch_body("tag-b", 2)).await.json().await.unwrap();
    let name2 = op2["name"].as_str().unwrap().to_string();
    let cancel = post(addr, &format!("/v1beta/{name2}:cancel"), json!({})).await;
    assert_eq!(cancel.status(), StatusCode::OK);
    let ended = post(addr, &format!("/v1beta/{name}:cancel"), json!({})).await;
    assert_eq!(ended.status(), StatusCode::BAD_REQUEST);
    let e: Value = ended.json().await.unwrap();
    assert_eq!(e["error"]["status"], "INVALID_ARGUMENT", "{e}");
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let op2: Value = get(addr, &format!("/v1beta/{name2}")).await.json().await.unwrap();
    assert_eq!(op2["metadata"]["state"], "BATCH_STATE_CANCELLED", "{op2}");

    // The list: newest first, paged by token.
    let page: Value = get(addr, "/v1beta/batches?pageSize=1").await.json().await.unwrap();
    assert_eq!(page["operations"][0]["metadata"]["displayName"], "tag-b", "{page}");
    let token = page["nextPageToken"].as_str().unwrap();
    let page: Value = get(addr, &format!("/v1beta/batches?pageSize=1&pageToken={token}")).await.json().await.unwrap();
    assert_eq!(page["operations"][0]["metadata"]["displayName"], "tag-a", "{page}");
    assert!(page.get("nextPageToken").is_none(), "{page}");

    // Deleted: gone.
    let deleted = Client::new().delete(format!("http://{addr}/v1beta/{name}")).send().await.unwrap();
    assert_eq!(deleted.status(), StatusCode::OK);
    assert_eq!(get(addr, &format!("/v1beta/{name}")).await.status(), StatusCode::NOT_FOUND);

    let s = stats(addr).await;
    assert_eq!(s.batches.gemini_created.get("tag-a"), Some(&1));
    assert_eq!(s.batches.gemini_created.get("tag-b"), Some(&1));
    assert_eq!((s.batches.gemini_deleted, s.batches.cancelled), (1, 1));
    assert!(s.batches.gemini_input_tokens >= prompt, "{:?}", s.batches);
    // Bad creates: Google's error shape.
    let bad = post(addr, create, json!({"batch": {"displayName": "x"}})).await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let v: Value = bad.json().await.unwrap();
    assert_eq!(v["error"]["status"], "INVALID_ARGUMENT", "{v}");
    stop.cancel();
}
