//! The optimizer of the paper's recipe (spec §9): AdamW (β1 0.9, β2 0.999, ε 1e-6, weight decay
//! 0.01, none on biases and LayerNorm weights) with linear warmup then linear decay, over flat
//! fp32 buffers: every parameter's storage is a view into one contiguous master buffer, and the
//! moments are two more buffers, so a step is a few element-wise kernels over the whole model
//! instead of a loop of kernels per parameter.
//!
//! The update is torch.optim.AdamW's (bias-corrected, decoupled decay `p -= lr·wd·p`), not the
//! official XAdam (no bias correction, spec pitfall 17): the choice is recorded here and the
//! test compares against libtorch's AdamW.

use deberta_model::collective::Collective;
use deberta_model::tensor_parallel::{sharding_of, Sharding};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-6,
            weight_decay: 0.01,
        }
    }
}

/// Parameters exempt from weight decay: biases and LayerNorm weights (the official no-decay
/// regex `bias|LayerNorm.weight`, spec §9.3); embeddings, the relative table and the conv decay.
pub fn decays(name: &str) -> bool {
    !(name.ends_with("bias") || name.contains("LayerNorm."))
}

/// Learning rate of optimizer update `step` (0-based): 0 → peak linearly over `warmup` updates,
/// then linearly to 0 at `total`. Like HF's `get_linear_schedule_with_warmup` and the official
/// `warmup_linear`, the first update uses lr 0. A pure function of the step, so resuming needs
/// no scheduler state.
pub fn linear_warmup_decay(step: u64, peak: f64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        peak * step as f64 / warmup as f64
    } else {
        peak * total.saturating_sub(step) as f64 / total.saturating_sub(warmup).max(1) as f64
    }
}

/// Where each parameter starts in the flat buffers: a multiple of 64 elements (256 bytes, as
/// cudaMalloc aligns). Packed end to end, a parameter after one of odd size (a 3-class head's
/// bias) started off the 16-byte boundary that the kernels' vector loads need: on the H100 the
/// residual LayerNorm kernel faulted with a misaligned address in CB fine-tuning.
pub const PARAM_ALIGN: i64 = 64;

pub struct FlatAdamW {
    cfg: AdamWConfig,
    /// (parameter, offset, numel) in the flat buffers, in the order given to `new`.
    params: Vec<(Tensor, i64, i64)>,
    /// The flat buffers hold the tensor-parallel-sharded parameters first, then the replicated
    /// ones: elements [0, sharded) and [sharded, len), so the global norm is two norm kernels.
    sharded: i64,
    flat: Tensor,
    /// The gradients, flat: every parameter's `.grad` (libtorch accumulates in place) is a view
    /// of it, so the update reads them without gathering.
    grad: Tensor,
    /// Update with the CUDA kernel (on CUDA) or with tensor ops.
    pub kernel: bool,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// (start, length, decays): the flat buffers as runs of parameters that all take weight
    /// decay or all are exempt (at most four: sharded or replicated, decayed or not). A mask per
    /// element would cost 1.5B bytes (and a float mask 4 bytes) per element at the 1.5B model.
    runs: Vec<(i64, i64, bool)>,
    /// Updates taken (for the bias correction): fp64 [1] on the device, so that a step the
    /// device skips (`step_if_finite`) leaves it as it was without the host knowing.
    steps: Tensor,
    /// The weights' bf16 compute copies (`keep_weight_copies`): the flat buffer, in the weights'
    /// layout, and their registration with the model.
    copies: Option<(Tensor, deberta_model::weight_copies::Registered)>,
}

impl FlatAdamW {
    /// Move `params` (name, tensor; fp32, one device) into one flat buffer: afterwards each
    /// parameter is a view of it, so the model and the optimizer share the master weights.
    /// The tensor-parallel-sharded ones (`sharding_of`) come first in the buffer; within each
    /// part, those that take weight decay come first (`runs`). Each starts at a multiple of
    /// `PARAM_ALIGN` elements, the gaps zeros that stay zero.
    pub fn new(params: &[(String, Tensor)], cfg: AdamWConfig) -> FlatAdamW {
        let device = params.first().map(|(_, p)| p.device()).unwrap_or(tch::Device::Cpu);
        let slot = |p: &Tensor| (p.numel() as i64 + PARAM_ALIGN - 1) / PARAM_ALIGN * PARAM_ALIGN;
        let total: i64 = params.iter().map(|(_, p)| slot(p)).sum();
        let flat = Tensor::zeros([total], (Kind::Float, device));
        let grad = Tensor::zeros([total], (Kind::Float, device));
        let replicated = |name: &str| sharding_of(name) == Sharding::Replicated;
        // The four runs, in buffer order: (replicated, decays).
        let order = [(false, true), (false, false), (true, true), (true, false)];
        let mut runs = Vec::with_capacity(order.len());
        let mut start = 0;
        for (rep, dec) in order {
            let len: i64 = params
                .iter()
                .filter(|(name, _)| replicated(name) == rep && decays(name) == dec)
                .map(|(_, p)| slot(p))
                .sum();
            runs.push((start, len, dec));
            start += len;
        }
        let sharded = runs[0].1 + runs[1].1;
        let mut next: Vec<i64> = runs.iter().map(|r| r.0).collect();
        let mut list = Vec::with_capacity(params.len());
        tch::no_grad(|| {
            for (name, p) in params {
                let run = order
                    .iter()
                    .position(|&o| o == (replicated(name), decays(name)))
                    .expect("every (replicated, decays) pair has a run");
                let offset = next[run];
                assert_eq!(p.kind(), Kind::Float, "{name}: master weights are fp32");
                let n = p.numel() as i64;
                let mut view = flat.narrow(0, offset, n);
                view.copy_(&p.detach().reshape([-1]));
                let mut p = p.shallow_clone();
                p.set_data(&view.view(p.size().as_slice()));
                // The gradient too, when it exists (set_data on the handle rebinds p's .grad).
                let mut g = p.grad();
                if g.defined() && g.kind() == Kind::Float {
                    let gview = grad.narrow(0, offset, n);
                    gview.shallow_clone().copy_(&g.reshape([-1]));
                    g.set_data(&gview.view(p.size().as_slice()));
                }
                next[run] += slot(&p);
                list.push((p, offset, n));
            }
        });
        runs.retain(|r| r.1 > 0);
        FlatAdamW {
            cfg,
            params: list,
            sharded,
            exp_avg: flat.zeros_like(),
            exp_avg_sq: flat.zeros_like(),
            kernel: device.is_cuda(),
            flat,
            grad,
            runs,
            steps: Tensor::zeros([1], (Kind::Double, device)),
            copies: None,
        }
    }

    /// Keep a bf16 copy of every weight (`deberta_model::weight_copies`), which the model's
    /// hand-written segments read where they would cast the weight: 2 bytes per weight held,
    /// written by the AdamW kernel as it updates the weights.
    pub fn keep_weight_copies(&mut self) {
        if self.copies.is_some() {
            return;
        }
        let flat = Tensor::zeros([self.len()], (Kind::BFloat16, self.flat.device()));
        let pairs: Vec<(Tensor, Tensor)> = self
            .params
            .iter()
            .map(|(p, offset, n)| (p.shallow_clone(), flat.narrow(0, *offset, *n).view(p.size().as_slice())))
            .collect();
        let registered = deberta_model::weight_copies::register(&self.flat, &pairs);
        self.copies = Some((flat, registered));
    }

    /// `new` over the model's parameters, which then zero their gradients as the one flat buffer
    /// (`Params::zero_grad`).
    pub fn for_params(params: &crate::grads::Params, cfg: AdamWConfig) -> FlatAdamW {
        let opt = FlatAdamW::new(&params.list, cfg);
        let offsets = opt.params.iter().map(|(_, o, _)| *o).collect();
        params.set_flat_grad(opt.grad.shallow_clone(), offsets);
        opt
    }

    /// Whether every parameter's gradient is (still) its view of the flat gradient buffer.
    fn grads_are_flat(&self) -> bool {
        grads_are_views(self.params.iter().map(|(p, o, _)| (p, *o)), &self.grad)
    }

    /// The gradients as one flat buffer in the buffers' layout (gathered, zeros where a
    /// parameter has none, unless they already are views of one).
    fn flat_grad(&self) -> Tensor {
        if self.grads_are_flat() {
            return self.grad.shallow_clone();
        }
        let out = self.grad.zeros_like();
        tch::no_grad(|| {
            for (p, o, n) in &self.params {
                let g = p.grad();
                if g.defined() {
                    out.narrow(0, *o, *n).copy_(&g.to_kind(Kind::Float).reshape([-1]));
                }
            }
        });
        out
    }

    /// The L2 norm of the whole model's gradient: the sharded part's square summed over `tp`,
    /// the replicated part (the same on every TP rank) counted once. Two norm kernels over the
    /// flat gradient and one scalar collective, left on the device (fp64 [1]): no read-back.
    pub fn global_grad_norm_on_device(&self, tp: &dyn Collective) -> Tensor {
        let g = self.flat_grad();
        let sq = |t: Tensor| t.norm().to_kind(Kind::Double).square().reshape([1]);
        let mut sharded = sq(g.narrow(0, 0, self.sharded));
        tp.all_reduce_sum(&mut sharded);
        let replicated = sq(g.narrow(0, self.sharded, self.len() - self.sharded));
        (sharded + replicated).sqrt()
    }

    /// `global_grad_norm_on_device`, read back.
    pub fn global_grad_norm(&self, tp: &dyn Collective) -> f64 {
        self.global_grad_norm_on_device(tp)
            .to_device(tch::Device::Cpu)
            .double_value(&[0])
    }

    /// One AdamW update at learning rate `lr`, over the flat buffers.
    pub fn step(&mut self, lr: f64) {
        self.step_clipped(lr, 1.0);
    }

    /// One AdamW update on the gradients times `grad_scale` (the clip factor, `clip_factor`),
    /// applied inside the update: the gradients themselves are left as they are.
    pub fn step_clipped(&mut self, lr: f64, grad_scale: f64) {
        let opts = (Kind::Double, self.flat.device());
        self.update(lr, &Tensor::full([1], grad_scale, opts), &Tensor::ones([1], opts));
    }

    /// The trainer's update, decided on the device with no read-back: if `loss` and `norm` (the
    /// global gradient norm, `global_grad_norm_on_device`; both one-element tensors on the
    /// flat buffers' device) are finite, AdamW at `lr` on the gradients clipped to `max_norm`
    /// (`clip_factor`'s rule); otherwise nothing changes, the step count included. Returns
    /// 1 (applied) or 0 (skipped), fp64 [1] on the device, for the host to read when it logs.
    pub fn step_if_finite(&mut self, lr: f64, max_norm: f64, loss: &Tensor, norm: &Tensor) -> Tensor {
        let device = self.flat.device();
        let (loss, norm) = (
            loss.to_device(device).to_kind(Kind::Double).reshape([1]),
            norm.to_device(device).to_kind(Kind::Double).reshape([1]),
        );
        let apply = loss.isfinite().logical_and(&norm.isfinite()).to_kind(Kind::Double);
        // clip_factor: min(1, max_norm / (norm + 1e-6)); irrelevant where the step is skipped.
        let scale = ((&norm + 1e-6).reciprocal() * max_norm).clamp_max(1.0);
        self.update(lr, &scale, &apply);
        apply
    }

    /// Read back the number of updates taken.
    pub fn steps(&self) -> u64 {
        self.steps.to_device(tch::Device::Cpu).double_value(&[0]) as u64
    }

    /// Set the number of updates taken (resuming from a checkpoint).
    pub fn set_steps(&mut self, steps: u64) {
        let _ = self.steps.fill_(steps as f64);
    }

    /// The update with the gradients' factor `scale` and `apply` (1 or 0), one-element fp64
    /// tensors on the device. The step count and both bias corrections are computed there too,
    /// so the kernel path runs with nothing read back; the tensor ops (CPU) read the decision.
    fn update(&mut self, lr: f64, scale: &Tensor, apply: &Tensor) {
        let c = self.cfg;
        let _ = self.steps.g_add_(apply);
        let correction = |beta: f64| 1.0 - (&self.steps * beta.ln()).exp();
        let control = Tensor::cat(&[scale, apply, &correction(c.beta1), &correction(c.beta2)], 0);
        let g = self.flat_grad();
        if self.kernel && deberta_model::cuda::kernels_run_on(self.flat.device()) {
            return self.kernel_step(&g, lr, &control.to_kind(Kind::Float));
        }
        let control = Vec::<f64>::try_from(&control.to_device(tch::Device::Cpu)).expect("4 fp64");
        let [grad_scale, apply, bc1, bc2] = [0, 1, 2, 3].map(|i| control[i]);
        if apply == 0.0 {
            return;
        }
        let g = if grad_scale == 1.0 { g } else { g * grad_scale };
        tch::no_grad(|| {
            let _ = self.exp_avg.g_mul_scalar_(c.beta1);
            let _ = self.exp_avg.g_add_(&(&g * (1.0 - c.beta1)));
            let _ = self.exp_avg_sq.g_mul_scalar_(c.beta2);
            let _ = self.exp_avg_sq.g_add_(&(&g * &g * (1.0 - c.beta2)));
            // Decoupled weight decay: p <- p (1 - lr wd) on the runs that take it.
            for &(start, len, _) in self.runs.iter().filter(|r| r.2) {
                let _ = self.flat.narrow(0, start, len).g_mul_scalar_(1.0 - lr * c.weight_decay);
            }
            let denom = (&self.exp_avg_sq / bc2).sqrt() + c.eps;
            let _ = self.flat.g_sub_(&(&self.exp_avg / &denom * (lr / bc1)));
        });
    }

    /// The update as one CUDA kernel (`deberta_model::adamw`) per run of the flat layout, with
    /// weight decay 0 on the runs exempt from it (no per-element mask), and the clip factor,
    /// the skip and the bias corrections read by the kernel from `control`.
    fn kernel_step(&mut self, g: &Tensor, lr: f64, control: &Tensor) {
        let c = self.cfg;
        for &(start, len, decays) in &self.runs {
            let part = |t: &Tensor| t.narrow(0, start, len);
            let update = deberta_model::adamw::Update {
                lr,
                beta1: c.beta1,
                beta2: c.beta2,
                eps: c.eps,
                weight_decay: if decays { c.weight_decay } else { 0.0 },
                // From `control`.
                bias_correction1: 1.0,
                bias_correction2: 1.0,
                grad_scale: 1.0,
            };
            let [p, g, m, v] = [&self.flat, g, &self.exp_avg, &self.exp_avg_sq].map(part);
            let copy = self.copies.as_ref().map(|(c, _)| part(c));
            deberta_model::adamw::step(&p, &g, &m, &v, &update, Some(control), copy.as_ref())
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }

    /// Element count of the flat buffers.
    pub fn len(&self) -> i64 {
        self.flat.numel() as i64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The optimizer state as named tensors (for checkpoints).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        vec![
            ("optimizer.exp_avg".into(), self.exp_avg.shallow_clone()),
            ("optimizer.exp_avg_sq".into(), self.exp_avg_sq.shallow_clone()),
            ("optimizer.steps".into(), Tensor::from_slice(&[self.steps() as i64])),
        ]
    }

    /// Each parameter's (exp_avg, exp_avg_sq) as views of the flat moments, in the order given
    /// to `new` (checkpoints save and restore them by parameter name).
    pub fn moments(&self) -> Vec<(Tensor, Tensor)> {
        self.params
            .iter()
            .map(|(p, o, n)| {
                let shape = p.size();
                (
                    self.exp_avg.narrow(0, *o, *n).view(shape.as_slice()),
                    self.exp_avg_sq.narrow(0, *o, *n).view(shape.as_slice()),
                )
            })
            .collect()
    }

    /// Offsets of each parameter in the flat buffers, in the order given to `new`.
    pub fn layout(&self) -> Vec<(i64, i64)> {
        self.params.iter().map(|(_, o, n)| (*o, *n)).collect()
    }
}

/// Whether the gradient of each (parameter, offset) is the view of `buffer` (fp32) that starts
/// at that offset: what `FlatAdamW::new` made of them, unless something has rebound one since.
pub fn grads_are_views<'a>(params: impl IntoIterator<Item = (&'a Tensor, i64)>, buffer: &Tensor) -> bool {
    let base = buffer.data_ptr() as usize;
    params.into_iter().all(|(p, offset)| {
        let g = p.grad();
        g.defined() && g.data_ptr() as usize == base + 4 * offset as usize
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{OptimizerConfig, VarStore};
    use tch::Device;

    #[test]
    fn schedule_by_hand() {
        // peak 1e-3, 4 warm-up updates, 12 in all.
        let lr = |s| linear_warmup_decay(s, 1e-3, 4, 12);
        let want = [
            0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 8.75e-4, 7.5e-4, 6.25e-4, 5e-4, 3.75e-4, 2.5e-4, 1.25e-4, 0.0,
        ];
        for (s, w) in want.iter().enumerate() {
            assert!((lr(s as u64) - w).abs() < 1e-15, "step {s}: {} vs {w}", lr(s as u64));
        }
        assert_eq!(lr(100), 0.0);
        assert_eq!(linear_warmup_decay(0, 1.0, 0, 10), 1.0);
    }

    /// `for_params`: the gradients are zeroed as the one flat buffer while they are views of
    /// it, and one by one once one of them is not (each way, all of them end at zero).
    #[test]
    fn gradients_are_zeroed_as_the_flat_buffer_or_one_by_one() {
        tch::manual_seed(1);
        let vs = VarStore::new(Device::Cpu);
        let (w, b) = make(&vs);
        let params = crate::grads::Params::new(&vs, 1);
        let opt = FlatAdamW::for_params(&params, AdamWConfig::default());
        let fill = || (w.square().sum(Kind::Float) + b.exp().sum(Kind::Float)).backward();
        let all_zero = || {
            params
                .list
                .iter()
                .all(|(_, p)| p.grad().abs().max().double_value(&[]) == 0.0)
        };
        fill();
        assert!(!all_zero() && opt.grads_are_flat());
        params.zero_grad();
        assert!(all_zero(), "the flat fill left a gradient");
        assert!(opt.grads_are_flat(), "zeroing must keep the views");
        // One gradient rebound to storage of its own: the flat fill would miss it.
        fill();
        let mut g = b.grad();
        g.set_data(&Tensor::ones([7], (Kind::Float, Device::Cpu)));
        assert!(!opt.grads_are_flat());
        params.zero_grad();
        assert!(all_zero(), "the one-by-one fallback left a gradient");
    }

    #[test]
    fn decay_mask_follows_the_official_regex() {
        assert!(decays("deberta.encoder.layer.0.attention.self.query_proj.weight"));
        assert!(decays("deberta.embeddings.word_embeddings.weight"));
        assert!(decays("deberta.encoder.rel_embeddings.weight"));
        assert!(decays("deberta.encoder.conv.conv.weight"));
        assert!(!decays("deberta.encoder.layer.0.attention.self.query_proj.bias"));
        assert!(!decays("deberta.encoder.LayerNorm.weight"));
        assert!(!decays("deberta.embeddings.LayerNorm.bias"));
        assert!(!decays("lm_predictions.lm_head.bias"));
    }

    /// Every parameter and its gradient start at a multiple of `PARAM_ALIGN` elements of the
    /// flat buffers (so at least 16 bytes apart from the allocation's own alignment), sizes 3
    /// and 7 between them included, and keep their values; the gaps hold zeros that AdamW
    /// leaves at zero.
    #[test]
    fn parameters_start_aligned_in_the_flat_buffers_whatever_the_sizes_before_them() {
        tch::manual_seed(2);
        let vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        let names = [
            "head.bias",
            "encoder.LayerNorm.weight",
            "head.weight",
            "encoder.LayerNorm.bias",
        ];
        let shapes: [&[i64]; 4] = [&[3], &[64], &[3, 7], &[64]];
        let ps: Vec<(String, Tensor)> = names
            .iter()
            .zip(shapes)
            .map(|(n, s)| (n.to_string(), root.randn(&n.replace('.', "_"), s, 0.0, 1.0)))
            .collect();
        let before: Vec<Tensor> = ps.iter().map(|(_, p)| p.copy()).collect();
        let mut opt = FlatAdamW::new(&ps, AdamWConfig::default());
        for (((name, p), want), (o, _)) in ps.iter().zip(&before).zip(opt.layout()) {
            assert_eq!(o % PARAM_ALIGN, 0, "{name} at offset {o}");
            assert_eq!(p.data_ptr() as usize % 16, 0, "{name}'s data");
            assert!(p.equal(want), "{name} changed when moved");
        }
        let loss: Tensor = ps.iter().map(|(_, p)| p.square().sum(Kind::Float)).sum();
        loss.backward();
        for (name, p) in &ps {
            assert_eq!(p.grad().data_ptr() as usize % 16, 0, "{name}'s gradient");
        }
        opt.step(1e-2);
        let used: i64 = opt.layout().iter().map(|(_, n)| n).sum();
        let total = opt.flat.abs().sum(Kind::Float).double_value(&[]);
        let params_only: f64 = ps.iter().map(|(_, p)| p.abs().sum(Kind::Float).double_value(&[])).sum();
        assert!(opt.len() > used, "the gaps are there");
        assert!(
            (total - params_only).abs() < 1e-3,
            "a gap moved off zero: {total} against {params_only}"
        );
    }

    fn make(vs: &VarStore) -> (Tensor, Tensor) {
        let root = vs.root();
        (root.randn("w", &[5, 3], 0.0, 1.0), root.randn("b", &[7], 0.0, 1.0))
    }

    #[test]
    fn matches_libtorch_adamw_and_exempts_biases_from_decay() {
        tch::manual_seed(0);
        let (vs_ref, vs_ours) = (VarStore::new(Device::Cpu), VarStore::new(Device::Cpu));
        let (w_ref, b_ref) = make(&vs_ref);
        let (w, b) = make(&vs_ours);
        tch::no_grad(|| {
            w.shallow_clone().copy_(&w_ref);
            b.shallow_clone().copy_(&b_ref);
        });
        let cfg = AdamWConfig::default();
        // libtorch's AdamW decays every parameter; ours exempts biases. Compare the weight to
        // libtorch, and the bias to libtorch with decay off (same moments, no decay term).
        let mut reference = tch::nn::AdamW {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            wd: cfg.weight_decay,
            eps: cfg.eps,
            amsgrad: false,
        }
        .build(&vs_ref, 1e-2)
        .unwrap();
        let vs_nodecay = VarStore::new(Device::Cpu);
        let b_nodecay = vs_nodecay.root().randn("b", &[7], 0.0, 1.0);
        tch::no_grad(|| b_nodecay.shallow_clone().copy_(&b_ref));
        let mut reference_nodecay = tch::nn::AdamW {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            wd: 0.0,
            eps: cfg.eps,
            amsgrad: false,
        }
        .build(&vs_nodecay, 1e-2)
        .unwrap();
        // Gradients exist before the optimizer (as Params::new makes sure), so it rebinds them
        // to its flat buffer.
        (w.sum(Kind::Float) + b.sum(Kind::Float)).backward();
        let mut ours = FlatAdamW::new(
            &[
                ("layer.w".into(), w.shallow_clone()),
                ("layer.bias".into(), b.shallow_clone()),
            ],
            cfg,
        );
        for step in 0..5 {
            let x = Tensor::randn([4, 5], (Kind::Float, Device::Cpu));
            let loss = |w: &Tensor, b: &Tensor| {
                x.matmul(w).sum(Kind::Float).pow_tensor_scalar(2) + b.sin().sum(Kind::Float) * (step as f64 + 1.0)
            };
            reference.zero_grad();
            reference_nodecay.zero_grad();
            loss(&w_ref, &b_ref).backward();
            loss(&w_ref, &b_nodecay).backward();
            reference.step();
            reference_nodecay.step();
            for t in [&w, &b] {
                let mut g = t.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            loss(&w, &b).backward();
            ours.step(1e-2);
        }
        let dw = (&w - &w_ref).abs().max().double_value(&[]);
        let db = (&b - &b_nodecay).abs().max().double_value(&[]);
        assert!(dw < 1e-6, "weight differs from libtorch AdamW by {dw:e}");
        assert!(db < 1e-6, "undecayed bias differs from libtorch AdamW (wd 0) by {db:e}");
        // The parameters really are views of the flat buffer.
        assert_eq!(
            ours.len(),
            2 * PARAM_ALIGN,
            "15 and 7 elements, each in a slot of its own"
        );
        assert!(w.data_ptr() == ours.flat.data_ptr());
        // So are the gradients, and libtorch kept accumulating into them.
        assert!(ours.grads_are_flat());
    }

    #[test]
    fn the_flat_norm_and_the_clip_inside_the_step_equal_the_per_parameter_ones() {
        // Sharded and replicated parameters interleaved by name, so the flat layout reorders them.
        let names = [
            "deberta.encoder.layer.0.attention.output.LayerNorm.weight",
            "deberta.encoder.layer.0.attention.self.query_proj.weight",
            "deberta.encoder.layer.0.attention.self.query_proj.bias",
            "deberta.encoder.rel_embeddings.weight",
            "deberta.encoder.layer.0.output.dense.weight",
        ];
        let make = || {
            tch::manual_seed(3);
            let vs = VarStore::new(Device::Cpu);
            let list: Vec<(String, Tensor)> = names
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    (
                        n.to_string(),
                        vs.root().randn(&format!("p{i}"), &[3 + i as i64, 4], 0.0, 1.0),
                    )
                })
                .collect();
            let loss = list
                .iter()
                .enumerate()
                .fold(Tensor::zeros([], (Kind::Float, Device::Cpu)), |acc, (i, (_, p))| {
                    acc + (p * (i as f64 + 1.0)).sin().sum(Kind::Float)
                });
            loss.backward();
            (vs, list)
        };
        let (_vs_a, a) = make();
        let (_vs_b, b) = make();
        // Reference: per-parameter norms, sharded squares (summed over TP: one rank here) plus
        // replicated ones, then the gradients scaled in place and a plain step.
        let want = a
            .iter()
            .map(|(_, p)| p.grad().norm().double_value(&[]).powi(2))
            .sum::<f64>()
            .sqrt();
        let mut reference = FlatAdamW::new(&a, AdamWConfig::default());
        let mut ours = FlatAdamW::new(&b, AdamWConfig::default());
        let single = deberta_model::collective::Single;
        let got = ours.global_grad_norm(&single);
        assert!((got - want).abs() < 1e-6 * want, "{got} vs {want}");
        assert!(ours.sharded > 0 && ours.sharded < ours.len());
        // The runs tile the buffer, and each parameter lies in a run of its own decay class and
        // part (sharded first): the update decays by run, with no mask.
        let mut end = 0;
        for &(start, len, _) in &ours.runs {
            assert_eq!(start, end, "runs {:?}", ours.runs);
            end += len;
        }
        assert_eq!(end, ours.len());
        assert_eq!(ours.runs.len(), 4, "all four classes are present: {:?}", ours.runs);
        for ((name, _), (o, n)) in b.iter().zip(ours.layout()) {
            let run = ours
                .runs
                .iter()
                .find(|r| r.0 <= o && o + n <= r.0 + r.1)
                .expect("inside a run");
            assert_eq!(run.2, decays(name), "{name}");
            assert_eq!(o < ours.sharded, sharding_of(name) != Sharding::Replicated, "{name}");
        }
        let c = crate::grads::clip_factor(got, 1.0);
        assert!(c < 0.5, "the test wants a real clip: {c}");
        tch::no_grad(|| {
            for (_, p) in &a {
                let _ = p.grad().g_mul_scalar_(c);
            }
        });
        reference.step(1e-2);
        ours.step_clipped(1e-2, c);
        for ((name, x), (_, y)) in a.iter().zip(&b) {
            let d = (x - y).abs().max().double_value(&[]);
            assert!(d < 1e-7, "{name}: {d:e}");
        }
        // The optimizer left our gradients unscaled.
        let g = b[1].1.grad().norm().double_value(&[]);
        assert!((g - a[1].1.grad().norm().double_value(&[]) / c).abs() < 1e-4 * g);
    }

    /// Values in (-2, 2) that depend on `seed` only: not libtorch's generator, which the tests
    /// running beside share (a draw between the two runs a test compares changed one of them).
    fn draws(seed: i64, shape: &[i64]) -> Tensor {
        let n: i64 = shape.iter().product();
        let i = Tensor::arange(n, (Kind::Double, tch::Device::Cpu));
        (((i * 12.9898 + seed as f64 * 78.233).sin() * 43758.5453).frac() * 2.0)
            .to_kind(Kind::Float)
            .reshape(shape)
    }

    /// A weight [rows, cols] (decayed) and a bias [cols] (exempt) drawn from `seed`, with
    /// gradients, in a `FlatAdamW` that updates by the kernel (emulated on the CPU) or the ops.
    fn weight_and_bias(seed: i64, rows: i64, cols: i64, kernel: bool) -> (Tensor, Tensor, FlatAdamW) {
        let w = draws(seed, &[rows, cols]).set_requires_grad(true);
        let b = draws(seed + 1, &[cols]).set_requires_grad(true);
        (w.sum(Kind::Float) + b.sum(Kind::Float)).backward();
        let mut opt = FlatAdamW::new(
            &[("w".into(), w.shallow_clone()), ("x.bias".into(), b.shallow_clone())],
            AdamWConfig::default(),
        );
        opt.kernel = kernel;
        (w, b, opt)
    }

    /// The trainer's step decides on the device: a NaN gradient (so a NaN norm) or a non-finite
    /// loss leaves weights, moments and the step count as they were, in the tensor ops and in
    /// the kernel (emulated); the first applied update is then the one a fresh optimizer takes
    /// (bias corrections of step 1), clipped as `clip_factor` says.
    #[test]
    fn a_non_finite_loss_or_norm_skips_the_update_on_the_device() {
        let single = deberta_model::collective::Single;
        for kernel in [false, true] {
            let make = || {
                let (_, _, opt) = weight_and_bias(4, 301, 7, kernel);
                let g = draws(5, &[opt.len()]) * 3.0;
                (opt, g)
            };
            let state = |o: &FlatAdamW| Tensor::cat(&[&o.flat, &o.exp_avg, &o.exp_avg_sq], 0);
            deberta_model::cuda::emulate_on_cpu(kernel);
            let (mut ours, g) = make();
            let before = state(&ours).copy();
            let one = Tensor::ones([1], (Kind::Double, tch::Device::Cpu));
            let _ = ours.grad.fill_(f64::NAN);
            let nan_norm = ours.global_grad_norm_on_device(&single);
            let skipped_nan = ours.step_if_finite(1e-2, 1.0, &one, &nan_norm);
            ours.grad.copy_(&g);
            let norm = ours.global_grad_norm_on_device(&single);
            let skipped_loss = ours.step_if_finite(1e-2, 1.0, &(&one * f64::INFINITY), &norm);
            assert_eq!(ours.steps(), 0, "kernel {kernel}: a skipped step counted");
            assert_eq!(
                (&state(&ours) - &before).abs().max().double_value(&[]),
                0.0,
                "kernel {kernel}"
            );
            let applied = ours.step_if_finite(1e-2, 1.0, &one, &norm);
            let (mut reference, g_ref) = make();
            reference.grad.copy_(&g_ref);
            let c = crate::grads::clip_factor(reference.global_grad_norm(&single), 1.0);
            assert!(c < 0.5, "the test wants a real clip: {c}");
            reference.step_clipped(1e-2, c);
            deberta_model::cuda::emulate_on_cpu(false);
            let flags: Vec<f64> = [skipped_nan, skipped_loss, applied]
                .iter()
                .map(|t| t.double_value(&[0]))
                .collect();
            assert_eq!(flags, [0.0, 0.0, 1.0], "kernel {kernel}");
            assert_eq!(ours.steps(), 1);
            let d = (state(&ours) - state(&reference)).abs().max().double_value(&[]);
            assert!(d < 1e-7, "kernel {kernel}: {d:e} from one fresh clipped step");
        }
    }

    /// `keep_weight_copies`: after every update the model reads, for each weight, the cast's
    /// bits from the copy. The kernel (emulated) writes them itself (head, float4 body and tail
    /// of a run off 16-byte alignment), checked before anything could rewrite them; after the
    /// tensor ops, or a skipped step, the copies still answer with the cast.
    #[test]
    fn the_weight_copies_hold_the_cast_of_the_updated_weights() {
        use deberta_model::weight_copies::in_kind;
        for kernel in [true, false] {
            let (w, b, mut opt) = weight_and_bias(11, 1001, 37, kernel);
            opt.keep_weight_copies();
            let copy = opt.copies.as_ref().map(|(c, _)| c.shallow_clone()).unwrap();
            deberta_model::cuda::emulate_on_cpu(kernel);
            let one = Tensor::ones([1], (Kind::Double, tch::Device::Cpu));
            for step in 0..3 {
                for t in [&w, &b] {
                    let _ = t.grad().zero_();
                }
                ((&w * (step as f64 + 1.0)).sin().sum(Kind::Float) + b.square().sum(Kind::Float)).backward();
                let norm = opt.global_grad_norm_on_device(&deberta_model::collective::Single);
                let loss = if step == 1 {
                    &one * f64::NAN
                } else {
                    one.shallow_clone()
                };
                let _ = opt.step_if_finite(1e-2, 0.5, &loss, &norm);
                let flat_cast = opt.flat.to_kind(Kind::BFloat16);
                if kernel {
                    assert!(copy.equal(&flat_cast), "step {step}: the kernel left the copies stale");
                }
                for (t, (_, offset, n)) in [&w, &b].into_iter().zip(&opt.params) {
                    let read = tch::no_grad(|| in_kind(t, Kind::BFloat16));
                    assert_eq!(
                        read.data_ptr(),
                        copy.narrow(0, *offset, *n).data_ptr(),
                        "kernel {kernel}"
                    );
                    assert!(read.equal(&t.to_kind(Kind::BFloat16)), "kernel {kernel}, step {step}");
                }
            }
            deberta_model::cuda::emulate_on_cpu(false);
            assert_eq!(opt.steps(), 2, "the NaN step is skipped");
        }
        // Dropping the optimizer forgets its copies (no other test here keeps any).
        assert_eq!(deberta_model::weight_copies::registered(), 0);
    }

    #[test]
    fn the_adamw_kernel_equals_the_tensor_ops_in_the_emulator() {
        // Runs that start off 16-byte alignment (37,037 decayed weights, then 37 exempt
        // biases), so the kernel's head, float4 body and tail all run; 3 steps with a clip factor.
        let run = |kernel: bool| {
            let (w, b, mut opt) = weight_and_bias(9, 1001, 37, kernel);
            deberta_model::cuda::emulate_on_cpu(kernel);
            for step in 0..3 {
                for t in [&w, &b] {
                    let _ = t.grad().zero_();
                }
                ((&w * (step as f64 + 1.0)).sin().sum(Kind::Float) + b.square().sum(Kind::Float)).backward();
                opt.step_clipped(1e-2, 0.7);
            }
            deberta_model::cuda::emulate_on_cpu(false);
            Tensor::cat(
                &[
                    w.detach().reshape([-1]),
                    b.detach(),
                    opt.exp_avg.shallow_clone(),
                    opt.exp_avg_sq.shallow_clone(),
                ],
                0,
            )
        };
        let (kernel, ops) = (run(true), run(false));
        let e = (&kernel - &ops).abs().max().double_value(&[]) / ops.abs().max().double_value(&[]);
        // An element the kernel skipped would keep its old weight and moments.
        assert!(e < 1e-6, "kernel vs tensor ops: {e:e}");
    }
}
