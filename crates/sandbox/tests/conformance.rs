//! One conformance suite, run against every sandbox backend: hostile commands are contained
//! and reported, limits hold, files round-trip, nothing survives a run or a killed owner.
//!
//! * `local::*`: bubblewrap; needs a working `bwrap` (the product here: fails without it).
//! * `docker::*`: the real Docker Engine, on a base image built from host packages
//!   (`scripts/build_sandbox_image.sh`). Skipped loudly without an engine; under `CI=true` a
//!   missing engine fails.
//! * `kubernetes::*`: the Kubernetes backend against the local fake API server
//!   (`davinci-kube-fake`: REST + exec WebSocket), whose node runs pods on the same Docker
//!   Engine; skipped and required like the Docker suite.

use std::sync::Arc;
use std::time::{Duration, Instant};

use davinci_kube_fake::{FakeCluster, FakeConfig};
use davinci_sandbox::{
    BwrapSandbox, DockerConfig, DockerSandbox, KubeSandbox, KubernetesConfig, Limits, LocalConfig,
    PullPolicy, RunSpec, Sandbox, SandboxError, StopReason, Workspace, WorkspaceSpec, lease,
    testing,
};

/// A backend under test and what the checks need to know about it.
struct Target {
    sb: Arc<dyn Sandbox>,
    kind: Kind,
    /// The test host's address as the sandbox reaches it when network is allowed.
    host_ip: String,
}

#[allow(clippy::large_enum_variant)] // one per test
enum Kind {
    Local,
    Docker(DockerSandbox),
    /// The backend, the fake API server, and the engine its node runs pods on.
    Kube(KubeSandbox, Arc<FakeCluster>, DockerSandbox),
}

/// The fake node's `podPidsLimit`: a Kubernetes sandbox's process cap is the kubelet's, so
/// the suite's node is configured as a sandbox node pool would be, for the suite's limit of
/// 32 processes (+ init, sleeper, wrapper).
const NODE_PIDS: i64 = 35;

const MOUNT: &str = "/testbed";

impl Target {
    fn local() -> Target {
        let sb = BwrapSandbox::new(LocalConfig {
            mount_point: MOUNT.into(),
            ..Default::default()
        })
        .expect("bwrap must be installed for these tests");
        Target {
            sb: Arc::new(sb),
            kind: Kind::Local,
            host_ip: "127.0.0.1".into(),
        }
    }

    async fn docker() -> Option<Target> {
        let sb =
            testing::docker_or_skip("docker conformance", docker_config("conformance")).await?;
        let gw = bridge_gateway(&sb).await;
        Some(Target {
            sb: Arc::new(sb.clone()),
            kind: Kind::Docker(sb),
            host_ip: gw,
        })
    }

    async fn kube() -> Option<Target> {
        let docker =
            testing::docker_or_skip("kubernetes conformance", docker_config("kube-node")).await?;
        let fake = FakeCluster::start(
            FakeConfig {
                pod_pids_limit: Some(NODE_PIDS),
                ..Default::default()
            },
            docker.client().clone(),
        )
        .await
        .expect("fake API server");
        let sb = KubeSandbox::connect(kube_config(&fake, "conformance"))
            .await
            .expect("connect to the fake API server");
        Some(Target {
            sb: Arc::new(sb.clone()),
            kind: Kind::Kube(sb, Arc::new(fake), docker),
            host_ip: String::new(),
        })
    }

    async fn prepare(&self, spec: WorkspaceSpec) -> Workspace {
        self.sb.prepare(&spec).await.expect("prepare")
    }

    async fn run(&self, ws: &Workspace, spec: &RunSpec, l: &Limits) -> davinci_sandbox::RunOutput {
        self.sb.run(ws, spec, l).await.expect("run")
    }

    /// Command lines of processes of the workspace still alive, seen from outside it (the
    /// host's /proc for local sandboxes, the engine's `top` for containers), so looking
    /// never kills anything itself.
    async fn processes(&self, ws: &Workspace, marker: &str) -> Vec<String> {
        match &self.kind {
            Kind::Local => host_processes(marker),
            Kind::Docker(d) => {
                let top = d
                    .client()
                    .top_processes(
                        &ws.id,
                        Some(
                            bollard::query_parameters::TopOptionsBuilder::default()
                                .ps_args("-eo args")
                                .build(),
                        ),
                    )
                    .await;
                match top {
                    Ok(t) => t
                        .processes
                        .unwrap_or_default()
                        .into_iter()
                        .map(|p| p.join(" "))
                        .filter(|c| c.contains(marker))
                        .collect(),
                    // A removed container holds no processes.
                    Err(_) => Vec::new(),
                }
            }
            Kind::Kube(_, fake, docker) => {
                // The node's container of the pod, as its status names it.
                let id = fake
                    .pods()
                    .into_iter()
                    .find(|p| p["metadata"]["name"] == ws.id.as_str())
                    .and_then(|p| {
                        p["status"]["containerStatuses"][0]["containerID"]
                            .as_str()
                            .map(|s| s.trim_start_matches("docker://").to_string())
                    });
                let id: Option<String> = id;
                let Some(id) = id else { return Vec::new() };
                match docker
                    .client()
                    .top_processes(
                        &id,
                        Some(
                            bollard::query_parameters::TopOptionsBuilder::default()
                                .ps_args("-eo args")
                                .build(),
                        ),
                    )
                    .await
                {
                    Ok(t) => t
                        .processes
                        .unwrap_or_default()
                        .into_iter()
                        .map(|p| p.join(" "))
                        .filter(|c| c.contains(marker))
                        .collect(),
                    Err(_) => Vec::new(),
                }
            }
        }
    }

    /// No process of a finished run may survive. A killed tree is torn down asynchronously,
    /// so this waits up to 5 s for the processes to go; one that outlives that was not killed.
    async fn assert_no_leftover(&self, ws: &Workspace, marker: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let left = self.processes(ws, marker).await;
            if left.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "processes left behind: {left:?}");
        }
    }

    fn is_container(&self) -> bool {
        !matches!(self.kind, Kind::Local)
    }

    /// A number for marker commands (`sleep N`) that differs per backend and per test
    /// process: container processes of this engine are visible in the host's /proc too, where
    /// the local checks look, the suites run at the same time, and other programs on the
    /// machine run `sleep 300` too.
    fn n(&self, x: u32) -> u32 {
        let x = x * 1000 + std::process::id() % 97;
        match self.kind {
            Kind::Local => x,
            Kind::Docker(_) => x + 100,
            Kind::Kube(..) => x + 200,
        }
    }
}

fn kube_config(fake: &FakeCluster, owner: &str) -> KubernetesConfig {
    KubernetesConfig {
        cluster_url: Some(fake.url()),
        namespace: "sandboxes".into(),
        default_image: Some(testing::base_image().expect("base image")),
        pull_policy: PullPolicy::Never,
        owner: format!("{owner}-{}", std::process::id()),
        run: "conformance".into(),
        lease_s: 600,
        cpu: Some("1".into()),
        memory: Some("1Gi".into()),
        ..Default::default()
    }
}

fn docker_config(owner: &str) -> DockerConfig {
    DockerConfig {
        owner: format!("{owner}-{}", std::process::id()),
        run: "conformance".into(),
        lease_s: 600,
        ..Default::default()
    }
}

async fn bridge_gateway(sb: &DockerSandbox) -> String {
    let n = sb
        .client()
        .inspect_network("bridge", None)
        .await
        .expect("inspect the bridge network");
    let cfg = n
        .ipam
        .and_then(|i| i.config)
        .and_then(|c| c.into_iter().next())
        .expect("bridge network has an IPAM config");
    // Engines leave the gateway out when it is the subnet's first address.
    cfg.gateway.unwrap_or_else(|| {
        let subnet = cfg.subnet.expect("bridge subnet");
        let net = subnet.split('/').next().unwrap();
        let mut o: Vec<u8> = net.split('.').map(|x| x.parse().unwrap()).collect();
        o[3] += 1;
        format!("{}.{}.{}.{}", o[0], o[1], o[2], o[3])
    })
}

fn host_processes(marker: &str) -> Vec<String> {
    let mut left = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name();
        if name.to_str().and_then(|s| s.parse::<u32>().ok()).is_none() {
            continue;
        }
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(marker) {
                left.push(cmd);
            }
        }
    }
    left
}

fn limits() -> Limits {
    Limits {
        wall_time: Duration::from_secs(20),
        cpu_time: Some(Duration::from_secs(10)),
        ..Limits::default()
    }
}

fn src_tree() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("pkg")).unwrap();
    std::fs::write(d.path().join("pkg/mod.txt"), "original\n").unwrap();
    d
}

async fn runs_in_private_copy_with_clean_env(t: &Target) {
    let src = src_tree();
    let ws = t
        .prepare(WorkspaceSpec {
            source: Some(src.path().to_path_buf()),
            files: vec![("extra/x.txt".into(), b"hi".to_vec())],
            ..Default::default()
        })
        .await;
    // SAFETY: a test process setting a variable only the sandbox must not see.
    unsafe { std::env::set_var("DAVINCI_TEST_SECRET", "leak") };
    let out = t
        .run(
            &ws,
            &RunSpec::shell(
                "cat pkg/mod.txt extra/x.txt; echo changed > pkg/mod.txt; pwd; \
                 echo TZ=$TZ SEED=$PYTHONHASHSEED SECRET=${DAVINCI_TEST_SECRET:-unset}; \
                 echo err >&2; exit 3",
            ),
            &limits(),
        )
        .await;
    let so = out.stdout_str();
    assert_eq!(out.stop, StopReason::Exited);
    assert_eq!(out.exit_code, Some(3));
    assert!(so.contains("original\nhi"), "{so}");
    assert!(so.contains(&format!("{MOUNT}\n")), "{so}");
    assert!(so.contains("TZ=UTC SEED=0 SECRET=unset"), "{so}");
    assert_eq!(out.stderr_str(), "err\n");
    // The copy changed, the source did not.
    assert_eq!(
        t.sb.read_file(&ws, "pkg/mod.txt").await.unwrap(),
        b"changed\n"
    );
    assert_eq!(
        std::fs::read_to_string(src.path().join("pkg/mod.txt")).unwrap(),
        "original\n"
    );
    // Caller variables and the working directory reach the command.
    let mut spec = RunSpec::shell("pwd; echo $FOO");
    spec.env.insert("FOO".into(), "bar baz".into());
    spec.cwd = Some("pkg".into());
    let out = t.run(&ws, &spec, &limits()).await;
    assert_eq!(out.stdout_str(), format!("{MOUNT}/pkg\nbar baz\n"));
    let mut spec = RunSpec::new(["cat"]);
    spec.stdin = Some(b"from stdin".to_vec());
    assert_eq!(t.run(&ws, &spec, &limits()).await.stdout, b"from stdin");
    t.sb.release(ws).await.unwrap();
}

async fn network_is_off_unless_allowed(t: &Target) {
    let ws = t.prepare(WorkspaceSpec::default()).await;
    // A listener on the host: reachable from the host, not from the sandbox.
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let probe = format!(
        "exec 3<>/dev/tcp/{}/{port} && echo CONNECTED || echo REFUSED; \
         cat /sys/class/net/*/operstate 2>/dev/null | tr '\\n' ' '",
        t.host_ip
    );
    let spec = RunSpec::new(["bash", "-c", probe.as_str()]);
    let out = t.run(&ws, &spec, &limits()).await;
    let so = out.stdout_str();
    assert!(so.contains("REFUSED"), "sandbox reached the host: {so}");
    assert!(!so.contains("CONNECTED"));
    let mut allowed = spec.clone();
    allowed.network = true;
    if let Kind::Kube(..) = t.kind {
        // Egress is denied by NetworkPolicy for every sandbox pod; asking is an error.
        let e = t.sb.run(&ws, &allowed, &limits()).await.unwrap_err();
        assert!(e.to_string().contains("NetworkPolicy"), "{e}");
        t.sb.release(ws).await.unwrap();
        return;
    }
    let out = t.run(&ws, &allowed, &limits()).await;
    assert!(
        out.stdout_str().contains("CONNECTED"),
        "{}",
        out.stderr_str()
    );
    // Allowing it once does not leave it on.
    let out = t.run(&ws, &spec, &limits()).await;
    assert!(out.stdout_str().contains("REFUSED"), "{}", out.stdout_str());
    t.sb.release(ws).await.unwrap();
}

async fn writes_outside_the_tree_fail_and_host_is_untouched(t: &Target) {
    let ws = t.prepare(WorkspaceSpec::default()).await;
    let host_dir = tempfile::tempdir().unwrap();
    let victim = host_dir.path().join("victim.txt");
    std::fs::write(&victim, "safe\n").unwrap();
    let script = format!(
        "for p in /etc/davinci-pwned /usr/davinci-pwned {v} {MOUNT}/../escaped; do \
           (echo pwned > \"$p\") 2>/dev/null && echo WROTE:$p || echo DENIED:$p; done; \
         ls {d} 2>/dev/null && echo SEES_HOST || echo HOST_INVISIBLE; \
         echo ok > /tmp/scratch && echo TMP_OK",
        v = victim.display(),
        d = host_dir.path().display()
    );
    let out = t
        .run(&ws, &RunSpec::new(["sh", "-c", script.as_str()]), &limits())
        .await;
    let so = out.stdout_str();
    assert!(so.contains("HOST_INVISIBLE"), "{so}");
    assert!(so.contains("TMP_OK"), "{so}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "safe\n");
    assert!(!std::path::Path::new("/etc/davinci-pwned").exists());
    assert!(!std::path::Path::new("/usr/davinci-pwned").exists());
    assert!(!std::path::Path::new("/escaped").exists());
    if t.is_container() {
        // A container's root file system is its own: writes land there, never on the host,
        // and the next workspace from the same image does not see them.
        let fresh = t.prepare(WorkspaceSpec::default()).await;
        let out = t
            .run(
                &fresh,
                &RunSpec::shell("cat /etc/davinci-pwned || echo CLEAN"),
                &limits(),
            )
            .await;
        assert!(out.stdout_str().contains("CLEAN"), "{}", out.stdout_str());
        t.sb.release(fresh).await.unwrap();
    } else {
        assert!(!so.contains("WROTE:/etc"), "{so}");
        assert!(!so.contains("WROTE:/usr"), "{so}");
        assert!(!so.contains(&format!("WROTE:{}", victim.display())), "{so}");
    }
    t.sb.release(ws).await.unwrap();
}

async fn fork_bomb_is_capped(t: &Target) {
    let ws = t.prepare(WorkspaceSpec::default()).await;
    let l = Limits {
        wall_time: Duration::from_secs(10),
        max_processes: Some(32),
        ..limits()
    };
    // Forks without bound in the background (each child sleeps, so they pile up); the
    // foreground counts the processes of the sandbox after a while and exits.
    // The counter is forked before the bomb and then uses shell builtins only (it waits with
    // `read -t` on a FIFO that never gets data), so a full process table cannot stall it.
    let script = format!(
        "mkfifo .bomb-clock; ( exec 3<>.bomb-clock; read -t 3 -u 3; c=0; \
         for p in /proc/[0-9]*; do c=$((c+1)); done; echo procs=$c ) & \
         counter=$!; bomb() {{ while :; do sleep {} & done; }}; bomb 2>/dev/null & \
         wait $counter",
        t.n(31)
    );
    let t0 = Instant::now();
    let out = t
        .run(&ws, &RunSpec::new(["bash", "-c", script.as_str()]), &l)
        .await;
    let so = out.stdout_str();
    assert_eq!(out.stop, StopReason::Exited, "{so} {}", out.stderr_str());
    let procs: u32 = so
        .lines()
        .find_map(|l| l.strip_prefix("procs="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count in {so:?} / {}", out.stderr_str()));
    // 32 allowed + the sandbox's own init / reaper and the counting pipeline's helpers.
    assert!(procs <= 36, "fork bomb reached {procs} processes");
    assert!(
        procs >= 20,
        "the bomb did not run ({procs}): {}",
        out.stderr_str()
    );
    assert!(t0.elapsed() < Duration::from_secs(9));
    // The sleepers are gone with the run, and the workspace still works.
    t.assert_no_leftover(&ws, &format!("sleep {}", t.n(31)))
        .await;
    let out = t.run(&ws, &RunSpec::shell("echo alive"), &limits()).await;
    assert_eq!(out.stdout_str(), "alive\n");
    t.sb.release(ws).await.unwrap();
}

async fn wall_timeout_kills_the_whole_tree(t: &Target) {
    let ws = t.prepare(WorkspaceSpec::default()).await;
    let l = Limits {
        wall_time: Duration::from_millis(1500),
        ..limits()
    };
    let t0 = Instant::now();
    // A detached grandchild in its own session that would outlive a naive kill.
    let out = t
        .run(
            &ws,
            &RunSpec::shell(format!("setsid sh -c 'sleep {0}' & sleep {0}", t.n(300))),
            &l,
        )
        .await;
    assert_eq!(out.stop, StopReason::WallTimeout);
    assert_eq!(out.exit_code, None);
    assert!(t0.elapsed() < Duration::from_secs(6), "{:?}", t0.elapsed());
    t.assert_no_leftover(&ws, &format!("sleep {}", t.n(300)))
        .await;
    // A background child of a command that exits normally goes too.
    let out = t
        .run(
            &ws,
            &RunSpec::shell(format!(
                "setsid sleep {} >/dev/null 2>&1 & echo started",
                t.n(301)
            )),
            &limits(),
        )
        .await;
    assert!(out.success(), "{out:?}");
    t.assert_no_leftover(&ws, &format!("sleep {}", t.n(301)))
        .await;
    t.sb.release(ws).await.unwrap();
}

async fn cpu_limit_stops_a_spinner(t: &Target) {
    let ws = t.prepare(WorkspaceSpec::default()).await;
    let l = Limits {
        wall_time: Duration::from_secs(20),
        cpu_time: Some(Duration::from_secs(1)),
        ..limits()
    };
    let out = t.run(&ws, &RunSpec::shell("while :; do :; done"), &l).await;
    assert_eq!(out.stop, StopReason::CpuTimeLimit, "{out:?}");
    assert_eq!(out.signal, Some(24), "{out:?}");
    assert!(out.wall_time >= Duration::from_millis(900), "{out:?}");
    t.sb.release(ws).await.unwrap();
}

async fn gigabytes_of_output_are_cut_and_killed(t: &Target) {
    let ws = t.prepare(WorkspaceSpec::default()).await;
    let l = Limits {
        output_bytes: 4096,
        output_kill_bytes: Some(8 << 20),
        ..limits()
    };
    let t0 = Instant::now();
    // `yes` would print forever (gigabytes per few seconds).
    let word = format!("spam{}", t.n(0));
    let out = t.run(&ws, &RunSpec::new(["yes", word.as_str()]), &l).await;
    assert_eq!(out.stop, StopReason::OutputLimit);
    assert!(out.truncated);
    assert!(out.stdout_bytes > 8 << 20);
    assert!(out.stdout.len() < 4096 + 100, "{}", out.stdout.len());
    assert!(t0.elapsed() < Duration::from_secs(10));
    t.assert_no_leftover(&ws, &format!("yes {word}")).await;
    // Without a kill threshold the output keeps draining (bounded memory) until it ends.
    let l = Limits {
        output_bytes: 1024,
        output_kill_bytes: None,
        ..limits()
    };
    let out = t
        .run(
            &ws,
            &RunSpec::shell("head -c 50000000 /dev/zero; echo END"),
            &l,
        )
        .await;
    assert_eq!(out.stop, StopReason::Exited);
    assert_eq!(out.stdout_bytes, 50_000_004);
    assert!(out.stdout_str().ends_with("END\n"));
    t.sb.release(ws).await.unwrap();
}

async fn memory_and_file_size_are_capped(t: &Target) {
    let ws = t.prepare(WorkspaceSpec::default()).await;
    let l = Limits {
        memory_bytes: Some(256 << 20),
        file_size_bytes: Some(1 << 20),
        ..limits()
    };
    let out = t
        .run(
            &ws,
            &RunSpec::shell(
                "head -c 5000000 /dev/zero > big.bin; echo fsize_rc=$?; \
                 wc -c < big.bin; \
                 (x=$(head -c 400000000 /dev/zero | tr '\\0' a); echo ${#x}) 2>&1 | tail -1",
            ),
            &l,
        )
        .await;
    let so = out.stdout_str();
    assert!(!so.contains("fsize_rc=0"), "{so}");
    assert!(so.contains("1048576"), "{so}");
    assert!(!so.contains("400000000"), "memory cap not applied: {so}");
    t.sb.release(ws).await.unwrap();
}

async fn files_round_trip_and_never_escape(t: &Target) {
    let ws = t.prepare(WorkspaceSpec::default()).await;
    let data: Vec<u8> = (0..(1 << 20)).map(|i: u32| (i % 251) as u8).collect();
    t.sb.write_file(&ws, "deep/er/blob.bin", &data)
        .await
        .unwrap();
    let out = t
        .run(
            &ws,
            &RunSpec::shell(
                "sha256sum deep/er/blob.bin | cut -c1-16; printf made > made.txt; \
                 ln -s /etc/passwd link.txt; mkdir d",
            ),
            &limits(),
        )
        .await;
    assert!(out.success(), "{out:?}");
    assert_eq!(t.sb.read_file(&ws, "deep/er/blob.bin").await.unwrap(), data);
    assert_eq!(t.sb.read_file(&ws, "made.txt").await.unwrap(), b"made");
    // A link the command planted is not followed out of the tree.
    let e = t.sb.read_file(&ws, "link.txt").await.unwrap_err();
    assert!(
        matches!(e, SandboxError::BadPath(_) | SandboxError::File(..)),
        "{e}"
    );
    assert!(t.sb.read_file(&ws, "d").await.is_err());
    assert!(t.sb.read_file(&ws, "missing").await.is_err());
    for bad in ["../x", "/etc/passwd", "a/../../b", ""] {
        assert!(matches!(
            t.sb.read_file(&ws, bad).await,
            Err(SandboxError::BadPath(_))
        ));
        assert!(matches!(
            t.sb.write_file(&ws, bad, b"x").await,
            Err(SandboxError::BadPath(_))
        ));
    }
    t.sb.release(ws).await.unwrap();
}

async fn dropping_the_run_kills_it_and_runs_unprivileged(t: &Target) {
    let ws = t.prepare(WorkspaceSpec::default()).await;
    let out = t.run(&ws, &RunSpec::shell("id -u"), &limits()).await;
    // As root on the host, the local command runs as a pool uid, never as root; containers
    // run as the image's user with capabilities dropped.
    if !t.is_container() && unsafe_geteuid() == 0 {
        assert_ne!(out.stdout_str().trim(), "0");
    }
    if t.is_container() {
        let out = t
            .run(
                &ws,
                &RunSpec::shell("grep CapEff /proc/self/status"),
                &limits(),
            )
            .await;
        // CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID, nothing else.
        assert!(
            out.stdout_str().contains("00000000000000fb"),
            "{}",
            out.stdout_str()
        );
    }
    let marker = format!("sleep {}", t.n(302));
    let spec = RunSpec::shell(marker.clone());
    let l = limits();
    let fut = t.sb.run(&ws, &spec, &l);
    let _ = tokio::time::timeout(Duration::from_millis(700), fut).await;
    t.assert_no_leftover(&ws, &marker).await;
    t.sb.release(ws).await.unwrap();
}

fn unsafe_geteuid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1).map(|s| s.parse().unwrap()))
        .unwrap()
}

/// Env of the child process in [`owner_killed_with_9_leaks_nothing`].
const WORKER_ENV: &str = "DAVINCI_SBX_TEST_WORKER";

/// The worker side: holds three workspaces (one running a command), says READY, waits to be
/// killed. Runs only when the parent test starts this binary with [`WORKER_ENV`] set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_worker_process() {
    let Ok(which) = std::env::var(WORKER_ENV) else {
        return;
    };
    let owner = std::env::var("DAVINCI_SBX_TEST_OWNER").unwrap_or_default();
    let lease: u64 = std::env::var("DAVINCI_SBX_TEST_LEASE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let marker: u32 = std::env::var("DAVINCI_SBX_TEST_MARKER")
        .unwrap()
        .parse()
        .unwrap();
    let sb: Arc<dyn Sandbox> = match which.as_str() {
        "local" => Target::local().sb,
        "docker" => {
            let mut cfg = docker_config("x");
            cfg.owner = owner;
            cfg.lease_s = lease;
            Arc::new(testing::docker_or_skip("worker", cfg).await.unwrap())
        }
        _ => {
            let url = std::env::var("DAVINCI_SBX_TEST_KUBE_URL").unwrap();
            let cfg = KubernetesConfig {
                cluster_url: Some(url),
                namespace: "sandboxes".into(),
                default_image: Some(testing::base_image().unwrap()),
                pull_policy: PullPolicy::Never,
                owner,
                lease_s: lease,
                ..Default::default()
            };
            Arc::new(KubeSandbox::connect(cfg).await.unwrap())
        }
    };
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(sb.prepare(&WorkspaceSpec::default()).await.unwrap());
    }
    let first = &held[0];
    let spec = RunSpec::shell(format!("sleep {marker}"));
    let l = limits();
    let run = sb.run(first, &spec, &l);
    println!(
        "READY {}",
        held.iter()
            .map(|w| w.id.as_str())
            .collect::<Vec<_>>()
            .join(",")
    );
    use std::io::Write;
    std::io::stdout().flush().unwrap();
    let _ = run.await;
    tokio::time::sleep(Duration::from_secs(600)).await;
}

/// Starts a worker holding three workspaces and kills it with SIGKILL once it is ready.
fn start_and_kill_worker(
    which: &str,
    owner: &str,
    lease_s: u64,
    kube_url: &str,
    marker: u32,
) -> Vec<String> {
    use std::io::BufRead;
    let exe = std::env::current_exe().unwrap();
    let mut child = std::process::Command::new(exe)
        .args([
            "--exact",
            "owner_worker_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(WORKER_ENV, which)
        .env("DAVINCI_SBX_TEST_OWNER", owner)
        .env("DAVINCI_SBX_TEST_LEASE", lease_s.to_string())
        .env("DAVINCI_SBX_TEST_KUBE_URL", kube_url)
        .env("DAVINCI_SBX_TEST_MARKER", marker.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut ids = Vec::new();
    for line in std::io::BufReader::new(out).lines() {
        let line = line.unwrap();
        // The harness prints `test NAME ... ` before the worker's own line, without a newline.
        if let Some((_, rest)) = line.split_once("READY ") {
            ids = rest.split(',').map(str::to_string).collect();
            break;
        }
    }
    assert_eq!(ids.len(), 3, "worker did not get ready");
    // Let the command in the first workspace start.
    std::thread::sleep(Duration::from_millis(500));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    ids
}

async fn owner_killed_with_9_leaks_nothing(t: &Target) {
    match &t.kind {
        Kind::Local => {
            // The sandbox dies with its owner (PR_SET_PDEATHSIG).
            let marker = t.n(303);
            start_and_kill_worker("local", "", 0, "", marker);
            let m = format!("sleep {marker}");
            let deadline = Instant::now() + Duration::from_secs(5);
            while !host_processes(&m).is_empty() {
                assert!(Instant::now() < deadline, "{:?}", host_processes(&m));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Kind::Docker(d) => {
            let of_owner = |owner: String| {
                let d = d.clone();
                async move {
                    let list = d
                        .client()
                        .list_containers(Some(
                            bollard::query_parameters::ListContainersOptionsBuilder::default()
                                .all(true)
                                .filters(&std::collections::HashMap::from([(
                                    "label".to_string(),
                                    vec![format!("{}={}", lease::OWNER, owner)],
                                )]))
                                .build(),
                        ))
                        .await
                        .unwrap();
                    list.len()
                }
            };
            // 1. Leases: a worker whose lease ran out is swept by anyone.
            let owner = format!("dead-{}", uuid_like());
            start_and_kill_worker("docker", &owner, 3, "", t.n(303));
            assert_eq!(
                of_owner(owner.clone()).await,
                3,
                "the killed worker's containers"
            );
            tokio::time::sleep(Duration::from_millis(3200)).await;
            let report = d.sweep().await.unwrap();
            assert!(report.expired.len() >= 3, "{report:?}");
            assert_eq!(of_owner(owner).await, 0);
            // 2. A restarted worker (same owner, new process) reclaims at once, long lease.
            let owner = format!("restarted-{}", uuid_like());
            start_and_kill_worker("docker", &owner, 3600, "", t.n(303));
            assert_eq!(of_owner(owner.clone()).await, 3);
            let mut cfg = docker_config("x");
            cfg.owner = owner.clone();
            let again = DockerSandbox::connect(cfg).await.unwrap();
            let report = again.sweep().await.unwrap();
            assert_eq!(report.predecessors.len(), 3, "{report:?}");
            assert_eq!(of_owner(owner).await, 0);
            // The sweeping worker's own live containers and others' are left alone.
            let mine = t.prepare(WorkspaceSpec::default()).await;
            let report = d.sweep().await.unwrap();
            assert!(
                !report
                    .expired
                    .iter()
                    .chain(&report.predecessors)
                    .any(|n| n.contains(&mine.id))
            );
            assert!(d.client().inspect_container(&mine.id, None).await.is_ok());
            t.sb.release(mine).await.unwrap();
        }
        Kind::Kube(k, fake, _) => {
            let of_owner = |owner: &str| {
                fake.pods()
                    .iter()
                    .filter(|p| p["metadata"]["labels"][lease::OWNER] == owner)
                    .count()
            };
            let url = fake.url();
            // 1. Leases: expired pods are deleted by anyone's sweep.
            let owner = format!("dead-{}", uuid_like());
            let (o, u) = (owner.clone(), url.clone());
            tokio::task::spawn_blocking(move || {
                start_and_kill_worker("kubernetes", &o, 3, &u, 303_200)
            })
            .await
            .unwrap();
            assert_eq!(of_owner(&owner), 3, "the killed worker's pods");
            tokio::time::sleep(Duration::from_millis(3200)).await;
            let report = k.sweep().await.unwrap();
            assert!(report.expired.len() >= 3, "{report:?}");
            assert_eq!(of_owner(&owner), 0);
            // 2. A restarted worker reclaims its predecessor's pods at once.
            let owner = format!("restarted-{}", uuid_like());
            let (o, u) = (owner.clone(), url.clone());
            tokio::task::spawn_blocking(move || {
                start_and_kill_worker("kubernetes", &o, 3600, &u, 303_201)
            })
            .await
            .unwrap();
            assert_eq!(of_owner(&owner), 3);
            let mut cfg = kube_config(fake, "x");
            cfg.owner = owner.clone();
            let again = KubeSandbox::connect(cfg).await.unwrap();
            let report = again.sweep().await.unwrap();
            assert_eq!(report.predecessors.len(), 3, "{report:?}");
            assert_eq!(of_owner(&owner), 0);
        }
    }
}

/// A live owner renews its lease: a workspace held past its labelled lease survives
/// anyone's sweep, through the renewal its owner keeps writing (a file in the container for
/// Docker, the lease label for Kubernetes). Once renewals stop, the sweep takes it: the
/// kill -9 check with a 3 s lease ([`owner_killed_with_9_leaks_nothing`]).
async fn held_workspace_outlives_its_lease(t: &Target) {
    let label = |labels: &std::collections::HashMap<String, String>, k: &str| -> u64 {
        labels[k].parse().unwrap()
    };
    match &t.kind {
        Kind::Local => unreachable!("leases are for container backends"),
        Kind::Docker(sweeper) => {
            let mut cfg = docker_config("renewing");
            cfg.lease_s = 3;
            let owner = testing::docker_or_skip("renewal", cfg).await.unwrap();
            let ws = owner.prepare(&WorkspaceSpec::default()).await.unwrap();
            let info = sweeper
                .client()
                .inspect_container(&ws.id, None)
                .await
                .unwrap();
            let labels = info.config.unwrap().labels.unwrap();
            let leased = label(&labels, lease::LEASE_EXPIRY);
            tokio::time::sleep(Duration::from_millis(4500)).await;
            assert!(lease::unix_now() > leased, "past the labelled lease");
            let report = sweeper.sweep().await.unwrap();
            assert!(
                !report.expired.iter().any(|n| n.contains(&ws.id[..12])),
                "{report:?}"
            );
            let o = owner
                .run(&ws, &RunSpec::shell("cat /.davinci-lease"), &limits())
                .await
                .unwrap();
            assert!(o.success(), "{o:?}");
            let renewed: u64 = o.stdout_str().trim().parse().unwrap();
            assert!(renewed > leased, "renewed to {renewed}, labelled {leased}");
            owner.release(ws).await.unwrap();
        }
        Kind::Kube(sweeper, fake, _) => {
            let mut cfg = kube_config(fake, "renewing");
            cfg.lease_s = 3;
            let owner = KubeSandbox::connect(cfg).await.unwrap();
            let ws = owner.prepare(&WorkspaceSpec::default()).await.unwrap();
            let lease_of = |name: &str| -> u64 {
                let p = fake
                    .pods()
                    .into_iter()
                    .find(|p| p["metadata"]["name"] == name)
                    .expect("the pod");
                p["metadata"]["labels"][lease::LEASE_EXPIRY]
                    .as_str()
                    .unwrap()
                    .parse()
                    .unwrap()
            };
            let leased = lease_of(&ws.id);
            tokio::time::sleep(Duration::from_millis(4500)).await;
            assert!(lease::unix_now() > leased, "past the first lease");
            let report = sweeper.sweep().await.unwrap();
            assert!(!report.expired.contains(&ws.id), "{report:?}");
            assert!(lease_of(&ws.id) > leased, "the label was renewed");
            let o = owner
                .run(&ws, &RunSpec::shell("true"), &limits())
                .await
                .unwrap();
            assert!(o.success(), "{o:?}");
            owner.release(ws).await.unwrap();
        }
    }
}

mod renewal {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn docker() {
        if std::env::var(super::WORKER_ENV).is_ok() {
            return;
        }
        if let Some(t) = super::Target::docker().await {
            super::held_workspace_outlives_its_lease(&t).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kubernetes() {
        if std::env::var(super::WORKER_ENV).is_ok() {
            return;
        }
        if let Some(t) = super::Target::kube().await {
            super::held_workspace_outlives_its_lease(&t).await;
        }
    }
}

fn uuid_like() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
            % 1_000_000_007
    )
}

macro_rules! suite {
    ($($check:ident),* $(,)?) => {
        mod local {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    super::$check(&super::Target::local()).await;
                }
            )*
        }
        mod docker {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    if std::env::var(super::WORKER_ENV).is_ok() {
                        return;
                    }
                    if let Some(t) = super::Target::docker().await {
                        super::$check(&t).await;
                    }
                }
            )*
        }
        mod kubernetes {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    if std::env::var(super::WORKER_ENV).is_ok() {
                        return;
                    }
                    if let Some(t) = super::Target::kube().await {
                        super::$check(&t).await;
                        if let super::Kind::Kube(_, fake, _) = t.kind {
                            if let Ok(f) = std::sync::Arc::try_unwrap(fake) {
                                f.shutdown().await;
                            }
                        }
                    }
                }
            )*
        }
    };
}

suite!(
    runs_in_private_copy_with_clean_env,
    network_is_off_unless_allowed,
    writes_outside_the_tree_fail_and_host_is_untouched,
    fork_bomb_is_capped,
    wall_timeout_kills_the_whole_tree,
    cpu_limit_stops_a_spinner,
    gigabytes_of_output_are_cut_and_killed,
    memory_and_file_size_are_capped,
    files_round_trip_and_never_escape,
    dropping_the_run_kills_it_and_runs_unprivileged,
    owner_killed_with_9_leaks_nothing,
);
