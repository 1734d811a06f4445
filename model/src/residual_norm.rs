//! Dropout + residual + LayerNorm after a row-parallel dense layer, forward and backward as one
//! CUDA kernel each (`kernels/residual_norm.cu`, through `cuda`):
//!   y = LayerNorm(dropout(z + bias) + residual)
//! for the hand-written output segments of the bf16 training path
//! (`layer::DenseResidualNorm::from_partial_saving`). libtorch runs this as five passes over
//! fp32 [tokens, D] tensors in forward (bias, dropout writing a byte mask, residual, LayerNorm)
//! and about eight in backward (x̂ from y, LayerNorm's backward and its 1/σ, dropout's, the
//! bias's column sum, the cast of dz); the kernels make one each way. The dropout mask is a hash
//! of (seed, row, column) that backward recomputes: no mask is stored.
//!
//! CPU tensors take libtorch's ops (`layer`), or the emulated kernels in tests
//! (`cuda::emulate_on_cpu`). `DEBERTA_FUSED_NORM=0` turns the kernels off on CUDA too (for A/B
//! timing, `cluster/gpu-bench.sh`).

use cudarc::driver::LaunchConfig;
use tch::{Device, Kind, Tensor};

use crate::cuda::{self, Arg, Kernels};

/// The kernels' CUDA C source (after the shared bf16 helpers).
pub const SOURCE: &str = concat!(
    include_str!("kernels/bf16.cuh"),
    include_str!("kernels/residual_norm.cu")
);

/// The largest hidden size: one float4 of a row per thread, at most 1024 threads per block.
pub const MAX_HIDDEN: i64 = 4096;

/// The parameters of one dense layer's bias, dropout and LayerNorm.
pub struct NormParams<'a> {
    /// The dense layer's bias [D] (fp32).
    pub bias: &'a Tensor,
    /// The LayerNorm's γ and β [D] (fp32).
    pub gamma: &'a Tensor,
    pub beta: &'a Tensor,
    pub eps: f64,
    /// The dropout probability (0: none, e.g. in evaluation).
    pub dropout: f64,
}

/// The gradients `backward` returns.
pub struct NormGrads {
    /// dL/dz, in z's kind (bf16 on the training path: the next GEMM's operand).
    pub dz: Tensor,
    /// dL/dresidual (fp32), also dL/d(dropout output).
    pub dres: Tensor,
    /// The bias's, γ's and β's gradients [D] (fp32), summed over every row.
    pub bias: Tensor,
    pub gamma: Tensor,
    pub beta: Tensor,
}

/// Whether y = LayerNorm(dropout(z + bias) + residual) for hidden size `d` on `device` runs the
/// kernels: on CUDA (or in the emulator, `cuda::emulate_on_cpu`), for d a multiple of 4 up to
/// `MAX_HIDDEN` (every DeBERTa size), unless `DEBERTA_FUSED_NORM=0`. Another value of that
/// variable is an error.
pub fn applies(device: Device, d: i64) -> Result<bool, String> {
    static FROM_ENV: std::sync::OnceLock<Result<bool, String>> = std::sync::OnceLock::new();
    let on = cuda::env_choice(
        OVERRIDE.with(|o| o.get()),
        &FROM_ENV,
        "DEBERTA_FUSED_NORM",
        |value| match value {
            None | Some("1") => Ok(true),
            Some("0") => Ok(false),
            Some(other) => Err(format!("DEBERTA_FUSED_NORM={other}: expected 0 or 1")),
        },
    )?;
    Ok(on && cuda::kernels_run_on(device) && d % 4 == 0 && d <= MAX_HIDDEN)
}

thread_local! {
    /// A per-thread choice that overrides the environment (kernel-check times both).
    static OVERRIDE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Use the kernels (true) or libtorch's ops (false) on this thread from now on (None: the
/// environment again).
pub fn use_kernels_on_this_thread(on: Option<bool>) {
    OVERRIDE.with(|o| o.set(on));
}

fn kernels(device: Device) -> Result<Kernels, String> {
    if !device.is_cuda() {
        return Ok(Kernels::Emulated { variant: 0 });
    }
    // Backward's shared memory at D = MAX_HIDDEN passes the 48 KB a launch gets by default.
    let bwd = launch_config(device, 1, MAX_HIDDEN, true).shared_mem_bytes;
    let functions = [
        ("rln_fwd_bf16", 0),
        ("rln_fwd_f32", 0),
        ("rln_bwd_bf16", bwd),
        ("rln_bwd_f32", bwd),
        ("rln_dropout_mask", 0),
    ];
    cuda::load(device, SOURCE, "residual_norm.cu", &[], &functions).map(Kernels::Gpu)
}

/// One block per row (grid-stride over at most `max_blocks` blocks), one float4 of columns per
/// thread; shared memory for the block reductions (two float2 slots per warp) and, in
/// `backward`, three float4 column sums per thread.
fn launch_config(device: Device, rows: i64, d: i64, backward: bool) -> LaunchConfig {
    // On the GPU enough blocks to fill an H100 (132 SMs x 5 blocks of 384 threads at D = 1536);
    // in the emulator few, so that a test's blocks take several rows each.
    let max_blocks = if device.is_cuda() { 1024 } else { 3 };
    let threads = ((d / 4 + 31) / 32 * 32) as u32;
    LaunchConfig {
        grid_dim: (rows.clamp(1, max_blocks) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 2 * 32 * 8 + if backward { 48 * threads } else { 0 },
    }
}

fn suffix(kind: Kind) -> Result<&'static str, String> {
    match kind {
        Kind::BFloat16 => Ok("bf16"),
        Kind::Float => Ok("f32"),
        k => Err(format!("residual_norm: z must be bf16 or fp32, not {k:?}")),
    }
}

fn check_shapes(d: i64, p: &NormParams, fp32: &[(&str, &Tensor)]) -> Result<(), String> {
    if d % 4 != 0 || d > MAX_HIDDEN {
        return Err(format!(
            "residual_norm: hidden size {d} (the kernels take multiples of 4 up to {MAX_HIDDEN})"
        ));
    }
    for (name, t) in [
        ("bias", p.bias),
        ("LayerNorm weight", p.gamma),
        ("LayerNorm bias", p.beta),
    ] {
        if t.size() != [d] || t.kind() != Kind::Float {
            return Err(format!(
                "residual_norm: {name} is {:?} {:?}, expected [{d}] fp32",
                t.size(),
                t.kind()
            ));
        }
    }
    for (name, t) in fp32 {
        if t.kind() != Kind::Float || t.size().last() != Some(&d) {
            return Err(format!(
                "residual_norm: {name} is {:?} {:?}, expected [.., {d}] fp32",
                t.size(),
                t.kind()
            ));
        }
    }
    Ok(())
}

/// y = LayerNorm(dropout(z + bias) + residual) over the last dimension D, dropout drawn from
/// `seed` (`p.dropout` 0: none). z: [.., D] bf16 or fp32; residual: the same shape, fp32.
/// Returns y (fp32, z's shape) and 1/σ per row ([rows] fp32) for `backward`; with `bf16_copy`
/// also y in bf16, written by the same pass (the next sublayer's GEMM operand).
pub fn forward(
    z: &Tensor,
    residual: &Tensor,
    p: &NormParams,
    seed: u64,
    bf16_copy: bool,
) -> Result<(Tensor, Option<Tensor>, Tensor), String> {
    let d = *z.size().last().ok_or("residual_norm: z has no dimensions")?;
    check_shapes(d, p, &[("residual", residual)])?;
    if residual.size() != z.size() {
        return Err(format!(
            "residual_norm: residual {:?} against z {:?}",
            residual.size(),
            z.size()
        ));
    }
    let device = z.device();
    let [z, residual, gamma, beta, bias] = [z, residual, p.gamma, p.beta, p.bias].map(cuda::aligned);
    let rows = z.numel() as i64 / d;
    let y = Tensor::empty(z.size(), (Kind::Float, device));
    let rstd = Tensor::empty([rows], (Kind::Float, device));
    let y16 = bf16_copy.then(|| Tensor::empty(z.size(), (Kind::BFloat16, device)));
    let tensors = [
        Arg::tensor(&z),
        Arg::tensor(&bias),
        Arg::tensor(&residual),
        Arg::tensor(&gamma),
        Arg::tensor(&beta),
        Arg::tensor(&y),
        y16.as_ref().map_or(Arg::Ptr(0), Arg::tensor),
        Arg::tensor(&rstd),
    ];
    let scalars = [
        Arg::I64(rows),
        Arg::I32(d as i32),
        Arg::F32(p.eps as f32),
        Arg::F32(p.dropout as f32),
        Arg::U64(seed),
    ];
    let args = [&tensors[..], &scalars].concat();
    let name = format!("rln_fwd_{}", suffix(z.kind())?);
    // SAFETY: every buffer is contiguous with the shapes and kinds the kernel reads and writes
    // (rows x d, [d], [rows]), on `device`.
    unsafe { kernels(device)?.launch(&name, launch_config(device, rows, d, false), &args) }?;
    Ok((y, y16, rstd))
}

/// Backward of `forward` for dL/dy = dy + dy2 (dy2 optional; the kernel adds a bf16 one where
/// it reads dy, other kinds are added first), from its output y, its `rstd` and the same `p`
/// and `seed`; dz in `z_kind` (bf16 or fp32).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dy: &Tensor,
    dy2: Option<&Tensor>,
    y: &Tensor,
    rstd: &Tensor,
    p: &NormParams,
    seed: u64,
    z_kind: Kind,
) -> Result<NormGrads, String> {
    let d = *y.size().last().ok_or("residual_norm: y has no dimensions")?;
    let (dy, dy2) = match dy2 {
        Some(e) if e.kind() == Kind::BFloat16 => (dy.to_kind(Kind::Float), Some(cuda::aligned(e))),
        Some(e) => (dy.to_kind(Kind::Float) + e.to_kind(Kind::Float), None),
        None => (dy.to_kind(Kind::Float), None),
    };
    let dy = cuda::aligned(&dy);
    check_shapes(d, p, &[("y", y), ("dy", &dy)])?;
    if let Some(e) = &dy2 {
        if e.size() != dy.size() {
            return Err(format!("residual_norm: dy2 {:?}, dy {:?}", e.size(), dy.size()));
        }
    }
    let device = y.device();
    let rows = y.numel() as i64 / d;
    if rstd.size() != [rows] || dy.size() != y.size() {
        return Err(format!(
            "residual_norm: dy {:?}, y {:?}, rstd {:?}",
            dy.size(),
            y.size(),
            rstd.size()
        ));
    }
    let [y, gamma, beta] = [y, p.gamma, p.beta].map(cuda::aligned);
    let cfg = launch_config(device, rows, d, true);
    let dres = Tensor::empty(y.size(), (Kind::Float, device));
    let dz = Tensor::empty(y.size(), (z_kind, device));
    // Per block: the column sums of dz, dy x̂ and dy over its rows.
    let part = Tensor::empty([cfg.grid_dim.0 as i64, 3, d], (Kind::Float, device));
    let dy2 = dy2.as_ref().map_or(Arg::Ptr(0), Arg::tensor);
    let tensors = [
        Arg::tensor(&dy),
        dy2,
        Arg::tensor(&y),
        Arg::tensor(rstd),
        Arg::tensor(&gamma),
        Arg::tensor(&beta),
        Arg::tensor(&dres),
        Arg::tensor(&dz),
        Arg::tensor(&part),
    ];
    let scalars = [
        Arg::I64(rows),
        Arg::I32(d as i32),
        Arg::F32(p.dropout as f32),
        Arg::U64(seed),
    ];
    let args = [&tensors[..], &scalars].concat();
    let name = format!("rln_bwd_{}", suffix(z_kind)?);
    // SAFETY: as in `forward`; part holds grid x 3 x d floats.
    unsafe { kernels(device)?.launch(&name, cfg, &args) }?;
    let sums = part.sum_dim_intlist(0, false, Kind::Float); // [3, D]
    Ok(NormGrads {
        dz,
        dres,
        bias: sums.get(0),
        gamma: sums.get(1),
        beta: sums.get(2),
    })
}

/// The dropout mask the kernels apply for `seed` to `rows` x `d` (1 = kept, u8): for tests.
pub fn dropout_mask(device: Device, rows: i64, d: i64, p: f64, seed: u64) -> Result<Tensor, String> {
    let keep = Tensor::empty([rows, d], (Kind::Uint8, device));
    let args = [
        Arg::tensor(&keep),
        Arg::I64(rows),
        Arg::I32(d as i32),
        Arg::F32(p as f32),
        Arg::U64(seed),
    ];
    // SAFETY: keep holds rows x d bytes.
    unsafe { kernels(device)?.launch("rln_dropout_mask", launch_config(device, rows, d, false), &args) }?;
    Ok(keep)
}

/// Random inputs of `rows` x `d` on `device`: z in `kind`, the rest fp32; γ away from 0.
struct Inputs {
    z: Tensor,
    res: Tensor,
    bias: Tensor,
    gamma: Tensor,
    beta: Tensor,
    /// dL/dy for backward.
    dy: Tensor,
}

impl Inputs {
    fn random(rows: i64, d: i64, kind: Kind, device: Device) -> Inputs {
        let f = (Kind::Float, Device::Cpu);
        let on = |t: Tensor| t.to_device(device);
        Inputs {
            z: on(Tensor::randn([rows, d], f).to_kind(kind)),
            res: on(Tensor::randn([rows, d], f) * 2.0 + 0.5),
            bias: on(Tensor::randn([d], f) * 0.3),
            gamma: on(Tensor::rand([d], f) + 0.5),
            beta: on(Tensor::randn([d], f) * 0.2),
            dy: on(Tensor::randn([rows, d], f)),
        }
    }

    fn params(&self, dropout: f64) -> NormParams<'_> {
        NormParams {
            bias: &self.bias,
            gamma: &self.gamma,
            beta: &self.beta,
            eps: 1e-7,
            dropout,
        }
    }
}

/// The kernels against libtorch's ops and autograd in fp32, with the kernels' own dropout mask,
/// on random inputs on `device` (CPU: the emulator, `cuda::emulate_on_cpu`): for y, 1/σ and each
/// gradient (dL/dy given in two parts, and y's bf16 copy checked to be y rounded), (name,
/// largest error relative to the largest element, tolerance). dz's tolerance is one bf16
/// rounding when z is bf16. For the tests and `deberta-worker kernel-check`.
pub fn compare(
    device: Device,
    rows: i64,
    d: i64,
    p: f64,
    z_kind: Kind,
) -> Result<Vec<(&'static str, f64, f64)>, String> {
    tch::manual_seed(rows * 1000 + d);
    let x = Inputs::random(rows, d, z_kind, device);
    let Inputs {
        z,
        res,
        bias,
        gamma,
        beta,
        dy,
    } = &x;
    let seed = 0x1234_5678_9abc_def0;
    let params = x.params(p);
    let (y, y16, rstd) = forward(z, res, &params, seed, true)?;
    if y16.as_ref().is_none_or(|c| !c.equal(&y.to_kind(Kind::BFloat16))) {
        return Err("residual_norm: the bf16 copy of y is not y rounded to bf16".into());
    }
    // dL/dy in two parts, as the tape hands them: the residual's (fp32) and the next sublayer's
    // input gradient (bf16), which the kernel adds as it reads dy.
    let dy2 = Tensor::randn(dy.size(), (Kind::Float, Device::Cpu))
        .to_kind(Kind::BFloat16)
        .to_device(device);
    let g = backward(dy, Some(&dy2), &y, &rstd, &params, seed, z_kind)?;
    let keep = dropout_mask(device, rows, d, p, seed)?;

    let leaf = |t: &Tensor| t.to_kind(Kind::Float).detach().set_requires_grad(true);
    let [zr, rr, br, gr, ber] = [z, res, bias, gamma, beta].map(leaf);
    let (want_y, want_rstd) = tch::with_grad(|| {
        let o = (&zr + &br) * keep.to_kind(Kind::Float) / (1.0 - p);
        let x = o + &rr;
        let y = x.layer_norm([d], Some(&gr), Some(&ber), params.eps, false);
        (&y * (dy + dy2.to_kind(Kind::Float))).sum(Kind::Float).backward();
        (y, (x.var_dim(-1, false, false) + params.eps).rsqrt())
    });
    let rel = |got: &Tensor, want: &Tensor| {
        let scale = want.abs().max().double_value(&[]).max(1e-12);
        (got.to_kind(Kind::Float) - want).abs().max().double_value(&[]) / scale
    };
    // The GPU's column sums run in another order than libtorch's.
    let tol = if device.is_cuda() { 1e-4 } else { 1e-5 };
    let dz_tol = if z_kind == Kind::BFloat16 { 4e-3 } else { tol };
    if g.dz.kind() != z_kind {
        return Err(format!("residual_norm: dz is {:?}, not z's {z_kind:?}", g.dz.kind()));
    }
    Ok([
        ("y", &y, &want_y, tol),
        ("1/sigma", &rstd, &want_rstd, tol),
        ("dz", &g.dz, &zr.grad(), dz_tol),
        ("dresidual", &g.dres, &rr.grad(), tol),
        ("dbias", &g.bias, &br.grad(), tol),
        ("dgamma", &g.gamma, &gr.grad(), tol),
        ("dbeta", &g.beta, &ber.grad(), tol),
    ]
    .into_iter()
    .map(|(name, got, want, tol)| (name, rel(got, &want.detach()), tol))
    .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(rows: i64, d: i64, p: f64, kind: Kind) {
        cuda::emulate_on_cpu(true);
        let errors = compare(Device::Cpu, rows, d, p, kind);
        cuda::emulate_on_cpu(false);
        for (name, e, tol) in errors.unwrap() {
            assert!(
                e <= tol,
                "{rows} x {d}, dropout {p}, z {kind:?}: {name} off by {e:e} (relative to its largest element)"
            );
        }
    }

    #[test]
    fn the_kernels_equal_libtorch_s_ops_and_autograd() {
        // 7 rows over 3 blocks (grid-stride: 3, 2, 2 rows each); d = 96 leaves 8 of 32 threads
        // without columns, d = 200 spans two warps, d = 1536 is the 1.5B model's (12 warps),
        // d = 4096 the largest (1024 threads: the reductions' 32 slots all used).
        check(7, 96, 0.2, Kind::Float);
        check(7, 200, 0.0, Kind::Float);
        check(5, 1536, 0.1, Kind::Float);
        check(4, MAX_HIDDEN, 0.1, Kind::Float);
        check(7, 200, 0.1, Kind::BFloat16);
    }

    #[test]
    fn the_kernels_give_the_same_bits_whatever_the_order_of_their_threads() {
        // The block reductions alternate two buffers with one barrier each: a wrong alternation
        // lets a fast warp overwrite a sum that another still reads, which the reversed order shows.
        let (rows, d, p) = (6, 200, 0.1);
        tch::manual_seed(3);
        let x = Inputs::random(rows, d, Kind::Float, Device::Cpu);
        let params = x.params(p);
        let run = |reverse: bool| {
            cuda::emulate_on_cpu(true);
            cuda::emulate_in_reverse(reverse);
            let (y, _, rstd) = forward(&x.z, &x.res, &params, 9, false).unwrap();
            let g = backward(&x.dy, None, &y, &rstd, &params, 9, Kind::Float).unwrap();
            cuda::emulate_in_reverse(false);
            cuda::emulate_on_cpu(false);
            [y, rstd, g.dz, g.dres, g.bias, g.gamma, g.beta]
        };
        for (a, b) in run(false).iter().zip(&run(true)) {
            assert!(a.equal(b), "the reversed schedule changed a result");
        }
    }

    /// Inputs that are views starting off a 16-byte boundary (a parameter packed after a
    /// 3-element one, as the flat buffers once packed them: on the H100 the forward faulted
    /// with a misaligned address in CB fine-tuning) give the results of aligned copies; the
    /// emulator faults on such an access as the GPU does.
    #[test]
    fn inputs_that_start_off_a_16_byte_boundary_give_the_aligned_results() {
        let (rows, d, p) = (5, 64, 0.1);
        tch::manual_seed(4);
        let x = Inputs::random(rows, d, Kind::BFloat16, Device::Cpu);
        // The same values one element into a larger buffer: contiguous, 4 (fp32) or 2 (bf16)
        // bytes off the alignment.
        let shifted = |t: &Tensor| {
            let buf = Tensor::zeros([t.numel() as i64 + 1], (t.kind(), Device::Cpu));
            let view = buf.narrow(0, 1, t.numel() as i64).view(t.size().as_slice());
            view.shallow_clone().copy_(t);
            assert!(view.is_contiguous() && !(view.data_ptr() as usize).is_multiple_of(8));
            view
        };
        let off = Inputs {
            z: shifted(&x.z),
            res: shifted(&x.res),
            bias: shifted(&x.bias),
            gamma: shifted(&x.gamma),
            beta: shifted(&x.beta),
            dy: shifted(&x.dy),
        };
        let run = |x: &Inputs| {
            cuda::emulate_on_cpu(true);
            let params = x.params(p);
            let out = forward(&x.z, &x.res, &params, 5, false).and_then(|(y, _, rstd)| {
                let y_off = shifted(&y);
                // The bf16 second part of dy, off its 8-byte boundary in both runs.
                let dy2 = shifted(&x.dy.to_kind(Kind::BFloat16));
                backward(&x.dy, Some(&dy2), &y_off, &rstd, &params, 5, Kind::BFloat16)
                    .map(|g| [y, g.dz, g.dres, g.gamma])
            });
            cuda::emulate_on_cpu(false);
            out
        };
        let (want, got) = (run(&x).unwrap(), run(&off).unwrap());
        for (a, b) in want.iter().zip(&got) {
            assert!(a.equal(b), "a misaligned input changed a result");
        }
        // The emulator itself: a misaligned fp32 row faults, named as the GPU names it.
        let y = Tensor::zeros([rows, d], (Kind::Float, Device::Cpu));
        let args = [
            Arg::tensor(&off.z),
            Arg::tensor(&off.bias),
            Arg::tensor(&off.res),
            Arg::tensor(&off.gamma),
            Arg::tensor(&off.beta),
            Arg::tensor(&y),
            Arg::Ptr(0), // no bf16 copy
            Arg::tensor(&Tensor::zeros([rows], (Kind::Float, Device::Cpu))),
            Arg::I64(rows),
            Arg::I32(d as i32),
            Arg::F32(1e-7),
            Arg::F32(0.0),
            Arg::U64(0),
        ];
        // SAFETY: the buffers have the kernel's shapes (rows x d, [d], [rows]).
        let err = unsafe {
            kernels(Device::Cpu)
                .unwrap()
                .launch("rln_fwd_bf16", launch_config(Device::Cpu, rows, d, false), &args)
        };
        assert!(err.is_err_and(|e| e.contains("misaligned address")));
    }

    #[test]
    fn the_dropout_hash_keeps_the_right_fraction_independently_per_element_row_and_seed() {
        let (rows, d, p) = (256, 512, 0.1);
        let mask = |seed| {
            dropout_mask(Device::Cpu, rows, d, p, seed)
                .unwrap()
                .to_kind(Kind::Float)
        };
        let (a, b) = (mask(1), mask(2));
        let kept = a.mean(Kind::Float).double_value(&[]);
        // Each bound is ~5 standard errors of its 131,072 draws (fewer for the shifted pairs).
        assert!((kept - 0.9).abs() < 0.004, "kept {kept}");
        // Two independent masks of keep rate 0.9 agree on 0.82 of the elements.
        let agree = |x: &Tensor, y: &Tensor| x.eq_tensor(y).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
        let r = agree(&a, &b);
        assert!((r - 0.82).abs() < 0.01, "two seeds: agree on {r}");
        // Every column 1 to 8 apart (the hash's pairs and their neighbours) and rows 1, 2 apart.
        for (dim, shifts) in [(1i64, 1..=8), (0, 1..=2)] {
            for s in shifts {
                let n = a.size()[dim as usize] - s;
                let r = agree(&a.narrow(dim, 0, n), &a.narrow(dim, s, n));
                assert!(
                    (r - 0.82).abs() < 0.01,
                    "elements {s} apart in dimension {dim}: agree on {r}"
                );
            }
        }
    }

    /// Registers decide how many rows an SM holds in flight, which a memory-bound kernel's speed
    /// hangs on: at the 1.5B model's D = 1536 (384 threads per block) 5 blocks per SM, as many
    /// as its 2,048 threads allow (of 65,536 registers, 32 per thread), and no spills. IEEE
    /// division (x̂ = (y − β) / γ) took 57 registers (2 blocks) in backward; `__fdividef`, 32.
    #[test]
    fn the_kernels_keep_five_rows_per_sm_at_d_1536_without_spilling() {
        let ptx = cuda::compile(SOURCE, "residual_norm.cu", "sm_90", &[]).unwrap();
        for k in [
            "rln_fwd_bf16",
            "rln_fwd_f32",
            "rln_bwd_bf16",
            "rln_bwd_f32",
            "rln_dropout_mask",
        ] {
            assert!(ptx.to_src().contains(k), "{k} missing from the PTX");
        }
        let report = cuda::ptxas_report(&ptx.to_src());
        let threads = launch_config(Device::Cuda(0), 1, 1536, true).block_dim.0;
        for k in ["rln_fwd_bf16", "rln_fwd_f32", "rln_bwd_bf16", "rln_bwd_f32"] {
            let &(_, regs, spill) = report
                .iter()
                .find(|r| r.0 == k)
                .unwrap_or_else(|| panic!("{k} missing from ptxas's report: {report:?}"));
            let blocks = 65536 / (regs.div_ceil(8) * 8 * threads); // allocated per warp, 8 per thread at a time
            println!("{k:<13} {regs:>3} registers, {spill} bytes spilled: {blocks} blocks of {threads} per SM");
            assert!(
                blocks >= 5 && spill == 0,
                "{k}: {regs} registers, {spill} bytes spilled"
            );
        }
    }
}
