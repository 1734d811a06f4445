//! The FFN's GELU in backward as one CUDA kernel (`kernels/gelu.cu`, through `cuda`): from the
//! pre-activation h and the gradient df of act(h), act(h) recomputed (W2's weight gradient reads
//! it), h's gradient and its column sums (b1's gradient), reading h and df once where libtorch
//! takes three passes over [tokens, F] (gelu, gelu_backward, the sum over rows). At the 1.5B
//! model's batch 32 × 512 that is ~0.4 GB less traffic per layer.
//!
//! CPU tensors take libtorch's ops (`layer`), or the emulated kernel in tests
//! (`cuda::emulate_on_cpu`).

use cudarc::driver::LaunchConfig;
use tch::{Device, Kind, Tensor};

use crate::config::Activation;
use crate::cuda::{self, Arg, Kernels};

/// The kernel's CUDA C source (after the shared bf16 helpers).
pub const SOURCE: &str = concat!(include_str!("kernels/bf16.cuh"), include_str!("kernels/gelu.cu"));

/// Rows per block (more when a grid's 65,535 rows of blocks would not cover them) and threads
/// per block (4 columns each).
const ROWS: i64 = 64;
const THREADS: i64 = 256;
const MAX_GRID_Y: i64 = 65_535;

/// What `backward` returns.
pub struct GeluGrads {
    /// act(h) = gelu(h), in h's kind.
    pub f: Tensor,
    /// dL/dh, in h's kind.
    pub dh: Tensor,
    /// The column sums of dh as stored [cols] (fp32): the FFN bias b1's gradient.
    pub bias: Tensor,
}

/// Whether `backward` runs for `act` on an h of `cols` columns in `kind` on `device`: the exact
/// GELU, on CUDA (or in the emulator), bf16 or fp32, a multiple of 4 columns.
pub fn applies(act: Activation, device: Device, kind: Kind, cols: i64) -> bool {
    act == Activation::Gelu
        && cuda::kernels_run_on(device)
        && matches!(kind, Kind::BFloat16 | Kind::Float)
        && cols % 4 == 0
}

/// (rows per block, blocks) covering `rows`: `ROWS` each, more where the grid's limit needs.
fn row_blocks(rows: i64) -> (i64, i64) {
    let per_block = ROWS.max((rows + MAX_GRID_Y - 1) / MAX_GRID_Y);
    (per_block, ((rows + per_block - 1) / per_block).max(1))
}

fn kernels(device: Device) -> Result<Kernels, String> {
    if !device.is_cuda() {
        return Ok(Kernels::Emulated { variant: 0 });
    }
    let functions = [("gelu_bwd_bf16", 0), ("gelu_bwd_f32", 0)];
    cuda::load(device, SOURCE, "gelu.cu", &[], &functions).map(Kernels::Gpu)
}

/// act(h), dL/dh and b1's gradient from h and df = dL/d act(h) ([.., cols], the same kind).
pub fn backward(h: &Tensor, df: &Tensor) -> Result<GeluGrads, String> {
    let cols = *h.size().last().ok_or("gelu: h has no dimensions")?;
    if df.size() != h.size() || df.kind() != h.kind() || cols % 4 != 0 {
        return Err(format!(
            "gelu: h {:?} {:?} and df {:?} {:?} (the same shape and kind, a multiple of 4 columns)",
            h.size(),
            h.kind(),
            df.size(),
            df.kind()
        ));
    }
    let name = match h.kind() {
        Kind::BFloat16 => "gelu_bwd_bf16",
        Kind::Float => "gelu_bwd_f32",
        k => return Err(format!("gelu: h must be bf16 or fp32, not {k:?}")),
    };
    let device = h.device();
    let (h, df) = (h.contiguous(), df.contiguous());
    let rows = h.numel() as i64 / cols.max(1);
    let (per_block, blocks) = row_blocks(rows);
    let f = h.empty_like();
    let dh = h.empty_like();
    let part = Tensor::empty([blocks, cols], (Kind::Float, device));
    let cfg = LaunchConfig {
        grid_dim: (((cols / 4 + THREADS - 1) / THREADS) as u32, blocks as u32, 1),
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let args = [
        Arg::tensor(&h),
        Arg::tensor(&df),
        Arg::tensor(&f),
        Arg::tensor(&dh),
        Arg::tensor(&part),
        Arg::I64(rows),
        Arg::I32(cols as i32),
        Arg::I32(per_block as i32),
    ];
    // SAFETY: h, df, f, dh are contiguous rows x cols of one kind on `device`, part blocks x cols
    // fp32, blocks x per_block >= rows.
    unsafe { kernels(device)?.launch(name, cfg, &args) }?;
    Ok(GeluGrads {
        f,
        dh,
        bias: part.sum_dim_intlist(0, false, Kind::Float),
    })
}

/// The kernel against libtorch's `gelu`, `gelu_backward` and the column sum of dh, on random
/// inputs of `rows` x `cols` in `kind` on `device` (CPU: the emulator): (name, largest error
/// relative to the largest element, tolerance). f and dh may differ from libtorch's by one
/// rounding in bf16 (libtorch's erf and exp are not the device's); the bias is checked against
/// the sum of the kernel's own dh. For the tests and `deberta-worker kernel-check`.
pub fn compare(device: Device, rows: i64, cols: i64, kind: Kind) -> Result<Vec<(&'static str, f64, f64)>, String> {
    tch::manual_seed(rows * 1000 + cols);
    let cpu = (Kind::Float, Device::Cpu);
    let h = (Tensor::randn([rows, cols], cpu) * 2.0).to_kind(kind).to_device(device);
    let df = Tensor::randn([rows, cols], cpu).to_kind(kind).to_device(device);
    let g = backward(&h, &df)?;
    let (h32, df32) = (h.to_kind(Kind::Float), df.to_kind(Kind::Float));
    let want_f = h32.gelu("none");
    let want_dh = h32.gelu_backward(&df32, "none");
    let want_bias = g.dh.to_kind(Kind::Double).sum_dim_intlist(0, false, Kind::Double);
    let rel = |got: &Tensor, want: &Tensor| {
        let want = want.to_kind(Kind::Double);
        let scale = want.abs().max().double_value(&[]).max(1e-12);
        (got.to_kind(Kind::Double) - want).abs().max().double_value(&[]) / scale
    };
    let tol = if kind == Kind::BFloat16 { 8e-3 } else { 1e-5 };
    for (name, t) in [("f", &g.f), ("dh", &g.dh)] {
        if t.kind() != kind || t.size() != h.size() {
            return Err(format!("gelu: {name} is {:?} {:?}, not h's", t.kind(), t.size()));
        }
    }
    Ok(vec![
        ("f", rel(&g.f, &want_f), tol),
        ("dh", rel(&g.dh, &want_dh), tol),
        ("dbias", rel(&g.bias, &want_bias), 1e-5),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_matches_libtorch_in_the_emulator() {
        // Rows past one block and a partial last block; columns past one block's 1024 and not a
        // multiple of it.
        for (rows, cols, kind) in [
            (3, 8, Kind::Float),
            (70, 1032, Kind::Float),
            (130, 1032, Kind::BFloat16),
        ] {
            cuda::emulate_on_cpu(true);
            let errors = compare(Device::Cpu, rows, cols, kind);
            cuda::emulate_on_cpu(false);
            for (name, e, tol) in errors.unwrap() {
                assert!(e <= tol, "{rows} x {cols} {kind:?}: {name} off by {e:e}");
            }
        }
    }

    #[test]
    fn the_row_blocks_cover_every_row_within_the_grid_limit() {
        for rows in [1, 64, 65, 16_384, MAX_GRID_Y * ROWS, MAX_GRID_Y * ROWS + 1, 10_000_000] {
            let (per, blocks) = row_blocks(rows);
            assert!(per >= ROWS && blocks <= MAX_GRID_Y, "{rows}: {per} x {blocks}");
            assert!(
                per * blocks >= rows && per * (blocks - 1) < rows,
                "{rows}: {per} x {blocks}"
            );
        }
    }

    /// A memory-bound kernel hides its latency with threads: at least 6 blocks of 256 per SM (75%
    /// of what an SM holds; 40 registers), and no spills. Bounded to 8 blocks (32 registers) it
    /// spilled 20 bytes.
    #[test]
    fn the_kernel_keeps_six_blocks_per_sm_without_spilling() {
        let ptx = cuda::compile(SOURCE, "gelu.cu", "sm_90", &[]).unwrap();
        let report = cuda::ptxas_report(&ptx.to_src());
        for k in ["gelu_bwd_bf16", "gelu_bwd_f32"] {
            let &(_, regs, spill) = report
                .iter()
                .find(|r| r.0 == k)
                .unwrap_or_else(|| panic!("{k} missing from ptxas's report: {report:?}"));
            println!("{k:<13} {regs:>3} registers, {spill} bytes spilled");
            assert!(regs <= 40 && spill == 0, "{k}: {regs} registers, {spill} bytes spilled");
        }
    }

    #[test]
    fn other_activations_and_shapes_take_libtorch() {
        let cpu = Device::Cpu;
        cuda::emulate_on_cpu(true);
        let (gelu, tanh, odd, int) = (
            applies(Activation::Gelu, cpu, Kind::Float, 8),
            applies(Activation::GeluTanh, cpu, Kind::Float, 8),
            applies(Activation::Gelu, cpu, Kind::Float, 6),
            applies(Activation::Gelu, cpu, Kind::Int64, 8),
        );
        cuda::emulate_on_cpu(false);
        assert!(gelu && !tanh && !odd && !int);
        assert!(
            !applies(Activation::Gelu, cpu, Kind::Float, 8),
            "the CPU without the emulator"
        );
        let h = Tensor::zeros([2, 6], (Kind::Float, cpu));
        assert!(backward(&h, &h).is_err(), "6 columns");
    }
}
