//! The producer CLI's library: submitting jobs, collecting results, and (through the job
//! tracker) inspecting and controlling jobs.

pub mod collect;
pub mod control;
pub mod inspect;
pub mod progress;
pub mod submit;
pub mod validate;
