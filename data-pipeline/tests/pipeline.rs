//! Preprocess -> dataset -> loader on real text: round trip, layout independence, resume.

mod common;

use std::collections::HashMap;

use common::{batcher, build, corpus, layout};
use deberta_data::loader::Loader;
use deberta_data::masking::IGNORE_LABEL;
use deberta_data::tokenizer::Vocab;

/// Documents the way `preprocess --format text` cuts them: blank-line separated, lines joined
/// by a space (an independent re-implementation for the test).
fn documents(path: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut docs = Vec::new();
    let mut cur: Vec<&str> = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            if !cur.is_empty() {
                docs.push(cur.join(" "));
                cur.clear();
            }
        } else {
            cur.push(line.trim_end());
        }
    }
    if !cur.is_empty() {
        docs.push(cur.join(" "));
    }
    docs
}

#[test]
fn every_token_comes_back_once_in_order_across_shards_and_samples() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = vec![corpus("wikitext2_valid.tokens.txt"), corpus("tinyshakespeare.txt")];
    // Small shards: the corpus spans many of them, so documents meet shard boundaries.
    let (vocab, ds) = build(tmp.path(), inputs.clone(), 50_000);
    assert!(ds.manifest.shards.len() >= 8, "{} shards", ds.manifest.shards.len());

    // Reference: each document encoded on its own.
    let docs: Vec<String> = inputs.iter().flat_map(|p| documents(p)).collect();
    let encoded: Vec<Vec<u32>> = docs
        .iter()
        .map(|d| vocab.encode(d).unwrap())
        .filter(|ids| !ids.is_empty())
        .collect();
    assert_eq!(ds.manifest.documents, encoded.len() as u64);
    for (i, want) in encoded.iter().enumerate().step_by(97) {
        assert_eq!(ds.document(i as u64), &want[..], "document {i}");
    }
    let mut want_stream: Vec<u32> = Vec::new();
    for (i, d) in encoded.iter().enumerate() {
        if i > 0 {
            want_stream.push(vocab.special.sep);
        }
        want_stream.extend_from_slice(d);
    }

    // Decode every sample back: [CLS] body [SEP] [PAD]...
    for seq_len in [128usize, 509] {
        let mut got: Vec<u32> = Vec::with_capacity(want_stream.len());
        let mut sample = Vec::new();
        for k in 0..ds.num_samples(seq_len) {
            let real = ds.sample(k, seq_len, &mut sample);
            assert_eq!(sample.len(), seq_len);
            assert_eq!(sample[0], vocab.special.cls);
            assert_eq!(sample[real - 1], vocab.special.sep);
            assert!(sample[real..].iter().all(|&t| t == vocab.special.pad));
            got.extend_from_slice(&sample[1..real - 1]);
        }
        assert_eq!(got.len(), want_stream.len(), "seq_len {seq_len}");
        assert!(got == want_stream, "seq_len {seq_len}: token stream differs");
    }
}

#[test]
fn an_epoch_visits_every_sample_once_and_the_next_epoch_reorders() {
    let tmp = tempfile::tempdir().unwrap();
    let (vocab, ds) = build(tmp.path(), vec![corpus("wikitext2_test.tokens.txt")], 1 << 30);
    let b = batcher(&vocab, &ds, layout(256, 8, 8, 0, 1));
    let n = b.samples_per_epoch();
    let first: Vec<u64> = (0..n).map(|g| b.sample_id(g)).collect();
    let mut sorted = first.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..n).collect::<Vec<_>>());
    let second: Vec<u64> = (n..2 * n).map(|g| b.sample_id(g)).collect();
    assert_ne!(first, second);
}

/// (ids, attention_mask, labels) of every row of a step, keyed by consumption index.
type Rows = HashMap<u64, (Vec<i64>, Vec<i64>, Vec<i64>)>;

fn rows_of(mb: &deberta_data::loader::MicroBatch, seq_len: usize, into: &mut Rows) {
    for (r, &g) in mb.consumed_index.iter().enumerate() {
        let s = r * seq_len..(r + 1) * seq_len;
        let row = (
            mb.ids[s.clone()].to_vec(),
            mb.attention_mask[s.clone()].to_vec(),
            mb.labels[s].to_vec(),
        );
        assert!(into.insert(g, row).is_none(), "row {g} served twice");
    }
}

#[test]
fn ranks_together_see_exactly_the_single_rank_global_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let (vocab, ds) = build(tmp.path(), vec![corpus("wikitext2_test.tokens.txt")], 1 << 30);
    let (seq_len, global) = (128, 16u64);
    let reference = batcher(&vocab, &ds, layout(seq_len, global, 4, 0, 1));
    for step in [0u64, 1, 7, 250] {
        let mut want = Rows::new();
        for micro in 0..4 {
            rows_of(&reference.micro_batch(step, micro), seq_len, &mut want);
        }
        assert_eq!(want.len(), 16);
        assert!(
            want.values().any(|(_, _, l)| l.iter().any(|&x| x != IGNORE_LABEL)),
            "no masks?"
        );
        for (dp, micro_batch) in [(2u64, 2u64), (4, 1), (4, 4)] {
            let mut got = Rows::new();
            for rank in 0..dp {
                let b = batcher(&vocab, &ds, layout(seq_len, global, micro_batch, rank, dp));
                for micro in 0..b.layout.micro_steps() {
                    let mb = b.micro_batch(step, micro);
                    // Rank r's rows are the r-th contiguous slice of the global batch.
                    let lo = step * global + rank * global / dp;
                    assert!(mb.consumed_index.iter().all(|g| (lo..lo + global / dp).contains(g)));
                    rows_of(&mb, seq_len, &mut got);
                }
            }
            assert!(
                got == want,
                "step {step}: dp {dp} x micro {micro_batch} differs from dp 1"
            );
        }
    }
}

#[test]
fn resuming_at_k_consumed_samples_continues_the_same_stream() {
    let tmp = tempfile::tempdir().unwrap();
    let (vocab, ds) = build(tmp.path(), vec![corpus("wikitext2_test.tokens.txt")], 1 << 30);
    let lay = layout(128, 8, 2, 1, 2); // rank 1 of 2, 2 micro-batches per step
    let mut straight = Loader::start(batcher(&vocab, &ds, lay), 0, 3).unwrap();
    let all: Vec<_> = (0..10).map(|_| straight.next_step()).collect();
    for k in [1u64, 4, 9] {
        let mut resumed = Loader::start(batcher(&vocab, &ds, lay), k * 8, 3).unwrap();
        for want in &all[k as usize..] {
            assert_eq!(&resumed.next_step(), want, "resumed at step {k}");
        }
    }
    assert!(
        Loader::start(batcher(&vocab, &ds, lay), 5, 3).is_err(),
        "mid-step resume must be refused"
    );
    let _ = Vocab::load(&common::deberta_tokenizer()).unwrap();
}
