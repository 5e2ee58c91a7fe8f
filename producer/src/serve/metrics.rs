//! The server's own metrics, served on `GET /metrics` for Prometheus to scrape (it is a
//! long-running process, so it is scraped, not pushed): requests by route template and
//! status code, bytes uploaded, batches open. Labels are route templates (`/v1/batches/{id}`), never
//! paths, ids or keys, so the series stay few and hold no secret.

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::{Encoder as _, TextEncoder};
use tokio_util::sync::CancellationToken;

/// How often the open batches are counted. Not at scrape time: counting asks the tracker,
/// which may take its whole timeout, and a scrape must answer at once.
const COUNT_OPEN_EVERY: std::time::Duration = std::time::Duration::from_secs(15);

/// The server's metrics: their names and shapes live with the fleet's others
/// ([`fleet::metrics::ApiMetrics`]).
pub(crate) type Metrics = fleet::metrics::ApiMetrics;

/// The text exposition of every metric.
fn render(metrics: &Metrics) -> String {
    let mut buf = Vec::new();
    let _ = TextEncoder::new().encode(&metrics.registry.gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}

/// Middleware counting each request by its route template and answer's status.
pub(crate) async fn count(State(app): State<super::AppState>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched", |m| m.as_str()).to_string();
    let res = next.run(req).await;
    app.metrics.requests.with_label_values(&[route.as_str(), res.status().as_str()]).inc();
    res
}

/// Counts the open batches every [`COUNT_OPEN_EVERY`] until `shutdown`: those of the
/// records this replica has read whose job the tracker knows and shows not ended (a
/// tracker that does not answer leaves the last count).
pub(crate) async fn count_open(app: super::AppState, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(COUNT_OPEN_EVERY) => {}
            () = shutdown.cancelled() => return,
        }
        let Ok(jobs) = super::tracker::jobs(&app.store).await else { continue };
        if jobs.is_empty() {
            continue;
        }
        let ended = |j: &fleet::wire::JobSummary| fleet::wire::JobStatus::ENDED.contains(&j.status);
        let open = app.store.batch_jobs().iter().filter(|id| jobs.get(*id).is_some_and(|j| !ended(j))).count();
        app.metrics.batches_open.set(open as i64);
    }
}

/// `GET /metrics`.
pub(crate) async fn serve(State(app): State<super::AppState>) -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], render(&app.metrics))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_labelled_by_route_template() {
        let m = Metrics::new("ns");
        m.requests.with_label_values(&["/v1/batches/{id}", "404"]).inc();
        m.upload_bytes.inc_by(10);
        m.batches_open.set(2);
        let text = render(&m);
        assert!(
            text.contains(r#"batch_api_requests_total{namespace="ns",route="/v1/batches/{id}",status="404"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"batch_api_upload_bytes_total{namespace="ns"} 10"#), "{text}");
        assert!(text.contains(r#"batch_api_batches_open{namespace="ns"} 2"#), "{text}");
    }
}
