//! `deberta tokenizer train`, `deberta preprocess`, `deberta data inspect|bench` end to end.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn deberta(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deberta"))
        .args(args)
        .output()
        .expect("run deberta")
}

fn shared(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data")
        .join(rel)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn assert_refused(o: &Output, words: &[&str]) {
    let (_, err) = text(o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for w in words {
        assert!(err.contains(w), "{w:?} not in {err}");
    }
}

#[test]
fn preprocess_then_inspect_and_bench() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = shared("tokenizers/deberta-v3-base/tokenizer.json");
    let prefix = tmp.path().join("wiki");
    let o = deberta(&[
        "preprocess",
        "--tokenizer",
        s(&tok),
        "--input",
        s(&shared("corpus/wikitext2_test.tokens.txt")),
        "--output-prefix",
        s(&prefix),
        "--shard-tokens",
        "100000",
        "--workers",
        "2",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("wiki.manifest.json") && out.contains("MB/s"), "{out}");

    let o = deberta(&["data", "inspect", s(&prefix), "--samples", "2", "--seq-len", "64"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("checksums: all 3 shard(s) match"), "{out}");
    assert!(out.contains("sample g=1") && out.contains("[MASK]{"), "{out}");

    let o = deberta(&["data", "bench", s(&prefix), "--batches", "5", "--seq-len", "128"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let json: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(json["tokens_per_s"].as_f64().unwrap() > 0.0);

    // A flipped byte in a shard: inspect names it and exits 2.
    let bin = tmp.path().join("wiki_00002.bin");
    let mut bytes = std::fs::read(&bin).unwrap();
    bytes[8] ^= 1;
    std::fs::write(&bin, &bytes).unwrap();
    assert_refused(
        &deberta(&["data", "inspect", s(&prefix)]),
        &["wiki_00002.bin", "sha256"],
    );

    // Opened with another tokenizer.
    let bert = shared("tokenizers/bert-base-uncased/tokenizer.json");
    assert_refused(
        &deberta(&["data", "inspect", s(&prefix), "--tokenizer", s(&bert)]),
        &["wiki.manifest.json", "sha256"],
    );
}

#[test]
fn preprocess_refuses_bad_input_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = shared("tokenizers/deberta-v3-base/tokenizer.json");
    let input = tmp.path().join("docs.jsonl");
    std::fs::write(&input, "{\"text\": \"fine\"}\n{\"title\": \"no text\"}\n").unwrap();
    let out_dir = tmp.path().join("out");
    let o = deberta(&[
        "preprocess",
        "--tokenizer",
        s(&tok),
        "--input",
        s(&input),
        "--format",
        "jsonl",
        "--output-prefix",
        s(&out_dir.join("c")),
    ]);
    assert_refused(&o, &["docs.jsonl:2", "no field \"text\""]);
    assert_eq!(std::fs::read_dir(&out_dir).unwrap().count(), 0);

    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let o = deberta(&[
        "preprocess",
        "--tokenizer",
        s(&tok),
        "--input",
        s(&empty),
        "--output-prefix",
        s(&out_dir.join("c")),
    ]);
    assert_refused(&o, &["empty.txt", "no documents"]);
}

#[test]
fn tokenizer_train_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("tok.json");
    let o = deberta(&[
        "tokenizer",
        "train",
        "--vocab-size",
        "1000",
        "--input",
        s(&shared("corpus/tinyshakespeare.txt")),
        "--out",
        s(&out),
    ]);
    let (stdout, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        stdout.contains("vocabulary 1000") && stdout.contains("[MASK]=999"),
        "{stdout}"
    );
    let o = deberta(&[
        "tokenizer",
        "train",
        "--vocab-size",
        "1000",
        "--input",
        s(&tmp.path().join("nope.txt")),
        "--out",
        s(&out),
    ]);
    assert_refused(&o, &["nope.txt"]);
}

#[test]
fn train_refuses_a_bad_config_before_starting_any_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("bad.yaml");
    std::fs::write(
        &cfg,
        "run: {name: x, output_dir: /tmp/never}
model: {preset: tiny}
parallel: {tensor: 3, data: 1}
data: {corpus: c, tokenizer: t.json, seq_len: 64}
train: {global_batch: 8, micro_batch: 3, steps: 10, lr: 1.0e-3, lr_max: 2}
",
    )
    .unwrap();
    assert_refused(&deberta(&["train", s(&cfg)]), &["bad.yaml", "unknown field `lr_max`"]);
    std::fs::write(&cfg, std::fs::read_to_string(&cfg).unwrap().replace(", lr_max: 2", "")).unwrap();
    let o = deberta(&["train", s(&cfg)]);
    assert_refused(
        &o,
        &[
            "3 problem(s)",
            "train.global_batch = 8",
            "does not divide model.num_attention_heads",
        ],
    );
    assert!(!text(&o).0.contains("starting"), "a job was started");
}
