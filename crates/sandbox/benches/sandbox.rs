//! Workspace start and per-command latency of each backend, beside the Docker CLI on the same
//! image (`docker run --rm IMAGE true`, `docker exec C true`: the floor a backend built on the
//! engine cannot beat). Kubernetes runs against the local fake API server, whose node runs
//! pods on the same engine, so its figures are the API + WebSocket path on top of Docker's.
//! Prints a table for BENCHMARKS.md.
//!
//! `cargo bench -p davinci-sandbox --bench sandbox` (needs bwrap; Docker parts are skipped,
//! saying so, without an engine). `SANDBOX_BENCH_N` sets the number of workspaces (default
//! 10); each gets 3 commands, so exec figures come from 3N samples.

use std::sync::Arc;
use std::time::{Duration, Instant};

use davinci_kube_fake::{FakeCluster, FakeConfig};
use davinci_sandbox::{
    BwrapSandbox, DockerConfig, KubeSandbox, KubernetesConfig, Limits, LocalConfig, PullPolicy,
    RunSpec, Sandbox, WorkspaceSpec, testing,
};

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1000.0
}

fn row(name: &str, what: &str, v: &mut [Duration]) {
    println!(
        "| {name} | {what} | {} | {:.1} | {:.1} |",
        v.len(),
        pct(v, 0.5),
        pct(v, 0.95)
    );
}

/// Starts `n` workspaces one after another, runs `true` three times in each; returns the
/// start and exec latencies.
async fn measure(sb: Arc<dyn Sandbox>, n: usize) -> (Vec<Duration>, Vec<Duration>) {
    let (mut start, mut exec) = (Vec::new(), Vec::new());
    let spec = RunSpec::new(["true"]);
    let l = Limits::default();
    for _ in 0..n {
        let t = Instant::now();
        let ws = sb
            .prepare(&WorkspaceSpec::default())
            .await
            .expect("prepare");
        start.push(t.elapsed());
        for _ in 0..3 {
            let t = Instant::now();
            let out = sb.run(&ws, &spec, &l).await.expect("run");
            assert!(out.success(), "{out:?}");
            exec.push(t.elapsed());
        }
        sb.release(ws).await.expect("release");
    }
    (start, exec)
}

fn cli(args: &[&str]) -> Duration {
    let t = Instant::now();
    let s = std::process::Command::new("docker")
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("docker CLI");
    assert!(s.success(), "docker {args:?}");
    t.elapsed()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("SANDBOX_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    println!("| backend | operation | samples | p50 ms | p95 ms |");
    println!("|---|---|---|---|---|");
    let local = BwrapSandbox::new(LocalConfig::default()).expect("bwrap");
    let (mut s, mut e) = measure(Arc::new(local), n).await;
    row("local (bwrap)", "workspace start (empty tree)", &mut s);
    row("local (bwrap)", "exec `true`", &mut e);
    let cfg = DockerConfig {
        owner: format!("bench-{}", std::process::id()),
        lease_s: 600,
        ..Default::default()
    };
    let Some(docker) = testing::docker_or_skip("docker benchmark", cfg).await else {
        return;
    };
    let image = docker.config().default_image.clone().expect("base image");
    let client = docker.client().clone();
    let (mut s, mut e) = measure(Arc::new(docker), n).await;
    row("docker", "workspace start", &mut s);
    row("docker", "exec `true`", &mut e);
    let mut runs: Vec<Duration> = (0..n)
        .map(|_| cli(&["run", "--rm", &image, "true"]))
        .collect();
    row("docker CLI", "`docker run --rm IMAGE true`", &mut runs);
    let c = std::process::Command::new("docker")
        .args(["run", "-d", "--rm", &image, "sleep", "600"])
        .output()
        .expect("docker run -d");
    let id = String::from_utf8_lossy(&c.stdout).trim().to_string();
    let mut execs: Vec<Duration> = (0..3 * n).map(|_| cli(&["exec", &id, "true"])).collect();
    row("docker CLI", "`docker exec C true`", &mut execs);
    cli(&["rm", "-f", &id]);
    let fake = FakeCluster::start(FakeConfig::default(), client)
        .await
        .expect("fake API server");
    let kube = KubeSandbox::connect(KubernetesConfig {
        cluster_url: Some(fake.url()),
        default_image: Some(image),
        pull_policy: PullPolicy::Never,
        owner: format!("bench-{}", std::process::id()),
        lease_s: 600,
        ..Default::default()
    })
    .await
    .expect("connect");
    let (mut s, mut e) = measure(Arc::new(kube), n).await;
    row(
        "kubernetes (fake API server, pods on docker)",
        "workspace start",
        &mut s,
    );
    row(
        "kubernetes (fake API server, pods on docker)",
        "exec `true`",
        &mut e,
    );
    fake.shutdown().await;
}
