//! Generation throughput of one model on the CPU: batched prefill, then KV-cached greedy
//! decoding of exactly `NEW` tokens per prompt (no end-of-sequence token), timed after one
//! warm-up generation. Prints one JSON line (prefill and decode tokens/s, peak RSS).
//! scripts/bench_generate.py runs it beside transformers' `generate` on the same model shape,
//! batch and lengths.
//!
//! Usage: bench_generate CONFIG_JSON PROMPTS PROMPT_LEN NEW
use davinci_model::rng::SplitMix64;
use davinci_model::{Device, KvCache, Precision, Qwen2, Qwen2Config, SamplingParams, Step};
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
    if a.len() != 5 {
        return Err("usage: bench_generate CONFIG_JSON PROMPTS PROMPT_LEN NEW".into());
    }
    let cfg = Qwen2Config::from_file(std::path::Path::new(&a[1]))?;
    let (n, len, new): (usize, usize, usize) = (a[2].parse()?, a[3].parse()?, a[4].parse()?);
    let model = Qwen2::new_random(cfg.clone(), &Device::Cpu, Precision::F32, 0)?;
    let mut rng = SplitMix64::new(1);
    let prompts: Vec<Vec<u32>> = (0..n)
        .map(|_| {
            (0..len)
                .map(|_| rng.below(cfg.vocab_size as u64) as u32)
                .collect()
        })
        .collect();
    let greedy = SamplingParams::default();
    model.generate(&prompts, 2, &[], &greedy)?;
    // Prefill alone (every prompt through an empty cache), then the whole generation.
    let t = Instant::now();
    let mut caches: Vec<KvCache> = prompts.iter().map(|_| KvCache::new(&model)).collect();
    let mut steps: Vec<Step> = prompts
        .iter()
        .zip(caches.iter_mut())
        .map(|(p, cache)| Step {
            tokens: p,
            cache,
            all_logits: false,
        })
        .collect();
    model.forward_cached(&mut steps)?;
    let prefill = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let out = model.generate(&prompts, new, &[], &greedy)?;
    let total = t.elapsed().as_secs_f64();
    let generated: usize = out.iter().map(Vec::len).sum();
    assert_eq!(generated, n * new, "every prompt decodes NEW tokens");
    let decode = (total - prefill).max(f64::EPSILON);
    println!(
        "{}",
        serde_json::json!({
            "engine": "davinci-model (candle 0.11.1)",
            "parameters": cfg.num_parameters(),
            "prompts": n,
            "prompt_len": len,
            "new_tokens": new,
            "prefill_tokens_per_s": (n * len) as f64 / prefill,
            "decode_tokens_per_s": (n * (new - 1)) as f64 / decode,
            "seconds": total,
            "peak_rss_mib": peak_rss_mib(),
        })
    );
    Ok(())
}
