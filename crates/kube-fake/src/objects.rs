//! Any namespaced resource (ConfigMaps, custom resources such as JobSets and TrainJobs): get,
//! list with label / field selectors, watch, create, server-side apply, JSON merge patch,
//! delete; pod logs (followed); and the controllers of JobSets and TrainJobs, whose pods are
//! *scripted*: they run nothing, a test writes their log ([`FakeCluster::append_log`]) and ends
//! them ([`FakeCluster::finish_pod`]), and the controllers move the objects' status the way
//! the JobSet and Kubeflow Trainer controllers do (conditions, restarts, replicated job counts).
use super::{
    FakeCluster, Resp, State, Store, admit, full, json_response, not_found, now_rfc3339,
    query_param, selector_matches, status,
};
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

/// A change, as a watch reports it.
#[derive(Debug, Clone)]
pub(crate) struct Change {
    pub resource: String,
    pub ns: String,
    pub kind: &'static str,
    pub object: Value,
}

const JOBSETS: &str = "jobset.x-k8s.io/jobsets";
const TRAINJOBS: &str = "trainer.kubeflow.org/trainjobs";
const JOBSET_LABEL: &str = "jobset.sigs.k8s.io/jobset-name";
const RJOB_LABEL: &str = "jobset.sigs.k8s.io/replicatedjob-name";
const RESTART_LABEL: &str = "jobset.sigs.k8s.io/restart-attempt";

fn kind_of(resource: &str) -> &str {
    match resource.rsplit('/').next().unwrap_or_default() {
        "configmaps" => "ConfigMap",
        "secrets" => "Secret",
        "jobsets" => "JobSet",
        "trainjobs" => "TrainJob",
        "clustertrainingruntimes" => "ClusterTrainingRuntime",
        "trainingruntimes" => "TrainingRuntime",
        _ => "Object",
    }
}

fn emit(st: &State, resource: &str, ns: &str, kind: &'static str, object: &Value) {
    let _ = st.changes.send(Change {
        resource: resource.to_string(),
        ns: ns.to_string(),
        kind,
        object: object.clone(),
    });
}

fn field_matches(selector: &str, obj: &Value) -> bool {
    selector
        .split(',')
        .filter(|t| !t.is_empty())
        .all(|t| match t.split_once('=') {
            Some(("metadata.name", v)) => obj["metadata"]["name"] == v.trim_start_matches('='),
            Some(("metadata.namespace", v)) => {
                obj["metadata"]["namespace"] == v.trim_start_matches('=')
            }
            _ => true,
        })
}

/// JSON merge patch (RFC 7386).
fn merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

/// Serves `resource` (`v1/configmaps`, `{group}/{plural}`) in namespace `ns`; `rest` is the
/// path after the plural (`[]`, `[name]` or `[name, "status"]`).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve(
    st: Arc<State>,
    method: Method,
    resource: String,
    ns: &str,
    rest: &[&str],
    query: &str,
    content_type: &str,
    body: Option<Value>,
) -> Resp {
    let watching = query_param(query, "watch")
        .first()
        .is_some_and(|w| w == "true" || w == "1");
    match (method, rest) {
        (Method::GET, []) if watching => watch(st, resource, ns.to_string(), query),
        (Method::GET, []) => {
            let labels = query_param(query, "labelSelector").join(",");
            let fields = query_param(query, "fieldSelector").join(",");
            let s = st.store.lock().unwrap();
            let items: Vec<Value> = s
                .objects
                .iter()
                .filter(|((r, n, _), o)| {
                    *r == resource
                        && n == ns
                        && selector_matches(&labels, &o["metadata"]["labels"])
                        && field_matches(&fields, o)
                })
                .map(|(_, o)| o.clone())
                .collect();
            let api = items
                .first()
                .and_then(|o| o["apiVersion"].as_str())
                .unwrap_or("v1")
                .to_string();
            json_response(
                StatusCode::OK,
                &json!({
                    "kind": format!("{}List", kind_of(&resource)),
                    "apiVersion": api,
                    "metadata": {"resourceVersion": s.resource_version.to_string()},
                    "items": items,
                }),
            )
        }
        (Method::GET, [name] | [name, "status"]) => {
            let s = st.store.lock().unwrap();
            match s
                .objects
                .get(&(resource.clone(), ns.to_string(), name.to_string()))
            {
                Some(o) => json_response(StatusCode::OK, o),
                None => not_found(&plural(&resource), name),
            }
        }
        (Method::POST, []) => {
            let Some(obj) = body else {
                return bad("no body");
            };
            let name = obj["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let created = {
                let mut s = st.store.lock().unwrap();
                let key = (resource.clone(), ns.to_string(), name.clone());
                if s.objects.contains_key(&key) {
                    return status(
                        StatusCode::CONFLICT,
                        "AlreadyExists",
                        format!("{} \"{name}\" already exists", plural(&resource)),
                        json!({"name": name, "kind": plural(&resource)}),
                    );
                }
                insert(&st, &mut s, &resource, ns, obj)
            };
            reconcile(&st, &resource, ns, &name);
            json_response(StatusCode::CREATED, &created)
        }
        (Method::PATCH, [name] | [name, "status"]) => {
            let Some(patch) = body else {
                return bad("no body");
            };
            let apply = content_type.starts_with("application/apply-patch");
            let (code, obj) = {
                let mut s = st.store.lock().unwrap();
                let key = (resource.clone(), ns.to_string(), name.to_string());
                match s.objects.get(&key).cloned() {
                    None if apply => (
                        StatusCode::CREATED,
                        insert(&st, &mut s, &resource, ns, patch),
                    ),
                    None => return not_found(&plural(&resource), name),
                    Some(mut o) => {
                        let keep = o["metadata"].clone();
                        merge(&mut o, &patch);
                        for k in ["uid", "creationTimestamp", "namespace", "name"] {
                            o["metadata"][k] = keep[k].clone();
                        }
                        s.resource_version += 1;
                        o["metadata"]["resourceVersion"] = json!(s.resource_version.to_string());
                        s.objects.insert(key, o.clone());
                        emit(&st, &resource, ns, "MODIFIED", &o);
                        (StatusCode::OK, o)
                    }
                }
            };
            reconcile(&st, &resource, ns, name);
            json_response(code, &obj)
        }
        (Method::DELETE, [name]) => {
            let removed = {
                let mut s = st.store.lock().unwrap();
                delete_object(&st, &mut s, &resource, ns, name)
            };
            match removed {
                Some(o) => json_response(StatusCode::OK, &o),
                None => not_found(&plural(&resource), name),
            }
        }
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource".into(),
            json!({}),
        ),
    }
}

fn plural(resource: &str) -> String {
    match resource.split_once('/') {
        Some(("v1", p)) => p.to_string(),
        Some((g, p)) => format!("{p}.{g}"),
        None => resource.to_string(),
    }
}

fn bad(msg: &str) -> Resp {
    status(StatusCode::BAD_REQUEST, "BadRequest", msg.into(), json!({}))
}

fn insert(st: &State, s: &mut Store, resource: &str, ns: &str, mut obj: Value) -> Value {
    admit(st, s, ns, &mut obj);
    obj["metadata"]["generation"] = json!(1);
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    s.objects
        .insert((resource.to_string(), ns.to_string(), name), obj.clone());
    emit(st, resource, ns, "ADDED", &obj);
    obj
}

/// Removes an object and, as the garbage collector does, what it owns (a JobSet's pods, a
/// TrainJob's JobSet).
fn delete_object(st: &State, s: &mut Store, resource: &str, ns: &str, name: &str) -> Option<Value> {
    let mut o = s
        .objects
        .remove(&(resource.to_string(), ns.to_string(), name.to_string()))?;
    s.resource_version += 1;
    o["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
    o["metadata"]["resourceVersion"] = json!(s.resource_version.to_string());
    emit(st, resource, ns, "DELETED", &o);
    match resource {
        JOBSETS => s
            .pods
            .retain(|(n, _), p| !(n == ns && p["metadata"]["labels"][JOBSET_LABEL] == name)),
        TRAINJOBS => {
            delete_object(st, s, JOBSETS, ns, name);
        }
        _ => {}
    }
    Some(o)
}

/// A watch: the matching objects changed after `resourceVersion`, then every change, as JSON
/// lines, until `timeoutSeconds`.
fn watch(st: Arc<State>, resource: String, ns: String, query: &str) -> Resp {
    let labels = query_param(query, "labelSelector").join(",");
    let fields = query_param(query, "fieldSelector").join(",");
    let since: u64 = query_param(query, "resourceVersion")
        .first()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout: u64 = query_param(query, "timeoutSeconds")
        .first()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let mut rx = st.changes.subscribe();
    let matches = {
        let (labels, fields) = (labels.clone(), fields.clone());
        move |o: &Value| {
            selector_matches(&labels, &o["metadata"]["labels"]) && field_matches(&fields, o)
        }
    };
    let backlog: Vec<Value> = {
        let s = st.store.lock().unwrap();
        s.objects
            .iter()
            .filter(|((r, n, _), o)| {
                *r == resource
                    && *n == ns
                    && matches(o)
                    && o["metadata"]["resourceVersion"]
                        .as_str()
                        .and_then(|v| v.parse::<u64>().ok())
                        .is_some_and(|v| v > since)
            })
            .map(|(_, o)| json!({"type": if since == 0 { "ADDED" } else { "MODIFIED" }, "object": o}))
            .collect()
    };
    let (tx, body_rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        for e in backlog {
            if tx.send(Bytes::from(format!("{e}\n"))).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(Duration::from_secs(timeout));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                c = rx.recv() => match c {
                    Ok(c) if c.resource == resource && c.ns == ns && matches(&c.object) => {
                        let line = json!({"type": c.kind, "object": c.object});
                        if tx.send(Bytes::from(format!("{line}\n"))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "too old resource version", "reason": "Expired", "code": 410}});
                        let _ = tx.send(Bytes::from(format!("{gone}\n"))).await;
                        return;
                    }
                    Err(_) => return,
                },
            }
        }
    });
    let stream = tokio_stream_from(body_rx).map(|b| Ok::<_, Infallible>(Frame::data(b)));
    hyper::Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("response")
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Bytes>,
) -> impl futures::Stream<Item = Bytes> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// `GET …/pods/{name}/log`: the pod's log so far; with `follow=true`, then what is appended
/// until the pod ends or goes away.
pub(crate) fn pod_log(st: Arc<State>, ns: &str, name: &str, query: &str) -> Resp {
    let key = (ns.to_string(), name.to_string());
    if !st.store.lock().unwrap().pods.contains_key(&key) {
        return not_found("pods", name);
    }
    let follow = query_param(query, "follow")
        .first()
        .is_some_and(|v| v == "true" || v == "1");
    if !follow {
        let text = st
            .store
            .lock()
            .unwrap()
            .logs
            .get(&key)
            .cloned()
            .unwrap_or_default();
        return hyper::Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "text/plain")
            .body(full(Bytes::from(text)))
            .expect("response");
    }
    let (tx, body_rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let mut sent = 0;
        loop {
            let (chunk, ended) = {
                let s = st.store.lock().unwrap();
                let text = s.logs.get(&key).map(String::as_str).unwrap_or_default();
                let ended = s.pods.get(&key).is_none_or(|p| {
                    matches!(p["status"]["phase"].as_str(), Some("Succeeded" | "Failed"))
                });
                (text[sent..].to_string(), ended)
            };
            if !chunk.is_empty() {
                sent += chunk.len();
                if tx.send(Bytes::from(chunk)).await.is_err() {
                    return;
                }
            } else if ended {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let stream = tokio_stream_from(body_rx).map(|b| Ok::<_, Infallible>(Frame::data(b)));
    hyper::Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/plain")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("response")
}

/// Runs the controller of `resource` for one object.
fn reconcile(st: &State, resource: &str, ns: &str, name: &str) {
    let mut s = st.store.lock().unwrap();
    match resource {
        JOBSETS => reconcile_jobset(st, &mut s, ns, name),
        TRAINJOBS => reconcile_trainjob(st, &mut s, ns, name),
        _ => {}
    }
}

fn pod_phase(p: &Value) -> &str {
    p["status"]["phase"].as_str().unwrap_or("Pending")
}

fn condition(t: &str, reason: &str, message: &str) -> Value {
    json!({"type": t, "status": "True", "reason": reason, "message": message,
           "lastTransitionTime": now_rfc3339(), "observedGeneration": 1})
}

/// The JobSet controller: creates each replicated job's pods once its `dependsOn` is met,
/// restarts all of them (up to `failurePolicy.maxRestarts`) when one fails, and sets the
/// `Completed` / `Failed` conditions, `restarts` and `replicatedJobsStatus`.
fn reconcile_jobset(st: &State, s: &mut Store, ns: &str, name: &str) {
    let key = (JOBSETS.to_string(), ns.to_string(), name.to_string());
    let Some(js) = s.objects.get(&key).cloned() else {
        return;
    };
    if js["status"]["terminalState"].is_string() {
        return;
    }
    let restarts = js["status"]["restarts"].as_u64().unwrap_or(0);
    let rjobs = js["spec"]["replicatedJobs"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let pods_of = |s: &Store, rj: &str| -> Vec<Value> {
        s.pods
            .iter()
            .filter(|((n, _), p)| {
                let l = &p["metadata"]["labels"];
                n == ns
                    && l[JOBSET_LABEL] == name
                    && l[RJOB_LABEL] == rj
                    && l[RESTART_LABEL] == restarts.to_string().as_str()
            })
            .map(|(_, p)| p.clone())
            .collect()
    };
    let complete = |s: &Store, rj: &Value| {
        let want = rj["replicas"].as_u64().unwrap_or(1)
            * rj["template"]["spec"]["completions"].as_u64().unwrap_or(1);
        let pods = pods_of(s, rj["name"].as_str().unwrap_or_default());
        pods.len() as u64 == want && pods.iter().all(|p| pod_phase(p) == "Succeeded")
    };
    let mut statuses = Vec::new();
    let mut failed = false;
    for rj in &rjobs {
        let rname = rj["name"].as_str().unwrap_or_default();
        let mut pods = pods_of(s, rname);
        if pods.is_empty() {
            let ready = rj["dependsOn"].as_array().is_none_or(|deps| {
                deps.iter().all(|d| {
                    rjobs
                        .iter()
                        .find(|r| r["name"] == d["name"])
                        .is_some_and(|r| complete(s, r))
                })
            });
            if ready {
                create_pods(st, s, ns, &js, rj, restarts);
                pods = pods_of(s, rname);
            }
        }
        let count = |ph: &str| pods.iter().filter(|p| pod_phase(p) == ph).count();
        failed |= count("Failed") > 0;
        let done = complete(s, rj);
        statuses.push(json!({
            "name": rname,
            "ready": if !done && !pods.is_empty() && count("Running") == pods.len() { 1 } else { 0 },
            "succeeded": u8::from(done),
            "failed": u8::from(count("Failed") > 0),
            "active": u8::from(!done && count("Failed") == 0 && !pods.is_empty()),
            "suspended": 0,
        }));
    }
    let max = js["spec"]["failurePolicy"]["maxRestarts"]
        .as_u64()
        .unwrap_or(0);
    let mut status = js["status"].clone();
    if !status.is_object() {
        status = json!({});
    }
    status["restarts"] = json!(restarts);
    status["replicatedJobsStatus"] = json!(statuses);
    if failed && restarts < max {
        // RestartJobSet: every job (and pod) of this attempt is recreated.
        s.pods
            .retain(|(n, _), p| !(n == ns && p["metadata"]["labels"][JOBSET_LABEL] == name));
        status["restarts"] = json!(restarts + 1);
        status["restartsCountTowardsMax"] = json!(restarts + 1);
        update_status(st, s, &key, status);
        return reconcile_jobset(st, s, ns, name);
    }
    if failed {
        let (reason, msg) = if max > 0 {
            (
                "ReachedMaxRestarts",
                "jobset failed due to reaching max number of restarts",
            )
        } else {
            (
                "FailedJobs",
                "jobset failed due to one or more job failures",
            )
        };
        status["conditions"] = json!([condition("Failed", reason, msg)]);
        status["terminalState"] = json!("Failed");
    } else if rjobs.iter().all(|rj| complete(s, rj)) {
        status["conditions"] = json!([condition(
            "Completed",
            "AllJobsCompleted",
            "jobset completed successfully"
        )]);
        status["terminalState"] = json!("Completed");
    }
    update_status(st, s, &key, status);
    // A TrainJob follows its JobSet.
    let tj = (TRAINJOBS.to_string(), ns.to_string(), name.to_string());
    if s.objects.contains_key(&tj) {
        reconcile_trainjob(st, s, ns, name);
    }
}

fn update_status(st: &State, s: &mut Store, key: &(String, String, String), status: Value) {
    s.resource_version += 1;
    let rv = s.resource_version.to_string();
    if let Some(o) = s.objects.get_mut(key) {
        if o["status"] == status {
            return;
        }
        o["status"] = status;
        o["metadata"]["resourceVersion"] = json!(rv);
        let o = o.clone();
        emit(st, &key.0, &key.1, "MODIFIED", &o);
    }
}

/// The pods of one replicated job: `{jobset}-{rjob}-{job}-{index}-{suffix}`, labelled as the
/// JobSet and Job controllers label them, Running on the fake node.
fn create_pods(st: &State, s: &mut Store, ns: &str, js: &Value, rj: &Value, restart: u64) {
    let name = js["metadata"]["name"].as_str().unwrap_or_default();
    let rname = rj["name"].as_str().unwrap_or_default();
    let spec = &rj["template"]["spec"];
    let pods = spec["parallelism"].as_u64().unwrap_or(1);
    for job in 0..rj["replicas"].as_u64().unwrap_or(1) {
        for idx in 0..pods {
            let host = format!("{name}-{rname}-{job}-{idx}");
            let suffix = &uuid::Uuid::new_v4().simple().to_string()[..5];
            let mut pod = json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": spec["template"]["metadata"].clone(),
                "spec": spec["template"]["spec"].clone(),
            });
            pod["metadata"]["name"] = json!(format!("{host}-{suffix}"));
            let labels = &mut pod["metadata"]["labels"];
            if !labels.is_object() {
                *labels = json!({});
            }
            labels[JOBSET_LABEL] = json!(name);
            labels[RJOB_LABEL] = json!(rname);
            labels["jobset.sigs.k8s.io/job-index"] = json!(job.to_string());
            labels[RESTART_LABEL] = json!(restart.to_string());
            labels["batch.kubernetes.io/job-completion-index"] = json!(idx.to_string());
            labels["batch.kubernetes.io/job-name"] = json!(format!("{name}-{rname}-{job}"));
            pod["spec"]["hostname"] = json!(host);
            pod["spec"]["subdomain"] = json!(name);
            pod["spec"]["nodeName"] = json!(st.cfg.node_name);
            admit(st, s, ns, &mut pod);
            let now = now_rfc3339();
            let c = &pod["spec"]["containers"][0];
            pod["status"] = json!({
                "phase": "Running",
                "conditions": [
                    {"type": "Initialized", "status": "True", "lastProbeTime": null, "lastTransitionTime": now},
                    {"type": "Ready", "status": "True", "lastProbeTime": null, "lastTransitionTime": now},
                    {"type": "ContainersReady", "status": "True", "lastProbeTime": null, "lastTransitionTime": now},
                    {"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": now},
                ],
                "hostIP": "10.0.0.10",
                "podIP": format!("10.244.0.{}", 20 + idx),
                "startTime": now,
                "containerStatuses": [{
                    "name": c["name"], "image": c["image"], "imageID": "", "ready": true,
                    "started": true, "restartCount": 0, "lastState": {},
                    "containerID": format!("containerd://{}", uuid::Uuid::new_v4().simple()),
                    "state": {"running": {"startedAt": now}},
                }],
            });
            let pname = pod["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            s.pods.insert((ns.to_string(), pname), pod);
        }
    }
}

/// The Kubeflow Trainer controller: a TrainJob gets a JobSet of the same name with one `node`
/// replicated job (numNodes pods, the `PET_*` variables of the torch runtime, the
/// runtimePatches' pod settings); its status mirrors the JobSet's (`Complete` / `Failed`,
/// `jobsStatus`).
fn reconcile_trainjob(st: &State, s: &mut Store, ns: &str, name: &str) {
    let key = (TRAINJOBS.to_string(), ns.to_string(), name.to_string());
    let Some(tj) = s.objects.get(&key).cloned() else {
        return;
    };
    let jskey = (JOBSETS.to_string(), ns.to_string(), name.to_string());
    if !s.objects.contains_key(&jskey) {
        let js = trainjob_jobset(s, &tj);
        insert(st, s, JOBSETS, ns, js);
        return reconcile_jobset(st, s, ns, name);
    }
    let js = s.objects[&jskey].clone();
    let mut status = json!({
        "jobsStatus": js["status"]["replicatedJobsStatus"].clone(),
        "conditions": tj["status"]["conditions"].clone(),
    });
    if !status["conditions"].is_array() {
        status["conditions"] = json!([]);
    }
    for c in js["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        let t = match c["type"].as_str() {
            Some("Completed") => "Complete",
            Some("Failed") => "Failed",
            _ => continue,
        };
        let mut c = c.clone();
        c["type"] = json!(t);
        if let Some(a) = status["conditions"].as_array_mut()
            && !a.iter().any(|x| x["type"] == t)
        {
            a.push(c);
        }
    }
    update_status(st, s, &key, status);
}

fn trainjob_jobset(s: &Store, tj: &Value) -> Value {
    let name = tj["metadata"]["name"].as_str().unwrap_or_default();
    let t = &tj["spec"]["trainer"];
    let nodes = t["numNodes"].as_u64().unwrap_or(1);
    let runtime = tj["spec"]["runtimeRef"]["name"]
        .as_str()
        .unwrap_or_default();
    let rt = s
        .objects
        .iter()
        .find(|((r, _, n), _)| r == "trainer.kubeflow.org/clustertrainingruntimes" && n == runtime)
        .map(|(_, o)| o.clone());
    let mut env = t["env"].as_array().cloned().unwrap_or_default();
    for (k, v) in [
        ("PET_NNODES", nodes.to_string()),
        (
            "PET_NPROC_PER_NODE",
            t["numProcPerNode"].as_u64().unwrap_or(1).to_string(),
        ),
        ("PET_MASTER_ADDR", format!("{name}-node-0-0.{name}")),
        ("PET_MASTER_PORT", "29400".into()),
    ] {
        env.push(json!({"name": k, "value": v}));
    }
    env.push(json!({"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}}));
    let patch = &tj["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"];
    let pod_patch = &patch["spec"]["replicatedJobs"][0]["template"]["spec"]["template"];
    let mut pod_spec = pod_patch["spec"].clone();
    if !pod_spec.is_object() {
        pod_spec = json!({});
    }
    let mounts = pod_spec["containers"][0]["volumeMounts"].clone();
    pod_spec["containers"] = json!([{
        "name": "node", "image": t["image"], "command": t["command"], "args": t["args"],
        "env": env, "resources": t["resourcesPerNode"], "volumeMounts": mounts,
    }]);
    pod_spec["restartPolicy"] = json!("OnFailure");
    json!({
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {
            "name": name,
            "labels": patch["metadata"]["labels"].clone(),
            "ownerReferences": [{"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob", "name": name, "uid": tj["metadata"]["uid"], "controller": true, "blockOwnerDeletion": true}],
        },
        "spec": {
            "failurePolicy": rt.map(|r| r["spec"]["template"]["spec"]["failurePolicy"].clone()).unwrap_or(Value::Null),
            "replicatedJobs": [{
                "name": "node",
                "replicas": 1,
                "template": {"spec": {
                    "parallelism": nodes, "completions": nodes, "completionMode": "Indexed",
                    "template": {"metadata": {"labels": pod_patch["metadata"]["labels"].clone()}, "spec": pod_spec},
                }},
            }],
        },
    })
}

impl FakeCluster {
    /// Appends to a pod's log (what its container printed).
    pub fn append_log(&self, ns: &str, pod: &str, text: &str) {
        let mut s = self.state.store.lock().unwrap();
        s.logs
            .entry((ns.to_string(), pod.to_string()))
            .or_default()
            .push_str(text);
    }

    /// Ends a scripted pod's container with `exit_code` (phase Succeeded for 0, else Failed)
    /// and lets its JobSet's controller react.
    pub fn finish_pod(&self, ns: &str, pod: &str, exit_code: i32) {
        let st = &self.state;
        let jobset = {
            let mut s = st.store.lock().unwrap();
            s.resource_version += 1;
            let rv = s.resource_version.to_string();
            let Some(p) = s.pods.get_mut(&(ns.to_string(), pod.to_string())) else {
                return;
            };
            let now = now_rfc3339();
            let started = p["status"]["startTime"].clone();
            p["status"]["phase"] = json!(if exit_code == 0 {
                "Succeeded"
            } else {
                "Failed"
            });
            p["status"]["containerStatuses"][0]["ready"] = json!(false);
            p["status"]["containerStatuses"][0]["started"] = json!(false);
            p["status"]["containerStatuses"][0]["state"] = json!({"terminated": {
                "exitCode": exit_code,
                "reason": if exit_code == 0 { "Completed" } else { "Error" },
                "startedAt": started, "finishedAt": now,
                "containerID": p["status"]["containerStatuses"][0]["containerID"],
            }});
            p["metadata"]["resourceVersion"] = json!(rv);
            p["metadata"]["labels"][JOBSET_LABEL]
                .as_str()
                .map(str::to_string)
        };
        if let Some(js) = jobset {
            let mut s = st.store.lock().unwrap();
            reconcile_jobset(st, &mut s, ns, &js);
        }
    }

    /// The objects of `resource` (`v1/configmaps`, `jobset.x-k8s.io/jobsets`, …) held now.
    pub fn objects(&self, resource: &str) -> Vec<Value> {
        let s = self.state.store.lock().unwrap();
        s.objects
            .iter()
            .filter(|((r, _, _), _)| r == resource)
            .map(|(_, o)| o.clone())
            .collect()
    }
}
