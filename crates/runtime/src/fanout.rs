//! One stage job shared by every replica of its service.
//!
//! The job that a stage's Start RPC created is the *coordinator*: it writes the stage spec into
//! a work directory, publishes one claim check per input shard on the stage's topic, and waits
//! until every input has a *part marker*. Workers on any replica take the claims, write their
//! outputs, then the marker (the commit point of that input), then ack. The coordinator finally
//! reduces the parts in input order, so what a stage writes does not depend on which replica
//! handled which input, or on how often an input was handled.
//!
//! Inputs already committed are not published again: a restarted coordinator picks up where the
//! last one stopped. An input that used up its attempts ends in `{topic}:dlq`; the coordinator
//! sees it there and fails the job with that input's error instead of waiting forever.
use crate::blob::{self, BlobError, BlobStore, S3Config};
use crate::queue::{ClaimCheck, Delivery, WorkQueue};
use crate::retry::{PermanentExt, is_permanent};
use crate::shard;
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const SPEC_KEY: &str = "spec.json";
const PARTS: &str = "parts/";

/// A stage job's work directory: its spec and one marker per committed input.
#[derive(Debug, Clone)]
pub struct Work {
    pub uri: String,
    pub store: Arc<dyn BlobStore>,
}

impl Work {
    pub async fn open(uri: &str, s3: &S3Config) -> anyhow::Result<Self> {
        let uri = uri.trim_end_matches('/').to_string();
        let store = blob::open(&uri, s3)
            .await
            .map_err(|e| anyhow::anyhow!("opening work directory {uri}: {e}"))?;
        Ok(Self { uri, store })
    }

    /// `{root}/runs/{run}/work/{stage}-{spec hash}`: one directory per run, stage and spec, so a
    /// changed spec never reuses parts made under another.
    pub fn dir_uri(root: &str, run_id: &str, stage: &str, spec: &impl Serialize) -> String {
        let spec = serde_json::to_vec(spec).expect("a stage spec serializes");
        format!(
            "{}/runs/{run_id}/work/{stage}-{}",
            root.trim_end_matches('/'),
            &shard::sha256_hex(&spec)[..12]
        )
    }

    /// The work directory for a stage job writing to `out`: [`Self::dir_uri`] when `out` lies
    /// in `{root}/runs/{run_id}`, else `{out}/work/{stage}-{spec hash}`.
    pub fn dir_for(out: &str, run_id: &str, stage: &str, spec: &impl Serialize) -> String {
        let out = out.trim_end_matches('/');
        let marker = format!("/runs/{run_id}");
        match out
            .find(&format!("{marker}/"))
            .or_else(|| out.ends_with(&marker).then(|| out.len() - marker.len()))
        {
            Some(i) if !run_id.is_empty() => Self::dir_uri(&out[..i], run_id, stage, spec),
            _ => {
                let spec = serde_json::to_vec(spec).expect("a stage spec serializes");
                format!("{out}/work/{stage}-{}", &shard::sha256_hex(&spec)[..12])
            }
        }
    }

    pub async fn put_spec<T: Serialize>(&self, spec: &T) -> anyhow::Result<()> {
        self.store
            .put(SPEC_KEY, Bytes::from(serde_json::to_vec_pretty(spec)?))
            .await?;
        Ok(())
    }

    pub async fn spec<T: DeserializeOwned>(&self) -> anyhow::Result<T> {
        let data = self
            .store
            .get(SPEC_KEY)
            .await
            .map_err(|e| anyhow::anyhow!("{}/{SPEC_KEY}: {e}", self.uri))?;
        serde_json::from_slice(&data).map_err(|e| anyhow::anyhow!("{}/{SPEC_KEY}: {e}", self.uri))
    }

    fn part_key(name: &str) -> String {
        format!("{PARTS}{name}.json")
    }

    /// Writes `name`'s marker: call it after the input's outputs are written.
    pub async fn commit_part<T: Serialize>(&self, name: &str, part: &T) -> anyhow::Result<()> {
        self.store
            .put(
                &Self::part_key(name),
                Bytes::from(serde_json::to_vec(part)?),
            )
            .await?;
        Ok(())
    }

    /// `name`'s marker, when that input is committed.
    pub async fn part<T: DeserializeOwned>(&self, name: &str) -> anyhow::Result<Option<T>> {
        match self.store.get(&Self::part_key(name)).await {
            Ok(b) => Ok(Some(serde_json::from_slice(&b).map_err(|e| {
                anyhow::anyhow!("{}/{}: {e}", self.uri, Self::part_key(name))
            })?)),
            Err(BlobError::NotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Names of the committed inputs.
    pub async fn committed(&self) -> anyhow::Result<BTreeSet<String>> {
        Ok(self
            .store
            .list(PARTS)
            .await?
            .into_iter()
            .filter_map(|m| {
                m.key
                    .strip_prefix(PARTS)
                    .and_then(|k| k.strip_suffix(".json"))
                    .map(str::to_string)
            })
            .collect())
    }
}

/// One input of a stage job: the claim check workers get, and the name of its part.
#[derive(Debug, Clone)]
pub struct Item {
    pub part: String,
    pub claim: ClaimCheck,
}

impl Item {
    /// An input shard at `uri` with its content: the part is named after the content, so the
    /// same shard is one part however it is listed. The claim counts the shard's records (0
    /// when it cannot be read: it still goes out, and its worker fails it into the DLQ).
    pub fn for_shard(run_id: &str, topic: &str, uri: &str, data: &[u8]) -> Self {
        let sha256 = shard::sha256_hex(data);
        let records = count_records(uri, data);
        Self {
            part: format!(
                "{}-{}",
                &shard::sha256_hex(uri.as_bytes())[..12],
                &sha256[..12]
            ),
            claim: ClaimCheck {
                run_id: run_id.to_string(),
                topic: topic.to_string(),
                uri: uri.to_string(),
                sha256,
                records,
                traceparent: crate::telemetry::current_traceparent(),
                work: None,
                part: None,
            },
        }
    }
}

/// Non-blank lines of a JSONL shard, zstd-compressed when `uri` ends in `.zst`.
fn count_records(uri: &str, data: &[u8]) -> u64 {
    fn lines(r: impl std::io::BufRead) -> u64 {
        r.split(b'\n')
            .map_while(Result::ok)
            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
            .count() as u64
    }
    if uri.ends_with(".zst") {
        zstd::Decoder::new(data)
            .map(|d| lines(std::io::BufReader::new(d)))
            .unwrap_or(0)
    } else {
        lines(data)
    }
}

/// How a coordinator waits.
#[derive(Debug, Clone)]
pub struct WaitOptions {
    pub poll: Duration,
    /// How often the dead-letter stream is checked for this job's inputs.
    pub dlq_every: Duration,
    /// A dead-lettered input fails the job (true), or is reported and the job goes on (false:
    /// for stages where one bad input, like one unreachable repository, must not stop the rest).
    pub fail_on_dead_letter: bool,
}

impl Default for WaitOptions {
    fn default() -> Self {
        Self {
            poll: Duration::from_millis(250),
            dlq_every: Duration::from_secs(2),
            fail_on_dead_letter: true,
        }
    }
}

/// An input that used up its attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed {
    pub uri: String,
    pub part: String,
    pub attempts: u32,
    pub error: String,
}

/// Publishes the inputs not yet committed and waits until every input is committed (or, with
/// `fail_on_dead_letter` off, dead-lettered: those come back). `progress` sees (finished, total)
/// whenever that changes (awaited, so it may report to a job). Fails when the job is cancelled.
#[allow(clippy::too_many_arguments)]
pub async fn distribute<P, Fut>(
    queue: &dyn WorkQueue,
    topic: &str,
    work: &Work,
    items: &[Item],
    cancel: &CancellationToken,
    opts: &WaitOptions,
    mut progress: P,
) -> anyhow::Result<Vec<Failed>>
where
    P: FnMut(u64, u64) -> Fut + Send,
    Fut: Future<Output = ()> + Send,
{
    let total = items.len() as u64;
    let mut failed: Vec<Failed> = Vec::new();
    let committed = work.committed().await?;
    for it in items.iter().filter(|it| !committed.contains(&it.part)) {
        let mut claim = it.claim.clone();
        claim.topic = topic.to_string();
        claim.work = Some(work.uri.clone());
        claim.part = Some(it.part.clone());
        queue.publish(topic, &claim.to_payload()).await?;
    }
    let mut last = u64::MAX;
    let mut dlq_checked = Instant::now();
    loop {
        let committed = work.committed().await?;
        failed.retain(|f| !committed.contains(&f.part));
        let done = items
            .iter()
            .filter(|it| committed.contains(&it.part))
            .count() as u64
            + failed.len() as u64;
        if done != last {
            progress(done, total).await;
            last = done;
        }
        if done == total {
            return Ok(failed);
        }
        if dlq_checked.elapsed() >= opts.dlq_every {
            dlq_checked = Instant::now();
            for d in queue.dead_letters(topic).await? {
                let Ok(c) = ClaimCheck::from_payload(&d.payload) else {
                    continue;
                };
                if c.work.as_deref() == Some(work.uri.as_str())
                    && let Some(p) = &c.part
                    && !committed.contains(p)
                    && !failed.iter().any(|f| &f.part == p)
                {
                    anyhow::ensure!(
                        !opts.fail_on_dead_letter,
                        "input {} failed {} times (dead-lettered on `{topic}:dlq`): {}",
                        c.uri,
                        d.attempts,
                        d.error
                    );
                    failed.push(Failed {
                        uri: c.uri.clone(),
                        part: p.clone(),
                        attempts: d.attempts,
                        error: d.error.clone(),
                    });
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => anyhow::bail!("cancelled"),
            _ = tokio::time::sleep(opts.poll) => {}
        }
    }
}

/// Reads a claim's input shard and checks it against the claim's SHA-256. An input that is
/// gone or changed fails permanently: reading it again gives the same answer.
pub async fn read_input(claim: &ClaimCheck, s3: &S3Config) -> anyhow::Result<(String, Bytes)> {
    let (dir, name) = claim
        .uri
        .rsplit_once('/')
        .ok_or_else(|| anyhow::anyhow!("claim check uri `{}` names no object", claim.uri))
        .permanent()?;
    let store = blob::open(dir, s3).await?;
    let data = match store.get(name).await {
        Ok(d) => d,
        Err(e @ BlobError::NotFound(_)) => {
            return Err(anyhow::anyhow!("{}: {e}", claim.uri)).permanent();
        }
        Err(e) => anyhow::bail!("{}: {e}", claim.uri),
    };
    let actual = shard::sha256_hex(&data);
    if !actual.eq_ignore_ascii_case(&claim.sha256) {
        return Err(anyhow::anyhow!(
            "{}: content changed since it was announced (sha256 {actual}, claim {})",
            claim.uri,
            claim.sha256
        ))
        .permanent();
    }
    Ok((name.to_string(), data))
}

/// A claim check of a stage job, with its work directory opened.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub claim: ClaimCheck,
    pub work: Work,
    pub part: String,
}

/// Takes `topic`'s claims until `shutdown`. An input whose part is already committed is acked
/// untouched (a redelivery after the worker died between commit and ack); otherwise `handle`
/// writes its outputs and the marker. A permanent failure ([`crate::retry::permanent`]) goes to
/// the dead-letter stream at once with its error; any other is nacked with it, to be retried
/// after the queue's backoff and dead-lettered after its last attempt. Either way the worker
/// goes on. While `handle` runs, the item's lease is extended every third of the visibility
/// timeout, so a long item stays with this worker instead of being started again by another
/// replica.
pub async fn serve_topic<F, Fut>(
    queue: Arc<dyn WorkQueue>,
    topic: &str,
    consumer: &str,
    s3: S3Config,
    shutdown: CancellationToken,
    mut handle: F,
) -> anyhow::Result<u64>
where
    F: FnMut(Claimed) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut done = 0u64;
    // Sampled while this worker runs, however it returns.
    let gauges = shutdown.child_token();
    tokio::spawn(crate::queue::sample_gauges(
        queue.clone(),
        topic.to_string(),
        GAUGE_EVERY,
        gauges.clone(),
    ));
    let _stop_gauges = gauges.drop_guard();
    while !shutdown.is_cancelled() {
        let delivery = tokio::select! {
            d = queue.receive(topic, consumer, Duration::from_secs(2)) => d?,
            _ = shutdown.cancelled() => break,
        };
        let Some(d) = delivery else { continue };
        let beating = CancellationToken::new();
        let beat = tokio::spawn(heartbeat(queue.clone(), d.clone(), beating.clone()));
        // Stops the heartbeat also when this future is dropped mid-item.
        let guard = beating.drop_guard();
        let result = take(&d, &s3, &mut handle).await;
        drop(guard);
        // Waits out an extend in flight, so it cannot race the ack below.
        let _ = beat.await;
        match result {
            Ok(()) => {
                queue.ack(&d).await?;
                done += 1;
            }
            Err(e) if is_permanent(&e) => {
                let error = format!("{e:#}");
                tracing::warn!(
                    topic,
                    id = %d.id,
                    attempt = d.attempt,
                    error = %error,
                    "work item failed permanently; dead-lettered without a retry"
                );
                queue.dead_letter(&d, &error).await?;
            }
            Err(e) => {
                let error = format!("{e:#}");
                let delay = queue.retry_delay(d.attempt);
                tracing::warn!(
                    topic,
                    id = %d.id,
                    attempt = d.attempt,
                    retry_in_ms = delay.as_millis() as u64,
                    error = %error,
                    "work item failed"
                );
                queue.nack(&d, &error, Some(delay)).await?;
            }
        }
    }
    Ok(done)
}

/// How often a worker samples its topic's backlog and dead letters for Prometheus.
const GAUGE_EVERY: Duration = Duration::from_secs(5);

/// Extends `d`'s lease every third of the visibility timeout until `stop`.
async fn heartbeat(queue: Arc<dyn WorkQueue>, d: Delivery, stop: CancellationToken) {
    let every = queue.visibility_timeout() / 3;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match queue.extend(&d).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(
                    topic = d.topic,
                    id = %d.id,
                    attempt = d.attempt,
                    "work item lease lost: another consumer took it over, or the queue lost it"
                );
                return;
            }
            // A queue outage: the next beat tries again, the lease may still hold.
            Err(e) => {
                tracing::warn!(topic = d.topic, id = %d.id, error = %e, "extending a work item's lease failed")
            }
        }
    }
}

async fn take<F, Fut>(d: &Delivery, s3: &S3Config, handle: &mut F) -> anyhow::Result<()>
where
    F: FnMut(Claimed) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let claim = ClaimCheck::from_payload(&d.payload).permanent()?;
    let (Some(work), Some(part)) = (claim.work.clone(), claim.part.clone()) else {
        return Err(anyhow::anyhow!(
            "claim check for {} names no work directory or part: publish inputs through a stage job",
            claim.uri
        ))
        .permanent();
    };
    let work = Work::open(&work, s3).await?;
    if work.part::<serde_json::Value>(&part).await?.is_some() {
        tracing::debug!(part, "already committed");
        return Ok(());
    }
    handle(Claimed { claim, work, part }).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_dirs_sit_under_the_run() {
        let a = Work::dir_for("s3://b/p/runs/r1/packed", "r1", "pack", &1);
        assert!(a.starts_with("s3://b/p/runs/r1/work/pack-"), "{a}");
        assert_eq!(a, Work::dir_for("s3://b/p/runs/r1", "r1", "pack", &1));
        assert_ne!(a, Work::dir_for("s3://b/p/runs/r1", "r1", "pack", &2));
        let b = Work::dir_for("file:///tmp/out", "r1", "pack", &1);
        assert!(b.starts_with("file:///tmp/out/work/pack-"), "{b}");
    }
}
