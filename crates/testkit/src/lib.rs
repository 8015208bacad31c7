//! Starts real redis-server and an S3-compatible server (moto) on free loopback ports for tests;
//! [`vllm`] is a local server speaking vLLM's chat API, [`tasks`] builds executable task
//! fixtures.
//!
//! Every server runs as a child process in its own process group and is killed (the whole
//! group) when its handle is dropped, so a failing test does not leak servers. A missing server
//! binary is an error that tells the developer how to install it: tests never skip silently.
pub mod prs;
pub mod tasks;
pub mod vllm;

use anyhow::{Context, Result, anyhow, bail};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How many times a server start is retried when its port was taken between picking and binding.
const START_ATTEMPTS: usize = 5;
const INSTALL_HINT: &str = "run `make test-deps` to install the test servers";

/// A loopback TCP port that was free a moment ago.
///
/// The listener is dropped before returning, so another process may grab the port before the
/// caller binds it; server starts below retry on such a collision.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// A child process in its own process group; the group is killed on drop.
#[derive(Debug)]
struct GroupChild {
    child: Child,
    name: &'static str,
}

impl GroupChild {
    fn spawn(name: &'static str, mut cmd: Command, log: &Path) -> Result<Self> {
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Own group, so wrapper scripts (pyenv shims) and their children die together.
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({cmd:?}); {INSTALL_HINT}"))?;
        Ok(Self { child, name })
    }

    /// `Some(status)` once the process has exited.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn kill(&mut self) {
        if self.exited().is_some() {
            return;
        }
        let pgid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        if nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL).is_err() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for GroupChild {
    fn drop(&mut self) {
        self.kill();
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// A `redis-server` on a free loopback port, persistence off, data in a temp dir.
#[derive(Debug)]
pub struct RedisServer {
    process: GroupChild,
    port: u16,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts the server and waits until it answers PING.
    pub fn start() -> Result<Self> {
        let binary = which("redis-server")
            .ok_or_else(|| anyhow!("`redis-server` is not on PATH; {INSTALL_HINT}"))?;
        let mut last_err = None;
        for _ in 0..START_ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix("davinci-redis-")
                .tempdir()?;
            let port = free_port()?;
            let mut cmd = Command::new(&binary);
            cmd.current_dir(dir.path())
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--dir", &dir.path().to_string_lossy()]);
            let log = dir.path().join("redis.log");
            let mut process = GroupChild::spawn("redis-server", cmd, &log)?;
            match wait_ready(&mut process, Duration::from_secs(15), || redis_ping(port)) {
                Ok(()) => return Ok(Self { process, port, dir }),
                Err(e) => {
                    last_err = Some(e.context(format!(
                        "redis-server on port {port}; log tail:\n{}",
                        log_tail(&log)
                    )));
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow!("redis-server did not start")))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's working directory (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the server now (for tests of a Redis outage); dropping does the same.
    pub fn kill(&mut self) {
        self.process.kill();
    }
}

/// One PING over a raw socket: returns true on `+PONG`.
fn redis_ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

/// Polls `ready` until it is true, failing early when the process exits.
fn wait_ready(
    process: &mut GroupChild,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = process.exited() {
            bail!("{} exited with {status} before it was ready", process.name);
        }
        if ready() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            process.kill();
            bail!("{} not ready after {timeout:?}", process.name);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// [`wait_ready`] for async callers: sleeps on the runtime instead of blocking a worker.
/// The probe itself is a loopback connect with short timeouts.
async fn wait_ready_async(
    process: &mut GroupChild,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = process.exited() {
            bail!("{} exited with {status} before it was ready", process.name);
        }
        if ready() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            process.kill();
            bail!("{} not ready after {timeout:?}", process.name);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Oldest moto known to work: 5.2.1 answers CompleteMultipartUpload with a
/// `CompleteMultipartUploadResponse` root that the AWS SDK refuses; 5.2.5 is verified.
pub const MIN_MOTO_VERSION: (u32, u32, u32) = (5, 2, 5);

/// Leading `major.minor.patch` of a version string such as `5.2.6.dev3`.
fn parse_version(v: &str) -> Option<(u32, u32, u32)> {
    let mut nums = v.trim().split('.').map(|part| {
        let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u32>().ok()
    });
    Some((
        nums.next()??,
        nums.next()??,
        nums.next().flatten().unwrap_or(0),
    ))
}

/// `moto.__version__` as seen by `python`, or `None` when moto's server does not import.
fn moto_version(python: &Path) -> Option<String> {
    let out = Command::new(python)
        .args([
            "-c",
            "import moto, moto.server, flask; print(moto.__version__)",
        ])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn new_enough(version: &str) -> bool {
    parse_version(version).is_some_and(|v| v >= MIN_MOTO_VERSION)
}

fn too_old(found: &str) -> anyhow::Error {
    let (maj, min, patch) = MIN_MOTO_VERSION;
    anyhow!(
        "{found}, but moto >= {maj}.{min}.{patch} is needed (older servers send multipart \
         replies the AWS SDK rejects); {INSTALL_HINT} (it runs \
         `pip install 'moto[server]>={maj}.{min}.{patch}'`)"
    )
}

/// How to launch moto's server, in order: `DAVINCI_MOTO_SERVER` (e.g. the venv `make
/// test-deps` builds), `python3 -m moto.server`, a `moto_server` on PATH. A moto older than
/// [`MIN_MOTO_VERSION`] is refused with a message instead of failing later on a multipart reply.
fn moto_command() -> Result<Command> {
    if let Some(program) = std::env::var_os("DAVINCI_MOTO_SERVER") {
        let program = PathBuf::from(program);
        if !program.is_file() {
            bail!(
                "DAVINCI_MOTO_SERVER={} does not exist; {INSTALL_HINT}",
                program.display()
            );
        }
        // A venv's entry point sits next to the venv's python: check its moto version.
        let python = program.with_file_name("python");
        if python.is_file()
            && let Some(version) = moto_version(&python)
            && !new_enough(&version)
        {
            return Err(too_old(&format!(
                "{} has moto {version}",
                program.display()
            )));
        }
        return Ok(Command::new(program));
    }
    let mut old = None;
    for python in ["python3", "python"] {
        let Some(path) = which(python) else { continue };
        match moto_version(&path) {
            Some(version) if new_enough(&version) => {
                let mut cmd = Command::new(path);
                cmd.args(["-m", "moto.server"]);
                return Ok(cmd);
            }
            Some(version) => old = Some(format!("{python} has moto {version}")),
            None => {}
        }
    }
    if let Some(found) = old {
        return Err(too_old(&found));
    }
    if let Some(bin) = which("moto_server") {
        return Ok(Command::new(bin));
    }
    let (maj, min, patch) = MIN_MOTO_VERSION;
    bail!(
        "moto's S3 server is not installed (neither `python3 -m moto.server` nor `moto_server` \
         works); {INSTALL_HINT} (it runs `pip install 'moto[server]>={maj}.{min}.{patch}'`)"
    )
}

/// moto's S3 server on a free loopback port with one bucket created.
///
/// The fields are plain values (not a davinci-runtime type) so the runtime crate can
/// dev-depend on this crate without a cycle.
#[derive(Debug)]
pub struct S3Server {
    process: GroupChild,
    _dir: tempfile::TempDir,
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// moto needs path-style addressing on a bare IP endpoint.
    pub force_path_style: bool,
}

impl S3Server {
    /// Starts moto, waits until it answers HTTP and creates the bucket `davinci-test`.
    pub async fn start() -> Result<Self> {
        Self::start_with_bucket("davinci-test").await
    }

    pub async fn start_with_bucket(bucket: &str) -> Result<Self> {
        let mut last_err = None;
        for _ in 0..START_ATTEMPTS {
            let dir = tempfile::Builder::new().prefix("davinci-moto-").tempdir()?;
            let port = free_port()?;
            let mut cmd = moto_command()?;
            cmd.current_dir(dir.path())
                .args(["-H", "127.0.0.1", "-p", &port.to_string()]);
            let log = dir.path().join("moto.log");
            let mut process = GroupChild::spawn("moto server", cmd, &log)?;
            match wait_ready_async(&mut process, Duration::from_secs(30), || http_answers(port))
                .await
            {
                Ok(()) => {
                    let server = Self {
                        process,
                        _dir: dir,
                        endpoint: format!("http://127.0.0.1:{port}"),
                        bucket: bucket.to_string(),
                        region: "us-east-1".into(),
                        access_key_id: "testing".into(),
                        secret_access_key: "testing".into(),
                        force_path_style: true,
                    };
                    server.create_bucket(bucket).await?;
                    return Ok(server);
                }
                Err(e) => {
                    last_err = Some(e.context(format!(
                        "moto server on port {port}; log tail:\n{}",
                        log_tail(&log)
                    )));
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow!("moto server did not start")))
    }

    /// A client for this server with static test credentials.
    pub fn client(&self) -> aws_sdk_s3::Client {
        use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
        let conf = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(self.region.clone()))
            .endpoint_url(&self.endpoint)
            .credentials_provider(Credentials::new(
                &self.access_key_id,
                &self.secret_access_key,
                None,
                None,
                "davinci-testkit",
            ))
            .force_path_style(self.force_path_style)
            .build();
        aws_sdk_s3::Client::from_conf(conf)
    }

    /// Creates another bucket on this server.
    pub async fn create_bucket(&self, bucket: &str) -> Result<()> {
        self.client()
            .create_bucket()
            .bucket(bucket)
            .send()
            .await
            .map_err(|e| anyhow!("creating bucket `{bucket}` on {}: {e:?}", self.endpoint))?;
        Ok(())
    }

    /// `s3://BUCKET/PREFIX` for a store rooted under `prefix` in the test bucket.
    pub fn uri(&self, prefix: &str) -> String {
        let prefix = prefix.trim_matches('/');
        if prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{prefix}", self.bucket)
        }
    }

    /// Kills the server now; dropping does the same.
    pub fn kill(&mut self) {
        self.process.kill();
    }
}

/// True once something answers an HTTP request on the port with a status line.
fn http_answers(port: u16) -> bool {
    use std::io::{Read, Write};
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req = format!("GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut buf = [0u8; 12];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"HTTP/1."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(parse_version("5.2.5"), Some((5, 2, 5)));
        assert_eq!(parse_version("5.2.6.dev3\n"), Some((5, 2, 6)));
        assert_eq!(parse_version("6.0"), Some((6, 0, 0)));
        assert_eq!(parse_version("x"), None);
        assert!(parse_version("5.2.1").unwrap() < MIN_MOTO_VERSION);
    }

    #[test]
    fn free_port_is_bindable() {
        let port = free_port().unwrap();
        assert_ne!(port, 0);
        TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("port should be free");
    }

    #[test]
    fn redis_answers_and_dies_on_drop() {
        let redis = RedisServer::start().unwrap();
        let port = redis.port();
        assert!(redis.url().ends_with(&format!(":{port}")));
        assert!(redis_ping(port));
        let pid = redis.process.child.id();
        drop(redis);
        assert!(!redis_ping(port), "redis still answers after drop");
        // Drop reaps the child, so its /proc entry is gone.
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "redis pid {pid} still exists"
        );
    }

    #[test]
    fn two_redis_servers_get_distinct_ports() {
        let a = RedisServer::start().unwrap();
        let b = RedisServer::start().unwrap();
        assert_ne!(a.port(), b.port());
        assert!(redis_ping(a.port()) && redis_ping(b.port()));
    }

    #[tokio::test]
    async fn s3_server_has_bucket_and_round_trips() {
        let s3 = S3Server::start().await.unwrap();
        let client = s3.client();
        client
            .put_object()
            .bucket(&s3.bucket)
            .key("a/b.txt")
            .body(b"hello".to_vec().into())
            .send()
            .await
            .unwrap();
        let got = client
            .get_object()
            .bucket(&s3.bucket)
            .key("a/b.txt")
            .send()
            .await
            .unwrap();
        let body = got.body.collect().await.unwrap().into_bytes();
        assert_eq!(&body[..], b"hello");
        assert_eq!(s3.uri("/runs/"), format!("s3://{}/runs", s3.bucket));
        let port: u16 = s3.endpoint.rsplit(':').next().unwrap().parse().unwrap();
        drop(s3);
        assert!(!http_answers(port), "moto still answers after drop");
    }
}

/// A Prometheus server (Debian's `prometheus`) on a free loopback port scraping `scrape_configs`
/// (the YAML list of a prometheus.yml's `scrape_configs:`), its TSDB in a temp dir.
#[derive(Debug)]
pub struct PrometheusServer {
    process: GroupChild,
    port: u16,
    dir: tempfile::TempDir,
}

impl PrometheusServer {
    /// Whether a `prometheus` binary is on PATH.
    pub fn available() -> bool {
        which("prometheus").is_some()
    }

    /// Starts the server with a 1 s scrape interval and waits until `/-/ready` answers 200.
    pub fn start(scrape_configs: &str) -> Result<Self> {
        let binary = which("prometheus").ok_or_else(|| {
            anyhow!("`prometheus` is not on PATH; {INSTALL_HINT} (Debian package prometheus)")
        })?;
        let mut last_err = None;
        for _ in 0..START_ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix("davinci-prometheus-")
                .tempdir()?;
            let config = dir.path().join("prometheus.yml");
            std::fs::write(
                &config,
                format!(
                    "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n{scrape_configs}"
                ),
            )?;
            let port = free_port()?;
            let mut cmd = Command::new(&binary);
            cmd.current_dir(dir.path())
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("tsdb").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"));
            let log = dir.path().join("prometheus.log");
            let mut process = GroupChild::spawn("prometheus", cmd, &log)?;
            let ready = || http_status(port, "/-/ready") == Some(200);
            match wait_ready(&mut process, Duration::from_secs(30), ready) {
                Ok(()) => return Ok(Self { process, port, dir }),
                Err(e) => {
                    last_err = Some(e.context(format!(
                        "prometheus on port {port}; log tail:\n{}",
                        log_tail(&log)
                    )))
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow!("prometheus did not start")))
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The body of `GET {path}?{query}` on the HTTP API, the query's values percent-encoded.
    pub fn get(&self, path: &str, query: &[(&str, &str)]) -> Result<String> {
        let q: Vec<String> = query
            .iter()
            .map(|(k, v)| format!("{k}={}", percent_encode(v)))
            .collect();
        let (status, body) = http_get(self.port, &format!("{path}?{}", q.join("&")))?;
        if status != 200 {
            bail!("GET {path} {query:?}: HTTP {status}: {body}");
        }
        Ok(body)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        self.process.kill();
    }
}

/// Every byte but unreserved ASCII as `%XX` (RFC 3986).
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// (status, body) of a plain HTTP/1.1 GET on loopback.
fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(
        &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        Duration::from_secs(2),
    )?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP response from port {port}"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let body = &raw[split + 4..];
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("no status line from port {port}: {head}"))?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_vec()
    };
    Ok((status, String::from_utf8_lossy(&body).to_string()))
}

fn http_status(port: u16, path: &str) -> Option<u16> {
    http_get(port, path).ok().map(|(s, _)| s)
}

/// The body of a chunked HTTP response.
fn dechunk(mut s: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = s.windows(2).position(|w| w == b"\r\n") {
        let size = String::from_utf8_lossy(&s[..eol]);
        let Ok(n) = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16) else {
            break;
        };
        let rest = &s[eol + 2..];
        if n == 0 || rest.len() < n {
            break;
        }
        out.extend_from_slice(&rest[..n]);
        s = rest[n..].strip_prefix(b"\r\n").unwrap_or(&rest[n..]);
    }
    out
}
