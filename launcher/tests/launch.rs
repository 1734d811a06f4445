//! `deberta train` as users run it, on the CPU with 4 MPI ranks (tp 2 x dp 2, the `tiny` preset):
//! a rank killed with SIGKILL and a hung rank are both survived by restarting from the last
//! checkpoint, with metrics.jsonl equal step for step to an uninterrupted run; exhausted restarts
//! fail loudly; SIGTERM checkpoints and exits 0; bad configurations and environments are refused
//! before anything starts; the dry-run plan uses `deberta info`'s cost model.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use deberta_data::fixtures::tiny_corpus as data;

fn worker() -> PathBuf {
    let w = Path::new(env!("CARGO_BIN_EXE_deberta")).with_file_name("deberta-worker");
    assert!(
        w.is_file(),
        "{} missing: build the workspace (cargo build --workspace)",
        w.display()
    );
    w
}

/// A 4-rank tiny run: `steps` steps, a checkpoint every 4, dropout on (resume must still be exact).
fn config(dir: &Path, name: &str, steps: u64, run_extra: &str) -> (PathBuf, PathBuf) {
    let d = data();
    let out = dir.join(name);
    let yaml = format!(
        "run: {{name: {name}, output_dir: {out}, seed: 7, restart_backoff: 0.2{run_extra}}}
model: {{preset: tiny, vocab_size: 1000, dropout: 0.1}}
parallel: {{tensor: 2, data: 2, backend: cpu}}
data: {{corpus: {corpus}, valid_corpus: {valid}, tokenizer: {tok}, seq_len: 32}}
train: {{global_batch: 8, micro_batch: 2, steps: {steps}, lr: 2.0e-3, warmup_steps: 2, log_every: 1,
        eval_every: 100, checkpoint_every: 4, keep_checkpoints: 2}}
",
        out = out.display(),
        corpus = d.corpus.display(),
        valid = d.valid.display(),
        tok = d.tokenizer.display(),
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    (path, out)
}

fn deberta(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_deberta"));
    c.args(args).env("DEBERTA_WORKER", worker());
    c
}

fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Wait for a child with a deadline (a hung test must fail, not hang CI).
fn wait(mut child: Child, limit: Duration) -> Output {
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > limit {
            let _ = child.kill();
            panic!(
                "deberta train did not finish in {limit:?}: {}",
                text(&child.wait_with_output().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn spawn(cmd: &mut Command) -> Child {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

/// (step, train/loss) for every logged step, in file order.
fn losses(out: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("train/loss").is_some())
        .map(|v| (v["step"].as_u64().unwrap(), v["train/loss"].as_f64().unwrap()))
        .collect()
}

/// The uninterrupted run's losses.
fn reference(dir: &Path, steps: u64) -> Vec<(u64, f64)> {
    let (cfg, out) = config(dir, "reference", steps, "");
    let o = deberta(&["train", cfg.to_str().unwrap()]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let l = losses(&out);
    assert_eq!(
        l.iter().map(|x| x.0).collect::<Vec<_>>(),
        (1..=steps).collect::<Vec<_>>()
    );
    l
}

/// The heartbeat of `rank` once it has done at least `step` steps: (pid, step).
fn wait_for_step(out: &Path, rank: usize, step: u64, limit: Duration) -> (u32, u64) {
    let path = out.join("heartbeat").join(format!("rank-{rank:05}"));
    let t0 = Instant::now();
    loop {
        if let Some(v) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        {
            let s = v["step"].as_u64().unwrap();
            if s >= step {
                return (v["pid"].as_u64().unwrap() as u32, s);
            }
        }
        assert!(
            t0.elapsed() < limit,
            "rank {rank} did not reach step {step} in {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A pseudo-random number from the clock, printed so a failure can be replayed.
fn pick(lo: u64, hi: u64, what: &str) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    let v = lo + nanos % (hi - lo + 1);
    eprintln!("{what} = {v}");
    v
}

#[test]
fn a_rank_killed_with_sigkill_is_restarted_from_the_checkpoint_and_the_losses_match() {
    let dir = tempfile::tempdir().unwrap();
    let steps = 16;
    let want = reference(dir.path(), steps);
    let (cfg, out) = config(dir.path(), "killed", steps, ", hang_timeout: 60");
    let child = spawn(&mut deberta(&["train", cfg.to_str().unwrap()]));
    let (rank, at) = (pick(0, 3, "rank to kill") as usize, pick(3, 10, "kill at step"));
    let (pid, seen) = wait_for_step(&out, rank, at, Duration::from_secs(120));
    // SAFETY: kill(2) of the rank's own pid, from its heartbeat.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    eprintln!("killed rank {rank} (pid {pid}) after step {seen}");
    let o = wait(child, Duration::from_secs(240));
    let log = text(&o);
    assert!(o.status.success(), "{log}");
    assert!(log.contains("attempt 1 failed") && log.contains("restart 1/3"), "{log}");
    assert!(out.join("logs/attempt-2.log").is_file());
    assert_eq!(losses(&out), want, "{log}");
    assert!(log.contains(&format!("steps      {steps} of {steps}")), "{log}");
}

#[test]
fn a_hung_rank_is_detected_within_the_hang_timeout_and_the_run_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let steps = 16;
    let want = reference(dir.path(), steps);
    let timeout = 6.0;
    let (cfg, out) = config(dir.path(), "hung", steps, &format!(", hang_timeout: {timeout}"));
    let marker = dir.path().join("hung-once");
    let (rank, at) = (pick(0, 3, "rank to hang"), pick(3, 10, "hang after step"));
    let mut child = spawn(
        deberta(&["train", cfg.to_str().unwrap()])
            .env("DEBERTA_TEST_HANG", format!("{rank}:{at}:{}", marker.display())),
    );
    // Read the launcher's output as it comes, noting when it reports the hang.
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let (mut lines, mut reported) = (Vec::new(), None);
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if reported.is_none() && line.contains("(run.hang_timeout)") {
                reported = Some(SystemTime::now());
            }
            lines.push(line);
        }
        (lines.join("\n"), reported)
    });
    let o = wait(child, Duration::from_secs(240));
    let (stdout, reported) = reader.join().unwrap();
    let log = format!("{stdout}\n{}", text(&o));
    assert!(o.status.success(), "{log}");
    assert!(
        log.contains(&format!("no heartbeat for {timeout} s (run.hang_timeout)")),
        "{log}"
    );
    // From the hang (the marker's creation) to the launcher's report: the timeout plus polling.
    // The launcher counts from the rank's last heartbeat, which comes a little before the marker
    // (an all-reduce and rank 0's log line lie between them; CI saw 1.7 ms), hence the slack below.
    let hung_at = std::fs::metadata(&marker).unwrap().modified().unwrap();
    let detected = reported.unwrap().duration_since(hung_at).unwrap().as_secs_f64();
    eprintln!("hang reported {detected:.2} s after it began");
    assert!(
        (timeout - 0.5..timeout + 3.0).contains(&detected),
        "reported {detected} s after the hang"
    );
    assert!(out.join("logs/attempt-2.log").is_file());
    assert_eq!(losses(&out), want, "{log}");
}

#[test]
fn exhausted_restarts_end_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, out) = config(dir.path(), "doomed", 8, ", max_restarts: 1");
    // Every attempt hits a non-finite loss at its first step and stops (train.max_bad_steps = 1).
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("keep_checkpoints: 2", "keep_checkpoints: 2, max_bad_steps: 1"),
    )
    .unwrap();
    let o = deberta(&["train", cfg.to_str().unwrap()])
        .env("DEBERTA_INJECT_NAN_STEPS", "0")
        .output()
        .unwrap();
    let log = text(&o);
    assert_eq!(o.status.code(), Some(1), "{log}");
    assert!(
        log.contains("giving up after 1 restart(s) (run.max_restarts = 1)"),
        "{log}"
    );
    assert!(log.contains("consecutive non-finite steps"), "{log}");
    assert!(out.join("logs/attempt-2.log").is_file() && !out.join("logs/attempt-3.log").exists());
}

#[test]
fn sigterm_to_the_launcher_checkpoints_and_exits_zero_with_the_resume_command() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, out) = config(dir.path(), "stopped", 400, "");
    let child = spawn(&mut deberta(&["train", cfg.to_str().unwrap()]));
    let (pid0, _) = wait_for_step(&out, 0, 3, Duration::from_secs(120));
    // SAFETY: kill(2) of our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let o = wait(child, Duration::from_secs(120));
    let log = text(&o);
    assert!(o.status.success(), "{log}");
    assert!(
        log.contains(&format!("resume with: deberta train {} --resume auto", cfg.display())),
        "{log}"
    );
    let status: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("status.json")).unwrap()).unwrap();
    assert_eq!(status["state"], "stopped");
    let step = status["step"].as_u64().unwrap();
    assert!((3..400).contains(&step), "{status}");
    assert!(out.join(format!("checkpoints/step-{step:08}/manifest.json")).is_file());
    assert!(!Path::new(&format!("/proc/{pid0}")).exists(), "rank 0 is still running");
}

/// Every refusal: exit 2, the reason named, no mpirun started, no run directory created.
#[test]
fn bad_configs_and_environments_are_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (good, out) = config(d, "bad", 8, "");
    let good_text = std::fs::read_to_string(&good).unwrap();
    // A fake mpirun that records being started.
    let started = d.join("mpirun-started");
    let fake = d.join("fake-mpirun");
    std::fs::write(&fake, format!("#!/bin/sh\ntouch {}\nexit 1\n", started.display())).unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let empty_bin = d.join("empty-bin");
    std::fs::create_dir(&empty_bin).unwrap();
    let a_file = d.join("a-file");
    std::fs::write(&a_file, "").unwrap();
    let hostfile = d.join("hosts");
    std::fs::write(&hostfile, "a slots=3\nb slots=3\n").unwrap();
    let with_ckpt = d.join("with-ckpt");
    std::fs::create_dir_all(with_ckpt.join("checkpoints/step-00000004")).unwrap();
    std::fs::write(with_ckpt.join("checkpoints/step-00000004/manifest.json"), "{}").unwrap();

    let edit = |from: &str, to: &str| {
        assert!(good_text.contains(from), "{from}");
        good_text.replace(from, to)
    };
    let out_s = out.display().to_string();
    // (what, config text, extra args, env overrides, expected message)
    type Case<'a> = (&'a str, String, Vec<&'a str>, Vec<(&'a str, String)>, String);
    let cases: Vec<Case> = vec![
        (
            "unknown field",
            edit("seed: 7", "seed: 7, sead: 8"),
            vec![],
            vec![],
            "unknown field `sead`".into(),
        ),
        (
            "tp x dp != ranks",
            good_text.clone(),
            vec!["--np", "3"],
            vec![],
            "the job has 3 rank(s)".into(),
        ),
        (
            "a GPU backend on a machine without GPUs",
            edit("backend: cpu", "backend: cuda"),
            vec![],
            vec![("CUDA_VISIBLE_DEVICES", String::new())],
            "needs NVIDIA GPUs but this machine shows none".into(),
        ),
        (
            "output dir not writable",
            edit(&out_s, &a_file.join("run").display().to_string()),
            vec![],
            vec![],
            "is not a directory".into(),
        ),
        (
            "missing worker binary",
            good_text.clone(),
            vec![],
            vec![("DEBERTA_WORKER", d.join("nope").display().to_string())],
            "worker binary".into(),
        ),
        (
            "no mpirun",
            good_text.clone(),
            vec![],
            vec![
                ("DEBERTA_MPIRUN", String::new()),
                ("PATH", empty_bin.display().to_string()),
            ],
            "mpirun not found on PATH".into(),
        ),
        (
            "missing corpus",
            edit(
                &data().corpus.display().to_string(),
                &d.join("none").display().to_string(),
            ),
            vec![],
            vec![],
            "data.corpus: manifest".into(),
        ),
        (
            "missing tokenizer",
            edit(
                &data().tokenizer.display().to_string(),
                &d.join("tok.json").display().to_string(),
            ),
            vec![],
            vec![],
            "data.tokenizer:".into(),
        ),
        (
            "a TP group across hosts",
            good_text.clone(),
            vec!["--hostfile", hostfile.to_str().unwrap(), "--np", "4"],
            vec![],
            "would span hosts a, b".into(),
        ),
        (
            "checkpoints without --resume",
            edit(&out_s, &with_ckpt.display().to_string()),
            vec![],
            vec![],
            "already holds checkpoints".into(),
        ),
        (
            "bad --resume",
            good_text.clone(),
            vec!["--resume", "latest"],
            vec![],
            "expected `auto`".into(),
        ),
        (
            "micro-batches that do not divide the batch",
            edit("micro_batch: 2", "micro_batch: 3"),
            vec![],
            vec![],
            "train.global_batch = 8 must be a multiple".into(),
        ),
    ];
    assert!(cases.len() >= 10);
    for (what, yaml, extra, env, want) in cases {
        let cfg = d.join("case.yaml");
        std::fs::write(&cfg, yaml).unwrap();
        let mut args = vec!["train", cfg.to_str().unwrap()];
        args.extend(extra);
        let mut cmd = deberta(&args);
        cmd.env("DEBERTA_MPIRUN", &fake);
        for (k, v) in env {
            if v.is_empty() && k != "CUDA_VISIBLE_DEVICES" {
                cmd.env_remove(k);
            } else {
                cmd.env(k, v);
            }
        }
        let o = cmd.output().unwrap();
        let log = text(&o);
        assert_eq!(o.status.code(), Some(2), "{what}: {log}");
        assert!(log.contains(&want), "{what}: {want:?} not in {log}");
        assert!(!log.contains("panicked"), "{what}: {log}");
        assert!(!started.exists(), "{what}: mpirun was started");
        assert!(!out.exists(), "{what}: {} was created", out.display());
    }

    // submit: no sbatch on PATH; more tasks than GPUs per node allow for the TP group.
    let o = deberta(&["submit", good.to_str().unwrap(), "--nodes", "1"])
        .env("PATH", &empty_bin)
        .env_remove("DEBERTA_SBATCH")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("sbatch not found on PATH"), "{}", text(&o));
    let cuda = d.join("cuda.yaml");
    std::fs::write(&cuda, edit("backend: cpu", "backend: cuda")).unwrap();
    let o = deberta(&[
        "submit",
        cuda.to_str().unwrap(),
        "--nodes",
        "4",
        "--gpus-per-node",
        "1",
        "--dry-run",
    ])
    .output()
    .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("parallel.tensor = 2 exceeds the 1 GPU(s) per node"),
        "{}",
        text(&o)
    );
    assert!(!out.exists());
}

/// A value printed after `label` in `text`: the first whitespace-separated word.
fn after<'a>(text: &'a str, label: &str) -> &'a str {
    let i = text.find(label).unwrap_or_else(|| panic!("{label:?} not in {text}")) + label.len();
    text[i..].split_whitespace().next().unwrap()
}

#[test]
fn the_dry_run_plan_of_the_1_5b_config_agrees_with_deberta_info() {
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/deberta-1.5b-pretrain.yaml");
    // The 1.5B job cannot start here (no GPUs, no corpus): the plan still prints, then exit 2.
    let plan = deberta(&["train", cfg.to_str().unwrap(), "--dry-run"])
        .output()
        .unwrap();
    let plan_text = text(&plan);
    assert_eq!(plan.status.code(), Some(2), "{plan_text}");
    let info = deberta(&[
        "info",
        "--preset",
        "xxlarge",
        "--seq",
        "512",
        "--micro-batch",
        "8",
        "--precision",
        "bf16",
        "--tp",
        "8",
    ])
    .output()
    .unwrap();
    let info_text = text(&info);
    assert!(info.status.success(), "{info_text}");
    assert_eq!(after(&plan_text, "memory"), after(&info_text, "micro-batch    8:"));
    let fpt = after(&plan_text, "compute");
    assert_eq!(fpt, after(&info_text, "(seq 512, MLM head on 15% of tokens):"));
    assert!(plan_text.contains("64 = tensor 8 x data 8"), "{plan_text}");
    assert!(plan_text.contains("global 2048 = data 8 x micro-batch 8 x 32 accumulation step(s); 1048576 tokens/step"));
    // Time to finish = steps x FLOPs/step / (GPUs x peak x MFU).
    let per_step: f64 = after(&plan_text, "FLOPs/token,").parse().unwrap();
    assert!((per_step / (fpt.parse::<f64>().unwrap() * 1_048_576.0) - 1.0).abs() < 1e-4);
    let days: f64 = after(&plan_text, "time").parse().unwrap();
    let want = 1e6 * per_step / (64.0 * 989e12 * 0.4) / 86_400.0;
    assert!((days - want).abs() < 0.06, "{days} vs {want}");
    // With the weights' bf16 copies: 2 bytes more per parameter of a rank (tp 8: ~196M, most
    // of the 1.57B sharded).
    let dir = tempfile::tempdir().unwrap();
    let with = dir.path().join("copies.yaml");
    let yaml = std::fs::read_to_string(&cfg).unwrap();
    assert!(yaml.contains("\ntrain:\n"), "the config's train section moved");
    std::fs::write(
        &with,
        yaml.replace("\ntrain:\n", "\ntrain:\n  bf16_weight_copies: true\n"),
    )
    .unwrap();
    let plan = text(
        &deberta(&["train", with.to_str().unwrap(), "--dry-run"])
            .output()
            .unwrap(),
    );
    let gib = |t: &str| after(t, "memory").parse::<f64>().unwrap();
    let more = gib(&plan) - gib(&plan_text);
    assert!(
        (0.36..0.40).contains(&more),
        "{more:.2} GiB more with the copies:\n{plan}"
    );
}

#[test]
fn finetune_refuses_bad_configs_before_starting() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("ft.yaml");
    let out = dir.path().join("ft-out");
    std::fs::write(
        &cfg,
        format!(
            "run: {{name: ft, output_dir: {}}}
init: {{checkpoint: {}}}
task: {{name: MNLI, data_dir: {}, tokenizer: {}}}
train: {{batch: 16, micro_batch: 3, epochs: 1, lr: 1.0e-5}}
",
            out.display(),
            dir.path().join("no-such-checkpoint").display(),
            deberta_data::fixtures::shared("superglue").display(),
            dir.path().join("tok.json").display()
        ),
    )
    .unwrap();
    let o = deberta(&["finetune", cfg.to_str().unwrap(), "--dry-run"])
        .output()
        .unwrap();
    let log = text(&o);
    assert_eq!(o.status.code(), Some(2), "{log}");
    for want in [
        "task.name = \"MNLI\"",
        "train.batch = 16 must be a multiple of parallel.data x train.micro_batch = 1 x 3",
        "task.tokenizer:",
        "init.checkpoint:",
    ] {
        assert!(log.contains(want), "{want} not in {log}");
    }
    assert!(!out.exists());
}

#[test]
fn bench_prints_one_json_line_per_batch_with_the_baseline_s_fields() {
    let o = deberta(&[
        "bench", "--preset", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--seq", "32", "--batch", "2",
        "4",
    ])
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert_eq!(rows.len(), 2);
    // The baseline's keys (../shared/bench/hf_deberta_baseline.py), in its order.
    let keys = [
        "system",
        "preset",
        "params",
        "batch",
        "seq",
        "step_s",
        "tokens_per_s",
        "loss",
        "model_tflops_per_s",
        "mfu",
        "peak_mem_gib",
    ];
    for (row, batch) in rows.iter().zip([2, 4]) {
        let got: Vec<&str> = row.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        let mut want = keys.to_vec();
        want.sort_unstable(); // serde_json's map is sorted; the line itself keeps the order
        assert_eq!(got, want, "{row}");
        assert_eq!(
            (row["preset"].as_str(), row["batch"].as_i64(), row["seq"].as_i64()),
            (Some("tiny"), Some(batch), Some(32))
        );
        assert!(row["step_s"].as_f64().unwrap() > 0.0 && row["tokens_per_s"].as_f64().unwrap() > 0.0);
        // Random ids over 128,100 classes: the first steps' loss is about ln(128100) = 11.76.
        assert!((row["loss"].as_f64().unwrap() - 11.76).abs() < 0.5, "{row}");
        assert!(row["peak_mem_gib"].is_null());
    }
    let first_line = String::from_utf8_lossy(&o.stdout).lines().next().unwrap().to_string();
    let positions: Vec<usize> = keys
        .iter()
        .map(|k| first_line.find(&format!("\"{k}\"")).unwrap())
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "key order: {first_line}");
    assert_eq!(rows[0]["system"], "deberta-rs", "the CPU default is the gather path");
    // One profiled step of the tiny model on the CPU, with `extra` arguments.
    let profiled = |extra: &[&str]| {
        let mut args = vec![
            "bench",
            "--preset",
            "tiny",
            "--device",
            "cpu",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--seq",
            "32",
            "--profile",
        ];
        args.extend_from_slice(extra);
        deberta(&args).output().unwrap()
    };
    // Each relative path names itself; the fused one runs its reference formulas on the CPU.
    let traces = tempfile::tempdir().unwrap();
    let trace_dir = traces.path().to_str().unwrap();
    for (attention, system) in [("skew", "deberta-rs+skew"), ("fused", "deberta-rs+fused-rel")] {
        // The fused run is traced too (--trace: one more step through libtorch's profiler).
        let o = if attention == "fused" {
            profiled(&["--attention", attention, "--trace", trace_dir])
        } else {
            profiled(&["--attention", attention])
        };
        assert!(o.status.success(), "{attention}: {}", text(&o));
        let row: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
        assert_eq!(row["system"], system);
        assert!((row["loss"].as_f64().unwrap() - 11.76).abs() < 0.5, "{row}");
        // --profile: one more step, segment by segment, on stderr (the fused path's core is
        // its own segment).
        let err = String::from_utf8_lossy(&o.stderr);
        let profile = err
            .split("bench profile")
            .nth(1)
            .unwrap_or_else(|| panic!("no profile: {err}"));
        let mut names = vec![
            "forward: ffn",
            "backward: ffn",
            "backward: mlm head",
            "AdamW (clip inside)",
        ];
        if attention == "fused" {
            names.extend(["forward: attention: core", "backward: attention: core"]);
        }
        for name in &names {
            assert!(profile.contains(name), "{attention}: {name} missing from {profile}");
        }
        if attention == "fused" {
            // The Chrome trace, with the step's parts marked on the host's timeline, and its
            // summary on stderr (no device events on the CPU).
            let path = traces.path().join("bench-trace-b8.json");
            let trace: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            let marks: Vec<&str> = trace["traceEvents"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["cat"] == "user_annotation")
                .filter_map(|e| e["name"].as_str())
                .collect();
            for name in &names {
                assert!(
                    marks.iter().any(|m| m.starts_with(name)),
                    "{name} not marked in the trace: {marks:?}"
                );
            }
            assert!(err.contains("bench trace (one more step, batch 8"), "{err}");
            assert!(err.contains(&format!("{} marks", marks.len())), "{err}");
        }
    }
    // --emulate-kernels: the fused path with the CUDA kernels in the CPU emulator; the profile
    // counts each stage's operators (its times mean nothing there).
    let o = profiled(&["--emulate-kernels"]);
    assert!(o.status.success(), "--emulate-kernels: {}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("output LayerNorms by the residual_norm kernels"), "{err}");
    // In bf16, as on CUDA: the hand-written segments' casts and the kernels' bf16 operands run.
    assert!(err.contains("bf16 autocast (the CPU standing in for CUDA)"), "{err}");
    let profile = err
        .split("bench profile")
        .nth(1)
        .unwrap_or_else(|| panic!("no profile: {err}"));
    // The number just before `word` in the profile's head line.
    let figure = |word: &str| -> u64 {
        profile
            .split(word)
            .next()
            .and_then(|head| head.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no figure before {word:?}: {profile}"))
    };
    let total = figure(" operators");
    assert!(total > 100, "{profile}");
    // Each stage names its most called operators; the segments cast their bf16 operands.
    let casts = figure(" casts)");
    assert!(casts > 0 && casts < total, "{profile}");
    assert!(
        profile.lines().any(|l| l.starts_with("      ") && l.contains("linear")),
        "no stage names its operators: {profile}"
    );
    for name in [
        "attention core: forward: kernel",
        "attention core: backward: keys kernel",
    ] {
        assert!(profile.contains(name), "{name} missing from {profile}");
    }
    let o = deberta(&["bench", "--preset", "tiny", "--device", "cuda", "--emulate-kernels"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("needs --device cpu"), "{}", text(&o));
    let o = deberta(&["bench", "--preset", "tiny", "--device", "cpu", "--attention", "flash"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("expected auto, gather, skew or fused"),
        "{}",
        text(&o)
    );
    // A misspelt variable is refused too, by the worker, naming it.
    for (var, value) in [("DEBERTA_ATTENTION", "fusde"), ("DEBERTA_FUSED_RELATIVE", "kernal")] {
        let o = deberta(&[
            "bench", "--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0",
        ])
        .env(var, value)
        .output()
        .unwrap();
        assert_eq!(o.status.code(), Some(2), "{var}: {}", text(&o));
        assert!(text(&o).contains(&format!("{var}={value}")), "{}", text(&o));
    }
    // CUDA where there is none is an error, never a CPU run.
    let o = deberta(&["bench", "--preset", "tiny", "--device", "cuda", "--steps", "1"])
        .env("CUDA_VISIBLE_DEVICES", "")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}
