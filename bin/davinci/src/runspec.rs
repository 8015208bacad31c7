//! A RunSpec as `davinci run` and `davinci runs submit` read it: the file, then the same
//! command-line overrides, then every local path resolved against the directory the command
//! runs in, so a spec means the same thing in this process and on a conductor elsewhere.
use anyhow::Context;
use davinci_conductor::spec::{RepoSource, RunSpec};
use davinci_runtime::blob::absolute_uri_in;
use std::path::{Path, PathBuf};

/// Overrides of the spec's fields; both commands take them and they mean the same in both.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Overrides {
    /// Repository to crawl instead of the spec's `sources.repos` (repeatable): a local path or
    /// clone URL. `PATH,name=OWNER/NAME` names the repository's PRs where no `origin` remote
    /// does (a local mirror); without either, a local repository is named
    /// `local/DIRECTORY` and the summary warns.
    #[arg(long, value_name = "PATH|URL[,name=OWNER/NAME]")]
    pub repo: Vec<String>,
    /// Storage root instead of the spec's `storage`: `file:///dir`, `file://./relative/dir` or
    /// `s3://bucket/prefix` (default: `davinci run` uses file://./davinci-data, a conductor
    /// its own `storage.uri`).
    #[arg(long, value_name = "URI")]
    pub storage: Option<String>,
    /// Run id instead of the spec's (default: derived from the resolved spec's content, so
    /// the same spec resumes the same run).
    #[arg(long)]
    pub run_id: Option<String>,
    /// Tokenizer instead of the spec's: a tokenizer.json path, a storage URI or a Hugging Face
    /// model id.
    #[arg(long, value_name = "PATH|URI|MODEL")]
    pub tokenizer: Option<String>,
}

/// A spec ready to run, and what the summary must warn about.
#[derive(Debug)]
pub struct Loaded {
    pub spec: RunSpec,
    pub warnings: Vec<String>,
}

/// Reads `path`, applies `o`, resolves local paths against the current directory, validates.
pub fn load(path: &Path, o: &Overrides) -> anyhow::Result<Loaded> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut spec = RunSpec::parse(&text)
        .with_context(|| format!("{} is not a valid run spec", path.display()))?;
    if !o.repo.is_empty() {
        spec.sources.repos = o.repo.iter().map(|r| RepoSource::parse(r)).collect();
    }
    if let Some(s) = &o.storage {
        spec.storage = Some(s.clone());
    }
    if let Some(id) = &o.run_id {
        spec.run_id = Some(id.clone());
    }
    if let Some(t) = &o.tokenizer {
        spec.tokenizer = t.clone();
    }
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let warnings = resolve_local_paths(&mut spec, &cwd)?;
    spec.validate()?;
    Ok(Loaded { spec, warnings })
}

/// A clone URL (`scheme://…` or scp-like `user@host:path`) rather than a local path.
fn is_url(s: &str) -> bool {
    s.contains("://") || (s.contains('@') && s.contains(':') && !Path::new(s).exists())
}

/// Makes every local path of `spec` absolute against `cwd` (the conductor and its services
/// run elsewhere), refuses local paths that do not exist naming their field, and names each
/// local repository that cannot name itself. Returns the warnings for the summary.
fn resolve_local_paths(spec: &mut RunSpec, cwd: &Path) -> anyhow::Result<Vec<String>> {
    let abs = |p: &str| -> PathBuf { std::path::absolute(cwd.join(p)).unwrap_or(cwd.join(p)) };
    if let Some(s) = &spec.storage {
        spec.storage = Some(absolute_uri_in(s, cwd));
    }
    // A tokenizer is a path, a storage URI or a Hub model id (`owner/name` that is no file).
    let t = spec.tokenizer.clone();
    if t.starts_with("file://") {
        spec.tokenizer = absolute_uri_in(&t, cwd);
    } else if !t.contains("://") {
        let p = abs(&t);
        let hub_id = davinci_tokenize::hub::HubRepo::parse(&t).is_some() && !p.exists();
        if !hub_id {
            anyhow::ensure!(
                p.is_file(),
                "invalid run spec at `tokenizer`: {} does not exist (relative paths are read from {})",
                p.display(),
                cwd.display()
            );
            spec.tokenizer = p.display().to_string();
        }
    }
    for f in &mut spec.reconstruct.decontamination_files {
        if !f.contains("://") {
            *f = abs(f).display().to_string();
        }
    }
    for (i, b) in spec
        .evaluation
        .iter_mut()
        .flat_map(|e| e.benchmarks.iter_mut())
        .enumerate()
    {
        let local = b
            .data
            .strip_prefix("file://")
            .unwrap_or(&b.data)
            .to_string();
        anyhow::ensure!(
            !local.contains("://"),
            "invalid run spec at `evaluation.benchmarks[{i}].data`: `{}` is not a local path (the evaluator reads local files)",
            b.data
        );
        let p = abs(&local);
        anyhow::ensure!(
            p.exists(),
            "invalid run spec at `evaluation.benchmarks[{i}].data`: {} does not exist (relative paths are read from {})",
            p.display(),
            cwd.display()
        );
        b.data = p.display().to_string();
    }
    let exists = |field: String, p: &str| -> anyhow::Result<String> {
        let local = p.strip_prefix("file://").unwrap_or(p);
        if p.contains("://") && !p.starts_with("file://") {
            return Ok(p.to_string());
        }
        let a = abs(local);
        anyhow::ensure!(
            a.exists(),
            "invalid run spec at `{field}`: {} does not exist (relative paths are read from {})",
            a.display(),
            cwd.display()
        );
        Ok(a.display().to_string())
    };
    if let Some(r) = &mut spec.rollout {
        for (i, t) in r.tasks.iter_mut().enumerate() {
            *t = exists(format!("rollout.tasks[{i}]"), t)?;
        }
        if let Some(d) = &mut r.repos_dir {
            *d = exists("rollout.repos_dir".into(), d)?;
        }
    }
    if let Some(t) = &mut spec.tasks {
        for (i, r) in t.repos.iter_mut().enumerate() {
            if let Some((name, path)) = r.split_once('=') {
                *r = format!("{name}={}", exists(format!("tasks.repos[{i}]"), path)?);
            }
        }
        if let Some(d) = &mut t.repos_dir {
            *d = exists("tasks.repos_dir".into(), d)?;
        }
    }
    let mut warnings = Vec::new();
    for (i, r) in spec.sources.repos.iter_mut().enumerate() {
        if r.path.starts_with("file://") {
            r.path = absolute_uri_in(&r.path, cwd);
            continue;
        }
        if is_url(&r.path) {
            continue;
        }
        let p = abs(&r.path);
        anyhow::ensure!(
            p.exists(),
            "invalid run spec at `sources.repos[{i}]`: `{}` is neither an existing path nor a clone URL (relative paths are read from {})",
            r.path,
            cwd.display()
        );
        r.path = p.display().to_string();
        if r.name.is_none() && origin_name(&p).is_none() {
            let name = fallback_name(&p);
            warnings.push(format!(
                "repository {} has no `origin` remote naming it: its PRs are named {name} (name it with --repo PATH,name=OWNER/NAME or {{path, name}} in sources.repos)",
                p.display()
            ));
            r.name = Some(name);
        }
    }
    Ok(warnings)
}

/// `owner/name` from the repository's `origin` remote, as the crawler reads it.
fn origin_name(repo: &Path) -> Option<String> {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["config", "--get", "remote.origin.url"])
        // the repository itself, never one around it
        .env("GIT_CEILING_DIRECTORIES", repo.parent().unwrap_or(repo))
        .output()
        .ok()?;
    let url = String::from_utf8_lossy(&out.stdout);
    davinci_crawler::git::repo_name_from_url(url.trim())
}

/// `local/{directory name without .git}`, in the characters an `owner/name` allows.
fn fallback_name(repo: &Path) -> String {
    let dir = repo
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = dir.strip_suffix(".git").unwrap_or(&dir);
    let clean: String = dir
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let clean = clean.trim_matches('.');
    format!("local/{}", if clean.is_empty() { "repo" } else { clean })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_names_strip_git_and_odd_characters() {
        assert_eq!(fallback_name(Path::new("/m/widgets.git")), "local/widgets");
        assert_eq!(fallback_name(Path::new("/m/my repo")), "local/my-repo");
        assert_eq!(fallback_name(Path::new("/m/..git")), "local/repo");
    }

    #[test]
    fn local_paths_resolve_against_the_directory_and_missing_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cwd = dir.path();
        std::fs::create_dir(cwd.join("mirror.git")).unwrap();
        std::fs::write(cwd.join("tok.json"), "{}").unwrap();
        let yaml = "storage: file://./out\nsources:\n  repos: [mirror.git, 'https://github.com/a/b', 'x.git,name=acme/x']\ntokenizer: tok.json\nreconstruct:\n  decontamination_files: ['bench.jsonl:prompt']\n";
        let mut spec = RunSpec::parse(yaml).unwrap();
        spec.sources.repos.pop(); // x.git does not exist: refused below
        let warnings = resolve_local_paths(&mut spec, cwd).unwrap();
        assert_eq!(
            spec.storage.unwrap(),
            format!("file://{}/out", cwd.display())
        );
        assert_eq!(spec.tokenizer, cwd.join("tok.json").display().to_string());
        assert_eq!(
            spec.reconstruct.decontamination_files,
            [format!("{}/bench.jsonl:prompt", cwd.display())]
        );
        let r = &spec.sources.repos;
        assert_eq!(r[0].path, cwd.join("mirror.git").display().to_string());
        assert_eq!(r[0].name.as_deref(), Some("local/mirror"));
        assert_eq!(r[1].path, "https://github.com/a/b");
        assert_eq!(r[1].name, None);
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("local/mirror"), "{warnings:?}");

        let mut spec = RunSpec::parse(yaml).unwrap();
        let e = resolve_local_paths(&mut spec, cwd).unwrap_err().to_string();
        assert!(e.contains("sources.repos[2]") && e.contains("x.git"), "{e}");
        let mut spec = RunSpec::parse(&yaml.replace("tok.json", "nope.json")).unwrap();
        let e = resolve_local_paths(&mut spec, cwd).unwrap_err().to_string();
        assert!(e.contains("`tokenizer`") && e.contains("nope.json"), "{e}");
        // A Hub model id is no local path and stays as it is.
        let mut spec = RunSpec::parse(&yaml.replace("tok.json", "Qwen/Qwen2.5-7B")).unwrap();
        spec.sources.repos.pop();
        resolve_local_paths(&mut spec, cwd).unwrap();
        assert_eq!(spec.tokenizer, "Qwen/Qwen2.5-7B");
    }
}
