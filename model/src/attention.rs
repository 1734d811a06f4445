//! Disentangled self-attention (paper §3.1, spec §3).
//!
//! A[i, j] = s * ( c2c + c2p + p2c ),  s = 1 / sqrt(d * (1 + [c2p] + [p2c]))
//!   c2c = Q_c[i] . K_c[j]                 content to content
//!   c2p = Q_c[i] . K_r[rel_idx[i, j]]     content to position (query content, key position)
//!   p2c = K_c[j] . Q_r[rel_idx[i, j]]     position to content (the SAME index, pitfall 1)
//! with Q_c = Xq Wq + bq, K_c = X Wk + bk and, under `share_att_key`, Q_r = R Wq + bq, K_r = R Wk + bk
//! (biases kept, pitfall 2). R is the (LayerNorm'd) relative table with a fresh dropout per layer.

use tch::nn::Path;
use tch::Tensor;

use crate::config::DebertaConfig;
use crate::nn::{finite_min, Linear};
use crate::tensor_parallel::TpShard;

/// What every layer's attention shares in one forward pass.
#[derive(Debug)]
pub struct RelativeContext {
    /// R = LayerNorm(E_rel): [2S, D].
    pub table: Tensor,
    /// rel_idx: [q_len, k_len] rows of `table`.
    pub rel_idx: Tensor,
}

/// M[b, 1, i, j] = m[b, i] & m[b, j]  (encoder.get_attention_mask: outer product, pitfall 8).
pub fn attention_mask(q_mask: &Tensor, k_mask: &Tensor) -> Tensor {
    let q = q_mask.gt(0.5).unsqueeze(1).unsqueeze(-1); // [B, 1, Nq, 1]
    let k = k_mask.gt(0.5).unsqueeze(1).unsqueeze(1); // [B, 1, 1, N]
    q.logical_and(&k)
}

#[derive(Debug)]
pub struct DisentangledSelfAttention {
    pub query_proj: Linear,
    pub key_proj: Linear,
    pub value_proj: Linear,
    /// Separate relative projections, only without `share_att_key`.
    pub pos_key_proj: Option<Linear>,
    pub pos_query_proj: Option<Linear>,
    head_size: i64,
    c2p: bool,
    p2c: bool,
    scale: f64,
    attention_dropout: f64,
    pos_dropout: f64,
}

impl DisentangledSelfAttention {
    /// Column-parallel: this rank holds heads [rank·H/tp, (rank+1)·H/tp) of every projection.
    pub fn new(p: &Path, cfg: &DebertaConfig, tp: TpShard) -> Self {
        let (d, a, std) = (cfg.hidden_size, tp.part(cfg.all_head_size()), cfg.initializer_range);
        let separate = cfg.relative_attention && !cfg.share_att_key;
        DisentangledSelfAttention {
            query_proj: Linear::new(&(p / "query_proj"), d, a, true, std),
            key_proj: Linear::new(&(p / "key_proj"), d, a, true, std),
            value_proj: Linear::new(&(p / "value_proj"), d, a, true, std),
            pos_key_proj: (separate && cfg.c2p).then(|| Linear::new(&(p / "pos_key_proj"), d, a, true, std)),
            pos_query_proj: (separate && cfg.p2c).then(|| Linear::new(&(p / "pos_query_proj"), d, a, true, std)),
            head_size: cfg.attention_head_size,
            c2p: cfg.c2p,
            p2c: cfg.p2c,
            scale: 1.0 / ((cfg.attention_head_size * cfg.scale_factor()) as f64).sqrt(),
            attention_dropout: cfg.attention_probs_dropout_prob,
            pos_dropout: cfg.hidden_dropout_prob,
        }
    }

    /// [B, N, heads*d] -> [B, heads, N, d]. Heads are inferred (-1) so a TP shard of them works too.
    fn split_heads(&self, x: &Tensor) -> Tensor {
        let (b, n, _) = x.size3().expect("[batch, seq, hidden]");
        x.view([b, n, -1, self.head_size]).transpose(1, 2)
    }

    /// [2S, D] table -> [heads, 2S, d].
    fn split_table_heads(&self, x: &Tensor) -> Tensor {
        let rows = x.size()[0];
        x.view([rows, -1, self.head_size]).transpose(0, 1)
    }

    /// x: keys/values source [B, N, D]; xq: query source [B, Nq, D] (x itself except in the EMD);
    /// mask: [B, 1, Nq, N] bool. Returns the context [B, Nq, heads*d].
    pub fn forward(
        &self,
        x: &Tensor,
        xq: &Tensor,
        rel: Option<&RelativeContext>,
        mask: &Tensor,
        train: bool,
    ) -> Tensor {
        let q_c = self.split_heads(&self.query_proj.forward(xq)); // [B, H, Nq, d]
        let k_c = self.split_heads(&self.key_proj.forward(x)); // [B, H, N, d]
        let v_c = self.split_heads(&self.value_proj.forward(x)); // [B, H, N, d]
        let (b, h, nq, _) = q_c.size4().expect("[batch, heads, query, d]");
        let n = k_c.size()[2];

        let mut scores = q_c.matmul(&k_c.transpose(-1, -2)) * self.scale; // c2c: [B, H, Nq, N]
        if let Some(rel) = rel.filter(|_| self.c2p || self.p2c) {
            let r = rel.table.dropout(self.pos_dropout, train); // [2S, D], per-layer dropout
            if self.c2p {
                let k_r = self.split_table_heads(&self.pos_key_proj.as_ref().unwrap_or(&self.key_proj).forward(&r));
                let c2p_all = q_c.matmul(&k_r.transpose(-1, -2)); // [B, H, Nq, 2S]
                let idx = rel.rel_idx.expand([b, h, nq, n], false);
                scores = scores + c2p_all.gather(-1, &idx, false) * self.scale;
            }
            if self.p2c {
                let q_r = self.split_table_heads(&self.pos_query_proj.as_ref().unwrap_or(&self.query_proj).forward(&r));
                let p2c_all = k_c.matmul(&q_r.transpose(-1, -2)); // [B, H, N, 2S]: K_c[j] . Q_r[t]
                let idx_t = rel.rel_idx.transpose(0, 1).expand([b, h, n, nq], false); // [.., j, i] = rel_idx[i, j]
                scores = scores + p2c_all.gather(-1, &idx_t, false).transpose(-1, -2) * self.scale;
            }
        }

        // Softmax over keys; padded query rows become all-zero as in the official XSoftmax.
        let hidden = mask.logical_not();
        let probs = scores
            .masked_fill(&hidden, finite_min(scores.kind()))
            .softmax(-1, scores.kind())
            .masked_fill(&hidden, 0.0);
        let ctx = probs.dropout(self.attention_dropout, train).matmul(&v_c); // [B, H, Nq, d]
        ctx.transpose(1, 2).reshape([b, nq, -1]) // [B, Nq, H*d]
    }
}
