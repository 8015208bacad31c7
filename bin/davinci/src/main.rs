//! `davinci`: one binary for the embedded pipeline, every server target and the gRPC clients.
use clap::{Parser, Subcommand};

mod checkpoint;
mod crawl;
mod eval;
mod eval_model;
mod health;
mod pack;
mod progress;
mod reconstruct;
mod rollout;
mod run;
mod runs;
mod runspec;
mod serve;
mod synth;
mod tasks;
mod train;

/// davinci turns merged pull requests and executable repositories into agent-native training
/// data for coding agents, packs it for Megatron-LM, and evaluates models.
#[derive(Debug, Parser)]
#[command(name = "davinci", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole pipeline (crawl → reconstruct → pack) in this process.
    Run(run::Args),
    /// Submit, follow, list and cancel runs on a conductor (distributed mode).
    Runs(runs::Args),
    /// Crawl merged pull requests from git repositories (and the GitHub API) into PR shards.
    Crawl(crawl::Args),
    /// Render PR shards as contextually-native samples (ctx-general, ctx-python).
    Reconstruct(reconstruct::Args),
    /// Build validated executable tasks from PR shards, or validate a published task set.
    #[command(subcommand)]
    Tasks(tasks::Command),
    /// Tokenize samples and pack them into Megatron indexed-dataset shards.
    Pack(pack::Args),
    /// Run the coding agent on validated tasks and grade each run into pass / fail trajectories.
    Rollout(rollout::Args),
    /// Train a Qwen2 model on packed shards in this process (candle; resumes from OUT).
    Train(train::Args),
    /// Evaluate predictions and completions (SWE-bench, HumanEval, EvalPlus).
    #[command(subcommand)]
    Eval(eval::Command),
    /// Run one service (or all) as a gRPC server with its queue workers.
    Serve(serve::Args),
    /// Ask a server for its grpc.health.v1 status.
    Health(health::Args),
    /// Generate seeded synthetic inputs (PR shards with planted duplicates) for scale runs.
    #[command(subcommand)]
    Synth(synth::Command),
}

/// The S3 settings of one-shot commands: `storage.s3` as `davinci serve` reads it from
/// `DAVINCI__STORAGE__S3__…` variables (endpoint, path style, keys), so `s3://` inputs and
/// outputs of every command reach the same S3-compatible server the services use.
fn cli_s3() -> anyhow::Result<davinci_runtime::blob::S3Config> {
    Ok(davinci_runtime::config::Settings::load(None)
        .map_err(|e| anyhow::anyhow!("{e} (from the DAVINCI__ environment variables)"))?
        .storage
        .s3)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run(a) => run::run(a).await,
            Command::Runs(a) => runs::run(a).await,
            Command::Crawl(a) => crawl::run(a).await,
            Command::Reconstruct(a) => reconstruct::run(a).await,
            Command::Tasks(c) => tasks::run(c).await,
            Command::Pack(a) => pack::run(a).await,
            Command::Rollout(a) => rollout::run(a).await,
            Command::Train(a) => train::run(a).await,
            Command::Eval(c) => eval::run(c).await,
            Command::Serve(a) => serve::run(a).await,
            Command::Health(a) => health::run(a).await,
            Command::Synth(c) => synth::run(c).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
