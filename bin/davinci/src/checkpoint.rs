//! The evaluate stage's model when a spec names no endpoint: the run's final checkpoint served
//! by the inference target's code in this process, on a loopback port, for the stage's length.
use anyhow::Context;
use davinci_conductor::orchestrate::{CheckpointServer, ServedModel};
use std::path::PathBuf;

/// Serves checkpoints on local storage (`file://`) with `davinci-inference`.
pub struct InProcess;

#[tonic::async_trait]
impl CheckpointServer for InProcess {
    async fn serve(&self, checkpoint: &str, tokenizer: &str) -> anyhow::Result<ServedModel> {
        let dir = match checkpoint.strip_prefix("file://") {
            Some(p) => PathBuf::from(p),
            None if !checkpoint.contains("://") => PathBuf::from(checkpoint),
            None => anyhow::bail!(
                "{checkpoint} is not on local storage; serve it elsewhere (`davinci serve --target inference`) and give evaluation.model_url"
            ),
        };
        // A checkpoint trained from a config.json carries no tokenizer: the run's is its own.
        let tokenizer = match dir.join("tokenizer.json").is_file() {
            true => None,
            false => Some(
                davinci_tokenize::locate(tokenizer)
                    .with_context(|| format!("locating the run's tokenizer {tokenizer}"))?,
            ),
        };
        let step = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let cfg = davinci_inference::ServeConfig {
            model_dir: dir,
            name: Some(format!("checkpoint-{step}")),
            max_batch: 8,
            max_model_len: None,
            tokenizer,
        };
        let state = tokio::task::spawn_blocking(move || davinci_inference::load(&cfg)).await??;
        let model = state.name.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/v1", listener.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            if let Err(e) = davinci_inference::serve(listener, state, shutdown).await {
                tracing::error!(error = %format!("{e:#}"), "checkpoint server failed");
            }
        });
        tracing::info!(%url, %model, "serving the checkpoint for the evaluate stage");
        Ok(ServedModel {
            url,
            model,
            guard: Box::new(stop),
        })
    }
}
