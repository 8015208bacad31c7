//! Reading a ctx sample back from its text alone (DESIGN.md §4, text-only round trip): the
//! relevant files at base, then each commit's diffs (ctx-general) or SEARCH/REPLACE blocks
//! (ctx-python) applied in order. The renderers read back every text they emit and compare the
//! result with the record, so a sample's text determines its files without the record.
use crate::diff::apply_unified;
use crate::search_replace::{self, read_body};
use std::collections::BTreeMap;

/// The files a text determines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TextFiles {
    /// The relevant files: content at base, by path.
    pub base: BTreeMap<String, String>,
    /// After each commit, every file the text knows of that exists then.
    pub commits: Vec<BTreeMap<String, String>>,
}

/// Why a text does not read back; `line` is 1-based.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct ReadError {
    pub line: usize,
    pub reason: String,
}

fn bare(l: &str) -> &str {
    l.strip_suffix('\n').unwrap_or(l)
}

struct Lines<'a> {
    lines: Vec<&'a str>,
    i: usize,
}

impl<'a> Lines<'a> {
    fn new(text: &'a str) -> Self {
        Self {
            lines: text.split_inclusive('\n').collect(),
            i: 0,
        }
    }

    fn error(&self, reason: impl Into<String>) -> ReadError {
        ReadError {
            line: self.i,
            reason: reason.into(),
        }
    }

    /// The next line without its `\n`.
    fn next(&mut self) -> Option<&'a str> {
        let l = self.lines.get(self.i).copied().map(bare);
        self.i += 1;
        l
    }

    /// The lines up to the line equal to `end` (consumed, not returned), with their `\n`.
    fn until(&mut self, end: &str) -> Result<&[&'a str], ReadError> {
        let start = self.i;
        match self.lines[start.min(self.lines.len())..]
            .iter()
            .position(|l| bare(l) == end)
        {
            Some(k) => {
                self.i = start + k + 1;
                Ok(&self.lines[start..start + k])
            }
            None => Err(ReadError {
                line: start,
                reason: format!("no `{end}` after this line"),
            }),
        }
    }
}

/// `<name a="x" b="y">` or `<name a="x"/>` alone on a line: the attributes and whether the tag
/// closes itself. Values hold no `"` (the renderer refuses such paths).
fn tag<'a>(line: &'a str, name: &str) -> Option<(BTreeMap<&'a str, &'a str>, bool)> {
    let mut rest = line.strip_prefix('<')?.strip_prefix(name)?;
    let mut attrs = BTreeMap::new();
    loop {
        if rest == ">" {
            return Some((attrs, false));
        }
        if rest == "/>" {
            return Some((attrs, true));
        }
        rest = rest.strip_prefix(' ')?;
        let (key, after) = rest.split_once("=\"")?;
        let (value, after) = after.split_once('"')?;
        if key.is_empty() || key.contains([' ', '"']) || attrs.insert(key, value).is_some() {
            return None;
        }
        rest = after;
    }
}

/// Reads a `davinci.ctx-general/v2` text: `<file>` contents under `<relevant_files>`, then each
/// `<commit>`'s `<diff>` tags applied to the files as they stand. Prose parts are skipped to
/// their closing tag; any other line at the top level or in a commit is an error.
pub fn read_general(text: &str) -> Result<TextFiles, ReadError> {
    let mut r = Lines::new(text);
    let mut out = TextFiles::default();
    match r.next() {
        Some(l) if tag(l, "pull_request").is_some_and(|(_, closed)| !closed) => {}
        _ => return Err(r.error("the text does not open with <pull_request …>")),
    }
    let mut files: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let Some(l) = r.next() else {
            return Err(r.error("no </pull_request>"));
        };
        match l {
            "</pull_request>" => break,
            "<description>" => {
                r.until("</description>")?;
            }
            "<summary>" => {
                r.until("</summary>")?;
            }
            "<relevant_files>" => {
                if !out.base.is_empty() || !out.commits.is_empty() {
                    return Err(r.error("<relevant_files> again or after a commit"));
                }
                read_relevant_general(&mut r, &mut out.base)?;
                files = out.base.clone();
            }
            _ if l.starts_with("<title>") && l.ends_with("</title>") => {}
            _ if tag(l, "issue").is_some() => {
                r.until("</issue>")?;
            }
            _ if tag(l, "review").is_some() => {
                r.until("</review>")?;
            }
            _ if tag(l, "commit").is_some_and(|(_, closed)| !closed) => {
                read_commit_general(&mut r, &mut files)?;
                out.commits.push(files.clone());
            }
            _ => return Err(r.error(format!("unexpected line `{l}`"))),
        }
    }
    if r.i < r.lines.len() {
        return Err(r.error("text after </pull_request>"));
    }
    Ok(out)
}

fn read_relevant_general(
    r: &mut Lines<'_>,
    base: &mut BTreeMap<String, String>,
) -> Result<(), ReadError> {
    loop {
        let l = r.next().ok_or_else(|| r.error("no </relevant_files>"))?;
        if l == "</relevant_files>" {
            return Ok(());
        }
        let path = match tag(l, "file") {
            Some((a, false)) if a.len() == 1 && a.contains_key("path") => a["path"].to_string(),
            _ => return Err(r.error(format!("expected <file path=\"…\">, got `{l}`"))),
        };
        let content = read_body(r.until("</file>")?);
        if base.insert(path.clone(), content).is_some() {
            return Err(r.error(format!("`{path}` listed twice")));
        }
    }
}

fn read_commit_general(
    r: &mut Lines<'_>,
    files: &mut BTreeMap<String, String>,
) -> Result<(), ReadError> {
    let mut first = true;
    loop {
        let l = r.next().ok_or_else(|| r.error("no </commit>"))?;
        if l == "</commit>" {
            return Ok(());
        }
        if first && l == "<message>" {
            r.until("</message>")?;
            first = false;
            continue;
        }
        first = false;
        let Some((attrs, closed)) = tag(l, "diff") else {
            return Err(r.error(format!("unexpected line `{l}` in a commit")));
        };
        let at = r.i;
        let hunks: String = if closed {
            String::new()
        } else {
            r.until("</diff>")?.concat()
        };
        let fail = |reason: String| ReadError { line: at, reason };
        let path = attrs
            .get("path")
            .ok_or_else(|| fail("<diff> without path".into()))?
            .to_string();
        let old_path = attrs.get("old_path").map(|s| s.to_string());
        let status = attrs.get("status").copied().unwrap_or("modified");
        if attrs
            .keys()
            .any(|k| !["path", "old_path", "status"].contains(k))
        {
            return Err(fail(format!("unknown attribute on <diff path=\"{path}\">")));
        }
        let apply =
            |old: &str| apply_unified(old, &hunks).map_err(|e| fail(format!("`{path}`: {e}")));
        let need = |p: &str| {
            files
                .get(p)
                .cloned()
                .ok_or_else(|| fail(format!("`{p}` does not exist here")))
        };
        match (status, &old_path) {
            ("modified", None) => {
                let new = apply(&need(&path)?)?;
                files.insert(path, new);
            }
            ("added", None) => {
                if files.contains_key(&path) {
                    return Err(fail(format!("`{path}` is added but exists")));
                }
                let new = apply("")?;
                files.insert(path, new);
            }
            ("deleted", None) => {
                if !apply(&need(&path)?)?.is_empty() {
                    return Err(fail(format!("deleting `{path}` leaves text")));
                }
                files.remove(&path);
            }
            ("renamed" | "copied", Some(old)) => {
                if files.contains_key(&path) && *old != path {
                    return Err(fail(format!("`{path}` is a {status} target but exists")));
                }
                let new = apply(&need(old)?)?;
                if status == "renamed" {
                    files.remove(old);
                }
                files.insert(path, new);
            }
            _ => {
                return Err(fail(format!(
                    "<diff path=\"{path}\">: status `{status}` with old_path {old_path:?}"
                )));
            }
        }
    }
}

/// A code-fence line: its backtick run (three or more) when the rest holds no backtick.
fn fence_of(line: &str) -> Option<&str> {
    let n = line.bytes().take_while(|&b| b == b'`').count();
    (n >= 3 && !line[n..].contains('`')).then(|| &line[..n])
}

/// Reads a `davinci.ctx-python/v2` text: the fenced files under the first `## Relevant files`
/// line, then, after the next `## Edits` line, the blocks of each `### Commit {i}/{m}: …`
/// section (numbered 1 to m in order) applied to the files as they stand.
pub fn read_python(text: &str) -> Result<TextFiles, ReadError> {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let mut out = TextFiles::default();
    let mut i = 0;
    if let Some(start) = lines.iter().position(|l| *l == "## Relevant files\n") {
        i = start + 1;
        loop {
            let mut j = i;
            while j < lines.len() && lines[j] == "\n" {
                j += 1;
            }
            let header = lines.get(j).and_then(|l| l.strip_prefix("### "));
            let fence = lines.get(j + 1).and_then(|l| fence_of(bare(l)));
            let (Some(path), Some(fence)) = (header, fence) else {
                break;
            };
            let body = j + 2;
            let Some(k) = lines[body..].iter().position(|l| bare(l) == fence) else {
                return Err(ReadError {
                    line: j + 2,
                    reason: format!("the fence of `{}` does not close", bare(path)),
                });
            };
            let content = read_body(&lines[body..body + k]);
            if out.base.insert(bare(path).to_string(), content).is_some() {
                return Err(ReadError {
                    line: j + 1,
                    reason: format!("`{}` listed twice", bare(path)),
                });
            }
            i = body + k + 1;
        }
    }
    let edits = lines[i..]
        .iter()
        .position(|l| *l == "## Edits\n")
        .map(|k| i + k + 1)
        .ok_or_else(|| ReadError {
            line: i,
            reason: "no `## Edits` line".into(),
        })?;
    let mut files = out.base.clone();
    let mut total: Option<usize> = None;
    let mut blocks: Vec<search_replace::EditBlock> = Vec::new();
    let mut i = edits;
    let parse_err = |e: search_replace::EditError| ReadError {
        line: 0,
        reason: e.to_string(),
    };
    while i < lines.len() {
        if let Some((block, next)) = search_replace::parse_block_at(&lines, i).map_err(parse_err)? {
            if total.is_none() {
                return Err(ReadError {
                    line: i + 1,
                    reason: "a block before the first commit".into(),
                });
            }
            blocks.push(block);
            i = next;
            continue;
        }
        let n = out.commits.len() + usize::from(total.is_some());
        if let Some(m) = commit_header(lines[i], n + 1, total) {
            if total.is_some() {
                search_replace::apply_blocks(&mut files, &blocks).map_err(|e| ReadError {
                    line: i + 1,
                    reason: format!("commit {n}: {e}"),
                })?;
                out.commits.push(files.clone());
                blocks.clear();
            }
            total = Some(m);
        }
        i += 1;
    }
    let Some(m) = total else {
        return Err(ReadError {
            line: edits,
            reason: "no `### Commit 1/…` line".into(),
        });
    };
    search_replace::apply_blocks(&mut files, &blocks).map_err(|e| ReadError {
        line: lines.len(),
        reason: format!("commit {m}: {e}"),
    })?;
    out.commits.push(files);
    if out.commits.len() != m {
        return Err(ReadError {
            line: lines.len(),
            reason: format!("{} commit sections of {m}", out.commits.len()),
        });
    }
    Ok(out)
}

/// `m` when `line` is `### Commit {k}/{m}: …` (with `m` equal to `total` once known).
fn commit_header(line: &str, k: usize, total: Option<usize>) -> Option<usize> {
    let rest = line.strip_prefix(&format!("### Commit {k}/"))?;
    let (m, _) = rest.split_once(": ")?;
    let m: usize = m.parse().ok()?;
    (total.is_none_or(|t| t == m) && k <= m).then_some(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn general_reads_renames_copies_and_status() {
        let text = "<pull_request repo=\"o/r\" number=\"1\">\n<title>t</title>\n\
            <relevant_files>\n<file path=\"a.py\">\nx\ny\n\\ No newline at end of file\n</file>\n\
            <file path=\"e.py\">\n</file>\n</relevant_files>\n\
            <commit sha=\"abc\">\n<message>\nm\n</diff>\n</message>\n\
            <diff path=\"b.py\" old_path=\"a.py\" status=\"copied\"/>\n\
            <diff path=\"c.py\" old_path=\"a.py\" status=\"renamed\">\n@@ -1,2 +1,2 @@\n x\n-y\n\\ No newline at end of file\n+z\n</diff>\n\
            <diff path=\"e.py\" status=\"deleted\"/>\n<diff path=\"n.py\" status=\"added\"/>\n\
            </commit>\n</pull_request>\n";
        let got = read_general(text).unwrap();
        assert_eq!(got.base["a.py"], "x\ny");
        assert_eq!(got.base["e.py"], "");
        let after = &got.commits[0];
        assert_eq!(after.len(), 3, "{after:?}");
        assert_eq!(after["b.py"], "x\ny");
        assert_eq!(after["c.py"], "x\nz\n");
        assert_eq!(after["n.py"], "");
    }

    #[test]
    fn general_refuses_what_it_cannot_place() {
        let open = "<pull_request repo=\"o/r\" number=\"1\">\n";
        let modify_missing = format!(
            "{open}<commit sha=\"a\">\n<diff path=\"x\">\n@@ -0,0 +1 @@\n+a\n</diff>\n</commit>\n</pull_request>\n"
        );
        assert!(read_general(&modify_missing).is_err());
        let stray = format!("{open}hello\n</pull_request>\n");
        assert!(read_general(&stray).is_err());
        let unclosed = format!("{open}<summary>\ns\n");
        assert!(read_general(&unclosed).is_err());
    }

    #[test]
    fn python_reads_sections_in_order() {
        let text = "# o/r #1: t\n\n## Relevant files\n### a.py\n```python\nx\n\\ No newline at end of file\n```\n\n\
            ### e.py\n```python\n```\n\n## Summary\n### Commit 2/2: not a header yet\n\n## Edits\n\
            ### Commit 1/2: one\n\n```python\n### a.py\n<<<<<<< SEARCH\nx\n\\ No newline at end of file\n=======\nx\n>>>>>>> REPLACE\n```\n\n\
            ### Commit 2/2: two\n\n```python\n### e.py\n<<<<<<< SEARCH\n=======\n>>>>>>> REPLACE\n```\n";
        let got = read_python(text).unwrap();
        assert_eq!(got.base["a.py"], "x");
        assert_eq!(got.commits.len(), 2);
        assert_eq!(got.commits[0]["a.py"], "x\n");
        assert!(got.commits[0].contains_key("e.py"));
        assert!(!got.commits[1].contains_key("e.py"));
        let missing_commit = text.replace("### Commit 2/2: two", "### Commit 3/2: two");
        assert!(read_python(&missing_commit).is_err());
    }
}
