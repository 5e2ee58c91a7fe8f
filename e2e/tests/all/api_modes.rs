//! `producer serve` and `api.mode`: a batch created through the API runs through the
//! provider's batch API when its `completion_window` allows (24 h or more) and the provider
//! has one, online otherwise; always online under `api.mode = "online"`, and through the
//! batch API whatever the window under `api.mode = "batch"`. The provider side proves it:
//! the mock's `/stats` counts the OpenAI batches it created per chunk tag
//! (`batches.openai_created`) and the online calls it answered (`requests`). Plain HTTP
//! (curl), a real worker, the real RabbitMQ.

use std::path::Path;
use std::time::{Duration, Instant};

use e2e::*;

use super::api::{curl, serve, Server, KEY_A};

/// The poll interval of the tests' provider.
const POLL_S: u64 = 1;
/// Requests per provider batch: a file of [`LINES`] makes 3 chunks.
const MAX_REQUESTS: u64 = 120;
const LINES: usize = 300;

/// The bearer header of the servers' key A.
fn auth() -> String {
    super::api::auth(KEY_A)
}

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|_| panic!("not JSON: {s}"))
}

/// A batch run through the API to its end.
struct Ran {
    job: String,
    file: String,
    status: String,
    output: Vec<Value>,
}

/// Uploads `input`, creates a batch of it with `window`, waits until it ends and downloads
/// its output file.
fn run_batch(server: &Server, input: &Path, window: &str) -> Ran {
    let (code, body) = curl(&[
        "-H",
        &auth(),
        "-F",
        "purpose=batch",
        "-F",
        &format!("file=@{}", input.display()),
        &format!("{}/v1/files", server.url),
    ]);
    assert_eq!(code, 200, "upload: {body}");
    let file = json(&body)["id"].as_str().expect("file id").to_string();
    let create =
        format!(r#"{{"input_file_id":"{file}","endpoint":"/v1/chat/completions","completion_window":"{window}"}}"#);
    let (code, body) = curl(&[
        "-H",
        &auth(),
        "-H",
        "Content-Type: application/json",
        "-d",
        &create,
        &format!("{}/v1/batches", server.url),
    ]);
    assert_eq!(code, 200, "create: {body}");
    let batch = json(&body);
    let id = batch["id"].as_str().expect("batch id").to_string();
    assert_eq!(batch["completion_window"], window, "the Batch object keeps its shape: {batch}");
    let started = Instant::now();
    let batch = loop {
        let (code, body) = curl(&["-H", &auth(), &format!("{}/v1/batches/{id}", server.url)]);
        assert_eq!(code, 200, "retrieve: {body}");
        let b = json(&body);
        if ["completed", "failed", "cancelled", "expired"].contains(&b["status"].as_str().unwrap_or_default()) {
            break b;
        }
        assert!(started.elapsed() < Duration::from_secs(180), "batch {id} did not end: {b}");
        std::thread::sleep(Duration::from_millis(500));
    };
    let output = match batch["output_file_id"].as_str() {
        Some(out) => {
            let (code, body) = curl(&["-H", &auth(), &format!("{}/v1/files/{out}/content", server.url)]);
            assert_eq!(code, 200, "output: {body}");
            body.lines().map(json).collect()
        }
        None => Vec::new(),
    };
    Ran {
        job: id.replace("batch_", "job_"),
        file,
        status: batch["status"].as_str().unwrap_or_default().to_string(),
        output,
    }
}

/// A fleet whose `mock` provider has a batch API, cutting chunks of [`MAX_REQUESTS`].
fn batch_fleet(test: &str, mock: &Mock) -> Fleet {
    let extra = format!(
        "[providers.mock]\nbatch = true\nbatch_poll_interval_s = {POLL_S}\nbatch_max_requests = {MAX_REQUESTS}\n"
    );
    Fleet::new(test, &mock.url, &extra)
}

/// Provider batches the mock created for `job`, by chunk tag.
fn created_for(mock: &Mock, job: &str) -> Vec<(String, u64)> {
    let stats = mock.stats();
    let map = stats["batches"]["openai_created"].as_object().cloned().unwrap_or_default();
    map.into_iter().filter(|(tag, _)| tag.contains(job)).map(|(tag, n)| (tag, n.as_u64().unwrap_or(0))).collect()
}

/// Online calls the mock answered.
fn online_requests(mock: &Mock) -> u64 {
    mock.stats()["requests"].as_u64().unwrap_or(0)
}

/// Deletes the namespace's API streams, the jobs' queues and the provider's chunk queues.
fn cleanup(fleet: &Fleet, jobs: &[&str], files: &[&str]) {
    fleet.amqp(|conn, t| async move {
        let ch = conn.create_channel().await.expect("channel");
        let _ = t.delete_chunk_queues(&ch, MOCK, POLL_S).await;
    });
    super::api::cleanup(fleet, jobs, files);
}

/// The mode the server logged when it created the batch of `job` (`mode=` of its
/// `batch created` line).
fn logged_mode(fleet: &Fleet, server: &str, job: &str) -> String {
    let log = fleet.worker_log(server);
    let line = log
        .lines()
        .find(|l| l.contains("batch created") && l.contains(job))
        .unwrap_or_else(|| panic!("no `batch created` line for {job} in:\n{log}"));
    let at = line.find(" mode=").unwrap_or_else(|| panic!("no mode in {line}")) + " mode=".len();
    line[at..].split_whitespace().next().unwrap_or_default().trim_matches('"').to_string()
}

#[test]
fn auto_runs_a_24h_batch_through_the_provider_batch_api_and_a_1h_batch_online() {
    let mock = Mock::start(&["--batch-complete-ms", "1500"]);
    let fleet = batch_fleet("api-modes-auto", &mock);
    let _w = fleet.worker("w1", &[]);
    // The default, said explicitly: api.rs's servers run online unless told otherwise.
    let server = serve(&fleet, "serve", &[("FLEET__API__MODE", "auto")]);
    let input = fleet.dir.join("in.jsonl");
    write_requests(&input, LINES);

    let day = run_batch(&server, &input, "24h");
    assert_eq!(day.status, "completed");
    let by_status = assert_exactly_once(&day.output, LINES);
    assert_eq!(by_status.get(&200).copied(), Some(LINES as u64), "every request answered 200: {by_status:?}");
    let tags = created_for(&mock, &day.job);
    assert_eq!(tags.len(), LINES.div_ceil(MAX_REQUESTS as usize), "one provider batch per chunk: {tags:?}");
    assert!(tags.iter().all(|(_, n)| *n == 1), "a chunk's batch was created more than once: {tags:?}");
    assert_eq!(online_requests(&mock), 0, "a 24 h batch makes no online call");
    assert_eq!(logged_mode(&fleet, "serve", &day.job), "batch", "the mode is logged");

    let hour = run_batch(&server, &input, "1h");
    assert_eq!(hour.status, "completed");
    let by_status = assert_exactly_once(&hour.output, LINES);
    assert_eq!(by_status.get(&200).copied(), Some(LINES as u64), "{by_status:?}");
    assert!(created_for(&mock, &hour.job).is_empty(), "a 1 h batch creates no provider batch");
    assert_eq!(online_requests(&mock), LINES as u64, "a 1 h batch runs online: one call per request");
    assert_eq!(logged_mode(&fleet, "serve", &hour.job), "online", "the mode is logged");

    cleanup(&fleet, &[&day.job, &hour.job], &[&day.file, &hour.file]);
}

#[test]
fn api_mode_online_runs_a_24h_batch_online() {
    let mock = Mock::start(&["--batch-complete-ms", "1500"]);
    let fleet = batch_fleet("api-modes-online", &mock);
    let _w = fleet.worker("w1", &[]);
    let server = serve(&fleet, "serve", &[("FLEET__API__MODE", "online")]);
    let input = fleet.dir.join("in.jsonl");
    write_requests(&input, LINES);

    let day = run_batch(&server, &input, "24h");
    assert_eq!(day.status, "completed");
    let by_status = assert_exactly_once(&day.output, LINES);
    assert_eq!(by_status.get(&200).copied(), Some(LINES as u64), "{by_status:?}");
    assert!(mock.stats()["batches"]["openai_created"].as_object().is_none_or(|m| m.is_empty()), "no provider batch");
    assert_eq!(online_requests(&mock), LINES as u64, "one online call per request");
    assert_eq!(logged_mode(&fleet, "serve", &day.job), "online", "the mode is logged");

    cleanup(&fleet, &[&day.job], &[&day.file]);
}

#[test]
fn api_mode_batch_runs_a_1h_batch_through_the_provider_batch_api() {
    let mock = Mock::start(&["--batch-complete-ms", "1500"]);
    let fleet = batch_fleet("api-modes-batch", &mock);
    let _w = fleet.worker("w1", &[]);
    let server = serve(&fleet, "serve", &[("FLEET__API__MODE", "batch")]);
    let input = fleet.dir.join("in.jsonl");
    write_requests(&input, LINES);

    let hour = run_batch(&server, &input, "1h");
    assert_eq!(hour.status, "completed");
    let by_status = assert_exactly_once(&hour.output, LINES);
    assert_eq!(by_status.get(&200).copied(), Some(LINES as u64), "{by_status:?}");
    assert_eq!(created_for(&mock, &hour.job).len(), LINES.div_ceil(MAX_REQUESTS as usize), "one batch per chunk");
    assert_eq!(online_requests(&mock), 0, "no online call");
    assert_eq!(logged_mode(&fleet, "serve", &hour.job), "batch", "the mode is logged");

    cleanup(&fleet, &[&hour.job], &[&hour.file]);
}
