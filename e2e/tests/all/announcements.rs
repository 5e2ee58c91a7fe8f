//! Job announcements cannot starve jobs (issue 21, item 4): anyone who can publish to the
//! control stream can announce jobs, and a worker consumes at most
//! `MAX_CONSUMED_JOBS` (64) jobs of a provider at once. Announcements of empty queues
//! that exist, and of queues that do not, are published before a real job: the real job
//! must still be consumed, within seconds, while the worker stays up and quiet.

use std::time::{Duration, Instant};

use e2e::*;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde_json::json;

/// More empty queues than a worker consumes jobs of one provider at once.
const EMPTY: usize = 70;
/// Announcements of queues that do not exist.
const MISSING: usize = 3_000;

#[test]
fn announcements_of_empty_and_missing_queues_do_not_starve_a_real_job() {
    let mock = Mock::start(&[]);
    let fleet = Fleet::new("announce", &mock.url, "");
    let _w = fleet.worker("w1", &[]);
    fleet.wait_until_consuming("w1");
    fleet.amqp(|conn, t| async move {
        let ch = fleet::amqp::confirm_channel(&conn).await.expect("confirm channel");
        let control = t.control_stream();
        let announce = |job: String| {
            let msg = json!({"type": "job_opened", "job_id": job, "provider": MOCK, "priority": 1});
            serde_json::to_vec(&msg).unwrap()
        };
        // Empty queues first (the oldest announcements: first in line), then missing ones.
        for i in 0..EMPTY {
            let job = format!("empty{i}");
            ch.queue_declare(
                t.job_items_queue(MOCK, &job).as_str().into(),
                QueueDeclareOptions { durable: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .expect("declare an empty queue");
            let body = announce(job);
            fleet::amqp::publish_confirmed(&ch, "", &control, &body, fleet::amqp::persistent_json())
                .await
                .expect("publish an announcement");
        }
        for i in 0..MISSING {
            let body = announce(format!("missing{i}"));
            fleet::amqp::publish_confirmed(&ch, "", &control, &body, fleet::amqp::persistent_json())
                .await
                .expect("publish an announcement");
        }
    });
    let started = Instant::now();
    let job = fleet.submit_requests(50);
    let lines = fleet.collect(&job);
    assert_exactly_once(&lines, 50);
    let took = started.elapsed();
    eprintln!("the real job ran in {took:?} behind {EMPTY} empty and {MISSING} missing announcements");
    assert!(took < Duration::from_secs(60), "the real job waited {took:?}");
    let log = fleet.worker_log("w1");
    let loud: Vec<&str> = log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
    assert!(loud.is_empty(), "the worker complained:\n{}", loud.join("\n"));
    let connects = log.lines().filter(|l| l.contains("worker::consume: consuming")).count();
    assert_eq!(connects, 1, "the worker never reconnected:\n{log}");
    fleet.cleanup(&[&job]);
}
