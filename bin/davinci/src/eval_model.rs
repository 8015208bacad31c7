//! `davinci eval humaneval|gpqa|scibench --model-url URL --model NAME`: evaluations that drive
//! a model behind an OpenAI-compatible endpoint and write
//! `{out}/{samples,results}.jsonl` and `{out}/report.json` (scores plus provenance), where
//! `{out}` is `--out-dir` or `runs/{run}/eval/{benchmark}`.
use anyhow::Context;
use davinci_evaluator::drive::client::{Endpoint, Sampling};
use davinci_evaluator::drive::{self, Provenance, gpqa, humaneval, scibench};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Model endpoint")]
pub struct EndpointArgs {
    /// OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1 (`davinci serve --target
    /// inference`, vLLM, SGLang or a hosted API); a bare http://host:port gets /v1.
    #[arg(long)]
    pub model_url: Option<String>,
    /// Model name the endpoint serves (GET {model_url}/models lists them).
    #[arg(long)]
    pub model: Option<String>,
    /// Environment variable with the API key, sent as a bearer token when set.
    #[arg(long, default_value = "OPENAI_API_KEY")]
    pub api_key_env: String,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 600.0)]
    pub request_timeout: f64,
    /// Output directory (default: runs/{run}/eval/{benchmark}).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Run id naming the default output directory.
    #[arg(long, default_value = "adhoc")]
    pub run: String,
    /// Tokens generated per answer at most (default: the benchmark's).
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Extra stop sequence (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Sampling seed sent with every request (and the seed of GPQA's choice shuffle).
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
}

impl EndpointArgs {
    /// Checks the endpoint settings before any work starts.
    pub fn endpoint(&self) -> anyhow::Result<Endpoint> {
        let url = self
            .model_url
            .as_deref()
            .context("--model-url is required (the OpenAI-compatible API root)")?;
        let model = self.model.as_deref().unwrap_or_default();
        anyhow::ensure!(self.concurrency > 0, "--concurrency must be at least 1");
        anyhow::ensure!(
            (0.0..=2.0).contains(&self.temperature),
            "--temperature must be in [0, 2]"
        );
        anyhow::ensure!(
            self.top_p > 0.0 && self.top_p <= 1.0,
            "--top-p must be in (0, 1]"
        );
        Endpoint::new(
            url,
            model,
            std::env::var(&self.api_key_env)
                .ok()
                .filter(|k| !k.is_empty()),
            self.concurrency,
            Duration::from_secs_f64(self.request_timeout),
        )
    }

    pub fn sampling(&self, default_max_tokens: u32, n: u32) -> Sampling {
        Sampling {
            max_tokens: self.max_tokens.unwrap_or(default_max_tokens),
            temperature: self.temperature,
            top_p: self.top_p,
            n,
            stop: self.stop.clone(),
            seed: Some(self.seed),
        }
    }

    pub fn out(&self, benchmark: &str) -> PathBuf {
        self.out_dir.clone().unwrap_or_else(|| {
            Path::new("runs")
                .join(&self.run)
                .join("eval")
                .join(benchmark)
        })
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

#[derive(Debug, Clone, clap::Args)]
pub struct HumanevalGen {
    /// Prompt format: base (continue the prompt, lm-eval's stops) or instruct (EvalPlus's
    /// chat instruction, code taken from the answer's code block).
    #[arg(long, value_enum, default_value = "base")]
    pub format: HumanevalFormat,
    /// Samples per problem (pass@k needs n >= k; use --temperature > 0 for n > 1).
    #[arg(long, default_value_t = 1)]
    pub n: u32,
    #[command(flatten)]
    pub endpoint: EndpointArgs,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum HumanevalFormat {
    Base,
    Instruct,
}

/// Generates the samples HumanEval grades; returns them, the output directory and the
/// provenance for the report.
pub async fn humaneval_samples(
    g: &HumanevalGen,
    problems: &[davinci_evaluator::humaneval::Problem],
    problems_path: &Path,
) -> anyhow::Result<(
    Vec<davinci_evaluator::humaneval::Sample>,
    PathBuf,
    Provenance,
)> {
    let ep = g.endpoint.endpoint()?;
    anyhow::ensure!(g.n > 0, "--n must be at least 1");
    let format = match g.format {
        HumanevalFormat::Base => humaneval::Format::Base,
        HumanevalFormat::Instruct => humaneval::Format::Instruct,
    };
    let sampling = humaneval::sampling_for(format, g.endpoint.sampling(512, g.n));
    let data = std::fs::read(problems_path)
        .with_context(|| format!("reading {}", problems_path.display()))?;
    let prov = Provenance::new(
        "humaneval",
        &ep,
        format.template(),
        &sampling,
        drive::sha256_hex(&data),
        Some(g.endpoint.seed),
    );
    let dir = g.endpoint.out("humaneval");
    let pb = bar(problems.len() as u64, "generating");
    let t = Instant::now();
    let samples = humaneval::generate(&ep, problems, format, &sampling, &|id| {
        pb.set_message(id.to_string());
        pb.inc(1);
    })
    .await?;
    pb.finish_and_clear();
    let path = dir.join("samples.jsonl");
    drive::write_jsonl(&path, &samples)?;
    println!(
        "{} samples from {} at {} in {:.1}s -> {}",
        samples.len(),
        ep.model(),
        ep.base_url(),
        t.elapsed().as_secs_f64(),
        path.display()
    );
    Ok((samples, dir, prov))
}

#[derive(Debug, clap::Args)]
pub struct GpqaArgs {
    /// GPQA CSV as published (gpqa_main.csv, gpqa_diamond.csv, ...; the data is gated).
    #[arg(long)]
    pub data: PathBuf,
    /// loglikelihood (lm-eval's zero-shot; needs /completions with echo + logprobs) or
    /// generative (answer extraction).
    #[arg(long, value_enum, default_value = "loglikelihood")]
    pub mode: GpqaMode,
    /// Generative prompts as chat messages (instruct models) instead of raw completions.
    #[arg(long)]
    pub chat: bool,
    /// Questions evaluated at most (0 = all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    #[command(flatten)]
    pub endpoint: EndpointArgs,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum GpqaMode {
    Loglikelihood,
    Generative,
}

pub async fn gpqa_cmd(a: GpqaArgs) -> anyhow::Result<()> {
    let ep = a.endpoint.endpoint()?;
    let (questions, data_sha) = gpqa::load_csv(&a.data)?;
    let mut items: Vec<gpqa::Item> = questions
        .iter()
        .map(|q| gpqa::shuffle(q, a.endpoint.seed))
        .collect();
    if a.limit > 0 {
        items.truncate(a.limit);
    }
    let mode = match a.mode {
        GpqaMode::Loglikelihood => gpqa::Mode::Loglikelihood,
        GpqaMode::Generative => gpqa::Mode::Generative,
    };
    let sampling = a.endpoint.sampling(1024, 1);
    let prov = Provenance::new(
        "gpqa",
        &ep,
        &gpqa::template(mode),
        &sampling,
        data_sha,
        Some(a.endpoint.seed),
    );
    let pb = bar(items.len() as u64, "gpqa");
    let results = gpqa::evaluate(&ep, &items, mode, &sampling, a.chat, &|r| {
        pb.set_message(format!("row {}", r.row));
        pb.inc(1);
    })
    .await?;
    pb.finish_and_clear();
    let scores = gpqa::scores(&results, mode);
    let dir = a.endpoint.out("gpqa");
    drive::write_jsonl(&dir.join("results.jsonl"), &results)?;
    let report = drive::write_report(&dir, &prov, scores.clone())?;
    let (correct, unparsed) = (&scores["correct"], &scores["unparsed"]);
    let accuracy = scores["accuracy"].as_f64().unwrap_or(0.0);
    println!(
        "GPQA ({:?}): {correct}/{} correct = {:.2}% ({unparsed} without a readable letter) -> {}",
        mode,
        results.len(),
        100.0 * accuracy,
        report.display()
    );
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct ScibenchArgs {
    /// Directory of SciBench's dataset/original JSON files (e.g. ../shared/data/evals/scibench).
    #[arg(long)]
    pub data: PathBuf,
    /// Textbooks to run (comma separated, e.g. atkins,calculus; default all ten).
    #[arg(long, value_delimiter = ',')]
    pub books: Vec<String>,
    /// Send the system prompt and problem as chat messages (instruct models) instead of one
    /// completion prompt.
    #[arg(long)]
    pub chat: bool,
    /// Problems evaluated at most (0 = all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    #[command(flatten)]
    pub endpoint: EndpointArgs,
}

pub async fn scibench_cmd(a: ScibenchArgs) -> anyhow::Result<()> {
    let ep = a.endpoint.endpoint()?;
    let (problems, data_sha) = scibench::load_dir(&a.data, &a.books)?;
    let mut prepared: Vec<scibench::Prepared> = problems.iter().map(scibench::prepare).collect();
    if a.limit > 0 {
        prepared.truncate(a.limit);
    }
    let sampling = a.endpoint.sampling(1024, 1);
    let prov = Provenance::new(
        "scibench",
        &ep,
        &format!("{}\n\n{}", scibench::SYSTEM, scibench::TEMPLATE),
        &sampling,
        data_sha,
        Some(a.endpoint.seed),
    );
    let pb = bar(prepared.len() as u64, "scibench");
    let results = scibench::evaluate(&ep, &prepared, &sampling, a.chat, &|r| {
        pb.set_message(r.id.clone());
        pb.inc(1);
    })
    .await?;
    pb.finish_and_clear();
    let scores = scibench::scores(&results);
    let dir = a.endpoint.out("scibench");
    drive::write_jsonl(&dir.join("results.jsonl"), &results)?;
    let report = drive::write_report(&dir, &prov, scores.clone())?;
    let (correct, no_number, unreadable_reference) = (
        &scores["correct"],
        &scores["no_number_in_answer"],
        &scores["unreadable_reference"],
    );
    let accuracy = scores["accuracy"].as_f64().unwrap_or(0.0);
    println!(
        "SciBench: {correct}/{} correct = {:.2}% ({no_number} answers without a number, {unreadable_reference} references upstream cannot read) -> {}",
        results.len(),
        100.0 * accuracy,
        report.display()
    );
    Ok(())
}
