//! `davinci serve --target tasks` as two replicas sharing Redis and a storage directory: one is
//! killed with SIGKILL while it validates a PR shard, its claim goes to the other once its lease
//! runs out, and the job ends with the tasks and stats that an undisturbed `davinci tasks build`
//! writes. Needs bwrap, git, python3 and redis-server.
mod common;

use common::{davinci, succeeded};
use davinci_proto::v1::tasks_client::TasksClient;
use davinci_proto::v1::{JobRef, JobState, StartTasksRequest, TasksSpec};
use davinci_testkit::prs;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A tasks replica in `dir` (its environments and trees there), logging to `dir/serve.log`.
fn replica(dir: &Path, addr: &str, redis: &str, storage: &Path) -> Proc {
    std::fs::create_dir_all(dir).unwrap();
    let mut cmd = davinci();
    cmd.args([
        "serve",
        "--target",
        "tasks",
        "--listen",
        addr,
        "--metrics-listen",
        "",
    ])
    .current_dir(dir)
    .env("DAVINCI__QUEUE__URL", redis)
    // A killed replica's claim goes to the other after this long.
    .env("DAVINCI__QUEUE__VISIBILITY_TIMEOUT_S", "3")
    .env(
        "DAVINCI__STORAGE__URI",
        format!("file://{}", storage.display()),
    )
    .env("DAVINCI__TASKS__ENV_ROOT", dir.join("envs"))
    .env("DAVINCI__TASKS__WORK_ROOT", dir.join("work"))
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(dir.join("serve.log")).unwrap());
    let child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "the tasks replica did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Proc(child)
}

/// Shards the replica started and finished, from its log.
fn claims(dir: &Path) -> (usize, usize) {
    let log = std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default();
    (
        log.matches("validating shard").count(),
        log.matches("shard validated").count(),
    )
}

/// Tasks shards decoded and part / stats objects with their timings zeroed, by key under
/// `root`: what must not depend on who validated what, or when.
fn outputs(root: &Path) -> BTreeMap<String, serde_json::Value> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![root.join("tasks"), root.join("stats")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let key = p.strip_prefix(root).unwrap().display().to_string();
            if p.is_dir() {
                if !key.starts_with("tasks/logs") {
                    dirs.push(p);
                }
                continue;
            }
            let data = std::fs::read(&p).unwrap();
            let v = if key.ends_with(".jsonl.zst") {
                let text = String::from_utf8(zstd::decode_all(&data[..]).unwrap()).unwrap();
                text.lines()
                    .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                    .collect::<Vec<_>>()
                    .into()
            } else {
                let mut v: serde_json::Value = serde_json::from_slice(&data).unwrap();
                v["seconds"] = 0.into();
                v["validation_seconds"] = serde_json::json!([]);
                v
            };
            out.insert(key, v);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_validation_changes_no_task() {
    // Not under /tmp: each sandbox has its own /tmp, so binds there would be hidden.
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let wheels = tmp.path().join("wheels");
    std::fs::create_dir_all(&wheels).unwrap();
    prs::wheel(&wheels, "tinydep").unwrap();
    let (repo, r) = prs::tiny_repo(tmp.path()).unwrap();
    let input = tmp.path().join("in");
    // The kept PR and a docs PR; the PR whose environment fails and a tests-only PR; the PRs
    // dropped before validation.
    prs::write(
        &input,
        &[
            ("prs/0000.jsonl", &prs::jsonl(&[r[0].clone(), r[1].clone()])),
            ("prs/0001.jsonl", &prs::jsonl(&[r[4].clone(), r[2].clone()])),
            (
                "prs/0002.jsonl",
                &prs::jsonl(&[r[5].clone(), r[6].clone(), r[7].clone(), r[8].clone()]),
            ),
        ],
    )
    .unwrap();
    let config = serde_json::json!({
        "env": {
            "python": prs::PYTHON,
            "pip_args": ["--no-index", "--find-links", wheels, "--no-build-isolation"],
            "ro_binds": [wheels],
            // One try at the environment that cannot install, one run per side: the test is
            // about who validates, not about flakiness (fixture_repos covers that).
            "attempts": 1,
        },
        "validate": {"runs": 1},
        "select": {"max_files": 3},
        "test_timeout_secs": 60,
        "sandbox": {"kind": "local"},
    });
    let repo_arg = format!("acme/tiny={}", repo.display());
    let in_uri = format!("file://{}/prs", input.display());

    // Undisturbed: the CLI.
    let cfg = tmp.path().join("tasks.json");
    std::fs::write(&cfg, config.to_string()).unwrap();
    let alone = tmp.path().join("alone");
    let stdout = succeeded(
        &davinci()
            .args(["tasks", "build", "--in", &in_uri, "--out"])
            .arg(format!("file://{}", alone.display()))
            .args(["--repo", &repo_arg, "--config"])
            .arg(&cfg)
            .arg("--env-cache")
            .arg(tmp.path().join("alone-envs"))
            .output()
            .unwrap(),
    );
    assert!(stdout.contains("kept: 1"), "{stdout}");
    let want = outputs(&alone);
    assert_eq!(
        want.len(),
        7,
        "3 tasks shards, 3 part markers, the stats: {want:?}"
    );

    // Two replicas; the job is started on B, A is killed mid-shard.
    let redis = davinci_testkit::RedisServer::start().unwrap();
    let storage = tmp.path().join("storage");
    let (a_dir, b_dir) = (tmp.path().join("a"), tmp.path().join("b"));
    let a_addr = format!("127.0.0.1:{}", davinci_testkit::free_port().unwrap());
    let b_addr = format!("127.0.0.1:{}", davinci_testkit::free_port().unwrap());
    let mut a = replica(&a_dir, &a_addr, &redis.url(), &storage);
    let _b = replica(&b_dir, &b_addr, &redis.url(), &storage);
    let mut client = TasksClient::connect(format!("http://{b_addr}"))
        .await
        .unwrap();
    let out = storage.join("runs/r1");
    let job = client
        .start_tasks(StartTasksRequest {
            run_id: "r1".into(),
            spec: Some(TasksSpec {
                inputs: vec![in_uri.clone()],
                out: format!("file://{}", out.display()),
                set_format: String::new(),
                repos: vec![repo_arg.clone()],
                repos_dir: String::new(),
                settings_json: config.to_string(),
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let t = Instant::now();
    loop {
        let (started, finished) = claims(&a_dir);
        if started > finished {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "replica A took no shard: {}",
            std::fs::read_to_string(a_dir.join("serve.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.0.kill().unwrap(); // SIGKILL
    a.0.wait().unwrap();
    let (started, finished) = claims(&a_dir);
    assert!(started > finished, "A was killed mid-shard");

    let t = Instant::now();
    let job = loop {
        let j = client
            .get_tasks(JobRef {
                job_id: job.job_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if JobState::try_from(j.state).unwrap().is_terminal() {
            break j;
        }
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "the job did not finish: {j:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        JobState::try_from(job.state).unwrap(),
        JobState::Succeeded,
        "{}",
        job.error
    );
    assert_eq!(job.counters["kept"], 1, "{job:?}");
    let (b_started, _) = claims(&b_dir);
    assert!(
        b_started >= 3 - finished,
        "B did every shard A did not finish, the one A was killed on too ({b_started} started)"
    );
    assert_eq!(outputs(&out), want, "the same tasks as the undisturbed run");
}

/// `davinci run` with `tasks:` and `rollout:` sections: crawl → reconstruct → tasks → rollout →
/// pack. The run's crawl of a fixture repository goes through the tasks stage (the embedded
/// Tasks service), which keeps the PR that fixes a failing test with its FAIL_TO_PASS; the
/// replay rollouts of the kept tasks pass and pack into `env-pass`.
#[test]
fn embedded_run_builds_tasks_from_its_crawl_and_rolls_them_out() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let wheels = tmp.path().join("wheels");
    std::fs::create_dir_all(&wheels).unwrap();
    prs::wheel(&wheels, "tinydep").unwrap();
    let (repo, _) = prs::tiny_repo(tmp.path()).unwrap();
    let settings = serde_json::json!({
        "env": {
            "python": prs::PYTHON,
            "pip_args": ["--no-index", "--find-links", wheels, "--no-build-isolation"],
            "ro_binds": [wheels],
            "attempts": 1,
        },
        "validate": {"runs": 1},
        "select": {"max_files": 3},
        "test_timeout_secs": 60,
        "sandbox": {"kind": "local"},
    });
    let tok = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../crates/tokenize/tests/fixtures/tiny-qwen-shape.json"
    );
    let store = tmp.path().join("store");
    // The rollout's prepared environments: a clone named owner__name.
    let mirrors = tmp.path().join("mirrors");
    std::fs::create_dir_all(&mirrors).unwrap();
    let st = std::process::Command::new("git")
        .args(["clone", "-q"])
        .arg(&repo)
        .arg(mirrors.join("acme__tiny"))
        .status()
        .unwrap();
    assert!(st.success());
    let spec = format!(
        "run_id: tasks\nstorage: file://{}\nsources:\n  repos: ['{},name=acme/tiny']\ntokenizer: {tok}\npacking:\n  seq_len: 16384\nmixture:\n  stages:\n    - name: stage1\n      datasets: [{{source: ctx-general}}]\n    - name: sft\n      mask: assistant-only\n      datasets: [{{source: env-pass}}]\ntasks:\n  settings: {settings}\nrollout:\n  policy: replay\n  repos_dir: {}\n",
        store.display(),
        repo.display(),
        mirrors.display()
    );
    let spec_file = tmp.path().join("run.yaml");
    std::fs::write(&spec_file, spec).unwrap();
    let out = davinci()
        .arg("run")
        .arg(&spec_file)
        .current_dir(tmp.path())
        .output()
        .unwrap();
    let stdout = succeeded(&out);
    assert!(stdout.contains("wall time per stage: crawl"), "{stdout}");
    assert!(stdout.contains("tasks "), "{stdout}");
    let run = store.join("runs/tasks");
    let stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("stats/tasks.json")).unwrap()).unwrap();
    let mut kept = Vec::new();
    for e in std::fs::read_dir(run.join("tasks")).unwrap() {
        let p = e.unwrap().path();
        if p.to_string_lossy().ends_with(".jsonl.zst") {
            let text =
                String::from_utf8(zstd::decode_all(&std::fs::read(&p).unwrap()[..]).unwrap())
                    .unwrap();
            for l in text.lines() {
                let t: serde_json::Value = serde_json::from_str(l).unwrap();
                kept.push((t["instance_id"].clone(), t["FAIL_TO_PASS"].clone()));
            }
        }
    }
    assert!(
        kept.iter()
            .any(|(id, f2p)| id == "acme__tiny-1" && f2p.as_array().is_some_and(|a| !a.is_empty())),
        "{kept:?} {stats}"
    );
    // The rollout took the tasks stage's output; the replay of each kept task passed and
    // packed into env-pass.
    let rollout: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("stats/rollout.json")).unwrap()).unwrap();
    assert_eq!(rollout["exit_status"]["submitted"], kept.len(), "{rollout}");
    assert!(
        stdout.contains(&format!("packed sft/env-pass: {} documents", kept.len())),
        "{stdout}\n{rollout}"
    );
}
