//! The two parameterised building blocks every DeBERTa module uses, with HF's parameter names
//! (`weight`, `bias`) and the official initialisation: N(0, initializer_range) weights, zero
//! biases, LayerNorm (1, 0).

use tch::nn::{Init, Path};
use tch::{Kind, Tensor};

/// y = x W^T + b, W: [out, in].
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(p: &Path, in_dim: i64, out_dim: i64, bias: bool, std: f64) -> Linear {
        Linear {
            weight: p.var("weight", &[out_dim, in_dim], Init::Randn { mean: 0.0, stdev: std }),
            bias: bias.then(|| p.var("bias", &[out_dim], Init::Const(0.0))),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

/// Row-parallel linear (Megatron): W [out, in] is split along `in`; each rank computes the
/// partial product x_r W_r^T, the partials are summed over TP ("g"), then the replicated bias is
/// added: y = sum_r x_r W_r^T + b.
#[derive(Debug)]
pub struct RowLinear {
    /// [out, in / tp]
    pub weight: Tensor,
    /// [out], replicated.
    pub bias: Tensor,
}

impl RowLinear {
    pub fn new(p: &Path, in_local: i64, out_dim: i64, std: f64) -> RowLinear {
        RowLinear {
            weight: p.var("weight", &[out_dim, in_local], Init::Randn { mean: 0.0, stdev: std }),
            bias: p.var("bias", &[out_dim], Init::Const(0.0)),
        }
    }

    /// y = g(x W^T) + b, with `g` the sum over the TP group (identity without TP).
    pub fn forward(&self, x: &Tensor, g: &dyn Fn(&Tensor) -> Tensor) -> Tensor {
        self.reduce_and_add_bias(&self.partial(x), g)
    }

    /// This rank's partial product x_r W_r^T.
    pub fn partial(&self, x: &Tensor) -> Tensor {
        x.linear::<Tensor>(&self.weight, None)
    }

    /// g(partial) + b.
    pub fn reduce_and_add_bias(&self, partial: &Tensor, g: &dyn Fn(&Tensor) -> Tensor) -> Tensor {
        g(partial) + &self.bias
    }
}

/// Add `g` to a parameter's `.grad` as autograd's accumulation would: in place when the
/// gradient exists (it may be a view of a flat buffer), else by a backward that creates it.
/// For hand-written backwards (`segments::Tape::custom`) that own a parameter. A bf16 `g` is
/// widened inside the addition (exactly, as a cast would): no fp32 copy of it is written and
/// read back, 8 bytes per weight and step less.
pub fn accumulate_grad(param: &Tensor, g: &Tensor) {
    let mut grad = param.grad();
    if grad.defined() {
        let _ = grad.g_add_(g);
    } else {
        let g = g.to_kind(param.kind());
        // d/dp sum(p * g) = g, exactly.
        tch::with_grad(|| (param * g.detach()).sum(param.kind()).backward());
    }
}

/// x W^T (+ b) in `kind` (bf16 under autocast), the operands cast here (the parameters' bf16
/// copies where the optimizer keeps them, `weight_copies`), for a hand-written segment: nothing
/// is kept, `linear_backward` recasts x and W. W: [out, in].
pub fn linear_in(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, kind: Kind) -> Tensor {
    let in_kind = |t: &Tensor| crate::weight_copies::in_kind(t, kind);
    x.to_kind(kind).linear(&in_kind(weight), bias.map(in_kind))
}

/// Backward of `linear_in` for dL/dy: adds W's (and b's) gradients to their `.grad` (W's by the
/// GEMM itself on CUDA, `blas`); returns
/// dL/dx in `kind`, the GEMM's (the tape widens a bf16 gradient of an fp32 boundary where it
/// sums it, `segments::CustomBackward`: no pass of its own).
pub fn linear_backward(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, dy: &Tensor, kind: Kind) -> Tensor {
    let w = crate::weight_copies::in_kind(weight, kind);
    let (out, inp) = (w.size()[0], w.size()[1]);
    let rows = dy.to_kind(kind).reshape([-1, out]);
    crate::blas::accumulate_grad_mm(weight, &rows.tr(), &x.to_kind(kind).reshape([-1, inp]), 1.0);
    if let Some(b) = bias {
        accumulate_grad(b, &rows.sum_dim_intlist(0, false, Kind::Float));
    }
    let mut shape = x.size();
    *shape.last_mut().expect("x has a feature dimension") = inp;
    rows.mm(&w).view(shape.as_slice())
}

/// Dropout for a hand-written segment: the output and, in training with p > 0, the mask
/// (`native_dropout`: on CUDA the draws of `dropout` itself, and on the CPU too).
pub fn dropout_saving(x: &Tensor, p: f64, train: bool) -> (Tensor, Option<Tensor>) {
    if train && p > 0.0 {
        let (y, keep) = x.native_dropout(p, true);
        (y, Some(keep))
    } else {
        (x.shallow_clone(), None)
    }
}

/// Backward of `dropout_saving` for dL/dy, with its mask (None: the identity).
pub fn dropout_backward(dy: &Tensor, keep: Option<&Tensor>, p: f64) -> Tensor {
    match keep {
        Some(keep) => Tensor::native_dropout_backward(dy, keep, 1.0 / (1.0 - p)),
        None => dy.shallow_clone(),
    }
}

/// LayerNorm over the last dimension (DeBERTa uses eps 1e-7 everywhere, pitfall 10).
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(p: &Path, dim: i64, eps: f64) -> LayerNorm {
        LayerNorm {
            weight: p.var("weight", &[dim], Init::Const(1.0)),
            bias: p.var("bias", &[dim], Init::Const(0.0)),
            eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm([self.dim()], Some(&self.weight), Some(&self.bias), self.eps, true)
    }

    fn dim(&self) -> i64 {
        *self.weight.size().last().expect("LayerNorm weight is 1-D")
    }

    /// `forward` (the same kernel) and its 1/σ per row ([..., 1], fp32), for
    /// `backward_from_output`.
    pub fn forward_saving(&self, x: &Tensor) -> (Tensor, Tensor) {
        let (y, _mean, rstd) = x.native_layer_norm([self.dim()], Some(&self.weight), Some(&self.bias), self.eps);
        (y, rstd)
    }

    /// Backward from the output y and 1/σ, so that the input need not be kept: x̂ = (y - β) / γ
    /// (as Apex's memory-efficient LayerNorm; exact while no weight is 0, where it would give a
    /// non-finite gradient, which the trainer reports and skips). Adds dγ and dβ to the
    /// parameters' `.grad`; returns dL/dx.
    pub fn backward_from_output(&self, y: &Tensor, rstd: &Tensor, dy: &Tensor) -> Tensor {
        let inv = self.weight.reciprocal(); // [D]
        let xhat = (-&self.bias * &inv).addcmul(y, &inv); // -β/γ + y/γ, one pass
        let (dx, dw, db) = ops::layer_norm_backward(&dy.to_kind(y.kind()), &xhat, rstd, &self.weight);
        accumulate_grad(&self.weight, &dw);
        accumulate_grad(&self.bias, &db);
        dx
    }
}

/// The kind the matmuls run in: bf16 for fp32 tensors under their device's autocast (what
/// autocast would cast them to: the trainer sets CUDA's to bf16, `autocast` the CPU's), else the
/// tensor's own. For hand-written segments, which cast once themselves.
pub fn compute_kind(x: &Tensor) -> Kind {
    let on = match x.device() {
        tch::Device::Cuda(_) => ops::autocast_enabled(true),
        tch::Device::Cpu => ops::autocast_enabled(false),
        _ => false,
    };
    if on && x.kind() == Kind::Float {
        Kind::BFloat16
    } else {
        x.kind()
    }
}

thread_local! {
    static CPU_AS_CUDA: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Tests: from now on (on this thread) `autocast` switches the CPU's autocast too, in bf16, so
/// that CPU tensors take the mixed precision CUDA tensors get: the hand-written segments' bf16
/// GEMMs and casts, and with `cuda::emulate_on_cpu` the kernels' bf16 operands. tch's `autocast`
/// does nothing on a machine without CUDA, so otherwise a bf16 run on the CPU is fp32.
pub fn emulate_cuda_autocast_on_cpu(on: bool) {
    CPU_AS_CUDA.with(|c| c.set(on));
}

/// CUDA's autocast on or off around `f` (as `tch::autocast`, whose deprecated libtorch calls
/// print a warning each: thousands of lines a step on the GPU), and the CPU's as well after
/// `emulate_cuda_autocast_on_cpu(true)`. Without CUDA, CUDA's switch is left alone, as tch does.
pub fn autocast<T>(enabled: bool, f: impl FnOnce() -> T) -> T {
    let cuda = tch::Cuda::is_available().then(|| ops::autocast_enter(true, enabled));
    let cpu = CPU_AS_CUDA
        .with(|c| c.get())
        .then(|| ops::autocast_enter(false, enabled));
    let out = f();
    if let Some(prev) = cpu {
        ops::autocast_leave(false, prev);
    }
    if let Some(prev) = cuda {
        ops::autocast_leave(true, prev);
    }
    out
}

/// libtorch ops that tch does not wrap (`csrc/ops.cpp`).
pub(crate) use ops::shim_result;

mod ops {
    use tch::Tensor;
    use torch_sys::C_tensor;

    extern "C" {
        fn deberta_autocast_enabled(cuda: i32) -> bool;
        fn deberta_autocast_enter(cuda: i32, on: bool) -> bool;
        fn deberta_autocast_leave(cuda: i32, prev: bool);
        #[cfg(test)]
        fn deberta_warnings_count_start();
        #[cfg(test)]
        fn deberta_warnings_count_stop() -> u64;
        fn deberta_layer_norm_backward(
            dy: *const C_tensor,
            xhat: *const C_tensor,
            rstd: *const C_tensor,
            weight: *const C_tensor,
            dx: *mut *mut C_tensor,
            dweight: *mut *mut C_tensor,
            dbias: *mut *mut C_tensor,
            err: *mut std::ffi::c_char,
            errlen: usize,
        ) -> i32;
    }

    /// Ok for a shim's return code 0, else the message it wrote into `err` (`csrc/ops.cpp`).
    pub(crate) fn shim_result(rc: i32, err: &[std::ffi::c_char]) -> Result<(), String> {
        if rc == 0 {
            return Ok(());
        }
        // SAFETY: on failure the shim wrote a NUL-terminated message into the buffer.
        Err(unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) }
            .to_string_lossy()
            .into_owned())
    }

    /// libtorch's thread-local autocast flag of CUDA (or the CPU); tch's reader warns at every
    /// call.
    pub fn autocast_enabled(cuda: bool) -> bool {
        // SAFETY: a plain read of a thread-local flag.
        unsafe { deberta_autocast_enabled(cuda as i32) }
    }

    /// CUDA's (or the CPU's, in bf16) autocast on or off, one nesting level in; returns the
    /// previous switch.
    pub fn autocast_enter(cuda: bool, on: bool) -> bool {
        // SAFETY: sets libtorch's thread-local autocast state.
        unsafe { deberta_autocast_enter(cuda as i32, on) }
    }

    /// Back out of `autocast_enter`, restoring `prev`.
    pub fn autocast_leave(cuda: bool, prev: bool) {
        // SAFETY: as autocast_enter; paired with it.
        unsafe { deberta_autocast_leave(cuda as i32, prev) }
    }

    /// The warnings libtorch raises on this thread while `f` runs (each still printed).
    #[cfg(test)]
    pub fn warnings_during<T>(f: impl FnOnce() -> T) -> (T, u64) {
        // SAFETY: installs a thread-local handler and restores the previous one after `f`.
        unsafe { deberta_warnings_count_start() };
        let out = f();
        (out, unsafe { deberta_warnings_count_stop() })
    }

    /// LayerNorm's backward from x̂ and 1/σ: (dx, dγ, dβ). See `ops.cpp`.
    pub fn layer_norm_backward(dy: &Tensor, xhat: &Tensor, rstd: &Tensor, weight: &Tensor) -> (Tensor, Tensor, Tensor) {
        let mut out = [std::ptr::null_mut(); 3];
        let mut err = [0 as std::ffi::c_char; 512];
        let [dx, dw, db] = &mut out;
        // SAFETY: valid tensors in, three fresh tensors out (owned from here) or an error.
        let rc = unsafe {
            deberta_layer_norm_backward(
                dy.as_ptr(),
                xhat.as_ptr(),
                rstd.as_ptr(),
                weight.as_ptr(),
                dx,
                dw,
                db,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if let Err(msg) = shim_result(rc, &err) {
            panic!("layer_norm_backward: {msg}");
        }
        // SAFETY: the shim allocated each with `new at::Tensor`, which Tensor's drop frees.
        unsafe {
            (
                Tensor::from_ptr(out[0]),
                Tensor::from_ptr(out[1]),
                Tensor::from_ptr(out[2]),
            )
        }
    }
}

/// An embedding table [rows, dim] drawn from N(0, std).
pub fn embedding_table(p: &Path, rows: i64, dim: i64, std: f64) -> Tensor {
    p.var("weight", &[rows, dim], Init::Randn { mean: 0.0, stdev: std })
}

/// The most negative finite value of a floating kind: masked scores use it instead of -inf so a
/// fully masked (padding) query row stays finite in softmax and its backward.
pub fn finite_min(kind: tch::Kind) -> f64 {
    match kind {
        tch::Kind::Half => -65504.0,
        tch::Kind::BFloat16 => -1e38, // well inside bf16's range (max 3.39e38) after rounding
        tch::Kind::Double => f64::MIN,
        _ => f32::MIN as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// With the CPU standing in for CUDA, `autocast` runs libtorch's matmuls and the hand-written
    /// segments' kind in bf16 inside, fp32 outside and in an `autocast(false)` inside it; a
    /// weight changed between two scopes is cast anew (autocast caches the casts of weights
    /// within a scope: the outermost scope's end must clear them).
    #[test]
    fn autocast_on_the_cpu_stands_in_for_cuda_and_forgets_its_casts_between_steps() {
        tch::manual_seed(4);
        let x = Tensor::randn([4, 8], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([3, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let run = || autocast(true, || (x.linear::<Tensor>(&w, None), compute_kind(&x)));
        let (y, kind) = run();
        assert_eq!((y.kind(), kind), (Kind::Float, Kind::Float), "not emulating: fp32");
        emulate_cuda_autocast_on_cpu(true);
        let (y, kind) = run();
        assert_eq!((y.kind(), kind), (Kind::BFloat16, Kind::BFloat16));
        let inner = autocast(true, || autocast(false, || compute_kind(&x)));
        assert_eq!(inner, Kind::Float, "autocast(false) inside");
        let _ = tch::no_grad(|| w.shallow_clone().g_mul_scalar_(2.0));
        let (y2, _) = run();
        emulate_cuda_autocast_on_cpu(false);
        assert_eq!(compute_kind(&x), Kind::Float, "off after");
        let want = (y.to_kind(Kind::Float) * 2.0).to_kind(Kind::BFloat16);
        assert!(y2.equal(&want), "the second scope used the first one's cast of w");
    }

    /// CUDA's autocast switch (a thread-local flag, set without a GPU too) goes on and off
    /// without the deprecation warning that tch's `autocast` prints at each of its calls, and
    /// nests: the inner scope's end restores the outer's setting.
    #[test]
    fn cudas_autocast_switch_nests_without_a_warning() {
        let (_, tch_way) = ops::warnings_during(|| unsafe { torch_sys::at_autocast_is_enabled() });
        assert!(tch_way > 0, "the counter sees the deprecated call's warning");
        let (inside, warnings) = ops::warnings_during(|| {
            let outer = ops::autocast_enter(true, true);
            let inner = ops::autocast_enter(true, false);
            let off = ops::autocast_enabled(true);
            ops::autocast_leave(true, inner);
            let on = ops::autocast_enabled(true);
            ops::autocast_leave(true, outer);
            (off, on, outer, ops::autocast_enabled(true))
        });
        assert_eq!(inside, (false, true, false, false));
        assert_eq!(warnings, 0);
        let (_, warnings) = ops::warnings_during(|| autocast(true, || autocast(false, || ())));
        assert_eq!(warnings, 0);
    }

    /// A bf16 gradient goes into the fp32 `.grad` in place (it may be a view of the optimizer's
    /// flat buffer), with exactly the bits of a cast then an addition.
    #[test]
    fn a_bf16_gradient_accumulates_into_the_fp32_grad_in_place_exactly() {
        tch::manual_seed(2);
        let p = Tensor::randn([33, 7], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        (&p * 3.0).sum(Kind::Float).backward();
        let before = p.grad().copy();
        let at = p.grad().data_ptr();
        let g = (Tensor::randn([33, 7], (Kind::Float, Device::Cpu)) * 1e-3).to_kind(Kind::BFloat16);
        accumulate_grad(&p, &g);
        let grad = p.grad();
        assert_eq!((grad.kind(), grad.data_ptr()), (Kind::Float, at));
        assert!(grad.equal(&(before + g.to_kind(Kind::Float))));
    }
}
