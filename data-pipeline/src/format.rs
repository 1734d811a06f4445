//! On-disk formats of a preprocessed corpus with output prefix `P` (e.g. `data/wiki`):
//!
//! `P_00000.bin`: the shard's token ids, u32 little-endian, documents back to back, no header
//! (so the whole file memory-maps as `[u32]`).
//!
//! `P_00000.idx`: where each document starts, little-endian:
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | 8 | magic `DBRTIDX\0` |
//! | 8 | 4 | format version (u32) = 1 |
//! | 12 | 4 | reserved, 0 |
//! | 16 | 8 | `n_docs` (u64) |
//! | 24 | 8 × (n_docs + 1) | token offsets into the `.bin` (u64): 0, end of doc 0, ..., tokens in shard |
//!
//! Example: documents of 3, 5 and 2 tokens -> `.bin` is 40 bytes; `.idx` holds n_docs = 3 and
//! offsets [0, 3, 8, 10]. A document never spans two shards; a shard is closed at the first
//! document boundary after `--shard-tokens` tokens.
//!
//! `P.manifest.json`: the corpus as a whole (struct `Manifest`): format version, the tokenizer's
//! sha256 and vocabulary size, document and token totals, and per shard its file names
//! (relative to the manifest), counts and sha256. It is written last: a corpus without a
//! manifest is incomplete.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

pub const IDX_MAGIC: &[u8; 8] = b"DBRTIDX\0";
pub const IDX_VERSION: u32 = 1;
pub const IDX_HEADER_BYTES: usize = 24;
pub const MANIFEST_FORMAT: &str = "deberta-token-shards";
pub const MANIFEST_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenizerRecord {
    /// Where the tokenizer was read from at preprocessing time (informative).
    pub path: String,
    pub sha256: String,
    pub vocab_size: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShardRecord {
    pub bin: String,
    pub idx: String,
    pub documents: u64,
    pub tokens: u64,
    pub bin_sha256: String,
    pub idx_sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub tokenizer: TokenizerRecord,
    pub documents: u64,
    pub tokens: u64,
    pub shards: Vec<ShardRecord>,
    /// The input files, in order.
    pub inputs: Vec<String>,
}

/// `P.manifest.json` for an output prefix `P`.
pub fn manifest_path(prefix: &Path) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(".manifest.json");
    PathBuf::from(s)
}

/// `P_00000.bin` / `P_00000.idx` file names (no directory).
pub fn shard_names(prefix: &Path, index: usize) -> (String, String) {
    let stem = prefix
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    (format!("{stem}_{index:05}.bin"), format!("{stem}_{index:05}.idx"))
}

/// Accept `P`, `P.manifest.json` or a directory path to name a corpus; returns the manifest path.
pub fn resolve_manifest(p: &Path) -> PathBuf {
    if p.to_string_lossy().ends_with(".manifest.json") {
        p.to_path_buf()
    } else {
        manifest_path(p)
    }
}

impl Manifest {
    pub fn read(path: &Path) -> Result<Manifest> {
        let text = std::fs::read_to_string(path).map_err(|e| DataError::manifest(path, format!("cannot read: {e}")))?;
        let de = &mut serde_json::Deserializer::from_str(&text);
        let m: Manifest = serde_path_to_error::deserialize(de)
            .map_err(|e| DataError::manifest(path, format!("field `{}`: {}", e.path(), e.inner())))?;
        if m.format != MANIFEST_FORMAT || m.version != MANIFEST_VERSION {
            return Err(DataError::manifest(
                path,
                format!(
                    "format {:?} version {} is not {MANIFEST_FORMAT:?} version {MANIFEST_VERSION}",
                    m.format, m.version
                ),
            ));
        }
        let docs: u64 = m.shards.iter().map(|s| s.documents).sum();
        let toks: u64 = m.shards.iter().map(|s| s.tokens).sum();
        if docs != m.documents || toks != m.tokens {
            return Err(DataError::manifest(
                path,
                "shard counts do not add up to `documents`/`tokens`",
            ));
        }
        Ok(m)
    }
}

/// Encode an `.idx` file's bytes.
pub fn encode_idx(offsets: &[u64]) -> Vec<u8> {
    let n_docs = offsets.len().saturating_sub(1) as u64;
    let mut out = Vec::with_capacity(IDX_HEADER_BYTES + 8 * offsets.len());
    out.extend_from_slice(IDX_MAGIC);
    out.extend_from_slice(&IDX_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&n_docs.to_le_bytes());
    for o in offsets {
        out.extend_from_slice(&o.to_le_bytes());
    }
    out
}

/// Check an `.idx` file's header against the manifest and return its offsets.
pub fn decode_idx(bytes: &[u8], path: &Path, docs: u64, tokens: u64) -> Result<Vec<u64>> {
    if bytes.len() < IDX_HEADER_BYTES || &bytes[..8] != IDX_MAGIC {
        return Err(DataError::shard(path, "not a document index (bad magic)"));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
    if version != IDX_VERSION {
        return Err(DataError::shard(
            path,
            format!("index format version {version}, expected {IDX_VERSION}"),
        ));
    }
    let n_docs = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
    let want_len = IDX_HEADER_BYTES as u64 + 8 * (n_docs + 1);
    if n_docs != docs || bytes.len() as u64 != want_len {
        return Err(DataError::shard(
            path,
            format!("{} bytes for {n_docs} documents; the manifest says {docs} documents ({want_len} bytes): truncated or wrong shard", bytes.len()),
        ));
    }
    let offsets: Vec<u64> = bytes[IDX_HEADER_BYTES..]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    if offsets[0] != 0 || offsets[offsets.len() - 1] != tokens || offsets.windows(2).any(|w| w[0] > w[1]) {
        return Err(DataError::shard(
            path,
            "document offsets are not increasing from 0 to the shard's token count",
        ));
    }
    Ok(offsets)
}
