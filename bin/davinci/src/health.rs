//! `davinci health`: asks a server's grpc.health.v1 service, as a Kubernetes probe would.
use davinci_runtime::grpc::{self, ClientInterceptor};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[derive(Debug, clap::Args)]
#[command(after_help = "Exits 0 when every service asked about is SERVING, 1 otherwise.")]
pub struct Args {
    /// Server address: host:port, http://host:port or https://host:port.
    #[arg(long, default_value = "127.0.0.1:50051", env = "DAVINCI_ADDR")]
    pub addr: String,
    /// Service to ask about (e.g. davinci.v1.Crawler); repeatable. Default: the server as a whole.
    #[arg(long)]
    pub service: Vec<String>,
    /// Ask about every davinci service.
    #[arg(long, conflicts_with = "service")]
    pub all: bool,
    /// Bearer token (health itself needs none).
    #[arg(long, env = "DAVINCI_AUTH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let channel = grpc::connect(&args.addr).await?;
    let mut client =
        HealthClient::with_interceptor(channel, ClientInterceptor::new(args.token.as_deref())?);
    let services: Vec<String> = if args.all {
        davinci_proto::SERVICE_NAMES
            .iter()
            .map(|(_, n)| n.to_string())
            .collect()
    } else if args.service.is_empty() {
        vec![String::new()]
    } else {
        args.service
    };
    let mut bad = 0;
    for s in &services {
        let status = match client
            .check(HealthCheckRequest { service: s.clone() })
            .await
        {
            Ok(r) => ServingStatus::try_from(r.into_inner().status)
                .map(|s| s.as_str_name().to_string())
                .unwrap_or_else(|_| "UNKNOWN".into()),
            Err(e) if e.code() == tonic::Code::NotFound => {
                "NOT_FOUND (this server does not run it)".into()
            }
            Err(e) => anyhow::bail!("health check of `{s}` on {}: {}", args.addr, e.message()),
        };
        if status != "SERVING" {
            bad += 1;
        }
        println!("{}\t{status}", if s.is_empty() { "<server>" } else { s });
    }
    if bad > 0 {
        anyhow::bail!("{bad} of {} services are not serving", services.len());
    }
    Ok(())
}
