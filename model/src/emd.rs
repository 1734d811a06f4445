//! The enhanced mask decoder and the MLM head, as in the official code (spec §7.1, paper §3.2):
//!   q_0 = I + H_{L-1}                  I = absolute position rows (raw), H_{L-1} = outs[-2]
//!   q_k = layer_{L-1}(kv = H_{L-1}, query = q_{k-1}),  k = 1, 2   (the last layer, shared weights)
//!   logits = LN(GELU(q_2 W + b)) E_word^T + b_vocab             decoder tied to word embeddings

use tch::nn::{Init, Path};
use tch::Tensor;

use crate::attention::attention_mask;
use crate::config::{Activation, DebertaConfig};
use crate::encoder::Encoder;
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
