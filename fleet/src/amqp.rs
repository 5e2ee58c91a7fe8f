//! Connecting to RabbitMQ and publishing with publisher confirms.
//!
//! Every publish the fleet makes is persistent and confirmed: a message counts as sent only
//! when the broker has taken responsibility for it. Unroutable messages (`mandatory`) come
//! back as errors instead of vanishing.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use lapin::{Confirmation, PublisherConfirm};
use tokio_util::sync::CancellationToken;

/// Why a publish did not reach a queue.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker refused it (nack): it may be retried.
    #[error("broker refused the message (nack)")]
    Nacked,
    /// No queue is bound for it: retrying will not help.
    #[error("unroutable: no queue bound for exchange {exchange:?} key {routing_key:?}")]
    Unroutable { exchange: String, routing_key: String },
    /// The channel or connection failed: reconnect and retry.
    #[error("AMQP error: {0}")]
    Amqp(#[from] lapin::Error),
}

/// The URL with its password replaced, for logs and errors. Works on the raw text, before
/// any parsing: a URL that does not parse (`amqp:user:pw@host`) is exactly the one whose
/// parse error would otherwise show it whole. Everything before the last `@` after the
/// scheme is treated as credentials, so an unusual URL is over-redacted, never leaked.
pub fn redact_url(url: &str) -> String {
    let Some(at) = url.rfind('@') else { return url.to_string() };
    match url.find("://") {
        Some(i) if i + 3 <= at => {
            let user = url[i + 3..at].split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..i + 3], &url[at..])
        }
        // Not `scheme://`: which part is the user is anyone's guess, so none is shown.
        _ => {
            let scheme = ["amqps:", "amqp:", "https:", "http:"]
                .into_iter()
                .find(|s| url.get(..s.len()).is_some_and(|p| p.eq_ignore_ascii_case(s)))
                .map_or("", |s| &url[..s.len()]);
            format!("{scheme}***{}", &url[at..])
        }
    }
}

/// Connects once, naming the connection so operators can tell processes apart.
pub async fn connect(url: &str, name: &str) -> lapin::Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    // Parsed here rather than by lapin, whose parse error quotes the whole URL, password
    // included.
    let uri: lapin::uri::AMQPUri = url.parse().map_err(|_| {
        let msg = format!("not a valid AMQP URL: {}", redact_url(url));
        lapin::Error::from(std::io::Error::new(std::io::ErrorKind::InvalidInput, msg))
    })?;
    Connection::connect_uri(uri, props).await
}

/// Connects, retrying with capped exponential backoff until it succeeds or `shutdown`
/// fires (then `None`). Used at start-up and after the broker went away.
pub async fn connect_with_retry(url: &str, name: &str, shutdown: &CancellationToken) -> Option<Connection> {
    let mut delay = Duration::from_millis(200);
    loop {
        match connect(url, name).await {
            Ok(conn) => return Some(conn),
            Err(e) => {
                tracing::warn!(broker = %redact_url(url), error = %e, retry_in_ms = delay.as_millis() as u64, "cannot connect to RabbitMQ");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Opens a channel in confirm mode.
pub async fn confirm_channel(conn: &Connection) -> lapin::Result<Channel> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(ch)
}

/// Persistent properties with a content type, the base of every message the fleet sends.
pub fn persistent_json() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2).with_content_type("application/json".into())
}

/// Starts a mandatory publish; the returned future resolves when the broker confirms.
pub async fn publish(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    payload: &[u8],
    props: BasicProperties,
) -> Result<PendingConfirm, PublishError> {
    let confirm = ch
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions { mandatory: true, ..Default::default() },
            payload,
            props,
        )
        .await?;
    Ok(PendingConfirm { confirm, exchange: exchange.to_string(), routing_key: routing_key.to_string() })
}

/// A publish waiting for the broker's confirm.
pub struct PendingConfirm {
    confirm: PublisherConfirm,
    exchange: String,
    routing_key: String,
}

impl PendingConfirm {
    /// Waits for the confirm; an ack of a returned (unroutable) message is an error.
    pub async fn wait(self) -> Result<(), PublishError> {
        match self.confirm.await? {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => {
                Err(PublishError::Unroutable { exchange: self.exchange, routing_key: self.routing_key })
            }
            Confirmation::Nack(None) => Err(PublishError::Nacked),
        }
    }
}

/// Publishes and waits for the confirm.
pub async fn publish_confirmed(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    payload: &[u8],
    props: BasicProperties,
) -> Result<(), PublishError> {
    publish(ch, exchange, routing_key, payload, props).await?.wait().await
}

/// Whether the broker refused the login (user, password or vhost): retrying cannot help,
/// so a process fails with this instead of retrying forever.
pub fn is_access_refused(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp)
        if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_logs() {
        assert_eq!(redact_url("amqp://u:secret@h:5672/%2f"), "amqp://u:***@h:5672/%2f");
        assert_eq!(redact_url("amqp://h:5672"), "amqp://h:5672");
    }

    #[test]
    fn passwords_are_redacted_even_from_urls_that_do_not_parse() {
        for (url, want) in [
            ("amqp:user:pw@host", "amqp:***@host"),
            ("amqp:pw@host", "amqp:***@host"),
            ("amqps://u:p@ss@host/v", "amqps://u:***@host/v"),
            ("user:pw@host", "***@host"),
            ("amqp://user@host", "amqp://user:***@host"),
        ] {
            assert_eq!(redact_url(url), want, "{url}");
        }
    }

    #[tokio::test]
    async fn a_url_that_does_not_parse_is_not_quoted_in_the_error() {
        let Err(err) = connect("amqp:user:hunter2@host", "t").await else {
            panic!("connected to a URL that does not parse")
        };
        let err = err.to_string();
        assert!(err.contains("not a valid AMQP URL") && !err.contains("hunter2"), "{err}");
    }
}
