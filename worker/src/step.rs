//! The part of an optimizer step that the trainer and the test harness share: forward and
//! backward over this rank's micro-batches, with the DP reduction of the gradients.

use deberta_model::segments::Tape;
use deberta_model::DebertaV2;
use tch::Tensor;

use crate::grads::Params;
use crate::optim::FlatAdamW;
use crate::runtime::Groups;

/// One micro-batch: ids and attention mask on this rank's device, labels there or on the host
/// (where the model finds the predicted rows without a read-back), each [rows, seq].
pub type Rows = (Tensor, Tensor, Tensor);

/// How the step runs besides its data.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepMode {
    /// bf16 autocast (CUDA).
    pub bf16: bool,
    /// Recompute each segment's activations in backward (`train.recompute`); the dropout of
    /// micro-batch k then comes from per-segment seeds derived from `seed` + k.
    pub recompute: Option<i64>,
}

/// Zero the gradients, then run each micro-batch's segment-wise forward (under bf16 autocast if
/// asked) and backward, each loss being sum(CE) / `predicted` (the global batch's predicted
/// tokens), so accumulation and DP give the gradient of the global mean. Only the last
/// micro-batch's backward reduces over DP, each layer as soon as backward has finished it.
/// Returns the mean loss over the global batch (summed over DP) as fp64 [1] on the device: the
/// host reads it when it logs, so the step does not wait for the device here.
pub fn forward_backward(
    model: &DebertaV2,
    params: &Params,
    groups: &Groups,
    micro: &[Rows],
    predicted: f64,
    mode: StepMode,
) -> Tensor {
    let (tp, dp) = (&*groups.tp, &*groups.dp);
    let bf16 = mode.bf16;
    params.zero_grad();
    deberta_model::profile::mark(|| "step: zero gradients".into());
    // The losses stay on the device: reading one back would stall the host until the device
    // has drained its queue.
    let mut local: Option<Tensor> = None;
    for (k, (ids, mask, labels)) in micro.iter().enumerate() {
        let mut tape = match mode.recompute {
            Some(seed) => Tape::seeded(tp, seed.wrapping_add(k as i64), true, bf16),
            None => Tape::new(tp),
        };
        let loss = deberta_model::nn::autocast(bf16, || {
            model.mlm_loss_segments(&mut tape, ids, mask, labels, 1.0 / predicted, true)
        });
        let value = tape.value(loss).to_kind(tch::Kind::Double);
        local = Some(match local {
            Some(l) => l + value,
            None => value,
        });
        if k + 1 < micro.len() {
            tape.backward(loss);
        } else {
            tape.backward_with(loss, &mut |group| params.reduce_group(group, dp));
            params.reduce_rest(dp);
        }
    }
    deberta_model::profile::mark(|| "step: data-parallel reduction of the rest".into());
    let mut total = match local {
        Some(l) => l.reshape([1]).to_device(groups.device),
        None => Tensor::zeros([1], (tch::Kind::Double, groups.device)),
    };
    dp.all_reduce_sum(&mut total);
    total
}

/// One whole update as the trainer takes it, without its bookkeeping (bench, kernel-check):
/// `forward_backward`, the global norm, then AdamW at `lr` with the clip factor for `max_norm`
/// inside, skipped on the device if the loss or the norm is not finite
/// (`FlatAdamW::step_if_finite`). Nothing is read back. `after(stage)` runs after each of
/// "forward + backward", "grad norm" and "AdamW (clip inside)" (to time them). Returns the
/// loss, fp64 [1] on the device.
#[allow(clippy::too_many_arguments)]
pub fn plain_update(
    model: &DebertaV2,
    params: &Params,
    opt: &mut FlatAdamW,
    groups: &Groups,
    micro: &[Rows],
    predicted: f64,
    mode: StepMode,
    (lr, max_norm): (f64, f64),
    after: &mut dyn FnMut(&'static str),
) -> Tensor {
    let loss = forward_backward(model, params, groups, micro, predicted, mode);
    after("forward + backward");
    let norm = opt.global_grad_norm_on_device(&*groups.tp);
    after("grad norm");
    let _applied = opt.step_if_finite(lr, max_norm, &loss, &norm); // the caller sees a non-finite loss
    after("AdamW (clip inside)");
    loss
}
