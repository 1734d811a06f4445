//! The enhanced mask decoder and the MLM head, as in the official code (spec §7.1, paper §3.2):
//!   q_0 = I + H_{L-1}                  I = absolute position rows (raw), H_{L-1} = outs[-2]
//!   q_k = layer_{L-1}(kv = H_{L-1}, query = q_{k-1}),  k = 1, 2   (the last layer, shared weights)
//!   logits = LN(GELU(q_2 W + b)) E_word^T + b_vocab             decoder tied to word embeddings
//!
//! Training needs the logits at the predicted positions only, and each EMD query row reads the
//! keys and values of every position but no other query row: the loss runs the EMD and the head
//! on the predicted rows alone (`Predicted`), ~15% of the queries.

use tch::nn::{Init, Path};
use tch::{Device, Kind, Tensor};

use crate::attention::{attention_mask, RelativeContext};
use crate::config::{Activation, DebertaConfig};
use crate::encoder::Encoder;
use crate::model::IGNORE_INDEX;
use crate::nn::{LayerNorm, Linear};
use crate::tensor_parallel::{padded_vocab_size, TpShard};

/// Number of EMD passes through the last layer (official n = 2).
pub const EMD_STEPS: usize = 2;

/// Query states for the MLM head: [B, N, D]. `positions` is I ([1, N, D]); None means the model
/// adds absolute positions at the input, where the EMD degenerates to the final layer's output.
pub fn enhanced_mask_decoder(
    encoder: &Encoder,
    outs: &[Tensor],
    positions: Option<&Tensor>,
    mask: &Tensor,
    train: bool,
) -> Tensor {
    let Some(positions) = positions else {
        return outs.last().expect("at least one layer").shallow_clone();
    };
    let h_kv = &outs[outs.len() - 2]; // input of the last layer
    let n = h_kv.size()[1];
    let rel = encoder.relative_context(n, n);
    let att_mask = attention_mask(mask, mask);
    let last = encoder.layers.last().expect("at least one layer");
    let mut q = positions + h_kv;
    for _ in 0..EMD_STEPS {
        q = last.forward(h_kv, Some(&q), rel.as_ref(), &att_mask, train);
    }
    q
}

/// The predicted positions of a batch: per row in ascending order, padded to the row with the
/// most (M, at least 1), so the EMD can attend per row with M query rows instead of N.
#[derive(Debug)]
pub struct Predicted {
    /// Positions [B, M] int64; padding entries point at position 0.
    pub pos: Tensor,
    /// [B, M] bool: the entry is a predicted position.
    pub valid: Tensor,
    /// Flat indices of the valid entries of [B * M]: the predicted tokens in the order of
    /// `labels != IGNORE_INDEX` (row-major), the order of `targets`.
    pub sel: Tensor,
    /// The labels of the predicted tokens [n_predicted].
    pub targets: Tensor,
}

impl Predicted {
    /// From MLM labels [B, N] (`IGNORE_INDEX` where nothing is predicted).
    pub fn of(labels: &Tensor) -> Predicted {
        let (b, n) = labels.size2().expect("labels are [batch, seq]");
        let predicted = labels.ne(IGNORE_INDEX); // [B, N]
        let counts = predicted.sum_dim_intlist(1, false, Kind::Int64); // [B]
        let m = counts.max().int64_value(&[]).max(1);
        // Predicted positions first, each group in position order: sort by (!predicted, j).
        let key = predicted.logical_not().to_kind(Kind::Int64) * n
            + Tensor::arange(n, (Kind::Int64, labels.device())).unsqueeze(0);
        let pos = key.argsort(1, false).narrow(1, 0, m); // [B, M]
        let valid = Tensor::arange(m, (Kind::Int64, labels.device()))
            .unsqueeze(0)
            .lt_tensor(&counts.unsqueeze(1)); // [B, M]
        let sel = valid.reshape([-1]).nonzero().squeeze_dim(1);
        let targets = labels.gather(1, &pos, false).reshape([-1]).index_select(0, &sel);
        debug_assert_eq!(pos.size(), [b, m]);
        Predicted {
            pos,
            valid,
            sel,
            targets,
        }
    }

    /// The same on `device` (`cuda::host_to_device`): computed from labels on the host, the
    /// predicted rows need no read-back from the device.
    pub fn to_device(self, device: Device) -> Predicted {
        let on = |t: &Tensor| crate::cuda::host_to_device(t, device);
        Predicted {
            pos: on(&self.pos),
            valid: on(&self.valid),
            sel: on(&self.sel),
            targets: on(&self.targets),
        }
    }

    /// The valid rows and their positions among the [B·N] tokens of a sequence of length n, as
    /// the fused path places the EMD's queries (`attention::QueryRows`).
    pub fn query_rows(&self, n: i64) -> crate::attention::QueryRows {
        let (b, _) = self.pos.size2().expect("[B, M]");
        let first = Tensor::arange(b, (Kind::Int64, self.pos.device())).unsqueeze(1) * n;
        crate::attention::QueryRows {
            sel: self.sel.shallow_clone(),
            at: (&self.pos + first).reshape([-1]).index_select(0, &self.sel),
        }
    }

    /// x [B, N, D] -> its rows at the predicted positions [B, M, D].
    pub fn rows(&self, x: &Tensor) -> Tensor {
        let (b, m) = self.pos.size2().expect("[B, M]");
        let d = x.size()[2];
        x.gather(1, &self.pos.unsqueeze(-1).expand([b, m, d], false), false)
    }

    /// The EMD's attention from the predicted rows to every key: the relative index of each
    /// (query row, key) pair [B, 1, M, N], from the encoder's [N, N] one, and the mask
    /// [B, 1, M, N] (a query row is live if it is a predicted, unpadded position).
    pub fn attention(&self, rel_idx: Option<&Tensor>, mask: &Tensor) -> (Option<Tensor>, Tensor) {
        let (b, m) = self.pos.size2().expect("[B, M]");
        let q_mask = mask.gather(1, &self.pos, false).to_kind(Kind::Float) * self.valid.to_kind(Kind::Float);
        let att_mask = attention_mask(&q_mask, mask); // [B, 1, M, N]
        let rel_idx = rel_idx.map(|idx| {
            let n = idx.size()[1];
            idx.index_select(0, &self.pos.reshape([-1])).view([b, 1, m, n])
        });
        (rel_idx, att_mask)
    }
}

/// The EMD at the predicted positions only: query states [B, M, D], row (b, m) equal to
/// `enhanced_mask_decoder`'s row (b, pos[b, m]).
pub fn enhanced_mask_decoder_at(
    encoder: &Encoder,
    outs: &[Tensor],
    positions: Option<&Tensor>,
    mask: &Tensor,
    at: &Predicted,
    train: bool,
) -> Tensor {
    let Some(positions) = positions else {
        return at.rows(outs.last().expect("at least one layer"));
    };
    let h_kv = &outs[outs.len() - 2]; // input of the last layer
    let n = h_kv.size()[1];
    let rel = encoder.relative_context(n, n);
    let (rel_idx, att_mask) = at.attention(rel.as_ref().map(|r| &r.rel_idx), mask);
    let rel = rel.zip(rel_idx).map(|(r, rel_idx)| RelativeContext {
        table: r.table,
        rel_idx,
    });
    let last = encoder.layers.last().expect("at least one layer");
    let mut q = at.rows(&positions.expand_as(h_kv)) + at.rows(h_kv);
    for _ in 0..EMD_STEPS {
        q = last.forward(h_kv, Some(&q), rel.as_ref(), &att_mask, train);
    }
    q
}

/// `lm_predictions.lm_head`: dense D->D, activation, LayerNorm, then the decoder tied to this
/// rank's rows of the (padded, vocab-parallel) word embeddings, + bias.
#[derive(Debug)]
pub struct MlmHead {
    pub dense: Linear,
    pub layer_norm: LayerNorm,
    /// This rank's slice of the vocabulary bias [V_p / tp].
    pub bias: Tensor,
    act: Activation,
}

impl MlmHead {
    pub fn new(p: &Path, cfg: &DebertaConfig, tp: TpShard) -> MlmHead {
        let rows = tp.part(padded_vocab_size(cfg.vocab_size, tp.size));
        MlmHead {
            dense: Linear::new(
                &(p / "dense"),
                cfg.hidden_size,
                cfg.hidden_size,
                true,
                cfg.initializer_range,
            ),
            layer_norm: LayerNorm::new(&(p / "LayerNorm"), cfg.hidden_size, cfg.layer_norm_eps),
            bias: p.var("bias", &[rows], Init::Const(0.0)),
            act: cfg.hidden_act,
        }
    }

    /// The replicated transform: LN(act(h W + b)), [.., D].
    pub fn transform(&self, h: &Tensor) -> Tensor {
        self.layer_norm.forward(&self.act.apply(&self.dense.forward(h)))
    }

    /// Logits over this rank's vocabulary rows [.., V_p / tp] (padding columns included).
    pub fn decode_local(&self, t: &Tensor, word_embeddings_local: &Tensor) -> Tensor {
        t.matmul(&word_embeddings_local.tr()) + &self.bias
    }

    /// h: [.., D] -> logits [.., V_p / tp].
    pub fn forward(&self, h: &Tensor, word_embeddings_local: &Tensor) -> Tensor {
        self.decode_local(&self.transform(h), word_embeddings_local)
    }
}
