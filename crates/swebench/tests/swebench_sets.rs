//! Published task sets read as they are and normalised to `TaskInstance`.
//!
//! Fixtures under `fixtures/sets/`: `swe-gym.jsonl` is SWE-bench Lite's pallets__flask-4045 row
//! with the test lists as lists (SWE-Gym's encoding); `swe-rebench.jsonl` and
//! `swe-smith.jsonl` hold rows written by us in those sets' column shapes (SWE-rebench:
//! `install_config`, `meta`, `requirements`, `environment`, `license_name`, `docker_image` or
//! `image_name`; SWE-smith: `instance_id, patch, FAIL_TO_PASS, PASS_TO_PASS, image_name, repo,
//! problem_statement`, no `base_commit`).
use std::path::{Path, PathBuf};

use davinci_swebench::data::load_set;
use davinci_swebench::load_instances;
use davinci_swebench::sets::SetFormat;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sets")
        .join(name)
}

#[test]
fn swe_rebench_install_config_becomes_the_env() {
    let v = load_instances(&fixture("swe-rebench.jsonl")).unwrap();
    let a = &v[0];
    assert_eq!(a.metadata.source.as_deref(), Some("swe-rebench"));
    let e = &a.env;
    assert_eq!(e.python.as_deref(), Some("3.9"));
    assert_eq!(e.install, ["pip install -e .[test]"]);
    assert_eq!(e.pre_install, ["apt-get update", "apt-get install -y gcc"]);
    assert_eq!(e.pip_packages, ["pytest", "pytest-cov"]);
    assert_eq!(e.reqs_path, ["requirements/test.txt"]);
    assert_eq!(e.packages.as_deref(), Some("requirements.txt"));
    assert_eq!(
        e.log_parser.as_deref(),
        Some("pytest"),
        "parse_log_ prefix dropped"
    );
    assert_eq!(
        e.test_cmd.as_deref(),
        Some("pytest --continue-on-collection-errors -n0 -rA tests/test_core.py"),
        "the test patch's files are appended, as SWE-bench's eval script does"
    );
    assert_eq!(
        e.image(),
        Some("swerebench/sweb.eval.x86_64.tinyorg_1776_tiny-42")
    );
    assert_eq!(a.fail_to_pass, ["tests/test_core.py::test_add"]);
    assert_eq!(a.metadata.extra["meta"]["is_lite"], true);
    assert_eq!(a.metadata.extra["license_name"], "MIT License");
    assert!(!a.metadata.extra.contains_key("docker_image"));
    // The parser name is one the harness knows.
    davinci_swebench::grading::parser_for(a).unwrap();

    let b = &v[1];
    assert_eq!(b.env.python.as_deref(), Some("3.8"), "a numeric version");
    assert_eq!(
        b.env.test_cmd.as_deref(),
        Some("export X=1\npytest -rA tests/test_core.py")
    );
    assert!(b.env.pip_packages.is_empty());
    assert_eq!(
        b.env.image(),
        Some("swerebench/sweb.eval.x86_64.tinyorg_1776_tiny-43")
    );
}

#[test]
fn swe_smith_rows_are_bug_branches_fixed_by_the_reversed_patch() {
    let v = load_instances(&fixture("swe-smith.jsonl")).unwrap();
    let a = &v[0];
    assert_eq!(a.metadata.source.as_deref(), Some("swe-smith"));
    assert_eq!(a.base_commit, a.instance_id, "the instance's branch");
    assert!(
        a.patch.contains("-    return a - b\n+    return a + b\n"),
        "{}",
        a.patch
    );
    assert!(
        a.metadata.extra["bug_patch"]
            .as_str()
            .unwrap()
            .contains("+    return a - b")
    );
    assert_eq!(
        a.env.image(),
        Some("jyangballin/swesmith.x86_64.tinyorg_1776_tiny.0a1b2c3d")
    );
    assert_eq!(
        a.env.test_cmd.as_deref(),
        Some("pytest --disable-warnings --color=no --tb=no --verbose tests/test_core.py")
    );
}

#[test]
fn swe_gym_lists_read_like_swe_bench_strings() {
    let gym = load_set(&fixture("swe-gym.jsonl"), SetFormat::SweGym).unwrap();
    assert_eq!(gym[0].instance_id, "pallets__flask-4045");
    assert_eq!(gym[0].metadata.source.as_deref(), Some("swe-gym"));
    assert!(gym[0].env.image().is_none() && gym[0].env.test_cmd.is_none());
    let auto = load_instances(&fixture("swe-gym.jsonl")).unwrap();
    assert_eq!(auto[0].metadata.source.as_deref(), Some("swe-bench"));
    assert_eq!(auto[0].fail_to_pass, gym[0].fail_to_pass);
    assert_eq!(gym[0].pass_to_pass.len(), 50);
    let lite = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/benchmarks/swe-bench/lite.jsonl");
    if !lite.is_file() {
        eprintln!(
            "SKIP: {} absent; JSON-string lists not compared",
            lite.display()
        );
        return;
    }
    let lite = load_instances(&lite).unwrap();
    let row = lite
        .iter()
        .find(|i| i.instance_id == "pallets__flask-4045")
        .unwrap();
    assert_eq!(row.fail_to_pass, gym[0].fail_to_pass);
    assert_eq!(row.pass_to_pass, gym[0].pass_to_pass);
}

#[test]
fn our_output_reads_back_unchanged_and_bad_rows_name_the_field() {
    let v = load_instances(&fixture("swe-rebench.jsonl")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tasks.jsonl");
    let text: Vec<String> = v
        .iter()
        .map(|i| serde_json::to_string(i).unwrap())
        .collect();
    std::fs::write(&out, text.join("\n")).unwrap();
    assert_eq!(load_instances(&out).unwrap(), v);
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        r#"{"instance_id":"a__b-1","repo":"a/b","base_commit":"x","install_config":{"pip_packages":7}}"#,
    )
    .unwrap();
    let err = format!("{:#}", load_instances(&bad).unwrap_err());
    assert!(
        err.contains("line 1") && err.contains("install_config.pip_packages"),
        "{err}"
    );
    assert!(SetFormat::parse("swe-bench-pro").is_err());
}

/// A row of our own shape (it has `env`) that names its image at the top level, as a
/// SWE-rebench row does, runs on that image; `env.image` wins where both are given.
#[test]
fn a_top_level_image_fills_an_env_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tasks.jsonl");
    let row = |id: &str, extra: serde_json::Value| {
        let mut r = serde_json::json!({
            "instance_id": id, "repo": "a/b", "base_commit": "x",
            "env": {"test_cmd": "pytest"},
        });
        r.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        r
    };
    let both = row("a__b-1", serde_json::json!({"docker_image": "img:top"}));
    let mut env_wins = row("a__b-2", serde_json::json!({"image_name": "img:top"}));
    env_wins["env"]["image"] = "img:env".into();
    std::fs::write(&p, format!("{both}\n{env_wins}\n")).unwrap();
    let v = load_instances(&p).unwrap();
    assert_eq!(v[0].env.image.as_deref(), Some("img:top"));
    assert_eq!(v[0].env.test_cmd.as_deref(), Some("pytest"));
    assert_eq!(v[1].env.image.as_deref(), Some("img:env"));
}
