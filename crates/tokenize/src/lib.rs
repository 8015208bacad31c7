//! Tokenizer loading (Hugging Face `tokenizer.json`), a fast exact byte-level BPE path, chat
//! templates.
//!
//! [`Tokenizer`] always holds the reference encoder (the `tokenizers` crate). When the file is a
//! byte-level BPE of the GPT-2 / Qwen2 family it also builds a fast encoder that gives the same
//! ids much faster: added tokens split first (Aho-Corasick, leftmost-longest, as `tokenizers`
//! does), the normalizer (NFC with the same Unicode tables), the pre-tokenizer (a hand-written
//! scanner for the Qwen2 pattern, fancy-regex for other patterns), and BPE merges with the
//! reference's tie-breaking. Anything the fast path does not cover uses the reference.
//!
//! A tokenizer is named by a path or a Hugging Face Hub model id ([`Tokenizer::load`]).
pub mod chat;
pub mod hub;
pub mod pretok;

mod bpe;

use aho_corasick::{AhoCorasick, MatchKind};
use bpe::BytePairModel;
use pretok::{Qwen2Scanner, RegexSplitter};
use rayon::prelude::*;
use rustc_hash::FxHashMap;
use serde_json::Value;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    #[error("reading tokenizer file `{path}`: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("loading tokenizer.json: {0}")]
    Load(String),
    #[error("`{name}` is no local file; as a Hugging Face model id: {source}")]
    Hub {
        name: String,
        #[source]
        source: hub::HubError,
    },
    #[error("encoding text: {0}")]
    Encode(String),
    #[error("decoding ids: {0}")]
    Decode(String),
}

pub type Result<T, E = TokenizeError> = std::result::Result<T, E>;

/// Byte range `[start, end)` of a token in the encoded text.
pub type Span = (usize, usize);

/// Which encoder answers `encode`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Engine {
    /// The exact fast byte-level BPE path.
    Fast { pretokenizer: &'static str },
    /// The `tokenizers` crate, with the reason the fast path does not apply.
    Reference { why: String },
}

/// A loaded Hugging Face tokenizer.
pub struct Tokenizer {
    reference: tokenizers::Tokenizer,
    fast: Option<FastEncoder>,
    engine: Engine,
    sha256: String,
    vocab_size: u32,
    added: Vec<(String, u32)>,
    id: u64,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("sha256", &self.sha256)
            .field("vocab_size", &self.vocab_size)
            .field("engine", &self.engine)
            .finish()
    }
}

/// Per-thread memo of pre-token → ids; words repeat a lot in source code.
pub struct EncodeCache {
    map: FxHashMap<Box<[u8]>, Box<[u32]>>,
    limit: usize,
}

impl Default for EncodeCache {
    fn default() -> Self {
        Self::new()
    }
}

impl EncodeCache {
    pub fn new() -> Self {
        Self::with_limit(1 << 17)
    }

    /// A cache that is cleared whenever it holds `limit` words (bounded memory).
    pub fn with_limit(limit: usize) -> Self {
        Self {
            map: FxHashMap::default(),
            limit,
        }
    }
}

const CACHE_MAX_WORD: usize = 64;

/// Distinguishes tokenizers so a thread's cache never serves another tokenizer's ids.
static NEXT_TOKENIZER_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

thread_local! {
    /// One cache per thread: rayon splits batches into many small jobs, so a per-job cache
    /// would start cold again and again.
    static THREAD_CACHE: std::cell::RefCell<(u64, EncodeCache)> =
        std::cell::RefCell::new((0, EncodeCache::new()));
}

/// The local `tokenizer.json` that `name` stands for: an existing path (`file://` allowed), else
/// a Hub model id (`org/name[@revision]`) through the Hugging Face cache, downloading into it
/// when online. Anything else is returned as the path it names (and fails to read).
pub fn locate(name: &str) -> Result<std::path::PathBuf> {
    let path = Path::new(name.strip_prefix("file://").unwrap_or(name));
    match hub::HubRepo::parse(name) {
        Some(repo) if !path.exists() => {
            hub::Hub::from_env()
                .fetch(&repo)
                .map_err(|source| TokenizeError::Hub {
                    name: name.to_string(),
                    source,
                })
        }
        _ => Ok(path.to_path_buf()),
    }
}

impl Tokenizer {
    /// Loads the tokenizer `name` stands for (a path or a Hub model id, see [`locate`]).
    pub fn load(name: &str) -> Result<Self> {
        Self::from_file(locate(name)?)
    }

    /// Loads a `tokenizer.json` from a local path.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| TokenizeError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_bytes(&bytes)
    }

    /// Loads a `tokenizer.json` from its bytes (e.g. fetched from a BlobStore).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let sha256 = davinci_core::hash::sha256_hex(bytes);
        let mut reference = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| TokenizeError::Load(e.to_string()))?;
        // Documents are packed whole: no truncation or padding from the file's settings.
        reference
            .with_truncation(None)
            .map_err(|e| TokenizeError::Load(e.to_string()))?;
        reference.with_padding(None);
        let json: Value =
            serde_json::from_slice(bytes).map_err(|e| TokenizeError::Load(e.to_string()))?;
        let (fast, engine) = match FastEncoder::from_json(&json) {
            Ok(f) => {
                let name = f.pretok.name();
                (Some(f), Engine::Fast { pretokenizer: name })
            }
            Err(why) => (None, Engine::Reference { why }),
        };
        let mut added: Vec<(String, u32)> = reference
            .get_added_tokens_decoder()
            .into_iter()
            .map(|(id, t)| (t.content, id))
            .collect();
        added.sort_by_key(|(_, id)| *id);
        let max_added = added.iter().map(|(_, id)| id + 1).max().unwrap_or(0);
        let vocab_size = (reference.get_vocab_size(true) as u32).max(max_added);
        Ok(Self {
            reference,
            fast,
            engine,
            sha256,
            vocab_size,
            added,
            id: NEXT_TOKENIZER_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// sha256 (hex) of the `tokenizer.json` bytes, for the manifest.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Number of ids, added tokens included (largest id + 1).
    pub fn vocab_size(&self) -> u32 {
        self.vocab_size
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.reference.token_to_id(token)
    }

    /// Added tokens (content, id), by id.
    pub fn added_tokens(&self) -> &[(String, u32)] {
        &self.added
    }

    /// The end-of-document id: the first of the usual EOS spellings the file has.
    pub fn default_eod(&self) -> Option<(String, u32)> {
        [
            "<|endoftext|>",
            "</s>",
            "<|end_of_text|>",
            "<eos>",
            "<|eot_id|>",
        ]
        .iter()
        .find_map(|t| self.token_to_id(t).map(|id| (t.to_string(), id)))
    }

    /// Ids of `text` (no special tokens added), identical to `tokenizers`' `encode(text, false)`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        self.encode_into(text, &mut out)?;
        Ok(out)
    }

    /// Appends the ids of `text` to `out`, using this thread's word cache.
    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        THREAD_CACHE.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != self.id {
                c.0 = self.id;
                c.1.map.clear();
            }
            self.encode_with(text, &mut c.1, out)
        })
    }

    /// Appends the ids of `text` to `out`, reusing `cache` across calls.
    pub fn encode_with(
        &self,
        text: &str,
        cache: &mut EncodeCache,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        match &self.fast {
            Some(f) => {
                f.encode(text, cache, out);
                Ok(())
            }
            None => {
                out.extend(self.encode_reference(text)?);
                Ok(())
            }
        }
    }

    /// Ids from the `tokenizers` crate itself.
    pub fn encode_reference(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .reference
            .encode(text, false)
            .map_err(|e| TokenizeError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids with the byte span each token covers in `text`. `text` must already be normalized
    /// (see [`Tokenizer::normalize`]) so that spans index it directly.
    pub fn encode_with_spans(&self, text: &str) -> Result<(Vec<u32>, Vec<Span>)> {
        match &self.fast {
            Some(f) => {
                let ids = self.encode(text)?;
                let mut spans = Vec::with_capacity(ids.len());
                let mut at = 0;
                for &id in &ids {
                    let n = f.token_len(id);
                    spans.push((at, at + n));
                    at += n;
                }
                if at != text.len() {
                    return Err(TokenizeError::Encode(format!(
                        "token bytes cover {at} of {} bytes: text was not normalized",
                        text.len()
                    )));
                }
                Ok((ids, spans))
            }
            None => {
                let enc = self
                    .reference
                    .encode(text, false)
                    .map_err(|e| TokenizeError::Encode(e.to_string()))?;
                Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
            }
        }
    }

    /// The text after the tokenizer's normalizer (unchanged when it has none).
    pub fn normalize(&self, text: &str) -> Result<String> {
        match &self.fast {
            Some(f) => Ok(f.normalizer.apply(text).into_owned()),
            None => match self.reference.get_normalizer() {
                None => Ok(text.to_string()),
                Some(n) => {
                    use tokenizers::Normalizer;
                    let mut ns = tokenizers::NormalizedString::from(text);
                    n.normalize(&mut ns)
                        .map_err(|e| TokenizeError::Encode(e.to_string()))?;
                    Ok(ns.get().to_string())
                }
            },
        }
    }

    /// Encodes many texts on all cores (rayon); order is kept.
    pub fn encode_batch<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Result<Vec<Vec<u32>>> {
        texts.par_iter().map(|t| self.encode(t.as_ref())).collect()
    }

    /// Number of tokens of `text`.
    pub fn count_tokens(&self, text: &str) -> Result<usize> {
        Ok(self.encode(text)?.len())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.reference
            .decode(ids, false)
            .map_err(|e| TokenizeError::Decode(e.to_string()))
    }
}

/// Normalizers the fast path reproduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Normalizer {
    None,
    /// NFC with `unicode-normalization-alignments`' tables (Unicode 9), the crate `tokenizers`
    /// uses: a newer NFC table would compose some newer characters differently.
    Nfc,
}

impl Normalizer {
    fn apply<'a>(&self, s: &'a str) -> std::borrow::Cow<'a, str> {
        match self {
            Normalizer::None => s.into(),
            Normalizer::Nfc => {
                // Code points below U+0300 are all NFC-stable and can't combine with what
                // precedes them; their UTF-8 lead bytes are < 0xCC.
                if s.bytes().all(|b| b < 0xCC) {
                    s.into()
                } else {
                    use unicode_normalization_alignments::UnicodeNormalization;
                    s.nfc().map(|(c, _)| c).collect::<String>().into()
                }
            }
        }
    }
}

enum PreTok {
    Qwen2(Qwen2Scanner),
    Regex(RegexSplitter, &'static str),
}

impl PreTok {
    fn name(&self) -> &'static str {
        match self {
            PreTok::Qwen2(_) => "qwen2-scanner",
            PreTok::Regex(_, n) => n,
        }
    }

    #[inline]
    fn split<'a>(&self, s: &'a str, f: impl FnMut(&'a str)) {
        match self {
            PreTok::Qwen2(q) => q.split(s, f),
            PreTok::Regex(r, _) => r.split(s, f),
        }
    }
}

/// Added-token matcher: leftmost-longest, like `tokenizers`' double-array Aho-Corasick.
struct AddedSplitter {
    ac: AhoCorasick,
    ids: Vec<u32>,
}

impl AddedSplitter {
    fn new(tokens: Vec<(String, u32)>) -> Result<Option<Self>, String> {
        if tokens.is_empty() {
            return Ok(None);
        }
        let ac = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(tokens.iter().map(|(t, _)| t.as_str()))
            .map_err(|e| e.to_string())?;
        Ok(Some(Self {
            ac,
            ids: tokens.into_iter().map(|(_, id)| id).collect(),
        }))
    }

    /// Calls `f` on gaps and matches, in order.
    fn split<'a>(this: &Option<Self>, s: &'a str, mut f: impl FnMut(Piece<'a>)) {
        let Some(this) = this else {
            if !s.is_empty() {
                f(Piece::Text(s));
            }
            return;
        };
        let mut last = 0;
        for m in this.ac.find_iter(s) {
            if m.start() > last {
                f(Piece::Text(&s[last..m.start()]));
            }
            f(Piece::Added(this.ids[m.pattern().as_usize()]));
            last = m.end();
        }
        if last < s.len() {
            f(Piece::Text(&s[last..]));
        }
    }
}

enum Piece<'a> {
    Text(&'a str),
    Added(u32),
}

struct FastEncoder {
    model: BytePairModel,
    normalizer: Normalizer,
    pretok: PreTok,
    raw_added: Option<AddedSplitter>,
    normalized_added: Option<AddedSplitter>,
    /// Byte length of every id (added tokens: their content).
    token_lens: Vec<u32>,
}

/// GPT-2's byte ↔ printable-char map that byte-level BPE vocabularies are written in.
fn byte_level_chars() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        map[b as usize] = if printable {
            char::from_u32(b).expect("latin-1")
        } else {
            n += 1;
            char::from_u32(255 + n).expect("BMP")
        };
    }
    map
}

fn str_field<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(Value::as_str)
}

fn empty_or_null(v: &Value, k: &str) -> bool {
    match v.get(k) {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.is_empty(),
        _ => false,
    }
}

impl FastEncoder {
    /// Builds the fast encoder, or says why the file is outside what it reproduces exactly.
    fn from_json(j: &Value) -> Result<Self, String> {
        let model = j.get("model").ok_or("no model")?;
        if str_field(model, "type") != Some("BPE") {
            return Err(format!("model type {:?} is not BPE", model.get("type")));
        }
        if !matches!(model.get("dropout"), None | Some(Value::Null)) {
            return Err("BPE dropout is set".into());
        }
        if model.get("byte_fallback").and_then(Value::as_bool) == Some(true) {
            return Err("byte_fallback BPE".into());
        }
        if !empty_or_null(model, "continuing_subword_prefix")
            || !empty_or_null(model, "end_of_word_suffix")
        {
            return Err("subword prefix/suffix set".into());
        }
        let ignore_merges = model.get("ignore_merges").and_then(Value::as_bool) == Some(true);

        let normalizer = match j.get("normalizer") {
            None | Some(Value::Null) => Normalizer::None,
            Some(n) => match str_field(n, "type") {
                Some("NFC") => Normalizer::Nfc,
                Some("Sequence") => {
                    let list = n
                        .get("normalizers")
                        .and_then(Value::as_array)
                        .ok_or("bad Sequence")?;
                    match list.as_slice() {
                        [] => Normalizer::None,
                        [one] if str_field(one, "type") == Some("NFC") => Normalizer::Nfc,
                        _ => return Err("normalizer sequence other than [NFC]".into()),
                    }
                }
                other => return Err(format!("normalizer {other:?}")),
            },
        };

        let pretok = Self::pretokenizer(j.get("pre_tokenizer").unwrap_or(&Value::Null))?;

        // Vocabulary in raw bytes.
        let chars = byte_level_chars();
        let mut char_to_byte: FxHashMap<char, u8> = FxHashMap::default();
        for (b, c) in chars.iter().enumerate() {
            char_to_byte.insert(*c, b as u8);
        }
        let vocab = model
            .get("vocab")
            .and_then(Value::as_object)
            .ok_or("no vocab")?;
        let mut str_to_id: FxHashMap<&str, u32> = FxHashMap::default();
        let mut max_id = 0u32;
        let mut token_bytes: Vec<(u32, Option<Vec<u8>>)> = Vec::with_capacity(vocab.len());
        for (tok, id) in vocab {
            let id = id.as_u64().ok_or("vocab id is not an integer")? as u32;
            str_to_id.insert(tok.as_str(), id);
            max_id = max_id.max(id);
            let bytes: Option<Vec<u8>> =
                tok.chars().map(|c| char_to_byte.get(&c).copied()).collect();
            token_bytes.push((id, bytes));
        }
        let mut byte_ids = [0u32; 256];
        for (b, c) in chars.iter().enumerate() {
            let mut buf = [0u8; 4];
            byte_ids[b] = *str_to_id
                .get(c.encode_utf8(&mut buf) as &str)
                .ok_or_else(|| {
                    format!("byte {b:#04x} is not in the vocabulary (not byte-level)")
                })?;
        }

        // Merges: "a b" strings (older files) or [a, b] pairs (newer files).
        let merges_v = model
            .get("merges")
            .and_then(Value::as_array)
            .ok_or("no merges")?;
        let mut merges: FxHashMap<u64, (u32, u32)> = FxHashMap::default();
        merges.reserve(merges_v.len());
        for (rank, m) in merges_v.iter().enumerate() {
            let (a, b): (&str, &str) = match m {
                Value::String(s) => s
                    .split_once(' ')
                    .ok_or_else(|| format!("merge `{s}` has no space"))?,
                Value::Array(p) if p.len() == 2 => (
                    p[0].as_str().ok_or("merge part is not a string")?,
                    p[1].as_str().ok_or("merge part is not a string")?,
                ),
                _ => return Err(format!("bad merge entry {m}")),
            };
            let ia = *str_to_id
                .get(a)
                .ok_or_else(|| format!("merge token `{a}` not in vocab"))?;
            let ib = *str_to_id
                .get(b)
                .ok_or_else(|| format!("merge token `{b}` not in vocab"))?;
            let joined = format!("{a}{b}");
            let inew = *str_to_id
                .get(joined.as_str())
                .ok_or_else(|| format!("merged `{joined}` not in vocab"))?;
            merges.insert(((ia as u64) << 32) | ib as u64, (rank as u32, inew));
        }

        // Added tokens, split before normalization unless `normalized`.
        let mut raw = Vec::new();
        let mut normed = Vec::new();
        let mut added_lens = Vec::new();
        for t in j
            .get("added_tokens")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            let content = str_field(t, "content").ok_or("added token without content")?;
            let id = t
                .get("id")
                .and_then(Value::as_u64)
                .ok_or("added token without id")? as u32;
            for flag in ["lstrip", "rstrip", "single_word"] {
                if t.get(flag).and_then(Value::as_bool) == Some(true) {
                    return Err(format!("added token `{content}` has {flag}"));
                }
            }
            max_id = max_id.max(id);
            if t.get("normalized").and_then(Value::as_bool) == Some(true) {
                normed.push((normalizer.apply(content).into_owned(), id));
            } else {
                raw.push((content.to_string(), id));
            }
            added_lens.push((id, content.len() as u32));
        }

        let mut token_lens = vec![0u32; max_id as usize + 1];
        let mut words = ignore_merges.then(FxHashMap::default);
        for (id, bytes) in token_bytes {
            if let Some(b) = bytes {
                token_lens[id as usize] = b.len() as u32;
                if let Some(w) = &mut words {
                    w.insert(b, id);
                }
            }
        }
        for (id, len) in added_lens {
            token_lens[id as usize] = len;
        }

        Ok(Self {
            model: BytePairModel {
                byte_ids,
                merges,
                words,
            },
            normalizer,
            pretok,
            raw_added: AddedSplitter::new(raw)?,
            normalized_added: AddedSplitter::new(normed)?,
            token_lens,
        })
    }

    fn pretokenizer(p: &Value) -> Result<PreTok, String> {
        let byte_level_ok = |b: &Value| {
            str_field(b, "type") == Some("ByteLevel")
                && b.get("add_prefix_space").and_then(Value::as_bool) != Some(true)
        };
        match str_field(p, "type") {
            Some("ByteLevel") if byte_level_ok(p) => {
                if p.get("use_regex").and_then(Value::as_bool) == Some(false) {
                    return Err("ByteLevel without a split regex".into());
                }
                Ok(PreTok::Regex(
                    RegexSplitter::new(pretok::GPT2_PATTERN).map_err(|e| e.to_string())?,
                    "gpt2-regex",
                ))
            }
            Some("Sequence") => {
                let list = p
                    .get("pretokenizers")
                    .and_then(Value::as_array)
                    .ok_or("bad Sequence")?;
                let [split, bl] = list.as_slice() else {
                    return Err("pre-tokenizer sequence is not [Split, ByteLevel]".into());
                };
                if str_field(split, "type") != Some("Split")
                    || str_field(split, "behavior") != Some("Isolated")
                    || split.get("invert").and_then(Value::as_bool) == Some(true)
                {
                    return Err("first pre-tokenizer is not an isolating Split".into());
                }
                if !byte_level_ok(bl) || bl.get("use_regex").and_then(Value::as_bool) != Some(false)
                {
                    return Err("second pre-tokenizer is not ByteLevel(use_regex=false)".into());
                }
                let pattern = split
                    .get("pattern")
                    .and_then(|v| v.get("Regex"))
                    .and_then(Value::as_str)
                    .ok_or("Split pattern is not a regex")?;
                if pattern == pretok::QWEN2_PATTERN {
                    Ok(PreTok::Qwen2(Qwen2Scanner::new()))
                } else {
                    Ok(PreTok::Regex(
                        RegexSplitter::new(pattern).map_err(|e| e.to_string())?,
                        "split-regex",
                    ))
                }
            }
            other => Err(format!("pre-tokenizer {other:?}")),
        }
    }

    fn token_len(&self, id: u32) -> usize {
        self.token_lens.get(id as usize).copied().unwrap_or(0) as usize
    }

    fn encode(&self, text: &str, cache: &mut EncodeCache, out: &mut Vec<u32>) {
        AddedSplitter::split(&self.raw_added, text, |piece| match piece {
            Piece::Added(id) => out.push(id),
            Piece::Text(raw) => {
                let normed = self.normalizer.apply(raw);
                AddedSplitter::split(&self.normalized_added, &normed, |p| match p {
                    Piece::Added(id) => out.push(id),
                    Piece::Text(t) => self
                        .pretok
                        .split(t, |w| self.encode_word(w.as_bytes(), cache, out)),
                });
            }
        });
    }

    #[inline]
    fn encode_word(&self, w: &[u8], cache: &mut EncodeCache, out: &mut Vec<u32>) {
        if w.len() == 1 {
            out.push(self.model.byte_ids[w[0] as usize]);
            return;
        }
        if w.len() > CACHE_MAX_WORD {
            self.model.encode_word(w, out);
            return;
        }
        if let Some(ids) = cache.map.get(w) {
            out.extend_from_slice(ids);
            return;
        }
        let start = out.len();
        self.model.encode_word(w, out);
        if cache.map.len() >= cache.limit {
            cache.map.clear();
        }
        cache.map.insert(w.into(), out[start..].into());
    }
}
