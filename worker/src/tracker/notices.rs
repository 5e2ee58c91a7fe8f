//! What the tracker tells others: `job_finished` on a job's results stream, control
//! messages to every worker, the closing of an ended job's items queue, and the delivery
//! of its completion webhook.

use fleet::amqp;
use fleet::wire::{ControlMessage, JobSummary, KIND_JOB_FINISHED};

use super::active::Active;
use super::state;
use crate::settle::detach_confirm;

impl Active<'_> {
    /// Publishes `job_finished` to the job's results stream (so `producer wait` can stop).
    pub(super) async fn announce(&self, summary: &JobSummary) {
        let payload = serde_json::to_vec(summary).expect("summaries serialize");
        let props = amqp::persistent_json().with_type(KIND_JOB_FINISHED.into());
        // Straight to the job's results stream (the default exchange routes by queue name),
        // not through the results exchange, whose copy to the ledger would only come back
        // to this tracker.
        let stream = self.topology.results_queue(&summary.job_id);
        let res = amqp::publish(&self.ch, "", &stream, &payload, props).await;
        // Not awaited here: the confirm arrives while we keep folding; an unroutable one
        // (results queue deleted) is harmless.
        if let Ok(pending) = res {
            detach_confirm(pending);
        }
    }

    /// Deletes an ended job's items queue and tells the workers (`job_closed`), so they stop
    /// consuming it. What is still on it is a duplicate of an item that has its result.
    pub(super) async fn close_job_queue(&self, job_id: &str, provider: &str) {
        let queue = self.topology.job_items_queue(provider, job_id);
        if let Err(e) = self.ch.queue_delete(queue.as_str().into(), Default::default()).await {
            tracing::debug!(job_id = %job_id, error = %e, "cannot delete a job's items queue");
        }
        self.control(&ControlMessage::JobClosed { job_id: job_id.to_string() }).await;
    }

    /// Publishes the completion-webhook delivery of a job that ended with a webhook URL to
    /// `<ns>.webhooks`, confirmed: any worker's sender POSTs it (see `crate::webhooks`).
    pub(super) async fn publish_webhook(&self, ended: &state::Ended) -> anyhow::Result<()> {
        let Some(url) = &ended.webhook_url else { return Ok(()) };
        let s = &ended.summary;
        let Some(event) = fleet::webhooks::WebhookEvent::of(s, self.topology.results_queue(&s.job_id)) else {
            return Ok(());
        };
        let delivery = fleet::webhooks::WebhookDelivery {
            url: url.clone(),
            event,
            first_at_ms: s.finished_at_ms.unwrap_or_else(fleet::now_ms),
            attempts: 0,
            last_error: None,
        };
        let payload = serde_json::to_vec(&delivery)?;
        amqp::publish_confirmed(&self.ch, "", &self.topology.webhooks_queue(), &payload, amqp::persistent_json())
            .await?;
        tracing::debug!(job_id = %s.job_id, host = %fleet::webhooks::url_host(url), "webhook delivery queued");
        Ok(())
    }

    /// Publishes a control message to every worker (confirm awaited off the loop: a lost
    /// one only delays what the broker tells the workers anyway).
    pub(super) async fn control(&self, msg: &ControlMessage) {
        let payload = serde_json::to_vec(msg).expect("control messages serialize");
        // Signed: workers believe `job_closed` and a reasoned cancel only from the tracker.
        let props = fleet::signing::sign(amqp::persistent_json(), &payload);
        let res = amqp::publish(&self.ch, "", &self.topology.control_stream(), &payload, props).await;
        match res {
            Ok(pending) => detach_confirm(pending),
            Err(e) => tracing::warn!(error = %e, "cannot publish to the control stream"),
        }
    }
}
