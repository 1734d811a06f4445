//! Tensor-parallel building blocks that need communication, written with plain tch ops (tch has
//! no custom autograd functions or hooks; DESIGN.md § Parallelism).
//!
//! | op | forward | backward |
//! |---|---|---|
//! | `reduce_from_tp` ("g") | sum over the TP group | identity |
//! | `vocab_parallel_cross_entropy` | CE over a vocabulary split by rows | exact local-shard gradient |
//!
//! The "f" op (identity forward, all-reduce backward) needs a segment boundary and lives with
//! the segment-wise backward.

use tch::{Kind, Tensor};

use crate::collective::Collective;
use crate::nn::finite_min;

/// This rank's place in its tensor-parallel group; layers allocate their shard from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TpShard {
    pub rank: i64,
    pub size: i64,
}

impl TpShard {
    /// No tensor parallelism: every layer holds its full weight.
    pub const NONE: TpShard = TpShard { rank: 0, size: 1 };

    /// This rank's share of a dimension of `n` (which the layout check made divisible).
    pub fn part(&self, n: i64) -> i64 {
        assert!(n % self.size == 0, "{n} does not divide by tp = {}", self.size);
        n / self.size
    }
}

/// How a parameter is split across the TP group (Megatron's scheme; DESIGN.md § Parallelism).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharding {
    /// Every rank holds the whole tensor (LayerNorms, biases added after a reduction, the
    /// relative table, the conv, the MLM transform, the classifier).
    Replicated,
    /// Split along dim 0 (output features): q/k/v and FFN-in weights and biases.
    Column,
    /// Split along dim 1 (input features): attention-out and FFN-out weights.
    Row,
    /// Split along dim 0 over the padded vocabulary: word embeddings and the MLM bias.
    Vocab,
}

/// The TP plan, by HF parameter name: the one table that layer construction is checked against
/// and that checkpoint slicing and gathering follow.
pub fn sharding_of(name: &str) -> Sharding {
    const COLUMN: [&str; 5] = [
        "query_proj.",
        "key_proj.",
        "value_proj.",
        "pos_key_proj.",
        "pos_query_proj.",
    ];
    if name.contains(".attention.self.") && COLUMN.iter().any(|c| name.contains(c)) {
        return Sharding::Column;
    }
    if name.contains(".intermediate.dense.") {
        return Sharding::Column;
    }
    if name.contains(".layer.") && name.ends_with("output.dense.weight") {
        return Sharding::Row; // attention.output.dense and the FFN's output.dense
    }
    if name.ends_with("embeddings.word_embeddings.weight") || name == "lm_predictions.lm_head.bias" {
        return Sharding::Vocab;
    }
    Sharding::Replicated
}

/// "g": y = sum over the group of x; dy/dx = identity. Written as x + (allreduce(x) - x) on
/// detached values, so autograd sees only `x`. Returns x itself in a group of one.
pub fn reduce_from_tp(x: &Tensor, tp: &dyn Collective) -> Tensor {
    if tp.size() == 1 {
        return x.shallow_clone();
    }
    let local = x.detach();
    let mut total = local.copy();
    tp.all_reduce_sum(&mut total);
    x + (total - local)
}

/// Vocabulary rows padded so every TP rank holds the same number, a multiple of 128
/// (Megatron's `make-vocab-size-divisible-by`): 128100 -> 128128 at tp 1 or 2.
pub fn padded_vocab_size(vocab: i64, tp: i64) -> i64 {
    let multiple = 128 * tp;
    (vocab + multiple - 1) / multiple * multiple
}

/// Per-token cross-entropy [n] of logits whose vocabulary is split across the TP group:
/// `logits_local` [n, V_local] holds columns [vocab_start, vocab_start + V_local) of the full
/// [n, V] logits; `targets` [n] are global ids. loss_i = log sum_v exp(z_iv) - z_i,target.
///
/// The row max (for stability), the sum of exponentials and the target logit are reduced over
/// the group in forward; with "g"'s identity backward, each rank's gradient on its shard is
/// exactly softmax - onehot restricted to the shard, the gradient of the unsplit loss.
pub fn vocab_parallel_cross_entropy(
    logits_local: &Tensor,
    targets: &Tensor,
    vocab_start: i64,
    tp: &dyn Collective,
) -> Tensor {
    vocab_parallel_cross_entropy_padded(logits_local, targets, vocab_start, i64::MAX, tp)
}

/// As `vocab_parallel_cross_entropy`, with the columns of ids >= `vocab_size` (the padding rows
/// of the embedding) left out of the softmax, so padding never changes the loss.
pub fn vocab_parallel_cross_entropy_padded(
    logits_local: &Tensor,
    targets: &Tensor,
    vocab_start: i64,
    vocab_size: i64,
    tp: &dyn Collective,
) -> Tensor {
    let mut logits = logits_local.to_kind(Kind::Float);
    let v_local = logits.size()[1];
    let real = vocab_size.saturating_sub(vocab_start).clamp(0, v_local);
    if real < v_local {
        let column = Tensor::arange(v_local, (Kind::Int64, logits.device()));
        logits = logits.masked_fill(&column.ge(real), finite_min(Kind::Float));
    }
    let mut row_max = logits.detach().amax(-1, true); // [n, 1]
    tp.all_reduce_max(&mut row_max);
    let shifted = logits - row_max;
    let sum_exp = reduce_from_tp(&shifted.exp().sum_dim_intlist(-1, false, Kind::Float), tp); // [n]
    let local_t = targets - vocab_start;
    let here = local_t.ge(0).logical_and(&local_t.lt(v_local));
    let target_local = shifted
        .gather(-1, &local_t.clamp(0, v_local - 1).unsqueeze(-1), false)
        .squeeze_dim(-1)
        * here.to_kind(Kind::Float);
    let target_logit = reduce_from_tp(&target_local, tp);
    sum_exp.log() - target_logit
}

/// This rank's shard of a full tensor (as a single-device model holds it, vocabulary rows
/// padded or not), following the TP plan: the slicing used to load one set of weights into
/// any TP size.
pub fn shard_full(name: &str, full: &Tensor, vocab_size: i64, tp: TpShard) -> Tensor {
    match sharding_of(name) {
        Sharding::Replicated => full.shallow_clone(),
        Sharding::Column => {
            let n = tp.part(full.size()[0]);
            full.narrow(0, tp.rank * n, n)
        }
        Sharding::Row => {
            let n = tp.part(full.size()[1]);
            full.narrow(1, tp.rank * n, n)
        }
        Sharding::Vocab => {
            let rows = tp.part(padded_vocab_size(vocab_size, tp.size));
            let mut shape = full.size();
            shape[0] = rows;
            let out = Tensor::zeros(shape.as_slice(), (full.kind(), full.device()));
            let (lo, hi) = (tp.rank * rows, ((tp.rank + 1) * rows).min(vocab_size));
            if hi > lo {
                tch::no_grad(|| out.narrow(0, 0, hi - lo).copy_(&full.narrow(0, lo, hi - lo)));
            }
            out
        }
    }
}

/// The full tensor from every TP rank's shard (collective over `tp`), vocabulary rows trimmed
/// to `vocab_size`: the inverse of `shard_full`.
pub fn gather_full(name: &str, local: &Tensor, vocab_size: i64, tp: &dyn Collective) -> Tensor {
    let local = local.detach().contiguous();
    match sharding_of(name) {
        Sharding::Replicated => local,
        Sharding::Column => tp.all_gather(&local),
        Sharding::Row => tp
            .all_gather(&local.transpose(0, 1).contiguous())
            .transpose(0, 1)
            .contiguous(),
        Sharding::Vocab => tp.all_gather(&local).narrow(0, 0, vocab_size),
    }
}

/// The full tensor from all TP shards held locally (e.g. read from a checkpoint saved at
/// another TP size), vocabulary rows trimmed to `vocab_size`: `gather_full` without collectives.
pub fn concat_shards(name: &str, shards: &[Tensor], vocab_size: i64) -> Tensor {
    match sharding_of(name) {
        Sharding::Replicated => shards[0].shallow_clone(),
        Sharding::Column => Tensor::cat(shards, 0),
        Sharding::Row => Tensor::cat(shards, 1),
        Sharding::Vocab => Tensor::cat(shards, 0).narrow(0, 0, vocab_size),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::Single;
    use tch::{Device, Reduction};

    #[test]
    fn single_rank_equals_plain_cross_entropy_and_gradient() {
        tch::manual_seed(3);
        let z = (Tensor::randn([12, 50], (Kind::Float, Device::Cpu)) * 4.0).set_requires_grad(true);
        let t = Tensor::randint(50, [12], (Kind::Int64, Device::Cpu));
        let ours = vocab_parallel_cross_entropy(&z, &t, 0, &Single).mean(Kind::Float);
        let g_ours = Tensor::run_backward(&[&ours], &[&z], false, false).pop().unwrap();
        let plain = z.cross_entropy_loss::<Tensor>(&t, None, Reduction::Mean, -100, 0.0);
        let g_plain = Tensor::run_backward(&[&plain], &[&z], false, false).pop().unwrap();
        assert!((ours.double_value(&[]) - plain.double_value(&[])).abs() < 1e-6);
        assert!((g_ours - g_plain).abs().max().double_value(&[]) < 1e-7);
    }

    #[test]
    fn vocab_padding() {
        assert_eq!(padded_vocab_size(128100, 1), 128128);
        assert_eq!(padded_vocab_size(128100, 2), 128256);
        assert_eq!(padded_vocab_size(128100, 4), 128512);
        assert_eq!(padded_vocab_size(256, 2), 256);
    }

    #[test]
    fn shards_concatenate_back_to_the_full_tensor() {
        let w = Tensor::arange(24, (Kind::Float, Device::Cpu)).view([6, 4]);
        let cat = |name: &str, dim: i64| {
            let parts: Vec<Tensor> = (0..2)
                .map(|r| shard_full(name, &w, 5, TpShard { rank: r, size: 2 }))
                .collect();
            Tensor::cat(&parts, dim)
        };
        let col = "deberta.encoder.layer.0.attention.self.query_proj.weight";
        let row = "deberta.encoder.layer.0.output.dense.weight";
        assert_eq!(sharding_of(col), Sharding::Column);
        assert_eq!(sharding_of(row), Sharding::Row);
        assert_eq!(
            sharding_of("deberta.encoder.layer.0.output.dense.bias"),
            Sharding::Replicated
        );
        assert_eq!(sharding_of("lm_predictions.lm_head.dense.weight"), Sharding::Replicated);
        assert!(cat(col, 0).equal(&w));
        assert!(cat(row, 1).equal(&w));
        // Vocabulary 5 of 6 rows, padded to 256 at tp 2: rank 0 holds rows 0..128 (5 real).
        let v = cat("deberta.embeddings.word_embeddings.weight", 0);
        assert_eq!(v.size(), [256, 4]);
        assert!(v.narrow(0, 0, 5).equal(&w.narrow(0, 0, 5)));
        assert_eq!(v.narrow(0, 5, 251).abs().sum(Kind::Float).double_value(&[]), 0.0);
        assert!(gather_full(col, &w, 5, &Single).equal(&w));
    }
}
