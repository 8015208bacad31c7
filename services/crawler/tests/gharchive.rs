//! GH Archive hours in every shape the feed has used (`merged`; `closed` with `merged`
//! true/false; `closed` trimmed of merge state), with duplicates inside and across hours,
//! resolved against the fake GitHub of `common`; and the real webhook payload of
//! `shared/data/github/webhooks` read as an archive event (skipped, saying so, when absent).
mod common;

use common::{Data, serve_with};
use davinci_crawler::budget::MemoryBudget;
use davinci_crawler::gharchive::{self, Shape};
use davinci_crawler::github::GithubClient;
use davinci_crawler::pipeline::{CrawlConfig, Sinks};
use davinci_crawler::sources::{self, Inputs};
use serde_json::{Value, json};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

fn event(repo: &str, n: u64, action: &str, pr: Value) -> Value {
    json!({"id": format!("{n}{action}"), "type": "PullRequestEvent", "actor": {"id": 1, "login": "alice"},
      "repo": {"id": 1, "name": repo, "url": format!("https://api.github.com/repos/{repo}")},
      "payload": {"action": action, "number": n, "pull_request": pr},
      "public": true, "created_at": "2025-11-01T00:00:00Z"})
}

/// The pull request as the feed trims it since 2025-10-07.
fn trimmed(repo: &str, n: u64) -> Value {
    json!({"url": format!("https://api.github.com/repos/{repo}/pulls/{n}"), "id": 1000 + n, "number": n,
      "head": {"ref": format!("f{n}"), "sha": "h"}, "base": {"ref": "main", "sha": "b"}})
}

/// The pull request as full payloads carried it before.
fn full(n: u64, merged: bool) -> Value {
    json!({"number": n, "state": "closed", "title": format!("PR {n}"), "merged": merged,
      "merged_at": if merged { json!("2025-09-01T00:00:00Z") } else { Value::Null },
      "user": {"login": "alice", "type": "User"}, "merge_commit_sha": format!("{n:040}")})
}

fn write_hour(dir: &Path, name: &str, events: &[Value]) -> String {
    let path = dir.join(name);
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&path).unwrap(),
        flate2::Compression::fast(),
    );
    for e in events {
        writeln!(gz, "{e}").unwrap();
    }
    writeln!(
        gz,
        r#"{{"type":"PushEvent","repo":{{"name":"acme/widgets"}},"payload":{{}}}}"#
    )
    .unwrap();
    gz.finish().unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn every_shape_once_per_pr_and_no_api_call_for_merged_events() {
    let w = "acme/widgets";
    let dir = tempfile::tempdir().unwrap();
    // The fake's acme/widgets: 1-3 merged by alice, 4 closed unmerged, 5 merged by a bot.
    let a = write_hour(
        dir.path(),
        "2025-11-01-0.json.gz",
        &[
            event(w, 1, "closed", trimmed(w, 1)),
            event(w, 1, "merged", trimmed(w, 1)),
            event(w, 2, "closed", full(2, true)),
            event(w, 2, "closed", full(2, true)),
            event(w, 3, "closed", trimmed(w, 3)),
            event(w, 4, "closed", trimmed(w, 4)),
            event(w, 5, "closed", trimmed(w, 5)),
            event(w, 9, "closed", full(9, false)),
            event(w, 7, "opened", trimmed(w, 7)),
        ],
    );
    let b = write_hour(
        dir.path(),
        "2025-11-01-1.json.gz",
        &[
            event(w, 1, "closed", trimmed(w, 1)),
            event(w, 3, "merged", trimmed(w, 3)),
            // unknown to the API: a `merged` event is taken as it is
            event(w, 6, "merged", trimmed(w, 6)),
        ],
    );
    let c = write_hour(
        dir.path(),
        "2025-11-01-2.json.gz",
        &[
            event(w, 8, "opened", trimmed(w, 8)),
            event(w, 8, "labeled", trimmed(w, 8)),
        ],
    );
    let (base, fake) = serve_with(1000, false, Data::widgets()).await;
    let api = GithubClient::new(
        common::cfg(&base, 1000),
        vec!["tok".into()],
        Arc::new(MemoryBudget::default()),
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let store = davinci_runtime::blob::open(
        &format!("file://{}", out.path().display()),
        &Default::default(),
    )
    .await
    .unwrap();
    let sinks = Sinks::new(store.clone());
    let mut cfg = CrawlConfig::new("ga");
    // nothing to clone from: the repository fails, the sources' stats are still written
    cfg.web_url = format!("file://{}", dir.path().join("web").display());
    cfg.cache_dir = dir.path().join("clones");
    let inputs = Inputs {
        gharchive: vec![a.clone(), b.clone(), c.clone()],
        ..Default::default()
    };
    let stats = sources::crawl(&cfg, &inputs, Some(&api), &Default::default(), &sinks)
        .await
        .unwrap();

    // only the trimmed closings nothing else settled went to the API
    assert_eq!(
        *fake.log.lock().unwrap(),
        ["/repos/acme/widgets/pulls/4", "/repos/acme/widgets/pulls/5"]
    );
    let json: Value =
        serde_json::from_slice(&store.get("runs/ga/stats/crawl.json").await.unwrap()).unwrap();
    let (ha, hb, hc) = (
        &json["gharchive"][&a],
        &json["gharchive"][&b],
        &json["gharchive"][&c],
    );
    assert_eq!(
        ha["events"],
        json!({"merged": 1, "closed_merged": 2, "closed_unmerged": 1, "closed_trimmed": 4, "other_action": 1}),
        "{json}"
    );
    assert_eq!(ha["candidates"], json!({"merged": 1, "closed_merged": 1}));
    assert_eq!((&ha["in"], &ha["out"]), (&json!(9), &json!(2)));
    assert_eq!(
        ha["drops"],
        json!({"duplicate_event": 3, "not_merged": 2, "bot_author": 1, "not_closed": 1})
    );
    assert_eq!(
        hb["events"],
        json!({"merged": 2, "closed_merged": 0, "closed_unmerged": 0, "closed_trimmed": 1, "other_action": 0})
    );
    assert_eq!(hb["candidates"], json!({"merged": 2}));
    assert_eq!(
        (&hb["in"], &hb["out"], &hb["drops"]),
        (&json!(3), &json!(2), &json!({"duplicate_event": 1}))
    );
    assert_eq!((&hc["in"], &hc["out"]), (&json!(2), &json!(0)));
    // the hour with pull-request events and no candidate is named in a warning
    assert_eq!(stats.warnings.len(), 1, "{:?}", stats.warnings);
    assert!(stats.warnings[0].contains(&c), "{:?}", stats.warnings);
    assert_eq!(json["warnings"], json!(stats.warnings));
    // exactly the merged PRs, each once, in one repository to crawl
    let res = sources::resolve(&cfg, &inputs, Some(&api), &Default::default(), &sinks)
        .await
        .unwrap();
    assert_eq!(res.repos.len(), 1);
    assert_eq!(res.repos[0].name.as_deref(), Some(w));
    assert_eq!(
        res.repos[0]
            .only
            .as_ref()
            .unwrap()
            .iter()
            .copied()
            .collect::<Vec<_>>(),
        [1, 2, 3, 6]
    );
}

#[tokio::test]
async fn trimmed_closings_without_an_api_stay_candidates() {
    let w = "acme/widgets";
    let dir = tempfile::tempdir().unwrap();
    let a = write_hour(
        dir.path(),
        "h.json.gz",
        &[
            event(w, 1, "closed", trimmed(w, 1)),
            event(w, 2, "merged", trimmed(w, 2)),
        ],
    );
    let store = davinci_runtime::blob::open(
        &format!("file://{}", dir.path().join("out").display()),
        &Default::default(),
    )
    .await
    .unwrap();
    let inputs = Inputs {
        gharchive: vec![a.clone()],
        ..Default::default()
    };
    let res = sources::resolve(
        &CrawlConfig::new("x"),
        &inputs,
        None,
        &Default::default(),
        &Sinks::new(store),
    )
    .await
    .unwrap();
    assert_eq!(
        res.gharchive[&a].candidates,
        [("closed_trimmed".to_string(), 1), ("merged".to_string(), 1)].into()
    );
    assert!(res.warnings.is_empty());
}

/// The octokit webhook example of a closed pull request (the full payload a GH Archive event
/// carried before the trimming), wrapped as an archive line: read as `closed` unmerged.
#[test]
fn real_closed_payload_reads_as_closed_unmerged() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/github/webhooks/pull_request.closed.json");
    let Ok(text) = std::fs::read_to_string(&p) else {
        eprintln!(
            "SKIP: {} is absent; the real payload shape is not checked",
            p.display()
        );
        return;
    };
    let hook: Value = serde_json::from_str(&text).unwrap();
    let line = json!({"id": "1", "type": "PullRequestEvent", "actor": hook["sender"],
        "repo": {"id": hook["repository"]["id"], "name": hook["repository"]["full_name"], "url": hook["repository"]["url"]},
        "payload": {"action": hook["action"], "number": hook["number"], "pull_request": hook["pull_request"]},
        "public": true, "created_at": hook["pull_request"]["closed_at"]});
    let hour = gharchive::read_hour(format!("{line}\n").as_bytes()).unwrap();
    assert_eq!(hour.events.len(), 1);
    let e = &hour.events[0];
    assert_eq!(e.shape, Shape::ClosedUnmerged);
    assert_eq!(
        e.cand.repo,
        hook["repository"]["full_name"].as_str().unwrap()
    );
    assert_eq!(Some(e.cand.number), hook["number"].as_u64());
    assert_eq!(
        e.cand.title.as_deref(),
        hook["pull_request"]["title"].as_str()
    );
    let (decided, stats) = gharchive::decide(&[hour]);
    assert!(decided.is_empty());
    assert_eq!(stats[0].counts.drops.get("not_merged"), Some(&1));
}
