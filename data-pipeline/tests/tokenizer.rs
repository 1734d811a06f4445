//! Tokenizer parity with Python sentencepiece, and training a Unigram tokenizer.

mod common;

use common::{corpus, deberta_tokenizer, shared_data};
use deberta_data::tokenizer::{train, Vocab};

#[derive(serde::Deserialize)]
struct Row {
    file: String,
    line: usize,
    ids: Vec<u32>,
}

#[test]
fn deberta_v3_tokenizer_json_matches_sentencepiece_line_for_line() {
    let vocab = Vocab::load(&deberta_tokenizer()).unwrap();
    let fixture =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/spm_ids.jsonl")).unwrap();
    let mut files = std::collections::HashMap::new();
    let (mut lines, mut tokens) = (0, 0);
    for row in fixture.lines() {
        let row: Row = serde_json::from_str(row).unwrap();
        let text = files
            .entry(row.file.clone())
            .or_insert_with(|| std::fs::read_to_string(shared_data().join("corpus").join(&row.file)).unwrap());
        let line = text.lines().nth(row.line - 1).unwrap();
        let ours = vocab.encode(line).unwrap();
        assert_eq!(ours, row.ids, "{}:{}: {line:?}", row.file, row.line);
        lines += 1;
        tokens += ours.len();
    }
    assert!(lines >= 2000 && tokens > 50_000, "{lines} lines, {tokens} tokens");
    assert_eq!(vocab.special.pad, 0);
    assert_eq!(vocab.special.cls, 1);
    assert_eq!(vocab.special.sep, 2);
    assert_eq!(vocab.special.unk, 3);
    assert_eq!(vocab.special.mask, 128000);
    assert_eq!(vocab.vocab_size, 128001);
    // SOURCES.md's worked example, with [CLS]/[SEP] added by the post-processor.
    let enc = vocab
        .tokenizer
        .encode("The quick brown fox jumped over the lazy dog.", true)
        .unwrap();
    assert_eq!(
        enc.get_ids(),
        [1, 279, 1538, 3258, 16123, 6827, 360, 262, 9118, 1560, 260, 2]
    );
}

#[test]
fn trains_a_unigram_tokenizer_with_the_deberta_special_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("tokenizer.json");
    let vocab = train(&[corpus("tinyshakespeare.txt")], 2000, &out).unwrap();
    assert_eq!(vocab.vocab_size, 2000);
    let s = vocab.special;
    assert_eq!((s.pad, s.cls, s.sep, s.unk, s.mask), (0, 1, 2, 3, 1999));
    let reloaded = Vocab::load(&out).unwrap();
    assert_eq!(reloaded.sha256, vocab.sha256);
    let ids = reloaded
        .encode("First Citizen: we are accounted poor citizens")
        .unwrap();
    assert!(ids.len() >= 6 && ids.iter().all(|&i| (4..1999).contains(&i)), "{ids:?}");
    assert!(reloaded.starts_word(ids[0]), "{}", reloaded.piece(ids[0]));
    let with_specials = reloaded.tokenizer.encode("we are", true).unwrap();
    assert_eq!(with_specials.get_ids().first(), Some(&1));
    assert_eq!(with_specials.get_ids().last(), Some(&2));
    assert!(shared_data().exists());
}
