//! gRPC wiring: `TokenizerPacker` Start/Get/Watch/Cancel over the runtime's job registry, and a
//! unary `CountTokens`. A job runs in this process ([`crate::pipeline::run`] on a blocking
//! thread), or, with a queue and a run id, is shared with every replica's [`worker`]
//! ([`crate::shared`]); both write the same bytes.
use crate::input::Progress;
use crate::job::job_options;
use crate::mixture::Mixture;
use crate::pipeline;
use crate::shared::{self, TokenizerCache};
use crate::storage::{self, OutputDir};
use davinci_proto::v1::tokenizer_packer_server::TokenizerPacker;
use davinci_proto::v1::{
    CountTokensRequest, CountTokensResponse, Job, JobRef, PackSpec, StartPackRequest,
};
use davinci_runtime::blob::S3Config;
use davinci_runtime::fanout;
use davinci_runtime::grpc::{self, ProgressStream};
use davinci_runtime::jobs::JobRegistry;
use davinci_runtime::queue::WorkQueue;
use davinci_tokenize::Tokenizer;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

pub use crate::job::{SAMPLES_TOPIC, TRAJECTORIES_TOPIC};

/// Limits on what one `CountTokens` call may ask for (requests are untrusted).
pub const MAX_COUNT_TEXTS: usize = 10_000;
pub const MAX_COUNT_BYTES: usize = 64 << 20;

pub struct PackerService {
    jobs: JobRegistry,
    s3: S3Config,
    tokenizers: Mutex<HashMap<String, Arc<Tokenizer>>>,
    queue: Option<Arc<dyn WorkQueue>>,
}

impl PackerService {
    pub fn new(jobs: JobRegistry, s3: S3Config) -> Self {
        Self {
            jobs,
            s3,
            tokenizers: Mutex::new(HashMap::new()),
            queue: None,
        }
    }

    /// Jobs with a run id are shared with every replica through `samples` and `trajectories`.
    pub fn with_queue(mut self, queue: Arc<dyn WorkQueue>) -> Self {
        self.queue = Some(queue);
        self
    }

    /// Loads (and keeps) the tokenizer named by a path, URI or Hub model id.
    async fn tokenizer(&self, uri: &str) -> anyhow::Result<Arc<Tokenizer>> {
        if let Some(t) = self.tokenizers.lock().expect("tokenizer cache").get(uri) {
            return Ok(t.clone());
        }
        let bytes = storage::read_tokenizer(uri, &self.s3).await?;
        let tok =
            Arc::new(tokio::task::spawn_blocking(move || Tokenizer::from_bytes(&bytes)).await??);
        self.tokenizers
            .lock()
            .expect("tokenizer cache")
            .insert(uri.to_string(), tok.clone());
        Ok(tok)
    }
}

/// Runs one pack job described by `spec` in this process; returns the manifest URI.
pub async fn run_spec(
    spec: PackSpec,
    s3: S3Config,
    tok: Arc<Tokenizer>,
    cancel: Arc<AtomicBool>,
    mut progress: impl FnMut(&Progress) + Send + 'static,
) -> anyhow::Result<Vec<String>> {
    let out = OutputDir::new(&spec.out)?;
    let (mixture, opts) = job_options(&spec, &out)?;
    let inputs = storage::resolve_inputs(&spec.inputs, &s3).await?;
    let path = out.path().to_path_buf();
    tokio::task::spawn_blocking(move || {
        pipeline::run(
            &tok,
            &mixture,
            &opts,
            &inputs,
            &path,
            &mut progress,
            &cancel,
        )
    })
    .await??;
    out.publish(&s3).await?;
    Ok(vec![format!(
        "{}/manifest.json",
        spec.out.trim_end_matches('/')
    )])
}

/// Takes `topic`'s claims of shared pack jobs until `shutdown`: each input shard is tokenized
/// into its part in the job's work directory, then committed. Failures are retried, then
/// dead-lettered, by the queue; the job sees them there. Returns the inputs handled.
pub async fn worker(
    queue: Arc<dyn WorkQueue>,
    topic: &'static str,
    consumer: String,
    s3: S3Config,
    shutdown: CancellationToken,
) -> anyhow::Result<u64> {
    // One cache for every worker of the process (topics, in-process replicas): a tokenizer is
    // loaded once, not once per worker at the same moment.
    static CACHE: std::sync::LazyLock<TokenizerCache> = std::sync::LazyLock::new(Default::default);
    let cache = &*CACHE;
    fanout::serve_topic(queue, topic, &consumer, s3.clone(), shutdown, |c| {
        let s3 = &s3;
        async move {
            let summary = shared::tokenize_part(&c, s3, cache).await?;
            c.work.commit_part(&c.part, &summary).await?;
            tracing::info!(input = %c.claim.uri, tokens = summary.tokens, "input shard tokenized");
            Ok(())
        }
    })
    .await
}

fn invalid(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}

#[tonic::async_trait]
impl TokenizerPacker for PackerService {
    async fn start_pack(&self, req: Request<StartPackRequest>) -> Result<Response<Job>, Status> {
        let req = req.into_inner();
        let spec = req.spec.ok_or_else(|| invalid("spec is required"))?;
        if spec.inputs.is_empty() || spec.out.is_empty() || spec.tokenizer.is_empty() {
            return Err(invalid(
                "spec.inputs, spec.out and spec.tokenizer are required",
            ));
        }
        if !spec.mixture_json.trim().is_empty() {
            Mixture::parse(&spec.mixture_json).map_err(invalid)?;
        }
        let tok = self.tokenizer(&spec.tokenizer).await.map_err(invalid)?;
        let spec_json = serde_json::json!({
            "inputs": spec.inputs, "out": spec.out, "tokenizer": spec.tokenizer,
            "seq_len": spec.seq_len, "seed": spec.seed, "mixture": spec.mixture_json,
        })
        .to_string();
        let s3 = self.s3.clone();
        let rt = tokio::runtime::Handle::current();
        let fan_out = self.queue.clone().filter(|_| !req.run_id.is_empty());
        let run_id = req.run_id.clone();
        let job = self
            .jobs
            .spawn("pack", &req.run_id, spec_json, move |handle| {
                Box::pin(async move {
                    if let Some(queue) = fan_out {
                        return shared::run(spec, s3, tok, queue, run_id, handle).await;
                    }
                    let cancel = Arc::new(AtomicBool::new(false));
                    let (flag, token) = (cancel.clone(), handle.cancel_token());
                    tokio::spawn(async move {
                        token.cancelled().await;
                        flag.store(true, Ordering::Relaxed);
                    });
                    let h = handle.clone();
                    let progress = move |p: &Progress| {
                        let msg =
                            format!("{} records, {} tokens ({})", p.records, p.tokens, p.input);
                        rt.block_on(h.progress(p.inputs_done as u64, p.inputs_total as u64, &msg));
                    };
                    run_spec(spec, s3, tok, cancel, progress).await
                })
            })
            .await?;
        Ok(Response::new(job))
    }

    async fn get_pack(&self, req: Request<JobRef>) -> Result<Response<Job>, Status> {
        grpc::get_job(&self.jobs, &req.into_inner().job_id).await
    }

    type WatchPackStream = ProgressStream;

    async fn watch_pack(&self, req: Request<JobRef>) -> Result<Response<ProgressStream>, Status> {
        grpc::watch_job(&self.jobs, &req.into_inner().job_id).await
    }

    async fn cancel_pack(&self, req: Request<JobRef>) -> Result<Response<Job>, Status> {
        grpc::cancel_job(&self.jobs, &req.into_inner().job_id).await
    }

    async fn count_tokens(
        &self,
        req: Request<CountTokensRequest>,
    ) -> Result<Response<CountTokensResponse>, Status> {
        let req = req.into_inner();
        if req.texts.len() > MAX_COUNT_TEXTS {
            return Err(invalid(format!(
                "{} texts (at most {MAX_COUNT_TEXTS})",
                req.texts.len()
            )));
        }
        let bytes: usize = req.texts.iter().map(String::len).sum();
        if bytes > MAX_COUNT_BYTES {
            return Err(invalid(format!(
                "{bytes} bytes of text (at most {MAX_COUNT_BYTES})"
            )));
        }
        let tok = self.tokenizer(&req.tokenizer).await.map_err(invalid)?;
        let counts = tokio::task::spawn_blocking(move || tok.encode_batch(&req.texts))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(e.to_string()))?
            .iter()
            .map(|ids| ids.len() as u64)
            .collect::<Vec<_>>();
        let total = counts.iter().sum();
        Ok(Response::new(CountTokensResponse { counts, total }))
    }
}
