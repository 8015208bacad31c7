//! Task building end to end on a fixture repository built here: a small package with tests
//! (unittest), a dependency installed from a local wheel directory (no network), and PRs
//! covering every drop reason: a fix of a failing test (kept), a docs-only PR, a tests-only
//! PR, a flaky test, a PR whose environment fails to install, a JavaScript change, a PR too
//! large, a PR whose head is not in the mirror, one without a base, and an unreadable record.
//! A second build reuses the finished shard; a fresh one gives the same lists.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use davinci_core::pr::{Author, GitRef, PR_SCHEMA, PrSource, PullRequest, RepoMeta};
use davinci_core::task::TaskInstance;
use davinci_runtime::blob::{self, BlobStore, S3Config};
use davinci_sandbox::{Backend, LocalConfig};
use davinci_tasks::batch::{Mirrors, run_batch};
use davinci_tasks::validate::Validation;
use davinci_tasks::{Stage, TasksConfig};

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn write(dir: &Path, files: &[(&str, &str)]) {
    for (p, c) in files {
        let path = dir.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, c).unwrap();
    }
}

fn commit(dir: &Path, msg: &str, files: &[(&str, &str)]) -> String {
    write(dir, files);
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", msg]);
    git(dir, &["rev-parse", "HEAD"])
}

/// A pure wheel of `name`, written with zipfile (no build backend needed).
fn wheel(dir: &Path, name: &str) {
    let script = format!(
        r#"
import zipfile, hashlib, base64
name, ver = "{name}", "1.0"
files = {{f"{{name}}/__init__.py": "VALUE = 1\n",
 f"{{name}}-{{ver}}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {{name}}\nVersion: {{ver}}\n",
 f"{{name}}-{{ver}}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: t\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}}
rec = []
with zipfile.ZipFile(f"{dir}/{{name}}-{{ver}}-py3-none-any.whl", "w") as z:
    for p, c in files.items():
        z.writestr(p, c)
        d = base64.urlsafe_b64encode(hashlib.sha256(c.encode()).digest()).rstrip(b"=").decode()
        rec.append(f"{{p}},sha256={{d}},{{len(c)}}")
    rec.append(f"{{name}}-{{ver}}.dist-info/RECORD,,")
    z.writestr(f"{{name}}-{{ver}}.dist-info/RECORD", "\n".join(rec) + "\n")
"#,
        dir = dir.display()
    );
    let st = Command::new(PYTHON).args(["-c", &script]).status().unwrap();
    assert!(st.success());
}

const PYTHON: &str = "/usr/bin/python3";

fn pr(n: u64, title: &str, base: &str, head: &str) -> PullRequest {
    PullRequest {
        schema: PR_SCHEMA.into(),
        id: PullRequest::make_id("acme/tiny", n),
        repo: RepoMeta {
            full_name: "acme/tiny".into(),
            ..Default::default()
        },
        number: n,
        title: title.into(),
        body: format!("body of {n}"),
        author: Author {
            login: "dev".into(),
            ..Default::default()
        },
        created_at: Some("2024-01-01T00:00:00Z".into()),
        merged_at: Some("2024-01-02T00:00:00Z".into()),
        base: GitRef {
            name: "main".into(),
            sha: base.into(),
        },
        head: GitRef {
            name: format!("pr-{n}"),
            sha: head.into(),
        },
        merge_commit_sha: head.into(),
        labels: vec![],
        linked_issues: vec![],
        commits: vec![],
        base_files: vec![],
        reviews: vec![],
        comments: vec![],
        source: PrSource::Git,
        extra: BTreeMap::new(),
    }
}

const CORE: &str = "def add(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n";
const TESTS: &str = "import unittest\n\nfrom tiny.core import mul\n\n\nclass CoreTests(unittest.TestCase):\n    def test_mul(self):\n        self.assertEqual(mul(2, 3), 6)\n";

/// The repository and its PR records (one shard, with one unreadable line).
fn fixture(root: &Path) -> (PathBuf, String) {
    let repo = root.join("tiny");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    let c0 = commit(
        &repo,
        "initial",
        &[
            (
                "setup.py",
                "from setuptools import setup\nsetup(name='tiny', version='0.1', packages=['tiny'], install_requires=['tinydep'])\n",
            ),
            ("tiny/__init__.py", ""),
            ("tiny/core.py", CORE),
            ("tests/__init__.py", ""),
            ("tests/test_core.py", TESTS),
            ("README.md", "tiny\n"),
        ],
    );
    git(&repo, &["tag", "v0.1.0"]);
    let c1 = commit(
        &repo,
        "Fix add (#1)",
        &[
            ("tiny/core.py", &CORE.replace("a - b", "a + b")),
            (
                "tests/test_core.py",
                &format!(
                    "{TESTS}\n    def test_add(self):\n        from tiny.core import add\n        self.assertEqual(add(1, 2), 3)\n"
                ),
            ),
        ],
    );
    let c2 = commit(
        &repo,
        "Docs (#2)",
        &[("README.md", "tiny: adds and multiplies\n")],
    );
    let c3 = commit(
        &repo,
        "More tests (#3)",
        &[(
            "tests/test_more.py",
            "import unittest\n\n\nclass More(unittest.TestCase):\n    def test_one(self):\n        self.assertTrue(True)\n",
        )],
    );
    let c4 = commit(
        &repo,
        "Half (#4)",
        &[
            ("tiny/extra.py", "def half(x):\n    return x / 2\n"),
            (
                "tests/test_coin.py",
                "import os\nimport unittest\n\n\nclass Coin(unittest.TestCase):\n    def test_coin(self):\n        self.assertTrue(os.urandom(1)[0] % 2)\n",
            ),
        ],
    );
    let c5 = commit(
        &repo,
        "pin a dependency",
        &[("requirements.txt", "doesnotexist-davinci==1.0\n")],
    );
    let c6 = commit(
        &repo,
        "Sub (#5)",
        &[
            ("tiny/sub.py", "def sub(a, b):\n    return a - b\n"),
            (
                "tests/test_sub.py",
                "import unittest\n\nfrom tiny.sub import sub\n\n\nclass Sub(unittest.TestCase):\n    def test_sub(self):\n        self.assertEqual(sub(3, 1), 2)\n",
            ),
        ],
    );
    let c7 = commit(
        &repo,
        "Widget (#6)",
        &[
            ("web/app.js", "export const x = 1;\n"),
            ("tests/test_web.py", "import unittest\n"),
        ],
    );
    let c8 = commit(
        &repo,
        "Many (#7)",
        &[
            ("tiny/a.py", "A = 1\n"),
            ("tiny/b.py", "B = 1\n"),
            ("tiny/c.py", "C = 1\n"),
            ("tiny/d.py", "D = 1\n"),
            ("tests/test_many.py", "import unittest\n"),
        ],
    );
    let records = [
        pr(1, "Fix add", &c0, &c1),
        pr(2, "Docs", &c1, &c2),
        pr(3, "More tests", &c2, &c3),
        pr(4, "Half", &c3, &c4),
        pr(5, "Sub", &c5, &c6),
        pr(6, "Widget", &c6, &c7),
        pr(7, "Many", &c7, &c8),
        pr(8, "Lost", &c0, "0123456789abcdef0123456789abcdef01234567"),
        pr(9, "No base", "", &c1),
    ];
    let mut lines: Vec<String> = records
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect();
    lines.insert(3, "{\"schema\": \"davinci.pr/v1\", \"id\": 7".into());
    (repo, lines.join("\n") + "\n")
}

fn config(wheels: &Path) -> TasksConfig {
    let mut cfg = TasksConfig::default();
    cfg.env.python = PYTHON.into();
    cfg.env.pip_args = vec![
        "--no-index".into(),
        "--find-links".into(),
        wheels.display().to_string(),
        "--no-build-isolation".into(),
    ];
    cfg.env.ro_binds = vec![wheels.to_path_buf()];
    cfg.env.build_timeout_secs = 300;
    // A coin-flip test goes unnoticed on both sides with probability 2^-14 at 8 runs.
    cfg.validate.runs = 8;
    cfg.select.max_files = 3;
    cfg.test_timeout_secs = 60;
    cfg.sandbox = Backend::Local(LocalConfig::default());
    cfg
}

async fn tasks_of(out: &dyn BlobStore) -> Vec<TaskInstance> {
    let mut v = Vec::new();
    for m in out.list("tasks/").await.unwrap() {
        if m.key.ends_with(".jsonl.zst") && !m.key.contains("/logs/") {
            let data = out.get(&m.key).await.unwrap();
            v.extend(davinci_runtime::shard::decode_jsonl_zst::<TaskInstance>(&data).unwrap());
        }
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixture_prs_cover_every_drop_reason_and_rebuild_the_same() {
    if davinci_sandbox::BwrapSandbox::new(LocalConfig::default()).is_err() {
        davinci_sandbox::testing::skip("task building", "bubblewrap is not usable here");
        return;
    }
    // Not under /tmp: each sandbox has its own /tmp, so binds there would be hidden.
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let wheels = tmp.path().join("wheels");
    std::fs::create_dir_all(&wheels).unwrap();
    wheel(&wheels, "tinydep");
    let (repo, shard) = fixture(tmp.path());
    let input_dir = tmp.path().join("in");
    write(&input_dir, &[("prs/0000.jsonl", &shard)]);
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
    let stage = Stage::open(config(&wheels), &env_root, &tmp.path().join("work"))
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
