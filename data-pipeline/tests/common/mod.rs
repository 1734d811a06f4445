//! Shared helpers: the real data in ../shared/data and small corpora built from it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use deberta_data::dataset::Dataset;
use deberta_data::loader::{BatchLayout, Batcher};
use deberta_data::masking::{Masker, MaskingConfig};
use deberta_data::preprocess::{preprocess, InputFormat, PreprocessOptions};
use deberta_data::tokenizer::Vocab;

pub fn shared_data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data")
}

pub fn deberta_tokenizer() -> PathBuf {
    shared_data().join("tokenizers/deberta-v3-base/tokenizer.json")
}

pub fn corpus(name: &str) -> PathBuf {
    shared_data().join("corpus").join(name)
}

pub fn options(inputs: Vec<PathBuf>, prefix: &Path, shard_tokens: u64) -> PreprocessOptions {
    PreprocessOptions {
        tokenizer: deberta_tokenizer(),
        inputs,
        output_prefix: prefix.to_path_buf(),
        format: InputFormat::Text,
        shard_tokens,
        workers: 2,
        progress: false,
    }
}

/// Preprocess `inputs` into `dir/corpus` and open it.
pub fn build(dir: &Path, inputs: Vec<PathBuf>, shard_tokens: u64) -> (Arc<Vocab>, Arc<Dataset>) {
    let vocab = Arc::new(Vocab::load(&deberta_tokenizer()).unwrap());
    let prefix = dir.join("corpus");
    preprocess(&options(inputs, &prefix, shard_tokens)).unwrap();
    let ds = Dataset::open(&prefix, Some(&vocab), vocab.special).unwrap();
    (vocab, Arc::new(ds))
}

pub fn batcher(vocab: &Vocab, ds: &Arc<Dataset>, layout: BatchLayout) -> Batcher {
    Batcher::new(
        ds.clone(),
        Arc::new(Masker::new(vocab, MaskingConfig::default()).unwrap()),
        layout,
    )
    .unwrap()
}

pub fn layout(seq_len: usize, global_batch: u64, micro_batch: u64, dp_rank: u64, dp_size: u64) -> BatchLayout {
    BatchLayout {
        seq_len,
        global_batch,
        micro_batch,
        dp_rank,
        dp_size,
        seed: 1234,
    }
}
