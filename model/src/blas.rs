//! Weight gradients accumulated in fp32 by the GEMM itself (Megatron's "gradient accumulation
//! fusion"): `.grad += alpha a b` with bf16 operands and the fp32 gradient as cuBLAS's C, beta 1.
//!
//! Why: libtorch's GEMM writes the bf16 product, then a second kernel reads it and the fp32
//! gradient and writes the sum back, 12 bytes per weight where the GEMM's own epilogue takes 8
//! and no launch (6.6 ms of the traced batch-32 step for the adds alone). libtorch's `addmm`
//! with an fp32 output cannot do it: it takes the added matrix in the operands' kind only.
//!
//! On CUDA with bf16 (or fp16) operands and an fp32 gradient, cuBLAS is loaded at run time
//! (cudarc, the `libcublas.so.13` that libtorch itself uses) and runs on libtorch's default stream;
//! anywhere else, and with `DEBERTA_WGRAD_FUSION=0`, the product and the addition are libtorch's,
//! as before. The CPU checks the only part that can go wrong without a GPU, the mapping of
//! row-major strided views onto cuBLAS's column-major arguments (`layout`, against a reference
//! GEMM written from the BLAS definition); `kernel-check` checks the call on the GPU.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use tch::{Device, Kind, Tensor};

/// cuBLAS's arguments for C (column-major m × n, leading dimension ldc) = op(A) op(B) (+ beta C),
/// op(A) m × k and op(B) k × n, `trans_*` true for a transposed operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gemm {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: i64,
    pub n: i64,
    pub k: i64,
    pub lda: i64,
    pub ldb: i64,
    pub ldc: i64,
}

/// An operand `x` [r, c] (sizes, strides) as cuBLAS's column-major operand whose op gives xᵀ
/// ([c, r]): (transposed?, leading dimension). Row-major x read column-major is xᵀ as it is;
/// column-major x is x, to be transposed. The stride of a size-1 dimension addresses nothing,
/// so it is free. None for a layout cuBLAS cannot read (no unit stride, overlapping, zero or
/// negative strides).
fn transposed_operand(sizes: [i64; 2], strides: [i64; 2]) -> Option<(bool, i64)> {
    let [r, c] = sizes;
    let [s0, s1] = strides;
    if s1 == 1 || c == 1 {
        let ld = if r == 1 { c } else { s0 };
        if ld >= c.max(1) {
            return Some((false, ld));
        }
    }
    if s0 == 1 || r == 1 {
        let ld = if c == 1 { r } else { s1 };
        if ld >= r.max(1) {
            return Some((true, ld));
        }
    }
    None
}

/// The cuBLAS call for the row-major C [m, n] (row stride ldc, unit column stride) += a b, with
/// a [m, k] and b [k, n] any strided views with a unit stride: C read column-major is Cᵀ
/// [n, m] = bᵀ aᵀ, so cuBLAS's A is b's memory and its B is a's. None where cuBLAS cannot read a
/// layout, or a figure exceeds its 32-bit arguments.
pub fn layout(a: ([i64; 2], [i64; 2]), b: ([i64; 2], [i64; 2]), c: ([i64; 2], [i64; 2])) -> Option<Gemm> {
    let ([m, k], [k2, n]) = (a.0, b.0);
    if k != k2 || c.0 != [m, n] || m == 0 || n == 0 || k == 0 {
        return None;
    }
    // C row-major: read column-major, Cᵀ.
    let (false, ldc) = transposed_operand(c.0, c.1)? else {
        return None;
    };
    let (trans_a, lda) = transposed_operand(b.0, b.1)?;
    let (trans_b, ldb) = transposed_operand(a.0, a.1)?;
    let g = Gemm {
        trans_a,
        trans_b,
        m: n,
        n: m,
        k,
        lda,
        ldb,
        ldc,
    };
    [g.m, g.n, g.k, g.lda, g.ldb, g.ldc]
        .iter()
        .all(|&x| x <= i32::MAX as i64)
        .then_some(g)
}

fn view(t: &Tensor) -> Option<([i64; 2], [i64; 2])> {
    let (s, st) = (t.size(), t.stride());
    (s.len() == 2).then(|| ([s[0], s[1]], [st[0], st[1]]))
}

thread_local! {
    /// A per-thread choice that overrides the environment (kernel-check compares both).
    static OVERRIDE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Fuse (true) or not (false) on this thread from now on (None: the environment again).
pub fn fuse_on_this_thread(on: Option<bool>) {
    OVERRIDE.with(|o| o.set(on));
}

/// `param.grad += alpha a b` (a [m, k], b [k, n], the gradient [m, n]); the gradient must exist
/// where the fusion applies (the optimizer's flat buffers make every one), else
/// `nn::accumulate_grad` creates it. Without the fusion the product is taken in the operands'
/// kind and scaled in the gradient's, as the hand-written backwards did.
pub fn accumulate_grad_mm(param: &Tensor, a: &Tensor, b: &Tensor, alpha: f64) {
    let grad = param.grad();
    if grad.defined() && fusable(&grad, a, b) {
        if let (Some(va), Some(vb), Some(vc)) = (view(a), view(b), view(&grad)) {
            if let Some(g) = layout(va, vb, vc) {
                let Device::Cuda(ordinal) = grad.device() else {
                    unreachable!("fusable")
                };
                gemm_accumulate(ordinal, &g, alpha as f32, a, b, &grad).unwrap_or_else(|e| panic!("{e}"));
                return;
            }
        }
    }
    let product = a.mm(b);
    let product = if alpha == 1.0 {
        product
    } else {
        product.to_kind(param.kind()) * alpha
    };
    crate::nn::accumulate_grad(param, &product);
}

/// Whether `accumulate_grad_mm(param, a, b, _)` would be a fused GEMM (by the kinds, devices
/// and the switch; layouts aside).
fn fuses(param: &Tensor, a: &Tensor, b: &Tensor) -> bool {
    let grad = param.grad();
    grad.defined() && fusable(&grad, a, b)
}

fn fusable(grad: &Tensor, a: &Tensor, b: &Tensor) -> bool {
    let on = OVERRIDE
        .with(|o| o.get())
        .unwrap_or_else(|| crate::cuda::env_switch("DEBERTA_WGRAD_FUSION"));
    let operands = a.kind() == b.kind() && matches!(a.kind(), Kind::BFloat16 | Kind::Half);
    on && operands
        && grad.kind() == Kind::Float
        && grad.device().is_cuda()
        && a.device() == grad.device()
        && b.device() == grad.device()
}

/// cuBLAS's workspace per handle (its default on Hopper), from libtorch's allocator rather than
/// a `cudaMalloc` of cuBLAS's own beside a nearly full caching allocator.
const WORKSPACE_BYTES: i64 = 32 << 20;

/// A handle and the workspace it was given (kept alive with it).
struct Handle {
    raw: usize,
    _workspace: Tensor,
}

/// One cuBLAS handle per GPU, created on first use (held for the process's life).
fn handle(ordinal: usize) -> Result<usize, String> {
    use cudarc::cublas::{result as cublas, sys};
    static HANDLES: OnceLock<Mutex<HashMap<usize, Handle>>> = OnceLock::new();
    let mut handles = HANDLES.get_or_init(Default::default).lock().unwrap();
    if let Some(h) = handles.get(&ordinal) {
        return Ok(h.raw);
    }
    // SAFETY: only probes whether the library can be loaded.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(
            "DEBERTA_WGRAD_FUSION: libcublas not found on LD_LIBRARY_PATH (pip's nvidia/cu13/lib \
                    holds it; DEBERTA_WGRAD_FUSION=0 leaves the weight gradients to libtorch)"
                .into(),
        );
    }
    crate::cuda::bind_context(ordinal)?;
    let h = cublas::create_handle().map_err(|e| format!("cuBLAS handle on GPU {ordinal}: {e:?}"))?;
    // SAFETY: a fresh handle; the null stream is the legacy default stream, libtorch's.
    unsafe { cublas::set_stream(h, std::ptr::null_mut()) }
        .map_err(|e| format!("cuBLAS stream on GPU {ordinal}: {e:?}"))?;
    let workspace = Tensor::empty([WORKSPACE_BYTES], (Kind::Uint8, Device::Cuda(ordinal)));
    // SAFETY: the workspace lives as long as the handle (both held in the map for good).
    unsafe { sys::cublasSetWorkspace_v2(h, workspace.data_ptr(), WORKSPACE_BYTES as usize) }
        .result()
        .map_err(|e| format!("cuBLAS workspace on GPU {ordinal}: {e:?}"))?;
    handles.insert(
        ordinal,
        Handle {
            raw: h as usize,
            _workspace: workspace,
        },
    );
    Ok(h as usize)
}

/// C += alpha op(A) op(B) by cublasGemmEx: `g` from `layout` over (a, b, c); a and b bf16 or
/// fp16, c fp32, fp32 accumulation, on the default stream.
fn gemm_accumulate(ordinal: usize, g: &Gemm, alpha: f32, a: &Tensor, b: &Tensor, c: &Tensor) -> Result<(), String> {
    use cudarc::cublas::{result as cublas, sys};
    let h = handle(ordinal)? as sys::cublasHandle_t;
    crate::cuda::bind_context(ordinal)?;
    let op = |t: bool| {
        if t {
            sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            sys::cublasOperation_t::CUBLAS_OP_N
        }
    };
    let kind = if a.kind() == Kind::BFloat16 {
        sys::cudaDataType::CUDA_R_16BF
    } else {
        sys::cudaDataType::CUDA_R_16F
    };
    let beta = 1.0f32;
    // SAFETY: `layout` checked that the strided views a, b (operands) and c (read and written)
    // lie within what cuBLAS addresses from their data pointers with these leading dimensions;
    // the tensors are live CUDA buffers of this device for the call, which the default stream
    // orders after their producers and before their consumers, as libtorch's own kernels.
    unsafe {
        cublas::gemm_ex(
            h,
            op(g.trans_a),
            op(g.trans_b),
            g.m as i32,
            g.n as i32,
            g.k as i32,
            (&alpha as *const f32).cast(),
            b.data_ptr() as *const _,
            kind,
            g.lda as i32,
            a.data_ptr() as *const _,
            kind,
            g.ldb as i32,
            (&beta as *const f32).cast(),
            c.data_ptr(),
            sys::cudaDataType::CUDA_R_32F,
            g.ldc as i32,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| format!("cublasGemmEx ({g:?}) on GPU {ordinal}: {e:?}"))
}

/// kernel-check: `accumulate_grad_mm` on `device` against the fp64 sum, for the layouts the
/// backwards pass (a GEMM output's transpose times a row-major input; columns of the fused
/// q, k, v gradient, scaled; a row vector), starting from a non-zero gradient: (case, relative
/// error, tolerance). bf16 operands are exact in fp32, so only the summation order differs:
/// the unfused path rounds each product to bf16 (~4e-3).
pub fn compare(device: Device) -> Result<Vec<(&'static str, f64, f64)>, String> {
    let bf = (Kind::BFloat16, device);
    let cases: [(&'static str, i64, i64, i64, f64); 3] = [
        ("dy^T x", 1536, 4096, 768, 1.0),
        ("dqkv cols", 192, 4096, 1536, 0.125),
        ("1 row", 1, 333, 1032, 1.0),
    ];
    let mut out = Vec::new();
    for (name, m, k, n, alpha) in cases {
        tch::manual_seed(m + k + n);
        // a = dy^T with dy [k, 3 m] row-major and a's columns one third of it.
        let dy = Tensor::randn([k, 3 * m], bf);
        let a = dy.narrow(1, m, m).tr();
        let b = Tensor::randn([k, n], bf);
        let start = Tensor::randn([m, n], (Kind::Float, device));
        let p = Tensor::zeros([m, n], (Kind::Float, device)).set_requires_grad(true);
        crate::nn::accumulate_grad(&p, &start);
        if !fuses(&p, &a, &b) {
            return Err(format!(
                "blas: {name}: the fusion does not apply on {device:?} (DEBERTA_WGRAD_FUSION=0?)"
            ));
        }
        accumulate_grad_mm(&p, &a, &b, alpha);
        let d = |t: &Tensor| t.to_kind(Kind::Double);
        let want = d(&start) + d(&a).mm(&d(&b)) * alpha;
        let scale = want.abs().max().double_value(&[]).max(1e-12);
        out.push((name, (d(&p.grad()) - want).abs().max().double_value(&[]) / scale, 1e-5));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// C (column-major, in `c` from offset oc) = alpha op(A) op(B) + C, from the BLAS
    /// definition: op(A)[i, l] = A[i + l lda] (A[l + i lda] transposed), op(B) likewise.
    #[allow(clippy::too_many_arguments)]
    fn reference(g: &Gemm, alpha: f64, a: &[f64], oa: i64, b: &[f64], ob: i64, c: &mut [f64], oc: i64) {
        for i in 0..g.m {
            for j in 0..g.n {
                let mut sum = 0.0;
                for l in 0..g.k {
                    let x = if g.trans_a {
                        a[(oa + l + i * g.lda) as usize]
                    } else {
                        a[(oa + i + l * g.lda) as usize]
                    };
                    let y = if g.trans_b {
                        b[(ob + j + l * g.ldb) as usize]
                    } else {
                        b[(ob + l + j * g.ldb) as usize]
                    };
                    sum += x * y;
                }
                c[(oc + i + j * g.ldc) as usize] += alpha * sum;
            }
        }
    }

    /// A strided view [rows, cols] of a fresh random storage: `order` "row", "col" (a
    /// transposed contiguous one), "rowslice" (columns of a wider row-major matrix, like a
    /// narrow of the fused q, k, v gradient), "colslice".
    fn operand(rows: i64, cols: i64, order: &str, seed: i64) -> (Tensor, Vec<f64>, i64) {
        tch::manual_seed(seed);
        let (sizes, strides, offset, len) = match order {
            "row" => ([rows, cols], [cols, 1], 0, rows * cols),
            "col" => ([rows, cols], [1, rows], 0, rows * cols),
            "rowslice" => ([rows, cols], [cols + 5, 1], 3, 3 + rows * (cols + 5)),
            "colslice" => ([rows, cols], [1, rows + 2], 1, 1 + cols * (rows + 2)),
            _ => unreachable!(),
        };
        let base = Tensor::randn([len], (Kind::Double, Device::Cpu));
        let data = Vec::<f64>::try_from(&base).unwrap();
        (base.as_strided(sizes, strides, offset), data, offset)
    }

    #[test]
    fn the_cublas_arguments_compute_the_row_major_product_for_every_layout() {
        let orders = ["row", "col", "rowslice", "colslice"];
        let mut seed = 0;
        for (m, k, n) in [(5, 7, 3), (1, 4, 6), (6, 1, 2), (3, 5, 1), (8, 8, 8)] {
            for oa in orders {
                for ob in orders {
                    seed += 1;
                    let (a, da, offa) = operand(m, k, oa, seed);
                    let (b, db, offb) = operand(k, n, ob, seed + 1000);
                    // C: a row-major view with a padded row, as a gradient inside a wider buffer.
                    let (c, mut dc, offc) = operand(m, n, "rowslice", seed + 2000);
                    let want = &c + a.mm(&b) * 0.5;
                    let g = layout(view(&a).unwrap(), view(&b).unwrap(), view(&c).unwrap())
                        .unwrap_or_else(|| panic!("{m}x{k}x{n} {oa} {ob}: no layout"));
                    // cuBLAS's A is b's memory, its B a's.
                    reference(&g, 0.5, &db, offb, &da, offa, &mut dc, offc);
                    let got = Tensor::from_slice(&dc).as_strided(c.size(), c.stride(), offc);
                    let err = (&got - &want).abs().max().double_value(&[]);
                    assert!(err < 1e-12, "{m}x{k}x{n} a {oa} b {ob}: {g:?}, error {err}");
                }
            }
        }
    }

    #[test]
    fn layouts_cublas_cannot_read_are_refused() {
        let v = |sizes: [i64; 2], strides: [i64; 2]| (sizes, strides);
        let a = v([4, 3], [3, 1]);
        let b = v([3, 2], [2, 1]);
        let c = v([4, 2], [2, 1]);
        assert!(layout(a, b, c).is_some());
        assert_eq!(layout(v([4, 3], [2, 2]), b, c), None, "no unit stride");
        assert_eq!(
            layout(v([4, 3], [0, 1]), b, c),
            None,
            "an expanded (stride 0) dimension"
        );
        assert_eq!(layout(a, b, v([4, 2], [1, 4])), None, "a column-major C");
        assert_eq!(layout(a, b, v([4, 2], [1, 1])), None, "overlapping rows of C");
        assert_eq!(layout(a, v([2, 2], [2, 1]), c), None, "mismatched inner sizes");
        assert_eq!(
            layout(a, v([3, 2], [2, 1]), v([4, 3], [3, 1])),
            None,
            "C of another shape"
        );
    }

    #[test]
    fn without_the_fusion_the_product_is_added_as_before() {
        // On the CPU the product and the addition are libtorch's: the same as the two steps.
        let p = Tensor::zeros([3, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let start = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
        crate::nn::accumulate_grad(&p, &start);
        let a = Tensor::randn([5, 3], (Kind::Float, Device::Cpu)).tr();
        let b = Tensor::randn([5, 4], (Kind::Float, Device::Cpu));
        accumulate_grad_mm(&p, &a, &b, 0.25);
        let want = &start + a.mm(&b) * 0.25;
        assert!(p.grad().allclose(&want, 1e-6, 1e-6, false));
    }
}
