//! A batch over stored PR shards: `prs/*.jsonl.zst` in; `tasks/{shard}.jsonl.zst`,
//! `tasks/logs/{instance_id}/` and, last, `stats/tasks.json` out.
//!
//! Each input shard commits `tasks/parts/{shard}.json` (its stats) after its tasks shard and
//! logs, so a batch killed at any point resumes at the first shard without one and ends with
//! the same tasks. Output names derive from the input key and the stage version.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use davinci_core::pr::PullRequest;
use davinci_core::task::TaskInstance;
use davinci_runtime::blob::BlobStore;
use davinci_runtime::shard;
use futures::StreamExt;

use crate::repo::Mirror;
use crate::select::candidate;
use crate::stage::{Stage, Stats, TaskOutcome};

/// Bumped when the same input would give different tasks.
pub const STAGE_VERSION: &str = "davinci.tasks/v1";

/// Where the mirror of each repository is: named explicitly, or `{dir}/{owner}__{name}[.git]`.
#[derive(Debug, Clone, Default)]
pub struct Mirrors {
    pub named: HashMap<String, PathBuf>,
    pub dir: Option<PathBuf>,
}

impl Mirrors {
    pub fn find(&self, repo: &str) -> Option<Mirror> {
        let path = self.named.get(repo).cloned().or_else(|| {
            let d = self.dir.as_ref()?;
            let base = repo.replace('/', "__");
            [base.clone(), format!("{base}.git")]
                .into_iter()
                .map(|n| d.join(n))
                .find(|p| p.is_dir())
        })?;
        Mirror::open(&path).ok()
    }
}

/// Reads PR records from a shard (`.jsonl.zst`) or JSONL object; a line that is not a
/// record comes back as an error.
pub fn decode_prs(key: &str, data: &[u8]) -> anyhow::Result<Vec<Result<PullRequest, String>>> {
    let text = if key.ends_with(".zst") {
        let raw = zstd::stream::decode_all(data)
            .map_err(|e| anyhow::anyhow!("{key}: not a zstd stream: {e}"))?;
        String::from_utf8(raw).map_err(|e| anyhow::anyhow!("{key}: not UTF-8: {e}"))?
    } else {
        String::from_utf8(data.to_vec()).map_err(|e| anyhow::anyhow!("{key}: not UTF-8: {e}"))?
    };
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str::<PullRequest>(l).map_err(|e| format!("{key} line {}: {e}", i + 1))
        })
        .collect())
}

/// Writes a task's validation logs under `tasks/logs/{instance_id}/`.
pub async fn write_logs(out: &dyn BlobStore, o: &TaskOutcome) -> anyhow::Result<()> {
    let dir = format!("tasks/logs/{}", o.validation.instance_id);
    for (name, log) in &o.validation.logs {
        out.put(&format!("{dir}/{name}"), Bytes::from(log.clone()))
            .await?;
    }
    let body = serde_json::to_vec_pretty(&o.validation)?;
    out.put(&format!("{dir}/validation.json"), Bytes::from(body))
        .await?;
    Ok(())
}

/// Validates candidates `jobs` at a time, results in input order.
pub async fn run_all(
    stage: &Stage,
    items: Vec<(TaskInstance, Option<Mirror>)>,
    on_done: &(dyn Fn(&TaskOutcome) + Send + Sync),
) -> Vec<TaskOutcome> {
    futures::stream::iter(items)
        .map(|(inst, mirror)| async move {
            let o = stage.run(inst, mirror.as_ref()).await;
            on_done(&o);
            o
        })
        .buffered(stage.cfg.jobs.max(1))
        .collect()
        .await
}

/// Turns one PR shard's records into tasks: selection, then validation; returns the kept
/// tasks (input order) and the shard's stats.
pub async fn process_shard(
    stage: &Stage,
    mirrors: &Mirrors,
    records: Vec<Result<PullRequest, String>>,
    out: &dyn BlobStore,
    on_done: &(dyn Fn(&TaskOutcome) + Send + Sync),
) -> anyhow::Result<(Vec<TaskInstance>, Stats)> {
    let t = std::time::Instant::now();
    let mut stats = Stats::default();
    let mut items = Vec::new();
    for r in records {
        stats.prs += 1;
        let pr = match r {
            Ok(pr) => pr,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable PR record");
                stats.bad_records += 1;
                continue;
            }
        };
        let Some(mirror) = mirrors.find(&pr.repo.full_name) else {
            stats.drop("no_mirror");
            continue;
        };
        match candidate(&pr, &mirror, &stage.cfg.select)? {
            Ok(inst) => {
                stats.candidates += 1;
                items.push((inst, Some(mirror)));
            }
            Err(d) => stats.drop(d.as_str()),
        }
    }
    let outcomes = run_all(stage, items, on_done).await;
    let mut tasks = Vec::new();
    for o in &outcomes {
        stats.record(o);
        write_logs(out, o).await?;
        if let Some(t) = &o.task {
            tasks.push(t.clone());
        }
    }
    stats.seconds = t.elapsed().as_secs_f64();
    Ok((tasks, stats))
}

/// Output keys of one input shard: its tasks shard and its part marker.
pub fn output_keys(input_uri: &str) -> (String, String) {
    let name = shard::shard_name(format!("{input_uri}\0{STAGE_VERSION}").as_bytes());
    (
        format!("tasks/{}", shard::shard_file_name(&name)),
        format!("tasks/parts/{name}.json"),
    )
}

/// The stats an earlier run committed for the input shard at `input_uri`, if it finished.
pub async fn committed_shard(out: &dyn BlobStore, input_uri: &str) -> Option<Stats> {
    let b = out.get(&output_keys(input_uri).1).await.ok()?;
    serde_json::from_slice(&b).ok()
}

/// Builds the tasks of the input shard at `input_uri` and commits them: its logs and tasks
/// shard, then its part marker. Every caller (the CLI, the service's workers) writes the same
/// objects for the same shard.
pub async fn build_shard(
    stage: &Stage,
    mirrors: &Mirrors,
    input_uri: &str,
    records: Vec<Result<PullRequest, String>>,
    out: &dyn BlobStore,
    on_done: &(dyn Fn(&TaskOutcome) + Send + Sync),
) -> anyhow::Result<Stats> {
    let (tasks_key, part_key) = output_keys(input_uri);
    let (tasks, stats) = process_shard(stage, mirrors, records, out, on_done).await?;
    out.put(&tasks_key, shard::encode_shard(&tasks)?.data)
        .await?;
    out.put(&part_key, Bytes::from(serde_json::to_vec(&stats)?))
        .await?;
    Ok(stats)
}

/// Writes the job's stats, `stats/tasks.json`, the commit point; returns its URI.
pub async fn commit_stats(out: &dyn BlobStore, stats: &Stats) -> anyhow::Result<String> {
    let body = serde_json::to_vec_pretty(stats)?;
    out.put("stats/tasks.json", Bytes::from(body)).await?;
    Ok(out.uri("stats/tasks.json"))
}

/// What a batch did.
#[derive(Debug, Clone)]
pub struct BatchReport {
    pub stats: Stats,
    pub written: Vec<String>,
    /// Input shards a previous run had finished.
    pub reused: usize,
}

/// Every input shard in order (skipping those a previous run committed), then the stats
/// object, the commit point.
pub async fn run_batch(
    stage: &Stage,
    mirrors: &Mirrors,
    inputs: &[(Arc<dyn BlobStore>, String)],
    out: Arc<dyn BlobStore>,
    on_done: &(dyn Fn(&TaskOutcome) + Send + Sync),
) -> anyhow::Result<BatchReport> {
    let mut total = Stats::default();
    let mut written = Vec::new();
    let mut reused = 0;
    for (store, key) in inputs {
        let uri = store.uri(key);
        let stats = match committed_shard(out.as_ref(), &uri).await {
            Some(s) => {
                reused += 1;
                s
            }
            None => {
                let records = decode_prs(key, &store.get(key).await?)?;
                build_shard(stage, mirrors, &uri, records, out.as_ref(), on_done).await?
            }
        };
        written.push(out.uri(&output_keys(&uri).0));
        total.merge(&stats);
    }
    written.push(commit_stats(out.as_ref(), &total).await?);
    Ok(BatchReport {
        stats: total,
        written,
        reused,
    })
}

/// Local directory of a `file://` URI or path, for the default environment cache.
pub fn local_root(uri: &str) -> Option<PathBuf> {
    let p = uri
        .strip_prefix("file://")
        .or(if uri.contains("://") { None } else { Some(uri) })?;
    let p = Path::new(p);
    Some(if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().ok()?.join(p)
    })
}
