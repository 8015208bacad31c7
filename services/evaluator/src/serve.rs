//! The `Evaluator` gRPC service (Start / Get / Watch / Cancel) over the runtime job registry.
//!
//! A job evaluates one benchmark in this process, in the sandbox: `swe-bench` (instances +
//! predictions), `humaneval` / `humanevalplus` (problems + samples), `mc` / `numeric`
//! (answers file in `samples`). Paths are local paths (or `file://` URIs) on the server;
//! other storage schemes are refused by name. SWE-bench instances run on the configured
//! sandbox backend (`sandbox:` settings: local bubblewrap, Docker or Kubernetes), opened once
//! for the service's life so its sweeper reclaims what a killed predecessor left; HumanEval
//! runs the host's Python under bubblewrap.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use davinci_proto::v1::evaluator_server::Evaluator as EvaluatorRpc;
use davinci_proto::v1::{EvalSpec, Job, JobRef, ProgressEvent, StartEvalRequest};
use davinci_runtime::jobs::{JobHandle, JobRegistry};
use davinci_sandbox::{Backend, LocalConfig, Sandbox};
use futures::StreamExt;
use tonic::{Request, Response, Status};

use crate::humaneval::{self, Options, PythonEnv, Runner};
use crate::swebench::{self, Harness, HarnessConfig};

/// Server-side settings (never taken from the caller).
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Where SWE-bench instances run; workspaces are mounted at `/testbed`.
    pub sandbox: Backend,
    /// The bubblewrap settings HumanEval runs with.
    pub local: LocalConfig,
    /// Prepared SWE-bench environments (see [`crate::swebench::harness`]).
    pub repos_dir: Option<PathBuf>,
    pub python: String,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            sandbox: Backend::default(),
            local: LocalConfig::default(),
            repos_dir: None,
            python: "python3".into(),
        }
    }
}

pub struct EvaluatorService {
    jobs: JobRegistry,
    cfg: ServeConfig,
    swe_sandbox: Arc<tokio::sync::OnceCell<Arc<dyn Sandbox>>>,
}

impl EvaluatorService {
    pub fn new(jobs: JobRegistry, cfg: ServeConfig) -> Self {
        EvaluatorService {
            jobs,
            cfg,
            swe_sandbox: Arc::default(),
        }
    }
}

/// The SWE-bench sandbox, opened on first use (an unreachable engine fails that job and is
/// tried again by the next).
async fn swe_sandbox(
    cell: &tokio::sync::OnceCell<Arc<dyn Sandbox>>,
    backend: &Backend,
) -> anyhow::Result<Arc<dyn Sandbox>> {
    let sb = cell
        .get_or_try_init(|| async {
            let mut b = backend.clone();
            b.set_mount_point("/testbed");
            davinci_sandbox::open(&b).await
        })
        .await?;
    Ok(sb.clone())
}

fn bad(field: &str, why: &str) -> Status {
    Status::invalid_argument(format!("spec.{field}: {why}"))
}

/// A required local path field (`file://` accepted).
fn path_field(field: &str, v: &str) -> Result<PathBuf, Status> {
    let v = v.trim();
    if v.is_empty() {
        return Err(bad(field, "required"));
    }
    if let Some(rest) = v.strip_prefix("file://") {
        return Ok(PathBuf::from(rest));
    }
    if v.contains("://") {
        return Err(bad(
            field,
            "only local paths and file:// URIs are read by this service",
        ));
    }
    Ok(PathBuf::from(v))
}

fn job_id(r: Request<JobRef>) -> Result<String, Status> {
    let id = r.into_inner().job_id;
    if id.is_empty() {
        return Err(Status::invalid_argument("job_id is required"));
    }
    Ok(id)
}

/// Reports progress from sync callbacks without blocking them.
fn reporter(
    handle: &JobHandle,
    total: u64,
) -> (
    tokio::sync::mpsc::UnboundedSender<String>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let h = handle.clone();
    let task = tokio::spawn(async move {
        let mut done = 0u64;
        while let Some(msg) = rx.recv().await {
            done += 1;
            h.count(&msg, 1).await;
            h.progress(done, total, &msg).await;
        }
    });
    (tx, task)
}

/// The latest score of a benchmark, for the evaluator dashboard.
fn score(benchmark: &str, score: &str, value: f64) {
    metrics::gauge!("davinci_evaluator_score_ratio", "benchmark" => benchmark.to_string(), "score" => score.to_string())
        .set(value);
}

async fn run_swe_bench(
    cfg: ServeConfig,
    sb: Arc<tokio::sync::OnceCell<Arc<dyn Sandbox>>>,
    spec: EvalSpec,
    handle: JobHandle,
) -> anyhow::Result<Vec<String>> {
    let instances =
        swebench::data::index_instances(swebench::load_instances(Path::new(&spec.instances))?);
    let preds = swebench::load_predictions(Path::new(&spec.predictions))?;
    let sb = swe_sandbox(&sb, &cfg.sandbox).await?;
    let timeout = if spec.timeout_s > 0 {
        spec.timeout_s as u64
    } else {
        1800
    };
    let out = PathBuf::from(&spec.out);
    let harness = Harness::new(
        sb,
        HarnessConfig {
            out_dir: out.clone(),
            repos_dir: cfg.repos_dir.clone(),
            workers: (spec.workers as usize).max(1),
            setup_timeout: Duration::from_secs(timeout),
            test_timeout: Duration::from_secs(timeout),
            ..Default::default()
        },
    );
    let (tx, task) = reporter(&handle, preds.len() as u64);
    let summary = harness
        .run(&instances, &preds, &|o| {
            let _ = tx.send(format!(
                "status.{}",
                swebench::harness::status_name(o.status)
            ));
        })
        .await;
    drop(tx);
    let _ = task.await;
    let summary = summary?;
    handle.count("resolved", summary.resolved as u64).await;
    if !preds.is_empty() {
        score(
            "swe-bench",
            "resolved",
            summary.resolved as f64 / preds.len() as f64,
        );
    }
    Ok(vec![out.join("summary.json").display().to_string()])
}

async fn run_humaneval(
    cfg: ServeConfig,
    spec: EvalSpec,
    handle: JobHandle,
) -> anyhow::Result<Vec<String>> {
    let problems = humaneval::load_problems(Path::new(&spec.problems))?;
    let samples = humaneval::load_samples(Path::new(&spec.samples))?;
    let mut opts = Options {
        workers: (spec.workers as usize).max(1),
        ..Default::default()
    };
    if spec.timeout_s > 0 {
        opts.timeout = Duration::from_secs(spec.timeout_s as u64);
    }
    let runner = Runner::local(cfg.local.clone(), PythonEnv::detect(&cfg.python)?, opts)?;
    let (tx, task) = reporter(&handle, samples.len() as u64);
    let res = runner
        .evaluate(&problems, &samples, &[1, 10, 100], &|r| {
            let _ = tx.send(if r.passed {
                "passed".into()
            } else {
                "failed".into()
            });
        })
        .await;
    drop(tx);
    let _ = task.await;
    let (results, report) = res?;
    for (k, v) in &report.base {
        score(&spec.benchmark, k, *v);
    }
    let out = PathBuf::from(&spec.out);
    std::fs::create_dir_all(&out)?;
    let mut text = String::new();
    for r in &results {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    std::fs::write(out.join("results.jsonl"), text)?;
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    Ok(vec![
        out.join("results.jsonl").display().to_string(),
        out.join("report.json").display().to_string(),
    ])
}

#[tonic::async_trait]
impl EvaluatorRpc for EvaluatorService {
    async fn start_eval(
        &self,
        request: Request<StartEvalRequest>,
    ) -> Result<Response<Job>, Status> {
        let req = request.into_inner();
        let mut spec = req
            .spec
            .ok_or_else(|| Status::invalid_argument("spec is required"))?;
        spec.out = path_field("out", &spec.out)?.display().to_string();
        match spec.benchmark.as_str() {
            "swe-bench" => {
                spec.instances = path_field("instances", &spec.instances)?
                    .display()
                    .to_string();
                spec.predictions = path_field("predictions", &spec.predictions)?
                    .display()
                    .to_string();
            }
            "humaneval" | "humanevalplus" => {
                spec.problems = path_field("problems", &spec.problems)?
                    .display()
                    .to_string();
                spec.samples = path_field("samples", &spec.samples)?.display().to_string();
            }
            other => {
                return Err(bad(
                    "benchmark",
                    &format!("`{other}` is not one of swe-bench, humaneval, humanevalplus"),
                ));
            }
        }
        let spec_json = serde_json::json!({
            "benchmark": spec.benchmark, "instances": spec.instances, "predictions": spec.predictions,
            "samples": spec.samples, "problems": spec.problems, "out": spec.out,
            "workers": spec.workers, "timeout_s": spec.timeout_s,
        })
        .to_string();
        let cfg = self.cfg.clone();
        let sb = self.swe_sandbox.clone();
        let job = self
            .jobs
            .spawn("eval", &req.run_id, spec_json, move |handle| {
                Box::pin(async move {
                    if spec.benchmark == "swe-bench" {
                        run_swe_bench(cfg, sb, spec, handle).await
                    } else {
                        run_humaneval(cfg, spec, handle).await
                    }
                })
            })
            .await?;
        Ok(Response::new(job))
    }

    async fn get_eval(&self, request: Request<JobRef>) -> Result<Response<Job>, Status> {
        Ok(Response::new(self.jobs.get(&job_id(request)?).await?))
    }

    type WatchEvalStream =
        Pin<Box<dyn futures::Stream<Item = Result<ProgressEvent, Status>> + Send>>;

    async fn watch_eval(
        &self,
        request: Request<JobRef>,
    ) -> Result<Response<Self::WatchEvalStream>, Status> {
        let stream = self.jobs.watch(&job_id(request)?).await?;
        Ok(Response::new(Box::pin(stream.map(Ok))))
    }

    async fn cancel_eval(&self, request: Request<JobRef>) -> Result<Response<Job>, Status> {
        Ok(Response::new(self.jobs.cancel(&job_id(request)?).await?))
    }
}
