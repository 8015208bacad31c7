//! `davinci tasks`: PR shards (or published task sets) → validated executable tasks.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use davinci_runtime::blob::split_uri;
use davinci_runtime::blob::{self, BlobStore};
use davinci_swebench::sets::SetFormat;
use davinci_tasks::batch::{self, Mirrors};
use davinci_tasks::stage::{EnvResult, TaskOutcome};
use davinci_tasks::validate::Verdict;
use davinci_tasks::{Stage, Stats, TasksConfig};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Build tasks from PR shards: select, build environments, validate by execution.
    ///
    /// Reads `davinci.pr/v1` records from `--in` (one shard or every shard under a prefix) and
    /// the repositories' git mirrors (`--repo owner/name=PATH`, or `--repos DIR` holding
    /// `owner__name[.git]`). Writes `tasks/{shard}.jsonl.zst` (SWE-bench superset, test lists
    /// as lists), `tasks/logs/{instance_id}/` (every run's log and `validation.json`) and,
    /// last, `stats/tasks.json` (candidates, kept, drops and infrastructure failures by
    /// reason, environment builds, validation seconds) under `--out`. A second invocation
    /// skips the shards the first finished.
    Build(BuildArgs),
    /// Validate a published task set (SWE-bench, SWE-Gym, SWE-rebench, SWE-smith JSON/JSONL):
    /// recompute FAIL_TO_PASS / PASS_TO_PASS by execution and compare them with the
    /// published lists. Tasks with an image need `--config` with a docker or kubernetes
    /// sandbox; the others are built as recipe environments from their git mirrors.
    Validate(ValidateArgs),
}

#[derive(Debug, clap::Args)]
pub struct Common {
    /// Stage configuration, YAML or JSON: the fields of `TasksConfig` (select, env, validate,
    /// test_timeout_secs, jobs, sandbox).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A repository's git mirror, `owner/name=PATH` (repeatable).
    #[arg(long = "repo", value_name = "NAME=PATH")]
    pub repo: Vec<String>,
    /// A directory of git mirrors named `owner__name` or `owner__name.git`.
    #[arg(long = "repos", value_name = "DIR")]
    pub repos: Option<PathBuf>,
    /// Where environments are built and cached (`{owner}__{name}/{recipe hash}/venv`);
    /// default: `cache/envs` under the output root. Must be a local absolute path.
    #[arg(long, value_name = "DIR")]
    pub env_cache: Option<PathBuf>,
    /// Scratch directory for trees at base commits (default: a temporary directory).
    #[arg(long, value_name = "DIR")]
    pub work: Option<PathBuf>,
    /// Runs per side (overrides `validate.runs`).
    #[arg(long)]
    pub runs: Option<u32>,
    /// Tasks validated at once (overrides `jobs`).
    #[arg(long)]
    pub jobs: Option<usize>,
}

#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// PR shards: `file:///dir`, a local path, or `s3://bucket/prefix`.
    #[arg(long = "in", value_name = "URI")]
    pub input: String,
    /// Output root: `file:///dir`, a local path, or `s3://bucket/prefix`.
    #[arg(long = "out", value_name = "URI")]
    pub output: String,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, clap::Args)]
pub struct ValidateArgs {
    /// The task file (JSON array, JSON object of records, or JSON Lines; `.gz` read too).
    pub tasks: PathBuf,
    /// Which set the file holds (auto tells them apart by their columns).
    #[arg(long, default_value = "auto")]
    pub format: String,
    /// Only these instance ids (repeatable).
    #[arg(long = "instance", value_name = "ID")]
    pub instances: Vec<String>,
    /// Only instances of these repositories (repeatable, `owner/name`).
    #[arg(long = "only-repo", value_name = "NAME")]
    pub only_repos: Vec<String>,
    /// Output root for `tasks/validated.jsonl`, `tasks/logs/…` and `stats/validate.json`.
    #[arg(long = "out", value_name = "URI", default_value = "tasks-validate")]
    pub output: String,
    #[command(flatten)]
    pub common: Common,
}

fn load_config(c: &Common) -> anyhow::Result<TasksConfig> {
    let mut cfg: TasksConfig = match &c.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading config {}", p.display()))?;
            serde_path_to_error::deserialize(serde_norway::Deserializer::from_str(&text))
                .map_err(|e| anyhow::anyhow!("invalid tasks config {}: {e}", p.display()))?
        }
        None => TasksConfig::default(),
    };
    if let Some(r) = c.runs {
        cfg.validate.runs = r;
    }
    if let Some(j) = c.jobs {
        cfg.jobs = j;
    }
    cfg.check()?;
    Ok(cfg)
}

fn mirrors(c: &Common) -> anyhow::Result<Mirrors> {
    let mut named = HashMap::new();
    for r in &c.repo {
        let (name, path) = r
            .split_once('=')
            .with_context(|| format!("--repo `{r}`: expected owner/name=PATH"))?;
        anyhow::ensure!(
            davinci_core::pr::RepoMeta::is_full_name(name),
            "--repo `{r}`: `{name}` is not owner/name"
        );
        davinci_tasks::repo::Mirror::open(Path::new(path))
            .with_context(|| format!("--repo `{r}`"))?;
        named.insert(name.to_string(), PathBuf::from(path));
    }
    if let Some(d) = &c.repos {
        anyhow::ensure!(d.is_dir(), "--repos {}: not a directory", d.display());
    }
    Ok(Mirrors {
        named,
        dir: c.repos.clone(),
    })
}

async fn open_stage(
    cfg: TasksConfig,
    c: &Common,
    out_uri: &str,
) -> anyhow::Result<(Stage, Option<tempfile::TempDir>)> {
    let env_root = match &c.env_cache {
        Some(p) => std::path::absolute(p)?,
        None => batch::local_root(out_uri)
            .map(|r| r.join("cache/envs"))
            .context("--env-cache is required when --out is not a local directory")?,
    };
    let (work, tmp) = match &c.work {
        Some(w) => (std::path::absolute(w)?, None),
        None => {
            let t = tempfile::tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    Ok((Stage::open(cfg, &env_root, &work).await?, tmp))
}

fn progress(total: Option<u64>) -> ProgressBar {
    let pb = match total {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::new_spinner(),
    };
    pb.set_style(
        ProgressStyle::with_template(
            "tasks [{elapsed_precise}] {bar:30} {pos}/{len} validated {msg}",
        )
        .expect("valid template"),
    );
    pb
}

fn describe(o: &TaskOutcome) -> String {
    let env = match &o.env {
        EnvResult::Image => "image",
        EnvResult::Cached => "env cached",
        EnvResult::Built => "env built",
        EnvResult::Failed(_) => "env failed",
    };
    let verdict = match &o.validation.verdict {
        Verdict::Kept => format!(
            "kept ({} F2P, {} P2P)",
            o.validation.fail_to_pass.len(),
            o.validation.pass_to_pass.len()
        ),
        Verdict::Rejected(r) => format!("dropped: {r}"),
        Verdict::Infra(r) => format!("infra: {r}"),
    };
    format!("{} {env}, {verdict}", o.validation.instance_id)
}

fn print_summary(s: &Stats) {
    println!(
        "PRs: {}  candidates: {}  kept: {}  bad records: {}",
        s.prs, s.candidates, s.kept, s.bad_records
    );
    for (r, n) in &s.drops {
        println!("  dropped {r}: {n}");
    }
    for (r, n) in &s.infra {
        println!("  infrastructure {r}: {n}");
    }
    println!(
        "environments: {} built, {} cached, {} failed{}",
        s.envs_built,
        s.envs_cached,
        s.envs_failed,
        s.env_build_success_rate()
            .map(|r| format!(" (build success {:.0}%)", r * 100.0))
            .unwrap_or_default()
    );
    if let Some(m) = s.median_validation_seconds() {
        println!("median validation per task: {m:.1} s");
    }
}

pub async fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Build(a) => build(a).await,
        Command::Validate(a) => validate(a).await,
    }
}

async fn build(a: BuildArgs) -> anyhow::Result<()> {
    let cfg = load_config(&a.common)?;
    let mirrors = mirrors(&a.common)?;
    let s3 = crate::cli_s3()?;
    let (in_root, in_key) = split_uri(&a.input);
    let input = blob::open(&in_root, &s3)
        .await
        .with_context(|| format!("opening input {}", a.input))?;
    let keys = davinci_runtime::shard::list_inputs(input.as_ref(), &in_key).await?;
    anyhow::ensure!(
        !keys.is_empty(),
        "no PR shards (*.jsonl.zst or *.jsonl) at {}",
        a.input
    );
    let out = blob::open(&a.output, &s3)
        .await
        .with_context(|| format!("opening output {}", a.output))?;
    let (stage, _tmp) = open_stage(cfg, &a.common, &a.output).await?;
    let inputs: Vec<(Arc<dyn BlobStore>, String)> =
        keys.into_iter().map(|k| (input.clone(), k)).collect();
    let pb = progress(None);
    let p2 = pb.clone();
    let report = batch::run_batch(&stage, &mirrors, &inputs, out, &move |o| {
        p2.inc(1);
        p2.set_message(describe(o));
    })
    .await?;
    pb.finish_and_clear();
    if report.reused > 0 {
        println!(
            "{} shard(s) finished by an earlier run, reused",
            report.reused
        );
    }
    print_summary(&report.stats);
    for w in &report.written {
        println!("wrote {w}");
    }
    Ok(())
}

async fn validate(a: ValidateArgs) -> anyhow::Result<()> {
    let cfg = load_config(&a.common)?;
    let format = SetFormat::parse(&a.format)?;
    let mirrors = mirrors(&a.common)?;
    let mut tasks = davinci_swebench::data::load_set(&a.tasks, format)?;
    if !a.instances.is_empty() {
        tasks.retain(|t| a.instances.contains(&t.instance_id));
    }
    if !a.only_repos.is_empty() {
        tasks.retain(|t| a.only_repos.contains(&t.repo));
    }
    anyhow::ensure!(
        !tasks.is_empty(),
        "no tasks selected from {}",
        a.tasks.display()
    );
    let s3 = crate::cli_s3()?;
    let out = blob::open(&a.output, &s3)
        .await
        .with_context(|| format!("opening output {}", a.output))?;
    let (stage, _tmp) = open_stage(cfg, &a.common, &a.output).await?;
    let pb = progress(Some(tasks.len() as u64));
    let items: Vec<_> = tasks
        .iter()
        .map(|t| (t.clone(), mirrors.find(&t.repo)))
        .collect();
    let p2 = pb.clone();
    let outcomes = batch::run_all(&stage, items, &move |o| {
        p2.inc(1);
        p2.set_message(describe(o));
    })
    .await;
    pb.finish_and_clear();
    let mut stats = Stats::default();
    let mut agree = 0u64;
    let mut compared = 0u64;
    let mut lines = Vec::new();
    let mut disagreements = Vec::new();
    for (published, o) in tasks.iter().zip(&outcomes) {
        stats.prs += 1;
        stats.candidates += 1;
        stats.record(o);
        batch::write_logs(out.as_ref(), o).await?;
        let Some(same) = o.validation.reproduces(published) else {
            continue;
        };
        compared += 1;
        let sorted = |v: &[String]| {
            let mut v = v.to_vec();
            v.sort();
            v
        };
        if same {
            agree += 1;
        } else {
            disagreements.push(serde_json::json!({
                "instance_id": published.instance_id,
                "verdict": o.validation.verdict,
                "f2p_missing": sorted(&published.fail_to_pass).into_iter().filter(|t| !o.validation.fail_to_pass.contains(t)).collect::<Vec<_>>(),
                "f2p_extra": o.validation.fail_to_pass.iter().filter(|t| !published.fail_to_pass.contains(t)).collect::<Vec<_>>(),
                "p2p_missing": published.pass_to_pass.iter().filter(|t| !o.validation.pass_to_pass.contains(t)).collect::<Vec<_>>(),
                "p2p_extra": o.validation.pass_to_pass.iter().filter(|t| !published.pass_to_pass.contains(t)).collect::<Vec<_>>(),
            }));
        }
        if let Some(t) = &o.task {
            lines.push(serde_json::to_string(t)?);
        }
    }
    out.put(
        "tasks/validated.jsonl",
        bytes::Bytes::from(lines.join("\n") + "\n"),
    )
    .await?;
    let report = serde_json::json!({
        "stats": stats,
        "compared": compared,
        "agree": agree,
        "disagreements": disagreements,
    });
    out.put(
        "stats/validate.json",
        bytes::Bytes::from(serde_json::to_vec_pretty(&report)?),
    )
    .await?;
    print_summary(&stats);
    println!(
        "published lists reproduced: {agree}/{compared} (tasks whose environment built and ran)"
    );
    println!("wrote {}", out.uri("stats/validate.json"));
    Ok(())
}
