//! `davinci.traj/v1`: an agent run on a task, as OpenAI chat messages with tool calls.
//!
//! Beside the messages a record keeps what is needed to trust and reproduce it: the tools'
//! JSON schemas, the model's raw text next to the calls parsed from it, the sampling settings,
//! the server, the chat template's hash, per-step timings, the graded tests and the digest of
//! the task it ran on. Ids are deterministic ([`trajectory_id`]), so a rollout redone after a
//! crash writes the same record.
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const TRAJ_SCHEMA: &str = "davinci.traj/v1";

/// Trajectories longer than this many tokens are not trained on (the paper's 128K cap); the
/// packer drops them (`trajectory_too_long`) whatever its seq_len rule for long documents.
pub const MAX_TRAJECTORY_TOKENS: usize = 131_072;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCallFunction {
    pub name: String,
    /// JSON-encoded arguments, as the OpenAI API sends them.
    pub arguments: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    pub function: ToolCallFunction,
}

fn function_type() -> String {
    "function".into()
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// system, user, assistant or tool.
    pub role: String,
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Assistant turns: the text exactly as the server returned it, where `content` and
    /// `tool_calls` were parsed out of it (calls written as text) or it was not usable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_content: Option<String>,
    /// Assistant turns: reasoning the server returned apart from the content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TestResults {
    pub success: Vec<String>,
    pub failure: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub resolved: bool,
    /// submitted, step_limit, context_limit, time_limit, cost_limit, format_error or error.
    pub exit_status: String,
    /// FAIL_TO_PASS and PASS_TO_PASS, each {success, failure}.
    #[serde(default)]
    pub tests: BTreeMap<String, TestResults>,
}

/// The sampling settings of the model calls.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    pub temperature: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    pub max_tokens: u32,
}

/// Timings and token counts of one step (one model call and the tool call it asked for).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepTiming {
    pub model_seconds: f64,
    pub tool_seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_tokens: Option<u64>,
    /// HTTP attempts the model call took (retries on 429 / 5xx / timeouts).
    #[serde(default)]
    pub attempts: u32,
}

/// How the trajectory was made.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    /// `replay`, `openai` or `null`.
    pub policy: String,
    pub rollout_index: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<Sampling>,
    /// The endpoint and what it said about itself (model, system_fingerprint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<serde_json::Value>,
    /// SHA-256 of the chat template the model was served with, where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template_sha256: Option<String>,
    /// SHA-256 of the task record (canonical JSON) the rollout ran on.
    pub task_sha256: String,
    #[serde(default)]
    pub steps: Vec<StepTiming>,
    /// The graded submission: `git diff` against the base, test files reverted.
    #[serde(default)]
    pub submission: String,
    pub seconds: f64,
    /// Format errors sent back to the model.
    #[serde(default)]
    pub format_errors: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trajectory {
    pub schema: String,
    pub id: String,
    pub task_id: String,
    pub model: String,
    /// JSON schemas of the tools offered to the model.
    pub tools: Vec<serde_json::Value>,
    pub messages: Vec<Message>,
    pub outcome: Outcome,
    #[serde(default)]
    pub n_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<RunInfo>,
    #[serde(default)]
    pub metadata: BTreeMap<String, serde_json::Value>,
}

/// `traj-{first 24 hex of sha256(task \0 model \0 index \0 seed)}`: the same rollout of the same
/// task by the same model always has the same id.
pub fn trajectory_id(task_id: &str, model: &str, rollout_index: u32, seed: Option<u64>) -> String {
    let seed = seed.map(|s| s.to_string()).unwrap_or_default();
    let key = format!("{task_id}\0{model}\0{rollout_index}\0{seed}");
    format!("traj-{}", &crate::hash::sha256_hex(key)[..24])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_deterministic_and_distinct() {
        let a = trajectory_id("a__b-1", "m", 0, Some(7));
        assert_eq!(a, trajectory_id("a__b-1", "m", 0, Some(7)));
        assert_ne!(a, trajectory_id("a__b-1", "m", 1, Some(7)));
        assert_ne!(a, trajectory_id("a__b-1", "m", 0, None));
        assert_ne!(a, trajectory_id("a__b-1", "m2", 0, Some(7)));
        assert_eq!(a.len(), "traj-".len() + 24);
    }

    #[test]
    fn records_without_run_info_still_read() {
        let t: Trajectory = serde_json::from_str(
            r#"{"schema":"davinci.traj/v1","id":"t","task_id":"x","model":"m","tools":[],"messages":[{"role":"user","content":"hi"}],"outcome":{"resolved":false,"exit_status":"error"}}"#,
        )
        .unwrap();
        assert!(t.run.is_none());
        assert_eq!(t.messages[0].raw_content, None);
    }
}
