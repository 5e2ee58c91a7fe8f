//! Uploads in progress, and the streams of those whose replica died.
//!
//! A file's stream is written before its `file` record, so a replica killed mid-upload
//! leaves a stream that no record names. To find such streams without listing the
//! broker's queues, an upload holds a *lease*: an exclusive queue `<file stream>.lock`
//! declared on the replica's connection before its `upload_started` record is written.
//! The broker deletes an exclusive queue when its connection ends, however the process
//! ends (a SIGKILL closes the socket), so "the lock is gone" is exactly "nobody is writing
//! this stream any more". Every replica's [`reap`] asks, for each upload its index holds as
//! started and not stored, whether the lock still exists; a gone lock with still no `file`
//! record (after a sync, so a record written a moment ago counts) means the stream is
//! orphaned: it is deleted and an `upload_ended` record drops the upload from every index.
//!
//! Why a lock queue and not a heartbeat record: it needs no clock, no timeout to tune, and
//! costs one passive declare per upload in progress per [`REAP_EVERY`].

use std::sync::Arc;
use std::time::Duration;

use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;

use super::error::ApiError;
use super::store::{Record, Store};

/// How often a replica looks for the streams of dead uploads. Short: each look is one
/// passive declare per upload in progress, and an orphaned stream holds broker disk.
const REAP_EVERY: Duration = Duration::from_secs(5);

/// An upload's lock, held until dropped; dropping it deletes the lock queue (in a spawned
/// task, as a drop cannot wait), so an upload that ends any way, even by its request being
/// dropped mid-body, lets the reaper decide about its stream.
pub(crate) struct Lease {
    ch: lapin::Channel,
    queue: String,
}

impl Lease {
    /// Declares `file_id`'s lock on the shared connection, then writes the
    /// `upload_started` record (in that order: a record always has a lock to ask about).
    pub(crate) async fn take(store: &Store, file_id: &str) -> Result<Lease, ApiError> {
        let conn = store.broker.conn().await?;
        let ch = fleet::amqp::open_channel(&conn).await?;
        let queue = store.topology.api_file_lock_queue(file_id);
        let opts = QueueDeclareOptions { exclusive: true, ..Default::default() };
        ch.queue_declare(queue.as_str().into(), opts, FieldTable::default()).await?;
        let lease = Lease { ch, queue };
        store.append(&Record::UploadStarted { id: file_id.to_string(), at: fleet::now_ms() / 1000 }).await?;
        tracing::info!(file = %file_id, "upload started");
        Ok(lease)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let (ch, queue) = (self.ch.clone(), std::mem::take(&mut self.queue));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
                let _ = ch.close(200, "upload ended".into()).await;
            });
        }
    }
}

/// Whether `file_id`'s upload still holds its lock (on another connection the broker
/// answers RESOURCE_LOCKED, on this one the declare succeeds: both mean alive).
async fn alive(store: &Store, file_id: &str) -> Result<bool, ApiError> {
    let conn = store.broker.conn().await?;
    // A failed passive declare closes its channel: one channel per question.
    let ch = fleet::amqp::open_channel(&conn).await?;
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let queue = store.topology.api_file_lock_queue(file_id);
    match ch.queue_declare(queue.as_str().into(), passive, FieldTable::default()).await {
        Ok(_) => {
            let _ = ch.close(200, "asked".into()).await;
            Ok(true)
        }
        Err(e) if fleet::topology::is_not_found(&e) => Ok(false),
        Err(e) if fleet::amqp::refusal(&e) == Some(fleet::amqp::Refusal::ResourceLocked) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

/// Deletes the streams of uploads whose replica died, every [`REAP_EVERY`], until
/// `shutdown` (see the module's header).
pub(crate) async fn reap(store: Arc<Store>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(REAP_EVERY) => {}
            () = shutdown.cancelled() => return,
        }
        for id in store.uploads() {
            if let Err(e) = reap_one(&store, &id).await {
                tracing::warn!(file = %id, error = %e.message, "cannot check an upload in progress; checking again later");
            }
        }
    }
}

async fn reap_one(store: &Store, id: &str) -> Result<(), ApiError> {
    if alive(store, id).await? {
        return Ok(());
    }
    // The upload may have stored its record just before letting its lock go.
    store.sync().await?;
    if !store.is_uploading(id) {
        return Ok(());
    }
    store.delete_file_stream(id).await?;
    // Logged as soon as the stream is gone, before the record (a broker round trip): whoever
    // sees the stream gone finds the line.
    tracing::info!(file = %id, "deleted the stream of an upload that did not finish");
    store.append(&Record::UploadEnded { id: id.to_string() }).await?;
    Ok(())
}
