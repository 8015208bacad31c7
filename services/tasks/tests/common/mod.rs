//! Helpers the tasks tests share; the fixture repository and its PRs are
//! `davinci_testkit::prs`.
#![allow(dead_code)] // each test binary uses some of them
use std::path::{Path, PathBuf};

use davinci_core::task::TaskInstance;
use davinci_runtime::blob::BlobStore;
use davinci_sandbox::{Backend, LocalConfig};
use davinci_tasks::TasksConfig;
use davinci_testkit::prs::{PYTHON, wheel};

/// `{dir}/wheels` holding the fixture's one dependency, `tinydep`.
pub fn wheels(dir: &Path) -> PathBuf {
    let wheels = dir.join("wheels");
    std::fs::create_dir_all(&wheels).unwrap();
    wheel(&wheels, "tinydep").unwrap();
    wheels
}

/// Offline builds from `wheels`, `runs` runs per side, `select.max_files` 3 (so the fixture's
/// PR #7 is too large), bubblewrap.
pub fn config(wheels: &Path, runs: u32) -> TasksConfig {
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
    cfg.validate.runs = runs;
    cfg.select.max_files = 3;
    cfg.test_timeout_secs = 60;
    cfg.sandbox = Backend::Local(LocalConfig::default());
    cfg
}

/// False (and says so) where bubblewrap cannot run sandboxes.
pub fn bwrap_usable(what: &str) -> bool {
    if davinci_sandbox::BwrapSandbox::new(LocalConfig::default()).is_err() {
        davinci_sandbox::testing::skip(what, "bubblewrap is not usable here");
        return false;
    }
    true
}

/// Every task in the tasks shards under `tasks/`, by shard key order.
pub async fn tasks_of(out: &dyn BlobStore) -> Vec<TaskInstance> {
    let mut v = Vec::new();
    for m in out.list("tasks/").await.unwrap() {
        if m.key.ends_with(".jsonl.zst") && !m.key.contains("/logs/") {
            let data = out.get(&m.key).await.unwrap();
            v.extend(davinci_runtime::shard::decode_jsonl_zst::<TaskInstance>(&data).unwrap());
        }
    }
    v
}
