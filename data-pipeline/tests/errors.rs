//! Bad input: every error names the file and the line or shard, and a failed preprocess leaves
//! nothing behind that looks like a corpus.

mod common;

use std::path::Path;

use common::{build, corpus, deberta_tokenizer, options, shared_data};
use deberta_data::dataset::Dataset;
use deberta_data::preprocess::{preprocess, InputFormat};
use deberta_data::tokenizer::Vocab;

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Preprocess must fail with all of `words` in the message and leave `dir` as it was.
fn fails(dir: &Path, inputs: Vec<std::path::PathBuf>, format: InputFormat, words: &[&str]) {
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let mut opts = options(inputs, &out.join("corpus"), 2_000);
    opts.format = format;
    let err = preprocess(&opts).expect_err("preprocess should fail").to_string();
    for w in words {
        assert!(err.contains(w), "{w:?} not in {err:?}");
    }
    assert!(files_in(&out).is_empty(), "left behind: {:?}", files_in(&out));
}

#[test]
fn bad_text_inputs_are_named_by_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();

    let empty = d.join("empty.txt");
    std::fs::write(&empty, "\n\n  \n").unwrap();
    fails(
        d,
        vec![empty.clone()],
        InputFormat::Text,
        &["empty.txt", "no documents"],
    );

    // A good file first (it produces shards), then a bad line: nothing may remain.
    let latin1 = d.join("latin1.txt");
    std::fs::write(&latin1, b"fine line\nna\xefve caf\xe9\n").unwrap();
    fails(
        d,
        vec![corpus("tinyshakespeare.txt"), latin1],
        InputFormat::Text,
        &["latin1.txt:2", "UTF-8"],
    );

    let jsonl = d.join("docs.jsonl");
    std::fs::write(&jsonl, "{\"text\": \"one\"}\n{\"body\": \"two\"}\n").unwrap();
    let field = InputFormat::Jsonl { field: "text".into() };
    fails(d, vec![jsonl], field.clone(), &["docs.jsonl:2", "no field \"text\""]);

    let broken = d.join("broken.jsonl");
    std::fs::write(&broken, "{\"text\": \"one\"}\n\n{\"text\": \"two\"\n").unwrap();
    fails(d, vec![broken], field.clone(), &["broken.jsonl:3", "not valid JSON"]);

    fails(d, vec![d.join("missing.txt")], InputFormat::Text, &["missing.txt"]);
}

#[test]
fn jsonl_documents_are_read_from_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let jsonl = tmp.path().join("docs.jsonl");
    std::fs::write(
        &jsonl,
        "{\"id\": 1, \"text\": \"Hello world\"}\n\n{\"id\": 2, \"text\": \"Second\\ndocument\"}",
    )
    .unwrap();
    let mut opts = options(vec![jsonl], &tmp.path().join("j"), 1 << 20);
    opts.format = InputFormat::Jsonl { field: "text".into() };
    let summary = preprocess(&opts).unwrap();
    assert_eq!(summary.documents, 2);
    let vocab = Vocab::load(&deberta_tokenizer()).unwrap();
    let ds = Dataset::open(&tmp.path().join("j"), Some(&vocab), vocab.special).unwrap();
    assert_eq!(ds.document(0), &vocab.encode("Hello world").unwrap()[..]);
}

#[test]
fn damaged_corpora_are_refused_naming_the_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let (vocab, _) = build(tmp.path(), vec![corpus("wikitext2_test.tokens.txt")], 100_000);
    let prefix = tmp.path().join("corpus");
    let open = || Dataset::open(&prefix, Some(&vocab), vocab.special);

    // A flipped byte: sizes still match, the checksum does not.
    let bin = tmp.path().join("corpus_00001.bin");
    let mut bytes = std::fs::read(&bin).unwrap();
    bytes[1000] ^= 0x40;
    std::fs::write(&bin, &bytes).unwrap();
    let err = open().unwrap().verify(|_| {}).unwrap_err().to_string();
    assert!(err.contains("corpus_00001.bin") && err.contains("sha256"), "{err}");
    bytes[1000] ^= 0x40;
    std::fs::write(&bin, &bytes).unwrap();
    open().unwrap().verify(|_| {}).unwrap();

    // A truncated shard.
    std::fs::write(&bin, &bytes[..bytes.len() - 6]).unwrap();
    let err = open().err().expect("truncated shard accepted").to_string();
    assert!(err.contains("corpus_00001.bin") && err.contains("truncated"), "{err}");
    std::fs::write(&bin, &bytes).unwrap();

    // A truncated index.
    let idx = tmp.path().join("corpus_00000.idx");
    let ib = std::fs::read(&idx).unwrap();
    std::fs::write(&idx, &ib[..ib.len() - 8]).unwrap();
    let err = open().err().expect("truncated index accepted").to_string();
    assert!(err.contains("corpus_00000.idx"), "{err}");
    std::fs::write(&idx, &ib).unwrap();

    // The corpus was made with another tokenizer.
    let bert = Vocab::load(&shared_data().join("tokenizers/bert-base-uncased/tokenizer.json")).unwrap();
    let err = Dataset::open(&prefix, Some(&bert), vocab.special)
        .err()
        .expect("tokenizer mismatch accepted")
        .to_string();
    assert!(
        err.contains("corpus.manifest.json") && err.contains("bert-base-uncased"),
        "{err}"
    );

    // A missing manifest names itself.
    let err = Dataset::open(&tmp.path().join("nothing"), None, vocab.special)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("nothing.manifest.json"), "{err}");
}
