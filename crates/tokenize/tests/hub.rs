//! Hub model ids against local servers that speak the Hub's download protocol: the Hub answers
//! `/{repo}/resolve/{revision}/tokenizer.json` with a redirect to a CDN and the commit sha in
//! `x-repo-commit`; errors carry `x-error-code`. The file lands in huggingface_hub's cache
//! layout, and the next load needs no server.
use davinci_tokenize::Tokenizer;
use davinci_tokenize::hub::{Hub, HubError, HubRepo};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/tiny-qwen-shape.json"
);
const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
const GATED_SHA: &str = "fedcba9876543210fedcba9876543210fedcba98";

/// One request as the server saw it: path and Authorization header.
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn reply(status: u16, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    Reply {
        status,
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        body: body.to_vec(),
    }
}

/// A minimal HTTP/1.1 server on a thread; stops when dropped.
struct Server {
    addr: SocketAddr,
    seen: Seen,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

fn handle(mut s: TcpStream, seen: &Seen, route: &dyn Fn(&str, Option<&str>) -> Reply) {
    s.set_nonblocking(false).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut first = String::new();
    r.read_line(&mut first).unwrap();
    let path = first.split(' ').nth(1).unwrap_or("").to_string();
    let mut auth = None;
    loop {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        if l.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':')
            && k.eq_ignore_ascii_case("authorization")
        {
            auth = Some(v.trim().to_string());
        }
    }
    seen.lock().unwrap().push((path.clone(), auth.clone()));
    let rep = route(&path, auth.as_deref());
    let mut head = format!(
        "HTTP/1.1 {} X\r\nContent-Length: {}\r\nConnection: close\r\n",
        rep.status,
        rep.body.len()
    );
    for (k, v) in &rep.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&rep.body).unwrap();
}

fn serve(route: impl Fn(&str, Option<&str>) -> Reply + Send + 'static) -> Server {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap();
    let (seen, stop): (Seen, _) = (Default::default(), Arc::new(AtomicBool::new(false)));
    let (seen2, stop2) = (seen.clone(), stop.clone());
    let thread = std::thread::spawn(move || {
        while !stop2.load(Ordering::SeqCst) {
            match l.accept() {
                Ok((s, _)) => handle(s, &seen2, &route),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    Server {
        addr,
        seen,
        stop,
        thread: Some(thread),
    }
}

/// A CDN holding the file, and a Hub that redirects to it.
fn hub_and_cdn() -> (Server, Server) {
    let file = std::fs::read(FIXTURE).unwrap();
    let cdn_file = file.clone();
    let cdn = serve(move |path, _| {
        if path.starts_with("/repos/7a/tiny/") {
            reply(200, &[("Content-Type", "application/json")], &cdn_file)
        } else {
            reply(404, &[], b"no such blob")
        }
    });
    let to_cdn = format!(
        "http://{}/repos/7a/tiny/3f2a?X-Amz-Signature=abc&Expires=1",
        cdn.addr
    );
    let hub = serve(move |path, auth| {
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let [org, name, "resolve", rev, "tokenizer.json"] = parts[..] else {
            return reply(404, &[], b"not a resolve URL");
        };
        match (org, name, rev) {
            ("acme", "tiny", "main" | SHA) => reply(
                302,
                &[("X-Repo-Commit", SHA), ("Location", &to_cdn)],
                b"Found",
            ),
            ("acme", "tiny", _) => reply(404, &[("X-Error-Code", "RevisionNotFound")], b""),
            ("acme", "gated", "main") if auth == Some("Bearer hf_ok") => {
                reply(200, &[("X-Repo-Commit", GATED_SHA)], &file)
            }
            ("acme", "gated", _) => reply(
                401,
                &[("X-Error-Code", "GatedRepo")],
                b"Access to model acme/gated is restricted.",
            ),
            ("acme", "bare", _) => reply(404, &[("X-Error-Code", "EntryNotFound")], b""),
            ("acme", "plain", _) => reply(200, &[], b"{}"),
            _ => reply(
                404,
                &[("X-Error-Code", "RepoNotFound")],
                b"Repository not found",
            ),
        }
    });
    (hub, cdn)
}

fn hub(endpoint: &str, cache: &Path, token: Option<&str>, offline: bool) -> Hub {
    Hub {
        cache: cache.to_path_buf(),
        endpoint: endpoint.to_string(),
        token: token.map(str::to_string),
        offline,
    }
}

fn repo(s: &str) -> HubRepo {
    HubRepo::parse(s).unwrap()
}

#[test]
fn downloads_into_the_cache_then_loads_offline_with_the_server_gone() {
    let cache = tempfile::tempdir().unwrap();
    let (server, cdn) = hub_and_cdn();
    let endpoint = format!("http://{}", server.addr);
    let online = hub(&endpoint, cache.path(), Some("hf_ok"), false);

    let path = online.fetch(&repo("acme/tiny")).unwrap();
    let dir = cache.path().join("models--acme--tiny");
    assert_eq!(path, dir.join(format!("snapshots/{SHA}/tokenizer.json")));
    assert_eq!(
        std::fs::read(&path).unwrap(),
        std::fs::read(FIXTURE).unwrap()
    );
    assert_eq!(std::fs::read_to_string(dir.join("refs/main")).unwrap(), SHA);
    let text = "def f(x):\n    return x  # héllo\n";
    assert_eq!(
        Tokenizer::from_file(&path).unwrap().encode(text).unwrap(),
        Tokenizer::from_file(FIXTURE).unwrap().encode(text).unwrap()
    );
    // The token went to the Hub, not to the CDN the Hub redirected to.
    assert_eq!(
        server.seen.lock().unwrap()[0],
        (
            "/acme/tiny/resolve/main/tokenizer.json".to_string(),
            Some("Bearer hf_ok".to_string())
        )
    );
    let cdn_seen = cdn.seen.lock().unwrap().clone();
    assert_eq!(cdn_seen.len(), 1);
    assert!(cdn_seen[0].0.starts_with("/repos/7a/tiny/3f2a?"));
    assert_eq!(cdn_seen[0].1, None);

    // A second load is served by the cache: no request at all.
    assert_eq!(online.fetch(&repo("acme/tiny")).unwrap(), path);
    assert_eq!(server.seen.lock().unwrap().len(), 1);

    drop((server, cdn));
    let offline = hub(&endpoint, cache.path(), None, true);
    assert_eq!(offline.fetch(&repo("acme/tiny")).unwrap(), path);
    assert_eq!(
        offline.fetch(&repo(&format!("acme/tiny@{SHA}"))).unwrap(),
        path
    );
    let err = offline.fetch(&repo("acme/tiny@v2")).unwrap_err();
    assert!(matches!(err, HubError::Offline { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("HF_HUB_OFFLINE"), "{msg}");
    assert!(msg.contains(&dir.display().to_string()), "{msg}");
    // Online with the server gone, a cached revision still loads; another one cannot.
    assert_eq!(online.fetch(&repo("acme/tiny")).unwrap(), path);
    assert!(online.fetch(&repo("acme/other")).is_err());
}

#[test]
fn unknown_gated_and_odd_answers_are_named() {
    let cache = tempfile::tempdir().unwrap();
    let (server, _cdn) = hub_and_cdn();
    let endpoint = format!("http://{}", server.addr);
    let anon = hub(&endpoint, cache.path(), None, false);

    let err = anon.fetch(&repo("acme/missing")).unwrap_err();
    assert!(matches!(err, HubError::RepoNotFound { .. }), "{err}");
    assert!(err.to_string().contains("no model `acme/missing`"), "{err}");

    let err = anon.fetch(&repo("acme/gated")).unwrap_err();
    assert!(matches!(err, HubError::Gated { status: 401, .. }), "{err}");
    assert!(err.to_string().contains("set HF_TOKEN"), "{err}");
    let wrong = hub(&endpoint, cache.path(), Some("hf_bad"), false);
    let err = wrong.fetch(&repo("acme/gated")).unwrap_err();
    assert!(err.to_string().contains("has no access"), "{err}");
    let ok = hub(&endpoint, cache.path(), Some("hf_ok"), false);
    let path = ok.fetch(&repo("acme/gated")).unwrap();
    assert!(path.ends_with(format!("snapshots/{GATED_SHA}/tokenizer.json")));

    let err = anon.fetch(&repo("acme/tiny@v9")).unwrap_err();
    assert!(matches!(err, HubError::RevisionNotFound { .. }), "{err}");
    let err = anon.fetch(&repo("acme/bare")).unwrap_err();
    assert!(matches!(err, HubError::FileNotFound { .. }), "{err}");
    // A server that is no Hub (no commit in its answer) is refused, and nothing is cached.
    let err = anon.fetch(&repo("acme/plain")).unwrap_err();
    assert!(err.to_string().contains("x-repo-commit"), "{err}");
    assert!(!cache.path().join("models--acme--plain").exists());
}
