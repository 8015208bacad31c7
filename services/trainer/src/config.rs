//! What a training job runs: the stages to train (from the manifest) with their learning rate
//! schedule and epochs, and the shared optimiser, batch and checkpoint settings.
use anyhow::ensure;
use davinci_model::AdamWConfig;
use serde::{Deserialize, Serialize};

/// One stage's schedule: linear warmup to `lr`, then cosine to `lr × min_lr_ratio`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// A stage name from the manifest.
    pub name: String,
    pub lr: f64,
    #[serde(default = "default_warmup")]
    pub warmup_ratio: f64,
    #[serde(default = "default_min_lr")]
    pub min_lr_ratio: f64,
    #[serde(default = "one")]
    pub epochs: u32,
    /// Stop the stage after this many optimiser steps (default: all of its epochs).
    #[serde(default)]
    pub max_steps: Option<u64>,
}

fn default_warmup() -> f64 {
    0.05
}
fn default_min_lr() -> f64 {
    0.1
}
fn one() -> u32 {
    1
}

impl StageConfig {
    /// The paper's mid-training schedule: peak 8e-5, 5% warmup, cosine, one epoch.
    pub fn mid_training(name: &str) -> Self {
        Self {
            name: name.into(),
            lr: 8e-5,
            warmup_ratio: 0.05,
            min_lr_ratio: 0.1,
            epochs: 1,
            max_steps: None,
        }
    }

    /// The paper's SFT schedule: 1e-5, 10% warmup, cosine, five epochs.
    pub fn sft(name: &str) -> Self {
        Self {
            name: name.into(),
            lr: 1e-5,
            warmup_ratio: 0.10,
            min_lr_ratio: 0.1,
            epochs: 5,
            max_steps: None,
        }
    }

    /// Learning rate of step `s` (0-based) of `total`.
    pub fn lr_at(&self, s: u64, total: u64) -> f64 {
        let warmup = (self.warmup_ratio * total as f64).ceil() as u64;
        if s < warmup {
            return self.lr * (s + 1) as f64 / warmup as f64;
        }
        let span = total.saturating_sub(warmup).max(1);
        let progress = ((s - warmup) as f64 / span as f64).min(1.0);
        let min = self.lr * self.min_lr_ratio;
        min + (self.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// Every manifest stage with the paper's schedule: SFT for assistant-only stages,
/// mid-training otherwise.
pub fn default_stages(m: &crate::data::Manifest) -> Vec<StageConfig> {
    m.stages
        .iter()
        .map(|s| {
            if s.mask == crate::data::MaskMode::AssistantOnly {
                StageConfig::sft(&s.name)
            } else {
                StageConfig::mid_training(&s.name)
            }
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Stages in training order; empty: every manifest stage with the paper's schedule
    /// (SFT for assistant-only stages, mid-training otherwise).
    #[serde(default)]
    pub stages: Vec<StageConfig>,
    /// Rows (packed bins) per optimiser step.
    pub global_batch: usize,
    /// Rows per forward/backward pass; gradients accumulate up to `global_batch`.
    pub micro_batch: usize,
    #[serde(default)]
    pub seed: u64,
    /// Global gradient-norm clip (0: none).
    #[serde(default = "default_clip")]
    pub clip: f64,
    #[serde(default)]
    pub adamw: AdamWConfig,
    /// Checkpoint every this many steps (and at the end of every stage).
    #[serde(default = "default_every")]
    pub checkpoint_every: u64,
}

fn default_clip() -> f64 {
    1.0
}
fn default_every() -> u64 {
    100
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            stages: Vec::new(),
            global_batch: 8,
            micro_batch: 1,
            seed: 0,
            clip: default_clip(),
            adamw: AdamWConfig::default(),
            checkpoint_every: default_every(),
        }
    }
}

/// Values a command line or a request sets over a config's.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// Caps every stage.
    pub steps: Option<u64>,
    pub global_batch: Option<usize>,
    pub micro_batch: Option<usize>,
    /// Peak learning rate of every stage.
    pub lr: Option<f64>,
    pub seed: Option<u64>,
    pub checkpoint_every: Option<u64>,
}

impl TrainConfig {
    /// Fills in the manifest's stages when none are given, applies `o`, and validates.
    pub fn resolve(mut self, m: &crate::data::Manifest, o: &Overrides) -> anyhow::Result<Self> {
        if self.stages.is_empty() {
            self.stages = default_stages(m);
        }
        for s in &mut self.stages {
            if let Some(n) = o.steps {
                s.max_steps = Some(n);
            }
            if let Some(lr) = o.lr {
                s.lr = lr;
            }
        }
        if let Some(b) = o.global_batch {
            self.global_batch = b;
            self.micro_batch = self.micro_batch.min(b);
        }
        if let Some(b) = o.micro_batch {
            self.micro_batch = b;
        }
        if let Some(s) = o.seed {
            self.seed = s;
        }
        if let Some(c) = o.checkpoint_every {
            self.checkpoint_every = c;
        }
        self.validate()?;
        Ok(self)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(self.global_batch > 0, "global_batch must be > 0");
        ensure!(
            self.micro_batch > 0 && self.micro_batch <= self.global_batch,
            "micro_batch must be in 1..=global_batch ({})",
            self.global_batch
        );
        ensure!(self.checkpoint_every > 0, "checkpoint_every must be > 0");
        ensure!(self.clip >= 0.0, "clip must be >= 0");
        let a = &self.adamw;
        ensure!(
            (0.0..1.0).contains(&a.beta1) && (0.0..1.0).contains(&a.beta2),
            "adamw betas must be in [0, 1)"
        );
        ensure!(
            a.eps > 0.0 && a.weight_decay >= 0.0,
            "adamw eps must be > 0, weight_decay >= 0"
        );
        for (i, s) in self.stages.iter().enumerate() {
            ensure!(s.lr > 0.0 && s.lr.is_finite(), "stages[{i}].lr must be > 0");
            ensure!(
                (0.0..1.0).contains(&s.warmup_ratio),
                "stages[{i}].warmup_ratio must be in [0, 1)"
            );
            ensure!(
                (0.0..=1.0).contains(&s.min_lr_ratio),
                "stages[{i}].min_lr_ratio must be in [0, 1]"
            );
            ensure!(s.epochs > 0, "stages[{i}].epochs must be > 0");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = StageConfig::mid_training("s");
        // 100 steps: 5 warmup steps up to the peak, then down to 10% of it
        assert!((s.lr_at(0, 100) - 8e-5 / 5.0).abs() < 1e-12);
        assert!((s.lr_at(4, 100) - 8e-5).abs() < 1e-12);
        assert!((s.lr_at(5, 100) - 8e-5).abs() < 1e-12);
        assert!(s.lr_at(50, 100) < s.lr_at(20, 100));
        assert!((s.lr_at(100, 100) - 8e-6).abs() < 1e-12);
        let sft = StageConfig::sft("sft");
        assert_eq!((sft.lr, sft.warmup_ratio, sft.epochs), (1e-5, 0.1, 5));
    }
}
