//! Local backend on bubblewrap (`bwrap`).
//!
//! How each guarantee is met (checked in this container: bwrap 0.8.0, kernel 6.18, running as
//! root, unprivileged user namespaces allowed):
//!
//! * **Isolation**: `--unshare-all` (user, pid, net, ipc, uts, cgroup namespaces), a fresh root
//!   with only `/usr`, `/etc` and the configured extra paths bound read-only, a private `/tmp`
//!   tmpfs, a new `/proc` and a minimal `/dev`. The workspace is a *copy* of the source tree,
//!   bound read-write at [`LocalConfig::mount_point`]; nothing else of the host is writable.
//!   `--new-session` stops TIOCSTI injection into a terminal; `--die-with-parent` ties the
//!   sandbox to its bwrap process.
//! * **Network**: off via the net namespace (only a down loopback); `--share-net` when allowed.
//! * **Process count**: RLIMIT_NPROC counts processes *per user*, so a limit shared by every
//!   sandbox of one uid would be meaningless under parallel workers. When the evaluator runs
//!   as root, each workspace gets its own host uid from a pool ([`LocalConfig::uid_base`] +
//!   slot): bwrap runs as root *without* a user namespace (so it can bind paths such as an
//!   interpreter under a 0700 `/root`), and the command is started through util-linux
//!   `setpriv` as that pool uid with every capability and the bounding set dropped (bwrap sets
//!   no_new_privs too). The kernel then counts exactly that sandbox's processes. When the
//!   evaluator is not root, bwrap runs unprivileged with a user namespace and the limit
//!   applies to the caller's uid (weaker: it counts all of that user's processes). Several
//!   evaluator processes on one host should use disjoint `uid_base` ranges.
//! * **CPU / memory / file size**: RLIMIT_CPU (soft = limit → SIGXCPU, hard = limit + 1 s →
//!   SIGKILL), RLIMIT_AS, RLIMIT_FSIZE, set before bwrap starts and inherited by every
//!   process. These are per process, not per tree; the process-count and wall limits bound the
//!   tree. (cgroups would give per-tree accounting; they are not required by this backend.)
//! * **Wall time and clean-up**: bwrap runs in its own process group; with `--unshare-pid` its
//!   init is PID 1 of the sandbox, so when bwrap exits or is SIGKILLed on expiry, the kernel
//!   kills every process left in the PID namespace, including ones that called `setsid`.
//!   `PR_SET_PDEATHSIG` on bwrap kills the sandbox if the evaluator itself dies.
//! * **Output**: stdout/stderr are drained continuously into bounded head+tail buffers; past
//!   `output_kill_bytes` the tree is killed (`StopReason::OutputLimit`).
//! * **Environment**: `--clearenv`, then `PATH`, `HOME=/tmp`, `LANG=C.UTF-8`, `TZ=UTC`,
//!   `PYTHONHASHSEED` (fixed) and the caller's variables.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::WorkspaceInner as Inner;
use crate::output::Capture;
use crate::{
    Limits, RunOutput, RunSpec, Sandbox, SandboxError, StopReason, Workspace, WorkspaceSpec,
    safe_relative,
};

/// util-linux `setpriv`, used in root mode to drop to the pool uid inside the sandbox.
const SETPRIV: &str = "/usr/bin/setpriv";

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Settings of the bubblewrap backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalConfig {
    /// The bwrap executable.
    pub bwrap: PathBuf,
    /// Where workspace copies are created (default: the system temp dir).
    pub work_root: Option<PathBuf>,
    /// Where the command sees its workspace (SWE-bench uses `/testbed`).
    pub mount_point: PathBuf,
    /// Extra host paths made visible read-only at the same path (interpreters, conda envs).
    pub ro_binds: Vec<PathBuf>,
    /// First host uid of the per-workspace pool (used only when running as root).
    pub uid_base: u32,
    /// Size of that pool, i.e. how many workspaces may exist at once.
    pub uid_slots: usize,
    /// When running as root, start bwrap under a pool uid (recommended; see module docs).
    pub drop_privileges: bool,
    pub python_hash_seed: String,
    /// Size cap of the private `/tmp` tmpfs.
    pub tmp_size_bytes: Option<u64>,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            bwrap: PathBuf::from("bwrap"),
            work_root: None,
            mount_point: PathBuf::from("/workspace"),
            ro_binds: Vec::new(),
            uid_base: 1_800_000,
            uid_slots: 4096,
            drop_privileges: true,
            python_hash_seed: "0".to_string(),
            tmp_size_bytes: Some(512 << 20),
        }
    }
}

/// Backend state of a local workspace.
#[derive(Debug)]
pub(crate) struct WorkspaceInner {
    dir: tempfile::TempDir,
    slot: Option<SlotGuard>,
}

impl WorkspaceInner {
    pub(crate) fn host_path(&self) -> &Path {
        self.dir.path()
    }
}

/// A uid from the pool, given back on drop.
#[derive(Debug)]
struct SlotGuard {
    index: usize,
    uid: u32,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if let Ok(mut used) = slot_table().lock() {
            used[self.index] = false;
        }
    }
}

/// Process-wide slot table so two sandboxes in one process never share a uid.
fn slot_table() -> &'static Mutex<Vec<bool>> {
    static SLOTS: OnceLock<Mutex<Vec<bool>>> = OnceLock::new();
    SLOTS.get_or_init(|| Mutex::new(Vec::new()))
}

fn take_slot(cfg: &LocalConfig) -> Result<SlotGuard, SandboxError> {
    let mut used = slot_table().lock().expect("slot table poisoned");
    if used.len() < cfg.uid_slots {
        used.resize(cfg.uid_slots, false);
    }
    let index = used[..cfg.uid_slots]
        .iter()
        .position(|u| !u)
        .ok_or(SandboxError::NoSlot(cfg.uid_slots))?;
    used[index] = true;
    Ok(SlotGuard {
        index,
        uid: cfg.uid_base + index as u32,
    })
}

/// bubblewrap sandbox.
#[derive(Debug, Clone)]
pub struct BwrapSandbox {
    cfg: LocalConfig,
    as_root: bool,
}

impl BwrapSandbox {
    /// Checks that bwrap runs at all, so a missing binary is reported at start-up.
    pub fn new(cfg: LocalConfig) -> Result<Self, SandboxError> {
        let out = std::process::Command::new(&cfg.bwrap)
            .arg("--version")
            .output()
            .map_err(|e| {
                SandboxError::BwrapUnavailable(cfg.bwrap.display().to_string(), e.to_string())
            })?;
        if !out.status.success() {
            return Err(SandboxError::BwrapUnavailable(
                cfg.bwrap.display().to_string(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        // SAFETY: geteuid has no preconditions.
        let as_root = unsafe { libc::geteuid() } == 0;
        if as_root && cfg.drop_privileges && !Path::new(SETPRIV).exists() {
            return Err(SandboxError::BwrapUnavailable(
                SETPRIV.into(),
                "needed to drop to the sandbox uid when running as root (util-linux)".into(),
            ));
        }
        Ok(BwrapSandbox { cfg, as_root })
    }

    pub fn config(&self) -> &LocalConfig {
        &self.cfg
    }

    fn inner<'a>(&self, ws: &'a Workspace) -> Result<&'a WorkspaceInner, SandboxError> {
        match &ws.inner {
            Inner::Local(l) => Ok(l),
            _ => Err(SandboxError::WrongBackend(ws.id.clone())),
        }
    }

    /// Host path of `rel` in the workspace, refusing paths that leave it, also through
    /// symbolic links the sandboxed command may have planted.
    fn resolve(&self, ws: &Workspace, rel: &str) -> Result<PathBuf, SandboxError> {
        let root = self.inner(ws)?.host_path();
        let p = root.join(safe_relative(rel)?);
        let real = p
            .canonicalize()
            .map_err(|e| SandboxError::File(rel.to_string(), e.to_string()))?;
        let real_root = root.canonicalize()?;
        if !real.starts_with(&real_root) {
            return Err(SandboxError::BadPath(rel.to_string()));
        }
        Ok(real)
    }

    fn bwrap_args(
        &self,
        ws: &Workspace,
        inner: &WorkspaceInner,
        spec: &RunSpec,
        fds: &[OwnedFd],
    ) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
        let uid = inner.slot.as_ref().map(|s| s.uid);
        if uid.is_some() {
            // Root mode: no user namespace (the command runs as a real pool uid, so
            // RLIMIT_NPROC counts only its own processes); every other namespace is new.
            push(&[
                "--unshare-ipc",
                "--unshare-pid",
                "--unshare-net",
                "--unshare-uts",
                "--unshare-cgroup-try",
            ]);
        } else {
            push(&["--unshare-all"]);
        }
        push(&["--die-with-parent", "--new-session"]);
        if spec.network {
            push(&["--share-net"]);
        }
        push(&["--hostname", "sandbox"]);
        push(&["--ro-bind", "/usr", "/usr"]);
        // Merged-/usr systems have /bin etc. as symlinks; others have real directories.
        for top in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"] {
            let p = Path::new(top);
            match std::fs::symlink_metadata(p) {
                Ok(m) if m.file_type().is_symlink() => {
                    if let Ok(target) = std::fs::read_link(p) {
                        a.extend(["--symlink".into(), target.display().to_string(), top.into()]);
                    }
                }
                Ok(m) if m.is_dir() => a.extend(["--ro-bind".into(), top.into(), top.into()]),
                _ => {}
            }
        }
        a.extend(["--ro-bind".into(), "/etc".into(), "/etc".into()]);
        // Extra paths and the workspace are bound through descriptors opened here, so paths
        // the sandbox uid could not traverse (e.g. an interpreter under /root) still work.
        let mut made: Vec<PathBuf> = Vec::new();
        for (fd, p) in fds.iter().skip(1).zip(&self.cfg.ro_binds) {
            // Parents bwrap would create copy the host's modes (e.g. 0700 /root), which the
            // sandbox uid could not traverse: create them 0755 first.
            parent_dirs(p, &mut made, &mut a);
            a.extend([
                "--ro-bind-fd".into(),
                fd.as_raw_fd().to_string(),
                p.display().to_string(),
            ]);
        }
        a.extend([
            "--proc".into(),
            "/proc".into(),
            "--dev".into(),
            "/dev".into(),
        ]);
        if let Some(sz) = self.cfg.tmp_size_bytes {
            a.extend(["--size".into(), sz.to_string()]);
        }
        a.extend([
            "--perms".into(),
            "1777".into(),
            "--tmpfs".into(),
            "/tmp".into(),
        ]);
        let mp = ws.mount_point.display().to_string();
        // The same for the mount point's parents: a workspace mounted at a deep path (a venv
        // built at its final place) stays reachable.
        parent_dirs(&ws.mount_point, &mut made, &mut a);
        a.extend([
            "--bind-fd".into(),
            fds[0].as_raw_fd().to_string(),
            mp.clone(),
        ]);
        let cwd = match spec.cwd.as_deref() {
            Some(c) => ws
                .mount_point
                .join(safe_relative(c).unwrap_or_default())
                .display()
                .to_string(),
            None => mp,
        };
        a.extend(["--chdir".into(), cwd]);
        a.push("--clearenv".into());
        let mut env = std::collections::BTreeMap::new();
        env.insert("PATH".to_string(), DEFAULT_PATH.to_string());
        env.insert("HOME".to_string(), "/tmp".to_string());
        env.insert("LANG".to_string(), "C.UTF-8".to_string());
        env.insert("TZ".to_string(), "UTC".to_string());
        env.insert(
            "PYTHONHASHSEED".to_string(),
            self.cfg.python_hash_seed.clone(),
        );
        for (k, v) in &spec.env {
            env.insert(k.clone(), v.clone());
        }
        for (k, v) in env {
            a.extend(["--setenv".into(), k, v]);
        }
        if let Some(u) = uid {
            // bwrap runs as root; setpriv drops to the pool uid with no capabilities left
            // (bwrap also sets no_new_privs, so setuid binaries cannot regain any).
            let u = u.to_string();
            for cap in ["CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP"] {
                a.extend(["--cap-add".into(), cap.into()]);
            }
            a.push("--".into());
            a.extend(
                [
                    SETPRIV,
                    "--reuid",
                    &u,
                    "--regid",
                    &u,
                    "--clear-groups",
                    "--inh-caps=-all",
                    "--bounding-set=-all",
                    "--",
                ]
                .iter()
                .map(|s| s.to_string()),
            );
        } else {
            a.push("--".into());
        }
        a.extend(spec.argv.iter().cloned());
        a
    }
}

/// Kills the sandbox's process group once, and never after the process was reaped (so a
/// recycled pid is never signalled).
struct Killer {
    pid: i32,
    reaped: Mutex<bool>,
    reason: Mutex<Option<StopReason>>,
}

impl Killer {
    fn kill(&self, reason: StopReason) {
        let reaped = self.reaped.lock().expect("killer poisoned");
        if *reaped {
            return;
        }
        let mut r = self.reason.lock().expect("killer poisoned");
        if r.is_none() {
            *r = Some(reason);
        }
        // SAFETY: plain syscalls on a pid we own and have not reaped (lock held).
        unsafe {
            libc::kill(-self.pid, libc::SIGKILL);
            libc::kill(self.pid, libc::SIGKILL);
        }
    }
}

/// Kills the sandbox when dropped; a no-op once the process was reaped.
struct KillOnDrop(Arc<Killer>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.0.kill(StopReason::WallTimeout);
    }
}

fn set_rlimit(res: libc::__rlimit_resource_t, soft: u64, hard: u64) -> std::io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit is async-signal-safe and only reads `lim`.
    if unsafe { libc::setrlimit(res, &lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

struct Waited {
    status: i32,
}

/// Waits for `pid` without reaping, then reaps it while holding the killer's lock, so the
/// killer never signals a recycled pid.
fn wait_child(killer: &Killer) -> std::io::Result<Waited> {
    loop {
        // SAFETY: siginfo is plain data; waitid with WNOWAIT leaves the zombie in place.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                killer.pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if r == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    let mut reaped = killer.reaped.lock().expect("killer poisoned");
    let mut status = 0i32;
    // SAFETY: waitpid only writes `status`.
    let r = unsafe { libc::waitpid(killer.pid, &mut status, 0) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    *reaped = true;
    Ok(Waited { status })
}

fn drain(
    mut r: impl Read,
    cap: Arc<Mutex<Capture>>,
    total: Arc<std::sync::atomic::AtomicU64>,
    kill_at: Option<u64>,
    killer: Arc<Killer>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                cap.lock().expect("capture poisoned").push(&buf[..n]);
                let t = total.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed) + n as u64;
                if let Some(k) = kill_at
                    && t > k
                {
                    killer.kill(StopReason::OutputLimit);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

#[async_trait::async_trait]
impl Sandbox for BwrapSandbox {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn prepare(&self, spec: &WorkspaceSpec) -> Result<Workspace, SandboxError> {
        if let Some(img) = &spec.image {
            return Err(SandboxError::ImageNeedsContainerBackend(img.clone()));
        }
        let root = self
            .cfg
            .work_root
            .clone()
            .unwrap_or_else(std::env::temp_dir);
        std::fs::create_dir_all(&root).map_err(|source| SandboxError::Prepare {
            path: root.clone(),
            source,
        })?;
        let dir = tempfile::Builder::new()
            .prefix("davinci-sbx-")
            .tempdir_in(&root)
            .map_err(|source| SandboxError::Prepare {
                path: root.clone(),
                source,
            })?;
        let host = dir.path().to_path_buf();
        if let Some(src) = &spec.source {
            // `cp -a` keeps modes, symlinks (not followed) and hard links, like a checkout.
            let out = tokio::process::Command::new("cp")
                .arg("-a")
                .arg("--")
                .arg(format!("{}/.", src.display()))
                .arg(&host)
                .output()
                .await
                .map_err(|source| SandboxError::Prepare {
                    path: src.clone(),
                    source,
                })?;
            if !out.status.success() {
                return Err(SandboxError::Prepare {
                    path: src.clone(),
                    source: std::io::Error::other(
                        String::from_utf8_lossy(&out.stderr).trim().to_string(),
                    ),
                });
            }
        }
        for (rel, data) in &spec.files {
            let p = host.join(safe_relative(rel)?);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&p, data).map_err(|source| SandboxError::Prepare {
                path: p.clone(),
                source,
            })?;
        }
        let slot = if self.as_root && self.cfg.drop_privileges {
            let slot = take_slot(&self.cfg)?;
            chown_tree(&host, slot.uid)?;
            Some(slot)
        } else {
            None
        };
        let id = host
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Workspace {
            id,
            mount_point: self.cfg.mount_point.clone(),
            image: None,
            inner: Inner::Local(WorkspaceInner { dir, slot }),
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
        if let Some(c) = &spec.cwd {
            safe_relative(c)?;
        }
        let inner = self.inner(ws)?;
        // fds[0] = workspace, then one per extra read-only bind.
        let mut fds = vec![open_path(inner.host_path())?];
        for p in &self.cfg.ro_binds {
            fds.push(open_path(p)?);
        }
        let args = self.bwrap_args(ws, inner, spec, &fds);
        let raw_fds: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let mut cmd = std::process::Command::new(&self.cfg.bwrap);
        cmd.args(&args)
            .env_clear()
            .stdin(if spec.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let cpu = limits.cpu_time.map(|d| d.as_secs().max(1));
        let mem = limits.memory_bytes;
        // Unprivileged mode: bwrap itself holds two processes (itself and the PID-1 reaper)
        // under the same uid. Root mode: bwrap is root and not counted.
        let nproc = limits.max_processes.map(|n| n + 2);
        let fsize = limits.file_size_bytes;
        // SAFETY: the closure only makes async-signal-safe syscalls (fcntl, setrlimit, prctl)
        // between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // The bind descriptors must survive exec into bwrap.
                for &fd in &raw_fds {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(c) = cpu {
                    set_rlimit(libc::RLIMIT_CPU, c, c + 1)?;
                }
                if let Some(m) = mem {
                    set_rlimit(libc::RLIMIT_AS, m, m)?;
                }
                if let Some(n) = nproc {
                    set_rlimit(libc::RLIMIT_NPROC, n, n)?;
                }
                if let Some(f) = fsize {
                    set_rlimit(libc::RLIMIT_FSIZE, f, f)?;
                }
                set_rlimit(libc::RLIMIT_CORE, 0, 0)?;
                // Kill the sandbox if we die.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let start = Instant::now();
        let mut child = cmd.spawn().map_err(SandboxError::Spawn)?;
        drop(fds);
        let killer = Arc::new(Killer {
            pid: child.id() as i32,
            reaped: Mutex::new(false),
            reason: Mutex::new(None),
        });
        // If the caller drops this future (job cancelled), the sandbox dies with it.
        let _guard = KillOnDrop(killer.clone());
        let total = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let out_cap = Arc::new(Mutex::new(Capture::new(limits.output_bytes)));
        let err_cap = Arc::new(Mutex::new(Capture::new(limits.output_bytes)));
        let mut readers = Vec::new();
        if let Some(so) = child.stdout.take() {
            let (c, t, k) = (out_cap.clone(), total.clone(), killer.clone());
            let kill_at = limits.output_kill_bytes;
            readers.push(std::thread::spawn(move || drain(so, c, t, kill_at, k)));
        }
        if let Some(se) = child.stderr.take() {
            let (c, t, k) = (err_cap.clone(), total.clone(), killer.clone());
            let kill_at = limits.output_kill_bytes;
            readers.push(std::thread::spawn(move || drain(se, c, t, kill_at, k)));
        }
        if let (Some(mut si), Some(data)) = (child.stdin.take(), spec.stdin.clone()) {
            // A command that never reads its stdin must not block us: write from a thread.
            std::thread::spawn(move || {
                let _ = si.write_all(&data);
            });
        }
        let wk = killer.clone();
        let mut waiter = tokio::task::spawn_blocking(move || wait_child(&wk));
        let joined = tokio::select! {
            r = &mut waiter => r,
            _ = tokio::time::sleep(limits.wall_time) => {
                killer.kill(StopReason::WallTimeout);
                waiter.await
            }
        };
        let waited = joined.map_err(|e| SandboxError::Io(std::io::Error::other(e)))??;
        let wall = start.elapsed();
        // Make sure nothing of the group is left, then collect the pipes (EOF arrives once the
        // PID namespace is gone).
        // SAFETY: the group id was ours; after reaping the leader only its group can be hit.
        unsafe {
            libc::kill(-killer.pid, libc::SIGKILL);
        }
        for r in readers {
            let _ = tokio::task::spawn_blocking(move || r.join()).await;
        }
        let forced = *killer.reason.lock().expect("killer poisoned");
        let st = waited.status;
        let (exit_code, signal) = if libc::WIFEXITED(st) {
            let code = libc::WEXITSTATUS(st);
            // bwrap reports a command killed by signal N as exit code 128 + N.
            let sig = (129..=128 + 64).contains(&code).then_some(code - 128);
            (Some(code), sig)
        } else if libc::WIFSIGNALED(st) {
            (None, Some(libc::WTERMSIG(st)))
        } else {
            (None, Some(st))
        };
        let stop = match forced {
            Some(r) => r,
            None => match signal {
                Some(s) if s == libc::SIGXCPU => StopReason::CpuTimeLimit,
                Some(_) if exit_code.is_none() => StopReason::Signaled,
                _ => StopReason::Exited,
            },
        };
        let out_cap = std::mem::replace(&mut *out_cap.lock().expect("poisoned"), Capture::new(0));
        let err_cap = std::mem::replace(&mut *err_cap.lock().expect("poisoned"), Capture::new(0));
        let truncated = out_cap.truncated() || err_cap.truncated();
        let (stdout_bytes, stderr_bytes) = (out_cap.total, err_cap.total);
        Ok(RunOutput {
            exit_code: if forced.is_some() { None } else { exit_code },
            signal: if forced.is_some() {
                Some(libc::SIGKILL)
            } else {
                signal
            },
            stop,
            stdout: out_cap.finish(),
            stderr: err_cap.finish(),
            stdout_bytes,
            stderr_bytes,
            truncated,
            wall_time: wall,
            cpu_time: None,
            max_rss_bytes: None,
        })
    }

    async fn write_file(&self, ws: &Workspace, rel: &str, data: &[u8]) -> Result<(), SandboxError> {
        let inner = self.inner(ws)?;
        let rel_path = safe_relative(rel)?;
        let p = inner.host_path().join(&rel_path);
        if let Some(parent) = rel_path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(inner.host_path().join(parent))?;
            // The parent must still be inside after following any link the command made.
            self.resolve(ws, &parent.display().to_string())?;
        }
        if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(SandboxError::File(
                rel.to_string(),
                "is a symbolic link (not followed)".into(),
            ));
        }
        std::fs::write(&p, data).map_err(|e| SandboxError::File(rel.to_string(), e.to_string()))?;
        if let Some(s) = &inner.slot {
            std::os::unix::fs::lchown(&p, Some(s.uid), Some(s.uid))?;
        }
        Ok(())
    }

    async fn read_file(&self, ws: &Workspace, rel: &str) -> Result<Vec<u8>, SandboxError> {
        let p = self.resolve(ws, rel)?;
        std::fs::read(&p).map_err(|e| SandboxError::File(rel.to_string(), e.to_string()))
    }
}

/// Gives the workspace to the sandbox uid (without following symlinks).
fn chown_tree(root: &Path, uid: u32) -> Result<(), SandboxError> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        std::os::unix::fs::lchown(&p, Some(uid), Some(uid)).map_err(|source| {
            SandboxError::Prepare {
                path: p.clone(),
                source,
            }
        })?;
        let meta = std::fs::symlink_metadata(&p)?;
        if meta.is_dir() {
            for e in std::fs::read_dir(&p)? {
                stack.push(e?.path());
            }
        }
    }
    Ok(())
}

/// An `O_PATH` descriptor for a bind source (close-on-exec until the child clears it).
fn open_path(p: &Path) -> Result<OwnedFd, SandboxError> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(p)
        .map_err(|source| SandboxError::Prepare {
            path: p.to_path_buf(),
            source,
        })?;
    Ok(OwnedFd::from(f))
}

/// Adds `--perms 0755 --dir` for each parent of `p` not yet made (outside the system trees the
/// sandbox binds itself), so bwrap does not create them with the host's modes or 0700.
fn parent_dirs(p: &Path, made: &mut Vec<PathBuf>, args: &mut Vec<String>) {
    let mut ancestors: Vec<&Path> = p.ancestors().skip(1).collect();
    ancestors.reverse();
    for anc in ancestors {
        let under_system = ["/usr", "/etc", "/proc", "/dev", "/tmp"]
            .iter()
            .any(|s| anc.starts_with(s));
        if anc == Path::new("/") || under_system || made.iter().any(|m| m == anc) {
            continue;
        }
        args.extend([
            "--perms".into(),
            "0755".into(),
            "--dir".into(),
            anc.display().to_string(),
        ]);
        made.push(anc.to_path_buf());
    }
}
