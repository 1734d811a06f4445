//! Input embeddings (spec §2): E = LayerNorm(WordEmb[ids] (+ PosEmb if position-biased)) * mask.

use tch::nn::Path;
use tch::Tensor;

use crate::config::DebertaConfig;
use crate::nn::{embedding_table, LayerNorm};

#[derive(Debug)]
pub struct Embeddings {
    /// [vocab, D]; row `pad_token_id` starts at zero and gets no gradient (HF `padding_idx`).
    pub word_embeddings: Tensor,
    /// [max_position_embeddings, D]: added at the input only when `position_biased_input`; for the
    /// 1.5B model it is the EMD's absolute-position table I (spec §7.1, pitfall 12).
    pub position_embeddings: Option<Tensor>,
    pub layer_norm: LayerNorm,
    pad_token_id: i64,
    position_biased_input: bool,
    dropout: f64,
}

impl Embeddings {
    pub fn new(p: &Path, cfg: &DebertaConfig, with_position_table: bool) -> Embeddings {
        let word_embeddings = embedding_table(
            &(p / "word_embeddings"),
            cfg.vocab_size,
            cfg.hidden_size,
            cfg.initializer_range,
        );
        if (0..cfg.vocab_size).contains(&cfg.pad_token_id) {
            tch::no_grad(|| {
                let _ = word_embeddings.get(cfg.pad_token_id).zero_();
            });
        }
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
            position_embeddings,
            layer_norm: LayerNorm::new(&(p / "LayerNorm"), cfg.hidden_size, cfg.layer_norm_eps),
            pad_token_id: cfg.pad_token_id,
            position_biased_input: cfg.position_biased_input,
            dropout: cfg.hidden_dropout_prob,
        }
    }

    /// Absolute-position rows for positions 0..n: [1, n, D].
    pub fn positions(&self, n: i64) -> Option<Tensor> {
        self.position_embeddings
            .as_ref()
            .map(|table| table.narrow(0, 0, n).unsqueeze(0))
    }

    /// ids: [B, N] int64, mask: [B, N] float {0, 1} -> E: [B, N, D].
    pub fn forward(&self, ids: &Tensor, mask: &Tensor, train: bool) -> Tensor {
        let (_, n) = ids.size2().expect("input ids are [batch, seq]");
        let mut x = Tensor::embedding(&self.word_embeddings, ids, self.pad_token_id, false, false);
        if self.position_biased_input {
            x = x + self
                .positions(n)
                .expect("position-biased input has a position table");
        }
        let e = self.layer_norm.forward(&x) * mask.unsqueeze(-1).to_kind(x.kind());
        e.dropout(self.dropout, train)
    }
}
