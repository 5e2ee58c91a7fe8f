//! Grouped acks on the real RabbitMQ: a multiple ack settles exactly the deliveries it was
//! given, never another unsettled one below it, and single settlements in between never
//! upset the channel.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use worker::acks::{self, ChannelAcks};

fn amqp_url() -> String {
    std::env::var("FLEET__AMQP__URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

#[tokio::test]
async fn a_group_is_acked_with_one_multiple_ack_only_where_no_other_delivery_is_below_it() {
    let conn = fleet::amqp::connect(&amqp_url(), "worker acks test").await.expect("RabbitMQ on 127.0.0.1:5672");
    let queue = format!("test.acks.{}", std::process::id());
    let ch = fleet::amqp::confirm_channel(&conn).await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    ch.queue_declare(queue.as_str().into(), QueueDeclareOptions { durable: true, ..Default::default() }, args)
        .await
        .unwrap();
    for i in 0..10u8 {
        fleet::amqp::publish_confirmed(&ch, "", &queue, &[i], fleet::amqp::persistent_json()).await.unwrap();
    }

    let consume = conn.create_channel().await.unwrap();
    consume.basic_qos(10, BasicQosOptions::default()).await.unwrap();
    let mut consumer = consume
        .basic_consume(queue.as_str().into(), "t".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let tracker = Arc::new(ChannelAcks::default());
    let mut got = Vec::new();
    for _ in 0..10 {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await.unwrap().unwrap().unwrap();
        got.push(Some(tracker.track(d).await));
    }
    let mut take = |i: usize| got[i].take().unwrap();
    // Message 2 is settled alone (e.g. dead-lettered) while a group is open.
    take(2).nack(true).await.unwrap();
    // Group {0, 1, 3, 4, 7}: 0-4 are the oldest unsettled, one frame; 7 is above 5 and 6,
    // which are still someone's: a frame of its own.
    let group = vec![take(7), take(0), take(3), take(1), take(4)];
    let settled = acks::ack_all(group).await.unwrap();
    assert_eq!((settled.frames, settled.deliveries), (2, 5));
    // Group {8, 9} waits above 5 and 6: single acks.
    let settled = acks::ack_all(vec![take(9), take(8)]).await.unwrap();
    assert_eq!(settled.frames, 2);
    // 5 and 6 were never acked, and 2 was requeued (perhaps redelivered to this consumer,
    // unacked): those come back when the channel closes, and nothing else does.
    consume.close(200, "done".into()).await.expect("no ack upset the channel");
    let check = conn.create_channel().await.unwrap();
    let mut left = Vec::new();
    while let Some(msg) = check.basic_get(queue.as_str().into(), Default::default()).await.unwrap() {
        left.push(msg.delivery.data[0]);
        msg.delivery.acker.ack(Default::default()).await.unwrap();
    }
    left.sort();
    assert_eq!(left, vec![2, 5, 6], "exactly the deliveries never acked are back");
    check.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await.unwrap();
    fleet::amqp::close(&conn, "done").await;
}
