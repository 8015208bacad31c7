//! Running predictions: one sandbox per instance, patches applied inside it, the instance's
//! tests run, the log graded, `report.json` written per instance plus a run summary.
//!
//! Layout under the output directory (per model, as the official harness does):
//! `{out}/{model}/{instance_id}/{test_output.txt, report.json, status.json}` and
//! `{out}/{model}/summary.json`. `status.json` is written last: an instance with one is
//! finished and is not run again (resumable).
//!
//! Environments: the local backend needs a prepared tree per instance, found under
//! `repos_dir` as `{instance_id}/` (a tree at the base commit, dependencies installed or
//! reachable through `setup_script`), else `{owner}__{name}/` (a git clone; the harness
//! checks out `base_commit` in the sandbox copy). Container backends (Docker) start from the
//! instance's image instead: `env.image` as the instance gives it (SWE-rebench names), else
//! the official SWE-bench image name (`swebench/sweb.eval.x86_64.<id>`, `__` → `_1776_`);
//! the image holds the repository at `/testbed` at its base commit, and its digest is
//! recorded in `status.json`. The instance's `env.setup_script`, when present, runs first
//! with its own time limit. Everything after the workspace is made is the same code for
//! every backend.
//!
//! A task built by the task stage names a recipe environment instead (`env.recipe_hash`): a
//! virtualenv under `env_root` at `{owner}__{name}/{hash}/venv`, which the local sandbox sees
//! read-only at the same path (its `ro_binds` include `env_root`). Every step runs with that
//! venv first on `PATH` and the task's `env.env_vars`. A task that names an image is refused
//! on the local backend: its environment is the image, never the host.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use davinci_core::task::TaskInstance;
use davinci_sandbox::{Limits, RunSpec, Sandbox, StopReason, Workspace, WorkspaceSpec};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::data::Prediction;
use crate::grading::{
    APPLY_PATCH_FAIL, APPLY_PATCH_PASS, END_TEST_OUTPUT, InstanceReport, START_TEST_OUTPUT,
    TESTS_TIMEOUT, grade_log, report_json,
};
use crate::specs::test_command;

/// What happened to one instance. Infrastructure failures are separate from model failures
/// and never count as unresolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Resolved,
    /// Tests ran (or timed out) and the instance is not resolved.
    Unresolved,
    /// The model patch does not apply (a model failure).
    PatchFailed,
    /// The prediction has no patch (`null`) or an empty one (a model failure).
    EmptyPatch,
    /// No environment for the instance (no tree under `repos_dir`).
    InfraMissingEnvironment,
    /// Checkout or setup script failed.
    InfraSetupFailed,
    /// Setup ran past its time limit.
    InfraSetupTimeout,
    /// The instance's own test patch does not apply to its environment.
    InfraTestPatchFailed,
    /// The sandbox itself failed (could not prepare or start).
    InfraSandboxError,
}

impl Status {
    pub fn is_infra(self) -> bool {
        matches!(
            self,
            Status::InfraMissingEnvironment
                | Status::InfraSetupFailed
                | Status::InfraSetupTimeout
                | Status::InfraTestPatchFailed
                | Status::InfraSandboxError
        )
    }
}

/// `status.json` of one instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    pub instance_id: String,
    pub model_name_or_path: String,
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub seconds: f64,
    /// The environment image and the digest it resolved to (container backends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<davinci_sandbox::ImageRecord>,
}

/// `summary.json` of a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    pub total: usize,
    pub graded: usize,
    pub resolved: usize,
    /// resolved / graded, where graded excludes infrastructure failures.
    pub resolution_rate: f64,
    pub by_status: BTreeMap<String, usize>,
    pub resolved_ids: Vec<String>,
    pub infra_ids: Vec<String>,
    /// Predictions whose instance is not in the instances file (not run).
    pub unknown_instance_ids: Vec<String>,
    /// Instances skipped because a previous run finished them.
    pub reused: usize,
}

#[derive(Debug, Clone)]
pub struct HarnessConfig {
    pub out_dir: PathBuf,
    pub repos_dir: Option<PathBuf>,
    pub workers: usize,
    pub setup_timeout: Duration,
    pub test_timeout: Duration,
    /// Setup may download dependencies when allowed; tests never get network.
    pub setup_network: bool,
    pub memory_bytes: u64,
    pub max_processes: u64,
    /// Root of the built recipe environments (`cache/envs`), for tasks with `env.recipe_hash`.
    pub env_root: Option<PathBuf>,
}

impl Default for HarnessConfig {
    fn default() -> Self {
        HarnessConfig {
            out_dir: PathBuf::from("eval-out"),
            repos_dir: None,
            workers: 2,
            setup_timeout: Duration::from_secs(1800),
            test_timeout: Duration::from_secs(1800),
            setup_network: false,
            memory_bytes: 8 << 30,
            max_processes: 512,
            env_root: None,
        }
    }
}

/// Directory-safe form of a model name (the official harness replaces `/` with `__`).
fn model_dir(model: &str) -> String {
    let m = if model.is_empty() { "unknown" } else { model };
    m.replace('/', "__")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
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

pub struct Harness {
    sandbox: Arc<dyn Sandbox>,
    cfg: HarnessConfig,
}

/// Where an instance's environment comes from.
enum Env {
    /// A host tree (local backend); `true` when it is a clone to check out at the base commit.
    Tree(PathBuf, bool),
    /// An image (container backends).
    Image(String),
}

/// What grading one patch gave.
#[derive(Debug, Clone)]
pub struct Graded {
    pub status: Status,
    pub error: Option<String>,
    /// Setup, patch application and test output.
    pub log: String,
    pub report: InstanceReport,
    pub image: Option<davinci_sandbox::ImageRecord>,
}

/// Why an instance's environment could not be opened: an infrastructure status and what
/// failed.
#[derive(Debug, Clone)]
pub struct EnvError {
    pub status: Status,
    pub message: String,
}

impl Graded {
    fn new(status: Status, error: Option<String>, log: String, report: InstanceReport) -> Graded {
        Graded {
            status,
            error,
            log,
            report,
            image: None,
        }
    }
}

/// The image of an instance: `env.image` as given (SWE-rebench and other sets name theirs),
/// else the official SWE-bench instance image.
pub fn instance_image(inst: &TaskInstance) -> String {
    match inst.env.image.as_deref().map(str::trim) {
        Some(i) if !i.is_empty() => i.to_string(),
        _ => davinci_sandbox::images::swebench_eval_image(&inst.instance_id),
    }
}

/// One test run ([`Harness::run_tests`]).
#[derive(Debug, Clone)]
pub struct TestRun {
    /// `Resolved` / `Unresolved` when the tests ran (graded against the instance's lists);
    /// an infrastructure status when they could not.
    pub status: Status,
    pub error: Option<String>,
    pub log: String,
    pub seconds: f64,
    pub timed_out: bool,
}

struct Step {
    log: String,
    stop: StopReason,
    exit: Option<i32>,
}

impl Harness {
    /// The sandbox should mount workspaces at `/testbed`, as SWE-bench environments expect.
    pub fn new(sandbox: Arc<dyn Sandbox>, cfg: HarnessConfig) -> Harness {
        Harness { sandbox, cfg }
    }

    fn instance_dir(&self, model: &str, id: &str) -> anyhow::Result<PathBuf> {
        Ok(self.cfg.out_dir.join(model_dir(model)).join(safe_id(id)?))
    }

    async fn step(
        &self,
        ws: &Workspace,
        vars: &BTreeMap<String, String>,
        script: &str,
        wall: Duration,
        network: bool,
    ) -> anyhow::Result<Step> {
        let mut spec = RunSpec::new(["bash", "-c", script]);
        spec.network = network;
        spec.env = vars.clone();
        let limits = Limits {
            wall_time: wall,
            cpu_time: Some(wall),
            memory_bytes: Some(self.cfg.memory_bytes),
            max_processes: Some(self.cfg.max_processes),
            file_size_bytes: Some(4 << 30),
            output_bytes: 16 << 20,
            output_kill_bytes: Some(256 << 20),
        };
        let out = self.sandbox.run(ws, &spec, &limits).await?;
        let mut log = out.stdout_str();
        log.push_str(&out.stderr_str());
        Ok(Step {
            log,
            stop: out.stop,
            exit: out.exit_code,
        })
    }

    fn source_for(&self, inst: &TaskInstance) -> Option<(PathBuf, bool)> {
        let root = self.cfg.repos_dir.as_ref()?;
        let own = root.join(&inst.instance_id);
        if own.is_dir() {
            return Some((own, false));
        }
        let clone = root.join(inst.repo.replace('/', "__"));
        clone.is_dir().then_some((clone, true))
    }

    /// The venv of a recipe task, `{env_root}/{owner}__{name}/{hash}/venv`.
    pub fn venv_of(&self, inst: &TaskInstance) -> Option<PathBuf> {
        let hash = inst.env.recipe_hash.as_deref()?;
        Some(
            self.cfg
                .env_root
                .as_ref()?
                .join(inst.repo_dir())
                .join(hash)
                .join("venv"),
        )
    }

    /// Variables every step of `inst` runs with: its `env_vars`, and its venv first on `PATH`
    /// (commands run in an [`Harness::open_environment`] workspace need them too).
    pub fn step_vars(&self, inst: &TaskInstance) -> BTreeMap<String, String> {
        let mut vars = inst.env.env_vars.clone();
        if let Some(venv) = self.venv_of(inst) {
            vars.insert(
                "PATH".into(),
                format!(
                    "{}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    venv.display()
                ),
            );
            vars.insert("VIRTUAL_ENV".into(), venv.display().to_string());
        }
        vars
    }

    /// Why `inst` cannot run on this sandbox, if it cannot: an image task on a backend that
    /// copies host trees, or a recipe task whose environment was not built.
    fn refusal(&self, inst: &TaskInstance) -> Option<String> {
        if self.sandbox.uses_images() {
            return None;
        }
        if let Some(image) = inst.env.image() {
            return Some(format!(
                "{} runs in image `{image}`: use the docker or kubernetes sandbox backend (the {} backend copies host trees and never runs image tasks)",
                inst.instance_id,
                self.sandbox.name()
            ));
        }
        let hash = inst.env.recipe_hash.as_deref()?;
        match self.venv_of(inst) {
            None => Some(format!(
                "{} needs its built environment ({hash}): no env root configured",
                inst.instance_id
            )),
            Some(v) if !v.join("bin/python").exists() => Some(format!(
                "{}: environment {} is not built (build it with `davinci tasks build`)",
                inst.instance_id,
                v.display()
            )),
            Some(_) => None,
        }
    }

    /// Where `inst`'s environment comes from, or why there is none.
    fn env_for(&self, inst: &TaskInstance) -> Result<Env, String> {
        if let Some(msg) = self.refusal(inst) {
            return Err(msg);
        }
        if self.sandbox.uses_images() {
            Ok(Env::Image(instance_image(inst)))
        } else if let Some((source, is_clone)) = self.source_for(inst) {
            Ok(Env::Tree(source, is_clone))
        } else {
            let msg = match &self.cfg.repos_dir {
                None => format!(
                    "no environment for {}: no repos directory configured (--repos)",
                    inst.instance_id
                ),
                Some(d) => format!(
                    "no environment for {} under {} (expected `{}/` or `{}/`)",
                    inst.instance_id,
                    d.display(),
                    inst.instance_id,
                    inst.repo.replace('/', "__")
                ),
            };
            Err(msg)
        }
    }

    /// The sandbox workspaces are made in.
    pub fn sandbox(&self) -> &Arc<dyn Sandbox> {
        &self.sandbox
    }

    /// Grades `patch` on `inst` in a fresh workspace, as [`Harness::evaluate_one`] does, without
    /// writing files (the rollout grader).
    pub async fn grade(&self, inst: &TaskInstance, patch: &str) -> Graded {
        let pred = Prediction {
            instance_id: inst.instance_id.clone(),
            model_patch: Some(patch.to_string()),
            model_name_or_path: String::new(),
        };
        self.run_instance(inst, &pred).await
    }

    /// Runs `inst`'s tests on its base with its test patch and, when given, `patch` applied,
    /// in a fresh workspace; the log keeps the harness's markers, so
    /// [`crate::grading::status_map_of_log`] reads it. Validation runs each side through here.
    pub async fn run_tests(&self, inst: &TaskInstance, patch: Option<&str>) -> TestRun {
        let t = Instant::now();
        let r = match self.env_for(inst) {
            Ok(env) => match self.run_in_sandbox(inst, patch, env).await {
                Ok(r) => r,
                Err(e) => Graded::new(
                    Status::InfraSandboxError,
                    Some(format!("{e:#}")),
                    String::new(),
                    InstanceReport::default(),
                ),
            },
            Err(msg) => Graded::new(
                Status::InfraMissingEnvironment,
                Some(msg),
                String::new(),
                InstanceReport::default(),
            ),
        };
        TestRun {
            status: r.status,
            error: r.error,
            timed_out: r.log.contains(TESTS_TIMEOUT),
            log: r.log,
            seconds: t.elapsed().as_secs_f64(),
        }
    }

    /// A workspace holding `inst`'s environment at its base commit with its setup done, the
    /// state a prediction is applied to, for work other than grading (the rollout agent works
    /// in one). Release it with the harness's sandbox.
    pub async fn open_environment(&self, inst: &TaskInstance) -> Result<Workspace, EnvError> {
        let infra = |status, message: String| EnvError { status, message };
        let env = self
            .env_for(inst)
            .map_err(|m| infra(Status::InfraMissingEnvironment, m))?;
        let (ws, is_clone) = self
            .prepare(inst, env, Vec::new())
            .await
            .map_err(|e| infra(Status::InfraSandboxError, e.to_string()))?;
        let mut log = String::new();
        match self.set_up(&ws, inst, is_clone, &mut log).await {
            Ok(None) => Ok(ws),
            Ok(Some(failed)) => {
                let _ = self.sandbox.release(ws).await;
                Err(infra(
                    failed.status,
                    format!("{}: {}", failed.error.unwrap_or_default(), tail(&log)),
                ))
            }
            Err(e) => {
                let _ = self.sandbox.release(ws).await;
                Err(infra(Status::InfraSandboxError, format!("{e:#}")))
            }
        }
    }

    /// Evaluates one prediction; writes its files; returns its outcome.
    pub async fn evaluate_one(
        &self,
        inst: &TaskInstance,
        pred: &Prediction,
    ) -> anyhow::Result<Outcome> {
        let dir = self.instance_dir(&pred.model_name_or_path, &inst.instance_id)?;
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let t = Instant::now();
        let Graded {
            status,
            error,
            log,
            report,
            image,
        } = self.run_instance(inst, pred).await;
        std::fs::write(dir.join("test_output.txt"), &log)?;
        std::fs::write(
            dir.join("report.json"),
            serde_json::to_string_pretty(&report_json(&inst.instance_id, &report))?,
        )?;
        let outcome = Outcome {
            instance_id: inst.instance_id.clone(),
            model_name_or_path: pred.model_name_or_path.clone(),
            status,
            error,
            seconds: t.elapsed().as_secs_f64(),
            image,
        };
        // Written last: the commit point for resumption.
        let tmp = dir.join("status.json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&outcome)?)?;
        std::fs::rename(&tmp, dir.join("status.json"))?;
        Ok(outcome)
    }

    async fn run_instance(&self, inst: &TaskInstance, pred: &Prediction) -> Graded {
        let not_applied = InstanceReport {
            patch_exists: true,
            ..Default::default()
        };
        let patch = match pred.model_patch.as_deref() {
            None => {
                let r = InstanceReport {
                    patch_is_none: true,
                    ..Default::default()
                };
                return Graded::new(Status::EmptyPatch, None, String::new(), r);
            }
            Some(p) if p.trim().is_empty() => {
                return Graded::new(Status::EmptyPatch, None, String::new(), not_applied);
            }
            Some(p) => p,
        };
        let env = match self.env_for(inst) {
            Ok(e) => e,
            Err(msg) => {
                return Graded::new(
                    Status::InfraMissingEnvironment,
                    Some(msg),
                    String::new(),
                    not_applied,
                );
            }
        };
        let image_name = match &env {
            Env::Image(i) => Some(i.clone()),
            Env::Tree(..) => None,
        };
        match self.run_in_sandbox(inst, Some(patch), env).await {
            Ok(r) => r,
            Err(e) => {
                let mut r = Graded::new(
                    Status::InfraSandboxError,
                    Some(format!("{e:#}")),
                    String::new(),
                    not_applied,
                );
                // The image was named even if it could not be used.
                r.image = image_name.map(|name| davinci_sandbox::ImageRecord {
                    name,
                    digest: String::new(),
                });
                r
            }
        }
    }

    /// A fresh workspace of `env` with `files` written into it; whether it is a clone to
    /// check out.
    async fn prepare(
        &self,
        inst: &TaskInstance,
        env: Env,
        files: Vec<(String, Vec<u8>)>,
    ) -> Result<(Workspace, bool), davinci_sandbox::SandboxError> {
        let (source, image, is_clone) = match env {
            Env::Tree(p, is_clone) => (Some(p), None, is_clone),
            Env::Image(i) => (None, Some(i), false),
        };
        let ws = self
            .sandbox
            .prepare(&WorkspaceSpec {
                source,
                image,
                task: Some(inst.instance_id.clone()),
                files,
            })
            .await?;
        Ok((ws, is_clone))
    }

    async fn run_in_sandbox(
        &self,
        inst: &TaskInstance,
        patch: Option<&str>,
        env: Env,
    ) -> anyhow::Result<Graded> {
        let files = vec![
            (
                ".davinci-eval/model.patch".into(),
                patch.unwrap_or_default().as_bytes().to_vec(),
            ),
            (
                ".davinci-eval/test.patch".into(),
                inst.test_patch.as_bytes().to_vec(),
            ),
        ];
        let (ws, is_clone) = self.prepare(inst, env, files).await?;
        let r = self.grade_in(&ws, inst, patch, is_clone).await;
        let image = ws.image.clone();
        if let Err(e) = self.sandbox.release(ws).await {
            tracing::warn!(instance = %inst.instance_id, error = %e, "releasing the workspace");
        }
        let mut r = r?;
        r.image = image;
        Ok(r)
    }

    /// Checks out the base commit (a clone) and runs the instance's setup script; `Some` is
    /// the infrastructure failure that stopped it.
    async fn set_up(
        &self,
        ws: &Workspace,
        inst: &TaskInstance,
        is_clone: bool,
        log: &mut String,
    ) -> anyhow::Result<Option<Graded>> {
        let not_applied = || InstanceReport {
            patch_exists: true,
            ..Default::default()
        };
        let mut setup = String::new();
        if is_clone {
            setup.push_str(&format!(
                "git -c advice.detachedHead=false checkout -q -f {} && git clean -fdq -e .davinci-eval\n",
                crate::specs::shell_quote(&inst.base_commit)
            ));
        }
        if let Some(s) = &inst.env.setup_script {
            setup.push_str(s);
            setup.push('\n');
        }
        if !setup.is_empty() {
            let st = self
                .step(
                    ws,
                    &self.step_vars(inst),
                    &format!("set -e\n{setup}"),
                    self.cfg.setup_timeout,
                    self.cfg.setup_network,
                )
                .await?;
            log.push_str(&st.log);
            if st.stop == StopReason::WallTimeout || st.stop == StopReason::CpuTimeLimit {
                return Ok(Some(Graded::new(
                    Status::InfraSetupTimeout,
                    Some("setup timed out".into()),
                    log.clone(),
                    not_applied(),
                )));
            }
            if st.exit != Some(0) {
                return Ok(Some(Graded::new(
                    Status::InfraSetupFailed,
                    Some(format!("setup exited with {:?} ({:?})", st.exit, st.stop)),
                    log.clone(),
                    not_applied(),
                )));
            }
        }
        Ok(None)
    }

    /// Applies the patches, runs the tests and grades, in a prepared workspace.
    async fn grade_in(
        &self,
        ws: &Workspace,
        inst: &TaskInstance,
        patch: Option<&str>,
        is_clone: bool,
    ) -> anyhow::Result<Graded> {
        let not_applied = InstanceReport {
            patch_exists: true,
            ..Default::default()
        };
        let mut log = String::new();
        if let Some(failed) = self.set_up(ws, inst, is_clone, &mut log).await? {
            return Ok(failed);
        }
        // The official harness's three attempts, in order.
        let apply = format!(
            "cd {mp}\nP=.davinci-eval/model.patch\n\
             if git apply --verbose $P; then echo '{pass} (pred)'; \
             elif git apply --verbose --reject $P; then echo '{pass} (pred)'; \
             elif patch --batch --fuzz=5 -p1 -i $P; then echo '{pass} (pred)'; \
             else echo '{fail} (pred)'; exit 1; fi",
            mp = ws.mount_point.display(),
            pass = APPLY_PATCH_PASS,
            fail = APPLY_PATCH_FAIL
        );
        let vars = self.step_vars(inst);
        if patch.is_some() {
            let st = self
                .step(ws, &vars, &apply, Duration::from_secs(300), false)
                .await?;
            log.push_str(&st.log);
            if st.exit != Some(0) {
                let report = grade_log(inst, patch, &log)?;
                return Ok(Graded::new(Status::PatchFailed, None, log, report));
            }
        }
        let eval = format!(
            "cd {mp}\ngit apply -v .davinci-eval/test.patch || {{ echo 'test patch failed'; exit 97; }}\n\
             rm -rf .davinci-eval\necho '{start}'\n{cmd}\necho '{end}'\n",
            mp = ws.mount_point.display(),
            start = START_TEST_OUTPUT,
            end = END_TEST_OUTPUT,
            cmd = test_command(inst),
        );
        let st = self
            .step(ws, &vars, &eval, self.cfg.test_timeout, false)
            .await?;
        log.push_str(&st.log);
        if st.exit == Some(97) && st.log.contains("test patch failed") {
            return Ok(Graded::new(
                Status::InfraTestPatchFailed,
                Some("the instance's test patch does not apply".into()),
                log,
                not_applied,
            ));
        }
        if matches!(st.stop, StopReason::WallTimeout | StopReason::CpuTimeLimit) {
            log.push_str(&format!("\n{TESTS_TIMEOUT}\n"));
        }
        let report = grade_log(inst, Some(patch.unwrap_or_default()), &log)?;
        let status = if report.resolved {
            Status::Resolved
        } else {
            Status::Unresolved
        };
        Ok(Graded::new(status, None, log, report))
    }

    /// Evaluates all predictions with `workers` in parallel, skipping finished ones, and
    /// writes `summary.json` per model. `on_done` is called per instance (progress).
    pub async fn run(
        &self,
        instances: &HashMap<String, TaskInstance>,
        predictions: &[Prediction],
        on_done: &(dyn Fn(&Outcome) + Send + Sync),
    ) -> anyhow::Result<Summary> {
        let mut summary = Summary::default();
        let mut todo = Vec::new();
        let mut outcomes = Vec::new();
        for p in predictions {
            let Some(inst) = instances.get(&p.instance_id) else {
                summary.unknown_instance_ids.push(p.instance_id.clone());
                continue;
            };
            let done = self
                .instance_dir(&p.model_name_or_path, &p.instance_id)?
                .join("status.json");
            if let Ok(s) = std::fs::read_to_string(&done)
                && let Ok(o) = serde_json::from_str::<Outcome>(&s)
            {
                summary.reused += 1;
                on_done(&o);
                outcomes.push(o);
                continue;
            }
            todo.push((inst.clone(), p.clone()));
        }
        let fresh: Vec<anyhow::Result<Outcome>> = futures::stream::iter(todo)
            .map(|(inst, p)| async move {
                let o = self.evaluate_one(&inst, &p).await;
                if let Ok(o) = &o {
                    on_done(o);
                }
                o
            })
            .buffer_unordered(self.cfg.workers.max(1))
            .collect()
            .await;
        for o in fresh {
            outcomes.push(o?);
        }
        summary.total = outcomes.len();
        let mut models: BTreeMap<String, Vec<&Outcome>> = BTreeMap::new();
        for o in &outcomes {
            *summary.by_status.entry(status_name(o.status)).or_default() += 1;
            if o.status == Status::Resolved {
                summary.resolved += 1;
                summary.resolved_ids.push(o.instance_id.clone());
            }
            if o.status.is_infra() {
                summary.infra_ids.push(o.instance_id.clone());
            } else {
                summary.graded += 1;
            }
            models
                .entry(o.model_name_or_path.clone())
                .or_default()
                .push(o);
        }
        summary.resolved_ids.sort();
        summary.infra_ids.sort();
        summary.resolution_rate = if summary.graded == 0 {
            0.0
        } else {
            summary.resolved as f64 / summary.graded as f64
        };
        std::fs::create_dir_all(&self.cfg.out_dir)?;
        for model in models.keys() {
            let d = self.cfg.out_dir.join(model_dir(model));
            std::fs::create_dir_all(&d)?;
            std::fs::write(
                d.join("summary.json"),
                serde_json::to_string_pretty(&summary)?,
            )?;
        }
        std::fs::write(
            self.cfg.out_dir.join("summary.json"),
            serde_json::to_string_pretty(&summary)?,
        )?;
        Ok(summary)
    }
}

pub fn status_name(s: Status) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The last 2,000 bytes of a log, for error messages.
fn tail(log: &str) -> &str {
    let mut start = log.len().saturating_sub(2000);
    while !log.is_char_boundary(start) {
        start += 1;
    }
    &log[start..]
}
