//! `davinci serve`: one process serving one service, several, or all of them.
use anyhow::Context;
use davinci_runtime::config::Settings;
use davinci_runtime::context::ServiceContext;
use davinci_runtime::grpc::{self, ServeOptions};
use davinci_runtime::telemetry::{self, LogFormat};
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Target {
    Conductor,
    Crawler,
    Reconstructor,
    Tasks,
    Rollout,
    TokenizerPacker,
    Trainer,
    Evaluator,
    /// The OpenAI-compatible model server (HTTP, needs --model); not part of `all`.
    Inference,
    /// Every gRPC service in one process.
    All,
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Settings come from built-in defaults, then --config, then DAVINCI__SECTION__KEY \
variables (e.g. DAVINCI__QUEUE__URL=redis://127.0.0.1:6379, DAVINCI__STORAGE__URI=s3://bucket/prefix). \
The bearer token comes from DAVINCI_AUTH_TOKEN or server.auth_token_file. SIGTERM drains in-flight work."
)]
pub struct Args {
    /// Which services to run (repeat or comma-separate; `all` runs every one).
    #[arg(long, short, value_enum, value_delimiter = ',', required = true)]
    pub target: Vec<Target>,
    /// Settings file (YAML or TOML).
    #[arg(long, short, env = "DAVINCI_CONFIG")]
    pub config: Option<PathBuf>,
    /// gRPC listen address (overrides server.listen).
    #[arg(long)]
    pub listen: Option<String>,
    /// Prometheus /metrics listen address (overrides server.metrics_listen; "" disables).
    #[arg(long)]
    pub metrics_listen: Option<String>,
    #[command(flatten)]
    pub inference: InferenceArgs,
}

/// The `inference` target: an OpenAI-compatible HTTP server for one checkpoint.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Inference (--target inference)")]
pub struct InferenceArgs {
    /// Checkpoint directory: config.json, model.safetensors (or its index) and tokenizer.json
    /// (ours: {storage}/runs/{run}/checkpoints/{step}/, or any Hugging Face Qwen2 directory).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Name clients send as `model` (default: the directory's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// HTTP listen address of the OpenAI API (/v1/models, /v1/completions, /v1/chat/completions).
    #[arg(long, default_value = "0.0.0.0:8000")]
    pub http_listen: String,
    /// Sequences decoded together (continuous batching).
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Context limit in tokens (default: the model's max_position_embeddings).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// tokenizer.json for a checkpoint without one (ours trained from a config.json: the
    /// run's tokenizer); default: DIR/tokenizer.json.
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
}

/// Loads the checkpoint (failing before anything listens) and returns the server to run.
async fn inference_server(
    a: &InferenceArgs,
) -> anyhow::Result<impl std::future::Future<Output = anyhow::Result<()>> + use<>> {
    let dir = a
        .model
        .clone()
        .context("--target inference needs --model DIR (a checkpoint with config.json, weights and tokenizer.json)")?;
    if a.max_batch == 0 {
        anyhow::bail!("--max-batch must be at least 1");
    }
    let cfg = davinci_inference::ServeConfig {
        model_dir: dir,
        name: a.served_model_name.clone(),
        max_batch: a.max_batch,
        max_model_len: a.max_model_len,
        tokenizer: a.tokenizer.clone(),
    };
    let state = tokio::task::spawn_blocking(move || davinci_inference::load(&cfg)).await??;
    let listener = tokio::net::TcpListener::bind(&a.http_listen)
        .await
        .with_context(|| format!("binding the inference server to {}", a.http_listen))?;
    tracing::info!(addr = %a.http_listen, model = %state.name, max_len = state.max_len, "inference server listening");
    Ok(davinci_inference::serve(
        listener,
        state,
        grpc::shutdown_signal(),
    ))
}

fn expand(targets: &[Target]) -> Vec<Target> {
    let mut t: Vec<Target> = if targets.contains(&Target::All) {
        vec![
            Target::Conductor,
            Target::Crawler,
            Target::Reconstructor,
            Target::Tasks,
            Target::Rollout,
            Target::TokenizerPacker,
            Target::Trainer,
            Target::Evaluator,
        ]
    } else {
        targets.to_vec()
    };
    t.sort();
    t.dedup();
    t
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let mut settings = Settings::load(args.config.as_deref())?;
    if let Some(l) = args.listen {
        settings.server.listen = l;
    }
    if let Some(m) = args.metrics_listen {
        settings.server.metrics_listen = m;
    }
    settings.validate()?;
    let targets = expand(&args.target);
    if args.inference.model.is_some() && !targets.contains(&Target::Inference) {
        anyhow::bail!("--model is for --target inference");
    }
    let label = if targets.len() == 1 {
        format!("{:?}", targets[0]).to_lowercase()
    } else {
        "all".into()
    };
    let _guard = telemetry::init(
        &label,
        LogFormat::parse(if settings.telemetry.log_format == "auto" {
            "json"
        } else {
            &settings.telemetry.log_format
        }),
        &settings.telemetry.log_level,
    )?;
    let inference = if targets.contains(&Target::Inference) {
        Some(tokio::spawn(inference_server(&args.inference).await?))
    } else {
        None
    };
    let targets: Vec<Target> = targets
        .into_iter()
        .filter(|t| *t != Target::Inference)
        .collect();
    let names: Vec<&str> = targets.iter().map(|t| service_name(*t)).collect();
    if targets.is_empty() {
        if !settings.server.metrics_listen.is_empty() {
            telemetry::install_metrics(settings.server.metrics_listen.parse()?)?;
        }
        return match inference {
            Some(h) => h.await?,
            None => Ok(()),
        };
    }
    let opts = ServeOptions::from_settings(&settings)?;
    let listener = grpc::bind(&settings.server.listen).await?;
    if !settings.server.metrics_listen.is_empty() {
        telemetry::install_metrics(settings.server.metrics_listen.parse()?)?;
    }
    let ctx = ServiceContext::open(settings).await?;
    // Queue workers stop with the server; each replica consumes under its own name.
    let stop = tokio_util::sync::CancellationToken::new();
    let consumer = format!(
        "{}-{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "davinci".into()),
        std::process::id()
    );
    let mut workers = tokio::task::JoinSet::new();
    let mut routes = tonic::service::Routes::default();
    let mut registries = Vec::new();
    for t in &targets {
        let jobs = ctx
            .job_registry(&format!("{t:?}").to_lowercase())
            .await
            .with_context(|| format!("opening the job registry of {t:?}"))?;
        registries.push(jobs.clone());
        routes = match t {
            Target::Conductor => {
                let own = own_addr(&ctx.settings.server.listen);
                let pick = |a: &str| {
                    if a.is_empty() {
                        own.clone()
                    } else {
                        a.to_string()
                    }
                };
                let svc = &ctx.settings.services;
                let cfg = davinci_conductor::serve::ConductorConfig {
                    stages: davinci_conductor::orchestrate::StageAddrs {
                        crawler: pick(&svc.crawler),
                        reconstructor: pick(&svc.reconstructor),
                        tokenizer_packer: pick(&svc.tokenizer_packer),
                        trainer: pick(&svc.trainer),
                        evaluator: pick(&svc.evaluator),
                        rollout: pick(&svc.rollout),
                        tasks: pick(&svc.tasks),
                    },
                    token: opts.auth_token.clone(),
                    // made absolute when the settings were loaded
                    storage_root: ctx.settings.storage.uri.clone(),
                    s3: ctx.settings.storage.s3.clone(),
                };
                routes.add_service(
                    davinci_conductor::serve::ConductorService::new(jobs, cfg)
                        .with_checkpoint_server(std::sync::Arc::new(crate::checkpoint::InProcess))
                        .into_server(),
                )
            }
            Target::Rollout => {
                let base = rollout_settings(&ctx.settings)?;
                for i in 0..ctx.settings.rollout.workers.max(1) {
                    workers.spawn(davinci_rollout::serve::worker(
                        ctx.queue.clone(),
                        format!("{consumer}-r{i}"),
                        ctx.settings.storage.s3.clone(),
                        stop.clone(),
                        std::sync::Arc::new(|_| {}),
                    ));
                }
                routes.add_service(
                    davinci_rollout::serve::RolloutService::new(
                        jobs,
                        base,
                        ctx.settings.storage.s3.clone(),
                    )
                    .with_queue(ctx.queue.clone())
                    .into_server(),
                )
            }
            Target::Tasks => {
                let (base, dirs) = tasks_settings(&ctx.settings)?;
                let s3 = ctx.settings.storage.s3.clone();
                for i in 0..ctx.settings.tasks.workers.max(1) {
                    let work = davinci_tasks::serve::worker(
                        ctx.queue.clone(),
                        format!("{consumer}-t{i}"),
                        s3.clone(),
                        dirs.clone(),
                        stop.clone(),
                    );
                    workers.spawn(async move { work.await.map(|_| ()) });
                }
                let repos = &ctx.settings.tasks.repos_dir;
                routes.add_service(
                    davinci_tasks::serve::TasksService::new(
                        jobs,
                        base,
                        (!repos.is_empty()).then(|| PathBuf::from(repos)),
                        dirs,
                        s3,
                    )
                    .with_queue(ctx.queue.clone())
                    .into_server(),
                )
            }
            Target::Trainer => {
                let svc = davinci_trainer::serve::TrainerService::new(jobs)
                    .with_s3(ctx.settings.storage.s3.clone());
                let ns = &ctx.settings.trainer.reattach_namespaces;
                if !ns.is_empty() {
                    let ns: Vec<&str> = ns.iter().map(String::as_str).collect();
                    let n = svc.reattach(&ns).await.with_context(|| {
                        format!(
                            "re-attaching to cluster jobs in {ns:?} (trainer.reattach_namespaces)"
                        )
                    })?;
                    tracing::info!(jobs = n, namespaces = ?ns, "re-attached to cluster training jobs");
                }
                routes.add_service(svc.into_server())
            }
            Target::Crawler => {
                let (base, github) = crawler_parts(&ctx).await?;
                let work = davinci_crawler::serve::worker(
                    ctx.queue.clone(),
                    base.clone(),
                    github.clone(),
                    consumer.clone(),
                    ctx.settings.storage.s3.clone(),
                    stop.clone(),
                );
                workers.spawn(async move { work.await.map(|_| ()) });
                routes.add_service(davinci_proto::v1::crawler_server::CrawlerServer::new(
                    davinci_crawler::serve::CrawlerService::new(
                        jobs,
                        ctx.settings.storage.s3.clone(),
                        base,
                        github,
                    )
                    .with_queue(ctx.queue.clone()),
                ))
            }
            Target::Reconstructor => {
                let tokenizer: davinci_reconstructor::serve::TokenizerLoader =
                    std::sync::Arc::new(tokenizer_counter);
                workers.spawn(davinci_reconstructor::serve::worker(
                    ctx.queue.clone(),
                    Default::default(),
                    tokenizer.clone(),
                    consumer.clone(),
                    ctx.settings.storage.s3.clone(),
                    stop.clone(),
                ));
                routes.add_service(
                    davinci_proto::v1::reconstructor_server::ReconstructorServer::new(
                        davinci_reconstructor::serve::ReconstructorService {
                            jobs,
                            base: Default::default(),
                            s3: ctx.settings.storage.s3.clone(),
                            tokenizer,
                            queue: Some(ctx.queue.clone()),
                        },
                    ),
                )
            }
            Target::TokenizerPacker => {
                for topic in [
                    davinci_tokenizer_packer::serve::SAMPLES_TOPIC,
                    davinci_tokenizer_packer::serve::TRAJECTORIES_TOPIC,
                ] {
                    let work = davinci_tokenizer_packer::serve::worker(
                        ctx.queue.clone(),
                        topic,
                        consumer.clone(),
                        ctx.settings.storage.s3.clone(),
                        stop.clone(),
                    );
                    workers.spawn(async move { work.await.map(|_| ()) });
                }
                routes.add_service(
                    davinci_proto::v1::tokenizer_packer_server::TokenizerPackerServer::new(
                        davinci_tokenizer_packer::serve::PackerService::new(
                            jobs,
                            ctx.settings.storage.s3.clone(),
                        )
                        .with_queue(ctx.queue.clone()),
                    ),
                )
            }
            Target::Evaluator => {
                routes.add_service(davinci_proto::v1::evaluator_server::EvaluatorServer::new(
                    davinci_evaluator::serve::EvaluatorService::new(
                        jobs,
                        evaluator_config(&ctx.settings),
                    ),
                ))
            }
            Target::All | Target::Inference => unreachable!("expanded above"),
        };
    }
    let stop_workers = stop.clone();
    let served = grpc::serve(listener, routes, &names, registries, opts, async move {
        grpc::shutdown_signal().await;
        stop_workers.cancel();
    })
    .await;
    stop.cancel();
    while let Some(res) = workers.join_next().await {
        match res {
            Ok(Err(e)) => tracing::error!(error = %format!("{e:#}"), "queue worker failed"),
            Err(e) => tracing::error!(error = %e, "queue worker panicked"),
            Ok(Ok(())) => {}
        }
    }
    if let Some(h) = inference {
        h.await??;
    }
    served
}

/// The gRPC service name a target serves.
pub fn service_name(t: Target) -> &'static str {
    match t {
        Target::Conductor => "davinci.v1.Conductor",
        Target::Crawler => "davinci.v1.Crawler",
        Target::Reconstructor => "davinci.v1.Reconstructor",
        Target::Tasks => "davinci.v1.Tasks",
        Target::Rollout => "davinci.v1.Rollout",
        Target::TokenizerPacker => "davinci.v1.TokenizerPacker",
        Target::Trainer => "davinci.v1.Trainer",
        Target::Evaluator => "davinci.v1.Evaluator",
        Target::Inference | Target::All => "",
    }
}

/// Token counter for the reconstructor's cap: the job's tokenizer, else a word count.
pub fn tokenizer_counter(
    path: Option<&str>,
) -> anyhow::Result<davinci_reconstructor::TokenCounter> {
    // Loaded once per process: every worker and job of a run asks for the same tokenizer.
    static LOADED: std::sync::LazyLock<
        std::sync::Mutex<std::collections::HashMap<String, davinci_reconstructor::TokenCounter>>,
    > = std::sync::LazyLock::new(Default::default);
    match path.filter(|p| !p.is_empty()) {
        Some(p) => {
            let mut loaded = LOADED.lock().expect("tokenizer cache lock");
            if let Some(c) = loaded.get(p) {
                return Ok(c.clone());
            }
            let tok = davinci_tokenize::Tokenizer::load(p)
                .with_context(|| format!("loading tokenizer {p}"))?;
            let counter: davinci_reconstructor::TokenCounter =
                std::sync::Arc::new(move |s: &str| tok.count_tokens(s).unwrap_or(usize::MAX));
            if loaded.len() >= 4 {
                loaded.clear();
            }
            loaded.insert(p.to_string(), counter.clone());
            Ok(counter)
        }
        None => Ok(davinci_reconstructor::word_counter()),
    }
}

/// The crawler's base config and GitHub client from the settings: with a Redis queue, token
/// budgets and ETags are shared by every replica.
async fn crawler_parts(
    ctx: &ServiceContext,
) -> anyhow::Result<(
    davinci_crawler::pipeline::CrawlConfig,
    Option<std::sync::Arc<davinci_crawler::github::GithubClient>>,
)> {
    let gh = &ctx.settings.github;
    let mut base = davinci_crawler::pipeline::CrawlConfig::new("");
    base.web_url = gh.web_url.clone();
    let cfg = davinci_crawler::github::GithubConfig {
        api_url: gh.api_url.clone(),
        budget_per_window: gh.budget_per_hour,
        window_secs: 3600,
        ..Default::default()
    };
    let url = &ctx.settings.queue.url;
    let redis = url.starts_with("redis").then_some(url.as_str());
    let client = davinci_crawler::github::GithubClient::pooled(cfg, redis, ctx.store.clone())
        .await
        .context("building the crawler's GitHub client (github.* settings)")?;
    Ok((base, Some(std::sync::Arc::new(client))))
}

/// This process's own gRPC address as a client dials it.
fn own_addr(listen: &str) -> String {
    format!(
        "http://{}",
        listen
            .replace("0.0.0.0", "127.0.0.1")
            .replace("[::]", "[::1]")
    )
}

/// The evaluator's settings: SWE-bench on the `sandbox:` backend, HumanEval under bubblewrap
/// (the local backend's options when that is the backend); `evaluator.work_root` places the
/// local workspaces.
fn evaluator_config(
    settings: &davinci_runtime::config::Settings,
) -> davinci_evaluator::serve::ServeConfig {
    use davinci_evaluator::sandbox::Backend;
    let e = &settings.evaluator;
    let mut c = davinci_evaluator::serve::ServeConfig::default();
    let path = |v: &str| (!v.is_empty()).then(|| PathBuf::from(v));
    c.repos_dir = path(&e.repos_dir);
    c.sandbox = settings.sandbox.clone();
    if let Backend::Local(l) = &mut c.sandbox {
        if let Some(w) = path(&e.work_root) {
            l.work_root = Some(w);
        }
        c.local = l.clone();
    }
    if let Some(w) = path(&e.work_root) {
        c.local.work_root = Some(w);
    }
    c.python = e.python.clone();
    c
}

/// The rollout service's base settings: its sandbox backend (`rollout.sandbox`, else the
/// process's `sandbox:` section) and environments, checked before the server starts (a bad
/// backend field is named by its path).
pub fn rollout_settings(
    settings: &davinci_runtime::config::Settings,
) -> anyhow::Result<davinci_rollout::pipeline::RolloutSettings> {
    let r = &settings.rollout;
    let mut s = davinci_rollout::pipeline::RolloutSettings::default();
    if r.sandbox.is_empty() {
        // The shared section's limits, with the repository where the agent's tools look.
        s.sandbox = settings.sandbox.clone();
        if let davinci_sandbox::Backend::Local(l) = &mut s.sandbox {
            l.mount_point = davinci_rollout::pipeline::TESTBED.into();
        }
    } else {
        s.sandbox = serde_path_to_error::deserialize(serde_json::Value::Object(r.sandbox.clone()))
            .map_err(|e| anyhow::anyhow!("invalid setting rollout.sandbox.{e}"))?;
    }
    if !r.repos_dir.is_empty() {
        s.repos_dir = Some(PathBuf::from(&r.repos_dir));
    }
    Ok(s)
}

/// The tasks service's base stage configuration (`tasks.config`, its sandbox defaulting to the
/// process's `sandbox:` section; a bad field is named by its path) and this replica's local
/// directories for environments and trees.
pub fn tasks_settings(
    settings: &davinci_runtime::config::Settings,
) -> anyhow::Result<(davinci_tasks::TasksConfig, davinci_tasks::serve::LocalDirs)> {
    let t = &settings.tasks;
    let mut map = t.config.clone();
    if !map.contains_key("sandbox") {
        map.insert("sandbox".into(), serde_json::to_value(&settings.sandbox)?);
    }
    let base: davinci_tasks::TasksConfig =
        serde_path_to_error::deserialize(serde_json::Value::Object(map))
            .map_err(|e| anyhow::anyhow!("invalid setting tasks.config.{e}"))?;
    base.check()
        .map_err(|e| anyhow::anyhow!("invalid setting tasks.config: {e:#}"))?;
    let local = |v: &str, default: PathBuf| -> anyhow::Result<PathBuf> {
        Ok(std::path::absolute(if v.is_empty() {
            default
        } else {
            PathBuf::from(v)
        })?)
    };
    let env_default = davinci_tasks::batch::local_root(&settings.storage.uri)
        .map(|r| r.join("cache/envs"))
        .unwrap_or_else(|| PathBuf::from("davinci-cache/envs"));
    let dirs = davinci_tasks::serve::LocalDirs {
        env_root: local(&t.env_root, env_default)?,
        work_root: local(&t.work_root, PathBuf::from("davinci-work"))?,
    };
    Ok((base, dirs))
}
