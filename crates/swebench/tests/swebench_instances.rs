//! Reading SWE-bench instance files as they are exported: `null` in an optional text field
//! (`hints_text`, `version`, `environment_setup_commit`, …) reads as absent, and a null or
//! missing required field is refused naming the line and the field.
//!
//! `fixtures/swebench-instances/nulls.jsonl` holds three SWE-bench Lite rows (all 12 published
//! columns, test lists as JSON-encoded strings) with those fields set to null, as real exports
//! have them. The Lite file itself, under ../shared/data, is read when it is there.
use std::path::{Path, PathBuf};

use davinci_swebench::load_instances;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/swebench-instances/nulls.jsonl")
}

#[test]
fn nulls_in_optional_fields_read_as_absent() {
    let v = load_instances(&fixture()).unwrap();
    let ids: Vec<&str> = v.iter().map(|i| i.instance_id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "django__django-16046",
            "sympy__sympy-20212",
            "scikit-learn__scikit-learn-13584"
        ]
    );
    assert_eq!(v[0].hints_text, "");
    assert_eq!(v[0].version, "4.2", "fields next to a null are kept");
    assert_eq!(
        (
            v[1].version.as_str(),
            v[1].environment_setup_commit.as_str()
        ),
        ("", "")
    );
    assert_eq!(v[2].created_at, "");
    for i in &v {
        assert!(!i.fail_to_pass.is_empty(), "{}", i.instance_id);
        assert!(i.patch.starts_with("diff --git"), "{}", i.instance_id);
    }
}

#[test]
fn a_null_required_field_is_refused_naming_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(fixture()).unwrap();
    let mut lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    lines[1]["base_commit"] = serde_json::Value::Null;
    let bad = dir.path().join("bad.jsonl");
    let body: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(&bad, body.join("\n")).unwrap();
    let err = format!("{:#}", load_instances(&bad).unwrap_err());
    assert!(err.contains("line 2"), "{err}");
    assert!(err.contains("at `base_commit`"), "{err}");
    assert!(err.contains("null"), "{err}");

    // The same rows as one JSON array: the error names the record's index.
    let arr = dir.path().join("bad.json");
    std::fs::write(&arr, serde_json::Value::Array(lines).to_string()).unwrap();
    let err = format!("{:#}", load_instances(&arr).unwrap_err());
    assert!(err.contains("[1].base_commit"), "{err}");
}

/// SWE-bench Lite as published, and the same file with every row's optional text fields null.
#[test]
fn swe_bench_lite_reads_with_and_without_nulls() {
    let lite = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/benchmarks/swe-bench/lite.jsonl");
    if !lite.is_file() {
        eprintln!(
            "SKIP: {} not present; reading real SWE-bench Lite not checked",
            lite.display()
        );
        return;
    }
    let v = load_instances(&lite).unwrap();
    assert_eq!(v.len(), 300);
    let dir = tempfile::tempdir().unwrap();
    let nulled = dir.path().join("lite-nulls.jsonl");
    let mut out = String::new();
    for line in std::fs::read_to_string(&lite).unwrap().lines() {
        let mut row: serde_json::Value = serde_json::from_str(line).unwrap();
        for k in [
            "hints_text",
            "version",
            "environment_setup_commit",
            "created_at",
        ] {
            row[k] = serde_json::Value::Null;
        }
        out.push_str(&row.to_string());
        out.push('\n');
    }
    std::fs::write(&nulled, out).unwrap();
    let w = load_instances(&nulled).unwrap();
    assert_eq!(w.len(), 300);
    for (a, b) in v.iter().zip(&w) {
        assert_eq!(a.instance_id, b.instance_id);
        assert_eq!(a.fail_to_pass, b.fail_to_pass);
        assert_eq!((b.hints_text.as_str(), b.version.as_str()), ("", ""));
    }
}

/// Environment images as the published sets name them: a SWE-rebench row's `docker_image`
/// (or `image_name`) verbatim, an `env.image` over both, else the official SWE-bench instance
/// image (`__` → `_1776_`).
#[test]
fn published_image_names_are_used_as_given() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("rows.jsonl");
    let rows = [
        r#"{"instance_id":"0b01001001__spectree-64","repo":"0b01001001/spectree","base_commit":"a","docker_image":"swerebench/sweb.eval.x86_64.0b01001001_1776_spectree-64"}"#,
        r#"{"instance_id":"acme__calc-2","repo":"acme/calc","base_commit":"b","image_name":"registry.example/acme/calc:2"}"#,
        r#"{"instance_id":"acme__calc-3","repo":"acme/calc","base_commit":"c","docker_image":"x/y:1","env":{"image":"mine/calc:3"}}"#,
        r#"{"instance_id":"django__django-11099","repo":"django/django","base_commit":"d","docker_image":null}"#,
    ];
    std::fs::write(&p, rows.join("\n")).unwrap();
    let v = davinci_swebench::load_instances(&p).unwrap();
    let images: Vec<String> = v
        .iter()
        .map(davinci_swebench::harness::instance_image)
        .collect();
    assert_eq!(
        images,
        [
            "swerebench/sweb.eval.x86_64.0b01001001_1776_spectree-64",
            "registry.example/acme/calc:2",
            "mine/calc:3",
            "swebench/sweb.eval.x86_64.django_1776_django-11099:latest",
        ]
    );
}
