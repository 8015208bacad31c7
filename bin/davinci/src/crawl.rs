//! `davinci crawl`: git repositories (and optionally the GitHub API) → `davinci.pr/v1` shards.
use anyhow::Context;
use davinci_crawler::github::{Discovery, GithubClient, GithubConfig};
use davinci_crawler::pipeline::{self, CrawlConfig, Event, RepoSpec, Sinks};
use davinci_crawler::sources::{self, Inputs};
use davinci_crawler::{SWE_BENCH_VERIFIED_REPOS, Subset};
use davinci_runtime::blob;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Crawl merged pull requests into `davinci.pr/v1` shards.
///
/// Each `--repo` is a local git repository or a clone URL (cloned bare and blobless into
/// `--cache-dir`). Merged PRs are found in history: GitHub merge commits
/// (`Merge pull request #N from …`) and squash merges (`… (#N)`). Records go to
/// `runs/{run}/prs/{sha16}.jsonl.zst` under `--out`, per-repository checkpoints to
/// `runs/{run}/crawl/checkpoints/`, and, last, counts with drops by reason to
/// `runs/{run}/stats/crawl.json`. Re-running the same command resumes where it stopped.
///
/// With `--github`, each PR is completed from the GitHub API (tokens from `GITHUB_TOKENS`,
/// comma-separated, or `GITHUB_TOKEN`); code content always comes from git, and the API's
/// commit and file lists are held against it (mismatches counted under `api_check` in the
/// stats and listed in each record's `extra.api_check`). ETags and response bodies are kept in
/// Redis with `--redis-url`, else under `cache/github/` in `--out`, so later crawls and other
/// replicas get `304`s, which do not count against the rate limit.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Local repository path or clone URL; repeat for several.
    #[arg(long = "repo", value_name = "PATH|URL")]
    pub repos: Vec<String>,
    /// GH Archive hourly file (`.json.gz` or `.json`; a path, `file://` or `s3://` URI;
    /// repeatable): its closed+merged PRs are crawled from clones of
    /// `--github-web-url/{owner}/{name}.git`. With --github, trimmed events are settled by the
    /// API first, and PRs no commit message names are found by their merge commit.
    #[arg(long, value_name = "FILE|URI")]
    pub gharchive: Vec<String>,
    /// Where GH Archive repositories are cloned from.
    #[arg(long, default_value = "https://github.com")]
    pub github_web_url: String,
    /// `owner/name` of the repository (only with a single --repo; default: from `origin`).
    #[arg(long, value_name = "OWNER/NAME")]
    pub repo_name: Option<String>,
    /// Output root: `file:///dir`, a local path, or `s3://bucket/prefix`.
    #[arg(long, value_name = "URI")]
    pub out: String,
    /// Run id the shards are written under.
    #[arg(long, default_value = "crawl")]
    pub run: String,
    /// `python`: keep PRs changing 1 to 5 Python files; `general`: no subset rule.
    #[arg(long, default_value = "general")]
    pub subset: Subset,
    /// Complete PRs from the GitHub API (body, author, reviews, comments, linked issues; many
    /// PRs per GraphQL query, see --github-batch); with --api-cross-check also hold each kept
    /// PR's commits and files against git (counts under "API check" in the summary and
    /// `api_check` in stats/crawl.json). Tokens: GITHUB_TOKENS (comma-separated, pooled) or
    /// GITHUB_TOKEN; none: unauthenticated.
    #[arg(long)]
    pub github: bool,
    /// Find repositories through the GitHub search API (not archived, by stars, top-N first)
    /// and crawl blobless clones of them from `--github-web-url`.
    #[arg(long)]
    pub discover: bool,
    /// With --discover: only repositories in this language (e.g. Python; repeatable: any of
    /// them).
    #[arg(long = "language", value_name = "NAME", requires = "discover")]
    pub languages: Vec<String>,
    /// With --discover: at least this many stars.
    #[arg(long, default_value_t = 5, requires = "discover")]
    pub min_stars: u64,
    /// With --discover: this many repositories, most starred first (0: all the search returns).
    #[arg(long, default_value_t = 100, requires = "discover")]
    pub top_n: usize,
    /// With --discover: license keys allowed (repeatable, e.g. mit, apache-2.0); none: any.
    #[arg(long = "license", value_name = "KEY", requires = "discover")]
    pub licenses: Vec<String>,
    /// GitHub REST base URL (`https://HOST/api/v3` for Enterprise Server).
    #[arg(
        long,
        default_value = "https://api.github.com",
        env = "DAVINCI_GITHUB_API_URL"
    )]
    pub github_api_url: String,
    /// Redis URL for token budgets and the ETag cache shared by every crawler replica
    /// (default: budgets per process, ETags under `cache/github/` in --out).
    #[arg(long, env = "DAVINCI_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Requests each GitHub token may make per hour.
    #[arg(long, default_value_t = 5000)]
    pub github_budget: u64,
    /// GraphQL points each GitHub token may spend per hour (a budget beside --github-budget).
    #[arg(long, default_value_t = 5000)]
    pub github_points: u64,
    /// With --github: PRs whose metadata one GraphQL query fetches (0: one PR at a time, a
    /// REST call, a GraphQL query and a REST call per linked issue each).
    #[arg(long, default_value_t = 25)]
    pub github_batch: usize,
    /// With --github: also hold every kept PR against the API's commits and files (two or
    /// more REST requests per PR: about 2,500 PRs per token-hour).
    #[arg(long, requires = "github")]
    pub api_cross_check: bool,
    /// Repositories never crawled (`owner/name`, repeatable). Default: the 12 SWE-bench
    /// Verified repositories.
    #[arg(long = "exclude-repo", value_name = "OWNER/NAME")]
    pub exclude_repos: Vec<String>,
    /// Also crawl repositories of SWE-bench Verified (drops the default exclusion list).
    #[arg(long)]
    pub no_default_exclusions: bool,
    /// Extra bot logins (besides `[bot]` suffixes and `type: Bot`).
    #[arg(long = "bot-login", value_name = "LOGIN")]
    pub bot_logins: Vec<String>,
    /// Only the newest N PRs per repository (0: all).
    #[arg(long, default_value_t = 0)]
    pub max_prs_per_repo: usize,
    /// Files over this many bytes are not read (marked `too_large`).
    #[arg(long, default_value_t = 1 << 20)]
    pub max_file_bytes: u64,
    /// PRs with more commits are dropped (`too_many_commits`).
    #[arg(long, default_value_t = 250)]
    pub max_commits: usize,
    /// PRs touching more files are dropped (`too_many_files`).
    #[arg(long, default_value_t = 100)]
    pub max_files: usize,
    /// PR records per shard.
    #[arg(long, default_value_t = 256)]
    pub shard_records: usize,
    /// Where clone URLs are cloned (bare, blobless).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.repo_name.is_some() && args.repos.len() > 1 {
        anyhow::bail!("--repo-name names one repository; it cannot be used with several --repo");
    }
    if args.shard_records == 0 {
        anyhow::bail!("--shard-records must be at least 1");
    }
    let store = blob::open(&args.out, &crate::cli_s3()?)
        .await
        .with_context(|| format!("opening output storage `{}`", args.out))?;
    let mut cfg = CrawlConfig::new(&args.run);
    cfg.shard_records = args.shard_records;
    cfg.max_prs_per_repo = args.max_prs_per_repo;
    cfg.api_cross_check = args.api_cross_check;
    cfg.api_batch = (args.github_batch > 0).then(|| davinci_crawler::batch::BatchPages {
        prs: args.github_batch,
        ..Default::default()
    });
    cfg.git.max_file_bytes = args.max_file_bytes;
    cfg.git.max_commits = args.max_commits;
    cfg.filter.subset = args.subset;
    cfg.filter.max_files = args.max_files;
    if args.no_default_exclusions {
        cfg.filter.exclude_repos.clear();
    } else {
        cfg.filter.exclude_repos = SWE_BENCH_VERIFIED_REPOS
            .iter()
            .map(|s| s.to_string())
            .collect();
    }
    cfg.filter
        .exclude_repos
        .extend(args.exclude_repos.iter().cloned());
    cfg.filter
        .bot_logins
        .extend(args.bot_logins.iter().cloned());
    if let Some(d) = &args.cache_dir {
        cfg.cache_dir = d.clone();
    }
    cfg.web_url = args.github_web_url.clone();
    let inputs = Inputs {
        repos: args
            .repos
            .iter()
            .map(|r| RepoSpec {
                source: r.clone(),
                name: args.repo_name.clone(),
                only: None,
            })
            .collect(),
        gharchive: args.gharchive.clone(),
        discovery: args.discover.then(|| Discovery {
            languages: args.languages.clone(),
            min_stars: args.min_stars,
            license_allow: args.licenses.clone(),
            top_n: args.top_n,
        }),
    };
    if inputs.is_empty() {
        anyhow::bail!("nothing to crawl: give --repo, --gharchive or --discover");
    }

    let mut sinks = Sinks::new(store.clone());
    let mut github = None;
    if args.github || args.discover {
        let gh_cfg = GithubConfig {
            api_url: args.github_api_url.clone(),
            budget_per_window: args.github_budget,
            graphql_points_per_window: args.github_points,
            ..Default::default()
        };
        github = Some(Arc::new(
            GithubClient::pooled(gh_cfg, args.redis_url.as_deref(), store.clone()).await?,
        ));
    }
    if args.github {
        sinks.github = github.clone();
    }

    // progress: one bar per repository under a total line
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>28} [{bar:30}] {pos}/{len} PRs {msg}")
        .expect("valid template")
        .progress_chars("=> ");
    let bars: Arc<Mutex<HashMap<String, ProgressBar>>> = Arc::default();
    let shards_bar = multi.add(ProgressBar::new_spinner());
    shards_bar.set_message("shards written: 0");
    let (bars2, multi2, shards2) = (bars.clone(), multi.clone(), shards_bar.clone());
    let shard_count = Arc::new(std::sync::atomic::AtomicU64::new(0));
    sinks.events = Some(Arc::new(move |e| match e {
        Event::RepoStarted {
            repo,
            candidates,
            resumed_from,
        } => {
            let pb = multi2.insert_before(&shards2, ProgressBar::new(candidates));
            pb.set_style(style.clone());
            pb.set_prefix(repo.clone());
            if let Some(n) = resumed_from {
                pb.set_message(format!("(resumed after #{n})"));
            }
            bars2.lock().expect("bars").insert(repo, pb);
        }
        Event::PrDone { repo, .. } => {
            if let Some(pb) = bars2.lock().expect("bars").get(&repo) {
                pb.inc(1);
            }
        }
        Event::ShardWritten { .. } => {
            let n = shard_count.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            shards2.set_message(format!("shards written: {n}"));
        }
        Event::RepoDone { repo, counts } => {
            if let Some(pb) = bars2.lock().expect("bars").get(&repo) {
                pb.finish_with_message(format!("kept {} of {}", counts.out, counts.input));
            }
        }
        Event::RepoFailed { source, error } => {
            let _ = multi2.println(format!("{source}: failed: {error}"));
        }
        Event::ArchiveRead { source, counts } => println!(
            "{source}: {} PR events, {} candidate merged PRs, drops {:?}",
            counts.input, counts.out, counts.drops
        ),
        Event::Discovered { repos } => println!("discovered {} repositories", repos.len()),
    }));

    // Ctrl-C stops at the next PR; the checkpoints make the next run resume there.
    let cancel = sinks.cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            cancel.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    });

    let started = std::time::Instant::now();
    let stats = sources::crawl(&cfg, &inputs, github.as_deref(), &crate::cli_s3()?, &sinks).await?;
    shards_bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();

    println!(
        "crawl {} → {}",
        args.run,
        store.uri(&pipeline::stats_key(&args.run))
    );
    println!(
        "  repositories: {} ({} failed)",
        stats.repos.len() + stats.failed_repos.len(),
        stats.failed_repos.len()
    );
    println!("  PRs found:    {}", stats.totals.input);
    println!("  PRs kept:     {}", stats.totals.out);
    println!("  PRs dropped:  {}", stats.totals.dropped());
    for (reason, n) in &stats.totals.drops {
        println!("    {reason:<20} {n}");
    }
    println!("  shards:       {}", stats.shards.len());
    println!(
        "  time:         {secs:.1}s ({:.1} PRs/s)",
        stats.totals.input as f64 / secs.max(1e-9)
    );
    if sinks.github.is_some() {
        let a = &stats.api_check;
        println!(
            "  API check:    {} PRs checked, {} disagree with git",
            a.prs_checked, a.prs_mismatched
        );
        println!(
            "    commits not in git {}, not in API {}; files not in git {}, not in API {}",
            a.commits_not_in_git, a.commits_not_in_api, a.files_not_in_git, a.files_not_in_api
        );
        println!(
            "    filled from API: {} renames, {} commit accounts; {} PRs located by merge commit",
            a.renames_from_api, a.commit_accounts, a.located_by_api
        );
    }
    if let Some(gh) = &github {
        println!("  GitHub:       {:?}", gh.stats.snapshot());
    }
    for (src, err) in &stats.failed_repos {
        eprintln!("  failed: {src}: {err}");
    }
    if !stats.failed_repos.is_empty() && stats.repos.is_empty() {
        anyhow::bail!("every repository failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Args;

    #[test]
    fn every_flag_is_documented() {
        let cmd = <Args as clap::Args>::augment_args(clap::Command::new("crawl"));
        for arg in cmd.get_arguments() {
            let help = arg
                .get_long_help()
                .or(arg.get_help())
                .map(|h| h.to_string());
            assert!(
                help.is_some_and(|h| h.trim().len() > 10),
                "--{} has no help text",
                arg.get_id()
            );
        }
    }
}
