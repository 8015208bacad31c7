//! SEARCH/REPLACE edit blocks of the ctx-python format (DESIGN.md §4): generation from a file's
//! text before and after a commit, rendering, parsing and application.
//!
//! Semantics of one block on path `p` (applied in order, each to the files as they stand):
//! - `p` absent: SEARCH must be empty; the file is created with REPLACE as its content.
//! - `p` present, SEARCH equal to the whole file and REPLACE empty: the file is deleted.
//! - `p` present and empty, SEARCH empty: the file's content becomes REPLACE.
//! - otherwise SEARCH must occur exactly once in the file (occurrences counted overlapping, at
//!   any byte offset, so a reader that matches plain substrings agrees) and is replaced.
//!
//! A file that a commit empties without deleting is written as a delete followed by a create with
//! an empty REPLACE. A rename is a delete of the old path followed by a create of the new one:
//! the format has no rename block and the reader sees the whole new content once.
//!
//! Bodies are whole lines with their endings (`\r\n` kept). A body whose last line has no newline
//! is followed by the line `\ No newline at end of file`.
use std::collections::BTreeMap;

pub const SEARCH_MARKER: &str = "<<<<<<< SEARCH";
pub const DIVIDER_MARKER: &str = "=======";
pub const REPLACE_MARKER: &str = ">>>>>>> REPLACE";
pub const NO_NEWLINE: &str = "\\ No newline at end of file";

/// One edit on one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EditBlock {
    pub path: String,
    pub search: String,
    pub replace: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    #[error("`{path}`: a body line equals an edit marker or the no-newline line")]
    MarkerCollision { path: String },
    #[error("`{path}`: path cannot be written in a block header")]
    BadPath { path: String },
    #[error("block {block} on `{path}`: SEARCH is not empty but the file does not exist")]
    MissingFile { block: usize, path: String },
    #[error("block {block} on `{path}`: SEARCH matches {count} times (must be exactly once)")]
    NotUnique {
        block: usize,
        path: String,
        count: usize,
    },
    #[error("block {block} on `{path}`: empty SEARCH on a non-empty existing file")]
    EmptySearch { block: usize, path: String },
    #[error("line {line}: {reason}")]
    Parse { line: usize, reason: String },
}

/// True when `line` (without its `\n`, with or without a trailing `\r`) would be read as syntax.
fn is_reserved_line(line: &str) -> bool {
    let l = line.strip_suffix('\r').unwrap_or(line);
    l == SEARCH_MARKER || l == DIVIDER_MARKER || l == REPLACE_MARKER || l == NO_NEWLINE
}

/// True when any line of `text` would be read as block syntax.
pub fn has_marker_line(text: &str) -> bool {
    text.split('\n').any(is_reserved_line)
}

/// Paths are written on a `### {path}` line.
pub fn path_is_writable(path: &str) -> bool {
    !path.is_empty() && !path.chars().any(|c| c.is_control()) && path.trim() == path
}

/// Number of (possibly overlapping) occurrences of `needle` in `hay`, counting at most `limit`.
pub fn count_occurrences(hay: &str, needle: &str, limit: usize) -> usize {
    if needle.is_empty() {
        return if hay.is_empty() { 1 } else { limit };
    }
    let (h, n) = (hay.as_bytes(), needle.as_bytes());
    let mut count = 0;
    let mut from = 0;
    while let Some(i) = find(&h[from..], n) {
        count += 1;
        if count >= limit {
            break;
        }
        from += i + 1;
    }
    count
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    if n.len() > h.len() {
        return None;
    }
    let first = n[0];
    let mut i = 0;
    while i + n.len() <= h.len() {
        match h[i..=h.len() - n.len()].iter().position(|&b| b == first) {
            None => return None,
            Some(p) => {
                i += p;
                if &h[i..i + n.len()] == n {
                    return Some(i);
                }
                i += 1;
            }
        }
    }
    None
}

/// Blocks that take `path` from `before` to `after` (`None` = the file does not exist).
///
/// Each SEARCH is the changed old lines plus just enough surrounding lines of the file as it
/// stands before that block to occur exactly once. Errors only on marker collisions and
/// unwritable paths; the caller still verifies with [`apply_blocks`].
pub fn generate(
    path: &str,
    before: Option<&str>,
    after: Option<&str>,
) -> Result<Vec<EditBlock>, EditError> {
    if !path_is_writable(path) {
        return Err(EditError::BadPath {
            path: path.to_string(),
        });
    }
    for t in [before, after].into_iter().flatten() {
        if has_marker_line(t) {
            return Err(EditError::MarkerCollision {
                path: path.to_string(),
            });
        }
    }
    let block = |s: &str, r: &str| EditBlock {
        path: path.to_string(),
        search: s.to_string(),
        replace: r.to_string(),
    };
    Ok(match (before, after) {
        (None, None) => Vec::new(),
        (None, Some(a)) => vec![block("", a)],
        (Some(b), None) => vec![block(b, "")],
        (Some(b), Some(a)) if b == a => Vec::new(),
        (Some(b), Some("")) => vec![block(b, ""), block("", "")],
        (Some(""), Some(a)) => vec![block("", a)],
        (Some(b), Some(a)) => modify(path, b, a),
    })
}

fn modify(path: &str, before: &str, after: &str) -> Vec<EditBlock> {
    let old: Vec<&str> = before.split_inclusive('\n').collect();
    let new: Vec<&str> = after.split_inclusive('\n').collect();
    let ops = similar::capture_diff_slices(similar::Algorithm::Myers, &old, &new);
    // Maximal changed regions: (old range, new range).
    let mut regions: Vec<(usize, usize, usize, usize)> = Vec::new();
    for op in ops {
        let (tag, o, n) = op.as_tag_tuple();
        if tag == similar::DiffTag::Equal {
            continue;
        }
        match regions.last_mut() {
            Some(r) if r.1 == o.start && r.3 == n.start => {
                r.1 = o.end;
                r.3 = n.end;
            }
            _ => regions.push((o.start, o.end, n.start, n.end)),
        }
    }
    let mut cur: Vec<&str> = old.clone();
    let mut delta: isize = 0; // current index = old index + delta, past the edited prefix
    let mut blocks = Vec::new();
    let mut k = 0;
    while k < regions.len() {
        let (a, mut b, c, mut d) = regions[k];
        k += 1;
        let s = (a as isize + delta) as usize; // start of the region in `cur`
        let (mut above, mut below) = (0usize, 0usize);
        let text: String = cur.concat();
        loop {
            let e = (b as isize + delta) as usize;
            let search: String = cur[s - above..e + below].concat();
            if !search.is_empty() && count_occurrences(&text, &search, 2) == 1 {
                break;
            }
            // Grow below first (lines not yet edited), merging the next region when reached;
            // then above (lines already final). Alternate so context stays short on both sides.
            let can_below = e + below < cur.len();
            let can_above = s - above > 0;
            let prefer_below = below <= above || !can_above;
            if can_below && prefer_below {
                let next_old = b + below; // old index of the line we would take
                if k < regions.len() && regions[k].0 == next_old {
                    // Absorb the next region; the lines between are context on both sides.
                    let (_, nb, _, nd) = regions[k];
                    k += 1;
                    b = nb;
                    d = nd;
                    below = 0;
                } else {
                    below += 1;
                }
            } else if can_above {
                above += 1;
            } else {
                // Whole file: occurs exactly once unless it is empty, handled by `generate`.
                break;
            }
        }
        let e = (b as isize + delta) as usize;
        let search: String = cur[s - above..e + below].concat();
        let mut repl: Vec<&str> = cur[s - above..s].to_vec();
        repl.extend_from_slice(&new[c..d]);
        repl.extend_from_slice(&cur[e..e + below]);
        let replace: String = repl.concat();
        cur.splice(s - above..e + below, repl.iter().copied());
        delta += (d - c) as isize - (b - a) as isize;
        blocks.push(EditBlock {
            path: path.to_string(),
            search,
            replace,
        });
    }
    blocks
}

/// Writes a body: the text itself, then `\ No newline at end of file` when it lacks a final
/// newline. The ctx formats write relevant files the same way.
pub fn push_body(out: &mut String, body: &str) {
    out.push_str(body);
    if !body.is_empty() && !body.ends_with('\n') {
        out.push('\n');
        out.push_str(NO_NEWLINE);
        out.push('\n');
    }
}

/// The inverse of [`push_body`] over a body's lines (each with its `\n`): their text, with a
/// closing `\ No newline at end of file` line and the newline before it removed.
pub fn read_body(lines: &[&str]) -> String {
    let mut body: String = lines.concat();
    if let Some(last) = lines.last()
        && last.strip_suffix('\n').unwrap_or(last) == NO_NEWLINE
    {
        body.truncate(body.len() - last.len());
        if body.ends_with('\n') {
            body.pop();
        }
    }
    body
}

/// `### {path}` and the block, without the surrounding code fence.
pub fn render_block(block: &EditBlock) -> String {
    let mut out = String::with_capacity(block.search.len() + block.replace.len() + 64);
    out.push_str("### ");
    out.push_str(&block.path);
    out.push('\n');
    out.push_str(SEARCH_MARKER);
    out.push('\n');
    push_body(&mut out, &block.search);
    out.push_str(DIVIDER_MARKER);
    out.push('\n');
    push_body(&mut out, &block.replace);
    out.push_str(REPLACE_MARKER);
    out.push('\n');
    out
}

/// Reads every block in `text`: a `### {path}` line directly followed by `<<<<<<< SEARCH`.
/// Everything else (prose, code fences) is skipped.
pub fn parse_blocks(text: &str) -> Result<Vec<EditBlock>, EditError> {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        match parse_block_at(&lines, i)? {
            Some((block, next)) => {
                out.push(block);
                i = next;
            }
            None => i += 1,
        }
    }
    Ok(out)
}

fn bare(l: &str) -> &str {
    l.strip_suffix('\n').unwrap_or(l)
}

/// The block starting at `lines[i]` (lines with their `\n`) and the index after it, or `None`
/// when `lines[i]` does not start one.
pub fn parse_block_at(lines: &[&str], i: usize) -> Result<Option<(EditBlock, usize)>, EditError> {
    let is_header =
        lines[i].starts_with("### ") && lines.get(i + 1).is_some_and(|l| bare(l) == SEARCH_MARKER);
    if !is_header {
        return Ok(None);
    }
    let path = bare(&lines[i][4..]).to_string();
    let mut i = i + 2;
    let mut read_body_to = |end: &str| -> Result<String, EditError> {
        let start = i;
        while i < lines.len() && bare(lines[i]) != end {
            if bare(lines[i]) == SEARCH_MARKER
                || (bare(lines[i]) == DIVIDER_MARKER && end == REPLACE_MARKER)
            {
                return Err(EditError::Parse {
                    line: i + 1,
                    reason: format!("unexpected marker while looking for `{end}`"),
                });
            }
            i += 1;
        }
        if i >= lines.len() {
            return Err(EditError::Parse {
                line: start + 1,
                reason: format!("block for `{path}` has no `{end}`"),
            });
        }
        let body = read_body(&lines[start..i]);
        i += 1;
        Ok(body)
    };
    let search = read_body_to(DIVIDER_MARKER)?;
    let replace = read_body_to(REPLACE_MARKER)?;
    Ok(Some((
        EditBlock {
            path,
            search,
            replace,
        },
        i,
    )))
}

/// Applies `blocks` in order to `files` (path → content; absent = file does not exist).
pub fn apply_blocks(
    files: &mut BTreeMap<String, String>,
    blocks: &[EditBlock],
) -> Result<(), EditError> {
    for (n, b) in blocks.iter().enumerate() {
        let block = n + 1;
        let path = b.path.clone();
        match files.get_mut(&b.path) {
            None => {
                if !b.search.is_empty() {
                    return Err(EditError::MissingFile { block, path });
                }
                files.insert(b.path.clone(), b.replace.clone());
            }
            Some(content) => {
                if b.search == *content && b.replace.is_empty() {
                    files.remove(&b.path);
                } else if b.search.is_empty() {
                    if !content.is_empty() {
                        return Err(EditError::EmptySearch { block, path });
                    }
                    *content = b.replace.clone();
                } else {
                    let count = count_occurrences(content, &b.search, 2);
                    if count != 1 {
                        return Err(EditError::NotUnique { block, path, count });
                    }
                    *content = content.replacen(&b.search, &b.replace, 1);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(before: Option<&str>, after: Option<&str>) -> Vec<EditBlock> {
        let blocks = generate("f.py", before, after).unwrap();
        let text: String = blocks.iter().map(render_block).collect();
        let parsed = parse_blocks(&text).unwrap();
        assert_eq!(parsed, blocks, "parse(render(blocks)) differs:\n{text}");
        let mut files = BTreeMap::new();
        if let Some(b) = before {
            files.insert("f.py".to_string(), b.to_string());
        }
        apply_blocks(&mut files, &parsed).unwrap();
        assert_eq!(
            files.get("f.py").map(String::as_str),
            after,
            "blocks:\n{text}"
        );
        blocks
    }

    #[test]
    fn repeated_lines_get_context() {
        let before = "x = 1\nreturn x\ny = 2\nreturn x\n";
        let after = "x = 1\nreturn x\ny = 2\nreturn y\n";
        let blocks = roundtrip(Some(before), Some(after));
        assert_eq!(blocks.len(), 1);
        assert_eq!(blocks[0].search, "y = 2\nreturn x\n");
    }

    #[test]
    fn create_delete_empty_and_no_newline() {
        roundtrip(None, Some("a\nb"));
        roundtrip(Some("a\nb\n"), None);
        roundtrip(Some(""), None);
        roundtrip(None, Some(""));
        roundtrip(Some("a\n"), Some(""));
        roundtrip(Some(""), Some("a\n"));
        roundtrip(Some("a\nb"), Some("a\nc"));
        roundtrip(Some("a\r\nb\r\n"), Some("a\r\nc\r\n"));
        let b = roundtrip(Some("a\nb"), Some("a\nb\n"));
        let text = render_block(&b[0]);
        assert!(
            text.contains("b\n\\ No newline at end of file\n=======\n"),
            "{text}"
        );
    }

    #[test]
    fn marker_lines_collide() {
        assert!(matches!(
            generate("f", Some("a\n=======\n"), Some("b\n")),
            Err(EditError::MarkerCollision { .. })
        ));
        assert!(matches!(
            generate("f", Some("a\n"), Some(">>>>>>> REPLACE\r\n")),
            Err(EditError::MarkerCollision { .. })
        ));
        assert!(generate("f", Some("a\n"), Some("b ======= c\n")).is_ok());
    }

    #[test]
    fn apply_refuses_ambiguous_and_missing() {
        let mut files = BTreeMap::from([("f".to_string(), "a\na\n".to_string())]);
        let blk = EditBlock {
            path: "f".into(),
            search: "a\n".into(),
            replace: "b\n".into(),
        };
        assert!(matches!(
            apply_blocks(&mut files, std::slice::from_ref(&blk)),
            Err(EditError::NotUnique { count: 2, .. })
        ));
        let missing = EditBlock {
            path: "g".into(),
            ..blk
        };
        assert!(matches!(
            apply_blocks(&mut files, &[missing]),
            Err(EditError::MissingFile { .. })
        ));
    }

    #[test]
    fn overlapping_occurrences_count() {
        assert_eq!(count_occurrences("a\na\na\n", "a\na\n", 5), 2);
        assert_eq!(count_occurrences("aaa", "aa", 5), 2);
    }

    fn line() -> impl Strategy<Value = String> {
        prop::sample::select(vec![
            "def f():",
            "    return x",
            "\tpass",
            "",
            "x = 1",
            "# ``` fence",
            "    ",
            "}",
        ])
        .prop_map(str::to_string)
    }

    fn file() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(line(), 0..14),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(lines, crlf, final_nl)| {
                let eol = if crlf { "\r\n" } else { "\n" };
                let mut s = lines.join(eol);
                if final_nl && !lines.is_empty() {
                    s.push_str(eol);
                }
                s
            })
    }

    /// A random edit of `text`: each line kept, dropped, replaced or followed by new lines.
    fn edit(text: &str, choices: &[(u8, String)]) -> String {
        let mut out = String::new();
        for (i, l) in text.split_inclusive('\n').enumerate() {
            let (op, new) = &choices[i % choices.len().max(1)];
            match op % 4 {
                0 => out.push_str(l),
                1 => {}
                2 => {
                    out.push_str(new);
                    out.push('\n');
                }
                _ => {
                    out.push_str(l);
                    if !l.ends_with('\n') {
                        out.push('\n');
                    }
                    out.push_str(new);
                    out.push('\n');
                }
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Random multi-commit histories over several files: every commit's blocks, rendered
        /// and parsed back, take the files before the commit to the files after it.
        #[test]
        fn blocks_roundtrip_over_commits(
            base in prop::collection::vec(prop::option::of(file()), 1..4),
            commits in prop::collection::vec(
                prop::collection::vec((0u8..6, prop::collection::vec((any::<u8>(), line()), 1..6), file()), 1..4),
                1..4,
            ),
        ) {
            let mut files: BTreeMap<String, String> = BTreeMap::new();
            for (i, f) in base.iter().enumerate() {
                if let Some(f) = f { files.insert(format!("p{i}.py"), f.clone()); }
            }
            for commit in commits {
                let before = files.clone();
                let mut after = files.clone();
                let mut blocks = Vec::new();
                for (i, (kind, choices, fresh)) in commit.iter().enumerate() {
                    let path = format!("p{}.py", i % base.len());
                    let old = after.get(&path).cloned();
                    let new = match (kind, &old) {
                        (0, _) => None,                         // delete (or stay absent)
                        (1, None) | (2, None) => Some(fresh.clone()), // create
                        (_, Some(o)) => Some(edit(o, choices)),
                        (_, None) => None,
                    };
                    blocks.extend(generate(&path, old.as_deref(), new.as_deref()).unwrap());
                    match new { Some(n) => { after.insert(path, n); } None => { after.remove(&path); } }
                }
                let text: String = blocks.iter().map(render_block).collect();
                let parsed = parse_blocks(&text).unwrap();
                let mut got = before.clone();
                apply_blocks(&mut got, &parsed).unwrap();
                prop_assert_eq!(&got, &after);
                files = after;
            }
        }
    }
}
