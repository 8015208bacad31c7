//! Who decides the next call: a model behind an OpenAI-compatible endpoint, the task's gold
//! patch replayed through the tools (which checks the scaffold end to end with no model), or
//! nothing at all (submits at once: checks that grading rejects an unchanged repository).
use davinci_core::task::TaskInstance;
use davinci_core::traj::{Message, Sampling};
use davinci_llm::{ChatClient, ChatMessage, FunctionCall, ToolCall, Usage};
use serde_json::{Value, json};
use std::sync::Arc;

/// One assistant turn.
#[derive(Debug, Clone, Default)]
pub struct ModelTurn {
    /// The text as produced (calls written as text still in it).
    pub raw_content: Option<String>,
    /// The text without calls.
    pub content: Option<String>,
    pub reasoning_content: Option<String>,
    pub tool_calls: Vec<ToolCall>,
    /// Calls written as text that could not be read.
    pub malformed: Vec<String>,
    pub usage: Option<Usage>,
    pub seconds: f64,
    pub attempts: u32,
    /// What the server said about itself (model name, system_fingerprint).
    pub server_model: Option<String>,
    pub system_fingerprint: Option<String>,
}

/// Why a policy gave no turn.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The conversation no longer fits the model's context.
    #[error("context window exceeded: {0}")]
    ContextOverflow(String),
    /// The model could not be reached or kept failing (infrastructure, not the model's fault).
    #[error("model endpoint failed: {0}")]
    Unavailable(String),
}

/// Decides the next assistant turn from the conversation so far.
#[async_trait::async_trait]
pub trait Policy: Send {
    /// `replay`, `openai`, `null`.
    fn kind(&self) -> &'static str;
    /// The model name recorded on the trajectory.
    fn model(&self) -> String;
    fn sampling(&self) -> Option<Sampling> {
        None
    }
    fn server(&self) -> Option<Value> {
        None
    }
    /// SHA-256 of the chat template the model is served with, where known.
    fn chat_template_sha256(&self) -> Option<String> {
        None
    }
    async fn next(
        &mut self,
        messages: &[Message],
        tools: &[Value],
    ) -> Result<ModelTurn, PolicyError>;
}

fn call(i: usize, name: &str, args: Value) -> ToolCall {
    ToolCall {
        id: format!("call_{i}"),
        kind: "function".into(),
        function: FunctionCall {
            name: name.into(),
            arguments: args.to_string(),
        },
    }
}

fn scripted(i: usize, text: &str, name: &str, args: Value) -> ModelTurn {
    ModelTurn {
        raw_content: Some(text.to_string()),
        content: Some(text.to_string()),
        tool_calls: vec![call(i, name, args)],
        ..Default::default()
    }
}

/// Submits without doing anything.
#[derive(Debug, Default)]
pub struct NullPolicy;

#[async_trait::async_trait]
impl Policy for NullPolicy {
    fn kind(&self) -> &'static str {
        "null"
    }
    fn model(&self) -> String {
        "null".into()
    }
    async fn next(&mut self, _: &[Message], _: &[Value]) -> Result<ModelTurn, PolicyError> {
        Ok(scripted(
            0,
            "I will submit without changes.",
            "submit",
            json!({}),
        ))
    }
}

/// One planned step of a replay.
#[derive(Debug, Clone)]
struct Planned {
    text: String,
    tool: &'static str,
    args: Value,
    /// The file this edit belongs to, so a failed edit falls back to `git apply` of its diff.
    file: Option<usize>,
}

/// A file's part of the gold patch.
#[derive(Debug, Clone)]
struct FileDiff {
    path: String,
    diff: String,
}

/// Replays the task's gold patch: a look at the repository, then per file a `view` and one
/// `str_replace` per hunk (new files by `create`, deletions, renames and binary changes by
/// `git apply` of that file's diff through `bash`), then `submit`. An edit the editor refuses
/// (a hunk whose text is not unique) makes that file fall back to `git apply` of its diff.
#[derive(Debug)]
pub struct ReplayPolicy {
    mount: String,
    files: Vec<FileDiff>,
    plan: std::collections::VecDeque<Planned>,
    fell_back: Vec<usize>,
    last_file: Option<usize>,
    n: usize,
}

fn split_files(patch: &str) -> Vec<FileDiff> {
    let mut out: Vec<FileDiff> = Vec::new();
    for chunk in patch.split_inclusive('\n') {
        if let Some(rest) = chunk.strip_prefix("diff --git a/") {
            let path = rest
                .trim_end()
                .split_once(" b/")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default();
            out.push(FileDiff {
                path,
                diff: String::new(),
            });
        }
        if let Some(f) = out.last_mut() {
            f.diff.push_str(chunk);
        }
    }
    out
}

impl ReplayPolicy {
    pub fn new(task: &TaskInstance, mount: &str) -> ReplayPolicy {
        let mount = mount.trim_end_matches('/').to_string();
        let files = split_files(&task.patch);
        let mut plan = std::collections::VecDeque::new();
        plan.push_back(Planned {
            text: "Let me look at the repository first.".into(),
            tool: "bash",
            args: json!({"command": format!("cd {mount} && git status --short && ls")}),
            file: None,
        });
        for (i, f) in files.iter().enumerate() {
            let abs = format!("{mount}/{}", f.path);
            let plain_text_change = !f.diff.contains("\nrename from ")
                && !f.diff.contains("\ncopy from ")
                && !f.diff.contains("\nGIT binary patch")
                && !f.diff.contains("\nBinary files ")
                && !f.diff.contains("\nold mode ");
            let hunks = davinci_core::diff::parse_hunks(&f.diff).ok();
            let new_file =
                f.diff.contains("\nnew file mode ") || f.diff.contains("\n--- /dev/null");
            let deleted =
                f.diff.contains("\ndeleted file mode ") || f.diff.contains("\n+++ /dev/null");
            let no_eol = f.diff.contains("\\ No newline at end of file");
            match hunks {
                Some(h) if plain_text_change && new_file && !no_eol && h.len() == 1 => {
                    plan.push_back(Planned {
                        text: format!("I'll create {abs}."),
                        tool: "str_replace_editor",
                        args: json!({"command": "create", "path": abs, "file_text": h[0].new_lines.concat()}),
                        file: Some(i),
                    });
                }
                Some(h)
                    if plain_text_change && !new_file && !deleted && !no_eol && !h.is_empty() =>
                {
                    plan.push_back(Planned {
                        text: format!("Let me read {abs}."),
                        tool: "str_replace_editor",
                        args: json!({"command": "view", "path": abs}),
                        file: Some(i),
                    });
                    for hunk in h {
                        plan.push_back(Planned {
                            text: format!("Now I'll edit {abs} around line {}.", hunk.old_start),
                            tool: "str_replace_editor",
                            args: json!({"command": "str_replace", "path": abs,
                                "old_str": hunk.old_lines.concat(), "new_str": hunk.new_lines.concat()}),
                            file: Some(i),
                        });
                    }
                }
                _ => plan.push_back(apply_step(&mount, f, i)),
            }
        }
        plan.push_back(Planned {
            text: "Let me check the change.".into(),
            tool: "bash",
            args: json!({"command": format!("cd {mount} && git diff --stat")}),
            file: None,
        });
        plan.push_back(Planned {
            text: "The change is complete; submitting.".into(),
            tool: "submit",
            args: json!({}),
            file: None,
        });
        ReplayPolicy {
            mount,
            files,
            plan,
            fell_back: Vec::new(),
            last_file: None,
            n: 0,
        }
    }
}

/// `git apply` of one file's diff through a here-document.
fn apply_step(mount: &str, f: &FileDiff, i: usize) -> Planned {
    let mut marker = "DAVINCI_PATCH_EOF".to_string();
    while f.diff.contains(&marker) {
        marker.push('X');
    }
    Planned {
        text: format!("I'll apply the change to {} with git apply.", f.path),
        tool: "bash",
        args: json!({"command": format!(
            "cd {mount} && git checkout -q -- {p} 2>/dev/null; git apply --whitespace=nowarn - <<'{marker}'\n{d}{marker}\n",
            p = davinci_swebench::specs::shell_quote(&f.path),
            d = f.diff
        )}),
        file: Some(i),
    }
}

#[async_trait::async_trait]
impl Policy for ReplayPolicy {
    fn kind(&self) -> &'static str {
        "replay"
    }
    fn model(&self) -> String {
        "replay".into()
    }
    async fn next(&mut self, messages: &[Message], _: &[Value]) -> Result<ModelTurn, PolicyError> {
        // An edit the editor refused: redo that file with git apply, dropping its other edits.
        if let (Some(i), Some(last)) = (self.last_file, messages.last())
            && last.role == "tool"
            && last.content.as_deref().is_some_and(|c| {
                c.starts_with("No replacement was performed")
                    || c.starts_with("File already exists")
            })
            && !self.fell_back.contains(&i)
        {
            self.fell_back.push(i);
            self.plan.retain(|p| p.file != Some(i));
            self.plan
                .push_front(apply_step(&self.mount, &self.files[i], i));
        }
        let p = self.plan.pop_front().unwrap_or(Planned {
            text: "Submitting.".into(),
            tool: "submit",
            args: json!({}),
            file: None,
        });
        self.last_file = p.file;
        self.n += 1;
        Ok(scripted(self.n, &p.text, p.tool, p.args))
    }
}

/// A model behind an OpenAI-compatible endpoint (vLLM, SGLang, hosted APIs).
pub struct OpenAiPolicy {
    client: Arc<ChatClient>,
    chat_template_sha256: Option<String>,
}

impl OpenAiPolicy {
    /// `client` may be shared by many rollouts: it holds the endpoint's concurrency limit.
    pub fn new(client: Arc<ChatClient>) -> OpenAiPolicy {
        OpenAiPolicy {
            client,
            chat_template_sha256: None,
        }
    }

    /// Records the hash of the chat template the server renders with (e.g. of the model's
    /// `tokenizer_config.json` `chat_template`), which the endpoint does not report.
    pub fn with_chat_template_sha256(mut self, sha256: Option<String>) -> OpenAiPolicy {
        self.chat_template_sha256 = sha256;
        self
    }
}

/// The conversation as the API takes it (our extra fields left out).
fn wire(messages: &[Message]) -> Vec<ChatMessage> {
    messages
        .iter()
        .map(|m| ChatMessage {
            role: m.role.clone(),
            content: m.content.clone(),
            tool_calls: m.tool_calls.clone(),
            tool_call_id: m.tool_call_id.clone(),
            name: m.name.clone(),
        })
        .collect()
}

#[async_trait::async_trait]
impl Policy for OpenAiPolicy {
    fn kind(&self) -> &'static str {
        "openai"
    }
    fn model(&self) -> String {
        self.client.config().model.clone()
    }
    fn sampling(&self) -> Option<Sampling> {
        let c = self.client.config();
        Some(Sampling {
            temperature: c.temperature,
            top_p: c.top_p,
            seed: c.seed,
            max_tokens: c.max_tokens,
        })
    }
    fn chat_template_sha256(&self) -> Option<String> {
        self.chat_template_sha256.clone()
    }
    fn server(&self) -> Option<Value> {
        Some(
            json!({"base_url": self.client.config().base_url, "stream": self.client.config().stream}),
        )
    }
    async fn next(
        &mut self,
        messages: &[Message],
        tools: &[Value],
    ) -> Result<ModelTurn, PolicyError> {
        let req = self.client.tool_request(wire(messages), tools.to_vec());
        match self.client.complete_tools(&req).await {
            Ok(t) => Ok(ModelTurn {
                raw_content: t.raw_content,
                content: t.content,
                reasoning_content: t.reasoning_content,
                tool_calls: t.tool_calls,
                malformed: t.malformed,
                usage: t.usage,
                seconds: t.seconds,
                attempts: t.attempts,
                server_model: Some(t.model),
                system_fingerprint: t.system_fingerprint,
            }),
            Err(e) if e.is_context_overflow() => Err(PolicyError::ContextOverflow(e.to_string())),
            Err(e) => Err(PolicyError::Unavailable(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_plans_edits_per_hunk() {
        let task = TaskInstance {
            patch: "diff --git a/calc.py b/calc.py\nindex 1..2 100644\n--- a/calc.py\n+++ b/calc.py\n@@ -1,2 +1,2 @@\n def add(a, b):\n-    return a - b\n+    return a + b\ndiff --git a/new.py b/new.py\nnew file mode 100644\n--- /dev/null\n+++ b/new.py\n@@ -0,0 +1 @@\n+X = 1\n".into(),
            ..Default::default()
        };
        let p = ReplayPolicy::new(&task, "/testbed");
        let tools: Vec<&str> = p.plan.iter().map(|s| s.tool).collect();
        assert_eq!(
            tools,
            [
                "bash",
                "str_replace_editor",
                "str_replace_editor",
                "str_replace_editor",
                "bash",
                "submit"
            ]
        );
        assert_eq!(
            p.plan[2].args["old_str"],
            "def add(a, b):\n    return a - b\n"
        );
        assert_eq!(
            p.plan[2].args["new_str"],
            "def add(a, b):\n    return a + b\n"
        );
        assert_eq!(p.plan[3].args["command"], "create");
        assert_eq!(p.plan[3].args["file_text"], "X = 1\n");
    }
}
