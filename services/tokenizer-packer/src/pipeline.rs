//! The pack job: read sample/trajectory JSONL shards, tokenize on all cores (the map step,
//! [`crate::part`]), pack per (stage, dataset) and write Megatron shards (the reduce step,
//! [`Reducer`]), and write `manifest.json` last (the commit point).
use crate::input::{Input, Progress};
use crate::mixture::Mixture;
use crate::packing::{PackConfig, PackStats, Packer};
use crate::part::{Event, MapSpec, Mapper};
use crate::shards::{Doc, ShardWriter};
use anyhow::Context;
use davinci_core::megatron::DType;
use davinci_core::sample::SampleSource;
use davinci_tokenize::Tokenizer;
use davinci_tokenize::chat::MaskMode;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

pub use davinci_core::packed::MANIFEST_SCHEMA;

/// Knobs of a pack job besides the mixture.
#[derive(Debug, Clone)]
pub struct PackOptions {
    pub pack: PackConfig,
    /// A shard is closed once its `.bin` reaches this size.
    pub shard_bytes: u64,
    /// Records tokenized together on the thread pool.
    pub batch: usize,
    /// EOD token; `None` uses the tokenizer's end-of-text token.
    pub eod: Option<String>,
    /// Name recorded in the manifest (e.g. the tokenizer path or URI).
    pub tokenizer_name: String,
    /// Where trainers find the shards, for the blend's prefixes (default: the output
    /// directory; the output URI when the directory only stages an upload).
    pub data_root: Option<String>,
}

impl Default for PackOptions {
    fn default() -> Self {
        Self {
            pack: PackConfig::default(),
            shard_bytes: 512 << 20,
            batch: 512,
            eod: None,
            tokenizer_name: "tokenizer.json".into(),
            data_root: None,
        }
    }
}

pub use davinci_core::packed::{DatasetEntry, Manifest, StageEntry, TokenizerInfo};

struct Slot {
    stage: usize,
    source: SampleSource,
    mask: MaskMode,
    packer: Packer<Doc>,
    writer: ShardWriter,
    loss_tokens: u64,
    drops: BTreeMap<String, u64>,
}

/// The end-of-document token: `eod` when given, else the tokenizer's end-of-text token.
pub fn resolve_eod(tok: &Tokenizer, eod: Option<&str>) -> anyhow::Result<(String, u32)> {
    match eod {
        Some(t) => Ok((
            t.to_string(),
            tok.token_to_id(t)
                .with_context(|| format!("EOD token `{t}` is not in the tokenizer"))?,
        )),
        None => tok
            .default_eod()
            .context("the tokenizer has no end-of-text token; pass --eod"),
    }
}

/// The REDUCE step: takes the map step's events of every input, in input order, packs the
/// documents per (stage, dataset) and writes the shards into a local directory; `finish`
/// writes the manifest last.
pub struct Reducer {
    mixture: Mixture,
    opts: PackOptions,
    out: PathBuf,
    tokenizer: TokenizerInfo,
    dtype: DType,
    slots: Vec<Slot>,
    records: BTreeMap<String, u64>,
    drops: BTreeMap<String, u64>,
    bins: Vec<Vec<Doc>>,
}

impl Reducer {
    pub fn new(
        tok: &Tokenizer,
        mixture: &Mixture,
        opts: &PackOptions,
        out: &Path,
    ) -> anyhow::Result<Self> {
        mixture.validate()?;
        let (eod_token, eod_id) = resolve_eod(tok, opts.eod.as_deref())?;
        let dtype = DType::for_vocab(tok.vocab_size());
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let mut slots = Vec::new();
        for (si, st) in mixture.stages.iter().enumerate() {
            for d in &st.datasets {
                slots.push(Slot {
                    stage: si,
                    source: d.source,
                    mask: st.mask,
                    packer: Packer::new(opts.pack.clone()),
                    writer: ShardWriter::new(
                        out,
                        format!("{}/{}", st.name, d.source.as_str()),
                        dtype,
                        opts.shard_bytes,
                    ),
                    loss_tokens: 0,
                    drops: BTreeMap::new(),
                });
            }
        }
        Ok(Self {
            mixture: mixture.clone(),
            opts: opts.clone(),
            out: out.to_path_buf(),
            tokenizer: TokenizerInfo {
                name: opts.tokenizer_name.clone(),
                sha256: tok.sha256().into(),
                vocab_size: tok.vocab_size(),
                eod_token,
                eod_id,
                engine: format!("{:?}", tok.engine()),
            },
            dtype,
            slots,
            records: BTreeMap::new(),
            drops: BTreeMap::new(),
            bins: Vec::new(),
        })
    }

    /// The EOD id documents end with.
    pub fn eod(&self) -> u32 {
        self.tokenizer.eod_id
    }

    fn write_bins(slot: &mut Slot, bins: &mut Vec<Vec<Doc>>) -> anyhow::Result<()> {
        for b in bins.drain(..) {
            slot.loss_tokens += b
                .iter()
                .map(|d| d.mask.iter().map(|&m| m as u64).sum::<u64>())
                .sum::<u64>();
            slot.writer.write_bin(&b).context("writing shard")?;
        }
        Ok(())
    }

    pub fn push(&mut self, ev: Event) -> anyhow::Result<()> {
        match ev {
            Event::Dropped(why) => *self.drops.entry(why.into_owned()).or_default() += 1,
            Event::Record(source) => *self.records.entry(source.as_str().into()).or_default() += 1,
            Event::Doc(source, mode, doc) => {
                let n = self
                    .slots
                    .iter()
                    .filter(|s| s.source == source && s.mask == mode)
                    .count();
                let mut doc = Some(doc);
                let mut seen = 0;
                for slot in self
                    .slots
                    .iter_mut()
                    .filter(|s| s.source == source && s.mask == mode)
                {
                    seen += 1;
                    // The last dataset that packs the document takes it; the others copy.
                    let d = if seen == n {
                        doc.take().expect("taken once")
                    } else {
                        doc.clone().expect("not taken yet")
                    };
                    slot.packer.push(d, &mut self.bins);
                    Self::write_bins(slot, &mut self.bins)?;
                }
            }
        }
        Ok(())
    }

    /// Closes every packer and shard, then writes `manifest.json` (the commit point).
    pub fn finish(mut self) -> anyhow::Result<Manifest> {
        let mut per_stage: Vec<Vec<DatasetEntry>> = vec![Vec::new(); self.mixture.stages.len()];
        for mut slot in std::mem::take(&mut self.slots) {
            slot.packer.finish(&mut self.bins);
            Self::write_bins(&mut slot, &mut self.bins)?;
            let st: PackStats = slot.packer.stats().clone();
            if st.dropped_too_long > 0 {
                slot.drops.insert("too_long".into(), st.dropped_too_long);
            }
            if st.dropped_empty > 0 {
                slot.drops.insert("empty".into(), st.dropped_empty);
            }
            let stage = &self.mixture.stages[slot.stage];
            let dref = stage
                .datasets
                .iter()
                .find(|d| d.source == slot.source)
                .expect("slot from mixture");
            per_stage[slot.stage].push(DatasetEntry {
                name: slot.source.as_str().into(),
                prefix: format!("{}/{}", stage.name, slot.source.as_str()),
                mask: slot.mask,
                upsample: dref.upsample,
                weight: dref.weight,
                documents: st.documents,
                tokens: st.tokens,
                bins: st.bins,
                padding_ratio: st.padding_ratio(self.opts.pack.seq_len),
                split_documents: st.split_documents,
                loss_tokens: slot.loss_tokens,
                drops: slot.drops,
                shards: slot.writer.finish().context("closing shards")?,
            });
        }
        let root = self
            .opts
            .data_root
            .clone()
            .unwrap_or_else(|| self.out.display().to_string());
        let stages = self
            .mixture
            .stages
            .iter()
            .zip(per_stage)
            .map(|(s, datasets)| stage_entry(s.name.clone(), s.mask, datasets, &root))
            .collect();
        let manifest = Manifest {
            schema: MANIFEST_SCHEMA.into(),
            tokenizer: self.tokenizer,
            seq_len: self.opts.pack.seq_len,
            seed: self.opts.pack.seed,
            dtype: self.dtype,
            long_docs: self.opts.pack.long_docs,
            stages,
            records: self.records,
            drops: self.drops,
        };
        let json = serde_json::to_vec_pretty(&manifest)?;
        let tmp = self.out.join("manifest.json.tmp");
        std::fs::write(&tmp, &json).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, self.out.join("manifest.json"))?;
        Ok(manifest)
    }
}

/// Runs a pack job in this process into the local directory `out`: each input mapped in turn,
/// its events reduced at once. Returns the manifest it wrote last.
pub fn run(
    tok: &Tokenizer,
    mixture: &Mixture,
    opts: &PackOptions,
    inputs: &[Input],
    out: &Path,
    progress: &mut dyn FnMut(&Progress),
    cancel: &AtomicBool,
) -> anyhow::Result<Manifest> {
    let mut reducer = Reducer::new(tok, mixture, opts, out)?;
    let spec = MapSpec::new(tok, &opts.tokenizer_name, mixture, reducer.eod());
    let mapper = Mapper {
        tok,
        spec: &spec,
        batch: opts.batch,
        cancel,
    };
    let mut prog = Progress {
        inputs_total: inputs.len(),
        ..Default::default()
    };
    for (ii, input) in inputs.iter().enumerate() {
        prog.input = input.name();
        mapper.map(input, &mut prog, progress, &mut |ev| reducer.push(ev))?;
        prog.inputs_done = ii + 1;
        progress(&prog);
    }
    reducer.finish()
}

/// Blend weights: a dataset's share is `weight` when given, else `upsample × tokens`; within a
/// dataset, shards share it by tokens. Prefixes lie under `root`.
fn stage_entry(
    name: String,
    mask: MaskMode,
    datasets: Vec<DatasetEntry>,
    root: &str,
) -> StageEntry {
    let tokens = datasets.iter().map(|d| d.tokens).sum();
    let effective_tokens = datasets.iter().map(|d| d.upsample * d.tokens as f64).sum();
    let explicit = datasets.iter().any(|d| d.weight.is_some());
    let share = |d: &DatasetEntry| match (explicit, d.weight) {
        (true, Some(w)) => w,
        (true, None) => 0.0,
        (false, _) => d.upsample * d.tokens as f64,
    };
    let total: f64 = datasets.iter().filter(|d| d.tokens > 0).map(share).sum();
    let mut parts = Vec::new();
    for d in &datasets {
        if d.tokens == 0 || total <= 0.0 {
            continue;
        }
        for s in &d.shards {
            let w = share(d) / total * s.tokens as f64 / d.tokens as f64;
            if w > 0.0 {
                parts.push(format!(
                    "{w:.8} {}/{}",
                    root.trim_end_matches('/'),
                    s.prefix
                ));
            }
        }
    }
    StageEntry {
        name,
        mask,
        datasets,
        tokens,
        effective_tokens,
        blend: parts.join(" "),
    }
}
