//! The dashboards and alerts against a real Prometheus: it scrapes a distributed run (one
//! `davinci serve` process per target on a real Redis, crawling, rebuilding, packing and
//! training, then a HumanEval job and replay rollouts), then every PromQL expression of every
//! dashboard panel is evaluated through its HTTP API and must return data, and every metric an
//! alert reads must have series.
//! So no dashboard or alert can name a metric the code does not serve.
//!
//! Expressions on metrics this run cannot produce are listed in [`NOT_HERE`] with the reason;
//! they are still sent to Prometheus (which must accept them) but may come back empty.
//!
//! Needs Debian's `prometheus` (`make test-deps`); without it the test is skipped loudly, and
//! under `CI=true` it fails.
mod common;
use common::davinci;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Metrics no run on this machine can serve, and why.
const NOT_HERE: &[(&str, &str)] = &[
    (
        "DCGM_FI_DEV_",
        "NVIDIA's DCGM exporter, which needs a GPU and its driver",
    ),
    (
        "davinci_sandbox_reclaimed_total",
        "served by the Docker and Kubernetes backends' lease sweeps; this run's rollouts use the local backend",
    ),
    (
        "davinci_rollout_reused_total",
        "counted when a task redone after its worker died finds finished rollouts; this run kills no worker",
    ),
    (
        "davinci_rollout_infra_failures_total",
        "counted when a rollout fails for infrastructure reasons; this run has none",
    ),
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "Bob")
        .env("GIT_AUTHOR_EMAIL", "bob@example.com")
        .env("GIT_COMMITTER_NAME", "Bob")
        .env("GIT_COMMITTER_EMAIL", "bob@example.com")
        .env("GIT_AUTHOR_DATE", "2024-02-01T00:00:00Z")
        .env("GIT_COMMITTER_DATE", "2024-02-01T00:00:00Z")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two squash-merged Python PRs, which the run keeps, and one that only touches the README,
/// which the Python subset filter drops (so the drops-by-reason panels have a reason).
fn repo(dir: &Path) {
    git(dir, &["init", "-q", "-b", "main"]);
    git(
        dir,
        &[
            "remote",
            "add",
            "origin",
            "https://github.com/acme/gauges.git",
        ],
    );
    let commit = |file: &str, body: &str, msg: &str| {
        std::fs::write(dir.join(file), body).unwrap();
        git(dir, &["add", file]);
        git(dir, &["commit", "-qm", msg]);
    };
    commit("README.md", "# gauges\n", "Initial commit");
    commit(
        "gauges.py",
        "def clamp(x, lo, hi):\n    return max(lo, min(x, hi))\n",
        "Add clamp (#1)",
    );
    commit(
        "gauges.py",
        "def clamp(x, lo, hi):\n    \"\"\"x limited to [lo, hi].\"\"\"\n    if lo > hi:\n        raise ValueError('lo > hi')\n    return max(lo, min(x, hi))\n",
        "Refuse an empty range in clamp (#2)",
    );
    commit(
        "README.md",
        "# gauges\n\nSmall numeric helpers.\n",
        "Describe the project (#3)",
    );
}

struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn port() -> String {
    format!("127.0.0.1:{}", davinci_testkit::free_port().unwrap())
}

/// `davinci serve --target {target}` with its metrics on `metrics`, once it listens.
fn serve(target: &str, addr: &str, metrics: &str, env: &[(String, String)], log: &Path) -> Proc {
    let mut cmd = davinci();
    cmd.args(["serve", "--target", target, "--listen", addr])
        .args(["--metrics-listen", metrics])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    for (k, v) in env {
        cmd.env(format!("DAVINCI__{k}"), v);
    }
    let child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(metrics).is_err() {
        assert!(Instant::now() < deadline, "{target} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Proc(child)
}

/// Every `targets[].expr` of a Grafana dashboard, with its panel title.
fn panel_exprs(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            out.push((
                p["title"].as_str().unwrap().to_string(),
                t["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    out
}

/// The expression as Grafana sends it: its variables replaced by their current values (`All`:
/// `.*`), `$__range` and `$__rate_interval` by windows that cover this short run.
fn substitute(expr: &str, dashboard: &Value) -> String {
    let mut e = expr
        .replace("$__rate_interval", "5m")
        .replace("$__range", "1h")
        .replace("$__interval", "15s");
    for v in dashboard["templating"]["list"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        let current = v["current"]["value"].as_str().unwrap_or("");
        let value = if current == "$__all" { ".*" } else { current };
        e = e.replace(&format!("${name}"), value);
    }
    assert!(!e.contains('$'), "unreplaced variable in {e}");
    e
}

/// Metric selectors (name and matchers) of a PromQL expression.
fn selectors(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let rest = &expr[i..];
        let starts = (rest.starts_with("davinci_") || rest.starts_with("DCGM_"))
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'));
        if !starts {
            i += 1;
            continue;
        }
        let name_len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let mut sel = rest[..name_len].to_string();
        if rest[name_len..].starts_with('{') {
            let close = rest[name_len..].find('}').unwrap();
            sel.push_str(&rest[name_len..=name_len + close]);
        }
        i += sel.len();
        out.push(sel);
    }
    out
}

fn query(prom: &davinci_testkit::PrometheusServer, expr: &str) -> Vec<Value> {
    let body = prom
        .get("/api/v1/query", &[("query", expr)])
        .unwrap_or_else(|e| panic!("Prometheus refused `{expr}`: {e:#}"));
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "success", "`{expr}`: {body}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

fn not_here(expr: &str) -> Option<&'static str> {
    NOT_HERE
        .iter()
        .find(|(m, _)| expr.contains(m))
        .map(|(_, why)| *why)
}

/// Runs a HumanEval job (the committed fixture problems, each with its canonical solution) on
/// the evaluator at `addr` to the end.
async fn evaluate(addr: &str, dir: &Path) {
    use davinci_proto::v1::evaluator_client::EvaluatorClient;
    use davinci_proto::v1::{EvalSpec, JobRef, JobState, StartEvalRequest};
    let problems =
        repo_root().join("services/evaluator/tests/fixtures/humaneval/HumanEvalFixture.jsonl");
    let mut samples = String::new();
    for line in std::fs::read_to_string(&problems).unwrap().lines() {
        let p: Value = serde_json::from_str(line).unwrap();
        samples.push_str(
            &serde_json::json!({"task_id": p["task_id"], "completion": p["canonical_solution"]})
                .to_string(),
        );
        samples.push('\n');
    }
    let samples_file = dir.join("samples.jsonl");
    std::fs::write(&samples_file, samples).unwrap();
    let mut client = EvaluatorClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let job = client
        .start_eval(StartEvalRequest {
            run_id: "observed".into(),
            spec: Some(EvalSpec {
                benchmark: "humaneval".into(),
                problems: problems.display().to_string(),
                samples: samples_file.display().to_string(),
                out: dir.join("eval").display().to_string(),
                workers: 2,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let job_ref = JobRef {
        job_id: job.job_id.clone(),
    };
    let mut events = client
        .watch_eval(job_ref.clone())
        .await
        .unwrap()
        .into_inner();
    while events.message().await.unwrap().is_some() {}
    let done = client.get_eval(job_ref).await.unwrap().into_inner();
    assert_eq!(done.state, JobState::Succeeded as i32, "{done:?}");
}

/// Runs a rollout job (two fixture tasks, the replay policy, two rollouts each, in the local
/// sandbox) on the rollout target at `addr` to the end, for the rollout dashboard's series.
async fn roll_out(addr: &str, dir: &Path) {
    use davinci_proto::v1::rollout_client::RolloutClient;
    use davinci_proto::v1::{JobRef, JobState, RolloutSpec, StartRolloutRequest};
    let repos = dir.join("task-repos");
    let mut lines = String::new();
    for n in 1..=2 {
        let t = davinci_testkit::tasks::textkit_task(&repos, n).unwrap();
        lines.push_str(&serde_json::to_string(&t).unwrap());
        lines.push('\n');
    }
    let tasks = dir.join("tasks.jsonl");
    std::fs::write(&tasks, lines).unwrap();
    let mut client = RolloutClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let job = client
        .start_rollout(StartRolloutRequest {
            run_id: "observed".into(),
            spec: Some(RolloutSpec {
                tasks: vec![tasks.display().to_string()],
                out: dir.join("rollouts").display().to_string(),
                rollouts_per_task: 2,
                policy: "replay".into(),
                settings_json: serde_json::json!({"repos_dir": repos}).to_string(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let job_ref = JobRef {
        job_id: job.job_id.clone(),
    };
    let mut events = client
        .watch_rollout(job_ref.clone())
        .await
        .unwrap()
        .into_inner();
    while events.message().await.unwrap().is_some() {}
    let done = client.get_rollout(job_ref).await.unwrap().into_inner();
    assert_eq!(done.state, JobState::Succeeded as i32, "{done:?}");
    let stats: Value =
        serde_json::from_slice(&std::fs::read(dir.join("rollouts/stats/rollout.json")).unwrap())
            .unwrap();
    assert_eq!(
        (&stats["rollouts"], &stats["pass"]),
        (&4.into(), &4.into()),
        "every replay rollout passes: {stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_and_alerts_return_data_from_a_distributed_run() {
    if !davinci_testkit::PrometheusServer::available() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "prometheus is required under CI=true (Debian package prometheus, `make test-deps`)"
        );
        eprintln!("SKIP dashboards/alerts check: no `prometheus` on PATH (make test-deps)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("repo");
    std::fs::create_dir(&src).unwrap();
    repo(&src);
    let redis = davinci_testkit::RedisServer::start().unwrap();
    // Shared storage on this machine's disk: the in-process (candle) trainer reads and writes
    // local paths only (S3 storage is what the distributed tests in run.rs cover).
    let store = format!("file://{}", dir.path().join("store").display());
    let shared: Vec<(String, String)> = vec![
        ("QUEUE__URL".into(), redis.url()),
        ("STORAGE__URI".into(), store.clone()),
    ];

    // One process per target, as the chart deploys them.
    let targets = [
        "crawler",
        "reconstructor",
        "tokenizer-packer",
        "trainer",
        "evaluator",
        "rollout",
        "conductor",
    ];
    let addrs: std::collections::BTreeMap<&str, (String, String)> =
        targets.iter().map(|t| (*t, (port(), port()))).collect();
    let mut conductor_env = shared.clone();
    for (key, target) in [
        ("CRAWLER", "crawler"),
        ("RECONSTRUCTOR", "reconstructor"),
        ("TOKENIZER_PACKER", "tokenizer-packer"),
        ("TRAINER", "trainer"),
    ] {
        conductor_env.push((
            format!("SERVICES__{key}"),
            format!("http://{}", addrs[target].0),
        ));
    }
    let mut procs = Vec::new();
    let mut scrape = String::new();
    for (target, (addr, metrics)) in &addrs {
        let env = if *target == "conductor" {
            &conductor_env
        } else {
            &shared
        };
        let log = dir.path().join(format!("{target}.log"));
        procs.push(serve(target, addr, metrics, env, &log));
        scrape.push_str(&format!(
            "  - job_name: {target}\n    static_configs:\n      - targets: ['{metrics}']\n        labels: {{target: {target}, namespace: davinci}}\n"
        ));
    }
    let prom = davinci_testkit::PrometheusServer::start(&scrape).unwrap();

    // A run that crawls, rebuilds, packs and trains a tiny model for two steps.
    let model = dir.path().join("tiny.json");
    std::fs::write(
        &model,
        r#"{"vocab_size": 1536, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": true}"#,
    )
    .unwrap();
    let tok = repo_root().join("crates/tokenize/tests/fixtures/tiny-qwen-shape.json");
    let spec = dir.path().join("run.yaml");
    std::fs::write(
        &spec,
        format!(
            "run_id: observed\nstorage: {}\nsources:\n  repos: [{}]\nfilters:\n  subset: python\ntokenizer: {}\npacking:\n  seq_len: 2048\nmixture:\n  stages:\n    - name: stage1\n      datasets: [{{source: ctx-general}}]\ntraining:\n  model: {}\n  global_batch: 1\n  checkpoint_every: 1\n  stages:\n    - {{name: stage1, lr: 1.0e-3, epochs: 2}}\n",
            store,
            src.display(),
            tok.display(),
            model.display()
        ),
    )
    .unwrap();
    let sub = davinci()
        .args(["runs", "submit", "--watch", "--addr", &addrs["conductor"].0])
        .arg(&spec)
        .output()
        .unwrap();
    let logs = || {
        addrs
            .keys()
            .map(|t| {
                let l = std::fs::read_to_string(dir.path().join(format!("{t}.log")))
                    .unwrap_or_default();
                format!("--- {t}:\n{}", &l[l.len().saturating_sub(3000)..])
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        sub.status.success(),
        "run failed:\n{}\n{}\n{}",
        String::from_utf8_lossy(&sub.stdout),
        String::from_utf8_lossy(&sub.stderr),
        logs()
    );

    // A HumanEval job on the evaluator (the fixture's canonical solutions), for its scores.
    evaluate(&addrs["evaluator"].0, dir.path()).await;
    // Replay rollouts on the rollout target, for the rollout dashboard.
    roll_out(&addrs["rollout"].0, dir.path()).await;

    // KEDA's redis-streams scaler in lagCount mode reads XINFO GROUPS `lag`: after a run that
    // acked (and so XDELeted) every entry, Redis must still know it (an integer, not nil).
    let xinfo = Command::new("redis-cli")
        .args(["-p", &redis.port().to_string(), "XINFO", "GROUPS", "{prs}"])
        .output()
        .unwrap();
    let xinfo = String::from_utf8_lossy(&xinfo.stdout);
    let lag = xinfo
        .lines()
        .skip_while(|l| l.trim() != "lag")
        .nth(1)
        .map(str::trim);
    assert_eq!(
        lag,
        Some("0"),
        "XINFO GROUPS {{prs}} after the run:\n{xinfo}"
    );

    // Every target scraped since the run ended.
    let deadline = Instant::now() + Duration::from_secs(30);
    let n_targets = addrs.len();
    loop {
        let up = query(&prom, "sum(up)");
        let ups = up
            .first()
            .and_then(|r| r["value"][1].as_str())
            .and_then(|v| v.parse::<f64>().ok());
        if ups == Some(n_targets as f64) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every target is up in Prometheus: {up:?}\n{}",
            prom.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut empty = Vec::new();
    let mut checked = 0;
    let dashboards = repo_root().join("deploy/dashboards");
    let mut files: Vec<_> = std::fs::read_dir(&dashboards)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no dashboards in {}",
        dashboards.display()
    );
    for f in &files {
        let d: Value = serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
        for (title, expr) in panel_exprs(&d) {
            let e = substitute(&expr, &d);
            let rows = query(&prom, &e);
            checked += 1;
            if rows.is_empty() && not_here(&e).is_none() {
                empty.push(format!(
                    "{} / {title}: {e}",
                    f.file_name().unwrap().to_string_lossy()
                ));
            }
        }
    }
    // An alert's expression is empty unless it fires: each metric it reads must have series.
    let rules: serde_norway::Value = serde_norway::from_str(
        &std::fs::read_to_string(repo_root().join("deploy/alerts/davinci.rules.yaml")).unwrap(),
    )
    .unwrap();
    for g in rules["groups"].as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            let name = r["alert"].as_str().unwrap();
            let expr = r["expr"].as_str().unwrap();
            query(&prom, expr);
            let sels = selectors(expr);
            assert!(!sels.is_empty(), "{name} reads no davinci metric: {expr}");
            for s in sels {
                checked += 1;
                if query(&prom, &s).is_empty() && not_here(&s).is_none() {
                    empty.push(format!("alert {name}: {s}"));
                }
            }
        }
    }
    assert!(
        empty.is_empty(),
        "{} of {checked} expressions returned no data from the run:\n{}\n{}",
        empty.len(),
        empty.join("\n"),
        logs()
    );
    eprintln!(
        "{checked} dashboard and alert expressions returned data (excepted: {})",
        NOT_HERE
            .iter()
            .map(|(m, why)| format!("{m}: {why}"))
            .collect::<Vec<_>>()
            .join("; ")
    );
}
