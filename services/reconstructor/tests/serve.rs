//! The gRPC service methods (Start / Get / Watch) and a job shared by `prs` queue workers, with
//! the in-process queue and a file store.
use davinci_core::pr::PullRequest;
use davinci_proto::v1::reconstructor_server::Reconstructor as _;
use davinci_proto::v1::{JobRef, JobState, ReconstructSpec, StartReconstructRequest};
use davinci_reconstructor::serve::{self, ReconstructorService};
use davinci_reconstructor::{ReconstructConfig, word_counter};
use davinci_runtime::blob::{BlobStore, FileStore};
use davinci_runtime::jobs::JobRegistry;
use davinci_runtime::queue::{MemoryQueue, QueueOptions, WorkQueue};
use davinci_runtime::shard;
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tonic::Request;

fn fixture(name: &str) -> PullRequest {
    let p = format!("{}/tests/fixtures/{name}.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

async fn put_prs(store: &dyn BlobStore, key_dir: &str) -> (String, shard::EncodedShard) {
    let prs = vec![
        fixture("issue_reviews_multicommit"),
        fixture("renames_deletes_backticks_crlf"),
        fixture("bot_author"),
    ];
    let enc = shard::encode_shard(&prs).unwrap();
    let key = format!("{key_dir}/{}", enc.file_name());
    store.put(&key, enc.data.clone()).await.unwrap();
    (key, enc)
}

#[tokio::test]
async fn grpc_job_runs_to_success() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path()).unwrap();
    put_prs(&store, "in/prs").await;
    let svc = ReconstructorService {
        jobs: JobRegistry::in_memory().await,
        base: ReconstructConfig::default(),
        s3: Default::default(),
        tokenizer: Arc::new(|_| Ok(word_counter())),
        queue: None,
    };
    let spec = ReconstructSpec {
        inputs: vec![dir.path().join("in/prs").display().to_string()],
        out: dir.path().join("out").display().to_string(),
        formats: vec!["ctx-python".into()],
        ..Default::default()
    };
    let job = svc
        .start_reconstruct(Request::new(StartReconstructRequest {
            run_id: "r1".into(),
            spec: Some(spec.clone()),
        }))
        .await
        .unwrap()
        .into_inner();
    let mut events = svc
        .watch_reconstruct(Request::new(JobRef {
            job_id: job.job_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(20), events.next())
        .await
        .unwrap()
    {
        last = Some(ev.unwrap());
    }
    assert_eq!(last.unwrap().state, JobState::Succeeded as i32);
    let job = svc
        .get_reconstruct(Request::new(JobRef { job_id: job.job_id }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.counters["ctx-python.samples"], 2);
    assert_eq!(job.counters["ctx-python.drop.bot_author"], 1);
    assert!(
        job.outputs
            .iter()
            .any(|o| o.ends_with("stats/reconstruct.json"))
    );

    // Bad specs are refused with the field named.
    let bad = ReconstructSpec {
        formats: vec!["ctx-rust".into()],
        ..spec
    };
    let err = svc
        .start_reconstruct(Request::new(StartReconstructRequest {
            run_id: String::new(),
            spec: Some(bad),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("spec.formats"), "{}", err.message());
}

/// Every object under `dir` but the job's scratch space, with its bytes.
fn tree(dir: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(dir).unwrap().display().to_string();
            if rel.starts_with("work") {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

async fn run_to_end(
    svc: &ReconstructorService,
    run_id: &str,
    spec: ReconstructSpec,
) -> davinci_proto::v1::Job {
    let job = svc
        .start_reconstruct(Request::new(StartReconstructRequest {
            run_id: run_id.into(),
            spec: Some(spec),
        }))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..400 {
        let j = svc
            .get_reconstruct(Request::new(JobRef {
                job_id: job.job_id.clone(),
            }))
            .await
            .unwrap()
            .into_inner();
        if j.state == JobState::Succeeded as i32 || j.state == JobState::Failed as i32 {
            return j;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("job {} did not end", job.job_id);
}

/// PR shards where later shards repeat PRs of earlier ones, so dedup depends on input order.
async fn put_overlapping_prs(store: &dyn BlobStore, dir: &str) {
    let a = fixture("issue_reviews_multicommit");
    let b = fixture("renames_deletes_backticks_crlf");
    let c = fixture("marker_collision");
    let mut a2 = a.clone();
    a2.number += 1000;
    a2.id = format!("{}-again", a2.id);
    for (i, prs) in [
        vec![a.clone(), b.clone()],
        vec![a2, c.clone()],
        vec![b, fixture("bot_author"), c],
    ]
    .into_iter()
    .enumerate()
    {
        let enc = shard::encode_shard(&prs).unwrap();
        store
            .put(&format!("{dir}/{i:02}-{}", enc.file_name()), enc.data)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_job_shared_by_workers_writes_what_a_one_process_job_writes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store: Arc<dyn BlobStore> = Arc::new(FileStore::new(&root).unwrap());
    put_overlapping_prs(store.as_ref(), "in/prs").await;
    let spec = |run: &str| ReconstructSpec {
        inputs: vec![root.join("in/prs").display().to_string()],
        out: format!("file://{}/runs/{run}", root.display()),
        ..Default::default()
    };
    let tokenizer: serve::TokenizerLoader = Arc::new(|_| Ok(word_counter()));
    let local = ReconstructorService {
        jobs: JobRegistry::in_memory().await,
        base: ReconstructConfig::default(),
        s3: Default::default(),
        tokenizer: tokenizer.clone(),
        queue: None,
    };
    let j = run_to_end(&local, "one", spec("one")).await;
    assert_eq!(j.state, JobState::Succeeded as i32, "{}", j.error);
    assert!(
        j.counters["ctx-general.drop.duplicate"]
            + j.counters
                .get("ctx-general.drop.near_duplicate")
                .copied()
                .unwrap_or(0)
            >= 2,
        "{:?}",
        j.counters
    );

    let queue: Arc<dyn WorkQueue> = Arc::new(MemoryQueue::new(QueueOptions::default()));
    let stop = tokio_util::sync::CancellationToken::new();
    let workers: Vec<_> = (0..3)
        .map(|w| {
            tokio::spawn(serve::worker(
                queue.clone(),
                ReconstructConfig::default(),
                tokenizer.clone(),
                format!("w{w}"),
                Default::default(),
                stop.clone(),
            ))
        })
        .collect();
    let shared = ReconstructorService {
        queue: Some(queue.clone()),
        ..local.clone()
    };
    let j2 = run_to_end(&shared, "many", spec("many")).await;
    assert_eq!(j2.state, JobState::Succeeded as i32, "{}", j2.error);
    assert_eq!(j.counters, j2.counters);
    let (one, many) = (tree(&root.join("runs/one")), tree(&root.join("runs/many")));
    assert!(
        one.keys().any(|k| k.starts_with("samples/ctx-general/")),
        "{:?}",
        one.keys()
    );
    assert_eq!(
        one, many,
        "shared and one-process jobs wrote different objects"
    );
    let parts = std::fs::read_dir(root.join("runs/many/work"))
        .unwrap()
        .count();
    assert_eq!(parts, 1, "one work directory per job spec");

    // A shard that is not a PR shard fails its job, named, after its attempts.
    store
        .put(
            "bad/prs/00-broken.jsonl.zst",
            bytes::Bytes::from_static(b"not zstd"),
        )
        .await
        .unwrap();
    let j3 = run_to_end(
        &shared,
        "bad",
        ReconstructSpec {
            inputs: vec![root.join("bad/prs").display().to_string()],
            ..spec("bad")
        },
    )
    .await;
    assert_eq!(j3.state, JobState::Failed as i32);
    assert!(
        j3.error.contains("00-broken.jsonl.zst") && j3.error.contains("dead-lettered"),
        "{}",
        j3.error
    );
    stop.cancel();
    for w in workers {
        w.await.unwrap().unwrap();
    }
}
