//! The Tasks service: a job shared by two replicas over Redis Streams, PR shards and outputs on
//! S3 (moto), writes per shard what `davinci tasks build` (`run_batch`) writes and the same
//! stats; started again it reuses every committed shard. A shard that cannot be read is
//! dead-lettered at once and reported while the others finish; a bad `settings_json` field is
//! refused by its path. Needs bwrap, git, python3, redis-server and moto.
mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use davinci_core::pr::PullRequest;
use davinci_proto::v1::tasks_server::Tasks;
use davinci_proto::v1::{Job, JobRef, JobState, StartTasksRequest, TasksSpec};
use davinci_runtime::blob::{self, BlobStore, S3Config};
use davinci_runtime::jobs::JobRegistry;
use davinci_runtime::queue::{self, MemoryQueue, QueueOptions, WorkQueue};
use davinci_tasks::batch::{self, Mirrors};
use davinci_tasks::serve::{LocalDirs, TASKS_TOPIC, TasksService, worker};
use davinci_tasks::{Stage, Stats, TasksConfig};
use davinci_testkit::prs;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::Request;

const RUN: &str = "r1";

struct Fixture {
    tmp: tempfile::TempDir,
    wheels: std::path::PathBuf,
    repo: std::path::PathBuf,
    records: Vec<PullRequest>,
}

fn fixture() -> Fixture {
    // Not under /tmp: each sandbox has its own /tmp, so binds there would be hidden.
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let wheels = common::wheels(tmp.path());
    let (repo, records) = prs::tiny_repo(tmp.path()).unwrap();
    Fixture {
        tmp,
        wheels,
        repo,
        records,
    }
}

fn dirs(f: &Fixture, replica: &str) -> LocalDirs {
    LocalDirs {
        env_root: f.tmp.path().join(replica).join("envs"),
        work_root: f.tmp.path().join(replica).join("work"),
    }
}

fn spec(f: &Fixture, inputs: &str, out: &str, cfg: &TasksConfig) -> TasksSpec {
    TasksSpec {
        inputs: vec![inputs.into()],
        out: out.into(),
        set_format: String::new(),
        repos: vec![format!("acme/tiny={}", f.repo.display())],
        repos_dir: String::new(),
        settings_json: serde_json::to_string(cfg).unwrap(),
    }
}

async fn start(svc: &TasksService, spec: TasksSpec) -> Job {
    svc.start_tasks(Request::new(StartTasksRequest {
        run_id: RUN.into(),
        spec: Some(spec),
    }))
    .await
    .unwrap()
    .into_inner()
}

async fn finish(svc: &TasksService, job: Job) -> Job {
    for _ in 0..1200 {
        let j = svc
            .get_tasks(Request::new(JobRef {
                job_id: job.job_id.clone(),
            }))
            .await
            .unwrap()
            .into_inner();
        if JobState::try_from(j.state).unwrap().is_terminal() {
            assert_eq!(
                JobState::try_from(j.state).unwrap(),
                JobState::Succeeded,
                "{}",
                j.error
            );
            return j;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("tasks job {} did not finish", job.job_id);
}

type Workers = Vec<JoinHandle<anyhow::Result<u64>>>;

fn spawn_workers(
    queue: &Arc<dyn WorkQueue>,
    s3: &S3Config,
    f: &Fixture,
    replicas: usize,
    stop: &CancellationToken,
) -> Workers {
    (0..replicas)
        .map(|r| {
            tokio::spawn(worker(
                queue.clone(),
                format!("replica-{r}"),
                s3.clone(),
                dirs(f, &format!("replica-{r}")),
                stop.clone(),
            ))
        })
        .collect()
}

/// Claims the workers handled, in all.
async fn stop_workers(stop: CancellationToken, workers: Workers) -> u64 {
    stop.cancel();
    let mut n = 0;
    for w in workers {
        n += w.await.unwrap().unwrap();
    }
    n
}

/// Every object under `prefix`, decoded where it is a tasks shard, with the stats' timings
/// zeroed: what must not depend on who validated what, or when.
async fn outputs(store: &dyn BlobStore, prefix: &str) -> BTreeMap<String, serde_json::Value> {
    let mut out = BTreeMap::new();
    for m in store.list(prefix).await.unwrap() {
        let key = m.key.strip_prefix(prefix).unwrap().to_string();
        if key.starts_with("work/") || key.contains("/logs/") {
            continue;
        }
        let data = store.get(&m.key).await.unwrap();
        let v = if key.ends_with(".jsonl.zst") {
            serde_json::to_value(
                davinci_runtime::shard::decode_jsonl_zst::<serde_json::Value>(&data).unwrap(),
            )
            .unwrap()
        } else {
            let mut s: Stats = serde_json::from_slice(&data).unwrap();
            s.seconds = 0.0;
            s.validation_seconds.clear();
            serde_json::to_value(s).unwrap()
        };
        out.insert(key, v);
    }
    out
}

fn s3_config(server: &davinci_testkit::S3Server) -> S3Config {
    S3Config {
        endpoint: Some(server.endpoint.clone()),
        region: Some(server.region.clone()),
        force_path_style: server.force_path_style,
        access_key_id: Some(server.access_key_id.clone()),
        secret_access_key: Some(server.secret_access_key.clone()),
        ..S3Config::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_on_redis_and_s3_write_what_tasks_build_writes_and_resume() {
    if !common::bwrap_usable("the tasks service") {
        return;
    }
    let f = fixture();
    let redis = davinci_testkit::RedisServer::start().unwrap();
    let s3_server = davinci_testkit::S3Server::start().await.unwrap();
    let s3 = s3_config(&s3_server);
    let root = s3_server.uri("data");
    let store = blob::open(&root, &s3).await.unwrap();
    // Three shards: the kept PR and a docs PR; a tests-only PR, the one whose environment
    // fails and an unreadable line; the PRs dropped before validation.
    let r = &f.records;
    let shards = [
        prs::jsonl(&[r[0].clone(), r[1].clone()]),
        prs::jsonl(&[r[2].clone(), r[4].clone()]) + "{\"schema\": 1\n",
        prs::jsonl(&[r[5].clone(), r[6].clone(), r[7].clone(), r[8].clone()]),
    ];
    for (i, s) in shards.iter().enumerate() {
        store
            .put(&format!("prs/{i:04}.jsonl"), s.clone().into())
            .await
            .unwrap();
    }
    let cfg = common::config(&f.wheels, 2);

    // Undisturbed and alone: the CLI's batch.
    let alone = format!("{root}/runs/alone");
    let out = blob::open(&alone, &s3).await.unwrap();
    let d = dirs(&f, "alone");
    let stage = Stage::open(cfg.clone(), &d.env_root, &d.work_root)
        .await
        .unwrap();
    let mirrors = Mirrors {
        named: [("acme/tiny".to_string(), f.repo.clone())].into(),
        dir: None,
    };
    let inputs: Vec<(Arc<dyn BlobStore>, String)> = (0..3)
        .map(|i| (store.clone(), format!("prs/{i:04}.jsonl")))
        .collect();
    let report = batch::run_batch(&stage, &mirrors, &inputs, out, &|_| {})
        .await
        .unwrap();
    assert_eq!(report.stats.kept, 1, "{:?}", report.stats);
    let want = outputs(store.as_ref(), "runs/alone/").await;
    assert_eq!(
        want.len(),
        7,
        "3 tasks shards, 3 part markers, the stats: {want:?}"
    );

    // Shared by two replicas over Redis.
    let queue = queue::connect(&redis.url(), QueueOptions::default())
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let workers = spawn_workers(&queue, &s3, &f, 2, &stop);
    let svc = TasksService::new(
        JobRegistry::in_memory().await,
        TasksConfig::default(),
        None,
        dirs(&f, "coordinator"),
        s3.clone(),
    )
    .with_queue(queue.clone());
    let out_uri = format!("{root}/runs/{RUN}");
    let job = finish(
        &svc,
        start(&svc, spec(&f, &format!("{root}/prs/"), &out_uri, &cfg)).await,
    )
    .await;
    assert_eq!((job.done, job.total), (3, 3), "{job:?}");
    assert_eq!(job.counters["kept"], 1);
    assert_eq!(job.counters["infra.env_build_failed"], 1);
    assert_eq!(job.counters["drop.no_code_change"], 1);
    assert_eq!(job.counters["bad_records"], 1);
    assert!(job.outputs.contains(&format!("{out_uri}/stats/tasks.json")));
    let got = outputs(store.as_ref(), &format!("runs/{RUN}/")).await;
    assert_eq!(
        got, want,
        "the service writes what `davinci tasks build` writes"
    );
    let logs = store
        .list(&format!("runs/{RUN}/tasks/logs/acme__tiny-1/"))
        .await
        .unwrap();
    assert!(logs.iter().any(|m| m.key.ends_with("gold.log")), "{logs:?}");
    assert_eq!(stop_workers(stop, workers).await, 3, "each shard once");
    assert_eq!(queue.backlog(TASKS_TOPIC).await.unwrap(), 0);

    // Started again (a restarted conductor): every shard is committed, nothing is validated.
    let stop = CancellationToken::new();
    let workers = spawn_workers(&queue, &s3, &f, 1, &stop);
    let again = finish(
        &svc,
        start(&svc, spec(&f, &format!("{root}/prs/"), &out_uri, &cfg)).await,
    )
    .await;
    assert_eq!(again.counters["kept"], 1);
    assert_eq!(stop_workers(stop, workers).await, 0);
    assert_eq!(outputs(store.as_ref(), &format!("runs/{RUN}/")).await, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreadable_shard_is_dead_lettered_and_the_others_finish() {
    if !common::bwrap_usable("the tasks service") {
        return;
    }
    let f = fixture();
    let root = format!("file://{}/data", f.tmp.path().display());
    let s3 = S3Config::default();
    let store = blob::open(&root, &s3).await.unwrap();
    // A docs-only PR (dropped before any environment) and a shard that is no zstd stream.
    store
        .put("prs/0000.jsonl", prs::jsonl(&[f.records[1].clone()]).into())
        .await
        .unwrap();
    store
        .put(
            "prs/0001.jsonl.zst",
            b"\x28\xb5\x2f\xfd not a zstd frame".to_vec().into(),
        )
        .await
        .unwrap();
    let queue: Arc<dyn WorkQueue> = Arc::new(MemoryQueue::new(QueueOptions::default()));
    let stop = CancellationToken::new();
    let workers = spawn_workers(&queue, &s3, &f, 1, &stop);
    let svc = TasksService::new(
        JobRegistry::in_memory().await,
        TasksConfig::default(),
        None,
        dirs(&f, "coordinator"),
        s3.clone(),
    )
    .with_queue(queue.clone());
    let cfg = common::config(&f.wheels, 1);
    let job = finish(
        &svc,
        start(
            &svc,
            spec(&f, &format!("{root}/prs/"), &format!("{root}/out"), &cfg),
        )
        .await,
    )
    .await;
    assert_eq!(job.counters["failed_shards"], 1, "{job:?}");
    assert_eq!(job.counters["drop.no_test_change"], 1, "{job:?}");
    let dlq = queue.dead_letters(TASKS_TOPIC).await.unwrap();
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    assert_eq!(dlq[0].attempts, 1, "an unreadable shard is not retried");
    assert!(
        dlq[0].error.contains("not a zstd stream"),
        "{}",
        dlq[0].error
    );
    let stats: Stats =
        serde_json::from_slice(&store.get("out/stats/tasks.json").await.unwrap()).unwrap();
    assert_eq!(stats.failed_shards.len(), 1);
    assert!(
        stats.failed_shards[0].contains("prs/0001.jsonl.zst"),
        "{:?}",
        stats.failed_shards
    );
    stop_workers(stop, workers).await;
}

#[tokio::test]
async fn bad_specs_are_refused_by_field() {
    let svc = TasksService::new(
        JobRegistry::in_memory().await,
        TasksConfig::default(),
        None,
        LocalDirs {
            env_root: "/nonexistent/envs".into(),
            work_root: "/nonexistent/work".into(),
        },
        S3Config::default(),
    );
    let refuse = |settings_json: &str, repos: &[&str], inputs: &[&str]| {
        let spec = TasksSpec {
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            out: "file:///nonexistent/out".into(),
            set_format: String::new(),
            repos: repos.iter().map(|s| s.to_string()).collect(),
            repos_dir: String::new(),
            settings_json: settings_json.into(),
        };
        let svc = svc.clone();
        async move {
            let e = svc
                .start_tasks(Request::new(StartTasksRequest {
                    run_id: String::new(),
                    spec: Some(spec),
                }))
                .await
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
            e.message().to_string()
        }
    };
    let m = refuse(r#"{"validate": {"runz": 3}}"#, &[], &["file:///x"]).await;
    assert!(m.starts_with("spec.settings_json: validate.runz"), "{m}");
    let m = refuse(r#"{"jobs": 0}"#, &[], &["file:///x"]).await;
    assert!(m.contains("jobs: at least 1"), "{m}");
    let m = refuse("", &["acme/tiny=relative/path"], &["file:///x"]).await;
    assert!(m.starts_with("spec.repos") && m.contains("absolute"), "{m}");
    let m = refuse("", &[], &[]).await;
    assert_eq!(m, "spec.inputs: empty");
}

/// A published set (one SWE-bench row, lists as JSON strings, made from the fixture's PR #1) is
/// cut into chunks, validated by execution, and written as `tasks/{set}-{chunk}.jsonl.zst`
/// with the lists recomputed and compared with the published ones; a job without a run id
/// runs on the service's own in-process workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_published_set_is_revalidated_chunk_by_chunk() {
    if !common::bwrap_usable("the tasks service") {
        return;
    }
    let f = fixture();
    let cfg = common::config(&f.wheels, 2);
    let mirror = davinci_tasks::repo::Mirror::open(&f.repo).unwrap();
    let t = davinci_tasks::select::candidate(&f.records[0], &mirror, &cfg.select)
        .unwrap()
        .unwrap();
    let row = serde_json::json!({
        "instance_id": t.instance_id, "repo": t.repo, "base_commit": t.base_commit,
        "patch": t.patch, "test_patch": t.test_patch,
        "problem_statement": t.problem_statement, "hints_text": "", "version": "0.1",
        "created_at": "2024-01-01T00:00:00Z", "environment_setup_commit": t.base_commit,
        "FAIL_TO_PASS": "[\"test_add (tests.test_core.CoreTests.test_add)\"]",
        "PASS_TO_PASS": "[]",
    });
    let root = format!("file://{}/data", f.tmp.path().display());
    let s3 = S3Config::default();
    let store = blob::open(&root, &s3).await.unwrap();
    store
        .put("sets/tiny.jsonl", format!("{row}\n").into())
        .await
        .unwrap();
    // No run id and no queue: a one-off job on the service's own in-process workers.
    let svc = TasksService::new(
        JobRegistry::in_memory().await,
        TasksConfig::default(),
        None,
        dirs(&f, "embedded"),
        s3.clone(),
    );
    let mut sp = spec(
        &f,
        &format!("{root}/sets/tiny.jsonl"),
        &format!("{root}/out"),
        &cfg,
    );
    sp.set_format = "swe-bench".into();
    let job = svc
        .start_tasks(Request::new(StartTasksRequest {
            run_id: String::new(),
            spec: Some(sp),
        }))
        .await
        .unwrap()
        .into_inner();
    let job = finish(&svc, job).await;
    assert_eq!((job.done, job.total), (1, 1), "{job:?}");
    assert_eq!(job.counters["kept"], 1, "{job:?}");
    // Compared with the published lists: PASS_TO_PASS misses test_mul.
    assert_eq!(job.counters["published_compared"], 1, "{job:?}");
    assert_eq!(job.counters["published_agree"], 0, "{job:?}");
    let out = blob::open(&format!("{root}/out"), &s3).await.unwrap();
    let tasks: Vec<davinci_core::task::TaskInstance> = davinci_runtime::shard::decode_jsonl_zst(
        &out.get("tasks/tiny-00000.jsonl.zst").await.unwrap(),
    )
    .unwrap();
    assert_eq!(tasks.len(), 1);
    assert_eq!(
        tasks[0].fail_to_pass,
        ["test_add (tests.test_core.CoreTests.test_add)"]
    );
    assert_eq!(
        tasks[0].pass_to_pass,
        ["test_mul (tests.test_core.CoreTests.test_mul)"],
        "recomputed, not the published list"
    );
    assert!(out.get("stats/tasks.json").await.is_ok());
}
