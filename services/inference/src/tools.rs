//! Chat requests: messages and tools checked field by field, and `<tool_call>` blocks in model
//! output parsed into OpenAI `tool_calls` (the hermes format Qwen2.5 is trained on, as vLLM's
//! `hermes` parser reads it).
use crate::api::{ApiError, ApiResult};
use davinci_core::traj::{Message, ToolCall, ToolCallFunction};
use serde_json::Value;

/// Messages in the shape the chat template takes. `content` may be a string, null, or a list
/// of `{type: "text", text}` parts (joined).
pub fn parse_messages(v: Option<&Value>) -> ApiResult<Vec<Message>> {
    let list = match v {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid(
                "messages",
                "`messages` must not be empty.",
            ));
        }
        None => return Err(ApiError::invalid("messages", "`messages` is required.")),
        Some(_) => return Err(ApiError::invalid("messages", "`messages` must be a list.")),
    };
    list.iter()
        .enumerate()
        .map(|(i, m)| parse_message(i, m))
        .collect()
}

fn parse_message(i: usize, m: &Value) -> ApiResult<Message> {
    let p = |f: &str| format!("messages[{i}]{f}");
    let obj = m
        .as_object()
        .ok_or_else(|| ApiError::invalid(p(""), format!("messages[{i}] must be an object.")))?;
    let role = obj
        .get("role")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid(p(".role"), format!("messages[{i}].role is required.")))?;
    if !matches!(role, "system" | "user" | "assistant" | "tool" | "developer") {
        return Err(ApiError::invalid(
            p(".role"),
            format!(
                "messages[{i}].role `{role}` is not one of system, developer, user, assistant, tool."
            ),
        ));
    }
    let content = match obj.get("content") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                match (
                    part.get("type").and_then(Value::as_str),
                    part.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => {
                        return Err(ApiError::invalid(
                            p(&format!(".content[{j}]")),
                            format!(
                                "messages[{i}].content[{j}] must be {{\"type\": \"text\", \"text\": ...}}; this server reads text only."
                            ),
                        ));
                    }
                }
            }
            Some(text)
        }
        Some(_) => {
            return Err(ApiError::invalid(
                p(".content"),
                format!("messages[{i}].content must be a string or a list of text parts."),
            ));
        }
    };
    let mut tool_calls = Vec::new();
    match obj.get("tool_calls") {
        None | Some(Value::Null) => {}
        Some(Value::Array(calls)) if role == "assistant" => {
            for (j, c) in calls.iter().enumerate() {
                let f = c.get("function");
                let name = f.and_then(|f| f.get("name")).and_then(Value::as_str);
                let args = f.and_then(|f| f.get("arguments"));
                let (Some(name), Some(args)) = (name, args) else {
                    return Err(ApiError::invalid(
                        p(&format!(".tool_calls[{j}]")),
                        format!(
                            "messages[{i}].tool_calls[{j}] needs function.name and function.arguments."
                        ),
                    ));
                };
                let arguments = match args {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                tool_calls.push(ToolCall {
                    id: c
                        .get("id")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    kind: "function".into(),
                    function: ToolCallFunction {
                        name: name.to_string(),
                        arguments,
                    },
                });
            }
        }
        Some(_) => {
            return Err(ApiError::invalid(
                p(".tool_calls"),
                format!("messages[{i}].tool_calls must be a list, on an assistant message."),
            ));
        }
    }
    if role == "tool" && content.is_none() {
        return Err(ApiError::invalid(
            p(".content"),
            format!("messages[{i}] (a tool result) needs content."),
        ));
    }
    Ok(Message {
        // The template knows system; `developer` is the newer name for it.
        role: if role == "developer" { "system" } else { role }.to_string(),
        content,
        tool_calls,
        tool_call_id: obj
            .get("tool_call_id")
            .and_then(Value::as_str)
            .map(str::to_string),
        name: obj.get("name").and_then(Value::as_str).map(str::to_string),
        raw_content: None,
        reasoning_content: None,
    })
}

/// Tools as the template renders them; each must be `{type: "function", function: {name,
/// description?, parameters?: object}}`.
pub fn parse_tools(v: Option<&Value>) -> ApiResult<Vec<Value>> {
    let list = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(ApiError::invalid("tools", "`tools` must be a list.")),
    };
    for (i, t) in list.iter().enumerate() {
        let p = |f: &str| format!("tools[{i}]{f}");
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(ApiError::invalid(
                p(".type"),
                format!("tools[{i}].type must be \"function\"."),
            ));
        }
        let f = t
            .get("function")
            .and_then(Value::as_object)
            .ok_or_else(|| {
                ApiError::invalid(
                    p(".function"),
                    format!("tools[{i}].function must be an object."),
                )
            })?;
        match f.get("name").and_then(Value::as_str) {
            Some(n)
                if !n.is_empty()
                    && n.len() <= 64
                    && n.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') => {}
            _ => {
                return Err(ApiError::invalid(
                    p(".function.name"),
                    format!(
                        "tools[{i}].function.name must be 1-64 characters of a-z, A-Z, 0-9, _ and -."
                    ),
                ));
            }
        }
        if let Some(params) = f.get("parameters")
            && !params.is_object()
        {
            return Err(ApiError::invalid(
                p(".function.parameters"),
                format!("tools[{i}].function.parameters must be a JSON Schema object."),
            ));
        }
    }
    Ok(list.clone())
}

/// `tool_choice`: `auto` (the default with tools) or `none` are served; forcing a call needs
/// constrained decoding, which this server does not do.
pub fn parse_tool_choice(v: Option<&Value>) -> ApiResult<bool> {
    match v {
        None | Some(Value::Null) => Ok(true),
        Some(Value::String(s)) if s == "auto" => Ok(true),
        Some(Value::String(s)) if s == "none" => Ok(false),
        Some(other) => Err(ApiError::invalid(
            "tool_choice",
            format!(
                "tool_choice {other} is not supported: this server serves \"auto\" and \"none\" (a forced call needs constrained decoding)."
            ),
        )),
    }
}

/// Text of the assistant message outside tool calls, and the calls.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub content: Option<String>,
    pub calls: Vec<(String, String)>,
}

/// Every well-formed `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` block becomes a
/// call (arguments re-serialised as a JSON string); a block that does not parse stays in the
/// content, so nothing the model wrote is lost.
pub fn parse_tool_calls(text: &str) -> Parsed {
    const OPEN: &str = "<tool_call>";
    const CLOSE: &str = "</tool_call>";
    let mut content = String::new();
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        let after = &rest[start + OPEN.len()..];
        // An unclosed final block (the model hit its length limit) is read to the end.
        let (body, next) = match after.find(CLOSE) {
            Some(end) => (&after[..end], &after[end + CLOSE.len()..]),
            None => (after, ""),
        };
        match parse_call(body) {
            Some(call) => {
                content.push_str(&rest[..start]);
                calls.push(call);
            }
            None => content.push_str(&rest[..rest.len() - next.len()]),
        }
        rest = next;
    }
    content.push_str(rest);
    let trimmed = content.trim();
    Parsed {
        content: if calls.is_empty() {
            Some(text.to_string())
        } else if trimmed.is_empty() {
            None
        } else {
            Some(trimmed.to_string())
        },
        calls,
    }
}

fn parse_call(body: &str) -> Option<(String, String)> {
    let v: Value = serde_json::from_str(body.trim()).ok()?;
    let name = v.get("name")?.as_str()?.to_string();
    let args = match v.get("arguments").or_else(|| v.get("parameters")) {
        None | Some(Value::Null) => "{}".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(a) => a.to_string(),
    };
    Some((name, args))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hermes_calls_and_keeps_broken_ones() {
        let p = parse_tool_calls(
            "Let me check.\n<tool_call>\n{\"name\": \"bash\", \"arguments\": {\"command\": \"ls\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"submit\", \"arguments\": {}}\n</tool_call>",
        );
        assert_eq!(p.content.as_deref(), Some("Let me check."));
        assert_eq!(
            p.calls,
            vec![
                ("bash".into(), "{\"command\":\"ls\"}".into()),
                ("submit".into(), "{}".into())
            ]
        );
        let broken =
            "<tool_call>\n{\"name\": \"bash\", \"arguments\": {\"command\": \n</tool_call>";
        let p = parse_tool_calls(broken);
        assert!(p.calls.is_empty());
        assert_eq!(p.content.as_deref(), Some(broken));
        let unclosed = parse_tool_calls("<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n");
        assert_eq!(unclosed.calls.len(), 1);
        assert_eq!(unclosed.content, None);
    }

    #[test]
    fn malformed_tools_and_messages_name_the_field() {
        let e = parse_tools(Some(
            &serde_json::json!([{"type": "function", "function": {"name": "a b"}}]),
        ))
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tools[0].function.name"));
        let e = parse_messages(Some(
            &serde_json::json!([{"role": "robot", "content": "x"}]),
        ))
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        let e = parse_messages(Some(
            &serde_json::json!([{"role": "user", "content": [{"type": "image_url"}]}]),
        ))
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content[0]"));
        let m = parse_messages(Some(&serde_json::json!([
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "bash", "arguments": "{\"command\": \"ls\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "a.py"}
        ])))
        .unwrap();
        assert_eq!(m[0].tool_calls[0].function.name, "bash");
        assert_eq!(m[1].tool_call_id.as_deref(), Some("c1"));
    }
}
