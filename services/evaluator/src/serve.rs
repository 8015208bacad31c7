//! The `Evaluator` gRPC service (Start / Get / Watch / Cancel) over the runtime job registry.
//!
//! A job evaluates one benchmark in this process, in the sandbox: `swe-bench` (instances +
//! predictions), `humaneval` / `humanevalplus` (problems + samples). With `model_url` a job
//! drives a model behind an OpenAI-compatible endpoint through [`crate::drive`]: HumanEval's
//! samples are generated before they are graded, and `gpqa` / `scibench` score the model's
//! answers; the report carries the provenance (model, endpoint, template hash, sampling, data
//! hash, seed). Paths are local paths (or `file://` URIs) on the server;
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

use crate::drive::client::{Endpoint, Sampling};
use crate::drive::{self, Provenance};
use crate::humaneval::{self, Options, PythonEnv, Runner};
use crate::swebench::{self, Harness, HarnessConfig};
use anyhow::Context;

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
    let mut problems = humaneval::load_problems(Path::new(&spec.problems))?;
    let out = PathBuf::from(&spec.out);
    if !spec.model_url.is_empty() && spec.limit > 0 {
        problems.truncate(spec.limit as usize);
    }
    let generated = if spec.model_url.is_empty() {
        None
    } else {
        Some(generate_humaneval(&spec, &problems, &out, &handle).await?)
    };
    let samples = match &generated {
        Some((samples, _)) => samples.clone(),
        None => humaneval::load_samples(Path::new(&spec.samples))?,
    };
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
    std::fs::create_dir_all(&out)?;
    let mut text = String::new();
    for r in &results {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    std::fs::write(out.join("results.jsonl"), text)?;
    let mut outputs = vec![out.join("results.jsonl").display().to_string()];
    match generated {
        // A driven run's report says what produced the samples, as `davinci eval` writes it.
        Some((_, prov)) => {
            let scores = serde_json::json!({"base": report.base, "plus": report.plus,
                "problems": report.problems, "samples": report.samples});
            drive::write_report(&out, &prov, scores)?;
            outputs.insert(0, out.join("samples.jsonl").display().to_string());
        }
        None => std::fs::write(
            out.join("report.json"),
            serde_json::to_string_pretty(&report)?,
        )?,
    }
    outputs.push(out.join("report.json").display().to_string());
    Ok(outputs)
}

/// The endpoint and sampling of a driven job (checked when the job was started).
fn endpoint(
    spec: &EvalSpec,
    default_max_tokens: u32,
    n: u32,
) -> anyhow::Result<(Endpoint, Sampling)> {
    let concurrency = if spec.concurrency == 0 {
        8
    } else {
        spec.concurrency as usize
    };
    let timeout = Duration::from_secs(if spec.timeout_s > 0 {
        spec.timeout_s as u64
    } else {
        600
    });
    let ep = Endpoint::new(&spec.model_url, &spec.model, None, concurrency, timeout)?;
    let sampling = Sampling {
        max_tokens: if spec.max_tokens == 0 {
            default_max_tokens
        } else {
            spec.max_tokens
        },
        temperature: spec.temperature,
        top_p: if spec.top_p == 0.0 { 1.0 } else { spec.top_p },
        n,
        stop: spec.stop.clone(),
        seed: Some(spec.seed.unwrap_or(DEFAULT_SEED)),
    };
    Ok((ep, sampling))
}

/// Runs a driver on a blocking thread of the runtime: the drivers' futures borrow their inputs
/// across `buffered` streams, which the compiler cannot prove `Send` for a spawned job.
async fn off_thread<T, F, Fut>(make: F) -> anyhow::Result<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
    T: Send + 'static,
{
    let rt = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || rt.block_on(make())).await?
}

/// The seed of `davinci eval` when none is given.
const DEFAULT_SEED: u64 = 1234;

/// Data hash for the provenance.
fn data_sha256(path: &Path) -> anyhow::Result<String> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(drive::sha256_hex(&data))
}

/// HumanEval samples from the model, written to `{out}/samples.jsonl`.
async fn generate_humaneval(
    spec: &EvalSpec,
    problems: &[humaneval::Problem],
    out: &Path,
    handle: &JobHandle,
) -> anyhow::Result<(Vec<humaneval::Sample>, Provenance)> {
    let format = match spec.format.as_str() {
        "instruct" => drive::humaneval::Format::Instruct,
        _ => drive::humaneval::Format::Base,
    };
    let (ep, sampling) = endpoint(spec, 512, spec.n.max(1))?;
    let sampling = drive::humaneval::sampling_for(format, sampling);
    let problems = problems.to_vec();
    let prov = Provenance::new(
        &spec.benchmark,
        &ep,
        format.template(),
        &sampling,
        data_sha256(Path::new(&spec.problems))?,
        sampling.seed,
    );
    let (tx, task) = reporter(handle, problems.len() as u64);
    let s = sampling.clone();
    let samples = off_thread(move || async move {
        drive::humaneval::generate(&ep, &problems, format, &s, &|_| {
            let _ = tx.send("generated".into());
        })
        .await
    })
    .await;
    let _ = task.await;
    let samples = samples?;
    drive::write_jsonl(&out.join("samples.jsonl"), &samples)?;
    Ok((samples, prov))
}

/// GPQA from its CSV through the model: `{out}/results.jsonl` and `{out}/report.json`.
async fn run_gpqa(spec: EvalSpec, handle: JobHandle) -> anyhow::Result<Vec<String>> {
    let mode = match spec.format.as_str() {
        "generative" => drive::gpqa::Mode::Generative,
        _ => drive::gpqa::Mode::Loglikelihood,
    };
    let (ep, sampling) = endpoint(&spec, 1024, 1)?;
    let seed = spec.seed.unwrap_or(DEFAULT_SEED);
    let (questions, data_sha) = drive::gpqa::load_csv(Path::new(&spec.problems))?;
    let mut items: Vec<_> = questions
        .iter()
        .map(|q| drive::gpqa::shuffle(q, seed))
        .collect();
    if spec.limit > 0 {
        items.truncate(spec.limit as usize);
    }
    let prov = Provenance::new(
        "gpqa",
        &ep,
        &drive::gpqa::template(mode),
        &sampling,
        data_sha,
        Some(seed),
    );
    let (tx, task) = reporter(&handle, items.len() as u64);
    let chat = spec.chat;
    let results = off_thread(move || async move {
        drive::gpqa::evaluate(&ep, &items, mode, &sampling, chat, &|r| {
            let _ = tx.send(if r.correct { "correct" } else { "wrong" }.into());
        })
        .await
    })
    .await;
    let _ = task.await;
    let results = results?;
    let scores = drive::gpqa::scores(&results, mode);
    score(
        "gpqa",
        "accuracy",
        scores["accuracy"].as_f64().unwrap_or(0.0),
    );
    driven_outputs(&spec, &results, &prov, scores)
}

/// SciBench's problems through the model: `{out}/results.jsonl` and `{out}/report.json`.
async fn run_scibench(spec: EvalSpec, handle: JobHandle) -> anyhow::Result<Vec<String>> {
    let (ep, sampling) = endpoint(&spec, 1024, 1)?;
    let (problems, data_sha) = drive::scibench::load_dir(Path::new(&spec.problems), &spec.books)?;
    let mut prepared: Vec<_> = problems.iter().map(drive::scibench::prepare).collect();
    if spec.limit > 0 {
        prepared.truncate(spec.limit as usize);
    }
    let prov = Provenance::new(
        "scibench",
        &ep,
        &format!(
            "{}\n\n{}",
            drive::scibench::SYSTEM,
            drive::scibench::TEMPLATE
        ),
        &sampling,
        data_sha,
        sampling.seed,
    );
    let (tx, task) = reporter(&handle, prepared.len() as u64);
    let (chat, s) = (spec.chat, sampling.clone());
    let results = off_thread(move || async move {
        drive::scibench::evaluate(&ep, &prepared, &s, chat, &|r| {
            let _ = tx.send(if r.correct { "correct" } else { "wrong" }.into());
        })
        .await
    })
    .await;
    let _ = task.await;
    let results = results?;
    let scores = drive::scibench::scores(&results);
    score(
        "scibench",
        "accuracy",
        scores["accuracy"].as_f64().unwrap_or(0.0),
    );
    driven_outputs(&spec, &results, &prov, scores)
}

fn driven_outputs<T: serde::Serialize>(
    spec: &EvalSpec,
    results: &[T],
    prov: &Provenance,
    scores: serde_json::Value,
) -> anyhow::Result<Vec<String>> {
    let out = PathBuf::from(&spec.out);
    drive::write_jsonl(&out.join("results.jsonl"), results)?;
    let report = drive::write_report(&out, prov, scores)?;
    Ok(vec![
        out.join("results.jsonl").display().to_string(),
        report.display().to_string(),
    ])
}

/// Checks the model-driving fields of a spec naming `model_url`.
fn check_driven(spec: &EvalSpec) -> Result<(), Status> {
    Endpoint::new(
        &spec.model_url,
        &spec.model,
        None,
        1,
        Duration::from_secs(1),
    )
    .map_err(|e| {
        bad(
            if spec.model.is_empty() {
                "model"
            } else {
                "model_url"
            },
            &e.to_string(),
        )
    })?;
    if !(0.0..=2.0).contains(&spec.temperature) {
        return Err(bad("temperature", "must be in [0, 2]"));
    }
    if !(0.0..=1.0).contains(&spec.top_p) {
        return Err(bad("top_p", "must be in (0, 1] (0: 1.0)"));
    }
    let formats: &[&str] = match spec.benchmark.as_str() {
        "humaneval" | "humanevalplus" => &["", "base", "instruct"],
        "gpqa" => &["", "loglikelihood", "generative"],
        _ => &[""],
    };
    if !formats.contains(&spec.format.as_str()) {
        return Err(bad(
            "format",
            &format!(
                "`{}` is not one of {} for {}",
                spec.format,
                formats[1..].join(", "),
                spec.benchmark
            ),
        ));
    }
    if spec.n > 1 && spec.temperature == 0.0 {
        return Err(bad("n", "several samples per problem need temperature > 0"));
    }
    Ok(())
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
        let driven = !spec.model_url.is_empty();
        if driven {
            check_driven(&spec)?;
        }
        match spec.benchmark.as_str() {
            "swe-bench" if driven => {
                return Err(bad(
                    "model_url",
                    "SWE-bench is driven by the rollout agent (`davinci rollout`); grade its predictions here",
                ));
            }
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
                if driven && !spec.samples.is_empty() {
                    return Err(bad(
                        "samples",
                        "with model_url the samples are generated; give one or the other",
                    ));
                }
                if !driven {
                    spec.samples = path_field("samples", &spec.samples)?.display().to_string();
                }
            }
            "gpqa" | "scibench" if driven => {
                spec.problems = path_field("problems", &spec.problems)?
                    .display()
                    .to_string();
            }
            "gpqa" | "scibench" => {
                return Err(bad(
                    "model_url",
                    &format!(
                        "{} drives a model: the endpoint is required",
                        spec.benchmark
                    ),
                ));
            }
            other => {
                return Err(bad(
                    "benchmark",
                    &format!(
                        "`{other}` is not one of swe-bench, humaneval, humanevalplus, gpqa, scibench"
                    ),
                ));
            }
        }
        let spec_json = serde_json::json!({
            "benchmark": spec.benchmark, "instances": spec.instances, "predictions": spec.predictions,
            "samples": spec.samples, "problems": spec.problems, "out": spec.out,
            "workers": spec.workers, "timeout_s": spec.timeout_s, "model_url": spec.model_url,
            "model": spec.model, "format": spec.format, "chat": spec.chat, "n": spec.n,
            "max_tokens": spec.max_tokens, "temperature": spec.temperature, "top_p": spec.top_p,
            "seed": spec.seed, "stop": spec.stop, "limit": spec.limit,
            "concurrency": spec.concurrency, "books": spec.books,
        })
        .to_string();
        let cfg = self.cfg.clone();
        let sb = self.swe_sandbox.clone();
        let job = self
            .jobs
            .spawn("eval", &req.run_id, spec_json, move |handle| {
                Box::pin(async move {
                    match spec.benchmark.as_str() {
                        "swe-bench" => run_swe_bench(cfg, sb, spec, handle).await,
                        "gpqa" => run_gpqa(spec, handle).await,
                        "scibench" => run_scibench(spec, handle).await,
                        _ => run_humaneval(cfg, spec, handle).await,
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
