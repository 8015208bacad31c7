//! The task's workspace as the agent sees it: a shell session (working directory and exported
//! variables carried from one command to the next), the editor, and the submission.
//!
//! Every command is a fresh sandbox run (so limits and containment apply to each), wrapped in
//! a script that restores the session saved by the previous command (`export -p` and `pwd`,
//! kept in the workspace's `.git`, which no diff includes) and saves it again on exit. stdout
//! and stderr are merged in order; stdin is empty, so a command that waits for input ends.
use crate::tools::{EditorCall, truncate};
use crate::{AgentConfig, AgentError};
use davinci_core::task::TaskInstance;
use davinci_sandbox::{Limits, RunSpec, Sandbox, StopReason, Workspace};
use davinci_swebench::specs::{diff_files, shell_quote};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

const BASE: &str = ".git/davinci-base";
const SUBMISSION: &str = ".git/davinci-submission.patch";

/// The wrapper around each agent command. `$1` is the mount point.
const WRAPPER: &str = r#"exec 2>&1 </dev/null
__davinci_state="$1/.git/davinci-session"
if [ -f "$__davinci_state/env.sh" ]; then . "$__davinci_state/env.sh" >/dev/null 2>&1; fi
cd "$(cat "$__davinci_state/cwd" 2>/dev/null || echo "$1")" 2>/dev/null || cd "$1"
__davinci_save() {
  __davinci_rc=$?
  if mkdir -p "$__davinci_state" 2>/dev/null; then
    pwd > "$__davinci_state/cwd"
    export -p | grep -v -E '^declare -[-a-zA-Z]* (DAVINCI_CMD|PWD|OLDPWD|SHLVL|_)(=|$)' > "$__davinci_state/env.sh"
  fi
  exit $__davinci_rc
}
trap __davinci_save EXIT
eval "$DAVINCI_CMD"
"#;

/// One open workspace.
pub struct Session {
    sandbox: Arc<dyn Sandbox>,
    ws: Option<Workspace>,
    mount: String,
    cfg: AgentConfig,
    history: HashMap<String, Vec<Option<Vec<u8>>>>,
}

/// What a command gave.
#[derive(Debug, Clone)]
pub struct CommandResult {
    pub observation: String,
    pub seconds: f64,
    pub timed_out: bool,
}

fn sandbox_err(e: davinci_sandbox::SandboxError) -> AgentError {
    AgentError::Sandbox(e.to_string())
}

impl Session {
    /// Takes a prepared workspace (the task's tree after its setup) and records its state as
    /// the base the submission is diffed against.
    pub(crate) async fn start(
        sandbox: Arc<dyn Sandbox>,
        ws: Workspace,
        cfg: AgentConfig,
    ) -> Result<Session, AgentError> {
        let mount = ws.mount_point.display().to_string();
        let s = Session {
            sandbox,
            ws: Some(ws),
            mount,
            cfg,
            history: HashMap::new(),
        };
        // A fresh repository holding the tree as it stands: no history, so nothing of the
        // future (the fix) can be read from it, and a base the submission is diffed against.
        let script = format!(
            "cd {m} || exit 90\n\
             rm -rf .git && git init -q && git add -A && \
             git -c user.name=davinci -c user.email=davinci@localhost -c commit.gpgsign=false commit -qm base --allow-empty || exit 91\n\
             git rev-parse HEAD > {BASE} || exit 92\n",
            m = shell_quote(&s.mount)
        );
        let out = s.plain(&script, Duration::from_secs(600)).await?;
        if !out.success() {
            return Err(AgentError::Setup(format!(
                "recording the base tree failed ({:?}, exit {:?}): {}",
                out.stop,
                out.exit_code,
                truncate(&(out.stdout_str() + &out.stderr_str()), 2000)
            )));
        }
        Ok(s)
    }

    /// Where the repository is, as commands see it (`/testbed`).
    pub fn mount(&self) -> &str {
        &self.mount
    }

    fn ws(&self) -> &Workspace {
        self.ws.as_ref().expect("workspace open until close")
    }

    fn limits(&self, wall: Duration) -> Limits {
        Limits {
            wall_time: wall,
            cpu_time: Some(wall),
            memory_bytes: Some(self.cfg.memory_bytes),
            max_processes: Some(self.cfg.max_processes),
            file_size_bytes: Some(1 << 30),
            output_bytes: (self.cfg.observation_chars * 4).max(4096),
            output_kill_bytes: Some(64 << 20),
        }
    }

    /// A script outside the session (setup, submission, directory listings).
    async fn plain(
        &self,
        script: &str,
        wall: Duration,
    ) -> Result<davinci_sandbox::RunOutput, AgentError> {
        let spec = RunSpec::new(["bash", "-c", script]);
        self.sandbox
            .run(self.ws(), &spec, &self.limits(wall))
            .await
            .map_err(sandbox_err)
    }

    /// Runs an agent command in the session.
    pub async fn bash(
        &mut self,
        command: &str,
        timeout: Option<u64>,
    ) -> Result<CommandResult, AgentError> {
        let wall = timeout
            .map(Duration::from_secs)
            .unwrap_or(self.cfg.command_timeout)
            .min(self.cfg.max_command_timeout);
        let mut spec = RunSpec::new([
            "bash".to_string(),
            "-c".to_string(),
            WRAPPER.to_string(),
            "davinci-session".to_string(),
            self.mount.clone(),
        ]);
        spec.env.insert("DAVINCI_CMD".into(), command.to_string());
        spec.network = self.cfg.command_network;
        let t = Instant::now();
        let out = self
            .sandbox
            .run(self.ws(), &spec, &self.limits(wall))
            .await
            .map_err(sandbox_err)?;
        let seconds = t.elapsed().as_secs_f64();
        let text = out.stdout_str() + &out.stderr_str();
        let text = truncate(&text, self.cfg.observation_chars);
        let timed_out = matches!(out.stop, StopReason::WallTimeout | StopReason::CpuTimeLimit);
        let observation = match out.stop {
            _ if timed_out => format!(
                "{text}\nThe command was stopped after {} seconds (timeout). Run long commands in the background, or give a larger `timeout` (at most {} s).",
                wall.as_secs(),
                self.cfg.max_command_timeout.as_secs()
            ),
            StopReason::OutputLimit => {
                format!("{text}\nThe command was stopped: it printed more than 64 MiB.")
            }
            _ if text.trim().is_empty() && out.exit_code == Some(0) => {
                "Your command ran successfully and did not produce any output.".to_string()
            }
            _ if out.exit_code != Some(0) => {
                format!("{text}\n[exit code {}]", out.exit_code.unwrap_or(-1))
            }
            _ => text,
        };
        Ok(CommandResult {
            observation,
            seconds,
            timed_out,
        })
    }

    /// `path` relative to the workspace, when it is absolute and inside it.
    fn relative(&self, path: &str) -> Result<String, String> {
        let prefix = format!("{}/", self.mount.trim_end_matches('/'));
        if !path.starts_with('/') {
            return Err(format!(
                "The path {path} is not an absolute path; it should start with `/`, e.g. {prefix}{path}."
            ));
        }
        let rel = path.strip_prefix(&prefix).ok_or_else(|| {
            format!(
                "The path {path} is outside {}; only files under it can be edited.",
                self.mount
            )
        })?;
        davinci_sandbox::safe_relative(rel)
            .map_err(|_| format!("The path {path} leaves {}.", self.mount))?;
        Ok(rel.trim_end_matches('/').to_string())
    }

    async fn read(&self, rel: &str) -> Option<Vec<u8>> {
        self.sandbox.read_file(self.ws(), rel).await.ok()
    }

    async fn write(&self, rel: &str, data: &[u8]) -> Result<(), String> {
        self.sandbox
            .write_file(self.ws(), rel, data)
            .await
            .map_err(|e| format!("Could not write the file: {e}"))
    }

    /// Runs an editor command; its errors are observations for the model.
    pub async fn edit(&mut self, call: &EditorCall) -> Result<CommandResult, AgentError> {
        let t = Instant::now();
        let observation = match self.edit_inner(call).await? {
            Ok(s) | Err(s) => s,
        };
        Ok(CommandResult {
            observation: truncate(&observation, self.cfg.observation_chars),
            seconds: t.elapsed().as_secs_f64(),
            timed_out: false,
        })
    }

    async fn edit_inner(
        &mut self,
        call: &EditorCall,
    ) -> Result<Result<String, String>, AgentError> {
        let path = match call {
            EditorCall::View { path, .. }
            | EditorCall::Create { path, .. }
            | EditorCall::StrReplace { path, .. }
            | EditorCall::Insert { path, .. }
            | EditorCall::Undo { path } => path.clone(),
        };
        let rel = match path.trim_end_matches('/') {
            p if p == self.mount.trim_end_matches('/') => None,
            _ => match self.relative(&path) {
                Ok(r) => Some(r),
                Err(e) => return Ok(Err(e)),
            },
        };
        let current = match &rel {
            Some(r) => self.read(r).await,
            None => None,
        };
        Ok(match call {
            EditorCall::View { range, .. } => match current {
                Some(data) => view_file(&path, &String::from_utf8_lossy(&data), *range),
                None => self.view_dir(&path).await?,
            },
            EditorCall::Create { text, .. } => {
                let rel = rel.expect("the mount point itself exists");
                if current.is_some() {
                    Err(format!(
                        "File already exists at: {path}. Cannot overwrite files using command `create`."
                    ))
                } else {
                    self.write(&rel, text.as_bytes()).await.map(|()| {
                        self.history.entry(rel).or_default().push(None);
                        format!("File created successfully at: {path}")
                    })
                }
            }
            EditorCall::StrReplace { old, new, .. } => match (rel, current) {
                (Some(rel), Some(data)) => {
                    let text = String::from_utf8_lossy(&data).into_owned();
                    let hits: Vec<usize> =
                        text.match_indices(old.as_str()).map(|(i, _)| i).collect();
                    match hits.len() {
                        0 => Err(format!(
                            "No replacement was performed, old_str `{old}` did not appear verbatim in {path}."
                        )),
                        1 => {
                            let at = hits[0];
                            let edited = format!("{}{new}{}", &text[..at], &text[at + old.len()..]);
                            let line = text[..at].matches('\n').count() + 1;
                            self.commit_edit(&rel, data, &edited).await.map(|()| {
                                edited_message(&path, &edited, line, new.matches('\n').count())
                            })
                        }
                        _ => {
                            let lines: Vec<usize> = hits
                                .iter()
                                .map(|&i| text[..i].matches('\n').count() + 1)
                                .collect();
                            Err(format!(
                                "No replacement was performed. Multiple occurrences of old_str `{old}` in lines {lines:?}. Please ensure it is unique."
                            ))
                        }
                    }
                }
                _ => Err(format!("The path {path} does not exist or is not a file.")),
            },
            EditorCall::Insert {
                line, text: new, ..
            } => match (rel, current) {
                (Some(rel), Some(data)) => {
                    let text = String::from_utf8_lossy(&data).into_owned();
                    let lines: Vec<&str> = text.split_inclusive('\n').collect();
                    if *line < 0 || *line as usize > lines.len() {
                        Err(format!(
                            "Invalid `insert_line` parameter: {line}. It should be within the range of lines of the file: [0, {}]",
                            lines.len()
                        ))
                    } else {
                        let at = *line as usize;
                        let mut edited: String = lines[..at].concat();
                        if !edited.is_empty() && !edited.ends_with('\n') {
                            edited.push('\n');
                        }
                        edited.push_str(new);
                        if !new.ends_with('\n') && at < lines.len() {
                            edited.push('\n');
                        }
                        edited.push_str(&lines[at..].concat());
                        self.commit_edit(&rel, data, &edited).await.map(|()| {
                            edited_message(&path, &edited, at + 1, new.matches('\n').count())
                        })
                    }
                }
                _ => Err(format!("The path {path} does not exist or is not a file.")),
            },
            EditorCall::Undo { .. } => {
                let Some(rel) = rel else {
                    return Ok(Err(format!("No edit history found for {path}.")));
                };
                match self.history.get_mut(&rel).and_then(Vec::pop) {
                    None => Err(format!("No edit history found for {path}.")),
                    Some(Some(prev)) => self.write(&rel, &prev).await.map(|()| {
                        format!(
                            "Last edit to {path} undone successfully. {}",
                            view_file(&path, &String::from_utf8_lossy(&prev), None)
                                .unwrap_or_default()
                        )
                    }),
                    Some(None) => {
                        let out = self
                            .plain(
                                &format!(
                                    "rm -f -- {}",
                                    shell_quote(&format!("{}/{rel}", self.mount))
                                ),
                                Duration::from_secs(30),
                            )
                            .await?;
                        if out.success() {
                            Ok(format!(
                                "Last edit to {path} undone successfully: the file created was removed."
                            ))
                        } else {
                            Err(format!(
                                "Could not remove {path}: {}",
                                out.stdout_str() + &out.stderr_str()
                            ))
                        }
                    }
                }
            }
        })
    }

    async fn commit_edit(&mut self, rel: &str, old: Vec<u8>, new: &str) -> Result<(), String> {
        self.write(rel, new.as_bytes()).await?;
        self.history
            .entry(rel.to_string())
            .or_default()
            .push(Some(old));
        Ok(())
    }

    async fn view_dir(&self, path: &str) -> Result<Result<String, String>, AgentError> {
        let q = shell_quote(path);
        let out = self
            .plain(
                &format!(
                    "if [ -d {q} ]; then find {q} -maxdepth 2 -not -path '*/.*' | sort; else echo __davinci_missing__; fi"
                ),
                Duration::from_secs(30),
            )
            .await?;
        let listing = out.stdout_str();
        Ok(if listing.trim() == "__davinci_missing__" {
            Err(format!("The path {path} does not exist."))
        } else {
            Ok(format!(
                "Here's the files and directories up to 2 levels deep in {path}, excluding hidden items:\n{listing}"
            ))
        })
    }

    /// The submission: `git diff` of the workspace against its base, with the agent's changes
    /// to the task's test files (those its test patch touches) reverted first.
    pub async fn submission(&self, task: &TaskInstance) -> Result<String, AgentError> {
        let tests: Vec<String> = diff_files(&task.test_patch)
            .iter()
            .filter(|f| davinci_sandbox::safe_relative(f).is_ok())
            .map(|f| shell_quote(f))
            .collect();
        let script = format!(
            "cd {m} || exit 90\n\
             B=$(cat {BASE}) || exit 91\n\
             export GIT_INDEX_FILE=.git/davinci-submit.index\n\
             rm -f \"$GIT_INDEX_FILE\"\n\
             for f in {files}; do\n\
               if git cat-file -e \"$B:$f\" 2>/dev/null; then git checkout \"$B\" -- \"$f\"; else rm -rf -- \"$f\"; fi\n\
             done\n\
             git add -A && git diff --cached --binary --no-color --no-ext-diff \"$B\" > {SUBMISSION}\n",
            m = shell_quote(&self.mount),
            files = if tests.is_empty() {
                "''".into()
            } else {
                tests.join(" ")
            },
        );
        let out = self.plain(&script, Duration::from_secs(300)).await?;
        if !out.success() {
            return Err(AgentError::Sandbox(format!(
                "taking the submission diff failed ({:?}, exit {:?}): {}",
                out.stop,
                out.exit_code,
                truncate(&(out.stdout_str() + &out.stderr_str()), 2000)
            )));
        }
        let patch = self
            .sandbox
            .read_file(self.ws(), SUBMISSION)
            .await
            .map_err(sandbox_err)?;
        String::from_utf8(patch)
            .map_err(|_| AgentError::Sandbox("the submission diff is not UTF-8".into()))
    }

    /// Removes the workspace.
    pub async fn close(mut self) {
        if let Some(ws) = self.ws.take()
            && let Err(e) = self.sandbox.release(ws).await
        {
            tracing::warn!(error = %e, "releasing the agent workspace");
        }
    }
}

/// `cat -n` of a file (or of `range` of it).
fn view_file(path: &str, text: &str, range: Option<(i64, i64)>) -> Result<String, String> {
    let lines: Vec<&str> = text.lines().collect();
    let n = lines.len() as i64;
    let (start, end) = match range {
        None => (1, n),
        Some((s, e)) => {
            let e = if e == -1 { n } else { e };
            if s < 1 || s > n.max(1) || e < s || e > n {
                return Err(format!(
                    "Invalid `view_range`: [{s}, {e}]. It should be within [1, {n}], with the end at least the start (or -1 for the end of the file)."
                ));
            }
            (s, e)
        }
    };
    let mut out = format!("Here's the result of running `cat -n` on {path}:\n");
    for (i, l) in lines
        .iter()
        .enumerate()
        .skip((start - 1).max(0) as usize)
        .take((end - start + 1).max(0) as usize)
    {
        out.push_str(&format!("{:6}\t{l}\n", i + 1));
    }
    Ok(out)
}

/// SWE-agent's answer to an edit: the edited lines with four lines around them.
fn edited_message(path: &str, text: &str, first_line: usize, added_newlines: usize) -> String {
    let n = text.lines().count().max(1) as i64;
    let start = (first_line as i64 - 4).max(1);
    let end = (first_line as i64 + added_newlines as i64 + 4).min(n);
    let snippet = view_file(path, text, Some((start, end.max(start))))
        .unwrap_or_default()
        .split_once('\n')
        .map(|(_, rest)| rest.to_string())
        .unwrap_or_default();
    format!(
        "The file {path} has been edited. Here's the result of running `cat -n` on a snippet of {path}:\n{snippet}Review the changes and make sure they are as expected. Edit the file again if necessary."
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_number_lines() {
        let v = view_file("/testbed/a.py", "x = 1\ny = 2\nz = 3\n", Some((2, -1))).unwrap();
        assert_eq!(
            v,
            "Here's the result of running `cat -n` on /testbed/a.py:\n     2\ty = 2\n     3\tz = 3\n"
        );
        assert!(view_file("/testbed/a.py", "x\n", Some((3, 4))).is_err());
    }
}
