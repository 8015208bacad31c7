//! Megatron-LM command-line arguments (`pretrain_gpt.py`, megatron-core 0.15) for a Qwen2 /
//! Qwen2.5 model read from its Hugging Face `config.json`, a parallel layout and one stage's
//! schedule. Every value comes from the config, the manifest or the RunSpec; the layout is
//! checked the way Megatron checks it, so a bad one fails here and not an hour into a GPU job.
use anyhow::{bail, ensure};
use davinci_model::Qwen2Config;
use serde::{Deserialize, Serialize};

/// How the world of `nodes × gpus_per_node` ranks is split: tensor × pipeline × data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Parallelism {
    pub nodes: u32,
    pub gpus_per_node: u32,
    /// Tensor parallel size (within a node: it all-reduces every layer).
    pub tp: u32,
    /// Pipeline parallel size.
    pub pp: u32,
}

impl Default for Parallelism {
    fn default() -> Self {
        Self {
            nodes: 1,
            gpus_per_node: 8,
            tp: 1,
            pp: 1,
        }
    }
}

impl Parallelism {
    pub fn world(&self) -> u32 {
        self.nodes * self.gpus_per_node
    }

    /// Data parallel size.
    pub fn dp(&self) -> u32 {
        self.world() / (self.tp * self.pp).max(1)
    }

    /// Checks the layout against the model and the batch as Megatron would (divisibility of
    /// the world, heads, query groups, layers and the global batch).
    pub fn check(
        &self,
        m: &Qwen2Config,
        micro_batch: u32,
        global_batch: u32,
    ) -> anyhow::Result<()> {
        let Parallelism {
            nodes,
            gpus_per_node,
            tp,
            pp,
        } = *self;
        ensure!(
            nodes > 0 && gpus_per_node > 0 && tp > 0 && pp > 0,
            "nodes, gpus_per_node, tp and pp must be > 0"
        );
        ensure!(
            tp <= gpus_per_node && gpus_per_node.is_multiple_of(tp),
            "tp {tp} must divide gpus_per_node {gpus_per_node}: tensor parallelism all-reduces every layer and stays inside a node"
        );
        ensure!(
            self.world().is_multiple_of(tp * pp),
            "world size {} (nodes {nodes} × gpus {gpus_per_node}) is not a multiple of tp × pp = {}",
            self.world(),
            tp * pp
        );
        let heads = m.num_attention_heads as u32;
        let groups = m.num_key_value_heads as u32;
        ensure!(
            heads.is_multiple_of(tp),
            "num_attention_heads {heads} is not a multiple of tp {tp}"
        );
        ensure!(
            groups.is_multiple_of(tp),
            "num_key_value_heads {groups} (query groups) is not a multiple of tp {tp}; choose tp from the divisors of {groups}"
        );
        let layers = m.num_hidden_layers as u32;
        ensure!(
            layers.is_multiple_of(pp),
            "num_hidden_layers {layers} is not a multiple of pp {pp}"
        );
        ensure!(micro_batch > 0, "micro_batch must be > 0");
        let per_step = micro_batch * self.dp();
        ensure!(
            global_batch.is_multiple_of(per_step),
            "global_batch {global_batch} is not a multiple of micro_batch {micro_batch} × data parallel {} = {per_step}",
            self.dp()
        );
        Ok(())
    }
}

/// `--make-vocab-size-divisible-by` so that Megatron's padded vocabulary equals the checkpoint's
/// embedding rows (`config.json`'s `vocab_size`). Megatron pads the tokenizer's length up to a
/// multiple of `divisor × tp`; the smallest multiple of `tp` that divides `vocab_size` and is
/// larger than the padding needed gives exactly `vocab_size` (Qwen2.5-72B: 151,665 tokens,
/// 152,064 rows, tp 8 → 54; Qwen2.5-0.5B: 151,936 rows → 1187 × tp).
pub fn vocab_divisor(model_vocab: usize, tokenizer_vocab: usize, tp: u32) -> anyhow::Result<usize> {
    ensure!(
        tokenizer_vocab <= model_vocab,
        "the tokenizer has {tokenizer_vocab} tokens but the model only {model_vocab} embedding rows (wrong tokenizer for this model?)"
    );
    let tp = tp.max(1) as usize;
    let padding = model_vocab - tokenizer_vocab;
    let mut m = (padding / tp + 1) * tp;
    while m <= model_vocab {
        if model_vocab.is_multiple_of(m) {
            return Ok(m / tp);
        }
        m += tp;
    }
    bail!(
        "no --make-vocab-size-divisible-by pads {tokenizer_vocab} tokens to {model_vocab} rows at tp {tp}: {model_vocab} is not a multiple of tp"
    )
}

/// Megatron's padded vocabulary for a divisor (its `_vocab_size_with_padding`).
pub fn padded_vocab(tokenizer_vocab: usize, divisor: usize, tp: u32) -> usize {
    let multiple = divisor * tp.max(1) as usize;
    tokenizer_vocab.div_ceil(multiple) * multiple
}

/// The model's architecture arguments. Qwen2 always has a bias on q/k/v and none elsewhere.
pub fn model_args(m: &Qwen2Config, tokenizer_vocab: usize, tp: u32) -> anyhow::Result<Vec<String>> {
    if let Some(s) = m.extra.get("rope_scaling").filter(|v| !v.is_null()) {
        bail!(
            "config.json has rope_scaling {s}: YaRN / dynamic RoPE is not rendered for Megatron; remove it for training"
        );
    }
    if m.extra.get("use_sliding_window").and_then(|v| v.as_bool()) == Some(true) {
        bail!(
            "config.json sets use_sliding_window: Megatron's GPT model has no sliding-window attention"
        );
    }
    ensure!(
        m.hidden_act == "silu",
        "hidden_act `{}`: only silu (SwiGLU) is rendered",
        m.hidden_act
    );
    let head_dim = m.head_dim.unwrap_or(m.hidden_size / m.num_attention_heads);
    let divisor = vocab_divisor(m.vocab_size, tokenizer_vocab, tp)?;
    let mut a = args(&[
        ("--num-layers", m.num_hidden_layers.to_string()),
        ("--hidden-size", m.hidden_size.to_string()),
        ("--ffn-hidden-size", m.intermediate_size.to_string()),
        ("--num-attention-heads", m.num_attention_heads.to_string()),
        ("--kv-channels", head_dim.to_string()),
        (
            "--max-position-embeddings",
            m.max_position_embeddings.to_string(),
        ),
        ("--position-embedding-type", "rope".into()),
        ("--rotary-percent", "1.0".into()),
        (
            "--rotary-base",
            format!("{}", m.rope_theta.unwrap_or(10_000.0).round() as u64),
        ),
        ("--normalization", "RMSNorm".into()),
        ("--norm-epsilon", sci(m.rms_norm_eps)),
        ("--make-vocab-size-divisible-by", divisor.to_string()),
    ]);
    if m.num_key_value_heads != m.num_attention_heads {
        a.extend(args(&[(
            "--num-query-groups",
            m.num_key_value_heads.to_string(),
        )]));
        a.push("--group-query-attention".into());
    }
    a.extend(
        [
            "--swiglu",
            "--disable-bias-linear",
            "--add-qkv-bias",
            "--attention-dropout",
            "0.0",
            "--hidden-dropout",
            "0.0",
            "--attention-softmax-in-fp32",
        ]
        .map(String::from),
    );
    if !m.tie_word_embeddings {
        a.push("--untie-embeddings-and-output-weights".into());
    }
    Ok(a)
}

/// Parallelism and precision: sequence parallel whenever tp > 1 (it shards the activations
/// tensor parallelism leaves replicated), the distributed optimiser (ZeRO-1 over data
/// parallel ranks), bf16, overlapped gradient reduce and parameter gather.
pub fn parallel_args(p: &Parallelism) -> Vec<String> {
    let mut a = args(&[
        ("--tensor-model-parallel-size", p.tp.to_string()),
        ("--pipeline-model-parallel-size", p.pp.to_string()),
    ]);
    if p.tp > 1 {
        a.push("--sequence-parallel".into());
    }
    a.extend(
        [
            "--use-distributed-optimizer",
            "--overlap-grad-reduce",
            "--overlap-param-gather",
            "--bf16",
            "--transformer-impl",
            "transformer_engine",
        ]
        .map(String::from),
    );
    a
}

/// One stage's optimisation schedule, in Megatron's units (iterations of `global_batch`
/// sequences of `seq_len` tokens).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Schedule {
    pub train_iters: u64,
    pub warmup_iters: u64,
    pub lr: f64,
    pub min_lr: f64,
    pub micro_batch: u32,
    pub global_batch: u32,
    pub seq_len: usize,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub clip: f64,
    pub seed: u64,
    pub save_interval: u64,
}

/// Optimiser, schedule and logging arguments: cosine decay from `lr` to `min_lr` after a
/// linear warmup (the candle engine's schedule), one iteration line per step.
pub fn schedule_args(s: &Schedule) -> Vec<String> {
    let mut a = args(&[
        ("--seq-length", s.seq_len.to_string()),
        ("--micro-batch-size", s.micro_batch.to_string()),
        ("--global-batch-size", s.global_batch.to_string()),
        ("--train-iters", s.train_iters.to_string()),
        ("--lr", sci(s.lr)),
        ("--min-lr", sci(s.min_lr)),
        ("--lr-decay-style", "cosine".into()),
        ("--lr-warmup-iters", s.warmup_iters.to_string()),
        ("--lr-decay-iters", s.train_iters.to_string()),
        ("--weight-decay", format!("{}", s.weight_decay)),
        ("--adam-beta1", format!("{}", s.beta1)),
        ("--adam-beta2", format!("{}", s.beta2)),
        ("--adam-eps", sci(s.eps)),
        ("--clip-grad", format!("{}", s.clip)),
        ("--seed", s.seed.to_string()),
        ("--save-interval", s.save_interval.to_string()),
        ("--ckpt-format", "torch_dist".into()),
        ("--log-interval", "1".into()),
        ("--eval-iters", "0".into()),
        ("--eval-interval", s.train_iters.max(1).to_string()),
    ]);
    a.push("--log-throughput".into());
    a
}

/// Data arguments: the weighted blend of shard prefixes (`s3://` ones are read through
/// Megatron's object-storage reader, which caches the `.idx` files locally), the tokenizer
/// (only its length and EOD are used: the shards are tokenized), documents as the packer laid
/// them out (positions restart after every EOD, no loss on predicting across an EOD).
pub fn data_args(
    blend: &[(f64, String)],
    tokenizer_dir: &str,
    idx_cache: &str,
    data_cache: &str,
) -> Vec<String> {
    let mut a = vec!["--data-path".to_string()];
    for (w, p) in blend {
        a.push(format!("{w:.8}"));
        a.push(p.clone());
    }
    a.extend(args(&[
        ("--split", "100,0,0".into()),
        ("--tokenizer-type", "HuggingFaceTokenizer".into()),
        ("--tokenizer-model", tokenizer_dir.into()),
        ("--data-cache-path", data_cache.into()),
        ("--num-workers", "2".into()),
    ]));
    if blend.iter().any(|(_, p)| p.starts_with("s3://")) {
        a.extend(args(&[("--object-storage-cache-path", idx_cache.into())]));
    }
    a.extend(["--reset-position-ids", "--eod-mask-loss"].map(String::from));
    a
}

/// A float in short scientific notation without binary noise (`8e-6`, not
/// `8.000000000000001e-6`).
fn sci(x: f64) -> String {
    let s = format!("{x:.9e}");
    let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
    let m = m.trim_end_matches('0').trim_end_matches('.');
    format!("{m}e{e}")
}

fn args(pairs: &[(&str, String)]) -> Vec<String> {
    pairs
        .iter()
        .flat_map(|(k, v)| [k.to_string(), v.clone()])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocab_padding_matches_the_checkpoint_rows() {
        // Qwen2.5 tokenizer: 151,665 tokens (151,643 BPE + 22 special).
        for tp in [1, 2, 4, 8] {
            for rows in [151_936usize, 152_064] {
                let d = vocab_divisor(rows, 151_665, tp).unwrap();
                assert_eq!(padded_vocab(151_665, d, tp), rows, "tp {tp} rows {rows}");
            }
        }
        assert_eq!(vocab_divisor(152_064, 151_665, 8).unwrap(), 54);
        assert_eq!(vocab_divisor(151_936, 151_665, 1).unwrap(), 1187);
        assert!(
            vocab_divisor(151_000, 151_665, 1)
                .unwrap_err()
                .to_string()
                .contains("wrong tokenizer")
        );
        assert!(vocab_divisor(151_937, 151_665, 2).is_err());
        assert_eq!(sci(8e-5 * 0.1), "8e-6");
        assert_eq!(sci(1e-6), "1e-6");
        assert_eq!(sci(2.5e-4), "2.5e-4");
    }
}
