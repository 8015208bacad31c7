//! Docker backend: one container per workspace through the Docker Engine API (bollard), over
//! the unix socket, plain TCP, or TCP with TLS.
//!
//! How each guarantee is met:
//!
//! * **Workspace**: a container from the task image (SWE-bench images hold the repository at
//!   `/testbed`), pulled according to [`PullPolicy`]; the digest it resolved to is recorded on
//!   the [`Workspace`]. PID 1 is the engine's init (`docker-init`), which reaps orphans; its
//!   child is a `sleep` for the workspace's lifetime, so an abandoned container stops by
//!   itself. A host tree
//!   ([`WorkspaceSpec::source`]) and extra files are copied in as tar archives; files are read
//!   back the same way.
//! * **Isolation**: all capabilities dropped except the few a root build needs (chown, file
//!   ownership, setuid/gid for package tools, kill), `no-new-privileges`, an optional OCI
//!   runtime (`runsc` for gVisor). Nothing of the host is mounted.
//! * **Network**: the container is created on [`DockerConfig::network`] and disconnected
//!   before any command runs, leaving it only a loopback; a run with [`RunSpec::network`] is
//!   connected for its duration. Without a configured network the container is created with
//!   `network_mode: none` and such runs are refused.
//! * **Limits**: CPU (`nano_cpus`) and memory for the container from the configuration; the
//!   process count as the container's `pids.max`, updated to each run's limit; per-process CPU
//!   time, address space and file size through the wrapper ([`crate::container`]).
//! * **Wall time, output, clean-up**: output is streamed into bounded buffers; on wall-clock
//!   expiry or output overflow a kill sweep (its own exec) kills every process of the command,
//!   and the wrapper sweeps after every command. Runs in one workspace are serialised.
//! * **Leaks**: labels name the owner, its incarnation, the run, the task, the lease expiry
//!   and the lifetime ([`crate::lease`]); while a workspace is held its lease is renewed
//!   (written to [`lease::RENEWAL_FILE`] in the container every third of the lease);
//!   [`DockerSandbox::sweep`] removes containers whose lease ran out and an earlier
//!   incarnation's, so a worker killed with -9 leaks nothing past its lease.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, ContainerUpdateBody, HostConfig, NetworkConnectRequest,
    NetworkDisconnectRequest,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, DownloadFromContainerOptionsBuilder,
    ListContainersOptionsBuilder, RemoveContainerOptionsBuilder, UploadToContainerOptionsBuilder,
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::container::{self, Collected};
use crate::lease::{self, Labels, Reclaim, SweepReport};
use crate::{
    ImageRecord, Limits, RunOutput, RunSpec, Sandbox, SandboxError, StopReason, Workspace,
    WorkspaceInner as Inner, WorkspaceSpec, safe_relative,
};

/// When to pull a workspace's image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PullPolicy {
    /// Pull every time a workspace is made (gets the newest digest of a tag).
    Always,
    /// Pull only when the engine does not have the image.
    #[default]
    IfNotPresent,
    /// Never pull; an absent image is an error.
    Never,
}

/// Client certificates for a TLS endpoint (`tcp://host:2376`), PEM files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DockerTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Docker backend settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DockerConfig {
    /// `unix:///var/run/docker.sock`, `tcp://host:2376` (with `tls`) or `http://host:2375`.
    /// Default: `$DOCKER_HOST`, else the local socket.
    pub endpoint: Option<String>,
    pub tls: Option<DockerTls>,
    /// Image used when a workspace names none.
    pub default_image: Option<String>,
    pub pull_policy: PullPolicy,
    /// Where the command sees the workspace (SWE-bench images: `/testbed`).
    pub mount_point: PathBuf,
    /// This worker's stable name on its containers (default: the host name).
    pub owner: String,
    /// The run the containers serve (a label; free text).
    pub run: String,
    /// Lease of a workspace, renewed every third of it while its owner holds it; a sweep
    /// removes a workspace whose lease ran out (its owner died).
    pub lease_s: u64,
    /// The longest a workspace may live, renewals or not (its sleeper ends then).
    pub max_lifetime_s: u64,
    /// How often the sweeper started by [`crate::open`] runs (0: none).
    pub sweep_every_s: u64,
    /// CPUs per container (`None`: not limited).
    pub cpus: Option<f64>,
    /// Memory (and memory + swap) per container, bytes.
    pub memory_bytes: Option<u64>,
    /// Docker network a run with `network: true` is attached to for its duration; `None`
    /// creates containers with `network_mode: none` and refuses such runs.
    pub network: Option<String>,
    /// OCI runtime, e.g. `runsc` (gVisor); `None`: the engine's default.
    pub runtime: Option<String>,
    /// User commands run as (default: the image's user).
    pub user: Option<String>,
    pub python_hash_seed: String,
    /// Timeout of one Engine API request, seconds.
    pub api_timeout_s: u64,
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            endpoint: None,
            tls: None,
            default_image: None,
            pull_policy: PullPolicy::IfNotPresent,
            mount_point: PathBuf::from("/testbed"),
            owner: String::new(),
            run: String::new(),
            lease_s: 600,
            max_lifetime_s: 24 * 3600,
            sweep_every_s: 60,
            cpus: None,
            memory_bytes: None,
            network: Some("bridge".to_string()),
            runtime: None,
            user: None,
            python_hash_seed: "0".to_string(),
            api_timeout_s: 120,
        }
    }
}

/// Capabilities kept: what a root build or test run in a task image uses (file ownership,
/// package tools switching users, signalling its own processes).
pub(crate) const CAPS: [&str; 7] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
];

/// Backend state of a Docker workspace.
#[derive(Debug)]
pub(crate) struct WorkspaceInner {
    docker: Docker,
    container: String,
    exec: Arc<ExecState>,
    /// One run at a time: the kill sweep of one would hit the other.
    lock: tokio::sync::Mutex<()>,
    released: std::sync::atomic::AtomicBool,
    /// Renews the lease while the workspace is held.
    renewer: tokio::task::JoinHandle<()>,
}

/// What a kill sweep needs, shared with the guard of a run in flight.
#[derive(Debug)]
struct ExecState {
    container: String,
    /// Pids the kill sweep spares (the lease sleeper).
    keep: Vec<u32>,
    /// The container's current `pids.max` (-1: unlimited).
    pids: AtomicI64,
}

impl Drop for WorkspaceInner {
    fn drop(&mut self) {
        self.renewer.abort();
        if self.released.load(Ordering::SeqCst) {
            return;
        }
        // Best effort without blocking the caller; the sweeper removes what this misses.
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            let (d, c) = (self.docker.clone(), self.container.clone());
            h.spawn(async move {
                let _ = remove(&d, &c).await;
            });
        }
    }
}

async fn remove(d: &Docker, id: &str) -> Result<(), bollard::errors::Error> {
    let opts = RemoveContainerOptionsBuilder::default()
        .force(true)
        .v(true)
        .build();
    match d.remove_container(id, Some(opts)).await {
        Ok(()) => Ok(()),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Docker sandbox.
#[derive(Debug, Clone)]
pub struct DockerSandbox {
    pub(crate) cfg: DockerConfig,
    docker: Docker,
    endpoint: String,
    owner: String,
    incarnation: String,
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "worker".to_string())
}

impl DockerSandbox {
    /// Connects and negotiates the API version, so an unreachable engine is reported at
    /// start-up, naming the endpoint.
    pub async fn connect(cfg: DockerConfig) -> Result<Self, SandboxError> {
        let endpoint = cfg
            .endpoint
            .clone()
            .or_else(|| std::env::var("DOCKER_HOST").ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| "unix:///var/run/docker.sock".to_string());
        let err = |message: String| SandboxError::Docker {
            endpoint: endpoint.clone(),
            message,
        };
        let t = cfg.api_timeout_s;
        let v = bollard::API_DEFAULT_VERSION;
        let docker = if let Some(path) = endpoint.strip_prefix("unix://") {
            Docker::connect_with_unix(path, t, v)
        } else if let Some(tls) = &cfg.tls {
            // One crypto provider for the process: aws-lc, as tonic's TLS uses.
            let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
            Docker::connect_with_ssl(&endpoint, &tls.key, &tls.cert, &tls.ca, t, v)
        } else if endpoint.starts_with("tcp://") || endpoint.starts_with("http://") {
            Docker::connect_with_http(&endpoint, t, v)
        } else {
            return Err(err(
                "unsupported endpoint: use unix://PATH, tcp://HOST:PORT (with tls) or http://HOST:PORT"
                    .into(),
            ));
        }
        .map_err(|e| err(e.to_string()))?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| err(format!("not reachable: {e}")))?;
        docker
            .ping()
            .await
            .map_err(|e| err(format!("ping failed: {e}")))?;
        let owner = if cfg.owner.is_empty() {
            host_name()
        } else {
            cfg.owner.clone()
        };
        Ok(DockerSandbox {
            cfg,
            docker,
            endpoint,
            owner,
            incarnation: lease::incarnation().to_string(),
        })
    }

    pub fn config(&self) -> &DockerConfig {
        &self.cfg
    }

    /// The engine client (for tests and tools that build images).
    pub fn client(&self) -> &Docker {
        &self.docker
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    fn err(&self, e: impl std::fmt::Display) -> SandboxError {
        SandboxError::Docker {
            endpoint: self.endpoint.clone(),
            message: e.to_string(),
        }
    }

    /// Makes the image available per the pull policy; returns what it resolved to.
    async fn ensure_image(&self, image: &str) -> Result<ImageRecord, SandboxError> {
        let img_err = |message: String| SandboxError::Image {
            image: image.to_string(),
            message,
        };
        crate::images::check_reference(image).map_err(img_err)?;
        let present = match self.docker.inspect_image(image).await {
            Ok(i) => Some(i),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => None,
            Err(e) => return Err(self.err(e)),
        };
        let pull = match self.cfg.pull_policy {
            PullPolicy::Always => true,
            PullPolicy::IfNotPresent => present.is_none(),
            PullPolicy::Never => {
                if present.is_none() {
                    return Err(img_err(
                        "not present on the engine and pull_policy is `never` (build or load it first)"
                            .into(),
                    ));
                }
                false
            }
        };
        let info = if pull {
            let opts = CreateImageOptionsBuilder::default()
                .from_image(image)
                .build();
            let mut s = self.docker.create_image(Some(opts), None, None);
            while let Some(r) = s.next().await {
                r.map_err(|e| img_err(format!("pull failed: {e}")))?;
            }
            self.docker
                .inspect_image(image)
                .await
                .map_err(|e| img_err(format!("inspect after pull: {e}")))?
        } else {
            present.expect("present when not pulled")
        };
        // The registry digest of the repository named, if the image came from it (an image
        // can carry digests of other repositories it was pushed to); else the local id.
        let repo = crate::images::repository(image);
        let digest = info
            .repo_digests
            .as_ref()
            .and_then(|d| {
                d.iter()
                    .find(|r| r.split_once('@').is_some_and(|(n, _)| n == repo))
                    .cloned()
            })
            .or(info.id)
            .ok_or_else(|| img_err("the engine reports no id".into()))?;
        Ok(ImageRecord {
            name: image.to_string(),
            digest,
        })
    }

    fn inner<'a>(&self, ws: &'a Workspace) -> Result<&'a WorkspaceInner, SandboxError> {
        match &ws.inner {
            Inner::Docker(d) => Ok(d),
            _ => Err(SandboxError::WrongBackend(ws.id.clone())),
        }
    }

    /// Runs `argv` in the container to completion, returning (stdout, exit code). For the
    /// backend's own short commands.
    async fn exec_simple(
        &self,
        id: &str,
        argv: Vec<String>,
    ) -> Result<(String, i64), SandboxError> {
        let ex = self
            .docker
            .create_exec(
                id,
                CreateExecOptions {
                    cmd: Some(argv),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    user: Some("0".to_string()),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| self.err(e))?;
        let mut out = String::new();
        if let StartExecResults::Attached { mut output, .. } = self
            .docker
            .start_exec(&ex.id, None::<StartExecOptions>)
            .await
            .map_err(|e| self.err(e))?
        {
            while let Some(chunk) = output.next().await {
                let chunk = chunk.map_err(|e| self.err(e))?;
                out.push_str(&String::from_utf8_lossy(chunk.as_ref()));
            }
        }
        let code = self.exit_code(&ex.id).await?.unwrap_or(-1);
        Ok((out, code))
    }

    async fn exit_code(&self, exec_id: &str) -> Result<Option<i64>, SandboxError> {
        // The stream can close a moment before the engine records the exit.
        for _ in 0..100 {
            let i = self
                .docker
                .inspect_exec(exec_id)
                .await
                .map_err(|e| self.err(e))?;
            if i.running != Some(true) {
                return Ok(i.exit_code);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(None)
    }

    async fn upload(&self, id: &str, tar: Vec<u8>) -> Result<(), SandboxError> {
        self.upload_at(id, &self.cfg.mount_point.display().to_string(), tar)
            .await
    }

    async fn upload_at(&self, id: &str, path: &str, tar: Vec<u8>) -> Result<(), SandboxError> {
        let opts = UploadToContainerOptionsBuilder::default()
            .path(path)
            .build();
        self.docker
            .upload_to_container(id, Some(opts), bollard::body_full(tar.into()))
            .await
            .map_err(|e| self.err(format!("copying into the workspace: {e}")))
    }

    async fn create(&self, spec: &WorkspaceSpec) -> Result<(String, ImageRecord), SandboxError> {
        let image = spec
            .image
            .clone()
            .or_else(|| self.cfg.default_image.clone())
            .ok_or_else(|| SandboxError::NoImage(spec.task.clone().unwrap_or_default()))?;
        let record = self.ensure_image(&image).await?;
        let labels = Labels::new(
            &self.owner,
            &self.incarnation,
            &self.cfg.run,
            spec.task.as_deref().unwrap_or(""),
            Duration::from_secs(self.cfg.lease_s),
            Duration::from_secs(self.cfg.max_lifetime_s),
        );
        let host = HostConfig {
            init: Some(true),
            network_mode: Some(
                self.cfg
                    .network
                    .clone()
                    .unwrap_or_else(|| "none".to_string()),
            ),
            cap_drop: Some(vec!["ALL".to_string()]),
            cap_add: Some(CAPS.iter().map(|s| s.to_string()).collect()),
            security_opt: Some(vec!["no-new-privileges".to_string()]),
            memory: self.cfg.memory_bytes.map(|m| m as i64),
            memory_swap: self.cfg.memory_bytes.map(|m| m as i64),
            nano_cpus: self.cfg.cpus.map(|c| (c * 1e9) as i64),
            pids_limit: Some(Limits::default().max_processes.map_or(-1, pids_max)),
            runtime: self.cfg.runtime.clone(),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(image.clone()),
            entrypoint: Some(vec!["sleep".to_string()]),
            cmd: Some(vec![self.cfg.max_lifetime_s.to_string()]),
            labels: Some(labels.to_map().into_iter().collect::<HashMap<_, _>>()),
            host_config: Some(host),
            ..Default::default()
        };
        let name = format!(
            "davinci-sbx-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let opts = CreateContainerOptionsBuilder::default().name(&name).build();
        let c = self
            .docker
            .create_container(Some(opts), body)
            .await
            .map_err(|e| SandboxError::Image {
                image: image.clone(),
                message: format!("creating the container: {e}"),
            })?;
        Ok((c.id, record))
    }

    async fn setup(&self, id: &str, spec: &WorkspaceSpec) -> Result<Vec<u32>, SandboxError> {
        self.docker
            .start_container(id, None)
            .await
            .map_err(|e| self.err(format!("starting the container: {e}")))?;
        if let Some(net) = &self.cfg.network {
            self.set_network(id, net, false).await?;
        }
        let mp = self.cfg.mount_point.display().to_string();
        let (out, code) = self
            .exec_simple(
                id,
                vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    container::DISCOVER_KEEP.into(),
                    "sh".into(),
                    mp,
                ],
            )
            .await?;
        if code != 0 {
            return Err(self.err(format!(
                "the image has no usable /bin/sh or mount point (exit {code}): {out}"
            )));
        }
        let keep = container::parse_keep(&out);
        if let Some(src) = &spec.source {
            let tar = container::tar_tree(src).map_err(|source| SandboxError::Prepare {
                path: src.clone(),
                source,
            })?;
            self.upload(id, tar).await?;
        }
        if !spec.files.is_empty() {
            let mut files = Vec::new();
            for (rel, data) in &spec.files {
                files.push((safe_relative(rel)?, data.as_slice()));
            }
            self.upload(id, container::tar_files(&files)?).await?;
        }
        Ok(keep)
    }

    async fn set_network(&self, id: &str, net: &str, on: bool) -> Result<(), SandboxError> {
        let r = if on {
            self.docker
                .connect_network(
                    net,
                    NetworkConnectRequest {
                        container: id.to_string(),
                        endpoint_config: None,
                    },
                )
                .await
        } else {
            self.docker
                .disconnect_network(
                    net,
                    NetworkDisconnectRequest {
                        container: id.to_string(),
                        force: Some(true),
                    },
                )
                .await
        };
        r.map_err(|e| {
            self.err(format!(
                "network `{net}` {}: {e}",
                if on { "connect" } else { "disconnect" }
            ))
        })
    }

    /// Kills every process a command left in the container (spares init and the sleeper).
    /// A fork bomb may hold every process slot, so the limit is raised for the sweep's own
    /// shell first; the next run sets it back.
    async fn kill_tree(&self, inner: &ExecState) -> Result<(), SandboxError> {
        let cur = inner.pids.load(Ordering::SeqCst);
        if cur > 0 {
            self.docker
                .update_container(
                    &inner.container,
                    ContainerUpdateBody {
                        pids_limit: Some(cur + 4),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| self.err(format!("raising the process limit to kill: {e}")))?;
            inner.pids.store(cur + 4, Ordering::SeqCst);
        }
        self.exec_simple(&inner.container, container::sweep_argv(&inner.keep))
            .await
            .map(|_| ())
    }

    fn spawn_kill(&self, st: &Arc<ExecState>) -> tokio::task::JoinHandle<Result<(), SandboxError>> {
        let (sb, st) = (self.clone(), st.clone());
        tokio::spawn(async move { sb.kill_tree(&st).await })
    }

    /// Bakes an image: `base` with the host tree `src` copied to the mount point, committed as
    /// `tag`; an existing `tag` is kept. For task images made locally (tests, environments
    /// built here rather than pulled).
    pub async fn bake_image(
        &self,
        base: &str,
        src: &std::path::Path,
        tag: &str,
    ) -> Result<ImageRecord, SandboxError> {
        if self.docker.inspect_image(tag).await.is_err() {
            let c = self
                .docker
                .create_container(
                    None::<bollard::query_parameters::CreateContainerOptions>,
                    ContainerCreateBody {
                        image: Some(base.to_string()),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| SandboxError::Image {
                    image: base.to_string(),
                    message: e.to_string(),
                })?;
            let tar = container::tar_tree(src).map_err(|source| SandboxError::Prepare {
                path: src.to_path_buf(),
                source,
            })?;
            let r = async {
                self.upload(&c.id, tar).await?;
                let (repo, t) = tag.rsplit_once(':').unwrap_or((tag, "latest"));
                let opts = bollard::query_parameters::CommitContainerOptionsBuilder::default()
                    .container(&c.id)
                    .repo(repo)
                    .tag(t)
                    .build();
                self.docker
                    .commit_container(opts, bollard::models::ContainerConfig::default())
                    .await
                    .map_err(|e| self.err(format!("committing {tag}: {e}")))
            }
            .await;
            let _ = remove(&self.docker, &c.id).await;
            r?;
        }
        self.ensure_image(tag).await
    }

    /// Removes managed containers whose lease expired and those an earlier incarnation of
    /// this owner left, on the whole engine.
    pub async fn sweep(&self) -> Result<SweepReport, SandboxError> {
        let filters = HashMap::from([("label".to_string(), vec![format!("{}=1", lease::MANAGED)])]);
        let opts = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let list = self
            .docker
            .list_containers(Some(opts))
            .await
            .map_err(|e| self.err(e))?;
        let now = lease::unix_now();
        let mut report = SweepReport {
            seen: list.len(),
            ..Default::default()
        };
        for c in list {
            let Some(id) = c.id else { continue };
            let labels = c.labels.unwrap_or_default();
            let Some(l) = Labels::from_map(|k| labels.get(k).map(String::as_str)) else {
                continue;
            };
            let renewed = if l.renewal_matters(now) {
                self.renewed_until(&id).await
            } else {
                None
            };
            let Some(why) = l.reclaim_reason(&self.owner, &self.incarnation, now, renewed) else {
                continue;
            };
            let name = c
                .names
                .and_then(|n| n.first().cloned())
                .unwrap_or_else(|| id.clone());
            match remove(&self.docker, &id).await {
                Ok(()) => match why {
                    Reclaim::Expired => report.expired.push(name),
                    Reclaim::Predecessor => report.predecessors.push(name),
                },
                Err(e) => report.failed.push((name, e.to_string())),
            }
        }
        if !report.expired.is_empty() || !report.predecessors.is_empty() {
            tracing::info!(
                expired = report.expired.len(),
                predecessors = report.predecessors.len(),
                failed = report.failed.len(),
                "sandbox sweep removed containers"
            );
        }
        report.record("docker");
        Ok(report)
    }

    /// Records in the container that its lease runs until `until` (Unix seconds).
    pub async fn renew(&self, container_id: &str, until: u64) -> Result<(), SandboxError> {
        let name = lease::RENEWAL_FILE.trim_start_matches('/');
        let tar = container::tar_files(&[(PathBuf::from(name), until.to_string().as_bytes())])?;
        self.upload_at(container_id, "/", tar)
            .await
            .map_err(|e| self.err(format!("renewing the lease of {container_id}: {e}")))
    }

    /// The renewal recorded in a container, if one can be read.
    async fn renewed_until(&self, id: &str) -> Option<u64> {
        let opts = DownloadFromContainerOptionsBuilder::default()
            .path(lease::RENEWAL_FILE)
            .build();
        let mut s = self.docker.download_from_container(id, Some(opts));
        let mut tar = Vec::new();
        while let Some(chunk) = s.next().await {
            tar.extend_from_slice(&chunk.ok()?);
            if tar.len() > 1 << 16 {
                return None;
            }
        }
        let data = container::untar_file(lease::RENEWAL_FILE, &tar).ok()?;
        String::from_utf8(data).ok()?.trim().parse().ok()
    }

    /// Renews a held workspace's lease every third of it until aborted (on release).
    fn spawn_renewer(&self, id: String) -> tokio::task::JoinHandle<()> {
        let sb = self.clone();
        let lease = self.cfg.lease_s;
        tokio::spawn(async move {
            let every = Duration::from_millis((lease * 1000 / 3).max(200));
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = sb.renew(&id, lease::unix_now() + lease).await {
                    tracing::warn!(container = %id, error = %e, "sandbox lease renewal failed");
                }
            }
        })
    }

    /// Sweeps now and then every `every` until the returned task is aborted.
    pub fn spawn_sweeper(self: Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                if let Err(e) = self.sweep().await {
                    tracing::warn!(error = %e, "sandbox sweep failed");
                }
                tokio::time::sleep(every).await;
            }
        })
    }

    async fn run_locked(
        &self,
        inner: &WorkspaceInner,
        ws: &Workspace,
        spec: &RunSpec,
        limits: &Limits,
    ) -> Result<RunOutput, SandboxError> {
        let id = &inner.container;
        let st = &inner.exec;
        let want = limits.max_processes.map_or(-1, pids_max);
        if st.pids.load(Ordering::SeqCst) != want {
            self.docker
                .update_container(
                    id,
                    ContainerUpdateBody {
                        pids_limit: Some(want),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| self.err(format!("setting the process limit: {e}")))?;
            st.pids.store(want, Ordering::SeqCst);
        }
        let cwd = match &spec.cwd {
            Some(c) => ws.mount_point.join(safe_relative(c)?),
            None => ws.mount_point.clone(),
        };
        let ex = self
            .docker
            .create_exec(
                id,
                CreateExecOptions {
                    cmd: Some(container::wrapped_argv(spec, limits, &st.keep)),
                    env: Some(container::base_env(spec, &self.cfg.python_hash_seed)),
                    working_dir: Some(cwd.display().to_string()),
                    attach_stdin: Some(spec.stdin.is_some()),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    user: self.cfg.user.clone(),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| self.err(e))?;
        let start = Instant::now();
        let StartExecResults::Attached {
            mut output,
            mut input,
        } = self
            .docker
            .start_exec(&ex.id, None::<StartExecOptions>)
            .await
            .map_err(|e| self.err(e))?
        else {
            return Err(self.err("exec started detached"));
        };
        // If the caller drops this future, the command dies with it.
        let guard = KillOnDrop {
            sb: Some(self.clone()),
            exec: st.clone(),
        };
        if let Some(data) = spec.stdin.clone() {
            // A command that never reads its stdin must not block us.
            tokio::spawn(async move {
                let _ = input.write_all(&data).await;
                let _ = input.shutdown().await;
            });
        } else {
            drop(input);
        }
        let mut col = Collected::new(limits);
        let mut forced: Option<StopReason> = None;
        // The kill runs beside the reading: an exec whose output nobody reads stalls the
        // engine's attach, and the kill exec with it.
        let mut killer: Option<tokio::task::JoinHandle<Result<(), SandboxError>>> = None;
        let deadline = tokio::time::Instant::now() + limits.wall_time;
        loop {
            let item = if forced.is_none() {
                tokio::select! {
                    i = output.next() => i,
                    _ = tokio::time::sleep_until(deadline) => {
                        forced = Some(StopReason::WallTimeout);
                        killer = Some(self.spawn_kill(st));
                        continue;
                    }
                }
            } else {
                // Killed: the stream ends once the last holder of its pipes is gone.
                match tokio::time::timeout(Duration::from_secs(10), output.next()).await {
                    Ok(i) => i,
                    Err(_) => break,
                }
            };
            let Some(item) = item else { break };
            let item = item.map_err(|e| self.err(e))?;
            let over = match item {
                bollard::container::LogOutput::StdErr { message } => col.push(true, &message),
                bollard::container::LogOutput::StdOut { message }
                | bollard::container::LogOutput::Console { message } => col.push(false, &message),
                bollard::container::LogOutput::StdIn { .. } => false,
            };
            if over && forced.is_none() {
                forced = Some(StopReason::OutputLimit);
                killer = Some(self.spawn_kill(st));
            }
        }
        let wall = start.elapsed();
        if let Some(k) = killer {
            k.await.map_err(|e| self.err(e))??;
        }
        let code = self.exit_code(&ex.id).await?;
        guard.disarm();
        Ok(col.finish(code, forced, wall))
    }
}

/// `pids.max` for a run allowed `n` processes: the init, the lease sleeper and the wrapper
/// shell come on top.
fn pids_max(n: u64) -> i64 {
    n as i64 + 3
}

/// Kills what a dropped run left behind.
struct KillOnDrop {
    sb: Option<DockerSandbox>,
    exec: Arc<ExecState>,
}

impl KillOnDrop {
    fn disarm(mut self) {
        self.sb = None;
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let (Some(sb), Ok(h)) = (self.sb.take(), tokio::runtime::Handle::try_current()) {
            let st = self.exec.clone();
            h.spawn(async move {
                let _ = sb.kill_tree(&st).await;
            });
        }
    }
}

#[async_trait::async_trait]
impl Sandbox for DockerSandbox {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn uses_images(&self) -> bool {
        true
    }

    async fn prepare(&self, spec: &WorkspaceSpec) -> Result<Workspace, SandboxError> {
        let (id, record) = self.create(spec).await?;
        let keep = match self.setup(&id, spec).await {
            Ok(k) => k,
            Err(e) => {
                let _ = remove(&self.docker, &id).await;
                return Err(e);
            }
        };
        Ok(Workspace {
            id: id.clone(),
            mount_point: self.cfg.mount_point.clone(),
            image: Some(record),
            inner: Inner::Docker(WorkspaceInner {
                docker: self.docker.clone(),
                container: id.clone(),
                exec: Arc::new(ExecState {
                    container: id.clone(),
                    keep,
                    pids: AtomicI64::new(Limits::default().max_processes.map_or(-1, pids_max)),
                }),
                lock: tokio::sync::Mutex::new(()),
                released: std::sync::atomic::AtomicBool::new(false),
                renewer: self.spawn_renewer(id),
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
        let inner = self.inner(ws)?;
        let _one = inner.lock.lock().await;
        let net = if spec.network {
            let net = self.cfg.network.clone().ok_or_else(|| {
                self.err(
                    "this run asks for network, but the docker backend has no `network` configured",
                )
            })?;
            self.set_network(&inner.container, &net, true).await?;
            Some(net)
        } else {
            None
        };
        let r = self.run_locked(inner, ws, spec, limits).await;
        if let Some(net) = net {
            self.set_network(&inner.container, &net, false).await?;
        }
        r
    }

    async fn write_file(&self, ws: &Workspace, rel: &str, data: &[u8]) -> Result<(), SandboxError> {
        let inner = self.inner(ws)?;
        let tar = container::tar_files(&[(safe_relative(rel)?, data)])?;
        self.upload(&inner.container, tar).await
    }

    async fn read_file(&self, ws: &Workspace, rel: &str) -> Result<Vec<u8>, SandboxError> {
        let inner = self.inner(ws)?;
        let path = ws.mount_point.join(safe_relative(rel)?);
        let opts = DownloadFromContainerOptionsBuilder::default()
            .path(&path.display().to_string())
            .build();
        let mut s = self
            .docker
            .download_from_container(&inner.container, Some(opts));
        let mut tar = Vec::new();
        while let Some(chunk) = s.next().await {
            let chunk = chunk.map_err(|e| SandboxError::File(rel.to_string(), e.to_string()))?;
            tar.extend_from_slice(&chunk);
        }
        container::untar_file(rel, &tar).map_err(|e| SandboxError::File(rel.to_string(), e))
    }

    async fn release(&self, ws: Workspace) -> Result<(), SandboxError> {
        let inner = self.inner(&ws)?;
        inner.released.store(true, Ordering::SeqCst);
        remove(&self.docker, &inner.container)
            .await
            .map_err(|e| self.err(format!("removing {}: {e}", inner.container)))
    }
}
