//! Throughput of tokenize and of tokenize + pack + write on a Sample JSONL corpus, on a given
//! number of threads. Used by `scripts/bench_tokenizer_packer.sh`; prints one JSON line.
//!
//! `bench_pack <tokenizer.json> <corpus.jsonl> <out-dir> <threads>`
use davinci_core::sample::{Sample, SampleSource};
use davinci_tokenize::Tokenizer;
use davinci_tokenize::chat::MaskMode;
use davinci_tokenizer_packer::input::Input;
use davinci_tokenizer_packer::mixture::{DatasetRef, Mixture, Stage};
use davinci_tokenizer_packer::pipeline::{self, PackOptions};
use std::io::BufRead;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(
        a.len() == 4,
        "usage: bench_pack <tokenizer.json> <corpus.jsonl> <out-dir> <threads>"
    );
    let threads: usize = a[3].parse()?;
    let tok = Tokenizer::from_file(&a[0])?;
    let texts: Vec<String> = std::io::BufReader::new(std::fs::File::open(&a[1])?)
        .lines()
        .map(|l| Ok(serde_json::from_str::<Sample>(&l?)?.text))
        .collect::<anyhow::Result<_>>()?;
    let bytes: usize = texts.iter().map(String::len).sum();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;

    let t = Instant::now();
    let ids = pool.install(|| tok.encode_batch(&texts))?;
    let encode_secs = t.elapsed().as_secs_f64();
    let tokens: usize = ids.iter().map(Vec::len).sum();
    if let Ok(path) = std::env::var("DAVINCI_BENCH_IDS") {
        std::fs::write(path, serde_json::to_vec(&ids)?)?;
    }

    let mixture = Mixture {
        stages: vec![Stage {
            name: "bench".into(),
            mask: MaskMode::All,
            datasets: vec![DatasetRef {
                source: SampleSource::CtxPython,
                upsample: 1.0,
                weight: None,
            }],
        }],
    };
    // A second instance: its word caches start cold, so the pipeline pass gains nothing from
    // the encode pass above.
    let tok = Tokenizer::from_file(&a[0])?;
    let _ = std::fs::remove_dir_all(&a[2]);
    let t = Instant::now();
    let m = pool.install(|| {
        pipeline::run(
            &tok,
            &mixture,
            &PackOptions::default(),
            &[Input::Path(a[1].clone().into())],
            std::path::Path::new(&a[2]),
            &mut |_| {},
            &AtomicBool::new(false),
        )
    })?;
    let pipeline_secs = t.elapsed().as_secs_f64();
    let d = &m.stages[0].datasets[0];
    println!(
        "{}",
        serde_json::json!({
            "threads": threads, "documents": texts.len(), "bytes": bytes, "tokens": tokens,
            "engine": format!("{:?}", tok.engine()),
            "encode_secs": encode_secs, "encode_tok_per_s": tokens as f64 / encode_secs,
            "pipeline_secs": pipeline_secs, "pipeline_tokens": d.tokens, "bins": d.bins,
            "padding_ratio": d.padding_ratio, "pipeline_tok_per_s": d.tokens as f64 / pipeline_secs,
        })
    );
    Ok(())
}
