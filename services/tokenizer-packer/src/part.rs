//! The MAP step of a pack job: one input shard → its records tokenized, in record order, as
//! [`Event`]s. The REDUCE step (`pipeline::Reducer`, one layer up) packs the events of every
//! input in input order. A job run in one process hands the events straight to it; a job shared by
//! replicas stores each input's events as a *part* (zstd of the encoding below) in its work
//! directory, and the coordinator reduces the parts. Both feed the reducer the same events,
//! so both write the same bytes.
//!
//! Part encoding, inside zstd: the magic `DVPART1\n`, then events: `D` + reason (a drop), `R` +
//! source (a record read), `T` + source + mode + `u32` n + n little-endian `u32` ids + the mask
//! (`0` + n bytes, or `1` when every token has loss), and `E` at the end.
use crate::input::{Input, Progress};
use crate::mixture::Mixture;
use crate::shards::Doc;
use anyhow::Context;
use davinci_core::sample::{Sample, SampleSource};
use davinci_core::traj::{MAX_TRAJECTORY_TOKENS, Trajectory};
use davinci_tokenize::Tokenizer;
use davinci_tokenize::chat::{self, MaskMode};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};

const MAGIC: &[u8; 8] = b"DVPART1\n";

/// What the map step does with a record, in the order the reducer must see it.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A record dropped before packing, with the reason.
    Dropped(Cow<'static, str>),
    /// A record of this source was read; its documents follow.
    Record(SampleSource),
    /// One document of the last record, tokenized for one mask mode (EOD included).
    Doc(SampleSource, MaskMode, Doc),
}

/// What the map step needs of a job: the same for every input of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MapSpec {
    /// Tokenizer as the job names it (path, URI or Hub model id).
    pub tokenizer: String,
    /// sha256 of the file it named when the job started; workers check theirs against it.
    pub tokenizer_sha256: String,
    pub eod: u32,
    /// Mask modes each source is tokenized for, in the order the mixture first needs them.
    pub modes: BTreeMap<SampleSource, Vec<MaskMode>>,
}

impl MapSpec {
    pub fn new(tok: &Tokenizer, name: &str, mixture: &Mixture, eod: u32) -> Self {
        let mut modes: BTreeMap<SampleSource, Vec<MaskMode>> = BTreeMap::new();
        for st in &mixture.stages {
            for d in &st.datasets {
                let m = modes.entry(d.source).or_default();
                if !m.contains(&st.mask) {
                    m.push(st.mask);
                }
            }
        }
        Self {
            tokenizer: name.to_string(),
            tokenizer_sha256: tok.sha256().to_string(),
            eod,
            modes,
        }
    }
}

/// One parsed and tokenized record.
enum Prepared {
    Dropped(&'static str),
    Docs(SampleSource, Vec<(MaskMode, Doc)>),
}

fn prepare(tok: &Tokenizer, line: &str, spec: &MapSpec) -> Prepared {
    let eod = spec.eod;
    let v: serde_json::Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(_) => return Prepared::Dropped("bad_json"),
    };
    if v.get("messages").is_some() {
        let Ok(t) = serde_json::from_value::<Trajectory>(v) else {
            return Prepared::Dropped("bad_trajectory");
        };
        let source = if t.outcome.resolved {
            SampleSource::EnvPass
        } else {
            SampleSource::EnvFail
        };
        let Some(modes) = spec.modes.get(&source) else {
            return Prepared::Docs(source, vec![]);
        };
        let Ok(r) = chat::render_qwen25(&t) else {
            return Prepared::Dropped("bad_chat");
        };
        let mut docs = Vec::new();
        for &m in modes {
            match chat::tokenize_rendered(tok, &r, m) {
                Ok((ids, _)) if ids.len() > MAX_TRAJECTORY_TOKENS => {
                    return Prepared::Dropped("trajectory_too_long");
                }
                Ok((mut ids, mut mask)) => {
                    ids.push(eod);
                    mask.push(u8::from(m == MaskMode::All));
                    docs.push((m, Doc { ids, mask }));
                }
                Err(_) => return Prepared::Dropped("tokenize_error"),
            }
        }
        Prepared::Docs(source, docs)
    } else {
        let Ok(s) = serde_json::from_value::<Sample>(v) else {
            return Prepared::Dropped("bad_sample");
        };
        if s.text.is_empty() {
            return Prepared::Dropped("empty_text");
        }
        let Some(modes) = spec.modes.get(&s.source) else {
            return Prepared::Docs(s.source, vec![]);
        };
        let mut ids = Vec::with_capacity(s.text.len() / 3);
        if tok.encode_into(&s.text, &mut ids).is_err() {
            return Prepared::Dropped("tokenize_error");
        }
        ids.push(eod);
        // Plain documents have no chat structure: every token carries loss in every mode.
        let mask = vec![1u8; ids.len()];
        let doc = Doc { ids, mask };
        Prepared::Docs(s.source, modes.iter().map(|&m| (m, doc.clone())).collect())
    }
}

/// The map step over one input at a time.
pub struct Mapper<'a> {
    pub tok: &'a Tokenizer,
    pub spec: &'a MapSpec,
    /// Records tokenized together on the thread pool.
    pub batch: usize,
    pub cancel: &'a AtomicBool,
}

impl Mapper<'_> {
    /// Tokenizes every record of `input` and hands the events to `sink` in record order.
    /// `prog` counts records, bytes and tokens; `progress` sees it after every batch.
    pub fn map(
        &self,
        input: &Input,
        prog: &mut Progress,
        progress: &mut dyn FnMut(&Progress),
        sink: &mut dyn FnMut(Event) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let (tok, spec, batch, cancel) = (self.tok, self.spec, self.batch, self.cancel);
        let name = input.name();
        let mut reader = input.reader()?;
        let mut lines: Vec<String> = Vec::with_capacity(batch);
        let mut eof = false;
        while !eof {
            if cancel.load(Ordering::Relaxed) {
                anyhow::bail!("cancelled");
            }
            lines.clear();
            while lines.len() < batch.max(1) {
                let mut l = String::new();
                match reader.read_line(&mut l) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => {
                        prog.bytes += n as u64;
                        if !l.trim().is_empty() {
                            lines.push(l);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                        sink(Event::Dropped("bad_utf8".into()))?;
                    }
                    Err(e) => return Err(e).with_context(|| format!("reading {name}")),
                }
            }
            let prepared: Vec<Prepared> = lines.par_iter().map(|l| prepare(tok, l, spec)).collect();
            for p in prepared {
                prog.records += 1;
                match p {
                    Prepared::Dropped(why) => sink(Event::Dropped(why.into()))?,
                    Prepared::Docs(source, docs) => {
                        sink(Event::Record(source))?;
                        for (mode, doc) in docs {
                            prog.tokens += doc.ids.len() as u64;
                            sink(Event::Doc(source, mode, doc))?;
                        }
                    }
                }
            }
            progress(prog);
        }
        Ok(())
    }
}

/// What a part holds: its marker in the work directory, checked again when it is reduced.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PartSummary {
    /// Records read per source.
    pub records: BTreeMap<String, u64>,
    /// Records dropped, by reason.
    pub drops: BTreeMap<String, u64>,
    pub documents: u64,
    /// Tokens over every document (EOD included; a record counts once per mask mode).
    pub tokens: u64,
    /// Size and sha256 of the part file.
    pub bytes: u64,
    pub sha256: String,
}

impl PartSummary {
    fn add(&mut self, ev: &Event) {
        match ev {
            Event::Dropped(why) => *self.drops.entry(why.to_string()).or_default() += 1,
            Event::Record(s) => *self.records.entry(s.as_str().into()).or_default() += 1,
            Event::Doc(_, _, d) => {
                self.documents += 1;
                self.tokens += d.ids.len() as u64;
            }
        }
    }

    /// The counts alone (what the events say), without the file's size and hash.
    fn counts(&self) -> Self {
        Self {
            bytes: 0,
            sha256: String::new(),
            ..self.clone()
        }
    }
}

fn mode_byte(m: MaskMode) -> u8 {
    match m {
        MaskMode::All => 0,
        MaskMode::AssistantOnly => 1,
    }
}

fn byte_mode(b: u8) -> anyhow::Result<MaskMode> {
    match b {
        0 => Ok(MaskMode::All),
        1 => Ok(MaskMode::AssistantOnly),
        _ => anyhow::bail!("part: unknown mask mode {b}"),
    }
}

/// Encodes a part.
pub struct PartWriter {
    enc: zstd::Encoder<'static, Vec<u8>>,
    summary: PartSummary,
    buf: Vec<u8>,
}

impl PartWriter {
    pub fn new() -> anyhow::Result<Self> {
        let mut enc = zstd::Encoder::new(Vec::new(), 3)?;
        enc.write_all(MAGIC)?;
        Ok(Self {
            enc,
            summary: PartSummary::default(),
            buf: Vec::new(),
        })
    }

    fn short_str(&mut self, s: &str) {
        let b = s.as_bytes();
        self.buf.push(b.len().min(255) as u8);
        self.buf.extend_from_slice(&b[..b.len().min(255)]);
    }

    pub fn push(&mut self, ev: &Event) -> anyhow::Result<()> {
        self.summary.add(ev);
        self.buf.clear();
        match ev {
            Event::Dropped(why) => {
                self.buf.push(b'D');
                self.short_str(why);
            }
            Event::Record(s) => {
                self.buf.push(b'R');
                self.short_str(s.as_str());
            }
            Event::Doc(s, m, d) => {
                self.buf.push(b'T');
                self.short_str(s.as_str());
                self.buf.push(mode_byte(*m));
                self.buf
                    .extend_from_slice(&u32::try_from(d.ids.len())?.to_le_bytes());
                self.buf.reserve(d.ids.len() * 5 + 1);
                for id in &d.ids {
                    self.buf.extend_from_slice(&id.to_le_bytes());
                }
                if d.mask.iter().all(|&x| x == 1) {
                    self.buf.push(1);
                } else {
                    self.buf.push(0);
                    self.buf.extend_from_slice(&d.mask);
                }
            }
        }
        self.enc.write_all(&self.buf)?;
        Ok(())
    }

    /// The part file and its summary.
    pub fn finish(mut self) -> anyhow::Result<(Vec<u8>, PartSummary)> {
        self.enc.write_all(b"E")?;
        let data = self.enc.finish()?;
        let mut summary = self.summary;
        summary.bytes = data.len() as u64;
        summary.sha256 = davinci_core::hash::sha256_hex(&data);
        Ok((data, summary))
    }
}

/// Decodes a part, streaming: one event in memory at a time.
pub struct PartReader<R: Read> {
    r: zstd::Decoder<'static, std::io::BufReader<R>>,
    summary: PartSummary,
    ended: bool,
}

impl<R: Read> PartReader<R> {
    pub fn new(r: R) -> anyhow::Result<Self> {
        let mut r = zstd::Decoder::new(r)?;
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic)
            .context("part: reading its header")?;
        anyhow::ensure!(&magic == MAGIC, "part: not a tokenized part (bad magic)");
        Ok(Self {
            r,
            summary: PartSummary::default(),
            ended: false,
        })
    }

    fn byte(&mut self) -> anyhow::Result<u8> {
        let mut b = [0u8; 1];
        self.r.read_exact(&mut b).context("part: truncated")?;
        Ok(b[0])
    }

    fn short_str(&mut self) -> anyhow::Result<String> {
        let mut s = vec![0u8; self.byte()? as usize];
        self.r.read_exact(&mut s).context("part: truncated")?;
        Ok(String::from_utf8(s)?)
    }

    fn source(&mut self) -> anyhow::Result<SampleSource> {
        self.short_str()?
            .parse()
            .map_err(|e: String| anyhow::anyhow!("part: {e}"))
    }

    /// The next event; `None` after the end marker. A part cut short is an error.
    pub fn next_event(&mut self) -> anyhow::Result<Option<Event>> {
        if self.ended {
            return Ok(None);
        }
        let ev = match self.byte()? {
            b'D' => Event::Dropped(self.short_str()?.into()),
            b'R' => Event::Record(self.source()?),
            b'T' => {
                let source = self.source()?;
                let mode = byte_mode(self.byte()?)?;
                let mut n = [0u8; 4];
                self.r.read_exact(&mut n).context("part: truncated")?;
                let n = u32::from_le_bytes(n) as usize;
                let mut raw = vec![0u8; n * 4];
                self.r.read_exact(&mut raw).context("part: truncated")?;
                let ids = raw
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                let mask = match self.byte()? {
                    1 => vec![1u8; n],
                    0 => {
                        let mut m = vec![0u8; n];
                        self.r.read_exact(&mut m).context("part: truncated")?;
                        m
                    }
                    k => anyhow::bail!("part: unknown mask kind {k}"),
                };
                Event::Doc(source, mode, Doc { ids, mask })
            }
            b'E' => {
                self.ended = true;
                return Ok(None);
            }
            t => anyhow::bail!("part: unknown event tag {t:#04x}"),
        };
        self.summary.add(&ev);
        Ok(Some(ev))
    }

    /// Checks, once every event is read, that they add up to `marker`'s counts.
    pub fn check(&self, marker: &PartSummary) -> anyhow::Result<()> {
        anyhow::ensure!(self.ended, "part: not read to its end");
        anyhow::ensure!(
            self.summary == marker.counts(),
            "part holds {:?}, its marker says {:?}",
            self.summary,
            marker.counts()
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trajectories_over_the_cap_are_dropped() {
        let tok = Tokenizer::from_file(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../crates/tokenize/tests/fixtures/tiny-qwen-shape.json"
        ))
        .unwrap();
        let spec = MapSpec::new(&tok, "tiny", &Mixture::default(), 0);
        let traj = |words: usize| {
            serde_json::json!({"schema": "davinci.traj/v1", "id": "t", "task_id": "x", "model": "m",
                "tools": [], "outcome": {"resolved": true, "exit_status": "submitted"},
                "messages": [{"role": "user", "content": "fix"},
                    {"role": "assistant", "content": " a".repeat(words)}]})
            .to_string()
        };
        match prepare(&tok, &traj(1_000), &spec) {
            Prepared::Docs(SampleSource::EnvPass, docs) => assert!(!docs.is_empty()),
            _ => panic!("a short trajectory is kept"),
        }
        match prepare(&tok, &traj(MAX_TRAJECTORY_TOKENS + 10), &spec) {
            Prepared::Dropped(r) => assert_eq!(r, "trajectory_too_long"),
            _ => panic!("a trajectory over the cap is dropped"),
        }
    }

    #[test]
    fn a_part_decodes_to_the_events_it_was_written_from() {
        let events = vec![
            Event::Dropped("bad_json".into()),
            Event::Record(SampleSource::CtxPython),
            Event::Doc(
                SampleSource::CtxPython,
                MaskMode::All,
                Doc {
                    ids: vec![1, 70_000, u32::MAX],
                    mask: vec![1, 1, 1],
                },
            ),
            Event::Record(SampleSource::EnvPass),
            Event::Doc(
                SampleSource::EnvPass,
                MaskMode::AssistantOnly,
                Doc {
                    ids: vec![5, 6, 7, 8],
                    mask: vec![0, 1, 1, 0],
                },
            ),
            Event::Doc(
                SampleSource::EnvPass,
                MaskMode::All,
                Doc {
                    ids: vec![],
                    mask: vec![],
                },
            ),
        ];
        let mut w = PartWriter::new().unwrap();
        for e in &events {
            w.push(e).unwrap();
        }
        let (data, summary) = w.finish().unwrap();
        assert_eq!(summary.documents, 3);
        assert_eq!(summary.tokens, 7);
        assert_eq!(summary.records["env-pass"], 1);
        assert_eq!(summary.drops["bad_json"], 1);
        assert_eq!(summary.bytes, data.len() as u64);

        let mut r = PartReader::new(&data[..]).unwrap();
        let mut got = Vec::new();
        while let Some(e) = r.next_event().unwrap() {
            got.push(e);
        }
        assert_eq!(got, events);
        r.check(&summary).unwrap();
        let mut other = summary.clone();
        other.tokens += 1;
        assert!(r.check(&other).is_err());

        // A part cut short never reads as a shorter valid one.
        let raw = zstd::decode_all(&data[..]).unwrap();
        let cut = zstd::encode_all(&raw[..raw.len() - 1], 3).unwrap();
        let mut r = PartReader::new(&cut[..]).unwrap();
        let err = loop {
            match r.next_event() {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("a cut part read to its end"),
                Err(e) => break e,
            }
        };
        assert!(err.to_string().contains("truncated"), "{err}");
    }
}
