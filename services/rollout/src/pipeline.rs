//! Rollouts of a set of tasks: K agent runs per task, each graded, written as `davinci.traj/v1`
//! under `trajectories/{pass|fail}/`.
//!
//! A task is one unit of work ([`run_task`]); each finished rollout is stored in the job's
//! work directory under its deterministic id before the next starts, so a task redone after
//! its worker died runs only the rollouts that were not finished. Infrastructure failures (the
//! sandbox, the model endpoint, the environment's setup, the grader) are neither pass nor
//! fail: they are counted by reason and the rollout is tried again, up to `infra_attempts`
//! times, then the task fails and the queue retries it.
use davinci_agent::policy::Policy;
use davinci_agent::{Agent, AgentConfig, NullPolicy, OpenAiPolicy, ReplayPolicy};
use davinci_core::task::TaskInstance;
use davinci_core::traj::{Trajectory, trajectory_id};
use davinci_runtime::blob::{BlobError, BlobStore};
use davinci_runtime::retry::PermanentExt;
use davinci_swebench::{Harness, HarnessConfig};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Where the repository is in an agent's sandbox: the tool schemas say so, as SWE-bench's
/// images have it.
pub const TESTBED: &str = "/testbed";

/// Who drives the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    /// The task's gold patch through the tools: checks the scaffold, no model.
    #[default]
    Replay,
    /// A model behind an OpenAI-compatible endpoint (`llm`).
    Openai,
    /// Submits at once: checks that grading rejects an unchanged repository.
    Null,
}

impl PolicyKind {
    pub fn parse(s: &str) -> anyhow::Result<PolicyKind> {
        match s {
            "replay" => Ok(PolicyKind::Replay),
            "openai" => Ok(PolicyKind::Openai),
            "null" => Ok(PolicyKind::Null),
            other => anyhow::bail!("policy `{other}`: expected replay, openai or null"),
        }
    }
}

/// Everything a rollout job needs; stored in its work directory for the workers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RolloutSettings {
    /// Where `trajectories/` and `stats/rollout.json` go.
    pub out: String,
    pub policy: PolicyKind,
    /// The endpoint and sampling of the `openai` policy.
    pub llm: davinci_llm::ChatConfig,
    /// Rollouts per task (the paper used 4). Rollout `i` samples with `llm.seed + i`.
    pub rollouts_per_task: u32,
    pub agent: AgentConfig,
    /// Which sandbox backend runs the agent and the grader.
    pub sandbox: davinci_sandbox::Backend,
    /// Prepared environments for the local backend: `{repos}/{instance_id}/` or
    /// `{repos}/{owner}__{name}/` (a git clone), as the SWE-bench harness reads them.
    pub repos_dir: Option<PathBuf>,
    pub setup_timeout_secs: u64,
    pub test_timeout_secs: u64,
    /// Network for the environment's setup script (never for the agent's commands or tests
    /// unless `agent.command_network`).
    pub setup_network: bool,
    /// Tries of one rollout that failed for infrastructure reasons before the task is failed.
    pub infra_attempts: u32,
    /// The policy's `tokenizer.json` (a path or a Hub model id): the context limit and each
    /// trajectory's `n_tokens` count the conversation as the Qwen2.5 chat template renders it.
    /// Unset: the server's `usage` (which the replay and null policies have none of).
    pub tokenizer: Option<String>,
    /// Root of the recipe environments the tasks stage built (`{owner}__{name}/{hash}/venv`),
    /// mounted read-only on the local backend (where it exists) so tasks with
    /// `env.recipe_hash` can be graded.
    pub env_root: Option<PathBuf>,
}

impl Default for RolloutSettings {
    fn default() -> Self {
        RolloutSettings {
            out: String::new(),
            policy: PolicyKind::Replay,
            llm: davinci_llm::ChatConfig::default(),
            rollouts_per_task: 1,
            agent: AgentConfig::default(),
            sandbox: davinci_sandbox::Backend::Local(davinci_sandbox::LocalConfig {
                mount_point: TESTBED.into(),
                ..Default::default()
            }),
            repos_dir: None,
            setup_timeout_secs: 1800,
            test_timeout_secs: 1800,
            setup_network: false,
            infra_attempts: 3,
            tokenizer: None,
            env_root: None,
        }
    }
}

impl RolloutSettings {
    /// Refuses settings that cannot work, naming the field.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.out.is_empty(), "out: empty (where trajectories go)");
        anyhow::ensure!(
            (1..=64).contains(&self.rollouts_per_task),
            "rollouts_per_task: {} (expected 1 to 64)",
            self.rollouts_per_task
        );
        anyhow::ensure!(
            self.infra_attempts >= 1,
            "infra_attempts: must be at least 1"
        );
        anyhow::ensure!(
            self.agent.max_steps >= 1,
            "agent.max_steps: must be at least 1"
        );
        anyhow::ensure!(
            self.agent.context_tokens >= 1024,
            "agent.context_tokens: {} is too small to hold the prompt",
            self.agent.context_tokens
        );
        if let davinci_sandbox::Backend::Local(l) = &self.sandbox {
            anyhow::ensure!(
                l.mount_point == std::path::Path::new(TESTBED),
                "sandbox.mount_point: {} (the agent's tools and the replay policy work in {TESTBED}; \
                 leave it unset or set it to {TESTBED})",
                l.mount_point.display()
            );
        }
        if self.policy == PolicyKind::Openai {
            anyhow::ensure!(
                !self.llm.base_url.is_empty(),
                "llm.base_url: the openai policy needs the endpoint (e.g. http://vllm:8000/v1)"
            );
            anyhow::ensure!(
                !self.llm.model.is_empty(),
                "llm.model: the openai policy needs the served model name"
            );
        }
        Ok(())
    }

    /// The model name trajectories record (and their ids hash).
    pub fn model_name(&self) -> String {
        match self.policy {
            PolicyKind::Openai => self.llm.model.clone(),
            PolicyKind::Replay => "replay".into(),
            PolicyKind::Null => "null".into(),
        }
    }

    fn seed(&self, index: u32) -> Option<u64> {
        match self.policy {
            PolicyKind::Openai => self.llm.seed.map(|s| s + index as u64),
            _ => None,
        }
    }
}

/// A built agent with its policy settings, shared by every task of a job.
pub struct Roller {
    agent: Agent,
    settings: RolloutSettings,
    clients: Vec<Arc<davinci_llm::ChatClient>>,
}

impl Roller {
    /// Opens the sandbox backend and, for `openai`, one client per rollout index (its seed),
    /// all sharing the endpoint's concurrency limit.
    pub async fn new(settings: RolloutSettings) -> anyhow::Result<Roller> {
        settings.validate()?;
        let mut backend = settings.sandbox.clone();
        if let (davinci_sandbox::Backend::Local(l), Some(root)) = (&mut backend, &settings.env_root)
            && root.is_dir()
            && !l.ro_binds.contains(root)
        {
            l.ro_binds.push(root.clone());
        }
        let sandbox = davinci_sandbox::open(&backend)
            .await
            .map_err(|e| anyhow::anyhow!("opening the sandbox backend: {e}"))?;
        let harness = Harness::new(
            sandbox,
            HarnessConfig {
                // The grader writes no files here: rollouts grade with Harness::grade.
                out_dir: PathBuf::new(),
                repos_dir: settings.repos_dir.clone(),
                workers: 1,
                setup_timeout: Duration::from_secs(settings.setup_timeout_secs),
                test_timeout: Duration::from_secs(settings.test_timeout_secs),
                setup_network: settings.setup_network,
                memory_bytes: settings.agent.memory_bytes,
                max_processes: settings.agent.max_processes,
                env_root: settings.env_root.clone(),
            },
        );
        let mut clients = Vec::new();
        if settings.policy == PolicyKind::Openai {
            let base = Arc::new(davinci_llm::ChatClient::new(settings.llm.clone())?);
            for i in 0..settings.rollouts_per_task {
                clients.push(match settings.seed(i) {
                    s if s == settings.llm.seed => base.clone(),
                    s => Arc::new(base.with_seed(s)),
                });
            }
        }
        let mut agent = Agent::new(Arc::new(harness), settings.agent.clone());
        if let Some(name) = &settings.tokenizer {
            let tok = davinci_tokenize::Tokenizer::load(name)
                .map_err(|e| anyhow::anyhow!("tokenizer `{name}`: {e}"))?;
            agent = agent.with_counter(Arc::new(move |msgs, tools| {
                davinci_tokenize::chat::render_qwen25_messages(tools, msgs, false)
                    .ok()
                    .and_then(|r| tok.encode(&r.text()).ok())
                    .map_or(0, |ids| ids.len() as u64)
            }));
        }
        Ok(Roller {
            agent,
            settings,
            clients,
        })
    }

    pub fn settings(&self) -> &RolloutSettings {
        &self.settings
    }

    fn policy(&self, task: &TaskInstance, index: u32) -> Box<dyn Policy> {
        match self.settings.policy {
            PolicyKind::Replay => Box::new(ReplayPolicy::new(task, TESTBED)),
            PolicyKind::Null => Box::new(NullPolicy),
            PolicyKind::Openai => Box::new(OpenAiPolicy::new(self.clients[index as usize].clone())),
        }
    }
}

/// One finished rollout as a task's part lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutRef {
    pub id: String,
    pub index: u32,
    /// Key of the trajectory in the work directory.
    pub key: String,
    pub resolved: bool,
    pub exit_status: String,
    pub n_tokens: u64,
}

/// What one task gave: its rollouts and the infrastructure failures met on the way.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskPart {
    pub task_id: String,
    pub rollouts: Vec<RolloutRef>,
    /// Infrastructure failures by reason (each was retried).
    pub infra: BTreeMap<String, u64>,
    /// Rollouts found finished by an earlier worker.
    pub reused: u64,
}

/// `rollouts/{id}.json` in the work directory.
pub fn rollout_key(id: &str) -> String {
    format!("rollouts/{id}.json")
}

/// Runs the rollouts of `task` that `work` does not hold yet, storing each as it finishes.
/// `on_rollout` sees every finished (or reused) trajectory.
pub async fn run_task(
    roller: &Roller,
    task: &TaskInstance,
    work: &dyn BlobStore,
    on_rollout: &(dyn Fn(&Trajectory) + Send + Sync),
) -> anyhow::Result<TaskPart> {
    let s = &roller.settings;
    let model = s.model_name();
    let mut part = TaskPart {
        task_id: task.instance_id.clone(),
        ..Default::default()
    };
    for index in 0..s.rollouts_per_task {
        let id = trajectory_id(&task.instance_id, &model, index, s.seed(index));
        let key = rollout_key(&id);
        let traj: Trajectory = match work.get(&key).await {
            Ok(b) => {
                metrics::counter!("davinci_rollout_reused_total").increment(1);
                part.reused += 1;
                serde_json::from_slice(&b)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", work.uri(&key)))?
            }
            Err(BlobError::NotFound(_)) => {
                let mut tries = 0;
                loop {
                    tries += 1;
                    let mut policy = roller.policy(task, index);
                    match roller.agent.run(task, policy.as_mut(), index).await {
                        Ok(t) => {
                            record_metrics(&t);
                            break t;
                        }
                        Err(e) => {
                            metrics::counter!("davinci_rollout_infra_failures_total", "reason" => e.reason().to_string()).increment(1);
                            *part.infra.entry(e.reason().to_string()).or_default() += 1;
                            tracing::warn!(task = %task.instance_id, index, attempt = tries, error = %e, "rollout failed (infrastructure)");
                            if e.is_permanent() {
                                return Err(anyhow::anyhow!("{}: {e}", task.instance_id))
                                    .permanent();
                            }
                            if tries >= s.infra_attempts {
                                anyhow::bail!(
                                    "{} rollout {index}: {e} ({tries} tries)",
                                    task.instance_id
                                );
                            }
                        }
                    }
                }
            }
            Err(e) => return Err(e.into()),
        };
        if work.head(&key).await?.is_none() {
            work.put(&key, bytes::Bytes::from(serde_json::to_vec(&traj)?))
                .await?;
        }
        on_rollout(&traj);
        part.rollouts.push(RolloutRef {
            id: traj.id.clone(),
            index,
            key,
            resolved: traj.outcome.resolved,
            exit_status: traj.outcome.exit_status.clone(),
            n_tokens: traj.n_tokens.unwrap_or(0),
        });
    }
    Ok(part)
}

/// What a finished rollout tells the dashboard: its outcome, its length in seconds, steps and
/// tokens, and the time each step spent in the model and in the sandbox.
fn record_metrics(t: &Trajectory) {
    let Some(run) = &t.run else { return };
    let policy = run.policy.clone();
    let resolved = if t.outcome.resolved { "true" } else { "false" };
    metrics::counter!("davinci_rollout_rollouts_total", "policy" => policy.clone(), "exit_status" => t.outcome.exit_status.clone(), "resolved" => resolved).increment(1);
    metrics::histogram!("davinci_rollout_duration_seconds", "policy" => policy.clone())
        .record(run.seconds);
    metrics::counter!("davinci_rollout_steps_total", "policy" => policy.clone())
        .increment(run.steps.len() as u64);
    metrics::counter!("davinci_rollout_format_errors_total", "policy" => policy.clone())
        .increment(u64::from(run.format_errors));
    metrics::counter!("davinci_rollout_tokens_total", "policy" => policy.clone())
        .increment(t.n_tokens.unwrap_or(0));
    for step in &run.steps {
        metrics::histogram!("davinci_rollout_step_model_seconds", "policy" => policy.clone())
            .record(step.model_seconds);
        metrics::histogram!("davinci_rollout_step_tool_seconds", "policy" => policy.clone())
            .record(step.tool_seconds);
    }
}

/// `stats/rollout.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub tasks: u64,
    pub rollouts: u64,
    pub pass: u64,
    pub fail: u64,
    pub pass_rate: f64,
    pub exit_status: BTreeMap<String, u64>,
    /// Infrastructure failures by reason; each was retried, none is a pass or a fail.
    pub infra_failures: BTreeMap<String, u64>,
    /// Tasks whose rollouts kept failing for infrastructure reasons (dead-lettered).
    pub failed_tasks: Vec<String>,
    pub tokens: u64,
    pub reused_rollouts: u64,
}

impl Stats {
    pub fn add(&mut self, part: &TaskPart) {
        self.tasks += 1;
        self.reused_rollouts += part.reused;
        for (k, v) in &part.infra {
            *self.infra_failures.entry(k.clone()).or_default() += v;
        }
        for r in &part.rollouts {
            self.rollouts += 1;
            if r.resolved {
                self.pass += 1;
            } else {
                self.fail += 1;
            }
            *self.exit_status.entry(r.exit_status.clone()).or_default() += 1;
            self.tokens += r.n_tokens;
        }
        self.pass_rate = if self.rollouts == 0 {
            0.0
        } else {
            self.pass as f64 / self.rollouts as f64
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A local sandbox that mounts the repository anywhere but /testbed is refused up front:
    /// the tools would look for it where it is not and every rollout would fail.
    #[test]
    fn a_local_sandbox_must_mount_the_repository_at_testbed() {
        let mut s = RolloutSettings {
            out: "/tmp/out".into(),
            ..Default::default()
        };
        s.validate().unwrap();
        s.sandbox = davinci_sandbox::Backend::Local(davinci_sandbox::LocalConfig::default());
        let e = s.validate().unwrap_err().to_string();
        assert!(
            e.contains("sandbox.mount_point: /workspace") && e.contains("/testbed"),
            "{e}"
        );
    }
}
