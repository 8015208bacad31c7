//! Drives one run through its stages over gRPC: crawl → reconstruct (→ tasks with a `tasks:`
//! section, → rollout with a `rollout:` section) → pack (→ train with a `training:` section,
//! → evaluate with an `evaluation:` section). The embedded
//! `davinci run` and the distributed conductor use this same code, so both produce the same
//! outputs for the same spec.
use crate::spec::RunSpec;
use davinci_proto::v1::crawler_client::CrawlerClient;
use davinci_proto::v1::evaluator_client::EvaluatorClient;
use davinci_proto::v1::reconstructor_client::ReconstructorClient;
use davinci_proto::v1::rollout_client::RolloutClient;
use davinci_proto::v1::tasks_client::TasksClient;
use davinci_proto::v1::tokenizer_packer_client::TokenizerPackerClient;
use davinci_proto::v1::trainer_client::TrainerClient;
use davinci_proto::v1::{
    Job, JobRef, JobState, ProgressEvent, StageStatus, StartCrawlRequest, StartEvalRequest,
    StartPackRequest, StartReconstructRequest, StartRolloutRequest, StartTasksRequest,
    StartTrainRequest,
};
use davinci_runtime::grpc::{self, ClientInterceptor};
use davinci_runtime::jobs::INTERRUPTED;
use futures::StreamExt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tonic::codegen::InterceptedService;
use tonic::transport::Channel;

type Chan = InterceptedService<Channel, ClientInterceptor>;

/// Where the stage services answer.
#[derive(Debug, Clone)]
pub struct StageAddrs {
    pub crawler: String,
    pub reconstructor: String,
    pub tokenizer_packer: String,
    pub trainer: String,
    pub evaluator: String,
    pub rollout: String,
    pub tasks: String,
}

/// A model endpoint the evaluate stage drives; the endpoint stays up while this lives.
pub struct ServedModel {
    /// OpenAI-compatible API root.
    pub url: String,
    /// The name the endpoint serves the model under.
    pub model: String,
    /// Keeps the endpoint up; dropped when the stage ends.
    pub guard: Box<dyn Send + Sync>,
}

/// Serves a trained checkpoint over the OpenAI API for the evaluate stage (the inference
/// target, in the conductor's process: services reach no other service's code).
#[tonic::async_trait]
pub trait CheckpointServer: Send + Sync {
    /// Serves `checkpoint` (a storage URI of the train stage's output), with the run's
    /// `tokenizer` where the checkpoint carries no `tokenizer.json`.
    async fn serve(&self, checkpoint: &str, tokenizer: &str) -> anyhow::Result<ServedModel>;
}

impl std::fmt::Debug for dyn CheckpointServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CheckpointServer")
    }
}

/// gRPC clients of the stage services a run uses (connected when a run needs them).
#[derive(Clone)]
pub struct StageClients {
    crawler: Option<CrawlerClient<Chan>>,
    reconstructor: Option<ReconstructorClient<Chan>>,
    packer: Option<TokenizerPackerClient<Chan>>,
    trainer: Option<TrainerClient<Chan>>,
    evaluator: Option<EvaluatorClient<Chan>>,
    rollout: Option<RolloutClient<Chan>>,
    tasks: Option<TasksClient<Chan>>,
    checkpoints: Option<Arc<dyn CheckpointServer>>,
    /// The endpoint of the evaluate stage in progress: (API root, model name).
    eval_model: Option<(String, String)>,
}

impl StageClients {
    /// Connects to the services of `stages` (a run's [`stages`]).
    pub async fn connect(
        addrs: &StageAddrs,
        token: Option<&str>,
        stages: &[&str],
    ) -> anyhow::Result<Self> {
        let i = ClientInterceptor::new(token)?;
        let uses = |s: &str| stages.contains(&s);
        let chan = |addr: String, used: bool| {
            let i = i.clone();
            async move {
                anyhow::Ok(match used {
                    true => Some(InterceptedService::new(grpc::connect(&addr).await?, i)),
                    false => None,
                })
            }
        };
        Ok(Self {
            crawler: chan(addrs.crawler.clone(), uses("crawl"))
                .await?
                .map(CrawlerClient::new),
            reconstructor: chan(addrs.reconstructor.clone(), uses("reconstruct"))
                .await?
                .map(ReconstructorClient::new),
            packer: chan(addrs.tokenizer_packer.clone(), uses("pack"))
                .await?
                .map(TokenizerPackerClient::new),
            trainer: chan(addrs.trainer.clone(), uses("train"))
                .await?
                .map(TrainerClient::new),
            evaluator: chan(addrs.evaluator.clone(), uses("evaluate"))
                .await?
                .map(EvaluatorClient::new),
            rollout: chan(addrs.rollout.clone(), uses("rollout"))
                .await?
                .map(RolloutClient::new),
            tasks: chan(addrs.tasks.clone(), uses("tasks"))
                .await?
                .map(TasksClient::new),
            checkpoints: None,
            eval_model: None,
        })
    }

    /// Lets the evaluate stage serve the run's final checkpoint (specs without
    /// `evaluation.model_url`).
    pub fn with_checkpoint_server(mut self, s: Arc<dyn CheckpointServer>) -> Self {
        self.checkpoints = Some(s);
        self
    }
}

/// Every stage a run can have, in order.
pub const STAGES: [&str; 7] = [
    "crawl",
    "reconstruct",
    "tasks",
    "rollout",
    "pack",
    "train",
    "evaluate",
];

/// The stages `spec` runs: the optional ones only with their section (`tasks:`, `rollout:`,
/// `training:`, `evaluation:`).
pub fn stages(spec: &RunSpec) -> Vec<&'static str> {
    STAGES
        .into_iter()
        .filter(|s| match *s {
            "tasks" => spec.tasks.is_some(),
            "rollout" => spec.rollout.is_some(),
            "train" => spec.training.is_some(),
            "evaluate" => spec.evaluation.is_some(),
            _ => true,
        })
        .collect()
}

/// How many jobs a stage is: one per benchmark for evaluate, else one.
fn parts(stage: &str, spec: &RunSpec) -> usize {
    match (stage, &spec.evaluation) {
        ("evaluate", Some(e)) => e.benchmarks.len(),
        _ => 1,
    }
}

/// A client the run connected (a stage outside the run's list has none).
fn client<'a, T>(c: &'a mut Option<T>, stage: &str) -> Result<&'a mut T, tonic::Status> {
    c.as_mut().ok_or_else(|| {
        tonic::Status::failed_precondition(format!("no client for the {stage} stage"))
    })
}

impl StageClients {
    async fn start(
        &mut self,
        stage: &str,
        part: usize,
        run_id: &str,
        spec: &RunSpec,
        root: &str,
    ) -> Result<Job, tonic::Status> {
        let run_id = run_id.to_string();
        let r = match stage {
            "crawl" => {
                client(&mut self.crawler, stage)?
                    .start_crawl(StartCrawlRequest {
                        run_id,
                        spec: Some(spec.crawl_spec(root)),
                    })
                    .await
            }
            "reconstruct" => {
                let s = spec.reconstruct_spec(root, &run_id);
                client(&mut self.reconstructor, stage)?
                    .start_reconstruct(StartReconstructRequest {
                        run_id,
                        spec: Some(s),
                    })
                    .await
            }
            "pack" => {
                let s = spec.pack_spec(root, &run_id);
                client(&mut self.packer, stage)?
                    .start_pack(StartPackRequest {
                        run_id,
                        spec: Some(s),
                    })
                    .await
            }
            "train" => {
                let s = spec.train_spec(root, &run_id);
                client(&mut self.trainer, stage)?
                    .start_train(StartTrainRequest { run_id, spec: s })
                    .await
            }
            "tasks" => {
                let s = spec.tasks_spec(root, &run_id);
                client(&mut self.tasks, stage)?
                    .start_tasks(StartTasksRequest { run_id, spec: s })
                    .await
            }
            "rollout" => {
                let s = spec.rollout_spec(root, &run_id);
                client(&mut self.rollout, stage)?
                    .start_rollout(StartRolloutRequest { run_id, spec: s })
                    .await
            }
            _ => {
                let (url, model) = self.eval_model.clone().ok_or_else(|| {
                    tonic::Status::failed_precondition("the evaluate stage has no model endpoint")
                })?;
                let s = spec.eval_spec(root, &run_id, part, &url, &model);
                client(&mut self.evaluator, stage)?
                    .start_eval(StartEvalRequest { run_id, spec: s })
                    .await
            }
        };
        r.map(|r| r.into_inner())
    }

    async fn get(&mut self, stage: &str, id: &str) -> Result<Job, tonic::Status> {
        let r = JobRef {
            job_id: id.to_string(),
        };
        match stage {
            "crawl" => client(&mut self.crawler, stage)?.get_crawl(r).await,
            "reconstruct" => {
                client(&mut self.reconstructor, stage)?
                    .get_reconstruct(r)
                    .await
            }
            "pack" => client(&mut self.packer, stage)?.get_pack(r).await,
            "train" => client(&mut self.trainer, stage)?.get_train(r).await,
            "tasks" => client(&mut self.tasks, stage)?.get_tasks(r).await,
            "rollout" => client(&mut self.rollout, stage)?.get_rollout(r).await,
            _ => client(&mut self.evaluator, stage)?.get_eval(r).await,
        }
        .map(|r| r.into_inner())
    }

    async fn watch(
        &mut self,
        stage: &str,
        id: &str,
    ) -> Result<tonic::Streaming<ProgressEvent>, tonic::Status> {
        let r = JobRef {
            job_id: id.to_string(),
        };
        match stage {
            "crawl" => client(&mut self.crawler, stage)?.watch_crawl(r).await,
            "reconstruct" => {
                client(&mut self.reconstructor, stage)?
                    .watch_reconstruct(r)
                    .await
            }
            "pack" => client(&mut self.packer, stage)?.watch_pack(r).await,
            "train" => client(&mut self.trainer, stage)?.watch_train(r).await,
            "tasks" => client(&mut self.tasks, stage)?.watch_tasks(r).await,
            "rollout" => client(&mut self.rollout, stage)?.watch_rollout(r).await,
            _ => client(&mut self.evaluator, stage)?.watch_eval(r).await,
        }
        .map(|r| r.into_inner())
    }

    async fn cancel(&mut self, stage: &str, id: &str) {
        let r = JobRef {
            job_id: id.to_string(),
        };
        let res = async {
            match stage {
                "crawl" => client(&mut self.crawler, stage)?.cancel_crawl(r).await,
                "reconstruct" => {
                    client(&mut self.reconstructor, stage)?
                        .cancel_reconstruct(r)
                        .await
                }
                "pack" => client(&mut self.packer, stage)?.cancel_pack(r).await,
                "train" => client(&mut self.trainer, stage)?.cancel_train(r).await,
                "tasks" => client(&mut self.tasks, stage)?.cancel_tasks(r).await,
                "rollout" => client(&mut self.rollout, stage)?.cancel_rollout(r).await,
                _ => client(&mut self.evaluator, stage)?.cancel_eval(r).await,
            }
        }
        .await;
        if let Err(e) = res {
            tracing::warn!(stage, job_id = id, error = %e, "cancelling the stage job failed");
        }
    }

    /// The endpoint the evaluate stage drives: the spec's, or the train stage's final
    /// checkpoint served here (`None` for a spec with neither).
    async fn eval_endpoint(
        &mut self,
        spec: &RunSpec,
        checkpoints: &[String],
    ) -> anyhow::Result<Option<ServedModel>> {
        let Some(e) = &spec.evaluation else {
            return Ok(None);
        };
        if let (Some(url), Some(model)) = (&e.model_url, &e.model) {
            self.eval_model = Some((url.clone(), model.clone()));
            return Ok(None);
        }
        // The newest checkpoint: `.../checkpoints/{step}` with the highest step.
        let last = checkpoints
            .iter()
            .filter_map(|c| Some((c.rsplit('/').next()?.parse::<u64>().ok()?, c)))
            .max()
            .map(|(_, c)| c.clone())
            .ok_or_else(|| anyhow::anyhow!("evaluate: the train stage reported no checkpoint"))?;
        let server = self.checkpoints.clone().ok_or_else(|| {
            anyhow::anyhow!(
                "evaluate: this conductor serves no checkpoints; give evaluation.model_url and evaluation.model (e.g. `davinci serve --target inference --model {last}`)"
            )
        })?;
        let served = server
            .serve(&last, &spec.tokenizer)
            .await
            .map_err(|e| e.context(format!("evaluate: serving the checkpoint {last}")))?;
        self.eval_model = Some((served.url.clone(), served.model.clone()));
        Ok(Some(served))
    }
}

fn state(job: &Job) -> JobState {
    JobState::try_from(job.state).unwrap_or(JobState::Unspecified)
}

/// How often a stage is started again after its service lost it (process killed, restarted).
const STAGE_ATTEMPTS: u32 = 5;

/// What became of one attempt at a stage.
enum Attempt {
    Ended(Box<Job>),
    /// The service lost the job; the stage may be started again (stages are idempotent).
    Lost(String),
}

fn lost(e: &tonic::Status) -> bool {
    matches!(
        e.code(),
        tonic::Code::Unavailable
            | tonic::Code::NotFound
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
    )
}

/// Runs every stage in order. `on_update` sees each stage's status as it changes; a stage
/// that fails or is cancelled stops the run with its error. A stage whose service dies is
/// started again once the service answers (up to a bound): stages write content-named objects
/// and commit with their stats last, so a repeated stage loses and duplicates nothing.
pub async fn execute(
    clients: &mut StageClients,
    run_id: &str,
    root: &str,
    spec: &RunSpec,
    cancel: &CancellationToken,
    mut on_update: impl FnMut(&StageStatus) + Send,
) -> anyhow::Result<Vec<StageStatus>> {
    let mut done = Vec::new();
    let mut checkpoints = Vec::new();
    for stage in stages(spec) {
        let started = Instant::now();
        let mut status = StageStatus {
            stage: stage.to_string(),
            ..Default::default()
        };
        // Held while the stage runs: the checkpoint's endpoint when this process serves it.
        let _served = match stage {
            "evaluate" => clients.eval_endpoint(spec, &checkpoints).await?,
            _ => None,
        };
        let n = parts(stage, spec);
        // Counters of the parts done so far, each under its part's prefix.
        let mut carried = std::collections::HashMap::new();
        for part in 0..n {
            let prefix = match (stage, &spec.evaluation) {
                ("evaluate", Some(e)) => format!("{}.", e.benchmarks[part].name),
                _ => String::new(),
            };
            let mut attempt = 0;
            let last = loop {
                attempt += 1;
                match run_stage(
                    clients,
                    Part {
                        stage,
                        index: part,
                        prefix: &prefix,
                        carried: &carried,
                    },
                    run_id,
                    root,
                    spec,
                    cancel,
                    &mut status,
                    started,
                    &mut on_update,
                )
                .await?
                {
                    Attempt::Ended(job) => break *job,
                    Attempt::Lost(why) if attempt < STAGE_ATTEMPTS => {
                        tracing::warn!(stage, attempt, reason = %why, "stage job lost; starting it again");
                        *status.counters.entry("restarts".into()).or_default() += 1;
                        on_update(&status);
                        tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
                    }
                    Attempt::Lost(why) => {
                        anyhow::bail!("{stage}: lost {attempt} times, last: {why}")
                    }
                }
            };
            let restarts = status.counters.get("restarts").copied();
            status.state = last.state;
            (status.done, status.total) = match n {
                1 => (last.done, last.total),
                _ => (part as u64 + 1, n as u64),
            };
            for (k, v) in &last.counters {
                carried.insert(format!("{prefix}{k}"), *v);
            }
            status.counters = carried.clone();
            if let Some(r) = restarts {
                status.counters.insert("restarts".into(), r);
                carried.insert("restarts".into(), r);
            }
            status.wall_seconds = started.elapsed().as_secs_f64();
            if stage == "train" {
                checkpoints = last.outputs.clone();
            }
            if state(&last) != JobState::Succeeded {
                on_update(&status);
                done.push(status);
                anyhow::bail!(
                    "{stage}{} {}: {}",
                    prefix
                        .strip_suffix('.')
                        .map(|p| format!(" {p}"))
                        .unwrap_or_default(),
                    state(&last)
                        .as_str_name()
                        .trim_start_matches("JOB_STATE_")
                        .to_lowercase(),
                    last.error
                );
            }
            if part + 1 < n {
                // The stage goes on with its next job.
                status.state = JobState::Running as i32;
                on_update(&status);
            }
        }
        on_update(&status);
        done.push(status);
    }
    Ok(done)
}

/// One job of a stage: its index among the stage's jobs, the prefix of its counters and the
/// counters of the jobs before it.
struct Part<'a> {
    stage: &'a str,
    index: usize,
    prefix: &'a str,
    carried: &'a std::collections::HashMap<String, u64>,
}

/// Starts one stage job and follows it to its end, or until its service loses it.
#[allow(clippy::too_many_arguments)]
async fn run_stage(
    clients: &mut StageClients,
    part: Part<'_>,
    run_id: &str,
    root: &str,
    spec: &RunSpec,
    cancel: &CancellationToken,
    status: &mut StageStatus,
    started: Instant,
    on_update: &mut (impl FnMut(&StageStatus) + Send),
) -> anyhow::Result<Attempt> {
    let stage = part.stage;
    let job = match clients.start(stage, part.index, run_id, spec, root).await {
        Ok(j) => j,
        Err(e) if e.code() == tonic::Code::Unavailable => {
            return Ok(Attempt::Lost(format!("start: {}", e.message())));
        }
        Err(e) => anyhow::bail!("{stage}: could not start: {}", e.message()),
    };
    status.state = job.state;
    status.job_id = job.job_id.clone();
    on_update(status);
    let mut events = clients.watch(stage, &job.job_id).await.ok();
    loop {
        let next = async {
            match events.as_mut() {
                Some(s) => s.next().await,
                None => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    None
                }
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => {
                clients.cancel(stage, &job.job_id).await;
                status.state = JobState::Cancelled as i32;
                status.wall_seconds = started.elapsed().as_secs_f64();
                on_update(status);
                anyhow::bail!("run cancelled during {stage}");
            }
            ev = next => match ev {
                Some(Ok(ev)) => {
                    status.state = ev.state;
                    status.done = ev.done;
                    status.total = ev.total;
                    let restarts = status.counters.get("restarts").copied();
                    status.counters = part.carried.clone();
                    for (k, v) in ev.counters {
                        status.counters.insert(format!("{}{k}", part.prefix), v);
                    }
                    if let Some(r) = restarts {
                        status.counters.insert("restarts".into(), r);
                    }
                    status.wall_seconds = started.elapsed().as_secs_f64();
                    on_update(status);
                }
                // The stream ended or broke (server restart, network): ask for the job itself.
                _ => {
                    match clients.get(stage, &job.job_id).await {
                        Ok(j) if j.message == INTERRUPTED => return Ok(Attempt::Lost("the service restarted".into())),
                        Ok(j) if state(&j).is_terminal() => return Ok(Attempt::Ended(Box::new(j))),
                        Ok(_) => events = clients.watch(stage, &job.job_id).await.ok(),
                        Err(e) if lost(&e) => {
                            if e.code() == tonic::Code::NotFound {
                                return Ok(Attempt::Lost(format!("job {} unknown to the service", job.job_id)));
                            }
                            // Down for now: wait for it to come back, bounded.
                            match wait_for(clients, stage, &job.job_id).await {
                                Some(j) if j.message == INTERRUPTED => return Ok(Attempt::Lost("the service restarted".into())),
                                Some(j) if state(&j).is_terminal() => return Ok(Attempt::Ended(Box::new(j))),
                                Some(_) => events = clients.watch(stage, &job.job_id).await.ok(),
                                None => return Ok(Attempt::Lost(format!("service unreachable: {}", e.message()))),
                            }
                        }
                        Err(e) => anyhow::bail!("{stage}: following job {}: {}", job.job_id, e.message()),
                    }
                }
            }
        }
    }
}

/// Polls the stage's job until its service answers again (up to two minutes).
async fn wait_for(clients: &mut StageClients, stage: &str, id: &str) -> Option<Job> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
        match clients.get(stage, id).await {
            Ok(j) => return Some(j),
            Err(e) if e.code() == tonic::Code::NotFound => return None,
            Err(_) => {}
        }
    }
    None
}
