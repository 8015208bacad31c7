//! `davinci serve` as a separate process: health for every service, /metrics, job RPCs,
//! bearer auth, config validation and SIGTERM shutdown.
use davinci_proto::v1::rollout_client::RolloutClient;
use davinci_proto::v1::trainer_client::TrainerClient;
use davinci_proto::v1::{JobRef, RolloutSpec, StartRolloutRequest};
mod common;
use common::{free_listen_flags, http_get, listen_flags, try_serving};
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
        8
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
        // The default ports can be taken between the check and the bind (a parallel test's
        // ephemeral port): then the same start is tried once more on free ports.
        let mut defaults = true;
        let (mut child, out) = loop {
            let (flags, addr) = if defaults {
                listen_flags()
            } else {
                free_listen_flags()
            };
            let mut child = Command::new(env!("CARGO_BIN_EXE_davinci"))
                .args(["serve", "--target", target])
                .args(&flags)
                .env_clear()
                .current_dir(dir.path())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            match try_serving(&mut child, &log, &addr, &health) {
                Ok(out) => break (child, out),
                Err(e) if defaults && e.contains("Address already in use") => {
                    eprintln!("NOTE: {target}: a default port was taken before the bind: {e}");
                    defaults = false;
                }
                Err(e) => panic!("{target}: server exited before SERVING:\n{e}"),
            }
        };
        let text = String::from_utf8_lossy(&out.stdout);
        let want = if target == "all" { 8 } else { 1 };
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

/// A trainer started with `trainer.reattach_namespaces` follows again the cluster job a killed
/// predecessor left running (its plan ConfigMap and stage-1 JobSet, found by label on a fake
/// Kubernetes API); with no API to reach it refuses to start, naming the setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_trainer_serve_reattaches_to_its_cluster_jobs() {
    use davinci_proto::v1::JobState;
    use davinci_trainer::jobset::{self, render};
    use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
    const NS: &str = "davinci";
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let docker = bollard::Docker::connect_with_local_defaults().expect("docker client");
    let fake = davinci_kube_fake::FakeCluster::start(Default::default(), docker)
        .await
        .unwrap();
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../services/trainer/tests/fixtures");
    let spec = davinci_proto::v1::TrainSpec {
        data: fixtures.join("packed/manifest.json").display().to_string(),
        out: "s3://davinci/runs/r1".into(),
        model: fixtures.join("jobset/tiny-model").display().to_string(),
        engine: "jobset".into(),
        config_json: serde_json::json!({
            "global_batch": 2, "micro_batch": 1,
            "cluster": {
                "kind": "jobset", "namespace": NS,
                "image": "registry.local/megatron:core-0.15.3",
                "parallel": {"nodes": 2, "gpus_per_node": 1, "tp": 1, "pp": 1},
                "data_root": "s3://davinci/runs/r1/packed", "s3_secret": "davinci-s3",
            },
        })
        .to_string(),
        ..Default::default()
    };
    let job_id = "0123456789abcdef0123456789abcdef";
    let plan = jobset::plan_from_spec(&spec, "r1", job_id, &Default::default())
        .await
        .unwrap();
    let mut cfg = kube::Config::new(fake.url().parse().unwrap());
    cfg.default_namespace = NS.into();
    let client = kube::Client::try_from(cfg).unwrap();
    let api = |group: &str, version: &str, kind: &str, plural: &str| {
        kube::Api::<DynamicObject>::namespaced_with(
            client.clone(),
            NS,
            &ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk(group, version, kind),
                plural,
            ),
        )
    };
    let mut cm = render::config_map(&plan).unwrap();
    cm["metadata"]["annotations"][render::COMPLETED_ANNOTATION] = "1".into();
    api("", "v1", "ConfigMap", "configmaps")
        .create(&Default::default(), &serde_json::from_value(cm).unwrap())
        .await
        .unwrap();
    api("jobset.x-k8s.io", "v1alpha2", "JobSet", "jobsets")
        .create(
            &Default::default(),
            &serde_json::from_value(render::jobset(&plan, &plan.stages[1])).unwrap(),
        )
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: u\n    namespace: {NS}\n\
             current-context: fake\nusers:\n- name: u\n  user: {{}}\n",
            fake.url()
        ),
    )
    .unwrap();
    let settings = dir.path().join("davinci.yaml");
    std::fs::write(
        &settings,
        format!("trainer:\n  reattach_namespaces: [{NS}]\n"),
    )
    .unwrap();
    let serve = |kubeconfig: &std::path::Path| {
        let (flags, addr) = listen_flags();
        let child = Command::new(env!("CARGO_BIN_EXE_davinci"))
            .args(["serve", "--target", "trainer", "--config"])
            .arg(&settings)
            .args(&flags)
            .env_remove("DAVINCI_AUTH_TOKEN")
            .env("KUBECONFIG", kubeconfig)
            .env(
                "DAVINCI__STORAGE__URI",
                format!("file://{}", dir.path().display()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        (child, addr)
    };
    let (child, addr) = serve(&kubeconfig);
    let s = Server {
        child,
        addr: format!("http://{addr}"),
        metrics: String::new(),
        _dir: tempfile::tempdir().unwrap(),
    };
    let mut trainer = TrainerClient::new(channel(&s).await);
    let job = trainer
        .get_train(JobRef {
            job_id: job_id.into(),
        })
        .await
        .expect("the re-attached job is known to the new process")
        .into_inner();
    assert_eq!(job.run_id, "r1");
    assert_eq!(job.state, JobState::Running as i32, "{job:?}");
    drop(s);
    fake.shutdown().await;

    // The API is gone now: a trainer told to re-attach must not come up pretending it did.
    let (child, _) = serve(&kubeconfig);
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("trainer.reattach_namespaces"), "{err}");
}
