//! Pretraining end to end under real `mpirun` on the CPU: exact resume (also at another DP
//! size), resharding a TP = 2 checkpoint into TP = 1, TensorBoard events read by TensorBoard's
//! own reader, a clean stop on SIGUSR1/SIGTERM, and bad configurations refused with exit 2.
//!
//! The corpus: Tiny Shakespeare with a 1000-piece tokenizer trained on it (fast), WikiText-2
//! test as the held-out set; the model: the `tiny` preset with that vocabulary.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use deberta_data::fixtures::{shared, tiny_corpus as data};

struct Job<'a> {
    tp: usize,
    dp: usize,
    steps: u64,
    dropout: f64,
    out: &'a Path,
}

fn job(tp: usize, dp: usize, steps: u64, dropout: f64, out: &Path) -> Job<'_> {
    Job {
        tp,
        dp,
        steps,
        dropout,
        out,
    }
}

fn write_config(j: &Job, path: &Path) {
    let d = data();
    let yaml = format!(
        "run: {{name: t, output_dir: {out}, seed: 3}}
model: {{preset: tiny, vocab_size: 1000, dropout: {dropout}}}
parallel: {{tensor: {tp}, data: {dp}, backend: cpu}}
data: {{corpus: {corpus}, valid_corpus: {valid}, tokenizer: {tok}, seq_len: 32}}
train: {{global_batch: 8, micro_batch: 2, steps: {steps}, lr: 2.0e-3, warmup_steps: 2, log_every: 1,
        eval_every: 5, checkpoint_every: 5, keep_checkpoints: 2}}
",
        out = j.out.display(),
        dropout = j.dropout,
        tp = j.tp,
        dp = j.dp,
        corpus = d.corpus.display(),
        valid = d.valid.display(),
        tok = d.tokenizer.display(),
        steps = j.steps,
    );
    std::fs::write(path, yaml).unwrap();
}

fn mpirun(np: usize, args: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-np", &np.to_string(), env!("CARGO_BIN_EXE_deberta-worker")])
        .args(args);
    c
}

fn run(j: &Job, resume: bool) -> Output {
    let cfg = j.out.with_extension("yaml");
    write_config(j, &cfg);
    let mut args = vec!["train", cfg.to_str().unwrap()];
    if resume {
        args.extend(["--resume", "auto"]);
    }
    let o = mpirun(j.tp * j.dp, &args).output().unwrap();
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// (step, train/loss) from metrics.jsonl.
fn losses(out: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            Some((v["step"].as_u64()?, v.get("train/loss")?.as_f64()?))
        })
        .collect()
}

fn copy_checkpoint(from: &Path, step: u64, to: &Path) {
    let name = format!("step-{step:08}");
    let (src, dst) = (from.join("checkpoints").join(&name), to.join("checkpoints").join(&name));
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

fn assert_close(a: &[(u64, f64)], b: &[(u64, f64)], rel: f64, what: &str) {
    assert_eq!(
        a.iter().map(|x| x.0).collect::<Vec<_>>(),
        b.iter().map(|x| x.0).collect::<Vec<_>>(),
        "{what}: steps"
    );
    for ((s, x), (_, y)) in a.iter().zip(b) {
        assert!((x - y).abs() <= rel * x.abs(), "{what}: step {s}: {x} vs {y}");
    }
}

#[test]
fn resume_is_exact_and_survives_a_change_of_dp_size() {
    let tmp = tempfile::tempdir().unwrap();
    // With dropout: the same layout must continue loss for loss.
    let a = tmp.path().join("a");
    run(&job(1, 2, 10, 0.1, &a), false);
    let all = losses(&a);
    assert_eq!(all.len(), 10);
    let b = tmp.path().join("b");
    copy_checkpoint(&a, 5, &b);
    let o = run(&job(1, 2, 10, 0.1, &b), true);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("resumed from"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert_close(&all[5..], &losses(&b), 1e-6, "resume at dp 2");
    assert!(all[9].1 < all[0].1, "training should lower the loss: {all:?}");

    // Without dropout (whose masks depend on the DP rank), DP 2 -> DP 1 continues the same run.
    let c = tmp.path().join("c");
    run(&job(1, 2, 10, 0.0, &c), false);
    let d = tmp.path().join("d");
    copy_checkpoint(&c, 5, &d);
    run(&job(1, 1, 10, 0.0, &d), true);
    assert_close(&losses(&c)[5..], &losses(&d), 1e-5, "resume at dp 1");
}

#[test]
fn a_tp2_checkpoint_resumes_at_tp1() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    run(&job(2, 1, 6, 0.0, &a), false);
    let b = tmp.path().join("b");
    copy_checkpoint(&a, 5, &b);
    run(&job(1, 1, 6, 0.0, &b), true);
    assert_close(&losses(&a)[5..], &losses(&b), 1e-5, "tp 2 -> tp 1");
}

#[test]
fn tensorboard_reads_every_tag_at_the_logged_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("tb");
    run(&job(2, 1, 5, 0.1, &out), false);
    let script = r#"
import sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1]); acc.Reload()
for tag in sorted(acc.Tags()["scalars"]):
    print(tag, ",".join(str(e.step) for e in acc.Scalars(tag)))
"#;
    let o = Command::new("python3")
        .args(["-c", script])
        .arg(out.join("tensorboard"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    let steps = |tag: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{tag} ")))
            .map(str::to_string)
    };
    for tag in [
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "perf/tokens_per_s",
        "perf/mfu",
        "mem/peak_gib",
        "train/skipped_steps",
    ] {
        assert_eq!(steps(tag).as_deref(), Some("1,2,3,4,5"), "{tag} in:\n{text}");
    }
    assert_eq!(steps("eval/loss").as_deref(), Some("0,5"), "eval/loss in:\n{text}");
}

fn wait_for_step(out: &Path, step: u64, child: &mut Child) {
    let t0 = Instant::now();
    while losses_if_any(out).last().map(|x| x.0).unwrap_or(0) < step {
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        assert!(t0.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn losses_if_any(out: &Path) -> Vec<(u64, f64)> {
    if out.join("metrics.jsonl").exists() {
        losses(out)
    } else {
        Vec::new()
    }
}

fn wait(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            panic!("did not stop within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigusr1_and_sigterm_stop_with_a_complete_resumable_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    // SIGUSR1 to mpirun (as SLURM's --signal does), which forwards it to the ranks.
    let out = tmp.path().join("usr1");
    let cfg = out.with_extension("yaml");
    write_config(&job(1, 2, 100_000, 0.1, &out), &cfg);
    let mut child = mpirun(2, &["train", cfg.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_step(&out, 2, &mut child);
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) };
    assert!(
        wait(&mut child, Duration::from_secs(60)).success(),
        "SIGUSR1 should end the run with exit 0"
    );
    let last = losses(&out).last().unwrap().0;
    let ckpt = out.join("checkpoints").join(format!("step-{last:08}"));
    assert!(
        ckpt.join("manifest.json").exists(),
        "no complete checkpoint at the last step {last}"
    );
    assert!(!std::fs::read_dir(out.join("checkpoints")).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with(".tmp")));

    // SIGTERM straight to a one-rank job (an MPI singleton, no mpirun).
    let out = tmp.path().join("term");
    let cfg = out.with_extension("yaml");
    write_config(&job(1, 1, 100_000, 0.1, &out), &cfg);
    let mut child = Command::new(env!("CARGO_BIN_EXE_deberta-worker"))
        .args(["train", cfg.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_step(&out, 2, &mut child);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(
        wait(&mut child, Duration::from_secs(60)).success(),
        "SIGTERM should end the run with exit 0"
    );
    let last = losses(&out).last().unwrap().0;
    // ... and the run resumes from it.
    let mut child = Command::new(env!("CARGO_BIN_EXE_deberta-worker"))
        .args(["train", cfg.to_str().unwrap(), "--resume", "auto"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_step(&out, last + 1, &mut child);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(wait(&mut child, Duration::from_secs(60)).success());
}

#[test]
fn bad_configurations_exit_2_before_work_naming_the_field() {
    let d = data();
    let tmp = tempfile::tempdir().unwrap();
    let good = format!(
        "run: {{name: t, output_dir: {out}}}
model: {{preset: tiny, vocab_size: 1000}}
parallel: {{tensor: 2, data: 1, backend: cpu}}
data: {{corpus: {corpus}, tokenizer: {tok}, seq_len: 32}}
train: {{global_batch: 8, micro_batch: 2, steps: 5, lr: 1.0e-3}}
",
        out = tmp.path().join("out").display(),
        corpus = d.corpus.display(),
        tok = d.tokenizer.display()
    );
    let bert = shared("tokenizers/bert-base-uncased/tokenizer.json");
    let cases: Vec<(String, &str)> = vec![
        (
            good.replace("seq_len: 32", "seq_len: 32, seqlen: 1"),
            "unknown field `seqlen`",
        ),
        (good.replace("steps: 5", "steps: five"), "field `train.steps`"),
        (
            good.replace("micro_batch: 2", "micro_batch: 3"),
            "train.global_batch = 8 must be a multiple",
        ),
        (
            good.replace("lr: 1.0e-3", "lr: 1.0e-3, precision: fp16"),
            "train.precision = \"fp16\"",
        ),
        (
            good.replace("tensor: 2", "tensor: 3"),
            "does not divide model.num_attention_heads",
        ),
        (good.replace("data: 1", "data: 2"), "the job has 2 rank(s)"),
        (good.replace("backend: cpu", "backend: cuda"), "needs CUDA"),
        (
            good.replace("lr: 1.0e-3", "lr: 1.0e-3, warmup_steps: 9"),
            "train.warmup_steps = 9 exceeds",
        ),
        (
            good.replace(&d.corpus.display().to_string(), "/nonexistent/corpus"),
            "nonexistent/corpus.manifest.json",
        ),
        (
            good.replace(&d.tokenizer.display().to_string(), &bert.display().to_string()),
            "sha256",
        ),
        (
            good.replace(
                "model: {preset: tiny, vocab_size: 1000}",
                "model: {preset: tiny, vocab_size: 4}",
            ),
            "model.vocab_size",
        ),
        (
            good.replace("model: {preset: tiny, vocab_size: 1000}", "model: {}"),
            "exactly one of `preset` and `hf_config`",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        if want.contains("CUDA") && tch_has_cuda() {
            continue;
        }
        let cfg = tmp.path().join(format!("bad{i}.yaml"));
        std::fs::write(&cfg, text).unwrap();
        let o = mpirun(2, &["train", cfg.to_str().unwrap()]).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(
            o.status.code().map(|c| c != 0),
            Some(true),
            "case {i} ({want}) was accepted"
        );
        assert!(err.contains(want), "case {i}: {want:?} not in:\n{err}");
        assert!(
            !tmp.path().join("out").join("checkpoints").exists(),
            "case {i}: work started"
        );
        assert!(!err.contains("panicked"), "case {i}: {err}");
    }
}

fn tch_has_cuda() -> bool {
    tch::Cuda::is_available()
}

#[test]
fn non_finite_losses_skip_the_update_and_stop_after_max_bad_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("nan");
    let cfg = out.with_extension("yaml");
    // Logged every 4 steps: the device skips the updates, the host reads the flags back at step
    // 4 and reports each bad step by its own number then.
    write_config(&job(1, 2, 6, 0.0, &out), &cfg);
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("log_every: 1,"), "{text}");
    std::fs::write(&cfg, text.replace("log_every: 1,", "log_every: 4,")).unwrap();
    // Two bad steps in a row (of 3 allowed): both skipped and counted, the run goes on.
    let o = mpirun(2, &["train", cfg.to_str().unwrap()])
        .env("DEBERTA_INJECT_NAN_STEPS", "1,2")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    for step in [2, 3] {
        assert!(
            err.contains(&format!("step {step}: non-finite loss NaN")),
            "step {step}:\n{err}"
        );
    }
    assert_eq!(err.matches("update skipped").count(), 2, "{err}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let last_train_line = metrics.lines().rfind(|l| l.contains("train/skipped_steps")).unwrap();
    let last: serde_json::Value = serde_json::from_str(last_train_line).unwrap();
    assert_eq!(last["step"], 6);
    assert_eq!(last["train/skipped_steps"], 2.0);
    // Three in a row (train.max_bad_steps = 3 by default) stop the run with an error.
    let out2 = tmp.path().join("nan3");
    let cfg2 = out2.with_extension("yaml");
    write_config(&job(1, 2, 6, 0.0, &out2), &cfg2);
    let o = mpirun(2, &["train", cfg2.to_str().unwrap()])
        .env("DEBERTA_INJECT_NAN_STEPS", "1,2,3")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("3 consecutive non-finite steps"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
