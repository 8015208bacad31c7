//! Hub model ids as the tokenizer of CountTokens, of a pack job and of its queue workers,
//! resolved from the Hugging Face cache named by the environment, offline. (The download
//! itself is tested in `crates/tokenize/tests/hub.rs`.) One test: it sets the process
//! environment.
use davinci_proto::v1::tokenizer_packer_server::TokenizerPacker;
use davinci_proto::v1::{CountTokensRequest, JobRef, JobState, PackSpec, StartPackRequest};
use davinci_runtime::blob::S3Config;
use davinci_runtime::jobs::JobRegistry;
use davinci_runtime::queue::{MemoryQueue, QueueOptions, WorkQueue};
use davinci_tokenize::Tokenizer;
use davinci_tokenizer_packer::serve::{PackerService, SAMPLES_TOPIC, worker};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tonic::Request;

const TOK: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../crates/tokenize/tests/fixtures/tiny-qwen-shape.json"
);
const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

async fn pack_manifest(svc: &PackerService, run_id: &str, spec: PackSpec) -> serde_json::Value {
    let out = spec.out.clone();
    let job = svc
        .start_pack(Request::new(StartPackRequest {
            run_id: run_id.into(),
            spec: Some(spec),
        }))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..600 {
        let j = svc
            .get_pack(Request::new(JobRef {
                job_id: job.job_id.clone(),
            }))
            .await
            .unwrap()
            .into_inner();
        let state = JobState::try_from(j.state).unwrap();
        if state.is_terminal() {
            assert_eq!(state, JobState::Succeeded, "{}", j.error);
            let path = format!("{}/manifest.json", out.trim_start_matches("file://"));
            return serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("pack job did not finish");
}

#[tokio::test]
async fn hub_model_ids_load_from_the_hugging_face_cache() {
    // huggingface_hub's layout: refs/main names the commit, snapshots/{commit} holds the file.
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--acme--tiny");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), SHA).unwrap();
    std::fs::create_dir_all(repo.join(format!("snapshots/{SHA}"))).unwrap();
    std::fs::copy(TOK, repo.join(format!("snapshots/{SHA}/tokenizer.json"))).unwrap();
    // SAFETY: the only test of this binary, on a single-threaded runtime, sets these before
    // anything reads the environment.
    unsafe {
        std::env::set_var("HF_HUB_CACHE", cache.path());
        std::env::set_var("HF_HUB_OFFLINE", "1");
        std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");
    }
    let fixture = Tokenizer::from_file(TOK).unwrap();
    assert_eq!(
        Tokenizer::load("acme/tiny").unwrap().sha256(),
        fixture.sha256()
    );

    let queue: Arc<dyn WorkQueue> = Arc::new(MemoryQueue::new(QueueOptions::default()));
    let svc = PackerService::new(JobRegistry::in_memory().await, S3Config::default())
        .with_queue(queue.clone());
    let texts = vec!["def f(x):\n    return x\n".to_string(), "héllo".to_string()];
    let resp = svc
        .count_tokens(Request::new(CountTokensRequest {
            tokenizer: "acme/tiny".into(),
            texts: texts.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    let want: Vec<u64> = texts
        .iter()
        .map(|t| fixture.encode_reference(t).unwrap().len() as u64)
        .collect();
    assert_eq!(resp.counts, want);

    let err = svc
        .count_tokens(Request::new(CountTokensRequest {
            tokenizer: "acme/missing@v1".into(),
            texts,
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("HF_HUB_OFFLINE"),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains(
            &cache
                .path()
                .join("models--acme--missing")
                .display()
                .to_string()
        ),
        "{}",
        err.message()
    );

    // A pack job in this process, and one shared with a worker that loads the tokenizer itself.
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let line = serde_json::json!({"id": "a", "text": "print('hi')\n", "source": "ctx-general",
        "metadata": {"repo": "o/r", "pr": 1, "base_sha": "", "head_sha": "", "format": "x"}});
    std::fs::write(&input, format!("{line}\n{line}\n")).unwrap();
    let spec = |out: &str| PackSpec {
        inputs: vec![input.display().to_string()],
        out: format!("file://{}/{out}", dir.path().display()),
        tokenizer: "acme/tiny".into(),
        seq_len: 64,
        mixture_json: String::new(),
        seed: 0,
        long_docs: String::new(),
    };
    let stop = CancellationToken::new();
    let w = tokio::spawn(worker(
        queue.clone(),
        SAMPLES_TOPIC,
        "w".into(),
        S3Config::default(),
        stop.clone(),
    ));
    for (run_id, out) in [("", "alone"), ("r1", "shared")] {
        let m = pack_manifest(&svc, run_id, spec(out)).await;
        assert_eq!(m["tokenizer"]["name"], "acme/tiny");
        assert_eq!(m["tokenizer"]["sha256"], fixture.sha256());
        assert_eq!(m["stages"][0]["datasets"][0]["documents"], 2);
    }
    stop.cancel();
    assert_eq!(
        w.await.unwrap().unwrap(),
        1,
        "the shared job went through the worker"
    );
}
