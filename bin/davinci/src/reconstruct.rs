//! `davinci reconstruct`: PullRequest shards → ctx-general / ctx-python sample shards, as a
//! one-off batch over a storage prefix.
use anyhow::Context;
use davinci_core::sample::SampleSource;
use davinci_reconstructor::batch;
use davinci_reconstructor::filters::MinHashLsh;
use davinci_reconstructor::partition::PartitionedDedup;
use davinci_reconstructor::serve;
use davinci_reconstructor::{ReconstructConfig, Reconstructor, TokenCounter};
use davinci_runtime::blob;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FormatArg {
    CtxGeneral,
    CtxPython,
    Both,
}

/// Turn merged pull requests into contextually-native training samples.
///
/// Reads `davinci.pr/v1` records (`*.jsonl.zst` shards or `*.jsonl`) from `--in` (one object, or
/// every shard under a prefix), writes `samples/{ctx-general|ctx-python}/{shard}.jsonl.zst`
/// and, last, `stats/reconstruct.json` (drops by format and reason) under `--out`. Without
/// `--llm-base-url` the summary is built deterministically from the title, body and commits.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Input: `file:///dir`, a local path, or `s3://bucket/prefix` (a shard object or prefix).
    #[arg(long = "in", value_name = "URI")]
    pub input: String,
    /// Output root: `file:///dir`, a local path, or `s3://bucket/prefix`.
    #[arg(long = "out", value_name = "URI")]
    pub output: String,
    /// Which sample formats to write.
    #[arg(long, value_enum, default_value = "both")]
    pub format: FormatArg,
    /// Stage configuration (YAML or JSON; the fields of `ReconstructConfig`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Hugging Face `tokenizer.json` for the token cap (default: a word counter).
    #[arg(long, value_name = "FILE", env = "DAVINCI_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,
    /// Drop samples over this many tokens (overrides the config).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// OpenAI-compatible endpoint, e.g. `http://vllm:8000/v1` (overrides the config).
    #[arg(long, env = "DAVINCI_LLM_BASE_URL")]
    pub llm_base_url: Option<String>,
    /// Model name served by the endpoint.
    #[arg(long, env = "DAVINCI_LLM_MODEL")]
    pub llm_model: Option<String>,
    /// Where LLM responses are cached (`cache/llm/{sha256}.json`); default: the `--out` root.
    #[arg(long, value_name = "URI")]
    pub llm_cache: Option<String>,
    /// PRs whose summaries are built concurrently.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Benchmark JSONL(.gz) file for 13-gram decontamination, as `PATH:field1,field2` (a bare
    /// path naming HumanEval or SWE-bench uses their published prompt/solution columns).
    #[arg(long = "decontaminate", value_name = "PATH:FIELDS")]
    pub decontaminate: Vec<String>,
    /// Deduplicate through storage in this many partitions (under `dedup/p{N}/` of --out)
    /// instead of one in-memory index, so memory does not grow with the corpus; the samples
    /// are the same. 0: the in-memory index.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub dedup_partitions: u32,
}

/// YAML (or JSON, a subset) into `ReconstructConfig`; errors name the bad field's path.
fn load_config(path: &std::path::Path) -> anyhow::Result<ReconstructConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    serde_path_to_error::deserialize(serde_norway::Deserializer::from_str(&text))
        .map_err(|e| anyhow::anyhow!("invalid reconstruct config {}: {e}", path.display()))
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let mut cfg = match &args.config {
        Some(p) => load_config(p)?,
        None => ReconstructConfig::default(),
    };
    cfg.formats = match args.format {
        FormatArg::CtxGeneral => vec![SampleSource::CtxGeneral],
        FormatArg::CtxPython => vec![SampleSource::CtxPython],
        FormatArg::Both => vec![SampleSource::CtxGeneral, SampleSource::CtxPython],
    };
    if let Some(m) = args.max_tokens {
        cfg.max_tokens = m;
    }
    for spec in &args.decontaminate {
        cfg.benchmarks.push(
            serve::parse_benchmark(spec).with_context(|| format!("--decontaminate `{spec}`"))?,
        );
    }
    if args.llm_base_url.is_some() || args.llm_model.is_some() {
        let mut llm = cfg.llm.clone().unwrap_or_default();
        if let Some(u) = &args.llm_base_url {
            llm.base_url = u.clone();
        }
        if let Some(m) = &args.llm_model {
            llm.model = m.clone();
        }
        cfg.llm = Some(llm);
    }

    let counter: TokenCounter = match &args.tokenizer {
        Some(p) => {
            let tok = davinci_tokenize::Tokenizer::load(&p.to_string_lossy())
                .with_context(|| format!("loading tokenizer {}", p.display()))?;
            Arc::new(move |s: &str| tok.count_tokens(s).unwrap_or(usize::MAX))
        }
        None => davinci_reconstructor::word_counter(),
    };

    let s3 = crate::cli_s3()?;
    let (in_root, in_key) = davinci_runtime::blob::split_uri(&args.input);
    let input = blob::open(&in_root, &s3)
        .await
        .with_context(|| format!("opening input {}", args.input))?;
    let output = blob::open(&args.output, &s3)
        .await
        .with_context(|| format!("opening output {}", args.output))?;
    let inputs = davinci_runtime::shard::list_inputs(input.as_ref(), &in_key).await?;
    anyhow::ensure!(
        !inputs.is_empty(),
        "no PR shards (*.jsonl.zst or *.jsonl) at {}",
        args.input
    );

    let cache_store = match &args.llm_cache {
        Some(u) => blob::open(u, &s3).await?,
        None => output.clone(),
    };
    let enhancer = serve::make_enhancer(&cfg, cache_store)?;
    let llm_mode = enhancer.chat.is_some();
    let mut recon = Reconstructor::new(cfg, counter)?;

    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {elapsed} {pos} PRs ({per_sec}) {msg}")
            .expect("valid template"),
    );
    bar.set_message(format!("{} shard(s)", inputs.len()));
    let b2 = bar.clone();
    let progress: batch::Progress = Arc::new(move |n| b2.set_position(n));
    let (report, io) = if args.dedup_partitions == 0 {
        let r = batch::run_batch(
            input,
            &inputs,
            output.clone(),
            "",
            &mut recon,
            enhancer,
            args.concurrency,
            Some(progress),
        )
        .await?;
        (r, None)
    } else {
        let c = &recon.cfg;
        let lsh = MinHashLsh::new(c.near_dup_threshold, c.minhash_perms, c.minhash_shingle);
        let p = args.dedup_partitions;
        let dedup = PartitionedDedup::new(output.clone(), &format!("dedup/p{p}"), p, lsh);
        let (r, io) = batch::run_batch_partitioned(
            input,
            &inputs,
            output.clone(),
            "",
            &mut recon,
            enhancer,
            args.concurrency,
            Some(progress),
            &dedup,
        )
        .await?;
        (r, Some(io))
    };
    bar.finish_and_clear();

    let st = &report.stats;
    println!(
        "reconstructed {} PRs in {:.2}s ({}), {} unreadable",
        st.prs_in,
        st.seconds,
        if llm_mode {
            "LLM summaries"
        } else {
            "deterministic summaries"
        },
        st.bad_records
    );
    for (format, fs) in &st.formats {
        let dropped: u64 = fs.drops.values().sum();
        println!(
            "  {format}: {} samples, {} tokens, {} dropped",
            fs.samples, fs.tokens, dropped
        );
        for (reason, n) in &fs.drops {
            println!("    {reason}: {n}");
        }
        for k in report.written.get(format).into_iter().flatten() {
            println!("    wrote {}", output.uri(k));
        }
    }
    if llm_mode {
        println!(
            "  llm: {} answers ({} from cache), fallbacks {:?}",
            st.llm.requests, st.llm.cache_hits, st.llm.fallbacks
        );
    }
    if let Some(io) = io {
        println!(
            "  dedup in {} partitions: {:.1} MB written, {:.1} MB read under {}",
            args.dedup_partitions,
            io.written as f64 / 1e6,
            io.read as f64 / 1e6,
            output.uri(&format!("dedup/p{}/", args.dedup_partitions))
        );
    }
    println!("  stats: {}", output.uri("stats/reconstruct.json"));
    Ok(())
}
