//! gRPC wiring of the trainer service: `StartTrain` with engine `candle` runs the in-process
//! trainer ([`crate::train::train`] on a blocking thread) as a job of the runtime's registry;
//! engine `jobset` submits the job's JobSets / TrainJobs and follows them
//! ([`crate::jobset::follow`]); Get/Watch/Cancel answer from the registry (cancel also deletes
//! the Kubernetes objects). [`TrainerService::reattach`] picks up a previous process's jobs.
use crate::config::{Overrides, TrainConfig};
use crate::data::{self, read_manifest};
use crate::jobset::follow::{self, Event};
use crate::jobset::{self, Plan};
use crate::storage;
use crate::train::{self, Job as TrainJob, ModelSource};
use anyhow::Context;
use davinci_proto::v1::trainer_server::{Trainer, TrainerServer};
use davinci_proto::v1::{Job, JobRef, StartTrainRequest, TrainSpec};
use davinci_runtime::blob::S3Config;
use davinci_runtime::grpc::{self, ProgressStream};
use davinci_runtime::jobs::JobHandle;
use davinci_runtime::jobs::JobRegistry;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tonic::{Request, Response, Status};

/// Answers the Trainer RPCs from a job registry.
#[derive(Clone)]
pub struct TrainerService {
    jobs: JobRegistry,
    /// The Kubernetes client of the jobset engine (inferred on first use when not given).
    kube: Arc<tokio::sync::OnceCell<kube::Client>>,
    s3: S3Config,
}

impl std::fmt::Debug for TrainerService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainerService")
            .field("jobs", &self.jobs)
            .finish_non_exhaustive()
    }
}

impl TrainerService {
    pub fn new(jobs: JobRegistry) -> Self {
        Self {
            jobs,
            kube: Arc::default(),
            s3: S3Config::default(),
        }
    }

    /// Uses `client` for the jobset engine instead of the in-cluster / kubeconfig one.
    pub fn with_kube(self, client: kube::Client) -> Self {
        Self {
            kube: Arc::new(tokio::sync::OnceCell::new_with(Some(client))),
            ..self
        }
    }

    /// Reads manifests and model configs on S3 with these settings.
    pub fn with_s3(self, s3: S3Config) -> Self {
        Self { s3, ..self }
    }

    async fn kube_client(&self) -> anyhow::Result<kube::Client> {
        self.kube
            .get_or_try_init(|| async {
                let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
                kube::Client::try_default().await.context(
                    "engine jobset needs a Kubernetes API: none in-cluster and no kubeconfig",
                )
            })
            .await
            .cloned()
    }

    /// Follows again the jobset jobs a previous trainer process left running in `namespaces`
    /// (found by label); returns how many.
    pub async fn reattach(&self, namespaces: &[&str]) -> anyhow::Result<usize> {
        let client = self.kube_client().await?;
        let mut n = 0;
        for ns in namespaces {
            for plan in follow::owned_plans(&client, ns).await? {
                tracing::info!(job = %plan.job_id, run = %plan.run_id, "re-attaching to a jobset job");
                self.spawn_cluster(client.clone(), plan).await?;
                n += 1;
            }
        }
        Ok(n)
    }

    async fn spawn_cluster(&self, client: kube::Client, plan: Plan) -> Result<Job, Status> {
        let spec_json = serde_json::json!({
            "engine": "jobset", "out": plan.out, "model": plan.model_uri,
            "objects": plan.stages.iter().map(|s| &s.object).collect::<Vec<_>>(),
            "namespace": plan.cluster.namespace,
        })
        .to_string();
        let (id, run) = (plan.job_id.clone(), plan.run_id.clone());
        Ok(self
            .jobs
            .spawn_with_id(&id, "train", &run, spec_json, move |handle| {
                Box::pin(follow_cluster_job(client, plan, handle))
            })
            .await?)
    }

    pub fn into_server(self) -> TrainerServer<Self> {
        TrainerServer::new(self)
    }
}

fn local(uri: &str, what: &str) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(
        !uri.contains("://") || uri.starts_with("file://"),
        "{what} `{uri}`: a local path, file:// or s3:// URI is needed"
    );
    anyhow::ensure!(!uri.is_empty(), "{what} is required");
    Ok(PathBuf::from(uri.strip_prefix("file://").unwrap_or(uri)))
}

/// The training job a `TrainSpec` describes, validated (the manifest is read, the config
/// checked); `model_config_json` is written to `out/model-config.json` when no model path is
/// given.
pub fn job_from_spec(spec: &TrainSpec) -> anyhow::Result<TrainJob> {
    let manifest_path = local(&spec.data, "spec.data")?;
    let out = local(&spec.out, "spec.out")?;
    let manifest = read_manifest(&manifest_path)?;
    let base: TrainConfig = if spec.config_json.trim().is_empty() {
        TrainConfig::default()
    } else {
        serde_json::from_str(&spec.config_json).context("spec.config_json")?
    };
    let config = base.resolve(
        &manifest,
        &Overrides {
            steps: (spec.steps > 0).then_some(spec.steps),
            global_batch: (spec.global_batch > 0).then_some(spec.global_batch as usize),
            lr: (spec.learning_rate > 0.0).then_some(spec.learning_rate),
            ..Default::default()
        },
    )?;
    let model = if !spec.model.is_empty() {
        let p = local(&spec.model, "spec.model")?;
        anyhow::ensure!(p.exists(), "spec.model {} does not exist", p.display());
        ModelSource::from_path(&p)
    } else {
        anyhow::ensure!(
            !spec.model_config_json.trim().is_empty(),
            "spec.model (config.json or Hugging Face directory) or spec.model_config_json is required"
        );
        davinci_model::Qwen2Config::from_json(&spec.model_config_json)?;
        std::fs::create_dir_all(&out)?;
        let p = out.join("model-config.json");
        std::fs::write(&p, &spec.model_config_json)?;
        ModelSource::Config(p)
    };
    Ok(TrainJob {
        manifest: manifest_path,
        model,
        out,
        config,
        device: davinci_model::Device::Cpu,
        precision: davinci_model::Precision::F32,
    })
}

/// A jobset job: submits and follows its stages, reporting Megatron's iterations as progress;
/// a cancel deletes its objects.
async fn follow_cluster_job(
    client: kube::Client,
    plan: Plan,
    handle: JobHandle,
) -> anyhow::Result<Vec<String>> {
    let token = handle.cancel_token();
    let (c, ns, kind, id) = (
        client.clone(),
        plan.cluster.namespace.clone(),
        plan.cluster.kind,
        plan.job_id.clone(),
    );
    let canceller = tokio::spawn(async move {
        token.cancelled().await;
        match follow::cancel(&c, &ns, kind, &id).await {
            Ok(n) => tracing::info!(job = %id, objects = n, "cancelled: deleted the job's objects"),
            Err(e) => {
                tracing::error!(job = %id, "cancel could not delete the job's objects: {e:#}")
            }
        }
    });
    let total = plan.total_iters();
    let seq_len = plan
        .stages
        .first()
        .and_then(|s| {
            s.args
                .iter()
                .position(|a| a == "--seq-length")
                .map(|i| &s.args[i + 1])
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let names: Vec<String> = plan.stages.iter().map(|s| s.name.clone()).collect();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let h = handle.clone();
    let reporter = tokio::spawn(async move {
        while let Some(e) = rx.recv().await {
            match e {
                Event::Iteration { stage, step, it } => {
                    let tps = it.tokens_per_s(seq_len);
                    if let Some(l) = it.loss {
                        metrics::gauge!("davinci_trainer_loss").set(l);
                    }
                    if let Some(lr) = it.lr {
                        metrics::gauge!("davinci_trainer_learning_rate").set(lr);
                    }
                    if let Some(t) = tps {
                        metrics::gauge!("davinci_trainer_tokens_per_second").set(t);
                    }
                    metrics::gauge!("davinci_trainer_step").set(step as f64);
                    metrics::counter!("davinci_trainer_steps_total").increment(1);
                    let msg = format!(
                        "{} iteration {}/{} loss {} lr {} {} tok/s",
                        names[stage],
                        it.iteration,
                        it.train_iters,
                        it.loss.map_or("-".into(), |l| format!("{l:.4}")),
                        it.lr.map_or("-".into(), |l| format!("{l:.2e}")),
                        tps.map_or("-".into(), |t| format!("{t:.0}")),
                    );
                    h.progress(step, total, &msg).await;
                }
                Event::Submitted { stage, object } => {
                    h.progress(0, total, &format!("{} submitted as {object}", names[stage]))
                        .await;
                }
                Event::Restarted { stage, restarts } => {
                    h.count("restarts", 1).await;
                    tracing::warn!(stage = %names[stage], restarts, "the stage's pods restarted");
                }
                Event::StageDone { stage, checkpoint } => {
                    h.count("stages", 1).await;
                    tracing::info!(stage = %names[stage], %checkpoint, "stage finished");
                }
            }
        }
    });
    let result = follow::run(&client, &plan, &mut |e| {
        let _ = tx.send(e);
    })
    .await;
    drop(tx);
    let _ = reporter.await;
    canceller.abort();
    result
}

fn invalid(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}

#[tonic::async_trait]
impl Trainer for TrainerService {
    async fn start_train(&self, req: Request<StartTrainRequest>) -> Result<Response<Job>, Status> {
        let req = req.into_inner();
        let spec = req.spec.ok_or_else(|| invalid("spec is required"))?;
        match spec.engine.as_str() {
            "" | "candle" => {}
            "jobset" => {
                let job_id = uuid::Uuid::new_v4().simple().to_string();
                let plan = jobset::plan_from_spec(&spec, &req.run_id, &job_id, &self.s3)
                    .await
                    .map_err(|e| invalid(format!("{e:#}")))?;
                let client = self
                    .kube_client()
                    .await
                    .map_err(|e| Status::failed_precondition(format!("{e:#}")))?;
                return Ok(Response::new(self.spawn_cluster(client, plan).await?));
            }
            e => return Err(invalid(format!("unknown engine `{e}` (candle or jobset)"))),
        }
        // Remote data and outputs: the manifest is fetched now so the job is checked before it
        // starts; the shards and the newest remote checkpoint follow in the job.
        let remote_data = storage::is_remote(&spec.data).then(|| spec.data.clone());
        let remote_out = storage::is_remote(&spec.out).then(|| spec.out.clone());
        let work = (remote_data.is_some() || remote_out.is_some())
            .then(|| tempfile::Builder::new().prefix("davinci-train-").tempdir())
            .transpose()
            .map_err(|e| Status::internal(format!("making a staging directory: {e}")))?;
        let mut local_spec = spec.clone();
        if let (Some(uri), Some(w)) = (&remote_data, &work) {
            let m = storage::fetch_manifest(uri, &self.s3, &w.path().join("data"))
                .await
                .map_err(|e| invalid(format!("spec.data: {e:#}")))?;
            local_spec.data = m.display().to_string();
        }
        if let (Some(_), Some(w)) = (&remote_out, &work) {
            local_spec.out = w.path().join("out").display().to_string();
        }
        let job = job_from_spec(&local_spec).map_err(|e| invalid(format!("{e:#}")))?;
        let remote = match (&remote_out, &work) {
            (Some(uri), Some(_)) => Some(
                storage::RemoteOut::open(uri, &self.s3, &job.out)
                    .await
                    .map_err(|e| invalid(format!("spec.out: {e:#}")))?,
            ),
            _ => None,
        };
        let s3 = self.s3.clone();
        let spec_json = serde_json::json!({
            "data": spec.data, "out": spec.out, "model": spec.model, "engine": "candle",
            "config": job.config,
        })
        .to_string();
        let out_uri = spec.out.trim_end_matches('/').to_string();
        let rt = tokio::runtime::Handle::current();
        let created = self
            .jobs
            .spawn("train", &req.run_id, spec_json, move |handle| {
                Box::pin(async move {
                    let _work = work;
                    if let Some(uri) = &remote_data {
                        storage::stage_shards(uri, &s3, &data::data_root(&job.manifest)).await?;
                    }
                    if let Some(r) = &remote
                        && let Some(step) = r.restore().await?
                    {
                        tracing::info!(step, out = %out_uri, "resuming from the remote checkpoint");
                    }
                    let cancel = Arc::new(AtomicBool::new(false));
                    let (flag, token) = (cancel.clone(), handle.cancel_token());
                    tokio::spawn(async move {
                        token.cancelled().await;
                        flag.store(true, Ordering::Relaxed);
                    });
                    let h = handle.clone();
                    let rt2 = rt.clone();
                    let summary = tokio::task::spawn_blocking(move || {
                        train::train_with(
                            &job,
                            &mut |r| {
                                let msg = format!(
                                    "{} step {}/{} loss {:.4} lr {:.2e} {:.0} tok/s",
                                    r.stage,
                                    r.stage_step,
                                    r.stage_steps,
                                    r.loss,
                                    r.lr,
                                    r.tokens_per_s
                                );
                                rt.block_on(h.progress(r.step, r.total_steps, &msg));
                            },
                            &cancel,
                            &mut |dir| match &remote {
                                Some(r) => rt2.block_on(r.publish_checkpoint(dir)),
                                None => Ok(()),
                            },
                        )
                    })
                    .await??;
                    handle.count("steps", summary.steps).await;
                    handle.count("tokens", summary.tokens).await;
                    Ok(summary
                        .checkpoints
                        .iter()
                        .filter_map(|c| c.file_name())
                        .map(|n| format!("{out_uri}/checkpoints/{}", n.to_string_lossy()))
                        .collect())
                })
            })
            .await?;
        Ok(Response::new(created))
    }

    async fn get_train(&self, req: Request<JobRef>) -> Result<Response<Job>, Status> {
        grpc::get_job(&self.jobs, &req.into_inner().job_id).await
    }

    type WatchTrainStream = ProgressStream;

    async fn watch_train(&self, req: Request<JobRef>) -> Result<Response<ProgressStream>, Status> {
        grpc::watch_job(&self.jobs, &req.into_inner().job_id).await
    }

    async fn cancel_train(&self, req: Request<JobRef>) -> Result<Response<Job>, Status> {
        grpc::cancel_job(&self.jobs, &req.into_inner().job_id).await
    }
}
