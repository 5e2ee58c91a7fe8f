//! Status queries (`producer status`, `producer jobs`): answered on the query's `reply_to`
//! from the tracker's state, checkpointed or not (a status is a reading, not a counter).

use fleet::wire::{JobSummary, TrackerReply, TrackerRequest};
use lapin::BasicProperties;

use super::active::Active;
use super::state;

impl Active<'_> {
    /// Answers one status query on its `reply_to`.
    pub(super) async fn answer(&self, req: lapin::message::Delivery) {
        let Some(reply_to) = req.properties.reply_to().clone() else {
            return;
        };
        let now = fleet::now_ms();
        let mut reply = TrackerReply { tracker: self.worker_id.clone(), jobs: vec![], error: None, forgotten: false };
        match serde_json::from_slice::<TrackerRequest>(&req.data) {
            Ok(TrackerRequest::Status { job_id }) => match self.state.jobs.get(&job_id) {
                Some(j) => reply.jobs.push(self.summary(j, now)),
                None if self.state.expiring_results.contains_key(&job_id) => {
                    reply.forgotten = true;
                    reply.error = Some(format!(
                        "job {job_id:?} ended more than tracker.retention_s ago: its summary is forgotten; \
                         its results stay readable with `producer wait` for 7 days after they were written"
                    ));
                }
                None => reply.error = Some(format!("no job {job_id:?} is known to the tracker")),
            },
            Ok(TrackerRequest::Jobs) => reply.jobs = self.state.jobs.values().map(|j| self.summary(j, now)).collect(),
            Err(e) => reply.error = Some(format!("bad request: {e}")),
        }
        let mut props = BasicProperties::default().with_content_type("application/json".into());
        if let Some(id) = req.properties.correlation_id() {
            props = props.with_correlation_id(id.clone());
        }
        let payload = serde_json::to_vec(&reply).expect("replies serialize");
        let _ = self.ch.basic_publish("".into(), reply_to, Default::default(), &payload, props).await;
    }

    /// A job's summary, with its provider's backlog as last measured.
    fn summary(&self, job: &state::JobState, now_ms: u64) -> JobSummary {
        let mut summary = job.summary(now_ms);
        if let Some(progress) = summary.progress.as_mut() {
            progress.provider_backlog = self
                .cfg
                .providers
                .contains_key(&job.provider)
                .then(|| self.metrics.queue_backlog.with_label_values(&[&job.provider]).get() as u64);
        }
        summary
    }
}
