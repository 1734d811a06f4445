//! Gradient handling after backward: data-parallel reduction in contiguous flat buckets, the
//! global gradient norm under tensor parallelism, clipping, and a plain SGD step for the test
//! harness (issue D brings the fused flat-buffer AdamW).

use deberta_model::collective::Collective;
use deberta_model::tensor_parallel::{sharding_of, Sharding};
use tch::{Kind, Tensor};

/// Parameters in a fixed order (by name: the same on every rank) with their TP sharding.
pub struct Params {
    pub list: Vec<(String, Tensor)>,
}

impl Params {
    pub fn new(vs: &tch::nn::VarStore) -> Params {
        let mut list: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        list.sort_by(|a, b| a.0.cmp(&b.0));
        // Give every parameter a (zero) gradient now, so buckets never meet an undefined one.
        let touch = list.iter().fold(
            Tensor::zeros([], (Kind::Float, tch::Device::Cpu)),
            |acc, (_, p)| acc + p.sum(Kind::Float).to_device(tch::Device::Cpu) * 0.0,
        );
        touch.backward();
        Params { list }
    }

    pub fn zero_grad(&self) {
        for (_, p) in &self.list {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// Sum each gradient over the DP group, in contiguous buckets of at most `bucket_elems`
    /// elements (one collective per bucket instead of one per parameter). Each rank's loss is
    /// already divided by the global number of predicted tokens, so the sum is the gradient of
    /// the global mean: the data-parallel average, weighted by tokens.
    pub fn reduce_grads(&self, dp: &dyn Collective, bucket_elems: usize) {
        if dp.size() == 1 {
            return;
        }
        let mut start = 0;
        while start < self.list.len() {
            let mut end = start;
            let mut elems = 0;
            while end < self.list.len()
                && (end == start || elems + self.list[end].1.numel() <= bucket_elems)
            {
                elems += self.list[end].1.numel();
                end += 1;
            }
            let grads: Vec<Tensor> = self.list[start..end]
                .iter()
                .map(|(_, p)| p.grad().contiguous().view([-1]))
                .collect();
            let mut flat = Tensor::cat(&grads, 0);
            dp.all_reduce_sum(&mut flat);
            let mut offset = 0;
            for (_, p) in &self.list[start..end] {
                let n = p.numel() as i64;
                let mut g = p.grad();
                tch::no_grad(|| g.copy_(&flat.narrow(0, offset, n).view(p.size().as_slice())));
                offset += n;
            }
            start = end;
        }
    }

    /// The L2 norm of the whole model's gradient: sharded parameters' squares summed over TP,
    /// replicated ones counted once (every TP rank holds the same copy).
    pub fn global_grad_norm(&self, tp: &dyn Collective) -> f64 {
        let mut sharded = Tensor::zeros([1], (Kind::Double, tch::Device::Cpu));
        let mut replicated = Tensor::zeros([1], (Kind::Double, tch::Device::Cpu));
        for (name, p) in &self.list {
            let g = p.grad();
            if !g.defined() {
                continue;
            }
            let sq = g
                .to_kind(Kind::Double)
                .pow_tensor_scalar(2)
                .sum(Kind::Double)
                .to_device(tch::Device::Cpu);
            match sharding_of(name) {
                Sharding::Replicated => replicated += sq,
                _ => sharded += sq,
            }
        }
        tp.all_reduce_sum(&mut sharded);
        (sharded + replicated).double_value(&[0]).sqrt()
    }

    /// Scale gradients so their global norm is at most `max_norm`; returns the factor applied.
    pub fn clip(&self, norm: f64, max_norm: f64) -> f64 {
        let coef = (max_norm / (norm + 1e-6)).min(1.0);
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
