//! `davinci rollout`: validated tasks → agent trajectories, graded, as a one-off batch.
use anyhow::Context;
use davinci_rollout::pipeline::{PolicyKind, RolloutSettings};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PolicyArg {
    /// Apply each task's gold patch through the tools (checks the scaffold; no model).
    Replay,
    /// A model behind an OpenAI-compatible endpoint (--model-url, --model).
    Openai,
    /// Submit at once without changes (checks that grading rejects an unchanged repository).
    Null,
}

/// Run the coding agent on validated tasks and grade every run.
///
/// Reads TaskInstance shards (`.jsonl`, `.jsonl.zst` or `.json`; one object or every shard
/// under a prefix) from `--tasks`, runs `--rollouts` agent runs per task in the sandbox (tools
/// bash / str_replace_editor / submit; repository at /testbed), grades each submission with the
/// task's test patch in a fresh workspace, and writes `trajectories/{pass|fail}/{shard}.jsonl.zst`
/// (`davinci.traj/v1`) and, last, `stats/rollout.json` under `--out`. Interrupted runs resume:
/// finished rollouts are kept in `{out}/work/` and not redone.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Task shards: `file:///dir`, a local path, or `s3://bucket/prefix`.
    #[arg(long, value_name = "URI")]
    pub tasks: String,
    /// Output root: `file:///dir`, a local path, or `s3://bucket/prefix`.
    #[arg(long, value_name = "URI")]
    pub out: String,
    #[arg(long, value_enum, default_value = "replay")]
    pub policy: PolicyArg,
    /// OpenAI-compatible endpoint for `--policy openai`, e.g. `http://vllm:8000/v1`.
    #[arg(long, env = "DAVINCI_LLM_BASE_URL")]
    pub model_url: Option<String>,
    /// Model name the endpoint serves.
    #[arg(long, env = "DAVINCI_LLM_MODEL")]
    pub model: Option<String>,
    /// Rollouts per task (the paper used 4).
    #[arg(long, default_value_t = 1)]
    pub rollouts: u32,
    /// Tasks run at once.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Prepared environments (local backend): `{repos}/{instance_id}/` or `{repos}/{owner}__{name}/`.
    #[arg(long, value_name = "DIR")]
    pub repos: Option<PathBuf>,
    /// Settings file (YAML or JSON, the fields of `RolloutSettings`: agent limits, sampling,
    /// sandbox backend, …); the flags above override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Sampling temperature (openai).
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Sampling seed of rollout 0; rollout i uses seed + i (openai).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Model turns per run.
    #[arg(long)]
    pub max_steps: Option<u32>,
    /// The policy's tokenizer.json (path or Hub model id): counts the context and each
    /// trajectory's tokens with the Qwen2.5 chat template; without it, the server's usage.
    #[arg(long, value_name = "FILE|ID")]
    pub tokenizer: Option<String>,
}

fn load_settings(path: &std::path::Path) -> anyhow::Result<RolloutSettings> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_path_to_error::deserialize(serde_norway::Deserializer::from_str(&text))
        .map_err(|e| anyhow::anyhow!("invalid rollout settings {}: {e}", path.display()))
}

/// The settings the flags describe, validated.
pub fn settings(args: &Args) -> anyhow::Result<RolloutSettings> {
    let mut s = match &args.config {
        Some(p) => load_settings(p)?,
        None => RolloutSettings::default(),
    };
    s.out = davinci_runtime::blob::absolute_uri(&args.out)?;
    s.policy = match args.policy {
        PolicyArg::Replay => PolicyKind::Replay,
        PolicyArg::Openai => PolicyKind::Openai,
        PolicyArg::Null => PolicyKind::Null,
    };
    if let Some(u) = &args.model_url {
        s.llm.base_url = u.clone();
    }
    if let Some(m) = &args.model {
        s.llm.model = m.clone();
    }
    if let Some(t) = args.temperature {
        s.llm.temperature = t;
    }
    if args.seed.is_some() {
        s.llm.seed = args.seed;
    }
    if let Some(n) = args.max_steps {
        s.agent.max_steps = n;
    }
    if args.tokenizer.is_some() {
        s.tokenizer = args.tokenizer.clone();
    }
    s.rollouts_per_task = args.rollouts;
    if let Some(r) = &args.repos {
        s.repos_dir = Some(std::path::absolute(r)?);
    }
    s.validate().map_err(|e| anyhow::anyhow!("--{e:#}"))?;
    Ok(s)
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let settings = settings(&args)?;
    let tasks = vec![davinci_runtime::blob::absolute_uri(&args.tasks)?];
    let pb = ProgressBar::new(0);
    pb.set_style(
        ProgressStyle::with_template(
            "rollout [{elapsed_precise}] {bar:40} {pos}/{len} tasks {msg}",
        )
        .expect("static template"),
    );
    let counts = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    let message = {
        let counts = counts.clone();
        move || {
            let (n, pass, tokens) = (
                counts[0].load(Ordering::Relaxed),
                counts[1].load(Ordering::Relaxed),
                counts[2].load(Ordering::Relaxed),
            );
            format!(
                "| {n} rollouts, pass {pass}/{n} ({:.0}%), {tokens} tokens",
                if n == 0 {
                    0.0
                } else {
                    100.0 * pass as f64 / n as f64
                }
            )
        }
    };
    let on_rollout: Arc<dyn Fn(&davinci_core::traj::Trajectory) + Send + Sync> = {
        let (counts, pb, message) = (counts.clone(), pb.clone(), message.clone());
        Arc::new(move |t| {
            counts[0].fetch_add(1, Ordering::Relaxed);
            if t.outcome.resolved {
                counts[1].fetch_add(1, Ordering::Relaxed);
            }
            counts[2].fetch_add(t.n_tokens.unwrap_or(0), Ordering::Relaxed);
            pb.set_message(message());
        })
    };
    let progress = {
        let pb = pb.clone();
        move |done: u64, total: u64| {
            pb.set_length(total);
            pb.set_position(done);
        }
    };
    let t = std::time::Instant::now();
    let (written, stats) = davinci_rollout::serve::run_embedded(
        &tasks,
        &settings,
        &crate::cli_s3()?,
        args.workers,
        &progress,
        on_rollout,
    )
    .await?;
    pb.finish_and_clear();
    println!(
        "rollout: {} tasks, {} rollouts in {:.1}s -> {}",
        stats.tasks,
        stats.rollouts,
        t.elapsed().as_secs_f64(),
        settings.out
    );
    println!(
        "pass {} / fail {} (pass rate {:.1}%), {} tokens, {} reused from an earlier run",
        stats.pass,
        stats.fail,
        100.0 * stats.pass_rate,
        stats.tokens,
        stats.reused_rollouts
    );
    for (k, v) in &stats.exit_status {
        println!("  exit {k:<16} {v:>6}");
    }
    for (k, v) in &stats.infra_failures {
        println!("  infrastructure failure (retried) {k:<12} {v:>6}");
    }
    for f in &stats.failed_tasks {
        println!("  FAILED task (infrastructure, dead-lettered): {f}");
    }
    for w in &written {
        tracing::debug!(uri = %w, "written");
    }
    anyhow::ensure!(
        stats.failed_tasks.is_empty(),
        "{} task(s) failed for infrastructure reasons (see above); rerun to retry them",
        stats.failed_tasks.len()
    );
    Ok(())
}
