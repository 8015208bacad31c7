//! One-off batch over stored PR shards: `prs/*.jsonl.zst` in, `samples/{format}/*.jsonl.zst`
//! and `stats/reconstruct.json` out (the stats object is written last: it is the commit point).
//!
//! Output shard names derive from the input shard name and the format version, so running the
//! stage twice writes the same objects.
use crate::enhance::Enhancer;
use crate::partition::{Io, PartitionedDedup, Parts, Resolution};
use crate::pipeline::{Candidate, Reconstructor, Stats};
use bytes::Bytes;
use davinci_core::pr::PullRequest;
use davinci_core::sample::{Sample, SampleSource};
use davinci_llm::{ChatCompletion, LlmError, ResponseCache};
use davinci_runtime::blob::BlobStore;
use davinci_runtime::shard;
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::Arc;

/// LLM responses under `cache/llm/{sha256}.json` in a [`BlobStore`].
#[derive(Debug, Clone)]
pub struct BlobCache {
    pub store: Arc<dyn BlobStore>,
}

#[async_trait::async_trait]
impl ResponseCache for BlobCache {
    async fn get(&self, key: &str) -> Result<Option<ChatCompletion>, LlmError> {
        let k = format!("cache/llm/{key}.json");
        match self.store.get(&k).await {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| LlmError::Cache(format!("{k}: {e}"))),
            Err(davinci_runtime::blob::BlobError::NotFound(_)) => Ok(None),
            Err(e) => Err(LlmError::Cache(e.to_string())),
        }
    }

    async fn put(&self, key: &str, value: &ChatCompletion) -> Result<(), LlmError> {
        let k = format!("cache/llm/{key}.json");
        let body = serde_json::to_vec(value).expect("completion serialises");
        self.store
            .put(&k, Bytes::from(body))
            .await
            .map_err(|e| LlmError::Cache(e.to_string()))
    }
}

/// Reads PR records from a shard (`.jsonl.zst`) or plain JSONL (`.jsonl`) object. Lines that
/// are not `davinci.pr/v1` records come back as errors with their line number.
pub fn decode_prs(key: &str, data: &[u8]) -> anyhow::Result<Vec<Result<PullRequest, String>>> {
    use davinci_runtime::retry::permanent;
    // Malformed bytes stay malformed: a shard that does not decode is a permanent failure.
    let text = if key.ends_with(".zst") {
        let raw = zstd::stream::decode_all(data)
            .map_err(|e| permanent(anyhow::anyhow!("{key}: not a zstd stream: {e}")))?;
        String::from_utf8(raw).map_err(|e| permanent(anyhow::anyhow!("{key}: not UTF-8: {e}")))?
    } else {
        String::from_utf8(data.to_vec())
            .map_err(|e| permanent(anyhow::anyhow!("{key}: not UTF-8: {e}")))?
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

/// What a batch did.
#[derive(Debug, Clone)]
pub struct BatchReport {
    pub stats: Stats,
    /// Keys written, per format.
    pub written: BTreeMap<String, Vec<String>>,
}

/// Progress callback: (PRs done, PRs in the current shard).
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// Renders one decoded shard and dedups it: [`render_shard`] then [`admit_all`].
pub async fn process_shard(
    key: &str,
    data: &[u8],
    recon: &mut Reconstructor,
    enhancer: Arc<Enhancer>,
    concurrency: usize,
    on_record: impl FnMut(),
) -> anyhow::Result<BTreeMap<SampleSource, Vec<Sample>>> {
    let candidates = render_shard(key, data, recon, enhancer, concurrency, on_record).await?;
    Ok(admit_all(recon, candidates))
}

/// The order-free half of the stage over one shard: every PR rendered into candidates, in
/// input order. Reasoning text is built concurrently (`concurrency` PRs in flight, useful with
/// an LLM endpoint).
pub async fn render_shard(
    key: &str,
    data: &[u8],
    recon: &mut Reconstructor,
    enhancer: Arc<Enhancer>,
    concurrency: usize,
    mut on_record: impl FnMut(),
) -> anyhow::Result<Vec<Candidate>> {
    let records = decode_prs(key, data)?;
    let mut stream = futures::stream::iter(records.into_iter().map(move |r| {
        let e = enhancer.clone();
        async move {
            match r {
                Ok(mut pr) => {
                    // No e-mail address reaches a prompt either.
                    crate::filters::scrub_authors(&mut pr);
                    let (enh, prov) = e.enhance(&pr).await;
                    Ok((pr, enh, prov))
                }
                Err(msg) => Err(msg),
            }
        }
    }))
    .buffered(concurrency.max(1));
    let mut out = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok((pr, enh, prov)) => out.extend(recon.render(pr, &enh, &prov)),
            Err(msg) => {
                tracing::warn!(error = %msg, "unreadable PR record");
                recon.bad_record();
            }
        }
        on_record();
    }
    Ok(out)
}

/// The ordered half: dedups `candidates` against everything admitted before, in order, so the
/// result is reproducible whichever replica rendered them.
pub fn admit_all(
    recon: &mut Reconstructor,
    candidates: Vec<Candidate>,
) -> BTreeMap<SampleSource, Vec<Sample>> {
    let mut by_format: BTreeMap<SampleSource, Vec<Sample>> = BTreeMap::new();
    for c in candidates {
        if let Some(s) = recon.admit(c) {
            by_format.entry(s.source).or_default().push(s);
        }
    }
    by_format
}

/// Writes one sample shard per format under `{out_prefix}/samples/{format}/`, named from the
/// input key and the format version. Returns (format, key, encoded shard) per shard written.
pub async fn write_samples(
    output: &dyn BlobStore,
    out_prefix: &str,
    input_key: &str,
    by_format: BTreeMap<SampleSource, Vec<Sample>>,
) -> anyhow::Result<Vec<(SampleSource, String, shard::EncodedShard)>> {
    let mut out = Vec::new();
    for (format, samples) in by_format {
        let enc = shard::encode_shard(&samples)?;
        let name = shard::shard_name(format!("{input_key}\0{}", format_version(format)).as_bytes());
        let k = join_key(
            out_prefix,
            &format!(
                "samples/{}/{}",
                format.as_str(),
                shard::shard_file_name(&name)
            ),
        );
        output.put(&k, enc.data.clone()).await?;
        out.push((format, k, enc));
    }
    Ok(out)
}

/// `prefix/key`, or `key` when the prefix is empty.
pub fn join_key(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{}/{key}", prefix.trim_end_matches('/'))
    }
}

/// Processes every input shard in order, then writes the stats object (the commit point).
#[allow(clippy::too_many_arguments)]
pub async fn run_batch(
    input: Arc<dyn BlobStore>,
    inputs: &[String],
    output: Arc<dyn BlobStore>,
    out_prefix: &str,
    recon: &mut Reconstructor,
    enhancer: Arc<Enhancer>,
    concurrency: usize,
    progress: Option<Progress>,
) -> anyhow::Result<BatchReport> {
    let started = std::time::Instant::now();
    let mut written: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut done = 0u64;
    for key in inputs {
        let data = input.get(key).await?;
        let by_format = process_shard(key, &data, recon, enhancer.clone(), concurrency, || {
            done += 1;
            if let Some(p) = &progress {
                p(done);
            }
        })
        .await?;
        for (format, k, _) in write_samples(output.as_ref(), out_prefix, key, by_format).await? {
            written
                .entry(format.as_str().to_string())
                .or_default()
                .push(k);
        }
    }
    recon.stats.llm = enhancer.stats();
    recon.stats.seconds = started.elapsed().as_secs_f64();
    let stats = recon.stats.clone();
    let body = serde_json::to_vec_pretty(&stats)?;
    output
        .put(
            &join_key(out_prefix, "stats/reconstruct.json"),
            Bytes::from(body),
        )
        .await?;
    Ok(BatchReport { stats, written })
}

fn format_version(f: SampleSource) -> &'static str {
    match f {
        SampleSource::CtxPython => davinci_core::ctx::CTX_PYTHON_FORMAT,
        _ => davinci_core::ctx::CTX_GENERAL_FORMAT,
    }
}

/// [`run_batch`] with dedup through storage ([`crate::partition`]) instead of one in-memory
/// index: pass 1 renders each shard into candidates kept under the dedup prefix and maps their
/// keys to the partitions; the shuffle runs; pass 2 takes the shards in input order, resolves
/// their verdicts and writes their samples. The process holds one shard's candidates or one
/// partition's records at a time, so its memory does not grow with the corpus. The samples
/// and stats equal [`run_batch`]'s.
#[allow(clippy::too_many_arguments)]
pub async fn run_batch_partitioned(
    input: Arc<dyn BlobStore>,
    inputs: &[String],
    output: Arc<dyn BlobStore>,
    out_prefix: &str,
    recon: &mut Reconstructor,
    enhancer: Arc<Enhancer>,
    concurrency: usize,
    progress: Option<Progress>,
    dedup: &PartitionedDedup,
) -> anyhow::Result<(BatchReport, Io)> {
    let started = std::time::Instant::now();
    let mut io = Io::default();
    dedup.clear().await?;
    let mut counts = Vec::with_capacity(inputs.len());
    let mut done = 0u64;
    for (k, key) in inputs.iter().enumerate() {
        let data = input.get(key).await?;
        let candidates = render_shard(key, &data, recon, enhancer.clone(), concurrency, || {
            done += 1;
            if let Some(p) = &progress {
                p(done);
            }
        })
        .await?;
        let first = counts.iter().sum();
        io += dedup.put_candidates(k, &candidates).await?;
        io += dedup.map_part(k, first, &candidates).await?;
        counts.push(candidates.len() as u64);
    }
    let parts = Parts::from_counts(&counts);
    io += dedup.shuffle(&parts).await?;
    let mut state = Resolution::default();
    let mut written: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, key) in inputs.iter().enumerate() {
        let (candidates, read) = dedup.get_candidates(k).await?;
        io += read;
        let (verdicts, read) = dedup.resolve_part(k, &parts, &mut state).await?;
        io += read;
        anyhow::ensure!(
            verdicts.len() == candidates.len(),
            "part {k} ({key}): {} verdicts for {} candidates",
            verdicts.len(),
            candidates.len()
        );
        let mut by_format: BTreeMap<SampleSource, Vec<Sample>> = BTreeMap::new();
        for (c, v) in candidates.into_iter().zip(verdicts) {
            if let Some(s) = recon.admit_verdict(c, v) {
                by_format.entry(s.source).or_default().push(s);
            }
        }
        for (format, k, _) in write_samples(output.as_ref(), out_prefix, key, by_format).await? {
            written
                .entry(format.as_str().to_string())
                .or_default()
                .push(k);
        }
    }
    recon.stats.llm = enhancer.stats();
    recon.stats.seconds = started.elapsed().as_secs_f64();
    let stats = recon.stats.clone();
    let body = serde_json::to_vec_pretty(&stats)?;
    output
        .put(
            &join_key(out_prefix, "stats/reconstruct.json"),
            Bytes::from(body),
        )
        .await?;
    Ok((BatchReport { stats, written }, io))
}
