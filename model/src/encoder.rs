//! The encoder (spec §6): L layers over E, the relative table shared by all of them, and the
//! nGiE conv after layer 0. It returns every layer's output, because the enhanced mask decoder
//! reads the input of the last layer (outs[-2]).

use std::sync::Mutex;

use tch::nn::Path;
use tch::{Device, Kind, Tensor};

use crate::attention::{attention_mask, RelativeContext, RowPicks};
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
    /// rel_idx per (q_len, k_len, device), built once: copying it from the host at every forward
    /// would wait for the device each time.
    rel_index: Mutex<Vec<(i64, i64, Device, Tensor)>>,
    /// The relative tables' row picks per (N, device, compute kind), built once.
    picks: Mutex<Vec<(i64, Device, Kind, RowPicks)>>,
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
            rel_index: Mutex::new(Vec::new()),
            picks: Mutex::new(Vec::new()),
        }
    }

    /// R = LN_rel(E_rel) and rel_idx for a q_len x k_len attention.
    pub fn relative_context(&self, q_len: i64, k_len: i64) -> Option<RelativeContext> {
        let table = self.relative_table()?;
        let rel_idx = self.relative_index(q_len, k_len)?;
        Some(RelativeContext { table, rel_idx })
    }

    /// rel_idx ([q_len, k_len] int64, `rel_pos::relative_index`) on the relative table's device,
    /// from the cache after the first call for the shape.
    pub fn relative_index(&self, q_len: i64, k_len: i64) -> Option<Tensor> {
        let device = self.rel_embeddings.as_ref()?.device();
        let mut cache = self.rel_index.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((.., t)) = cache.iter().find(|c| (c.0, c.1, c.2) == (q_len, k_len, device)) {
            return Some(t.shallow_clone());
        }
        let t = relative_index(&self.cfg, q_len, k_len, device);
        cache.push((q_len, k_len, device, t.shallow_clone()));
        Some(t)
    }

    /// The row picks of the hand-written relative tables (`RowPicks`) for self-attention over
    /// `n` tokens, the forward's in `kind`, from the cache after the first call for the shape.
    pub fn row_picks(&self, n: i64, kind: Kind) -> Option<RowPicks> {
        let device = self.rel_embeddings.as_ref()?.device();
        let mut cache = self.picks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((.., p)) = cache.iter().find(|c| (c.0, c.1, c.2) == (n, device, kind)) {
            return Some(p.shallow_clone());
        }
        let p = RowPicks::new(&self.relative_index(n, n)?, self.cfg.rel_table_rows(), kind);
        cache.push((n, device, kind, p.shallow_clone()));
        Some(p)
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
