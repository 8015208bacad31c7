//! `davinci.pr/v1`: one merged pull request with everything the reconstructor renders.
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const PR_SCHEMA: &str = "davinci.pr/v1";

/// Where a record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PrSource {
    GithubApi,
    Git,
    Gharchive,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RepoMeta {
    /// `owner/name`.
    pub full_name: String,
    #[serde(default)]
    pub stars: Option<u64>,
    #[serde(default)]
    pub language: Option<String>,
    /// SPDX id or GitHub license key.
    #[serde(default)]
    pub license: Option<String>,
    #[serde(default)]
    pub archived: bool,
}

impl RepoMeta {
    /// Whether `n` is an `owner/name`: two non-empty parts of `[A-Za-z0-9._-]`, neither `.`
    /// nor `..` (so it is safe as a path and a key).
    pub fn is_full_name(n: &str) -> bool {
        n.split('/').count() == 2
            && n.split('/').all(|p| {
                !p.is_empty()
                    && p != "."
                    && p != ".."
                    && p.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum AuthorType {
    #[default]
    User,
    Bot,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Author {
    pub login: String,
    #[serde(rename = "type", default)]
    pub kind: AuthorType,
    /// GitHub author_association: MEMBER, CONTRIBUTOR, NONE, …
    #[serde(default)]
    pub association: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LinkedIssue {
    pub number: u64,
    pub title: String,
    #[serde(default)]
    pub body: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileStatus {
    Added,
    Modified,
    Deleted,
    Renamed,
    /// A new file whose diff is relative to `old_path`, which the commit leaves in place.
    Copied,
}

/// One file touched by one commit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileChange {
    pub path: String,
    /// Source path of a rename or copy.
    #[serde(default)]
    pub old_path: Option<String>,
    pub status: FileStatus,
    /// Unified diff hunks (`@@ … @@` onwards) of this file in this commit; empty for binary.
    #[serde(default)]
    pub diff: String,
    /// True when either side is binary; no diff is kept then.
    #[serde(default)]
    pub binary: bool,
    /// Why no diff was kept although the file is not binary (`not_utf8`, `too_large`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Commit {
    pub sha: String,
    pub message: String,
    #[serde(default)]
    pub author: Option<String>,
    /// The author's GitHub account (login, User|Bot) when the API names it; git knows only
    /// name and email.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<Author>,
    #[serde(default)]
    pub files: Vec<FileChange>,
}

/// Content of a touched file at the PR's base commit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseFile {
    pub path: String,
    /// Text content; `None` when `skipped` says why it was not read.
    #[serde(default)]
    pub content: Option<String>,
    /// `binary`, `too_large` or `not_utf8` when the content was not kept.
    #[serde(default)]
    pub skipped: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReviewComment {
    pub path: String,
    #[serde(default)]
    pub line: Option<u64>,
    #[serde(default)]
    pub diff_hunk: String,
    pub body: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Review {
    pub author: Author,
    /// APPROVED, CHANGES_REQUESTED, COMMENTED.
    pub state: String,
    #[serde(default)]
    pub body: String,
    #[serde(default)]
    pub comments: Vec<ReviewComment>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Comment {
    pub author: Author,
    pub body: String,
    #[serde(default)]
    pub created_at: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GitRef {
    #[serde(rename = "ref")]
    pub name: String,
    pub sha: String,
}

/// A merged pull request (`davinci.pr/v1`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PullRequest {
    pub schema: String,
    /// `github:{owner}/{repo}#{n}`.
    pub id: String,
    pub repo: RepoMeta,
    pub number: u64,
    pub title: String,
    #[serde(default)]
    pub body: String,
    pub author: Author,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub merged_at: Option<String>,
    pub base: GitRef,
    pub head: GitRef,
    pub merge_commit_sha: String,
    #[serde(default)]
    pub labels: Vec<String>,
    #[serde(default)]
    pub linked_issues: Vec<LinkedIssue>,
    pub commits: Vec<Commit>,
    /// Base content of every touched file, keyed by path.
    #[serde(default)]
    pub base_files: Vec<BaseFile>,
    #[serde(default)]
    pub reviews: Vec<Review>,
    #[serde(default)]
    pub comments: Vec<Comment>,
    pub source: PrSource,
    /// Extra facts a source knows (e.g. merge style).
    #[serde(default)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl PullRequest {
    /// The canonical record id for a GitHub PR.
    pub fn make_id(full_name: &str, number: u64) -> String {
        format!("github:{full_name}#{number}")
    }

    /// Paths touched by any commit, in first-touch order, renames listed under the new path.
    pub fn touched_paths(&self) -> Vec<&str> {
        let mut seen = std::collections::BTreeSet::new();
        let mut out = Vec::new();
        for c in &self.commits {
            for f in &c.files {
                if seen.insert(f.path.as_str()) {
                    out.push(f.path.as_str());
                }
            }
        }
        out
    }

    /// Base content of `path`, when it was read.
    pub fn base_content(&self, path: &str) -> Option<&str> {
        self.base_files
            .iter()
            .find(|f| f.path == path)
            .and_then(|f| f.content.as_deref())
    }
}

/// Why a PR's commits do not replay onto its base files.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("PR does not replay: {0}")]
pub struct PatchError(pub String);

/// The files of a PR after replaying its commits on its base files.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Replayed {
    /// Path → content after the last commit; `None` for a path the PR deleted.
    pub files: BTreeMap<String, Option<String>>,
    /// Paths whose content is not known (binary, not UTF-8, over the size cap).
    pub unknown: std::collections::BTreeSet<String>,
}

impl PullRequest {
    /// Applies every commit's diffs, in order, to the base files. Files without text (binary,
    /// skipped) are tracked in [`Replayed::unknown`] instead of failing the replay.
    pub fn replay(&self) -> Result<Replayed, PatchError> {
        let mut r = self.base_state();
        for c in &self.commits {
            apply_commit(&mut r, c)?;
        }
        Ok(r)
    }

    /// The files after each commit, in order (as [`Self::replay`] after 1, 2, … commits).
    pub fn replay_each(&self) -> Result<Vec<Replayed>, PatchError> {
        let mut r = self.base_state();
        let mut out = Vec::with_capacity(self.commits.len());
        for c in &self.commits {
            apply_commit(&mut r, c)?;
            out.push(r.clone());
        }
        Ok(out)
    }

    fn base_state(&self) -> Replayed {
        let mut r = Replayed::default();
        for b in &self.base_files {
            match &b.content {
                Some(c) => {
                    r.files.insert(b.path.clone(), Some(c.clone()));
                }
                None => {
                    r.unknown.insert(b.path.clone());
                }
            }
        }
        r
    }
}

fn apply_commit(r: &mut Replayed, c: &Commit) -> Result<(), PatchError> {
    for f in &c.files {
        let from = f.old_path.as_deref().unwrap_or(&f.path);
        let unknown_src = r.unknown.contains(from);
        if f.status == FileStatus::Renamed {
            r.unknown.remove(from);
        }
        let prev = match f.status {
            FileStatus::Added => None,
            FileStatus::Renamed => r.files.insert(from.to_string(), None).flatten(),
            _ => r.files.get(from).cloned().flatten(),
        };
        if f.binary || f.skipped.is_some() || unknown_src {
            r.files.remove(&f.path);
            if f.status == FileStatus::Deleted {
                r.unknown.remove(&f.path);
                r.files.insert(f.path.clone(), None);
            } else {
                r.unknown.insert(f.path.clone());
            }
            continue;
        }
        let old = match (f.status, prev) {
            (FileStatus::Added, _) => String::new(),
            (_, Some(p)) => p,
            (_, None) => {
                return Err(PatchError(format!(
                    "commit {} changes `{from}`, which has no known content before it",
                    c.sha
                )));
            }
        };
        let new = crate::diff::apply_unified(&old, &f.diff)
            .map_err(|e| PatchError(format!("commit {} file `{}`: {e}", c.sha, f.path)))?;
        r.unknown.remove(&f.path);
        if f.status == FileStatus::Deleted {
            if !new.is_empty() {
                return Err(PatchError(format!(
                    "commit {} deletes `{}` but its diff leaves {} bytes",
                    c.sha,
                    f.path,
                    new.len()
                )));
            }
            r.files.insert(f.path.clone(), None);
        } else {
            r.files.insert(f.path.clone(), Some(new));
        }
    }
    Ok(())
}
