//! The AdamW update as one CUDA kernel (`kernels/adamw.cu`, through `cuda`) over flat fp32
//! buffers: one pass that reads the weights, gradients and moments and writes weights and
//! moments, where libtorch's tensor ops take ten passes and full-size temporaries. The worker's
//! optimizer (`optim::FlatAdamW`) launches it once per run of its flat layout; on CPU tensors
//! it runs in the emulator (tests, `cuda::emulate_on_cpu`).

use tch::{Device, Kind, Tensor};

use crate::cuda::{self, ptr, Arg, Kernels};

/// The kernel's CUDA C source (after the shared bf16 helpers, for KERNEL).
pub const SOURCE: &str = concat!(include_str!("kernels/bf16.cuh"), include_str!("kernels/adamw.cu"));

/// One update's scalars: the learning rate, the moments' decay rates, ε, the weight decay (0 on
/// runs exempt from it), the bias corrections 1 − β^t, and the factor on the gradients (the
/// clip factor).
#[derive(Debug, Clone, Copy)]
pub struct Update {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub bias_correction1: f64,
    pub bias_correction2: f64,
    pub grad_scale: f64,
}

fn kernels(device: Device) -> Result<Kernels, String> {
    if !device.is_cuda() {
        return Ok(Kernels::Emulated { variant: 0 });
    }
    cuda::load(device, SOURCE, "adamw.cu", &[], &[("adamw_step", 0)]).map(Kernels::Gpu)
}

/// p, m, v updated in place from g by `u`: four contiguous fp32 buffers of the same length on one
/// device, at the same offset from 16-byte alignment (views at the same offset of the flat
/// buffers are). `control` (fp32 [4] on that device: the gradients' factor, 1 to apply or 0 to
/// skip, the two bias corrections) overrides `u`'s `grad_scale` and bias corrections with what
/// the device decided, so that skipping a non-finite step needs no read-back. `copy`, when
/// given, is p's bf16 compute copy (`weight_copies`; contiguous, p's length, at the same element
/// offset from an 8-byte boundary as p is from a 16-byte one): the kernel writes the updated
/// weights there too, rounded as a cast rounds them.
pub fn step(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    u: &Update,
    control: Option<&Tensor>,
    copy: Option<&Tensor>,
) -> Result<(), String> {
    let n = p.numel() as i64;
    if let Some(c) = control {
        if c.kind() != Kind::Float || c.size() != [4] || !c.is_contiguous() || c.device() != p.device() {
            return Err(format!(
                "the AdamW kernel: the control is {:?} {:?} on {:?}, expected 4 contiguous fp32 on {:?}",
                c.size(),
                c.kind(),
                c.device(),
                p.device()
            ));
        }
    }
    // Each buffer: n contiguous elements of `kind` on p's device, as many elements past a
    // 4-element (vector) boundary as p is.
    let check = |name: &str, t: &Tensor, kind: Kind| {
        if t.kind() != kind || !t.is_contiguous() || t.numel() as i64 != n || t.device() != p.device() {
            return Err(format!(
                "the AdamW kernel: {name} are {:?} {:?} on {:?}, expected {n} contiguous {kind:?} on {:?}",
                t.size(),
                t.kind(),
                t.device(),
                p.device()
            ));
        }
        if (ptr(t) / kind.elt_size_in_bytes() as u64) % 4 != (ptr(p) / 4) % 4 {
            return Err(format!("the AdamW kernel: {name} are not aligned as the weights are"));
        }
        Ok(())
    };
    for (name, t) in [
        ("weights", p),
        ("gradients", g),
        ("first moments", m),
        ("second moments", v),
    ] {
        check(name, t, Kind::Float)?;
    }
    if let Some(c) = copy {
        check("the weights' copies", c, Kind::BFloat16)?;
    }
    let device = p.device();
    let cfg = cuda::grid_stride(device, n / 4); // a thread per float4
    let scalars = [
        u.lr,
        u.beta1,
        u.beta2,
        u.eps,
        u.weight_decay,
        u.bias_correction1,
        u.bias_correction2,
        u.grad_scale,
    ]
    .map(|x| Arg::F32(x as f32));
    let control = Arg::Ptr(control.map_or(0, ptr));
    let copy = Arg::Ptr(copy.map_or(0, ptr));
    let args = [
        &[p, g, m, v].map(Arg::tensor)[..],
        &[Arg::I64(n)],
        &scalars,
        &[control, copy],
    ]
    .concat();
    // SAFETY: four buffers of n fp32 each, the control (4 fp32, or null) and the copy (n bf16,
    // or null) on `device`, checked above.
    unsafe { kernels(device)?.launch("adamw_step", cfg, &args) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every buffer is checked alike: the weights' copies must be bf16 and as far past a
    /// 4-element boundary as the weights are (the kernel's 8-byte stores fault otherwise).
    #[test]
    fn buffers_of_the_wrong_kind_or_alignment_are_refused() {
        let f = |kind| Tensor::zeros([64], (kind, Device::Cpu));
        let (p, g, m, v) = (f(Kind::Float), f(Kind::Float), f(Kind::Float), f(Kind::Float));
        let u = Update {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            bias_correction1: 1.0,
            bias_correction2: 1.0,
            grad_scale: 1.0,
        };
        let n = 60;
        let [p, g, m, v] = [&p, &g, &m, &v].map(|t| t.narrow(0, 0, n));
        let copies = f(Kind::BFloat16);
        let shifted = step(&p, &g, &m, &v, &u, None, Some(&copies.narrow(0, 1, n))).unwrap_err();
        assert!(shifted.contains("the weights' copies are not aligned"), "{shifted}");
        let fp32 = step(&p, &g, &m, &v, &u, None, Some(&f(Kind::Float).narrow(0, 0, n))).unwrap_err();
        assert!(fp32.contains("expected 60 contiguous BFloat16"), "{fp32}");
        let moments = step(&p, &g, &m.narrow(0, 1, n - 1), &v, &u, None, None).unwrap_err();
        assert!(moments.contains("first moments are"), "{moments}");
    }

    #[test]
    fn the_kernel_compiles_with_nvrtc() {
        let ptx = cuda::compile(SOURCE, "adamw.cu", "sm_90", &[]).unwrap();
        assert!(ptx.to_src().contains("adamw_step"));
    }
}
