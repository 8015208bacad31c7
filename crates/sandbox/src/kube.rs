//! Kubernetes backend: one pod per workspace through the Kubernetes API (kube-rs), commands
//! through the pod `exec` subresource over WebSocket (channel protocol v5, else v4).
//!
//! How each guarantee is met:
//!
//! * **Workspace**: a pod from the task image ([`KubeSandbox::pod_manifest`]): resources,
//!   `runtimeClassName` (gVisor, Kata), nodeSelector and tolerations from the configuration;
//!   `restartPolicy: Never`; `activeDeadlineSeconds` = the lifetime, so the kubelet ends an
//!   abandoned pod by itself; `shareProcessNamespace`, so the pause container is PID 1 and
//!   reaps orphans; the container's command is a `sleep` for the lifetime. Files go in and out
//!   as tar streams through exec (`tar` in the image), as `kubectl cp` does.
//! * **Isolation**: `automountServiceAccountToken: false` (no API credentials inside),
//!   `enableServiceLinks: false`, capabilities dropped to the same few as the Docker
//!   backend, `allowPrivilegeEscalation: false`, the RuntimeDefault seccomp profile; a
//!   NetworkPolicy selecting every sandbox pod denies all egress and ingress. Network cannot
//!   be granted per run here (a policy change takes effect asynchronously in the CNI), so a
//!   run asking for it is refused with a clear error.
//! * **Limits**: CPU and memory as the pod's requests and limits; the process count is the
//!   node's `podPidsLimit` (a kubelet setting: run sandboxes on a node pool configured for
//!   it); per-process CPU time, address space and file size, the wall clock, the output cap
//!   and the kill sweep through the same wrapper as the Docker backend
//!   ([`crate::container`]).
//! * **Leaks**: the same labels and lease as Docker ([`crate::lease`]); a held workspace's
//!   lease label is renewed (a JSON merge patch of the pod's labels) every third of the
//!   lease; [`KubeSandbox::sweep`] deletes pods whose lease ran out and an earlier
//!   incarnation's; a dropped workspace deletes its pod.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    Capabilities, Container, Pod, PodSpec, ResourceRequirements, SeccompProfile, SecurityContext,
    Toleration,
};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::api::{AttachParams, DeleteParams, ListParams, PostParams};
use kube::{Api, Client};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::container::{self, Collected};
use crate::docker::PullPolicy;
use crate::lease::{self, Labels, Reclaim, SweepReport};
use crate::{
    ImageRecord, Limits, RunOutput, RunSpec, Sandbox, SandboxError, StopReason, Workspace,
    WorkspaceInner as Inner, WorkspaceSpec, safe_relative,
};

/// Name of the sandbox container in each pod.
const CONTAINER: &str = "sandbox";
/// The NetworkPolicy that denies sandbox pods all traffic.
pub const POLICY_NAME: &str = "davinci-sandbox-deny-all";

/// Kubernetes backend settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubernetesConfig {
    /// API server URL (no credentials: a local or proxied server). `None`: in-cluster
    /// service account or the kubeconfig, as kubectl finds them.
    pub cluster_url: Option<String>,
    pub namespace: String,
    /// Image used when a workspace names none.
    pub default_image: Option<String>,
    pub pull_policy: PullPolicy,
    /// Where the command sees the workspace (SWE-bench images: `/testbed`).
    pub mount_point: PathBuf,
    /// This worker's stable name on its pods (default: the host name, i.e. the pod name).
    pub owner: String,
    pub run: String,
    /// Lease of a workspace, renewed every third of it while its owner holds it; a sweep
    /// deletes a pod whose lease ran out (its owner died).
    pub lease_s: u64,
    /// The longest a workspace may live, renewals or not (the pod's
    /// `activeDeadlineSeconds`).
    pub max_lifetime_s: u64,
    /// How often the sweeper started by [`crate::open`] runs (0: none).
    pub sweep_every_s: u64,
    /// RuntimeClass for stronger isolation (`gvisor`, `kata`).
    pub runtime_class: Option<String>,
    pub node_selector: BTreeMap<String, String>,
    pub tolerations: Vec<Toleration>,
    /// CPU request and limit (`"2"`, `"500m"`).
    pub cpu: Option<String>,
    /// Memory request and limit (`"4Gi"`).
    pub memory: Option<String>,
    /// Create the deny-all NetworkPolicy in the namespace if it is missing.
    pub network_policy: bool,
    /// How long a pod may take to start running (pull, schedule).
    pub start_timeout_s: u64,
    pub python_hash_seed: String,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            cluster_url: None,
            namespace: "default".into(),
            default_image: None,
            pull_policy: PullPolicy::IfNotPresent,
            mount_point: PathBuf::from("/testbed"),
            owner: String::new(),
            run: String::new(),
            lease_s: 600,
            max_lifetime_s: 24 * 3600,
            sweep_every_s: 60,
            runtime_class: None,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            cpu: None,
            memory: None,
            network_policy: true,
            start_timeout_s: 300,
            python_hash_seed: "0".into(),
        }
    }
}

/// Backend state of a pod workspace.
#[derive(Debug)]
pub(crate) struct WorkspaceInner {
    pods: Api<Pod>,
    pod: String,
    keep: Vec<u32>,
    lock: tokio::sync::Mutex<()>,
    released: std::sync::atomic::AtomicBool,
    /// Renews the lease label while the workspace is held.
    renewer: tokio::task::JoinHandle<()>,
}

impl Drop for WorkspaceInner {
    fn drop(&mut self) {
        self.renewer.abort();
        if self.released.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            let (pods, name) = (self.pods.clone(), self.pod.clone());
            h.spawn(async move {
                let _ = delete(&pods, &name).await;
            });
        }
    }
}

async fn delete(pods: &Api<Pod>, name: &str) -> Result<(), kube::Error> {
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        ..Default::default()
    };
    match pods.delete(name, &dp).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Kubernetes sandbox.
#[derive(Clone)]
pub struct KubeSandbox {
    cfg: KubernetesConfig,
    client: Client,
    pods: Api<Pod>,
    owner: String,
    incarnation: String,
}

impl std::fmt::Debug for KubeSandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSandbox")
            .field("namespace", &self.cfg.namespace)
            .field("owner", &self.owner)
            .finish()
    }
}

fn kerr(e: impl std::fmt::Display) -> SandboxError {
    SandboxError::Kubernetes(e.to_string())
}

impl KubeSandbox {
    /// Connects (checking the server answers) and makes sure the NetworkPolicy exists.
    pub async fn connect(cfg: KubernetesConfig) -> Result<Self, SandboxError> {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let mut kc = match &cfg.cluster_url {
            Some(u) => kube::Config::new(
                u.parse()
                    .map_err(|e| kerr(format!("cluster_url `{u}`: {e}")))?,
            ),
            None => kube::Config::infer()
                .await
                .map_err(|e| kerr(format!("no cluster configuration found: {e}")))?,
        };
        kc.default_namespace = cfg.namespace.clone();
        let client = Client::try_from(kc).map_err(kerr)?;
        client
            .apiserver_version()
            .await
            .map_err(|e| kerr(format!("API server not reachable: {e}")))?;
        let pods = Api::namespaced(client.clone(), &cfg.namespace);
        let owner = if cfg.owner.is_empty() {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "worker".into())
        } else {
            cfg.owner.clone()
        };
        let sb = KubeSandbox {
            cfg,
            client,
            pods,
            owner,
            incarnation: uuid::Uuid::new_v4().simple().to_string(),
        };
        if sb.cfg.network_policy {
            sb.ensure_policy().await?;
        }
        Ok(sb)
    }

    pub fn config(&self) -> &KubernetesConfig {
        &self.cfg
    }

    /// The NetworkPolicy: every sandbox pod, no egress, no ingress.
    pub fn network_policy(&self) -> NetworkPolicy {
        network_policy(&self.cfg)
    }
}

/// The NetworkPolicy of a namespace's sandbox pods: no egress, no ingress.
pub fn network_policy(cfg: &KubernetesConfig) -> NetworkPolicy {
    NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(POLICY_NAME.into()),
            namespace: Some(cfg.namespace.clone()),
            ..Default::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(lease::MANAGED.into(), "1".into())])),
                ..Default::default()
            }),
            policy_types: Some(vec!["Egress".into(), "Ingress".into()]),
            egress: Some(vec![]),
            ingress: Some(vec![]),
        }),
    }
}

impl KubeSandbox {
    async fn ensure_policy(&self) -> Result<(), SandboxError> {
        let api: Api<NetworkPolicy> = Api::namespaced(self.client.clone(), &self.cfg.namespace);
        match api.get_opt(POLICY_NAME).await.map_err(kerr)? {
            Some(_) => Ok(()),
            None => match api
                .create(&PostParams::default(), &self.network_policy())
                .await
            {
                Ok(_) => Ok(()),
                // Another worker made it meanwhile.
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
                Err(e) => Err(kerr(format!("creating NetworkPolicy {POLICY_NAME}: {e}"))),
            },
        }
    }

    /// The pod of a workspace.
    pub fn pod_manifest(&self, name: &str, image: &str, task: &str) -> Pod {
        pod_manifest(&self.cfg, &self.owner, &self.incarnation, name, image, task)
    }
}

/// The pod of a workspace for `owner` (public so manifests can be checked against the
/// Kubernetes schema without a cluster).
pub fn pod_manifest(
    cfg: &KubernetesConfig,
    owner: &str,
    incarnation: &str,
    name: &str,
    image: &str,
    task: &str,
) -> Pod {
    let labels = Labels::new(
        owner,
        incarnation,
        &cfg.run,
        task,
        Duration::from_secs(cfg.lease_s),
        Duration::from_secs(cfg.max_lifetime_s),
    );
    let mut res = BTreeMap::new();
    if let Some(c) = &cfg.cpu {
        res.insert("cpu".to_string(), Quantity(c.clone()));
    }
    if let Some(m) = &cfg.memory {
        res.insert("memory".to_string(), Quantity(m.clone()));
    }
    let pull = match cfg.pull_policy {
        PullPolicy::Always => "Always",
        PullPolicy::IfNotPresent => "IfNotPresent",
        PullPolicy::Never => "Never",
    };
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(cfg.namespace.clone()),
            labels: Some(labels.to_map()),
            annotations: Some(BTreeMap::from([(
                "davinci.dev/task-id".to_string(),
                task.to_string(),
            )])),
            ..Default::default()
        },
        spec: Some(PodSpec {
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            restart_policy: Some("Never".into()),
            share_process_namespace: Some(true),
            active_deadline_seconds: Some(cfg.max_lifetime_s as i64),
            termination_grace_period_seconds: Some(0),
            runtime_class_name: cfg.runtime_class.clone(),
            node_selector: (!cfg.node_selector.is_empty()).then(|| cfg.node_selector.clone()),
            tolerations: (!cfg.tolerations.is_empty()).then(|| cfg.tolerations.clone()),
            containers: vec![Container {
                name: CONTAINER.into(),
                image: Some(image.into()),
                image_pull_policy: Some(pull.into()),
                command: Some(vec!["sleep".into(), cfg.max_lifetime_s.to_string()]),
                working_dir: Some(cfg.mount_point.display().to_string()),
                resources: (!res.is_empty()).then(|| ResourceRequirements {
                    requests: Some(res.clone()),
                    limits: Some(res),
                    ..Default::default()
                }),
                security_context: Some(SecurityContext {
                    allow_privilege_escalation: Some(false),
                    privileged: Some(false),
                    capabilities: Some(Capabilities {
                        drop: Some(vec!["ALL".into()]),
                        add: Some(crate::docker::CAPS.iter().map(|s| s.to_string()).collect()),
                    }),
                    seccomp_profile: Some(SeccompProfile {
                        type_: "RuntimeDefault".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: None,
    }
}

impl KubeSandbox {
    fn inner<'a>(&self, ws: &'a Workspace) -> Result<&'a WorkspaceInner, SandboxError> {
        match &ws.inner {
            Inner::Kubernetes(k) => Ok(k),
            _ => Err(SandboxError::WrongBackend(ws.id.clone())),
        }
    }

    /// Waits for the pod to run; fails fast on image and configuration errors.
    async fn wait_running(&self, name: &str, image: &str) -> Result<ImageRecord, SandboxError> {
        let deadline = Instant::now() + Duration::from_secs(self.cfg.start_timeout_s);
        let mut pause = Duration::from_millis(20);
        loop {
            let pod = self.pods.get(name).await.map_err(kerr)?;
            let status = pod.status.unwrap_or_default();
            let cs = status.container_statuses.unwrap_or_default();
            if let Some(w) = cs
                .iter()
                .filter_map(|c| c.state.as_ref()?.waiting.as_ref())
                .find(|w| {
                    matches!(
                        w.reason.as_deref(),
                        Some(
                            "ErrImagePull"
                                | "ImagePullBackOff"
                                | "ErrImageNeverPull"
                                | "InvalidImageName"
                                | "CreateContainerConfigError"
                                | "CreateContainerError"
                        )
                    )
                })
            {
                return Err(SandboxError::Image {
                    image: image.into(),
                    message: format!(
                        "{}: {}",
                        w.reason.clone().unwrap_or_default(),
                        w.message.clone().unwrap_or_default()
                    ),
                });
            }
            match status.phase.as_deref() {
                Some("Running") => {
                    let digest = cs.first().map(|c| c.image_id.clone()).unwrap_or_default();
                    return Ok(ImageRecord {
                        name: image.into(),
                        digest: digest
                            .trim_start_matches("docker-pullable://")
                            .trim_start_matches("docker://")
                            .to_string(),
                    });
                }
                Some(p @ ("Failed" | "Succeeded")) => {
                    return Err(kerr(format!(
                        "pod {name} ended ({p}) before it ran: {}",
                        status.message.unwrap_or_default()
                    )));
                }
                _ => {}
            }
            if Instant::now() > deadline {
                return Err(kerr(format!(
                    "pod {name} not running after {} s (phase {:?})",
                    self.cfg.start_timeout_s, status.phase
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// One exec streamed into `col`, with an optional deadline after which (and on output
    /// overflow) the tree is killed. Returns the exit code (`None` if unknown) and why it
    /// was stopped, if it was.
    async fn stream(
        &self,
        pod: &str,
        keep: &[u32],
        argv: Vec<String>,
        stdin: Option<Vec<u8>>,
        col: &mut Collected,
        wall: Option<Duration>,
    ) -> Result<(Option<i64>, Option<StopReason>), SandboxError> {
        let ap = AttachParams {
            container: Some(CONTAINER.into()),
            stdin: stdin.is_some(),
            stdout: true,
            stderr: true,
            tty: false,
            max_stdin_buf_size: Some(64 << 10),
            max_stdout_buf_size: Some(64 << 10),
            max_stderr_buf_size: Some(64 << 10),
        };
        let mut proc = self.pods.exec(pod, argv, &ap).await.map_err(kerr)?;
        let mut out = proc.stdout().ok_or_else(|| kerr("no stdout"))?;
        let mut err = proc.stderr().ok_or_else(|| kerr("no stderr"))?;
        let status = proc
            .take_status()
            .ok_or_else(|| kerr("no status channel"))?;
        if let (Some(data), Some(mut w)) = (stdin, proc.stdin()) {
            tokio::spawn(async move {
                let _ = w.write_all(&data).await;
                let _ = w.shutdown().await;
            });
        }
        let deadline = wall.map(|w| tokio::time::Instant::now() + w);
        let mut forced = None;
        // The kill runs beside the reading: output nobody reads stalls the exec stream, and
        // the node's runtime with it.
        let mut killer: Option<tokio::task::JoinHandle<Result<(), SandboxError>>> = None;
        let (mut bo, mut be) = (vec![0u8; 64 << 10], vec![0u8; 64 << 10]);
        let (mut out_open, mut err_open) = (true, true);
        while out_open || err_open {
            let sleep = async {
                match (deadline, forced) {
                    (Some(d), None) => tokio::time::sleep_until(d).await,
                    _ => std::future::pending().await,
                }
            };
            let over = tokio::select! {
                r = out.read(&mut bo), if out_open => match r {
                    Ok(0) | Err(_) => { out_open = false; false }
                    Ok(n) => col.push(false, &bo[..n]),
                },
                r = err.read(&mut be), if err_open => match r {
                    Ok(0) | Err(_) => { err_open = false; false }
                    Ok(n) => col.push(true, &be[..n]),
                },
                _ = sleep => {
                    forced = Some(StopReason::WallTimeout);
                    killer = Some(self.spawn_kill(pod, keep));
                    false
                }
            };
            if over && forced.is_none() {
                forced = Some(StopReason::OutputLimit);
                killer = Some(self.spawn_kill(pod, keep));
            }
        }
        if let Some(k) = killer {
            k.await.map_err(kerr)??;
        }
        let st = tokio::time::timeout(Duration::from_secs(10), status)
            .await
            .ok()
            .flatten();
        let _ = proc.join().await;
        Ok((st.and_then(|s| exit_code(&s)), forced))
    }

    async fn exec_simple(
        &self,
        pod: &str,
        argv: Vec<String>,
        stdin: Option<Vec<u8>>,
    ) -> Result<(Vec<u8>, String, i64), SandboxError> {
        let mut col = Collected::new(&Limits {
            output_bytes: 512 << 20,
            output_kill_bytes: None,
            ..Limits::default()
        });
        let (code, _) = self.stream(pod, &[], argv, stdin, &mut col, None).await?;
        let err = String::from_utf8_lossy(
            &std::mem::replace(&mut col.err, crate::output::Capture::new(0)).finish(),
        )
        .into_owned();
        Ok((col.out.finish(), err, code.unwrap_or(-1)))
    }

    fn spawn_kill(
        &self,
        pod: &str,
        keep: &[u32],
    ) -> tokio::task::JoinHandle<Result<(), SandboxError>> {
        let (sb, pod, keep) = (self.clone(), pod.to_string(), keep.to_vec());
        tokio::spawn(async move { sb.kill_tree(&pod, &keep).await })
    }

    async fn kill_tree(&self, pod: &str, keep: &[u32]) -> Result<(), SandboxError> {
        // Boxed: the kill exec streams like any other, without a deadline.
        let mut col = Collected::new(&Limits::default());
        Box::pin(self.stream(pod, &[], container::sweep_argv(keep), None, &mut col, None))
            .await
            .map(|_| ())
    }

    async fn untar_into(&self, pod: &str, tar: Vec<u8>) -> Result<(), SandboxError> {
        let mp = self.cfg.mount_point.display().to_string();
        let (_, err, code) = self
            .exec_simple(
                pod,
                vec!["tar".into(), "-xmf".into(), "-".into(), "-C".into(), mp],
                Some(tar),
            )
            .await?;
        if code != 0 {
            return Err(kerr(format!(
                "copying into the workspace (tar exit {code}): {err}"
            )));
        }
        Ok(())
    }

    /// Deletes sandbox pods whose lease expired and those an earlier incarnation of this
    /// owner left, in the namespace.
    pub async fn sweep(&self) -> Result<SweepReport, SandboxError> {
        let list = self
            .pods
            .list(&ListParams::default().labels(&format!("{}=1", lease::MANAGED)))
            .await
            .map_err(kerr)?;
        let now = lease::unix_now();
        let mut report = SweepReport {
            seen: list.items.len(),
            ..Default::default()
        };
        for p in list.items {
            let name = p.metadata.name.clone().unwrap_or_default();
            let labels = p.metadata.labels.clone().unwrap_or_default();
            let Some(l) = Labels::from_map(|k| labels.get(k).map(String::as_str)) else {
                continue;
            };
            let Some(why) = l.reclaim_reason(&self.owner, &self.incarnation, now, None) else {
                continue;
            };
            match delete(&self.pods, &name).await {
                Ok(()) => match why {
                    Reclaim::Expired => report.expired.push(name),
                    Reclaim::Predecessor => report.predecessors.push(name),
                },
                Err(e) => report.failed.push((name, e.to_string())),
            }
        }
        report.record("kubernetes");
        Ok(report)
    }

    /// Moves a pod's lease to `until` (Unix seconds): a merge patch of its lease label.
    pub async fn renew(&self, pod: &str, until: u64) -> Result<(), SandboxError> {
        let patch = serde_json::json!({
            "metadata": {"labels": {lease::LEASE_EXPIRY: until.to_string()}}
        });
        self.pods
            .patch(
                pod,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await
            .map(|_| ())
            .map_err(|e| kerr(format!("renewing the lease of pod {pod}: {e}")))
    }

    /// Renews a held workspace's lease every third of it until aborted (on release).
    fn spawn_renewer(&self, pod: String) -> tokio::task::JoinHandle<()> {
        let sb = self.clone();
        let lease = self.cfg.lease_s;
        tokio::spawn(async move {
            let every = Duration::from_millis((lease * 1000 / 3).max(200));
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = sb.renew(&pod, lease::unix_now() + lease).await {
                    tracing::warn!(pod = %pod, error = %e, "sandbox lease renewal failed");
                }
            }
        })
    }

    /// Sweeps now and then every `every` until the returned task is aborted.
    pub fn spawn_sweeper(self: Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                if let Err(e) = self.sweep().await {
                    tracing::warn!(error = %e, "sandbox pod sweep failed");
                }
                tokio::time::sleep(every).await;
            }
        })
    }
}

/// A DNS label (RFC 1123) as Kubernetes names namespaces and parts of other names.
pub(crate) fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A resource quantity as the API server parses it: a decimal number and an optional suffix
/// (binary `Ki`…`Ei`, decimal `m`, `k`, `M`…`E`, or an exponent `e3`).
pub(crate) fn quantity_ok(q: &str) -> bool {
    let num_end = q
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_digit() || c == '.' || (i == 0 && (c == '+' || c == '-'))))
        .map_or(q.len(), |(i, _)| i);
    let (num, suffix) = q.split_at(num_end);
    let digits = num.trim_start_matches(['+', '-']);
    let number = !digits.is_empty()
        && digits != "."
        && digits.matches('.').count() <= 1
        && digits.chars().any(|c| c.is_ascii_digit());
    let suffix_ok = matches!(
        suffix,
        "" | "Ki"
            | "Mi"
            | "Gi"
            | "Ti"
            | "Pi"
            | "Ei"
            | "n"
            | "u"
            | "m"
            | "k"
            | "M"
            | "G"
            | "T"
            | "P"
            | "E"
    ) || suffix.strip_prefix(['e', 'E']).is_some_and(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit())
    });
    number && suffix_ok
}

/// The exit code in an exec's final `Status` (`Success`, or `NonZeroExitCode` with an
/// `ExitCode` cause).
fn exit_code(s: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Status) -> Option<i64> {
    if s.status.as_deref() == Some("Success") {
        return Some(0);
    }
    s.details
        .as_ref()?
        .causes
        .as_ref()?
        .iter()
        .find(|c| c.reason.as_deref() == Some("ExitCode"))?
        .message
        .as_ref()?
        .parse()
        .ok()
}

/// `cd` and `export` lines for the wrapper: pod exec carries neither a working directory nor
/// an environment.
fn prelude(cwd: &std::path::Path, env: &[String]) -> String {
    let mut s = format!("cd {} || exit 125\n", sh_quote(&cwd.display().to_string()));
    for kv in env {
        if let Some((k, v)) = kv.split_once('=') {
            s.push_str(&format!("export {k}={}\n", sh_quote(v)));
        }
    }
    s
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[async_trait::async_trait]
impl Sandbox for KubeSandbox {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn uses_images(&self) -> bool {
        true
    }

    async fn prepare(&self, spec: &WorkspaceSpec) -> Result<Workspace, SandboxError> {
        let image = spec
            .image
            .clone()
            .or_else(|| self.cfg.default_image.clone())
            .ok_or_else(|| SandboxError::NoImage(spec.task.clone().unwrap_or_default()))?;
        crate::images::check_reference(&image).map_err(|message| SandboxError::Image {
            image: image.clone(),
            message,
        })?;
        let name = format!(
            "davinci-sbx-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let pod = self.pod_manifest(&name, &image, spec.task.as_deref().unwrap_or(""));
        self.pods
            .create(&PostParams::default(), &pod)
            .await
            .map_err(|e| kerr(format!("creating pod {name}: {e}")))?;
        let setup = async {
            let record = self.wait_running(&name, &image).await?;
            let mp = self.cfg.mount_point.display().to_string();
            let (out, err, code) = self
                .exec_simple(
                    &name,
                    vec![
                        "/bin/sh".into(),
                        "-c".into(),
                        container::DISCOVER_KEEP.into(),
                        "sh".into(),
                        mp,
                    ],
                    None,
                )
                .await?;
            if code != 0 {
                return Err(kerr(format!(
                    "the image has no usable /bin/sh or mount point (exit {code}): {err}"
                )));
            }
            let keep = container::parse_keep(&String::from_utf8_lossy(&out));
            if let Some(src) = &spec.source {
                let tar = container::tar_tree(src).map_err(|source| SandboxError::Prepare {
                    path: src.clone(),
                    source,
                })?;
                self.untar_into(&name, tar).await?;
            }
            if !spec.files.is_empty() {
                let mut files = Vec::new();
                for (rel, data) in &spec.files {
                    files.push((safe_relative(rel)?, data.as_slice()));
                }
                self.untar_into(&name, container::tar_files(&files)?)
                    .await?;
            }
            Ok((record, keep))
        };
        let (record, keep) = match setup.await {
            Ok(r) => r,
            Err(e) => {
                let _ = delete(&self.pods, &name).await;
                return Err(e);
            }
        };
        Ok(Workspace {
            id: name.clone(),
            mount_point: self.cfg.mount_point.clone(),
            image: Some(record),
            inner: Inner::Kubernetes(WorkspaceInner {
                pods: self.pods.clone(),
                renewer: self.spawn_renewer(name.clone()),
                pod: name,
                keep,
                lock: tokio::sync::Mutex::new(()),
                released: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }

    async fn run(
        &self,
        ws: &Workspace,
        spec: &RunSpec,
        limits: &Limits,
    ) -> Result<RunOutput, SandboxError> {
        if spec.argv.is_empty() {
            return Err(SandboxError::EmptyCommand);
        }
        if spec.network {
            return Err(kerr(
                "this run asks for network; kubernetes sandbox pods have egress denied by \
                 NetworkPolicy (use the docker or local backend for networked steps)",
            ));
        }
        let inner = self.inner(ws)?;
        let _one = inner.lock.lock().await;
        let cwd = match &spec.cwd {
            Some(c) => ws.mount_point.join(safe_relative(c)?),
            None => ws.mount_point.clone(),
        };
        let pre = prelude(&cwd, &container::base_env(spec, &self.cfg.python_hash_seed));
        let argv = container::wrapped_argv_with(&pre, spec, limits, &inner.keep);
        let mut col = Collected::new(limits);
        let start = Instant::now();
        let guard = KillOnDrop {
            sb: Some(self.clone()),
            pod: inner.pod.clone(),
            keep: inner.keep.clone(),
        };
        let (code, forced) = self
            .stream(
                &inner.pod,
                &inner.keep,
                argv,
                spec.stdin.clone(),
                &mut col,
                Some(limits.wall_time),
            )
            .await?;
        guard.disarm();
        Ok(col.finish(code, forced, start.elapsed()))
    }

    async fn write_file(&self, ws: &Workspace, rel: &str, data: &[u8]) -> Result<(), SandboxError> {
        let inner = self.inner(ws)?;
        let tar = container::tar_files(&[(safe_relative(rel)?, data)])?;
        self.untar_into(&inner.pod, tar).await
    }

    async fn read_file(&self, ws: &Workspace, rel: &str) -> Result<Vec<u8>, SandboxError> {
        let inner = self.inner(ws)?;
        let p = safe_relative(rel)?;
        let mp = ws.mount_point.display().to_string();
        let (tar, err, code) = self
            .exec_simple(
                &inner.pod,
                vec![
                    "tar".into(),
                    "-cf".into(),
                    "-".into(),
                    "--no-recursion".into(),
                    "-C".into(),
                    mp,
                    "--".into(),
                    p.display().to_string(),
                ],
                None,
            )
            .await?;
        if code != 0 {
            return Err(SandboxError::File(rel.into(), err.trim().to_string()));
        }
        container::untar_file(rel, &tar).map_err(|e| SandboxError::File(rel.into(), e))
    }

    async fn release(&self, ws: Workspace) -> Result<(), SandboxError> {
        let inner = self.inner(&ws)?;
        inner
            .released
            .store(true, std::sync::atomic::Ordering::SeqCst);
        delete(&self.pods, &inner.pod)
            .await
            .map_err(|e| kerr(format!("deleting pod {}: {e}", inner.pod)))
    }
}

/// Kills what a dropped run left behind.
struct KillOnDrop {
    sb: Option<KubeSandbox>,
    pod: String,
    keep: Vec<u32>,
}

impl KillOnDrop {
    fn disarm(mut self) {
        self.sb = None;
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let (Some(sb), Ok(h)) = (self.sb.take(), tokio::runtime::Handle::try_current()) {
            let (pod, keep) = (self.pod.clone(), std::mem::take(&mut self.keep));
            h.spawn(async move {
                let _ = sb.kill_tree(&pod, &keep).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_from_exec_status() {
        let ok: k8s_openapi::apimachinery::pkg::apis::meta::v1::Status =
            serde_json::from_value(serde_json::json!({"metadata": {}, "status": "Success"}))
                .unwrap();
        assert_eq!(exit_code(&ok), Some(0));
        let bad = serde_json::from_value(serde_json::json!({
            "metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
            "message": "command terminated with non-zero exit code: exit status 3",
            "details": {"causes": [{"reason": "ExitCode", "message": "3"}]}
        }))
        .unwrap();
        assert_eq!(exit_code(&bad), Some(3));
        assert_eq!(
            prelude(std::path::Path::new("/testbed/a b"), &["K=it's".into()]),
            "cd '/testbed/a b' || exit 125\nexport K='it'\\''s'\n"
        );
    }
}
