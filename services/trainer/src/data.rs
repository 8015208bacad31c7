//! Packed shards as training rows: the packer's `manifest.json` (`davinci.packed/v1`), its
//! Megatron `.bin/.idx` shards and `.mask.{bin,idx}` sidecars.
//!
//! One Megatron *document* is one packed bin and becomes one training row; its Megatron
//! *sequences* are the source documents, which keep their boundaries (positions restart, no
//! attention across them). Everything is checked when the data is opened, before any training:
//! missing or truncated files, masks that do not line up with their shards, counts that differ
//! from the manifest, token ids outside the model's vocabulary.
use anyhow::{Context, ensure};
use davinci_core::megatron::{DType, MegatronIndex};
use davinci_model::Row;
use davinci_model::rng::SplitMix64;
use std::path::{Path, PathBuf};

pub use davinci_core::packed::{
    DatasetEntry, MANIFEST_SCHEMA, Manifest, MaskMode, ShardInfo, StageEntry, TokenizerInfo,
};

/// Reads and checks `manifest.json` (the packer writes it last: its absence means the pack
/// did not finish).
pub fn read_manifest(path: &Path) -> anyhow::Result<Manifest> {
    let bytes = std::fs::read(path).with_context(|| {
        format!(
            "reading the manifest {} (the packer writes it last; is the pack finished?)",
            path.display()
        )
    })?;
    Manifest::from_json(&bytes).with_context(|| format!("{}", path.display()))
}

/// One shard's ids and mask, read and checked against each other and the manifest.
#[derive(Debug)]
pub struct Shard {
    pub prefix: String,
    index: MegatronIndex,
    mask_index: MegatronIndex,
    bin: Vec<u8>,
    mask_bin: Vec<u8>,
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading shard file {}", path.display()))
}

impl Shard {
    pub fn open(root: &Path, info: &ShardInfo, vocab: usize) -> anyhow::Result<Self> {
        let p = |ext: &str| root.join(format!("{}{ext}", info.prefix));
        let index = MegatronIndex::parse(&read(&p(".idx"))?)
            .with_context(|| format!("{}.idx", info.prefix))?;
        let mask_index = MegatronIndex::parse(&read(&p(".mask.idx"))?)
            .with_context(|| format!("{}.mask.idx", info.prefix))?;
        let bin = read(&p(".bin"))?;
        let mask_bin = read(&p(".mask.bin"))?;
        let name = &info.prefix;
        let expect_bytes = |ix: &MegatronIndex| {
            ix.lengths.iter().map(|&l| l as u64).sum::<u64>() * ix.dtype.size() as u64
        };
        ensure!(
            bin.len() as u64 == expect_bytes(&index),
            "{name}.bin has {} bytes, its .idx describes {} (truncated or not this shard's data)",
            bin.len(),
            expect_bytes(&index)
        );
        ensure!(
            mask_index.dtype == DType::U8,
            "{name}.mask.idx is not uint8"
        );
        ensure!(
            mask_bin.len() as u64 == expect_bytes(&mask_index),
            "{name}.mask.bin has {} bytes, its .idx describes {}",
            mask_bin.len(),
            expect_bytes(&mask_index)
        );
        ensure!(
            mask_index.lengths == index.lengths && mask_index.doc_indices == index.doc_indices,
            "{name}.mask does not line up with {name} (different sequence lengths or bins)"
        );
        ensure!(
            index.lengths.len() as u64 == info.sequences && index.documents() as u64 == info.bins,
            "{name}: {} sequences in {} bins, the manifest says {} in {}",
            index.lengths.len(),
            index.documents(),
            info.sequences,
            info.bins
        );
        let shard = Shard {
            prefix: info.prefix.clone(),
            index,
            mask_index,
            bin,
            mask_bin,
        };
        let max = shard.max_id()?;
        ensure!(
            (max as usize) < vocab,
            "{name}: token id {max} is outside the model's vocabulary of {vocab} (wrong tokenizer for this model?)"
        );
        Ok(shard)
    }

    fn max_id(&self) -> anyhow::Result<u32> {
        let mut max = 0;
        for i in 0..self.index.lengths.len() {
            if let Some(&m) = self.index.sequence(&self.bin, i)?.iter().max() {
                max = max.max(m);
            }
        }
        Ok(max)
    }

    pub fn bins(&self) -> usize {
        self.index.documents()
    }

    /// Bin `b` as a training row.
    pub fn row(&self, b: usize) -> anyhow::Result<Row> {
        let mut row = Row::default();
        for s in self.index.document(b) {
            let ids = self.index.sequence(&self.bin, s)?;
            let mask = self.mask_index.sequence(&self.mask_bin, s)?;
            row.doc_lens.push(ids.len());
            row.tokens.extend(ids);
            row.mask.extend(mask.into_iter().map(|m| u8::from(m != 0)));
        }
        Ok(row)
    }
}

/// Rows of one epoch per dataset of `stage`: `upsample × bins`, or, when the stage gives
/// explicit weights, each dataset's share of the stage's bins (both engines count steps so).
pub fn epoch_rows(stage: &StageEntry) -> Vec<u64> {
    let total: u64 = stage.datasets.iter().map(|d| d.bins).sum();
    let wsum: f64 = stage.datasets.iter().filter_map(|d| d.weight).sum();
    stage
        .datasets
        .iter()
        .map(|d| {
            if d.bins == 0 {
                0
            } else if wsum > 0.0 {
                (d.weight.unwrap_or(0.0) / wsum * total as f64).round() as u64
            } else {
                (d.upsample * d.bins as f64).round().max(1.0) as u64
            }
        })
        .collect()
}

/// Where a row comes from: (dataset, shard within it, bin within the shard).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowRef {
    pub dataset: usize,
    pub shard: usize,
    pub bin: usize,
}

/// One manifest stage, opened: its shards and its rows per epoch after upsampling / weights.
#[derive(Debug)]
pub struct StageData {
    pub name: String,
    pub assistant_only: bool,
    pub datasets: Vec<(String, Vec<Shard>)>,
    /// Rows of one epoch per dataset, before shuffling.
    counts: Vec<u64>,
    seed: u64,
}

impl StageData {
    pub fn open(root: &Path, stage: &StageEntry, vocab: usize, seed: u64) -> anyhow::Result<Self> {
        let assistant_only = stage.mask == MaskMode::AssistantOnly;
        let mut datasets = Vec::new();
        for d in &stage.datasets {
            let shards = d
                .shards
                .iter()
                .map(|s| Shard::open(root, s, vocab))
                .collect::<anyhow::Result<Vec<_>>>()
                .with_context(|| format!("stage {} dataset {}", stage.name, d.name))?;
            datasets.push((d.name.clone(), shards));
        }
        let counts = epoch_rows(stage);
        Ok(Self {
            name: stage.name.clone(),
            assistant_only,
            datasets,
            counts,
            seed,
        })
    }

    pub fn rows_per_epoch(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The rows of `epoch` in training order: whole passes over each dataset, a seeded draw
    /// without replacement for a fractional pass, then one seeded shuffle of the stage.
    pub fn epoch_plan(&self, stage_index: usize, epoch: u64) -> Vec<RowRef> {
        let mut rng = SplitMix64::new(
            self.seed ^ (stage_index as u64).wrapping_mul(0x9E37_79B9) ^ epoch.rotate_left(32),
        );
        let mut plan = Vec::new();
        for (di, ((_, shards), &count)) in self.datasets.iter().zip(&self.counts).enumerate() {
            let all: Vec<RowRef> = shards
                .iter()
                .enumerate()
                .flat_map(|(si, s)| {
                    (0..s.bins()).map(move |bin| RowRef {
                        dataset: di,
                        shard: si,
                        bin,
                    })
                })
                .collect();
            if all.is_empty() {
                continue;
            }
            let n = all.len() as u64;
            for _ in 0..count / n {
                plan.extend_from_slice(&all);
            }
            let mut rest = all;
            rng.shuffle(&mut rest);
            rest.truncate((count % n) as usize);
            plan.extend(rest);
        }
        rng.shuffle(&mut plan);
        plan
    }

    pub fn row(&self, r: RowRef) -> anyhow::Result<Row> {
        self.datasets[r.dataset].1[r.shard].row(r.bin)
    }
}

/// The manifest's directory: shard prefixes are relative to it.
pub fn data_root(manifest: &Path) -> PathBuf {
    manifest
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}
