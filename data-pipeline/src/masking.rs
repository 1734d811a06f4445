//! Whole-word MLM masking (spec §9.2, DESIGN.md § Data), a pure function of the sample's tokens
//! and an RNG seeded by (seed, global sample index), so it does not depend on ranks or resumes.
//!
//! 1. Words: a piece starting with `▁` starts a word; other pieces extend the previous word.
//!    Special tokens belong to no word, so a span never covers or crosses one.
//! 2. Budget: round(15% of the non-special tokens), at least 1.
//! 3. Spans: span lengths n of 1-3 words are drawn with P(n) ∝ 1/n (6/11, 3/11, 2/11) and placed
//!    at word positions visited in a random order. A start where the span does not fit (words
//!    not adjacent or already chosen) is skipped and the same n tries the next start; a span that
//!    would overrun the budget is dropped and a new n drawn. Whole words only: a word is never
//!    split.
//! 4. Each chosen token: 80% `[MASK]`, 10% a random non-special token, 10% unchanged; its label is
//!    the original id, every other label `IGNORE_LABEL`.

use crate::error::{DataError, Result};
use crate::rng::Rng;
use crate::tokenizer::Vocab;

/// The label of positions without a prediction; equals `deberta_model::IGNORE_INDEX` (HF's
/// convention; the official code uses 0, spec pitfall 18).
pub const IGNORE_LABEL: i64 = -100;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MaskingConfig {
    /// Fraction of non-special tokens to predict.
    pub prob: f64,
    /// Longest span in words (span lengths 1..=max with P ∝ 1/n).
    pub max_span_words: usize,
    /// Of the chosen tokens: the fraction replaced by `[MASK]`...
    pub mask_frac: f64,
    /// ... and by a random token; the rest stay unchanged.
    pub random_frac: f64,
}

impl Default for MaskingConfig {
    fn default() -> Self {
        MaskingConfig {
            prob: 0.15,
            max_span_words: 3,
            mask_frac: 0.8,
            random_frac: 0.1,
        }
    }
}

impl MaskingConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, v: f64| DataError::Config(format!("masking.{f} = {v} must be in [0, 1]"));
        for (f, v) in [
            ("prob", self.prob),
            ("mask_frac", self.mask_frac),
            ("random_frac", self.random_frac),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(bad(f, v));
            }
        }
        if self.mask_frac + self.random_frac > 1.0 {
            return Err(DataError::Config(
                "masking.mask_frac + masking.random_frac must be <= 1".into(),
            ));
        }
        if self.max_span_words == 0 {
            return Err(DataError::Config("masking.max_span_words must be >= 1".into()));
        }
        Ok(())
    }
}

/// One chosen span: token positions [start, end) covering `words` whole words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub end: usize,
    pub words: usize,
}

/// What masking needs to know about the vocabulary, copied out of the tokenizer once.
#[derive(Debug, Clone)]
pub struct Masker {
    cfg: MaskingConfig,
    is_special: Vec<bool>,
    starts_word: Vec<bool>,
    mask_id: u32,
    vocab_size: u32,
    /// Cumulative P(n) for n = 1..=max_span_words.
    span_cdf: Vec<f64>,
}

impl Masker {
    pub fn new(vocab: &Vocab, cfg: MaskingConfig) -> Result<Masker> {
        cfg.validate()?;
        let n = vocab.vocab_size;
        let harmonic: f64 = (1..=cfg.max_span_words).map(|k| 1.0 / k as f64).sum();
        let mut acc = 0.0;
        let span_cdf = (1..=cfg.max_span_words)
            .map(|k| {
                acc += 1.0 / k as f64 / harmonic;
                acc
            })
            .collect();
        Ok(Masker {
            cfg,
            is_special: (0..n).map(|i| vocab.is_special(i)).collect(),
            starts_word: (0..n).map(|i| vocab.starts_word(i)).collect(),
            mask_id: vocab.special.mask,
            vocab_size: n,
            span_cdf,
        })
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.is_special.get(id as usize).copied().unwrap_or(true)
    }

    fn draw_span_words(&self, rng: &mut Rng) -> usize {
        let u = rng.next_f64();
        self.span_cdf
            .iter()
            .position(|&c| u < c)
            .unwrap_or(self.span_cdf.len() - 1)
            + 1
    }

    fn random_token(&self, rng: &mut Rng) -> u32 {
        loop {
            let t = rng.below(self.vocab_size as u64) as u32;
            if !self.is_special[t as usize] {
                return t;
            }
        }
    }

    /// Mask `tokens` in place and write `labels` (same length). Returns the chosen spans.
    pub fn mask(&self, tokens: &mut [u32], labels: &mut [i64], rng: &mut Rng) -> Vec<Span> {
        labels.fill(IGNORE_LABEL);
        // Words as [start, end) token ranges.
        let mut words: Vec<(usize, usize)> = Vec::with_capacity(tokens.len());
        let mut candidates = 0usize;
        for (i, &t) in tokens.iter().enumerate() {
            if self.is_special(t) {
                continue;
            }
            candidates += 1;
            let extends = !self.starts_word[t as usize] && matches!(words.last(), Some(&(_, end)) if end == i);
            if extends {
                words.last_mut().unwrap().1 = i + 1;
            } else {
                words.push((i, i + 1));
            }
        }
        if candidates == 0 {
            return Vec::new();
        }
        let budget = ((self.cfg.prob * candidates as f64).round() as usize)
            .max(1)
            .min(candidates);
        let mut order: Vec<u32> = (0..words.len() as u32).collect();
        rng.shuffle(&mut order);
        let mut taken = vec![false; words.len()];
        let mut spans = Vec::new();
        let mut chosen = 0usize;
        let mut n = self.draw_span_words(rng);
        for &w in &order {
            if chosen == budget {
                break;
            }
            let w = w as usize;
            // A start where the drawn span does not fit (past the end, across a special token,
            // over a chosen word) is skipped but the length is kept for the next start, so
            // placement does not bias the 1/n law against long spans.
            if w + n > words.len() {
                continue;
            }
            let adjacent = (w..w + n - 1).all(|k| words[k].1 == words[k + 1].0);
            if !adjacent || taken[w..w + n].iter().any(|&t| t) {
                continue;
            }
            let (start, end) = (words[w].0, words[w + n - 1].1);
            if chosen + (end - start) <= budget {
                taken[w..w + n].iter_mut().for_each(|t| *t = true);
                chosen += end - start;
                spans.push(Span { start, end, words: n });
            }
            // Taken, or over budget (only near the end): either way draw the next length.
            n = self.draw_span_words(rng);
        }
        for span in &spans {
            for i in span.start..span.end {
                labels[i] = tokens[i] as i64;
                let u = rng.next_f64();
                if u < self.cfg.mask_frac {
                    tokens[i] = self.mask_id;
                } else if u < self.cfg.mask_frac + self.cfg.random_frac {
                    tokens[i] = self.random_token(rng);
                }
            }
        }
        spans
    }
}
