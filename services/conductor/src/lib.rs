//! The davinci conductor: owns pipeline runs. Runs are kept in the conductor's job registry
//! (kind `run`), so Get/List/Watch/Cancel work against persisted state; orchestration of
//! the stages behind `SubmitRun` arrives with the pipeline issue.

pub mod orchestrate;
pub mod serve;
pub mod spec;
pub mod summary;
