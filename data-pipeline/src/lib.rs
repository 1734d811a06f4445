//! Data pipeline for DeBERTa pretraining (DESIGN.md § Data), in numbered stages:
//!
//! 1. `tokenizer`: text -> token ids (HF `tokenizers`; the DeBERTa-v3 128K vocabulary by default,
//!    or a Unigram tokenizer trained here).
//! 2. `preprocess`: text / jsonl files -> shards (`P_00000.bin` u32 ids, `P_00000.idx` document
//!    offsets) and `P.manifest.json`, streamed and tokenised in parallel. Formats: `format`.
//! 3. `dataset`: shards (memory-mapped) -> one virtual token stream (documents joined by `[SEP]`)
//!    cut into `seq_len` samples `[CLS] ... [SEP]`.
//! 4. `loader`: samples in a seeded per-epoch order (`permutation`) that does not depend on the
//!    number of data-parallel ranks; rank r takes its slice of each global batch; resume state is
//!    one number, the consumed samples; a background thread prefetches and masks.
//! 5. `masking`: whole-word MLM masks seeded per global sample index.
//!
//! 6. `superglue`: the SuperGLUE task files, their model inputs, metrics and submission files.

pub mod dataset;
pub mod error;
pub mod fixtures;
pub mod format;
pub mod loader;
pub mod masking;
pub mod permutation;
pub mod preprocess;
pub mod rng;
pub mod superglue;
pub mod tokenizer;

pub use error::{DataError, Result};
