//! Helpers for tests that need a Docker Engine (this crate's, the evaluator's): connect or
//! skip loudly, and the base image built from host packages by
//! `scripts/build_sandbox_image.sh` (no image can be pulled on the build machines).
//!
//! Under `CI=true` nothing is skipped: a missing engine or image fails the test.

use std::sync::OnceLock;

use crate::{DockerConfig, DockerSandbox};

/// The image build script of this repository.
const BUILD_SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../scripts/build_sandbox_image.sh"
);

pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Reports a missing prerequisite: `SKIP …` on stderr, or a panic under `CI=true`.
pub fn skip(what: &str, why: &str) {
    if ci() {
        panic!("{what} cannot run under CI=true: {why}");
    }
    eprintln!("SKIP {what}: {why}");
}

/// Tag of the base image (bash, coreutils, python3, git, patch), built on first use and
/// cached by the engine under a tag that hashes the host's packages. `DAVINCI_SANDBOX_IMAGE`
/// names another image to use instead.
pub fn base_image() -> Result<String, String> {
    static TAG: OnceLock<Result<String, String>> = OnceLock::new();
    TAG.get_or_init(|| {
        let out = std::process::Command::new("bash")
            .arg(BUILD_SCRIPT)
            .output()
            .map_err(|e| format!("running {BUILD_SCRIPT}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{BUILD_SCRIPT} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    })
    .clone()
}

/// A Docker sandbox on the base image, or `None` after saying why not (see [`skip`]).
pub async fn docker_or_skip(what: &str, cfg: DockerConfig) -> Option<DockerSandbox> {
    let mut sb = match DockerSandbox::connect(cfg.clone()).await {
        Ok(sb) => sb,
        Err(e) => {
            skip(what, &format!("no Docker Engine reachable ({e})"));
            return None;
        }
    };
    match tokio::task::spawn_blocking(base_image)
        .await
        .expect("image task")
    {
        Ok(tag) => {
            sb.cfg.default_image.get_or_insert(tag);
            Some(sb)
        }
        Err(e) => {
            skip(what, &format!("no base image ({e})"));
            None
        }
    }
}
