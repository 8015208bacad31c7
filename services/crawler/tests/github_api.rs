//! The GitHub client against the fake GitHub of `common` (REST with Link pagination, ETags,
//! per-token rate limits, GraphQL, one 429 with `retry-after`, one HTML abuse page and one 502
//! injected), and the git crawl completed and cross-checked from it.
mod common;

use common::{Data, cfg, commit_json, file_json, git, pull_json, serve_with, user};
use davinci_core::pr::{AuthorType, FileStatus, PullRequest};
use davinci_crawler::budget::{MemoryBudget, RedisBudget, TokenBudget};
use davinci_crawler::github::{Discovery, GithubClient};
use davinci_crawler::httpcache::{BlobCache, RedisCache, ResponseCache};
use davinci_crawler::pipeline::{self, CrawlConfig, RepoSpec, Sinks};
use davinci_runtime::blob::BlobStore;
use std::collections::HashSet;
use std::sync::Arc;

async fn serve() -> (String, common::S) {
    serve_with(8, false, Data::widgets()).await
}

fn skeleton(n: u64) -> PullRequest {
    common::skeleton("acme/widgets", n)
}

/// Discovery, merged PR listing and enrichment of every merged PR.
async fn full_crawl(client: &GithubClient) -> Vec<PullRequest> {
    let merged = client.merged_pulls("acme/widgets", 0).await.unwrap();
    let mut out = Vec::new();
    for m in merged {
        let mut pr = skeleton(m.number);
        assert!(client.enrich(&mut pr).await.unwrap());
        out.push(pr);
    }
    out
}

#[tokio::test]
async fn polite_client_finishes_within_budget_despite_injected_faults() {
    let (base, fake) = serve().await;
    fake.faults.lock().unwrap().extend([
        (
            "/repos/acme/widgets/pulls?direction=desc&page=2&per_page=2&sort=updated&state=closed"
                .to_string(),
            "429",
        ),
        ("/repos/acme/widgets/pulls/2".to_string(), "html"),
        ("/repos/acme/widgets".to_string(), "502"),
    ]);
    let client = GithubClient::new(
        cfg(&base, 8),
        vec!["tok-a".into()],
        Arc::new(MemoryBudget::default()),
    )
    .unwrap();

    let found = client
        .discover(&Discovery {
            languages: vec!["Python".into()],
            min_stars: 5,
            license_allow: vec!["MIT".into(), "Apache-2.0".into()],
            top_n: 2,
        })
        .await
        .unwrap();
    // archived, GPL and under-starred repositories are skipped; top 2 by stars
    assert_eq!(
        found
            .iter()
            .map(|r| r.full_name.as_str())
            .collect::<Vec<_>>(),
        ["acme/big", "acme/widgets"]
    );

    let prs = full_crawl(&client).await;
    // PR 4 is closed unmerged; 1, 2, 3, 5 are merged (listed across 3 pages)
    assert_eq!(
        prs.iter().map(|p| p.number).collect::<Vec<_>>(),
        [1, 2, 3, 5]
    );
    let p1 = &prs[0];
    assert_eq!(p1.title, "PR 1");
    assert_eq!(p1.author.association.as_deref(), Some("CONTRIBUTOR"));
    assert_eq!(p1.labels, ["bug"]);
    assert_eq!(p1.repo.stars, Some(600));
    assert_eq!(p1.reviews[0].state, "CHANGES_REQUESTED");
    assert_eq!(p1.reviews[0].comments[0].line, Some(3));
    assert_eq!(p1.comments[0].author.login, "carol");
    // closing reference 12 from GraphQL, "Fixes #10" from the body; #11 is a PR, not an issue
    let linked: Vec<_> = p1
        .linked_issues
        .iter()
        .map(|i| (i.number, i.title.as_str()))
        .collect();
    assert_eq!(linked, [(12, "Crash"), (10, "Issue 10")]);
    assert_eq!(prs[3].author.kind, AuthorType::Bot);

    let wire = client.stats.snapshot();
    assert_eq!(
        *fake.over_limit.lock().unwrap(),
        0,
        "avoidable 403s received; wire: {wire:?}"
    );
    assert_eq!(
        (
            wire["secondary_limited"],
            wire["html_pages"],
            wire["server_errors"]
        ),
        (1, 1, 1),
        "{wire:?}"
    );
    assert_eq!(wire["primary_limited"], 0);
    assert!(
        wire["budget_waits"] >= 1,
        "the crawl needs more than one window: {wire:?}"
    );
}

#[tokio::test]
async fn client_over_the_servers_budget_is_refused_then_recovers() {
    // the control for the test above: without rate-limit headers to follow, a budget larger
    // than the server's gets 403s (so the fake does enforce its limit), which the client
    // survives by waiting for the reset the 403 names
    let (base, fake) = serve_with(4, true, Data::widgets()).await;
    let client = GithubClient::new(
        cfg(&base, 100),
        vec!["tok-b".into()],
        Arc::new(MemoryBudget::default()),
    )
    .unwrap();
    let prs = full_crawl(&client).await;
    assert_eq!(prs.len(), 4);
    assert!(*fake.over_limit.lock().unwrap() > 0);
    assert!(client.stats.snapshot()["primary_limited"] > 0);
}

#[tokio::test]
async fn etag_304_reuses_the_cached_body() {
    let (base, fake) = serve().await;
    let client = GithubClient::new(
        cfg(&base, 8),
        vec!["tok-c".into()],
        Arc::new(MemoryBudget::default()),
    )
    .unwrap();
    let a = client
        .get("repos/acme/widgets/pulls/3")
        .await
        .unwrap()
        .unwrap();
    let b = client
        .get("repos/acme/widgets/pulls/3")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.body, b.body);
    assert_eq!(client.stats.snapshot()["not_modified"], 1);
    assert_eq!(*fake.requests.lock().unwrap(), 2);
    assert!(
        client
            .get("repos/acme/widgets/pulls/99")
            .await
            .unwrap()
            .is_none()
    );
}

async fn replicas_share_budget(budget_a: Arc<dyn TokenBudget>, budget_b: Arc<dyn TokenBudget>) {
    let (base, fake) = serve().await;
    let tokens = vec!["tok-1".to_string(), "tok-2".to_string()];
    let a = GithubClient::new(cfg(&base, 8), tokens.clone(), budget_a).unwrap();
    let b = GithubClient::new(cfg(&base, 8), tokens, budget_b).unwrap();
    let (ra, rb) = tokio::join!(full_crawl(&a), full_crawl(&b));
    assert_eq!((ra.len(), rb.len()), (4, 4));
    assert_eq!(
        *fake.over_limit.lock().unwrap(),
        0,
        "a replica overspent a shared token"
    );
    // both tokens were used
    let used = fake.used.lock().unwrap();
    let toks: HashSet<_> = used.keys().map(|(t, _)| t.clone()).collect();
    assert_eq!(toks.len(), 2);
}

#[tokio::test]
async fn replicas_share_token_budgets_in_memory() {
    let shared: Arc<dyn TokenBudget> = Arc::new(MemoryBudget::default());
    replicas_share_budget(shared.clone(), shared).await;
}

#[tokio::test]
async fn replicas_share_token_budgets_through_redis() {
    let redis = match davinci_testkit::RedisServer::start() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("skipping: no redis-server ({e})");
            return;
        }
    };
    // two connections, as two replica processes would have
    let a: Arc<dyn TokenBudget> = Arc::new(
        RedisBudget::connect(&redis.url(), "t:budget")
            .await
            .unwrap(),
    );
    let b: Arc<dyn TokenBudget> = Arc::new(
        RedisBudget::connect(&redis.url(), "t:budget")
            .await
            .unwrap(),
    );
    replicas_share_budget(a, b).await;
}

/// A repository at `d` with `origin` = acme/widgets, `a.py` = "x = 0" and one commit.
fn widgets_repo(d: &std::path::Path) {
    git(d, &["init", "-q", "-b", "main"]);
    git(d, &["config", "user.name", "A"]);
    git(d, &["config", "user.email", "a@example.com"]);
    git(
        d,
        &[
            "remote",
            "add",
            "origin",
            "https://github.com/acme/widgets.git",
        ],
    );
    std::fs::write(d.join("a.py"), "x = 0\n").unwrap();
    git(d, &["add", "-A"]);
    git(d, &["commit", "-q", "-m", "init"]);
}

async fn file_store(dir: &std::path::Path) -> Arc<dyn BlobStore> {
    davinci_runtime::blob::open(&format!("file://{}", dir.display()), &Default::default())
        .await
        .unwrap()
}

async fn records(store: &dyn BlobStore, run: &str) -> Vec<PullRequest> {
    let mut prs = Vec::new();
    for m in store.list(&format!("runs/{run}/prs/")).await.unwrap() {
        prs.extend(
            davinci_runtime::shard::decode_jsonl_zst::<PullRequest>(
                &store.get(&m.key).await.unwrap(),
            )
            .unwrap(),
        );
    }
    prs.sort_by_key(|p| p.number);
    prs
}

/// A crawl that holds kept PRs against the API's commits and files.
fn checked(run: &str) -> CrawlConfig {
    let mut cfg = CrawlConfig::new(run);
    cfg.api_cross_check = true;
    cfg
}

fn client(base: &str, budget: u64, token: &str) -> Arc<GithubClient> {
    Arc::new(
        GithubClient::new(
            cfg(base, budget),
            vec![token.into()],
            Arc::new(MemoryBudget::default()),
        )
        .unwrap(),
    )
}

#[tokio::test]
async fn git_crawl_enriched_from_the_api() {
    let repo = tempfile::tempdir().unwrap();
    let d = repo.path();
    widgets_repo(d);
    let mut data = Data::widgets();
    for n in [1u64, 2, 5] {
        std::fs::write(d.join("a.py"), format!("x = {n}\n")).unwrap();
        git(
            d,
            &["commit", "-q", "-am", &format!("git subject {n} (#{n})")],
        );
        // squash merges: the API lists the commits before squashing, and the net files
        let key = ("acme/widgets".to_string(), n);
        data.commits.insert(
            key.clone(),
            vec![commit_json(
                &format!("{n:0>40}"),
                "wip",
                Some(("alice", "User")),
            )],
        );
        data.files
            .insert(key, vec![file_json("a.py", "modified", None)]);
    }
    let (base, fake) = serve_with(8, false, data).await;
    let out = tempfile::tempdir().unwrap();
    let store = file_store(out.path()).await;
    let mut sinks = Sinks::new(store.clone());
    sinks.github = Some(client(&base, 8, "tok-e"));
    let stats = pipeline::crawl_git(
        &checked("gh"),
        &[RepoSpec::new(d.display().to_string())],
        &sinks,
    )
    .await
    .unwrap();
    // PR 5's author is a Bot per the API (git only knows "A")
    assert_eq!((stats.totals.input, stats.totals.out), (3, 2), "{stats:?}");
    assert_eq!(stats.totals.drops.get("bot_author"), Some(&1));
    // the kept PRs were checked against the API's commits and files, and agree
    assert_eq!(
        (stats.api_check.prs_checked, stats.api_check.prs_mismatched),
        (2, 0)
    );
    let prs = records(store.as_ref(), "gh").await;
    assert_eq!(prs[0].title, "PR 1");
    assert_eq!(prs[0].linked_issues.len(), 2);
    assert_eq!(
        prs[0].commits[0].files[0].diff,
        "@@ -1 +1 @@\n-x = 0\n+x = 1\n"
    );
    assert_eq!(prs[0].extra["api_check"]["commits_matched_by"], "none");
    assert_eq!(prs[1].reviews.len(), 1);
    assert_eq!(*fake.over_limit.lock().unwrap(), 0);
}

#[tokio::test]
async fn api_commits_and_files_cross_check_the_git_record() {
    let repo = tempfile::tempdir().unwrap();
    let d = repo.path();
    widgets_repo(d);
    let old: String = (1..=6).map(|i| format!("old line {i}\n")).collect();
    std::fs::write(d.join("old.py"), &old).unwrap();
    git(d, &["add", "-A"]);
    git(d, &["commit", "-q", "-m", "add old"]);
    // PR 7 (merge commit): c1 changes a.py, c2 moves old.py to new.py and rewrites it, so git's
    // similarity heuristic sees an addition and a deletion where GitHub says "renamed"
    git(d, &["checkout", "-q", "-b", "f"]);
    std::fs::write(d.join("a.py"), "x = 7\n").unwrap();
    git(d, &["commit", "-q", "-am", "change a"]);
    let c1 = git(d, &["rev-parse", "HEAD"]);
    std::fs::remove_file(d.join("old.py")).unwrap();
    std::fs::write(d.join("new.py"), "def rewritten():\n    return 1\n").unwrap();
    git(d, &["add", "-A"]);
    git(d, &["commit", "-q", "-m", "move and rewrite old"]);
    let c2 = git(d, &["rev-parse", "HEAD"]);
    git(d, &["checkout", "-q", "main"]);
    git(
        d,
        &[
            "merge",
            "-q",
            "--no-ff",
            "-m",
            "Merge pull request #7 from alice/f\n\nMove",
            "f",
        ],
    );
    let m7 = git(d, &["rev-parse", "HEAD"]);
    // PR 8 (squash): agrees with the API
    std::fs::write(d.join("a.py"), "x = 8\n").unwrap();
    git(d, &["commit", "-q", "-am", "Tweak (#8)"]);
    let m8 = git(d, &["rev-parse", "HEAD"]);

    let mut data = Data::widgets();
    let repo_name = "acme/widgets".to_string();
    data.pulls.insert(
        repo_name.clone(),
        vec![
            pull_json(
                &repo_name,
                7,
                true,
                user("alice", "User"),
                "Moves old.py",
                &m7,
            ),
            pull_json(&repo_name, 8, true, user("alice", "User"), "Tweak", &m8),
        ],
    );
    let lost = "f".repeat(40);
    data.commits.insert(
        (repo_name.clone(), 7),
        vec![
            commit_json(&c1, "change a", Some(("alice", "User"))),
            commit_json(&c2, "move and rewrite old", Some(("helper[bot]", "Bot"))),
            commit_json(&lost, "force-pushed away", None),
        ],
    );
    // three files: two pages at per_page 2
    data.files.insert(
        (repo_name.clone(), 7),
        vec![
            file_json("a.py", "modified", None),
            file_json("new.py", "renamed", Some("old.py")),
            file_json("ghost.py", "added", None),
        ],
    );
    data.commits.insert(
        (repo_name.clone(), 8),
        vec![commit_json(&"e".repeat(40), "wip", None)],
    );
    data.files.insert(
        (repo_name.clone(), 8),
        vec![file_json("a.py", "modified", None)],
    );
    let (base, fake) = serve_with(1000, false, data).await;
    let out = tempfile::tempdir().unwrap();
    let store = file_store(out.path()).await;
    let mut sinks = Sinks::new(store.clone());
    sinks.github = Some(client(&base, 1000, "tok-x"));
    let stats = pipeline::crawl_git(
        &checked("x"),
        &[RepoSpec::new(d.display().to_string())],
        &sinks,
    )
    .await
    .unwrap();
    assert_eq!((stats.totals.input, stats.totals.out), (2, 2), "{stats:?}");
    let a = &stats.api_check;
    assert_eq!(
        (
            a.prs_checked,
            a.prs_mismatched,
            a.commits_not_in_git,
            a.commits_not_in_api,
            a.files_not_in_git,
            a.files_not_in_api,
            a.renames_from_api,
            a.commit_accounts
        ),
        (2, 1, 1, 0, 1, 0, 1, 2),
        "{a:?}"
    );
    let log = fake.log.lock().unwrap().clone();
    assert!(
        log.iter()
            .any(|l| l == "/repos/acme/widgets/pulls/7/files?page=2&per_page=2"),
        "the files list was followed to its second page: {log:?}"
    );
    // the counts reach stats/crawl.json
    let json: serde_json::Value =
        serde_json::from_slice(&store.get("runs/x/stats/crawl.json").await.unwrap()).unwrap();
    assert_eq!(json["api_check"]["files_not_in_git"], 1);

    let prs = records(store.as_ref(), "x").await;
    let p7 = &prs[0];
    assert_eq!(
        p7.extra["api_check"]["commits_not_in_git"],
        serde_json::json!([lost])
    );
    assert_eq!(
        p7.extra["api_check"]["files_not_in_git"],
        serde_json::json!(["ghost.py"])
    );
    assert_eq!(p7.commits[0].account.as_ref().unwrap().login, "alice");
    assert_eq!(
        p7.commits[1].account.as_ref().unwrap().kind,
        AuthorType::Bot
    );
    let moved = &p7.commits[1].files;
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert_eq!(
        (
            moved[0].path.as_str(),
            moved[0].old_path.as_deref(),
            moved[0].status
        ),
        ("new.py", Some("old.py"), FileStatus::Renamed)
    );
    // the record still replays to the PR head's tree
    let end = p7.replay().unwrap();
    assert_eq!(
        end.files["new.py"].as_deref(),
        Some("def rewritten():\n    return 1\n")
    );
    assert_eq!(end.files["old.py"], None);
    assert_eq!(end.files["a.py"].as_deref(), Some("x = 7\n"));
    let p8 = &prs[1];
    assert!(
        p8.extra["api_check"].get("files_not_in_git").is_none(),
        "{:?}",
        p8.extra
    );
}

#[tokio::test]
async fn prs_no_message_names_are_located_by_the_api() {
    let repo = tempfile::tempdir().unwrap();
    let d = repo.path();
    widgets_repo(d);
    // PR 20, rebase-merged: its two commits sit on main with their own messages
    std::fs::write(d.join("h.py"), "def helper():\n    return 1\n").unwrap();
    git(d, &["add", "-A"]);
    git(d, &["commit", "-q", "-m", "Add helper"]);
    std::fs::write(d.join("a.py"), "from h import helper\nx = helper()\n").unwrap();
    git(d, &["commit", "-q", "-am", "Use helper\n\nDetails."]);
    let m20 = git(d, &["rev-parse", "HEAD"]);
    // PR 21, squash-merged with an edited subject (no "(#21)")
    std::fs::write(d.join("a.py"), "from h import helper\nx = helper() + 1\n").unwrap();
    git(d, &["commit", "-q", "-am", "Tidy things up"]);
    let m21 = git(d, &["rev-parse", "HEAD"]);
    // PR 24, found by its message as usual
    std::fs::write(d.join("a.py"), "x = 24\n").unwrap();
    git(d, &["commit", "-q", "-am", "Fix (#24)"]);
    let m24 = git(d, &["rev-parse", "HEAD"]);

    let name = "acme/widgets".to_string();
    let mut data = Data::widgets();
    let alice = || user("alice", "User");
    data.pulls.insert(
        name.clone(),
        vec![
            pull_json(&name, 20, true, alice(), "helper", &m20),
            pull_json(&name, 21, true, alice(), "tidy", &m21),
            pull_json(&name, 22, false, alice(), "closed unmerged", ""),
            // merged per the API, but its merge commit is not in this clone
            pull_json(&name, 23, true, alice(), "elsewhere", &"ab".repeat(20)),
            pull_json(&name, 24, true, alice(), "fix", &m24),
        ],
    );
    data.commits.insert(
        (name.clone(), 20),
        vec![
            commit_json(&"1".repeat(40), "Add helper", Some(("bob", "User"))),
            commit_json(
                &"2".repeat(40),
                "Use helper\n\nDetails.",
                Some(("carol", "User")),
            ),
        ],
    );
    data.files.insert(
        (name.clone(), 20),
        vec![
            file_json("a.py", "modified", None),
            file_json("h.py", "added", None),
        ],
    );
    data.commits.insert(
        (name.clone(), 21),
        vec![
            commit_json(&"3".repeat(40), "wip", None),
            commit_json(&"4".repeat(40), "wip 2", None),
        ],
    );
    data.files.insert(
        (name.clone(), 21),
        vec![file_json("a.py", "modified", None)],
    );
    data.commits.insert(
        (name.clone(), 23),
        vec![commit_json(&"5".repeat(40), "x", None)],
    );
    data.commits.insert(
        (name.clone(), 24),
        vec![commit_json(&"6".repeat(40), "x", None)],
    );
    data.files.insert(
        (name.clone(), 24),
        vec![file_json("a.py", "modified", None)],
    );
    let (base, _fake) = serve_with(1000, false, data).await;
    let out = tempfile::tempdir().unwrap();
    let store = file_store(out.path()).await;
    let mut sinks = Sinks::new(store.clone());
    sinks.github = Some(client(&base, 1000, "tok-l"));
    let spec = RepoSpec {
        source: d.display().to_string(),
        name: Some(name.clone()),
        only: Some([20, 21, 22, 23, 24].into()),
    };
    let stats = pipeline::crawl_git(&checked("l"), &[spec], &sinks)
        .await
        .unwrap();
    assert_eq!((stats.totals.input, stats.totals.out), (5, 3), "{stats:?}");
    assert_eq!(stats.totals.drops.get("not_merged"), Some(&1));
    assert_eq!(stats.totals.drops.get("not_found_in_git"), Some(&1));
    assert_eq!(stats.api_check.located_by_api, 2);
    assert_eq!(stats.api_check.prs_mismatched, 0, "{:?}", stats.api_check);

    let prs = records(store.as_ref(), "l").await;
    assert_eq!(
        prs.iter().map(|p| p.number).collect::<Vec<_>>(),
        [20, 21, 24]
    );
    let p20 = &prs[0];
    assert_eq!(p20.extra["merge_style"], "rebase");
    assert_eq!(p20.extra["located_by"], "github-api");
    assert_eq!(p20.extra["api_check"]["commits_matched_by"], "subject");
    assert_eq!(p20.commits.len(), 2);
    assert_eq!(p20.commits[1].sha, m20);
    assert_eq!(p20.commits[0].account.as_ref().unwrap().login, "bob");
    assert_eq!(p20.title, "PR 20");
    let end = p20.replay().unwrap();
    assert_eq!(
        end.files["h.py"].as_deref(),
        Some("def helper():\n    return 1\n")
    );
    assert_eq!(
        end.files["a.py"].as_deref(),
        Some("from h import helper\nx = helper()\n")
    );
    let p21 = &prs[1];
    assert_eq!(
        (p21.extra["merge_style"].as_str(), p21.commits.len()),
        (Some("squash"), 1)
    );
    assert_eq!(p21.commits[0].sha, m21);
    assert!(!prs[2].extra.contains_key("located_by"));

    // a second run of the same crawl resumes from the complete checkpoint: same counts
    let again = pipeline::crawl_git(
        &checked("l"),
        &[RepoSpec {
            source: d.display().to_string(),
            name: Some(name),
            only: Some([20, 21, 22, 23, 24].into()),
        }],
        &sinks,
    )
    .await
    .unwrap();
    assert_eq!(again.totals, stats.totals);
    assert_eq!(again.api_check, stats.api_check);
}

/// Replica `a` fetches a paginated list and one PR through its cache; replica `b`, a separate
/// client on the same shared cache, gets a 304 for every one of those pages.
async fn replicas_share_etags(a: Arc<dyn ResponseCache>, b: Arc<dyn ResponseCache>) {
    let (base, fake) = serve_with(1000, false, Data::widgets()).await;
    let fetch = |cache: Arc<dyn ResponseCache>, token: &str| {
        let c = GithubClient::new(
            cfg(&base, 1000),
            vec![token.into()],
            Arc::new(MemoryBudget::default()),
        )
        .unwrap()
        .with_cache(cache);
        async move {
            let merged = c.merged_pulls("acme/widgets", 0).await.unwrap();
            let one = c
                .get("repos/acme/widgets/pulls/3")
                .await
                .unwrap()
                .unwrap()
                .body;
            (merged, one, c.stats.snapshot()["not_modified"])
        }
    };
    let (merged_a, one_a, nm_a) = fetch(a, "tok-a").await;
    assert_eq!(nm_a, 0);
    let pages = *fake.requests.lock().unwrap();
    assert_eq!(pages, 4, "3 list pages and one PR");
    let (merged_b, one_b, nm_b) = fetch(b, "tok-b").await;
    assert_eq!((merged_b, one_b), (merged_a, one_a));
    assert_eq!(nm_b, pages, "every page a fetched was a 304 for b");
    assert_eq!(*fake.not_modified.lock().unwrap(), pages);
    // the control: a client with its own cache gets full answers
    let own: Arc<dyn ResponseCache> = Arc::new(davinci_crawler::httpcache::MemoryCache::default());
    let (_, _, nm_c) = fetch(own, "tok-c").await;
    assert_eq!(nm_c, 0);
}

#[tokio::test]
async fn etags_are_shared_by_replicas_through_the_blob_store() {
    let dir = tempfile::tempdir().unwrap();
    // two stores opened on the same root, as two processes would
    let a = BlobCache::new(file_store(dir.path()).await);
    let b = BlobCache::new(file_store(dir.path()).await);
    replicas_share_etags(Arc::new(a), Arc::new(b)).await;
    assert_eq!(
        file_store(dir.path())
            .await
            .list(BlobCache::PREFIX)
            .await
            .unwrap()
            .len(),
        4
    );
}

#[tokio::test]
async fn etags_are_shared_by_replicas_through_redis() {
    let redis = match davinci_testkit::RedisServer::start() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("skipping: no redis-server ({e})");
            return;
        }
    };
    let a = RedisCache::connect(&redis.url(), "t:etag", 60)
        .await
        .unwrap();
    let b = RedisCache::connect(&redis.url(), "t:etag", 60)
        .await
        .unwrap();
    replicas_share_etags(Arc::new(a), Arc::new(b)).await;
}

#[tokio::test]
async fn trimmed_gharchive_candidates_are_settled_by_the_api() {
    use davinci_crawler::gharchive::{ArchiveCandidate, fill_from_api};
    let (base, _fake) = serve().await;
    let client =
        GithubClient::new(cfg(&base, 8), vec![], Arc::new(MemoryBudget::default())).unwrap();
    let trimmed = |n| ArchiveCandidate {
        repo: "acme/widgets".into(),
        number: n,
        merged: None,
        title: None,
        author: None,
        author_is_bot: false,
        merge_commit_sha: None,
        head_sha: Some("h".into()),
        base_ref: Some("main".into()),
        event_at: None,
    };
    let c = fill_from_api(&client, trimmed(3)).await.unwrap().unwrap();
    assert_eq!(
        (c.merged, c.title.as_deref(), c.author.as_deref()),
        (Some(true), Some("PR 3"), Some("alice"))
    );
    assert_eq!(
        c.merge_commit_sha.as_deref(),
        Some("0000000000000000000000000000000000000003")
    );
    let bot = fill_from_api(&client, trimmed(5)).await.unwrap().unwrap();
    assert!(bot.author_is_bot);
    assert!(
        fill_from_api(&client, trimmed(4)).await.unwrap().is_none(),
        "closed unmerged"
    );
    assert!(
        fill_from_api(&client, trimmed(99)).await.unwrap().is_none(),
        "unknown PR"
    );
}

/// The batched and the one-PR-at-a-time metadata paths write the same shards, and a batched
/// crawl stopped after any PR resumes to them.
#[tokio::test]
async fn batched_crawl_resumes_and_matches_the_rest_path() {
    use davinci_crawler::batch::BatchPages;
    use davinci_crawler::pipeline::Event;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let repo = tempfile::tempdir().unwrap();
    let d = repo.path();
    widgets_repo(d);
    for n in [1u64, 2, 3, 5] {
        std::fs::write(d.join("a.py"), format!("x = {n}\n")).unwrap();
        git(d, &["commit", "-q", "-am", &format!("subject {n} (#{n})")]);
    }
    let (base, _fake) = serve_with(1000, false, Data::widgets()).await;
    let specs = [RepoSpec::new(d.display().to_string())];
    let run = |api_batch: Option<BatchPages>| {
        let mut cfg = CrawlConfig::new("b");
        cfg.shard_records = 1;
        cfg.api_batch = api_batch;
        cfg
    };
    let batched = run(Some(BatchPages {
        prs: 2,
        ..Default::default()
    }));
    let crawl = |cfg: CrawlConfig, token: &'static str, stop_after: usize| {
        let (specs, base) = (specs.clone(), base.clone());
        async move {
            let dir = tempfile::tempdir().unwrap();
            let store = file_store(dir.path()).await;
            let mut sinks = Sinks::new(store.clone());
            sinks.github = Some(client(&base, 1000, token));
            if stop_after > 0 {
                let seen = Arc::new(AtomicUsize::new(0));
                let cancel = sinks.cancel.clone();
                sinks.events = Some(Arc::new(move |e| {
                    if matches!(e, Event::PrDone { .. })
                        && seen.fetch_add(1, Ordering::SeqCst) + 1 == stop_after
                    {
                        cancel.store(true, Ordering::SeqCst);
                    }
                }));
                let err = pipeline::crawl_git(&cfg, &specs, &sinks).await.unwrap_err();
                assert!(err.to_string().contains("cancelled"), "{err}");
                sinks.events = None;
                sinks.cancel.store(false, Ordering::SeqCst);
            }
            let stats = pipeline::crawl_git(&cfg, &specs, &sinks).await.unwrap();
            (stats, records(store.as_ref(), "b").await, dir)
        }
    };
    let (rest_stats, by_rest, _d1) = crawl(run(None), "tok-r", 0).await;
    let (stats, by_batch, _d2) = crawl(batched.clone(), "tok-b", 0).await;
    assert_eq!((stats.totals.input, stats.totals.out), (4, 3), "{stats:?}");
    assert_eq!(stats, rest_stats);
    assert_eq!(by_batch, by_rest);
    assert_eq!(by_batch[0].linked_issues.len(), 2);
    for stop_after in [1usize, 2, 3] {
        let (resumed, again, _d) = crawl(batched.clone(), "tok-s", stop_after).await;
        assert_eq!(resumed, stats, "stop after {stop_after}");
        assert_eq!(again, by_batch, "stop after {stop_after}");
    }
}
