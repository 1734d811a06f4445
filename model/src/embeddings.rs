//! Input embeddings (spec §2): E = LayerNorm(WordEmb[ids] (+ PosEmb if position-biased)) * mask.
//!
//! The word table is vocab-parallel (Megatron's `VocabParallelEmbedding`): the vocabulary is
//! padded to a multiple of 128·tp rows and rank r holds rows [r·V_p/tp, (r+1)·V_p/tp). A rank
//! looks up the ids in its range, zeroes the others, and the partial lookups are summed over
//! TP ("g"). Padding rows are never looked up, and the decoder masks their logits.

use tch::nn::Path;
use tch::{Kind, Tensor};

use crate::config::DebertaConfig;
use crate::layer::no_reduce;
use crate::nn::{embedding_table, LayerNorm};
use crate::tensor_parallel::{padded_vocab_size, TpShard};

#[derive(Debug)]
pub struct Embeddings {
    /// This rank's rows of the padded table [V_p / tp, D]; the row of `pad_token_id` starts at
    /// zero and gets no gradient from the lookup (HF `padding_idx`), the padding rows are zero.
    pub word_embeddings: Tensor,
    /// First vocabulary id of this rank's rows.
    pub vocab_start: i64,
    /// [max_position_embeddings, D], replicated: added at the input only when
    /// `position_biased_input`; for the 1.5B model it is the EMD's absolute-position table I
    /// (spec §7.1, pitfall 12).
    pub position_embeddings: Option<Tensor>,
    pub layer_norm: LayerNorm,
    pad_token_id: i64,
    position_biased_input: bool,
    dropout: f64,
    /// No TP: this rank holds every row, the lookup needs no masking.
    whole_vocab: bool,
    /// SiFT (spec §10): the summed embeddings are normalised by a LayerNorm without affine
    /// parameters before the model's own LayerNorm, in training and evaluation alike (pitfall 20).
    pub sift_prenorm: bool,
}

/// SiFT's LN₀ epsilon (spec §10).
const SIFT_EPS: f64 = 1e-7;

impl Embeddings {
    pub fn new(p: &Path, cfg: &DebertaConfig, with_position_table: bool, tp: TpShard) -> Embeddings {
        let rows = tp.part(padded_vocab_size(cfg.vocab_size, tp.size));
        let vocab_start = tp.rank * rows;
        let word_embeddings = embedding_table(&(p / "word_embeddings"), rows, cfg.hidden_size, cfg.initializer_range);
        tch::no_grad(|| {
            let real = (cfg.vocab_size - vocab_start).clamp(0, rows);
            let _ = word_embeddings.narrow(0, real, rows - real).zero_();
            let pad_local = cfg.pad_token_id - vocab_start;
            if (0..rows).contains(&pad_local) {
                let _ = word_embeddings.get(pad_local).zero_();
            }
        });
        let position_embeddings = (with_position_table || cfg.position_biased_input).then(|| {
            embedding_table(
                &(p / "position_embeddings"),
                cfg.max_position_embeddings,
                cfg.hidden_size,
                cfg.initializer_range,
            )
        });
        Embeddings {
            word_embeddings,
            vocab_start,
            position_embeddings,
            layer_norm: LayerNorm::new(&(p / "LayerNorm"), cfg.hidden_size, cfg.layer_norm_eps),
            pad_token_id: cfg.pad_token_id,
            position_biased_input: cfg.position_biased_input,
            dropout: cfg.hidden_dropout_prob,
            whole_vocab: tp.size == 1,
            sift_prenorm: false,
        }
    }

    /// Absolute-position rows for positions 0..n: [1, n, D].
    pub fn positions(&self, n: i64) -> Option<Tensor> {
        self.position_embeddings
            .as_ref()
            .map(|table| table.narrow(0, 0, n).unsqueeze(0))
    }

    /// This rank's part of WordEmb[ids]: rows of ids outside its range are zero. [B, N, D]
    pub fn lookup_local(&self, ids: &Tensor) -> Tensor {
        let rows = self.word_embeddings.size()[0];
        let local = ids - self.vocab_start;
        let pad_local = self.pad_token_id - self.vocab_start;
        let padding_idx = if (0..rows).contains(&pad_local) { pad_local } else { -1 };
        if self.whole_vocab {
            return Tensor::embedding(&self.word_embeddings, ids, padding_idx, false, false);
        }
        let here = local.ge(0).logical_and(&local.lt(rows));
        let x = Tensor::embedding(
            &self.word_embeddings,
            &local.clamp(0, rows - 1),
            padding_idx,
            false,
            false,
        );
        x * here.unsqueeze(-1).to_kind(Kind::Float)
    }

    /// ids: [B, N] int64, mask: [B, N] float {0, 1} -> E: [B, N, D]; `g` sums the partial lookups
    /// over TP (identity without TP).
    pub fn forward_tp(&self, ids: &Tensor, mask: &Tensor, g: &dyn Fn(&Tensor) -> Tensor, train: bool) -> Tensor {
        self.forward_perturbed(ids, mask, g, train, None)
    }

    /// `forward_tp` with SiFT's adversarial perturbation `delta` [B, N, D] added to the
    /// normalised embeddings (needs `sift_prenorm`).
    pub fn forward_perturbed(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        g: &dyn Fn(&Tensor) -> Tensor,
        train: bool,
        delta: Option<&Tensor>,
    ) -> Tensor {
        let (_, n) = ids.size2().expect("input ids are [batch, seq]");
        let mut x = g(&self.lookup_local(ids));
        if self.position_biased_input {
            x = x + self.positions(n).expect("position-biased input has a position table");
        }
        if self.sift_prenorm {
            let d = x.size()[2];
            x = x.layer_norm([d], None::<&Tensor>, None::<&Tensor>, SIFT_EPS, false);
            if let Some(delta) = delta {
                x = x + delta;
            }
        } else {
            assert!(delta.is_none(), "a SiFT perturbation needs sift_prenorm");
        }
        let e = self.layer_norm.forward(&x) * mask.unsqueeze(-1).to_kind(x.kind());
        e.dropout(self.dropout, train)
    }

    /// The embeddings without tensor parallelism.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor, train: bool) -> Tensor {
        self.forward_tp(ids, mask, &no_reduce, train)
    }
}
