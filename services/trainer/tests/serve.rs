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
                out: "s3://b/x".into(),
                ..spec(&out)
            },
        )
        .await,
    );
    assert!(e.message().contains("local paths"), "{}", e.message());
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
