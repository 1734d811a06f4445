//! The encoder (spec §6): L layers over E, the relative table shared by all of them, and the
//! nGiE conv after layer 0. It returns every layer's output, because the enhanced mask decoder
//! reads the input of the last layer (outs[-2]).

use tch::nn::Path;
use tch::Tensor;

use crate::attention::{attention_mask, RelativeContext};
use crate::config::DebertaConfig;
use crate::conv::ConvLayer;
use crate::layer::Layer;
use crate::nn::{embedding_table, LayerNorm};
use crate::rel_pos::relative_index;
use crate::tensor_parallel::TpShard;

#[derive(Debug)]
pub struct Encoder {
    pub layers: Vec<Layer>,
    /// E_rel: [2S, D] (`rel_embeddings.weight`).
    pub rel_embeddings: Option<Tensor>,
    /// LayerNorm on E_rel (`encoder.LayerNorm`), applied once per forward (pitfall 4).
    pub rel_layer_norm: Option<LayerNorm>,
    pub conv: Option<ConvLayer>,
    cfg: DebertaConfig,
}

impl Encoder {
    pub fn new(p: &Path, cfg: &DebertaConfig, tp: TpShard) -> Encoder {
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(&(p / "layer" / i), cfg, tp))
            .collect();
        let rel_embeddings = cfg.relative_attention.then(|| {
            embedding_table(
                &(p / "rel_embeddings"),
                cfg.rel_table_rows(),
                cfg.hidden_size,
                cfg.initializer_range,
            )
        });
        Encoder {
            layers,
            rel_embeddings,
            rel_layer_norm: (cfg.relative_attention && cfg.norm_rel_ebd)
                .then(|| LayerNorm::new(&(p / "LayerNorm"), cfg.hidden_size, cfg.layer_norm_eps)),
            conv: (cfg.conv_kernel_size > 0).then(|| ConvLayer::new(&(p / "conv"), cfg)),
            cfg: cfg.clone(),
        }
    }

    /// R = LN_rel(E_rel) and rel_idx for a q_len x k_len attention.
    pub fn relative_context(&self, q_len: i64, k_len: i64) -> Option<RelativeContext> {
        let table = self.relative_table()?;
        let rel_idx = relative_index(&self.cfg, q_len, k_len, table.device());
        Some(RelativeContext { table, rel_idx })
    }

    /// R = LN_rel(E_rel): [2S, D].
    pub fn relative_table(&self) -> Option<Tensor> {
        let table = self.rel_embeddings.as_ref()?;
        Some(match &self.rel_layer_norm {
            Some(ln) => ln.forward(table),
            None => table.shallow_clone(),
        })
    }

    /// e: [B, N, D], mask: [B, N] float -> the L layer outputs (post-conv for layer 0), each [B, N, D].
    pub fn forward(&self, e: &Tensor, mask: &Tensor, train: bool) -> Vec<Tensor> {
        let n = e.size()[1];
        let rel = self.relative_context(n, n);
        let att_mask = attention_mask(mask, mask); // [B, 1, N, N]
        let mut outs: Vec<Tensor> = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let x = outs.last().unwrap_or(e);
            let mut y = layer.forward(x, None, rel.as_ref(), &att_mask, train);
            if i == 0 {
                if let Some(conv) = &self.conv {
                    y = conv.forward(e, &y, mask, train);
                }
            }
            outs.push(y);
        }
        outs
    }
}
