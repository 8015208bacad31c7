//! Wiring to gRPC, queues and storage.
//!
//! `StartTasks` makes a coordinator job: it lists the PR shards (or cuts a published set into
//! chunks in the job's work directory) and publishes one claim per shard or chunk on `tasks`
//! ([`davinci_runtime::fanout`]). Workers on any replica take the claims, their lease extended
//! while they validate, build the shard's tasks exactly as `davinci tasks build` does
//! ([`batch::build_shard`]: the same `tasks/{shard}.jsonl.zst`, logs and part marker) and commit
//! the shard's stats as its part. The coordinator then writes `stats/tasks.json` from the parts
//! in input order. A job started again (after a kill -9 of any replica) reuses every committed
//! shard. Without a run id (or a queue) the same code runs on an in-process queue with local
//! workers.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use davinci_core::task::TaskInstance;
use davinci_proto::v1::tasks_server::{Tasks, TasksServer};
use davinci_proto::v1::{Job, JobRef, StartTasksRequest, TasksSpec};
use davinci_runtime::blob::{self, BlobStore, S3Config};
use davinci_runtime::fanout::{self, Claimed, Item, WaitOptions, Work};
use davinci_runtime::grpc::{self, ProgressStream};
use davinci_runtime::jobs::{JobHandle, JobRegistry};
use davinci_runtime::queue::{MemoryQueue, QueueOptions, WorkQueue};
use davinci_runtime::retry::PermanentExt;
use davinci_runtime::shard;
use davinci_swebench::sets::SetFormat;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::batch::{self, Mirrors};
use crate::stage::{Stage, Stats, TasksConfig};

/// The topic shard claims travel on.
pub const TASKS_TOPIC: &str = "tasks";

/// Rows of a published set per claim: minutes of validation, so a killed replica loses little
/// and replicas share even a one-file set.
pub const SET_CHUNK: usize = 8;

/// What workers need of a job; stored in its work directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkSpec {
    /// Output root.
    pub out: String,
    /// Empty: the inputs are PR shards; else the published set's format.
    pub set_format: String,
    /// Mirrors named by repository (paths every replica sees).
    pub repos: BTreeMap<String, PathBuf>,
    pub repos_dir: Option<PathBuf>,
    pub config: TasksConfig,
}

impl WorkSpec {
    fn mirrors(&self) -> Mirrors {
        Mirrors {
            named: self.repos.clone().into_iter().collect(),
            dir: self.repos_dir.clone(),
        }
    }
}

/// A replica's local directories: built environments (cached across jobs) and scratch trees.
#[derive(Debug, Clone)]
pub struct LocalDirs {
    /// Absolute, and not under `/tmp` (every sandbox has its own `/tmp`).
    pub env_root: PathBuf,
    pub work_root: PathBuf,
}

/// One claim per input: PR shards in key order, or a published set's chunks.
async fn publish_items(
    inputs: &[String],
    spec: &WorkSpec,
    work: &Work,
    run_id: &str,
    s3: &S3Config,
) -> anyhow::Result<Vec<Item>> {
    let mut items = Vec::new();
    if spec.set_format.is_empty() {
        for uri in inputs {
            let (root, key) = blob::split_uri(uri);
            let store = blob::open(&root, s3).await?;
            for k in shard::list_inputs(store.as_ref(), &key).await? {
                let data = store.get(&k).await?;
                items.push(Item::for_shard(run_id, TASKS_TOPIC, &store.uri(&k), &data));
            }
        }
        anyhow::ensure!(
            !items.is_empty(),
            "no PR shards (*.jsonl.zst or *.jsonl) at {inputs:?}"
        );
        return Ok(items);
    }
    let [uri] = inputs else {
        anyhow::bail!("a published set is one file; got {} inputs", inputs.len());
    };
    let format = SetFormat::parse(&spec.set_format)?;
    let rows = load_set(uri, format, s3).await?;
    anyhow::ensure!(!rows.is_empty(), "no task instances in {uri}");
    let stem = set_stem(uri);
    for (i, chunk) in rows.chunks(SET_CHUNK).enumerate() {
        let mut body = Vec::new();
        for t in chunk {
            serde_json::to_writer(&mut body, t)?;
            body.push(b'\n');
        }
        let key = format!("sets/{stem}-{i:05}.jsonl");
        work.store.put(&key, Bytes::from(body.clone())).await?;
        items.push(Item::for_shard(
            run_id,
            TASKS_TOPIC,
            &work.store.uri(&key),
            &body,
        ));
    }
    Ok(items)
}

/// A published set file from storage, read as `davinci tasks validate` reads it.
async fn load_set(
    uri: &str,
    format: SetFormat,
    s3: &S3Config,
) -> anyhow::Result<Vec<TaskInstance>> {
    let (root, key) = blob::split_uri(uri);
    let (root, key) = if key.is_empty() {
        let (d, n) = uri
            .rsplit_once('/')
            .ok_or_else(|| anyhow::anyhow!("{uri}: names no file"))?;
        (d.to_string(), n.to_string())
    } else {
        (root, key)
    };
    let data = blob::open(&root, s3).await?.get(&key).await?;
    // The set readers take a path (they tell `.gz` by its name).
    let dir = tempfile::tempdir()?;
    let name = key.rsplit('/').next().unwrap_or(&key);
    let path = dir.path().join(name);
    std::fs::write(&path, &data)?;
    davinci_swebench::data::load_set(&path, format).map_err(|e| anyhow::anyhow!("{uri}: {e:#}"))
}

/// File name of a set without its extensions: the chunks' tasks shards are named after it.
fn set_stem(uri: &str) -> String {
    let name = uri.rsplit('/').next().unwrap_or(uri);
    let stem = name.split('.').next().unwrap_or(name);
    stem.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(60)
        .collect()
}

/// Output key of a set chunk's tasks.
fn chunk_tasks_key(chunk_uri: &str) -> String {
    let name = chunk_uri.rsplit('/').next().unwrap_or(chunk_uri);
    format!("tasks/{}.jsonl.zst", name.trim_end_matches(".jsonl"))
}

/// Runs a tasks job as coordinator: publishes, waits, writes `stats/tasks.json`. Returns the
/// URIs written and the stats.
pub async fn coordinate(
    inputs: &[String],
    spec: &WorkSpec,
    s3: &S3Config,
    queue: &dyn WorkQueue,
    run_id: &str,
    cancel: &CancellationToken,
    progress: &(dyn Fn(u64, u64) + Send + Sync),
) -> anyhow::Result<(Vec<String>, Stats)> {
    spec.config.check()?;
    let work = Work::open(&Work::dir_for(&spec.out, run_id, "tasks", spec), s3).await?;
    work.put_spec(spec).await?;
    let items = publish_items(inputs, spec, &work, run_id, s3).await?;
    let failed = fanout::distribute(
        queue,
        TASKS_TOPIC,
        &work,
        &items,
        cancel,
        // One unreadable shard must not stop the others: it is reported.
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
    let out = blob::open(&spec.out, s3).await?;
    let mut stats = Stats::default();
    let mut written = Vec::new();
    for item in &items {
        let Some(part) = work.part::<Stats>(&item.part).await? else {
            continue; // dead-lettered: in failed_shards
        };
        stats.merge(&part);
        let key = if spec.set_format.is_empty() {
            batch::output_keys(&item.claim.uri).0
        } else {
            chunk_tasks_key(&item.claim.uri)
        };
        written.push(out.uri(&key));
    }
    stats.failed_shards = failed
        .iter()
        .map(|f| format!("{}: {}", f.uri, f.error))
        .collect();
    written.push(batch::commit_stats(out.as_ref(), &stats).await?);
    Ok((written, stats))
}

/// A job's validation machinery on this replica, opened at its first claim.
struct JobCtx {
    spec: WorkSpec,
    stage: Stage,
    mirrors: Mirrors,
    out: Arc<dyn BlobStore>,
    /// Trees at base commits; removed with the context.
    _scratch: tempfile::TempDir,
}

type Jobs = tokio::sync::Mutex<HashMap<String, Arc<JobCtx>>>;

async fn job_for(
    c: &Claimed,
    jobs: &Jobs,
    dirs: &LocalDirs,
    s3: &S3Config,
) -> anyhow::Result<Arc<JobCtx>> {
    let mut g = jobs.lock().await;
    if let Some(j) = g.get(&c.work.uri) {
        return Ok(j.clone());
    }
    let spec: WorkSpec = c.work.spec().await.permanent()?;
    std::fs::create_dir_all(&dirs.work_root)?;
    let scratch = tempfile::Builder::new()
        .prefix("tasks-")
        .tempdir_in(&dirs.work_root)?;
    let stage = Stage::open(spec.config.clone(), &dirs.env_root, scratch.path())
        .await
        .permanent()?;
    let out = blob::open(&spec.out, s3).await?;
    let j = Arc::new(JobCtx {
        mirrors: spec.mirrors(),
        spec,
        stage,
        out,
        _scratch: scratch,
    });
    if g.len() >= 4 {
        g.clear();
    }
    g.insert(c.work.uri.clone(), j.clone());
    Ok(j)
}

/// Validates one claim: a PR shard (reused when `davinci tasks build` or an earlier job
/// committed it) or a chunk of a published set. Returns its stats, the part.
async fn handle_claim(c: &Claimed, j: &JobCtx, s3: &S3Config) -> anyhow::Result<Stats> {
    let out = j.out.as_ref();
    if j.spec.set_format.is_empty() {
        if let Some(s) = batch::committed_shard(out, &c.claim.uri).await {
            return Ok(s);
        }
        let (name, data) = fanout::read_input(&c.claim, s3).await?;
        let records = batch::decode_prs(&name, &data).permanent()?;
        return batch::build_shard(&j.stage, &j.mirrors, &c.claim.uri, records, out, &|_| {}).await;
    }
    let (_, data) = fanout::read_input(&c.claim, s3).await?;
    let rows: Vec<TaskInstance> = String::from_utf8_lossy(&data)
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .permanent()?;
    let t = std::time::Instant::now();
    let items = rows
        .iter()
        .map(|r| (r.clone(), j.mirrors.find(&r.repo)))
        .collect();
    let outcomes = batch::run_all(&j.stage, items, &|_| {}).await;
    let mut stats = Stats::default();
    let mut tasks = Vec::new();
    for (published, o) in rows.iter().zip(&outcomes) {
        stats.prs += 1;
        stats.candidates += 1;
        stats.record(o);
        if let Some(same) = o.validation.reproduces(published) {
            stats.published_compared += 1;
            stats.published_agree += u64::from(same);
        }
        batch::write_logs(out, o).await?;
        tasks.extend(o.task.clone());
    }
    stats.seconds = t.elapsed().as_secs_f64();
    out.put(
        &chunk_tasks_key(&c.claim.uri),
        shard::encode_shard(&tasks)?.data,
    )
    .await?;
    Ok(stats)
}

/// Takes `tasks` claims until `shutdown`.
pub async fn worker(
    queue: Arc<dyn WorkQueue>,
    consumer: String,
    s3: S3Config,
    dirs: LocalDirs,
    shutdown: CancellationToken,
) -> anyhow::Result<u64> {
    let jobs: Jobs = Default::default();
    fanout::serve_topic(queue, TASKS_TOPIC, &consumer, s3.clone(), shutdown, |c| {
        let (jobs, s3, dirs, consumer) = (&jobs, &s3, &dirs, &consumer);
        async move {
            let j = job_for(&c, jobs, dirs, s3).await?;
            tracing::info!(input = %c.claim.uri, part = %c.part, consumer = %consumer, "validating shard");
            let stats = handle_claim(&c, &j, s3).await?;
            c.work.commit_part(&c.part, &stats).await?;
            metrics::counter!("davinci_tasks_shards_total").increment(1);
            metrics::counter!("davinci_tasks_kept_total").increment(stats.kept);
            tracing::info!(input = %c.claim.uri, candidates = stats.candidates, kept = stats.kept, "shard validated");
            Ok(())
        }
    })
    .await
}

/// A whole job in this process: an in-memory queue, `workers` local workers, the coordinator.
pub async fn run_embedded(
    inputs: &[String],
    spec: &WorkSpec,
    s3: &S3Config,
    dirs: &LocalDirs,
    workers: usize,
    progress: &(dyn Fn(u64, u64) + Send + Sync),
) -> anyhow::Result<(Vec<String>, Stats)> {
    let queue: Arc<dyn WorkQueue> = Arc::new(MemoryQueue::new(QueueOptions::default()));
    let stop = CancellationToken::new();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..workers.max(1) {
        set.spawn(worker(
            queue.clone(),
            format!("local-{i}"),
            s3.clone(),
            dirs.clone(),
            stop.clone(),
        ));
    }
    let r = coordinate(
        inputs,
        spec,
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

/// The job's spec from a request, on top of the service's base settings; a bad field is
/// refused by its path.
pub fn work_spec(base: &TasksConfig, spec: &TasksSpec) -> Result<WorkSpec, Status> {
    let bad = |field: &str, e: &dyn std::fmt::Display| {
        Status::invalid_argument(format!("spec.{field}: {e}"))
    };
    if spec.inputs.is_empty() {
        return Err(Status::invalid_argument("spec.inputs: empty"));
    }
    if spec.out.is_empty() {
        return Err(Status::invalid_argument("spec.out: empty"));
    }
    if !spec.set_format.is_empty() {
        SetFormat::parse(&spec.set_format).map_err(|e| bad("set_format", &e))?;
        if spec.inputs.len() != 1 {
            return Err(bad("inputs", &"a published set is one file"));
        }
    }
    let config = if spec.settings_json.is_empty() {
        base.clone()
    } else {
        davinci_runtime::config::overlay(base, &spec.settings_json, &["sandbox"])
            .map_err(|e| bad("settings_json", &e))?
    };
    config
        .check()
        .map_err(|e| bad("settings_json", &format!("{e:#}")))?;
    let mut repos = BTreeMap::new();
    for r in &spec.repos {
        let (name, path) = r
            .split_once('=')
            .ok_or_else(|| bad("repos", &format!("`{r}`: expected owner/name=PATH")))?;
        if !davinci_core::pr::RepoMeta::is_full_name(name) {
            return Err(bad("repos", &format!("`{r}`: `{name}` is not owner/name")));
        }
        let path = Path::new(path);
        if !path.is_absolute() {
            return Err(bad(
                "repos",
                &format!("`{r}`: the path must be absolute (every replica resolves it)"),
            ));
        }
        repos.insert(name.to_string(), path.to_path_buf());
    }
    let repos_dir = (!spec.repos_dir.is_empty()).then(|| PathBuf::from(&spec.repos_dir));
    Ok(WorkSpec {
        out: spec.out.clone(),
        set_format: spec.set_format.clone(),
        repos,
        repos_dir,
        config,
    })
}

/// The gRPC service.
#[derive(Clone)]
pub struct TasksService {
    jobs: JobRegistry,
    base: TasksConfig,
    repos_dir: Option<PathBuf>,
    dirs: LocalDirs,
    s3: S3Config,
    queue: Option<Arc<dyn WorkQueue>>,
}

impl TasksService {
    /// `base` holds the service's own stage settings (sandbox, interpreter, pip arguments);
    /// specs add to them. `repos_dir` serves specs that name no mirrors.
    pub fn new(
        jobs: JobRegistry,
        base: TasksConfig,
        repos_dir: Option<PathBuf>,
        dirs: LocalDirs,
        s3: S3Config,
    ) -> Self {
        Self {
            jobs,
            base,
            repos_dir,
            dirs,
            s3,
            queue: None,
        }
    }

    /// Jobs of a run are shared with every replica through `tasks`.
    pub fn with_queue(mut self, queue: Arc<dyn WorkQueue>) -> Self {
        self.queue = Some(queue);
        self
    }

    pub fn into_server(self) -> TasksServer<Self> {
        TasksServer::new(self)
    }
}

async fn run_job(
    inputs: Vec<String>,
    spec: WorkSpec,
    s3: S3Config,
    dirs: LocalDirs,
    queue: Option<Arc<dyn WorkQueue>>,
    run_id: String,
    handle: JobHandle,
) -> anyhow::Result<Vec<String>> {
    let h = handle.clone();
    let rt = tokio::runtime::Handle::current();
    let progress = move |done: u64, total: u64| {
        let h = h.clone();
        rt.spawn(async move { h.progress(done, total, "shards validated").await });
    };
    let (written, stats) = match queue {
        Some(q) => {
            coordinate(
                &inputs,
                &spec,
                &s3,
                q.as_ref(),
                &run_id,
                &handle.cancel_token(),
                &progress,
            )
            .await?
        }
        None => run_embedded(&inputs, &spec, &s3, &dirs, 1, &progress).await?,
    };
    handle.count("prs", stats.prs).await;
    handle.count("candidates", stats.candidates).await;
    handle.count("kept", stats.kept).await;
    handle.count("bad_records", stats.bad_records).await;
    for (k, v) in &stats.drops {
        handle.count(&format!("drop.{k}"), *v).await;
    }
    for (k, v) in &stats.infra {
        handle.count(&format!("infra.{k}"), *v).await;
    }
    handle.count("envs_built", stats.envs_built).await;
    handle.count("envs_cached", stats.envs_cached).await;
    handle.count("envs_failed", stats.envs_failed).await;
    handle
        .count("failed_shards", stats.failed_shards.len() as u64)
        .await;
    if stats.published_compared > 0 {
        handle
            .count("published_compared", stats.published_compared)
            .await;
        handle.count("published_agree", stats.published_agree).await;
    }
    Ok(written)
}

#[tonic::async_trait]
impl Tasks for TasksService {
    async fn start_tasks(&self, req: Request<StartTasksRequest>) -> Result<Response<Job>, Status> {
        let req = req.into_inner();
        let spec = req
            .spec
            .ok_or_else(|| Status::invalid_argument("spec is required"))?;
        let mut ws = work_spec(&self.base, &spec)?;
        if ws.repos.is_empty() && ws.repos_dir.is_none() {
            ws.repos_dir = self.repos_dir.clone();
        }
        let spec_json = serde_json::json!({"inputs": spec.inputs, "spec": ws}).to_string();
        let (s3, dirs, run_id, inputs) = (
            self.s3.clone(),
            self.dirs.clone(),
            req.run_id.clone(),
            spec.inputs.clone(),
        );
        let queue = self.queue.clone().filter(|_| !req.run_id.is_empty());
        let job = self
            .jobs
            .spawn("tasks", &req.run_id, spec_json, move |handle| {
                Box::pin(run_job(inputs, ws, s3, dirs, queue, run_id, handle))
            })
            .await?;
        Ok(Response::new(job))
    }

    async fn get_tasks(&self, req: Request<JobRef>) -> Result<Response<Job>, Status> {
        grpc::get_job(&self.jobs, &req.into_inner().job_id).await
    }

    type WatchTasksStream = ProgressStream;

    async fn watch_tasks(&self, req: Request<JobRef>) -> Result<Response<ProgressStream>, Status> {
        grpc::watch_job(&self.jobs, &req.into_inner().job_id).await
    }

    async fn cancel_tasks(&self, req: Request<JobRef>) -> Result<Response<Job>, Status> {
        grpc::cancel_job(&self.jobs, &req.into_inner().job_id).await
    }
}
