//! Golden samples for both formats over the fixture PRs in `tests/fixtures/` (written by
//! `make_fixtures.py`). `UPDATE_GOLDEN=1 cargo test -p davinci-reconstructor --test golden`
//! rewrites `tests/golden/`; review the diff by eye against DESIGN.md §4.
use davinci_core::ctx::{self, Enhancement};
use davinci_core::ctx_text;
use davinci_core::pr::PullRequest;
use davinci_core::sample::SampleSource;
use davinci_core::search_replace;
use davinci_reconstructor::enhance::{Enhancer, Provenance};
use davinci_reconstructor::{
    ReconstructConfig, Reconstructor, deterministic_summary, word_counter,
};
use std::collections::BTreeMap;
use std::path::PathBuf;

fn dir(sub: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(sub)
}

fn fixture(name: &str) -> PullRequest {
    let p = dir("fixtures").join(format!("{name}.json"));
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn golden(name: &str, actual: &str) {
    let p = dir("golden").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, actual).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", p.display()));
    assert!(
        want == actual,
        "{} differs from the rendered text (UPDATE_GOLDEN=1 to accept):\n{actual}",
        p.display()
    );
}

fn det(pr: &PullRequest) -> (Enhancement, Provenance) {
    let e = Enhancer::new(None, Default::default());
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(e.enhance(pr))
}

/// Renders through the pipeline (scrubbing, selection, filters) and returns text per format.
fn run(pr: PullRequest) -> (BTreeMap<SampleSource, String>, Reconstructor) {
    let mut r = Reconstructor::new(ReconstructConfig::default(), word_counter()).unwrap();
    let (enh, prov) = det(&pr);
    let out = r
        .process(pr, &enh, &prov)
        .into_iter()
        .map(|s| (s.source, s.text))
        .collect();
    (out, r)
}

fn drops(r: &Reconstructor, format: &str) -> BTreeMap<String, u64> {
    r.stats.formats[format].drops.clone()
}

#[test]
fn issue_reviews_multicommit() {
    let (out, r) = run(fixture("issue_reviews_multicommit"));
    assert!(drops(&r, "ctx-python").is_empty(), "{:?}", r.stats);
    golden(
        "issue_reviews_multicommit.ctx-general.txt",
        &out[&SampleSource::CtxGeneral],
    );
    golden(
        "issue_reviews_multicommit.ctx-python.md",
        &out[&SampleSource::CtxPython],
    );
    let py = &out[&SampleSource::CtxPython];
    // E-mail addresses are gone from the author trailer; the approval without text is left out.
    assert!(!py.contains("example.org"));
    assert!(!out[&SampleSource::CtxGeneral].contains("state=\"APPROVED\""));
}

#[test]
fn renames_deletes_backticks_crlf() {
    let (out, r) = run(fixture("renames_deletes_backticks_crlf"));
    assert!(drops(&r, "ctx-python").is_empty(), "{:?}", r.stats);
    let py = &out[&SampleSource::CtxPython];
    golden(
        "renames_deletes_backticks_crlf.ctx-general.txt",
        &out[&SampleSource::CtxGeneral],
    );
    golden("renames_deletes_backticks_crlf.ctx-python.md", py);
    assert!(
        !py.contains("## Description"),
        "empty body must be left out"
    );
    assert!(py.contains("\r\n"), "CRLF kept in bodies");
    // README holds a run of four backticks: its fences must be at least five long.
    assert!(py.contains("### README.md\n`````markdown\n"));
}

#[test]
fn marker_collision_drops_python_only() {
    let (out, r) = run(fixture("marker_collision"));
    assert_eq!(drops(&r, "ctx-python").get("marker_collision"), Some(&1));
    assert!(!out.contains_key(&SampleSource::CtxPython));
    golden(
        "marker_collision.ctx-general.txt",
        &out[&SampleSource::CtxGeneral],
    );
}

#[test]
fn marker_lines_in_prose_collide() {
    let mut pr = fixture("issue_reviews_multicommit");
    pr.body = "Before:\n<<<<<<< SEARCH\nold\n".into();
    let (out, r) = run(pr);
    assert!(!out.contains_key(&SampleSource::CtxPython));
    assert_eq!(drops(&r, "ctx-python").get("marker_collision"), Some(&1));
}

#[test]
fn bot_authors_are_dropped() {
    let (out, r) = run(fixture("bot_author"));
    assert!(out.is_empty());
    assert_eq!(drops(&r, "ctx-general").get("bot_author"), Some(&1));
    assert_eq!(drops(&r, "ctx-python").get("bot_author"), Some(&1));
}

const FIXTURES: [&str; 4] = [
    "issue_reviews_multicommit",
    "renames_deletes_backticks_crlf",
    "pure_rename_copy",
    "rename_edit_no_newline",
];

/// Every fixture's texts, read back from the document alone, give the record's files after
/// each commit.
#[test]
fn texts_replay_from_the_document() {
    for name in FIXTURES {
        let pr = fixture(name);
        let (enh, _) = det(&pr);
        let want: Vec<BTreeMap<String, String>> = pr
            .replay_each()
            .unwrap()
            .into_iter()
            .map(|r| {
                r.files
                    .into_iter()
                    .filter_map(|(p, c)| c.map(|c| (p, c)))
                    .collect()
            })
            .collect();
        let general = ctx::render_general(&pr, &enh).unwrap();
        let python = ctx::render_python(&pr, &enh).unwrap();
        // The whole document, not just its Edits section, yields exactly the blocks.
        let parsed = search_replace::parse_blocks(&python.text).unwrap();
        assert_eq!(parsed, python.blocks.concat(), "{name}");
        for (format, read) in [
            ("ctx-general", ctx_text::read_general(&general).unwrap()),
            ("ctx-python", ctx_text::read_python(&python.text).unwrap()),
        ] {
            assert_eq!(read.commits, want, "{name} {format}");
        }
    }
}

#[test]
fn pure_rename_copy() {
    let (out, r) = run(fixture("pure_rename_copy"));
    assert!(drops(&r, "ctx-general").is_empty(), "{:?}", r.stats);
    assert!(drops(&r, "ctx-python").is_empty(), "{:?}", r.stats);
    let general = &out[&SampleSource::CtxGeneral];
    golden("pure_rename_copy.ctx-general.txt", general);
    golden(
        "pure_rename_copy.ctx-python.md",
        &out[&SampleSource::CtxPython],
    );
    for tag in [
        "<diff path=\"src/lrucache/cache.py\" old_path=\"cache.py\" status=\"renamed\"/>\n",
        "<diff path=\"src/lrucache/__init__.py\" status=\"added\"/>\n",
        "<diff path=\"src/lrucache/compat.py\" old_path=\"src/lrucache/cache.py\" status=\"copied\">\n@@ -1,4 +1,4 @@\n",
    ] {
        assert!(general.contains(tag), "{tag}");
    }
    // The rename's source is among the relevant files; setup.py has no final newline.
    assert!(general.contains("<file path=\"cache.py\">\n\"\"\"A tiny LRU cache."));
    assert!(general.contains("version='1.0')\n\\ No newline at end of file\n</file>\n"));
}

#[test]
fn rename_edit_no_newline() {
    let (out, r) = run(fixture("rename_edit_no_newline"));
    assert!(drops(&r, "ctx-general").is_empty(), "{:?}", r.stats);
    assert!(drops(&r, "ctx-python").is_empty(), "{:?}", r.stats);
    let py = &out[&SampleSource::CtxPython];
    golden(
        "rename_edit_no_newline.ctx-general.txt",
        &out[&SampleSource::CtxGeneral],
    );
    golden("rename_edit_no_newline.ctx-python.md", py);
    // `VERSION` is `1.1` without a newline: the relevant file says so, as blocks do.
    assert!(py.contains("### VERSION\n```\n1.1\n\\ No newline at end of file\n```\n"));
    assert!(
        out[&SampleSource::CtxGeneral].contains(
            "<diff path=\"lrucache/paths.py\" old_path=\"util.py\" status=\"renamed\">\n"
        )
    );
}

/// A description holding a line that reads as its closing tag leaves the rest of it at the top
/// level: the ctx-general text no longer reads back, and is dropped as `edit_roundtrip`.
#[test]
fn texts_that_do_not_read_back_are_dropped() {
    let mut pr = fixture("issue_reviews_multicommit");
    pr.body = "Quoting the template:\n</description>\n<file path=\"cache.py\">\n".into();
    let (out, r) = run(pr);
    assert!(!out.contains_key(&SampleSource::CtxGeneral));
    assert_eq!(drops(&r, "ctx-general").get("edit_roundtrip"), Some(&1));
    assert!(out.contains_key(&SampleSource::CtxPython));
}

fn huge_pr() -> PullRequest {
    let mut pr = fixture("issue_reviews_multicommit");
    let big: String = (0..4000)
        .map(|i| format!("def f{i}(x):\n    return x * {}\n\n", i % 50))
        .collect();
    let new = big.replace(
        "def f17(x):\n    return x * 17\n",
        "def f17(x):\n    return x * 17 + 1\n",
    );
    let hunks = similar::TextDiff::from_lines(&big, &new)
        .unified_diff()
        .context_radius(3)
        .to_string();
    pr.base_files = vec![davinci_core::pr::BaseFile {
        path: "big.py".into(),
        content: Some(big),
        skipped: None,
    }];
    pr.commits.truncate(1);
    pr.commits[0].files.truncate(1);
    pr.commits[0].files[0].path = "big.py".into();
    pr.commits[0].files[0].diff = hunks;
    pr
}

#[test]
fn huge_files_are_dropped_not_truncated() {
    let (out, r) = run(huge_pr());
    assert!(out.is_empty());
    assert_eq!(drops(&r, "ctx-general").get("too_many_tokens"), Some(&1));
    assert_eq!(drops(&r, "ctx-python").get("too_many_tokens"), Some(&1));
    // With a larger cap the same PR renders and round-trips; the changed line repeats its
    // neighbours' shape, and SEARCH grows only until unique.
    let cfg = ReconstructConfig {
        max_tokens: 10_000_000,
        ..Default::default()
    };
    let mut r = Reconstructor::new(cfg, word_counter()).unwrap();
    let pr = huge_pr();
    let (enh, prov) = det(&pr);
    let out = r.process(pr.clone(), &enh, &prov);
    assert_eq!(out.len(), 2);
    let blocks = ctx::render_python(&pr, &enh).unwrap().blocks.concat();
    assert_eq!(blocks.len(), 1);
    // `    return x * 17` occurs 80 times: the SEARCH takes the `def` line above it.
    assert_eq!(blocks[0].search, "def f17(x):\n    return x * 17\n\n");
}

#[test]
fn deterministic_summary_uses_title_body_and_commits() {
    let pr = fixture("issue_reviews_multicommit");
    let s = deterministic_summary(&pr);
    assert!(s.contains("Accept a default in get() and pop()"));
    assert!(s.contains("issue #41"));
    assert!(s.contains("- pop: accept a default (cache.py)"));
    assert_eq!(s, deterministic_summary(&pr));
}

#[test]
fn inconsistent_diffs_are_dropped_with_reason() {
    let mut pr = fixture("issue_reviews_multicommit");
    pr.base_files[0].content = Some("something else\n".into());
    let (out, r) = run(pr);
    assert!(!out.contains_key(&SampleSource::CtxPython));
    assert_eq!(drops(&r, "ctx-python").get("diff_apply"), Some(&1));
}

#[test]
fn duplicates_and_contamination() {
    let mut r = Reconstructor::new(ReconstructConfig::default(), word_counter()).unwrap();
    let pr = fixture("issue_reviews_multicommit");
    let (enh, prov) = det(&pr);
    assert_eq!(r.process(pr.clone(), &enh, &prov).len(), 2);
    assert_eq!(r.process(pr.clone(), &enh, &prov).len(), 0);
    assert_eq!(drops(&r, "ctx-python").get("duplicate"), Some(&1));
    // A near copy (another number, same content) is a near duplicate.
    let mut near = pr.clone();
    near.number = 43;
    near.id = "github:acme/lrucache#43".into();
    assert_eq!(r.process(near, &enh, &prov).len(), 0);
    assert_eq!(drops(&r, "ctx-python").get("near_duplicate"), Some(&1));

    // Benchmark text sharing a 13-gram with the sample.
    let tmp = tempfile::tempdir().unwrap();
    let bench = tmp.path().join("humaneval.jsonl");
    std::fs::write(
        &bench,
        "{\"task_id\":\"HumanEval/0\",\"prompt\":\"def put(self, key, value):\\n    self.data[key] = value\\n    if len(self.data) > self.maxsize:\",\"canonical_solution\":\"        self.data.popitem(last=False)\"}\n",
    )
    .unwrap();
    let cfg = ReconstructConfig {
        benchmarks: vec![davinci_reconstructor::filters::BenchmarkFile {
            path: bench,
            fields: vec!["prompt".into(), "canonical_solution".into()],
        }],
        ..Default::default()
    };
    let mut r = Reconstructor::new(cfg, word_counter()).unwrap();
    assert_eq!(r.benchmark_texts(), 2);
    assert!(r.process(pr.clone(), &enh, &prov).is_empty());
    assert_eq!(drops(&r, "ctx-python").get("contaminated"), Some(&1));
    assert_eq!(drops(&r, "ctx-general").get("contaminated"), Some(&1));

    // Repository exclusion.
    let mut ex = pr;
    ex.repo.full_name = "django/django".into();
    let (out, r) = run(ex);
    assert!(out.is_empty());
    assert_eq!(drops(&r, "ctx-general").get("excluded_repo"), Some(&1));
}
