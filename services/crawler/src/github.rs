//! The GitHub API source: repository discovery, merged PR listing and per-PR metadata (body,
//! author, linked issues, reviews, comments) over REST and GraphQL, and each PR's commit and
//! file lists. Code content still comes from git; this fills in what git does not know and
//! checks what it does ([`crate::crosscheck`]).
//!
//! Politeness rules, in the order a request meets them:
//! 1. a token is picked from the pool only when the shared [`TokenBudget`] grants it a unit for
//!    the current window (else the next token; when all are spent, wait for the earliest reset);
//! 2. a cached ETag is sent as `If-None-Match`; a `304` reuses the cached body (the cache may be
//!    shared by replicas: [`crate::httpcache`]);
//! 3. every response's `x-ratelimit-remaining`/`x-ratelimit-reset` lowers the shared budget;
//! 4. `403`/`429` with `retry-after` (secondary limit) waits that long; with
//!    `x-ratelimit-remaining: 0` (primary limit) the token is spent until its reset;
//! 5. an HTML body (GitHub's abuse / "whoa there" pages) is never parsed: it is treated as a
//!    secondary limit and retried after a back-off;
//! 6. `5xx` and transport errors are retried with exponential back-off.
use crate::budget::{Acquire, TokenBudget};
use crate::httpcache::{Cached, MemoryCache, ResponseCache};
use anyhow::{Context, Result, anyhow, bail};
use davinci_core::pr::{
    Author, AuthorType, Comment, LinkedIssue, PullRequest, RepoMeta, Review, ReviewComment,
};
use regex::Regex;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct GithubConfig {
    /// REST base, `https://api.github.com` or `https://HOST/api/v3` for Enterprise Server.
    pub api_url: String,
    /// GraphQL endpoint; derived from `api_url` when `None`.
    pub graphql_url: Option<String>,
    pub user_agent: String,
    /// Requests each token may make per window, and the window (GitHub: 5000 per hour).
    pub budget_per_window: u64,
    pub window_secs: u64,
    /// GraphQL points each token may spend per window (GitHub: 5000 per hour), a budget
    /// separate from the REST requests', spent side by side with it.
    pub graphql_points_per_window: u64,
    /// Attempts per request before giving up (rate-limit waits do not count).
    pub max_attempts: u32,
    /// Back-off after an HTML abuse page or a 403/429 without `retry-after`.
    pub secondary_backoff: Duration,
    /// Longest single wait for a budget reset or `retry-after`; longer waits fail the request.
    pub max_wait: Duration,
    /// Items per page on list endpoints.
    pub per_page: u32,
}

impl Default for GithubConfig {
    fn default() -> Self {
        Self {
            api_url: "https://api.github.com".into(),
            graphql_url: None,
            user_agent: "davinci-crawler".into(),
            budget_per_window: 5000,
            window_secs: 3600,
            graphql_points_per_window: 5000,
            max_attempts: 6,
            secondary_backoff: Duration::from_secs(60),
            max_wait: Duration::from_secs(3700),
            per_page: 100,
        }
    }
}

impl GithubConfig {
    pub fn graphql_endpoint(&self) -> String {
        if let Some(g) = &self.graphql_url {
            return g.clone();
        }
        let base = self.api_url.trim_end_matches('/');
        match base.strip_suffix("/api/v3") {
            Some(host) => format!("{host}/api/graphql"),
            None => format!("{base}/graphql"),
        }
    }
}

/// What the client met on the wire (for stats and the politeness tests).
#[derive(Debug, Default)]
pub struct WireStats {
    pub requests: AtomicU64,
    pub not_modified: AtomicU64,
    pub primary_limited: AtomicU64,
    pub secondary_limited: AtomicU64,
    pub html_pages: AtomicU64,
    pub server_errors: AtomicU64,
    pub budget_waits: AtomicU64,
    /// GraphQL queries sent, and the points they cost (as the server reported in `rateLimit`,
    /// else as estimated before sending).
    pub graphql_queries: AtomicU64,
    pub graphql_points: AtomicU64,
}

impl WireStats {
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BTreeMap::from([
            ("requests", g(&self.requests)),
            ("not_modified", g(&self.not_modified)),
            ("primary_limited", g(&self.primary_limited)),
            ("secondary_limited", g(&self.secondary_limited)),
            ("html_pages", g(&self.html_pages)),
            ("server_errors", g(&self.server_errors)),
            ("budget_waits", g(&self.budget_waits)),
            ("graphql_queries", g(&self.graphql_queries)),
            ("graphql_points", g(&self.graphql_points)),
        ])
    }
}

struct Token {
    secret: String,
    /// Hash of the secret: the only name a token has outside this process.
    id: String,
}

/// The two budgets GitHub keeps per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resource {
    Rest,
    Graphql,
}

impl Token {
    /// The budget key: REST under the token's id, GraphQL points beside it.
    fn key(&self, r: Resource) -> String {
        match r {
            Resource::Rest => self.id.clone(),
            Resource::Graphql => format!("{}:graphql", self.id),
        }
    }
}

/// A REST/GraphQL client with a token pool, shared budgets, ETag cache and retries.
pub struct GithubClient {
    http: reqwest::Client,
    cfg: GithubConfig,
    tokens: Vec<Token>,
    next: AtomicU64,
    budget: Arc<dyn TokenBudget>,
    cache: Arc<dyn ResponseCache>,
    pub stats: Arc<WireStats>,
}

impl std::fmt::Debug for GithubClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GithubClient")
            .field("api_url", &self.cfg.api_url)
            .field("tokens", &self.tokens.len())
            .finish()
    }
}

/// One JSON page and the URL of the next one (`Link: <…>; rel="next"`).
#[derive(Debug, Clone)]
pub struct Page {
    pub body: Value,
    pub next: Option<String>,
}

static LINK_NEXT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r#"<([^>]+)>\s*;\s*rel="next""#).expect("valid regex"));
pub(crate) static FIXES_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)\b(?:close[sd]?|fix(?:e[sd])?|resolve[sd]?)\s*:?\s+#(\d+)\b")
        .expect("valid regex")
});

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl GithubClient {
    /// `tokens` may be empty (unauthenticated, one anonymous budget).
    pub fn new(
        cfg: GithubConfig,
        tokens: Vec<String>,
        budget: Arc<dyn TokenBudget>,
    ) -> Result<Self> {
        url::Url::parse(&cfg.api_url)
            .with_context(|| format!("bad GitHub API URL `{}`", cfg.api_url))?;
        // Served from the start (at 0), so an alert on its increase has a series to watch.
        metrics::counter!("davinci_crawler_github_budget_waits_total").increment(0);
        let http = reqwest::Client::builder()
            .user_agent(cfg.user_agent.clone())
            .timeout(Duration::from_secs(60))
            .build()
            .context("building HTTP client")?;
        let mut tokens: Vec<Token> = tokens
            .into_iter()
            .filter(|t| !t.trim().is_empty())
            .map(|t| Token {
                id: davinci_core::hash::sha256_hex(t.trim().as_bytes())[..16].to_string(),
                secret: t.trim().to_string(),
            })
            .collect();
        if tokens.is_empty() {
            tokens.push(Token {
                secret: String::new(),
                id: "anonymous".into(),
            });
        }
        Ok(Self {
            http,
            cfg,
            tokens,
            next: AtomicU64::new(0),
            budget,
            cache: Arc::new(MemoryCache::default()),
            stats: Arc::default(),
        })
    }

    /// The REST base this client talks to.
    pub fn api_url(&self) -> &str {
        &self.cfg.api_url
    }

    /// Keeps ETags and bodies in `cache` instead of this process's memory, so other replicas
    /// pointed at the same cache get `304`s for pages this one fetched.
    pub fn with_cache(mut self, cache: Arc<dyn ResponseCache>) -> Self {
        self.cache = cache;
        self
    }

    /// The client a crawler process uses: with `redis_url`, every replica draws on one budget
    /// per token and shares one ETag cache in Redis; without, both live in this process and
    /// ETags are kept in `store` under `cache/github/`.
    pub async fn pooled(
        cfg: GithubConfig,
        redis_url: Option<&str>,
        store: Arc<dyn davinci_runtime::blob::BlobStore>,
    ) -> anyhow::Result<Self> {
        use crate::budget::{MemoryBudget, RedisBudget};
        use crate::httpcache::{BlobCache, RedisCache};
        let (budget, cache): (Arc<dyn TokenBudget>, Arc<dyn ResponseCache>) = match redis_url {
            Some(url) => (
                Arc::new(RedisBudget::connect(url, "davinci:github:budget").await?),
                Arc::new(RedisCache::connect(url, "davinci:github:etag", 7 * 86_400).await?),
            ),
            None => (
                Arc::new(MemoryBudget::default()),
                Arc::new(BlobCache::new(store)),
            ),
        };
        Ok(Self::new(cfg, Self::tokens_from_env(), budget)?.with_cache(cache))
    }

    /// Tokens from `GITHUB_TOKENS` (comma-separated) or `GITHUB_TOKEN`.
    pub fn tokens_from_env() -> Vec<String> {
        std::env::var("GITHUB_TOKENS")
            .or_else(|_| std::env::var("GITHUB_TOKEN"))
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn url(&self, path_or_url: &str) -> String {
        if path_or_url.starts_with("http://") || path_or_url.starts_with("https://") {
            path_or_url.to_string()
        } else {
            format!(
                "{}/{}",
                self.cfg.api_url.trim_end_matches('/'),
                path_or_url.trim_start_matches('/')
            )
        }
    }

    /// Waits until some token has `units` of `resource` left; returns its index.
    async fn take_token(&self, resource: Resource, units: u64) -> Result<usize> {
        let limit = match resource {
            Resource::Rest => self.cfg.budget_per_window,
            Resource::Graphql => self.cfg.graphql_points_per_window,
        };
        loop {
            let start = self.next.fetch_add(1, Ordering::Relaxed) as usize;
            let mut earliest = u64::MAX;
            for k in 0..self.tokens.len() {
                let i = (start + k) % self.tokens.len();
                match self
                    .budget
                    .try_acquire(
                        &self.tokens[i].key(resource),
                        units,
                        limit,
                        self.cfg.window_secs,
                        now_secs(),
                    )
                    .await?
                {
                    Acquire::Granted => return Ok(i),
                    Acquire::Exhausted { until } => earliest = earliest.min(until),
                }
            }
            let wait = Duration::from_secs(earliest.saturating_sub(now_secs()).max(1));
            if wait > self.cfg.max_wait {
                bail!(
                    "every GitHub token is out of budget for {}s (longer than the {}s limit)",
                    wait.as_secs(),
                    self.cfg.max_wait.as_secs()
                );
            }
            self.stats.budget_waits.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("davinci_crawler_github_budget_waits_total").increment(1);
            tracing::info!(
                wait_s = wait.as_secs(),
                "all GitHub tokens spent; waiting for the window to reset"
            );
            tokio::time::sleep(wait).await;
        }
    }

    /// GET with the politeness rules; `Ok(None)` for 404.
    pub async fn get(&self, path_or_url: &str) -> Result<Option<Page>> {
        let url = self.url(path_or_url);
        self.send(&url, None, 1).await
    }

    /// POST a GraphQL query that costs one point; GraphQL-level errors are returned as an
    /// error naming them.
    pub async fn graphql(&self, query: &str, variables: Value) -> Result<Value> {
        let (data, errors) = self.graphql_partial(query, variables, 1).await?;
        if !errors.is_empty() {
            bail!("GraphQL errors: {}", error_messages(&errors));
        }
        Ok(data)
    }

    /// POST a GraphQL query whose cost is `points` (taken from the GraphQL budget before it
    /// is sent); returns `data` and the errors that came with it. `NOT_FOUND` errors leave
    /// `null` where the missing object would be, so a batch survives a PR that is gone; an
    /// answer without `data` is an error.
    pub async fn graphql_partial(
        &self,
        query: &str,
        variables: Value,
        points: u64,
    ) -> Result<(Value, Vec<Value>)> {
        let url = self.cfg.graphql_endpoint();
        let body = json!({"query": query, "variables": variables});
        let page = self
            .send(&url, Some(body), points)
            .await?
            .ok_or_else(|| anyhow!("GraphQL endpoint {url} answered 404"))?;
        let charged = page
            .body
            .pointer("/data/rateLimit/cost")
            .and_then(|c| c.as_u64())
            .unwrap_or(points);
        self.stats.graphql_queries.fetch_add(1, Ordering::Relaxed);
        self.stats
            .graphql_points
            .fetch_add(charged, Ordering::Relaxed);
        let errors = page
            .body
            .get("errors")
            .and_then(|e| e.as_array())
            .cloned()
            .unwrap_or_default();
        match page.body.get("data").filter(|d| !d.is_null()) {
            Some(d) => Ok((d.clone(), errors)),
            None if errors.is_empty() => bail!("GraphQL answer without `data`"),
            None => bail!("GraphQL errors: {}", error_messages(&errors)),
        }
    }

    async fn send(&self, url: &str, post: Option<Value>, units: u64) -> Result<Option<Page>> {
        let resource = if post.is_some() {
            Resource::Graphql
        } else {
            Resource::Rest
        };
        let cached = match post {
            None => self.cache.get(url).await.unwrap_or_else(|e| {
                tracing::warn!(%url, error = %format!("{e:#}"), "GitHub response cache unreadable");
                None
            }),
            Some(_) => None,
        };
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let ti = self.take_token(resource, units).await?;
            let token = &self.tokens[ti];
            let mut req = match &post {
                Some(b) => self.http.post(url).json(b),
                None => self.http.get(url),
            };
            req = req
                .header("accept", "application/vnd.github+json")
                .header("x-github-api-version", "2022-11-28");
            if !token.secret.is_empty() {
                req = req.bearer_auth(&token.secret);
            }
            if let Some(c) = &cached {
                req = req.header("if-none-match", &c.etag);
            }
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) if attempt < self.cfg.max_attempts => {
                    tracing::warn!(%url, error = %e, "GitHub request failed; retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                    continue;
                }
                Err(e) => return Err(anyhow!("GET {url}: {e}")),
            };
            let status = resp.status().as_u16();
            let h = resp.headers().clone();
            let header = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
            let remaining = header("x-ratelimit-remaining").and_then(|v| v.parse::<u64>().ok());
            let reset = header("x-ratelimit-reset").and_then(|v| v.parse::<u64>().ok());
            if let (Some(rem), Some(reset)) = (remaining, reset) {
                // one second of margin against clock skew with the server's window
                self.budget
                    .observe(&token.key(resource), rem, reset + 1, now_secs())
                    .await?;
            }
            let retry_after = header("retry-after").and_then(|v| v.trim().parse::<u64>().ok());
            let is_html = header("content-type").is_some_and(|c| c.contains("text/html"));
            let next =
                header("link").and_then(|l| LINK_NEXT.captures(&l).map(|m| m[1].to_string()));
            let body = resp
                .bytes()
                .await
                .with_context(|| format!("reading body of {url}"))?;
            let looks_html = is_html
                || body
                    .iter()
                    .find(|b| !b.is_ascii_whitespace())
                    .is_some_and(|b| *b == b'<');
            if looks_html {
                // an abuse / rate-limit page: never data
                self.stats.html_pages.fetch_add(1, Ordering::Relaxed);
                let wait = retry_after
                    .map(Duration::from_secs)
                    .unwrap_or(self.cfg.secondary_backoff);
                self.wait_or_fail(url, wait, "an HTML page instead of JSON")?;
                tokio::time::sleep(wait).await;
                continue;
            }
            match status {
                200..=299 => {
                    let v: Value = serde_json::from_slice(&body)
                        .with_context(|| format!("{url} did not answer JSON"))?;
                    if post.is_none()
                        && let Some(etag) = header("etag")
                    {
                        let entry = Cached {
                            url: url.to_string(),
                            etag,
                            body: v.clone(),
                            next: next.clone(),
                        };
                        if let Err(e) = self.cache.put(&entry).await {
                            tracing::warn!(%url, error = %format!("{e:#}"), "GitHub response cache unwritable");
                        }
                    }
                    return Ok(Some(Page { body: v, next }));
                }
                304 => {
                    self.stats.not_modified.fetch_add(1, Ordering::Relaxed);
                    let c = cached.ok_or_else(|| anyhow!("{url}: 304 without a cached body"))?;
                    return Ok(Some(Page {
                        body: c.body,
                        next: next.or(c.next),
                    }));
                }
                404 => return Ok(None),
                403 | 429 => {
                    if let Some(secs) = retry_after {
                        self.stats.secondary_limited.fetch_add(1, Ordering::Relaxed);
                        let wait = Duration::from_secs(secs.max(1));
                        self.wait_or_fail(url, wait, "a secondary rate limit")?;
                        tokio::time::sleep(wait).await;
                    } else if remaining == Some(0) {
                        // primary limit: the budget now holds 0 for this token until reset
                        self.stats.primary_limited.fetch_add(1, Ordering::Relaxed);
                    } else if status == 429 || attempt < self.cfg.max_attempts {
                        self.stats.secondary_limited.fetch_add(1, Ordering::Relaxed);
                        self.wait_or_fail(
                            url,
                            self.cfg.secondary_backoff,
                            "a rate limit without retry-after",
                        )?;
                        tokio::time::sleep(self.cfg.secondary_backoff).await;
                    } else {
                        bail!(
                            "{url}: 403 {}",
                            String::from_utf8_lossy(&body[..body.len().min(300)])
                        );
                    }
                    continue;
                }
                500..=599 if attempt < self.cfg.max_attempts => {
                    self.stats.server_errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(backoff(attempt)).await;
                    continue;
                }
                s => bail!(
                    "{url}: HTTP {s}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(300)])
                ),
            }
        }
    }

    fn wait_or_fail(&self, url: &str, wait: Duration, why: &str) -> Result<()> {
        if wait > self.cfg.max_wait {
            bail!(
                "{url}: {why} asks for a {}s wait, over the {}s limit",
                wait.as_secs(),
                self.cfg.max_wait.as_secs()
            );
        }
        Ok(())
    }

    /// Every item of a paginated list endpoint (follows `Link: rel="next"`), up to `max` items
    /// (0: all).
    pub async fn get_all(&self, path: &str, max: usize) -> Result<Vec<Value>> {
        let mut out = Vec::new();
        let mut next = Some(self.url(path));
        while let Some(u) = next.take() {
            let Some(page) = self.get(&u).await? else {
                break;
            };
            let items = match page.body {
                Value::Array(a) => a,
                Value::Object(mut o) => match o.remove("items") {
                    Some(Value::Array(a)) => a,
                    _ => bail!("{u}: expected a list"),
                },
                _ => bail!("{u}: expected a list"),
            };
            out.extend(items);
            if max > 0 && out.len() >= max {
                out.truncate(max);
                break;
            }
            next = page.next;
        }
        Ok(out)
    }

    /// Repository metadata (`GET /repos/{owner}/{name}`).
    pub async fn repo_meta(&self, full_name: &str) -> Result<Option<RepoMeta>> {
        Ok(self
            .get(&format!("repos/{full_name}"))
            .await?
            .map(|p| repo_meta_from(&p.body)))
    }

    /// Repository discovery through the search API: stars ≥ `min_stars`, not archived, sorted
    /// by stars; then a license allow-list; the top `top_n`. With several languages, one search
    /// each, merged by stars.
    pub async fn discover(&self, q: &Discovery) -> Result<Vec<RepoMeta>> {
        if q.languages.len() <= 1 {
            return self.search_repos(q, q.languages.first()).await;
        }
        let mut all: Vec<RepoMeta> = Vec::new();
        for l in &q.languages {
            for r in self.search_repos(q, Some(l)).await? {
                if !all.iter().any(|a| a.full_name == r.full_name) {
                    all.push(r);
                }
            }
        }
        all.sort_by_key(|r| std::cmp::Reverse(r.stars.unwrap_or(0)));
        if q.top_n > 0 {
            all.truncate(q.top_n);
        }
        Ok(all)
    }

    async fn search_repos(
        &self,
        q: &Discovery,
        language: Option<&String>,
    ) -> Result<Vec<RepoMeta>> {
        let mut query = format!("stars:>={} archived:false", q.min_stars);
        if let Some(l) = language {
            query.push_str(&format!(" language:{l}"));
        }
        let mut u = url::Url::parse(&self.url("search/repositories"))?;
        u.query_pairs_mut()
            .append_pair("q", &query)
            .append_pair("sort", "stars")
            .append_pair("order", "desc")
            .append_pair("per_page", &self.cfg.per_page.to_string());
        let allow: BTreeSet<String> = q
            .license_allow
            .iter()
            .map(|l| l.to_ascii_lowercase())
            .collect();
        let mut out = Vec::new();
        let mut next = Some(u.to_string());
        while let Some(url) = next.take() {
            let Some(page) = self.get(&url).await? else {
                break;
            };
            for item in page
                .body
                .get("items")
                .and_then(|i| i.as_array())
                .into_iter()
                .flatten()
            {
                let meta = repo_meta_from(item);
                if meta.archived || meta.stars.unwrap_or(0) < q.min_stars {
                    continue;
                }
                if !allow.is_empty()
                    && !meta
                        .license
                        .as_ref()
                        .is_some_and(|l| allow.contains(&l.to_ascii_lowercase()))
                {
                    continue;
                }
                out.push(meta);
                if q.top_n > 0 && out.len() >= q.top_n {
                    return Ok(out);
                }
            }
            next = page.next;
        }
        Ok(out)
    }

    /// Merged PRs of a repository (closed PRs with `merged_at`), newest first, up to `max`.
    pub async fn merged_pulls(&self, full_name: &str, max: usize) -> Result<Vec<MergedPull>> {
        let path = format!(
            "repos/{full_name}/pulls?state=closed&sort=updated&direction=desc&per_page={}",
            self.cfg.per_page
        );
        let mut out = Vec::new();
        let mut next = Some(self.url(&path));
        while let Some(u) = next.take() {
            let Some(page) = self.get(&u).await? else {
                break;
            };
            for p in page.body.as_array().into_iter().flatten() {
                if p.get("merged_at").and_then(|m| m.as_str()).is_none() {
                    continue;
                }
                out.push(MergedPull {
                    number: p.get("number").and_then(|n| n.as_u64()).unwrap_or(0),
                    merge_commit_sha: str_of(p, "merge_commit_sha"),
                    merged_at: str_of(p, "merged_at"),
                    author: author_from(p.get("user"), p.get("author_association")),
                });
                if max > 0 && out.len() >= max {
                    return Ok(out);
                }
            }
            next = page.next;
        }
        Ok(out)
    }

    /// Fills `pr` with what the API knows: title, body, author and association, timestamps,
    /// labels, linked issues (closing references + "fixes #N" text), reviews with their
    /// comments, conversation comments. One GraphQL query when it works, REST otherwise.
    /// `Ok(false)` when the API does not know the PR.
    pub async fn enrich(&self, pr: &mut PullRequest) -> Result<bool> {
        let full = pr.repo.full_name.clone();
        let Some(p) = self
            .get(&format!("repos/{full}/pulls/{}", pr.number))
            .await?
        else {
            return Ok(false);
        };
        let b = &p.body;
        if let Some(t) = b.get("title").and_then(|t| t.as_str()) {
            pr.title = t.to_string();
        }
        pr.body = str_of(b, "body");
        pr.author = author_from(b.get("user"), b.get("author_association"));
        pr.created_at = b
            .get("created_at")
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .or(pr.created_at.take());
        pr.merged_at = b
            .get("merged_at")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        pr.labels = b
            .get("labels")
            .and_then(|l| l.as_array())
            .into_iter()
            .flatten()
            .filter_map(|l| l.get("name")?.as_str().map(str::to_string))
            .collect();
        if let Some(s) = b.pointer("/base/ref").and_then(|v| v.as_str()) {
            pr.base.name = s.to_string();
        }
        if let Some(s) = b.pointer("/head/ref").and_then(|v| v.as_str()) {
            pr.head.name = s.to_string();
        }
        let (owner, name) = full
            .split_once('/')
            .ok_or_else(|| anyhow!("bad repository name {full}"))?;
        let closing = match self
            .graphql(
                PR_QUERY,
                json!({"owner": owner, "name": name, "number": pr.number}),
            )
            .await
        {
            Ok(data) => {
                let node = data
                    .pointer("/repository/pullRequest")
                    .cloned()
                    .unwrap_or(Value::Null);
                pr.reviews = reviews_from_graphql(&node);
                pr.comments = node
                    .pointer("/comments/nodes")
                    .and_then(|n| n.as_array())
                    .into_iter()
                    .flatten()
                    .map(|c| Comment {
                        author: author_from_gql(c),
                        body: str_of(c, "body"),
                        created_at: c
                            .get("createdAt")
                            .and_then(|v| v.as_str())
                            .map(str::to_string),
                    })
                    .collect();
                node.pointer("/closingIssuesReferences/nodes")
                    .and_then(|n| n.as_array())
                    .into_iter()
                    .flatten()
                    .filter_map(|i| {
                        Some(LinkedIssue {
                            number: i.get("number")?.as_u64()?,
                            title: str_of(i, "title"),
                            body: str_of(i, "body"),
                        })
                    })
                    .collect::<Vec<_>>()
            }
            Err(e) => {
                tracing::debug!(error = %e, "GraphQL PR query failed; using REST");
                self.enrich_rest(pr).await?;
                Vec::new()
            }
        };
        pr.linked_issues = self.linked_issues(&full, &pr.body, closing).await?;
        if pr.repo.stars.is_none()
            && let Some(meta) = self.repo_meta(&full).await?
        {
            pr.repo = meta;
        }
        Ok(true)
    }

    async fn enrich_rest(&self, pr: &mut PullRequest) -> Result<()> {
        let full = pr.repo.full_name.clone();
        let n = pr.number;
        let reviews = self
            .get_all(
                &format!(
                    "repos/{full}/pulls/{n}/reviews?per_page={}",
                    self.cfg.per_page
                ),
                0,
            )
            .await?;
        let comments = self
            .get_all(
                &format!(
                    "repos/{full}/pulls/{n}/comments?per_page={}",
                    self.cfg.per_page
                ),
                0,
            )
            .await?;
        let mut by_review: BTreeMap<u64, Vec<ReviewComment>> = BTreeMap::new();
        for c in &comments {
            let rc = ReviewComment {
                path: str_of(c, "path"),
                line: c
                    .get("line")
                    .and_then(|l| l.as_u64())
                    .or_else(|| c.get("original_line").and_then(|l| l.as_u64())),
                diff_hunk: str_of(c, "diff_hunk"),
                body: str_of(c, "body"),
            };
            by_review
                .entry(
                    c.get("pull_request_review_id")
                        .and_then(|v| v.as_u64())
                        .unwrap_or(0),
                )
                .or_default()
                .push(rc);
        }
        pr.reviews = reviews
            .iter()
            .map(|r| Review {
                author: author_from(r.get("user"), r.get("author_association")),
                state: str_of(r, "state"),
                body: str_of(r, "body"),
                comments: r
                    .get("id")
                    .and_then(|i| i.as_u64())
                    .and_then(|id| by_review.remove(&id))
                    .unwrap_or_default(),
            })
            .collect();
        let issue_comments = self
            .get_all(
                &format!(
                    "repos/{full}/issues/{n}/comments?per_page={}",
                    self.cfg.per_page
                ),
                0,
            )
            .await?;
        pr.comments = issue_comments
            .iter()
            .map(|c| Comment {
                author: author_from(c.get("user"), c.get("author_association")),
                body: str_of(c, "body"),
                created_at: c
                    .get("created_at")
                    .and_then(|v| v.as_str())
                    .map(str::to_string),
            })
            .collect();
        Ok(())
    }

    /// The PR's commits and changed files as the API lists them (both paginated; GitHub lists
    /// at most 250 commits and 3000 files). Files come from REST because GraphQL's changed-file
    /// nodes have no previous path for renames.
    pub async fn pull_changes(&self, full_name: &str, number: u64) -> Result<PullChanges> {
        let commits = self.pull_commits(full_name, number).await?;
        let per = self.cfg.per_page;
        let files = self
            .get_all(
                &format!("repos/{full_name}/pulls/{number}/files?per_page={per}"),
                0,
            )
            .await?
            .iter()
            .map(|f| ApiFile {
                path: str_of(f, "filename"),
                previous_path: f
                    .get("previous_filename")
                    .and_then(|p| p.as_str())
                    .map(str::to_string),
                status: str_of(f, "status"),
                additions: f.get("additions").and_then(|n| n.as_u64()).unwrap_or(0),
                deletions: f.get("deletions").and_then(|n| n.as_u64()).unwrap_or(0),
            })
            .collect();
        Ok(PullChanges { commits, files })
    }

    /// The PR's commits, oldest first (`GET /repos/{o}/{r}/pulls/{n}/commits`, paginated).
    pub async fn pull_commits(&self, full_name: &str, number: u64) -> Result<Vec<ApiCommit>> {
        let per = self.cfg.per_page;
        Ok(self
            .get_all(
                &format!("repos/{full_name}/pulls/{number}/commits?per_page={per}"),
                0,
            )
            .await?
            .iter()
            .map(|c| ApiCommit {
                sha: str_of(c, "sha"),
                message: c
                    .pointer("/commit/message")
                    .and_then(|m| m.as_str())
                    .unwrap_or_default()
                    .to_string(),
                // `author` is the GitHub account; null when the email belongs to none
                account: c
                    .get("author")
                    .filter(|a| a.get("login").is_some())
                    .map(|a| author_from(Some(a), None)),
            })
            .collect())
    }

    /// Whether the API says PR `number` was merged, and if so where it landed (merge commit,
    /// head) and its commits' subjects: what finds a PR in history when no commit message
    /// names it (rebase merges, edited squash subjects).
    pub async fn pull_state(&self, full_name: &str, number: u64) -> Result<PullState> {
        let Some(p) = self
            .get(&format!("repos/{full_name}/pulls/{number}"))
            .await?
        else {
            return Ok(PullState::Unknown);
        };
        let b = &p.body;
        let Some(merged_at) = b.get("merged_at").and_then(|m| m.as_str()) else {
            return Ok(PullState::NotMerged);
        };
        let commits = self.pull_commits(full_name, number).await?;
        Ok(PullState::Merged(ApiPull {
            number,
            merge_commit_sha: str_of(b, "merge_commit_sha"),
            head_ref: b
                .pointer("/head/ref")
                .and_then(|v| v.as_str())
                .map(str::to_string),
            title: str_of(b, "title"),
            body: str_of(b, "body"),
            merged_at: merged_at.to_string(),
            commit_subjects: commits
                .iter()
                .map(|c| c.message.lines().next().unwrap_or_default().to_string())
                .collect(),
        }))
    }

    /// Closing references plus `fixes #N`-style references in the body, each issue fetched once
    /// (REST) when its title is not known yet; references to PRs or missing issues are skipped.
    async fn linked_issues(
        &self,
        full: &str,
        body: &str,
        mut found: Vec<LinkedIssue>,
    ) -> Result<Vec<LinkedIssue>> {
        let known: BTreeSet<u64> = found.iter().map(|i| i.number).collect();
        let mut wanted: Vec<u64> = Vec::new();
        for m in FIXES_RE.captures_iter(body) {
            if let Ok(n) = m[1].parse::<u64>()
                && !known.contains(&n)
                && !wanted.contains(&n)
            {
                wanted.push(n);
            }
        }
        for n in wanted {
            if let Some(p) = self.get(&format!("repos/{full}/issues/{n}")).await?
                && p.body.get("pull_request").is_none()
            {
                found.push(LinkedIssue {
                    number: n,
                    title: str_of(&p.body, "title"),
                    body: str_of(&p.body, "body"),
                });
            }
        }
        Ok(found)
    }
}

/// The one GraphQL query per PR: reviews with their comments, conversation comments and
/// closing issue references (REST would need three or more paginated calls).
pub const PR_QUERY: &str = r#"query($owner: String!, $name: String!, $number: Int!) {
  repository(owner: $owner, name: $name) {
    pullRequest(number: $number) {
      closingIssuesReferences(first: 10) { nodes { number title body } }
      comments(first: 100) { nodes { author { login __typename } authorAssociation body createdAt } }
      reviews(first: 50) { nodes { author { login __typename } authorAssociation state body
        comments(first: 50) { nodes { path line originalLine diffHunk body } } } }
    }
  }
}"#;

/// Discovery query (DESIGN: top starred; python subset: Python, ≥ 5 stars, not archived).
#[derive(Debug, Clone, Default)]
pub struct Discovery {
    /// Any of these languages (none: every language).
    pub languages: Vec<String>,
    pub min_stars: u64,
    pub license_allow: Vec<String>,
    pub top_n: usize,
}

/// One commit of a PR as `GET /repos/{o}/{r}/pulls/{n}/commits` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiCommit {
    pub sha: String,
    pub message: String,
    /// The author's GitHub account; `None` when the commit email belongs to none.
    pub account: Option<Author>,
}

/// One file of a PR's net change as `GET /repos/{o}/{r}/pulls/{n}/files` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiFile {
    pub path: String,
    /// The old path of a rename.
    pub previous_path: Option<String>,
    /// `added`, `removed`, `modified`, `renamed`, `copied`, `changed`, `unchanged`.
    pub status: String,
    pub additions: u64,
    pub deletions: u64,
}

/// A PR's commits and files from the API.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PullChanges {
    pub commits: Vec<ApiCommit>,
    pub files: Vec<ApiFile>,
}

/// A merged PR as the API describes where it landed.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiPull {
    pub number: u64,
    pub merge_commit_sha: String,
    pub head_ref: Option<String>,
    pub title: String,
    pub body: String,
    pub merged_at: String,
    /// First lines of the PR's commit messages, oldest first.
    pub commit_subjects: Vec<String>,
}

/// What the API says of a PR number.
#[derive(Debug, Clone, PartialEq)]
pub enum PullState {
    Merged(ApiPull),
    NotMerged,
    /// No such PR (or not visible to these tokens).
    Unknown,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MergedPull {
    pub number: u64,
    pub merge_commit_sha: String,
    pub merged_at: String,
    pub author: Author,
}

/// The messages of GraphQL errors, joined.
fn error_messages(errors: &[Value]) -> String {
    errors
        .iter()
        .filter_map(|e| e.get("message").and_then(|m| m.as_str()))
        .collect::<Vec<_>>()
        .join("; ")
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(200u64.saturating_mul(1 << attempt.min(8)))
}

pub(crate) fn str_of(v: &Value, k: &str) -> String {
    v.get(k)
        .and_then(|x| x.as_str())
        .unwrap_or_default()
        .to_string()
}

pub fn repo_meta_from(v: &Value) -> RepoMeta {
    RepoMeta {
        full_name: str_of(v, "full_name"),
        stars: v.get("stargazers_count").and_then(|s| s.as_u64()),
        language: v
            .get("language")
            .and_then(|s| s.as_str())
            .map(str::to_string),
        license: v
            .pointer("/license/spdx_id")
            .or_else(|| v.pointer("/license/key"))
            .and_then(|s| s.as_str())
            .map(str::to_string),
        archived: v.get("archived").and_then(|a| a.as_bool()).unwrap_or(false),
    }
}

fn author_from(user: Option<&Value>, assoc: Option<&Value>) -> Author {
    let login = user
        .and_then(|u| u.get("login"))
        .and_then(|l| l.as_str())
        .unwrap_or("ghost")
        .to_string();
    let is_bot = user.and_then(|u| u.get("type")).and_then(|t| t.as_str()) == Some("Bot")
        || login.ends_with("[bot]");
    Author {
        login,
        kind: if is_bot {
            AuthorType::Bot
        } else {
            AuthorType::User
        },
        association: assoc.and_then(|a| a.as_str()).map(str::to_string),
    }
}

pub(crate) fn author_from_gql(node: &Value) -> Author {
    let login = node
        .pointer("/author/login")
        .and_then(|l| l.as_str())
        .unwrap_or("ghost")
        .to_string();
    let is_bot = node.pointer("/author/__typename").and_then(|t| t.as_str()) == Some("Bot")
        || login.ends_with("[bot]");
    Author {
        login,
        kind: if is_bot {
            AuthorType::Bot
        } else {
            AuthorType::User
        },
        association: node
            .get("authorAssociation")
            .and_then(|a| a.as_str())
            .map(str::to_string),
    }
}

pub(crate) fn reviews_from_graphql(node: &Value) -> Vec<Review> {
    node.pointer("/reviews/nodes")
        .and_then(|n| n.as_array())
        .into_iter()
        .flatten()
        .map(|r| Review {
            author: author_from_gql(r),
            state: str_of(r, "state"),
            body: str_of(r, "body"),
            comments: r
                .pointer("/comments/nodes")
                .and_then(|n| n.as_array())
                .into_iter()
                .flatten()
                .map(|c| ReviewComment {
                    path: str_of(c, "path"),
                    line: c
                        .get("line")
                        .and_then(|l| l.as_u64())
                        .or_else(|| c.get("originalLine").and_then(|l| l.as_u64())),
                    diff_hunk: str_of(c, "diffHunk"),
                    body: str_of(c, "body"),
                })
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graphql_endpoint_follows_the_rest_base() {
        let mut c = GithubConfig::default();
        assert_eq!(c.graphql_endpoint(), "https://api.github.com/graphql");
        c.api_url = "https://ghe.example.com/api/v3/".into();
        assert_eq!(c.graphql_endpoint(), "https://ghe.example.com/api/graphql");
    }

    #[test]
    fn fixes_references_are_found() {
        let refs: Vec<_> = FIXES_RE
            .captures_iter("Fixes #12, closes: #3 and resolved #40. See #7.")
            .map(|m| m[1].to_string())
            .collect();
        assert_eq!(refs, ["12", "3", "40"]);
    }
}
