//! Wiring to gRPC, queues and storage.
//!
//! * [`CrawlerService`]: the `Crawler` gRPC service (Start / Get / Watch / Cancel) over the
//!   runtime job registry; a job crawls its spec's repositories, GH Archive hours and
//!   discovered repositories in this process ([`sources::crawl`], as `davinci crawl` does).
//! * [`worker`]: a queue worker on the [`REPO_TOPIC`] topic. A job of a run on a service with a
//!   queue is shared by every replica ([`davinci_runtime::fanout`]): one item per repository,
//!   each crawled by whichever worker takes it; a worker that dies mid-repository leaves its
//!   checkpoint, and the redelivered item resumes from it.
use crate::filter::Subset;
use crate::github::{Discovery, GithubClient, GithubConfig};
use crate::httpcache::BlobCache;
use crate::pipeline::{self, CrawlConfig, CrawlStats, Event, RepoCheckpoint, RepoSpec, Sinks};
use crate::sources::{self, Inputs};
use davinci_proto::v1::crawler_server::Crawler as CrawlerRpc;
use davinci_proto::v1::{CrawlSpec, Job, JobRef, ProgressEvent, StartCrawlRequest};
use davinci_runtime::blob::{self, BlobStore, S3Config};
use davinci_runtime::fanout::{self, Claimed, Item, WaitOptions, Work};
use davinci_runtime::jobs::{JobHandle, JobRegistry};
use davinci_runtime::queue::{ClaimCheck, WorkQueue};
use davinci_runtime::shard;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// Queue topic of per-repository crawl tasks.
pub const REPO_TOPIC: &str = "crawl-repos";

/// Most PRs one GraphQL metadata query may ask for (a bigger query risks GitHub's per-query
/// node and time limits).
pub const MAX_GITHUB_BATCH: u32 = 100;

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
    if let Some(n) = spec.github_batch {
        if n > MAX_GITHUB_BATCH {
            return Err(bad(
                "github_batch",
                format!("{n} PRs per GraphQL query is more than {MAX_GITHUB_BATCH}"),
            ));
        }
        cfg.api_batch = (n > 0).then(|| crate::batch::BatchPages {
            prs: n as usize,
            ..Default::default()
        });
    }
    if spec.api_cross_check && !spec.github {
        return Err(bad(
            "api_cross_check",
            "cross-checking against the API needs `github`".into(),
        ));
    }
    cfg.api_cross_check = spec.api_cross_check;
    for (i, r) in spec.repos.iter().enumerate() {
        if r.trim().is_empty() {
            return Err(bad(&format!("repos[{i}]"), "empty".into()));
        }
    }
    for (source, name) in &spec.repo_names {
        crate::git::validate_full_name(name)
            .map_err(|e| bad(&format!("repo_names[{source}]"), e.to_string()))?;
    }
    let inputs = Inputs {
        repos: spec
            .repos
            .iter()
            .map(|r| RepoSpec {
                name: spec.repo_names.get(r).cloned(),
                ..RepoSpec::new(r.clone())
            })
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
    queue: Option<Arc<dyn WorkQueue>>,
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
            queue: None,
        }
    }

    /// Jobs of a run are shared with every replica through [`REPO_TOPIC`].
    pub fn with_queue(mut self, queue: Arc<dyn WorkQueue>) -> Self {
        self.queue = Some(queue);
        self
    }
}

/// The client for a spec: the server's (tokens pooled across replicas), unless the spec names
/// another API, which gets a client of its own (budget in this process, ETags beside the run's
/// output in `cache/github/`).
fn client_for(
    server: Option<Arc<GithubClient>>,
    spec: &CrawlSpec,
    store: &Arc<dyn BlobStore>,
) -> Result<Arc<GithubClient>, Status> {
    let same = |c: &GithubClient| {
        spec.github_api_url.trim_end_matches('/') == c.api_url().trim_end_matches('/')
    };
    if let Some(c) = server.as_ref().filter(|c| same(c)) {
        return Ok(c.clone());
    }
    if spec.github_api_url.is_empty() {
        return server.ok_or_else(|| {
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
            Some(client_for(self.github.clone(), &spec, &store)?)
        } else {
            None
        };
        let spec_json = serde_json::json!({
            "repos": spec.repos, "out": spec.out, "subset": spec.subset, "github": spec.github,
            "github_api_url": spec.github_api_url, "exclude_repos": spec.exclude_repos,
            "bot_logins": spec.bot_logins, "max_prs_per_repo": spec.max_prs_per_repo,
            "github_batch": spec.github_batch, "api_cross_check": spec.api_cross_check,
            "gharchive": spec.gharchive, "languages": spec.languages,
            "min_stars": spec.min_stars, "top_n": spec.top_n, "license_allow": spec.license_allow,
        })
        .to_string();
        let (s3, enrich) = (self.s3.clone(), spec.github);
        let shared = self.queue.clone().filter(|_| !req.run_id.is_empty());
        let job = self
            .jobs
            .spawn(
                "crawl",
                &cfg.run_id.clone(),
                spec_json,
                move |handle| match shared {
                    Some(q) => Box::pin(run_shared(handle, cfg, inputs, spec, store, api, q, s3)),
                    None => Box::pin(run_job(handle, cfg, inputs, store, api, enrich, s3)),
                },
            )
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

/// What crawl workers need of a shared job; stored in its work directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CrawlWork {
    pub run_id: String,
    pub out: String,
    pub subset: String,
    pub exclude_repos: Vec<String>,
    pub bot_logins: Vec<String>,
    pub max_prs_per_repo: u32,
    pub github: bool,
    pub github_api_url: String,
    /// PRs per GraphQL metadata query (`None`: the crawler's default; 0: one at a time).
    #[serde(default)]
    pub github_batch: Option<u32>,
    #[serde(default)]
    pub api_cross_check: bool,
    /// The repositories, by part name.
    pub repos: BTreeMap<String, RepoEntry>,
}

/// One repository of a shared crawl.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoEntry {
    pub source: String,
    pub name: Option<String>,
    pub only: Option<BTreeSet<u64>>,
}

impl CrawlWork {
    fn of(run_id: &str, spec: &CrawlSpec) -> Self {
        Self {
            run_id: run_id.to_string(),
            out: spec.out.clone(),
            subset: spec.subset.clone(),
            exclude_repos: spec.exclude_repos.clone(),
            bot_logins: spec.bot_logins.clone(),
            max_prs_per_repo: spec.max_prs_per_repo,
            github: spec.github,
            github_api_url: spec.github_api_url.clone(),
            github_batch: spec.github_batch,
            api_cross_check: spec.api_cross_check,
            repos: BTreeMap::new(),
        }
    }

    /// The spec of a one-repository crawl of `source` under this job's settings.
    fn spec_for(&self, source: &str) -> CrawlSpec {
        CrawlSpec {
            repos: vec![source.to_string()],
            out: self.out.clone(),
            subset: self.subset.clone(),
            exclude_repos: self.exclude_repos.clone(),
            bot_logins: self.bot_logins.clone(),
            max_prs_per_repo: self.max_prs_per_repo,
            github: self.github,
            github_api_url: self.github_api_url.clone(),
            github_batch: self.github_batch,
            api_cross_check: self.api_cross_check,
            ..Default::default()
        }
    }
}

/// A crawl shared by every replica: resolves the inputs here, then announces one item per
/// repository on [`REPO_TOPIC`]; workers crawl them and commit each repository's final
/// checkpoint as its part. The stats are then assembled in input order, so they (and the
/// shards, which are per repository) are those of a one-process crawl. A repository that
/// fails its attempts is reported in `failed_repos`, as in a one-process crawl.
#[allow(clippy::too_many_arguments)]
async fn run_shared(
    handle: JobHandle,
    cfg: CrawlConfig,
    inputs: Inputs,
    spec: CrawlSpec,
    store: Arc<dyn BlobStore>,
    api: Option<Arc<GithubClient>>,
    queue: Arc<dyn WorkQueue>,
    s3: S3Config,
) -> anyhow::Result<Vec<String>> {
    let sinks = Sinks::new(store.clone());
    let resolved = sources::resolve(&cfg, &inputs, api.as_deref(), &s3, &sinks).await?;
    let mut work_spec = CrawlWork::of(&cfg.run_id, &spec);
    let mut items = Vec::new();
    for r in &resolved.repos {
        let entry = RepoEntry {
            source: r.source.clone(),
            name: r.name.clone(),
            only: r.only.clone(),
        };
        let part = shard::sha256_hex(&serde_json::to_vec(&entry)?)[..16].to_string();
        if work_spec.repos.insert(part.clone(), entry).is_some() {
            continue; // named twice alike: crawled once
        }
        items.push(Item {
            part,
            claim: ClaimCheck {
                run_id: cfg.run_id.clone(),
                topic: REPO_TOPIC.into(),
                uri: r.source.clone(),
                sha256: String::new(),
                records: r.only.as_ref().map_or(0, |o| o.len() as u64),
                traceparent: davinci_runtime::telemetry::current_traceparent(),
                work: None,
                part: None,
            },
        });
    }
    let work = Work::open(
        &Work::dir_uri(&spec.out, &cfg.run_id, "crawl", &work_spec),
        &s3,
    )
    .await?;
    work.put_spec(&work_spec).await?;
    let total = items.len() as u64;
    let opts = WaitOptions {
        fail_on_dead_letter: false,
        ..Default::default()
    };
    let h = &handle;
    let failed = fanout::distribute(
        queue.as_ref(),
        REPO_TOPIC,
        &work,
        &items,
        &handle.cancel_token(),
        &opts,
        move |done, _| h.progress(done, total, "repositories"),
    )
    .await?;

    let mut stats = CrawlStats {
        stage: "crawl".into(),
        run_id: cfg.run_id.clone(),
        gharchive: resolved.gharchive,
        warnings: resolved.warnings,
        discovered: resolved.discovered,
        ..Default::default()
    };
    for it in &items {
        match work.part::<RepoCheckpoint>(&it.part).await? {
            Some(cp) => stats.add_repo(cp),
            None => {
                let error = failed
                    .iter()
                    .find(|f| f.part == it.part)
                    .map_or_else(|| "no checkpoint".to_string(), |f| f.error.clone());
                stats.failed_repos.insert(it.claim.uri.clone(), error);
            }
        }
    }
    handle.count("records_out", stats.totals.out).await;
    for (why, n) in &stats.totals.drops {
        handle.count(&format!("drop.{why}"), *n).await;
    }
    handle.count("shards", stats.shards.len() as u64).await;
    handle.count("repos_done", stats.repos.len() as u64).await;
    if !stats.failed_repos.is_empty() {
        handle
            .count("repos_failed", stats.failed_repos.len() as u64)
            .await;
    }
    pipeline::write_stats(&sinks, &stats).await?;
    if !stats.failed_repos.is_empty() && stats.repos.is_empty() {
        anyhow::bail!("every repository failed: {:?}", stats.failed_repos);
    }
    let mut outputs: Vec<String> = stats.shards.iter().map(|s| store.uri(&s.key)).collect();
    outputs.push(store.uri(&pipeline::stats_key(&cfg.run_id)));
    Ok(outputs)
}

/// Crawls one claimed repository and commits its final checkpoint as the part.
async fn crawl_part(
    c: Claimed,
    base: &CrawlConfig,
    github: Option<Arc<GithubClient>>,
    s3: &S3Config,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let w: CrawlWork = c.work.spec().await?;
    let entry = w
        .repos
        .get(&c.part)
        .ok_or_else(|| anyhow::anyhow!("{}: no repository {} in the job", c.work.uri, c.part))?;
    let spec = w.spec_for(&entry.source);
    // A job whose spec the server refuses fails the same way on every attempt.
    let (cfg, _) = config_from_spec(base, &w.run_id, &spec)
        .map_err(|e| davinci_runtime::retry::permanent(anyhow::anyhow!("{}", e.message())))?;
    let store = blob::open(&w.out, s3).await?;
    let mut sinks = Sinks::new(store.clone());
    if w.github {
        sinks.github =
            Some(client_for(github, &spec, &store).map_err(|e| {
                davinci_runtime::retry::permanent(anyhow::anyhow!("{}", e.message()))
            })?);
    }
    let stop = sinks.cancel.clone();
    let sd = shutdown.clone();
    let watcher = tokio::spawn(async move {
        sd.cancelled().await;
        stop.store(true, Ordering::SeqCst);
    });
    let repo = RepoSpec {
        source: entry.source.clone(),
        name: entry.name.clone(),
        only: entry.only.clone(),
    };
    let r = pipeline::crawl_one(&cfg, &repo, &sinks).await;
    watcher.abort();
    let cp = r?;
    c.work.commit_part(&c.part, &cp).await
}

/// Takes [`REPO_TOPIC`] items of shared crawls until `shutdown`: each repository is crawled
/// from its checkpoint (a worker killed mid-repository leaves one; the redelivered item resumes
/// from it). `github`: the server's client, for jobs that ask for the API without naming one.
pub async fn worker(
    queue: Arc<dyn WorkQueue>,
    base: CrawlConfig,
    github: Option<Arc<GithubClient>>,
    consumer: String,
    s3: S3Config,
    shutdown: CancellationToken,
) -> anyhow::Result<u64> {
    let sd = shutdown.clone();
    fanout::serve_topic(queue, REPO_TOPIC, &consumer, s3.clone(), shutdown, |c| {
        crawl_part(c, &base, github.clone(), &s3, &sd)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> CrawlSpec {
        CrawlSpec {
            repos: vec!["/src/r".into()],
            out: "file:///out".into(),
            github: true,
            github_batch: Some(7),
            api_cross_check: true,
            ..Default::default()
        }
    }

    #[test]
    fn batching_and_cross_check_come_from_the_spec() {
        let base = CrawlConfig::new("x");
        let (cfg, _) = config_from_spec(&base, "r1", &spec()).unwrap();
        assert_eq!(cfg.api_batch.as_ref().map(|b| b.prs), Some(7));
        assert!(cfg.api_cross_check);
        // 0: one PR at a time; unset: the crawler's own setting.
        let one = CrawlSpec {
            github_batch: Some(0),
            ..spec()
        };
        assert!(
            config_from_spec(&base, "r1", &one)
                .unwrap()
                .0
                .api_batch
                .is_none()
        );
        let unset = CrawlSpec {
            github_batch: None,
            api_cross_check: false,
            ..spec()
        };
        let (cfg, _) = config_from_spec(&base, "r1", &unset).unwrap();
        assert_eq!(cfg.api_batch, base.api_batch);
        assert!(!cfg.api_cross_check);
        // Refused by name.
        let e = config_from_spec(
            &base,
            "r1",
            &CrawlSpec {
                github_batch: Some(500),
                ..spec()
            },
        )
        .unwrap_err();
        assert!(e.message().contains("spec.github_batch"), "{e:?}");
        let e = config_from_spec(
            &base,
            "r1",
            &CrawlSpec {
                github: false,
                ..spec()
            },
        )
        .unwrap_err();
        assert!(e.message().contains("spec.api_cross_check"), "{e:?}");
        // A shared crawl hands both to the workers that crawl its repositories.
        let per_repo = CrawlWork::of("r1", &spec()).spec_for("/src/r");
        assert_eq!(
            (per_repo.github_batch, per_repo.api_cross_check),
            (Some(7), true)
        );
        let (cfg, _) = config_from_spec(&base, "r1", &per_repo).unwrap();
        assert_eq!(cfg.api_batch.map(|b| b.prs), Some(7));
    }
}
