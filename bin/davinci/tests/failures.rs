//! `davinci run` with a repository that cannot be read (a directory that is not a git
//! repository; a path that does not exist is refused before the run starts): the
//! repository is tried once (a permanent failure is not retried), the run fails naming it and
//! why, and the log, redirected as in `make run > log`, holds no escape codes.
use std::process::Command;

#[test]
fn a_missing_repository_is_tried_once_and_redirected_logs_have_no_colour() {
    let data = tempfile::tempdir().unwrap();
    let tok = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../crates/tokenize/tests/fixtures/tiny-qwen-shape.json"
    );
    let missing = data.path().join("not-a-repository");
    std::fs::create_dir(&missing).unwrap();
    let spec = data.path().join("run.yaml");
    std::fs::write(
        &spec,
        format!(
            "run_id: missing\nstorage: file://{}/store\nsources:\n  repos: [{}]\ntokenizer: {tok}\npacking:\n  seq_len: 2048\n",
            data.path().display(),
            missing.display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_davinci"))
        .arg("run")
        .arg(&spec)
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        !out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        !out.stderr.contains(&0x1b) && !out.stdout.contains(&0x1b),
        "escape codes in redirected output:\n{stderr:?}"
    );
    assert_eq!(
        stderr.matches("work item failed").count(),
        1,
        "tried once, warned once:\n{stderr}"
    );
    assert!(stderr.contains("WARN"), "{stderr}");
    assert!(stderr.contains("every repository failed"), "{stderr}");
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");
    assert!(
        stderr.contains("permanent failure, not retried"),
        "{stderr}"
    );
}
