//! End-to-end tests of the fleet on the real RabbitMQ: the built `producer`, `worker` and
//! `mock-provider` binaries as processes, each test on its own namespace.

use std::time::Duration;

use e2e::*;

const WAIT: Duration = Duration::from_secs(180);

#[test]
fn five_thousand_requests_through_two_workers_come_back_exactly_once() {
    let mock = Mock::start(&["--seed", "7"]);
    let fleet = Fleet::new("five_k", &mock.url, "");
    let input = fleet.dir.join("in.jsonl");
    write_requests(&input, 5000);
    let _w1 = fleet.worker("w1", &[]);
    let _w2 = fleet.worker("w2", &[]);
    let (job, total) = fleet.submit(&input);
    assert_eq!(total, 5000);
    let output = fleet.dir.join("out.jsonl");
    let out = fleet.wait(&job, &output, WAIT.as_secs());
    assert!(out.status.success(), "wait failed: {}", String::from_utf8_lossy(&out.stderr));
    let by_status = assert_exactly_once(&read_output(&output), 5000);
    assert_eq!(by_status.get(&200), Some(&5000), "{by_status:?}");
    assert_eq!(mock.status_count(200), 5000, "the mock answered each request once");
    // Both workers took part.
    let lines = read_output(&output);
    let bodies_with_model = lines.iter().filter(|l| l["response"]["body"]["model"] == "mock-model").count();
    assert_eq!(bodies_with_model, 5000, "provider bodies are passed through");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("succeeded 5000"), "summary: {stderr}");
    fleet.cleanup(&[&job]);
}

#[test]
fn transient_errors_are_retried_until_every_request_succeeds() {
    let mock = Mock::start(&["--error-500", "0.15", "--error-503", "0.10", "--error-429", "0.05", "--seed", "11"]);
    let fleet = Fleet::new("transient", &mock.url, "");
    let _w = fleet.worker("w1", &[]);
    let job = fleet.submit_requests(1000);
    let lines = fleet.collect(&job);
    let by_status = assert_exactly_once(&lines, 1000);
    assert_eq!(by_status.get(&200), Some(&1000), "every request ends succeeded: {by_status:?}");
    let stats = mock.stats();
    let retried = mock.status_count(500) + mock.status_count(503) + mock.status_count(429);
    assert!(retried > 150, "about 30% of calls failed transiently: {stats}");
    assert_eq!(stats["requests"].as_u64().unwrap(), 1000 + retried, "one extra call per transient failure: {stats}");
    fleet.cleanup(&[&job]);
}

#[test]
fn client_errors_fail_at_once_with_the_error_in_the_output() {
    let mock = Mock::start(&["--error-400", "0.2", "--seed", "3"]);
    let fleet = Fleet::new("client_err", &mock.url, "");
    let _w = fleet.worker("w1", &[]);
    let job = fleet.submit_requests(500);
    let lines = fleet.collect(&job);
    let by_status = assert_exactly_once(&lines, 500);
    let answered_400 = mock.status_count(400);
    assert!(answered_400 > 50, "the mock answered some 400s");
    assert_eq!(by_status.get(&400).copied().unwrap_or(0), answered_400);
    assert_eq!(mock.stats()["requests"].as_u64().unwrap(), 500, "no request was retried");
    for l in lines.iter().filter(|l| l["response"]["status_code"] == 400) {
        assert!(l["error"].is_null(), "the provider answered: OpenAI's shape has error null: {l}");
        assert!(!succeeded(l), "{l}");
        assert!(l["response"]["body"]["error"]["message"].is_string(), "{l}");
    }
    for l in lines.iter().filter(|l| l["response"]["status_code"] == 200) {
        assert!(l["error"].is_null(), "{l}");
    }
    fleet.cleanup(&[&job]);
}

#[test]
fn a_worker_killed_mid_job_loses_nothing() {
    let mock = Mock::start(&["--latency-ms", "20", "--seed", "5"]);
    let fleet = Fleet::new("sigkill", &mock.url, "");
    let w1 = fleet.worker("w1", &[]);
    let job = fleet.submit_requests(2000);
    eventually(Duration::from_secs(60), "some progress", || mock.status_count(200) >= 300);
    w1.signal("KILL");
    drop(w1);
    let _w2 = fleet.worker("w2", &[]);
    let lines = fleet.collect(&job);
    let by_status = assert_exactly_once(&lines, 2000);
    assert_eq!(by_status.get(&200), Some(&2000));
    fleet.cleanup(&[&job]);
}

#[test]
fn sigterm_drains_in_flight_items_and_nothing_is_redelivered() {
    let mock = Mock::start(&["--latency-ms", "1500"]);
    let fleet = Fleet::new("sigterm", &mock.url, "[worker]\nmax_in_flight = 10\n");
    let mut w1 = fleet.worker("w1", &[]);
    let job = fleet.submit_requests(40);
    eventually(Duration::from_secs(30), "10 requests in flight", || mock.stats()["in_flight"].as_u64() == Some(10));
    w1.signal("TERM");
    assert_eq!(w1.wait_exit(Duration::from_secs(30)), Some(0), "worker exits 0 after draining");
    let calls_before = mock.stats()["requests"].as_u64().unwrap();
    assert_eq!(calls_before, 10, "no new item was taken after SIGTERM");
    assert_eq!(mock.status_count(200), 10, "the in-flight items finished");
    let _w2 = fleet.worker("w2", &[]);
    let lines = fleet.collect(&job);
    assert_exactly_once(&lines, 40);
    assert_eq!(mock.stats()["requests"].as_u64().unwrap(), 40, "the drained items were acked, not redelivered");
    assert!(fleet.worker_log("w1").contains("draining"), "{}", fleet.worker_log("w1"));
    fleet.cleanup(&[&job]);
}

#[test]
fn bad_input_files_are_refused_with_line_numbers_and_nothing_is_published() {
    let fleet = Fleet::new("bad_input", "http://127.0.0.1:9", "[producer]\nmax_body_bytes = 300\n");
    let good = |id: &str| {
        format!(
            r#"{{"custom_id":"{id}","method":"POST","url":"/v1/chat/completions","body":{{"model":"m","messages":[]}}}}"#
        )
    };
    let cases: Vec<(&str, String, &str)> = vec![
        ("malformed", format!("{}\n{{\"custom_id\": \n", good("a")), "line 2: malformed JSON"),
        (
            "missing",
            format!(
                "{}\n{}\n{{\"custom_id\":\"c\",\"method\":\"POST\",\"url\":\"/v1/chat/completions\"}}\n",
                good("a"),
                good("b")
            ),
            "line 3: missing field `body`",
        ),
        (
            "duplicate",
            format!("{}\n{}\n{}\n", good("a"), good("b"), good("a")),
            "line 3: duplicate custom_id \"a\" (first seen on line 1)",
        ),
        (
            "url",
            format!("{}\n", good("a").replace("/v1/chat/completions", "/v1/images/generations")),
            "line 1: url \"/v1/images/generations\" is not supported",
        ),
        (
            "oversized",
            format!(
                "{}\n",
                good("a").replace("\"messages\":[]", &format!("\"messages\":[],\"pad\":\"{}\"", "x".repeat(400)))
            ),
            "line 1: body is",
        ),
        ("empty", "\n\n".to_string(), "contains no requests"),
    ];
    for (name, content, want) in cases {
        let file = fleet.dir.join(format!("{name}.jsonl"));
        std::fs::write(&file, content).unwrap();
        let out = fleet.producer(&["submit", file.to_str().unwrap(), "--provider", "mock"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: exit code; stderr: {stderr}");
        assert!(stderr.contains(want), "{name}: want {want:?} in: {stderr}");
        assert!(out.stdout.is_empty(), "{name}: no job id printed");
    }
    let binary = fleet.dir.join("binary.jsonl");
    std::fs::write(&binary, [0x7f, b'E', b'L', b'F', 0xff, 0x00, 0x01, b'\n']).unwrap();
    let out = fleet.producer(&["submit", binary.to_str().unwrap(), "--provider", "mock"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 1"), "{}", String::from_utf8_lossy(&out.stderr));

    let file = fleet.dir.join("ok.jsonl");
    std::fs::write(&file, format!("{}\n", good("a"))).unwrap();
    let out = fleet.producer(&["submit", file.to_str().unwrap(), "--provider", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown provider \"nope\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Nothing reached the broker: the namespace's items queue was never even declared.
    assert_eq!(fleet.queue_len(&fleet.topology().items_queue(MOCK)), None);
}

#[test]
fn garbage_on_the_items_queue_is_dead_lettered_and_the_worker_keeps_going() {
    let mock = Mock::start(&[]);
    let fleet = Fleet::new("garbage", &mock.url, "");
    let w = fleet.worker("w1", &[]);
    let items_queue = fleet.topology().items_queue(MOCK);
    // `consuming` is logged once every queue is declared and bound (a queue that exists
    // may not be bound yet, and a publish then comes back unroutable).
    eventually(Duration::from_secs(30), "worker declared and bound its queue", || {
        fleet.queue_len(&items_queue).is_some() && fleet.worker_log("w1").contains("consuming")
    });
    let garbage: Vec<Vec<u8>> = vec![
        b"not json at all".to_vec(),
        br#"{"job_id": "x", "index": "wrong shape"}"#.to_vec(),
        vec![0xff, 0x00, 0xfe],
        br#"{"job_id":"j","index":0,"total":1,"custom_id":"c","provider":"mock","url":"/v1/chat"#.to_vec(),
    ];
    let n = garbage.len() as u32;
    fleet.amqp(|conn, t| async move {
        let ch = fleet::amqp::confirm_channel(&conn).await.unwrap();
        for g in garbage {
            fleet::amqp::publish_confirmed(&ch, &t.items_exchange(), "mock", &g, fleet::amqp::persistent_json())
                .await
                .unwrap();
        }
    });
    let dead = fleet.topology().dead_queue();
    eventually(Duration::from_secs(30), "garbage in the dead-letter queue", || fleet.queue_len(&dead) == Some(n));
    // The worker is still alive and still serves real work.
    let job = fleet.submit_requests(20);
    let lines = fleet.collect(&job);
    assert_exactly_once(&lines, 20);
    assert!(fleet.worker_log("w1").contains("malformed item"), "reason logged");
    drop(w);
    fleet.cleanup(&[&job]);
}

#[test]
fn wait_resumes_after_interruption_without_duplicates() {
    let mock = Mock::start(&["--latency-ms", "5"]);
    let fleet = Fleet::new("resume", &mock.url, "");
    let _w = fleet.worker("w1", &[]);
    let job = fleet.submit_requests(1500);
    let output = fleet.dir.join("out.jsonl");
    let mut first = fleet.producer_spawn(&["wait", &job, "--output", output.to_str().unwrap()]);
    eventually(Duration::from_secs(60), "some results written", || read_output_lossy(&output) > 200);
    first.signal("INT");
    let _ = first.wait_exit(Duration::from_secs(10));
    drop(first);
    // A torn last line of this job, as a crash mid-write would leave (the interrupted wait
    // may have left one already, or ended on a line boundary: either way the file ends in an
    // unfinished line of the job). `wait` refuses to cut off an unfinished line that is not
    // the job's (unit tests of `producer::collect`).
    let mut f = std::fs::OpenOptions::new().append(true).open(&output).unwrap();
    let torn = format!(r#"{{"id":"batch_req_{job}_7","custom_id":"req-"#);
    std::io::Write::write_all(&mut f, torn.as_bytes()).unwrap();
    drop(f);
    let out = fleet.wait(&job, &output, WAIT.as_secs());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_exactly_once(&read_output(&output), 1500);
    fleet.cleanup(&[&job]);
}

fn read_output_lossy(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path).map(|s| s.lines().count()).unwrap_or(0)
}

#[test]
fn a_provider_that_hangs_is_timed_out_and_retried() {
    let mock = Mock::start(&["--hang-rate", "0.2", "--seed", "13"]);
    let fleet = Fleet::new("hang", &mock.url, "[providers.mock]\ntimeout_s = 1\n");
    let _w = fleet.worker("w1", &[]);
    let job = fleet.submit_requests(200);
    let lines = fleet.collect(&job);
    let by_status = assert_exactly_once(&lines, 200);
    assert_eq!(by_status.get(&200), Some(&200), "{by_status:?}");
    assert!(mock.stats()["hung"].as_u64().unwrap() > 10, "the mock hung some requests");
    fleet.cleanup(&[&job]);
}

#[test]
fn the_api_key_is_never_logged_or_echoed_in_results() {
    const KEY: &str = "sk-test-9f8e7d6c5b4a-secret";
    let mock = Mock::start(&["--error-400", "0.3", "--error-500", "0.2", "--seed", "21"]);
    let fleet = Fleet::new("apikey", &mock.url, "[providers.mock]\napi_key_env = \"MOCK_API_KEY\"\n");
    let _w = fleet.worker("w1", &[("MOCK_API_KEY", KEY), ("RUST_LOG", "debug")]);
    let job = fleet.submit_requests(100);
    let output = fleet.dir.join("out.jsonl");
    let out = fleet.wait(&job, &output, 60);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let log = fleet.worker_log("w1");
    assert!(log.contains("retrying"), "debug logging was on");
    assert!(!log.contains(KEY) && !log.contains("9f8e7d6c5b4a"), "the key leaked into the log");
    let results = std::fs::read_to_string(&output).unwrap();
    assert!(!results.contains("9f8e7d6c5b4a"), "the key leaked into the results");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("9f8e7d6c5b4a"));
    fleet.cleanup(&[&job]);
}
