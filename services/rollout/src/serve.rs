//! Wiring to gRPC, queues and storage.
//!
//! `StartRollout` makes a coordinator job: it reads the task shards, writes each task into the
//! job's work directory and publishes one claim per task on `rollouts`
//! ([`davinci_runtime::fanout`]). Workers on any replica take the claims (their lease extended
//! while the rollouts run), run [`pipeline::run_task`] and commit the task's part. The
//! coordinator then writes the trajectories in task order, `trajectories/{pass|fail}/{shard}`
//! per input shard, and `stats/rollout.json` last. Without a run id (or a queue) the same code
//! runs on an in-process queue with local workers.
use crate::pipeline::{self, PolicyKind, Roller, RolloutSettings, Stats, TaskPart};
use davinci_core::task::TaskInstance;
use davinci_core::traj::Trajectory;
use davinci_proto::v1::rollout_server::{Rollout, RolloutServer};
use davinci_proto::v1::{Job, JobRef, RolloutSpec, StartRolloutRequest};
use davinci_runtime::blob::{self, S3Config};
use davinci_runtime::fanout::{self, Claimed, Item, WaitOptions, Work};
use davinci_runtime::grpc::{self, ProgressStream};
use davinci_runtime::jobs::{JobHandle, JobRegistry};
use davinci_runtime::queue::{ClaimCheck, MemoryQueue, QueueOptions, WorkQueue};
use davinci_runtime::retry::PermanentExt;
use davinci_runtime::shard;
use std::collections::HashMap;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// The topic task claims travel on.
pub const ROLLOUTS_TOPIC: &str = "rollouts";

/// One input shard of tasks.
#[derive(Debug, Clone)]
pub struct TaskShard {
    /// File name without `.jsonl[.zst]`: the output shards are named after it.
    pub stem: String,
    pub tasks: Vec<TaskInstance>,
}

/// Reads task shards (`.jsonl`, `.jsonl.zst`, `.json`) from each URI: a file or a prefix, in
/// key order. A task without `patch`/`test_patch`/`FAIL_TO_PASS` cannot be graded and is
/// refused by name.
pub async fn load_tasks(uris: &[String], s3: &S3Config) -> anyhow::Result<Vec<TaskShard>> {
    let mut out = Vec::new();
    for uri in uris {
        let (root, key) = blob::split_uri(uri);
        let store = blob::open(&root, s3).await?;
        let keys: Vec<String> = if key.is_empty() || store.head(&key).await?.is_none() {
            store
                .list(&key)
                .await?
                .into_iter()
                .map(|m| m.key)
                .filter(|k| {
                    let name = k.rsplit('/').next().unwrap_or(k);
                    !name.starts_with('.')
                        && (k.ends_with(".jsonl")
                            || k.ends_with(".jsonl.zst")
                            || k.ends_with(".json"))
                        // The tasks stage's validation logs, part markers and stats beside
                        // its shards, also when the prefix is the tasks directory itself.
                        && !k
                            .split('/')
                            .any(|c| matches!(c, "logs" | "parts" | "stats"))
                })
                .collect()
        } else {
            vec![key.clone()]
        };
        for k in keys {
            let data = store.get(&k).await?;
            let text = if k.ends_with(".zst") {
                String::from_utf8(zstd::decode_all(&data[..])?)?
            } else {
                String::from_utf8(data.to_vec())?
            };
            let tasks =
                parse_tasks(&text).map_err(|e| anyhow::anyhow!("{}: {e}", store.uri(&k)))?;
            let name = k.rsplit('/').next().unwrap_or(&k);
            let stem = name
                .trim_end_matches(".zst")
                .trim_end_matches(".jsonl")
                .trim_end_matches(".json")
                .to_string();
            out.push(TaskShard { stem, tasks });
        }
    }
    anyhow::ensure!(
        out.iter().any(|s| !s.tasks.is_empty()),
        "no tasks at {uris:?} (expected .jsonl, .jsonl.zst or .json task shards)"
    );
    Ok(out)
}

fn parse_tasks(text: &str) -> anyhow::Result<Vec<TaskInstance>> {
    let trimmed = text.trim_start();
    let tasks: Vec<TaskInstance> = if trimmed.starts_with('[') {
        serde_json::from_str(trimmed)?
    } else {
        let mut v = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let mut de = serde_json::Deserializer::from_str(line);
            v.push(
                serde_path_to_error::deserialize(&mut de)
                    .map_err(|e| anyhow::anyhow!("line {}: {e}", i + 1))?,
            );
        }
        v
    };
    for t in &tasks {
        anyhow::ensure!(
            !t.patch.trim().is_empty()
                && !t.test_patch.trim().is_empty()
                && !t.fail_to_pass.is_empty(),
            "task {} has no patch, test_patch or FAIL_TO_PASS: only validated tasks can be rolled out",
            t.instance_id
        );
    }
    Ok(tasks)
}

/// Where a job's tasks go in its work directory, and their claims.
async fn publish_items(
    shards: &[TaskShard],
    work: &Work,
    run_id: &str,
) -> anyhow::Result<Vec<Item>> {
    let mut items = Vec::new();
    for sh in shards {
        for t in &sh.tasks {
            let body = serde_json::to_vec(t)?;
            let sha = shard::sha256_hex(&body);
            let part = format!("{}-{}", safe_name(&t.instance_id), &sha[..12]);
            let key = format!("tasks/{part}.json");
            if work.store.head(&key).await?.is_none() {
                work.store.put(&key, bytes::Bytes::from(body)).await?;
            }
            items.push(Item {
                part,
                claim: ClaimCheck {
                    run_id: run_id.to_string(),
                    topic: ROLLOUTS_TOPIC.into(),
                    uri: work.store.uri(&key),
                    sha256: sha,
                    records: 1,
                    traceparent: davinci_runtime::telemetry::current_traceparent(),
                    work: None,
                    part: None,
                },
            });
        }
    }
    Ok(items)
}

fn safe_name(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(80)
        .collect()
}

/// Runs a rollout job as coordinator: publishes, waits, writes the outputs. Returns the URIs
/// written and the stats.
pub async fn coordinate(
    tasks: &[String],
    settings: &RolloutSettings,
    s3: &S3Config,
    queue: &dyn WorkQueue,
    run_id: &str,
    cancel: &CancellationToken,
    progress: &(dyn Fn(u64, u64) + Send + Sync),
) -> anyhow::Result<(Vec<String>, Stats)> {
    settings.validate()?;
    let shards = load_tasks(tasks, s3).await?;
    let work = Work::open(
        &Work::dir_for(&settings.out, run_id, "rollout", settings),
        s3,
    )
    .await?;
    work.put_spec(settings).await?;
    let items = publish_items(&shards, &work, run_id).await?;
    // Tasks an earlier run of this job finished: their rollouts are reused as they are.
    let earlier = work.committed().await?;
    let failed = fanout::distribute(
        queue,
        ROLLOUTS_TOPIC,
        &work,
        &items,
        cancel,
        &WaitOptions {
            fail_on_dead_letter: false,
            ..Default::default()
        },
        |done, total| {
            progress(done, total);
            async {}
        },
    )
    .await?;
    let output = blob::open(&settings.out, s3).await?;
    let mut stats = Stats {
        failed_tasks: failed
            .iter()
            .map(|f| format!("{}: {}", f.uri, f.error))
            .collect(),
        ..Default::default()
    };
    let mut written = Vec::new();
    let mut it = items.iter();
    for sh in &shards {
        let (mut pass, mut fail) = (Vec::new(), Vec::new());
        for _ in &sh.tasks {
            let item = it.next().expect("one item per task");
            let Some(part) = work.part::<TaskPart>(&item.part).await? else {
                continue; // dead-lettered: in failed_tasks
            };
            stats.add(&part);
            if earlier.contains(&item.part) {
                stats.reused_rollouts += part.rollouts.len() as u64 - part.reused;
            }
            for r in &part.rollouts {
                let data = work.store.get(&r.key).await?;
                let t: Trajectory = serde_json::from_slice(&data)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", work.store.uri(&r.key)))?;
                if t.outcome.resolved {
                    pass.push(t)
                } else {
                    fail.push(t)
                }
            }
        }
        for (dir, v) in [("pass", pass), ("fail", fail)] {
            if v.is_empty() {
                continue;
            }
            let enc = shard::encode_shard(&v)?;
            let key = format!("trajectories/{dir}/{}.jsonl.zst", sh.stem);
            output.put(&key, enc.data).await?;
            written.push(output.uri(&key));
        }
    }
    output
        .put(
            "stats/rollout.json",
            bytes::Bytes::from(serde_json::to_vec_pretty(&stats)?),
        )
        .await?;
    written.push(output.uri("stats/rollout.json"));
    Ok((written, stats))
}

/// What a worker keeps per job.
type Rollers = tokio::sync::Mutex<HashMap<String, Arc<Roller>>>;

async fn roller_for(c: &Claimed, rollers: &Rollers) -> anyhow::Result<Arc<Roller>> {
    let mut g = rollers.lock().await;
    if let Some(r) = g.get(&c.work.uri) {
        return Ok(r.clone());
    }
    let settings: RolloutSettings = c.work.spec().await.permanent()?;
    let r = Arc::new(Roller::new(settings).await.permanent()?);
    if g.len() >= 4 {
        g.clear();
    }
    g.insert(c.work.uri.clone(), r.clone());
    Ok(r)
}

/// Takes `rollouts` claims until `shutdown`; `on_rollout` sees each finished trajectory.
pub async fn worker(
    queue: Arc<dyn WorkQueue>,
    consumer: String,
    s3: S3Config,
    shutdown: CancellationToken,
    on_rollout: Arc<dyn Fn(&Trajectory) + Send + Sync>,
) -> anyhow::Result<()> {
    let rollers: Rollers = Default::default();
    fanout::serve_topic(queue, ROLLOUTS_TOPIC, &consumer, s3.clone(), shutdown, |c| {
        let (rollers, s3, on_rollout) = (&rollers, &s3, on_rollout.clone());
        async move {
            let roller = roller_for(&c, rollers).await?;
            let (_, data) = fanout::read_input(&c.claim, s3).await?;
            let task: TaskInstance = serde_json::from_slice(&data).permanent()?;
            let part = pipeline::run_task(&roller, &task, c.work.store.as_ref(), on_rollout.as_ref()).await?;
            c.work.commit_part(&c.part, &part).await?;
            tracing::info!(task = %task.instance_id, rollouts = part.rollouts.len(), "task rolled out");
            Ok(())
        }
    })
    .await?;
    Ok(())
}

/// A whole job in this process: an in-memory queue, `workers` local workers, the coordinator.
pub async fn run_embedded(
    tasks: &[String],
    settings: &RolloutSettings,
    s3: &S3Config,
    workers: usize,
    progress: &(dyn Fn(u64, u64) + Send + Sync),
    on_rollout: Arc<dyn Fn(&Trajectory) + Send + Sync>,
) -> anyhow::Result<(Vec<String>, Stats)> {
    let queue: Arc<dyn WorkQueue> = Arc::new(MemoryQueue::new(QueueOptions::default()));
    let stop = CancellationToken::new();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..workers.max(1) {
        set.spawn(worker(
            queue.clone(),
            format!("local-{i}"),
            s3.clone(),
            stop.clone(),
            on_rollout.clone(),
        ));
    }
    let r = coordinate(
        tasks,
        settings,
        s3,
        queue.as_ref(),
        "",
        &CancellationToken::new(),
        progress,
    )
    .await;
    stop.cancel();
    while set.join_next().await.is_some() {}
    r
}

/// Applies a gRPC spec on top of the service's base settings; bad fields are refused by name.
pub fn settings_from_spec(
    base: &RolloutSettings,
    spec: &RolloutSpec,
) -> Result<RolloutSettings, Status> {
    let mut s = if spec.settings_json.is_empty() {
        base.clone()
    } else {
        davinci_runtime::config::overlay(base, &spec.settings_json, &["sandbox"])
            .map_err(|e| Status::invalid_argument(format!("spec.settings_json: {e}")))?
    };
    s.out = spec.out.clone();
    if !spec.policy.is_empty() {
        s.policy = PolicyKind::parse(&spec.policy)
            .map_err(|e| Status::invalid_argument(format!("spec.policy: {e}")))?;
    }
    if !spec.llm_base_url.is_empty() {
        s.llm.base_url = spec.llm_base_url.clone();
    }
    if !spec.llm_model.is_empty() {
        s.llm.model = spec.llm_model.clone();
    }
    if spec.max_steps > 0 {
        s.agent.max_steps = spec.max_steps;
    }
    if spec.rollouts_per_task > 0 {
        s.rollouts_per_task = spec.rollouts_per_task;
    }
    if spec.max_tokens > 0 {
        s.agent.context_tokens = spec.max_tokens;
    }
    s.validate()
        .map_err(|e| Status::invalid_argument(format!("spec: {e:#}")))?;
    Ok(s)
}

/// The gRPC service.
#[derive(Clone)]
pub struct RolloutService {
    jobs: JobRegistry,
    base: RolloutSettings,
    s3: S3Config,
    queue: Option<Arc<dyn WorkQueue>>,
}

impl RolloutService {
    /// `base` holds the service's own settings (sandbox backend, environments); specs add to it.
    pub fn new(jobs: JobRegistry, base: RolloutSettings, s3: S3Config) -> Self {
        Self {
            jobs,
            base,
            s3,
            queue: None,
        }
    }

    /// Jobs of a run are shared with every replica through `rollouts`.
    pub fn with_queue(mut self, queue: Arc<dyn WorkQueue>) -> Self {
        self.queue = Some(queue);
        self
    }

    pub fn into_server(self) -> RolloutServer<Self> {
        RolloutServer::new(self)
    }
}

async fn run_job(
    tasks: Vec<String>,
    settings: RolloutSettings,
    s3: S3Config,
    queue: Option<Arc<dyn WorkQueue>>,
    run_id: String,
    handle: JobHandle,
) -> anyhow::Result<Vec<String>> {
    let h = handle.clone();
    let rt = tokio::runtime::Handle::current();
    let progress = move |done: u64, total: u64| {
        let h = h.clone();
        rt.spawn(async move { h.progress(done, total, "tasks rolled out").await });
    };
    let (written, stats) = match queue {
        Some(q) => {
            coordinate(
                &tasks,
                &settings,
                &s3,
                q.as_ref(),
                &run_id,
                &handle.cancel_token(),
                &progress,
            )
            .await?
        }
        None => run_embedded(&tasks, &settings, &s3, 2, &progress, Arc::new(|_| {})).await?,
    };
    handle.count("rollouts", stats.rollouts).await;
    handle.count("pass", stats.pass).await;
    handle.count("fail", stats.fail).await;
    handle.count("tokens", stats.tokens).await;
    for (k, v) in &stats.exit_status {
        handle.count(&format!("exit.{k}"), *v).await;
    }
    for (k, v) in &stats.infra_failures {
        handle.count(&format!("infra.{k}"), *v).await;
    }
    handle
        .count("failed_tasks", stats.failed_tasks.len() as u64)
        .await;
    Ok(written)
}

#[tonic::async_trait]
impl Rollout for RolloutService {
    async fn start_rollout(
        &self,
        req: Request<StartRolloutRequest>,
    ) -> Result<Response<Job>, Status> {
        let req = req.into_inner();
        let spec = req
            .spec
            .ok_or_else(|| Status::invalid_argument("spec is required"))?;
        if spec.tasks.is_empty() {
            return Err(Status::invalid_argument("spec.tasks: empty"));
        }
        if spec.out.is_empty() {
            return Err(Status::invalid_argument("spec.out: empty"));
        }
        let settings = settings_from_spec(&self.base, &spec)?;
        let spec_json = serde_json::json!({"tasks": spec.tasks, "settings": settings}).to_string();
        let (s3, run_id, tasks) = (self.s3.clone(), req.run_id.clone(), spec.tasks.clone());
        let queue = self.queue.clone().filter(|_| !req.run_id.is_empty());
        let job = self
            .jobs
            .spawn("rollout", &req.run_id, spec_json, move |handle| {
                Box::pin(run_job(tasks, settings, s3, queue, run_id, handle))
            })
            .await?;
        Ok(Response::new(job))
    }

    async fn get_rollout(&self, req: Request<JobRef>) -> Result<Response<Job>, Status> {
        grpc::get_job(&self.jobs, &req.into_inner().job_id).await
    }

    type WatchRolloutStream = ProgressStream;

    async fn watch_rollout(
        &self,
        req: Request<JobRef>,
    ) -> Result<Response<ProgressStream>, Status> {
        grpc::watch_job(&self.jobs, &req.into_inner().job_id).await
    }

    async fn cancel_rollout(&self, req: Request<JobRef>) -> Result<Response<Job>, Status> {
        grpc::cancel_job(&self.jobs, &req.into_inner().job_id).await
    }
}
