//! Gradient handling after backward: data-parallel reduction in contiguous flat buckets, the
//! global gradient norm under tensor parallelism, clipping, and a plain SGD step for the test
//! harness (issue D brings the fused flat-buffer AdamW).

use std::cell::RefCell;

use deberta_model::collective::Collective;
use deberta_model::model::grad_group;
use deberta_model::tensor_parallel::{sharding_of, Sharding};
use tch::{Kind, Tensor};

/// Parameters in a fixed order (by name: the same on every rank), with the group each belongs
/// to for the early data-parallel reduction (`deberta_model::model::grad_group`).
pub struct Params {
    pub list: Vec<(String, Tensor)>,
    group: Vec<Option<usize>>,
    /// The optimizer's flat gradient buffer and each parameter's offset in it
    /// (`FlatAdamW::for_params`): while every `.grad` is its view, `zero_grad` clears it with
    /// one fill.
    flat_grad: RefCell<Option<(Tensor, Vec<i64>)>>,
    /// Which gradients the current step has reduced over DP (each exactly once).
    reduced: RefCell<Vec<bool>>,
}

impl Params {
    pub fn new(vs: &tch::nn::VarStore, num_hidden_layers: i64) -> Params {
        let mut list: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        list.sort_by(|a, b| a.0.cmp(&b.0));
        // Give every parameter a (zero) gradient now, so buckets never meet an undefined one.
        let touch = list
            .iter()
            .fold(Tensor::zeros([], (Kind::Float, tch::Device::Cpu)), |acc, (_, p)| {
                acc + p.sum(Kind::Float).to_device(tch::Device::Cpu) * 0.0
            });
        touch.backward();
        let group = list.iter().map(|(n, _)| grad_group(n, num_hidden_layers)).collect();
        let reduced = RefCell::new(vec![false; list.len()]);
        Params {
            list,
            group,
            reduced,
            flat_grad: RefCell::new(None),
        }
    }

    /// Zero the gradients as `buffer` (the optimizer's flat one; `offsets` in the order of
    /// `list`) from now on, while every gradient is its view there.
    pub fn set_flat_grad(&self, buffer: Tensor, offsets: Vec<i64>) {
        assert_eq!(offsets.len(), self.list.len(), "one offset per parameter");
        *self.flat_grad.borrow_mut() = Some((buffer, offsets));
    }

    /// Zero every gradient: one fill of the flat buffer while they all are views of it (one
    /// kernel, where one per parameter made ~800 launches a step at 1.5B), else one by one.
    pub fn zero_grad(&self) {
        if let Some((flat, offsets)) = self.flat_grad.borrow().as_ref() {
            let params = self.list.iter().map(|(_, p)| p).zip(offsets.iter().copied());
            if crate::optim::grads_are_views(params, flat) {
                let _ = flat.shallow_clone().zero_();
                return;
            }
        }
        for (_, p) in &self.list {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// Sum the gradients of parameter group `key` over the DP group (called by the tape as soon
    /// as that group's gradients are final, so it overlaps the rest of backward).
    pub fn reduce_group(&self, key: usize, dp: &dyn Collective) {
        self.reduce_where(dp, |i| self.group[i] == Some(key));
    }

    /// Sum every gradient not reduced yet (the groups only final at the end of backward).
    pub fn reduce_rest(&self, dp: &dyn Collective) {
        let done = self.reduced.borrow().clone();
        self.reduce_where(dp, |i| !done[i]);
        let mut flags = self.reduced.borrow_mut();
        assert!(
            flags.iter().all(|&d| d),
            "a gradient escaped the data-parallel reduction"
        );
        flags.iter_mut().for_each(|d| *d = false); // ready for the next step
    }

    /// Sum the selected gradients over DP in contiguous flat buckets of at most `BUCKET_ELEMS`
    /// elements (one collective per bucket, not per parameter). Each rank's loss is already
    /// divided by the global number of predicted tokens, so the sum is the gradient of the
    /// global mean: the data-parallel average, weighted by tokens.
    fn reduce_where(&self, dp: &dyn Collective, select: impl Fn(usize) -> bool) {
        let chosen: Vec<usize> = (0..self.list.len()).filter(|&i| select(i)).collect();
        {
            let mut flags = self.reduced.borrow_mut();
            for &i in &chosen {
                assert!(!flags[i], "{} reduced twice in one step", self.list[i].0);
                flags[i] = true;
            }
        }
        if dp.size() == 1 {
            return;
        }
        for bucket in buckets(&chosen, |i| self.list[i].1.numel()) {
            let grads: Vec<Tensor> = bucket
                .iter()
                .map(|&i| self.list[i].1.grad().contiguous().view([-1]))
                .collect();
            let mut flat = Tensor::cat(&grads, 0);
            dp.all_reduce_sum(&mut flat);
            let mut offset = 0;
            for &i in &bucket {
                let p = &self.list[i].1;
                let n = p.numel() as i64;
                let mut g = p.grad();
                tch::no_grad(|| g.copy_(&flat.narrow(0, offset, n).view(p.size().as_slice())));
                offset += n;
            }
        }
    }

    /// The L2 norm of the whole model's gradient: sharded parameters' squares summed over TP,
    /// replicated ones counted once (every TP rank holds the same copy).
    pub fn global_grad_norm(&self, tp: &dyn Collective) -> f64 {
        let device = self.list.first().map(|(_, p)| p.device()).unwrap_or(tch::Device::Cpu);
        // One norm kernel per gradient (no full-size temporaries), squared and summed in fp64.
        let (mut sharded, mut replicated) = (Vec::new(), Vec::new());
        for (name, p) in &self.list {
            let g = p.grad();
            if !g.defined() {
                continue;
            }
            match sharding_of(name) {
                Sharding::Replicated => replicated.push(g.norm()),
                _ => sharded.push(g.norm()),
            }
        }
        let sum_sq = |norms: &[Tensor]| match norms {
            [] => Tensor::zeros([1], (Kind::Double, device)),
            _ => Tensor::stack(norms, 0)
                .to_kind(Kind::Double)
                .square()
                .sum(Kind::Double)
                .reshape([1]),
        };
        let mut sharded = sum_sq(&sharded);
        tp.all_reduce_sum(&mut sharded);
        (sharded + sum_sq(&replicated))
            .to_device(tch::Device::Cpu)
            .double_value(&[0])
            .sqrt()
    }

    /// Scale gradients so their global norm is at most `max_norm`; returns the factor applied.
    /// (The AdamW step applies the factor itself: `FlatAdamW::step_clipped`.)
    pub fn clip(&self, norm: f64, max_norm: f64) -> f64 {
        let coef = clip_factor(norm, max_norm);
        if coef < 1.0 {
            for (_, p) in &self.list {
                let mut g = p.grad();
                if g.defined() {
                    let _ = tch::no_grad(|| g.g_mul_scalar_(coef));
                }
            }
        }
        coef
    }

    /// p <- p - lr * grad.
    pub fn sgd_step(&self, lr: f64) {
        tch::no_grad(|| {
            for (_, p) in &self.list {
                let g = p.grad();
                if g.defined() {
                    let mut p = p.shallow_clone();
                    let _ = p.g_sub_(&(g * lr));
                }
            }
        });
    }
}

/// The factor that brings a gradient of global norm `norm` to at most `max_norm`
/// (torch.nn.utils.clip_grad_norm_'s).
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    (max_norm / (norm + 1e-6)).min(1.0)
}

/// Elements per data-parallel bucket (4M f32 = 16 MiB).
pub const BUCKET_ELEMS: usize = 4 << 20;

/// Consecutive runs of `items` holding at most `BUCKET_ELEMS` elements (a larger item is a
/// bucket of its own).
fn buckets(items: &[usize], size: impl Fn(usize) -> usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut elems = 0;
    for &i in items {
        let n = size(i);
        match out.last_mut() {
            Some(b) if elems + n <= BUCKET_ELEMS => {
                b.push(i);
                elems += n;
            }
            _ => {
                out.push(vec![i]);
                elems = n;
            }
        }
    }
    out
}
