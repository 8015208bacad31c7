//! What the sandbox costs the agent: per tool call, the same commands through an agent
//! session (bubblewrap, session state restored and saved) and in a bare `bash -c` subprocess
//! on a copy of the same tree (the floor); and whole replay rollouts (environment set up, gold
//! patch replayed through the tools, graded in a fresh workspace) per hour per core.
//! Prints tables for BENCHMARKS.md.
//!
//! `cargo bench --workspace --bench rollout` (needs bwrap, git, python3). `ROLLOUT_BENCH_N`
//! sets the number of replay rollouts (default 8); each tool-call figure comes from 20 runs of
//! each command.
use davinci_agent::{Agent, AgentConfig, ReplayPolicy};
use davinci_sandbox::{BwrapSandbox, LocalConfig};
use davinci_swebench::{Harness, HarnessConfig};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1000.0
}

const COMMANDS: [(&str, &str); 4] = [
    ("true", "true"),
    ("ls", "ls -la"),
    ("grep -rn", "grep -rn 'def ' ."),
    ("python3 -c", "python3 -c 'import textkit.core'"),
];

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("ROLLOUT_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let dir = tempfile::tempdir().unwrap();
    let repos = dir.path().join("repos");
    let task = davinci_testkit::tasks::textkit_task(&repos, 2).unwrap();
    let sandbox = Arc::new(
        BwrapSandbox::new(LocalConfig {
            mount_point: "/testbed".into(),
            ..Default::default()
        })
        .unwrap(),
    );
    let harness = Arc::new(Harness::new(
        sandbox,
        HarnessConfig {
            out_dir: dir.path().join("unused"),
            repos_dir: Some(repos.clone()),
            ..Default::default()
        },
    ));
    let agent = Agent::new(harness, AgentConfig::default());

    println!(
        "| command | runs | agent session p50 ms | p95 ms | bare subprocess p50 ms | p95 ms |"
    );
    println!("|---|---|---|---|---|---|");
    let mut session = agent.open(&task).await.unwrap();
    let copy = dir.path().join("bare");
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(repos.join("acme__textkit"))
        .arg(&copy)
        .status()
        .unwrap();
    assert!(st.success());
    for (name, cmd) in COMMANDS {
        let (mut ours, mut bare) = (Vec::new(), Vec::new());
        for _ in 0..20 {
            let t = Instant::now();
            let r = session.bash(cmd, None).await.unwrap();
            ours.push(t.elapsed());
            assert!(!r.timed_out);
            let t = Instant::now();
            let out = std::process::Command::new("bash")
                .arg("-c")
                .arg(cmd)
                .current_dir(&copy)
                // The sandbox's commands get a clean environment; so does the floor (this
                // machine's own variables make a bare `python3` start ten times slower).
                .env_clear()
                .env("PATH", "/usr/local/bin:/usr/bin:/bin")
                .env("HOME", &copy)
                .output()
                .unwrap();
            bare.push(t.elapsed());
            assert!(out.status.success(), "{cmd}");
        }
        println!(
            "| `{name}` | 20 | {:.1} | {:.1} | {:.1} | {:.1} |",
            pct(&mut ours, 0.5),
            pct(&mut ours, 0.95),
            pct(&mut bare, 0.5),
            pct(&mut bare, 0.95)
        );
    }
    session.close().await;

    let t = Instant::now();
    let mut times = Vec::new();
    for i in 0..n {
        let s = Instant::now();
        let traj = agent
            .run(&task, &mut ReplayPolicy::new(&task, "/testbed"), i as u32)
            .await
            .unwrap();
        assert!(traj.outcome.resolved);
        times.push(s.elapsed());
    }
    let total = t.elapsed().as_secs_f64();
    println!();
    println!("| replay rollouts (one at a time) | p50 s | p95 s | rollouts/hour/core |");
    println!("|---|---|---|---|");
    let per_hour = n as f64 / total * 3600.0;
    println!(
        "| {n} | {:.2} | {:.2} | {:.0} |",
        pct(&mut times, 0.5) / 1000.0,
        pct(&mut times, 0.95) / 1000.0,
        per_hour
    );
}
