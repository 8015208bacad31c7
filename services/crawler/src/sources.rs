//! What a crawl reads: explicit repositories, GH Archive hourly files and GitHub search
//! discovery, resolved into one list of repositories to crawl. `davinci crawl` and the crawler
//! gRPC service both go through [`crawl`] (or [`resolve`] when they crawl the list themselves).
use crate::gharchive::{self, ArchiveCandidate, ArchiveFileStats};
use crate::github::{Discovery, GithubClient};
use crate::pipeline::{self, CrawlConfig, CrawlStats, Event, RepoSpec, Sinks};
use anyhow::{Context, Result, bail};
use davinci_runtime::blob::{self, S3Config};
use std::collections::{BTreeMap, BTreeSet};

/// The inputs of one crawl.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// Repositories named outright.
    pub repos: Vec<RepoSpec>,
    /// GH Archive hourly files (`.json.gz` or `.json`): local paths, `file://` or `s3://` URIs.
    pub gharchive: Vec<String>,
    /// Repositories to find through the GitHub search API.
    pub discovery: Option<Discovery>,
}

impl Inputs {
    pub fn is_empty(&self) -> bool {
        self.repos.is_empty() && self.gharchive.is_empty() && self.discovery.is_none()
    }
}

/// [`Inputs`] resolved: the repositories to crawl, and what reading the sources counted.
#[derive(Debug, Clone, Default)]
pub struct Resolved {
    pub repos: Vec<RepoSpec>,
    /// Per GH Archive file: pull-request events in, candidates out, drops by reason, events
    /// and candidates by shape.
    pub gharchive: BTreeMap<String, ArchiveFileStats>,
    /// Sources that gave nothing where something was expected (each also logged).
    pub warnings: Vec<String>,
    /// Repositories discovery found, most starred first.
    pub discovered: Vec<String>,
}

/// Reads the GH Archive files and runs discovery. `api` is needed for discovery; with it, GH
/// Archive closings whose payload was trimmed (no merge state) are settled by the API first,
/// so repositories whose PRs all closed unmerged are never cloned; `merged` events and full
/// payloads need no call. The same PR seen in several events or hours is one candidate
/// ([`gharchive::decide`]). A file with pull-request events but no merge candidate is warned
/// about by name. Repositories from both are cloned from `cfg.web_url`.
pub async fn resolve(
    cfg: &CrawlConfig,
    inputs: &Inputs,
    api: Option<&GithubClient>,
    s3: &S3Config,
    sinks: &Sinks,
) -> Result<Resolved> {
    let web = cfg.web_url.trim_end_matches('/');
    let mut out = Resolved {
        repos: inputs.repos.clone(),
        ..Default::default()
    };
    if let Some(d) = &inputs.discovery {
        let Some(api) = api else {
            bail!("repository discovery needs a GitHub API client");
        };
        let found = api
            .discover(d)
            .await
            .context("repository discovery through the GitHub search API")?;
        out.discovered = found.into_iter().map(|r| r.full_name).collect();
        sinks.emit(Event::Discovered {
            repos: out.discovered.clone(),
        });
        for name in &out.discovered {
            out.repos.push(RepoSpec {
                source: format!("{web}/{name}.git"),
                name: Some(name.clone()),
                only: None,
            });
        }
    }
    let mut hours = Vec::with_capacity(inputs.gharchive.len());
    for source in &inputs.gharchive {
        let data = read_source(source, s3).await?;
        hours.push(
            gharchive::read_hour(&data[..])
                .with_context(|| format!("reading GH Archive file {source}"))?,
        );
    }
    let (decided, mut files) = gharchive::decide(&hours);
    let mut all: Vec<ArchiveCandidate> = Vec::new();
    for d in decided {
        let stats = &mut files[d.file];
        match (d.cand.merged, api) {
            (None, Some(api)) => {
                let (repo, number) = (d.cand.repo.clone(), d.cand.number);
                match gharchive::fill_from_api(api, d.cand)
                    .await
                    .with_context(|| format!("settling {repo}#{number} with the API"))?
                {
                    Some(f) if f.author_is_bot => stats.counts.drop("bot_author"),
                    Some(f) => {
                        stats.keep(d.shape);
                        all.push(f);
                    }
                    None => stats.counts.drop("not_merged"),
                }
            }
            _ => {
                stats.keep(d.shape);
                all.push(d.cand);
            }
        }
    }
    for (source, stats) in inputs.gharchive.iter().zip(files) {
        if stats.counts.input > 0 && stats.counts.out == 0 {
            let warning = format!(
                "GH Archive file {source}: {} pull-request events ({}) but no merge candidate; \
                 has the feed changed how it marks merges?",
                stats.counts.input,
                shape_summary(&stats.events)
            );
            tracing::warn!("{warning}");
            out.warnings.push(warning);
        }
        sinks.emit(Event::ArchiveRead {
            source: source.clone(),
            counts: stats.counts.clone(),
        });
        out.gharchive.insert(source.clone(), stats);
    }
    for (repo, numbers) in gharchive::by_repo(&all) {
        crate::git::validate_full_name(&repo)?;
        match out
            .repos
            .iter_mut()
            .find(|r| r.name.as_deref() == Some(repo.as_str()))
        {
            // a repository named twice is crawled once; a whole-history crawl covers it
            Some(r) => {
                if let Some(only) = &mut r.only {
                    only.extend(numbers);
                }
            }
            None => out.repos.push(RepoSpec {
                source: format!("{web}/{repo}.git"),
                name: Some(repo),
                only: Some(numbers.into_iter().collect::<BTreeSet<u64>>()),
            }),
        }
    }
    Ok(out)
}

/// `merged=0, closed_merged=2, …` for a warning.
fn shape_summary(events: &BTreeMap<String, u64>) -> String {
    events
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The bytes of a GH Archive file: a local path, `file://` or `s3://bucket/key`.
async fn read_source(source: &str, s3: &S3Config) -> Result<bytes::Bytes> {
    if let Some(rest) = source.strip_prefix("s3://") {
        let Some((bucket, key)) = rest.split_once('/') else {
            bail!("`{source}` names a bucket, not an object");
        };
        let store = blob::open(&format!("s3://{bucket}"), s3).await?;
        return store
            .get(key)
            .await
            .with_context(|| format!("reading {source}"));
    }
    if let Some((scheme, _)) = source.split_once("://")
        && scheme != "file"
    {
        bail!("`{source}`: GH Archive files are read from local paths, file:// or s3:// URIs");
    }
    let path = source.strip_prefix("file://").unwrap_or(source);
    let data = tokio::fs::read(path)
        .await
        .with_context(|| format!("reading {source}"))?;
    Ok(data.into())
}

/// Resolves `inputs`, crawls every repository and writes `stats/crawl.json` with what the
/// sources counted.
pub async fn crawl(
    cfg: &CrawlConfig,
    inputs: &Inputs,
    api: Option<&GithubClient>,
    s3: &S3Config,
    sinks: &Sinks,
) -> Result<CrawlStats> {
    let resolved = resolve(cfg, inputs, api, s3, sinks).await?;
    let mut stats = CrawlStats {
        stage: "crawl".into(),
        run_id: cfg.run_id.clone(),
        gharchive: resolved.gharchive,
        warnings: resolved.warnings,
        discovered: resolved.discovered,
        ..Default::default()
    };
    pipeline::crawl_repos(cfg, &resolved.repos, sinks, &mut stats).await?;
    pipeline::write_stats(sinks, &stats).await?;
    Ok(stats)
}
