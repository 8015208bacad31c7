//! gRPC wiring of the conductor.
use crate::orchestrate::{
    CheckpointServer, StageAddrs, StageClients, execute, stages as run_stages,
};
use crate::spec::RunSpec;
use crate::summary::RunSummary;
use davinci_proto::v1::StageStatus;
use davinci_proto::v1::conductor_server::{Conductor, ConductorServer};
use davinci_proto::v1::{
    Job, JobState, ListRunsRequest, ListRunsResponse, Run, RunEvent, RunRef, SubmitRunRequest,
};
use davinci_runtime::jobs::JobRegistry;
use futures::StreamExt;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tonic::{Request, Response, Status};

/// Where runs go and how the stage services are reached.
#[derive(Debug, Clone)]
pub struct ConductorConfig {
    pub stages: StageAddrs,
    /// Bearer token for the stage services.
    pub token: Option<String>,
    /// Default storage root of runs whose spec names none.
    pub storage_root: String,
    /// How `s3://` roots are reached (to read a finished run's stats for its summary).
    pub s3: davinci_runtime::blob::S3Config,
}

/// Answers the Conductor RPCs from the run registry.
#[derive(Debug, Clone)]
pub struct ConductorService {
    runs: JobRegistry,
    cfg: ConductorConfig,
    stages: Arc<Mutex<HashMap<String, Vec<StageStatus>>>>,
    /// `Run.summary_json` of succeeded runs, read once.
    summaries: Arc<Mutex<HashMap<String, String>>>,
    /// Serves a run's checkpoint for its evaluate stage (the process's inference target).
    checkpoints: Option<Arc<dyn CheckpointServer>>,
}

impl ConductorService {
    pub fn new(runs: JobRegistry, cfg: ConductorConfig) -> Self {
        Self {
            runs,
            cfg,
            stages: Default::default(),
            summaries: Default::default(),
            checkpoints: None,
        }
    }

    /// Lets runs without `evaluation.model_url` evaluate their final checkpoint, served by
    /// `s` for the stage.
    pub fn with_checkpoint_server(mut self, s: Arc<dyn CheckpointServer>) -> Self {
        self.checkpoints = Some(s);
        self
    }

    /// Starts (or, for an id already running, returns) the run `run_id` of `spec`.
    async fn start_run(&self, run_id: &str, spec: RunSpec) -> Result<Job, Status> {
        let run_id = run_id.to_string();
        let root = spec
            .storage
            .clone()
            .unwrap_or_else(|| self.cfg.storage_root.clone());
        let cfg = self.cfg.clone();
        let stages = self.stages.clone();
        let checkpoints = self.checkpoints.clone();
        let rid = run_id.clone();
        let job = self
            .runs
            .spawn_with_id(&run_id, "run", &run_id, spec.to_yaml(), move |handle| {
                Box::pin(async move {
                    let order = run_stages(&spec);
                    let mut clients =
                        StageClients::connect(&cfg.stages, cfg.token.as_deref(), &order).await?;
                    if let Some(c) = checkpoints {
                        clients = clients.with_checkpoint_server(c);
                    }
                    let token = handle.cancel_token();
                    let h = handle.clone();
                    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<StageStatus>();
                    let follower = tokio::spawn(async move {
                        while let Some(st) = rx.recv().await {
                            let msg = format!(
                                "{} {}",
                                st.stage,
                                JobState::try_from(st.state)
                                    .map(|s| s.as_str_name())
                                    .unwrap_or("?")
                            );
                            {
                                let mut all = stages.lock().expect("stages lock");
                                let v = all.entry(rid.clone()).or_default();
                                match v.iter_mut().find(|s| s.stage == st.stage) {
                                    Some(s) => *s = st.clone(),
                                    None => v.push(st.clone()),
                                }
                            }
                            let i = order.iter().position(|s| *s == st.stage).unwrap_or(0) as u64;
                            h.progress(i, order.len() as u64, &msg).await;
                        }
                    });
                    let res = execute(&mut clients, handle.id(), &root, &spec, &token, |st| {
                        let _ = tx.send(st.clone());
                    })
                    .await;
                    drop(tx);
                    let _ = follower.await;
                    res?;
                    Ok(vec![format!(
                        "{}/runs/{}",
                        root.trim_end_matches('/'),
                        handle.id()
                    )])
                })
            })
            .await?;
        Ok(job)
    }

    /// Starts again the runs a previous conductor process left in flight. Their stages are
    /// idempotent, so a resumed run rewrites the same objects and loses nothing.
    pub async fn resume_interrupted(&self) {
        for job in self.runs.interrupted().iter().filter(|j| j.kind == "run") {
            match RunSpec::parse(&job.spec_json) {
                Ok(spec) => match self.start_run(&job.job_id, spec).await {
                    Ok(_) => tracing::info!(run_id = %job.job_id, "resumed a run left in flight"),
                    Err(e) => {
                        tracing::error!(run_id = %job.job_id, error = %e, "could not resume run")
                    }
                },
                Err(e) => {
                    tracing::error!(run_id = %job.job_id, error = %e, "stored spec no longer valid; run not resumed")
                }
            }
        }
    }

    fn with_stages(&self, mut run: Run) -> Run {
        if let Some(s) = self.stages.lock().expect("stages lock").get(&run.run_id) {
            run.stages = s.clone();
        }
        run
    }

    /// [`Self::with_stages`], plus the summary of a run that succeeded. A summary that cannot
    /// be read (storage gone) is logged and left empty; the run's state stands.
    async fn with_summary(&self, run: Run) -> Run {
        let mut run = self.with_stages(run);
        if run.state != JobState::Succeeded as i32 {
            return run;
        }
        if let Some(s) = self
            .summaries
            .lock()
            .expect("summaries lock")
            .get(&run.run_id)
        {
            run.summary_json = s.clone();
            return run;
        }
        let suffix = format!("/runs/{}", run.run_id);
        let root = run.root.strip_suffix(&suffix).unwrap_or(&run.root);
        let read = async {
            let store = davinci_runtime::blob::open(root, &self.cfg.s3).await?;
            let summary = RunSummary::read(store.as_ref(), &run.run_id).await?;
            anyhow::Ok(serde_json::to_string(&summary)?)
        };
        match read.await {
            Ok(json) => {
                self.summaries
                    .lock()
                    .expect("summaries lock")
                    .insert(run.run_id.clone(), json.clone());
                run.summary_json = json;
            }
            Err(e) => {
                tracing::warn!(run_id = %run.run_id, error = %format!("{e:#}"), "cannot read the run's summary")
            }
        }
        run
    }

    pub fn into_server(self) -> ConductorServer<Self> {
        ConductorServer::new(self)
    }
}

/// A run as clients see it, from its registry record.
fn run_of(job: Job) -> Run {
    Run {
        run_id: job.job_id,
        state: job.state,
        spec_yaml: job.spec_json,
        stages: Vec::new(),
        error: job.error,
        created_at: job.created_at,
        updated_at: job.updated_at,
        root: job.outputs.first().cloned().unwrap_or_default(),
        summary_json: String::new(),
    }
}

type RunStream = Pin<Box<dyn futures::Stream<Item = Result<RunEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Conductor for ConductorService {
    async fn submit_run(&self, req: Request<SubmitRunRequest>) -> Result<Response<Run>, Status> {
        let req = req.into_inner();
        let spec =
            RunSpec::parse(&req.spec_yaml).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if spec
            .evaluation
            .as_ref()
            .is_some_and(|e| e.model_url.is_none())
            && self.checkpoints.is_none()
        {
            return Err(Status::invalid_argument(
                "invalid run spec at `evaluation.model_url`: this conductor serves no checkpoints; name the endpoint to evaluate (model_url and model)",
            ));
        }
        let run_id = if req.run_id.is_empty() {
            spec.resolved_run_id()
        } else {
            req.run_id.clone()
        };
        let job = self.start_run(&run_id, spec).await?;
        Ok(Response::new(self.with_stages(run_of(job))))
    }

    async fn get_run(&self, req: Request<RunRef>) -> Result<Response<Run>, Status> {
        let job = self.runs.get(&req.into_inner().run_id).await?;
        Ok(Response::new(self.with_summary(run_of(job)).await))
    }

    type WatchRunStream = RunStream;

    async fn watch_run(&self, req: Request<RunRef>) -> Result<Response<RunStream>, Status> {
        let id = req.into_inner().run_id;
        let me = self.clone();
        let events = self.runs.watch(&id).await?;
        let stream = events.then(move |ev| {
            let me = me.clone();
            async move {
                let job = me.runs.get(&ev.job_id).await?;
                Ok(RunEvent {
                    run_id: ev.job_id,
                    seq: ev.seq,
                    run: Some(me.with_summary(run_of(job)).await),
                    message: ev.message,
                })
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_runs(
        &self,
        req: Request<ListRunsRequest>,
    ) -> Result<Response<ListRunsResponse>, Status> {
        let req = req.into_inner();
        let want = JobState::try_from(req.state).unwrap_or(JobState::Unspecified);
        let limit = if req.limit == 0 {
            usize::MAX
        } else {
            req.limit as usize
        };
        let runs = self
            .runs
            .list()
            .await?
            .into_iter()
            .filter(|j| j.kind == "run")
            .filter(|j| want == JobState::Unspecified || j.state == want as i32)
            .take(limit)
            .map(|j| self.with_stages(run_of(j)))
            .collect();
        Ok(Response::new(ListRunsResponse { runs }))
    }

    async fn cancel_run(&self, req: Request<RunRef>) -> Result<Response<Run>, Status> {
        let job = self.runs.cancel(&req.into_inner().run_id).await?;
        Ok(Response::new(self.with_stages(run_of(job))))
    }
}
