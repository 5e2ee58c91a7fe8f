//! Issue 21, point 2: trust the producer only with what producers do. A producer user made
//! by `scripts/rabbitmq-users.sh` runs `submit`, `wait` and `status` against a worker that
//! runs as the worker user; the broker refuses it the fleet's internal queues
//! (ACCESS_REFUSED on reading the checkpoint, the ledger, the control stream); what it can
//! still write there through the default exchange (a forged checkpoint) is refused by the
//! fleet's signature. And an unsigned `created` chunk, which a producer could publish to a
//! chunk queue it must write to, is dead-lettered before anything reaches the provider.

use std::process::Command;
use std::time::Duration;

use e2e::*;
use lapin::options::BasicGetOptions;

/// RabbitMQ users made for one test, deleted when dropped.
struct Users(Vec<String>);

impl Drop for Users {
    fn drop(&mut self) {
        for u in &self.0 {
            let _ = Command::new("rabbitmqctl").args(["delete_user", u]).output();
        }
    }
}

/// The test broker's URL with another user's credentials.
fn url_as(user: &str, password: &str) -> String {
    let url = amqp_url();
    assert!(url.contains("guest:guest@"), "this test swaps the guest user of {url:?} for its own");
    url.replacen("guest:guest@", &format!("{user}:{password}@"), 1)
}

/// Runs `scripts/rabbitmq-users.sh` for namespace `ns`.
fn make_users(ns: &str, env: &[(&str, &str)]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/rabbitmq-users.sh");
    let out = Command::new("bash")
        .arg(script)
        .env("FLEET_NAMESPACE", ns)
        .envs(env.iter().copied())
        .output()
        .expect("run rabbitmq-users.sh");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "rabbitmq-users.sh: {stdout}{stderr}");
    for (key, value) in env {
        if key.ends_with("PASSWORD") {
            assert!(!stdout.contains(value) && !stderr.contains(value), "a password is echoed: {stdout}{stderr}");
        }
    }
}

/// The broker's answer to the producer user reading `queue` (`basic.get`), as text.
async fn get_as(conn: &lapin::Connection, queue: &str) -> String {
    let ch = conn.create_channel().await.expect("channel");
    match ch.basic_get(queue.into(), BasicGetOptions::default()).await {
        Ok(_) => "allowed".to_string(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_producer_user_runs_jobs_but_cannot_read_internal_queues_or_forge_a_checkpoint() {
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let (producer, producer_pw) = (format!("fleet-producer-{tag}"), format!("pp-{tag}-secret"));
    let (worker, worker_pw) = (format!("fleet-worker-{tag}"), format!("wp-{tag}-secret"));
    let _users = Users(vec![producer.clone(), worker.clone()]);
    let mock = Mock::start(&[]);
    // The config's URL is the producer user's: every `producer` command runs as it.
    let fleet =
        Fleet::new("principals", &mock.url, &format!("[amqp]\nurl = \"{}\"\n", url_as(&producer, &producer_pw)));
    let ns = fleet.topology().namespace().to_string();
    let env = [
        ("PRODUCER_USER", producer.as_str()),
        ("PRODUCER_PASSWORD", producer_pw.as_str()),
        ("WORKER_USER", worker.as_str()),
        ("WORKER_PASSWORD", worker_pw.as_str()),
    ];
    make_users(&ns, &env);
    make_users(&ns, &env); // idempotent: a second run changes nothing and succeeds
    let worker_url = url_as(&worker, &worker_pw);
    let mut w1 = fleet.worker("w1", &[("FLEET__AMQP__URL", &worker_url)]);

    let job = fleet.submit_requests(20);
    assert_exactly_once(&fleet.collect(&job), 20);
    assert_eq!(fleet.final_status(&job)["status"], "completed");
    w1.signal("TERM");
    assert_eq!(w1.wait_exit(Duration::from_secs(30)), Some(0));

    // As the producer user: the internal queues cannot be read, consumed or purged.
    let t = fleet.topology();
    let internal = [t.tracker_state_queue(), t.tracker_state_copy_queue(), t.ledger_queue(), t.control_stream()];
    let answers = fleet.amqp(|conn, _| async move {
        let mut answers = Vec::new();
        for q in &internal {
            answers.push((q.clone(), get_as(&conn, q).await));
        }
        answers
    });
    for (queue, answer) in &answers {
        assert!(answer.contains("ACCESS_REFUSED"), "the producer user reads {queue}: {answer}");
    }

    // What it can write (the default exchange routes to any queue by name): a well-formed
    // checkpoint forgetting every job, newer than any. It lacks the fleet's signature.
    let state_queue = t.tracker_state_queue();
    let real = {
        let q = state_queue.clone();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let conn = fleet::amqp::connect(&amqp_url(), "e2e-guest").await.expect("connect as guest");
            let ch = conn.create_channel().await.unwrap();
            let msg = ch.basic_get(q.as_str().into(), BasicGetOptions::default()).await.unwrap().expect("a checkpoint");
            let body = msg.delivery.data.clone();
            msg.delivery
                .acker
                .nack(lapin::options::BasicNackOptions { requeue: true, ..Default::default() })
                .await
                .unwrap();
            body
        })
    };
    let mut forged: Value = serde_json::from_slice(&real).expect("the checkpoint is JSON");
    forged["checkpoint_seq"] = Value::from(u64::MAX / 2);
    forged["jobs"] = serde_json::json!({});
    let forged = serde_json::to_vec(&forged).unwrap();
    let published = fleet.amqp(|conn, _| async move {
        let ch = fleet::amqp::confirm_channel(&conn).await.unwrap();
        fleet::amqp::publish_confirmed(&ch, "", &state_queue, &forged, fleet::amqp::persistent_json()).await
    });
    assert!(published.is_ok(), "the broker takes it (see docs/teams.md): {published:?}");

    let _w2 = fleet.worker("w2", &[("FLEET__AMQP__URL", &worker_url)]);
    fleet.wait_for_tracker();
    let status = fleet.final_status(&job);
    assert_eq!(status["status"], "completed", "the signed copy was restored, not the forgery: {status}");
    let log = fleet.worker_log("w2");
    assert!(
        log.contains("a tracker checkpoint is unreadable") && log.contains("not signed with the fleet key"),
        "{log}"
    );
    let job2 = fleet.submit_requests(10);
    assert_exactly_once(&fleet.collect(&job2), 10);
    assert_eq!(fleet.final_status(&job2)["status"], "completed");
    fleet.cleanup(&[&job, &job2]);
}

/// The chunk queues' poll interval of this test's fleet.
const POLL_S: u64 = 1;

#[test]
fn a_forged_unsigned_created_chunk_is_dead_lettered_untouched() {
    let mock = Mock::start(&["--batch-complete-ms", "60000"]);
    let extra = format!("[providers.mock]\nbatch = true\nbatch_poll_interval_s = {POLL_S}\nbatch_max_requests = 100\n");
    let f = Fleet::new("unsignedchunk", &mock.url, &extra);
    let _w = f.worker("w1", &[]);
    let input = f.dir.join("in.jsonl");
    write_requests(&input, 10);
    let job = harness::submit(&f.config, &input, MOCK, &["--mode", "batch"]).unwrap().job_id;
    eventually(Duration::from_secs(30), "the job's batch exists", || {
        mock.stats()["batches"]["openai_created"].as_object().is_some_and(|m| !m.is_empty())
    });
    let listed = get_json(&format!("{}/v1/batches?limit=10", mock.url));
    let victim = listed["data"][0].clone();
    // Another job's chunk past its deadline (a worker that trusted it would cancel the
    // batch), naming the victim's batch and input file, in the workers' own tag format:
    // only the missing signature stops it.
    let forged = serde_json::json!({
        "job_id": job, "provider": "mock", "chunk": 0, "start": 0, "end": 1, "total": 10,
        "submitted_at_ms": 0, "deadline_ms": 1, "state": "created", "batch_id": victim["id"],
        "input_file_id": victim["input_file_id"], "cancel_sent": false,
    });
    let queue = f.topology().chunk_queue("mock");
    f.amqp(|conn, _| async move {
        let ch = fleet::amqp::confirm_channel(&conn).await.unwrap();
        let payload = serde_json::to_vec(&forged).unwrap();
        fleet::amqp::publish_confirmed(&ch, "", &queue, &payload, fleet::amqp::persistent_json()).await.unwrap();
    });
    eventually(Duration::from_secs(30), "the unsigned chunk is dead-lettered", || {
        String::from_utf8_lossy(&f.producer(&["dead", "--json"]).stdout).contains("unsigned chunk in state created")
    });
    let stats = mock.stats();
    assert_eq!(stats["batches"]["cancelled"], 0, "no cancel reached the provider: {stats}");
    assert_eq!(stats["batches"]["files_deleted"], 0, "no file was deleted: {stats}");
    f.cleanup(&[&job]);
    f.amqp(|conn, t| async move {
        let ch = conn.create_channel().await.expect("channel");
        let _ = t.delete_chunk_queues(&ch, "mock", POLL_S).await;
    });
}
