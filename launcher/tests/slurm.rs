//! `deberta submit` against a real SLURM: the one-node cluster of cluster/slurm-local (which
//! `make test` and CI bring up). A tiny pretraining job of 4 tasks (tp 2 x dp 2, CPU) runs to the
//! end through `srun --mpi=pmix`; a second submit with `--resume auto` continues from its final
//! checkpoint to more steps. A job that gets the time-limit warning (SIGUSR1) checkpoints,
//! requeues itself and finishes after SLURM's requeue delay (about two minutes).

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use deberta_data::fixtures::TinyCorpus;

fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn slurm_is_up() {
    let o = Command::new("sinfo").args(["-h", "-o", "%T"]).output();
    let ok = matches!(&o, Ok(o) if o.status.success() && String::from_utf8_lossy(&o.stdout).lines().any(|l| l == "idle" || l == "mixed" || l == "allocated"));
    assert!(
        ok,
        "no usable SLURM here ({o:?}): run `bash cluster/slurm-local/up.sh` first (make test does)"
    );
}

fn submit(cfg: &Path, extra: &[&str]) -> String {
    let worker = Path::new(env!("CARGO_BIN_EXE_deberta")).with_file_name("deberta-worker");
    let o = Command::new(env!("CARGO_BIN_EXE_deberta"))
        .args(["submit", cfg.to_str().unwrap(), "--nodes", "1", "--time", "00:10:00"])
        .args(extra)
        .env("DEBERTA_WORKER", worker)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    out.lines()
        .find_map(|l| l.strip_prefix("SLURM_JOB_ID="))
        .unwrap_or_else(|| panic!("no job id in {out}"))
        .to_string()
}

/// Wait until the job has left the queue; its final state from scontrol.
fn wait_for(job: &str, limit: Duration) -> String {
    let t0 = Instant::now();
    loop {
        let q = Command::new("squeue")
            .args(["-h", "-j", job, "-o", "%T"])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&q.stdout).trim().is_empty() {
            break;
        }
        if t0.elapsed() > limit {
            let _ = Command::new("scancel").arg(job).status();
            panic!("job {job} still queued/running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let s = Command::new("scontrol")
        .args(["show", "job", job, "-o"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&s.stdout).into_owned()
}

fn train_steps(out: &Path) -> Vec<u64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("train/loss").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect()
}

/// A tiny 4-task pretraining config of `steps` steps, a checkpoint every `every`.
fn write_config(cfg: &Path, out: &Path, data: &TinyCorpus, steps: u64, every: u64) {
    let yaml = format!(
        "run: {{name: slurm-test, output_dir: {out}, seed: 5}}
model: {{preset: tiny, vocab_size: 1000}}
parallel: {{tensor: 2, data: 2, backend: cpu}}
data: {{corpus: {corpus}, valid_corpus: {valid}, tokenizer: {tok}, seq_len: 32}}
train: {{global_batch: 8, micro_batch: 2, steps: {steps}, lr: 2.0e-3, warmup_steps: 2, log_every: 1,
        eval_every: 5, checkpoint_every: {every}, keep_checkpoints: 2}}
",
        out = out.display(),
        corpus = data.corpus.display(),
        valid = data.valid.display(),
        tok = data.tokenizer.display(),
    );
    std::fs::write(cfg, yaml).unwrap();
}

#[test]
fn a_submitted_job_trains_and_a_resubmit_continues_from_its_checkpoint() {
    slurm_is_up();
    let dir = tempfile::tempdir().unwrap();
    let data = TinyCorpus::build(dir.path()).unwrap();
    let out = dir.path().join("run");
    let cfg = dir.path().join("slurm.yaml");
    let write = |steps: u64| write_config(&cfg, &out, &data, steps, 5);

    write(10);
    let job = submit(&cfg, &[]);
    let state = wait_for(&job, Duration::from_secs(300));
    let slurm_log = std::fs::read_to_string(out.join(format!("logs/slurm-{job}.out"))).unwrap_or_default();
    assert!(state.contains("JobState=COMPLETED"), "{state}\n{slurm_log}");
    assert!(
        slurm_log.contains("[sbatch] job") && slurm_log.contains("4 ranks"),
        "{slurm_log}"
    );
    assert_eq!(train_steps(&out), (1..=10).collect::<Vec<_>>(), "{slurm_log}");
    assert!(
        out.join("checkpoints/step-00000010/manifest.json").is_file(),
        "{slurm_log}"
    );
    let events: Vec<_> = std::fs::read_dir(out.join("tensorboard"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("tfevents"))
        .collect();
    assert!(!events.is_empty(), "no TensorBoard event file");
    let bytes = std::fs::read(events[0].path()).unwrap();
    for tag in ["train/loss", "eval/loss", "perf/tokens_per_s"] {
        assert!(
            bytes.windows(tag.len()).any(|w| w == tag.as_bytes()),
            "no {tag} in the events"
        );
    }
    // The batch script is kept with the run and says what was promised.
    let scripts: Vec<_> = std::fs::read_dir(out.join("sbatch")).unwrap().flatten().collect();
    assert_eq!(scripts.len(), 1);
    let script = std::fs::read_to_string(scripts[0].path()).unwrap();
    for want in [
        "--signal=USR1@120",
        "--requeue",
        "srun --mpi=pmix",
        "--resume auto",
        "--ntasks-per-node=4",
    ] {
        assert!(script.contains(want), "{want} not in {script}");
    }

    // The same run, to 16 steps: without --resume the checkpoints are refused, with it the job
    // continues from step 10.
    write(16);
    let refused = Command::new(env!("CARGO_BIN_EXE_deberta"))
        .args(["submit", cfg.to_str().unwrap(), "--nodes", "1", "--dry-run"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    let job2 = submit(&cfg, &["--resume", "auto"]);
    let state = wait_for(&job2, Duration::from_secs(300));
    let slurm_log = std::fs::read_to_string(out.join(format!("logs/slurm-{job2}.out"))).unwrap_or_default();
    assert!(state.contains("JobState=COMPLETED"), "{state}\n{slurm_log}");
    assert!(
        slurm_log.contains("resumed from") && slurm_log.contains("step-00000010"),
        "{slurm_log}"
    );
    assert_eq!(train_steps(&out), (1..=16).collect::<Vec<_>>(), "{slurm_log}");
    assert!(out.join("checkpoints/step-00000016/manifest.json").is_file());
}

#[test]
fn the_time_limit_warning_checkpoints_requeues_and_the_job_finishes() {
    slurm_is_up();
    let dir = tempfile::tempdir().unwrap();
    let data = TinyCorpus::build(dir.path()).unwrap();
    let out = dir.path().join("run");
    let cfg = dir.path().join("warned.yaml");
    let steps = 400;
    write_config(&cfg, &out, &data, steps, 10_000); // checkpoints only at the stop and the end
    let job = submit(&cfg, &[]);
    // Once training runs, send what `--signal=USR1@120` sends before the time limit.
    let beat = out.join("heartbeat/rank-00000");
    let t0 = Instant::now();
    loop {
        let step = std::fs::read_to_string(&beat)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["step"].as_u64())
            .unwrap_or(0);
        if step >= 3 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "job {job} did not start training"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = Command::new("scancel").args(["--signal=USR1", &job]).status().unwrap();
    assert!(s.success());
    // Stop, checkpoint, requeue, SLURM's requeue delay (~2 min), resume, finish.
    let state = wait_for(&job, Duration::from_secs(420));
    let log = std::fs::read_to_string(out.join(format!("logs/slurm-{job}.out"))).unwrap_or_default();
    assert!(state.contains("JobState=COMPLETED"), "{state}\n{log}");
    for want in [
        "run state: stopped",
        "requeueing job",
        "(restart 1)",
        "resumed from",
        "run state: done",
    ] {
        assert!(log.contains(want), "{want:?} not in {log}");
    }
    assert_eq!(train_steps(&out), (1..=steps).collect::<Vec<_>>(), "{log}");
    assert!(out.join(format!("checkpoints/step-{steps:08}/manifest.json")).is_file());
}
