//! `davinci runs`: submit, follow, list and cancel runs on a conductor.
use davinci_proto::v1::conductor_client::ConductorClient;
use davinci_proto::v1::{JobState, ListRunsRequest, Run, RunRef, SubmitRunRequest};
use davinci_runtime::grpc::{self, ClientInterceptor};
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
    Submit {
        spec: PathBuf,
        /// Client-chosen run id (resubmitting it does not start a second run).
        #[arg(long)]
        run_id: Option<String>,
        #[arg(long)]
        watch: bool,
    },
    /// Follow a run until it ends; exits non-zero unless it succeeded.
    Watch { run_id: String },
    /// One run as JSON-like text.
    Get { run_id: String },
    /// Runs, newest first.
    List {
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Stop every stage of a run.
    Cancel { run_id: String },
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

async fn watch(client: &mut Client, run_id: &str) -> anyhow::Result<()> {
    let mut stream = client
        .watch_run(RunRef {
            run_id: run_id.into(),
        })
        .await?
        .into_inner();
    let mut last = None;
    while let Some(ev) = stream.message().await? {
        if let Some(run) = ev.run {
            eprintln!("{} {}: {}", run.run_id, state_name(run.state), ev.message);
            last = Some(run);
        }
    }
    let run = match last {
        Some(r) => r,
        None => client
            .get_run(RunRef {
                run_id: run_id.into(),
            })
            .await?
            .into_inner(),
    };
    show(&run);
    anyhow::ensure!(
        run.state == JobState::Succeeded as i32,
        "run {run_id} ended {}",
        state_name(run.state)
    );
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
            run_id,
            watch: follow,
        } => {
            let yaml = std::fs::read_to_string(&spec)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", spec.display()))?;
            let run = client
                .submit_run(SubmitRunRequest {
                    spec_yaml: yaml,
                    run_id: run_id.unwrap_or_default(),
                })
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.message()))?
                .into_inner();
            println!("{}", run.run_id);
            if follow {
                watch(&mut client, &run.run_id).await?;
            }
        }
        Command::Watch { run_id } => watch(&mut client, &run_id).await?,
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
