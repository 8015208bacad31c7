//! Chat models over the OpenAI-compatible HTTP API (`POST {base}/chat/completions`), as served
//! by vLLM, SGLang and hosted providers.
//!
//! - [`ChatClient`]: concurrency limit, per-request timeout, retries with exponential backoff on
//!   429, 5xx, timeouts and connection errors (`Retry-After` honoured, capped).
//! - [`ResponseCache`] / [`DirCache`]: responses keyed by the SHA-256 of the canonical request,
//!   so a re-run costs no calls. The reconstructor stores them under `cache/llm/{sha256}.json`.
//! - [`check_output`]: model output is untrusted; empty, refusing, garbage or over-long answers
//!   are rejected so callers fall back to deterministic text.
//! - [`tools`]: tool calling (`tools` / `tool_calls`, streamed or not) with a fallback for calls
//!   written as text (Hermes, GLM-4.5).
//!
//! One [`ChatClient`] per endpoint: its clones share the endpoint's concurrency limit.
pub mod tools;

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
pub use tools::{CallSource, ChatMessage, FunctionCall, ToolCall, ToolRequest, Turn};

/// Endpoint settings. The API key is read from the environment variable `api_key_env` so it is
/// never part of a config file or run record.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChatConfig {
    /// e.g. `http://vllm:8000/v1`; `/chat/completions` is appended.
    pub base_url: String,
    pub model: String,
    pub api_key_env: String,
    pub max_concurrency: usize,
    pub timeout_secs: f64,
    pub max_retries: u32,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    pub temperature: f32,
    pub max_tokens: u32,
    /// Nucleus sampling; left to the server when unset.
    pub top_p: Option<f32>,
    /// Sampling seed (vLLM and SGLang honour it per request).
    pub seed: Option<u64>,
    /// Stream tool-calling answers (SSE) and assemble them here.
    pub stream: bool,
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            base_url: String::new(),
            model: String::new(),
            api_key_env: "OPENAI_API_KEY".into(),
            max_concurrency: 16,
            timeout_secs: 120.0,
            max_retries: 5,
            backoff_initial_ms: 500,
            backoff_max_ms: 30_000,
            temperature: 0.0,
            max_tokens: 1024,
            top_p: None,
            seed: None,
            stream: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn system(s: impl Into<String>) -> Self {
        Self {
            role: "system".into(),
            content: s.into(),
        }
    }
    pub fn user(s: impl Into<String>) -> Self {
        Self {
            role: "user".into(),
            content: s.into(),
        }
    }
}

/// The request body. Field order is fixed, so its JSON is canonical and hashes stably.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    pub temperature: f32,
    pub max_tokens: u32,
}

impl ChatRequest {
    /// SHA-256 (hex) of the canonical request JSON plus a caller tag (e.g. prompt version).
    pub fn cache_key(&self, tag: &str) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(tag.as_bytes());
        h.update([0u8]);
        h.update(serde_json::to_vec(self).expect("request serialises"));
        hex::encode(h.finalize())
    }
}

/// The parts of a `chat.completion` we read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletion {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub model: String,
    pub choices: Vec<Choice>,
    #[serde(default)]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    #[serde(default)]
    pub index: u32,
    pub message: ResponseMessage,
    #[serde(default)]
    pub finish_reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseMessage {
    #[serde(default)]
    pub role: String,
    #[serde(default)]
    pub content: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
}

impl ChatCompletion {
    /// The first choice's text, if any.
    pub fn text(&self) -> Option<&str> {
        self.choices.first()?.message.content.as_deref()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("LLM endpoint not configured (base_url and model are required)")]
    NotConfigured,
    #[error("LLM HTTP {status} after {attempts} attempt(s): {body}")]
    Status {
        status: u16,
        attempts: u32,
        body: String,
    },
    #[error("LLM transport error after {attempts} attempt(s): {message}")]
    Transport { attempts: u32, message: String },
    #[error("LLM reply is not a chat.completion: {0}")]
    BadResponse(String),
    #[error("LLM cache: {0}")]
    Cache(String),
}

impl LlmError {
    /// The server refused the prompt as longer than the model's context (vLLM: 400 "This
    /// model's maximum context length is N tokens"; OpenAI: `context_length_exceeded`).
    pub fn is_context_overflow(&self) -> bool {
        match self {
            LlmError::Status { status, body, .. } if *status == 400 || *status == 413 => {
                let b = body.to_ascii_lowercase();
                b.contains("context length")
                    || b.contains("context_length_exceeded")
                    || b.contains("maximum context")
                    || b.contains("prompt is too long")
            }
            _ => false,
        }
    }
}

/// `null` reads as the default (servers send `"tool_calls": null`).
pub(crate) fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Why reading a 2xx answer failed: worth another attempt or not.
#[derive(Debug)]
pub(crate) enum ReadError {
    Transient(String),
    Fatal(LlmError),
}

impl ReadError {
    pub(crate) fn from_reqwest(e: reqwest::Error) -> Self {
        if e.is_timeout() || e.is_body() || e.is_decode() {
            ReadError::Transient(e.to_string())
        } else {
            ReadError::Fatal(LlmError::Transport {
                attempts: 0,
                message: e.to_string(),
            })
        }
    }
}

/// An OpenAI-compatible chat client.
#[derive(Debug, Clone)]
pub struct ChatClient {
    cfg: ChatConfig,
    http: reqwest::Client,
    url: String,
    key: Option<String>,
    slots: Arc<Semaphore>,
}

fn is_retryable(status: u16) -> bool {
    status == 429 || status == 408 || (500..600).contains(&status)
}

impl ChatClient {
    pub fn new(cfg: ChatConfig) -> Result<Self, LlmError> {
        if cfg.base_url.is_empty() || cfg.model.is_empty() {
            return Err(LlmError::NotConfigured);
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs_f64(cfg.timeout_secs.max(0.001)))
            .build()
            .map_err(|e| LlmError::Transport {
                attempts: 0,
                message: e.to_string(),
            })?;
        let url = format!("{}/chat/completions", cfg.base_url.trim_end_matches('/'));
        let key = std::env::var(&cfg.api_key_env)
            .ok()
            .filter(|k| !k.is_empty());
        Ok(Self {
            slots: Arc::new(Semaphore::new(cfg.max_concurrency.max(1))),
            cfg,
            http,
            url,
            key,
        })
    }

    pub fn config(&self) -> &ChatConfig {
        &self.cfg
    }

    /// The same endpoint with another sampling seed, sharing this client's concurrency limit
    /// (rollout `i` of a task samples with seed + i).
    pub fn with_seed(&self, seed: Option<u64>) -> ChatClient {
        let mut c = self.clone();
        c.cfg.seed = seed;
        c
    }

    /// A request for this client's model with its sampling settings.
    pub fn request(&self, messages: Vec<Message>) -> ChatRequest {
        ChatRequest {
            model: self.cfg.model.clone(),
            messages,
            temperature: self.cfg.temperature,
            max_tokens: self.cfg.max_tokens,
        }
    }

    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let max = Duration::from_millis(self.cfg.backoff_max_ms);
        let exp = Duration::from_millis(
            self.cfg
                .backoff_initial_ms
                .saturating_mul(1u64 << attempt.min(20)),
        );
        retry_after.unwrap_or(exp).min(max)
    }

    /// Sends `req`, retrying transient failures; holds one concurrency slot meanwhile.
    pub async fn complete(&self, req: &ChatRequest) -> Result<ChatCompletion, LlmError> {
        let (c, _) = self
            .post(req, |resp| async move {
                let body = resp.text().await.map_err(ReadError::from_reqwest)?;
                serde_json::from_str::<ChatCompletion>(&body).map_err(|e| {
                    ReadError::Fatal(LlmError::BadResponse(format!(
                        "{e}; body starts {:?}",
                        head(&body)
                    )))
                })
            })
            .await?;
        Ok(c)
    }

    /// POSTs `body` until a 2xx answer that `read` accepts, retrying 429, 408, 5xx, timeouts,
    /// connection errors and answers cut short, with backoff (`Retry-After` honoured). Returns
    /// the value and the number of attempts.
    pub(crate) async fn post<B, T, F, Fut>(
        &self,
        body: &B,
        mut read: F,
    ) -> Result<(T, u32), LlmError>
    where
        B: Serialize + ?Sized,
        F: FnMut(reqwest::Response) -> Fut,
        Fut: std::future::Future<Output = Result<T, ReadError>>,
    {
        let _slot = self.slots.acquire().await.expect("semaphore never closed");
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let mut rb = self.http.post(&self.url).json(body);
            if let Some(k) = &self.key {
                rb = rb.bearer_auth(k);
            }
            let last = attempt > self.cfg.max_retries;
            match rb.send().await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let retry_after = resp
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<f64>().ok())
                        .map(|s| Duration::from_secs_f64(s.clamp(0.0, 3600.0)));
                    if (200..300).contains(&status) {
                        match read(resp).await {
                            Ok(v) => return Ok((v, attempt)),
                            Err(ReadError::Transient(m)) if !last => {
                                tracing::warn!(attempt, error = %m, "LLM answer cut short, retrying");
                                tokio::time::sleep(self.backoff(attempt - 1, None)).await;
                                continue;
                            }
                            Err(ReadError::Transient(message)) => {
                                return Err(LlmError::Transport {
                                    attempts: attempt,
                                    message,
                                });
                            }
                            Err(ReadError::Fatal(LlmError::Transport { message, .. })) => {
                                return Err(LlmError::Transport {
                                    attempts: attempt,
                                    message,
                                });
                            }
                            Err(ReadError::Fatal(e)) => return Err(e),
                        }
                    }
                    let text = match resp.text().await {
                        Ok(b) => b,
                        Err(e) if !last && (e.is_timeout() || e.is_body()) => {
                            tokio::time::sleep(self.backoff(attempt - 1, None)).await;
                            continue;
                        }
                        Err(e) => {
                            return Err(LlmError::Transport {
                                attempts: attempt,
                                message: e.to_string(),
                            });
                        }
                    };
                    if is_retryable(status) && !last {
                        tracing::warn!(status, attempt, "LLM request failed, retrying");
                        tokio::time::sleep(self.backoff(attempt - 1, retry_after)).await;
                        continue;
                    }
                    return Err(LlmError::Status {
                        status,
                        attempts: attempt,
                        body: head(&text).to_string(),
                    });
                }
                Err(e) => {
                    let transient = e.is_timeout() || e.is_connect() || e.is_request();
                    if transient && !last {
                        tracing::warn!(attempt, error = %e, "LLM transport error, retrying");
                        tokio::time::sleep(self.backoff(attempt - 1, None)).await;
                        continue;
                    }
                    return Err(LlmError::Transport {
                        attempts: attempt,
                        message: e.to_string(),
                    });
                }
            }
        }
    }
}

pub(crate) fn head(s: &str) -> &str {
    let mut end = s.len().min(300);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Where responses are kept between runs, keyed by [`ChatRequest::cache_key`].
#[async_trait::async_trait]
pub trait ResponseCache: Send + Sync + std::fmt::Debug {
    async fn get(&self, key: &str) -> Result<Option<ChatCompletion>, LlmError>;
    async fn put(&self, key: &str, value: &ChatCompletion) -> Result<(), LlmError>;
}

/// `{root}/cache/llm/{key}.json` on the local disk (atomic write via temp file + rename).
#[derive(Debug, Clone)]
pub struct DirCache {
    root: PathBuf,
}

impl DirCache {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn path(&self, key: &str) -> Result<PathBuf, LlmError> {
        if key.len() != 64 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(LlmError::Cache(format!("invalid cache key `{key}`")));
        }
        Ok(self
            .root
            .join("cache")
            .join("llm")
            .join(format!("{key}.json")))
    }
}

#[async_trait::async_trait]
impl ResponseCache for DirCache {
    async fn get(&self, key: &str) -> Result<Option<ChatCompletion>, LlmError> {
        let p = self.path(key)?;
        match tokio::fs::read(&p).await {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| LlmError::Cache(format!("{}: {e}", p.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(LlmError::Cache(format!("{}: {e}", p.display()))),
        }
    }

    async fn put(&self, key: &str, value: &ChatCompletion) -> Result<(), LlmError> {
        let p = self.path(key)?;
        let dir = p.parent().expect("cache path has a parent");
        let io = |e: std::io::Error| LlmError::Cache(format!("{}: {e}", p.display()));
        tokio::fs::create_dir_all(dir).await.map_err(io)?;
        let tmp = dir.join(format!(".{key}.{}.tmp", std::process::id()));
        let body = serde_json::to_vec(value).expect("completion serialises");
        tokio::fs::write(&tmp, body).await.map_err(io)?;
        tokio::fs::rename(&tmp, &p).await.map_err(io)
    }
}

/// A client with a cache in front: a cached request is never sent again.
#[derive(Debug, Clone)]
pub struct CachedChat {
    pub client: ChatClient,
    pub cache: Arc<dyn ResponseCache>,
}

/// A completion and whether it came from the cache.
#[derive(Debug, Clone)]
pub struct Answer {
    pub completion: ChatCompletion,
    pub cached: bool,
}

impl CachedChat {
    /// `tag` versions the cache entry (e.g. the prompt file's version).
    pub async fn complete(&self, req: &ChatRequest, tag: &str) -> Result<Answer, LlmError> {
        let key = req.cache_key(tag);
        if let Some(c) = self.cache.get(&key).await? {
            return Ok(Answer {
                completion: c,
                cached: true,
            });
        }
        let c = self.client.complete(req).await?;
        self.cache.put(&key, &c).await?;
        Ok(Answer {
            completion: c,
            cached: false,
        })
    }
}

/// Why model output was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("empty")]
    Empty,
    #[error("too long")]
    TooLong,
    #[error("refusal")]
    Refusal,
    #[error("garbage")]
    Garbage,
}

impl Rejected {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejected::Empty => "empty",
            Rejected::TooLong => "too_long",
            Rejected::Refusal => "refusal",
            Rejected::Garbage => "garbage",
        }
    }
}

const REFUSALS: &[&str] = &[
    "i'm sorry",
    "i am sorry",
    "sorry, i",
    "i cannot",
    "i can't",
    "i can not",
    "i'm unable",
    "i am unable",
    "as an ai",
    "as a language model",
    "i won't be able",
];

/// Validates untrusted model text: strips `<think>…</think>` reasoning, trims, and rejects it
/// when empty, longer than `max_chars`, a refusal, or garbage (control characters, replacement
/// characters, little natural language, or one character repeated at length).
pub fn check_output(raw: &str, max_chars: usize) -> Result<String, Rejected> {
    let mut text = raw.to_string();
    while let (Some(a), Some(b)) = (text.find("<think>"), text.find("</think>")) {
        if b < a {
            break;
        }
        text.replace_range(a..b + "</think>".len(), "");
    }
    let text = text.trim();
    if text.is_empty() {
        return Err(Rejected::Empty);
    }
    let n = text.chars().count();
    if n > max_chars {
        return Err(Rejected::TooLong);
    }
    let lower = text.to_lowercase();
    if REFUSALS.iter().any(|r| lower.starts_with(r)) {
        return Err(Rejected::Refusal);
    }
    let bad = text
        .chars()
        .filter(|&c| c == '\u{fffd}' || (c.is_control() && c != '\n' && c != '\t'))
        .count();
    let letters = text.chars().filter(|c| c.is_alphabetic()).count();
    let mut longest_run = 0;
    let mut run = 0;
    let mut prev = None;
    for c in text.chars() {
        run = if Some(c) == prev { run + 1 } else { 1 };
        prev = Some(c);
        if !c.is_whitespace() {
            longest_run = longest_run.max(run);
        }
    }
    if bad * 100 > n || letters * 10 < n * 3 || longest_run > 80 {
        return Err(Rejected::Garbage);
    }
    Ok(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_checks() {
        assert_eq!(
            check_output("  Fixes the cache.  ", 100).unwrap(),
            "Fixes the cache."
        );
        assert_eq!(
            check_output("<think>hmm</think>\nAdds X.", 100).unwrap(),
            "Adds X."
        );
        assert_eq!(check_output(" \n", 100), Err(Rejected::Empty));
        assert_eq!(
            check_output("I'm sorry, but I can't", 100),
            Err(Rejected::Refusal)
        );
        assert_eq!(check_output("abc", 2), Err(Rejected::TooLong));
        assert_eq!(
            check_output("}}}}{{{{####!!!!", 100),
            Err(Rejected::Garbage)
        );
        assert_eq!(check_output(&"a".repeat(90), 100), Err(Rejected::Garbage));
        assert_eq!(
            check_output("bad \u{fffd}\u{fffd} text", 100),
            Err(Rejected::Garbage)
        );
    }

    #[test]
    fn cache_key_depends_on_request_and_tag() {
        let r = ChatRequest {
            model: "m".into(),
            messages: vec![Message::user("hi")],
            temperature: 0.0,
            max_tokens: 10,
        };
        let mut r2 = r.clone();
        r2.messages[0].content = "ho".into();
        assert_eq!(r.cache_key("v1"), r.cache_key("v1"));
        assert_ne!(r.cache_key("v1"), r.cache_key("v2"));
        assert_ne!(r.cache_key("v1"), r2.cache_key("v1"));
        assert_eq!(r.cache_key("v1").len(), 64);
    }
}
