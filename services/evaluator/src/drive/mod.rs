//! Evaluations that drive a model behind any OpenAI-compatible endpoint (our inference server,
//! vLLM, SGLang, a hosted API) and grade what it writes.
//!
//! * [`client`]: `/v1/completions` and `/v1/chat/completions` over HTTP with retries;
//!   loglikelihood of a continuation through `echo` + `logprobs`.
//! * [`humaneval`]: HumanEval / HumanEval+ completions in base or instruct format, graded by
//!   the sandboxed harness in [`crate::humaneval`].
//! * [`gpqa`]: GPQA from its published CSV; choices shuffled by a fixed seed; loglikelihood
//!   and generative scoring.
//! * [`scibench`]: SciBench's numeric problems with upstream's prompt, power-of-ten handling
//!   and `math.isclose(rel_tol=0.05)` grading.
//!
//! Every report carries a [`Provenance`]: model, endpoint, prompt template hash, sampling
//! parameters, data hash and seed.
pub mod client;
pub mod gpqa;
pub mod humaneval;
pub mod scibench;

pub use davinci_core::hash::sha256_hex;
use serde::{Deserialize, Serialize};

/// What a score was measured with, so two scores can be compared or a run repeated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub benchmark: String,
    pub model: String,
    pub endpoint: String,
    /// sha256 of the prompt template text (with its placeholders).
    pub prompt_template_sha256: String,
    pub sampling: client::Sampling,
    /// sha256 of the benchmark data as read.
    pub data_sha256: String,
    pub seed: Option<u64>,
    /// Seconds since the epoch.
    pub created_at: u64,
    pub davinci_version: String,
}

impl Provenance {
    pub fn new(
        benchmark: &str,
        ep: &client::Endpoint,
        template: &str,
        sampling: &client::Sampling,
        data_sha256: String,
        seed: Option<u64>,
    ) -> Self {
        Self {
            benchmark: benchmark.into(),
            model: ep.model().into(),
            endpoint: ep.base_url().into(),
            prompt_template_sha256: sha256_hex(template.as_bytes()),
            sampling: sampling.clone(),
            data_sha256,
            seed,
            created_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            davinci_version: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

/// Writes `rows` as JSON lines.
pub fn write_jsonl<T: Serialize>(path: &std::path::Path, rows: &[T]) -> anyhow::Result<()> {
    use anyhow::Context;
    let mut text = String::new();
    for r in rows {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Writes `dir/report.json`: the scores and how they were measured.
pub fn write_report(
    dir: &std::path::Path,
    provenance: &Provenance,
    scores: serde_json::Value,
) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("report.json");
    let v = serde_json::json!({"scores": scores, "provenance": provenance});
    std::fs::write(&path, serde_json::to_string_pretty(&v)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
