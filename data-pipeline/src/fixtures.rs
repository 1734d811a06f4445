//! A small real corpus for the multi-rank tests of the trainer and the launcher: Tiny
//! Shakespeare with a 1000-piece tokenizer trained on it (fast to load), WikiText-2 test held
//! out, both from ../shared/data.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::preprocess::{preprocess, InputFormat, PreprocessOptions};

/// Where ../shared/data is, seen from this crate.
pub fn shared(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data")
        .join(rel)
}

pub struct TinyCorpus {
    pub tokenizer: PathBuf,
    pub corpus: PathBuf,
    pub valid: PathBuf,
}

impl TinyCorpus {
    /// Train the tokenizer and preprocess both corpora into `dir`.
    pub fn build(dir: &Path) -> crate::Result<TinyCorpus> {
        let tokenizer = dir.join("tok.json");
        crate::tokenizer::train(&[shared("corpus/tinyshakespeare.txt")], 1000, &tokenizer)?;
        let opts = |input: &str, prefix: &str| PreprocessOptions {
            tokenizer: tokenizer.clone(),
            inputs: vec![shared(input)],
            output_prefix: dir.join(prefix),
            format: InputFormat::Text,
            shard_tokens: 100_000,
            workers: 2,
            progress: false,
        };
        preprocess(&opts("corpus/tinyshakespeare.txt", "train"))?;
        preprocess(&opts("corpus/wikitext2_test.tokens.txt", "valid"))?;
        Ok(TinyCorpus {
            tokenizer,
            corpus: dir.join("train"),
            valid: dir.join("valid"),
        })
    }
}

/// The tiny corpus, built once per process in a temporary directory (the multi-rank test
/// binaries share it between their tests).
pub fn tiny_corpus() -> &'static TinyCorpus {
    static DATA: OnceLock<(tempfile::TempDir, TinyCorpus)> = OnceLock::new();
    &DATA
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let corpus = TinyCorpus::build(dir.path()).expect("the tiny corpus builds");
            (dir, corpus)
        })
        .1
}
