//! The job tracker: a role every worker can take, exactly one active at a time.
//!
//! Election ([`election`]): the active tracker owns the exclusive queue `<ns>.tracker.lock`.
//! The broker lets only one connection declare it and deletes it when that connection dies,
//! so a standby's next attempt succeeds after a crash. The ledger queue is also
//! single-active-consumer, as a second guard.
//!
//! The active tracker ([`active`]) folds ledger messages into [`state::State`], and in each
//! cycle: checkpoints the state to `<ns>.tracker.state` and its copy (confirmed, [`checkpoint`]), then
//! acks the messages the checkpoint covers, then publishes the job-level metrics of that
//! same checkpoint ([`publish`]). Metrics are only ever pushed from checkpointed state, so a
//! takeover (which restores the newest checkpoint) never shows a counter going down.
//!
//! Its other rooms: status queries ([`status`]); what it tells others, `job_finished` and
//! control messages ([`notices`]); dead-lettered items ([`dead`]); and periodic upkeep,
//! backlog measurement, retention and Pushgateway pruning ([`upkeep`]).

mod active;
mod checkpoint;
pub mod dead;
mod election;
mod notices;
mod publish;
pub mod state;
mod status;
mod upkeep;

pub use election::spawn_candidate;
