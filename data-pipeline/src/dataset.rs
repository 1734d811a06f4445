//! A preprocessed corpus opened for reading: memory-mapped shards seen as one token stream
//!
//!   S = doc_0 [SEP] doc_1 [SEP] ... [SEP] doc_{D-1}        (length T + D - 1)
//!
//! cut into samples of `seq_len` tokens: sample k = [CLS] S[k·b .. (k+1)·b] [SEP], b = seq_len - 2,
//! the last one padded with [PAD]. Worked example, seq_len 6 (b = 4), documents "a b c", "d e":
//! S = a b c [SEP] d e; sample 0 = [CLS] a b c [SEP] [SEP], sample 1 = [CLS] d e [SEP] [PAD] [PAD].
//! Every token of every document appears exactly once, in order; nothing is built at open time
//! beyond one offset per shard (document lookups are binary searches in the mapped `.idx`).

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{DataError, Result};
use crate::format::{decode_idx, resolve_manifest, Manifest, IDX_HEADER_BYTES};
use crate::tokenizer::{sha256_hex, SpecialIds, Vocab};

struct Shard {
    bin_path: PathBuf,
    bin: Mmap,
    idx: Mmap,
    documents: u64,
}

impl Shard {
    fn tokens(&self) -> &[u32] {
        // SAFETY: the map is page-aligned and its length was checked to be 4 x tokens; u32 has no
        // invalid bit patterns. The shards are little-endian, as is every platform we build for.
        let (pre, ids, post) = unsafe { self.bin.align_to::<u32>() };
        debug_assert!(pre.is_empty() && post.is_empty());
        ids
    }

    fn offset(&self, i: u64) -> u64 {
        let at = IDX_HEADER_BYTES + 8 * i as usize;
        u64::from_le_bytes(self.idx[at..at + 8].try_into().unwrap())
    }
}

pub struct Dataset {
    pub manifest: Manifest,
    pub manifest_path: PathBuf,
    dir: PathBuf,
    shards: Vec<Shard>,
    /// Stream position where each shard starts, then the stream length.
    shard_starts: Vec<u64>,
    special: SpecialIds,
}

fn map(path: &Path) -> Result<Mmap> {
    let f = File::open(path).map_err(|e| DataError::shard(path, format!("cannot open: {e}")))?;
    // SAFETY: read-only map of a finished shard; shards are never modified after the manifest is written.
    unsafe { Mmap::map(&f) }.map_err(|e| DataError::shard(path, format!("cannot map: {e}")))
}

impl Dataset {
    /// Open the corpus named by `P`, `P.manifest.json`; with `vocab`, refuse a corpus made with
    /// another tokenizer. Sizes and index headers are checked; checksums only by `verify`.
    pub fn open(corpus: &Path, vocab: Option<&Vocab>, special: SpecialIds) -> Result<Dataset> {
        let manifest_path = resolve_manifest(corpus);
        let manifest = Manifest::read(&manifest_path)?;
        if let Some(v) = vocab {
            if v.sha256 != manifest.tokenizer.sha256 {
                return Err(DataError::manifest(
                    &manifest_path,
                    format!(
                        "made with tokenizer sha256 {} ({}), but {} has sha256 {}",
                        manifest.tokenizer.sha256,
                        manifest.tokenizer.path,
                        v.path.display(),
                        v.sha256
                    ),
                ));
            }
        }
        let dir = manifest_path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let mut shards = Vec::with_capacity(manifest.shards.len());
        let mut shard_starts = Vec::with_capacity(manifest.shards.len() + 1);
        let mut start = 0u64;
        for rec in &manifest.shards {
            let bin_path = dir.join(&rec.bin);
            let idx_path = dir.join(&rec.idx);
            let bin = map(&bin_path)?;
            if bin.len() as u64 != 4 * rec.tokens {
                return Err(DataError::shard(
                    &bin_path,
                    format!(
                        "{} bytes, the manifest says {} tokens ({} bytes): truncated or wrong shard",
                        bin.len(),
                        rec.tokens,
                        4 * rec.tokens
                    ),
                ));
            }
            let idx = map(&idx_path)?;
            decode_idx(&idx, &idx_path, rec.documents, rec.tokens)?;
            shard_starts.push(start);
            start += rec.tokens + rec.documents;
            shards.push(Shard {
                bin_path,
                bin,
                idx,
                documents: rec.documents,
            });
        }
        // No [SEP] after the very last document.
        shard_starts.push(start.saturating_sub(1));
        let max_id = manifest.tokenizer.vocab_size;
        if [special.pad, special.cls, special.sep].iter().any(|&i| i >= max_id) {
            return Err(DataError::manifest(
                &manifest_path,
                "special token ids outside the corpus' vocabulary",
            ));
        }
        Ok(Dataset {
            manifest,
            manifest_path,
            dir,
            shards,
            shard_starts,
            special,
        })
    }

    /// Recompute every shard file's sha256 and compare with the manifest.
    pub fn verify(&self, mut progress: impl FnMut(&str)) -> Result<()> {
        for (rec, shard) in self.manifest.shards.iter().zip(&self.shards) {
            progress(&rec.bin);
            if sha256_hex(&shard.bin) != rec.bin_sha256 {
                return Err(DataError::shard(
                    &shard.bin_path,
                    "sha256 differs from the manifest: the file is corrupt",
                ));
            }
            if sha256_hex(&shard.idx) != rec.idx_sha256 {
                return Err(DataError::shard(
                    &self.dir.join(&rec.idx),
                    "sha256 differs from the manifest: the file is corrupt",
                ));
            }
        }
        Ok(())
    }

    pub fn special(&self) -> SpecialIds {
        self.special
    }

    /// Length of the token stream S.
    pub fn stream_len(&self) -> u64 {
        *self.shard_starts.last().unwrap()
    }

    /// Samples per epoch at `seq_len`.
    pub fn num_samples(&self, seq_len: usize) -> u64 {
        self.stream_len().div_ceil(seq_len as u64 - 2)
    }

    /// The tokens of document `i` (global index), for tests and inspection.
    pub fn document(&self, mut i: u64) -> &[u32] {
        for s in &self.shards {
            if i < s.documents {
                let (a, b) = (s.offset(i) as usize, s.offset(i + 1) as usize);
                return &s.tokens()[a..b];
            }
            i -= s.documents;
        }
        panic!("document index out of range");
    }

    /// Append S[a..b] to `out`.
    pub fn read_stream(&self, a: u64, b: u64, out: &mut Vec<u32>) {
        let b = b.min(self.stream_len());
        if a >= b {
            return;
        }
        let mut s = self.shard_starts.partition_point(|&x| x <= a) - 1;
        let mut local = a - self.shard_starts[s];
        // doc i of shard s starts at offset(i) + i in shard-local stream coordinates.
        let shard = &self.shards[s];
        let (mut lo, mut hi) = (0u64, shard.documents);
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if shard.offset(mid) + mid <= local {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let mut doc = lo;
        local -= shard.offset(doc) + doc; // position inside the document (== length: its [SEP])
        let mut p = a;
        while p < b {
            let shard = &self.shards[s];
            let (start, end) = (shard.offset(doc), shard.offset(doc + 1));
            let len = end - start;
            if local < len {
                let n = (len - local).min(b - p);
                let from = (start + local) as usize;
                out.extend_from_slice(&shard.tokens()[from..from + n as usize]);
                p += n;
                local += n;
            } else {
                out.push(self.special.sep);
                p += 1;
                local = 0;
                doc += 1;
                if doc == shard.documents {
                    doc = 0;
                    s += 1;
                }
            }
        }
    }

    /// Sample k: `[CLS] S[k·b..(k+1)·b] [SEP]` padded to `seq_len` with `[PAD]`; returns the
    /// number of real (unpadded) tokens.
    pub fn sample(&self, k: u64, seq_len: usize, out: &mut Vec<u32>) -> usize {
        let body = seq_len as u64 - 2;
        out.clear();
        out.push(self.special.cls);
        self.read_stream(k * body, (k + 1) * body, out);
        out.push(self.special.sep);
        let real = out.len();
        out.resize(seq_len, self.special.pad);
        real
    }
}
