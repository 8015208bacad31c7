//! Seeded synthetic `davinci.pr/v1` records for scale runs, with planted exact and near
//! duplicates whose ground truth is returned alongside.
//!
//! Record `i` is a pure function of `(seed, i)`, so a corpus of any size is generated in
//! constant memory, in parallel if wanted, and a duplicate can copy any earlier record by
//! regenerating it. Every record replays (its diffs apply to its base files) and renders in
//! both formats: lines are unique within a file, so SEARCH blocks match once.
//!
//! Distributions: commits per PR are geometric with mean 1.56 (pallets/click: 1,636 PR commits
//! over 1,051 merged PRs, BENCHMARKS.md "Crawler"); files per PR, hunks and file lengths are
//! geometric / log-normal with the defaults below (no crawl of a large repository is stored
//! here to fit them to; they are settings).
use crate::pr::{
    Author, AuthorType, BaseFile, Commit, FileChange, FileStatus, GitRef, LinkedIssue, PR_SCHEMA,
    PrSource, PullRequest, RepoMeta, Review, ReviewComment,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What to generate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SynthConfig {
    pub seed: u64,
    /// Share of records that are exact copies of an earlier record (the same PR delivered
    /// twice, as overlapping crawls do).
    pub exact_dup_share: f64,
    /// Share of records that are near copies of an earlier record: the same change
    /// re-submitted to a fork, with a few words and added lines edited.
    pub near_dup_share: f64,
    /// Largest share of a near copy's words that are edited (each copy draws its own share
    /// uniformly below it, so some copies fall under the dedup threshold).
    pub near_edit_max: f64,
    /// PRs per repository on average (the paper: 1.3e7 PRs over 7.4e5 repositories ≈ 17.6).
    pub prs_per_repo: f64,
    /// Share of repositories whose language is Python.
    pub python_repo_share: f64,
    /// Share of PRs opened by a bot account.
    pub bot_share: f64,
    pub mean_commits: f64,
    pub mean_files: f64,
    /// Median lines of a touched file at base (log-normal, sigma `file_lines_sigma`).
    pub median_file_lines: f64,
    pub file_lines_sigma: f64,
    /// Mean lines removed and added by one hunk (geometric).
    pub mean_hunk_del: f64,
    pub mean_hunk_add: f64,
    /// Share of file changes that add a new file.
    pub added_file_share: f64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            exact_dup_share: 0.02,
            near_dup_share: 0.05,
            near_edit_max: 0.06,
            prs_per_repo: 17.6,
            python_repo_share: 0.6,
            bot_share: 0.03,
            mean_commits: 1.56,
            mean_files: 2.4,
            median_file_lines: 120.0,
            file_lines_sigma: 0.9,
            mean_hunk_del: 3.0,
            mean_hunk_add: 5.0,
            added_file_share: 0.15,
        }
    }
}

/// How a record relates to the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Planted {
    Exact,
    Near,
}

/// Ground truth for one planted duplicate: record `index` copies record `of_index`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlantedDup {
    pub index: u64,
    pub id: String,
    pub kind: Planted,
    pub of_index: u64,
    pub of_id: String,
    /// Share of words edited (near copies; 0 for exact ones).
    pub edit_share: f64,
}

/// SplitMix64: tiny, fast and stable across platforms and crate versions.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Geometric on `1, 2, …` with the given mean (>= 1).
    pub fn geometric(&mut self, mean: f64) -> u64 {
        let p = 1.0 / mean.max(1.0);
        if p >= 1.0 {
            return 1;
        }
        let u = 1.0 - self.unit();
        1 + (u.ln() / (1.0 - p).ln()).floor() as u64
    }

    /// Log-normal with the given median and sigma.
    pub fn lognormal(&mut self, median: f64, sigma: f64) -> f64 {
        let u1 = 1.0 - self.unit();
        let u2 = self.unit();
        let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        median * (sigma * z).exp()
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const SYLLABLES: [&str; 24] = [
    "ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "de", "fa", "gu", "ho", "ji", "ve", "zo", "ba",
    "ce", "du", "el", "or", "an", "is", "um", "ex",
];

/// Vocabulary size; words are drawn log-uniformly (Zipf-like: a few words are very common).
const VOCAB: f64 = 50_000.0;

fn word(rng: &mut Rng) -> String {
    let mut k = (rng.unit() * VOCAB.ln()).exp() as u64;
    let mut w = String::new();
    loop {
        w.push_str(SYLLABLES[(k % 24) as usize]);
        k /= 24;
        if k == 0 {
            break;
        }
    }
    w
}

fn words(rng: &mut Rng, n: u64) -> String {
    let mut s = String::new();
    for i in 0..n {
        if i > 0 {
            s.push(if rng.chance(0.08) { '\n' } else { ' ' });
        }
        s.push_str(&word(rng));
    }
    s
}

fn sha(rng: &mut Rng) -> String {
    format!(
        "{:016x}{:016x}{:08x}",
        rng.next_u64(),
        rng.next_u64(),
        rng.next_u64() as u32
    )
}

/// One line of code, unique within its file through `n` (its serial number there).
fn code_line(rng: &mut Rng, n: u64, python: bool) -> String {
    let indent = "    ".repeat(rng.below(3) as usize);
    let (a, b, c) = (word(rng), word(rng), word(rng));
    match (python, rng.below(4)) {
        (true, 0) => format!("{indent}def {a}_{n}({b}, {c}):\n"),
        (true, 1) => format!("{indent}# {a} {b} {c} ({n})\n"),
        (true, _) => format!("{indent}{a}_{n} = {b}.{c}({})\n", rng.below(1000)),
        (false, 0) => format!("{indent}function {a}_{n}({b}, {c}) {{}}\n"),
        (false, 1) => format!("{indent}// {a} {b} {c} ({n})\n"),
        (false, _) => format!("{indent}let {a}_{n} = {b}.{c}({});\n", rng.below(1000)),
    }
}

/// A file being edited over a PR's commits: its lines and a serial for new unique lines.
struct FileState {
    lines: Vec<String>,
    serial: u64,
}

/// Edits `f` with one to a few hunks and returns the unified diff (`@@` onwards, 3 context
/// lines, hunks separated so their contexts never overlap).
fn edit_file(rng: &mut Rng, cfg: &SynthConfig, f: &mut FileState, python: bool) -> String {
    let hunks = rng.geometric(1.6).min(6);
    let mut edits: Vec<(usize, usize, Vec<String>)> = Vec::new();
    let mut floor = 0usize;
    for _ in 0..hunks {
        let len = f.lines.len();
        if floor >= len {
            break;
        }
        let start = floor + rng.below((len - floor).min(60) as u64) as usize;
        let del = ((rng.geometric(cfg.mean_hunk_del + 1.0) - 1) as usize).min(len - start);
        let add = (rng.geometric(cfg.mean_hunk_add + 1.0) - 1) as usize;
        if del == 0 && add == 0 {
            continue;
        }
        let new: Vec<String> = (0..add)
            .map(|_| {
                f.serial += 1;
                code_line(rng, f.serial, python)
            })
            .collect();
        edits.push((start, del, new));
        // 7 lines apart keeps the two hunks' 3-line contexts from touching.
        floor = start + del + 7;
    }
    if edits.is_empty() {
        // A new (empty) file gets a body; otherwise a line is appended.
        let n = if f.lines.is_empty() {
            rng.geometric(40.0)
        } else {
            1
        };
        let new = (0..n)
            .map(|_| {
                f.serial += 1;
                code_line(rng, f.serial, python)
            })
            .collect();
        edits.push((f.lines.len(), 0, new));
    }
    let mut diff = String::new();
    let mut shift: isize = 0;
    let old = f.lines.clone();
    for (start, del, new) in &edits {
        let ctx_a = start.saturating_sub(3);
        let ctx_b = (start + del + 3).min(old.len());
        let old_count = ctx_b - ctx_a;
        let new_count = old_count - del + new.len();
        let old_start = if old_count == 0 { ctx_a } else { ctx_a + 1 };
        let new_start = if new_count == 0 {
            (ctx_a as isize + shift) as usize
        } else {
            (ctx_a as isize + shift) as usize + 1
        };
        diff.push_str(&format!(
            "@@ -{old_start},{old_count} +{new_start},{new_count} @@\n"
        ));
        for l in &old[ctx_a..*start] {
            diff.push(' ');
            diff.push_str(l);
        }
        for l in &old[*start..start + del] {
            diff.push('-');
            diff.push_str(l);
        }
        for l in new {
            diff.push('+');
            diff.push_str(l);
        }
        for l in &old[start + del..ctx_b] {
            diff.push(' ');
            diff.push_str(l);
        }
        shift += new.len() as isize - *del as isize;
    }
    for (start, del, new) in edits.into_iter().rev() {
        f.lines.splice(start..start + del, new);
    }
    diff
}

/// The generator: [`Self::record`] gives record `i` and, for a planted copy, its truth.
#[derive(Debug, Clone)]
pub struct Synth {
    pub cfg: SynthConfig,
}

impl Synth {
    pub fn new(cfg: SynthConfig) -> Self {
        Self { cfg }
    }

    fn rng(&self, i: u64, salt: u64) -> Rng {
        Rng::new(mix(
            self.cfg.seed ^ mix(i.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ salt)
        ))
    }

    /// What record `i` is, decided from `(seed, i)` alone: 0 fresh, 1 exact copy, 2 near copy.
    fn kind(&self, i: u64) -> u8 {
        if i == 0 {
            return 0;
        }
        let u = self.rng(i, 1).unit();
        if u < self.cfg.exact_dup_share {
            1
        } else if u < self.cfg.exact_dup_share + self.cfg.near_dup_share {
            2
        } else {
            0
        }
    }

    /// The fresh record a copy at `i` copies: an earlier fresh one (`None`: none found).
    fn source_of(&self, i: u64) -> Option<u64> {
        let mut rng = self.rng(i, 2);
        (0..32).map(|_| rng.below(i)).find(|&j| self.kind(j) == 0)
    }

    /// Record `i`, and its ground truth when it is a planted copy.
    pub fn record(&self, i: u64) -> (PullRequest, Option<PlantedDup>) {
        let kind = self.kind(i);
        let src = if kind == 0 { None } else { self.source_of(i) };
        let Some(j) = src else {
            return (self.fresh(i), None);
        };
        let orig = self.fresh(j);
        if kind == 1 {
            let truth = PlantedDup {
                index: i,
                id: orig.id.clone(),
                kind: Planted::Exact,
                of_index: j,
                of_id: orig.id.clone(),
                edit_share: 0.0,
            };
            return (orig, Some(truth));
        }
        let mut rng = self.rng(i, 3);
        let edit_share = rng.unit() * self.cfg.near_edit_max;
        let copy = self.near_copy(i, &orig, edit_share, &mut rng);
        let truth = PlantedDup {
            index: i,
            id: copy.id.clone(),
            kind: Planted::Near,
            of_index: j,
            of_id: orig.id.clone(),
            edit_share,
        };
        (copy, Some(truth))
    }

    fn repo(&self, r: u64) -> RepoMeta {
        let mut rng = Rng::new(mix(self.cfg.seed ^ mix(r ^ 0x7265_706f)));
        let python = rng.chance(self.cfg.python_repo_share);
        RepoMeta {
            full_name: format!("synth-{}/{}-{r}", word(&mut rng), word(&mut rng)),
            stars: Some(rng.lognormal(40.0, 2.0) as u64),
            language: Some(if python { "Python" } else { "JavaScript" }.into()),
            license: rng.chance(0.8).then(|| "MIT".to_string()),
            archived: rng.chance(0.02),
        }
    }

    fn fresh(&self, i: u64) -> PullRequest {
        let cfg = &self.cfg;
        let mut rng = self.rng(i, 0);
        // Repositories are popular in a log-uniform way: a few get many PRs.
        let repos = ((i + 1) as f64 / cfg.prs_per_repo).ceil().max(1.0);
        let r = ((rng.unit() * repos.ln()).exp() as u64).min(repos as u64 - 1);
        let repo = self.repo(r);
        let python = repo.language.as_deref() == Some("Python");
        let number = i + 1;
        let n_files = rng.geometric(cfg.mean_files).min(40) as usize;
        let mut paths = Vec::new();
        let mut states: BTreeMap<String, FileState> = BTreeMap::new();
        let mut base_files = Vec::new();
        let mut added = Vec::new();
        for k in 0..n_files {
            let py = python && rng.chance(0.85);
            let dir = word(&mut rng);
            let ext = if py {
                "py"
            } else {
                ["js", "md", "toml"][rng.below(3) as usize]
            };
            let path = format!("{dir}/{}_{k}.{ext}", word(&mut rng));
            let is_added = rng.chance(cfg.added_file_share);
            let lines = if is_added {
                Vec::new()
            } else {
                let n = rng
                    .lognormal(cfg.median_file_lines, cfg.file_lines_sigma)
                    .clamp(1.0, 3000.0) as u64;
                (0..n).map(|s| code_line(&mut rng, s, py)).collect()
            };
            if !is_added {
                base_files.push(BaseFile {
                    path: path.clone(),
                    content: Some(lines.concat()),
                    skipped: None,
                });
            }
            added.push(is_added);
            let serial = lines.len() as u64;
            states.insert(path.clone(), FileState { lines, serial });
            paths.push(path);
        }
        let n_commits = rng.geometric(cfg.mean_commits).min(20) as usize;
        let mut commits = Vec::new();
        let mut created = vec![false; paths.len()];
        for c in 0..n_commits {
            // The first commit touches every file added by the PR; each touches at least one.
            let mut touched: Vec<usize> = (0..paths.len())
                .filter(|&k| (c == 0 && added[k]) || rng.chance(1.0 / n_commits as f64))
                .collect();
            if touched.is_empty() {
                touched.push(rng.below(paths.len() as u64) as usize);
            }
            let mut files = Vec::new();
            for k in touched {
                let path = &paths[k];
                let py = path.ends_with(".py");
                let st = states.get_mut(path).expect("state per path");
                let status = if added[k] && !created[k] {
                    created[k] = true;
                    FileStatus::Added
                } else {
                    FileStatus::Modified
                };
                let diff = edit_file(&mut rng, cfg, st, py);
                files.push(FileChange {
                    path: path.clone(),
                    old_path: None,
                    status,
                    diff,
                    binary: false,
                    skipped: None,
                });
            }
            let msg_words = rng.geometric(8.0);
            commits.push(Commit {
                sha: sha(&mut rng),
                message: format!("{}\n", words(&mut rng, msg_words)),
                author: Some(format!("dev{}", rng.below(10_000))),
                account: None,
                files,
            });
        }
        let bot = rng.chance(cfg.bot_share);
        let login = if bot {
            "synth-bot[bot]".to_string()
        } else {
            format!("dev{}", rng.below(100_000))
        };
        let title_words = 3 + rng.below(8);
        let body_words = rng.geometric(60.0) - 1;
        let linked_issues = if rng.chance(0.4) {
            let iw = rng.geometric(50.0);
            vec![LinkedIssue {
                number: rng.below(number.max(2)) + 1,
                title: {
                    let n = 3 + rng.below(6);
                    words(&mut rng, n)
                },
                body: words(&mut rng, iw),
            }]
        } else {
            Vec::new()
        };
        let reviews = if rng.chance(0.3) {
            let path = paths[rng.below(paths.len() as u64) as usize].clone();
            vec![Review {
                author: Author {
                    login: format!("dev{}", rng.below(100_000)),
                    kind: AuthorType::User,
                    association: Some("MEMBER".into()),
                },
                state: "APPROVED".into(),
                body: {
                    let n = rng.geometric(10.0);
                    words(&mut rng, n)
                },
                comments: vec![ReviewComment {
                    path,
                    line: Some(1 + rng.below(50)),
                    diff_hunk: String::new(),
                    body: {
                        let n = rng.geometric(12.0);
                        words(&mut rng, n)
                    },
                }],
            }]
        } else {
            Vec::new()
        };
        let base_sha = sha(&mut rng);
        let head_sha = commits.last().map(|c| c.sha.clone()).unwrap_or_default();
        PullRequest {
            schema: PR_SCHEMA.into(),
            id: PullRequest::make_id(&repo.full_name, number),
            number,
            title: words(&mut rng, title_words),
            body: words(&mut rng, body_words),
            author: Author {
                login,
                kind: if bot {
                    AuthorType::Bot
                } else {
                    AuthorType::User
                },
                association: Some("CONTRIBUTOR".into()),
            },
            created_at: Some("2025-01-01T00:00:00Z".into()),
            merged_at: Some("2025-01-02T00:00:00Z".into()),
            base: GitRef {
                name: "main".into(),
                sha: base_sha,
            },
            head: GitRef {
                name: format!("feature-{number}"),
                sha: head_sha,
            },
            merge_commit_sha: sha(&mut rng),
            labels: Vec::new(),
            linked_issues,
            commits,
            base_files,
            reviews,
            comments: Vec::new(),
            source: PrSource::GithubApi,
            extra: BTreeMap::new(),
            repo,
        }
    }

    /// `orig` re-submitted to a fork as record `i`: the title, body, commit messages and the
    /// added lines of each file's last change have about `share` of their words replaced.
    fn near_copy(&self, i: u64, orig: &PullRequest, share: f64, rng: &mut Rng) -> PullRequest {
        let mut pr = orig.clone();
        let fork = format!(
            "fork-{}/{}",
            word(rng),
            orig.repo.full_name.split('/').nth(1).unwrap_or("r")
        );
        pr.repo.full_name = fork.clone();
        pr.number = i + 1;
        pr.id = PullRequest::make_id(&fork, pr.number);
        pr.title = perturb(&pr.title, share, rng);
        pr.body = perturb(&pr.body, share, rng);
        let mut last_change: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for (c, commit) in pr.commits.iter().enumerate() {
            for (f, fc) in commit.files.iter().enumerate() {
                last_change.insert(fc.path.clone(), (c, f));
            }
        }
        for commit in &mut pr.commits {
            commit.message = perturb(&commit.message, share, rng);
            commit.sha = sha(rng);
        }
        // Added lines of a file's last change are read by no later hunk, so editing them keeps
        // the record replayable.
        for (c, f) in last_change.into_values() {
            let fc = &mut pr.commits[c].files[f];
            fc.diff = fc
                .diff
                .split_inclusive('\n')
                .map(|l| match l.strip_prefix('+') {
                    Some(body) => format!("+{}", perturb(body, share, rng)),
                    None => l.to_string(),
                })
                .collect();
        }
        pr.head.sha = pr.commits.last().map(|c| c.sha.clone()).unwrap_or_default();
        pr.merge_commit_sha = sha(rng);
        pr
    }
}

/// Replaces about `share` of the alphanumeric words of `text` with fresh ones; everything else
/// (spacing, punctuation, line ends) is kept.
fn perturb(text: &str, share: f64, rng: &mut Rng) -> String {
    let mut out = String::with_capacity(text.len());
    let mut cur = String::new();
    let flush = |cur: &mut String, out: &mut String, rng: &mut Rng| {
        if !cur.is_empty() {
            if rng.chance(share) {
                out.push_str(&word(rng));
            } else {
                out.push_str(cur);
            }
            cur.clear();
        }
    };
    for ch in text.chars() {
        if ch.is_ascii_alphabetic() {
            cur.push(ch);
        } else {
            flush(&mut cur, &mut out, rng);
            out.push(ch);
        }
    }
    flush(&mut cur, &mut out, rng);
    out
}

/// Precision and recall of one kind of dedup drop against the planted copies of that kind.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DedupScore {
    /// Planted copies that could be found: the copy and its original both reached dedup.
    pub planted: u64,
    /// Records dropped as this kind.
    pub dropped: u64,
    /// Dropped records that are planted copies of this kind.
    pub true_drops: u64,
    /// Planted (findable) copies that were dropped.
    pub found: u64,
    pub precision: f64,
    pub recall: f64,
}

/// Scores `dropped` (record indices dedup dropped as `kind`) given `eligible` (record indices
/// that reached dedup, in the same format).
pub fn score(
    planted: &[PlantedDup],
    kind: Planted,
    eligible: &std::collections::HashSet<u64>,
    dropped: &std::collections::HashSet<u64>,
) -> DedupScore {
    let copies: std::collections::HashSet<u64> = planted
        .iter()
        .filter(|p| p.kind == kind)
        .map(|p| p.index)
        .collect();
    let findable: Vec<u64> = planted
        .iter()
        .filter(|p| p.kind == kind && eligible.contains(&p.index) && eligible.contains(&p.of_index))
        .map(|p| p.index)
        .collect();
    let true_drops = dropped.iter().filter(|i| copies.contains(i)).count() as u64;
    let found = findable.iter().filter(|i| dropped.contains(i)).count() as u64;
    let ratio = |a: u64, b: u64| if b == 0 { 1.0 } else { a as f64 / b as f64 };
    DedupScore {
        planted: findable.len() as u64,
        dropped: dropped.len() as u64,
        true_drops,
        found,
        precision: ratio(true_drops, dropped.len() as u64),
        recall: ratio(found, findable.len() as u64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_replay_and_are_deterministic() {
        let s = Synth::new(SynthConfig {
            exact_dup_share: 0.1,
            near_dup_share: 0.2,
            ..SynthConfig::default()
        });
        let mut planted = (0, 0);
        for i in 0..400 {
            let (pr, truth) = s.record(i);
            assert_eq!(s.record(i).0, pr, "record {i} is a function of (seed, i)");
            let replayed = pr.replay().unwrap_or_else(|e| panic!("record {i}: {e}"));
            assert!(!replayed.files.is_empty());
            match truth.map(|t| t.kind) {
                Some(Planted::Exact) => planted.0 += 1,
                Some(Planted::Near) => planted.1 += 1,
                None => {}
            }
        }
        assert!(planted.0 > 20 && planted.1 > 50, "{planted:?}");
        let other = Synth::new(SynthConfig {
            seed: 2,
            ..SynthConfig::default()
        });
        assert_ne!(other.record(5).0, s.record(5).0);
    }

    #[test]
    fn commits_follow_the_configured_mean() {
        let s = Synth::new(SynthConfig::default());
        let n = 3000;
        let commits: usize = (0..n).map(|i| s.fresh(i).commits.len()).sum();
        let mean = commits as f64 / n as f64;
        assert!((mean - 1.56).abs() < 0.1, "mean commits {mean}");
    }
}
