//! Hostile inputs end to end (issue 9): messages nobody legitimate would publish, put
//! straight onto the items, ledger and results queues, and a provider that answers
//! redirects, endless bodies and absurd retry hints, all in one run with good requests.
//! Every process stays up, every good item ends exactly once, the key goes nowhere else,
//! and the counts stay exact.

use std::io::Write;
use std::time::Duration;

use e2e::*;
use lapin::BasicProperties;
use serde_json::json;

/// Quick retries (absurd wait hints are capped by `max_elapsed_s`), one pass through a
/// delay queue, and a small response cap so an endless body ends fast.
const CONFIG: &str = "[retry]\nmax_attempts = 3\ninitial_backoff_ms = 5\nmax_backoff_ms = 50\nmax_elapsed_s = 2\n\
     delay_tiers_s = [1, 2]\nmax_delays = 1\ndelay_budget_s = 60\n\
     [providers.mock]\napi_key_env = \"HOSTILE_TEST_KEY\"\nmax_response_bytes = 65536\n";
const KEY: &str = "sk-hostile-test-key-4711";
const GOOD: usize = 60;
/// Requests per misbehaving answer.
const EACH: usize = 3;
const HOSTILE_MODELS: [(&str, &str); 3] =
    [("redirect", "hostile-redirect"), ("endless", "hostile-endless"), ("retry", "hostile-retry")];

fn item(job: &str, index: u64, total: u64, url: &str, body: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "job_id": job, "index": index, "total": total, "custom_id": format!("evil-{index}"),
        "provider": "mock", "url": url, "body": body, "submitted_at_ms": 0
    }))
    .unwrap()
}

#[test]
fn hostile_queues_and_a_hostile_provider_crash_nothing_leak_nothing_and_lose_nothing() {
    // Answers slow enough that the forged items below, which name the job's first indexes,
    // are refused and dead-lettered before the real items there are answered.
    let mock = Mock::start(&["--latency-ms", "150"]);
    let fleet = Fleet::new("hostile", &mock.url, CONFIG);
    let env = [("HOSTILE_TEST_KEY", KEY)];
    let mut workers = vec![fleet.worker("w1", &env), fleet.worker("w2", &env)];

    let input = fleet.dir.join("in.jsonl");
    write_requests(&input, GOOD);
    let mut f = std::fs::OpenOptions::new().append(true).open(&input).unwrap();
    for (name, model) in HOSTILE_MODELS {
        for i in 0..EACH {
            let body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
            let line = json!({"custom_id": format!("{name}-{i}"), "method": "POST", "url": "/v1/chat/completions", "body": body});
            writeln!(f, "{line}").unwrap();
        }
    }
    drop(f);
    let (job, total) = fleet.submit(&input);
    assert_eq!(total as usize, GOOD + 3 * EACH);

    // A job of its own for the streaming item, whose result is read back below.
    let stream_job = format!("job_stream_{}", &fleet.ns[fleet.ns.len() - 8..]);
    let long_job = "j".repeat(300);
    let items_queue_messages: Vec<(Vec<u8>, &str)> = vec![
        (b"\x00\xffnot json at all".to_vec(), "malformed"),
        (item(&job, 0, total, "@evil.example/v1/messages", json!({"model": "m"})), "forbidden_url"),
        (item(&job, 1, total, "/v1/../admin", json!({"model": "m"})), "forbidden_url"),
        (item(&job, 2, total, "http://127.0.0.1:1/v1/chat/completions", json!({"model": "m"})), "forbidden_url"),
        (item(&job, 1 << 40, 1 << 41, "/v1/chat/completions", json!({"model": "m"})), "invalid item"),
        (item(&job, total + 5, total, "/v1/chat/completions", json!({"model": "m"})), "invalid item"),
        (item(&long_job, 0, 1, "/v1/chat/completions", json!({"model": "m"})), "invalid item"),
    ];
    let ledger_messages = vec![
        b"{{{".to_vec(),
        serde_json::to_vec(&json!({"type": "job_submitted", "job_id": "x", "provider": "mock", "total": 1u64 << 40, "submitted_at_ms": 0})).unwrap(),
        serde_json::to_vec(&json!({"type": "job_submitted", "job_id": long_job, "provider": "mock", "total": 1, "submitted_at_ms": 0})).unwrap(),
        serde_json::to_vec(&json!({"type": "items_finished", "job_id": job, "provider": "mock", "items": [[1u64 << 40, "failed"]]})).unwrap(),
        serde_json::to_vec(&json!({"type": "items_finished", "job_id": job, "provider": "mock", "items": [[total + 100, "failed"]]})).unwrap(),
    ];
    let out_of_bounds_result = json!({
        "job_id": job, "index": 1u64 << 40, "total": 1u64 << 41, "custom_id": "evil-result", "provider": "mock",
        "status": "failed", "response": null, "error": null, "attempts": 0, "worker": "evil", "finished_at_ms": 0
    });
    // A group whose first result is fine but whose second is out of bounds: none is written.
    let out_of_bounds_group = json!({
        "job_id": job, "provider": "mock", "total": total, "worker": "evil", "results": [
            {"index": 0, "custom_id": "evil-group", "status": "succeeded", "response": null, "error": null,
             "attempts": 0, "finished_at_ms": 0},
            {"index": total, "custom_id": "evil-group-2", "status": "failed", "response": null, "error": null,
             "attempts": 0, "finished_at_ms": 0}]
    });
    let (single, group) = (fleet::wire::KIND_RESULT, fleet::wire::KIND_RESULTS);
    let results_messages = vec![
        (single, b"not a result".to_vec()),
        (single, serde_json::to_vec(&out_of_bounds_result).unwrap()),
        (group, b"[not a group".to_vec()),
        (group, serde_json::to_vec(&out_of_bounds_group).unwrap()),
    ];
    let stream_item =
        item(&stream_job, 0, 1, "/v1/chat/completions", json!({"model": "mock-model", "messages": [], "stream": true}));

    let (job2, stream2) = (job.clone(), stream_job.clone());
    let expected_dead: Vec<&str> = items_queue_messages.iter().map(|(_, r)| *r).collect();
    fleet.amqp(|conn, t| async move {
        let ch = fleet::amqp::confirm_channel(&conn).await.unwrap();
        t.declare_results_queue(&ch, &stream2).await.unwrap();
        let json_props = fleet::amqp::persistent_json;
        for (payload, _) in &items_queue_messages {
            fleet::amqp::publish_confirmed(&ch, &t.items_exchange(), "mock", payload, json_props()).await.unwrap();
        }
        fleet::amqp::publish_confirmed(&ch, &t.items_exchange(), "mock", &stream_item, json_props()).await.unwrap();
        for payload in &ledger_messages {
            fleet::amqp::publish_confirmed(&ch, "", &t.ledger_queue(), payload, json_props()).await.unwrap();
        }
        for (kind, payload) in &results_messages {
            let props = BasicProperties::default().with_type((*kind).into());
            fleet::amqp::publish_confirmed(&ch, &t.results_exchange(), &job2, payload, props).await.unwrap();
        }
    });

    let lines = fleet.collect(&job);
    assert_eq!(lines.len(), GOOD + 3 * EACH, "one line per request, nothing forged");
    let mut seen = std::collections::HashSet::new();
    for l in &lines {
        let id = l["custom_id"].as_str().unwrap();
        assert!(seen.insert(id.to_string()), "{id} twice");
        let (kind, _) = id.split_once('-').unwrap();
        // An answered failure has `error` null and its status in `response` (OpenAI's
        // output shape); one without a usable answer has the error.
        let (want_code, want_status, want) = match kind {
            "req" => (None, Some(200), fleet::wire::ItemStatus::Succeeded),
            "redirect" => (None, Some(307), fleet::wire::ItemStatus::Failed),
            "endless" => (Some("response_too_large"), None, fleet::wire::ItemStatus::Failed),
            "retry" => (None, Some(429), fleet::wire::ItemStatus::Failed),
            other => panic!("unexpected custom_id {other}"),
        };
        assert_eq!(l["error"]["code"].as_str(), want_code, "{l}");
        assert_eq!(l["response"]["status_code"].as_u64(), want_status, "{l}");
        assert_eq!(fleet::wire::output_line_status(l), want, "{l}");
    }
    assert_eq!(mock.stats()["stolen"], 0, "no request followed a redirect");

    let status = fleet.final_status(&job);
    assert_eq!(status["status"], "completed", "{status}");
    assert_eq!(status["succeeded"].as_u64(), Some(GOOD as u64), "{status}");
    assert_eq!(status["failed"].as_u64(), Some(3 * EACH as u64), "{status}");
    assert_eq!(status["total"].as_u64(), Some(total), "{status}");

    // The streaming item failed without a call.
    let topology = fleet.topology();
    let result: serde_json::Value = fleet.amqp(|conn, _| async move {
        let ch = conn.create_channel().await.unwrap();
        let queue = topology.results_queue(&stream_job);
        // A results stream is read from its first message (streams have no basic.get).
        ch.basic_qos(10, Default::default()).await.unwrap();
        let mut from_first = lapin::types::FieldTable::default();
        from_first.insert("x-stream-offset".into(), lapin::types::AMQPValue::LongString("first".into()));
        let mut consumer =
            ch.basic_consume(queue.as_str().into(), "hostile".into(), Default::default(), from_first).await.unwrap();
        let next = tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(&mut consumer)).await;
        // A worker sends its results in groups: this one holds the item's alone.
        let got = next.ok().flatten().map(|d| {
            let v: serde_json::Value = serde_json::from_slice(&d.unwrap().data).unwrap();
            v["results"][0].clone()
        });
        let _ = ch.queue_delete(queue.as_str().into(), Default::default()).await;
        got.expect("a result for the streaming item")
    });
    assert_eq!(result["error"]["code"], "stream_not_supported", "{result}");
    assert_eq!(result["attempts"], 0, "{result}");

    // Each hostile item is parked with its reason, and nothing else is.
    let out = fleet.producer(&["dead", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dead: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(dead.len(), expected_dead.len(), "{dead:#?}");
    for want in ["malformed", "forbidden_url", "invalid item"] {
        let n = dead.iter().filter(|d| d["reason"].as_str().unwrap_or("").contains(want)).count();
        assert_eq!(n, expected_dead.iter().filter(|r| **r == want).count(), "{want}: {dead:#?}");
    }

    // Every process is still up, and the key went nowhere it should not.
    for w in &mut workers {
        assert!(w.child.try_wait().unwrap().is_none(), "{} exited", w.name);
    }
    assert_eq!(mock.stats()["requests"].as_u64().map(|n| n > 0), Some(true), "the mock is up");
    for id in ["w1", "w2"] {
        let log = fleet.worker_log(id);
        assert!(!log.contains(KEY), "{id} logged the key");
        assert!(!log.contains("panicked"), "{id} panicked:\n{log}");
    }
    let output = std::fs::read_to_string(fleet.dir.join(format!("{job}.jsonl"))).unwrap();
    assert!(!output.contains(KEY));
    fleet.cleanup(&[&job]);
}

/// Issue 21, point 3: a message that is not a checkpoint, published to the tracker's
/// checkpoint queue (which keeps only its newest message), no longer disables the tracker
/// role: the next tracker restores the copy, parks the garbage, and jobs still end.
#[test]
fn garbage_on_the_checkpoint_queue_does_not_disable_the_tracker() {
    let mock = Mock::start(&[]);
    let fleet = Fleet::new("badcheckpoint", &mock.url, "");
    let mut w1 = fleet.worker("w1", &[]);
    let job = fleet.submit_requests(30);
    assert_exactly_once(&fleet.collect(&job), 30);
    fleet.final_status(&job);
    w1.signal("TERM");
    assert_eq!(w1.wait_exit(Duration::from_secs(30)), Some(0));
    // 16 bytes of garbage replace the newest checkpoint.
    let queue = fleet.topology().tracker_state_queue();
    fleet.amqp(|conn, _| async move {
        let ch = fleet::amqp::confirm_channel(&conn).await.unwrap();
        fleet::amqp::publish_confirmed(&ch, "", &queue, b"\x00garbage\xffgarbage", lapin::BasicProperties::default())
            .await
            .unwrap();
    });
    let _w2 = fleet.worker("w2", &[]);
    fleet.wait_for_tracker();
    let status = fleet.final_status(&job);
    assert_eq!(status["status"], "completed", "the job restored from the copy: {status}");
    let job2 = fleet.submit_requests(20);
    assert_exactly_once(&fleet.collect(&job2), 20);
    assert_eq!(fleet.final_status(&job2)["status"], "completed");
    let log = fleet.worker_log("w2");
    assert!(log.contains("a tracker checkpoint is unreadable"), "{log}");
    let dead = fleet.producer(&["dead", "--json"]);
    assert!(String::from_utf8_lossy(&dead.stdout).contains("unreadable tracker checkpoint"), "parked for a look");
    fleet.cleanup(&[&job, &job2]);
}
