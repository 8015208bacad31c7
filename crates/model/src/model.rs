//! The Qwen2 forward pass from differentiable ops, as transformers' `modeling_qwen2.py` computes
//! it: RMSNorm in f32, rotate-half RoPE, grouped-query attention with q/k/v bias, SwiGLU MLP.
use crate::batch::Batch;
use crate::config::Qwen2Config;
use crate::rng::SplitMix64;
use crate::{Error, Result};
use candle_core::{D, DType, Device, Tensor, Var};
use std::collections::{BTreeMap, HashMap};

/// Compute dtype over f32 master weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    /// bf16 activations and matmuls; only on CUDA (candle widens bf16 matmuls to f32 on CPU).
    Bf16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }
}

/// A Qwen2 causal LM whose parameters are trainable `Var`s.
#[derive(Debug)]
pub struct Qwen2 {
    pub config: Qwen2Config,
    device: Device,
    precision: Precision,
    /// Checkpoint order, Hugging Face names.
    params: Vec<(String, Var)>,
    by_name: HashMap<String, usize>,
    inv_freq: Vec<f32>,
}

/// Documents grouped by length class for attention: each group runs as one padded batch.
struct Groups {
    /// Per group: (index into the stream for every padded slot, documents, padded length).
    groups: Vec<(Tensor, usize, usize)>,
    /// For every stream position, its row in the concatenated group outputs.
    inverse: Tensor,
    masks: BTreeMap<usize, Tensor>,
}

impl Qwen2 {
    /// Checks `tensors` against the config (every name present, exact shapes, nothing unknown)
    /// and makes them the model's f32 parameters on `device`.
    pub fn from_tensors(
        config: Qwen2Config,
        mut tensors: HashMap<String, Tensor>,
        device: &Device,
        precision: Precision,
        source: &str,
    ) -> Result<Self> {
        config.validate()?;
        if precision == Precision::Bf16 && !device.is_cuda() {
            return Err(Error::Config(
                "bf16 needs a CUDA device (build with the `cuda` feature); use f32 on CPU".into(),
            ));
        }
        let err = |msg: String| Error::Checkpoint {
            path: source.to_string(),
            msg,
        };
        // Older exports carry RoPE buffers; a tied checkpoint may repeat the embedding.
        tensors.retain(|k, _| !k.ends_with("rotary_emb.inv_freq"));
        if config.tie_word_embeddings
            && let Some(head) = tensors.remove("lm_head.weight")
        {
            let emb = tensors
                .get("model.embed_tokens.weight")
                .ok_or_else(|| err("model.embed_tokens.weight is missing".into()))?;
            let same = head.dims() == emb.dims()
                && head
                    .to_dtype(DType::F32)?
                    .eq(&emb.to_dtype(DType::F32)?)?
                    .to_dtype(DType::F32)?
                    .mean_all()?
                    .to_scalar::<f32>()?
                    == 1.0;
            if !same {
                return Err(err(
                    "tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight"
                        .into(),
                ));
            }
        }
        let mut params = Vec::new();
        for (name, shape) in config.parameter_shapes() {
            let t = tensors.remove(&name).ok_or_else(|| {
                err(format!(
                    "{name} is missing (config: {} layers, tie_word_embeddings {})",
                    config.num_hidden_layers, config.tie_word_embeddings
                ))
            })?;
            if t.dims() != shape.as_slice() {
                return Err(err(format!(
                    "{name} has shape {:?}, the config implies {shape:?}",
                    t.dims()
                )));
            }
            let t = t.to_dtype(DType::F32)?.to_device(device)?;
            params.push((name, Var::from_tensor(&t)?));
        }
        if !tensors.is_empty() {
            let mut extra: Vec<_> = tensors.keys().cloned().collect();
            extra.sort();
            extra.truncate(5);
            return Err(err(format!(
                "tensors the config does not describe: {extra:?} (wrong num_hidden_layers or tie_word_embeddings?)"
            )));
        }
        Ok(Self::assemble(config, params, device, precision))
    }

    /// Fresh weights as transformers initialises Qwen2 (normal(0, initializer_range) for
    /// matrices and embeddings, zero biases, unit norms), drawn from `seed`.
    pub fn new_random(
        config: Qwen2Config,
        device: &Device,
        precision: Precision,
        seed: u64,
    ) -> Result<Self> {
        let std = config
            .extra
            .get("initializer_range")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.02);
        let mut rng = SplitMix64::new(seed);
        let mut tensors = HashMap::new();
        for (name, shape) in config.parameter_shapes() {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else if name.ends_with(".bias") {
                vec![0.0; n]
            } else {
                (0..n).map(|_| (rng.normal() * std) as f32).collect()
            };
            tensors.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        }
        Self::from_tensors(config, tensors, device, precision, "random init")
    }

    fn assemble(
        config: Qwen2Config,
        params: Vec<(String, Var)>,
        device: &Device,
        precision: Precision,
    ) -> Self {
        let d = config.head_dim();
        let base = config.rope_base() as f32;
        // transformers: 1 / base^(arange(0, d, 2) / d), in float32.
        let inv_freq = (0..d / 2)
            .map(|i| 1.0f32 / base.powf((2 * i) as f32 / d as f32))
            .collect();
        let by_name = params
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
        Self {
            config,
            device: device.clone(),
            precision,
            params,
            by_name,
            inv_freq,
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Parameters in checkpoint order.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    pub(crate) fn w(&self, name: &str) -> Result<Tensor> {
        let i = *self
            .by_name
            .get(name)
            .ok_or_else(|| Error::Config(format!("no parameter {name}")))?;
        Ok(self.params[i]
            .1
            .as_tensor()
            .to_dtype(self.precision.dtype())?)
    }

    pub(crate) fn linear(&self, x: &Tensor, prefix: &str, bias: bool) -> Result<Tensor> {
        let y = x.matmul(&self.w(&format!("{prefix}.weight"))?.t()?)?;
        Ok(if bias {
            y.broadcast_add(&self.w(&format!("{prefix}.bias"))?)?
        } else {
            y
        })
    }

    /// transformers' Qwen2RMSNorm: normalise in f32, cast back, then scale.
    pub(crate) fn rms_norm(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        let dt = x.dtype();
        let x32 = x.to_dtype(DType::F32)?;
        let var = x32.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x32.broadcast_div(&(var + self.config.rms_norm_eps)?.sqrt()?)?;
        Ok(normed.to_dtype(dt)?.broadcast_mul(&self.w(name)?)?)
    }

    /// cos and sin for every stream position, `[N, 1, head_dim]`, as transformers' default RoPE.
    pub(crate) fn rope_tables(&self, positions: &[u32]) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let d = 2 * half;
        let mut cos = Vec::with_capacity(positions.len() * d);
        let mut sin = Vec::with_capacity(positions.len() * d);
        for &p in positions {
            let start = cos.len();
            for &f in &self.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
            cos.extend_from_within(start..start + half);
            sin.extend_from_within(start..start + half);
        }
        let n = positions.len();
        let dt = self.precision.dtype();
        let mk = |v: Vec<f32>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, (n, 1, d), &self.device)?.to_dtype(dt)?)
        };
        Ok((mk(cos)?, mk(sin)?))
    }

    pub(crate) fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let d = x.dim(D::Minus1)?;
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
    }

    /// Groups documents by the next power of two of their length; each group is padded to its
    /// longest document. Padding sits after every real token, so the causal mask alone keeps
    /// real queries off it, and padded outputs are never gathered back.
    fn groups(&self, batch: &Batch) -> Result<Groups> {
        let mut by_class: BTreeMap<usize, Vec<(usize, usize)>> = BTreeMap::new();
        for &(s, n) in &batch.docs {
            by_class
                .entry(n.next_power_of_two())
                .or_default()
                .push((s, n));
        }
        let mut inverse = vec![0u32; batch.len()];
        let mut groups = Vec::new();
        let mut masks = BTreeMap::new();
        let mut row = 0usize;
        for docs in by_class.values() {
            let l = docs.iter().map(|d| d.1).max().unwrap_or(0);
            let mut idx = Vec::with_capacity(docs.len() * l);
            for &(s, n) in docs {
                for j in 0..l {
                    if j < n {
                        inverse[s + j] = (row + j) as u32;
                        idx.push((s + j) as u32);
                    } else {
                        idx.push(s as u32);
                    }
                }
                row += l;
            }
            if let std::collections::btree_map::Entry::Vacant(e) = masks.entry(l) {
                let m: Vec<f32> = (0..l * l)
                    .map(|k| if k % l <= k / l { 0.0 } else { f32::MIN })
                    .collect();
                e.insert(Tensor::from_vec(m, (l, l), &self.device)?);
            }
            let n_idx = idx.len();
            groups.push((Tensor::from_vec(idx, n_idx, &self.device)?, docs.len(), l));
        }
        let n = inverse.len();
        Ok(Groups {
            groups,
            inverse: Tensor::from_vec(inverse, n, &self.device)?,
            masks,
        })
    }

    fn attention(
        &self,
        x: &Tensor,
        l: usize,
        rope: &(Tensor, Tensor),
        g: &Groups,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (h, kvh, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim());
        let n = x.dim(0)?;
        let p = format!("model.layers.{l}.self_attn");
        let q = self
            .linear(x, &format!("{p}.q_proj"), true)?
            .reshape((n, h, d))?;
        let k = self
            .linear(x, &format!("{p}.k_proj"), true)?
            .reshape((n, kvh, d))?;
        let v = self
            .linear(x, &format!("{p}.v_proj"), true)?
            .reshape((n, kvh, d))?;
        let q = Self::apply_rope(&q, &rope.0, &rope.1)?;
        let k = Self::apply_rope(&k, &rope.0, &rope.1)?;
        let scale = 1.0 / (d as f64).sqrt();
        let rep = h / kvh;
        let mut outs = Vec::with_capacity(g.groups.len());
        for (idx, docs, len) in &g.groups {
            let (docs, len) = (*docs, *len);
            let qg = q
                .index_select(idx, 0)?
                .reshape((docs, len, h, d))?
                .transpose(1, 2)?;
            let expand = |t: &Tensor| -> Result<Tensor> {
                let t = t
                    .index_select(idx, 0)?
                    .reshape((docs, len, kvh, d))?
                    .transpose(1, 2)?;
                // transformers' repeat_kv: query head i reads key/value head i / rep.
                Ok(t.unsqueeze(2)?
                    .broadcast_as((docs, kvh, rep, len, d))?
                    .reshape((docs, h, len, d))?)
            };
            let (kg, vg) = (expand(&k)?, expand(&v)?);
            let scores = (qg.contiguous()?.matmul(&kg.t()?.contiguous()?)? * scale)?
                .to_dtype(DType::F32)?
                .broadcast_add(&g.masks[&len])?;
            let probs = softmax_last(&scores)?.to_dtype(x.dtype())?;
            let o = probs.matmul(&vg.contiguous()?)?; // [docs, h, len, d]
            outs.push(o.transpose(1, 2)?.reshape((docs * len, h * d))?);
        }
        let all = Tensor::cat(&outs, 0)?.index_select(&g.inverse, 0)?;
        self.linear(&all, &format!("{p}.o_proj"), false)
    }

    pub(crate) fn mlp(&self, x: &Tensor, l: usize) -> Result<Tensor> {
        let p = format!("model.layers.{l}.mlp");
        let gate = self.linear(x, &format!("{p}.gate_proj"), false)?.silu()?;
        let up = self.linear(x, &format!("{p}.up_proj"), false)?;
        self.linear(&(gate * up)?, &format!("{p}.down_proj"), false)
    }

    /// Logits `[N, vocab]` in f32 for every position of the stream.
    pub fn forward(&self, batch: &Batch) -> Result<Tensor> {
        if batch.is_empty() {
            return Err(Error::Batch("empty batch".into()));
        }
        if let Some(m) = batch.max_id()
            && m as usize >= self.config.vocab_size
        {
            return Err(Error::Batch(format!(
                "token id {m} is outside the model's vocabulary ({} ids)",
                self.config.vocab_size
            )));
        }
        let ids = Tensor::from_slice(&batch.ids, batch.len(), &self.device)?;
        let rope = self.rope_tables(&batch.positions)?;
        let groups = self.groups(batch)?;
        let mut x = self.w("model.embed_tokens.weight")?.index_select(&ids, 0)?;
        for l in 0..self.config.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let a = self.attention(
                &self.rms_norm(&x, &format!("{p}.input_layernorm.weight"))?,
                l,
                &rope,
                &groups,
            )?;
            x = (x + a)?;
            let m = self.mlp(
                &self.rms_norm(&x, &format!("{p}.post_attention_layernorm.weight"))?,
                l,
            )?;
            x = (x + m)?;
        }
        self.head(&self.rms_norm(&x, "model.norm.weight")?)
    }

    /// The LM head (the embedding when tied) over final-normed hidden states; f32 logits.
    pub(crate) fn head(&self, x: &Tensor) -> Result<Tensor> {
        let head = if self.config.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        Ok(x.matmul(&self.w(head)?.t()?)?.to_dtype(DType::F32)?)
    }

    /// Σ weight × cross-entropy over the batch (a scalar); divide by the loss-token count of the
    /// whole global batch for the mean, so accumulated micro-batches add up to it.
    pub fn loss_sum(&self, batch: &Batch) -> Result<Tensor> {
        let logits = self.forward(batch)?;
        self.loss_sum_of(&logits, batch)
    }

    pub fn loss_sum_of(&self, logits: &Tensor, batch: &Batch) -> Result<Tensor> {
        let n = batch.len();
        let logp = log_softmax_last(logits)?;
        let tgt = Tensor::from_slice(&batch.targets, (n, 1), &self.device)?;
        let nll = logp.gather(&tgt, 1)?.squeeze(1)?.neg()?;
        let w = Tensor::from_slice(&batch.weights, n, &self.device)?;
        Ok((nll * w)?.sum_all()?)
    }
}

// The max only shifts for stability; detached, it adds nothing to the gradient (exactly as it
// contributes nothing mathematically).
pub(crate) fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let diff = x.broadcast_sub(&max)?;
    let lse = diff.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(diff.broadcast_sub(&lse)?)
}
