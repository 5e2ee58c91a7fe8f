//! Several broker addresses (`amqp.urls`): a dead address costs no wait, and a client whose
//! node goes away moves to another and resumes. A "node" here is a loopback forwarder to
//! the real RabbitMQ ([`e2e::proxy::Proxy`]) that can be killed without touching the shared
//! broker; `make cluster` proves the same against a real 3-node cluster.

use std::time::{Duration, Instant};

use e2e::proxy::{broker_addr, Proxy};
use e2e::*;
use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

/// A port nothing listens on (bound, then released).
fn closed_port_url() -> String {
    format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port())
}

#[test]
fn a_dead_first_address_is_skipped_without_waiting_for_a_timeout() {
    let urls = vec![closed_port_url(), amqp_url()];
    rt().block_on(async {
        // Each connect starts one address further on: four connects start twice at the
        // dead address and twice at the live one.
        for _ in 0..4 {
            let started = Instant::now();
            let conn = fleet::amqp::connect_any(&urls, "e2e failover").await.expect("the live address answers");
            // Far below the TCP connect timeout: the refused address was not waited on.
            assert!(started.elapsed() < fleet::amqp::TCP_CONNECT_TIMEOUT, "connect took {:?}", started.elapsed());
            assert!(conn.status().connected());
            conn.close(200, "done".into()).await.expect("close");
        }
        // Only dead addresses: a clear error naming no password, not a hang.
        let err = fleet::amqp::connect_any(&[closed_port_url(), closed_port_url()], "e2e failover").await.unwrap_err();
        assert!(err.to_string().to_lowercase().contains("refused"), "{err}");
    });
}

#[test]
fn a_client_whose_node_goes_away_reconnects_to_another_and_keeps_its_messages() {
    let mut nodes = [Proxy::start(broker_addr()), Proxy::start(broker_addr())];
    let urls: Vec<String> = nodes.iter().map(Proxy::url).collect();
    let queue = namespace("failover");
    rt().block_on(async {
        let never = tokio_util::sync::CancellationToken::new();
        let conn = fleet::amqp::connect_with_retry(&urls, "e2e failover", &never).await.expect("connected");
        let first = nodes.iter().position(|n| n.accepted() == 1).expect("one node took the connection");
        let ch = fleet::amqp::confirm_channel(&conn).await.expect("channel");
        let durable = QueueDeclareOptions { durable: true, ..Default::default() };
        ch.queue_declare(queue.as_str().into(), durable, FieldTable::default()).await.expect("declare");
        fleet::amqp::publish_confirmed(&ch, "", &queue, b"before", fleet::amqp::persistent_json())
            .await
            .expect("publish");

        nodes[first].kill();
        // The client notices (its socket is cut) and its next publish fails...
        let mut failed = false;
        for _ in 0..100 {
            if fleet::amqp::publish_confirmed(&ch, "", &queue, b"lost?", fleet::amqp::persistent_json()).await.is_err()
            {
                failed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(failed, "a publish through a dead node cannot succeed");
        // ...and reconnecting lands on the other node at once, whatever the rotation.
        for _ in 0..3 {
            let started = Instant::now();
            let conn = fleet::amqp::connect_with_retry(&urls, "e2e failover", &never).await.expect("reconnected");
            assert!(started.elapsed() < fleet::amqp::TCP_CONNECT_TIMEOUT, "took {:?}", started.elapsed());
            let ch = conn.create_channel().await.expect("channel");
            let got = ch.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false }).await.expect("get");
            let msg = got.expect("the confirmed message survived the failover");
            assert_eq!(msg.delivery.data, b"before");
            // Leave it for the next round (nack-requeue by closing without ack).
            conn.close(200, "done".into()).await.expect("close");
        }
        assert_eq!(nodes[first].accepted(), 1, "the dead node took no new connection");
        assert_eq!(nodes[1 - first].accepted(), 3, "every reconnect went to the live node");
        let conn = fleet::amqp::connect(&amqp_url(), "e2e cleanup").await.expect("connect");
        let ch = conn.create_channel().await.expect("channel");
        ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await.expect("delete");
    });
}

#[test]
fn workers_and_producer_fail_over_mid_job_and_lose_nothing() {
    let mut nodes = [Proxy::start(broker_addr()), Proxy::start(broker_addr())];
    let mock = Mock::start(&["--latency-ms", "20", "--jitter-ms", "20"]);
    let extra = format!(
        "[amqp]\nurls = {:?}\n[worker]\nmax_in_flight = 16\n",
        nodes.iter().map(Proxy::url).collect::<Vec<_>>()
    );
    let fleet = Fleet::new("failover", &mock.url, &extra);
    let _w1 = fleet.worker("w1", &[]);
    let _w2 = fleet.worker("w2", &[]);
    let n = 3000;
    let input = fleet.dir.join("in.jsonl");
    write_requests(&input, n);
    let (job, _) = fleet.submit(&input);
    let output = fleet.dir.join("out.jsonl");
    let mut waiter = fleet.producer_spawn(&["wait", &job, "--output", output.to_str().unwrap(), "--timeout", "300"]);
    // Each node goes away once while the job runs (the first comes back before the second
    // goes), so every client, wherever it was connected, has to move at least once.
    let target = broker_addr();
    for (i, share) in [(0, 3), (1, 2)] {
        eventually(Duration::from_secs(120), "results written", || {
            std::fs::read_to_string(&output).map(|t| t.lines().count()).unwrap_or(0) >= n / share
        });
        let port = nodes[i].port;
        nodes[i].kill();
        if i == 0 {
            std::thread::sleep(Duration::from_secs(1));
            nodes[0] = Proxy::start_on(port, target);
        }
    }
    assert_eq!(waiter.wait_exit(Duration::from_secs(240)), Some(0), "producer wait finished");
    let lines = read_output(&output);
    let by_status = assert_exactly_once(&lines, n);
    assert_eq!(by_status.get(&200).copied(), Some(n as u64), "every item succeeded: {by_status:?}");
    for w in ["w1", "w2"] {
        assert!(fleet.worker_log(w).contains("lost the broker"), "{w} moved to the other node");
    }
    let status = fleet.final_status(&job);
    assert_eq!(status["succeeded"].as_u64(), Some(n as u64), "tracker: {status}");
    fleet.cleanup(&[&job]);
}

#[test]
fn the_address_list_comes_from_the_environment_as_a_comma_list() {
    // The file names only a dead broker; the environment lists a dead one and the real one.
    let dead = closed_port_url();
    let extra = format!("[amqp]\nurl = \"{dead}\"\nurls = []\n");
    let fleet = Fleet::new("failover-env", "http://127.0.0.1:9", &extra);
    let input = fleet.dir.join("in.jsonl");
    write_requests(&input, 3);
    let submit = |env: Option<String>| {
        let mut cmd = std::process::Command::new(bin("producer"));
        cmd.arg("--config").arg(&fleet.config).args([
            "--quiet",
            "submit",
            input.to_str().unwrap(),
            "--provider",
            "mock",
            "--json",
        ]);
        cmd.env_remove("FLEET__AMQP__URL").env_remove("FLEET__AMQP__URLS");
        if let Some(list) = env {
            cmd.env("FLEET__AMQP__URLS", list);
        }
        cmd.output().expect("run producer")
    };
    let out = submit(None);
    assert!(!out.status.success(), "the file's dead broker alone cannot work");
    let out = submit(Some(format!("{dead},{}", amqp_url())));
    assert!(out.status.success(), "submit through the environment's list: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let job = v["job_id"].as_str().expect("job id").to_string();
    fleet.cleanup(&[&job]);
}
