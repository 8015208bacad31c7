//! Conformance: the parsers + grader reproduce the official `report.json` of five real
//! SWE-bench harness runs. Reads ../shared/data (skips, saying so, when it is absent).

use std::path::{Path, PathBuf};

use davinci_core::task::TaskInstance;
use davinci_swebench::{grade_log, load_instances, report_json};

fn shared() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
    p.join("swe-bench-logs").is_dir().then_some(p)
}

/// The instance for a log: from SWE-bench Lite when it is there; otherwise rebuilt from the
/// report's own test lists (the report lists every FAIL_TO_PASS / PASS_TO_PASS test, as
/// success or failure), with the repository taken from the instance id.
fn instance_for(data: &Path, id: &str, report: &serde_json::Value) -> (TaskInstance, &'static str) {
    let lite = load_instances(&data.join("benchmarks/swe-bench/lite.jsonl")).unwrap();
    if let Some(i) = lite.into_iter().find(|i| i.instance_id == id) {
        return (i, "lite.jsonl");
    }
    let ts = &report[id]["tests_status"];
    let list = |k: &str| -> Vec<String> {
        ["success", "failure"]
            .iter()
            .flat_map(|s| ts[k][s].as_array().unwrap().iter())
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let (owner_repo, _) = id.rsplit_once('-').unwrap();
    let repo = owner_repo.replacen("__", "/", 1);
    (
        TaskInstance {
            instance_id: id.into(),
            repo,
            fail_to_pass: list("FAIL_TO_PASS"),
            pass_to_pass: list("PASS_TO_PASS"),
            ..Default::default()
        },
        "report.json lists",
    )
}

#[test]
fn five_real_logs_reproduce_official_reports() {
    let Some(data) = shared() else {
        eprintln!("SKIP: ../shared/data/swe-bench-logs not present; conformance not checked");
        return;
    };
    let mut checked = 0;
    for e in std::fs::read_dir(data.join("swe-bench-logs")).unwrap() {
        let dir = e.unwrap().path();
        let id = dir.file_name().unwrap().to_str().unwrap().to_string();
        let official: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap())
                .unwrap();
        let log = std::fs::read_to_string(dir.join("test_output.txt")).unwrap();
        let (inst, from) = instance_for(&data, &id, &official);
        let ours = report_json(&id, &grade_log(&inst, Some("<model patch>"), &log).unwrap());
        assert_eq!(ours, official, "{id} (instance from {from})");
        eprintln!("ok: {id} (instance from {from})");
        checked += 1;
    }
    assert_eq!(checked, 5);
}
