//! A deterministic environment recipe from the repository at its base commit: which Python,
//! which requirement files and extra packages, how the repository installs and how its tests
//! run. Read in this order, first match winning where they overlap:
//!
//! * `pyproject.toml`: `[project.optional-dependencies]` and PEP 735 `[dependency-groups]`
//!   named test/tests/testing (then dev), `[tool.pytest.ini_options]`;
//! * `setup.cfg`: `[options.extras_require]` of those names, `[tool:pytest]`;
//! * `setup.py`: an `extras_require` key of those names (install as `.[name]`);
//! * requirement files: `requirements/tests.txt`, `requirements-test.txt`, … (the test ones),
//!   then `requirements.txt`;
//! * `tox.ini`: `[testenv] deps` (plain requirements and `-r` files), `[pytest]`;
//! * `pytest.ini`, `conftest.py`: the suite is pytest's.
//!
//! A suite with none of pytest's marks runs under `python -m unittest -v`. The recipe hash
//! covers the recipe and every file it was read from, so a changed dependency file builds a
//! new environment and an unchanged one reuses the built venv.

use std::collections::BTreeMap;
use std::path::Path;

use davinci_core::task::TaskEnv;
use davinci_swebench::patch::TestPathRule;
use davinci_swebench::specs::{diff_files, shell_quote};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Where the sandbox mounts the repository (SWE-bench's `/testbed`).
pub const MOUNT: &str = "/testbed";

/// Names of extras / dependency groups that hold test requirements, best first.
const TEST_EXTRAS: [&str; 4] = ["tests", "test", "testing", "dev"];

/// Requirement files that hold test requirements, best first.
const TEST_REQS: [&str; 9] = [
    "requirements/tests.txt",
    "requirements/test.txt",
    "requirements/testing.txt",
    "requirements-tests.txt",
    "requirements-test.txt",
    "requirements_test.txt",
    "test-requirements.txt",
    "tests/requirements.txt",
    "requirements/dev.txt",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Runner {
    Pytest,
    Unittest,
}

/// How to build and test a repository's environment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    pub python: String,
    pub reqs_path: Vec<String>,
    pub pip_packages: Vec<String>,
    pub install: Vec<String>,
    pub runner: Runner,
    /// Import root of the code (`/testbed/src` for a src layout), first on `PYTHONPATH`, so
    /// the tests import the patched tree rather than the copy installed in the venv.
    pub import_root: String,
    /// Files the recipe was read from (path → sha256), part of the hash.
    pub read: BTreeMap<String, String>,
}

fn read(root: &Path, rel: &str, seen: &mut BTreeMap<String, String>) -> Option<String> {
    let text = std::fs::read_to_string(root.join(rel)).ok()?;
    seen.insert(
        rel.to_string(),
        hex::encode(Sha256::digest(text.as_bytes())),
    );
    Some(text)
}

/// `[section] key = …` of an INI file, continuation lines joined (enough for setup.cfg and
/// tox.ini, which configparser reads the same way).
fn ini_value(text: &str, section: &str, key: &str) -> Option<Vec<String>> {
    let mut in_section = false;
    let mut out: Option<Vec<String>> = None;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') && t.ends_with(']') {
            in_section = &t[1..t.len() - 1] == section;
            if out.is_some() {
                return out;
            }
            continue;
        }
        if !in_section || t.starts_with('#') || t.starts_with(';') {
            continue;
        }
        let indented = line.starts_with(' ') || line.starts_with('\t');
        if let Some(o) = out.as_mut() {
            if indented {
                if !t.is_empty() {
                    o.push(t.to_string());
                }
                continue;
            }
            return out;
        }
        if let Some((k, v)) = t.split_once('=')
            && k.trim() == key
        {
            let v = v.trim();
            out = Some(if v.is_empty() {
                vec![]
            } else {
                vec![v.to_string()]
            });
        }
    }
    out
}

fn has_section(text: &str, section: &str) -> bool {
    text.lines().any(|l| l.trim() == format!("[{section}]"))
}

/// A requirement line pip can take as is (no tox substitutions, no editable installs or paths).
fn plain_requirement(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('-')
        && !s.starts_with('.')
        && !s.contains('{')
        && !s.starts_with('#')
}

/// Infers the recipe of the tree at `root` for the given Python version.
pub fn infer(root: &Path, python: &str) -> Recipe {
    let mut seen = BTreeMap::new();
    let mut reqs: Vec<String> = Vec::new();
    let mut pip: Vec<String> = Vec::new();
    let mut extra: Option<String> = None;
    // Requirements the chosen extra brings (they decide the runner like any other).
    let mut extra_reqs: Vec<String> = Vec::new();
    let mut pytest_marks = root.join("pytest.ini").is_file()
        || root.join("conftest.py").is_file()
        || root.join("tests/conftest.py").is_file();

    if let Some(text) = read(root, "pyproject.toml", &mut seen)
        && let Ok(doc) = text.parse::<toml::Table>()
    {
        let project = doc.get("project");
        if let Some(opt) = project
            .and_then(|p| p.get("optional-dependencies"))
            .and_then(|o| o.as_table())
        {
            extra = TEST_EXTRAS
                .iter()
                .find(|n| opt.contains_key(**n))
                .map(|n| n.to_string());
            if let Some(items) = extra.as_ref().and_then(|e| opt[e].as_array()) {
                extra_reqs.extend(items.iter().filter_map(|i| i.as_str().map(str::to_string)));
            }
        }
        if let Some(groups) = doc.get("dependency-groups").and_then(|g| g.as_table())
            && let Some(name) = TEST_EXTRAS.iter().find(|n| groups.contains_key(**n))
        {
            pip.extend(group_requirements(groups, name, 0));
        }
        pytest_marks |= doc.get("tool").and_then(|t| t.get("pytest")).is_some();
    }
    if let Some(text) = read(root, "setup.cfg", &mut seen) {
        if extra.is_none() {
            extra = TEST_EXTRAS
                .iter()
                .find(|n| ini_value(&text, "options.extras_require", n).is_some())
                .map(|n| n.to_string());
        }
        pytest_marks |= has_section(&text, "tool:pytest");
    }
    if let Some(text) = read(root, "setup.py", &mut seen)
        && extra.is_none()
        && text.contains("extras_require")
    {
        extra = TEST_EXTRAS
            .iter()
            .find(|n| text.contains(&format!("\"{n}\"")) || text.contains(&format!("'{n}'")))
            .map(|n| n.to_string());
    }
    if let Some(r) = TEST_REQS.iter().find(|r| root.join(r).is_file()) {
        read(root, r, &mut seen);
        reqs.push(r.to_string());
    }
    if root.join("requirements.txt").is_file() {
        read(root, "requirements.txt", &mut seen);
        reqs.push("requirements.txt".into());
    }
    if let Some(text) = read(root, "tox.ini", &mut seen) {
        for d in ini_value(&text, "testenv", "deps").unwrap_or_default() {
            if let Some(f) = d.strip_prefix("-r") {
                let f = f.trim().to_string();
                if !f.contains('{') && root.join(&f).is_file() && !reqs.contains(&f) {
                    read(root, &f, &mut seen);
                    reqs.push(f);
                }
            } else if plain_requirement(&d) && !pip.contains(&d) {
                pip.push(d);
            }
        }
        pytest_marks |= has_section(&text, "pytest");
    }
    let mentions_pytest = |s: &String| {
        s.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
            .next()
            .is_some_and(|n| n.eq_ignore_ascii_case("pytest"))
    };
    let reqs_mention_pytest = reqs.iter().any(|r| {
        std::fs::read_to_string(root.join(r))
            .map(|t| t.lines().any(|l| mentions_pytest(&l.trim().to_string())))
            .unwrap_or(false)
    });
    let brings_pytest = pip.iter().any(mentions_pytest)
        || extra_reqs.iter().any(mentions_pytest)
        || reqs_mention_pytest;
    pytest_marks |= brings_pytest;
    let runner = if pytest_marks {
        Runner::Pytest
    } else {
        Runner::Unittest
    };
    if runner == Runner::Pytest && !brings_pytest {
        // An extra may hold pytest; pip resolves a duplicate requirement as one.
        pip.push("pytest".into());
    }
    let target = match &extra {
        Some(e) => format!(".[{e}]"),
        None => ".".into(),
    };
    let import_root = if src_layout(root) {
        format!("{MOUNT}/src")
    } else {
        MOUNT.to_string()
    };
    Recipe {
        python: python.to_string(),
        reqs_path: reqs,
        pip_packages: pip,
        install: vec![format!("python -m pip install {}", shell_quote(&target))],
        runner,
        import_root,
        read: seen,
    }
}

/// A PEP 735 group's requirements, `{include-group = …}` entries resolved (depth-capped).
fn group_requirements(groups: &toml::Table, name: &str, depth: usize) -> Vec<String> {
    let Some(items) = groups.get(name).and_then(|g| g.as_array()) else {
        return vec![];
    };
    let mut out = Vec::new();
    for i in items {
        if let Some(s) = i.as_str() {
            out.push(s.to_string());
        } else if let Some(inc) = i.get("include-group").and_then(|v| v.as_str())
            && depth < 8
        {
            out.extend(group_requirements(groups, inc, depth + 1));
        }
    }
    out
}

/// `src/<package>/__init__.py` exists.
fn src_layout(root: &Path) -> bool {
    std::fs::read_dir(root.join("src"))
        .map(|rd| rd.flatten().any(|e| e.path().join("__init__.py").is_file()))
        .unwrap_or(false)
}

impl Recipe {
    /// Hash of the recipe and the files it was read from: the environment's cache key.
    pub fn hash(&self) -> String {
        let body = serde_json::to_vec(self).expect("recipe serialises");
        hex::encode(Sha256::digest(&body))[..16].to_string()
    }

    /// The test command on the given test files (those of a test patch), and its log parser.
    pub fn test_command(&self, test_files: &[String]) -> (String, &'static str) {
        match self.runner {
            Runner::Pytest => {
                let mut cmd =
                    String::from("python -m pytest --no-header -rA --tb=no -p no:cacheprovider");
                for f in test_files {
                    cmd.push(' ');
                    cmd.push_str(&shell_quote(f));
                }
                (cmd, "pytest")
            }
            Runner::Unittest => {
                let mut cmd = String::from("python -m unittest -v");
                for f in test_files {
                    let module = f.strip_suffix(".py").unwrap_or(f).replace('/', ".");
                    cmd.push(' ');
                    cmd.push_str(&shell_quote(&module));
                }
                // unittest reports on stderr; the harness's markers are on stdout.
                cmd.push_str(" 2>&1");
                (cmd, "unittest")
            }
        }
    }

    /// The task's `env` for an instance with this test patch.
    pub fn env_for(&self, test_patch: &str, rule: &TestPathRule) -> TaskEnv {
        let files: Vec<String> = diff_files(test_patch)
            .into_iter()
            .filter(|f| f.ends_with(".py") && rule.is_test(f))
            .filter(|f| {
                let name = f.rsplit('/').next().unwrap_or(f);
                name.starts_with("test") || name.ends_with("_test.py")
            })
            .collect();
        let (cmd, parser) = self.test_command(&files);
        TaskEnv {
            test_cmd: Some(cmd),
            log_parser: Some(parser.into()),
            python: Some(self.python.clone()),
            reqs_path: self.reqs_path.clone(),
            pip_packages: self.pip_packages.clone(),
            install: self.install.clone(),
            env_vars: [("PYTHONPATH".to_string(), self.import_root.clone())].into(),
            recipe_hash: Some(self.hash()),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (p, c) in files {
            let path = d.path().join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, c).unwrap();
        }
        d
    }

    #[test]
    fn pyproject_extras_groups_and_src_layout() {
        let d = tree(&[
            (
                "pyproject.toml",
                "[project]\nname='x'\n[project.optional-dependencies]\ntests=['pytest']\n[dependency-groups]\ntests=['coverage', {include-group='typing'}]\ntyping=['mypy']\n",
            ),
            ("src/x/__init__.py", ""),
        ]);
        let r = infer(d.path(), "3.11");
        assert_eq!(r.install, ["python -m pip install '.[tests]'"]);
        assert_eq!(
            r.pip_packages,
            ["coverage", "mypy"],
            "the extra brings pytest"
        );
        assert_eq!(r.import_root, "/testbed/src");
        assert_eq!(r.runner, Runner::Pytest);
        assert!(r.read.contains_key("pyproject.toml"));
        let (cmd, parser) = r.test_command(&["tests/test_a.py".into()]);
        assert_eq!(
            (cmd.as_str(), parser),
            (
                "python -m pytest --no-header -rA --tb=no -p no:cacheprovider tests/test_a.py",
                "pytest"
            )
        );
    }

    #[test]
    fn requirement_files_tox_and_unittest() {
        let d = tree(&[
            (
                "setup.py",
                "from setuptools import setup\nsetup(name='y')\n",
            ),
            ("requirements/tests.txt", "coverage==7\n"),
            (
                "tox.ini",
                "[testenv]\ndeps =\n    -rrequirements/tests.txt\n    hypothesis\n    {posargs}\ncommands = python -m unittest\n",
            ),
            ("y/__init__.py", ""),
        ]);
        let r = infer(d.path(), "3.11");
        assert_eq!(r.reqs_path, ["requirements/tests.txt"]);
        assert_eq!(r.pip_packages, ["hypothesis"]);
        assert_eq!(r.runner, Runner::Unittest);
        assert_eq!(r.import_root, "/testbed");
        assert_eq!(r.install, ["python -m pip install ."]);
        let (cmd, parser) = r.test_command(&["tests/test_y.py".into()]);
        assert_eq!(
            (cmd.as_str(), parser),
            ("python -m unittest -v tests.test_y 2>&1", "unittest")
        );
        let h = r.hash();
        std::fs::write(d.path().join("requirements/tests.txt"), "coverage==8\n").unwrap();
        assert_ne!(
            infer(d.path(), "3.11").hash(),
            h,
            "a dependency file is part of the key"
        );
        std::fs::write(d.path().join("y/core.py"), "x = 1\n").unwrap();
        std::fs::write(d.path().join("requirements/tests.txt"), "coverage==7\n").unwrap();
        assert_eq!(infer(d.path(), "3.11").hash(), h, "code is not");
    }
}
