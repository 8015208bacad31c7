//! The Trainer gRPC methods, called in process: StartTrain with engine candle to completion on
//! the packed fixture, refusals before any job starts.
use davinci_proto::v1::trainer_server::Trainer;
use davinci_proto::v1::{JobRef, JobState, StartTrainRequest, TrainSpec};
use davinci_runtime::jobs::JobRegistry;
use davinci_trainer::serve::TrainerService;
use tonic::Request;

const DATA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/packed/manifest.json"
);

const TINY: &str = r#"{"vocab_size": 1536, "hidden_size": 32, "intermediate_size": 64,
  "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
  "rms_norm_eps": 1e-6, "tie_word_embeddings": true}"#;

fn spec(out: &str) -> TrainSpec {
    TrainSpec {
        data: format!("file://{DATA}"),
        out: out.into(),
        model_config_json: TINY.into(),
        steps: 2,
        global_batch: 2,
        learning_rate: 1e-3,
        engine: "candle".into(),
        config_json: r#"{"stages": [{"name": "stage2", "lr": 1e-4}], "micro_batch": 1}"#.into(),
        ..Default::default()
    }
}

async fn start(
    svc: &TrainerService,
    s: TrainSpec,
) -> Result<davinci_proto::v1::Job, tonic::Status> {
    svc.start_train(Request::new(StartTrainRequest {
        run_id: "r1".into(),
        spec: Some(s),
    }))
    .await
    .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_train_runs_the_candle_engine_to_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let svc = TrainerService::new(JobRegistry::in_memory().await);
    let job = start(&svc, spec(&format!("file://{}", out.display())))
        .await
        .unwrap();
    let mut last = None;
    for _ in 0..1200 {
        let j = svc
            .get_train(Request::new(JobRef {
                job_id: job.job_id.clone(),
            }))
            .await
            .unwrap()
            .into_inner();
        if JobState::try_from(j.state).unwrap().is_terminal() {
            last = Some(j);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let j = last.expect("the job ended");
    assert_eq!(
        JobState::try_from(j.state).unwrap(),
        JobState::Succeeded,
        "{}",
        j.error
    );
    assert_eq!(j.counters["steps"], 2);
    assert_eq!((j.done, j.total), (2, 2));
    // only stage2 was asked for; steps and lr of the request override the config
    assert!(
        j.outputs.iter().any(|o| o.ends_with("/checkpoints/2")),
        "{:?}",
        j.outputs
    );
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("checkpoints/2/state.json")).unwrap())
            .unwrap();
    assert_eq!(state["stage"], "stage2");
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert!(first["tokens"].as_u64().unwrap() > 0);
    assert!(first["lr"].as_f64().unwrap() <= 1e-3);
}

async fn wait(svc: &TrainerService, job: &davinci_proto::v1::Job) -> davinci_proto::v1::Job {
    for _ in 0..2400 {
        let j = svc
            .get_train(Request::new(JobRef {
                job_id: job.job_id.clone(),
            }))
            .await
            .unwrap()
            .into_inner();
        if JobState::try_from(j.state).unwrap().is_terminal() {
            return j;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the job did not end");
}

/// Distributed mode: shards read from S3 (moto), every checkpoint and the log written there,
/// and a job started again elsewhere (a fresh staging directory) resumes from S3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_and_checkpoints_on_s3() {
    use davinci_runtime::blob::{self, S3Config};
    let server = davinci_testkit::S3Server::start().await.unwrap();
    let s3 = S3Config {
        endpoint: Some(server.endpoint.clone()),
        region: Some(server.region.clone()),
        force_path_style: server.force_path_style,
        access_key_id: Some(server.access_key_id.clone()),
        secret_access_key: Some(server.secret_access_key.clone()),
        ..Default::default()
    };
    // The packed fixture, uploaded as the packer publishes it (manifest last).
    let packed = blob::open(&server.uri("runs/r1/packed"), &s3)
        .await
        .unwrap();
    let root = std::path::Path::new(DATA).parent().unwrap();
    let manifest = std::fs::read(DATA).unwrap();
    let m = davinci_core::packed::Manifest::from_json(&manifest).unwrap();
    for sh in m.shards() {
        for f in davinci_core::packed::shard_files(&sh.prefix) {
            packed
                .put(&f, std::fs::read(root.join(&f)).unwrap().into())
                .await
                .unwrap();
        }
    }
    let svc = TrainerService::new(JobRegistry::in_memory().await).with_s3(s3.clone());
    let out_uri = server.uri("runs/r1");
    let data_uri = format!("{}/packed/manifest.json", out_uri);
    let mut sp = spec(&out_uri);
    sp.data = data_uri.clone();
    sp.config_json = r#"{"stages": [{"name": "stage2", "lr": 1e-4}], "micro_batch": 1,
        "checkpoint_every": 1}"#
        .into();
    // No manifest yet: refused up front, naming what is missing.
    let e = start(&svc, sp.clone()).await.unwrap_err();
    assert!(
        e.message().contains("reading the manifest"),
        "{}",
        e.message()
    );
    packed.put("manifest.json", manifest.into()).await.unwrap();

    let j = wait(&svc, &start(&svc, sp.clone()).await.unwrap()).await;
    assert_eq!(
        JobState::try_from(j.state).unwrap(),
        JobState::Succeeded,
        "{}",
        j.error
    );
    assert_eq!(j.counters["steps"], 2);
    assert!(
        j.outputs.contains(&format!("{out_uri}/checkpoints/2")),
        "{:?}",
        j.outputs
    );
    let out = blob::open(&out_uri, &s3).await.unwrap();
    let keys: Vec<String> = out
        .list("checkpoints/")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .collect();
    for step in [1, 2] {
        for f in [
            "config.json",
            "model.safetensors",
            "optimizer.safetensors",
            "state.json",
        ] {
            let k = format!("checkpoints/{step}/{f}");
            assert!(keys.contains(&k), "{k} not in {keys:?}");
        }
    }
    let state: serde_json::Value =
        serde_json::from_slice(&out.get("checkpoints/2/state.json").await.unwrap()).unwrap();
    assert_eq!(
        (state["stage"].as_str(), state["global_step"].as_u64()),
        (Some("stage2"), Some(2))
    );
    let log = out.get("train_log.jsonl").await.unwrap();
    assert_eq!(String::from_utf8_lossy(&log).lines().count(), 2);

    // Started again (a new staging directory): the remote checkpoint is restored, so the
    // finished run trains nothing more...
    let j = wait(&svc, &start(&svc, sp.clone()).await.unwrap()).await;
    assert_eq!(
        JobState::try_from(j.state).unwrap(),
        JobState::Succeeded,
        "{}",
        j.error
    );
    assert_eq!(out.get("train_log.jsonl").await.unwrap(), log);
    // ...and a job with other settings on the same output is refused by that checkpoint.
    sp.learning_rate = 2e-3;
    let j = wait(&svc, &start(&svc, sp).await.unwrap()).await;
    assert_eq!(JobState::try_from(j.state).unwrap(), JobState::Failed);
    assert!(j.error.contains("holds a run with another"), "{}", j.error);
}

#[tokio::test]
async fn start_train_refuses_bad_requests_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let out = format!("file://{}", dir.path().join("o").display());
    let svc = TrainerService::new(JobRegistry::in_memory().await);
    let code = |r: Result<_, tonic::Status>| r.map(|_| ()).unwrap_err();
    let e = code(
        start(
            &svc,
            TrainSpec {
                engine: "jobset".into(),
                ..spec(&out)
            },
        )
        .await,
    );
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("Hugging Face model directory"),
        "{}",
        e.message()
    );
    let e = code(
        start(
            &svc,
            TrainSpec {
                engine: "torch".into(),
                ..spec(&out)
            },
        )
        .await,
    );
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = code(
        start(
            &svc,
            TrainSpec {
                data: "/nope/manifest.json".into(),
                ..spec(&out)
            },
        )
        .await,
    );
    assert!(
        e.message().contains("reading the manifest"),
        "{}",
        e.message()
    );
    let e = code(
        start(
            &svc,
            TrainSpec {
                out: "gs://b/x".into(),
                ..spec(&out)
            },
        )
        .await,
    );
    assert!(e.message().contains("unknown scheme"), "{}", e.message());
    let e = code(
        start(
            &svc,
            TrainSpec {
                model_config_json: TINY.replace("\"rms", "\"hidden_act\": \"gelu\", \"rms"),
                ..spec(&out)
            },
        )
        .await,
    );
    assert!(e.message().contains("hidden_act"), "{}", e.message());
    let e = code(
        start(
            &svc,
            TrainSpec {
                config_json: r#"{"micro_batch": 0}"#.into(),
                ..spec(&out)
            },
        )
        .await,
    );
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
}
