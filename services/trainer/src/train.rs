//! The training loop: stages in manifest order, each continuing from the last one's weights;
//! AdamW with warmup + cosine, clipping and gradient accumulation; atomic checkpoints holding
//! weights, optimiser state and the data cursor; resume from the newest one.
//!
//! The data cursor is (stage, step within the stage): the rows of a stage are a pure function
//! of the manifest and the seed, so a resumed run reads exactly the rows the interrupted one
//! would have read, and on CPU reproduces its weights bit for bit.
use crate::config::{StageConfig, TrainConfig};
use crate::data::{self, Manifest, RowRef, StageData};
use anyhow::{Context, bail, ensure};
use davinci_model::checkpoint::{load_hf, load_tensors, save_hf, save_tensors};
use davinci_model::{AdamW, Batch, Device, Grads, Precision, Qwen2, Qwen2Config};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

pub const STATE_SCHEMA: &str = "davinci.train-state/v1";

/// Where the starting weights come from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A `config.json`: fresh weights drawn from the training seed.
    Config(PathBuf),
    /// A Hugging Face model directory (config.json + safetensors).
    Pretrained(PathBuf),
}

impl ModelSource {
    /// A directory is a pretrained model; a file is a config.
    pub fn from_path(p: &Path) -> Self {
        if p.is_dir() {
            ModelSource::Pretrained(p.to_path_buf())
        } else {
            ModelSource::Config(p.to_path_buf())
        }
    }

    fn config(&self) -> anyhow::Result<Qwen2Config> {
        let p = match self {
            ModelSource::Config(p) => p.clone(),
            ModelSource::Pretrained(d) => d.join("config.json"),
        };
        Ok(Qwen2Config::from_file(&p)?)
    }
}

#[derive(Debug, Clone)]
pub struct Job {
    pub manifest: PathBuf,
    pub model: ModelSource,
    /// Output root: `checkpoints/{step}/` and `train_log.jsonl` go here.
    pub out: PathBuf,
    pub config: TrainConfig,
    pub device: Device,
    pub precision: Precision,
}

/// The cursor and bookkeeping saved with every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub schema: String,
    pub global_step: u64,
    /// Index into the job's stages of the stage to continue.
    pub stage_index: usize,
    pub stage: String,
    /// Steps of that stage already taken.
    pub stage_step: u64,
    pub stage_steps: u64,
    pub tokens_seen: u64,
    pub optimizer_step: u64,
    /// sha256 of the manifest, the model source and the training config: a resume with
    /// different inputs is refused.
    pub fingerprint: String,
    pub loss: Option<f64>,
}

/// One optimiser step, as reported to the progress bar, `/metrics` and the JSON log.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub step: u64,
    pub total_steps: u64,
    pub stage: String,
    pub stage_step: u64,
    pub stage_steps: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Loss-carrying tokens of the step.
    pub loss_tokens: u64,
    pub tokens: u64,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub steps: u64,
    pub tokens: u64,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub resumed_from: Option<u64>,
    pub checkpoints: Vec<PathBuf>,
    pub seconds: f64,
    pub parameters: usize,
}

struct Prepared {
    manifest: Manifest,
    stages: Vec<(StageConfig, StageData, u64)>,
    fingerprint: String,
}

/// Stages of the job: the configured ones, or every manifest stage with the paper's schedule.
fn stage_configs(config: &TrainConfig, manifest: &Manifest) -> anyhow::Result<Vec<StageConfig>> {
    if config.stages.is_empty() {
        return Ok(crate::config::default_stages(manifest));
    }
    for s in &config.stages {
        ensure!(
            manifest.stages.iter().any(|m| m.name == s.name),
            "stage `{}` is not in the manifest (it has: {})",
            s.name,
            manifest
                .stages
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(config.stages.clone())
}

/// Reads and checks everything before training starts.
fn prepare(job: &Job, model_cfg: &Qwen2Config) -> anyhow::Result<Prepared> {
    job.config.validate()?;
    let manifest = data::read_manifest(&job.manifest)?;
    ensure!(
        (manifest.tokenizer.vocab_size as usize) <= model_cfg.vocab_size,
        "the data's tokenizer {} has {} ids, more than the model's vocab_size {}",
        manifest.tokenizer.name,
        manifest.tokenizer.vocab_size,
        model_cfg.vocab_size
    );
    if let ModelSource::Pretrained(dir) = &job.model {
        let tj = dir.join("tokenizer.json");
        if tj.exists() {
            let got = davinci_core::hash::sha256_hex(&std::fs::read(&tj)?);
            ensure!(
                got == manifest.tokenizer.sha256,
                "{} has sha256 {got}, but the data was tokenized with {} (sha256 {}): repack with this model's tokenizer",
                tj.display(),
                manifest.tokenizer.name,
                manifest.tokenizer.sha256
            );
        }
    }
    let root = data::data_root(&job.manifest);
    let mut stages = Vec::new();
    for sc in stage_configs(&job.config, &manifest)? {
        let entry = manifest
            .stages
            .iter()
            .find(|m| m.name == sc.name)
            .expect("checked above");
        let data = StageData::open(&root, entry, model_cfg.vocab_size, job.config.seed)?;
        let rows = data.rows_per_epoch() * sc.epochs as u64;
        let mut steps = rows.div_ceil(job.config.global_batch as u64);
        if let Some(m) = sc.max_steps {
            steps = steps.min(m);
        }
        stages.push((sc, data, steps));
    }
    let mut fp = Vec::new();
    fp.extend(std::fs::read(&job.manifest)?);
    fp.extend(serde_json::to_vec(&job.config)?);
    fp.extend(model_cfg.to_json()?.into_bytes());
    if let ModelSource::Pretrained(d) = &job.model {
        fp.extend(d.display().to_string().into_bytes());
    }
    Ok(Prepared {
        manifest,
        stages,
        fingerprint: davinci_core::hash::sha256_hex(&fp),
    })
}

/// The newest complete checkpoint under `out/checkpoints/` (complete = renamed into place).
pub fn latest_checkpoint(out: &Path) -> anyhow::Result<Option<(u64, PathBuf)>> {
    let dir = out.join("checkpoints");
    if !dir.exists() {
        return Ok(None);
    }
    let mut best = None;
    for e in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e?;
        let Some(step) = e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()) else {
            continue;
        };
        if e.path().join("state.json").exists() && best.as_ref().is_none_or(|(s, _)| step > *s) {
            best = Some((step, e.path()));
        }
    }
    Ok(best)
}

fn fsync_dir_files(dir: &Path) -> anyhow::Result<()> {
    for e in std::fs::read_dir(dir)? {
        std::fs::File::open(e?.path())?.sync_all()?;
    }
    Ok(())
}

/// Writes `out/checkpoints/{step}/` through a temporary directory renamed into place.
fn write_checkpoint(
    out: &Path,
    model: &Qwen2,
    opt: &AdamW,
    state: &State,
    tokenizer: Option<&Path>,
) -> anyhow::Result<PathBuf> {
    let dir = out.join("checkpoints");
    let final_dir = dir.join(state.global_step.to_string());
    let tmp = dir.join(format!(".{}.tmp", state.global_step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    save_hf(model, &tmp)?;
    save_tensors(
        &tmp.join("optimizer.safetensors"),
        &opt.state(model.params()),
    )?;
    if let Some(t) = tokenizer {
        std::fs::copy(t, tmp.join("tokenizer.json"))?;
    }
    std::fs::write(tmp.join("state.json"), serde_json::to_vec_pretty(state)?)?;
    fsync_dir_files(&tmp)?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("moving checkpoint into {}", final_dir.display()))?;
    std::fs::File::open(&dir)?.sync_all()?;
    Ok(final_dir)
}

/// Keeps the JSON log's lines up to `step` (a resumed run rewrites what follows).
fn truncate_log(path: &Path, step: u64) -> anyhow::Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(path, kept)?;
    Ok(())
}

fn record_metrics(r: &StepReport) {
    metrics::gauge!("davinci_trainer_loss").set(r.loss);
    metrics::gauge!("davinci_trainer_learning_rate").set(r.lr);
    metrics::gauge!("davinci_trainer_grad_norm").set(r.grad_norm);
    metrics::gauge!("davinci_trainer_tokens_per_second").set(r.tokens_per_s);
    metrics::gauge!("davinci_trainer_step").set(r.step as f64);
    metrics::counter!("davinci_trainer_steps_total").increment(1);
    metrics::counter!("davinci_trainer_tokens_total").increment(r.tokens);
}

/// Runs (or resumes) the job; `progress` sees every step. Stops between steps when `cancel` is
/// set, after writing a checkpoint.
pub fn train(
    job: &Job,
    progress: &mut dyn FnMut(&StepReport),
    cancel: &AtomicBool,
) -> anyhow::Result<Summary> {
    train_with(job, progress, cancel, &mut |_| Ok(()))
}

/// [`train`], calling `on_checkpoint` with every checkpoint directory once it is in place (to
/// upload it: [`crate::storage::RemoteOut`]); its error stops the job.
pub fn train_with(
    job: &Job,
    progress: &mut dyn FnMut(&StepReport),
    cancel: &AtomicBool,
    on_checkpoint: &mut dyn FnMut(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let model_cfg = job.model.config()?;
    let prep = prepare(job, &model_cfg)?;
    let total_steps: u64 = prep.stages.iter().map(|s| s.2).sum();
    ensure!(
        total_steps > 0,
        "the selected stages hold no rows to train on"
    );
    std::fs::create_dir_all(&job.out).with_context(|| format!("creating {}", job.out.display()))?;
    let log_path = job.out.join("train_log.jsonl");
    let tokenizer = match &job.model {
        ModelSource::Pretrained(d) if d.join("tokenizer.json").exists() => {
            Some(d.join("tokenizer.json"))
        }
        _ => None,
    };

    let (model, mut opt, mut state, resumed_from) = match latest_checkpoint(&job.out)? {
        Some((step, dir)) => {
            let state: State = serde_json::from_slice(&std::fs::read(dir.join("state.json"))?)
                .with_context(|| format!("{}/state.json", dir.display()))?;
            ensure!(
                state.fingerprint == prep.fingerprint,
                "{} holds a run with another manifest, model or training config; use a new --out or remove it",
                job.out.display()
            );
            let model = load_hf(&dir, &job.device, job.precision)?;
            let mut opt = AdamW::new(model.params(), job.config.adamw)?;
            opt.load_state(
                model.params(),
                load_tensors(&dir.join("optimizer.safetensors"))?,
                state.optimizer_step,
            )?;
            truncate_log(&log_path, step)?;
            tracing::info!(step, checkpoint = %dir.display(), "resuming");
            (model, opt, state, Some(step))
        }
        None => {
            let model = match &job.model {
                ModelSource::Config(_) => Qwen2::new_random(
                    model_cfg.clone(),
                    &job.device,
                    job.precision,
                    job.config.seed,
                )?,
                ModelSource::Pretrained(d) => load_hf(d, &job.device, job.precision)?,
            };
            let opt = AdamW::new(model.params(), job.config.adamw)?;
            let _ = std::fs::remove_file(&log_path);
            let state = State {
                schema: STATE_SCHEMA.into(),
                global_step: 0,
                stage_index: 0,
                stage: prep.stages[0].0.name.clone(),
                stage_step: 0,
                stage_steps: prep.stages[0].2,
                tokens_seen: 0,
                optimizer_step: 0,
                fingerprint: prep.fingerprint.clone(),
                loss: None,
            };
            (model, opt, state, None)
        }
    };
    // For MFU on the dashboards: 6 x parameters x tokens/s over the GPUs' peak FLOP/s.
    metrics::gauge!("davinci_trainer_model_parameters").set(model.config.num_parameters() as f64);
    tracing::info!(
        parameters = model.config.num_parameters(),
        total_steps,
        tokenizer = %prep.manifest.tokenizer.name,
        "training"
    );
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut checkpoints = Vec::new();
    let mut first_loss = None;
    let steps_before: u64 = prep.stages[..state.stage_index].iter().map(|s| s.2).sum();
    debug_assert_eq!(steps_before + state.stage_step, state.global_step);
    let gb = job.config.global_batch as u64;

    for si in state.stage_index..prep.stages.len() {
        let (sc, data, stage_steps) = &prep.stages[si];
        if si != state.stage_index {
            state.stage_index = si;
            state.stage = sc.name.clone();
            state.stage_step = 0;
        }
        state.stage_steps = *stage_steps;
        let rpe = data.rows_per_epoch();
        let mut plan: Option<(u64, Vec<RowRef>)> = None;
        while state.stage_step < *stage_steps {
            if cancel.load(Ordering::Relaxed) {
                let dir = write_checkpoint(&job.out, &model, &opt, &state, tokenizer.as_deref())?;
                on_checkpoint(&dir)?;
                checkpoints.push(dir);
                bail!("cancelled at step {}", state.global_step);
            }
            let t0 = Instant::now();
            let first = state.stage_step * gb;
            let last = (first + gb).min(rpe * sc.epochs as u64);
            let mut rows = Vec::with_capacity((last - first) as usize);
            for k in first..last {
                let epoch = k / rpe;
                if plan.as_ref().is_none_or(|(e, _)| *e != epoch) {
                    plan = Some((epoch, data.epoch_plan(si, epoch)));
                }
                rows.push(data.row(plan.as_ref().expect("set").1[(k % rpe) as usize])?);
            }
            let batches: Vec<Batch> = rows
                .chunks(job.config.micro_batch)
                .map(Batch::from_rows)
                .collect::<Result<_, _>>()?;
            let loss_tokens: f64 = batches.iter().map(Batch::loss_tokens).sum();
            let tokens: u64 = batches.iter().map(|b| b.len() as u64).sum();
            let lr = sc.lr_at(state.stage_step, *stage_steps);
            let mut grads = Grads::new(model.params().len());
            let mut loss = 0f64;
            let mut grad_norm = 0f64;
            if loss_tokens > 0.0 {
                for b in &batches {
                    let l = (model.loss_sum(b)? / loss_tokens)?;
                    loss += l.to_scalar::<f32>()? as f64;
                    grads.accumulate(model.params(), &l.backward()?)?;
                }
                grad_norm = grads.clip(job.config.clip)?;
                opt.update(model.params(), &grads, lr)?;
            }
            ensure!(
                loss.is_finite(),
                "loss became {loss} at step {}",
                state.global_step + 1
            );
            state.stage_step += 1;
            state.global_step += 1;
            state.tokens_seen += tokens;
            state.optimizer_step = opt.step;
            state.loss = Some(loss);
            first_loss.get_or_insert(loss);
            let secs = t0.elapsed().as_secs_f64();
            let report = StepReport {
                step: state.global_step,
                total_steps,
                stage: sc.name.clone(),
                stage_step: state.stage_step,
                stage_steps: *stage_steps,
                loss,
                lr,
                grad_norm,
                loss_tokens: loss_tokens as u64,
                tokens,
                tokens_per_s: tokens as f64 / secs.max(1e-9),
                elapsed_s: started.elapsed().as_secs_f64(),
            };
            writeln!(log, "{}", serde_json::to_string(&report)?)?;
            record_metrics(&report);
            tracing::info!(step = report.step, stage = %report.stage, loss, lr, grad_norm, tokens_per_s = report.tokens_per_s, "step");
            progress(&report);
            let stage_done = state.stage_step == *stage_steps;
            if state.global_step % job.config.checkpoint_every == 0 || stage_done {
                let mut at = state.clone();
                if stage_done && si + 1 < prep.stages.len() {
                    // the cursor points at the start of the next stage
                    at.stage_index = si + 1;
                    at.stage = prep.stages[si + 1].0.name.clone();
                    at.stage_step = 0;
                    at.stage_steps = prep.stages[si + 1].2;
                }
                let dir = write_checkpoint(&job.out, &model, &opt, &at, tokenizer.as_deref())?;
                on_checkpoint(&dir)?;
                checkpoints.push(dir);
            }
        }
    }
    Ok(Summary {
        steps: state.global_step,
        tokens: state.tokens_seen,
        first_loss,
        last_loss: state.loss,
        resumed_from,
        checkpoints,
        seconds: started.elapsed().as_secs_f64(),
        parameters: model.config.num_parameters(),
    })
}
