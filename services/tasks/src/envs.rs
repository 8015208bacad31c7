//! Building recipe environments on the local backend: a virtualenv per (repository, recipe
//! hash) under `{root}/{owner}__{name}/{hash}/venv`, made once and then mounted read-only into
//! every sandbox that tests the repository.
//!
//! The build runs in a sandbox of its own whose workspace is mounted *at the final path*
//! (venvs are not relocatable: their scripts name their interpreter by absolute path), with
//! the repository at `src/` beside `venv/`. Network is allowed for that one command, which
//! creates the venv, installs the requirement files, the extra packages and the repository
//! itself. The finished `venv/` is moved into the cache by rename, so a cache entry is either
//! complete or absent, and a build that loses a race to another worker is discarded.
//! `env.json` beside it records the recipe, the seconds taken and the pip log.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use davinci_sandbox::{BwrapSandbox, Limits, LocalConfig, RunSpec, Sandbox, WorkspaceSpec};
use davinci_swebench::specs::shell_quote;
use serde::{Deserialize, Serialize};

use crate::recipe::Recipe;

/// How environments are built.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnvConfig {
    /// The interpreter venvs are made from (visible in the sandbox: under `/usr`, or bound).
    pub python: PathBuf,
    /// Extra arguments for every `pip install` (`--no-index --find-links /wheels` offline).
    pub pip_args: Vec<String>,
    /// Host paths the build sandbox sees read-only (a wheel directory, an interpreter).
    pub ro_binds: Vec<PathBuf>,
    pub build_timeout_secs: u64,
    pub memory_bytes: u64,
    /// Attempts per build before the environment counts as failed (infrastructure).
    pub attempts: u32,
}

impl Default for EnvConfig {
    fn default() -> Self {
        EnvConfig {
            python: PathBuf::from("/usr/bin/python3"),
            pip_args: vec![],
            ro_binds: vec![],
            build_timeout_secs: 1200,
            memory_bytes: 8 << 30,
            attempts: 2,
        }
    }
}

/// `env.json` of a built environment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Built {
    pub repo: String,
    pub hash: String,
    pub recipe: Recipe,
    pub seconds: f64,
}

/// What getting an environment did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnvOutcome {
    Cached,
    Built,
}

/// An environment that could not be built: the install log's tail.
#[derive(Debug, thiserror::Error)]
#[error("environment {hash} of {repo} did not build after {attempts} attempt(s): {reason}")]
pub struct BuildFailed {
    pub repo: String,
    pub hash: String,
    pub attempts: u32,
    pub reason: String,
    pub log: String,
}

/// The version a package that takes it from git metadata is built with.
pub const SCM_PRETEND_VERSION: &str = "0.0.0";

/// The environment cache.
#[derive(Debug, Clone)]
pub struct Envs {
    pub root: PathBuf,
    pub cfg: EnvConfig,
    pub local: LocalConfig,
    /// One build at a time per environment within this process.
    locks: Arc<std::sync::Mutex<std::collections::HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>>,
}

/// `owner__name` of a repository, refusing names that could leave the cache.
fn repo_dir(repo: &str) -> anyhow::Result<String> {
    let d = repo.replace('/', "__");
    anyhow::ensure!(
        !d.is_empty()
            && !d.starts_with('.')
            && d.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
        "repository name `{repo}` is not owner/name"
    );
    Ok(d)
}

impl Envs {
    /// `root` must be an absolute path: venvs live at it inside every sandbox.
    pub fn new(root: &Path, cfg: EnvConfig, local: LocalConfig) -> anyhow::Result<Envs> {
        anyhow::ensure!(
            root.is_absolute(),
            "the environment cache {} must be an absolute path",
            root.display()
        );
        std::fs::create_dir_all(root.join(".tmp"))
            .with_context(|| format!("creating {}", root.display()))?;
        Ok(Envs {
            root: root.to_path_buf(),
            cfg,
            local,
            locks: Default::default(),
        })
    }

    pub fn dir_of(&self, repo: &str, hash: &str) -> anyhow::Result<PathBuf> {
        Ok(self.root.join(repo_dir(repo)?).join(hash))
    }

    /// The built venv of (`repo`, `recipe`), building it when absent.
    pub async fn get(
        &self,
        repo: &str,
        recipe: &Recipe,
        tree: &Path,
    ) -> Result<(PathBuf, EnvOutcome), BuildFailed> {
        let hash = recipe.hash();
        let fail = |reason: String, log: String, attempts: u32| BuildFailed {
            repo: repo.to_string(),
            hash: hash.clone(),
            attempts,
            reason,
            log,
        };
        let dir = self
            .dir_of(repo, &hash)
            .map_err(|e| fail(format!("{e:#}"), String::new(), 0))?;
        let venv = dir.join("venv");
        let lock = {
            let mut m = self.locks.lock().expect("env locks poisoned");
            m.entry(dir.clone()).or_default().clone()
        };
        let _held = lock.lock().await;
        if venv.join("bin/python").exists() {
            return Ok((venv, EnvOutcome::Cached));
        }
        let mut last = (String::new(), String::new());
        for attempt in 1..=self.cfg.attempts.max(1) {
            match self.build(repo, recipe, tree, &dir).await {
                Ok(()) => return Ok((venv, EnvOutcome::Built)),
                Err((reason, log)) => {
                    tracing::warn!(repo, hash, attempt, %reason, "environment build failed");
                    last = (reason, log);
                }
            }
        }
        Err(fail(last.0, last.1, self.cfg.attempts.max(1)))
    }

    /// The one-command build script, run with the workspace at `dir`.
    fn script(&self, recipe: &Recipe, dir: &Path) -> String {
        let pip_args: Vec<String> = self.cfg.pip_args.iter().map(|a| shell_quote(a)).collect();
        let pip = format!(
            "{}/venv/bin/python -m pip install --no-input {}",
            dir.display(),
            pip_args.join(" ")
        );
        let mut s = String::from("set -eu\ncd src\n");
        s.push_str(&format!(
            "{} -m venv {}/venv\n",
            shell_quote(&self.cfg.python.display().to_string()),
            dir.display()
        ));
        for r in &recipe.reqs_path {
            s.push_str(&format!("{pip} -r {}\n", shell_quote(r)));
        }
        if !recipe.pip_packages.is_empty() {
            let pkgs: Vec<String> = recipe.pip_packages.iter().map(|p| shell_quote(p)).collect();
            s.push_str(&format!("{pip} {}\n", pkgs.join(" ")));
        }
        s.push_str(&format!("export PATH={}/venv/bin:$PATH\n", dir.display()));
        for cmd in &recipe.install {
            // A pip install of the recipe runs through the venv's pip with our arguments;
            // anything else runs as written, the venv first on PATH.
            match ["python -m pip install ", "pip install "]
                .iter()
                .find_map(|p| cmd.strip_prefix(p))
            {
                Some(rest) => s.push_str(&format!("{pip} {rest}\n")),
                None => s.push_str(&format!("{cmd}\n")),
            }
        }
        s.push_str("echo '>>>>> Environment Built'\n");
        s
    }

    async fn build(
        &self,
        repo: &str,
        recipe: &Recipe,
        tree: &Path,
        dir: &Path,
    ) -> Result<(), (String, String)> {
        let t = Instant::now();
        let err = |m: String| (m, String::new());
        std::fs::create_dir_all(dir)
            .map_err(|e| err(format!("creating {}: {e}", dir.display())))?;
        let stage = tempfile::tempdir_in(self.root.join(".tmp")).map_err(|e| err(e.to_string()))?;
        copy_tree(tree, &stage.path().join("src")).map_err(|e| err(format!("{e:#}")))?;
        let mut local = self.local.clone();
        local.mount_point = dir.to_path_buf();
        local.work_root = Some(self.root.join(".tmp"));
        local.ro_binds.extend(self.cfg.ro_binds.iter().cloned());
        let sb = BwrapSandbox::new(local).map_err(|e| err(e.to_string()))?;
        let ws = sb
            .prepare(&WorkspaceSpec {
                source: Some(stage.path().to_path_buf()),
                task: Some(format!("env:{repo}")),
                ..Default::default()
            })
            .await
            .map_err(|e| err(e.to_string()))?;
        let mut spec = RunSpec::new(["bash", "-c", &self.script(recipe, dir)]);
        spec.network = true;
        spec.env
            .insert("PIP_DISABLE_PIP_VERSION_CHECK".into(), "1".into());
        spec.env.insert("PIP_NO_CACHE_DIR".into(), "1".into());
        // The exported tree has no `.git`, so setuptools-scm (and hatch-vcs, which uses it)
        // cannot find a version and the build fails (python-attrs/attrs); the environment is
        // shared by every commit of the recipe, so it gets a neutral one.
        spec.env.insert(
            "SETUPTOOLS_SCM_PRETEND_VERSION".into(),
            SCM_PRETEND_VERSION.into(),
        );
        // pip builds in TMPDIR; the sandbox's /tmp is a small tmpfs.
        spec.env
            .insert("TMPDIR".into(), format!("{}/tmp", dir.display()));
        sb.write_file(&ws, "tmp/.keep", b"")
            .await
            .map_err(|e| err(e.to_string()))?;
        let wall = Duration::from_secs(self.cfg.build_timeout_secs);
        let limits = Limits {
            wall_time: wall,
            cpu_time: Some(wall),
            memory_bytes: Some(self.cfg.memory_bytes),
            max_processes: Some(1024),
            file_size_bytes: Some(4 << 30),
            output_bytes: 1 << 20,
            output_kill_bytes: Some(256 << 20),
        };
        let out = sb
            .run(&ws, &spec, &limits)
            .await
            .map_err(|e| err(format!("sandbox: {e}")))?;
        let log = format!("{}{}", out.stdout_str(), out.stderr_str());
        if !out.success() || !log.contains(">>>>> Environment Built") {
            let _ = sb.release(ws).await;
            let tail: String = log.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
            return Err((
                format!("exit {:?} ({:?}): {tail}", out.exit_code, out.stop),
                log,
            ));
        }
        let host = ws.host_path().expect("local workspace").to_path_buf();
        let venv = dir.join("venv");
        match std::fs::rename(host.join("venv"), &venv) {
            Ok(()) => {}
            // Another worker finished first: its venv is as good as ours.
            Err(_) if venv.join("bin/python").exists() => {}
            Err(e) => {
                let _ = sb.release(ws).await;
                return Err((format!("moving the venv into {}: {e}", venv.display()), log));
            }
        }
        let _ = sb.release(ws).await;
        let built = Built {
            repo: repo.to_string(),
            hash: recipe.hash(),
            recipe: recipe.clone(),
            seconds: t.elapsed().as_secs_f64(),
        };
        let body = serde_json::to_vec_pretty(&built).expect("serialises");
        std::fs::write(dir.join("env.json"), body).map_err(|e| err(e.to_string()))?;
        std::fs::write(dir.join("build.log"), &log).map_err(|e| err(e.to_string()))?;
        Ok(())
    }
}

/// Copies a directory tree (regular files, directories, symbolic links as links).
pub fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let e = e?;
        let ft = e.file_type()?;
        let dest = to.join(e.file_name());
        if ft.is_dir() {
            copy_tree(&e.path(), &dest)?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(e.path())?, &dest)?;
        } else {
            std::fs::copy(e.path(), &dest)?;
        }
    }
    Ok(())
}
