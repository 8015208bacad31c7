//! Chat rendering of trajectories with the Qwen2.5 chat template (ChatML with tools) and the
//! loss masks training uses.
//!
//! The output is the string the published Qwen2.5 `chat_template` produces through
//! `apply_chat_template(messages, tools=tools)`: tools as JSON lines inside `<tools>` in the
//! system block, assistant calls as `<tool_call>` JSON, and tool results as `<tool_response>`
//! blocks inside one `user` turn per run of consecutive tool messages. JSON is written the way
//! Jinja's `tojson` filter in `transformers` writes it (Python `json.dumps`, separators `", "`
//! and `": "`, non-ASCII kept).
use crate::{Result, TokenizeError, Tokenizer};
use davinci_core::traj::{Message, Trajectory};
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// Qwen2.5's system prompt when the conversation has none.
pub const QWEN25_DEFAULT_SYSTEM: &str =
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";

pub use davinci_core::packed::MaskMode;

/// Rendered text as pieces that are or are not assistant output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rendered {
    pub segments: Vec<(String, bool)>,
}

impl Rendered {
    fn push(&mut self, s: &str, assistant: bool) {
        if s.is_empty() {
            return;
        }
        match self.segments.last_mut() {
            Some((last, a)) if *a == assistant => last.push_str(s),
            _ => self.segments.push((s.to_string(), assistant)),
        }
    }

    pub fn text(&self) -> String {
        self.segments.iter().map(|(s, _)| s.as_str()).collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("message {index}: unknown role `{role}`")]
    Role { index: usize, role: String },
    #[error("trajectory has no messages")]
    Empty,
}

fn content(m: &Message) -> &str {
    m.content.as_deref().unwrap_or("")
}

/// Renders a trajectory with the Qwen2.5 template (no generation prompt).
pub fn render_qwen25(traj: &Trajectory) -> Result<Rendered, ChatError> {
    render_qwen25_messages(&traj.tools, &traj.messages, false)
}

/// Renders a conversation with the Qwen2.5 template; with `add_generation_prompt` the text
/// ends with the opened assistant turn a model continues (`apply_chat_template(...,
/// add_generation_prompt=True)`), as a server prompts for the next message.
pub fn render_qwen25_messages(
    tools: &[serde_json::Value],
    msgs: &[Message],
    add_generation_prompt: bool,
) -> Result<Rendered, ChatError> {
    if msgs.is_empty() {
        return Err(ChatError::Empty);
    }
    let mut r = Rendered::default();
    let first_is_system = msgs[0].role == "system";
    if !tools.is_empty() {
        r.push("<|im_start|>system\n", false);
        r.push(
            if first_is_system {
                content(&msgs[0])
            } else {
                QWEN25_DEFAULT_SYSTEM
            },
            false,
        );
        r.push(
            "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
             You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
            false,
        );
        for tool in tools {
            r.push("\n", false);
            r.push(&py_json(&Json::from(tool)), false);
        }
        r.push(
            "\n</tools>\n\nFor each function call, return a json object with function name and \
             arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": \
             <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n",
            false,
        );
    } else if first_is_system {
        r.push("<|im_start|>system\n", false);
        r.push(content(&msgs[0]), false);
        r.push("<|im_end|>\n", false);
    } else {
        r.push("<|im_start|>system\n", false);
        r.push(QWEN25_DEFAULT_SYSTEM, false);
        r.push("<|im_end|>\n", false);
    }
    for (i, m) in msgs.iter().enumerate() {
        match m.role.as_str() {
            "system" if i == 0 => {}
            "user" | "system" => {
                r.push(&format!("<|im_start|>{}\n", m.role), false);
                r.push(content(m), false);
                r.push("<|im_end|>\n", false);
            }
            "assistant" => {
                r.push("<|im_start|>assistant", false);
                if m.tool_calls.is_empty() {
                    r.push("\n", true);
                    r.push(content(m), true);
                } else {
                    if !content(m).is_empty() {
                        r.push("\n", true);
                        r.push(content(m), true);
                    }
                    for call in &m.tool_calls {
                        r.push("\n<tool_call>\n{\"name\": \"", true);
                        r.push(&call.function.name, true);
                        r.push("\", \"arguments\": ", true);
                        // OpenAI messages carry arguments as a JSON string; the template is fed
                        // the parsed object (a string that is not JSON stays a string).
                        let args = serde_json::from_str::<Json>(&call.function.arguments)
                            .unwrap_or_else(|_| Json::Str(call.function.arguments.clone()));
                        r.push(&py_json(&args), true);
                        r.push("}\n</tool_call>", true);
                    }
                }
                r.push("<|im_end|>", true);
                r.push("\n", false);
            }
            "tool" => {
                if i == 0 || msgs[i - 1].role != "tool" {
                    r.push("<|im_start|>user", false);
                }
                r.push("\n<tool_response>\n", false);
                r.push(content(m), false);
                r.push("\n</tool_response>", false);
                if i + 1 == msgs.len() || msgs[i + 1].role != "tool" {
                    r.push("<|im_end|>\n", false);
                }
            }
            other => {
                return Err(ChatError::Role {
                    index: i,
                    role: other.to_string(),
                });
            }
        }
    }
    if add_generation_prompt {
        r.push("<|im_start|>assistant\n", false);
    }
    Ok(r)
}

/// Token ids of a rendered conversation and a 0/1 loss mask of the same length.
///
/// The whole text is encoded at once (ids equal those of encoding the full string); a token is
/// trained when any of its bytes belongs to an assistant segment.
pub fn tokenize_rendered(
    tok: &Tokenizer,
    r: &Rendered,
    mode: MaskMode,
) -> Result<(Vec<u32>, Vec<u8>)> {
    // Segment boundaries sit next to ASCII template characters, which never compose under NFC,
    // so normalizing segment by segment equals normalizing the whole text.
    let mut text = String::new();
    let mut trained: Vec<(usize, usize)> = Vec::new();
    for (s, a) in &r.segments {
        let n = tok.normalize(s)?;
        if *a {
            trained.push((text.len(), text.len() + n.len()));
        }
        text.push_str(&n);
    }
    let (ids, spans) = tok.encode_with_spans(&text)?;
    let mask = match mode {
        MaskMode::All => vec![1u8; ids.len()],
        MaskMode::AssistantOnly => {
            let mut k = 0;
            spans
                .iter()
                .map(|&(s, e)| {
                    while k < trained.len() && trained[k].1 <= s {
                        k += 1;
                    }
                    u8::from(k < trained.len() && trained[k].0 < e.max(s + 1))
                })
                .collect()
        }
    };
    if mask.len() != ids.len() {
        return Err(TokenizeError::Encode("mask length differs from ids".into()));
    }
    Ok((ids, mask))
}

/// JSON value that keeps object keys in document order (what Python's `json.loads` keeps).
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl From<&serde_json::Value> for Json {
    fn from(v: &serde_json::Value) -> Self {
        use serde_json::Value as V;
        match v {
            V::Null => Json::Null,
            V::Bool(b) => Json::Bool(*b),
            V::Number(n) => match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => Json::Int(i as i128),
                (_, Some(u)) => Json::Int(u as i128),
                _ => Json::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            V::String(s) => Json::Str(s.clone()),
            V::Array(a) => Json::Arr(a.iter().map(Json::from).collect()),
            V::Object(o) => Json::Obj(o.iter().map(|(k, v)| (k.clone(), Json::from(v))).collect()),
        }
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Json;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("JSON")
            }
            fn visit_unit<E>(self) -> std::result::Result<Json, E> {
                Ok(Json::Null)
            }
            fn visit_bool<E>(self, b: bool) -> std::result::Result<Json, E> {
                Ok(Json::Bool(b))
            }
            fn visit_i64<E>(self, i: i64) -> std::result::Result<Json, E> {
                Ok(Json::Int(i as i128))
            }
            fn visit_u64<E>(self, u: u64) -> std::result::Result<Json, E> {
                Ok(Json::Int(u as i128))
            }
            fn visit_f64<E>(self, f: f64) -> std::result::Result<Json, E> {
                Ok(Json::Float(f))
            }
            fn visit_str<E>(self, s: &str) -> std::result::Result<Json, E> {
                Ok(Json::Str(s.to_string()))
            }
            fn visit_string<E>(self, s: String) -> std::result::Result<Json, E> {
                Ok(Json::Str(s))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> std::result::Result<Json, A::Error> {
                let mut v = Vec::new();
                while let Some(x) = a.next_element()? {
                    v.push(x);
                }
                Ok(Json::Arr(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> std::result::Result<Json, A::Error> {
                let mut v: Vec<(String, Json)> = Vec::new();
                while let Some((k, x)) = a.next_entry::<String, Json>()? {
                    // Python keeps the last value of a repeated key, at the first key's place.
                    if let Some(slot) = v.iter_mut().find(|(kk, _)| *kk == k) {
                        slot.1 = x;
                    } else {
                        v.push((k, x));
                    }
                }
                Ok(Json::Obj(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// Python `json.dumps(v, ensure_ascii=False)`.
pub fn py_json(v: &Json) -> String {
    let mut out = String::new();
    write_py(v, &mut out);
    out
}

fn write_py(v: &Json, out: &mut String) {
    match v {
        Json::Null => out.push_str("null"),
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::Int(i) => out.push_str(&i.to_string()),
        Json::Float(f) => out.push_str(&py_float(*f)),
        Json::Str(s) => py_str(s, out),
        Json::Arr(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_py(x, out);
            }
            out.push(']');
        }
        Json::Obj(o) => {
            out.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_str(k, out);
                out.push_str(": ");
                write_py(x, out);
            }
            out.push('}');
        }
    }
}

fn py_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form below 1e-4 or from 1e16.
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let sci = format!("{f:e}"); // e.g. "1.5e-7", "-3e20"
    let (mant, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    if (-4..16).contains(&exp) {
        let s = format!("{f}");
        if s.contains('.') { s } else { format!("{s}.0") }
    } else {
        format!("{mant}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use davinci_core::traj::{Outcome, ToolCall, ToolCallFunction};

    fn msg(role: &str, c: &str) -> Message {
        Message {
            role: role.into(),
            content: Some(c.into()),
            tool_calls: vec![],
            ..Default::default()
        }
    }

    pub(crate) fn sample_traj() -> Trajectory {
        let mut call = msg("assistant", "Let me look.");
        call.tool_calls = vec![ToolCall {
            id: "c1".into(),
            kind: "function".into(),
            function: ToolCallFunction {
                name: "bash".into(),
                arguments: r#"{"command": "ls /testbed", "timeout": 30}"#.into(),
            },
        }];
        Trajectory {
            schema: davinci_core::traj::TRAJ_SCHEMA.into(),
            id: "t1".into(),
            task_id: "x__y-1".into(),
            model: "m".into(),
            tools: vec![
                serde_json::json!({"type": "function", "function": {"name": "bash", "parameters": {"type": "object"}}}),
            ],
            messages: vec![
                msg("system", "You are a coding agent."),
                msg("user", "Fix the bug."),
                call,
                msg("tool", "a.py\nb.py"),
                msg("tool", "ok"),
                msg("assistant", "Done."),
            ],
            outcome: Outcome {
                resolved: true,
                exit_status: "submitted".into(),
                tests: Default::default(),
            },
            n_tokens: None,
            run: None,
            metadata: Default::default(),
        }
    }

    #[test]
    fn renders_qwen25_chatml_with_tools() {
        let r = render_qwen25(&sample_traj()).unwrap();
        let expected = "<|im_start|>system\nYou are a coding agent.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{\"function\": {\"name\": \"bash\", \"parameters\": {\"type\": \"object\"}}, \"type\": \"function\"}\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nFix the bug.<|im_end|>\n<|im_start|>assistant\nLet me look.\n<tool_call>\n{\"name\": \"bash\", \"arguments\": {\"command\": \"ls /testbed\", \"timeout\": 30}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\na.py\nb.py\n</tool_response>\n<tool_response>\nok\n</tool_response><|im_end|>\n<|im_start|>assistant\nDone.<|im_end|>\n";
        assert_eq!(r.text(), expected);
        let trained: String = r
            .segments
            .iter()
            .filter(|s| s.1)
            .map(|s| s.0.as_str())
            .collect();
        assert_eq!(
            trained,
            "\nLet me look.\n<tool_call>\n{\"name\": \"bash\", \"arguments\": {\"command\": \"ls /testbed\", \"timeout\": 30}}\n</tool_call><|im_end|>\nDone.<|im_end|>"
        );
    }

    #[test]
    fn generation_prompt_opens_the_assistant_turn() {
        let t = sample_traj();
        let plain = render_qwen25(&t).unwrap().text();
        let prompted = render_qwen25_messages(&t.tools, &t.messages, true)
            .unwrap()
            .text();
        assert_eq!(prompted, format!("{plain}<|im_start|>assistant\n"));
    }

    #[test]
    fn no_tools_default_system() {
        let mut t = sample_traj();
        t.tools.clear();
        t.messages = vec![msg("user", "hi"), msg("assistant", "yo")];
        assert_eq!(
            render_qwen25(&t).unwrap().text(),
            format!(
                "<|im_start|>system\n{QWEN25_DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
            )
        );
        t.messages.push(msg("critic", "?"));
        assert!(matches!(
            render_qwen25(&t),
            Err(ChatError::Role { index: 2, .. })
        ));
    }

    #[test]
    fn python_json_dumps_style() {
        let j: Json = serde_json::from_str(
            r#"{"z": [1, 2.5, 1e20, 1e-7, "é\n\u0001"], "a": null, "z2": true}"#,
        )
        .unwrap();
        assert_eq!(
            py_json(&j),
            "{\"z\": [1, 2.5, 1e+20, 1e-07, \"é\\n\\u0001\"], \"a\": null, \"z2\": true}"
        );
        assert_eq!(py_float(100.0), "100.0");
        assert_eq!(py_float(0.0001), "0.0001");
        assert_eq!(py_float(1.5e16), "1.5e+16");
    }

    #[test]
    fn assistant_only_mask_covers_assistant_tokens() {
        let tok = Tokenizer::from_file(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/tiny-qwen-shape.json"
        ))
        .unwrap();
        let r = render_qwen25(&sample_traj()).unwrap();
        let (ids, mask) = tokenize_rendered(&tok, &r, MaskMode::AssistantOnly).unwrap();
        assert_eq!(ids, tok.encode_reference(&r.text()).unwrap());
        let pick = |want: u8| -> Vec<u32> {
            ids.iter()
                .zip(&mask)
                .filter(|(_, m)| **m == want)
                .map(|(i, _)| *i)
                .collect()
        };
        let trained = tok.decode(&pick(1)).unwrap();
        let untrained = tok.decode(&pick(0)).unwrap();
        assert!(
            trained.contains("Let me look.")
                && trained.contains("ls /testbed")
                && trained.contains("Done."),
            "{trained}"
        );
        assert!(
            !trained.contains("Fix the bug") && !trained.contains("a.py"),
            "{trained}"
        );
        assert!(untrained.contains("Fix the bug") && untrained.contains("<tool_response>"));
        let im_end = tok.token_to_id("<|im_end|>").unwrap();
        let trained_ends = ids
            .iter()
            .zip(&mask)
            .filter(|(i, m)| **i == im_end && **m == 1)
            .count();
        assert_eq!(
            trained_ends, 2,
            "both assistant turns end with a trained <|im_end|>"
        );
        let (_, all) = tokenize_rendered(&tok, &r, MaskMode::All).unwrap();
        assert!(all.iter().all(|&m| m == 1));
    }
}
