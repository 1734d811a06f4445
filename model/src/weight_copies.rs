//! bf16 compute copies of the fp32 master weights, kept by the optimizer (Megatron's bf16
//! parameters beside its fp32 main parameters). Without them the hand-written segments cast
//! each weight at every use, in forward and again in backward: at the 1.5B model a read of 4
//! bytes and a write of 2 per weight and use, ~890 cast kernels and 7.7 ms of the traced
//! batch-32 step (eleventh session). With them the AdamW kernel writes the copy as it updates
//! the weights (2 more bytes per weight, once per step) and the segments read it: the same bits
//! a cast gives, for 2 bytes per weight held (2.9 GiB at the 1.5B model), so it is a switch
//! (`train.bf16_weight_copies`, `bench --bf16-weight-copies`), not the default.
//!
//! The model's layers hold plain fp32 tensors and know nothing of the optimizer: the copies are
//! found by the weight's address (`in_kind`). A copy is used only while it is known to equal the
//! weight: the weight's version counter and that of the buffer it is a view of (libtorch bumps
//! them on every in-place tensor op: a checkpoint's load, the tensor-op AdamW) are those seen
//! when the copy was last written; otherwise the copy is rewritten from the weight first. The
//! AdamW kernel writes weights and copy through raw pointers, so it bumps neither. Nothing else
//! may write the weights by raw pointer while copies are registered.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use tch::{Kind, Tensor};

struct Entry {
    /// The weight (fp32), as registered: the copy answers for this shape and these strides only.
    weight: Tensor,
    /// The buffer the weight is a view of (libtorch's `set_data` gives the view a version
    /// counter of its own, so writes through the buffer show on the buffer's).
    base: Tensor,
    copy: Tensor,
    /// (weight's, base's) version counters when the copy was last written.
    versions: (i64, i64),
    owner: u64,
}

fn registry() -> &'static Mutex<HashMap<u64, Entry>> {
    static REGISTRY: OnceLock<Mutex<HashMap<u64, Entry>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// The registry, also after a panic elsewhere held it (an out-of-memory the bench catches):
/// every entry is whole between statements.
fn lock() -> std::sync::MutexGuard<'static, HashMap<u64, Entry>> {
    registry().lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn versions(weight: &Tensor, base: &Tensor) -> (i64, i64) {
    (weight.internal_version(), base.internal_version())
}

/// The registration of one set of copies: dropping it forgets them (the optimizer holds it).
pub struct Registered {
    owner: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock().retain(|_, e| e.owner != self.owner);
    }
}

/// Register `copies`: (weight, its bf16 copy) pairs, each weight fp32 and a view of `base`, each
/// copy of the weight's shape. The copies are written from the weights here.
pub fn register(base: &Tensor, copies: &[(Tensor, Tensor)]) -> Registered {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let owner = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut registry = lock();
    tch::no_grad(|| {
        for (weight, copy) in copies {
            assert_eq!(weight.kind(), Kind::Float, "weight copies are of fp32 weights");
            assert_eq!(copy.kind(), Kind::BFloat16, "weight copies are bf16");
            assert_eq!(weight.size(), copy.size(), "a weight's copy has its shape");
            copy.shallow_clone().copy_(weight);
            let entry = Entry {
                weight: weight.shallow_clone(),
                base: base.shallow_clone(),
                copy: copy.shallow_clone(),
                versions: versions(weight, base),
                owner,
            };
            registry.insert(crate::cuda::ptr(weight), entry);
        }
    });
    Registered { owner }
}

fn grad_mode_enabled() -> bool {
    // SAFETY: sets libtorch's thread-local grad mode and puts back what it was.
    unsafe {
        let was = torch_sys::at_grad_set_enabled(0);
        torch_sys::at_grad_set_enabled(was);
        was != 0
    }
}

/// `w` in `kind`, for a hand-written segment (no autograd through it): its registered bf16 copy
/// when `kind` is bf16 and `w` is a registered weight (the same view of it), else `w.to_kind`.
/// Either way the same bits. A copy older than the weight's last in-place write is rewritten
/// first.
pub fn in_kind(w: &Tensor, kind: Kind) -> Tensor {
    if kind == Kind::BFloat16 && w.kind() == Kind::Float {
        if let Some(copy) = fresh_copy(w) {
            return copy;
        }
    }
    w.to_kind(kind)
}

fn fresh_copy(w: &Tensor) -> Option<Tensor> {
    let mut registry = lock();
    // Without copies (the default) a weight stops here.
    let e = registry.get_mut(&crate::cuda::ptr(w))?;
    if e.weight.size() != w.size() || e.weight.stride() != w.stride() || e.weight.device() != w.device() {
        return None;
    }
    // Autograd would not reach the weight through a copy: where it records, cast.
    if w.requires_grad() && grad_mode_enabled() {
        return None;
    }
    let now = versions(&e.weight, &e.base);
    if now != e.versions {
        tch::no_grad(|| e.copy.shallow_clone().copy_(&e.weight));
        e.versions = now;
    }
    Some(e.copy.shallow_clone())
}

/// How many copies are registered (tests).
pub fn registered() -> usize {
    lock().len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn flat_with_views() -> (Tensor, Vec<Tensor>, Tensor, Vec<Tensor>) {
        let base = Tensor::randn([40], (Kind::Float, Device::Cpu));
        let copy = Tensor::zeros([40], (Kind::BFloat16, Device::Cpu));
        let w = vec![base.narrow(0, 0, 24).view([4, 6]), base.narrow(0, 32, 8)];
        let c = vec![copy.narrow(0, 0, 24).view([4, 6]), copy.narrow(0, 32, 8)];
        (base, w, copy, c)
    }

    #[test]
    fn the_copy_is_the_cast_and_follows_in_place_writes() {
        let (base, w, _copy, c) = flat_with_views();
        let pairs: Vec<_> = w
            .iter()
            .zip(&c)
            .map(|(w, c)| (w.shallow_clone(), c.shallow_clone()))
            .collect();
        let reg = register(&base, &pairs);
        let got = in_kind(&w[0], Kind::BFloat16);
        assert_eq!(got.data_ptr(), c[0].data_ptr(), "the registered copy is used");
        assert!(got.equal(&w[0].to_kind(Kind::BFloat16)));
        // A write through the weight, then through the base: each time the copy follows.
        tch::no_grad(|| {
            w[0].shallow_clone()
                .copy_(&Tensor::ones([4, 6], (Kind::Float, Device::Cpu)))
        });
        assert!(in_kind(&w[0], Kind::BFloat16).equal(&w[0].to_kind(Kind::BFloat16)));
        let _ = base.shallow_clone().g_mul_scalar_(3.0);
        for (w, c) in w.iter().zip(&c) {
            let got = in_kind(w, Kind::BFloat16);
            assert_eq!(got.data_ptr(), c.data_ptr());
            assert!(
                got.equal(&w.to_kind(Kind::BFloat16)),
                "a write through the base left a copy stale"
            );
        }
        // Another view at the same address (the transpose) is cast, not answered by the copy.
        let t = w[0].tr();
        assert_ne!(in_kind(&t, Kind::BFloat16).data_ptr(), c[0].data_ptr());
        assert!(in_kind(&t, Kind::BFloat16).equal(&t.to_kind(Kind::BFloat16)));
        // Other kinds are casts.
        assert_eq!(in_kind(&w[0], Kind::Half).kind(), Kind::Half);
        drop(reg);
        assert_ne!(
            in_kind(&w[0], Kind::BFloat16).data_ptr(),
            c[0].data_ptr(),
            "dropped copies are forgotten"
        );
    }

    #[test]
    fn where_autograd_records_the_weight_is_cast() {
        let (base, w, _copy, c) = flat_with_views();
        let w0 = w[0].shallow_clone().set_requires_grad(true);
        let _reg = register(&base, &[(w0.shallow_clone(), c[0].shallow_clone())]);
        let y = in_kind(&w0, Kind::BFloat16);
        assert!(y.requires_grad(), "autograd must reach the weight");
        let y = tch::no_grad(|| in_kind(&w0, Kind::BFloat16));
        assert_eq!(y.data_ptr(), c[0].data_ptr());
    }
}
