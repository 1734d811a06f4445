//! One post-LN transformer layer (spec §4):
//!   a = LN1(Dropout(Attn(X, Xq) Wo + bo) + Xq)      residual is the QUERY stream (matters in the EMD)
//!   y = LN2(Dropout(GELU(a W1 + b1) W2 + b2) + a)

use tch::nn::Path;
use tch::Tensor;

use crate::attention::{DisentangledSelfAttention, RelativeContext};
use crate::config::{Activation, DebertaConfig};
use crate::nn::{LayerNorm, Linear};

/// Dense + dropout + residual + LayerNorm (HF `SelfOutput` / `Output`).
#[derive(Debug)]
pub struct DenseResidualNorm {
    pub dense: Linear,
    pub layer_norm: LayerNorm,
    dropout: f64,
}

impl DenseResidualNorm {
    fn new(p: &Path, in_dim: i64, cfg: &DebertaConfig) -> Self {
        DenseResidualNorm {
            dense: Linear::new(
                &(p / "dense"),
                in_dim,
                cfg.hidden_size,
                true,
                cfg.initializer_range,
            ),
            layer_norm: LayerNorm::new(&(p / "LayerNorm"), cfg.hidden_size, cfg.layer_norm_eps),
            dropout: cfg.hidden_dropout_prob,
        }
    }

    pub fn forward(&self, x: &Tensor, residual: &Tensor, train: bool) -> Tensor {
        self.layer_norm
            .forward(&(self.dense.forward(x).dropout(self.dropout, train) + residual))
    }
}

#[derive(Debug)]
pub struct Layer {
    /// `attention.self`
    pub attention: DisentangledSelfAttention,
    /// `attention.output`
    pub attention_output: DenseResidualNorm,
    /// `intermediate.dense`
    pub intermediate: Linear,
    /// `output`
    pub output: DenseResidualNorm,
    act: Activation,
}

impl Layer {
    pub fn new(p: &Path, cfg: &DebertaConfig) -> Layer {
        Layer {
            attention: DisentangledSelfAttention::new(&(p / "attention" / "self"), cfg),
            attention_output: DenseResidualNorm::new(
                &(p / "attention" / "output"),
                cfg.all_head_size(),
                cfg,
            ),
            intermediate: Linear::new(
                &(p / "intermediate" / "dense"),
                cfg.hidden_size,
                cfg.intermediate_size,
                true,
                cfg.initializer_range,
            ),
            output: DenseResidualNorm::new(&(p / "output"), cfg.intermediate_size, cfg),
            act: cfg.hidden_act,
        }
    }

    /// x: [B, N, D] keys/values; xq: [B, Nq, D] queries (None = x); mask [B, 1, Nq, N] -> [B, Nq, D].
    pub fn forward(
        &self,
        x: &Tensor,
        xq: Option<&Tensor>,
        rel: Option<&RelativeContext>,
        mask: &Tensor,
        train: bool,
    ) -> Tensor {
        let xq = xq.unwrap_or(x);
        let ctx = self.attention.forward(x, xq, rel, mask, train);
        let a = self.attention_output.forward(&ctx, xq, train);
        let f = self.act.apply(&self.intermediate.forward(&a));
        self.output.forward(&f, &a, train)
    }
}
