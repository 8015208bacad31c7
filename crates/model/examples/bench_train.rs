//! Training throughput of one model and batch on the CPU: forward + backward + AdamW update,
//! timed over `--steps` after one warm-up step. Prints one JSON line (tokens/s, peak RSS).
//! scripts/bench_train.py runs it beside transformers on the same model and batch.
//!
//! Usage: bench_train CONFIG_JSON ROWS LEN DOCS_PER_ROW STEPS
use davinci_model::rng::SplitMix64;
use davinci_model::{AdamW, AdamWConfig, Batch, Device, Grads, Precision, Qwen2, Qwen2Config, Row};
use std::time::Instant;

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 6 {
        return Err("usage: bench_train CONFIG_JSON ROWS LEN DOCS_PER_ROW STEPS".into());
    }
    let cfg = Qwen2Config::from_file(std::path::Path::new(&a[1]))?;
    let (rows, len, docs, steps): (usize, usize, usize, usize) =
        (a[2].parse()?, a[3].parse()?, a[4].parse()?, a[5].parse()?);
    let model = Qwen2::new_random(cfg.clone(), &Device::Cpu, Precision::F32, 0)?;
    let mut rng = SplitMix64::new(1);
    let batch_rows: Vec<Row> = (0..rows)
        .map(|_| Row {
            tokens: (0..len)
                .map(|_| rng.below(cfg.vocab_size as u64) as u32)
                .collect(),
            mask: vec![1; len],
            doc_lens: (0..docs)
                .map(|d| len / docs + usize::from(d < len % docs))
                .collect(),
        })
        .collect();
    let batch = Batch::from_rows(&batch_rows)?;
    let mut opt = AdamW::new(model.params(), AdamWConfig::default())?;
    let mut step = || -> Result<f32, Box<dyn std::error::Error>> {
        let loss = (model.loss_sum(&batch)? / batch.loss_tokens())?;
        let mut g = Grads::new(model.params().len());
        g.accumulate(model.params(), &loss.backward()?)?;
        g.clip(1.0)?;
        opt.update(model.params(), &g, 1e-4)?;
        Ok(loss.to_scalar::<f32>()?)
    };
    step()?;
    let t = Instant::now();
    let mut last = 0.0;
    for _ in 0..steps {
        last = step()?;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "engine": "davinci-model (candle 0.11.1)",
            "parameters": cfg.num_parameters(),
            "tokens_per_step": rows * len,
            "steps": steps,
            "seconds": secs,
            "tokens_per_s": (rows * len * steps) as f64 / secs,
            "peak_rss_mib": peak_rss_mib(),
            "last_loss": last,
        })
    );
    Ok(())
}
