//! `davinci run PIPELINE.yaml`: the whole pipeline in one process (the embedded default).
//!
//! The stage services run in this process on a loopback port and the run is driven through
//! their gRPC API by the same orchestrator the distributed conductor uses, so an embedded run
//! and a distributed one write the same samples and shards.
use crate::progress::StageBars;
use crate::runspec::{self, Overrides};
use davinci_conductor::orchestrate::{StageAddrs, StageClients, execute, stages};
use davinci_conductor::summary::RunSummary;
use davinci_proto::v1::StageStatus;
use davinci_runtime::blob;
use davinci_runtime::grpc::{self, ServeOptions};
use davinci_runtime::jobs::JobRegistry;
use serde_json::Value;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "The spec format is in deploy/examples/quickstart.yaml. Outputs go to \
{storage}/runs/{run_id}/: prs/, samples/{format}/, packed/{stage}/, stats/, packed/manifest.json. \
Running the same spec again resumes and rewrites the same objects. Relative paths (in the spec \
and the overrides) are read from the directory the command runs in."
)]
pub struct Args {
    /// The RunSpec (YAML).
    pub spec: PathBuf,
    #[command(flatten)]
    pub overrides: Overrides,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let runspec::Loaded { spec, warnings } = runspec::load(&args.spec, &args.overrides)?;
    let run_id = spec.resolved_run_id();
    let default_root = davinci_runtime::config::StorageSettings::default().uri;
    let root = blob::absolute_uri(spec.storage.as_deref().unwrap_or(&default_root))?;
    let _guard = davinci_runtime::telemetry::init(
        "run",
        davinci_runtime::telemetry::LogFormat::Human,
        "warn",
    )?;

    // The stage services, in this process, on a loopback port.
    let listener = grpc::bind("127.0.0.1:0").await?;
    let addr = format!("http://{}", listener.local_addr()?);
    let s3 = crate::cli_s3()?;
    let jobs = JobRegistry::in_memory().await;
    // Stage jobs are shared by in-process workers over an in-process queue: the same code a
    // distributed run uses, with one worker per core.
    let queue: std::sync::Arc<dyn davinci_runtime::queue::WorkQueue> =
        std::sync::Arc::new(davinci_runtime::queue::MemoryQueue::new(Default::default()));
    let stop_workers = tokio_util::sync::CancellationToken::new();
    let mut workers = tokio::task::JoinSet::new();
    let tokenizer: davinci_reconstructor::serve::TokenizerLoader =
        std::sync::Arc::new(crate::serve::tokenizer_counter);
    // The tasks and rollout services with the settings `davinci serve` has by default, their
    // environment cache under the run's storage.
    let mut settings = davinci_runtime::config::Settings::default();
    settings.storage.uri = root.clone();
    let (tasks_base, tasks_dirs) = crate::serve::tasks_settings(&settings)?;
    let mut rollout_base = crate::serve::rollout_settings(&settings)?;
    // Rollouts grade in the environments the tasks stage built.
    rollout_base.env_root = Some(tasks_dirs.env_root.clone());
    for w in 0..std::thread::available_parallelism().map_or(1, |n| n.get()) {
        let tasks = davinci_tasks::serve::worker(
            queue.clone(),
            format!("tasks-{w}"),
            s3.clone(),
            tasks_dirs.clone(),
            stop_workers.clone(),
        );
        workers.spawn(async move { tasks.await.map(|_| ()) });
        workers.spawn(davinci_rollout::serve::worker(
            queue.clone(),
            format!("rollout-{w}"),
            s3.clone(),
            stop_workers.clone(),
            std::sync::Arc::new(|_| {}),
        ));
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
        )
        .add_service(
            davinci_trainer::serve::TrainerService::new(jobs.clone())
                .with_s3(s3.clone())
                .into_server(),
        )
        .add_service(davinci_proto::v1::evaluator_server::EvaluatorServer::new(
            davinci_evaluator::serve::EvaluatorService::new(jobs.clone(), Default::default()),
        ))
        .add_service(
            davinci_tasks::serve::TasksService::new(
                jobs.clone(),
                tasks_base,
                None,
                tasks_dirs,
                s3.clone(),
            )
            .with_queue(queue.clone())
            .into_server(),
        )
        .add_service(
            davinci_rollout::serve::RolloutService::new(jobs.clone(), rollout_base, s3.clone())
                .with_queue(queue.clone())
                .into_server(),
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
        tokenizer_packer: addr.clone(),
        trainer: addr.clone(),
        evaluator: addr.clone(),
        rollout: addr.clone(),
        tasks: addr,
    };
    let mut clients = StageClients::connect(&addrs, None, &stages(&spec))
        .await?
        .with_checkpoint_server(std::sync::Arc::new(crate::checkpoint::InProcess));

    eprintln!(
        "davinci run {run_id}: {} repositories → {root}/runs/{run_id}/",
        spec.sources.repos.len()
    );
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    let bars = StageBars::new();
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
        |st: &StageStatus| bars.update(st),
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
    let summary = RunSummary::read(store.as_ref(), &run_id).await?;
    print_summary(
        &summary,
        &root,
        &run_id,
        &stages,
        started.elapsed().as_secs_f64(),
        &warnings,
    );
    Ok(())
}

/// A benchmark's scores on one line: `pass@1 0.0000`, `accuracy 0.2500 (1/4)`, ….
fn scores_line(v: &Value) -> String {
    let mut parts = Vec::new();
    for (name, kind) in [("base", "humaneval"), ("plus", "humaneval+")] {
        for (k, x) in v[name].as_object().into_iter().flatten() {
            parts.push(format!("{kind} {k} {:.4}", x.as_f64().unwrap_or(0.0)));
        }
    }
    if let Some(a) = v["accuracy"].as_f64() {
        let of = v["questions"]
            .as_u64()
            .or(v["problems"].as_u64())
            .unwrap_or(0);
        parts.push(format!("accuracy {a:.4} ({}/{of})", v["correct"]));
    }
    if parts.is_empty() {
        v.to_string()
    } else {
        parts.join(", ")
    }
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

/// The end of a run as `davinci run` and `davinci runs watch` print it: PRs kept and dropped
/// by reason, samples, packed datasets, wall time per stage, where the outputs are, warnings.
pub fn print_summary(
    summary: &RunSummary,
    root: &str,
    run: &str,
    stages: &[StageStatus],
    wall: f64,
    warnings: &[String],
) {
    let (crawl, recon, manifest) = (&summary.crawl, &summary.reconstruct, &summary.manifest);
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
                    "packed {}/{}: {} documents, {} tokens, {} bins, padding {:.4}; longer than seq_len: {} dropped (too_long), {} split",
                    s["name"].as_str().unwrap_or("?"),
                    d["name"].as_str().unwrap_or("?"),
                    d["documents"],
                    d["tokens"],
                    d["bins"],
                    d["padding_ratio"].as_f64().unwrap_or(0.0),
                    d["drops"]["too_long"].as_u64().unwrap_or(0),
                    d["split_documents"].as_u64().unwrap_or(0)
                );
            }
        }
    }
    if let Some(t) = stages.iter().find(|s| s.stage == "train") {
        println!(
            "trained: {} steps, {} tokens; checkpoints in {}/runs/{run}/checkpoints/",
            t.counters.get("steps").copied().unwrap_or_default(),
            t.counters.get("tokens").copied().unwrap_or_default(),
            root.trim_end_matches('/')
        );
    }
    for (bench, scores) in &summary.evaluation {
        println!("evaluated {bench}: {}", scores_line(scores));
    }
    let times: Vec<String> = stages
        .iter()
        .map(|s| format!("{} {:.1}s", s.stage, s.wall_seconds))
        .collect();
    println!("wall time per stage: {}", times.join(", "));
    println!(
        "outputs: {}/runs/{run}/ (prs/, samples/, packed/, stats/{})",
        root.trim_end_matches('/'),
        if summary.evaluation.is_empty() {
            ""
        } else {
            ", eval/"
        }
    );
    for w in warnings {
        println!("warning: {w}");
    }
}
