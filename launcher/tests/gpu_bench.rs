//! The GPU session's prepared call, `cluster/gpu-bundle.sh` then `cluster/gpu-bench.sh`, as a
//! dry run on the CPU (`BENCH_DEVICE=cpu`: the CUDA path through the kernels' emulator,
//! `kernel-check --emulate`): a device call is scarce, so the script's plumbing (the bundle, the
//! variants and their environment, the baseline worker, the tables, the ratios, the tarball) is
//! checked here, where a slip costs nothing. The HF baseline needs transformers, which the CPU
//! machines lack: a stand-in with the baseline's command line prints a row of known tokens/s, so
//! the ratios the summary prints can be checked against our rows.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// HF's row at every batch asked for, 10 tokens/s (what the stand-in prints).
const STANDIN_TOKENS_PER_S: f64 = 10.0;
const HF_STANDIN: &str = r#"import argparse, json
ap = argparse.ArgumentParser()
ap.add_argument("--preset"); ap.add_argument("--seq", type=int); ap.add_argument("--batch", type=int, nargs="+")
ap.add_argument("--steps", type=int); ap.add_argument("--warmup", type=int)
a = ap.parse_args()
for b in a.batch:
    print(json.dumps(dict(system="hf-standin", preset=a.preset, params=1, batch=b, seq=a.seq, step_s=1.0,
                          tokens_per_s=10.0, loss=1.0, model_tflops_per_s=0.0, mfu=0.0, peak_mem_gib=None)))
"#;

/// The bundle of the workspace's own binaries, with a "baseline" worker (the same binary) and
/// the HF stand-in.
fn bundle(dir: &Path) -> PathBuf {
    let bins = Path::new(env!("CARGO_BIN_EXE_deberta")).parent().unwrap();
    assert!(
        bins.join("deberta-worker").is_file(),
        "no deberta-worker beside deberta: build the workspace (cargo build --workspace)"
    );
    let b = dir.join("bundle");
    let o = Command::new("bash")
        .arg(repo().join("cluster/gpu-bundle.sh"))
        .env("BUNDLE", &b)
        .env("BUNDLE_FROM", bins)
        .output()
        .unwrap();
    assert!(o.status.success(), "gpu-bundle.sh: {}", text(&o));
    for f in ["deberta", "deberta-worker", "hf_deberta_baseline.py", "openmpi3"] {
        assert!(b.join(f).exists(), "{f} missing from the bundle: {}", text(&o));
    }
    std::fs::create_dir_all(b.join("baseline")).unwrap();
    std::fs::copy(b.join("deberta-worker"), b.join("baseline/deberta-worker")).unwrap();
    std::fs::write(b.join("baseline/REVISION"), "dryrun\n").unwrap();
    std::fs::write(b.join("hf_deberta_baseline.py"), HF_STANDIN).unwrap();
    b
}

fn bench(bundle: &Path, dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let mut c = Command::new("bash");
    c.arg(repo().join("cluster/gpu-bench.sh"))
        .args(args)
        .env("BUNDLE", bundle)
        .env("BENCH_OUT", dir.join("gpu-bench"))
        .env("OUT", &out)
        .env("BENCH_STEPS", "1")
        .env("BENCH_WARMUP", "0");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// The one JSON row of a variant's file in gpu-bench.sh's output folder `dir` (BENCH_OUT).
fn tokens_per_s(dir: &Path, file: &str) -> f64 {
    let rows = std::fs::read_to_string(dir.join(file)).unwrap();
    let row: serde_json::Value = serde_json::from_str(rows.trim()).unwrap_or_else(|e| panic!("{file}: {e}: {rows}"));
    row["tokens_per_s"].as_f64().unwrap_or_else(|| panic!("{file}: {rows}"))
}

#[test]
fn the_prepared_gpu_call_runs_on_the_cpu_and_prints_its_tables_and_ratios() {
    let tmp = tempfile::tempdir().unwrap();
    let b = bundle(tmp.path());
    let o = bench(
        &b,
        tmp.path(),
        &[
            ("BENCH_DEVICE", "cpu"),
            ("VARIANTS", "fused-rel fused-split base:fused-rel"),
            ("HF_BATCHES", "2"),
        ],
        &["tiny", "32", "2"],
    );
    let all = text(&o);
    assert!(o.status.success(), "{all}");
    // kernel-check with both workers, emulated.
    assert_eq!(all.matches("kernel-check: all ok").count(), 2, "{all}");
    // The wgmma probe, emulated: its verdicts on the console.
    assert!(all.contains("wgmma probe on the CPU emulator:"), "{all}");
    // One verdict per layout the probe reads (B K-major, B MN-major, A from shared memory).
    assert_eq!(all.matches(": read as intended").count(), 3, "{all}");
    assert!(
        all.contains("== baseline (dryrun) deberta-worker kernel-check"),
        "{all}"
    );
    // Each variant ran with its own relative path; the profile came with the row.
    let err = std::fs::read_to_string(tmp.path().join("gpu-bench/ours-fused-split-b2.err")).unwrap();
    assert!(err.contains("relative terms InKernelSplit"), "{err}");
    assert!(err.contains("bf16 autocast (the CPU standing in for CUDA)"), "{err}");
    assert!(err.contains("bench profile"), "{err}");
    let rows = std::fs::read_to_string(tmp.path().join("gpu-bench/ours-fused-split.jsonl")).unwrap();
    assert!(rows.contains("\"system\":\"deberta-rs+fused-split\""), "{rows}");
    // The tables, and the ratios from the rows.
    let ours = tokens_per_s(&tmp.path().join("gpu-bench"), "ours-fused-rel.jsonl");
    let base = tokens_per_s(&tmp.path().join("gpu-bench"), "ours-base-fused-rel.jsonl");
    assert!(all.contains("HF transformers (bf16 autocast, fused AdamW)"), "{all}");
    assert!(all.contains(r#""system": "hf-standin""#), "{all}");
    let hf_ratio = format!(
        "ratio (ours with fused-rel / HF tokens/s):\n  batch 2: {:.2}x",
        ours / STANDIN_TOKENS_PER_S
    );
    assert!(all.contains(&hf_ratio), "expected {hf_ratio:?} in {all}");
    assert!(all.contains("(target >= 4x)"), "{all}");
    let base_ratio = format!(
        "fused-rel / base:fused-rel tokens/s (against the baseline (dryrun)):\n  batch 2: {ours:.1} / {base:.1} = {:.3}x",
        ours / base
    );
    assert!(all.contains(&base_ratio), "expected {base_ratio:?} in {all}");
    // Everything also comes back as one tarball under $OUT.
    let listing = Command::new("tar")
        .args(["-tzf"])
        .arg(tmp.path().join("out/gpu-bench.tgz"))
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    for f in [
        "kernel-check.txt",
        "wgmma-probe.txt",
        "hf.jsonl",
        "ours-fused-split.jsonl",
        "ours-base-fused-rel-b2.err",
    ] {
        assert!(listing.contains(f), "{f} not in the tarball: {listing}");
    }

    // Without HF rows (HF_BATCHES=none: the prepared batch-40 call) the tables still print; the
    // -kept variant's switch reaches the worker, and the summary divides by it.
    let o = bench(
        &b,
        tmp.path(),
        &[
            ("BENCH_DEVICE", "cpu"),
            ("VARIANTS", "fused-rel fused-rel-kept"),
            ("HF_BATCHES", "none"),
            ("KERNEL_CHECK", "0"),
        ],
        &["tiny", "32", "2"],
    );
    let all = text(&o);
    assert!(o.status.success(), "{all}");
    assert!(all.contains("deberta-rs, relative terms by fused-rel"), "{all}");
    assert!(!all.contains("kernel-check"), "{all}");
    assert_eq!(
        all.matches("their table gradients DiagonalsKeptWindows").count(),
        1,
        "{all}"
    );
    assert!(
        all.contains("fused-rel / fused-rel-kept tokens/s (against the keys kernel keeping its windows):\n  batch 2: "),
        "{all}"
    );

    let o = bench(&b, tmp.path(), &[("BENCH_DEVICE", "tpu")], &["tiny", "32", "2"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("BENCH_DEVICE=tpu: expected cuda or cpu"),
        "{}",
        text(&o)
    );
}

/// `cluster/gpu-finetune-check.sh`, which a GPU session runs after the fault that only the GPU
/// showed (docs/superglue.md), as a dry run on the CPU: the bundle carries its tasks and the
/// tokenizer, each task's run finishes with its results, and a failed task or a bad backend
/// makes the script fail.
#[test]
fn the_fine_tuning_check_runs_on_the_cpu_and_fails_when_a_task_does() {
    let tmp = tempfile::tempdir().unwrap();
    let b = bundle(tmp.path());
    let check = |env: &[(&str, &str)]| {
        let mut c = Command::new("bash");
        c.arg(repo().join("cluster/gpu-finetune-check.sh"))
            .env("BUNDLE", &b)
            .env("OUT", tmp.path().join("out"))
            .env("BACKEND", "cpu")
            .env("PRECISION", "fp32")
            .env("EPOCHS", "1");
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let o = check(&[]);
    let all = text(&o);
    assert!(o.status.success(), "{all}");
    for task in ["CB", "WSC"] {
        assert!(
            all.contains(&format!(
                "== {task}: exit 0; libtorch deprecation warnings in its log: 0"
            )),
            "{all}"
        );
        assert!(
            all.contains(&format!("\"task\": \"{task}\"")),
            "{task}'s results.json: {all}"
        );
        assert!(tmp.path().join(format!("out/finetune-{task}.log")).is_file());
    }
    let cb = std::fs::read_to_string(tmp.path().join("out/finetune-CB.log")).unwrap();
    assert!(cb.contains("SiFT on"), "CB runs with SiFT: {cb}");

    let o = check(&[("TASKS", "NotATask")]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("== NotATask: exit 2"), "{}", text(&o));

    let o = check(&[("BACKEND", "tpu")]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("BACKEND=tpu: expected cuda or cpu"), "{}", text(&o));
}

/// `cluster/gpu-session.sh`, the whole device call a GPU session makes (kernel-check and the
/// build traced with the baseline worker beside it, the other batch sizes with HF,
/// fine-tuning), as a dry run on the CPU: every part runs and returns its own tarball, the
/// ratios against the baseline and HF come out, and a failing part makes the call fail.
#[test]
fn the_gpu_session_call_runs_its_three_parts_on_the_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let b = bundle(tmp.path());
    let session = |env: &[(&str, &str)]| {
        let out = tmp.path().join("session");
        let _ = std::fs::remove_dir_all(&out);
        let mut c = Command::new("bash");
        c.arg(repo().join("cluster/gpu-session.sh"))
            .args(["tiny", "32", "2", "4"])
            .env("BUNDLE", &b)
            .env("OUT", &out)
            .env("BENCH_DEVICE", "cpu")
            .env("BACKEND", "cpu")
            .env("PRECISION", "fp32")
            .env("EPOCHS", "1")
            .env("BENCH_STEPS", "1")
            .env("BENCH_WARMUP", "0")
            .env("HF_BATCHES", "2")
            // The CPU's fine-tuning part takes ~5 minutes under CI's parallel tests; the cap is
            // the device's.
            .env("FINETUNE_TIMEOUT", "1200")
            .env("SESSION_WORK", tmp.path());
        for (k, v) in env {
            c.env(k, v);
        }
        (c.output().unwrap(), out)
    };
    let (o, out) = session(&[]);
    let all = text(&o);
    assert!(o.status.success(), "{all}");
    for part in ["check", "sizes", "finetune"] {
        assert!(all.contains(&format!("s] part {part}")), "part {part}: {all}");
    }
    for f in ["check/gpu-bench.tgz", "sizes/gpu-bench.tgz", "finetune/finetune.tgz"] {
        assert!(out.join(f).is_file(), "{f} missing: {all}");
    }
    // kernel-check once (not the baseline worker's), the first batch size traced.
    assert_eq!(all.matches("kernel-check: all ok").count(), 1, "{all}");
    assert!(all.contains("bench trace (one more step, batch 2"), "{all}");
    // The build against the baseline worker, from their rows.
    let check = tmp.path().join("gpu-session-check");
    let ours = tokens_per_s(&check, "ours-fused-rel.jsonl");
    let base = tokens_per_s(&check, "ours-base-fused-rel.jsonl");
    let ratio = format!(
        "fused-rel / base:fused-rel tokens/s (against the baseline (dryrun)):\n  batch 2: {ours:.1} / {base:.1} = {:.3}x",
        ours / base
    );
    assert!(all.contains(&ratio), "expected {ratio:?} in {all}");
    // The default variants' switches reach the worker: the table gradients from the per-block
    // partials in the -partials one only, and the ratios against the switched-off variants.
    assert_eq!(all.matches("their table gradients Partials").count(), 1, "{all}");
    // The wgmma kernels (all of them) in the -wgmma one only.
    assert_eq!(all.matches("forward_bands: true, keys: true").count(), 1, "{all}");
    for what in [
        "libtorch's GEMMs and additions for the weight gradients",
        "the table gradients from the kernels' per-block partials",
    ] {
        assert!(
            all.contains(&format!("tokens/s (against {what}):\n  batch 2: ")),
            "{what}: {all}"
        );
    }
    // The weights' bf16 copies: in part check at batch 2, in part sizes at its largest size (4)
    // only, each against the same worker casting per use.
    assert_eq!(
        all.matches("weights in bf16 by the copies AdamW writes").count(),
        2,
        "{all}"
    );
    for b in [2, 4] {
        let line = format!(
            "fused-rel-copies / fused-rel tokens/s (the weights' bf16 copies against a cast per use):\n  batch {b}: "
        );
        assert!(all.contains(&line), "expected {line:?} in {all}");
    }
    // Part sizes: batch 4, and batch 2 again beside HF's row.
    assert!(
        all.contains("ratio (ours with fused-rel / HF tokens/s):\n  batch 2: "),
        "{all}"
    );
    assert!(all.contains(r#""batch":4"#), "{all}");
    assert!(all.contains("== CB: exit 0") && all.contains("== WSC: exit 0"), "{all}");
    assert!(all.contains("done (exit 0)"), "{all}");

    // A failing part (a fine-tuning task that does not exist) fails the call; the parts
    // before it still return their files. And a first variant that fails in part check (here
    // an attention path that does not exist; on a device, an unmeasured change) leaves part
    // sizes to the next one that ran.
    let (o, out) = session(&[
        ("TASKS", "NotATask"),
        ("HF_BATCHES", "none"),
        ("KERNEL_CHECK", "0"),
        ("VARIANTS", "bogus fused-rel"),
    ]);
    let all = text(&o);
    assert_eq!(o.status.code(), Some(1), "{all}");
    assert!(all.contains("done (exit 1)"), "{all}");
    assert!(
        all.contains("== sizes: bogus gave no row in part check; fused-rel instead"),
        "{all}"
    );
    assert!(
        all.contains("ours, fused-rel, batch 4") && all.contains("ours, fused-rel-copies, batch 4"),
        "{all}"
    );
    assert!(out.join("check/gpu-bench.tgz").is_file());
    assert!(out.join("finetune/finetune.tgz").is_file());
}

/// The session's plan follows the card: on one of 120 GiB or more (an H200) HF runs at batch
/// 16 too, since the target is against HF's best and batch 16 fits there, and ours at 16 and
/// 64; on an H100 80GB the eleventh session's sizes. Given sizes and HF_BATCHES win.
#[test]
fn the_gpu_session_plans_by_the_card_s_memory() {
    let plan = |env: &[(&str, &str)], args: &[&str]| {
        let mut c = Command::new("bash");
        c.arg(repo().join("cluster/gpu-session.sh"))
            .args(args)
            .env("PLAN_ONLY", "1")
            .env_remove("HF_BATCHES");
        for (k, v) in env {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
        text(&o)
            .lines()
            .find(|l| l.starts_with("== plan:"))
            .unwrap_or_default()
            .to_string()
    };
    let h200 = plan(&[("GPU_MEM_MIB", "143771")], &[]);
    assert!(h200.contains("card 143771 MiB; ours at batch 32 8 16 64"), "{h200}");
    assert!(h200.ends_with("HF at 8 16"), "{h200}");
    let h100 = plan(&[("GPU_MEM_MIB", "81559")], &[]);
    assert!(h100.contains("ours at batch 32 8 40 ("), "{h100}");
    assert!(h100.ends_with("HF at 8"), "{h100}");
    let given = plan(
        &[("GPU_MEM_MIB", "143771"), ("HF_BATCHES", "none")],
        &["base", "128", "4", "2"],
    );
    assert!(
        given.contains("base x 128") && given.contains("ours at batch 4 2 ("),
        "{given}"
    );
    assert!(given.ends_with("HF at none"), "{given}");
}
