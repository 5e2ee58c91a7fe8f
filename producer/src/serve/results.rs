//! A batch's output and error files, and an Anthropic batch's results: read from the job's
//! results stream exactly as `producer wait` reads it (from the first message, each
//! `custom_id` once), and streamed to the client as they are read. Nothing is stored.

use std::collections::HashSet;
use std::time::Duration;

use axum::body::Body;
use fleet::messages::ResultsMessage;
use fleet::wire::{ItemResult, ItemStatus};

use super::error::ApiError;
use super::store::BatchRecord;
use super::AppState;

/// A results stream quiet this long is read to its end (a finished job's results come
/// back to back).
const BROKER_QUIET: Duration = Duration::from_secs(5);
use crate::output_format::OutputFormat;

/// Which results a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Which {
    /// The succeeded requests (OpenAI's output file).
    Output,
    /// The others (OpenAI's error file).
    Errors,
    /// Every result (Anthropic's results).
    All,
}

impl Which {
    /// Whether a result of `status` belongs in the file.
    pub(crate) fn holds(self, status: ItemStatus) -> bool {
        match self {
            Which::Output => status == ItemStatus::Succeeded,
            Which::Errors => status != ItemStatus::Succeeded,
            Which::All => true,
        }
    }

    /// Its name in a file name.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Which::Output => "output",
            Which::Errors => "errors",
            Which::All => "results",
        }
    }
}

/// A reader of a job's results: each `custom_id` once, until all `total` are read (or the
/// stream stays quiet for [`BROKER_QUIET`]: a job still running gives what it has).
struct ResultsReader {
    reader: super::broker::StreamReader,
    seen: HashSet<String>,
    total: u64,
    done: bool,
}

impl ResultsReader {
    async fn open(app: &AppState, batch: &BatchRecord) -> Result<ResultsReader, ApiError> {
        let conn = app.store.broker.conn().await?;
        let queue = app.store.topology.results_queue(&batch.job_id);
        if app.store.topology.queue_len(&conn, &queue).await?.is_none() {
            return Err(ApiError::not_found("results for batch", &batch.id));
        }
        let reader = super::broker::StreamReader::open(&conn, &queue).await?;
        Ok(ResultsReader { reader, seen: HashSet::new(), total: batch.total, done: false })
    }

    /// The next results not read before; `None` at the end.
    async fn next(&mut self) -> Result<Option<Vec<ItemResult>>, ApiError> {
        while !self.done && (self.seen.len() as u64) < self.total {
            let Some(d) = self.reader.next(BROKER_QUIET).await? else { break };
            let kind = d.properties.kind().as_ref().map(|k| k.as_str());
            match ResultsMessage::decode(kind, &d.data) {
                Ok(ResultsMessage::Results(results)) => {
                    let new: Vec<ItemResult> =
                        results.into_iter().filter(|r| self.seen.insert(r.custom_id.clone())).collect();
                    if !new.is_empty() {
                        return Ok(Some(new));
                    }
                }
                // An abandoned submission gets no more results.
                Ok(ResultsMessage::JobFinished(summary)) if summary.reason.is_some() => self.done = true,
                Ok(ResultsMessage::JobFinished(_)) => {}
                Err(e) => tracing::warn!(error = %e, "ignoring a message on a results stream"),
            }
        }
        Ok(None)
    }

    async fn close(self) {
        self.reader.close().await;
    }
}

/// The lines of `which` results of `batch` in `format`, streamed.
pub(crate) fn body(app: AppState, batch: BatchRecord, which: Which, format: OutputFormat) -> Body {
    super::streamed_body(|tx| async move {
        let mut reader = ResultsReader::open(&app, &batch).await?;
        while let Some(results) = reader.next().await? {
            let mut buf = Vec::new();
            for r in results.iter().filter(|r| which.holds(r.status)) {
                format.write_line(&mut buf, r).map_err(ApiError::unavailable)?;
            }
            if !buf.is_empty() && tx.send(Ok(buf.into())).await.is_err() {
                break;
            }
        }
        reader.close().await;
        Ok(())
    })
}

/// Bytes of the `which` file of `batch` (read through once).
pub(crate) async fn count_bytes(app: &AppState, batch: &BatchRecord, which: Which) -> Result<u64, ApiError> {
    let mut bytes = 0u64;
    let mut reader = ResultsReader::open(app, batch).await?;
    let mut line = Vec::new();
    while let Some(results) = reader.next().await? {
        for r in results.iter().filter(|r| which.holds(r.status)) {
            line.clear();
            OutputFormat::Openai.write_line(&mut line, r).map_err(ApiError::unavailable)?;
            bytes += line.len() as u64;
        }
    }
    reader.close().await;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_holds_successes_and_errors_the_rest() {
        for s in ItemStatus::ALL {
            assert_eq!(Which::Output.holds(s), s == ItemStatus::Succeeded);
            assert_ne!(Which::Output.holds(s), Which::Errors.holds(s));
            assert!(Which::All.holds(s));
        }
    }
}
