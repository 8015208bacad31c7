//! The Evaluator gRPC service methods over an in-memory job registry: Start, Watch until
//! the end, Get, Cancel, and refusal of bad specs by field name. Needs bwrap.

use std::path::Path;

use davinci_evaluator::serve::{EvaluatorService, ServeConfig};
use davinci_proto::v1::evaluator_server::Evaluator;
use davinci_proto::v1::{EvalSpec, JobRef, JobState, StartEvalRequest};
use davinci_runtime::jobs::JobRegistry;
use futures::StreamExt;
use tonic::Request;

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/humaneval")
        .join(name)
        .display()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn humaneval_job_runs_to_success_and_bad_specs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let samples = tmp.path().join("samples.jsonl");
    let problems = std::fs::read_to_string(fixture("HumanEvalFixture.jsonl")).unwrap();
    let mut text = String::new();
    for line in problems.lines() {
        let p: serde_json::Value = serde_json::from_str(line).unwrap();
        text.push_str(
            &serde_json::json!({"task_id": p["task_id"], "completion": p["canonical_solution"]})
                .to_string(),
        );
        text.push('\n');
    }
    std::fs::write(&samples, text).unwrap();
    let svc = EvaluatorService::new(JobRegistry::in_memory().await, ServeConfig::default());
    let out = tmp.path().join("out");
    let spec = EvalSpec {
        benchmark: "humaneval".into(),
        problems: fixture("HumanEvalFixture.jsonl"),
        samples: samples.display().to_string(),
        out: out.display().to_string(),
        workers: 2,
        ..Default::default()
    };
    let job = svc
        .start_eval(Request::new(StartEvalRequest {
            run_id: String::new(),
            spec: Some(spec.clone()),
        }))
        .await
        .unwrap()
        .into_inner();
    let mut events = svc
        .watch_eval(Request::new(JobRef {
            job_id: job.job_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(e) = events.next().await {
        last = Some(e.unwrap());
    }
    let last = last.unwrap();
    let done = svc
        .get_eval(Request::new(JobRef {
            job_id: job.job_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.state, JobState::Succeeded as i32, "{done:?} {last:?}");
    assert_eq!(done.counters.get("passed"), Some(&3));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["base"]["pass@1"], 1.0);

    let err = svc
        .start_eval(Request::new(StartEvalRequest {
            run_id: String::new(),
            spec: Some(EvalSpec {
                samples: "s3://bucket/x".into(),
                ..spec.clone()
            }),
        }))
        .await
        .unwrap_err();
    assert!(err.message().contains("spec.samples"), "{err:?}");
    let err = svc
        .start_eval(Request::new(StartEvalRequest {
            run_id: String::new(),
            spec: Some(EvalSpec {
                benchmark: "mmlu".into(),
                ..spec.clone()
            }),
        }))
        .await
        .unwrap_err();
    assert!(err.message().contains("spec.benchmark"), "{err:?}");

    // Cancel: a long job is stopped and reported cancelled.
    let slow = tmp.path().join("slow.jsonl");
    let mut text = String::new();
    for _ in 0..50 {
        text.push_str("{\"task_id\": \"Fix/0\", \"completion\": \"    import time\\n    time.sleep(2)\\n    return a + b\\n\"}\n");
    }
    std::fs::write(&slow, text).unwrap();
    let job = svc
        .start_eval(Request::new(StartEvalRequest {
            run_id: String::new(),
            spec: Some(EvalSpec {
                samples: slow.display().to_string(),
                out: tmp.path().join("out2").display().to_string(),
                ..spec
            }),
        }))
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let c = svc
        .cancel_eval(Request::new(JobRef {
            job_id: job.job_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    let _ = c;
    // The job ends once its sandboxes are torn down; under load that takes a moment.
    let mut j = None;
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let now = svc
            .get_eval(Request::new(JobRef {
                job_id: job.job_id.clone(),
            }))
            .await
            .unwrap()
            .into_inner();
        if JobState::try_from(now.state).is_ok_and(|s| s.is_terminal()) {
            j = Some(now);
            break;
        }
    }
    let j = j.expect("the cancelled job ended within 10 s");
    assert_eq!(j.state, JobState::Cancelled as i32, "{j:?}");
}

/// Runs one job to its end and returns it.
async fn finish(svc: &EvaluatorService, spec: EvalSpec) -> davinci_proto::v1::Job {
    let job = svc
        .start_eval(Request::new(StartEvalRequest {
            run_id: String::new(),
            spec: Some(spec),
        }))
        .await
        .unwrap()
        .into_inner();
    let mut events = svc
        .watch_eval(Request::new(JobRef {
            job_id: job.job_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    while events.next().await.is_some() {}
    svc.get_eval(Request::new(JobRef { job_id: job.job_id }))
        .await
        .unwrap()
        .into_inner()
}

/// A SWE-bench-shaped instance whose setup builds its repository in `/testbed` (the base image
/// has git and python3), so the image needs nothing baked.
const SETUP: &str = r#"git init -q .
printf 'def add(a, b):\n    return a - b\n' > calc.py
cat > run_tests.py <<'PY'
import tests
for name in sorted(n for n in dir(tests) if n.startswith("test_")):
    try:
        getattr(tests, name)()
        print("PASSED tests.py::" + name)
    except Exception as e:
        print("FAILED tests.py::" + name + " - " + type(e).__name__)
PY
git add . && git -c user.name=t -c user.email=t@t commit -qm base
"#;

const GOLD: &str = "diff --git a/calc.py b/calc.py\n--- a/calc.py\n+++ b/calc.py\n@@ -1,2 +1,2 @@\n def add(a, b):\n-    return a - b\n+    return a + b\n";

const TEST_PATCH: &str = "diff --git a/tests.py b/tests.py\nnew file mode 100644\n--- /dev/null\n+++ b/tests.py\n@@ -0,0 +1,5 @@\n+import calc\n+\n+\n+def test_add():\n+    assert calc.add(2, 3) == 5\n";

/// The service runs SWE-bench on the backend its configuration names: on the Docker Engine
/// the gold patch resolves and a wrong one does not, with the image digest recorded; an
/// engine that cannot be reached fails the job naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swe_bench_jobs_run_on_the_configured_backend() {
    use davinci_sandbox::{Backend, DockerConfig, PullPolicy, testing};
    let tmp = tempfile::tempdir().unwrap();
    let inst = serde_json::json!({
        "instance_id": "acme__calc-1", "repo": "acme/calc", "base_commit": "HEAD",
        "patch": GOLD, "test_patch": TEST_PATCH,
        "FAIL_TO_PASS": ["tests.py::test_add"], "PASS_TO_PASS": [],
    });
    let preds = tmp.path().join("preds.jsonl");
    let wrong = GOLD.replace("a + b", "a * b");
    std::fs::write(
        &preds,
        format!(
            "{}\n{}\n",
            serde_json::json!({"instance_id": "acme__calc-1", "model_patch": GOLD, "model_name_or_path": "gold"}),
            serde_json::json!({"instance_id": "acme__calc-1", "model_patch": wrong, "model_name_or_path": "wrong"}),
        ),
    )
    .unwrap();
    let spec = |instances: &Path, out: &str| EvalSpec {
        benchmark: "swe-bench".into(),
        instances: instances.display().to_string(),
        predictions: preds.display().to_string(),
        out: tmp.path().join(out).display().to_string(),
        workers: 2,
        timeout_s: 120,
        ..Default::default()
    };
    let unreachable = ServeConfig {
        sandbox: Backend::Docker(DockerConfig {
            endpoint: Some("unix:///nonexistent/docker.sock".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let svc = EvaluatorService::new(JobRegistry::in_memory().await, unreachable);
    let no_image = tmp.path().join("plain.jsonl");
    std::fs::write(&no_image, format!("{inst}\n")).unwrap();
    let j = finish(&svc, spec(&no_image, "o1")).await;
    assert_eq!(j.state, JobState::Failed as i32, "{j:?}");
    assert!(j.error.contains("/nonexistent/docker.sock"), "{}", j.error);

    let cfg = DockerConfig {
        pull_policy: PullPolicy::Never,
        owner: format!("serve-swebench-{}", std::process::id()),
        ..Default::default()
    };
    if testing::docker_or_skip("swe-bench on the docker backend", cfg.clone())
        .await
        .is_none()
    {
        return;
    }
    let image = testing::base_image().unwrap();
    let mut with_image = inst.clone();
    // As a SWE-rebench row names its image: at the top level, used verbatim.
    with_image["docker_image"] = image.clone().into();
    with_image["env"] = serde_json::json!({
        "setup_script": SETUP, "test_cmd": "python3 run_tests.py", "log_parser": "pytest",
    });
    let instances = tmp.path().join("instances.jsonl");
    std::fs::write(&instances, format!("{with_image}\n")).unwrap();
    let svc = EvaluatorService::new(
        JobRegistry::in_memory().await,
        ServeConfig {
            sandbox: Backend::Docker(cfg),
            ..Default::default()
        },
    );
    let j = finish(&svc, spec(&instances, "o2")).await;
    assert_eq!(j.state, JobState::Succeeded as i32, "{j:?}");
    let out = tmp.path().join("o2");
    let status = |model: &str| -> serde_json::Value {
        let p = out.join(model).join("acme__calc-1/status.json");
        serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
    };
    let gold = status("gold");
    assert_eq!(gold["status"], "resolved", "{gold}");
    assert_eq!(gold["image"]["name"], image.as_str());
    assert!(
        gold["image"]["digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:"),
        "{gold}"
    );
    assert_eq!(status("wrong")["status"], "unresolved");
}
