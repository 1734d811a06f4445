//! The SuperGLUE readers on every shipped file (record counts as SOURCES.md lists them), the
//! inputs they build with the DeBERTa-v3 tokenizer, the metrics against scikit-learn on fixed
//! predictions, and refusals of bad lines naming the file and the line.

use std::path::PathBuf;
use std::process::Command;

use deberta_data::fixtures::shared;
use deberta_data::superglue::encode::{encode, item_count};
use deberta_data::superglue::metrics::{f1_macro, gender_parity, matthews, score};
use deberta_data::superglue::read::{read, Record};
use deberta_data::superglue::{submission, Split, Task};
use deberta_data::tokenizer::Vocab;

fn file(task: Task, split: &str) -> PathBuf {
    let dir = shared("superglue").join(task.name());
    match (task, split) {
        (Task::ReCoRD, _) => dir.join("train.fewglue32.jsonl"),
        (Task::AxB | Task::AxG, _) => dir.join(format!("{}.jsonl", task.name())),
        _ => dir.join(format!("{split}.jsonl")),
    }
}

fn split_of(s: &str) -> Split {
    match s {
        "train" => Split::Train,
        "val" => Split::Val,
        _ => Split::Test,
    }
}

#[test]
fn every_line_of_every_shipped_file_is_read_and_the_counts_match_sources_md() {
    // SOURCES.md: records per split (MultiRC: paragraphs, and answer rows below).
    let counts: [(Task, &str, usize); 23] = [
        (Task::BoolQ, "val", 3270),
        (Task::BoolQ, "test", 3245),
        (Task::Cb, "train", 250),
        (Task::Cb, "val", 56),
        (Task::Cb, "test", 250),
        (Task::Copa, "train", 400),
        (Task::Copa, "val", 100),
        (Task::Copa, "test", 500),
        (Task::MultiRc, "train", 456),
        (Task::MultiRc, "val", 83),
        (Task::MultiRc, "test", 166),
        (Task::Rte, "train", 2490),
        (Task::Rte, "val", 277),
        (Task::Rte, "test", 3000),
        (Task::WiC, "train", 5428),
        (Task::WiC, "val", 638),
        (Task::WiC, "test", 1400),
        (Task::Wsc, "train", 554),
        (Task::Wsc, "val", 104),
        (Task::Wsc, "test", 146),
        (Task::AxB, "test", 1104),
        (Task::AxG, "test", 356),
        (Task::ReCoRD, "train", 32),
    ];
    for (task, split, n) in counts {
        let path = file(task, split);
        let records = read(task, &path, split_of(split)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(records.len(), n, "{}", path.display());
        if task == Task::MultiRc {
            let answers = item_count(&records);
            let want = match split {
                "train" => 27_243,
                "val" => 4_848,
                _ => 9_693,
            };
            assert_eq!(answers, want, "MultiRC {split} answer rows");
        }
        // Labels present exactly where they should be.
        let labelled = records.iter().all(|r| match r {
            Record::Pair(p) => p.label.is_some(),
            Record::Copa(c) => c.label.is_some(),
            Record::WiC(w) => w.label.is_some(),
            Record::Wsc(w) => w.label.is_some(),
            Record::MultiRc(m) => m.questions.iter().all(|q| q.answers.iter().all(|a| a.label.is_some())),
            Record::ReCoRD(rc) => rc.queries.iter().all(|q| !q.answers.is_empty()),
        });
        assert_eq!(labelled, split != "test" || task.is_diagnostic(), "{}", path.display());
    }
    // Spot checks against the files' first lines (read by eye).
    let cb = read(Task::Cb, &file(Task::Cb, "val"), Split::Val).unwrap();
    let Record::Pair(p) = &cb[0] else { panic!() };
    assert_eq!((p.b.as_str(), p.label), ("Valence was helping", Some(0)));
    let rc = read(Task::ReCoRD, &file(Task::ReCoRD, "train"), Split::Train).unwrap();
    let Record::ReCoRD(r) = &rc[0] else { panic!() };
    assert_eq!(r.entities[0], "Hamish Mackay");
    assert!(r.entities.contains(&"Olimpija Ljubljana".to_string()));
    let ax = read(Task::AxG, &file(Task::AxG, "test"), Split::Test).unwrap();
    let Record::Pair(p) = &ax[0] else { panic!() };
    assert_eq!(p.pair_id, Some(551646));
}

#[test]
fn inputs_follow_the_official_layout_and_spans_land_on_their_words() {
    let vocab = Vocab::load(&shared("tokenizers/deberta-v3-base/tokenizer.json")).unwrap();
    let sp = vocab.special;
    for task in Task::ALL {
        let split = match task {
            Task::AxB | Task::AxG => "test",
            Task::BoolQ => "val", // no train split here (SOURCES.md)
            _ => "train",
        };
        let mut records = read(task, &file(task, split), split_of(split)).unwrap();
        records.truncate(40);
        let max_len = 128;
        let examples = encode(task, &records, &vocab, max_len, 0).unwrap();
        let items = item_count(&records);
        assert_eq!(examples.last().unwrap().item + 1, items, "{task:?}");
        for ex in &examples {
            assert!(ex.ids.len() <= max_len && ex.ids[0] == sp.cls && *ex.ids.last().unwrap() == sp.sep);
            let seps = ex.ids.iter().filter(|&&i| i == sp.sep).count();
            assert_eq!(seps, if task == Task::Wsc { 1 } else { 2 }, "{task:?}");
        }
        let per_item = examples.len() as f64 / items as f64;
        match task {
            Task::Copa => assert_eq!(per_item, 2.0),
            Task::ReCoRD => assert!(per_item > 3.0),
            _ => assert_eq!(per_item, 1.0, "{task:?}"),
        }
        if task.head() == deberta_data::superglue::Head::Spans {
            for (ex, r) in examples.iter().zip(&records) {
                let [s1, s2] = ex.spans.unwrap();
                // What the spans must cover: WiC's marked characters, WSC's span texts.
                let words = match r {
                    Record::WiC(w) => [0, 1].map(|k| {
                        let (a, b) = w.spans[k];
                        w.sentences[k].chars().skip(a).take(b - a).collect::<String>()
                    }),
                    Record::Wsc(w) => [w.spans[0].1.clone(), w.spans[1].1.clone()],
                    _ => unreachable!(),
                };
                for ((a, b), word) in [s1, s2].into_iter().zip(words) {
                    assert!(a >= 1 && a < b && b < ex.ids.len());
                    let text = vocab.decode(&ex.ids[a..b]).to_lowercase();
                    let first = word.to_lowercase().split(' ').next().unwrap().to_string();
                    assert!(text.contains(&first), "{task:?}: span {text:?} for {word:?}");
                }
            }
        }
    }
    // COPA "cause": the option comes first; "effect": the premise does.
    let copa = read(Task::Copa, &file(Task::Copa, "val"), Split::Val).unwrap();
    let ex = encode(Task::Copa, &copa[..1], &vocab, 128, 0).unwrap();
    let Record::Copa(c) = &copa[0] else { panic!() };
    assert_eq!(c.question, "effect");
    let premise = vocab.encode(&c.premise).unwrap();
    assert_eq!(&ex[0].ids[1..1 + premise.len()], premise.as_slice());
    assert_eq!((ex[0].label, ex[1].label), (0, 1), "choice2 is right");
    // A long BoolQ passage is truncated to the limit, the question kept whole.
    let boolq = read(Task::BoolQ, &file(Task::BoolQ, "val"), Split::Val).unwrap();
    let ex = encode(Task::BoolQ, &boolq[..20], &vocab, 64, 0).unwrap();
    assert!(ex.iter().all(|e| e.ids.len() == 64 || e.ids.len() < 64));
    assert!(ex.iter().any(|e| e.ids.len() == 64));
}

/// Fixed pseudo-random predictions (a simple LCG), so the references see the same numbers.
fn predictions(n: usize, classes: usize, seed: u64) -> Vec<usize> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) % classes as u64) as usize
        })
        .collect()
}

fn sklearn(script: &str) -> Vec<f64> {
    let o = Command::new("python3")
        .args(["-c", script])
        .output()
        .expect("python3 (the project venv)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect()
}

#[test]
fn cb_f1_and_axb_matthews_equal_scikit_learn() {
    let cb = read(Task::Cb, &file(Task::Cb, "val"), Split::Val).unwrap();
    let axb = read(Task::AxB, &file(Task::AxB, "test"), Split::Test).unwrap();
    let gold = |rs: &[Record]| -> Vec<usize> {
        rs.iter()
            .map(|r| match r {
                Record::Pair(p) => p.label.unwrap(),
                _ => unreachable!(),
            })
            .collect()
    };
    let (cb_gold, ax_gold) = (gold(&cb), gold(&axb));
    let mut checked = 0;
    for seed in [1, 2, 3] {
        let cb_pred = predictions(cb_gold.len(), 3, seed);
        let ax_pred = predictions(ax_gold.len(), 2, seed);
        let want = sklearn(&format!(
            "from sklearn.metrics import f1_score, matthews_corrcoef\n\
             print(f1_score({:?}, {:?}, average='macro'), matthews_corrcoef({:?}, {:?}))",
            cb_gold, cb_pred, ax_gold, ax_pred
        ));
        assert!((f1_macro(&cb_gold, &cb_pred) - want[0]).abs() < 1e-12, "{want:?}");
        assert!((matthews(&ax_gold, &ax_pred) - want[1]).abs() < 1e-12, "{want:?}");
        // The task-level entry points report the same figures, the selection metric first.
        assert_eq!(score(Task::Cb, &cb, &cb_pred)[0].0, "f1_macro");
        assert!((score(Task::AxB, &axb, &ax_pred)[0].1 - want[1]).abs() < 1e-12);
        checked += 1;
    }
    assert_eq!(checked, 3);
    // A predictor that always says "entailment" has MCC 0 (empty margin), as in scikit-learn.
    assert_eq!(matthews(&ax_gold, &vec![1; ax_gold.len()]), 0.0);
}

#[test]
fn ax_g_parity_uses_the_pair_ids_of_the_file() {
    let axg = read(Task::AxG, &file(Task::AxG, "test"), Split::Test).unwrap();
    let gold: Vec<usize> = axg
        .iter()
        .map(|r| match r {
            Record::Pair(p) => p.label.unwrap(),
            _ => unreachable!(),
        })
        .collect();
    // Predicting the gold labels: parity is the share of pairs whose two golds agree.
    let s = score(Task::AxG, &axg, &gold);
    assert_eq!(s[0], ("accuracy", 1.0));
    let ids: Vec<i64> = axg
        .iter()
        .map(|r| match r {
            Record::Pair(p) => p.pair_id.unwrap(),
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(s[1].1, gender_parity(&gold, &ids));
    // A constant predictor is perfectly gender-neutral.
    assert_eq!(score(Task::AxG, &axg, &vec![0; gold.len()])[1].1, 1.0);
}

#[test]
fn bad_lines_are_refused_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("val.jsonl");
    let good = r#"{"premise": "p", "hypothesis": "h", "label": "neutral", "idx": 0}"#;
    let cases = [
        (
            r#"{"premise": "p", "label": "neutral", "idx": 1}"#,
            "missing field `hypothesis`",
        ),
        (
            r#"{"premise": "p", "hypothesis": "h", "label": "maybe", "idx": 1}"#,
            "unknown label \"maybe\"",
        ),
        (
            r#"{"premise": "p", "hypothesis": "h", "label": "neutral", "idx": "x"}"#,
            "field `idx` is not an integer",
        ),
        ("{not json", "not JSON"),
    ];
    for (bad, want) in cases {
        std::fs::write(&f, format!("{good}\n{bad}")).unwrap(); // no final newline, like the official files
        let e = read(Task::Cb, &f, Split::Val).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{}:2: ", f.display())) && e.contains(want),
            "{e}"
        );
    }
    // A task/file mismatch: CB lines read as COPA.
    std::fs::write(&f, good).unwrap();
    let e = read(Task::Copa, &f, Split::Val).unwrap_err().to_string();
    assert!(e.contains(":1: missing field `question`"), "{e}");
}

#[test]
fn submission_files_have_the_leaderboard_shape() {
    let dir = tempfile::tempdir().unwrap();
    let multirc = read(Task::MultiRc, &file(Task::MultiRc, "test"), Split::Test).unwrap();
    let pred = predictions(item_count(&multirc), 2, 9);
    let path = submission::write(dir.path(), Task::MultiRc, &multirc, &pred).unwrap();
    assert_eq!(path.file_name().unwrap(), "MultiRC.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 166);
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let a = &first["passage"]["questions"][0]["answers"][0];
    assert!(a["idx"].is_i64() && (a["label"] == 0 || a["label"] == 1), "{first}");
    let cb = read(Task::Cb, &file(Task::Cb, "test"), Split::Test).unwrap();
    let lines = submission::lines(Task::Cb, &cb, &predictions(250, 3, 4));
    assert_eq!(lines.len(), 250);
    assert!(lines
        .iter()
        .all(|l| ["contradiction", "neutral", "entailment"].contains(&l["label"].as_str().unwrap())));
    assert_eq!(lines[249]["idx"], 249);
}
