//! PullRequest → samples: selection, rendering, round-trip, token cap, decontamination and
//! deduplication, every drop counted by format and reason.
use crate::enhance::{EnhanceConfig, Provenance};
use crate::filters::{
    BenchmarkFile, Decontaminator, ExactDedup, MinHashLsh, RepoExclusion, SWE_BENCH_VERIFIED_REPOS,
    is_bot, scrub_authors, scrub_message,
};
use davinci_core::ctx::{self, Enhancement};
use davinci_core::pr::PullRequest;
use davinci_core::sample::{Sample, SampleMetadata, SampleSource};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

pub const STATS_SCHEMA: &str = "davinci.stats/v1";

/// Counts tokens of a sample text with the configured tokenizer.
pub type TokenCounter = Arc<dyn Fn(&str) -> usize + Send + Sync>;

/// A whitespace-and-punctuation word count: a stand-in where no tokenizer is configured (it
/// undercounts BPE tokens, so a real run should configure the model's tokenizer).
pub fn word_counter() -> TokenCounter {
    Arc::new(|s: &str| {
        let mut n = 0;
        let mut in_word = false;
        for c in s.chars() {
            if c.is_alphanumeric() || c == '_' {
                if !in_word {
                    n += 1;
                }
                in_word = true;
            } else {
                in_word = false;
                if !c.is_whitespace() {
                    n += 1;
                }
            }
        }
        n
    })
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReconstructConfig {
    pub formats: Vec<SampleSource>,
    /// Samples over this many tokens are dropped, never truncated.
    pub max_tokens: usize,
    /// ctx-python keeps PRs that change this many Python files (inclusive).
    pub python_min_files: usize,
    pub python_max_files: usize,
    /// ctx-python keeps repositories with at least this many stars (unknown counts pass: a
    /// git-snapshot source has none; the crawl spec selects those repositories).
    pub python_min_stars: u64,
    pub exclude_repos: Vec<String>,
    /// Extra exclusion lists (one `owner/name` per line, or SWE-bench's instance-id TSV).
    pub exclude_repos_files: Vec<PathBuf>,
    /// Estimated Jaccard similarity (MinHash over word 5-grams of the PR's own material, see
    /// [`near_dup_text`]) at or above which a sample is a near duplicate.
    pub near_dup_threshold: f64,
    pub minhash_perms: usize,
    pub minhash_shingle: usize,
    pub decontam_ngram: usize,
    pub benchmarks: Vec<BenchmarkFile>,
    pub enhance: EnhanceConfig,
    pub llm: Option<davinci_llm::ChatConfig>,
}

impl Default for ReconstructConfig {
    fn default() -> Self {
        Self {
            formats: vec![SampleSource::CtxGeneral, SampleSource::CtxPython],
            max_tokens: 32_768,
            python_min_files: 1,
            python_max_files: 5,
            python_min_stars: 5,
            exclude_repos: SWE_BENCH_VERIFIED_REPOS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            exclude_repos_files: Vec::new(),
            near_dup_threshold: 0.8,
            minhash_perms: 128,
            minhash_shingle: 5,
            decontam_ngram: 13,
            benchmarks: Vec::new(),
            enhance: EnhanceConfig::default(),
            llm: None,
        }
    }
}

/// Per-format outcome counts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FormatStats {
    pub samples: u64,
    pub tokens: u64,
    pub drops: BTreeMap<String, u64>,
}

/// `stats/reconstruct.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub schema: String,
    pub stage: String,
    pub prs_in: u64,
    /// Records that could not be read as `davinci.pr/v1`.
    pub bad_records: u64,
    pub formats: BTreeMap<String, FormatStats>,
    pub llm: crate::enhance::LlmStats,
    pub seconds: f64,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            schema: STATS_SCHEMA.into(),
            stage: "reconstruct".into(),
            prs_in: 0,
            bad_records: 0,
            formats: BTreeMap::new(),
            llm: Default::default(),
            seconds: 0.0,
        }
    }
}

impl Stats {
    /// Zero counts with a row for each of `formats`.
    pub fn for_formats(formats: &[SampleSource]) -> Self {
        let mut stats = Stats::default();
        for f in formats {
            stats
                .formats
                .insert(f.as_str().to_string(), FormatStats::default());
        }
        stats
    }
}

struct Dedup {
    exact: ExactDedup,
    near: MinHashLsh,
}

/// The stateful part of the stage (dedup indexes, counters). Feed PRs in a fixed order for
/// reproducible output.
pub struct Reconstructor {
    pub cfg: ReconstructConfig,
    count_tokens: TokenCounter,
    excluded: RepoExclusion,
    decontam: Decontaminator,
    dedup: BTreeMap<SampleSource, Dedup>,
    /// Computes near-dedup signatures (configured like every format's index).
    signer: MinHashLsh,
    pub stats: Stats,
}

impl std::fmt::Debug for Reconstructor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconstructor")
            .field("cfg", &self.cfg)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Reconstructor {
    /// Loads the exclusion lists and benchmark files named in `cfg`.
    pub fn new(cfg: ReconstructConfig, count_tokens: TokenCounter) -> anyhow::Result<Self> {
        let mut excluded = RepoExclusion::new(&cfg.exclude_repos);
        for f in &cfg.exclude_repos_files {
            excluded.add_file(f)?;
        }
        let mut decontam = Decontaminator::new(cfg.decontam_ngram);
        for b in &cfg.benchmarks {
            decontam.add_file(b)?;
        }
        let dedup = cfg
            .formats
            .iter()
            .map(|&f| {
                (
                    f,
                    Dedup {
                        exact: ExactDedup::default(),
                        near: MinHashLsh::new(
                            cfg.near_dup_threshold,
                            cfg.minhash_perms,
                            cfg.minhash_shingle,
                        ),
                    },
                )
            })
            .collect();
        let signer = MinHashLsh::new(
            cfg.near_dup_threshold,
            cfg.minhash_perms,
            cfg.minhash_shingle,
        );
        let stats = Stats::for_formats(&cfg.formats);
        Ok(Self {
            cfg,
            count_tokens,
            excluded,
            decontam,
            dedup,
            signer,
            stats,
        })
    }

    /// Decontamination texts loaded (for logs).
    pub fn benchmark_texts(&self) -> usize {
        self.decontam.texts
    }

    fn drop(&mut self, format: SampleSource, reason: &str) {
        *self
            .stats
            .formats
            .entry(format.as_str().to_string())
            .or_default()
            .drops
            .entry(reason.to_string())
            .or_default() += 1;
    }

    /// Counts a record that could not be parsed, against every format.
    pub fn bad_record(&mut self) {
        self.stats.bad_records += 1;
        self.stats.prs_in += 1;
        for f in self.cfg.formats.clone() {
            self.drop(f, "bad_record");
        }
    }

    /// Why `pr` is not selected for `format`, if it is not.
    fn selection(&self, pr: &PullRequest, format: SampleSource) -> Option<&'static str> {
        if pr.merge_commit_sha.is_empty() && pr.merged_at.is_none() {
            return Some("not_merged");
        }
        if is_bot(pr) {
            return Some("bot_author");
        }
        if self.excluded.contains(&pr.repo.full_name) {
            return Some("excluded_repo");
        }
        if pr.commits.is_empty() {
            return Some("no_commits");
        }
        if format == SampleSource::CtxPython {
            if pr.repo.archived {
                return Some("archived_repo");
            }
            if pr.repo.stars.is_some_and(|s| s < self.cfg.python_min_stars) {
                return Some("low_stars");
            }
            let py = pr
                .touched_paths()
                .iter()
                .filter(|p| ctx::fence_language(p) == "python")
                .count();
            if py < self.cfg.python_min_files || py > self.cfg.python_max_files {
                return Some("python_file_count");
            }
        }
        None
    }

    /// Renders and filters one PR whose reasoning text is already built.
    pub fn process(
        &mut self,
        pr: PullRequest,
        enh: &Enhancement,
        prov: &Provenance,
    ) -> Vec<Sample> {
        self.render(pr, enh, prov)
            .into_iter()
            .filter_map(|c| self.admit(c))
            .collect()
    }

    /// The per-PR half of [`Self::process`]: selection, rendering, token cap and
    /// decontamination. It reads no dedup state, so replicas may render PRs in any order; the
    /// candidates then go through [`Self::admit`] in input order.
    pub fn render(
        &mut self,
        mut pr: PullRequest,
        enh: &Enhancement,
        prov: &Provenance,
    ) -> Vec<Candidate> {
        self.stats.prs_in += 1;
        scrub_authors(&mut pr);
        let scrubbed = Enhancement {
            summary: enh.summary.clone(),
            commit_messages: enh
                .commit_messages
                .iter()
                .map(|m| scrub_message(m))
                .collect(),
        };
        let enh = &scrubbed;
        let mut near: Option<Vec<u64>> = None;
        let mut out = Vec::new();
        for format in self.cfg.formats.clone() {
            if let Some(reason) = self.selection(&pr, format) {
                self.drop(format, reason);
                continue;
            }
            let rendered = match format {
                SampleSource::CtxGeneral => ctx::render_general(&pr, enh),
                SampleSource::CtxPython => ctx::render_python(&pr, enh).map(|r| r.text),
                other => {
                    tracing::error!(format = other.as_str(), "not a reconstructor format");
                    self.drop(format, "unsupported_format");
                    continue;
                }
            };
            let text = match rendered {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(pr = %pr.id, format = format.as_str(), error = %e, "dropped");
                    self.drop(format, e.reason);
                    continue;
                }
            };
            let n_tokens = (self.count_tokens)(&text);
            if n_tokens > self.cfg.max_tokens {
                self.drop(format, "too_many_tokens");
                continue;
            }
            if self.decontam.is_contaminated(&text) {
                self.drop(format, "contaminated");
                continue;
            }
            let signature = near
                .get_or_insert_with(|| self.signer.signature(&near_dup_text(&pr)))
                .clone();
            out.push(Candidate {
                text_sha256: hex::encode(ExactDedup::key(&text)),
                signature,
                sample: make_sample(&pr, format, text, n_tokens, prov),
            });
        }
        out
    }

    /// The order-dependent half of [`Self::process`]: exact and near dedup against every
    /// candidate admitted before. Returns the sample when it is kept.
    pub fn admit(&mut self, c: Candidate) -> Option<Sample> {
        match self.dedup_verdict(&c) {
            Some(v) => self.admit_verdict(c, v),
            None => {
                self.drop(c.sample.source, "unsupported_format");
                None
            }
        }
    }

    /// The one-process dedup decision for `c` against every candidate decided before (which
    /// it remembers, as [`Self::admit`] does); `None` for a format this stage does not write.
    pub fn dedup_verdict(&mut self, c: &Candidate) -> Option<Verdict> {
        let d = self.dedup.get_mut(&c.sample.source)?;
        let key = match hex::decode(&c.text_sha256)
            .ok()
            .and_then(|k| k.try_into().ok())
        {
            Some(k) => k,
            None => ExactDedup::key(&c.sample.text),
        };
        Some(if d.exact.check_and_insert_key(key) {
            Verdict::Duplicate
        } else if d.near.check_and_insert_signature(c.signature.clone()) {
            Verdict::NearDuplicate
        } else {
            Verdict::Keep
        })
    }

    /// Counts `c` under a dedup decision made here or by [`crate::partition`], and returns
    /// the sample when it is kept.
    pub fn admit_verdict(&mut self, c: Candidate, v: Verdict) -> Option<Sample> {
        let format = c.sample.source;
        match v {
            Verdict::Duplicate => {
                self.drop(format, "duplicate");
                None
            }
            Verdict::NearDuplicate => {
                self.drop(format, "near_duplicate");
                None
            }
            Verdict::Keep => {
                let fs = self
                    .stats
                    .formats
                    .entry(format.as_str().to_string())
                    .or_default();
                fs.samples += 1;
                fs.tokens += c.sample.metadata.n_tokens.unwrap_or(0);
                Some(c.sample)
            }
        }
    }
}

/// What dedup decided for one candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Keep,
    /// Same format and text as an earlier candidate (`duplicate`).
    Duplicate,
    /// Similar to an earlier kept candidate of its format (`near_duplicate`).
    NearDuplicate,
}

/// A rendered sample before dedup, with what dedup compares, so the order-dependent step can
/// run apart from rendering (see [`Reconstructor::render`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub sample: Sample,
    /// SHA-256 of the sample text (hex).
    pub text_sha256: String,
    /// MinHash signature of the PR's own material ([`near_dup_text`]).
    pub signature: Vec<u64>,
}

impl Stats {
    /// Adds `other`'s counts (stats of parts rendered apart) to these.
    pub fn merge(&mut self, other: &Stats) {
        self.prs_in += other.prs_in;
        self.bad_records += other.bad_records;
        for (f, o) in &other.formats {
            let fs = self.formats.entry(f.clone()).or_default();
            fs.samples += o.samples;
            fs.tokens += o.tokens;
            for (r, n) in &o.drops {
                *fs.drops.entry(r.clone()).or_default() += n;
            }
        }
        self.llm.requests += other.llm.requests;
        self.llm.cache_hits += other.llm.cache_hits;
        for (r, n) in &other.llm.fallbacks {
            *self.llm.fallbacks.entry(r.clone()).or_default() += n;
        }
    }
}

/// What near-duplicate detection compares: the PR's own material (title, description, issues,
/// commit messages and diffs), not the relevant files. Two PRs that edit the same large file
/// share most of their text through that file's base content, yet are different data; a PR
/// re-submitted or cherry-picked elsewhere shares its own material.
pub fn near_dup_text(pr: &PullRequest) -> String {
    let mut s = format!("{}\n{}\n", pr.title, pr.body);
    for i in &pr.linked_issues {
        s.push_str(&format!("{}\n{}\n", i.title, i.body));
    }
    for c in &pr.commits {
        s.push_str(&c.message);
        s.push('\n');
        for f in &c.files {
            s.push_str(&f.path);
            s.push('\n');
            s.push_str(&f.diff);
        }
    }
    s
}

/// The Dolma-style sample with its metadata.
pub fn make_sample(
    pr: &PullRequest,
    format: SampleSource,
    text: String,
    n_tokens: usize,
    prov: &Provenance,
) -> Sample {
    let format_id = match format {
        SampleSource::CtxPython => ctx::CTX_PYTHON_FORMAT,
        _ => ctx::CTX_GENERAL_FORMAT,
    };
    let mut extra = BTreeMap::new();
    extra.insert("summary_source".into(), serde_json::json!(prov.summary));
    extra.insert(
        "refined_commits".into(),
        serde_json::json!(prov.refined_commits),
    );
    extra.insert("commits".into(), serde_json::json!(pr.commits.len()));
    extra.insert("files".into(), serde_json::json!(pr.touched_paths().len()));
    if let Some(l) = &pr.repo.license {
        extra.insert("license".into(), serde_json::json!(l));
    }
    Sample {
        id: format!("{}/{}", pr.id, format.as_str()),
        text,
        source: format,
        metadata: SampleMetadata {
            repo: pr.repo.full_name.clone(),
            pr: pr.number,
            base_sha: pr.base.sha.clone(),
            head_sha: pr.head.sha.clone(),
            format: format_id.to_string(),
            n_tokens: Some(n_tokens as u64),
            extra,
        },
    }
}
