//! The cluster engine (`engine: jobset`): Megatron-LM under torchrun on Kubernetes GPU nodes.
//!
//! A training job becomes one Kubernetes object per stage — a JobSet (`jobset.x-k8s.io/v1alpha2`)
//! or a Kubeflow TrainJob (`trainer.kubeflow.org/v1alpha1`) — plus one ConfigMap with the
//! pod-side scripts and the plan. Stage 0 first imports the Hugging Face base model into a
//! Megatron checkpoint (Megatron-Bridge); every stage loads the previous stage's checkpoint,
//! trains, and exports a Hugging Face checkpoint to `{out}/checkpoints/{step}/`. [`plan`] turns a
//! validated job into that plan, [`render`] into objects, [`follow`] submits and follows them.
pub mod follow;
pub mod logs;
pub mod megatron;
pub mod render;

use crate::config::{Overrides, TrainConfig};
use crate::data::{Manifest, MaskMode};
use anyhow::{Context, bail, ensure};
use davinci_model::Qwen2Config;
use davinci_proto::v1::TrainSpec;
use davinci_runtime::blob::{self, S3Config};
use megatron::{Parallelism, Schedule};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Which object a stage runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ObjectKind {
    /// A JobSet: import → node → export replicated jobs chained with `dependsOn`.
    #[default]
    Jobset,
    /// A TrainJob against a `torch-distributed` ClusterTrainingRuntime (Kubeflow Trainer v2).
    Trainjob,
}

/// RDMA devices per pod (e.g. `rdma/ib: 8` or `nvidia.com/hostdev: 8`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rdma {
    pub resource: String,
    pub count: u32,
}

/// Where and how the cluster runs the job: the `cluster` object of the job's config
/// (`TrainSpec.config_json`), or `davinci train --engine jobset --cluster FILE`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    pub kind: ObjectKind,
    pub namespace: String,
    /// Image with torch, Megatron-LM (at `megatron_dir`), Megatron-Bridge and boto3.
    pub image: String,
    pub image_pull_policy: Option<String>,
    pub megatron_dir: String,
    pub parallel: Parallelism,
    /// A ReadWriteMany PersistentVolumeClaim for Megatron checkpoints and the data index
    /// cache, mounted at `/ckpt` on every pod.
    pub checkpoint_claim: String,
    /// Where the pods read the packed shards (`s3://…` or a mounted path); default: the
    /// manifest's directory when it is on S3.
    pub data_root: Option<String>,
    pub node_selector: BTreeMap<String, String>,
    pub tolerations: Vec<serde_json::Value>,
    pub priority_class: Option<String>,
    /// Service account of the pods: IRSA (or workload identity) gives them S3 access.
    pub service_account: Option<String>,
    /// A Secret with `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (instead of IRSA).
    pub s3_secret: Option<String>,
    /// `AWS_ENDPOINT_URL` for an S3-compatible server.
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    pub rdma: Option<Rdma>,
    pub host_network: bool,
    /// Size of the memory-backed `/dev/shm` (NCCL and the data loader workers use it).
    pub shm_size: String,
    pub cpu: Option<String>,
    pub memory: Option<String>,
    /// JobSet restarts (all pods) before the stage fails.
    pub max_restarts: u32,
    /// Finished objects are deleted after this long (the plan ConfigMap records the outcome).
    pub ttl_seconds_after_finished: u32,
    /// ClusterTrainingRuntime of TrainJobs.
    pub runtime: String,
    /// Extra Megatron arguments appended to every stage (e.g. `--recompute-granularity full`).
    pub extra_args: Vec<String>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            kind: ObjectKind::Jobset,
            namespace: "davinci".into(),
            image: "nvcr.io/nvidia/nemo:25.09".into(),
            image_pull_policy: None,
            megatron_dir: "/opt/megatron-lm".into(),
            parallel: Parallelism::default(),
            checkpoint_claim: "davinci-checkpoints".into(),
            data_root: None,
            node_selector: BTreeMap::new(),
            tolerations: vec![serde_json::json!({
                "key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"
            })],
            priority_class: None,
            service_account: None,
            s3_secret: None,
            s3_endpoint: None,
            s3_region: None,
            rdma: None,
            host_network: false,
            shm_size: "64Gi".into(),
            cpu: None,
            memory: None,
            max_restarts: 3,
            ttl_seconds_after_finished: 86_400,
            runtime: "torch-distributed".into(),
            extra_args: Vec::new(),
        }
    }
}

/// Splits a job config into the candle-shared training config and the `cluster` object.
pub fn split_config(config_json: &str) -> anyhow::Result<(TrainConfig, ClusterConfig)> {
    if config_json.trim().is_empty() {
        return Ok((TrainConfig::default(), ClusterConfig::default()));
    }
    let mut v: serde_json::Value = serde_json::from_str(config_json).context("config_json")?;
    let cluster = match v.as_object_mut().and_then(|o| o.remove("cluster")) {
        Some(c) => serde_path_to_error::deserialize(c)
            .map_err(|e| anyhow::anyhow!("cluster.{}: {}", e.path(), e.inner()))?,
        None => ClusterConfig::default(),
    };
    let train = serde_path_to_error::deserialize(v)
        .map_err(|e| anyhow::anyhow!("config `{}`: {}", e.path(), e.inner()))?;
    Ok((train, cluster))
}

/// What a plan is made from.
#[derive(Debug, Clone)]
pub struct PlanInput<'a> {
    /// Names the objects and labels them (`davinci.dev/run`).
    pub run_id: &'a str,
    /// The trainer job's id (`davinci.dev/train-job`): what a restarted trainer looks for.
    pub job_id: &'a str,
    /// URI of the manifest; shard prefixes are relative to its directory.
    pub manifest_uri: &'a str,
    pub manifest: &'a Manifest,
    /// The Hugging Face base model directory (`s3://…` or a path the pods mount).
    pub model_uri: &'a str,
    pub model: &'a Qwen2Config,
    /// The run's output root (`runs/{run}`): checkpoints land in `{out}/checkpoints/{step}/`.
    pub out: &'a str,
    pub train: &'a TrainConfig,
    pub cluster: &'a ClusterConfig,
}

/// One stage as Megatron runs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StagePlan {
    pub index: usize,
    pub name: String,
    /// The Kubernetes object's name.
    pub object: String,
    /// SFT: the loss comes from the `.mask` sidecar.
    pub sft: bool,
    pub train_iters: u64,
    /// Global step at the end of the stage (the checkpoint's name).
    pub step_end: u64,
    /// Megatron checkpoint the stage starts from (on the claim).
    pub load: String,
    pub checkpoint_uri: String,
    /// Megatron arguments (without `--load` / `--save`, which the pod script adds).
    pub args: Vec<String>,
}

/// Everything needed to submit, follow and re-attach to a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub run_id: String,
    pub job_id: String,
    /// Base of the object names; the ConfigMap's name.
    pub name: String,
    pub model_uri: String,
    pub out: String,
    pub cluster: ClusterConfig,
    pub stages: Vec<StagePlan>,
}

impl Plan {
    pub fn total_iters(&self) -> u64 {
        self.stages.last().map_or(0, |s| s.step_end)
    }

    /// Where the pods keep this run's Megatron checkpoints.
    pub fn ckpt_root(&self) -> String {
        format!("/ckpt/{}", self.name)
    }
}

/// A lowercase RFC 1123 label made of `s` (at most `max` characters).
pub fn dns_label(s: &str, max: usize) -> String {
    let mut out: String = s
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    while out.contains("--") {
        out = out.replace("--", "-");
    }
    out.truncate(max);
    out.trim_matches('-').to_string()
}

/// The directory part of a URI or path (`s3://b/runs/r/packed/manifest.json` → `s3://b/runs/r/packed`).
fn parent_uri(uri: &str) -> &str {
    uri.rsplit_once('/').map_or(".", |(d, _)| d)
}

/// The stage's `--data-path` pairs: the packer's blend weights with every prefix moved under
/// `root` (the blend names shards under the directory the packer wrote them to).
pub fn rebase_blend(
    blend: &str,
    shard_prefixes: &[&str],
    root: &str,
) -> anyhow::Result<Vec<(f64, String)>> {
    let words: Vec<&str> = blend.split_whitespace().collect();
    ensure!(
        !words.is_empty() && words.len().is_multiple_of(2),
        "the blend `{blend}` is not `weight prefix` pairs"
    );
    let root = root.trim_end_matches('/');
    words
        .chunks(2)
        .map(|pair| {
            let w: f64 = pair[0]
                .parse()
                .with_context(|| format!("blend weight `{}`", pair[0]))?;
            let p = pair[1];
            let shard = shard_prefixes
                .iter()
                .filter(|s| p == **s || p.ends_with(&format!("/{s}")))
                .max_by_key(|s| s.len())
                .with_context(|| format!("blend prefix `{p}` is not a shard of the manifest"))?;
            Ok((w, format!("{root}/{shard}")))
        })
        .collect()
}

/// The plan of a job: one stage per configured stage, in order, each loading the last.
pub fn plan(i: &PlanInput) -> anyhow::Result<Plan> {
    let c = i.cluster;
    ensure!(!c.image.is_empty(), "cluster.image is required");
    ensure!(
        !c.checkpoint_claim.is_empty(),
        "cluster.checkpoint_claim (a ReadWriteMany PersistentVolumeClaim) is required"
    );
    ensure!(
        !i.model_uri.is_empty() && !i.model_uri.ends_with(".json"),
        "the jobset engine starts from a Hugging Face model directory (config.json, tokenizer and weights), not `{}`",
        i.model_uri
    );
    let micro = i.train.micro_batch as u32;
    let global = i.train.global_batch as u32;
    c.parallel.check(i.model, micro, global)?;
    let data_root = match &c.data_root {
        Some(r) => r.clone(),
        None => {
            let dir = parent_uri(i.manifest_uri);
            if !dir.starts_with("s3://") {
                bail!(
                    "the manifest {} is not on S3: set cluster.data_root to where the pods read the packed shards",
                    i.manifest_uri
                );
            }
            dir.to_string()
        }
    };
    let name =
        format!("dv-{}-{}", dns_label(i.run_id, 20), dns_label(i.job_id, 8)).replace("--", "-");
    let model_args = megatron::model_args(
        i.model,
        i.manifest.tokenizer.vocab_size as usize,
        c.parallel.tp,
    )?;
    let parallel_args = megatron::parallel_args(&c.parallel);
    let ckpt_root = format!("/ckpt/{name}");
    let mut stages = Vec::new();
    let mut step = 0u64;
    let mut load = format!("{ckpt_root}/megatron/base");
    for (k, sc) in i.train.stages.iter().enumerate() {
        let entry = i
            .manifest
            .stages
            .iter()
            .find(|s| s.name == sc.name)
            .with_context(|| format!("stage `{}` is not in the manifest", sc.name))?;
        let blend = Some(entry.blend.as_str())
            .filter(|b| !b.trim().is_empty())
            .with_context(|| {
                format!(
                    "manifest stage `{}` has no blend (an empty stage?)",
                    sc.name
                )
            })?;
        let prefixes: Vec<&str> = entry
            .datasets
            .iter()
            .flat_map(|d| d.shards.iter().map(|s| s.prefix.as_str()))
            .collect();
        let blend = rebase_blend(blend, &prefixes, &data_root)?;
        let rows: u64 = crate::data::epoch_rows(entry).iter().sum();
        ensure!(rows > 0, "stage `{}` has no packed rows", sc.name);
        let mut iters = (rows * sc.epochs as u64).div_ceil(global as u64);
        if let Some(m) = sc.max_steps {
            iters = iters.min(m);
        }
        ensure!(iters > 0, "stage `{}` has no steps", sc.name);
        let schedule = Schedule {
            train_iters: iters,
            warmup_iters: (sc.warmup_ratio * iters as f64).ceil() as u64,
            lr: sc.lr,
            min_lr: sc.lr * sc.min_lr_ratio,
            micro_batch: micro,
            global_batch: global,
            seq_len: i.manifest.seq_len,
            weight_decay: i.train.adamw.weight_decay,
            beta1: i.train.adamw.beta1,
            beta2: i.train.adamw.beta2,
            eps: i.train.adamw.eps,
            clip: i.train.clip,
            seed: i.train.seed,
            save_interval: i.train.checkpoint_every.min(iters),
        };
        let sft = entry.mask == MaskMode::AssistantOnly;
        let mut args = model_args.clone();
        args.extend(parallel_args.iter().cloned());
        args.extend(megatron::schedule_args(&schedule));
        args.extend(megatron::data_args(
            &blend,
            &format!("{ckpt_root}/hf/base"),
            "/cache/object-storage",
            &format!("{ckpt_root}/data-cache"),
        ));
        if sft {
            args.push("--davinci-sft-mask".into());
        }
        args.extend(c.extra_args.iter().cloned());
        step += iters;
        let object = format!("{name}-{k}");
        stages.push(StagePlan {
            index: k,
            name: sc.name.clone(),
            object,
            sft,
            train_iters: iters,
            step_end: step,
            load: load.clone(),
            checkpoint_uri: format!("{}/checkpoints/{step}", i.out.trim_end_matches('/')),
            args,
        });
        load = format!("{ckpt_root}/megatron/{}", sc.name);
    }
    ensure!(!stages.is_empty(), "no stages to train");
    Ok(Plan {
        run_id: i.run_id.to_string(),
        job_id: i.job_id.to_string(),
        name,
        model_uri: i.model_uri.to_string(),
        out: i.out.to_string(),
        cluster: c.clone(),
        stages,
    })
}

/// Reads the object or file at `uri` (a path, `file://` or `s3://`) as text.
pub async fn read_text(uri: &str, s3: &S3Config) -> anyhow::Result<String> {
    let (dir, name) = uri
        .rsplit_once('/')
        .with_context(|| format!("`{uri}` has no directory part"))?;
    let store = blob::open(dir, s3).await?;
    let bytes = store
        .get(name)
        .await
        .with_context(|| format!("reading {uri}"))?;
    String::from_utf8(bytes.to_vec()).with_context(|| format!("{uri} is not UTF-8"))
}

/// The plan of a `TrainSpec` with engine `jobset`: the manifest and the base model's
/// `config.json` are read from storage, the config (with its `cluster` object) validated.
pub async fn plan_from_spec(
    spec: &TrainSpec,
    run_id: &str,
    job_id: &str,
    s3: &S3Config,
) -> anyhow::Result<Plan> {
    ensure!(
        !spec.data.is_empty(),
        "spec.data (the manifest URI) is required"
    );
    ensure!(!spec.out.is_empty(), "spec.out is required");
    ensure!(
        !spec.model.is_empty() && !spec.model.ends_with(".json"),
        "the jobset engine starts from a Hugging Face model directory (config.json, tokenizer and weights) in spec.model, not `{}`",
        spec.model
    );
    let (base, cluster) = split_config(&spec.config_json)?;
    let manifest_text = read_text(&spec.data, s3).await?;
    let manifest =
        Manifest::from_json(manifest_text.as_bytes()).with_context(|| spec.data.clone())?;
    let train = base.resolve(
        &manifest,
        &Overrides {
            steps: (spec.steps > 0).then_some(spec.steps),
            global_batch: (spec.global_batch > 0).then_some(spec.global_batch as usize),
            lr: (spec.learning_rate > 0.0).then_some(spec.learning_rate),
            ..Default::default()
        },
    )?;
    let model_uri = spec.model.trim_end_matches('/');
    let model = Qwen2Config::from_json(&read_text(&format!("{model_uri}/config.json"), s3).await?)?;
    plan(&PlanInput {
        run_id,
        job_id,
        manifest_uri: &spec.data,
        manifest: &manifest,
        model_uri,
        model: &model,
        out: &spec.out,
        train: &train,
        cluster: &cluster,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blend_moves_under_the_data_root() {
        let b = rebase_blend(
            "0.75000000 /tmp/pack/stage1/ctx-00000 0.25000000 /tmp/pack/stage1/ctx-00001",
            &["stage1/ctx-00000", "stage1/ctx-00001"],
            "s3://bucket/runs/r1/packed/",
        )
        .unwrap();
        assert_eq!(
            b,
            vec![
                (
                    0.75,
                    "s3://bucket/runs/r1/packed/stage1/ctx-00000".to_string()
                ),
                (
                    0.25,
                    "s3://bucket/runs/r1/packed/stage1/ctx-00001".to_string()
                )
            ]
        );
        let e = rebase_blend("1.0 /x/other-00000", &["stage1/ctx-00000"], "s3://b").unwrap_err();
        assert!(e.to_string().contains("not a shard"), "{e}");
        assert!(rebase_blend("1.0", &[], "s3://b").is_err());
    }

    #[test]
    fn names_are_dns_labels() {
        assert_eq!(dns_label("Run_2026.12--07", 20), "run-2026-12-07");
        assert_eq!(dns_label("--a--", 20), "a");
    }
}
