//! The image of `deploy/Dockerfile` builds with no image pulled (its base is assembled from
//! this host's Debian packages by `scripts/build_image.sh`, around this test's davinci binary)
//! and every target serves in it the way the chart runs it: non-root, read-only root
//! filesystem, no capabilities, only /tmp and the working directory writable.
//!
//! Needs a Docker Engine and a Debian host: skipped loudly without one, and under `CI=true` it
//! fails instead.
mod common;
use common::davinci;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn docker(args: &[&str]) -> std::process::Output {
    Command::new("docker").args(args).output().unwrap()
}

fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Removes the container (and its tmpfs volumes) when the test ends, however it ends.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.0]);
    }
}

struct Image(String);

impl Drop for Image {
    fn drop(&mut self) {
        let _ = docker(&["rmi", "-f", &self.0]);
    }
}

#[test]
fn image_builds_without_pulling_and_every_target_serves_in_it() {
    let engine = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !engine {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "a Docker Engine is required under CI=true (image test)"
        );
        eprintln!("SKIP image test: no Docker Engine reachable");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let tag = format!("davinci-image-test:{}", std::process::id());
    let build = Command::new(root.join("scripts/build_image.sh"))
        .args([env!("CARGO_BIN_EXE_davinci"), &tag])
        .output()
        .unwrap();
    assert!(
        build.status.success(),
        "scripts/build_image.sh: {}{}",
        String::from_utf8_lossy(&build.stdout),
        String::from_utf8_lossy(&build.stderr)
    );
    let _image = Image(tag.clone());
    assert_eq!(String::from_utf8_lossy(&build.stdout).trim(), tag);

    for (target, service) in davinci_proto::SERVICE_NAMES {
        let id = docker_ok(&[
            "run",
            "-d",
            "--read-only",
            "--tmpfs",
            "/tmp",
            "--tmpfs",
            "/var/lib/davinci:uid=10001,gid=10001",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "-p",
            "127.0.0.1::50051",
            &tag,
            "serve",
            "--target",
            target,
        ]);
        let c = Container(id);
        let port = docker_ok(&["port", &c.0, "50051/tcp"]);
        let addr = port.lines().next().unwrap().to_string();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = davinci()
                .args(["health", "--addr", &addr, "--service", service])
                .output()
                .unwrap();
            if out.status.success() {
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(text.contains("SERVING"), "{target}: {text}");
                break;
            }
            let running = docker_ok(&["inspect", "-f", "{{.State.Running}}", &c.0]);
            let logs = || {
                let l = docker(&["logs", &c.0]);
                String::from_utf8_lossy(&l.stderr).to_string()
            };
            assert!(
                running == "true",
                "{target} exited in the image:\n{}",
                logs()
            );
            assert!(
                Instant::now() < deadline,
                "{target} not SERVING in the image after 60 s:\n{}",
                logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let user = docker_ok(&["exec", &c.0, "id", "-u"]);
        assert_eq!(user, "10001", "{target} runs as the chart's non-root user");
    }
}
