//! Shards in and checkpoints out through the runtime's BlobStore, so the trainer works on
//! `s3://` as on local paths (distributed mode: the packer wrote its shards to S3 and the run's
//! checkpoints belong there too).
//!
//! The candle engine trains from a local directory. For remote data the manifest's shards are
//! copied into a staging directory first (the manifest last, as the packer wrote it); for a
//! remote output it trains into a local directory, uploads every checkpoint as it is written
//! (`state.json` last: the remote commit point, as the rename is locally) with the JSON log,
//! and before training brings the newest remote checkpoint back, so a job restarted on another
//! machine resumes where the last one stopped.
use anyhow::Context;
use davinci_core::packed::{Manifest, shard_files};
use davinci_runtime::blob::{self, BlobStore, S3Config};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Whether `uri` names storage other than a local path (`file://` or bare).
pub fn is_remote(uri: &str) -> bool {
    uri.contains("://") && !uri.starts_with("file://")
}

/// `uri` split into its parent prefix and last segment (`s3://b/p/manifest.json`).
fn split(uri: &str) -> anyhow::Result<(&str, &str)> {
    uri.trim_end_matches('/')
        .rsplit_once('/')
        .filter(|(p, n)| !n.is_empty() && p.contains("://") && !p.ends_with(':'))
        .with_context(|| format!("`{uri}` names no object below a bucket"))
}

/// Copies the manifest at `uri` into `dir` (so the job can be checked before anything
/// else moves); returns the local manifest.
pub async fn fetch_manifest(uri: &str, s3: &S3Config, dir: &Path) -> anyhow::Result<PathBuf> {
    let (parent, name) = split(uri)?;
    let store = blob::open(parent, s3)
        .await
        .with_context(|| format!("opening {parent}"))?;
    let bytes = store.get(name).await.with_context(|| {
        format!("reading the manifest {uri} (the packer writes it last; is the pack finished?)")
    })?;
    Manifest::from_json(&bytes).with_context(|| uri.to_string())?;
    std::fs::create_dir_all(dir)?;
    let local = dir.join("manifest.json");
    std::fs::write(&local, &bytes)?;
    Ok(local)
}

/// Copies every shard the manifest fetched into `dir` names from beside the remote manifest
/// `uri`. Shard prefixes are keys below the manifest's prefix (checked like every key).
pub async fn stage_shards(uri: &str, s3: &S3Config, dir: &Path) -> anyhow::Result<()> {
    let (parent, _) = split(uri)?;
    let store = blob::open(parent, s3).await?;
    let manifest = Manifest::from_json(&std::fs::read(dir.join("manifest.json"))?)?;
    for shard in manifest.shards() {
        for key in shard_files(&shard.prefix) {
            blob::validate_key(&key).with_context(|| format!("{uri}: shard `{}`", shard.prefix))?;
            let data = store
                .get(&key)
                .await
                .with_context(|| format!("reading shard file {}", store.uri(&key)))?;
            let local = dir.join(&key);
            if let Some(p) = local.parent() {
                std::fs::create_dir_all(p)?;
            }
            std::fs::write(&local, &data)
                .with_context(|| format!("staging {}", local.display()))?;
        }
    }
    Ok(())
}

/// A remote output root and the local directory training writes into.
#[derive(Debug, Clone)]
pub struct RemoteOut {
    store: Arc<dyn BlobStore>,
    pub local: PathBuf,
}

const LOG: &str = "train_log.jsonl";

impl RemoteOut {
    pub async fn open(uri: &str, s3: &S3Config, local: &Path) -> anyhow::Result<Self> {
        let store = blob::open(uri.trim_end_matches('/'), s3)
            .await
            .with_context(|| format!("opening {uri}"))?;
        Ok(Self {
            store,
            local: local.to_path_buf(),
        })
    }

    /// Brings the newest complete remote checkpoint (one with `state.json`) and the JSON log
    /// into the local directory; returns its step.
    pub async fn restore(&self) -> anyhow::Result<Option<u64>> {
        let listed = self.store.list("checkpoints/").await?;
        let newest = listed
            .iter()
            .filter_map(|m| {
                let rest = m.key.strip_prefix("checkpoints/")?;
                let (step, file) = rest.split_once('/')?;
                (file == "state.json").then_some(step.parse::<u64>().ok()?)
            })
            .max();
        let Some(step) = newest else {
            return Ok(None);
        };
        let prefix = format!("checkpoints/{step}/");
        for m in listed.iter().filter(|m| m.key.starts_with(&prefix)) {
            let data = self.store.get(&m.key).await?;
            let local = self.local.join(&m.key);
            if let Some(p) = local.parent() {
                std::fs::create_dir_all(p)?;
            }
            std::fs::write(&local, &data)?;
        }
        match self.store.get(LOG).await {
            Ok(log) => std::fs::write(self.local.join(LOG), &log)?,
            Err(blob::BlobError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(Some(step))
    }

    /// Uploads a checkpoint directory written under the local root (its files, `state.json`
    /// last) and the JSON log up to it; then drops older local checkpoints, which are remote
    /// now.
    pub async fn publish_checkpoint(&self, dir: &Path) -> anyhow::Result<()> {
        let rel = dir
            .strip_prefix(&self.local)
            .with_context(|| format!("{} is not under {}", dir.display(), self.local.display()))?;
        let rel = rel.to_string_lossy().replace('\\', "/");
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        files.sort_by_key(|p| (p.file_name().is_some_and(|n| n == "state.json"), p.clone()));
        for f in files {
            let name = f.file_name().expect("a file").to_string_lossy();
            let key = format!("{rel}/{name}");
            self.store
                .put(&key, std::fs::read(&f)?.into())
                .await
                .with_context(|| format!("uploading {}", self.store.uri(&key)))?;
        }
        let log = self.local.join(LOG);
        if log.exists() {
            self.store
                .put(LOG, std::fs::read(&log)?.into())
                .await
                .with_context(|| format!("uploading {}", self.store.uri(LOG)))?;
        }
        if let Some(parent) = dir.parent() {
            for e in std::fs::read_dir(parent)? {
                let p = e?.path();
                if p != dir && p.is_dir() {
                    let _ = std::fs::remove_dir_all(&p);
                }
            }
        }
        Ok(())
    }
}
