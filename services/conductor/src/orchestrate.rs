//! Drives one run through its stages over gRPC: crawl → reconstruct → pack (→ train when the
//! spec has a `training:` section). The embedded
//! `davinci run` and the distributed conductor use this same code, so both produce the same
//! outputs for the same spec.
use crate::spec::RunSpec;
use davinci_proto::v1::crawler_client::CrawlerClient;
use davinci_proto::v1::reconstructor_client::ReconstructorClient;
use davinci_proto::v1::tokenizer_packer_client::TokenizerPackerClient;
use davinci_proto::v1::trainer_client::TrainerClient;
use davinci_proto::v1::{
    Job, JobRef, JobState, ProgressEvent, StageStatus, StartCrawlRequest, StartPackRequest,
    StartReconstructRequest, StartTrainRequest,
};
use davinci_runtime::grpc::{self, ClientInterceptor};
use davinci_runtime::jobs::INTERRUPTED;
use futures::StreamExt;
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
}

/// gRPC clients of the stage services a run uses.
#[derive(Clone)]
pub struct StageClients {
    crawler: CrawlerClient<Chan>,
    reconstructor: ReconstructorClient<Chan>,
    packer: TokenizerPackerClient<Chan>,
    trainer: TrainerClient<Chan>,
}

impl StageClients {
    pub async fn connect(addrs: &StageAddrs, token: Option<&str>) -> anyhow::Result<Self> {
        let i = ClientInterceptor::new(token)?;
        Ok(Self {
            crawler: CrawlerClient::with_interceptor(
                grpc::connect(&addrs.crawler).await?,
                i.clone(),
            ),
            reconstructor: ReconstructorClient::with_interceptor(
                grpc::connect(&addrs.reconstructor).await?,
                i.clone(),
            ),
            packer: TokenizerPackerClient::with_interceptor(
                grpc::connect(&addrs.tokenizer_packer).await?,
                i.clone(),
            ),
            trainer: TrainerClient::with_interceptor(grpc::connect(&addrs.trainer).await?, i),
        })
    }
}

/// Every stage a run can have, in order.
pub const STAGES: [&str; 4] = ["crawl", "reconstruct", "pack", "train"];

/// The stages `spec` runs: train only with a `training:` section.
pub fn stages(spec: &RunSpec) -> Vec<&'static str> {
    STAGES
        .into_iter()
        .filter(|s| *s != "train" || spec.training.is_some())
        .collect()
}

impl StageClients {
    async fn start(
        &mut self,
        stage: &str,
        run_id: &str,
        spec: &RunSpec,
        root: &str,
    ) -> Result<Job, tonic::Status> {
        let run_id = run_id.to_string();
        let r = match stage {
            "crawl" => {
                self.crawler
                    .start_crawl(StartCrawlRequest {
                        run_id,
                        spec: Some(spec.crawl_spec(root)),
                    })
                    .await
            }
            "reconstruct" => {
                let s = spec.reconstruct_spec(root, &run_id);
                self.reconstructor
                    .start_reconstruct(StartReconstructRequest {
                        run_id,
                        spec: Some(s),
                    })
                    .await
            }
            "pack" => {
                let s = spec.pack_spec(root, &run_id);
                self.packer
                    .start_pack(StartPackRequest {
                        run_id,
                        spec: Some(s),
                    })
                    .await
            }
            _ => {
                let s = spec.train_spec(root, &run_id);
                self.trainer
                    .start_train(StartTrainRequest { run_id, spec: s })
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
            "crawl" => self.crawler.get_crawl(r).await,
            "reconstruct" => self.reconstructor.get_reconstruct(r).await,
            "pack" => self.packer.get_pack(r).await,
            _ => self.trainer.get_train(r).await,
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
            "crawl" => self.crawler.watch_crawl(r).await,
            "reconstruct" => self.reconstructor.watch_reconstruct(r).await,
            "pack" => self.packer.watch_pack(r).await,
            _ => self.trainer.watch_train(r).await,
        }
        .map(|r| r.into_inner())
    }

    async fn cancel(&mut self, stage: &str, id: &str) {
        let r = JobRef {
            job_id: id.to_string(),
        };
        let res = match stage {
            "crawl" => self.crawler.cancel_crawl(r).await,
            "reconstruct" => self.reconstructor.cancel_reconstruct(r).await,
            "pack" => self.packer.cancel_pack(r).await,
            _ => self.trainer.cancel_train(r).await,
        };
        if let Err(e) = res {
            tracing::warn!(stage, job_id = id, error = %e, "cancelling the stage job failed");
        }
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
    for stage in stages(spec) {
        let started = Instant::now();
        let mut status = StageStatus {
            stage: stage.to_string(),
            ..Default::default()
        };
        let mut attempt = 0;
        let last = loop {
            attempt += 1;
            match run_stage(
                clients,
                stage,
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
                Attempt::Lost(why) => anyhow::bail!("{stage}: lost {attempt} times, last: {why}"),
            }
        };
        let restarts = status.counters.get("restarts").copied();
        status.state = last.state;
        status.done = last.done;
        status.total = last.total;
        status.counters = last.counters.clone();
        if let Some(r) = restarts {
            status.counters.insert("restarts".into(), r);
        }
        status.wall_seconds = started.elapsed().as_secs_f64();
        on_update(&status);
        done.push(status);
        if state(&last) != JobState::Succeeded {
            anyhow::bail!(
                "{stage} {}: {}",
                state(&last)
                    .as_str_name()
                    .trim_start_matches("JOB_STATE_")
                    .to_lowercase(),
                last.error
            );
        }
    }
    Ok(done)
}

/// Starts one stage job and follows it to its end, or until its service loses it.
#[allow(clippy::too_many_arguments)]
async fn run_stage(
    clients: &mut StageClients,
    stage: &str,
    run_id: &str,
    root: &str,
    spec: &RunSpec,
    cancel: &CancellationToken,
    status: &mut StageStatus,
    started: Instant,
    on_update: &mut (impl FnMut(&StageStatus) + Send),
) -> anyhow::Result<Attempt> {
    let job = match clients.start(stage, run_id, spec, root).await {
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
                    status.counters = ev.counters;
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
