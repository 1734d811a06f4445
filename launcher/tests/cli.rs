//! The `deberta` binary end to end: HF parity through `deberta forward`, `init`, and the
//! refusals of bad input (exit code 2, a message naming the file/tensor, never a panic).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use deberta_model::compare::{max_abs_diff, max_abs_diff_unpadded};
use tch::Tensor;

fn deberta(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deberta"))
        .args(args)
        .output()
        .expect("run deberta")
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../model/tests/fixtures")
        .join(name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `deberta forward --hf-dir DIR --ids DIR/ids.txt --out OUT [extra...]`
fn forward(dir: &Path, out: &Path, extra: &[&str]) -> Output {
    let ids = dir.join("ids.txt");
    let mut args = vec!["forward", "--hf-dir", s(dir), "--ids", s(&ids), "--out", s(out)];
    args.extend_from_slice(extra);
    deberta(&args)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn tensors(path: &Path) -> Vec<(String, Tensor)> {
    Tensor::read_safetensors(path).unwrap()
}

fn get<'a>(ts: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    &ts.iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no tensor {name}"))
        .1
}

#[test]
fn forward_cli_matches_hf_on_every_fixture() {
    let tmp = tempfile::tempdir().unwrap();
    for case in ["xxlarge_family", "padded_batch", "no_conv_no_share", "no_relative"] {
        let dir = fixture(case);
        let out = tmp.path().join(format!("{case}.safetensors"));
        let o = forward(&dir, &out, &[]);
        assert!(o.status.success(), "{case}: {}", stderr(&o));
        let (ours, want) = (tensors(&out), tensors(&dir.join("expected.safetensors")));
        let mask = get(&want, "attention_mask");
        assert!(
            get(&ours, "attention_mask").equal(mask),
            "{case}: padding convention differs"
        );
        let mut compared = 0;
        for (name, w) in &want {
            let diff = match name.as_str() {
                "last_hidden_state" | "mlm_logits" => max_abs_diff_unpadded(get(&ours, name), w, mask),
                "logits" => max_abs_diff(get(&ours, name), w),
                _ => continue,
            };
            assert!(diff <= 1e-4, "{case}: {name} differs from HF by {diff:e}");
            compared += 1;
        }
        assert!(compared >= 1);
    }
}

#[test]
fn init_writes_a_checkpoint_that_forward_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    let o = deberta(&["init", "--preset", "tiny", "--head", "mlm", "--out", s(&dir)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ids = tmp.path().join("ids.txt");
    std::fs::write(&ids, "1 279 1538 3258 2\n1 128000 2\n").unwrap();
    let out = tmp.path().join("out.safetensors");
    let o = deberta(&["forward", "--hf-dir", s(&dir), "--ids", s(&ids), "--out", s(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ts = tensors(&out);
    assert_eq!(get(&ts, "last_hidden_state").size(), [2, 5, 64]);
    assert_eq!(get(&ts, "mlm_logits").size(), [2, 5, 128100]);
}

/// Exit code 2, the expected words in the message, and no panic.
fn assert_refused(o: &Output, words: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "panic: {err}"
    );
    for w in words {
        assert!(err.contains(w), "{w:?} not in: {err}");
    }
}

fn copy_fixture(case: &str, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["config.json", "model.safetensors", "ids.txt"] {
        std::fs::copy(fixture(case).join(f), to.join(f)).unwrap();
    }
}

fn forward_in(dir: &Path) -> Output {
    forward(dir, &dir.join("out.safetensors"), &[])
}

#[test]
fn bad_input_is_refused_with_exit_code_2() {
    let tmp = tempfile::tempdir().unwrap();
    let case = |name: &str| {
        let d = tmp.path().join(name);
        copy_fixture("xxlarge_family", &d);
        d
    };

    let d = case("missing_config");
    std::fs::remove_file(d.join("config.json")).unwrap();
    assert_refused(&forward_in(&d), &["config.json", "not found"]);

    let d = case("malformed_config");
    std::fs::write(d.join("config.json"), "{\"vocab_size\": 320,").unwrap();
    assert_refused(&forward_in(&d), &["config.json", "not a valid config"]);

    let d = case("missing_weights");
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    assert_refused(&forward_in(&d), &["model.safetensors"]);

    let d = case("malformed_weights");
    std::fs::write(
        d.join("model.safetensors"),
        b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}",
    )
    .unwrap();
    assert_refused(&forward_in(&d), &["model.safetensors", "not a valid safetensors"]);

    let d = case("shape_mismatch");
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    std::fs::write(
        d.join("config.json"),
        cfg.replace("\"vocab_size\": 320", "\"vocab_size\": 400"),
    )
    .unwrap();
    assert_refused(&forward_in(&d), &["word_embeddings.weight", "[320, 32]", "[400, 32]"]);

    let d = case("id_out_of_vocab");
    std::fs::write(d.join("ids.txt"), "1 5 7\n1 320 2\n").unwrap();
    assert_refused(&forward_in(&d), &["ids.txt", "sequence 2", "320", "[0, 320)"]);

    let d = case("not_an_id");
    std::fs::write(d.join("ids.txt"), "1 5 x7\n").unwrap();
    assert_refused(&forward_in(&d), &["ids.txt:1", "x7"]);

    let d = case("too_long");
    std::fs::write(d.join("ids.txt"), vec!["5"; 65].join(" ") + "\n").unwrap();
    assert_refused(&forward_in(&d), &["ids.txt", "max_position_embeddings 64"]);

    let d = case("empty_ids");
    std::fs::write(d.join("ids.txt"), "\n\n").unwrap();
    assert_refused(&forward_in(&d), &["ids.txt", "no sequences"]);

    let o = deberta(&["info", "--preset", "huge"]);
    assert_refused(&o, &["unknown preset", "xxlarge"]);
}

#[test]
fn a_cuda_request_without_cuda_is_an_error_not_a_cpu_run() {
    if tch::Cuda::is_available() {
        return; // exercised on the GPU machine by cluster/gpu-check.sh instead
    }
    let dir = fixture("xxlarge_family");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    let o = forward(&dir, &out, &["--device", "cuda"]);
    assert_refused(&o, &["--device cuda", "CUDA is not available"]);
    assert!(!out.exists());
}
