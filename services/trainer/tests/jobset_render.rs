//! The cluster engine's rendering: the paper's 72B setting as a reviewed golden manifest (8
//! nodes × 8 GPUs, TP 8, PP 4, DP 2), Megatron arguments for Qwen2.5-0.5B / 32B / 72B (also the
//! input of `scripts/check_megatron.py --args`), and the rendered JobSets and TrainJobs
//! validated against the real CRD schemas (committed in tests/fixtures/jobset/crds/, see the
//! README there) by `scripts/validate_crd.py` from `.venv` (`make test-deps`).
//!
//! `UPDATE_GOLDEN=1 cargo test --workspace --test jobset_render` rewrites the golden files;
//! review the diff before committing it.
use davinci_model::Qwen2Config;
use davinci_trainer::config::{Overrides, TrainConfig};
use davinci_trainer::data::Manifest;
use davinci_trainer::jobset::megatron::Parallelism;
use davinci_trainer::jobset::{self, ClusterConfig, ObjectKind, Plan, PlanInput, Rdma, render};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jobset")
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model(name: &str) -> Qwen2Config {
    let p = fixtures().join(format!("qwen2.5-{name}/config.json"));
    Qwen2Config::from_json(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn manifest() -> Manifest {
    let text = std::fs::read(fixtures().join("manifest-paper.json")).unwrap();
    Manifest::from_json(&text).unwrap()
}

/// The paper's 72B cluster: 8 H100 nodes, TP 8 inside a node, PP 4 across nodes, DP 2.
fn cluster_72b() -> ClusterConfig {
    ClusterConfig {
        namespace: "davinci".into(),
        image: "nvcr.io/nvidia/nemo:25.09".into(),
        parallel: Parallelism {
            nodes: 8,
            gpus_per_node: 8,
            tp: 8,
            pp: 4,
        },
        node_selector: BTreeMap::from([(
            "nvidia.com/gpu.product".into(),
            "NVIDIA-H100-80GB-HBM3".into(),
        )]),
        priority_class: Some("training-high".into()),
        service_account: Some("davinci-train-jobs".into()),
        s3_region: Some("us-east-1".into()),
        rdma: Some(Rdma {
            resource: "rdma/ib".into(),
            count: 8,
        }),
        cpu: Some("96".into()),
        memory: Some("1600Gi".into()),
        // 32k-token sequences of an 8192-wide model do not fit 80 GB without recomputation.
        extra_args: [
            "--recompute-granularity",
            "full",
            "--recompute-method",
            "uniform",
            "--recompute-num-layers",
            "1",
        ]
        .map(String::from)
        .to_vec(),
        ..Default::default()
    }
}

fn train_config(m: &Manifest, global_batch: usize) -> TrainConfig {
    TrainConfig {
        global_batch,
        micro_batch: 1,
        checkpoint_every: 500,
        ..Default::default()
    }
    .resolve(m, &Overrides::default())
    .unwrap()
}

fn plan(model_name: &str, cluster: &ClusterConfig, global_batch: usize) -> Plan {
    let m = manifest();
    let train = train_config(&m, global_batch);
    let model = model(model_name);
    jobset::plan(&PlanInput {
        run_id: "paper-72b",
        job_id: "5f0c8a1e9b2d4c37a6e1f0b9c8d7e6a5",
        manifest_uri: "s3://davinci/runs/paper-72b/packed/manifest.json",
        manifest: &m,
        model_uri: &format!("s3://davinci-models/Qwen2.5-{}", model_name.to_uppercase()),
        model: &model,
        out: "s3://davinci/runs/paper-72b",
        train: &train,
        cluster,
    })
    .unwrap()
}

fn golden(name: &str, actual: &str) {
    let p = fixtures().join("golden").join(name);
    if std::env::var("UPDATE_GOLDEN").is_ok_and(|v| v == "1") {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, actual).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", p.display()));
    if want != actual {
        let first = want
            .lines()
            .zip(actual.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(want.lines().count().min(actual.lines().count()));
        panic!(
            "{} differs from the rendering at line {}:\n  golden: {:?}\n  now:    {:?}\n(UPDATE_GOLDEN=1 rewrites it; review the diff)",
            p.display(),
            first + 1,
            want.lines().nth(first),
            actual.lines().nth(first)
        );
    }
}

fn arg<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .map(|i| args[i + 1].as_str())
}

#[test]
fn paper_72b_jobset_is_the_reviewed_golden() {
    let plan = plan("72b", &cluster_72b(), 512);
    assert_eq!(plan.stages.len(), 2);
    let (mid, sft) = (&plan.stages[0], &plan.stages[1]);
    // 73.1B tokens in 32k bins at 512 bins per step: 4,447 iterations.
    assert_eq!(mid.train_iters, 4447);
    let a = &mid.args;
    assert_eq!(arg(a, "--tensor-model-parallel-size"), Some("8"));
    assert_eq!(arg(a, "--pipeline-model-parallel-size"), Some("4"));
    assert!(a.iter().any(|x| x == "--sequence-parallel"));
    assert!(a.iter().any(|x| x == "--use-distributed-optimizer"));
    assert_eq!(arg(a, "--num-layers"), Some("80"));
    assert_eq!(arg(a, "--num-query-groups"), Some("8"));
    assert_eq!(arg(a, "--make-vocab-size-divisible-by"), Some("54"));
    assert_eq!(arg(a, "--rotary-base"), Some("1000000"));
    assert_eq!(arg(a, "--norm-epsilon"), Some("1e-5"));
    assert!(
        a.iter()
            .any(|x| x == "--untie-embeddings-and-output-weights")
    );
    assert!(a.iter().any(|x| x == "--add-qkv-bias"));
    assert_eq!(arg(a, "--lr"), Some("8e-5"));
    assert_eq!(arg(a, "--min-lr"), Some("8e-6"));
    assert_eq!(
        arg(a, "--object-storage-cache-path"),
        Some("/cache/object-storage")
    );
    assert_eq!(
        arg(a, "--data-path"),
        Some("0.33242134"),
        "the packer's blend weights"
    );
    assert!(
        a.iter()
            .any(|x| x == "s3://davinci/runs/paper-72b/packed/mid/ctx-python-00001")
    );
    assert!(!a.iter().any(|x| x == "--davinci-sft-mask"));
    assert!(sft.args.iter().any(|x| x == "--davinci-sft-mask"));
    assert_eq!(arg(&sft.args, "--lr"), Some("1e-5"));
    assert_eq!(sft.load, format!("{}/megatron/mid", plan.ckpt_root()));
    assert_eq!(mid.load, format!("{}/megatron/base", plan.ckpt_root()));
    assert_eq!(
        mid.checkpoint_uri,
        format!("s3://davinci/runs/paper-72b/checkpoints/{}", mid.step_end)
    );
    assert_eq!(sft.step_end, mid.step_end + sft.train_iters);

    let js = render::jobset(&plan, mid);
    let jobs = js["spec"]["replicatedJobs"].as_array().unwrap();
    let names: Vec<&str> = jobs.iter().map(|j| j["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["import", "node", "export"]);
    let node = &jobs[1]["template"]["spec"];
    assert_eq!(node["parallelism"], 8);
    assert_eq!(node["completionMode"], "Indexed");
    let pod = &node["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], 8);
    assert_eq!(c["resources"]["limits"]["rdma/ib"], 8);
    assert_eq!(pod["priorityClassName"], "training-high");
    assert_eq!(pod["volumes"][2]["emptyDir"]["medium"], "Memory");
    assert_eq!(js["spec"]["failurePolicy"]["maxRestarts"], 3);
    assert!(render::jobset(&plan, sft)["spec"]["replicatedJobs"][0]["name"] == "node");

    let yaml = render::to_yaml(&[render::jobset(&plan, mid), render::jobset(&plan, sft)]).unwrap();
    golden("qwen2.5-72b-jobsets.yaml", &yaml);
    for s in &plan.stages {
        golden(
            &format!("qwen2.5-72b-stage-{}.args", s.index),
            &(s.args.join("\n") + "\n"),
        );
    }
}

#[test]
fn megatron_args_for_0_5b_and_32b() {
    // 0.5B: tied embeddings, 2 query groups, one node of pure data parallelism.
    let small = ClusterConfig {
        parallel: Parallelism {
            nodes: 1,
            gpus_per_node: 8,
            tp: 1,
            pp: 1,
        },
        ..Default::default()
    };
    let p = plan("0.5b", &small, 64);
    let a = &p.stages[0].args;
    assert!(
        !a.iter()
            .any(|x| x == "--untie-embeddings-and-output-weights")
    );
    assert!(!a.iter().any(|x| x == "--sequence-parallel"));
    assert_eq!(arg(a, "--num-query-groups"), Some("2"));
    assert_eq!(arg(a, "--make-vocab-size-divisible-by"), Some("1187"));
    assert_eq!(arg(a, "--norm-epsilon"), Some("1e-6"));
    golden("qwen2.5-0.5b.args", &(a.join("\n") + "\n"));
    // 32B: 4 nodes, TP 8, PP 2, DP 2.
    let mid = ClusterConfig {
        parallel: Parallelism {
            nodes: 4,
            gpus_per_node: 8,
            tp: 8,
            pp: 2,
        },
        ..Default::default()
    };
    let p = plan("32b", &mid, 256);
    let a = &p.stages[0].args;
    assert_eq!(arg(a, "--num-layers"), Some("64"));
    assert_eq!(arg(a, "--ffn-hidden-size"), Some("27648"));
    assert_eq!(arg(a, "--kv-channels"), Some("128"));
    golden("qwen2.5-32b.args", &(a.join("\n") + "\n"));
}

#[test]
fn layouts_megatron_would_refuse_are_refused_here() {
    let m = manifest();
    let train = train_config(&m, 512);
    let model = model("72b");
    let try_with = |p: Parallelism, global: usize| {
        let mut c = cluster_72b();
        c.parallel = p;
        let mut t = train.clone();
        t.global_batch = global;
        jobset::plan(&PlanInput {
            run_id: "r",
            job_id: "j",
            manifest_uri: "s3://b/m/manifest.json",
            manifest: &m,
            model_uri: "s3://b/model",
            model: &model,
            out: "s3://b/runs/r",
            train: &t,
            cluster: &c,
        })
        .unwrap_err()
        .to_string()
    };
    let par = |nodes, tp, pp| Parallelism {
        nodes,
        gpus_per_node: 8,
        tp,
        pp,
    };
    assert!(try_with(par(8, 16, 4), 512).contains("tensor parallelism"));
    assert!(try_with(par(8, 8, 3), 512).contains("not a multiple of tp × pp"));
    assert!(try_with(par(6, 8, 3), 512).contains("num_hidden_layers 80"));
    assert!(try_with(par(8, 8, 4), 511).contains("global_batch 511"));
    let e = try_with(par(3, 8, 1), 512);
    assert!(e.contains("global_batch 512 is not a multiple"), "{e}");
}

fn validator() -> Option<PathBuf> {
    let py = repo().join(".venv/bin/python");
    py.exists().then_some(py)
}

fn skip(what: &str, why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{what} cannot run under CI=true: {why}");
    }
    eprintln!("SKIP {what}: {why}");
}

/// Runs scripts/validate_crd.py; returns (success, output).
fn validate(py: &Path, crd: &str, objects: &[serde_json::Value]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("objects.yaml");
    std::fs::write(&f, render::to_yaml(objects).unwrap()).unwrap();
    let out = std::process::Command::new(py)
        .arg(repo().join("scripts/validate_crd.py"))
        .arg(fixtures().join("crds").join(crd))
        .arg(&f)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn jobsets_and_trainjobs_validate_against_the_real_crds() {
    let Some(py) = validator() else {
        skip(
            "CRD validation of rendered JobSets / TrainJobs",
            ".venv/bin/python with jsonschema is missing (make test-deps)",
        );
        return;
    };
    let mut cluster = cluster_72b();
    let plan_js = plan("72b", &cluster, 512);
    let jobsets: Vec<_> = plan_js
        .stages
        .iter()
        .map(|s| render::jobset(&plan_js, s))
        .collect();
    let (ok, text) = validate(&py, "jobset.x-k8s.io_jobsets.yaml", &jobsets);
    assert!(ok, "{text}");
    assert_eq!(text.matches(": OK").count(), 2, "{text}");

    cluster.kind = ObjectKind::Trainjob;
    cluster.priority_class = None;
    let plan_tj = plan("72b", &cluster, 512);
    let trainjobs: Vec<_> = plan_tj
        .stages
        .iter()
        .map(|s| render::trainjob(&plan_tj, s).unwrap())
        .collect();
    let (ok, text) = validate(&py, "trainer.kubeflow.org_trainjobs.yaml", &trainjobs);
    assert!(ok, "{text}");
    assert_eq!(text.matches(": OK").count(), 2, "{text}");
    assert_eq!(trainjobs[0]["spec"]["trainer"]["numNodes"], 8);
    assert_eq!(
        trainjobs[0]["spec"]["runtimeRef"]["name"],
        "torch-distributed"
    );

    // The validator does catch what the API server would refuse.
    let mut bad = jobsets[0].clone();
    bad["spec"]["failurePolicy"]["maxRestart"] = serde_json::json!(3);
    bad["spec"]["replicatedJobs"][1]["dependsOn"][0]["status"] = serde_json::json!("Done");
    let (ok, text) = validate(&py, "jobset.x-k8s.io_jobsets.yaml", &[bad]);
    assert!(!ok, "{text}");
    assert!(text.contains("maxRestart"), "{text}");
    assert!(text.contains("'Done' is not one of"), "{text}");
    let mut bad = trainjobs[0].clone();
    bad["spec"]["trainer"]["numNodes"] = serde_json::json!("eight");
    let (ok, text) = validate(&py, "trainer.kubeflow.org_trainjobs.yaml", &[bad]);
    assert!(!ok && text.contains("numNodes"), "{text}");
}

#[test]
fn trainjobs_refuse_what_runtime_patches_cannot_set() {
    let mut c = cluster_72b();
    c.kind = ObjectKind::Trainjob;
    let p = plan("72b", &c, 512);
    let e = render::trainjob(&p, &p.stages[0]).unwrap_err().to_string();
    assert!(e.contains("priority_class"), "{e}");
}

#[test]
fn render_prints_yaml_a_reviewer_can_read() {
    let plan = plan("72b", &cluster_72b(), 512);
    let objs = render::objects(&plan).unwrap();
    assert_eq!(objs.len(), 3);
    let yaml = render::to_yaml(&objs).unwrap();
    assert_eq!(yaml.matches("\n---\n").count() + 1, 3);
    let docs: Vec<serde_json::Value> = yaml
        .split("---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_norway::from_str(d).unwrap())
        .collect();
    assert_eq!(docs, objs, "the YAML reads back as the objects");
    let cm = &objs[0];
    assert_eq!(cm["kind"], "ConfigMap");
    for k in [
        "run.sh",
        "pretrain_davinci.py",
        "davinci_sft.py",
        "convert.py",
        "objects.py",
        "stage-0.args",
        "stage-1.args",
    ] {
        assert!(cm["data"][k].is_string(), "{k}");
    }
    let back: Plan = serde_json::from_str(cm["data"]["plan.json"].as_str().unwrap()).unwrap();
    assert_eq!(back, plan, "a restarted trainer reads the plan back");
}
