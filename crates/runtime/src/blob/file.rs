//! `file://` store: one file per key under a root directory.
//!
//! Writes go to a temp file in the target directory, are fsynced and then renamed over the
//! key, so a reader (or a crash) sees the old or the new content, never a torn file.
use super::{
    BlobError, BlobResult, BlobStore, ObjectMeta, TEMP_PREFIX, validate_key, validate_prefix,
};
use async_trait::async_trait;
use bytes::Bytes;
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct FileStore {
    root: PathBuf,
}

impl FileStore {
    /// A store rooted at `root` (created if missing). Relative paths are resolved against the
    /// current directory so `uri()` stays meaningful after a `chdir`.
    pub fn new(root: impl AsRef<Path>) -> BlobResult<Self> {
        let root = root.as_ref();
        let root = if root.is_absolute() {
            root.to_path_buf()
        } else {
            std::env::current_dir()
                .map_err(|source| io_err("<root>", source))?
                .join(root)
        };
        std::fs::create_dir_all(&root).map_err(|source| BlobError::Io {
            key: root.display().to_string(),
            source,
        })?;
        Ok(Self { root })
    }

    /// Parses `file:///abs/dir` (or a bare path) and opens it.
    pub fn open_uri(uri: &str) -> BlobResult<Self> {
        Self::new(Self::dir_of_uri(uri)?)
    }

    /// The directory `file:///abs/dir` (or a bare path) names, checked without touching the
    /// disk, so settings can be refused before anything starts.
    pub fn dir_of_uri(uri: &str) -> BlobResult<PathBuf> {
        let invalid = |reason: &str| BlobError::InvalidUri {
            uri: uri.to_string(),
            reason: reason.to_string(),
        };
        if !uri.contains("://") {
            if uri.is_empty() {
                return Err(invalid("empty path"));
            }
            return Ok(PathBuf::from(uri));
        }
        let url = url::Url::parse(uri).map_err(|e| invalid(&e.to_string()))?;
        if url.scheme() != "file" {
            return Err(invalid("not a file:// URI"));
        }
        if let Some(host) = url
            .host_str()
            .filter(|h| !h.is_empty() && *h != "localhost")
        {
            return Err(invalid(&format!(
                "names host `{host}`; local paths need three slashes: file:///absolute/path"
            )));
        }
        url.to_file_path()
            .map_err(|()| invalid("not an absolute local path"))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, key: &str) -> BlobResult<PathBuf> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }
}

fn io_err(key: &str, source: std::io::Error) -> BlobError {
    BlobError::Io {
        key: key.to_string(),
        source,
    }
}

/// A directory where a file is expected reads as a missing object (as on S3, where `a/b`
/// existing does not make `a` an object).
fn is_missing(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::NotFound | ErrorKind::IsADirectory | ErrorKind::NotADirectory
    )
}

async fn blocking<T: Send + 'static>(
    key: &str,
    f: impl FnOnce() -> BlobResult<T> + Send + 'static,
) -> BlobResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io_err(key, std::io::Error::other(e)))?
}

/// Writes `data` next to `path` and renames it into place.
fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().expect("key paths are under the root");
    // A concurrent delete may prune the directory between create_dir_all and the temp
    // file; retry a few times before giving up.
    let mut attempt = 0;
    let mut tmp = loop {
        std::fs::create_dir_all(dir)?;
        match tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempfile_in(dir)
        {
            Ok(tmp) => break tmp,
            Err(e) if e.kind() == ErrorKind::NotFound && attempt < 3 => attempt += 1,
            Err(e) => return Err(e),
        }
    };
    tmp.write_all(data)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    // Make the rename itself durable.
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Removes now-empty directories from `dir` up to (not including) `root`.
fn prune_empty_dirs(root: &Path, mut dir: &Path) {
    while dir != root && dir.starts_with(root) {
        if std::fs::remove_dir(dir).is_err() {
            break;
        }
        match dir.parent() {
            Some(parent) => dir = parent,
            None => break,
        }
    }
}

/// Collects regular files under `dir` whose key starts with `prefix`. Symlinks and temp
/// files are skipped so a listing never leaves the root or shows half-written objects.
fn walk(root: &Path, dir: &Path, prefix: &str, out: &mut Vec<ObjectMeta>) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if is_missing(&e) => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with(TEMP_PREFIX) {
            continue;
        }
        let path = entry.path();
        let rel = path.strip_prefix(root).expect("walk stays under the root");
        let Some(key) = rel.to_str() else { continue };
        let file_type = entry.file_type()?;
        if file_type.is_dir() {
            // Descend only where keys can still match the prefix.
            let dir_key = format!("{key}/");
            if dir_key.starts_with(prefix) || prefix.starts_with(&dir_key) {
                walk(root, &path, prefix, out)?;
            }
        } else if file_type.is_file() && key.starts_with(prefix) {
            let size = match entry.metadata() {
                Ok(m) => m.len(),
                Err(e) if is_missing(&e) => continue, // deleted while listing
                Err(e) => return Err(e),
            };
            out.push(ObjectMeta {
                key: key.to_string(),
                size,
            });
        }
    }
    Ok(())
}

#[async_trait]
impl BlobStore for FileStore {
    async fn put(&self, key: &str, data: Bytes) -> BlobResult<()> {
        let path = self.path_of(key)?;
        let owned = key.to_string();
        blocking(key, move || {
            write_atomic(&path, &data).map_err(|source| io_err(&owned, source))
        })
        .await
    }

    async fn get(&self, key: &str) -> BlobResult<Bytes> {
        let path = self.path_of(key)?;
        match tokio::fs::read(&path).await {
            Ok(data) => Ok(Bytes::from(data)),
            Err(e) if is_missing(&e) => Err(BlobError::NotFound(key.to_string())),
            Err(source) => Err(io_err(key, source)),
        }
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> BlobResult<Bytes> {
        let path = self.path_of(key)?;
        let owned = key.to_string();
        blocking(key, move || {
            let map = |e: std::io::Error| {
                if is_missing(&e) {
                    BlobError::NotFound(owned.clone())
                } else {
                    io_err(&owned, e)
                }
            };
            let mut file = std::fs::File::open(&path).map_err(map)?;
            let meta = file.metadata().map_err(map)?;
            if meta.is_dir() {
                return Err(BlobError::NotFound(owned.clone()));
            }
            let end = range.end.min(meta.len());
            if range.start >= end {
                return Ok(Bytes::new());
            }
            file.seek(SeekFrom::Start(range.start)).map_err(map)?;
            let mut buf = Vec::with_capacity((end - range.start) as usize);
            file.take(end - range.start)
                .read_to_end(&mut buf)
                .map_err(map)?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn head(&self, key: &str) -> BlobResult<Option<u64>> {
        let path = self.path_of(key)?;
        match tokio::fs::metadata(&path).await {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if is_missing(&e) => Ok(None),
            Err(source) => Err(io_err(key, source)),
        }
    }

    async fn list(&self, prefix: &str) -> BlobResult<Vec<ObjectMeta>> {
        validate_prefix(prefix)?;
        let root = self.root.clone();
        let prefix = prefix.to_string();
        blocking(&prefix.clone(), move || {
            // Start at the deepest directory the prefix names fully.
            let start = match prefix.rfind('/') {
                Some(i) => root.join(&prefix[..i]),
                None => root.clone(),
            };
            let mut out = Vec::new();
            walk(&root, &start, &prefix, &mut out).map_err(|e| io_err(&prefix, e))?;
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
        .await
    }

    async fn delete(&self, key: &str) -> BlobResult<()> {
        let path = self.path_of(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {}
            Err(e) if is_missing(&e) => return Ok(()),
            Err(source) => return Err(io_err(key, source)),
        }
        let root = self.root.clone();
        blocking(key, move || {
            if let Some(parent) = path.parent() {
                prune_empty_dirs(&root, parent);
            }
            Ok(())
        })
        .await
    }

    fn uri(&self, key: &str) -> String {
        let path = if key.is_empty() {
            self.root.clone()
        } else {
            self.root.join(key)
        };
        url::Url::from_file_path(&path)
            .map(String::from)
            .unwrap_or_else(|()| format!("file://{}", path.display()))
    }
}
