//! Record shards: JSONL compressed with zstd (`{shard}.jsonl.zst`), the unit every stage
//! reads from and writes to storage.
//!
//! Shard names come from content (see [`shard_name`]), so re-running a stage over the same
//! input writes the same objects, and a claim check's `sha256` can be verified on read.
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Write};

/// File extension of a record shard.
pub const SHARD_EXT: &str = "jsonl.zst";
/// zstd level: 3 is zstd's default, a good speed/ratio point for JSON text.
pub const ZSTD_LEVEL: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("record {index} does not serialize to JSON: {source}")]
    Encode {
        /// 0-based position of the record in the input.
        index: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("shard line {line}: {source}")]
    Line {
        /// 1-based line number in the decompressed JSONL.
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("zstd stream: {0}")]
    Zstd(#[from] std::io::Error),
    #[error("shard checksum mismatch: expected sha256 {expected}, got {actual}")]
    Checksum { expected: String, actual: String },
}

/// Lowercase hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Content-derived shard name: the first 16 hex digits of the SHA-256 of `content`.
pub fn shard_name(content: &[u8]) -> String {
    let mut hex = sha256_hex(content);
    hex.truncate(16);
    hex
}

/// `{name}.jsonl.zst` for a shard named `name`.
pub fn shard_file_name(name: &str) -> String {
    format!("{name}.{SHARD_EXT}")
}

/// An encoded shard, ready to `put`.
#[derive(Debug, Clone)]
pub struct EncodedShard {
    /// zstd-compressed JSONL, one record per line.
    pub data: Bytes,
    /// SHA-256 (hex) of `data`, what claim checks carry.
    pub sha256: String,
    /// Number of records (lines).
    pub records: usize,
}

impl EncodedShard {
    /// Content-derived name (first 16 hex digits of `sha256`).
    pub fn name(&self) -> &str {
        &self.sha256[..16]
    }

    /// `{name}.jsonl.zst`
    pub fn file_name(&self) -> String {
        shard_file_name(self.name())
    }
}

/// Serializes each record as one JSON line and compresses the whole with zstd.
///
/// Returns `(bytes, sha256 hex of bytes, record count)`.
pub fn encode_jsonl_zst<T: Serialize>(
    records: impl IntoIterator<Item = T>,
) -> Result<(Bytes, String, usize), ShardError> {
    let shard = encode_shard(records)?;
    Ok((shard.data, shard.sha256, shard.records))
}

/// [`encode_jsonl_zst`] returning a named struct.
pub fn encode_shard<T: Serialize>(
    records: impl IntoIterator<Item = T>,
) -> Result<EncodedShard, ShardError> {
    let mut encoder = zstd::stream::Encoder::new(Vec::new(), ZSTD_LEVEL)?;
    let mut line = Vec::new();
    let mut count = 0usize;
    for (index, record) in records.into_iter().enumerate() {
        line.clear();
        serde_json::to_writer(&mut line, &record)
            .map_err(|source| ShardError::Encode { index, source })?;
        line.push(b'\n');
        encoder.write_all(&line)?;
        count += 1;
    }
    let data = Bytes::from(encoder.finish()?);
    let sha256 = sha256_hex(&data);
    Ok(EncodedShard {
        data,
        sha256,
        records: count,
    })
}

/// Decompresses a shard and parses every non-blank line; an error names the 1-based line.
pub fn decode_jsonl_zst<T: DeserializeOwned>(data: &[u8]) -> Result<Vec<T>, ShardError> {
    let mut out = Vec::new();
    for_each_record(data, |record| {
        out.push(record);
        Ok(())
    })?;
    Ok(out)
}

/// [`decode_jsonl_zst`] after checking the shard's SHA-256 against a claim check.
pub fn decode_verified<T: DeserializeOwned>(
    data: &[u8],
    expected_sha256: &str,
) -> Result<Vec<T>, ShardError> {
    let actual = sha256_hex(data);
    if !actual.eq_ignore_ascii_case(expected_sha256) {
        return Err(ShardError::Checksum {
            expected: expected_sha256.to_string(),
            actual,
        });
    }
    decode_jsonl_zst(data)
}

/// Streams records one at a time (large shards need not be held as a `Vec`).
pub fn for_each_record<T: DeserializeOwned>(
    data: &[u8],
    mut f: impl FnMut(T) -> Result<(), ShardError>,
) -> Result<(), ShardError> {
    let mut reader = BufReader::new(zstd::stream::Decoder::new(data)?);
    let mut line = Vec::new();
    let mut number = 0usize;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        number += 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let record = serde_json::from_slice(&line).map_err(|source| ShardError::Line {
            line: number,
            source,
        })?;
        f(record)?;
    }
}

/// The input shards under `prefix` (or the object `prefix` itself), sorted.
pub async fn list_inputs(
    store: &dyn crate::blob::BlobStore,
    prefix: &str,
) -> anyhow::Result<Vec<String>> {
    let is_input = |k: &str| k.ends_with(".jsonl.zst") || k.ends_with(".jsonl");
    if !prefix.is_empty() && is_input(prefix) && store.head(prefix).await?.is_some() {
        return Ok(vec![prefix.to_string()]);
    }
    let p = if prefix.is_empty() || prefix.ends_with('/') {
        prefix.to_string()
    } else {
        format!("{prefix}/")
    };
    let keys: Vec<String> = store
        .list(&p)
        .await?
        .into_iter()
        .map(|m| m.key)
        .filter(|k| is_input(k))
        .collect();
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Rec {
        id: String,
        n: u32,
        text: String,
    }

    fn recs(n: u32) -> Vec<Rec> {
        (0..n)
            .map(|i| Rec {
                id: format!("github:o/r#{i}"),
                n: i,
                text: "line one\nline two \u{1F980} \"quoted\"".into(),
            })
            .collect()
    }

    fn compress(text: &str) -> Vec<u8> {
        zstd::encode_all(text.as_bytes(), 3).unwrap()
    }

    #[test]
    fn round_trip_keeps_records_and_order() {
        let input = recs(500);
        let (data, sha, count) = encode_jsonl_zst(&input).unwrap();
        assert_eq!(count, 500);
        assert_eq!(sha, sha256_hex(&data));
        assert_eq!(sha.len(), 64);
        let back: Vec<Rec> = decode_jsonl_zst(&data).unwrap();
        assert_eq!(back, input);
        // One record per line, even with newlines inside strings.
        let text = zstd::decode_all(&data[..]).unwrap();
        assert_eq!(text.iter().filter(|&&b| b == b'\n').count(), 500);
    }

    #[test]
    fn encoding_is_deterministic_and_names_follow_content() {
        let a = encode_shard(recs(10)).unwrap();
        let b = encode_shard(recs(10)).unwrap();
        let c = encode_shard(recs(11)).unwrap();
        assert_eq!(a.sha256, b.sha256);
        assert_ne!(a.sha256, c.sha256);
        assert_eq!(a.name(), shard_name(&a.data));
        assert_eq!(a.name().len(), 16);
        assert_eq!(a.file_name(), format!("{}.jsonl.zst", a.name()));
    }

    #[test]
    fn empty_shard_round_trips() {
        let (data, _, count) = encode_jsonl_zst(Vec::<Rec>::new()).unwrap();
        assert_eq!(count, 0);
        assert!(decode_jsonl_zst::<Rec>(&data).unwrap().is_empty());
    }

    #[test]
    fn corrupt_line_is_named() {
        let text = "{\"id\":\"a\",\"n\":1,\"text\":\"\"}\n{\"id\":\"b\",\"n\":2,\"text\":\"\"}\n{\"id\":\"c\",\"n\":\n";
        let err = decode_jsonl_zst::<Rec>(&compress(text)).unwrap_err();
        assert!(matches!(err, ShardError::Line { line: 3, .. }), "{err:?}");
        assert!(err.to_string().starts_with("shard line 3:"), "{err}");
    }

    #[test]
    fn wrong_shape_line_is_named() {
        let text =
            "{\"id\":\"a\",\"n\":1,\"text\":\"\"}\n\n{\"id\":\"b\",\"n\":\"two\",\"text\":\"\"}\n";
        let err = decode_jsonl_zst::<Rec>(&compress(text)).unwrap_err();
        assert!(matches!(err, ShardError::Line { line: 3, .. }), "{err:?}");
    }

    #[test]
    fn blank_lines_and_missing_final_newline_are_fine() {
        let text =
            "\n{\"id\":\"a\",\"n\":1,\"text\":\"\"}\n  \n{\"id\":\"b\",\"n\":2,\"text\":\"\"}";
        let back: Vec<Rec> = decode_jsonl_zst(&compress(text)).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[1].id, "b");
    }

    #[test]
    fn not_zstd_is_an_error() {
        let err = decode_jsonl_zst::<Rec>(b"{\"id\":\"a\"}\n").unwrap_err();
        assert!(matches!(err, ShardError::Zstd(_)), "{err:?}");
        // A truncated frame fails too instead of returning fewer records.
        let (data, _, _) = encode_jsonl_zst(recs(200)).unwrap();
        assert!(decode_jsonl_zst::<Rec>(&data[..data.len() / 2]).is_err());
    }

    #[test]
    fn checksum_is_verified() {
        let shard = encode_shard(recs(3)).unwrap();
        assert_eq!(
            decode_verified::<Rec>(&shard.data, &shard.sha256)
                .unwrap()
                .len(),
            3
        );
        let err = decode_verified::<Rec>(&shard.data, &"0".repeat(64)).unwrap_err();
        assert!(matches!(err, ShardError::Checksum { .. }), "{err}");
    }

    #[test]
    fn unserializable_record_is_named() {
        use std::collections::HashMap;
        let mut bad = HashMap::new();
        bad.insert(vec![1u8], 1u8); // non-string map keys are not JSON
        let err = encode_jsonl_zst([HashMap::new(), bad]).unwrap_err();
        assert!(
            matches!(err, ShardError::Encode { index: 1, .. }),
            "{err:?}"
        );
    }
}
