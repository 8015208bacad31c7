//! The jobset engine end to end against the fake Kubernetes API server (davinci-kube-fake,
//! which serves JobSets and TrainJobs with their controllers, watch and pod logs): a run goes
//! submit → running → Completed with progress from Megatron-format iteration lines and the
//! Hugging Face checkpoint URIs recorded; a failing stage fails the job after its restarts; a
//! cancel deletes the objects; a restarted trainer re-attaches to a half-done job by label.
//! The pods are scripted (the fake runs nothing): the test plays the pods' part.
use davinci_kube_fake::{FakeCluster, FakeConfig};
use davinci_proto::v1::trainer_server::Trainer;
use davinci_proto::v1::{Job, JobRef, JobState, StartTrainRequest, TrainSpec};
use davinci_runtime::jobs::JobRegistry;
use davinci_trainer::jobset::{self, render};
use davinci_trainer::serve::TrainerService;
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;
use tonic::Request;

const NS: &str = "davinci";
const JOBSETS: &str = "jobset.x-k8s.io/jobsets";
const TRAINJOBS: &str = "trainer.kubeflow.org/trainjobs";

fn fixture(p: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
        .display()
        .to_string()
}

async fn fake() -> (FakeCluster, kube::Client) {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    // The fake's node only needs Docker for pods created through the API; these are scripted.
    let docker = bollard::Docker::connect_with_local_defaults().expect("docker client");
    let fake = FakeCluster::start(FakeConfig::default(), docker)
        .await
        .unwrap();
    let mut cfg = kube::Config::new(fake.url().parse().unwrap());
    cfg.default_namespace = NS.into();
    let client = kube::Client::try_from(cfg).unwrap();
    (fake, client)
}

fn spec(kind: &str, max_restarts: u32, stages: Option<Value>) -> TrainSpec {
    let mut config = json!({
        "global_batch": 2,
        "micro_batch": 1,
        "cluster": {
            "kind": kind,
            "namespace": NS,
            "image": "registry.local/megatron:core-0.15.3",
            "parallel": {"nodes": 2, "gpus_per_node": 1, "tp": 1, "pp": 1},
            "data_root": "s3://davinci/runs/r1/packed",
            "s3_secret": "davinci-s3",
            "max_restarts": max_restarts,
        },
    });
    if let Some(s) = stages {
        config["stages"] = s;
    }
    TrainSpec {
        data: fixture("packed/manifest.json"),
        out: "s3://davinci/runs/r1".into(),
        model: fixture("jobset/tiny-model"),
        engine: "jobset".into(),
        config_json: config.to_string(),
        ..Default::default()
    }
}

async fn start(svc: &TrainerService, spec: TrainSpec) -> Job {
    svc.start_train(Request::new(StartTrainRequest {
        run_id: "r1".into(),
        spec: Some(spec),
    }))
    .await
    .unwrap()
    .into_inner()
}

async fn job(svc: &TrainerService, id: &str) -> Job {
    svc.get_train(Request::new(JobRef { job_id: id.into() }))
        .await
        .unwrap()
        .into_inner()
}

/// Waits (up to 15 s) for `f` to return something.
async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    for _ in 0..300 {
        if let Some(v) = f() {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

fn pods_of(fake: &FakeCluster, object: &str, rjob: &str) -> Vec<Value> {
    fake.pods()
        .into_iter()
        .filter(|p| {
            let l = &p["metadata"]["labels"];
            l["jobset.sigs.k8s.io/jobset-name"] == object
                && l["jobset.sigs.k8s.io/replicatedjob-name"] == rjob
                && p["status"]["phase"] == "Running"
        })
        .collect()
}

fn name(p: &Value) -> String {
    p["metadata"]["name"].as_str().unwrap().to_string()
}

/// Python's `{:.6E}` (`2.500000E+00`), which Megatron's format strings use.
fn py_e(x: f64) -> String {
    let s = format!("{x:.6E}");
    let (m, e) = s.split_once('E').unwrap();
    let e: i32 = e.parse().unwrap();
    format!("{m}E{}{:02}", if e < 0 { '-' } else { '+' }, e.abs())
}

/// An iteration line exactly as Megatron-LM core_v0.15's training_log prints it (its format
/// strings, with --log-throughput).
fn megatron_line(it: u64, total: u64, loss: f64, lr: f64) -> String {
    format!(
        " [2026-12-07 15:02:{:02}.{:06}] iteration {it:8}/{total:8} | consumed samples: {:12} | elapsed time per iteration (ms): {:.1} | throughput per GPU (TFLOP/s/GPU): {:.1} | learning rate: {} | global batch size: {:5} | lm loss: {} | loss scale: 1.0 | grad norm: {:.3} | number of skipped iterations: {:3} | number of nan iterations: {:3} |\n",
        it % 60,
        it * 1000,
        it * 2,
        812.4,
        3.1,
        py_e(lr),
        2,
        py_e(loss),
        0.914,
        0,
        0
    )
}

/// Plays one stage's pods: import (stage 0), the node pods (iteration lines on the last rank),
/// export; each ends with `node_exit` for the node pods.
async fn play_stage(fake: &FakeCluster, object: &str, iters: u64, first: bool) {
    if first {
        let import = eventually("the import pod", || pods_of(fake, object, "import").pop()).await;
        fake.append_log(NS, &name(&import), "[davinci] importing the base model\n");
        fake.finish_pod(NS, &name(&import), 0);
    }
    let nodes = eventually("two node pods", || {
        let p = pods_of(fake, object, "node");
        (p.len() == 2).then_some(p)
    })
    .await;
    let last = nodes
        .iter()
        .find(|p| p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] == "1")
        .unwrap();
    let mut log =
        String::from(" > padded vocab (size: 1505) with 31 dummy tokens (new size: 1536)\n");
    for it in 1..=iters {
        log.push_str(&megatron_line(
            it,
            iters,
            7.0 - it as f64 * 0.1,
            1e-5 * it as f64,
        ));
    }
    fake.append_log(NS, &name(last), &log);
    // The follower reads the lines while the pod still runs.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for p in &nodes {
        fake.finish_pod(NS, &name(p), 0);
    }
    let export = eventually("the export pod", || pods_of(fake, object, "export").pop()).await;
    fake.finish_pod(NS, &name(&export), 0);
}

async fn wait_terminal(svc: &TrainerService, id: &str) -> Job {
    for _ in 0..300 {
        let j = job(svc, id).await;
        if j.state != JobState::Queued as i32 && j.state != JobState::Running as i32 {
            return j;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("job {id} did not finish: {:?}", job(svc, id).await);
}

#[tokio::test]
async fn a_two_stage_run_completes_with_progress_and_checkpoints() {
    let (fake, client) = fake().await;
    let svc = TrainerService::new(JobRegistry::in_memory().await).with_kube(client);
    let j = start(&svc, spec("jobset", 3, None)).await;
    let plan = {
        let cms = eventually("the plan ConfigMap", || fake.objects("v1/configmaps").pop()).await;
        serde_json::from_str::<jobset::Plan>(cms["data"]["plan.json"].as_str().unwrap()).unwrap()
    };
    assert_eq!(plan.stages.len(), 2);
    for s in &plan.stages {
        let js = eventually("the stage's JobSet", || {
            fake.objects(JOBSETS)
                .into_iter()
                .find(|o| o["metadata"]["name"] == s.object.as_str())
        })
        .await;
        assert_eq!(
            js["metadata"]["labels"][render::JOB_LABEL],
            j.job_id.as_str()
        );
        // Server-side apply, as a field manager.
        let applied = fake.requests().into_iter().any(|r| {
            r.method == "PATCH"
                && r.path.ends_with(&s.object)
                && r.query.contains("fieldManager=davinci-trainer")
        });
        assert!(applied, "stage {} was not applied server-side", s.index);
        play_stage(&fake, &s.object, s.train_iters, s.index == 0).await;
        let done = eventually("Completed", || {
            fake.objects(JOBSETS).into_iter().find(|o| {
                o["metadata"]["name"] == s.object.as_str()
                    && o["status"]["terminalState"] == "Completed"
            })
        })
        .await;
        assert_eq!(
            done["status"]["conditions"][0]["reason"],
            "AllJobsCompleted"
        );
    }
    let end = wait_terminal(&svc, &j.job_id).await;
    assert_eq!(end.state, JobState::Succeeded as i32, "{end:?}");
    let want: Vec<String> = plan
        .stages
        .iter()
        .map(|s| format!("s3://davinci/runs/r1/checkpoints/{}", s.step_end))
        .collect();
    assert_eq!(end.outputs, want);
    // Progress: the last iteration line of the last stage, as the job's global step.
    assert_eq!(
        (end.done, end.total),
        (plan.total_iters(), plan.total_iters())
    );
    assert_eq!(end.counters.get("stages"), Some(&2));
    let cm = fake.objects("v1/configmaps").pop().unwrap();
    assert_eq!(
        cm["metadata"]["annotations"][render::COMPLETED_ANNOTATION],
        "2"
    );
    let recorded: Vec<String> = serde_json::from_str(
        cm["metadata"]["annotations"][render::CHECKPOINTS_ANNOTATION]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(recorded, want);
    fake.shutdown().await;
}

#[tokio::test]
async fn progress_comes_from_the_iteration_lines() {
    let (fake, client) = fake().await;
    let registry = JobRegistry::in_memory().await;
    let svc = TrainerService::new(registry.clone()).with_kube(client);
    let j = start(
        &svc,
        spec("jobset", 0, Some(json!([{"name": "stage1", "lr": 8e-5}]))),
    )
    .await;
    let js = eventually("the JobSet", || fake.objects(JOBSETS).pop()).await;
    let object = js["metadata"]["name"].as_str().unwrap().to_string();
    let import = eventually("import", || pods_of(&fake, &object, "import").pop()).await;
    fake.finish_pod(NS, &name(&import), 0);
    let nodes = eventually("nodes", || {
        let p = pods_of(&fake, &object, "node");
        (p.len() == 2).then_some(p)
    })
    .await;
    let last = nodes
        .iter()
        .find(|p| p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] == "1")
        .unwrap();
    fake.append_log(NS, &name(last), &megatron_line(3, 6, 2.5, 4e-5));
    let mut seen = None;
    for _ in 0..300 {
        let now = registry.get(&j.job_id).await.unwrap();
        if now.done == 3 {
            seen = Some(now);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = seen.expect("iteration 3 reported as progress");
    assert_eq!(seen.total, 6);
    assert!(
        seen.message
            .contains("stage1 iteration 3/6 loss 2.5000 lr 4.00e-5"),
        "{}",
        seen.message
    );
    fake.shutdown().await;
}

#[tokio::test]
async fn a_failing_stage_fails_the_job_after_its_restarts() {
    let (fake, client) = fake().await;
    let svc = TrainerService::new(JobRegistry::in_memory().await).with_kube(client);
    let j = start(&svc, spec("jobset", 1, None)).await;
    let js = eventually("the JobSet", || fake.objects(JOBSETS).pop()).await;
    let object = js["metadata"]["name"].as_str().unwrap().to_string();
    let import = eventually("import", || pods_of(&fake, &object, "import").pop()).await;
    fake.finish_pod(NS, &name(&import), 0);
    for attempt in 0..2 {
        if attempt > 0 {
            // RestartJobSet recreates every job, the import step too.
            let import = eventually("import again", || {
                pods_of(&fake, &object, "import")
                    .into_iter()
                    .find(|p| p["metadata"]["labels"]["jobset.sigs.k8s.io/restart-attempt"] == "1")
            })
            .await;
            fake.finish_pod(NS, &name(&import), 0);
        }
        let nodes = eventually("nodes", || {
            let p: Vec<Value> = pods_of(&fake, &object, "node")
                .into_iter()
                .filter(|p| {
                    p["metadata"]["labels"]["jobset.sigs.k8s.io/restart-attempt"]
                        == attempt.to_string().as_str()
                })
                .collect();
            (p.len() == 2).then_some(p)
        })
        .await;
        fake.append_log(
            NS,
            &name(&nodes[0]),
            "torch.OutOfMemoryError: CUDA out of memory.\n",
        );
        fake.finish_pod(NS, &name(&nodes[0]), 1);
    }
    let end = wait_terminal(&svc, &j.job_id).await;
    assert_eq!(end.state, JobState::Failed as i32, "{end:?}");
    assert!(end.error.contains("ReachedMaxRestarts"), "{}", end.error);
    assert_eq!(end.counters.get("restarts"), Some(&1));
    let cm = fake.objects("v1/configmaps").pop().unwrap();
    assert!(
        cm["metadata"]["annotations"]["davinci.dev/failed"]
            .as_str()
            .unwrap()
            .contains("stage 0")
    );
    fake.shutdown().await;
}

#[tokio::test]
async fn cancel_deletes_the_objects() {
    let (fake, client) = fake().await;
    let svc = TrainerService::new(JobRegistry::in_memory().await).with_kube(client);
    let j = start(&svc, spec("jobset", 3, None)).await;
    let js = eventually("the JobSet", || fake.objects(JOBSETS).pop()).await;
    let object = js["metadata"]["name"].as_str().unwrap().to_string();
    eventually("import", || pods_of(&fake, &object, "import").pop()).await;
    svc.cancel_train(Request::new(JobRef {
        job_id: j.job_id.clone(),
    }))
    .await
    .unwrap();
    eventually("the objects gone", || {
        (fake.objects(JOBSETS).is_empty()
            && fake.objects("v1/configmaps").is_empty()
            && fake.pods().is_empty())
        .then_some(())
    })
    .await;
    let end = wait_terminal(&svc, &j.job_id).await;
    assert_eq!(end.state, JobState::Cancelled as i32);
    let deletes = fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "DELETE")
        .count();
    assert_eq!(deletes, 2, "the JobSet and the ConfigMap");
    fake.shutdown().await;
}

#[tokio::test]
async fn a_restarted_trainer_reattaches_by_label() {
    let (fake, client) = fake().await;
    // What a trainer killed during stage 1 leaves: the plan ConfigMap with stage 0 recorded
    // done, and stage 1's JobSet submitted.
    let s = spec("jobset", 3, None);
    let plan = jobset::plan_from_spec(
        &s,
        "r1",
        "0123456789abcdef0123456789abcdef",
        &Default::default(),
    )
    .await
    .unwrap();
    let mut cm = render::config_map(&plan).unwrap();
    cm["metadata"]["annotations"][render::COMPLETED_ANNOTATION] = json!("1");
    cm["metadata"]["annotations"][render::CHECKPOINTS_ANNOTATION] =
        json!(serde_json::to_string(&[&plan.stages[0].checkpoint_uri]).unwrap());
    let cms: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
        kube::Api::namespaced(client.clone(), NS);
    cms.create(&Default::default(), &serde_json::from_value(cm).unwrap())
        .await
        .unwrap();
    let js_api: kube::Api<kube::api::DynamicObject> = kube::Api::namespaced_with(
        client.clone(),
        NS,
        &kube::api::ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk("jobset.x-k8s.io", "v1alpha2", "JobSet"),
            "jobsets",
        ),
    );
    let stage1 = render::jobset(&plan, &plan.stages[1]);
    js_api
        .create(
            &Default::default(),
            &serde_json::from_value(stage1).unwrap(),
        )
        .await
        .unwrap();

    let svc = TrainerService::new(JobRegistry::in_memory().await).with_kube(client);
    assert_eq!(svc.reattach(&[NS]).await.unwrap(), 1);
    play_stage(
        &fake,
        &plan.stages[1].object,
        plan.stages[1].train_iters,
        false,
    )
    .await;
    let end = wait_terminal(&svc, &plan.job_id).await;
    assert_eq!(end.state, JobState::Succeeded as i32, "{end:?}");
    assert_eq!(
        end.outputs,
        vec![
            plan.stages[0].checkpoint_uri.clone(),
            plan.stages[1].checkpoint_uri.clone()
        ]
    );
    assert_eq!(
        fake.objects(JOBSETS).len(),
        1,
        "stage 0 was not submitted again"
    );
    // Nothing is left to re-attach to.
    assert_eq!(svc.reattach(&[NS]).await.unwrap(), 0);
    fake.shutdown().await;
}

#[tokio::test]
async fn a_trainjob_stage_completes() {
    let (fake, client) = fake().await;
    let svc = TrainerService::new(JobRegistry::in_memory().await).with_kube(client);
    let j = start(
        &svc,
        spec("trainjob", 0, Some(json!([{"name": "stage2", "lr": 1e-5}]))),
    )
    .await;
    let tj = eventually("the TrainJob", || fake.objects(TRAINJOBS).pop()).await;
    let object = tj["metadata"]["name"].as_str().unwrap().to_string();
    assert_eq!(tj["spec"]["trainer"]["numNodes"], 2);
    // The Trainer controller made a JobSet of the same name; its pods run `run.sh all`.
    let nodes = eventually("nodes", || {
        let p = pods_of(&fake, &object, "node");
        (p.len() == 2).then_some(p)
    })
    .await;
    assert_eq!(
        nodes[0]["spec"]["containers"][0]["command"],
        json!(["bash", "/davinci/run.sh", "all"])
    );
    let last = nodes
        .iter()
        .find(|p| p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] == "1")
        .unwrap();
    fake.append_log(NS, &name(last), &megatron_line(1, 6, 3.0, 1e-5));
    tokio::time::sleep(Duration::from_millis(300)).await;
    for p in &nodes {
        fake.finish_pod(NS, &name(p), 0);
    }
    let end = wait_terminal(&svc, &j.job_id).await;
    assert_eq!(end.state, JobState::Succeeded as i32, "{end:?}");
    let tj = fake.objects(TRAINJOBS).pop().unwrap();
    assert_eq!(tj["status"]["conditions"][0]["type"], "Complete");
    assert_eq!(end.outputs.len(), 1);
    fake.shutdown().await;
}
