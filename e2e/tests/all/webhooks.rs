//! Completion webhooks (real broker, workers, tracker; the mock provider; a receiver in
//! this test, a plain HTTP server on a loopback port that verifies every signature with the
//! secret the workers hold): a job's end is POSTed, signed the Standard Webhooks way,
//! retried through the broker's delay queues with the same `webhook-id` until the receiver
//! accepts it, never after; a redirect is not followed; a worker SIGKILLed in the middle of
//! a delivery leaves it to another, which delivers it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use e2e::{assert_exactly_once, dashboard_queries_for, eventually, prom_query, prom_value, Fleet, Mock};
use fleet::webhooks::{verify, Secret};
use serde_json::Value;

/// The secret the workers sign with (`whsec_` + base64 of 32 bytes), from their environment.
const SECRET: &str = "whsec_ZTJlLXdlYmhvb2stc2VjcmV0LW9mLTMyLWJ5dGVzISE=";
const SECRET_ENV: &str = "E2E_WEBHOOK_SECRET";

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    id: String,
    body: Vec<u8>,
    /// Whether its `webhook-signature` verified with [`SECRET`] and its own id and timestamp.
    verified: bool,
}

/// How the receiver answers its n-th request (from 0).
#[derive(Clone, Copy)]
enum Answer {
    Status(u16),
    /// `302` to another URL.
    Redirect(u16),
    /// Reads the request and never answers (the connection stays open).
    Hang,
}

/// A webhook receiver on a loopback port.
struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    fn start(script: impl Fn(usize) -> Answer + Send + 'static) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let got = Arc::new(Mutex::new(Vec::new()));
        let seen = got.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming().flatten() {
                let Some(req) = read_request(&stream) else { continue };
                let n = {
                    let mut g = seen.lock().unwrap();
                    g.push(req);
                    g.len() - 1
                };
                let mut stream = stream;
                let reply = match script(n) {
                    Answer::Status(code) => format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"),
                    Answer::Redirect(to) => format!(
                        "HTTP/1.1 302 Found\r\nlocation: http://127.0.0.1:{to}/elsewhere\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    ),
                    Answer::Hang => {
                        held.push(stream);
                        continue;
                    }
                };
                let _ = stream.write_all(reply.as_bytes());
            }
        });
        Receiver { port, got }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hooks/batch?token=not-logged", self.port)
    }

    fn got(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

/// Reads one HTTP request: its headers, and the body by `content-length`.
fn read_request(stream: &TcpStream) -> Option<Received> {
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut r = BufReader::new(stream);
    let mut headers = std::collections::HashMap::new();
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    loop {
        line.clear();
        r.read_line(&mut line).ok()?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers.get("content-length")?.parse().ok()?;
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    let id = headers.get("webhook-id").cloned().unwrap_or_default();
    let ts: u64 = headers.get("webhook-timestamp").and_then(|t| t.parse().ok()).unwrap_or(0);
    let sig = headers.get("webhook-signature").cloned().unwrap_or_default();
    let verified = verify(&Secret::parse(SECRET).unwrap(), &id, ts, &body, &sig);
    Some(Received { id, body, verified })
}

/// The tests' webhooks settings. The receivers listen on 127.0.0.1, which the workers may
/// reach only with `allow_private` (see `a_webhook_into_the_fleets_own_network_is_refused`).
fn config() -> String {
    format!("{}allow_private = true\n", private_refused_config())
}

/// [`config`] without `allow_private`: the default, which refuses non-public addresses.
fn private_refused_config() -> String {
    format!("[webhooks]\nsecret_env = \"{SECRET_ENV}\"\ninitial_backoff_s = 1\nmax_backoff_s = 2\ntimeout_s = 20\n")
}

fn submit_with_webhook(fleet: &Fleet, n: usize, url: &str) -> String {
    let input = fleet.dir.join(format!("in-{n}.jsonl"));
    e2e::write_requests(&input, n);
    harness::submit(&fleet.config, &input, e2e::MOCK, &["--webhook", url]).unwrap().job_id
}

#[test]
fn a_failing_receiver_gets_the_event_once_it_accepts_with_the_same_id() {
    let mock = Mock::start(&[]);
    let fleet = Fleet::new("webhooks", &mock.url, &config());
    let receiver = Receiver::start(|n| if n < 2 { Answer::Status(500) } else { Answer::Status(204) });
    let _w = fleet.worker("w1", &[(SECRET_ENV, SECRET)]);

    // A URL that is not http(s) is refused at submit, with the reason, before anything.
    let input = fleet.dir.join("bad.jsonl");
    e2e::write_requests(&input, 2);
    let out = fleet.producer(&["submit", input.to_str().unwrap(), "--provider", "mock", "--webhook", "ftp://x/"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("http:// or https://"), "{out:?}");

    let job = submit_with_webhook(&fleet, 40, &receiver.url());
    assert_exactly_once(&fleet.collect(&job), 40);
    eventually(Duration::from_secs(60), "the receiver accepted the event (third attempt)", || {
        receiver.got().len() >= 3
    });
    // Nothing after the accepted attempt: the retries stop.
    std::thread::sleep(Duration::from_secs(4));
    let got = receiver.got();
    assert_eq!(got.len(), 3, "two failed attempts and the accepted one");
    assert!(got.iter().all(|r| r.verified), "every attempt is signed with the secret");
    assert!(got.iter().all(|r| r.id == got[0].id && r.body == got[0].body), "one id, one event, on every attempt");
    let event: Value = serde_json::from_slice(&got[2].body).unwrap();
    assert_eq!(event["type"], "batch.completed", "{event}");
    assert_eq!(event["id"], got[0].id.as_str());
    assert_eq!(event["data"]["id"], job.as_str());
    assert_eq!(event["data"]["request_counts"]["succeeded"], 40, "{event}");
    assert_eq!(event["data"]["request_counts"]["total"], 40, "{event}");
    assert!(event["data"]["output"]["wait"].as_str().unwrap().contains(&job), "{event}");

    // `status` shows the last delivery: the host (never the path or its token), delivered.
    let mut status = Value::Null;
    eventually(Duration::from_secs(30), "status shows the webhook delivered", || {
        status = fleet.final_status(&job);
        status["webhook"]["state"] == "delivered"
    });
    assert_eq!(status["webhook"]["host"], format!("127.0.0.1:{}", receiver.port), "{status}");
    assert_eq!(status["webhook"]["attempts"], 3, "{status}");
    let log = fleet.worker_log("w1");
    assert!(!log.contains("not-logged") && !log.contains(SECRET), "no URL token or secret in the log");
    let loud: Vec<&str> = log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
    assert!(loud.is_empty(), "a failing receiver is retried quietly: {loud:?}");

    // The counter behind the dashboard's webhook panel counts what the receiver saw: two
    // attempts retried, one delivered, none failed for good; the panel shows both outcomes.
    let counted = |outcome: &str| deliveries(&fleet, outcome);
    eventually(Duration::from_secs(30), "the attempts scraped", || {
        counted("retried") == Some(2.0) && counted("delivered") == Some(1.0)
    });
    assert_eq!(counted("failed"), Some(0.0));
    let (_, panel) = dashboard_queries_for(&fleet.ns)
        .into_iter()
        .find(|(title, _)| title == "Webhook deliveries by outcome")
        .expect("the dashboard has the webhook panel");
    eventually(Duration::from_secs(30), "the panel shows retried and delivered attempts", || {
        let shown: Vec<String> = prom_query(&panel)
            .into_iter()
            .filter(|(_, rate)| *rate > 0.0)
            .filter_map(|(labels, _)| labels.get("outcome").and_then(Value::as_str).map(str::to_string))
            .collect();
        shown.contains(&"retried".to_string()) && shown.contains(&"delivered".to_string())
    });
    fleet.cleanup(&[&job]);
}

/// `batch_webhook_deliveries_total` of one outcome in a fleet's namespace, as Prometheus has it.
fn deliveries(fleet: &Fleet, outcome: &str) -> Option<f64> {
    prom_value(&format!("sum(batch_webhook_deliveries_total{{namespace=\"{}\",outcome=\"{outcome}\"}})", fleet.ns))
}

#[test]
fn a_redirect_is_not_followed() {
    let mock = Mock::start(&[]);
    let fleet = Fleet::new("webhooks-redirect", &mock.url, &format!("{}max_age_s = 3\n", config()));
    let elsewhere = Receiver::start(|_| Answer::Status(200));
    let port = elsewhere.port;
    let receiver = Receiver::start(move |_| Answer::Redirect(port));
    let _w = fleet.worker("w1", &[(SECRET_ENV, SECRET)]);
    // Prometheus must see the failure counter at 0 first, or the alert's `increase` sees none.
    eventually(Duration::from_secs(30), "the failure counter scraped at 0", || {
        deliveries(&fleet, "failed") == Some(0.0)
    });
    let job = submit_with_webhook(&fleet, 5, &receiver.url());
    assert_exactly_once(&fleet.collect(&job), 5);
    // Retried until `max_age_s`, then parked with its reason; the redirect's target never hears of it.
    let dead = fleet.topology().webhooks_dead_queue();
    eventually(Duration::from_secs(60), "the delivery is parked after its budget", || {
        fleet.queue_len(&dead) == Some(1)
    });
    assert!(!receiver.got().is_empty() && receiver.got().iter().all(|r| r.verified));
    assert!(elsewhere.got().is_empty(), "the redirect was followed");
    let mut status = Value::Null;
    eventually(Duration::from_secs(30), "status shows the webhook failed", || {
        status = fleet.final_status(&job);
        status["webhook"]["state"] == "failed"
    });
    assert!(status["webhook"]["last_error"].as_str().unwrap().contains("302"), "{status}");
    // Counted as failed for good, and Prometheus's rule for it (alerts.yml) takes notice.
    eventually(Duration::from_secs(30), "the failure scraped", || deliveries(&fleet, "failed") == Some(1.0));
    let alert = format!("ALERTS{{alertname=\"BatchWebhookDeliveriesFailing\",namespace=\"{}\"}}", fleet.ns);
    eventually(Duration::from_secs(60), "BatchWebhookDeliveriesFailing pending or firing", || {
        !prom_query(&alert).is_empty()
    });
    fleet.cleanup(&[&job]);
}

#[test]
fn a_worker_killed_mid_delivery_leaves_it_to_another() {
    let mock = Mock::start(&[]);
    let fleet = Fleet::new("webhooks-kill", &mock.url, &config());
    // The first attempt is read and never answered: the worker is killed while it waits.
    let receiver = Receiver::start(|n| if n == 0 { Answer::Hang } else { Answer::Status(200) });
    let w1 = fleet.worker("w1", &[(SECRET_ENV, SECRET)]);
    let job = submit_with_webhook(&fleet, 10, &receiver.url());
    assert_exactly_once(&fleet.collect(&job), 10);
    eventually(Duration::from_secs(30), "the first attempt reached the receiver", || !receiver.got().is_empty());
    w1.signal("KILL");
    let _w2 = fleet.worker("w2", &[(SECRET_ENV, SECRET)]);
    eventually(Duration::from_secs(90), "another worker delivered it", || receiver.got().len() >= 2);
    let got = receiver.got();
    assert!(got.iter().all(|r| r.verified));
    assert_eq!(got[0].id, got[1].id, "the same webhook-id from the other worker");
    let event: Value = serde_json::from_slice(&got[1].body).unwrap();
    assert_eq!(event["type"], "batch.completed");
    fleet.cleanup(&[&job]);
}

/// With `webhooks.allow_private` off (the default), a user's webhook URL cannot make a worker
/// POST into the fleet's own network: an address in the URL (127.0.0.1) is refused before
/// the call, a name that resolves to one (localhost) where it is resolved. Each delivery is
/// parked at once with the reason, `status` says so, and the receiver hears nothing.
#[test]
fn a_webhook_into_the_fleets_own_network_is_refused() {
    let mock = Mock::start(&[]);
    let fleet = Fleet::new("webhooks-private", &mock.url, &private_refused_config());
    let receiver = Receiver::start(|_| Answer::Status(200));
    let _w = fleet.worker("w1", &[(SECRET_ENV, SECRET)]);
    let by_address = submit_with_webhook(&fleet, 3, &receiver.url());
    let by_name = submit_with_webhook(&fleet, 3, &receiver.url().replace("127.0.0.1", "localhost"));
    assert_exactly_once(&fleet.collect(&by_address), 3);
    assert_exactly_once(&fleet.collect(&by_name), 3);
    let dead = fleet.topology().webhooks_dead_queue();
    eventually(Duration::from_secs(60), "both deliveries parked", || fleet.queue_len(&dead) == Some(2));
    for job in [&by_address, &by_name] {
        let mut status = Value::Null;
        eventually(Duration::from_secs(30), "status shows the webhook failed", || {
            status = fleet.final_status(job);
            status["webhook"]["state"] == "failed"
        });
        let error = status["webhook"]["last_error"].as_str().unwrap_or_default();
        assert!(error.contains("public address"), "{status}");
        assert_eq!(status["webhook"]["attempts"], 1, "refused once, not retried: {status}");
    }
    assert!(receiver.got().is_empty(), "a POST reached the fleet's own network");
    assert_eq!(deliveries(&fleet, "retried").unwrap_or(0.0), 0.0);
    fleet.cleanup(&[&by_address, &by_name]);
}
