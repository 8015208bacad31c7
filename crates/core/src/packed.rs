//! The packed-shards manifest (`davinci.packed/v1`): what the tokenizer-packer writes last
//! beside its Megatron `.bin/.idx` shards and `.mask.{bin,idx}` sidecars, and what every
//! trainer engine (the in-process candle one, the cluster one) reads. One definition, so the
//! writer and the readers agree on every field.
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::megatron::DType;

pub const MANIFEST_SCHEMA: &str = "davinci.packed/v1";

/// Which tokens carry loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MaskMode {
    /// Mid-training: every token.
    All,
    /// SFT: the assistant's turns only (content, tool calls and the closing `<|im_end|>`).
    AssistantOnly,
}

/// What happens to a document longer than `seq_len`. The recipe drops them ("drop, never
/// truncate"), so that is the default; splitting is there for corpora that want every token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LongDocs {
    /// Cut into `seq_len` pieces (each full piece is a bin of its own; the rest is packed);
    /// counted in `split_documents`.
    Split,
    /// Dropped and counted (`too_long`).
    Drop,
}

/// What one shard holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// Megatron prefix relative to the manifest's directory (`{stage}/{dataset}-{k:05}`).
    pub prefix: String,
    /// Megatron sequences (= source documents or pieces of split ones).
    pub sequences: u64,
    /// Megatron documents (= packed bins).
    pub bins: u64,
    pub tokens: u64,
    pub bin_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenizerInfo {
    pub name: String,
    pub sha256: String,
    pub vocab_size: u32,
    pub eod_token: String,
    pub eod_id: u32,
    pub engine: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DatasetEntry {
    pub name: String,
    /// `{stage}/{dataset}`; shards are `{prefix}-{k:05}` (+ `.mask`).
    pub prefix: String,
    pub mask: MaskMode,
    pub upsample: f64,
    pub weight: Option<f64>,
    pub documents: u64,
    /// Tokens written (EOD included).
    pub tokens: u64,
    pub bins: u64,
    pub padding_ratio: f64,
    pub split_documents: u64,
    /// Tokens with loss (mask 1).
    pub loss_tokens: u64,
    pub drops: BTreeMap<String, u64>,
    pub shards: Vec<ShardInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StageEntry {
    pub name: String,
    pub mask: MaskMode,
    pub datasets: Vec<DatasetEntry>,
    pub tokens: u64,
    /// Σ upsample × tokens: tokens the stage sees per pass over the blend.
    pub effective_tokens: f64,
    /// Megatron `--data-path` value: `weight prefix` pairs over every shard.
    pub blend: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub schema: String,
    pub tokenizer: TokenizerInfo,
    pub seq_len: usize,
    pub seed: u64,
    pub dtype: DType,
    pub long_docs: LongDocs,
    pub stages: Vec<StageEntry>,
    /// Records read per source.
    pub records: BTreeMap<String, u64>,
    /// Records dropped before packing, by reason.
    pub drops: BTreeMap<String, u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("not a packed-shards manifest: {0}")]
    Json(#[from] serde_json::Error),
    #[error("schema `{0}`, expected `{MANIFEST_SCHEMA}`")]
    Schema(String),
}

impl Manifest {
    /// Parses `manifest.json`, refusing another schema.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ManifestError> {
        let m: Manifest = serde_json::from_slice(bytes)?;
        if m.schema != MANIFEST_SCHEMA {
            return Err(ManifestError::Schema(m.schema));
        }
        Ok(m)
    }

    pub fn stage(&self, name: &str) -> Option<&StageEntry> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// Every shard of every stage, in manifest order.
    pub fn shards(&self) -> impl Iterator<Item = &ShardInfo> {
        self.stages
            .iter()
            .flat_map(|s| &s.datasets)
            .flat_map(|d| &d.shards)
    }
}

/// The four files of a shard prefix: ids and their mask sidecar, each `.bin` + `.idx`.
pub fn shard_files(prefix: &str) -> [String; 4] {
    [".bin", ".idx", ".mask.bin", ".mask.idx"].map(|ext| format!("{prefix}{ext}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> serde_json::Value {
        serde_json::json!({
            "schema": "davinci.packed/v1",
            "tokenizer": {"name": "t", "sha256": "00", "vocab_size": 10, "eod_token": "<e>",
                          "eod_id": 9, "engine": "hf-tokenizers"},
            "seq_len": 8, "seed": 0, "dtype": "u16", "long_docs": "drop",
            "stages": [{"name": "sft", "mask": "assistant-only", "tokens": 3,
                        "effective_tokens": 3.0, "blend": "1 sft/env-pass-00000",
                        "datasets": [{"name": "env-pass", "prefix": "sft/env-pass",
                          "mask": "assistant-only", "upsample": 1.0, "weight": null,
                          "documents": 1, "tokens": 3, "bins": 1, "padding_ratio": 0.5,
                          "split_documents": 0, "loss_tokens": 2, "drops": {},
                          "shards": [{"prefix": "sft/env-pass-00000", "sequences": 1,
                                      "bins": 1, "tokens": 3, "bin_bytes": 6}]}]}],
            "records": {"env-pass": 1}, "drops": {}
        })
    }

    #[test]
    fn parses_and_refuses_other_schemas() {
        let v = manifest();
        let m = Manifest::from_json(v.to_string().as_bytes()).unwrap();
        assert_eq!(m.stages[0].mask, MaskMode::AssistantOnly);
        assert_eq!(m.long_docs, LongDocs::Drop);
        assert_eq!(m.shards().count(), 1);
        assert!(m.stage("sft").is_some());
        assert_eq!(
            serde_json::to_value(&m).unwrap(),
            v,
            "round trip keeps every field"
        );
        assert_eq!(
            shard_files("a/b-00000")[2],
            "a/b-00000.mask.bin".to_string()
        );
        let mut other = manifest();
        other["schema"] = "davinci.packed/v0".into();
        let e = Manifest::from_json(other.to_string().as_bytes()).unwrap_err();
        assert!(e.to_string().contains("davinci.packed/v0"), "{e}");
    }
}
