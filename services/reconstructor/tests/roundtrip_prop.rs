//! Property: for random multi-commit PRs (random files with CRLF, tabs, no final newline, empty
//! files, repeated lines; edits, deletions, new files, renames with and without edits, copies),
//! whose per-commit hunks come from an independent diff printer, both renderers succeed and each
//! text, read back alone, gives the generated files after every commit.
use davinci_core::ctx::{self, Enhancement};
use davinci_core::ctx_text;
use davinci_core::pr::PullRequest;
use proptest::prelude::*;
use std::collections::BTreeMap;

fn line() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "def f(x):",
        "    return x",
        "\tpass",
        "",
        "x = 1",
        "    return x",
        "# ``` not a fence",
        "  ",
        "}",
    ])
    .prop_map(str::to_string)
}

fn file() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(line(), 0..16),
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

#[derive(Debug, Clone)]
enum Op {
    Edit(Vec<(u8, String)>),
    Delete,
    Create(String),
    /// With edits when the flag is set.
    Rename(bool),
    Copy(Vec<(u8, String)>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec((any::<u8>(), line()), 1..6).prop_map(Op::Edit),
        1 => Just(Op::Delete),
        1 => file().prop_map(Op::Create),
        1 => any::<bool>().prop_map(Op::Rename),
        1 => prop::collection::vec((any::<u8>(), line()), 1..6).prop_map(Op::Copy),
    ]
}

fn edit(text: &str, choices: &[(u8, String)]) -> String {
    let eol = if text.contains("\r\n") { "\r\n" } else { "\n" };
    let mut out = String::new();
    for (i, l) in text.split_inclusive('\n').enumerate() {
        let (op, new) = &choices[i % choices.len()];
        match op % 5 {
            0 | 1 => out.push_str(l),
            2 => {}
            3 => {
                out.push_str(new);
                out.push_str(eol);
            }
            _ => {
                out.push_str(l);
                if !l.ends_with('\n') {
                    out.push_str(eol);
                }
                out.push_str(new);
                out.push_str(eol);
            }
        }
    }
    out
}

fn hunks(old: &str, new: &str) -> String {
    similar::TextDiff::from_lines(old, new)
        .unified_diff()
        .context_radius(3)
        .missing_newline_hint(true)
        .to_string()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn rendered_python_replays_commits(
        base in prop::collection::vec(file(), 1..4),
        commits in prop::collection::vec(prop::collection::vec((0usize..4, op()), 1..3), 1..4),
    ) {
        let mut files: BTreeMap<String, String> = base
            .iter()
            .enumerate()
            .map(|(i, f)| (format!("pkg/m{i}.py"), f.clone()))
            .collect();
        let base_files: Vec<serde_json::Value> = files
            .iter()
            .map(|(p, c)| serde_json::json!({"path": p, "content": c}))
            .collect();
        let mut states = vec![files.clone()];
        let mut rec_commits = Vec::new();
        let mut fresh = 0;
        for (k, changes) in commits.iter().enumerate() {
            let mut fcs = Vec::new();
            let mut touched = std::collections::BTreeSet::new();
            for (slot, op) in changes {
                let existing: Vec<String> = files.keys().cloned().collect();
                match op {
                    Op::Create(text) => {
                        fresh += 1;
                        let p = format!("pkg/new{fresh}.py");
                        fcs.push(serde_json::json!({"path": p, "status": "added", "diff": hunks("", text)}));
                        files.insert(p.clone(), text.clone());
                        touched.insert(p);
                    }
                    _ if existing.is_empty() => {}
                    // One change per path per commit, as git records it.
                    _ if touched.contains(&existing[slot % existing.len()]) => {}
                    Op::Edit(choices) => {
                        let p = existing[slot % existing.len()].clone();
                        let old = files[&p].clone();
                        let new = edit(&old, choices);
                        if new != old {
                            fcs.push(serde_json::json!({"path": p, "status": "modified", "diff": hunks(&old, &new)}));
                            files.insert(p.clone(), new);
                            touched.insert(p);
                        }
                    }
                    Op::Delete => {
                        let p = existing[slot % existing.len()].clone();
                        let old = files.remove(&p).unwrap();
                        fcs.push(serde_json::json!({"path": p, "status": "deleted", "diff": hunks(&old, "")}));
                        touched.insert(p);
                    }
                    Op::Rename(edited) => {
                        let p = existing[slot % existing.len()].clone();
                        fresh += 1;
                        let q = format!("pkg/renamed{fresh}.py");
                        let old = files.remove(&p).unwrap();
                        let new = if *edited { format!("{old}# moved\n") } else { old.clone() };
                        fcs.push(serde_json::json!({"path": q, "old_path": p, "status": "renamed", "diff": hunks(&old, &new)}));
                        files.insert(q.clone(), new);
                        touched.insert(p);
                        touched.insert(q);
                    }
                    Op::Copy(choices) => {
                        let p = existing[slot % existing.len()].clone();
                        fresh += 1;
                        let q = format!("pkg/copy{fresh}.py");
                        let old = files[&p].clone();
                        let new = edit(&old, choices);
                        fcs.push(serde_json::json!({"path": q, "old_path": p, "status": "copied", "diff": hunks(&old, &new)}));
                        files.insert(q.clone(), new);
                        touched.insert(p);
                        touched.insert(q);
                    }
                }
            }
            rec_commits.push(serde_json::json!({"sha": format!("{k:040}"), "message": format!("change {k}"), "files": fcs}));
            states.push(files.clone());
        }
        let pr: PullRequest = serde_json::from_value(serde_json::json!({
            "schema": "davinci.pr/v1", "id": "github:o/r#1", "repo": {"full_name": "o/r"},
            "number": 1, "title": "t", "author": {"login": "a"},
            "base": {"ref": "main", "sha": "b"}, "head": {"ref": "f", "sha": "h"},
            "merge_commit_sha": "m", "commits": rec_commits, "base_files": base_files,
            "source": "git"
        })).unwrap();
        let enh = Enhancement { summary: "s".into(), commit_messages: vec![] };
        // The text speaks of the paths the PR touched; base files it never touches stay out.
        let touched: std::collections::BTreeSet<&str> = pr
            .commits
            .iter()
            .flat_map(|c| &c.files)
            .flat_map(|f| f.old_path.iter().chain([&f.path]))
            .map(String::as_str)
            .collect();
        let want: Vec<BTreeMap<String, String>> = states
            .iter()
            .map(|s| s.iter().filter(|(p, _)| touched.contains(p.as_str())).map(|(p, c)| (p.clone(), c.clone())).collect())
            .collect();
        let general = ctx::render_general(&pr, &enh);
        prop_assert!(general.is_ok(), "ctx-general: {:?}", general.err());
        let read = ctx_text::read_general(&general.unwrap()).unwrap();
        prop_assert_eq!(&read.base, &want[0]);
        prop_assert_eq!(&read.commits[..], &want[1..]);
        match ctx::render_python(&pr, &enh) {
            Ok(r) => {
                let read = ctx_text::read_python(&r.text).unwrap();
                prop_assert_eq!(&read.base, &want[0]);
                prop_assert_eq!(&read.commits[..], &want[1..]);
            }
            // A PR whose commits change nothing has nothing to render.
            Err(e) if e.reason == "no_edits" => {
                prop_assert!(states.windows(2).all(|w| w[0] == w[1]));
            }
            Err(e) => prop_assert!(false, "ctx-python: {e}"),
        }
    }
}
