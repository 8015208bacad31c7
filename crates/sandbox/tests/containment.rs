//! The sandbox contains hostile commands and reports what happened; the host is untouched.
//! These need a working `bwrap`; without it they fail (the sandbox is the product here).

use std::time::{Duration, Instant};

use davinci_sandbox::{
    BwrapSandbox, Limits, LocalConfig, RunSpec, Sandbox, StopReason, WorkspaceSpec,
};

fn sandbox() -> BwrapSandbox {
    BwrapSandbox::new(LocalConfig::default()).expect("bwrap must be installed for these tests")
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

#[tokio::test]
async fn runs_in_private_copy_with_clean_env() {
    let sb = sandbox();
    let src = src_tree();
    let ws = sb
        .prepare(&WorkspaceSpec {
            source: Some(src.path().to_path_buf()),
            files: vec![("extra/x.txt".into(), b"hi".to_vec())],
            ..Default::default()
        })
        .await
        .unwrap();
    let out = sb
        .run(
            &ws,
            &RunSpec::shell(
                "cat pkg/mod.txt extra/x.txt; echo changed > pkg/mod.txt; pwd; \
                 echo TZ=$TZ SEED=$PYTHONHASHSEED SECRET=${SECRET:-unset}; echo err >&2; exit 3",
            ),
            &limits(),
        )
        .await
        .unwrap();
    let so = out.stdout_str();
    assert_eq!(out.stop, StopReason::Exited);
    assert_eq!(out.exit_code, Some(3));
    assert!(so.contains("original\nhi"), "{so}");
    assert!(so.contains("/workspace\n"), "{so}");
    assert!(so.contains("TZ=UTC SEED=0 SECRET=unset"), "{so}");
    assert_eq!(out.stderr_str(), "err\n");
    // The copy changed, the source did not.
    assert_eq!(
        std::fs::read_to_string(ws.host_file("pkg/mod.txt").unwrap()).unwrap(),
        "changed\n"
    );
    assert_eq!(
        std::fs::read_to_string(src.path().join("pkg/mod.txt")).unwrap(),
        "original\n"
    );
}

#[tokio::test]
async fn network_is_off_unless_allowed() {
    let sb = sandbox();
    let ws = sb.prepare(&WorkspaceSpec::default()).await.unwrap();
    // A listener on the host loopback: reachable from the host, not from the sandbox.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let probe = format!(
        "exec 3<>/dev/tcp/127.0.0.1/{port} && echo CONNECTED || echo REFUSED; \
         cat /sys/class/net/*/operstate 2>/dev/null | tr '\\n' ' '"
    );
    let spec = RunSpec::new(["bash", "-c", probe.as_str()]);
    let out = sb.run(&ws, &spec, &limits()).await.unwrap();
    let so = out.stdout_str();
    assert!(so.contains("REFUSED"), "sandbox reached the host: {so}");
    assert!(!so.contains("CONNECTED"));
    let mut allowed = spec.clone();
    allowed.network = true;
    let out = sb.run(&ws, &allowed, &limits()).await.unwrap();
    assert!(
        out.stdout_str().contains("CONNECTED"),
        "{}",
        out.stderr_str()
    );
}

#[tokio::test]
async fn writes_outside_the_tree_fail_and_host_is_untouched() {
    let sb = sandbox();
    let ws = sb.prepare(&WorkspaceSpec::default()).await.unwrap();
    let host_dir = tempfile::tempdir().unwrap();
    let victim = host_dir.path().join("victim.txt");
    std::fs::write(&victim, "safe\n").unwrap();
    let script = format!(
        "for p in /etc/davinci-pwned /usr/davinci-pwned {v} /workspace/../escaped; do \
           (echo pwned > \"$p\") 2>/dev/null && echo WROTE:$p || echo DENIED:$p; done; \
         ls {d} 2>/dev/null && echo SEES_HOST || echo HOST_INVISIBLE; \
         echo ok > /tmp/scratch && echo TMP_OK",
        v = victim.display(),
        d = host_dir.path().display()
    );
    let out = sb
        .run(&ws, &RunSpec::new(["sh", "-c", script.as_str()]), &limits())
        .await
        .unwrap();
    let so = out.stdout_str();
    assert!(!so.contains("WROTE:/etc"), "{so}");
    assert!(!so.contains("WROTE:/usr"), "{so}");
    assert!(!so.contains(&format!("WROTE:{}", victim.display())), "{so}");
    assert!(so.contains("HOST_INVISIBLE"), "{so}");
    assert!(so.contains("TMP_OK"), "{so}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "safe\n");
    assert!(!std::path::Path::new("/etc/davinci-pwned").exists());
    assert!(!std::path::Path::new("/usr/davinci-pwned").exists());
    assert!(!ws.host_path.parent().unwrap().join("escaped").exists());
}

#[tokio::test]
async fn fork_bomb_is_capped() {
    let sb = sandbox();
    let ws = sb.prepare(&WorkspaceSpec::default()).await.unwrap();
    let l = Limits {
        wall_time: Duration::from_secs(10),
        max_processes: Some(32),
        ..limits()
    };
    // Forks without bound in the background (each child sleeps, so they pile up); the
    // foreground counts the processes of the sandbox after a while and exits.
    // The counter only uses shell builtins once its sleep is over, so it needs no fork.
    let script = "( sleep 3; c=0; for p in /proc/[0-9]*; do c=$((c+1)); done; echo procs=$c ) & \
                  counter=$!; bomb() { while :; do sleep 31 & done; }; bomb 2>/dev/null & \
                  wait $counter";
    let t = Instant::now();
    let out = sb
        .run(&ws, &RunSpec::new(["bash", "-c", script]), &l)
        .await
        .unwrap();
    let so = out.stdout_str();
    assert_eq!(out.stop, StopReason::Exited, "{so} {}", out.stderr_str());
    let procs: u32 = so
        .lines()
        .find_map(|l| l.strip_prefix("procs="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count in {so:?} / {}", out.stderr_str()));
    // 32 allowed + bwrap's reaper + the counting pipeline's own helpers.
    assert!(procs <= 36, "fork bomb reached {procs} processes");
    assert!(
        procs >= 20,
        "the bomb did not run ({procs}): {}",
        out.stderr_str()
    );
    assert!(t.elapsed() < Duration::from_secs(9));
    // The sleepers are gone with the sandbox.
    assert_no_leftover("sleep\u{0}31").await;
}

#[tokio::test]
async fn wall_timeout_kills_the_whole_tree() {
    let sb = sandbox();
    let ws = sb.prepare(&WorkspaceSpec::default()).await.unwrap();
    let l = Limits {
        wall_time: Duration::from_millis(1500),
        ..limits()
    };
    let t = Instant::now();
    // A detached grandchild in its own session that would outlive a naive kill.
    let out = sb
        .run(
            &ws,
            &RunSpec::shell("setsid sh -c 'sleep 300' & sleep 300"),
            &l,
        )
        .await
        .unwrap();
    assert_eq!(out.stop, StopReason::WallTimeout);
    assert_eq!(out.exit_code, None);
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
    assert_no_leftover("sleep\u{0}300").await;
}

#[tokio::test]
async fn cpu_limit_stops_a_spinner() {
    let sb = sandbox();
    let ws = sb.prepare(&WorkspaceSpec::default()).await.unwrap();
    let l = Limits {
        wall_time: Duration::from_secs(20),
        cpu_time: Some(Duration::from_secs(1)),
        ..limits()
    };
    let out = sb
        .run(&ws, &RunSpec::shell("while :; do :; done"), &l)
        .await
        .unwrap();
    assert_eq!(out.stop, StopReason::CpuTimeLimit, "{out:?}");
    assert_eq!(out.signal, Some(libc_sigxcpu()), "{out:?}");
    assert!(out.wall_time >= Duration::from_millis(900), "{out:?}");
}

#[tokio::test]
async fn gigabytes_of_output_are_cut_and_killed() {
    let sb = sandbox();
    let ws = sb.prepare(&WorkspaceSpec::default()).await.unwrap();
    let l = Limits {
        output_bytes: 4096,
        output_kill_bytes: Some(8 << 20),
        ..limits()
    };
    let t = Instant::now();
    // `yes` would print forever (gigabytes per few seconds).
    let out = sb
        .run(&ws, &RunSpec::new(["yes", "spam"]), &l)
        .await
        .unwrap();
    assert_eq!(out.stop, StopReason::OutputLimit);
    assert!(out.truncated);
    assert!(out.stdout_bytes > 8 << 20);
    assert!(out.stdout.len() < 4096 + 100, "{}", out.stdout.len());
    assert!(t.elapsed() < Duration::from_secs(10));
    // Without a kill threshold the output keeps draining (bounded memory) until it ends.
    let l = Limits {
        output_bytes: 1024,
        output_kill_bytes: None,
        ..limits()
    };
    let out = sb
        .run(
            &ws,
            &RunSpec::shell("head -c 50000000 /dev/zero; echo END"),
            &l,
        )
        .await
        .unwrap();
    assert_eq!(out.stop, StopReason::Exited);
    assert_eq!(out.stdout_bytes, 50_000_004);
    assert!(out.stdout_str().ends_with("END\n"));
}

#[tokio::test]
async fn memory_and_file_size_are_capped() {
    let sb = sandbox();
    let ws = sb.prepare(&WorkspaceSpec::default()).await.unwrap();
    let l = Limits {
        memory_bytes: Some(256 << 20),
        file_size_bytes: Some(1 << 20),
        ..limits()
    };
    let out = sb
        .run(
            &ws,
            &RunSpec::shell(
                "head -c 5000000 /dev/zero > big.bin; echo fsize_rc=$?; \
                 wc -c < big.bin; \
                 (x=$(head -c 400000000 /dev/zero | tr '\\0' a); echo ${#x}) 2>&1 | tail -1",
            ),
            &l,
        )
        .await
        .unwrap();
    let so = out.stdout_str();
    assert!(!so.contains("fsize_rc=0"), "{so}");
    assert!(so.contains("1048576"), "{so}");
    assert!(!so.contains("400000000"), "memory cap not applied: {so}");
}

/// No process of a finished sandbox may survive: none on the host runs the marker command.
/// The kernel tears a killed PID namespace down asynchronously, so under load this waits up
/// to 5 s for the processes to go; one that outlives that was not killed.
async fn assert_no_leftover(cmdline_marker: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut left = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let name = e.file_name();
            let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline"))
                && String::from_utf8_lossy(&cmd).contains(cmdline_marker)
            {
                left.push(pid);
            }
        }
        if left.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "processes left behind: {left:?}"
        );
    }
}

/// SIGXCPU on Linux.
fn libc_sigxcpu() -> i32 {
    24
}

#[tokio::test]
async fn dropping_the_run_kills_the_sandbox_and_runs_unprivileged() {
    let sb = sandbox();
    let ws = sb.prepare(&WorkspaceSpec::default()).await.unwrap();
    let out = sb
        .run(&ws, &RunSpec::shell("id -u"), &limits())
        .await
        .unwrap();
    // As root on the host, the command runs as a pool uid, never as root.
    if unsafe_geteuid() == 0 {
        assert_ne!(out.stdout_str().trim(), "0");
    }
    let spec = RunSpec::shell("sleep 302");
    let l = limits();
    let fut = sb.run(&ws, &spec, &l);
    let _ = tokio::time::timeout(Duration::from_millis(700), fut).await;
    assert_no_leftover("sleep\u{0}302").await;
}

fn unsafe_geteuid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1).map(|s| s.parse().unwrap()))
        .unwrap()
}
