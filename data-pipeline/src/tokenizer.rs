//! Tokenizers: load any HF `tokenizer.json`, or train a SentencePiece-style Unigram one.
//!
//! The DeBERTa convention (spec §8, pitfall 15): `[PAD]`=0, `[CLS]`=1, `[SEP]`=2, `[UNK]`=3 and
//! `[MASK]` after the pieces (128000 in the DeBERTa-v3 128K vocabulary). Pieces that begin with
//! the Metaspace marker `▁` start a word; whole-word masking groups on that.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokenizers::decoders::metaspace::Metaspace as MetaspaceDecoder;
use tokenizers::models::unigram::{Unigram, UnigramTrainer};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::unicode::NFKC;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{DataError, Result};

/// The word-start marker of SentencePiece / Metaspace.
pub const WORD_START: char = '▁';
/// Special tokens in id order, then `[MASK]` last.
pub const SPECIALS: [&str; 4] = ["[PAD]", "[CLS]", "[SEP]", "[UNK]"];
pub const MASK: &str = "[MASK]";

/// The ids of the special tokens the pipeline uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialIds {
    pub pad: u32,
    pub cls: u32,
    pub sep: u32,
    pub unk: u32,
    pub mask: u32,
}

/// A loaded tokenizer with what the pipeline needs to know about its vocabulary.
pub struct Vocab {
    pub tokenizer: Tokenizer,
    pub path: PathBuf,
    /// sha256 of the `tokenizer.json` bytes: shards record it, the loader checks it.
    pub sha256: String,
    /// Ids in use, added tokens included (128001 for DeBERTa-v3: 128000 pieces + `[MASK]`).
    pub vocab_size: u32,
    pub special: SpecialIds,
    /// Per id: never masked or drawn as a random replacement.
    is_special: Vec<bool>,
    /// Per id: the piece begins with `▁`.
    starts_word: Vec<bool>,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

impl Vocab {
    pub fn load(path: &Path) -> Result<Vocab> {
        let bytes = std::fs::read(path).map_err(|e| DataError::tokenizer(path, format!("cannot read: {e}")))?;
        let tokenizer = Tokenizer::from_bytes(&bytes)
            .map_err(|e| DataError::tokenizer(path, format!("not a valid tokenizer.json: {e}")))?;
        let id = |name: &str| {
            tokenizer
                .token_to_id(name)
                .ok_or_else(|| DataError::tokenizer(path, format!("has no {name} token")))
        };
        let special = SpecialIds {
            pad: id("[PAD]")?,
            cls: id("[CLS]")?,
            sep: id("[SEP]")?,
            unk: id("[UNK]")?,
            mask: id(MASK)?,
        };
        let vocab_size = tokenizer.get_vocab_size(true) as u32;
        let mut is_special = vec![false; vocab_size as usize];
        let mut starts_word = vec![false; vocab_size as usize];
        for i in 0..vocab_size {
            if let Some(piece) = tokenizer.id_to_token(i) {
                starts_word[i as usize] = piece.starts_with(WORD_START);
            }
        }
        for (i, tok) in tokenizer.get_added_tokens_decoder() {
            if tok.special && (i as usize) < is_special.len() {
                is_special[i as usize] = true;
            }
        }
        for i in [special.pad, special.cls, special.sep, special.unk, special.mask] {
            is_special[i as usize] = true;
        }
        Ok(Vocab {
            tokenizer,
            path: path.to_path_buf(),
            sha256: sha256_hex(&bytes),
            vocab_size,
            special,
            is_special,
            starts_word,
        })
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.is_special.get(id as usize).copied().unwrap_or(true)
    }

    pub fn starts_word(&self, id: u32) -> bool {
        self.starts_word.get(id as usize).copied().unwrap_or(false)
    }

    /// Token ids of one text, without `[CLS]`/`[SEP]`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| DataError::tokenizer(&self.path, format!("encode failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of many texts, in parallel on the current rayon pool.
    pub fn encode_batch(&self, texts: Vec<String>) -> Result<Vec<Vec<u32>>> {
        let encs = self
            .tokenizer
            .encode_batch_fast(texts, false)
            .map_err(|e| DataError::tokenizer(&self.path, format!("encode failed: {e}")))?;
        Ok(encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Pieces of `ids` joined as text (special tokens kept, so masks stay visible).
    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer
            .decode(ids, false)
            .unwrap_or_else(|e| format!("<decode failed: {e}>"))
    }

    pub fn piece(&self, id: u32) -> String {
        self.tokenizer.id_to_token(id).unwrap_or_else(|| format!("<{id}>"))
    }
}

/// Train a Unigram tokenizer of `vocab_size` ids in all (the four specials, the learned pieces,
/// then `[MASK]`), NFKC-normalised, Metaspace pre-tokenised, with the `[CLS] A [SEP] (B [SEP])`
/// template. Each line of each file is one training sentence. Writes `out` atomically.
pub fn train(files: &[PathBuf], vocab_size: u32, out: &Path) -> Result<Vocab> {
    if vocab_size < 16 {
        return Err(DataError::Config(format!(
            "--vocab-size {vocab_size} is too small (at least 16)"
        )));
    }
    for f in files {
        let meta = std::fs::metadata(f).map_err(|e| DataError::input(f, format!("cannot read: {e}")))?;
        if meta.len() == 0 {
            return Err(DataError::input(f, "is empty"));
        }
    }
    let specials: Vec<AddedToken> = SPECIALS.iter().map(|s| AddedToken::from(*s, true)).collect();
    let trainer = UnigramTrainer::builder()
        .vocab_size(vocab_size - 1) // [MASK] comes after the learned pieces
        .special_tokens(specials)
        .unk_token(Some("[UNK]".to_string()))
        .show_progress(false)
        .build()
        .map_err(|e| DataError::Config(format!("unigram trainer: {e}")))?;
    let mut tokenizer = Tokenizer::new(Unigram::default());
    tokenizer
        .with_normalizer(Some(NFKC))
        .map_err(|e| DataError::Config(format!("tokenizer normalizer: {e}")))?;
    tokenizer.with_pre_tokenizer(Some(Metaspace::new(WORD_START, PrependScheme::Always, true)));
    tokenizer.with_decoder(Some(MetaspaceDecoder::new(WORD_START, PrependScheme::Always, true)));
    let mut trainer: TrainerWrapper = trainer.into();
    let names: Vec<String> = files.iter().map(|f| f.to_string_lossy().into_owned()).collect();
    tokenizer
        .train_from_files(&mut trainer, names)
        .map_err(|e| DataError::Config(format!("training failed: {e}")))?;
    tokenizer
        .add_special_tokens([AddedToken::from(MASK, true)])
        .map_err(|e| DataError::Config(format!("adding {MASK}: {e}")))?;
    let id = |s: &str| tokenizer.token_to_id(s).expect("special token was added");
    let (cls, sep) = (id("[CLS]"), id("[SEP]"));
    let template = TemplateProcessing::builder()
        .try_single("[CLS] $A [SEP]")
        .and_then(|b| b.try_pair("[CLS] $A [SEP] $B:1 [SEP]:1"))
        .map_err(|e| DataError::Config(format!("template: {e}")))?
        .special_tokens(vec![("[CLS]", cls), ("[SEP]", sep)])
        .build()
        .map_err(|e| DataError::Config(format!("template: {e}")))?;
    tokenizer.with_post_processor(Some(template));
    let tmp = out.with_extension("json.tmp");
    tokenizer
        .save(&tmp, false)
        .map_err(|e| DataError::output(out, format!("cannot write: {e}")))?;
    std::fs::rename(&tmp, out).map_err(|e| DataError::output(out, format!("cannot write: {e}")))?;
    Vocab::load(out)
}
