//! Git-format diffs as tasks hold them: split per file, sorted into code and tests, reversed.

/// One file's section of a `git diff` (from its `diff --git` line to the next).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDiff {
    /// The path on the new side (`b/…`), or the old side for a deletion.
    pub path: String,
    pub text: String,
}

/// Splits a git diff into its files, in order. Text before the first `diff --git` line (a
/// commit message in `format-patch` output) is dropped.
pub fn split_files(diff: &str) -> Vec<FileDiff> {
    let mut out: Vec<FileDiff> = Vec::new();
    for line in diff.split_inclusive('\n') {
        if let Some(rest) = line.strip_prefix("diff --git ") {
            let rest = rest.trim_end_matches(['\n', '\r']);
            let path = rest
                .split_once(" b/")
                .map(|(_, b)| b.to_string())
                .unwrap_or_else(|| rest.to_string());
            out.push(FileDiff {
                path,
                text: String::new(),
            });
        }
        if let Some(f) = out.last_mut() {
            f.text.push_str(line);
        }
    }
    out
}

/// Which paths hold tests. SWE-bench's collector tests for the words `test`, `tests`,
/// `testing`, `e2e` as *substrings* of the path (so `latest.py` and `contest/` count as tests);
/// the default here matches them as whole path components, plus the file names pytest
/// collects (`test_*.py`, `*_test.py`) and `conftest.py`, so a root-level `test_x.py` counts
/// and `latest.py` does not.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct TestPathRule {
    pub words: Vec<String>,
    /// SWE-bench's original substring match instead of components.
    pub substring: bool,
}

impl Default for TestPathRule {
    fn default() -> Self {
        TestPathRule {
            words: ["test", "tests", "testing", "e2e"]
                .map(String::from)
                .to_vec(),
            substring: false,
        }
    }
}

impl TestPathRule {
    pub fn is_test(&self, path: &str) -> bool {
        if self.substring {
            return self.words.iter().any(|w| path.contains(w.as_str()));
        }
        let parts: Vec<&str> = path.split('/').collect();
        let (file, dirs) = parts.split_last().expect("split yields one part");
        if dirs.iter().any(|d| self.words.iter().any(|w| w == d)) {
            return true;
        }
        let stem = file.rsplit_once('.').map(|(s, _)| s).unwrap_or(file);
        self.words.iter().any(|w| w == stem)
            || stem.starts_with("test_")
            || stem.ends_with("_test")
            || stem == "conftest"
    }

    /// `(code, tests)` halves of a diff, each a valid git diff.
    pub fn split(&self, diff: &str) -> (String, String) {
        let (mut code, mut tests) = (String::new(), String::new());
        for f in split_files(diff) {
            if self.is_test(&f.path) {
                tests.push_str(&f.text);
            } else {
                code.push_str(&f.text);
            }
        }
        (code, tests)
    }
}

/// The diff that undoes `diff`: sides, modes and hunk ranges swapped, `+`/`-` lines exchanged
/// (a `\ No newline at end of file` marker stays with its line). Binary patches cannot be
/// reversed this way and are refused.
pub fn reverse(diff: &str) -> anyhow::Result<String> {
    let mut out = String::with_capacity(diff.len());
    let lines: Vec<&str> = diff.split_inclusive('\n').collect();
    let mut i = 0;
    let mut in_hunk = false;
    while i < lines.len() {
        let line = lines[i];
        let body = line.trim_end_matches('\n');
        let nl = &line[body.len()..];
        if let Some(rest) = body.strip_prefix("diff --git ") {
            in_hunk = false;
            match rest.split_once(" b/") {
                Some((a, b)) => {
                    let a = a.strip_prefix("a/").unwrap_or(a);
                    out.push_str(&format!("diff --git a/{b} b/{a}{nl}"));
                }
                None => out.push_str(line),
            }
        } else if !in_hunk && body.starts_with("GIT binary patch") {
            anyhow::bail!("binary patches cannot be reversed");
        } else if !in_hunk && body.starts_with("--- ") && i + 1 < lines.len() {
            let next = lines[i + 1].trim_end_matches('\n');
            anyhow::ensure!(next.starts_with("+++ "), "`---` line without `+++`: {body}");
            let old = &body[4..];
            let new = &next[4..];
            let swap = |p: &str, side: &str| match p.strip_prefix(&format!("{side}/")) {
                Some(rest) => format!("{}/{rest}", if side == "a" { "b" } else { "a" }),
                None => p.to_string(),
            };
            out.push_str(&format!("--- {}\n+++ {}\n", swap(new, "b"), swap(old, "a")));
            i += 2;
            continue;
        } else if !in_hunk {
            let swapped = [
                ("new file mode ", "deleted file mode "),
                ("deleted file mode ", "new file mode "),
                ("old mode ", "new mode "),
                ("new mode ", "old mode "),
                ("rename from ", "rename to "),
                ("rename to ", "rename from "),
                ("copy from ", "copy to "),
                ("copy to ", "copy from "),
            ]
            .iter()
            .find_map(|(from, to)| body.strip_prefix(from).map(|r| format!("{to}{r}{nl}")));
            if let Some(s) = swapped {
                out.push_str(&s);
            } else if let Some(idx) = body.strip_prefix("index ") {
                let (ids, mode) = idx.split_once(' ').unwrap_or((idx, ""));
                let (a, b) = ids.split_once("..").unwrap_or((ids, ""));
                let mode = if mode.is_empty() {
                    String::new()
                } else {
                    format!(" {mode}")
                };
                out.push_str(&format!("index {b}..{a}{mode}{nl}"));
            } else if body.starts_with("@@ ") {
                in_hunk = true;
                out.push_str(&reverse_hunk_header(body)?);
                out.push_str(nl);
            } else {
                out.push_str(line);
            }
        } else if body.starts_with("@@ ") {
            out.push_str(&reverse_hunk_header(body)?);
            out.push_str(nl);
        } else if body.starts_with('-') || body.starts_with('+') {
            // One run of changed lines: its `+` lines (with their markers) go first, then its
            // `-` lines, as git writes a hunk.
            let mut minus = String::new();
            let mut plus = String::new();
            while i < lines.len() {
                let l = lines[i];
                let target = match l.as_bytes().first() {
                    Some(b'-') => &mut plus,
                    Some(b'+') => &mut minus,
                    _ => break,
                };
                target.push_str(if l.starts_with('-') { "+" } else { "-" });
                target.push_str(&l[1..]);
                if let Some(m) = lines.get(i + 1).filter(|m| m.starts_with('\\')) {
                    target.push_str(m);
                    i += 1;
                }
                i += 1;
            }
            out.push_str(&minus);
            out.push_str(&plus);
            continue;
        } else if body.starts_with(' ') || body.starts_with('\\') || body.is_empty() {
            out.push_str(line);
        } else {
            in_hunk = false;
            continue;
        }
        i += 1;
    }
    Ok(out)
}

/// `@@ -a,b +c,d @@ ctx` → `@@ -c,d +a,b @@ ctx`.
fn reverse_hunk_header(h: &str) -> anyhow::Result<String> {
    let rest = h
        .strip_prefix("@@ -")
        .ok_or_else(|| anyhow::anyhow!("bad hunk header `{h}`"))?;
    let (old, rest) = rest
        .split_once(" +")
        .ok_or_else(|| anyhow::anyhow!("bad hunk header `{h}`"))?;
    let (new, tail) = rest
        .split_once(" @@")
        .ok_or_else(|| anyhow::anyhow!("bad hunk header `{h}`"))?;
    Ok(format!("@@ -{new} +{old} @@{tail}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIFF: &str = "diff --git a/src/m.py b/src/m.py\nindex 1111111..2222222 100644\n--- a/src/m.py\n+++ b/src/m.py\n@@ -1,3 +1,3 @@\n a = 1\n-b = 2\n+b = 3\n c = 4\n@@ -9,2 +9,3 @@ def f():\n x\n+y\n z\n\\ No newline at end of file\ndiff --git a/tests/test_m.py b/tests/test_m.py\nnew file mode 100644\nindex 0000000..3333333\n--- /dev/null\n+++ b/tests/test_m.py\n@@ -0,0 +1 @@\n+def test(): pass\ndiff --git a/latest.py b/latest.py\nindex 4444444..5555555 100644\n--- a/latest.py\n+++ b/latest.py\n@@ -1 +1 @@\n-x = 1\n\\ No newline at end of file\n+x = 2\n\\ No newline at end of file\n";

    #[test]
    fn splits_by_path_components_unlike_swe_bench_substrings() {
        let rule = TestPathRule::default();
        let (code, tests) = rule.split(DIFF);
        assert!(code.contains("src/m.py") && code.contains("latest.py"));
        assert!(tests.starts_with("diff --git a/tests/test_m.py") && !tests.contains("latest"));
        let swe = TestPathRule {
            substring: true,
            ..Default::default()
        };
        assert!(swe.is_test("latest.py"), "SWE-bench's rule");
        assert!(!rule.is_test("latest.py") && !rule.is_test("contest/a.py"));
        for p in [
            "test_x.py",
            "pkg/x_test.py",
            "e2e/run.js",
            "conftest.py",
            "testing/a.py",
        ] {
            assert!(rule.is_test(p), "{p}");
        }
        assert_eq!(split_files(DIFF).len(), 3);
    }

    #[test]
    fn reverse_undoes_and_twice_is_identity() {
        let r = reverse(DIFF).unwrap();
        assert!(r.contains("deleted file mode 100644"));
        assert!(r.contains("--- a/tests/test_m.py\n+++ /dev/null"));
        assert!(r.contains("@@ -1 +0,0 @@\n-def test(): pass"));
        assert!(r.contains("@@ -9,3 +9,2 @@ def f():\n x\n-y\n z\n"));
        assert!(r.contains(
            "-x = 2\n\\ No newline at end of file\n+x = 1\n\\ No newline at end of file\n"
        ));
        assert_eq!(reverse(&r).unwrap(), DIFF);
        assert!(reverse("diff --git a/x b/x\nGIT binary patch\nliteral 1\n").is_err());
    }
}
