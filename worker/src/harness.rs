//! A minimal training step on the distributed runtime (issue C §5; issue D builds the trainer
//! on it): fixed synthetic batches from a seed, the segment-wise forward/backward under TP,
//! gradient reduction over DP (per layer, as soon as backward has finished that layer), the
//! global-norm clip, and plain SGD.
//!
//! Every layout starts from the same full weights (drawn at TP = 1 from the seed, then sliced
//! by the TP plan) and sees the same global batch, so with dropout off every layout must give
//! the losses and parameters of the one-process run (DESIGN.md's invariant).

use deberta_model::collective::Collective;
use deberta_model::tensor_parallel::{gather_full, shard_full, TpShard};
use deberta_model::{DebertaConfig, DebertaV2, Parts, IGNORE_INDEX};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::grads::Params;
use crate::optim::FlatAdamW;
use crate::runtime::Groups;
use crate::step::{forward_backward, Rows, StepMode};

#[derive(Debug, Clone, Copy)]
pub struct HarnessConfig {
    pub seed: i64,
    pub steps: usize,
    pub global_batch: i64,
    pub micro_batch: i64,
    pub seq: i64,
    pub lr: f64,
    pub max_grad_norm: f64,
    /// The forward under bf16 autocast (`StepMode::bf16`).
    pub bf16: bool,
}

impl Default for HarnessConfig {
    fn default() -> Self {
        HarnessConfig {
            seed: 7,
            steps: 3,
            global_batch: 8,
            micro_batch: 2,
            seq: 16,
            lr: 0.05,
            max_grad_norm: 1.0,
            bf16: false,
        }
    }
}

/// The model the multi-rank tests train (`DebertaConfig::toy`).
pub fn test_model_config() -> DebertaConfig {
    DebertaConfig::toy()
}

/// This rank's shard of the model whose full weights are drawn from `seed` at TP = 1.
pub fn build_sharded(cfg: &DebertaConfig, seed: i64, tp: TpShard, device: Device) -> (VarStore, DebertaV2) {
    tch::manual_seed(seed);
    let full_vs = VarStore::new(Device::Cpu);
    DebertaV2::new(&full_vs.root(), cfg, Parts::PRETRAINING).expect("valid test config");
    let full = full_vs.variables();
    let vs = VarStore::new(device);
    let model = DebertaV2::new_tp(&vs.root(), cfg, Parts::PRETRAINING, tp).expect("valid test config");
    load_shards(&vs, &full, cfg.vocab_size, tp);
    (vs, model)
}

/// Copy into every variable of `vs` (a TP shard of a model) its slice of the full weights `full`
/// (by HF name), following the TP plan.
pub fn load_shards(vs: &VarStore, full: &std::collections::HashMap<String, Tensor>, vocab: i64, tp: TpShard) {
    for (name, mut var) in vs.variables() {
        let shard = shard_full(&name, &full[&name], vocab, tp);
        assert_eq!(
            shard.size(),
            var.size(),
            "{name}: the TP plan and the layer shapes disagree"
        );
        tch::no_grad(|| var.copy_(&shard));
    }
}

/// The global batch of `step`: ids, attention mask and labels [G, N] (about 25% of real
/// positions predicted; rows end in 0-3 padding positions).
pub fn synthetic_batch(seed: i64, step: usize, global_batch: i64, seq: i64, vocab: i64) -> (Tensor, Tensor, Tensor) {
    tch::manual_seed(seed * 1_000 + step as i64);
    let opts = (Kind::Int64, Device::Cpu);
    let ids = Tensor::randint_low(4, vocab, [global_batch, seq], opts);
    let lengths = Tensor::arange(global_batch, opts).remainder(4).neg() + seq; // seq, seq-1, ...
    let mask = Tensor::arange(seq, opts)
        .unsqueeze(0)
        .lt_tensor(&lengths.unsqueeze(1))
        .to_kind(Kind::Int64);
    let chosen = Tensor::rand([global_batch, seq], (Kind::Float, Device::Cpu))
        .lt(0.25)
        .logical_and(&mask.gt(0));
    let targets = Tensor::randint_low(4, vocab, [global_batch, seq], opts);
    let labels = targets.where_self(&chosen, &Tensor::full([global_batch, seq], IGNORE_INDEX, opts));
    (ids, mask, labels)
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepResult {
    /// Mean cross-entropy over the predicted tokens of the global batch.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

/// One optimizer step: this rank's micro-batches (its DP slice of the global batch), each loss
/// divided by the global predicted-token count, gradients summed over DP, clipped, SGD.
/// The global norm is the optimizer's (two norm kernels over its flat gradient, as in training),
/// checked against the per-parameter one.
pub fn train_step(
    model: &DebertaV2,
    params: &Params,
    flat: &FlatAdamW,
    groups: &Groups,
    hc: &HarnessConfig,
    step: usize,
) -> StepResult {
    let (dp, device) = (&*groups.dp, groups.device);
    let (ids, mask, labels) = synthetic_batch(hc.seed, step, hc.global_batch, hc.seq, model.cfg.vocab_size);
    let predicted = labels.ne(IGNORE_INDEX).sum(Kind::Int64).int64_value(&[]).max(1) as f64;
    let per_rank = hc.global_batch / dp.size() as i64;
    let micro: Vec<Rows> = (0..per_rank / hc.micro_batch)
        .map(|m| {
            let first = dp.rank() as i64 * per_rank + m * hc.micro_batch;
            let rows = |t: &Tensor| t.narrow(0, first, hc.micro_batch).to_device(device);
            (rows(&ids), rows(&mask), rows(&labels))
        })
        .collect();
    let mode = StepMode {
        bf16: hc.bf16,
        recompute: None,
    };
    let loss = forward_backward(model, params, groups, &micro, predicted, mode)
        .to_device(tch::Device::Cpu)
        .double_value(&[0]);
    let grad_norm = flat.global_grad_norm(&*groups.tp);
    let per_parameter = params.global_grad_norm(&*groups.tp);
    assert!(
        (grad_norm - per_parameter).abs() <= 1e-5 * per_parameter,
        "the flat gradient norm {grad_norm} differs from the per-parameter one {per_parameter}"
    );
    params.clip(grad_norm, hc.max_grad_norm);
    params.sgd_step(hc.lr);
    StepResult { loss, grad_norm }
}

/// Every parameter at full size (collective over the TP group), sorted by name.
pub fn gather_params(vs: &VarStore, vocab: i64, tp: &dyn Collective) -> Vec<(String, Tensor)> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars.into_iter()
        .map(|(name, t)| {
            let full = gather_full(&name, &t, vocab, tp).to_device(Device::Cpu);
            (name, full)
        })
        .collect()
}
