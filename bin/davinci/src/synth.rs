//! `davinci synth prs`: a seeded synthetic corpus of `davinci.pr/v1` shards with planted
//! duplicates, for scale runs of reconstruct → pack without a crawl. A subcommand rather than
//! an example so the shipped binary can feed a cluster's storage (`s3://…`) as well as a
//! local directory.
use anyhow::Context;
use bytes::Bytes;
use davinci_core::synth::{Planted, PlantedDup, Synth, SynthConfig};
use davinci_runtime::blob::{self, BlobStore, S3Config};
use davinci_runtime::shard;
use futures::StreamExt;
use std::path::PathBuf;
use std::sync::Arc;

pub const MANIFEST_SCHEMA: &str = "davinci.synth/v1";

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Write N synthetic PR records as `prs/{shard}.jsonl.zst` under --out, the planted
    /// duplicates as `synth/planted.jsonl` and, last, `synth/manifest.json`.
    ///
    /// Record i depends only on (seed, i): the same arguments write the same bytes. Shards are
    /// named by their position, so `davinci reconstruct --in OUT/prs` reads them in record
    /// order, and a planted copy always comes after the record it copies.
    Prs(PrsArgs),
}

#[derive(Debug, clap::Args)]
pub struct PrsArgs {
    /// Number of records.
    #[arg(long)]
    pub n: u64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Output root: `file:///dir`, a local path, or `s3://bucket/prefix`.
    #[arg(long = "out", value_name = "URI")]
    pub output: String,
    /// Records per shard.
    #[arg(long, default_value_t = 1000)]
    pub shard_size: u64,
    /// Generator settings (YAML or JSON; the fields of `SynthConfig`); --seed and the share
    /// flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Share of records that are exact copies of an earlier one.
    #[arg(long)]
    pub exact_dup_share: Option<f64>,
    /// Share of records that are near copies (edited fork re-submissions) of an earlier one.
    #[arg(long)]
    pub near_dup_share: Option<f64>,
}

fn load_config(args: &PrsArgs) -> anyhow::Result<SynthConfig> {
    let mut cfg = match &args.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading synth config {}", p.display()))?;
            serde_path_to_error::deserialize(serde_norway::Deserializer::from_str(&text))
                .map_err(|e| anyhow::anyhow!("invalid synth config {}: {e}", p.display()))?
        }
        None => SynthConfig::default(),
    };
    cfg.seed = args.seed;
    if let Some(s) = args.exact_dup_share {
        cfg.exact_dup_share = s;
    }
    if let Some(s) = args.near_dup_share {
        cfg.near_dup_share = s;
    }
    for (name, v) in [
        ("exact_dup_share", cfg.exact_dup_share),
        ("near_dup_share", cfg.near_dup_share),
        ("near_edit_max", cfg.near_edit_max),
        ("python_repo_share", cfg.python_repo_share),
        ("bot_share", cfg.bot_share),
        ("added_file_share", cfg.added_file_share),
    ] {
        anyhow::ensure!(
            (0.0..=1.0).contains(&v),
            "synth setting {name} = {v}: a share must be within [0, 1]"
        );
    }
    anyhow::ensure!(
        cfg.exact_dup_share + cfg.near_dup_share <= 1.0,
        "exact_dup_share + near_dup_share = {} exceeds 1",
        cfg.exact_dup_share + cfg.near_dup_share
    );
    Ok(cfg)
}

pub async fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Prs(a) => prs(a).await,
    }
}

async fn prs(args: PrsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.n > 0, "--n: give at least one record");
    anyhow::ensure!(args.shard_size > 0, "--shard-size: must be at least 1");
    let cfg = load_config(&args)?;
    let store = blob::open(&args.output, &S3Config::default())
        .await
        .with_context(|| format!("opening output {}", args.output))?;
    let synth = Arc::new(Synth::new(cfg.clone()));
    let shards = args.n.div_ceil(args.shard_size);
    let width = shards.to_string().len().max(6);
    let started = std::time::Instant::now();
    let bar = indicatif::ProgressBar::new(args.n);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} PRs ({per_sec}) {elapsed}")
            .expect("valid template"),
    );
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut planted: Vec<PlantedDup> = Vec::new();
    let mut bytes = 0u64;
    let mut results = futures::stream::iter(0..shards)
        .map(|k| {
            let (synth, store, bar) = (synth.clone(), store.clone(), bar.clone());
            let range = k * args.shard_size..((k + 1) * args.shard_size).min(args.n);
            async move { write_shard(synth, store, k, width, range, bar).await }
        })
        .buffered(threads);
    while let Some(r) = results.next().await {
        let (p, b) = r?;
        planted.extend(p);
        bytes += b;
    }
    bar.finish_and_clear();
    let mut truth = Vec::new();
    for p in &planted {
        serde_json::to_writer(&mut truth, p)?;
        truth.push(b'\n');
    }
    store.put("synth/planted.jsonl", Bytes::from(truth)).await?;
    let count = |k: Planted| planted.iter().filter(|p| p.kind == k).count();
    let manifest = serde_json::json!({
        "schema": MANIFEST_SCHEMA,
        "records": args.n,
        "shards": shards,
        "shard_size": args.shard_size,
        "bytes": bytes,
        "planted": {"exact": count(Planted::Exact), "near": count(Planted::Near)},
        "config": cfg,
    });
    store
        .put(
            "synth/manifest.json",
            Bytes::from(serde_json::to_vec_pretty(&manifest)?),
        )
        .await?;
    println!(
        "{} records in {shards} shards ({:.1} MB compressed, {} exact and {} near copies planted) in {:.1} s under {}",
        args.n,
        bytes as f64 / 1e6,
        count(Planted::Exact),
        count(Planted::Near),
        started.elapsed().as_secs_f64(),
        store.uri("prs/")
    );
    Ok(())
}

/// Generates records `range` on a blocking thread and writes them as shard `k`.
async fn write_shard(
    synth: Arc<Synth>,
    store: Arc<dyn BlobStore>,
    k: u64,
    width: usize,
    range: std::ops::Range<u64>,
    bar: indicatif::ProgressBar,
) -> anyhow::Result<(Vec<PlantedDup>, u64)> {
    let (enc, planted) = tokio::task::spawn_blocking(move || {
        let mut planted = Vec::new();
        let records: Vec<_> = range
            .map(|i| {
                let (pr, truth) = synth.record(i);
                planted.extend(truth);
                pr
            })
            .collect();
        shard::encode_shard(&records).map(|e| (e, planted))
    })
    .await??;
    let n = enc.records as u64;
    let size = enc.data.len() as u64;
    store
        .put(&format!("prs/{k:0width$}.jsonl.zst"), enc.data)
        .await?;
    bar.inc(n);
    Ok((planted, size))
}
