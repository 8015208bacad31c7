//! Wiring to gRPC, queues and storage: the `Reconstructor` gRPC service (Start / Get / Watch /
//! Cancel over the runtime job registry) and the `prs` queue worker.
//!
//! A job of a run on a service with a queue is shared by every replica ([`davinci_runtime::fanout`]):
//! workers render PR shards into dedup candidates, and the job dedups them in input order, so
//! the samples are those of a one-process job whichever replicas did the rendering.
use crate::batch::{self, BlobCache};
use crate::enhance::Enhancer;
use crate::filters::BenchmarkFile;
use crate::pipeline::{Candidate, Stats};
use crate::pipeline::{ReconstructConfig, Reconstructor, TokenCounter};
use davinci_core::sample::SampleSource;
use davinci_proto::v1::reconstructor_server::Reconstructor as ReconstructorRpc;
use davinci_proto::v1::{Job, JobRef, ProgressEvent, ReconstructSpec, StartReconstructRequest};
use davinci_runtime::blob::{self, BlobStore, S3Config};
use davinci_runtime::fanout::{self, Claimed, Item, WaitOptions, Work};
use davinci_runtime::jobs::{JobHandle, JobRegistry};
use davinci_runtime::queue::WorkQueue;
use davinci_runtime::shard;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tonic::{Request, Response, Status};

/// Builds a token counter from a tokenizer path (injected by the binary, which links the
/// tokenizer crate); `None` path means the configured default.
pub type TokenizerLoader = Arc<dyn Fn(Option<&str>) -> anyhow::Result<TokenCounter> + Send + Sync>;

/// `PATH:field1,field2`, or a bare path whose fields follow the benchmark's published columns.
pub fn parse_benchmark(spec: &str) -> anyhow::Result<BenchmarkFile> {
    if let Some((path, fields)) = spec.rsplit_once(':')
        && !fields.contains('/')
        && !fields.is_empty()
    {
        return Ok(BenchmarkFile {
            path: path.into(),
            fields: fields.split(',').map(str::to_string).collect(),
        });
    }
    let lower = spec.to_ascii_lowercase();
    let fields: &[&str] = if lower.contains("humaneval") {
        &["prompt", "canonical_solution"]
    } else if lower.contains("swe") {
        &["problem_statement", "patch"]
    } else {
        anyhow::bail!("benchmark file `{spec}`: give its fields as PATH:field1,field2")
    };
    Ok(BenchmarkFile {
        path: spec.into(),
        fields: fields.iter().map(|s| s.to_string()).collect(),
    })
}

/// Applies a gRPC spec on top of the service's base config; bad fields are refused by name.
pub fn config_from_spec(
    base: &ReconstructConfig,
    spec: &ReconstructSpec,
) -> Result<ReconstructConfig, Status> {
    let mut cfg = base.clone();
    if !spec.formats.is_empty() {
        let mut formats = Vec::new();
        for f in &spec.formats {
            match f.as_str() {
                "both" => formats.extend([SampleSource::CtxGeneral, SampleSource::CtxPython]),
                "ctx-general" => formats.push(SampleSource::CtxGeneral),
                "ctx-python" => formats.push(SampleSource::CtxPython),
                other => {
                    return Err(Status::invalid_argument(format!(
                        "spec.formats: `{other}` (expected ctx-general, ctx-python or both)"
                    )));
                }
            }
        }
        formats.dedup();
        cfg.formats = formats;
    }
    if spec.max_tokens > 0 {
        cfg.max_tokens = spec.max_tokens as usize;
    }
    if spec.near_dup_threshold != 0.0 {
        if !(0.0..=1.0).contains(&spec.near_dup_threshold) {
            return Err(Status::invalid_argument(
                "spec.near_dup_threshold: must be within (0, 1]",
            ));
        }
        cfg.near_dup_threshold = spec.near_dup_threshold;
    }
    for f in &spec.decontamination_files {
        cfg.benchmarks.push(
            parse_benchmark(f).map_err(|e| {
                Status::invalid_argument(format!("spec.decontamination_files: {e}"))
            })?,
        );
    }
    if !spec.llm_base_url.is_empty() || !spec.llm_model.is_empty() {
        let mut llm = cfg.llm.clone().unwrap_or_default();
        if !spec.llm_base_url.is_empty() {
            llm.base_url = spec.llm_base_url.clone();
        }
        if !spec.llm_model.is_empty() {
            llm.model = spec.llm_model.clone();
        }
        if llm.base_url.is_empty() || llm.model.is_empty() {
            return Err(Status::invalid_argument(
                "spec.llm_base_url and spec.llm_model go together",
            ));
        }
        cfg.llm = Some(llm);
    }
    Ok(cfg)
}

/// An enhancer for `cfg` whose LLM cache lives in `cache_store`.
pub fn make_enhancer(
    cfg: &ReconstructConfig,
    cache_store: Arc<dyn BlobStore>,
) -> anyhow::Result<Arc<Enhancer>> {
    let chat = match &cfg.llm {
        Some(llm) => Some(davinci_llm::CachedChat {
            client: davinci_llm::ChatClient::new(llm.clone())?,
            cache: Arc::new(BlobCache { store: cache_store }),
        }),
        None => None,
    };
    Ok(Arc::new(Enhancer::new(chat, cfg.enhance.clone())))
}

/// The gRPC service.
#[derive(Clone)]
pub struct ReconstructorService {
    pub jobs: JobRegistry,
    pub base: ReconstructConfig,
    pub s3: S3Config,
    pub tokenizer: TokenizerLoader,
    /// When set, jobs of a run are shared with every replica through the `prs` topic.
    pub queue: Option<Arc<dyn WorkQueue>>,
}

impl std::fmt::Debug for ReconstructorService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReconstructorService")
            .field("jobs", &self.jobs)
            .finish_non_exhaustive()
    }
}

/// Runs one batch job: every input URI, outputs under `spec.out`.
async fn run_job(
    spec: ReconstructSpec,
    cfg: ReconstructConfig,
    s3: S3Config,
    counter: TokenCounter,
    handle: davinci_runtime::jobs::JobHandle,
) -> anyhow::Result<Vec<String>> {
    let output = blob::open(&spec.out, &s3).await?;
    let inputs = list_all_inputs(&spec, &s3).await?;
    let enhancer = make_enhancer(&cfg, output.clone())?;
    let mut recon = Reconstructor::new(cfg, counter)?;
    let done = Arc::new(AtomicU64::new(0));
    let total_shards = inputs.len() as u64;
    let mut written = Vec::new();
    for (i, (store, key)) in inputs.iter().enumerate() {
        let data = store.get(key).await?;
        let d = done.clone();
        let by_format =
            batch::process_shard(key, &data, &mut recon, enhancer.clone(), 16, move || {
                d.fetch_add(1, Ordering::Relaxed);
            })
            .await?;
        for (_, k, _) in batch::write_samples(output.as_ref(), "", key, by_format).await? {
            written.push(output.uri(&k));
        }
        handle
            .progress(
                i as u64 + 1,
                total_shards,
                &format!("{} PRs", done.load(Ordering::Relaxed)),
            )
            .await;
    }
    recon.stats.llm = enhancer.stats();
    commit_stats(output.as_ref(), &recon.stats, &handle, &mut written).await?;
    Ok(written)
}

/// Every input shard of `spec`, with the store it is in, in a fixed order.
async fn list_all_inputs(
    spec: &ReconstructSpec,
    s3: &S3Config,
) -> anyhow::Result<Vec<(Arc<dyn BlobStore>, String)>> {
    let mut inputs = Vec::new();
    for uri in &spec.inputs {
        let (root, key) = blob::split_uri(uri);
        let store = blob::open(&root, s3).await?;
        for k in shard::list_inputs(store.as_ref(), &key).await? {
            inputs.push((store.clone(), k));
        }
    }
    anyhow::ensure!(!inputs.is_empty(), "no PR shards at {:?}", spec.inputs);
    Ok(inputs)
}

/// Reports the counts on the job and writes `stats/reconstruct.json`, the commit point.
async fn commit_stats(
    output: &dyn BlobStore,
    stats: &Stats,
    handle: &JobHandle,
    written: &mut Vec<String>,
) -> anyhow::Result<()> {
    for (format, fs) in &stats.formats {
        handle.count(&format!("{format}.samples"), fs.samples).await;
        for (reason, n) in &fs.drops {
            handle.count(&format!("{format}.drop.{reason}"), *n).await;
        }
    }
    let body = serde_json::to_vec_pretty(stats)?;
    output
        .put("stats/reconstruct.json", bytes::Bytes::from(body))
        .await?;
    written.push(output.uri("stats/reconstruct.json"));
    Ok(())
}

/// What workers need of a job's spec; stored in its work directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkSpec {
    pub out: String,
    pub formats: Vec<String>,
    pub max_tokens: u32,
    pub tokenizer: String,
    pub llm_base_url: String,
    pub llm_model: String,
    pub near_dup_threshold: f64,
    pub decontamination_files: Vec<String>,
}

impl WorkSpec {
    fn of(spec: &ReconstructSpec) -> Self {
        Self {
            out: spec.out.clone(),
            formats: spec.formats.clone(),
            max_tokens: spec.max_tokens,
            tokenizer: spec.tokenizer.clone(),
            llm_base_url: spec.llm_base_url.clone(),
            llm_model: spec.llm_model.clone(),
            near_dup_threshold: spec.near_dup_threshold,
            decontamination_files: spec.decontamination_files.clone(),
        }
    }

    fn to_spec(&self) -> ReconstructSpec {
        ReconstructSpec {
            inputs: Vec::new(),
            out: self.out.clone(),
            formats: self.formats.clone(),
            max_tokens: self.max_tokens,
            tokenizer: self.tokenizer.clone(),
            llm_base_url: self.llm_base_url.clone(),
            llm_model: self.llm_model.clone(),
            near_dup_threshold: self.near_dup_threshold,
            decontamination_files: self.decontamination_files.clone(),
        }
    }
}

/// A rendered input: its render-time stats and where its candidates are.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartInfo {
    pub stats: Stats,
    /// Key of the candidates shard in the work directory.
    pub candidates: String,
    pub sha256: String,
}

/// A job shared by every replica: publishes the PR shards on `prs`, waits until each is
/// rendered, then dedups the candidates in input order and writes the samples and stats.
async fn run_fanned_out(
    spec: ReconstructSpec,
    cfg: ReconstructConfig,
    s3: S3Config,
    counter: TokenCounter,
    queue: Arc<dyn WorkQueue>,
    run_id: String,
    handle: JobHandle,
) -> anyhow::Result<Vec<String>> {
    let output = blob::open(&spec.out, &s3).await?;
    let inputs = list_all_inputs(&spec, &s3).await?;
    let ws = WorkSpec::of(&spec);
    let work = Work::open(&Work::dir_for(&spec.out, &run_id, "reconstruct", &ws), &s3).await?;
    work.put_spec(&ws).await?;
    let mut items = Vec::with_capacity(inputs.len());
    for (store, key) in &inputs {
        let data = store.get(key).await?;
        items.push(Item::for_shard(&run_id, PRS_TOPIC, &store.uri(key), &data));
    }
    let total = items.len() as u64;
    let h = &handle;
    fanout::distribute(
        queue.as_ref(),
        PRS_TOPIC,
        &work,
        &items,
        &handle.cancel_token(),
        &WaitOptions::default(),
        move |done, _| h.progress(done, 2 * total, "PR shards rendered"),
    )
    .await?;

    let formats = cfg.formats.clone();
    let mut recon = Reconstructor::new(cfg, counter)?;
    let mut stats = Stats::for_formats(&formats);
    let mut written = Vec::new();
    for (i, ((_, key), item)) in inputs.iter().zip(&items).enumerate() {
        let part: PartInfo = work
            .part(&item.part)
            .await?
            .ok_or_else(|| anyhow::anyhow!("part {} of {key} vanished", item.part))?;
        stats.merge(&part.stats);
        let data = work.store.get(&part.candidates).await?;
        let candidates: Vec<Candidate> = shard::decode_verified(&data, &part.sha256)
            .map_err(|e| anyhow::anyhow!("{}/{}: {e}", work.uri, part.candidates))?;
        let by_format = batch::admit_all(&mut recon, candidates);
        for (_, k, _) in batch::write_samples(output.as_ref(), "", key, by_format).await? {
            written.push(output.uri(&k));
        }
        handle
            .progress(total + i as u64 + 1, 2 * total, "deduplicated")
            .await;
    }
    stats.merge(&recon.stats);
    commit_stats(output.as_ref(), &stats, &handle, &mut written).await?;
    Ok(written)
}

fn job_id(r: Request<JobRef>) -> Result<String, Status> {
    let id = r.into_inner().job_id;
    if id.is_empty() {
        return Err(Status::invalid_argument("job_id: empty"));
    }
    Ok(id)
}

#[tonic::async_trait]
impl ReconstructorRpc for ReconstructorService {
    async fn start_reconstruct(
        &self,
        request: Request<StartReconstructRequest>,
    ) -> Result<Response<Job>, Status> {
        let req = request.into_inner();
        let spec = req
            .spec
            .ok_or_else(|| Status::invalid_argument("spec: missing"))?;
        if spec.inputs.is_empty() {
            return Err(Status::invalid_argument("spec.inputs: empty"));
        }
        if spec.out.is_empty() {
            return Err(Status::invalid_argument("spec.out: empty"));
        }
        let cfg = config_from_spec(&self.base, &spec)?;
        let counter = (self.tokenizer)(Some(spec.tokenizer.as_str()).filter(|t| !t.is_empty()))
            .map_err(|e| Status::invalid_argument(format!("spec.tokenizer: {e:#}")))?;
        let spec_json =
            serde_json::json!({ "inputs": spec.inputs, "work": WorkSpec::of(&spec) }).to_string();
        let s3 = self.s3.clone();
        let fan_out = self.queue.clone().filter(|_| !req.run_id.is_empty());
        let run_id = req.run_id.clone();
        let job = self
            .jobs
            .spawn(
                "reconstruct",
                &req.run_id,
                spec_json,
                move |handle| match fan_out {
                    Some(q) => Box::pin(run_fanned_out(spec, cfg, s3, counter, q, run_id, handle)),
                    None => Box::pin(run_job(spec, cfg, s3, counter, handle)),
                },
            )
            .await?;
        Ok(Response::new(job))
    }

    async fn get_reconstruct(&self, request: Request<JobRef>) -> Result<Response<Job>, Status> {
        Ok(Response::new(self.jobs.get(&job_id(request)?).await?))
    }

    type WatchReconstructStream =
        Pin<Box<dyn futures::Stream<Item = Result<ProgressEvent, Status>> + Send>>;

    async fn watch_reconstruct(
        &self,
        request: Request<JobRef>,
    ) -> Result<Response<Self::WatchReconstructStream>, Status> {
        let stream = self.jobs.watch(&job_id(request)?).await?;
        Ok(Response::new(Box::pin(stream.map(Ok))))
    }

    async fn cancel_reconstruct(&self, request: Request<JobRef>) -> Result<Response<Job>, Status> {
        Ok(Response::new(self.jobs.cancel(&job_id(request)?).await?))
    }
}

/// The topic PR shards of a shared job travel on.
pub const PRS_TOPIC: &str = "prs";

/// What a worker keeps per job: loading exclusion lists, benchmarks and the tokenizer is costly.
struct Loaded {
    cfg: ReconstructConfig,
    recon: Reconstructor,
    output: Arc<dyn BlobStore>,
}

/// Renders one claimed PR shard into candidates and commits its part.
async fn render_part(
    c: Claimed,
    jobs: &mut HashMap<String, Loaded>,
    base: &ReconstructConfig,
    tokenizer: &TokenizerLoader,
    s3: &S3Config,
) -> anyhow::Result<()> {
    if !jobs.contains_key(&c.work.uri) {
        let ws: WorkSpec = c.work.spec().await?;
        let spec = ws.to_spec();
        // A spec the server refuses, or an input that does not decode, fails the same way on
        // every attempt: permanent.
        let cfg = config_from_spec(base, &spec)
            .map_err(|e| davinci_runtime::retry::permanent(anyhow::anyhow!("{}", e.message())))?;
        let counter = tokenizer(Some(spec.tokenizer.as_str()).filter(|t| !t.is_empty()))?;
        let recon = Reconstructor::new(cfg.clone(), counter)?;
        let output = blob::open(&spec.out, s3).await?;
        if jobs.len() >= 4 {
            jobs.clear();
        }
        jobs.insert(c.work.uri.clone(), Loaded { cfg, recon, output });
    }
    let job = jobs.get_mut(&c.work.uri).expect("loaded above");
    job.recon.stats = Stats::for_formats(&job.cfg.formats);
    let enhancer = make_enhancer(&job.cfg, job.output.clone())?;
    let (name, data) = fanout::read_input(&c.claim, s3).await?;
    let candidates =
        batch::render_shard(&name, &data, &mut job.recon, enhancer.clone(), 16, || {}).await?;
    job.recon.stats.llm = enhancer.stats();
    let enc = shard::encode_shard(&candidates)?;
    let key = format!("candidates/{}.jsonl.zst", c.part);
    c.work.store.put(&key, enc.data).await?;
    let part = PartInfo {
        stats: job.recon.stats.clone(),
        candidates: key,
        sha256: enc.sha256,
    };
    c.work.commit_part(&c.part, &part).await?;
    tracing::info!(input = %c.claim.uri, candidates = enc.records, "PR shard rendered");
    Ok(())
}

/// Takes `prs` claims of shared jobs until `shutdown`: each PR shard is rendered into dedup
/// candidates under the job's work directory. Failures are retried, then dead-lettered, by the
/// queue; the job sees them there.
pub async fn worker(
    queue: Arc<dyn WorkQueue>,
    base: ReconstructConfig,
    tokenizer: TokenizerLoader,
    consumer: String,
    s3: S3Config,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let jobs = tokio::sync::Mutex::new(HashMap::new());
    fanout::serve_topic(queue, PRS_TOPIC, &consumer, s3.clone(), shutdown, |c| {
        let (jobs, base, tokenizer, s3) = (&jobs, &base, &tokenizer, &s3);
        async move { render_part(c, &mut *jobs.lock().await, base, tokenizer, s3).await }
    })
    .await?;
    Ok(())
}
