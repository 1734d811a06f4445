//! Real multi-rank runs of `deberta-worker` under Open MPI's `mpirun` on the CPU (4 ranks run on
//! 2 cores thanks to the bootstrap's `mpi_yield_when_idle`). Every run has a deadline: a hang
//! fails the test instead of stalling CI.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    seconds: f64,
}

fn mpirun(np: usize, args: &[&str], deadline: Duration) -> Run {
    let t0 = Instant::now();
    let mut child = Command::new("mpirun")
        .args(["-np", &np.to_string(), env!("CARGO_BIN_EXE_deberta-worker")])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun not found: run cluster/bootstrap.sh (it installs Open MPI)");
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if t0.elapsed() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "mpirun -np {np} {args:?} still running after {deadline:?}: hang\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        seconds: t0.elapsed().as_secs_f64(),
    }
}

fn assert_all_passed(r: &Run, what: &str) {
    assert_eq!(r.code, Some(0), "{what}: {}\n{}", r.stdout, r.stderr);
    let last = r.stdout.lines().last().unwrap_or_default();
    assert!(
        last.ends_with("passed, 0 failed") && !last.starts_with("0 passed"),
        "{what}: {last:?}\n{}",
        r.stderr
    );
}

const MINUTE: Duration = Duration::from_secs(60);

#[test]
fn collectives_on_world_and_sub_communicators_at_1_2_and_4_ranks() {
    for (np, tp) in [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4)] {
        let r = mpirun(np, &["selftest", "collectives", "--tp", &tp.to_string()], MINUTE);
        assert_all_passed(&r, &format!("np {np} tp {tp}"));
    }
}

#[test]
fn vocab_parallel_cross_entropy_equals_the_plain_one() {
    for (np, tp) in [(2, 2), (4, 4), (4, 2)] {
        let r = mpirun(np, &["selftest", "cross-entropy", "--tp", &tp.to_string()], MINUTE);
        assert_all_passed(&r, &format!("np {np} tp {tp}"));
    }
}

#[test]
fn invalid_layouts_are_reported_once_by_rank_0_and_every_rank_exits_non_zero() {
    let cases: [(&[&str], &str); 3] = [
        (
            &["--tp", "3", "--preset", "tiny"],
            "does not divide model.num_attention_heads = 4",
        ),
        (&["--tp", "2", "--dp", "3"], "2 x 3 = 6"),
        (&["--tp", "8"], "larger than the 4 rank(s)"),
    ];
    for (args, words) in cases {
        let mut all = vec!["selftest", "collectives"];
        all.extend_from_slice(args);
        let r = mpirun(4, &all, MINUTE);
        assert_ne!(r.code, Some(0), "{args:?}");
        assert!(r.stderr.contains(words), "{args:?}: {}", r.stderr);
        assert_eq!(
            r.stderr.matches("invalid parallel layout").count(),
            1,
            "{args:?}: {}",
            r.stderr
        );
        assert!(!r.stdout.contains("passed"), "{args:?}: compute ran: {}", r.stdout);
    }
}

#[test]
fn a_rank_that_fails_mid_step_ends_the_job() {
    let r = mpirun(4, &["selftest", "fail", "--rank", "2"], Duration::from_secs(30));
    assert_ne!(r.code, Some(0));
    assert!(
        r.stderr.contains("[rank 2] panicked: aborting the MPI job"),
        "{}",
        r.stderr
    );
    assert!(r.seconds < 30.0);
}

#[test]
fn a_cuda_backend_without_a_gpu_is_an_error_not_a_cpu_run() {
    if tch::Cuda::is_available() {
        return; // cluster/gpu-check.sh exercises the NCCL backend on the GPU machine
    }
    let r = mpirun(2, &["selftest", "collectives", "--backend", "cuda"], MINUTE);
    assert_ne!(r.code, Some(0));
    assert!(r.stderr.contains("needs CUDA"), "{}", r.stderr);
    assert_eq!(r.stderr.matches("needs CUDA").count(), 1, "reported once: {}", r.stderr);
    assert!(!r.stdout.contains("passed"), "{}", r.stdout);
}

#[test]
fn kernel_check_emulated_trains_the_cuda_path_like_the_gather_path() {
    // The loss check (20 identical AdamW steps, the fused path in bf16 against the gather
    // path) on the CUDA path as the CPU runs it: kernels emulated, bf16 autocast.
    let r = mpirun(1, &["kernel-check", "--emulate"], 5 * MINUTE);
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    let line = r
        .stdout
        .lines()
        .find(|l| l.contains("20 steps") && l.contains("InKernel"))
        .unwrap_or_else(|| panic!("no training line:\n{}", r.stdout));
    assert!(line.ends_with(" ok"), "{line}");
    // The weights' bf16 copies change no bit of the 20 losses.
    let copies = r
        .stdout
        .lines()
        .find(|l| l.contains("bf16 copies"))
        .unwrap_or_else(|| panic!("no line for the weights' copies:\n{}", r.stdout));
    assert!(
        copies.contains("worst step rel diff 0.00e0") && copies.ends_with(" ok"),
        "{copies}"
    );
    assert!(r.stdout.contains("kernel-check: all ok"), "{}", r.stdout);
}
