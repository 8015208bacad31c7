//! Job registry behind every service's Start/Get/Watch/Cancel RPCs.
//!
//! A service creates a job, runs the stage work in a task that reports through a
//! [`JobHandle`], and answers Get/Watch/Cancel from the registry. Job records are persisted
//! (Redis in distributed mode, the storage directory in embedded mode) so any replica can
//! answer Get, and a restarted server still knows its jobs.
use async_trait::async_trait;
use davinci_proto::v1::{Job, JobState, ProgressEvent};
use prost::Message;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("job `{0}` not found")]
    NotFound(String),
    #[error("job store: {0}")]
    Store(String),
}

pub type JobResult<T> = Result<T, JobError>;

/// Where job records live between restarts and across replicas.
#[async_trait]
pub trait JobStore: Send + Sync + std::fmt::Debug {
    async fn save(&self, job: &Job) -> JobResult<()>;
    async fn load(&self, job_id: &str) -> JobResult<Option<Job>>;
    async fn load_all(&self) -> JobResult<Vec<Job>>;
}

/// Keeps nothing: for tests and one-off CLI runs.
#[derive(Debug, Default)]
pub struct MemoryJobStore;

#[async_trait]
impl JobStore for MemoryJobStore {
    async fn save(&self, _job: &Job) -> JobResult<()> {
        Ok(())
    }
    async fn load(&self, _job_id: &str) -> JobResult<Option<Job>> {
        Ok(None)
    }
    async fn load_all(&self) -> JobResult<Vec<Job>> {
        Ok(Vec::new())
    }
}

/// One protobuf-encoded file per job under a directory (embedded mode).
#[derive(Debug)]
pub struct DirJobStore {
    dir: PathBuf,
}

impl DirJobStore {
    pub fn new(dir: impl Into<PathBuf>) -> JobResult<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)
            .map_err(|e| JobError::Store(format!("create {}: {e}", dir.display())))?;
        Ok(Self { dir })
    }

    fn path(&self, job_id: &str) -> JobResult<PathBuf> {
        if job_id.is_empty()
            || !job_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(JobError::NotFound(job_id.to_string()));
        }
        Ok(self.dir.join(format!("{job_id}.pb")))
    }
}

#[async_trait]
impl JobStore for DirJobStore {
    async fn save(&self, job: &Job) -> JobResult<()> {
        let path = self.path(&job.job_id)?;
        let tmp = path.with_extension("pb.tmp");
        let bytes = job.encode_to_vec();
        tokio::fs::write(&tmp, bytes)
            .await
            .and(tokio::fs::rename(&tmp, &path).await)
            .map_err(|e| JobError::Store(format!("write {}: {e}", path.display())))
    }

    async fn load(&self, job_id: &str) -> JobResult<Option<Job>> {
        let path = match self.path(job_id) {
            Ok(p) => p,
            Err(_) => return Ok(None),
        };
        match tokio::fs::read(&path).await {
            Ok(b) => Job::decode(b.as_slice())
                .map(Some)
                .map_err(|e| JobError::Store(format!("decode {}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(JobError::Store(format!("read {}: {e}", path.display()))),
        }
    }

    async fn load_all(&self) -> JobResult<Vec<Job>> {
        let mut out = Vec::new();
        let mut rd = tokio::fs::read_dir(&self.dir)
            .await
            .map_err(|e| JobError::Store(format!("list {}: {e}", self.dir.display())))?;
        while let Ok(Some(entry)) = rd.next_entry().await {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".pb")
                && let Some(job) = self.load(id).await?
            {
                out.push(job);
            }
        }
        out.sort_by(|a, b| a.job_id.cmp(&b.job_id));
        Ok(out)
    }
}

/// A Redis hash `davinci:jobs:{service}` of protobuf-encoded jobs (distributed mode).
#[derive(Clone)]
pub struct RedisJobStore {
    conn: redis::aio::ConnectionManager,
    key: String,
}

impl std::fmt::Debug for RedisJobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisJobStore")
            .field("key", &self.key)
            .finish()
    }
}

impl RedisJobStore {
    pub async fn connect(url: &str, service: &str) -> JobResult<Self> {
        let client = redis::Client::open(url).map_err(|e| JobError::Store(e.to_string()))?;
        let conn = redis::aio::ConnectionManager::new(client)
            .await
            .map_err(|e| JobError::Store(format!("connect {url}: {e}")))?;
        Ok(Self {
            conn,
            key: format!("davinci:jobs:{service}"),
        })
    }
}

#[async_trait]
impl JobStore for RedisJobStore {
    async fn save(&self, job: &Job) -> JobResult<()> {
        let mut c = self.conn.clone();
        redis::cmd("HSET")
            .arg(&self.key)
            .arg(&job.job_id)
            .arg(job.encode_to_vec())
            .query_async::<()>(&mut c)
            .await
            .map_err(|e| JobError::Store(e.to_string()))
    }

    async fn load(&self, job_id: &str) -> JobResult<Option<Job>> {
        let mut c = self.conn.clone();
        let raw: Option<Vec<u8>> = redis::cmd("HGET")
            .arg(&self.key)
            .arg(job_id)
            .query_async(&mut c)
            .await
            .map_err(|e| JobError::Store(e.to_string()))?;
        raw.map(|b| Job::decode(b.as_slice()).map_err(|e| JobError::Store(e.to_string())))
            .transpose()
    }

    async fn load_all(&self) -> JobResult<Vec<Job>> {
        let mut c = self.conn.clone();
        let all: HashMap<String, Vec<u8>> = redis::cmd("HGETALL")
            .arg(&self.key)
            .query_async(&mut c)
            .await
            .map_err(|e| JobError::Store(e.to_string()))?;
        let mut jobs = all
            .into_values()
            .map(|b| Job::decode(b.as_slice()).map_err(|e| JobError::Store(e.to_string())))
            .collect::<JobResult<Vec<_>>>()?;
        jobs.sort_by(|a, b| a.job_id.cmp(&b.job_id));
        Ok(jobs)
    }
}

struct Entry {
    job: Job,
    seq: u64,
    events: broadcast::Sender<ProgressEvent>,
    cancel: CancellationToken,
}

struct Inner {
    store: Arc<dyn JobStore>,
    entries: Mutex<HashMap<String, Entry>>,
    tasks: tokio_util::task::TaskTracker,
    interrupted: Vec<Job>,
}

/// `Job.message` of a job its process died under: safe to start again, stages being idempotent.
pub const INTERRUPTED: &str = "interrupted";

/// The jobs of one service process.
#[derive(Clone)]
pub struct JobRegistry {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for JobRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobRegistry")
            .field("store", &self.inner.store)
            .finish()
    }
}

fn now() -> prost_types::Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn event_of(job: &Job, seq: u64) -> ProgressEvent {
    ProgressEvent {
        job_id: job.job_id.clone(),
        seq,
        state: job.state,
        done: job.done,
        total: job.total,
        message: job.message.clone(),
        counters: job.counters.clone(),
        at: job.updated_at,
    }
}

fn state_of(job: &Job) -> JobState {
    JobState::try_from(job.state).unwrap_or(JobState::Unspecified)
}

/// The stage work a job runs: gets the handle, returns the URIs it wrote.
pub type JobWork = Pin<Box<dyn Future<Output = anyhow::Result<Vec<String>>> + Send>>;

impl JobRegistry {
    /// A registry over `store`. Jobs a previous process left queued or running are marked
    /// failed: their worker is gone, and a client must resubmit rather than wait forever.
    pub async fn open(store: Arc<dyn JobStore>) -> JobResult<Self> {
        let mut interrupted = Vec::new();
        for mut job in store.load_all().await? {
            if !state_of(&job).is_terminal() {
                job.state = JobState::Failed as i32;
                job.message = INTERRUPTED.into();
                job.error = "the server restarted while this job was running; submit it again (stages are idempotent)".into();
                job.updated_at = Some(now());
                store.save(&job).await?;
                interrupted.push(job);
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                entries: Mutex::new(HashMap::new()),
                tasks: tokio_util::task::TaskTracker::new(),
                interrupted,
            }),
        })
    }

    /// Jobs a previous process left queued or running (now marked failed, message
    /// [`INTERRUPTED`]), for an owner that can resume them.
    pub fn interrupted(&self) -> &[Job] {
        &self.inner.interrupted
    }

    pub async fn in_memory() -> Self {
        Self::open(Arc::new(MemoryJobStore))
            .await
            .expect("memory store cannot fail")
    }

    /// Creates a queued job and runs `work` for it in the background.
    pub async fn spawn<F>(
        &self,
        kind: &str,
        run_id: &str,
        spec_json: String,
        work: F,
    ) -> JobResult<Job>
    where
        F: FnOnce(JobHandle) -> JobWork,
    {
        let handle = self.create(kind, run_id, spec_json).await?;
        self.run(handle, work).await
    }

    /// As [`JobRegistry::spawn`] under a caller-chosen id, which makes submission idempotent:
    /// while a job with that id is queued or running here, it is returned and nothing starts.
    /// A finished one is started again (stages resume from what they already wrote).
    pub async fn spawn_with_id<F>(
        &self,
        id: &str,
        kind: &str,
        run_id: &str,
        spec_json: String,
        work: F,
    ) -> JobResult<Job>
    where
        F: FnOnce(JobHandle) -> JobWork,
    {
        if let Some(e) = self.inner.entries.lock().expect("registry lock").get(id)
            && !state_of(&e.job).is_terminal()
        {
            return Ok(e.job.clone());
        }
        let handle = self
            .create_with_id(id.to_string(), kind, run_id, spec_json)
            .await?;
        self.run(handle, work).await
    }

    async fn run<F>(&self, handle: JobHandle, work: F) -> JobResult<Job>
    where
        F: FnOnce(JobHandle) -> JobWork,
    {
        let job = self.get(handle.id()).await?;
        let fut = work(handle.clone());
        self.inner.tasks.spawn(async move {
            handle.set_state(JobState::Running, "running").await;
            let cancel = handle.cancel_token();
            tokio::select! {
                res = fut => match res {
                    Ok(outputs) => handle.finish(JobState::Succeeded, String::new(), outputs).await,
                    Err(e) if cancel.is_cancelled() => handle.finish(JobState::Cancelled, format!("{e:#}"), vec![]).await,
                    Err(e) => handle.finish(JobState::Failed, format!("{e:#}"), vec![]).await,
                },
                _ = cancel.cancelled() => handle.finish(JobState::Cancelled, "cancelled".into(), vec![]).await,
            }
        });
        Ok(job)
    }

    /// Creates a queued job without running anything (the caller drives the handle).
    pub async fn create(
        &self,
        kind: &str,
        run_id: &str,
        spec_json: String,
    ) -> JobResult<JobHandle> {
        self.create_with_id(
            uuid::Uuid::new_v4().simple().to_string(),
            kind,
            run_id,
            spec_json,
        )
        .await
    }

    async fn create_with_id(
        &self,
        id: String,
        kind: &str,
        run_id: &str,
        spec_json: String,
    ) -> JobResult<JobHandle> {
        let t = now();
        let job = Job {
            job_id: id.clone(),
            kind: kind.to_string(),
            run_id: run_id.to_string(),
            state: JobState::Queued as i32,
            message: "queued".into(),
            created_at: Some(t),
            updated_at: Some(t),
            spec_json,
            ..Default::default()
        };
        self.inner.store.save(&job).await?;
        let (events, _) = broadcast::channel(256);
        let cancel = CancellationToken::new();
        self.inner.entries.lock().expect("registry lock").insert(
            id.clone(),
            Entry {
                job,
                seq: 0,
                events,
                cancel: cancel.clone(),
            },
        );
        job_metrics::created(kind);
        Ok(JobHandle {
            registry: self.clone(),
            id,
            cancel,
        })
    }

    /// The job as this replica knows it, else as the store has it.
    pub async fn get(&self, job_id: &str) -> JobResult<Job> {
        if let Some(e) = self
            .inner
            .entries
            .lock()
            .expect("registry lock")
            .get(job_id)
        {
            return Ok(e.job.clone());
        }
        self.inner
            .store
            .load(job_id)
            .await?
            .ok_or_else(|| JobError::NotFound(job_id.to_string()))
    }

    /// Every job the store holds plus those of this process, newest first.
    pub async fn list(&self) -> JobResult<Vec<Job>> {
        let mut by_id: HashMap<String, Job> = self
            .inner
            .store
            .load_all()
            .await?
            .into_iter()
            .map(|j| (j.job_id.clone(), j))
            .collect();
        for (id, e) in self.inner.entries.lock().expect("registry lock").iter() {
            by_id.insert(id.clone(), e.job.clone());
        }
        let mut jobs: Vec<Job> = by_id.into_values().collect();
        jobs.sort_by_key(|j| std::cmp::Reverse(j.created_at.map(|t| (t.seconds, t.nanos))));
        Ok(jobs)
    }

    /// Asks the job to stop; returns it as it stands. Cancelling a finished job is a no-op.
    pub async fn cancel(&self, job_id: &str) -> JobResult<Job> {
        let token = self
            .inner
            .entries
            .lock()
            .expect("registry lock")
            .get(job_id)
            .map(|e| e.cancel.clone());
        match token {
            Some(t) => {
                t.cancel();
                self.get(job_id).await
            }
            None => {
                // Owned by another replica (or gone): record the request in the store.
                let mut job = self.get(job_id).await?;
                if !state_of(&job).is_terminal() {
                    job.state = JobState::Cancelled as i32;
                    job.message = "cancelled".into();
                    job.updated_at = Some(now());
                    self.inner.store.save(&job).await?;
                }
                Ok(job)
            }
        }
    }

    /// Progress of the job: its current state first, then every change until it ends.
    pub async fn watch(
        &self,
        job_id: &str,
    ) -> JobResult<Pin<Box<dyn futures::Stream<Item = ProgressEvent> + Send>>> {
        let local = {
            let entries = self.inner.entries.lock().expect("registry lock");
            entries
                .get(job_id)
                .map(|e| (event_of(&e.job, e.seq), e.events.subscribe()))
        };
        match local {
            Some((first, mut rx)) => {
                let stream = async_stream(move |tx| async move {
                    let mut last = first.seq;
                    let terminal = JobState::try_from(first.state).is_ok_and(|s| s.is_terminal());
                    if tx.send(first).await.is_err() || terminal {
                        return;
                    }
                    loop {
                        match rx.recv().await {
                            Ok(ev) if ev.seq > last => {
                                last = ev.seq;
                                let end =
                                    JobState::try_from(ev.state).is_ok_and(|s| s.is_terminal());
                                if tx.send(ev).await.is_err() || end {
                                    return;
                                }
                            }
                            Ok(_) => {}
                            Err(broadcast::error::RecvError::Lagged(_)) => {}
                            Err(broadcast::error::RecvError::Closed) => return,
                        }
                    }
                });
                Ok(stream)
            }
            None => {
                // Another replica runs it: follow the shared store.
                let first = self.get(job_id).await?;
                let store = self.inner.store.clone();
                let id = job_id.to_string();
                Ok(async_stream(move |tx| async move {
                    let mut seq = 0;
                    let mut job = first;
                    let mut last_update = None;
                    loop {
                        if job.updated_at != last_update {
                            last_update = job.updated_at;
                            seq += 1;
                            if tx.send(event_of(&job, seq)).await.is_err() {
                                return;
                            }
                        }
                        if state_of(&job).is_terminal() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        match store.load(&id).await {
                            Ok(Some(j)) => job = j,
                            _ => return,
                        }
                    }
                }))
            }
        }
    }

    /// Waits for running jobs to end, cancelling those still running after `grace`.
    pub async fn drain(&self, grace: Duration) {
        self.inner.tasks.close();
        if tokio::time::timeout(grace, self.inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                grace_s = grace.as_secs(),
                "jobs still running after the grace period; cancelling them"
            );
            for e in self.inner.entries.lock().expect("registry lock").values() {
                e.cancel.cancel();
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), self.inner.tasks.wait()).await;
        }
    }

    async fn update(&self, job_id: &str, f: impl FnOnce(&mut Job)) {
        let job = {
            let mut entries = self.inner.entries.lock().expect("registry lock");
            let Some(e) = entries.get_mut(job_id) else {
                return;
            };
            if state_of(&e.job).is_terminal() {
                return;
            }
            f(&mut e.job);
            e.job.updated_at = Some(now());
            e.seq += 1;
            let _ = e.events.send(event_of(&e.job, e.seq));
            e.job.clone()
        };
        if let Err(err) = self.inner.store.save(&job).await {
            tracing::warn!(job_id, error = %err, "could not persist job update");
        }
    }
}

/// A stream fed by a task through a bounded channel (backpressure to the producer).
fn async_stream<F, Fut>(f: F) -> Pin<Box<dyn futures::Stream<Item = ProgressEvent> + Send>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<ProgressEvent>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// What the stage work holds to report progress and notice cancellation.
#[derive(Clone)]
pub struct JobHandle {
    registry: JobRegistry,
    id: String,
    cancel: CancellationToken,
}

impl std::fmt::Debug for JobHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobHandle").field("id", &self.id).finish()
    }
}

impl JobHandle {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Fires when a client cancels the job; long loops should check it.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    pub async fn set_state(&self, state: JobState, message: &str) {
        self.registry
            .update(&self.id, |j| {
                j.state = state as i32;
                j.message = message.to_string();
            })
            .await;
    }

    pub async fn progress(&self, done: u64, total: u64, message: &str) {
        self.registry
            .update(&self.id, |j| {
                job_metrics::progress(&j.kind, done, total);
                j.done = done;
                j.total = total;
                j.message = message.to_string();
            })
            .await;
    }

    /// Adds `n` to a named counter (`records_out`, `drop.<reason>`, …).
    pub async fn count(&self, name: &str, n: u64) {
        self.registry
            .update(&self.id, |j| {
                job_metrics::counted(&j.kind, name, n);
                *j.counters.entry(name.to_string()).or_default() += n
            })
            .await;
    }

    /// Ends the job; later updates are ignored.
    pub async fn finish(&self, state: JobState, error: String, outputs: Vec<String>) {
        self.registry
            .update(&self.id, |j| {
                // Inside the update, which skips jobs already finished: counted once.
                job_metrics::finished(&j.kind, state);
                j.state = state as i32;
                j.message = state
                    .as_str_name()
                    .trim_start_matches("JOB_STATE_")
                    .to_lowercase();
                j.error = error;
                j.outputs = outputs;
            })
            .await;
    }
}

/// Prometheus series of the jobs of this process, by job kind (`run`, `crawl`, `pack`, …).
mod job_metrics {
    use davinci_proto::v1::JobState;

    pub fn created(kind: &str) {
        metrics::counter!("davinci_jobs_created_total", "kind" => kind.to_string()).increment(1);
        metrics::gauge!("davinci_jobs_active", "kind" => kind.to_string()).increment(1.0);
    }

    pub fn finished(kind: &str, state: JobState) {
        let state = state
            .as_str_name()
            .trim_start_matches("JOB_STATE_")
            .to_lowercase();
        metrics::counter!("davinci_jobs_finished_total", "kind" => kind.to_string(), "state" => state)
            .increment(1);
        metrics::gauge!("davinci_jobs_active", "kind" => kind.to_string()).decrement(1.0);
    }

    /// The latest job of a kind sets its kind's progress (one run at a time is the common case).
    pub fn progress(kind: &str, done: u64, total: u64) {
        if total > 0 {
            metrics::gauge!("davinci_jobs_progress_ratio", "kind" => kind.to_string())
                .set(done.min(total) as f64 / total as f64);
        }
    }

    /// Job counters: `drop.<reason>` and `<format>.drop.<reason>` count dropped records by
    /// reason, every other name (`records_out`, `shards`, …) counts as itself.
    pub fn counted(kind: &str, name: &str, n: u64) {
        match name.rsplit_once("drop.") {
            Some((prefix, reason)) if prefix.is_empty() || prefix.ends_with('.') => {
                metrics::counter!("davinci_jobs_dropped_total", "kind" => kind.to_string(), "reason" => reason.to_string())
                    .increment(n)
            }
            _ => metrics::counter!("davinci_jobs_counted_total", "kind" => kind.to_string(), "name" => name.to_string())
                .increment(n),
        }
    }
}
