//! The AMQP topology: every exchange and queue name (derived from the configured
//! `namespace`) and the functions that declare them. Declaring is idempotent, so every
//! process declares what it uses at (re)connect time and the order of start-up never matters.
//!
//! ```text
//! <ns>.items   (direct) --provider--> <ns>.items.<provider>   quorum, delivery limit, DLX
//! <ns>.results (topic)  --job id----> <ns>.results.<job id>   stream, one per job, read
//!                                                            from the start by every `wait`
//!                       --#---------> <ns>.ledger              (a copy of every result)
//! <ns>.dead    (fanout) -----------> <ns>.dead               quorum, parked messages
//!                        -----------> <ns>.ledger             (the tracker ends dead items)
//! (default)    ------------------> <ns>.ledger              quorum, single active consumer
//! (default)    ------------------> <ns>.delayed.<provider>.<n>s  quorum, TTL n s,
//!                                                            dead-letters (at least once)
//!                                                            back to <ns>.items / <provider>
//! (default)    ------------------> <ns>.control             stream: job cancels and job
//!                                                            openings, replayed from the
//!                                                            start by every worker
//! <ns>.jobs    (direct) --job id----> <ns>.items.<provider>.<job>  quorum, one per job (fair
//!              alternate exchange: <ns>.dead                 sharing); deleted when it ends
//! <ns>.delay   (headers, fleet-delay-s)   --> <ns>.delayed.<n>s    quorum, TTL n s, dead-
//!                                                            letters back to <ns>.jobs under
//!                                                            the job id it was published with
//! (default)    ------------------> <ns>.batch.items.<job>    stream: a batch-mode job's items,
//!                                                            read by offset, one per job
//! (default)    ------------------> <ns>.batch.<provider>     quorum, delivery limit, DLX
//!                                                            <ns>.dead: chunks ready for a
//!                                                            worker (provider batch mode)
//! (default)    ------------------> <ns>.batch.<provider>.poll.<n>s  quorum, TTL n s, dead-
//!                                                            letters (at least once) back to
//!                                                            <ns>.batch.<provider>
//! ```
//!
//! Also named here, outside the picture: the tracker's lock, status queries and checkpoints
//! (`<ns>.tracker.*`), the completion webhooks (`<ns>.webhooks`, its delay tiers and dead
//! queue) and `producer serve`'s streams and upload locks (`<ns>.api.*`).

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, ExchangeKind};

/// Results streams keep a job's results for a week at most (the tracker deletes a job's
/// stream earlier, when it forgets the finished job after `tracker.retention_s`).
const RESULTS_MAX_AGE: &str = "7D";
/// [`RESULTS_MAX_AGE`] in seconds: how long a job's results (and its failed items' requests)
/// stay readable, measured from when each was written.
pub const RESULTS_MAX_AGE_S: u64 = 7 * 86_400;
/// Segment size of a results stream: age retention drops whole segments, so a smaller
/// segment lets a large job's stream shrink as it ages.
const RESULTS_SEGMENT_BYTES: i64 = 16 * 1024 * 1024;

/// Header of a message published to the `<ns>.delay` exchange naming its delay tier (in
/// seconds, as a string: the headers exchange compares values with their AMQP type). Not
/// `x-`-prefixed: a headers exchange ignores such headers when matching, and every tier
/// would get a copy.
pub const DELAY_TIER_HEADER: &str = "fleet-delay-s";

/// Header the fleet sets on messages it dead-letters itself, saying why.
pub const DEAD_REASON_HEADER: &str = "x-fleet-reason";

/// Header the fleet sets on messages it dead-letters itself: the reason's kind, as the
/// `batch_dead_letters_total` `reason` label ([`DeadLabel`]).
pub const DEAD_LABEL_HEADER: &str = "x-fleet-dead-label";

/// Why a worker parked a message in the dead-letter queue: the `batch_dead_letters_total`
/// `reason` label and the [`DEAD_LABEL_HEADER`] value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadLabel {
    /// Not a message of its queue (not JSON, not the expected shape, out of bounds).
    Malformed,
    /// Larger than `amqp.max_message_bytes`.
    Oversized,
    /// An item whose `url` is not an endpoint of its provider.
    ForbiddenUrl,
    /// Delivered more often than the delivery limit allows: it keeps killing workers.
    Poison,
    /// A finished item whose job's results stream is gone.
    NoResultsQueue,
}

impl DeadLabel {
    /// Every label, in the order the metric's series are created.
    pub const ALL: [DeadLabel; 5] =
        [Self::Malformed, Self::Oversized, Self::ForbiddenUrl, Self::NoResultsQueue, Self::Poison];

    /// The label as it appears in metrics and headers.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Oversized => "oversized",
            Self::ForbiddenUrl => "forbidden_url",
            Self::Poison => "poison",
            Self::NoResultsQueue => "no_results_queue",
        }
    }

    /// The label a header names, if it is one.
    pub fn parse(s: &str) -> Option<DeadLabel> {
        Self::ALL.into_iter().find(|l| l.as_str() == s)
    }

    /// Whether a message parked for this reason is one the producer never publishes: it
    /// validates every line's `url` and provider, so an item refused as malformed or for
    /// its url came from someone else (or from a producer whose config disagrees with the
    /// workers'). Such an item must not end a job's item on its own say: see
    /// `worker::tracker::dead`.
    pub fn is_suspect(self) -> bool {
        matches!(self, Self::Malformed | Self::ForbiddenUrl)
    }

    /// Whether the message was refused for what it is (counted as a `malformed_message`
    /// error too).
    pub fn is_bad_message(self) -> bool {
        matches!(self, Self::Malformed | Self::Oversized)
    }
}

impl std::fmt::Display for DeadLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a dead-lettered message was refused by a worker for a suspect reason
/// ([`DeadLabel::is_suspect`]).
pub fn dead_suspect(props: &lapin::BasicProperties) -> bool {
    let label = props.headers().as_ref().and_then(|h| text(h.inner().get(DEAD_LABEL_HEADER)));
    label.as_deref().and_then(DeadLabel::parse).is_some_and(DeadLabel::is_suspect)
}

/// A header's value when it is a string.
fn text(v: Option<&AMQPValue>) -> Option<String> {
    match v {
        Some(AMQPValue::LongString(s)) => Some(s.to_string()),
        Some(AMQPValue::ShortString(s)) => Some(s.to_string()),
        _ => None,
    }
}

/// Why a dead-lettered message was parked: the fleet's own [`DEAD_REASON_HEADER`], or the
/// broker's `x-death` record (reason and source queue), or `unknown`.
pub fn dead_reason(props: &lapin::BasicProperties) -> String {
    let Some(headers) = props.headers() else { return "unknown".into() };
    if let Some(reason) = text(headers.inner().get(DEAD_REASON_HEADER)) {
        return reason;
    }
    if let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") {
        if let Some(AMQPValue::FieldTable(first)) = deaths.as_slice().first() {
            let get = |k: &str| text(first.inner().get(k)).unwrap_or_default();
            return format!("{} (by the broker, from {})", get("reason"), get("queue"));
        }
    }
    "unknown".into()
}

/// The default of `amqp.delivery_limit` (a config test keeps the two equal).
pub const DEFAULT_DELIVERY_LIMIT: u32 = 10;

/// Names of everything on the broker for one namespace.
#[derive(Debug, Clone)]
pub struct Topology {
    ns: String,
    delivery_limit: u32,
}

impl Topology {
    /// The names of `namespace`; items and chunk queues are declared with
    /// `delivery_limit` as their `x-delivery-limit` (`amqp.delivery_limit`).
    pub fn new(namespace: &str, delivery_limit: u32) -> Self {
        Topology { ns: namespace.to_string(), delivery_limit }
    }

    /// The names of `namespace` alone, for code that only reads, lists or deletes them
    /// (tests, the bench). Declaring an items queue through it uses the default
    /// `amqp.delivery_limit`, [`DEFAULT_DELIVERY_LIMIT`].
    pub fn names(namespace: &str) -> Self {
        Topology::new(namespace, DEFAULT_DELIVERY_LIMIT)
    }

    /// The names of the configured `namespace`, with its `amqp.delivery_limit`.
    pub fn from_config(cfg: &crate::Config) -> Self {
        Topology::new(&cfg.namespace, cfg.amqp.delivery_limit)
    }

    /// The prefix of every name (`namespace` in the config).
    pub fn namespace(&self) -> &str {
        &self.ns
    }
    /// Deliveries of one message before its queue dead-letters it.
    pub fn delivery_limit(&self) -> u32 {
        self.delivery_limit
    }
    /// Direct exchange of the providers' items queues: routing key = provider name.
    pub fn items_exchange(&self) -> String {
        format!("{}.items", self.ns)
    }
    /// Items queue shared by every job of `provider`, bound to the items exchange under the
    /// provider's name; its delay queues send items back to it.
    pub fn items_queue(&self, provider: &str) -> String {
        format!("{}.items.{provider}", self.ns)
    }
    /// Topic exchange of results: routing key = job id; the ledger is bound with `#` and
    /// gets a copy of every result.
    pub fn results_exchange(&self) -> String {
        format!("{}.results", self.ns)
    }
    /// Results stream of one job: its results, then the tracker's `job_finished`, read from
    /// the start by `producer wait` and `producer retry`.
    pub fn results_queue(&self, job_id: &str) -> String {
        format!("{}.results.{job_id}", self.ns)
    }
    /// Fanout exchange of parked messages: the items queues' dead-letter exchange and
    /// `<ns>.jobs`' alternate exchange; the dead queue and the ledger are bound to it.
    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.ns)
    }
    /// Queue of parked messages (poison, malformed, oversized, unroutable), each with its
    /// reason ([`dead_reason`]), until `producer dead` lists or requeues them.
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.ns)
    }
    /// Queue of job events and a copy of every result and dead letter, folded by the
    /// active tracker (single active consumer).
    pub fn ledger_queue(&self) -> String {
        format!("{}.ledger", self.ns)
    }
    /// Exclusive queue whose owner is the active job tracker (a broker-side lock: it
    /// disappears with the owner's connection, and only one connection can hold it).
    pub fn tracker_lock_queue(&self) -> String {
        format!("{}.tracker.lock", self.ns)
    }
    /// Status queries for the tracker (request/reply over direct reply-to).
    pub fn tracker_rpc_queue(&self) -> String {
        format!("{}.tracker.rpc", self.ns)
    }
    /// Holds the tracker's latest checkpoint (a one-message queue).
    pub fn tracker_state_queue(&self) -> String {
        format!("{}.tracker.state", self.ns)
    }
    /// A second copy of the newest tracker checkpoint (written after
    /// [`Topology::tracker_state_queue`]'s, same shape): a message that is not a checkpoint
    /// published to one of them leaves the other to restore from.
    pub fn tracker_state_copy_queue(&self) -> String {
        format!("{}.tracker.state.copy", self.ns)
    }

    /// Exchange of the per-job items queues: routing key = job id. Its alternate exchange is
    /// `<ns>.dead`, so an item whose job queue is gone is parked, never dropped.
    pub fn jobs_exchange(&self) -> String {
        format!("{}.jobs", self.ns)
    }
    /// Items queue of one job (fair sharing: workers consume the open jobs in turn).
    pub fn job_items_queue(&self, provider: &str, job_id: &str) -> String {
        format!("{}.items.{provider}.{job_id}", self.ns)
    }
    /// Headers exchange in front of the per-job delay tiers (header [`DELAY_TIER_HEADER`]).
    pub fn delay_exchange(&self) -> String {
        format!("{}.delay", self.ns)
    }
    /// Delay tier for items of per-job queues waiting `secs` before their next attempt; it
    /// dead-letters each item back to `<ns>.jobs` under its job id.
    pub fn job_delay_queue(&self, secs: u64) -> String {
        format!("{}.delayed.{secs}s", self.ns)
    }

    /// Delay queue of `provider` for items waiting `secs` before their next attempt.
    pub fn delay_queue(&self, provider: &str, secs: u64) -> String {
        format!("{}.delayed.{provider}.{secs}s", self.ns)
    }

    /// Name of the classic delay queue earlier versions used (`<ns>.delay.<provider>.<n>s`).
    /// Its messages still expire back to the items queue on their own; once empty it is
    /// deleted by [`Topology::retire_classic_delay_queues`].
    pub fn classic_delay_queue(&self, provider: &str, secs: u64) -> String {
        format!("{}.delay.{provider}.{secs}s", self.ns)
    }
    /// Stream of control messages (job cancels, job queues opening and closing) every
    /// worker reads from the start.
    pub fn control_stream(&self) -> String {
        format!("{}.control", self.ns)
    }

    /// Queue of completion-webhook deliveries ([`crate::webhooks::WebhookDelivery`]): the
    /// tracker publishes one when a job with a webhook ends, any worker's sender POSTs it.
    pub fn webhooks_queue(&self) -> String {
        format!("{}.webhooks", self.ns)
    }
    /// Delay tier of webhook deliveries waiting `secs` before their next attempt; it
    /// dead-letters each back to [`Topology::webhooks_queue`].
    pub fn webhooks_delay_queue(&self, secs: u64) -> String {
        format!("{}.webhooks.delayed.{secs}s", self.ns)
    }
    /// Webhook deliveries given up (retries ran out, refused as malformed, or delivered
    /// too often), each with its reason ([`DEAD_REASON_HEADER`]).
    pub fn webhooks_dead_queue(&self) -> String {
        format!("{}.webhooks.dead", self.ns)
    }

    /// The stream holding a batch-mode job's items, in the order the producer laid them out
    /// ([`crate::batch::ChunkLayout`]: grouped by endpoint, in file order within a group), read
    /// by offset (resumed submissions may append an item again: readers skip what they have).
    pub fn batch_items_stream(&self, job_id: &str) -> String {
        format!("{}.batch.items.{job_id}", self.ns)
    }
    /// Chunks of `provider` waiting for a worker (to create, poll or fetch their batch).
    pub fn chunk_queue(&self, provider: &str) -> String {
        format!("{}.batch.{provider}", self.ns)
    }
    /// Chunks of `provider` waiting `secs` until their next poll.
    pub fn poll_queue(&self, provider: &str, secs: u64) -> String {
        format!("{}.batch.{provider}.poll.{secs}s", self.ns)
    }

    /// Stream of `producer serve`'s records (uploaded files, batches, cancels, deletions):
    /// append-only, replayed by every replica, so any replica answers any request.
    pub fn api_meta_stream(&self) -> String {
        format!("{}.api.meta", self.ns)
    }
    /// Stream holding the lines of one file uploaded to `producer serve`; the file exists
    /// for clients only once its record is on [`Topology::api_meta_stream`].
    pub fn api_file_stream(&self, file_id: &str) -> String {
        format!("{}.api.file.{file_id}", self.ns)
    }
    /// The lock of an upload in progress to `producer serve`: an exclusive queue
    /// `<file stream>.lock` held on the uploading replica's connection, so the broker
    /// deletes it when that replica dies (see `producer::serve::lease`).
    pub fn api_file_lock_queue(&self, file_id: &str) -> String {
        format!("{}.lock", self.api_file_stream(file_id))
    }

    /// Declares the webhook queues: `<ns>.webhooks` (quorum, with the delivery limit; a
    /// delivery that keeps killing senders goes to `<ns>.webhooks.dead`), its dead queue,
    /// and one delay tier per `tiers_s` (quorum, TTL, at-least-once dead-lettering back).
    pub async fn declare_webhook_queues(&self, ch: &Channel, tiers_s: &[u64]) -> lapin::Result<()> {
        declare_queue(ch, &self.webhooks_dead_queue(), quorum()).await?;
        let mut args = quorum();
        args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(self.delivery_limit.into()));
        args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
        args.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(self.webhooks_dead_queue().into()));
        args.insert("x-dead-letter-strategy".into(), AMQPValue::LongString("at-least-once".into()));
        args.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
        declare_queue(ch, &self.webhooks_queue(), args).await?;
        for secs in tiers_s {
            let mut args = quorum();
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt((*secs * 1000) as i64));
            args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
            args.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(self.webhooks_queue().into()));
            args.insert("x-dead-letter-strategy".into(), AMQPValue::LongString("at-least-once".into()));
            args.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
            declare_queue(ch, &self.webhooks_delay_queue(*secs), args).await?;
        }
        Ok(())
    }

    /// Declares the exchanges and the shared queues (dead letters, ledger, tracker).
    pub async fn declare_common(&self, ch: &Channel) -> lapin::Result<()> {
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        for (name, kind) in [
            (self.items_exchange(), ExchangeKind::Direct),
            // Topic, so that the ledger receives a copy of every result (binding `#`).
            (self.results_exchange(), ExchangeKind::Topic),
            (self.dead_exchange(), ExchangeKind::Fanout),
        ] {
            ch.exchange_declare(name.into(), kind, durable, FieldTable::default()).await?;
        }
        let mut jobs = FieldTable::default();
        // An item routed to no job queue (its job ended and the queue was deleted: only a
        // duplicate can arrive then) is parked in <ns>.dead, where the tracker ignores it.
        jobs.insert("alternate-exchange".into(), AMQPValue::LongString(self.dead_exchange().into()));
        ch.exchange_declare(self.jobs_exchange().into(), ExchangeKind::Direct, durable, jobs).await?;
        ch.exchange_declare(self.delay_exchange().into(), ExchangeKind::Headers, durable, FieldTable::default())
            .await?;
        declare_queue(ch, &self.dead_queue(), quorum()).await?;
        ch.queue_bind(
            self.dead_queue().into(),
            self.dead_exchange().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let mut ledger = quorum();
        // One tracker folds the ledger at a time; a standby takes over when it goes away.
        ledger.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        declare_queue(ch, &self.ledger_queue(), ledger).await?;
        // Every result published for any job is also routed to the ledger: the tracker and
        // `producer wait` see the same messages from one publish, so a redone item (whose
        // provider answer may differ) is counted by the tracker exactly as it is written
        // to the output: the first result to arrive wins in both.
        ch.queue_bind(
            self.ledger_queue().into(),
            self.results_exchange().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        // Items the broker dead-letters (delivery limit, rejection) reach the tracker too,
        // which ends each one that has no result yet as a failed result of its job: no job
        // waits forever for an item parked in <ns>.dead.
        ch.queue_bind(
            self.ledger_queue().into(),
            self.dead_exchange().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let mut rpc = FieldTable::default();
        // Status queries are worthless after a few seconds; don't let them pile up.
        rpc.insert("x-message-ttl".into(), AMQPValue::LongLongInt(10_000));
        declare_queue(ch, &self.tracker_rpc_queue(), rpc).await?;
        let mut state = quorum();
        // Only the newest checkpoint matters: publishing one drops the previous.
        state.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
        state.insert("x-overflow".into(), AMQPValue::LongString("drop-head".into()));
        declare_queue(ch, &self.tracker_state_queue(), state.clone()).await?;
        declare_queue(ch, &self.tracker_state_copy_queue(), state).await?;
        let mut control = FieldTable::default();
        control.insert("x-queue-type".into(), AMQPValue::LongString("stream".into()));
        // Cancels only matter while a job's items can still be around.
        control.insert("x-max-age".into(), AMQPValue::LongString("14D".into()));
        declare_queue(ch, &self.control_stream(), control).await?;
        Ok(())
    }

    /// Declares the delay queues of `provider`, one per tier. A message expires at the head
    /// of its queue (one TTL per queue, so expiry order is arrival order) and is
    /// dead-lettered back to the items exchange under the provider's routing key.
    ///
    /// Quorum queues with at-least-once dead-lettering: a classic queue dead-letters at most
    /// once, so messages that expired while the broker restarted were dropped when the items
    /// queue had no leader yet. Here the delay queue keeps each message until the items
    /// queue confirms it (RabbitMQ 3.10+; the strategy requires `reject-publish` overflow,
    /// and silently falls back to at-most-once without it).
    pub async fn declare_delay_queues(&self, ch: &Channel, provider: &str, tiers_s: &[u64]) -> lapin::Result<()> {
        for secs in tiers_s {
            let mut args = quorum();
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt((*secs * 1000) as i64));
            args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(self.items_exchange().into()));
            args.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(provider.into()));
            args.insert("x-dead-letter-strategy".into(), AMQPValue::LongString("at-least-once".into()));
            args.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
            declare_queue(ch, &self.delay_queue(provider, *secs), args).await?;
        }
        Ok(())
    }

    /// Declares the per-job delay tiers (shared by every provider and job): an item waits in
    /// tier `n` for `n` s, then is dead-lettered (at least once) to `<ns>.jobs` under the
    /// routing key it was published with, its job id: back to its own job's queue.
    pub async fn declare_job_delay_queues(&self, ch: &Channel, tiers_s: &[u64]) -> lapin::Result<()> {
        for secs in tiers_s {
            let mut args = quorum();
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt((*secs * 1000) as i64));
            args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(self.jobs_exchange().into()));
            args.insert("x-dead-letter-strategy".into(), AMQPValue::LongString("at-least-once".into()));
            args.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
            let queue = self.job_delay_queue(*secs);
            declare_queue(ch, &queue, args).await?;
            let mut bind = FieldTable::default();
            bind.insert("x-match".into(), AMQPValue::LongString("all".into()));
            bind.insert(DELAY_TIER_HEADER.into(), AMQPValue::LongString(secs.to_string().into()));
            ch.queue_bind(queue.into(), self.delay_exchange().into(), "".into(), QueueBindOptions::default(), bind)
                .await?;
        }
        Ok(())
    }

    /// Deletes the classic delay queues of earlier versions once they are empty (their
    /// messages keep expiring back to the items queue meanwhile). Best effort, on a channel
    /// of its own: the broker refuses to delete a queue that still holds messages and closes
    /// the channel. Returns the queues still holding messages.
    pub async fn retire_classic_delay_queues(
        &self,
        conn: &lapin::Connection,
        provider: &str,
        tiers_s: &[u64],
    ) -> lapin::Result<Vec<String>> {
        let mut left = Vec::new();
        for secs in tiers_s {
            let queue = self.classic_delay_queue(provider, *secs);
            if queue_stats(conn, &queue).await?.is_none() {
                continue;
            }
            let ch = crate::amqp::open_channel(conn).await?;
            let opts = lapin::options::QueueDeleteOptions { if_empty: true, ..Default::default() };
            if ch.queue_delete(queue.as_str().into(), opts).await.is_err() {
                left.push(queue);
            }
            let _ = ch.close(200, "done".into()).await;
        }
        Ok(left)
    }

    /// Declares the items queue of `provider` and binds it to the items exchange.
    pub async fn declare_items_queue(&self, ch: &Channel, provider: &str) -> lapin::Result<()> {
        let queue = self.items_queue(provider);
        declare_queue(ch, &queue, self.items_queue_args()).await?;
        ch.queue_bind(
            queue.into(),
            self.items_exchange().into(),
            provider.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
    }

    /// Declares the items queue of one job and binds it to `<ns>.jobs` under the job id.
    /// Same arguments as a provider's items queue: the same delivery limit and dead-lettering.
    pub async fn declare_job_items_queue(&self, ch: &Channel, provider: &str, job_id: &str) -> lapin::Result<()> {
        let queue = self.job_items_queue(provider, job_id);
        declare_queue(ch, &queue, self.items_queue_args()).await?;
        ch.queue_bind(
            queue.into(),
            self.jobs_exchange().into(),
            job_id.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
    }

    fn items_queue_args(&self) -> FieldTable {
        let mut args = quorum();
        args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(self.delivery_limit.into()));
        args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(self.dead_exchange().into()));
        // At-least-once dead-lettering needs reject-publish overflow; without it RabbitMQ
        // silently falls back to at-most-once and a parked message could be lost.
        args.insert("x-dead-letter-strategy".into(), AMQPValue::LongString("at-least-once".into()));
        args.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
        args
    }

    /// Declares the results stream of a job and binds it to the results exchange. A stream
    /// (not a queue) so that reading does not consume: `wait` can run any number of times.
    pub async fn declare_results_queue(&self, ch: &Channel, job_id: &str) -> lapin::Result<()> {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString("stream".into()));
        args.insert("x-max-age".into(), AMQPValue::LongString(RESULTS_MAX_AGE.into()));
        args.insert("x-stream-max-segment-size-bytes".into(), AMQPValue::LongLongInt(RESULTS_SEGMENT_BYTES));
        let queue = self.results_queue(job_id);
        declare_queue(ch, &queue, args).await?;
        ch.queue_bind(
            queue.into(),
            self.results_exchange().into(),
            job_id.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
    }

    /// Declares a job's batch items stream (kept as long as a results stream at most; the
    /// tracker deletes it with the results when it forgets the job).
    pub async fn declare_batch_items_stream(&self, ch: &Channel, job_id: &str) -> lapin::Result<()> {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString("stream".into()));
        args.insert("x-max-age".into(), AMQPValue::LongString(RESULTS_MAX_AGE.into()));
        declare_queue(ch, &self.batch_items_stream(job_id), args).await
    }

    /// Declares the chunk queue of `provider` and its poll queue. The chunk queue has the
    /// items queues' delivery limit and dead-lettering; the poll queue holds each chunk
    /// `poll_s` seconds and hands it back (at least once) to the chunk queue.
    pub async fn declare_chunk_queues(&self, ch: &Channel, provider: &str, poll_s: u64) -> lapin::Result<()> {
        let mut args = quorum();
        args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(self.delivery_limit.into()));
        args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(self.dead_exchange().into()));
        args.insert("x-dead-letter-strategy".into(), AMQPValue::LongString("at-least-once".into()));
        args.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
        declare_queue(ch, &self.chunk_queue(provider), args).await?;
        let mut poll = quorum();
        poll.insert("x-message-ttl".into(), AMQPValue::LongLongInt((poll_s * 1000) as i64));
        // The default exchange routes by queue name: back to the chunk queue.
        poll.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
        poll.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(self.chunk_queue(provider).into()));
        poll.insert("x-dead-letter-strategy".into(), AMQPValue::LongString("at-least-once".into()));
        poll.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
        declare_queue(ch, &self.poll_queue(provider, poll_s), poll).await
    }

    /// Deletes the chunk queues of `provider` (tests tidying up).
    pub async fn delete_chunk_queues(&self, ch: &Channel, provider: &str, poll_s: u64) -> lapin::Result<()> {
        for q in [self.chunk_queue(provider), self.poll_queue(provider, poll_s)] {
            ch.queue_delete(q.into(), Default::default()).await?;
        }
        Ok(())
    }

    /// Whether `job_id` was submitted in this namespace and is still retained: `submit`
    /// declares the job's results queue before anything else, and only the tracker's
    /// retention deletes it.
    pub async fn job_exists(&self, conn: &lapin::Connection, job_id: &str) -> lapin::Result<bool> {
        Ok(self.queue_len(conn, &self.results_queue(job_id)).await?.is_some())
    }

    /// Number of messages ready in a queue, or `None` if it does not exist.
    pub async fn queue_len(&self, conn: &lapin::Connection, queue: &str) -> lapin::Result<Option<u32>> {
        Ok(queue_stats(conn, queue).await?.map(|(ready, _)| ready))
    }

    /// The queues and exchanges of this namespace that do not depend on a job: the items
    /// and delay queues of `providers` (delay tiers `tiers_s`), the shared queues and the
    /// exchanges. Job queues and results streams are named after their jobs.
    pub fn fixed_names(&self, providers: &[&str], tiers_s: &[u64]) -> (Vec<String>, Vec<String>) {
        let mut queues: Vec<String> = providers.iter().map(|p| self.items_queue(p)).collect();
        for p in providers {
            queues.extend(tiers_s.iter().map(|s| self.delay_queue(p, *s)));
            queues.extend(tiers_s.iter().map(|s| self.classic_delay_queue(p, *s)));
        }
        queues.extend(tiers_s.iter().map(|s| self.job_delay_queue(*s)));
        queues.extend([
            self.control_stream(),
            self.dead_queue(),
            self.ledger_queue(),
            self.tracker_rpc_queue(),
            self.tracker_state_queue(),
            self.tracker_state_copy_queue(),
            self.webhooks_queue(),
            self.webhooks_dead_queue(),
        ]);
        queues.extend(crate::webhooks::ALL_DELAY_TIERS_S.iter().map(|s| self.webhooks_delay_queue(*s)));
        let exchanges = vec![
            self.items_exchange(),
            self.results_exchange(),
            self.dead_exchange(),
            self.jobs_exchange(),
            self.delay_exchange(),
        ];
        (queues, exchanges)
    }

    /// Deletes every queue of this namespace that a test created (items of `providers`,
    /// the shared ones). Results queues are deleted by their collector.
    pub async fn delete_all(&self, ch: &Channel, providers: &[&str], tiers_s: &[u64]) -> lapin::Result<()> {
        let (queues, exchanges) = self.fixed_names(providers, tiers_s);
        for q in queues {
            ch.queue_delete(q.into(), Default::default()).await?;
        }
        for x in exchanges {
            ch.exchange_delete(x.into(), Default::default()).await?;
        }
        Ok(())
    }
}

/// `(messages ready, consumers)` of a queue, or `None` if it does not exist. Uses its own
/// channel because a passive declare of a missing queue closes the channel.
pub async fn queue_stats(conn: &lapin::Connection, queue: &str) -> lapin::Result<Option<(u32, u32)>> {
    let ch = crate::amqp::open_channel(conn).await?;
    let res = ch
        .queue_declare(queue.into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await;
    let _ = ch.close(200, "done".into()).await;
    match res {
        Ok(q) => Ok(Some((q.message_count(), q.consumer_count()))),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// True when the broker refused a declaration because the queue or exchange exists with
/// other arguments (e.g. another `amqp.delivery_limit`): a configuration problem that
/// reconnecting will not fix.
pub fn is_precondition_failed(e: &(dyn std::error::Error + 'static)) -> bool {
    crate::amqp::refusal_of(e) == Some(crate::amqp::Refusal::PreconditionFailed)
}

/// The hint shown with a precondition failure.
pub const PRECONDITION_HINT: &str = "a queue of this namespace exists with other arguments \
     (e.g. another amqp.delivery_limit); use the same settings as the fleet that created it, \
     or another namespace";

/// True when a lapin error is the broker's 404 NOT_FOUND.
pub fn is_not_found(e: &lapin::Error) -> bool {
    crate::amqp::refusal(e) == Some(crate::amqp::Refusal::NotFound)
}

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    args
}

async fn declare_queue(ch: &Channel, name: &str, args: FieldTable) -> lapin::Result<()> {
    let name: ShortString = name.into();
    ch.queue_declare(name, QueueDeclareOptions { durable: true, ..Default::default() }, args).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_namespaced() {
        let t = Topology::new("t42", 5);
        assert_eq!(t.items_queue("mock"), "t42.items.mock");
        assert_eq!(t.results_queue("job1"), "t42.results.job1");
        assert_eq!(t.ledger_queue(), "t42.ledger");
        assert_eq!(t.job_items_queue("mock", "job_1"), "t42.items.mock.job_1");
        assert_eq!(t.job_delay_queue(30), "t42.delayed.30s");
        assert_eq!(t.batch_items_stream("job1"), "t42.batch.items.job1");
        assert_eq!(t.chunk_queue("mock"), "t42.batch.mock");
        assert_eq!(t.poll_queue("mock", 60), "t42.batch.mock.poll.60s");
        assert_eq!(t.api_file_lock_queue("file-1"), "t42.api.file.file-1.lock");
    }

    #[test]
    fn only_items_refused_as_not_the_producers_are_suspect() {
        let with_label = |label: &str| {
            let mut h = FieldTable::default();
            h.insert(DEAD_LABEL_HEADER.into(), AMQPValue::LongString(label.into()));
            lapin::BasicProperties::default().with_headers(h)
        };
        assert!(dead_suspect(&with_label("forbidden_url")) && dead_suspect(&with_label("malformed")));
        assert!(!dead_suspect(&with_label("oversized")));
        // The broker's own dead-lettering (delivery limit, rejection) sets no label.
        assert!(!dead_suspect(&lapin::BasicProperties::default()));
        assert_eq!(RESULTS_MAX_AGE, format!("{}D", RESULTS_MAX_AGE_S / 86_400), "one age, two spellings");
    }
}
