//! The gRPC service (called in-process) and the per-repository queue worker on a small fixture;
//! GH Archive and discovery inputs against the fake GitHub of `common`.
mod common;

use davinci_crawler::pipeline::CrawlConfig;
use davinci_crawler::serve::{self, CrawlerService, REPO_TOPIC};
use davinci_proto::v1::crawler_server::Crawler;
use davinci_proto::v1::{CrawlSpec, JobRef, JobState, StartCrawlRequest};
use davinci_runtime::blob::S3Config;
use davinci_runtime::jobs::JobRegistry;
use davinci_runtime::queue::{MemoryQueue, QueueOptions, WorkQueue};
use futures::StreamExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use tonic::Request;

fn git(dir: &Path, args: &[&str]) {
    let st = Command::new("git")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&st.stderr)
    );
}

/// Three squash PRs and one merge PR in repository `name`.
fn tiny_repo(name: &str) -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    git(d, &["init", "-q", "-b", "main"]);
    git(d, &["config", "user.name", "A"]);
    git(d, &["config", "user.email", "a@example.com"]);
    git(
        d,
        &[
            "remote",
            "add",
            "origin",
            &format!("git@github.com:{name}.git"),
        ],
    );
    std::fs::write(d.join("a.py"), "x = 0\n").unwrap();
    git(d, &["add", "-A"]);
    git(d, &["commit", "-q", "-m", "init"]);
    for n in 1..=3 {
        std::fs::write(d.join("a.py"), format!("x = {n}\n")).unwrap();
        git(d, &["commit", "-q", "-am", &format!("Set x to {n} (#{n})")]);
    }
    git(d, &["checkout", "-q", "-b", "f"]);
    std::fs::write(d.join("b.py"), "y = 1\n").unwrap();
    git(d, &["add", "-A"]);
    git(d, &["commit", "-q", "-m", "add b"]);
    git(d, &["checkout", "-q", "main"]);
    git(
        d,
        &[
            "merge",
            "-q",
            "--no-ff",
            "-m",
            "Merge pull request #4 from a/f\n\nAdd b",
            "f",
        ],
    );
    t
}

#[tokio::test]
async fn grpc_start_watch_get_and_refuse_bad_specs() {
    let repo = tiny_repo("acme/tiny");
    let out = tempfile::tempdir().unwrap();
    let svc = CrawlerService::new(
        JobRegistry::in_memory().await,
        S3Config::default(),
        CrawlConfig::new("x"),
        None,
    );
    let spec = CrawlSpec {
        repos: vec![repo.path().display().to_string()],
        out: format!("file://{}", out.path().display()),
        subset: "python".into(),
        ..Default::default()
    };
    let job = svc
        .start_crawl(Request::new(StartCrawlRequest {
            run_id: "r1".into(),
            spec: Some(spec.clone()),
        }))
        .await
        .unwrap()
        .into_inner();
    let mut events = svc
        .watch_crawl(Request::new(JobRef {
            job_id: job.job_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(ev) = events.next().await {
        last = Some(ev.unwrap());
    }
    assert_eq!(last.unwrap().state, JobState::Succeeded as i32);
    let job = svc
        .get_crawl(Request::new(JobRef { job_id: job.job_id }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.counters.get("records_out"), Some(&4), "{job:?}");
    assert!(
        job.outputs
            .iter()
            .any(|o| o.ends_with("runs/r1/stats/crawl.json"))
    );
    assert!(out.path().join("runs/r1/stats/crawl.json").exists());

    let mut bad = spec.clone();
    bad.subset = "rust".into();
    let err = svc
        .start_crawl(Request::new(StartCrawlRequest {
            run_id: "r2".into(),
            spec: Some(bad),
        }))
        .await
        .unwrap_err();
    assert!(err.message().contains("spec.subset"), "{err:?}");
    let mut bad = spec;
    bad.out = String::new();
    let err = svc
        .start_crawl(Request::new(StartCrawlRequest {
            run_id: "r2".into(),
            spec: Some(bad),
        }))
        .await
        .unwrap_err();
    assert!(err.message().contains("spec.out"), "{err:?}");
    assert!(
        svc.get_crawl(Request::new(JobRef {
            job_id: "nope".into()
        }))
        .await
        .is_err()
    );
}

/// Every file under `dir/runs/{run}` except the shared job's scratch space.
fn run_files(dir: &Path, run: &str) -> std::collections::BTreeMap<String, Vec<u8>> {
    let base = dir.join("runs").join(run);
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![base.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(&base).unwrap().display().to_string();
            if rel.starts_with("work") || rel.starts_with("crawl/checkpoints") {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

async fn crawl_to_end(svc: &CrawlerService, run: &str, spec: CrawlSpec) -> davinci_proto::v1::Job {
    let job = svc
        .start_crawl(Request::new(StartCrawlRequest {
            run_id: run.into(),
            spec: Some(spec),
        }))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..600 {
        let j = svc
            .get_crawl(Request::new(JobRef {
                job_id: job.job_id.clone(),
            }))
            .await
            .unwrap()
            .into_inner();
        if j.state == JobState::Succeeded as i32 || j.state == JobState::Failed as i32 {
            return j;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("crawl {run} did not end");
}

#[tokio::test]
async fn replicas_share_a_crawl_by_repository() {
    let (r1, r2) = (tiny_repo("acme/one"), tiny_repo("acme/two"));
    let out = tempfile::tempdir().unwrap();
    let spec = CrawlSpec {
        repos: vec![
            r1.path().display().to_string(),
            r2.path().display().to_string(),
            "/nonexistent/repository".into(),
        ],
        out: format!("file://{}", out.path().display()),
        ..Default::default()
    };
    let one = CrawlerService::new(
        JobRegistry::in_memory().await,
        S3Config::default(),
        CrawlConfig::new("x"),
        None,
    );
    let j = crawl_to_end(&one, "alone", spec.clone()).await;
    assert_eq!(j.state, JobState::Succeeded as i32, "{}", j.error);

    let queue: Arc<dyn WorkQueue> = Arc::new(MemoryQueue::new(QueueOptions {
        max_attempts: 2,
        ..Default::default()
    }));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let workers: Vec<_> = ["w1", "w2"]
        .into_iter()
        .map(|c| {
            tokio::spawn(serve::worker(
                queue.clone(),
                CrawlConfig::new("unused"),
                None,
                c.into(),
                S3Config::default(),
                shutdown.clone(),
            ))
        })
        .collect();
    let shared = CrawlerService::new(
        JobRegistry::in_memory().await,
        S3Config::default(),
        CrawlConfig::new("x"),
        None,
    )
    .with_queue(queue.clone());
    let j2 = crawl_to_end(&shared, "shared", spec).await;
    assert_eq!(j2.state, JobState::Succeeded as i32, "{}", j2.error);
    assert_eq!(j2.counters["records_out"], 8);
    assert_eq!(j2.counters["repos_failed"], 1);
    shutdown.cancel();
    let mut handled = 0;
    for w in workers {
        handled += w.await.unwrap().unwrap();
    }
    assert_eq!(handled, 2, "each good repository crawled once");
    // The bad repository is dead-lettered with its error and reported in the stats.
    let dead = queue.dead_letters(REPO_TOPIC).await.unwrap();
    assert_eq!(dead.len(), 1);
    let stats: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.path().join("runs/shared/stats/crawl.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (stats["in"].as_u64(), stats["out"].as_u64()),
        (Some(8), Some(8))
    );
    assert!(
        stats["failed_repos"]["/nonexistent/repository"].is_string(),
        "{stats}"
    );
    // Shards and stats are those of the one-process crawl (up to the run id in the stats).
    let (a, b) = (
        run_files(out.path(), "alone"),
        run_files(out.path(), "shared"),
    );
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, v) in &a {
        let w = &b[k];
        if k.starts_with("stats/") {
            let x = String::from_utf8_lossy(v).replace("alone", "shared");
            assert_eq!(x, String::from_utf8_lossy(w), "{k}");
        } else {
            assert_eq!(v, w, "{k} differs");
        }
    }
}

/// A bare clone of `src` at `{web}/{name}.git` that serves blobless clones.
fn publish(src: &Path, web: &Path, name: &str) {
    let bare = web.join(format!("{name}.git"));
    std::fs::create_dir_all(bare.parent().unwrap()).unwrap();
    git(
        web,
        &[
            "clone",
            "-q",
            "--bare",
            &src.display().to_string(),
            &bare.display().to_string(),
        ],
    );
    git(&bare, &["config", "uploadpack.allowFilter", "true"]);
}

/// Runs a crawl job to its end through the gRPC service; returns the job.
async fn run_to_end(svc: &CrawlerService, run: &str, spec: CrawlSpec) -> davinci_proto::v1::Job {
    let job = svc
        .start_crawl(Request::new(StartCrawlRequest {
            run_id: run.into(),
            spec: Some(spec),
        }))
        .await
        .unwrap()
        .into_inner();
    let mut events = svc
        .watch_crawl(Request::new(JobRef {
            job_id: job.job_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    while events.next().await.is_some() {}
    svc.get_crawl(Request::new(JobRef { job_id: job.job_id }))
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn grpc_crawls_gharchive_hours_and_discovered_repositories() {
    use common::{Data, pull_json, repo_json, user};
    use std::io::Write;
    // acme/tiny is named by GH Archive, acme/found by discovery; both are cloned from `web`
    let (tiny, found) = (tiny_repo("acme/tiny"), tiny_repo("acme/found"));
    let web = tempfile::tempdir().unwrap();
    publish(tiny.path(), web.path(), "acme/tiny");
    publish(found.path(), web.path(), "acme/found");
    // one hour: PR 2 of acme/tiny merged (full payload), PR 3 trimmed (the API settles it as
    // merged), PR 9 of acme/gone trimmed and closed unmerged per the API (never cloned: there
    // is no such clone), PR 4 of acme/tiny only opened
    let event = |repo: &str, n: u64, action: &str, pr: serde_json::Value| {
        serde_json::json!({"id": format!("{n}"), "type": "PullRequestEvent", "actor": {"login": "alice"},
          "repo": {"id": 1, "name": repo, "url": "u"}, "public": true, "created_at": "2025-11-01T00:00:00Z",
          "payload": {"action": action, "number": n, "pull_request": pr}})
    };
    let trimmed = |n: u64| serde_json::json!({"url": "u", "id": n, "number": n, "head": {"ref": "x", "sha": "h"}, "base": {"ref": "main", "sha": "b"}});
    let hour = web.path().join("2025-11-01-0.json.gz");
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&hour).unwrap(),
        flate2::Compression::fast(),
    );
    for ev in [
        event(
            "acme/tiny",
            2,
            "closed",
            serde_json::json!({"number": 2, "merged": true, "title": "Set x to 2", "user": {"login": "alice", "type": "User"}}),
        ),
        event("acme/tiny", 3, "closed", trimmed(3)),
        event("acme/gone", 9, "closed", trimmed(9)),
        event("acme/tiny", 4, "opened", trimmed(4)),
        serde_json::json!({"type": "PushEvent", "repo": {"name": "acme/tiny"}, "payload": {}}),
    ] {
        writeln!(gz, "{ev}").unwrap();
    }
    gz.finish().unwrap();

    let mut data = Data {
        repos: vec![
            repo_json("acme/archived", 900, true, "MIT", "Python"),
            repo_json("acme/found", 50, false, "MIT", "Python"),
            repo_json("acme/unloved", 2, false, "MIT", "Python"),
        ],
        ..Default::default()
    };
    let alice = || user("alice", "User");
    data.pulls.insert(
        "acme/tiny".into(),
        vec![pull_json("acme/tiny", 3, true, alice(), "b", "")],
    );
    data.pulls.insert(
        "acme/gone".into(),
        vec![pull_json("acme/gone", 9, false, alice(), "b", "")],
    );
    let (api, fake) = common::serve_with(1000, false, data).await;

    let out = tempfile::tempdir().unwrap();
    let clones = tempfile::tempdir().unwrap();
    let mut base = CrawlConfig::new("x");
    base.web_url = format!("file://{}", web.path().display());
    base.cache_dir = clones.path().to_path_buf();
    let svc = CrawlerService::new(
        JobRegistry::in_memory().await,
        S3Config::default(),
        base,
        None,
    );
    let spec = CrawlSpec {
        gharchive: vec![hour.display().to_string()],
        languages: vec!["Python".into()],
        min_stars: 5,
        github_api_url: api.clone(),
        out: format!("file://{}", out.path().display()),
        ..Default::default()
    };
    let job = run_to_end(&svc, "ga", spec.clone()).await;
    assert_eq!(job.state, JobState::Succeeded as i32, "{job:?}");
    assert_eq!(job.counters.get("repos_discovered"), Some(&1), "{job:?}");
    assert_eq!(
        job.counters.get("gharchive_candidates"),
        Some(&2),
        "{job:?}"
    );
    // acme/tiny: PRs 2 and 3 only; acme/found: all four
    assert_eq!(job.counters.get("records_out"), Some(&6), "{job:?}");
    let stats: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.path().join("runs/ga/stats/crawl.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(stats["discovered"], serde_json::json!(["acme/found"]));
    let hour_counts = &stats["gharchive"][hour.display().to_string()];
    assert_eq!(
        (&hour_counts["in"], &hour_counts["out"]),
        (&serde_json::json!(4), &serde_json::json!(2)),
        "{stats}"
    );
    assert_eq!(hour_counts["drops"]["not_merged"], 1, "{stats}");
    assert_eq!(hour_counts["drops"]["not_closed"], 1, "{stats}");
    assert_eq!(stats["repos"]["acme/tiny"]["out"], 2, "{stats}");
    assert_eq!(stats["repos"]["acme/found"]["out"], 4, "{stats}");
    assert!(
        stats
            .get("failed_repos")
            .unwrap()
            .as_object()
            .unwrap()
            .is_empty(),
        "{stats}"
    );
    let log = fake.log.lock().unwrap().clone();
    assert!(
        log.iter().any(|l| l.starts_with("/search/repositories?")),
        "{log:?}"
    );
    assert!(
        log.iter().any(|l| l == "/repos/acme/gone/pulls/9"),
        "{log:?}"
    );
    // the spec's client kept its ETags beside the run's output
    assert!(out.path().join("cache/github").read_dir().unwrap().count() >= 3);

    // discovery needs a GitHub client: none configured and none in the spec
    let mut no_api = spec.clone();
    no_api.github_api_url = String::new();
    let err = svc
        .start_crawl(Request::new(StartCrawlRequest {
            run_id: "gb".into(),
            spec: Some(no_api),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    let mut bad = spec;
    bad.gharchive = vec!["https://data.gharchive.org/2025-11-01-0.json.gz".into()];
    let err = svc
        .start_crawl(Request::new(StartCrawlRequest {
            run_id: "gc".into(),
            spec: Some(bad),
        }))
        .await
        .unwrap_err();
    assert!(err.message().contains("spec.gharchive[0]"), "{err:?}");
}
