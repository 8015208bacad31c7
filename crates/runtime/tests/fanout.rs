//! A stage job fanned out over several workers: every input is committed once, committed inputs
//! are not published again, and an input that exhausts its attempts fails the coordinator.
use davinci_runtime::blob::{self, S3Config};
use davinci_runtime::fanout::{self, Item, WaitOptions, Work};
use davinci_runtime::queue::{MemoryQueue, QueueOptions, WorkQueue};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const TOPIC: &str = "things";

async fn inputs(root: &str, n: usize) -> Vec<Item> {
    let store = blob::open(root, &S3Config::default()).await.unwrap();
    let mut items = Vec::new();
    for i in 0..n {
        let key = format!("in/shard-{i}.jsonl");
        let data = format!("{{\"n\":{i}}}\n");
        store.put(&key, data.clone().into()).await.unwrap();
        let item = Item::for_shard("r1", TOPIC, &store.uri(&key), data.as_bytes());
        assert_eq!(item.claim.records, 1);
        items.push(item);
    }
    items
}

fn opts() -> WaitOptions {
    WaitOptions {
        poll: Duration::from_millis(20),
        dlq_every: Duration::from_millis(50),
        fail_on_dead_letter: true,
    }
}

/// Workers that sum each input's number into `sum` and commit the part.
fn spawn_workers(
    queue: Arc<dyn WorkQueue>,
    n: usize,
    sum: Arc<AtomicU64>,
    handled: Arc<AtomicU64>,
    stop: CancellationToken,
) -> Vec<tokio::task::JoinHandle<anyhow::Result<u64>>> {
    (0..n)
        .map(|w| {
            let (queue, sum, handled, stop) =
                (queue.clone(), sum.clone(), handled.clone(), stop.clone());
            tokio::spawn(async move {
                fanout::serve_topic(
                    queue,
                    TOPIC,
                    &format!("w{w}"),
                    S3Config::default(),
                    stop,
                    |c| {
                        let (sum, handled) = (sum.clone(), handled.clone());
                        async move {
                            let (_, data) =
                                fanout::read_input(&c.claim, &S3Config::default()).await?;
                            let v: serde_json::Value = serde_json::from_slice(&data)?;
                            let n = v["n"].as_u64().unwrap();
                            anyhow::ensure!(n != 13, "thirteen is refused");
                            handled.fetch_add(1, Ordering::SeqCst);
                            sum.fetch_add(n, Ordering::SeqCst);
                            c.work
                                .commit_part(&c.part, &serde_json::json!({ "n": n }))
                                .await
                        }
                    },
                )
                .await
            })
        })
        .collect()
}

#[tokio::test]
async fn inputs_are_shared_by_workers_and_committed_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = format!("file://{}", dir.path().display());
    let queue: Arc<dyn WorkQueue> = Arc::new(MemoryQueue::new(QueueOptions::default()));
    let items = inputs(&root, 10).await;
    let work = Work::open(
        &Work::dir_uri(&root, "r1", "sum", &"spec"),
        &S3Config::default(),
    )
    .await
    .unwrap();
    work.put_spec(&serde_json::json!({ "k": 1 })).await.unwrap();
    // Input 0 is committed already (a previous coordinator's worker finished it).
    work.commit_part(&items[0].part, &serde_json::json!({ "n": 0 }))
        .await
        .unwrap();
    let (sum, handled, stop) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        CancellationToken::new(),
    );
    let workers = spawn_workers(queue.clone(), 3, sum.clone(), handled.clone(), stop.clone());
    let mut seen = Vec::new();
    fanout::distribute(
        queue.as_ref(),
        TOPIC,
        &work,
        &items,
        &CancellationToken::new(),
        &opts(),
        |d, t| {
            seen.push((d, t));
            async {}
        },
    )
    .await
    .unwrap();
    assert_eq!(
        handled.load(Ordering::SeqCst),
        9,
        "the committed input is not published again"
    );
    assert_eq!(sum.load(Ordering::SeqCst), (1..10).sum::<u64>());
    assert_eq!(seen.first(), Some(&(1, 10)));
    assert_eq!(seen.last(), Some(&(10, 10)));
    assert_eq!(work.committed().await.unwrap().len(), 10);
    let spec: serde_json::Value = work.spec().await.unwrap();
    assert_eq!(spec["k"], 1);

    // Publishing the same job again (a restarted coordinator) does no work at all.
    fanout::distribute(
        queue.as_ref(),
        TOPIC,
        &work,
        &items,
        &CancellationToken::new(),
        &opts(),
        |_, _| async {},
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(handled.load(Ordering::SeqCst), 9);
    stop.cancel();
    let total: u64 = futures::future::join_all(workers)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .sum();
    assert_eq!(total, 9);
}

#[tokio::test]
async fn a_dead_lettered_input_fails_the_job_with_its_error() {
    let dir = tempfile::tempdir().unwrap();
    let root = format!("file://{}", dir.path().display());
    let queue: Arc<dyn WorkQueue> = Arc::new(MemoryQueue::new(QueueOptions {
        max_attempts: 2,
        retry_backoff: Duration::from_millis(10),
        ..Default::default()
    }));
    let items = inputs(&root, 15).await;
    let work = Work::open(
        &Work::dir_uri(&root, "r1", "sum", &"spec"),
        &S3Config::default(),
    )
    .await
    .unwrap();
    let stop = CancellationToken::new();
    let _workers = spawn_workers(
        queue.clone(),
        2,
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        stop.clone(),
    );
    let err = fanout::distribute(
        queue.as_ref(),
        TOPIC,
        &work,
        &items,
        &CancellationToken::new(),
        &opts(),
        |_, _| async {},
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("shard-13.jsonl"), "{err}");
    assert!(err.contains("thirteen is refused"), "{err}");
    assert!(err.contains("2 times"), "{err}");

    // Tolerating failures, the job finishes the other inputs and reports the failed one.
    let work2 = Work::open(
        &Work::dir_uri(&root, "r1", "sum", &"again"),
        &S3Config::default(),
    )
    .await
    .unwrap();
    let failed = fanout::distribute(
        queue.as_ref(),
        TOPIC,
        &work2,
        &items,
        &CancellationToken::new(),
        &WaitOptions {
            fail_on_dead_letter: false,
            ..opts()
        },
        |_, _| async {},
    )
    .await
    .unwrap();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(failed[0].uri.ends_with("shard-13.jsonl"));
    assert!(failed[0].error.contains("thirteen is refused"));
    assert_eq!(work2.committed().await.unwrap().len(), 14);
    stop.cancel();
}

#[tokio::test]
async fn a_claim_without_a_work_directory_is_refused_and_cancel_stops_waiting() {
    let queue: Arc<dyn WorkQueue> = Arc::new(MemoryQueue::new(QueueOptions {
        max_attempts: 1,
        ..Default::default()
    }));
    let mut item = inputs(
        &format!("file://{}", tempfile::tempdir().unwrap().path().display()),
        1,
    )
    .await
    .remove(0);
    item.claim.topic = TOPIC.into();
    queue
        .publish(TOPIC, &item.claim.to_payload())
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let worker = tokio::spawn(fanout::serve_topic(
        queue.clone(),
        TOPIC,
        "w",
        S3Config::default(),
        stop.clone(),
        |_| async { anyhow::Ok(()) },
    ));
    let mut dlq = Vec::new();
    for _ in 0..100 {
        dlq = queue.dead_letters(TOPIC).await.unwrap();
        if !dlq.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        dlq[0].error.contains("names no work directory"),
        "{:?}",
        dlq[0].error
    );
    stop.cancel();
    worker.await.unwrap().unwrap();

    // A coordinator whose inputs never complete stops when its job is cancelled.
    let dir = tempfile::tempdir().unwrap();
    let work = Work::open(
        &format!("file://{}/w", dir.path().display()),
        &S3Config::default(),
    )
    .await
    .unwrap();
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        c2.cancel();
    });
    let err = fanout::distribute(
        queue.as_ref(),
        "other",
        &work,
        &[item],
        &cancel,
        &opts(),
        |_, _| async {},
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("cancelled"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_longer_than_the_visibility_timeout_runs_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = format!("file://{}", dir.path().display());
    let vt = Duration::from_secs(1);
    let queue: Arc<dyn WorkQueue> = Arc::new(MemoryQueue::new(QueueOptions {
        visibility_timeout: vt,
        ..Default::default()
    }));
    let items = inputs(&root, 1).await;
    let work = Work::open(
        &Work::dir_uri(&root, "r1", "slow", &"spec"),
        &S3Config::default(),
    )
    .await
    .unwrap();
    let (started, stop) = (Arc::new(AtomicU64::new(0)), CancellationToken::new());
    let workers: Vec<_> = (0..2)
        .map(|w| {
            let (queue, started, stop) = (queue.clone(), started.clone(), stop.clone());
            tokio::spawn(async move {
                fanout::serve_topic(
                    queue,
                    TOPIC,
                    &format!("w{w}"),
                    S3Config::default(),
                    stop,
                    |c| {
                        let started = started.clone();
                        async move {
                            started.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(vt * 3).await;
                            c.work.commit_part(&c.part, &serde_json::json!({})).await
                        }
                    },
                )
                .await
            })
        })
        .collect();
    fanout::distribute(
        queue.as_ref(),
        TOPIC,
        &work,
        &items,
        &CancellationToken::new(),
        &opts(),
        |_, _| async {},
    )
    .await
    .unwrap();
    // Without lease extension the idle worker would have started it after 1 s.
    assert_eq!(started.load(Ordering::SeqCst), 1, "the item ran twice");
    stop.cancel();
    let done: Vec<u64> = futures::future::join_all(workers)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();
    assert_eq!(done.iter().sum::<u64>(), 1, "acks per worker: {done:?}");
    assert_eq!(queue.backlog(TOPIC).await.unwrap(), 0);
    assert!(queue.dead_letters(TOPIC).await.unwrap().is_empty());
}

/// Input 0 fails permanently, input 1 fails transiently twice and then succeeds, input 2 fails
/// transiently every time. The permanent failure is tried once and dead-lettered with its
/// reason; the transient ones are retried after delays that double, and input 2 is
/// dead-lettered after its last attempt.
async fn permanent_failures_are_not_retried_and_transient_ones_back_off(
    queue: Arc<dyn WorkQueue>,
    backoff: Duration,
) {
    let dir = tempfile::tempdir().unwrap();
    let root = format!("file://{}", dir.path().display());
    let items = inputs(&root, 3).await;
    let work = Work::open(
        &Work::dir_uri(&root, "r1", "flaky", &"spec"),
        &S3Config::default(),
    )
    .await
    .unwrap();
    let tries: Arc<std::sync::Mutex<Vec<Vec<std::time::Instant>>>> =
        Arc::new(std::sync::Mutex::new(vec![Vec::new(); 3]));
    let stop = CancellationToken::new();
    let (q, t, s) = (queue.clone(), tries.clone(), stop.clone());
    let worker = tokio::spawn(async move {
        fanout::serve_topic(q, TOPIC, "w", S3Config::default(), s, |c| {
            let tries = t.clone();
            async move {
                let (_, data) = fanout::read_input(&c.claim, &S3Config::default()).await?;
                let v: serde_json::Value = serde_json::from_slice(&data)?;
                let n = v["n"].as_u64().unwrap() as usize;
                let attempt = {
                    let mut tries = tries.lock().unwrap();
                    tries[n].push(std::time::Instant::now());
                    tries[n].len()
                };
                match (n, attempt) {
                    (0, _) => Err(davinci_runtime::retry::permanent(anyhow::anyhow!(
                        "repository acme/nothing does not exist"
                    ))),
                    (1, 1..=2) | (2, _) => anyhow::bail!("connection reset by peer"),
                    _ => c.work.commit_part(&c.part, &serde_json::json!({})).await,
                }
            }
        })
        .await
    });
    let mut failed = fanout::distribute(
        queue.as_ref(),
        TOPIC,
        &work,
        &items,
        &CancellationToken::new(),
        &WaitOptions {
            fail_on_dead_letter: false,
            ..opts()
        },
        |_, _| async {},
    )
    .await
    .unwrap();
    stop.cancel();
    assert_eq!(worker.await.unwrap().unwrap(), 1, "one input succeeded");
    failed.sort_by(|a, b| a.uri.cmp(&b.uri));
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert!(failed[0].uri.ends_with("shard-0.jsonl"), "{failed:?}");
    assert_eq!(failed[0].attempts, 1, "a permanent failure is tried once");
    assert!(
        failed[0]
            .error
            .contains("permanent failure, not retried: repository acme/nothing does not exist"),
        "{}",
        failed[0].error
    );
    assert!(failed[1].uri.ends_with("shard-2.jsonl"), "{failed:?}");
    assert_eq!(
        failed[1].attempts, 3,
        "a transient failure uses every attempt"
    );
    assert!(failed[1].error.contains("connection reset by peer"));
    assert_eq!(work.committed().await.unwrap().len(), 1);
    assert_eq!(queue.backlog(TOPIC).await.unwrap(), 0);

    let tries = tries.lock().unwrap();
    assert_eq!(tries[0].len(), 1, "the permanent failure was retried");
    for n in [1, 2] {
        assert_eq!(tries[n].len(), 3, "input {n}");
        let gaps: Vec<Duration> = tries[n].windows(2).map(|w| w[1] - w[0]).collect();
        eprintln!("input {n}: retried after {gaps:?}");
        // Redis schedules by its own clock in whole milliseconds: allow 5 ms.
        let slack = Duration::from_millis(5);
        assert!(gaps[0] + slack >= backoff, "input {n}: gaps {gaps:?}");
        assert!(gaps[1] + slack >= backoff * 2, "input {n}: gaps {gaps:?}");
    }
}

fn flaky_options() -> QueueOptions {
    QueueOptions {
        max_attempts: 3,
        retry_backoff: Duration::from_millis(150),
        max_retry_backoff: Duration::from_secs(1),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_queue_fails_permanent_errors_at_once_and_backs_off_transient_ones() {
    let queue: Arc<dyn WorkQueue> = Arc::new(MemoryQueue::new(flaky_options()));
    permanent_failures_are_not_retried_and_transient_ones_back_off(
        queue,
        Duration::from_millis(150),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_queue_fails_permanent_errors_at_once_and_backs_off_transient_ones() {
    let redis = davinci_testkit::RedisServer::start().expect("starting redis-server");
    let queue = davinci_runtime::queue::connect(&redis.url(), flaky_options())
        .await
        .unwrap();
    permanent_failures_are_not_retried_and_transient_ones_back_off(
        queue,
        Duration::from_millis(150),
    )
    .await;
}
