//! The SWE-bench harness end to end on a tiny repository built here: patches applied in
//! the sandbox, tests run, logs graded, statuses (incl. infrastructure failures kept apart),
//! resumption. Needs bwrap and git; the Docker case needs a Docker Engine (skipped loudly
//! without one, required under `CI=true`).

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use davinci_core::task::{TaskEnv, TaskInstance};
use davinci_sandbox::{BwrapSandbox, DockerConfig, LocalConfig, PullPolicy, testing};
use davinci_swebench::{Harness, HarnessConfig, Prediction, Status};

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

const RUNNER: &str = r#"import traceback, tests
for name in sorted(n for n in dir(tests) if n.startswith("test_")):
    try:
        getattr(tests, name)()
        print("PASSED tests.py::" + name)
    except Exception as e:
        print("FAILED tests.py::" + name + " - " + type(e).__name__)
"#;

/// A repo whose `add` is wrong; returns (repo dir, base commit, gold patch, test patch).
fn make_repo(root: &Path) -> (String, String, String) {
    let repo = root.join("acme__calc");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q"]);
    std::fs::write(
        repo.join("calc.py"),
        "def add(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n",
    )
    .unwrap();
    std::fs::write(
        repo.join("tests.py"),
        "import calc\n\n\ndef test_mul():\n    assert calc.mul(2, 3) == 6\n",
    )
    .unwrap();
    std::fs::write(repo.join("run_tests.py"), RUNNER).unwrap();
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "base"]);
    let base = git(&repo, &["rev-parse", "HEAD"]).trim().to_string();
    std::fs::write(
        repo.join("calc.py"),
        "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b\n",
    )
    .unwrap();
    let gold = git(&repo, &["diff"]);
    git(&repo, &["checkout", "-q", "."]);
    std::fs::write(
        repo.join("tests.py"),
        "import calc\n\n\ndef test_mul():\n    assert calc.mul(2, 3) == 6\n\n\ndef test_add():\n    assert calc.add(2, 3) == 5\n",
    )
    .unwrap();
    let test_patch = git(&repo, &["diff"]);
    git(&repo, &["checkout", "-q", "."]);
    // Later history the harness must not see: it checks out the base commit.
    std::fs::write(repo.join("calc.py"), "raise SystemExit('newer commit')\n").unwrap();
    git(&repo, &["commit", "-q", "-am", "later"]);
    (base, gold, test_patch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_grades_patches_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let repos = tmp.path().join("repos");
    let (base, gold, test_patch) = make_repo(&repos);
    let inst = |n: u32, setup: Option<&str>| TaskInstance {
        instance_id: format!("acme__calc-{n}"),
        repo: "acme/calc".into(),
        base_commit: base.clone(),
        test_patch: test_patch.clone(),
        fail_to_pass: vec!["tests.py::test_add".into()],
        pass_to_pass: vec!["tests.py::test_mul".into()],
        env: TaskEnv {
            test_cmd: Some("python3 run_tests.py".into()),
            log_parser: Some("pytest".into()),
            setup_script: setup.map(str::to_string),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut instances: HashMap<String, TaskInstance> = HashMap::new();
    for i in [
        inst(1, None),
        inst(2, None),
        inst(3, None),
        inst(4, None),
        inst(5, Some("exit 3")),
    ] {
        instances.insert(i.instance_id.clone(), i);
    }
    let mut other = inst(6, None);
    other.repo = "acme/elsewhere".into();
    instances.insert(other.instance_id.clone(), other);
    let wrong = gold.replace("a + b", "a * b");
    let broken = gold.replace("return a - b", "return a - c");
    let pred = |n: u32, p: Option<&str>| Prediction {
        instance_id: format!("acme__calc-{n}"),
        model_patch: p.map(str::to_string),
        model_name_or_path: "org/model".into(),
    };
    let preds = vec![
        pred(1, Some(&gold)),
        pred(2, Some(&wrong)),
        pred(3, Some(&broken)),
        pred(4, None),
        pred(5, Some(&gold)),
        pred(6, Some(&gold)),
        pred(99, Some(&gold)),
    ];
    let sb = BwrapSandbox::new(LocalConfig {
        mount_point: "/testbed".into(),
        ..Default::default()
    })
    .unwrap();
    let out = tmp.path().join("out");
    let cfg = HarnessConfig {
        out_dir: out.clone(),
        repos_dir: Some(repos.clone()),
        workers: 2,
        setup_timeout: Duration::from_secs(60),
        test_timeout: Duration::from_secs(60),
        ..Default::default()
    };
    let h = Harness::new(Arc::new(sb), cfg);
    let s = h.run(&instances, &preds, &|_| {}).await.unwrap();
    let status = |n: u32| -> Status {
        let p = out.join(format!("org__model/acme__calc-{n}/status.json"));
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        serde_json::from_value(v["status"].clone()).unwrap()
    };
    let log1 =
        std::fs::read_to_string(out.join("org__model/acme__calc-1/test_output.txt")).unwrap();
    assert_eq!(status(1), Status::Resolved, "{log1}");
    assert_eq!(status(2), Status::Unresolved);
    assert_eq!(status(3), Status::PatchFailed);
    assert_eq!(status(4), Status::EmptyPatch);
    assert_eq!(status(5), Status::InfraSetupFailed);
    assert_eq!(status(6), Status::InfraMissingEnvironment);
    assert_eq!(s.total, 6);
    assert_eq!(s.graded, 4);
    assert_eq!(s.resolved, 1);
    assert_eq!(s.resolution_rate, 0.25);
    assert_eq!(s.unknown_instance_ids, vec!["acme__calc-99"]);
    assert_eq!(s.infra_ids, vec!["acme__calc-5", "acme__calc-6"]);

    let report = |n: u32| -> serde_json::Value {
        serde_json::from_str(
            &std::fs::read_to_string(out.join(format!("org__model/acme__calc-{n}/report.json")))
                .unwrap(),
        )
        .unwrap()
    };
    let r1 = &report(1)["acme__calc-1"];
    assert_eq!(r1["resolved"], true);
    assert_eq!(
        r1["tests_status"]["FAIL_TO_PASS"]["success"][0],
        "tests.py::test_add"
    );
    let r2 = &report(2)["acme__calc-2"];
    assert_eq!(r2["patch_successfully_applied"], true);
    assert_eq!(
        r2["tests_status"]["FAIL_TO_PASS"]["failure"][0],
        "tests.py::test_add"
    );
    assert_eq!(
        r2["tests_status"]["PASS_TO_PASS"]["success"][0],
        "tests.py::test_mul"
    );
    assert_eq!(
        report(3)["acme__calc-3"]["patch_successfully_applied"],
        false
    );
    assert_eq!(report(4)["acme__calc-4"]["patch_is_None"], true);
    // The host repository was not touched.
    assert!(
        std::fs::read_to_string(repos.join("acme__calc/calc.py"))
            .unwrap()
            .contains("newer commit")
    );

    // Second run: nothing is re-run.
    let before = std::fs::metadata(out.join("org__model/acme__calc-1/status.json"))
        .unwrap()
        .modified()
        .unwrap();
    let s2 = h.run(&instances, &preds, &|_| {}).await.unwrap();
    assert_eq!(s2.reused, 6);
    assert_eq!(s2.resolved, 1);
    let after = std::fs::metadata(out.join("org__model/acme__calc-1/status.json"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after);
}

/// The same harness on the Docker backend: the instance image (the repository at /testbed at
/// its base commit, on the base image built from host packages) is made here, since nothing
/// can be pulled; the gold patch resolves, a wrong one does not, an empty one is a model
/// failure, and an instance without an image gets the official SWE-bench name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_grades_on_docker_with_the_same_code() {
    let cfg = DockerConfig {
        pull_policy: PullPolicy::Never,
        owner: format!("swebench-test-{}", std::process::id()),
        lease_s: 600,
        ..Default::default()
    };
    let Some(sb) = testing::docker_or_skip("swebench harness on docker", cfg).await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let repos = tmp.path().join("repos");
    let (base, gold, test_patch) = make_repo(&repos);
    let tree = tmp.path().join("testbed");
    let src = repos.join("acme__calc");
    git(
        tmp.path(),
        &["clone", "-q", src.to_str().unwrap(), tree.to_str().unwrap()],
    );
    git(&tree, &["checkout", "-q", &base]);
    // Tagged by the tree's content, so a re-run reuses the image.
    let mut h = fnv1a(&std::fs::read(tree.join("calc.py")).unwrap());
    h ^= fnv1a(&std::fs::read(tree.join("tests.py")).unwrap());
    let tag = format!("davinci-test/sweb.eval.acme_1776_calc:{h:016x}");
    let record = sb
        .bake_image(&testing::base_image().unwrap(), &tree, &tag)
        .await
        .unwrap();
    assert!(record.digest.starts_with("sha256:"), "{record:?}");
    let inst = |n: u32, image: Option<&str>| TaskInstance {
        instance_id: format!("acme__calc-{n}"),
        repo: "acme/calc".into(),
        base_commit: base.clone(),
        test_patch: test_patch.clone(),
        fail_to_pass: vec!["tests.py::test_add".into()],
        pass_to_pass: vec!["tests.py::test_mul".into()],
        env: TaskEnv {
            image: image.map(str::to_string),
            test_cmd: Some("python3 run_tests.py".into()),
            log_parser: Some("pytest".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut instances: HashMap<String, TaskInstance> = HashMap::new();
    for i in [
        inst(1, Some(&tag)),
        inst(2, Some(&tag)),
        inst(3, Some(&tag)),
        inst(4, None),
    ] {
        instances.insert(i.instance_id.clone(), i);
    }
    let wrong = gold.replace("a + b", "a * b");
    let pred = |n: u32, p: Option<&str>| Prediction {
        instance_id: format!("acme__calc-{n}"),
        model_patch: p.map(str::to_string),
        model_name_or_path: "org/model".into(),
    };
    let preds = vec![
        pred(1, Some(&gold)),
        pred(2, Some(&wrong)),
        pred(3, Some("")),
        pred(4, Some(&gold)),
    ];
    let out = tmp.path().join("out");
    let h = Harness::new(
        Arc::new(sb),
        HarnessConfig {
            out_dir: out.clone(),
            repos_dir: None,
            workers: 2,
            setup_timeout: Duration::from_secs(60),
            test_timeout: Duration::from_secs(60),
            ..Default::default()
        },
    );
    let s = h.run(&instances, &preds, &|_| {}).await.unwrap();
    let status = |n: u32| -> serde_json::Value {
        let p = out.join(format!("org__model/acme__calc-{n}/status.json"));
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
    };
    let log1 =
        std::fs::read_to_string(out.join("org__model/acme__calc-1/test_output.txt")).unwrap();
    assert_eq!(status(1)["status"], "resolved", "{log1}");
    assert_eq!(status(1)["image"]["name"], tag.as_str());
    assert_eq!(status(1)["image"]["digest"], record.digest.as_str());
    assert_eq!(status(2)["status"], "unresolved");
    assert_eq!(status(3)["status"], "empty_patch");
    // No image given: the official name, which this engine does not have (never pulled).
    let s4 = status(4);
    assert_eq!(s4["status"], "infra_sandbox_error");
    assert_eq!(
        s4["image"]["name"],
        "swebench/sweb.eval.x86_64.acme_1776_calc-4:latest"
    );
    assert!(
        s4["error"].as_str().unwrap().contains("pull_policy"),
        "{s4}"
    );
    assert_eq!((s.resolved, s.graded), (1, 3));
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("org__model/acme__calc-2/report.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        report["acme__calc-2"]["tests_status"]["FAIL_TO_PASS"]["failure"][0],
        "tests.py::test_add"
    );
}

/// FNV-1a, enough to tag an image by its content.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    })
}
