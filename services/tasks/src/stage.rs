//! One task from a candidate or a published row to a validated task: tree at the base commit,
//! recipe, environment, validation, logs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use davinci_core::task::TaskInstance;
use davinci_sandbox::{Backend, BwrapSandbox, LocalConfig, Sandbox};
use davinci_swebench::{Harness, HarnessConfig};
use serde::{Deserialize, Serialize};

use crate::envs::{EnvConfig, EnvOutcome, Envs};
use crate::recipe::{self, MOUNT, Recipe};
use crate::repo::Mirror;
use crate::select::SelectConfig;
use crate::validate::{ValidateConfig, Validation, Verdict, validate};

/// The task stage's configuration (`tasks:` of a RunSpec, `--config` of the CLI).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TasksConfig {
    pub select: SelectConfig,
    pub env: EnvConfig,
    pub validate: ValidateConfig,
    /// Seconds one test run may take.
    pub test_timeout_secs: u64,
    /// Tasks validated at once.
    pub jobs: usize,
    /// The sandbox (tests run only there; `local` builds recipe environments).
    pub sandbox: Backend,
}

impl Default for TasksConfig {
    fn default() -> Self {
        TasksConfig {
            select: SelectConfig::default(),
            env: EnvConfig::default(),
            validate: ValidateConfig::default(),
            test_timeout_secs: 900,
            jobs: 2,
            sandbox: Backend::default(),
        }
    }
}

impl TasksConfig {
    /// Refuses settings that cannot work, before any work starts.
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.validate.runs >= 1, "validate.runs: at least 1");
        anyhow::ensure!(self.jobs >= 1, "jobs: at least 1");
        anyhow::ensure!(self.test_timeout_secs >= 1, "test_timeout_secs: at least 1");
        anyhow::ensure!(self.select.max_files >= 1, "select.max_files: at least 1");
        anyhow::ensure!(
            self.env.python.is_absolute(),
            "env.python: `{}` must be an absolute path",
            self.env.python.display()
        );
        Ok(())
    }
}

/// How getting a task's environment went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnvResult {
    /// The task runs in its image.
    Image,
    Cached,
    Built,
    Failed(String),
}

/// What one task came to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskOutcome {
    /// The task with its lists and env, when kept.
    pub task: Option<TaskInstance>,
    pub env: EnvResult,
    pub validation: Validation,
}

/// Everything validation needs, shared by every task of a job.
pub struct Stage {
    pub cfg: TasksConfig,
    pub harness: Harness,
    pub envs: Option<Envs>,
    /// Trees at base commits, `{instance_id}/` (the harness's `repos_dir`).
    pub trees: PathBuf,
    pub python_version: String,
}

/// `major.minor` of an interpreter.
pub fn python_version(python: &Path) -> anyhow::Result<String> {
    let out = std::process::Command::new(python)
        .args(["-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{} does not run: {}",
        python.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl Stage {
    /// Opens the sandbox. On the local backend, environments are built under `env_root`
    /// (absolute) and mounted read-only into every test sandbox; `work` holds trees.
    pub async fn open(cfg: TasksConfig, env_root: &Path, work: &Path) -> anyhow::Result<Stage> {
        cfg.check()?;
        let trees = work.join("trees");
        std::fs::create_dir_all(&trees).with_context(|| format!("creating {}", trees.display()))?;
        let python_version = python_version(&cfg.env.python)?;
        let (sandbox, envs): (Arc<dyn Sandbox>, Option<Envs>) = match &cfg.sandbox {
            Backend::Local(local) => {
                let envs = Envs::new(env_root, cfg.env.clone(), local.clone())?;
                let mut test = LocalConfig {
                    mount_point: PathBuf::from(MOUNT),
                    ..local.clone()
                };
                test.ro_binds.push(envs.root.clone());
                (Arc::new(BwrapSandbox::new(test)?), Some(envs))
            }
            other => (davinci_sandbox::open(other).await?, None),
        };
        let timeout = Duration::from_secs(cfg.test_timeout_secs);
        let harness = Harness::new(
            sandbox,
            HarnessConfig {
                out_dir: work.join("harness"),
                repos_dir: Some(trees.clone()),
                workers: cfg.jobs,
                setup_timeout: timeout,
                test_timeout: timeout,
                env_root: envs.as_ref().map(|e| e.root.clone()),
                ..Default::default()
            },
        );
        Ok(Stage {
            cfg,
            harness,
            envs,
            trees,
            python_version,
        })
    }

    /// A recipe from the task's own install spec (SWE-rebench's `install_config`), else
    /// inferred from the tree.
    fn recipe_for(&self, inst: &TaskInstance, tree: &Path) -> Recipe {
        let mut r = recipe::infer(tree, &self.python_version);
        let e = &inst.env;
        if !e.install.is_empty() || !e.pip_packages.is_empty() || !e.reqs_path.is_empty() {
            r.install = e.install.clone();
            r.pip_packages = e.pip_packages.clone();
            r.reqs_path = e.reqs_path.clone();
        }
        r
    }

    /// Gets the environment of `inst` and validates it.
    pub async fn run(&self, mut inst: TaskInstance, mirror: Option<&Mirror>) -> TaskOutcome {
        let env = if inst.env.image().is_some() || self.envs.is_none() {
            EnvResult::Image
        } else {
            match self.prepare_env(&mut inst, mirror).await {
                Ok(r) => r,
                Err(e) => EnvResult::Failed(format!("{e:#}")),
            }
        };
        if let EnvResult::Failed(reason) = &env {
            let validation = Validation {
                instance_id: inst.instance_id.clone(),
                verdict: Verdict::Infra("env_build_failed".into()),
                fail_to_pass: vec![],
                pass_to_pass: vec![],
                flaky: vec![],
                seconds: 0.0,
                logs: vec![("env.log".into(), reason.clone())],
            };
            return TaskOutcome {
                task: None,
                env,
                validation,
            };
        }
        let validation = validate(&self.harness, &inst, &self.cfg.validate).await;
        let task = (validation.verdict == Verdict::Kept).then(|| {
            let mut t = inst.clone();
            t.fail_to_pass = validation.fail_to_pass.clone();
            t.pass_to_pass = validation.pass_to_pass.clone();
            t.metadata.flaky = validation.flaky.clone();
            t
        });
        TaskOutcome {
            task,
            env,
            validation,
        }
    }

    async fn prepare_env(
        &self,
        inst: &mut TaskInstance,
        mirror: Option<&Mirror>,
    ) -> anyhow::Result<EnvResult> {
        let envs = self.envs.as_ref().expect("local backend");
        let tree = self.trees.join(safe_id(&inst.instance_id)?);
        if !tree.is_dir() {
            let mirror = mirror.with_context(|| {
                format!(
                    "no git mirror of {} to build {} from",
                    inst.repo, inst.instance_id
                )
            })?;
            let tmp = self.trees.join(format!(".{}.tmp", inst.instance_id));
            let _ = std::fs::remove_dir_all(&tmp);
            mirror.export(&inst.base_commit, &tmp)?;
            std::fs::rename(&tmp, &tree)?;
        }
        let recipe = self.recipe_for(inst, &tree);
        let mut env = recipe.env_for(&inst.test_patch, &self.cfg.select.test_paths);
        // What the task states wins over what was inferred.
        if inst.env.test_cmd.is_some() {
            env.test_cmd = inst.env.test_cmd.clone();
        }
        if inst.env.log_parser.is_some() {
            env.log_parser = inst.env.log_parser.clone();
        }
        for (k, v) in &inst.env.env_vars {
            env.env_vars.insert(k.clone(), v.clone());
        }
        env.pre_install = inst.env.pre_install.clone();
        inst.env = env;
        match envs.get(&inst.repo, &recipe, &tree).await {
            Ok((_, EnvOutcome::Cached)) => Ok(EnvResult::Cached),
            Ok((_, EnvOutcome::Built)) => Ok(EnvResult::Built),
            Err(e) => Ok(EnvResult::Failed(format!("{e}\n{}", e.log))),
        }
    }
}

fn safe_id(id: &str) -> anyhow::Result<&str> {
    anyhow::ensure!(
        !id.is_empty()
            && !id.starts_with('.')
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
        "instance id `{id}` is not a safe file name"
    );
    Ok(id)
}

/// Counts of a job: candidates, kept, drops and infrastructure failures by reason,
/// environments, validation times. Written as `stats/tasks.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub prs: u64,
    pub bad_records: u64,
    pub candidates: u64,
    pub kept: u64,
    /// Rejections by reason (selection and validation).
    pub drops: BTreeMap<String, u64>,
    /// Infrastructure failures by reason, apart from rejections.
    pub infra: BTreeMap<String, u64>,
    pub envs_built: u64,
    pub envs_cached: u64,
    pub envs_failed: u64,
    /// Seconds of validation per validated task, in input order.
    pub validation_seconds: Vec<f64>,
    pub seconds: f64,
    /// Input shards that used up their attempts in the service (dead-lettered), with the error.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_shards: Vec<String>,
    /// Published tasks (sets) whose validation ran, and those whose published lists it
    /// reproduced.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub published_compared: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub published_agree: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Stats {
    pub fn drop(&mut self, reason: &str) {
        *self.drops.entry(reason.to_string()).or_default() += 1;
    }

    pub fn record(&mut self, o: &TaskOutcome) {
        match &o.env {
            EnvResult::Built => self.envs_built += 1,
            EnvResult::Cached => self.envs_cached += 1,
            EnvResult::Failed(_) => self.envs_failed += 1,
            EnvResult::Image => {}
        }
        match &o.validation.verdict {
            Verdict::Kept => self.kept += 1,
            Verdict::Rejected(r) => self.drop(r),
            Verdict::Infra(r) => {
                let key = r.split(':').next().unwrap_or(r).to_string();
                *self.infra.entry(key).or_default() += 1;
            }
        }
        if o.validation.seconds > 0.0 {
            self.validation_seconds.push(o.validation.seconds);
        }
    }

    pub fn merge(&mut self, o: &Stats) {
        self.prs += o.prs;
        self.bad_records += o.bad_records;
        self.candidates += o.candidates;
        self.kept += o.kept;
        for (k, v) in &o.drops {
            *self.drops.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.infra {
            *self.infra.entry(k.clone()).or_default() += v;
        }
        self.envs_built += o.envs_built;
        self.envs_cached += o.envs_cached;
        self.envs_failed += o.envs_failed;
        self.validation_seconds
            .extend(o.validation_seconds.iter().copied());
        self.seconds += o.seconds;
        self.failed_shards.extend(o.failed_shards.iter().cloned());
        self.published_compared += o.published_compared;
        self.published_agree += o.published_agree;
    }

    /// Median seconds of validation per task.
    pub fn median_validation_seconds(&self) -> Option<f64> {
        let mut v = self.validation_seconds.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(v[v.len() / 2])
    }

    /// Built / (built + failed) environment builds, `None` before any.
    pub fn env_build_success_rate(&self) -> Option<f64> {
        let n = self.envs_built + self.envs_failed;
        (n > 0).then(|| self.envs_built as f64 / n as f64)
    }
}
