//! The MLM head's cross-entropy over the (vocab-parallel, padded) vocabulary as two CUDA kernels
//! (`kernels/cross_entropy.cu`, through `cuda`), for its hand-written segment
//! (`model::mlm_loss_segments`): per row the max, the sum of exponentials and the target's logit
//! in one pass over the bf16 logits, and in backward the gradient written over the logits in
//! one more. libtorch's path (`tensor_parallel::vocab_parallel_cross_entropy_padded` through
//! autograd) widened the logits to fp32 and took some fifteen passes over them in forward and
//! backward: ~13 ms of the 1.5B model's step at batch 32 × 512 on an H100 (traced), for 2,458
//! rows of 128,128 logits.
//!
//! CPU tensors take libtorch's path, or the emulated kernels in tests (`cuda::emulate_on_cpu`).

use cudarc::driver::LaunchConfig;
use tch::{Device, Kind, Tensor};

use crate::collective::Collective;
use crate::cuda::{self, Arg, Kernels};

/// The kernels' CUDA C source (after the shared bf16 helpers).
pub const SOURCE: &str = concat!(
    include_str!("kernels/bf16.cuh"),
    include_str!("kernels/cross_entropy.cu")
);

/// Threads per row (4 columns each per step).
const THREADS: u32 = 256;

/// Whether the kernels run for logits of `cols` columns in `kind` on `device`: on CUDA (or in
/// the emulator), bf16 or fp32, a multiple of 4 columns.
pub fn applies(device: Device, kind: Kind, cols: i64) -> bool {
    cuda::kernels_run_on(device) && matches!(kind, Kind::BFloat16 | Kind::Float) && cols % 4 == 0
}

fn kernels(device: Device) -> Result<Kernels, String> {
    if !device.is_cuda() {
        return Ok(Kernels::Emulated { variant: 0 });
    }
    let functions = [
        ("ce_stats_bf16", 0),
        ("ce_stats_f32", 0),
        ("ce_grad_bf16", 0),
        ("ce_grad_f32", 0),
    ];
    cuda::load(device, SOURCE, "cross_entropy.cu", &[], &functions).map(Kernels::Gpu)
}

fn suffix(kind: Kind) -> Result<&'static str, String> {
    match kind {
        Kind::BFloat16 => Ok("bf16"),
        Kind::Float => Ok("f32"),
        k => Err(format!("cross-entropy: logits must be bf16 or fp32, not {k:?}")),
    }
}

fn check(logits: &Tensor, bias: &Tensor, targets: &Tensor, real: i64) -> Result<(i64, i64), String> {
    let (rows, cols) = logits.size2().map_err(|e| format!("cross-entropy: logits: {e}"))?;
    let ok = logits.is_contiguous()
        && cols % 4 == 0
        && (0..=cols).contains(&real)
        && bias.size() == [cols]
        && bias.kind() == Kind::Float
        && bias.is_contiguous()
        && targets.size() == [rows]
        && targets.kind() == Kind::Int64
        && targets.is_contiguous();
    if !ok {
        return Err(format!(
            "cross-entropy: logits {:?} (contiguous, a multiple of 4 columns), bias {:?} {:?} (fp32, one per column), targets {:?} {:?} (int64, one per row), {real} real columns",
            logits.size(),
            bias.size(),
            bias.kind(),
            targets.size(),
            targets.kind()
        ));
    }
    Ok((rows, cols))
}

fn per_row(rows: i64, shared: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.max(1) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: shared,
    }
}

/// Per row of `logits` [rows, cols] (+ `bias` [cols] fp32) over its first `real` columns: the
/// max m, the sum of exp(z - m), and the logit (bias added) at `targets` [rows] (int64 column
/// indices; 0 where the index is outside [0, real), another rank's column): [rows, 3] fp32.
pub fn stats(logits: &Tensor, bias: &Tensor, targets: &Tensor, real: i64) -> Result<Tensor, String> {
    let (rows, cols) = check(logits, bias, targets, real)?;
    let out = Tensor::empty([rows, 3], (Kind::Float, logits.device()));
    if rows == 0 {
        return Ok(out);
    }
    let name = format!("ce_stats_{}", suffix(logits.kind())?);
    let args = [
        Arg::tensor(logits),
        Arg::tensor(bias),
        Arg::tensor(targets),
        Arg::tensor(&out),
        Arg::I32(cols as i32),
        Arg::I32(real as i32),
    ];
    // SAFETY: checked above: logits rows x cols contiguous, bias [cols] fp32, targets [rows]
    // int64, out [rows, 3] fp32, all on the logits' device; a float2 per warp of shared memory.
    unsafe { kernels(logits.device())?.launch(&name, per_row(rows, 8 * THREADS / 32), &args) }?;
    Ok(out)
}

/// The gradient of sum_rows scale[row] (lse[row] - z[row, target]) for the logits, written over
/// `logits` (padding columns get 0): scale[row] (softmax(z)[row] - onehot(target)), with lse the
/// whole vocabulary's log-sum-exp per row ([rows] fp32, from `combine`).
pub fn grad_in_place(
    logits: &Tensor,
    bias: &Tensor,
    targets: &Tensor,
    lse: &Tensor,
    scale: &Tensor,
    real: i64,
) -> Result<(), String> {
    let (rows, cols) = check(logits, bias, targets, real)?;
    for (name, t) in [("lse", lse), ("scale", scale)] {
        if t.size() != [rows] || t.kind() != Kind::Float || !t.is_contiguous() {
            return Err(format!(
                "cross-entropy: {name} {:?} {:?}, not [{rows}] fp32",
                t.size(),
                t.kind()
            ));
        }
    }
    if rows == 0 {
        return Ok(());
    }
    let name = format!("ce_grad_{}", suffix(logits.kind())?);
    let args = [
        Arg::tensor(logits),
        Arg::tensor(bias),
        Arg::tensor(targets),
        Arg::tensor(lse),
        Arg::tensor(scale),
        Arg::tensor(logits),
        Arg::I32(cols as i32),
        Arg::I32(real as i32),
    ];
    // SAFETY: checked above; the kernel reads each element before its own thread writes it.
    unsafe { kernels(logits.device())?.launch(&name, per_row(rows, 0), &args) }
}

/// Each row's log-sum-exp over the whole vocabulary and its target's logit, from every TP
/// rank's `stats` (a rank without the target column contributes 0 to it): ([rows], [rows]).
pub fn combine(stats: &Tensor, tp: &dyn Collective) -> (Tensor, Tensor) {
    let (m_local, s_local, t_local) = (stats.select(1, 0), stats.select(1, 1), stats.select(1, 2));
    let mut m = m_local.copy();
    tp.all_reduce_max(&mut m);
    // A rank with no real column has m = -inf and s = 0: exp(-inf - m) = 0, and 0 · 0 = 0.
    let mut s = s_local * (&m_local - &m).exp();
    tp.all_reduce_sum(&mut s);
    let mut t = t_local.contiguous();
    tp.all_reduce_sum(&mut t);
    (m + s.log(), t)
}

/// The kernels against libtorch's cross-entropy (`vocab_parallel_cross_entropy_padded` on one
/// rank, through autograd), on random logits `rows` x `cols` in `kind` on `device` (CPU: the
/// emulator), the last `cols - real` columns padding, a random bias and scale per row: (name,
/// largest error relative to the largest element, tolerance) for the rows' losses and the
/// logits' and bias's gradients. For the tests and `deberta-worker kernel-check`.
pub fn compare(
    device: Device,
    rows: i64,
    cols: i64,
    real: i64,
    kind: Kind,
) -> Result<Vec<(&'static str, f64, f64)>, String> {
    tch::manual_seed(rows * 1000 + cols);
    let cpu = (Kind::Float, Device::Cpu);
    let logits = (Tensor::randn([rows, cols], cpu) * 3.0).to_kind(kind).to_device(device);
    let bias = Tensor::randn([cols], cpu).to_device(device);
    let targets = Tensor::randint(real, [rows], (Kind::Int64, Device::Cpu)).to_device(device);
    let scale = Tensor::rand([rows], cpu).to_device(device);

    // libtorch: the loss rows, and the gradients of sum(scale * loss).
    let z = logits.to_kind(Kind::Float).set_requires_grad(true);
    let b = bias.copy().set_requires_grad(true);
    let want = crate::tensor_parallel::vocab_parallel_cross_entropy_padded(
        &(&z + &b),
        &targets,
        0,
        real,
        &crate::collective::Single,
    );
    (&want * &scale).sum(Kind::Float).backward();
    let (want_dz, want_db) = (z.grad(), b.grad());

    let st = stats(&logits, &bias, &targets, real)?;
    let (lse, target_logit) = combine(&st, &crate::collective::Single);
    let got = &lse - &target_logit;
    let dz = logits.copy();
    grad_in_place(&dz, &bias, &targets, &lse, &scale, real)?;
    let got_db = dz.to_kind(Kind::Float).sum_dim_intlist(0, false, Kind::Float);

    let rel = |got: &Tensor, want: &Tensor| {
        let want = want.to_kind(Kind::Double);
        let scale = want.abs().max().double_value(&[]).max(1e-12);
        (got.to_kind(Kind::Double) - want).abs().max().double_value(&[]) / scale
    };
    // bf16: the gradient is stored in bf16 (one rounding); the loss reads the same bf16 logits.
    let tol = if kind == Kind::BFloat16 { 8e-3 } else { 1e-5 };
    Ok(vec![
        ("loss", rel(&got, &want.detach()), 1e-5),
        ("dlogits", rel(&dz, &want_dz), tol),
        ("dbias", rel(&got_db, &want_db), tol),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_match_libtorch_in_the_emulator() {
        // One row; rows with padding columns; more columns than a block's 1,024 per step, and a
        // real count that is not a multiple of 4.
        for (rows, cols, real, kind) in [
            (1, 8, 8, Kind::Float),
            (5, 264, 250, Kind::Float),
            (7, 2056, 2049, Kind::Float),
            (6, 1032, 1000, Kind::BFloat16),
        ] {
            cuda::emulate_on_cpu(true);
            let errors = compare(Device::Cpu, rows, cols, real, kind);
            cuda::emulate_on_cpu(false);
            for (name, e, tol) in errors.unwrap() {
                assert!(e <= tol, "{rows} x {cols} ({real} real) {kind:?}: {name} off by {e:e}");
            }
        }
    }

    #[test]
    fn a_target_on_another_rank_gives_zero_and_two_shards_combine_to_the_whole() {
        // The vocabulary split in two column shards as two TP ranks hold it: each shard's
        // stats, combined, equal the whole row's.
        cuda::emulate_on_cpu(true);
        let cpu = (Kind::Float, Device::Cpu);
        tch::manual_seed(3);
        let (rows, cols) = (4, 16);
        let z = Tensor::randn([rows, cols], cpu) * 4.0;
        let bias = Tensor::randn([cols], cpu);
        let targets = Tensor::from_slice(&[0i64, 7, 8, 15]);
        let whole = stats(&z, &bias, &targets, cols).unwrap();
        let shard = |k: i64| {
            let zs = z.narrow(1, 8 * k, 8).contiguous();
            stats(&zs, &bias.narrow(0, 8 * k, 8).contiguous(), &(&targets - 8 * k), 8).unwrap()
        };
        let (a, b) = (shard(0), shard(1));
        cuda::emulate_on_cpu(false);
        // Rows 2 and 3 have their target in the second shard: 0 in the first.
        let t_a = Vec::<f32>::try_from(a.select(1, 2)).unwrap();
        assert_eq!(&t_a[2..], &[0.0, 0.0]);
        let m = a.select(1, 0).maximum(&b.select(1, 0));
        let s = a.select(1, 1) * (a.select(1, 0) - &m).exp() + b.select(1, 1) * (b.select(1, 0) - &m).exp();
        let t = a.select(1, 2) + b.select(1, 2);
        let (lse, tl) = combine(&whole, &crate::collective::Single);
        let close = |x: &Tensor, y: &Tensor| (x - y).abs().max().double_value(&[]) < 1e-5;
        assert!(close(&(m + s.log()), &lse) && close(&t, &tl), "{a} {b} {whole}");
        // And the whole row's against libtorch's log_softmax.
        let want = -(&z + &bias)
            .log_softmax(-1, Kind::Float)
            .gather(1, &targets.unsqueeze(1), false)
            .squeeze_dim(1);
        assert!(close(&(lse - tl), &want));
    }

    /// The source compiles with NVRTC for the H100, and the kernels keep 8 blocks of 256
    /// threads per SM (at most 32 registers) without spilling: they are memory-bound.
    #[test]
    fn the_kernels_compile_for_the_h100_without_spilling() {
        let ptx = cuda::compile(SOURCE, "cross_entropy.cu", "sm_90", &[]).unwrap();
        let report = cuda::ptxas_report(&ptx.to_src());
        for k in ["ce_stats_bf16", "ce_stats_f32", "ce_grad_bf16", "ce_grad_f32"] {
            let &(_, regs, spill) = report
                .iter()
                .find(|r| r.0 == k)
                .unwrap_or_else(|| panic!("{k} missing from ptxas's report: {report:?}"));
            println!("{k:<14} {regs:>3} registers, {spill} bytes spilled");
            assert!(regs <= 32 && spill == 0, "{k}: {regs} registers, {spill} bytes spilled");
        }
    }
}
