//! `deberta info` (its own test binary: the memory check reads this process's child rusage).

use std::process::Command;

fn info(args: &[&str]) -> (String, i64) {
    let o = Command::new(env!("CARGO_BIN_EXE_deberta"))
        .arg("info")
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // SAFETY: getrusage only writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    (String::from_utf8(o.stdout).unwrap(), ru.ru_maxrss)
}

#[test]
fn xxlarge_reports_the_hf_parameter_count_without_allocating_the_model() {
    let (out, max_rss_kib) = info(&["--preset", "xxlarge"]);
    let backbone = out
        .lines()
        .find(|l| l.contains("backbone (HF DebertaV2Model)"))
        .expect(&out);
    assert!(backbone.trim_end().ends_with("1,564,549,632"), "{backbone}");
    let total = out.lines().find(|l| l.contains("pretraining model total")).expect(&out);
    assert!(total.trim_end().ends_with("1,567,828,068"), "{total}");
    assert!(out.contains("training FLOPs per token"), "{out}");
    assert!(out.contains("micro-batch    8:"), "{out}");
    // 1.5B fp32 parameters would need 5.8 GiB: the process must stay far below that.
    assert!(
        max_rss_kib < 1_500_000,
        "deberta info used {max_rss_kib} KiB: did it allocate the model?"
    );
}

#[test]
fn flops_per_token_matches_the_hf_baseline_model() {
    // flops_per_token() of ../shared/bench/hf_deberta_baseline.py for xxlarge at seq 512,
    // evaluated by hand: 6 * (48 * (4d^2 + 2d*ff + 2*512*d + 2*512*d + 2*512*d^2/512) + 3d^2
    // + 0.15 * (d^2 + d*128100)) with d = 1536, ff = 6144.
    let (d, ff, v, n) = (1536f64, 6144f64, 128100f64, 48f64);
    let want = 6.0
        * (n * (4.0 * d * d + 2.0 * d * ff + 2.0 * 512.0 * d + 2.0 * 512.0 * d + 2.0 * 512.0 * d * d / 512.0)
            + 3.0 * d * d
            + 0.15 * (d * d + d * v));
    let (out, _) = info(&["--preset", "xxlarge", "--seq", "512"]);
    let line = out.lines().find(|l| l.starts_with("training FLOPs per token")).unwrap();
    let got: f64 = line
        .split(": ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((got - want).abs() / want < 1e-4, "{got} vs {want}");
}

#[test]
fn cuda_probe_answers_without_error() {
    let (out, _) = info(&["--preset", "tiny"]);
    let line = out.lines().find(|l| l.starts_with("cuda: ")).expect(&out);
    if !std::path::Path::new("/dev/nvidia0").exists() {
        assert_eq!(line, "cuda: not available");
        assert!(!tch::Cuda::is_available());
    }
}

#[test]
fn the_binary_links_libtorch_cuda() {
    // tch links with --as-needed; without launcher/build.rs forcing it, libtorch_cuda.so is
    // dropped and CUDA is silently unavailable on GPU machines (DESIGN.md).
    let ldd = Command::new("ldd").arg(env!("CARGO_BIN_EXE_deberta")).output().unwrap();
    let text = String::from_utf8_lossy(&ldd.stdout);
    assert!(
        text.contains("libtorch_cuda.so"),
        "libtorch_cuda.so not linked:\n{text}"
    );
}
