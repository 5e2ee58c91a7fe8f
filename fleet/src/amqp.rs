//! Connecting to RabbitMQ and publishing with publisher confirms.
//!
//! Every publish the fleet makes is persistent and confirmed: a message counts as sent only
//! when the broker has taken responsibility for it. Unroutable messages (`mandatory`) come
//! back as errors instead of vanishing.
//!
//! A client may know several brokers (the nodes of a cluster, `amqp.urls`): it connects to
//! one that answers and, when that one goes away, to another, exactly as it reconnects
//! after a broker restart.
//!
//! A node can also go *silent*: cut off by a partition, it keeps the TCP connection open
//! and sends nothing, so no error ever arrives. Every connection therefore asks for an AMQP
//! heartbeat ([`set_heartbeat`], `amqp.heartbeat_s`, 10 s by default): lapin sends one every
//! half period and closes the connection when nothing at all has come from the broker for
//! two periods, checking every half period; the client then reconnects as after any loss.
//! See [`silent_node_bound`].

use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::tcp::{AMQPUriTcpExt, TLSConfig};
use lapin::uri::AMQPUri;
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
    Unroutable {
        /// The exchange published to (`""`: the default exchange, which routes by queue name).
        exchange: String,
        /// The routing key no binding matched (for the default exchange, a queue name).
        routing_key: String,
    },
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

/// Longest wait for one address's TCP connect: an address that neither accepts nor
/// refuses (a host that is down) costs this, then the next address is tried. A closed port
/// is refused at once and costs nothing.
pub const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest wait for one address's whole connect (TCP, TLS, AMQP handshake). Longer than
/// the TCP part: a busy broker may be slow to open, and that is not a dead broker.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The heartbeat a connection asks for when nothing else is configured, seconds. RabbitMQ
/// proposes 60 s, which would leave a client on a silent node for two minutes or more;
/// below 5 s a busy broker or client risks false alarms (RabbitMQ's own advice).
pub const DEFAULT_HEARTBEAT_S: u16 = 10;

/// Longest heartbeat `amqp.heartbeat_s` accepts, seconds.
pub const MAX_HEARTBEAT_S: u16 = 600;

/// The heartbeat every connection of this process asks for (see [`set_heartbeat`]).
static HEARTBEAT_S: AtomicU16 = AtomicU16::new(DEFAULT_HEARTBEAT_S);

/// Sets the heartbeat, seconds, that every later [`connect`] of this process asks for when
/// its URL names none (`?heartbeat=`). Loading the configuration sets it from
/// `amqp.heartbeat_s`; one process talks to one fleet, so one value serves all its
/// connections. Values out of [`check_heartbeat`]'s range are ignored.
pub fn set_heartbeat(seconds: u16) {
    if check_heartbeat(seconds).is_ok() {
        HEARTBEAT_S.store(seconds, Ordering::Relaxed);
    }
}

/// The heartbeat connections of this process ask for, seconds.
pub fn heartbeat() -> u16 {
    HEARTBEAT_S.load(Ordering::Relaxed)
}

/// Refuses a heartbeat of 0 (lapin would then take the broker's 60 s) or above
/// [`MAX_HEARTBEAT_S`].
pub fn check_heartbeat(seconds: u16) -> anyhow::Result<()> {
    if !(1..=MAX_HEARTBEAT_S).contains(&seconds) {
        anyhow::bail!("amqp.heartbeat_s must be between 1 and {MAX_HEARTBEAT_S} seconds, got {seconds}");
    }
    Ok(())
}

/// How long a client connected to a node that goes silent (no byte, no close) may take to
/// notice, with a heartbeat of `heartbeat_s`: lapin closes a connection on which nothing
/// has arrived for two heartbeats, and looks every half heartbeat (25 s at the default
/// 10 s). Reconnecting then costs at most [`CONNECT_TIMEOUT`] for each silent address
/// tried before a live one (a silent node may still accept TCP connects, and then never
/// answers the AMQP handshake).
pub fn silent_node_bound(heartbeat_s: u16) -> Duration {
    Duration::from_millis(u64::from(heartbeat_s) * 2500)
}

/// Connects once, naming the connection so operators can tell processes apart.
pub async fn connect(url: &str, name: &str) -> lapin::Result<Connection> {
    // Parsed here rather than by lapin, whose parse error quotes the whole URL, password
    // included.
    let mut uri: AMQPUri = url.parse().map_err(|_| {
        let msg = format!("not a valid AMQP URL: {}", redact_url(url));
        lapin::Error::from(std::io::Error::new(std::io::ErrorKind::InvalidInput, msg))
    })?;
    // The lower of this and the broker's proposal is used (lapin negotiates so).
    uri.query.heartbeat.get_or_insert(heartbeat());
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let runtime = lapin::runtime::default_runtime()?;
    // lapin's own TCP connect has no timeout on the async path: a host that drops SYNs
    // would hold a client for minutes before the next address is tried.
    let attempt = Connection::connector(
        uri,
        runtime,
        async move |uri, runtime| {
            let tcp = AMQPUriTcpExt::connect_with_config_async(&uri, TLSConfig::default(), &runtime);
            match tokio::time::timeout(TCP_CONNECT_TIMEOUT, tcp).await {
                Ok(res) => res.map_err(lapin::Error::from),
                Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "TCP connect timed out").into()),
            }
        },
        props,
    );
    match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(res) => res,
        Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "AMQP handshake timed out").into()),
    }
}

/// Where the next connect of this process starts in the address list. Each connect
/// starts one address further on, so a client whose node went away tries another node
/// first, and clients of one fleet spread over the nodes (the start is offset by the
/// process id) instead of all landing on the first address.
static NEXT_START: AtomicUsize = AtomicUsize::new(0);

fn next_start(len: usize) -> usize {
    let n = NEXT_START.fetch_add(1, Ordering::Relaxed);
    (std::process::id() as usize).wrapping_add(n) % len.max(1)
}

/// Connects to the first address of `urls` that answers, trying each once, starting at a
/// rotating offset: each connect of this process starts one address further on, so
/// clients spread over the nodes. The error is the last address's.
pub async fn connect_any(urls: &[String], name: &str) -> lapin::Result<Connection> {
    let Some(last) = urls.len().checked_sub(1) else {
        return Err(std::io::Error::other("no broker address configured (amqp.url / amqp.urls)").into());
    };
    let start = next_start(urls.len());
    let mut error = None;
    for i in 0..urls.len() {
        let url = &urls[(start + i) % urls.len()];
        match connect(url, name).await {
            Ok(conn) => {
                if error.is_some() {
                    tracing::info!(broker = %redact_url(url), "connected to RabbitMQ after skipping unreachable addresses");
                }
                return Ok(conn);
            }
            Err(e) => {
                // Not a warning yet: another address may answer. Only a whole round
                // failing is (in `connect_with_retry`).
                if i < last {
                    tracing::info!(broker = %redact_url(url), error = %e, "RabbitMQ address unreachable; trying the next");
                }
                error = Some(e);
            }
        }
    }
    Err(error.expect("at least one address was tried"))
}

/// Connects to any of `urls`, retrying with capped exponential backoff until it succeeds
/// or `shutdown` fires (then `None`). Used at start-up and after the broker went away;
/// every round tries each address once, so a client whose node is gone moves to another.
pub async fn connect_with_retry(urls: &[String], name: &str, shutdown: &CancellationToken) -> Option<Connection> {
    let mut delay = Duration::from_millis(200);
    loop {
        match connect_any(urls, name).await {
            Ok(conn) => return Some(conn),
            Err(e) => {
                let brokers: Vec<String> = urls.iter().map(|u| redact_url(u)).collect();
                tracing::warn!(brokers = ?brokers, error = %e, retry_in_ms = delay.as_millis() as u64, "cannot connect to RabbitMQ");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Longest wait for the broker's answer to a connection close.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Closes a connection politely, giving up after [`CLOSE_TIMEOUT`]: a close racing a
/// channel that is closing itself (a dropped last handle) can leave lapin's close-ok
/// promise unresolved once its socket is gone, and a process must not hang on its way out.
pub async fn close(conn: &Connection, reason: &str) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.close(200, reason.into())).await;
}

/// Opens a channel in confirm mode.
pub async fn confirm_channel(conn: &Connection) -> lapin::Result<Channel> {
    let ch = open_channel(conn).await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(ch)
}

/// Tries of [`open_channel`] that may meet a stale error before one counts.
const STALE_OPEN_TRIES: usize = 4;

/// Opens a channel on `conn`; every channel of the fleet is opened here.
///
/// lapin (4.12) keeps the error of a channel the broker closed (a 404 on a passive declare,
/// a consume of a deleted queue) and hands it to the channel that reuses its id once the
/// ids wrap around at `channel_max` (2,047 on RabbitMQ): that open fails with the old
/// channel-level error although the connection is fine, and a caller that reconnects on
/// it turns one stale error into a reconnection (`fleet/examples/channel_wrap.rs`
/// reproduces it). Such an open is tried again (each try takes the next id); a
/// connection-level error returns at once.
pub async fn open_channel(conn: &Connection) -> lapin::Result<Channel> {
    let mut tries = 1;
    loop {
        match conn.create_channel().await {
            Err(e) if tries < STALE_OPEN_TRIES && conn.status().connected() && is_channel_level(&e) => {
                tracing::debug!(error = %e, "a stale channel error on open; opening another");
                tries += 1;
            }
            opened => return opened,
        }
    }
}

/// Uses of one [`Probe`] connection before it is replaced by a fresh one.
const PROBE_USES: usize = 256;

/// A connection of its own for the broker operations that may close their channel: a
/// passive declare of a queue that may be missing, a consume or delete that may be
/// refused. The long-lived connections of a process then never hold a channel the broker
/// closed, whose id lapin would later hand out with the old error (see [`open_channel`]);
/// the probe connection is replaced after [`PROBE_USES`] uses and whenever it fails.
pub struct Probe {
    urls: Vec<String>,
    name: String,
    current: tokio::sync::Mutex<Option<(std::sync::Arc<Connection>, usize)>>,
}

impl Probe {
    /// A probe of the broker at `urls` (tried in turn), its connections named `name`;
    /// connects at first use.
    pub fn new(urls: Vec<String>, name: &str) -> Probe {
        Probe { urls, name: name.to_string(), current: tokio::sync::Mutex::new(None) }
    }

    /// The connection to run one probing operation on.
    pub async fn connection(&self) -> lapin::Result<std::sync::Arc<Connection>> {
        let mut current = self.current.lock().await;
        if let Some((conn, uses)) = current.as_mut() {
            if *uses < PROBE_USES && conn.status().connected() {
                *uses += 1;
                return Ok(conn.clone());
            }
        }
        if let Some((old, _)) = current.take() {
            // Closed off the caller's path: operations still running on it finish first.
            tokio::spawn(async move { close(&old, "probe connection replaced").await });
        }
        let conn = std::sync::Arc::new(connect_any(&self.urls, &self.name).await?);
        *current = Some((conn.clone(), 1));
        Ok(conn)
    }

    /// Messages ready and consumers of `queue`, `None` when it does not exist (see
    /// [`crate::topology::queue_stats`]), asked on the probe connection.
    pub async fn queue_stats(&self, queue: &str) -> lapin::Result<Option<(u32, u32)>> {
        crate::topology::queue_stats(&*self.connection().await?, queue).await
    }
}

/// Whether `e` is a channel-level (soft) error from the broker: it closed one channel, not
/// the connection.
fn is_channel_level(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if matches!(amqp.kind(), lapin::protocol::AMQPErrorKind::Soft(_)))
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

/// The broker's refusals the fleet acts on. Every other broker error means "reconnect and
/// try again"; these say something retrying the same way cannot fix, or a state to wait in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The login was refused (user, password or vhost): fail instead of retrying forever.
    AccessRefused,
    /// The queue or exchange does not exist.
    NotFound,
    /// An exclusive queue is held by another connection (the tracker's election lock).
    ResourceLocked,
    /// A queue or exchange exists with other arguments (e.g. another delivery limit).
    PreconditionFailed,
}

/// Classifies a broker error by the AMQP reply code the broker sent, the one place that
/// does (no matching of message text).
pub fn refusal(e: &lapin::Error) -> Option<Refusal> {
    use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
    let lapin::ErrorKind::ProtocolError(amqp) = e.kind() else { return None };
    match amqp.kind() {
        AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => Some(Refusal::AccessRefused),
        AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => Some(Refusal::NotFound),
        AMQPErrorKind::Soft(AMQPSoftError::RESOURCELOCKED) => Some(Refusal::ResourceLocked),
        AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => Some(Refusal::PreconditionFailed),
        AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => Some(Refusal::AccessRefused),
        _ => None,
    }
}

/// [`refusal`] of any error in a chain (`anyhow`'s `chain()` yields these).
pub fn refusal_of(e: &(dyn std::error::Error + 'static)) -> Option<Refusal> {
    e.downcast_ref::<lapin::Error>().and_then(refusal)
}

/// Whether the broker refused the login (user, password or vhost): retrying cannot help,
/// so a process fails with this instead of retrying forever.
pub fn is_access_refused(e: &lapin::Error) -> bool {
    refusal(e) == Some(Refusal::AccessRefused)
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

    #[test]
    fn heartbeats_are_bounded_and_say_how_soon_a_silent_node_is_noticed() {
        assert!(check_heartbeat(0).is_err(), "0 would take the broker's 60 s");
        assert!(check_heartbeat(MAX_HEARTBEAT_S + 1).is_err());
        assert!(check_heartbeat(DEFAULT_HEARTBEAT_S).is_ok());
        assert_eq!(silent_node_bound(DEFAULT_HEARTBEAT_S), Duration::from_secs(25));
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
