//! The gRPC service methods, called in process: CountTokens and a StartPack job to completion.
use davinci_proto::v1::tokenizer_packer_server::TokenizerPacker;
use davinci_proto::v1::{CountTokensRequest, JobRef, JobState, PackSpec, StartPackRequest};
use davinci_runtime::blob::S3Config;
use davinci_runtime::jobs::JobRegistry;
use davinci_tokenize::Tokenizer;
use davinci_tokenizer_packer::serve::PackerService;
use tonic::Request;

const TOK: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../crates/tokenize/tests/fixtures/tiny-qwen-shape.json"
);

#[tokio::test]
async fn count_tokens_matches_the_tokenizer_and_rejects_bad_input() {
    let svc = PackerService::new(JobRegistry::in_memory().await, S3Config::default());
    let texts = vec![
        "def f(x):\n    return x\n".to_string(),
        "<|im_start|>héllo".to_string(),
    ];
    let resp = svc
        .count_tokens(Request::new(CountTokensRequest {
            tokenizer: TOK.into(),
            texts: texts.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    let tok = Tokenizer::from_file(TOK).unwrap();
    let want: Vec<u64> = texts
        .iter()
        .map(|t| tok.encode_reference(t).unwrap().len() as u64)
        .collect();
    assert_eq!(resp.counts, want);
    assert_eq!(resp.total, want.iter().sum::<u64>());
    let err = svc
        .count_tokens(Request::new(CountTokensRequest {
            tokenizer: "/nonexistent/tokenizer.json".into(),
            texts,
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn start_pack_runs_to_success_and_writes_a_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let line = serde_json::json!({"id": "a", "text": "print('hi')\n", "source": "ctx-general",
        "metadata": {"repo": "o/r", "pr": 1, "base_sha": "", "head_sha": "", "format": "x"}});
    std::fs::write(&input, format!("{line}\n{line}\n")).unwrap();
    let out = dir.path().join("out");
    let svc = PackerService::new(JobRegistry::in_memory().await, S3Config::default());
    let bad = svc
        .start_pack(Request::new(StartPackRequest {
            run_id: "r".into(),
            spec: Some(PackSpec {
                mixture_json: "stages: 3".into(),
                inputs: vec!["x".into()],
                out: "o".into(),
                tokenizer: TOK.into(),
                ..Default::default()
            }),
        }))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    let job = svc
        .start_pack(Request::new(StartPackRequest {
            run_id: "r1".into(),
            spec: Some(PackSpec {
                inputs: vec![input.display().to_string()],
                out: out.display().to_string(),
                tokenizer: TOK.into(),
                seq_len: 128,
                mixture_json: String::new(),
                seed: 3,
                long_docs: String::new(),
            }),
        }))
        .await
        .unwrap()
        .into_inner();
    let mut state = JobState::Queued;
    for _ in 0..200 {
        let j = svc
            .get_pack(Request::new(JobRef {
                job_id: job.job_id.clone(),
            }))
            .await
            .unwrap()
            .into_inner();
        state = JobState::try_from(j.state).unwrap();
        if state.is_terminal() {
            assert_eq!(state, JobState::Succeeded, "{}", j.error);
            assert!(j.outputs[0].ends_with("manifest.json"));
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(state, JobState::Succeeded);
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["stages"][0]["datasets"][0]["documents"], 2);
    assert_eq!(m["seq_len"], 128);
}
