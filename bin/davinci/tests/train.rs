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

/// `davinci train` with its data and output on a real S3 server (moto), found through the same
/// `DAVINCI__STORAGE__S3__…` settings the services read: the shards are fetched, every
/// checkpoint is uploaded as it is written, and the same command run again resumes from the
/// newest checkpoint in the bucket instead of starting over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_data_and_output_upload_checkpoints_and_resume_from_them() {
    let s3 = davinci_testkit::S3Server::start().await.unwrap();
    let client = s3.client();
    let fixture = root().join("services/trainer/tests/fixtures/packed");
    let mut stack = vec![fixture.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let key = format!(
                "data/{}",
                p.strip_prefix(&fixture).unwrap().to_string_lossy()
            );
            client
                .put_object()
                .bucket(&s3.bucket)
                .key(key)
                .body(std::fs::read(&p).unwrap().into())
                .send()
                .await
                .unwrap();
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny.json");
    std::fs::write(&model, TINY).unwrap();
    std::fs::write(tmp.path().join("train.yaml"), CONFIG).unwrap();
    let run = || {
        let out = Command::new(env!("CARGO_BIN_EXE_davinci"))
            .arg("train")
            .arg("--data")
            .arg(format!("{}/manifest.json", s3.uri("data")))
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(s3.uri("out"))
            .arg("--config")
            .arg(tmp.path().join("train.yaml"))
            .args(["--steps", "2"])
            .env("DAVINCI__STORAGE__S3__ENDPOINT", &s3.endpoint)
            .env("DAVINCI__STORAGE__S3__REGION", &s3.region)
            .env("DAVINCI__STORAGE__S3__FORCE_PATH_STYLE", "true")
            .env("DAVINCI__STORAGE__S3__ACCESS_KEY_ID", &s3.access_key_id)
            .env(
                "DAVINCI__STORAGE__S3__SECRET_ACCESS_KEY",
                &s3.secret_access_key,
            )
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        stderr
    };
    let first = run();
    // 2 stages capped at 2 steps each, a checkpoint every 2 steps: steps 2 and 4.
    assert!(first.contains("for 4 steps"), "{first}");
    let listed = client
        .list_objects_v2()
        .bucket(&s3.bucket)
        .prefix("out/checkpoints/")
        .send()
        .await
        .unwrap();
    let keys: Vec<String> = listed
        .contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_string))
        .collect();
    for want in [
        "out/checkpoints/2/model.safetensors",
        "out/checkpoints/4/model.safetensors",
        "out/checkpoints/4/state.json",
    ] {
        assert!(keys.iter().any(|k| k == want), "{want} not in {keys:?}");
    }
    assert!(
        first.contains(&format!("checkpoint {}/checkpoints/4", s3.uri("out"))),
        "{first}"
    );

    let again = run();
    assert!(
        again.contains("resuming from the checkpoint at step 4"),
        "{again}"
    );
}
