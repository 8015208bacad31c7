//! Hugging Face Hub model ids as tokenizer names (`Qwen/Qwen2.5-7B-Instruct[@revision]`),
//! resolved as `huggingface_hub` resolves them: its local cache first, else a download into
//! that cache, so the next load needs no network and other Hugging Face tools share the file.
//!
//! Cache layout (`huggingface_hub`'s): `{cache}/models--{org}--{name}/refs/{revision}` holds
//! the commit sha a revision pointed at when it was fetched, and
//! `snapshots/{sha}/tokenizer.json` the file at that commit. A cached revision is not checked
//! for newer commits: loads stay reproducible and offline once the file is there.
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
const FILE: &str = "tokenizer.json";
const MAX_REDIRECTS: usize = 10;

/// A model repository on the Hub at one revision (branch, tag or commit sha).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRepo {
    /// `org/name`.
    pub repo: String,
    pub revision: String,
}

fn repo_part_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 96
        && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

fn is_commit(s: &str) -> bool {
    s.len() == 40
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl HubRepo {
    /// `org/name` or `org/name@revision` (default `main`); `None` when `s` cannot be a model id
    /// (a URI, a path of more or fewer than two parts, a name ending in `.json`).
    pub fn parse(s: &str) -> Option<Self> {
        if s.contains("://") {
            return None;
        }
        let (repo, revision) = match s.split_once('@') {
            Some((r, rev)) => (r, rev),
            None => (s, "main"),
        };
        let (org, name) = repo.split_once('/')?;
        let revision_ok = !revision.is_empty()
            && revision.len() <= 255
            && !revision.starts_with('/')
            && revision
                .split('/')
                .all(|p| !p.is_empty() && p != "." && p != "..")
            && revision
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-/+".contains(c));
        (repo_part_ok(org) && repo_part_ok(name) && !name.ends_with(".json") && revision_ok).then(
            || Self {
                repo: repo.to_string(),
                revision: revision.to_string(),
            },
        )
    }

    /// `models--{org}--{name}`: the repository's directory in the cache.
    fn cache_dir(&self) -> String {
        format!("models--{}", self.repo.replace('/', "--"))
    }
}

impl fmt::Display for HubRepo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.repo, self.revision)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(
        "no model `{repo}` at {endpoint} (a private repository answers the same: set HF_TOKEN if it is yours)"
    )]
    RepoNotFound { repo: String, endpoint: String },
    #[error("model `{repo}` has no revision `{revision}`")]
    RevisionNotFound { repo: String, revision: String },
    #[error("model `{repo}` has no tokenizer.json at revision `{revision}`")]
    FileNotFound { repo: String, revision: String },
    #[error(
        "model `{repo}` is gated or private (HTTP {status}){}",
        if *token_set { ": the HF_TOKEN given has no access to it" } else { ": accept its terms on the Hub, then set HF_TOKEN to a token with access" }
    )]
    Gated {
        repo: String,
        status: u16,
        token_set: bool,
    },
    #[error(
        "HF_HUB_OFFLINE is set and `{repo}` is not in the Hugging Face cache (looked in {})",
        looked.display()
    )]
    Offline { repo: HubRepo, looked: PathBuf },
    #[error("downloading {url}: {reason}")]
    Http { url: String, reason: String },
    #[error("writing the Hugging Face cache at {}: {source}", path.display())]
    Cache {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where files come from and go: `huggingface_hub`'s settings.
#[derive(Debug, Clone)]
pub struct Hub {
    pub cache: PathBuf,
    /// `https://huggingface.co` or a mirror.
    pub endpoint: String,
    pub token: Option<String>,
    /// Only the cache is read.
    pub offline: bool,
}

impl Hub {
    /// From the process environment, as `huggingface_hub` reads it.
    pub fn from_env() -> Self {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// `HF_HUB_CACHE`, else `$HF_HOME/hub` (`HF_HOME` defaulting to
    /// `$XDG_CACHE_HOME/huggingface`, then `~/.cache/huggingface`); `HF_ENDPOINT`; `HF_TOKEN`,
    /// else the token `huggingface-cli login` saved in `$HF_HOME/token`; `HF_HUB_OFFLINE`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let var = |k: &str| var(k).filter(|v| !v.trim().is_empty());
        let home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| var("HOME").map(|h| Path::new(&h).join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"))
                .join("huggingface")
        });
        let token = var("HF_TOKEN").or_else(|| {
            std::fs::read_to_string(home.join("token"))
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        Self {
            cache: var("HF_HUB_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join("hub")),
            endpoint: var("HF_ENDPOINT")
                .map(|e| e.trim_end_matches('/').to_string())
                .unwrap_or_else(|| DEFAULT_ENDPOINT.into()),
            token: token.map(|t| t.trim().to_string()),
            offline: var("HF_HUB_OFFLINE").is_some_and(|v| {
                ["1", "on", "yes", "true"].contains(&v.trim().to_ascii_lowercase().as_str())
            }),
        }
    }

    /// The cached `tokenizer.json` of `repo`, if any.
    pub fn cached(&self, repo: &HubRepo) -> Option<PathBuf> {
        let dir = self.cache.join(repo.cache_dir());
        let commit = if is_commit(&repo.revision) {
            repo.revision.clone()
        } else {
            std::fs::read_to_string(dir.join("refs").join(&repo.revision))
                .ok()?
                .trim()
                .to_string()
        };
        let path = dir.join("snapshots").join(&commit).join(FILE);
        (is_commit(&commit) && path.is_file()).then_some(path)
    }

    /// The local path of `repo`'s `tokenizer.json`: from the cache, else downloaded into it.
    pub fn fetch(&self, repo: &HubRepo) -> Result<PathBuf, HubError> {
        if let Some(p) = self.cached(repo) {
            return Ok(p);
        }
        if self.offline {
            return Err(HubError::Offline {
                repo: repo.clone(),
                looked: self.cache.join(repo.cache_dir()),
            });
        }
        let url = format!(
            "{}/{}/resolve/{}/{FILE}",
            self.endpoint,
            repo.repo,
            encode_revision(&repo.revision)
        );
        // A runtime of its own on a thread of its own: callers may be synchronous or inside
        // any kind of async runtime.
        let (commit, body) = std::thread::scope(|s| {
            s.spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| HubError::Http {
                        url: url.clone(),
                        reason: e.to_string(),
                    })?
                    .block_on(self.download(repo, &url))
            })
            .join()
            .expect("download thread does not panic")
        })?;
        let commit = match commit {
            Some(c) if is_commit(&c) => c,
            None if is_commit(&repo.revision) => repo.revision.clone(),
            other => {
                return Err(HubError::Http {
                    url,
                    reason: format!(
                        "the answer names no commit (x-repo-commit: {other:?}); is HF_ENDPOINT a Hugging Face Hub?"
                    ),
                });
            }
        };
        let dir = self.cache.join(repo.cache_dir());
        let path = dir.join("snapshots").join(&commit).join(FILE);
        write_atomic(&path, &body)?;
        if repo.revision != commit {
            write_atomic(&dir.join("refs").join(&repo.revision), commit.as_bytes())?;
        }
        Ok(path)
    }

    /// GETs `url`, following redirects by hand: the commit sha is a header of the Hub's own
    /// answer (the redirect), not of the CDN's, and the token goes to the Hub only.
    async fn download(
        &self,
        repo: &HubRepo,
        url: &str,
    ) -> Result<(Option<String>, Vec<u8>), HubError> {
        let http = |reason: String| HubError::Http {
            url: url.to_string(),
            reason,
        };
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(30))
            .timeout(Duration::from_secs(600))
            .user_agent(concat!("davinci/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| http(e.to_string()))?;
        let hub = reqwest::Url::parse(&self.endpoint)
            .map_err(|e| http(format!("HF_ENDPOINT `{}`: {e}", self.endpoint)))?;
        let mut at = reqwest::Url::parse(url).map_err(|e| http(e.to_string()))?;
        let mut commit = None;
        for _ in 0..=MAX_REDIRECTS {
            let mut req = client.get(at.clone());
            if let Some(t) = &self.token
                && at.origin() == hub.origin()
            {
                req = req.bearer_auth(t);
            }
            let resp = req.send().await.map_err(|e| http(format!("{e:#}")))?;
            let header = |name: &str| {
                resp.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            if commit.is_none() {
                commit = header("x-repo-commit");
            }
            let status = resp.status();
            if status.is_redirection() {
                let location = header("location")
                    .ok_or_else(|| http(format!("HTTP {status} without a Location")))?;
                at = at
                    .join(&location)
                    .map_err(|e| http(format!("redirect to `{location}`: {e}")))?;
                continue;
            }
            if status.is_success() {
                let body = resp.bytes().await.map_err(|e| http(format!("{e:#}")))?;
                return Ok((commit, body.to_vec()));
            }
            let code = header("x-error-code").unwrap_or_default();
            let (repo_s, revision) = (repo.repo.clone(), repo.revision.clone());
            return Err(match (status.as_u16(), code.as_str()) {
                (_, "RevisionNotFound") => HubError::RevisionNotFound {
                    repo: repo_s,
                    revision,
                },
                (_, "EntryNotFound") => HubError::FileNotFound {
                    repo: repo_s,
                    revision,
                },
                (_, "RepoNotFound") | (404, _) => HubError::RepoNotFound {
                    repo: repo_s,
                    endpoint: self.endpoint.clone(),
                },
                (s @ (401 | 403), _) => HubError::Gated {
                    repo: repo_s,
                    status: s,
                    token_set: self.token.is_some(),
                },
                (s, _) => http(format!(
                    "HTTP {s}: {}",
                    resp.text().await.unwrap_or_default().trim()
                )),
            });
        }
        Err(http(format!("more than {MAX_REDIRECTS} redirects")))
    }
}

/// A revision as one path segment of the URL (`refs/pr/1` → `refs%2Fpr%2F1`).
fn encode_revision(rev: &str) -> String {
    rev.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Writes through a temporary file in the same directory and a rename, so a reader (or
/// another process fetching the same file) sees the whole file or none.
fn write_atomic(path: &Path, data: &[u8]) -> Result<(), HubError> {
    let err = |source| HubError::Cache {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().expect("cache paths have a parent");
    std::fs::create_dir_all(dir).map_err(err)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(err)?;
    tmp.write_all(data).map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist(path).map_err(|e| err(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_model_ids_and_leaves_paths_alone() {
        let r = HubRepo::parse("Qwen/Qwen2.5-7B-Instruct").unwrap();
        assert_eq!(
            (r.repo.as_str(), r.revision.as_str()),
            ("Qwen/Qwen2.5-7B-Instruct", "main")
        );
        assert_eq!(r.cache_dir(), "models--Qwen--Qwen2.5-7B-Instruct");
        let r = HubRepo::parse("org/name@refs/pr/1").unwrap();
        assert_eq!(r.revision, "refs/pr/1");
        assert_eq!(encode_revision(&r.revision), "refs%2Fpr%2F1");
        for not in [
            "gpt2",
            "a/b/c",
            "s3://bucket/tok",
            "data/tokenizer.json",
            "/abs/path",
            "./x/y",
            "org/name@",
            "org/name@../../etc",
            "org/",
        ] {
            assert_eq!(HubRepo::parse(not), None, "{not}");
        }
    }

    #[test]
    fn settings_follow_huggingface_hub_variables() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let h = Hub::from_vars(vars(&[("HOME", "/home/u")]));
        assert_eq!(h.cache, Path::new("/home/u/.cache/huggingface/hub"));
        assert_eq!(h.endpoint, DEFAULT_ENDPOINT);
        assert!(!h.offline);
        let h = Hub::from_vars(vars(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/xdg")]));
        assert_eq!(h.cache, Path::new("/xdg/huggingface/hub"));
        let h = Hub::from_vars(vars(&[
            ("HF_HOME", "/hf"),
            ("HF_ENDPOINT", "http://mirror:8080/"),
            ("HF_HUB_OFFLINE", "1"),
            ("HF_TOKEN", "hf_x"),
        ]));
        assert_eq!(h.cache, Path::new("/hf/hub"));
        assert_eq!(h.endpoint, "http://mirror:8080");
        assert!(h.offline);
        assert_eq!(h.token.as_deref(), Some("hf_x"));
        let h = Hub::from_vars(vars(&[
            ("HF_HOME", "/hf"),
            ("HF_HUB_CACHE", "/c"),
            ("HF_HUB_OFFLINE", "0"),
        ]));
        assert_eq!(h.cache, Path::new("/c"));
        assert!(!h.offline);

        // `huggingface-cli login` leaves its token in $HF_HOME/token.
        let home = tempfile::tempdir().unwrap();
        std::fs::write(home.path().join("token"), "hf_saved\n").unwrap();
        let dir = home.path().display().to_string();
        let h = Hub::from_vars(|k| (k == "HF_HOME").then(|| dir.clone()));
        assert_eq!(h.token.as_deref(), Some("hf_saved"));
    }
}
