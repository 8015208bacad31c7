//! Wiring to gRPC, queues and storage.
//!
//! * [`CrawlerService`]: the `Crawler` gRPC service (Start / Get / Watch / Cancel) over the
//!   runtime job registry; a job crawls its spec's repositories, GH Archive hours and
//!   discovered repositories in this process ([`sources::crawl`], as `davinci crawl` does).
//! * [`run_repo_worker`]: a queue worker on the [`REPO_TOPIC`] topic, one message per
//!   repository ([`RepoTask`]), so every replica takes its share of one crawl. A worker that
//!   dies mid-repository leaves its checkpoint; the redelivered task resumes from it. After each
//!   repository the worker rewrites `stats/crawl.json` from all checkpoints of the run
//!   ([`write_stats_from_checkpoints`]), so the file is complete once the last repository is.
use crate::filter::Subset;
use crate::github::{Discovery, GithubClient, GithubConfig};
use crate::httpcache::BlobCache;
use crate::pipeline::{self, CrawlConfig, CrawlStats, Event, RepoCheckpoint, RepoSpec, Sinks};
use crate::sources::{self, Inputs};
use davinci_proto::v1::crawler_server::Crawler as CrawlerRpc;
use davinci_proto::v1::{CrawlSpec, Job, JobRef, ProgressEvent, StartCrawlRequest};
use davinci_runtime::blob::{self, BlobStore, S3Config};
use davinci_runtime::jobs::{JobHandle, JobRegistry};
use davinci_runtime::queue::WorkQueue;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tonic::{Request, Response, Status};

/// Queue topic of per-repository crawl tasks.
pub const REPO_TOPIC: &str = "crawl-repos";

/// Applies a gRPC spec on top of the service's base config; bad fields are refused by name.
/// Discovery is asked for by any of `min_stars`, `top_n`, `languages`, `license_allow`.
pub fn config_from_spec(
    base: &CrawlConfig,
    run_id: &str,
    spec: &CrawlSpec,
) -> Result<(CrawlConfig, Inputs), Status> {
    let bad = |field: &str, why: String| Status::invalid_argument(format!("spec.{field}: {why}"));
    if spec.out.trim().is_empty() {
        return Err(bad("out", "the output storage URI is required".into()));
    }
    let discovery = (spec.min_stars > 0
        || spec.top_n > 0
        || !spec.languages.is_empty()
        || !spec.license_allow.is_empty())
    .then(|| Discovery {
        languages: spec.languages.clone(),
        min_stars: u64::from(spec.min_stars),
        license_allow: spec.license_allow.clone(),
        top_n: spec.top_n as usize,
    });
    if spec.repos.is_empty() && spec.gharchive.is_empty() && discovery.is_none() {
        return Err(bad(
            "repos",
            "nothing to crawl: give repository paths or clone URLs, GH Archive files (gharchive) or discovery fields (min_stars/top_n/languages/license_allow)".into(),
        ));
    }
    for (i, l) in spec.languages.iter().enumerate() {
        if l.trim().is_empty() || l.contains(char::is_whitespace) {
            return Err(bad(
                &format!("languages[{i}]"),
                format!("`{l}` is not a language name"),
            ));
        }
    }
    for (i, g) in spec.gharchive.iter().enumerate() {
        let scheme = g.split_once("://").map(|(s, _)| s);
        if g.trim().is_empty() || !matches!(scheme, None | Some("file") | Some("s3")) {
            return Err(bad(
                &format!("gharchive[{i}]"),
                format!("`{g}` is not a local path, file:// or s3:// URI"),
            ));
        }
    }
    let mut cfg = base.clone();
    cfg.run_id = if run_id.is_empty() {
        "batch".into()
    } else {
        run_id.to_string()
    };
    if cfg.run_id.contains('/') || cfg.run_id.contains("..") {
        return Err(Status::invalid_argument(format!(
            "run_id `{}` may not contain `/` or `..`",
            cfg.run_id
        )));
    }
    cfg.filter.subset = spec
        .subset
        .parse::<Subset>()
        .map_err(|e| bad("subset", e))?;
    if !spec.exclude_repos.is_empty() {
        for r in &spec.exclude_repos {
            crate::git::validate_full_name(r).map_err(|e| bad("exclude_repos", e.to_string()))?;
        }
        cfg.filter.exclude_repos = spec.exclude_repos.iter().cloned().collect();
    }
    cfg.filter
        .bot_logins
        .extend(spec.bot_logins.iter().cloned());
    cfg.max_prs_per_repo = spec.max_prs_per_repo as usize;
    for (i, r) in spec.repos.iter().enumerate() {
        if r.trim().is_empty() {
            return Err(bad(&format!("repos[{i}]"), "empty".into()));
        }
    }
    let inputs = Inputs {
        repos: spec
            .repos
            .iter()
            .map(|r| RepoSpec::new(r.clone()))
            .collect(),
        gharchive: spec.gharchive.clone(),
        discovery,
    };
    Ok((cfg, inputs))
}

/// The gRPC service.
pub struct CrawlerService {
    jobs: JobRegistry,
    s3: S3Config,
    base: CrawlConfig,
    github: Option<Arc<GithubClient>>,
}

impl CrawlerService {
    /// `github`: the client used for discovery, and for PR metadata when a spec asks for it
    /// (tokens and budgets are the server's, never the caller's). `base.web_url` is where
    /// repositories named by GH Archive or discovery are cloned from.
    pub fn new(
        jobs: JobRegistry,
        s3: S3Config,
        base: CrawlConfig,
        github: Option<Arc<GithubClient>>,
    ) -> Self {
        Self {
            jobs,
            s3,
            base,
            github,
        }
    }

    /// The client for a spec: one for `github_api_url` (its ETags kept beside the run's
    /// output, in `cache/github/`), else the server's.
    fn client_for(
        &self,
        spec: &CrawlSpec,
        store: &Arc<dyn BlobStore>,
    ) -> Result<Arc<GithubClient>, Status> {
        if spec.github_api_url.is_empty() {
            return self.github.clone().ok_or_else(|| {
                Status::failed_precondition(
                    "this crawler has no GitHub client configured (needed for `github` and discovery); set spec.github_api_url",
                )
            });
        }
        let gh_cfg = GithubConfig {
            api_url: spec.github_api_url.clone(),
            ..Default::default()
        };
        let budget = Arc::new(crate::budget::MemoryBudget::default());
        let client = GithubClient::new(gh_cfg, GithubClient::tokens_from_env(), budget)
            .map_err(|e| Status::invalid_argument(format!("spec.github_api_url: {e:#}")))?;
        Ok(Arc::new(
            client.with_cache(Arc::new(BlobCache::new(store.clone()))),
        ))
    }
}

fn job_id(r: Request<JobRef>) -> Result<String, Status> {
    let id = r.into_inner().job_id;
    if id.is_empty() {
        return Err(Status::invalid_argument("job_id is required"));
    }
    Ok(id)
}

/// One crawl job: resolves the inputs, crawls, reports progress and counters to `handle`;
/// returns the shard and stats URIs.
async fn run_job(
    handle: JobHandle,
    cfg: CrawlConfig,
    inputs: Inputs,
    store: Arc<dyn BlobStore>,
    api: Option<Arc<GithubClient>>,
    enrich: bool,
    s3: S3Config,
) -> anyhow::Result<Vec<String>> {
    let mut sinks = Sinks::new(store.clone());
    sinks.github = api.clone().filter(|_| enrich);
    let cancel = sinks.cancel.clone();
    let token = handle.cancel_token();
    tokio::spawn(async move {
        token.cancelled().await;
        cancel.store(true, Ordering::SeqCst);
    });
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    sinks.events = Some(Arc::new(move |e| {
        let _ = tx.send(e);
    }));
    let h2 = handle.clone();
    let reporter = tokio::spawn(async move {
        let (mut done, mut total) = (0u64, 0u64);
        while let Some(e) = rx.recv().await {
            match e {
                Event::RepoStarted { candidates, .. } => total += candidates,
                Event::PrDone {
                    dropped,
                    repo,
                    api_mismatch,
                    ..
                } => {
                    done += 1;
                    match dropped {
                        Some(why) => h2.count(&format!("drop.{why}"), 1).await,
                        None => h2.count("records_out", 1).await,
                    }
                    if api_mismatch {
                        h2.count("api_mismatched", 1).await;
                    }
                    if done % 16 == 0 {
                        h2.progress(done, total, &repo).await;
                    }
                }
                Event::ShardWritten { .. } => h2.count("shards", 1).await,
                Event::RepoFailed { .. } => h2.count("repos_failed", 1).await,
                Event::RepoDone { .. } => h2.count("repos_done", 1).await,
                Event::ArchiveRead { counts, .. } => {
                    h2.count("gharchive_candidates", counts.out).await
                }
                Event::Discovered { repos } => {
                    h2.count("repos_discovered", repos.len() as u64).await
                }
            }
        }
        h2.progress(done, total, "done").await;
    });
    let stats = sources::crawl(&cfg, &inputs, api.as_deref(), &s3, &sinks).await;
    drop(sinks);
    let _ = reporter.await;
    let stats = stats?;
    let mut outputs: Vec<String> = stats.shards.iter().map(|s| store.uri(&s.key)).collect();
    outputs.push(store.uri(&pipeline::stats_key(&cfg.run_id)));
    if !stats.failed_repos.is_empty() && stats.repos.is_empty() {
        anyhow::bail!("every repository failed: {:?}", stats.failed_repos);
    }
    Ok(outputs)
}

#[tonic::async_trait]
impl CrawlerRpc for CrawlerService {
    async fn start_crawl(
        &self,
        request: Request<StartCrawlRequest>,
    ) -> Result<Response<Job>, Status> {
        let req = request.into_inner();
        let spec = req
            .spec
            .ok_or_else(|| Status::invalid_argument("spec is required"))?;
        let (cfg, inputs) = config_from_spec(&self.base, &req.run_id, &spec)?;
        let store = blob::open(&spec.out, &self.s3)
            .await
            .map_err(|e| Status::invalid_argument(format!("spec.out: {e}")))?;
        let api = if spec.github || inputs.discovery.is_some() {
            Some(self.client_for(&spec, &store)?)
        } else {
            None
        };
        let spec_json = serde_json::json!({
            "repos": spec.repos, "out": spec.out, "subset": spec.subset, "github": spec.github,
            "github_api_url": spec.github_api_url, "exclude_repos": spec.exclude_repos,
            "bot_logins": spec.bot_logins, "max_prs_per_repo": spec.max_prs_per_repo,
            "gharchive": spec.gharchive, "languages": spec.languages,
            "min_stars": spec.min_stars, "top_n": spec.top_n, "license_allow": spec.license_allow,
        })
        .to_string();
        let (s3, enrich) = (self.s3.clone(), spec.github);
        let job = self
            .jobs
            .spawn("crawl", &cfg.run_id.clone(), spec_json, move |handle| {
                Box::pin(run_job(handle, cfg, inputs, store, api, enrich, s3))
            })
            .await?;
        Ok(Response::new(job))
    }

    async fn get_crawl(&self, request: Request<JobRef>) -> Result<Response<Job>, Status> {
        Ok(Response::new(self.jobs.get(&job_id(request)?).await?))
    }

    type WatchCrawlStream =
        Pin<Box<dyn futures::Stream<Item = Result<ProgressEvent, Status>> + Send>>;

    async fn watch_crawl(
        &self,
        request: Request<JobRef>,
    ) -> Result<Response<Self::WatchCrawlStream>, Status> {
        let stream = self.jobs.watch(&job_id(request)?).await?;
        Ok(Response::new(Box::pin(stream.map(Ok))))
    }

    async fn cancel_crawl(&self, request: Request<JobRef>) -> Result<Response<Job>, Status> {
        Ok(Response::new(self.jobs.cancel(&job_id(request)?).await?))
    }
}

/// One repository of a distributed crawl (the queue message; small, no payload).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RepoTask {
    pub run_id: String,
    /// Storage root the run writes to.
    pub out: String,
    pub source: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub only: Option<Vec<u64>>,
    #[serde(default)]
    pub subset: Subset,
    /// `None`: the worker's default exclusion list.
    #[serde(default)]
    pub exclude_repos: Option<Vec<String>>,
    #[serde(default)]
    pub max_prs_per_repo: usize,
}

/// Publishes one task per repository of `spec` on [`REPO_TOPIC`].
pub async fn publish_repo_tasks(
    queue: &dyn WorkQueue,
    run_id: &str,
    spec: &CrawlSpec,
) -> anyhow::Result<usize> {
    let subset: Subset = spec
        .subset
        .parse()
        .map_err(|e: String| anyhow::anyhow!(e))?;
    for r in &spec.repos {
        let task = RepoTask {
            run_id: run_id.to_string(),
            out: spec.out.clone(),
            source: r.clone(),
            name: None,
            only: None,
            subset,
            exclude_repos: (!spec.exclude_repos.is_empty()).then(|| spec.exclude_repos.clone()),
            max_prs_per_repo: spec.max_prs_per_repo as usize,
        };
        queue
            .publish(REPO_TOPIC, &serde_json::to_vec(&task)?)
            .await?;
    }
    Ok(spec.repos.len())
}

/// Totals over every repository checkpoint of `run` (complete or not), written as
/// `stats/crawl.json`. Idempotent: any worker may call it at any time.
pub async fn write_stats_from_checkpoints(
    store: &dyn BlobStore,
    run: &str,
) -> anyhow::Result<CrawlStats> {
    let mut stats = CrawlStats {
        stage: "crawl".into(),
        run_id: run.to_string(),
        ..Default::default()
    };
    for m in store
        .list(&format!("runs/{run}/crawl/checkpoints/"))
        .await?
    {
        let cp: RepoCheckpoint = serde_json::from_slice(&store.get(&m.key).await?)?;
        stats.add_repo(cp);
    }
    store
        .put(
            &pipeline::stats_key(run),
            serde_json::to_vec_pretty(&stats)?.into(),
        )
        .await?;
    Ok(stats)
}

/// Takes repository tasks from [`REPO_TOPIC`] until `shutdown`; each is crawled from its
/// checkpoint, then acked. A failure is nacked with the error (retried after 30 s, then
/// dead-lettered by the queue after its last attempt).
pub async fn run_repo_worker(
    queue: Arc<dyn WorkQueue>,
    consumer: &str,
    s3: S3Config,
    base: CrawlConfig,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<u64> {
    let mut done = 0u64;
    while !shutdown.is_cancelled() {
        let received = tokio::select! {
            r = queue.receive(REPO_TOPIC, consumer, Duration::from_secs(2)) => r?,
            _ = shutdown.cancelled() => break,
        };
        let Some(d) = received else { continue };
        let outcome: anyhow::Result<()> = async {
            let task: RepoTask = serde_json::from_slice(&d.payload)
                .map_err(|e| anyhow::anyhow!("bad repo task: {e}"))?;
            let store = blob::open(&task.out, &s3).await?;
            let mut cfg = base.clone();
            cfg.run_id = task.run_id.clone();
            cfg.filter.subset = task.subset;
            if let Some(ex) = &task.exclude_repos {
                cfg.filter.exclude_repos = ex.iter().cloned().collect();
            }
            cfg.max_prs_per_repo = task.max_prs_per_repo;
            let spec = RepoSpec {
                source: task.source.clone(),
                name: task.name.clone(),
                only: task.only.as_ref().map(|o| o.iter().copied().collect()),
            };
            let mut sinks = Sinks::new(store.clone());
            sinks.queue = Some(queue.clone()); // shards are announced on `prs`
            let stop = sinks.cancel.clone();
            let sd = shutdown.clone();
            let watcher = tokio::spawn(async move {
                sd.cancelled().await;
                stop.store(true, Ordering::SeqCst);
            });
            let r = pipeline::crawl_one(&cfg, &spec, &sinks).await;
            watcher.abort();
            r?;
            write_stats_from_checkpoints(store.as_ref(), &cfg.run_id).await?;
            Ok(())
        }
        .await;
        match outcome {
            Ok(()) => {
                queue.ack(&d).await?;
                done += 1;
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), attempt = d.attempt, "repository crawl failed");
                queue
                    .nack(&d, &format!("{e:#}"), Some(Duration::from_secs(30)))
                    .await?;
            }
        }
    }
    Ok(done)
}
