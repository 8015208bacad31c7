//! The GitHub API's view of a PR (its commit list and changed files) held against the record
//! read from git. Code content always comes from git; the API checks it and fills what git
//! lacks: the commit authors' GitHub accounts, and renames git's similarity heuristic did not
//! pair (an addition plus a deletion in one commit that the API calls a rename). Every
//! disagreement is counted ([`ApiCheckCounts`], in `stats/crawl.json`) and listed in the record
//! (`extra.api_check`), never passed over.
use crate::git::unified_diff;
use crate::github::{ApiCommit, PullChanges};
use davinci_core::pr::{Commit, FileChange, FileStatus, PullRequest};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};

/// GitHub lists at most this many commits and files of a PR; past them absence proves nothing.
const API_COMMITS_CAP: usize = 250;
const API_FILES_CAP: usize = 3000;

/// Totals over the checked PRs (in checkpoints and `stats/crawl.json` as `api_check`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiCheckCounts {
    /// PRs whose API commits and files were compared with git.
    pub prs_checked: u64,
    /// Of those, PRs with at least one disagreement below.
    pub prs_mismatched: u64,
    /// Commits the API lists that the git record lacks.
    pub commits_not_in_git: u64,
    /// Commits of the git record the API does not list.
    pub commits_not_in_api: u64,
    /// Files the API lists that no commit of the git record touches.
    pub files_not_in_git: u64,
    /// Files the git record changes (net) that the API does not list.
    pub files_not_in_api: u64,
    /// Renames taken from the API where git saw an addition and a deletion.
    pub renames_from_api: u64,
    /// Commits given their author's GitHub account.
    pub commit_accounts: u64,
    /// PRs found in history through the API's merge commit (no message names them).
    pub located_by_api: u64,
}

impl ApiCheckCounts {
    pub fn add(&mut self, o: &ApiCheckCounts) {
        self.prs_checked += o.prs_checked;
        self.prs_mismatched += o.prs_mismatched;
        self.commits_not_in_git += o.commits_not_in_git;
        self.commits_not_in_api += o.commits_not_in_api;
        self.files_not_in_git += o.files_not_in_git;
        self.files_not_in_api += o.files_not_in_api;
        self.renames_from_api += o.renames_from_api;
        self.commit_accounts += o.commit_accounts;
        self.located_by_api += o.located_by_api;
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Counts one PR's check.
    pub fn record(&mut self, c: &PrCheck) {
        self.prs_checked += 1;
        self.prs_mismatched += u64::from(c.mismatched());
        self.commits_not_in_git += c.commits_not_in_git.len() as u64;
        self.commits_not_in_api += c.commits_not_in_api.len() as u64;
        self.files_not_in_git += c.files_not_in_git.len() as u64;
        self.files_not_in_api += c.files_not_in_api.len() as u64;
        self.renames_from_api += c.renames_from_api.len() as u64;
        self.commit_accounts += c.commit_accounts as u64;
    }
}

/// One PR's check, kept in the record as `extra.api_check`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrCheck {
    /// Commits and files the API lists.
    pub api_commits: usize,
    pub api_files: usize,
    /// `sha` (merge commits), `subject` (rebase merges: the commits were rewritten) or `none`
    /// (squash merges: the API lists the commits before squashing).
    pub commits_matched_by: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub commits_not_in_git: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub commits_not_in_api: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files_not_in_git: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files_not_in_api: Vec<String>,
    /// New paths of the renames taken from the API.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub renames_from_api: Vec<String>,
    #[serde(default)]
    pub commit_accounts: usize,
}

impl PrCheck {
    /// Whether git and the API disagree on anything.
    pub fn mismatched(&self) -> bool {
        !(self.commits_not_in_git.is_empty()
            && self.commits_not_in_api.is_empty()
            && self.files_not_in_git.is_empty()
            && self.files_not_in_api.is_empty())
    }
}

/// Compares `pr` (from git) with the API's commits and files, fills commit accounts and missed
/// renames into it, and returns what was found.
pub fn apply(pr: &mut PullRequest, api: &PullChanges) -> PrCheck {
    let mut check = PrCheck {
        api_commits: api.commits.len(),
        api_files: api.files.len(),
        ..Default::default()
    };
    let style = pr
        .extra
        .get("merge_style")
        .and_then(|v| v.as_str())
        .unwrap_or("merge")
        .to_string();
    let commits_capped = api.commits.len() >= API_COMMITS_CAP;
    match style.as_str() {
        "squash" => check.commits_matched_by = "none".into(),
        "rebase" => {
            check.commits_matched_by = "subject".into();
            let api_subjects: Vec<&str> = api.commits.iter().map(|c| subject(&c.message)).collect();
            let git_subjects: Vec<&str> = pr.commits.iter().map(|c| subject(&c.message)).collect();
            check.commits_not_in_git = api
                .commits
                .iter()
                .filter(|c| !git_subjects.contains(&subject(&c.message)))
                .map(|c| c.sha.clone())
                .collect();
            if !commits_capped {
                check.commits_not_in_api = pr
                    .commits
                    .iter()
                    .filter(|c| !api_subjects.contains(&subject(&c.message)))
                    .map(|c| c.sha.clone())
                    .collect();
            }
            if api_subjects == git_subjects {
                for (g, a) in pr.commits.iter_mut().zip(&api.commits) {
                    fill_account(g, a, &mut check);
                }
            }
        }
        _ => {
            check.commits_matched_by = "sha".into();
            let by_sha: HashMap<&str, &ApiCommit> =
                api.commits.iter().map(|c| (c.sha.as_str(), c)).collect();
            let git_shas: BTreeSet<&str> = pr.commits.iter().map(|c| c.sha.as_str()).collect();
            check.commits_not_in_git = api
                .commits
                .iter()
                .filter(|c| !git_shas.contains(c.sha.as_str()))
                .map(|c| c.sha.clone())
                .collect();
            let mut not_in_api = Vec::new();
            for g in pr.commits.iter_mut() {
                match by_sha.get(g.sha.as_str()) {
                    Some(a) => fill_account(g, a, &mut check),
                    None => not_in_api.push(g.sha.clone()),
                }
            }
            if !commits_capped {
                check.commits_not_in_api = not_in_api;
            }
        }
    }
    for f in api.files.iter().filter(|f| f.status == "renamed") {
        if let Some(old) = &f.previous_path
            && pair_rename(pr, old, &f.path)
        {
            check.renames_from_api.push(f.path.clone());
        }
    }
    let touched: BTreeSet<String> = all_paths(pr);
    let api_paths: BTreeSet<&str> = api
        .files
        .iter()
        .flat_map(|f| std::iter::once(f.path.as_str()).chain(f.previous_path.as_deref()))
        .collect();
    check.files_not_in_git = api_paths
        .iter()
        .filter(|p| !touched.contains(**p))
        .map(|p| p.to_string())
        .collect();
    if api.files.len() < API_FILES_CAP {
        check.files_not_in_api = net_changed(pr, touched)
            .into_iter()
            .filter(|p| !api_paths.contains(p.as_str()))
            .collect();
    }
    check
}

fn subject(message: &str) -> &str {
    message.lines().next().unwrap_or_default().trim_end()
}

fn fill_account(g: &mut Commit, a: &ApiCommit, check: &mut PrCheck) {
    if g.account.is_none()
        && let Some(acc) = &a.account
    {
        g.account = Some(acc.clone());
        check.commit_accounts += 1;
    }
}

fn all_paths(pr: &PullRequest) -> BTreeSet<String> {
    pr.commits
        .iter()
        .flat_map(|c| &c.files)
        .flat_map(|f| std::iter::once(f.path.clone()).chain(f.old_path.clone()))
        .collect()
}

/// Paths whose content after the PR differs from the base (all of them when the record does
/// not replay; unknown content counts as changed). A file changed and changed back is not in
/// the API's list, which is the net change.
fn net_changed(pr: &PullRequest, touched: BTreeSet<String>) -> BTreeSet<String> {
    let Ok(end) = pr.replay() else {
        return touched;
    };
    touched
        .into_iter()
        .filter(|p| {
            if end.unknown.contains(p) {
                return true;
            }
            let after = end.files.get(p).cloned().flatten();
            let before = match pr.base_files.iter().find(|b| &b.path == p) {
                Some(b) if b.content.is_none() => return true,
                Some(b) => b.content.clone(),
                None => None,
            };
            after != before
        })
        .collect()
}

/// Turns an addition of `new` plus a deletion of `old` in one commit into a rename of `old` to
/// `new` with the diff between the two contents. `false` when git already has the rename, no
/// commit holds both halves, or a content is not known as text.
fn pair_rename(pr: &mut PullRequest, old: &str, new: &str) -> bool {
    let text = |f: &FileChange| !f.binary && f.skipped.is_none();
    if pr
        .commits
        .iter()
        .flat_map(|c| &c.files)
        .any(|f| f.status == FileStatus::Renamed && f.path == new)
    {
        return false;
    }
    let Some(i) = pr.commits.iter().position(|c| {
        c.files
            .iter()
            .any(|f| f.status == FileStatus::Added && f.path == new && text(f))
            && c.files
                .iter()
                .any(|f| f.status == FileStatus::Deleted && f.path == old && text(f))
    }) else {
        return false;
    };
    let before = PullRequest {
        commits: pr.commits[..i].to_vec(),
        ..pr.clone()
    };
    let Ok(state) = before.replay() else {
        return false;
    };
    let Some(Some(old_text)) = state.files.get(old) else {
        return false;
    };
    let files = &mut pr.commits[i].files;
    let Some(added) = files
        .iter()
        .position(|f| f.status == FileStatus::Added && f.path == new)
    else {
        return false;
    };
    let Ok(new_text) = davinci_core::diff::apply_unified("", &files[added].diff) else {
        return false;
    };
    let f = &mut files[added];
    f.status = FileStatus::Renamed;
    f.old_path = Some(old.to_string());
    f.diff = unified_diff(old_text, &new_text);
    files.retain(|f| !(f.status == FileStatus::Deleted && f.path == old));
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::github::ApiFile;
    use davinci_core::pr::{Author, AuthorType, BaseFile, GitRef, PR_SCHEMA, PrSource};

    fn change(path: &str, status: FileStatus, diff: &str) -> FileChange {
        FileChange {
            path: path.into(),
            old_path: None,
            status,
            diff: diff.into(),
            binary: false,
            skipped: None,
        }
    }

    fn pr(commits: Vec<Commit>, style: &str) -> PullRequest {
        PullRequest {
            schema: PR_SCHEMA.into(),
            id: "github:a/b#1".into(),
            repo: Default::default(),
            number: 1,
            title: "t".into(),
            body: String::new(),
            author: Default::default(),
            created_at: None,
            merged_at: Some("x".into()),
            base: GitRef::default(),
            head: GitRef::default(),
            merge_commit_sha: "m".into(),
            labels: vec![],
            linked_issues: vec![],
            commits,
            base_files: vec![
                BaseFile {
                    path: "old.py".into(),
                    content: Some("a\nb\nc\n".into()),
                    skipped: None,
                },
                BaseFile {
                    path: "keep.py".into(),
                    content: Some("k\n".into()),
                    skipped: None,
                },
            ],
            reviews: vec![],
            comments: vec![],
            source: PrSource::Git,
            extra: [("merge_style".to_string(), style.into())].into(),
        }
    }

    fn commit(sha: &str, message: &str, files: Vec<FileChange>) -> Commit {
        Commit {
            sha: sha.into(),
            message: message.into(),
            author: Some("A <a@example.com>".into()),
            account: None,
            files,
        }
    }

    fn api_commit(sha: &str, message: &str, login: Option<&str>) -> ApiCommit {
        ApiCommit {
            sha: sha.into(),
            message: message.into(),
            account: login.map(|l| Author {
                login: l.into(),
                kind: if l.ends_with("[bot]") {
                    AuthorType::Bot
                } else {
                    AuthorType::User
                },
                association: None,
            }),
        }
    }

    fn api_file(path: &str, status: &str, prev: Option<&str>) -> ApiFile {
        ApiFile {
            path: path.into(),
            previous_path: prev.map(str::to_string),
            status: status.into(),
            additions: 1,
            deletions: 1,
        }
    }

    #[test]
    fn merge_commits_match_by_sha_and_missed_renames_are_paired() {
        let git_commits = vec![
            commit(
                "c1",
                "touch keep\n",
                vec![change(
                    "keep.py",
                    FileStatus::Modified,
                    "@@ -1 +1 @@\n-k\n+K\n",
                )],
            ),
            commit(
                "c2",
                "move and rewrite",
                vec![
                    change("new.py", FileStatus::Added, "@@ -0,0 +1,2 @@\n+x\n+c\n"),
                    change(
                        "old.py",
                        FileStatus::Deleted,
                        "@@ -1,3 +0,0 @@\n-a\n-b\n-c\n",
                    ),
                    // changed and changed back: not part of the net change
                    change("tmp.py", FileStatus::Added, "@@ -0,0 +1 @@\n+t\n"),
                ],
            ),
            commit(
                "c3",
                "drop tmp",
                vec![change("tmp.py", FileStatus::Deleted, "@@ -1 +0,0 @@\n-t\n")],
            ),
        ];
        let mut p = pr(git_commits, "merge");
        let before = p.replay().unwrap();
        let api = PullChanges {
            commits: vec![
                api_commit("c1", "touch keep", Some("alice")),
                api_commit("c2", "move and rewrite", Some("ci[bot]")),
                api_commit("c3", "drop tmp", None),
                api_commit("c9", "lost", Some("alice")),
            ],
            files: vec![
                api_file("keep.py", "modified", None),
                api_file("new.py", "renamed", Some("old.py")),
                api_file("ghost.py", "added", None),
            ],
        };
        let check = apply(&mut p, &api);
        assert_eq!(check.commits_matched_by, "sha");
        assert_eq!(check.commits_not_in_git, ["c9"]);
        assert!(check.commits_not_in_api.is_empty());
        assert_eq!(check.files_not_in_git, ["ghost.py"]);
        assert!(check.files_not_in_api.is_empty(), "{check:?}");
        assert_eq!(check.renames_from_api, ["new.py"]);
        assert_eq!(check.commit_accounts, 2);
        assert!(check.mismatched());
        assert_eq!(p.commits[1].account.as_ref().unwrap().kind, AuthorType::Bot);
        assert_eq!(p.commits[2].account, None);
        let renamed = &p.commits[1].files;
        assert_eq!(renamed.len(), 2, "{renamed:?}");
        let r = renamed.iter().find(|f| f.path == "new.py").unwrap();
        assert_eq!(
            (r.status, r.old_path.as_deref()),
            (FileStatus::Renamed, Some("old.py"))
        );
        // the record replays to the same files as before the pairing
        assert_eq!(p.replay().unwrap(), before);

        let mut counts = ApiCheckCounts::default();
        counts.record(&check);
        assert_eq!(
            (
                counts.prs_mismatched,
                counts.commits_not_in_git,
                counts.files_not_in_git,
                counts.renames_from_api
            ),
            (1, 1, 1, 1)
        );
    }

    #[test]
    fn squash_and_rebase_commits_are_not_matched_by_sha() {
        let one = || {
            vec![commit(
                "s1",
                "Squashed (#1)",
                vec![change(
                    "keep.py",
                    FileStatus::Modified,
                    "@@ -1 +1 @@\n-k\n+K\n",
                )],
            )]
        };
        let mut p = pr(one(), "squash");
        let api = PullChanges {
            commits: vec![
                api_commit("o1", "wip", None),
                api_commit("o2", "more", None),
            ],
            files: vec![api_file("keep.py", "modified", None)],
        };
        let check = apply(&mut p, &api);
        assert_eq!(check.commits_matched_by, "none");
        assert!(!check.mismatched(), "{check:?}");

        let mut p = pr(one(), "rebase");
        let api = PullChanges {
            commits: vec![api_commit("o1", "Squashed (#1)", Some("bob"))],
            files: vec![
                api_file("keep.py", "modified", None),
                api_file("x.py", "added", None),
            ],
        };
        let check = apply(&mut p, &api);
        assert_eq!(check.commits_matched_by, "subject");
        assert!(check.commits_not_in_git.is_empty());
        assert_eq!(check.files_not_in_git, ["x.py"]);
        assert_eq!(p.commits[0].account.as_ref().unwrap().login, "bob");
    }
}
