//! `davinci pack`: tokenize samples and trajectories and pack them into Megatron indexed-dataset
//! shards with a mixture manifest (DESIGN.md §4 "Packed shards").
use anyhow::Context;
use davinci_tokenize::Tokenizer;
use davinci_tokenizer_packer::job;
use davinci_tokenizer_packer::mixture::Mixture;
use davinci_tokenizer_packer::packing::PackConfig;
use davinci_tokenizer_packer::pipeline::{self, PackOptions};
use davinci_tokenizer_packer::storage::{self, OutputDir};
use indicatif::{ProgressBar, ProgressStyle};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Inputs are Sample JSONL (ctx-general, ctx-python, env-*) and Trajectory \
JSONL (davinci.traj/v1; resolved → env-pass, else env-fail), plain or .zst. Output: \
{stage}/{dataset}-{k:05}.{bin,idx} + .mask.{bin,idx} and manifest.json (written last) with the \
Megatron --data-path blend per stage."
)]
pub struct Args {
    /// Input shards or directories/prefixes of `*.jsonl[.zst]` (path, file:// or s3://).
    #[arg(long = "in", required = true, num_args = 1..)]
    pub inputs: Vec<String>,
    /// Output directory or prefix (path, file:// or s3://).
    #[arg(long)]
    pub out: String,
    /// Hugging Face tokenizer.json (path, file:// or s3://), or a Hub model id
    /// (`org/name[@revision]`) read through the Hugging Face cache (HF_HUB_CACHE / HF_HOME),
    /// downloaded into it unless HF_HUB_OFFLINE=1 (HF_TOKEN for gated models).
    #[arg(long)]
    pub tokenizer: String,
    /// Tokens per packed bin (Megatron sequence length).
    #[arg(long, default_value_t = 32_768)]
    pub seq_len: usize,
    /// Mixture and stages (YAML or JSON); default: stage1 ctx-general; stage2 ctx-python +
    /// env-pass ×3 + env-fail; sft env-pass with assistant-only loss.
    #[arg(long)]
    pub mixture: Option<std::path::PathBuf>,
    /// Seed of the packing tie-break order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Documents longer than --seq-len: drop them (counted as `too_long`, as the recipe does)
    /// or split them into --seq-len pieces.
    #[arg(long, default_value = "drop", value_parser = ["drop", "split"])]
    pub long_docs: String,
    /// Documents sorted together by best-fit decreasing.
    #[arg(long, default_value_t = 8_192)]
    pub window: usize,
    /// Bins kept open across windows (memory bound: this × seq-len × 5 bytes per dataset).
    #[arg(long, default_value_t = 512)]
    pub max_open_bins: usize,
    /// Close a shard once its .bin reaches this many MiB.
    #[arg(long, default_value_t = 512)]
    pub shard_mib: u64,
    /// End-of-document token (default: the tokenizer's <|endoftext|> or equivalent).
    #[arg(long)]
    pub eod: Option<String>,
    /// Worker threads for tokenization (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.seq_len >= 2, "--seq-len must be at least 2");
    let s3 = crate::cli_s3()?;
    let mixture = match &args.mixture {
        Some(p) => Mixture::parse(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )?,
        None => Mixture::default(),
    };
    let tok_bytes = storage::read_tokenizer(&args.tokenizer, &s3).await?;
    let tok = Arc::new(
        Tokenizer::from_bytes(&tok_bytes).with_context(|| format!("loading {}", args.tokenizer))?,
    );
    let inputs = storage::resolve_inputs(&args.inputs, &s3).await?;
    let out = OutputDir::new(&args.out)?;
    eprintln!(
        "tokenizer {} (sha256 {}…, vocab {}, {:?}); {} input shard(s)",
        args.tokenizer,
        &tok.sha256()[..12],
        tok.vocab_size(),
        tok.engine(),
        inputs.len()
    );
    let opts = PackOptions {
        pack: PackConfig {
            seq_len: args.seq_len,
            window: args.window.max(1),
            max_open_bins: args.max_open_bins.max(1),
            long_docs: job::long_docs(&args.long_docs)?,
            seed: args.seed,
        },
        shard_bytes: args.shard_mib.max(1) << 20,
        eod: args.eod.clone(),
        tokenizer_name: args.tokenizer.clone(),
        data_root: out.data_root(),
        ..Default::default()
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads.unwrap_or(0))
        .build()?;
    let bar = ProgressBar::new(inputs.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] shards {pos}/{len} {wide_msg}")
            .expect("valid template"),
    );
    let started = Instant::now();
    let out_path = out.path().to_path_buf();
    let (tok2, bar2) = (tok.clone(), bar.clone());
    let manifest = tokio::task::spawn_blocking(move || {
        let cancel = AtomicBool::new(false);
        pool.install(|| {
            pipeline::run(
                &tok2,
                &mixture,
                &opts,
                &inputs,
                &out_path,
                &mut |p| {
                    let secs = started.elapsed().as_secs_f64().max(1e-9);
                    bar2.set_position(p.inputs_done as u64);
                    bar2.set_message(format!(
                        "{} records, {} tokens, {:.2} M tok/s, {:.1} MB/s",
                        p.records,
                        p.tokens,
                        p.tokens as f64 / secs / 1e6,
                        p.bytes as f64 / secs / 1e6
                    ));
                },
                &cancel,
            )
        })
    })
    .await??;
    bar.finish_and_clear();
    out.publish(&s3).await.context("uploading output")?;
    let secs = started.elapsed().as_secs_f64();

    println!(
        "packed into {} (seq_len {}, {:?} ids) in {secs:.1}s",
        args.out, manifest.seq_len, manifest.dtype
    );
    println!(
        "{:<8} {:<11} {:>9} {:>13} {:>8} {:>8} {:>7} {:>8}",
        "stage", "dataset", "docs", "tokens", "bins", "padding", "shards", "upsample"
    );
    let (mut total_tokens, mut too_long, mut split) = (0, 0, 0);
    for st in &manifest.stages {
        for d in &st.datasets {
            total_tokens += d.tokens;
            too_long += d.drops.get("too_long").copied().unwrap_or(0);
            split += d.split_documents;
            println!(
                "{:<8} {:<11} {:>9} {:>13} {:>8} {:>7.3}% {:>7} {:>8}",
                st.name,
                d.name,
                d.documents,
                d.tokens,
                d.bins,
                d.padding_ratio * 100.0,
                d.shards.len(),
                d.upsample
            );
            for (why, n) in &d.drops {
                println!("{:<8} {:<11}   dropped {why}: {n}", "", "");
            }
            if d.split_documents > 0 {
                println!(
                    "{:<8} {:<11}   split (longer than seq_len): {}",
                    "", "", d.split_documents
                );
            }
        }
    }
    println!(
        "documents longer than seq_len {}: {too_long} dropped (too_long), {split} split (--long-docs {})",
        manifest.seq_len, args.long_docs
    );
    for (why, n) in &manifest.drops {
        println!("records dropped ({why}): {n}");
    }
    for st in &manifest.stages {
        println!(
            "{} --data-path: {}",
            st.name,
            if st.blend.is_empty() {
                "(empty)"
            } else {
                &st.blend
            }
        );
    }
    println!(
        "{total_tokens} tokens written, {:.2} M tokens/s",
        total_tokens as f64 / secs.max(1e-9) / 1e6
    );
    Ok(())
}
