//! Qwen2-architecture causal LM in candle, built for training on packed documents, with a KV
//! cache for serving ([`generate`]).
//!
//! candle's own `qwen2` model cannot be trained: its fused RoPE, `softmax_last_dim` and RMSNorm
//! record no backward op, so gradients silently stop at them. Every op here has a backward pass
//! (the gradient-coverage test guards it). Parameters are f32 `Var`s (the master weights); the
//! forward pass casts them to the compute dtype (f32 on CPU, bf16 on CUDA).
//!
//! A batch is one flat token stream: rows (packed bins) are concatenated, and since attention is
//! block-diagonal per document, no batch dimension or padding is needed outside attention.
pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod generate;
pub mod model;
pub mod optim;
pub mod rng;

pub use batch::{Batch, Row};
pub use config::Qwen2Config;
pub use generate::{KvCache, Sampler, SamplingParams, Step};
pub use model::{Precision, Qwen2};
pub use optim::{AdamW, AdamWConfig, Grads};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("model config: {0}")]
    Config(String),
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: String, msg: String },
    #[error("batch: {0}")]
    Batch(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

pub use candle_core::{DType, Device, Tensor, Var};
