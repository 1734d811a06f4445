//! Pretraining (spec §9): MLM with the enhanced mask decoder on the data pipeline's loader, the
//! segment-wise TP forward/backward, gradient accumulation to the global batch, DP reduction per
//! layer, global-norm clip, flat AdamW with linear warmup/decay, held-out loss, checkpoints,
//! metrics (progress line, metrics.jsonl, TensorBoard) and SIGTERM/SIGUSR1 handling.
//!
//! `train` reads like the loop it runs: set up, then per step `train_step`, log, evaluate,
//! checkpoint; everything a step needs is in `Run`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use deberta_data::dataset::Dataset;
use deberta_data::loader::{BatchLayout, Batcher, Loader, MicroBatch};
use deberta_data::masking::{Masker, MaskingConfig};
use deberta_data::tokenizer::Vocab;
use deberta_model::collective::Collective;
use deberta_model::cost::{flops_per_token, MASK_FRACTION};
use deberta_model::segments::Tape;
use deberta_model::tensor_parallel::TpShard;
use deberta_model::{DebertaConfig, DebertaV2};
use tch::nn::VarStore;
use tch::{Device, Tensor};

use crate::checkpoint::{self, Manifest};
use crate::config::RunConfig;
use crate::grads::Params;
use crate::harness::build_sharded;
use crate::heartbeat::{self, Heartbeat, Status};
use crate::optim::{linear_warmup_decay, AdamWConfig, FlatAdamW};
use crate::runtime::Groups;
use crate::step::{forward_backward, Rows, StepMode};

/// Global batches of the held-out corpus that make up one evaluation.
const EVAL_BATCHES: u64 = 4;
/// Assumed peak for `perf/mfu` (H100 SXM dense bf16, as ../shared/bench uses).
const PEAK_TFLOPS: f64 = 989.0;

/// A run that cannot start because of what the user gave it (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SetupError(pub String);

/// Set by SIGTERM / SIGUSR1 (SLURM's warning before the time limit).
pub(crate) fn stop_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGUSR1] {
        signal_hook::flag::register(sig, flag.clone()).context("installing the signal handler")?;
    }
    Ok(flag)
}

/// The generator's seed for optimizer step `step` on DP rank `dp_rank`: resuming needs no RNG
/// state, TP ranks of a DP group share the stream, DP ranks differ.
pub(crate) fn dropout_seed(seed: u64, step: u64, dp_rank: usize) -> i64 {
    (seed as i64).wrapping_mul(1_000_003) + step as i64 * 1_009 + dp_rank as i64
}

struct Run<'g> {
    cfg: RunConfig,
    config_text: String,
    model_cfg: DebertaConfig,
    groups: &'g Groups,
    model: DebertaV2,
    _vs: VarStore,
    params: Params,
    opt: FlatAdamW,
    vocab_sha: String,
    train_loader: Loader,
    valid: Option<Batcher>,
    /// bf16 autocast (CUDA only; the config check refuses it on the CPU).
    bf16: bool,
}

/// A host batch as [rows, -1] on `device`, queued without waiting (`cuda::host_to_device`).
fn to_tensor(v: &[i64], rows: i64, device: Device) -> Tensor {
    deberta_model::cuda::host_to_device(&Tensor::from_slice(v).view([rows, -1]), device)
}

/// Sum of CE over predicted tokens, and their count, for one micro-batch (forward only).
fn eval_micro(run: &Run, mb: &MicroBatch) -> (f64, i64) {
    let rows = mb.consumed_index.len() as i64;
    let d = run.groups.device;
    let mut tape = Tape::new(&*run.groups.tp);
    let (ids, mask, labels) = (
        to_tensor(&mb.ids, rows, d),
        to_tensor(&mb.attention_mask, rows, d),
        to_tensor(&mb.labels, rows, d),
    );
    let loss = tch::no_grad(|| {
        deberta_model::nn::autocast(run.bf16, || {
            run.model.mlm_loss_segments(&mut tape, &ids, &mask, &labels, 1.0, false)
        })
    });
    (tape.value(loss).double_value(&[]), mb.predicted_tokens() as i64)
}

/// Held-out MLM loss: the same first `EVAL_BATCHES` global batches every time (fixed masks).
fn evaluate(run: &Run) -> Option<f64> {
    let b = run.valid.as_ref()?;
    let (mut sum, mut count) = (0.0, 0i64);
    for step in 0..EVAL_BATCHES {
        for micro in 0..b.layout.micro_steps() {
            let (s, c) = eval_micro(run, &b.micro_batch(step, micro));
            sum += s;
            count += c;
        }
    }
    let mut t = Tensor::from_slice(&[sum, count as f64]).to_device(run.groups.device);
    run.groups.dp.all_reduce_sum(&mut t);
    let t = t.to_device(Device::Cpu);
    Some(t.double_value(&[0]) / t.double_value(&[1]).max(1.0))
}

/// One step's figures as the device left them (fp64 [1] each): the host reads them back when
/// it logs, evaluates or saves (`settle`), not every step.
pub(crate) struct PendingStep {
    pub loss: Tensor,
    pub grad_norm: Tensor,
    /// 1 if the update was applied, 0 if skipped (non-finite loss or norm).
    pub applied: Tensor,
}

/// One step's figures, read back.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepStats {
    pub loss: f64,
    pub grad_norm: f64,
    pub skipped: bool,
}

/// One optimizer step on this rank's micro-batches of global batch `step`, queued without
/// waiting for the device: the loss and the norm stay there, and the device itself skips the
/// update if either is not finite (`FlatAdamW::step_if_finite`).
fn train_step(run: &mut Run, step: u64) -> PendingStep {
    let g = run.groups;
    // Dropout is reseeded from (seed, step): resuming needs no RNG state. TP ranks of a DP group
    // share the stream (replicated dropout must agree across them); DP ranks differ.
    let seed = dropout_seed(run.cfg.run.seed, step, g.topo.dp_rank);
    tch::manual_seed(seed);
    let micro = run.train_loader.next_step();
    // Normalise by the global number of predicted tokens: the host knows the counts, so one
    // scalar collective of the host's control plane, before backward.
    let mut count = Tensor::from_slice(&[micro.iter().map(|m| m.predicted_tokens() as f64).sum::<f64>()]);
    g.dp_mpi.all_reduce_sum(&mut count);
    let predicted = count.double_value(&[0]).max(1.0);
    let device = g.device;
    let rows: Vec<Rows> = micro
        .iter()
        .map(|mb| {
            let n = mb.consumed_index.len() as i64;
            (
                to_tensor(&mb.ids, n, device),
                to_tensor(&mb.attention_mask, n, device),
                // On the host: the model finds the predicted rows there, with no read-back.
                to_tensor(&mb.labels, n, Device::Cpu),
            )
        })
        .collect();
    let mode = StepMode {
        bf16: run.bf16,
        recompute: run.cfg.train.recompute.then_some(seed),
    };
    let mut loss = forward_backward(&run.model, &run.params, g, &rows, predicted, mode);
    if injected_non_finite(step) {
        loss *= f64::NAN;
    }
    let grad_norm = run.opt.global_grad_norm_on_device(&*g.tp);
    let t = &run.cfg.train;
    let lr = linear_warmup_decay(step, t.lr, t.warmup_steps, t.steps);
    let applied = run.opt.step_if_finite(lr, t.grad_clip, &loss, &grad_norm);
    PendingStep {
        loss,
        grad_norm,
        applied,
    }
}

/// Read the pending steps back (one copy, which waits for the device), in order; `first` is the
/// 1-based number of the first. Reports each skipped update, keeps the counts of skipped steps,
/// and fails once `max_bad` are skipped in a row. Returns the last step's figures.
pub(crate) fn settle(
    pending: &mut Vec<PendingStep>,
    first: u64,
    (bad_in_a_row, skipped_total): (&mut usize, &mut u64),
    max_bad: usize,
    rank: usize,
) -> Result<Option<StepStats>> {
    if pending.is_empty() {
        return Ok(None);
    }
    let parts: Vec<&Tensor> = pending
        .iter()
        .flat_map(|p| [&p.loss, &p.grad_norm, &p.applied])
        .collect();
    let values = Vec::<f64>::try_from(&Tensor::cat(&parts, 0).to_device(Device::Cpu))
        .context("reading back the steps' figures")?;
    pending.clear();
    let mut last = None;
    for (k, v) in values.chunks(3).enumerate() {
        let (step, stats) = (
            first + k as u64,
            StepStats {
                loss: v[0],
                grad_norm: v[1],
                skipped: v[2] == 0.0,
            },
        );
        if stats.skipped {
            *skipped_total += 1;
            *bad_in_a_row += 1;
            if rank == 0 {
                eprintln!(
                    "[rank 0] step {step}: non-finite loss {} / grad norm {}: update skipped",
                    stats.loss, stats.grad_norm
                );
            }
            if *bad_in_a_row >= max_bad {
                bail!("{bad_in_a_row} consecutive non-finite steps (train.max_bad_steps): stopping");
            }
        } else {
            *bad_in_a_row = 0;
        }
        last = Some(stats);
    }
    Ok(last)
}

/// Fault injection for the tests of the non-finite-loss handling (pretraining and fine-tuning): `DEBERTA_INJECT_NAN_STEPS`
/// lists 0-based step indices (comma-separated) whose loss is replaced by NaN on every rank.
pub(crate) fn injected_non_finite(step: u64) -> bool {
    std::env::var("DEBERTA_INJECT_NAN_STEPS")
        .map(|v| v.split(',').any(|s| s.trim().parse() == Ok(step)))
        .unwrap_or(false)
}

/// Peak resident memory of this process (GiB), from /proc.
fn peak_rss_gib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kib| kib / (1u64 << 20) as f64)
        .unwrap_or(0.0)
}

/// Memory to report: the peak of libtorch's CUDA allocator (torch.cuda.max_memory_allocated)
/// on CUDA, or the driver's in-use figure if that is unreadable; the process's peak RSS on the
/// CPU.
fn memory_gib(device: Device) -> f64 {
    match device {
        Device::Cuda(i) => match crate::precision::cuda_allocator_stats(i) {
            Some(s) => s.peak_allocated as f64 / (1u64 << 30) as f64,
            None => crate::precision::cuda_used_gib().unwrap_or(0.0),
        },
        _ => peak_rss_gib(),
    }
}

/// Rank 0's outputs: the progress line, metrics.jsonl, TensorBoard events.
pub(crate) struct Monitor {
    metrics: std::fs::File,
    tb: tensorboard_rs::summary_writer::SummaryWriter,
}

impl Monitor {
    /// `start`: the step this run continues from (0 when fresh). Lines of metrics.jsonl after
    /// it (written by an attempt that died) are dropped, so the file holds each step once.
    pub(crate) fn new(dir: &Path, start: u64) -> Result<Monitor> {
        std::fs::create_dir_all(dir.join("tensorboard"))?;
        truncate_metrics(&dir.join("metrics.jsonl"), start)?;
        let metrics = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("metrics.jsonl"))?;
        let tb = tensorboard_rs::summary_writer::SummaryWriter::new(dir.join("tensorboard"));
        Ok(Monitor { metrics, tb })
    }

    pub(crate) fn log(&mut self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        use std::io::Write;
        let mut obj = serde_json::Map::new();
        obj.insert("step".into(), step.into());
        for (k, v) in values {
            obj.insert((*k).into(), serde_json::json!(v));
            self.tb.add_scalar(k, *v as f32, step as usize);
        }
        writeln!(self.metrics, "{}", serde_json::Value::Object(obj))?;
        self.metrics.flush()?;
        self.tb.flush();
        Ok(())
    }
}

/// Keep the lines of `path` whose `step` is at most `step` (atomically: temp file + rename).
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let keep: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .collect();
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, keep.iter().map(|l| format!("{l}\n")).collect::<String>())
        .with_context(|| tmp.display().to_string())?;
    std::fs::rename(&tmp, path).with_context(|| path.display().to_string())?;
    Ok(())
}

fn eta(seconds_per_step: f64, remaining: u64) -> String {
    let s = (seconds_per_step * remaining as f64).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// Set up everything, resume if asked and possible, then train to `train.steps`.
pub fn train(config_path: &Path, resume: bool, groups: &Groups) -> Result<()> {
    let rank = groups.topo.rank;
    let config_text = std::fs::read_to_string(config_path).with_context(|| format!("{}", config_path.display()))?;
    let cfg = RunConfig::from_yaml(config_path, &config_text)?;
    let model_cfg = cfg.model_config().map_err(anyhow::Error::msg)?;
    let stop = stop_flag()?;
    let bf16 = cfg.train.precision == "bf16";
    if bf16 && !crate::precision::use_bf16_for_cuda_autocast() {
        bail!("could not set libtorch's CUDA autocast dtype to bf16");
    }
    let out_dir = cfg.run.output_dir.clone();
    let ckpt_root = out_dir.join("checkpoints");
    let mut hb = Heartbeat::new(&out_dir, rank).with_context(|| format!("{}", heartbeat::dir(&out_dir).display()))?;
    if rank == 0 {
        // A status left by an earlier attempt no longer describes this one.
        let _ = std::fs::remove_file(heartbeat::status_path(&out_dir));
    }

    let vocab = Vocab::load(&cfg.data.tokenizer)?;
    let masking = MaskingConfig {
        prob: cfg.data.mask_prob,
        ..MaskingConfig::default()
    };
    let masker = Arc::new(Masker::new(&vocab, masking)?);
    let layout = BatchLayout {
        seq_len: cfg.data.seq_len,
        global_batch: cfg.train.global_batch,
        micro_batch: cfg.train.micro_batch,
        dp_rank: groups.topo.dp_rank as u64,
        dp_size: groups.topo.layout.dp as u64,
        seed: cfg.run.seed,
    };
    let train_set = Arc::new(Dataset::open(&cfg.data.corpus, Some(&vocab), vocab.special)?);
    if vocab.vocab_size as i64 > model_cfg.vocab_size {
        return Err(SetupError(format!(
            "data.tokenizer has {} ids but the model's vocabulary is {} (set model.vocab_size)",
            vocab.vocab_size, model_cfg.vocab_size
        ))
        .into());
    }
    let valid = match &cfg.data.valid_corpus {
        Some(p) => Some(Batcher::new(
            Arc::new(Dataset::open(p, Some(&vocab), vocab.special)?),
            masker.clone(),
            layout,
        )?),
        None => None,
    };

    let tp = TpShard {
        rank: groups.tp.rank() as i64,
        size: groups.tp.size() as i64,
    };
    crate::runtime::check_attention_path(groups.device, &model_cfg, bf16)?;
    let (vs, model) = build_sharded(&model_cfg, cfg.run.seed as i64, tp, groups.device);
    let params = Params::new(&vs, model_cfg.num_hidden_layers);
    let mut opt = FlatAdamW::for_params(
        &params,
        AdamWConfig {
            weight_decay: cfg.train.weight_decay,
            ..AdamWConfig::default()
        },
    );
    if cfg.train.bf16_weight_copies {
        opt.keep_weight_copies();
    }

    let (mut step, mut consumed) = (0u64, 0u64);
    if resume {
        if let Some((_, dir)) = checkpoint::list(&ckpt_root).pop() {
            let m = checkpoint::read_manifest(&dir)?;
            if m.tokenizer_sha256 != vocab.sha256 {
                return Err(SetupError(format!(
                    "{}: saved with tokenizer sha256 {}, the config's tokenizer has {}",
                    dir.display(),
                    m.tokenizer_sha256,
                    vocab.sha256
                ))
                .into());
            }
            checkpoint::load(&dir, &m, groups, &params, &mut opt)?;
            (step, consumed) = (m.step, m.consumed_samples);
            if rank == 0 {
                println!(
                    "[rank 0] resumed from {} (step {step}, {consumed} samples; saved at tp {} x dp {})",
                    dir.display(),
                    m.tp,
                    m.dp
                );
            }
        } else if rank == 0 {
            println!(
                "[rank 0] --resume auto: no checkpoint in {}, starting fresh",
                ckpt_root.display()
            );
        }
    }
    let train_loader = Loader::start(Batcher::new(train_set, masker, layout)?, consumed, 4)?;
    let mut run = Run {
        cfg,
        config_text,
        model_cfg,
        groups,
        model,
        _vs: vs,
        params,
        opt,
        vocab_sha: vocab.sha256.clone(),
        train_loader,
        valid,
        bf16,
    };

    let mut monitor = if rank == 0 {
        Some(Monitor::new(&out_dir, step)?)
    } else {
        None
    };
    hb.beat(step, "setup");
    let tokens_per_step = (run.cfg.train.global_batch as usize * run.cfg.data.seq_len) as f64;
    let fpt = flops_per_token(&run.model_cfg, run.cfg.data.seq_len as i64, MASK_FRACTION);
    let (mut bad_in_a_row, mut skipped_total) = (0usize, 0u64);
    if step == 0 {
        if let (Some(m), Some(l)) = (monitor.as_mut(), evaluate(&run)) {
            println!("[rank 0] step 0/{} eval/loss {l:.4}", run.cfg.train.steps);
            m.log(0, &[("eval/loss", l)])?;
        }
    }
    let mut window = Instant::now();
    let mut window_steps = 0u64;
    let total = run.cfg.train.steps;
    // Steps queued whose figures the host has not read yet: read back when it logs, evaluates
    // or saves, so a step never waits for the device to finish the one before.
    let mut pending: Vec<PendingStep> = Vec::new();
    while step < total {
        heartbeat::test_hang_point(rank, step);
        pending.push(train_step(&mut run, step));
        step += 1;
        hb.beat(step, "train");
        consumed += run.cfg.train.global_batch;
        window_steps += 1;
        let t = &run.cfg.train;
        let (log_now, eval_now) = (
            step % t.log_every == 0 || step == total,
            step % t.eval_every == 0 || step == total,
        );
        // Every rank must agree to stop: a signal may have reached only some of them.
        let mut flag = Tensor::from_slice(&[i64::from(stop.load(Ordering::Relaxed))]);
        groups.world.all_reduce_max(&mut flag);
        let stopping = flag.int64_value(&[0]) == 1;
        let save_now = step % t.checkpoint_every == 0 || step == total || stopping;
        let first = step + 1 - pending.len() as u64;
        let last = if log_now || eval_now || save_now {
            let counts = (&mut bad_in_a_row, &mut skipped_total);
            settle(&mut pending, first, counts, t.max_bad_steps, rank)?
        } else {
            None
        };
        if let (true, Some(stats)) = (log_now, last) {
            let secs = window.elapsed().as_secs_f64() / window_steps as f64;
            let tok_s = tokens_per_step / secs;
            let lr = linear_warmup_decay(step - 1, t.lr, t.warmup_steps, t.steps);
            if let Some(m) = monitor.as_mut() {
                println!(
                    "[rank 0] step {step}/{total} loss {:.4} lr {lr:.3e} grad_norm {:.3} {tok_s:.0} tokens/s ETA {}",
                    stats.loss,
                    stats.grad_norm,
                    eta(secs, total - step)
                );
                m.log(
                    step,
                    &[
                        ("train/loss", stats.loss),
                        ("train/lr", lr),
                        ("train/grad_norm", stats.grad_norm),
                        ("perf/tokens_per_s", tok_s),
                        ("perf/mfu", tok_s * fpt / (PEAK_TFLOPS * 1e12)),
                        ("mem/peak_gib", memory_gib(run.groups.device)),
                        ("train/skipped_steps", skipped_total as f64),
                    ],
                )?;
            }
            window = Instant::now();
            window_steps = 0;
        }
        if eval_now {
            if let Some(l) = evaluate(&run) {
                if let Some(m) = monitor.as_mut() {
                    println!("[rank 0] step {step}/{total} eval/loss {l:.4}");
                    m.log(step, &[("eval/loss", l)])?;
                }
            }
            hb.beat(step, "eval");
        }
        if save_now {
            let dir = save(&run, step, consumed, &ckpt_root)?;
            if rank == 0 {
                println!("[rank 0] checkpoint {}", dir.display());
            }
            hb.beat(step, "checkpoint");
        }
        if stopping {
            if rank == 0 {
                let status = Status {
                    state: "stopped".into(),
                    step,
                    steps: total,
                };
                heartbeat::write_status(&out_dir, &status)?;
            }
            hb.beat(step, "exit");
            if rank == 0 {
                println!("[rank 0] stop requested (SIGTERM/SIGUSR1): checkpoint written at step {step}, exiting");
            }
            return Ok(());
        }
    }
    if rank == 0 {
        let status = Status {
            state: "done".into(),
            step,
            steps: total,
        };
        heartbeat::write_status(&out_dir, &status)?;
        println!(
            "[rank 0] done: {total} steps; run directory {} (metrics.jsonl, checkpoints/); TensorBoard: tensorboard --logdir {}",
            out_dir.display(),
            out_dir.join("tensorboard").display()
        );
    }
    hb.beat(step, "exit");
    Ok(())
}

fn save(run: &Run, step: u64, consumed: u64, root: &Path) -> Result<PathBuf> {
    let m = Manifest {
        format: checkpoint::FORMAT.into(),
        version: 1,
        step,
        consumed_samples: consumed,
        tp: run.groups.topo.layout.tp,
        dp: run.groups.topo.layout.dp,
        seed: run.cfg.run.seed,
        vocab_size: run.model_cfg.vocab_size,
        tokenizer_sha256: run.vocab_sha.clone(),
        optimizer_steps: run.opt.steps(),
        config: run.config_text.clone(),
    };
    checkpoint::save(
        root,
        &m,
        run.groups,
        &run.params,
        &run.opt,
        run.cfg.train.keep_checkpoints,
    )
}
