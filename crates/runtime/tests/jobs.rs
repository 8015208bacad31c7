//! Job registry: lifecycle, progress streaming, cancellation and persistence on the directory
//! and Redis stores.
use davinci_proto::v1::JobState;
use davinci_runtime::jobs::{DirJobStore, JobRegistry, JobStore, RedisJobStore};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;

async fn wait_state(reg: &JobRegistry, id: &str, want: JobState) -> davinci_proto::v1::Job {
    for _ in 0..200 {
        let j = reg.get(id).await.unwrap();
        if j.state == want as i32 {
            return j;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "job {id} never reached {want:?}: {:?}",
        reg.get(id).await.unwrap()
    );
}

async fn lifecycle(reg: JobRegistry) {
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let job = reg
        .spawn("crawl", "run-1", "{\"repos\":[]}".into(), move |h| {
            Box::pin(async move {
                h.progress(1, 3, "one").await;
                let _ = go_rx.await;
                h.count("drop.bot", 2).await;
                h.progress(3, 3, "three").await;
                Ok(vec!["file:///out/stats.json".to_string()])
            })
        })
        .await
        .unwrap();
    assert_eq!(job.kind, "crawl");
    assert_eq!(job.run_id, "run-1");
    let mut events = reg.watch(&job.job_id).await.unwrap();
    go_tx.send(()).unwrap();
    let mut seen = Vec::new();
    while let Some(ev) = events.next().await {
        seen.push(ev);
    }
    let last = seen.last().unwrap();
    assert_eq!(last.state, JobState::Succeeded as i32, "{seen:?}");
    assert_eq!(last.counters.get("drop.bot"), Some(&2));
    assert!(
        seen.windows(2).all(|w| w[0].seq < w[1].seq),
        "seq increases: {seen:?}"
    );
    let done = reg.get(&job.job_id).await.unwrap();
    assert_eq!(done.done, 3);
    assert_eq!(done.outputs, vec!["file:///out/stats.json"]);

    // A failing job keeps its error.
    let failed = reg
        .spawn("pack", "", String::new(), |_| {
            Box::pin(async { anyhow::bail!("tokenizer.json not found") })
        })
        .await
        .unwrap();
    let f = wait_state(&reg, &failed.job_id, JobState::Failed).await;
    assert!(f.error.contains("tokenizer.json not found"), "{f:?}");

    // Cancel stops a running job.
    let slow = reg
        .spawn("eval", "", String::new(), |_| {
            Box::pin(async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(vec![])
            })
        })
        .await
        .unwrap();
    wait_state(&reg, &slow.job_id, JobState::Running).await;
    reg.cancel(&slow.job_id).await.unwrap();
    wait_state(&reg, &slow.job_id, JobState::Cancelled).await;
    // Watching a finished job yields its final state and ends.
    let evs: Vec<_> = reg.watch(&slow.job_id).await.unwrap().collect().await;
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].state, JobState::Cancelled as i32);
    assert!(matches!(
        reg.get("missing").await,
        Err(davinci_runtime::jobs::JobError::NotFound(_))
    ));
    assert_eq!(reg.list().await.unwrap().len(), 3);
}

/// A job left running by a dead process is marked failed when the registry reopens.
async fn restart_marks_interrupted(store: Arc<dyn JobStore>, store_again: Arc<dyn JobStore>) {
    let reg = JobRegistry::open(store).await.unwrap();
    let h = reg.create("crawl", "r", String::new()).await.unwrap();
    h.set_state(JobState::Running, "running").await;
    let id = h.id().to_string();
    drop(reg);
    let reg2 = JobRegistry::open(store_again).await.unwrap();
    let j = reg2.get(&id).await.unwrap();
    assert_eq!(j.state, JobState::Failed as i32);
    assert!(j.error.contains("restarted"), "{j:?}");
}

#[tokio::test]
async fn memory_registry_lifecycle() {
    lifecycle(JobRegistry::in_memory().await).await;
}

#[tokio::test]
async fn dir_registry_lifecycle_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    lifecycle(
        JobRegistry::open(Arc::new(DirJobStore::new(dir.path()).unwrap()))
            .await
            .unwrap(),
    )
    .await;
    let d2 = tempfile::tempdir().unwrap();
    restart_marks_interrupted(
        Arc::new(DirJobStore::new(d2.path()).unwrap()),
        Arc::new(DirJobStore::new(d2.path()).unwrap()),
    )
    .await;
}

#[tokio::test]
async fn redis_registry_lifecycle_restart_and_cross_replica_reads() {
    let redis = davinci_testkit::RedisServer::start().unwrap();
    let url = redis.url();
    let reg = JobRegistry::open(Arc::new(
        RedisJobStore::connect(&url, "crawler").await.unwrap(),
    ))
    .await
    .unwrap();
    lifecycle(reg.clone()).await;
    restart_marks_interrupted(
        Arc::new(RedisJobStore::connect(&url, "packer").await.unwrap()),
        Arc::new(RedisJobStore::connect(&url, "packer").await.unwrap()),
    )
    .await;

    // A second replica sees and follows a job the first one runs.
    let other = JobRegistry::open(Arc::new(
        RedisJobStore::connect(&url, "crawler").await.unwrap(),
    ))
    .await
    .unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let job = reg
        .spawn("crawl", "", String::new(), move |_| {
            Box::pin(async move {
                let _ = rx.await;
                Ok(vec![])
            })
        })
        .await
        .unwrap();
    wait_state(&other, &job.job_id, JobState::Running).await;
    let follow = other.watch(&job.job_id).await.unwrap();
    tx.send(()).unwrap();
    let evs: Vec<_> = tokio::time::timeout(Duration::from_secs(10), follow.collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!(evs.last().unwrap().state, JobState::Succeeded as i32);
}

/// The Prometheus series of a job's life: created, active while it runs, its progress, drops
/// by reason and other counters, finished once with its state.
#[test]
fn job_metrics_follow_the_job() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    // A current-thread runtime keeps every metric call on this thread's local recorder.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (during, after) = metrics::with_local_recorder(&recorder, || {
        rt.block_on(async {
            let reg = JobRegistry::in_memory().await;
            let h = reg.create("pack", "r", "{}".into()).await.unwrap();
            h.progress(1, 4, "one").await;
            h.count("drop.too_long", 2).await;
            h.count("ctx-python.drop.near_dup", 1).await;
            h.count("records_out", 5).await;
            let during = handle.render();
            h.finish(JobState::Succeeded, String::new(), vec![]).await;
            // Ignored: the job already finished.
            h.finish(JobState::Failed, "late".into(), vec![]).await;
            (during, handle.render())
        })
    });
    for line in [
        r#"davinci_jobs_created_total{kind="pack"} 1"#,
        r#"davinci_jobs_active{kind="pack"} 1"#,
        r#"davinci_jobs_progress_ratio{kind="pack"} 0.25"#,
        r#"davinci_jobs_dropped_total{kind="pack",reason="too_long"} 2"#,
        r#"davinci_jobs_dropped_total{kind="pack",reason="near_dup"} 1"#,
        r#"davinci_jobs_counted_total{kind="pack",name="records_out"} 5"#,
    ] {
        assert!(
            during.lines().any(|l| l == line),
            "no `{line}` in:\n{during}"
        );
    }
    for line in [
        r#"davinci_jobs_active{kind="pack"} 0"#,
        r#"davinci_jobs_finished_total{kind="pack",state="succeeded"} 1"#,
    ] {
        assert!(after.lines().any(|l| l == line), "no `{line}` in:\n{after}");
    }
    assert!(!after.contains(r#"state="failed""#), "{after}");
}
