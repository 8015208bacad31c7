//! `davinci runs`: submit, follow, list and cancel runs on a conductor.
use crate::progress::StageBars;
use crate::runspec::{self, Overrides};
use davinci_conductor::summary::RunSummary;
use davinci_proto::v1::conductor_client::ConductorClient;
use davinci_proto::v1::{JobState, ListRunsRequest, Run, RunRef, SubmitRunRequest};
use davinci_runtime::grpc::{self, ClientInterceptor};
use serde_json::json;
use std::path::PathBuf;
use tonic::codegen::InterceptedService;
use tonic::transport::Channel;

#[derive(Debug, clap::Args)]
pub struct Conn {
    /// Conductor address: host:port, http://… or https://….
    #[arg(
        long,
        global = true,
        default_value = "127.0.0.1:50051",
        env = "DAVINCI_ADDR"
    )]
    pub addr: String,
    /// Bearer token, when the server requires one.
    #[arg(
        long,
        global = true,
        env = "DAVINCI_AUTH_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub conn: Conn,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Submit a RunSpec (YAML); prints the run id. `--watch` follows it to the end.
    ///
    /// The overrides mean what they mean for `davinci run`. Local paths (repositories, the
    /// tokenizer, `file://` storage, decontamination files) are resolved against the
    /// directory this command runs in before the spec is sent, and a local path that does not
    /// exist is refused naming its field: the conductor reads them as absolute paths, so they
    /// must be reachable at the same place where its services run.
    Submit {
        /// The RunSpec (YAML), as `davinci run` takes it.
        spec: PathBuf,
        #[command(flatten)]
        overrides: Overrides,
        /// Follow the run: a progress bar per stage, then the summary `davinci run` prints.
        #[arg(long)]
        watch: bool,
        /// With --watch: one JSON object per run event on stdout, the last with the summary.
        #[arg(long, requires = "watch")]
        json: bool,
    },
    /// Follow a run until it ends: a progress bar per stage, then the summary `davinci run`
    /// prints; exits non-zero unless it succeeded.
    Watch {
        /// The run id `runs submit` printed.
        run_id: String,
        /// One JSON object per run event on stdout, the last with the summary (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// One run: its state, root and stages.
    Get {
        /// The run id.
        run_id: String,
    },
    /// Runs, newest first.
    List {
        /// At most this many runs (0: all).
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Stop every stage of a run.
    Cancel {
        /// The run id.
        run_id: String,
    },
}

type Client = ConductorClient<InterceptedService<Channel, ClientInterceptor>>;

fn state_name(s: i32) -> String {
    JobState::try_from(s)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("JOB_STATE_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| "unknown".into())
}

fn show(run: &Run) {
    println!("{}\t{}\t{}", run.run_id, state_name(run.state), run.root);
    for s in &run.stages {
        let restarts = s
            .counters
            .get("restarts")
            .map(|n| format!("  restarted {n}x"))
            .unwrap_or_default();
        println!(
            "  {:<12} {:<10} {}/{}  {:.1}s{restarts}",
            s.stage,
            state_name(s.state),
            s.done,
            s.total,
            s.wall_seconds
        );
    }
    if !run.error.is_empty() {
        println!("  error: {}", run.error);
    }
}

/// A run as one JSON object: state, stages and, once it succeeded, its summary.
fn run_json(run: &Run, message: &str) -> serde_json::Value {
    let stages: Vec<_> = run
        .stages
        .iter()
        .map(|s| {
            json!({
                "stage": s.stage, "state": state_name(s.state), "job_id": s.job_id,
                "done": s.done, "total": s.total, "wall_seconds": s.wall_seconds,
                "counters": s.counters,
            })
        })
        .collect();
    let summary: serde_json::Value =
        serde_json::from_str(&run.summary_json).unwrap_or(serde_json::Value::Null);
    json!({
        "run_id": run.run_id, "state": state_name(run.state), "message": message,
        "root": run.root, "error": run.error, "stages": stages, "summary": summary,
    })
}

/// Seconds from the run's creation to its last update.
fn run_wall(run: &Run) -> f64 {
    match (&run.created_at, &run.updated_at) {
        (Some(a), Some(b)) => (b.seconds - a.seconds) as f64 + f64::from(b.nanos - a.nanos) / 1e9,
        _ => 0.0,
    }
}

/// Follows `run_id` to its end: stage bars and then the summary, or JSON lines with `json`.
/// `warnings` are the submitter's (see [`runspec::Loaded`]).
async fn watch(
    client: &mut Client,
    run_id: &str,
    json: bool,
    warnings: &[String],
) -> anyhow::Result<()> {
    let mut stream = client
        .watch_run(RunRef {
            run_id: run_id.into(),
        })
        .await?
        .into_inner();
    let bars = (!json).then(StageBars::new);
    let mut last = None;
    while let Some(ev) = stream.message().await? {
        if let Some(run) = ev.run {
            match &bars {
                Some(b) => run.stages.iter().for_each(|s| b.update(s)),
                None => println!("{}", run_json(&run, &ev.message)),
            }
            last = Some(run);
        }
    }
    // The stream ends with the run's last change; without one that settles it (an end state,
    // with the summary once it succeeded), ask for the record.
    let settled = |r: &Run| {
        JobState::try_from(r.state).is_ok_and(|s| s.is_terminal())
            && (r.state != JobState::Succeeded as i32 || !r.summary_json.is_empty())
    };
    let run = match last {
        Some(r) if settled(&r) => r,
        _ => client
            .get_run(RunRef {
                run_id: run_id.into(),
            })
            .await?
            .into_inner(),
    };
    if let Some(b) = &bars {
        run.stages.iter().for_each(|s| b.update(s));
    }
    if json {
        println!("{}", run_json(&run, "end"));
    }
    if !json && run.state != JobState::Succeeded as i32 {
        show(&run);
    }
    anyhow::ensure!(
        run.state == JobState::Succeeded as i32,
        "run {run_id} ended {}{}",
        state_name(run.state),
        if run.error.is_empty() {
            String::new()
        } else {
            format!(": {}", run.error)
        }
    );
    if !json {
        let summary: RunSummary = serde_json::from_str(&run.summary_json).map_err(|e| {
            anyhow::anyhow!("run {run_id} succeeded, but the conductor sent no readable summary ({e}); its outputs are under {}", run.root)
        })?;
        let suffix = format!("/runs/{run_id}");
        let root = run.root.strip_suffix(&suffix).unwrap_or(&run.root);
        crate::run::print_summary(
            &summary,
            root,
            run_id,
            &run.stages,
            run_wall(&run),
            warnings,
        );
    }
    Ok(())
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let channel = grpc::connect(&args.conn.addr).await?;
    let mut client = ConductorClient::with_interceptor(
        channel,
        ClientInterceptor::new(args.conn.token.as_deref())?,
    );
    match args.command {
        Command::Submit {
            spec,
            overrides,
            watch: follow,
            json,
        } => {
            let loaded = runspec::load(&spec, &overrides)?;
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
            let run = client
                .submit_run(SubmitRunRequest {
                    spec_yaml: loaded.spec.to_yaml(),
                    run_id: String::new(),
                })
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.message()))?
                .into_inner();
            if !json {
                println!("{}", run.run_id);
            }
            if follow {
                watch(&mut client, &run.run_id, json, &loaded.warnings).await?;
            }
        }
        Command::Watch { run_id, json } => watch(&mut client, &run_id, json, &[]).await?,
        Command::Get { run_id } => show(&client.get_run(RunRef { run_id }).await?.into_inner()),
        Command::List { limit } => {
            for r in client
                .list_runs(ListRunsRequest { state: 0, limit })
                .await?
                .into_inner()
                .runs
            {
                show(&r);
            }
        }
        Command::Cancel { run_id } => {
            show(&client.cancel_run(RunRef { run_id }).await?.into_inner())
        }
    }
    Ok(())
}
