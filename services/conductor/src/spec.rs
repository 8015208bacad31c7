//! RunSpec: one pipeline run as YAML. Validated whole before any stage starts: unknown keys,
//! wrong types and impossible values are refused with the path of the field.
use davinci_core::pr::RepoMeta;
use davinci_core::sample::SampleSource;
use davinci_proto::v1::{
    CrawlSpec, EvalSpec, PackSpec, ReconstructSpec, RolloutSpec, TasksSpec, TrainSpec,
};
use serde::{Deserialize, Serialize};

/// A refused spec: where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid run spec at `{path}`: {reason}")]
pub struct SpecError {
    pub path: String,
    pub reason: String,
}

fn err(path: impl Into<String>, reason: impl Into<String>) -> SpecError {
    SpecError {
        path: path.into(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// Names the run's directory `runs/{run_id}/`; default: derived from the spec's content,
    /// so submitting the same spec twice reuses (and resumes) the same run.
    #[serde(default)]
    pub run_id: Option<String>,
    /// Storage root; default: the server's `storage.uri`.
    #[serde(default)]
    pub storage: Option<String>,
    pub sources: Sources,
    #[serde(default)]
    pub filters: Filters,
    #[serde(default)]
    pub reconstruct: Reconstruct,
    #[serde(default)]
    pub llm: Llm,
    /// Hugging Face `tokenizer.json` (path or storage URI) for token caps and packing.
    pub tokenizer: String,
    #[serde(default)]
    pub packing: Packing,
    /// Stages and their datasets; default: the paper's stage1 / stage2 / sft.
    #[serde(default)]
    pub mixture: Option<Mixture>,
    /// Executable tasks from the crawled PRs (the tasks stage after reconstruct); absent: no
    /// tasks stage. Left out of the YAML when absent, so run ids of specs without it stay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tasks: Option<Tasks>,
    /// Agent rollouts on executable tasks before pack; their trajectories pack as `env-pass` /
    /// `env-fail`. Serialized as `null` when absent, as the reserved section was, so run ids of
    /// specs without it stay what they were.
    #[serde(default)]
    pub rollout: Option<Rollout>,
    /// The train stage after pack; absent: the run ends with the packed shards.
    #[serde(default)]
    pub training: Option<Training>,
    /// The evaluate stage after train (or, with `model_url`, after pack); absent: no
    /// evaluation. Serialized as `null` when absent, as the reserved section was, so run ids
    /// of specs without it stay what they were.
    #[serde(default)]
    pub evaluation: Option<Evaluation>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sources {
    /// Local paths or clone URLs, each with the `owner/name` its PRs carry where the
    /// repository's `origin` remote cannot tell it.
    pub repos: Vec<RepoSource>,
    /// Enrich PRs from the GitHub API (tokens from GITHUB_TOKEN(S) on the crawler).
    #[serde(default)]
    pub github: bool,
    #[serde(default)]
    pub github_api_url: String,
    /// Only the newest N PRs per repository (0: all).
    #[serde(default)]
    pub max_prs_per_repo: u32,
    /// With `github`: PRs whose metadata one GraphQL query fetches (absent: the crawler's
    /// default, 25; 0: one PR at a time over REST). Left out of the YAML when absent, so
    /// run ids of specs without it stay what they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub github_batch: Option<u32>,
    /// With `github`: also hold every kept PR against the API's commits and files (two or
    /// more REST requests per PR).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub api_cross_check: bool,
}

/// One entry of `sources.repos`: a string, `PATH|URL` or `PATH|URL,name=OWNER/NAME`, or a
/// mapping `{path: PATH|URL, name: OWNER/NAME}`. Without a name, the crawler takes it from the
/// `origin` remote URL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepoSource {
    /// Local path or clone URL.
    pub path: String,
    /// `owner/name` of the repository's PRs.
    pub name: Option<String>,
}

impl RepoSource {
    /// Reads the string form: `PATH|URL`, optionally followed by `,name=OWNER/NAME`.
    pub fn parse(s: &str) -> Self {
        match s.rsplit_once(",name=") {
            Some((path, name)) => Self {
                path: path.to_string(),
                name: Some(name.to_string()),
            },
            None => Self {
                path: s.to_string(),
                name: None,
            },
        }
    }
}

impl From<&str> for RepoSource {
    fn from(s: &str) -> Self {
        Self::parse(s)
    }
}

/// The mapping form of [`RepoSource`].
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RepoMapping {
    path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
}

impl Serialize for RepoSource {
    /// A string when there is no name (so specs without names keep their content hash, and
    /// with it their run id), else the mapping.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.name {
            None => s.serialize_str(&self.path),
            Some(_) => RepoMapping {
                path: self.path.clone(),
                name: self.name.clone(),
            }
            .serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for RepoSource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RepoSource;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a path or clone URL (optionally `,name=owner/name`), or {path, name}")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RepoSource, E> {
                Ok(RepoSource::parse(v))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, m: A) -> Result<RepoSource, A::Error> {
                let r = RepoMapping::deserialize(serde::de::value::MapAccessDeserializer::new(m))?;
                Ok(RepoSource {
                    path: r.path,
                    name: r.name,
                })
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Filters {
    /// `python` (1 to 5 Python files changed) or `general`.
    pub subset: String,
    /// `owner/name` never crawled; empty keeps the crawler's default (SWE-bench Verified).
    pub exclude_repos: Vec<String>,
    pub bot_logins: Vec<String>,
}

impl Default for Filters {
    fn default() -> Self {
        Self {
            subset: "python".into(),
            exclude_repos: Vec::new(),
            bot_logins: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Reconstruct {
    /// ctx-general, ctx-python.
    pub formats: Vec<String>,
    /// Samples over this many tokens are dropped, never truncated.
    pub max_tokens: u32,
    pub near_dup_threshold: f64,
    /// Benchmark files for 13-gram decontamination.
    pub decontamination_files: Vec<String>,
}

impl Default for Reconstruct {
    fn default() -> Self {
        Self {
            formats: vec!["ctx-general".into(), "ctx-python".into()],
            max_tokens: 32_768,
            near_dup_threshold: 0.8,
            decontamination_files: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Llm {
    /// OpenAI-compatible endpoint; empty: deterministic summaries, no LLM calls.
    #[serde(default)]
    pub base_url: String,
    #[serde(default)]
    pub model: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Packing {
    pub seq_len: u32,
    pub seed: u64,
    /// Documents longer than `seq_len`: dropped (counted as `too_long`) or split.
    pub long_docs: LongDocs,
}

impl Default for Packing {
    fn default() -> Self {
        Self {
            seq_len: 32_768,
            seed: 0,
            long_docs: LongDocs::Drop,
        }
    }
}

/// What the packer does with a document longer than `seq_len` (the recipe drops them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LongDocs {
    #[default]
    Drop,
    Split,
}

impl LongDocs {
    pub fn as_str(self) -> &'static str {
        match self {
            LongDocs::Drop => "drop",
            LongDocs::Split => "split",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mixture {
    pub stages: Vec<Stage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    pub name: String,
    /// `all` (mid-training) or `assistant-only` (SFT).
    #[serde(default)]
    pub mask: Option<String>,
    pub datasets: Vec<Dataset>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dataset {
    pub source: SampleSource,
    #[serde(default)]
    pub upsample: Option<f64>,
    #[serde(default)]
    pub weight: Option<f64>,
}

/// Training on the run's packed shards; checkpoints land in `runs/{run}/checkpoints/{step}/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Training {
    /// A Qwen2 `config.json` (fresh weights) or a Hugging Face model directory.
    pub model: String,
    /// `candle` (in-process, the embedded default) or `jobset` (Kubernetes, Megatron-LM).
    #[serde(default = "default_engine")]
    pub engine: String,
    /// Packed bins per optimiser step.
    #[serde(default = "default_global_batch")]
    pub global_batch: u32,
    /// Bins per forward/backward pass; gradients accumulate up to `global_batch`.
    #[serde(default = "default_micro_batch")]
    pub micro_batch: u32,
    #[serde(default)]
    pub seed: u64,
    /// Global gradient-norm clip (0: none).
    #[serde(default = "default_clip")]
    pub clip: f64,
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Schedules per packed stage, in training order; default: every stage, the paper's
    /// mid-training schedule (lr 8e-5, 5% warmup, cosine, 1 epoch) for mask `all` and its SFT
    /// schedule (lr 1e-5, 10% warmup, 5 epochs) for `assistant-only`.
    #[serde(default)]
    pub stages: Vec<TrainStage>,
    /// Engine `jobset` only: the trainer's cluster settings (kind jobset|trainjob, namespace,
    /// image, parallel {nodes, gpus_per_node, tp, pp, …}, data_root, s3_secret, …), passed as
    /// they are; the trainer refuses an unknown field by its path when the stage starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<serde_json::Map<String, serde_json::Value>>,
}

/// The tasks stage: each crawled PR split into code and test patches, its environment built
/// and the task validated by running its tests; kept tasks go to `runs/{run}/tasks/`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tasks {
    /// Git mirrors as `owner/name=PATH`, beside the local `sources.repos` (which are used as
    /// their own mirrors).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repos: Vec<String>,
    /// A directory of mirrors named `owner__name` or `owner__name.git`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repos_dir: Option<String>,
    /// The tasks service's settings for this run (select, env, validate, test_timeout_secs,
    /// jobs, sandbox), laid over its own; the service refuses a bad field by its path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<serde_json::Map<String, serde_json::Value>>,
}

/// The top-level keys of the tasks service's settings.
const TASKS_SETTINGS: [&str; 6] = [
    "select",
    "env",
    "validate",
    "test_timeout_secs",
    "jobs",
    "sandbox",
];

impl Tasks {
    fn validate(&self) -> Result<(), SpecError> {
        for (i, r) in self.repos.iter().enumerate() {
            match r.split_once('=') {
                Some((name, path)) if RepoMeta::is_full_name(name) && !path.trim().is_empty() => {}
                _ => {
                    return Err(err(
                        format!("tasks.repos[{i}]"),
                        format!("`{r}` is not owner/name=PATH"),
                    ));
                }
            }
        }
        if self.repos_dir.as_ref().is_some_and(|d| d.trim().is_empty()) {
            return Err(err("tasks.repos_dir", "empty"));
        }
        for (k, v) in self.settings.iter().flatten() {
            if !TASKS_SETTINGS.contains(&k.as_str()) {
                return Err(err(
                    format!("tasks.settings.{k}"),
                    format!(
                        "unknown setting (expected one of {})",
                        TASKS_SETTINGS.join(", ")
                    ),
                ));
            }
            if matches!(k.as_str(), "jobs" | "test_timeout_secs")
                && v.as_u64().is_none_or(|n| n < 1)
            {
                return Err(err(
                    format!("tasks.settings.{k}"),
                    format!("{v} must be an integer >= 1"),
                ));
            }
        }
        Ok(())
    }
}

impl RunSpec {
    fn has_tasks_stage(&self) -> bool {
        self.tasks.is_some()
    }

    /// The tasks stage's spec: the run's PR shards in, `runs/{run}/` out (`tasks/`,
    /// `stats/tasks.json`); local named `sources.repos` are the mirrors, with `tasks.repos`.
    pub fn tasks_spec(&self, root: &str, run_id: &str) -> Option<TasksSpec> {
        let t = self.tasks.as_ref()?;
        let root = root.trim_end_matches('/');
        let mut repos: Vec<String> = self
            .sources
            .repos
            .iter()
            .filter(|r| !r.path.contains("://") && !r.path.contains('@'))
            .filter_map(|r| Some(format!("{}={}", r.name.as_ref()?, r.path)))
            .collect();
        repos.extend(t.repos.iter().cloned());
        Some(TasksSpec {
            inputs: vec![format!("{root}/runs/{run_id}/prs/")],
            out: format!("{root}/runs/{run_id}"),
            set_format: String::new(),
            repos,
            repos_dir: t.repos_dir.clone().unwrap_or_default(),
            settings_json: t
                .settings
                .as_ref()
                .map(|m| serde_json::Value::Object(m.clone()).to_string())
                .unwrap_or_default(),
        })
    }
}

/// The rollout stage: agents on validated tasks, graded; resolved runs go to
/// `runs/{run}/trajectories/pass/`, the others to `fail/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    /// Task shards or prefixes (paths or storage URIs, `davinci.task` JSONL); absent: the
    /// tasks stage's `runs/{run}/tasks/` (needs `tasks:`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<String>,
    /// replay (the gold patch through the tools; no model), openai (a model behind
    /// `model_url`) or null (submits nothing; checks that grading fails it).
    pub policy: String,
    /// OpenAI-compatible API root of the openai policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Rollouts per task (the paper: 4); rollout `i` samples with `seed + i`.
    #[serde(default = "default_rollouts")]
    pub rollouts_per_task: u32,
    /// Model turns at most (absent: the service's, 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<u32>,
    /// Context tokens at most (absent: 131072).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_tokens: Option<u64>,
    /// Seconds per agent command by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_timeout_s: Option<f64>,
    /// Seconds per rollout at most (model calls and commands).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall_time_s: Option<f64>,
    /// US dollars per rollout at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost: Option<f64>,
    /// Sampling of the openai policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<RolloutSampling>,
    /// Prepared environments on the rollout service (`{dir}/{owner}__{name}/` git clones);
    /// absent: the service's `rollout.repos_dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repos_dir: Option<String>,
}

fn default_rollouts() -> u32 {
    1
}

/// Sampling sent with every model call of the openai policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSampling {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Tokens per model answer at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
}

impl Rollout {
    fn validate(&self, has_tasks_stage: bool, mixture: Option<&Mixture>) -> Result<(), SpecError> {
        if !matches!(self.policy.as_str(), "replay" | "openai" | "null") {
            return Err(err(
                "rollout.policy",
                format!("`{}` is not replay, openai or null", self.policy),
            ));
        }
        match (self.policy.as_str(), &self.model_url, &self.model) {
            ("openai", None, _) => {
                return Err(err(
                    "rollout.model_url",
                    "the openai policy needs an endpoint",
                ));
            }
            ("openai", Some(_), None) => {
                return Err(err(
                    "rollout.model",
                    "the model name the endpoint serves is required with model_url",
                ));
            }
            ("openai", Some(u), Some(_))
                if !u.starts_with("http://") && !u.starts_with("https://") =>
            {
                return Err(err(
                    "rollout.model_url",
                    format!("`{u}` is not an http(s) URL"),
                ));
            }
            ("openai", _, _) => {}
            (p, Some(_), _) | (p, None, Some(_)) => {
                return Err(err(
                    if self.model_url.is_some() {
                        "rollout.model_url"
                    } else {
                        "rollout.model"
                    },
                    format!("the {p} policy drives no model"),
                ));
            }
            _ => {}
        }
        if self.sampling.is_some() && self.policy != "openai" {
            return Err(err("rollout.sampling", "only the openai policy samples"));
        }
        if let Some(s) = &self.sampling {
            if s.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
                return Err(err("rollout.sampling.temperature", "must be in [0, 2]"));
            }
            if s.top_p.is_some_and(|t| !(t > 0.0 && t <= 1.0)) {
                return Err(err("rollout.sampling.top_p", "must be in (0, 1]"));
            }
            if s.max_tokens == Some(0) {
                return Err(err("rollout.sampling.max_tokens", "must be at least 1"));
            }
        }
        if !(1..=64).contains(&self.rollouts_per_task) {
            return Err(err("rollout.rollouts_per_task", "must be in 1..=64"));
        }
        if self.max_steps == Some(0) {
            return Err(err("rollout.max_steps", "must be at least 1"));
        }
        if self.context_tokens == Some(0) {
            return Err(err("rollout.context_tokens", "must be at least 1"));
        }
        for (field, v) in [
            ("command_timeout_s", self.command_timeout_s),
            ("wall_time_s", self.wall_time_s),
            ("max_cost", self.max_cost),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && v > 0.0)
            {
                return Err(err(format!("rollout.{field}"), format!("{v} must be > 0")));
            }
        }
        if self.tasks.is_empty() && !has_tasks_stage {
            return Err(err(
                "rollout.tasks",
                "name task shards, or add a `tasks:` section whose stage builds them",
            ));
        }
        for (i, t) in self.tasks.iter().enumerate() {
            if t.trim().is_empty() {
                return Err(err(format!("rollout.tasks[{i}]"), "empty"));
            }
        }
        if let Some(m) = mixture
            && !m
                .stages
                .iter()
                .flat_map(|s| &s.datasets)
                .any(|d| matches!(d.source, SampleSource::EnvPass | SampleSource::EnvFail))
        {
            return Err(err(
                "rollout",
                "no mixture stage takes env-pass or env-fail, so the trajectories would not be packed",
            ));
        }
        Ok(())
    }

    /// Settings the RolloutSpec has no field for, as the service's settings JSON.
    fn settings_json(&self) -> String {
        let mut v = serde_json::json!({});
        let mut agent = serde_json::Map::new();
        for (k, x) in [
            ("command_timeout", self.command_timeout_s),
            ("wall_time", self.wall_time_s),
            ("max_cost", self.max_cost),
        ] {
            if let Some(x) = x {
                agent.insert(k.into(), x.into());
            }
        }
        if !agent.is_empty() {
            v["agent"] = agent.into();
        }
        if let Some(s) = &self.sampling {
            let mut llm = serde_json::Map::new();
            if let Some(t) = s.temperature {
                llm.insert("temperature".into(), t.into());
            }
            if let Some(t) = s.top_p {
                llm.insert("top_p".into(), t.into());
            }
            if let Some(t) = s.seed {
                llm.insert("seed".into(), t.into());
            }
            if let Some(t) = s.max_tokens {
                llm.insert("max_tokens".into(), t.into());
            }
            if !llm.is_empty() {
                v["llm"] = llm.into();
            }
        }
        if let Some(d) = &self.repos_dir {
            v["repos_dir"] = d.clone().into();
        }
        match v.as_object().is_some_and(|o| o.is_empty()) {
            true => String::new(),
            false => v.to_string(),
        }
    }
}

impl RunSpec {
    /// The rollout stage's spec: the named task shards (or the tasks stage's output) in,
    /// `runs/{run}/` out (`trajectories/{pass|fail}/`, `stats/rollout.json`).
    pub fn rollout_spec(&self, root: &str, run_id: &str) -> Option<RolloutSpec> {
        let r = self.rollout.as_ref()?;
        let root = root.trim_end_matches('/');
        Some(RolloutSpec {
            tasks: match r.tasks.is_empty() {
                true => vec![format!("{root}/runs/{run_id}/tasks/")],
                false => r.tasks.clone(),
            },
            out: format!("{root}/runs/{run_id}"),
            llm_base_url: r.model_url.clone().unwrap_or_default(),
            llm_model: r.model.clone().unwrap_or_default(),
            max_steps: r.max_steps.unwrap_or(0),
            rollouts_per_task: r.rollouts_per_task,
            max_tokens: r.context_tokens.unwrap_or(0),
            policy: r.policy.clone(),
            settings_json: r.settings_json(),
        })
    }
}

/// Benchmarks run against a model: one behind `model_url`, or the run's final checkpoint,
/// served for the stage by the inference target of the conductor's process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Evaluation {
    /// OpenAI-compatible API root (vLLM, SGLang, `davinci serve --target inference`); absent:
    /// the trained checkpoint (needs `training:`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_url: Option<String>,
    /// Model name the endpoint serves (required with `model_url`; the checkpoint is served as
    /// `checkpoint-{step}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub benchmarks: Vec<Benchmark>,
    #[serde(default)]
    pub sampling: EvalSampling,
    /// Requests in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
}

fn default_concurrency() -> u32 {
    4
}

/// One benchmark of the evaluate stage; its outputs go to `runs/{run}/eval/{name}/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Benchmark {
    /// humaneval, humanevalplus, gpqa or scibench.
    pub name: String,
    /// The benchmark's data on the evaluator: HumanEval(+) problems JSONL, the GPQA CSV, or
    /// SciBench's directory.
    pub data: String,
    /// humaneval: base | instruct; gpqa: loglikelihood | generative.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// gpqa generative / scibench: prompts as chat messages.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub chat: bool,
    /// HumanEval samples per problem (n > 1 needs temperature > 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    /// Problems or questions evaluated at most (0: all).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub limit: u32,
    /// SciBench textbooks (empty: all ten).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub books: Vec<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Sampling sent with every request of the stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSampling {
    /// Tokens per answer at most (absent: the benchmark's default, 512 or 1024).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
}

impl Default for EvalSampling {
    fn default() -> Self {
        Self {
            max_tokens: None,
            temperature: 0.0,
            top_p: 1.0,
            seed: 1234,
            stop: Vec::new(),
        }
    }
}

/// The benchmarks the evaluate stage knows.
pub const BENCHMARKS: [&str; 4] = ["humaneval", "humanevalplus", "gpqa", "scibench"];

impl Evaluation {
    fn validate(&self, trains: bool) -> Result<(), SpecError> {
        match (&self.model_url, &self.model) {
            (None, None) if !trains => {
                return Err(err(
                    "evaluation.model_url",
                    "without a `training:` section there is no checkpoint to serve: name the endpoint (model_url and model)",
                ));
            }
            (None, Some(_)) => {
                return Err(err(
                    "evaluation.model",
                    "the served checkpoint names itself; a model name goes with model_url",
                ));
            }
            (Some(_), None) => {
                return Err(err(
                    "evaluation.model",
                    "the model name the endpoint serves is required with model_url (GET {model_url}/models lists them)",
                ));
            }
            (Some(u), Some(m)) => {
                if !u.starts_with("http://") && !u.starts_with("https://") {
                    return Err(err(
                        "evaluation.model_url",
                        format!("`{u}` is not an http(s) URL"),
                    ));
                }
                if m.trim().is_empty() {
                    return Err(err("evaluation.model", "empty"));
                }
            }
            (None, None) => {}
        }
        if self.benchmarks.is_empty() {
            return Err(err(
                "evaluation.benchmarks",
                format!("name at least one of {}", BENCHMARKS.join(", ")),
            ));
        }
        if self.concurrency == 0 {
            return Err(err("evaluation.concurrency", "must be at least 1"));
        }
        let s = &self.sampling;
        if !(0.0..=2.0).contains(&s.temperature) {
            return Err(err("evaluation.sampling.temperature", "must be in [0, 2]"));
        }
        if !(s.top_p > 0.0 && s.top_p <= 1.0) {
            return Err(err("evaluation.sampling.top_p", "must be in (0, 1]"));
        }
        if s.max_tokens == Some(0) {
            return Err(err("evaluation.sampling.max_tokens", "must be at least 1"));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, b) in self.benchmarks.iter().enumerate() {
            let p = format!("evaluation.benchmarks[{i}]");
            if !BENCHMARKS.contains(&b.name.as_str()) {
                return Err(err(
                    format!("{p}.name"),
                    format!("`{}` is not one of {}", b.name, BENCHMARKS.join(", ")),
                ));
            }
            // Each writes runs/{run}/eval/{name}/.
            if !seen.insert(&b.name) {
                return Err(err(
                    format!("{p}.name"),
                    format!("`{}` is listed twice", b.name),
                ));
            }
            if b.data.trim().is_empty() {
                return Err(err(
                    format!("{p}.data"),
                    "the benchmark's data path is required",
                ));
            }
            let formats: &[&str] = match b.name.as_str() {
                "humaneval" | "humanevalplus" => &["base", "instruct"],
                "gpqa" => &["loglikelihood", "generative"],
                _ => &[],
            };
            if let Some(f) = &b.format
                && !formats.contains(&f.as_str())
            {
                return Err(err(
                    format!("{p}.format"),
                    if formats.is_empty() {
                        format!("{} takes no format", b.name)
                    } else {
                        format!("`{f}` is not one of {}", formats.join(", "))
                    },
                ));
            }
            if b.chat && !matches!(b.name.as_str(), "gpqa" | "scibench") {
                return Err(err(
                    format!("{p}.chat"),
                    "only gpqa and scibench choose between chat and completion prompts (humaneval: format instruct)",
                ));
            }
            if let Some(n) = b.n {
                if !b.name.starts_with("humaneval") {
                    return Err(err(format!("{p}.n"), "samples per problem are HumanEval's"));
                }
                if n == 0 {
                    return Err(err(format!("{p}.n"), "must be at least 1"));
                }
                if n > 1 && s.temperature == 0.0 {
                    return Err(err(
                        format!("{p}.n"),
                        "several samples per problem need sampling.temperature > 0",
                    ));
                }
            }
            if !b.books.is_empty() && b.name != "scibench" {
                return Err(err(format!("{p}.books"), "textbooks are SciBench's"));
            }
        }
        Ok(())
    }
}

impl RunSpec {
    /// The evaluate stage's job for benchmark `index` against the endpoint `model_url` serving
    /// `model`; outputs in `runs/{run}/eval/{name}/` (the evaluator writes local storage only).
    pub fn eval_spec(
        &self,
        root: &str,
        run_id: &str,
        index: usize,
        model_url: &str,
        model: &str,
    ) -> Option<EvalSpec> {
        let e = self.evaluation.as_ref()?;
        let b = e.benchmarks.get(index)?;
        let root = root.trim_end_matches('/');
        Some(EvalSpec {
            benchmark: b.name.clone(),
            problems: b.data.clone(),
            out: format!("{root}/runs/{run_id}/eval/{}", b.name),
            model_url: model_url.to_string(),
            model: model.to_string(),
            format: b.format.clone().unwrap_or_default(),
            chat: b.chat,
            n: b.n.unwrap_or(1),
            max_tokens: e.sampling.max_tokens.unwrap_or(0),
            temperature: e.sampling.temperature,
            top_p: e.sampling.top_p,
            seed: Some(e.sampling.seed),
            stop: e.sampling.stop.clone(),
            limit: b.limit,
            concurrency: e.concurrency,
            books: b.books.clone(),
            ..Default::default()
        })
    }
}

fn default_engine() -> String {
    "candle".into()
}
fn default_global_batch() -> u32 {
    8
}
fn default_micro_batch() -> u32 {
    1
}
fn default_clip() -> f64 {
    1.0
}
fn default_checkpoint_every() -> u64 {
    100
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainStage {
    /// A mixture stage name.
    pub name: String,
    /// Peak learning rate.
    pub lr: f64,
    #[serde(default)]
    pub warmup_ratio: Option<f64>,
    /// Cosine floor as a fraction of `lr` (default 0.1).
    #[serde(default)]
    pub min_lr_ratio: Option<f64>,
    #[serde(default)]
    pub epochs: Option<u32>,
    #[serde(default)]
    pub max_steps: Option<u64>,
}

impl Training {
    fn validate(&self, mixture_stages: &[String]) -> Result<(), SpecError> {
        if self.model.trim().is_empty() {
            return Err(err(
                "training.model",
                "a Qwen2 config.json or Hugging Face model directory is required",
            ));
        }
        if !matches!(self.engine.as_str(), "candle" | "jobset") {
            return Err(err(
                "training.engine",
                format!("`{}` is not candle or jobset", self.engine),
            ));
        }
        if self.cluster.is_some() && self.engine != "jobset" {
            return Err(err(
                "training.cluster",
                format!(
                    "only engine jobset runs on a cluster (engine is `{}`)",
                    self.engine
                ),
            ));
        }
        if self.global_batch == 0 {
            return Err(err("training.global_batch", "must be > 0"));
        }
        if self.micro_batch == 0 || self.micro_batch > self.global_batch {
            return Err(err(
                "training.micro_batch",
                format!("must be in 1..={}", self.global_batch),
            ));
        }
        if !(self.clip >= 0.0 && self.clip.is_finite()) {
            return Err(err("training.clip", "must be >= 0"));
        }
        if self.checkpoint_every == 0 {
            return Err(err("training.checkpoint_every", "must be > 0"));
        }
        for (i, s) in self.stages.iter().enumerate() {
            let p = format!("training.stages[{i}]");
            if !mixture_stages.contains(&s.name) {
                return Err(err(
                    format!("{p}.name"),
                    format!(
                        "`{}` is not a mixture stage ({})",
                        s.name,
                        mixture_stages.join(", ")
                    ),
                ));
            }
            if !(s.lr > 0.0 && s.lr.is_finite()) {
                return Err(err(format!("{p}.lr"), "must be > 0"));
            }
            if s.warmup_ratio.is_some_and(|w| !(0.0..1.0).contains(&w)) {
                return Err(err(format!("{p}.warmup_ratio"), "must be in [0, 1)"));
            }
            if s.min_lr_ratio.is_some_and(|w| !(0.0..=1.0).contains(&w)) {
                return Err(err(format!("{p}.min_lr_ratio"), "must be in [0, 1]"));
            }
            if s.epochs == Some(0) {
                return Err(err(format!("{p}.epochs"), "must be > 0"));
            }
        }
        Ok(())
    }

    /// The trainer's config JSON (absent fields take the trainer's defaults).
    fn config_json(&self) -> serde_json::Value {
        let stages: Vec<serde_json::Value> = self
            .stages
            .iter()
            .map(|s| {
                let mut o = serde_json::json!({ "name": s.name, "lr": s.lr });
                for (k, v) in [
                    ("warmup_ratio", s.warmup_ratio),
                    ("min_lr_ratio", s.min_lr_ratio),
                ] {
                    if let Some(v) = v {
                        o[k] = v.into();
                    }
                }
                if let Some(e) = s.epochs {
                    o["epochs"] = e.into();
                }
                if let Some(m) = s.max_steps {
                    o["max_steps"] = m.into();
                }
                o
            })
            .collect();
        let mut c = serde_json::json!({
            "stages": stages,
            "global_batch": self.global_batch,
            "micro_batch": self.micro_batch,
            "seed": self.seed,
            "clip": self.clip,
            "checkpoint_every": self.checkpoint_every,
        });
        if let Some(cluster) = &self.cluster {
            c["cluster"] = cluster.clone().into();
        }
        c
    }
}

impl RunSpec {
    /// Parses YAML and validates; errors name the field.
    pub fn parse(yaml: &str) -> Result<Self, SpecError> {
        let de = serde_norway::Deserializer::from_str(yaml);
        let spec: RunSpec = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            err(
                if path == "." { "<root>".into() } else { path },
                e.into_inner().to_string(),
            )
        })?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn to_yaml(&self) -> String {
        serde_norway::to_string(self).unwrap_or_default()
    }

    /// The run id: the given one, else a content hash of the spec.
    pub fn resolved_run_id(&self) -> String {
        match &self.run_id {
            Some(id) => id.clone(),
            None => format!(
                "run-{}",
                &davinci_core::hash::sha256_hex(self.to_yaml())[..12]
            ),
        }
    }

    /// Mixture stage names: the spec's, or the packer's default stage1 / stage2 / sft.
    fn stage_names(&self) -> Vec<String> {
        match &self.mixture {
            Some(m) => m.stages.iter().map(|s| s.name.clone()).collect(),
            None => ["stage1", "stage2", "sft"].map(String::from).to_vec(),
        }
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        if let Some(t) = &self.training {
            t.validate(&self.stage_names())?;
        }
        if let Some(e) = &self.evaluation {
            e.validate(self.training.is_some())?;
        }
        if let Some(t) = &self.tasks {
            t.validate()?;
        }
        if let Some(r) = &self.rollout {
            r.validate(self.has_tasks_stage(), self.mixture.as_ref())?;
        }
        if let Some(id) = &self.run_id
            && (id.is_empty()
                || id.len() > 64
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        {
            return Err(err(
                "run_id",
                format!("`{id}` must be 1 to 64 characters of [A-Za-z0-9_-]"),
            ));
        }
        if let Some(s) = &self.storage
            && !(s.starts_with("file://") || s.starts_with("s3://"))
        {
            return Err(err(
                "storage",
                format!("`{s}` must start with file:// or s3://"),
            ));
        }
        if self.sources.repos.is_empty() {
            return Err(err(
                "sources.repos",
                "at least one repository path or clone URL is required",
            ));
        }
        for (i, r) in self.sources.repos.iter().enumerate() {
            if r.path.trim().is_empty() {
                return Err(err(format!("sources.repos[{i}]"), "empty"));
            }
            if let Some(n) = &r.name
                && !RepoMeta::is_full_name(n)
            {
                return Err(err(
                    format!("sources.repos[{i}].name"),
                    format!("`{n}` is not owner/name"),
                ));
            }
        }
        if self.sources.api_cross_check && !self.sources.github {
            return Err(err(
                "sources.api_cross_check",
                "cross-checking against the API needs `github: true`",
            ));
        }
        // The crawler's limit on PRs per GraphQL query.
        if let Some(n) = self.sources.github_batch
            && n > 100
        {
            return Err(err(
                "sources.github_batch",
                format!("{n} PRs per GraphQL query is more than 100"),
            ));
        }
        if !matches!(self.filters.subset.as_str(), "python" | "general") {
            return Err(err(
                "filters.subset",
                format!("`{}` is not python or general", self.filters.subset),
            ));
        }
        for (i, r) in self.filters.exclude_repos.iter().enumerate() {
            if !RepoMeta::is_full_name(r) {
                return Err(err(
                    format!("filters.exclude_repos[{i}]"),
                    format!("`{r}` is not owner/name"),
                ));
            }
        }
        if self.reconstruct.formats.is_empty() {
            return Err(err(
                "reconstruct.formats",
                "name at least one of ctx-general, ctx-python",
            ));
        }
        for (i, f) in self.reconstruct.formats.iter().enumerate() {
            if !matches!(f.as_str(), "ctx-general" | "ctx-python") {
                return Err(err(
                    format!("reconstruct.formats[{i}]"),
                    format!("`{f}` is not ctx-general or ctx-python"),
                ));
            }
        }
        if self.reconstruct.max_tokens == 0 {
            return Err(err("reconstruct.max_tokens", "must be at least 1"));
        }
        let t = self.reconstruct.near_dup_threshold;
        if t.is_nan() || t <= 0.0 || t > 1.0 {
            return Err(err(
                "reconstruct.near_dup_threshold",
                format!("{t} is not within (0, 1]"),
            ));
        }
        if self.llm.base_url.is_empty() != self.llm.model.is_empty() {
            return Err(err("llm", "base_url and model go together"));
        }
        let url = &self.llm.base_url;
        if !url.is_empty() && !url.starts_with("http://") && !url.starts_with("https://") {
            return Err(err(
                "llm.base_url",
                format!("`{}` is not an http(s) URL", self.llm.base_url),
            ));
        }
        if self.tokenizer.trim().is_empty() {
            return Err(err(
                "tokenizer",
                "a tokenizer.json path or storage URI is required",
            ));
        }
        if !(16..=1 << 20).contains(&self.packing.seq_len) {
            return Err(err(
                "packing.seq_len",
                format!("{} is not within 16..=1048576", self.packing.seq_len),
            ));
        }
        if let Some(m) = &self.mixture {
            if m.stages.is_empty() {
                return Err(err("mixture.stages", "at least one stage is required"));
            }
            let mut names = std::collections::BTreeSet::new();
            for (i, s) in m.stages.iter().enumerate() {
                let p = format!("mixture.stages[{i}]");
                if s.name.is_empty()
                    || !s
                        .name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                {
                    return Err(err(
                        format!("{p}.name"),
                        format!("`{}` must be non-empty [A-Za-z0-9_-]", s.name),
                    ));
                }
                if !names.insert(&s.name) {
                    return Err(err(
                        format!("{p}.name"),
                        format!("`{}` is repeated", s.name),
                    ));
                }
                if let Some(mask) = &s.mask
                    && !matches!(mask.as_str(), "all" | "assistant-only")
                {
                    return Err(err(
                        format!("{p}.mask"),
                        format!("`{mask}` is not all or assistant-only"),
                    ));
                }
                if s.datasets.is_empty() {
                    return Err(err(
                        format!("{p}.datasets"),
                        "at least one dataset is required",
                    ));
                }
                let mut seen = std::collections::BTreeSet::new();
                for (j, d) in s.datasets.iter().enumerate() {
                    let dp = format!("{p}.datasets[{j}]");
                    if !seen.insert(d.source) {
                        return Err(err(
                            format!("{dp}.source"),
                            format!("{} is listed twice", d.source.as_str()),
                        ));
                    }
                    for (field, v) in [("upsample", d.upsample), ("weight", d.weight)] {
                        if let Some(v) = v
                            && !(v.is_finite() && v > 0.0)
                        {
                            return Err(err(format!("{dp}.{field}"), format!("{v} must be > 0")));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    pub fn crawl_spec(&self, root: &str) -> CrawlSpec {
        CrawlSpec {
            repos: self.sources.repos.iter().map(|r| r.path.clone()).collect(),
            repo_names: self
                .sources
                .repos
                .iter()
                .filter_map(|r| Some((r.path.clone(), r.name.clone()?)))
                .collect(),
            github: self.sources.github,
            github_api_url: self.sources.github_api_url.clone(),
            out: root.to_string(),
            subset: self.filters.subset.clone(),
            exclude_repos: self.filters.exclude_repos.clone(),
            max_prs_per_repo: self.sources.max_prs_per_repo,
            github_batch: self.sources.github_batch,
            api_cross_check: self.sources.api_cross_check,
            bot_logins: self.filters.bot_logins.clone(),
            ..Default::default()
        }
    }

    pub fn reconstruct_spec(&self, root: &str, run_id: &str) -> ReconstructSpec {
        ReconstructSpec {
            inputs: vec![format!("{}/runs/{run_id}/prs/", root.trim_end_matches('/'))],
            out: format!("{}/runs/{run_id}", root.trim_end_matches('/')),
            formats: self.reconstruct.formats.clone(),
            max_tokens: self.reconstruct.max_tokens,
            tokenizer: self.tokenizer.clone(),
            llm_base_url: self.llm.base_url.clone(),
            llm_model: self.llm.model.clone(),
            near_dup_threshold: self.reconstruct.near_dup_threshold,
            decontamination_files: self.reconstruct.decontamination_files.clone(),
        }
    }

    pub fn pack_spec(&self, root: &str, run_id: &str) -> PackSpec {
        let root = root.trim_end_matches('/');
        PackSpec {
            inputs: self
                .reconstruct
                .formats
                .iter()
                .map(|f| format!("{root}/runs/{run_id}/samples/{f}/"))
                .chain(
                    self.rollout
                        .as_ref()
                        .map(|_| format!("{root}/runs/{run_id}/trajectories/")),
                )
                .collect(),
            out: format!("{root}/runs/{run_id}/packed"),
            tokenizer: self.tokenizer.clone(),
            seq_len: self.packing.seq_len,
            mixture_json: self
                .mixture
                .as_ref()
                .map(|m| serde_json::to_string(&mixture_json(m)).unwrap_or_default())
                .unwrap_or_default(),
            seed: self.packing.seed,
            long_docs: self.packing.long_docs.as_str().into(),
        }
    }
}

impl RunSpec {
    /// The train stage's spec: the run's packed manifest in, `runs/{run}/` out (checkpoints in
    /// `checkpoints/{step}/`); `None` without a `training:` section.
    pub fn train_spec(&self, root: &str, run_id: &str) -> Option<TrainSpec> {
        let t = self.training.as_ref()?;
        let root = root.trim_end_matches('/');
        Some(TrainSpec {
            data: format!("{root}/runs/{run_id}/packed/manifest.json"),
            out: format!("{root}/runs/{run_id}"),
            model: t.model.clone(),
            engine: t.engine.clone(),
            config_json: t.config_json().to_string(),
            ..Default::default()
        })
    }
}

/// The packer's mixture JSON (absent fields take the packer's defaults).
fn mixture_json(m: &Mixture) -> serde_json::Value {
    let stages: Vec<serde_json::Value> = m
        .stages
        .iter()
        .map(|s| {
            let datasets: Vec<serde_json::Value> = s
                .datasets
                .iter()
                .map(|d| {
                    let mut o = serde_json::json!({ "source": d.source.as_str() });
                    if let Some(u) = d.upsample {
                        o["upsample"] = u.into();
                    }
                    if let Some(w) = d.weight {
                        o["weight"] = w.into();
                    }
                    o
                })
                .collect();
            let mut o = serde_json::json!({ "name": s.name, "datasets": datasets });
            if let Some(mask) = &s.mask {
                o["mask"] = mask.clone().into();
            }
            o
        })
        .collect();
    serde_json::json!({ "stages": stages })
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = "sources:\n  repos: [/src/cachetools]\ntokenizer: tok.json\npacking:\n  seq_len: 4096\nmixture:\n  stages:\n    - name: stage1\n      datasets: [{source: ctx-general}]\n    - name: stage2\n      datasets: [{source: ctx-python}, {source: env-pass, upsample: 3}]\n";

    #[test]
    fn valid_spec_and_derived_stage_specs() {
        let s = RunSpec::parse(OK).unwrap();
        let id = s.resolved_run_id();
        assert!(id.starts_with("run-"));
        assert_eq!(
            id,
            RunSpec::parse(OK).unwrap().resolved_run_id(),
            "same spec, same run"
        );
        let r = s.reconstruct_spec("file:///d", &id);
        assert_eq!(r.inputs, vec![format!("file:///d/runs/{id}/prs/")]);
        let p = s.pack_spec("file:///d", &id);
        assert_eq!(p.seq_len, 4096);
        assert_eq!(p.long_docs, "drop", "the recipe drops over-long documents");
        let split =
            RunSpec::parse(&OK.replace("seq_len: 4096", "seq_len: 4096\n  long_docs: split"))
                .unwrap();
        assert_eq!(split.pack_spec("file:///d", &id).long_docs, "split");
        let m: serde_json::Value = serde_json::from_str(&p.mixture_json).unwrap();
        assert_eq!(m["stages"][1]["datasets"][1]["upsample"], 3.0);
        assert!(s.train_spec("file:///d", &id).is_none());
    }

    #[test]
    fn example_specs_are_valid() {
        for (name, text) in [
            (
                "quickstart",
                include_str!("../../../deploy/examples/quickstart.yaml"),
            ),
            (
                "quickstart-train",
                include_str!("../../../deploy/examples/quickstart-train.yaml"),
            ),
            ("loop", include_str!("../../../deploy/examples/loop.yaml")),
        ] {
            let s = RunSpec::parse(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(s.training.is_some(), name != "quickstart");
            assert_eq!(s.evaluation.is_some(), name == "loop");
        }
    }

    #[test]
    fn training_section() {
        let y = format!(
            "{OK}training:\n  model: deploy/examples/tiny-qwen2.json\n  global_batch: 4\n  stages:\n    - {{name: stage1, lr: 8.0e-5, warmup_ratio: 0.05, epochs: 1}}\n"
        );
        let s = RunSpec::parse(&y).unwrap();
        let t = s.train_spec("file:///d", "r1").unwrap();
        assert_eq!(t.data, "file:///d/runs/r1/packed/manifest.json");
        assert_eq!(t.out, "file:///d/runs/r1");
        assert_eq!(t.engine, "candle");
        let c: serde_json::Value = serde_json::from_str(&t.config_json).unwrap();
        assert_eq!(c["global_batch"], 4);
        assert_eq!(c["stages"][0]["lr"], 8e-5);
        assert_eq!(c["stages"][0]["warmup_ratio"], 0.05);
        assert!(c["stages"][0].get("max_steps").is_none());
        let bad = |from: &str, to: &str| RunSpec::parse(&y.replace(from, to)).unwrap_err().path;
        assert_eq!(
            bad("name: stage1, lr", "name: sft, lr"),
            "training.stages[0].name"
        );
        assert_eq!(bad("lr: 8.0e-5", "lr: 0"), "training.stages[0].lr");
        assert_eq!(
            bad("warmup_ratio: 0.05", "warmup_ratio: 1.5"),
            "training.stages[0].warmup_ratio"
        );
        assert_eq!(
            bad("global_batch: 4", "global_batch: 4\n  micro_batch: 8"),
            "training.micro_batch"
        );
        assert_eq!(
            bad("global_batch: 4", "global_batch: 4\n  engine: torch"),
            "training.engine"
        );
        assert_eq!(
            bad("global_batch: 4", "global_batch: 4\n  lr: 1"),
            "training.lr"
        );
        let cluster = "global_batch: 4\n  cluster: {namespace: gpu, parallel: {nodes: 8, gpus_per_node: 8, tp: 8, pp: 4}}";
        assert_eq!(
            bad("global_batch: 4", cluster),
            "training.cluster",
            "a cluster section needs engine jobset"
        );
        let on_cluster =
            RunSpec::parse(&y.replace("global_batch: 4", &format!("{cluster}\n  engine: jobset")))
                .unwrap();
        let t = on_cluster.train_spec("s3://b/p", "r1").unwrap();
        let c: serde_json::Value = serde_json::from_str(&t.config_json).unwrap();
        assert_eq!(t.engine, "jobset");
        assert_eq!(c["cluster"]["namespace"], "gpu");
        assert_eq!(c["cluster"]["parallel"]["pp"], 4);
    }

    #[test]
    fn evaluation_section() {
        let training = "training:\n  model: tiny.json\n";
        let eval = "evaluation:\n  benchmarks:\n    - {name: humaneval, data: he.jsonl, format: instruct}\n    - {name: gpqa, data: g.csv, limit: 2}\n  sampling: {max_tokens: 32, seed: 7}\n";
        let y = format!("{OK}{training}{eval}");
        let s = RunSpec::parse(&y).unwrap();
        assert_eq!(
            crate::orchestrate::stages(&s),
            ["crawl", "reconstruct", "pack", "train", "evaluate"]
        );
        let e = s
            .eval_spec(
                "file:///d",
                "r1",
                1,
                "http://127.0.0.1:9/v1",
                "checkpoint-3",
            )
            .unwrap();
        assert_eq!(e.benchmark, "gpqa");
        assert_eq!(e.problems, "g.csv");
        assert_eq!(e.out, "file:///d/runs/r1/eval/gpqa");
        assert_eq!(
            (e.model_url.as_str(), e.model.as_str()),
            ("http://127.0.0.1:9/v1", "checkpoint-3")
        );
        assert_eq!(
            (e.limit, e.max_tokens, e.seed, e.top_p, e.concurrency),
            (2, 32, Some(7), 1.0, 4)
        );
        let h = s.eval_spec("file:///d", "r1", 0, "u", "m").unwrap();
        assert_eq!((h.format.as_str(), h.n), ("instruct", 1));
        assert!(s.eval_spec("file:///d", "r1", 2, "u", "m").is_none());
        // Specs without the section keep their run id: it serializes as before.
        assert!(
            RunSpec::parse(OK)
                .unwrap()
                .to_yaml()
                .contains("evaluation: null")
        );

        // Without training there is no checkpoint: the endpoint must be named.
        assert_eq!(path_of(&format!("{OK}{eval}")), "evaluation.model_url");
        let remote = eval.replace(
            "evaluation:\n",
            "evaluation:\n  model_url: http://gpu:8000/v1\n  model: qwen\n",
        );
        let s = RunSpec::parse(&format!("{OK}{remote}")).unwrap();
        assert_eq!(
            crate::orchestrate::stages(&s),
            ["crawl", "reconstruct", "pack", "evaluate"]
        );
        let bad = |from: &str, to: &str| path_of(&y.replace(from, to));
        assert_eq!(
            path_of(&format!("{OK}{}", remote.replace("  model: qwen\n", ""))),
            "evaluation.model"
        );
        assert_eq!(
            path_of(&format!("{OK}{}", remote.replace("http://gpu", "gpu"))),
            "evaluation.model_url"
        );
        assert_eq!(
            bad("name: gpqa", "name: mmlu"),
            "evaluation.benchmarks[1].name"
        );
        assert_eq!(
            bad("name: gpqa", "name: humaneval"),
            "evaluation.benchmarks[1].name"
        );
        assert_eq!(
            bad("format: instruct", "format: chat"),
            "evaluation.benchmarks[0].format"
        );
        assert_eq!(
            bad("data: g.csv", "data: ''"),
            "evaluation.benchmarks[1].data"
        );
        assert_eq!(
            bad("limit: 2", "limit: 2, n: 4"),
            "evaluation.benchmarks[1].n"
        );
        assert_eq!(
            bad("format: instruct", "format: base, n: 4"),
            "evaluation.benchmarks[0].n"
        );
        assert_eq!(
            bad("limit: 2", "limit: 2, chat: true, books: [atkins]"),
            "evaluation.benchmarks[1].books"
        );
        assert_eq!(
            bad("format: instruct", "format: base, chat: true"),
            "evaluation.benchmarks[0].chat"
        );
        assert_eq!(
            bad("seed: 7", "seed: 7, top_p: 0"),
            "evaluation.sampling.top_p"
        );
        assert_eq!(
            bad("seed: 7", "seed: 7, temperature: 3"),
            "evaluation.sampling.temperature"
        );
        assert_eq!(
            bad("seed: 7", "seed: 7, beams: 3"),
            "evaluation.sampling.beams"
        );
        assert_eq!(
            bad("limit: 2}", "limit: 2}\n  concurrency: 0"),
            "evaluation.concurrency"
        );
        assert_eq!(
            path_of(&format!("{OK}{training}evaluation:\n  benchmarks: []\n")),
            "evaluation.benchmarks"
        );
        assert_eq!(
            path_of(&format!(
                "{OK}{training}{}",
                eval.replace("evaluation:\n", "evaluation:\n  model: qwen\n")
            )),
            "evaluation.model"
        );
    }

    #[test]
    fn tasks_and_rollout_sections() {
        let y = format!(
            "{OK}tasks:\n  repos: ['acme/w=/m/w.git']\n  settings: {{jobs: 2, validate: {{runs: 1}}}}\nrollout:\n  policy: openai\n  model_url: http://vllm:8000/v1\n  model: qwen\n  rollouts_per_task: 4\n  max_steps: 30\n  wall_time_s: 600\n  sampling: {{temperature: 0.7, seed: 3}}\n"
        )
        .replace("repos: [/src/cachetools]", "repos: ['/src/c,name=acme/c', 'https://github.com/a/b']");
        let s = RunSpec::parse(&y).unwrap();
        assert_eq!(
            crate::orchestrate::stages(&s),
            ["crawl", "reconstruct", "tasks", "rollout", "pack"]
        );
        let t = s.tasks_spec("file:///d", "r1").unwrap();
        assert_eq!(t.inputs, ["file:///d/runs/r1/prs/"]);
        assert_eq!(t.out, "file:///d/runs/r1");
        assert_eq!(
            t.repos,
            ["acme/c=/src/c", "acme/w=/m/w.git"],
            "local sources are mirrors"
        );
        let st: serde_json::Value = serde_json::from_str(&t.settings_json).unwrap();
        assert_eq!(st["validate"]["runs"], 1);
        let r = s.rollout_spec("file:///d", "r1").unwrap();
        assert_eq!(
            r.tasks,
            ["file:///d/runs/r1/tasks/"],
            "the tasks stage's output"
        );
        assert_eq!(r.out, "file:///d/runs/r1");
        assert_eq!(
            (r.policy.as_str(), r.llm_model.as_str()),
            ("openai", "qwen")
        );
        assert_eq!((r.rollouts_per_task, r.max_steps, r.max_tokens), (4, 30, 0));
        let st: serde_json::Value = serde_json::from_str(&r.settings_json).unwrap();
        assert_eq!(st["agent"]["wall_time"], 600.0);
        assert_eq!(st["llm"]["temperature"], 0.7);
        assert_eq!(st["llm"]["seed"], 3);
        let p = s.pack_spec("file:///d", "r1");
        assert_eq!(p.inputs.last().unwrap(), "file:///d/runs/r1/trajectories/");
        // Specs without the sections keep their run id.
        let plain = RunSpec::parse(OK).unwrap().to_yaml();
        assert!(
            plain.contains("rollout: null") && !plain.contains("tasks:"),
            "{plain}"
        );

        let bad = |from: &str, to: &str| path_of(&y.replace(from, to));
        assert_eq!(bad("policy: openai", "policy: random"), "rollout.policy");
        assert_eq!(bad("  model: qwen\n", ""), "rollout.model");
        assert_eq!(bad("http://vllm", "vllm"), "rollout.model_url");
        assert_eq!(bad("policy: openai", "policy: replay"), "rollout.model_url");
        assert_eq!(
            bad("rollouts_per_task: 4", "rollouts_per_task: 65"),
            "rollout.rollouts_per_task"
        );
        assert_eq!(bad("max_steps: 30", "max_steps: 0"), "rollout.max_steps");
        assert_eq!(
            bad("wall_time_s: 600", "wall_time_s: -1"),
            "rollout.wall_time_s"
        );
        assert_eq!(
            bad("temperature: 0.7", "temperature: 9"),
            "rollout.sampling.temperature"
        );
        assert_eq!(bad("seed: 3", "seeds: 3"), "rollout.sampling.seeds");
        assert_eq!(bad("acme/w=/m/w.git", "/m/w.git"), "tasks.repos[0]");
        assert_eq!(bad("jobs: 2", "jobs: 0"), "tasks.settings.jobs");
        assert_eq!(bad("jobs: 2", "workers: 2"), "tasks.settings.workers");
        // Without a tasks stage the rollout names its tasks.
        let no_tasks = y.replace(
            "tasks:\n  repos: ['acme/w=/m/w.git']\n  settings: {jobs: 2, validate: {runs: 1}}\n",
            "",
        );
        assert_eq!(path_of(&no_tasks), "rollout.tasks");
        let named =
            RunSpec::parse(&no_tasks.replace("rollout:\n", "rollout:\n  tasks: [s3://b/tasks/]\n"))
                .unwrap();
        assert_eq!(
            named.rollout_spec("file:///d", "r").unwrap().tasks,
            ["s3://b/tasks/"]
        );
        // A mixture that packs no trajectories would drop them.
        assert_eq!(
            path_of(&y.replace("{source: env-pass, upsample: 3}", "{source: ctx-general}")),
            "rollout"
        );
    }

    #[test]
    fn repositories_take_a_name_as_a_string_or_a_mapping() {
        let yaml = OK.replace(
            "repos: [/src/cachetools]",
            "repos:\n    - /src/cachetools\n    - /m/widgets.git,name=acme/widgets\n    - {path: /m/g.git, name: acme/gadgets}",
        );
        let s = RunSpec::parse(&yaml).unwrap();
        let want = [
            RepoSource::parse("/src/cachetools"),
            RepoSource {
                path: "/m/widgets.git".into(),
                name: Some("acme/widgets".into()),
            },
            RepoSource {
                path: "/m/g.git".into(),
                name: Some("acme/gadgets".into()),
            },
        ];
        assert_eq!(s.sources.repos, want);
        assert_eq!(RunSpec::parse(&s.to_yaml()).unwrap(), s, "round trip");
        let c = s.crawl_spec("file:///d");
        assert_eq!(c.repos, ["/src/cachetools", "/m/widgets.git", "/m/g.git"]);
        assert_eq!(c.repo_names.len(), 2);
        assert_eq!(c.repo_names["/m/g.git"], "acme/gadgets");
        assert_eq!((c.github_batch, c.api_cross_check), (None, false));
        // A spec without names keeps its run id: unnamed repositories serialize as strings.
        assert!(
            RunSpec::parse(OK)
                .unwrap()
                .to_yaml()
                .contains("- /src/cachetools")
        );
    }

    #[test]
    fn crawl_batching_and_cross_check_reach_the_crawl_spec() {
        let with = |extra: &str| OK.replace("sources:\n", &format!("sources:\n{extra}"));
        let s = RunSpec::parse(&with(
            "  github: true\n  github_batch: 10\n  api_cross_check: true\n",
        ))
        .unwrap();
        let c = s.crawl_spec("file:///d");
        assert_eq!((c.github_batch, c.api_cross_check), (Some(10), true));
        let c = RunSpec::parse(&with("  github: true\n  github_batch: 0\n"))
            .unwrap()
            .crawl_spec("file:///d");
        assert_eq!(c.github_batch, Some(0), "0: one PR at a time");
        assert_eq!(
            path_of(&with("  api_cross_check: true\n")),
            "sources.api_cross_check"
        );
        assert_eq!(
            path_of(&with("  github: true\n  github_batch: 500\n")),
            "sources.github_batch"
        );
        // Specs that do not say keep their run id.
        assert!(
            !RunSpec::parse(OK)
                .unwrap()
                .to_yaml()
                .contains("github_batch")
        );
    }

    fn path_of(yaml: &str) -> String {
        RunSpec::parse(yaml).unwrap_err().path
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            path_of(&OK.replace("seq_len: 4096", "seq_len: lots")),
            "packing.seq_len"
        );
        assert_eq!(
            path_of(&OK.replace("seq_len: 4096", "seq_len: 3")),
            "packing.seq_len"
        );
        assert_eq!(
            path_of(&OK.replace("seq_len: 4096", "seq_len: 4096\n  window: 3")),
            "packing.window"
        );
        assert_eq!(
            path_of(&OK.replace("seq_len: 4096", "seq_len: 4096\n  long_docs: truncate")),
            "packing.long_docs"
        );
        assert_eq!(
            path_of(&OK.replace("ctx-general}", "ctx-klingon}")),
            "mixture.stages[0].datasets[0].source"
        );
        assert_eq!(
            path_of(&OK.replace("upsample: 3", "upsample: -1")),
            "mixture.stages[1].datasets[1].upsample"
        );
        assert_eq!(
            path_of(&OK.replace("repos: [/src/cachetools]", "repos: []")),
            "sources.repos"
        );
        assert_eq!(
            path_of(&format!("{OK}rollout:\n  policy: replay\n  max_step: 3\n")),
            "rollout.max_step"
        );
        assert_eq!(
            path_of(&format!("{OK}filters:\n  subset: rust\n")),
            "filters.subset"
        );
        assert_eq!(path_of(&format!("{OK}bogus: 1\n")), "bogus");
        assert_eq!(
            path_of(&OK.replace("[/src/cachetools]", "['/m.git,name=widgets']")),
            "sources.repos[0].name"
        );
        assert_eq!(
            path_of(&OK.replace("[/src/cachetools]", "[{path: /m.git, nam: a/b}]")),
            "sources.repos[0].nam"
        );
        assert_eq!(path_of(&format!("{OK}run_id: ../x\n")), "run_id");
    }
}
