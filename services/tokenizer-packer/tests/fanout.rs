//! A pack job shared by replicas: the StartPack job announces the input shards on `samples` and
//! `trajectories`, queue workers tokenize them, the job packs the parts in input order. Its
//! shards and manifest are byte-identical to the same job run in one process, on a memory
//! queue and on Redis with S3, after a worker died mid-part; a corrupt shard is dead-lettered
//! and fails the job by name.
use davinci_core::sample::{Sample, SampleMetadata, SampleSource};
use davinci_core::traj::{Message, Outcome, Trajectory};
use davinci_proto::v1::tokenizer_packer_server::TokenizerPacker;
use davinci_proto::v1::{Job, JobRef, JobState, PackSpec, StartPackRequest};
use davinci_runtime::blob::{self, BlobStore, S3Config};
use davinci_runtime::fanout;
use davinci_runtime::jobs::JobRegistry;
use davinci_runtime::queue::{self, MemoryQueue, QueueOptions, WorkQueue};
use davinci_tokenizer_packer::serve::{PackerService, SAMPLES_TOPIC, TRAJECTORIES_TOPIC, worker};
use davinci_tokenizer_packer::shared::{self, TokenizerCache};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::Request;

const TOK: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../crates/tokenize/tests/fixtures/tiny-qwen-shape.json"
);
const RUN: &str = "r1";

fn sample(i: usize, source: SampleSource) -> String {
    serde_json::to_string(&Sample {
        id: format!("s{i}"),
        // Lengths from a few tokens to several times seq_len, so documents are split too.
        text: format!("def f{i}(x):\n    return x * {i}  # naïve ünïcode\n")
            .repeat(1 + (i * 7) % 40),
        source,
        metadata: SampleMetadata::default(),
    })
    .unwrap()
}

fn traj(i: usize, resolved: bool) -> String {
    let m = |role: &str, c: String| Message {
        role: role.into(),
        content: Some(c),
        tool_calls: vec![],
        ..Default::default()
    };
    serde_json::to_string(&Trajectory {
        schema: "davinci.traj/v1".into(),
        id: format!("t{i}"),
        task_id: "x".into(),
        model: "m".into(),
        tools: vec![],
        messages: vec![
            m("user", format!("fix bug {i}").repeat(1 + i % 5)),
            m("assistant", format!("patched {i}\n").repeat(1 + i % 9)),
            m("user", "thanks".into()),
            m("assistant", "done".into()),
        ],
        outcome: Outcome {
            resolved,
            exit_status: "submitted".into(),
            tests: Default::default(),
        },
        n_tokens: None,
        run: None,
        metadata: Default::default(),
    })
    .unwrap()
}

fn zst(lines: &[String]) -> Vec<u8> {
    zstd::encode_all(lines.join("\n").as_bytes(), 3).unwrap()
}

/// Input shards of a run, keyed under the storage root: sample shards of two formats (zstd and
/// plain, with bad records) and trajectory shards.
fn shards() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for k in 0..4 {
        let mut lines: Vec<String> = (0..20)
            .map(|i| sample(k * 100 + i, SampleSource::CtxGeneral))
            .collect();
        lines.insert(3, "{not json".into());
        out.push((
            format!("runs/{RUN}/samples/ctx-general/part-{k:03}.jsonl.zst"),
            zst(&lines),
        ));
    }
    for k in 0..2 {
        let mut data = Vec::new();
        for i in 0..15 {
            data.extend_from_slice(sample(k * 100 + i, SampleSource::CtxPython).as_bytes());
            data.push(b'\n');
        }
        data.extend_from_slice(b"{\"text\": \"\xff\xfe bad utf-8\"}\n");
        out.push((
            format!("runs/{RUN}/samples/ctx-python/part-{k:03}.jsonl"),
            data,
        ));
    }
    for (kind, resolved) in [("pass", true), ("fail", false)] {
        let lines: Vec<String> = (0..12).map(|i| traj(i, resolved)).collect();
        out.push((
            format!("runs/{RUN}/trajectories/{kind}/t-000.jsonl.zst"),
            zst(&lines),
        ));
    }
    out
}

async fn put_all(store: &dyn BlobStore, shards: &[(String, Vec<u8>)]) {
    for (k, d) in shards {
        store.put(k, d.clone().into()).await.unwrap();
    }
}

fn spec(root: &str) -> PackSpec {
    PackSpec {
        inputs: vec![
            format!("{root}/runs/{RUN}/samples/"),
            format!("{root}/runs/{RUN}/trajectories/"),
        ],
        out: format!("{root}/runs/{RUN}/packed"),
        tokenizer: TOK.into(),
        seq_len: 256,
        mixture_json: String::new(),
        seed: 7,
        long_docs: String::new(),
    }
}

async fn finish(svc: &PackerService, job: Job) -> Job {
    for _ in 0..1200 {
        let j = svc
            .get_pack(Request::new(JobRef {
                job_id: job.job_id.clone(),
            }))
            .await
            .unwrap()
            .into_inner();
        if JobState::try_from(j.state).unwrap().is_terminal() {
            return j;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("pack job {} did not finish", job.job_id);
}

async fn pack(svc: &PackerService, spec: PackSpec) -> Job {
    let job = svc
        .start_pack(Request::new(StartPackRequest {
            run_id: RUN.into(),
            spec: Some(spec),
        }))
        .await
        .unwrap()
        .into_inner();
    finish(svc, job).await
}

fn succeeded(j: &Job) {
    assert_eq!(
        JobState::try_from(j.state).unwrap(),
        JobState::Succeeded,
        "{}",
        j.error
    );
}

/// Every object under `runs/{RUN}/packed/`, removed from the store so the next job's output is
/// its own.
async fn take_packed(store: &dyn BlobStore) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for m in store.list(&format!("runs/{RUN}/packed/")).await.unwrap() {
        out.insert(m.key.clone(), store.get(&m.key).await.unwrap().to_vec());
        store.delete(&m.key).await.unwrap();
    }
    out
}

fn assert_same(a: &BTreeMap<String, Vec<u8>>, b: &BTreeMap<String, Vec<u8>>) {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "the same objects"
    );
    for (k, v) in a {
        assert!(v == &b[k], "{k} differs");
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&a[&format!("runs/{RUN}/packed/manifest.json")]).unwrap();
    for (stage, dataset) in [(0, 0), (1, 0), (1, 1), (1, 2), (2, 0)] {
        assert!(
            manifest["stages"][stage]["datasets"][dataset]["tokens"]
                .as_u64()
                .unwrap()
                > 0,
            "{manifest}"
        );
    }
    assert_eq!(manifest["drops"]["bad_json"], 4);
    assert_eq!(manifest["drops"]["bad_utf8"], 2);
}

type Workers = Vec<(&'static str, JoinHandle<anyhow::Result<u64>>)>;

/// `replicas` workers on each topic.
fn spawn_workers(
    queue: &Arc<dyn WorkQueue>,
    s3: &S3Config,
    replicas: usize,
    stop: &CancellationToken,
) -> Workers {
    let mut out = Vec::new();
    for r in 0..replicas {
        for topic in [SAMPLES_TOPIC, TRAJECTORIES_TOPIC] {
            let w = worker(
                queue.clone(),
                topic,
                format!("replica-{r}"),
                s3.clone(),
                stop.clone(),
            );
            out.push((topic, tokio::spawn(w)));
        }
    }
    out
}

/// Inputs the workers handled, per topic.
async fn stop_workers(stop: CancellationToken, workers: Workers) -> BTreeMap<&'static str, u64> {
    stop.cancel();
    let mut handled = BTreeMap::new();
    for (topic, w) in workers {
        *handled.entry(topic).or_default() += w.await.unwrap().unwrap();
    }
    handled
}

/// Every input once: the sample shards on `samples`, the trajectory shards on `trajectories`.
fn once_each(inputs: &[(String, Vec<u8>)]) -> BTreeMap<&'static str, u64> {
    let trajectories = inputs
        .iter()
        .filter(|(k, _)| k.contains("/trajectories/"))
        .count() as u64;
    BTreeMap::from([
        (SAMPLES_TOPIC, inputs.len() as u64 - trajectories),
        (TRAJECTORIES_TOPIC, trajectories),
    ])
}

fn file_root(dir: &tempfile::TempDir) -> String {
    format!("file://{}", dir.path().display())
}

/// The same job in one process (a service without a queue) and shared by three replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shared_job_on_a_memory_queue_writes_what_one_process_writes() {
    let dir = tempfile::tempdir().unwrap();
    let root = file_root(&dir);
    let s3 = S3Config::default();
    let store = blob::open(&root, &s3).await.unwrap();
    let inputs = shards();
    put_all(store.as_ref(), &inputs).await;

    let alone = PackerService::new(JobRegistry::in_memory().await, s3.clone());
    succeeded(&pack(&alone, spec(&root)).await);
    let want = take_packed(store.as_ref()).await;

    let queue: Arc<dyn WorkQueue> = Arc::new(MemoryQueue::new(QueueOptions::default()));
    let stop = CancellationToken::new();
    let workers = spawn_workers(&queue, &s3, 3, &stop);
    let svc =
        PackerService::new(JobRegistry::in_memory().await, s3.clone()).with_queue(queue.clone());
    let job = pack(&svc, spec(&root)).await;
    succeeded(&job);
    assert_eq!(job.done, job.total, "{job:?}");
    assert_eq!(job.total, 2 * inputs.len() as u64);
    let got = take_packed(store.as_ref()).await;
    assert_same(&want, &got);
    assert_eq!(
        stop_workers(stop, workers).await,
        once_each(&inputs),
        "every input tokenized once, on its topic"
    );

    // Started again (a restarted conductor), the job finds every part committed: nothing is
    // tokenized again and the output is the same.
    let stop = CancellationToken::new();
    let workers = spawn_workers(&queue, &s3, 1, &stop);
    succeeded(&pack(&svc, spec(&root)).await);
    assert_same(&want, &take_packed(store.as_ref()).await);
    assert_eq!(stop_workers(stop, workers).await.values().sum::<u64>(), 0);
}

/// Distributed mode for real: Redis Streams between two replicas, inputs and outputs on S3.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shared_job_across_redis_and_s3_writes_what_one_process_writes() {
    let redis = davinci_testkit::RedisServer::start().unwrap();
    let s3_server = davinci_testkit::S3Server::start().await.unwrap();
    let s3 = S3Config {
        endpoint: Some(s3_server.endpoint.clone()),
        region: Some(s3_server.region.clone()),
        force_path_style: s3_server.force_path_style,
        access_key_id: Some(s3_server.access_key_id.clone()),
        secret_access_key: Some(s3_server.secret_access_key.clone()),
        ..S3Config::default()
    };
    let root = s3_server.uri("data");
    let store = blob::open(&root, &s3).await.unwrap();
    let inputs = shards();
    put_all(store.as_ref(), &inputs).await;

    let alone = PackerService::new(JobRegistry::in_memory().await, s3.clone());
    succeeded(&pack(&alone, spec(&root)).await);
    let want = take_packed(store.as_ref()).await;
    // The blend names the shards where trainers find them, not the upload's staging directory.
    let manifest =
        String::from_utf8(want[&format!("runs/{RUN}/packed/manifest.json")].clone()).unwrap();
    assert!(
        manifest.contains(&format!(
            "{root}/runs/{RUN}/packed/stage1/ctx-general-00000"
        )),
        "{manifest}"
    );

    let queue = queue::connect(&redis.url(), QueueOptions::default())
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let workers = spawn_workers(&queue, &s3, 2, &stop);
    let svc =
        PackerService::new(JobRegistry::in_memory().await, s3.clone()).with_queue(queue.clone());
    succeeded(&pack(&svc, spec(&root)).await);
    assert_same(&want, &take_packed(store.as_ref()).await);
    assert_eq!(stop_workers(stop, workers).await, once_each(&inputs));
    assert_eq!(queue.backlog(SAMPLES_TOPIC).await.unwrap(), 0);
    assert_eq!(queue.backlog(TRAJECTORIES_TOPIC).await.unwrap(), 0);
}

/// A worker takes a claim, writes the part, dies before committing it (and its part is left
/// cut short); the claim comes back after the visibility timeout and another worker redoes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_dying_mid_part_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = file_root(&dir);
    let s3 = S3Config::default();
    let store = blob::open(&root, &s3).await.unwrap();
    let inputs = shards();
    put_all(store.as_ref(), &inputs).await;
    let alone = PackerService::new(JobRegistry::in_memory().await, s3.clone());
    succeeded(&pack(&alone, spec(&root)).await);
    let want = take_packed(store.as_ref()).await;

    let queue: Arc<dyn WorkQueue> = Arc::new(MemoryQueue::new(QueueOptions {
        visibility_timeout: Duration::from_secs(2),
        ..Default::default()
    }));
    let svc =
        PackerService::new(JobRegistry::in_memory().await, s3.clone()).with_queue(queue.clone());
    let job = svc
        .start_pack(Request::new(StartPackRequest {
            run_id: RUN.into(),
            spec: Some(spec(&root)),
        }))
        .await
        .unwrap()
        .into_inner();

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let doomed = {
        let (queue, s3) = (queue.clone(), s3.clone());
        tokio::spawn(async move {
            let cache = TokenizerCache::default();
            fanout::serve_topic(
                queue,
                SAMPLES_TOPIC,
                "doomed",
                s3.clone(),
                CancellationToken::new(),
                |c| {
                    let (cache, s3, tx) = (&cache, &s3, tx.clone());
                    async move {
                        shared::tokenize_part(&c, s3, cache).await?;
                        tx.send(c.work.uri.clone()).unwrap();
                        std::future::pending::<anyhow::Result<()>>().await
                    }
                },
            )
            .await
        })
    };
    let work_uri = rx.recv().await.unwrap();
    doomed.abort();
    let _ = doomed.await;
    // The part it wrote is the only file in the work directory besides the spec; cut it short.
    let work = blob::open(&work_uri, &s3).await.unwrap();
    let written: Vec<String> = work
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .filter(|k| k != "spec.json")
        .collect();
    assert_eq!(written.len(), 1, "{written:?}");
    let part = work.get(&written[0]).await.unwrap();
    work.put(&written[0], part.slice(..part.len() / 2))
        .await
        .unwrap();

    let stop = CancellationToken::new();
    let workers = spawn_workers(&queue, &s3, 2, &stop);
    succeeded(&finish(&svc, job).await);
    assert_same(&want, &take_packed(store.as_ref()).await);
    assert!(
        stop_workers(stop, workers).await[SAMPLES_TOPIC] >= once_each(&inputs)[SAMPLES_TOPIC],
        "the dead worker's input was handled again"
    );
}

/// An input that cannot be read fails permanently: it is tried once, lands in `samples:dlq`
/// with its reason, and the job fails naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_shard_is_dead_lettered_and_fails_the_job_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let root = file_root(&dir);
    let s3 = S3Config::default();
    let store = blob::open(&root, &s3).await.unwrap();
    let mut inputs = shards();
    let bad = format!("runs/{RUN}/samples/ctx-general/part-bad.jsonl.zst");
    inputs.push((
        bad.clone(),
        b"\x28\xb5\x2f\xfd this is no zstd frame".to_vec(),
    ));
    put_all(store.as_ref(), &inputs).await;

    let queue: Arc<dyn WorkQueue> = Arc::new(MemoryQueue::new(QueueOptions {
        max_attempts: 2,
        ..Default::default()
    }));
    let stop = CancellationToken::new();
    let workers = spawn_workers(&queue, &s3, 2, &stop);
    let svc =
        PackerService::new(JobRegistry::in_memory().await, s3.clone()).with_queue(queue.clone());
    let job = pack(&svc, spec(&root)).await;
    assert_eq!(JobState::try_from(job.state).unwrap(), JobState::Failed);
    assert!(job.error.contains("part-bad.jsonl.zst"), "{}", job.error);
    assert!(job.error.contains("samples:dlq"), "{}", job.error);
    let dlq = queue.dead_letters(SAMPLES_TOPIC).await.unwrap();
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    assert_eq!(dlq[0].attempts, 1, "a malformed shard is not retried");
    let claim = queue::ClaimCheck::from_payload(&dlq[0].payload).unwrap();
    assert!(claim.uri.ends_with(&bad), "{}", claim.uri);
    assert!(dlq[0].error.contains("reading"), "{}", dlq[0].error);
    assert!(dlq[0].error.contains("permanent"), "{}", dlq[0].error);
    assert!(
        store
            .list(&format!("runs/{RUN}/packed/"))
            .await
            .unwrap()
            .is_empty()
    );
    stop_workers(stop, workers).await;
}
