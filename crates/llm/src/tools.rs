//! Tool calling over the chat completions API: `tools` / `tool_calls`, streamed or not.
//!
//! Whether the model called a tool is decided from the parsed calls, never from
//! `finish_reason` (vLLM answers `stop` with a call left in `content` when its parser misses
//! one, and `tool_calls` with an empty list under `tool_choice: required`). Where the server
//! returned no structured call, the text is searched for the two forms open models write:
//! Hermes (Qwen2.5: `<tool_call>{"name": …, "arguments": {…}}</tool_call>`) and GLM-4.5/4.6
//! (`<tool_call>NAME\n<arg_key>K</arg_key>\n<arg_value>V</arg_value>\n</tool_call>`).
use crate::{ChatClient, LlmError, Usage};
pub use davinci_core::traj::{ToolCall, ToolCallFunction as FunctionCall};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::time::Instant;

/// One message on the wire (OpenAI chat format with tool calls and tool results).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A chat request offering tools. Field order is fixed, so its JSON hashes stably.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<Value>,
    /// `auto` (the default when tools are given), `required`, `none`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<String>,
    pub temperature: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    pub max_tokens: u32,
    pub stream: bool,
    /// `{"include_usage": true}` when streaming, so the last chunk carries `usage`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<Value>,
}

/// Where a turn's calls came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallSource {
    /// `message.tool_calls` (or streamed `delta.tool_calls`).
    Api,
    /// Hermes `<tool_call>{json}</tool_call>` in the text.
    HermesText,
    /// GLM-4.5 / 4.6 `<tool_call>name<arg_key>…` in the text.
    Glm45Text,
}

/// One assistant turn as received.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    /// The text as the server returned it (with any text-form calls still in it).
    pub raw_content: Option<String>,
    /// The text with text-form calls taken out (equal to `raw_content` otherwise).
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// The calls, structured or recovered from the text; arguments as produced.
    pub tool_calls: Vec<ToolCall>,
    pub source: Option<CallSource>,
    /// Text-form calls whose body could not be read (bad JSON, no name).
    pub malformed: Vec<String>,
    pub finish_reason: Option<String>,
    pub usage: Option<Usage>,
    pub id: String,
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
    pub attempts: u32,
    pub seconds: f64,
}

#[derive(Debug, Deserialize)]
struct WireCompletion {
    #[serde(default)]
    id: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    system_fingerprint: Option<String>,
    choices: Vec<WireChoice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Debug, Deserialize)]
struct WireChoice {
    message: WireMessage,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct WireMessage {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    reasoning_content: Option<String>,
    /// `null` or missing reads as no calls.
    #[serde(default, deserialize_with = "crate::null_default")]
    tool_calls: Vec<WireCall>,
}

#[derive(Debug, Default, Deserialize)]
struct WireCall {
    #[serde(default)]
    index: Option<usize>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: WireFunction,
}

#[derive(Debug, Default, Deserialize)]
struct WireFunction {
    #[serde(default)]
    name: Option<String>,
    /// A JSON string; some servers send an object instead.
    #[serde(default)]
    arguments: Option<Value>,
}

fn arguments_text(v: Option<Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s,
        Some(other) => other.to_string(),
    }
}

#[derive(Debug, Deserialize)]
struct WireChunk {
    #[serde(default)]
    id: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    system_fingerprint: Option<String>,
    #[serde(default)]
    choices: Vec<WireChunkChoice>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct WireChunkChoice {
    #[serde(default)]
    delta: WireMessage,
    #[serde(default)]
    finish_reason: Option<String>,
}

/// Accumulates streamed chunks into one turn: text concatenated, tool-call fragments joined
/// by their `index` (the name arrives once, the arguments in pieces).
#[derive(Debug, Default)]
struct Accumulator {
    id: String,
    model: String,
    system_fingerprint: Option<String>,
    content: Option<String>,
    reasoning: Option<String>,
    calls: Vec<(String, String, String)>,
    finish_reason: Option<String>,
    usage: Option<Usage>,
    done: bool,
}

impl Accumulator {
    /// Feeds one SSE `data:` payload.
    fn feed(&mut self, data: &str) -> Result<(), LlmError> {
        let data = data.trim();
        if data == "[DONE]" {
            self.done = true;
            return Ok(());
        }
        let chunk: WireChunk = serde_json::from_str(data).map_err(|e| {
            LlmError::BadResponse(format!(
                "stream chunk: {e}; chunk starts {:?}",
                crate::head(data)
            ))
        })?;
        if let Some(err) = chunk.error {
            return Err(LlmError::BadResponse(format!(
                "error inside the stream: {err}"
            )));
        }
        if self.id.is_empty() {
            self.id = chunk.id;
        }
        if self.model.is_empty() {
            self.model = chunk.model;
        }
        if chunk.system_fingerprint.is_some() {
            self.system_fingerprint = chunk.system_fingerprint;
        }
        if chunk.usage.is_some() {
            self.usage = chunk.usage;
        }
        for c in chunk.choices {
            if let Some(t) = c.delta.content {
                self.content.get_or_insert_default().push_str(&t);
            }
            if let Some(t) = c.delta.reasoning_content {
                self.reasoning.get_or_insert_default().push_str(&t);
            }
            for (pos, tc) in c.delta.tool_calls.into_iter().enumerate() {
                let i = tc.index.unwrap_or(pos);
                while self.calls.len() <= i {
                    self.calls.push(Default::default());
                }
                let slot = &mut self.calls[i];
                if let Some(id) = tc.id.filter(|s| !s.is_empty()) {
                    slot.0 = id;
                }
                if let Some(n) = tc.function.name {
                    slot.1.push_str(&n);
                }
                slot.2.push_str(&arguments_text(tc.function.arguments));
            }
            if c.finish_reason.is_some() {
                self.finish_reason = c.finish_reason;
            }
        }
        Ok(())
    }
}

/// Feeds every complete SSE event in `buf` to `acc`, leaving a partial one in `buf`.
fn drain_events(buf: &mut String, acc: &mut Accumulator) -> Result<(), LlmError> {
    while let Some(end) = buf.find("\n\n").or_else(|| buf.find("\r\n\r\n")) {
        let sep = if buf[end..].starts_with("\r\n\r\n") {
            4
        } else {
            2
        };
        let event: String = buf.drain(..end + sep).collect();
        let mut data = String::new();
        for line in event.lines() {
            if let Some(d) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(d.strip_prefix(' ').unwrap_or(d));
            }
        }
        if !data.is_empty() {
            acc.feed(&data)?;
        }
    }
    Ok(())
}

fn finish(
    raw: Option<String>,
    api_calls: Vec<(Option<String>, String, String)>,
    tools: &[Value],
) -> (
    Option<String>,
    Vec<ToolCall>,
    Option<CallSource>,
    Vec<String>,
) {
    let api_calls: Vec<ToolCall> = api_calls
        .into_iter()
        .enumerate()
        .filter(|(_, (_, name, args))| !name.is_empty() || !args.is_empty())
        .map(|(i, (id, name, arguments))| ToolCall {
            id: id
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| format!("call_{i}")),
            kind: "function".into(),
            function: FunctionCall { name, arguments },
        })
        .collect();
    if !api_calls.is_empty() {
        return (raw, api_calls, Some(CallSource::Api), Vec::new());
    }
    match raw.as_deref().map(|t| parse_text_calls(t, tools)) {
        Some(p) if !p.calls.is_empty() || !p.malformed.is_empty() => {
            let content = (!p.rest.trim().is_empty()).then(|| p.rest.trim().to_string());
            (content, p.calls, p.source, p.malformed)
        }
        _ => (raw, Vec::new(), None, Vec::new()),
    }
}

/// Calls found in model text.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TextCalls {
    pub calls: Vec<ToolCall>,
    pub source: Option<CallSource>,
    pub malformed: Vec<String>,
    /// The text with the call blocks removed.
    pub rest: String,
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// Finds `<tool_call>` blocks in `text` (Hermes JSON or GLM-4.5 key/value form). An unclosed
/// last block (the model stopped at its stop token) is read to the end of the text. `tools`
/// gives the parameter types GLM values are read by (strings stay strings, the rest is JSON).
pub fn parse_text_calls(text: &str, tools: &[Value]) -> TextCalls {
    let mut out = TextCalls::default();
    let mut rest = text;
    while let Some(a) = rest.find(OPEN) {
        out.rest.push_str(&rest[..a]);
        let body_start = a + OPEN.len();
        let (body, next) = match rest[body_start..].find(CLOSE) {
            Some(b) => (
                &rest[body_start..body_start + b],
                body_start + b + CLOSE.len(),
            ),
            None => (&rest[body_start..], rest.len()),
        };
        let i = out.calls.len() + out.malformed.len();
        let trimmed = body.trim();
        let parsed = if trimmed.starts_with('{') {
            parse_hermes(trimmed).map(|c| (c, CallSource::HermesText))
        } else {
            parse_glm45(trimmed, tools).map(|c| (c, CallSource::Glm45Text))
        };
        match parsed {
            Some(((name, arguments), src)) => {
                out.source.get_or_insert(src);
                out.calls.push(ToolCall {
                    id: format!("call_{i}"),
                    kind: "function".into(),
                    function: FunctionCall { name, arguments },
                });
            }
            None => out.malformed.push(trimmed.to_string()),
        }
        rest = &rest[next..];
    }
    out.rest.push_str(rest);
    out
}

fn parse_hermes(body: &str) -> Option<(String, String)> {
    let v: Value = serde_json::from_str(body).ok()?;
    let name = v.get("name")?.as_str()?.to_string();
    if name.is_empty() {
        return None;
    }
    let args = match v.get("arguments").or_else(|| v.get("parameters")) {
        None | Some(Value::Null) => "{}".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(o) => o.to_string(),
    };
    Some((name, args))
}

fn param_is_string(tools: &[Value], tool: &str, arg: &str) -> bool {
    tools
        .iter()
        .filter_map(|t| t.get("function"))
        .find(|f| f.get("name").and_then(Value::as_str) == Some(tool))
        .and_then(|f| f.pointer(&format!("/parameters/properties/{arg}/type")))
        .and_then(Value::as_str)
        == Some("string")
}

fn parse_glm45(body: &str, tools: &[Value]) -> Option<(String, String)> {
    let name_end = body.find("<arg_key>").unwrap_or(body.len());
    let name = body[..name_end].trim();
    if name.is_empty() || name.contains(char::is_whitespace) {
        return None;
    }
    let mut args = serde_json::Map::new();
    let mut rest = &body[name_end..];
    while let Some(k) = rest.find("<arg_key>") {
        let after = &rest[k + "<arg_key>".len()..];
        let ke = after.find("</arg_key>")?;
        let key = after[..ke].trim().to_string();
        let after = &after[ke + "</arg_key>".len()..];
        let vs = after.find("<arg_value>")?;
        if !after[..vs].trim().is_empty() {
            return None;
        }
        let after = &after[vs + "<arg_value>".len()..];
        let ve = after.find("</arg_value>")?;
        let raw = &after[..ve];
        let value = if param_is_string(tools, name, &key) {
            Value::String(raw.to_string())
        } else {
            serde_json::from_str(raw.trim()).unwrap_or_else(|_| Value::String(raw.to_string()))
        };
        args.insert(key, value);
        rest = &after[ve + "</arg_value>".len()..];
    }
    Some((name.to_string(), Value::Object(args).to_string()))
}

impl ChatClient {
    /// A tool-calling request for this client's model with its sampling settings.
    pub fn tool_request(&self, messages: Vec<ChatMessage>, tools: Vec<Value>) -> ToolRequest {
        let c = self.config();
        ToolRequest {
            model: c.model.clone(),
            messages,
            tool_choice: (!tools.is_empty()).then(|| "auto".to_string()),
            tools,
            temperature: c.temperature,
            top_p: c.top_p,
            seed: c.seed,
            max_tokens: c.max_tokens,
            stream: c.stream,
            stream_options: c.stream.then(|| serde_json::json!({"include_usage": true})),
        }
    }

    /// Sends a tool-calling request (streamed when `req.stream`), retrying transient failures
    /// as [`ChatClient::complete`] does, and returns the turn with its calls parsed.
    pub async fn complete_tools(&self, req: &ToolRequest) -> Result<Turn, LlmError> {
        let t = Instant::now();
        let stream = req.stream;
        let (mut turn, attempts) = self
            .post(req, |resp| async move {
                // A server that ignores `stream` answers with one JSON body.
                let json = resp
                    .headers()
                    .get(reqwest::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with("application/json"));
                if stream && !json {
                    read_stream(resp).await
                } else {
                    let body = resp.text().await.map_err(crate::ReadError::from_reqwest)?;
                    read_completion(&body).map_err(crate::ReadError::Fatal)
                }
            })
            .await?;
        let (content, calls, source, malformed) = finish(
            turn.raw_content.clone(),
            std::mem::take(&mut turn.pending),
            &req.tools,
        );
        Ok(Turn {
            raw_content: turn.raw_content,
            content,
            reasoning_content: turn.reasoning_content,
            tool_calls: calls,
            source,
            malformed,
            finish_reason: turn.finish_reason,
            usage: turn.usage,
            id: turn.id,
            model: turn.model,
            system_fingerprint: turn.system_fingerprint,
            attempts,
            seconds: t.elapsed().as_secs_f64(),
        })
    }
}

/// A turn before its calls are settled.
#[derive(Debug, Default)]
struct Received {
    raw_content: Option<String>,
    reasoning_content: Option<String>,
    pending: Vec<(Option<String>, String, String)>,
    finish_reason: Option<String>,
    usage: Option<Usage>,
    id: String,
    model: String,
    system_fingerprint: Option<String>,
}

fn read_completion(body: &str) -> Result<Received, LlmError> {
    let c: WireCompletion = serde_json::from_str(body)
        .map_err(|e| LlmError::BadResponse(format!("{e}; body starts {:?}", crate::head(body))))?;
    let choice = c
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| LlmError::BadResponse("no choices in the completion".into()))?;
    Ok(Received {
        raw_content: choice.message.content,
        reasoning_content: choice.message.reasoning_content,
        pending: choice
            .message
            .tool_calls
            .into_iter()
            .map(|c| {
                (
                    c.id,
                    c.function.name.unwrap_or_default(),
                    arguments_text(c.function.arguments),
                )
            })
            .collect(),
        finish_reason: choice.finish_reason,
        usage: c.usage,
        id: c.id,
        model: c.model,
        system_fingerprint: c.system_fingerprint,
    })
}

async fn read_stream(mut resp: reqwest::Response) -> Result<Received, crate::ReadError> {
    let mut acc = Accumulator::default();
    let mut buf = String::new();
    let mut bytes: Vec<u8> = Vec::new();
    loop {
        match resp.chunk().await.map_err(crate::ReadError::from_reqwest)? {
            Some(c) => {
                bytes.extend_from_slice(&c);
                // Decode only whole UTF-8 sequences; keep a split one for the next chunk.
                let valid = match std::str::from_utf8(&bytes) {
                    Ok(s) => s.len(),
                    Err(e) if e.error_len().is_none() => e.valid_up_to(),
                    Err(e) => {
                        return Err(crate::ReadError::Fatal(LlmError::BadResponse(format!(
                            "stream is not UTF-8: {e}"
                        ))));
                    }
                };
                buf.push_str(std::str::from_utf8(&bytes[..valid]).expect("checked above"));
                bytes.drain(..valid);
                drain_events(&mut buf, &mut acc).map_err(crate::ReadError::Fatal)?;
                if acc.done {
                    break;
                }
            }
            None => {
                buf.push_str("\n\n");
                drain_events(&mut buf, &mut acc).map_err(crate::ReadError::Fatal)?;
                break;
            }
        }
    }
    if !acc.done && acc.finish_reason.is_none() {
        // The connection closed mid-answer: worth another attempt.
        return Err(crate::ReadError::Transient(
            "stream ended before [DONE] or a finish_reason".into(),
        ));
    }
    Ok(Received {
        raw_content: acc.content,
        reasoning_content: acc.reasoning,
        pending: acc
            .calls
            .into_iter()
            .map(|(id, name, args)| (Some(id), name, args))
            .collect(),
        finish_reason: acc.finish_reason,
        usage: acc.usage,
        id: acc.id,
        model: acc.model,
        system_fingerprint: acc.system_fingerprint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools() -> Vec<Value> {
        vec![
            serde_json::json!({"type": "function", "function": {"name": "str_replace_editor",
            "parameters": {"type": "object", "properties": {
                "command": {"type": "string"}, "path": {"type": "string"},
                "insert_line": {"type": "integer"}, "view_range": {"type": "array"}}}}}),
        ]
    }

    #[test]
    fn hermes_calls_in_text() {
        let t = "Let me look.\n<tool_call>\n{\"name\": \"bash\", \"arguments\": {\"command\": \"ls /testbed\"}}\n</tool_call>";
        let p = parse_text_calls(t, &[]);
        assert_eq!(p.source, Some(CallSource::HermesText));
        assert_eq!(p.calls.len(), 1);
        assert_eq!(p.calls[0].function.name, "bash");
        let a: Value = serde_json::from_str(&p.calls[0].function.arguments).unwrap();
        assert_eq!(a["command"], "ls /testbed");
        assert_eq!(p.rest.trim(), "Let me look.");
        // Unclosed (stopped at the stop token), and a broken body.
        let p = parse_text_calls(
            "<tool_call>\n{\"name\": \"submit\", \"arguments\": {}}",
            &[],
        );
        assert_eq!(p.calls[0].function.name, "submit");
        let p = parse_text_calls(
            "<tool_call>{\"name\": \"bash\", \"arguments\": {\"command\": \"ls}</tool_call>",
            &[],
        );
        assert!(p.calls.is_empty());
        assert_eq!(p.malformed.len(), 1);
    }

    #[test]
    fn glm45_calls_in_text() {
        let t = "I will view it.<tool_call>str_replace_editor\n<arg_key>command</arg_key>\n<arg_value>view</arg_value>\n<arg_key>path</arg_key>\n<arg_value>/testbed/calc.py</arg_value>\n<arg_key>view_range</arg_key>\n<arg_value>[1, 5]</arg_value>\n</tool_call>";
        let p = parse_text_calls(t, &tools());
        assert_eq!(p.source, Some(CallSource::Glm45Text));
        let a: Value = serde_json::from_str(&p.calls[0].function.arguments).unwrap();
        assert_eq!(a["command"], "view");
        assert_eq!(a["path"], "/testbed/calc.py");
        assert_eq!(a["view_range"], serde_json::json!([1, 5]));
        assert_eq!(p.rest, "I will view it.");
        // A string parameter that looks like a number stays a string.
        let t = "<tool_call>str_replace_editor\n<arg_key>path</arg_key>\n<arg_value>123</arg_value>\n</tool_call>";
        let a: Value =
            serde_json::from_str(&parse_text_calls(t, &tools()).calls[0].function.arguments)
                .unwrap();
        assert_eq!(a["path"], "123");
    }

    #[test]
    fn stream_fragments_join_by_index() {
        let mut acc = Accumulator::default();
        let mut buf = String::new();
        buf.push_str("data: {\"id\":\"c1\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n");
        buf.push_str("data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"chatcmpl-tool-1\",\"type\":\"function\",\"function\":{\"name\":\"bash\"}}]}}]}\n\n");
        buf.push_str("data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"command\\\": \"}}]}}]}\n\n");
        buf.push_str("data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"\\\"ls\\\"}\"}}]}}]}\n\ndata: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\ndata: [DO");
        drain_events(&mut buf, &mut acc).unwrap();
        assert!(!acc.done);
        buf.push_str("NE]\n\n");
        drain_events(&mut buf, &mut acc).unwrap();
        assert!(acc.done);
        assert_eq!(acc.calls[0].0, "chatcmpl-tool-1");
        assert_eq!(acc.calls[0].1, "bash");
        assert_eq!(acc.calls[0].2, "{\"command\": \"ls\"}");
    }
}
