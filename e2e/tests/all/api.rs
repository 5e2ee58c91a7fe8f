//! `producer serve` end to end: the real `openai` and `anthropic` Python packages (from
//! PyPI, in a venv under `.run/api-venv`, created once) against the server, a worker and
//! the mock; then bad input, other keys' ids and two replicas, over plain HTTP (curl).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use e2e::*;

/// The API keys the tests' servers accept (api_modes.rs uses them too).
pub(crate) const KEY_A: &str = "sk-e2e-key-a-0123456789";
const KEY_B: &str = "sk-e2e-key-b-9876543210";

/// One `producer serve` process.
pub(crate) struct Server {
    proc: Proc,
    pub(crate) url: String,
}

/// Starts `producer serve` for `fleet` with keys A and B (and `env`, which may set
/// another `FLEET__API__MODE`), ready when it answers.
pub(crate) fn serve(fleet: &Fleet, name: &str, env: &[(&str, &str)]) -> Server {
    let port = free_port();
    let mut cmd = Command::new(bin("producer"));
    cmd.arg("--config")
        .arg(&fleet.config)
        .arg("serve")
        .env("FLEET__API__LISTEN", format!("127.0.0.1:{port}"))
        .env("FLEET__API__KEY_ENVS", "E2E_API_KEY_A,E2E_API_KEY_B")
        .env("E2E_API_KEY_A", KEY_A)
        .env("E2E_API_KEY_B", KEY_B)
        // These tests watch batches run online (cancelled mid-run, done in seconds); the
        // test fleets' `mock` has a batch API (the built-in mock's `batch = true`), so
        // `api.mode = "auto"` would run their 24 h batches through it (see api_modes.rs).
        .env("FLEET__API__MODE", "online")
        .envs(env.iter().copied());
    let proc = Proc::spawn_logged(&mut cmd, name, &fleet.dir.join(format!("{name}.log"))).expect("start serve");
    let url = format!("http://127.0.0.1:{port}");
    eventually(Duration::from_secs(30), "producer serve answers", || curl(&["-f", &format!("{url}/metrics")]).0 == 200);
    Server { proc, url }
}

/// Runs curl; returns (HTTP status, body).
pub(crate) fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl").args(["-s", "-w", "\n%{http_code}"]).args(args).output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// The bearer header of `key`.
pub(crate) fn auth(key: &str) -> String {
    format!("Authorization: Bearer {key}")
}

/// The venv's python with `openai` and `anthropic` installed (created on first use).
fn python() -> PathBuf {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.run/api-venv");
        let py = venv.join("bin/python");
        let ready = || Command::new(&py).args(["-c", "import openai, anthropic"]).status().is_ok_and(|s| s.success());
        if !ready() {
            let ok = Command::new("python3").args(["-m", "venv"]).arg(&venv).status().is_ok_and(|s| s.success());
            assert!(ok, "python3 -m venv {}", venv.display());
            let ok = Command::new(venv.join("bin/pip"))
                .args(["install", "-q", "openai", "anthropic"])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok && ready(), "pip install openai anthropic into {}", venv.display());
        }
        py
    })
    .clone()
}

/// Runs a Python script with `API_URL`, `KEY_A`, `KEY_B` set; fails the test if it fails.
fn run_python(dir: &Path, name: &str, script: &str, url: &str, args: &[&str]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, script).expect("write script");
    let out: Output = Command::new(python())
        .arg(&path)
        .args(args)
        .env("API_URL", url)
        .env("KEY_A", KEY_A)
        .env("KEY_B", KEY_B)
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{name} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("--- {name} ---\n{stdout}");
    stdout
}

/// The value after `key=` on the script's output line starting with `tag`.
fn field(out: &str, tag: &str, key: &str) -> String {
    let line = out
        .lines()
        .find(|l| l.starts_with(tag) && l.contains(&format!(" {key}=")))
        .unwrap_or_else(|| panic!("no {tag} line with {key} in:\n{out}"));
    let at = line.find(&format!("{key}=")).unwrap_or_else(|| panic!("no {key} in {line}")) + key.len() + 1;
    line[at..].split_whitespace().next().unwrap_or_default().to_string()
}

/// Deletes the namespace's API streams and the jobs' queues.
pub(crate) fn cleanup(fleet: &Fleet, jobs: &[&str], files: &[&str]) {
    let files: Vec<String> = files.iter().map(|f| f.to_string()).collect();
    fleet.amqp(|conn, t| async move {
        let ch = conn.create_channel().await.expect("channel");
        let mut names = vec![t.api_meta_stream()];
        names.extend(files.iter().map(|f| t.api_file_stream(f)));
        for q in names {
            let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
        }
    });
    fleet.cleanup(jobs);
}

const OPENAI_SESSION: &str = r#"
import os, sys, time, openai
from openai import OpenAI
base = os.environ["API_URL"] + "/v1"
c = OpenAI(base_url=base, api_key=os.environ["KEY_A"], max_retries=0)
f = c.files.create(file=open(sys.argv[1], "rb"), purpose="batch")
print(f"file id={f.id} bytes={f.bytes} purpose={f.purpose}")
b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                     metadata={"team": "e2e"})
print(f"created id={b.id} status={b.status}")
t0 = time.time()
while b.status not in ("completed", "failed", "cancelled", "expired"):
    time.sleep(0.5)
    b = c.batches.retrieve(b.id)
rc = b.request_counts
print(f"done id={b.id} status={b.status} total={rc.total} completed={rc.completed} failed={rc.failed} "
      f"output={b.output_file_id} errors={b.error_file_id} secs={time.time() - t0:.1f}")
content = c.files.content(b.output_file_id)
open(sys.argv[2], "wb").write(content.content)
try:
    OpenAI(base_url=base, api_key="sk-wrong", max_retries=0).batches.retrieve(b.id)
    print("wrongkey result=none")
except openai.AuthenticationError as e:
    print(f"wrongkey result=AuthenticationError status={e.status_code}")
other = OpenAI(base_url=base, api_key=os.environ["KEY_B"], max_retries=0)
for what, call in [("batch", lambda: other.batches.retrieve(b.id)), ("file", lambda: other.files.retrieve(f.id)),
                   ("content", lambda: other.files.content(b.output_file_id)),
                   ("cancel", lambda: other.batches.cancel(b.id))]:
    try:
        call()
        print(f"otherkey {what}=visible")
    except openai.NotFoundError:
        print(f"otherkey {what}=NotFoundError")
page = c.batches.list(limit=10)
print(f"list n={len(page.data)} first={page.data[0].id} other_n={len(other.batches.list().data)}")
"#;

#[test]
fn the_openai_sdk_runs_a_batch_of_2000_lines_and_keys_see_only_their_own() {
    let mock = Mock::start(&[]);
    let fleet = Fleet::new("api-openai", &mock.url, "");
    let _w = fleet.worker("w1", &[]);
    let server = serve(&fleet, "serve", &[]);
    let input = fleet.dir.join("in.jsonl");
    write_requests(&input, 2000);
    let output = fleet.dir.join("out.jsonl");
    let out = run_python(
        &fleet.dir,
        "openai_session.py",
        OPENAI_SESSION,
        &server.url,
        &[input.to_str().unwrap(), output.to_str().unwrap()],
    );
    assert_eq!(field(&out, "done", "status"), "completed");
    assert_eq!(field(&out, "done", "completed"), "2000");
    assert_eq!(field(&out, "done", "errors"), "None", "no error file when every request succeeded");
    assert_exactly_once(&read_output(&output), 2000);
    assert_eq!(field(&out, "wrongkey", "result"), "AuthenticationError");
    for what in ["batch", "file", "content", "cancel"] {
        assert_eq!(field(&out, "otherkey", what), "NotFoundError", "{what} of another key");
    }
    assert_eq!((field(&out, "list", "n"), field(&out, "list", "other_n")), ("1".into(), "0".into()));
    let metrics = curl(&[&format!("{}/metrics", server.url)]).1;
    assert!(metrics.contains(r#"route="/v1/files",status="200""#), "{metrics}");
    assert!(!metrics.contains(KEY_A) && !metrics.contains(KEY_B), "no key in the metrics");
    let log = fleet.worker_log("serve");
    assert!(!log.contains(KEY_A) && !log.contains(KEY_B), "no key in the log");
    let batch = field(&out, "done", "id");
    let job = batch.replace("batch_", "job_");
    let file = field(&out, "file", "id");
    cleanup(&fleet, &[&job], &[&file]);
}

const ANTHROPIC_SESSION: &str = r#"
import os, time, anthropic
c = anthropic.Anthropic(base_url=os.environ["API_URL"], api_key=os.environ["KEY_A"], max_retries=0)
reqs = [{"custom_id": f"req-{i}", "params": {"model": "mock-claude", "max_tokens": 16,
         "messages": [{"role": "user", "content": f"Say something about {i}."}]}} for i in range(500)]
b = c.messages.batches.create(requests=reqs)
print(f"created id={b.id} status={b.processing_status}")
while b.processing_status != "ended":
    time.sleep(0.5)
    b = c.messages.batches.retrieve(b.id)
rc = b.request_counts
print(f"done id={b.id} status={b.processing_status} succeeded={rc.succeeded} errored={rc.errored} url={b.results_url}")
ids = set()
kinds = {}
for r in c.messages.batches.results(b.id):
    ids.add(r.custom_id)
    kinds[r.result.type] = kinds.get(r.result.type, 0) + 1
missing = [i for i in range(500) if f"req-{i}" not in ids]
print(f"results n={len(ids)} missing={len(missing)} kinds={kinds.get('succeeded', 0)}")
print(f"list n={len(c.messages.batches.list().data)}")
try:
    anthropic.Anthropic(base_url=os.environ["API_URL"], api_key=os.environ["KEY_B"], max_retries=0).messages.batches.retrieve(b.id)
    print("otherkey result=visible")
except anthropic.NotFoundError:
    print("otherkey result=NotFoundError")
"#;

#[test]
fn the_anthropic_sdk_runs_a_message_batch_of_500_requests() {
    let mock = Mock::start(&[]);
    let claude = format!("[providers.claude]\nkind = \"anthropic\"\nbase_url = \"{}\"\n", mock.url);
    let fleet = Fleet::new("api-anthropic", &mock.url, &claude);
    let _w = fleet.worker("w1", &[]);
    let server = serve(&fleet, "serve", &[]);
    let out = run_python(&fleet.dir, "anthropic_session.py", ANTHROPIC_SESSION, &server.url, &[]);
    assert_eq!(field(&out, "done", "status"), "ended");
    assert_eq!(field(&out, "done", "succeeded"), "500");
    assert!(field(&out, "done", "url").starts_with(&server.url), "results_url points back at the server");
    assert_eq!((field(&out, "results", "n"), field(&out, "results", "missing")), ("500".into(), "0".into()));
    assert_eq!(field(&out, "results", "kinds"), "500", "every result succeeded");
    assert_eq!(field(&out, "otherkey", "result"), "NotFoundError");
    let job = field(&out, "done", "id").replace("msgbatch_", "job_");
    cleanup(&fleet, &[&job], &[]);
}

#[test]
fn bad_input_gets_clear_errors_and_replicas_share_files() {
    let mock = Mock::start(&[]);
    let fleet = Fleet::new("api-bad", &mock.url, "");
    let _w = fleet.worker("w1", &[]);
    let limits = [("FLEET__API__MAX_FILE_BYTES", "200000")];
    let a = serve(&fleet, "serve-a", &limits);
    let b = serve(&fleet, "serve-b", &limits);
    let upload = |url: &str, path: &Path| {
        curl(&[
            "-H",
            &auth(KEY_A),
            "-F",
            "purpose=batch",
            "-F",
            &format!("file=@{}", path.display()),
            &format!("{url}/v1/files"),
        ])
    };
    let json = |s: &str| -> Value { serde_json::from_str(s).unwrap_or_else(|_| panic!("not JSON: {s}")) };

    // A bad line 3 is named; nothing is stored.
    let bad = fleet.dir.join("bad.jsonl");
    write_requests(&bad, 5);
    let text = std::fs::read_to_string(&bad).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines[2] = r#"{"custom_id":"x","method":"POST","url":"/v1/chat/completions"}"#;
    std::fs::write(&bad, lines.join("\n")).unwrap();
    let (code, body) = upload(&a.url, &bad);
    assert_eq!(code, 400, "{body}");
    let err = json(&body);
    assert!(err["error"]["message"].as_str().unwrap().contains("line 3: missing field `body`"), "{body}");
    assert_eq!(err["error"]["param"], "file");

    // Oversized: 413, in OpenAI's shape.
    let big = fleet.dir.join("big.jsonl");
    write_requests(&big, 3000);
    let (code, body) = upload(&a.url, &big);
    assert_eq!(code, 413, "{body}");
    assert!(json(&body)["error"]["message"].as_str().unwrap().contains("max_file_bytes"), "{body}");

    // Malformed multipart, and not multipart at all.
    let files_url = format!("{}/v1/files", a.url);
    let (code, body) = curl(&[
        "-H",
        &auth(KEY_A),
        "-H",
        "Content-Type: multipart/form-data; boundary=XYZ",
        "--data-binary",
        "--XYZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\n{\"custom",
        &files_url,
    ]);
    assert_eq!(code, 400, "{body}");
    assert!(json(&body)["error"]["message"].is_string());
    let (code, _) = curl(&["-H", &auth(KEY_A), "-d", "x=1", &files_url]);
    assert_eq!(code, 400);
    let (code, _) = curl(&["-H", &auth("sk-nope"), "-F", "purpose=batch", &files_url]);
    assert_eq!(code, 401);

    // Unknown ids: 404 in each API's shape.
    for path in ["/v1/batches/batch_nope", "/v1/files/file-nope", "/v1/files/file-out-nope/content"] {
        let (code, body) = curl(&["-H", &auth(KEY_A), &format!("{}{path}", a.url)]);
        assert_eq!(code, 404, "{path}: {body}");
        assert_eq!(json(&body)["error"]["code"], "not_found", "{path}");
    }
    let (code, body) =
        curl(&["-H", &format!("x-api-key: {KEY_A}"), &format!("{}/v1/messages/batches/msgbatch_nope", a.url)]);
    assert_eq!((code, json(&body)["error"]["type"].as_str()), (404, Some("not_found_error")), "{body}");

    // A file uploaded through one replica is used by a batch created through the other.
    let good = fleet.dir.join("good.jsonl");
    write_requests(&good, 50);
    let (code, body) = upload(&a.url, &good);
    assert_eq!(code, 200, "{body}");
    let file_id = json(&body)["id"].as_str().unwrap().to_string();
    let create = |url: &str, body: &str, key: &str| {
        curl(&[
            "-H",
            &auth(KEY_A),
            "-H",
            "Content-Type: application/json",
            "-H",
            &format!("Idempotency-Key: {key}"),
            "-d",
            body,
            &format!("{url}/v1/batches"),
        ])
    };
    // Wrong endpoint for the lines; a 10 MB metadata.
    let wrong = format!(r#"{{"input_file_id":"{file_id}","endpoint":"/v1/embeddings","completion_window":"24h"}}"#);
    let (code, body) = create(&b.url, &wrong, "k0");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("line 1"), "{body}");
    let huge_path = fleet.dir.join("huge.json");
    std::fs::write(&huge_path, format!(r#"{{"input_file_id":"{file_id}","endpoint":"/v1/chat/completions","completion_window":"24h","metadata":{{"k":"{}"}}}}"#, "x".repeat(10 << 20))).unwrap();
    let (code, body) = create(&b.url, &format!("@{}", huge_path.display()), "k1");
    assert_eq!(code, 413, "{body}");
    let ok = format!(r#"{{"input_file_id":"{file_id}","endpoint":"/v1/chat/completions","completion_window":"24h"}}"#);
    let (code, body) = create(&b.url, &ok, "k2");
    assert_eq!(code, 200, "{body}");
    let batch_id = json(&body)["id"].as_str().unwrap().to_string();
    // The same Idempotency-Key, through the other replica: the same batch.
    let (code, body) = create(&a.url, &ok, "k2");
    assert_eq!((code, json(&body)["id"].as_str()), (200, Some(batch_id.as_str())), "{body}");
    let (code, body) = curl(&["-H", &auth(KEY_A), &format!("{}/v1/batches?limit=1000000000", a.url)]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["data"].as_array().map(Vec::len), Some(1), "one job for two creates: {body}");
    let mut status = Value::Null;
    eventually(Duration::from_secs(60), "the batch completes", || {
        status = json(&curl(&["-H", &auth(KEY_A), &format!("{}/v1/batches/{batch_id}", a.url)]).1);
        status["status"] == "completed"
    });
    assert_eq!(status["request_counts"]["completed"], 50, "{status}");
    let out_id = status["output_file_id"].as_str().unwrap();
    let (code, body) = curl(&["-H", &auth(KEY_A), &format!("{}/v1/files/{out_id}/content", b.url)]);
    assert_eq!(code, 200);
    let lines: Vec<Value> = body.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_exactly_once(&lines, 50);

    // Both replicas are still up.
    for s in [&a, &b] {
        assert_eq!(curl(&[&format!("{}/metrics", s.url)]).0, 200);
    }
    let job = batch_id.replace("batch_", "job_");
    cleanup(&fleet, &[&job], &[&file_id]);
}

const CANCEL_AND_LIST_SESSION: &str = r#"
import os, sys, time, openai
from openai import OpenAI
c = OpenAI(base_url=os.environ["API_URL"] + "/v1", api_key=os.environ["KEY_A"], max_retries=0)
f = c.files.create(file=open(sys.argv[1], "rb"), purpose="batch")
b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
print(f"created id={b.id} file={f.id}")
while b.request_counts is None or b.request_counts.completed < 20:
    time.sleep(0.2)
    b = c.batches.retrieve(b.id)
b = c.batches.cancel(b.id)
print(f"cancel status={b.status} cancelling_at={b.cancelling_at is not None}")
while b.status not in ("cancelled", "completed", "failed", "expired"):
    time.sleep(0.5)
    b = c.batches.retrieve(b.id)
rc = b.request_counts
out = c.files.content(b.output_file_id).text.splitlines() if b.output_file_id else []
err = c.files.content(b.error_file_id).text.splitlines() if b.error_file_id else []
ids = {__import__("json").loads(l)["custom_id"] for l in out + err}
print(f"done status={b.status} total={rc.total} completed={rc.completed} failed={rc.failed} "
      f"out={len(out)} err={len(err)} ids={len(ids)} cancelled_at={b.cancelled_at is not None}")
try:
    c.batches.cancel(b.id)
    print("again result=accepted")
except openai.ConflictError:
    print("again result=ConflictError")

# Paging: four more batches of a two-line file, then the SDK's pages of two.
small = c.files.create(file=open(sys.argv[2], "rb"), purpose="batch")
made = [b.id] + [c.batches.create(input_file_id=small.id, endpoint="/v1/chat/completions",
                                  completion_window="1h").id for _ in range(4)]
print("made ids=" + ",".join(made) + f" small={small.id}")
first = c.batches.list(limit=2)
second = c.batches.list(limit=2, after=first.data[-1].id)
walked = [x.id for x in c.batches.list(limit=2)]
print(f"pages first={len(first.data)} first_more={first.has_more} second={len(second.data)} "
      f"overlap={len({x.id for x in first.data} & {x.id for x in second.data})} "
      f"walked={len(walked)} unique={len(set(walked))} all={set(walked) == set(made)}")
"#;

#[test]
fn the_openai_sdk_cancels_mid_run_with_partial_output_and_pages_batches() {
    // Slow answers and a small in-flight limit: 400 requests take ~20 s, so the cancel
    // lands while the batch runs.
    let mock = Mock::start(&["--latency-ms", "200"]);
    let fleet = Fleet::new("api-cancel", &mock.url, "[providers.mock]\nmax_in_flight = 4\n");
    let _w = fleet.worker("w1", &[]);
    let server = serve(&fleet, "serve", &[]);
    let input = fleet.dir.join("in.jsonl");
    write_requests(&input, 400);
    let small = fleet.dir.join("small.jsonl");
    write_requests(&small, 2);
    let args = [input.to_str().unwrap(), small.to_str().unwrap()];
    let out = run_python(&fleet.dir, "cancel_session.py", CANCEL_AND_LIST_SESSION, &server.url, &args);

    assert_eq!(field(&out, "cancel", "status"), "cancelling");
    assert_eq!(field(&out, "done", "status"), "cancelled");
    assert_eq!(field(&out, "done", "cancelled_at"), "True");
    let n = |k: &str| field(&out, "done", k).parse::<u64>().unwrap_or_else(|_| panic!("{k} in:\n{out}"));
    assert_eq!(n("total"), 400);
    assert!(n("completed") >= 20 && n("completed") < 400, "partial output:\n{out}");
    assert_eq!(n("completed") + n("failed"), n("total"), "the cancelled requests count as failed");
    assert_eq!((n("out"), n("err")), (n("completed"), n("failed")), "one file line per counted request");
    assert_eq!(n("ids"), 400, "every custom_id once across the two files");
    assert_eq!(field(&out, "again", "result"), "ConflictError", "an ended batch cannot be cancelled");

    let p = |k: &str| field(&out, "pages", k);
    assert_eq!(
        (p("first"), p("first_more"), p("second"), p("overlap")),
        ("2".into(), "True".into(), "2".into(), "0".into())
    );
    assert_eq!(
        (p("walked"), p("unique"), p("all")),
        ("5".into(), "5".into(), "True".into()),
        "the SDK walks every page"
    );

    let made = field(&out, "made", "ids");
    let jobs: Vec<String> = made.split(',').map(|b| b.replace("batch_", "job_")).collect();
    let jobs: Vec<&str> = jobs.iter().map(String::as_str).collect();
    let files = [field(&out, "created", "file"), field(&out, "made", "small")];
    cleanup(&fleet, &jobs, &[&files[0], &files[1]]);
}

#[test]
fn a_replica_killed_mid_upload_leaves_no_file_and_its_stream_is_deleted() {
    use std::io::Write as _;
    let mock = Mock::start(&[]);
    let fleet = Fleet::new("api-kill", &mock.url, "");
    let a = serve(&fleet, "serve-a", &[]);
    let b = serve(&fleet, "serve-b", &[]);

    // A body that declares 50 MB and sends about 1 MB of valid lines, then stops.
    let lines = fleet.dir.join("part.jsonl");
    write_requests(&lines, 5000);
    let part = std::fs::read(&lines).unwrap();
    let head = "--B\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--B\r\n\
                Content-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n\r\n";
    let addr = a.url.trim_start_matches("http://");
    let mut sock = std::net::TcpStream::connect(addr).expect("connect to serve-a");
    write!(
        sock,
        "POST /v1/files HTTP/1.1\r\nHost: {addr}\r\n{}\r\n\
         Content-Type: multipart/form-data; boundary=B\r\nContent-Length: 50000000\r\n\r\n{head}",
        auth(KEY_A)
    )
    .unwrap();
    sock.write_all(&part).unwrap();
    sock.flush().unwrap();

    // The upload's stream exists and holds lines: kill the replica mid-body.
    let mut file_id = String::new();
    eventually(Duration::from_secs(30), "serve-a logs the upload's start", || {
        let log = fleet.worker_log("serve-a");
        let Some(at) = log.find("upload started") else { return false };
        let rest = &log[at..];
        let Some(f) = rest.find("file-") else { return false };
        file_id = rest[f..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
        true
    });
    let stream = fleet.topology().api_file_stream(&file_id);
    eventually(Duration::from_secs(30), "the upload's stream holds lines", || {
        fleet.queue_len(&stream).is_some_and(|n| n > 0)
    });
    let mut a = a;
    a.proc.signal("KILL");
    a.proc.wait_timeout(Duration::from_secs(10)).expect("wait").expect("serve-a is gone");
    drop(sock);

    // The other replica lists no file, knows no such id, and deletes the stream.
    let (code, body) = curl(&["-H", &auth(KEY_A), &format!("{}/v1/files", b.url)]);
    assert_eq!(code, 200, "{body}");
    let listed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(0), "no half file is listed: {body}");
    let (code, _) = curl(&["-H", &auth(KEY_A), &format!("{}/v1/files/{file_id}", b.url)]);
    assert_eq!(code, 404);
    eventually(Duration::from_secs(60), "serve-b deletes the orphaned stream", || fleet.queue_len(&stream).is_none());
    assert!(fleet.worker_log("serve-b").contains("deleted the stream of an upload that did not finish"));
    cleanup(&fleet, &[], &[&file_id]);
}

#[test]
fn a_key_over_its_requests_in_progress_gets_429_and_other_keys_do_not() {
    use std::io::Write as _;
    let mock = Mock::start(&[]);
    let fleet = Fleet::new("api-429", &mock.url, "");
    let server = serve(&fleet, "serve", &[("FLEET__API__MAX_REQUESTS_PER_KEY", "1")]);

    // Key A's one request in progress: an upload whose body never ends.
    let lines = fleet.dir.join("part.jsonl");
    write_requests(&lines, 50);
    let head = "--B\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--B\r\n\
                Content-Disposition: form-data; name=\"file\"; filename=\"slow.jsonl\"\r\n\r\n";
    let addr = server.url.trim_start_matches("http://");
    let mut sock = std::net::TcpStream::connect(addr).expect("connect to serve");
    write!(
        sock,
        "POST /v1/files HTTP/1.1\r\nHost: {addr}\r\n{}\r\n\
         Content-Type: multipart/form-data; boundary=B\r\nContent-Length: 5000000\r\n\r\n{head}",
        auth(KEY_A)
    )
    .unwrap();
    sock.write_all(&std::fs::read(&lines).unwrap()).unwrap();
    sock.flush().unwrap();
    eventually(Duration::from_secs(30), "the upload started", || fleet.worker_log("serve").contains("upload started"));

    // Another request of key A: 429 in OpenAI's shape with Retry-After, and the real SDK
    // raises its RateLimitError; key B is served.
    let files = format!("{}/v1/files", server.url);
    let out = Command::new("curl").args(["-s", "-i", "-H", &auth(KEY_A), &files]).output().expect("curl");
    let answer = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("retry-after: 1"), "{answer}");
    let body: Value = serde_json::from_str(answer.rsplit("\r\n\r\n").next().unwrap()).expect("a JSON body");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
    let (code, body) = curl(&["-H", &format!("x-api-key: {KEY_A}"), &format!("{}/v1/messages/batches", server.url)]);
    let v: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!((code, v["error"]["type"].as_str()), (429, Some("rate_limit_error")), "Anthropic's shape: {body}");
    let out = run_python(&fleet.dir, "rate_limited.py", RATE_LIMITED, &server.url, &[]);
    assert!(out.contains("limited=RateLimitError status=429"), "{out}");
    let (code, body) = curl(&["-H", &auth(KEY_B), &files]);
    assert_eq!(code, 200, "another key is not held back: {body}");

    // The upload ends (the client went away): key A is served again.
    drop(sock);
    eventually(Duration::from_secs(30), "key A is served again", || curl(&["-H", &auth(KEY_A), &files]).0 == 200);
    let metrics = curl(&[&format!("{}/metrics", server.url)]).1;
    assert!(metrics.contains("status=\"429\""), "429s are counted: {metrics}");
    cleanup(&fleet, &[], &[]);
}

const RATE_LIMITED: &str = r#"
import os, openai
from openai import OpenAI
c = OpenAI(base_url=os.environ["API_URL"] + "/v1", api_key=os.environ["KEY_A"], max_retries=0)
try:
    c.files.list()
    print("limited=none")
except openai.RateLimitError as e:
    print(f"limited=RateLimitError status={e.status_code}")
"#;

/// A batch keeps its final status after the tracker forgets its job
/// (`tracker.retention_s`): the first replica that saw it end recorded it.
#[test]
fn a_batch_keeps_its_final_status_after_the_tracker_forgets_the_job() {
    let mock = Mock::start(&[]);
    let fleet = Fleet::new("api-forgot", &mock.url, "[tracker]\nretention_s = 2\n[pushgateway]\nstale_group_s = 2\n");
    let _w = fleet.worker("w1", &[]);
    let server = serve(&fleet, "serve", &[]);
    let input = fleet.dir.join("in.jsonl");
    write_requests(&input, 20);
    let (code, body) = curl(&[
        "-H",
        &auth(KEY_A),
        "-F",
        "purpose=batch",
        "-F",
        &format!("file=@{}", input.display()),
        &format!("{}/v1/files", server.url),
    ]);
    assert_eq!(code, 200, "{body}");
    let file: Value = serde_json::from_str(&body).unwrap();
    let create = serde_json::json!({
        "input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"
    })
    .to_string();
    let (code, body) = curl(&[
        "-H",
        &auth(KEY_A),
        "-H",
        "Content-Type: application/json",
        "-d",
        &create,
        &format!("{}/v1/batches", server.url),
    ]);
    assert_eq!(code, 200, "{body}");
    let batch: Value = serde_json::from_str(&body).unwrap();
    let url = format!("{}/v1/batches/{}", server.url, batch["id"].as_str().unwrap());
    let retrieve = || -> Value { serde_json::from_str(&curl(&["-H", &auth(KEY_A), &url]).1).unwrap() };
    eventually(Duration::from_secs(60), "the batch completes", || retrieve()["status"] == "completed");
    let job = fleet
        .producer(&["jobs", "--json"])
        .stdout
        .split(|b| *b == b'"')
        .map(|s| String::from_utf8_lossy(s).to_string())
        .find(|s| s.starts_with("job_"))
        .expect("the batch's job is listed");
    eventually(Duration::from_secs(30), "the tracker forgets the job", || {
        !fleet.producer(&["status", &job, "--timeout", "20"]).status.success()
    });
    let after = retrieve();
    assert_eq!(after["status"], "completed", "{after}");
    assert_eq!(after["request_counts"]["completed"], 20, "{after}");
    assert!(after["output_file_id"].is_string(), "{after}");
    // The same from the batch list.
    let (_, list) = curl(&["-H", &auth(KEY_A), &format!("{}/v1/batches", server.url)]);
    let list: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list["data"][0]["status"], "completed", "{list}");
    cleanup(&fleet, &[&job], &[file["id"].as_str().unwrap()]);
}
