//! `davinci run PIPELINE.yaml`: the whole pipeline in one process (the embedded default).
//!
//! The stage services run in this process on a loopback port and the run is driven through
//! their gRPC API by the same orchestrator the distributed conductor uses, so an embedded run
//! and a distributed one write the same samples and shards.
use crate::serve::absolute_root;
use anyhow::Context;
use davinci_conductor::orchestrate::{STAGES, StageAddrs, StageClients, execute};
use davinci_conductor::spec::RunSpec;
use davinci_proto::v1::{JobState, StageStatus};
use davinci_runtime::blob::{self, BlobStore, S3Config};
use davinci_runtime::grpc::{self, ServeOptions};
use davinci_runtime::jobs::JobRegistry;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "The spec format is in deploy/examples/quickstart.yaml. Outputs go to \
{storage}/runs/{run_id}/: prs/, samples/{format}/, packed/{stage}/, stats/, packed/manifest.json. \
Running the same spec again resumes and rewrites the same objects."
)]
pub struct Args {
    /// The RunSpec (YAML).
    pub spec: PathBuf,
    /// Repositories to crawl instead of the spec's `sources.repos` (path or clone URL; repeatable).
    #[arg(long)]
    pub repo: Vec<String>,
    /// Storage root instead of the spec's `storage` (default file://./davinci-data).
    #[arg(long)]
    pub storage: Option<String>,
    /// Run id instead of the spec's (default: derived from the spec's content).
    #[arg(long)]
    pub run_id: Option<String>,
    /// Tokenizer instead of the spec's.
    #[arg(long)]
    pub tokenizer: Option<String>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.spec)
        .with_context(|| format!("reading {}", args.spec.display()))?;
    let mut spec = RunSpec::parse(&text)
        .with_context(|| format!("{} is not a valid run spec", args.spec.display()))?;
    if !args.repo.is_empty() {
        spec.sources.repos = args.repo.clone();
    }
    if let Some(s) = &args.storage {
        spec.storage = Some(s.clone());
    }
    if let Some(id) = &args.run_id {
        spec.run_id = Some(id.clone());
    }
    if let Some(t) = &args.tokenizer {
        spec.tokenizer = t.clone();
    }
    // Relative tokenizer paths are relative to where the command runs (Hub model ids stay).
    let hub_id = davinci_tokenize::hub::HubRepo::parse(&spec.tokenizer).is_some()
        && !std::path::Path::new(&spec.tokenizer).exists();
    if !hub_id && !spec.tokenizer.contains("://") && !spec.tokenizer.starts_with('/') {
        spec.tokenizer = std::env::current_dir()?
            .join(&spec.tokenizer)
            .display()
            .to_string();
    }
    spec.validate()?;
    let run_id = spec.resolved_run_id();
    let root = absolute_root(spec.storage.as_deref().unwrap_or("file://./davinci-data"))?;
    let _guard = davinci_runtime::telemetry::init(
        "run",
        davinci_runtime::telemetry::LogFormat::Human,
        "warn",
    )?;

    // The stage services, in this process, on a loopback port.
    let listener = grpc::bind("127.0.0.1:0").await?;
    let addr = format!("http://{}", listener.local_addr()?);
    let s3 = S3Config::default();
    let jobs = JobRegistry::in_memory().await;
    // Stage jobs are shared by in-process workers over an in-process queue: the same code a
    // distributed run uses, with one worker per core.
    let queue: std::sync::Arc<dyn davinci_runtime::queue::WorkQueue> =
        std::sync::Arc::new(davinci_runtime::queue::MemoryQueue::new(Default::default()));
    let stop_workers = tokio_util::sync::CancellationToken::new();
    let mut workers = tokio::task::JoinSet::new();
    let tokenizer: davinci_reconstructor::serve::TokenizerLoader =
        std::sync::Arc::new(crate::serve::tokenizer_counter);
    for w in 0..std::thread::available_parallelism().map_or(1, |n| n.get()) {
        let crawl = davinci_crawler::serve::worker(
            queue.clone(),
            davinci_crawler::pipeline::CrawlConfig::new(""),
            None,
            format!("crawler-{w}"),
            s3.clone(),
            stop_workers.clone(),
        );
        workers.spawn(async move { crawl.await.map(|_| ()) });
        workers.spawn(davinci_reconstructor::serve::worker(
            queue.clone(),
            Default::default(),
            tokenizer.clone(),
            format!("reconstructor-{w}"),
            s3.clone(),
            stop_workers.clone(),
        ));
        for topic in [
            davinci_tokenizer_packer::serve::SAMPLES_TOPIC,
            davinci_tokenizer_packer::serve::TRAJECTORIES_TOPIC,
        ] {
            let work = davinci_tokenizer_packer::serve::worker(
                queue.clone(),
                topic,
                format!("packer-{w}"),
                s3.clone(),
                stop_workers.clone(),
            );
            workers.spawn(async move { work.await.map(|_| ()) });
        }
    }
    let routes = tonic::service::Routes::default()
        .add_service(davinci_proto::v1::crawler_server::CrawlerServer::new(
            davinci_crawler::serve::CrawlerService::new(
                jobs.clone(),
                s3.clone(),
                davinci_crawler::pipeline::CrawlConfig::new(""),
                None,
            )
            .with_queue(queue.clone()),
        ))
        .add_service(
            davinci_proto::v1::reconstructor_server::ReconstructorServer::new(
                davinci_reconstructor::serve::ReconstructorService {
                    jobs: jobs.clone(),
                    base: Default::default(),
                    s3: s3.clone(),
                    tokenizer,
                    queue: Some(queue.clone()),
                },
            ),
        )
        .add_service(
            davinci_proto::v1::tokenizer_packer_server::TokenizerPackerServer::new(
                davinci_tokenizer_packer::serve::PackerService::new(jobs.clone(), s3.clone())
                    .with_queue(queue.clone()),
            ),
        );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let opts = ServeOptions {
        request_timeout: std::time::Duration::from_secs(3600),
        ..Default::default()
    };
    let server = tokio::spawn(grpc::serve(
        listener,
        routes,
        &[],
        vec![jobs],
        opts,
        async move {
            let _ = stop_rx.await;
        },
    ));
    let addrs = StageAddrs {
        crawler: addr.clone(),
        reconstructor: addr.clone(),
        tokenizer_packer: addr,
    };
    let mut clients = StageClients::connect(&addrs, None).await?;

    eprintln!(
        "davinci run {run_id}: {} repositories → {root}/runs/{run_id}/",
        spec.sources.repos.len()
    );
    let multi = MultiProgress::new();
    let style =
        ProgressStyle::with_template("{prefix:>12} {bar:30} {pos}/{len} {elapsed:>4} {msg}")
            .expect("static template");
    let bars: HashMap<&str, ProgressBar> = STAGES
        .iter()
        .map(|s| {
            let b = multi.add(
                ProgressBar::new(0)
                    .with_style(style.clone())
                    .with_prefix(s.to_string()),
            );
            (*s, b)
        })
        .collect();
    let cancel = tokio_util::sync::CancellationToken::new();
    let c2 = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            c2.cancel();
        }
    });
    let started = Instant::now();
    let result = execute(
        &mut clients,
        &run_id,
        &root,
        &spec,
        &cancel,
        |st: &StageStatus| {
            if let Some(b) = bars.get(st.stage.as_str()) {
                b.set_length(st.total.max(st.done));
                b.set_position(st.done);
                let state = JobState::try_from(st.state).unwrap_or(JobState::Unspecified);
                if state.is_terminal() {
                    b.finish_with_message(format!(
                        "{} in {:.1}s",
                        state
                            .as_str_name()
                            .trim_start_matches("JOB_STATE_")
                            .to_lowercase(),
                        st.wall_seconds
                    ));
                } else {
                    b.set_message(format!(
                        "{} out",
                        st.counters.get("records_out").copied().unwrap_or_default()
                    ));
                }
            }
        },
    )
    .await;
    let _ = stop_tx.send(());
    let _ = server.await;
    stop_workers.cancel();
    while let Some(r) = workers.join_next().await {
        if let Ok(Err(e)) = r {
            tracing::warn!(error = %format!("{e:#}"), "stage worker failed");
        }
    }
    let stages = result?;
    let store = blob::open(&root, &s3).await?;
    print_summary(
        store.as_ref(),
        &root,
        &run_id,
        &stages,
        started.elapsed().as_secs_f64(),
    )
    .await
}

async fn read_json(store: &dyn BlobStore, key: &str) -> anyhow::Result<Value> {
    let b = store
        .get(key)
        .await
        .with_context(|| format!("reading {}", store.uri(key)))?;
    Ok(serde_json::from_slice(&b)?)
}

fn drops(v: &Value) -> String {
    match v.as_object() {
        Some(m) if !m.is_empty() => m
            .iter()
            .map(|(k, n)| format!("{k}={n}"))
            .collect::<Vec<_>>()
            .join(", "),
        _ => "none".into(),
    }
}

async fn print_summary(
    store: &dyn BlobStore,
    root: &str,
    run: &str,
    stages: &[StageStatus],
    wall: f64,
) -> anyhow::Result<()> {
    let crawl = read_json(store, &format!("runs/{run}/stats/crawl.json")).await?;
    let recon = read_json(store, &format!("runs/{run}/stats/reconstruct.json")).await?;
    let manifest = read_json(store, &format!("runs/{run}/packed/manifest.json")).await?;
    println!("\nrun {run} finished in {wall:.1}s");
    println!(
        "PRs: {} found, {} kept; dropped: {}",
        crawl["in"],
        crawl["out"],
        drops(&crawl["drops"])
    );
    if let Some(f) = crawl["failed_repos"].as_object().filter(|m| !m.is_empty()) {
        for (repo, e) in f {
            println!("  repository {repo} failed: {e}");
        }
    }
    if let Some(formats) = recon["formats"].as_object() {
        for (name, f) in formats {
            println!(
                "samples {name}: {} ({} tokens); dropped: {}",
                f["samples"],
                f["tokens"],
                drops(&f["drops"])
            );
        }
    }
    if let Some(st) = manifest["stages"].as_array() {
        for s in st {
            for d in s["datasets"].as_array().into_iter().flatten() {
                println!(
                    "packed {}/{}: {} documents, {} tokens, {} bins, padding {:.4}",
                    s["name"].as_str().unwrap_or("?"),
                    d["name"].as_str().unwrap_or("?"),
                    d["documents"],
                    d["tokens"],
                    d["bins"],
                    d["padding_ratio"].as_f64().unwrap_or(0.0)
                );
            }
        }
    }
    let times: Vec<String> = stages
        .iter()
        .map(|s| format!("{} {:.1}s", s.stage, s.wall_seconds))
        .collect();
    println!("wall time per stage: {}", times.join(", "));
    println!(
        "outputs: {}/runs/{run}/ (prs/, samples/, packed/, stats/)",
        root.trim_end_matches('/')
    );
    Ok(())
}
