//! The git source: merged pull requests found in a repository's history, read with gix.
//!
//! Two shapes of merged PR are recognised:
//! * GitHub merge commits, subject `Merge pull request #N from owner/branch`, two parents:
//!   the first is the base branch tip, the second the PR head. The PR's commits are the
//!   first-parent chain from the head back to the first commit reachable from the base tip
//!   (so every commit's diff, taken against its first parent, applies to the one before it).
//! * GitHub merge commits whose message is the PR title, `Title (#N)`, two parents (the
//!   "default to PR title" merge message setting): same as above;
//! * squash (or single-commit rebase) merges whose subject ends in `(#N)`: one commit, its
//!   parent is the base.
//!
//! PRs no message names (rebase merges, edited squash subjects) are found from the API's merge
//! commit instead ([`GitSource::candidate_from_api`]).
//!
//! Cloning URLs is the one thing done by shelling out to `git`: the gix build in this workspace
//! has no network transport, and gix cannot lazily fetch the blobs a blobless clone lacks.
//! [`prepare`] makes a bare `git clone --filter=blob:none` and [`GitSource`] fetches the blobs it
//! needs with batched `git fetch --stdin` calls (per commit for rename detection, per PR for
//! diffs and base files), the same request git itself makes for missing promisor objects.
use crate::github::ApiPull;
use anyhow::{Context, Result, anyhow, bail};
use davinci_core::pr::{
    Author, AuthorType, BaseFile, Commit, FileChange, FileStatus, GitRef, PR_SCHEMA, PrSource,
    PullRequest, RepoMeta,
};
use davinci_runtime::retry::{PermanentExt, permanent};
use gix::ObjectId;
use gix::bstr::ByteSlice;
use regex::Regex;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, LazyLock};

/// Limits that stop extraction early; a PR over one is dropped with the named reason.
#[derive(Debug, Clone)]
pub struct GitOptions {
    /// Files larger than this are not read (`too_large`).
    pub max_file_bytes: u64,
    /// PRs with more commits are dropped (`too_many_commits`) before any diffing.
    pub max_commits: usize,
}

impl Default for GitOptions {
    fn default() -> Self {
        Self {
            max_file_bytes: 1 << 20,
            max_commits: 250,
        }
    }
}

/// How the PR landed on the base branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MergeStyle {
    Merge,
    Squash,
    /// The PR's commits replayed one by one onto the base (known only from the API).
    Rebase,
}

/// A merged PR found in history, before its commits are read.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub number: u64,
    pub style: MergeStyle,
    /// The commit that landed the PR (merge commit or squash commit).
    pub merge_commit: ObjectId,
    /// First parent of `merge_commit`: the base branch when the PR landed (for a rebase merge,
    /// the commit below the rebased ones).
    pub base_tip: Option<ObjectId>,
    /// Last commit of the PR (second parent of a merge; the squash or last rebased commit).
    pub head: ObjectId,
    /// `owner/branch` from a merge subject.
    pub head_ref: Option<String>,
    pub title: String,
    pub body: String,
    pub merged_at_secs: i64,
    /// Found through the API's merge commit, not a commit message.
    pub located_by_api: bool,
}

/// Why a candidate was not turned into a record.
#[derive(Debug, Clone, PartialEq)]
pub enum Extracted {
    Pr(Box<PullRequest>),
    Dropped(&'static str),
}

static MERGE_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^Merge pull request #(\d+) from (\S+)").expect("valid regex"));
static SQUASH_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^(.*?)\s*\(#(\d+)\)\s*$").expect("valid regex"));
static NOREPLY_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(?:\d+\+)?([^@]+)@users\.noreply\.github\.com$").expect("valid regex")
});

/// Turns `source` (a local repository path or a clone URL) into a local git directory. URLs are
/// cloned bare and blobless into `cache_dir` (or updated with `git fetch` when already there).
/// A source that is neither, and a clone that fails for good (no such repository, an unknown
/// host, no access), fail permanently ([`davinci_runtime::retry`]).
pub fn prepare(source: &str, cache_dir: &Path) -> Result<PathBuf> {
    let p = Path::new(source);
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    if !looks_like_url(source) {
        return Err(anyhow!(
            "repository `{source}` is neither an existing path nor a clone URL"
        ))
        .permanent();
    }
    let name = repo_name_from_url(source)
        .ok_or_else(|| anyhow!("cannot derive owner/name from clone URL `{source}`"))
        .permanent()?;
    // Keyed by the URL too: one owner/name on two hosts (github.com, an Enterprise Server, a
    // mirror) are two clones.
    let url_hash = &davinci_runtime::shard::sha256_hex(source.as_bytes())[..8];
    let key = format!("{}-{url_hash}", name.replace('/', "__"));
    let dir = cache_dir.join(format!("{key}.git"));
    std::fs::create_dir_all(cache_dir)
        .with_context(|| format!("creating clone cache {}", cache_dir.display()))?;
    if dir.join("HEAD").exists() {
        run_git(
            &dir,
            &["fetch", "--quiet", "--filter=blob:none", "origin"],
            None,
        )
        .with_context(|| format!("updating clone of {source}"))?;
    } else {
        let tmp = cache_dir.join(format!(".{key}.partial"));
        let _ = std::fs::remove_dir_all(&tmp);
        // Never wait on a credential prompt: GitHub answers a missing repository with one.
        let out = Command::new("git")
            .args(["clone", "--quiet", "--bare", "--filter=blob:none", source])
            .arg(&tmp)
            .env("GIT_TERMINAL_PROMPT", "0")
            .stdin(std::process::Stdio::null())
            .output()
            .context("running `git clone` (is git installed?)")?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let e = anyhow!(
                "`git clone --filter=blob:none {source}` failed with {}: {}",
                out.status,
                stderr.trim()
            );
            return Err(if clone_fails_for_good(&stderr) {
                permanent(e)
            } else {
                e
            });
        }
        // a bare clone maps remote branches straight onto local ones; keep `origin` configured
        std::fs::rename(&tmp, &dir)
            .with_context(|| format!("moving clone to {}", dir.display()))?;
    }
    Ok(dir)
}

/// Whether `git clone`'s stderr says that trying again cannot help: the repository or host
/// does not exist, or it needs credentials we do not have. Anything else (a timeout, a dropped
/// connection, a server error) may pass.
fn clone_fails_for_good(stderr: &str) -> bool {
    let s = stderr.to_ascii_lowercase();
    [
        "not found",
        "does not exist",
        "does not appear to be a git repository",
        "not a git repository",
        "could not resolve host",
        "could not read username",
        "terminal prompts disabled",
        "authentication failed",
        "unable to find remote helper",
        "is not supported",
    ]
    .iter()
    .any(|p| s.contains(p))
}

fn looks_like_url(s: &str) -> bool {
    s.contains("://") || (s.contains('@') && s.contains(':'))
}

/// `owner/name` from a GitHub-style clone URL (`https://host/owner/name(.git)`,
/// `git@host:owner/name.git`, `file:///…/owner/name`).
pub fn repo_name_from_url(url: &str) -> Option<String> {
    let s = url.trim().trim_end_matches('/');
    let s = s.strip_suffix(".git").unwrap_or(s);
    let path = match s.split_once("://") {
        Some((_, rest)) => rest.split_once('/').map(|(_, p)| p)?,
        None => s.rsplit_once(':').map(|(_, p)| p)?,
    };
    let mut parts = path.rsplit('/').filter(|p| !p.is_empty());
    let name = parts.next()?;
    let owner = parts.next()?;
    let ok = |x: &str| {
        x.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    (ok(owner) && ok(name) && name != "." && name != "..").then(|| format!("{owner}/{name}"))
}

fn run_git(dir: &Path, args: &[&str], stdin: Option<&str>) -> Result<()> {
    use std::io::Write;
    let mut cmd = Command::new("git");
    cmd.arg("-C").arg(dir).args(args);
    if stdin.is_some() {
        cmd.stdin(std::process::Stdio::piped());
    }
    let mut child = cmd.spawn().context("running git")?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(input.as_bytes())?;
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("`git {}` failed with {status}", args.join(" "));
    }
    Ok(())
}

/// Text content of a blob, or why it was not read.
#[derive(Debug, Clone)]
enum Text {
    Ok(Arc<str>),
    Skip(&'static str),
}

/// An open repository plus the caches extraction reuses between PRs.
pub struct GitSource {
    repo: gix::Repository,
    dir: PathBuf,
    pub full_name: String,
    opts: GitOptions,
    diff_cache: gix::diff::blob::Platform,
    promisor: bool,
}

impl std::fmt::Debug for GitSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitSource")
            .field("dir", &self.dir)
            .field("full_name", &self.full_name)
            .finish()
    }
}

impl GitSource {
    /// Opens the repository at `dir`. Its `owner/name` comes from `repo_name`, else from the
    /// `origin` remote URL; one of the two must give it.
    pub fn open(dir: &Path, repo_name: Option<&str>, opts: GitOptions) -> Result<Self> {
        let repo = gix::open(dir)
            .with_context(|| format!("opening git repository {}", dir.display()))
            .permanent()?;
        let snapshot = repo.config_snapshot();
        let origin = snapshot
            .string("remote.origin.url")
            .map(|u| u.to_str_lossy().into_owned());
        let promisor = snapshot.boolean("remote.origin.promisor").unwrap_or(false);
        let full_name = match repo_name {
            Some(n) => {
                validate_full_name(n).permanent()?;
                n.to_string()
            }
            None => origin
                .as_deref()
                .and_then(repo_name_from_url)
                .ok_or_else(|| {
                    anyhow!(
                        "cannot tell the owner/name of {}: no usable `origin` remote URL; name it (`davinci crawl --repo-name owner/name`, `davinci run --repo PATH,name=owner/name`)",
                        dir.display()
                    )
                })
                .permanent()?,
        };
        let diff_cache = repo
            .diff_resource_cache_for_tree_diff()
            .map_err(|e| anyhow!("preparing diff cache: {e}"))?;
        Ok(Self {
            repo,
            dir: dir.to_path_buf(),
            full_name,
            opts,
            diff_cache,
            promisor,
        })
    }

    /// Every merged PR visible from HEAD, one per number, sorted by number. The second value
    /// counts candidates dropped as duplicates of a number already found (backports,
    /// cherry-picks): a merge commit wins over a squash subject, then the oldest commit.
    pub fn candidates(&self) -> Result<(Vec<Candidate>, u64)> {
        let head = self
            .repo
            .head_id()
            .map_err(|e| anyhow!("reading HEAD: {e}"))?
            .detach();
        let walk = self
            .repo
            .rev_walk([head])
            .all()
            .map_err(|e| anyhow!("walking history: {e}"))?;
        let mut by_number: BTreeMap<u64, Candidate> = BTreeMap::new();
        let mut dups = 0u64;
        for info in walk {
            let info = info.map_err(|e| anyhow!("walking history: {e}"))?;
            let commit = self
                .repo
                .find_commit(info.id)
                .map_err(|e| anyhow!("reading commit {}: {e}", info.id))?;
            let parents: Vec<ObjectId> = commit.parent_ids().map(|p| p.detach()).collect();
            let msg = commit.message_raw_sloppy().to_str_lossy().into_owned();
            let (subject, rest) = split_subject(&msg);
            let merged_at_secs = commit.time().map(|t| t.seconds).unwrap_or(0);
            let cand = if let (Some(m), 2) = (MERGE_RE.captures(subject), parents.len()) {
                let number: u64 = match m[1].parse() {
                    Ok(n) => n,
                    Err(_) => continue,
                };
                let (title, body) = split_subject(rest.trim_start_matches('\n'));
                let title = if title.trim().is_empty() {
                    subject.to_string()
                } else {
                    title.to_string()
                };
                Candidate {
                    number,
                    style: MergeStyle::Merge,
                    merge_commit: info.id,
                    base_tip: Some(parents[0]),
                    head: parents[1],
                    head_ref: Some(m[2].to_string()),
                    title,
                    body: body.trim_matches('\n').to_string(),
                    merged_at_secs,
                    located_by_api: false,
                }
            } else if let (Some(m), 2) = (SQUASH_RE.captures(subject), parents.len()) {
                // GitHub merge commit whose message is set to the PR title (a repository
                // setting since 2022): `Title (#N)` with the PR head as second parent
                let number: u64 = match m[2].parse() {
                    Ok(n) => n,
                    Err(_) => continue,
                };
                Candidate {
                    number,
                    style: MergeStyle::Merge,
                    merge_commit: info.id,
                    base_tip: Some(parents[0]),
                    head: parents[1],
                    head_ref: None,
                    title: m[1].to_string(),
                    body: rest.trim_matches('\n').to_string(),
                    merged_at_secs,
                    located_by_api: false,
                }
            } else if let (Some(m), true) = (SQUASH_RE.captures(subject), parents.len() <= 1) {
                let number: u64 = match m[2].parse() {
                    Ok(n) => n,
                    Err(_) => continue,
                };
                Candidate {
                    number,
                    style: MergeStyle::Squash,
                    merge_commit: info.id,
                    base_tip: parents.first().copied(),
                    head: info.id,
                    head_ref: None,
                    title: m[1].to_string(),
                    body: rest.trim_matches('\n').to_string(),
                    merged_at_secs,
                    located_by_api: false,
                }
            } else {
                continue;
            };
            match by_number.get(&cand.number) {
                Some(old) if !prefer(&cand, old) => dups += 1,
                Some(_) => {
                    dups += 1;
                    by_number.insert(cand.number, cand);
                }
                None => {
                    by_number.insert(cand.number, cand);
                }
            }
        }
        Ok((by_number.into_values().collect(), dups))
    }

    /// A candidate for a PR the API says was merged but no commit message names, found by its
    /// merge commit: two parents make a merge; one parent with the PR's commit subjects on the
    /// first-parent chain below it (newest last) makes a rebase merge of those commits; any
    /// other single-parent commit a squash. `None` when this clone lacks the merge commit.
    pub fn candidate_from_api(&self, p: &ApiPull) -> Result<Option<Candidate>> {
        let Ok(merge) = ObjectId::from_hex(p.merge_commit_sha.as_bytes()) else {
            return Ok(None);
        };
        let Ok(commit) = self.repo.find_commit(merge) else {
            return Ok(None);
        };
        let parents: Vec<ObjectId> = commit.parent_ids().map(|x| x.detach()).collect();
        let merged_at_secs = chrono::DateTime::parse_from_rfc3339(&p.merged_at)
            .map(|t| t.timestamp())
            .or_else(|_| commit.time().map(|t| t.seconds))
            .unwrap_or(0);
        let (style, base_tip, head) = match parents.as_slice() {
            [first, second] => (MergeStyle::Merge, Some(*first), *second),
            [_] | [] => {
                let n = p.commit_subjects.len();
                let below = if n > 1 {
                    self.first_parent_subjects(merge, n)?
                } else {
                    None
                };
                match below {
                    Some((subjects, base)) if subjects == p.commit_subjects => {
                        (MergeStyle::Rebase, base, merge)
                    }
                    _ => (MergeStyle::Squash, parents.first().copied(), merge),
                }
            }
            _ => return Ok(None), // octopus merges are not GitHub's
        };
        Ok(Some(Candidate {
            number: p.number,
            style,
            merge_commit: merge,
            base_tip,
            head,
            head_ref: p.head_ref.clone(),
            title: p.title.clone(),
            body: p.body.clone(),
            merged_at_secs,
            located_by_api: true,
        }))
    }

    /// Subjects of the `n` first-parent commits ending at `tip`, oldest first, and the commit
    /// below them; `None` when history is shorter or one of them is a merge.
    fn first_parent_subjects(
        &self,
        tip: ObjectId,
        n: usize,
    ) -> Result<Option<(Vec<String>, Option<ObjectId>)>> {
        let mut subjects = Vec::with_capacity(n);
        let mut cur = Some(tip);
        for _ in 0..n {
            let Some(id) = cur else { return Ok(None) };
            let c = self
                .repo
                .find_commit(id)
                .map_err(|e| anyhow!("reading commit {id}: {e}"))?;
            let parents: Vec<ObjectId> = c.parent_ids().map(|x| x.detach()).collect();
            if parents.len() > 1 {
                return Ok(None);
            }
            let msg = c.message_raw_sloppy().to_str_lossy().into_owned();
            subjects.push(split_subject(&msg).0.to_string());
            cur = parents.first().copied();
        }
        subjects.reverse();
        Ok(Some((subjects, cur)))
    }

    /// Reads one candidate's commits, diffs and base files into a `davinci.pr/v1` record.
    pub fn extract(&mut self, cand: &Candidate) -> Result<Extracted> {
        let (chain, base) = match cand.style {
            MergeStyle::Squash => (vec![cand.merge_commit], cand.base_tip),
            MergeStyle::Merge | MergeStyle::Rebase => {
                let Some(base_tip) = cand.base_tip else {
                    return Ok(Extracted::Dropped("empty"));
                };
                match self.pr_chain(cand.head, base_tip)? {
                    Some(x) => x,
                    None => return Ok(Extracted::Dropped("too_many_commits")),
                }
            }
        };
        if chain.is_empty() {
            return Ok(Extracted::Dropped("empty"));
        }
        // Tree diffs first (trees are always present, even in a blobless clone) …
        let mut per_commit = Vec::with_capacity(chain.len());
        let mut needed: Vec<ObjectId> = Vec::new();
        for &id in &chain {
            let (parent, msg, author_s, login, time) = {
                let commit = self
                    .repo
                    .find_commit(id)
                    .map_err(|e| anyhow!("reading commit {id}: {e}"))?;
                let parent = commit.parent_ids().next().map(|p| p.detach());
                let msg = commit.message_raw_sloppy().to_str_lossy().into_owned();
                let author = commit
                    .author()
                    .map_err(|e| anyhow!("commit {id} author: {e}"))?;
                let (name, email) = (author.name.to_str_lossy(), author.email.to_str_lossy());
                (
                    parent,
                    msg,
                    format!("{name} <{email}>"),
                    login_of(&name, &email),
                    author.seconds(),
                )
            };
            let changes = self.tree_changes(parent, id)?;
            for c in &changes {
                needed.extend(c.old_id);
                needed.extend(c.new_id);
            }
            per_commit.push((id, msg, author_s, login, time, changes));
        }
        // … then the base side of every touched path …
        let base_tree = match base {
            Some(b) => Some(
                self.repo
                    .find_commit(b)
                    .map_err(|e| anyhow!("reading base {b}: {e}"))?
                    .tree_id()
                    .map_err(|e| anyhow!("base tree: {e}"))?
                    .detach(),
            ),
            None => None,
        };
        let mut touched: Vec<String> = Vec::new();
        let mut seen = HashSet::new();
        for (.., changes) in &per_commit {
            for c in changes {
                for p in c.old_path.iter().chain(std::iter::once(&c.path)) {
                    if seen.insert(p.clone()) {
                        touched.push(p.clone());
                    }
                }
            }
        }
        let mut base_ids: Vec<(String, ObjectId)> = Vec::new();
        if let Some(t) = base_tree {
            let tree = self
                .repo
                .find_tree(t)
                .map_err(|e| anyhow!("reading base tree: {e}"))?;
            for p in &touched {
                let entry = tree
                    .lookup_entry_by_path(p)
                    .map_err(|e| anyhow!("looking up `{p}` at base: {e}"))?;
                if let Some(e) = entry.filter(|e| e.mode().is_blob_or_symlink()) {
                    base_ids.push((p.clone(), e.object_id()));
                    needed.push(e.object_id());
                }
            }
        }
        // … so a partial clone can fetch every missing blob in one batch.
        self.ensure_blobs(&needed)?;
        let mut texts: HashMap<ObjectId, Text> = HashMap::new();
        let mut commits = Vec::with_capacity(per_commit.len());
        for (id, msg, author_s, _, _, changes) in &per_commit {
            let mut files = Vec::with_capacity(changes.len());
            for c in changes {
                files.push(self.file_change(c, &mut texts)?);
            }
            commits.push(Commit {
                sha: id.to_string(),
                message: msg.clone(),
                author: Some(author_s.clone()),
                account: None,
                files,
            });
        }
        let mut base_files = Vec::with_capacity(base_ids.len());
        for (path, id) in base_ids {
            let t = self.text(id, &mut texts)?;
            base_files.push(match t {
                Text::Ok(s) => BaseFile {
                    path,
                    content: Some(s.to_string()),
                    skipped: None,
                },
                Text::Skip(why) => BaseFile {
                    path,
                    content: None,
                    skipped: Some(why.to_string()),
                },
            });
        }
        let (_, _, _, login, first_time, _) = &per_commit[0];
        let bot = login.ends_with("[bot]");
        let mut extra = BTreeMap::new();
        extra.insert("merge_style".into(), serde_json::to_value(cand.style)?);
        if let Some(t) = cand.base_tip {
            extra.insert("base_tip".into(), t.to_string().into());
        }
        if cand.located_by_api {
            extra.insert("located_by".into(), "github-api".into());
        }
        let pr = PullRequest {
            schema: PR_SCHEMA.into(),
            id: PullRequest::make_id(&self.full_name, cand.number),
            repo: RepoMeta {
                full_name: self.full_name.clone(),
                ..Default::default()
            },
            number: cand.number,
            title: cand.title.clone(),
            body: cand.body.clone(),
            author: Author {
                login: login.clone(),
                kind: if bot {
                    AuthorType::Bot
                } else {
                    AuthorType::User
                },
                association: None,
            },
            created_at: rfc3339(*first_time),
            merged_at: rfc3339(cand.merged_at_secs),
            base: GitRef {
                name: String::new(),
                sha: base.map(|b| b.to_string()).unwrap_or_default(),
            },
            head: GitRef {
                name: cand.head_ref.clone().unwrap_or_default(),
                sha: cand.head.to_string(),
            },
            merge_commit_sha: cand.merge_commit.to_string(),
            labels: vec![],
            linked_issues: vec![],
            commits,
            base_files,
            reviews: vec![],
            comments: vec![],
            source: PrSource::Git,
            extra,
        };
        Ok(Extracted::Pr(Box::new(pr)))
    }

    /// Files at `commit` for `paths` (text only; `None` when missing, binary or unreadable).
    /// Used by checks that compare a replayed PR with the real tree.
    pub fn files_at(
        &self,
        commit: &str,
        paths: &[&str],
    ) -> Result<BTreeMap<String, Option<Vec<u8>>>> {
        let id = ObjectId::from_hex(commit.as_bytes())
            .with_context(|| format!("bad commit id {commit}"))?;
        let tree = self
            .repo
            .find_commit(id)
            .map_err(|e| anyhow!("{e}"))?
            .tree()
            .map_err(|e| anyhow!("{e}"))?;
        let mut out = BTreeMap::new();
        for p in paths {
            let e = tree.lookup_entry_by_path(p).map_err(|e| anyhow!("{e}"))?;
            let data = match e.filter(|e| e.mode().is_blob_or_symlink()) {
                Some(e) => Some(
                    self.repo
                        .find_blob(e.object_id())
                        .map_err(|e| anyhow!("{e}"))?
                        .data
                        .clone(),
                ),
                None => None,
            };
            out.insert(p.to_string(), data);
        }
        Ok(out)
    }

    /// The first-parent chain of PR commits from `head` back to the first commit reachable
    /// from `base_tip`, oldest first, plus the commit the chain starts from. `None` when the
    /// chain is longer than the commit cap.
    fn pr_chain(
        &self,
        head: ObjectId,
        base_tip: ObjectId,
    ) -> Result<Option<(Vec<ObjectId>, Option<ObjectId>)>> {
        let walk = self
            .repo
            .rev_walk([head])
            .with_hidden([base_tip])
            .all()
            .map_err(|e| anyhow!("walking PR commits: {e}"))?;
        let mut own: HashSet<ObjectId> = HashSet::new();
        for info in walk {
            let info = info.map_err(|e| anyhow!("walking PR commits: {e}"))?;
            own.insert(info.id);
            if own.len() > self.opts.max_commits.saturating_mul(4).max(1000) {
                return Ok(None);
            }
        }
        let mut chain = Vec::new();
        let mut cur = Some(head);
        while let Some(c) = cur.filter(|c| own.contains(c)) {
            chain.push(c);
            if chain.len() > self.opts.max_commits {
                return Ok(None);
            }
            let commit = self
                .repo
                .find_commit(c)
                .map_err(|e| anyhow!("reading commit {c}: {e}"))?;
            cur = commit.parent_ids().next().map(|p| p.detach());
        }
        chain.reverse();
        Ok(Some((chain, cur)))
    }

    /// Blob-level changes from `parent` (or the empty tree) to `commit`, renames detected.
    /// In a partial clone the blobs of added and deleted files are fetched first, because
    /// rename detection compares their contents.
    fn tree_changes(
        &mut self,
        parent: Option<ObjectId>,
        commit: ObjectId,
    ) -> Result<Vec<RawChange>> {
        if self.promisor {
            let plain = self.tree_changes_with(parent, commit, false)?;
            let ids: Vec<ObjectId> = plain
                .iter()
                .flat_map(|c| c.old_id.into_iter().chain(c.new_id))
                .collect();
            self.ensure_blobs(&ids)?;
        }
        self.tree_changes_with(parent, commit, true)
    }

    fn tree_changes_with(
        &mut self,
        parent: Option<ObjectId>,
        commit: ObjectId,
        rewrites: bool,
    ) -> Result<Vec<RawChange>> {
        let new_tree = self
            .repo
            .find_commit(commit)
            .map_err(|e| anyhow!("{e}"))?
            .tree()
            .map_err(|e| anyhow!("tree of {commit}: {e}"))?;
        let old_tree = match parent {
            Some(p) => self
                .repo
                .find_commit(p)
                .map_err(|e| anyhow!("{e}"))?
                .tree()
                .map_err(|e| anyhow!("tree of {p}: {e}"))?,
            None => self.repo.empty_tree(),
        };
        let opts: gix::diff::tree_with_rewrites::Options = gix::diff::Options::default()
            .with_rewrites(rewrites.then(gix::diff::Rewrites::default))
            .into();
        let mut out = Vec::new();
        self.diff_cache.clear_resource_cache_keep_allocation();
        gix::diff::tree_with_rewrites(
            gix::objs::TreeRefIter::from_bytes(&old_tree.data, old_tree.id.kind()),
            gix::objs::TreeRefIter::from_bytes(&new_tree.data, new_tree.id.kind()),
            &mut self.diff_cache,
            &mut Default::default(),
            &self.repo.objects,
            |change| {
                use gix::diff::tree_with_rewrites::ChangeRef as C;
                let rc = match change {
                    C::Addition {
                        location,
                        entry_mode,
                        id,
                        ..
                    } if entry_mode.is_blob_or_symlink() => Some(RawChange {
                        path: location.to_str_lossy().into_owned(),
                        old_path: None,
                        status: FileStatus::Added,
                        old_id: None,
                        new_id: Some(id.to_owned()),
                    }),
                    C::Deletion {
                        location,
                        entry_mode,
                        id,
                        ..
                    } if entry_mode.is_blob_or_symlink() => Some(RawChange {
                        path: location.to_str_lossy().into_owned(),
                        old_path: None,
                        status: FileStatus::Deleted,
                        old_id: Some(id.to_owned()),
                        new_id: None,
                    }),
                    C::Modification {
                        location,
                        previous_entry_mode,
                        previous_id,
                        entry_mode,
                        id,
                    } => {
                        match (
                            previous_entry_mode.is_blob_or_symlink(),
                            entry_mode.is_blob_or_symlink(),
                        ) {
                            (true, true) => Some(RawChange {
                                path: location.to_str_lossy().into_owned(),
                                old_path: None,
                                status: FileStatus::Modified,
                                old_id: Some(previous_id.to_owned()),
                                new_id: Some(id.to_owned()),
                            }),
                            (true, false) => Some(RawChange {
                                path: location.to_str_lossy().into_owned(),
                                old_path: None,
                                status: FileStatus::Deleted,
                                old_id: Some(previous_id.to_owned()),
                                new_id: None,
                            }),
                            (false, true) => Some(RawChange {
                                path: location.to_str_lossy().into_owned(),
                                old_path: None,
                                status: FileStatus::Added,
                                old_id: None,
                                new_id: Some(id.to_owned()),
                            }),
                            (false, false) => None,
                        }
                    }
                    C::Rewrite {
                        source_location,
                        source_entry_mode,
                        source_id,
                        entry_mode,
                        id,
                        location,
                        copy,
                        ..
                    } if !copy
                        && source_entry_mode.is_blob_or_symlink()
                        && entry_mode.is_blob_or_symlink() =>
                    {
                        Some(RawChange {
                            path: location.to_str_lossy().into_owned(),
                            old_path: Some(source_location.to_str_lossy().into_owned()),
                            status: FileStatus::Renamed,
                            old_id: Some(source_id.to_owned()),
                            new_id: Some(id.to_owned()),
                        })
                    }
                    _ => None,
                };
                out.extend(rc);
                Ok(std::ops::ControlFlow::Continue(()))
            },
            opts,
        )
        .map_err(|e| anyhow!("diffing {commit} against its parent: {e}"))?;
        // a path may not appear twice (type changes come as deletion + addition): keep order stable
        out.sort_by(|a, b| {
            a.path
                .cmp(&b.path)
                .then((a.status as u8).cmp(&(b.status as u8)))
        });
        Ok(out)
    }

    fn file_change(
        &self,
        c: &RawChange,
        texts: &mut HashMap<ObjectId, Text>,
    ) -> Result<FileChange> {
        let old = match c.old_id {
            Some(id) => self.text(id, texts)?,
            None => Text::Ok(Arc::from("")),
        };
        let new = match c.new_id {
            Some(id) => self.text(id, texts)?,
            None => Text::Ok(Arc::from("")),
        };
        let mut fc = FileChange {
            path: c.path.clone(),
            old_path: c.old_path.clone(),
            status: c.status,
            diff: String::new(),
            binary: false,
            skipped: None,
        };
        match (old, new) {
            (Text::Ok(a), Text::Ok(b)) => {
                if c.old_id != c.new_id {
                    fc.diff = unified_diff(&a, &b);
                }
            }
            (Text::Skip("binary"), _) | (_, Text::Skip("binary")) => fc.binary = true,
            (Text::Skip(why), _) | (_, Text::Skip(why)) => fc.skipped = Some(why.to_string()),
        }
        Ok(fc)
    }

    fn text(&self, id: ObjectId, cache: &mut HashMap<ObjectId, Text>) -> Result<Text> {
        if let Some(t) = cache.get(&id) {
            return Ok(t.clone());
        }
        let header = self
            .repo
            .find_header(id)
            .map_err(|e| anyhow!("reading blob {id}: {e}"))?;
        let t = if header.size() > self.opts.max_file_bytes {
            Text::Skip("too_large")
        } else {
            let blob = self
                .repo
                .find_blob(id)
                .map_err(|e| anyhow!("reading blob {id}: {e}"))?;
            classify(&blob.data)
        };
        cache.insert(id, t.clone());
        Ok(t)
    }

    /// In a partial clone, fetches the blobs among `ids` that are not local yet, in one batch.
    fn ensure_blobs(&self, ids: &[ObjectId]) -> Result<()> {
        if !self.promisor {
            return Ok(());
        }
        let missing: BTreeSet<String> = ids
            .iter()
            .filter(|id| !self.repo.has_object(id))
            .map(|id| id.to_string())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let list: String = missing.iter().map(|m| format!("{m}\n")).collect();
        run_git(
            &self.dir,
            &[
                "-c",
                "fetch.negotiationAlgorithm=noop",
                "fetch",
                "--quiet",
                "origin",
                "--no-tags",
                "--no-write-fetch-head",
                "--recurse-submodules=no",
                "--filter=blob:none",
                "--stdin",
            ],
            Some(&list),
        )
        .with_context(|| format!("fetching {} missing blobs", missing.len()))?;
        // gix rescans the pack directory on a miss (its default refresh mode), so the new pack
        // is seen without reopening the repository
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct RawChange {
    path: String,
    old_path: Option<String>,
    status: FileStatus,
    old_id: Option<ObjectId>,
    new_id: Option<ObjectId>,
}

/// git's binary heuristic (a NUL in the first 8000 bytes), then UTF-8.
fn classify(data: &[u8]) -> Text {
    if data[..data.len().min(8000)].contains(&0) {
        return Text::Skip("binary");
    }
    match std::str::from_utf8(data) {
        Ok(s) => Text::Ok(Arc::from(s)),
        Err(_) => Text::Skip("not_utf8"),
    }
}

/// Unified diff hunks (no `---`/`+++` header), 3 lines of context, `\ No newline at end of
/// file` markers, the layout `git diff` prints. Diffing stops refining after 2 s on pathological
/// inputs; the result is still a correct (if longer) diff.
pub fn unified_diff(old: &str, new: &str) -> String {
    let diff = similar::TextDiff::configure()
        .algorithm(similar::Algorithm::Myers)
        .timeout(std::time::Duration::from_secs(2))
        .diff_lines(old, new);
    let mut out = String::new();
    let mut u = diff.unified_diff();
    u.context_radius(3).missing_newline_hint(true);
    for hunk in u.iter_hunks() {
        out.push_str(&hunk.to_string());
    }
    out
}

/// The GitHub login behind a commit author when the email is a GitHub noreply address,
/// else the author name (a `[bot]` suffix survives either way).
pub fn login_of(name: &str, email: &str) -> String {
    if let Some(m) = NOREPLY_RE.captures(email.trim()) {
        return m[1].to_string();
    }
    name.trim().to_string()
}

/// A merge subject beats a squash subject; among equals the oldest commit (the original, not a
/// backport) wins, then the smaller id.
fn prefer(new: &Candidate, old: &Candidate) -> bool {
    let rank = |c: &Candidate| {
        (
            c.style != MergeStyle::Merge,
            c.merged_at_secs,
            c.merge_commit,
        )
    };
    rank(new) < rank(old)
}

fn split_subject(msg: &str) -> (&str, &str) {
    match msg.split_once('\n') {
        Some((s, rest)) => (s.trim_end_matches('\r'), rest),
        None => (msg.trim_end_matches(['\r', '\n']), ""),
    }
}

fn rfc3339(secs: i64) -> Option<String> {
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

/// `owner/name` made of the characters GitHub allows, nothing that could climb out of a
/// storage prefix.
pub fn validate_full_name(n: &str) -> Result<()> {
    if !davinci_core::pr::RepoMeta::is_full_name(n) {
        bail!("`{n}` is not a repository name of the form owner/name");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A repository that is not there fails permanently (the work item is not retried); a
    /// dropped connection does not.
    #[test]
    fn missing_repositories_fail_permanently() {
        use davinci_runtime::retry::is_permanent;
        let cache = tempfile::tempdir().unwrap();
        let e = prepare("/nonexistent/repository", cache.path()).unwrap_err();
        assert!(is_permanent(&e), "{e:#}");
        let gone = format!("file://{}/acme/gone.git", cache.path().display());
        let e = prepare(&gone, cache.path()).unwrap_err();
        assert!(is_permanent(&e), "{e:#}");
        assert!(
            format!("{e:#}").contains("does not appear to be a git repository"),
            "{e:#}"
        );
        let e = GitSource::open(cache.path(), None, GitOptions::default()).unwrap_err();
        assert!(is_permanent(&e), "{e:#}");
        assert!(clone_fails_for_good(
            "fatal: unable to access 'https://github.com/acme/x/': Could not resolve host: github.com"
        ));
        assert!(clone_fails_for_good(
            "remote: Repository not found.\nfatal: repository 'https://github.com/acme/x/' not found"
        ));
        assert!(!clone_fails_for_good(
            "error: RPC failed; curl 56 GnuTLS recv error (-54)\nfatal: early EOF"
        ));
        assert!(!clone_fails_for_good(
            "fatal: unable to access 'https://github.com/acme/x/': Failed to connect to github.com port 443 after 130000 ms: Connection timed out"
        ));
    }

    #[test]
    fn names_from_urls() {
        assert_eq!(
            repo_name_from_url("https://github.com/pallets/click.git").as_deref(),
            Some("pallets/click")
        );
        assert_eq!(
            repo_name_from_url("git@github.com:tkem/cachetools.git").as_deref(),
            Some("tkem/cachetools")
        );
        assert_eq!(
            repo_name_from_url("file:///tmp/x/owner/repo/").as_deref(),
            Some("owner/repo")
        );
        assert_eq!(repo_name_from_url("https://github.com/only"), None);
        assert!(validate_full_name("a/b").is_ok());
        assert!(validate_full_name("../b").is_err());
        assert!(validate_full_name("a/b/c").is_err());
    }

    #[test]
    fn logins_from_noreply_emails() {
        assert_eq!(
            login_of(
                "Dependabot",
                "49699333+dependabot[bot]@users.noreply.github.com"
            ),
            "dependabot[bot]"
        );
        assert_eq!(login_of("Jane Doe", "jane@example.com"), "Jane Doe");
    }

    #[test]
    fn diff_round_trips_through_the_core_applier() {
        let cases = [
            ("", "a\nb"),
            ("a\nb\n", ""),
            ("a\nb", "a\nb\n"),
            ("x\r\ny\r\n", "x\r\nz\r\n"),
            ("1\n2\n3\n4\n5\n6\n7\n8\n9\n", "1\n2\nX\n4\n5\n6\n7\n8\nY\n"),
        ];
        for (a, b) in cases {
            let d = unified_diff(a, b);
            assert_eq!(
                davinci_core::diff::apply_unified(a, &d).unwrap(),
                b,
                "diff {d:?}"
            );
        }
    }
}
