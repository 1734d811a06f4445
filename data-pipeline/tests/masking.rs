//! Masking statistics over real text (> 100k tokens): the 15% budget, the 80/10/10 split, the
//! 1/n span-length law, no special token ever chosen, no word ever split.

mod common;

use common::{batcher, build, corpus, layout};
use deberta_data::masking::IGNORE_LABEL;
use deberta_data::masking::{Masker, MaskingConfig};
use deberta_data::rng::Rng;

#[test]
fn masking_statistics_follow_the_recipe() {
    let tmp = tempfile::tempdir().unwrap();
    let (vocab, ds) = build(tmp.path(), vec![corpus("wikitext2_valid.tokens.txt")], 1 << 30);
    let masker = Masker::new(&vocab, MaskingConfig::default()).unwrap();
    let seq_len = 512;
    let (mut candidates, mut chosen, mut as_mask, mut as_random, mut kept) = (0usize, 0usize, 0usize, 0usize, 0usize);
    let mut span_words = [0usize; 4];
    let mut sample = Vec::new();
    for k in 0..ds.num_samples(seq_len).min(300) {
        let real = ds.sample(k, seq_len, &mut sample);
        let original = sample[..real].to_vec();
        let mut tokens = original.clone();
        let mut labels = vec![0i64; real];
        let spans = masker.mask(&mut tokens, &mut labels, &mut Rng::new(k));
        candidates += original.iter().filter(|&&t| !vocab.is_special(t)).count();
        for s in &spans {
            span_words[s.words] += 1;
            // Whole words: the span starts a word and the next token starts one (or is special/end).
            assert!(
                vocab.starts_word(original[s.start]) || s.start == 0 || vocab.is_special(original[s.start - 1]),
                "span at {} starts inside a word",
                s.start
            );
            assert!(
                s.end == real || vocab.starts_word(original[s.end]) || vocab.is_special(original[s.end]),
                "span ending at {} splits a word",
                s.end
            );
        }
        for i in 0..real {
            if labels[i] == IGNORE_LABEL {
                assert_eq!(tokens[i], original[i], "unlabelled position {i} changed");
                continue;
            }
            assert_eq!(labels[i], original[i] as i64);
            assert!(!vocab.is_special(original[i]), "special token {} chosen", original[i]);
            assert!(spans.iter().any(|s| (s.start..s.end).contains(&i)));
            chosen += 1;
            if tokens[i] == vocab.special.mask {
                as_mask += 1;
            } else if tokens[i] == original[i] {
                kept += 1;
            } else {
                assert!(!vocab.is_special(tokens[i]), "random replacement is special");
                as_random += 1;
            }
        }
    }
    assert!(candidates > 100_000, "{candidates} tokens");
    let frac = chosen as f64 / candidates as f64;
    assert!((frac - 0.15).abs() <= 0.005, "masked fraction {frac:.4}");
    let share = |n: usize| n as f64 / chosen as f64;
    assert!(
        (share(as_mask) - 0.8).abs() <= 0.02,
        "[MASK] share {:.4}",
        share(as_mask)
    );
    assert!(
        (share(as_random) - 0.1).abs() <= 0.02,
        "random share {:.4}",
        share(as_random)
    );
    assert!((share(kept) - 0.1).abs() <= 0.02, "kept share {:.4}", share(kept));
    let spans: usize = span_words.iter().sum();
    for (n, want) in [(1, 6.0 / 11.0), (2, 3.0 / 11.0), (3, 2.0 / 11.0)] {
        let got = span_words[n] as f64 / spans as f64;
        assert!(
            (got - want).abs() <= 0.03,
            "spans of {n} words: {got:.4}, want {want:.4} ({span_words:?})"
        );
    }
    eprintln!(
        "{candidates} tokens: chosen {frac:.4}, mask/random/kept {:.3}/{:.3}/{:.3}, spans {span_words:?}",
        share(as_mask),
        share(as_random),
        share(kept)
    );
}

#[test]
fn masks_are_a_function_of_seed_and_consumption_index_only() {
    let tmp = tempfile::tempdir().unwrap();
    let (vocab, ds) = build(tmp.path(), vec![corpus("wikitext2_test.tokens.txt")], 1 << 30);
    let b = batcher(&vocab, &ds, layout(128, 4, 4, 0, 1));
    let row = |g| {
        let (mut i, mut m, mut l) = (Vec::new(), Vec::new(), Vec::new());
        b.row(g, &mut i, &mut m, &mut l);
        (i, l)
    };
    assert_eq!(row(5), row(5));
    // The same sample revisited in the next epoch gets a fresh mask (dynamic masking).
    let n = b.samples_per_epoch();
    let g2 = (n..2 * n).find(|&g| b.sample_id(g) == b.sample_id(5)).unwrap();
    assert_ne!(row(5).1, row(g2).1);
}
