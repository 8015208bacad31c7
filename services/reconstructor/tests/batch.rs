//! A batch over stored shards: PR shard in, sample shards and `stats/reconstruct.json` out;
//! a second run writes the same objects.
use davinci_core::pr::PullRequest;
use davinci_core::sample::Sample;
use davinci_reconstructor::batch;
use davinci_reconstructor::{Enhancer, ReconstructConfig, Reconstructor, word_counter};
use davinci_runtime::blob::{BlobStore, FileStore};
use davinci_runtime::shard;
use std::sync::Arc;

fn fixtures() -> Vec<PullRequest> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    names.sort();
    names
        .iter()
        .map(|p| serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap())
        .collect()
}

async fn run_once(store: Arc<dyn BlobStore>) -> batch::BatchReport {
    let inputs = shard::list_inputs(store.as_ref(), "prs").await.unwrap();
    assert_eq!(inputs.len(), 1);
    let mut r = Reconstructor::new(ReconstructConfig::default(), word_counter()).unwrap();
    batch::run_batch(
        store.clone(),
        &inputs,
        store.clone(),
        "",
        &mut r,
        Arc::new(Enhancer::new(None, Default::default())),
        4,
        None,
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn batch_writes_samples_and_stats() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn BlobStore> = Arc::new(FileStore::new(dir.path()).unwrap());
    let prs = fixtures();
    let n = prs.len() as u64;
    let mut lines: Vec<serde_json::Value> = prs
        .iter()
        .map(|p| serde_json::to_value(p).unwrap())
        .collect();
    lines.push(serde_json::json!({"schema": "davinci.pr/v1", "id": "broken"}));
    let enc = shard::encode_shard(&lines).unwrap();
    store
        .put(&format!("prs/{}", enc.file_name()), enc.data)
        .await
        .unwrap();

    let report = run_once(store.clone()).await;
    let st = &report.stats;
    assert_eq!(st.prs_in, n + 1);
    assert_eq!(st.bad_records, 1);
    for (format, fs) in &st.formats {
        let dropped: u64 = fs.drops.values().sum();
        assert_eq!(fs.samples + dropped, n + 1, "{format}: {fs:?}");
    }
    assert_eq!(st.formats["ctx-python"].drops["marker_collision"], 1);
    let py_key = &report.written["ctx-python"][0];
    let samples: Vec<Sample> = shard::decode_jsonl_zst(&store.get(py_key).await.unwrap()).unwrap();
    assert_eq!(samples.len() as u64, st.formats["ctx-python"].samples);
    assert!(
        samples
            .iter()
            .all(|s| s.metadata.format == davinci_core::ctx::CTX_PYTHON_FORMAT)
    );
    let stats: serde_json::Value =
        serde_json::from_slice(&store.get("stats/reconstruct.json").await.unwrap()).unwrap();
    assert_eq!(stats["stage"], "reconstruct");
    assert_eq!(stats["formats"]["ctx-python"]["drops"]["bot_author"], 1);

    // Re-running writes the same keys with the same bytes.
    let before = store.get(py_key).await.unwrap();
    let again = run_once(store.clone()).await;
    assert_eq!(again.written, report.written);
    assert_eq!(store.get(py_key).await.unwrap(), before);
}
