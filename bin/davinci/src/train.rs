//! `davinci train`: train a Qwen2 model in this process on packed shards (the candle engine),
//! with a progress bar, per-step JSON log and checkpoints; rerun the same command to resume.
//! `--engine jobset` renders the Megatron-LM JobSets / TrainJobs instead (`--render` prints
//! them, as `helm template` does) or submits and follows them on the current cluster.
use anyhow::Context;
use davinci_trainer::config::{Overrides, TrainConfig};
use davinci_trainer::storage;
use davinci_trainer::train::{self, Job, ModelSource};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Stages run in the manifest's order, each continuing from the last one's \
weights: mid-training stages (mask `all`) at peak lr 8e-5 with 5% warmup for one epoch, SFT \
stages (mask `assistant-only`) at 1e-5 with 10% warmup for five epochs, both with cosine decay \
to 10% unless --config says otherwise. Output: OUT/checkpoints/{step}/ (config.json, \
model.safetensors, optimizer.safetensors, state.json; Hugging Face layout) and \
OUT/train_log.jsonl. Running the same command again resumes from the newest checkpoint.

--engine jobset: --model is a Hugging Face model directory (s3:// or a path the pods mount),
--cluster a YAML file with the cluster settings (kind jobset|trainjob, namespace, image,
parallel {nodes, gpus_per_node, tp, pp}, checkpoint_claim, data_root, node_selector,
tolerations, priority_class, service_account, s3_secret, s3_endpoint, rdma, host_network,
shm_size, max_restarts, ttl_seconds_after_finished, runtime, extra_args); checkpoints land in
OUT/checkpoints/{step}/ after every stage."
)]
pub struct Args {
    /// The packer's manifest.json (its shards lie next to it): a path, file:// or s3://.
    #[arg(long)]
    pub data: PathBuf,
    /// A Qwen2 config.json (fresh weights from --seed) or a Hugging Face model directory
    /// (config.json + model.safetensors) to continue from.
    #[arg(long)]
    pub model: PathBuf,
    /// Output directory or prefix (path, file:// or s3://). An s3:// output gets every
    /// checkpoint as it is written, and a run started again resumes from the newest one there.
    #[arg(long)]
    pub out: String,
    /// Training config (YAML or JSON: stages with lr / warmup_ratio / min_lr_ratio / epochs /
    /// max_steps, global_batch, micro_batch, seed, clip, adamw, checkpoint_every).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Cap every stage at this many optimiser steps.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Rows (packed bins) per optimiser step.
    #[arg(long)]
    pub global_batch: Option<usize>,
    /// Rows per forward/backward pass (gradients accumulate up to --global-batch).
    #[arg(long)]
    pub micro_batch: Option<usize>,
    /// Peak learning rate of every stage.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Seed of the initial weights and the data order.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Checkpoint every this many steps (and at the end of every stage).
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Serve Prometheus /metrics on this address while training (e.g. 127.0.0.1:9464).
    #[arg(long)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// `candle` (this process) or `jobset` (Megatron-LM on Kubernetes).
    #[arg(long, default_value = "candle", value_parser = ["candle", "jobset"])]
    pub engine: String,
    /// Cluster settings of the jobset engine (YAML or JSON).
    #[arg(long)]
    pub cluster: Option<PathBuf>,
    /// With --engine jobset: print the objects it would submit and submit nothing.
    #[arg(long)]
    pub render: bool,
    /// Run id the jobset engine names and labels its objects with.
    #[arg(long, default_value = "local")]
    pub run_id: String,
}

fn read_yaml<T: serde::de::DeserializeOwned>(p: &std::path::Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    let de = serde_norway::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de)
        .map_err(|e| anyhow::anyhow!("{} at `{}`: {}", p.display(), e.path(), e.inner()))
}

/// `--engine jobset`: the plan of the flags; printed with --render, else submitted and followed.
async fn run_jobset(args: &Args) -> anyhow::Result<()> {
    use davinci_trainer::jobset::{self, follow, render};
    anyhow::ensure!(
        !(args.render && args.metrics_addr.is_some()),
        "--render prints objects; --metrics-addr is for a followed run"
    );
    let mut config = match &args.config {
        Some(p) => read_yaml::<serde_json::Value>(p)?,
        None => serde_json::json!({}),
    };
    let cluster: serde_json::Value = match &args.cluster {
        Some(p) => read_yaml(p)?,
        None => serde_json::json!({}),
    };
    for (k, v) in [
        ("micro_batch", args.micro_batch.map(|v| v as u64)),
        ("seed", args.seed),
        ("checkpoint_every", args.checkpoint_every),
    ] {
        if let Some(v) = v {
            config[k] = v.into();
        }
    }
    config["cluster"] = cluster;
    let spec = davinci_proto::v1::TrainSpec {
        data: args.data.display().to_string(),
        out: args.out.clone(),
        model: args.model.display().to_string(),
        engine: "jobset".into(),
        steps: args.steps.unwrap_or(0),
        learning_rate: args.lr.unwrap_or(0.0),
        global_batch: args.global_batch.unwrap_or(0) as u32,
        config_json: config.to_string(),
        ..Default::default()
    };
    let job_id = uuid::Uuid::new_v4().simple().to_string();
    let plan = jobset::plan_from_spec(&spec, &args.run_id, &job_id, &Default::default()).await?;
    if args.render {
        print!("{}", render::to_yaml(&render::objects(&plan)?)?);
        return Ok(());
    }
    if let Some(addr) = args.metrics_addr {
        davinci_runtime::telemetry::install_metrics(addr)?;
    }
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes cluster: neither in-cluster nor a kubeconfig")?;
    let bar = ProgressBar::new(plan.total_iters());
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] iteration {pos}/{len} {wide_msg} (eta {eta})",
        )
        .expect("valid template"),
    );
    let b = bar.clone();
    let names: Vec<String> = plan.stages.iter().map(|s| s.name.clone()).collect();
    let checkpoints = follow::run(&client, &plan, &mut |e| match e {
        follow::Event::Iteration { stage, step, it } => {
            b.set_position(step);
            b.set_message(format!(
                "{} loss {} lr {}",
                names[stage],
                it.loss.map_or("-".into(), |l| format!("{l:.4}")),
                it.lr.map_or("-".into(), |l| format!("{l:.2e}")),
            ));
        }
        follow::Event::Submitted { object, .. } => b.println(format!("submitted {object}")),
        follow::Event::Restarted { stage, restarts } => {
            b.println(format!("{}: pods restarted ({restarts})", names[stage]))
        }
        follow::Event::StageDone { stage, checkpoint } => {
            b.println(format!("{} done: checkpoint {checkpoint}", names[stage]))
        }
    })
    .await?;
    bar.finish_and_clear();
    for c in checkpoints {
        eprintln!("checkpoint {c}");
    }
    Ok(())
}

/// The job the flags describe, validated.
pub fn job(args: &Args) -> anyhow::Result<Job> {
    let config: TrainConfig = match &args.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let de = serde_norway::Deserializer::from_str(&text);
            serde_path_to_error::deserialize(de)
                .map_err(|e| anyhow::anyhow!("{} at `{}`: {}", p.display(), e.path(), e.inner()))?
        }
        None => TrainConfig::default(),
    };
    let manifest = davinci_trainer::data::read_manifest(&args.data)?;
    let config = config.resolve(
        &manifest,
        &Overrides {
            steps: args.steps,
            global_batch: args.global_batch,
            micro_batch: args.micro_batch,
            lr: args.lr,
            seed: args.seed,
            checkpoint_every: args.checkpoint_every,
        },
    )?;
    anyhow::ensure!(
        args.model.exists(),
        "--model {} does not exist (a config.json or a Hugging Face model directory)",
        args.model.display()
    );
    Ok(Job {
        manifest: args.data.clone(),
        model: ModelSource::from_path(&args.model),
        out: PathBuf::from(args.out.strip_prefix("file://").unwrap_or(&args.out)),
        config,
        device: davinci_model::Device::Cpu,
        precision: davinci_model::Precision::F32,
    })
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.engine == "jobset" {
        return run_jobset(&args).await;
    }
    anyhow::ensure!(
        !args.render && args.cluster.is_none(),
        "--render and --cluster belong to --engine jobset"
    );
    // Remote data and output are staged in a temporary directory: the manifest now (so the
    // job is checked before anything is downloaded), the shards and the newest remote
    // checkpoint next, and each checkpoint goes up as soon as it is written.
    let s3 = crate::cli_s3()?;
    let remote_data = storage::is_remote(&args.data.to_string_lossy())
        .then(|| args.data.to_string_lossy().into_owned());
    let remote_out = storage::is_remote(&args.out).then(|| args.out.clone());
    let work = (remote_data.is_some() || remote_out.is_some())
        .then(|| tempfile::Builder::new().prefix("davinci-train-").tempdir())
        .transpose()
        .context("making a staging directory")?;
    let mut args = args;
    if let (Some(uri), Some(w)) = (&remote_data, &work) {
        args.data = storage::fetch_manifest(uri, &s3, &w.path().join("data"))
            .await
            .with_context(|| format!("--data {uri}"))?;
    }
    if let (Some(_), Some(w)) = (&remote_out, &work) {
        args.out = w.path().join("out").display().to_string();
    }
    let job = job(&args)?;
    if let Some(uri) = &remote_data {
        eprintln!("fetching the shards of {uri}");
        storage::stage_shards(uri, &s3, &davinci_trainer::data::data_root(&job.manifest)).await?;
    }
    let remote = match &remote_out {
        Some(uri) => {
            let r = storage::RemoteOut::open(uri, &s3, &job.out)
                .await
                .with_context(|| format!("--out {uri}"))?;
            if let Some(step) = r.restore().await? {
                eprintln!("resuming from the checkpoint at step {step} in {uri}");
            }
            Some(r)
        }
        None => None,
    };
    if let Some(addr) = args.metrics_addr {
        davinci_runtime::telemetry::install_metrics(addr)?;
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] step {pos}/{len} {wide_msg} (eta {eta})",
        )
        .expect("valid template"),
    );
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let b = bar.clone();
    let rt = tokio::runtime::Handle::current();
    let summary = tokio::task::spawn_blocking(move || {
        train::train_with(
            &job,
            &mut |r| {
                b.set_length(r.total_steps);
                b.set_position(r.step);
                b.set_message(format!(
                    "{} {}/{} loss {:.4} lr {:.2e} |g| {:.3} {:.0} tok/s",
                    r.stage, r.stage_step, r.stage_steps, r.loss, r.lr, r.grad_norm, r.tokens_per_s
                ));
            },
            &cancel,
            &mut |dir| match &remote {
                Some(r) => rt.block_on(r.publish_checkpoint(dir)),
                None => Ok(()),
            },
        )
    })
    .await??;
    bar.finish_and_clear();
    eprintln!(
        "trained {} parameters for {} steps ({} tokens) in {:.1} s{}; loss {} → {}",
        summary.parameters,
        summary.steps,
        summary.tokens,
        summary.seconds,
        summary
            .resumed_from
            .map(|s| format!(", resumed from step {s}"))
            .unwrap_or_default(),
        summary
            .first_loss
            .map(|l| format!("{l:.4}"))
            .unwrap_or("-".into()),
        summary
            .last_loss
            .map(|l| format!("{l:.4}"))
            .unwrap_or("-".into()),
    );
    for c in &summary.checkpoints {
        match (&remote_out, c.file_name()) {
            (Some(uri), Some(name)) => eprintln!(
                "checkpoint {}/checkpoints/{}",
                uri.trim_end_matches('/'),
                name.to_string_lossy()
            ),
            _ => eprintln!("checkpoint {}", c.display()),
        }
    }
    drop(work);
    Ok(())
}
