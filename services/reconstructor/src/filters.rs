//! Selection, privacy scrubbing, deduplication and decontamination.
//!
//! MinHash LSH and the 13-gram index are small enough to write out here: the crates that offer
//! them pull in far more than the ~150 lines they would replace, and determinism across runs
//! (fixed permutation seeds, no random hashing keys) matters for re-runnable stages.
use davinci_core::pr::{AuthorType, PullRequest};
use regex::Regex;
use std::collections::{HashMap, HashSet};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

pub use davinci_core::benchmarks::SWE_BENCH_VERIFIED_REPOS;

static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"<?[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)+>?").expect("valid regex")
});

/// Removes e-mail addresses from a free-form author string (`Name <a@b.c>` → `Name`).
pub fn strip_emails(s: &str) -> String {
    EMAIL
        .replace_all(s, "")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Removes e-mail addresses from every author field of `pr`: commit authors, review and comment
/// author logins, and the author trailers of commit messages (`Signed-off-by:`,
/// `Co-authored-by:`, …), which are author fields written into the message.
pub fn scrub_authors(pr: &mut PullRequest) {
    pr.author.login = strip_emails(&pr.author.login);
    for c in &mut pr.commits {
        if let Some(a) = &c.author {
            c.author = Some(strip_emails(a));
        }
        c.message = scrub_message(&c.message);
    }
    for r in &mut pr.reviews {
        r.author.login = strip_emails(&r.author.login);
    }
    for c in &mut pr.comments {
        c.author.login = strip_emails(&c.author.login);
    }
}

/// Removes e-mail addresses from the author trailers of a commit message (`Signed-off-by:`,
/// `Co-authored-by:`, `Reviewed-by:` …); the rest of the message is left as written.
pub fn scrub_message(message: &str) -> String {
    if !EMAIL.is_match(message) {
        return message.to_string();
    }
    message
        .split_inclusive('\n')
        .map(|line| {
            let key = line
                .split(':')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            if key.ends_with("-by") && line.contains(':') && EMAIL.is_match(line) {
                let nl = &line[line.trim_end_matches(['\r', '\n']).len()..];
                format!("{}{nl}", EMAIL.replace_all(line.trim_end(), "").trim_end())
            } else {
                line.to_string()
            }
        })
        .collect()
}

/// A bot account: typed `Bot` by GitHub or named `…[bot]`.
pub fn is_bot(pr: &PullRequest) -> bool {
    pr.author.kind == AuthorType::Bot || pr.author.login.to_ascii_lowercase().ends_with("[bot]")
}

/// Repositories whose PRs are excluded (case-insensitive `owner/name`).
#[derive(Debug, Clone, Default)]
pub struct RepoExclusion {
    repos: HashSet<String>,
}

impl RepoExclusion {
    pub fn new<I: IntoIterator<Item = S>, S: AsRef<str>>(repos: I) -> Self {
        Self {
            repos: repos
                .into_iter()
                .map(|r| r.as_ref().trim().to_ascii_lowercase())
                .filter(|r| !r.is_empty())
                .collect(),
        }
    }

    /// Adds one `owner/name` per line (blank lines and `#` comments skipped); a TSV line's
    /// repository is any column that looks like `owner/name`.
    pub fn add_file(&mut self, path: &Path) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("repository exclusion list {}: {e}", path.display()))?;
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            for col in line.split('\t') {
                let col = col.trim();
                if col.split('/').count() == 2 && !col.contains(' ') && !col.contains("__") {
                    self.repos.insert(col.to_ascii_lowercase());
                }
            }
        }
        Ok(())
    }

    pub fn contains(&self, full_name: &str) -> bool {
        self.repos.contains(&full_name.to_ascii_lowercase())
    }

    pub fn len(&self) -> usize {
        self.repos.len()
    }

    pub fn is_empty(&self) -> bool {
        self.repos.is_empty()
    }
}

/// FNV-1a, stable across runs and platforms.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

/// Lowercased word hashes (`[A-Za-z0-9_]` runs and any other non-space character alone).
fn word_hashes(text: &str) -> Vec<u64> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for ch in text.chars() {
        if ch.is_alphanumeric() || ch == '_' {
            cur.extend(ch.to_lowercase());
        } else if !cur.is_empty() {
            out.push(fnv1a(cur.as_bytes()));
            cur.clear();
        }
    }
    if !cur.is_empty() {
        out.push(fnv1a(cur.as_bytes()));
    }
    out
}

fn ngram_hashes(words: &[u64], n: usize) -> impl Iterator<Item = u64> + '_ {
    words.windows(n).map(|w| {
        w.iter()
            .fold(0x9e3779b97f4a7c15u64, |h, &x| mix(h ^ x).rotate_left(7))
    })
}

/// Exact duplicate detection by SHA-256 of the sample text.
#[derive(Debug, Default)]
pub struct ExactDedup {
    seen: HashSet<[u8; 32]>,
}

impl ExactDedup {
    /// The key [`Self::check_and_insert_key`] takes: the text's SHA-256.
    pub fn key(text: &str) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(text.as_bytes()).into()
    }

    /// True when `text` was seen before; remembers it otherwise.
    pub fn check_and_insert(&mut self, text: &str) -> bool {
        self.check_and_insert_key(Self::key(text))
    }

    /// [`Self::check_and_insert`] for a key computed elsewhere (e.g. by another replica).
    pub fn check_and_insert_key(&mut self, key: [u8; 32]) -> bool {
        !self.seen.insert(key)
    }
}

/// Near-duplicate detection: MinHash signatures over word 5-gram shingles, banded LSH for
/// candidates, candidates confirmed by estimated Jaccard similarity >= `threshold`.
#[derive(Debug)]
pub struct MinHashLsh {
    threshold: f64,
    shingle: usize,
    perms: Vec<(u64, u64)>,
    bands: usize,
    rows: usize,
    buckets: Vec<HashMap<u64, Vec<u32>>>,
    signatures: Vec<Vec<u64>>,
}

const MERSENNE61: u64 = (1 << 61) - 1;

fn mod61(x: u128) -> u64 {
    let lo = (x as u64) & MERSENNE61;
    let hi = (x >> 61) as u64;
    let s = lo + (hi & MERSENNE61) + (hi >> 61);
    if s >= MERSENNE61 { s - MERSENNE61 } else { s }
}

impl MinHashLsh {
    /// `num_perm` hash functions; bands × rows chosen so the LSH S-curve's midpoint
    /// `(1/bands)^(1/rows)` is closest to `threshold`.
    pub fn new(threshold: f64, num_perm: usize, shingle: usize) -> Self {
        let num_perm = num_perm.max(2);
        let mut best = (1, num_perm, f64::MAX);
        for rows in 1..=num_perm {
            if !num_perm.is_multiple_of(rows) {
                continue;
            }
            let bands = num_perm / rows;
            let mid = (1.0 / bands as f64).powf(1.0 / rows as f64);
            let d = (mid - threshold).abs();
            if d < best.2 {
                best = (bands, rows, d);
            }
        }
        let mut seed = 0x5eed_u64;
        let perms = (0..num_perm)
            .map(|_| {
                seed = mix(seed.wrapping_add(0x9e3779b97f4a7c15));
                let a = (seed % (MERSENNE61 - 1)) + 1;
                seed = mix(seed.wrapping_add(0x9e3779b97f4a7c15));
                (a, seed % MERSENNE61)
            })
            .collect();
        Self {
            threshold,
            shingle: shingle.max(1),
            perms,
            bands: best.0,
            rows: best.1,
            buckets: vec![HashMap::new(); best.0],
            signatures: Vec::new(),
        }
    }

    /// The MinHash signature of `text`; it depends only on the configuration, so any replica
    /// configured alike computes the same one.
    pub fn signature(&self, text: &str) -> Vec<u64> {
        let words = word_hashes(text);
        let shingles: HashSet<u64> = if words.len() < self.shingle {
            std::iter::once(words.iter().fold(0, |h, &x| mix(h ^ x))).collect()
        } else {
            ngram_hashes(&words, self.shingle).collect()
        };
        self.perms
            .iter()
            .map(|&(a, b)| {
                shingles
                    .iter()
                    .map(|&s| mod61(a as u128 * (s & MERSENNE61) as u128 + b as u128))
                    .min()
                    .unwrap_or(u64::MAX)
            })
            .collect()
    }

    /// True when `text` is a near duplicate of an earlier text; remembers it otherwise.
    pub fn check_and_insert(&mut self, text: &str) -> bool {
        self.check_and_insert_signature(self.signature(text))
    }

    /// Values per signature.
    pub fn perms(&self) -> usize {
        self.perms.len()
    }

    /// One key per LSH band of `sig` (two signatures can be candidates only where a band's
    /// key is equal).
    pub fn band_keys(&self, sig: &[u64]) -> Vec<u64> {
        (0..self.bands)
            .map(|b| {
                sig[b * self.rows..(b + 1) * self.rows]
                    .iter()
                    .fold(b as u64, |h, &x| mix(h ^ x))
            })
            .collect()
    }

    /// Whether two signatures' estimated Jaccard similarity reaches the threshold.
    pub fn similar(&self, a: &[u64], b: &[u64]) -> bool {
        let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
        same as f64 / a.len() as f64 >= self.threshold
    }

    /// [`Self::check_and_insert`] for a signature computed by [`Self::signature`].
    pub fn check_and_insert_signature(&mut self, sig: Vec<u64>) -> bool {
        let band_keys = self.band_keys(&sig);
        let mut checked = HashSet::new();
        for (b, key) in band_keys.iter().enumerate() {
            if let Some(ids) = self.buckets[b].get(key) {
                for &id in ids {
                    if !checked.insert(id) {
                        continue;
                    }
                    if self.similar(&sig, &self.signatures[id as usize]) {
                        return true;
                    }
                }
            }
        }
        let id = self.signatures.len() as u32;
        for (b, key) in band_keys.into_iter().enumerate() {
            self.buckets[b].entry(key).or_default().push(id);
        }
        self.signatures.push(sig);
        false
    }
}

/// One benchmark file to decontaminate against: JSONL (optionally `.gz`), with the string
/// fields whose text counts (e.g. `problem_statement`, `patch`; `prompt`, `canonical_solution`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchmarkFile {
    pub path: PathBuf,
    pub fields: Vec<String>,
}

/// An index of the n-grams (default 13 words) of benchmark texts; a sample sharing any one of
/// them is contaminated.
#[derive(Debug, Default)]
pub struct Decontaminator {
    n: usize,
    grams: HashSet<u64>,
    pub texts: usize,
}

impl Decontaminator {
    pub fn new(n: usize) -> Self {
        Self {
            n: n.max(1),
            ..Self::default()
        }
    }

    pub fn add_text(&mut self, text: &str) {
        let words = word_hashes(text);
        self.grams.extend(ngram_hashes(&words, self.n));
        self.texts += 1;
    }

    /// Reads every listed field of every record of `file`.
    pub fn add_file(&mut self, file: &BenchmarkFile) -> anyhow::Result<()> {
        let p = &file.path;
        let f = std::fs::File::open(p)
            .map_err(|e| anyhow::anyhow!("benchmark file {}: {e}", p.display()))?;
        let reader: Box<dyn BufRead> = if p.extension().is_some_and(|e| e == "gz") {
            Box::new(std::io::BufReader::new(flate2::read::GzDecoder::new(f)))
        } else {
            Box::new(std::io::BufReader::new(f))
        };
        for (i, line) in reader.lines().enumerate() {
            let line = line.map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(&line)
                .map_err(|e| anyhow::anyhow!("{} line {}: {e}", p.display(), i + 1))?;
            for field in &file.fields {
                if let Some(t) = v.get(field).and_then(|t| t.as_str()) {
                    self.add_text(t);
                }
            }
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.grams.is_empty()
    }

    pub fn is_contaminated(&self, text: &str) -> bool {
        if self.grams.is_empty() {
            return false;
        }
        let words = word_hashes(text);
        ngram_hashes(&words, self.n).any(|g| self.grams.contains(&g))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_stripped() {
        assert_eq!(strip_emails("Jane Doe <jane.doe@example.org>"), "Jane Doe");
        assert_eq!(strip_emails("bob@x.io"), "");
        assert_eq!(strip_emails("octocat"), "octocat");
    }

    #[test]
    fn minhash_finds_near_duplicates_only() {
        let base: String = (0..300)
            .map(|i| format!("word{} ", i % 97 * 7 + i))
            .collect();
        let near = base.replacen("word0 ", "changed ", 1);
        let other: String = (0..300).map(|i| format!("other{i} ")).collect();
        let mut lsh = MinHashLsh::new(0.8, 128, 5);
        assert!(!lsh.check_and_insert(&base));
        assert!(lsh.check_and_insert(&near));
        assert!(!lsh.check_and_insert(&other));
    }

    #[test]
    fn thirteen_gram_overlap() {
        let mut d = Decontaminator::new(13);
        d.add_text("def has_close_elements(numbers: List[float], threshold: float) -> bool: Check if in given list of numbers");
        assert!(d.is_contaminated("x = 1\nDEF has_close_elements(numbers: List[float], threshold: float) -> bool:\n    check IF in given list"));
        assert!(!d.is_contaminated("def has_close_elements(numbers): pass"));
    }

    #[test]
    fn exclusion_is_case_insensitive() {
        let r = RepoExclusion::new(SWE_BENCH_VERIFIED_REPOS);
        assert!(r.contains("Django/Django"));
        assert!(!r.contains("tkem/cachetools"));
    }
}
