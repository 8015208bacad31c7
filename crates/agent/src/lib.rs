//! The coding agent: a model (or a scripted policy) working on a task's repository in a
//! sandbox through three tools, `bash`, `str_replace_editor` and `submit` (SWE-agent's
//! scaffold), ending in a submission that is graded by the task's own tests.
//!
//! ```text
//! let agent = Agent::new(sandbox, harness, AgentConfig::default());
//! let traj = agent.run(&task, &mut policy, rollout_index).await?;   // davinci.traj/v1
//! ```
//! [`Agent::solve`] stops before grading (the evaluator grades SWE-bench predictions itself).
//!
//! The rules: one tool call per turn; a format error (no call, several, bad JSON, unknown tool
//! or argument) goes back to the model, at most [`AgentConfig::format_retries`] times in a
//! row; observations over [`AgentConfig::observation_chars`] are cut to head and tail. The run
//! ends on `submit` or a limit (steps, context tokens, wall time, cost) and the current diff
//! is submitted either way. Failures of the infrastructure (sandbox, model endpoint, the
//! environment's setup) are [`AgentError`]s, never trajectories: they are not the model's.
pub mod policy;
pub mod session;
pub mod tools;

use davinci_core::task::TaskInstance;
use davinci_core::traj::{
    Message, Outcome, RunInfo, StepTiming, TRAJ_SCHEMA, TestResults, Trajectory, trajectory_id,
};
use davinci_swebench::{Harness, Status};
use policy::{Policy, PolicyError};
use serde::{Deserialize, Serialize};
use session::Session;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tools::{Action, FormatError};

pub use policy::{ModelTurn, NullPolicy, OpenAiPolicy, ReplayPolicy};

/// Counts the tokens of a conversation with the policy's tokenizer.
pub type ContextCounter = Arc<dyn Fn(&[Message], &[serde_json::Value]) -> u64 + Send + Sync>;

/// Limits and settings of a run.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Model turns, format errors included.
    pub max_steps: u32,
    /// Context tokens: the policy's tokenizer where [`Agent::with_counter`] gave one, else the
    /// server's `usage` of the last call.
    pub context_tokens: u64,
    /// Per-command default; the model may ask for up to `max_command_timeout`.
    #[serde(with = "secs")]
    pub command_timeout: Duration,
    #[serde(with = "secs")]
    pub max_command_timeout: Duration,
    /// The whole run (model calls and commands).
    #[serde(with = "secs")]
    pub wall_time: Duration,
    /// US dollars, priced per million tokens below; `None`: no limit.
    pub max_cost: Option<f64>,
    pub price_per_mtok_input: f64,
    pub price_per_mtok_output: f64,
    pub observation_chars: usize,
    /// Format errors in a row the model is told about before the run ends.
    pub format_retries: u32,
    /// Agent commands get network (off: the task's tests must not need it either).
    pub command_network: bool,
    pub memory_bytes: u64,
    pub max_processes: u64,
}

mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = f64::deserialize(d)?;
        if !(v.is_finite() && v > 0.0) {
            return Err(serde::de::Error::custom(
                "must be a positive number of seconds",
            ));
        }
        Ok(Duration::from_secs_f64(v))
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            max_steps: 100,
            context_tokens: 131_072,
            command_timeout: Duration::from_secs(30),
            max_command_timeout: Duration::from_secs(600),
            wall_time: Duration::from_secs(1800),
            max_cost: None,
            price_per_mtok_input: 0.0,
            price_per_mtok_output: 0.0,
            observation_chars: 100_000,
            format_retries: 3,
            command_network: false,
            memory_bytes: 8 << 30,
            max_processes: 512,
        }
    }
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&serde_json::to_string(self).unwrap_or_default())
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    Submitted,
    StepLimit,
    ContextLimit,
    TimeLimit,
    CostLimit,
    FormatError,
}

impl ExitStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ExitStatus::Submitted => "submitted",
            ExitStatus::StepLimit => "step_limit",
            ExitStatus::ContextLimit => "context_limit",
            ExitStatus::TimeLimit => "time_limit",
            ExitStatus::CostLimit => "cost_limit",
            ExitStatus::FormatError => "format_error",
        }
    }
}

/// An infrastructure failure: the run says nothing about the model and should be retried.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentError {
    #[error("no environment for the task: {0}")]
    Environment(String),
    #[error("environment setup failed: {0}")]
    Setup(String),
    #[error("sandbox failed: {0}")]
    Sandbox(String),
    #[error("{0}")]
    Model(String),
    #[error("grading failed ({status}): {message}")]
    Grading { status: String, message: String },
}

impl AgentError {
    /// Short name for counters.
    pub fn reason(&self) -> &'static str {
        match self {
            AgentError::Environment(_) => "environment",
            AgentError::Setup(_) => "setup",
            AgentError::Sandbox(_) => "sandbox",
            AgentError::Model(_) => "model_unavailable",
            AgentError::Grading { .. } => "grading",
        }
    }

    /// Whether a retry cannot help (the task has no environment here).
    pub fn is_permanent(&self) -> bool {
        matches!(self, AgentError::Environment(_))
    }
}

/// A finished run before grading.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub messages: Vec<Message>,
    pub exit_status: ExitStatus,
    /// `git diff` against the base, test files reverted; empty when nothing changed.
    pub submission: String,
    pub steps: Vec<StepTiming>,
    pub format_errors: BTreeMap<String, u32>,
    /// Prompt + completion tokens of the last call, from the server's usage.
    pub last_usage_tokens: Option<u64>,
    pub cost: f64,
    pub server: Option<serde_json::Value>,
    pub seconds: f64,
}

/// Runs tasks in a sandbox and grades them with the SWE-bench harness.
pub struct Agent {
    harness: Arc<Harness>,
    cfg: AgentConfig,
    counter: Option<ContextCounter>,
}

const SYSTEM_PROMPT: &str = "You are a software engineer working in a Linux shell on a code repository. You have three tools: `bash` runs a command (the working directory and exported variables persist between calls), `str_replace_editor` views and edits files, and `submit` hands in your changes. Call exactly one tool in each response.";

fn instance_prompt(task: &TaskInstance, mount: &str) -> String {
    format!(
        "<uploaded_files>\n{mount}\n</uploaded_files>\nThe repository {repo} is checked out in {mount}. Consider the following issue:\n\n<issue>\n{issue}\n</issue>\n\nMake the smallest changes to the non-test files in {mount} so that the issue is resolved. The tests that check it are already written; you do not need to change or add tests. Steps that work well:\n1. Find and read the code the issue is about.\n2. Write a short script that reproduces the problem and run it with `bash`.\n3. Edit the source to fix it, then run the script again to confirm.\n4. Think about edge cases, then call `submit`.",
        repo = task.repo,
        issue = task.problem_statement.trim(),
    )
}

fn tool_message(id: &str, text: String) -> Message {
    Message {
        role: "tool".into(),
        content: Some(text),
        tool_call_id: Some(id.to_string()),
        ..Default::default()
    }
}

/// The one action of a turn, or why there is none.
fn check_turn(turn: &ModelTurn) -> Result<Action, FormatError> {
    if let Some(bad) = turn.malformed.first() {
        return Err(FormatError::InvalidJson {
            tool: "tool_call".into(),
            error: format!("could not read the call `{}`", tools::truncate(bad, 200)),
        });
    }
    match turn.tool_calls.as_slice() {
        [] => Err(FormatError::NoCall),
        [c] => tools::parse_call(&c.function.name, &c.function.arguments),
        many => Err(FormatError::Multiple(many.len())),
    }
}

impl Agent {
    /// `harness` prepares task environments (the agent's workspace is one, on the harness's
    /// sandbox, which should mount it at `/testbed`) and grades submissions in fresh ones.
    pub fn new(harness: Arc<Harness>, cfg: AgentConfig) -> Agent {
        Agent {
            harness,
            cfg,
            counter: None,
        }
    }

    /// Counts context tokens with the policy's tokenizer instead of the server's usage.
    pub fn with_counter(mut self, counter: ContextCounter) -> Agent {
        self.counter = Some(counter);
        self
    }

    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    /// A session on `task`'s environment (set up, history cut at the base commit), for
    /// callers that drive the tools themselves. Close it when done.
    pub async fn open(&self, task: &TaskInstance) -> Result<Session, AgentError> {
        let ws = self
            .harness
            .open_environment(task)
            .await
            .map_err(|e| match e.status {
                Status::InfraMissingEnvironment => AgentError::Environment(e.message),
                Status::InfraSandboxError => AgentError::Sandbox(e.message),
                _ => AgentError::Setup(e.message),
            })?;
        Session::start(self.harness.sandbox().clone(), ws, self.cfg.clone()).await
    }

    /// Works on `task` until submit or a limit; returns the conversation and the submission.
    pub async fn solve(
        &self,
        task: &TaskInstance,
        policy: &mut dyn Policy,
    ) -> Result<Attempt, AgentError> {
        let mut session = self.open(task).await?;
        let mount = session.mount().to_string();
        let r = self.work(task, policy, &mut session, &mount).await;
        session.close().await;
        r
    }

    async fn work(
        &self,
        task: &TaskInstance,
        policy: &mut dyn Policy,
        session: &mut Session,
        mount: &str,
    ) -> Result<Attempt, AgentError> {
        let t0 = Instant::now();
        let tool_schemas = tools::schemas();
        let mut messages = vec![
            Message {
                role: "system".into(),
                content: Some(SYSTEM_PROMPT.into()),
                ..Default::default()
            },
            Message {
                role: "user".into(),
                content: Some(instance_prompt(task, mount)),
                ..Default::default()
            },
        ];
        let mut steps: Vec<StepTiming> = Vec::new();
        let mut format_errors: BTreeMap<String, u32> = BTreeMap::new();
        let mut in_a_row = 0u32;
        let mut last_usage: Option<u64> = None;
        let mut cost = 0.0f64;
        let mut server: Option<serde_json::Value> = policy.server();
        let exit = loop {
            if steps.len() as u32 >= self.cfg.max_steps {
                break ExitStatus::StepLimit;
            }
            if t0.elapsed() >= self.cfg.wall_time {
                break ExitStatus::TimeLimit;
            }
            if self.cfg.max_cost.is_some_and(|m| cost >= m) {
                break ExitStatus::CostLimit;
            }
            let context = match &self.counter {
                Some(c) => Some(c(&messages, &tool_schemas)),
                None => last_usage,
            };
            if context.is_some_and(|n| n >= self.cfg.context_tokens) {
                break ExitStatus::ContextLimit;
            }
            let turn = match policy.next(&messages, &tool_schemas).await {
                Ok(t) => t,
                Err(PolicyError::ContextOverflow(_)) => break ExitStatus::ContextLimit,
                Err(e @ PolicyError::Unavailable(_)) => {
                    return Err(AgentError::Model(e.to_string()));
                }
            };
            let mut timing = StepTiming {
                model_seconds: turn.seconds,
                attempts: turn.attempts,
                ..Default::default()
            };
            if let Some(u) = &turn.usage {
                timing.prompt_tokens = Some(u.prompt_tokens);
                timing.completion_tokens = Some(u.completion_tokens);
                last_usage = Some(u.prompt_tokens + u.completion_tokens);
                cost += (u.prompt_tokens as f64 * self.cfg.price_per_mtok_input
                    + u.completion_tokens as f64 * self.cfg.price_per_mtok_output)
                    / 1e6;
            }
            if let (Some(s), Some(m)) = (server.as_mut(), &turn.server_model) {
                s["model"] = serde_json::json!(m);
                if let Some(fp) = &turn.system_fingerprint {
                    s["system_fingerprint"] = serde_json::json!(fp);
                }
            }
            let raw_differs = turn.raw_content != turn.content;
            messages.push(Message {
                role: "assistant".into(),
                content: turn.content.clone(),
                tool_calls: turn.tool_calls.clone(),
                raw_content: if raw_differs {
                    turn.raw_content.clone()
                } else {
                    None
                },
                reasoning_content: turn.reasoning_content.clone(),
                ..Default::default()
            });
            let action = match check_turn(&turn) {
                Ok(a) => a,
                Err(e) => {
                    *format_errors.entry(e.reason().to_string()).or_default() += 1;
                    in_a_row += 1;
                    // Every call id needs an answer, or the next request is invalid.
                    if turn.tool_calls.is_empty() {
                        messages.push(Message {
                            role: "user".into(),
                            content: Some(e.to_string()),
                            ..Default::default()
                        });
                    } else {
                        for c in &turn.tool_calls {
                            messages.push(tool_message(&c.id, e.to_string()));
                        }
                    }
                    steps.push(timing);
                    if in_a_row > self.cfg.format_retries {
                        break ExitStatus::FormatError;
                    }
                    continue;
                }
            };
            in_a_row = 0;
            let call_id = turn.tool_calls[0].id.clone();
            let remaining = self.cfg.wall_time.saturating_sub(t0.elapsed());
            let result = match &action {
                Action::Submit => None,
                Action::Bash { command, timeout } => {
                    let asked = timeout
                        .map(Duration::from_secs)
                        .unwrap_or(self.cfg.command_timeout);
                    let wall = asked.min(remaining.max(Duration::from_secs(1)));
                    Some(session.bash(command, Some(wall.as_secs().max(1))).await?)
                }
                Action::Editor(call) => Some(session.edit(call).await?),
            };
            match result {
                None => {
                    messages.push(tool_message(&call_id, "Submitted.".into()));
                    steps.push(timing);
                    break ExitStatus::Submitted;
                }
                Some(r) => {
                    timing.tool_seconds = r.seconds;
                    messages.push(tool_message(&call_id, r.observation));
                    steps.push(timing);
                }
            }
        };
        let submission = session.submission(task).await?;
        Ok(Attempt {
            messages,
            exit_status: exit,
            submission,
            steps,
            format_errors,
            last_usage_tokens: last_usage,
            cost,
            server,
            seconds: t0.elapsed().as_secs_f64(),
        })
    }

    /// [`Agent::solve`], then grades the submission in a fresh workspace with the task's test
    /// patch and tests, and returns the `davinci.traj/v1` record.
    pub async fn run(
        &self,
        task: &TaskInstance,
        policy: &mut dyn Policy,
        rollout_index: u32,
    ) -> Result<Trajectory, AgentError> {
        let t0 = Instant::now();
        let a = self.solve(task, policy).await?;
        let graded = self.harness.grade(task, &a.submission).await;
        if graded.status.is_infra() {
            return Err(AgentError::Grading {
                status: davinci_swebench::harness::status_name(graded.status),
                message: graded.error.unwrap_or_default(),
            });
        }
        let mut tests = BTreeMap::new();
        if let Some(ts) = &graded.report.tests_status {
            for (k, v) in [
                ("FAIL_TO_PASS", &ts.fail_to_pass),
                ("PASS_TO_PASS", &ts.pass_to_pass),
            ] {
                tests.insert(
                    k.to_string(),
                    TestResults {
                        success: v.success.clone(),
                        failure: v.failure.clone(),
                    },
                );
            }
        }
        let tools = tools::schemas();
        let n_tokens = match &self.counter {
            Some(c) => Some(c(&a.messages, &tools)),
            None => a.last_usage_tokens,
        };
        let sampling = policy.sampling();
        let model = policy.model();
        let task_json = serde_json::to_vec(task).expect("a task serializes");
        let mut metadata = BTreeMap::new();
        metadata.insert("repo".into(), serde_json::json!(task.repo));
        metadata.insert("base_commit".into(), serde_json::json!(task.base_commit));
        metadata.insert(
            "grading_status".into(),
            serde_json::json!(davinci_swebench::harness::status_name(graded.status)),
        );
        if a.cost > 0.0 {
            metadata.insert("cost_usd".into(), serde_json::json!(a.cost));
        }
        if !a.format_errors.is_empty() {
            metadata.insert("format_errors".into(), serde_json::json!(a.format_errors));
        }
        Ok(Trajectory {
            schema: TRAJ_SCHEMA.into(),
            id: trajectory_id(
                &task.instance_id,
                &model,
                rollout_index,
                sampling.as_ref().and_then(|s| s.seed),
            ),
            task_id: task.instance_id.clone(),
            model,
            tools,
            messages: a.messages,
            outcome: Outcome {
                resolved: graded.status == Status::Resolved,
                exit_status: a.exit_status.as_str().into(),
                tests,
            },
            n_tokens,
            run: Some(RunInfo {
                policy: policy.kind().into(),
                rollout_index,
                sampling,
                server: a.server,
                chat_template_sha256: policy.chat_template_sha256(),
                task_sha256: davinci_core::hash::sha256_hex(&task_json),
                steps: a.steps,
                submission: a.submission,
                seconds: t0.elapsed().as_secs_f64(),
                format_errors: a.format_errors.values().sum(),
            }),
            metadata,
        })
    }
}
