//! A [`Plan`] as Kubernetes objects: the ConfigMap with the pod scripts and the plan, and one
//! JobSet or TrainJob per stage. Plain JSON values (the CRDs have no Rust types); the tests
//! validate them against the CRDs' own OpenAPI schemas.
use super::{ObjectKind, Plan, StagePlan};
use anyhow::ensure;
use serde_json::{Value, json};

pub const MANAGED_BY: &str = "davinci-trainer";
/// Label of every object of a trainer job: how a restarted trainer finds its jobs.
pub const JOB_LABEL: &str = "davinci.dev/train-job";
pub const RUN_LABEL: &str = "davinci.dev/run";
pub const STAGE_LABEL: &str = "davinci.dev/stage";
/// ConfigMap annotation: how many stages finished (the follower's progress record).
pub const COMPLETED_ANNOTATION: &str = "davinci.dev/completed-stages";
pub const CHECKPOINTS_ANNOTATION: &str = "davinci.dev/checkpoints";
pub const MASTER_PORT: u16 = 29500;

pub const JOBSET_API: &str = "jobset.x-k8s.io/v1alpha2";
pub const TRAINJOB_API: &str = "trainer.kubeflow.org/v1alpha1";

const RUN_SH: &str = include_str!("pod/run.sh");
const OBJECTS_PY: &str = include_str!("pod/objects.py");
const CONVERT_PY: &str = include_str!("pod/convert.py");
const PRETRAIN_PY: &str = include_str!("pod/pretrain_davinci.py");
const SFT_PY: &str = include_str!("pod/davinci_sft.py");

/// Labels shared by everything a job creates.
pub fn labels(plan: &Plan) -> Value {
    json!({
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/name": "davinci-train",
        JOB_LABEL: super::dns_label(&plan.job_id, 63),
        RUN_LABEL: super::dns_label(&plan.run_id, 63),
    })
}

/// The label selector of a job's objects.
pub fn job_selector(job_id: &str) -> String {
    format!(
        "app.kubernetes.io/managed-by={MANAGED_BY},{JOB_LABEL}={}",
        super::dns_label(job_id, 63)
    )
}

/// The ConfigMap: pod scripts, one argument file per stage and the plan itself.
pub fn config_map(plan: &Plan) -> anyhow::Result<Value> {
    let mut data = serde_json::Map::new();
    for (k, v) in [
        ("run.sh", RUN_SH),
        ("objects.py", OBJECTS_PY),
        ("convert.py", CONVERT_PY),
        ("pretrain_davinci.py", PRETRAIN_PY),
        ("davinci_sft.py", SFT_PY),
    ] {
        data.insert(k.into(), json!(v));
    }
    for s in &plan.stages {
        data.insert(
            format!("stage-{}.args", s.index),
            json!(s.args.join("\n") + "\n"),
        );
    }
    data.insert(
        "plan.json".into(),
        json!(serde_json::to_string_pretty(plan)?),
    );
    Ok(json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": plan.name,
            "namespace": plan.cluster.namespace,
            "labels": labels(plan),
            "annotations": { COMPLETED_ANNOTATION: "0", CHECKPOINTS_ANNOTATION: "[]" },
        },
        "data": data,
    }))
}

fn env(name: &str, value: impl ToString) -> Value {
    json!({"name": name, "value": value.to_string()})
}

/// The container environment of a stage's pods.
fn stage_env(plan: &Plan, s: &StagePlan) -> Vec<Value> {
    let c = &plan.cluster;
    let mut e = vec![
        env("STAGE", s.index),
        env("STAGE_NAME", &s.name),
        env("NODES", c.parallel.nodes),
        env("GPUS_PER_NODE", c.parallel.gpus_per_node),
        env("MASTER_ADDR", format!("{0}-node-0-0.{0}", s.object)),
        env("MASTER_PORT", MASTER_PORT),
        env("CKPT_ROOT", plan.ckpt_root()),
        env("BASE_MODEL", &plan.model_uri),
        env("PREV_CKPT", &s.load),
        env("CHECKPOINT_URI", &s.checkpoint_uri),
        env("MEGATRON_DIR", &c.megatron_dir),
        env("PYTHONUNBUFFERED", 1),
        // Megatron requires it for tensor/sequence parallel communication overlap.
        env("CUDA_DEVICE_MAX_CONNECTIONS", 1),
    ];
    if let Some(u) = &c.s3_endpoint {
        e.push(env("AWS_ENDPOINT_URL", u));
    }
    if let Some(r) = &c.s3_region {
        e.push(env("AWS_REGION", r));
    }
    if let Some(secret) = &c.s3_secret {
        for key in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
            e.push(
                json!({"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}),
            );
        }
    }
    e
}

fn resources(plan: &Plan, gpus: bool) -> Value {
    let c = &plan.cluster;
    let mut limits = serde_json::Map::new();
    if gpus {
        limits.insert("nvidia.com/gpu".into(), json!(c.parallel.gpus_per_node));
        if let Some(r) = &c.rdma {
            limits.insert(r.resource.clone(), json!(r.count));
        }
    }
    if let Some(cpu) = &c.cpu {
        limits.insert("cpu".into(), json!(cpu));
    }
    if let Some(m) = &c.memory {
        limits.insert("memory".into(), json!(m));
    }
    json!({"limits": limits.clone(), "requests": limits})
}

fn volume_mounts() -> Value {
    json!([
        {"name": "davinci", "mountPath": "/davinci", "readOnly": true},
        {"name": "ckpt", "mountPath": "/ckpt"},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "cache", "mountPath": "/cache"},
    ])
}

fn volumes(plan: &Plan) -> Value {
    json!([
        {"name": "davinci", "configMap": {"name": plan.name, "defaultMode": 0o555}},
        {"name": "ckpt", "persistentVolumeClaim": {"claimName": plan.cluster.checkpoint_claim}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": plan.cluster.shm_size}},
        {"name": "cache", "emptyDir": {}},
    ])
}

fn stage_labels(plan: &Plan, s: &StagePlan) -> Value {
    let mut l = labels(plan);
    l[STAGE_LABEL] = json!(s.index.to_string());
    l
}

/// The pod template of one step (`import`, `train` or `export`) of a JobSet stage.
fn pod_template(plan: &Plan, s: &StagePlan, step: &str) -> Value {
    let c = &plan.cluster;
    let mut container = json!({
        "name": "node",
        "image": c.image,
        "command": ["bash", "/davinci/run.sh", step],
        "env": stage_env(plan, s),
        "resources": resources(plan, step == "train"),
        "volumeMounts": volume_mounts(),
    });
    if step == "train" {
        container["ports"] = json!([{"name": "torchrun", "containerPort": MASTER_PORT}]);
    }
    if let Some(p) = &c.image_pull_policy {
        container["imagePullPolicy"] = json!(p);
    }
    let mut spec = json!({
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": volumes(plan),
        "tolerations": c.tolerations,
    });
    if !c.node_selector.is_empty() {
        spec["nodeSelector"] = json!(c.node_selector);
    }
    if let Some(sa) = &c.service_account {
        spec["serviceAccountName"] = json!(sa);
    }
    if let Some(p) = &c.priority_class {
        spec["priorityClassName"] = json!(p);
    }
    if c.host_network && step == "train" {
        spec["hostNetwork"] = json!(true);
        spec["dnsPolicy"] = json!("ClusterFirstWithHostNet");
    }
    json!({"metadata": {"labels": stage_labels(plan, s)}, "spec": spec})
}

fn replicated_job(name: &str, pods: u32, after: Option<&str>, template: Value) -> Value {
    let mut spec = json!({
        "parallelism": pods,
        "completions": pods,
        "backoffLimit": 0,
        "template": template,
    });
    if pods > 1 {
        spec["completionMode"] = json!("Indexed");
    }
    let mut rj = json!({"name": name, "replicas": 1, "template": {"spec": spec}});
    if let Some(a) = after {
        rj["dependsOn"] = json!([{"name": a, "status": "Complete"}]);
    }
    rj
}

fn stage_metadata(plan: &Plan, s: &StagePlan) -> Value {
    json!({
        "name": s.object,
        "namespace": plan.cluster.namespace,
        "labels": stage_labels(plan, s),
        "annotations": {
            "davinci.dev/stage-name": s.name,
            "davinci.dev/train-iters": s.train_iters.to_string(),
            "davinci.dev/checkpoint": s.checkpoint_uri,
        },
    })
}

/// A stage's JobSet: (stage 0: `import` →) `node` (one pod per node, torchrun) → `export`.
pub fn jobset(plan: &Plan, s: &StagePlan) -> Value {
    let c = &plan.cluster;
    let mut jobs = Vec::new();
    let first = s.index == 0;
    if first {
        jobs.push(replicated_job(
            "import",
            1,
            None,
            pod_template(plan, s, "import"),
        ));
    }
    jobs.push(replicated_job(
        "node",
        c.parallel.nodes,
        first.then_some("import"),
        pod_template(plan, s, "train"),
    ));
    jobs.push(replicated_job(
        "export",
        1,
        Some("node"),
        pod_template(plan, s, "export"),
    ));
    json!({
        "apiVersion": JOBSET_API,
        "kind": "JobSet",
        "metadata": stage_metadata(plan, s),
        "spec": {
            "failurePolicy": {"maxRestarts": c.max_restarts},
            "ttlSecondsAfterFinished": c.ttl_seconds_after_finished,
            "network": {"enableDNSHostnames": true, "publishNotReadyAddresses": true},
            "successPolicy": {"operator": "All"},
            "replicatedJobs": jobs,
        },
    })
}

/// A stage's TrainJob against the `torch-distributed` runtime: one step per node (`run.sh
/// all`: node 0 imports before and exports after training). Restarts, TTL, priority and host
/// networking belong to the ClusterTrainingRuntime (runtimePatches cannot set them).
pub fn trainjob(plan: &Plan, s: &StagePlan) -> anyhow::Result<Value> {
    let c = &plan.cluster;
    ensure!(
        c.priority_class.is_none() && !c.host_network,
        "cluster.priority_class and cluster.host_network need kind jobset: a TrainJob's runtimePatches cannot set them (set them in the ClusterTrainingRuntime `{}`)",
        c.runtime
    );
    let mut pod = json!({
        "containers": [{"name": "node", "volumeMounts": volume_mounts()}],
        "volumes": volumes(plan),
        "tolerations": c.tolerations,
    });
    if !c.node_selector.is_empty() {
        pod["nodeSelector"] = json!(c.node_selector);
    }
    if let Some(sa) = &c.service_account {
        pod["serviceAccountName"] = json!(sa);
    }
    let mut env = stage_env(plan, s);
    // The runtime's PET_* variables tell torchrun the rendezvous; MASTER_ADDR is the JobSet's.
    env.retain(|e| e["name"] != "MASTER_ADDR" && e["name"] != "MASTER_PORT");
    Ok(json!({
        "apiVersion": TRAINJOB_API,
        "kind": "TrainJob",
        "metadata": stage_metadata(plan, s),
        "spec": {
            "runtimeRef": {
                "apiGroup": "trainer.kubeflow.org",
                "kind": "ClusterTrainingRuntime",
                "name": c.runtime,
            },
            "trainer": {
                "image": c.image,
                "command": ["bash", "/davinci/run.sh", "all"],
                "env": env,
                "numNodes": c.parallel.nodes,
                "numProcPerNode": c.parallel.gpus_per_node,
                "resourcesPerNode": resources(plan, true),
            },
            "runtimePatches": [{
                "manager": "trainer.davinci.dev",
                "trainingRuntimeSpec": {"template": {
                    "metadata": {"labels": stage_labels(plan, s)},
                    "spec": {"replicatedJobs": [{
                        "name": "node",
                        "template": {"spec": {"template": {
                            "metadata": {"labels": stage_labels(plan, s)},
                            "spec": pod,
                        }}},
                    }]},
                }},
            }],
        },
    }))
}

/// The object that runs stage `s`.
pub fn stage_object(plan: &Plan, s: &StagePlan) -> anyhow::Result<Value> {
    match plan.cluster.kind {
        ObjectKind::Jobset => Ok(jobset(plan, s)),
        ObjectKind::Trainjob => trainjob(plan, s),
    }
}

/// Everything the job submits, in order: the ConfigMap, then one object per stage.
pub fn objects(plan: &Plan) -> anyhow::Result<Vec<Value>> {
    let mut v = vec![config_map(plan)?];
    for s in &plan.stages {
        v.push(stage_object(plan, s)?);
    }
    Ok(v)
}

/// The objects as a multi-document YAML stream, as `helm template` prints them.
pub fn to_yaml(objects: &[Value]) -> anyhow::Result<String> {
    let mut out = String::new();
    for o in objects {
        out.push_str("---\n");
        out.push_str(&serde_norway::to_string(o)?);
    }
    Ok(out)
}
