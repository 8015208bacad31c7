//! Submits a [`Plan`] with server-side apply, follows each stage's object to its end (JobSet
//! `Completed` / `Failed`, TrainJob `Complete` / `Failed`, restarts) while tailing the last
//! rank's pod log for Megatron's iteration lines, and records finished stages on the plan's
//! ConfigMap, so a restarted trainer re-attaches ([`owned_plans`]) and goes on where it was.
use super::logs::{self, Iteration};
use super::render::{self, CHECKPOINTS_ANNOTATION, COMPLETED_ANNOTATION};
use super::{ObjectKind, Plan, StagePlan};
use anyhow::{Context, anyhow};
use futures::{AsyncBufReadExt, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, LogParams, Patch,
    PatchParams, WatchEvent, WatchParams,
};
use kube::{Api, Client};
use std::time::Duration;

const FIELD_MANAGER: &str = "davinci-trainer";
/// ConfigMap annotation of a job whose stage failed (a restarted trainer leaves it alone).
pub const FAILED_ANNOTATION: &str = "davinci.dev/failed";

/// What following a job reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// An object was applied.
    Submitted { stage: usize, object: String },
    /// A Megatron iteration line of stage `stage`; `step` is the job's global step.
    Iteration {
        stage: usize,
        step: u64,
        it: Iteration,
    },
    /// The stage's object restarted its pods (JobSet `status.restarts`).
    Restarted { stage: usize, restarts: u64 },
    /// The stage finished and its Hugging Face checkpoint is at `checkpoint`.
    StageDone { stage: usize, checkpoint: String },
}

fn resource(kind: ObjectKind) -> ApiResource {
    match kind {
        ObjectKind::Jobset => ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("jobset.x-k8s.io", "v1alpha2", "JobSet"),
            "jobsets",
        ),
        ObjectKind::Trainjob => ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("trainer.kubeflow.org", "v1alpha1", "TrainJob"),
            "trainjobs",
        ),
    }
}

fn objects(client: &Client, plan: &Plan) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        &plan.cluster.namespace,
        &resource(plan.cluster.kind),
    )
}

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// A stage object's state, from its status conditions.
#[derive(Debug, Clone, PartialEq)]
enum Status {
    Running { restarts: u64 },
    Completed,
    Failed(String),
}

fn status_of(kind: ObjectKind, obj: &serde_json::Value) -> Status {
    let done = match kind {
        ObjectKind::Jobset => "Completed",
        ObjectKind::Trainjob => "Complete",
    };
    let conds = obj["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let is = |t: &str| {
        conds
            .iter()
            .find(|c| c["type"] == t && c["status"] == "True")
            .cloned()
    };
    if let Some(c) = is("Failed") {
        return Status::Failed(format!(
            "{}: {}",
            c["reason"].as_str().unwrap_or("Failed"),
            c["message"].as_str().unwrap_or("")
        ));
    }
    if is(done).is_some() {
        return Status::Completed;
    }
    Status::Running {
        restarts: obj["status"]["restarts"].as_u64().unwrap_or(0),
    }
}

/// Applies the plan's ConfigMap unless it exists (it holds the job's progress).
async fn ensure_config_map(client: &Client, plan: &Plan) -> anyhow::Result<ConfigMap> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &plan.cluster.namespace);
    if let Some(cm) = api.get_opt(&plan.name).await? {
        return Ok(cm);
    }
    let cm = render::config_map(plan)?;
    api.patch(&plan.name, &apply_params(), &Patch::Apply(&cm))
        .await
        .with_context(|| {
            format!(
                "applying ConfigMap {}/{}",
                plan.cluster.namespace, plan.name
            )
        })
}

fn annotation<'a>(cm: &'a ConfigMap, key: &str) -> Option<&'a str> {
    cm.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

async fn annotate(client: &Client, plan: &Plan, pairs: serde_json::Value) -> anyhow::Result<()> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &plan.cluster.namespace);
    let patch = serde_json::json!({"metadata": {"annotations": pairs}});
    api.patch(&plan.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// Runs the plan to its end: every stage not yet recorded as done is applied and followed.
/// Returns the Hugging Face checkpoint URIs of all stages.
pub async fn run(
    client: &Client,
    plan: &Plan,
    on_event: &mut (dyn FnMut(Event) + Send),
) -> anyhow::Result<Vec<String>> {
    let cm = ensure_config_map(client, plan).await?;
    if let Some(f) = annotation(&cm, FAILED_ANNOTATION) {
        return Err(davinci_runtime::retry::permanent(anyhow!(
            "this job already failed: {f}"
        )));
    }
    let done: usize = annotation(&cm, COMPLETED_ANNOTATION)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut checkpoints: Vec<String> = annotation(&cm, CHECKPOINTS_ANNOTATION)
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default();
    for s in plan.stages.iter().skip(done) {
        match follow_stage(client, plan, s, on_event).await? {
            Status::Completed => {
                checkpoints.push(s.checkpoint_uri.clone());
                annotate(
                    client,
                    plan,
                    serde_json::json!({
                        COMPLETED_ANNOTATION: (s.index + 1).to_string(),
                        CHECKPOINTS_ANNOTATION: serde_json::to_string(&checkpoints)?,
                    }),
                )
                .await?;
                on_event(Event::StageDone {
                    stage: s.index,
                    checkpoint: s.checkpoint_uri.clone(),
                });
            }
            Status::Failed(why) => {
                let msg = format!("stage {} ({}) {} failed: {why}", s.index, s.name, s.object);
                annotate(client, plan, serde_json::json!({ FAILED_ANNOTATION: msg })).await?;
                return Err(davinci_runtime::retry::permanent(anyhow!(msg)));
            }
            Status::Running { .. } => unreachable!("follow_stage returns a terminal status"),
        }
    }
    Ok(checkpoints)
}

/// Applies the stage's object (a no-op when it is there already) and waits for its end.
async fn follow_stage(
    client: &Client,
    plan: &Plan,
    s: &StagePlan,
    on_event: &mut (dyn FnMut(Event) + Send),
) -> anyhow::Result<Status> {
    let api = objects(client, plan);
    let existing = api.get_opt(&s.object).await?;
    if existing.is_none() {
        let obj = render::stage_object(plan, s)?;
        api.patch(&s.object, &apply_params(), &Patch::Apply(&obj))
            .await
            .with_context(|| format!("applying {}", s.object))?;
        on_event(Event::Submitted {
            stage: s.index,
            object: s.object.clone(),
        });
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let tail = tokio::spawn(tail_logs(client.clone(), plan.clone(), s.clone(), tx));
    let result = watch_stage(&api, plan, s, on_event, &mut rx).await;
    tail.abort();
    while let Ok(e) = rx.try_recv() {
        on_event(e);
    }
    result
}

async fn watch_stage(
    api: &Api<DynamicObject>,
    plan: &Plan,
    s: &StagePlan,
    on_event: &mut (dyn FnMut(Event) + Send),
    logs: &mut tokio::sync::mpsc::UnboundedReceiver<Event>,
) -> anyhow::Result<Status> {
    let kind = plan.cluster.kind;
    let mut restarts = 0;
    loop {
        let obj = api.get_opt(&s.object).await?.ok_or_else(|| {
            anyhow!(
                "{} was deleted while the stage ran (cancelled, or removed by hand)",
                s.object
            )
        })?;
        let mut status = status_of(kind, &serde_json::to_value(&obj)?);
        let rv = obj.metadata.resource_version.clone().unwrap_or_default();
        let wp = WatchParams::default()
            .fields(&format!("metadata.name={}", s.object))
            .timeout(60);
        let mut stream = api.watch(&wp, &rv).await?.boxed();
        loop {
            if let Status::Running { restarts: r } = status {
                if r > restarts {
                    restarts = r;
                    on_event(Event::Restarted {
                        stage: s.index,
                        restarts: r,
                    });
                }
            } else {
                // Iteration lines still in flight come before the end.
                tokio::time::sleep(Duration::from_millis(200)).await;
                while let Ok(e) = logs.try_recv() {
                    on_event(e);
                }
                return Ok(status);
            }
            tokio::select! {
                ev = stream.try_next() => match ev? {
                    Some(WatchEvent::Added(o)) | Some(WatchEvent::Modified(o)) => {
                        status = status_of(kind, &serde_json::to_value(&o)?);
                    }
                    Some(WatchEvent::Deleted(_)) => {
                        anyhow::bail!("{} was deleted while the stage ran (cancelled, or removed by hand)", s.object)
                    }
                    Some(WatchEvent::Bookmark(_)) => {}
                    Some(WatchEvent::Error(e)) if e.code == 410 => break,
                    Some(WatchEvent::Error(e)) => anyhow::bail!("watching {}: {}", s.object, e.message),
                    None => break,
                },
                Some(e) = logs.recv() => on_event(e),
            }
        }
    }
}

/// The pod whose log has the iteration lines: Megatron prints them on the last rank, which is
/// on the last node.
fn last_rank_selector(plan: &Plan, s: &StagePlan) -> String {
    let mut sel = format!(
        "jobset.sigs.k8s.io/jobset-name={},jobset.sigs.k8s.io/replicatedjob-name=node",
        s.object
    );
    if plan.cluster.parallel.nodes > 1 {
        sel.push_str(&format!(
            ",batch.kubernetes.io/job-completion-index={}",
            plan.cluster.parallel.nodes - 1
        ));
    }
    sel
}

/// Follows the last rank's log through pod restarts; every iteration is reported once.
async fn tail_logs(
    client: Client,
    plan: Plan,
    s: StagePlan,
    tx: tokio::sync::mpsc::UnboundedSender<Event>,
) {
    let pods: Api<Pod> = Api::namespaced(client, &plan.cluster.namespace);
    let selector = last_rank_selector(&plan, &s);
    let offset = s.step_end - s.train_iters;
    let mut last = 0u64;
    let mut tailed: Vec<String> = Vec::new();
    loop {
        let list = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        let next = list.into_iter().find(|p| {
            let uid = p.metadata.uid.clone().unwrap_or_default();
            let phase = p.status.as_ref().and_then(|st| st.phase.clone());
            !tailed.contains(&uid) && phase.is_some_and(|ph| ph != "Pending")
        });
        let Some(pod) = next else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        tailed.push(pod.metadata.uid.clone().unwrap_or_default());
        let name = pod.metadata.name.clone().unwrap_or_default();
        let lp = LogParams {
            follow: true,
            container: Some("node".into()),
            ..Default::default()
        };
        let Ok(reader) = pods.log_stream(&name, &lp).await else {
            continue;
        };
        let mut lines = reader.lines();
        while let Some(Ok(line)) = lines.next().await {
            if let Some(it) = logs::parse(&line)
                && it.iteration > last
            {
                last = it.iteration;
                let _ = tx.send(Event::Iteration {
                    stage: s.index,
                    step: offset + it.iteration,
                    it,
                });
            }
        }
    }
}

/// Deletes everything a job created (its stage objects, their pods by cascade, and the
/// ConfigMap); what is already gone is fine.
pub async fn cancel(
    client: &Client,
    namespace: &str,
    kind: ObjectKind,
    job_id: &str,
) -> anyhow::Result<usize> {
    let sel = render::job_selector(job_id);
    let lp = ListParams::default().labels(&sel);
    let dp = DeleteParams::foreground();
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource(kind));
    let mut n = 0;
    for o in api.list(&lp).await?.items {
        let name = o.metadata.name.unwrap_or_default();
        match api.delete(&name, &dp).await {
            Ok(_) => n += 1,
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    for o in cms.list(&lp).await?.items {
        let name = o.metadata.name.unwrap_or_default();
        match cms.delete(&name, &DeleteParams::default()).await {
            Ok(_) => n += 1,
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(n)
}

/// The plans of jobs this trainer started that have not finished (found by label), for a
/// restarted trainer to follow again.
pub async fn owned_plans(client: &Client, namespace: &str) -> anyhow::Result<Vec<Plan>> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let lp = ListParams::default().labels(&format!(
        "app.kubernetes.io/managed-by={}",
        render::MANAGED_BY
    ));
    let mut plans = Vec::new();
    for cm in cms.list(&lp).await?.items {
        let name = cm.metadata.name.clone().unwrap_or_default();
        if annotation(&cm, FAILED_ANNOTATION).is_some() {
            continue;
        }
        let Some(text) = cm.data.as_ref().and_then(|d| d.get("plan.json")) else {
            tracing::warn!(configmap = %name, "a trainer ConfigMap without plan.json; skipped");
            continue;
        };
        let plan: Plan =
            serde_json::from_str(text).with_context(|| format!("ConfigMap {name}: plan.json"))?;
        let done: usize = annotation(&cm, COMPLETED_ANNOTATION)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if done < plan.stages.len() {
            plans.push(plan);
        }
    }
    Ok(plans)
}
