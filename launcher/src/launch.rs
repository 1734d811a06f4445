//! `deberta train` and `deberta submit`: check the configuration and the environment, print the
//! plan, then hand the job to the supervisor (local / hostfile, through mpirun) or to SLURM
//! (a batch script rendered from cluster/templates/). Nothing is created or started until every
//! check has passed; every problem is listed at once (exit 2).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use deberta_data::dataset::Dataset;
use deberta_data::tokenizer::Vocab;
use deberta_model::DebertaConfig;
use deberta_worker::checkpoint;
use deberta_worker::config::RunConfig;
use deberta_worker::topology::Layout;

use crate::cli::{BenchArgs, FinetuneArgs, SubmitArgs, TrainArgs};
use crate::commands::UsageError;
use crate::plan::{self, Host, Placement};
use crate::supervise::{self, Job, Outcome};

/// The batch script `deberta submit` renders unless `--template` names another.
const SBATCH_TEMPLATE: &str = include_str!("../../cluster/templates/pretrain.sbatch");

fn refuse(what: &str, problems: &[String]) -> anyhow::Error {
    let list: Vec<String> = problems.iter().map(|p| format!("  - {p}")).collect();
    UsageError(format!(
        "{what} has {} problem(s):\n{}",
        problems.len(),
        list.join("\n")
    ))
    .into()
}

/// Read the config and apply its own rules for a job of `np` ranks.
fn load(path: &Path, np: Option<usize>) -> Result<(RunConfig, DebertaConfig)> {
    let cfg = RunConfig::read(path).map_err(|e| UsageError(e.to_string()))?;
    let np = np.unwrap_or(cfg.parallel.tensor * cfg.parallel.data);
    let problems = cfg.problems(Some(np));
    if !problems.is_empty() {
        return Err(refuse(&path.display().to_string(), &problems));
    }
    let model = cfg.model_config().map_err(UsageError)?;
    Ok((cfg, model))
}

/// `NAME` on PATH (or the file an override variable names).
fn find_program(name: &str, override_var: &str) -> Option<PathBuf> {
    if let Ok(p) = std::env::var(override_var) {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The worker binary: `DEBERTA_WORKER`, else next to this executable.
fn worker_path() -> Result<PathBuf, String> {
    let p = match std::env::var("DEBERTA_WORKER") {
        Ok(p) => PathBuf::from(p),
        Err(_) => std::env::current_exe()
            .map_err(|e| format!("cannot locate this executable: {e}"))?
            .with_file_name("deberta-worker"),
    };
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "worker binary {} not found: build it with `cargo build --release --bin deberta-worker` (or set DEBERTA_WORKER)",
            p.display()
        ))
    }
}

/// The worker binary and `mpirun`; each one missing is recorded as a problem.
fn programs(problems: &mut Vec<String>) -> Option<(PathBuf, PathBuf)> {
    let worker = worker_path().map_err(|e| problems.push(e)).ok();
    let mpirun = find_program("mpirun", "DEBERTA_MPIRUN");
    if mpirun.is_none() {
        problems.push("mpirun not found on PATH: install Open MPI (bash cluster/bootstrap.sh does)".into());
    }
    worker.zip(mpirun)
}

/// Can `dir` be created (or written, if it exists) without creating anything now?
fn writable_dir_problem(dir: &Path) -> Option<String> {
    let field = format!("run.output_dir = {}", dir.display());
    let mut probe = dir;
    loop {
        if probe.exists() {
            if !probe.is_dir() {
                return Some(format!("{field}: {} is not a directory", probe.display()));
            }
            let c = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes()).ok()?;
            // SAFETY: access(2) on a NUL-terminated path we own.
            let ok = unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } == 0;
            let read_only = std::fs::metadata(probe)
                .map(|m| m.permissions().readonly())
                .unwrap_or(false);
            return (!ok || read_only).then(|| format!("{field}: {} is not writable", probe.display()));
        }
        probe = match probe.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
    }
}

/// Problems with the files the run reads and writes (paths relative to the current directory,
/// as the ranks see them).
fn data_and_output_problems(cfg: &RunConfig, model: &DebertaConfig, resume: bool) -> Vec<String> {
    let mut p = Vec::new();
    match Vocab::load(&cfg.data.tokenizer) {
        Err(e) => p.push(format!("data.tokenizer: {e}")),
        Ok(vocab) => {
            if vocab.vocab_size as i64 > model.vocab_size {
                p.push(format!(
                    "data.tokenizer has {} ids but the model's vocabulary is {} (set model.vocab_size)",
                    vocab.vocab_size, model.vocab_size
                ));
            }
            for (field, path) in [
                ("data.corpus", Some(&cfg.data.corpus)),
                ("data.valid_corpus", cfg.data.valid_corpus.as_ref()),
            ] {
                if let Some(path) = path {
                    if let Err(e) = Dataset::open(path, Some(&vocab), vocab.special) {
                        p.push(format!("{field}: {e}"));
                    }
                }
            }
        }
    }
    let out = &cfg.run.output_dir;
    p.extend(writable_dir_problem(out));
    if !resume {
        if let Some((step, dir)) = checkpoint::list(&out.join("checkpoints")).pop() {
            p.push(format!(
                "run.output_dir = {} already holds checkpoints (newest {} at step {step}): pass --resume auto to continue that run, or choose a new run.output_dir",
                out.display(),
                dir.display()
            ));
        }
    }
    p
}

/// GPUs this machine shows to CUDA (the driver's device nodes, narrowed by CUDA_VISIBLE_DEVICES);
/// counted without loading CUDA, so the launcher stays light.
fn local_gpus() -> usize {
    let devices = std::fs::read_dir("/dev")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    n.strip_prefix("nvidia")
                        .is_some_and(|i| !i.is_empty() && i.chars().all(|c| c.is_ascii_digit()))
                })
                .count()
        })
        .unwrap_or(0);
    match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(v) if v.trim().is_empty() => 0,
        Ok(v) => v.split(',').count().min(devices),
        Err(_) => devices,
    }
}

fn is_gpu(cfg: &RunConfig) -> bool {
    matches!(cfg.parallel.backend.as_str(), "cuda" | "nccl")
}

pub fn train(a: TrainArgs) -> Result<()> {
    if let Some(r) = &a.resume {
        if r != "auto" {
            return Err(UsageError(format!("--resume {r:?}: expected `auto`")).into());
        }
    }
    if !(a.assume_mfu > 0.0 && a.assume_mfu <= 1.0) {
        return Err(UsageError(format!("--assume-mfu {} must be in (0, 1]", a.assume_mfu)).into());
    }
    let hosts = match &a.hostfile {
        Some(h) => Some(plan::read_hostfile(h).map_err(UsageError)?),
        None => None,
    };
    let (cfg, model) = load(&a.config, a.np)?;
    let np = a.np.unwrap_or(cfg.parallel.tensor * cfg.parallel.data);
    let layout = Layout {
        tp: cfg.parallel.tensor,
        dp: cfg.parallel.data,
    };
    let hosts = hosts.unwrap_or_else(|| {
        vec![Host {
            name: deberta_worker::heartbeat::hostname(),
            slots: np,
        }]
    });
    let placement = Placement::new(hosts, np).map_err(|e| UsageError(format!("--hostfile: {e}")))?;
    let mut problems = Vec::new();
    // GPUs can only be counted here; hosts of a hostfile are assumed to match this one.
    let gpus = is_gpu(&cfg).then(local_gpus);
    if gpus == Some(0) {
        problems.push(format!(
            "parallel.backend = {:?} needs NVIDIA GPUs but this machine shows none (use backend: cpu to train on the CPU)",
            cfg.parallel.backend
        ));
    } else {
        problems.extend(placement.problems(layout, gpus));
    }
    let programs = programs(&mut problems);
    if let Some(h) = &a.hostfile {
        if !h.is_file() {
            problems.push(format!("--hostfile {}: not a file", h.display()));
        }
    }
    problems.extend(data_and_output_problems(&cfg, &model, a.resume.is_some()));

    print!(
        "{}",
        plan::render(&a.config, &cfg, &model, &placement, "mpirun", a.assume_mfu)
    );
    if !problems.is_empty() {
        return Err(refuse(&format!("the job ({})", a.config.display()), &problems));
    }
    if a.dry_run {
        println!("dry run: configuration and environment are ready; nothing started");
        return Ok(());
    }
    let Some((worker, mpirun)) = programs else {
        unreachable!("checked above")
    };
    let job = Job {
        command: "train",
        config: a.config.clone(),
        output_dir: cfg.run.output_dir.clone(),
        np,
        hostfile: a.hostfile.clone(),
        mpirun,
        worker,
        resume: a.resume.is_some(),
        hang_timeout: Duration::from_secs_f64(cfg.run.hang_timeout),
        max_restarts: cfg.run.max_restarts,
        backoff: Duration::from_secs_f64(cfg.run.restart_backoff),
    };
    let started = std::time::Instant::now();
    let outcome = supervise::supervise(&job)?;
    summary(&job, &cfg, &outcome, started.elapsed());
    match outcome {
        Outcome::Done { .. } | Outcome::Stopped { .. } => Ok(()),
        Outcome::Refused => Err(UsageError("the ranks refused the job's settings (see above)".into()).into()),
        Outcome::GaveUp { restarts, last_failure } => anyhow::bail!(
            "giving up after {restarts} restart(s) (run.max_restarts = {}): {last_failure}",
            cfg.run.max_restarts
        ),
    }
}

fn summary(job: &Job, cfg: &RunConfig, outcome: &Outcome, elapsed: Duration) {
    let out = &job.output_dir;
    let newest = checkpoint::list(&out.join("checkpoints")).pop();
    let (state, restarts) = match outcome {
        Outcome::Done { restarts } => ("finished", *restarts),
        Outcome::Stopped { restarts } => ("stopped", *restarts),
        Outcome::Refused => ("refused", 0),
        Outcome::GaveUp { restarts, .. } => ("failed", *restarts),
    };
    println!(
        "[launcher] summary: {state} after {}",
        plan::duration_text(elapsed.as_secs_f64())
    );
    println!(
        "[launcher]   steps      {} of {} (newest checkpoint)",
        newest.as_ref().map_or(0, |(s, _)| *s),
        cfg.train.steps
    );
    println!(
        "[launcher]   restarts   {restarts} (run.max_restarts = {})",
        cfg.run.max_restarts
    );
    println!("[launcher]   logs       {}", out.join("logs").display());
    match &newest {
        Some((_, d)) => println!("[launcher]   checkpoint {}", d.display()),
        None => println!("[launcher]   checkpoint none yet"),
    }
    println!("[launcher]   metrics    {}", out.join("metrics.jsonl").display());
    println!(
        "[launcher]   tensorboard --logdir {}",
        out.join("tensorboard").display()
    );
    if !matches!(outcome, Outcome::Done { .. } | Outcome::Refused) {
        println!(
            "[launcher] resume with: deberta train {} --resume auto",
            job.config.display()
        );
    }
}

/// `deberta finetune`: check the fine-tuning config, its task files, the initial weights and
/// the machine, then run it under the supervisor (no restarts: fine-tuning runs are short).
pub fn finetune(a: FinetuneArgs) -> Result<()> {
    use deberta_data::superglue::read::read;
    use deberta_data::superglue::Split;
    use deberta_worker::finetune::FinetuneConfig;
    let cfg = FinetuneConfig::read(&a.config).map_err(|e| UsageError(e.to_string()))?;
    let np = a.np.unwrap_or(cfg.parallel.tensor * cfg.parallel.data);
    let mut problems = cfg.problems(Some(np));
    if let Ok(task) = cfg.task() {
        let mut tasks = vec![task];
        if task == deberta_data::superglue::Task::Rte {
            tasks.extend([deberta_data::superglue::Task::AxB, deberta_data::superglue::Task::AxG]);
        }
        for t in tasks {
            let splits: &[Split] = if t == task {
                &[Split::Train, Split::Val, Split::Test]
            } else {
                &[Split::Test]
            };
            for &split in splits {
                if let Err(e) = read(t, &cfg.file(t, split), split) {
                    problems.push(format!("task ({} {}): {e}", t.name(), split.name()));
                }
            }
        }
    }
    if let Err(e) = Vocab::load(&cfg.task.tokenizer) {
        problems.push(format!("task.tokenizer: {e}"));
    }
    if let Some(dir) = &cfg.init.checkpoint {
        if let Err(e) = checkpoint::read_manifest(dir) {
            problems.push(format!("init.checkpoint: {e:#}"));
        }
    }
    if let Some(dir) = &cfg.init.hf_dir {
        if !dir.join("config.json").is_file() {
            problems.push(format!("init.hf_dir: {} has no config.json", dir.display()));
        }
    }
    if matches!(cfg.parallel.backend.as_str(), "cuda" | "nccl") && local_gpus() < np {
        problems.push(format!(
            "parallel.backend = {:?}: {np} rank(s) need as many GPUs, this machine shows {}",
            cfg.parallel.backend,
            local_gpus()
        ));
    }
    problems.extend(writable_dir_problem(&cfg.run.output_dir));
    let programs = programs(&mut problems);
    if !problems.is_empty() {
        return Err(refuse(&format!("the job ({})", a.config.display()), &problems));
    }
    println!(
        "fine-tuning {}: {np} rank(s) = tensor {} x data {} ({}), batch {} (micro-batch {}), {} epoch(s), lr {}{}; output {}",
        cfg.task.name,
        cfg.parallel.tensor,
        cfg.parallel.data,
        cfg.parallel.backend,
        cfg.train.batch,
        cfg.train.micro_batch,
        cfg.train.epochs,
        cfg.train.lr,
        if cfg.sift.enabled { ", SiFT" } else { "" },
        cfg.run.output_dir.display()
    );
    if a.dry_run {
        println!("dry run: configuration and environment are ready; nothing started");
        return Ok(());
    }
    let Some((worker, mpirun)) = programs else {
        unreachable!("checked above")
    };
    let job = Job {
        command: "finetune",
        config: a.config.clone(),
        output_dir: cfg.run.output_dir.clone(),
        np,
        hostfile: None,
        mpirun,
        worker,
        resume: false,
        hang_timeout: Duration::from_secs(1800),
        max_restarts: 0,
        backoff: Duration::ZERO,
    };
    match supervise::supervise(&job)? {
        Outcome::Done { .. } => {
            println!(
                "[launcher] results {}; predictions in {}",
                cfg.run.output_dir.join("results.json").display(),
                cfg.run.output_dir.join("predictions").display()
            );
            Ok(())
        }
        Outcome::Stopped { .. } => {
            println!(
                "[launcher] stopped: the best checkpoint so far is in {}",
                cfg.run.output_dir.join("best").display()
            );
            Ok(())
        }
        Outcome::Refused => Err(UsageError("the ranks refused the job's settings (see above)".into()).into()),
        Outcome::GaveUp { last_failure, .. } => anyhow::bail!("fine-tuning failed: {last_failure}"),
    }
}

/// `deberta bench`: one process of `deberta-worker bench` (an MPI singleton; the launcher
/// itself runs no tensors), its JSON lines passed through.
pub fn bench(a: BenchArgs) -> Result<()> {
    if !["cpu", "cuda"].contains(&a.device.as_str()) {
        return Err(UsageError(format!("--device {:?}: expected cpu or cuda", a.device)).into());
    }
    if !["auto", "gather", "skew", "fused"].contains(&a.attention.as_str()) {
        return Err(UsageError(format!(
            "--attention {:?}: expected auto, gather, skew or fused",
            a.attention
        ))
        .into());
    }
    let worker = worker_path().map_err(UsageError)?;
    let mut cmd = std::process::Command::new(&worker);
    cmd.arg("bench")
        .args(["--preset", &a.preset, "--seq", &a.seq.to_string()])
        .args(["--steps", &a.steps.to_string(), "--warmup", &a.warmup.to_string()])
        .args(["--device", &a.device, "--peak-tflops", &a.peak_tflops.to_string()])
        .arg("--batch")
        .args(a.batch.iter().map(|b| b.to_string()));
    if a.fp32 {
        cmd.arg("--fp32");
    }
    if a.recompute {
        cmd.arg("--recompute");
    }
    if a.profile {
        cmd.arg("--profile");
    }
    if a.bf16_weight_copies {
        cmd.arg("--bf16-weight-copies");
    }
    if let Some(dir) = &a.trace {
        cmd.arg("--trace").arg(dir);
    }
    if a.emulate_kernels {
        if a.device != "cpu" {
            return Err(
                UsageError("--emulate-kernels runs the kernels' CPU emulator: it needs --device cpu".into()).into(),
            );
        }
        cmd.arg("--emulate-kernels");
    }
    if a.attention != "auto" {
        cmd.env("DEBERTA_ATTENTION", &a.attention);
    }
    let status = cmd.status().with_context(|| format!("running {}", worker.display()))?;
    match status.code() {
        Some(0) => Ok(()),
        Some(2) => Err(UsageError("the benchmark refused its settings (see above)".into()).into()),
        code => anyhow::bail!("the benchmark failed (exit code {code:?})"),
    }
}

/// Placeholders of the batch-script template, `{{name}}`.
fn render_template(template: &str, values: &[(&str, String)]) -> Result<String, String> {
    let mut out = template.to_string();
    for (k, v) in values {
        out = out.replace(&format!("{{{{{k}}}}}"), v);
    }
    if let Some(start) = out.find("{{") {
        let name: String = out[start..].chars().take_while(|&c| c != '\n').collect();
        return Err(format!("the template has an unknown placeholder {name}"));
    }
    // Lines rendered empty by an option left out go away.
    Ok(out
        .lines()
        .filter(|l| l.trim() != "#SBATCH")
        .map(|l| format!("{l}\n"))
        .collect())
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

/// Single-quote for bash.
fn sh(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

pub fn submit(a: SubmitArgs) -> Result<()> {
    let mut problems = Vec::new();
    if a.nodes == 0 {
        return Err(UsageError("--nodes must be >= 1".into()).into());
    }
    if let Some(r) = &a.resume {
        if r != "auto" {
            return Err(UsageError(format!("--resume {r:?}: expected `auto`")).into());
        }
    }
    let cfg0 = RunConfig::read(&a.config).map_err(|e| UsageError(e.to_string()))?;
    let gpu = is_gpu(&cfg0);
    let per_node = match (gpu, a.gpus_per_node, a.tasks_per_node) {
        (true, Some(g), None) => g,
        (true, None, _) => {
            return Err(UsageError(format!(
                "parallel.backend = {:?}: give --gpus-per-node (one task per GPU)",
                cfg0.parallel.backend
            ))
            .into())
        }
        (true, Some(_), Some(_)) => {
            return Err(UsageError(
                "--tasks-per-node is for the CPU backend; with GPUs there is one task per GPU".into(),
            )
            .into())
        }
        (false, Some(_), _) => {
            return Err(UsageError(format!(
                "--gpus-per-node: parallel.backend = {:?} runs on the CPU (use --tasks-per-node, or backend: cuda)",
                cfg0.parallel.backend
            ))
            .into())
        }
        (false, None, t) => t.unwrap_or_else(|| (cfg0.parallel.tensor * cfg0.parallel.data).div_ceil(a.nodes)),
    };
    if per_node == 0 {
        return Err(UsageError("--gpus-per-node / --tasks-per-node must be >= 1".into()).into());
    }
    let np = a.nodes * per_node;
    let (cfg, model) = load(&a.config, Some(np))?;
    let layout = Layout {
        tp: cfg.parallel.tensor,
        dp: cfg.parallel.data,
    };
    let hosts: Vec<Host> = (0..a.nodes)
        .map(|i| Host {
            name: format!("node{i}"),
            slots: per_node,
        })
        .collect();
    let placement = Placement::new(hosts, np).map_err(UsageError)?;
    problems.extend(placement.problems(layout, gpu.then_some(per_node)));
    let worker = worker_path().map_err(|e| problems.push(e)).ok();
    let sbatch = find_program("sbatch", "DEBERTA_SBATCH");
    if sbatch.is_none() && !a.dry_run {
        problems.push(
            "sbatch not found on PATH: submit from a SLURM login node (or bring up cluster/slurm-local/up.sh)".into(),
        );
    }
    let template = match &a.template {
        Some(t) => std::fs::read_to_string(t)
            .map_err(|e| problems.push(format!("--template {}: {e}", t.display())))
            .unwrap_or_default(),
        None => SBATCH_TEMPLATE.to_string(),
    };
    problems.extend(data_and_output_problems(&cfg, &model, a.resume.is_some()));

    print!(
        "{}",
        plan::render(
            &a.config,
            &cfg,
            &model,
            &placement,
            &format!("srun --mpi={}", a.mpi),
            a.assume_mfu
        )
    );
    let out = absolute(&cfg.run.output_dir);
    let ld = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    let opt = |flag: &str, v: &Option<String>| v.as_ref().map(|v| format!("#SBATCH --{flag}={v}")).unwrap_or_default();
    let values = [
        ("job_name", cfg.run.name.clone()),
        ("nodes", a.nodes.to_string()),
        ("tasks_per_node", per_node.to_string()),
        (
            "gpus_line",
            if gpu {
                format!("#SBATCH --gpus-per-node={per_node}")
            } else {
                String::new()
            },
        ),
        ("cpus_per_task", a.cpus_per_task.to_string()),
        ("partition_line", opt("partition", &a.partition)),
        ("account_line", opt("account", &a.account)),
        ("time", a.time.clone()),
        ("log_dir", out.join("logs").display().to_string()),
        ("workdir", std::env::current_dir()?.display().to_string()),
        ("mpi", a.mpi.clone()),
        ("ld_library_path", sh(&ld)),
        (
            "worker",
            sh(&worker
                .as_ref()
                .map(|w| absolute(w).display().to_string())
                .unwrap_or_default()),
        ),
        ("config", sh(&absolute(&a.config).display().to_string())),
        ("output_dir", sh(&out.display().to_string())),
        ("np", np.to_string()),
    ];
    let script = render_template(&template, &values).map_err(|e| {
        problems.push(format!("--template: {e}"));
        e
    });
    if let (true, Ok(script)) = (a.dry_run, &script) {
        println!("dry run: the batch script would be\n{script}");
    }
    if !problems.is_empty() {
        return Err(refuse(&format!("the job ({})", a.config.display()), &problems));
    }
    let script = script.map_err(UsageError)?;
    if a.dry_run {
        println!("dry run: configuration and environment are ready; nothing submitted");
        return Ok(());
    }
    let Some(sbatch) = sbatch else {
        unreachable!("checked above")
    };
    let dir = out.join("sbatch");
    std::fs::create_dir_all(out.join("logs")).with_context(|| out.join("logs").display().to_string())?;
    std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let path = dir.join(format!("{}-{stamp}.sbatch", cfg.run.name));
    std::fs::write(&path, &script).with_context(|| path.display().to_string())?;
    let o = std::process::Command::new(&sbatch)
        .arg("--parsable")
        .arg(&path)
        .output()
        .with_context(|| format!("running {}", sbatch.display()))?;
    if !o.status.success() {
        anyhow::bail!(
            "sbatch refused {}: {}",
            path.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    let id = String::from_utf8_lossy(&o.stdout)
        .trim()
        .split(';')
        .next()
        .unwrap_or("")
        .to_string();
    println!("batch script {}", path.display());
    println!("submitted job {id}");
    println!("SLURM_JOB_ID={id}");
    println!(
        "follow it: squeue -j {id}; tail -f {}/slurm-{id}.out; tensorboard --logdir {}",
        out.join("logs").display(),
        out.join("tensorboard").display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_every_placeholder_or_say_which_is_unknown() {
        let t = "#!/bin/bash\n#SBATCH --nodes={{nodes}}\n{{partition_line}}\nsrun {{worker}}\n";
        let s = render_template(
            t,
            &[
                ("nodes", "2".into()),
                ("partition_line", String::new()),
                ("worker", "w".into()),
            ],
        )
        .unwrap();
        assert_eq!(s, "#!/bin/bash\n#SBATCH --nodes=2\n\nsrun w\n");
        let e = render_template("x {{oops}} y\n", &[]).unwrap_err();
        assert!(e.contains("{{oops}} y"), "{e}");
        assert_eq!(sh("it's"), r"'it'\''s'");
    }

    #[test]
    fn the_shipped_template_renders_with_the_launcher_s_values() {
        assert!(SBATCH_TEMPLATE.contains("--signal=USR1@120") && SBATCH_TEMPLATE.contains("--requeue"));
        assert!(SBATCH_TEMPLATE.contains("--resume auto"));
    }
}
