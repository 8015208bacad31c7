//! Inputs, tokenizer and outputs on `file://` paths or a BlobStore (`s3://`).
//!
//! Pack jobs run on a local directory; for a remote `--out` the shards are staged in a temporary
//! directory and uploaded, `manifest.json` last (the commit point).
use crate::input::Input;
use anyhow::Context;
use bytes::Bytes;
use davinci_runtime::blob::{self, BlobStore, S3Config};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn is_remote(uri: &str) -> bool {
    uri.contains("://") && !uri.starts_with("file://")
}

fn local_path(uri: &str) -> PathBuf {
    PathBuf::from(uri.strip_prefix("file://").unwrap_or(uri))
}

fn is_shard_name(name: &str) -> bool {
    name.ends_with(".jsonl") || name.ends_with(".jsonl.zst")
}

/// One input shard, before it is read.
pub enum Located {
    Local(PathBuf),
    Remote {
        store: Arc<dyn BlobStore>,
        key: String,
    },
}

impl Located {
    /// Its URI as a worker on another machine opens it (`file://` and an absolute path for a
    /// local file).
    pub fn uri(&self) -> anyhow::Result<String> {
        Ok(match self {
            Located::Local(p) => format!("file://{}", std::path::absolute(p)?.display()),
            Located::Remote { store, key } => store.uri(key),
        })
    }

    pub async fn read(&self) -> anyhow::Result<Bytes> {
        match self {
            Located::Local(p) => Ok(tokio::fs::read(p)
                .await
                .with_context(|| format!("reading {}", p.display()))?
                .into()),
            Located::Remote { store, key } => store
                .get(key)
                .await
                .with_context(|| format!("reading {}", store.uri(key))),
        }
    }
}

/// Each URI is a shard, or a directory/prefix whose `*.jsonl[.zst]` shards are taken in key
/// order: the input order of a pack job, wherever it runs.
pub async fn locate_inputs(uris: &[String], s3: &S3Config) -> anyhow::Result<Vec<Located>> {
    let mut out = Vec::new();
    for uri in uris {
        if !is_remote(uri) {
            let p = local_path(uri);
            if p.is_dir() {
                let mut files = Vec::new();
                let mut stack = vec![p.clone()];
                while let Some(d) = stack.pop() {
                    for e in
                        std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))?
                    {
                        let path = e?.path();
                        if path.is_dir() {
                            stack.push(path);
                        } else if path
                            .file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(is_shard_name)
                        {
                            files.push(path);
                        }
                    }
                }
                files.sort();
                anyhow::ensure!(
                    !files.is_empty(),
                    "no *.jsonl or *.jsonl.zst shards under {}",
                    p.display()
                );
                out.extend(files.into_iter().map(Located::Local));
            } else {
                anyhow::ensure!(p.is_file(), "input {} does not exist", p.display());
                out.push(Located::Local(p));
            }
            continue;
        }
        let store = blob::open(uri, s3)
            .await
            .with_context(|| format!("opening {uri}"))?;
        let keys: Vec<String> = store
            .list("")
            .await?
            .into_iter()
            .map(|m| m.key)
            .filter(|k| is_shard_name(k))
            .collect();
        if !keys.is_empty() {
            out.extend(keys.into_iter().map(|key| Located::Remote {
                store: store.clone(),
                key,
            }));
        } else {
            // A single object: open its parent and read it by name.
            let (parent, name) = uri
                .rsplit_once('/')
                .with_context(|| format!("`{uri}` names no object"))?;
            out.push(Located::Remote {
                store: blob::open(parent, s3).await?,
                key: name.to_string(),
            });
        }
    }
    Ok(out)
}

/// [`locate_inputs`], remote shards read into memory; local ones are streamed from disk.
pub async fn resolve_inputs(uris: &[String], s3: &S3Config) -> anyhow::Result<Vec<Input>> {
    let mut out = Vec::new();
    for l in locate_inputs(uris, s3).await? {
        out.push(match l {
            Located::Local(p) => Input::Path(p),
            remote => Input::Bytes {
                name: remote.uri()?,
                data: remote.read().await?.into(),
            },
        });
    }
    Ok(out)
}

/// Bytes of a `tokenizer.json` from a local path, a storage URI or a Hugging Face Hub model
/// id (through the Hugging Face cache, see [`davinci_tokenize::locate`]).
pub async fn read_tokenizer(uri: &str, s3: &S3Config) -> anyhow::Result<Vec<u8>> {
    if !is_remote(uri) {
        let name = uri.to_string();
        let p = tokio::task::spawn_blocking(move || davinci_tokenize::locate(&name)).await??;
        return std::fs::read(&p).with_context(|| format!("reading tokenizer {}", p.display()));
    }
    let (parent, name) = uri
        .rsplit_once('/')
        .with_context(|| format!("`{uri}` names no object"))?;
    let store = blob::open(parent, s3).await?;
    Ok(store
        .get(name)
        .await
        .with_context(|| format!("reading tokenizer {uri}"))?
        .to_vec())
}

/// Where a job writes: the output directory itself, or a staging directory to upload.
pub enum OutputDir {
    Local(PathBuf),
    Staged { dir: tempfile::TempDir, uri: String },
}

impl OutputDir {
    pub fn new(uri: &str) -> anyhow::Result<Self> {
        if is_remote(uri) {
            Ok(OutputDir::Staged {
                dir: tempfile::tempdir()?,
                uri: uri.to_string(),
            })
        } else {
            Ok(OutputDir::Local(local_path(uri)))
        }
    }

    /// Where trainers find the shards: the output URI, not the staging directory.
    pub fn data_root(&self) -> Option<String> {
        match self {
            OutputDir::Local(_) => None,
            OutputDir::Staged { uri, .. } => Some(uri.trim_end_matches('/').to_string()),
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            OutputDir::Local(p) => p,
            OutputDir::Staged { dir, .. } => dir.path(),
        }
    }

    /// Uploads a staged directory (manifest last); nothing to do for a local one.
    pub async fn publish(self, s3: &S3Config) -> anyhow::Result<()> {
        let OutputDir::Staged { dir, uri } = self else {
            return Ok(());
        };
        let store = blob::open(&uri, s3).await?;
        let mut files = Vec::new();
        let mut stack = vec![dir.path().to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d)? {
                let p = e?.path();
                if p.is_dir() {
                    stack.push(p)
                } else {
                    files.push(p)
                }
            }
        }
        files.sort_by_key(|p| {
            (
                p.file_name().is_some_and(|n| n == "manifest.json"),
                p.clone(),
            )
        });
        for f in files {
            let key = f
                .strip_prefix(dir.path())?
                .to_string_lossy()
                .replace('\\', "/");
            let data = std::fs::read(&f)?;
            store
                .put(&key, data.into())
                .await
                .with_context(|| format!("uploading {}", store.uri(&key)))?;
        }
        Ok(())
    }
}
