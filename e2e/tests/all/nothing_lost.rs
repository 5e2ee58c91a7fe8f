//! "Nothing lost": long outages, poison messages, cancel, deadlines and bad input, on the
//! real RabbitMQ with the real binaries.

use std::time::Duration;

use e2e::*;

/// In-process retries give up fast, so the delay queues do the waiting.
const SHORT_RETRIES: &str = "[retry]\nmax_attempts = 2\ninitial_backoff_ms = 5\nmax_backoff_ms = 20\nmax_elapsed_s = 1\ndelay_tiers_s = [1, 2]\nmax_delays = 30\ndelay_budget_s = 600\n";

#[test]
fn a_provider_outage_longer_than_the_retry_budget_waits_in_delay_queues() {
    let down = Mock::start(&["--error-503", "1.0"]);
    let port = down.port();
    let fleet = Fleet::new("outage", &down.url, SHORT_RETRIES);
    let _w = fleet.worker("w1", &[]);
    let job = fleet.submit_requests(50);
    // Every item fails, waits in a delay queue, comes back and fails again.
    eventually(Duration::from_secs(30), "items cycling through delay queues", || {
        down.stats()["requests"].as_u64().unwrap_or(0) >= 150 && fleet.worker_log("w1").contains("delaying item")
    });
    // While they wait, no prefetch slot is held: nothing is in flight at the provider.
    let delay_queues = fleet.topology();
    let delay_len = fleet.queue_len(&delay_queues.job_delay_queue(1)).unwrap_or(0)
        + fleet.queue_len(&delay_queues.job_delay_queue(2)).unwrap_or(0);
    assert!(delay_len > 0, "items are parked in the delay queues");
    // The provider comes back on the same address.
    drop(down);
    let up = Mock::start_on(port, &[]);
    let lines = fleet.collect(&job);
    let by_status = assert_exactly_once(&lines, 50);
    assert_eq!(by_status.get(&200), Some(&50), "every item succeeded after the outage: {by_status:?}");
    assert_eq!(up.status_count(200), 50);
    fleet.cleanup(&[&job]);
}

#[test]
fn an_outage_beyond_the_total_budget_ends_items_failed_with_the_last_error() {
    let down = Mock::start(&["--error-503", "1.0"]);
    let budget = SHORT_RETRIES.replace("max_delays = 30", "max_delays = 2");
    let fleet = Fleet::new("budget", &down.url, &budget);
    let _w = fleet.worker("w1", &[]);
    let job = fleet.submit_requests(20);
    let lines = fleet.collect(&job);
    assert_exactly_once(&lines, 20);
    // The provider answered each last call (503): the failure is in `response`, `error` is null.
    assert_eq!(error_codes(&lines).get(&Some("http_503".into())), Some(&20), "{:?}", error_codes(&lines));
    assert!(lines.iter().all(|l| l["error"].is_null() && l["response"]["body"]["error"].is_object()));
    // 2 in-process attempts in each of 3 passes (first + 2 delays).
    assert_eq!(down.stats()["requests"].as_u64(), Some(20 * 2 * 3));
    fleet.cleanup(&[&job]);
}

#[test]
fn a_message_that_keeps_killing_workers_is_parked_as_poison_and_the_job_finishes() {
    let mock = Mock::start(&["--latency-ms", "60000"]);
    let fleet = Fleet::new("poison", &mock.url, "[amqp]\ndelivery_limit = 2\n");
    let job = fleet.submit_requests(1);
    // The item is in flight when its worker dies, twice over (as if it crashed them).
    for round in 0..2 {
        let w = fleet.worker(&format!("victim{round}"), &[]);
        eventually(Duration::from_secs(30), "the item reaches the provider", || {
            mock.stats()["in_flight"].as_u64() == Some(1)
        });
        w.signal("KILL");
        drop(w);
        eventually(Duration::from_secs(30), "connection gone", || mock.stats()["in_flight"].as_u64() == Some(0));
    }
    let _survivor = fleet.worker("survivor", &[]);
    let lines = fleet.collect_fleet_side(&job, "poison 1");
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["error"]["code"], "poison", "{}", lines[0]);
    assert_eq!(mock.stats()["requests"].as_u64(), Some(2), "the survivor did not call the provider");

    let dead = fleet.producer(&["dead", "--json"]);
    assert!(dead.status.success(), "{}", String::from_utf8_lossy(&dead.stderr));
    let listed: Vec<Value> =
        String::from_utf8_lossy(&dead.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["custom_id"], "req-0");
    assert!(listed[0]["reason"].as_str().unwrap().starts_with("poison"), "{listed:?}");
    // Listing leaves it parked; --requeue puts it back on its items queue.
    assert_eq!(fleet.queue_len(&fleet.topology().dead_queue()), Some(1));
    drop(_survivor);
    let requeue = fleet.producer(&["dead", "--requeue", "--job", &job]);
    assert!(requeue.status.success(), "{}", String::from_utf8_lossy(&requeue.stderr));
    assert_eq!(fleet.queue_len(&fleet.topology().dead_queue()), Some(0));
    assert_eq!(fleet.queue_len(&fleet.topology().items_queue(MOCK)), Some(1));
    fleet.cleanup(&[&job]);
}

#[test]
fn cancel_stops_a_job_across_the_fleet_including_workers_started_later() {
    let mock = Mock::start(&["--latency-ms", "100"]);
    let fleet = Fleet::new("cancel", &mock.url, "[worker]\nmax_in_flight = 4\n");
    let mut w1 = fleet.worker("w1", &[]);
    let job = fleet.submit_requests(300);
    eventually(Duration::from_secs(30), "some progress", || mock.status_count(200) >= 20);
    w1.signal("TERM");
    assert_eq!(w1.wait_exit(Duration::from_secs(30)), Some(0));
    let out = fleet.producer(&["cancel", &job]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let calls_at_cancel = mock.stats()["requests"].as_u64().unwrap();
    // A worker started after the cancel honours it: no provider call for this job.
    let _w2 = fleet.worker("w2", &[]);
    let lines = fleet.collect(&job);
    assert_exactly_once(&lines, 300);
    let codes = error_codes(&lines);
    let succeeded = codes.get(&None).copied().unwrap_or(0) as u64;
    assert_eq!(succeeded, calls_at_cancel, "{codes:?}");
    assert_eq!(codes.get(&Some("cancelled".into())).copied().unwrap_or(0) as u64, 300 - calls_at_cancel);
    assert_eq!(mock.stats()["requests"].as_u64(), Some(calls_at_cancel), "no call after the cancel");
    let v = fleet.final_status(&job);
    assert_eq!(v["status"], "cancelled", "{v}");
    assert_eq!(v["cancelled"].as_u64(), Some(300 - calls_at_cancel));
    fleet.cleanup(&[&job]);
}

/// Issue 21, point 12: items a worker holds while it paces (here a fleet `rpm` ceiling of
/// 120, two workers) ask again after their wait, so a cancel stops them without a call.
#[test]
fn cancel_wins_over_pacing() {
    let mock = Mock::start(&[]);
    let fleet = Fleet::new("cancelpaced", &mock.url, "[providers.mock]\nrpm = 120\n");
    let _w1 = fleet.worker("w1", &[]);
    let _w2 = fleet.worker("w2", &[]);
    let job = fleet.submit_requests(400);
    eventually(Duration::from_secs(60), "some paced progress", || mock.status_count(200) >= 10);
    let out = fleet.producer(&["cancel", &job]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let calls_at_cancel = mock.stats()["requests"].as_u64().unwrap();
    let lines = fleet.collect(&job);
    assert_exactly_once(&lines, 400);
    let calls = mock.stats()["requests"].as_u64().unwrap();
    // Calls already on the wire when the cancel was read still answer; a handful at most.
    assert!(calls <= calls_at_cancel + 6, "{} calls after the cancel", calls - calls_at_cancel);
    let cancelled = error_codes(&lines).get(&Some("cancelled".into())).copied().unwrap_or(0) as u64;
    assert_eq!(cancelled, 400 - calls, "every uncalled item ended cancelled");
    let v = fleet.final_status(&job);
    assert_eq!(v["status"], "cancelled", "{v}");
    fleet.cleanup(&[&job]);
}

/// The same for a deadline that passes while items wait for the pace.
#[test]
fn a_deadline_wins_over_pacing() {
    let mock = Mock::start(&[]);
    let fleet = Fleet::new("deadlinepaced", &mock.url, "[providers.mock]\nrpm = 120\n");
    let _w1 = fleet.worker("w1", &[]);
    let input = fleet.dir.join("in.jsonl");
    write_requests(&input, 200);
    let job = harness::submit(&fleet.config, &input, MOCK, &["--deadline", "5s"]).unwrap().job_id;
    let started = std::time::Instant::now();
    let lines = fleet.collect(&job);
    assert_exactly_once(&lines, 200);
    let calls = mock.stats()["requests"].as_u64().unwrap();
    let expired = error_codes(&lines).get(&Some("expired".into())).copied().unwrap_or(0) as u64;
    assert_eq!(expired, 200 - calls, "every uncalled item ended expired");
    // 120 rpm for about 5 s is about 10 calls (and a second of burst): far from 200.
    assert!(calls < 40, "{calls} calls within a 5 s deadline at 120 rpm");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the job ended soon after its deadline: {:?}",
        started.elapsed()
    );
    assert_eq!(fleet.final_status(&job)["status"], "expired");
    fleet.cleanup(&[&job]);
}

/// Issue 21, point 6: once the broker closes the worker's publish channel (here: a delay
/// publish to an exchange deleted while the job runs), the worker makes a new connection,
/// declares its topology again and carries on; an item is called again at most once.
#[test]
fn a_publish_channel_the_broker_closed_is_replaced() {
    let mock = Mock::start(&["--error-503", "0.2", "--latency-ms", "200"]);
    // One call per delivery: a 503 goes straight to a delay queue.
    let fleet = Fleet::new("pubclosed", &mock.url, "[retry]\nmax_attempts = 1\n");
    let _w = fleet.worker("w1", &[]);
    let job = fleet.submit_requests(300);
    eventually(Duration::from_secs(30), "some answers", || mock.status_count(200) >= 10);
    let delay_exchange = fleet.topology().delay_exchange();
    fleet.amqp(|conn, _| async move {
        let ch = conn.create_channel().await.expect("channel");
        ch.exchange_delete(delay_exchange.as_str().into(), Default::default()).await.expect("delete the exchange");
    });
    let lines = fleet.collect(&job);
    let by_status = assert_exactly_once(&lines, 300);
    assert_eq!(by_status.get(&200), Some(&300), "every item succeeded in the end: {by_status:?}");
    let log = fleet.worker_log("w1");
    assert!(log.contains("the broker closed the publish channel; reconnecting"), "the loss is logged:\n{log}");
    // Answers paid for: the 300 kept, plus at most the items in flight at the loss (the
    // prefetch), each redone once.
    let answered = mock.status_count(200);
    assert!(answered <= 300 + 80, "{answered} answers for 300 items: {}", mock.stats());
    fleet.cleanup(&[&job]);
}

#[test]
fn items_past_the_deadline_end_expired_without_a_provider_call() {
    let mock = Mock::start(&[]);
    let fleet = Fleet::new("deadline", &mock.url, "");
    let input = fleet.dir.join("in.jsonl");
    write_requests(&input, 40);
    let job = harness::submit(&fleet.config, &input, MOCK, &["--deadline", "1s"]).unwrap().job_id;
    std::thread::sleep(Duration::from_millis(1500));
    let _w = fleet.worker("w1", &[]);
    let lines = fleet.collect(&job);
    assert_exactly_once(&lines, 40);
    assert_eq!(error_codes(&lines).get(&Some("expired".into())), Some(&40));
    assert_eq!(mock.stats()["requests"].as_u64(), Some(0));
    let v = fleet.final_status(&job);
    assert_eq!(v["status"], "expired", "{v}");
    assert_eq!(v["expired"].as_u64(), Some(40));
    fleet.cleanup(&[&job]);
}

#[test]
fn an_unwritable_results_path_is_a_clear_error_and_loses_no_result() {
    let mock = Mock::start(&[]);
    let fleet = Fleet::new("unwritable", &mock.url, "");
    let _w = fleet.worker("w1", &[]);
    let job = fleet.submit_requests(30);
    let bad = fleet.dir.join("no-such-dir").join("out.jsonl");
    let out = fleet.wait(&job, &bad, 30);
    assert_eq!(out.status.code(), Some(2), "a bad output path is a usage error");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot open") && stderr.contains("no-such-dir"), "{stderr}");
    // The results are still in the job's stream: a second wait to a good path gets them all.
    let lines = fleet.collect(&job);
    assert_exactly_once(&lines, 30);
    fleet.cleanup(&[&job]);
}

#[test]
fn a_huge_message_on_the_items_queue_is_dead_lettered_as_oversized() {
    let mock = Mock::start(&[]);
    let fleet = Fleet::new("huge", &mock.url, "[amqp]\nmax_message_bytes = 65536\n");
    let _w = fleet.worker("w1", &[]);
    fleet.wait_until_consuming("w1");
    let huge = vec![b'x'; 1 << 20];
    fleet.amqp(|conn, t| async move {
        let ch = fleet::amqp::confirm_channel(&conn).await.unwrap();
        fleet::amqp::publish_confirmed(&ch, &t.items_exchange(), "mock", &huge, fleet::amqp::persistent_json())
            .await
            .unwrap();
    });
    eventually(Duration::from_secs(30), "parked", || fleet.queue_len(&fleet.topology().dead_queue()) == Some(1));
    let dead = fleet.producer(&["dead"]);
    assert!(
        String::from_utf8_lossy(&dead.stdout).contains("oversized: 1048576 bytes"),
        "{}",
        String::from_utf8_lossy(&dead.stdout)
    );
    // And the worker still works.
    let job = fleet.submit_requests(10);
    let output = fleet.dir.join("out.jsonl");
    assert!(fleet.wait(&job, &output, 60).status.success());
    assert_exactly_once(&read_output(&output), 10);
    fleet.cleanup(&[&job]);
}
