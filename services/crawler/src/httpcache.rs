//! Conditional-request validators (ETags) with the bodies they validate, shareable by every
//! crawler replica: a page one replica fetched costs the others a `304`, which GitHub does not
//! count against the rate limit.
//!
//! Entries are keyed by the SHA-256 of the request URL alone (no token), so replicas with
//! different tokens share them. A cache that cannot be read or written is a miss with a warning,
//! never a failed request.
use anyhow::{Context, Result};
use async_trait::async_trait;
use bytes::Bytes;
use davinci_runtime::blob::{BlobError, BlobStore};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The last `200` answer to a GET.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cached {
    /// The request URL (checked on read: a key collision is a miss).
    pub url: String,
    pub etag: String,
    pub body: Value,
    /// `Link: rel="next"` of that answer (a `304` may leave it out).
    #[serde(default)]
    pub next: Option<String>,
}

#[async_trait]
pub trait ResponseCache: Send + Sync + std::fmt::Debug {
    async fn get(&self, url: &str) -> Result<Option<Cached>>;
    async fn put(&self, entry: &Cached) -> Result<()>;
}

/// The entry name for `url`: hex SHA-256 of the URL.
pub fn cache_key(url: &str) -> String {
    davinci_core::hash::sha256_hex(url.as_bytes())
}

/// One process's cache (the default).
#[derive(Debug, Default)]
pub struct MemoryCache(Mutex<HashMap<String, Cached>>);

#[async_trait]
impl ResponseCache for MemoryCache {
    async fn get(&self, url: &str) -> Result<Option<Cached>> {
        Ok(self.0.lock().expect("cache lock").get(url).cloned())
    }
    async fn put(&self, entry: &Cached) -> Result<()> {
        self.0
            .lock()
            .expect("cache lock")
            .insert(entry.url.clone(), entry.clone());
        Ok(())
    }
}

/// Entries as `cache/github/{sha256(url)}.json` in a blob store (DESIGN §3 keeps caches under
/// `cache/`), shared by every process that opens the same store.
#[derive(Debug, Clone)]
pub struct BlobCache {
    store: Arc<dyn BlobStore>,
}

impl BlobCache {
    pub const PREFIX: &'static str = "cache/github/";

    pub fn new(store: Arc<dyn BlobStore>) -> Self {
        Self { store }
    }

    pub fn key(url: &str) -> String {
        format!("{}{}.json", Self::PREFIX, cache_key(url))
    }
}

#[async_trait]
impl ResponseCache for BlobCache {
    async fn get(&self, url: &str) -> Result<Option<Cached>> {
        let key = Self::key(url);
        match self.store.get(&key).await {
            Ok(b) => {
                let c: Cached = serde_json::from_slice(&b)
                    .with_context(|| format!("cache entry {key} is not valid JSON"))?;
                Ok((c.url == url).then_some(c))
            }
            Err(BlobError::NotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
    async fn put(&self, entry: &Cached) -> Result<()> {
        let json = serde_json::to_vec(entry)?;
        self.store
            .put(&Self::key(&entry.url), Bytes::from(json))
            .await?;
        Ok(())
    }
}

/// Entries as Redis strings `{prefix}:{sha256(url)}` that expire after `ttl_s` seconds (an
/// expired entry only costs one full request).
#[derive(Clone)]
pub struct RedisCache {
    conn: redis::aio::ConnectionManager,
    prefix: String,
    ttl_s: u64,
}

impl std::fmt::Debug for RedisCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCache")
            .field("prefix", &self.prefix)
            .field("ttl_s", &self.ttl_s)
            .finish()
    }
}

impl RedisCache {
    pub async fn connect(url: &str, prefix: &str, ttl_s: u64) -> Result<Self> {
        let client =
            redis::Client::open(url).map_err(|e| anyhow::anyhow!("redis URL `{url}`: {e}"))?;
        let conn = redis::aio::ConnectionManager::new(client)
            .await
            .map_err(|e| anyhow::anyhow!("connecting to redis: {e}"))?;
        Ok(Self {
            conn,
            prefix: prefix.to_string(),
            ttl_s: ttl_s.max(1),
        })
    }

    fn key(&self, url: &str) -> String {
        format!("{}:{}", self.prefix, cache_key(url))
    }
}

#[async_trait]
impl ResponseCache for RedisCache {
    async fn get(&self, url: &str) -> Result<Option<Cached>> {
        let mut conn = self.conn.clone();
        let raw: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.key(url))
            .query_async(&mut conn)
            .await
            .context("reading the GitHub response cache")?;
        let Some(raw) = raw else { return Ok(None) };
        let c: Cached = serde_json::from_slice(&raw).context("cache entry is not valid JSON")?;
        Ok((c.url == url).then_some(c))
    }
    async fn put(&self, entry: &Cached) -> Result<()> {
        let mut conn = self.conn.clone();
        let () = redis::cmd("SET")
            .arg(self.key(&entry.url))
            .arg(serde_json::to_vec(entry)?)
            .arg("EX")
            .arg(self.ttl_s)
            .query_async(&mut conn)
            .await
            .context("writing the GitHub response cache")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn blob_cache_round_trips_and_rejects_other_urls() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            davinci_runtime::blob::open(&dir.path().display().to_string(), &Default::default())
                .await
                .unwrap();
        let c = BlobCache::new(store.clone());
        let e = Cached {
            url: "https://api.github.com/repos/a/b".into(),
            etag: "\"x\"".into(),
            body: serde_json::json!({"a": 1}),
            next: None,
        };
        c.put(&e).await.unwrap();
        assert_eq!(
            BlobCache::new(store.clone()).get(&e.url).await.unwrap(),
            Some(e.clone())
        );
        assert_eq!(
            c.get("https://api.github.com/repos/a/c").await.unwrap(),
            None
        );
        // an entry whose URL is not the one asked for (a collision) is a miss
        store
            .put(
                &BlobCache::key("https://x/other"),
                Bytes::from(serde_json::to_vec(&e).unwrap()),
            )
            .await
            .unwrap();
        assert_eq!(c.get("https://x/other").await.unwrap(), None);
    }
}
