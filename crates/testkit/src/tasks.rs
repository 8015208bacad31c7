//! Executable task fixtures: a tiny git repository with a bug, its fix and a test that shows
//! it, as a validated `TaskInstance` (the shape the tasks stage writes), for tests of the agent
//! and the rollout stage on the local sandbox backend.
use anyhow::{Context, Result, ensure};
use davinci_core::task::{TaskEnv, TaskInstance};
use std::path::Path;
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=fixture",
            "-c",
            "user.email=fixture@example.com",
        ])
        .args([
            "-c",
            "commit.gpgsign=false",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .context("running git")?;
    ensure!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Prints one `PASSED`/`FAILED tests/test_text.py::name` line per test, as `pytest -rA` does,
/// with the standard library only (the sandbox has no pytest).
const RUNNER: &str = r#"import sys, traceback
sys.path.insert(0, ".")
import tests.test_text as m
for name in sorted(n for n in dir(m) if n.startswith("test_")):
    try:
        getattr(m, name)()
        print("PASSED tests/test_text.py::" + name)
    except Exception as e:
        print("FAILED tests/test_text.py::" + name + " - " + type(e).__name__)
"#;

/// `{root}/{owner}__{name}/`, a git clone the SWE-bench harness checks out at the task's base
/// commit; returns the task. `n` numbers the task (`acme__textkit-{n}`), so several tasks can
/// share the clone: task `n` asks `shout(text, n + 1)` for `n + 1` exclamation marks.
pub fn textkit_task(root: &Path, n: usize) -> Result<TaskInstance> {
    let repo = root.join("acme__textkit");
    if !repo.join(".git").is_dir() {
        std::fs::create_dir_all(repo.join("textkit"))?;
        std::fs::create_dir_all(repo.join("tests"))?;
        git(&repo, &["init", "-q"])?;
        std::fs::write(repo.join("textkit/__init__.py"), "")?;
        std::fs::write(
            repo.join("textkit/core.py"),
            "def shout(text, n=1):\n    \"\"\"Upper-cases `text` and adds `n` exclamation marks.\"\"\"\n    return text.upper() + \"!\"\n\n\ndef whisper(text):\n    return text.lower()\n",
        )?;
        std::fs::write(repo.join("tests/__init__.py"), "")?;
        std::fs::write(
            repo.join("tests/test_text.py"),
            "from textkit.core import shout, whisper\n\n\ndef test_whisper():\n    assert whisper(\"HeLLo\") == \"hello\"\n\n\ndef test_shout_once():\n    assert shout(\"hi\") == \"HI!\"\n",
        )?;
        std::fs::write(repo.join("run_tests.py"), RUNNER)?;
        git(&repo, &["add", "."])?;
        git(&repo, &["commit", "-qm", "textkit"])?;
    }
    let base = git(&repo, &["rev-parse", "HEAD"])?.trim().to_string();
    let m = n + 1;
    let core = std::fs::read_to_string(repo.join("textkit/core.py"))?;
    std::fs::write(
        repo.join("textkit/core.py"),
        core.replace(
            "return text.upper() + \"!\"",
            "return text.upper() + \"!\" * n",
        ),
    )?;
    let patch = git(&repo, &["diff"])?;
    git(&repo, &["checkout", "-q", "."])?;
    let tests = std::fs::read_to_string(repo.join("tests/test_text.py"))?;
    std::fs::write(
        repo.join("tests/test_text.py"),
        format!(
            "{tests}\n\ndef test_shout_many():\n    assert shout(\"hi\", {m}) == \"HI\" + \"!\" * {m}\n"
        ),
    )?;
    let test_patch = git(&repo, &["diff"])?;
    git(&repo, &["checkout", "-q", "."])?;
    Ok(TaskInstance {
        instance_id: format!("acme__textkit-{n}"),
        repo: "acme/textkit".into(),
        base_commit: base,
        patch,
        test_patch,
        problem_statement: format!(
            "`shout(text, n)` ignores `n`: `shout(\"hi\", {m})` returns \"HI!\" instead of \"HI{}\".",
            "!".repeat(m)
        ),
        fail_to_pass: vec!["tests/test_text.py::test_shout_many".into()],
        pass_to_pass: vec![
            "tests/test_text.py::test_shout_once".into(),
            "tests/test_text.py::test_whisper".into(),
        ],
        env: TaskEnv {
            test_cmd: Some("python3 run_tests.py".into()),
            log_parser: Some("pytest".into()),
            ..Default::default()
        },
        ..Default::default()
    })
}
