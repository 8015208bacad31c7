//! `davinci serve` as a separate process: health for every service, /metrics, job RPCs,
//! bearer auth, config validation and SIGTERM shutdown.
use davinci_proto::v1::rollout_client::RolloutClient;
use davinci_proto::v1::trainer_client::TrainerClient;
use davinci_proto::v1::{JobRef, RolloutSpec, StartRolloutRequest};
mod common;
use common::{http_get, listen_flags, wait_serving};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

struct Server {
    child: Child,
    addr: String,
    metrics: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(extra_env: &[(&str, &str)]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let port = davinci_testkit::free_port().unwrap();
    let mport = davinci_testkit::free_port().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_davinci"));
    cmd.args(["serve", "--target", "all"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{mport}")])
        .env(
            "DAVINCI__STORAGE__URI",
            format!("file://{}", dir.path().display()),
        )
        .env_remove("DAVINCI_AUTH_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap();
    Server {
        child,
        addr: format!("http://127.0.0.1:{port}"),
        metrics: format!("127.0.0.1:{mport}"),
        _dir: dir,
    }
}

async fn channel(s: &Server) -> tonic::transport::Channel {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match tonic::transport::Endpoint::from_shared(s.addr.clone())
            .unwrap()
            .connect()
            .await
        {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("server did not come up: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test]
async fn serve_all_answers_health_metrics_and_job_rpcs() {
    let mut server = start(&[]);
    let ch = channel(&server).await;
    let mut health = HealthClient::new(ch.clone());
    for (_, name) in davinci_proto::SERVICE_NAMES {
        let r = health
            .check(HealthCheckRequest {
                service: name.to_string(),
            })
            .await
            .unwrap();
        assert_eq!(r.into_inner().status, 1, "{name} is not SERVING");
    }
    let overall = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(overall.into_inner().status, 1);

    // Job RPCs are backed by the registry: unknown jobs are NOT_FOUND, not a crash.
    let mut trainer = TrainerClient::new(ch.clone());
    let e = trainer
        .get_train(JobRef {
            job_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let mut rollout = RolloutClient::new(ch.clone());
    let e = rollout
        .start_rollout(StartRolloutRequest {
            run_id: String::new(),
            spec: Some(RolloutSpec::default()),
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        tonic::Code::InvalidArgument,
        "an empty spec is refused"
    );
    assert!(e.message().contains("spec.tasks"), "{}", e.message());

    let metrics = http_get(&server.metrics, "/metrics");
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(metrics.contains("davinci_grpc_requests_total"), "{metrics}");

    // The `davinci health` client agrees.
    let out = Command::new(env!("CARGO_BIN_EXE_davinci"))
        .args(["health", "--all", "--addr", &server.addr])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches("SERVING")
            .count(),
        7
    );

    // SIGTERM: the server drains and exits cleanly.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            assert!(status.success(), "exit after SIGTERM: {status}");
            break;
        }
        assert!(Instant::now() < deadline, "server ignored SIGTERM");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn bearer_token_guards_rpcs_but_not_health() {
    let server = start(&[("DAVINCI_AUTH_TOKEN", "s3cret")]);
    let ch = channel(&server).await;
    let mut health = HealthClient::new(ch.clone());
    let r = health
        .check(HealthCheckRequest {
            service: "davinci.v1.Trainer".into(),
        })
        .await
        .unwrap();
    assert_eq!(r.into_inner().status, 1);
    let mut anon = TrainerClient::new(ch.clone());
    let e = anon
        .get_train(JobRef { job_id: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let token: tonic::metadata::MetadataValue<_> = "Bearer s3cret".parse().unwrap();
    let mut authed = TrainerClient::with_interceptor(ch, move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", token.clone());
        Ok(req)
    });
    let e = authed
        .get_train(JobRef { job_id: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        tonic::Code::NotFound,
        "with the token the RPC runs"
    );
}

#[test]
fn invalid_config_is_refused_naming_the_field() {
    let out = Command::new(env!("CARGO_BIN_EXE_davinci"))
        .args(["serve", "--target", "all"])
        .env("DAVINCI__QUEUE__MAX_ATTEMPTS", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("queue.max_attempts"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("davinci.yaml");
    std::fs::write(
        &f,
        "server:\n  listen: 127.0.0.1:1\n  concurency_limit: 4\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_davinci"))
        .args(["serve", "--target", "crawler", "--config"])
        .arg(&f)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("server") && err.contains("concurency_limit"),
        "{err}"
    );
}

/// Every target starts on its built-in defaults alone: no config file, an empty environment,
/// run from an empty directory (the default storage, `./davinci-data`, lands there). Only the
/// listen addresses are given, and only when the default ports are taken on this machine.
#[test]
fn every_target_serves_with_no_settings_at_all() {
    let targets = davinci_proto::SERVICE_NAMES
        .iter()
        .map(|(t, name)| (*t, vec!["--service", *name]))
        .chain([("all", vec!["--all"])]);
    for (target, health) in targets {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serve.log");
        let (flags, addr) = listen_flags();
        let mut child = Command::new(env!("CARGO_BIN_EXE_davinci"))
            .args(["serve", "--target", target])
            .args(&flags)
            .env_clear()
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let out = wait_serving(&mut child, &log, &addr, &health);
        let text = String::from_utf8_lossy(&out.stdout);
        let want = if target == "all" { 7 } else { 1 };
        assert_eq!(text.matches("\tSERVING").count(), want, "{target}: {text}");
        let _ = child.kill();
        let _ = child.wait();
        if target == "conductor" || target == "all" {
            assert!(
                dir.path().join("davinci-data/jobs").is_dir(),
                "{target}: job records belong under the default storage ./davinci-data"
            );
        }
    }
}
