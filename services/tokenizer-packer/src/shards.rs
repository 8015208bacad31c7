//! Packed bins → Megatron `.bin/.idx` shards (+ `.mask.{bin,idx}` sidecars) of bounded size in a
//! local directory.
use crate::packing::Packable;
use davinci_core::megatron::{DType, MegatronWriter};
use std::fs::File;
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};

/// One document's tokens (EOD included) and its 0/1 loss mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doc {
    pub ids: Vec<u32>,
    pub mask: Vec<u8>,
}

impl Packable for Doc {
    fn len(&self) -> usize {
        self.ids.len()
    }
    fn split_at(mut self, at: usize) -> (Self, Self) {
        let ids = self.ids.split_off(at);
        let mask = self.mask.split_off(at);
        (self, Doc { ids, mask })
    }
}

pub use davinci_core::packed::ShardInfo;

type W = MegatronWriter<BufWriter<File>>;

pub struct ShardWriter {
    root: PathBuf,
    prefix: String,
    dtype: DType,
    shard_bytes: u64,
    current: Option<(W, W, ShardInfo)>,
    shards: Vec<ShardInfo>,
}

fn create(path: &Path) -> io::Result<BufWriter<File>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    File::create(path)
        .map(|f| BufWriter::with_capacity(1 << 20, f))
        .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", path.display())))
}

impl ShardWriter {
    /// `prefix` is `{stage}/{dataset}`; shards become `{prefix}-00000`, `-00001`, ….
    pub fn new(
        root: impl Into<PathBuf>,
        prefix: impl Into<String>,
        dtype: DType,
        shard_bytes: u64,
    ) -> Self {
        Self {
            root: root.into(),
            prefix: prefix.into(),
            dtype,
            shard_bytes: shard_bytes.max(1),
            current: None,
            shards: Vec::new(),
        }
    }

    /// Writes one bin as one Megatron document.
    pub fn write_bin(&mut self, bin: &[Doc]) -> io::Result<()> {
        if self.current.is_none() {
            let prefix = format!("{}-{:05}", self.prefix, self.shards.len());
            let ids = MegatronWriter::new(
                create(&self.root.join(format!("{prefix}.bin")))?,
                self.dtype,
            );
            let mask = MegatronWriter::new(
                create(&self.root.join(format!("{prefix}.mask.bin")))?,
                DType::U8,
            );
            let info = ShardInfo {
                prefix,
                sequences: 0,
                bins: 0,
                tokens: 0,
                bin_bytes: 0,
            };
            self.current = Some((ids, mask, info));
        }
        let (ids, mask, info) = self.current.as_mut().expect("opened above");
        for d in bin {
            ids.add_sequence(&d.ids)?;
            let m: Vec<u32> = d.mask.iter().map(|&x| x as u32).collect();
            mask.add_sequence(&m)?;
            info.sequences += 1;
            info.tokens += d.ids.len() as u64;
        }
        ids.end_document();
        mask.end_document();
        info.bins += 1;
        info.bin_bytes = ids.bin_bytes();
        if info.bin_bytes >= self.shard_bytes {
            self.close_shard()?;
        }
        Ok(())
    }

    fn close_shard(&mut self) -> io::Result<()> {
        if let Some((ids, mask, info)) = self.current.take() {
            let idx = create(&self.root.join(format!("{}.idx", info.prefix)))?;
            ids.finish(idx)?;
            let midx = create(&self.root.join(format!("{}.mask.idx", info.prefix)))?;
            mask.finish(midx)?;
            self.shards.push(info);
        }
        Ok(())
    }

    pub fn finish(mut self) -> io::Result<Vec<ShardInfo>> {
        self.close_shard()?;
        Ok(self.shards)
    }
}
