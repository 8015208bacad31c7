//! What a pack job reads and reports: its input shards and its progress. The map step
//! ([`crate::part`]) and the job runners above it share these.
use anyhow::Context;
use serde::Serialize;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;

/// One input shard: JSONL, zstd-compressed when the name ends in `.zst`.
pub enum Input {
    Path(PathBuf),
    Bytes { name: String, data: Vec<u8> },
}

impl Input {
    pub(crate) fn name(&self) -> String {
        match self {
            Input::Path(p) => p.display().to_string(),
            Input::Bytes { name, .. } => name.clone(),
        }
    }

    pub(crate) fn reader(&self) -> anyhow::Result<Box<dyn BufRead + '_>> {
        let name = self.name();
        let raw: Box<dyn Read + '_> = match self {
            Input::Path(p) => {
                Box::new(std::fs::File::open(p).with_context(|| format!("opening {name}"))?)
            }
            Input::Bytes { data, .. } => Box::new(&data[..]),
        };
        Ok(if name.ends_with(".zst") {
            Box::new(BufReader::with_capacity(1 << 20, zstd::Decoder::new(raw)?))
        } else {
            Box::new(BufReader::with_capacity(1 << 20, raw))
        })
    }
}

/// Progress reported after every batch.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Progress {
    pub input: String,
    pub inputs_done: usize,
    pub inputs_total: usize,
    pub records: u64,
    pub bytes: u64,
    pub tokens: u64,
}
