//! Reproduces the lapin behaviour [`fleet::amqp::open_channel`] works around: 5,000
//! channels on one connection, every other one closed by the broker with a 404 (a passive
//! declare of a missing queue). Once the channel ids wrap around at `channel_max` (2,047
//! on RabbitMQ), `create_channel` alone fails with the old 404 for each reused id; through
//! `open_channel` every open succeeds.
//!
//! `cargo run -p fleet --example channel_wrap [raw]` (RabbitMQ on 127.0.0.1:5672, or
//! `AMQP_URL`); `raw` calls `create_channel` directly. Prints the opens that failed.

use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let raw = std::env::args().nth(1).as_deref() == Some("raw");
    let url = std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let conn = fleet::amqp::connect(&url, "channel_wrap example").await?;
    let queue = format!("channel-wrap-{}", std::process::id());
    let setup = fleet::amqp::open_channel(&conn).await?;
    setup.queue_declare(queue.as_str().into(), QueueDeclareOptions::default(), FieldTable::default()).await?;
    let mut failed_opens = 0;
    for i in 0..5000u32 {
        let opened = if raw { conn.create_channel().await } else { fleet::amqp::open_channel(&conn).await };
        let ch = match opened {
            Ok(ch) => ch,
            Err(e) => {
                failed_opens += 1;
                if failed_opens <= 3 {
                    println!("open {i} failed: {e}");
                }
                continue;
            }
        };
        let name = if i % 2 == 0 { format!("{queue}-missing") } else { queue.clone() };
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        let _ = ch.queue_declare(name.as_str().into(), passive, FieldTable::default()).await;
    }
    setup.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await?;
    println!("{} 5,000 opens: {failed_opens} failed", if raw { "create_channel:" } else { "open_channel:" });
    Ok(())
}
