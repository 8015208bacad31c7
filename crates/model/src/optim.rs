//! Gradient accumulation, global-norm clipping and AdamW (PyTorch's update rule), with state
//! that round-trips through a checkpoint exactly.
//!
//! candle's own `AdamW` decays every parameter and keeps its moments private; here norms and
//! biases are not decayed, and the moments are named tensors saved next to the weights.
use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use std::collections::HashMap;

/// Gradients summed over micro-batches, one slot per parameter (checkpoint order).
#[derive(Debug, Default)]
pub struct Grads {
    pub slots: Vec<Option<Tensor>>,
}

impl Grads {
    pub fn new(params: usize) -> Self {
        Self {
            slots: vec![None; params],
        }
    }

    /// Adds the gradients of one backward pass.
    pub fn accumulate(&mut self, params: &[(String, Var)], store: &GradStore) -> Result<()> {
        for (slot, (_, v)) in self.slots.iter_mut().zip(params) {
            if let Some(g) = store.get(v.as_tensor()) {
                let g = g.to_dtype(DType::F32)?.detach();
                *slot = Some(match slot.take() {
                    Some(acc) => (acc + g)?,
                    None => g,
                });
            }
        }
        Ok(())
    }

    /// Names of the parameters that received no gradient.
    pub fn missing<'a>(&self, params: &'a [(String, Var)]) -> Vec<&'a str> {
        self.slots
            .iter()
            .zip(params)
            .filter(|(s, _)| s.is_none())
            .map(|(_, (n, _))| n.as_str())
            .collect()
    }

    /// L2 norm over every gradient.
    pub fn global_norm(&self) -> Result<f64> {
        let mut sq = 0f64;
        for g in self.slots.iter().flatten() {
            sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        Ok(sq.sqrt())
    }

    pub fn scale(&mut self, by: f64) -> Result<()> {
        for s in self.slots.iter_mut() {
            if let Some(g) = s.take() {
                *s = Some((g * by)?);
            }
        }
        Ok(())
    }

    /// Scales so the global norm is at most `max_norm` (PyTorch's `clip_grad_norm_`, which
    /// multiplies by `max_norm / (norm + 1e-6)` when that is below 1); returns the norm before.
    pub fn clip(&mut self, max_norm: f64) -> Result<f64> {
        let norm = self.global_norm()?;
        if max_norm > 0.0 {
            let c = max_norm / (norm + 1e-6);
            if c < 1.0 {
                self.scale(c)?;
            }
        }
        Ok(norm)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// Megatron's usual settings for Qwen2.5 training (betas 0.9 / 0.95, decay 0.1).
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// No weight decay on norms and biases.
pub fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.ends_with("norm.weight"))
}

#[derive(Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// Completed updates.
    pub step: u64,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
}

impl AdamW {
    pub fn new(params: &[(String, Var)], config: AdamWConfig) -> Result<Self> {
        let zeros = || -> Result<Vec<Tensor>> {
            params
                .iter()
                .map(|(_, v)| Ok(v.as_tensor().zeros_like()?))
                .collect()
        };
        Ok(Self {
            config,
            step: 0,
            exp_avg: zeros()?,
            exp_avg_sq: zeros()?,
        })
    }

    /// One update at learning rate `lr` (torch.optim.AdamW, decoupled decay).
    pub fn update(&mut self, params: &[(String, Var)], grads: &Grads, lr: f64) -> Result<()> {
        let c = self.config;
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for (i, ((name, var), g)) in params.iter().zip(&grads.slots).enumerate() {
            let Some(g) = g else { continue };
            let m = ((&self.exp_avg[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&self.exp_avg_sq[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((v.sqrt()? / bc2.sqrt())? + c.eps)?;
            let mut p = var.as_tensor().detach();
            if decays(name) && c.weight_decay > 0.0 {
                p = (p * (1.0 - lr * c.weight_decay))?;
            }
            let p = (p - ((&m / denom)? * (lr / bc1))?)?;
            var.set(&p)?;
            self.exp_avg[i] = m;
            self.exp_avg_sq[i] = v;
        }
        Ok(())
    }

    /// The moments as named tensors (`{param}.exp_avg`, `{param}.exp_avg_sq`).
    pub fn state(&self, params: &[(String, Var)]) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * params.len());
        for (i, (n, _)) in params.iter().enumerate() {
            out.push((format!("{n}.exp_avg"), self.exp_avg[i].clone()));
            out.push((format!("{n}.exp_avg_sq"), self.exp_avg_sq[i].clone()));
        }
        out
    }

    pub fn load_state(
        &mut self,
        params: &[(String, Var)],
        mut tensors: HashMap<String, Tensor>,
        step: u64,
    ) -> Result<()> {
        for (i, (n, v)) in params.iter().enumerate() {
            for (suffix, slot) in [
                ("exp_avg", &mut self.exp_avg[i]),
                ("exp_avg_sq", &mut self.exp_avg_sq[i]),
            ] {
                let key = format!("{n}.{suffix}");
                let t = tensors.remove(&key).ok_or_else(|| Error::Checkpoint {
                    path: "optimizer state".into(),
                    msg: format!("{key} is missing"),
                })?;
                if t.dims() != v.dims() {
                    return Err(Error::Checkpoint {
                        path: "optimizer state".into(),
                        msg: format!("{key} has shape {:?}, expected {:?}", t.dims(), v.dims()),
                    });
                }
                *slot = t.to_dtype(DType::F32)?.to_device(v.device())?;
            }
        }
        self.step = step;
        Ok(())
    }
}
