//! What a finished run's summary shows, read from the stats its stages wrote. The conductor
//! hands it to clients with the run (`Run.summary_json`), and `davinci run` reads the same
//! thing from its own storage, so both print the same figures.
use davinci_runtime::blob::BlobStore;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The stats documents of a run (`stats/crawl.json`, `stats/reconstruct.json`,
/// `packed/manifest.json`) without their object lists (shards, per-repository counts,
/// blends): the summary needs the counts, and a run of thousands of shards stays small.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    pub crawl: Value,
    pub reconstruct: Value,
    pub manifest: Value,
    /// Benchmark → the scores of its `eval/{benchmark}/report.json` (runs with an evaluate
    /// stage).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub evaluation: std::collections::BTreeMap<String, Value>,
}

impl RunSummary {
    /// Reads the stats of run `run_id` from the storage root `store`.
    pub async fn read(store: &dyn BlobStore, run_id: &str) -> anyhow::Result<Self> {
        let mut crawl = read_json(store, &format!("runs/{run_id}/stats/crawl.json")).await?;
        let reconstruct =
            read_json(store, &format!("runs/{run_id}/stats/reconstruct.json")).await?;
        let mut manifest = read_json(store, &format!("runs/{run_id}/packed/manifest.json")).await?;
        if let Some(c) = crawl.as_object_mut() {
            c.remove("shards");
            c.remove("repos");
        }
        for stage in manifest["stages"].as_array_mut().into_iter().flatten() {
            if let Some(s) = stage.as_object_mut() {
                s.remove("blend");
            }
            for d in stage["datasets"].as_array_mut().into_iter().flatten() {
                if let Some(d) = d.as_object_mut() {
                    d.remove("shards");
                }
            }
        }
        let mut evaluation = std::collections::BTreeMap::new();
        let prefix = format!("runs/{run_id}/eval/");
        for o in store
            .list(&prefix)
            .await
            .map_err(|e| anyhow::anyhow!("listing {}: {e}", store.uri(&prefix)))?
        {
            if let Some(bench) = o
                .key
                .strip_prefix(&prefix)
                .and_then(|k| k.strip_suffix("/report.json"))
                .filter(|b| !b.contains('/'))
            {
                let report = read_json(store, &o.key).await?;
                evaluation.insert(bench.to_string(), report["scores"].clone());
            }
        }
        Ok(Self {
            crawl,
            reconstruct,
            manifest,
            evaluation,
        })
    }
}

async fn read_json(store: &dyn BlobStore, key: &str) -> anyhow::Result<Value> {
    let b = store
        .get(key)
        .await
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", store.uri(key)))?;
    serde_json::from_slice(&b).map_err(|e| anyhow::anyhow!("{} is not JSON: {e}", store.uri(key)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[tokio::test]
    async fn reads_counts_and_leaves_object_lists_out() {
        let dir = tempfile::tempdir().unwrap();
        let store = davinci_runtime::blob::FileStore::new(dir.path()).unwrap();
        let put = |k: &str, v: Value| {
            let s = &store;
            let k = k.to_string();
            async move { s.put(&k, Bytes::from(v.to_string())).await.unwrap() }
        };
        put(
            "runs/r/stats/crawl.json",
            serde_json::json!({"in": 3, "out": 2, "drops": {"bot": 1},
                "repos": {"a/b": {"in": 3}}, "shards": [{"key": "k"}], "failed_repos": {}}),
        )
        .await;
        put(
            "runs/r/stats/reconstruct.json",
            serde_json::json!({"formats": {"ctx-python": {"samples": 2, "tokens": 9, "drops": {}}}}),
        )
        .await;
        put(
            "runs/r/packed/manifest.json",
            serde_json::json!({"stages": [{"name": "s1", "blend": "1 x",
                "datasets": [{"name": "ctx-python", "bins": 1, "shards": [{"key": "k"}]}]}]}),
        )
        .await;
        put(
            "runs/r/eval/gpqa/report.json",
            serde_json::json!({"scores": {"accuracy": 0.25}, "provenance": {"model": "m"}}),
        )
        .await;
        put("runs/r/eval/gpqa/results.jsonl", serde_json::json!({})).await;
        let s = RunSummary::read(&store, "r").await.unwrap();
        assert_eq!(s.evaluation.len(), 1);
        assert_eq!(s.evaluation["gpqa"]["accuracy"], 0.25);
        assert_eq!(s.crawl["out"], 2);
        assert_eq!(s.crawl["drops"]["bot"], 1);
        assert!(s.crawl.get("shards").is_none() && s.crawl.get("repos").is_none());
        assert_eq!(s.reconstruct["formats"]["ctx-python"]["samples"], 2);
        let d = &s.manifest["stages"][0]["datasets"][0];
        assert_eq!(d["bins"], 1);
        assert!(d.get("shards").is_none());
        assert!(s.manifest["stages"][0].get("blend").is_none());
        let e = RunSummary::read(&store, "missing").await.unwrap_err();
        assert!(
            e.to_string().contains("runs/missing/stats/crawl.json"),
            "{e}"
        );
    }
}
