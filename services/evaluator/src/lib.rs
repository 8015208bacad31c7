//! The davinci evaluator: grades model outputs against benchmarks.
//!
//! * [`swebench`]: SWE-bench log parsers and grading (reproducing the official `report.json`)
//!   and a harness that applies patches and runs test commands in the sandbox.
//! * [`humaneval`]: HumanEval / EvalPlus functional correctness in the sandbox, pass@k.
//! * [`scoring`]: multiple-choice (GPQA-style) and numeric (SciBench-style) answer scoring.
//! * [`drive`]: evaluations that drive a model behind an OpenAI-compatible endpoint
//!   (HumanEval / HumanEval+, GPQA, SciBench) and grade its answers.
//! * [`serve`]: the `Evaluator` gRPC service (Start / Get / Watch / Cancel) over the job registry.

pub mod drive;
pub mod humaneval;
pub mod scoring;
pub mod serve;

/// SWE-bench lives in its own crate so the task builder and the rollout grader share it.
pub use davinci_swebench as swebench;

/// The sandbox crate, re-exported so callers (the CLI) configure it without a direct dependency.
pub use davinci_sandbox as sandbox;
