//! Owns what the two batch APIs do alike, written once over [`BatchApi`]: finding a batch by
//! id, settling it (writing its outputs once it has ended) and answering its object;
//! cancelling it; making room for a new batch and charging its bytes; a newest-first page.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::Value;

use super::lifecycle::{Lifecycle, Stage};
use super::registry::{Cursor, Full, Ids, Kept, Registry};
use super::{ApiError, Batches, Family, Inner};

/// One API's batches, as the shared handlers see them.
pub(super) trait BatchApi: Sized {
    /// The API family (error shapes).
    const FAMILY: Family;
    /// The object's name in messages (`batch`, `message batch`).
    const NAME: &'static str;

    fn registry(inner: &mut Inner) -> &mut Registry<Self>;
    fn ids(inner: &Inner) -> &Ids;
    /// Writes batch `seq`'s outputs if it has ended by `now` and they are not written yet.
    fn settle(inner: &mut Inner, seq: u64, now: Instant);
    fn life(&mut self) -> &mut Lifecycle;
    /// Bytes held against the store's budget (given back when the batch is evicted).
    fn held_bytes(&self) -> u64;
    /// The API's object for the batch with `id`, at `now`.
    fn object(&self, id: String, now: Instant) -> Value;
    /// Why the batch, which has ended, cannot be cancelled.
    fn cannot_cancel(&mut self, now: Instant) -> String;
}

/// A batch may be evicted once it has ended.
impl<B: BatchApi> Kept for B {
    fn has_ended(&mut self, now: Instant) -> bool {
        matches!(self.life().stage(now), Stage::Ended(_))
    }
}

/// The sequence number of the batch `id`, or a 404 in the API's shape.
pub(super) fn seq_of<B: BatchApi>(inner: &mut Inner, id: &str) -> Result<u64, ApiError> {
    let seq = B::ids(inner).seq(id).filter(|&seq| B::registry(inner).get_mut(seq).is_some());
    seq.ok_or_else(|| ApiError::not_found(B::FAMILY, B::NAME, id))
}

/// Settles batch `seq` and renders its object.
pub(super) fn object_of<B: BatchApi>(inner: &mut Inner, seq: u64, now: Instant) -> Option<Value> {
    B::settle(inner, seq, now);
    let id = B::ids(inner).id(seq);
    B::registry(inner).get_mut(seq).map(|batch| batch.object(id, now))
}

/// Settles batch `seq` and answers its object.
pub(super) fn answer<B: BatchApi>(inner: &mut Inner, seq: u64, now: Instant) -> Response {
    Json(object_of::<B>(inner, seq, now).expect("the batch was found")).into_response()
}

/// `GET .../{id}`.
pub(super) async fn retrieve<B: BatchApi>(
    State(batches): State<Arc<Batches>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let mut inner = batches.lock();
    let seq = seq_of::<B>(&mut inner, &id)?;
    Ok(answer::<B>(&mut inner, seq, Instant::now()))
}

/// `POST .../{id}/cancel`: the batch's object, `cancelling`; again is harmless; an ended
/// batch answers 409.
pub(super) async fn cancel<B: BatchApi>(
    State(batches): State<Arc<Batches>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let now = Instant::now();
    let mut inner = batches.lock();
    let seq = seq_of::<B>(&mut inner, &id)?;
    let batch = B::registry(&mut inner).get_mut(seq).expect("found above");
    let first = batch.life().cancelled_at().is_none();
    if !batch.life().cancel(now) {
        return Err(ApiError::new(B::FAMILY, StatusCode::CONFLICT, batch.cannot_cancel(now)));
    }
    if first {
        inner.counters.cancelled();
    }
    Ok(answer::<B>(&mut inner, seq, now))
}

/// Makes room for a new batch holding `bytes` (evicting the oldest ended one if the API's
/// registry is full) and charges them, or says why not.
pub(super) fn admit<B: BatchApi>(inner: &mut Inner, bytes: u64, now: Instant) -> Result<(), ApiError> {
    match B::registry(inner).make_room(now) {
        Ok(Some(evicted)) => inner.files.release(evicted.held_bytes()),
        Ok(None) => {}
        Err(Full) => {
            return Err(ApiError::new(
                B::FAMILY,
                StatusCode::TOO_MANY_REQUESTS,
                "Too many batches in progress for mock-provider (--batch-keep): wait for some to end",
            ))
        }
    }
    inner.files.charge(bytes, B::FAMILY)
}

/// A page of a list endpoint.
pub(super) struct Page {
    pub data: Vec<Value>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub has_more: bool,
}

/// Up to `limit` objects, newest first, from `cursor`, each settled first.
pub(super) fn page<B: BatchApi>(inner: &mut Inner, cursor: Cursor, limit: usize, now: Instant) -> Page {
    let (seqs, has_more) = B::registry(inner).page(cursor, limit);
    let data = seqs.iter().filter_map(|&seq| object_of::<B>(inner, seq, now)).collect();
    let ids = B::ids(inner);
    Page { data, first_id: seqs.first().map(|&s| ids.id(s)), last_id: seqs.last().map(|&s| ids.id(s)), has_more }
}

/// The list `limit` parameter, default 20, checked against the API's bound.
pub(super) fn limit(family: Family, limit: Option<usize>, max: usize) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(20);
    if (1..=max).contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::invalid(family, format!("limit: must be between 1 and {max}")))
    }
}

/// A list cursor's id as a sequence number, or a 400 naming the `field`.
pub(super) fn cursor_seq<B: BatchApi>(inner: &Inner, field: &str, id: &str) -> Result<u64, ApiError> {
    B::ids(inner).seq(id).ok_or_else(|| ApiError::invalid(B::FAMILY, format!("{field}: not a {} id", B::NAME)))
}
