//! Task building end to end on a fixture repository built here: a small package with tests
//! (unittest), a dependency installed from a local wheel directory (no network), and PRs
//! covering every drop reason: a fix of a failing test (kept), a docs-only PR, a tests-only
//! PR, a flaky test, a PR whose environment fails to install, a JavaScript change, a PR too
//! large, a PR whose head is not in the mirror, one without a base, and an unreadable record.
//! A second build reuses the finished shard; a fresh one gives the same lists.
mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use davinci_runtime::blob::{self, BlobStore, S3Config};
use davinci_tasks::Stage;
use davinci_tasks::batch::{Mirrors, run_batch};
use davinci_tasks::validate::Validation;
use davinci_testkit::prs;

use common::{config, tasks_of};

/// The fixture's PRs as one shard, with an unreadable line among them.
fn shard(records: &[davinci_core::pr::PullRequest]) -> String {
    let text = prs::jsonl(records);
    let mut lines: Vec<&str> = text.lines().collect();
    lines.insert(3, "{\"schema\": \"davinci.pr/v1\", \"id\": 7");
    lines.join("\n") + "\n"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixture_prs_cover_every_drop_reason_and_rebuild_the_same() {
    if !common::bwrap_usable("task building") {
        return;
    }
    // Not under /tmp: each sandbox has its own /tmp, so binds there would be hidden.
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let wheels = common::wheels(tmp.path());
    let (repo, records) = prs::tiny_repo(tmp.path()).unwrap();
    let input_dir = tmp.path().join("in");
    prs::write(&input_dir, &[("prs/0000.jsonl", &shard(&records))]).unwrap();
    let s3 = S3Config::default();
    let input = blob::open(input_dir.to_str().unwrap(), &s3).await.unwrap();
    let inputs = vec![(input.clone(), "prs/0000.jsonl".to_string())];
    let mirrors = Mirrors {
        named: [("acme/tiny".to_string(), repo.clone())].into(),
        dir: None,
    };
    let env_root = tmp.path().join("envs");
    let out_dir = tmp.path().join("out");
    let out = blob::open(out_dir.to_str().unwrap(), &s3).await.unwrap();
    // A coin-flip test goes unnoticed on both sides with probability 2^-14 at 8 runs.
    let stage = Stage::open(config(&wheels, 8), &env_root, &tmp.path().join("work"))
        .await
        .unwrap();
    let r = run_batch(&stage, &mirrors, &inputs, out.clone(), &|_| {})
        .await
        .unwrap();
    let s = &r.stats;
    eprintln!("{}", serde_json::to_string_pretty(s).unwrap());
    assert_eq!((s.prs, s.bad_records, s.candidates, s.kept), (10, 1, 3, 1));
    let want: BTreeMap<String, u64> = [
        ("no_test_change", 1),
        ("no_code_change", 1),
        ("no_fail_to_pass", 1),
        ("unsupported_language", 1),
        ("too_large", 1),
        ("commit_missing", 1),
        ("no_base_commit", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(s.drops, want);
    assert_eq!(s.infra, [("env_build_failed".to_string(), 1)].into());
    assert_eq!((s.envs_built, s.envs_cached, s.envs_failed), (1, 1, 1));

    let tasks = tasks_of(out.as_ref()).await;
    assert_eq!(tasks.len(), 1);
    let t = &tasks[0];
    assert_eq!(t.instance_id, "acme__tiny-1");
    assert_eq!(t.version, "0.1");
    assert_eq!(t.metadata.problem_source.as_deref(), Some("pr"));
    assert_eq!(t.problem_statement, "Fix add\nbody of 1\n");
    assert_eq!(
        t.fail_to_pass,
        ["test_add (tests.test_core.CoreTests.test_add)"]
    );
    assert_eq!(
        t.pass_to_pass,
        ["test_mul (tests.test_core.CoreTests.test_mul)"]
    );
    assert!(t.patch.contains("tiny/core.py") && !t.patch.contains("tests/"));
    assert!(t.test_patch.starts_with("diff --git a/tests/test_core.py"));
    assert_eq!(t.env.log_parser.as_deref(), Some("unittest"));
    let venv = env_root
        .join("acme__tiny")
        .join(t.env.recipe_hash.as_deref().unwrap())
        .join("venv/bin/python");
    assert!(venv.exists(), "{}", venv.display());
    // The published shape: lists, SWE-bench columns.
    let row = serde_json::to_value(t).unwrap();
    assert!(row["FAIL_TO_PASS"].is_array());

    // Logs of every validated task; the coin flip is recorded as flaky.
    let v: Validation = serde_json::from_slice(
        &out.get("tasks/logs/acme__tiny-4/validation.json")
            .await
            .unwrap(),
    )
    .unwrap();
    assert!(
        v.flaky
            .contains(&"test_coin (tests.test_coin.Coin.test_coin)".to_string()),
        "{v:?}"
    );
    assert!(out.get("tasks/logs/acme__tiny-1/after-0.log").await.is_ok());
    assert!(out.get("tasks/logs/acme__tiny-1/gold.log").await.is_ok());
    let env_log = out.get("tasks/logs/acme__tiny-5/env.log").await.unwrap();
    assert!(
        String::from_utf8_lossy(&env_log).contains("doesnotexist-davinci"),
        "the install log says what failed"
    );
    assert!(out.get("stats/tasks.json").await.is_ok());

    // Run again: the shard is reused as committed.
    let again = run_batch(&stage, &mirrors, &inputs, out.clone(), &|_| {})
        .await
        .unwrap();
    assert_eq!(again.reused, 1);
    assert_eq!(again.stats, r.stats);
    // A fresh output (environments cached) computes the same lists.
    let out2 = blob::open(tmp.path().join("out2").to_str().unwrap(), &s3)
        .await
        .unwrap();
    let fresh = run_batch(&stage, &mirrors, &inputs, out2.clone(), &|_| {})
        .await
        .unwrap();
    assert_eq!(fresh.stats.kept, 1);
    assert_eq!(
        fresh.stats.envs_built, 0,
        "environments come from the cache"
    );
    let t2 = tasks_of(out2.as_ref()).await;
    assert_eq!(
        (t2[0].fail_to_pass.clone(), t2[0].pass_to_pass.clone()),
        (t.fail_to_pass.clone(), t.pass_to_pass.clone())
    );
    let _: Arc<dyn BlobStore> = out;
}
