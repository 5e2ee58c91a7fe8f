//! Delayed items survive a broker restart (issue 9, point 1), on a private RabbitMQ node.
//! The longer version (4,000 items) runs in `make chaos`.

#[test]
fn items_waiting_in_delay_queues_survive_a_broker_restart() {
    let report = e2e::restart::delayed_items_survive_a_broker_restart(1500);
    println!("{report:#?}");
    assert!(report.delayed_at_restart > 0, "items were waiting when the broker stopped: {report:#?}");
    assert!(report.ok(), "{report:#?}");
}
