//! Incremental decoding: a per-sequence KV cache, a batched step over sequences of different
//! lengths, and token sampling (greedy, temperature, top-p) from a seed.
//!
//! The step reuses the training forward's ops (the same RMSNorm, RoPE tables, projections,
//! softmax and MLP), so a prompt run through the cache gives the training forward's logits, and
//! greedy decoding equals transformers' `generate` (both pinned by tests/generate.rs). Linear
//! layers run once over the new tokens of every sequence together; attention runs per sequence
//! against its own cache.
use crate::model::{Qwen2, softmax_last};
use crate::rng::SplitMix64;
use crate::{Error, Result};
use candle_core::{DType, Tensor};

/// Keys and values of every layer for one sequence, `[kv_heads, len, head_dim]` each.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    pub fn new(model: &Qwen2) -> Self {
        Self {
            layers: vec![None; model.config.num_hidden_layers],
            len: 0,
        }
    }

    /// Tokens held (the position the next token gets).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One sequence's part of a batched step: its new tokens, its cache, and whether the logits
/// of every new token are wanted (prompt scoring) or only the last one's (generation).
pub struct Step<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    pub all_logits: bool,
}

impl Qwen2 {
    /// Runs the new tokens of every sequence after what its cache holds and appends them to
    /// the cache. Returns f32 logits per sequence: `[new tokens, vocab]` for a step with
    /// `all_logits`, else `[1, vocab]` for its last new token. Prefills and decode steps of
    /// different sequences mix freely in one call.
    pub fn forward_cached(&self, steps: &mut [Step<'_>]) -> Result<Vec<Tensor>> {
        let c = &self.config;
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        for s in steps.iter() {
            if s.tokens.is_empty() {
                return Err(Error::Batch(
                    "a sequence in the step has no new tokens".into(),
                ));
            }
            if s.cache.layers.len() != c.num_hidden_layers {
                return Err(Error::Batch("KV cache made for another model".into()));
            }
            for (j, &t) in s.tokens.iter().enumerate() {
                if t as usize >= c.vocab_size {
                    return Err(Error::Batch(format!(
                        "token id {t} is outside the model's vocabulary ({} ids)",
                        c.vocab_size
                    )));
                }
                ids.push(t);
                positions.push((s.cache.len + j) as u32);
            }
        }
        if ids.is_empty() {
            return Err(Error::Batch("empty step".into()));
        }
        let device = self.device();
        let n = ids.len();
        let rope = self.rope_tables(&positions)?;
        let ids_t = Tensor::from_vec(ids, n, device)?;
        let mut x = self
            .w("model.embed_tokens.weight")?
            .index_select(&ids_t, 0)?;
        let (h, kvh, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim());
        let rep = h / kvh;
        let scale = 1.0 / (d as f64).sqrt();
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let xn = self.rms_norm(&x, &format!("{p}.input_layernorm.weight"))?;
            let a = format!("{p}.self_attn");
            let q = self
                .linear(&xn, &format!("{a}.q_proj"), true)?
                .reshape((n, h, d))?;
            let k = self
                .linear(&xn, &format!("{a}.k_proj"), true)?
                .reshape((n, kvh, d))?;
            let v = self
                .linear(&xn, &format!("{a}.v_proj"), true)?
                .reshape((n, kvh, d))?;
            let q = Self::apply_rope(&q, &rope.0, &rope.1)?;
            let k = Self::apply_rope(&k, &rope.0, &rope.1)?;
            let mut outs = Vec::with_capacity(steps.len());
            let mut off = 0;
            for s in steps.iter_mut() {
                let m = s.tokens.len();
                let past = s.cache.len;
                let qi = q.narrow(0, off, m)?.transpose(0, 1)?; // [h, m, d]
                let ki = k.narrow(0, off, m)?.transpose(0, 1)?.contiguous()?;
                let vi = v.narrow(0, off, m)?.transpose(0, 1)?.contiguous()?;
                let (kc, vc) = match &s.cache.layers[l] {
                    Some((pk, pv)) => (Tensor::cat(&[pk, &ki], 1)?, Tensor::cat(&[pv, &vi], 1)?),
                    None => (ki, vi),
                };
                let total = past + m;
                // transformers' repeat_kv: query head i reads key/value head i / rep.
                let expand = |t: &Tensor| -> Result<Tensor> {
                    Ok(t.unsqueeze(1)?
                        .broadcast_as((kvh, rep, total, d))?
                        .reshape((h, total, d))?)
                };
                let (ke, ve) = (expand(&kc)?, expand(&vc)?);
                let mut scores = (qi.contiguous()?.matmul(&ke.t()?.contiguous()?)? * scale)?
                    .to_dtype(DType::F32)?;
                if m > 1 {
                    // new token i sits at position past + i and sees keys 0..=past + i
                    let mask: Vec<f32> = (0..m * total)
                        .map(|k| {
                            if k % total <= past + k / total {
                                0.0
                            } else {
                                f32::MIN
                            }
                        })
                        .collect();
                    scores = scores.broadcast_add(&Tensor::from_vec(mask, (m, total), device)?)?;
                }
                let probs = softmax_last(&scores)?.to_dtype(x.dtype())?;
                let o = probs.matmul(&ve.contiguous()?)?; // [h, m, d]
                outs.push(o.transpose(0, 1)?.reshape((m, h * d))?);
                s.cache.layers[l] = Some((kc, vc));
                off += m;
            }
            let attn = self.linear(&Tensor::cat(&outs, 0)?, &format!("{a}.o_proj"), false)?;
            x = (x + attn)?;
            let mlp = self.mlp(
                &self.rms_norm(&x, &format!("{p}.post_attention_layernorm.weight"))?,
                l,
            )?;
            x = (x + mlp)?;
        }
        for s in steps.iter_mut() {
            s.cache.len += s.tokens.len();
        }
        // Only the rows whose logits are wanted go through the (vocabulary-sized) head.
        let mut rows = Vec::new();
        let mut off = 0u32;
        let mut counts = Vec::with_capacity(steps.len());
        for s in steps.iter() {
            let m = s.tokens.len() as u32;
            if s.all_logits {
                rows.extend(off..off + m);
                counts.push(m as usize);
            } else {
                rows.push(off + m - 1);
                counts.push(1);
            }
            off += m;
        }
        let nr = rows.len();
        let x = x.index_select(&Tensor::from_vec(rows, nr, device)?, 0)?;
        let logits = self.head(&self.rms_norm(&x, "model.norm.weight")?)?;
        let mut out = Vec::with_capacity(counts.len());
        let mut at = 0;
        for m in counts {
            out.push(logits.narrow(0, at, m)?);
            at += m;
        }
        Ok(out)
    }

    /// Batched generation: every prompt is prefilled, then all unfinished sequences step
    /// together. A sequence ends at one of `eos` (kept in its output) or after
    /// `max_new_tokens`.
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        max_new_tokens: usize,
        eos: &[u32],
        sampling: &SamplingParams,
    ) -> Result<Vec<Vec<u32>>> {
        let mut caches: Vec<KvCache> = prompts.iter().map(|_| KvCache::new(self)).collect();
        let mut samplers: Vec<Sampler> = (0..prompts.len())
            .map(|i| Sampler::new(sampling.clone(), i as u64))
            .collect();
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
        let mut live: Vec<usize> = (0..prompts.len()).collect();
        let mut next: Vec<Vec<u32>> = prompts.to_vec();
        while !live.is_empty() && max_new_tokens > 0 {
            let mut steps = Vec::with_capacity(live.len());
            let mut cache_refs: Vec<Option<&mut KvCache>> = caches.iter_mut().map(Some).collect();
            for &i in &live {
                steps.push(Step {
                    tokens: &next[i],
                    cache: cache_refs[i].take().expect("each sequence once"),
                    all_logits: false,
                });
            }
            let logits = self.forward_cached(&mut steps)?;
            drop(steps);
            let mut still = Vec::with_capacity(live.len());
            for (j, &i) in live.iter().enumerate() {
                let row: Vec<f32> = logits[j].squeeze(0)?.to_vec1()?;
                let t = samplers[i].sample(&row);
                out[i].push(t);
                if !eos.contains(&t) && out[i].len() < max_new_tokens {
                    still.push(i);
                }
                next[i] = vec![t];
            }
            live = still;
        }
        Ok(out)
    }
}

/// How the next token is picked. Temperature 0 is greedy (argmax, first index on ties, as
/// `torch.argmax`).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    /// Same seed, same samples; `None` draws one from the clock.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            seed: None,
        }
    }
}

/// Draws tokens for one sequence. Sequences of one request get distinct streams from
/// (seed, index), so `n` choices differ and a re-run with the seed repeats them.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
}

impl Sampler {
    pub fn new(params: SamplingParams, index: u64) -> Self {
        let seed = params.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
        let mut mix = SplitMix64::new(seed ^ index.wrapping_mul(0xA076_1D64_78BD_642F));
        let rng = SplitMix64::new(mix.next_u64());
        Self { params, rng }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        // transformers' order: temperature, then top-p over the tempered distribution.
        let t = self.params.temperature as f64;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut probs: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l as f64 - max) / t).exp()))
            .collect();
        let z: f64 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= z);
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let top_p = self.params.top_p.clamp(0.0, 1.0) as f64;
        if top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = 0;
            for p in &probs {
                keep += 1;
                cum += p.1;
                if cum >= top_p {
                    break;
                }
            }
            probs.truncate(keep.max(1));
        }
        let total: f64 = probs.iter().map(|p| p.1).sum();
        let mut u = self.rng.next_f64() * total;
        for &(i, p) in &probs {
            if u < p {
                return i;
            }
            u -= p;
        }
        probs.last().map(|p| p.0).unwrap_or(0)
    }
}

pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// log-softmax of one row of logits, in f64 for the sum.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits
        .iter()
        .map(|&l| (l as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    logits.iter().map(|&l| (l as f64 - lse) as f32).collect()
}

/// The `k` most likely ids with their log-probabilities, most likely first.
pub fn top_k(logprobs: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut v: Vec<(u32, f32)> = logprobs
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l))
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(k);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams::default(), 0);
        assert_eq!(s.sample(&[0.0, 2.0, 2.0, -1.0]), 1);
    }

    #[test]
    fn seeded_sampling_repeats_and_top_p_cuts_the_tail() {
        let logits = [1.0f32, 0.5, 0.2, -3.0, 0.9];
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            seed: Some(42),
        };
        let draw = |p: &SamplingParams, idx| {
            let mut s = Sampler::new(p.clone(), idx);
            (0..200).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(&p, 0), draw(&p, 0));
        assert_ne!(draw(&p, 0), draw(&p, 1), "choices of one request differ");
        let all = draw(&p, 0);
        assert!(all.contains(&2), "the full distribution reaches id 2");
        // top_p 0.5 keeps ids 0 and 4 (p ≈ 0.33 + 0.30 ≥ 0.5) only
        let cut = draw(&SamplingParams { top_p: 0.5, ..p }, 0);
        assert!(cut.iter().all(|&t| t == 0 || t == 4), "{cut:?}");
        assert!(cut.contains(&0) && cut.contains(&4));
    }

    #[test]
    fn log_softmax_normalises() {
        let l = log_softmax(&[1.0, 2.0, 3.0]);
        let s: f32 = l.iter().map(|x| x.exp()).sum();
        assert!((s - 1.0).abs() < 1e-6);
        assert_eq!(top_k(&l, 2).iter().map(|p| p.0).collect::<Vec<_>>(), [2, 1]);
    }
}
