//! nGiE: the n-gram induced input encoding (paper §5.3, spec §5), a 1-D convolution over the
//! sequence applied once, beside layer 0:
//!   c  = GELU(Dropout(Conv1d(E) with pads zeroed))     input is the EMBEDDING output E (pitfall 7)
//!   X1 = LN(layer_0(E) + c) * mask

use tch::nn::{Init, Path};
use tch::Tensor;

use crate::config::{Activation, DebertaConfig};
use crate::nn::LayerNorm;

#[derive(Debug)]
pub struct ConvLayer {
    /// [D_out, D_in / groups, k]; cross-correlation, tap 0 sees position t - (k-1)/2.
    pub weight: Tensor,
    pub bias: Tensor,
    pub layer_norm: LayerNorm,
    groups: i64,
    act: Activation,
    dropout: f64,
}

impl ConvLayer {
    pub fn new(p: &Path, cfg: &DebertaConfig) -> ConvLayer {
        let d = cfg.hidden_size;
        let conv = p / "conv";
        ConvLayer {
            weight: conv.var(
                "weight",
                &[d, d / cfg.conv_groups, cfg.conv_kernel_size],
                Init::Randn {
                    mean: 0.0,
                    stdev: cfg.initializer_range,
                },
            ),
            bias: conv.var("bias", &[d], Init::Const(0.0)),
            layer_norm: LayerNorm::new(&(p / "LayerNorm"), d, cfg.layer_norm_eps),
            groups: cfg.conv_groups,
            act: cfg.conv_act,
            dropout: cfg.hidden_dropout_prob,
        }
    }

    /// e: embedding output [B, N, D]; residual: layer-0 output [B, N, D]; mask [B, N] -> [B, N, D].
    pub fn forward(&self, e: &Tensor, residual: &Tensor, mask: &Tensor, train: bool) -> Tensor {
        let k = self.weight.size()[2];
        let m = mask.unsqueeze(-1).to_kind(e.kind()); // [B, N, 1]
        let c = e
            .transpose(1, 2) // [B, D, N]
            .conv1d(&self.weight, Some(&self.bias), [1], [(k - 1) / 2], [1], self.groups)
            .transpose(1, 2) // [B, N, D]
            * &m;
        let c = self.act.apply(&c.dropout(self.dropout, train));
        self.layer_norm.forward(&(residual + c)) * m
    }
}
