//! Megatron-LM's iteration lines (`training_log` in megatron/training/training.py, printed by
//! the last rank every `--log-interval` iterations), e.g.
//!
//! ```text
//!  [2026-12-07 15:02:11.123456] iteration       10/     200 | consumed samples:          640 | elapsed time per iteration (ms): 4512.3 | throughput per GPU (TFLOP/s/GPU): 402.7 | learning rate: 4.000000E-05 | global batch size:    64 | lm loss: 2.345678E+00 | loss scale: 1.0 | grad norm: 0.812 | number of skipped iterations:   0 | number of nan iterations:   0 |
//! ```
//!
//! Fields are `name: value` between `|`; which ones appear depends on the flags and the
//! version (older releases print no timestamp, `learning rate: 9.150E-06`), so each is optional
//! except the iteration.

/// One parsed iteration line.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Iteration {
    pub iteration: u64,
    pub train_iters: u64,
    pub consumed_samples: Option<u64>,
    pub elapsed_ms: Option<f64>,
    pub tflops_per_gpu: Option<f64>,
    pub lr: Option<f64>,
    pub global_batch: Option<u64>,
    pub loss: Option<f64>,
    pub grad_norm: Option<f64>,
    pub skipped: Option<u64>,
    pub nan: Option<u64>,
}

impl Iteration {
    /// Tokens per second of the iteration: `global batch × seq_len / elapsed`.
    pub fn tokens_per_s(&self, seq_len: usize) -> Option<f64> {
        let (b, ms) = (self.global_batch?, self.elapsed_ms?);
        (ms > 0.0).then(|| b as f64 * seq_len as f64 / (ms / 1000.0))
    }
}

/// Parses one log line; `None` when it is not an iteration line.
pub fn parse(line: &str) -> Option<Iteration> {
    let at = line.find(" iteration ")?;
    let mut fields = line[at..].split('|').map(str::trim);
    let (done, total) = fields
        .next()?
        .strip_prefix("iteration")?
        .trim()
        .split_once('/')?;
    let mut it = Iteration {
        iteration: done.trim().parse().ok()?,
        train_iters: total.trim().parse().ok()?,
        ..Default::default()
    };
    for f in fields {
        let Some((k, v)) = f.rsplit_once(':') else {
            continue;
        };
        let v = v.trim();
        let num = || v.parse::<f64>().ok();
        let int = || v.parse::<u64>().ok();
        match k.trim() {
            "consumed samples" => it.consumed_samples = int(),
            "elapsed time per iteration (ms)" => it.elapsed_ms = num(),
            "throughput per GPU (TFLOP/s/GPU)" => it.tflops_per_gpu = num(),
            "learning rate" => it.lr = num(),
            "global batch size" => it.global_batch = int(),
            "lm loss" => it.loss = num(),
            "grad norm" => it.grad_norm = num(),
            "number of skipped iterations" => it.skipped = int(),
            "number of nan iterations" => it.nan = int(),
            _ => {}
        }
    }
    Some(it)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_current_and_older_lines() {
        // The format of core_v0.15 (timestamp with microseconds, --log-throughput).
        let l = " [2026-12-07 15:02:11.123456] iteration       10/     200 | consumed samples:          640 | elapsed time per iteration (ms): 4512.3 | throughput per GPU (TFLOP/s/GPU): 402.7 | learning rate: 4.000000E-05 | global batch size:    64 | lm loss: 2.345678E+00 | loss scale: 1.0 | grad norm: 0.812 | number of skipped iterations:   0 | number of nan iterations:   0 |";
        let it = parse(l).unwrap();
        assert_eq!((it.iteration, it.train_iters), (10, 200));
        assert_eq!(it.consumed_samples, Some(640));
        assert_eq!(it.elapsed_ms, Some(4512.3));
        assert_eq!(it.tflops_per_gpu, Some(402.7));
        assert_eq!(it.lr, Some(4e-5));
        assert_eq!(it.global_batch, Some(64));
        assert_eq!(it.loss, Some(2.345678));
        assert_eq!(it.grad_norm, Some(0.812));
        assert_eq!((it.skipped, it.nan), (Some(0), Some(0)));
        let tps = it.tokens_per_s(4096).unwrap();
        assert!((tps - 64.0 * 4096.0 / 4.5123).abs() < 1e-6);
        // 2023-era lines: no timestamp, short learning rate, no throughput.
        let old = " iteration       37/    5000 | consumed samples:        18944 | elapsed time per iteration (ms): 21034.7 | learning rate: 2.960E-06 | global batch size:   512 | lm loss: 1.873021E+00 | loss scale: 1.0 | grad norm: 0.412 | number of skipped iterations:   0 | number of nan iterations:   0 |";
        let it = parse(old).unwrap();
        assert_eq!(
            (it.iteration, it.train_iters, it.lr),
            (37, 5000, Some(2.96e-6))
        );
        assert_eq!(it.tflops_per_gpu, None);
        for other in [
            "[davinci] stage 0 train: torchrun on node 0 of 8",
            " > padded vocab (size: 151665) with 399 dummy tokens (new size: 152064)",
            "[after training is done] datetime: 2026-12-07 15:40:00",
        ] {
            assert_eq!(parse(other), None, "{other}");
        }
    }
}
