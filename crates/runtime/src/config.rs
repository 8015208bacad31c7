//! Process settings: built-in defaults → file (`--config`, YAML or TOML) → environment
//! `DAVINCI__SECTION__KEY`. Everything is validated before any work starts, and an invalid
//! value is reported with its field path.
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::Path;

/// A refused setting: where it is and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration at `{path}`: {reason}")]
pub struct ConfigError {
    pub path: String,
    pub reason: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub server: ServerSettings,
    pub storage: StorageSettings,
    pub queue: QueueSettings,
    pub telemetry: TelemetrySettings,
    pub services: ServicesSettings,
    pub evaluator: EvaluatorSettings,
    pub rollout: RolloutServiceSettings,
    pub trainer: TrainerSettings,
    pub tasks: TasksServiceSettings,
    pub github: GithubSettings,
    /// Where untrusted commands run (SWE-bench grading, agent tools): `kind: local`
    /// (bubblewrap), `docker` or `kubernetes`, with that backend's options.
    pub sandbox: davinci_sandbox::Backend,
}

/// The rollout service's own settings; a job's spec adds to them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutServiceSettings {
    /// The sandbox backend as `davinci_sandbox::Backend` reads it: `kind: local | docker |
    /// kubernetes` and that backend's fields; empty: bubblewrap with workspaces at /testbed.
    pub sandbox: serde_json::Map<String, serde_json::Value>,
    /// `{instance_id}/` trees or `{owner}__{name}/` clones (local backend); empty: none.
    pub repos_dir: String,
    /// Tasks one replica rolls out at once.
    pub workers: usize,
}

impl Default for RolloutServiceSettings {
    fn default() -> Self {
        Self {
            sandbox: Default::default(),
            repos_dir: String::new(),
            workers: 2,
        }
    }
}

/// The tasks service's own settings; a job's spec adds to them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TasksServiceSettings {
    /// The stage's base configuration as `davinci_tasks::TasksConfig` reads it (select, env,
    /// validate, test_timeout_secs, jobs, sandbox); a job's `settings_json` is laid over it.
    /// Without `sandbox` it takes the process's `sandbox:` section.
    pub config: serde_json::Map<String, serde_json::Value>,
    /// Where recipe environments are built and cached (a local directory not under `/tmp`,
    /// which every sandbox replaces); empty: `{storage}/cache/envs` on local storage, else
    /// `davinci-cache/envs` in the working directory.
    pub env_root: String,
    /// Scratch space for trees at base commits; empty: `davinci-work` in the working directory.
    pub work_root: String,
    /// Git mirrors `owner__name[.git]` for jobs whose spec names none; empty: none.
    pub repos_dir: String,
    /// PR shards one replica validates at once.
    pub workers: usize,
}

impl Default for TasksServiceSettings {
    fn default() -> Self {
        Self {
            config: Default::default(),
            env_root: String::new(),
            work_root: String::new(),
            repos_dir: String::new(),
            workers: 1,
        }
    }
}

/// The trainer service's own settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainerSettings {
    /// Namespaces where a starting trainer looks for the cluster jobs (JobSets / TrainJobs) a
    /// previous process left running, by label, and follows them again; empty: none (the
    /// chart sets the release namespace).
    pub reattach_namespaces: Vec<String>,
}

/// The crawler's GitHub: tokens come from `GITHUB_TOKENS` / `GITHUB_TOKEN`, never from here.
/// With a Redis queue, every replica draws on one budget per token and shares one ETag cache.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GithubSettings {
    /// REST base (`https://HOST/api/v3` for GitHub Enterprise Server).
    pub api_url: String,
    /// Where repositories named by GH Archive or discovery are cloned from.
    pub web_url: String,
    /// Requests each token may make per hour.
    pub budget_per_hour: u64,
}

impl Default for GithubSettings {
    fn default() -> Self {
        Self {
            api_url: "https://api.github.com".into(),
            web_url: "https://github.com".into(),
            budget_per_hour: 5000,
        }
    }
}

/// Where the evaluator finds prepared SWE-bench environments and its Python.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvaluatorSettings {
    /// `{instance_id}/` trees or `{owner}__{name}/` clones; empty: none prepared.
    pub repos_dir: String,
    pub python: String,
    /// Where sandbox workspaces are made; empty: the system temp directory.
    pub work_root: String,
}

impl Default for EvaluatorSettings {
    fn default() -> Self {
        Self {
            repos_dir: String::new(),
            python: "python3".into(),
            work_root: String::new(),
        }
    }
}

/// Where the conductor reaches the stage services; empty means "this process" (the services
/// run beside the conductor, as with `--target all`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServicesSettings {
    pub crawler: String,
    pub reconstructor: String,
    pub tokenizer_packer: String,
    pub trainer: String,
    pub evaluator: String,
    pub rollout: String,
    pub tasks: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// gRPC listen address.
    pub listen: String,
    /// Prometheus `/metrics` listen address; empty disables it.
    pub metrics_listen: String,
    /// Unary RPCs taking longer are answered DEADLINE_EXCEEDED.
    pub request_timeout_s: u64,
    /// RPCs handled at once by the process; more wait.
    pub concurrency_limit: usize,
    /// File holding the bearer token clients must send (health stays open). The token can
    /// also come from `DAVINCI_AUTH_TOKEN`; it is never logged.
    pub auth_token_file: Option<String>,
    /// PEM certificate and key; both or neither.
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    /// On SIGTERM, in-flight work gets this long to finish before it is cancelled.
    pub shutdown_grace_s: u64,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:50051".into(),
            metrics_listen: "0.0.0.0:9090".into(),
            request_timeout_s: 60,
            concurrency_limit: 256,
            auth_token_file: None,
            tls_cert: None,
            tls_key: None,
            shutdown_grace_s: 30,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSettings {
    /// Root of all run data: `file:///abs/dir`, `file://./rel/dir` or `s3://bucket/prefix`.
    /// A relative `file://` root is made absolute against the directory the process starts in
    /// when the settings are loaded.
    pub uri: String,
    pub s3: crate::blob::S3Config,
}

impl Default for StorageSettings {
    fn default() -> Self {
        Self {
            uri: "file://./davinci-data".into(),
            s3: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueSettings {
    /// `memory://` (in-process) or `redis://host:port[/db]`.
    pub url: String,
    pub visibility_timeout_s: u64,
    pub max_attempts: u32,
    pub high_water_mark: u64,
    pub group: String,
    /// First backoff after a transient failure, doubled per attempt up to `max_retry_backoff_ms`.
    pub retry_backoff_ms: u64,
    pub max_retry_backoff_ms: u64,
}

impl Default for QueueSettings {
    fn default() -> Self {
        let q = crate::queue::QueueOptions::default();
        Self {
            url: "memory://".into(),
            visibility_timeout_s: q.visibility_timeout.as_secs(),
            max_attempts: q.max_attempts,
            high_water_mark: q.high_water_mark,
            group: q.group,
            retry_backoff_ms: q.retry_backoff.as_millis() as u64,
            max_retry_backoff_ms: q.max_retry_backoff.as_millis() as u64,
        }
    }
}

impl QueueSettings {
    pub fn options(&self) -> crate::queue::QueueOptions {
        crate::queue::QueueOptions {
            visibility_timeout: std::time::Duration::from_secs(self.visibility_timeout_s),
            max_attempts: self.max_attempts,
            high_water_mark: self.high_water_mark,
            group: self.group.clone(),
            retry_backoff: std::time::Duration::from_millis(self.retry_backoff_ms),
            max_retry_backoff: std::time::Duration::from_millis(self.max_retry_backoff_ms),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// `json` (servers), `human` (CLI) or `auto` (json unless stderr is a terminal).
    pub log_format: String,
    /// tracing filter, e.g. `info` or `davinci_crawler=debug,info`; `RUST_LOG` wins.
    pub log_level: String,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            log_format: "auto".into(),
            log_level: "info".into(),
        }
    }
}

impl Settings {
    /// Loads defaults, then `file` (if any), then `DAVINCI__…` variables, and validates.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// As [`Settings::load`], with the environment given explicitly (tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut defaults = serde_json::to_value(Settings::default())
            .map_err(|e| ConfigError::new("<defaults>", e.to_string()))?;
        // Only the backend's kind: its options default by themselves, and another kind set by
        // the file or environment must not inherit the local backend's options.
        defaults["sandbox"] = serde_json::json!({"kind": "local"});
        let defaults = config::Config::try_from(&defaults)
            .map_err(|e| ConfigError::new("<defaults>", e.to_string()))?;
        let mut builder = config::Config::builder().add_source(defaults);
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::new(
                    "--config",
                    format!("{} does not exist or is not a file", path.display()),
                ));
            }
            builder = builder.add_source(config::File::from(path).required(true));
        }
        let env: std::collections::HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("DAVINCI__"))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("DAVINCI")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(env)),
        );
        let merged = builder.build().map_err(|e| {
            ConfigError::new(
                file.map(|p| p.display().to_string())
                    .unwrap_or_else(|| "<environment>".into()),
                e.to_string(),
            )
        })?;
        let value: serde_json::Value = merged
            .try_deserialize()
            .map_err(|e| ConfigError::new("<merged>", e.to_string()))?;
        let mut settings: Settings = serde_path_to_error::deserialize(value)
            .map_err(|e| ConfigError::new(e.path().to_string(), e.inner().to_string()))?;
        settings.storage.uri = crate::blob::absolute_uri(&settings.storage.uri)
            .map_err(|e| ConfigError::new("storage.uri", e.to_string()))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks values the types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let addr = |path: &str, v: &str| {
            v.parse::<SocketAddr>().map(|_| ()).map_err(|e| {
                ConfigError::new(
                    path,
                    format!("`{v}` is not a socket address like 0.0.0.0:50051 ({e})"),
                )
            })
        };
        addr("server.listen", &self.server.listen)?;
        if !self.server.metrics_listen.is_empty() {
            addr("server.metrics_listen", &self.server.metrics_listen)?;
        }
        if self.server.request_timeout_s == 0 {
            return Err(ConfigError::new(
                "server.request_timeout_s",
                "must be at least 1",
            ));
        }
        if self.server.concurrency_limit == 0 {
            return Err(ConfigError::new(
                "server.concurrency_limit",
                "must be at least 1",
            ));
        }
        match (&self.server.tls_cert, &self.server.tls_key) {
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "server.tls_key",
                    "tls_cert is set, so tls_key is required",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "server.tls_cert",
                    "tls_key is set, so tls_cert is required",
                ));
            }
            (Some(c), Some(k)) => {
                for (p, f) in [("server.tls_cert", c), ("server.tls_key", k)] {
                    if !Path::new(f).is_file() {
                        return Err(ConfigError::new(p, format!("{f} does not exist")));
                    }
                }
            }
            (None, None) => {}
        }
        if let Some(f) = &self.server.auth_token_file
            && !Path::new(f).is_file()
        {
            return Err(ConfigError::new(
                "server.auth_token_file",
                format!("{f} does not exist"),
            ));
        }
        let scheme = self.storage.uri.split("://").next().unwrap_or_default();
        if !self.storage.uri.contains("://") || !matches!(scheme, "file" | "s3") {
            return Err(ConfigError::new(
                "storage.uri",
                format!("`{}` must start with file:// or s3://", self.storage.uri),
            ));
        }
        if scheme == "file" {
            // relative roots are made absolute when the settings are loaded
            let uri = crate::blob::absolute_uri(&self.storage.uri)
                .map_err(|e| ConfigError::new("storage.uri", e.to_string()))?;
            crate::blob::FileStore::dir_of_uri(&uri)
                .map_err(|e| ConfigError::new("storage.uri", e.to_string()))?;
        }
        self.storage.s3.validate().map_err(|e| match e {
            crate::blob::BlobError::Config { field, reason } => {
                ConfigError::new(format!("storage.{field}"), reason)
            }
            other => ConfigError::new("storage.s3", other.to_string()),
        })?;
        self.sandbox.validate().map_err(|e| match e {
            davinci_sandbox::SandboxError::Config { field, reason } => {
                ConfigError::new(format!("sandbox.{field}"), reason)
            }
            other => ConfigError::new("sandbox", other.to_string()),
        })?;
        let qs = self.queue.url.split("://").next().unwrap_or_default();
        if !self.queue.url.contains("://") || !matches!(qs, "memory" | "redis" | "rediss") {
            return Err(ConfigError::new(
                "queue.url",
                format!(
                    "`{}` must be memory://, redis:// or rediss://",
                    self.queue.url
                ),
            ));
        }
        if self.queue.max_attempts == 0 {
            return Err(ConfigError::new("queue.max_attempts", "must be at least 1"));
        }
        if self.queue.visibility_timeout_s == 0 {
            return Err(ConfigError::new(
                "queue.visibility_timeout_s",
                "must be at least 1",
            ));
        }
        if self.queue.group.is_empty() {
            return Err(ConfigError::new("queue.group", "must not be empty"));
        }
        if self.queue.max_retry_backoff_ms < self.queue.retry_backoff_ms {
            return Err(ConfigError::new(
                "queue.max_retry_backoff_ms",
                "must not be less than queue.retry_backoff_ms",
            ));
        }
        let api = &self.github.api_url;
        if !(api.starts_with("https://") || api.starts_with("http://")) {
            return Err(ConfigError::new(
                "github.api_url",
                format!("`{api}` must be an http:// or https:// URL"),
            ));
        }
        let web = &self.github.web_url;
        if !["https://", "http://", "file://"]
            .iter()
            .any(|p| web.starts_with(p))
        {
            return Err(ConfigError::new(
                "github.web_url",
                format!("`{web}` must be an http://, https:// or file:// (a local mirror) URL"),
            ));
        }
        if self.github.budget_per_hour == 0 {
            return Err(ConfigError::new(
                "github.budget_per_hour",
                "must be at least 1",
            ));
        }
        if !matches!(
            self.telemetry.log_format.as_str(),
            "json" | "human" | "auto"
        ) {
            return Err(ConfigError::new(
                "telemetry.log_format",
                format!(
                    "`{}` is not one of json, human, auto",
                    self.telemetry.log_format
                ),
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.telemetry.log_level)
            .map_err(|e| ConfigError::new("telemetry.log_level", e.to_string()))?;
        Ok(())
    }

    /// The bearer token servers require, from `DAVINCI_AUTH_TOKEN` or `server.auth_token_file`.
    pub fn auth_token(&self) -> Result<Option<String>, ConfigError> {
        if let Ok(t) = std::env::var("DAVINCI_AUTH_TOKEN")
            && !t.trim().is_empty()
        {
            return Ok(Some(t.trim().to_string()));
        }
        match &self.server.auth_token_file {
            None => Ok(None),
            Some(f) => {
                let t = std::fs::read_to_string(f)
                    .map_err(|e| ConfigError::new("server.auth_token_file", format!("{f}: {e}")))?;
                let t = t.trim().to_string();
                if t.is_empty() {
                    return Err(ConfigError::new(
                        "server.auth_token_file",
                        format!("{f} is empty"),
                    ));
                }
                Ok(Some(t))
            }
        }
    }
}

/// Lays the JSON object `overlay` over `base` as serialized (objects merge key by key, except
/// the fields named in `whole`, which are replaced: a sandbox whose `kind` changes must not keep
/// the old backend's options) and reads the result back; a bad field is named by its path.
pub fn overlay<T: Serialize + serde::de::DeserializeOwned>(
    base: &T,
    overlay: &str,
    whole: &[&str],
) -> Result<T, String> {
    fn merge(base: &mut serde_json::Value, overlay: serde_json::Value, whole: &[&str]) {
        match (base, overlay) {
            (serde_json::Value::Object(b), serde_json::Value::Object(o)) => {
                for (k, v) in o {
                    match b.get_mut(&k) {
                        Some(slot)
                            if slot.is_object()
                                && v.is_object()
                                && !whole.contains(&k.as_str()) =>
                        {
                            merge(slot, v, whole)
                        }
                        _ => {
                            b.insert(k, v);
                        }
                    }
                }
            }
            (b, o) => *b = o,
        }
    }
    let mut v = serde_json::to_value(base).map_err(|e| e.to_string())?;
    let o: serde_json::Value = serde_json::from_str(overlay).map_err(|e| e.to_string())?;
    merge(&mut v, o, whole);
    serde_path_to_error::deserialize(v).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        let s = Settings::load_from(None, env(&[])).unwrap();
        assert_eq!(s.queue.url, "memory://");
        assert_eq!(s.server.listen, "0.0.0.0:50051");
        // The default storage is a usable local root, absolute so every process agrees on it.
        let dir = crate::blob::FileStore::dir_of_uri(&s.storage.uri).unwrap();
        assert_eq!(dir, std::env::current_dir().unwrap().join("davinci-data"));
        // Loaded or not, every default passes its own validation.
        s.validate().unwrap();
        Settings::default().validate().unwrap();
    }

    #[test]
    fn file_then_env_override() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.yaml");
        std::fs::write(&f, "queue:\n  url: redis://127.0.0.1:6379\n  max_attempts: 3\nserver:\n  listen: 127.0.0.1:7000\n").unwrap();
        let s =
            Settings::load_from(Some(&f), env(&[("DAVINCI__QUEUE__MAX_ATTEMPTS", "9")])).unwrap();
        assert_eq!(s.queue.url, "redis://127.0.0.1:6379");
        assert_eq!(s.queue.max_attempts, 9);
        assert_eq!(s.server.listen, "127.0.0.1:7000");
        let t = dir.path().join("c.toml");
        std::fs::write(&t, "[storage]\nuri = \"s3://bucket/prefix\"\n").unwrap();
        let s = Settings::load_from(Some(&t), env(&[])).unwrap();
        assert_eq!(s.storage.uri, "s3://bucket/prefix");
    }

    #[test]
    fn sandbox_backend_from_file_and_environment() {
        let s = Settings::load_from(None, env(&[])).unwrap();
        assert_eq!(s.sandbox.kind(), "local");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.yaml");
        std::fs::write(
            &f,
            "sandbox:\n  kind: kubernetes\n  namespace: sbx\n  runtime_class: gvisor\n  node_selector:\n    pool: sandbox\n",
        )
        .unwrap();
        let s = Settings::load_from(Some(&f), env(&[])).unwrap();
        let davinci_sandbox::Backend::Kubernetes(k) = &s.sandbox else {
            panic!("{:?}", s.sandbox)
        };
        assert_eq!(k.namespace, "sbx");
        assert_eq!(k.node_selector["pool"], "sandbox");
        let s = Settings::load_from(
            None,
            env(&[
                ("DAVINCI__SANDBOX__KIND", "docker"),
                ("DAVINCI__SANDBOX__PULL_POLICY", "never"),
                ("DAVINCI__SANDBOX__LEASE_S", "900"),
            ]),
        )
        .unwrap();
        let davinci_sandbox::Backend::Docker(d) = &s.sandbox else {
            panic!("{:?}", s.sandbox)
        };
        assert_eq!(
            (d.lease_s, d.pull_policy),
            (900, davinci_sandbox::PullPolicy::Never)
        );
        let e = Settings::load_from(
            None,
            env(&[
                ("DAVINCI__SANDBOX__KIND", "docker"),
                ("DAVINCI__SANDBOX__LEASE_S", "1"),
            ]),
        )
        .unwrap_err();
        assert_eq!(e.path, "sandbox.docker.lease_s", "{e}");
        std::fs::write(&f, "sandbox:\n  kind: docker\n  bwrap: /usr/bin/bwrap\n").unwrap();
        let e = Settings::load_from(Some(&f), env(&[])).unwrap_err();
        assert!(e.reason.contains("bwrap"), "{e}");
    }

    #[test]
    fn bad_values_name_their_field() {
        let e =
            Settings::load_from(None, env(&[("DAVINCI__QUEUE__MAX_ATTEMPTS", "0")])).unwrap_err();
        assert_eq!(e.path, "queue.max_attempts");
        let e =
            Settings::load_from(None, env(&[("DAVINCI__SERVER__LISTEN", "nowhere")])).unwrap_err();
        assert_eq!(e.path, "server.listen");
        let e = Settings::load_from(None, env(&[("DAVINCI__QUEUE__MAX_ATTEMPTS", "lots")]))
            .unwrap_err();
        assert_eq!(e.path, "queue.max_attempts", "{e}");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.yaml");
        std::fs::write(&f, "queue:\n  urll: redis://x\n").unwrap();
        let e = Settings::load_from(Some(&f), env(&[])).unwrap_err();
        assert!(e.path.starts_with("queue"), "{e}");
        assert!(e.reason.contains("urll"), "{e}");
        let e =
            Settings::load_from(None, env(&[("DAVINCI__STORAGE__URI", "ftp://x")])).unwrap_err();
        assert_eq!(e.path, "storage.uri");
        // Refused before anything starts, not when the storage is opened.
        let e = Settings::load_from(None, env(&[("DAVINCI__STORAGE__URI", "file://data")]))
            .unwrap_err();
        assert_eq!(e.path, "storage.uri");
        assert!(e.reason.contains("three slashes"), "{e}");
        let e = Settings::load_from(None, env(&[("DAVINCI__GITHUB__API_URL", "api.github.com")]))
            .unwrap_err();
        assert_eq!(e.path, "github.api_url");
        let e = Settings::load_from(None, env(&[("DAVINCI__GITHUB__BUDGET_PER_HOUR", "0")]))
            .unwrap_err();
        assert_eq!(e.path, "github.budget_per_hour");
        let s = Settings::load_from(None, env(&[("DAVINCI__GITHUB__WEB_URL", "file:///mirror")]))
            .unwrap();
        assert_eq!(s.github.web_url, "file:///mirror");
    }

    #[test]
    fn overlays_merge_objects_replace_whole_fields_and_name_bad_paths() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Inner {
            a: u32,
            b: u32,
        }
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Outer {
            inner: Inner,
            sandbox: serde_json::Value,
        }
        let base = Outer {
            inner: Inner { a: 1, b: 2 },
            sandbox: serde_json::json!({"kind": "local", "work_root": "/w"}),
        };
        let o: Outer = overlay(
            &base,
            r#"{"inner": {"b": 3}, "sandbox": {"kind": "docker"}}"#,
            &["sandbox"],
        )
        .unwrap();
        assert_eq!(o.inner, Inner { a: 1, b: 3 });
        assert_eq!(o.sandbox, serde_json::json!({"kind": "docker"}));
        let e = overlay(&base, r#"{"inner": {"c": 1}}"#, &[]).unwrap_err();
        assert!(e.starts_with("inner.c: unknown field `c`"), "{e}");
        assert!(overlay(&base, "{not json", &[]).is_err());
    }
}
