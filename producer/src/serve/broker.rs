//! The server's way to the broker: one shared connection, reopened when it fails, and a
//! reader of a stream from its first message (the metadata stream, a file's lines, a job's
//! results), which consumes nothing: a stream keeps what it holds for every reader.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};

use super::error::ApiError;

/// Messages a stream reader acks at once (on a stream an ack only makes room for more
/// deliveries in the prefetch window; it removes nothing).
const ACK_EVERY: usize = 64;

/// One connection shared by every request, opened again after it fails.
pub(crate) struct Broker {
    urls: Vec<String>,
    conn: tokio::sync::Mutex<Option<Arc<lapin::Connection>>>,
}

impl Broker {
    /// A broker reached at any of `urls`; nothing is connected before the first use.
    pub(crate) fn new(urls: Vec<String>) -> Broker {
        Broker { urls, conn: tokio::sync::Mutex::new(None) }
    }

    /// The connection, opened (again) if there is none or it failed.
    pub(crate) async fn conn(&self) -> Result<Arc<lapin::Connection>, ApiError> {
        let mut conn = self.conn.lock().await;
        if let Some(c) = conn.as_ref().filter(|c| c.status().connected()) {
            return Ok(c.clone());
        }
        let fresh = Arc::new(fleet::amqp::connect_any(&self.urls, "producer serve").await?);
        *conn = Some(fresh.clone());
        Ok(fresh)
    }

    /// A channel in confirm mode on the shared connection.
    pub(crate) async fn confirm_channel(&self) -> Result<lapin::Channel, ApiError> {
        Ok(fleet::amqp::confirm_channel(&*self.conn().await?).await?)
    }

    /// Closes the connection (at shutdown).
    pub(crate) async fn close(&self) {
        if let Some(c) = self.conn.lock().await.take() {
            fleet::amqp::close(&c, "serve stopped").await;
        }
    }
}

/// A consumer of a stream from its first message, acking in runs.
pub(crate) struct StreamReader {
    ch: lapin::Channel,
    consumer: lapin::Consumer,
    unacked: Option<lapin::Acker>,
    unacked_n: usize,
}

impl StreamReader {
    /// Starts reading `queue` (a stream) from its first message on a channel of `conn`.
    pub(crate) async fn open(conn: &lapin::Connection, queue: &str) -> lapin::Result<StreamReader> {
        let ch = fleet::amqp::open_channel(conn).await?;
        ch.basic_qos(2 * ACK_EVERY as u16, BasicQosOptions::default()).await?;
        let mut from_first = FieldTable::default();
        from_first.insert("x-stream-offset".into(), AMQPValue::LongString("first".into()));
        let tag = format!("serve-{}", uuid::Uuid::new_v4().simple());
        let consumer =
            ch.basic_consume(queue.into(), tag.as_str().into(), BasicConsumeOptions::default(), from_first).await?;
        Ok(StreamReader { ch, consumer, unacked: None, unacked_n: 0 })
    }

    /// The next message, or `None` when none came for `idle` (the reader is at the
    /// stream's end, as far as it can tell).
    pub(crate) async fn next(&mut self, idle: Duration) -> Result<Option<Delivery>, ApiError> {
        if self.unacked_n >= ACK_EVERY {
            self.ack().await?;
        }
        let delivery = match tokio::time::timeout(idle, self.consumer.next()).await {
            Err(_) => return Ok(None),
            Ok(None) => return Err(ApiError::unavailable("the broker ended a stream consumer")),
            Ok(Some(d)) => d?,
        };
        self.unacked = Some(delivery.acker.clone());
        self.unacked_n += 1;
        Ok(Some(delivery))
    }

    async fn ack(&mut self) -> lapin::Result<()> {
        self.unacked_n = 0;
        match self.unacked.take() {
            Some(acker) => acker.ack(BasicAckOptions { multiple: true }).await.map(drop),
            None => Ok(()),
        }
    }

    /// Stops reading (a stream keeps delivering until its consumer's channel closes).
    pub(crate) async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.ch.close(200, "done".into())).await;
    }
}
