//! An OpenAI-compatible server for Qwen2-architecture checkpoints (ours, or any Hugging Face
//! directory with `config.json`, safetensors weights and `tokenizer.json`), running
//! `davinci-model` with a KV cache.
//!
//! * [`engine`]: the model thread, continuous batching, sampling, stop sequences, logprobs.
//! * [`server`]: `/v1/models`, `/v1/completions` (with `echo` + `logprobs` for loglikelihood
//!   scoring), `/v1/chat/completions` (Qwen2.5 chat template with tools, `<tool_call>` output
//!   parsed into `tool_calls`), server-sent-event streaming.
//! * [`api`], [`tools`]: request parsing with OpenAI-style error bodies.
//!
//! Metrics (`davinci_inference_*`): requests by endpoint and status, request duration, time to
//! first token, queue depth, running sequences, batch size, prompt and generated tokens, and
//! generation tokens per second.
pub mod api;
pub mod engine;
pub mod server;
pub mod tools;

use anyhow::Context;
use davinci_model::{Device, Precision};
use davinci_tokenize::Tokenizer;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What `davinci serve --target inference` serves.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Checkpoint directory: `config.json`, `model.safetensors` (or an index), `tokenizer.json`.
    pub model_dir: PathBuf,
    /// Name clients pass as `model` (default: the directory's name).
    pub name: Option<String>,
    /// Sequences decoded together.
    pub max_batch: usize,
    /// Context limit (default and upper bound: the config's `max_position_embeddings`).
    pub max_model_len: Option<usize>,
    /// `tokenizer.json` for a checkpoint that carries none (ours, trained from fresh weights,
    /// use the run's tokenizer); default: the directory's.
    pub tokenizer: Option<PathBuf>,
}

/// EOS ids from `config.json` and `generation_config.json` (an id or a list of ids).
fn eos_ids(dir: &Path, config_extra: &serde_json::Map<String, Value>) -> Vec<u32> {
    let mut out = Vec::new();
    let mut add = |v: Option<&Value>| match v {
        Some(Value::Number(n)) => out.extend(n.as_u64().map(|i| i as u32)),
        Some(Value::Array(a)) => out.extend(a.iter().filter_map(Value::as_u64).map(|i| i as u32)),
        _ => {}
    };
    add(config_extra.get("eos_token_id"));
    if let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json"))
        && let Ok(v) = serde_json::from_str::<Value>(&text)
    {
        add(v.get("eos_token_id"));
    }
    out.sort();
    out.dedup();
    out
}

/// Loads the checkpoint and tokenizer, checks they fit each other, and starts the engine.
pub fn load(cfg: &ServeConfig) -> anyhow::Result<Arc<server::Served>> {
    let dir = &cfg.model_dir;
    let tok_path = cfg
        .tokenizer
        .clone()
        .unwrap_or_else(|| dir.join("tokenizer.json"));
    let tok = Tokenizer::from_file(&tok_path).with_context(|| {
        format!(
            "loading {} (the server needs the checkpoint's tokenizer.json beside config.json)",
            tok_path.display()
        )
    })?;
    let model = davinci_model::checkpoint::load_hf(dir, &Device::Cpu, Precision::F32)
        .with_context(|| format!("loading the checkpoint {}", dir.display()))?;
    let vocab_size = model.config.vocab_size;
    if tok.vocab_size() as usize > vocab_size {
        anyhow::bail!(
            "{}: the tokenizer has {} ids but the model's vocabulary is {vocab_size}; they are not from the same checkpoint",
            dir.display(),
            tok.vocab_size()
        );
    }
    let limit = model.config.max_position_embeddings;
    let max_len = match cfg.max_model_len {
        Some(m) if m > limit => anyhow::bail!(
            "--max-model-len {m} is beyond the model's max_position_embeddings {limit}"
        ),
        Some(0) => anyhow::bail!("--max-model-len must be > 0"),
        Some(m) => m,
        None => limit,
    };
    let mut eos = eos_ids(dir, &model.config.extra);
    if eos.is_empty()
        && let Some((_, id)) = tok.default_eod()
    {
        eos.push(id);
    }
    let mut eos_chat = eos.clone();
    eos_chat.extend(tok.token_to_id("<|im_end|>"));
    eos_chat.sort();
    eos_chat.dedup();
    let name = cfg.name.clone().unwrap_or_else(|| {
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });
    let tok = Arc::new(tok);
    let engine = engine::Engine::start(model, tok.clone(), cfg.max_batch);
    Ok(Arc::new(server::Served {
        name,
        engine,
        tok,
        max_len,
        vocab_size,
        eos,
        eos_chat,
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    }))
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<server::Served>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    axum::serve(listener, server::router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .context("inference server")
}
