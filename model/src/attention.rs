//! Disentangled self-attention (paper §3.1, spec §3).
//!
//! A[i, j] = s * ( c2c + c2p + p2c ),  s = 1 / sqrt(d * (1 + [c2p] + [p2c]))
//!   c2c = Q_c[i] . K_c[j]                 content to content
//!   c2p = Q_c[i] . K_r[rel_idx[i, j]]     content to position (query content, key position)
//!   p2c = K_c[j] . Q_r[rel_idx[i, j]]     position to content (the SAME index, pitfall 1)
//! with Q_c = Xq Wq + bq, K_c = X Wk + bk and, under `share_att_key`, Q_r = R Wq + bq, K_r = R Wk + bk
//! (biases kept, pitfall 2). R is the (LayerNorm'd) relative table with a fresh dropout per layer.

use tch::nn::Path;
use tch::{Kind, Tensor};

use crate::config::DebertaConfig;
use crate::fused_attention::CoreInputs;
use crate::nn::{finite_min, Linear};
use crate::tensor_parallel::TpShard;

/// What every layer's attention shares in one forward pass.
#[derive(Debug)]
pub struct RelativeContext {
    /// R = LayerNorm(E_rel): [2S, D].
    pub table: Tensor,
    /// rel_idx: rows of `table`, [q_len, k_len], or [B, 1, q_len, k_len] where each batch row
    /// has its own query positions (the EMD at the predicted positions).
    pub rel_idx: Tensor,
}

/// Query rows at positions of the key sequence (the EMD's predicted rows, `emd::Predicted`), as
/// the fused path places them: `sel` the valid entries of the [B·M] rows, `at` their positions
/// in the [B·N] tokens (b·N + pos), in the same order.
pub struct QueryRows {
    pub sel: Tensor,
    pub at: Tensor,
}

impl QueryRows {
    pub fn shallow_clone(&self) -> QueryRows {
        QueryRows {
            sel: self.sel.shallow_clone(),
            at: self.at.shallow_clone(),
        }
    }

    /// ctx [B, N, C] -> its rows at the query rows' positions [B, M, C] (zero where not valid).
    pub fn gather(&self, ctx: &Tensor, m: i64) -> Tensor {
        let (b, _, c) = ctx.size3().expect("[B, N, C]");
        let picked = ctx.reshape([-1, c]).index_select(0, &self.at);
        Tensor::zeros([b * m, c], (ctx.kind(), ctx.device()))
            .index_copy(0, &self.sel, &picked)
            .view([b, m, c])
    }

    /// Backward of `gather`: d [B, M, C] -> [B, N, C], zero off the positions.
    pub fn scatter(&self, d: &Tensor, n: i64) -> Tensor {
        let (b, _, c) = d.size3().expect("[B, M, C]");
        let valid = d.reshape([-1, c]).index_select(0, &self.sel);
        Tensor::zeros([b * n, c], (d.kind(), d.device()))
            .index_copy(0, &self.at, &valid)
            .view([b, n, c])
    }
}

/// What the backward of `DisentangledSelfAttention::relative_tables` keeps: R after this
/// layer's dropout, the dropout's mask, the row picks, and the kind the products ran in.
pub struct RelativeSaved {
    r: Tensor,
    keep: Option<Tensor>,
    picks: RowPicks,
    kind: Kind,
}

/// The rows of R that the distances read, as one-hot matrices [2N, 2S]: row m of `desc` picks
/// distance N-1-m's row (K_r's order), row m of `asc` distance m-(N-1)'s (Q_r's); row 2N-1 is
/// zero, so the tables come out with the kernels' padding row. Picking is then one GEMM and its
/// backward the transposed one (`pick_rows` says why not index_select). They depend on N only:
/// built once per shape (`Encoder::row_picks`) and shared by every layer's `relative_tables`, in
/// fp32 (backward) and in the compute kind (forward), where each layer built its own before
/// (about ten operators).
#[derive(Debug)]
pub struct RowPicks {
    desc: Tensor,
    asc: Tensor,
    desc_kind: Tensor,
    asc_kind: Tensor,
}

impl RowPicks {
    /// For rel_idx [N, N] over a table of `table_rows` rows (2S), the forward's picks in `kind`.
    pub fn new(rel_idx: &Tensor, table_rows: i64, kind: Kind) -> RowPicks {
        let (by_desc, by_asc) = distance_rows(rel_idx);
        let hot = |rows: &Tensor| {
            rows.one_hot(table_rows)
                .to_kind(Kind::Float)
                .constant_pad_nd([0, 0, 0, 1])
        };
        let (desc, asc) = (hot(&by_desc), hot(&by_asc));
        RowPicks {
            desc_kind: desc.to_kind(kind),
            asc_kind: asc.to_kind(kind),
            desc,
            asc,
        }
    }

    pub fn shallow_clone(&self) -> RowPicks {
        RowPicks {
            desc: self.desc.shallow_clone(),
            asc: self.asc.shallow_clone(),
            desc_kind: self.desc_kind.shallow_clone(),
            asc_kind: self.asc_kind.shallow_clone(),
        }
    }
}

/// M[b, 1, i, j] = m[b, i] & m[b, j]  (encoder.get_attention_mask: outer product, pitfall 8).
pub fn attention_mask(q_mask: &Tensor, k_mask: &Tensor) -> Tensor {
    let q = q_mask.gt(0.5).unsqueeze(1).unsqueeze(-1); // [B, 1, Nq, 1]
    let k = k_mask.gt(0.5).unsqueeze(1).unsqueeze(1); // [B, 1, 1, N]
    q.logical_and(&k)
}

/// Softmax over the keys of `scores` [B, H, Nq, N] where `mask` [B, 1, Nq, N] allows; padded
/// query rows become all-zero, as in the official XSoftmax.
pub fn xsoftmax(scores: &Tensor, mask: &Tensor) -> Tensor {
    let hidden = mask.logical_not();
    scores
        .masked_fill(&hidden, finite_min(scores.kind()))
        .softmax(-1, scores.kind())
        .masked_fill(&hidden, 0.0)
}

/// How the relative terms c2p and p2c reach the [B, H, N, N] scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelativePath {
    /// Project the 2S-row table, then `gather` each (i, j)'s row (HF's and the official way).
    Gather,
    /// Expand the table to one row per distance (2N-1 rows, a gather on the small table), one
    /// GEMM, then a strided "skew" view picks (i, j) ← distance i - j: no [B, H, N, N] index
    /// tensors and no scatter in backward (issue G). Self-attention only (Nq = N).
    Skew,
    /// The fused kernels (`fused_attention`), on the segment tape: the projections, then the
    /// core as a custom segment (softmax(q k^T + c2p + p2c) v, never materialising [B, H, N, N]
    /// on CUDA), then the output. Without a tape (one-process forward) it takes the skew path.
    Fused,
}

/// This process trains in fp32 on CUDA (`RelativePath::set_fp32_training`).
static FP32_TRAINING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

thread_local! {
    /// A per-thread choice that overrides the environment (tests compare the paths).
    static OVERRIDE: std::cell::Cell<Option<RelativePath>> = const { std::cell::Cell::new(None) };
}

impl RelativePath {
    /// The path `DEBERTA_ATTENTION=gather|skew|fused` names (read once), if any; `auto` or
    /// another value names none (the worker refuses other values at start-up:
    /// `runtime::check_attention_path`).
    fn from_env() -> Option<RelativePath> {
        static PATH: std::sync::OnceLock<Option<RelativePath>> = std::sync::OnceLock::new();
        if let Some(p) = OVERRIDE.with(|o| o.get()) {
            return Some(p);
        }
        *PATH.get_or_init(|| match std::env::var("DEBERTA_ATTENTION").as_deref() {
            Ok("gather") => Some(RelativePath::Gather),
            Ok("skew") => Some(RelativePath::Skew),
            Ok("fused") => Some(RelativePath::Fused),
            _ => None,
        })
    }

    /// The path of the one-process forward: the one named, gather by default.
    pub fn chosen() -> RelativePath {
        Self::from_env().unwrap_or(RelativePath::Gather)
    }

    /// The path of training (the segment tape) on `device`: the one named; by default the fused
    /// kernels on CUDA in bf16 (the H100 bench: 1.5x HF's best throughput, where gather and
    /// skew are below HF), gather on the CPU (where the fused path runs reference formulas)
    /// and in fp32 (the kernels compute in bf16; see `set_fp32_training`).
    pub fn for_device(device: tch::Device) -> RelativePath {
        let fp32 = FP32_TRAINING.load(std::sync::atomic::Ordering::Relaxed);
        Self::from_env().unwrap_or(if device.is_cuda() && !fp32 {
            RelativePath::Fused
        } else {
            RelativePath::Gather
        })
    }

    /// Declare that this process trains in fp32 (no bf16 autocast): the default path then
    /// stays off the bf16 kernels.
    pub fn set_fp32_training(fp32: bool) {
        FP32_TRAINING.store(fp32, std::sync::atomic::Ordering::Relaxed);
    }

    /// Use `path` on this thread from now on, whatever the environment says.
    pub fn set_for_this_thread(path: RelativePath) {
        OVERRIDE.with(|o| o.set(Some(path)));
    }
}

/// The table rows of every distance, from rel_idx [N, N] (rel_idx[i, j] depends on i - j only):
/// descending (N-1 .. -(N-1)) and ascending (-(N-1) .. N-1), each [2N-1].
fn distance_rows(rel_idx: &Tensor) -> (Tensor, Tensor) {
    let n = rel_idx.size()[0];
    let non_negative = rel_idx.select(1, 0); // distance 0..N-1 (i = d, j = 0)
    let negative = rel_idx.select(0, 0).narrow(0, 1, n - 1); // distance -1..-(N-1) (i = 0, j = -d)
    let desc = Tensor::cat(&[non_negative.flip([0]), negative.shallow_clone()], 0);
    let asc = Tensor::cat(&[negative.flip([0]), non_negative], 0);
    (desc, asc)
}

/// Rows `rows` [M] of `table` [R, A], as one GEMM with their one-hot matrix [M, R]: the values
/// of `index_select` (one product with 1 per element: exact), but autograd's backward is the
/// transposed GEMM. index_select's is an index_add whose atomics pile up on the rows many
/// distances share (the far buckets): the relative tables' backward took 1.1-1.3 ms per layer
/// on the H100 with it, more than the layer's q, k, v projections.
fn pick_rows(table: &Tensor, rows: &Tensor) -> Tensor {
    rows.one_hot(table.size()[0]).to_kind(table.kind()).matmul(table)
}

/// full: [B, H, N, 2N-1] with full[i, m] for distance index m -> [B, H, N, N] with
/// out[i, j] = full[i, (N-1-i) + j]. Flat, that is element i(2N-2) + (N-1) + j: drop the first
/// N-1 elements, read rows of 2N-2, keep N columns (views only).
pub(crate) fn skew_view(full: &Tensor) -> Tensor {
    let (b, h, n, w) = full.size4().expect("[B, H, N, 2N-1]");
    full.contiguous()
        .reshape([b, h, n * w])
        .narrow(2, n - 1, n * (w - 1))
        .reshape([b, h, n, w - 1])
        .narrow(3, 0, n)
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

    /// The relative tables per distance of the skew path and of the fused path through autograd:
    /// K_r [heads, 2N-1, d] (row m: distance N-1-m) if c2p and Q_r (row m: distance m-(N-1),
    /// scale folded in) if p2c. The 2S table rows are projected, then one row per distance is
    /// picked (`pick_rows`, on the small table); R gets this layer's dropout first.
    fn distance_tables(&self, rel: &RelativeContext, train: bool) -> (Option<Tensor>, Option<Tensor>) {
        let r = rel.table.dropout(self.pos_dropout, train); // [2S, D]
        let (by_desc, by_asc) = distance_rows(&rel.rel_idx);
        let k_r = self
            .c2p
            .then(|| self.split_table_heads(&pick_rows(&self.pos_key().forward(&r), &by_desc)));
        let q_r = self
            .p2c
            .then(|| self.split_table_heads(&pick_rows(&self.pos_query().forward(&r), &by_asc)) * self.scale);
        (k_r, q_r)
    }

    /// The fused path's content projections by hand (a custom segment of the tape): q (scaled),
    /// k, v as [B, N, heads, d] from x [B, N, D], in `kind` (bf16 under autocast), the weights
    /// cast here. Nothing is kept: `project_content_backward` recasts x and the weights. The
    /// scale is folded into q's weight and bias (`scaled_query`): no pass over q.
    pub fn project_content(&self, x: &Tensor, kind: Kind) -> Vec<Tensor> {
        let xc = x.to_kind(kind); // once for the three
        let (wq, bq) = self.scaled_query();
        vec![
            self.heads_of(&xc, &wq, bq.as_ref(), kind),
            self.heads_of(&xc, &self.key_proj.weight, self.key_proj.bias.as_ref(), kind),
            self.heads_of(&xc, &self.value_proj.weight, self.value_proj.bias.as_ref(), kind),
        ]
    }

    /// x [B, N, D] (in `kind`) W^T + b as [B, N, heads, d].
    fn heads_of(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>, kind: Kind) -> Tensor {
        let (b, n, _) = x.size3().expect("[batch, seq, hidden]");
        crate::nn::linear_in(x, w, bias, kind).view([b, n, -1, self.head_size])
    }

    /// One projection's parameter gradients from its columns `dy` [T, local] of the fused
    /// q, k, v gradient, its input rows `x` [T, D] and `db`, the sum of `dy`'s rows: W's by the
    /// GEMM (accumulated in fp32 on CUDA, `blas`) and b's, both times `s` (q's scale).
    fn projection_grads(l: &Linear, dy: &Tensor, x: &Tensor, s: f64, db: &Tensor) {
        crate::blas::accumulate_grad_mm(&l.weight, &dy.tr(), x, s);
        if let Some(bias) = &l.bias {
            crate::nn::accumulate_grad(bias, &(db * s));
        }
    }

    /// The EMD's projections for the fused core (`model::emd_attention_segments`): k and v from
    /// x [B, N, D] as `project_content` makes them, and q from the query rows xq [B, M, D]
    /// picked by `rows.sel` (the valid ones) and placed at their positions (`rows.at`) of an
    /// [B, N, heads, d] zero tensor: the core then attends from every position, and the rows
    /// no query sits at give outputs nobody reads and no gradient.
    pub fn project_rows(&self, x: &Tensor, xq: &Tensor, rows: &QueryRows, kind: Kind) -> Vec<Tensor> {
        let (b, n, d) = x.size3().expect("[batch, seq, hidden]");
        let xc = x.to_kind(kind);
        let (wq, bq) = self.scaled_query();
        let xq_valid = xq.reshape([-1, d]).index_select(0, &rows.sel);
        let q_valid = crate::nn::linear_in(&xq_valid, &wq, bq.as_ref(), kind); // [valid, local]
        let local = q_valid.size()[1];
        let q = Tensor::zeros([b * n, local], (kind, x.device())).index_copy(0, &rows.at, &q_valid);
        vec![
            q.view([b, n, -1, self.head_size]),
            self.heads_of(&xc, &self.key_proj.weight, self.key_proj.bias.as_ref(), kind),
            self.heads_of(&xc, &self.value_proj.weight, self.value_proj.bias.as_ref(), kind),
        ]
    }

    /// Backward of `project_rows` for dL/dq, dL/dk, dL/dv ([B, N, heads, d]): adds the
    /// projections' gradients; returns dL/dx [B, N, D] and dL/dxq [B, M, D] in `kind` (zero at the
    /// rows that are not valid), this rank's heads' parts under TP. `bias` as in
    /// `project_content_backward`.
    pub fn project_rows_backward(
        &self,
        x: &Tensor,
        xq: &Tensor,
        rows: &QueryRows,
        grads: [&Tensor; 3],
        bias: Option<&Tensor>,
        kind: Kind,
    ) -> (Tensor, Tensor) {
        let d = x.size()[2];
        let local = grads[0].size()[2] * grads[0].size()[3];
        let dqkv = qkv_rows(grads, local, kind); // [B·N, 3·local]
                                                 // k and v: their parameters' gradients by their columns of dqkv, x's by one GEMM over both.
        let xr = x.to_kind(kind).reshape([-1, d]);
        let dkv = dqkv.narrow(1, local, 2 * local);
        let sums = |t: &Tensor, slot: i64| match bias {
            Some(b) => b.narrow(0, slot * local, local),
            None => t.sum_dim_intlist(0, false, Kind::Float),
        };
        for (i, l) in [&self.key_proj, &self.value_proj].into_iter().enumerate() {
            let cols = dkv.narrow(1, i as i64 * local, local);
            Self::projection_grads(l, &cols, &xr, 1.0, &sums(&cols, 1 + i as i64));
        }
        let wkv = Tensor::cat(
            &[&self.key_proj.weight, &self.value_proj.weight].map(|w| crate::weight_copies::in_kind(w, kind)),
            0,
        );
        let dx = dkv.mm(&wkv).view(x.size().as_slice());
        // q: the valid rows' gradients, picked from their positions; q = xq (s Wq)^T + s bq.
        let dq = dqkv.narrow(1, 0, local).index_select(0, &rows.at); // [valid, local]
        let xq_valid = xq.to_kind(kind).reshape([-1, d]).index_select(0, &rows.sel);
        // (dq is zero at the other rows: the kernels' sums over all rows are the valid rows'.)
        let dbq = sums(&dq, 0);
        Self::projection_grads(&self.query_proj, &dq, &xq_valid, self.scale, &dbq);
        let dxq_valid = dq.mm(&self.scaled_query().0.to_kind(kind)); // [valid, D]
        let (bq, m) = (xq.size()[0], xq.size()[1]);
        let dxq = Tensor::zeros([bq * m, d], (kind, x.device())).index_copy(0, &rows.sel, &dxq_valid);
        (dx, dxq.view(xq.size().as_slice()))
    }

    /// The query projection's weight and bias times the attention scale (fp32, [local, D] and
    /// [local]: weight-sized, where scaling q or dq would be a pass over every token).
    fn scaled_query(&self) -> (Tensor, Option<Tensor>) {
        let l = &self.query_proj;
        (&l.weight * self.scale, l.bias.as_ref().map(|b| b * self.scale))
    }

    /// Backward of `project_content` for dL/dq, dL/dk, dL/dv ([B, N, heads, d]): adds the
    /// projections' gradients; returns dL/dx in `kind` (this rank's heads' part under TP; the
    /// tape widens it where it sums it with the residual's).
    /// One GEMM each for dx and the weights over [dq dk dv], so dx is summed in the GEMM's fp32
    /// accumulator, as autocast's three fp32 casts would sum it.
    /// `bias`: the column sums of dq, dk, dv ([3·local] fp32) if the kernels made them; else summed here.
    pub fn project_content_backward(
        &self,
        x: &Tensor,
        grads: [&Tensor; 3],
        bias: Option<&Tensor>,
        kind: Kind,
    ) -> Tensor {
        let d = x.size()[2];
        let local = grads[0].size()[2] * grads[0].size()[3];
        // q = x (s Wq)^T + s bq: dx takes s Wq, and Wq's and bq's gradients are s times those
        // of the unscaled rows (taken on the weight-sized products, not on dq).
        let dqkv = qkv_rows(grads, local, kind); // [B·N, 3·local]
        let lin = [&self.query_proj, &self.key_proj, &self.value_proj];
        let wq = self.scaled_query().0;
        let w = Tensor::cat(
            &[&wq, &self.key_proj.weight, &self.value_proj.weight].map(|w| crate::weight_copies::in_kind(w, kind)),
            0,
        ); // [3·local, D]
        let xr = x.to_kind(kind).reshape([-1, d]);
        // Each weight's gradient by its own GEMM over its columns of dqkv (on CUDA accumulated
        // in fp32, q's scale as the GEMM's alpha); the biases' from the kernels' column sums or one
        // sum over the rows.
        let db = match bias {
            Some(b) => b.shallow_clone(),
            None => dqkv.sum_dim_intlist(0, false, Kind::Float),
        };
        for (i, l) in lin.iter().enumerate() {
            let at = i as i64 * local;
            let s = if i == 0 { self.scale } else { 1.0 };
            Self::projection_grads(l, &dqkv.narrow(1, at, local), &xr, s, &db.narrow(0, at, local));
        }
        dqkv.mm(&w).view(x.size().as_slice())
    }

    /// The fused path's relative tables (`distance_tables`) as a list, K_r then Q_r, in `kind`,
    /// each [heads, 2N, d] with the kernels' zero row appended (`RowPicks`), for a hand-written
    /// segment: what `relative_tables_backward` needs comes with them. The projections and the
    /// picks of the rows per distance (exact: one product per element) run in `kind`, as
    /// autocast runs the gather path's (until the twelfth session the projections and the
    /// backward's products ran in fp32, on TF32: 7.1 ms of the traced batch-32 step, ~4 times
    /// what bf16 takes).
    /// By hand rather than through autograd: the ~60 small kernels per layer that autograd's
    /// backward of these few products launched cost more than their arithmetic.
    pub fn relative_tables(
        &self,
        table: &Tensor,
        picks: &RowPicks,
        train: bool,
        kind: Kind,
    ) -> (Vec<Tensor>, RelativeSaved) {
        crate::nn::autocast(false, || {
            // The draws of `dropout` (distance_tables), and the mask kept.
            let (r, keep) = crate::nn::dropout_saving(table, self.pos_dropout, train);
            // The picks come in the forward's compute kind (`RowPicks::new`); cast if not.
            let pick = |proj: &Linear, hot: &Tensor| {
                let hot = if hot.kind() == kind {
                    hot.shallow_clone()
                } else {
                    hot.to_kind(kind)
                };
                let projected = crate::nn::linear_in(&r, &proj.weight, proj.bias.as_ref(), kind);
                self.split_table_heads(&hot.matmul(&projected))
            };
            let k_r = self.c2p.then(|| pick(self.pos_key(), &picks.desc_kind));
            let q_r = self.p2c.then(|| pick(self.pos_query(), &picks.asc_kind) * self.scale);
            let saved = RelativeSaved {
                r,
                keep,
                picks: picks.shallow_clone(),
                kind,
            };
            (k_r.into_iter().chain(q_r).collect(), saved)
        })
    }

    /// Backward of `relative_tables` for the gradients of its outputs (K_r's then Q_r's, None
    /// where nothing reached one; [heads, 2N, d] or without the padding row, in any kind): adds
    /// the projections' gradients (in fp32 by the GEMM on CUDA, `blas`), returns R's (this
    /// rank's heads' part under TP), in fp32. The products in the forward's kind: picking rows
    /// is the one-hot GEMM's transpose here.
    pub fn relative_tables_backward(&self, saved: &RelativeSaved, grads: &[Option<Tensor>]) -> Tensor {
        crate::nn::autocast(false, || {
            let (r, kind, picks) = (&saved.r, saved.kind, &saved.picks);
            let mut grads = grads.iter();
            let mut dr: Option<Tensor> = None;
            let (desc, asc) = if kind == Kind::Float {
                (&picks.desc, &picks.asc)
            } else {
                (&picks.desc_kind, &picks.asc_kind)
            };
            let terms = [
                (self.c2p, self.pos_key(), desc, 1.0),
                (self.p2c, self.pos_query(), asc, self.scale),
            ];
            for (on, proj, hot, scale) in terms {
                let g = if on {
                    grads.next().and_then(Option::as_ref)
                } else {
                    None
                };
                let Some(g) = g else { continue };
                // [heads, rows, d] -> one row per distance [rows, heads·d] -> the 2S projected rows.
                let rows = g.size()[1];
                // Scaled in fp32, then in the products' kind.
                let g = g.transpose(0, 1).reshape([rows, -1]).to_kind(Kind::Float);
                let g = if scale == 1.0 { g } else { g * scale }.to_kind(kind);
                let d_projected = hot.narrow(0, 0, rows).tr().mm(&g);
                // R's gradient summed over the two terms (and over the layers, by the tape) in fp32.
                let dx = crate::nn::linear_backward(r, &proj.weight, proj.bias.as_ref(), &d_projected, kind)
                    .to_kind(Kind::Float);
                dr = Some(match dr {
                    Some(sum) => sum + dx,
                    None => dx,
                });
            }
            let dr = dr.unwrap_or_else(|| r.zeros_like());
            crate::nn::dropout_backward(&dr, saved.keep.as_ref(), self.pos_dropout)
        })
    }

    fn pos_key(&self) -> &Linear {
        self.pos_key_proj.as_ref().unwrap_or(&self.key_proj)
    }

    fn pos_query(&self) -> &Linear {
        self.pos_query_proj.as_ref().unwrap_or(&self.query_proj)
    }

    /// The fused path's inputs (`fused_attention::CoreInputs`): q (scaled), k, v as
    /// [B, N, heads, d], then K_r per distance [heads, 2N-1, d] if c2p and Q_r per distance
    /// (scaled) if p2c, when `rel` is given. Self-attention shapes only (Nq = N).
    pub fn project(&self, x: &Tensor, xq: &Tensor, rel: Option<&RelativeContext>, train: bool) -> Vec<Tensor> {
        let (b, n, _) = x.size3().expect("[batch, seq, hidden]");
        let heads = |t: Tensor| t.view([b, n, -1, self.head_size]);
        let mut out = vec![
            heads(self.query_proj.forward(xq) * self.scale),
            heads(self.key_proj.forward(x)),
            heads(self.value_proj.forward(x)),
        ];
        if let Some(rel) = rel.filter(|_| self.c2p || self.p2c) {
            let (k_r, q_r) = self.distance_tables(rel, train);
            out.extend(k_r);
            out.extend(q_r);
        }
        out
    }

    /// The core's inputs from `project`'s outputs; `mask` [B, N] is the token mask.
    pub fn core_inputs(&self, parts: &[Tensor], has_rel: bool, mask: &Tensor, train: bool) -> CoreInputs {
        let mut rest = parts[3..].iter().map(Tensor::shallow_clone);
        let kr = (has_rel && self.c2p).then(|| rest.next().expect("K_r"));
        let qr = (has_rel && self.p2c).then(|| rest.next().expect("Q_r"));
        CoreInputs {
            q: parts[0].shallow_clone(),
            k: parts[1].shallow_clone(),
            v: parts[2].shallow_clone(),
            kr,
            qr,
            mask: mask.shallow_clone(),
            dropout: if train { self.attention_dropout } else { 0.0 },
        }
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
        self.forward_using(x, xq, rel, mask, train, RelativePath::chosen())
    }

    /// `forward` with the relative terms computed by `path`.
    pub fn forward_using(
        &self,
        x: &Tensor,
        xq: &Tensor,
        rel: Option<&RelativeContext>,
        mask: &Tensor,
        train: bool,
        path: RelativePath,
    ) -> Tensor {
        let q_c = self.split_heads(&self.query_proj.forward(xq)); // [B, H, Nq, d]
        let k_c = self.split_heads(&self.key_proj.forward(x)); // [B, H, N, d]
        let v_c = self.split_heads(&self.value_proj.forward(x)); // [B, H, N, d]
        let (b, h, nq, _) = q_c.size4().expect("[batch, heads, query, d]");
        let n = k_c.size()[2];

        // The skew view needs self-attention's shared [N, N] index; the EMD's predicted rows
        // ([B, 1, M, N], `emd::Predicted`) take the gather.
        let shared_idx = rel.is_none_or(|r| r.rel_idx.dim() == 2);
        let skew = path != RelativePath::Gather && nq == n && shared_idx;
        // The skew path folds the scale into the (small) query side instead of scaling [B, H, N, N].
        let q_c = if skew { q_c * self.scale } else { q_c };
        let c2c = q_c.matmul(&k_c.transpose(-1, -2)); // [B, H, Nq, N]
        let mut scores = if skew { c2c } else { c2c * self.scale };
        if let Some(rel) = rel.filter(|_| skew && (self.c2p || self.p2c)) {
            let (k_r, q_r) = self.distance_tables(rel, train);
            if let Some(k_r) = k_r {
                // k_r[m] = K_r at distance N-1-m: c2p[i, j] = (Q_c k_r^T)[i, (N-1-i) + j].
                let full = q_c.matmul(&k_r.transpose(-1, -2)); // [B, H, N, 2N-1]
                scores = scores + skew_view(&full);
            }
            if let Some(q_r) = q_r {
                // q_r[m] = Q_r at distance m-(N-1): p2c[i, j] = (K_c q_r^T)[j, (N-1-j) + i].
                let full = k_c.matmul(&q_r.transpose(-1, -2)); // [B, H, N, 2N-1]
                scores = scores + skew_view(&full).transpose(-1, -2);
            }
        } else if let Some(rel) = rel.filter(|_| self.c2p || self.p2c) {
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
                let idx_t = rel.rel_idx.transpose(-1, -2).expand([b, h, n, nq], false); // [.., j, i] = rel_idx[.., i, j]
                scores = scores + p2c_all.gather(-1, &idx_t, false).transpose(-1, -2) * self.scale;
            }
        }

        let probs = xsoftmax(&scores, mask);
        let ctx = probs.dropout(self.attention_dropout, train).matmul(&v_c); // [B, H, Nq, d]
        ctx.transpose(1, 2).reshape([b, nq, -1]) // [B, Nq, H*d]
    }
}

/// [dq dk dv] ([B, N, heads, d] each) as one [B·N, 3·local] operand in `kind`: a view when they
/// are the three slices of one [B, N, 3, heads, d] buffer (the fused kernels write them so), else
/// their concatenation (a pass over all three).
fn qkv_rows(grads: [&Tensor; 3], local: i64, kind: Kind) -> Tensor {
    let [q, k, v] = grads;
    let size = q.size();
    let at = |t: &Tensor, slice: i64| {
        t.kind() == kind
            && t.size() == size
            && t.stride() == [size[1] * 3 * local, 3 * local, size[3], 1]
            && t.data_ptr() as i64 == q.data_ptr() as i64 + slice * local * kind.elt_size_in_bytes() as i64
    };
    if size.len() == 4 && at(q, 0) && at(k, 1) && at(v, 2) {
        return q.as_strided([size[0] * size[1], 3 * local], [3 * local, 1], None::<i64>);
    }
    let rows = |t: &Tensor| t.reshape([-1, local]).to_kind(kind);
    Tensor::cat(&[rows(q), rows(k), rows(v)], 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoder::Encoder;
    use tch::{Device, Kind};

    /// The fused kernels write dq, dk, dv as the slices of one [B, N, 3, heads, d] buffer; the
    /// projections' backward then multiplies a view of it. Any other layout is concatenated.
    #[test]
    fn the_kernels_gradient_buffer_is_the_projections_operand_without_a_copy() {
        let (b, n, h, d) = (2, 5, 3, 4);
        let local = h * d;
        let buf = Tensor::randn([b, n, 3, h, d], (Kind::Float, Device::Cpu));
        let [q, k, v] = [0, 1, 2].map(|i| buf.select(2, i));
        let got = qkv_rows([&q, &k, &v], local, Kind::Float);
        assert_eq!(got.data_ptr(), buf.data_ptr(), "not a view of the buffer");
        let cat = |ts: [&Tensor; 3]| Tensor::cat(&ts.map(|t| t.reshape([-1, local])), 1);
        assert!(got.equal(&cat([&q, &k, &v])));
        let separate = [&q, &k, &v].map(|t| t.contiguous());
        let want = qkv_rows([&separate[0], &separate[1], &separate[2]], local, Kind::Float);
        assert!(want.equal(&got));
        // The same slices in another order are no one operand.
        assert!(qkv_rows([&k, &q, &v], local, Kind::Float).equal(&cat([&k, &q, &v])));
    }

    /// Output and gradients (input, every projection) of one attention call.
    fn run(cfg: &DebertaConfig, path: RelativePath, seed: i64) -> Vec<Tensor> {
        tch::manual_seed(seed);
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let enc = Encoder::new(&(vs.root() / "encoder"), cfg, TpShard::NONE);
        let (b, n, d) = (3, 21, cfg.hidden_size);
        let x = Tensor::randn([b, n, d], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        // Rows of length 21, 17 and 9: padding in two of them.
        let lengths = Tensor::from_slice(&[21i64, 17, 9]);
        let m = Tensor::arange(n, (Kind::Int64, Device::Cpu))
            .unsqueeze(0)
            .lt_tensor(&lengths.unsqueeze(1))
            .to_kind(Kind::Float);
        let rel = enc.relative_context(n, n);
        let att = &enc.layers[0].attention;
        let out = att.forward_using(&x, &x, rel.as_ref(), &attention_mask(&m, &m), false, path);
        // A loss that weighs every output element differently.
        let w = Tensor::randn(out.size().as_slice(), (Kind::Float, Device::Cpu));
        (&out * &w).sum(Kind::Float).backward();
        let mut all = vec![out.detach(), x.grad()];
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, v) in vars {
            if name.contains("layer.0.attention.self")
                || name.contains("rel_embeddings")
                || name.contains("encoder.LayerNorm")
            {
                all.push(v.grad());
            }
        }
        all
    }

    #[test]
    fn the_skew_path_equals_the_gather_path_with_padding_and_buckets() {
        let shared = DebertaConfig::toy(); // shared key, 8 buckets < 21 positions, rel-LN
        let mut separate = DebertaConfig::toy();
        separate.share_att_key = false; // pos_key_proj / pos_query_proj
        separate.position_buckets = 0;
        separate.max_relative_positions = 16; // distances clamped at ±16
        for (name, cfg) in [
            ("shared key, buckets", shared),
            ("separate projections, clamp", separate),
        ] {
            let (a, b) = (run(&cfg, RelativePath::Gather, 5), run(&cfg, RelativePath::Skew, 5));
            assert!(a.len() >= 5, "{name}: {}", a.len());
            for (k, (x, y)) in a.iter().zip(&b).enumerate() {
                assert!(x.defined() && y.defined(), "{name}: tensor {k} has no gradient");
                let diff = (x - y).abs().max().double_value(&[]);
                let scale = x.abs().max().double_value(&[]).max(1.0);
                assert!(diff <= 1e-5 * scale, "{name}: tensor {k} differs by {diff:e}");
            }
        }
    }

    /// The hand-written relative tables (`relative_tables` and its backward) against autograd
    /// through `distance_tables`: the tables, R's gradient and the projections', with the
    /// layer's dropout on R (same draws), shared and separate projections, c2p only.
    #[test]
    fn the_hand_written_relative_tables_equal_autograd_with_dropout_on() {
        let mut separate = DebertaConfig::toy();
        separate.share_att_key = false;
        let mut c2p_only = DebertaConfig::toy();
        c2p_only.p2c = false;
        for (name, mut cfg) in [
            ("shared", DebertaConfig::toy()),
            ("separate", separate),
            ("c2p only", c2p_only),
        ] {
            cfg.hidden_dropout_prob = 0.2;
            tch::manual_seed(3);
            let vs = tch::nn::VarStore::new(Device::Cpu);
            let enc = Encoder::new(&(vs.root() / "encoder"), &cfg, TpShard::NONE);
            let rel = enc.relative_context(21, 21).expect("relative attention");
            let att = &enc.layers[0].attention;
            let table = rel.table.detach().set_requires_grad(true);
            let rel = RelativeContext {
                table: table.shallow_clone(),
                rel_idx: rel.rel_idx,
            };
            let params: Vec<Tensor> = vs.trainable_variables();
            let grads_of = |params: &[Tensor]| -> Vec<Tensor> {
                params
                    .iter()
                    .map(|p| {
                        let g = p.grad();
                        let out = if g.defined() { g.copy() } else { p.zeros_like() };
                        if g.defined() {
                            let _ = p.grad().zero_();
                        }
                        out
                    })
                    .collect()
            };
            tch::manual_seed(11);
            let (k_r, q_r) = att.distance_tables(&rel, true);
            let want: Vec<Tensor> = k_r.into_iter().chain(q_r).collect();
            let ws: Vec<Tensor> = want
                .iter()
                .map(|t| Tensor::randn(t.size().as_slice(), (Kind::Float, Device::Cpu)))
                .collect();
            let loss = want
                .iter()
                .zip(&ws)
                .map(|(t, w)| (t * w).sum(Kind::Float))
                .fold(Tensor::from(0f32), |a, b| a + b);
            loss.backward();
            let want_dr = table.grad().copy();
            let want_params = grads_of(&params);
            let n = rel.rel_idx.size()[0];
            let picks = RowPicks::new(&rel.rel_idx, table.size()[0], Kind::Float);
            let close = |a: &Tensor, b: &Tensor, what: &str| {
                let d = (a - b).abs().max().double_value(&[]);
                let scale = b.abs().max().double_value(&[]).max(1e-3);
                assert!(d <= 1e-5 * scale, "{name}: {what} differs by {d:e} (scale {scale:e})");
            };
            // The gradients as they are, and with the padding row (any values there must not
            // count), as the kernels return them.
            for padded in [false, true] {
                tch::manual_seed(11);
                let (got, saved) = tch::no_grad(|| att.relative_tables(&table.detach(), &picks, true, Kind::Float));
                let gs: Vec<Option<Tensor>> = ws
                    .iter()
                    .map(|w| {
                        Some(match padded {
                            true => Tensor::cat(
                                &[
                                    w,
                                    &Tensor::randn([w.size()[0], 1, w.size()[2]], (Kind::Float, Device::Cpu)),
                                ],
                                1,
                            ),
                            false => w.shallow_clone(),
                        })
                    })
                    .collect();
                let got_dr = tch::no_grad(|| att.relative_tables_backward(&saved, &gs));
                let got_params = grads_of(&params);
                assert_eq!(got.len(), want.len(), "{name}");
                for (k, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(a.size()[1], 2 * n, "{name}: table {k} has the padding row");
                    close(&a.narrow(1, 0, 2 * n - 1), &b.detach(), &format!("table {k}"));
                    assert_eq!(
                        a.select(1, 2 * n - 1).abs().max().double_value(&[]),
                        0.0,
                        "{name}: table {k}"
                    );
                }
                close(&got_dr, &want_dr, &format!("R's gradient (padded {padded})"));
                assert!(
                    want_dr.abs().max().double_value(&[]) > 0.0,
                    "{name}: no gradient reached R"
                );
                for (k, (a, b)) in got_params.iter().zip(&want_params).enumerate() {
                    close(a, b, &format!("parameter {k}'s gradient (padded {padded})"));
                }
            }
        }
    }

    #[test]
    fn picking_rows_by_one_hot_equals_index_select_and_its_gradient() {
        tch::manual_seed(4);
        let table = Tensor::randn([7, 5], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let rows = Tensor::from_slice(&[0i64, 0, 3, 6, 6, 6, 2, 6]);
        let g = Tensor::randn([8, 5], (Kind::Float, Device::Cpu));
        let grad = |t: Tensor| Tensor::run_backward(&[(t * &g).sum(Kind::Float)], &[&table], false, false).remove(0);
        let (ours, want) = (pick_rows(&table, &rows), table.index_select(0, &rows));
        assert!(ours.equal(&want), "values differ");
        let d = (grad(ours) - grad(want)).abs().max().double_value(&[]);
        assert!(d < 1e-6, "gradients differ by {d:e}");
    }

    #[test]
    fn distance_rows_read_rel_idx_by_distance() {
        let cfg = DebertaConfig::toy();
        let n = 21;
        let idx = crate::rel_pos::relative_index(&cfg, n, n, Device::Cpu);
        let (desc, asc) = distance_rows(&idx);
        for m in 0..2 * n - 1 {
            let d = n - 1 - m; // distance i - j
            let (i, j) = if d >= 0 { (d, 0) } else { (0, -d) };
            assert_eq!(desc.int64_value(&[m]), idx.int64_value(&[i, j]));
            assert_eq!(asc.int64_value(&[2 * n - 2 - m]), idx.int64_value(&[i, j]));
        }
    }
}
