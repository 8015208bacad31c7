//! Isolated command execution for untrusted code (agent commands, test suites, model
//! completions).
//!
//! One trait, [`Sandbox`], with a backend chosen by configuration ([`Backend`], see [`open`]):
//!
//! * [`Backend::Local`]: bubblewrap on the local machine ([`local::BwrapSandbox`]); the
//!   workspace is a copy of a host tree.
//! * [`Backend::Docker`]: one container per workspace through the Docker Engine API
//!   ([`docker::DockerSandbox`]); the workspace is the task image's tree (SWE-bench images keep
//!   the repository at `/testbed`).
//! * [`Backend::Kubernetes`]: one pod per workspace through the Kubernetes API, commands
//!   through the pod `exec` WebSocket ([`kube::KubeSandbox`]).
//!
//! The contract every backend keeps: the command sees a private copy of the workspace and
//! nothing writable of the host; no network unless [`RunSpec::network`] is set; CPU time, wall
//! time, memory, process count, file size and output size are limited ([`Limits`]); the
//! environment is clean apart from `TZ=UTC`, a fixed `PYTHONHASHSEED` and what the caller sets
//! (container backends start from the image's own environment, never the host's); every
//! process the command started is gone when [`Sandbox::run`] returns. One conformance suite
//! (`tests/conformance.rs`) checks this on every backend.

mod container;
pub mod docker;
pub mod images;
pub mod kube;
pub mod lease;
pub mod local;
mod output;
pub mod testing;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use docker::{DockerConfig, DockerSandbox, DockerTls, PullPolicy};
pub use kube::{KubeSandbox, KubernetesConfig};
pub use lease::{Labels, SweepReport};
pub use local::{BwrapSandbox, LocalConfig};

/// Which backend runs sandboxes. Parsed from service configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Backend {
    /// bubblewrap on this machine.
    Local(LocalConfig),
    /// One container per workspace through the Docker Engine API.
    Docker(DockerConfig),
    /// One pod per workspace through the Kubernetes API.
    Kubernetes(KubernetesConfig),
}

impl Default for Backend {
    fn default() -> Self {
        Backend::Local(LocalConfig::default())
    }
}

impl Backend {
    /// `local`, `docker` or `kubernetes`, as the configuration names it.
    pub fn kind(&self) -> &'static str {
        match self {
            Backend::Local(_) => "local",
            Backend::Docker(_) => "docker",
            Backend::Kubernetes(_) => "kubernetes",
        }
    }

    /// The mount point workspaces are seen at.
    pub fn mount_point(&self) -> &Path {
        match self {
            Backend::Local(c) => &c.mount_point,
            Backend::Docker(c) => &c.mount_point,
            Backend::Kubernetes(c) => &c.mount_point,
        }
    }

    /// Sets the mount point (SWE-bench environments expect `/testbed`).
    pub fn set_mount_point(&mut self, p: impl Into<PathBuf>) {
        let p = p.into();
        match self {
            Backend::Local(c) => c.mount_point = p,
            Backend::Docker(c) => c.mount_point = p,
            Backend::Kubernetes(c) => c.mount_point = p,
        }
    }

    /// Checks what the types alone cannot, before anything connects; the error names the
    /// field (`docker.lease_s: …`).
    pub fn validate(&self) -> Result<(), SandboxError> {
        let bad = |field: &str, reason: String| {
            Err(SandboxError::Config {
                field: format!("{}.{field}", self.kind()),
                reason,
            })
        };
        if !self.mount_point().is_absolute() {
            return bad(
                "mount_point",
                format!("`{}` is not an absolute path", self.mount_point().display()),
            );
        }
        let leases = |lease_s: u64, max_lifetime_s: u64| {
            if lease_s < 3 {
                return bad(
                    "lease_s",
                    format!("{lease_s} s is too short (at least 3: it is renewed every third)"),
                );
            }
            if max_lifetime_s < lease_s {
                return bad(
                    "max_lifetime_s",
                    format!("{max_lifetime_s} s is shorter than lease_s ({lease_s} s)"),
                );
            }
            Ok(())
        };
        let image = |img: &Option<String>| match img {
            Some(i) => images::check_reference(i).or_else(|e| bad("default_image", e)),
            None => Ok(()),
        };
        match self {
            Backend::Local(c) => {
                if c.uid_slots == 0 {
                    return bad("uid_slots", "must be at least 1".into());
                }
            }
            Backend::Docker(c) => {
                leases(c.lease_s, c.max_lifetime_s)?;
                image(&c.default_image)?;
                if let Some(e) = &c.endpoint {
                    let tcp = e.starts_with("tcp://") || e.starts_with("https://");
                    if !(tcp || e.starts_with("unix://") || e.starts_with("http://")) {
                        return bad(
                            "endpoint",
                            format!(
                                "`{e}`: use unix://PATH, tcp://HOST:PORT (with tls) or http://HOST:PORT"
                            ),
                        );
                    }
                    if c.tls.is_some() && !tcp {
                        return bad(
                            "tls",
                            format!("TLS needs a tcp:// or https:// endpoint, not `{e}`"),
                        );
                    }
                }
                if let Some(t) = &c.tls {
                    for (f, p) in [
                        ("tls.ca", &t.ca),
                        ("tls.cert", &t.cert),
                        ("tls.key", &t.key),
                    ] {
                        if !p.is_file() {
                            return bad(f, format!("{} does not exist", p.display()));
                        }
                    }
                }
                if c.cpus.is_some_and(|x| x.is_nan() || x <= 0.0) {
                    return bad("cpus", "must be above 0".into());
                }
                if c.memory_bytes.is_some_and(|m| m < 6 << 20) {
                    return bad("memory_bytes", "the engine needs at least 6 MiB".into());
                }
                if c.api_timeout_s == 0 {
                    return bad("api_timeout_s", "must be at least 1".into());
                }
            }
            Backend::Kubernetes(c) => {
                leases(c.lease_s, c.max_lifetime_s)?;
                image(&c.default_image)?;
                if !kube::dns_label(&c.namespace) {
                    return bad(
                        "namespace",
                        format!(
                            "`{}` is not a DNS label (lowercase letters, digits, `-`; at most 63)",
                            c.namespace
                        ),
                    );
                }
                if let Some(rc) = &c.runtime_class
                    && !rc.split('.').all(kube::dns_label)
                {
                    return bad("runtime_class", format!("`{rc}` is not a DNS subdomain"));
                }
                for (f, q) in [("cpu", &c.cpu), ("memory", &c.memory)] {
                    if let Some(q) = q
                        && !kube::quantity_ok(q)
                    {
                        return bad(
                            f,
                            format!("`{q}` is not a Kubernetes quantity (e.g. 2, 500m, 4Gi)"),
                        );
                    }
                }
                if c.start_timeout_s == 0 {
                    return bad("start_timeout_s", "must be at least 1".into());
                }
            }
        }
        Ok(())
    }
}

/// Builds the sandbox for a backend after validating its settings (connecting to the engine /
/// API server where there is one), and for the container backends starts a sweeper
/// (`sweep_every_s`) that runs while the sandbox lives; fails clearly for a backend it cannot
/// reach.
pub async fn open(backend: &Backend) -> Result<Arc<dyn Sandbox>, SandboxError> {
    backend.validate()?;
    match backend {
        Backend::Local(cfg) => Ok(Arc::new(BwrapSandbox::new(cfg.clone())?)),
        Backend::Docker(cfg) => {
            let sb = Arc::new(DockerSandbox::connect(cfg.clone()).await?);
            sweep_while_alive(&sb, cfg.sweep_every_s);
            Ok(sb)
        }
        Backend::Kubernetes(cfg) => {
            let sb = Arc::new(KubeSandbox::connect(cfg.clone()).await?);
            sweep_while_alive(&sb, cfg.sweep_every_s);
            Ok(sb)
        }
    }
}

/// A backend whose leftovers a sweep removes.
#[async_trait::async_trait]
trait Sweeps: Send + Sync + 'static {
    async fn sweep_once(&self) -> Result<SweepReport, SandboxError>;
}

#[async_trait::async_trait]
impl Sweeps for DockerSandbox {
    async fn sweep_once(&self) -> Result<SweepReport, SandboxError> {
        self.sweep().await
    }
}

#[async_trait::async_trait]
impl Sweeps for KubeSandbox {
    async fn sweep_once(&self) -> Result<SweepReport, SandboxError> {
        self.sweep().await
    }
}

/// Sweeps every `every_s` seconds (0: never) until the sandbox is dropped.
fn sweep_while_alive<S: Sweeps>(sb: &Arc<S>, every_s: u64) {
    if every_s == 0 {
        return;
    }
    let weak = Arc::downgrade(sb);
    tokio::spawn(async move {
        loop {
            let Some(sb) = weak.upgrade() else { return };
            if let Err(e) = sb.sweep_once().await {
                tracing::warn!(error = %e, "sandbox sweep failed");
            }
            drop(sb);
            tokio::time::sleep(Duration::from_secs(every_s)).await;
        }
    });
}

/// What a workspace starts from.
#[derive(Debug, Clone, Default)]
pub struct WorkspaceSpec {
    /// Host directory copied (not bound) into the workspace (into the image's tree on the
    /// container backends).
    pub source: Option<PathBuf>,
    /// Container image holding the tree (Docker / Kubernetes backends).
    pub image: Option<String>,
    /// Extra files written into the workspace after the copy: (relative path, contents).
    pub files: Vec<(String, Vec<u8>)>,
    /// Task id recorded on the workspace (container label) for the sweeper and for audits.
    pub task: Option<String>,
}

/// A prepared workspace. Dropping it removes it (the host copy, the container); prefer
/// [`Sandbox::release`], which waits for the removal and reports failures.
#[derive(Debug)]
pub struct Workspace {
    pub id: String,
    /// Where the command sees the workspace.
    pub mount_point: PathBuf,
    /// The image the workspace was made from, with the digest it resolved to (container
    /// backends), for the run record.
    pub image: Option<ImageRecord>,
    pub(crate) inner: WorkspaceInner,
}

/// An image as it was used: the name given and what it resolved to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub name: String,
    /// `repo@sha256:…` when the image came from a registry, else the local image id
    /// (`sha256:…`).
    pub digest: String,
}

#[derive(Debug)]
pub(crate) enum WorkspaceInner {
    Local(local::WorkspaceInner),
    Docker(docker::WorkspaceInner),
    Kubernetes(kube::WorkspaceInner),
}

impl Workspace {
    /// Where the workspace lives on the host, for backends that keep it there (local).
    pub fn host_path(&self) -> Option<&Path> {
        match &self.inner {
            WorkspaceInner::Local(l) => Some(l.host_path()),
            WorkspaceInner::Docker(_) | WorkspaceInner::Kubernetes(_) => None,
        }
    }

    /// Host path of a file inside the workspace, refusing paths that leave it. Only the local
    /// backend keeps workspaces on the host; use [`Sandbox::read_file`] to work on any backend.
    pub fn host_file(&self, rel: &str) -> Result<PathBuf, SandboxError> {
        let root = self.host_path().ok_or(SandboxError::NoHostPath)?;
        Ok(root.join(safe_relative(rel)?))
    }
}

/// Rejects absolute paths, `..`, and NUL so outside paths never escape a workspace.
pub fn safe_relative(rel: &str) -> Result<PathBuf, SandboxError> {
    if rel.is_empty() || rel.contains('\0') {
        return Err(SandboxError::BadPath(rel.to_string()));
    }
    let p = Path::new(rel);
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::Normal(s) => out.push(s),
            std::path::Component::CurDir => {}
            _ => return Err(SandboxError::BadPath(rel.to_string())),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(SandboxError::BadPath(rel.to_string()));
    }
    Ok(out)
}

/// One command to run in a workspace.
#[derive(Debug, Clone, Default)]
pub struct RunSpec {
    pub argv: Vec<String>,
    /// Added to the clean base environment (`PATH`, `HOME`, `TZ=UTC`, `PYTHONHASHSEED`, `LANG`).
    pub env: BTreeMap<String, String>,
    /// Working directory relative to the workspace root (default: the root).
    pub cwd: Option<String>,
    pub stdin: Option<Vec<u8>>,
    /// Allow network access (off by default).
    pub network: bool,
}

impl RunSpec {
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        RunSpec {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }

    /// `/bin/sh -c script`.
    pub fn shell(script: impl Into<String>) -> Self {
        RunSpec::new(["/bin/sh".to_string(), "-c".to_string(), script.into()])
    }
}

/// Resource limits for one run. `None` means "not limited" for that resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Wall-clock limit; the whole process tree is killed when it expires.
    pub wall_time: Duration,
    /// CPU seconds per process (RLIMIT_CPU: SIGXCPU at the soft limit, SIGKILL one second later).
    pub cpu_time: Option<Duration>,
    /// Address-space cap per process (RLIMIT_AS).
    pub memory_bytes: Option<u64>,
    /// Processes (threads included) the sandbox may hold at once (RLIMIT_NPROC on a uid that
    /// only this sandbox uses; see [`local`] for how).
    pub max_processes: Option<u64>,
    /// Largest file a process may write (RLIMIT_FSIZE).
    pub file_size_bytes: Option<u64>,
    /// Bytes of stdout and of stderr kept (head and tail; the middle is cut with a marker).
    pub output_bytes: usize,
    /// Total bytes on stdout + stderr after which the run is killed (`None`: keep draining).
    pub output_kill_bytes: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            wall_time: Duration::from_secs(60),
            cpu_time: Some(Duration::from_secs(60)),
            memory_bytes: Some(4 << 30),
            max_processes: Some(256),
            file_size_bytes: Some(1 << 30),
            output_bytes: 1 << 20,
            output_kill_bytes: Some(64 << 20),
        }
    }
}

/// Why a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The command exited by itself (any exit code).
    Exited,
    /// Killed by a signal it did not receive from us (e.g. a crash).
    Signaled,
    /// Wall-time limit reached; the tree was killed.
    WallTimeout,
    /// CPU-time limit reached (SIGXCPU / SIGKILL from RLIMIT_CPU).
    CpuTimeLimit,
    /// Output beyond `output_kill_bytes`; the tree was killed.
    OutputLimit,
}

/// Result of one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunOutput {
    /// Exit code of the command; for a command killed by signal N this is `128 + N`.
    pub exit_code: Option<i32>,
    /// The signal that ended the command, when one did.
    pub signal: Option<i32>,
    pub stop: StopReason,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Bytes the command wrote to stdout / stderr (before truncation).
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    pub truncated: bool,
    pub wall_time: Duration,
    /// User + system CPU of the sandbox's process tree, where the backend can measure it.
    /// The local backend cannot: bwrap's outer process exits before its PID-1 reaper is
    /// reaped, so no rusage of the tree reaches us (CPU-limit hits are still detected from
    /// SIGXCPU). `None` then.
    pub cpu_time: Option<Duration>,
    /// Peak resident memory of the tree, where measurable (`None` for the local backend).
    pub max_rss_bytes: Option<u64>,
}

impl RunOutput {
    pub fn success(&self) -> bool {
        self.stop == StopReason::Exited && self.exit_code == Some(0)
    }
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A setting out of range; `field` is its path below the backend (`docker.lease_s`).
    #[error("invalid sandbox setting `{field}`: {reason}")]
    Config { field: String, reason: String },
    #[error("bubblewrap (`{0}`) not found or not usable: {1}")]
    BwrapUnavailable(String, String),
    #[error("path `{0}` is absolute, empty, or leaves the workspace")]
    BadPath(String),
    #[error("preparing workspace from {path}: {source}")]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "workspace image `{0}` needs the docker or kubernetes backend; the local backend copies a host tree (`source`)"
    )]
    ImageNeedsContainerBackend(String),
    #[error("empty command")]
    EmptyCommand,
    #[error("starting the sandbox: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("sandbox I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("no free sandbox uid slot (all {0} in use)")]
    NoSlot(usize),
    #[error("this workspace is not on the host (container backend); use Sandbox::read_file")]
    NoHostPath,
    #[error("workspace `{0}` belongs to another sandbox backend")]
    WrongBackend(String),
    #[error("kubernetes: {0}")]
    Kubernetes(String),
    #[error("docker engine at {endpoint}: {message}")]
    Docker { endpoint: String, message: String },
    #[error("image `{image}`: {message}")]
    Image { image: String, message: String },
    #[error(
        "workspace {0} needs an image: set WorkspaceSpec::image or the backend's default_image"
    )]
    NoImage(String),
    #[error("file `{0}` in the workspace: {1}")]
    File(String, String),
}

/// Isolated command execution. Implementations are shared across tasks (`Arc<dyn Sandbox>`).
#[async_trait::async_trait]
pub trait Sandbox: Send + Sync {
    /// Backend name, for logs and reports.
    fn name(&self) -> &'static str;
    /// Whether workspaces start from an image ([`WorkspaceSpec::image`]) rather than a host
    /// tree.
    fn uses_images(&self) -> bool {
        false
    }
    /// Creates a private workspace from a source tree / image plus extra files.
    async fn prepare(&self, spec: &WorkspaceSpec) -> Result<Workspace, SandboxError>;
    /// Runs one command in the workspace under the limits. Errors are sandbox failures
    /// (infrastructure), never the command's own failure, which is in [`RunOutput`].
    async fn run(
        &self,
        ws: &Workspace,
        spec: &RunSpec,
        limits: &Limits,
    ) -> Result<RunOutput, SandboxError>;
    /// Writes a file into the workspace (parents created), refusing paths that leave it.
    async fn write_file(&self, ws: &Workspace, rel: &str, data: &[u8]) -> Result<(), SandboxError>;
    /// Reads a regular file of the workspace, refusing paths (and symbolic links) that leave
    /// it.
    async fn read_file(&self, ws: &Workspace, rel: &str) -> Result<Vec<u8>, SandboxError>;
    /// Removes the workspace. Dropping a [`Workspace`] does the same.
    async fn release(&self, ws: Workspace) -> Result<(), SandboxError> {
        drop(ws);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_relative_rejects_escapes() {
        assert!(safe_relative("../x").is_err());
        assert!(safe_relative("/etc/passwd").is_err());
        assert!(safe_relative("a/../../b").is_err());
        assert!(safe_relative("a\0b").is_err());
        assert!(safe_relative("").is_err());
        assert_eq!(safe_relative("./a/b.py").unwrap(), PathBuf::from("a/b.py"));
    }

    #[tokio::test]
    async fn unreachable_backends_say_where() {
        let e = open(&Backend::Kubernetes(KubernetesConfig {
            cluster_url: Some("http://127.0.0.1:9".into()),
            ..Default::default()
        }))
        .await
        .err()
        .unwrap();
        assert!(e.to_string().contains("not reachable"), "{e}");
        let e = open(&Backend::Docker(DockerConfig {
            endpoint: Some("unix:///nonexistent/docker.sock".into()),
            ..Default::default()
        }))
        .await
        .err()
        .unwrap();
        assert!(e.to_string().contains("/nonexistent/docker.sock"), "{e}");
    }

    #[test]
    fn backend_settings_are_validated_naming_the_field() {
        let err = |b: Backend| b.validate().unwrap_err().to_string();
        assert!(Backend::default().validate().is_ok());
        let d = |f: fn(&mut DockerConfig)| {
            let mut c = DockerConfig::default();
            f(&mut c);
            Backend::Docker(c)
        };
        assert!(d(|_| {}).validate().is_ok());
        assert!(err(d(|c| c.lease_s = 1)).contains("docker.lease_s"));
        assert!(err(d(|c| c.max_lifetime_s = 10)).contains("docker.max_lifetime_s"));
        assert!(err(d(|c| c.endpoint = Some("ftp://x".into()))).contains("docker.endpoint"));
        assert!(err(d(|c| c.cpus = Some(0.0))).contains("docker.cpus"));
        assert!(err(d(|c| c.default_image = Some("a b".into()))).contains("docker.default_image"));
        assert!(err(d(|c| c.mount_point = "testbed".into())).contains("docker.mount_point"));
        let tls = DockerTls {
            ca: "/nonexistent/ca.pem".into(),
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
        };
        let mut c = DockerConfig {
            endpoint: Some("unix:///var/run/docker.sock".into()),
            tls: Some(tls),
            ..Default::default()
        };
        assert!(err(Backend::Docker(c.clone())).contains("docker.tls"));
        c.endpoint = Some("tcp://127.0.0.1:2376".into());
        assert!(err(Backend::Docker(c)).contains("`docker.tls.ca`: /nonexistent/ca.pem"));
        let k = |f: fn(&mut KubernetesConfig)| {
            let mut c = KubernetesConfig::default();
            f(&mut c);
            Backend::Kubernetes(c)
        };
        assert!(k(|c| c.cpu = Some("500m".into())).validate().is_ok());
        assert!(k(|c| c.memory = Some("4Gi".into())).validate().is_ok());
        assert!(k(|c| c.memory = Some("1.5e9".into())).validate().is_ok());
        assert!(err(k(|c| c.memory = Some("4 GB".into()))).contains("kubernetes.memory"));
        assert!(err(k(|c| c.cpu = Some("two".into()))).contains("kubernetes.cpu"));
        assert!(err(k(|c| c.namespace = "Sandboxes".into())).contains("kubernetes.namespace"));
        assert!(err(k(|c| c.runtime_class = Some("g_visor".into()))).contains("runtime_class"));
        assert!(err(k(|c| c.lease_s = 0)).contains("kubernetes.lease_s"));
    }

    #[test]
    fn backend_config_parses() {
        let b: Backend = serde_json::from_str(
            r#"{"kind":"docker","endpoint":"unix:///var/run/docker.sock","pull_policy":"never","owner":"w1"}"#,
        )
        .unwrap();
        let Backend::Docker(d) = b else { panic!() };
        assert_eq!(d.pull_policy, PullPolicy::Never);
        assert_eq!(d.owner, "w1");
        assert_eq!(d.mount_point, PathBuf::from("/testbed"));
        // A misspelt option is refused, not ignored.
        let e = serde_json::from_str::<Backend>(r#"{"kind":"docker","pul_policy":"never"}"#)
            .unwrap_err();
        assert!(e.to_string().contains("pul_policy"), "{e}");
        let e = serde_json::from_str::<Backend>(r#"{"kind":"podman"}"#).unwrap_err();
        assert!(e.to_string().contains("podman"), "{e}");
    }
}
