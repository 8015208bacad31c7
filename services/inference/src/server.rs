//! HTTP routes: `/v1/models`, `/v1/completions`, `/v1/chat/completions` (JSON or server-sent
//! events), every failure answered as an OpenAI error body.
use crate::api::{self, ApiError, ApiResult, Common, Prompt};
use crate::engine::{Engine, Event, Finish, GenRequest, TokenLogprob};
use crate::tools;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::Uri;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use davinci_model::SamplingParams;
use davinci_tokenize::Tokenizer;
use futures::StreamExt;
use serde_json::{Value, json};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};

/// What the routes share.
pub struct Served {
    pub name: String,
    pub engine: Engine,
    pub tok: Arc<Tokenizer>,
    /// Prompt plus completion tokens one sequence may hold.
    pub max_len: usize,
    pub vocab_size: usize,
    /// Ids that end a completion (the checkpoint's EOS ids).
    pub eos: Vec<u32>,
    /// Ids that end a chat turn (EOS and `<|im_end|>`).
    pub eos_chat: Vec<u32>,
    pub created: u64,
}

pub fn router(state: Arc<Served>) -> Router {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/health", get(|| async { "ok" }))
        .fallback(|uri: Uri| async move { ApiError::not_found(uri.path()).into_response() })
        .with_state(state)
}

async fn models(State(st): State<Arc<Served>>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": st.name,
            "object": "model",
            "created": st.created,
            "owned_by": "davinci",
            "max_model_len": st.max_len,
        }],
    }))
    .into_response()
}

fn finished(endpoint: &'static str, started: Instant, r: ApiResult<Response>) -> Response {
    let resp = r.unwrap_or_else(|e| {
        if e.status.is_server_error() {
            tracing::error!(error = %e.message, endpoint, "request failed");
        }
        e.into_response()
    });
    let status = resp.status().as_u16().to_string();
    metrics::counter!("davinci_inference_requests_total", "endpoint" => endpoint, "status" => status)
        .increment(1);
    metrics::histogram!("davinci_inference_request_duration_seconds", "endpoint" => endpoint)
        .record(started.elapsed().as_secs_f64());
    resp
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

impl Served {
    fn check_model(&self, name: &str) -> ApiResult<()> {
        if name == self.name {
            Ok(())
        } else {
            Err(ApiError::unknown_model(name))
        }
    }

    fn sampling(&self, c: &Common) -> SamplingParams {
        SamplingParams {
            temperature: c.temperature,
            top_p: c.top_p,
            seed: c.seed,
        }
    }

    /// The completion budget: asked for, else `default`, and the prompt plus it within the
    /// context.
    fn budget(
        &self,
        prompt: usize,
        asked: Option<usize>,
        default: usize,
        param: &str,
    ) -> ApiResult<usize> {
        if prompt == 0 {
            return Err(ApiError::invalid(param, "The prompt is empty."));
        }
        let max_tokens = asked.unwrap_or(default);
        if prompt + max_tokens > self.max_len {
            let mut e = ApiError::context_length(self.max_len, prompt, max_tokens);
            e.param = Some(param.into());
            return Err(e);
        }
        Ok(max_tokens)
    }
}

/// Everything one engine request produced.
#[derive(Default)]
struct Gathered {
    prompt: Vec<Option<TokenLogprob>>,
    text: Vec<String>,
    logprobs: Vec<Vec<TokenLogprob>>,
    finish: Vec<Option<Finish>>,
    tokens: usize,
}

async fn gather(mut rx: mpsc::UnboundedReceiver<Event>, n: usize) -> ApiResult<Gathered> {
    let mut g = Gathered {
        text: vec![String::new(); n],
        logprobs: vec![Vec::new(); n],
        finish: vec![None; n],
        ..Default::default()
    };
    while let Some(e) = rx.recv().await {
        match e {
            Event::Prompt(p) => g.prompt = p,
            Event::Delta {
                choice,
                text,
                logprobs,
            } => {
                g.text[choice].push_str(&text);
                g.logprobs[choice].extend(logprobs);
            }
            Event::Done {
                choice,
                finish,
                completion_tokens,
            } => {
                g.finish[choice] = Some(finish);
                g.tokens += completion_tokens;
            }
            Event::Error(msg) => return Err(ApiError::internal(msg)),
        }
    }
    if g.finish.iter().any(Option::is_none) {
        return Err(ApiError::internal("the model thread dropped the request"));
    }
    Ok(g)
}

fn finish_str(f: &Option<Finish>) -> Value {
    match f {
        Some(Finish::Stop) => json!("stop"),
        Some(Finish::Length) => json!("length"),
        None => Value::Null,
    }
}

/// Legacy completions `logprobs`: parallel lists over tokens, offsets into the choice text.
fn completion_logprobs(entries: &[Option<TokenLogprob>], start_offset: usize) -> Value {
    let mut tokens = Vec::new();
    let mut lps = Vec::new();
    let mut tops = Vec::new();
    let mut offsets = Vec::new();
    let mut at = start_offset;
    for e in entries {
        match e {
            Some(t) => {
                tokens.push(json!(t.text));
                lps.push(json!(t.logprob));
                // Keyed by text as OpenAI does: ids that decode alike keep the likelier entry.
                let mut top = serde_json::Map::new();
                for (s, l) in &t.top {
                    top.entry(s.clone()).or_insert(json!(l));
                }
                tops.push(Value::Object(top));
                offsets.push(json!(at));
                at += t.text.len();
            }
            None => {
                tokens.push(Value::Null);
                lps.push(Value::Null);
                tops.push(Value::Null);
                offsets.push(json!(at));
            }
        }
    }
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

async fn completions(State(st): State<Arc<Served>>, body: Bytes) -> Response {
    let started = Instant::now();
    let r = completions_inner(st, &body).await;
    finished("completions", started, r)
}

struct PromptJob {
    ids: Vec<u32>,
    text: String,
    rx: mpsc::UnboundedReceiver<Event>,
}

async fn completions_inner(st: Arc<Served>, body: &[u8]) -> ApiResult<Response> {
    let m = api::parse_object(body)?;
    let c = Common::parse(&m, &["max_tokens"])?;
    st.check_model(&c.model)?;
    let prompts = api::parse_prompts(m.get("prompt"))?;
    let echo = api::boolean(&m, "echo")?.unwrap_or(false);
    let logprobs = api::uint(&m, "logprobs")?.map(|k| k as usize);
    if logprobs.is_some_and(|k| k > 20) {
        return Err(ApiError::invalid(
            "logprobs",
            "`logprobs` must be at most 20.",
        ));
    }
    if let Some(b) = api::uint(&m, "best_of")?
        && b as usize != c.n
    {
        return Err(ApiError::invalid(
            "best_of",
            "`best_of` other than `n` is not supported.",
        ));
    }
    if c.stream && echo && logprobs.is_some() {
        return Err(ApiError::invalid(
            "echo",
            "`echo` with `logprobs` is served without streaming only.",
        ));
    }
    let mut jobs = Vec::with_capacity(prompts.len());
    for p in prompts {
        let (ids, text) = match p {
            Prompt::Text(t) => (
                st.tok
                    .encode(&t)
                    .map_err(|e| ApiError::invalid("prompt", e.to_string()))?,
                t,
            ),
            Prompt::Ids(ids) => {
                if let Some(&bad) = ids.iter().find(|&&i| i as usize >= st.vocab_size) {
                    return Err(ApiError::invalid(
                        "prompt",
                        format!(
                            "Token id {bad} is outside the vocabulary ({} ids).",
                            st.vocab_size
                        ),
                    ));
                }
                let text = st.tok.decode(&ids).unwrap_or_default();
                (ids, text)
            }
        };
        let max_tokens = st.budget(ids.len(), c.max_tokens, 16, "prompt")?;
        jobs.push((ids, text, max_tokens));
    }
    let jobs: Vec<PromptJob> = jobs
        .into_iter()
        .map(|(ids, text, max_tokens)| {
            let rx = st.engine.submit(GenRequest {
                prompt: ids.clone(),
                max_tokens,
                sampling: st.sampling(&c),
                n: c.n,
                stop: c.stop.clone(),
                stop_ids: st.eos.clone(),
                logprobs,
                prompt_logprobs: echo && logprobs.is_some(),
            });
            PromptJob { ids, text, rx }
        })
        .collect();
    let id = new_id("cmpl");
    let created = now();
    if c.stream {
        return Ok(stream_completions(
            st,
            c,
            jobs,
            id,
            created,
            echo,
            logprobs.is_some(),
        ));
    }
    let mut choices = Vec::new();
    let (mut prompt_tokens, mut completion_tokens) = (0, 0);
    for (pi, job) in jobs.into_iter().enumerate() {
        prompt_tokens += job.ids.len();
        let g = gather(job.rx, c.n).await?;
        completion_tokens += g.tokens;
        for j in 0..c.n {
            let prefix = if echo { job.text.as_str() } else { "" };
            let lp = logprobs.map(|_| {
                let mut entries: Vec<Option<TokenLogprob>> =
                    if echo { g.prompt.clone() } else { Vec::new() };
                entries.extend(g.logprobs[j].iter().cloned().map(Some));
                completion_logprobs(&entries, 0)
            });
            choices.push(json!({
                "index": pi * c.n + j,
                "text": format!("{prefix}{}", g.text[j]),
                "logprobs": lp,
                "finish_reason": finish_str(&g.finish[j]),
            }));
        }
    }
    Ok(axum::Json(json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": st.name,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }))
    .into_response())
}

type SseSender = mpsc::Sender<Result<SseEvent, Infallible>>;

fn sse_response(rx: mpsc::Receiver<Result<SseEvent, Infallible>>) -> Response {
    Sse::new(ReceiverStream::new(rx)).into_response()
}

/// Ends a stream as OpenAI does: the usage chunk when asked for (`stream_options.include_usage`),
/// then `[DONE]`.
async fn end_stream(tx: &SseSender, usage: Option<Value>) {
    if let Some(u) = usage
        && !send_json(tx, u).await
    {
        return;
    }
    let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
}

async fn send_json(tx: &SseSender, v: Value) -> bool {
    tx.send(Ok(SseEvent::default().data(v.to_string())))
        .await
        .is_ok()
}

fn stream_completions(
    st: Arc<Served>,
    c: Common,
    jobs: Vec<PromptJob>,
    id: String,
    created: u64,
    echo: bool,
    with_logprobs: bool,
) -> Response {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let chunk = |index: usize, text: &str, lp: Value, finish: Value| {
            json!({
                "id": id, "object": "text_completion", "created": created, "model": st.name,
                "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": finish}],
            })
        };
        let n = c.n;
        let mut prompt_tokens = 0;
        let mut completion_tokens = 0;
        let mut streams = Vec::new();
        for (pi, job) in jobs.into_iter().enumerate() {
            prompt_tokens += job.ids.len();
            if echo {
                for j in 0..n {
                    if !send_json(&tx, chunk(pi * n + j, &job.text, Value::Null, Value::Null)).await
                    {
                        return;
                    }
                }
            }
            streams.push(UnboundedReceiverStream::new(job.rx).map(move |e| (pi, e)));
        }
        let mut all = futures::stream::select_all(streams);
        while let Some((pi, e)) = all.next().await {
            let ok = match e {
                Event::Prompt(_) => true,
                Event::Delta {
                    choice,
                    text,
                    logprobs,
                } => {
                    let lp = if with_logprobs {
                        completion_logprobs(&logprobs.into_iter().map(Some).collect::<Vec<_>>(), 0)
                    } else {
                        Value::Null
                    };
                    if text.is_empty() && !with_logprobs {
                        true
                    } else {
                        send_json(&tx, chunk(pi * n + choice, &text, lp, Value::Null)).await
                    }
                }
                Event::Done {
                    choice,
                    finish,
                    completion_tokens: k,
                } => {
                    completion_tokens += k;
                    send_json(
                        &tx,
                        chunk(pi * n + choice, "", Value::Null, finish_str(&Some(finish))),
                    )
                    .await
                }
                Event::Error(msg) => {
                    let _ = send_json(&tx, ApiError::internal(msg).body()).await;
                    return;
                }
            };
            if !ok {
                return;
            }
        }
        let usage = c.include_usage.then(|| {
            json!({
                "id": id, "object": "text_completion", "created": created, "model": st.name,
                "choices": [],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens},
            })
        });
        end_stream(&tx, usage).await;
    });
    sse_response(rx)
}

async fn chat(State(st): State<Arc<Served>>, body: Bytes) -> Response {
    let started = Instant::now();
    let r = chat_inner(st, &body).await;
    finished("chat_completions", started, r)
}

/// Chat `logprobs.content` entries.
fn chat_logprobs(entries: &[TokenLogprob]) -> Value {
    let item = |t: &str, l: f32| json!({"token": t, "logprob": l, "bytes": t.as_bytes()});
    Value::Array(
        entries
            .iter()
            .map(|e| {
                let mut v = item(&e.text, e.logprob);
                v["top_logprobs"] = Value::Array(e.top.iter().map(|(t, l)| item(t, *l)).collect());
                v
            })
            .collect(),
    )
}

fn tool_calls_json(calls: &[(String, String)], with_index: bool) -> Value {
    Value::Array(
        calls
            .iter()
            .enumerate()
            .map(|(i, (name, args))| {
                let mut v = json!({
                    "id": new_id("call"),
                    "type": "function",
                    "function": {"name": name, "arguments": args},
                });
                if with_index {
                    v["index"] = json!(i);
                }
                v
            })
            .collect(),
    )
}

async fn chat_inner(st: Arc<Served>, body: &[u8]) -> ApiResult<Response> {
    let m = api::parse_object(body)?;
    let c = Common::parse(&m, &["max_tokens", "max_completion_tokens"])?;
    st.check_model(&c.model)?;
    let messages = tools::parse_messages(m.get("messages"))?;
    let tool_list = tools::parse_tools(m.get("tools"))?;
    let parse_calls = tools::parse_tool_choice(m.get("tool_choice"))? && !tool_list.is_empty();
    let logprobs = api::boolean(&m, "logprobs")?.unwrap_or(false);
    let top = api::uint(&m, "top_logprobs")?.unwrap_or(0) as usize;
    if top > 20 {
        return Err(ApiError::invalid(
            "top_logprobs",
            "`top_logprobs` must be at most 20.",
        ));
    }
    let rendered = davinci_tokenize::chat::render_qwen25_messages(&tool_list, &messages, true)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let ids = st
        .tok
        .encode(&rendered.text())
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let default = st.max_len.saturating_sub(ids.len()).max(1);
    let max_tokens = st.budget(ids.len(), c.max_tokens, default, "messages")?;
    let rx = st.engine.submit(GenRequest {
        prompt: ids.clone(),
        max_tokens,
        sampling: st.sampling(&c),
        n: c.n,
        stop: c.stop.clone(),
        stop_ids: st.eos_chat.clone(),
        logprobs: logprobs.then_some(top),
        prompt_logprobs: false,
    });
    let id = new_id("chatcmpl");
    let created = now();
    if c.stream {
        return Ok(stream_chat(
            st,
            c,
            ids.len(),
            rx,
            id,
            created,
            parse_calls,
            logprobs,
        ));
    }
    let g = gather(rx, c.n).await?;
    let choices: Vec<Value> = (0..c.n)
        .map(|j| {
            let mut finish = finish_str(&g.finish[j]);
            let mut message = json!({"role": "assistant", "content": g.text[j]});
            if parse_calls {
                let p = tools::parse_tool_calls(&g.text[j]);
                if !p.calls.is_empty() {
                    message["content"] = json!(p.content);
                    message["tool_calls"] = tool_calls_json(&p.calls, false);
                    finish = json!("tool_calls");
                }
            }
            json!({
                "index": j,
                "message": message,
                "logprobs": if logprobs { json!({"content": chat_logprobs(&g.logprobs[j])}) } else { Value::Null },
                "finish_reason": finish,
            })
        })
        .collect();
    Ok(axum::Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": st.name,
        "choices": choices,
        "usage": {
            "prompt_tokens": ids.len(),
            "completion_tokens": g.tokens,
            "total_tokens": ids.len() + g.tokens,
        },
    }))
    .into_response())
}

const CALL_OPEN: &str = "<tool_call>";

/// How much of `text` may be streamed as content: everything before a `<tool_call>` (or a
/// tail that may begin one), which is held until the choice ends and is parsed then.
fn streamable(text: &str) -> usize {
    if let Some(p) = text.find(CALL_OPEN) {
        return p;
    }
    (1..CALL_OPEN.len())
        .rev()
        .find(|&k| text.ends_with(&CALL_OPEN[..k]))
        .map(|k| text.len() - k)
        .unwrap_or(text.len())
}

#[allow(clippy::too_many_arguments)]
fn stream_chat(
    st: Arc<Served>,
    c: Common,
    prompt_tokens: usize,
    rx: mpsc::UnboundedReceiver<Event>,
    id: String,
    created: u64,
    parse_calls: bool,
    with_logprobs: bool,
) -> Response {
    let (tx, out) = mpsc::channel(64);
    tokio::spawn(async move {
        let chunk = |index: usize, delta: Value, lp: Value, finish: Value| {
            json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": st.name,
                "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}],
            })
        };
        for j in 0..c.n {
            if !send_json(
                &tx,
                chunk(
                    j,
                    json!({"role": "assistant", "content": ""}),
                    Value::Null,
                    Value::Null,
                ),
            )
            .await
            {
                return;
            }
        }
        let mut text = vec![String::new(); c.n];
        let mut sent = vec![0usize; c.n];
        let mut completion_tokens = 0;
        let mut rx = rx;
        while let Some(e) = rx.recv().await {
            let ok = match e {
                Event::Prompt(_) => true,
                Event::Delta {
                    choice,
                    text: t,
                    logprobs,
                } => {
                    text[choice].push_str(&t);
                    let upto = if parse_calls {
                        streamable(&text[choice]).max(sent[choice])
                    } else {
                        text[choice].len()
                    };
                    let piece = text[choice][sent[choice]..upto].to_string();
                    sent[choice] = upto;
                    let lp = if with_logprobs {
                        json!({"content": chat_logprobs(&logprobs)})
                    } else {
                        Value::Null
                    };
                    if piece.is_empty() && !with_logprobs {
                        true
                    } else {
                        send_json(
                            &tx,
                            chunk(choice, json!({"content": piece}), lp, Value::Null),
                        )
                        .await
                    }
                }
                Event::Done {
                    choice,
                    finish,
                    completion_tokens: k,
                } => {
                    completion_tokens += k;
                    let held = text[choice][sent[choice]..].to_string();
                    let mut finish = finish_str(&Some(finish));
                    let mut ok = true;
                    let parsed = tools::parse_tool_calls(&held);
                    if parse_calls && !parsed.calls.is_empty() {
                        if let Some(rest) = parsed.content.filter(|s| !s.is_empty()) {
                            ok &= send_json(
                                &tx,
                                chunk(choice, json!({"content": rest}), Value::Null, Value::Null),
                            )
                            .await;
                        }
                        ok &= send_json(
                            &tx,
                            chunk(
                                choice,
                                json!({"tool_calls": tool_calls_json(&parsed.calls, true)}),
                                Value::Null,
                                Value::Null,
                            ),
                        )
                        .await;
                        finish = json!("tool_calls");
                    } else if !held.is_empty() {
                        ok &= send_json(
                            &tx,
                            chunk(choice, json!({"content": held}), Value::Null, Value::Null),
                        )
                        .await;
                    }
                    ok && send_json(&tx, chunk(choice, json!({}), Value::Null, finish)).await
                }
                Event::Error(msg) => {
                    let _ = send_json(&tx, ApiError::internal(msg).body()).await;
                    return;
                }
            };
            if !ok {
                return;
            }
        }
        let usage = c.include_usage.then(|| {
            json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": st.name,
                "choices": [],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens},
            })
        });
        end_stream(&tx, usage).await;
    });
    sse_response(out)
}
