//! The webhook sender: every worker consumes `<ns>.webhooks` (on a connection of its own)
//! and POSTs each completion-webhook delivery the tracker published there (see
//! [`fleet::webhooks`] for the event, its signature and why a delivery is untrusted).
//!
//! At least once, and settled only after what depends on it is confirmed:
//! - a 2xx answer: the `webhook_attempt` ledger event (`delivered`, for `status`) is
//!   published, then the delivery acked;
//! - any other answer, a timeout, a refused connection, a redirect (never followed): the
//!   delivery, its attempt counted, is published to the delay tier of its backoff
//!   (`<ns>.webhooks.delayed.<n>s`, which dead-letters it back to `<ns>.webhooks` when its
//!   time is up), confirmed, then acked; the same `webhook-id` goes out on every attempt;
//! - a delivery whose next attempt would fall past `webhooks.max_age_s` after the job ended,
//!   or one refused as malformed, or one whose host is not a public address: parked in
//!   `<ns>.webhooks.dead` with its reason (confirmed), then acked.
//!
//! A webhook URL is the user's: unless `webhooks.allow_private` is set, a worker sends
//! nothing to the fleet's own networks ([`fleet::webhooks::is_public`]). An address in the
//! URL is checked before the call; a name is checked where it is resolved ([`PublicOnly`],
//! the client's resolver), so a name that resolves to an internal address at call time
//! (DNS rebinding) is refused too.
//!
//! A worker killed mid-POST never acked its delivery: the broker gives it to another
//! worker. A receiver may so see an event twice, with the same `webhook-id`.

use std::sync::Arc;
use std::time::Duration;

use fleet::amqp;
use fleet::metrics::WorkerMetrics;
use fleet::topology::{Topology, DEAD_REASON_HEADER};
use fleet::webhooks::{self, DeliveryState, Secret, WebhookDelivery};
use fleet::wire::LedgerEvent;
use fleet::Config;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Deliveries one worker sends at once (its prefetch on `<ns>.webhooks`): a slow receiver
/// holds one slot for at most `webhooks.timeout_s`.
const CONCURRENT_DELIVERIES: u16 = 16;

/// What every delivery task shares.
struct Sender {
    cfg: Config,
    topology: Topology,
    metrics: WorkerMetrics,
    http: reqwest::Client,
    /// `None` when `webhooks.secret_env` is empty: deliveries go out unsigned.
    secret: Option<Secret>,
}

/// How one attempt went.
enum Outcome {
    Delivered,
    Failed(String),
    /// Not sent, and never will be: the destination is not a public address.
    Refused(String),
}

/// The webhook client's resolver while `webhooks.allow_private` is off: the system's
/// answer with every non-public address taken out, and an error when none is left.
struct PublicOnly;

/// A host that resolves to no public address.
#[derive(Debug, thiserror::Error)]
#[error("{0} resolves to no public address (webhooks.allow_private is off)")]
struct NotPublic(String);

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let public: Vec<std::net::SocketAddr> = found.filter(|a| webhooks::is_public(a.ip())).collect();
            if public.is_empty() {
                return Err(Box::new(NotPublic(host)) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(public.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Why `url` may not be called: an address in it that is not public, while
/// `webhooks.allow_private` is off (names are checked when resolved, by [`PublicOnly`]).
fn refused_address(url: &str, allow_private: bool) -> Option<String> {
    let parsed = reqwest::Url::parse(url).ok()?;
    // An IPv6 address comes bracketed; a name does not parse as an address.
    let ip: std::net::IpAddr = parsed.host_str()?.trim_start_matches('[').trim_end_matches(']').parse().ok()?;
    (!allow_private && !webhooks::is_public(ip))
        .then(|| format!("{ip} is not a public address (webhooks.allow_private is off)"))
}

/// Starts the sender: consumes `<ns>.webhooks` until `shutdown` fires, reconnecting when the
/// connection fails. Fails at once if the secret's variable holds an invalid `whsec_` value.
pub fn spawn_sender(
    cfg: &Config,
    worker_id: &str,
    metrics: WorkerMetrics,
    shutdown: CancellationToken,
) -> anyhow::Result<JoinHandle<()>> {
    let secret = match cfg.webhooks.secret_env.as_str() {
        "" => None,
        var => {
            let value = std::env::var(var).unwrap_or_default();
            Some(Secret::parse(&value).map_err(|e| anyhow::anyhow!("webhooks.secret_env ({var}): {e}"))?)
        }
    };
    let timeout = Duration::from_secs(cfg.webhooks.timeout_s.max(1));
    let http = reqwest::Client::builder()
        // A receiver's redirect could point a signed event anywhere: never followed.
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .user_agent(concat!("batch-fleet-webhooks/", env!("CARGO_PKG_VERSION")));
    let http = if cfg.webhooks.allow_private { http } else { http.dns_resolver(PublicOnly) }.build()?;
    let sender = Arc::new(Sender { cfg: cfg.clone(), topology: Topology::from_config(cfg), metrics, http, secret });
    let name = format!("worker {worker_id} webhooks");
    Ok(tokio::spawn(async move {
        let tasks = TaskTracker::new();
        while !shutdown.is_cancelled() {
            let Some(conn) = amqp::connect_with_retry(&sender.cfg.amqp.addresses(), &name, &shutdown).await else {
                break;
            };
            if let Err(e) = sender.clone().consume(&conn, &tasks, &shutdown).await {
                tracing::warn!(error = %e, "webhook sender lost the broker; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            // Deliveries under way finish (each within its timeout) before the connection
            // that acks them closes; the rest are redelivered.
            tasks.close();
            let _ = tokio::time::timeout(timeout + Duration::from_secs(5), tasks.wait()).await;
            tasks.reopen();
            amqp::close(&conn, "webhook sender stopping").await;
        }
    }))
}

impl Sender {
    /// Consumes `<ns>.webhooks` on one connection until it fails or `shutdown` fires.
    async fn consume(
        self: Arc<Self>,
        conn: &Connection,
        tasks: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let ch = amqp::confirm_channel(conn).await?;
        self.topology.declare_webhook_queues(&ch, &webhooks::ALL_DELAY_TIERS_S).await?;
        ch.basic_qos(CONCURRENT_DELIVERIES, BasicQosOptions::default()).await?;
        let mut consumer = ch
            .basic_consume(
                self.topology.webhooks_queue().into(),
                "webhook-sender".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                next = consumer.next() => {
                    let Some(delivery) = next else { anyhow::bail!("webhook consumer ended") };
                    let delivery = delivery?;
                    let (this, ch) = (self.clone(), ch.clone());
                    tasks.spawn(async move {
                        if let Err(e) = this.handle(&ch, &delivery).await {
                            // Not acked: the broker redelivers it once this channel closes.
                            tracing::warn!(error = %e, "cannot settle a webhook delivery; it will be redelivered");
                            let _ = ch.close(200, "webhook delivery unsettled".into()).await;
                        }
                    });
                }
            }
        }
    }

    /// Sends one delivery and settles it (see the module's contract).
    async fn handle(&self, ch: &Channel, delivery: &lapin::message::Delivery) -> anyhow::Result<()> {
        let mut d = match WebhookDelivery::decode(&delivery.data) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "refusing a webhook delivery: parked in the webhooks dead queue");
                self.park(ch, &delivery.data, &format!("malformed: {e}")).await?;
                self.metrics.webhook_deliveries.with_label_values(&["failed"]).inc();
                delivery.acker.ack(BasicAckOptions::default()).await?;
                return Ok(());
            }
        };
        let host = webhooks::url_host(&d.url);
        let job_id = d.event.data.id.clone();
        d.attempts = d.attempts.saturating_add(1);
        match self.attempt(&d).await {
            Outcome::Delivered => {
                tracing::info!(job_id = %job_id, host = %host, attempts = d.attempts, "webhook delivered");
                self.tell_tracker(ch, &d, DeliveryState::Delivered, None).await;
                self.metrics.webhook_deliveries.with_label_values(&["delivered"]).inc();
            }
            Outcome::Refused(reason) => {
                tracing::warn!(job_id = %job_id, host = %host, reason = %reason,
                    "webhook refused: parked in the webhooks dead queue");
                d.last_error = Some(reason.clone());
                self.park(ch, &serde_json::to_vec(&d)?, &format!("refused: {reason}")).await?;
                self.tell_tracker(ch, &d, DeliveryState::Failed, Some(reason)).await;
                self.metrics.webhook_deliveries.with_label_values(&["failed"]).inc();
            }
            Outcome::Failed(error) => {
                let w = &self.cfg.webhooks;
                let wait_s = webhooks::retry_tier_s(d.attempts, w.initial_backoff_s, w.max_backoff_s);
                let deadline_ms = d.first_at_ms.saturating_add(w.max_age_s.saturating_mul(1000));
                d.last_error = Some(error.clone());
                if fleet::now_ms().saturating_add(wait_s * 1000) > deadline_ms {
                    tracing::warn!(job_id = %job_id, host = %host, attempts = d.attempts, error = %error,
                        "webhook not delivered within webhooks.max_age_s: parked in the webhooks dead queue");
                    let reason = format!("not delivered after {} attempts: {error}", d.attempts);
                    self.park(ch, &serde_json::to_vec(&d)?, &reason).await?;
                    self.tell_tracker(ch, &d, DeliveryState::Failed, Some(error)).await;
                    self.metrics.webhook_deliveries.with_label_values(&["failed"]).inc();
                } else {
                    // A failing receiver is the receiver's business, retried quietly (INFO).
                    tracing::info!(job_id = %job_id, host = %host, attempts = d.attempts, error = %error,
                        retry_in_s = wait_s, "webhook attempt failed; retrying");
                    let queue = self.topology.webhooks_delay_queue(wait_s);
                    amqp::publish_confirmed(ch, "", &queue, &serde_json::to_vec(&d)?, amqp::persistent_json()).await?;
                    self.tell_tracker(ch, &d, DeliveryState::Retrying, Some(error)).await;
                    self.metrics.webhook_deliveries.with_label_values(&["retried"]).inc();
                }
            }
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
        Ok(())
    }

    /// One POST of the event, signed. The URL was checked when the delivery was read.
    async fn attempt(&self, d: &WebhookDelivery) -> Outcome {
        if let Some(reason) = refused_address(&d.url, self.cfg.webhooks.allow_private) {
            return Outcome::Refused(reason);
        }
        let body = match serde_json::to_vec(&d.event) {
            Ok(b) => b,
            Err(e) => return Outcome::Failed(format!("cannot encode the event: {e}")),
        };
        let timestamp = fleet::now_ms() / 1000;
        let mut req = self
            .http
            .post(&d.url)
            .header("content-type", "application/json")
            .header("webhook-id", &d.event.id)
            .header("webhook-timestamp", timestamp.to_string());
        if let Some(secret) = &self.secret {
            req = req.header("webhook-signature", webhooks::sign(secret, &d.event.id, timestamp, &body));
        }
        // The answer's body is never read: only its status counts.
        match req.body(body).send().await {
            Ok(resp) if resp.status().is_success() => Outcome::Delivered,
            Ok(resp) if resp.status().is_redirection() => {
                Outcome::Failed(format!("HTTP {} (redirects are not followed)", resp.status().as_u16()))
            }
            Ok(resp) => Outcome::Failed(format!("HTTP {}", resp.status().as_u16())),
            Err(e) => failure(e),
        }
    }

    /// Parks a delivery in `<ns>.webhooks.dead` with its reason (confirmed).
    async fn park(&self, ch: &Channel, payload: &[u8], reason: &str) -> anyhow::Result<()> {
        let mut headers = FieldTable::default();
        headers.insert(DEAD_REASON_HEADER.into(), AMQPValue::LongString(reason.into()));
        let props = amqp::persistent_json().with_headers(headers);
        amqp::publish_confirmed(ch, "", &self.topology.webhooks_dead_queue(), payload, props).await?;
        Ok(())
    }

    /// Tells the tracker how the delivery fares (for `status`). Best effort: a lost one
    /// only leaves `status` a step behind, so it never holds the delivery back.
    async fn tell_tracker(&self, ch: &Channel, d: &WebhookDelivery, state: DeliveryState, error: Option<String>) {
        let event = LedgerEvent::WebhookAttempt { job_id: d.event.data.id.clone(), state, attempts: d.attempts, error };
        let Ok(payload) = serde_json::to_vec(&event) else { return };
        let ledger = self.topology.ledger_queue();
        if let Err(e) = amqp::publish_confirmed(ch, "", &ledger, &payload, amqp::persistent_json()).await {
            tracing::debug!(error = %e, "cannot tell the tracker about a webhook attempt");
        }
    }
}

/// What a POST that got no answer means: a destination [`PublicOnly`] refused is never
/// tried again; anything else is, described without the URL (its path or query may hold a
/// token).
fn failure(e: reqwest::Error) -> Outcome {
    let mut source = std::error::Error::source(&e);
    while let Some(err) = source {
        if let Some(refused) = err.downcast_ref::<NotPublic>() {
            return Outcome::Refused(refused.to_string());
        }
        source = err.source();
    }
    if e.is_timeout() {
        Outcome::Failed("timed out".into())
    } else if e.is_connect() {
        Outcome::Failed("cannot connect".into())
    } else {
        Outcome::Failed(e.without_url().to_string())
    }
}
