//! The three tools the agent offers, as OpenAI function schemas, and the checks a call must
//! pass before it runs (SWE-agent's: exactly one call, valid JSON, a known tool, known
//! arguments of the right types, required ones present).
use serde_json::{Value, json};

/// `bash`, `str_replace_editor` and `submit` as OpenAI `tools` entries; every trajectory
/// carries these.
pub fn schemas() -> Vec<Value> {
    vec![
        json!({"type": "function", "function": {
            "name": "bash",
            "description": "Run a bash command in the repository's shell session (working directory and exported variables carry over between calls). The repository is at /testbed. Long-running or interactive commands are stopped at the timeout.",
            "parameters": {"type": "object", "properties": {
                "command": {"type": "string", "description": "The bash command to run."},
                "timeout": {"type": "integer", "description": "Seconds before the command is stopped (default 30)."}
            }, "required": ["command"]}}}),
        json!({"type": "function", "function": {
            "name": "str_replace_editor",
            "description": "View, create and edit files. `view` shows a file with line numbers (or lists a directory two levels deep); `create` writes a new file; `str_replace` replaces exactly one occurrence of `old_str` with `new_str`; `insert` adds `new_str` after line `insert_line`; `undo_edit` reverts the last edit of `path`. Paths are absolute, under /testbed.",
            "parameters": {"type": "object", "properties": {
                "command": {"type": "string", "enum": ["view", "create", "str_replace", "insert", "undo_edit"], "description": "The operation."},
                "path": {"type": "string", "description": "Absolute path of the file or directory, e.g. /testbed/src/module.py."},
                "file_text": {"type": "string", "description": "Contents of the new file (create)."},
                "old_str": {"type": "string", "description": "The exact text to replace; it must occur once (str_replace)."},
                "new_str": {"type": "string", "description": "The replacement (str_replace) or the text to insert (insert)."},
                "insert_line": {"type": "integer", "description": "The line after which `new_str` is inserted; 0 inserts at the top (insert)."},
                "view_range": {"type": "array", "items": {"type": "integer"}, "description": "[start, end] lines to show, 1-based; end -1 means to the end (view)."}
            }, "required": ["command", "path"]}}}),
        json!({"type": "function", "function": {
            "name": "submit",
            "description": "Submit the current changes to the repository as the solution and end the session.",
            "parameters": {"type": "object", "properties": {}}}}),
    ]
}

/// A checked call.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Bash {
        command: String,
        timeout: Option<u64>,
    },
    Editor(EditorCall),
    Submit,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EditorCall {
    View {
        path: String,
        range: Option<(i64, i64)>,
    },
    Create {
        path: String,
        text: String,
    },
    StrReplace {
        path: String,
        old: String,
        new: String,
    },
    Insert {
        path: String,
        line: i64,
        text: String,
    },
    Undo {
        path: String,
    },
}

/// Why a turn's call was refused; the text goes back to the model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error(
        "Your last output did not contain a tool call. Every response must call exactly one of the tools (bash, str_replace_editor, submit); call `submit` when you are done."
    )]
    NoCall,
    #[error(
        "Your last output called {0} tools at once. Call exactly one tool per response; the calls were not run."
    )]
    Multiple(usize),
    #[error(
        "The arguments of your call to `{tool}` are not valid JSON ({error}). No command was run."
    )]
    InvalidJson { tool: String, error: String },
    #[error("There is no tool named `{0}`. The tools are bash, str_replace_editor and submit.")]
    UnknownTool(String),
    #[error("`{tool}` does not take the argument `{arg}`.")]
    UnexpectedArg { tool: String, arg: String },
    #[error("`{tool}` needs the argument `{arg}`.")]
    MissingArg { tool: String, arg: &'static str },
    #[error("The argument `{arg}` of `{tool}` must be {expected}.")]
    BadArg {
        tool: String,
        arg: String,
        expected: &'static str,
    },
}

impl FormatError {
    /// Short name for counters.
    pub fn reason(&self) -> &'static str {
        match self {
            FormatError::NoCall => "no_call",
            FormatError::Multiple(_) => "multiple_calls",
            FormatError::InvalidJson { .. } => "invalid_json",
            FormatError::UnknownTool(_) => "unknown_tool",
            FormatError::UnexpectedArg { .. } => "unexpected_arg",
            FormatError::MissingArg { .. } => "missing_arg",
            FormatError::BadArg { .. } => "bad_arg",
        }
    }
}

fn allowed(tool: &str) -> Option<&'static [&'static str]> {
    Some(match tool {
        "bash" => &["command", "timeout"],
        "str_replace_editor" => &[
            "command",
            "path",
            "file_text",
            "old_str",
            "new_str",
            "insert_line",
            "view_range",
        ],
        "submit" => &[],
        _ => return None,
    })
}

/// Checks one call's name and JSON arguments.
pub fn parse_call(name: &str, arguments: &str) -> Result<Action, FormatError> {
    let keys = allowed(name).ok_or_else(|| FormatError::UnknownTool(name.to_string()))?;
    let args: Value = if arguments.trim().is_empty() {
        json!({})
    } else {
        serde_json::from_str(arguments).map_err(|e| FormatError::InvalidJson {
            tool: name.to_string(),
            error: e.to_string(),
        })?
    };
    let obj = args.as_object().ok_or_else(|| FormatError::InvalidJson {
        tool: name.to_string(),
        error: "not a JSON object".into(),
    })?;
    if let Some(k) = obj.keys().find(|k| !keys.contains(&k.as_str())) {
        return Err(FormatError::UnexpectedArg {
            tool: name.to_string(),
            arg: k.clone(),
        });
    }
    let tool = name.to_string();
    let string = |arg: &'static str| -> Result<Option<String>, FormatError> {
        match obj.get(arg) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(FormatError::BadArg {
                tool: tool.clone(),
                arg: arg.into(),
                expected: "a string",
            }),
        }
    };
    let required = |arg: &'static str| -> Result<String, FormatError> {
        string(arg)?.ok_or(FormatError::MissingArg {
            tool: tool.clone(),
            arg,
        })
    };
    // Models often send integers as strings ("30"); accept both.
    let integer = |arg: &'static str| -> Result<Option<i64>, FormatError> {
        match obj.get(arg) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) if n.is_i64() => Ok(n.as_i64()),
            Some(Value::String(s)) if s.trim().parse::<i64>().is_ok() => {
                Ok(s.trim().parse::<i64>().ok())
            }
            Some(_) => Err(FormatError::BadArg {
                tool: tool.clone(),
                arg: arg.into(),
                expected: "an integer",
            }),
        }
    };
    match name {
        "bash" => {
            let timeout = match integer("timeout")? {
                Some(t) if t <= 0 => {
                    return Err(FormatError::BadArg {
                        tool,
                        arg: "timeout".into(),
                        expected: "a positive integer",
                    });
                }
                t => t.map(|t| t as u64),
            };
            Ok(Action::Bash {
                command: required("command")?,
                timeout,
            })
        }
        "submit" => Ok(Action::Submit),
        _ => {
            let command = required("command")?;
            let path = required("path")?;
            Ok(Action::Editor(match command.as_str() {
                "view" => {
                    let range = match obj.get("view_range") {
                        None | Some(Value::Null) => None,
                        Some(Value::Array(a))
                            if a.len() == 2 && a.iter().all(|v| v.as_i64().is_some()) =>
                        {
                            Some((a[0].as_i64().unwrap(), a[1].as_i64().unwrap()))
                        }
                        Some(_) => {
                            return Err(FormatError::BadArg {
                                tool,
                                arg: "view_range".into(),
                                expected: "a list of two integers",
                            });
                        }
                    };
                    EditorCall::View { path, range }
                }
                "create" => EditorCall::Create {
                    text: required("file_text")?,
                    path,
                },
                "str_replace" => EditorCall::StrReplace {
                    old: required("old_str")?,
                    new: string("new_str")?.unwrap_or_default(),
                    path,
                },
                "insert" => EditorCall::Insert {
                    line: integer("insert_line")?.ok_or(FormatError::MissingArg {
                        tool: tool.clone(),
                        arg: "insert_line",
                    })?,
                    text: required("new_str")?,
                    path,
                },
                "undo_edit" => EditorCall::Undo { path },
                _ => {
                    return Err(FormatError::BadArg {
                        tool,
                        arg: "command".into(),
                        expected: "one of view, create, str_replace, insert, undo_edit",
                    });
                }
            }))
        }
    }
}

/// Cuts `text` over `max` characters to its head and tail, saying how much was left out.
pub fn truncate(text: &str, max: usize) -> String {
    let n = text.chars().count();
    if n <= max {
        return text.to_string();
    }
    let keep = max / 2;
    let head: String = text.chars().take(keep).collect();
    let tail: String = text.chars().skip(n - keep).collect();
    format!(
        "{head}\n<response clipped: {} characters elided>\n{tail}",
        n - 2 * keep
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_checked() {
        assert_eq!(
            parse_call("bash", r#"{"command": "ls", "timeout": "5"}"#).unwrap(),
            Action::Bash {
                command: "ls".into(),
                timeout: Some(5)
            }
        );
        assert_eq!(parse_call("submit", "").unwrap(), Action::Submit);
        assert_eq!(
            parse_call("bash", r#"{"command": "ls""#)
                .unwrap_err()
                .reason(),
            "invalid_json"
        );
        assert_eq!(
            parse_call("python", "{}").unwrap_err().reason(),
            "unknown_tool"
        );
        assert_eq!(
            parse_call("bash", r#"{"cmd": "ls"}"#).unwrap_err().reason(),
            "unexpected_arg"
        );
        assert_eq!(
            parse_call(
                "str_replace_editor",
                r#"{"command": "create", "path": "/testbed/a"}"#
            )
            .unwrap_err()
            .reason(),
            "missing_arg"
        );
        assert_eq!(
            parse_call(
                "str_replace_editor",
                r#"{"command": "view", "path": "/testbed/a", "view_range": [3, -1]}"#
            )
            .unwrap(),
            Action::Editor(EditorCall::View {
                path: "/testbed/a".into(),
                range: Some((3, -1))
            })
        );
        assert_eq!(
            parse_call("bash", r#"{"command": 5}"#)
                .unwrap_err()
                .reason(),
            "bad_arg"
        );
    }

    #[test]
    fn truncation_keeps_head_and_tail() {
        let t = format!("{}{}", "a".repeat(60), "b".repeat(60));
        let c = truncate(&t, 20);
        assert!(c.starts_with("aaaaaaaaaa\n"), "{c}");
        assert!(c.ends_with("\nbbbbbbbbbb"), "{c}");
        assert!(c.contains("100 characters elided"), "{c}");
        assert_eq!(truncate("short", 20), "short");
        assert_eq!(schemas().len(), 3);
    }
}
