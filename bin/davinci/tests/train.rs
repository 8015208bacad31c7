//! `davinci train` as a process: killed with SIGKILL mid-run and started again with the same
//! command, it ends with the uninterrupted run's losses and weights, bit for bit (CPU).
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

const TINY: &str = r#"{"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
  "vocab_size": 1536, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
  "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 1000000.0,
  "rms_norm_eps": 1e-6, "tie_word_embeddings": true}"#;

/// Both stages of the fixture (11 bins each) for 3 epochs at 4 bins per step: 9 + 9 steps.
const CONFIG: &str = "global_batch: 4\nmicro_batch: 2\nseed: 5\ncheckpoint_every: 2\nstages:\n  - {name: stage1, lr: 3.0e-3, epochs: 3}\n  - {name: stage2, lr: 1.0e-3, epochs: 3}\n";

fn train(model: &Path, out: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_davinci"));
    c.arg("train")
        .arg("--data")
        .arg(root().join("services/trainer/tests/fixtures/packed/manifest.json"))
        .arg("--model")
        .arg(model)
        .arg("--out")
        .arg(out)
        .arg("--config")
        .arg(model.with_file_name("train.yaml"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// (step, loss bits) of every line of the JSON log.
fn losses(out: &Path) -> Vec<(u64, u64)> {
    std::fs::read_to_string(out.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap().to_bits(),
            )
        })
        .collect()
}

#[test]
fn kill_9_then_resume_matches_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny.json");
    std::fs::write(&model, TINY).unwrap();
    std::fs::write(tmp.path().join("train.yaml"), CONFIG).unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));

    let out = train(&model, &a).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // 2 stages × 9 steps; the summary names the steps and the loss
    assert!(
        stderr.contains("for 18 steps") && stderr.contains("loss"),
        "{stderr}"
    );

    let mut child = train(&model, &b).stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !b.join("checkpoints/6/state.json").exists() {
        assert!(Instant::now() < deadline, "no checkpoint 6 in time");
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let done = losses(&b).len();
    assert!(done < 18, "the killed run finished ({done} steps)");

    let out = train(&model, &b).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("resumed from step"), "{stderr}");
    assert_eq!(losses(&a), losses(&b), "loss curves differ");
    for f in ["model.safetensors", "optimizer.safetensors"] {
        let x = std::fs::read(a.join("checkpoints/18").join(f)).unwrap();
        let y = std::fs::read(b.join("checkpoints/18").join(f)).unwrap();
        assert!(x == y, "{f} differs");
    }
}
