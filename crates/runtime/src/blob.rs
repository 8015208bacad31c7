//! `BlobStore`: shard and manifest storage on `file://` or `s3://`.
//!
//! Keys are `/`-separated paths relative to the store's root URI. A key with `..`, a leading
//! `/`, a NUL or an empty segment is refused before anything touches disk or network.
use async_trait::async_trait;
use bytes::Bytes;
use std::ops::Range;
use std::sync::Arc;

mod file;
mod s3;

pub use file::FileStore;
pub use s3::{ChecksumMode, S3Config, S3Store};

/// A local path or URI split into the store root and the key/prefix inside it: an existing
/// local file is its directory plus its name, anything else is a root with an empty key.
pub fn split_uri(uri: &str) -> (String, String) {
    let local = uri
        .strip_prefix("file://")
        .or(if uri.contains("://") { None } else { Some(uri) });
    if let Some(p) = local {
        let path = std::path::Path::new(p);
        if path.is_file()
            && let (Some(d), Some(n)) = (path.parent(), path.file_name())
        {
            let d = d.to_string_lossy().to_string();
            return (
                if d.is_empty() { ".".into() } else { d },
                n.to_string_lossy().to_string(),
            );
        }
    }
    (uri.to_string(), String::new())
}

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("object `{0}` not found")]
    NotFound(String),
    #[error("invalid key `{key}`: {reason}")]
    InvalidKey { key: String, reason: String },
    #[error("invalid storage URI `{uri}`: {reason}")]
    InvalidUri { uri: String, reason: String },
    #[error("storage I/O on `{key}`: {source}")]
    Io {
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("S3 {op} on `{key}`: {message}")]
    S3 {
        op: &'static str,
        key: String,
        message: String,
    },
    /// A storage setting is out of range; `field` is its config path (e.g. `s3.part_size`).
    #[error("invalid storage setting `{field}`: {reason}")]
    Config { field: String, reason: String },
}

pub type BlobResult<T> = Result<T, BlobError>;

/// What a listing returns for one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Key relative to the store root.
    pub key: String,
    pub size: u64,
}

#[async_trait]
pub trait BlobStore: Send + Sync + std::fmt::Debug {
    /// Writes the whole object; readers see either the old or the new content, never a part.
    async fn put(&self, key: &str, data: Bytes) -> BlobResult<()>;
    async fn get(&self, key: &str) -> BlobResult<Bytes>;
    /// Bytes `range` of the object (end exclusive, clamped to the object size).
    async fn get_range(&self, key: &str, range: Range<u64>) -> BlobResult<Bytes>;
    /// Size of the object, or `None` when it does not exist.
    async fn head(&self, key: &str) -> BlobResult<Option<u64>>;
    /// Every object whose key starts with `prefix`, sorted by key.
    async fn list(&self, prefix: &str) -> BlobResult<Vec<ObjectMeta>>;
    /// Removes the object; removing a missing object is not an error.
    async fn delete(&self, key: &str) -> BlobResult<()>;
    /// Full URI of `key` (for claim checks, manifests and logs).
    fn uri(&self, key: &str) -> String;
}

/// Longest key accepted (S3's limit, applied everywhere so both backends agree).
pub const MAX_KEY_BYTES: usize = 1024;

/// Prefix of the temp files `FileStore` writes before renaming; keys may not use it.
pub(crate) const TEMP_PREFIX: &str = ".davinci-tmp-";

/// Checks a key before it reaches disk or network: relative, `/`-separated, no empty, `.` or
/// `..` segment, no NUL, backslash or other control character.
pub fn validate_key(key: &str) -> BlobResult<()> {
    let bad = |reason: &str| {
        Err(BlobError::InvalidKey {
            key: key.escape_debug().to_string(),
            reason: reason.to_string(),
        })
    };
    if key.is_empty() {
        return bad("empty key");
    }
    if key.len() > MAX_KEY_BYTES {
        return bad("longer than 1024 bytes");
    }
    if key.starts_with('/') {
        return bad("absolute path (leading `/`)");
    }
    if key.contains('\\') {
        return bad("contains a backslash");
    }
    if key.chars().any(|c| c == '\0') {
        return bad("contains NUL");
    }
    if key.chars().any(char::is_control) {
        return bad("contains a control character");
    }
    for segment in key.split('/') {
        match segment {
            "" => return bad("empty path segment (`//` or trailing `/`)"),
            "." | ".." => return bad("`.` or `..` path segment"),
            s if s.starts_with(TEMP_PREFIX) => return bad("reserved temp-file name"),
            _ => {}
        }
    }
    Ok(())
}

/// Checks a listing prefix: empty (everything), a key, or a key followed by `/`.
pub fn validate_prefix(prefix: &str) -> BlobResult<()> {
    match prefix.strip_suffix('/') {
        _ if prefix.is_empty() => Ok(()),
        Some(dir) => validate_key(dir),
        None => validate_key(prefix),
    }
}

/// `uri` with a relative `file://` path (`file://./data`, `file://../data`) made absolute
/// against the current directory, so processes started elsewhere (services, workers) agree on
/// it; other URIs are returned as they are (`file://data` names a host and stays refused).
pub fn absolute_uri(uri: &str) -> BlobResult<String> {
    let cwd = std::env::current_dir().map_err(|source| BlobError::Io {
        key: "<current directory>".into(),
        source,
    })?;
    Ok(absolute_uri_in(uri, &cwd))
}

/// [`absolute_uri`] against `dir` instead of the current directory.
pub fn absolute_uri_in(uri: &str, dir: &std::path::Path) -> String {
    match uri.strip_prefix("file://") {
        Some(p) if p == "." || p == ".." || p.starts_with("./") || p.starts_with("../") => {
            let rel = p.strip_prefix("./").unwrap_or(p);
            format!("file://{}", dir.join(rel).display())
        }
        _ => uri.to_string(),
    }
}

/// Opens the store for `uri`: `file:///abs/dir`, a bare local path, or `s3://bucket/prefix`
/// (configured by `s3`).
pub async fn open(uri: &str, s3: &S3Config) -> BlobResult<Arc<dyn BlobStore>> {
    let scheme = uri.split_once("://").map(|(scheme, _)| scheme);
    match scheme {
        Some("file") | None => Ok(Arc::new(FileStore::open_uri(uri)?)),
        Some("s3") => Ok(Arc::new(S3Store::open(uri, s3).await?)),
        Some(other) => Err(BlobError::InvalidUri {
            uri: uri.to_string(),
            reason: format!("unknown scheme `{other}://` (supported: file://, s3://)"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_file_uris_become_absolute() {
        let cwd = std::env::current_dir().unwrap();
        let want = format!("file://{}", cwd.join("davinci-data").display());
        assert_eq!(absolute_uri("file://./davinci-data").unwrap(), want);
        let up = format!("file://{}", cwd.join("../d").display());
        assert_eq!(absolute_uri("file://../d").unwrap(), up);
        for same in [
            "file:///abs/dir",
            "file://localhost/abs",
            "file://data",
            "s3://b/p",
        ] {
            assert_eq!(absolute_uri(same).unwrap(), same);
        }
        assert_eq!(
            FileStore::dir_of_uri(&want).unwrap(),
            cwd.join("davinci-data")
        );
        assert!(FileStore::dir_of_uri("file://./davinci-data").is_err());
    }

    #[test]
    fn keys_are_validated() {
        for ok in [
            "a",
            "runs/r1/prs/00ab.jsonl.zst",
            "a.b/c-d_e",
            "x/.hidden",
            "a..b",
        ] {
            validate_key(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            "/abs",
            "a/../b",
            "..",
            "a/./b",
            "a//b",
            "a/",
            "a\\b",
            "a\0b",
            "a\nb",
            ".davinci-tmp-x",
            "d/.davinci-tmp-1",
        ] {
            assert!(
                matches!(validate_key(bad), Err(BlobError::InvalidKey { .. })),
                "{bad:?} accepted"
            );
        }
        assert!(validate_key(&"k".repeat(1025)).is_err());
    }

    #[test]
    fn prefixes_are_validated() {
        for ok in ["", "runs/", "runs/r1/pa", "a"] {
            validate_prefix(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["/", "../", "a//", "/a", "a/../"] {
            assert!(validate_prefix(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[tokio::test]
    async fn open_refuses_unknown_scheme() {
        let err = open("gs://bucket/x", &S3Config::default())
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("unknown scheme `gs://`"), "{msg}");
    }
}
