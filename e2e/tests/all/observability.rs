//! Observability tests on the real RabbitMQ, Pushgateway and Prometheus: what the
//! dashboard shows must equal what happened.

use std::time::Duration;

use e2e::*;

fn ns_sum(metric: &str, ns: &str, extra: &str) -> Option<f64> {
    prom_value(&format!("sum({metric}{{namespace=\"{ns}\"{extra}}})"))
}

#[test]
fn dashboard_panels_show_data_that_agrees_with_the_output() {
    let mock = Mock::start(&[
        "--error-429",
        "0.05",
        "--error-500",
        "0.05",
        "--error-400",
        "0.08",
        "--latency-ms",
        "2",
        "--seed",
        "99",
    ]);
    let fleet = Fleet::new("dashboard", &mock.url, "");
    let _w1 = fleet.worker("dash-w1", &[]);
    let _w2 = fleet.worker("dash-w2", &[]);
    let job = fleet.submit_requests(1000);
    let lines = fleet.collect(&job);
    assert_exactly_once(&lines, 1000);
    let succeeded = lines.iter().filter(|l| succeeded(l)).count() as f64;
    let failed = 1000.0 - succeeded;
    assert!(failed > 30.0, "the mock answered some 400s");

    // Ground truth vs. Prometheus, once the last pushes have been scraped.
    eventually(Duration::from_secs(30), "items and jobs scraped", || {
        ns_sum("batch_items_total", &fleet.ns, "") == Some(1000.0)
            && ns_sum("batch_jobs_total", &fleet.ns, ",status=\"completed\"") == Some(1.0)
    });
    assert_eq!(ns_sum("batch_items_total", &fleet.ns, ",status=\"succeeded\""), Some(succeeded));
    assert_eq!(ns_sum("batch_items_total", &fleet.ns, ",status=\"failed\""), Some(failed));
    assert_eq!(ns_sum("batch_jobs_submitted_total", &fleet.ns, ""), Some(1.0));
    assert_eq!(ns_sum("batch_jobs_total", &fleet.ns, ""), Some(1.0), "summing the job counter counts the job once");
    let stats = mock.stats();
    let mock_retries = stats["requests"].as_f64().unwrap() - 1000.0;
    assert!(mock_retries > 50.0, "{stats}");
    eventually(Duration::from_secs(20), "retries scraped", || {
        ns_sum("batch_retry_attempts_total", &fleet.ns, "") == Some(mock_retries)
    });
    assert_eq!(
        ns_sum("batch_errors_total", &fleet.ns, ",error_type=\"client_error\""),
        Some(mock.status_count(400) as f64)
    );
    assert_eq!(ns_sum("batch_provider_latency_seconds_count", &fleet.ns, ""), stats["requests"].as_f64());
    assert!(ns_sum("batch_usage_tokens_total", &fleet.ns, ",kind=\"input\"").unwrap_or(0.0) > 0.0);

    // Every panel of the dashboard, as Grafana would run it for this namespace (rates need
    // two scrapes of the namespace's series, so give them a few scrape intervals).
    let panels_without_data = || -> Vec<String> {
        dashboard_queries_for(&fleet.ns)
            .into_iter()
            // This job runs online: the batch-mode panels are checked by batch_mode.rs.
            .filter(|(title, _)| !title.starts_with("Poll cycle") && !title.starts_with("Provider batches"))
            .filter(|(title, _)| title != "Admission waits by reason")
            // No webhook either: webhooks.rs checks that panel.
            .filter(|(title, _)| title != "Webhook deliveries by outcome")
            // No cap and no rejected key in this run: money.rs checks those two panels.
            .filter(|(title, _)| title != "Spend against cap" && title != "Key rejections")
            .filter(|(_, expr)| prom_query(expr).is_empty())
            .map(|(title, expr)| format!("{title}: {expr}"))
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut empty = panels_without_data();
    while !empty.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(2));
        empty = panels_without_data();
    }
    let ok = empty.is_empty();
    assert!(ok, "panels without data:\n{}", empty.join("\n"));
    // The status query agrees too.
    let v = fleet.final_status(&job);
    assert_eq!(v["status"], "completed");
    assert_eq!(v["succeeded"].as_f64(), Some(succeeded));
    assert_eq!(v["failed"].as_f64(), Some(failed));
    assert_eq!(v["pending"], 0);
    fleet.cleanup(&[&job]);
}

#[test]
fn tracker_takeover_after_sigkill_keeps_job_counts_exact_and_monotonic() {
    let mock = Mock::start(&["--latency-ms", "50", "--error-400", "0.1", "--seed", "4"]);
    // A small in-flight window makes the job last long enough to kill the tracker mid-job.
    let fleet = Fleet::new("takeover", &mock.url, "[worker]\nmax_in_flight = 16\n");
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let w1 = fleet.worker("tk-w1", &[]);
    eventually(Duration::from_secs(30), "w1 takes the tracker role", || {
        fleet.worker_log("tk-w1").contains("took the job tracker role")
    });
    let _w2 = fleet.worker("tk-w2", &[]);
    // A first small job completes under the first tracker.
    let small = fleet.dir.join("small.jsonl");
    write_requests(&small, 50);
    let (job0, _) = fleet.submit(&small);
    assert!(fleet.wait(&job0, &fleet.dir.join("out0.jsonl"), 60).status.success());
    eventually(Duration::from_secs(20), "first job counted", || {
        ns_sum("batch_jobs_total", &fleet.ns, ",status=~\"completed\"") == Some(1.0)
    });

    let job = fleet.submit_requests(3000);
    eventually(Duration::from_secs(60), "job under way", || mock.stats()["requests"].as_u64().unwrap() > 1000);
    w1.signal("KILL");
    drop(w1);
    let _w3 = fleet.worker("tk-w3", &[]);
    let lines = fleet.collect(&job);
    assert_exactly_once(&lines, 3000);
    let failed = lines.iter().filter(|l| !succeeded(l)).count() as u64;

    // The new tracker's counts are exact (duplicated results and events were not counted twice).
    let v = fleet.final_status(&job);
    assert_eq!(v["status"], "completed", "{v}");
    assert_eq!(v["succeeded"].as_u64(), Some(3000 - failed), "{v}");
    assert_eq!(v["failed"].as_u64(), Some(failed), "{v}");
    let took_over = fleet.worker_log("tk-w2").contains("took the job tracker role")
        || fleet.worker_log("tk-w3").contains("took the job tracker role");
    assert!(took_over, "another worker took over");
    eventually(Duration::from_secs(30), "both jobs counted once", || {
        ns_sum("batch_jobs_total", &fleet.ns, ",status=\"completed\"") == Some(2.0)
            && ns_sum("batch_jobs_submitted_total", &fleet.ns, "") == Some(2.0)
    });
    // batch_jobs_total never went down at any scrape during the takeover.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let v = harness::http::get_json(
        &format!("{}/api/v1/query_range", prometheus_url()),
        &[
            ("query", &format!("sum(batch_jobs_total{{namespace=\"{}\"}})", fleet.ns)),
            ("start", &started.to_string()),
            ("end", &now.to_string()),
            ("step", "1"),
        ],
    )
    .unwrap();
    let values: Vec<f64> = v["data"]["result"][0]["values"]
        .as_array()
        .expect("a series")
        .iter()
        .map(|p| p[1].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(values.len() >= 3, "{v}");
    for w in values.windows(2) {
        assert!(w[1] >= w[0], "batch_jobs_total decreased: {values:?}");
    }
    fleet.cleanup(&[&job0, &job]);
}

#[test]
fn a_killed_workers_gauge_leaves_the_fleet_total_but_its_counters_still_count() {
    let mock = Mock::start(&["--latency-ms", "3000"]);
    let fleet = Fleet::new("stale", &mock.url, "[worker]\nmax_in_flight = 5\n");
    let w1 = fleet.worker("stale-w1", &[]);
    let _w2 = fleet.worker("stale-w2", &[]);
    let job = fleet.submit_requests(30);
    // The fleet-wide in-flight expression of the dashboard, restricted to this namespace.
    let fleet_in_flight = format!(
        "sum(batch_items_in_flight{{namespace=\"{ns}\"}} and on (job, namespace, instance) (time() - push_time_seconds{{job=\"batch_worker\"}} < 30))",
        ns = fleet.ns
    );
    eventually(Duration::from_secs(30), "10 in flight seen by Prometheus", || {
        prom_value(&fleet_in_flight) == Some(10.0)
    });
    // Let w1 finish some items so it has counters, then kill it mid-flight.
    eventually(Duration::from_secs(30), "w1 counted items", || {
        prom_value(&format!("sum(batch_worker_items_total{{namespace=\"{}\",instance=\"stale-w1\"}})", fleet.ns))
            .unwrap_or(0.0)
            >= 5.0
    });
    let w1_items =
        prom_value(&format!("sum(batch_worker_items_total{{namespace=\"{}\",instance=\"stale-w1\"}})", fleet.ns))
            .unwrap();
    w1.signal("KILL");
    drop(w1);
    // Its last pushed gauge stays in the Pushgateway but drops out of the total, which
    // becomes the live worker's alone.
    let raw = || prom_value(&format!("sum(batch_items_in_flight{{namespace=\"{}\",instance=\"stale-w1\"}})", fleet.ns));
    let live =
        || prom_value(&format!("sum(batch_items_in_flight{{namespace=\"{}\",instance=\"stale-w2\"}})", fleet.ns));
    eventually(Duration::from_secs(60), "killed worker's gauge excluded", || {
        let total = prom_value(&fleet_in_flight);
        raw().is_some_and(|r| r > 0.0) && total.is_some() && total == live()
    });
    assert!(raw().is_some_and(|r| r > 0.0), "the stale value is still there, just not counted");
    let counted =
        prom_value(&format!("sum(batch_worker_items_total{{namespace=\"{}\",instance=\"stale-w1\"}})", fleet.ns));
    assert!(counted.unwrap_or(0.0) >= w1_items, "its counters still count");
    let lines = fleet.collect(&job);
    assert_exactly_once(&lines, 30);
    fleet.cleanup(&[&job]);
}

#[test]
fn a_pushgateway_outage_does_not_stop_the_job_and_pushes_resume() {
    let port = free_port();
    let pg = start_pushgateway(port);
    let pg_url = format!("http://127.0.0.1:{port}");
    let mock = Mock::start(&["--latency-ms", "2"]);
    let fleet = Fleet::new("pg_outage", &mock.url, "");
    let _w = fleet.worker("pgo-w1", &[("FLEET__PUSHGATEWAY__URL", &pg_url)]);
    let metrics_text = || pushgateway_metrics_at(&pg_url);
    eventually(Duration::from_secs(20), "first push", || metrics_text().contains("batch_worker_up"));
    // Hang the Pushgateway (accepts connections, never answers), then run a job.
    pg.signal("STOP");
    let job = fleet.submit_requests(2000);
    let lines = fleet.collect(&job);
    assert_exactly_once(&lines, 2000);
    // The worker noticed (a push timed out) while items kept flowing.
    eventually(Duration::from_secs(30), "a failed push logged", || {
        fleet.worker_log("pgo-w1").contains("metrics push failed for group batch_worker")
    });
    // Bring it back: the worker's next pushes carry the full count and the failures.
    pg.signal("CONT");
    eventually(Duration::from_secs(30), "pushes resume with the full count", || {
        let text = metrics_text();
        text.lines().any(|l| l.starts_with("batch_worker_items_total{") && l.contains("pgo-w1") && l.ends_with(" 2000"))
            && text
                .lines()
                .any(|l| l.starts_with("batch_push_failures_total{") && l.contains("pgo-w1") && !l.ends_with(" 0"))
    });
    drop(pg);
    fleet.cleanup(&[&job]);
}

#[test]
fn groups_of_workers_gone_longer_than_stale_group_s_are_deleted() {
    let mock = Mock::start(&[]);
    let fleet = Fleet::new("prune", &mock.url, "[pushgateway]\nstale_group_s = 3\n");
    let tracker = fleet.worker("prune-tracker", &[]);
    eventually(Duration::from_secs(30), "tracker role", || {
        fleet.worker_log("prune-tracker").contains("took the job tracker role")
    });
    let gone = fleet.worker("prune-gone", &[]);
    let groups = || {
        let v = get_json(&format!("{}/api/v1/metrics", pushgateway_url()));
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|g| g["labels"]["namespace"] == fleet.ns.as_str())
            .map(|g| g["labels"]["instance"].as_str().unwrap_or("").to_string())
            .collect::<Vec<_>>()
    };
    eventually(Duration::from_secs(20), "both workers pushed", || {
        let g = groups();
        g.contains(&"prune-gone".to_string()) && g.contains(&"prune-tracker".to_string())
    });
    gone.signal("KILL");
    drop(gone);
    eventually(Duration::from_secs(30), "the killed worker's group deleted", || {
        !groups().contains(&"prune-gone".to_string())
    });
    assert!(groups().contains(&"prune-tracker".to_string()), "a live worker's group stays");
    assert!(fleet.worker_log("prune-tracker").contains("deleting stale worker group"));
    drop(tracker);
    fleet.cleanup(&[]);
}

#[test]
fn producer_jobs_lists_jobs_and_status_explains_an_absent_tracker() {
    let mock = Mock::start(&[]);
    let fleet = Fleet::new("jobs", &mock.url, "");
    // No worker has ever run in this namespace: a clear message, not a hang.
    let out = fleet.producer(&["jobs"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no worker has ever run"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let w = fleet.worker("jobs-w1", &[]);
    let job = fleet.submit_requests(20);
    assert_exactly_once(&fleet.collect(&job), 20);
    fleet.final_status(&job);
    let out = fleet.producer(&["jobs", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let jobs: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0]["job_id"], job.as_str());
    assert_eq!(jobs[0]["succeeded"], 20);
    // With every worker gone, the queue still exists but nobody answers: a timeout message.
    w.signal("TERM");
    drop(w);
    let out = fleet.producer(&["status", &job, "--timeout", "2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no job tracker answered"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fleet.cleanup(&[&job]);
}

/// Workers SIGKILLed every 1.5 s, shorter apart than their 5 s push interval: the item and
/// job panels still equal the output file exactly, because those counts come from the
/// tracker, not from the killed workers' lost increments.
#[test]
fn item_and_job_panels_stay_exact_when_workers_are_killed_between_pushes() {
    let mock = Mock::start(&["--latency-ms", "100", "--error-400", "0.05", "--seed", "15"]);
    let fleet =
        Fleet::new("killcounts", &mock.url, "[pushgateway]\npush_interval_s = 5\n[worker]\nmax_in_flight = 16\n");
    // The tracker's worker is left alone; the others are killed one after the other.
    let _tracker = fleet.worker("kc-t", &[]);
    eventually(Duration::from_secs(30), "the tracker role is taken", || {
        fleet.worker_log("kc-t").contains("took the job tracker role")
    });
    let mut workers: Vec<Proc> = (1..=2).map(|i| fleet.worker(&format!("kc-w{i}"), &[])).collect();
    let job = fleet.submit_requests(3000);
    let mut kills = 0;
    for i in 3..=8 {
        std::thread::sleep(Duration::from_millis(1500));
        let victim = workers.remove(0);
        victim.signal("KILL");
        drop(victim);
        kills += 1;
        workers.push(fleet.worker(&format!("kc-w{i}"), &[]));
    }
    let lines = fleet.collect(&job);
    assert_exactly_once(&lines, 3000);
    let failed = lines.iter().filter(|l| !l["error"].is_null() || l["response"]["status_code"] != 200).count() as f64;
    let succeeded = 3000.0 - failed;
    assert!(kills >= 3 && failed > 50.0, "kills {kills}, failed {failed}");

    // Every item panel's counter for this namespace equals the file, and the job counts once.
    let q = |expr: &str| prom_value(&expr.replace("NS", &fleet.ns));
    eventually(Duration::from_secs(30), "the tracker's counts scraped", || {
        q(r#"sum(batch_items_total{namespace="NS",status="succeeded"})"#) == Some(succeeded)
            && q(r#"sum(batch_items_total{namespace="NS",status="failed"})"#) == Some(failed)
    });
    assert_eq!(q(r#"sum(batch_items_total{namespace="NS"})"#), Some(3000.0));
    assert_eq!(q(r#"sum(batch_jobs_total{namespace="NS"})"#), Some(1.0), "the job counts once");
    assert_eq!(q(r#"sum(batch_jobs_submitted_total{namespace="NS"})"#), Some(1.0));
    let rounded = |title: &str| {
        let (_, expr) = dashboard_queries_for(&fleet.ns).into_iter().find(|(t, _)| t == title).expect(title);
        prom_value(&format!("round(sum({expr}))"))
    };
    assert_eq!(rounded("Recent job status increments (5m)"), Some(1.0), "the job panel counts the job once");
    let success_pct = rounded("Item success rate (15m)").expect("success rate");
    assert_eq!(success_pct, (100.0 * succeeded / 3000.0).round(), "success rate panel");
    // What the killed workers pushed themselves is not exact, and is not what panels read.
    let by_workers = q(r#"sum(batch_worker_items_total{namespace="NS"})"#).unwrap_or(0.0);
    eprintln!("output: {succeeded} succeeded + {failed} failed; tracker: exact; workers' own counters: {by_workers}");
    fleet.cleanup(&[&job]);
}

/// The broker row tells the truth: a backlog of a known size shows in the dashboard's
/// "ready messages by queue family" panel for this namespace, exactly; nodes up, alarms
/// and connections answer.
#[test]
fn broker_panels_show_the_real_backlog() {
    let fleet = Fleet::new("brokerrow", "http://127.0.0.1:9", "");
    // A worker declares the topology, then leaves: the items stay ready on the queue.
    fleet.declare_topology_then_stop();
    let job = fleet.submit_requests(250);
    // The items wait on the job's own queue (one per job: fair sharing).
    let items_queue = fleet.topology().job_items_queue("mock", &job);
    assert_eq!(fleet.queue_len(&items_queue), Some(250));
    let panel = |title: &str| {
        dashboard_queries_for(&fleet.ns.replace('.', "[.]"))
            .into_iter()
            .filter(|(t, _)| t == title)
            .map(|(_, expr)| prom_query(&expr))
            .collect::<Vec<_>>()
    };
    let mut by_family = Vec::new();
    eventually(Duration::from_secs(40), "the items family shows the 250 ready items", || {
        by_family = panel("Broker ready messages by queue family").into_iter().flatten().collect();
        by_family
            .iter()
            .any(|(labels, v)| labels.get("family").and_then(|f| f.as_str()) == Some("items") && *v == 250.0)
    });
    for title in ["Broker nodes up", "Broker connections", "Broker alarms (memory, disk)"] {
        let results: Vec<_> = panel(title).into_iter().flatten().collect();
        assert!(!results.is_empty(), "{title} has data");
        if title == "Broker nodes up" {
            assert!(results[0].1 >= 1.0, "{title}: {results:?}");
        }
        if title.starts_with("Broker alarms") {
            assert!(results.iter().all(|(_, v)| *v == 0.0), "no alarm on this machine: {results:?}");
        }
    }
    fleet.cleanup(&[&job]);
}

/// One real alert end to end: messages dead-lettered in this namespace fire
/// BatchDeadLettersGrowing in Prometheus, which Alertmanager (started by the stack script)
/// posts to the webhook receiver on 127.0.0.1:9095 that this test runs. Alertmanager posts
/// every alert group of the machine there, so the receiver answers each connection on its
/// own thread and the test looks for its namespace's alert among them.
#[test]
fn a_real_alert_reaches_the_webhook_receiver() {
    let listener = std::net::TcpListener::bind("127.0.0.1:9095").expect("the alert webhook port 9095 is free");
    let (tx, alerts) = std::sync::mpsc::channel::<Value>();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                if let Some(body) = read_webhook_post(stream) {
                    let _ = tx.send(body);
                }
            });
        }
    });
    let mock = Mock::start(&[]);
    let fleet = Fleet::new("alert", &mock.url, "");
    let _w = fleet.worker("w1", &[]);
    let items_queue = fleet.topology().items_queue(MOCK);
    fleet.wait_until_consuming("w1");
    // Prometheus must have scraped the counter at 0 first: a counter first seen at 1 shows
    // no increase, and the rule (like any `increase`) would never fire.
    let zero = format!("sum(batch_dead_letters_total{{namespace=\"{}\",reason=\"malformed\"}})", fleet.ns);
    eventually(Duration::from_secs(30), "the dead-letter counter scraped at 0", || prom_value(&zero) == Some(0.0));
    // Garbage on the items queue: the worker dead-letters it and counts it.
    let queue = items_queue.clone();
    fleet.amqp(|conn, _| async move {
        let ch = conn.create_channel().await.unwrap();
        ch.basic_publish("".into(), queue.as_str().into(), Default::default(), b"not an item", Default::default())
            .await
            .unwrap();
    });
    // The rule needs the increase to last a minute (`for: 1m`); Alertmanager then posts
    // within a second or two (the stack's group_wait).
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let mut seen = 0;
    let mut ours = None;
    while ours.is_none() && std::time::Instant::now() < deadline {
        let Ok(post) = alerts.recv_timeout(Duration::from_secs(1)) else { continue };
        for alert in post["alerts"].as_array().into_iter().flatten() {
            seen += 1;
            let labels = &alert["labels"];
            if labels["alertname"] == "BatchDeadLettersGrowing"
                && labels["namespace"] == fleet.ns.as_str()
                && alert["status"] == "firing"
            {
                ours = Some(alert.clone());
            }
        }
    }
    let alert = ours.unwrap_or_else(|| panic!("no BatchDeadLettersGrowing alert for {} among {seen} posted", fleet.ns));
    assert_eq!(alert["labels"]["reason"], "malformed", "{alert}");
    assert_eq!(alert["labels"]["severity"], "warning", "{alert}");
    fleet.cleanup(&[]);
}

/// Reads one HTTP POST from Alertmanager, answers 200, and returns its JSON body.
fn read_webhook_post(mut stream: std::net::TcpStream) -> Option<Value> {
    use std::io::{Read, Write};
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    let body_start = loop {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..body_start]).to_ascii_lowercase();
    let len: usize =
        head.lines().find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().ok())).flatten()?;
    while buf.len() < body_start + len {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    serde_json::from_slice(buf.get(body_start..body_start + len)?).ok()
}
