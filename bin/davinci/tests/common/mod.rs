//! Helpers the CLI's integration tests share.
#![allow(dead_code)] // each test binary uses some of them
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// The raw response (headers and body) to `GET http://{addr}{path}`.
pub fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// A `davinci` command with no davinci settings in its environment (`DAVINCI_*`,
/// `DAVINCI__*`), as a new user's shell has.
pub fn davinci() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_davinci"));
    for (k, _) in std::env::vars() {
        if k.starts_with("DAVINCI") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Where a server started with no settings listens: `--listen` and `--metrics-listen` when
/// the defaults (0.0.0.0:50051, 0.0.0.0:9090) are taken on this machine, else nothing. The
/// second value is the address clients dial (`davinci health`'s and `runs`' default or not).
pub fn listen_flags() -> (Vec<String>, String) {
    let free = |p: u16| std::net::TcpListener::bind(("0.0.0.0", p)).is_ok();
    if free(50051) && free(9090) {
        return (Vec::new(), "127.0.0.1:50051".into());
    }
    eprintln!("NOTE: ports 50051/9090 are taken here; the server gets free ports");
    free_listen_flags()
}

/// `--listen` and `--metrics-listen` on free loopback ports, and the gRPC address.
pub fn free_listen_flags() -> (Vec<String>, String) {
    let port = davinci_testkit::free_port().unwrap();
    let metrics = davinci_testkit::free_port().unwrap();
    (
        vec![
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--metrics-listen".into(),
            format!("127.0.0.1:{metrics}"),
        ],
        format!("127.0.0.1:{port}"),
    )
}

/// Polls `davinci health --addr {addr} {args}` until it succeeds; panics with the server's
/// stderr (in `log`) when `server` exits or 30 s pass.
pub fn wait_serving(server: &mut Child, log: &Path, addr: &str, args: &[&str]) -> Output {
    try_serving(server, log, addr, args)
        .unwrap_or_else(|e| panic!("server exited before SERVING:\n{e}"))
}

/// As [`wait_serving`], but a server that exits gives `Err` with its exit status and log.
pub fn try_serving(
    server: &mut Child,
    log: &Path,
    addr: &str,
    args: &[&str],
) -> Result<Output, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = davinci()
            .args(["health", "--addr", addr])
            .args(args)
            .output()
            .unwrap();
        if out.status.success() {
            return Ok(out);
        }
        let log = || std::fs::read_to_string(log).unwrap_or_default();
        if let Some(st) = server.try_wait().unwrap() {
            return Err(format!("{st}\n{}", log()));
        }
        assert!(
            Instant::now() < deadline,
            "not SERVING after 30 s: {}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The stdout of a command that must have succeeded; else panics with both streams.
pub fn succeeded(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "exit {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
