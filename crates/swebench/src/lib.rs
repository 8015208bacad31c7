//! SWE-bench, shared by the evaluator, the task builder and the rollout grader: loading instances
//! and predictions, log parsers, grading (the official `report.json`), and a harness that applies
//! patches and runs test commands in the sandbox; published task sets ([`sets`]) and git diffs
//! ([`patch`]) as tasks hold them.

pub mod data;
pub mod grading;
pub mod harness;
pub mod parsers;
pub mod patch;
pub mod sets;
pub mod specs;

pub use data::{Prediction, load_instances, load_predictions};
pub use grading::{InstanceReport, grade_log, report_json};
pub use harness::{EnvError, Graded, Harness, HarnessConfig, Outcome, Status, Summary, TestRun};
