//! `fleet::amqp::refusal` against the real broker: each refusal the fleet acts on is
//! provoked for real and classified by its reply code.

use fleet::amqp::{self, Refusal};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};

fn broker_url() -> String {
    std::env::var("FLEET__AMQP__URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn unique(name: &str) -> String {
    format!("refusals-{name}-{}-{}", std::process::id(), fleet::now_ms())
}

#[tokio::test]
async fn each_refusal_is_classified_by_its_reply_code() {
    let url = broker_url();
    let conn = amqp::connect(&url, "refusals-test").await.expect("the local RabbitMQ");

    // NOT_FOUND: a passive declare of a queue nobody declared.
    let ch = conn.create_channel().await.unwrap();
    let missing = unique("missing");
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let err = ch.queue_declare(missing.as_str().into(), passive, FieldTable::default()).await.unwrap_err();
    assert_eq!(amqp::refusal(&err), Some(Refusal::NotFound), "{err}");

    // PRECONDITION_FAILED: the same queue declared again with another argument.
    let ch = conn.create_channel().await.unwrap();
    let queue = unique("args");
    let with_limit = |n: i64| {
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(n));
        args
    };
    ch.queue_declare(queue.as_str().into(), QueueDeclareOptions::default(), with_limit(10)).await.unwrap();
    let err =
        ch.queue_declare(queue.as_str().into(), QueueDeclareOptions::default(), with_limit(20)).await.unwrap_err();
    assert_eq!(amqp::refusal(&err), Some(Refusal::PreconditionFailed), "{err}");
    let as_chain: &(dyn std::error::Error + 'static) = &err;
    assert!(fleet::topology::is_precondition_failed(as_chain));

    // RESOURCE_LOCKED: an exclusive queue of one connection, declared by another.
    let locker = conn.create_channel().await.unwrap();
    let lock = unique("lock");
    let exclusive = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
    locker.queue_declare(lock.as_str().into(), exclusive, FieldTable::default()).await.unwrap();
    let other = amqp::connect(&url, "refusals-test-2").await.unwrap();
    let ch2 = other.create_channel().await.unwrap();
    let err = ch2.queue_declare(lock.as_str().into(), exclusive, FieldTable::default()).await.unwrap_err();
    assert_eq!(amqp::refusal(&err), Some(Refusal::ResourceLocked), "{err}");

    // ACCESS_REFUSED: a wrong password.
    let bad = url.replacen("guest:guest@", "guest:not-the-password@", 1);
    if bad != url {
        let err = amqp::connect(&bad, "refusals-test-3").await.unwrap_err();
        assert_eq!(amqp::refusal(&err), Some(Refusal::AccessRefused), "{err}");
    }

    // A transient error (here: a closed channel) is no refusal: the caller reconnects.
    let err = ch2.queue_declare(lock.as_str().into(), exclusive, FieldTable::default()).await.unwrap_err();
    assert_eq!(amqp::refusal(&err), None, "{err}");

    let cleanup = conn.create_channel().await.unwrap();
    cleanup.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await.unwrap();
    let _ = other.close(200, "done".into()).await;
    let _ = conn.close(200, "done".into()).await;
}
