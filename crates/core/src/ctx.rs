//! The contextually-native sample texts of DESIGN.md §4: `davinci.ctx-general/v2` (XML-like
//! tags, reviews kept, unified diffs per commit) and `davinci.ctx-python/v2` (Markdown,
//! SEARCH/REPLACE per commit).
//!
//! Both follow the order issue(s) → title/description → relevant files → summary → commits
//! (→ reviews). A part with nothing in it is left out, never printed empty. Natural-language
//! fields (titles, bodies, messages) get CRLF → LF and outer blank lines trimmed; file contents
//! and diffs are written byte for byte.
//!
//! v2 makes a document determine its files alone: relevant files hold the base content of every
//! path a change starts from (a rename's or copy's source included), a file without a final
//! newline is marked as in diffs, and ctx-general diffs name their status and source
//! (`<diff path="b" old_path="a" status="renamed">`, a change without hunks as `<diff …/>`).
//! Every rendered text is read back by [`crate::ctx_text`] alone; unless that yields the
//! record's files after every commit, byte for byte, the PR is dropped with `edit_roundtrip`.
use crate::ctx_text::{self, TextFiles};
use crate::diff::apply_unified;
use crate::pr::{FileStatus, PullRequest};
use crate::search_replace::{self, EditBlock, EditError};
use std::collections::BTreeMap;

pub const CTX_GENERAL_FORMAT: &str = "davinci.ctx-general/v2";
pub const CTX_PYTHON_FORMAT: &str = "davinci.ctx-python/v2";

/// The reasoning part of a sample: the PR summary and one refined message per commit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Enhancement {
    pub summary: String,
    /// Same length and order as `pr.commits`; a missing entry falls back to the raw message.
    pub commit_messages: Vec<String>,
}

impl Enhancement {
    fn message<'a>(&'a self, pr: &'a PullRequest, i: usize) -> &'a str {
        self.commit_messages
            .get(i)
            .map(String::as_str)
            .unwrap_or(&pr.commits[i].message)
    }
}

/// Why a PR cannot be rendered; `reason` is the drop reason counted in the stage stats.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct RenderError {
    pub reason: &'static str,
    pub detail: String,
}

fn err(reason: &'static str, detail: impl Into<String>) -> RenderError {
    RenderError {
        reason,
        detail: detail.into(),
    }
}

/// CRLF → LF, trailing whitespace and leading blank lines removed.
pub fn clean_text(s: &str) -> String {
    let s = s.replace("\r\n", "\n").replace('\r', "\n");
    let s = s.trim_end();
    let start = s
        .char_indices()
        .find(|&(_, c)| c != '\n' && c != ' ' && c != '\t')
        .map(|(i, _)| s[..i].rfind('\n').map_or(0, |j| j + 1))
        .unwrap_or(s.len());
    s[start..].to_string()
}

/// All whitespace runs (newlines included) collapsed to one space.
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A path fit for a `path="…"` attribute and a `### {path}` line.
fn check_path(path: &str) -> Result<(), RenderError> {
    if search_replace::path_is_writable(path) && !path.contains('"') {
        Ok(())
    } else {
        Err(err("bad_path", format!("path {path:?} cannot be written")))
    }
}

/// Pushes `content` and a newline if it does not end with one, so the next tag starts a line.
fn push_block(out: &mut String, content: &str) {
    out.push_str(content);
    if !content.ends_with('\n') {
        out.push('\n');
    }
}

/// Every path a change names (a rename's or copy's source first, then its target) that has
/// text at base, in first-touch order: the files a reader needs before the first commit.
pub fn relevant_files(pr: &PullRequest) -> Vec<(&str, &str)> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for c in &pr.commits {
        for f in &c.files {
            for p in f
                .old_path
                .iter()
                .map(String::as_str)
                .chain([f.path.as_str()])
            {
                if !seen.insert(p) {
                    continue;
                }
                if let Some(content) = pr.base_content(p) {
                    out.push((p, content));
                }
            }
        }
    }
    out
}

/// The text-only round trip: `read`, rebuilt from a rendered text alone, must hold the record's
/// files after every commit, byte for byte, for every path the PR touches whose text the record
/// knows (binary and unread files are outside the document).
fn check_roundtrip(
    pr: &PullRequest,
    read: Result<TextFiles, ctx_text::ReadError>,
) -> Result<(), RenderError> {
    let read = read.map_err(|e| {
        err(
            "edit_roundtrip",
            format!("the text does not read back: {e}"),
        )
    })?;
    let want = pr.replay_each().map_err(|e| err("diff_apply", e.0))?;
    if read.commits.len() != want.len() {
        return Err(err(
            "edit_roundtrip",
            format!(
                "the text holds {} commits, the record {}",
                read.commits.len(),
                want.len()
            ),
        ));
    }
    let touched: std::collections::BTreeSet<&str> = pr
        .commits
        .iter()
        .flat_map(|c| &c.files)
        .flat_map(|f| f.old_path.iter().chain([&f.path]))
        .map(String::as_str)
        .collect();
    for ((got, want), c) in read.commits.iter().zip(&want).zip(&pr.commits) {
        let differs = want
            .files
            .iter()
            .filter(|(p, _)| touched.contains(p.as_str()))
            .find(|(p, w)| got.get(*p) != w.as_ref())
            .map(|(p, _)| p)
            .or_else(|| {
                got.keys()
                    .find(|p| !want.files.contains_key(*p) && !want.unknown.contains(*p))
            });
        if let Some(p) = differs {
            return Err(err(
                "edit_roundtrip",
                format!(
                    "after commit {}, `{p}` read from the text is not the record's",
                    short_sha(&c.sha)
                ),
            ));
        }
    }
    Ok(())
}

/// A relevant file for ctx-general: no line may read as its closing tag, and it may not end in
/// a line that reads as the no-newline mark.
fn check_general_content(path: &str, content: &str) -> Result<(), RenderError> {
    let collides = content
        .split('\n')
        .any(|l| l.strip_suffix('\r').unwrap_or(l) == "</file>")
        || content
            .strip_suffix('\n')
            .is_some_and(|c| c.rsplit('\n').next() == Some(search_replace::NO_NEWLINE));
    if collides {
        Err(err(
            "marker_collision",
            format!("`{path}` holds a line that reads as `</file>` or the no-newline mark"),
        ))
    } else {
        Ok(())
    }
}

fn short_sha(sha: &str) -> &str {
    &sha[..sha.len().min(7)]
}

/// `davinci.ctx-general/v2` text, read back from itself alone before it is returned.
pub fn render_general(pr: &PullRequest, enh: &Enhancement) -> Result<String, RenderError> {
    let mut out = String::new();
    out.push_str(&format!(
        "<pull_request repo=\"{}\" number=\"{}\">\n",
        pr.repo.full_name, pr.number
    ));
    for issue in &pr.linked_issues {
        out.push_str(&format!("<issue number=\"{}\">\n", issue.number));
        out.push_str(&format!("<title>{}</title>\n", one_line(&issue.title)));
        let body = clean_text(&issue.body);
        if !body.is_empty() {
            push_block(&mut out, &body);
        }
        out.push_str("</issue>\n");
    }
    out.push_str(&format!("<title>{}</title>\n", one_line(&pr.title)));
    let body = clean_text(&pr.body);
    if !body.is_empty() {
        out.push_str("<description>\n");
        push_block(&mut out, &body);
        out.push_str("</description>\n");
    }
    let files = relevant_files(pr);
    if !files.is_empty() {
        out.push_str("<relevant_files>\n");
        for (path, content) in files {
            check_path(path)?;
            check_general_content(path, content)?;
            out.push_str(&format!("<file path=\"{path}\">\n"));
            search_replace::push_body(&mut out, content);
            out.push_str("</file>\n");
        }
        out.push_str("</relevant_files>\n");
    }
    let summary = clean_text(&enh.summary);
    if !summary.is_empty() {
        out.push_str("<summary>\n");
        push_block(&mut out, &summary);
        out.push_str("</summary>\n");
    }
    for (i, c) in pr.commits.iter().enumerate() {
        out.push_str(&format!("<commit sha=\"{}\">\n", short_sha(&c.sha)));
        let msg = clean_text(enh.message(pr, i));
        if !msg.is_empty() {
            out.push_str("<message>\n");
            push_block(&mut out, &msg);
            out.push_str("</message>\n");
        }
        for f in &c.files {
            if f.binary || f.skipped.is_some() {
                continue; // no text: outside the document
            }
            let status = match f.status {
                FileStatus::Modified if f.diff.is_empty() => continue, // mode change only
                FileStatus::Modified => None,
                FileStatus::Added => Some("added"),
                FileStatus::Deleted => Some("deleted"),
                FileStatus::Renamed => Some("renamed"),
                FileStatus::Copied => Some("copied"),
            };
            check_path(&f.path)?;
            let mut open = format!("<diff path=\"{}\"", f.path);
            if matches!(f.status, FileStatus::Renamed | FileStatus::Copied) {
                let Some(old) = &f.old_path else {
                    return Err(err(
                        "bad_record",
                        format!("commit {}: `{}` without old_path", c.sha, f.path),
                    ));
                };
                check_path(old)?;
                open.push_str(&format!(" old_path=\"{old}\""));
            }
            if let Some(s) = status {
                open.push_str(&format!(" status=\"{s}\""));
            }
            if f.diff.is_empty() {
                out.push_str(&open);
                out.push_str("/>\n");
            } else {
                out.push_str(&open);
                out.push_str(">\n");
                push_block(&mut out, &f.diff);
                out.push_str("</diff>\n");
            }
        }
        out.push_str("</commit>\n");
    }
    for r in &pr.reviews {
        let body = clean_text(&r.body);
        let comments: Vec<_> = r
            .comments
            .iter()
            .map(|c| (c, clean_text(&c.body)))
            .filter(|(_, b)| !b.is_empty())
            .collect();
        if body.is_empty() && comments.is_empty() {
            continue;
        }
        let assoc = r.author.association.as_deref().unwrap_or("NONE");
        out.push_str(&format!(
            "<review author_association=\"{}\" state=\"{}\">\n",
            one_line(assoc),
            one_line(&r.state)
        ));
        if !body.is_empty() {
            push_block(&mut out, &body);
        }
        for (c, cbody) in comments {
            check_path(&c.path)?;
            match c.line {
                Some(n) => out.push_str(&format!("<comment path=\"{}\" line=\"{n}\">\n", c.path)),
                None => out.push_str(&format!("<comment path=\"{}\">\n", c.path)),
            }
            push_block(&mut out, &cbody);
            out.push_str("</comment>\n");
        }
        out.push_str("</review>\n");
    }
    out.push_str("</pull_request>\n");
    check_roundtrip(pr, ctx_text::read_general(&out))?;
    Ok(out)
}

/// One file's change in one commit, as full texts (`None` = the file does not exist).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStep {
    pub path: String,
    pub before: Option<String>,
    pub after: Option<String>,
}

/// Rebuilds, commit by commit, every touched file's text before and after from the base files
/// and the per-commit hunks. A rename becomes two steps: old path deleted, new path created; a
/// copy one: new path created.
pub fn replay_commits(pr: &PullRequest) -> Result<Vec<Vec<FileStep>>, RenderError> {
    // path → Some(text) | None (deleted / never existed). Paths not here come from base_files.
    let mut state: BTreeMap<String, Option<String>> = BTreeMap::new();
    let current = |state: &BTreeMap<String, Option<String>>,
                   path: &str|
     -> Result<Option<String>, RenderError> {
        if let Some(s) = state.get(path) {
            return Ok(s.clone());
        }
        match pr.base_files.iter().find(|b| b.path == path) {
            Some(b) => match &b.content {
                Some(c) => Ok(Some(c.clone())),
                None => Err(err(
                    "unreadable_file",
                    format!(
                        "`{path}` has no base text ({})",
                        b.skipped.as_deref().unwrap_or("skipped")
                    ),
                )),
            },
            None => Ok(None),
        }
    };
    let mut out = Vec::with_capacity(pr.commits.len());
    for c in &pr.commits {
        let mut steps = Vec::new();
        for f in &c.files {
            if f.binary || f.skipped.is_some() {
                let why = f.skipped.as_deref().unwrap_or("binary");
                return Err(err(
                    "unreadable_file",
                    format!("commit {} changes `{}` ({why})", c.sha, f.path),
                ));
            }
            let from = match (f.status, &f.old_path) {
                (FileStatus::Renamed | FileStatus::Copied, Some(old)) => old.clone(),
                (FileStatus::Renamed | FileStatus::Copied, None) => {
                    return Err(err(
                        "bad_record",
                        format!("commit {}: `{}` without old_path", c.sha, f.path),
                    ));
                }
                _ => f.path.clone(),
            };
            let before = current(&state, &from)?;
            let apply = |old: &str| {
                apply_unified(old, &f.diff)
                    .map_err(|e| err("diff_apply", format!("commit {} `{}`: {e}", c.sha, f.path)))
            };
            match f.status {
                FileStatus::Added => {
                    let after = apply(before.as_deref().unwrap_or(""))?;
                    steps.push(FileStep {
                        path: f.path.clone(),
                        before,
                        after: Some(after.clone()),
                    });
                    state.insert(f.path.clone(), Some(after));
                }
                FileStatus::Copied => {
                    let Some(old) = before else {
                        return Err(err(
                            "missing_base_content",
                            format!("commit {} copies `{from}`, unknown before it", c.sha),
                        ));
                    };
                    let after = apply(&old)?;
                    steps.push(FileStep {
                        path: f.path.clone(),
                        before: current(&state, &f.path)?,
                        after: Some(after.clone()),
                    });
                    state.insert(f.path.clone(), Some(after));
                }
                FileStatus::Modified | FileStatus::Deleted | FileStatus::Renamed => {
                    let Some(old) = before else {
                        return Err(err(
                            "missing_base_content",
                            format!("commit {} changes `{from}`, unknown before it", c.sha),
                        ));
                    };
                    let new = apply(&old)?;
                    if f.status == FileStatus::Deleted {
                        if !new.is_empty() {
                            return Err(err(
                                "diff_apply",
                                format!("commit {} deletes `{}` but leaves text", c.sha, f.path),
                            ));
                        }
                        steps.push(FileStep {
                            path: f.path.clone(),
                            before: Some(old),
                            after: None,
                        });
                        state.insert(f.path.clone(), None);
                    } else if f.status == FileStatus::Renamed && from != f.path {
                        let target = current(&state, &f.path)?;
                        steps.push(FileStep {
                            path: from.clone(),
                            before: Some(old),
                            after: None,
                        });
                        steps.push(FileStep {
                            path: f.path.clone(),
                            before: target,
                            after: Some(new.clone()),
                        });
                        state.insert(from.clone(), None);
                        state.insert(f.path.clone(), Some(new));
                    } else {
                        steps.push(FileStep {
                            path: f.path.clone(),
                            before: Some(old),
                            after: Some(new.clone()),
                        });
                        state.insert(f.path.clone(), Some(new));
                    }
                }
            }
        }
        out.push(steps);
    }
    Ok(out)
}

/// Markdown fence language for a path.
pub fn fence_language(path: &str) -> &'static str {
    let name = path.rsplit('/').next().unwrap_or(path);
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("py" | "pyi" | "pyx" | "pxd") => "python",
        Some("md" | "markdown") => "markdown",
        Some("rst") => "rst",
        Some("toml") => "toml",
        Some("yml" | "yaml") => "yaml",
        Some("json") => "json",
        Some("cfg" | "ini") => "ini",
        Some("txt") => "text",
        Some("sh" | "bash") => "bash",
        Some("js" | "mjs" | "cjs") => "javascript",
        Some("ts") => "typescript",
        Some("rs") => "rust",
        Some("c" | "h") => "c",
        Some("cc" | "cpp" | "cxx" | "hpp") => "cpp",
        Some("go") => "go",
        Some("java") => "java",
        Some("html" | "htm") => "html",
        Some("css") => "css",
        _ if name == "Makefile" => "makefile",
        _ if name == "Dockerfile" => "dockerfile",
        _ => "",
    }
}

/// A backtick fence longer than the longest backtick run in `content` (at least three).
pub fn fence_for(content: &str) -> String {
    let mut longest = 0;
    let mut run = 0;
    for b in content.bytes() {
        if b == b'`' {
            run += 1;
            longest = longest.max(run);
        } else {
            run = 0;
        }
    }
    "`".repeat((longest + 1).max(3))
}

/// `content` in a fence; without a final newline it is followed by the no-newline line.
fn push_fenced(out: &mut String, lang: &str, content: &str) {
    let fence = fence_for(content);
    out.push_str(&fence);
    out.push_str(lang);
    out.push('\n');
    search_replace::push_body(out, content);
    out.push_str(&fence);
    out.push('\n');
}

/// What [`render_python`] produced, with the checks it ran.
#[derive(Debug, Clone, PartialEq)]
pub struct PythonRender {
    pub text: String,
    /// SEARCH/REPLACE blocks per commit.
    pub blocks: Vec<Vec<EditBlock>>,
}

/// `davinci.ctx-python/v2` text, read back from itself alone before it is returned.
pub fn render_python(pr: &PullRequest, enh: &Enhancement) -> Result<PythonRender, RenderError> {
    let steps = replay_commits(pr)?;
    let collide = |e: EditError| match e {
        EditError::MarkerCollision { .. } => err("marker_collision", e.to_string()),
        EditError::BadPath { .. } => err("bad_path", e.to_string()),
        other => err("edit_roundtrip", other.to_string()),
    };
    let mut sections: Vec<String> = Vec::new();
    sections.push(format!(
        "# {} #{}: {}\n",
        pr.repo.full_name,
        pr.number,
        one_line(&pr.title)
    ));
    for issue in &pr.linked_issues {
        let mut s = format!("## Issue #{}: {}\n", issue.number, one_line(&issue.title));
        let body = clean_text(&issue.body);
        if !body.is_empty() {
            push_block(&mut s, &body);
        }
        sections.push(s);
    }
    let body = clean_text(&pr.body);
    if !body.is_empty() {
        let mut s = "## Description\n".to_string();
        push_block(&mut s, &body);
        sections.push(s);
    }
    let files = relevant_files(pr);
    for (path, content) in &files {
        if search_replace::has_marker_line(content) {
            return Err(err(
                "marker_collision",
                format!("marker line in relevant file `{path}`"),
            ));
        }
    }
    if !files.is_empty() {
        let mut s = "## Relevant files\n".to_string();
        for (k, (path, content)) in files.iter().enumerate() {
            check_path(path)?;
            if k > 0 {
                s.push('\n');
            }
            s.push_str(&format!("### {path}\n"));
            push_fenced(&mut s, fence_language(path), content);
        }
        sections.push(s);
    }
    let summary = clean_text(&enh.summary);
    if !summary.is_empty() {
        let mut s = "## Summary\n".to_string();
        push_block(&mut s, &summary);
        sections.push(s);
    }
    // Marker lines anywhere outside the blocks would make the document's blocks ambiguous to a
    // reader that scans the whole text (relevant files were checked before their marks).
    if let Some(s) = sections
        .iter()
        .filter(|s| !s.starts_with("## Relevant files\n"))
        .find(|s| search_replace::has_marker_line(s))
    {
        let head = s.lines().next().unwrap_or("");
        return Err(err(
            "marker_collision",
            format!("marker line in section `{head}`"),
        ));
    }
    let m = pr.commits.len();
    let mut edits = "## Edits\n".to_string();
    let mut all_blocks = Vec::with_capacity(m);
    for (i, commit_steps) in steps.iter().enumerate() {
        let msg = clean_text(enh.message(pr, i));
        let (first, rest) = match msg.split_once('\n') {
            Some((f, r)) => (one_line(f), clean_text(r)),
            None => (one_line(&msg), String::new()),
        };
        if search_replace::has_marker_line(&rest) {
            return Err(err(
                "marker_collision",
                format!("commit {} message", pr.commits[i].sha),
            ));
        }
        let mut section = format!("### Commit {}/{}: {}\n", i + 1, m, first);
        if !rest.is_empty() {
            push_block(&mut section, &rest);
        }
        let mut blocks = Vec::new();
        for st in commit_steps {
            blocks.extend(
                search_replace::generate(&st.path, st.before.as_deref(), st.after.as_deref())
                    .map_err(collide)?,
            );
        }
        for b in &blocks {
            section.push('\n');
            push_fenced(
                &mut section,
                fence_language(&b.path),
                &search_replace::render_block(b),
            );
        }
        if i > 0 {
            edits.push('\n');
        }
        edits.push_str(&section);
        all_blocks.push(blocks);
    }
    if all_blocks.iter().all(Vec::is_empty) {
        return Err(err("no_edits", "no commit changes a text file"));
    }
    sections.push(edits);
    let text = sections.join("\n");
    check_roundtrip(pr, ctx_text::read_python(&text))?;
    Ok(PythonRender {
        text,
        blocks: all_blocks,
    })
}
