//! The git mirror of a repository, read through the `git` CLI: the net diff of a PR, the
//! nearest tag, and trees at a commit exported for sandboxes.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

/// A local git repository (bare mirror or clone).
#[derive(Debug, Clone)]
pub struct Mirror {
    pub dir: PathBuf,
}

/// Whether `s` names a commit: 7–40 hex digits (nothing a shell or git option could read).
pub fn is_sha(s: &str) -> bool {
    (7..=40).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Mirror {
    pub fn open(dir: &Path) -> anyhow::Result<Mirror> {
        let m = Mirror {
            dir: dir.to_path_buf(),
        };
        m.git(&["rev-parse", "--git-dir"])
            .with_context(|| format!("{} is not a git repository", dir.display()))?;
        Ok(m)
    }

    fn git(&self, args: &[&str]) -> anyhow::Result<Vec<u8>> {
        let out = Command::new("git")
            .arg("-C")
            .arg(&self.dir)
            .args(["-c", "core.quotepath=off"])
            .args(args)
            .output()
            .context("running git")?;
        anyhow::ensure!(
            out.status.success(),
            "git {} in {}: {}",
            args.join(" "),
            self.dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(out.stdout)
    }

    /// Whether the commit is in the mirror.
    pub fn has_commit(&self, sha: &str) -> bool {
        is_sha(sha)
            && self
                .git(&["cat-file", "-e", &format!("{sha}^{{commit}}")])
                .is_ok()
    }

    /// `git diff base head` with full index lines and binary patches, no renames (each side
    /// of a rename is its own file, as SWE-bench's patches are).
    pub fn diff(&self, base: &str, head: &str) -> anyhow::Result<String> {
        anyhow::ensure!(
            is_sha(base) && is_sha(head),
            "not commit ids: {base} {head}"
        );
        let out = self.git(&[
            "diff",
            "--no-color",
            "--no-ext-diff",
            "--no-renames",
            "--binary",
            base,
            head,
        ])?;
        String::from_utf8(out).context("the diff is not UTF-8")
    }

    /// The nearest tag reachable from `sha`, if any.
    pub fn nearest_tag(&self, sha: &str) -> Option<String> {
        if !is_sha(sha) {
            return None;
        }
        let out = self.git(&["describe", "--tags", "--abbrev=0", sha]).ok()?;
        let t = String::from_utf8(out).ok()?.trim().to_string();
        (!t.is_empty()).then_some(t)
    }

    /// Writes the tree of `sha` into `dest` (created; no `.git`), through a private index and
    /// `dest` as the work tree, so the mirror itself is never touched and a bare mirror works.
    pub fn export(&self, sha: &str, dest: &Path) -> anyhow::Result<()> {
        anyhow::ensure!(is_sha(sha), "not a commit id: {sha}");
        std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
        let index = tempfile::NamedTempFile::new()?;
        let run = |args: &[&str]| -> anyhow::Result<()> {
            let out = Command::new("git")
                .arg("-C")
                .arg(&self.dir)
                .arg("--work-tree")
                .arg(dest)
                .env("GIT_INDEX_FILE", index.path())
                .args(args)
                .output()
                .context("running git")?;
            anyhow::ensure!(
                out.status.success(),
                "git {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            Ok(())
        };
        run(&["read-tree", sha])?;
        run(&["checkout-index", "-a", "-f"])?;
        Ok(())
    }
}

/// SWE-bench's `version` from a tag: the leading `major.minor` (`v8.1.3` → `8.1`,
/// `release-2.0` → `2.0`); `None` when the tag holds no number.
pub fn version_of_tag(tag: &str) -> Option<String> {
    let start = tag.find(|c: char| c.is_ascii_digit())?;
    let nums: Vec<&str> = tag[start..]
        .split(|c: char| !c.is_ascii_digit())
        .take(2)
        .filter(|s| !s.is_empty())
        .collect();
    Some(nums.join("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_shas() {
        assert_eq!(version_of_tag("v8.1.3").as_deref(), Some("8.1"));
        assert_eq!(version_of_tag("release-2.0").as_deref(), Some("2.0"));
        assert_eq!(version_of_tag("23.1.0").as_deref(), Some("23.1"));
        assert_eq!(version_of_tag("7").as_deref(), Some("7"));
        assert_eq!(version_of_tag("latest"), None);
        assert!(is_sha("0123abc") && !is_sha("--output=x") && !is_sha("HEAD"));
    }

    /// Mirrors are usually bare (`git clone --mirror`): exporting a tree needs no work tree of
    /// theirs, and leaves the source untouched in both kinds.
    #[test]
    fn exports_from_bare_mirrors_and_clones() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("pkg")).unwrap();
        std::fs::write(src.join("pkg/a.py"), "x = 1\n").unwrap();
        let git = |dir: &Path, args: &[&str]| {
            let out = Command::new("git")
                .arg("-C")
                .arg(dir)
                .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            String::from_utf8(out.stdout).unwrap()
        };
        git(&src, &["init", "-q"]);
        git(&src, &["add", "."]);
        git(&src, &["commit", "-q", "-m", "one"]);
        let sha = git(&src, &["rev-parse", "HEAD"]).trim().to_string();
        let bare = tmp.path().join("bare.git");
        git(
            tmp.path(),
            &["clone", "-q", "--bare", src.to_str().unwrap(), "bare.git"],
        );
        for (i, dir) in [&bare, &src].into_iter().enumerate() {
            let dest = tmp.path().join(format!("out{i}"));
            Mirror::open(dir).unwrap().export(&sha, &dest).unwrap();
            assert_eq!(
                std::fs::read_to_string(dest.join("pkg/a.py")).unwrap(),
                "x = 1\n"
            );
            assert!(!dest.join(".git").exists());
        }
        assert_eq!(git(&src, &["status", "--porcelain"]), "");
    }
}
