//! A local server speaking vLLM's OpenAI-compatible chat API (`POST /v1/chat/completions`),
//! answering from a script, for tests of model clients and agents.
//!
//! The payloads are shaped like vLLM 0.10's: `chat.completion` bodies with
//! `message.tool_calls` (ids `chatcmpl-tool-…`, arguments as a JSON string), SSE streams of
//! `chat.completion.chunk` with the call's name first and its arguments in fragments, a usage
//! chunk when `stream_options.include_usage` is set, then `data: [DONE]`; a call the tool
//! parser missed comes back as text with `tool_calls: []` and `finish_reason: "stop"`; errors
//! are `{"object": "error", "message", "type", "param", "code"}`. A prompt longer than the
//! configured `max_model_len` is refused with vLLM's 400 text. `usage.prompt_tokens` is the
//! request's message characters / 4.
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// One scripted answer.
#[derive(Debug, Clone)]
pub enum Reply {
    /// `message.tool_calls` with these (name, JSON arguments) and optional text; streamed as
    /// SSE (text in 5-character pieces, arguments in 7-character fragments) when the request
    /// asks for `stream: true`, as every reply is.
    Calls {
        content: Option<String>,
        calls: Vec<(String, String)>,
    },
    /// Text only, `tool_calls: []`, `finish_reason: "stop"`.
    Text(String),
    /// An HTTP error status with vLLM's error body (429 with `Retry-After: 0`).
    Status(u16),
}

impl Reply {
    /// A single call.
    pub fn call(name: &str, arguments: Value) -> Reply {
        Reply::Calls {
            content: None,
            calls: vec![(name.to_string(), arguments.to_string())],
        }
    }
}

#[derive(Clone)]
struct Shared {
    script: Arc<Mutex<VecDeque<Reply>>>,
    requests: Arc<Mutex<Vec<Value>>>,
    max_model_len: u64,
    model: String,
}

/// A running server; it stops with the test's runtime.
#[derive(Clone)]
pub struct FakeVllm {
    /// `http://127.0.0.1:PORT/v1`
    pub base_url: String,
    shared: Shared,
}

impl FakeVllm {
    /// Serves `replies` in order (then text "script exhausted"); prompts over
    /// `max_model_len` tokens (with `max_tokens`) get vLLM's context-length 400.
    pub async fn start(model: &str, max_model_len: u64, replies: Vec<Reply>) -> FakeVllm {
        let shared = Shared {
            script: Arc::new(Mutex::new(replies.into())),
            requests: Arc::default(),
            max_model_len,
            model: model.to_string(),
        };
        let app = Router::new()
            .route("/v1/chat/completions", post(handle))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a loopback port");
        let addr = listener.local_addr().expect("bound address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        FakeVllm {
            base_url: format!("http://{addr}/v1"),
            shared,
        }
    }

    /// Appends answers to the script.
    pub fn push(&self, replies: impl IntoIterator<Item = Reply>) {
        self.shared.script.lock().unwrap().extend(replies);
    }

    /// Every request body received, in order.
    pub fn requests(&self) -> Vec<Value> {
        self.shared.requests.lock().unwrap().clone()
    }
}

/// Characters of every message's content and call arguments, / 4: a stand-in tokenizer.
fn prompt_tokens(body: &Value) -> u64 {
    let mut chars = 0usize;
    for m in body["messages"].as_array().into_iter().flatten() {
        chars += m["content"].as_str().map_or(0, str::len);
        for c in m["tool_calls"].as_array().into_iter().flatten() {
            chars += c["function"]["arguments"].as_str().map_or(0, str::len);
        }
    }
    (chars / 4) as u64 + 8
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        Json(
            json!({"object": "error", "message": message, "type": kind, "param": null,
            "code": status.as_u16()}),
        ),
    )
        .into_response()
}

static CALL_N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn tool_calls(calls: &[(String, String)]) -> Vec<Value> {
    calls
        .iter()
        .map(|(name, args)| {
            let n = CALL_N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            json!({"id": format!("chatcmpl-tool-{n:032x}"), "type": "function",
                "function": {"name": name, "arguments": args}})
        })
        .collect()
}

async fn handle(State(s): State<Shared>, Json(body): Json<Value>) -> Response {
    s.requests.lock().unwrap().push(body.clone());
    let prompt = prompt_tokens(&body);
    let max_tokens = body["max_tokens"].as_u64().unwrap_or(16);
    if prompt + max_tokens > s.max_model_len {
        return error(
            StatusCode::BAD_REQUEST,
            "BadRequestError",
            &format!(
                "This model's maximum context length is {} tokens. However, you requested {} tokens ({} in the messages, {} in the completion). Please reduce the length of the messages or completion.",
                s.max_model_len,
                prompt + max_tokens,
                prompt,
                max_tokens
            ),
        );
    }
    let reply = s
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or(Reply::Text("script exhausted".into()));
    let id = format!(
        "chatcmpl-{:032x}",
        CALL_N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let stream = body["stream"].as_bool().unwrap_or(false);
    let (content, calls) = match reply {
        Reply::Status(429) => {
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                "RateLimitError",
                "Too many requests",
            );
            r.headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("0"));
            return r;
        }
        Reply::Status(code) => {
            return error(
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                "InternalServerError",
                "EngineCore encountered an issue. See stack trace (above) for the root cause.",
            );
        }
        Reply::Text(t) => (Some(t), Vec::new()),
        Reply::Calls { content, calls } => (content, calls),
    };
    let completion = (content.as_deref().map_or(0, str::len)
        + calls.iter().map(|(_, a)| a.len()).sum::<usize>()) as u64
        / 4
        + 1;
    let usage = json!({"prompt_tokens": prompt, "total_tokens": prompt + completion,
        "completion_tokens": completion, "prompt_tokens_details": null});
    let finish = if calls.is_empty() {
        "stop"
    } else {
        "tool_calls"
    };
    if stream {
        return sse(&id, &s.model, content, &calls, finish, usage, &body);
    }
    Json(json!({
        "id": id, "object": "chat.completion", "created": 1_765_000_000, "model": s.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "reasoning_content": null,
            "content": content, "tool_calls": tool_calls(&calls)},
            "logprobs": null, "finish_reason": finish, "stop_reason": null}],
        "usage": usage, "prompt_logprobs": null, "kv_transfer_params": null
    }))
    .into_response()
}

fn sse(
    id: &str,
    model: &str,
    content: Option<String>,
    calls: &[(String, String)],
    finish: &str,
    usage: Value,
    body: &Value,
) -> Response {
    let chunk = |delta: Value, finish: Value| {
        json!({"id": id, "object": "chat.completion.chunk", "created": 1_765_000_000,
            "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": null,
            "finish_reason": finish}]})
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    if let Some(t) = content {
        let chars: Vec<char> = t.chars().collect();
        for piece in chars.chunks(5) {
            events.push(chunk(
                json!({"content": piece.iter().collect::<String>()}),
                Value::Null,
            ));
        }
    }
    for (i, call) in tool_calls(calls).into_iter().enumerate() {
        events.push(chunk(
            json!({"tool_calls": [{"id": call["id"], "type": "function", "index": i,
                "function": {"name": call["function"]["name"], "arguments": ""}}]}),
            Value::Null,
        ));
        let args: Vec<char> = call["function"]["arguments"]
            .as_str()
            .unwrap_or("")
            .chars()
            .collect();
        for piece in args.chunks(7) {
            events.push(chunk(
                json!({"tool_calls": [{"index": i, "function":
                    {"arguments": piece.iter().collect::<String>()}}]}),
                Value::Null,
            ));
        }
    }
    events.push(chunk(json!({"content": ""}), json!(finish)));
    if body["stream_options"]["include_usage"].as_bool() == Some(true) {
        events.push(json!({"id": id, "object": "chat.completion.chunk",
            "created": 1_765_000_000, "model": model, "choices": [], "usage": usage}));
    }
    let mut text = String::new();
    for e in events {
        text.push_str("data: ");
        text.push_str(&e.to_string());
        text.push_str("\n\n");
    }
    text.push_str("data: [DONE]\n\n");
    (
        [(axum::http::header::CONTENT_TYPE, "text/event-stream")],
        text,
    )
        .into_response()
}
