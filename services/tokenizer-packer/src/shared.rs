//! A pack job shared by every replica. The StartPack job is the coordinator: it stores the
//! [`MapSpec`] in the job's work directory and announces each input shard on `samples` (or
//! `trajectories`). Workers on any replica tokenize a shard into a part there (the map step)
//! and commit it. The coordinator then packs the parts in input order (the reduce step), one
//! part in memory at a time, and so writes the bytes the job run in one process writes.
use crate::input::{Input, Progress};
use crate::job::{SAMPLES_TOPIC, TRAJECTORIES_TOPIC, job_options};
use crate::part::{MapSpec, Mapper, PartReader, PartSummary, PartWriter};
use crate::pipeline::{self, Manifest, Reducer};
use crate::storage::{self, OutputDir};
use anyhow::Context;
use bytes::Bytes;
use davinci_proto::v1::PackSpec;
use davinci_runtime::blob::S3Config;
use davinci_runtime::fanout::{self, Claimed, Item, WaitOptions, Work};
use davinci_runtime::jobs::JobHandle;
use davinci_runtime::queue::WorkQueue;
use davinci_runtime::retry::PermanentExt;
use davinci_tokenize::Tokenizer;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Jobs a worker keeps loaded at once.
const KEEP_JOBS: usize = 4;

/// Key of an input's part in the work directory.
fn part_key(part: &str) -> String {
    format!("tokens/{part}.bin.zst")
}

/// Trajectory shards (`runs/{run}/trajectories/{pass|fail}/…`) travel on `trajectories`,
/// everything else on `samples`.
pub fn topic_for(uri: &str) -> &'static str {
    if uri.contains("/trajectories/") {
        TRAJECTORIES_TOPIC
    } else {
        SAMPLES_TOPIC
    }
}

struct Loaded {
    work: String,
    spec: Arc<MapSpec>,
    tok: Arc<Tokenizer>,
}

/// What a worker keeps per job: loading a tokenizer is costly.
#[derive(Default)]
pub struct TokenizerCache {
    jobs: tokio::sync::Mutex<Vec<Loaded>>,
}

impl TokenizerCache {
    async fn get(
        &self,
        work: &Work,
        s3: &S3Config,
    ) -> anyhow::Result<(Arc<MapSpec>, Arc<Tokenizer>)> {
        let mut jobs = self.jobs.lock().await;
        if let Some(j) = jobs.iter().find(|j| j.work == work.uri) {
            return Ok((j.spec.clone(), j.tok.clone()));
        }
        let spec: MapSpec = work.spec().await?;
        let tok = match jobs
            .iter()
            .find(|j| j.spec.tokenizer_sha256 == spec.tokenizer_sha256)
        {
            Some(j) => j.tok.clone(),
            None => {
                let bytes = storage::read_tokenizer(&spec.tokenizer, s3).await?;
                Arc::new(tokio::task::spawn_blocking(move || Tokenizer::from_bytes(&bytes)).await??)
            }
        };
        if tok.sha256() != spec.tokenizer_sha256 {
            return Err(anyhow::anyhow!(
                "tokenizer {} is now sha256 {}, the job started with {}",
                spec.tokenizer,
                tok.sha256(),
                spec.tokenizer_sha256
            ))
            .permanent();
        }
        if jobs.len() >= KEEP_JOBS {
            jobs.remove(0);
        }
        let spec = Arc::new(spec);
        jobs.push(Loaded {
            work: work.uri.clone(),
            spec: spec.clone(),
            tok: tok.clone(),
        });
        Ok((spec, tok))
    }
}

/// The map step of one claimed input: tokenizes it into its part in the work directory and
/// returns the part's summary. Committing the part is the caller's last step. The map step
/// works on bytes in memory, so its failures (a shard that is not zstd, a read error inside
/// it) are permanent: the same bytes fail the same way again.
pub async fn tokenize_part(
    c: &Claimed,
    s3: &S3Config,
    cache: &TokenizerCache,
) -> anyhow::Result<PartSummary> {
    let (spec, tok) = cache.get(&c.work, s3).await?;
    let (_, data) = fanout::read_input(&c.claim, s3).await?;
    let input = Input::Bytes {
        name: c.claim.uri.clone(),
        data: data.into(),
    };
    let batch = pipeline::PackOptions::default().batch;
    let (part, summary) = tokio::task::spawn_blocking(move || {
        let mut w = PartWriter::new()?;
        let mapper = Mapper {
            tok: &tok,
            spec: &spec,
            batch,
            cancel: &AtomicBool::new(false),
        };
        mapper.map(&input, &mut Progress::default(), &mut |_| {}, &mut |ev| {
            w.push(&ev)
        })?;
        w.finish()
    })
    .await?
    .permanent()?;
    c.work
        .store
        .put(&part_key(&c.part), Bytes::from(part))
        .await?;
    Ok(summary)
}

/// The coordinator: announces every input, waits until each is tokenized, then reduces the
/// parts in input order into `spec.out`. Returns the manifest URI.
pub async fn run(
    spec: PackSpec,
    s3: S3Config,
    tok: Arc<Tokenizer>,
    queue: Arc<dyn WorkQueue>,
    run_id: String,
    handle: JobHandle,
) -> anyhow::Result<Vec<String>> {
    let out = OutputDir::new(&spec.out)?;
    let (mixture, opts) = job_options(&spec, &out)?;
    let (_, eod) = pipeline::resolve_eod(&tok, opts.eod.as_deref())?;
    let map = MapSpec::new(&tok, &spec.tokenizer, &mixture, eod);
    let work = Work::open(&Work::dir_for(&spec.out, &run_id, "pack", &map), &s3).await?;
    work.put_spec(&map).await?;
    let mut items = Vec::new();
    for input in storage::locate_inputs(&spec.inputs, &s3).await? {
        let uri = input.uri()?;
        let data = input.read().await?;
        items.push(Item::for_shard(&run_id, topic_for(&uri), &uri, &data));
    }
    let total = items.len() as u64;

    // Both topics at once; the job's progress counts the parts committed on both.
    let done = [AtomicU64::new(0), AtomicU64::new(0)];
    let (h, done) = (&handle, &done);
    let report = move |topic: usize, d: u64| {
        done[topic].store(d, Ordering::Relaxed);
        let sum = done[0].load(Ordering::Relaxed) + done[1].load(Ordering::Relaxed);
        h.progress(sum, 2 * total, "input shards tokenized")
    };
    let on = |t: &str| -> Vec<Item> {
        items
            .iter()
            .filter(|i| i.claim.topic == t)
            .cloned()
            .collect()
    };
    let (samples, trajectories) = (on(SAMPLES_TOPIC), on(TRAJECTORIES_TOPIC));
    let (cancel, wait) = (handle.cancel_token(), WaitOptions::default());
    tokio::try_join!(
        fanout::distribute(
            queue.as_ref(),
            SAMPLES_TOPIC,
            &work,
            &samples,
            &cancel,
            &wait,
            move |d, _| report(0, d)
        ),
        fanout::distribute(
            queue.as_ref(),
            TRAJECTORIES_TOPIC,
            &work,
            &trajectories,
            &cancel,
            &wait,
            move |d, _| report(1, d)
        ),
    )?;

    // Parts come in input order, fetched one ahead of the reducer.
    let (ptx, mut prx) = tokio::sync::mpsc::channel::<anyhow::Result<(PartSummary, Bytes)>>(1);
    let parts: Vec<(String, String)> = items
        .iter()
        .map(|i| (i.part.clone(), i.claim.uri.clone()))
        .collect();
    let fetch_work = work.clone();
    let fetcher = tokio::spawn(async move {
        for (part, uri) in parts {
            let got = async {
                let marker: PartSummary = fetch_work
                    .part(&part)
                    .await?
                    .with_context(|| format!("the part of {uri} vanished"))?;
                let key = part_key(&part);
                let data = fetch_work
                    .store
                    .get(&key)
                    .await
                    .with_context(|| format!("{}/{key} (the part of {uri})", fetch_work.uri))?;
                anyhow::Ok((marker, data))
            }
            .await;
            let failed = got.is_err();
            if ptx.send(got).await.is_err() || failed {
                break;
            }
        }
    });
    let uris: Vec<String> = items.iter().map(|i| i.claim.uri.clone()).collect();
    let path = out.path().to_path_buf();
    let (rt, h, cancel) = (
        tokio::runtime::Handle::current(),
        handle.clone(),
        handle.cancel_token(),
    );
    let reduced = tokio::task::spawn_blocking(move || -> anyhow::Result<Manifest> {
        let mut reducer = Reducer::new(&tok, &mixture, &opts, &path)?;
        for (i, uri) in uris.iter().enumerate() {
            anyhow::ensure!(!cancel.is_cancelled(), "cancelled");
            let (marker, data) = prx.blocking_recv().context("the part fetcher stopped")??;
            anyhow::ensure!(
                davinci_core::hash::sha256_hex(&data) == marker.sha256,
                "the part of {uri} is not the one its marker committed"
            );
            let mut r = PartReader::new(&data[..]).with_context(|| format!("part of {uri}"))?;
            while let Some(ev) = r.next_event().with_context(|| format!("part of {uri}"))? {
                reducer.push(ev)?;
            }
            r.check(&marker).with_context(|| format!("part of {uri}"))?;
            rt.block_on(h.progress(total + i as u64 + 1, 2 * total, "parts packed"));
        }
        reducer.finish()
    })
    .await;
    fetcher.abort();
    reduced??;
    out.publish(&s3).await?;
    Ok(vec![format!(
        "{}/manifest.json",
        spec.out.trim_end_matches('/')
    )])
}
