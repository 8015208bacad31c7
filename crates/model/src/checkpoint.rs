//! Hugging Face checkpoints: `config.json` + `model.safetensors` (or a sharded
//! `model.safetensors.index.json`), written with `{"format": "pt"}` metadata, Qwen2 names and
//! `[out, in]` shapes, and no `lm_head.weight` when the embeddings are tied, so
//! `Qwen2ForCausalLM.from_pretrained` loads them as they are.
use crate::config::Qwen2Config;
use crate::model::{Precision, Qwen2};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

fn ck_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}

/// Writes named tensors (made contiguous, on the CPU) as safetensors with `{"format": "pt"}`.
pub fn save_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(cpu, Some(meta), path)
        .map_err(|e| ck_err(path, format!("writing safetensors: {e}")))
}

/// Reads every tensor of a safetensors file onto the CPU.
pub fn load_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| ck_err(path, format!("not a readable safetensors file: {e}")))
}

/// Weights of a Hugging Face model directory: one file or the shards its index names.
fn load_weights(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return load_tensors(&single);
    }
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).map_err(|_| {
        ck_err(
            dir,
            "neither model.safetensors nor model.safetensors.index.json is there",
        )
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ck_err(&index, e.to_string()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ck_err(&index, "no weight_map"))?;
    let mut files: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
    files.sort();
    files.dedup();
    let mut out = HashMap::new();
    for f in files {
        if f.contains('/') || f.contains("..") {
            return Err(ck_err(
                &index,
                format!("shard name `{f}` leaves the directory"),
            ));
        }
        out.extend(load_tensors(&dir.join(f))?);
    }
    Ok(out)
}

/// Loads `dir/config.json` and its weights, checked against each other.
pub fn load_hf(dir: &Path, device: &Device, precision: Precision) -> Result<Qwen2> {
    let config = Qwen2Config::from_file(&dir.join("config.json"))?;
    let tensors = load_weights(dir)?;
    Qwen2::from_tensors(
        config,
        tensors,
        device,
        precision,
        &dir.display().to_string(),
    )
}

/// The model's weights as float32 tensors in checkpoint order (sharing the parameters' storage:
/// an optimiser step changes them).
pub fn weights(model: &Qwen2) -> Result<Vec<(String, Tensor)>> {
    model
        .params()
        .iter()
        .map(|(n, v)| Ok((n.clone(), v.as_tensor().to_dtype(DType::F32)?)))
        .collect()
}

/// Writes `config.json` and `model.safetensors` into `dir` (created if needed).
pub fn save_hf(model: &Qwen2, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, model.config.to_json()?).map_err(io_err(&cfg))?;
    save_tensors(&dir.join("model.safetensors"), &weights(model)?)
}
