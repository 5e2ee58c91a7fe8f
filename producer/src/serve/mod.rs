//! `producer serve`: the fleet's own batch API, the OpenAI Files + Batches and Anthropic
//! Message Batches HTTP APIs, so existing client code works against the fleet
//! (docs/api.md). It is one more producer: it validates lines as `submit` does, publishes
//! jobs as `submit` does and reads results as `wait` does; nothing downstream changes.
//! Stateless: files and records live on the broker ([`store`]), so any number of replicas
//! answer any request.
//!
//! The map: [`auth`] (keys, owners), [`error`] (answers in each API's shape), [`broker`]
//! (connection, stream reading), [`store`] (records and their index), [`upload`] (a file
//! streamed to the broker), [`lease`] (uploads in progress, the streams of dead ones), [`files`] and [`batches`] (OpenAI routes), [`anthropic`]
//! (Anthropic routes), [`route`] (which provider), [`publish`] (a batch's job), [`results`] (output files),
//! [`status`] (job → batch object), [`tracker`] (questions to the job tracker),
//! [`metrics`] (`/metrics`).

mod anthropic;
mod auth;
mod batches;
mod broker;
mod error;
mod files;
mod lease;
mod metrics;
mod publish;
mod results;
mod route;
mod status;
mod store;
mod tracker;
mod upload;

use std::sync::Arc;

use anyhow::Context as _;
use axum::body::Body;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use fleet::topology::Topology;
use fleet::Config;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use error::ApiError;

pub use auth::KeysError;

/// What every request shares.
pub struct App {
    cfg: Config,
    keys: auth::Keys,
    store: Arc<store::Store>,
    rules: upload::LineRules,
    metrics: metrics::Metrics,
    /// Requests in progress per key (`api.max_requests_per_key`).
    in_progress: Arc<auth::InProgress>,
}

/// The state handlers get.
pub type AppState = Arc<App>;

/// Listens on `api.listen` and serves until `shutdown`.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&cfg.api.listen)
        .await
        .with_context(|| format!("cannot listen on {} (api.listen)", cfg.api.listen))?;
    serve(cfg, listener, shutdown).await
}

/// Serves on `listener` until `shutdown`: requests in progress finish, then the broker
/// connection closes.
pub async fn serve(cfg: Config, listener: tokio::net::TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let keys = auth::Keys::from_env(&cfg.api.key_envs)?;
    let topology = Topology::from_config(&cfg);
    let store =
        Arc::new(store::Store::new(topology, broker::Broker::new(cfg.amqp.addresses()), cfg.api.file_retention_s));
    store.declare().await.map_err(|e| anyhow::anyhow!("cannot declare the API's metadata stream: {}", e.message))?;
    let app = Arc::new(App {
        rules: upload::LineRules::of(&cfg),
        metrics: metrics::Metrics::new(&cfg.namespace),
        keys,
        in_progress: Arc::default(),
        store: store.clone(),
        cfg,
    });
    let background = shutdown.child_token();
    let open = tokio::spawn(metrics::count_open(app.clone(), background.clone()));
    let follow = tokio::spawn(store.clone().follow(background.clone()));
    let sweep = tokio::spawn(store.clone().sweep(background.clone()));
    let reap = tokio::spawn(lease::reap(store.clone(), background.clone()));
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "producer serve listening");
    let served = axum::serve(listener, router(app)).with_graceful_shutdown(shutdown.cancelled_owned()).await;
    background.cancel();
    let _ = tokio::join!(follow, sweep, reap, open);
    store.broker.close().await;
    served.context("the HTTP server failed")
}

/// Every route.
fn router(app: AppState) -> Router {
    Router::new()
        .route("/v1/files", post(files::create).get(files::list))
        .route("/v1/files/{id}", get(files::retrieve).delete(files::delete))
        .route("/v1/files/{id}/content", get(files::content))
        .route("/v1/batches", post(batches::create).get(batches::list))
        .route("/v1/batches/{id}", get(batches::retrieve))
        .route("/v1/batches/{id}/cancel", post(batches::cancel))
        .route("/v1/messages/batches", post(anthropic::create).get(anthropic::list))
        .route("/v1/messages/batches/{id}", get(anthropic::retrieve).delete(anthropic::delete))
        .route("/v1/messages/batches/{id}/cancel", post(anthropic::cancel))
        .route("/v1/messages/batches/{id}/results", get(anthropic::results))
        .route("/metrics", get(metrics::serve))
        .fallback(unknown_route)
        // Uploads and inline batches count their own bytes against `api.max_file_bytes`.
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(app.clone(), metrics::count))
        .with_state(app)
}

async fn unknown_route(uri: axum::http::Uri) -> ApiError {
    let dialect = error::Dialect::of_path(uri.path());
    ApiError::not_found("route", uri.path()).answer(dialect)
}

/// Reads a JSON body of at most `limit` bytes (413 beyond, 400 when it is not the JSON
/// expected), in OpenAI's error shape (Anthropic handlers re-shape it).
async fn read_json<T: DeserializeOwned>(body: Body, limit: usize) -> Result<T, ApiError> {
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::too_large(format!("The request body is over {limit} bytes.")))?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::invalid(format!("The body is not the JSON expected: {e}")))
}

/// A list page's `limit`: default 20, at most `max` (a larger one is clamped), at least 1.
fn page_limit(limit: Option<&str>, max: usize) -> Result<usize, ApiError> {
    match limit {
        None => Ok(20.min(max)),
        Some(s) => match s.parse::<u128>() {
            Ok(n) => Ok((n.clamp(1, max as u128)) as usize),
            Err(_) => Err(ApiError::invalid(format!("limit must be a positive integer, got {s:?}.")).param("limit")),
        },
    }
}

/// The page of `ids` (newest first) after the id `after`: `(start, end)` indices. An
/// `after` that is not in the list gives an empty page.
fn page(ids: &[&str], after: Option<&str>, limit: usize) -> (usize, usize) {
    let start = match after {
        None => 0,
        Some(a) => ids.iter().position(|id| *id == a).map_or(ids.len(), |i| i + 1),
    };
    (start, (start + limit).min(ids.len()))
}

/// OpenAI's list object.
fn list_object(data: Vec<Value>, has_more: bool) -> Value {
    let first = data.first().and_then(|v| v["id"].as_str()).map(str::to_string);
    let last = data.last().and_then(|v| v["id"].as_str()).map(str::to_string);
    json!({"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": has_more})
}

/// Where a streamed body's parts go (see [`streamed_body`]).
type BodySender = tokio::sync::mpsc::Sender<Result<bytes::Bytes, std::io::Error>>;

/// A response body streamed from a task of its own: `produce` sends the parts (and stops
/// when a send fails: the client left); an error it returns ends the body early, which the
/// client sees as a broken transfer, never as a complete file.
fn streamed_body<F, Fut>(produce: F) -> Body
where
    F: FnOnce(BodySender) -> Fut,
    Fut: std::future::Future<Output = Result<(), ApiError>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(8);
    let produced = produce(tx.clone());
    tokio::spawn(async move {
        if let Err(e) = produced.await {
            let _ = tx.send(Err(std::io::Error::other(e.message))).await;
        }
    });
    Body::from_stream(futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_clamped_and_pages_follow_after() {
        assert_eq!(page_limit(None, 100).unwrap(), 20);
        assert_eq!(page_limit(Some("1000000000"), 100).unwrap(), 100);
        assert_eq!(page_limit(Some("0"), 100).unwrap(), 1);
        assert!(page_limit(Some("-1"), 100).is_err());
        assert!(page_limit(Some("x"), 100).is_err());
        let ids = ["c", "b", "a"];
        assert_eq!(page(&ids, None, 2), (0, 2));
        assert_eq!(page(&ids, Some("b"), 2), (2, 3));
        assert_eq!(page(&ids, Some("zz"), 2), (3, 3));
    }
}
