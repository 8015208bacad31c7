//! A crawl over git repositories: candidates → records → filters → shards, resumable.
//!
//! Storage layout under the store root (DESIGN.md §3):
//! * `runs/{run}/prs/{sha16}.jsonl.zst`: kept PRs, at most `shard_records` per shard, each shard
//!   holding consecutive PRs (by number) of one repository, named by content;
//! * `runs/{run}/crawl/checkpoints/{owner}__{name}.json`: per repository, the last PR number
//!   whose outcome is final (written or dropped), the shards so far and the counts so far;
//! * `runs/{run}/stats/crawl.json`: totals, written last (the stage's commit point).
//!
//! A crawl stopped at any point and started again resumes each repository after its
//! checkpoint: the PRs after it are processed again in the same order, so shard boundaries,
//! shard bytes and counts come out as in an uninterrupted run.
use crate::batch::BatchPages;
use crate::crosscheck::{self, ApiCheckCounts};
use crate::filter::{Counts, FilterConfig};
use crate::git::{self, Extracted, GitOptions, GitSource};
use crate::github::{ApiPull, PullState};
use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use davinci_core::pr::PullRequest;
use davinci_runtime::blob::{BlobError, BlobStore};
use davinci_runtime::shard;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Clone)]
pub struct CrawlConfig {
    pub run_id: String,
    /// PR records per shard.
    pub shard_records: usize,
    pub git: GitOptions,
    pub filter: FilterConfig,
    /// Where clone URLs are cloned to.
    pub cache_dir: PathBuf,
    /// Only the newest N candidates of each repository (0: all).
    pub max_prs_per_repo: usize,
    /// Where repositories named by GH Archive or discovery are cloned from
    /// (`{web_url}/{owner}/{name}.git`).
    pub web_url: String,
    /// GitHub metadata (with a client in [`Sinks::github`]): `Some` fetches it for many PRs
    /// per GraphQL query ([`crate::batch`]), `None` one PR at a time (REST `pulls/{n}`, one
    /// GraphQL query, REST per linked issue and the repository).
    pub api_batch: Option<BatchPages>,
    /// Also hold each kept PR against the REST API's commits and files ([`crosscheck`]): two
    /// or more REST requests per PR, which bounds a token to about 2,500 PRs an hour.
    pub api_cross_check: bool,
}

impl CrawlConfig {
    pub fn new(run_id: impl Into<String>) -> Self {
        Self {
            run_id: run_id.into(),
            shard_records: 256,
            git: GitOptions::default(),
            filter: FilterConfig::default(),
            cache_dir: std::env::temp_dir().join("davinci-crawl-clones"),
            max_prs_per_repo: 0,
            web_url: "https://github.com".into(),
            api_batch: Some(BatchPages::default()),
            api_cross_check: false,
        }
    }
}

/// One git repository to crawl.
#[derive(Debug, Clone)]
pub struct RepoSpec {
    /// Local path or clone URL.
    pub source: String,
    /// `owner/name` override (else from the `origin` remote).
    pub name: Option<String>,
    /// Only these PR numbers (e.g. from GH Archive); numbers git does not show as merged are
    /// counted as `not_found_in_git`.
    pub only: Option<std::collections::BTreeSet<u64>>,
}

impl RepoSpec {
    pub fn new(source: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            name: None,
            only: None,
        }
    }
}

/// One shard written by the crawl.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub key: String,
    pub sha256: String,
    pub records: u64,
    pub first_number: u64,
    pub last_number: u64,
}

/// Per-repository progress, persisted after every shard.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RepoCheckpoint {
    pub repo: String,
    /// Every candidate with a number ≤ this has its outcome in `shards`/`counts`.
    pub done_through: Option<u64>,
    pub complete: bool,
    pub candidates: u64,
    pub shards: Vec<ShardInfo>,
    pub counts: Counts,
    #[serde(default, skip_serializing_if = "ApiCheckCounts::is_empty")]
    pub api_check: ApiCheckCounts,
}

/// `stats/crawl.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CrawlStats {
    pub stage: String,
    pub run_id: String,
    #[serde(flatten)]
    pub totals: Counts,
    pub repos: BTreeMap<String, Counts>,
    /// Repositories that failed as a whole (bad path, unreadable history), with the error.
    pub failed_repos: BTreeMap<String, String>,
    pub shards: Vec<ShardInfo>,
    /// The GitHub API's commits and files held against git (only with the API).
    #[serde(default, skip_serializing_if = "ApiCheckCounts::is_empty")]
    pub api_check: ApiCheckCounts,
    /// Per GH Archive file: pull-request events in, candidates out, drops by reason, events
    /// and candidates by shape.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub gharchive: BTreeMap<String, crate::gharchive::ArchiveFileStats>,
    /// Sources that gave nothing where something was expected (a GH Archive file with
    /// pull-request events but no merge candidate).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Repositories found by discovery (`owner/name`, most starred first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub discovered: Vec<String>,
}

impl CrawlStats {
    /// Adds one repository's final checkpoint.
    pub fn add_repo(&mut self, cp: RepoCheckpoint) {
        self.totals.add(&cp.counts);
        self.repos.entry(cp.repo).or_default().add(&cp.counts);
        self.api_check.add(&cp.api_check);
        self.shards.extend(cp.shards);
    }
}

/// What the crawl reports as it goes (for progress bars and job counters).
#[derive(Debug, Clone)]
pub enum Event {
    RepoStarted {
        repo: String,
        candidates: u64,
        resumed_from: Option<u64>,
    },
    PrDone {
        repo: String,
        number: u64,
        dropped: Option<String>,
        /// The API's commits or files disagree with git (see `extra.api_check`).
        api_mismatch: bool,
    },
    ShardWritten {
        key: String,
        records: u64,
    },
    RepoDone {
        repo: String,
        counts: Counts,
    },
    RepoFailed {
        source: String,
        error: String,
    },
    /// A GH Archive file was read.
    ArchiveRead {
        source: String,
        counts: Counts,
    },
    /// Discovery found these repositories.
    Discovered {
        repos: Vec<String>,
    },
}

pub type EventSink = Arc<dyn Fn(Event) + Send + Sync>;

/// Storage, queue and control knobs for one crawl.
#[derive(Clone)]
pub struct Sinks {
    pub store: Arc<dyn BlobStore>,
    pub events: Option<EventSink>,
    /// Set to stop at the next PR; nothing after that point is written.
    pub cancel: Arc<AtomicBool>,
    /// When set, every extracted PR is enriched from the GitHub API (body, author type and
    /// association, labels, linked issues, reviews, comments) before the filters run, in
    /// batches ([`CrawlConfig::api_batch`]); with [`CrawlConfig::api_cross_check`] each kept PR
    /// is cross-checked with the API's commits and files ([`crosscheck`]); PR numbers asked
    /// for (`RepoSpec::only`) that no commit message names are located through the API.
    pub github: Option<Arc<crate::github::GithubClient>>,
}

impl Sinks {
    pub fn new(store: Arc<dyn BlobStore>) -> Self {
        Self {
            store,
            events: None,
            cancel: Arc::new(AtomicBool::new(false)),
            github: None,
        }
    }
    pub(crate) fn emit(&self, e: Event) {
        if let Some(f) = &self.events {
            f(e);
        }
    }
}

pub fn checkpoint_key(run: &str, repo: &str) -> String {
    format!(
        "runs/{run}/crawl/checkpoints/{}.json",
        repo.replace('/', "__")
    )
}

pub fn stats_key(run: &str) -> String {
    format!("runs/{run}/stats/crawl.json")
}

/// Crawls every repository, then writes `stats/crawl.json`. A repository that cannot be opened
/// is recorded in `failed_repos` and the others go on; cancellation stops with an error.
pub async fn crawl_git(cfg: &CrawlConfig, repos: &[RepoSpec], sinks: &Sinks) -> Result<CrawlStats> {
    let mut stats = CrawlStats {
        stage: "crawl".into(),
        run_id: cfg.run_id.clone(),
        ..Default::default()
    };
    crawl_repos(cfg, repos, sinks, &mut stats).await?;
    write_stats(sinks, &stats).await?;
    Ok(stats)
}

/// Crawls every repository into `stats` (without writing it).
pub(crate) async fn crawl_repos(
    cfg: &CrawlConfig,
    repos: &[RepoSpec],
    sinks: &Sinks,
    stats: &mut CrawlStats,
) -> Result<()> {
    for spec in repos {
        match crawl_one(cfg, spec, sinks).await {
            Ok(cp) => stats.add_repo(cp),
            Err(e) if sinks.cancel.load(Ordering::SeqCst) => return Err(e),
            Err(e) => {
                let msg = format!("{e:#}");
                sinks.emit(Event::RepoFailed {
                    source: spec.source.clone(),
                    error: msg.clone(),
                });
                stats.failed_repos.insert(spec.source.clone(), msg);
            }
        }
    }
    Ok(())
}

/// Writes `stats/crawl.json` (the stage's commit point).
pub(crate) async fn write_stats(sinks: &Sinks, stats: &CrawlStats) -> Result<()> {
    let json = serde_json::to_vec_pretty(stats)?;
    sinks
        .store
        .put(&stats_key(&stats.run_id), Bytes::from(json))
        .await
        .context("writing stats/crawl.json")?;
    Ok(())
}

async fn load_checkpoint(store: &dyn BlobStore, key: &str) -> Result<Option<RepoCheckpoint>> {
    match store.get(key).await {
        Ok(b) => {
            Ok(Some(serde_json::from_slice(&b).with_context(|| {
                format!("checkpoint {key} is not valid JSON")
            })?))
        }
        Err(BlobError::NotFound(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Messages from the git thread (gix repositories are not `Send`, so one thread owns the
/// repository for the whole crawl of it and hands results over a bounded channel).
enum FromGit {
    /// The repository is open; `missing` are asked-for numbers no commit message names.
    Opened { repo: String, missing: Vec<u64> },
    /// The final candidate list is known.
    Counted {
        candidates: u64,
        dups: u64,
        /// Asked-for numbers neither history nor the API's merge commits gave.
        not_found: Vec<u64>,
    },
    Done {
        number: u64,
        result: Result<Extracted>,
    },
}

/// The async side's answer to [`FromGit::Opened`].
struct Resume {
    done_through: Option<u64>,
    /// Merged PRs the API describes, for the numbers in `missing`.
    located: Vec<ApiPull>,
}

/// Crawls one repository from its checkpoint on; returns its final checkpoint.
pub async fn crawl_one(
    cfg: &CrawlConfig,
    spec: &RepoSpec,
    sinks: &Sinks,
) -> Result<RepoCheckpoint> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<FromGit>(4);
    let (resume_tx, resume_rx) = std::sync::mpsc::channel::<Option<Resume>>();
    let (cfg2, spec2) = (cfg.clone(), spec.clone());
    let worker = tokio::task::spawn_blocking(move || -> Result<()> {
        let dir = git::prepare(&spec2.source, &cfg2.cache_dir)?;
        let mut src = GitSource::open(&dir, spec2.name.as_deref(), cfg2.git.clone())?;
        let (mut cands, mut dups) = src.candidates()?;
        let mut missing = Vec::new();
        if let Some(only) = &spec2.only {
            let have: std::collections::BTreeSet<u64> = cands.iter().map(|c| c.number).collect();
            missing = only.difference(&have).copied().collect();
            cands.retain(|c| only.contains(&c.number));
            dups = 0; // duplicates of numbers nobody asked for are not this crawl's business
        }
        let opened = FromGit::Opened {
            repo: src.full_name.clone(),
            missing: missing.clone(),
        };
        if tx.blocking_send(opened).is_err() {
            return Ok(());
        }
        // the async side answers with the checkpoint position (None: nothing more to do)
        let Ok(Some(resume)) = resume_rx.recv() else {
            return Ok(());
        };
        for p in &resume.located {
            if let Some(c) = src.candidate_from_api(p)? {
                missing.retain(|n| *n != c.number);
                cands.push(c);
            }
        }
        cands.sort_by_key(|c| c.number);
        if cfg2.max_prs_per_repo > 0 && cands.len() > cfg2.max_prs_per_repo {
            cands.drain(..cands.len() - cfg2.max_prs_per_repo);
        }
        let counted = FromGit::Counted {
            candidates: cands.len() as u64,
            dups,
            not_found: missing,
        };
        if tx.blocking_send(counted).is_err() {
            return Ok(());
        }
        for cand in cands
            .iter()
            .filter(|c| resume.done_through.is_none_or(|d| c.number > d))
        {
            let result = if cfg2.filter.repo_excluded(&src.full_name) {
                Ok(Extracted::Dropped("excluded_repo"))
            } else {
                src.extract(cand)
            };
            if tx
                .blocking_send(FromGit::Done {
                    number: cand.number,
                    result,
                })
                .is_err()
            {
                break; // cancelled or failed downstream
            }
        }
        Ok(())
    });
    let outcome = drive(cfg, sinks, &mut rx, resume_tx).await;
    drop(rx);
    let thread = worker
        .await
        .map_err(|e| anyhow!("git thread panicked: {e}"))?;
    match (outcome, thread) {
        (Ok(Some(cp)), _) => Ok(cp),
        (Ok(None), Err(e)) | (Err(e), Err(_)) if !sinks.cancel.load(Ordering::SeqCst) => Err(e),
        (Err(e), _) => Err(e),
        (Ok(None), Err(e)) => Err(e),
        (Ok(None), Ok(())) => Err(anyhow!("git thread for {} stopped early", spec.source)),
    }
}

/// Asks the API about PR numbers history does not name: merged ones come back to be found by
/// their merge commit; the numbers the API says were closed unmerged are returned apart.
async fn locate(
    sinks: &Sinks,
    repo: &str,
    missing: &[u64],
) -> Result<(Vec<ApiPull>, std::collections::BTreeSet<u64>)> {
    let (mut located, mut not_merged) = (Vec::new(), std::collections::BTreeSet::new());
    let Some(gh) = &sinks.github else {
        return Ok((located, not_merged));
    };
    for &n in missing {
        if sinks.cancel.load(Ordering::SeqCst) {
            break;
        }
        match gh
            .pull_state(repo, n)
            .await
            .with_context(|| format!("locating PR #{n} of {repo} through the API"))?
        {
            PullState::Merged(p) => located.push(p),
            PullState::NotMerged => {
                not_merged.insert(n);
            }
            PullState::Unknown => {}
        }
    }
    Ok((located, not_merged))
}

/// The async half of [`crawl_one`]: checkpoint, filters, shards. `Ok(None)` when the git
/// thread stopped before opening the repository (its error explains why).
async fn drive(
    cfg: &CrawlConfig,
    sinks: &Sinks,
    rx: &mut tokio::sync::mpsc::Receiver<FromGit>,
    resume_tx: std::sync::mpsc::Sender<Option<Resume>>,
) -> Result<Option<RepoCheckpoint>> {
    let Some(FromGit::Opened { repo, missing }) = rx.recv().await else {
        return Ok(None);
    };
    let ck_key = checkpoint_key(&cfg.run_id, &repo);
    let (mut cp, fresh) = match load_checkpoint(sinks.store.as_ref(), &ck_key).await? {
        Some(cp) if cp.complete => {
            let _ = resume_tx.send(None);
            sinks.emit(Event::RepoDone {
                repo: repo.clone(),
                counts: cp.counts.clone(),
            });
            return Ok(Some(cp));
        }
        Some(cp) => (cp, false),
        None => (
            RepoCheckpoint {
                repo: repo.clone(),
                ..Default::default()
            },
            true,
        ),
    };
    let (located, not_merged) = locate(sinks, &repo, &missing).await?;
    let _ = resume_tx.send(Some(Resume {
        done_through: cp.done_through,
        located,
    }));
    let Some(FromGit::Counted {
        candidates,
        dups,
        not_found,
    }) = rx.recv().await
    else {
        return Ok(None);
    };
    if fresh {
        for _ in 0..dups {
            cp.counts.drop("duplicate_number");
        }
        for n in &not_found {
            cp.counts.drop(if not_merged.contains(n) {
                "not_merged"
            } else {
                "not_found_in_git"
            });
        }
        cp.api_check.located_by_api = (missing.len() - not_found.len()) as u64;
    }
    cp.candidates = candidates;
    sinks.emit(Event::RepoStarted {
        repo: repo.clone(),
        candidates,
        resumed_from: cp.done_through,
    });
    let mut buffer: Vec<PullRequest> = Vec::new();
    let mut through = cp.done_through;
    // extracted PRs wait here until a batch of them can be enriched together
    let batch = match (&sinks.github, &cfg.api_batch) {
        (Some(_), Some(p)) => p.prs.max(1),
        _ => 1,
    };
    let mut pending: Vec<(u64, Result<Extracted>)> = Vec::new();
    loop {
        let msg = rx.recv().await;
        let last = msg.is_none();
        if let Some(FromGit::Done { number, result }) = msg {
            if sinks.cancel.load(Ordering::SeqCst) {
                return Err(anyhow!("crawl cancelled during {repo} at PR #{number}"));
            }
            pending.push((number, result));
            let prs = pending
                .iter()
                .filter(|(_, r)| matches!(r, Ok(Extracted::Pr(_))))
                .count();
            if prs < batch {
                continue;
            }
        } else if !last {
            continue;
        }
        let outcomes = settle(
            cfg,
            sinks,
            &repo,
            std::mem::take(&mut pending),
            &mut cp.api_check,
        )
        .await?;
        for (number, dropped, api_mismatch, pr) in outcomes {
            if sinks.cancel.load(Ordering::SeqCst) {
                return Err(anyhow!("crawl cancelled during {repo} at PR #{number}"));
            }
            match &dropped {
                Some(why) => cp.counts.drop(why),
                None => cp.counts.keep(),
            }
            buffer.extend(pr);
            through = Some(number);
            sinks.emit(Event::PrDone {
                repo: repo.clone(),
                number,
                dropped,
                api_mismatch,
            });
            if buffer.len() >= cfg.shard_records {
                flush(cfg, sinks, &mut cp, &mut buffer, through, &ck_key, false).await?;
            }
        }
        if last {
            break;
        }
    }
    if sinks.cancel.load(Ordering::SeqCst) {
        return Err(anyhow!("crawl cancelled during {repo}"));
    }
    flush(cfg, sinks, &mut cp, &mut buffer, through, &ck_key, true).await?;
    sinks.emit(Event::RepoDone {
        repo: repo.clone(),
        counts: cp.counts.clone(),
    });
    Ok(Some(cp))
}

/// One PR's outcome: its number, the drop reason (or `None`), whether the API's commits or
/// files disagree with git, and the record when kept.
type Outcome = (u64, Option<String>, bool, Option<PullRequest>);

/// Outcomes for extracted PRs, in order: the kept ones are enriched from the API together
/// (one batch when [`CrawlConfig::api_batch`] is set), then filtered and, with
/// [`CrawlConfig::api_cross_check`], held against the API's commits and files.
async fn settle(
    cfg: &CrawlConfig,
    sinks: &Sinks,
    repo: &str,
    pending: Vec<(u64, Result<Extracted>)>,
    counts: &mut ApiCheckCounts,
) -> Result<Vec<Outcome>> {
    let mut prs: Vec<PullRequest> = Vec::new();
    let mut slots: Vec<(u64, std::result::Result<usize, String>)> = Vec::new();
    for (number, result) in pending {
        match result.with_context(|| format!("extracting PR #{number} of {repo}"))? {
            Extracted::Dropped(why) => slots.push((number, Err(why.to_string()))),
            Extracted::Pr(pr) => {
                slots.push((number, Ok(prs.len())));
                prs.push(*pr);
            }
        }
    }
    let known = match &sinks.github {
        None => vec![false; prs.len()],
        Some(gh) => match &cfg.api_batch {
            Some(pages) if !prs.is_empty() => gh
                .enrich_batch(&mut prs, pages)
                .await
                .with_context(|| format!("GitHub metadata of {} PRs of {repo}", prs.len()))?,
            Some(_) => Vec::new(),
            None => {
                let mut known = Vec::with_capacity(prs.len());
                for pr in &mut prs {
                    known.push(
                        gh.enrich(pr)
                            .await
                            .with_context(|| format!("GitHub metadata of {}", pr.id))?,
                    );
                }
                known
            }
        },
    };
    let mut prs: Vec<Option<PullRequest>> = prs.into_iter().map(Some).collect();
    let mut out = Vec::with_capacity(slots.len());
    for (number, slot) in slots {
        let i = match slot {
            Err(why) => {
                out.push((number, Some(why), false, None));
                continue;
            }
            Ok(i) => i,
        };
        let pr = prs[i].take().expect("each PR is settled once");
        out.push(
            match complete(cfg, sinks, repo, pr, known[i], counts).await? {
                Ok((pr, mismatch)) => (number, None, mismatch, Some(pr)),
                Err(why) => (number, Some(why.to_string()), false, None),
            },
        );
    }
    Ok(out)
}

/// Applies the filters to one PR (already completed from the API when `known`) and, with
/// [`CrawlConfig::api_cross_check`], cross-checks a kept one with the API's commits and files.
/// `Ok(Err(reason))` for a dropped PR; `Ok(Ok((pr, mismatch)))` for a kept one.
async fn complete(
    cfg: &CrawlConfig,
    sinks: &Sinks,
    repo: &str,
    mut pr: PullRequest,
    known: bool,
    counts: &mut ApiCheckCounts,
) -> Result<std::result::Result<(PullRequest, bool), &'static str>> {
    if let Some(why) = cfg.filter.check(&pr) {
        return Ok(Err(why));
    }
    let Some(gh) = sinks
        .github
        .as_ref()
        .filter(|_| known && cfg.api_cross_check)
    else {
        return Ok(Ok((pr, false)));
    };
    let changes = gh
        .pull_changes(repo, pr.number)
        .await
        .with_context(|| format!("GitHub commits and files of {}", pr.id))?;
    let check = crosscheck::apply(&mut pr, &changes);
    if check.mismatched() {
        tracing::warn!(pr = %pr.id, check = ?check, "the GitHub API and git disagree");
    }
    counts.record(&check);
    pr.extra
        .insert("api_check".into(), serde_json::to_value(&check)?);
    Ok(Ok((pr, check.mismatched())))
}

/// Writes the buffered records as one shard (if any), then the checkpoint.
/// The shard goes first: a crash between the two rewrites the same object on resume.
async fn flush(
    cfg: &CrawlConfig,
    sinks: &Sinks,
    cp: &mut RepoCheckpoint,
    buffer: &mut Vec<PullRequest>,
    through: Option<u64>,
    ck_key: &str,
    complete: bool,
) -> Result<()> {
    if !buffer.is_empty() {
        let enc = shard::encode_shard(buffer.iter()).context("encoding PR shard")?;
        let key = format!("runs/{}/prs/{}", cfg.run_id, enc.file_name());
        sinks
            .store
            .put(&key, enc.data.clone())
            .await
            .with_context(|| format!("writing {key}"))?;
        let info = ShardInfo {
            key: key.clone(),
            sha256: enc.sha256.clone(),
            records: enc.records as u64,
            first_number: buffer.first().map(|p| p.number).unwrap_or(0),
            last_number: buffer.last().map(|p| p.number).unwrap_or(0),
        };
        sinks.emit(Event::ShardWritten {
            key,
            records: info.records,
        });
        cp.shards.push(info);
        buffer.clear();
    }
    cp.done_through = through;
    cp.complete = complete;
    let json = serde_json::to_vec_pretty(cp)?;
    sinks
        .store
        .put(ck_key, Bytes::from(json))
        .await
        .with_context(|| format!("writing checkpoint {ck_key}"))?;
    Ok(())
}
