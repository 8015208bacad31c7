//! Partitioned exact and near dedup: the one-process rule of [`Reconstructor::admit`] computed
//! through storage, so no process holds per-document state for the whole corpus.
//!
//! The one-process rule, in input order: a candidate whose (format, text SHA-256) was seen
//! before is a `duplicate`; otherwise it is a `near_duplicate` when it shares an LSH band key
//! with an earlier *kept* candidate of its format whose estimated Jaccard similarity reaches
//! the threshold; otherwise it is kept. Here, with candidates numbered `g` in input order and
//! cut into parts (contiguous ranges of `g`, one per input shard):
//!
//! 1. [`PartitionedDedup::map_part`] (per part): writes each candidate's exact key and band
//!    keys to one of P partitions by hash, and its signature to the part's signature file.
//! 2. [`PartitionedDedup::reduce_exact`] / [`PartitionedDedup::reduce_bands`] (per
//!    partition, memory ∝ that partition's records): every non-first candidate of an exact key
//!    is a duplicate; every pair `(i < j)` sharing a band key is a candidate pair. Both are
//!    routed to the part holding `i` (pairs) or the duplicate.
//! 3. [`PartitionedDedup::join_part`] (per part of `i`): drops pairs whose `i` is an exact
//!    duplicate (never kept, so never compared), attaches `i`'s signature and routes the pair
//!    to `j`'s part.
//! 4. [`PartitionedDedup::resolve_part`] (parts in order): `j` is a duplicate when its key was
//!    seen, a near duplicate when some partner `i` is similar and was kept, kept otherwise.
//!
//! Plain union-find over the pairs (dropping all but the first of each connected component)
//! would differ from the one-process rule on chains: with A~B and B~C but not A~C, the rule
//! keeps A and C (B is dropped, so C is never compared with it). Step 4 therefore walks each
//! `j`'s pairs in input order against what was kept; its only corpus-wide state is the sorted
//! list of near-duplicate numbers (8 bytes per dropped candidate), needed because a dropped
//! `i` may pair with any later `j`.
//!
//! Every step writes its outputs, then a marker under `done/`; a step refuses to start while
//! an input's marker is missing, naming the step to rerun. Outputs are named by (step, part or
//! partition), so a step rerun after a killed worker writes the same objects.
use crate::filters::MinHashLsh;
use crate::pipeline::{Candidate, Verdict};
use bytes::Bytes;
use davinci_runtime::blob::BlobStore;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

/// The shuffle of one dedup job under `prefix` of `store`.
#[derive(Debug, Clone)]
pub struct PartitionedDedup {
    pub store: Arc<dyn BlobStore>,
    pub prefix: String,
    pub partitions: u32,
    lsh: Arc<MinHashLsh>,
}

/// Part `k` holds candidates `starts[k]..starts[k + 1]`; `starts` ends with the total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parts {
    pub starts: Vec<u64>,
}

impl Parts {
    /// Parts of the given sizes, in order.
    pub fn from_counts(counts: &[u64]) -> Self {
        let mut starts = vec![0];
        for c in counts {
            starts.push(starts.last().expect("non-empty") + c);
        }
        Self { starts }
    }

    pub fn len(&self) -> usize {
        self.starts.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The part holding candidate `g`.
    pub fn of(&self, g: u64) -> usize {
        self.starts.partition_point(|&s| s <= g) - 1
    }
}

/// Exact record: format, SHA-256 as 4 words, g.
const EXACT_W: usize = 6;
/// Band record: format << 32 | band, band key, g.
const BAND_W: usize = 3;

fn format_code(c: &Candidate) -> u64 {
    c.sample.source as u64
}

/// Little-endian u64 words, zstd-compressed.
fn encode_words(words: &[u64]) -> anyhow::Result<Bytes> {
    let mut raw = Vec::with_capacity(words.len() * 8);
    for w in words {
        raw.extend_from_slice(&w.to_le_bytes());
    }
    Ok(Bytes::from(zstd::stream::encode_all(&raw[..], 3)?))
}

fn decode_words(key: &str, data: &[u8]) -> anyhow::Result<Vec<u64>> {
    let raw = zstd::stream::decode_all(data)
        .map_err(|e| anyhow::anyhow!("{key}: not a zstd stream: {e}"))?;
    anyhow::ensure!(
        raw.len().is_multiple_of(8),
        "{key}: {} bytes is not a whole number of u64 words",
        raw.len()
    );
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

fn partition_of(h: u64, partitions: u32) -> usize {
    // The high bits: band keys and SHA-256 words are uniform there.
    ((h as u128 * partitions as u128) >> 64) as usize
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Bytes moved by a step, for the scale figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Io {
    pub read: u64,
    pub written: u64,
}

impl std::ops::AddAssign for Io {
    fn add_assign(&mut self, o: Io) {
        self.read += o.read;
        self.written += o.written;
    }
}

impl PartitionedDedup {
    /// `lsh` must be configured as the one-process index is (threshold, permutations).
    pub fn new(store: Arc<dyn BlobStore>, prefix: &str, partitions: u32, lsh: MinHashLsh) -> Self {
        Self {
            store,
            prefix: prefix.trim_end_matches('/').to_string(),
            partitions: partitions.max(1),
            lsh: Arc::new(lsh),
        }
    }

    fn key(&self, rest: &str) -> String {
        if self.prefix.is_empty() {
            rest.to_string()
        } else {
            format!("{}/{rest}", self.prefix)
        }
    }

    async fn put_words(&self, rest: &str, words: &[u64], io: &mut Io) -> anyhow::Result<()> {
        let data = encode_words(words)?;
        io.written += data.len() as u64;
        self.store.put(&self.key(rest), data).await?;
        Ok(())
    }

    async fn get_words(&self, key: &str, io: &mut Io) -> anyhow::Result<Vec<u64>> {
        let data = self.store.get(key).await?;
        io.read += data.len() as u64;
        decode_words(key, &data)
    }

    /// Every object under `rest/` (outputs of several producers).
    async fn get_all(&self, rest: &str, io: &mut Io) -> anyhow::Result<Vec<u64>> {
        let mut out = Vec::new();
        for m in self.store.list(&self.key(&format!("{rest}/"))).await? {
            out.extend(self.get_words(&m.key, io).await?);
        }
        Ok(out)
    }

    async fn mark(&self, step: &str, id: usize) -> anyhow::Result<()> {
        self.store
            .put(&self.key(&format!("done/{step}/{id}")), Bytes::new())
            .await?;
        Ok(())
    }

    /// Fails naming the first of `0..n` that has no `step` marker.
    async fn require(&self, step: &str, n: usize) -> anyhow::Result<()> {
        let done: HashSet<String> = self
            .store
            .list(&self.key(&format!("done/{step}/")))
            .await?
            .into_iter()
            .map(|m| m.key)
            .collect();
        if let Some(id) = (0..n).find(|id| !done.contains(&self.key(&format!("done/{step}/{id}"))))
        {
            anyhow::bail!(
                "dedup step `{step}` {id} under {} has not finished: run it (again) first",
                self.store.uri(&self.prefix)
            );
        }
        Ok(())
    }

    /// Step 1 for part `part`, whose candidates are numbered from `first`.
    pub async fn map_part(
        &self,
        part: usize,
        first: u64,
        candidates: &[Candidate],
    ) -> anyhow::Result<Io> {
        let p = self.partitions as usize;
        let perms = self.lsh.perms();
        let mut exact = vec![Vec::new(); p];
        let mut bands = vec![Vec::new(); p];
        let mut sigs = Vec::with_capacity(candidates.len() * (perms + 1));
        for (n, c) in candidates.iter().enumerate() {
            let g = first + n as u64;
            let f = format_code(c);
            let sha: [u8; 32] = hex::decode(&c.text_sha256)
                .ok()
                .and_then(|k| k.try_into().ok())
                .unwrap_or_else(|| crate::filters::ExactDedup::key(&c.sample.text));
            let words: Vec<u64> = sha
                .chunks_exact(8)
                .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
                .collect();
            exact[partition_of(words[0], self.partitions)]
                .extend([f, words[0], words[1], words[2], words[3], g]);
            anyhow::ensure!(
                c.signature.len() == perms,
                "candidate {}: signature of {} values, the index is configured for {perms}",
                c.sample.id,
                c.signature.len()
            );
            for (b, key) in self.lsh.band_keys(&c.signature).into_iter().enumerate() {
                let tag = (f << 32) | b as u64;
                bands[partition_of(mix(key ^ mix(tag)), self.partitions)].extend([tag, key, g]);
            }
            sigs.push(g);
            sigs.extend_from_slice(&c.signature);
        }
        let mut io = Io::default();
        for (q, words) in exact.iter().enumerate() {
            self.put_words(&format!("exact/{q}/{part}.bin.zst"), words, &mut io)
                .await?;
        }
        for (q, words) in bands.iter().enumerate() {
            self.put_words(&format!("bands/{q}/{part}.bin.zst"), words, &mut io)
                .await?;
        }
        self.put_words(&format!("sigs/{part}.bin.zst"), &sigs, &mut io)
            .await?;
        self.mark("map", part).await?;
        Ok(io)
    }

    /// Step 2, exact half, for partition `q`: duplicates routed to their parts.
    pub async fn reduce_exact(&self, q: usize, parts: &Parts) -> anyhow::Result<Io> {
        self.require("map", parts.len()).await?;
        let mut io = Io::default();
        let words = self.get_all(&format!("exact/{q}"), &mut io).await?;
        let mut recs: Vec<&[u64]> = words.chunks_exact(EXACT_W).collect();
        recs.sort_unstable();
        let mut out: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
        for w in recs.windows(2) {
            if w[0][..EXACT_W - 1] == w[1][..EXACT_W - 1] {
                let g = w[1][EXACT_W - 1];
                out.entry(parts.of(g)).or_default().push(g);
            }
        }
        for (k, gs) in out {
            self.put_words(&format!("dups/{k}/{q}.bin.zst"), &gs, &mut io)
                .await?;
        }
        self.mark("exact", q).await?;
        Ok(io)
    }

    /// Step 2, near half, for partition `q`: every pair sharing a band key, routed to the
    /// part of its earlier member.
    pub async fn reduce_bands(&self, q: usize, parts: &Parts) -> anyhow::Result<Io> {
        self.require("map", parts.len()).await?;
        let mut io = Io::default();
        let words = self.get_all(&format!("bands/{q}"), &mut io).await?;
        let mut recs: Vec<&[u64]> = words.chunks_exact(BAND_W).collect();
        recs.sort_unstable();
        let mut pairs: Vec<(u64, u64)> = Vec::new();
        let mut a = 0;
        while a < recs.len() {
            let mut b = a + 1;
            while b < recs.len() && recs[b][..2] == recs[a][..2] {
                b += 1;
            }
            // Sorted by g within the bucket: each member pairs with every earlier one.
            for x in a..b {
                for y in x + 1..b {
                    pairs.push((recs[x][2], recs[y][2]));
                }
            }
            a = b;
        }
        pairs.sort_unstable();
        pairs.dedup();
        let mut out: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
        for (i, j) in pairs {
            out.entry(parts.of(i)).or_default().extend([i, j]);
        }
        for (k, ws) in out {
            self.put_words(&format!("pairs/{k}/{q}.bin.zst"), &ws, &mut io)
                .await?;
        }
        self.mark("bands", q).await?;
        Ok(io)
    }

    /// Step 3 for part `k` (the part of each pair's earlier member).
    pub async fn join_part(&self, k: usize, parts: &Parts) -> anyhow::Result<Io> {
        let p = self.partitions as usize;
        self.require("exact", p).await?;
        self.require("bands", p).await?;
        let mut io = Io::default();
        let dups: HashSet<u64> = self
            .get_all(&format!("dups/{k}"), &mut io)
            .await?
            .into_iter()
            .collect();
        let mut pairs: Vec<(u64, u64)> = self
            .get_all(&format!("pairs/{k}"), &mut io)
            .await?
            .chunks_exact(2)
            .map(|w| (w[0], w[1]))
            .filter(|(i, _)| !dups.contains(i))
            .collect();
        // A pair sharing several bands comes from several partitions.
        pairs.sort_unstable();
        pairs.dedup();
        let out = if pairs.is_empty() {
            BTreeMap::new()
        } else {
            let perms = self.lsh.perms();
            let sigs = self
                .get_words(&self.key(&format!("sigs/{k}.bin.zst")), &mut io)
                .await?;
            let first = parts.starts[k];
            let mut out: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
            for (i, j) in pairs {
                let at = (i - first) as usize * (perms + 1);
                let rec = sigs
                    .get(at..at + perms + 1)
                    .ok_or_else(|| anyhow::anyhow!("sigs/{k}: no signature for candidate {i}"))?;
                anyhow::ensure!(rec[0] == i, "sigs/{k}: out of order at candidate {i}");
                let o = out.entry(parts.of(j)).or_default();
                o.extend([j, i]);
                o.extend_from_slice(&rec[1..]);
            }
            out
        };
        for (kj, ws) in out {
            self.put_words(&format!("half/{kj}/{k}.bin.zst"), &ws, &mut io)
                .await?;
        }
        self.mark("join", k).await?;
        Ok(io)
    }

    /// Deletes every object of an earlier job under the prefix: a stale marker or output
    /// would otherwise be read as this job's.
    pub async fn clear(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.prefix.is_empty(),
            "dedup prefix is empty: refusing to clear the whole store"
        );
        for m in self.store.list(&self.key("")).await? {
            self.store.delete(&m.key).await?;
        }
        Ok(())
    }

    /// Steps 2 and 3 in this process, one partition or part at a time (a distributed run
    /// hands each call to a worker instead).
    pub async fn shuffle(&self, parts: &Parts) -> anyhow::Result<Io> {
        let mut io = Io::default();
        for q in 0..self.partitions as usize {
            io += self.reduce_exact(q, parts).await?;
            io += self.reduce_bands(q, parts).await?;
        }
        for k in 0..parts.len() {
            io += self.join_part(k, parts).await?;
        }
        Ok(io)
    }

    /// Keeps part `k`'s candidates beside its dedup keys until [`Self::get_candidates`] reads
    /// them back for resolution.
    pub async fn put_candidates(&self, k: usize, candidates: &[Candidate]) -> anyhow::Result<Io> {
        let enc = davinci_runtime::shard::encode_shard(candidates)?;
        let io = Io {
            read: 0,
            written: enc.data.len() as u64,
        };
        self.store
            .put(&self.key(&format!("candidates/{k}.jsonl.zst")), enc.data)
            .await?;
        Ok(io)
    }

    pub async fn get_candidates(&self, k: usize) -> anyhow::Result<(Vec<Candidate>, Io)> {
        let key = self.key(&format!("candidates/{k}.jsonl.zst"));
        let data = self.store.get(&key).await?;
        let cands = davinci_runtime::shard::decode_jsonl_zst(&data)
            .map_err(|e| anyhow::anyhow!("{}: {e}", self.store.uri(&key)))?;
        Ok((
            cands,
            Io {
                read: data.len() as u64,
                written: 0,
            },
        ))
    }

    /// Checks that every step before [`Self::resolve_part`] finished.
    pub async fn ready_to_resolve(&self, parts: &Parts) -> anyhow::Result<()> {
        self.require("join", parts.len()).await
    }

    /// Step 4 for part `k`; call for parts in order with the same `state`. Returns the verdict
    /// of each of the part's candidates, in order.
    pub async fn resolve_part(
        &self,
        k: usize,
        parts: &Parts,
        state: &mut Resolution,
    ) -> anyhow::Result<(Vec<Verdict>, Io)> {
        anyhow::ensure!(
            k == state.next_part,
            "parts resolve in order: expected part {}, got {k}",
            state.next_part
        );
        let mut io = Io::default();
        let dups: HashSet<u64> = self
            .get_all(&format!("dups/{k}"), &mut io)
            .await?
            .into_iter()
            .collect();
        let perms = self.lsh.perms();
        let half = self.get_all(&format!("half/{k}"), &mut io).await?;
        let mut partners: Vec<&[u64]> = half.chunks_exact(perms + 2).collect();
        partners.sort_unstable_by_key(|r| (r[0], r[1]));
        let (first, end) = (parts.starts[k], parts.starts[k + 1]);
        let sigs = if partners.is_empty() {
            Vec::new()
        } else {
            self.get_words(&self.key(&format!("sigs/{k}.bin.zst")), &mut io)
                .await?
        };
        let mut verdicts = Vec::with_capacity((end - first) as usize);
        let mut at = 0;
        for g in first..end {
            let mut near = false;
            while at < partners.len() && partners[at][0] == g {
                let r = partners[at];
                at += 1;
                if near || dups.contains(&g) || state.near.binary_search(&r[1]).is_ok() {
                    continue;
                }
                let o = (g - first) as usize * (perms + 1);
                let sig = &sigs[o + 1..o + 1 + perms];
                near = self.lsh.similar(sig, &r[2..]);
            }
            verdicts.push(if dups.contains(&g) {
                Verdict::Duplicate
            } else if near {
                state.near.push(g);
                Verdict::NearDuplicate
            } else {
                Verdict::Keep
            });
        }
        state.next_part += 1;
        Ok((verdicts, io))
    }
}

/// What [`PartitionedDedup::resolve_part`] carries from one part to the next.
#[derive(Debug, Clone, Default)]
pub struct Resolution {
    next_part: usize,
    /// Near duplicates so far, ascending.
    near: Vec<u64>,
}
