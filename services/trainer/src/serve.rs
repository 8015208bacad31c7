//! gRPC wiring of the trainer service: `StartTrain` with engine `candle` runs the in-process
//! trainer ([`crate::train::train`] on a blocking thread) as a job of the runtime's registry;
//! Get/Watch/Cancel answer from it. Engine `jobset` (the cluster engine) is refused until it
//! exists.
use crate::config::{Overrides, TrainConfig};
use crate::data::read_manifest;
use crate::train::{self, Job as TrainJob, ModelSource};
use anyhow::Context;
use davinci_proto::v1::trainer_server::{Trainer, TrainerServer};
use davinci_proto::v1::{Job, JobRef, StartTrainRequest, TrainSpec};
use davinci_runtime::grpc::{self, ProgressStream};
use davinci_runtime::jobs::JobRegistry;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tonic::{Request, Response, Status};

/// Answers the Trainer RPCs from a job registry.
#[derive(Debug, Clone)]
pub struct TrainerService {
    jobs: JobRegistry,
}

impl TrainerService {
    pub fn new(jobs: JobRegistry) -> Self {
        Self { jobs }
    }

    pub fn into_server(self) -> TrainerServer<Self> {
        TrainerServer::new(self)
    }
}

fn local(uri: &str, what: &str) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(
        !uri.contains("://") || uri.starts_with("file://"),
        "{what} `{uri}`: the candle engine reads and writes local paths (path or file://)"
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
                return Err(Status::unimplemented(
                    "engine jobset (JobSet + Megatron-LM on Kubernetes) is not built yet; use engine candle",
                ));
            }
            e => return Err(invalid(format!("unknown engine `{e}` (candle or jobset)"))),
        }
        let job = job_from_spec(&spec).map_err(|e| invalid(format!("{e:#}")))?;
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
                    let cancel = Arc::new(AtomicBool::new(false));
                    let (flag, token) = (cancel.clone(), handle.cancel_token());
                    tokio::spawn(async move {
                        token.cancelled().await;
                        flag.store(true, Ordering::Relaxed);
                    });
                    let h = handle.clone();
                    let summary = tokio::task::spawn_blocking(move || {
                        train::train(
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
