//! A merged PR record → a candidate task (before validation), or the reason it is dropped.
//!
//! The PR's net change is `git diff base head` in the repository's mirror, split into `patch`
//! (code) and `test_patch` (tests) by a [`TestPathRule`]. `problem_statement` is the linked
//! issues' title and body (`metadata.problem_source = "issue"`), else the PR's own
//! (`"pr"`). `hints_text` is the PR conversation dated before the record's `created_at` (the
//! first commit for records read from git; `davinci.pr/v1` keeps no issue comments, which are
//! SWE-bench's source). `version` is `major.minor` of the nearest tag of the base commit.

use davinci_core::pr::PullRequest;
use davinci_core::task::{TaskInstance, TaskMetadata};
use davinci_swebench::patch::{TestPathRule, split_files};
use serde::{Deserialize, Serialize};

use crate::repo::{Mirror, version_of_tag};

/// Limits a candidate must keep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SelectConfig {
    pub test_paths: TestPathRule,
    /// Most files the code patch may touch (SWE-rebench keeps 1–15).
    pub max_files: usize,
    /// Most changed lines (added + removed) in the code patch.
    pub max_changed_lines: usize,
    /// Source extensions of the languages tasks are built for.
    pub languages: Vec<String>,
}

impl Default for SelectConfig {
    fn default() -> Self {
        SelectConfig {
            test_paths: TestPathRule::default(),
            max_files: 15,
            max_changed_lines: 1000,
            languages: vec![".py".into()],
        }
    }
}

/// Why a PR is not a task (before anything runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Drop {
    /// The record has no base commit.
    NoBaseCommit,
    /// The base or head commit is not in the mirror.
    CommitMissing,
    /// The change touches no test file.
    NoTestChange,
    /// Only tests (and documentation) change.
    NoCodeChange,
    /// The code change is in no supported language.
    UnsupportedLanguage,
    /// More files or lines than [`SelectConfig`] allows.
    TooLarge,
    /// The code patch holds a binary file.
    BinaryPatch,
}

impl Drop {
    pub fn as_str(self) -> &'static str {
        match self {
            Drop::NoBaseCommit => "no_base_commit",
            Drop::CommitMissing => "commit_missing",
            Drop::NoTestChange => "no_test_change",
            Drop::NoCodeChange => "no_code_change",
            Drop::UnsupportedLanguage => "unsupported_language",
            Drop::TooLarge => "too_large",
            Drop::BinaryPatch => "binary_patch",
        }
    }
}

/// Files that are documentation or metadata, never code a task is about.
fn is_doc(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    let name = lower.rsplit('/').next().unwrap_or(&lower);
    [".md", ".rst", ".txt", ".adoc"]
        .iter()
        .any(|e| name.ends_with(e))
        || lower.starts_with("docs/")
        || lower.starts_with("doc/")
        || name.starts_with("changes")
        || name.starts_with("changelog")
        || name.starts_with("authors")
}

/// `owner__name-N`.
pub fn instance_id(full_name: &str, number: u64) -> String {
    format!("{}-{number}", full_name.replace('/', "__"))
}

/// The problem statement and where it came from.
fn problem(pr: &PullRequest) -> (String, &'static str) {
    let issues: Vec<String> = pr
        .linked_issues
        .iter()
        .filter(|i| !(i.title.trim().is_empty() && i.body.trim().is_empty()))
        .map(|i| format!("{}\n{}\n", i.title.trim(), i.body.trim()))
        .collect();
    if issues.is_empty() {
        (format!("{}\n{}\n", pr.title.trim(), pr.body.trim()), "pr")
    } else {
        (issues.join("\n"), "issue")
    }
}

fn hints(pr: &PullRequest) -> String {
    let Some(start) = pr.created_at.as_deref() else {
        return String::new();
    };
    pr.comments
        .iter()
        .filter(|c| c.created_at.as_deref().is_some_and(|t| t < start))
        .map(|c| c.body.trim().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

fn changed_lines(diff: &str) -> usize {
    diff.lines()
        .filter(|l| {
            (l.starts_with('+') && !l.starts_with("+++"))
                || (l.starts_with('-') && !l.starts_with("---"))
        })
        .count()
}

/// The candidate task of `pr`, or why there is none.
pub fn candidate(
    pr: &PullRequest,
    mirror: &Mirror,
    cfg: &SelectConfig,
) -> anyhow::Result<Result<TaskInstance, Drop>> {
    let base = pr.base.sha.trim();
    if base.is_empty() {
        return Ok(Err(Drop::NoBaseCommit));
    }
    let head = pr.head.sha.trim();
    if !mirror.has_commit(base) || !mirror.has_commit(head) {
        return Ok(Err(Drop::CommitMissing));
    }
    let diff = mirror.diff(base, head)?;
    let (patch, test_patch) = cfg.test_paths.split(&diff);
    if test_patch.trim().is_empty() {
        return Ok(Err(Drop::NoTestChange));
    }
    let files = split_files(&patch);
    let code: Vec<_> = files.iter().filter(|f| !is_doc(&f.path)).collect();
    if code.is_empty() {
        return Ok(Err(Drop::NoCodeChange));
    }
    if !code
        .iter()
        .any(|f| cfg.languages.iter().any(|e| f.path.ends_with(e.as_str())))
    {
        return Ok(Err(Drop::UnsupportedLanguage));
    }
    if files.len() > cfg.max_files || changed_lines(&patch) > cfg.max_changed_lines {
        return Ok(Err(Drop::TooLarge));
    }
    if files
        .iter()
        .any(|f| f.text.contains("\nGIT binary patch\n"))
    {
        return Ok(Err(Drop::BinaryPatch));
    }
    let (problem_statement, source) = problem(pr);
    let version = mirror
        .nearest_tag(base)
        .and_then(|t| version_of_tag(&t))
        .unwrap_or_default();
    Ok(Ok(TaskInstance {
        instance_id: instance_id(&pr.repo.full_name, pr.number),
        repo: pr.repo.full_name.clone(),
        base_commit: base.to_string(),
        patch,
        test_patch,
        problem_statement,
        hints_text: hints(pr),
        created_at: pr.created_at.clone().unwrap_or_default(),
        version,
        environment_setup_commit: base.to_string(),
        metadata: TaskMetadata {
            source: Some("davinci".into()),
            problem_source: Some(source.into()),
            pr_id: Some(pr.id.clone()),
            pull_number: Some(pr.number),
            issue_numbers: pr.linked_issues.iter().map(|i| i.number).collect(),
            ..Default::default()
        },
        ..Default::default()
    }))
}
