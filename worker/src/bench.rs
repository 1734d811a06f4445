//! Training throughput of one process, measured the way ../shared/bench/hf_deberta_baseline.py
//! measures HF's: full optimizer steps (MLM + EMD forward, backward, global-norm clip, AdamW with
//! the baseline's betas (0.9, 0.98), ε 1e-6, weight decay 0.01) on a fixed random batch, 15% of
//! the positions predicted, timed after warm-up, the median step reported as one JSON line with
//! the baseline's fields under the same FLOPs model (`deberta_model::cost::flops_per_token`).

use std::time::Instant;

use anyhow::Context;

use deberta_model::cost::{flops_per_token, ParamCount, MASK_FRACTION};
use deberta_model::tensor_parallel::TpShard;
use deberta_model::{DebertaConfig, IGNORE_INDEX};
use tch::{Device, Kind, Tensor};

use crate::grads::Params;
use crate::harness::build_sharded;
use crate::optim::{AdamWConfig, FlatAdamW};
use crate::runtime::Groups;
use crate::step::{plain_update, StepMode};

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub preset: String,
    pub batch: i64,
    pub seq: i64,
    pub steps: usize,
    pub warmup: usize,
    /// Dense bf16 peak for the MFU (H100 SXM: 989).
    pub peak_tflops: f64,
    /// bf16 autocast (CUDA, or the CPU standing in for it with `emulate_kernels`) or fp32.
    pub bf16: bool,
    /// Activation recomputation per segment.
    pub recompute: bool,
    /// One more step, timed segment by segment (`deberta_model::profile`), on stderr.
    pub profile: bool,
    /// One more step traced by libtorch's profiler (`deberta_model::profile::trace_start`),
    /// unsynchronised: the Chrome trace saved in this folder as `bench-trace-b{batch}.json` and
    /// its summary (`trace::summarize`, the kernels' time by part of the step) on stderr.
    pub trace: Option<std::path::PathBuf>,
    /// On the CPU: the fused path, its kernels in the emulator and, with `bf16`, the CPU's
    /// autocast standing in for CUDA's (`cuda::emulate_cuda_path_on_cpu`), so the profile counts
    /// the CUDA path's operators.
    pub emulate_kernels: bool,
    /// The weights' bf16 copies kept by the optimizer (`FlatAdamW::keep_weight_copies`,
    /// `train.bf16_weight_copies`) instead of a cast per use; needs `bf16`.
    pub weight_copies: bool,
}

/// One benchmark row: the baseline's keys, in its order. `peak_mem_gib` is null on the CPU and
/// the caching allocator's peak (HF's max_memory_allocated) on CUDA.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct BenchRow {
    pub system: String,
    pub preset: String,
    pub params: i64,
    pub batch: i64,
    pub seq: i64,
    pub step_s: f64,
    pub tokens_per_s: f64,
    pub loss: f64,
    pub model_tflops_per_s: f64,
    pub mfu: f64,
    pub peak_mem_gib: Option<f64>,
}

pub fn run(groups: &Groups, b: &BenchConfig) -> anyhow::Result<BenchRow> {
    let cfg = DebertaConfig::preset(&b.preset)?;
    anyhow::ensure!(
        b.batch >= 1 && b.seq >= 3 && b.steps >= 1,
        "--batch, --seq >= 3 and --steps must be positive"
    );
    anyhow::ensure!(
        b.seq <= cfg.max_position_embeddings,
        "--seq {} exceeds max_position_embeddings {}",
        b.seq,
        cfg.max_position_embeddings
    );
    anyhow::ensure!(
        b.bf16 || !b.weight_copies,
        "--bf16-weight-copies keeps bf16 copies of the weights for bf16 autocast: not with fp32"
    );
    if b.bf16 {
        anyhow::ensure!(
            crate::precision::use_bf16_for_cuda_autocast(),
            "could not set libtorch's autocast dtype to bf16"
        );
    }
    let device = groups.device;
    if b.emulate_kernels {
        anyhow::ensure!(device == Device::Cpu, "--emulate-kernels needs --device cpu");
        // With --fp32 every autocast scope is off, so the CPU's stays off too.
        deberta_model::cuda::emulate_cuda_path_on_cpu(true);
        deberta_model::attention::RelativePath::set_for_this_thread(deberta_model::attention::RelativePath::Fused);
    }
    crate::runtime::check_attention_path(device, &cfg, b.bf16)?;
    // What ran, beside the figures (the JSON row keeps the baseline's fields only).
    let path = deberta_model::attention::RelativePath::for_device(device);
    let relative = deberta_model::fused_attention::RelativeTerms::chosen().map_err(anyhow::Error::msg)?;
    let table_grads = deberta_model::fused_attention::TableGrads::chosen().map_err(anyhow::Error::msg)?;
    let wgmma = deberta_model::fused_attention::wgmma().map_err(anyhow::Error::msg)?;
    let swap = deberta_model::fused_attention::wgmma_swap().map_err(anyhow::Error::msg)?;
    let wgmma = match swap == deberta_model::fused_attention::WgmmaSwap::NONE {
        true => format!("{wgmma:?}"),
        false => format!("{wgmma:?} with DEBERTA_WGMMA_SWAP={}", swap.to_value()),
    };
    // The kernels serve the hand-written segments: the fused path's, when activations are kept.
    let norm = path == deberta_model::attention::RelativePath::Fused
        && !b.recompute
        && deberta_model::residual_norm::applies(device, cfg.hidden_size).map_err(anyhow::Error::msg)?;
    let hand_written = path == deberta_model::attention::RelativePath::Fused && !b.recompute;
    let emd_fused = hand_written && deberta_model::cuda::env_switch("DEBERTA_EMD_FUSED");
    let wgrad = hand_written && b.bf16 && device.is_cuda() && deberta_model::cuda::env_switch("DEBERTA_WGRAD_FUSION");
    eprintln!(
        "bench paths: attention {path:?} (relative terms {relative:?} on the fused path, their table gradients \
         {table_grads:?}, by wgmma at head size 64: {wgmma}), output LayerNorms by {}, \
         EMD attention by {}, weight gradients by {}, weights in bf16 by {}, {}",
        if norm {
            "the residual_norm kernels"
        } else {
            "libtorch's ops"
        },
        if emd_fused {
            "the fused kernels"
        } else {
            "the gather path"
        },
        if wgrad {
            "cuBLAS into the fp32 gradients"
        } else {
            "libtorch's GEMMs and additions"
        },
        if b.weight_copies {
            "the copies AdamW writes"
        } else {
            "a cast per use"
        },
        match (b.bf16, device) {
            (false, _) => "fp32",
            (true, Device::Cpu) => "bf16 autocast (the CPU standing in for CUDA)",
            (true, _) => "bf16 autocast",
        }
    );
    let (vs, model) = build_sharded(&cfg, 0, TpShard::NONE, device);
    let params = Params::new(&vs, cfg.num_hidden_layers);
    let mut opt = FlatAdamW::for_params(
        &params,
        AdamWConfig {
            beta2: 0.98,
            ..AdamWConfig::default()
        },
    );
    if b.weight_copies {
        opt.keep_weight_copies();
    }
    tch::manual_seed(0);
    let opts = (Kind::Int64, device);
    let ids = Tensor::randint_low(5, cfg.vocab_size, [b.batch, b.seq], opts);
    let masked = Tensor::rand([b.batch, b.seq], (Kind::Float, device)).lt(MASK_FRACTION);
    let labels = ids.where_self(&masked, &Tensor::full([b.batch, b.seq], IGNORE_INDEX, opts));
    let mask = Tensor::ones([b.batch, b.seq], opts);
    let predicted = labels.ne(IGNORE_INDEX).sum(Kind::Int64).int64_value(&[]).max(1) as f64;
    // The labels on the host, as the trainer keeps them (the predicted rows are found there).
    let micro = [(ids, mask, labels.to_device(Device::Cpu))];
    let mut times = Vec::with_capacity(b.steps);
    let mut queue_times = Vec::with_capacity(b.steps);
    let mut loss = Tensor::zeros([1], (Kind::Double, device));
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    // Where the median-ish step goes (stderr; the JSON row keeps the baseline's fields only).
    let mut parts = [0.0f64; 3];
    // The peak over warm-up and timed steps, as the baseline measures it.
    if let Device::Cuda(i) = device {
        crate::precision::reset_cuda_peak_memory(i);
    }
    // Step i, calling `after(stage)` after each of its stages.
    let mut update = |i: usize, after: &mut dyn FnMut(&'static str)| {
        let mode = StepMode {
            bf16: b.bf16,
            recompute: b.recompute.then_some(i as i64),
        };
        plain_update(
            &model,
            &params,
            &mut opt,
            groups,
            &micro,
            predicted,
            mode,
            (1e-4, 1.0),
            after,
        )
    };
    for i in 0..b.warmup + b.steps {
        let t0 = Instant::now();
        let last = i + 1 == b.warmup + b.steps;
        // Each part of the last step, synchronised (the others run unsynchronised).
        let (mut part, mut t) = (0, Instant::now());
        let mut after = |_: &str| {
            if last {
                sync();
                parts[part] = t.elapsed().as_secs_f64();
                part += 1;
                t = Instant::now();
            }
        };
        // The step queues without waiting for the device (as the trainer's does); the timing
        // synchronises after it, as the baseline does.
        loss = update(i, &mut after);
        let queued = t0.elapsed().as_secs_f64();
        sync();
        if i >= b.warmup && !last {
            queue_times.push(queued);
        }
        if i >= b.warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    eprintln!(
        "bench breakdown (last step, batch {}): forward+backward {:.4} s, grad norm {:.4} s, AdamW (clip inside) {:.4} s",
        b.batch, parts[0], parts[1], parts[2]
    );
    // How long the host took to queue a step, against the step: well under it on a GPU if
    // nothing inside the step waits for the device (with a wait, the host returns late).
    if let Some(q) = median(&mut queue_times) {
        eprintln!(
            "bench queueing (batch {}): the host queued a step in {q:.4} s (median of the timed steps but the last); the step took {:.4} s",
            b.batch,
            median(&mut times.clone()).unwrap_or(0.0)
        );
    }
    if b.profile {
        use deberta_model::profile;
        profile::start_naming(device);
        let _ = update(b.warmup + b.steps, &mut |stage| profile::mark(|| stage.into()));
        print_profile(b.batch, profile::finish());
    }
    if let Some(dir) = &b.trace {
        use deberta_model::profile;
        std::fs::create_dir_all(dir).with_context(|| format!("creating the trace folder {}", dir.display()))?;
        let path = dir.join(format!("bench-trace-b{}.json", b.batch));
        sync();
        profile::trace_start(device).map_err(|e| anyhow::anyhow!("starting libtorch's profiler: {e}"))?;
        let _ = update(b.warmup + b.steps + 1, &mut |stage| profile::mark(|| stage.into()));
        sync();
        profile::trace_stop(&path).map_err(anyhow::Error::msg)?;
        print_trace(b.batch, &path, &crate::trace::summarize(&path)?, device.is_cuda());
    }
    let step = median(&mut times).expect("at least one timed step");
    let tok_s = (b.batch * b.seq) as f64 / step;
    let fpt = flops_per_token(&cfg, b.seq, MASK_FRACTION);
    let round = |x: f64, digits: i32| (x * 10f64.powi(digits)).round() / 10f64.powi(digits);
    Ok(BenchRow {
        system: match deberta_model::attention::RelativePath::for_device(device) {
            deberta_model::attention::RelativePath::Gather => "deberta-rs".into(),
            deberta_model::attention::RelativePath::Skew => "deberta-rs+skew".into(),
            deberta_model::attention::RelativePath::Fused => {
                match deberta_model::fused_attention::RelativeTerms::chosen() {
                    Ok(deberta_model::fused_attention::RelativeTerms::InKernel) => "deberta-rs+fused-rel".into(),
                    Ok(deberta_model::fused_attention::RelativeTerms::InKernelForward) => {
                        "deberta-rs+fused-relfwd".into()
                    }
                    Ok(deberta_model::fused_attention::RelativeTerms::InKernelSplit) => "deberta-rs+fused-split".into(),
                    _ => "deberta-rs+fused".into(),
                }
            }
        },
        preset: b.preset.clone(),
        params: ParamCount::of(&cfg).pretraining,
        batch: b.batch,
        seq: b.seq,
        step_s: round(step, 4),
        tokens_per_s: round(tok_s, 1),
        loss: round(loss.to_device(Device::Cpu).double_value(&[0]), 4),
        model_tflops_per_s: round(tok_s * fpt / 1e12, 1),
        mfu: round(tok_s * fpt / (b.peak_tflops * 1e12), 4),
        peak_mem_gib: match device {
            Device::Cuda(i) => Some(round(peak_cuda_gib(i), 2)),
            _ => None,
        },
    })
}

/// The peak of libtorch's allocator (HF's max_memory_allocated) on GPU `i`, in GiB; the driver's
/// view, said so on stderr, if the allocator's statistics cannot be read.
fn peak_cuda_gib(i: usize) -> f64 {
    let gib = |bytes: i64| bytes as f64 / (1u64 << 30) as f64;
    let driver = crate::precision::cuda_used_gib().unwrap_or(0.0);
    match crate::precision::cuda_allocator_stats(i) {
        Some(s) => {
            eprintln!(
                "bench memory: allocated peak {:.2} GiB (peak_mem_gib), reserved peak {:.2} GiB, in use by the driver's count {driver:.2} GiB (PYTORCH_CUDA_ALLOC_CONF={})",
                gib(s.peak_allocated),
                gib(s.peak_reserved),
                std::env::var("PYTORCH_CUDA_ALLOC_CONF").unwrap_or_default()
            );
            gib(s.peak_allocated)
        }
        None => {
            eprintln!(
                "bench memory: the allocator's statistics are unreadable; peak_mem_gib is the driver's view ({driver:.2} GiB), not comparable to HF's"
            );
            driver
        }
    }
}

/// The profiled step's table on stderr, the largest share first: time, and the ATen operators
/// dispatched (called by the program; with their inner calls), then the stage's most called
/// operators by name (those called by the program).
fn print_profile(batch: i64, mut rows: Vec<deberta_model::profile::Stage>) {
    let total: f64 = rows.iter().map(|r| r.ms).sum();
    let ops = rows.iter().fold((0, 0, 0), |(t, a, c), r| {
        (t + r.ops.top, a + r.ops.all, c + r.ops.casts)
    });
    rows.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    eprintln!(
        "bench profile (one more step, batch {batch}, each segment synchronised): {total:.1} ms, {} operators ({} with inner calls, {} casts)",
        ops.0, ops.1, ops.2
    );
    for r in rows {
        eprintln!(
            "  {:<56} {:>9.2} ms {:>5.1}%  ({}x) {:>7} ops {:>7} all {:>6} casts",
            r.name,
            r.ms,
            100.0 * r.ms / total.max(1e-9),
            r.intervals,
            r.ops.top,
            r.ops.all,
            r.ops.casts
        );
        if !r.names.is_empty() {
            let shown = r.names.iter().take(PROFILE_NAMES);
            let mut line: Vec<String> = shown.map(|(name, n)| format!("{} {n}", short_op_name(name))).collect();
            if r.names.len() > PROFILE_NAMES {
                let rest: u64 = r.names[PROFILE_NAMES..].iter().map(|(_, n)| n).sum();
                line.push(format!("{} others {rest}", r.names.len() - PROFILE_NAMES));
            }
            eprintln!("      {}", line.join(", "));
        }
    }
}

/// The traced step's summary on stderr: the device's busy time against the span, then by who
/// wrote the kernels, by part of the step and by kernel, the largest first.
fn print_trace(batch: i64, path: &std::path::Path, s: &crate::trace::TraceSummary, cuda: bool) {
    eprintln!(
        "bench trace (one more step, batch {batch}, unsynchronised; {}): {} device events, {:.1} ms busy in a {:.1} ms span, {} marks",
        path.display(),
        s.events,
        s.busy_ms,
        s.span_ms,
        s.marks
    );
    let row = |x: &crate::trace::Share| {
        eprintln!(
            "  {:<100} {:>9.2} ms {:>5.1}% {:>6}x",
            x.name,
            x.ms,
            100.0 * x.ms / s.busy_ms.max(1e-9),
            x.count
        )
    };
    if cuda && s.events == 0 {
        eprintln!(
            "bench trace: no device events: libtorch's profiler did not reach CUPTI (is libcupti on the library path?); the trace holds the host's operators only"
        );
    }
    eprintln!(" by who wrote the kernels:");
    s.groups.iter().for_each(row);
    eprintln!(" by part of the step (the first mark after the launch):");
    s.parts.iter().for_each(row);
    eprintln!(" by kernel (the {TRACE_KERNELS} largest):");
    s.kernels.iter().take(TRACE_KERNELS).for_each(row);
}

/// How many kernels the trace's summary prints.
const TRACE_KERNELS: usize = 40;

/// An operator's name without its namespace, autograd's node without the engine's prefix.
fn short_op_name(name: &str) -> &str {
    let name = name.trim_start_matches("autograd::engine::evaluate_function: ");
    name.trim_start_matches("aten::")
        .trim_start_matches("torch::autograd::")
}

/// How many operator names the profile prints per stage.
const PROFILE_NAMES: usize = 10;

/// The middle element (the upper one of an even count), as the bench reports step times.
fn median(v: &mut [f64]) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}
