//! PR fixtures for the tasks stage: a small Python package `acme/tiny` in a git repository
//! made here, whose merged PRs (as `davinci.pr/v1` records) cover every way a PR becomes a
//! task or is dropped, and a dependency wheel to install offline. Shared by the tasks
//! service's tests and the CLI's.
use anyhow::{Context, Result, ensure};
use davinci_core::pr::{Author, GitRef, PR_SCHEMA, PrSource, PullRequest, RepoMeta};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The interpreter environments are made from (visible in every sandbox under `/usr`).
pub const PYTHON: &str = "/usr/bin/python3";

fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
        .args(["-c", "commit.gpgsign=false"])
        .args(args)
        .output()
        .context("running git")?;
    ensure!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Writes `files` (path, content) under `dir`, making parent directories.
pub fn write(dir: &Path, files: &[(&str, &str)]) -> Result<()> {
    for (p, c) in files {
        let path = dir.join(p);
        std::fs::create_dir_all(path.parent().context("a file path has a parent")?)?;
        std::fs::write(&path, c).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn commit(dir: &Path, msg: &str, files: &[(&str, &str)]) -> Result<String> {
    write(dir, files)?;
    git(dir, &["add", "-A"])?;
    git(dir, &["commit", "-q", "-m", msg])?;
    git(dir, &["rev-parse", "HEAD"])
}

/// A pure wheel of `name` 1.0 in `dir`, written with zipfile (no build backend needed).
pub fn wheel(dir: &Path, name: &str) -> Result<()> {
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
    let st = Command::new(PYTHON).args(["-c", &script]).status()?;
    ensure!(st.success(), "writing the {name} wheel failed");
    Ok(())
}

/// A PR record of `acme/tiny` from `base` to `head`.
pub fn pr(n: u64, title: &str, base: &str, head: &str) -> PullRequest {
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

/// `{root}/tiny`, a package tested with unittest that needs `tinydep` (see [`wheel`]), and its
/// PRs #1 to #9: #1 fixes a failing test (kept: `test_add` fails to pass, `test_mul` passes to
/// pass), #2 is docs only (no_test_change), #3 tests only (no_code_change), #4 adds a coin-flip
/// test (flaky: no_fail_to_pass), #5's base pins a requirement that does not exist (its
/// environment fails to install), #6 changes JavaScript (unsupported_language), #7 touches four
/// code files (too_large with `select.max_files` 3), #8's head is not in the repository
/// (commit_missing), #9 has no base (no_base_commit).
pub fn tiny_repo(root: &Path) -> Result<(PathBuf, Vec<PullRequest>)> {
    let repo = root.join("tiny");
    std::fs::create_dir_all(&repo)?;
    git(&repo, &["init", "-q", "-b", "main"])?;
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
    )?;
    git(&repo, &["tag", "v0.1.0"])?;
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
    )?;
    let c2 = commit(
        &repo,
        "Docs (#2)",
        &[("README.md", "tiny: adds and multiplies\n")],
    )?;
    let c3 = commit(
        &repo,
        "More tests (#3)",
        &[(
            "tests/test_more.py",
            "import unittest\n\n\nclass More(unittest.TestCase):\n    def test_one(self):\n        self.assertTrue(True)\n",
        )],
    )?;
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
    )?;
    let c5 = commit(
        &repo,
        "pin a dependency",
        &[("requirements.txt", "doesnotexist-davinci==1.0\n")],
    )?;
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
    )?;
    let c7 = commit(
        &repo,
        "Widget (#6)",
        &[
            ("web/app.js", "export const x = 1;\n"),
            ("tests/test_web.py", "import unittest\n"),
        ],
    )?;
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
    )?;
    let records = vec![
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
    Ok((repo, records))
}

/// JSON Lines of `records`.
pub fn jsonl(records: &[PullRequest]) -> String {
    records
        .iter()
        .map(|r| serde_json::to_string(r).expect("a PR record serializes") + "\n")
        .collect()
}
