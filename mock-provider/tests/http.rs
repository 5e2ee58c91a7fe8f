//! End-to-end checks of the mock provider over real HTTP: each route's response shape, input
//! validation, the rpm limiter's 429 and headers, fault knobs, `/stats`, graceful shutdown, and
//! the binary's startup line and signal handling.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mock_provider::{Knobs, StatsSnapshot};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

fn client() -> Client {
    Client::builder().build().unwrap()
}

fn url(addr: SocketAddr, path: &str) -> String {
    format!("http://{addr}{path}")
}

async fn post(addr: SocketAddr, path: &str, body: Value) -> reqwest::Response {
    client().post(url(addr, path)).json(&body).send().await.unwrap()
}

async fn stats(addr: SocketAddr) -> StatsSnapshot {
    client().get(url(addr, "/stats")).send().await.unwrap().json().await.unwrap()
}

fn chat_body() -> Value {
    json!({"model": "gpt-test", "messages": [{"role": "user", "content": "hello there"}]})
}

fn request_number(resp: &reqwest::Response) -> u64 {
    let id = resp.headers()["x-request-id"].to_str().unwrap();
    id.strip_prefix("req_").unwrap_or_else(|| panic!("bad x-request-id {id}")).parse().unwrap()
}

#[tokio::test]
async fn chat_completions_shape() {
    let (addr, stop, task) = mock_provider::spawn(Knobs::default()).await;
    let resp = post(addr, "/v1/chat/completions", chat_body()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let n = request_number(&resp);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["id"], format!("chatcmpl-{n}"));
    assert_eq!(v["object"], "chat.completion");
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(v["model"], "gpt-test");
    assert_eq!(v["choices"][0]["index"], 0);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], "mock reply to: hello there");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], 3); // 11 chars
    assert_eq!(v["usage"]["total_tokens"], 3 + 7);

    // Ids increase per request and are unique.
    let a = request_number(&post(addr, "/v1/chat/completions", chat_body()).await);
    let b = request_number(&post(addr, "/v1/chat/completions", chat_body()).await);
    assert!(b > a && a > n);

    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn responses_and_moderations_shapes() {
    let (addr, stop, _task) = mock_provider::spawn(Knobs::default()).await;
    let resp = post(addr, "/v1/responses", json!({"model": "gpt-r", "input": "hello there"})).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let n = request_number(&resp);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["id"], format!("resp_{n}"));
    assert_eq!(v["object"], "response");
    assert_eq!(v["output"][0]["content"][0]["text"], "mock reply to: hello there");
    assert_eq!(v["usage"]["input_tokens"], 3);

    let body = json!({"input": ["fine", format!("not {}", mock_provider::moderations::FLAG_MARKER)]});
    let resp = post(addr, "/v1/moderations", body).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.unwrap();
    let flagged: Vec<bool> = v["results"].as_array().unwrap().iter().map(|r| r["flagged"].as_bool().unwrap()).collect();
    assert_eq!(flagged, [false, true]);

    for path in ["/v1/responses", "/v1/moderations"] {
        let resp = post(addr, path, json!({"model": "m"})).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{path}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
    let s = stats(addr).await;
    assert_eq!((s.by_path["/v1/responses"], s.by_path["/v1/moderations"]), (2, 2));
    stop.cancel();
}

#[tokio::test]
async fn other_routes_shapes() {
    let (addr, stop, _task) = mock_provider::spawn(Knobs::default()).await;

    let resp = post(addr, "/v1/completions", json!({"prompt": "once upon a time"})).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], "mock-model");
    assert_eq!(v["choices"][0]["text"], "mock completion of: once upon a time");
    assert_eq!(v["usage"]["prompt_tokens"], 4);

    let resp = post(addr, "/v1/embeddings", json!({"input": "one"})).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
    assert_eq!(v["data"][0]["object"], "embedding");
    assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), 8);

    let v: Value = post(addr, "/v1/embeddings", json!({"input": ["a", "b"]})).await.json().await.unwrap();
    assert_eq!(v["data"][1]["index"], 1);
    assert_eq!(v["usage"]["prompt_tokens"], 2);

    let resp = post(
        addr,
        "/v1/messages",
        json!({"model": "claude-test", "max_tokens": 16,
               "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let n = request_number(&resp);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["id"], format!("msg_{n}"));
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["model"], "claude-test");
    assert_eq!(v["content"][0]["type"], "text");
    assert_eq!(v["content"][0]["text"], "mock reply to: hi");
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["usage"]["input_tokens"], 1);
    assert_eq!(v["usage"]["output_tokens"], 5);
    // /stats sums the usage of the answers sent, in either dialect.
    let before = stats(addr).await.usage;
    let resp = post(addr, "/v1/chat/completions", chat_body()).await;
    let v: Value = resp.json().await.unwrap();
    let after = stats(addr).await.usage;
    assert_eq!(after.input_tokens - before.input_tokens, v["usage"]["prompt_tokens"].as_u64().unwrap());
    assert_eq!(after.output_tokens - before.output_tokens, v["usage"]["completion_tokens"].as_u64().unwrap());

    let resp = client().get(url(addr, "/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().contains_key("x-request-id"));
    assert_eq!(resp.text().await.unwrap(), "ok");

    // Even axum's own 404 carries a request id.
    let resp = client().get(url(addr, "/nope")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert!(resp.headers().contains_key("x-request-id"));
    stop.cancel();
}

#[tokio::test]
async fn bad_input_is_400_with_openai_error() {
    let (addr, stop, _task) = mock_provider::spawn(Knobs::default()).await;
    let cases = [
        ("/v1/chat/completions", "not json at all", "JSON"),
        ("/v1/chat/completions", r#"{"model":"x"}"#, "messages"),
        ("/v1/messages", r#"{"max_tokens":1}"#, "messages"),
        ("/v1/completions", r#"{"model":"x"}"#, "prompt"),
        ("/v1/embeddings", r#"{"model":"x"}"#, "input"),
    ];
    for (path, body, mentions) in cases {
        let resp =
            client().post(url(addr, path)).header("content-type", "application/json").body(body).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{path} {body}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["param"].is_null());
        assert!(v["error"]["code"].is_null());
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(mentions), "{path}: {message}");
    }
    let s = stats(addr).await;
    assert_eq!(s.requests, 5);
    assert_eq!(s.by_status.get("400"), Some(&5));
    assert_eq!(s.by_path.get("/v1/chat/completions"), Some(&2));
    stop.cancel();
}

#[tokio::test]
async fn rpm_limiter_429_and_headers() {
    // 60 rpm: one token of burst, one new token per second.
    let knobs = Knobs { rpm: Some(60), ..Knobs::default() };
    let (addr, stop, _task) = mock_provider::spawn(knobs).await;

    let ok = post(addr, "/v1/chat/completions", chat_body()).await;
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(ok.headers()["x-ratelimit-limit-requests"], "60");
    assert_eq!(ok.headers()["x-ratelimit-remaining-requests"], "0");
    assert!(ok.headers().contains_key("x-ratelimit-reset-requests"));
    assert!(!ok.headers().contains_key("retry-after"));
    assert!(!ok.headers().contains_key("anthropic-ratelimit-requests-limit"));

    let limited = post(addr, "/v1/chat/completions", chat_body()).await;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    let h = limited.headers();
    assert_eq!(h["retry-after"], "1");
    let retry_ms: u64 = h["retry-after-ms"].to_str().unwrap().parse().unwrap();
    assert!((1..=1000).contains(&retry_ms), "retry-after-ms {retry_ms}");
    assert_eq!(h["x-ratelimit-limit-requests"], "60");
    assert_eq!(h["x-ratelimit-remaining-requests"], "0");
    assert_eq!(h["x-ratelimit-reset-requests"], format!("{retry_ms}ms").as_str());
    let v: Value = limited.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");

    // Anthropic route: Anthropic headers and error body too.
    let limited = post(addr, "/v1/messages", json!({"messages": [{"role": "user", "content": "x"}]})).await;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    let h = limited.headers();
    assert_eq!(h["anthropic-ratelimit-requests-limit"], "60");
    assert_eq!(h["anthropic-ratelimit-requests-remaining"], "0");
    let reset = h["anthropic-ratelimit-requests-reset"].to_str().unwrap();
    assert!(reset.len() == 24 && reset.as_bytes()[10] == b'T' && reset.ends_with('Z'), "{reset}");
    assert!(h.contains_key("x-ratelimit-limit-requests"));
    let v: Value = limited.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "rate_limit_error");

    // Refused requests took no token: after the advertised wait, a request passes again.
    tokio::time::sleep(Duration::from_millis(retry_ms + 50)).await;
    let ok = post(addr, "/v1/messages", json!({"messages": [{"role": "user", "content": "x"}]})).await;
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(ok.headers()["anthropic-ratelimit-requests-limit"], "60");
    assert_eq!(ok.headers()["anthropic-ratelimit-requests-remaining"], "0");

    let s = stats(addr).await;
    assert_eq!(s.requests, 4);
    assert_eq!(s.by_status.get("200"), Some(&2));
    assert_eq!(s.by_status.get("429"), Some(&2));
    stop.cancel();
}

#[tokio::test]
async fn rpm_limiter_admits_about_one_second_of_burst() {
    let knobs = Knobs { rpm: Some(600), ..Knobs::default() };
    let (addr, stop, _task) = mock_provider::spawn(knobs).await;
    let started = Instant::now();
    let mut statuses = Vec::new();
    for _ in 0..30 {
        statuses.push(post(addr, "/v1/chat/completions", chat_body()).await.status());
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    // 10 of burst plus 10/s refill during the loop.
    let max_ok = 10 + (elapsed * 10.0).ceil() as usize;
    assert!(ok >= 10 && ok <= max_ok, "{ok} ok in {elapsed:.3}s");
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::TOO_MANY_REQUESTS).count(), 30 - ok);
    stop.cancel();
}

#[tokio::test]
async fn injected_statuses_use_documented_bodies() {
    for (knobs, status, check) in [
        (Knobs { error_500: 1.0, ..Knobs::default() }, 500, ("/error/type", "server_error")),
        (Knobs { error_503: 1.0, ..Knobs::default() }, 503, ("/error/type", "server_error")),
        (Knobs { error_400: 1.0, ..Knobs::default() }, 400, ("/error/type", "invalid_request_error")),
        (Knobs { error_429: 1.0, ..Knobs::default() }, 429, ("/error/code", "rate_limit_exceeded")),
        (Knobs { error_529: 1.0, ..Knobs::default() }, 529, ("/error/type", "overloaded_error")),
    ] {
        let (addr, stop, _task) = mock_provider::spawn(knobs).await;
        let resp = post(addr, "/v1/chat/completions", chat_body()).await;
        assert_eq!(resp.status().as_u16(), status);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v.pointer(check.0).unwrap(), check.1, "{status}: {v}");
        let s = stats(addr).await;
        assert_eq!(s.by_status.get(&status.to_string()), Some(&1));
        stop.cancel();
    }
}

#[tokio::test]
async fn garbage_and_mixed_stats_and_reset() {
    let knobs = Knobs { garbage_rate: 0.5, seed: 1, ..Knobs::default() };
    let (addr, stop, _task) = mock_provider::spawn(knobs).await;
    let mut garbage = 0;
    for _ in 0..40 {
        let resp = post(addr, "/v1/chat/completions", chat_body()).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let text = resp.text().await.unwrap();
        if serde_json::from_str::<Value>(&text).is_err() {
            assert!(text.starts_with("<html>"));
            garbage += 1;
        }
    }
    assert!((5..=35).contains(&garbage), "{garbage} garbage of 40");
    let s = stats(addr).await;
    assert_eq!(s.requests, 40);
    assert_eq!(s.garbage, garbage);
    assert_eq!(s.by_status.get("200"), Some(&40));
    assert_eq!(s.by_path.get("/v1/chat/completions"), Some(&40));
    assert_eq!(s.in_flight, 0);
    assert!(s.max_in_flight >= 1);

    let resp = client().post(url(addr, "/stats/reset")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let s = stats(addr).await;
    assert_eq!(s, StatsSnapshot::default());

    // The raw JSON has exactly the documented keys.
    let v: Value = client().get(url(addr, "/stats")).send().await.unwrap().json().await.unwrap();
    let mut keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "batches",
            "by_path",
            "by_status",
            "flex",
            "garbage",
            "hung",
            "in_flight",
            "max_in_flight",
            "models_listed",
            "other_project",
            "requests",
            "stolen",
            "tokens_admitted",
            "tpm_refused",
            "unauthorized",
            "usage"
        ]
    );
    stop.cancel();
}

#[tokio::test]
async fn only_the_valid_keys_are_accepted_in_either_header() {
    let keys = vec![mock_provider::knobs::SecretKey("sk-good".into())];
    let (addr, stop, _) = mock_provider::spawn(Knobs { valid_keys: keys, ..Knobs::default() }).await;
    let send = |auth: Option<(&'static str, &'static str)>, path: &'static str| {
        let mut req = client().post(url(addr, path)).json(&chat_body());
        if let Some((name, value)) = auth {
            req = req.header(name, value);
        }
        req.send()
    };
    assert_eq!(send(Some(("authorization", "Bearer sk-good")), "/v1/chat/completions").await.unwrap().status(), 200);
    assert_eq!(send(Some(("x-api-key", "sk-good")), "/v1/messages").await.unwrap().status(), 200);
    let refused = send(Some(("authorization", "Bearer sk-bad")), "/v1/chat/completions").await.unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let body: Value = refused.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("invalid API key"), "{body}");
    assert_eq!(send(None, "/v1/messages").await.unwrap().status(), StatusCode::UNAUTHORIZED);
    assert_eq!(client().get(url(addr, "/stats")).send().await.unwrap().status(), 200, "/stats needs no key");
    let s = stats(addr).await;
    assert_eq!((s.unauthorized, s.by_status.get("401").copied()), (2, Some(2)));
    stop.cancel();
}

#[tokio::test]
async fn the_token_limit_charges_prompt_plus_max_tokens_and_says_so_in_headers() {
    // 600 tokens a minute: 10 a second, and one second of burst.
    let (addr, stop, _) = mock_provider::spawn(Knobs { tpm: Some(600), ..Knobs::default() }).await;
    let body = json!({"model": "m", "max_tokens": 6, "messages": [{"role": "user", "content": "abcd"}]});
    let first = post(addr, "/v1/chat/completions", body.clone()).await;
    assert_eq!(first.status(), 200);
    // 1 prompt token + 6 requested: 3 of the 10 left.
    assert_eq!(first.headers()["x-ratelimit-remaining-tokens"], "3");
    assert_eq!(first.headers()["x-ratelimit-limit-tokens"], "600");
    let second = post(addr, "/v1/chat/completions", body).await;
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(second.headers()["x-ratelimit-remaining-tokens"], "0");
    assert!(second.headers().contains_key("retry-after-ms"));
    let s = stats(addr).await;
    assert_eq!((s.tokens_admitted, s.tpm_refused), (7, 1));
    stop.cancel();
}

#[tokio::test]
async fn same_seed_same_decisions() {
    let knobs = Knobs { error_500: 0.3, error_503: 0.2, seed: 99, ..Knobs::default() };
    let mut runs = Vec::new();
    for _ in 0..2 {
        let (addr, stop, _task) = mock_provider::spawn(knobs.clone()).await;
        let mut statuses = Vec::new();
        for _ in 0..50 {
            statuses.push(post(addr, "/v1/completions", json!({"prompt": "p"})).await.status());
        }
        stop.cancel();
        runs.push(statuses);
    }
    assert_eq!(runs[0], runs[1]);
    assert!(runs[0].contains(&StatusCode::INTERNAL_SERVER_ERROR));
    assert!(runs[0].contains(&StatusCode::SERVICE_UNAVAILABLE));
    assert!(runs[0].contains(&StatusCode::OK));
}

#[tokio::test]
async fn hang_counts_and_releases_on_disconnect_and_shutdown() {
    let knobs = Knobs { hang_rate: 1.0, ..Knobs::default() };
    let (addr, stop, task) = mock_provider::spawn(knobs).await;

    // A client that gives up: the request is counted as hung and leaves in_flight.
    let quick = Client::builder().timeout(Duration::from_millis(200)).build().unwrap();
    let err = quick.post(url(addr, "/v1/chat/completions")).json(&chat_body()).send().await.unwrap_err();
    assert!(err.is_timeout(), "{err}");
    let mut s = stats(addr).await;
    for _ in 0..50 {
        if s.in_flight == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        s = stats(addr).await;
    }
    assert_eq!(s.hung, 1);
    assert_eq!(s.in_flight, 0);
    assert!(s.by_status.is_empty(), "{:?}", s.by_status);

    // A client still waiting does not hold graceful shutdown hostage.
    let waiting = tokio::spawn(post(addr, "/v1/messages", json!({"messages": []})));
    while stats(addr).await.in_flight == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task).await.expect("server stops promptly").unwrap().unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    let _ = waiting.await;
}

#[tokio::test]
async fn latency_holds_many_concurrent_requests() {
    let knobs = Knobs { latency_ms: 200, jitter_ms: 20, ..Knobs::default() };
    let (addr, stop, _task) = mock_provider::spawn(knobs).await;
    let client = client();
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..300 {
        let client = client.clone();
        set.spawn(async move {
            client
                .post(format!("http://{addr}/v1/chat/completions"))
                .json(&chat_body())
                .send()
                .await
                .map(|r| r.status())
        });
    }
    while let Some(result) = set.join_next().await {
        assert_eq!(result.unwrap().unwrap(), StatusCode::OK);
    }
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(200), "{elapsed:?}");
    // Served concurrently, not one after another (300 x 200 ms would be a minute).
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    let s = stats(addr).await;
    assert_eq!(s.by_status.get("200"), Some(&300));
    assert!(s.max_in_flight >= 100, "max_in_flight {}", s.max_in_flight);
    stop.cancel();
}

/// Kills the child on drop so a failing assertion does not leak a server process.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn binary_prints_port_reads_env_and_exits_on_sigterm() {
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_mock-provider"))
            .args(["--port", "0"])
            .env("MOCK_ERROR_503", "1")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    })
    .await
    .unwrap();
    let addr: SocketAddr = line
        .trim_end()
        .strip_prefix("mock-provider listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    assert_ne!(addr.port(), 0);

    let resp = post(addr, "/v1/chat/completions", chat_body()).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE, "MOCK_ERROR_503 applies");

    let pid = child.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn hostile_models_misbehave_as_asked() {
    let (addr, stop, _task) = mock_provider::spawn(Knobs::default()).await;
    let no_redirects = Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let post = |model: &str| {
        no_redirects.post(url(addr, "/v1/chat/completions")).json(&json!({"model": model, "messages": []})).send()
    };
    let r = post("hostile-redirect").await.unwrap();
    assert_eq!(r.status(), StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(r.headers()["location"], mock_provider::hostile::STOLEN_PATH);
    let mut r = post("hostile-endless").await.unwrap();
    let mut read = 0;
    while read < 1 << 20 {
        read += r.chunk().await.unwrap().expect("the body does not end").len();
    }
    let r = post("hostile-retry").await.unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().keys().any(|k| k.as_str().contains("retry-after")));
    assert_eq!(post("mock-model").await.unwrap().status(), StatusCode::OK);
    // A client that follows the redirect is counted.
    client()
        .post(url(addr, "/v1/chat/completions"))
        .json(&json!({"model": "hostile-redirect", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(stats(addr).await.stolen, 1);
    stop.cancel();
}
