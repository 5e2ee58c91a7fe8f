//! Grouped results (`worker.result_group_max`, `worker.result_group_linger_ms`): a worker
//! killed while a group is open loses nothing, and `producer wait` and the tracker read
//! single results and groups alike and keep the same first result of a redone item.

use std::time::Duration;

use e2e::*;
use fleet::wire::{ErrorRecord, ItemResult, ItemStatus, ResultGroup};
use lapin::BasicProperties;

/// A worker whose groups stay open 10 s and never fill: every result it has is unpublished.
const HOLD_GROUPS: [(&str, &str); 2] =
    [("FLEET__WORKER__RESULT_GROUP_MAX", "10000"), ("FLEET__WORKER__RESULT_GROUP_LINGER_MS", "10000")];

#[test]
fn a_worker_killed_with_a_partly_filled_group_loses_nothing_and_the_tracker_agrees() {
    let mock = Mock::start(&["--latency-ms", "5"]);
    let fleet = Fleet::new("group_kill", &mock.url, "");
    let w1 = fleet.worker("w1", &HOLD_GROUPS);
    let job = fleet.submit_requests(300);
    // w1 has answers in its open group, none published (the group waits 10 s).
    eventually(Duration::from_secs(30), "answers waiting in an open group", || mock.status_count(200) >= 40);
    let answered_by_w1 = mock.status_count(200);
    w1.signal("KILL");
    drop(w1);
    // Nothing of the open group reached the broker: the job's stream holds no result.
    let early = fleet.dir.join("early.jsonl");
    let out = fleet.wait(&job, &early, 3);
    assert!(!out.status.success(), "wait cannot finish without results");
    assert_eq!(read_output(&early).len(), 0, "a killed worker's open group was never sent");

    // Small groups now, so several groups and a final partial one are needed.
    let _w2 = fleet
        .worker("w2", &[("FLEET__WORKER__RESULT_GROUP_MAX", "7"), ("FLEET__WORKER__RESULT_GROUP_LINGER_MS", "20")]);
    let lines = fleet.collect(&job);
    let by_status = assert_exactly_once(&lines, 300);
    assert_eq!(by_status.get(&200), Some(&300), "{by_status:?}");
    assert!(mock.status_count(200) >= 300 + answered_by_w1.min(300), "the killed worker's items were redone");
    let v = fleet.final_status(&job);
    assert_eq!((v["status"].as_str(), v["succeeded"].as_u64()), (Some("completed"), Some(300)), "{v}");
    let log = fleet.worker_log("w2");
    assert!(!log.contains("WARN") && !log.contains("ERROR"), "grouped acks never upset the channel: {log}");
    fleet.cleanup(&[&job]);
}

/// A result published for `index` before any worker ran, as a worker killed between its
/// confirm and its ack leaves behind: the item is then redone and answered again.
fn earlier_failure(job: &str, index: u64, total: u64) -> ItemResult {
    ItemResult {
        job_id: job.to_string(),
        index,
        total,
        custom_id: format!("req-{index}"),
        provider: "mock".into(),
        status: ItemStatus::Failed,
        response: None,
        error: Some(ErrorRecord { code: "timeout".into(), message: "first attempt".into() }),
        attempts: 1,
        worker: "killed".into(),
        finished_at_ms: fleet::now_ms(),
        request: None,
        usage: None,
    }
}

#[test]
fn wait_and_the_tracker_keep_the_same_first_result_of_redone_items_single_or_grouped() {
    let mock = Mock::start(&[]);
    let fleet = Fleet::new("group_first", &mock.url, "");
    fleet.declare_topology_then_stop();
    let (total, job) = (50u64, fleet.submit_requests(50));
    // First results of items 0 and 1 in a group (as a worker sends them), of item 2 alone
    // (as the tracker and earlier versions send them).
    let group = ResultGroup {
        job_id: job.clone(),
        provider: "mock".into(),
        total,
        worker: "killed".into(),
        results: vec![earlier_failure(&job, 0, total).into_grouped(), earlier_failure(&job, 1, total).into_grouped()],
    };
    let single = earlier_failure(&job, 2, total);
    let job2 = job.clone();
    fleet.amqp(|conn, t| async move {
        let ch = fleet::amqp::confirm_channel(&conn).await.unwrap();
        let messages = [
            (fleet::wire::KIND_RESULTS, serde_json::to_vec(&group).unwrap()),
            (fleet::wire::KIND_RESULT, serde_json::to_vec(&single).unwrap()),
        ];
        for (kind, payload) in messages {
            let props = BasicProperties::default().with_type(kind.into());
            fleet::amqp::publish_confirmed(&ch, &t.results_exchange(), &job2, &payload, props).await.unwrap();
        }
    });
    // Every item is answered 200 now, items 0-2 for the second time.
    let _w = fleet.worker("w1", &[]);
    let lines = fleet.collect(&job);
    assert_exactly_once(&lines, 50);
    assert_eq!(mock.status_count(200), 50, "every item, the redone ones too, was answered again");
    for l in &lines {
        let first_failed = matches!(l["custom_id"].as_str(), Some("req-0" | "req-1" | "req-2"));
        assert_eq!(l["error"]["code"].as_str() == Some("timeout"), first_failed, "the first result is kept: {l}");
    }
    let v = fleet.final_status(&job);
    assert_eq!((v["succeeded"].as_u64(), v["failed"].as_u64()), (Some(47), Some(3)), "the tracker agrees: {v}");
    fleet.cleanup(&[&job]);
}
