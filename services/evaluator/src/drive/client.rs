//! A small OpenAI-API client for evaluations: text completions (with `n`, `stop`, `seed`,
//! `top_p`), chat completions, and the loglikelihood of a continuation.
//!
//! `davinci-llm` speaks chat only (no `n`, `stop`, `logprobs` or `/completions`), which
//! benchmarks need, so this talks HTTP itself. Transient failures (connection errors,
//! timeouts, 429, 5xx) are retried with backoff; other 4xx answers fail at once with the
//! server's message.
use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::time::Duration;
use tokio::sync::Semaphore;

/// Sampling parameters sent with every generation request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    pub max_tokens: u32,
    pub temperature: f64,
    pub top_p: f64,
    /// Samples per prompt.
    pub n: u32,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            max_tokens: 512,
            temperature: 0.0,
            top_p: 1.0,
            n: 1,
            stop: Vec::new(),
            seed: Some(1234),
        }
    }
}

/// One OpenAI-compatible endpoint serving `model`.
pub struct Endpoint {
    base: String,
    model: String,
    api_key: Option<String>,
    http: reqwest::Client,
    slots: Semaphore,
    concurrency: usize,
    retries: u32,
}

impl Endpoint {
    /// `base_url` is the API root as OpenAI clients take it (`http://host:8000/v1`); a bare
    /// `http://host:port` gets `/v1`.
    pub fn new(
        base_url: &str,
        model: &str,
        api_key: Option<String>,
        concurrency: usize,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let url = reqwest::Url::parse(base_url)
            .with_context(|| format!("--model-url `{base_url}` is not a URL"))?;
        if !matches!(url.scheme(), "http" | "https") {
            bail!("--model-url `{base_url}` must be http:// or https://");
        }
        let mut base = base_url.trim_end_matches('/').to_string();
        if url.path() == "/" || url.path().is_empty() {
            base.push_str("/v1");
        }
        if model.is_empty() {
            bail!(
                "--model is required: the model name the endpoint serves (see GET {base}/models)"
            );
        }
        Ok(Self {
            base,
            model: model.into(),
            api_key,
            http: reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .context("building the HTTP client")?,
            slots: Semaphore::new(concurrency.max(1)),
            concurrency: concurrency.max(1),
            retries: 4,
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    /// Requests in flight at most.
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let _slot = self.slots.acquire().await.context("endpoint closed")?;
        let url = format!("{}{path}", self.base);
        let mut delay = Duration::from_millis(500);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = self.http.post(&url).json(body);
            if let Some(k) = &self.api_key {
                req = req.bearer_auth(k);
            }
            let transient = match req.send().await {
                Ok(r) if r.status().is_success() => {
                    return r
                        .json::<Value>()
                        .await
                        .with_context(|| format!("{url}: the answer is not JSON"));
                }
                Ok(r) => {
                    let status = r.status();
                    let text = r.text().await.unwrap_or_default();
                    let msg = serde_json::from_str::<Value>(&text)
                        .ok()
                        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                        .unwrap_or(text);
                    let e = anyhow::anyhow!("{url}: HTTP {status}: {msg}");
                    if status.as_u16() == 429 || status.is_server_error() {
                        e
                    } else {
                        return Err(e);
                    }
                }
                Err(e) => anyhow::anyhow!("{url}: {e}"),
            };
            if attempt > self.retries {
                return Err(transient.context(format!("gave up after {attempt} attempts")));
            }
            tracing::warn!(error = %transient, attempt, "retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(20));
        }
    }

    fn sampling_fields(&self, s: &Sampling, body: &mut Value) {
        body["model"] = json!(self.model);
        body["max_tokens"] = json!(s.max_tokens);
        body["temperature"] = json!(s.temperature);
        body["top_p"] = json!(s.top_p);
        body["n"] = json!(s.n);
        if !s.stop.is_empty() {
            body["stop"] = json!(s.stop);
        }
        if let Some(seed) = s.seed {
            body["seed"] = json!(seed);
        }
    }

    /// `n` completions of `prompt`, by choice index.
    pub async fn complete(&self, prompt: &str, s: &Sampling) -> anyhow::Result<Vec<String>> {
        let mut body = json!({"prompt": prompt});
        self.sampling_fields(s, &mut body);
        let r = self.post("/completions", &body).await?;
        texts(&r, s.n, |c| c["text"].as_str().map(str::to_string))
    }

    /// `n` chat answers to `messages` (OpenAI message objects).
    pub async fn chat(&self, messages: &[Value], s: &Sampling) -> anyhow::Result<Vec<String>> {
        let mut body = json!({"messages": messages});
        self.sampling_fields(s, &mut body);
        let r = self.post("/chat/completions", &body).await?;
        texts(&r, s.n, |c| {
            Some(
                c["message"]["content"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
    }

    /// log P(continuation | context): the prompt `context + continuation` is echoed with
    /// per-token logprobs, and the tokens starting at or after the end of `context` are
    /// summed (lm-eval's API models do the same with their own tokenizer). `max_tokens` is 1
    /// because some servers refuse 0; the generated token lies past the text and is not
    /// counted.
    pub async fn loglikelihood(&self, context: &str, continuation: &str) -> anyhow::Result<f64> {
        let full = format!("{context}{continuation}");
        let body = json!({
            "model": self.model, "prompt": full, "max_tokens": 1, "temperature": 0,
            "echo": true, "logprobs": 1, "seed": 0,
        });
        let r = self.post("/completions", &body).await?;
        let lp = &r["choices"][0]["logprobs"];
        let (Some(offsets), Some(values)) = (
            lp["text_offset"].as_array(),
            lp["token_logprobs"].as_array(),
        ) else {
            bail!(
                "the endpoint returned no logprobs with echo (does it support echo + logprobs on /completions?)"
            );
        };
        let mut sum = 0.0;
        let mut counted = 0;
        for (o, v) in offsets.iter().zip(values) {
            let o = o.as_u64().unwrap_or(0) as usize;
            if o >= context.len() && o < full.len() {
                sum += v.as_f64().context("a continuation token has no logprob")?;
                counted += 1;
            }
        }
        if counted == 0 {
            bail!("no token of the continuation {continuation:?} starts after the context");
        }
        Ok(sum)
    }
}

fn texts(r: &Value, n: u32, get: impl Fn(&Value) -> Option<String>) -> anyhow::Result<Vec<String>> {
    let choices = r["choices"]
        .as_array()
        .context("the answer has no `choices`")?;
    let mut out = vec![None; n as usize];
    for (i, c) in choices.iter().enumerate() {
        let idx = c["index"].as_u64().map(|x| x as usize).unwrap_or(i);
        if idx < out.len() {
            out[idx] = get(c);
        }
    }
    out.into_iter()
        .enumerate()
        .map(|(i, t)| t.with_context(|| format!("choice {i} missing from the answer")))
        .collect()
}
