//! A local Kubernetes API server for tests: the REST API for Pods and NetworkPolicies
//! (create, get, list with label selectors, delete) and the Pod `exec` subresource over
//! WebSocket (`v5.channel.k8s.io` / `v4.channel.k8s.io`), with payloads shaped like a real
//! API server's (Pod status with conditions and containerStatuses, `Status` errors with
//! reason and code). No kube-apiserver, kind or envtest can be had on the build machines.
//!
//! Its "node" runs each pod's first container as a Docker container (the image must be on
//! the engine: nothing is pulled, as on an air-gapped node), so exec runs real processes:
//! the node's `podPidsLimit` becomes the container's pids limit, pods selected by a
//! NetworkPolicy that denies egress get no network, and `shareProcessNamespace` gets an init
//! that reaps orphans (as the pause container does).
//!
//! Any other namespaced resource (ConfigMaps, JobSets, TrainJobs, …) is served generically —
//! get, list, watch, create, server-side apply, merge patch, delete — with controllers for
//! JobSets and TrainJobs whose pods are scripted by the test (see [`objects`]); pod logs are
//! served (and followed) from what the test appends.
//!
//! Every request is recorded ([`FakeCluster::requests`]) so tests can check what a client
//! sent, e.g. validate the Pod manifests against the Kubernetes schema.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

mod objects;

use bollard::Docker;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, HostConfig};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

/// Label the fake puts on its Docker containers, to find and remove them.
pub const NODE_LABEL: &str = "davinci.dev/kube-fake";

/// Settings of the fake cluster.
#[derive(Debug, Clone)]
pub struct FakeConfig {
    /// Name of the one node.
    pub node_name: String,
    /// The kubelet's `podPidsLimit` (`None`: unlimited).
    pub pod_pids_limit: Option<i64>,
    /// Kubernetes version reported by `/version`.
    pub git_version: String,
}

impl Default for FakeConfig {
    fn default() -> Self {
        FakeConfig {
            node_name: format!(
                "fake-node-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
            pod_pids_limit: Some(1024),
            git_version: "v1.33.2".into(),
        }
    }
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: Option<Value>,
}

#[derive(Default)]
struct Store {
    /// (namespace, name) → object.
    pods: BTreeMap<(String, String), Value>,
    policies: BTreeMap<(String, String), Value>,
    /// (namespace, name) → docker container id.
    containers: HashMap<(String, String), String>,
    /// (resource, namespace, name) → object, for every resource served generically.
    objects: BTreeMap<(String, String, String), Value>,
    /// (namespace, pod) → what its container printed.
    logs: HashMap<(String, String), String>,
    resource_version: u64,
    requests: Vec<Recorded>,
}

struct State {
    cfg: FakeConfig,
    docker: Docker,
    store: Mutex<Store>,
    /// Every change of a generically served object, for watches.
    changes: tokio::sync::broadcast::Sender<objects::Change>,
}

/// A running fake API server.
pub struct FakeCluster {
    addr: SocketAddr,
    state: Arc<State>,
    server: tokio::task::JoinHandle<()>,
}

impl FakeCluster {
    /// Starts the server on a free loopback port, with its node on the given Docker Engine.
    pub async fn start(cfg: FakeConfig, docker: Docker) -> std::io::Result<FakeCluster> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            cfg,
            docker,
            store: Mutex::new(Store::default()),
            changes: tokio::sync::broadcast::channel(1024).0,
        });
        let st = state.clone();
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(handle(st, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Ok(FakeCluster {
            addr,
            state,
            server,
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.store.lock().unwrap().requests.clone()
    }

    /// The pods the server holds now.
    pub fn pods(&self) -> Vec<Value> {
        self.state
            .store
            .lock()
            .unwrap()
            .pods
            .values()
            .cloned()
            .collect()
    }

    /// Marks a pod's containers as gone and its phase Failed, as a node does when it loses a
    /// pod (for tests of what clients do then).
    pub fn set_pod_phase(&self, ns: &str, name: &str, phase: &str) {
        let mut s = self.state.store.lock().unwrap();
        s.resource_version += 1;
        let rv = s.resource_version.to_string();
        if let Some(p) = s.pods.get_mut(&(ns.to_string(), name.to_string())) {
            p["status"]["phase"] = json!(phase);
            p["metadata"]["resourceVersion"] = json!(rv);
        }
    }

    /// Stops the server and removes every container its node made.
    pub async fn shutdown(self) {
        self.server.abort();
        remove_node_containers(&self.state.docker, &self.state.cfg.node_name).await;
    }
}

/// Removes the containers of the fake node `node` on this engine.
pub async fn remove_node_containers(docker: &Docker, node: &str) {
    let filters = HashMap::from([("label".to_string(), vec![format!("{NODE_LABEL}={node}")])]);
    let opts = bollard::query_parameters::ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    if let Ok(list) = docker.list_containers(Some(opts)).await {
        for c in list {
            if let Some(id) = c.id {
                let _ = docker
                    .remove_container(
                        &id,
                        Some(
                            bollard::query_parameters::RemoveContainerOptionsBuilder::default()
                                .force(true)
                                .build(),
                        ),
                    )
                    .await;
            }
        }
    }
}

type Resp = Response<BoxBody<Bytes, Infallible>>;

fn full(b: Bytes) -> BoxBody<Bytes, Infallible> {
    Full::new(b).boxed()
}

fn json_response(code: StatusCode, v: &Value) -> Resp {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(full(Bytes::from(v.to_string())))
        .expect("response")
}

/// A `Status` as the API server sends it with an error.
fn status(code: StatusCode, reason: &str, message: String, details: Value) -> Resp {
    json_response(
        code,
        &json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "details": details,
            "code": code.as_u16(),
        }),
    )
}

fn not_found(kind: &str, name: &str) -> Resp {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("{kind} \"{name}\" not found"),
        json!({"name": name, "kind": kind}),
    )
}

fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = secs / 86400;
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719468;
    let era = z.div_euclid(146097);
    let doe = z.rem_euclid(146097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

fn query_param(query: &str, key: &str) -> Vec<String> {
    url::form_urlencoded::parse(query.as_bytes())
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
        .collect()
}

/// Whether `labels` match a label selector of `k=v`, `k!=v`, `k` terms (comma separated).
fn selector_matches(selector: &str, labels: &Value) -> bool {
    selector
        .split(',')
        .filter(|t| !t.trim().is_empty())
        .all(|term| {
            let term = term.trim();
            if let Some((k, v)) = term.split_once("!=") {
                labels.get(k).and_then(Value::as_str) != Some(v)
            } else if let Some((k, v)) = term.split_once('=') {
                let v = v.trim_start_matches('=');
                labels.get(k).and_then(Value::as_str) == Some(v)
            } else {
                labels.get(term).is_some()
            }
        })
}

async fn handle(st: Arc<State>, req: Request<Incoming>) -> Resp {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let is_ws = req
        .headers()
        .get(hyper::header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let parts: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .map(|s| {
            url::form_urlencoded::parse(s.as_bytes())
                .map(|(k, _)| k.into_owned())
                .next()
                .unwrap_or_default()
        })
        .collect();
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    if is_ws {
        st.store.lock().unwrap().requests.push(Recorded {
            method: method.to_string(),
            path: path.clone(),
            query: query.clone(),
            body: None,
        });
        return match parts.as_slice() {
            ["api", "v1", "namespaces", ns, "pods", name, "exec"] => {
                exec(st, req, ns.to_string(), name.to_string(), &query).await
            }
            _ => not_found("resource", &path),
        };
    }
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                e.to_string(),
                json!({}),
            );
        }
    };
    let body_json: Option<Value> = if body.is_empty() {
        None
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => Some(v),
            Err(e) => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    format!("the request body is not JSON: {e}"),
                    json!({}),
                );
            }
        }
    };
    st.store.lock().unwrap().requests.push(Recorded {
        method: method.to_string(),
        path: path.clone(),
        query: query.clone(),
        body: body_json.clone(),
    });
    match (method, parts.as_slice()) {
        (Method::GET, ["version"]) => json_response(
            StatusCode::OK,
            &json!({
                "major": "1",
                "minor": st.cfg.git_version.trim_start_matches("v1.").split('.').next().unwrap_or("33"),
                "emulationMajor": "1",
                "emulationMinor": st.cfg.git_version.trim_start_matches("v1.").split('.').next().unwrap_or("33"),
                "minCompatibilityMajor": "1",
                "minCompatibilityMinor": "32",
                "gitVersion": st.cfg.git_version,
                "gitCommit": "6187c2b9ad0ed0e2ee1ef4c0a2e5ed4e0a0ad2b5",
                "gitTreeState": "clean",
                "buildDate": "2025-06-17T18:36:17Z",
                "goVersion": "go1.24.4",
                "compiler": "gc",
                "platform": "linux/amd64",
            }),
        ),
        (Method::POST, ["api", "v1", "namespaces", ns, "pods"]) => {
            create_pod(st, ns, body_json).await
        }
        (Method::GET, ["api", "v1", "namespaces", ns, "pods"]) => {
            let sel = query_param(&query, "labelSelector").join(",");
            let s = st.store.lock().unwrap();
            let items: Vec<Value> = s
                .pods
                .iter()
                .filter(|((n, _), p)| n == ns && selector_matches(&sel, &p["metadata"]["labels"]))
                .map(|(_, p)| p.clone())
                .collect();
            json_response(
                StatusCode::OK,
                &json!({
                    "kind": "PodList",
                    "apiVersion": "v1",
                    "metadata": {"resourceVersion": s.resource_version.to_string()},
                    "items": items,
                }),
            )
        }
        (Method::GET, ["api", "v1", "namespaces", ns, "pods", name]) => {
            let s = st.store.lock().unwrap();
            match s.pods.get(&(ns.to_string(), name.to_string())) {
                Some(p) => json_response(StatusCode::OK, p),
                None => not_found("pods", name),
            }
        }
        (Method::DELETE, ["api", "v1", "namespaces", ns, "pods", name]) => {
            delete_pod(st, ns, name).await
        }
        (Method::PATCH, ["api", "v1", "namespaces", ns, "pods", name]) => {
            patch_pod(&st, ns, name, &content_type, body_json)
        }
        (
            Method::POST,
            [
                "apis",
                "networking.k8s.io",
                "v1",
                "namespaces",
                ns,
                "networkpolicies",
            ],
        ) => create_policy(st, ns, body_json),
        (
            Method::GET,
            [
                "apis",
                "networking.k8s.io",
                "v1",
                "namespaces",
                ns,
                "networkpolicies",
                name,
            ],
        ) => {
            let s = st.store.lock().unwrap();
            match s.policies.get(&(ns.to_string(), name.to_string())) {
                Some(p) => json_response(StatusCode::OK, p),
                None => not_found("networkpolicies.networking.k8s.io", name),
            }
        }
        (Method::GET, ["api", "v1", "namespaces", ns, "pods", name, "log"]) => {
            objects::pod_log(st, ns, name, &query)
        }
        (m, ["api", "v1", "namespaces", ns, plural, rest @ ..]) if *plural != "pods" => {
            objects::serve(
                st.clone(),
                m,
                format!("v1/{plural}"),
                ns,
                rest,
                &query,
                &content_type,
                body_json,
            )
            .await
        }
        (m, ["apis", group, _version, "namespaces", ns, plural, rest @ ..]) => {
            objects::serve(
                st.clone(),
                m,
                format!("{group}/{plural}"),
                ns,
                rest,
                &query,
                &content_type,
                body_json,
            )
            .await
        }
        _ => not_found("resource", &path),
    }
}

fn invalid(kind: &str, name: &str, causes: Vec<(String, String)>) -> Resp {
    let msg = causes
        .iter()
        .map(|(f, m)| format!("{f}: {m}"))
        .collect::<Vec<_>>()
        .join(", ");
    status(
        StatusCode::UNPROCESSABLE_ENTITY,
        "Invalid",
        format!("{kind} \"{name}\" is invalid: [{msg}]"),
        json!({
            "name": name,
            "kind": kind,
            "causes": causes.iter().map(|(f, m)| json!({
                "reason": "FieldValueInvalid", "message": m, "field": f
            })).collect::<Vec<_>>(),
        }),
    )
}

/// Fills what the API server adds to an object it accepts.
fn admit(st: &State, s: &mut Store, ns: &str, obj: &mut Value) {
    s.resource_version += 1;
    let md = &mut obj["metadata"];
    md["namespace"] = json!(ns);
    md["uid"] = json!(uuid::Uuid::new_v4().to_string());
    md["resourceVersion"] = json!(s.resource_version.to_string());
    md["creationTimestamp"] = json!(now_rfc3339());
    let _ = st;
}

fn dns_label_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

async fn create_pod(st: Arc<State>, ns: &str, body: Option<Value>) -> Resp {
    let Some(mut pod) = body else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "no body".into(),
            json!({}),
        );
    };
    let name = pod["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut causes = Vec::new();
    if pod["kind"] != "Pod" || pod["apiVersion"] != "v1" {
        causes.push(("kind".into(), "must be v1 Pod".into()));
    }
    if !dns_label_ok(&name) {
        causes.push((
            "metadata.name".into(),
            format!("Invalid value: \"{name}\": a lowercase RFC 1123 label"),
        ));
    }
    let containers = pod["spec"]["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if containers.is_empty() {
        causes.push(("spec.containers".into(), "Required value".into()));
    }
    for (i, c) in containers.iter().enumerate() {
        if c["image"].as_str().unwrap_or_default().is_empty() {
            causes.push((
                format!("spec.containers[{i}].image"),
                "Required value".into(),
            ));
        }
    }
    if !causes.is_empty() {
        return invalid("Pod", &name, causes);
    }
    let key = (ns.to_string(), name.clone());
    {
        let mut s = st.store.lock().unwrap();
        if s.pods.contains_key(&key) {
            return status(
                StatusCode::CONFLICT,
                "AlreadyExists",
                format!("pods \"{name}\" already exists"),
                json!({"name": name, "kind": "pods"}),
            );
        }
        admit(&st, &mut s, ns, &mut pod);
        let spec = &mut pod["spec"];
        spec["nodeName"] = json!(st.cfg.node_name);
        if spec.get("restartPolicy").is_none() {
            spec["restartPolicy"] = json!("Always");
        }
        spec["schedulerName"] = json!("default-scheduler");
        spec["dnsPolicy"] = spec
            .get("dnsPolicy")
            .cloned()
            .unwrap_or(json!("ClusterFirst"));
        pod["status"] = json!({
            "phase": "Pending",
            "conditions": [{
                "type": "PodScheduled", "status": "True",
                "lastProbeTime": null, "lastTransitionTime": now_rfc3339(),
            }],
            "qosClass": qos_class(&containers),
        });
        s.pods.insert(key.clone(), pod.clone());
    }
    let st2 = st.clone();
    tokio::spawn(async move { run_pod(st2, key).await });
    json_response(StatusCode::CREATED, &pod)
}

fn qos_class(containers: &[Value]) -> &'static str {
    let r = &containers[0]["resources"];
    if r.get("limits").is_none() && r.get("requests").is_none() {
        "BestEffort"
    } else if r.get("requests").is_none() || r["requests"] == r["limits"] {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

/// Bytes of a Kubernetes quantity (`512Mi`, `4Gi`, `1G`, `1000`).
fn quantity_bytes(q: &str) -> Option<i64> {
    let units = [
        ("Ki", 1i64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    for (u, m) in units {
        if let Some(n) = q.strip_suffix(u) {
            return n.parse::<f64>().ok().map(|n| (n * m as f64) as i64);
        }
    }
    q.parse().ok()
}

/// CPUs of a Kubernetes quantity (`500m`, `2`).
fn quantity_cpus(q: &str) -> Option<f64> {
    match q.strip_suffix('m') {
        Some(n) => n.parse::<f64>().ok().map(|n| n / 1000.0),
        None => q.parse().ok(),
    }
}

/// Whether a NetworkPolicy in `ns` denies egress to a pod with these labels.
fn egress_denied(s: &Store, ns: &str, labels: &Value) -> bool {
    s.policies.iter().any(|((n, _), p)| {
        let spec = &p["spec"];
        let denies = spec["policyTypes"]
            .as_array()
            .is_some_and(|t| t.iter().any(|x| x == "Egress"))
            && spec["egress"].as_array().is_none_or(|e| e.is_empty());
        let sel = spec["podSelector"]["matchLabels"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        n == ns && denies && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
    })
}

/// The node's side: starts the pod's first container on Docker and reports it Running.
async fn run_pod(st: Arc<State>, key: (String, String)) {
    let (pod, deny) = {
        let s = st.store.lock().unwrap();
        let Some(p) = s.pods.get(&key).cloned() else {
            return;
        };
        let deny = egress_denied(&s, &key.0, &p["metadata"]["labels"]);
        (p, deny)
    };
    let c = &pod["spec"]["containers"][0];
    let image = c["image"].as_str().unwrap_or_default().to_string();
    let waiting =
        |reason: &str, message: String| json!({"waiting": {"reason": reason, "message": message}});
    let image_id = match st.docker.inspect_image(&image).await {
        Ok(i) => i
            .repo_digests
            .and_then(|d| d.first().map(|d| format!("docker-pullable://{d}")))
            .or(i.id.map(|id| format!("docker://{id}")))
            .unwrap_or_default(),
        Err(_) => {
            let never = c["imagePullPolicy"] == "Never";
            let (reason, msg) = if never {
                (
                    "ErrImageNeverPull",
                    format!("Container image \"{image}\" is not present with pull policy of Never"),
                )
            } else {
                (
                    "ErrImagePull",
                    format!(
                        "failed to pull and unpack image \"{image}\": no registry reachable from this node"
                    ),
                )
            };
            set_status(&st, &key, |status| {
                status["containerStatuses"] = json!([{
                    "name": c["name"], "image": image, "imageID": "", "ready": false,
                    "restartCount": 0, "started": false, "lastState": {},
                    "state": waiting(reason, msg.clone()),
                }]);
            });
            return;
        }
    };
    let limits = &c["resources"]["limits"];
    let mut argv: Vec<String> = c["command"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    argv.extend(
        c["args"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default(),
    );
    let sc = &c["securityContext"];
    let caps = |k: &str| -> Option<Vec<String>> {
        sc["capabilities"][k].as_array().map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
    };
    let mut security = Vec::new();
    if sc["allowPrivilegeEscalation"] == false {
        security.push("no-new-privileges".to_string());
    }
    let labels = HashMap::from([
        (NODE_LABEL.to_string(), st.cfg.node_name.clone()),
        ("io.kubernetes.pod.namespace".to_string(), key.0.clone()),
        ("io.kubernetes.pod.name".to_string(), key.1.clone()),
    ]);
    let body = ContainerCreateBody {
        image: Some(image.clone()),
        entrypoint: (!argv.is_empty()).then(|| argv[..1].to_vec()),
        cmd: (argv.len() > 1).then(|| argv[1..].to_vec()),
        working_dir: c["workingDir"].as_str().map(str::to_string),
        labels: Some(labels),
        host_config: Some(HostConfig {
            init: Some(pod["spec"]["shareProcessNamespace"] == true),
            // A pod whose container ends is gone from the node (its status stays here).
            auto_remove: Some(true),
            network_mode: Some(if deny { "none" } else { "bridge" }.to_string()),
            pids_limit: st.cfg.pod_pids_limit,
            memory: limits["memory"].as_str().and_then(quantity_bytes),
            nano_cpus: limits["cpu"]
                .as_str()
                .and_then(quantity_cpus)
                .map(|c| (c * 1e9) as i64),
            cap_drop: caps("drop"),
            cap_add: caps("add"),
            security_opt: Some(security),
            ..Default::default()
        }),
        ..Default::default()
    };
    let created = st
        .docker
        .create_container(
            None::<bollard::query_parameters::CreateContainerOptions>,
            body,
        )
        .await;
    let id = match created {
        Ok(c) => c.id,
        Err(e) => {
            set_status(&st, &key, |status| {
                status["containerStatuses"] = json!([{
                    "name": c["name"], "image": image, "imageID": image_id, "ready": false,
                    "restartCount": 0, "started": false, "lastState": {},
                    "state": waiting("CreateContainerError", e.to_string()),
                }]);
            });
            return;
        }
    };
    // The pod may have been deleted meanwhile.
    let still = {
        let mut s = st.store.lock().unwrap();
        let still = s.pods.contains_key(&key);
        if still {
            s.containers.insert(key.clone(), id.clone());
        }
        still
    };
    if !still || st.docker.start_container(&id, None).await.is_err() {
        let _ = st
            .docker
            .remove_container(
                &id,
                Some(
                    bollard::query_parameters::RemoveContainerOptionsBuilder::default()
                        .force(true)
                        .build(),
                ),
            )
            .await;
        return;
    }
    let now = now_rfc3339();
    set_status(&st, &key, |status| {
        let cond = |t: &str| json!({"type": t, "status": "True", "lastProbeTime": null, "lastTransitionTime": now});
        status["phase"] = json!("Running");
        status["conditions"] = json!([
            cond("Initialized"),
            cond("Ready"),
            cond("ContainersReady"),
            cond("PodScheduled")
        ]);
        status["hostIP"] = json!("10.0.0.10");
        status["podIP"] = json!("10.244.0.17");
        status["startTime"] = json!(now);
        status["containerStatuses"] = json!([{
            "name": c["name"], "image": image, "imageID": image_id,
            "containerID": format!("docker://{id}"), "ready": true, "started": true,
            "restartCount": 0, "lastState": {},
            "state": {"running": {"startedAt": now}},
        }]);
    });
}

fn set_status(st: &State, key: &(String, String), f: impl FnOnce(&mut Value)) {
    let mut s = st.store.lock().unwrap();
    s.resource_version += 1;
    let rv = s.resource_version.to_string();
    if let Some(p) = s.pods.get_mut(key) {
        f(&mut p["status"]);
        p["metadata"]["resourceVersion"] = json!(rv);
    }
}

async fn delete_pod(st: Arc<State>, ns: &str, name: &str) -> Resp {
    let key = (ns.to_string(), name.to_string());
    let (pod, container) = {
        let mut s = st.store.lock().unwrap();
        let Some(mut pod) = s.pods.remove(&key) else {
            return not_found("pods", name);
        };
        s.resource_version += 1;
        pod["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
        pod["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        pod["metadata"]["resourceVersion"] = json!(s.resource_version.to_string());
        (pod, s.containers.remove(&key))
    };
    if let Some(id) = container {
        let _ = st
            .docker
            .remove_container(
                &id,
                Some(
                    bollard::query_parameters::RemoveContainerOptionsBuilder::default()
                        .force(true)
                        .build(),
                ),
            )
            .await;
    }
    json_response(StatusCode::OK, &pod)
}

/// RFC 7386 JSON merge patch: objects merge key by key, `null` removes, anything else
/// replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().expect("made an object");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// `PATCH` of a pod with `application/merge-patch+json` (what `kubectl label` and kube-rs's
/// `Patch::Merge` send). As on a real API server, a pod's metadata may change but its spec
/// (beyond what this fake does not model) may not.
fn patch_pod(st: &State, ns: &str, name: &str, content_type: &str, body: Option<Value>) -> Resp {
    if content_type != "application/merge-patch+json" {
        return status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/merge-patch+json (got `{content_type}`)"
            ),
            json!({}),
        );
    }
    let Some(patch) = body else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the patch is empty".into(),
            json!({}),
        );
    };
    let key = (ns.to_string(), name.to_string());
    let mut s = st.store.lock().unwrap();
    let Some(pod) = s.pods.get(&key) else {
        return not_found("pods", name);
    };
    let mut patched = pod.clone();
    merge_patch(&mut patched, &patch);
    if patched["spec"] != pod["spec"] {
        return invalid(
            "Pod",
            name,
            vec![(
                "spec".into(),
                "Forbidden: pod updates may not change fields other than `spec.containers[*].image`, `spec.activeDeadlineSeconds` or `spec.tolerations` (only additions to existing tolerations)".into(),
            )],
        );
    }
    for (field, want) in [("name", name), ("namespace", ns)] {
        if patched["metadata"][field] != pod["metadata"][field] {
            return invalid(
                "Pod",
                name,
                vec![(
                    format!("metadata.{field}"),
                    format!("Invalid value: field is immutable (`{want}`)"),
                )],
            );
        }
    }
    s.resource_version += 1;
    patched["metadata"]["resourceVersion"] = json!(s.resource_version.to_string());
    s.pods.insert(key, patched.clone());
    json_response(StatusCode::OK, &patched)
}

fn create_policy(st: Arc<State>, ns: &str, body: Option<Value>) -> Resp {
    let Some(mut np) = body else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "no body".into(),
            json!({}),
        );
    };
    let name = np["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if np["kind"] != "NetworkPolicy" || np["spec"]["podSelector"].is_null() {
        return invalid(
            "NetworkPolicy",
            &name,
            vec![("spec.podSelector".into(), "Required value".into())],
        );
    }
    let mut s = st.store.lock().unwrap();
    let key = (ns.to_string(), name.clone());
    if s.policies.contains_key(&key) {
        return status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("networkpolicies.networking.k8s.io \"{name}\" already exists"),
            json!({"name": name, "group": "networking.k8s.io", "kind": "networkpolicies"}),
        );
    }
    admit(&st, &mut s, ns, &mut np);
    s.policies.insert(key, np.clone());
    json_response(StatusCode::CREATED, &np)
}

/// The exec subresource: a WebSocket on the channel protocol, the command run in the pod's
/// container; the last message on channel 3 is the `Status` with the exit code.
async fn exec(
    st: Arc<State>,
    req: Request<Incoming>,
    ns: String,
    name: String,
    query: &str,
) -> Resp {
    let command = query_param(query, "command");
    let want_stdin = query_param(query, "stdin")
        .first()
        .is_some_and(|v| v == "true");
    let container = {
        let s = st.store.lock().unwrap();
        s.containers.get(&(ns.clone(), name.clone())).cloned()
    };
    let Some(container) = container else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("pod {name} does not have a running container"),
            json!({}),
        );
    };
    if command.is_empty() {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "you must specify at least 1 command".into(),
            json!({}),
        );
    }
    let offered = req
        .headers()
        .get(hyper::header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let proto = ["v5.channel.k8s.io", "v4.channel.k8s.io"]
        .into_iter()
        .find(|p| offered.split(',').any(|o| o.trim() == *p));
    let Some(proto) = proto else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("no supported subprotocol in `{offered}` (v5/v4.channel.k8s.io)"),
            json!({}),
        );
    };
    let Some(key) = req.headers().get(hyper::header::SEC_WEBSOCKET_KEY) else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "no websocket key".into(),
            json!({}),
        );
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let v5 = proto.starts_with("v5");
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(req).await else {
            return;
        };
        let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        run_exec(st, ws, container, command, want_stdin, v5).await;
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(hyper::header::UPGRADE, "websocket")
        .header(hyper::header::CONNECTION, "Upgrade")
        .header(hyper::header::SEC_WEBSOCKET_ACCEPT, accept)
        .header(hyper::header::SEC_WEBSOCKET_PROTOCOL, proto)
        .body(full(Bytes::new()))
        .expect("response")
}

async fn run_exec<S>(
    st: Arc<State>,
    ws: tokio_tungstenite::WebSocketStream<S>,
    container: String,
    command: Vec<String>,
    want_stdin: bool,
    v5: bool,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut tx, mut rx) = ws.split();
    let frame = |ch: u8, data: &[u8]| {
        let mut v = Vec::with_capacity(data.len() + 1);
        v.push(ch);
        v.extend_from_slice(data);
        Message::Binary(v.into())
    };
    let ex = st
        .docker
        .create_exec(
            &container,
            CreateExecOptions {
                cmd: Some(command),
                attach_stdin: Some(want_stdin),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                ..Default::default()
            },
        )
        .await;
    let started = match ex {
        Ok(ex) => st.docker.start_exec(&ex.id, None).await.map(|s| (ex.id, s)),
        Err(e) => Err(e),
    };
    let (exec_id, output, input) = match started {
        Ok((id, StartExecResults::Attached { output, input })) => (id, output, input),
        Ok(_) | Err(_) => {
            let s = json!({"metadata": {}, "status": "Failure",
                "message": "container runtime could not start the command", "reason": "InternalError"});
            let _ = tx.send(frame(3, s.to_string().as_bytes())).await;
            let _ = tx.close().await;
            return;
        }
    };
    // Client → container: stdin on channel 0, its end on channel 255 (v5) or a close.
    let stdin_task = tokio::spawn(async move {
        let mut input = input;
        while let Some(Ok(m)) = rx.next().await {
            match m {
                Message::Binary(b) if !b.is_empty() => match b[0] {
                    0 if input.write_all(&b[1..]).await.is_err() => break,
                    255 if v5 && b.get(1) == Some(&0) => {
                        let _ = input.shutdown().await;
                    }
                    _ => {}
                },
                Message::Close(_) => break,
                _ => {}
            }
        }
    });
    let mut output = output;
    while let Some(item) = output.next().await {
        let Ok(item) = item else { break };
        let msg = match item {
            bollard::container::LogOutput::StdErr { message } => frame(2, &message),
            bollard::container::LogOutput::StdOut { message }
            | bollard::container::LogOutput::Console { message } => frame(1, &message),
            bollard::container::LogOutput::StdIn { .. } => continue,
        };
        if tx.send(msg).await.is_err() {
            // The client went away: the kubelet leaves the process to the runtime, as here.
            stdin_task.abort();
            return;
        }
    }
    let mut code = None;
    for _ in 0..100 {
        match st.docker.inspect_exec(&exec_id).await {
            Ok(i) if i.running != Some(true) => {
                code = i.exit_code;
                break;
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
    let status = match code {
        Some(0) => json!({"metadata": {}, "status": "Success"}),
        Some(c) => json!({
            "metadata": {}, "status": "Failure",
            "message": format!("command terminated with non-zero exit code: error executing command [...], exit code {c}"),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": c.to_string()}]},
        }),
        None => json!({"metadata": {}, "status": "Failure",
            "message": "exit code unknown", "reason": "InternalError"}),
    };
    let _ = tx.send(frame(3, status.to_string().as_bytes())).await;
    let _ = tx.close().await;
    stdin_task.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_and_quantities() {
        let l = json!({"a": "1", "b": "x"});
        assert!(selector_matches("a=1", &l));
        assert!(selector_matches("a==1,b", &l));
        assert!(!selector_matches("a=1,b!=x", &l));
        assert!(selector_matches("", &l));
        assert_eq!(quantity_bytes("512Mi"), Some(512 << 20));
        assert_eq!(quantity_bytes("1G"), Some(1_000_000_000));
        assert_eq!(quantity_cpus("500m"), Some(0.5));
        assert_eq!(quantity_cpus("2"), Some(2.0));
        assert_eq!(now_rfc3339().len(), 20);
    }
}
