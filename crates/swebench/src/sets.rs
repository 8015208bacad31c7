//! Published task sets read as they are: SWE-bench (and SWE-Gym, which uses its columns),
//! SWE-rebench (`install_config`, image names) and SWE-smith (bug patches on branches of
//! mirror repositories, one image per repository), each normalised to [`TaskInstance`].

use anyhow::Context;
use davinci_core::task::{TaskEnv, TaskInstance, de_one_or_many};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::specs::{shell_quote, test_directives};

/// Which published set a file holds. `Auto` tells them apart by their columns:
/// `install_config` → SWE-rebench; `image_name` without `base_commit` → SWE-smith; `env` or
/// `metadata` → our own output; anything else → SWE-bench.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SetFormat {
    #[default]
    Auto,
    SweBench,
    SweGym,
    SweRebench,
    SweSmith,
    Davinci,
}

impl SetFormat {
    pub fn parse(s: &str) -> anyhow::Result<SetFormat> {
        Ok(match s {
            "auto" => SetFormat::Auto,
            "swe-bench" => SetFormat::SweBench,
            "swe-gym" => SetFormat::SweGym,
            "swe-rebench" => SetFormat::SweRebench,
            "swe-smith" => SetFormat::SweSmith,
            "davinci" => SetFormat::Davinci,
            other => anyhow::bail!(
                "unknown task set format `{other}` (auto, swe-bench, swe-gym, swe-rebench, swe-smith, davinci)"
            ),
        })
    }

    fn detect(row: &Map<String, Value>) -> SetFormat {
        if row.get("install_config").is_some_and(|v| !v.is_null()) {
            SetFormat::SweRebench
        } else if row.contains_key("image_name") && !row.contains_key("base_commit") {
            SetFormat::SweSmith
        } else if row.contains_key("env") || row.contains_key("metadata") {
            SetFormat::Davinci
        } else {
            SetFormat::SweBench
        }
    }

    fn label(self) -> Option<&'static str> {
        match self {
            SetFormat::SweBench => Some("swe-bench"),
            SetFormat::SweGym => Some("swe-gym"),
            SetFormat::SweRebench => Some("swe-rebench"),
            SetFormat::SweSmith => Some("swe-smith"),
            SetFormat::Auto | SetFormat::Davinci => None,
        }
    }
}

/// The columns SWE-bench publishes, which stay top-level; every other column of a published
/// row is kept under `metadata`.
const SWE_BENCH_COLUMNS: [&str; 12] = [
    "instance_id",
    "repo",
    "base_commit",
    "patch",
    "test_patch",
    "problem_statement",
    "hints_text",
    "created_at",
    "version",
    "FAIL_TO_PASS",
    "PASS_TO_PASS",
    "environment_setup_commit",
];

/// Deserialises a normalised row; the error names the field (`at `{prefix}base_commit``).
/// The columns published sets name an instance's image in, in order of preference.
const IMAGE_COLUMNS: [&str; 3] = ["docker_image", "image_name", "image"];

fn instance_of(row: Value, prefix: &str) -> anyhow::Result<TaskInstance> {
    serde_path_to_error::deserialize(row).map_err(|e| match e.path().to_string().as_str() {
        "." if prefix.is_empty() => anyhow::anyhow!("{}", e.inner()),
        "." => anyhow::anyhow!("at `{}`: {}", prefix.trim_end_matches('.'), e.inner()),
        path => anyhow::anyhow!("at `{prefix}{path}`: {}", e.inner()),
    })
}

/// SWE-rebench's `install_config` (SWE-bench install-spec keys; V2 adds `log_parser` and
/// lists of test commands).
#[derive(Debug, Default, Deserialize)]
struct InstallConfig {
    #[serde(default)]
    python: Option<Value>,
    #[serde(default, deserialize_with = "de_one_or_many")]
    install: Vec<String>,
    #[serde(default, deserialize_with = "de_one_or_many")]
    test_cmd: Vec<String>,
    #[serde(default)]
    packages: Option<String>,
    #[serde(default, deserialize_with = "de_one_or_many")]
    pip_packages: Vec<String>,
    #[serde(default, deserialize_with = "de_one_or_many")]
    pre_install: Vec<String>,
    #[serde(default, deserialize_with = "de_one_or_many")]
    reqs_path: Vec<String>,
    #[serde(default)]
    log_parser: Option<String>,
    #[serde(default)]
    env_vars: Option<std::collections::BTreeMap<String, Value>>,
}

/// `"3.9"` from `3.9` or `"3.9"` (some exports hold the version as a number).
fn python_version(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The test command with the test files of the test patch appended, as SWE-bench's eval
/// script builds it (for a list of commands, the files go to the last one).
fn with_directives(cmds: &[String], inst: &TaskInstance) -> Option<String> {
    let (last, first) = cmds.split_last()?;
    let mut lines: Vec<String> = first.to_vec();
    let mut cmd = last.clone();
    for d in test_directives(inst) {
        cmd.push(' ');
        cmd.push_str(&shell_quote(&d));
    }
    lines.push(cmd);
    Some(lines.join("\n"))
}

/// Normalises one published row.
pub fn normalize(row: Value, format: SetFormat) -> anyhow::Result<TaskInstance> {
    normalize_at(row, format, "")
}

/// [`normalize`], naming fields under `prefix` in errors (`[3].` for the fourth record of an
/// array).
pub(crate) fn normalize_at(
    row: Value,
    format: SetFormat,
    prefix: &str,
) -> anyhow::Result<TaskInstance> {
    let Value::Object(mut m) = row else {
        anyhow::bail!("a task row must be a JSON object");
    };
    let format = match format {
        SetFormat::Auto => SetFormat::detect(&m),
        f => f,
    };
    let image = IMAGE_COLUMNS
        .iter()
        .find_map(|k| m.get(*k).and_then(Value::as_str).map(str::to_string))
        .filter(|s| !s.trim().is_empty());
    if format == SetFormat::Davinci {
        // Our rows carry the image in `env.image`; a top-level image column (as a SWE-rebench
        // row names it) fills it when `env` leaves it unset.
        for k in IMAGE_COLUMNS {
            m.remove(k);
        }
        let mut inst = instance_of(Value::Object(m), prefix)?;
        if inst.env.image.is_none() {
            inst.env.image = image;
        }
        return Ok(inst);
    }
    let install_config = m.remove("install_config");
    let mut core = Map::new();
    let mut extra = Map::new();
    for (k, v) in m {
        if SWE_BENCH_COLUMNS.contains(&k.as_str()) {
            core.insert(k, v);
        } else if !IMAGE_COLUMNS.contains(&k.as_str()) {
            extra.insert(k, v);
        }
    }
    if format == SetFormat::SweSmith {
        // A SWE-smith task is a branch named after the instance in its mirror repository,
        // holding the bug; `patch` is the bug, so the fix is its reverse (as SWE-smith grades
        // the gold patch with `git apply --reverse`).
        let id = core
            .get("instance_id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .with_context(|| format!("at `{prefix}instance_id`: missing"))?;
        core.entry("base_commit").or_insert(Value::String(id));
        if let Some(Value::String(bug)) = core.get("patch").cloned() {
            extra.insert("bug_patch".into(), Value::String(bug.clone()));
            core.insert(
                "patch".into(),
                Value::String(
                    crate::patch::reverse(&bug)
                        .context("SWE-smith bug patch cannot be reversed")?,
                ),
            );
        }
    }
    let mut inst = instance_of(Value::Object(core), prefix)?;
    let mut env = TaskEnv {
        image,
        ..Default::default()
    };
    if let Some(cfg) = install_config.filter(|v| !v.is_null()) {
        let cfg: InstallConfig = serde_path_to_error::deserialize(cfg).map_err(|e| {
            anyhow::anyhow!("at `{prefix}install_config.{}`: {}", e.path(), e.inner())
        })?;
        env.python = cfg.python.as_ref().and_then(python_version);
        env.install = cfg.install;
        env.packages = cfg.packages.filter(|s| !s.trim().is_empty());
        env.pip_packages = cfg.pip_packages;
        env.pre_install = cfg.pre_install;
        env.reqs_path = cfg.reqs_path;
        env.log_parser = cfg
            .log_parser
            .map(|p| p.trim_start_matches("parse_log_").to_string());
        env.env_vars = cfg
            .env_vars
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| match v {
                Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect();
        env.test_cmd = with_directives(&cfg.test_cmd, &inst);
    }
    if format == SetFormat::SweSmith {
        // SWE-smith runs its profile's pytest command on the files of the FAIL_TO_PASS tests.
        let mut files: Vec<&str> = inst
            .fail_to_pass
            .iter()
            .map(|t| t.split("::").next().unwrap_or(t))
            .collect();
        files.sort();
        files.dedup();
        let mut cmd = String::from("pytest --disable-warnings --color=no --tb=no --verbose");
        for f in files {
            cmd.push(' ');
            cmd.push_str(&shell_quote(f));
        }
        env.test_cmd = Some(cmd);
    }
    inst.env = env;
    inst.metadata.source = format.label().map(str::to_string);
    for (k, v) in extra {
        inst.metadata.extra.insert(k, v);
    }
    Ok(inst)
}
