//! A silent node: the node every client is connected to stops passing bytes without
//! closing anything (what a network partition looks like from its side: no error, only
//! silence). Workers and the producer notice through AMQP heartbeats within the stated
//! bound (`fleet::amqp::silent_node_bound`: 2.5 x `amqp.heartbeat_s`, 25 s by default),
//! move to the live node, and the job ends with every item exactly once. A "node" is a
//! loopback forwarder to the shared RabbitMQ ([`e2e::proxy::Proxy`]), as in `failover.rs`.

use std::time::{Duration, Instant};

use e2e::proxy::{broker_addr, Proxy};
use e2e::*;

/// Slack on top of each bound for this test's own polling (every 200 ms) and for log lines
/// reaching the file on a loaded 2-core machine.
const SLACK: Duration = Duration::from_secs(3);

fn lines_in(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path).map(|t| t.lines().count()).unwrap_or(0)
}

#[test]
fn clients_leave_a_silent_node_within_the_heartbeat_bound_and_nothing_is_lost_or_doubled() {
    let target = broker_addr();
    let doomed = Proxy::start(target);
    // The live node's port answers nothing yet (refused at once), so every client starts
    // on the node that will go silent, whatever its rotation.
    let live_port = free_port();
    let live_url = format!("amqp://guest:guest@127.0.0.1:{live_port}/%2f");
    let mock = Mock::start(&["--latency-ms", "20", "--jitter-ms", "20"]);
    // The default heartbeat (10 s): what an operator who sets nothing gets.
    let extra = format!("[amqp]\nurls = {:?}\n[worker]\nmax_in_flight = 16\n", [doomed.url(), live_url]);
    let fleet = Fleet::new("silent", &mock.url, &extra);
    let heartbeat_s = fleet::amqp::DEFAULT_HEARTBEAT_S;
    let notice = fleet::amqp::silent_node_bound(heartbeat_s);
    // Noticed, then one connect to the silent address may time out before the live one is
    // tried, then the worker's or collector's first retry delay (at most 5 s).
    let resume = notice + fleet::amqp::CONNECT_TIMEOUT + Duration::from_secs(5);

    let _w1 = fleet.worker("w1", &[]);
    let _w2 = fleet.worker("w2", &[]);
    let n = 3000;
    let input = fleet.dir.join("in.jsonl");
    write_requests(&input, n);
    let (job, _) = fleet.submit(&input);
    let output = fleet.dir.join("out.jsonl");
    let mut waiter = fleet.producer_spawn(&["wait", &job, "--output", output.to_str().unwrap(), "--timeout", "300"]);
    eventually(Duration::from_secs(120), "a third of the results written", || lines_in(&output) >= n / 3);
    assert!(lines_in(&output) < n, "the job is still running when the node goes silent");

    let live = Proxy::start_on(live_port, target);
    assert_eq!(live.accepted(), 0, "no client was on the live node before");
    let silent_at = Instant::now();
    doomed.go_silent();
    // Nothing can flow through the live node before a client has noticed (two heartbeats
    // at least); what reaches the output before then is the producer draining results it
    // had already received (up to its prefetch: a CI run saw 64 more within 0.4 s).
    let drained_by = Duration::from_secs(u64::from(heartbeat_s) * 2) - SLACK;
    let mut written_before_notice = lines_in(&output);

    // When each client noticed (its warning) and when results flowed again to the producer.
    let mut noticed: [Option<Duration>; 2] = [None, None];
    let mut flowing: Option<Duration> = None;
    while silent_at.elapsed() < resume + SLACK && (noticed.contains(&None) || flowing.is_none()) {
        if silent_at.elapsed() < drained_by {
            written_before_notice = lines_in(&output);
        }
        for (i, w) in ["w1", "w2"].into_iter().enumerate() {
            if noticed[i].is_none() && fleet.worker_log(w).contains("lost the broker") {
                noticed[i] = Some(silent_at.elapsed());
            }
        }
        // More than the tail a collector may still have had in flight at the switch.
        if flowing.is_none() && silent_at.elapsed() >= drained_by && lines_in(&output) > written_before_notice + 64 {
            flowing = Some(silent_at.elapsed());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("heartbeat {heartbeat_s} s: workers noticed after {noticed:?}, results flowing again after {flowing:?}");
    for (w, at) in ["w1", "w2"].iter().zip(noticed) {
        let at = at.unwrap_or_else(|| panic!("{w} never noticed the silent node in {:?}", resume + SLACK));
        assert!(at <= notice + SLACK, "{w} noticed after {at:?}, the bound is {notice:?}");
        // Not before two heartbeats: nothing else told it.
        assert!(at >= Duration::from_secs(u64::from(heartbeat_s) * 2) - SLACK, "{w} noticed after only {at:?}");
    }
    let flowing = flowing.expect("results flow again through the live node");
    assert!(flowing <= resume + SLACK, "results flowed again after {flowing:?}, the bound is {resume:?}");
    assert!(live.accepted() >= 3, "workers and the producer reconnected to the live node: {}", live.accepted());

    assert_eq!(waiter.wait_exit(Duration::from_secs(240)), Some(0), "producer wait finished");
    let lines = read_output(&output);
    let by_status = assert_exactly_once(&lines, n);
    assert_eq!(by_status.get(&200).copied(), Some(n as u64), "every item succeeded: {by_status:?}");
    let status = fleet.final_status(&job);
    assert_eq!(status["succeeded"].as_u64(), Some(n as u64), "tracker: {status}");
    assert_eq!(status["total"].as_u64(), Some(n as u64), "tracker: {status}");
    drop(doomed);
    fleet.cleanup(&[&job]);
}
