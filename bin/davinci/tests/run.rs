//! `davinci run` end to end on a fixture repository built here, and the same spec through a
//! separate `davinci serve --target all` process driven by `davinci runs submit`: both write
//! the same samples and shards.
mod common;
use common::{davinci, http_get, listen_flags, succeeded, wait_serving};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "Alice")
        .env("GIT_AUTHOR_EMAIL", "alice@example.com")
        .env("GIT_COMMITTER_NAME", "Alice")
        .env("GIT_COMMITTER_EMAIL", "alice@example.com")
        .env("GIT_AUTHOR_DATE", "2024-01-01T00:00:00Z")
        .env("GIT_COMMITTER_DATE", "2024-01-01T00:00:00Z")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A repository with a GitHub merge-commit PR and a squash-merged PR.
fn fixture_repo(dir: &Path) {
    git(dir, &["init", "-q", "-b", "main"]);
    git(
        dir,
        &[
            "remote",
            "add",
            "origin",
            "https://github.com/acme/widgets.git",
        ],
    );
    std::fs::write(
        dir.join("widgets.py"),
        "def area(w, h):\n    return w * h\n\n\ndef name():\n    return 'widget'\n",
    )
    .unwrap();
    git(dir, &["add", "."]);
    git(dir, &["commit", "-qm", "Initial commit"]);
    git(dir, &["checkout", "-qb", "feature"]);
    std::fs::write(dir.join("widgets.py"), "def area(w, h):\n    \"\"\"Area of a w x h widget.\"\"\"\n    if w < 0 or h < 0:\n        raise ValueError('negative size')\n    return w * h\n\n\ndef name():\n    return 'widget'\n").unwrap();
    git(dir, &["commit", "-qam", "Reject negative sizes in area()"]);
    git(dir, &["checkout", "-q", "main"]);
    git(
        dir,
        &[
            "merge",
            "-q",
            "--no-ff",
            "feature",
            "-m",
            "Merge pull request #1 from alice/feature\n\nValidate widget sizes",
        ],
    );
    std::fs::write(
        dir.join("shapes.py"),
        "import widgets\n\n\ndef square(n):\n    return widgets.area(n, n)\n",
    )
    .unwrap();
    git(dir, &["add", "shapes.py"]);
    git(dir, &["commit", "-qm", "Add square helper (#2)"]);
}

fn spec(repo: &Path, storage: &str) -> String {
    let tok = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../crates/tokenize/tests/fixtures/tiny-qwen-shape.json"
    );
    format!(
        "run_id: fixture\nstorage: {storage}\nsources:\n  repos: [{}]\ntokenizer: {tok}\npacking:\n  seq_len: 2048\nmixture:\n  stages:\n    - name: stage1\n      datasets: [{{source: ctx-general}}]\n    - name: stage2\n      datasets: [{{source: ctx-python}}]\n",
        repo.display()
    )
}

/// Every object of the run except stats, keyed by path, as bytes.
fn outputs(root: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let base = root.join("runs/fixture");
    let mut stack = vec![base.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(&base).unwrap().display().to_string();
                if rel.starts_with("samples/")
                    || (rel.starts_with("packed/") && !rel.ends_with(".json"))
                {
                    out.insert(rel, std::fs::read(&p).unwrap());
                }
            }
        }
    }
    out
}

/// `davinci run` of the fixture spec into `dir`; its samples and packed shards.
fn embedded_outputs(repo: &Path, dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let spec_file = dir.with_extension("yaml");
    std::fs::write(&spec_file, spec(repo, &format!("file://{}", dir.display()))).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_davinci"))
        .arg("run")
        .arg(&spec_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    outputs(dir)
}

#[test]
fn embedded_run_writes_samples_shards_and_summary() {
    let repo = tempfile::tempdir().unwrap();
    fixture_repo(repo.path());
    let data = tempfile::tempdir().unwrap();
    let spec_file = data.path().join("run.yaml");
    std::fs::write(
        &spec_file,
        spec(
            repo.path(),
            &format!("file://{}/store", data.path().display()),
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_davinci"))
        .arg("run")
        .arg(&spec_file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("PRs: 2 found, 2 kept"), "{stdout}");
    assert!(stdout.contains("samples ctx-python: 2"), "{stdout}");
    assert!(stdout.contains("wall time per stage: crawl"), "{stdout}");
    let store = data.path().join("store/runs/fixture");
    assert!(store.join("packed/manifest.json").is_file());
    assert!(store.join("stats/crawl.json").is_file());
    let files = outputs(&data.path().join("store"));
    assert!(
        files.keys().any(|k| k.starts_with("samples/ctx-python/")),
        "{:?}",
        files.keys()
    );
    assert!(
        files.keys().any(|k| k.ends_with(".idx")),
        "{:?}",
        files.keys()
    );

    // Running again rewrites the same objects.
    let again = Command::new(env!("CARGO_BIN_EXE_davinci"))
        .arg("run")
        .arg(&spec_file)
        .output()
        .unwrap();
    assert!(again.status.success());
    assert_eq!(files, outputs(&data.path().join("store")));

    // A bad spec is refused before any work, naming the field.
    std::fs::write(
        &spec_file,
        spec(repo.path(), "file:///x").replace("seq_len: 2048", "seq_len: many"),
    )
    .unwrap();
    let bad = Command::new(env!("CARGO_BIN_EXE_davinci"))
        .arg("run")
        .arg(&spec_file)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("packing.seq_len"));
}

/// With a `training:` section the run goes on to train on its packed shards and records the
/// checkpoints under `runs/{run}/checkpoints/`.
#[test]
fn embedded_run_trains_after_packing() {
    let repo = tempfile::tempdir().unwrap();
    fixture_repo(repo.path());
    let data = tempfile::tempdir().unwrap();
    let model = data.path().join("tiny.json");
    std::fs::write(
        &model,
        r#"{"vocab_size": 1536, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": true}"#,
    )
    .unwrap();
    let spec_file = data.path().join("run.yaml");
    let training = format!(
        "training:\n  model: {}\n  global_batch: 1\n  checkpoint_every: 1\n  stages:\n    - {{name: stage1, lr: 1.0e-3, epochs: 2}}\n",
        model.display()
    );
    let store = format!("file://{}/store", data.path().display());
    std::fs::write(&spec_file, spec(repo.path(), &store) + &training).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_davinci"))
        .arg("run")
        .arg(&spec_file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("trained: 2 steps"), "{stdout}");
    let run = data.path().join("store/runs/fixture");
    for step in ["1", "2"] {
        assert!(
            run.join("checkpoints")
                .join(step)
                .join("model.safetensors")
                .is_file()
        );
    }
    assert_eq!(
        std::fs::read_to_string(run.join("train_log.jsonl"))
            .unwrap()
            .lines()
            .count(),
        2
    );
}

/// The GPQA loglikelihoods of a run's `eval/gpqa/results.jsonl`, row by row.
fn gpqa_loglikelihoods(run: &Path) -> Vec<Vec<f64>> {
    std::fs::read_to_string(run.join("eval/gpqa/results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["loglikelihoods"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect()
}

fn report(run: &Path, bench: &str) -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(run.join(format!("eval/{bench}/report.json"))).unwrap(),
    )
    .unwrap()
}

/// The loop: crawl → reconstruct → pack → train → evaluate, the final checkpoint served in the
/// process for the stage, HumanEval graded in the sandbox and GPQA scored by loglikelihood.
/// Then the same checkpoint behind `davinci serve --target inference`, named by
/// `evaluation.model_url` in a spec without training, gives the same loglikelihoods.
#[test]
fn embedded_run_trains_then_evaluates_the_checkpoint() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let fixtures = root.join("services/evaluator/tests/fixtures");
    let repo = tempfile::tempdir().unwrap();
    fixture_repo(repo.path());
    let data = tempfile::tempdir().unwrap();
    let model = data.path().join("tiny.json");
    std::fs::write(
        &model,
        r#"{"vocab_size": 1536, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": true, "max_position_embeddings": 4096}"#,
    )
    .unwrap();
    let evaluation = |head: &str| {
        format!(
            "evaluation:\n{head}  benchmarks:\n    - {{name: humaneval, data: {}}}\n    - {{name: gpqa, data: {}}}\n  sampling: {{max_tokens: 16}}\n  concurrency: 1\n",
            fixtures.join("humaneval/HumanEvalFixture.jsonl").display(),
            fixtures.join("gpqa/gpqa_format.csv").display()
        )
    };
    let training = format!(
        "training:\n  model: {}\n  global_batch: 1\n  checkpoint_every: 1\n  stages:\n    - {{name: stage1, lr: 1.0e-3, epochs: 2}}\n",
        model.display()
    );
    let store = data.path().join("store");
    let spec_file = data.path().join("run.yaml");
    let base = spec(repo.path(), &format!("file://{}", store.display()));
    std::fs::write(&spec_file, format!("{base}{training}{}", evaluation(""))).unwrap();
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_davinci"))
        .arg("run")
        .arg(&spec_file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("loop run: {:.1}s\n{stdout}", t.elapsed().as_secs_f64());
    assert!(stdout.contains("trained: 2 steps"), "{stdout}");
    assert!(
        stdout.contains("evaluated humaneval: humaneval pass@1 "),
        "{stdout}"
    );
    assert!(stdout.contains("evaluated gpqa: accuracy "), "{stdout}");
    let run = store.join("runs/fixture");
    // HumanEval: the checkpoint wrote one sample per problem; each was graded.
    let he = report(&run, "humaneval");
    assert_eq!(he["scores"]["problems"], 3);
    assert_eq!(he["scores"]["samples"], 3);
    let pass1 = he["scores"]["base"]["pass@1"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&pass1));
    let prov = &he["provenance"];
    assert_eq!(
        prov["model"], "checkpoint-2",
        "the final checkpoint is evaluated"
    );
    assert!(
        prov["endpoint"]
            .as_str()
            .unwrap()
            .starts_with("http://127.0.0.1:"),
        "{prov}"
    );
    assert_eq!(prov["sampling"]["max_tokens"], 16);
    assert_eq!(prov["seed"], 1234);
    let samples = std::fs::read_to_string(run.join("eval/humaneval/samples.jsonl")).unwrap();
    assert_eq!(samples.lines().count(), 3);
    let results = std::fs::read_to_string(run.join("eval/humaneval/results.jsonl")).unwrap();
    assert_eq!(results.lines().count(), 3);
    // GPQA: four finite loglikelihoods per question, one letter chosen for each.
    let g = report(&run, "gpqa");
    assert_eq!(g["scores"]["mode"], "loglikelihood");
    assert_eq!(g["scores"]["unparsed"], 0);
    let lls = gpqa_loglikelihoods(&run);
    assert_eq!(lls.len() as u64, g["scores"]["questions"].as_u64().unwrap());
    assert!(
        lls.iter()
            .all(|q| q.len() == 4 && q.iter().all(|x| x.is_finite() && *x < 0.0)),
        "{lls:?}"
    );

    // The same checkpoint behind the inference target, named by model_url. A port taken
    // between choosing and binding it (tests run in parallel) is chosen again.
    let log = data.path().join("inference.log");
    let tok = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../crates/tokenize/tests/fixtures/tiny-qwen-shape.json"
    );
    let mut port = 0;
    let mut server = None;
    for _ in 0..3 {
        port = davinci_testkit::free_port().unwrap();
        let mut p = Proc {
            child: Command::new(env!("CARGO_BIN_EXE_davinci"))
                .args(["serve", "--target", "inference", "--model"])
                .arg(run.join("checkpoints/2"))
                .args(["--tokenizer", tok, "--served-model-name", "tiny"])
                .args(["--http-listen", &format!("127.0.0.1:{port}")])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
            && p.child.try_wait().unwrap().is_none()
        {
            assert!(
                Instant::now() < deadline,
                "the inference server did not listen in 60 s: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        if p.child.try_wait().unwrap().is_none() {
            server = Some(p);
            break;
        }
    }
    let _server = server.unwrap_or_else(|| {
        panic!(
            "the inference server exited: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    let remote = evaluation(&format!(
        "  model_url: http://127.0.0.1:{port}/v1\n  model: tiny\n"
    ));
    let spec2 = data.path().join("remote.yaml");
    std::fs::write(
        &spec2,
        format!(
            "{}{remote}",
            base.replace("run_id: fixture", "run_id: remote")
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_davinci"))
        .arg("run")
        .arg(&spec2)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains("trained:"), "{stdout}");
    let remote_run = store.join("runs/remote");
    assert_eq!(report(&remote_run, "gpqa")["provenance"]["model"], "tiny");
    assert_eq!(
        gpqa_loglikelihoods(&remote_run),
        lls,
        "the same checkpoint, the same scores"
    );
    assert_eq!(
        std::fs::read_to_string(remote_run.join("eval/humaneval/samples.jsonl")).unwrap(),
        samples,
        "greedy samples of the same checkpoint"
    );
}

/// crawl → reconstruct → rollout → pack: replay rollouts on validated fixture tasks in the
/// local sandbox, their pass trajectories packed as `env-pass` beside the samples. Needs bwrap.
#[test]
fn embedded_run_rolls_out_tasks_and_packs_their_trajectories() {
    let repo = tempfile::tempdir().unwrap();
    fixture_repo(repo.path());
    let data = tempfile::tempdir().unwrap();
    let repos = data.path().join("repos");
    let mut lines = String::new();
    for n in 1..=2 {
        let t = davinci_testkit::tasks::textkit_task(&repos, n).unwrap();
        lines.push_str(&serde_json::to_string(&t).unwrap());
        lines.push('\n');
    }
    let tasks = data.path().join("tasks.jsonl");
    std::fs::write(&tasks, lines).unwrap();
    let store = data.path().join("store");
    let base = spec(repo.path(), &format!("file://{}", store.display()))
        .replace("seq_len: 2048", "seq_len: 16384")
        .replace(
            "      datasets: [{source: ctx-python}]\n",
            "      datasets: [{source: ctx-python}]\n    - name: sft\n      mask: assistant-only\n      datasets: [{source: env-pass, upsample: 3}]\n",
        );
    let rollout = format!(
        "rollout:\n  tasks: [{}]\n  policy: replay\n  repos_dir: {}\n  rollouts_per_task: 2\n",
        tasks.display(),
        repos.display()
    );
    let spec_file = data.path().join("run.yaml");
    std::fs::write(&spec_file, format!("{base}{rollout}")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_davinci"))
        .arg("run")
        .arg(&spec_file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("rollout "), "{stdout}");
    let run = store.join("runs/fixture");
    let stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("stats/rollout.json")).unwrap()).unwrap();
    assert_eq!(stats["exit_status"]["submitted"], 4, "{stats}");
    assert!(run.join("trajectories/pass/tasks.jsonl.zst").is_file());
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("packed/manifest.json")).unwrap()).unwrap();
    let sft = manifest["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "sft")
        .unwrap();
    let env = &sft["datasets"][0];
    assert_eq!(env["name"], "env-pass", "{manifest}");
    assert_eq!(env["documents"], 4, "four pass trajectories: {env}");
    assert!(
        stdout.contains("packed sft/env-pass: 4 documents"),
        "{stdout}"
    );

    // A rollout without tasks or a tasks stage, and a mixture that packs no trajectories, are
    // refused before anything runs.
    for (from, to, field) in [
        (
            format!("  tasks: [{}]\n", tasks.display()),
            String::new(),
            "rollout.tasks",
        ),
        (
            "{source: env-pass, upsample: 3}".to_string(),
            "{source: ctx-general}".to_string(),
            "`rollout`",
        ),
    ] {
        std::fs::write(&spec_file, format!("{base}{rollout}").replace(&from, &to)).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_davinci"))
            .arg("run")
            .arg(&spec_file)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(field),
            "{field}: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_run_on_redis_and_s3_matches_embedded_run() {
    let repo = tempfile::tempdir().unwrap();
    fixture_repo(repo.path());
    let data = tempfile::tempdir().unwrap();
    let want = embedded_outputs(repo.path(), &data.path().join("embedded"));
    let spec_file = data.path().join("run.yaml");

    // Distributed: one `serve --target all` process on real Redis, writing to a real S3 server.
    let redis = davinci_testkit::RedisServer::start().unwrap();
    let s3 = davinci_testkit::S3Server::start().await.unwrap();
    let addr = format!("127.0.0.1:{}", davinci_testkit::free_port().unwrap());
    let server = serve(
        "all",
        &addr,
        &[
            ("QUEUE__URL", redis.url()),
            ("STORAGE__URI", s3.uri("server")),
            ("STORAGE__S3__ENDPOINT", s3.endpoint.clone()),
            ("STORAGE__S3__REGION", s3.region.clone()),
            ("STORAGE__S3__FORCE_PATH_STYLE", "true".into()),
            ("STORAGE__S3__ACCESS_KEY_ID", s3.access_key_id.clone()),
            (
                "STORAGE__S3__SECRET_ACCESS_KEY",
                s3.secret_access_key.clone(),
            ),
        ],
    );
    std::fs::write(&spec_file, spec(repo.path(), &s3.uri("dist"))).unwrap();
    let sub = Command::new(env!("CARGO_BIN_EXE_davinci"))
        .args(["runs", "submit", "--watch", "--addr", &addr])
        .arg(&spec_file)
        .output()
        .unwrap();
    drop(server);
    assert!(
        sub.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&sub.stdout),
        String::from_utf8_lossy(&sub.stderr)
    );
    // The watch's summary: the conductor read the run's stats back from S3.
    let watched = String::from_utf8_lossy(&sub.stdout);
    assert!(watched.contains("PRs: 2 found, 2 kept"), "{watched}");
    assert!(watched.contains("packed stage2/ctx-python:"), "{watched}");
    assert!(!want.is_empty());
    // The same objects, read back from S3.
    let client = s3.client();
    let mut got = std::collections::BTreeMap::new();
    let list = client
        .list_objects_v2()
        .bucket(&s3.bucket)
        .prefix("dist/runs/fixture/")
        .send()
        .await
        .unwrap();
    for o in list.contents() {
        let key = o.key().unwrap();
        let rel = key.trim_start_matches("dist/runs/fixture/").to_string();
        if rel.starts_with("samples/") || (rel.starts_with("packed/") && !rel.ends_with(".json")) {
            let body = client
                .get_object()
                .bucket(&s3.bucket)
                .key(key)
                .send()
                .await
                .unwrap()
                .body
                .collect()
                .await
                .unwrap();
            got.insert(rel, body.into_bytes().to_vec());
        }
    }
    assert_eq!(
        want.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>()
    );
    assert_eq!(want, got, "embedded and distributed outputs differ");
}

/// A repository with `n` GitHub merge-commit PRs, written in one `git fast-import` stream so a
/// history big enough to keep each stage busy for a while is built in well under a second.
fn bigger_repo(dir: &Path, n: usize) {
    use std::fmt::Write as _;
    git(dir, &["init", "-q", "-b", "main"]);
    git(
        dir,
        &[
            "remote",
            "add",
            "origin",
            "https://github.com/acme/gadgets.git",
        ],
    );
    let mut files: Vec<Vec<String>> = (0..8)
        .map(|f| {
            (0..60)
                .map(|i| format!("def f{f}_{i}(x):\n    return x + {i}\n\n\n"))
                .collect()
        })
        .collect();
    let mut st = String::new();
    let mut mark = 0;
    let mut commit = |st: &mut String,
                      branch: &str,
                      from: Option<usize>,
                      merge: Option<usize>,
                      msg: &str,
                      file: Option<(usize, String)>| {
        mark += 1;
        let t = 1_700_000_000 + mark;
        write!(st, "commit refs/heads/{branch}\nmark :{mark}\nauthor Dev <dev@example.com> {t} +0000\ncommitter Dev <dev@example.com> {t} +0000\ndata {}\n{msg}\n", msg.len()).unwrap();
        if let Some(f) = from {
            writeln!(st, "from :{f}").unwrap();
        }
        if let Some(m) = merge {
            writeln!(st, "merge :{m}").unwrap();
        }
        if let Some((k, body)) = file {
            write!(
                st,
                "M 100644 inline mod{k}.py\ndata {}\n{body}\n",
                body.len()
            )
            .unwrap();
        }
        mark
    };
    let mut main = 0;
    for (k, lines) in files.iter().enumerate() {
        main = commit(
            &mut st,
            "main",
            (main > 0).then_some(main),
            None,
            &format!("Add mod{k}"),
            Some((k, lines.concat())),
        );
    }
    for pr in 1..=n {
        let (k, i) = (pr % 8, pr % 60);
        files[k][i] = format!("def f{k}_{i}(x):\n    return x + {i} + {pr}  # case {pr}\n\n\n");
        let feat = commit(
            &mut st,
            &format!("b{pr}"),
            Some(main),
            None,
            &format!("Tweak f{k}_{i} for case {pr}"),
            Some((k, files[k].concat())),
        );
        main = commit(
            &mut st,
            "main",
            Some(main),
            Some(feat),
            &format!("Merge pull request #{pr} from dev/b{pr}\n\nCase {pr}"),
            None,
        );
    }
    let mut child = Command::new("git")
        .current_dir(dir)
        .args(["fast-import", "--quiet"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), st.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success());
    git(dir, &["reset", "-q", "--hard", "main"]);
}

struct Proc {
    child: std::process::Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `davinci serve --target {target}` on `addr` with `DAVINCI__{key}` settings, once it listens.
fn serve(target: &str, addr: &str, settings: &[(&str, String)]) -> Proc {
    serve_with_metrics(target, addr, "", settings)
}

/// [`serve`] with Prometheus metrics on `metrics` ("" for none).
fn serve_with_metrics(
    target: &str,
    addr: &str,
    metrics: &str,
    settings: &[(&str, String)],
) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_davinci"));
    cmd.args([
        "serve",
        "--target",
        target,
        "--listen",
        addr,
        "--metrics-listen",
        metrics,
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    for (k, v) in settings {
        cmd.env(format!("DAVINCI__{k}"), v);
    }
    let child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{target} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Proc { child }
}

/// A pseudo-random delay in `0..max_ms` (the test's clock is the entropy).
fn random_ms(max_ms: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    nanos % max_ms
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_killed_reconstructor_and_packer_lose_and_duplicate_nothing() {
    use davinci_proto::v1::conductor_client::ConductorClient;
    use davinci_proto::v1::{JobState, RunRef, SubmitRunRequest};
    let repo = tempfile::tempdir().unwrap();
    bigger_repo(repo.path(), 600);
    let data = tempfile::tempdir().unwrap();
    let want = embedded_outputs(repo.path(), &data.path().join("undisturbed"));

    let redis = davinci_testkit::RedisServer::start().unwrap();
    let store = data.path().join("server");
    let port = || format!("127.0.0.1:{}", davinci_testkit::free_port().unwrap());
    let (c_addr, r_addr, p_addr, k_addr) = (port(), port(), port(), port());
    let shared = [
        ("QUEUE__URL", redis.url()),
        ("STORAGE__URI", format!("file://{}", store.display())),
        // A killed worker's items go to another worker after this long.
        ("QUEUE__VISIBILITY_TIMEOUT_S", "3".into()),
    ];
    let _crawler = serve("crawler", &c_addr, &shared);
    let mut recon = serve("reconstructor", &r_addr, &shared);
    let mut packer = serve("tokenizer-packer", &p_addr, &shared);
    // A second replica of each stage, which the conductor does not know: it takes a share of
    // the work from the queue.
    let metrics = port();
    let _replica = serve_with_metrics("reconstructor,tokenizer-packer", &port(), &metrics, &shared);
    let mut conductor_settings = shared.to_vec();
    conductor_settings.extend([
        ("SERVICES__CRAWLER", format!("http://{c_addr}")),
        ("SERVICES__RECONSTRUCTOR", format!("http://{r_addr}")),
        ("SERVICES__TOKENIZER_PACKER", format!("http://{p_addr}")),
    ]);
    let _conductor = serve("conductor", &k_addr, &conductor_settings);

    let disturbed = data.path().join("disturbed");
    let yaml = spec(repo.path(), &format!("file://{}", disturbed.display()));
    let mut client = ConductorClient::connect(format!("http://{k_addr}"))
        .await
        .unwrap();
    let run = client
        .submit_run(SubmitRunRequest {
            spec_yaml: yaml,
            run_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = client
        .watch_run(RunRef {
            run_id: run.run_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    // SIGKILL the reconstructor and then the packer a random moment after their stage starts
    // working, and start them again.
    let (mut recon_killed, mut pack_killed) = (false, false);
    let mut killed = Vec::new();
    let mut last = None;
    while let Some(ev) = events.message().await.unwrap() {
        let run = ev.run.unwrap();
        for st in &run.stages {
            if st.state != JobState::Running as i32 {
                continue;
            }
            let (proc_, flag, target, addr) = match st.stage.as_str() {
                "reconstruct" => (&mut recon, &mut recon_killed, "reconstructor", &r_addr),
                "pack" => (&mut packer, &mut pack_killed, "tokenizer-packer", &p_addr),
                _ => continue,
            };
            if *flag {
                continue;
            }
            *flag = true;
            tokio::time::sleep(Duration::from_millis(random_ms(60))).await;
            proc_.child.kill().unwrap();
            proc_.child.wait().unwrap();
            killed.push(st.stage.clone());
            *proc_ = serve(target, addr, &shared);
        }
        last = Some(run);
    }
    let last = last.unwrap();
    assert_eq!(last.state, JobState::Succeeded as i32, "{last:?}");
    assert_eq!(
        killed,
        ["reconstruct", "pack"],
        "both services were killed mid-stage"
    );
    let restarts: u64 = last
        .stages
        .iter()
        .filter_map(|s| s.counters.get("restarts"))
        .sum();
    eprintln!(
        "stages: {:?}",
        last.stages
            .iter()
            .map(|s| (&s.stage, s.counters.get("restarts")))
            .collect::<Vec<_>>()
    );
    assert!(
        restarts >= 1,
        "a kill mid-stage makes the conductor start the stage again: {:?}",
        last.stages
    );
    let got = outputs(&disturbed);
    assert_eq!(
        want.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>(),
        "the same objects, none lost, none extra"
    );
    assert_eq!(want, got, "the same bytes");
    // The replica the conductor never called did part of both stages.
    let scraped = http_get(&metrics, "/metrics");
    for topic in ["prs", "samples"] {
        let acked = metric(
            &scraped,
            &format!("davinci_queue_acked_total{{topic=\"{topic}\"}}"),
        );
        assert!(
            acked >= 1.0,
            "the second replica took no `{topic}` items:\n{scraped}"
        );
    }
}

/// The value of the Prometheus sample `name` (with its labels), 0 when absent.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .map(|v| v.trim().parse().unwrap_or(0.0))
        })
        .unwrap_or(0.0)
}

/// A minimal GitHub search API: answers `/search/repositories` with three repositories, of
/// which only one passes the filters (one is archived, one has too few stars).
fn fake_search_api() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(8) {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 8192];
            let n = std::io::Read::read(&mut s, &mut buf).unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]).to_string();
            let body = if req.starts_with("GET /search/repositories") {
                serde_json::json!({"total_count": 3, "incomplete_results": false, "items": [
                    {"full_name": "acme/old", "stargazers_count": 900, "archived": true, "language": "Python", "license": {"key": "mit", "spdx_id": "MIT"}},
                    {"full_name": "acme/widgets", "stargazers_count": 50, "archived": false, "language": "Python", "license": {"key": "mit", "spdx_id": "MIT"}},
                    {"full_name": "acme/tiny", "stargazers_count": 2, "archived": false, "language": "Python", "license": {"key": "mit", "spdx_id": "MIT"}}
                ]})
                .to_string()
            } else {
                "{\"message\":\"Not Found\"}".to_string()
            };
            let status = if body.contains("Not Found") {
                "404 Not Found"
            } else {
                "200 OK"
            };
            let _ = std::io::Write::write_all(
                &mut s,
                format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\nx-ratelimit-limit: 5000\r\nx-ratelimit-remaining: 4999\r\nx-ratelimit-reset: 4102444800\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
    });
    format!("http://{addr}")
}

/// A web root serving the fixture repository as `acme/widgets.git`, blobless clones allowed.
fn web_mirror() -> tempfile::TempDir {
    let src = tempfile::tempdir().unwrap();
    fixture_repo(src.path());
    let web = tempfile::tempdir().unwrap();
    let bare = web.path().join("acme/widgets.git");
    std::fs::create_dir_all(bare.parent().unwrap()).unwrap();
    git(
        web.path(),
        &[
            "clone",
            "-q",
            "--bare",
            &src.path().display().to_string(),
            &bare.display().to_string(),
        ],
    );
    git(&bare, &["config", "uploadpack.allowFilter", "true"]);
    web
}

#[test]
fn crawl_discovers_repositories_through_the_search_api() {
    let web = web_mirror();
    let out_dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_davinci"))
        .args([
            "crawl",
            "--discover",
            "--language",
            "Python",
            "--min-stars",
            "5",
        ])
        .args(["--github-api-url", &fake_search_api()])
        .arg("--github-web-url")
        .arg(format!("file://{}", web.path().display()))
        .arg("--out")
        .arg(format!("file://{}", out_dir.path().display()))
        .env("GITHUB_TOKEN", "test-token")
        .env("TMPDIR", out_dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("discovered 1 repositories"), "{stdout}");
    let stats: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out_dir.path().join("runs/crawl/stats/crawl.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(stats["repos"]["acme/widgets"]["out"], 2, "{stats}");
}

/// A crawler server takes its GitHub from the `github.*` settings: discovery through the
/// (fake) search API, clones from `github.web_url`, and the token budget kept in Redis, where
/// every replica draws on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crawler_server_discovers_with_the_settings_github_and_pools_its_budget_in_redis() {
    use davinci_proto::v1::crawler_client::CrawlerClient;
    use davinci_proto::v1::{CrawlSpec, JobRef, JobState, StartCrawlRequest};
    let web = web_mirror();
    let redis = davinci_testkit::RedisServer::start().unwrap();
    let data = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", davinci_testkit::free_port().unwrap());
    let _server = serve(
        "crawler",
        &addr,
        &[
            ("QUEUE__URL", redis.url()),
            ("STORAGE__URI", format!("file://{}", data.path().display())),
            ("GITHUB__API_URL", fake_search_api()),
            (
                "GITHUB__WEB_URL",
                format!("file://{}", web.path().display()),
            ),
        ],
    );
    let mut client = CrawlerClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let job = client
        .start_crawl(StartCrawlRequest {
            run_id: "disc".into(),
            spec: Some(CrawlSpec {
                out: format!("file://{}", data.path().display()),
                languages: vec!["Python".into()],
                min_stars: 5,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(60);
    let job = loop {
        let j = client
            .get_crawl(JobRef {
                job_id: job.job_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if j.state == JobState::Succeeded as i32 || j.state == JobState::Failed as i32 {
            break j;
        }
        assert!(Instant::now() < deadline, "crawl did not end: {j:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(job.state, JobState::Succeeded as i32, "{}", job.error);
    let stats: serde_json::Value = serde_json::from_slice(
        &std::fs::read(data.path().join("runs/disc/stats/crawl.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        stats["discovered"],
        serde_json::json!(["acme/widgets"]),
        "{stats}"
    );
    assert_eq!(stats["repos"]["acme/widgets"]["out"], 2, "{stats}");
    let port = redis
        .url()
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .to_string();
    let keys = Command::new("redis-cli")
        .args(["-p", &port, "--scan", "--pattern", "davinci:github:budget*"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&keys.stdout).trim().is_empty(),
        "no token budget in Redis"
    );
}

/// A directory shaped like a checkout for the README's and `make run`'s commands: the
/// Makefile, the quickstart spec and its tokenizer at their paths in the repository. Commands
/// run in it write their default `./davinci-data` there, not into the source tree.
fn checkout() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for f in [
        "Makefile",
        "deploy/examples/quickstart.yaml",
        "crates/tokenize/tests/fixtures/tiny-qwen-shape.json",
    ] {
        let to = d.path().join(f);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(ws.join(f), to).unwrap();
    }
    d
}

/// A bare mirror of the fixture repository under `dir`, with no remote at all.
fn bare_mirror(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    std::fs::create_dir(&src).unwrap();
    fixture_repo(&src);
    let mirror = dir.join("widgets.git");
    git(
        dir,
        &[
            "clone",
            "-q",
            "--bare",
            src.to_str().unwrap(),
            "widgets.git",
        ],
    );
    git(&mirror, &["remote", "remove", "origin"]);
    mirror
}

/// The davinci arguments `make run REPO={repo}` runs, read from the Makefile's recipe.
fn make_run_args(checkout: &Path, repo: &str) -> Vec<String> {
    let mk = std::fs::read_to_string(checkout.join("Makefile")).unwrap();
    let recipe = mk
        .lines()
        .find_map(|l| l.trim().strip_prefix("$(CARGO) run -p davinci-cli -- "))
        .expect("the Makefile's run recipe");
    let spec = mk
        .lines()
        .find_map(|l| l.strip_prefix("SPEC ?= "))
        .expect("the Makefile's default SPEC");
    recipe
        .replace("$(SPEC)", spec.trim())
        .replace("$(if $(REPO),--repo $(REPO))", &format!("--repo {repo}"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// The summary's figures: its lines after `run … finished`, less the timings and the output
/// location, which differ between two runs of the same input.
fn figures(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .skip_while(|l| !(l.starts_with("run ") && l.contains(" finished in ")))
        .skip(1)
        .filter(|l| !l.starts_with("wall time per stage:") && !l.starts_with("outputs: "))
        .map(str::to_string)
        .collect()
}

/// The `owner/name`s a run's crawl stats count PRs under.
fn crawled_names(storage: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for run in std::fs::read_dir(storage.join("runs")).unwrap() {
        let stats = run.unwrap().path().join("stats/crawl.json");
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(stats).unwrap()).unwrap();
        names.extend(v["repos"].as_object().unwrap().keys().cloned());
    }
    names.sort();
    names
}

/// #11: `make run REPO=<a bare mirror with no remote>` finishes and prints the summary,
/// warning that the repository was named after its directory; `,name=` names it.
#[test]
fn make_run_on_a_bare_mirror_without_remote() {
    let co = checkout();
    let repos = tempfile::tempdir().unwrap();
    let mirror = bare_mirror(repos.path());
    let m = mirror.to_str().unwrap();
    let stdout = succeeded(
        &davinci()
            .args(make_run_args(co.path(), m))
            .current_dir(co.path())
            .output()
            .unwrap(),
    );
    assert!(stdout.contains("PRs: 2 found, 2 kept"), "{stdout}");
    assert!(stdout.contains("samples ctx-python: 2"), "{stdout}");
    assert!(
        stdout.contains(&format!("warning: repository {m} has no `origin` remote"))
            && stdout.contains("named local/widgets"),
        "{stdout}"
    );
    let data = co.path().join("davinci-data");
    assert_eq!(crawled_names(&data), ["local/widgets"]);

    std::fs::remove_dir_all(&data).unwrap();
    let named = format!("{m},name=acme/widgets");
    let stdout = succeeded(
        &davinci()
            .args(make_run_args(co.path(), &named))
            .current_dir(co.path())
            .output()
            .unwrap(),
    );
    assert!(stdout.contains("PRs: 2 found, 2 kept"), "{stdout}");
    assert!(!stdout.contains("warning:"), "{stdout}");
    assert_eq!(crawled_names(&data), ["acme/widgets"]);
}

/// #19: the README's distributed commands as written, `davinci serve --target all` with no
/// configuration and `davinci runs submit SPEC --repo <local repository> --watch`, from one
/// directory: the run finishes and the watch prints the figures `davinci run` prints for the
/// same input; `runs watch --json` gives them to scripts.
#[test]
fn readme_distributed_commands_print_the_summary_of_davinci_run() {
    let co = checkout();
    let repos = tempfile::tempdir().unwrap();
    let mirror = bare_mirror(repos.path());
    let m = mirror.to_str().unwrap();
    let log = repos.path().join("serve.log");
    let (flags, addr) = listen_flags();
    let mut server = Proc {
        child: davinci()
            .args(["serve", "--target", "all"])
            .args(&flags)
            .current_dir(co.path())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    };
    wait_serving(&mut server.child, &log, &addr, &["--all"]);
    let mut submit = davinci();
    submit.args([
        "runs",
        "submit",
        "deploy/examples/quickstart.yaml",
        "--repo",
        m,
        "--watch",
    ]);
    if !flags.is_empty() {
        submit.args(["--addr", &addr]);
    }
    let sub = submit.current_dir(co.path()).output().unwrap();
    let watched = String::from_utf8_lossy(&sub.stdout).to_string();
    assert!(
        sub.status.success(),
        "stdout:\n{watched}\nstderr:\n{}\nserver:\n{}",
        String::from_utf8_lossy(&sub.stderr),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let run_id = watched.lines().next().unwrap().to_string();
    assert!(watched.contains("wall time per stage: crawl"), "{watched}");
    assert!(
        watched.contains(&format!(
            "outputs: file://{}/davinci-data/runs/{run_id}/",
            co.path().display()
        )),
        "{watched}"
    );

    let ran = succeeded(
        &davinci()
            .args(["run", "deploy/examples/quickstart.yaml", "--repo", m])
            .args(["--storage", "file://./embedded"])
            .current_dir(co.path())
            .output()
            .unwrap(),
    );
    let want = figures(&ran);
    assert!(
        want.iter().any(|l| l.starts_with("PRs: 2 found, 2 kept")),
        "{ran}"
    );
    assert!(
        want.iter()
            .any(|l| l.starts_with("packed stage2/ctx-python:")),
        "{ran}"
    );
    assert_eq!(figures(&watched), want, "watch:\n{watched}\nrun:\n{ran}");

    let mut json = davinci();
    json.args(["runs", "watch", &run_id, "--json"]);
    if !flags.is_empty() {
        json.args(["--addr", &addr]);
    }
    let text = succeeded(&json.output().unwrap());
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["state"], "succeeded", "{text}");
    assert_eq!(last["summary"]["crawl"]["out"], 2, "{text}");
    assert_eq!(last["stages"].as_array().unwrap().len(), 3, "{text}");
}
